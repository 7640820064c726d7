//! Eviction of the pull-through cache, cluster-wide: keeps the cached bytes in the bucket
//! within `cache.max_size`, least recently pulled image first, never touching pushed or pinned
//! content; one replica at a time (the `job_leases` row `cache-evict`), online.
//!
//! Cached bytes (`Db::cache_usage`) are the sizes of the bucket's blobs that a pull-through
//! link (`repo_blobs.pushed = false`) holds and no pushed link does; manifests (bytes in the
//! database) do not count. An *image* is a cached manifest (`repo_manifests.pushed = false`)
//! no other cached manifest of its repository lists, with the children it lists. Its last
//! pull is the newest `cache_access.last_pulled` of its manifests (its root's `linked_at` when
//! none was pulled).
//!
//! A pass plans from a census read in one snapshot, simulating reference counts so a blob
//! shared with a kept image is never chosen. Each image then goes in a transaction of its own
//! that locks its `repo_manifests` rows `FOR UPDATE` (children in byte order, then the root: a
//! push of an index takes its children `FOR KEY SHARE` first, then its own row; the cache's
//! writer, `put_cached_manifest`, locks only its own row and then its tag, so neither can
//! close a cycle with this order) and re-checks, in later
//! statements that see what committed while it waited: a manifest re-put (`linked_at`), pulled
//! (`cache_access`) or pinned since the census stays (and the whole image, if that is its
//! root); a child another kept index of the repository lists stays. It removes the rows, the
//! tags naming them (with a `tag_history` row, digest NULL), their `cache_access`, `referrers`
//! and the repository's pull-through links of blobs no remaining manifest of the repository
//! references. A pull re-putting the image waits for that transaction and then inserts it
//! again — the cache's writer the index alone, tagged: its children and blobs are fetched on
//! demand — or commits first and the image stays. Then each
//! blob the census expected to free goes through GC's per-blob removal (`gc::remove_blob`:
//! row lock, reference re-check, rows, then the object under the digest's fence), kept while
//! any manifest of any repository references it or any link is left, so a concurrent push or
//! fill referencing it never ends with a row without bytes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio_postgres::error::SqlState;

use super::gc::{ClusterGcError, Keep, remove_blob};
use super::objects::Objects;
use super::pg::{Db, PgError};
use super::repos::repo_id;
use crate::oci::manifest::ParsedManifest;
use crate::oci::{Digest, RepoName};

/// The job's name in `job_leases`.
const JOB: &str = "cache-evict";

/// The bound a pass enforces on the shared cached bytes.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Cached bytes allowed (`cache.max_size`).
    pub max_size: u64,
    /// Cached bytes to get down to once over `max_size` (`cache.evict_to` of it).
    pub evict_to: u64,
}

/// The cache's totals in the shared store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterCacheUsage {
    /// Bytes of blobs only pull-through links hold.
    pub cached_bytes: u64,
    /// Cached images (top-level cached manifests).
    pub images: u64,
}

/// What a pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterEvictReport {
    /// Cached bytes when the pass began and when it ended.
    pub cached_bytes_before: u64,
    pub cached_bytes_after: u64,
    pub images_evicted: u64,
    pub manifests_removed: u64,
    pub tags_removed: u64,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    /// Images left alone because they changed (pulled, re-put, pinned) since the census.
    pub images_skipped: u64,
    /// Images left alone because a concurrent writer won a deadlock against the pass.
    pub images_gave_way: u64,
}

impl std::fmt::Display for ClusterEvictReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "evicted {} images ({} manifests, {} tags, {} blobs, {} bytes); cached bytes {} -> {}",
            self.images_evicted,
            self.manifests_removed,
            self.tags_removed,
            self.blobs_removed,
            self.bytes_freed,
            self.cached_bytes_before,
            self.cached_bytes_after
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterEvictError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Removal(#[from] ClusterGcError),
}

impl From<tokio_postgres::Error> for ClusterEvictError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(e.into())
    }
}

