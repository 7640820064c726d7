//! The `transship` command line: serve, check-config, gc, fsck.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use transship::config::{Config, LogFormat};
use transship::{App, store_options};

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
}

#[derive(Args)]
struct ConfigArgs {
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
    fn load(&self) -> anyhow::Result<Config> {
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: log files and pipelines get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
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
            init_logging(config.server.log_format);
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
        Command::Fsck { config, repair } => {
            let config = config.load()?;
            let store = open_store_offline(&config)?;
            let auth = transship::auth::Authorizer::new(&config);
            let report = store.fsck_with(repair, &|repo| {
                matches!(auth.namespace(repo), transship::auth::Namespace::Mirror)
            })?;
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
    let app = App::build(config).context("cannot open the store")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    // With port 0 the kernel picks one: log the address actually bound.
    let listen = listener.local_addr()?;
    let open = app.auth.open_to_the_network();
    if !open.is_empty() {
        tracing::warn!(projects = ?open, "these projects accept anonymous pushes from outside loopback");
    }
    if !listen.ip().is_loopback() {
        tracing::warn!(%listen, "listening beyond loopback: anonymous push is limited to each project's anonymous_from networks");
    }
    app.spawn_maintenance();
    #[cfg(unix)]
    {
        // SIGHUP: re-read the TLS certificate and key.
        let app = app.clone();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    app.reload_tls();
                }
            });
        }
    }
    let scheme = if app.tls.is_some() { "https" } else { "http" };
    tracing::info!(%listen, scheme, data_dir = %app.config.server.data_dir.display(), "transship serving");
    transship::http::server::serve(app.clone(), listener, shutdown_signal()).await?;
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
