//! The cluster profile end to end: three transship processes (127.0.0.2, .3, .4) on one
//! SeaweedFS bucket and one PostgreSQL database (`common::replicas`). A push on one replica is
//! pulled byte-exact from the others by skopeo and containerd's `ctr`; a chunked upload moves
//! between replicas request by request and outlives the replica that started it (SIGKILL);
//! concurrent tag pushes on two replicas end with one winner all agree on; a replica whose
//! read cache is wiped (or that is killed and restarted) still serves everything; empty and
//! sha512 blobs and referrers read the same everywhere; a token from one replica works on the
//! others. Every test also looks underneath: the objects in the bucket and the rows in
//! PostgreSQL.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::images::*;
use common::replicas::{Replicas, blob_key};
use common::*;
use serde_json::{Value, json};
use transship::auth::basic_header;
use transship::auth::keys::hash_password;

/// Names this suite in the CI failure for a missing client or engine (see `skip`).
const SUITE: &str = "cluster replica";
/// Clients are given 127.0.0.x addresses only.
const EGRESS: Egress = Egress::Unrestricted;
/// What this suite's fixture images hold (a layer of over a megabyte, one small).
const LAYERS: LayerRecipe = LayerRecipe {
    app_bin: 1_500_000,
    data_bin: 90_001,
    readme: "cluster replica image",
};
const PASSWORD: &str = "replicas share one signing key";

/// `path?query` of a `Location` header, whether absolute or not, to send to any replica.
fn location_path(location: &str) -> String {
    match location.split_once("://") {
        Some((_, rest)) => rest
            .find('/')
            .map_or("/".to_string(), |at| rest[at..].to_string()),
        None => location.to_string(),
    }
}

/// Asserts `resp` has `status`, showing its body otherwise.
#[track_caller]
fn expect_status(resp: &Resp, status: u16, what: &str) {
    assert_eq!(
        resp.status,
        status,
        "{what}: {:?}",
        String::from_utf8_lossy(&resp.body)
    );
}

/// Starts an upload session on `h` (`query` is "" or `?digest-algorithm=…`); returns its
/// location (path and query) and id.
fn start_session(h: &Http, repo: &str, query: &str) -> (String, String) {
    let resp = h.send(
        "POST",
        &format!("/v2/{repo}/blobs/uploads/{query}"),
        &[],
        Bytes::new(),
    );
    expect_status(&resp, 202, "POST");
    let location = location_path(resp.header("location").expect("Location"));
    let id = resp
        .header("docker-upload-uuid")
        .expect("Docker-Upload-UUID");
    (location, id.to_string())
}

// ---------------------------------------------------------------------------------------------
// What the user sees

/// Replica `h` holds the whole layout under `repo:TAG` (see `assert_registry_holds`), and
/// answers HEAD and a Range on each blob.
fn assert_serves(h: &Http, repo: &str, layout: &Layout) {
    assert_registry_holds(h, repo, layout);
    for (digest, bytes) in &layout.blobs {
        let path = format!("/v2/{repo}/blobs/{digest}");
        let r = h.head(&path);
        assert_eq!(r.status, 200, "HEAD {repo} blob {digest}");
        assert_eq!(
            r.header("content-length"),
            Some(bytes.len().to_string().as_str())
        );
        let r = h.send("GET", &path, &[("range", "bytes=3-9")], Bytes::new());
        assert_eq!(r.status, 206, "ranged GET {repo} blob {digest}");
        assert_bytes(&format!("{digest} bytes 3-9"), &r.body, &bytes[3..10]);
    }
}

// ---------------------------------------------------------------------------------------------
// What happened underneath

/// Every blob is an object of its size under the bucket's `blobs/`, and a `blobs` row of its
/// size; every manifest is a row holding its bytes; `repo:TAG` names the top manifest; no
/// upload is left open in the bucket or the database.
fn assert_stored(r: &Replicas, repo: &str, layout: &Layout) {
    let objects = r.objects("blobs");
    let rows: BTreeMap<String, String> = r
        .sql("SELECT digest, size FROM blobs")
        .into_iter()
        .map(|row| (row[0].clone(), row[1].clone()))
        .collect();
    for (digest, bytes) in &layout.blobs {
        assert_eq!(
            objects.get(&blob_key(digest)),
            Some(&(bytes.len() as u64)),
            "object of {digest} in {objects:?}"
        );
        assert_eq!(
            rows.get(digest),
            Some(&bytes.len().to_string()),
            "blobs row of {digest}"
        );
    }
    for (digest, bytes) in &layout.manifests {
        let stored = r.sql(&format!(
            "SELECT encode(body, 'hex') FROM manifests WHERE digest = '{digest}'"
        ));
        assert_eq!(stored.len(), 1, "manifests row of {digest}");
        assert_bytes(
            &format!("stored manifest {digest}"),
            &hex_decode(&stored[0][0]),
            bytes,
        );
    }
    assert_eq!(tag_digest(r, repo, TAG), Some(layout.top.1.clone()));
    assert_no_upload_left(r);
}