/// Which images to evict.
#[derive(Debug, Clone, Copy)]
pub enum Selection<'a> {
    /// Least recently pulled first, until this many cached bytes are planned to go.
    Bytes(u64),
    /// Every unpinned image last pulled before this Unix time (seconds).
    PulledBefore(u64),
    /// One image, by its root's digest.
    Image(&'a RepoName, &'a Digest),
}

const USAGE: &str = "SELECT COALESCE(sum(b.size), 0)::bigint FROM blobs b
  WHERE EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest AND NOT rb.pushed)
    AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest AND rb.pushed)";

/// Microseconds since the epoch of a `timestamptz` column, for exact comparisons.
macro_rules! micros {
    ($col:literal) => {
        concat!("(extract(epoch FROM ", $col, ") * 1000000)::bigint")
    };
}

impl Db {
    /// The cache's bytes in the bucket and its number of images.
    pub async fn cache_usage(&self) -> Result<ClusterCacheUsage, PgError> {
        let client = self.client().await?;
        let bytes: i64 = client.query_one(USAGE, &[]).await?.get(0);
        let images: i64 = client
            .query_one(
                "SELECT count(*) FROM repo_manifests rm
                  WHERE NOT rm.pushed AND NOT EXISTS (
                        SELECT 1 FROM manifest_children mc
                          JOIN repo_manifests p ON p.digest = mc.manifest_digest
                                               AND p.repo_id = rm.repo_id AND NOT p.pushed
                         WHERE mc.child_digest = rm.digest)",
                &[],
            )
            .await?
            .get(0);
        Ok(ClusterCacheUsage {
            cached_bytes: u64::try_from(bytes).unwrap_or(0),
            images: u64::try_from(images).unwrap_or(0),
        })
    }
}

/// One budgeted pass, if no other replica ran one within `every`; `None` when another holds
/// the job. `lease` should outlast the pass (an overlapping pass stays safe: every removal
/// re-checks under its locks).
pub async fn evict_cache_job(
    db: &Db,
    objects: &Objects,
    owner: &str,
    budget: Budget,
    lease: Duration,
    every: Duration,
    events: EvictEvents<'_>,
) -> Result<Option<ClusterEvictReport>, ClusterEvictError> {
    super::gc::as_job(
        db,
        JOB,
        owner,
        lease,
        every,
        evict_cache_recording(db, objects, budget, events),
    )
    .await
}

/// Builds the outbox records of an evicted image, from its repository's name, its root's
/// digest and a tag that named it (recorded in the image's own transaction).
pub type EvictEvents<'a> = &'a (dyn Fn(&str, &str, Option<&str>) -> Vec<Vec<u8>> + Send + Sync);

/// Records nothing.
pub fn no_events(_: &str, _: &str, _: Option<&str>) -> Vec<Vec<u8>> {
    Vec::new()
}

/// One pass: when the cached bytes exceed `max_size`, evicts least recently pulled images
/// until they are planned down to `evict_to` (or nothing more may go).
pub async fn evict_cache(
    db: &Db,
    objects: &Objects,
    budget: Budget,
) -> Result<ClusterEvictReport, ClusterEvictError> {
    evict_cache_recording(db, objects, budget, &no_events).await
}

/// `evict_cache`, recording `events` for each image evicted.
pub async fn evict_cache_recording(
    db: &Db,
    objects: &Objects,
    budget: Budget,
    events: EvictEvents<'_>,
) -> Result<ClusterEvictReport, ClusterEvictError> {
    let before = db.cache_usage().await?.cached_bytes;
    if before <= budget.max_size {
        return Ok(ClusterEvictReport {
            cached_bytes_before: before,
            cached_bytes_after: before,
            ..ClusterEvictReport::default()
        });
    }
    let need = before - budget.evict_to.min(budget.max_size);
    evict_now_recording(db, objects, Selection::Bytes(need), events).await
}

/// Evicts what `selection` names now (`transship cache evict`), pins respected.
pub async fn evict_now(
    db: &Db,
    objects: &Objects,
    selection: Selection<'_>,
) -> Result<ClusterEvictReport, ClusterEvictError> {
    evict_now_recording(db, objects, selection, &no_events).await
}

