//! The network model: links with capacities, transfers ("flows") that share them.
//!
//! Every daemon has an uplink and a downlink; each region has a WAN link from the origin. A
//! flow is one piece going from a sender to a receiver; it crosses the sender's uplink, the
//! receiver's downlink and, from the origin into a region, that region's WAN link.
//!
//! # Sharing
//!
//! Rates are recomputed for every flow at the start of every *slot* (a fixed period, the
//! scenario's `network.slot`) and held for the slot:
//!
//! 1. Each downlink and WAN link is split equally among its flows.
//! 2. Each uplink is water-filled among its flows, each capped by step 1's shares: a flow that
//!    its receiver cannot take at the uplink's equal share gives the rest to the others (the
//!    exact max-min allocation at the uplink, given the receivers' equal shares).
//! 3. Capacity left on a receiving link goes to its flows that step 1 capped, as far as their
//!    uplink has capacity left too (each link's leftover split equally among the flows that
//!    could use it, so no link is ever overcommitted).
//!
//! That is max-min fair sharing (what TCP- and QUIC-like congestion control converges to)
//! where bottlenecks are uplinks or downlinks on their own, and an approximation where one flow
//! meets two bottlenecks; the unit tests compare it with exact progressive filling on random
//! instances. A flow that starts within a slot takes what its links have left (capacity freed by
//! flows that finished in the slot) until the next slot, so a sender that finishes one piece
//! and starts the next keeps its uplink busy. A flow that finishes within a slot finishes at its
//! exact time. The error this leaves is bounded by one slot per flow, in both directions: a new
//! flow may wait up to a slot for capacity that a finishing one did not free at its own links,
//! and capacity left unused within a slot is lost. Slow start, losses and retransmissions are not
//! modelled: every flow runs at its fair share from its first byte.
//!
//! Cost: O(flows) per slot, O(1) per flow start and finish. Idle periods cost nothing: slots
//! tick only while flows exist.

/// A link's index.
pub type LinkId = u32;

/// No link (a flow that crosses no WAN).
pub const NO_LINK: LinkId = u32::MAX;

/// A flow's handle: its slot and the generation of that slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    /// Slot.
    pub slot: u32,
    /// Generation (slots are reused).
    pub generation: u32,
}

/// What a flow carries: chunk `index` from daemon `from` to daemon `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Payload {
    /// The sender.
    pub from: u32,
    /// The receiver.
    pub to: u32,
    /// The chunk.
    pub index: u32,
    /// Its length.
    pub bytes: u32,
}

#[derive(Clone, Debug)]
struct Flow {
    up: LinkId,
    down: LinkId,
    wan: LinkId,
    remaining: f64,
    rate: f64,
    /// Time (ns) from which `rate` applies.
    since: u64,
    finish_scheduled: bool,
    /// Eligible for leftover capacity in this slot (step 3).
    bonus: bool,
}

/// The links and the flows on them. See the module docs.
#[derive(Debug)]
pub struct Net {
    slot: u64,
    cap: Vec<f64>,
    /// Sum of the current rates on each link.
    used: Vec<f64>,
    count: Vec<u32>,
    share: Vec<f64>,
    eligible: Vec<u32>,
    /// The tick that last zeroed each link's counters, and the current tick's number.
    stamp: Vec<u32>,
    tick_no: u32,
    /// Flows by slot; `None` is free.
    flows: Vec<Option<Flow>>,
    /// What each slot's flow carries, kept apart: the slot tick walks every flow several
    /// times and never reads it.
    payloads: Vec<Payload>,
    generations: Vec<u32>,
    free: Vec<u32>,
    /// Flow slots leaving each uplink (indexed by link id; empty for other links).
    by_up: Vec<Vec<u32>>,
    /// Flow slots entering each downlink.
    by_down: Vec<Vec<u32>>,
    live: usize,
    /// End of the current slot, while flows exist.
    slot_end: Option<u64>,
    /// Scratch of [`tick`](Self::tick): the uplinks with flows, each one's count of flows
    /// leaving it and where its group ends in `grouped` (both indexed by link id), and every
    /// flow's receiver cap and slot, grouped by uplink. Walking the flows once and grouping
    /// them here costs far less than walking every uplink's own list, which is a cache miss
    /// per uplink and per flow.
    ups: Vec<LinkId>,
    up_count: Vec<u32>,
    group_end: Vec<u32>,
    grouped: Vec<(f64, u32)>,
}

