//! Cold fills shared by the replicas of a cluster: one upstream fetch per digest for the whole
//! cluster. A replica whose local store lacks a blob first looks in the bucket (a `blobs`
//! row); else it asks PostgreSQL for the digest's fill lease. The owner fetches from its
//! upstream exactly as the local profile does (`fill::run`; its own clients follow that fill),
//! then, off the clients' path, uploads the verified blob to the bucket, records and links it
//! (as a cache fill's) and releases the lease. Every other replica streams the owner's bytes
//! from its internal endpoint (`ROUTE_PREFIX`, with Range, authenticated by a key derived from
//! the cluster's token signing key) into its own local fill, verified like any fill. When the
//! owner dies or its stream breaks, a follower carries on from the byte it reached: from the
//! bucket if the blob arrived there, from the next owner, or from the upstream once it takes
//! the expired lease over itself. So a dead owner costs at most one more upstream fetch, and
//! no client gets bytes that were not verified on its own replica. A replica that did not
//! fetch the blob from its own upstream first confirms with a HEAD there that its repository
//! has it (as a local fill joined by another route does). Without the database a replica
//! fetches for itself, as the local profile does.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use http::{StatusCode, header};
use http_body_util::{BodyExt, Empty};
use tokio::sync::Semaphore;
use tokio_util::task::AbortOnDropHandle;

use super::fill::{self, Fill, FillError, SpoolWriter};
use super::tail::Gather;
use super::upstream::UpstreamClient;
use super::web_client::{WebClient, web_client};
use super::{Context, MirrorRoute};
use crate::cluster::fill_lease::{Acquired, Lease, Renewed};
use crate::cluster::objects::Objects;
use crate::cluster::pg::{Db, PgError};
use crate::config::Config;
use crate::config::replica_url_of;
use crate::oci::{Digest, RepoName};

/// The internal endpoint: `GET ROUTE_PREFIX<digest>` (outside `/v2/`: never a registry path).
pub const ROUTE_PREFIX: &str = "/_transship/fill/";
/// The header carrying the replicas' shared key (hex).
pub const KEY_HEADER: &str = "x-transship-fill-key";
/// What the shared key is derived for: a key for this use only, not the signing key itself.
const KEY_LABEL: &[u8] = b"transship internal fill endpoint v1";
/// Sources that may break under one fill before it gives up (its clients get an error and
/// retry): enough for a dead owner and a dead successor, not a loop.
const MAX_BREAKS: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

type OwnerClient = WebClient<Empty<Bytes>>;

/// The cluster side of fills: the database (leases, blob records), the bucket, this
/// replica's internal URL and the shared key, and a client for the owners' endpoints.
pub struct ClusterFill {
    db: Db,
    objects: Objects,
    /// Set at start, or once the listener is bound (a listen port of 0).
    url: OnceLock<String>,
    key: String,
    lease: Duration,
    client: OwnerClient,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterFillError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{0}")]
    Config(String),
}

impl ClusterFill {
    /// Shared fills for this replica: its URL and lease from the config, the key from the
    /// cluster's token signing key (created on first use).
    pub async fn connect(
        db: Db,
        objects: Objects,
        config: &Config,
    ) -> Result<Self, ClusterFillError> {
        let url = config
            .storage
            .replica_url(&config.server)
            .map_err(ClusterFillError::Config)?;
        let signing_key = db.token_signing_key().await?;
        let fills = Self::new(db, objects, &signing_key, config.storage.fill_lease.0);
        if let Some(url) = url {
            fills.set_url(url);
        }
        Ok(fills)
    }

    /// Shared fills with the key derived from `signing_key`, without a URL yet (`set_url`, or
    /// `bound` once the listener is).
    pub fn new(db: Db, objects: Objects, signing_key: &[u8], lease: Duration) -> Self {
        Self {
            db,
            objects,
            url: OnceLock::new(),
            key: derive_key(signing_key),
            lease,
            client: web_client(CONNECT_TIMEOUT),
        }
    }

