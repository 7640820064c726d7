//! End to end with real clients: skopeo (OCI, Docker schema2, multi-arch `--all`), podman,
//! containerd's `ctr` against a private containerd daemon, and oras-py (artifacts and the
//! referrers API) push to and pull from the real server, and every test checks byte for byte
//! both what the client got back and what the registry holds, then that fsck is clean.
//!
//! Images are built by hand as OCI image layouts (real tar layers, gzip-wrapped, with correct
//! `diff_ids`), so no client ever needs a public registry; every client is configured to talk
//! to 127.0.0.1 only. A missing client is a loud SKIP locally and a failure when `CI` is set.

mod common;

use std::process::Command;

use common::images::*;
use common::*;
use serde_json::{Value, json};

/// Names this suite in the CI failure for a missing client (see `skip`).
const SUITE: &str = "client";
/// Clients go wherever their own settings send them; each is given 127.0.0.1 addresses only.
const EGRESS: Egress = Egress::Unrestricted;
/// What this suite's fixture images hold.
const LAYERS: LayerRecipe = LayerRecipe {
    app_bin: 1_300_000,
    data_bin: 70_001,
    readme: "e2e image",
};

/// True when every program is on PATH; otherwise reports a skip.
fn have(programs: &[&str]) -> bool {
    programs_installed(SUITE, programs)
}

/// The `docker://` reference of `repo:TAG` on the test server.
fn docker_ref(s: &TestServer, repo: &str) -> String {
    format!("docker://{}/{repo}:{TAG}", s.addr)
}

// ---------------------------------------------------------------------------------------------
// Assertions

fn assert_fsck_clean(s: &TestServer) {
    let report = s.app.store.fsck(false).expect("fsck runs");
    assert!(report.is_clean(), "fsck problems: {:#?}", report.problems);
    assert!(report.blobs_checked > 0 && report.manifests_checked > 0);
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn skopeo_round_trips_an_oci_image_byte_exact() {
    if !have(&["skopeo"]) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()], EGRESS);
    let layout = Layout::single(1, &OCI, &LAYERS);
    let src = layout.write(&sb.path("src"));
    let repo = "local/e2e/oci";
    let remote = docker_ref(&s, repo);

    sb.skopeo()
        .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(&remote)
        .run();
    assert_registry_holds(&h, repo, &layout);

    let raw = sb
        .skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&remote)
        .run();
    assert_bytes("skopeo inspect --raw", raw.as_bytes(), &layout.top.2);

    let out = sb.path("out");
    sb.skopeo()
        .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
        .arg(&remote)
        .arg(format!("oci:{}:{TAG}", out.display()))
        .run();
    assert_same_layout(&out, &layout);

    // Registry to registry: skopeo mounts (or re-uploads) the blobs into a second repository.
    let copy = "local/e2e/oci-copy";
    sb.skopeo()
        .args([
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(&remote)
        .arg(docker_ref(&s, copy))
        .run();
    assert_registry_holds(&h, copy, &layout);
    let tags: Value = serde_json::from_str(
        &sb.skopeo()
            .args(["list-tags", "--tls-verify=false"])
            .arg(format!("docker://{}/{copy}", s.addr))
            .run(),
    )
    .expect("skopeo list-tags JSON");
    assert_eq!(tags["Tags"], json!([TAG]));

    // skopeo delete removes the copy's manifest (by digest) and nothing of the original.
    sb.skopeo()
        .args(["delete", "--tls-verify=false"])
        .arg(docker_ref(&s, copy))
        .run();
    for reference in [TAG, layout.top.1.as_str()] {
        let r = h.get(&format!("/v2/{copy}/manifests/{reference}"));
        assert_eq!(r.status, 404, "{copy}:{reference} after delete");
        assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    }
    assert_tags(&h, copy, &[]);
    assert_registry_holds(&h, repo, &layout);
    assert_fsck_clean(&s);
}

#[test]
fn skopeo_pushes_docker_schema2_and_pulls_it_back() {
    if !have(&["skopeo"]) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()], EGRESS);
    let layout = Layout::single(2, &OCI, &LAYERS);
    let image = &layout.images[0];
    let src = layout.write(&sb.path("src"));
    let repo = "local/e2e/schema2";
    let remote = docker_ref(&s, repo);

    sb.skopeo()
        .args(["copy", "--format", "v2s2", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(&remote)
        .run();

    // skopeo converted the manifest; config and layers are the same bytes.
    let r = h.get(&format!("/v2/{repo}/manifests/{TAG}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(sha256(&r.body).as_str())
    );
    let manifest = r.body.to_vec();
    let m = r.json();
    assert_eq!(m["mediaType"], DOCKER_MANIFEST);
    assert_eq!(m["config"]["mediaType"], DOCKER_CONFIG);
    assert_eq!(m["config"]["digest"], image.config_digest.as_str());
    let layers: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], DOCKER_LAYER_GZIP);
            l["digest"].as_str().unwrap()
        })
        .collect();
    assert_eq!(layers, image.layer_digests);
    for (digest, bytes) in &layout.blobs {
        assert_blob(&h, repo, digest, bytes);
    }
    let head = h.head(&format!("/v2/{repo}/manifests/{}", sha256(&manifest)));
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(
        head.header("content-length"),
        Some(manifest.len().to_string().as_str())
    );

    let raw = sb
        .skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&remote)
        .run();
    assert_bytes("skopeo inspect --raw", raw.as_bytes(), &manifest);

    // Pull into a dir: layout, which keeps the manifest and every blob as served.
    let out = sb.path("out");
    sb.skopeo()
        .args(["copy", "--src-tls-verify=false"])
        .arg(&remote)
        .arg(format!("dir:{}", out.display()))
        .run();
    assert_bytes(
        "pulled manifest.json",
        &std::fs::read(out.join("manifest.json")).unwrap(),
        &manifest,
    );
    for (digest, bytes) in &layout.blobs {
        let file = out.join(digest.trim_start_matches("sha256:"));
        assert_bytes(
            &format!("pulled {digest}"),
            &std::fs::read(file).unwrap(),
            bytes,
        );
    }
    assert_fsck_clean(&s);
}

