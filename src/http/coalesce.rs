//! Write batching for HTTP/2 connections. hyper runs each HTTP/2 request on its own task and
//! the connection writes and flushes every response as soon as its task finishes: one TLS
//! record and one syscall per small response, where a connection with many streams in flight
//! could send them together. `Coalesce` holds the connection's small writes in a bounded
//! buffer and, when asked to flush them, first lets the runtime run once (so responses finishing
//! meanwhile join the same write), then writes everything through. Writes of a full DATA frame
//! or more (blob bodies) are not held, copied or delayed: what is buffered goes first, then they
//! pass straight through. Reads pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held before a write goes through without waiting for a flush.
const CAPACITY: usize = 64 << 10;
/// Writes this large (a default-sized HTTP/2 DATA frame and its header) pass through; a buffer
/// holding this much is flushed without waiting for company.
const PASS_THROUGH: usize = 16 << 10;

pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written through.
    sent: usize,
    /// This flush has already let the runtime run once.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes the buffered bytes through; `Ready(Ok)` once all are.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        if self.buf.capacity() > PASS_THROUGH {
            // An idle connection keeps no burst-sized buffer.
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.len() >= PASS_THROUGH || self.buf.len() + data.len() > CAPACITY {
            std::task::ready!(self.drain(cx))?;
            if data.len() >= PASS_THROUGH {
                return Pin::new(&mut self.inner).poll_write(cx, data);
            }
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total >= PASS_THROUGH || self.buf.len() + total > CAPACITY {
            std::task::ready!(self.drain(cx))?;
            if total >= PASS_THROUGH {
                return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            }
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() && self.buf.len() < PASS_THROUGH && !self.yielded {
            // Let the streams finishing now queue their responses before this write goes.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(self.drain(cx))?;
        self.yielded = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn small_writes_wait_for_the_flush_and_go_out_together() {
        let mut c = Coalesce::new(Vec::new());
        for part in [&b"HEADERS"[..], b"DATA-1", b"DATA-2"] {
            c.write_all(part).await.unwrap();
        }
        assert!(c.inner.is_empty(), "nothing written before the flush");
        c.flush().await.unwrap();
        assert_eq!(c.inner, b"HEADERSDATA-1DATA-2");
        assert!(!c.yielded, "the next flush yields again");
    }

    #[tokio::test]
    async fn the_buffer_is_bounded_and_large_writes_pass_through() {
        let mut c = Coalesce::new(Vec::new());
        c.write_all(&[1u8; 1000]).await.unwrap();
        // A frame-sized write: what was held goes first, then the write itself, uncopied.
        c.write_all(&vec![2u8; PASS_THROUGH]).await.unwrap();
        assert_eq!(c.inner.len(), 1000 + PASS_THROUGH);
        assert!(c.buf.is_empty());
        // Small writes past the capacity push the held ones out first.
        for _ in 0..(CAPACITY / 1000 + 1) {
            c.write_all(&[3u8; 1000]).await.unwrap();
        }
        assert!(c.inner.len() > 1000 + PASS_THROUGH, "the buffer is bounded");
        assert!(c.buf.len() <= CAPACITY);
        c.write_all(b"tail").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(&c.inner[c.inner.len() - 4..], b"tail");
    }
}
