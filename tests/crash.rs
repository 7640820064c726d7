//! Crash safety: `kill -9` the real binary repeatedly while clients push and pull
//! concurrently. After every restart each acknowledged push pulls back byte-exact and
//! `transship fsck` finds nothing wrong.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;

/// An image whose push was acknowledged (manifest PUT answered 201).
#[derive(Clone)]
struct Acked {
    repo: String,
    tag: String,
    manifest: Vec<u8>,
    layer_digest: String,
    layer: Vec<u8>,
}

fn pusher(
    base: String,
    worker: u64,
    round: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) {
    let h = Http::new(&base);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let seed = round * 1_000_000 + worker * 10_000 + i;
        let repo = format!("local/crash/w{worker}");
        let tag = format!("r{round}-{i}");
        let layer = random_bytes(64 * 1024 + (seed as usize % 300_000), seed);
        let config = format!(r#"{{"seed":{seed}}}"#);
        // Any step may fail once the server is killed: only a 201 counts as acknowledged.
        let Some(ld) = try_push_blob(&h, &repo, &layer) else {
            return;
        };
        let Some(cd) = try_push_blob(&h, &repo, config.as_bytes()) else {
            return;
        };
        let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())]);
        let Some(r) = try_send(
            &h,
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("content-type", "application/vnd.oci.image.manifest.v1+json")],
            Bytes::from(m.clone()),
        ) else {
            return;
        };
        if r.status == 201 {
            acked.lock().unwrap().push(Acked {
                repo,
                tag,
                manifest: m.into_bytes(),
                layer_digest: ld,
                layer,
            });
        }
    }
}

fn try_send(
    h: &Http,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Option<Resp> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.send(method, path, headers, body)
    }))
    .ok()
}

fn try_push_blob(h: &Http, repo: &str, data: &[u8]) -> Option<String> {
    let digest = sha256(data);
    let r = try_send(
        h,
        "POST",
        &format!("/v2/{repo}/blobs/uploads/"),
        &[],
        Bytes::new(),
    )?;
    let loc = r.header("location")?.to_string();
    let r = try_send(
        h,
        "PUT",
        &format!("{loc}?digest={digest}"),
        &[],
        Bytes::copy_from_slice(data),
    )?;
    (r.status == 201).then_some(digest)
}

#[test]
fn kill_dash_nine_during_concurrent_pushes_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = default_config_in(dir.path());
    let log = dir.path().join("transship.log");
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let rounds = 5;
    // Client threads panic on purpose when the server dies under them: keep those quiet and
    // report everything else (the test's own assertions) as usual.
    let default_hook = Arc::new(std::panic::take_hook());
    let hook = default_hook.clone();
    std::panic::set_hook(Box::new(move |info| {
        if !std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("crash-client"))
        {
            hook(info);
        }
    }));

    for round in 0..rounds {
        let server = BinaryServer::start(&config_path, &log);
        let base = server.url("");
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (b, s, a) = (base.clone(), stop.clone(), acked.clone());
                std::thread::Builder::new()
                    .name(format!("crash-client-{w}"))
                    .spawn(move || pusher(b, w, round, s, a))
                    .expect("spawn")
            })
            .collect();
        // A reader pulling what is already acknowledged, concurrently.
        let reader = {
            let (b, s, a) = (base.clone(), stop.clone(), acked.clone());
            std::thread::Builder::new()
                .name("crash-client-reader".into())
                .spawn(move || {
                    let h = Http::new(&b);
                    while !s.load(Ordering::Relaxed) {
                        let pick = a.lock().unwrap().last().cloned();
                        if let Some(img) = pick
                            && try_send(
                                &h,
                                "GET",
                                &format!("/v2/{}/blobs/{}", img.repo, img.layer_digest),
                                &[],
                                Bytes::new(),
                            )
                            .is_none()
                        {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
                .expect("spawn")
        };
        std::thread::sleep(Duration::from_millis(700 + 250 * round));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.join();
        }
        let _ = reader.join();

        // Restart and verify every acknowledged push.
        let server = BinaryServer::start(&config_path, &log);
        let h = Http::new(&server.url(""));
        let all = acked.lock().unwrap().clone();
        for img in &all {
            let r = h.get(&format!("/v2/{}/manifests/{}", img.repo, img.tag));
            assert_eq!(
                r.status, 200,
                "round {round}: acknowledged {}:{} lost",
                img.repo, img.tag
            );
            assert_eq!(&r.body[..], &img.manifest[..]);
            let r = h.get(&format!("/v2/{}/blobs/{}", img.repo, img.layer_digest));
            assert_eq!(r.body.len(), img.layer.len());
            assert!(r.body == img.layer, "round {round}: layer bytes differ");
        }
        assert!(server.terminate().success(), "clean shutdown on SIGTERM");
        let fsck = std::process::Command::new(binary())
            .args(["fsck", "--config"])
            .arg(&config_path)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "round {round}: fsck found problems:\n{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    let total = acked.lock().unwrap().len();
    assert!(
        total >= rounds as usize,
        "the pushers made too little progress to mean anything ({total} images)"
    );
    eprintln!("crash test: {total} acknowledged images verified across {rounds} kill -9 rounds");
}