    /// Sets this replica's internal URL; false if it was already set.
    pub fn set_url(&self, url: String) -> bool {
        self.url.set(url.trim_end_matches('/').to_string()).is_ok()
    }

    /// The listener is bound at `addr`: unless configured, the URL is `http(s)://addr`.
    pub fn bound(&self, addr: SocketAddr, tls: bool) {
        self.set_url(replica_url_of(addr, tls));
    }

    /// This replica's internal URL, as the others reach it (once known).
    pub fn url(&self) -> Option<&str> {
        self.url.get().map(String::as_str)
    }

    /// Whether `presented` is the replicas' key (compared in constant time).
    pub fn key_matches(&self, presented: &[u8]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(self.key.as_bytes(), presented).is_ok()
    }
}

/// The replicas' shared key: HMAC-SHA-256 of a fixed label under the token signing key, hex.
fn derive_key(signing_key: &[u8]) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, signing_key);
    hex::encode(hmac::sign(&key, KEY_LABEL).as_ref())
}

/// Bytes of the fill spooled so far, and how long the blob is.
struct Feed {
    writer: SpoolWriter,
    received: u64,
    size: u64,
}

/// How pouring a source into the fill ended.
enum Poured {
    Complete,
    /// The source broke (a dead peer, a short body): another may carry on.
    Broken(String),
}

/// One cluster fill: what it works with.
struct Job<'a> {
    cx: &'a Context,
    cluster: &'a Arc<ClusterFill>,
    client: &'a UpstreamClient,
    route: &'a MirrorRoute,
    fill: &'a Arc<Fill>,
}

/// Fills `fill` for `route` in the cluster profile (see the module header). Returns the blob's
/// size once it is verified and committed to the local store.
pub(super) async fn run(
    cx: &Context,
    cluster: &Arc<ClusterFill>,
    client: &UpstreamClient,
    route: &MirrorRoute,
    fill: &Arc<Fill>,
    slot: Option<Arc<Semaphore>>,
) -> Result<u64, FillError> {
    let job = Job {
        cx,
        cluster,
        client,
        route,
        fill,
    };
    let digest = &fill.digest;
    // An offline upstream is never asked: only the bucket may fill (a blob the cluster holds
    // for this repository, see `blob::locate`).
    let offline = cx.proxy.config(route.upstream).offline;
    let Some(url) = cluster.url().filter(|_| !offline) else {
        if offline {
            return from_bucket_only(&job).await;
        }
        // Not reachable by the others (not serving yet): fetch alone, share nothing.
        return fill::run(cx, client, route, fill, slot).await;
    };
    let mut feed: Option<Feed> = None;
    // The upstream's answer to a HEAD (its length, if it said), once asked. A blob the
    // cluster already holds for this very repository needs no confirmation: that is what keeps
    // the cache serving with the upstream down.
    let mut confirmed: Option<Option<u64>> = match cluster.db.blob_size(&route.local, digest).await
    {
        Ok(Some(size)) => Some(Some(size)),
        _ => None,
    };
    let mut dead_owner: Option<String> = None;
    // A bucket read that broke is not tried again: a record without its object must not
    // keep the fill from the other sources.
    let mut bucket_broke = false;
    let mut breaks = 0;
    let mut wait_until = Instant::now() + wait_for_lease(cluster.lease);
    loop {
        let stored = match bucket_broke {
            false => stored_size(cluster, digest).await,
            true => None,
        };
        if let Some(size) = stored {
            confirm(&job, &mut confirmed).await?;
            let from = feed.as_ref().map_or(0, |f| f.received);
            let outcome = match cluster.objects.get_range(digest, from..size).await {
                Ok(stream) => pour(fill, &mut feed, size, stream).await?,
                Err(e) => Poured::Broken(e.to_string()),
            };
            match outcome {
                Poured::Complete => return counted(&job, "bucket", finish(&job, feed).await),
                Poured::Broken(why) => {
                    breaks += 1;
                    bucket_broke = true;
                    tracing::warn!(%digest, %why, "reading a blob from the bucket broke");
                }
            }
        } else {
            let acquired = match cluster.db.acquire_fill(digest, url, cluster.lease).await {
                Ok(a) => a,
                // Without the database the cluster cannot share the fill: this replica still
                // serves its clients, fetching for itself as the local profile does.
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cannot take a fill lease; fetching from the upstream alone");
                    return from_upstream(&job, slot, feed).await;
                }
            };
            match acquired {
                Acquired::Owner(lease) => {
                    // The previous owner may have put the blob in the bucket and released the
                    // lease since the look above: then that is where it comes from.
                    if !bucket_broke && stored_size(cluster, digest).await.is_some() {
                        release(cluster, &lease).await;
                        continue;
                    }
                    return own(&job, slot, feed, lease).await;
                }
                // Our own lease (a previous fill here still publishing, or a previous process
                // at this address that died) or a dead owner's: wait for it to end.
                Acquired::Follow(owner) if owner == url || dead_owner.as_ref() == Some(&owner) => {
                    if Instant::now() > wait_until {
                        return Err(FillError::Upstream(format!(
                            "the fill lease of {digest} is held by {owner}, which does not answer"
                        )));
                    }
                    tokio::time::sleep(poll_interval(cluster.lease)).await;
                    continue;
                }
                Acquired::Follow(owner) => {
                    let expected = confirm(&job, &mut confirmed).await?;
                    match follow_owner(cluster, &owner, fill, &mut feed, expected).await? {
                        Poured::Complete => {
                            return counted(&job, "replica", finish(&job, feed).await);
                        }
                        Poured::Broken(why) => {
                            breaks += 1;
                            tracing::warn!(%digest, %owner, %why, "following another replica's fill broke; carrying on without it");
                            dead_owner = Some(owner);
                            wait_until = Instant::now() + wait_for_lease(cluster.lease);
                        }
                    }
                }
            }
        }
        if breaks >= MAX_BREAKS {
            return Err(FillError::Upstream(format!(
                "gave up on {digest} after {breaks} broken sources"
            )));
        }
    }
}

