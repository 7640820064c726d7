//! The `transship` command line: serve, check-config, gc, fsck, the user, key, token,
//! member and events administration commands, cache, prefetch, and bundle export/import.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use transship::admin::{AdminRequest, AdminResponse};
use transship::auth::keys::{Identities, Role, TokenKind};
use transship::auth::token::rfc3339;
use transship::config::{Config, HumanDuration, LogFormat};
use transship::{App, store_options};

mod cache_cli;

/// A container registry appliance: a pull-through cache for Docker Hub and other registries,
/// and a private OCI registry under PROJECT/IMAGE names, on one storage engine.
#[derive(Parser)]
#[command(name = "transship", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry. With no options: the embedded defaults (listen 127.0.0.1:5000, data
    /// in ./transship-data, project `local` open to anonymous push from loopback, docker.io
    /// declared as the default upstream).
    Serve(ConfigArgs),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Collect garbage now: remove blobs no manifest references (after the grace period),
    /// orphan files and stale ingest files. Stop the server first; it runs GC online itself
    /// every `gc.interval`.
    Gc(ConfigArgs),
    /// Re-hash every blob and check every index reference. Exits 1 if problems are found.
    /// Stop the server first.
    Fsck {
        #[command(flatten)]
        config: ConfigArgs,
        /// Fix what can be fixed safely (corrupt blobs move to quarantine/, dangling index
        /// entries are removed); every fix is printed.
        #[arg(long)]
        repair: bool,
    },
    /// Manage users (stored in the index; `[[user]]` entries of the config are listed too).
    /// These commands work whether or not the server is running.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage service-account keys: JSON key files for `docker login -u _json_key`.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage access tokens: passwords for `docker login -u oauth2accesstoken`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage project members and their roles (owner, editor, viewer).
    #[command(subcommand)]
    Member(MemberCommand),
    /// The pull-through cache: list what is cached, evict, pin, and show tag history. Works
    /// whether or not the server is running (in the cluster profile: through a running
    /// replica, on the shared cache).
    #[command(subcommand)]
    Cache(cache_cli::CacheCommand),
    /// Write images from the store to a bundle: an OCI image layout in a tar (`.tar`, or
    /// zstd-compressed `.tar.zst`), plus FILE.state.json for later deltas. Works whether or not
    /// the server is running (in the cluster profile: through a running replica, from its own
    /// copy of the cache only).
    Export(ExportArgs),
    /// Import a bundle written by `transship export`: verified whole before anything is
    /// committed. Works whether or not the server is running (in the cluster profile: through
    /// a running replica, into its own copy of the cache only).
    Import(ImportArgs),
    /// Fetch images into the cache through their upstreams, as a pull would (by tag or
    /// digest; for an index, the --platform children or all). Works through the running
    /// server, or on the store when none runs. Exits 1 if any image failed.
    Prefetch {
        /// Image references: nginx:1.27, docker.io/library/nginx:1.27, ghcr.io/org/x@sha256:…
        images: Vec<String>,
        /// A file of image references, one per line (# comments).
        #[arg(long)]
        file: Option<PathBuf>,
        /// os/arch[/variant] to fetch of an index (repeatable; default: every platform).
        #[arg(long = "platform")]
        platforms: Vec<String>,
        /// Pin the prefetched images.
        #[arg(long)]
        pin: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Notification events: what the outbox still holds for each `[[notify]]` endpoint, what
    /// was dead-lettered, and sending dead letters again.
    #[command(subcommand)]
    Events(EventsCommand),
}

#[derive(Args)]
struct ExportArgs {
    /// The bundle to write (`.tar` or `.tar.zst`).
    #[arg(long)]
    out: PathBuf,
    /// Images as clients pull them: NAME[:TAG|@DIGEST] (`nginx:1.27`,
    /// `docker.io/library/nginx:1.27`, `local/app:v1`).
    images: Vec<String>,
    /// Every tag in the store.
    #[arg(long)]
    all: bool,
    /// Every pinned tag and digest of the cache (`transship cache pins`).
    #[arg(long)]
    pinned: bool,
    /// Only these platforms of multi-platform cache images (os/arch[/variant]; repeatable).
    #[arg(long = "platform")]
    platforms: Vec<String>,
    /// A delta: leave out what the export that wrote this state file (and its own
    /// predecessors) carried.
    #[arg(long)]
    since: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Args)]
