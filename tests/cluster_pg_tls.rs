//! The cluster profile's PostgreSQL connections over TLS, against a real PostgreSQL 15 with
//! `ssl=on` and a certificate for 127.0.0.1 from a test CA: with `sslmode=require` and that CA
//! as `ca_file` the pool and the dedicated LISTEN connection are encrypted (the server says
//! so in `pg_stat_ssl`); without the CA, or with another one, the connection is refused with
//! an error naming certificate verification (also under the default `sslmode=prefer`: a
//! server that offers TLS is verified, never silently trusted); a real replica serves with
//! every one of its connections encrypted, and the offline admin commands use the same setup.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::engines::{Postgres, SeaweedFs, uuid_like};
use common::tls::Ca;
use common::{BinaryServer, Http, binary, random_bytes, test_config_text};
use transship::cluster::pg::{Db, PgError, PgOptions};

/// A PostgreSQL with TLS on (certificate from `ca`) and a fresh database on it; `None` after
/// a loud skip where PostgreSQL cannot run outside CI.
async fn tls_database(ca: &Ca) -> Option<(Postgres, String)> {
    if !Postgres::available() {
        return None;
    }
    let files = tempfile::Builder::new()
        .prefix("pgtls-cert-")
        .tempdir()
        .expect("tempdir");
    let issued = ca.issue_into(files.path());
    let read = |p: &Path| std::fs::read_to_string(p).expect("issued file");
    let pg = Postgres::start_with_tls(Some((&read(&issued.cert_file), &read(&issued.key_file))));
    let url = pg.create_database(&format!("tls-{}", uuid_like())).await;
    Some((pg, url))
}

fn roots(ca: &Ca) -> rustls::RootCertStore {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("CA PEM"))
        .expect("CA certificate");
    roots
}

async fn open(url: &str, ca_roots: Option<rustls::RootCertStore>) -> Result<Db, PgError> {
    Db::open(&PgOptions {
        url: url.to_string(),
        password: None,
        pool_size: 2,
        ca_roots,
    })
    .await
}

/// Whether the server sees the connection running `client` as encrypted.
async fn is_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

#[tokio::test]
async fn require_with_the_ca_connects_every_connection_over_tls() {
    let ca = Ca::new("database CA");
    let Some((_pg, url)) = tls_database(&ca).await else {
        return;
    };
    let db = open(&format!("{url}?sslmode=require"), Some(roots(&ca)))
        .await
        .expect("open over TLS");
    let client = db.client().await.expect("pooled connection");
    assert!(is_ssl(&client).await, "the pool's connection is not TLS");

    let (listener, connection) = db
        .connect_dedicated("tls-test-listener")
        .await
        .expect("dedicated connection over TLS");
    let task = tokio::spawn(connection);
    assert!(
        is_ssl(&listener).await,
        "the dedicated connection is not TLS"
    );
    // And from the server's side, naming the dedicated connection by its application name.
    let row = client
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'tls-test-listener'",
            &[],
        )
        .await
        .expect("the listener in pg_stat_activity");
    assert!(row.get::<_, bool>(0));
    drop(listener);
    let _ = task.await;
}

#[tokio::test]
async fn a_server_certificate_that_cannot_be_verified_is_refused() {
    let ca = Ca::new("database CA");
    let Some((_pg, url)) = tls_database(&ca).await else {
        return;
    };
    let other = Ca::new("some other CA");
    // No ca_file (web PKI roots only), another CA, and the default `prefer` (the server offers
    // TLS, so its certificate is verified: no quiet fallback to trusting it or to plaintext).
    let cases = [
        (format!("{url}?sslmode=require"), None),
        (format!("{url}?sslmode=require"), Some(roots(&other))),
        (url.clone(), None),
    ];
    for (url, ca_roots) in cases {
        let err = open(&url, ca_roots).await.err().expect("refused");
        assert!(matches!(err, PgError::Certificate(_)), "{url}: {err:?}");
        let message = err.to_string();
        assert!(
            message.contains("certificate failed verification")
                && message.contains("storage.postgres.ca_file"),
            "{message}"
        );
    }
    // The certificate names 127.0.0.1 and localhost only: another name for the same server is
    // refused even with the right CA (`hostaddr` dials the server, the name is verified).
    let with_hostaddr = format!(
        "{}?sslmode=require&hostaddr=127.0.0.1",
        url.replace("127.0.0.1", "db.example.test")
    );
    let err = open(&with_hostaddr, Some(roots(&ca)))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, PgError::Certificate(_)), "{err:?}");
}

#[tokio::test]
async fn disable_is_plaintext_and_require_needs_a_tls_server() {
    let ca = Ca::new("database CA");
    let Some((_pg, url)) = tls_database(&ca).await else {
        return;
    };
    let db = open(&format!("{url}?sslmode=disable"), None)
        .await
        .expect("open without TLS");
    assert!(!is_ssl(&db.client().await.expect("connection")).await);

    let plain = Postgres::start();
    let plain_url = plain.create_database("plain").await;
    let err = open(&format!("{plain_url}?sslmode=require"), Some(roots(&ca)))
        .await
        .err()
        .expect("refused");
    let mut message = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        message = format!("{message}: {c}");
        cause = c.source();
    }
    assert!(message.contains("does not support TLS"), "{message}");
}

