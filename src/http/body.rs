//! Body types. `ResponseBody` is an enum rather than a boxed trait object: empty, one buffer,
//! or a blob streamed window by window from its file. `RequestBody` turns hyper's incoming body
//! into the byte stream the store consumes, counting bytes for metrics.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntCounter;

use crate::store::BlobChunks;

pub enum ResponseBody {
    Empty,
    Full(Option<Bytes>),
    /// One buffer, counted in `sent` when hyper takes it (see `counted`).
    Counted(Option<Bytes>, IntCounter),
    Blob(BlobChunks, IntCounter),
    /// A body produced as it arrives (a reader following a cache fill); `remaining` is exact.
    Stream {
        stream: Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>,
        remaining: u64,
        sent: IntCounter,
    },
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }

    /// The body with every byte counted in `sent` once, as it is handed to the connection:
    /// streamed bodies count themselves chunk by chunk, a single buffer is counted here.
    pub fn counted(self, sent: &IntCounter) -> Self {
        match self {
            Self::Full(b) => Self::Counted(b, sent.clone()),
            other => other,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Counted(b, sent) => Poll::Ready(b.take().map(|b| {
                sent.inc_by(b.len() as u64);
                Ok(Frame::data(b))
            })),
            Self::Stream {
                stream,
                remaining,
                sent,
            } => match stream.as_mut().poll_next(_cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(b))) => {
                    *remaining = remaining.saturating_sub(b.len() as u64);
                    sent.inc_by(b.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
            },
            // Cached windows are produced inline; a cold one is read on a blocking thread.
            Self::Blob(chunks, sent) => match chunks.poll_chunk(_cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(Some(b))) => {
                    sent.inc_by(b.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                Poll::Ready(Ok(None)) => Poll::Ready(None),
                Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(b) | Self::Counted(b, _) => b.is_none(),
            Self::Blob(chunks, _) => chunks.remaining() == 0,
            Self::Stream { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(b) | Self::Counted(b, _) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Blob(chunks, _) => SizeHint::with_exact(chunks.remaining()),
            Self::Stream { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

/// The request body as a stream of data chunks (trailers are ignored). With an idle timeout,
/// a body that delivers nothing for that long ends with a `TimedOut` error, so a stalled
/// client cannot hold an upload session (or a connection) forever.
pub struct RequestBody {
    inner: Incoming,
    received: IntCounter,
    idle: Option<Duration>,
    /// Armed while waiting for data; re-armed after every frame.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl RequestBody {
    pub fn new(inner: Incoming, received: IntCounter) -> Self {
        Self {
            inner,
            received,
            idle: None,
            timer: None,
        }
    }

    /// Ends the body with a `TimedOut` error once no bytes arrive for `idle` (zero: never).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = (!idle.is_zero()).then_some(idle);
        self
    }

    /// `Ready` with the error once the body has been idle too long.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let Some(idle) = self.idle else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match timer.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.timer = None;
                Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the request body sent nothing for {idle:?}"),
                ))
            }
        }
    }

    fn rearm(&mut self) {
        if let (Some(idle), Some(t)) = (self.idle, self.timer.as_mut()) {
            t.as_mut().reset(tokio::time::Instant::now() + idle);
        }
    }
}

impl Stream for RequestBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => match this.poll_idle(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(e) => Poll::Ready(Some(Err(e))),
                },
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
                Poll::Ready(Some(Ok(frame))) => {
                    this.rearm();
                    match frame.into_data() {
                        Ok(data) => {
                            this.received.inc_by(data.len() as u64);
                            Poll::Ready(Some(Ok(data)))
                        }
                        Err(_) => continue,
                    }
                }
            };
        }
    }
}

/// Reads and discards up to `cap` more bytes, so a client that is still sending can read an
/// early error response instead of seeing its connection reset.
pub async fn drain(body: &mut RequestBody, cap: u64) {
    use futures_util::StreamExt;
    let mut seen = 0u64;
    while let Some(Ok(chunk)) = body.next().await {
        seen += chunk.len() as u64;
        if seen > cap {
            break;
        }
    }
}

/// Reads a whole body up to `limit` bytes; `Err(None)` if it is longer.
pub async fn read_limited(
    body: &mut RequestBody,
    limit: u64,
) -> Result<Bytes, Option<std::io::Error>> {
    use futures_util::StreamExt;
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(Some)?;
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
