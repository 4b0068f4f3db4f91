//! Which upstream a transfer dials next: the region's caches in order, then the origin.
//!
//! [`Upstreams`] is a small sans-io state machine (time passed in) shared by the daemon's
//! source loop and the fleet simulator's copy of it. An upstream that cannot be reached, or
//! that accepts the connection and closes it at once (a cache already holding as many peers as
//! its scheduler tracks, an origin at its host limit), is backed off, and the next one in order
//! is tried in the same round: a refused host neither hammers the cache that refused it nor
//! waits for it while another source would serve it. Back-offs double per consecutive failure
//! of that upstream, up to a cap, and end when a connection to it holds.
//!
//! The daemon cannot tell a refusal from a normal close by the connection alone (both arrive as
//! a closed QUIC connection), so a connection lost within [`UpstreamBackoff::refusal_window`]
//! of being made counts as a refusal; one that lasted longer counts as an answer, and the
//! upstream may be dialed again at once.

use std::time::Duration;

/// Back-off of [`Upstreams`]. The defaults are the daemon's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamBackoff {
    /// Back-off after an upstream's first consecutive failure. Default 250 ms: a cache that
    /// restarts is dialed again quickly.
    pub first: Duration,
    /// Longest back-off after failing to reach an upstream. Default 5 s.
    pub max_unreachable: Duration,
    /// Longest back-off after an upstream refused us. Default 30 s: a refusing cache is full,
    /// and thousands of refused hosts redialing it every few seconds would keep it busy.
    pub max_refused: Duration,
    /// A connection lost sooner than this after it was made counts as a refusal. Default 5 s.
    pub refusal_window: Duration,
}

impl Default for UpstreamBackoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(250),
            max_unreachable: Duration::from_secs(5),
            max_refused: Duration::from_secs(30),
            refusal_window: Duration::from_secs(5),
        }
    }
}

/// The state of a transfer's upstreams, in order of preference. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Upstreams {
    backoff: UpstreamBackoff,
    slots: Vec<Slot>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Consecutive failures (unreachable or refused).
    failures: u32,
    /// Not dialed before this time.
    retry_at: Duration,
    /// When the current connection to it was made.
    connected_at: Option<Duration>,
}

impl Upstreams {
    /// `count` upstreams, numbered `0..count` in order of preference, none backed off.
    pub fn new(count: usize, backoff: UpstreamBackoff) -> Self {
        Self { backoff, slots: vec![Slot::default(); count] }
    }

    /// Number of upstreams.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The first upstream at or after `from` (in order of preference) that may be dialed at
    /// `now`.
    pub fn next(&self, now: Duration, from: usize) -> Option<usize> {
        (from..self.slots.len()).find(|&i| self.slots[i].retry_at <= now)
    }

    /// When the earliest back-off ends (`None` when no upstream exists).
    pub fn next_retry(&self) -> Option<Duration> {
        self.slots.iter().map(|s| s.retry_at).min()
    }

    /// A connection to upstream `i` was made at `now`.
    pub fn handle_connected(&mut self, i: usize, now: Duration) {
        if let Some(s) = self.slots.get_mut(i) {
            s.connected_at = Some(now);
        }
    }

    /// Upstream `i` could not be reached: it is backed off.
    pub fn handle_unreachable(&mut self, i: usize, now: Duration) {
        self.fail(i, now, self.backoff.max_unreachable);
    }

    /// Upstream `i` refused us (or closed the connection at once): it is backed off, longer
    /// than an unreachable one.
    pub fn handle_refused(&mut self, i: usize, now: Duration) {
        self.fail(i, now, self.backoff.max_refused);
    }

    /// The connection to upstream `i` is gone. Returns whether that counts as a refusal
    /// (lost within the refusal window; then `i` is backed off). Otherwise it was an answer:
    /// `i`'s failures are forgotten and it may be dialed again at once.
    pub fn handle_lost(&mut self, i: usize, now: Duration) -> bool {
        let window = self.backoff.refusal_window;
        let Some(s) = self.slots.get_mut(i) else { return false };
        let Some(at) = s.connected_at.take() else { return false };
        if now.saturating_sub(at) < window {
            self.handle_refused(i, now);
            true
        } else {
            *s = Slot::default();
            false
        }
    }

