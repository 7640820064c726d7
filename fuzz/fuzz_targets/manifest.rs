//! Manifests as pushed: any bytes with any of the content types clients send. Never panic;
//! what parses has a manifest media type and answers every query.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transship::oci::Digest;
use transship::oci::manifest::ParsedManifest;
use transship::oci::media;

const TYPES: &[&str] = &[
    "",
    media::OCI_MANIFEST,
    media::OCI_INDEX,
    media::DOCKER_MANIFEST_V2,
    media::DOCKER_MANIFEST_LIST,
    media::DOCKER_SCHEMA1_SIGNED,
    "application/json",
    "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let content_type = TYPES[selector as usize % TYPES.len()];
    let Ok(m) = ParsedManifest::parse(bytes, content_type) else {
        return;
    };
    assert!(media::is_manifest_type(&m.media_type), "{}", m.media_type);
    let _ = m.is_index();
    let _ = m.referenced_blobs().count();
    let _ = m.child_manifests().len();
    let _ = m.platform_child("linux", "amd64");
    let _ = m.effective_artifact_type();
    let _ = m.referrer_descriptor(&Digest::sha256_of(bytes), bytes.len() as u64);
});
