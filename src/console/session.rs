//! Console sessions: a random 256-bit id in an HttpOnly cookie, looked up in a table held in
//! memory. Keeping them server-side makes them revocable (sign-out removes the entry; a
//! session ends at the first request after its user is removed, its password reset or the
//! access token it was opened with revoked or expired: `CredentialMark`) and lets them expire
//! on the server whatever the browser does. The table is bounded (`MAX_SESSIONS`): when full, expired entries go first,
//! then the one closest to expiry. A restart signs everyone out, which is acceptable for a
//! console. Each session carries its own CSRF token for the forms it posts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use crate::auth::keys::random_bytes;

/// The cookie carrying the session id.
pub const COOKIE: &str = "transship_session";
/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at once, over all users.
pub const MAX_SESSIONS: usize = 10_000;
/// Sessions one user holds at once: a new one beyond this ends that user's oldest, so no
/// account can fill the table and sign everyone else out.
pub const MAX_PER_SUBJECT: usize = 32;

#[derive(Debug, Clone)]
pub struct Session {
    /// The subject as a token `sub` (`Identities::subject` maps it back).
    pub sub: String,
    /// Sent back in every form the session posts.
    pub csrf: String,
    /// The credential it was opened with, re-checked on every request.
    pub mark: Option<crate::auth::CredentialMark>,
    expires: Instant,
}

/// The server-side session table.
pub struct Sessions {
    /// SHA-256 of the cookie value → session: the table never holds a usable cookie.
    table: Mutex<HashMap<[u8; 32], Session>>,
    ttl: Duration,
    max: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(SESSION_TTL, MAX_SESSIONS)
    }
}

fn hash(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

impl Sessions {
    pub fn new(ttl: Duration, max: usize) -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
            ttl,
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for `sub`, signed in with the credential `mark`; returns the cookie.
    pub fn open(&self, sub: &str, mark: Option<crate::auth::CredentialMark>) -> String {
        let cookie = hex::encode(random_bytes::<32>());
        let session = Session {
            sub: sub.to_string(),
            csrf: hex::encode(random_bytes::<32>()),
            mark,
            expires: Instant::now() + self.ttl,
        };
        let mut table = self.lock();
        let own: Vec<([u8; 32], Instant)> = table
            .iter()
            .filter(|(_, s)| s.sub == sub)
            .map(|(k, s)| (*k, s.expires))
            .collect();
        if own.len() >= MAX_PER_SUBJECT
            && let Some((k, _)) = own.iter().min_by_key(|(_, e)| *e)
        {
            table.remove(k);
        }
        if table.len() >= self.max {
            let now = Instant::now();
            table.retain(|_, s| s.expires > now);
        }
        if table.len() >= self.max
            && let Some(k) = table.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k)
        {
            table.remove(&k);
        }
        table.insert(hash(&cookie), session);
        cookie
    }

    /// The live session behind a cookie value; an expired one is removed.
    pub fn get(&self, cookie: &str) -> Option<Session> {
        let k = hash(cookie);
        let mut table = self.lock();
        match table.get(&k) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                table.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Ends a session (sign-out).
    pub fn close(&self, cookie: &str) {
        self.lock().remove(&hash(cookie));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A session read back from the shared table (the cluster profile's), whose expiry the
/// database keeps.
pub fn shared(sub: String, csrf: String, mark: Option<crate::auth::CredentialMark>) -> Session {
    Session {
        sub,
        csrf,
        mark,
        expires: Instant::now() + SESSION_TTL,
    }
}

/// A new random cookie value, or CSRF token.
pub fn new_secret() -> String {
    hex::encode(random_bytes::<32>())
}

/// What a session table keys a cookie by.
pub fn cookie_hash(cookie: &str) -> [u8; 32] {
    hash(cookie)
}

/// Whether a form's CSRF token is the session's, compared in constant time.
pub fn csrf_matches(session: &Session, presented: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(session.csrf.as_bytes(), presented.as_bytes())
        .is_ok()
}

/// The session cookie's value among the request's `Cookie` headers.
pub fn cookie_value(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
}

/// `Set-Cookie` for a new session (`Secure` when served over TLS).
pub fn set_cookie(value: &str, secure: bool, ttl: Duration) -> String {
    format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_open_resolve_close_and_expire() {
        let s = Sessions::new(Duration::from_secs(60), 10);
        let c = s.open("alice", None);
        let got = s.get(&c).expect("open session");
        assert_eq!(got.sub, "alice");
        assert!(csrf_matches(&got, &got.csrf));
        assert!(!csrf_matches(&got, ""));
        assert!(!csrf_matches(&got, &"0".repeat(64)));
        assert!(s.get("not-a-session").is_none());
        s.close(&c);
        assert!(s.get(&c).is_none());

        let expired = Sessions::new(Duration::ZERO, 10);
        let c = expired.open("bob", None);
        assert!(
            expired.get(&c).is_none(),
            "a session past its expiry is gone"
        );
        assert!(expired.is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let s = Sessions::new(Duration::from_secs(60), 3);
        let first = s.open("u0", None);
        let cookies: Vec<String> = (1..5).map(|i| s.open(&format!("u{i}"), None)).collect();
        assert_eq!(s.len(), 3);
        assert!(s.get(&first).is_none(), "the oldest session made room");
        assert!(s.get(&cookies[3]).is_some());
    }

    #[test]
    fn cookies_are_read_and_written() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            http::HeaderValue::from_static("a=1; transship_session=abc ; b=2"),
        );
        assert_eq!(cookie_value(&h).as_deref(), Some("abc"));
        let set = set_cookie("abc", true, SESSION_TTL);
        for part in [
            "HttpOnly",
            "SameSite=Lax",
            "Secure",
            "Path=/",
            "Max-Age=43200",
        ] {
            assert!(set.contains(part), "{set}");
        }
        assert!(!set_cookie("abc", false, SESSION_TTL).contains("Secure"));
        assert!(clear_cookie(false).contains("Max-Age=0"));
    }

    /// One user opening session after session ends their own oldest, not anyone else's.
    #[test]
    fn one_user_cannot_crowd_out_the_others() {
        let s = Sessions::new(Duration::from_secs(60), 100);
        let other = s.open("bob", None);
        let first = s.open("mallory", None);
        for _ in 0..MAX_PER_SUBJECT * 3 {
            s.open("mallory", None);
        }
        assert!(s.get(&other).is_some(), "another user's session was ended");
        assert!(s.get(&first).is_none(), "the flooding user's oldest stays");
        assert_eq!(s.len(), MAX_PER_SUBJECT + 1);
    }
}