/// For an offline upstream: the blob the cluster holds for this repository, read from the
/// bucket; anything else is not there (404).
async fn from_bucket_only(job: &Job<'_>) -> Result<u64, FillError> {
    let (cluster, digest) = (job.cluster, &job.fill.digest);
    let Ok(Some(size)) = cluster.db.blob_size(&job.route.local, digest).await else {
        return Err(FillError::Status(StatusCode::NOT_FOUND));
    };
    let mut feed = None;
    let stream = cluster
        .objects
        .get_range(digest, 0..size)
        .await
        .map_err(|e| FillError::Upstream(format!("reading {digest} from the bucket: {e}")))?;
    match pour(job.fill, &mut feed, size, stream).await? {
        Poured::Complete => counted(job, "bucket", finish(job, feed).await),
        Poured::Broken(why) => Err(FillError::Upstream(format!(
            "reading {digest} from the bucket broke: {why}"
        ))),
    }
}

/// The blob's size if the bucket holds it (its `blobs` row, written once the object is
/// complete). The database unreadable: as if it did not (the lease then decides).
async fn stored_size(cluster: &ClusterFill, digest: &Digest) -> Option<u64> {
    cluster
        .db
        .stored_blob_size(digest)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(%digest, error = %e, "cannot look for a blob in the bucket");
            None
        })
}

/// As the lease's owner: fetches from the upstream (from the start exactly as the local
/// profile does; after a take-over, from where the previous owner's stream left off), renewing
/// the lease meanwhile, then publishes the blob (or releases the lease on failure).
async fn own(
    job: &Job<'_>,
    slot: Option<Arc<Semaphore>>,
    feed: Option<Feed>,
    lease: Lease,
) -> Result<u64, FillError> {
    let renewing = renew(job.cluster.clone(), lease.clone());
    let result = from_upstream(job, slot, feed).await;
    drop(renewing);
    let (cluster, digest) = (job.cluster.clone(), job.fill.digest.clone());
    match result {
        Ok(size) => {
            let (store, repo) = (job.cx.store.clone(), job.route.local.clone());
            let shared = job.cx.proxy.shared_cache().cloned();
            tokio::spawn(async move {
                let _renewing = renew(cluster.clone(), lease.clone());
                if let Err(e) =
                    publish(&cluster, shared.as_deref(), &store, &repo, &digest, size).await
                {
                    tracing::warn!(%digest, error = %e, "cannot put a filled blob in the bucket; the next replica to miss it fetches it again");
                }
                release(&cluster, &lease).await;
            });
        }
        Err(_) => {
            tokio::spawn(async move { release(&cluster, &lease).await });
        }
    }
    result
}

