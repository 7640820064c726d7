//! The pull-through side: which upstream serves a name (`route`), talking to it (`upstream`),
//! keeping tags fresh without wasting the upstream's rate limit (`freshness`), one upstream
//! lookup per manifest the cache cannot answer (`manifest_miss`, fetching through
//! `manifest_fetch`), the upstream's tag lists (`tag_list`), and one download per blob however
//! many clients wait for it (`fill`); whole images fetched ahead of any pull (`prefetch`) and
//! kept current (`warm`). Handlers ask `Proxy` for content; it never touches
//! RocksDB directly (the `Store` does) and never forwards a client's credentials.

mod ask;
pub mod blob;
pub mod blocking;
pub mod cache_state;
pub mod cluster_fill;
pub mod fill;
pub mod follow;
pub mod freshness;
mod manifest_fetch;
pub mod manifest_miss;
pub mod prefetch;
pub mod route;
pub mod tag_list;
pub mod tail;
pub mod upstream;
pub mod warm;
pub mod web_client;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::config::{Config, UpstreamConfig};
use crate::metrics::Metrics;
use crate::storage::cluster::ClusterStore;
use crate::store::Store;
pub use route::MirrorRoute;
pub use route::Namespace;
use route::Router;
use upstream::{UpstreamClient, UpstreamError, rate_limit_value};

/// How a cached request was answered (the `X-Cache` header and the metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
    Stale,
    Coalesced,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "HIT",
            Self::Miss => "MISS",
            Self::Stale => "STALE",
            Self::Coalesced => "COALESCED",
        }
    }
}

/// What the pull-through side works with: its own state, the store it fills and the metrics
/// it counts. Three `Arc`s, cheap to clone: a detached fill task owns one.
#[derive(Clone)]
pub struct Context {
    pub proxy: Arc<Proxy>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
}

pub struct Proxy {
    router: Arc<Router>,
    configs: Vec<UpstreamConfig>,
    clients: Vec<Arc<UpstreamClient>>,
    /// Per upstream: `local repo \0 reference` answered 404 upstream recently.
    not_found: Vec<moka::sync::Cache<String, ()>>,
    pub fills: fill::Fills,
    pub manifest_misses: manifest_miss::ManifestMisses,
    pub tag_lists: tag_list::TagLists,
    /// The cluster profile's shared fills (set once by `App` in that profile).
    cluster: std::sync::OnceLock<Arc<cluster_fill::ClusterFill>>,
    /// The cluster profile's shared cache state (manifests, tags, pulls; see `cache_state`).
    shared: std::sync::OnceLock<Arc<ClusterStore>>,
}

impl Proxy {
    pub fn new(config: &Config) -> Result<Self, UpstreamError> {
        let clients = config
            .upstreams
            .iter()
            .map(|u| UpstreamClient::new(u).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let not_found = config
            .upstreams
            .iter()
            .map(|u| {
                moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(u.not_found_ttl.0.max(Duration::from_millis(1)))
                    .build()
            })
            .collect();
        Ok(Self {
            router: Arc::new(Router::new(config)),
            configs: config.upstreams.clone(),
            clients,
            not_found,
            fills: fill::Fills::new(config),
            manifest_misses: manifest_miss::ManifestMisses::default(),
            tag_lists: tag_list::TagLists::new(&config.upstreams),
            cluster: std::sync::OnceLock::new(),
            shared: std::sync::OnceLock::new(),
        })
    }

    /// Makes cold fills cluster-wide (the cluster profile); false if already attached.
    pub fn attach_cluster(&self, cluster: Arc<cluster_fill::ClusterFill>) -> bool {
        self.cluster.set(cluster).is_ok()
    }

    /// Makes the cache's manifests and tags the cluster's (the cluster profile); false if
    /// already attached.
    pub fn attach_shared_cache(&self, shared: Arc<ClusterStore>) -> bool {
        self.shared.set(shared).is_ok()
    }

    /// The cluster's cache state, if attached.
    pub fn shared_cache(&self) -> Option<&Arc<ClusterStore>> {
        self.shared.get()
    }

    /// The cluster profile's shared fills, if attached.
    pub fn cluster(&self) -> Option<&Arc<cluster_fill::ClusterFill>> {
        self.cluster.get()
    }

    /// Where `name` lives (`ns` as in `?ns=`): resolved once per request, before access
    /// control.
    pub fn namespace(&self, name: &crate::oci::RepoName, ns: Option<&str>) -> Namespace<'_> {
        self.router.namespace(name, ns)
    }

