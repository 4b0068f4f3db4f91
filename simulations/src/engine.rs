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

/// Events of type `E` ordered by time, then by the order they were scheduled.
pub struct Queue<E> {
    heap: BinaryHeap<Entry<E>>,
    seq: u64,
    now: Time,
    popped: u64,
}

impl<E> std::fmt::Debug for Queue<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("now", &self.now)
            .field("pending", &self.heap.len())
            .field("popped", &self.popped)
            .finish()
    }
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Self { heap: BinaryHeap::new(), seq: 0, now: 0, popped: 0 }
    }
}

impl<E> Queue<E> {
    /// The current time: that of the last event taken.
    pub fn now(&self) -> Time {
        self.now
    }

    /// Schedules `event` at `at` (an earlier time than now runs it now).
    pub fn at(&mut self, at: Time, event: E) {
        self.seq += 1;
        self.heap.push(Entry { at: at.max(self.now), seq: self.seq, event });
    }

    /// Schedules `event` `after` from now.
    pub fn after(&mut self, after: Time, event: E) {
        self.at(self.now.saturating_add(after), event);
    }

    /// Takes the next event, advancing the clock to its time.
    pub fn pop(&mut self) -> Option<(Time, E)> {
        let e = self.heap.pop()?;
        self.now = e.at;
        self.popped += 1;
        Some((e.at, e.event))
    }

    /// When the next event is due.
    pub fn peek_time(&self) -> Option<Time> {
        self.heap.peek().map(|e| e.at)
    }

    /// Events pending.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
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
}