/// No upload session in the database, no multipart upload or assembly object in the bucket.
fn assert_no_upload_left(r: &Replicas) {
    assert_eq!(
        r.sql("SELECT id FROM upload_sessions"),
        Vec::<Vec<String>>::new()
    );
    assert_eq!(r.multipart_uploads(), Vec::<String>::new());
    assert_eq!(r.objects("uploads"), BTreeMap::new());
}

/// The digest the `tags` table gives `repo:tag`.
fn tag_digest(r: &Replicas, repo: &str, tag: &str) -> Option<String> {
    r.sql(&format!(
        "SELECT t.digest FROM tags t JOIN repositories r ON r.id = t.repo_id \
         WHERE r.name = '{repo}' AND t.tag = '{tag}'"
    ))
    .pop()
    .map(|row| row[0].clone())
}

fn hex_decode(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex from psql"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn an_image_pushed_on_a_is_pulled_byte_exact_from_b_and_c_with_skopeo_and_ctr() {
    if !Replicas::available()
        || !programs_installed(SUITE, &["skopeo"])
        || !containerd_usable(SUITE)
    {
        return;
    }
    let r = Replicas::start(3);
    let layout = Layout::multi_arch(21, &OCI, &LAYERS);
    let repo = "local/replicas/app";
    let addrs: Vec<String> = (0..3).map(|i| r.addr(i).to_string()).collect();
    let sb = Sandbox::insecure(&addrs, EGRESS);
    let remote = |i: usize| format!("docker://{}/{repo}:{TAG}", addrs[i]);

    // skopeo pushes the two-platform index to A.
    let src = layout.write(&sb.path("src"));
    loopback_only(sb.skopeo())
        .args([
            "copy",
            "--all",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{TAG}", src.display()))
        .arg(remote(0))
        .run();
    assert_stored(&r, repo, &layout);

    // B and C: skopeo pulls every platform back into an OCI layout, byte-exact.
    for i in [1, 2] {
        let out = sb.path(&format!("out-{i}"));
        loopback_only(sb.skopeo())
            .args([
                "copy",
                "--all",
                "--preserve-digests",
                "--src-tls-verify=false",
            ])
            .arg(remote(i))
            .arg(format!("oci:{}:{TAG}", out.display()))
            .run();
        assert_same_layout(&out, &layout);
    }

    // C and B: containerd fetches every platform's content, byte-exact (and forgets it
    // before the next replica, so that one serves everything again).
    let daemon = Containerd::start(EGRESS);
    for i in [2, 1] {
        let reference = format!("{}/{repo}:{TAG}", addrs[i]);
        loopback_only(daemon.ctr())
            .args(["images", "pull", "--plain-http", "--all-platforms"])
            .args(["--snapshotter", "native"])
            .arg(&reference)
            .run();
        assert_eq!(daemon.image_digest(&reference), layout.top.1);
        daemon.assert_content(&layout.all());
        daemon.forget(&reference);
    }
    drop(daemon);

    // Every replica answers the raw API the same, byte for byte, Ranges included.
    for i in 0..3 {
        assert_serves(&r.http(i), repo, &layout);
    }
    // The pulls changed nothing underneath.
    assert_stored(&r, repo, &layout);
}

#[test]
fn a_chunked_upload_started_on_a_continues_on_b_and_finishes_on_c() {
    if !Replicas::available() {
        return;
    }
    let mut r = Replicas::start(3);
    let (a, b, c) = (r.http(0), r.http(1), r.http(2));
    let repo = "local/replicas/chunked";
    // Over one 5 MiB part on B, a short chunk on A, the rest with the final PUT on C.
    let data = random_bytes(13 * 1024 * 1024 + 4321, 7);
    let digest = sha256(&data);
    let cuts = [0, 6 * 1024 * 1024 + 99, 7 * 1024 * 1024 + 5, data.len()];
    let chunk = |k: usize| Bytes::copy_from_slice(&data[cuts[k]..cuts[k + 1]]);
    let content_range = |k: usize| format!("{}-{}", cuts[k], cuts[k + 1] - 1);

    let (mut location, id) = start_session(&a, repo, "");
    assert_eq!(
        r.sql(&format!(
            "SELECT byte_offset FROM upload_sessions WHERE id = '{id}'"
        )),
        vec![vec!["0".to_string()]],
        "the session is in the database"
    );

    for (k, replica) in [(0, &b), (1, &a)] {
        let resp = replica.send(
            "PATCH",
            &location,
            &[
                ("content-type", "application/octet-stream"),
                ("content-range", &content_range(k)),
            ],
            chunk(k),
        );
        assert_eq!(resp.status, 202, "PATCH chunk {k}: {resp:?}");
        assert_eq!(
            resp.header("range"),
            Some(format!("0-{}", cuts[k + 1] - 1).as_str()),
            "progress after chunk {k}"
        );
        location = location_path(resp.header("location").expect("Location"));
    }

    // A dies (SIGKILL) with the session in progress: nothing of it was A's alone.
    r.kill9(0);

    // C sees the progress made on A and B, and refuses a replayed first chunk with it.
    let end = format!("0-{}", cuts[2] - 1);
    let resp = c.get(&location);
    assert_eq!(resp.status, 204, "upload status on C: {resp:?}");
    assert_eq!(resp.header("range"), Some(end.as_str()));
    let resp = c.send(
        "PATCH",
        &location,
        &[
            ("content-type", "application/octet-stream"),
            ("content-range", &content_range(0)),
        ],
        chunk(0),
    );
    assert_eq!(resp.status, 416, "a chunk at a wrong offset: {resp:?}");
    assert_eq!(resp.header("range"), Some(end.as_str()));
    assert_eq!(
        r.sql(&format!(
            "SELECT byte_offset FROM upload_sessions WHERE id = '{id}'"
        )),
        vec![vec![cuts[2].to_string()]],
        "the refused chunk changed nothing"
    );

    let sep = if location.contains('?') { '&' } else { '?' };
    let resp = c.send(
        "PUT",
        &format!("{location}{sep}digest={digest}"),
        &[
            ("content-type", "application/octet-stream"),
            ("content-range", &content_range(2)),
        ],
        chunk(2),
    );
    assert_eq!(resp.status, 201, "final PUT on C: {resp:?}\n{}", r.log(2));
    assert_eq!(resp.header("docker-content-digest"), Some(digest.as_str()));

    // A, back, serves the blob it never saw completed (new clients: A's connections died
    // with it).
    r.restart(0);
    for i in 0..3 {
        let resp = r.http(i).get(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(resp.status, 200, "GET on replica {i}");
        assert_bytes(&format!("the blob on replica {i}"), &resp.body, &data);
    }
    assert_eq!(
        r.objects("blobs").get(&blob_key(&digest)),
        Some(&(data.len() as u64))
    );
    assert_eq!(
        r.sql(&format!("SELECT size FROM blobs WHERE digest = '{digest}'")),
        vec![vec![data.len().to_string()]]
    );
    assert_no_upload_left(&r);
    // The finished session is gone everywhere.
    assert_eq!(b.get(&location).status, 404);
}

/// An image manifest over `config` and `layer`, told apart by an annotation.
fn annotated_manifest(config: (&str, usize), layer: (&str, usize), note: &str) -> Vec<u8> {
    json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.0, "size": config.1},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.0, "size": layer.1}],
        "annotations": {"replicas.test/push": note},
    })
    .to_string()
    .into_bytes()
}

