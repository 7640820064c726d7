//! transship: a container registry appliance — a pull-through cache and a private OCI
//! registry on one storage engine. `App::build` wires the parts; nothing else lives here.

pub mod admin;
pub mod auth;
pub mod config;
pub mod http;
pub mod metrics;
pub mod oci;
pub mod proxy;
pub mod store;

use std::sync::Arc;

use auth::Authorizer;
use config::Config;
use metrics::Metrics;
use proxy::Proxy;
use proxy::upstream::UpstreamError;
use store::{Store, StoreError, StoreOptions};

pub struct App {
    pub config: Config,
    pub store: Store,
    pub proxy: Proxy,
    /// HTTPS, when configured.
    pub tls: Option<http::tls::Tls>,
    pub metrics: Metrics,
    pub auth: Authorizer,
}

/// Why the app could not be assembled from its config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Tls(#[from] http::tls::TlsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthBuildError),
}

impl App {
    pub fn build(config: Config) -> Result<Arc<Self>, BuildError> {
        let store = Store::open(&config.server.data_dir, store_options(&config))?;
        let proxy = Proxy::new(&config)?;
        let tls = config
            .server
            .tls
            .as_ref()
            .map(http::tls::Tls::load)
            .transpose()?;
        let auth = Authorizer::new(&config, &store)?;
        Ok(Arc::new(Self {
            auth,
            store,
            proxy,
            tls,
            metrics: Metrics::new(),
            config,
        }))
    }

    /// Starts the periodic upload reaper, garbage collector and certificate watcher.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        if self.tls.is_some() {
            let app = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
                loop {
                    tick.tick().await;
                    app.reload_tls_if_changed();
                }
            });
        }
        let app = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(
                app.config
                    .uploads
                    .reap_interval
                    .0
                    .max(std::time::Duration::from_secs(1)),
            );
            tick.tick().await;
            loop {
                tick.tick().await;
                let a = app.clone();
                match tokio::task::spawn_blocking(move || {
                    a.store.reap_uploads(a.config.uploads.abandon_after.0)
                })
                .await
                {
                    Ok(Ok(n)) if n > 0 => {
                        app.metrics.uploads_reaped.inc_by(n as u64);
                        tracing::info!(reaped = n, "removed abandoned uploads");
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "upload reaper failed"),
                    _ => {}
                }
            }
        });
        let app = self.clone();
        tokio::spawn(async move {
            // Expired tokens leave the index; forgotten login failures leave memory.
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
            loop {
                tick.tick().await;
                app.auth.throttle.prune();
                let a = app.clone();
                match tokio::task::spawn_blocking(move || a.auth.identities.prune_expired(&a.store))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "pruned expired tokens"),
                    Ok(Err(e)) => tracing::error!(error = %e, "pruning expired tokens failed"),
                    _ => {}
                }
            }
        });
        let app = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(
                app.config
                    .gc
                    .interval
                    .0
                    .max(std::time::Duration::from_secs(1)),
            );
            tick.tick().await;
            loop {
                tick.tick().await;
                let a = app.clone();
                match tokio::task::spawn_blocking(move || a.store.collect_garbage()).await {
                    Ok(Ok(report)) => {
                        app.metrics.gc_runs.inc();
                        app.metrics.gc_bytes_freed.inc_by(report.bytes_freed);
                        tracing::info!(%report, "garbage collection");
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "garbage collection failed"),
                    Err(e) => tracing::error!(error = %e, "garbage collection task failed"),
                }
            }
        });
        let every = self.config.scrub.interval.0;
        if !every.is_zero() {
            let app = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let a = app.clone();
                    if let Err(e) = tokio::task::spawn_blocking(move || a.scrub(&|| false)).await {
                        tracing::error!(error = %e, "scrub task failed");
                    }
                }
            });
        }
    }
}

impl App {
    /// One scrub pass at the configured rate (blocking), counted in the metrics and logged.
    pub fn scrub(
        &self,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<store::scrub::ScrubReport, StoreError> {
        let outcome =
            self.store.scrub_pass(
                self.config.scrub.rate.0,
                should_stop,
                &mut |event| match event {
                    store::scrub::ScrubEvent::Read(n) => self.metrics.scrub_bytes.inc_by(n),
                    store::scrub::ScrubEvent::Quarantined { digest, problem } => {
                        self.metrics.scrub_corrupt.inc();
                        tracing::error!(%digest, problem, "scrub: damaged blob quarantined");
                    }
                },
            );
        match &outcome {
            Ok(report) if report.completed => {
                self.metrics.scrub_passes.inc();
                tracing::info!(%report, "scrub");
            }
            Ok(report) => tracing::info!(%report, "scrub"),
            Err(e) => tracing::error!(error = %e, "scrub failed"),
        }
        outcome
    }

    /// `fsck` knowing which repositories are the pull-through cache's.
    pub fn fsck(&self, repair: bool) -> Result<store::fsck::FsckReport, StoreError> {
        self.store
            .fsck_with(repair, &|repo| self.config.project(repo).is_none())
    }
}

impl App {
    /// Re-reads the certificate and key (SIGHUP). Logs the outcome; a failure keeps the
    /// current certificate.
    pub fn reload_tls(&self) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the current certificate")
                }
            }
        }
    }

    fn reload_tls_if_changed(&self) {
        if let Some(tls) = &self.tls {
            match tls.reload_if_changed() {
                Ok(true) => tracing::info!("TLS certificate files changed; reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "TLS files changed but do not load; keeping the current certificate")
                }
            }
        }
    }
}

pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        manifest_cache_bytes: config.storage.manifest_cache.0,
        max_manifest_size: config.storage.max_manifest_size.0,
        gc_grace: config.gc.grace_period.0,
        upload_abandon_after: config.uploads.abandon_after.0,
    }
}
