//! Administration of identities (users, service-account keys, access tokens, project members)
//! for the `transship user|key|token|member` commands, and of the notification outbox for
//! `transship events ls|retry`. One request type, applied either by the
//! running server, which listens for it on `<data_dir>/admin.sock` (a Unix socket only its
//! owner may open: file permissions are the authentication), or, when no server runs, directly
//! on the store. Either way the change goes through `Identities`, so a running server never
//! serves from a stale copy. The wire format is one JSON request line and one JSON answer line.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::App;
use crate::auth::keys::{
    AdminError, Identities, KeyFile, KeyInfo, MemberInfo, Role, Subject, TokenInfo, TokenKind,
    UserInfo,
};
use crate::events::listing::EventInfo;
use crate::store::Store;

pub const SOCKET: &str = "admin.sock";

/// The longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    UserSet {
        name: String,
        password: String,
    },
    UserRemove {
        name: String,
    },
    UserList,
    KeyCreate {
        project: String,
        role: Role,
        name: String,
    },
    KeyList,
    KeyRevoke {
        id: String,
    },
    TokenCreate {
        user: String,
        ttl_secs: u64,
        name: String,
    },
    TokenList,
    TokenRevoke {
        id: String,
    },
    MemberSet {
        project: String,
        user: String,
        role: Role,
    },
    MemberRemove {
        project: String,
        user: String,
    },
    MemberList {
        project: String,
    },
    /// `transship cache …`: answered by `cache_admin::apply`, which needs the whole app.
    Cache(crate::cache_admin::CacheRequest),
    /// `transship export` inside the running server.
    Export(crate::airgap::ExportOptions),
    /// `transship import` inside the running server.
    Import(crate::airgap::ImportOptions),
    /// `transship prefetch`: answered with a stream of lines (`crate::prefetch::Line`).
    Prefetch(crate::prefetch::PrefetchRequest),
    EventsList {
        failed: bool,
    },
    EventsRetry {
        endpoint: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    Done,
    Users { users: Vec<UserInfo> },
    Key { key: KeyFile },
    Keys { keys: Vec<KeyInfo> },
    Token { id: String, token: String },
    Tokens { tokens: Vec<TokenInfo> },
    Members { members: Vec<MemberInfo> },
    Cache(crate::cache_admin::CacheAnswer),
    Exported { report: crate::airgap::ExportReport },
    Imported { report: crate::airgap::ImportReport },
    Events { events: Vec<EventInfo> },
    Retried { count: usize },
    Error { message: String },
}

/// Applies one request with the whole app at hand (cache requests need its config and router).
pub fn apply_with_app(app: &App, req: AdminRequest) -> AdminResponse {
    match req {
        AdminRequest::Cache(c) => crate::cache_admin::apply(app, c).map_or_else(
            |e| AdminResponse::Error {
                message: e.to_string(),
            },
            AdminResponse::Cache,
        ),
        req @ (AdminRequest::Export(_) | AdminRequest::Import(_)) => {
            apply_bundle(&app.config, &app.store, req)
        }
        req => apply(&app.auth.identities, &app.store, req),
    }
}

/// Applies one request.
pub fn apply(ids: &Identities, store: &Store, req: AdminRequest) -> AdminResponse {
    let done = |r: Result<(), AdminError>| r.map(|()| AdminResponse::Done);
    let result = match req {
        AdminRequest::UserSet { name, password } => done(ids.set_user(&name, &password)),
        AdminRequest::UserRemove { name } => done(ids.remove_user(&name)),
        AdminRequest::UserList => Ok(AdminResponse::Users { users: ids.users() }),
        AdminRequest::KeyCreate {
            project,
            role,
            name,
        } => ids
            .create_key(&project, role, &name)
            .map(|key| AdminResponse::Key { key }),
        AdminRequest::KeyList => Ok(AdminResponse::Keys { keys: ids.keys() }),
        AdminRequest::KeyRevoke { id } => done(ids.revoke_key(&id)),
        AdminRequest::TokenCreate {
            user,
            ttl_secs,
            name,
        } => ids
            .create_token(
                &Subject::User(user),
                TokenKind::Access,
                Duration::from_secs(ttl_secs),
                &name,
            )
            .map(|(id, token)| AdminResponse::Token { id, token }),
        AdminRequest::TokenList => Ok(AdminResponse::Tokens {
            tokens: ids.tokens(),
        }),
        AdminRequest::TokenRevoke { id } => done(ids.revoke_token(&id)),
        AdminRequest::MemberSet {
            project,
            user,
            role,
        } => done(ids.set_member(&project, &user, role)),
        AdminRequest::MemberRemove { project, user } => done(ids.remove_member(&project, &user)),
        AdminRequest::MemberList { project } => Ok(AdminResponse::Members {
            members: ids.members(&project),
        }),
        AdminRequest::Cache(_) => {
            return AdminResponse::Error {
                message: "cache requests are answered by apply_with_app".into(),
            };
        }
        AdminRequest::Export(_) | AdminRequest::Import(_) => {
            return AdminResponse::Error {
                message: "bundles are exported and imported by `apply_bundle`".into(),
            };
        }
        AdminRequest::Prefetch(_) => Ok(AdminResponse::Error {
            message: "prefetch runs on the server's runtime, not here".into(),
        }),
        AdminRequest::EventsList { failed } => crate::events::listing::list(store, failed)
            .map(|events| AdminResponse::Events { events })
            .map_err(AdminError::from),
        AdminRequest::EventsRetry { endpoint } => store
            .retry_dead_letters(endpoint.as_deref())
            .map(|count| AdminResponse::Retried { count })
            .map_err(AdminError::from),
    };
    result.unwrap_or_else(|e| AdminResponse::Error {
        message: e.to_string(),
    })
}

