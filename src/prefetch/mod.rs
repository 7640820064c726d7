//! `transship prefetch`: fetch images into the cache before anyone pulls them. When a server
//! runs on the data directory the request goes over its admin socket and the server does the
//! work, so fills are single-flight with the pulls it is serving; otherwise the command opens
//! the store itself and runs the same walk (`proxy::prefetch`) on a local runtime. Either way
//! the work reports `Line`s — progress, one result per image, the end — which the server
//! streams back one JSON line each and the command renders (`progress`).

pub mod progress;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use crate::App;
use crate::config::Config;
use crate::oci::image_ref::PlatformSpec;
use crate::oci::{Digest, RepoName, Tag};
use crate::proxy::prefetch::{self, Event, ImageReport, Mode};

/// What `transship prefetch` asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrefetchRequest {
    pub images: Vec<String>,
    /// `os/arch[/variant]` of an index's children to fetch; empty: all.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Pin what was fetched.
    #[serde(default)]
    pub pin: bool,
}

/// One line of a prefetch's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "line", rename_all = "snake_case")]
pub enum Line {
    Progress {
        event: Event,
    },
    Image {
        report: ImageReport,
    },
    /// `error` names the image.
    Failed {
        image: String,
        error: String,
    },
    /// The request itself cannot run (nothing was fetched).
    Error {
        message: String,
    },
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum PrefetchCommandError {
    #[error("talking to the running server: {0}")]
    Socket(std::io::Error),
    #[error("the server ended the prefetch without finishing it")]
    Truncated,
    #[error(
        "cannot open the store in {dir} (if a transship server is using it, stop it first): {source}"
    )]
    Build {
        dir: String,
        source: crate::BuildError,
    },
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot read the image list {0}: {1}")]
    List(String, std::io::Error),
    #[error("flushing the index: {0}")]
    Flush(crate::store::StoreError),
}

/// Pins a prefetched image (`--pin`): the manifest `digest` in the cache repository
/// `repository`, reached through `tag` if it was asked for by tag.
pub fn pin_prefetched(
    app: &App,
    repository: &RepoName,
    digest: &Digest,
    tag: Option<&Tag>,
) -> Result<(), String> {
    // Exactly what was fetched, with the tag pinned too when there is one, so the digests it
    // moves to while pinned stay. An index fetched for some platforms is pinned whole: what
    // was not fetched is not cached anyway.
    app.store
        .pin_exact(repository, digest, tag)
        .map_err(|e| format!("pinning {repository}: {e}"))
}

/// Runs a request against `app`, reporting to `out`; the last line is `Done` or `Error`.
pub async fn run(app: Arc<App>, req: PrefetchRequest, out: UnboundedSender<Line>) {
    let platforms: Result<Vec<PlatformSpec>, _> = req.platforms.iter().map(|p| p.parse()).collect();
    let platforms = match platforms {
        Ok(p) => p,
        Err(e) => {
            let _ = out.send(Line::Error {
                message: format!("{e}"),
            });
            return;
        }
    };
    let cx = app.proxy_context();
    for image in &req.images {
        let (tx, mut rx) = unbounded_channel();
        let walk = prefetch::prefetch(&cx, image, &platforms, Mode::Pull, Some(tx));
        let forward = async {
            while let Some(event) = rx.recv().await {
                let _ = out.send(Line::Progress { event });
            }
        };
        let (result, ()) = tokio::join!(walk, forward);
        let line = match result {
            Ok(report) if req.pin => match pin(&app, &report).await {
                Ok(()) => Line::Image { report },
                Err(error) => Line::Failed {
                    image: image.clone(),
                    error: format!("{image}: fetched, but cannot pin it: {error}"),
                },
            },
            Ok(report) => Line::Image { report },
            Err(e) => Line::Failed {
                image: image.clone(),
                error: e.to_string(),
            },
        };
        let _ = out.send(line);
    }
    let _ = out.send(Line::Done);
}

/// `pin_prefetched` off the async workers (pinning writes to the index); in the cluster
/// profile the pin is the cluster's (the database's), as `transship cache pin` makes it.
async fn pin(app: &Arc<App>, report: &ImageReport) -> Result<(), String> {
    if let crate::storage::Storage::Cluster(c) = &app.storage {
        let tag = report.tag.as_deref().and_then(|t| t.parse::<Tag>().ok());
        return c
            .db()
            .pin_exact(&report.repository, &report.digest, tag.as_ref())
            .await
            .map_err(|e| format!("pinning {}: {e}", report.repository));
    }
    let (app, r) = (app.clone(), report.clone());
    tokio::task::spawn_blocking(move || {
        let tag = r.tag.as_deref().and_then(|t| t.parse::<Tag>().ok());
        pin_prefetched(&app, &r.repository, &r.digest, tag.as_ref())
    })
    .await
    .map_err(|e| format!("pin task failed: {e}"))?
}

/// Serves a prefetch request that came over the admin socket: runs it on this server and
/// writes each `Line` as it comes. A client that hangs up stops the walk (fills it started
/// still finish).
pub async fn serve_admin(
    app: Arc<App>,
    req: PrefetchRequest,
    mut write: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    tracing::info!(target: "audit", images = ?req.images, platforms = ?req.platforms, pin = req.pin, "audit: prefetch requested");
    let (tx, mut rx) = unbounded_channel();
    let job = run(app, req, tx);
    let pump = async {
        while let Some(line) = rx.recv().await {
            let mut bytes = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
            bytes.push(b'\n');
            write.write_all(&bytes).await?;
        }
        write.shutdown().await
    };
    tokio::pin!(job, pump);
    tokio::select! {
        () = &mut job => pump.await,
        r = &mut pump => r,
    }
}

