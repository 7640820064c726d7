//! Where console sessions live: this process's table (`session::Sessions`) in the local
//! profile; the shared database in the cluster profile, so a session opened on one replica is
//! known to every other (a load balancer need not pin browsers) and sign-out ends it
//! everywhere. Either way a session holds the subject, its CSRF token and the credential mark
//! re-checked on every request.

use crate::App;
use crate::auth::CredentialMark;
use crate::cluster::console_sessions::{SessionBounds, SessionRow};
use crate::cluster::pg::Db;
use crate::storage::Storage;
use crate::store::StoreError;

use super::ConsoleError;
use super::session::{self, MAX_PER_SUBJECT, MAX_SESSIONS, SESSION_TTL, Session};

fn shared_db(app: &App) -> Option<&Db> {
    match &app.storage {
        Storage::Cluster(c) => Some(c.db()),
        Storage::Local(_) => None,
    }
}

/// A credential mark as the database holds it.
fn encode_mark(mark: &CredentialMark) -> String {
    match mark {
        CredentialMark::Password(fingerprint) => format!("p:{}", hex::encode(fingerprint)),
        CredentialMark::Token(id) => format!("t:{id}"),
    }
}

/// A stored mark; anything unreadable is no mark, which ends the session at its next use.
fn decode_mark(s: &str) -> Option<CredentialMark> {
    match s.split_once(':')? {
        ("p", hex_fp) => {
            let mut fp = [0u8; 32];
            hex::decode_to_slice(hex_fp, &mut fp).ok()?;
            Some(CredentialMark::Password(fp))
        }
        ("t", id) => Some(CredentialMark::Token(id.to_string())),
        _ => None,
    }
}

/// Opens a session for `sub`; returns the cookie value.
pub async fn open(
    app: &App,
    sub: &str,
    mark: Option<CredentialMark>,
) -> Result<String, ConsoleError> {
    let Some(db) = shared_db(app) else {
        return Ok(app.console.sessions.open(sub, mark));
    };
    let cookie = session::new_secret();
    let row = SessionRow {
        subject: sub.to_string(),
        csrf: session::new_secret(),
        mark: mark.as_ref().map(encode_mark),
    };
    let bounds = SessionBounds {
        ttl: SESSION_TTL,
        per_subject: MAX_PER_SUBJECT,
        max: MAX_SESSIONS,
    };
    db.open_console_session(&session::cookie_hash(&cookie), &row, bounds)
        .await
        .map_err(StoreError::from)?;
    Ok(cookie)
}

/// The live session behind a cookie value.
pub async fn get(app: &App, cookie: &str) -> Result<Option<Session>, ConsoleError> {
    let Some(db) = shared_db(app) else {
        return Ok(app.console.sessions.get(cookie));
    };
    let row = db
        .console_session(&session::cookie_hash(cookie))
        .await
        .map_err(StoreError::from)?;
    Ok(row.map(|r| {
        let mark = r.mark.as_deref().and_then(decode_mark);
        session::shared(r.subject, r.csrf, mark)
    }))
}

/// Ends a session, on every replica.
pub async fn close(app: &App, cookie: &str) -> Result<(), ConsoleError> {
    let Some(db) = shared_db(app) else {
        app.console.sessions.close(cookie);
        return Ok(());
    };
    db.close_console_session(&session::cookie_hash(cookie))
        .await
        .map_err(StoreError::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_the_database() {
        for mark in [
            CredentialMark::Password([7; 32]),
            CredentialMark::Token("abc123".into()),
        ] {
            assert_eq!(decode_mark(&encode_mark(&mark)), Some(mark));
        }
        assert!(decode_mark("p:zz").is_none());
        assert!(decode_mark("x:1").is_none());
        assert!(decode_mark("nothing").is_none());
    }
}
