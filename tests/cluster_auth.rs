//! Identities and tokens in the cluster profile, against a real PostgreSQL: two `Authorizer`s
//! over one database, each with its own connection pool, stand for replicas A and B. What is
//! created through A (users, memberships, keys, access tokens, `docker login` refresh tokens)
//! works on B, tokens signed on A verify on B, and what A revokes or deletes B refuses, without
//! restarting B; a change made while B's change feed was cut off is seen once it reconnects.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::engines::Postgres;
use common::test_config;
use transship::auth::keys::{CredentialError, JSON_KEY_USER, Role, Subject, TokenKind};
use transship::auth::scope::Access;
use transship::auth::token::{Credentials, TokenRequest};
use transship::auth::{Action, Authorizer, Denial, Identity, basic_header};
use transship::cluster::identity_records::LISTENER_NAME;
use transship::cluster::pg::{Db, PgOptions};
use transship::config::Config;
use transship::oci::RepoName;
use transship::proxy::route::Router;

/// How long a change may take to reach the other replica before the test fails (it normally
/// takes milliseconds; the bound only keeps a broken feed from hanging the test).
const DEADLINE: Duration = Duration::from_secs(30);

/// A client address outside every project's anonymous networks.
fn remote() -> IpAddr {
    "10.1.2.3".parse().expect("address")
}

/// A fresh database on a PostgreSQL started for the test, and the cluster's config (skipped
/// where PostgreSQL cannot run outside CI).
fn with_cluster<F, Fut>(name: &str, test: F)
where
    F: FnOnce(Arc<Postgres>, String, Config) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if !Postgres::available() {
        return;
    }
    let pg = Arc::new(Postgres::start());
    let dir = tempfile::tempdir().expect("temp dir");
    let config = test_config(dir.path(), "[[project]]\nname = \"team\"\n");
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let url = pg.create_database(name).await;
            test(pg.clone(), url, config).await;
        });
}

/// One replica's authorizer, on a pool of its own.
async fn replica(url: &str, config: &Config) -> Arc<Authorizer> {
    let db = Db::open(&PgOptions {
        url: url.to_string(),
        password: None,
        pool_size: 2,
        ca_roots: None,
    })
    .await
    .expect("open db");
    let router = Arc::new(Router::new(config));
    Arc::new(
        Authorizer::connect(config, &db, router)
            .await
            .expect("connect"),
    )
}

/// Runs an identity change where it must run: on the blocking pool.
async fn change<T: Send + 'static>(
    auth: &Arc<Authorizer>,
    f: impl FnOnce(&transship::auth::keys::Identities) -> T + Send + 'static,
) -> T {
    let auth = auth.clone();
    tokio::task::spawn_blocking(move || f(&auth.identities))
        .await
        .expect("change task")
}

/// Polls `done` until it holds, failing the test after `DEADLINE`.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < DEADLINE,
            "not within {DEADLINE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Basic check on the blocking pool (a password check runs argon2id), without the login
/// throttle: polling with wrong credentials must not lock anyone out.
async fn basic(
    auth: &Arc<Authorizer>,
    user: &str,
    secret: &str,
) -> Result<Subject, CredentialError> {
    let (user, secret) = (user.to_string(), secret.to_string());
    change(auth, move |ids| ids.verify_basic(&user, &secret)).await
}

/// Adds user `name` (password `NAME-password`) through `a` and waits until `b` knows them.
async fn add_user_seen(a: &Arc<Authorizer>, b: &Authorizer, name: &str) {
    let user = name.to_string();
    change(a, move |ids| {
        ids.set_user(&user, &format!("{user}-password"))
    })
    .await
    .expect("set user");
    eventually(&format!("B knows {name}"), async || {
        b.identities.users().iter().any(|u| u.name == name)
    })
    .await;
}

/// An access token for `user`, made through `a`: `(id, token)`.
async fn access_token(a: &Arc<Authorizer>, user: &str) -> (String, String) {
    let subject = Subject::User(user.to_string());
    change(a, move |ids| {
        ids.create_token(&subject, TokenKind::Access, Duration::from_secs(3600), "ci")
    })
    .await
    .expect("access token")
}

fn token_request(credentials: Credentials, offline: bool) -> TokenRequest {
    TokenRequest {
        credentials,
        scopes: vec![Access::new("repository", "team/app", &["pull", "push"])],
        service: None,
        offline,
    }
}

