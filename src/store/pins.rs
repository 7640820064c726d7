//! Pins: cached images the operator keeps out of eviction. A digest pin keeps one image (an
//! index with all its children, or only the children of the listed platforms); a tag pin
//! keeps the digest the tag resolves to and, while it stays pinned, every digest it moves to
//! (`put_cached_manifest` adds those digest pins in the same batch as the move). Pins are
//! index records, so they survive restarts.

use serde::{Deserialize, Serialize};

use super::index::{CF_PINS, IndexBatch, key, prefix};
use super::{Store, StoreError, unix_now};
use crate::oci::manifest::Platform;
use crate::oci::{Digest, RepoName, Tag};

/// One pin as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PinRecord {
    pub pinned_at: u64,
    /// `os/arch[/variant]` of the children kept; empty keeps the whole image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// The tag pin that made this digest pin, if any (unpinning the tag removes it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_tag: Option<String>,
}

impl PinRecord {
    /// Whether this pin keeps a child manifest of `platform`.
    pub fn keeps(&self, platform: Option<&Platform>) -> bool {
        self.platforms.is_empty()
            || platform.is_some_and(|p| self.platforms.iter().any(|s| platform_matches(s, p)))
    }
}

/// `os/arch` matches any variant; `os/arch/variant` only that one.
pub fn platform_matches(spec: &str, p: &Platform) -> bool {
    p.matches(spec)
}

/// A pinned digest or tag, as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinInfo {
    pub repository: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(flatten)]
    pub record: PinRecord,
}

/// What to pin or unpin.
#[derive(Debug, Clone)]
pub enum PinTarget {
    Digest(Digest),
    Tag(Tag),
}

/// Why a digest is pinned: `@` for a pin by digest, `:TAG` for one made by a tag pin. One
/// record per reason, so unpinning one tag never drops a pin another tag or a digest pin made.
const BY_DIGEST: &str = "@";

fn via(tag: &str) -> String {
    format!(":{tag}")
}

fn digest_key(repo: &RepoName, digest: &str, reason: &str) -> Vec<u8> {
    key(&[repo.as_str(), digest, reason])
}

fn tag_key(repo: &RepoName, tag: &str) -> Vec<u8> {
    key(&[repo.as_str(), "", tag])
}

fn encode(r: &PinRecord) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

impl Store {
    /// Pins a cached image by digest, or a cached tag (and the digest it resolves to).
    /// Returns the digest pinned. An image that is not cached is an error: fetch it first.
    pub fn pin(
        &self,
        repo: &RepoName,
        target: &PinTarget,
        platforms: &[String],
    ) -> Result<Digest, StoreError> {
        let (digest, tag) = match target {
            PinTarget::Digest(d) => (d.clone(), None),
            PinTarget::Tag(t) => {
                let d = self
                    .resolve_tag(repo, t)?
                    .ok_or_else(|| StoreError::ManifestUnknown(format!("{repo}:{t}")))?;
                (d, Some(t.as_str().to_string()))
            }
        };
        self.write_pin(repo, &digest, tag.as_deref(), platforms)?;
        Ok(digest)
    }

    /// Pins exactly `digest` (with `tag` as its reason and a pin on the tag, if given), as an
    /// import or a prefetch brought it in: no re-resolution of the tag, which may already
    /// point elsewhere here.
    pub fn pin_exact(
        &self,
        repo: &RepoName,
        digest: &Digest,
        tag: Option<&Tag>,
    ) -> Result<(), StoreError> {
        self.write_pin(repo, digest, tag.map(Tag::as_str), &[])
    }

    /// Writes the pin of `digest` (for the reason `tag`, with a pin on the tag too, or by
    /// digest) in one synced batch. Under the manifest's stripe: an eviction removing it holds
    /// the same stripe and re-reads the pins there, so the pin either lands first and is seen,
    /// or finds the manifest gone and fails.
    fn write_pin(
        &self,
        repo: &RepoName,
        digest: &Digest,
        tag: Option<&str>,
        platforms: &[String],
    ) -> Result<(), StoreError> {
        let digest_str = digest.to_string();
        let manifest_key = key(&[repo.as_str(), &digest_str]);
        let _g = self.lock_stripe(&manifest_key);
        if !self
            .index
            .exists(super::index::CF_MANIFESTS, &manifest_key)?
        {
            return Err(StoreError::ManifestUnknown(format!("{repo}@{digest}")));
        }
        let record = PinRecord {
            pinned_at: unix_now(),
            platforms: platforms.to_vec(),
            via_tag: tag.map(str::to_string),
        };
        let reason = tag.map_or(BY_DIGEST.to_string(), via);
        let mut batch = self.index.batch();
        batch.put(
            CF_PINS,
            &digest_key(repo, &digest_str, &reason),
            &encode(&record),
        );
        if let Some(t) = tag {
            batch.put(CF_PINS, &tag_key(repo, t), &encode(&record));
        }
        self.index.write_synced(batch)?;
        self.recount_cache_soon();
        Ok(())
    }

