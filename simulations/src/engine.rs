//! The discrete-event engine: a priority queue of timed events and a virtual clock that jumps
//! from one to the next.
//!
//! Time is an integer number of nanoseconds since the start of the run; nothing reads a wall
//! clock. Events due at the same instant run in the order they were scheduled (a sequence
//! number breaks ties), so a run is a pure function of its scenario and seed.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

/// Simulated time: nanoseconds since the start of the run.
pub type Time = u64;

/// `d` as [`Time`].
pub fn nanos(d: Duration) -> Time {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `t` as a [`Duration`], for the cores.
pub fn duration(t: Time) -> Duration {
    Duration::from_nanos(t)
}

/// `t` in seconds, for reports.
pub fn secs(t: Time) -> f64 {
    t as f64 / 1e9
}

struct Entry<E> {
    at: Time,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap, the earliest event must come out first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Width of one bucket of the calendar, as a power of two of nanoseconds (2^20 ns, about 1 ms).
const BUCKET_SHIFT: u32 = 20;
/// Buckets in the calendar's window (about 4.3 s of simulated time); a power of two.
const BUCKETS: u64 = 4096;

/// Events of type `E` ordered by time, then by the order they were scheduled.
///
/// A calendar queue: events due within the next 4,096 buckets of about a millisecond each
/// are appended to their bucket, and only the bucket being drained is a heap. Later events
/// wait in a heap of their own and move into the window as it advances. A fleet run keeps
/// millions of events pending; one binary heap over all of them made every pop a walk down
/// twenty-odd levels of cold memory, where the current bucket's heap holds about a
/// millisecond's worth and stays in cache. The order is exactly (time, sequence), as with one
/// heap.
pub struct Queue<E> {
    /// The events of bucket `cur`.
    current: BinaryHeap<Entry<E>>,
    /// Buckets `cur + 1 .. cur + BUCKETS`, by bucket number modulo [`BUCKETS`].
    buckets: Vec<Vec<Entry<E>>>,
    /// Events in `buckets`.
    in_buckets: usize,
    /// Events at bucket `cur + BUCKETS` or later.
    far: BinaryHeap<Entry<E>>,
    /// The bucket being drained: that of `now`.
    cur: u64,
    seq: u64,
    now: Time,
    popped: u64,
}

impl<E> std::fmt::Debug for Queue<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("now", &self.now)
            .field("pending", &self.len())
            .field("popped", &self.popped)
            .finish()
    }
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Self {
            current: BinaryHeap::new(),
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            in_buckets: 0,
            far: BinaryHeap::new(),
            cur: 0,
            seq: 0,
            now: 0,
            popped: 0,
        }
    }
}

fn bucket_of(at: Time) -> u64 {
    at >> BUCKET_SHIFT
}

impl<E> Queue<E> {
    /// The current time: that of the last event taken.
    pub fn now(&self) -> Time {
        self.now
    }

    /// Schedules `event` at `at` (an earlier time than now runs it now).
    pub fn at(&mut self, at: Time, event: E) {
        self.seq += 1;
        self.place(Entry { at: at.max(self.now), seq: self.seq, event });
    }

    fn place(&mut self, e: Entry<E>) {
        let b = bucket_of(e.at);
        if b <= self.cur {
            self.current.push(e);
        } else if b < self.cur + BUCKETS {
            self.buckets[(b % BUCKETS) as usize].push(e);
            self.in_buckets += 1;
        } else {
            self.far.push(e);
        }
    }

    /// Schedules `event` `after` from now.
    pub fn after(&mut self, after: Time, event: E) {
        self.at(self.now.saturating_add(after), event);
    }

    /// Takes the next event, advancing the clock to its time.
    pub fn pop(&mut self) -> Option<(Time, E)> {
        while self.current.is_empty() {
            if !self.advance() {
                return None;
            }
        }
        let e = self.current.pop()?;
        self.now = e.at;
        self.popped += 1;
        Some((e.at, e.event))
    }

    /// Moves to the next bucket that holds events (jumping straight to the far heap's first
    /// when the window is empty) and makes it current. Returns false when nothing is pending.
    fn advance(&mut self) -> bool {
        if self.in_buckets == 0 {
            let Some(first) = self.far.peek() else { return false };
            self.cur = bucket_of(first.at).max(self.cur + 1);
        } else {
            self.cur += 1;
        }
        // The window now reaches one bucket further: far events inside it move in.
        while self.far.peek().is_some_and(|e| bucket_of(e.at) < self.cur + BUCKETS) {
            if let Some(e) = self.far.pop() {
                self.place(e);
            }
        }
        // The bucket's allocation goes with its events (a drained bucket holds no memory).
        let taken = std::mem::take(&mut self.buckets[(self.cur % BUCKETS) as usize]);
        self.in_buckets -= taken.len();
        if self.current.is_empty() {
            self.current = BinaryHeap::from(taken);
        } else {
            self.current.extend(taken);
        }
        true
    }

    /// Events pending.
    pub fn len(&self) -> usize {
        self.current.len() + self.in_buckets + self.far.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events taken so far.
    pub fn popped(&self) -> u64 {
        self.popped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_by_time_then_by_order_scheduled() {
        let mut q = Queue::default();
        q.at(30, "c");
        q.at(10, "a");
        q.at(30, "d");
        q.at(20, "b");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, vec![(10, "a"), (20, "b"), (30, "c"), (30, "d")]);
        assert_eq!(q.now(), 30);
        // The past is now.
        q.at(5, "late");
        assert_eq!(q.pop(), Some((30, "late")));
    }

    /// The calendar gives exactly the order of one heap by (time, sequence): events in the
    /// current bucket, in later buckets of the window, beyond the window, at the same instant,
    /// and after gaps long enough to jump.
    #[test]
    fn the_calendar_keeps_time_then_schedule_order_across_buckets_and_gaps() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut q = Queue::default();
        let mut expected = Vec::new();
        let mut seq = 0u64;
        let mut taken = Vec::new();
        for round in 0..20_000u64 {
            // A few events per round at offsets from now: this bucket, the window, far away.
            for _ in 0..rng.gen_range(0..3) {
                let after = match rng.gen_range(0..10) {
                    0 => 0,
                    1..=5 => rng.gen_range(0..(1 << BUCKET_SHIFT)),
                    6..=8 => rng.gen_range(0..(BUCKETS << BUCKET_SHIFT)),
                    _ => rng.gen_range(0..((40 * BUCKETS) << BUCKET_SHIFT)),
                };
                let at = q.now() + after;
                seq += 1;
                q.at(at, seq);
                expected.push((at, seq));
            }
            if round % 3 != 0 {
                if let Some(e) = q.pop() {
                    taken.push(e);
                }
            }
        }
        while let Some(e) = q.pop() {
            taken.push(e);
        }
        assert!(q.is_empty());
        assert_eq!(q.popped(), seq);
        // Every event came out once, and in (time, sequence) order: every event is scheduled
        // at or after now, so that order is the one a single heap gives.
        for w in taken.windows(2) {
            assert!(w[0] <= w[1], "out of order: {w:?}");
        }
        expected.sort();
        assert_eq!(taken, expected);
    }
}