/// `evict_now`, recording `events` for each image evicted.
pub async fn evict_now_recording(
    db: &Db,
    objects: &Objects,
    selection: Selection<'_>,
    events: EvictEvents<'_>,
) -> Result<ClusterEvictReport, ClusterEvictError> {
    let mut report = ClusterEvictReport {
        cached_bytes_before: db.cache_usage().await?.cached_bytes,
        ..ClusterEvictReport::default()
    };
    let mut census = Census::take(db).await?;
    let only = match selection {
        Selection::Image(repo, digest) => {
            let Some(id) = repo_id(&db.client().await?, repo).await? else {
                report.cached_bytes_after = report.cached_bytes_before;
                return Ok(report);
            };
            Some((id, digest.to_string()))
        }
        _ => None,
    };
    let plan = census.plan(selection, only.as_ref());
    let mut freed_candidates = Vec::new();
    for image in &plan {
        match try_remove_image(db, &census, image, events).await {
            Ok(Some(removed)) => {
                report.manifests_removed += removed.manifests;
                report.tags_removed += removed.tags;
                report.images_evicted += u64::from(removed.root);
                freed_candidates.extend(
                    image
                        .blobs
                        .iter()
                        .filter(|(m, _)| removed.digests.contains(m))
                        .map(|(_, b)| b.clone()),
                );
            }
            Ok(None) => report.images_skipped += 1,
            Err(e) if gave_way(&e) => {
                tracing::debug!(error = %e, root = %image.root, "eviction of an image gave way");
                report.images_gave_way += 1;
            }
            Err(e) => return Err(e),
        }
    }
    freed_candidates.sort();
    freed_candidates.dedup();
    for blob in freed_candidates {
        let Ok(digest) = blob.parse::<Digest>() else {
            continue;
        };
        if let Some(size) = remove_blob(db, objects, &digest, Keep::Linked).await? {
            report.blobs_removed += 1;
            report.bytes_freed += size;
        }
    }
    report.cached_bytes_after = db.cache_usage().await?.cached_bytes;
    Ok(report)
}

/// A cached manifest as the census saw it.
pub(super) struct Member {
    pub(super) repo_id: i64,
    pub(super) digest: String,
    /// `linked_at` and `cache_access.last_pulled` (0: none) in microseconds: any change since
    /// spares it.
    pub(super) linked_us: i64,
    pub(super) pulled_us: i64,
    pub(super) children: Vec<String>,
    pub(super) blobs: Vec<String>,
    /// Images it belongs to (a child listed by two indexes belongs to both).
    pub(super) images: u32,
}

/// A stored blob a cached manifest references.
pub(super) struct BlobFacts {
    pub(super) size: u64,
    /// Held by a push (a pushed link, or a pushed manifest references it): never evicted.
    pub(super) pushed: bool,
    /// Cached manifests referencing it.
    pub(super) refs: u32,
}

pub(super) struct Census {
    /// Microseconds, the census's `now()`.
    pub(super) started_us: i64,
    pub(super) members: Vec<Member>,
    pub(super) by_key: HashMap<(i64, String), usize>,
    pub(super) blobs: HashMap<String, BlobFacts>,
    /// Pins on cached digests: (repo, digest) → the platform lists of its pins.
    pub(super) pins: HashMap<(i64, String), Vec<Vec<String>>>,
}

/// One image the plan removes: the members that go (root first if it goes), the root's pin
/// state as the census saw it, and each member's blobs.
struct Doomed {
    repo_id: i64,
    root: String,
    root_goes: bool,
    root_pinned: bool,
    /// (digest, linked_us, pulled_us)
    members: Vec<(String, i64, i64)>,
    /// (member digest, blob digest) of blobs whose last cached reference goes.
    blobs: Vec<(String, String)>,
}

