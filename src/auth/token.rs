//! The token endpoint of the Docker token protocol: who asks (anonymous,
//! Basic credentials on the GET form, `grant_type=password` or `refresh_token` on the OAuth2
//! POST form), what they asked for (`scope`), and what they get: a JWT granting the
//! intersection of the two, never an error for asking too much. `offline_token` /
//! `access_type=offline` with real credentials adds a refresh token (`docker login` keeps it as
//! its identity token). The HTTP layer parses the request into a `TokenRequest`.

use std::net::IpAddr;

use serde::Serialize;

use super::keys::{Subject, TokenKind};
use super::scope::Access;
use super::{Authorizer, Caller, Denial, Identity};

/// How the caller of the token endpoint identifies.
#[derive(Debug)]
pub enum Credentials {
    None,
    Password { user: String, password: String },
    Refresh(String),
}

#[derive(Debug)]
pub struct TokenRequest {
    pub credentials: Credentials,
    pub scopes: Vec<Access>,
    pub service: Option<String>,
    /// A refresh token is wanted (`offline_token=true`, `access_type=offline`).
    pub offline: bool,
}

/// The JSON answer; `token` and `access_token` carry the same JWT (clients read either).
#[derive(Debug, Serialize)]
pub struct TokenResponse {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

/// Why no token was issued.
#[derive(Debug)]
pub enum TokenFailure {
    /// Malformed request: 400.
    BadRequest(String),
    Denied(Denial),
}

impl From<Denial> for TokenFailure {
    fn from(d: Denial) -> Self {
        Self::Denied(d)
    }
}

impl Authorizer {
    /// Serves one token request.
    pub async fn issue_token(
        &self,
        req: TokenRequest,
        peer: IpAddr,
    ) -> Result<TokenResponse, TokenFailure> {
        if let Some(service) = &req.service
            && service != &self.config.service
        {
            return Err(TokenFailure::BadRequest(format!(
                "unknown service {:?}; this registry is {:?}",
                service.chars().take(100).collect::<String>(),
                self.config.service
            )));
        }
        // A Docker daemon logged in to Docker Hub sends those credentials here too when it
        // pulls through the mirror (moby#42022). When everything asked for is open to anonymous
        // pulls, the credentials are not even checked: the answer would be the same, and
        // checking them would fail and lock the daemon's host out.
        let mirror_only = !req.scopes.is_empty()
            && req.scopes.iter().all(|s| {
                s.kind == "repository"
                    && s.actions.iter().all(|a| a == "pull")
                    && s.name
                        .parse()
                        .is_ok_and(|r| self.lenient_for(&self.router.namespace(&r, None)))
            });
        let (subject, refresh) = match req.credentials {
            Credentials::None => (None, None),
            Credentials::Password { .. } if mirror_only => (None, None),
            Credentials::Password { user, password } => {
                let s = self.verify_password(&user, &password, peer).await?;
                (Some(s), None)
            }
            Credentials::Refresh(token) => {
                let s = self
                    .identities
                    .verify_token_anywhere(&token, TokenKind::Refresh)
                    .await
                    .map_err(|e| {
                        tracing::warn!(target: "audit", %peer, why = %e, "audit: refresh token refused");
                        Denial::Unauthenticated {
                            message: "invalid refresh token".into(),
                            error: Some("invalid_grant"),
                        }
                    })?;
                (Some(s), Some(token))
            }
        };
        let caller = Caller {
            peer,
            identity: subject
                .clone()
                .map_or(Identity::Anonymous, Identity::Subject),
        };
        let granted = self.grant(&caller, &req.scopes);
        let refresh_token = match (&subject, refresh) {
            (_, Some(existing)) => Some(existing),
            (Some(s), None) if req.offline => Some(self.new_refresh_token(s).await?),
            _ => None,
        };
        let ttl = self.config.token_ttl.0;
        let sub = subject.as_ref().map(Subject::token_sub).unwrap_or_default();
        let scope = granted
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let (jwt, claims) = self.signer.issue(&sub, granted, ttl);
        Ok(TokenResponse {
            token: jwt.clone(),
            access_token: jwt,
            expires_in: ttl.as_secs(),
            issued_at: rfc3339(claims.iat),
            scope,
            refresh_token,
        })
    }

    async fn new_refresh_token(&self, subject: &Subject) -> Result<String, TokenFailure> {
        let (identities, subject) = (self.identities.clone(), subject.clone());
        let ttl = self.config.refresh_token_ttl.0;
        let made = tokio::task::spawn_blocking(move || {
            identities.create_token(&subject, TokenKind::Refresh, ttl, "login")
        })
        .await;
        match made {
            Ok(Ok((_, token))) => Ok(token),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot store a refresh token");
                Err(TokenFailure::BadRequest(
                    "cannot issue a refresh token now".into(),
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "refresh token task failed");
                Err(TokenFailure::BadRequest(
                    "cannot issue a refresh token now".into(),
                ))
            }
        }
    }
}

/// `2026-11-22T10:00:00Z` from unix seconds.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_600), "2026-11-22T00:00:00Z");
        assert_eq!(rfc3339(1_795_305_600 + 3661), "2026-11-22T01:01:01Z");
    }
}
