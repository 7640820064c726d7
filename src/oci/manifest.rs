//! Manifest parsing for validation and indexing: what a manifest references (config, layers,
//! child manifests), its `subject`, and the descriptor the referrers API lists for it. The
//! stored bytes are never re-serialised; this module only reads them.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::digest::Digest;
use super::media;

/// An OCI content descriptor (the fields transship reads).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub annotations: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// Whether `spec` names this platform: `os/arch` matches any variant, `os/arch/variant`
    /// only that one.
    pub fn matches(&self, spec: &str) -> bool {
        let mut parts = spec.split('/');
        let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
        os == Some(self.os.as_str())
            && arch == Some(self.architecture.as_str())
            && variant.is_none_or(|v| self.variant.as_deref() == Some(v))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<Map<String, Value>>,
}

/// A manifest that passed validation.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    /// The effective media type (body field, else the request's Content-Type).
    pub media_type: String,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub artifact_type: Option<String>,
    pub annotations: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("schema1 manifests are not supported; push a Docker schema2 or OCI manifest")]
    Schema1,
    #[error("unsupported manifest schemaVersion {0}; expected 2")]
    SchemaVersion(i64),
    #[error("manifest mediaType {body:?} does not match Content-Type {header:?}")]
    MediaTypeMismatch { body: String, header: String },
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedType(String),
    #[error("{0} manifest is missing its {1:?} field")]
    Missing(&'static str, &'static str),
}

impl ParsedManifest {
    /// Parses `bytes` pushed with `content_type` (may be empty or generic).
    pub fn parse(bytes: &[u8], content_type: &str) -> Result<Self, ManifestError> {
        let header = media::essence(content_type);
        if header == media::DOCKER_SCHEMA1 || header == media::DOCKER_SCHEMA1_SIGNED {
            return Err(ManifestError::Schema1);
        }
        let raw: RawManifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        match raw.schema_version {
            Some(2) => {}
            Some(1) => return Err(ManifestError::Schema1),
            Some(v) => return Err(ManifestError::SchemaVersion(v)),
            None => return Err(ManifestError::Missing("a", "schemaVersion")),
        }
        let header_is_manifest = media::is_manifest_type(&header);
        let media_type = match (&raw.media_type, header_is_manifest) {
            (Some(body), true) if *body != header => {
                return Err(ManifestError::MediaTypeMismatch {
                    body: body.clone(),
                    header,
                });
            }
            (Some(body), _) => body.clone(),
            (None, true) => header,
            // No type anywhere: an OCI manifest or index may omit mediaType (image-spec).
            (None, false) if raw.manifests.is_some() => media::OCI_INDEX.to_string(),
            (None, false) if raw.config.is_some() => media::OCI_MANIFEST.to_string(),
            (None, false) => return Err(ManifestError::UnsupportedType(header)),
        };
        if !media::is_manifest_type(&media_type) {
            return Err(ManifestError::UnsupportedType(media_type));
        }
        let parsed = Self {
            config: raw.config,
            layers: raw.layers.unwrap_or_default(),
            manifests: raw.manifests.unwrap_or_default(),
            subject: raw.subject,
            artifact_type: raw.artifact_type,
            annotations: raw.annotations,
            media_type,
        };
        if media::is_index_type(&parsed.media_type) {
            if parsed.manifests.is_empty() && !bytes_have_key(bytes, "manifests") {
                return Err(ManifestError::Missing("an index", "manifests"));
            }
        } else if parsed.config.is_none() {
            return Err(ManifestError::Missing("an image", "config"));
        }
        Ok(parsed)
    }

    pub fn is_index(&self) -> bool {
        media::is_index_type(&self.media_type)
    }

    /// Blobs this manifest needs in the repository: config and layers, except layers that live
    /// elsewhere (`urls`, i.e. non-distributable).
    pub fn referenced_blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(
            self.layers
                .iter()
                .filter(|l| l.urls.as_ref().is_none_or(|u| u.is_empty())),
        )
    }

    /// Child manifests of an index.
    pub fn child_manifests(&self) -> &[Descriptor] {
        &self.manifests
    }

    /// The child for `os/arch` of an index, if any.
    pub fn platform_child(&self, os: &str, arch: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == arch)
        })
    }

    /// `artifactType` as the referrers API reports it: the manifest's own, else the config
    /// media type of an image manifest.
    pub fn effective_artifact_type(&self) -> Option<&str> {
        self.artifact_type.as_deref().or_else(|| {
            if self.is_index() {
                None
            } else {
                self.config.as_ref().map(|c| c.media_type.as_str())
            }
        })
    }

    /// The descriptor of this manifest as listed in a referrers index.
    pub fn referrer_descriptor(&self, digest: &Digest, size: u64) -> Value {
        let mut d = Map::new();
        d.insert("mediaType".into(), Value::String(self.media_type.clone()));
        d.insert("digest".into(), Value::String(digest.to_string()));
        d.insert("size".into(), Value::from(size));
        if let Some(at) = self.effective_artifact_type() {
            d.insert("artifactType".into(), Value::String(at.to_string()));
        }
        if let Some(a) = &self.annotations {
            d.insert("annotations".into(), Value::Object(a.clone()));
        }
        Value::Object(d)
    }
}