struct ImportArgs {
    /// The bundle (`.tar` or `.tar.zst`).
    file: PathBuf,
    /// Do not pin the imported images.
    #[arg(long)]
    no_pin: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// List events not yet delivered, per endpoint (with --failed: dead letters).
    Ls {
        #[arg(long)]
        failed: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Deliver dead-lettered events again (each gets another max_age of attempts).
    Retry {
        /// Only this endpoint's (its name, or its URL when it has none).
        #[arg(long)]
        endpoint: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user, or set a stored user's password. The password is read from standard input
    /// (one line; prompted for without echo on a terminal).
    Add {
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove a stored user, with their memberships and tokens.
    Remove {
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List users.
    List(ConfigArgs),
    /// Print the argon2id hash of a password read from standard input, for a `[[user]]`
    /// `password_hash` in the config file.
    Hash,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a service-account key for a project and write its JSON key file (mode 0600).
    Create {
        #[arg(long)]
        project: String,
        /// owner, editor or viewer.
        #[arg(long)]
        role: Role,
        /// A label for listings.
        #[arg(long, default_value = "")]
        name: String,
        /// Where to write the key file; `-` prints it. An existing file is not overwritten.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List keys (never their secrets).
    List(ConfigArgs),
    /// Revoke a key: its key file stops working at once, with the refresh tokens it obtained.
    Revoke {
        id: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create an access token for a user and print it (shown once; only its hash is kept).
    Create {
        #[arg(long)]
        user: String,
        /// Lifetime: "30m", "1h", "7d".
        #[arg(long, default_value = "1h")]
        ttl: HumanDuration,
        /// A label for listings.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List access and refresh tokens (never the tokens themselves).
    List(ConfigArgs),
    /// Revoke a token by id.
    Revoke {
        id: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
enum MemberCommand {
    /// Give a user a role in a project (replacing a stored role they had).
    Add {
        #[arg(long)]
        project: String,
        #[arg(long)]
        user: String,
        /// owner, editor or viewer.
        #[arg(long)]
        role: Role,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Remove a stored membership (config-file roles stay).
    Remove {
        #[arg(long)]
        project: String,
        #[arg(long)]
        user: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List a project's members.
    List {
        #[arg(long)]
        project: String,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Args)]
pub(crate) struct ConfigArgs {
    /// Config file (TOML). Default: the embedded configuration (see config/transship.toml).
    #[arg(long, short = 'c', env = "TRANSSHIP_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding server.listen.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory, overriding server.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    pub(crate) fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::embedded(),
        };
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(dir) = &self.data_dir {
            config.server.data_dir = dir.clone();
        }
        Ok(config)
    }
}

/// Logging to standard output; the returned flusher writes out buffered access lines when
/// dropped, so it must live until the server has stopped.
fn init_logging(format: LogFormat) -> std::io::Result<transship::log_writer::Flusher> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: log files and pipelines get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    // Access lines are buffered off the request path; every other line is written at once.
    let (writer, flusher) = transship::log_writer::stdout(transship::log_writer::DEFAULT_CAPACITY)?;
    writer.install_access(matches!(format, LogFormat::Json));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(flusher)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("transship: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.load()?;
            let _flusher = init_logging(config.server.log_format)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            print!("{}", config.to_toml());
            eprintln!("{}: valid", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc(args) => {
            let config = args.load()?;
            let store = open_store_offline(&config)?;
            let report = store.collect_garbage()?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        cmd @ (Command::User(_)
        | Command::Key(_)
        | Command::Token(_)
        | Command::Member(_)
        | Command::Events(_)) => run_admin(cmd),
        Command::Cache(cmd) => cache_cli::run(cmd),
        Command::Export(a) => {
            let opts = transship::airgap::ExportOptions {
                out: std::path::absolute(&a.out)?,
                images: a.images,
                all: a.all,
                pinned: a.pinned,
                platforms: a.platforms,
                since: a.since.map(std::path::absolute).transpose()?,
            };
            run_bundle(&a.config, AdminRequest::Export(opts))
        }
        Command::Import(a) => {
            let opts = transship::airgap::ImportOptions {
                file: std::path::absolute(&a.file)?,
                no_pin: a.no_pin,
            };
            run_bundle(&a.config, AdminRequest::Import(opts))
        }
        Command::Prefetch {
            mut images,
            file,
            platforms,
            pin,
            config,
        } => {
            let config = config.load()?;
            if let Some(file) = file {
                images.extend(transship::prefetch::read_list(&file)?);
            }
            if images.is_empty() {
                anyhow::bail!("no images given (name them, or --file LIST)");
            }
            let req = transship::prefetch::PrefetchRequest {
                images,
                platforms,
                pin,
            };
            Ok(if transship::prefetch::command(config, req)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Fsck { config, repair } => {
            let config = config.load()?;
            let store = open_store_offline(&config)?;
            let report = store.fsck_with(repair, &|repo| config.project(repo).is_none())?;
            for p in &report.problems {
                println!("problem: {p}");
            }
            for n in &report.notes {
                println!("note: {n}");
            }
            for r in &report.repairs {
                println!("repaired: {r}");
            }
            println!(
                "checked {} blobs ({} bytes) and {} manifests: {} problems, {} repairs",
                report.blobs_checked,
                report.bytes_checked,
                report.manifests_checked,
                report.problems.len(),
                report.repairs.len()
            );
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn run_admin(cmd: Command) -> anyhow::Result<ExitCode> {
    let (config, req) = match cmd {
        Command::User(UserCommand::Hash) => {
            let password = read_secret("Password: ")?;
            println!("{}", transship::auth::keys::hash_password(&password));
            return Ok(ExitCode::SUCCESS);
        }
        Command::User(UserCommand::Add { name, config }) => {
            let password = read_secret(&format!("Password for {name}: "))?;
            (config, AdminRequest::UserSet { name, password })
        }
        Command::User(UserCommand::Remove { name, config }) => {
            (config, AdminRequest::UserRemove { name })
        }
        Command::User(UserCommand::List(config)) => (config, AdminRequest::UserList),
        Command::Key(KeyCommand::Create {
            project,
            role,
            name,
            out,
            config,
        }) => {
            if out.as_os_str() != "-" && out.exists() {
                anyhow::bail!("{} exists; choose another --out", out.display());
            }
            let answer = admin(
                &config,
                AdminRequest::KeyCreate {
                    project,
                    role,
                    name,
                },
            )?;
            let AdminResponse::Key { key } = answer else {
                anyhow::bail!("unexpected answer from the server");
            };
            let json = serde_json::to_string_pretty(&key)? + "\n";
            if out.as_os_str() == "-" {
                print!("{json}");
            } else {
                transship::auth::jwt::write_private(&out, json.as_bytes())
                    .with_context(|| format!("writing {}", out.display()))?;
                eprintln!(
                    "created key {} ({} in {}); key file: {}",
                    key.private_key_id,
                    key.role.as_str(),
                    key.project_id,
                    out.display()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Key(KeyCommand::List(config)) => (config, AdminRequest::KeyList),
        Command::Key(KeyCommand::Revoke { id, config }) => (config, AdminRequest::KeyRevoke { id }),
        Command::Token(TokenCommand::Create {
            user,
            ttl,
            name,
            config,
        }) => (
            config,
            AdminRequest::TokenCreate {
                user,
                ttl_secs: ttl.0.as_secs(),
                name,
            },
        ),
        Command::Token(TokenCommand::List(config)) => (config, AdminRequest::TokenList),
        Command::Token(TokenCommand::Revoke { id, config }) => {
            (config, AdminRequest::TokenRevoke { id })
        }
        Command::Member(MemberCommand::Add {
            project,
            user,
            role,
            config,
        }) => (
            config,
            AdminRequest::MemberSet {
                project,
                user,
                role,
            },
        ),
        Command::Member(MemberCommand::Remove {
            project,
            user,
            config,
        }) => (config, AdminRequest::MemberRemove { project, user }),
        Command::Member(MemberCommand::List { project, config }) => {
            (config, AdminRequest::MemberList { project })
        }
        Command::Events(EventsCommand::Ls { failed, config }) => {
            (config, AdminRequest::EventsList { failed })
        }
        Command::Events(EventsCommand::Retry { endpoint, config }) => {
            (config, AdminRequest::EventsRetry { endpoint })
        }
        _ => anyhow::bail!("not an administration command"),
    };
    match admin(&config, req)? {
        AdminResponse::Done => eprintln!("done"),
        AdminResponse::Users { users } => {
            for u in users {
                println!("{}\t{}", u.name, u.source);
            }
        }
        AdminResponse::Keys { keys } => {
            for k in keys {
                println!(
                    "{}\t{}\t{}\t{}\tcreated {}",
                    k.id,
                    k.project,
                    k.role.as_str(),
                    k.name,
                    rfc3339(k.created)
                );
            }
        }
        AdminResponse::Token { id, token } => {
            eprintln!("created token {id}; use it as the password of user oauth2accesstoken");
            println!("{token}");
        }
        AdminResponse::Tokens { tokens } => {
            for t in tokens {
                let kind = match t.kind {
                    TokenKind::Access => "access",
                    TokenKind::Refresh => "refresh",
                };
                println!(
                    "{}\t{kind}\t{}\t{}\texpires {}",
                    t.id,
                    t.subject,
                    t.name,
                    rfc3339(t.expires)
                );
            }
        }
        AdminResponse::Members { members } => {
            for m in members {
                println!(
                    "{}\t{}\t{}\t{}",
                    m.project,
                    m.user,
                    m.role.as_str(),
                    m.source
                );
            }
        }
        AdminResponse::Events { events } => {
            for e in events {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}{}",
                    e.endpoint,
                    e.id,
                    e.time,
                    e.action,
                    e.repository,
                    e.tag.as_deref().unwrap_or("-"),
                    e.digest.as_deref().unwrap_or("-"),
                    if e.retrying { "\tretrying" } else { "" }
                );
            }
        }
        AdminResponse::Retried { count } => eprintln!("{count} events queued for redelivery"),
        AdminResponse::Key { .. }
        | AdminResponse::Exported { .. }
        | AdminResponse::Imported { .. }
        | AdminResponse::Cache(_)
        | AdminResponse::Error { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Sends an administration request to the running server, or applies it to the store
/// directly when no server runs.
fn admin(args: &ConfigArgs, req: AdminRequest) -> anyhow::Result<AdminResponse> {
    let config = args.load()?;
    let answer = match transship::admin::call(&config.server.data_dir, &req)
        .context("talking to the running server")?
    {
        Some(answer) => answer,
        None if config.storage.is_cluster() => admin_cluster_offline(&config, req)?,
        None => {
            let store = std::sync::Arc::new(open_store_offline(&config)?);
            if let AdminRequest::Export(_) | AdminRequest::Import(_) = req {
                transship::admin::apply_bundle(&config, &store, req)
            } else {
                let ids = Identities::load(&config, &store)?;
                transship::admin::apply(&ids, &store, req)
            }
        }
    };
    if let AdminResponse::Error { message } = answer {
        anyhow::bail!(message);
    }
    Ok(answer)
}

/// An admin command with no replica running here, in the cluster profile: identities are the
/// cluster's (in its database, seen by every replica at once); events are this replica's.
fn admin_cluster_offline(config: &Config, req: AdminRequest) -> anyhow::Result<AdminResponse> {
    if let AdminRequest::Export(_) | AdminRequest::Import(_) = req {
        anyhow::bail!(
            "air-gap bundles work on the local profile's data directory only; the cluster profile has no offline export or import yet"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    if let AdminRequest::EventsList { .. } | AdminRequest::EventsRetry { .. } = req {
        return runtime.block_on(async {
            let db = transship::storage::cluster_setup::open_db(config).await?;
            anyhow::Ok(transship::events::listing::apply_cluster(&db, req).await)
        });
    }
    let ids = runtime.block_on(async {
        let db = transship::storage::cluster_setup::open_db(config).await?;
        let records = transship::auth::record_store::RecordStore::cluster(
            db,
            tokio::runtime::Handle::current(),
        );
        anyhow::Ok(Identities::load_from(config, records).await?)
    })?;
    let store = open_store_offline(config)?;
    // Identity writes wait on the runtime from this thread, outside `block_on`.
    Ok(transship::admin::apply(&ids, &store, req))
}

/// An export or import: by the running server (paths made absolute for it), or on the store
/// directly when no server runs.
fn run_bundle(args: &ConfigArgs, req: AdminRequest) -> anyhow::Result<ExitCode> {
    match admin(args, req)? {
        AdminResponse::Exported { report } => println!("{report}"),
        AdminResponse::Imported { report } => println!("{report}"),
        _ => anyhow::bail!("unexpected answer from the server"),
    }
    Ok(ExitCode::SUCCESS)
}

/// One line from standard input; on a terminal, prompted for with echo off.
fn read_secret(prompt: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut saved = None;
    if tty {
        eprint!("{prompt}");
        std::io::stderr().flush().ok();
        // SAFETY: termios calls on fd 0 with a zeroed, then filled, struct.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) == 0 {
                saved = Some(t);
                t.c_lflag &= !libc::ECHO;
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        // SAFETY: restores the attributes read above.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
        eprintln!();
    }
    read.context("reading the password from standard input")?;
    let secret = line.trim_end_matches(['\r', '\n']).to_string();
    if secret.is_empty() {
        anyhow::bail!("no password given on standard input");
    }
    Ok(secret)
}

fn open_store_offline(config: &Config) -> anyhow::Result<transship::store::Store> {
    transship::store::Store::open(&config.server.data_dir, store_options(config)).with_context(
        || {
            format!(
                "cannot open the store in {} (if a transship server is using it, stop it first)",
                config.server.data_dir.display()
            )
        },
    )
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.server.listen;
    let app = App::connect(config)
        .await
        .context("cannot open the store")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    // With port 0 the kernel picks one: log the address actually bound.
    let listen = listener.local_addr()?;
    // The cluster profile: other replicas reach this one's fills here (unless configured).
    if let Some(cluster) = app.proxy.cluster() {
        cluster.bound(listen, app.tls.is_some());
    }
    let open = app.auth.open_to_the_network();
    if !open.is_empty() {
        tracing::warn!(projects = ?open, "these projects accept anonymous pushes from outside loopback");
    }
    if !listen.ip().is_loopback() {
        tracing::warn!(%listen, "listening beyond loopback: anonymous push is limited to each project's anonymous_from networks");
        let pushers = app.auth.anonymous_push_projects();
        if !pushers.is_empty() {
            tracing::warn!(%listen, projects = ?pushers, trusted_proxies = ?app.config.server.trusted_proxies, "anonymous push is on and transship listens beyond loopback: a reverse proxy inside anonymous_from must be listed in server.trusted_proxies, or every client it forwards gets anonymous push");
        }
    }
    if app.auth.pushes_locked() {
        tracing::warn!(%listen, "no users are configured and transship listens beyond loopback: pushes are refused until one is created with `transship user add`");
    }
    let background = transship::maintenance::Supervisor::start(&app);
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    tracing::info!(%listen, scheme, data_dir = %app.config.server.data_dir.display(), "transship serving");
    let store = app.store.clone();
    let systemd = transship::systemd::Service::ready(move || {
        let (bytes, blobs) = store.usage();
        format!("serving on {listen}; {blobs} blobs, {bytes} bytes stored")
    });
    let stop = async {
        shutdown_signal().await;
        if let Some(s) = &systemd {
            s.stopping();
        }
    };
    transship::http::server::serve(app.clone(), listener, stop).await?;
    // Background jobs stop between units of work; only then is the index flushed.
    background
        .shutdown(app.config.server.shutdown_timeout.0)
        .await;
    app.store.flush().context("flushing the index")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
