//! One delivery task per `[[notify]]` endpoint: reads the outbox in sequence order from the
//! endpoint's cursor, POSTs each wanted event, retries a failure with capped exponential
//! backoff until the event is `max_age` old, then dead-letters it and moves on. The cursor
//! advances only after an event is delivered or dead-lettered, so a crash means redelivery
//! (at least once), never loss. The task shares nothing with the request path but the
//! outbox: a slow or dead receiver delays only its own endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use tokio_util::sync::CancellationToken;

use super::format::{self, Body};
use super::source::Source;
use crate::cluster::pg::PgError;
use crate::config::{NotifyConfig, NotifyFormat};
use crate::metrics::Metrics;
use crate::store::StoreError;
use crate::store::outbox::{Kinds, PRUNE_BATCH, StoredEvent};

/// Events read from the outbox at a time.
const BATCH: usize = 64;
/// First retry delay; doubled after each failure up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a dead letter `transship events retry` marked is tried again.
const RETRY_BUDGET: Duration = Duration::from_secs(60);
/// How long a task pauses after a failed round.
const ERROR_PAUSE: Duration = Duration::from_secs(5);

type HttpsClient = crate::proxy::web_client::WebClient<Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("receiver answered {0}")]
    Status(http::StatusCode),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Request(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("another replica delivers this endpoint's events now")]
    NotHeld,
}

/// An endpoint as the delivery task uses it.
pub struct Endpoint {
    pub id: String,
    pub url: http::Uri,
    pub format: NotifyFormat,
    pub kinds: Kinds,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub secret: Option<String>,
    pub timeout: Duration,
    pub max_age: Duration,
    pub host: String,
}

impl Endpoint {
    pub fn from_config(c: &NotifyConfig, default_host: &str) -> Option<Self> {
        Some(Self {
            id: c.id(),
            url: c.url.parse().ok()?,
            format: c.format,
            kinds: c.events.iter().map(|e| super::kind_of(*e)).collect(),
            headers: c
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                        http::HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            secret: c.secret.as_ref().map(|s| s.expose().to_string()),
            timeout: c.timeout.0,
            max_age: c.max_age.0,
            host: c.host.clone().unwrap_or_else(|| default_host.to_string()),
        })
    }
}

pub fn client() -> HttpsClient {
    crate::proxy::web_client::web_client(Duration::from_secs(10))
}

/// What one task needs.
pub struct Task {
    pub endpoint: Arc<Endpoint>,
    /// Where the outbox lives: this replica's store or the cluster's database.
    pub source: Source,
    pub metrics: Arc<Metrics>,
    pub client: HttpsClient,
    /// Every endpoint's cursor (for pruning) and this one's index in it.
    pub cursors: Arc<Vec<AtomicU64>>,
    pub index: usize,
    /// Outbox events up to here were pruned by this task.
    pub pruned: AtomicU64,
    /// The last event ran out its `max_age` without being delivered: until one is delivered
    /// again, events already past their own `max_age` are dead-lettered without a POST each
    /// (a black-holed receiver would otherwise cost a full `timeout` per backlogged event).
    pub receiver_down: std::sync::atomic::AtomicBool,
}

enum Outcome {
    Delivered,
    DeadLettered,
    Cancelled,
}

impl Task {
    fn label(&self, outcome: &str) {
        self.metrics
            .events
            .with_label_values(&[self.endpoint.id.as_str(), outcome])
            .inc();
    }