/// Fetches from the upstream: from the start as the local profile does (in one of its
/// download slots), or the rest after bytes another replica sent.
async fn from_upstream(
    job: &Job<'_>,
    slot: Option<Arc<Semaphore>>,
    feed: Option<Feed>,
) -> Result<u64, FillError> {
    match feed {
        None => {
            let result = fill::run(job.cx, job.client, job.route, job.fill, slot).await;
            counted(job, "upstream", result)
        }
        Some(feed) => counted(job, "takeover", resume_upstream(job, feed).await),
    }
}

/// Counts a completed fill by its source.
fn counted(job: &Job<'_>, source: &str, result: Result<u64, FillError>) -> Result<u64, FillError> {
    if result.is_ok() {
        job.cx
            .metrics
            .cluster_fills
            .with_label_values(&[source])
            .inc();
    }
    result
}

/// Renews `lease` every third of its length while the returned handle lives.
fn renew(cluster: Arc<ClusterFill>, lease: Lease) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        loop {
            tokio::time::sleep(cluster.lease / 3).await;
            match cluster.db.renew_fill(&lease, cluster.lease).await {
                Ok(Renewed::Held) => {}
                Ok(Renewed::Lost) => {
                    tracing::warn!(digest = %lease.digest, "lost the fill lease (taken over after expiring)");
                    return;
                }
                Err(e) => {
                    tracing::warn!(digest = %lease.digest, error = %e, "cannot renew the fill lease")
                }
            }
        }
    }))
}

async fn release(cluster: &ClusterFill, lease: &Lease) {
    if let Err(e) = cluster.db.release_fill(lease).await {
        tracing::warn!(digest = %lease.digest, error = %e, "cannot release the fill lease; it expires");
    }
}

/// Uploads the committed local blob to the bucket (verified again on the way), then records
/// it, linked to the repository it was fetched for as a cache fill's (with the cluster's one
/// `cache.fill` event for it, when the cache's state is shared).
async fn publish(
    cluster: &ClusterFill,
    shared: Option<&crate::storage::cluster::ClusterStore>,
    store: &crate::store::Store,
    repo: &RepoName,
    digest: &Digest,
    size: u64,
) -> Result<(), String> {
    let file = store.open_blob(digest).map_err(|e| e.to_string())?;
    let bytes =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 1 << 20);
    cluster
        .objects
        .put_verified(digest, size, bytes)
        .await
        .map_err(|e| e.to_string())?;
    // Under the digest's fence: an eviction or GC that removed the object meanwhile leaves it
    // unrecorded (the next miss fills again), never a row without bytes. With the cache's
    // state shared, the cluster's one `cache.fill` event for the blob goes with the record.
    let recorded = match shared {
        Some(shared) => shared
            .link_filled_blob(repo, digest, size)
            .await
            .map_err(|e| e.to_string())?,
        None => cluster
            .db
            .record_filled_blob(&cluster.objects, repo, digest, size, &[])
            .await
            .map_err(|e| e.to_string())?,
    };
    if !recorded {
        tracing::debug!(%digest, "a filled blob was removed from the bucket before it was recorded");
    }
    Ok(())
}

