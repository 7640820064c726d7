//! Repository names, tags and references (tag or digest), validated by the distribution-spec
//! grammar before anything touches storage. A `RepoName` is at most 255 bytes, so a name plus
//! a registry host stays within what clients accept.

use std::fmt;
use std::str::FromStr;

use super::digest::{Digest, DigestError};

/// Longest repository name we accept (distribution/reference `NameTotalLengthMax`).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag (spec: 128 characters).
pub const MAX_TAG_LEN: usize = 128;

/// A validated repository name: `component(/component)*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid repository name: must be at most {MAX_NAME_LEN} characters")]
    TooLong,
    #[error(
        "invalid repository name {0:?}: components are lowercase letters and digits separated by '.', '_', '__' or dashes, joined by '/'"
    )]
    Grammar(String),
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
pub fn is_valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-+", always followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path components, left to right.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// True if this name is `prefix` or lies below it (`prefix/...`).
    pub fn is_within(&self, prefix: &str) -> bool {
        self.0.len() >= prefix.len()
            && self.0.starts_with(prefix)
            && (self.0.len() == prefix.len() || self.0.as_bytes()[prefix.len()] == b'/')
    }
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if s.split('/').all(is_valid_component) {
            Ok(Self(s.into()))
        } else {
            Err(NameError::Grammar(s.chars().take(MAX_NAME_LEN).collect()))
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Box<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tag {0:?}: up to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'")]
pub struct TagError(pub String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub fn is_valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl FromStr for Tag {
    type Err = TagError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_valid_tag(s) {
            Ok(Self(s.into()))
        } else {
            Err(TagError(s.chars().take(140).collect()))
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `<reference>` of a manifest path: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A tag can never contain ':', a digest always does.
        if s.contains(':') {
            Ok(Self::Digest(s.parse()?))
        } else {
            Ok(Self::Tag(s.parse()?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => t.fmt(f),
            Self::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_names() {
        for ok in [
            "a",
            "library/alpine",
            "local/app",
            "a/manifests/b",
            "ghcr.io/org/app",
            "example.com/my-project/app",
            "a__b",
            "a---b",
            "a.b_c-d/e0",
            "0",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok:?} must be accepted");
        }
    }

    #[test]
    fn rejects_bad_names() {
        for bad in [
            "", "A", "a/", "/a", "a//b", "a___b", "a..b", "-a", "a-", "a.", "a_.b", "a/../b", "..",
            "a:5000/b", "a b", "a\0b", "ä", "a/B",
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad:?} must be rejected");
        }
        let long = format!("a/{}", "b".repeat(254));
        assert_eq!(long.parse::<RepoName>(), Err(NameError::TooLong));
        let max = "b".repeat(255);
        assert!(max.parse::<RepoName>().is_ok());
    }

    #[test]
    fn within_prefix_is_component_aware() {
        let n: RepoName = "local/app/sub".parse().unwrap();
        assert!(n.is_within("local"));
        assert!(n.is_within("local/app"));
        assert!(!n.is_within("loc"));
        assert!(!n.is_within("local/ap"));
        let n: RepoName = "local".parse().unwrap();
        assert!(n.is_within("local"));
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d", &"t".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok:?}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", &"t".repeat(129), "ü"] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!(
            "latest".parse::<Reference>(),
            Ok(Reference::Tag(_))
        ));
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!(matches!(
            "sha256:xyz".parse::<Reference>(),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            "bad tag".parse::<Reference>(),
            Err(ReferenceError::Tag(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn name_parse_never_panics(s in "[a-z0-9._/-]{0,300}") {
            if let Ok(n) = s.parse::<RepoName>() {
                proptest::prop_assert!(n.as_str().len() <= MAX_NAME_LEN);
                proptest::prop_assert!(!n.as_str().contains(".."));
                proptest::prop_assert!(!n.as_str().starts_with('/'));
            }
        }
    }
}
