//! transship: a container registry appliance — a pull-through cache and a private OCI
//! registry on one storage engine. `App::build` wires the parts; nothing else lives here.

pub mod admin;
pub mod airgap;
pub mod auth;
pub mod cache_admin;
pub mod cluster;
pub mod config;
pub mod console;
pub mod events;
pub mod http;
pub mod log_writer;
pub mod maintenance;
pub mod metrics;
pub mod oci;
pub mod prefetch;
pub mod proxy;
pub mod storage;
pub mod store;
pub mod systemd;

use std::sync::Arc;

use auth::Authorizer;
use config::Config;
use metrics::Metrics;
use proxy::Proxy;
use proxy::upstream::UpstreamError;
use store::{Store, StoreError, StoreOptions};

pub struct App {
    pub config: Config,
    /// This host's store: in the local profile everything, in the cluster profile what each
    /// replica keeps for itself (the pull-through cache, events, identities until shared).
    pub store: Arc<Store>,
    /// The registry's content and metadata, in either profile.
    pub storage: storage::Storage,
    pub proxy: Arc<Proxy>,
    /// HTTPS, when configured.
    pub tls: Option<http::tls::Tls>,
    pub metrics: Arc<Metrics>,
    pub auth: Authorizer,
    /// The console's sessions.
    pub console: console::Console,
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
    #[error(
        "this command works on the local profile's data directory only; with [storage.s3] and [storage.postgres] configured, run it against the running server"
    )]
    ClusterNeedsConnect,
    #[error("cluster profile: {0}")]
    Cluster(String),
}

impl App {
    /// Assembles the local profile (synchronous: nothing to connect to).
    pub fn build(config: Config) -> Result<Arc<Self>, BuildError> {
        if config.storage.is_cluster() {
            return Err(BuildError::ClusterNeedsConnect);
        }
        let store = Arc::new(Store::open(
            &config.server.data_dir,
            store_options(&config),
        )?);
        let storage = storage::Storage::Local(store.clone());
        let proxy = Arc::new(Proxy::new(&config)?);
        let auth = Authorizer::new(&config, &store, proxy.router().clone())?;
        Self::assemble(config, store, storage, proxy, auth)
    }

    /// Assembles either profile; the cluster profile first connects to its database
    /// (applying migrations) and bucket.
    pub async fn connect(config: Config) -> Result<Arc<Self>, BuildError> {
        if !config.storage.is_cluster() {
            return Self::build(config);
        }
        // The shared storage first: a database that cannot be reached leaves nothing behind.
        let mut cluster = storage::cluster_setup::connect(&config).await?;
        cluster.set_event_kinds(events::recorded_kinds(&config.notify));
        // The replica's own store keeps its copy of the cache; the cache's events are the
        // cluster's (recorded with the shared changes), so it records none.
        let store = Arc::new(Store::open(
            &config.server.data_dir,
            StoreOptions {
                event_kinds: Default::default(),
                ..store_options(&config)
            },
        )?);
        let proxy = Arc::new(Proxy::new(&config)?);
        // Cold fills of the pull-through cache are shared: one upstream fetch per digest.
        let fills = proxy::cluster_fill::ClusterFill::connect(
            cluster.db().clone(),
            cluster.objects().clone(),
            &config,
        )
        .await
        .map_err(|e| BuildError::Cluster(e.to_string()))?;
        proxy.attach_cluster(Arc::new(fills));
        // Identities and the token signing key are the cluster's: a token from one replica
        // works on every other.
        let auth = Authorizer::connect(&config, cluster.db(), proxy.router().clone()).await?;
        let cluster = Arc::new(cluster);
        // The cache's manifests, tags and pulls are the cluster's too.
        proxy.attach_shared_cache(cluster.clone());
        store.forward_pulls();
        let storage = storage::Storage::Cluster(cluster);
        Self::assemble(config, store, storage, proxy, auth)
    }

    fn assemble(
        config: Config,
        store: Arc<Store>,
        storage: storage::Storage,
        proxy: Arc<Proxy>,
        auth: Authorizer,
    ) -> Result<Arc<Self>, BuildError> {
        let tls = config
            .server
            .tls
            .as_ref()
            .map(http::tls::Tls::load)
            .transpose()?;
        Ok(Arc::new(Self {
            auth,
            store,
            storage,
            proxy,
            tls,
            metrics: Arc::new(Metrics::new()),
            console: console::Console::default(),
            config,
        }))
    }
}

impl App {
    /// What the pull-through side works with, for the mirror handlers.
    pub fn proxy_context(&self) -> proxy::Context {
        proxy::Context {
            proxy: self.proxy.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Whether `repo` belongs to the pull-through cache (it is in no declared project).
    pub fn is_cache_repo(&self, repo: &oci::RepoName) -> bool {
        self.config.project(repo).is_none()
    }

    /// The cache's limits, as an eviction pass enforces them.
    pub fn cache_budget(&self) -> store::evict::Budget {
        let c = &self.config.cache;
        store::evict::Budget {
            max_size: c.max_size.map(|m| m.0),
            evict_to: c.max_size.map_or(0, |m| c.evict_to.of(m.0)),
            min_free_disk: c.min_free_disk.0,
        }
    }

    /// `fsck` knowing which repositories are the pull-through cache's.
    pub fn fsck(&self, repair: bool) -> Result<store::fsck::FsckReport, StoreError> {
        self.store
            .fsck_with(repair, &|repo| self.is_cache_repo(repo))
    }
}

pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        manifest_cache_bytes: config.storage.manifest_cache.0,
        small_blob_cache_bytes: config.storage.small_blob_cache.0,
        max_manifest_size: config.storage.max_manifest_size.0,
        gc_grace: config.gc.grace_period.0,
        upload_abandon_after: config.uploads.abandon_after.0,
        cache_max_size: config.cache.max_size.map(|m| m.0),
        cache_min_free_disk: config.cache.min_free_disk.0,
        upload_limits: store::uploads::UploadLimits {
            max_sessions: config.uploads.max_sessions,
            max_sessions_per_client: config.uploads.max_sessions_per_client,
        },
        event_kinds: events::recorded_kinds(&config.notify),
    }
}
