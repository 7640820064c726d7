//! Image references as people write them on a command line or in a config list:
//! `nginx`, `nginx:1.27`, `docker.io/library/nginx:1.27`, `ghcr.io/org/x@sha256:…`,
//! `localhost:5000/app:v1`. The first path component is a registry host when it looks like
//! one (a `.` or a `:` in it, an upper-case letter, or exactly `localhost`), the rule Docker
//! uses; without a tag or digest the reference means `latest`. Which upstream a host is, is
//! for the router to say.

use std::fmt;
use std::str::FromStr;

use super::name::{NameError, Reference, ReferenceError, RepoName, Tag};

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The registry host as written (`docker.io`, `localhost:5000`), if any.
    pub host: Option<String>,
    /// The repository path after the host (`library/nginx`, or `nginx` as written).
    pub path: RepoName,
    /// The tag or digest (`latest` when neither was given).
    pub reference: Reference,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("invalid image reference {0:?}: empty")]
    Empty(String),
    #[error("invalid image reference {0:?}: {1}")]
    Name(String, NameError),
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, ReferenceError),
    #[error("invalid image reference {0:?}: a registry host but no repository")]
    NoRepository(String),
}

/// True if `component` names a registry host rather than a repository path component.
fn is_host(component: &str) -> bool {
    component.contains(['.', ':'])
        || component == "localhost"
        || component.bytes().any(|b| b.is_ascii_uppercase())
}

impl FromStr for ImageRef {
    type Err = ImageRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown = || s.chars().take(300).collect::<String>();
        let text = s.trim();
        if text.is_empty() {
            return Err(ImageRefError::Empty(shown()));
        }
        // `name@digest`, else `name:tag` where the ':' comes after the last '/' (a host's port
        // has a '/' after it).
        let (name, reference) = match text.split_once('@') {
            // `name:tag@digest`: the digest is what is fetched; the tag is only a label.
            Some((name, digest)) => match name.rfind(':') {
                Some(i) if !name[i..].contains('/') => (&name[..i], Some(digest)),
                _ => (name, Some(digest)),
            },
            None => match text.rfind(':') {
                Some(i) if !text[i..].contains('/') => (&text[..i], Some(&text[i + 1..])),
                _ => (text, None),
            },
        };
        let reference = match reference {
            Some(r) if text.contains('@') => Reference::Digest(
                r.parse()
                    .map_err(|e| ImageRefError::Reference(shown(), ReferenceError::Digest(e)))?,
            ),
            Some(r) => Reference::Tag(
                r.parse()
                    .map_err(|e| ImageRefError::Reference(shown(), ReferenceError::Tag(e)))?,
            ),
            None => Reference::Tag(
                Tag::from_str("latest")
                    .map_err(|e| ImageRefError::Reference(shown(), ReferenceError::Tag(e)))?,
            ),
        };
        let (host, path) = match name.split_once('/') {
            Some((first, rest)) if is_host(first) => (Some(first.to_ascii_lowercase()), rest),
            _ if is_host(name) && !name.contains('/') => {
                return Err(ImageRefError::NoRepository(shown()));
            }
            _ => (None, name),
        };
        let path = path.parse().map_err(|e| ImageRefError::Name(shown(), e))?;
        Ok(Self {
            host,
            path,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(h) = &self.host {
            write!(f, "{h}/")?;
        }
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}:{t}", self.path),
            Reference::Digest(d) => write!(f, "{}@{d}", self.path),
        }
    }
}

/// A platform as `os/arch[/variant]` (`linux/amd64`, `linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlatformSpec {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {0:?}: expected os/arch or os/arch/variant, e.g. linux/amd64")]
pub struct PlatformError(pub String);

impl FromStr for PlatformSpec {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        let valid = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| valid(p)) {
            return Err(PlatformError(s.chars().take(100).collect()));
        }
        Ok(Self {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl PlatformSpec {
    /// Whether an index entry for `os`/`architecture`/`variant` is this platform (a spec
    /// without a variant matches every variant).
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == architecture
            && self.variant.as_deref().is_none_or(|v| Some(v) == variant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn hosts_paths_tags_and_digests() {
        let r = parse("docker.io/library/nginx:1.27");
        assert_eq!(r.host.as_deref(), Some("docker.io"));
        assert_eq!(r.path.as_str(), "library/nginx");
        assert_eq!(r.reference, Reference::Tag("1.27".parse().unwrap()));
        let r = parse("nginx:1.27");
        assert_eq!((r.host, r.path.as_str()), (None, "nginx"));
        let r = parse("nginx");
        assert_eq!(r.reference, Reference::Tag("latest".parse().unwrap()));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = parse(&format!("ghcr.io/org/x@{d}"));
        assert_eq!(r.host.as_deref(), Some("ghcr.io"));
        assert_eq!(r.reference, Reference::Digest(d.parse().unwrap()));
        assert_eq!(r.to_string(), format!("ghcr.io/org/x@{d}"));
        assert_eq!(parse(&format!("ghcr.io/org/x:v1@{d}")), r);
        let r = parse("localhost:5000/app");
        assert_eq!(
            (r.host.as_deref(), r.path.as_str()),
            (Some("localhost:5000"), "app")
        );
        let r = parse("LOCALHOST/team/app:v1");
        assert_eq!(r.host.as_deref(), Some("localhost"));
        assert_eq!(r.to_string(), "localhost/team/app:v1");
        // Not a host: no dot, colon, or `localhost`.
        assert_eq!(parse("org/app:v2").host, None);
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in [
            "",
            "  ",
            "Nginx",
            "nginx:",
            "nginx:bad tag",
            "nginx@sha256:short",
            "docker.io",
            "docker.io/",
            "a//b",
        ] {
            assert!(bad.parse::<ImageRef>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn platforms() {
        let p: PlatformSpec = "linux/arm/v7".parse().unwrap();
        assert!(p.matches("linux", "arm", Some("v7")));
        assert!(!p.matches("linux", "arm", Some("v6")));
        let p: PlatformSpec = "linux/arm64".parse().unwrap();
        assert!(p.matches("linux", "arm64", Some("v8")));
        assert!(p.matches("linux", "arm64", None));
        assert!(!p.matches("windows", "arm64", None));
        assert_eq!(p.to_string(), "linux/arm64");
        for bad in ["linux", "linux/", "a/b/c/d", "linux/amd 64"] {
            assert!(bad.parse::<PlatformSpec>().is_err(), "{bad:?}");
        }
    }
}