#[test]
fn skopeo_all_round_trips_a_multi_arch_index() {
    if !have(&["skopeo"]) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()], EGRESS);
    let layout = Layout::multi_arch(3, &OCI, &LAYERS);
    let src = layout.write(&sb.path("src"));
    let repo = "local/e2e/multi";
    let remote = docker_ref(&s, repo);

    sb.skopeo()
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(&remote)
        .run();
    assert_registry_holds(&h, repo, &layout);

    // A client that accepts only Docker schema2 gets no OCI index (and no substitute).
    let r = h.send(
        "GET",
        &format!("/v2/{repo}/manifests/{TAG}"),
        &[("accept", DOCKER_MANIFEST)],
        Vec::new(),
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");

    let raw = sb
        .skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(&remote)
        .run();
    assert_bytes("skopeo inspect --raw", raw.as_bytes(), &layout.top.2);

    let out = sb.path("out");
    sb.skopeo()
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--src-tls-verify=false",
        ])
        .arg(&remote)
        .arg(format!("oci:{}:{TAG}", out.display()))
        .run();
    assert_same_layout(&out, &layout);
    assert_fsck_clean(&s);
}

#[test]
fn podman_pushes_and_pulls_an_image() {
    if !have(&["podman"]) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let sb = Sandbox::insecure(&[s.addr.to_string()], EGRESS);
    let layout = Layout::single(4, &OCI, &LAYERS);
    let image = &layout.images[0];
    let archive = sb.path("image.tar");
    std::fs::write(&archive, layout.archive()).unwrap();
    let repo = "local/e2e/podman";
    let name = format!("{}/{repo}:{TAG}", s.addr);

    // Into podman's (private, vfs) storage from an OCI archive; its ID is the config digest.
    sb.podman().args(["load", "--input"]).arg(&archive).run();
    let id = sb.podman().args(["images", "--quiet", "--no-trunc"]).run();
    assert_eq!(id.trim(), image.config_digest);
    sb.podman().args(["tag", id.trim(), &name]).run();

    let digestfile = sb.path("pushed.digest");
    sb.podman()
        .args(["push", "--tls-verify=false", "--digestfile"])
        .arg(&digestfile)
        .arg(&name)
        .run();
    let pushed = std::fs::read_to_string(&digestfile).unwrap();

    // What the registry holds: the manifest podman reported, over our config and layers.
    let r = h.send(
        "GET",
        &format!("/v2/{repo}/manifests/{TAG}"),
        &[("accept", ACCEPT_ALL)],
        Vec::new(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("docker-content-digest"), Some(pushed.trim()));
    assert_eq!(sha256(&r.body), pushed.trim());
    let m = r.json();
    assert_eq!(m["config"]["digest"], image.config_digest.as_str());
    assert_blob(
        &h,
        repo,
        &image.config_digest,
        &layout.blobs[&image.config_digest],
    );
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), image.layer_tars.len());
    for l in layers {
        let digest = l["digest"].as_str().unwrap();
        let blob = h.get(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(blob.status, 200, "layer {digest}");
        assert_eq!(sha256(&blob.body), digest);
        assert_eq!(blob.body.len() as u64, l["size"].as_u64().unwrap());
        if let Some(original) = layout.blobs.get(digest) {
            assert_bytes(&format!("layer {digest}"), &blob.body, original);
        }
    }

    // Forget the image, then pull it from the registry.
    sb.podman().args(["rmi", "--all", "--force"]).run();
    assert_eq!(sb.podman().args(["images", "--quiet"]).run().trim(), "");
    sb.podman()
        .args(["pull", "--tls-verify=false", "--quiet"])
        .arg(&name)
        .run();
    let inspect: Value =
        serde_json::from_str(&sb.podman().args(["image", "inspect"]).arg(&name).run())
            .expect("podman image inspect JSON");
    let inspect = &inspect[0];
    assert_eq!(inspect["Digest"], pushed.trim());
    assert_eq!(
        format!("sha256:{}", inspect["Id"].as_str().unwrap()),
        image.config_digest
    );
    let diff_ids: Vec<String> = image.layer_tars.iter().map(|t| sha256(t)).collect();
    assert_eq!(inspect["RootFS"]["Layers"], json!(diff_ids));

    // The layers as podman stored them are our tars, byte for byte.
    let saved = sb.path("saved");
    sb.podman()
        .args(["save", "--format", "oci-dir", "--uncompressed", "--output"])
        .arg(&saved)
        .arg(&name)
        .run();
    let blobs = oci_dir_blobs(&saved);
    for (digest, tar) in diff_ids.iter().zip(&image.layer_tars) {
        let got = blobs
            .get(digest)
            .unwrap_or_else(|| panic!("podman save has no layer {digest}"));
        assert_bytes(&format!("saved layer {digest}"), got, tar);
    }
    assert_bytes(
        "saved config",
        &blobs[&image.config_digest],
        &layout.blobs[&image.config_digest],
    );
    assert_fsck_clean(&s);
}