/// Streams the owner's bytes from `feed`'s position (or the start) into the fill.
async fn follow_owner(
    cluster: &ClusterFill,
    owner: &str,
    fill: &Arc<Fill>,
    feed: &mut Option<Feed>,
    expected: Option<u64>,
) -> Result<Poured, FillError> {
    let from = feed.as_ref().map_or(0, |f| f.received);
    let uri = format!("{owner}{ROUTE_PREFIX}{}", fill.digest);
    let mut req = http::Request::get(uri).header(KEY_HEADER, &cluster.key);
    // From the start: the whole blob (a Range of `0-` is answered 206 without Content-Range).
    if from > 0 {
        req = req.header(header::RANGE, format!("bytes={from}-"));
    }
    let req = req.body(Empty::new());
    let req = match req {
        Ok(r) => r,
        Err(e) => return Ok(Poured::Broken(format!("bad owner URL {owner:?}: {e}"))),
    };
    let resp = match tokio::time::timeout(
        super::upstream::HEADER_TIMEOUT + fill::QUEUE_TIMEOUT,
        cluster.client.request(req),
    )
    .await
    {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Ok(Poured::Broken(format!("cannot reach {owner}: {e}"))),
        Err(_) => return Ok(Poured::Broken(format!("{owner} did not answer"))),
    };
    let Some(size) = total_size(resp.status(), resp.headers(), from) else {
        return Ok(Poured::Broken(format!(
            "{owner} answered {}",
            resp.status()
        )));
    };
    if expected.is_some_and(|e| e != size) {
        return Err(FillError::SizeMismatch {
            want: expected.unwrap_or(size),
            got: size,
        });
    }
    pour(fill, feed, size, resp.into_body().into_data_stream()).await
}

/// The blob's full length from an answer to `Range: bytes=from-` (no Range when `from` is 0):
/// a 206 starting at `from`, or a 200 for the whole blob when `from` is 0.
fn total_size(status: StatusCode, headers: &http::HeaderMap, from: u64) -> Option<u64> {
    match status {
        StatusCode::OK if from == 0 => fill::content_length(headers),
        // A range from 0 is the whole blob; some servers then leave Content-Range out.
        StatusCode::PARTIAL_CONTENT
            if from == 0 && !headers.contains_key(header::CONTENT_RANGE) =>
        {
            fill::content_length(headers)
        }
        StatusCode::PARTIAL_CONTENT => {
            let range = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
            let (span, total) = range.strip_prefix("bytes ")?.split_once('/')?;
            let start: u64 = span.split_once('-')?.0.parse().ok()?;
            (start == from).then_some(())?;
            total.parse().ok()
        }
        _ => None,
    }
}

/// After a take-over mid-way: the rest of the blob from the upstream, from where the fill is
/// (resumed again if the body drops, as `fill::run` does).
async fn resume_upstream(job: &Job<'_>, feed: Feed) -> Result<u64, FillError> {
    let (cx, route, fill) = (job.cx, job.route, job.fill);
    let mut feed = Some(feed);
    let suffix = format!("/blobs/{}", fill.digest);
    for _ in 0..MAX_BREAKS {
        let (from, size) = feed.as_ref().map_or((0, 0), |f| (f.received, f.size));
        let resp = fill::ask_from(cx, route, &suffix, from).await?;
        if total_size(resp.status(), resp.headers(), from) != Some(size) {
            return Err(FillError::Upstream(format!(
                "upstream {} cannot resume the download (answered {})",
                cx.proxy.upstream_name(route.upstream),
                resp.status()
            )));
        }
        match pour(fill, &mut feed, size, resp.into_body().into_data_stream()).await? {
            Poured::Complete => return finish(job, feed).await,
            Poured::Broken(why) => {
                tracing::info!(digest = %fill.digest, from, %why, "resuming upstream blob download");
            }
        }
    }
    Err(FillError::Upstream(format!(
        "upstream {} body kept failing; gave up",
        cx.proxy.upstream_name(route.upstream)
    )))
}

/// Asks the route's upstream (once per fill: `confirmed` keeps its answer) whether its
/// repository has the blob: a route reads bytes another route fetched only once its own
/// upstream says so. Its length, if the upstream said.
async fn confirm(
    job: &Job<'_>,
    confirmed: &mut Option<Option<u64>>,
) -> Result<Option<u64>, FillError> {
    if let Some(size) = confirmed {
        return Ok(*size);
    }
    let size = super::blob::upstream_head(job.cx, job.route, &job.fill.digest).await?;
    *confirmed = Some(size);
    Ok(size)
}