/// A flow that finishes before the current slot ends: the caller schedules it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    /// When (ns).
    pub at: u64,
    /// Which.
    pub flow: FlowId,
}

impl Net {
    /// An empty network with slots of `slot_ns` nanoseconds.
    pub fn new(slot_ns: u64) -> Self {
        Self {
            slot: slot_ns.max(1),
            cap: Vec::new(),
            used: Vec::new(),
            count: Vec::new(),
            share: Vec::new(),
            stamp: Vec::new(),
            tick_no: 0,
            eligible: Vec::new(),
            flows: Vec::new(),
            payloads: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            by_up: Vec::new(),
            by_down: Vec::new(),
            live: 0,
            slot_end: None,
            ups: Vec::new(),
            up_count: Vec::new(),
            group_end: Vec::new(),
            grouped: Vec::new(),
        }
    }

    /// Adds a link of `bytes_per_sec`.
    pub fn add_link(&mut self, bytes_per_sec: f64) -> LinkId {
        let id = self.cap.len() as LinkId;
        self.cap.push(bytes_per_sec.max(1.0));
        self.used.push(0.0);
        self.count.push(0);
        self.share.push(0.0);
        self.stamp.push(0);
        self.eligible.push(0);
        self.by_up.push(Vec::new());
        self.by_down.push(Vec::new());
        self.up_count.push(0);
        self.group_end.push(0);
        id
    }

    /// The share of link `l`'s capacity its flows use now (their rates in the current slot).
    pub fn link_use(&self, l: LinkId) -> f64 {
        self.used[l as usize] / self.cap[l as usize]
    }

    /// Flows in progress.
    pub fn live(&self) -> usize {
        self.live
    }

    /// When the next slot starts, if flows exist (the caller calls [`tick`](Self::tick) then).
    pub fn slot_end(&self) -> Option<u64> {
        self.slot_end
    }

    /// Flows leaving uplink `up` or entering downlink `down` (a daemon's flows).
    pub fn flows_of(&self, up: LinkId, down: LinkId) -> Vec<FlowId> {
        let ids = |list: &Vec<u32>| {
            list.iter()
                .map(|&slot| FlowId { slot, generation: self.generations[slot as usize] })
                .collect::<Vec<_>>()
        };
        let mut out = ids(&self.by_up[up as usize]);
        out.extend(ids(&self.by_down[down as usize]));
        out
    }

    /// What flow `id` carries, if it is in progress.
    pub fn payload(&self, id: FlowId) -> Option<Payload> {
        self.flow(id).map(|_| self.payloads[id.slot as usize])
    }

    fn flow(&self, id: FlowId) -> Option<&Flow> {
        if self.generations.get(id.slot as usize) != Some(&id.generation) {
            return None;
        }
        self.flows.get(id.slot as usize)?.as_ref()
    }

