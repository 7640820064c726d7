//! The referrers API: an image index of the manifests whose `subject` is the given digest,
//! optionally filtered by `artifactType`. Never 404 for a well-formed digest: no referrers
//! is an empty index.

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, HeaderValue, StatusCode, header};

use super::response::{Resp, json};
use super::{parse_digest, query_one};
use crate::App;
use crate::oci::media::OCI_INDEX;
use crate::oci::{RegistryError, RepoName};

pub async fn list(
    app: &Arc<App>,
    repo: &RepoName,
    digest: &str,
    parts: &Parts,
) -> Result<Resp, RegistryError> {
    let subject = parse_digest(digest)?;
    let filter = query_one(parts, "artifactType");
    let manifests = app
        .storage
        .referrers(repo, &subject, filter.as_deref())
        .await?;
    let body =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
            .to_string();
    let mut r = json(StatusCode::OK, body);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    if filter.is_some() {
        r.headers_mut().insert(
            HeaderName::from_static("oci-filters-applied"),
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(r)
}
