//! A fill's tail: the upstream bytes received most recently, kept in memory as the very
//! `Bytes` the upstream connection produced, so readers that keep up with a download take them
//! without a copy, an allocation or a blocking read of the spool. Bytes older than the tail's
//! budget are dropped once the spool holds them; readers that fall behind read those from the
//! spool. The tail never holds a byte the spool might lack without also holding every later
//! one, so "before the tail" always means "on disk" (the tail is only released once the fill
//! is committed). `Gather` shapes the pieces: frames too small to be worth one are copied
//! together.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// Frames smaller than this are copied together into one piece, so a body of tiny frames (a
/// chunked upstream may send one byte per chunk) neither costs the tail an entry per frame nor
/// keeps a whole read buffer alive for each, and readers send worthwhile pieces.
pub const MIN_PIECE: usize = 16 << 10;

/// One batch of received frames, as pieces of at least `MIN_PIECE` bytes (but the last).
#[derive(Default)]
pub struct Gather {
    pieces: Vec<Bytes>,
    small: BytesMut,
    len: usize,
}

impl Gather {
    pub fn add(&mut self, data: Bytes) {
        self.len += data.len();
        if data.len() >= MIN_PIECE {
            self.flush_small();
            self.pieces.push(data);
        } else {
            self.small.extend_from_slice(&data);
            if self.small.len() >= MIN_PIECE {
                self.flush_small();
            }
        }
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(mut self) -> Vec<Bytes> {
        self.flush_small();
        self.pieces
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.pieces.push(self.small.split().freeze());
        }
    }
}

/// Where a reader finds the bytes at a position.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// In memory: a slice of a received frame, starting at the position asked for.
    Memory(Bytes),
    /// Only in the spool, which holds everything before `upto`.
    Spool { upto: u64 },
}

#[derive(Default)]
pub struct Tail {
    /// Contiguous pieces in order: `(offset of the first byte, bytes)`.
    pieces: VecDeque<(u64, Bytes)>,
    held: usize,
    /// The offset one past the last byte ever appended.
    end: u64,
}

impl Tail {
    /// Appends the next received bytes, then drops the oldest pieces while more than `budget`
    /// bytes are held and the spool already has them (`written`: how much of the blob is on
    /// disk). Bytes not yet on disk are always kept.
    pub fn push(&mut self, batch: &[Bytes], written: u64, budget: usize) {
        for data in batch.iter().filter(|d| !d.is_empty()) {
            self.pieces.push_back((self.end, data.clone()));
            self.held += data.len();
            self.end += data.len() as u64;
        }
        self.trim(written, budget);
    }

    /// Drops the oldest pieces the spool holds (`written`) while more than `budget` bytes are
    /// held: after each push, and as the disk catches up while the upstream is quiet.
    pub fn trim(&mut self, written: u64, budget: usize) {
        while self.held > budget {
            match self.pieces.front() {
                Some((start, data)) if start + data.len() as u64 <= written => {
                    self.held -= data.len();
                    self.pieces.pop_front();
                }
                _ => break,
            }
        }
    }

    /// Releases every piece: the fill is committed, so the spool holds all of them.
    pub fn clear(&mut self) {
        self.pieces.clear();
        self.held = 0;
    }

    /// The bytes from `pos` up to at most `limit` (exclusive), from memory when the tail holds
    /// `pos`; otherwise how far the spool may be read. `pos < limit <= end` is the caller's
    /// promise (it only asks for bytes it was told arrived).
    pub fn take(&self, pos: u64, limit: u64) -> Piece {
        let Some((first, _)) = self.pieces.front() else {
            // Nothing held: everything that arrived is on disk.
            return Piece::Spool { upto: limit };
        };
        if pos < *first {
            return Piece::Spool {
                upto: limit.min(*first),
            };
        }
        let i = self
            .pieces
            .partition_point(|(start, data)| start + data.len() as u64 <= pos);
        match self.pieces.get(i) {
            Some((start, data)) => {
                let from = (pos - start) as usize;
                let to = data.len().min((limit - start) as usize);
                Piece::Memory(data.slice(from..to.max(from)))
            }
            // Past what arrived: the caller broke its promise; the spool answers for it.
            None => Piece::Spool { upto: limit },
        }
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(parts: &[&'static [u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::from_static(p)).collect()
    }

    #[test]
    fn readers_get_slices_of_the_frames_from_their_position() {
        let mut t = Tail::default();
        t.push(&batch(&[b"abcd", b"efg"]), 0, 1 << 20);
        t.push(&batch(&[b"", b"hij"]), 0, 1 << 20);
        assert_eq!(t.take(0, 10), Piece::Memory(Bytes::from_static(b"abcd")));
        assert_eq!(t.take(2, 10), Piece::Memory(Bytes::from_static(b"cd")));
        assert_eq!(t.take(4, 10), Piece::Memory(Bytes::from_static(b"efg")));
        assert_eq!(t.take(5, 6), Piece::Memory(Bytes::from_static(b"f")));
        assert_eq!(t.take(8, 10), Piece::Memory(Bytes::from_static(b"ij")));
        assert_eq!(t.held(), 10);
    }

    #[test]
    fn only_bytes_on_disk_leave_and_then_the_spool_answers_for_them() {
        let mut t = Tail::default();
        // Budget 4, nothing on disk yet: everything stays.
        t.push(&batch(&[b"abcd", b"efgh"]), 0, 4);
        assert_eq!(t.held(), 8);
        // The first piece reached the disk: it may go, the second (not written) stays.
        t.push(&batch(&[b"ijkl"]), 4, 4);
        assert_eq!(t.held(), 8);
        assert_eq!(t.take(1, 12), Piece::Spool { upto: 4 });
        assert_eq!(t.take(1, 3), Piece::Spool { upto: 3 });
        assert_eq!(t.take(4, 12), Piece::Memory(Bytes::from_static(b"efgh")));
        t.push(&[], 12, 4);
        assert_eq!(t.held(), 4);
        assert_eq!(t.take(6, 12), Piece::Spool { upto: 8 });
        t.clear();
        assert_eq!(t.take(9, 12), Piece::Spool { upto: 12 });
    }

    #[test]
    fn the_disk_catching_up_lets_old_pieces_go_without_a_push() {
        let mut t = Tail::default();
        t.push(&batch(&[b"abcd", b"efgh", b"ijkl"]), 0, 4);
        assert_eq!(t.held(), 12);
        t.trim(8, 4);
        assert_eq!(t.held(), 4);
        assert_eq!(t.take(8, 12), Piece::Memory(Bytes::from_static(b"ijkl")));
    }

    #[test]
    fn small_frames_are_gathered_into_pieces_large_ones_kept_whole() {
        let mut g = Gather::default();
        for _ in 0..(MIN_PIECE + 10) {
            g.add(Bytes::from_static(b"x"));
        }
        let large = Bytes::from(vec![7u8; MIN_PIECE]);
        g.add(large.clone());
        g.add(Bytes::from_static(b"yz"));
        assert_eq!(g.len(), 2 * MIN_PIECE + 12);
        let pieces = g.finish();
        let lens: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(lens, vec![MIN_PIECE, 10, MIN_PIECE, 2]);
        assert_eq!(pieces[2], large);
        assert!(pieces[0].iter().all(|b| *b == b'x'));
    }
}
