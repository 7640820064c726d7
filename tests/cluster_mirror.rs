//! The pull-through cache in the cluster profile end to end: replica processes (127.0.0.2, .3,
//! .4) mirroring one distribution upstream, on one SeaweedFS bucket and one PostgreSQL database
//! (`common::replicas`). What one replica cached is the cluster's: the others serve it with the
//! upstream stopped, byte-exact to skopeo; a tag one replica sees move upstream has moved on
//! every replica, and the move is notified once for the cluster; pulls on every replica add up
//! in one shared record. Underneath: the cache's rows in PostgreSQL and its objects in the
//! bucket.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::images::*;
use common::replicas::{Replicas, blob_key};
use common::upstream::{self, Distribution};
use common::webhook::Receiver;
use common::*;
use serde_json::Value;

const SUITE: &str = "cluster mirror";
/// Clients are given 127.0.0.x addresses only.
const EGRESS: Egress = Egress::Unrestricted;
const LAYERS: LayerRecipe = LayerRecipe {
    app_bin: 700_000,
    data_bin: 40_001,
    readme: "cluster mirror image",
};
/// The upstream's repository, and the cache repository replicas keep it in.
const REMOTE: &str = "library/app";
const MIRRORED: &str = "mirror.test/library/app";

/// An upstream and `n` replicas mirroring it as `mirror.test`, each with `extra` in its
/// config (None, after a loud skip, where the engines or distribution cannot run).
fn mirroring(n: usize, extra: &str) -> Option<(Distribution, Replicas)> {
    mirroring_edited(n, extra, &|text| text)
}

