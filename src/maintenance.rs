//! Background work the server does besides answering requests: the upload reaper, pruning of
//! expired tokens and forgotten login failures, garbage collection, scrubbing, TLS certificate
//! reload (on a timer and on SIGHUP), the admin socket, the `[[warm]]` lists and event
//! delivery. One `Supervisor` starts every loop,
//! cancels them together on shutdown and waits for them, so the index is flushed only once no
//! background job can still write to it. Loops never run blocking work on the async workers:
//! each unit goes through `spawn_blocking`, and long jobs (GC, scrub) check for shutdown
//! between their units of work.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::App;

/// Owns the background loops of one running server.
pub struct Supervisor {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// How often the TLS certificate files are checked for changes.
const TLS_WATCH_PERIOD: Duration = Duration::from_secs(10);
/// How often tag-resolution history (to `cache.history_max_age` / `_entries`) and dead letters
/// (to `MAX_DEAD_LETTERS` per endpoint) are pruned.
const HOURLY_PRUNE_PERIOD: Duration = Duration::from_secs(3600);
/// How often expired tokens and forgotten login failures are pruned.
const PRUNE_PERIOD: Duration = Duration::from_secs(600);

impl Supervisor {
    /// Starts every background loop the config asks for.
    pub fn start(app: &Arc<App>) -> Self {
        let supervisor = Self::idle();
        if app.tls.is_some() {
            let a = app.clone();
            supervisor.every(TLS_WATCH_PERIOD, move |_| {
                let a = a.clone();
                async move {
                    blocking("TLS reload", move || reload_tls_if_changed(&a)).await;
                }
            });
            supervisor.on_sighup(app);
        }
        let a = app.clone();
        supervisor.every(app.config.uploads.reap_interval.0, move |_| {
            reap_uploads(a.clone())
        });
        let a = app.clone();
        // Expired tokens go at start too, not only after the first period.
        supervisor.repeat(Duration::ZERO, PRUNE_PERIOD, move |_| {
            prune_credentials(a.clone())
        });
        let a = app.clone();
        supervisor.every(app.config.gc.interval.0, move |stop| {
            collect_garbage(a.clone(), stop)
        });
        supervisor.cache_lifecycle(app);
        let every = app.config.scrub.interval.0;
        if !every.is_zero() {
            let a = app.clone();
            supervisor.every(every, move |stop| scrub(a.clone(), stop));
        }
        supervisor.admin_socket(app);
        if !app.config.warm.is_empty() {
            let (cx, lists, stop) = (
                app.proxy_context(),
                app.config.warm.clone(),
                supervisor.cancel.clone(),
            );
            supervisor
                .tasks
                .spawn(crate::proxy::warm::keep(cx, lists, stop));
        }
        crate::events::start(app, &supervisor.cancel, &supervisor.tasks);
        let a = app.clone();
        supervisor.every(HOURLY_PRUNE_PERIOD, move |_| prune_dead_letters(a.clone()));
        supervisor
    }