    /// Removes a pin. Unpinning a tag also removes the digest pins it made (and only those).
    /// Returns how many pin records were removed.
    pub fn unpin(&self, repo: &RepoName, target: &PinTarget) -> Result<usize, StoreError> {
        let mut batch = self.index.batch();
        let mut removed = 0;
        match target {
            PinTarget::Digest(d) => {
                let k = digest_key(repo, &d.to_string(), BY_DIGEST);
                if self.index.exists(CF_PINS, &k)? {
                    batch.delete(CF_PINS, &k);
                    removed += 1;
                }
            }
            PinTarget::Tag(t) => {
                let k = tag_key(repo, t.as_str());
                if self.index.exists(CF_PINS, &k)? {
                    batch.delete(CF_PINS, &k);
                    removed += 1;
                }
                let reason = via(t.as_str());
                for p in self.pins_of(repo)? {
                    if let Some(d) = &p.digest
                        && p.record.via_tag.as_deref() == Some(t.as_str())
                    {
                        batch.delete(CF_PINS, &digest_key(repo, d, &reason));
                        removed += 1;
                    }
                }
            }
        }
        if removed > 0 {
            self.index.write_synced(batch)?;
            self.recount_cache_soon();
        }
        Ok(removed)
    }

    /// The pins of one repository.
    pub fn pins_of(&self, repo: &RepoName) -> Result<Vec<PinInfo>, StoreError> {
        self.scan_pins(&prefix(&[repo.as_str()]))
    }

    /// Every pin.
    pub fn pins(&self) -> Result<Vec<PinInfo>, StoreError> {
        self.scan_pins(b"")
    }

    /// Whether `tag` of `repo` is pinned.
    pub fn is_tag_pinned(&self, repo: &RepoName, tag: &Tag) -> Result<bool, StoreError> {
        Ok(self.index.exists(CF_PINS, &tag_key(repo, tag.as_str()))?)
    }

    /// Whether any pin names `digest` in `repo` (read from the index, for re-checks).
    pub(super) fn is_pinned(&self, repo: &str, digest: &str) -> Result<bool, StoreError> {
        Ok(self
            .index
            .any_with_prefix(CF_PINS, &prefix(&[repo, digest]))?)
    }

    fn scan_pins(&self, p: &[u8]) -> Result<Vec<PinInfo>, StoreError> {
        let mut out = Vec::new();
        self.index.scan(CF_PINS, p, None, |k, v| {
            let Ok(record) = serde_json::from_slice::<PinRecord>(v) else {
                return true;
            };
            let parts: Vec<&[u8]> = k.split(|b| *b == 0).collect();
            let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            match parts.as_slice() {
                [repo, [], tag] => out.push(PinInfo {
                    repository: s(repo),
                    digest: None,
                    tag: Some(s(tag)),
                    record,
                }),
                [repo, digest, _reason] => out.push(PinInfo {
                    repository: s(repo),
                    digest: Some(s(digest)),
                    tag: None,
                    record,
                }),
                _ => {}
            }
            true
        })?;
        Ok(out)
    }

    /// Adds to `batch` the digest pin a pinned tag gives the digest it now resolves to.
    pub(super) fn follow_tag_pin(
        &self,
        batch: &mut IndexBatch<'_>,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<(), StoreError> {
        let Some(raw) = self.index.get(CF_PINS, &tag_key(repo, tag.as_str()))? else {
            return Ok(());
        };
        let Ok(tag_pin) = serde_json::from_slice::<PinRecord>(&raw) else {
            return Ok(());
        };
        let record = PinRecord {
            pinned_at: unix_now(),
            platforms: tag_pin.platforms,
            via_tag: Some(tag.as_str().to_string()),
        };
        batch.put(
            CF_PINS,
            &digest_key(repo, &digest.to_string(), &via(tag.as_str())),
            &encode(&record),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(os: &str, arch: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(Into::into),
        }
    }

    #[test]
    fn platform_specs_match_os_arch_and_an_optional_variant() {
        let arm = platform("linux", "arm", Some("v7"));
        assert!(platform_matches("linux/arm", &arm));
        assert!(platform_matches("linux/arm/v7", &arm));
        assert!(!platform_matches("linux/arm/v6", &arm));
        assert!(!platform_matches("linux/amd64", &arm));
        let all = PinRecord {
            pinned_at: 0,
            platforms: vec![],
            via_tag: None,
        };
        assert!(all.keeps(None));
        let some = PinRecord {
            platforms: vec!["linux/amd64".into()],
            ..all
        };
        assert!(some.keeps(Some(&platform("linux", "amd64", None))));
        assert!(!some.keeps(Some(&arm)));
        assert!(!some.keeps(None));
    }
}