/// `mirroring`, each config then passed through `edit`.
fn mirroring_edited(
    n: usize,
    extra: &str,
    edit: &dyn Fn(String) -> String,
) -> Option<(Distribution, Replicas)> {
    if !Replicas::available() || !upstream::available() {
        return None;
    }
    let up = Distribution::start();
    let config = format!(
        "[[upstream]]\nname = \"mirror.test\"\nurl = \"{}\"\n{extra}\n",
        up.url()
    );
    let replicas = Replicas::start_edited(n, &|_| config.clone(), edit);
    Some((up, replicas))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One value from a query on the cache repository (`$R` stands for its id).
fn cache_sql(r: &Replicas, query: &str) -> Vec<Vec<String>> {
    r.sql(&query.replace(
        "$R",
        &format!("(SELECT id FROM repositories WHERE name = '{MIRRORED}')"),
    ))
}

fn manifest_get(h: &Http, reference: &str, accept: &str) -> Resp {
    h.send(
        "GET",
        &format!("/v2/{MIRRORED}/manifests/{reference}"),
        &[("accept", accept)],
        bytes::Bytes::new(),
    )
}

/// Every layer and config of `layout` is recorded and stored in the bucket (a fill's owner
/// publishes after its client has the bytes).
fn await_published(r: &Replicas, layout: &Layout) {
    for digest in layout.blobs.keys() {
        wait_until(&format!("{digest} in the bucket"), || {
            r.sql(&format!("SELECT 1 FROM blobs WHERE digest = '{digest}'")) == [["1"]]
        });
        assert_eq!(
            r.objects("blobs").get(&blob_key(digest)),
            Some(&(layout.blobs[digest].len() as u64)),
            "{digest} in the bucket"
        );
    }
}

#[test]
fn an_image_one_replica_cached_is_served_by_the_others_with_the_upstream_down() {
    if !programs_installed(SUITE, &["skopeo"]) {
        return;
    }
    let Some((mut up, r)) = mirroring(3, "") else {
        return;
    };
    let layout = Layout::multi_arch(41, &OCI, &LAYERS);
    up.seed(REMOTE, TAG, &layout);
    let addrs: Vec<String> = (0..3).map(|i| r.addr(i).to_string()).collect();
    let sb = Sandbox::insecure(&addrs, EGRESS);
    let pull = |i: usize, out: &str| {
        let out = sb.path(out);
        loopback_only(sb.skopeo())
            .args([
                "copy",
                "--all",
                "--preserve-digests",
                "--src-tls-verify=false",
            ])
            .arg(format!("docker://{}/{MIRRORED}:{TAG}", addrs[i]))
            .arg(format!("oci:{}:{TAG}", out.display()))
            .run();
        assert_same_layout(&out, &layout);
    };

    // A pulls every platform through the cache.
    pull(0, "through-a");
    await_published(&r, &layout);
    // Underneath: the index and both images are the cluster's cached manifests, the tag was
    // confirmed and moved once, and the images' blobs are linked as cache fills.
    assert_eq!(
        cache_sql(
            &r,
            "SELECT count(*) FROM repo_manifests WHERE repo_id = $R AND NOT pushed"
        ),
        [["3"]]
    );
    assert_eq!(
        cache_sql(
            &r,
            &format!(
                "SELECT digest, checked_at IS NOT NULL FROM tags WHERE repo_id = $R AND tag = '{TAG}'"
            )
        ),
        [[layout.top.1.clone(), "t".to_string()]]
    );
    assert_eq!(
        cache_sql(
            &r,
            "SELECT count(*), count(previous) FROM tag_history WHERE repo_id = $R"
        ),
        [["1", "0"]]
    );
    assert_eq!(
        cache_sql(
            &r,
            "SELECT count(*) FROM repo_blobs WHERE repo_id = $R AND NOT pushed"
        ),
        [[layout.blobs.len().to_string()]]
    );
    let asked = up.requests().len();

    // The upstream goes away: B and C never pulled, yet serve the whole image byte-exact,
    // the tag as a fresh hit.
    up.stop();
    for (i, out) in [(1, "through-b"), (2, "through-c")] {
        pull(i, out);
        let m = manifest_get(&r.http(i), TAG, layout.top.0);
        assert_eq!((m.status, m.header("x-cache")), (200, Some("HIT")), "{i}");
        assert_bytes("the index", &m.body, &layout.top.2);
    }
    // The tag list the upstream cannot give: the cluster's cached tags.
    let list = r.http(2).get(&format!("/v2/{MIRRORED}/tags/list"));
    assert_eq!((list.status, list.header("x-cache")), (200, Some("STALE")));
    assert_eq!(list.json()["tags"], serde_json::json!([TAG]));
    assert_eq!(
        up.requests().len(),
        asked,
        "B and C asked the upstream nothing"
    );
    // Nothing was fetched twice into the bucket, and nothing more was cached.
    assert_eq!(
        cache_sql(&r, "SELECT count(*) FROM repo_manifests WHERE repo_id = $R"),
        [["3"]]
    );
    assert_eq!(
        cache_sql(&r, "SELECT count(*) FROM tag_history WHERE repo_id = $R"),
        [["1"]]
    );
}

/// (action, tag, digest, previous) of each distinct event the receiver got, in order.
fn delivered(receiver: &Receiver) -> Vec<(String, Option<String>, String, Option<String>)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for g in receiver.accepted("/hook") {
        let id = g.headers["x-transship-event-id"]
            .to_str()
            .expect("id")
            .to_string();
        if !seen.insert(id) {
            continue;
        }
        let body: Value = serde_json::from_slice(&g.body).expect("JSON body");
        let e = &body["events"][0];
        let text = |v: &Value| v.as_str().map(str::to_string);
        out.push((
            text(&e["action"]).expect("action"),
            text(&e["target"]["tag"]),
            text(&e["target"]["digest"]).expect("digest"),
            text(&e["target"]["previous"]),
        ));
    }
    out
}