    fn idle() -> Self {
        Self {
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Cancels every loop and waits up to `timeout` for the running jobs to finish their
    /// current unit. Returns false if some were still running when the time was up.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        self.cancel.cancel();
        self.tasks.close();
        match tokio::time::timeout(timeout, self.tasks.wait()).await {
            Ok(()) => {
                tracing::info!("background jobs stopped");
                true
            }
            Err(_) => {
                tracing::warn!(
                    ?timeout,
                    running = self.tasks.len(),
                    "background jobs still running at shutdown"
                );
                false
            }
        }
    }

    /// Runs `job` every `period` (at least one second; the first run is one period after
    /// start) until shutdown. A job that overruns its period delays the next run instead of
    /// piling up; a long one gets the shutdown token to check between its units of work.
    fn every<F, Fut>(&self, period: Duration, job: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.repeat(period, period, job);
    }

    /// `every`, with the first run `first` after start.
    fn repeat<F, Fut>(&self, first: Duration, period: Duration, job: F)
    where
        F: Fn(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let period = period.max(Duration::from_secs(1));
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => job(cancel.clone()).await,
                }
            }
        });
    }

    /// The cache's lifecycle: pulls recorded in memory are flushed to the index; eviction
    /// runs every `cache.check_interval`, and at once when a fill crosses the budget (after
    /// flushing, so its order is current); tag history is pruned hourly.
    fn cache_lifecycle(&self, app: &Arc<App>) {
        let a = app.clone();
        let flush_every = app.config.cache.access_flush_interval.0;
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + flush_every, flush_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut early = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                    _ = early.tick() => if !a.store.access_log_full() { continue },
                }
                let s = a.clone();
                if let Some(Err(e)) = blocking("access flush", move || s.store.flush_access()).await
                {
                    tracing::error!(error = %e, "writing the record of pulls failed");
                }
                share_pulls(&a).await;
            }
        });
        let a = app.clone();
        let check_every = app.config.cache.check_interval.0;
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(check_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                    () = a.store.eviction_wanted() => {}
                }
                enforce_budget(a.clone(), cancel.clone()).await;
                // However often fills ask, at most one pass a second.
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        let a = app.clone();
        self.repeat(Duration::ZERO, HOURLY_PRUNE_PERIOD, move |_| {
            prune_tag_history(a.clone())
        });
    }

    /// SIGHUP re-reads the TLS certificate and key.
    fn on_sighup(&self, app: &Arc<App>) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; certificates reload on file change only");
            return;
        };
        let app = app.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    got = hup.recv() => match got {
                        Some(()) => {
                            let a = app.clone();
                            blocking("TLS reload", move || reload_tls(&a)).await;
                        }
                        None => break,
                    },
                }
            }
        });
    }

    /// The admin socket for `transship user|key|token|member` against this server.
    fn admin_socket(&self, app: &Arc<App>) {
        let app = app.clone();
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                r = crate::admin::serve_socket(app) => if let Err(e) = r {
                    tracing::error!(error = %e, "admin socket stopped; `transship user|key|token|member` cannot reach this server");
                },
            }
        });
    }
}

/// A job's view of the cancellation token, for blocking work that checks it between units.
fn stop_flag(cancel: &CancellationToken) -> impl Fn() -> bool + Send + 'static {
    let cancel = cancel.clone();
    move || cancel.is_cancelled()
}

/// Runs one unit of blocking maintenance off the async workers; `None` if it panicked.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "{what} task failed");
            None
        }
    }
}

/// The cluster profile: adds this replica's pulls of cached images to the shared record that
/// cluster-wide eviction orders by (lost, not retried, if the database is down: an ordering
/// hint, never content).
async fn share_pulls(app: &App) {
    let Some(shared) = app.proxy.shared_cache() else {
        return;
    };
    let now = crate::store::unix_now();
    let pulls: Vec<_> = app
        .store
        .take_forwarded_pulls()
        .into_iter()
        .map(
            |(repo, digest, last, pulls)| crate::cluster::cache::PullRecord {
                repo,
                digest,
                age: now.saturating_sub(last),
                pulls,
            },
        )
        .collect();
    if pulls.is_empty() {
        return;
    }
    if let Err(e) = shared.record_pulls(pulls).await {
        tracing::warn!(error = %e, "cannot add this replica's pulls to the cluster's record");
    }
}

