//! Registry tokens: ES256 JWTs in the Docker token format (`iss`, `sub`, `aud`, `exp`, `nbf`,
//! `iat`, `jti`, `access`), signed with a P-256 key generated at first start and kept in the
//! data directory (`token-signing-key.pem`, PKCS#8, mode 0600), or in the cluster profile
//! shared by every replica through the database (`from_pkcs8`). Verification accepts only
//! ES256 with our `kid`, checks issuer, audience and the validity window, and remembers
//! verified tokens for a minute so Bearer-authenticated pulls do not pay an ECDSA check each.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::scope::Access;
use crate::store::unix_now;

pub const KEY_FILE: &str = "token-signing-key.pem";

/// Clock skew tolerated between token issue and use.
const LEEWAY_SECS: u64 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The subject (`Subject::token_sub`); empty for anonymous tokens.
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
}

impl Claims {
    /// True if the token grants `action` on the resource.
    pub fn allows(&self, kind: &str, name: &str, action: &str) -> bool {
        self.access
            .iter()
            .any(|a| a.kind == kind && a.name == name && a.allows(action))
    }
}

/// Why a token was rejected (said in the 401 and in the audit line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signed with an unsupported algorithm")]
    Algorithm,
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("token signature does not verify")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is for another service")]
    Audience,
    #[error("token from an untrusted issuer")]
    Issuer,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write the token signing key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the token signing key {0} is not a PKCS#8 P-256 key; move it away to generate a new one"
    )]
    Invalid(PathBuf),
    #[error("the token signing key is not a PKCS#8 P-256 key")]
    NotP256,
}

pub struct TokenSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    kid: String,
    issuer: String,
    service: String,
    validation: Validation,
    verified: moka::sync::Cache<[u8; 32], Arc<Claims>>,
}

impl TokenSigner {
    /// Loads the signing key from `data_dir`, generating it on first start.
    pub fn open(data_dir: &Path, issuer: &str, service: &str) -> Result<Self, KeyError> {
        let path = data_dir.join(KEY_FILE);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        let pkcs8 = match std::fs::read_to_string(&path) {
            Ok(pem) => {
                tighten_permissions(&path).map_err(io)?;
                pem_decode(&pem).ok_or_else(|| KeyError::Invalid(path.clone()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = EcdsaKeyPair::generate_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &SystemRandom::new(),
                )
                .map_err(|_| KeyError::Invalid(path.clone()))?;
                let der = doc.as_ref().to_vec();
                write_private(&path, pem_encode(&der).as_bytes()).map_err(io)?;
                tracing::info!(path = %path.display(), "generated the token signing key");
                der
            }
            Err(e) => return Err(io(e)),
        };
        Self::from_pkcs8(&pkcs8, issuer, service).map_err(|_| KeyError::Invalid(path))
    }

    /// A signer with the PKCS#8 P-256 key `pkcs8` (the cluster's shared key): signers built
    /// from the same bytes issue tokens each other verifies.
    pub fn from_pkcs8(pkcs8: &[u8], issuer: &str, service: &str) -> Result<Self, KeyError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|_| KeyError::NotP256)?;
        let public = pair.public_key().as_ref().to_vec();
        let kid = hex::encode(&Sha256::digest(&public)[..12]);
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[service]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Ok(Self {
            encoding: EncodingKey::from_ec_der(pkcs8),
            decoding: DecodingKey::from_ec_der(&public),
            kid,
            issuer: issuer.to_string(),
            service: service.to_string(),
            validation,
            verified: moka::sync::Cache::builder()
                .max_capacity(50_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs a token for `sub` granting `access`, valid for `ttl` from now.
    pub fn issue(&self, sub: &str, access: Vec<Access>, ttl: Duration) -> (String, Claims) {
        let now = unix_now();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: sub.to_string(),
            aud: self.service.clone(),
            exp: now + ttl.as_secs(),
            nbf: now.saturating_sub(LEEWAY_SECS),
            iat: now,
            jti: hex::encode(super::keys::random_bytes::<16>()),
            access,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let jwt = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .expect("signing with our own P-256 key cannot fail");
        (jwt, claims)
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        if token.len() > 16 * 1024 {
            return Err(TokenError::Malformed);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(claims) = self.verified.get(&key) {
            let now = unix_now();
            if claims.exp + LEEWAY_SECS <= now {
                return Err(TokenError::Expired);
            }
            return Ok(claims);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => TokenError::Algorithm,
            _ => TokenError::Malformed,
        })?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Algorithm);
        }
        if header.kid.as_deref() != Some(self.kid.as_str()) {
            return Err(TokenError::UnknownKey);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAudience => TokenError::Audience,
                ErrorKind::InvalidIssuer => TokenError::Issuer,
                ErrorKind::InvalidSignature => TokenError::Signature,
                ErrorKind::InvalidAlgorithm => TokenError::Algorithm,
                _ => TokenError::Malformed,
            })?;
        let claims = Arc::new(data.claims);
        self.verified.insert(key, claims.clone());
        Ok(claims)
    }
}