/// Images per admin-socket request (a reference is at most about 450 bytes, a request line
/// at most 64 KiB).
const IMAGES_PER_REQUEST: usize = 100;

/// Longest silence from the server before the command gives up (a fill may queue for a
/// while, but progress normally comes several times a second).
const READ_TIMEOUT: Duration = Duration::from_secs(600);

/// Sends the request to the server running on `data_dir`, handing each line to `on_line`.
/// `Ok(false)` if no server listens there.
pub fn call_server(
    data_dir: &Path,
    req: &PrefetchRequest,
    on_line: &mut dyn FnMut(Line),
) -> Result<bool, PrefetchCommandError> {
    let Some(mut stream) = crate::admin::connect(data_dir).map_err(PrefetchCommandError::Socket)?
    else {
        return Ok(false);
    };
    let wire = crate::admin::AdminRequest::Prefetch(req.clone());
    let mut line = serde_json::to_vec(&wire).map_err(|e| PrefetchCommandError::Socket(e.into()))?;
    line.push(b'\n');
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| stream.write_all(&line))
        .map_err(PrefetchCommandError::Socket)?;
    for text in BufReader::new(stream).lines() {
        let text = text.map_err(PrefetchCommandError::Socket)?;
        let line: Line = match serde_json::from_str(&text) {
            Ok(l) => l,
            // An older server, or a refusal in the admin socket's own format.
            Err(_) => Line::Error {
                message: admin_error(&text),
            },
        };
        let last = matches!(line, Line::Done | Line::Error { .. });
        on_line(line);
        if last {
            return Ok(true);
        }
    }
    Err(PrefetchCommandError::Truncated)
}

/// The message of an admin-socket answer that is not a prefetch line.
fn admin_error(text: &str) -> String {
    match serde_json::from_str::<crate::admin::AdminResponse>(text) {
        Ok(crate::admin::AdminResponse::Error { message }) => message,
        _ => format!("unexpected answer from the server: {}", text.trim()),
    }
}

/// Runs the request on the store directly (no server running), on a local runtime.
pub fn run_local(
    config: Config,
    req: PrefetchRequest,
    on_line: &mut dyn FnMut(Line),
) -> Result<(), PrefetchCommandError> {
    let dir = config.server.data_dir.display().to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(PrefetchCommandError::Runtime)?;
    let app = App::build(config).map_err(|source| PrefetchCommandError::Build { dir, source })?;
    let a = app.clone();
    runtime.block_on(async move {
        let (tx, mut rx) = unbounded_channel();
        let job = tokio::spawn(run(a, req, tx));
        while let Some(line) = rx.recv().await {
            on_line(line);
        }
        let _ = job.await;
    });
    // Fills are committed (the walk waits for them); make the index durable before exiting.
    app.store.flush().map_err(PrefetchCommandError::Flush)
}

/// Image references from a list file: one per line; blank lines and `#` comments skipped.
pub fn read_list(path: &Path) -> Result<Vec<String>, PrefetchCommandError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| PrefetchCommandError::List(path.display().to_string(), e))?;
    Ok(parse_list(&text))
}

fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The whole command: through the running server if there is one, else locally; progress and
/// the summary rendered. True if every image was prefetched.
pub fn command(config: Config, req: PrefetchRequest) -> Result<bool, PrefetchCommandError> {
    let mut view = progress::Renderer::new(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A long list goes to the server in several requests: each must fit one admin line.
    for (i, images) in req.images.chunks(IMAGES_PER_REQUEST).enumerate() {
        let part = PrefetchRequest {
            images: images.to_vec(),
            ..req.clone()
        };
        if !call_server(&config.server.data_dir, &part, &mut |l| view.line(&l))? {
            if i > 0 {
                // The server went away mid-list: what it did not do is not done.
                return Err(PrefetchCommandError::Truncated);
            }
            run_local(config, req, &mut |l| view.line(&l))?;
            break;
        }
    }
    Ok(view.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_files_skip_blanks_and_comments() {
        let text =
            "# images for site A\nnginx:1.27\n\n  ghcr.io/org/x@sha256:abc  # pinned\n#alpine\n";
        assert_eq!(parse_list(text), ["nginx:1.27", "ghcr.io/org/x@sha256:abc"]);
    }

    #[test]
    fn lines_round_trip_as_json() {
        let line = Line::Failed {
            image: "nginx:1.27".into(),
            error: "no".into(),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(text.contains("\"line\":\"failed\""), "{text}");
        assert!(matches!(
            serde_json::from_str::<Line>(&text).unwrap(),
            Line::Failed { .. }
        ));
        let req = crate::admin::AdminRequest::Prefetch(PrefetchRequest {
            images: vec!["a".into()],
            platforms: vec![],
            pin: true,
        });
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.contains("\"op\":\"prefetch\""), "{text}");
        assert!(matches!(
            serde_json::from_str::<crate::admin::AdminRequest>(&text).unwrap(),
            crate::admin::AdminRequest::Prefetch(_)
        ));
    }
}
