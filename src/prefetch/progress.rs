//! What `transship prefetch` shows: on a terminal, one line per image updated in place with
//! blobs and bytes so far; otherwise (logs, pipes) only each image's outcome. At the end a
//! summary on standard output — images, blobs, bytes fetched, bytes already present — and the
//! images that failed, named.

use std::io::Write;

use super::Line;
use crate::proxy::prefetch::Event;

/// Renders a prefetch's lines and keeps the totals.
pub struct Renderer {
    tty: bool,
    /// Blobs and bytes of the image in progress (from its `Resolved` event).
    current: Option<(u64, u64)>,
    images: u64,
    blobs: u64,
    fetched: u64,
    present: u64,
    failed: Vec<String>,
    error: Option<String>,
}

/// `n` bytes for people: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

impl Renderer {
    pub fn new(tty: bool) -> Self {
        Self {
            tty,
            current: None,
            images: 0,
            blobs: 0,
            fetched: 0,
            present: 0,
            failed: Vec::new(),
            error: None,
        }
    }

    /// Shows one line of the report.
    pub fn line(&mut self, line: &Line) {
        let mut err = std::io::stderr().lock();
        match line {
            Line::Progress {
                event: Event::Resolved { blobs, bytes, .. },
            } => self.current = Some((*blobs, *bytes)),
            Line::Progress {
                event:
                    Event::Progress {
                        image,
                        blobs_done,
                        fetched,
                        present,
                    },
            } if self.tty => {
                let (blobs, bytes) = self.current.unwrap_or_default();
                let _ = write!(
                    err,
                    "\r\x1b[K{image}: {blobs_done}/{blobs} blobs, {} of {} ({} fetched)",
                    human(fetched + present),
                    human(bytes),
                    human(*fetched)
                );
                let _ = err.flush();
            }
            Line::Progress { .. } => {}
            Line::Image { report: r } => {
                self.clear(&mut err);
                self.images += 1;
                self.blobs += r.blobs;
                self.fetched += r.bytes_fetched;
                self.present += r.bytes_present;
                let _ = writeln!(
                    err,
                    "{}: {} ({}): {} blobs, {} fetched, {} already present",
                    r.image,
                    r.digest,
                    r.repository,
                    r.blobs,
                    human(r.bytes_fetched),
                    human(r.bytes_present)
                );
            }
            Line::Failed { image, error } => {
                self.clear(&mut err);
                self.failed.push(image.clone());
                let _ = writeln!(err, "FAILED {error}");
            }
            Line::Error { message } => {
                self.clear(&mut err);
                self.error = Some(message.clone());
            }
            Line::Done => self.clear(&mut err),
        }
    }

    fn clear(&mut self, err: &mut impl Write) {
        if self.tty && self.current.take().is_some() {
            let _ = write!(err, "\r\x1b[K");
        }
        self.current = None;
    }

    /// Prints the summary; true if every image was prefetched.
    pub fn finish(self) -> bool {
        if let Some(message) = &self.error {
            eprintln!("transship: prefetch refused: {message}");
            return false;
        }
        println!(
            "prefetched {} images: {} blobs, {} fetched, {} already present",
            self.images,
            self.blobs,
            human(self.fetched),
            human(self.present)
        );
        if self.failed.is_empty() {
            return true;
        }
        eprintln!(
            "transship: {} image(s) failed: {}",
            self.failed.len(),
            self.failed.join(", ")
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(12 << 20), "12.0 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