impl Census {
    pub(super) async fn take(db: &Db) -> Result<Self, ClusterEvictError> {
        let mut client = db.client().await?;
        // One snapshot for every read.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let started_us: i64 = tx
            .query_one(concat!("SELECT ", micros!("now()")), &[])
            .await?
            .get(0);
        let mut members = Vec::new();
        let mut by_key = HashMap::new();
        for row in tx
            .query(
                concat!(
                    "SELECT rm.repo_id, rm.digest, ",
                    micros!("rm.linked_at"),
                    ", COALESCE(",
                    micros!("ca.last_pulled"),
                    ", 0)
                       FROM repo_manifests rm
                       LEFT JOIN cache_access ca ON ca.repo_id = rm.repo_id AND ca.digest = rm.digest
                      WHERE NOT rm.pushed"
                ),
                &[],
            )
            .await?
        {
            let (repo_id, digest): (i64, String) = (row.get(0), row.get(1));
            by_key.insert((repo_id, digest.clone()), members.len());
            members.push(Member {
                repo_id,
                digest,
                linked_us: row.get(2),
                pulled_us: row.get(3),
                children: Vec::new(),
                blobs: Vec::new(),
                images: 0,
            });
        }
        // What each lists: (table, column) of its children, then of its blobs.
        for (table, column, children) in [
            ("manifest_children", "child_digest", true),
            ("manifest_blobs", "blob_digest", false),
        ] {
            let sql = format!(
                "SELECT rm.repo_id, x.manifest_digest, x.{column}
                   FROM repo_manifests rm JOIN {table} x ON x.manifest_digest = rm.digest
                  WHERE NOT rm.pushed"
            );
            for row in tx.query(&sql, &[]).await? {
                if let Some(&i) = by_key.get(&(row.get::<_, i64>(0), row.get::<_, String>(1))) {
                    let m = &mut members[i];
                    if children {
                        &mut m.children
                    } else {
                        &mut m.blobs
                    }
                    .push(row.get(2));
                }
            }
        }
        let mut blobs = HashMap::new();
        for row in tx
            .query(
                "SELECT b.digest, b.size,
                        EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = b.digest AND rb.pushed)
                     OR EXISTS (SELECT 1 FROM manifest_blobs mb
                                  JOIN repo_manifests rm ON rm.digest = mb.manifest_digest
                                 WHERE mb.blob_digest = b.digest AND rm.pushed)
                   FROM blobs b
                  WHERE b.digest IN (SELECT mb.blob_digest FROM manifest_blobs mb
                                       JOIN repo_manifests rm ON rm.digest = mb.manifest_digest
                                      WHERE NOT rm.pushed)",
                &[],
            )
            .await?
        {
            blobs.insert(
                row.get::<_, String>(0),
                BlobFacts {
                    size: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                    pushed: row.get(2),
                    refs: 0,
                },
            );
        }
        let mut pins: HashMap<(i64, String), Vec<Vec<String>>> = HashMap::new();
        for row in tx.query(PINS, &[]).await? {
            pins.entry((row.get(0), row.get(1)))
                .or_default()
                .push(row.get(2));
        }
        tx.commit().await?;
        for m in &members {
            for b in m.blobs.iter().collect::<HashSet<_>>() {
                if let Some(f) = blobs.get_mut(b) {
                    f.refs += 1;
                }
            }
        }
        let mut census = Self {
            started_us,
            members,
            by_key,
            blobs,
            pins,
        };
        census.load_platform_pins(db).await?;
        Ok(census)
    }

    /// Root indexes pinned for some platforms only: their children's platforms, read from the
    /// index, decide which children the pin keeps (stored as pins of the kept children).
    async fn load_platform_pins(&mut self, db: &Db) -> Result<(), ClusterEvictError> {
        let partial: Vec<(i64, String, Vec<String>)> = self
            .pins
            .iter()
            .filter(|(_, lists)| lists.iter().all(|l| !l.is_empty()))
            .map(|((r, d), lists)| (*r, d.clone(), lists.concat()))
            .collect();
        if partial.is_empty() {
            return Ok(());
        }
        let client = db.client().await?;
        for (repo, digest, platforms) in partial {
            let Some(row) = client
                .query_opt(
                    "SELECT media_type, body FROM manifests WHERE digest = $1",
                    &[&digest],
                )
                .await?
            else {
                continue;
            };
            let Ok(parsed) = ParsedManifest::parse(row.get::<_, &[u8]>(1), row.get(0)) else {
                continue;
            };
            for child in parsed.child_manifests() {
                let kept = child
                    .platform
                    .as_ref()
                    .is_some_and(|p| platforms.iter().any(|s| p.matches(s)));
                if kept {
                    self.pins
                        .entry((repo, child.digest.to_string()))
                        .or_default()
                        .push(Vec::new());
                }
            }
        }
        Ok(())
    }

    /// Whether a pin keeps this manifest whole.
    pub(super) fn pinned_whole(&self, repo: i64, digest: &str) -> bool {
        self.pins
            .get(&(repo, digest.to_string()))
            .is_some_and(|lists| lists.iter().any(Vec::is_empty))
    }

    pub(super) fn pinned_at_all(&self, repo: i64, digest: &str) -> bool {
        self.pins.contains_key(&(repo, digest.to_string()))
    }

    /// The images, each as (root, members reachable from it), with every member's image count.
    pub(super) fn images(&mut self) -> Vec<(usize, Vec<usize>)> {
        let listed: HashSet<(i64, &str)> = self
            .members
            .iter()
            .flat_map(|m| m.children.iter().map(move |c| (m.repo_id, c.as_str())))
            .collect();
        let roots: Vec<usize> = (0..self.members.len())
            .filter(|&i| !listed.contains(&(self.members[i].repo_id, &self.members[i].digest)))
            .collect();
        let mut images = Vec::new();
        for root in roots {
            let mut seen = vec![root];
            let mut next = 0;
            while next < seen.len() {
                let m = &self.members[seen[next]];
                for c in &m.children {
                    if let Some(&i) = self.by_key.get(&(m.repo_id, c.clone()))
                        && !seen.contains(&i)
                    {
                        seen.push(i);
                    }
                }
                next += 1;
            }
            for &i in &seen {
                self.members[i].images += 1;
            }
            images.push((root, seen));
        }
        images
    }

    /// Chooses the images to evict, oldest pull first, simulating reference counts.
    fn plan(&mut self, selection: Selection<'_>, only: Option<&(i64, String)>) -> Vec<Doomed> {
        let mut images = self.images();
        // The newest pull of any of its manifests; when none was pulled, when its root came.
        let last_pull = |members: &[Member], set: &[usize]| {
            set.iter()
                .map(|&i| members[i].pulled_us)
                .max()
                .filter(|&t| t > 0)
                .unwrap_or_else(|| set.first().map_or(0, |&r| members[r].linked_us))
        };
        images.retain(|(root, _)| {
            let r = &self.members[*root];
            !self.pinned_whole(r.repo_id, &r.digest)
                && only.is_none_or(|(repo, d)| r.repo_id == *repo && r.digest == *d)
        });
        images.sort_by_cached_key(|(root, set)| {
            let r = &self.members[*root];
            (last_pull(&self.members, set), r.repo_id, r.digest.clone())
        });
        let mut planned = 0u64;
        let mut plan = Vec::new();
        for (root, set) in images {
            match selection {
                Selection::Bytes(need) if planned >= need => break,
                Selection::PulledBefore(t)
                    if last_pull(&self.members, &set)
                        >= i64::try_from(t.saturating_mul(1_000_000)).unwrap_or(i64::MAX) =>
                {
                    continue;
                }
                _ => {}
            }
            let (repo_id, root_digest) = (
                self.members[root].repo_id,
                self.members[root].digest.clone(),
            );
            let root_pinned = self.pinned_at_all(repo_id, &root_digest);
            let mut doomed = Doomed {
                repo_id,
                root: root_digest.clone(),
                root_goes: false,
                root_pinned,
                members: Vec::new(),
                blobs: Vec::new(),
            };
            for i in set {
                let m = &mut self.members[i];
                // A partially pinned root stays (its kept children need it), as do the
                // children its platforms keep and children pinned themselves.
                if self.pins.contains_key(&(m.repo_id, m.digest.clone())) {
                    continue;
                }
                m.images -= 1;
                if m.images > 0 {
                    continue;
                }
                if m.digest == root_digest {
                    doomed.root_goes = true;
                }
                doomed
                    .members
                    .push((m.digest.clone(), m.linked_us, m.pulled_us));
                for b in m.blobs.iter().collect::<HashSet<_>>() {
                    let Some(f) = self.blobs.get_mut(b) else {
                        continue;
                    };
                    f.refs = f.refs.saturating_sub(1);
                    if f.refs == 0 && !f.pushed {
                        planned += f.size;
                        doomed.blobs.push((m.digest.clone(), b.clone()));
                    }
                }
            }
            if !doomed.members.is_empty() {
                plan.push(doomed);
            }
        }
        plan
    }
}

