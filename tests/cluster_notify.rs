//! Notifications in the cluster profile end to end: three replicas (127.0.0.2, .3, .4) on one
//! SeaweedFS bucket and one PostgreSQL database, one webhook receiver configured on all of
//! them. A push on A, a tag delete on B and a manifest delete on C reach the receiver once
//! each, in order, signed, with the local profile's payloads; one replica delivers at a time
//! (the endpoint's lease). Events acknowledged while the receiver is down survive a `kill -9`
//! of the delivering replica: another takes the endpoint over and delivers them. `events ls`
//! through a replica's admin socket lists the cluster's pending events, and `/metrics` counts
//! the deliveries. Pulls are recorded too; events that ran out their `max_age` are listed as
//! dead letters by every replica (and with none running on the host, from the database) and
//! sent again after `events retry`. Underneath: the outbox, cursor, lease and dead-letter rows
//! in PostgreSQL.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::replicas::{Replicas, host};
use common::webhook::*;
use common::*;
use serde_json::Value;

const SECRET: &str = "cluster-hook-secret";

/// Each delivered event once (by its id; a redelivery is allowed by at-least-once but counted
/// by the caller), every signature checked.
fn delivered(r: &Receiver) -> (Vec<(String, Value)>, usize) {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut repeats = 0;
    for g in r.accepted("/hook") {
        assert_eq!(
            g.headers
                .get("x-transship-signature")
                .and_then(|v| v.to_str().ok()),
            Some(transship::events::format::signature(SECRET, &g.body).as_str()),
            "the HMAC signature verifies"
        );
        let id = g.headers["x-transship-event-id"]
            .to_str()
            .expect("id")
            .to_string();
        if seen.insert(id.clone()) {
            let body: Value = serde_json::from_slice(&g.body).expect("JSON body");
            out.push((id, body["events"][0].clone()));
        } else {
            repeats += 1;
        }
    }
    (out, repeats)
}

/// (action, tag, digest) of each delivered event, in delivery order.
fn summary(events: &[(String, Value)], repo: &str) -> Vec<(String, Option<String>, String)> {
    events
        .iter()
        .map(|(_, e)| {
            assert_eq!(e["target"]["repository"], repo);
            (
                e["action"].as_str().expect("action").to_string(),
                e["target"]["tag"].as_str().map(str::to_string),
                e["target"]["digest"].as_str().expect("digest").to_string(),
            )
        })
        .collect()
}

fn expect(action: &str, tag: Option<&str>, digest: &str) -> (String, Option<String>, String) {
    (
        action.to_string(),
        tag.map(str::to_string),
        digest.to_string(),
    )
}

/// The replica holding the endpoint's lease now.
fn holder(r: &Replicas) -> Option<usize> {
    let rows =
        r.sql("SELECT owner FROM job_leases WHERE job = 'events:hook' AND expires_at > now()");
    let owner = rows.first()?.first()?.clone();
    (0..r.len()).find(|i| {
        owner.ends_with(&format!("@{}", r.addr(*i))) || owner.contains(&format!("@{}:", host(*i)))
    })
}

/// `transship_events_total{endpoint="hook",outcome="delivered"}` on replica `i`.
fn delivered_metric(r: &Replicas, i: usize) -> Option<u64> {
    let body = r.http(i).get("/metrics").body;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| {
            l.strip_prefix(r#"transship_events_total{endpoint="hook",outcome="delivered"} "#)
        })
        .and_then(|v| v.trim().parse().ok())
}

/// `n` replicas, each with the endpoint `hook` (the receiver's `/hook`) for `events`, plus
/// `extra` lines in its table.
fn replicas_notifying(n: usize, receiver: &Receiver, events: &str, extra: &str) -> Replicas {
    let hook = format!(
        "[[notify]]\nname = \"hook\"\nurl = \"{}\"\nformat = \"distribution\"\nevents = {events}\nsecret = \"{SECRET}\"\nhost = \"registry.test\"\ntimeout = \"5s\"\n{extra}",
        receiver.url("/hook")
    );
    Replicas::start_with(n, &|_| hook.clone())
}

fn config_of(r: &Replicas, i: usize) -> PathBuf {
    r.data_dir(i)
        .parent()
        .expect("replica home")
        .join("transship.toml")
}