/// Whether `auth` lets the holder of the JWT `jwt` push to team/app from `remote()`.
async fn bearer_may_push(auth: &Authorizer, config: &Config, jwt: &str) -> Result<(), Denial> {
    let header = http::HeaderValue::from_str(&format!("Bearer {jwt}")).expect("header");
    let caller = auth.authenticate(Some(&header), remote(), false).await?;
    assert!(matches!(caller.identity, Identity::Token(_)));
    let repo: RepoName = "team/app".parse().expect("name");
    let router = Router::new(config);
    auth.authorize(&caller, &repo, &router.namespace(&repo, None), Action::Push)
}

#[test]
fn identities_and_tokens_from_one_replica_work_on_another_and_revocations_follow() {
    with_cluster("identities", |_pg, url, config| async move {
        let a = replica(&url, &config).await;
        let b = replica(&url, &config).await;

        // One signing key for the cluster: a token signed on A verifies on B, and back.
        assert_eq!(a.signer.kid(), b.signer.kid());
        let (jwt, claims) = a.signer.issue("x", Vec::new(), Duration::from_secs(60));
        assert_eq!(*b.signer.verify(&jwt).expect("verifies on B"), claims);
        let (jwt, _) = b.signer.issue("y", Vec::new(), Duration::from_secs(60));
        a.signer.verify(&jwt).expect("verifies on A");

        // A user and a membership created through A.
        change(&a, |ids| ids.set_user("alice", "alice-password-1"))
            .await
            .expect("set user");
        change(&a, |ids| ids.set_member("team", "alice", Role::Editor))
            .await
            .expect("set member");
        let alice = Subject::User("alice".into());
        eventually("B knows alice's membership", async || {
            b.identities.role(&alice, "team") == Some(Role::Editor)
        })
        .await;
        // She logs in on B (the real path, with its throttle) and gets a token there.
        let header = http::HeaderValue::from_str(&basic_header("alice", "alice-password-1"))
            .expect("header");
        let caller = b
            .authenticate(Some(&header), remote(), false)
            .await
            .expect("alice logs in on B");
        assert!(matches!(caller.identity, Identity::Subject(ref s) if *s == alice));

        // `docker login` on A: a JWT and a refresh token. B accepts the JWT for a push and
        // exchanges the refresh token.
        let login = a
            .issue_token(
                token_request(
                    Credentials::Password {
                        user: "alice".into(),
                        password: "alice-password-1".into(),
                    },
                    true,
                ),
                remote(),
            )
            .await
            .unwrap_or_else(|_| panic!("login on A"));
        assert_eq!(login.scope, "repository:team/app:pull,push");
        bearer_may_push(&b, &config, &login.token)
            .await
            .expect("A's JWT pushes on B");
        let refresh = login.refresh_token.clone().expect("a refresh token");
        eventually("B exchanges A's refresh token", async || {
            b.issue_token(
                token_request(Credentials::Refresh(refresh.clone()), false),
                remote(),
            )
            .await
            .is_ok()
        })
        .await;
        let renewed = b
            .issue_token(
                token_request(Credentials::Refresh(refresh.clone()), false),
                remote(),
            )
            .await
            .unwrap_or_else(|_| panic!("refresh on B"));
        bearer_may_push(&a, &config, &renewed.token)
            .await
            .expect("B's JWT pushes on A");

        // An access token and a service-account key created on A work on B.
        let (token_id, access) = access_token(&a, "alice").await;
        eventually("B accepts A's access token", async || {
            basic(&b, "oauth2accesstoken", &access).await == Ok(alice.clone())
        })
        .await;
        let key = change(&a, |ids| ids.create_key("team", Role::Viewer, "ci"))
            .await
            .expect("key");
        let key_json = serde_json::to_string(&key).expect("json");
        eventually("B accepts A's key", async || {
            basic(&b, JSON_KEY_USER, &key_json).await.is_ok()
        })
        .await;

        // A password changed on A: B stops taking the old one, though it checked it before
        // (successful checks are cached).
        assert_eq!(
            basic(&b, "alice", "alice-password-1").await,
            Ok(alice.clone())
        );
        change(&a, |ids| ids.set_user("alice", "alice-password-2"))
            .await
            .expect("new password");
        eventually("B refuses alice's old password", async || {
            basic(&b, "alice", "alice-password-1").await == Err(CredentialError::WrongPassword)
        })
        .await;
        assert_eq!(
            basic(&b, "alice", "alice-password-2").await,
            Ok(alice.clone())
        );

        // Revocations on A are refused on B.
        change(&a, move |ids| ids.revoke_token(&token_id))
            .await
            .expect("revoke token");
        eventually("B refuses the revoked access token", async || {
            basic(&b, "oauth2accesstoken", &access).await == Err(CredentialError::UnknownToken)
        })
        .await;
        let key_id = key.private_key_id.clone();
        change(&a, move |ids| ids.revoke_key(&key_id))
            .await
            .expect("revoke key");
        eventually("B refuses the revoked key", async || {
            basic(&b, JSON_KEY_USER, &key_json).await == Err(CredentialError::UnknownKey)
        })
        .await;
        // Removing alice on A ends her refresh token, her membership and her JWTs' rights on B.
        change(&a, |ids| ids.remove_user("alice"))
            .await
            .expect("remove user");
        eventually("B forgets alice", async || {
            b.identities.role(&alice, "team").is_none()
                && b.identities.users().iter().all(|u| u.name != "alice")
        })
        .await;
        assert!(
            b.issue_token(
                token_request(Credentials::Refresh(refresh.clone()), false),
                remote()
            )
            .await
            .is_err(),
            "a removed user's refresh token is refused on B"
        );
        assert!(
            bearer_may_push(&b, &config, &renewed.token).await.is_err(),
            "a removed user's JWT grants nothing on B"
        );
        assert_eq!(
            basic(&b, "alice", "alice-password-2").await,
            Err(CredentialError::UnknownUser)
        );

        // A change run on an async worker instead of the blocking pool fails loudly.
        let misplaced = {
            let a = a.clone();
            tokio::spawn(async move { a.identities.set_user("mallory", "mallory-password") })
        };
        assert!(
            misplaced.await.expect_err("refused").is_panic(),
            "a database write from an async worker must panic, not stall the worker"
        );
    });
}

