//! The rarest-first order: every wanted chunk, sorted by availability, with O(1) updates.
//!
//! `order` holds the wanted chunks (not yet held, not being written) grouped into buckets by
//! availability: bucket `b` is `order[start[b]..start[b + 1]]` and holds exactly the chunks that
//! `b` active region peers advertise. `pos` maps a chunk to its place in `order`. When a chunk's
//! availability changes by one it moves to the edge of its bucket and the boundary moves past it
//! (the libtorrent piece-picker trick), so a have-announcement costs O(1) and a pick walks the
//! buckets from the rarest and stops as soon as it has enough. Removing or re-inserting a chunk
//! walks the bucket boundaries above it: O(peers).
//!
//! Within a bucket the order is arbitrary (a seeded shuffle at start, then whatever the swaps
//! leave); pickers start each bucket at a random offset so ties break randomly.
//!
//! Memory: 11 bytes per chunk (`order` and `pos` 4, `avail` 2, `requests` 1), released once the
//! manifest is complete.

use std::ops::Range;

use super::ChunkIndex;

/// `pos` value of a chunk that is not wanted.
const NONE: u32 = u32::MAX;

#[derive(Debug, Default)]
pub(crate) struct Picker {
    /// Wanted chunks, grouped by availability, rarest first.
    order: Vec<ChunkIndex>,
    /// Position of each chunk in `order`, or `NONE`.
    pos: Vec<u32>,
    /// Number of active region peers advertising each chunk (kept for every chunk, wanted or
    /// not, so a chunk that becomes wanted again lands in the right bucket).
    avail: Vec<u16>,
    /// Bucket boundaries: `start[0] == 0`, non-decreasing, last element `== order.len()`.
    start: Vec<u32>,
    /// Outstanding requests for each chunk, over all peers.
    requests: Vec<u8>,
}

impl Picker {
    /// A picker over `chunks` chunks, wanting `wanted` (in this order within bucket 0).
    pub(crate) fn new(chunks: u32, wanted: Vec<ChunkIndex>) -> Self {
        let n = chunks as usize;
        let mut pos = vec![NONE; n];
        for (i, &c) in wanted.iter().enumerate() {
            pos[c as usize] = i as u32;
        }
        let start = vec![0, wanted.len() as u32];
        Self { order: wanted, pos, avail: vec![0; n], start, requests: vec![0; n] }
    }

    /// Frees all memory; afterwards nothing is wanted and updates are no-ops.
    pub(crate) fn release(&mut self) {
        *self = Self::default();
    }

    pub(crate) fn wanted_len(&self) -> usize {
        self.order.len()
    }

    pub(crate) fn is_wanted(&self, c: ChunkIndex) -> bool {
        self.pos.get(c as usize).is_some_and(|&p| p != NONE)
    }

    /// The wanted chunks, rarest first (by bucket).
    pub(crate) fn order(&self) -> &[ChunkIndex] {
        &self.order
    }

    pub(crate) fn bucket_count(&self) -> usize {
        self.start.len().saturating_sub(1)
    }

    /// Positions in [`order`](Self::order) of the chunks with availability `b`.
    pub(crate) fn bucket(&self, b: usize) -> Range<usize> {
        self.start[b] as usize..self.start[b + 1] as usize
    }

    pub(crate) fn avail(&self, c: ChunkIndex) -> u16 {
        self.avail.get(c as usize).copied().unwrap_or(0)
    }

    pub(crate) fn requests(&self, c: ChunkIndex) -> u8 {
        self.requests.get(c as usize).copied().unwrap_or(0)
    }

    pub(crate) fn add_request(&mut self, c: ChunkIndex) {
        if let Some(r) = self.requests.get_mut(c as usize) {
            *r = r.saturating_add(1);
        }
    }

    /// Forgets one outstanding request for `c`; returns how many remain.
    pub(crate) fn remove_request(&mut self, c: ChunkIndex) -> u8 {
        match self.requests.get_mut(c as usize) {
            Some(r) => {
                debug_assert!(*r > 0, "request count underflow for chunk {c}");
                *r = r.saturating_sub(1);
                *r
            }
            None => 0,
        }
    }

    /// One more active region peer advertises `c`.
    pub(crate) fn inc(&mut self, c: ChunkIndex) {
        let Some(v) = self.avail.get_mut(c as usize) else { return };
        debug_assert!(*v < u16::MAX, "availability overflow");
        let a = *v as usize;
        *v += 1;
        let p = self.pos[c as usize];
        if p == NONE {
            return;
        }
        if a + 1 == self.bucket_count() {
            self.start.push(self.order.len() as u32);
        }
        let last = self.start[a + 1] as usize - 1;
        self.swap(p as usize, last);
        self.start[a + 1] -= 1;
    }

