//! Air-gap bundles: `transship export` writes cached and project images from the store as a
//! standard OCI image layout in a tar (optionally zstd-compressed), with a `.state.json` beside
//! it so a later export can carry only what changed (a delta); `transship import` verifies a
//! bundle completely and only then commits it to the store, so an offline instance serves
//! exactly what was carried across. Both run on a stopped store or, through the admin socket,
//! inside the running server (on the blocking pool; they take no lock beyond the store's
//! short per-commit ones).
//!
//! References in a bundle: each `index.json` entry is annotated
//! `org.opencontainers.image.ref.name` with the image's full name in the store, which is the
//! name clients pull it by from transship: `docker.io/library/nginx:1.27` for a cache
//! repository (upstream name, then the upstream repository), `PROJECT/IMAGE:TAG` for a project
//! image (no host), and `NAME@DIGEST` for an image exported by digest.

pub mod export;
pub mod import;
pub mod layout;
pub mod state;

use serde::{Deserialize, Serialize};

use crate::oci::{Digest, Reference, RepoName, Tag};
use crate::proxy::route::{Namespace, Router};
use crate::store::{Store, StoreError};

pub use export::{ExportOptions, ExportReport, export};
pub use import::{ImportOptions, ImportReport, import};

#[derive(Debug, thiserror::Error)]
pub enum AirgapError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Refused(String),
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AirgapError {
    pub(crate) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.to_string();
        move |source| Self::Io { what, source }
    }
}

/// An image reference as the store knows it: repository and tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRef {
    pub repo: RepoName,
    pub reference: Reference,
}

impl std::fmt::Display for StoreRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.repo),
            Reference::Digest(d) => write!(f, "{}@{d}", self.repo),
        }
    }
}

/// Splits `NAME[:TAG|@DIGEST]` (no tag means `latest`).
pub fn split_reference(s: &str) -> Result<(String, Reference), AirgapError> {
    let bad = |e: &dyn std::fmt::Display| AirgapError::Usage(format!("{s:?}: {e}"));
    if let Some((name, digest)) = s.split_once('@') {
        let d: Digest = digest.parse().map_err(|e| bad(&e))?;
        return Ok((name.to_string(), Reference::Digest(d)));
    }
    let last = s.rfind('/').map_or(0, |i| i + 1);
    match s[last..].rfind(':') {
        Some(i) => {
            let tag: Tag = s[last + i + 1..].parse().map_err(|e| bad(&e))?;
            Ok((s[..last + i].to_string(), Reference::Tag(tag)))
        }
        None => Ok((
            s.to_string(),
            Reference::Tag("latest".parse().map_err(|e| bad(&e))?),
        )),
    }
}

/// Where a repository lives in this configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cache,
    Project,
}

/// Resolves a name the way a client's pull would (`nginx` is `docker.io/library/nginx` when
/// docker.io is the default upstream) to the store's repository and its kind.
pub fn resolve_name(router: &Router, name: &str) -> Result<(RepoName, Kind), AirgapError> {
    let repo: RepoName = name
        .parse()
        .map_err(|e| AirgapError::Usage(format!("{name:?}: {e}")))?;
    match router.namespace(&repo, None) {
        Namespace::Project(_) => Ok((repo, Kind::Project)),
        Namespace::Mirror(Ok(route)) => Ok((route.local, Kind::Cache)),
        Namespace::Mirror(Err(e)) => Err(AirgapError::Usage(format!("{name:?}: {e}"))),
    }
}

/// The kind of a repository named exactly as the store names it, or `None` if this
/// configuration has no project or upstream that serves it under that name.
pub fn kind_of_stored(router: &Router, repo: &RepoName) -> Option<Kind> {
    match router.namespace(repo, None) {
        Namespace::Project(_) => Some(Kind::Project),
        Namespace::Mirror(Ok(route)) if route.local == *repo => Some(Kind::Cache),
        Namespace::Mirror(_) => None,
    }
}

/// An image an import brought in: pinned unless `--no-pin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedImage {
    pub repo: String,
    pub digest: String,
    pub tag: Option<String>,
}

/// Pins what an import brought in, so eviction keeps it: exactly the digest imported (a
/// tagged one with the tag as its reason, and the tag pinned so what it moves to stays too).
/// Every image is tried; the first failure is reported after.
pub fn pin_imported(store: &Store, images: &[ImportedImage]) -> Result<(), StoreError> {
    let mut first_error = None;
    for image in images {
        let (Ok(repo), Ok(digest)) = (
            image.repo.parse::<RepoName>(),
            image.digest.parse::<crate::oci::Digest>(),
        ) else {
            continue;
        };
        let tag = image.tag.as_deref().and_then(|t| t.parse::<Tag>().ok());
        if let Err(e) = store.pin_exact(&repo, &digest, tag.as_ref()) {
            tracing::error!(repository = %repo, %digest, error = %e, "pinning an imported image failed");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn splits_references() {
        let (n, r) = split_reference("docker.io/library/nginx:1.27").unwrap();
        assert_eq!(
            (n.as_str(), r.to_string().as_str()),
            ("docker.io/library/nginx", "1.27")
        );
        let (n, r) = split_reference("localhost/x/y").unwrap();
        assert_eq!(
            (n.as_str(), r.to_string().as_str()),
            ("localhost/x/y", "latest")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let (n, r) = split_reference(&format!("local/app@{d}")).unwrap();
        assert_eq!(
            (n.as_str(), r),
            ("local/app", Reference::Digest(d.parse().unwrap()))
        );
        assert!(split_reference("local/app:").is_err());
        assert!(split_reference("local/app@sha256:zz").is_err());
    }

    #[test]
    fn names_resolve_like_pulls() {
        let config = Config::embedded();
        let router = Router::new(&config);
        let (repo, kind) = resolve_name(&router, "nginx").unwrap();
        assert_eq!(
            (repo.as_str(), kind),
            ("docker.io/library/nginx", Kind::Cache)
        );
        let (repo, kind) = resolve_name(&router, "local/app").unwrap();
        assert_eq!((repo.as_str(), kind), ("local/app", Kind::Project));
        let stored: RepoName = "docker.io/library/nginx".parse().unwrap();
        assert_eq!(kind_of_stored(&router, &stored), Some(Kind::Cache));
        let stray: RepoName = "quay.io/org/app".parse().unwrap();
        assert_eq!(kind_of_stored(&router, &stray), None);
    }
}