#[test]
fn containerd_ctr_pushes_and_pulls_an_image() {
    if !containerd_usable(SUITE) {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let layout = Layout::single(5, &OCI, &LAYERS);
    let image = &layout.images[0];
    let daemon = Containerd::start(EGRESS);
    let archive = daemon.dir.path().join("image.tar");
    std::fs::write(&archive, layout.archive()).unwrap();
    let repo = "local/e2e/ctr";
    let remote = format!("{}/{repo}:{TAG}", s.addr);

    daemon.import(&archive);
    daemon
        .ctr()
        .args([
            "images",
            "push",
            "--plain-http",
            &remote,
            &format!("e2e/src:{TAG}"),
        ])
        .run();
    assert_registry_holds(&h, repo, &layout);

    // Remove the image and garbage-collect its content, so the pull has to fetch everything.
    daemon
        .ctr()
        .args(["images", "rm", "--sync", &format!("e2e/src:{TAG}")])
        .run();
    assert_eq!(
        daemon.ctr().args(["content", "ls", "--quiet"]).run().trim(),
        ""
    );

    daemon
        .ctr()
        .args([
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "native",
            &remote,
        ])
        .run();
    let listed = daemon.ctr().args(["images", "ls"]).run();
    let row = listed
        .lines()
        .find(|l| l.starts_with(&remote))
        .unwrap_or_else(|| panic!("{remote} not in\n{listed}"));
    assert!(row.contains(&image.digest), "{row}");
    let mut content: Vec<String> = daemon
        .ctr()
        .args(["content", "ls", "--quiet"])
        .run()
        .lines()
        .map(str::to_string)
        .collect();
    content.sort();
    assert_eq!(content, layout.all().into_keys().collect::<Vec<_>>());
    for (digest, bytes) in layout.all() {
        let got = daemon.ctr().args(["content", "get", &digest]).run_bytes();
        assert_bytes(&format!("pulled {digest}"), &got, &bytes);
    }
    drop(daemon);
    assert_fsck_clean(&s);
}

/// oras-py: push an artifact (chunked upload), push a second one whose `subject` is the
/// first, and pull the first back. Prints one JSON line with what it did.
const ORAS_SCRIPT: &str = r#"
import json, sys
import oras.client, oras.oci

host = sys.argv[1]
target = host + "/local/e2e/art"
client = oras.client.OrasClient(hostname=host, insecure=True)

r = client.push(target=target + ":v1", files=["payload.bin:application/vnd.e2e.payload"],
                do_chunked=True, chunk_size=65536, quiet=True)
subject_digest = r.headers["Docker-Content-Digest"]
raw = client.session.get("http://%s/v2/local/e2e/art/manifests/%s" % (host, subject_digest),
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
raw.raise_for_status()
subject = oras.oci.Subject(mediaType=raw.headers["Content-Type"], digest=subject_digest,
                           size=len(raw.content))
r = client.push(target=target + ":sig", files=["signature.json:application/vnd.e2e.sig.payload"],
                manifest_config="sig-config.json:application/vnd.e2e.signature.v1+json",
                manifest_annotations={"e2e.role": "signature"}, subject=subject, quiet=True)
referrer_digest = r.headers["Docker-Content-Digest"]
pulled = client.pull(target=target + ":v1", outdir="pulled")
print(json.dumps({"subject": subject_digest, "referrer": referrer_digest, "pulled": pulled}))
"#;

#[test]
fn oras_py_pushes_an_artifact_and_a_referrer() {
    if !have(&["python3"]) {
        return;
    }
    let probe = Command::new("python3")
        .args(["-c", "import oras.client"])
        .output()
        .expect("python3");
    if !probe.status.success()
        && !skip(
            SUITE,
            "python module oras (oras-py) not installed (scripts/test installs it)",
        )
    {
        return;
    }
    let s = TestServer::start();
    let h = Http::for_server(&s);
    let work = tempfile::tempdir().unwrap();
    let payload = random_bytes(300_001, 6);
    let signature = br#"{"signed":"local/e2e/art:v1"}"#;
    let sig_config = br#"{"kind":"e2e-signature"}"#;
    std::fs::write(work.path().join("payload.bin"), &payload).unwrap();
    std::fs::write(work.path().join("signature.json"), signature).unwrap();
    std::fs::write(work.path().join("sig-config.json"), sig_config).unwrap();
    std::fs::write(work.path().join("e2e_oras.py"), ORAS_SCRIPT).unwrap();
    let repo = "local/e2e/art";

    let out = Tool::new("python3", EGRESS)
        .arg("e2e_oras.py")
        .arg(s.addr.to_string())
        .dir(work.path())
        .run();
    let result: Value = serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("oras script output ({e}): {out}"));
    let subject = result["subject"].as_str().unwrap();
    let referrer = result["referrer"].as_str().unwrap();

    // What oras-py pulled back is the file it pushed.
    let pulled = result["pulled"].as_array().unwrap();
    assert_eq!(pulled.len(), 1, "{result}");
    let pulled = work.path().join(pulled[0].as_str().unwrap());
    assert_bytes("oras pull", &std::fs::read(pulled).unwrap(), &payload);

    // What the registry holds: both manifests, the payload, the signature and its config.
    let m = h.get(&format!("/v2/{repo}/manifests/{TAG}"));
    assert_eq!(m.status, 200);
    assert_eq!(sha256(&m.body), subject);
    let layer = &m.json()["layers"][0];
    assert_eq!(layer["mediaType"], "application/vnd.e2e.payload");
    assert_eq!(
        layer["annotations"]["org.opencontainers.image.title"],
        "payload.bin"
    );
    assert_blob(&h, repo, &sha256(&payload), &payload);
    let r = h.get(&format!("/v2/{repo}/manifests/sig"));
    assert_eq!(r.status, 200);
    assert_eq!(sha256(&r.body), referrer);
    let sig = r.json();
    assert_eq!(sig["subject"]["digest"], subject);
    assert_eq!(sig["subject"]["size"], m.body.len());
    assert_blob(&h, repo, &sha256(signature), signature);
    assert_blob(&h, repo, &sha256(sig_config), sig_config);
    assert_tags(&h, repo, &["sig", TAG]);

    // The referrers API lists the signature, typed by its config's media type.
    assert_eq!(sig["annotations"], json!({"e2e.role": "signature"}));
    let expected = json!({
        "mediaType": OCI_MANIFEST,
        "digest": referrer,
        "size": r.body.len(),
        "artifactType": "application/vnd.e2e.signature.v1+json",
        "annotations": {"e2e.role": "signature"},
    });
    let refs = h.get(&format!("/v2/{repo}/referrers/{subject}"));
    assert_eq!(refs.status, 200);
    assert_eq!(refs.header("content-type"), Some(OCI_INDEX));
    let index = refs.json();
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(index["manifests"], json!([expected]), "{index}");
    let filtered = h.get(&format!(
        "/v2/{repo}/referrers/{subject}?artifactType=application/vnd.e2e.signature.v1%2Bjson"
    ));
    assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(filtered.json()["manifests"], json!([expected]));
    let other = h.get(&format!(
        "/v2/{repo}/referrers/{subject}?artifactType=application/vnd.e2e.other"
    ));
    assert_eq!(other.json()["manifests"], json!([]));
    // Nothing refers to the signature.
    let none = h.get(&format!("/v2/{repo}/referrers/{referrer}"));
    assert_eq!(none.json()["manifests"], json!([]));
    assert_fsck_clean(&s);
}
