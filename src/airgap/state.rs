//! Delta bookkeeping. Every export writes `FILE.state.json` beside its bundle: the blobs and
//! manifests the bundle contains and, for a delta, everything its predecessors contained. An
//! export `--since` a state file leaves out whatever that chain already carried and lists it
//! in the bundle's `transship-bundle.json` as expected at the destination, which an import
//! checks before committing anything. Blobs are tracked by digest (the store holds each once);
//! manifests by `repository@digest` (a manifest is stored per repository).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::AirgapError;

pub const FORMAT: u32 = 1;

/// Digests of blobs, and `repository@digest` of manifests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contents {
    #[serde(default)]
    pub blobs: BTreeSet<String>,
    #[serde(default)]
    pub manifests: BTreeSet<String>,
}

impl Contents {
    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty() && self.manifests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.blobs.len() + self.manifests.len()
    }

    fn extend(&mut self, other: &Contents) {
        self.blobs.extend(other.blobs.iter().cloned());
        self.manifests.extend(other.manifests.iter().cloned());
    }
}

/// `FILE.state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleState {
    pub format: u32,
    /// The bundle's file name.
    pub bundle: String,
    /// When it was written (unix seconds).
    pub created: u64,
    /// The references it names.
    pub refs: Vec<String>,
    pub contains: Contents,
    /// What the bundles it was made after contained (empty for a full export).
    pub predecessors: Contents,
}

impl BundleState {
    /// Everything the chain up to and including this bundle carried.
    pub fn carried(&self) -> Contents {
        let mut all = self.predecessors.clone();
        all.extend(&self.contains);
        all
    }

    pub fn load(path: &Path) -> Result<Self, AirgapError> {
        let text = std::fs::read(path).map_err(AirgapError::io(path.display()))?;
        let state: Self = serde_json::from_slice(&text).map_err(|e| {
            AirgapError::Usage(format!(
                "{} is not an export state file: {e}",
                path.display()
            ))
        })?;
        if state.format != FORMAT {
            return Err(AirgapError::Usage(format!(
                "{}: state format {} is not supported (expected {FORMAT})",
                path.display(),
                state.format
            )));
        }
        Ok(state)
    }

    /// Writes it under a temporary name, syncs and renames.
    pub fn save(&self, path: &Path) -> Result<(), AirgapError> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other);
        let write = || -> std::io::Result<()> {
            // A fresh name each time, created new (never following a link someone left there).
            let mut tmp = path.as_os_str().to_os_string();
            tmp.push(format!(".partial-{}", uuid::Uuid::new_v4()));
            let tmp = PathBuf::from(tmp);
            {
                let mut f = std::os::unix::fs::OpenOptionsExt::mode(
                    std::fs::OpenOptions::new().write(true).create_new(true),
                    0o640,
                )
                .open(&tmp)?;
                std::io::Write::write_all(&mut f, &json?)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, path)
        };
        write().map_err(AirgapError::io(path.display()))
    }
}

/// `FILE.state.json` for the bundle `FILE`.
pub fn state_path(bundle: &Path) -> PathBuf {
    let mut p = bundle.as_os_str().to_os_string();
    p.push(".state.json");
    PathBuf::from(p)
}

/// `transship-bundle.json` inside a bundle.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BundleMeta {
    pub format: u32,
    pub created: u64,
    /// What the bundle leaves out because an earlier bundle carried it: the destination must
    /// hold all of it already.
    #[serde(default)]
    pub expects: Contents,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_carries_its_predecessors() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = BundleState {
            format: FORMAT,
            bundle: "a.tar".into(),
            created: 1,
            refs: vec!["local/app:v1".into()],
            contains: Contents::default(),
            predecessors: Contents::default(),
        };
        first.contains.blobs.insert("sha256:aa".into());
        first
            .contains
            .manifests
            .insert("local/app@sha256:bb".into());
        let path = state_path(&dir.path().join("a.tar"));
        assert!(path.ends_with("a.tar.state.json"));
        first.save(&path).unwrap();
        let loaded = BundleState::load(&path).unwrap();
        let mut second = loaded.clone();
        second.predecessors = loaded.carried();
        second.contains = Contents::default();
        second.contains.blobs.insert("sha256:cc".into());
        let all = second.carried();
        assert_eq!(all.len(), 3);
        assert!(all.blobs.contains("sha256:aa") && all.blobs.contains("sha256:cc"));
        std::fs::write(&path, b"{}").unwrap();
        assert!(BundleState::load(&path).is_err());
    }
}