#[test]
fn a_tag_moved_upstream_moves_on_every_replica_and_is_notified_once() {
    let mut receiver = Receiver::down();
    receiver.up();
    let hook = format!(
        "tag_ttl = \"1s\"\n\n[[notify]]\nname = \"hook\"\nurl = \"{}\"\nformat = \"distribution\"\n\
         events = [\"cache.fill\", \"tag.moved\"]\ntimeout = \"5s\"\n",
        receiver.url("/hook")
    );
    let Some((mut up, r)) = mirroring(3, &hook) else {
        return;
    };
    let first = Layout::single(51, &OCI, &LAYERS);
    up.seed(REMOTE, TAG, &first);
    let (a, b, c) = (r.http(0), r.http(1), r.http(2));
    let got = manifest_get(&a, TAG, first.top.0);
    assert_eq!(got.status, 200);
    assert_bytes("the first image", &got.body, &first.top.2);

    // The tag moves upstream; once A's confirmation is older than tag_ttl, B asks, and the
    // cluster's tag moves.
    let second = Layout::single(52, &OCI, &LAYERS);
    up.seed(REMOTE, TAG, &second);
    std::thread::sleep(Duration::from_millis(1100));
    let got = manifest_get(&b, TAG, second.top.0);
    assert_eq!(got.status, 200);
    assert_bytes("the moved tag on B", &got.body, &second.top.2);
    // With the upstream gone, A and C serve the tag as the cluster last saw it (fresh, or
    // stale within stale_if_error): the second image, though A had cached the first.
    up.stop();
    for (name, h) in [("A", &a), ("C", &c)] {
        let got = manifest_get(h, TAG, second.top.0);
        assert_eq!(got.status, 200, "{name}");
        assert_bytes(
            &format!("the moved tag on {name}"),
            &got.body,
            &second.top.2,
        );
    }
    let history = cache_sql(
        &r,
        &format!(
            "SELECT digest, coalesce(previous, '-') FROM tag_history \
             WHERE repo_id = $R AND tag = '{TAG}' ORDER BY id"
        ),
    );
    assert_eq!(
        history,
        [
            [first.top.1.clone(), "-".to_string()],
            [second.top.1.clone(), first.top.1.clone()]
        ]
    );

    // A manifest fetched by digest last: once its event arrives, everything recorded before it
    // has been delivered (one replica delivers the outbox in order).
    up.restart();
    // A layer pulled on every replica: fetched once, one `cache.fill` for the cluster.
    let (layer, bytes) = second.blobs.iter().next().expect("a layer");
    for h in [&a, &b, &c] {
        let got = h.get(&format!("/v2/{MIRRORED}/blobs/{layer}"));
        assert_eq!(got.status, 200);
        assert_bytes("the layer", &got.body, bytes);
        wait_until("the layer in the bucket", || {
            r.sql(&format!("SELECT 1 FROM blobs WHERE digest = '{layer}'")) == [["1"]]
        });
    }
    assert_eq!(
        up.count("GET", &format!("/v2/{REMOTE}/blobs/{layer}")),
        1,
        "one upstream GET of the layer"
    );
    let third = Layout::single(53, &OCI, &LAYERS);
    up.seed(REMOTE, "other", &third);
    assert_eq!(manifest_get(&c, &third.top.1, third.top.0).status, 200);
    common::webhook::wait_until("the last fill's event", || {
        delivered(&receiver)
            .iter()
            .any(|e| e.0 == "cache.fill" && e.2 == third.top.1)
    });
    let fill = |d: &str, tag: Option<&str>| {
        (
            "cache.fill".to_string(),
            tag.map(str::to_string),
            d.to_string(),
            None,
        )
    };
    assert_eq!(
        delivered(&receiver),
        [
            fill(&first.top.1, Some(TAG)),
            fill(&second.top.1, Some(TAG)),
            (
                "tag.moved".to_string(),
                Some(TAG.to_string()),
                second.top.1.clone(),
                Some(first.top.1.clone())
            ),
            ("cache.fill".to_string(), None, layer.clone(), None),
            fill(&third.top.1, None),
        ],
        "each change of the cluster's cache once, whichever replica made it"
    );
}

#[test]
fn pulls_on_every_replica_add_up_in_the_shared_record() {
    let flush_often = |text: String| {
        let edited = text.replace(
            "access_flush_interval = \"60s\"",
            "access_flush_interval = \"1s\"",
        );
        assert_ne!(
            edited, text,
            "the default config names access_flush_interval"
        );
        edited
    };
    let Some((up, r)) = mirroring_edited(3, "", &flush_often) else {
        return;
    };
    let layout = Layout::single(61, &OCI, &LAYERS);
    up.seed(REMOTE, TAG, &layout);
    for (i, times) in [(0, 2), (1, 3), (2, 1)] {
        for _ in 0..times {
            assert_eq!(manifest_get(&r.http(i), TAG, layout.top.0).status, 200);
        }
    }
    // A HEAD checks for updates and pulls nothing.
    let head = r.http(1).send(
        "HEAD",
        &format!("/v2/{MIRRORED}/manifests/{TAG}"),
        &[("accept", layout.top.0)],
        bytes::Bytes::new(),
    );
    assert_eq!(head.status, 200);
    let digest = &layout.top.1;
    wait_until("six pulls in the shared record", || {
        cache_sql(
            &r,
            &format!("SELECT pulls FROM cache_access WHERE repo_id = $R AND digest = '{digest}'"),
        ) == [["6"]]
    });
    // Blobs are no images: the record holds the manifest only.
    assert_eq!(
        cache_sql(&r, "SELECT count(*) FROM cache_access WHERE repo_id = $R"),
        [["1"]]
    );
}

