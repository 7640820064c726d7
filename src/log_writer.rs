//! Where log lines go: standard output, through a writer that keeps the per-request access
//! line off the request path. Access lines (events with target [`ACCESS_TARGET`]) are appended
//! to a bounded in-memory buffer that a dedicated thread writes out in batches, so the access
//! line never makes a request wait for the disk or the pipe. Every other line (warnings, audit
//! lines, startup) is written at once by the thread that logs it, after whatever access lines
//! are still buffered (up to `capacity`), so the output keeps its order and a line that says
//! something happened is on disk when the thing has happened; a request that logs such a line
//! can wait for standard output, as it did before access lines were buffered.
//!
//! Bounded: when the buffer holds `capacity` bytes (the reader of standard output is slower
//! than the requests), further access lines are dropped and counted ([`dropped_lines`]), and
//! the count is reported in the output once the writer catches up. Dropping the [`Flusher`]
//! (at shutdown) writes out what is buffered and stops the thread.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// The target of the one log line per request; only these lines are buffered.
pub const ACCESS_TARGET: &str = "transship::http::access";

/// Default bound of buffered access lines, in bytes (about 6,000 lines).
pub const DEFAULT_CAPACITY: usize = 1 << 20;

/// How long the writer lets lines gather after the first one arrives in an empty buffer:
/// one write (and one wake-up) per batch instead of one per line.
const GATHER: Duration = Duration::from_millis(20);

/// Access lines dropped since start because the buffer was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Access lines dropped since start because the output could not keep up.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

struct Pending {
    buf: Vec<u8>,
    /// Set by the flusher at shutdown: the thread writes what is left and ends.
    closing: bool,
    /// Lines dropped and not yet reported in the output.
    unreported: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when a line lands in an empty buffer, or at shutdown.
    wake: Condvar,
    /// The output itself. Held while writing, so a buffered batch and an immediate line
    /// never interleave or overtake each other; appending never takes it.
    out: Mutex<Box<dyn Write + Send>>,
    capacity: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a log lock leaves plain bytes behind: keep logging.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Buffers one access line, or drops it when the buffer is full.
    fn append(&self, line: &[u8]) {
        let mut p = lock(&self.pending);
        if p.buf.len() + line.len() > self.capacity {
            p.unreported += 1;
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = p.buf.is_empty();
        p.buf.extend_from_slice(line);
        drop(p);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Writes out what is buffered, then `line` (if any), in that order.
    fn write_now(&self, line: &[u8]) {
        let mut out = lock(&self.out);
        let (batch, dropped) = self.take(Vec::new());
        // Nowhere to report a failing standard output: the lines are lost either way.
        let _ = write_batch(&mut *out, &batch, dropped)
            .and_then(|()| out.write_all(line))
            .and_then(|()| out.flush());
    }

    /// Swaps the buffer for `spare` (emptied); returns the lines and the unreported drops.
    fn take(&self, mut spare: Vec<u8>) -> (Vec<u8>, u64) {
        spare.clear();
        let mut p = lock(&self.pending);
        let batch = std::mem::replace(&mut p.buf, spare);
        (batch, std::mem::take(&mut p.unreported))
    }

    /// The writer thread: waits for lines, lets a batch gather, writes it, until closed.
    fn run(&self) {
        let mut spare = Vec::new();
        loop {
            let closing = {
                let mut p = lock(&self.pending);
                while p.buf.is_empty() && p.unreported == 0 && !p.closing {
                    p = self.wake.wait(p).unwrap_or_else(PoisonError::into_inner);
                }
                // A buffer filling fast is written at once: gathering would only cap the rate.
                if !p.closing && p.buf.len() < self.capacity / 4 {
                    p = self
                        .wake
                        .wait_timeout(p, GATHER)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                p.closing
            };
            let mut out = lock(&self.out);
            let (batch, dropped) = self.take(spare);
            let _ = write_batch(&mut *out, &batch, dropped).and_then(|()| out.flush());
            drop(out);
            spare = batch;
            // A burst can leave a large buffer behind: keep at most one capacity's worth.
            spare.shrink_to(self.capacity);
            if closing {
                return;
            }
        }
    }
}

fn write_batch(out: &mut impl Write, batch: &[u8], dropped: u64) -> io::Result<()> {
    out.write_all(batch)?;
    if dropped > 0 {
        writeln!(
            out,
            "access log: {dropped} request lines dropped (standard output fell behind)"
        )?;
    }
    Ok(())
}

/// The `MakeWriter` for the fmt subscriber: access lines to the buffer, the rest at once.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after writing out every buffered line.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer to standard output with its thread started.
pub fn stdout(capacity: usize) -> io::Result<(LogWriter, Flusher)> {
    new(Box::new(io::stdout()), capacity)
}

/// A writer to `out`, with its writer thread started.
pub fn new(out: Box<dyn Write + Send>, capacity: usize) -> io::Result<(LogWriter, Flusher)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            buf: Vec::new(),
            closing: false,
            unreported: 0,
        }),
        wake: Condvar::new(),
        out: Mutex::new(out),
        capacity,
    });
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || worker.run())?;
    Ok((
        LogWriter {
            shared: shared.clone(),
        },
        Flusher {
            shared,
            thread: Some(thread),
        },
    ))
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.shared.pending).closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Lines logged after the thread ended (none in practice) are written here.
        self.shared.write_now(b"");
    }
}

