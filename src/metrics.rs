//! Prometheus metrics: one registry per `App` (so tests and embedded servers never share
//! state) with the handles the server updates. Gauges that mirror store state are refreshed
//! when `/metrics` is scraped, not on the request path.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
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
                        "HTTP requests by method, route and status",
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
                "Blob and manifest body bytes sent",
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