#[test]
fn concurrent_pushes_of_one_tag_on_a_and_b_end_with_one_winner_every_replica_agrees_on() {
    if !Replicas::available() {
        return;
    }
    const ROUNDS: usize = 24;
    let r = Replicas::start(3);
    let repo = "local/replicas/race";
    let a = r.http(0);
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = random_bytes(40_000, 3);
    let config_digest = a.push_blob(repo, config);
    let layer_digest = a.push_blob(repo, &layer);
    let manifest = |round: usize, side: &str| {
        annotated_manifest(
            (&config_digest, config.len()),
            (&layer_digest, layer.len()),
            &format!("round {round} on {side}"),
        )
    };
    let mut pushed = BTreeMap::new();
    for round in 0..ROUNDS {
        for side in ["a", "b"] {
            let m = manifest(round, side);
            pushed.insert(sha256(&m), m);
        }
    }

    // Each round, A and B push their own manifest under one tag at the same moment.
    let barrier = Arc::new(Barrier::new(2));
    let pushers: Vec<_> = [(0, "a"), (1, "b")]
        .into_iter()
        .map(|(i, side)| {
            let base = r.url(i, "");
            let barrier = barrier.clone();
            let manifests: Vec<Vec<u8>> = (0..ROUNDS).map(|round| manifest(round, side)).collect();
            std::thread::spawn(move || {
                let h = Http::new(&base);
                for m in manifests {
                    barrier.wait();
                    let resp = h.push_manifest(repo, "latest", OCI_MANIFEST, &m);
                    assert_eq!(resp.status, 201, "push on {side}: {resp:?}");
                    assert_eq!(
                        resp.header("docker-content-digest"),
                        Some(sha256(&m).as_str())
                    );
                }
            })
        })
        .collect();
    for p in pushers {
        p.join().expect("pusher");
    }

    let answers: Vec<String> = (0..3)
        .map(|i| {
            let resp = r.http(i).send(
                "GET",
                &format!("/v2/{repo}/manifests/latest"),
                &[("accept", OCI_MANIFEST)],
                Bytes::new(),
            );
            assert_eq!(resp.status, 200, "GET latest on replica {i}");
            let digest = sha256(&resp.body);
            assert_eq!(resp.header("docker-content-digest"), Some(digest.as_str()));
            digest
        })
        .collect();
    assert!(
        answers.iter().all(|d| *d == answers[0]),
        "replicas disagree on latest: {answers:?}"
    );
    let winner = &answers[0];
    assert!(pushed.contains_key(winner), "{winner} was never pushed");
    assert_eq!(tag_digest(&r, repo, "latest").as_ref(), Some(winner));

    // The history: one row per move, newest last, each naming the one before; the last is the
    // winner.
    let history = r.sql(&format!(
        "SELECT h.digest, coalesce(h.previous, '') FROM tag_history h \
         JOIN repositories r ON r.id = h.repo_id \
         WHERE r.name = '{repo}' AND h.tag = 'latest' ORDER BY h.id"
    ));
    assert_eq!(history.len(), 2 * ROUNDS, "one history row per push");
    assert_eq!(history.last().map(|row| &row[0]), Some(winner));
    assert_eq!(history[0][1], "", "the first row creates the tag");
    for pair in history.windows(2) {
        assert_eq!(pair[1][1], pair[0][0], "the history is one chain");
        assert!(pushed.contains_key(&pair[1][0]));
    }
    // Every pushed manifest is stored and reachable by digest on every replica.
    for i in 0..3 {
        let h = r.http(i);
        for (digest, m) in pushed.iter().step_by(7) {
            assert_manifest(&h, repo, digest, OCI_MANIFEST, m);
        }
    }
    assert_eq!(
        r.sql(&format!(
            "SELECT count(*) FROM repo_manifests rm JOIN repositories r ON r.id = rm.repo_id \
             WHERE r.name = '{repo}'"
        )),
        vec![vec![(2 * ROUNDS).to_string()]]
    );
}