#[test]
fn with_the_database_down_each_replica_carries_on_with_its_own_copy() {
    let Some((up, mut r)) = mirroring(2, "") else {
        return;
    };
    let first = Layout::single(71, &OCI, &LAYERS);
    up.seed(REMOTE, TAG, &first);
    let (a, b) = (r.http(0), r.http(1));
    let got = manifest_get(&a, TAG, first.top.0);
    assert_eq!(got.status, 200);
    for (digest, bytes) in &first.blobs {
        assert_blob(&a, MIRRORED, digest, bytes);
    }
    await_published(&r, &first);

    r.pg.stop();
    // A serves its own copy: the tag, the manifest and the blobs.
    let got = manifest_get(&a, TAG, first.top.0);
    assert_eq!(got.status, 200, "{:?}", String::from_utf8_lossy(&got.body));
    assert_bytes("A's copy of the tag", &got.body, &first.top.2);
    for (digest, bytes) in &first.blobs {
        assert_blob(&a, MIRRORED, digest, bytes);
    }
    // A new image is fetched from the upstream and served, though the cluster cannot hear
    // of it; B, which never pulled, fetches for itself.
    let second = Layout::single(72, &OCI, &LAYERS);
    up.seed(REMOTE, "other", &second);
    let got = manifest_get(&a, "other", second.top.0);
    assert_eq!(got.status, 200, "{:?}", String::from_utf8_lossy(&got.body));
    assert_bytes("a new image", &got.body, &second.top.2);
    for (digest, bytes) in &second.blobs {
        assert_blob(&a, MIRRORED, digest, bytes);
    }
    let got = manifest_get(&b, TAG, first.top.0);
    assert_eq!(got.status, 200, "{:?}", String::from_utf8_lossy(&got.body));
    assert_bytes("B's own fetch", &got.body, &first.top.2);
    for (digest, bytes) in &first.blobs {
        assert_blob(&b, MIRRORED, digest, bytes);
    }
}

/// `transship prefetch --pin` through one replica pins in the cluster: the other replica lists
/// the pin, and the shared tables hold it.
#[test]
fn a_prefetch_pinned_through_one_replica_is_pinned_for_the_cluster() {
    let Some((up, r)) = mirroring(2, "") else {
        return;
    };
    let layout = Layout::single(81, &OCI, &LAYERS);
    up.seed(REMOTE, TAG, &layout);
    let config = |i: usize| {
        r.data_dir(i)
            .parent()
            .expect("replica home")
            .join("transship.toml")
    };
    let out = std::process::Command::new(common::binary())
        .args([
            "prefetch",
            &format!("{MIRRORED}:{TAG}"),
            "--pin",
            "--config",
        ])
        .arg(config(0))
        .output()
        .expect("run transship prefetch");
    assert!(
        out.status.success(),
        "prefetch: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, pins, stderr) = common::cache_cli_run(&config(1), &["pins"]);
    assert!(ok, "cache pins on B: {stderr}");
    let listed = pins.to_string();
    assert!(
        listed.contains(&layout.top.1) && listed.contains(TAG),
        "the pin is not listed on B: {listed}"
    );
    assert_eq!(
        cache_sql(&r, "SELECT tag FROM cache_tag_pins WHERE repo_id = $R"),
        [[TAG]]
    );
    assert_eq!(
        cache_sql(&r, "SELECT digest FROM cache_pins WHERE repo_id = $R"),
        [[layout.top.1.clone()]]
    );
}
