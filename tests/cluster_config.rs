//! `[storage.s3]` and `[storage.postgres]` as an operator meets them: `check-config` validates
//! them (together or not at all, a readable secret file, a valid bucket name, no password in
//! the database URL) without ever printing a secret, and `serve` stops with a clear error when
//! the database cannot be reached, before creating anything in its data directory.

mod common;

use std::path::Path;
use std::process::Command;

use common::binary;

/// Runs the binary with the AWS variables cleared (unless `env` sets them).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run transship");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SECRET: &str = "s3-secret-never-printed";

/// A config file in `dir` with the given storage tables.
fn config(dir: &Path, storage: &str) -> String {
    let path = dir.join("transship.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\n\n{storage}",
            dir.join("data").display().to_string()
        ),
    )
    .expect("write config");
    path.display().to_string()
}

fn s3_table(dir: &Path, bucket: &str) -> String {
    let secret = dir.join("s3-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret file");
    format!(
        "[storage.s3]\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"{bucket}\"\nprefix = \"reg\"\naccess_key_id = \"transship\"\nsecret_access_key_file = {:?}\n\n",
        secret.display().to_string()
    )
}

const PG_TABLE: &str = "[storage.postgres]\nurl = \"postgres://transship@127.0.0.1:9/transship\"\n";

#[test]
fn check_config_accepts_both_tables_and_never_prints_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config(
        dir.path(),
        &format!("{}{PG_TABLE}", s3_table(dir.path(), "transship-blobs")),
    );
    let (code, out, err) = run(&["check-config", &file], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("[storage.s3]")
            && out.contains("bucket = \"transship-blobs\"")
            && out.contains("read_cache_max_size = \"10GiB\""),
        "{out}"
    );
    assert!(
        out.contains("[storage.postgres]") && out.contains("pool_size = 16"),
        "{out}"
    );
    assert!(!out.contains(SECRET) && !err.contains(SECRET));

    // Credentials from the environment instead of the table.
    let file = config(
        dir.path(),
        &format!(
            "[storage.s3]\nendpoint = \"https://s3.example.test\"\nbucket = \"blobs\"\n\n{PG_TABLE}"
        ),
    );
    let (code, _, err) = run(&["check-config", &file], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    let (code, out, err) = run(
        &["check-config", &file],
        &[
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains(SECRET) && !err.contains(SECRET));
}

#[test]
fn check_config_refuses_broken_cluster_tables_with_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = s3_table(dir.path(), "transship-blobs");
    let cases = [
        (s3.clone(), "go together"),
        (PG_TABLE.to_string(), "go together"),
        (
            format!("{}{PG_TABLE}", s3_table(dir.path(), "Bad_Bucket")),
            "not a valid bucket name",
        ),
        (
            format!(
                "{}{PG_TABLE}",
                s3.replace("s3-secret\"", "missing-secret\"")
            ),
            "cannot read",
        ),
        (
            format!("{s3}[storage.postgres]\nurl = \"postgres://u:pw@127.0.0.1/db\"\n"),
            "password_file",
        ),
        (
            format!("{s3}{PG_TABLE}pool_size = 0\n"),
            "pool_size must be at least 1",
        ),
        (
            format!(
                "{}{PG_TABLE}",
                s3.replace("http://127.0.0.1:9", "ftp://127.0.0.1:9")
            ),
            "storage.s3.endpoint",
        ),
        (
            format!(
                "{}{PG_TABLE}",
                s3.replace("prefix = \"reg\"", "prefix = \"/reg/\"")
            ),
            "storage.s3.prefix",
        ),
        (
            format!("[storage]\nreplica_url = \"http://u:pw@10.0.0.5:5000\"\n{s3}{PG_TABLE}"),
            "storage.replica_url",
        ),
        (
            format!("[storage]\nreplica_url = \"http://10.0.0.5:5000/x\"\n{s3}{PG_TABLE}"),
            "storage.replica_url",
        ),
        (
            format!("[storage]\nfill_lease = \"100ms\"\n{s3}{PG_TABLE}"),
            "fill_lease must be at least 1s",
        ),
        (
            format!("{s3}read_cache_max_size = \"0\"\n{PG_TABLE}"),
            "read_cache_max_size must be more than 0",
        ),
    ];
    for (storage, expected) in cases {
        let file = config(dir.path(), &storage);
        let (code, _, err) = run(&["check-config", &file], &[]);
        assert_eq!(code, 2, "accepted:\n{storage}");
        assert!(err.contains(expected), "{expected:?} not in {err}");
        assert!(!err.contains(SECRET) && !err.contains("pw@"), "{err}");
    }
}