async fn reap_uploads(app: Arc<App>) {
    let a = app.clone();
    let reaped = blocking("upload reaper", move || {
        a.store.reap_uploads(a.config.uploads.abandon_after.0)
    })
    .await;
    match reaped {
        Some(Ok(n)) if n > 0 => {
            app.metrics.uploads_reaped.inc_by(n as u64);
            tracing::info!(reaped = n, "removed abandoned uploads");
        }
        Some(Err(e)) => tracing::error!(error = %e, "upload reaper failed"),
        _ => {}
    }
    if let crate::storage::Storage::Cluster(c) = &app.storage {
        // Every replica reaps; a session one is reaping is skipped by the others.
        match c.uploads().reap(app.config.uploads.abandon_after.0).await {
            Ok(n) if n > 0 => {
                app.metrics.uploads_reaped.inc_by(n as u64);
                tracing::info!(reaped = n, "removed abandoned cluster uploads");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cluster upload reaper failed"),
        }
    }
}

/// Expired tokens leave the index; forgotten login failures leave memory.
async fn prune_credentials(app: Arc<App>) {
    app.auth.throttle.prune();
    let a = app.clone();
    match blocking("token pruning", move || a.auth.identities.prune_expired()).await {
        Some(Ok(n)) if n > 0 => tracing::info!(removed = n, "pruned expired tokens"),
        Some(Err(e)) => tracing::error!(error = %e, "pruning expired tokens failed"),
        _ => {}
    }
}

async fn collect_garbage(app: Arc<App>, cancel: CancellationToken) {
    let (a, stop) = (app.clone(), stop_flag(&cancel));
    match blocking("garbage collection", move || {
        a.store.collect_garbage_until(&stop)
    })
    .await
    {
        Some(Ok(report)) => {
            app.metrics.gc_runs.inc();
            app.metrics.gc_bytes_freed.inc_by(report.bytes_freed);
            tracing::info!(%report, "garbage collection");
        }
        Some(Err(e)) => tracing::error!(error = %e, "garbage collection failed"),
        None => {}
    }
    if let crate::storage::Storage::Cluster(c) = &app.storage {
        let windows = crate::cluster::gc::GcWindows {
            grace: app.config.gc.grace_period.0,
            push: app.config.uploads.abandon_after.0,
        };
        // Held past the run's likely length; a longer run stays safe (see cluster::gc).
        let lease = app.config.gc.interval.0.max(Duration::from_secs(600));
        let run = crate::cluster::gc::collect_garbage(
            c.db(),
            c.objects(),
            c.replica(),
            windows,
            lease,
            app.config.gc.interval.0,
        );
        tokio::select! {
            outcome = run => match outcome {
                Ok(Some(report)) => {
                    app.metrics.gc_runs.inc();
                    app.metrics.gc_bytes_freed.inc_by(report.bytes_freed);
                    tracing::info!(%report, "cluster garbage collection");
                }
                Ok(None) => tracing::debug!("cluster garbage collection runs on another replica"),
                Err(e) => tracing::error!(error = %e, "cluster garbage collection failed"),
            },
            _ = cancel.cancelled() => {}
        }
    }
}

/// One eviction pass (blocking), counted in the metrics and logged when it removed anything.
async fn enforce_budget(app: Arc<App>, cancel: CancellationToken) {
    let (a, stop) = (app.clone(), stop_flag(&cancel));
    let budget = app.cache_budget();
    let outcome = blocking("eviction", move || {
        a.store
            .enforce_budget(&budget, &|r| a.is_cache_repo(r), &stop)
    })
    .await;
    match outcome {
        Some(Ok(report)) => {
            let m = &app.metrics;
            let gauge =
                |g: &prometheus::IntGauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
            gauge(&m.disk_free_bytes, report.free_disk);
            gauge(&m.cache_max_bytes, budget.max_size.unwrap_or(0));
            let u = app.store.last_usage();
            gauge(&m.cache_cached_bytes, u.cached_bytes);
            gauge(&m.cache_pinned_bytes, u.pinned_bytes);
            gauge(&m.cache_pushed_bytes, u.pushed_bytes);
            gauge(&m.cache_images, u.images);
            m.cache_pins_over_budget
                .set(i64::from(report.pins_over_budget));
            m.cache_evicted_images.inc_by(report.images_evicted);
            m.cache_evicted_bytes.inc_by(report.bytes_freed);
            if report.took_census {
                m.cache_eviction_seconds.observe(report.seconds);
            }
            if report.images_evicted > 0 || report.blobs_removed > 0 {
                tracing::info!(
                    images = report.images_evicted,
                    blobs = report.blobs_removed,
                    bytes = report.bytes_freed,
                    cached_bytes = report.usage.cached_bytes,
                    free_disk = report.free_disk,
                    seconds = report.seconds,
                    "cache eviction"
                );
            }
            if report.pins_over_budget {
                tracing::warn!(
                    pinned_bytes = report.usage.pinned_bytes,
                    max_size = ?budget.max_size,
                    "pinned images alone exceed cache.max_size; serving them anyway"
                );
            }
            if report.space_low {
                tracing::error!(
                    free_disk = report.free_disk,
                    min_free_disk = budget.min_free_disk,
                    "the data directory is short of space and nothing more may be evicted: new fills and pushes are refused"
                );
            }
        }
        Some(Err(e)) => tracing::error!(error = %e, "cache eviction failed"),
        None => {}
    }
    enforce_cluster_budget(&app, &cancel).await;
}

/// The cluster's pass over the shared cache (one replica per `cache.check_interval`, by the
/// job lease), when `cache.max_size` is set; the local pass above bounds this replica's copy.
async fn enforce_cluster_budget(app: &App, cancel: &CancellationToken) {
    let (crate::storage::Storage::Cluster(c), Some(max)) =
        (&app.storage, app.config.cache.max_size)
    else {
        return;
    };
    let budget = crate::cluster::cache_evict::Budget {
        max_size: max.0,
        evict_to: app.config.cache.evict_to.of(max.0),
    };
    let every = app.config.cache.check_interval.0;
    let events = |repo: &str, root: &str, tag: Option<&str>| c.evict_events(repo, root, tag);
    let run = crate::cluster::cache_evict::evict_cache_job(
        c.db(),
        c.objects(),
        c.replica(),
        budget,
        every.max(Duration::from_secs(600)),
        // Half an interval: this replica's next tick finds it free again.
        every / 2,
        &events,
    );
    tokio::select! {
        outcome = run => match outcome {
            Ok(Some(report)) => {
                app.metrics.cache_evicted_images.inc_by(report.images_evicted);
                app.metrics.cache_evicted_bytes.inc_by(report.bytes_freed);
                if report.images_evicted > 0 || report.blobs_removed > 0 {
                    tracing::info!(%report, "cluster cache eviction");
                }
                if report.cached_bytes_after > budget.max_size {
                    tracing::warn!(%report, max_size = budget.max_size, "pinned or shared images alone keep the cluster's cache above cache.max_size");
                }
            }
            Ok(None) => tracing::debug!("cluster cache eviction runs on another replica"),
            Err(e) => tracing::error!(error = %e, "cluster cache eviction failed"),
        },
        _ = cancel.cancelled() => {}
    }
}

async fn prune_tag_history(app: Arc<App>) {
    let a = app.clone();
    let c = app.config.cache.clone();
    match blocking("tag history pruning", move || {
        a.store
            .prune_tag_history(c.history_max_age.0.as_secs(), c.history_max_entries)
    })
    .await
    {
        Some(Ok(n)) if n > 0 => tracing::info!(removed = n, "pruned tag history"),
        Some(Err(e)) => tracing::error!(error = %e, "pruning tag history failed"),
        _ => {}
    }
    if let crate::storage::Storage::Cluster(cluster) = &app.storage {
        prune_cluster_tag_history(cluster, &app.config.cache).await;
    }
}

/// The database's records kept within bounds, by one replica an hour
/// (`cluster::cache::upkeep_records`): tag history (the registry's and the cache's tags)
/// within the same limits, and pull records of digests no longer cached.
async fn prune_cluster_tag_history(
    cluster: &crate::storage::cluster::ClusterStore,
    c: &crate::config::CacheConfig,
) {
    let run = crate::cluster::cache::upkeep_records(
        cluster.db(),
        cluster.replica(),
        c.history_max_age.0,
        c.history_max_entries,
        // A little under the hourly period: this replica's next run finds it free.
        HOURLY_PRUNE_PERIOD.mul_f64(0.9),
    );
    match run.await {
        Ok(Some(removed)) if removed > 0 => {
            tracing::info!(removed, "pruned the cluster's tag history and pull records")
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "pruning the cluster's records failed"),
    }
}

/// Hourly: each endpoint keeps its newest `MAX_DEAD_LETTERS` dead letters.
async fn prune_dead_letters(app: Arc<App>) {
    let keep = crate::store::outbox::MAX_DEAD_LETTERS;
    match blocking("dead letter pruning", move || {
        app.store.prune_dead_letters(keep)
    })
    .await
    {
        Some(Ok(n)) if n > 0 => {
            tracing::warn!(removed = n, keep, "dropped the oldest dead-lettered events")
        }
        Some(Err(e)) => tracing::error!(error = %e, "pruning dead letters failed"),
        _ => {}
    }
}

/// One scrub pass, stopped between blobs at shutdown.
async fn scrub(app: Arc<App>, cancel: CancellationToken) {
    let (a, stop) = (app.clone(), stop_flag(&cancel));
    blocking("scrub", move || scrub_pass(&a, &stop)).await;
}

/// One scrub pass at the configured rate (blocking), counted in the metrics and logged: every
/// stored blob re-hashed, a damaged one quarantined.
pub fn scrub_pass(
    app: &App,
    should_stop: &dyn Fn() -> bool,
) -> Result<crate::store::scrub::ScrubReport, crate::store::StoreError> {
    use crate::store::scrub::ScrubEvent;
    let outcome =
        app.store.scrub_pass(
            app.config.scrub.rate.0,
            should_stop,
            &mut |event| match event {
                ScrubEvent::Read(n) => app.metrics.scrub_bytes.inc_by(n),
                ScrubEvent::Quarantined { digest, problem } => {
                    app.metrics.scrub_corrupt.inc();
                    tracing::error!(%digest, problem, "scrub: damaged blob quarantined");
                }
            },
        );
    match &outcome {
        Ok(report) if report.completed => {
            app.metrics.scrub_passes.inc();
            tracing::info!(%report, "scrub");
        }
        Ok(report) => tracing::info!(%report, "scrub"),
        Err(e) => tracing::error!(error = %e, "scrub failed"),
    }
    outcome
}

/// Re-reads the certificate and key (SIGHUP). A failure keeps the current certificate.
fn reload_tls(app: &App) {
    if let Some(tls) = &app.tls {
        match tls.reload() {
            Ok(()) => tracing::info!("TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; keeping the current certificate")
            }
        }
    }
}

fn reload_tls_if_changed(app: &App) {
    if let Some(tls) = &app.tls {
        match tls.reload_if_changed() {
            Ok(true) => tracing::info!("TLS certificate files changed; reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "TLS files changed but do not load; keeping the current certificate")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Shutdown waits for the unit of work in progress, and nothing runs after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_waits_for_the_running_job_and_stops_the_loop() {
        let started = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let supervisor = Supervisor::idle();
        let (s, f) = (started.clone(), finished.clone());
        supervisor.every(Duration::from_secs(1), move |_| {
            let (s, f) = (s.clone(), f.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                blocking("test job", move || {
                    std::thread::sleep(Duration::from_millis(300));
                    f.fetch_add(1, Ordering::SeqCst);
                })
                .await;
            }
        });
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(supervisor.shutdown(Duration::from_secs(30)).await);
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "shutdown returned mid-job"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "the loop ran after shutdown"
        );
    }
}