    /// Starts a flow at `now`. Returns its id, whether the caller must schedule a slot tick
    /// (the first flow after an idle period), and its finish if that is within the slot.
    pub fn start(
        &mut self,
        now: u64,
        up: LinkId,
        down: LinkId,
        wan: LinkId,
        payload: Payload,
    ) -> (FlowId, bool, Option<Finish>) {
        let new_slot = self.slot_end.is_none();
        if new_slot {
            self.slot_end = Some((now / self.slot + 1) * self.slot);
        }
        let mut rate = f64::INFINITY;
        for l in [up, down, wan] {
            if l != NO_LINK {
                rate = rate.min((self.cap[l as usize] - self.used[l as usize]).max(0.0));
            }
        }
        for l in [up, down, wan] {
            if l != NO_LINK {
                self.used[l as usize] += rate;
            }
        }
        let flow = Flow {
            up,
            down,
            wan,
            remaining: f64::from(payload.bytes),
            rate,
            since: now,
            finish_scheduled: false,
            bonus: false,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.flows[s as usize] = Some(flow);
                self.payloads[s as usize] = payload;
                s
            }
            None => {
                self.flows.push(Some(flow));
                self.payloads.push(payload);
                self.generations.push(0);
                (self.flows.len() - 1) as u32
            }
        };
        self.by_up[up as usize].push(slot);
        self.by_down[down as usize].push(slot);
        self.live += 1;
        let id = FlowId { slot, generation: self.generations[slot as usize] };
        let finish = self.finish_within_slot(slot, now);
        (id, new_slot, finish)
    }

    fn finish_within_slot(&mut self, slot: u32, now: u64) -> Option<Finish> {
        let end = self.slot_end?;
        let generation = self.generations[slot as usize];
        let f = self.flows[slot as usize].as_mut()?;
        if f.finish_scheduled || f.rate <= 0.0 {
            return None;
        }
        let at = now.saturating_add((f.remaining / f.rate * 1e9).ceil() as u64);
        if at < end {
            f.finish_scheduled = true;
            return Some(Finish { at, flow: FlowId { slot, generation } });
        }
        None
    }

    /// Removes a flow (finished, or aborted). Returns its payload and the bytes it had sent.
    pub fn remove(&mut self, now: u64, id: FlowId) -> Option<(Payload, u64)> {
        self.flow(id)?;
        let f = self.flows[id.slot as usize].take()?;
        self.generations[id.slot as usize] = self.generations[id.slot as usize].wrapping_add(1);
        self.free.push(id.slot);
        self.live -= 1;
        for l in [f.up, f.down, f.wan] {
            if l != NO_LINK {
                let u = &mut self.used[l as usize];
                *u = (*u - f.rate).max(0.0);
            }
        }
        for list in [&mut self.by_up[f.up as usize], &mut self.by_down[f.down as usize]] {
            if let Some(p) = list.iter().position(|&s| s == id.slot) {
                list.swap_remove(p);
            }
        }
        let elapsed = now.saturating_sub(f.since) as f64 / 1e9;
        let left = (f.remaining - f.rate * elapsed).max(0.0);
        let payload = self.payloads[id.slot as usize];
        let sent = (f64::from(payload.bytes) - left).round().max(0.0) as u64;
        if self.live == 0 {
            self.slot_end = None;
        }
        Some((payload, sent))
    }

    /// A slot boundary (at [`slot_end`](Self::slot_end)): advances every flow, recomputes
    /// every rate, and returns the flows that finish within the new slot (the caller schedules
    /// them) and whether another tick follows.
    pub fn tick(&mut self, now: u64, out: &mut Vec<Finish>) -> bool {
        if self.live == 0 {
            self.slot_end = None;
            return false;
        }
        self.slot_end = Some(now + self.slot);
        // Advance, and count flows per link: a link's counters are zeroed when the first of
        // its flows is met (its stamp is not this tick's), so one pass does both.
        self.tick_no = self.tick_no.wrapping_add(1);
        let tick_no = self.tick_no;
        self.ups.clear();
        for f in self.flows.iter_mut().flatten() {
            let elapsed = now.saturating_sub(f.since) as f64 / 1e9;
            f.remaining = (f.remaining - f.rate * elapsed).max(0.0);
            f.since = now;
            for l in [f.up, f.down, f.wan] {
                if l != NO_LINK {
                    let l = l as usize;
                    if self.stamp[l] != tick_no {
                        self.stamp[l] = tick_no;
                        self.count[l] = 0;
                        self.used[l] = 0.0;
                        self.eligible[l] = 0;
                        self.up_count[l] = 0;
                    }
                    self.count[l] += 1;
                }
            }
            self.up_count[f.up as usize] += 1;
            if self.up_count[f.up as usize] == 1 {
                self.ups.push(f.up);
            }
        }
        // 1. Receiving links: equal shares (`receiver_cap`, computed where needed).
        // 2. Uplinks: water-filling under the receivers' shares. The flows are grouped by
        // uplink first (a counting sort: `group_end` is where each uplink's group ends once
        // filled), then each group is filled in (cap, slot) order.
        let mut at = 0u32;
        for &up in &self.ups {
            self.group_end[up as usize] = at;
            at += self.up_count[up as usize];
        }
        self.grouped.clear();
        self.grouped.resize(at as usize, (0.0, 0));
        for (s, f) in self.flows.iter().enumerate() {
            let Some(f) = f else { continue };
            let c = Self::receiver_cap(&self.cap, &self.count, f);
            let end = &mut self.group_end[f.up as usize];
            self.grouped[*end as usize] = (c, s as u32);
            *end += 1;
        }
        for &up in &self.ups {
            let end = self.group_end[up as usize] as usize;
            let caps = &mut self.grouped[end - self.up_count[up as usize] as usize..end];
            caps.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut left = self.cap[up as usize];
            let mut m = caps.len();
            for &(c, s) in caps.iter() {
                let fair = left / m as f64;
                let r = c.min(fair);
                left -= r;
                m -= 1;
                if let Some(f) = &mut self.flows[s as usize] {
                    f.rate = r;
                }
            }
        }
        for f in self.flows.iter().flatten() {
            for l in [f.up, f.down, f.wan] {
                if l != NO_LINK {
                    self.used[l as usize] += f.rate;
                }
            }
        }
        // 3. Leftover on receiving links, for flows capped there whose uplink has room.
        let room = |cap: f64, used: f64| cap - used > cap * 1e-9;
        let mut any = false;
        for slot in 0..self.flows.len() {
            let Some(f) = &self.flows[slot] else { continue };
            let c = Self::receiver_cap(&self.cap, &self.count, f);
            let capped = f.rate >= c * (1.0 - 1e-9);
            let links = [f.up, f.down, f.wan];
            let eligible = capped
                && links
                    .iter()
                    .all(|&l| l == NO_LINK || room(self.cap[l as usize], self.used[l as usize]));
            if eligible {
                for l in links {
                    if l != NO_LINK {
                        self.eligible[l as usize] += 1;
                    }
                }
                any = true;
            }
            if let Some(f) = &mut self.flows[slot] {
                f.bonus = eligible;
            }
        }
        if any {
            // Each link's leftover is split among the flows eligible there, so the increments
            // (computed before any is applied) never overcommit a link.
            for f in self.flows.iter().flatten().filter(|f| f.bonus) {
                for l in [f.up, f.down, f.wan] {
                    if l != NO_LINK {
                        let l = l as usize;
                        self.share[l] = (self.cap[l] - self.used[l]).max(0.0)
                            / f64::from(self.eligible[l].max(1));
                    }
                }
            }
            // Apply the increments and sum the rates again, in one pass: a flow's increment
            // reads only `share`, and each link's sum restarts at its first flow (stamps).
            self.tick_no = self.tick_no.wrapping_add(1);
            let tick_no = self.tick_no;
            for f in self.flows.iter_mut().flatten() {
                if f.bonus {
                    let mut inc = f64::INFINITY;
                    for l in [f.up, f.down, f.wan] {
                        if l != NO_LINK {
                            inc = inc.min(self.share[l as usize]);
                        }
                    }
                    if inc.is_finite() && inc > 0.0 {
                        f.rate += inc;
                    }
                }
                for l in [f.up, f.down, f.wan] {
                    if l != NO_LINK {
                        let l = l as usize;
                        if self.stamp[l] != tick_no {
                            self.stamp[l] = tick_no;
                            self.used[l] = 0.0;
                            self.eligible[l] = 0;
                        }
                        self.used[l] += f.rate;
                    }
                }
            }
        }
        // Finishes within the new slot.
        for slot in 0..self.flows.len() as u32 {
            let Some(f) = &mut self.flows[slot as usize] else { continue };
            f.finish_scheduled = false;
            if f.remaining <= 0.5 {
                f.finish_scheduled = true;
                let flow = FlowId { slot, generation: self.generations[slot as usize] };
                out.push(Finish { at: now, flow });
                continue;
            }
            if let Some(fin) = self.finish_within_slot(slot, now) {
                out.push(fin);
            }
        }
        true
    }

    /// Step 1's cap of flow `f`: the equal share of its downlink and, from the origin, of its
    /// WAN link.
    fn receiver_cap(cap: &[f64], count: &[u32], f: &Flow) -> f64 {
        let share = |l: LinkId| cap[l as usize] / f64::from(count[l as usize]);
        let c = share(f.down);
        if f.wan != NO_LINK { c.min(share(f.wan)) } else { c }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    impl Net {
        fn rates(&self) -> Vec<(LinkId, LinkId, LinkId, f64)> {
            self.flows.iter().flatten().map(|f| (f.up, f.down, f.wan, f.rate)).collect()
        }
    }

    /// Exact max-min rates by progressive filling.
    fn max_min(cap: &[f64], flows: &[(LinkId, LinkId, LinkId)]) -> Vec<f64> {
        let mut rate = vec![0.0; flows.len()];
        let mut frozen = vec![false; flows.len()];
        let mut left = cap.to_vec();
        loop {
            let mut count = vec![0u32; cap.len()];
            for (i, f) in flows.iter().enumerate() {
                if !frozen[i] {
                    for l in [f.0, f.1, f.2] {
                        if l != NO_LINK {
                            count[l as usize] += 1;
                        }
                    }
                }
            }
            let Some((link, inc)) = (0..cap.len())
                .filter(|&l| count[l] > 0)
                .map(|l| (l, left[l] / f64::from(count[l])))
                .min_by(|a, b| a.1.total_cmp(&b.1))
            else {
                return rate;
            };
            for (i, f) in flows.iter().enumerate() {
                if frozen[i] {
                    continue;
                }
                rate[i] += inc;
                for l in [f.0, f.1, f.2] {
                    if l != NO_LINK {
                        left[l as usize] -= inc;
                    }
                }
                if [f.0, f.1, f.2].contains(&(link as LinkId)) {
                    frozen[i] = true;
                }
            }
        }
    }

    #[test]
    fn shares_never_overcommit_a_link_and_come_close_to_max_min() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut worst: f64 = 1.0;
        for _ in 0..200 {
            let mut net = Net::new(10_000_000);
            let hosts = rng.gen_range(3..30);
            let mut links = Vec::new();
            for _ in 0..hosts {
                let class = if rng.gen_bool(0.2) { 1e6 } else { 1e7 };
                links.push((net.add_link(class), net.add_link(class)));
            }
            let wan = net.add_link(3e7);
            let origin = (net.add_link(1e8), net.add_link(1e8));
            let mut flows = Vec::new();
            for _ in 0..rng.gen_range(1..hosts * 4) {
                let to = rng.gen_range(0..hosts);
                let (up, w) = if rng.gen_bool(0.1) {
                    (origin.0, wan)
                } else {
                    let from = (to + rng.gen_range(1..hosts)) % hosts;
                    (links[from].0, NO_LINK)
                };
                let payload = Payload { from: 0, to: 0, index: 0, bytes: 1 << 30 };
                net.start(0, up, links[to].1, w, payload);
                flows.push((up, links[to].1, w));
            }
            let mut out = Vec::new();
            net.tick(10_000_000, &mut out);
            let rates = net.rates();
            let mut used = vec![0.0; net.cap.len()];
            for &(u, d, w, r) in &rates {
                assert!(r >= 0.0);
                for l in [u, d, w] {
                    if l != NO_LINK {
                        used[l as usize] += r;
                    }
                }
            }
            for (l, &u) in used.iter().enumerate() {
                assert!(u <= net.cap[l] * (1.0 + 1e-9), "link {l} overcommitted");
            }
            let exact: f64 = max_min(&net.cap, &flows).iter().sum();
            let got: f64 = rates.iter().map(|r| r.3).sum();
            worst = worst.min(got / exact);
        }
        // The approximation's bar: at least 90 % of max-min total throughput on every instance.
        assert!(worst > 0.9, "worst instance: {worst:.3} of max-min throughput");
    }

    #[test]
    fn a_lone_flow_runs_at_its_bottleneck_and_finishes_on_time() {
        let mut net = Net::new(10_000_000);
        let up = net.add_link(1e6);
        let down = net.add_link(5e5);
        let payload = Payload { from: 0, to: 1, index: 0, bytes: 5_000 };
        let (id, new_slot, finish) = net.start(0, up, down, NO_LINK, payload);
        assert!(new_slot);
        // 5,000 bytes at 500 kB/s: 10 ms, which is the end of the first slot, not within it.
        assert_eq!(finish, None);
        let mut out = Vec::new();
        assert!(net.tick(10_000_000, &mut out));
        assert_eq!(out, vec![Finish { at: 10_000_000, flow: id }]);
        let (p, sent) = net.remove(10_000_000, id).expect("in progress");
        assert_eq!((p, sent), (payload, 5_000));
        assert_eq!(net.live(), 0);
        assert_eq!(net.slot_end(), None);
    }
}
