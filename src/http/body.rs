//! Body types. `ResponseBody` is an enum rather than a boxed trait object: empty, one buffer,
//! or a blob streamed window by window from its file. `RequestBody` turns hyper's incoming body
//! into the byte stream the store consumes, counting bytes for metrics.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntCounter;

use crate::store::BlobChunks;

pub enum ResponseBody {
    Empty,
    Full(Option<Bytes>),
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
            Self::Full(b) => b.is_none(),
            Self::Blob(chunks, _) => chunks.remaining() == 0,
            Self::Stream { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Blob(chunks, _) => SizeHint::with_exact(chunks.remaining()),
            Self::Stream { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

/// The request body as a stream of data chunks (trailers are ignored).
pub struct RequestBody {
    inner: Incoming,
    received: IntCounter,
}

impl RequestBody {
    pub fn new(inner: Incoming, received: IntCounter) -> Self {
        Self { inner, received }
    }
}

impl Stream for RequestBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.received.inc_by(data.len() as u64);
                        Poll::Ready(Some(Ok(data)))
                    }
                    Err(_) => continue,
                },
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