#[test]
fn a_replica_whose_read_cache_is_wiped_or_that_is_killed_still_serves_everything() {
    if !Replicas::available() {
        return;
    }
    let mut r = Replicas::start(3);
    let repo = "local/replicas/cached";
    let layout = Layout::single(31, &OCI, &LAYERS);
    push_layout(&r.http(0), repo, &layout);
    assert_stored(&r, repo, &layout);

    // B serves everything, keeping the bytes in its read cache.
    assert_serves(&r.http(1), repo, &layout);
    wait_for_read_cache(&r, 1);

    // Wiped underneath the running replica: it still serves every byte, and caches again.
    assert!(r.wipe_read_cache(1) > 0);
    assert_serves(&r.http(1), repo, &layout);
    wait_for_read_cache(&r, 1);

    // Killed, its read cache gone entirely, restarted: the same.
    r.kill9(1);
    std::fs::remove_dir_all(r.read_cache(1)).expect("remove the read cache");
    r.restart(1);
    assert_serves(&r.http(1), repo, &layout);
    // C, which never served the image, too; and nothing changed underneath.
    assert_serves(&r.http(2), repo, &layout);
    assert_stored(&r, repo, &layout);
}

/// Waits (up to a deadline) until replica `i`'s read cache holds a file: it may be written
/// after the response that read the bytes.
fn wait_for_read_cache(r: &Replicas, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while r.read_cache_files(i).is_empty() {
        assert!(
            Instant::now() < deadline,
            "replica {i}'s read cache holds nothing after serving the image"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pushes every blob and manifest of `layout` (one image) over the raw API, tagging the top.
fn push_layout(h: &Http, repo: &str, layout: &Layout) {
    for bytes in layout.blobs.values() {
        h.push_blob(repo, bytes);
    }
    let resp = h.push_manifest(repo, TAG, layout.top.0, &layout.top.2);
    assert_eq!(resp.status, 201, "manifest push: {resp:?}");
}

/// `[[user]]` alice and project `team` (no anonymous access, alice an editor): the same on
/// every replica.
fn team_config(_replica: usize) -> String {
    format!(
        "[[user]]\nname = \"alice\"\npassword_hash = \"{}\"\n\n\
         [[project]]\nname = \"team\"\nanonymous = \"none\"\neditors = [\"alice\"]\n",
        hash_password(PASSWORD)
    )
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The JSON answer of a token request that must succeed.
fn token_answer(resp: Resp, what: &str) -> Value {
    expect_status(&resp, 200, what);
    resp.json()
}

#[test]
fn a_token_from_a_is_accepted_by_b_and_c_and_a_refresh_token_works_everywhere() {
    if !Replicas::available() {
        return;
    }
    let r = Replicas::start_with(3, &team_config);
    let repo = "team/app";
    let scope = enc(&format!("repository:{repo}:pull,push"));
    let alice = basic_header("alice", PASSWORD);

    // Anonymous: every replica challenges with its own realm.
    for i in 0..3 {
        let resp = r.http(i).get(&format!("/v2/{repo}/tags/list"));
        assert_eq!(resp.status, 401, "anonymous on replica {i}");
    }

    // A token for push and pull from A, by password.
    let v = token_answer(
        r.http(0).send(
            "GET",
            &format!("/v2/token?service=transship&scope={scope}"),
            &[("authorization", &alice)],
            Bytes::new(),
        ),
        "token from A",
    );
    let bearer = format!("Bearer {}", v["token"].as_str().expect("token"));
    let layout = Layout::single(41, &OCI, &LAYERS);
    push_layout(&r.http(0).with_auth(&bearer), repo, &layout);
    // B and C accept A's token for the pull.
    for i in 1..3 {
        assert_serves(&r.http(i).with_auth(&bearer), repo, &layout);
    }
    // ...and a forged one is refused (the check is real).
    let forged = format!("Bearer {}x", v["token"].as_str().expect("token"));
    assert_eq!(
        r.http(1)
            .with_auth(&forged)
            .get(&format!("/v2/{repo}/tags/list"))
            .status,
        401
    );

    // What `docker login` does on A: no scope, offline_token, Basic credentials.
    let v = token_answer(
        r.http(0).send(
            "GET",
            "/v2/token?account=alice&client_id=docker&offline_token=true&service=transship",
            &[("authorization", &alice)],
            Bytes::new(),
        ),
        "docker login on A",
    );
    let refresh = v["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_string();
    // The refresh token buys an access token on B (OAuth2 POST, as docker does) and on C.
    for i in 1..3 {
        let form = format!(
            "grant_type=refresh_token&refresh_token={}&client_id=docker&service=transship&scope={scope}",
            enc(&refresh)
        );
        let v = token_answer(
            r.http(i).send(
                "POST",
                "/v2/token",
                &[("content-type", "application/x-www-form-urlencoded")],
                form,
            ),
            &format!("refresh on replica {i}"),
        );
        assert_eq!(v["scope"], format!("repository:{repo}:pull,push"));
        let bearer = format!("Bearer {}", v["access_token"].as_str().expect("token"));
        // Used on the next replica round.
        let next = (i + 1) % 3;
        assert_serves(&r.http(next).with_auth(&bearer), repo, &layout);
    }
    // One signing key for the group, in the database.
    assert_eq!(
        r.sql("SELECT count(*) FROM token_signing_key"),
        vec![vec!["1".to_string()]]
    );
}

/// Pushes `data` to `repo` on `h` as one session started with `algorithm` (`None`: the
/// default) and finished with `PUT ?digest=digest`; returns the final response.
fn push_in_session(
    h: &Http,
    repo: &str,
    algorithm: Option<&str>,
    data: &[u8],
    digest: &str,
) -> Resp {
    let query = algorithm.map_or(String::new(), |a| format!("?digest-algorithm={a}"));
    let (location, _) = start_session(h, repo, &query);
    let sep = if location.contains('?') { '&' } else { '?' };
    h.send(
        "PUT",
        &format!("{location}{sep}digest={digest}"),
        &[("content-type", "application/octet-stream")],
        Bytes::copy_from_slice(data),
    )
}

#[test]
fn empty_and_sha512_blobs_and_referrers_work_across_replicas() {
    if !Replicas::available() {
        return;
    }
    let r = Replicas::start(3);
    let repo = "local/replicas/edges";
    let a = r.http(0);
    let data = random_bytes(70_000, 51);
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    // The empty blob, monolithic (POST ?digest=), sha256 and sha512.
    for (i, digest) in [EMPTY_SHA256.to_string(), sha512(b"")]
        .into_iter()
        .enumerate()
    {
        let resp = a.send(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            &[("content-type", "application/octet-stream")],
            Bytes::new(),
        );
        expect_status(&resp, 201, &format!("monolithic empty blob {i}"));
        blobs.push((digest, Vec::new()));
    }
    // sha512: a session started for it.
    let d512 = sha512(&data);
    let resp = push_in_session(&a, repo, Some("sha512"), &data, &d512);
    expect_status(&resp, 201, "sha512 session");
    blobs.push((d512, data));
    for i in 0..3 {
        let h = r.http(i);
        for (digest, bytes) in &blobs {
            let resp = h.get(&format!("/v2/{repo}/blobs/{digest}"));
            expect_status(&resp, 200, &format!("GET {digest} on replica {i}"));
            assert_bytes(&format!("{digest} on replica {i}"), &resp.body, bytes);
        }
    }
    // Referrers pushed on A, listed on B and C: one with an artifactType, one without (its
    // config's media type stands in).
    let (_, subject) = push_image(&a, repo, "base", 53);
    let empty_json = a.push_blob(repo, b"{}");
    let signature = a.push_blob(repo, b"signature bytes");
    let referrer = |artifact_type: Option<&str>, config_type: &str| {
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": empty_json, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": signature, "size": 15}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 100},
        });
        if let Some(t) = artifact_type {
            m["artifactType"] = json!(t);
        }
        m.to_string().into_bytes()
    };
    let signed = referrer(
        Some("application/vnd.example.sig"),
        "application/vnd.oci.empty.v1+json",
    );
    let sbom = referrer(None, "application/vnd.example.sbom.config+json");
    for (m, artifact_type) in [
        (&signed, "application/vnd.example.sig"),
        (&sbom, "application/vnd.example.sbom.config+json"),
    ] {
        let resp = a.push_manifest(repo, &sha256(m), OCI_MANIFEST, m);
        assert_eq!(resp.status, 201, "referrer push: {resp:?}");
        assert_eq!(resp.header("oci-subject"), Some(subject.as_str()));
        for i in 1..3 {
            let resp = r.http(i).get(&format!("/v2/{repo}/referrers/{subject}"));
            assert_eq!(resp.status, 200, "referrers on replica {i}");
            let listed = resp.json()["manifests"].clone();
            let entry = listed
                .as_array()
                .into_iter()
                .flatten()
                .find(|d| d["digest"] == sha256(m))
                .unwrap_or_else(|| {
                    panic!(
                        "{} not among the referrers on replica {i}: {listed}",
                        sha256(m)
                    )
                });
            assert_eq!(entry["artifactType"], artifact_type, "on replica {i}");
            assert_eq!(entry["size"], m.len());
            // Filtered by its artifact type: this referrer alone.
            let resp = r.http(i).get(&format!(
                "/v2/{repo}/referrers/{subject}?artifactType={}",
                enc(artifact_type)
            ));
            assert_eq!(resp.header("oci-filters-applied"), Some("artifactType"));
            let digests: Vec<Value> = resp.json()["manifests"]
                .as_array()
                .map(|l| l.iter().map(|d| d["digest"].clone()).collect())
                .unwrap_or_default();
            assert_eq!(
                digests,
                vec![json!(sha256(m))],
                "referrers of type {artifact_type} on replica {i}"
            );
        }
    }
}

/// What the conformance suite does for its sha512 blobs: a session started without
/// `digest-algorithm` (so hashing sha256) finished with a sha512 digest. The local profile
/// re-hashes what it received. A small and a multipart session, pushed on B, read on C.
#[test]
fn a_default_session_finishes_with_a_sha512_digest_as_on_the_local_profile() {
    if !Replicas::available() {
        return;
    }
    let r = Replicas::start(3);
    let repo = "local/replicas/sha512";
    for (len, seed) in [(777, 52), (6 * 1024 * 1024 + 3, 53)] {
        let data = random_bytes(len, seed);
        let digest = sha512(&data);
        let resp = push_in_session(&r.http(1), repo, None, &data, &digest);
        expect_status(
            &resp,
            201,
            &format!("sha512 digest for a default session of {len} bytes"),
        );
        let resp = r.http(2).get(&format!("/v2/{repo}/blobs/{digest}"));
        expect_status(&resp, 200, "GET on C");
        assert_bytes(
            &format!("the sha512 blob of {len} bytes on C"),
            &resp.body,
            &data,
        );
    }
    assert_no_upload_left(&r);
}

#[test]
fn an_upload_that_never_finishes_makes_no_repository() {
    if !Replicas::available() {
        return;
    }
    let r = Replicas::start(2);
    let repo = "local/replicas/ghost";
    let resp = r.http(0).send(
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        Vec::new(),
    );
    expect_status(&resp, 202, "POST on A");
    // Clients see no such repository, on either replica, although its session exists.
    let resp = r.http(1).get(&format!("/v2/{repo}/tags/list"));
    expect_status(&resp, 404, "tags of a repository with only a session");
    let resp = r.http(1).get("/v2/_catalog");
    expect_status(&resp, 200, "catalog");
    let catalog: Value = serde_json::from_slice(&resp.body).expect("catalog JSON");
    assert!(
        !catalog["repositories"]
            .as_array()
            .expect("repositories")
            .iter()
            .any(|n| n == repo),
        "{catalog}"
    );
    assert_eq!(
        r.sql("SELECT count(*) FROM upload_sessions"),
        vec![vec!["1".to_string()]]
    );
}

#[test]
fn a_small_blob_damaged_in_a_read_cache_is_fetched_again_never_served() {
    if !Replicas::available() {
        return;
    }
    let mut r = Replicas::start(2);
    let repo = "local/replicas/small";
    let data = random_bytes(1500, 61);
    let digest = r.http(0).push_blob(repo, &data);
    let resp = r.http(1).get(&format!("/v2/{repo}/blobs/{digest}"));
    expect_status(&resp, 200, "first GET on B");
    assert_bytes("the small blob on B", &resp.body, &data);
    // B restarts (its memory empty) with its cached copy damaged on disk, same length.
    r.kill9(1);
    let files = r.read_cache_files(1);
    let cached = files
        .iter()
        .find(|f| {
            f.to_string_lossy()
                .ends_with(digest.trim_start_matches("sha256:"))
        })
        .expect("B's read cache holds the blob");
    let mut damaged = std::fs::read(cached).expect("read cached copy");
    damaged[700] ^= 0xff;
    std::fs::write(cached, &damaged).expect("damage cached copy");
    r.restart(1);
    let resp = r.http(1).get(&format!("/v2/{repo}/blobs/{digest}"));
    expect_status(&resp, 200, "GET on B after the damage");
    assert_bytes("the small blob on B after the damage", &resp.body, &data);
    assert_eq!(
        std::fs::read(cached).expect("cached copy again"),
        data,
        "the damaged copy was replaced by a fresh fetch"
    );

    // Many first requests at once after a restart with the read cache emptied share one
    // fetch (and one file descriptor): each reads it whole, none takes it for damaged.
    r.kill9(1);
    r.wipe_read_cache(1);
    r.restart(1);
    let url = format!("/v2/{repo}/blobs/{digest}");
    let bodies: Vec<Resp> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16).map(|_| s.spawn(|| r.http(1).get(&url))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("GET thread"))
            .collect()
    });
    for resp in &bodies {
        expect_status(resp, 200, "a concurrent first GET");
        assert_bytes("a concurrent first GET", &resp.body, &data);
    }
    // The log spans restarts: the one damage above, and no other.
    assert_eq!(
        r.log(1).matches("was damaged").count(),
        1,
        "a shared fetch was taken for damage"
    );
}