/// Pins on digests: digest pins, and tag pins through the digest their tag names now.
const PINS: &str = "SELECT repo_id, digest, platforms FROM cache_pins
                    UNION ALL
                    SELECT t.repo_id, t.digest, p.platforms
                      FROM cache_tag_pins p JOIN tags t ON t.repo_id = p.repo_id AND t.tag = p.tag";

/// What one image's transaction removed.
struct Removed {
    /// The members removed.
    digests: HashSet<String>,
    manifests: u64,
    tags: u64,
    /// Its root went.
    root: bool,
}

/// Whether removing an image failed only because a concurrent writer won a deadlock or a
/// serialization conflict against it (the image is left for a later pass).
fn gave_way(e: &ClusterEvictError) -> bool {
    matches!(e, ClusterEvictError::Pg(PgError::Query(e))
        if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
            || e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE))
}

/// Removes one planned image (see the module header); `None` if it changed since the census.
async fn try_remove_image(
    db: &Db,
    census: &Census,
    image: &Doomed,
    events: EvictEvents<'_>,
) -> Result<Option<Removed>, ClusterEvictError> {
    let mut client = db.client().await?;
    let tx = client.transaction().await?;
    let repo = image.repo_id;
    let mut digests: Vec<String> = image.members.iter().map(|(d, _, _)| d.clone()).collect();
    digests.sort();
    // Children in byte order first, then the root: the order a push of the index takes them
    // (its children `FOR KEY SHARE`, then its own row), so the two cannot deadlock.
    let lock = concat!(
        r#"SELECT digest, pushed, "#,
        micros!("linked_at"),
        r#" FROM repo_manifests WHERE repo_id = $1 AND digest = ANY($2) AND (digest = $3) = $4
           ORDER BY digest COLLATE "C" FOR UPDATE"#
    );
    let mut locked = Vec::new();
    for root in [false, true] {
        locked.extend(
            tx.query(lock, &[&repo, &digests, &image.root, &root])
                .await?,
        );
    }
    // New statements from here: they see what committed while the locks were awaited.
    let pulled: HashMap<String, i64> = tx
        .query(
            concat!(
                "SELECT digest, ",
                micros!("last_pulled"),
                " FROM cache_access WHERE repo_id = $1 AND digest = ANY($2)"
            ),
            &[&repo, &digests],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Pins on the members and on the root (which stays when partially pinned); the image's
    // own manifests are these too.
    let mut pin_targets = digests.clone();
    pin_targets.push(image.root.clone());
    let pin_rows = tx
        .query(
            &format!(
                "SELECT digest, platforms FROM ({PINS}) p WHERE repo_id = $1 AND digest = ANY($2)"
            ),
            &[&repo, &pin_targets],
        )
        .await?;
    let pinned: HashSet<String> = pin_rows.iter().map(|r| r.get(0)).collect();
    let root_whole = pin_rows
        .iter()
        .any(|r| r.get::<_, &str>(0) == image.root && r.get::<_, Vec<String>>(1).is_empty());
    let still_listed: HashSet<String> = tx
        .query(
            "SELECT mc.child_digest FROM manifest_children mc
               JOIN repo_manifests rm ON rm.digest = mc.manifest_digest AND rm.repo_id = $1
              WHERE mc.child_digest = ANY($2) AND NOT (mc.manifest_digest = ANY($3))",
            &[&repo, &digests, &pin_targets],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let unchanged: HashSet<String> = locked
        .iter()
        .filter(|r| !r.get::<_, bool>(1))
        .filter_map(|r| {
            let d: String = r.get(0);
            let (_, linked, seen_pull) = image.members.iter().find(|(m, _, _)| *m == d)?;
            let pull = pulled.get(&d).copied().unwrap_or(0);
            (r.get::<_, i64>(2) == *linked && pull == *seen_pull).then_some(d)
        })
        .collect();
    // The root changed, or got pinned since: the whole image stays.
    if image.root_goes && !unchanged.contains(&image.root)
        || !image.root_pinned && pinned.contains(&image.root)
        || root_whole
    {
        return Ok(None);
    }
    let gone: Vec<String> = digests
        .into_iter()
        .filter(|d| unchanged.contains(d) && !pinned.contains(d) && !still_listed.contains(d))
        .collect();
    if gone.is_empty() {
        return Ok(None);
    }
    let manifests = tx
        .execute(
            "DELETE FROM repo_manifests WHERE repo_id = $1 AND digest = ANY($2)",
            &[&repo, &gone],
        )
        .await?;
    let tags_gone = tx
        .query(
            "WITH gone AS (DELETE FROM tags WHERE repo_id = $1 AND digest = ANY($2)
                           RETURNING tag, digest),
                  history AS (INSERT INTO tag_history (repo_id, tag, digest, previous)
                              SELECT $1, tag, NULL, digest FROM gone)
             SELECT tag, digest FROM gone ORDER BY tag COLLATE \"C\"",
            &[&repo, &gone],
        )
        .await?;
    let tags = tags_gone.len() as u64;
    // `cache.evict` for the image whose root goes, with a tag it had (as locally); inserted
    // last, just before the commit: the outbox lock must be the last lock taken.
    let recorded = match gone.contains(&image.root) {
        true => {
            let name: String = tx
                .query_one("SELECT name FROM repositories WHERE id = $1", &[&repo])
                .await?
                .get(0);
            let tag = tags_gone
                .iter()
                .find(|r| r.get::<_, &str>(1) == image.root)
                .map(|r| r.get::<_, &str>(0));
            events(&name, &image.root, tag)
        }
        false => Vec::new(),
    };
    for table in ["cache_access", "referrers"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE repo_id = $1 AND digest = ANY($2)"),
            &[&repo, &gone],
        )
        .await?;
    }
    // The repository's pull-through links of blobs nothing left in it references (a link
    // made since the census may be a fill for an image being pulled again: it stays).
    let blobs: Vec<String> = gone
        .iter()
        .filter_map(|d| census.by_key.get(&(repo, d.clone())))
        .flat_map(|&i| census.members[i].blobs.iter().cloned())
        .collect();
    tx.execute(
        concat!(
            "DELETE FROM repo_blobs rb
              WHERE rb.repo_id = $1 AND NOT rb.pushed AND rb.digest = ANY($2) AND ",
            micros!("rb.linked_at"),
            " < $3
                AND NOT EXISTS (SELECT 1 FROM manifest_blobs mb
                                  JOIN repo_manifests rm ON rm.digest = mb.manifest_digest
                                                        AND rm.repo_id = $1
                                 WHERE mb.blob_digest = rb.digest)"
        ),
        &[&repo, &blobs, &census.started_us],
    )
    .await?;
    super::events::insert_events(&tx, &recorded).await?;
    tx.commit().await?;
    Ok(Some(Removed {
        root: gone.contains(&image.root),
        digests: gone.into_iter().collect(),
        manifests,
        tags,
    }))
}