    /// The name resolver, shared with access control.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    pub fn client(&self, upstream: usize) -> &Arc<UpstreamClient> {
        &self.clients[upstream]
    }

    pub fn config(&self, upstream: usize) -> &UpstreamConfig {
        &self.configs[upstream]
    }

    /// How many upstreams are configured (indexes `0..upstream_count()`).
    pub fn upstream_count(&self) -> usize {
        self.configs.len()
    }

    pub fn upstream_name(&self, upstream: usize) -> &str {
        self.router.upstream_name(upstream)
    }

    pub fn remember_not_found(&self, route: &MirrorRoute, reference: &str) {
        self.not_found[route.upstream].insert(format!("{}\0{reference}", route.local), ());
    }

    pub fn recently_not_found(&self, route: &MirrorRoute, reference: &str) -> bool {
        self.not_found[route.upstream].contains_key(&format!("{}\0{reference}", route.local))
    }

    /// Sends `method /v2/<remote repository><suffix>` to the route's upstream, recording the
    /// outcome (latency, errors, rate-limit headers) in the metrics.
    async fn ask(
        &self,
        metrics: &Metrics,
        route: &MirrorRoute,
        method: http::Method,
        suffix: &str,
        headers: &[(http::HeaderName, &str)],
    ) -> Result<http::Response<hyper::body::Incoming>, UpstreamError> {
        let client = self.client(route.upstream);
        let path = format!("/v2/{}{suffix}", route.remote);
        let started = std::time::Instant::now();
        match client
            .send(method, &path, route.remote.as_str(), headers)
            .await
        {
            Ok(resp) => {
                self.observe_upstream(
                    metrics,
                    client,
                    resp.status(),
                    resp.headers(),
                    started.elapsed(),
                );
                Ok(resp)
            }
            Err(e) => {
                self.observe_failure(metrics, client, &e);
                Err(e)
            }
        }
    }

    /// Records an upstream response in the metrics: latency, errors, rate-limit headers.
    pub fn observe_upstream(
        &self,
        metrics: &Metrics,
        client: &UpstreamClient,
        status: StatusCode,
        headers: &HeaderMap,
        elapsed: Duration,
    ) {
        client.note_status(status, headers);
        let name = client.name.as_str();
        metrics
            .upstream_duration
            .with_label_values(&[name])
            .observe(elapsed.as_secs_f64());
        if !status.is_success() && status != StatusCode::NOT_MODIFIED {
            metrics
                .upstream_errors
                .with_label_values(&[name, status.as_str()])
                .inc();
        }
        if let Some(v) = rate_limit_value(headers, "ratelimit-limit") {
            metrics
                .upstream_ratelimit_limit
                .with_label_values(&[name])
                .set(v);
        }
        if let Some(v) = rate_limit_value(headers, "ratelimit-remaining") {
            metrics
                .upstream_ratelimit_remaining
                .with_label_values(&[name])
                .set(v);
        }
    }

    /// Counts an upstream request that failed before any response.
    pub fn observe_failure(
        &self,
        metrics: &Metrics,
        client: &UpstreamClient,
        error: &UpstreamError,
    ) {
        let kind = match error {
            UpstreamError::Timeout(..) => "timeout",
            UpstreamError::Connect(..) => "connect",
            _ => "protocol",
        };
        metrics
            .upstream_errors
            .with_label_values(&[&client.name, kind])
            .inc();
    }
}