/// Applies an export or import: long work on the caller's (blocking) thread that takes only
/// the store's short per-commit locks, so serving goes on meanwhile.
pub fn apply_bundle(
    config: &crate::config::Config,
    store: &Store,
    req: AdminRequest,
) -> AdminResponse {
    let result = match req {
        AdminRequest::Export(opts) => crate::airgap::export(config, store, &opts)
            .map(|report| AdminResponse::Exported { report }),
        AdminRequest::Import(opts) => crate::airgap::import(config, store, &opts)
            .map(|report| AdminResponse::Imported { report }),
        _ => {
            return AdminResponse::Error {
                message: "not an export or import".into(),
            };
        }
    };
    result.unwrap_or_else(|e| AdminResponse::Error {
        message: e.to_string(),
    })
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Listens on the admin socket until the process ends. The socket is created with mode 0600
/// (umask-independent: it is bound inside a private temporary directory, then renamed).
pub async fn serve_socket(app: Arc<App>) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = &app.config.server.data_dir;
    let path = socket_path(dir);
    let private = dir.join(format!(".admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join(SOCKET);
    let listener = tokio::net::UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&staged, &path)?;
    let _ = std::fs::remove_dir(&private);
    loop {
        let (stream, _) = listener.accept().await?;
        let app = app.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(app, stream).await {
                tracing::warn!(error = %e, "admin socket request failed");
            }
        });
    }
}

async fn serve_one(app: Arc<App>, stream: tokio::net::UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE))
        .read_line(&mut line)
        .await?;
    let answer = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(AdminRequest::Prefetch(req)) => {
            return crate::prefetch::serve_admin(app, req, write).await;
        }
        Ok(req) => {
            let op = describe(&req);
            let a = app.clone();
            let answer = tokio::task::spawn_blocking(move || apply_with_app(&a, req))
                .await
                .unwrap_or_else(|e| AdminResponse::Error {
                    message: format!("admin task failed: {e}"),
                });
            match &answer {
                AdminResponse::Error { message } => {
                    tracing::info!(target: "audit", op, error = %message, "audit: admin request refused")
                }
                _ => tracing::info!(target: "audit", op, "audit: admin request applied"),
            }
            answer
        }
        Err(e) => AdminResponse::Error {
            message: format!("malformed admin request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// A loggable description: never the password or token.
fn describe(req: &AdminRequest) -> String {
    match req {
        AdminRequest::UserSet { name, .. } => format!("user set {name}"),
        AdminRequest::UserRemove { name } => format!("user remove {name}"),
        AdminRequest::KeyCreate { project, role, .. } => {
            format!("key create {project} {}", role.as_str())
        }
        AdminRequest::KeyRevoke { id } => format!("key revoke {id}"),
        AdminRequest::TokenCreate { user, .. } => format!("token create {user}"),
        AdminRequest::TokenRevoke { id } => format!("token revoke {id}"),
        AdminRequest::MemberSet {
            project,
            user,
            role,
        } => format!("member set {project} {user} {}", role.as_str()),
        AdminRequest::MemberRemove { project, user } => format!("member remove {project} {user}"),
        AdminRequest::Cache(c) => crate::cache_admin::describe(c),
        AdminRequest::Export(o) => format!("export {}", o.out.display()),
        AdminRequest::Import(o) => format!("import {}", o.file.display()),
        AdminRequest::Prefetch(r) => format!("prefetch {}", r.images.join(" ")),
        AdminRequest::EventsRetry { .. } => "events retry".into(),
        AdminRequest::EventsList { .. } => "events list".into(),
        AdminRequest::UserList
        | AdminRequest::KeyList
        | AdminRequest::TokenList
        | AdminRequest::MemberList { .. } => "list".into(),
    }
}

/// Connects to the admin socket of the server running on `data_dir`; `Ok(None)` if none is
/// listening there.
pub fn connect(data_dir: &Path) -> std::io::Result<Option<std::os::unix::net::UnixStream>> {
    match std::os::unix::net::UnixStream::connect(socket_path(data_dir)) {
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sends a request to a running server. `Ok(None)` if none is listening on `data_dir`.
pub fn call(data_dir: &Path, req: &AdminRequest) -> std::io::Result<Option<AdminResponse>> {
    let Some(mut stream) = connect(data_dir)? else {
        return Ok(None);
    };
    // An export or import takes as long as its bytes do; an eviction of many images on a
    // slow disk may take minutes; everything else answers at once.
    let bundle = matches!(req, AdminRequest::Export(_) | AdminRequest::Import(_));
    stream.set_read_timeout((!bundle).then_some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("malformed answer from the server: {e}")))
}
