//! Prometheus metrics: one registry per `App` (so tests and embedded servers never share
//! state) with the handles the server updates. Gauges that mirror store state are refreshed
//! when `/metrics` is scraped, not on the request path.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub bytes_sent: IntCounter,
    pub bytes_received: IntCounter,
    pub stored_bytes: IntGauge,
    pub stored_blobs: IntGauge,
    pub uploads_active: IntGauge,
    pub gc_runs: IntCounter,
    pub gc_bytes_freed: IntCounter,
    pub uploads_reaped: IntCounter,
    pub cache_requests: IntCounterVec,
    pub cache_bytes: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_bytes: IntCounterVec,
    pub upstream_ratelimit_limit: IntGaugeVec,
    pub upstream_ratelimit_remaining: IntGaugeVec,
    pub digest_mismatches: IntCounterVec,
    /// Requests refused by access control, by outcome.
    pub auth_denials: IntCounterVec,
    pub tokens_issued: IntCounter,
    pub scrub_passes: IntCounter,
    pub scrub_bytes: IntCounter,
    pub scrub_corrupt: IntCounter,
    pub cache_cached_bytes: IntGauge,
    pub cache_pinned_bytes: IntGauge,
    pub cache_pushed_bytes: IntGauge,
    pub cache_max_bytes: IntGauge,
    pub cache_images: IntGauge,
    pub cache_pins_over_budget: IntGauge,
    pub cache_evicted_images: IntCounter,
    pub cache_evicted_bytes: IntCounter,
    pub cache_eviction_seconds: prometheus::Histogram,
    pub disk_free_bytes: IntGauge,
    /// Fills and pushes refused because the data directory is short of space.
    pub space_refusals: IntCounterVec,
    /// Event deliveries by endpoint and outcome (delivered, failed, dead_lettered).
    pub events: IntCounterVec,
    /// Outbox events an endpoint has not reached yet.
    pub events_pending: IntGaugeVec,
    /// Access lines dropped because standard output fell behind (caught up at scrape time).
    pub log_dropped_lines: IntCounter,
    /// The cluster profile's read cache: bytes and files held (sampled at scrape time).
    pub read_cache_bytes: IntGauge,
    pub read_cache_files: IntGauge,
    /// Read-cache lookups by outcome (hit, fetch, shared, evicted), caught up at scrape time.
    pub read_cache_events: IntCounterVec,
    /// Cluster profile: blob fills completed, by where the bytes came from.
    pub cluster_fills: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let counter =
            |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid metric"));
        let gauge =
            |name: &str, help: &str| reg(&r, IntGauge::new(name, help).expect("valid metric"));
        Self {
            requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "transship_http_requests_total",
                        "HTTP requests by method (unknown methods counted as other), route and status",
                    ),
                    &["method", "route", "status"],
                )
                .expect("valid metric"),
            ),
            duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "transship_http_request_duration_seconds",
                        "Time to produce response headers, by route and status",
                    )
                    .buckets(vec![
                        0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
                    ]),
                    &["route", "status"],
                )
                .expect("valid metric"),
            ),
            bytes_sent: counter(
                "transship_http_sent_bytes_total",
                "Response body bytes sent (blobs, manifests, JSON documents and error bodies)",
            ),
            bytes_received: counter(
                "transship_http_received_bytes_total",
                "Request body bytes received",
            ),
            stored_bytes: gauge(
                "transship_store_bytes",
                "Bytes in the content-addressed blob store",
            ),
            stored_blobs: gauge(
                "transship_store_blobs",
                "Blobs in the content-addressed blob store",
            ),
            uploads_active: gauge("transship_uploads_active", "Upload sessions in progress"),
            gc_runs: counter("transship_gc_runs_total", "Garbage collection runs"),
            gc_bytes_freed: counter(
                "transship_gc_freed_bytes_total",
                "Bytes freed by garbage collection",
            ),
            uploads_reaped: counter(
                "transship_uploads_reaped_total",
                "Abandoned upload sessions removed",
            ),
            cache_requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("transship_cache_requests_total", "Pull-through requests by upstream, kind (manifest, blob, tags) and result (HIT, MISS, STALE, COALESCED)"),
                    &["upstream", "kind", "result"],
                )
                .expect("valid metric"),
            ),
            cache_bytes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("transship_cache_served_bytes_total", "Pull-through body bytes announced to clients, by upstream, kind and result"),
                    &["upstream", "kind", "result"],
                )
                .expect("valid metric"),
            ),
            upstream_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("transship_upstream_request_duration_seconds", "Time until upstream response headers, by upstream")
                        .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                    &["upstream"],
                )
                .expect("valid metric"),
            ),
            auth_denials: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "transship_auth_denials_total",
                        "Requests refused by access control: unauthenticated (401), forbidden (403), throttled (429), malformed (400)",
                    ),
                    &["outcome"],
                )
                .expect("valid metric"),
            ),
            tokens_issued: counter(
                "transship_auth_tokens_issued_total",
                "Tokens issued by the token endpoint",
            ),
            upstream_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("transship_upstream_errors_total", "Upstream failures by upstream and status (or timeout, connect, protocol)"),
                    &["upstream", "status"],
                )
                .expect("valid metric"),
            ),
            upstream_bytes: reg(
                &r,
                IntCounterVec::new(Opts::new("transship_upstream_fetched_bytes_total", "Blob bytes fetched from upstreams"), &["upstream"])
                    .expect("valid metric"),
            ),
            upstream_ratelimit_limit: reg(
                &r,
                IntGaugeVec::new(Opts::new("transship_upstream_ratelimit_limit", "The upstream's last ratelimit-limit header"), &["upstream"])
                    .expect("valid metric"),
            ),
            upstream_ratelimit_remaining: reg(
                &r,
                IntGaugeVec::new(Opts::new("transship_upstream_ratelimit_remaining", "The upstream's last ratelimit-remaining header"), &["upstream"])
                    .expect("valid metric"),
            ),
            digest_mismatches: reg(
                &r,
                IntCounterVec::new(Opts::new("transship_upstream_digest_mismatches_total", "Upstream blobs or manifests that failed verification (never cached)"), &["upstream"])
                    .expect("valid metric"),
            ),
            scrub_passes: counter(
                "transship_scrub_passes_total",
                "Scrub passes completed over every stored blob",
            ),
            scrub_bytes: counter(
                "transship_scrub_bytes_total",
                "Stored blob bytes re-read and re-hashed by scrub",
            ),
            scrub_corrupt: counter(
                "transship_scrub_corrupt_total",
                "Stored blobs scrub found damaged (wrong hash or size, unreadable, missing) and quarantined",
            ),
            cache_cached_bytes: gauge(
                "transship_cache_cached_bytes",
                "Bytes of cached (pull-through) blobs, counted against cache.max_size (as of the last eviction check that took a census)",
            ),
            cache_pinned_bytes: gauge(
                "transship_cache_pinned_bytes",
                "Cached bytes held by pins (never evicted)",
            ),
            cache_pushed_bytes: gauge(
                "transship_cache_pushed_bytes",
                "Bytes of pushed blobs (not in the cache budget, never evicted)",
            ),
            cache_max_bytes: gauge(
                "transship_cache_max_bytes",
                "cache.max_size in bytes (0: no budget)",
            ),
            cache_images: gauge("transship_cache_images", "Cached images (root manifests)"),
            cache_pins_over_budget: gauge(
                "transship_cache_pins_over_budget",
                "1 when pinned bytes alone exceed cache.max_size",
            ),
            cache_evicted_images: counter(
                "transship_cache_evicted_images_total",
                "Cached images evicted",
            ),
            cache_evicted_bytes: counter(
                "transship_cache_evicted_bytes_total",
                "Blob bytes freed by eviction",
            ),
            cache_eviction_seconds: reg(
                &r,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "transship_cache_eviction_duration_seconds",
                        "Time of eviction checks that took a census",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]),
                )
                .expect("valid metric"),
            ),
            disk_free_bytes: gauge(
                "transship_disk_free_bytes",
                "Free bytes on the data directory's filesystem (as of the last eviction check)",
            ),
            space_refusals: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "transship_space_refusals_total",
                        "Fills and pushes refused because free disk space is below cache.min_free_disk, by kind (fill, push)",
                    ),
                    &["kind"],
                )
                .expect("valid metric"),
            ),
            events: reg(
                &r,
                IntCounterVec::new(Opts::new("transship_events_total", "Notification deliveries by endpoint and outcome: delivered, failed (an attempt; retried), dead_lettered"), &["endpoint", "outcome"])
                    .expect("valid metric"),
            ),
            events_pending: reg(
                &r,
                IntGaugeVec::new(Opts::new("transship_events_pending", "Outbox events an endpoint has not delivered yet"), &["endpoint"])
                    .expect("valid metric"),
            ),
            log_dropped_lines: counter(
                "transship_log_dropped_lines_total",
                "Access log lines dropped because standard output could not keep up",
            ),
            read_cache_bytes: gauge(
                "transship_read_cache_bytes",
                "Bytes in this replica's read cache of bucket blobs (cluster profile)",
            ),
            read_cache_files: gauge(
                "transship_read_cache_files",
                "Blobs in this replica's read cache (cluster profile)",
            ),
            read_cache_events: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "transship_read_cache_events_total",
                        "Read cache outcomes (cluster profile): hit (served from a local file), fetch (read from the bucket), shared (waited for another request's fetch), evicted (file removed to stay within the budget)",
                    ),
                    &["event"],
                )
                .expect("valid metric"),
            ),
            cluster_fills: reg(
                &r,
                IntCounterVec::new(Opts::new("transship_cluster_fills_total", "Cluster profile: blob fills completed, by source: upstream (this replica fetched it for the cluster), replica (streamed from the replica fetching it), bucket, takeover (the upstream, after the fetching replica died)"), &["source"])
                    .expect("valid metric"),
            ),
            registry: r,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The `method` label of a request: one of a fixed set, so a client inventing methods cannot
/// add series (each label value is a new series, kept until restart).
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_share_one_label() {
        for m in ["FOO", "BREW", "PROPFIND", "get", "CONNECT", "TRACE"] {
            let m = http::Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(method_label(&m), "other", "{m}");
        }
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
    }
}
