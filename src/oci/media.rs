//! Manifest media types and `Accept` negotiation. Clients send several
//! `Accept` lines (moby, podman) or one comma list with `*/*` (containerd); both are merged here.

pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCTET_STREAM: &str = "application/octet-stream";

/// The four manifest types a mirror asks upstream for, in one `Accept` value.
pub const ALL_MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Whether the media type is one transship stores as a manifest.
pub fn is_manifest_type(mt: &str) -> bool {
    matches!(
        mt,
        DOCKER_MANIFEST_V2 | DOCKER_MANIFEST_LIST | OCI_MANIFEST | OCI_INDEX
    )
}

pub fn is_index_type(mt: &str) -> bool {
    matches!(mt, DOCKER_MANIFEST_LIST | OCI_INDEX)
}

/// Strips parameters and whitespace and lowercases: `Application/JSON; charset=utf-8` → `application/json`.
pub fn essence(mt: &str) -> String {
    mt.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// The media ranges a client accepts, merged from every `Accept` header line.
#[derive(Debug, Default, Clone)]
pub struct AcceptList {
    ranges: Vec<String>,
}

impl AcceptList {
    /// Builds the list from all `Accept` header values (each may be a comma list).
    pub fn from_headers<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let ranges = values
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(essence)
            .filter(|r| !r.is_empty())
            .collect();
        Self { ranges }
    }

    /// No `Accept` at all: anything goes.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn accepts(&self, media_type: &str) -> bool {
        if self.ranges.is_empty() {
            return true;
        }
        let mt = essence(media_type);
        let major = mt.split('/').next().unwrap_or("");
        self.ranges
            .iter()
            .any(|r| r == "*/*" || *r == mt || r.strip_suffix("/*").is_some_and(|m| m == major))
    }
}

/// What to do with a stored manifest given the client's `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// Serve the stored bytes with their exact media type.
    Serve,
    /// A tag pointing at a Docker manifest list, asked for by a client that cannot read lists:
    /// serve the linux/amd64 child instead.
    PlatformChild,
    /// 404 MANIFEST_UNKNOWN: the client cannot read an OCI manifest/index.
    NotAcceptable,
}

pub fn negotiate(accept: &AcceptList, stored_type: &str, by_tag: bool) -> Negotiated {
    if accept.accepts(stored_type) {
        return Negotiated::Serve;
    }
    match stored_type {
        OCI_MANIFEST | OCI_INDEX => Negotiated::NotAcceptable,
        DOCKER_MANIFEST_LIST if by_tag => Negotiated::PlatformChild,
        _ => Negotiated::Serve,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_lines_and_lists_and_ignores_params() {
        let a = AcceptList::from_headers([
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.oci.image.index.v1+json; q=0.5, application/vnd.oci.image.manifest.v1+json",
        ]);
        assert!(a.accepts(OCI_MANIFEST));
        assert!(a.accepts(OCI_INDEX));
        assert!(a.accepts(DOCKER_MANIFEST_V2));
        assert!(!a.accepts(DOCKER_MANIFEST_LIST));
    }

    #[test]
    fn wildcards_and_absence() {
        assert!(AcceptList::from_headers([]).accepts(OCI_INDEX));
        assert!(AcceptList::from_headers(["*/*"]).accepts(OCI_INDEX));
        assert!(AcceptList::from_headers(["application/*"]).accepts(OCI_INDEX));
        assert!(!AcceptList::from_headers(["text/*"]).accepts(OCI_INDEX));
        assert!(AcceptList::from_headers([" , "]).is_empty());
    }

    #[test]
    fn negotiation_follows_distribution() {
        let docker_only = AcceptList::from_headers([DOCKER_MANIFEST_V2]);
        assert_eq!(
            negotiate(&docker_only, OCI_MANIFEST, true),
            Negotiated::NotAcceptable
        );
        assert_eq!(
            negotiate(&docker_only, OCI_INDEX, false),
            Negotiated::NotAcceptable
        );
        assert_eq!(
            negotiate(&docker_only, DOCKER_MANIFEST_LIST, true),
            Negotiated::PlatformChild
        );
        assert_eq!(
            negotiate(&docker_only, DOCKER_MANIFEST_LIST, false),
            Negotiated::Serve
        );
        assert_eq!(
            negotiate(&docker_only, DOCKER_MANIFEST_V2, true),
            Negotiated::Serve
        );
        let oci_only = AcceptList::from_headers([OCI_MANIFEST]);
        assert_eq!(
            negotiate(&oci_only, DOCKER_MANIFEST_V2, true),
            Negotiated::Serve
        );
    }

    #[test]
    fn essence_normalises() {
        assert_eq!(
            essence(" Application/JSON ; charset=utf-8"),
            "application/json"
        );
    }
}