    /// Runs until `cancel`; store errors are logged and retried after a pause. In the
    /// cluster, a round runs only while this replica holds the endpoint, and ends (with the
    /// event in hand delivered again by the new holder) if the lease is lost meanwhile.
    pub async fn run(self, cancel: CancellationToken) {
        let mut seen_retry = 0;
        while !cancel.is_cancelled() {
            let round = tokio::select! {
                r = self.round(&cancel, &mut seen_retry) => r,
                () = self.source.keep(&self.endpoint.id) => Ok(()),
            };
            match round {
                Ok(()) => {}
                Err(DeliveryError::NotHeld) => {
                    tracing::warn!(endpoint = %self.endpoint.id, "another replica took the endpoint's events over");
                }
                Err(e) => {
                    tracing::error!(endpoint = %self.endpoint.id, error = %e, "event delivery");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(ERROR_PAUSE) => {}
                    }
                }
            }
        }
        self.source.release(&self.endpoint.id).await;
    }

    /// Delivers what the outbox holds for this endpoint, or waits for more.
    async fn round(
        &self,
        cancel: &CancellationToken,
        seen_retry: &mut u64,
    ) -> Result<(), DeliveryError> {
        let woken = self.source.notify().notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if !self
            .source
            .hold(&self.endpoint.id, &self.cursors[self.index])
            .await?
        {
            // Another replica delivers this endpoint; look again after a while.
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(self.source.idle_poll()) => {}
            }
            return Ok(());
        }
        if self
            .source
            .retry_wanted(&self.endpoint.id, seen_retry)
            .await?
        {
            self.deliver_retries(cancel).await?;
        }
        let cursor = self.cursors[self.index].load(Ordering::Acquire);
        let (events, upto) = self.source.events_after(cursor, BATCH).await?;
        let pending = upto.saturating_sub(cursor);
        self.metrics
            .events_pending
            .with_label_values(&[self.endpoint.id.as_str()])
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        if events.is_empty() {
            if upto > cursor {
                // Only numbers whose batch failed: nothing to deliver, move past them.
                self.advance(upto).await?;
            }
            self.prune().await?;
            tokio::select! {
                () = cancel.cancelled() => {}
                () = &mut woken => {}
                () = tokio::time::sleep(self.source.idle_poll()) => {}
            }
            return Ok(());
        }
        let complete = events.len() < BATCH;
        // Events this endpoint does not want are passed over without a cursor write each
        // (pull events can be many): the cursor moves past them with the next delivered one,
        // or once at the end of the batch.
        let mut passed = None;
        for ev in events {
            let seq = ev.seq;
            let Some(body) = self.body_for(&ev) else {
                passed = Some(seq);
                continue;
            };
            let deadline = UNIX_EPOCH + Duration::from_millis(ev.record.time_ms);
            match self
                .deliver(&ev, &body, deadline + self.endpoint.max_age, cancel)
                .await
            {
                Outcome::Delivered => {}
                Outcome::Cancelled => return Ok(()),
                Outcome::DeadLettered => self.source.dead_letter(&self.endpoint.id, &ev).await?,
            }
            self.advance(seq).await?;
            passed = None;
        }
        if let Some(seq) = passed {
            self.advance(seq).await?;
        }
        if complete && upto > self.cursors[self.index].load(Ordering::Acquire) {
            self.advance(upto).await?;
        }
        self.prune().await
    }

    fn body_for(&self, ev: &StoredEvent) -> Option<Body> {
        if !self.endpoint.kinds.contains(ev.record.action) {
            return None;
        }
        format::render(
            self.endpoint.format,
            &self.endpoint.host,
            self.source.instance(),
            ev,
        )
    }

    async fn advance(&self, seq: u64) -> Result<(), DeliveryError> {
        self.source.set_cursor(&self.endpoint.id, seq).await?;
        self.cursors[self.index].store(seq, Ordering::Release);
        Ok(())
    }

    /// Drops outbox events every endpoint is past (the outbox stays as long as the slowest
    /// endpoint's backlog, which `max_age` bounds).
    async fn prune(&self) -> Result<(), DeliveryError> {
        let min = self.source.min_cursor(&self.cursors).await?;
        let after = self.pruned.load(Ordering::Acquire);
        if min <= after {
            return Ok(());
        }
        let n = self.source.prune(after, min).await?;
        if n < PRUNE_BATCH {
            self.pruned.store(min, Ordering::Release);
        }
        Ok(())
    }

    /// Dead letters `transship events retry` marked: each gets `RETRY_BUDGET` (at most its
    /// `max_age`) of tries, so a retry while the receiver is still down holds new events back
    /// for minutes, not days.
    async fn deliver_retries(&self, cancel: &CancellationToken) -> Result<(), DeliveryError> {
        let dead = self.source.dead_letters(&self.endpoint.id).await?;
        for d in dead.into_iter().filter(|d| d.retry) {
            let Some(body) = self.body_for(&d.event) else {
                continue;
            };
            let deadline = SystemTime::now() + self.endpoint.max_age.min(RETRY_BUDGET);
            let id = &self.endpoint.id;
            match self.deliver(&d.event, &body, deadline, cancel).await {
                Outcome::Cancelled => return Ok(()),
                Outcome::Delivered => self.source.forget_dead_letter(id, d.event.seq).await?,
                Outcome::DeadLettered => self.source.dead_letter(id, &d.event).await?,
            }
        }
        Ok(())
    }

    /// Tries until delivered, `deadline` passes (dead letter) or shutdown.
    async fn deliver(
        &self,
        ev: &StoredEvent,
        body: &Body,
        deadline: SystemTime,
        cancel: &CancellationToken,
    ) -> Outcome {
        let mut backoff = FIRST_BACKOFF;
        if self.receiver_down.load(Ordering::Acquire) && deadline <= SystemTime::now() {
            self.label("dead_lettered");
            return Outcome::DeadLettered;
        }
        loop {
            let attempt = tokio::select! {
                () = cancel.cancelled() => return Outcome::Cancelled,
                r = self.post(ev, body) => r,
            };
            match attempt {
                Ok(()) => {
                    self.label("delivered");
                    self.receiver_down.store(false, Ordering::Release);
                    return Outcome::Delivered;
                }
                Err(e) => {
                    self.label("failed");
                    tracing::warn!(endpoint = %self.endpoint.id, seq = ev.seq, action = ev.record.action.as_str(), error = %e, "event delivery failed");
                    // A receiver that refuses this event for what it is (400, 404, 413, 422…)
                    // will refuse it again: dead-letter it now rather than hold every later
                    // event behind it for max_age. Timeouts, 408, 425, 429 and 5xx are retried.
                    if let DeliveryError::Status(st) = e
                        && st.is_client_error()
                        && !matches!(st.as_u16(), 408 | 425 | 429)
                    {
                        self.label("dead_lettered");
                        tracing::error!(endpoint = %self.endpoint.id, seq = ev.seq, status = st.as_u16(), "event refused by the receiver; dead-lettered (`transship events retry` sends it again)");
                        return Outcome::DeadLettered;
                    }
                }
            }
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if left.is_zero() {
                self.receiver_down.store(true, Ordering::Release);
                self.label("dead_lettered");
                tracing::error!(endpoint = %self.endpoint.id, seq = ev.seq, action = ev.record.action.as_str(), repository = %ev.record.repository, "event dead-lettered after max_age; `transship events retry` sends it again");
                return Outcome::DeadLettered;
            }
            tokio::select! {
                () = cancel.cancelled() => return Outcome::Cancelled,
                () = tokio::time::sleep(backoff.min(left)) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn post(&self, ev: &StoredEvent, body: &Body) -> Result<(), DeliveryError> {
        let ep = &self.endpoint;
        let mut req = http::Request::post(ep.url.clone())
            .header(http::header::CONTENT_TYPE, body.content_type)
            .header(
                "x-transship-event-id",
                format::event_id(self.source.instance(), ev.seq),
            )
            .header("x-transship-event", ev.record.action.as_str())
            .body(Full::new(Bytes::from(body.bytes.clone())))
            .map_err(|e| DeliveryError::Request(e.to_string()))?;
        let headers = req.headers_mut();
        for (k, v) in &ep.headers {
            headers.insert(k.clone(), v.clone());
        }
        if let Some(secret) = &ep.secret
            && let Ok(v) = http::HeaderValue::from_str(&format::signature(secret, &body.bytes))
        {
            headers.insert("x-transship-signature", v);
        }
        let resp = tokio::time::timeout(ep.timeout, self.client.request(req))
            .await
            .map_err(|_| DeliveryError::Timeout(ep.timeout))?
            .map_err(|e| DeliveryError::Request(e.to_string()))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(DeliveryError::Status(resp.status()))
        }
    }
}