/// Group- or world-readable key files are narrowed to the owner.
fn tighten_permissions(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "token signing key was readable by others; setting mode 0600");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes a secret file durably with mode 0600 from the start (temp file, fsync, rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn pem_encode(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END PRIVATE KEY-----\n");
    out
}

fn pem_decode(pem: &str) -> Option<Vec<u8>> {
    let body = pem
        .split("-----BEGIN PRIVATE KEY-----")
        .nth(1)?
        .split("-----END PRIVATE KEY-----")
        .next()?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_generated_once_private_and_tokens_verify() {
        let dir = tempfile::tempdir().unwrap();
        let a = TokenSigner::open(dir.path(), "iss", "svc").unwrap();
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = TokenSigner::open(dir.path(), "iss", "svc").unwrap();
        assert_eq!(a.kid(), b.kid(), "the key is reused after a restart");
        let (jwt, claims) = a.issue(
            "alice",
            vec![Access::new("repository", "team/app", &["pull"])],
            Duration::from_secs(300),
        );
        let got = b.verify(&jwt).unwrap();
        assert_eq!(*got, claims);
        assert!(got.allows("repository", "team/app", "pull"));
        assert!(!got.allows("repository", "team/app", "push"));
        assert!(!got.allows("repository", "team/other", "pull"));

        let other = TokenSigner::open(tempfile::tempdir().unwrap().path(), "iss", "svc").unwrap();
        assert_eq!(other.verify(&jwt), Err(TokenError::UnknownKey));
        let wrong_aud = TokenSigner::open(dir.path(), "iss", "other").unwrap();
        assert_eq!(wrong_aud.verify(&jwt), Err(TokenError::Audience));
        let wrong_iss = TokenSigner::open(dir.path(), "evil", "svc").unwrap();
        assert_eq!(wrong_iss.verify(&jwt), Err(TokenError::Issuer));
        assert_eq!(a.verify("not.a.jwt"), Err(TokenError::Malformed));
        assert_eq!(a.verify(""), Err(TokenError::Malformed));

        // A key file that others can read is narrowed on load.
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        TokenSigner::open(dir.path(), "iss", "svc").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            TokenSigner::open(dir.path(), "iss", "svc"),
            Err(KeyError::Invalid(_))
        ));
    }

    #[test]
    fn signers_from_the_same_pkcs8_bytes_verify_each_others_tokens() {
        use aws_lc_rs::rand::SystemRandom;
        let der =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let a = TokenSigner::from_pkcs8(der.as_ref(), "iss", "svc").unwrap();
        let b = TokenSigner::from_pkcs8(der.as_ref(), "iss", "svc").unwrap();
        assert_eq!(a.kid(), b.kid());
        let access = vec![Access::new("repository", "team/app", &["pull", "push"])];
        let (from_a, claims_a) = a.issue("alice", access.clone(), Duration::from_secs(300));
        let (from_b, claims_b) = b.issue("bob", access, Duration::from_secs(300));
        assert_eq!(*b.verify(&from_a).unwrap(), claims_a);
        assert_eq!(*a.verify(&from_b).unwrap(), claims_b);

        // Another key's tokens are refused, and bytes that are no P-256 PKCS#8 key are no key.
        let other =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .unwrap();
        let c = TokenSigner::from_pkcs8(other.as_ref(), "iss", "svc").unwrap();
        assert_eq!(c.verify(&from_a).map(drop), Err(TokenError::UnknownKey));
        let p384 = EcdsaKeyPair::generate_pkcs8(
            &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        for bad in [p384.as_ref(), b"garbage".as_slice(), &[]] {
            assert!(matches!(
                TokenSigner::from_pkcs8(bad, "iss", "svc"),
                Err(KeyError::NotP256)
            ));
        }
    }
}