#[test]
fn a_change_made_while_the_feed_was_cut_off_is_seen_after_it_reconnects() {
    with_cluster("feed", |pg, url, config| async move {
        let a = replica(&url, &config).await;
        let b = replica(&url, &config).await;
        add_user_seen(&a, &b, "bob").await;
        add_user_seen(&a, &b, "carol").await;

        // Cut both replicas' feeds and keep them from reconnecting; the pools keep their
        // open connections.
        let (admin, connection) =
            tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect");
        tokio::spawn(connection);
        admin
            .batch_execute("ALTER DATABASE feed ALLOW_CONNECTIONS false")
            .await
            .expect("disallow connections");
        let listening =
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = 'feed'";
        eventually("both replicas listen", async || {
            admin
                .query(listening, &[&LISTENER_NAME])
                .await
                .expect("feeds")
                .len()
                == 2
        })
        .await;
        let feeds: Vec<i32> = admin
            .query(listening, &[&LISTENER_NAME])
            .await
            .expect("feeds")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(feeds.len(), 2, "one feed per replica");
        for pid in feeds {
            // Waits (up to 10 s) until the backend is gone: no notification reaches it after.
            let gone: bool = admin
                .query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid])
                .await
                .expect("terminate")
                .get(0);
            assert!(gone, "feed {pid} ended");
        }

        // Bob goes while nobody listens: B cannot hear of it (and cannot reconnect), so it
        // still knows bob.
        change(&a, |ids| ids.remove_user("bob"))
            .await
            .expect("remove user");
        assert!(a.identities.users().iter().all(|u| u.name != "bob"));
        assert!(b.identities.users().iter().any(|u| u.name == "bob"));

        // A credential B has not heard of is looked up before it is refused: an access token
        // made on A works on B at once, a made-up one does not.
        let (_, access) = access_token(&a, "carol").await;
        let present = async |token: &str| {
            let header = http::HeaderValue::from_str(&basic_header("oauth2accesstoken", token))
                .expect("header");
            b.authenticate(Some(&header), remote(), false).await
        };
        let caller = present(&access).await.expect("B looks A's new token up");
        assert!(matches!(caller.identity, Identity::Subject(Subject::User(ref u)) if u == "carol"));
        let made_up = format!("tsa_{}_{}", "0".repeat(32), "1".repeat(64));
        assert!(present(&made_up).await.is_err());

        // Once B's feed is back, it reloads and bob is gone there too.
        admin
            .batch_execute("ALTER DATABASE feed ALLOW_CONNECTIONS true")
            .await
            .expect("allow connections");
        eventually("B forgets bob after reconnecting", async || {
            b.identities.users().iter().all(|u| u.name != "bob")
        })
        .await;
        assert_eq!(
            basic(&b, "bob", "bob-password").await,
            Err(CredentialError::UnknownUser)
        );
        // And the feed works again: a change on A arrives on B.
        add_user_seen(&a, &b, "dave").await;
    });
}
