//! [`Deferred`]: chunks kept from caches and the origin until a deadline (after a
//! `SeededRecently` rejection), with O(1) membership and the earliest deadline in O(log n).
//!
//! A host can hold up to every wanted chunk here, and the shell asks for the next deadline
//! after every event, so neither the deadline nor a back-to-source pick may walk the entries:
//! deadlines are kept ordered (`(deadline, chunk)` pairs), membership is a bitfield.
//!
//! Memory: n/8 bytes for the bitfield plus about 40 bytes per deferred chunk.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::{Bitfield, ChunkIndex};

#[derive(Debug, Default)]
pub(crate) struct Deferred {
    /// The deadline of each deferred chunk.
    until: BTreeMap<ChunkIndex, Duration>,
    /// The same entries, ordered by deadline.
    by_deadline: BTreeSet<(Duration, ChunkIndex)>,
    /// The deferred chunks, for O(1) membership (allocated on first use).
    bits: Bitfield,
}

impl Deferred {
    /// Whether chunk `c` is deferred.
    pub(crate) fn contains(&self, c: ChunkIndex) -> bool {
        self.bits.contains(c)
    }

    /// Defers chunk `c` (of `chunks`) until `until`, replacing an earlier deadline.
    pub(crate) fn insert(&mut self, chunks: u32, c: ChunkIndex, until: Duration) {
        if self.bits.bit_len() != chunks {
            self.bits = Bitfield::new(chunks);
        }
        if let Some(old) = self.until.insert(c, until) {
            self.by_deadline.remove(&(old, c));
        }
        self.by_deadline.insert((until, c));
        self.bits.insert(c);
    }

    /// Chunk `c` is no longer deferred (a copy arrived).
    pub(crate) fn remove(&mut self, c: ChunkIndex) {
        if let Some(old) = self.until.remove(&c) {
            self.by_deadline.remove(&(old, c));
            self.bits.remove(c);
        }
    }

    /// The earliest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Duration> {
        self.by_deadline.first().map(|&(until, _)| until)
    }

    /// Ends every deferral whose deadline is at or before `now`; returns whether any was.
    pub(crate) fn expire(&mut self, now: Duration) -> bool {
        let mut any = false;
        while let Some(&(until, c)) = self.by_deadline.first() {
            if until > now {
                break;
            }
            self.by_deadline.pop_first();
            self.until.remove(&c);
            self.bits.remove(c);
            any = true;
        }
        any
    }

    /// Forgets everything and frees the memory.
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn deadlines_come_out_in_order_whatever_the_insertion_order() {
        let mut d = Deferred::default();
        d.insert(10, 7, ms(300));
        d.insert(10, 2, ms(100));
        d.insert(10, 5, ms(200));
        assert_eq!(d.next_deadline(), Some(ms(100)));
        assert!(d.contains(2) && d.contains(5) && d.contains(7));
        assert!(!d.contains(3));
        assert!(d.expire(ms(150)));
        assert!(!d.contains(2));
        assert_eq!(d.next_deadline(), Some(ms(200)));
        assert!(!d.expire(ms(199)));
        assert!(d.expire(ms(300)));
        assert_eq!(d.next_deadline(), None);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_new_deadline_replaces_the_old_one() {
        let mut d = Deferred::default();
        d.insert(4, 1, ms(100));
        d.insert(4, 3, ms(150));
        d.insert(4, 1, ms(400));
        assert_eq!(d.len(), 2);
        assert_eq!(d.next_deadline(), Some(ms(150)));
        assert!(d.expire(ms(200)));
        assert!(d.contains(1) && !d.contains(3));
        assert_eq!(d.next_deadline(), Some(ms(400)));
    }

    #[test]
    fn removed_chunks_leave_no_deadline() {
        let mut d = Deferred::default();
        d.insert(4, 0, ms(100));
        d.remove(0);
        d.remove(2);
        assert!(!d.contains(0));
        assert_eq!(d.next_deadline(), None);
        assert!(!d.expire(ms(1_000)));
        d.clear();
        assert!(!d.contains(0));
    }
}