fn bytes_have_key(bytes: &[u8], key: &str) -> bool {
    serde_json::from_slice::<Map<String, Value>>(bytes).is_ok_and(|m| m.contains_key(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: char) -> String {
        format!("sha256:{}", n.to_string().repeat(64))
    }

    fn image(mt: Option<&str>) -> String {
        let mt = mt
            .map(|m| format!(r#""mediaType":"{m}","#))
            .unwrap_or_default();
        format!(
            r#"{{"schemaVersion":2,{mt}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":10}},{{"mediaType":"x","digest":"{}","size":1,"urls":["https://example.com/l"]}}],"subject":{{"mediaType":"{}","digest":"{}","size":5}},"annotations":{{"k":"v"}}}}"#,
            d('a'),
            d('b'),
            d('c'),
            media::OCI_MANIFEST,
            d('e')
        )
    }

    #[test]
    fn parses_image_with_subject() {
        let m = ParsedManifest::parse(
            image(Some(media::OCI_MANIFEST)).as_bytes(),
            media::OCI_MANIFEST,
        )
        .unwrap();
        assert_eq!(m.media_type, media::OCI_MANIFEST);
        let blobs: Vec<String> = m.referenced_blobs().map(|x| x.digest.to_string()).collect();
        assert_eq!(
            blobs,
            vec![d('a'), d('b')],
            "foreign layer with urls is not required"
        );
        assert_eq!(m.subject.as_ref().unwrap().digest.to_string(), d('e'));
        assert_eq!(
            m.effective_artifact_type(),
            Some("application/vnd.oci.image.config.v1+json")
        );
        let desc = m.referrer_descriptor(
            &"sha256:0000000000000000000000000000000000000000000000000000000000000000"
                .parse()
                .unwrap(),
            99,
        );
        assert_eq!(desc["annotations"]["k"], "v");
        assert_eq!(desc["size"], 99);
    }

    #[test]
    fn media_type_from_header_or_shape() {
        let m = ParsedManifest::parse(image(None).as_bytes(), media::OCI_MANIFEST).unwrap();
        assert_eq!(m.media_type, media::OCI_MANIFEST);
        let m = ParsedManifest::parse(image(None).as_bytes(), "application/json").unwrap();
        assert_eq!(m.media_type, media::OCI_MANIFEST);
        let idx = r#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(
            ParsedManifest::parse(idx.as_bytes(), "")
                .unwrap()
                .media_type,
            media::OCI_INDEX
        );
    }

    #[test]
    fn rejects_bad_manifests() {
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), media::OCI_MANIFEST),
            ("[]".into(), media::OCI_MANIFEST),
            (r#"{"schemaVersion":1}"#.into(), media::OCI_MANIFEST),
            (
                r#"{"schemaVersion":3,"config":{}}"#.into(),
                media::OCI_MANIFEST,
            ),
            (image(Some(media::OCI_MANIFEST)), media::DOCKER_MANIFEST_V2),
            (image(Some("application/x-foo")), "application/json"),
            (
                r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#
                    .into(),
                media::OCI_MANIFEST,
            ),
            (
                r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:xyz","size":1}}"#
                    .into(),
                media::OCI_MANIFEST,
            ),
            (
                r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:aa","size":-1}}"#
                    .into(),
                media::OCI_MANIFEST,
            ),
            ("{}".into(), media::DOCKER_SCHEMA1_SIGNED),
        ];
        for (body, ct) in cases {
            assert!(
                ParsedManifest::parse(body.as_bytes(), ct).is_err(),
                "{body} as {ct} must be rejected"
            );
        }
    }

    #[test]
    fn index_platform_child() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},{{"mediaType":"{}","digest":"{}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            media::DOCKER_MANIFEST_LIST,
            media::DOCKER_MANIFEST_V2,
            d('1'),
            media::DOCKER_MANIFEST_V2,
            d('2')
        );
        let m = ParsedManifest::parse(idx.as_bytes(), media::DOCKER_MANIFEST_LIST).unwrap();
        assert!(m.is_index());
        assert_eq!(
            m.platform_child("linux", "amd64")
                .unwrap()
                .digest
                .to_string(),
            d('2')
        );
        assert!(m.platform_child("windows", "amd64").is_none());
        assert_eq!(m.effective_artifact_type(), None);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,300}") {
            let _ = ParsedManifest::parse(s.as_bytes(), media::OCI_MANIFEST);
        }
    }
}
