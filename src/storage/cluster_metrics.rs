//! The cluster profile's read cache as Prometheus sees it: its size sampled at scrape time, and
//! its cumulative outcomes turned into counter increments (each increment counted once even
//! when scrapes overlap).

use std::sync::Mutex;

use super::read_cache::{ReadCache, ReadCacheStats};
use crate::metrics::Metrics;

/// What the counters already hold.
static REPORTED: Mutex<ReadCacheStats> = Mutex::new(ReadCacheStats {
    hits: 0,
    fetches: 0,
    shared: 0,
    evicted: 0,
});

/// Brings the read-cache metrics up to date.
pub fn sample(cache: &ReadCache, metrics: &Metrics) {
    let (bytes, files) = cache.usage();
    metrics
        .read_cache_bytes
        .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    metrics
        .read_cache_files
        .set(i64::try_from(files).unwrap_or(i64::MAX));
    let now = cache.stats();
    let mut reported = REPORTED.lock().unwrap_or_else(|p| p.into_inner());
    for (event, now, before) in [
        ("hit", now.hits, reported.hits),
        ("fetch", now.fetches, reported.fetches),
        ("shared", now.shared, reported.shared),
        ("evicted", now.evicted, reported.evicted),
    ] {
        metrics
            .read_cache_events
            .with_label_values(&[event])
            .inc_by(now.saturating_sub(before));
    }
    *reported = now;
}