/// Where the server's access lines go once `main` has set up logging.
static ACCESS: OnceLock<AccessSink> = OnceLock::new();

/// The buffered output for access lines, and the format they are written in.
pub struct AccessSink {
    shared: Arc<Shared>,
    json: bool,
}

impl AccessSink {
    /// Lines are JSON objects (`server.log_format = "json"`), else text.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Buffers one complete line (ending in a newline), or drops and counts it when full.
    pub fn append(&self, line: &[u8]) {
        self.shared.append(line);
    }
}

/// The installed access-line output; `None` when the process did not set one up (tests and
/// embedders that run the server in-process), where access lines go through `tracing`.
pub fn access_sink() -> Option<&'static AccessSink> {
    ACCESS.get()
}

impl LogWriter {
    /// Makes this writer's buffer the process's access-line output (once; later calls are
    /// ignored), with lines formatted as JSON or text.
    pub fn install_access(&self, json: bool) {
        let _ = ACCESS.set(AccessSink {
            shared: self.shared.clone(),
            json,
        });
    }
}

/// One event's line: the fmt layer formats the whole line first and writes it in one call.
pub struct LineSink<'a> {
    shared: &'a Shared,
    deferred: bool,
}

impl Write for LineSink<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.deferred {
            self.shared.append(line);
        } else {
            self.shared.write_now(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineSink {
            shared: &self.shared,
            deferred: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineSink {
            shared: &self.shared,
            deferred: meta.target() == ACCESS_TARGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read while the writer owns it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).unwrap()
        }
    }

    fn sink(w: &LogWriter, deferred: bool) -> LineSink<'_> {
        LineSink {
            shared: &w.shared,
            deferred,
        }
    }

    #[test]
    fn an_immediate_line_follows_the_buffered_ones() {
        let out = Sink::default();
        let (w, flusher) = new(Box::new(out.clone()), 1 << 16).unwrap();
        sink(&w, true).write_all(b"a1\n").unwrap();
        sink(&w, true).write_all(b"a2\n").unwrap();
        sink(&w, false).write_all(b"now\n").unwrap();
        // Written before `write` returned, after the two buffered lines.
        assert_eq!(out.text(), "a1\na2\nnow\n");
        sink(&w, true).write_all(b"a3\n").unwrap();
        drop(flusher);
        assert_eq!(out.text(), "a1\na2\nnow\na3\n");
    }

    #[test]
    fn shutdown_writes_every_buffered_line() {
        let out = Sink::default();
        let (w, flusher) = new(Box::new(out.clone()), 1 << 20).unwrap();
        for i in 0..1000 {
            sink(&w, true)
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(flusher);
        let text = out.text();
        assert_eq!(text.lines().count(), 1000);
        assert!(text.ends_with("line 999\n"), "{text}");
    }

    #[test]
    fn a_full_buffer_drops_and_counts_whole_lines() {
        // No writer thread: nothing drains the buffer, as when standard output is blocked.
        let out = Sink::default();
        let shared = Shared {
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                closing: false,
                unreported: 0,
            }),
            wake: Condvar::new(),
            out: Mutex::new(Box::new(out.clone())),
            capacity: 10,
        };
        let before = dropped_lines();
        for line in ["1234\n", "5678\n", "abcd\n", "efgh\n"] {
            shared.append(line.as_bytes());
        }
        assert!(dropped_lines() - before >= 2);
        assert_eq!(lock(&shared.pending).buf.len(), 10);
        shared.write_now(b"next\n");
        assert_eq!(
            out.text(),
            "1234\n5678\naccess log: 2 request lines dropped (standard output fell behind)\nnext\n"
        );
        // Reported once; the buffer has room again.
        shared.append(b"ijkl\n");
        shared.write_now(b"");
        assert!(out.text().ends_with("next\nijkl\n"), "{}", out.text());
    }
}