/// A replica's config on `s3` and the database at `db_url` trusting `ca_pem`, in `dir`.
fn replica_config(dir: &Path, s3: &SeaweedFs, bucket: &str, db_url: &str, ca_pem: &str) -> String {
    let secret = dir.join("s3-secret");
    std::fs::write(&secret, &s3.secret_access_key).expect("write the S3 secret");
    let ca_file = dir.join("pg-ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write the CA");
    let cluster = format!(
        "[storage.s3]\nendpoint = {:?}\nbucket = {bucket:?}\npath_style = true\n\
         access_key_id = {:?}\nsecret_access_key_file = {:?}\n\n\
         [storage.postgres]\nurl = \"{db_url}?sslmode=require\"\npool_size = 4\nca_file = {:?}\n",
        s3.endpoint,
        s3.access_key_id,
        secret.display().to_string(),
        ca_file.display().to_string(),
    );
    test_config_text(&dir.join("data"), &cluster)
}

/// Runs the binary's `args` with `input` (a file) as its standard input; (success, stdout,
/// stderr).
fn run(args: &[&str], input: &Path) -> (bool, String, String) {
    let out = Command::new(binary())
        .args(args)
        .stdin(std::fs::File::open(input).expect("input file"))
        .output()
        .expect("run transship");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The real binary on a TLS database: it serves pushes and pulls with every connection it
/// holds encrypted (its pool and its identity listener); with the replica stopped, the
/// offline admin commands connect the same way, and refuse a database their CA does not vouch
/// for; a replica does not start on it either.
#[test]
fn a_replica_and_the_offline_commands_use_tls() {
    if !SeaweedFs::available() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = Ca::new("database CA");
    let Some((_pg, db_url)) = rt.block_on(tls_database(&ca)) else {
        return;
    };
    let s3 = SeaweedFs::start();
    let bucket = format!("ts-{}", uuid_like());
    s3.create_bucket(&bucket);
    let dir = tempfile::Builder::new()
        .prefix("pgtls-")
        .tempdir()
        .expect("tempdir");
    let config = dir.path().join("transship.toml");
    std::fs::write(
        &config,
        replica_config(dir.path(), &s3, &bucket, &db_url, &ca.pem),
    )
    .expect("write config");

    let server = BinaryServer::start(&config, &dir.path().join("log"));
    let http = Http::new(&server.url(""));
    let data = random_bytes(300_000, 13);
    let digest = http.push_blob("local/app", &data);
    let got = http.get(&format!("/v2/local/app/blobs/{digest}"));
    assert_eq!(got.status, 200);
    assert!(got.body.as_ref() == data.as_slice(), "blob differs");

    // Every connection the replica holds, seen from the server: all encrypted, the identity
    // listener among them (it connects in the background: wait for it).
    let db = rt
        .block_on(open(&format!("{db_url}?sslmode=require"), Some(roots(&ca))))
        .expect("open");
    let database = db_url
        .rsplit('/')
        .next()
        .expect("database name")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let connections = loop {
        let rows: Vec<(String, bool)> = rt.block_on(async {
            let client = db.client().await.expect("connection");
            client
                .query(
                    "SELECT a.application_name, s.ssl FROM pg_stat_activity a \
                     JOIN pg_stat_ssl s USING (pid) \
                     WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
                    &[&database],
                )
                .await
                .expect("pg_stat_activity")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        });
        if rows.iter().any(|(name, _)| name == "transship-identities") {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "no identity listener connected: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        connections.iter().all(|(_, ssl)| *ssl),
        "a connection without TLS: {connections:?}"
    );
    assert!(
        connections.iter().any(|(name, _)| name == "transship"),
        "{connections:?}"
    );
    drop(db);
    server.terminate();

    let config_arg = config.display().to_string();
    let password = dir.path().join("password");
    std::fs::write(&password, "alice-secret-1\n").expect("write the password");
    let nothing = Path::new("/dev/null");
    let (ok, _, err) = run(&["user", "add", "alice", "-c", &config_arg], &password);
    assert!(ok, "offline user add: {err}");
    let (ok, out, err) = run(&["user", "list", "-c", &config_arg], nothing);
    assert!(ok && out.contains("alice"), "offline user list: {out}{err}");

    // The same commands trusting another CA: refused, saying why.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("dir");
    let other_config = other.join("transship.toml");
    std::fs::write(
        &other_config,
        replica_config(&other, &s3, &bucket, &db_url, &Ca::new("another CA").pem),
    )
    .expect("write config");
    let (ok, out, err) = run(
        &["user", "list", "-c", &other_config.display().to_string()],
        nothing,
    );
    assert!(!ok, "listed with an untrusted certificate: {out}");
    assert!(err.contains("certificate failed verification"), "{err}");
    // And a replica refuses to start on it.
    let (ok, out, err) = run(
        &["serve", "--config", &other_config.display().to_string()],
        nothing,
    );
    assert!(!ok, "served with an untrusted certificate: {out}");
    assert!(
        err.contains("[storage.postgres]") && err.contains("certificate failed verification"),
        "{err}"
    );
}