    fn fail(&mut self, i: usize, now: Duration, max: Duration) {
        let first = self.backoff.first;
        let Some(s) = self.slots.get_mut(i) else { return };
        s.connected_at = None;
        let factor = 1u32 << s.failures.min(16);
        s.failures = s.failures.saturating_add(1);
        s.retry_at = now + (first * factor).min(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_refusal_moves_on_to_the_next_upstream() {
        let mut ups = Upstreams::new(2, UpstreamBackoff::default());
        assert_eq!(ups.next(ms(0), 0), Some(0));
        ups.handle_refused(0, ms(0));
        // The same round goes on to the origin, and so does the next one.
        assert_eq!(ups.next(ms(0), 0), Some(1));
        assert_eq!(ups.next(ms(249), 0), Some(1));
        // Once the back-off is over, the cache comes first again.
        assert_eq!(ups.next(ms(250), 0), Some(0));
    }

    #[test]
    fn a_connection_closed_at_once_is_a_refusal() {
        let mut ups = Upstreams::new(2, UpstreamBackoff::default());
        ups.handle_connected(0, ms(1_000));
        assert!(ups.handle_lost(0, ms(1_100)));
        assert_eq!(ups.next(ms(1_100), 0), Some(1));
        assert_eq!(ups.next_retry(), Some(ms(0)));
        // A second refusal doubles the back-off.
        ups.handle_connected(0, ms(1_350));
        assert!(ups.handle_lost(0, ms(1_360)));
        assert_eq!(ups.next(ms(1_859), 0), Some(1));
        assert_eq!(ups.next(ms(1_860), 0), Some(0));
    }

    #[test]
    fn a_connection_that_held_was_an_answer() {
        let mut ups = Upstreams::new(1, UpstreamBackoff::default());
        ups.handle_refused(0, ms(0));
        ups.handle_connected(0, ms(500));
        assert!(!ups.handle_lost(0, ms(60_000)));
        assert_eq!(ups.next(ms(60_000), 0), Some(0));
        // And the failure streak starts over.
        ups.handle_refused(0, ms(60_000));
        assert_eq!(ups.next(ms(60_249), 0), None);
        assert_eq!(ups.next(ms(60_250), 0), Some(0));
    }

    #[test]
    fn back_offs_double_up_to_their_cap() {
        let backoff = UpstreamBackoff::default();
        let mut ups = Upstreams::new(1, backoff);
        let mut now = Duration::ZERO;
        let mut waits = Vec::new();
        for _ in 0..10 {
            ups.handle_unreachable(0, now);
            let retry = ups.next_retry().unwrap_or_default();
            waits.push(retry - now);
            now = retry;
        }
        assert_eq!(&waits[..5], &[ms(250), ms(500), ms(1_000), ms(2_000), ms(4_000)]);
        assert!(waits[5..].iter().all(|&w| w == backoff.max_unreachable));
        for _ in 0..10 {
            ups.handle_refused(0, now);
            now = ups.next_retry().unwrap_or_default();
        }
        assert_eq!(ups.next(now - ms(1), 0), None);
        ups.handle_refused(0, now);
        assert_eq!(ups.next_retry(), Some(now + backoff.max_refused));
    }

    #[test]
    fn every_upstream_backed_off_means_nothing_to_dial() {
        let mut ups = Upstreams::new(2, UpstreamBackoff::default());
        ups.handle_refused(0, ms(0));
        ups.handle_unreachable(1, ms(100));
        assert_eq!(ups.next(ms(100), 0), None);
        assert_eq!(ups.next_retry(), Some(ms(250)));
        assert_eq!(ups.next(ms(350), 1), Some(1));
    }
}