#[test]
fn each_cluster_change_is_delivered_once_in_order_and_survives_the_delivering_replica() {
    if !Replicas::available() {
        return;
    }
    let mut receiver = Receiver::down();
    receiver.up();
    // The receiver's port is fixed: it stops and starts again on it below.
    let mut r = replicas_notifying(3, &receiver, r#"["push", "delete"]"#, "");

    // A push on A, a tag delete on B, a manifest delete on C.
    let (_, digest) = push_image(&r.http(0), "local/app", "v1", 1);
    assert_eq!(r.http(1).delete("/v2/local/app/manifests/v1").status, 202);
    assert_eq!(
        r.http(2)
            .delete(&format!("/v2/local/app/manifests/{digest}"))
            .status,
        202
    );
    wait_until("three events delivered", || {
        delivered(&receiver).0.len() >= 3
    });
    // Done once the cursor has passed the last event: nothing is sent again after that.
    let last = r.sql("SELECT last_value FROM event_outbox_seq_seq")[0][0].clone();
    wait_until("the cursor at the last event", || {
        r.sql("SELECT seq FROM event_cursors WHERE endpoint = 'hook'")[0][0] == last
    });
    let (events, repeats) = delivered(&receiver);
    assert_eq!(repeats, 0, "each event delivered once");
    assert_eq!(
        summary(&events, "local/app"),
        vec![
            expect("push", Some("v1"), &digest),
            expect("delete", Some("v1"), &digest),
            expect("delete", None, &digest),
        ],
        "in order, with the local profile's payloads"
    );
    let instance = r.sql("SELECT id FROM event_instance")[0][0].clone();
    assert!(
        events.iter().all(|(id, _)| id.starts_with(&instance)),
        "event ids carry the cluster's instance id: {events:?}"
    );
    let first = holder(&r).expect("a replica holds the endpoint");
    assert_eq!(
        delivered_metric(&r, first),
        Some(3),
        "the delivering replica counts its deliveries"
    );

    // The receiver goes down; two more pushes are acknowledged meanwhile.
    receiver.stop();
    let others: Vec<usize> = (0..3).filter(|i| *i != first).collect();
    let (_, d2) = push_image(&r.http(others[0]), "local/app", "v2", 2);
    let (_, d3) = push_image(&r.http(others[1]), "local/app", "v3", 3);
    // Any replica lists what the endpoint still has to deliver, from the database.
    let pending = events_cmd(&r, others[0], &["events", "ls"]);
    let lines: Vec<&str> = pending
        .lines()
        .filter(|l| l.starts_with("hook\t"))
        .collect();
    assert_eq!(lines.len(), 2, "pending:\n{pending}");
    assert!(
        lines[0].contains(&d2) && lines[1].contains(&d3),
        "{pending}"
    );

    // The delivering replica dies; with the receiver back, another one takes over.
    r.kill9(first);
    receiver.up();
    wait_until(
        "the two pending events delivered by another replica",
        || delivered(&receiver).0.len() >= 5,
    );
    let (events, _) = delivered(&receiver);
    assert_eq!(
        summary(&events[3..], "local/app"),
        vec![
            expect("push", Some("v2"), &d2),
            expect("push", Some("v3"), &d3),
        ],
        "none lost, in order"
    );
    let now = holder(&r).expect("a replica holds the endpoint");
    assert_ne!(now, first, "the endpoint moved to a live replica");
    let last = r.sql("SELECT last_value FROM event_outbox_seq_seq")[0][0].clone();
    wait_until("the cursor at the last event", || {
        r.sql("SELECT seq FROM event_cursors WHERE endpoint = 'hook'")[0][0] == last
    });
    let (_, repeats) = delivered(&receiver);
    assert_eq!(
        repeats, 0,
        "nothing was delivered before the kill, so nothing twice"
    );
    // Delivered events are pruned from the outbox.
    wait_until("the outbox pruned", || {
        r.sql("SELECT count(*) FROM event_outbox")[0][0] == "0"
    });
}

fn events_cmd(r: &Replicas, i: usize, args: &[&str]) -> String {
    let out = std::process::Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config_of(r, i))
        .output()
        .expect("run transship");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cluster_dead_letters_are_listed_and_retried_from_any_replica_and_pulls_are_recorded() {
    if !Replicas::available() {
        return;
    }
    let mut receiver = Receiver::down();
    let mut r = replicas_notifying(2, &receiver, r#"["push", "pull"]"#, "max_age = \"2s\"\n");
    // A push on A and a pull on B while the receiver is down: both run out their max_age.
    let (_, digest) = push_image(&r.http(0), "local/dead", "v1", 5);
    assert_eq!(r.http(1).get("/v2/local/dead/manifests/v1").status, 200);
    wait_until("two dead letters", || {
        r.sql("SELECT count(*) FROM event_dead_letters")[0][0] == "2"
    });
    // Listed through each replica's admin socket, then with B stopped, from the database.
    for i in [0, 1, 1] {
        if i == 1 && r.pid(1).is_some() {
            let failed = events_cmd(&r, i, &["events", "ls", "--failed"]);
            assert_eq!(failed.lines().count(), 2, "{failed}");
            r.kill9(1);
            continue;
        }
        let failed = events_cmd(&r, i, &["events", "ls", "--failed"]);
        let lines: Vec<&str> = failed.lines().collect();
        assert_eq!(lines.len(), 2, "replica {i}:\n{failed}");
        assert!(
            lines[0].contains("\tpush\tlocal/dead\tv1\t") && lines[0].contains(&digest),
            "{failed}"
        );
        assert!(
            lines[1].contains("\tpull\tlocal/dead\tv1\t") && lines[1].contains(&digest),
            "{failed}"
        );
    }
    assert_eq!(delivered_metric(&r, 0), None, "nothing delivered yet");

    // Back up, and a retry asked with B stopped (on the database): A sends both, in order.
    receiver.up();
    let retried = std::process::Command::new(binary())
        .args(["events", "retry", "--config"])
        .arg(config_of(&r, 1))
        .output()
        .expect("run transship");
    assert!(retried.status.success());
    assert!(
        String::from_utf8_lossy(&retried.stderr).contains("2 events queued"),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    wait_until("both dead letters delivered", || {
        r.sql("SELECT count(*) FROM event_dead_letters")[0][0] == "0"
    });
    let (events, _) = delivered(&receiver);
    assert_eq!(
        summary(&events, "local/dead"),
        vec![
            expect("push", Some("v1"), &digest),
            expect("pull", Some("v1"), &digest),
        ]
    );
    assert_eq!(
        delivered_metric(&r, 0),
        Some(2),
        "the deliveries are counted"
    );
}