    /// One fewer active region peer advertises `c`.
    pub(crate) fn dec(&mut self, c: ChunkIndex) {
        let Some(v) = self.avail.get_mut(c as usize) else { return };
        debug_assert!(*v > 0, "availability underflow");
        if *v == 0 {
            return;
        }
        let a = *v as usize;
        *v -= 1;
        let p = self.pos[c as usize];
        if p == NONE {
            return;
        }
        let first = self.start[a] as usize;
        self.swap(p as usize, first);
        self.start[a] += 1;
    }

    /// `c` is no longer wanted (a verified copy arrived).
    pub(crate) fn remove(&mut self, c: ChunkIndex) {
        let Some(&p) = self.pos.get(c as usize) else { return };
        if p == NONE {
            return;
        }
        let mut p = p as usize;
        let a = self.avail[c as usize] as usize;
        // Walk c up through the buckets to the very end: at each step it becomes the last
        // element of its bucket, which then shrinks by one, making it the first of the next.
        for b in a..self.bucket_count() {
            let last = self.start[b + 1] as usize - 1;
            self.swap(p, last);
            p = last;
            self.start[b + 1] -= 1;
        }
        debug_assert_eq!(p, self.order.len() - 1);
        self.order.pop();
        self.pos[c as usize] = NONE;
        while self.start.len() > 2 && self.start[self.start.len() - 2] == self.order.len() as u32 {
            self.start.pop();
        }
    }

    /// `c` is wanted again (its write failed).
    pub(crate) fn insert(&mut self, c: ChunkIndex) {
        if self.pos.get(c as usize).is_none_or(|&p| p != NONE) {
            return;
        }
        let a = self.avail[c as usize] as usize;
        let mut p = self.order.len();
        self.order.push(c);
        self.pos[c as usize] = p as u32;
        while self.bucket_count() <= a {
            self.start.push(p as u32);
        }
        // c sits just past the last bucket; walk it down: at each step it becomes the first
        // element of bucket b, which then shrinks from the front, leaving it last of b - 1.
        for b in (a + 1..=self.bucket_count()).rev() {
            let first = self.start[b] as usize;
            self.swap(p, first);
            p = first;
            self.start[b] += 1;
        }
    }

    fn swap(&mut self, p: usize, q: usize) {
        if p == q {
            return;
        }
        let (cp, cq) = (self.order[p], self.order[q]);
        self.order.swap(p, q);
        self.pos[cp as usize] = q as u32;
        self.pos[cq as usize] = p as u32;
    }

    #[cfg(test)]
    fn check(&self) {
        assert_eq!(self.start.first(), Some(&0));
        assert_eq!(self.start.last().map(|&s| s as usize), Some(self.order.len()));
        for b in 0..self.bucket_count() {
            assert!(self.start[b] <= self.start[b + 1]);
            for p in self.bucket(b) {
                let c = self.order[p];
                assert_eq!(self.pos[c as usize] as usize, p);
                assert_eq!(self.avail[c as usize] as usize, b, "chunk {c} in wrong bucket");
            }
        }
        let wanted = self.pos.iter().filter(|&&p| p != NONE).count();
        assert_eq!(wanted, self.order.len());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Inc(u32),
        Dec(u32),
        Remove(u32),
        Insert(u32),
    }

    fn op(n: u32) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..n).prop_map(Op::Inc),
            2 => (0..n).prop_map(Op::Dec),
            1 => (0..n).prop_map(Op::Remove),
            1 => (0..n).prop_map(Op::Insert),
        ]
    }

    proptest! {
        /// Any sequence of updates keeps every wanted chunk in the bucket of its availability.
        #[test]
        fn buckets_stay_sorted(ops in proptest::collection::vec(op(24), 0..300)) {
            let mut picker = Picker::new(24, (0..24).rev().collect());
            let mut model_avail = [0u16; 24];
            let mut model_wanted = [true; 24];
            for op in ops {
                match op {
                    Op::Inc(c) => {
                        picker.inc(c);
                        model_avail[c as usize] += 1;
                    }
                    Op::Dec(c) => {
                        if model_avail[c as usize] > 0 {
                            picker.dec(c);
                            model_avail[c as usize] -= 1;
                        }
                    }
                    Op::Remove(c) => {
                        picker.remove(c);
                        model_wanted[c as usize] = false;
                    }
                    Op::Insert(c) => {
                        picker.insert(c);
                        model_wanted[c as usize] = true;
                    }
                }
                picker.check();
                for c in 0..24u32 {
                    prop_assert_eq!(picker.avail(c), model_avail[c as usize]);
                    prop_assert_eq!(picker.is_wanted(c), model_wanted[c as usize]);
                }
            }
        }
    }

    #[test]
    fn released_picker_ignores_updates() {
        let mut picker = Picker::new(4, vec![0, 1, 2, 3]);
        picker.release();
        picker.inc(1);
        picker.dec(1);
        picker.remove(2);
        picker.insert(2);
        picker.add_request(3);
        assert_eq!(picker.remove_request(3), 0);
        assert_eq!(picker.wanted_len(), 0);
        assert!(!picker.is_wanted(2));
    }
}