/// Replicas reach each other's fills at `storage.replica_url`, by default the listen address:
/// a wildcard listen address names none, so it needs the key.
#[test]
fn a_wildcard_listen_address_needs_a_replica_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tables = format!("{}{PG_TABLE}", s3_table(dir.path(), "transship-blobs"));
    let file = config(dir.path(), &tables);
    let wildcard = |storage: &str| {
        let text = std::fs::read_to_string(&file).expect("config");
        let text = text.replace("127.0.0.1:0", "0.0.0.0:5000");
        std::fs::write(&file, text.replace(&tables, &format!("{storage}{tables}")))
            .expect("write config");
        run(&["check-config", &file], &[])
    };
    let (code, _, err) = wildcard("");
    assert_eq!(code, 2);
    assert!(err.contains("storage.replica_url"), "{err}");
    let (code, out, err) = wildcard("[storage]\nreplica_url = \"http://10.0.0.5:5000/\"\n");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("replica_url = \"http://10.0.0.5:5000/\""),
        "{out}"
    );
}

#[test]
fn serve_stops_when_the_database_cannot_be_reached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = config(
        dir.path(),
        &format!("{}{PG_TABLE}", s3_table(dir.path(), "transship-blobs")),
    );
    let (code, out, err) = run(&["serve", "--config", &file], &[]);
    assert_ne!(code, 0, "serve started: {out}{err}");
    assert!(
        err.contains("cluster profile") && err.contains("[storage.postgres]"),
        "{err}"
    );
    assert!(!err.contains(SECRET) && !err.contains("pw@"), "{err}");
    // It stopped before opening anything: no local store was created in data_dir.
    assert!(!dir.path().join("data").exists());
}

/// `storage.postgres.ca_file` is checked by `check-config`: readable, PEM, CA certificates in
/// it, and only beside `sslmode=require` (TLS the operator asked for must not be optional).
#[test]
fn check_config_checks_the_databases_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = s3_table(dir.path(), "transship-blobs");
    let ca = common::tls::Ca::new("database CA");
    let ca_file = dir.path().join("pg-ca.pem");
    std::fs::write(&ca_file, &ca.pem).expect("write the CA");
    let not_pem = dir.path().join("not-pem.txt");
    std::fs::write(&not_pem, "just text\n").expect("write");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let table = |url: &str, ca: &Path| {
        format!(
            "{s3}[storage.postgres]\nurl = {url:?}\nca_file = {:?}\n",
            ca.display().to_string()
        )
    };
    let url = "postgres://transship@db.example.test/transship?sslmode=require";

    let file = config(dir.path(), &table(url, &ca_file));
    let (code, out, err) = run(&["check-config", &file], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ca_file = "), "{out}");

    let cases = [
        (table(url, &dir.path().join("missing.pem")), "cannot read"),
        (table(url, &not_pem), "holds no CERTIFICATE block"),
        (table(url, &garbage), "not a usable PEM bundle"),
        (
            table(
                "postgres://transship@db.example.test/transship?sslmode=disable",
                &ca_file,
            ),
            "sslmode=require",
        ),
        (
            table("postgres://transship@db.example.test/transship", &ca_file),
            "sslmode=require",
        ),
        (
            table(
                "postgres://transship@db.example.test/transship?sslmode=prefer",
                &ca_file,
            ),
            "sslmode=require",
        ),
    ];
    for (storage, expected) in cases {
        let file = config(dir.path(), &storage);
        let (code, _, err) = run(&["check-config", &file], &[]);
        assert_eq!(code, 2, "accepted:\n{storage}");
        assert!(
            err.contains("storage.postgres.ca_file") && err.contains(expected),
            "{expected:?} not in {err}"
        );
    }
}