/// Writes `source` (bytes from the feed's position on) into the fill, opening the spool on
/// the first call. A broken source is `Broken`; a store failure or bytes beyond `size` end
/// the fill.
async fn pour<S, E>(
    fill: &Arc<Fill>,
    feed: &mut Option<Feed>,
    size: u64,
    source: S,
) -> Result<Poured, FillError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let feed = match feed {
        Some(f) if f.size != size => {
            return Err(FillError::SizeMismatch {
                want: f.size,
                got: size,
            });
        }
        Some(f) => f,
        None => feed.insert(Feed {
            writer: fill::open_spool(fill, Some(size)).await?,
            received: 0,
            size,
        }),
    };
    let mut source = std::pin::pin!(source);
    loop {
        let first = match tokio::time::timeout(fill::IDLE_TIMEOUT, source.next()).await {
            Ok(Some(Ok(data))) => data,
            Ok(Some(Err(e))) => return Ok(Poured::Broken(e.to_string())),
            Ok(None) if feed.received == size => return Ok(Poured::Complete),
            Ok(None) => {
                return Ok(Poured::Broken(format!(
                    "ended after {} of {size} bytes",
                    feed.received
                )));
            }
            Err(_) => {
                return Ok(Poured::Broken(format!(
                    "no data for {:?}",
                    fill::IDLE_TIMEOUT
                )));
            }
        };
        // Take what else has arrived already, so the writer wakes once per batch.
        let mut batch = Gather::default();
        batch.add(first);
        let mut broke = None;
        while batch.len() < fill::WRITE_BATCH {
            match source.next().now_or_never() {
                Some(Some(Ok(data))) => batch.add(data),
                Some(Some(Err(e))) => {
                    broke = Some(e.to_string());
                    break;
                }
                Some(None) | None => break,
            }
        }
        let got = feed.received + batch.len() as u64;
        if got > size {
            return Err(FillError::SizeMismatch { want: size, got });
        }
        let batch = batch.finish();
        fill.received(&batch, got);
        if !feed.writer.send(batch).await {
            return Err(FillError::Store("the spool writer stopped".into()));
        }
        feed.received = got;
        if let Some(why) = broke {
            return Ok(Poured::Broken(why));
        }
    }
}

/// Verifies and commits what was poured.
async fn finish(job: &Job<'_>, feed: Option<Feed>) -> Result<u64, FillError> {
    let feed = feed.ok_or(FillError::Aborted)?;
    fill::verify_and_commit(job.cx, job.fill, feed.writer, &job.route.local).await
}

/// How long a follower waits for a dead owner's lease to expire before giving up.
fn wait_for_lease(lease: Duration) -> Duration {
    lease * 2 + Duration::from_secs(5)
}

/// How often a follower asks again while waiting for a lease to end.
fn poll_interval(lease: Duration) -> Duration {
    (lease / 8).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_derived_from_the_signing_key_and_checked_exactly() {
        let a = derive_key(b"signing key one");
        assert_eq!(a, derive_key(b"signing key one"));
        assert_ne!(a, derive_key(b"signing key two"));
        assert_eq!(a.len(), 64);
        assert!(!a.contains("signing"));
    }

    #[test]
    fn the_owner_answer_must_start_where_the_fill_is() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::CONTENT_RANGE,
            "bytes 100-199/200".parse().expect("value"),
        );
        assert_eq!(total_size(StatusCode::PARTIAL_CONTENT, &h, 100), Some(200));
        assert_eq!(total_size(StatusCode::PARTIAL_CONTENT, &h, 50), None);
        let mut full = http::HeaderMap::new();
        full.insert(header::CONTENT_LENGTH, "200".parse().expect("value"));
        assert_eq!(total_size(StatusCode::OK, &full, 0), Some(200));
        // A whole body when the fill asked for its rest is not a continuation.
        assert_eq!(total_size(StatusCode::OK, &full, 100), None);
        assert_eq!(total_size(StatusCode::NOT_FOUND, &full, 0), None);
    }
}
