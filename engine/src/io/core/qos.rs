//! Where a request meets the throttle and fair share, on its core, before it is submitted
//! ([`Core::submit`] calls [`Core::gate`] first; every front end reaches `Core::submit`).
//!
//! A request is let go at once (the fast path: no queue, no allocation) when nothing waits on
//! this core, the core has room under its fair-share cap ([`EngineConfig::fair_share_requests`]
//! and `fair_share_bytes`) and its disk's throttle group (if it has limits) admits it now.
//! Otherwise it waits in its disk's queue on this core, and [`Core::pump_qos`] lets queued
//! requests go: it visits the disks with waiting requests round-robin; a disk in a throttle
//! group with limits gets one request per visit once its group's budget admits it (so members
//! alternate); a disk without limits gets a deficit-round-robin quantum of bytes per visit.
//! One pump goes on round after round while a request was let go, or a disk's head waits only
//! for its deficit (it is bigger than a quantum): it stops only when nothing may go now, so a
//! core with room never blocks with a request that could go (once nothing is in flight, no
//! completion would run the pump again).
//! Requests of one disk go in the order they arrived, in two queues per disk as in QEMU
//! (`throttled_reqs[2]`): reads and writes (TRIM and WRITE_ZEROES with the writes). A direction
//! whose head waits for its group's budget does not hold the other one; otherwise the older
//! head goes first. A disk with requests waiting here sends a new one behind them even when
//! nothing would hold it (its limits just went away, fair share off). TRIM is not metered by
//! the throttle (QEMU does not throttle discard) but counts for fair share. The pump runs when a request is queued,
//! after the core's completions (answers free room), and on every loop turn while anything
//! waits; the loop's wait ends at the earliest time a throttled request may go
//! ([`Core::qos_deadline`]), and a change of limits, of a disk's group, a close or a quiesce
//! wakes every core (eventfd), so a waiting request is re-timed at once.
//!
//! Never gated: FLUSH (never throttled, as in QEMU), CACHE (no I/O), POPULATE (the engine's own
//! copy-up work and stream jobs), commits (not requests), and any request of a disk that is
//! closing or quiesced: its queue is let go at once, so a close or a disk switch never waits
//! for budget. Waiting requests hold their [`Responder`] (they count as in flight for close, and
//! are answered `ESHUTDOWN` if the core stops). What waits is bounded by what the front ends
//! bound (their slots per connection, vhost's in-flight bound): the queue holds the requests
//! themselves, nothing more per request.
//!
//! [`EngineConfig::fair_share_requests`]: crate::EngineConfig::fair_share_requests

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::Core;
use crate::io::disk::state::DiskState;
use crate::io::request::responder::Responder;
use crate::io::request::{req_err, Request};
use crate::qos::{instant_of, limits_epoch, now_ns, CoreLoad, Direction, ThrottleGroup};

/// Bytes a disk without limits may let go per round-robin visit (deficit round robin).
const QUANTUM: u64 = 128 << 10;
/// What one request costs at least, and at most, in fair-share bytes (a TRIM of a gigabyte
/// moves no data; a 512-byte read still takes a slot of the device).
const MIN_COST: u64 = 4096;
const MAX_COST: u64 = 1 << 20;

/// A request waiting on this core.
struct Waiting {
    req: Request,
    done: Responder,
    dir: Direction,
    /// Bytes, for the throttle (and, capped, for fair share).
    bytes: u64,
    /// Whether the throttle meters it (not a TRIM: see [`gated`]).
    metered: bool,
    /// Its place in the order requests arrived on this core (the pump lets a disk's requests
    /// go in this order, except where a direction waits for its budget).
    seq: u64,
    /// When it started to wait for its group's budget ([`now_ns`]), and the group whose
    /// counters count it (the disk's own count it too); `None`: it waits for fair share only.
    throttled: Option<(u64, ThrottleGroup)>,
}

impl Waiting {
    fn cost(&self) -> u64 {
        self.bytes.clamp(MIN_COST, MAX_COST)
    }
}

/// One disk's waiting requests on this core: one queue per direction (reads, then writes),
/// as QEMU keeps them (`throttled_reqs[2]`), so a read whose budget is free does not wait
/// behind a write that waits for its own.
struct DiskQueue {
    disk: Arc<DiskState>,
    waiting: [VecDeque<Waiting>; 2],
    deficit: u64,
    /// The head of a direction waits for its group's budget until then ([`now_ns`]); not asked
    /// again before, unless limits changed meanwhile (see `Gate::epoch`).
    not_before: [u64; 2],
}

/// The index of `dir`'s queue in [`DiskQueue`].
fn slot(dir: Direction) -> usize {
    match dir {
        Direction::Read => 0,
        Direction::Write => 1,
    }
}

impl DiskQueue {
    fn is_empty(&self) -> bool {
        self.waiting.iter().all(VecDeque::is_empty)
    }

    /// The direction whose head arrived first, among those not `held`.
    fn next(&self, held: [bool; 2]) -> Option<usize> {
        (0..2)
            .filter(|&d| !held[d])
            .filter_map(|d| self.waiting[d].front().map(|h| (h.seq, d)))
            .min()
            .map(|(_, d)| d)
    }
}

/// A core's throttle and fair-share state (see the module docs).
pub(super) struct Gate {
    load: Arc<CoreLoad>,
    cap_requests: usize,
    cap_bytes: u64,
    /// Disks with waiting requests, in round-robin order.
    queues: Vec<DiskQueue>,
    /// Where the next pump starts.
    cursor: usize,
    /// The last pump stopped inside the visit of the disk at `cursor` (no room): the next one
    /// goes on with that visit, without giving it another quantum.
    resuming: bool,
    /// Requests waiting in `queues`.
    queued: usize,
    /// The next request's [`Waiting::seq`].
    seq: u64,
    /// The earliest time a throttled request may go.
    deadline: Option<u64>,
    /// [`limits_epoch`] when the last pump ran.
    epoch: u64,
    /// Requests the pump let go, started by the core after it (kept for its capacity).
    ready: Vec<(Arc<DiskState>, Request, Responder)>,
}

impl Gate {
    /// The gate of the core running on the calling thread; `wake` wakes it.
    pub(super) fn new(
        cap_requests: usize,
        cap_bytes: u64,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Gate {
        Gate {
            load: Arc::new(CoreLoad::new(wake)),
            cap_requests,
            cap_bytes,
            queues: Vec::new(),
            cursor: 0,
            resuming: false,
            queued: 0,
            seq: 0,
            deadline: None,
            epoch: limits_epoch(),
            ready: Vec::new(),
        }
    }

    fn fair_share(&self) -> bool {
        self.cap_requests > 0
    }

    /// Whether a request of `cost` fits under the cap now (one always fits on an idle core).
    fn room(&self, cost: u64) -> bool {
        if !self.fair_share() {
            return true;
        }
        let (n, bytes) = self.load.get();
        n == 0 || (n < self.cap_requests && bytes + cost <= self.cap_bytes)
    }

    /// [`Gate::room`], or marks the core blocked (so an answer on another core wakes it) and
    /// looks once more.
    fn room_or_block(&self, cost: u64) -> bool {
        if self.room(cost) {
            return true;
        }
        self.load.set_blocked(true);
        if self.room(cost) {
            self.load.set_blocked(false);
            return true;
        }
        false
    }

    /// Whether requests of `disk` wait here.
    fn holds(&self, disk: &Arc<DiskState>) -> bool {
        self.queued != 0 && self.queues.iter().any(|q| Arc::ptr_eq(&q.disk, disk))
    }

    /// Charges `done` to the core's load (when fair share is on).
    fn charge(&self, done: &mut Responder, cost: u64) {
        if self.fair_share() {
            done.set_charge(self.load.charge(cost));
        }
    }
}

/// What the gate weighs of `req`: its direction, its bytes and whether the throttle meters it;
/// `None` for requests never gated. A TRIM is not metered (QEMU's block-backend throttling
/// does not throttle discard) but is a request for fair share (its cost capped, as any); a
/// WRITE_ZEROES is metered as a write of its length, as in QEMU.
fn gated(req: &Request) -> Option<(Direction, u64, bool)> {
    match req {
        Request::Read { len, .. } => Some((Direction::Read, u64::from(*len), true)),
        Request::ReadInto { buf, .. } => Some((Direction::Read, buf.len() as u64, true)),
        Request::Write { data, .. } => Some((Direction::Write, data.len() as u64, true)),
        Request::WriteZeroes { len, .. } => Some((Direction::Write, *len, true)),
        Request::Trim { len, .. } => Some((Direction::Write, *len, false)),
        Request::Flush | Request::Cache { .. } | Request::Populate { .. } => None,
    }
}

/// The disk's throttle group, when it has limits (no lock unless it is in a group).
fn limited_group(disk: &DiskState) -> Option<ThrottleGroup> {
    if !disk.throttle_on.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    crate::sync::read(&disk.throttle)
        .as_ref()
        .filter(|g| g.is_limited())
        .cloned()
}

/// Whether the disk's queue must be let go whatever the budget (a close or a switch waits).
fn draining(disk: &DiskState) -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    disk.closed.load(SeqCst) || disk.quiesced.load(SeqCst)
}

impl Core {
    /// The throttle and fair share's hook (see the module docs): gives the request back when it
    /// may start now, or keeps it waiting.
    pub(super) fn gate(
        &mut self,
        disk: Arc<DiskState>,
        req: Request,
        done: Responder,
    ) -> Option<(Arc<DiskState>, Request, Responder)> {
        let Some((dir, bytes, metered)) = gated(&req) else {
            return Some((disk, req, done));
        };
        let group = if metered { limited_group(&disk) } else { None };
        // A disk with requests waiting here sends new ones behind them (in arrival order), even
        // when nothing would hold the new one back (its limits were just removed).
        if group.is_none() && !self.gate.fair_share() && !self.gate.holds(&disk) {
            return Some((disk, req, done));
        }
        self.gate.seq += 1;
        let w = Waiting {
            req,
            done,
            dir,
            bytes,
            metered,
            seq: self.gate.seq,
            throttled: None,
        };
        let cost = w.cost();
        if draining(&disk) {
            let Waiting { req, mut done, .. } = w;
            self.gate.charge(&mut done, cost);
            return Some((disk, req, done));
        }
        if self.gate.queued == 0 && self.gate.room(cost) {
            let admitted = match &group {
                Some(g) => g.try_admit(now_ns(), dir, bytes).is_ok(),
                None => true,
            };
            if admitted {
                let Waiting { req, mut done, .. } = w;
                self.gate.charge(&mut done, cost);
                return Some((disk, req, done));
            }
        }
        self.enqueue(disk, w, group);
        self.pump_qos();
        None
    }

    /// Puts `w` at the end of its disk's queue.
    fn enqueue(&mut self, disk: Arc<DiskState>, mut w: Waiting, group: Option<ThrottleGroup>) {
        if let Some(g) = group {
            g.counters().queued();
            disk.throttle_stats.queued();
            w.throttled = Some((now_ns(), g));
        }
        let gate = &mut self.gate;
        gate.queued += 1;
        let d = slot(w.dir);
        match gate.queues.iter_mut().find(|q| Arc::ptr_eq(&q.disk, &disk)) {
            Some(q) => q.waiting[d].push_back(w),
            None => {
                let mut q = DiskQueue {
                    disk,
                    waiting: [VecDeque::new(), VecDeque::new()],
                    deficit: 0,
                    not_before: [0; 2],
                };
                q.waiting[d].push_back(w);
                gate.queues.push(q);
            }
        }
    }

    /// Lets go what may go now (see the module docs) and starts it; sets the deadline of what
    /// still waits for budget.
    ///
    /// Picks again after starting what it let go, until a pick lets nothing go: some requests
    /// are answered as they start, on this thread (a read of an unallocated area without a
    /// base, a zero-length write, an error), and give their room back without waking the core
    /// (an answer on the core's own thread does not). Without another pick the core could block
    /// with requests queued, room free and nothing in flight to wake it. This ends: every pick
    /// that lets something go takes it out of the queue.
    pub(super) fn pump_qos(&mut self) {
        let mut ready = std::mem::take(&mut self.gate.ready);
        loop {
            if self.gate.queued == 0 {
                self.gate.deadline = None;
                break;
            }
            self.gate.pick(&mut ready);
            if ready.is_empty() {
                break;
            }
            for (disk, req, done) in ready.drain(..) {
                self.start_request(disk, req, done);
            }
        }
        self.gate.ready = ready;
    }

    /// When the earliest throttled request may go, if one waits.
    pub(super) fn qos_deadline(&self) -> Option<Instant> {
        self.gate.deadline.map(instant_of)
    }

    /// The core stops: every waiting request is answered `ESHUTDOWN`.
    ///
    /// A fallback: `Engine::shutdown` (and dropping the last handle) closes every open disk
    /// before it stops the cores, and a closing disk's requests never wait (see [`draining`]),
    /// so nothing waits here then. It is reached only when the cores are stopped without the
    /// disks closed: a stop from a core thread that cannot start its helper thread.
    pub(super) fn qos_shutdown(&mut self) {
        let now = now_ns();
        for q in self.gate.queues.drain(..) {
            for w in q.waiting.into_iter().flatten() {
                uncount(&q.disk, &w, now);
                w.done
                    .answer(Err(req_err(libc::ESHUTDOWN, "engine shut down", 0)));
            }
        }
        self.gate.queued = 0;
        self.gate.deadline = None;
    }
}

/// A throttled request stops waiting at `now`: its group's and disk's counters.
fn uncount(disk: &DiskState, w: &Waiting, now: u64) {
    if let Some((since, g)) = &w.throttled {
        let waited = now.saturating_sub(*since);
        g.counters().dequeued(waited);
        disk.throttle_stats.dequeued(waited);
    }
}

impl Gate {
    /// Moves what may go now from the queues to `ready`, round-robin (see the module docs).
    fn pick(&mut self, ready: &mut Vec<(Arc<DiskState>, Request, Responder)>) {
        let now = now_ns();
        let mut deadline: Option<u64> = None;
        let mut full = false;
        let mut last_served = None;
        let mut resuming = std::mem::take(&mut self.resuming);
        let epoch = limits_epoch();
        let limits_changed = std::mem::replace(&mut self.epoch, epoch) != epoch;
        'rounds: loop {
            let mut progress = false;
            // A disk whose head waits only for its deficit to grow: another round gives it a
            // quantum more (so the pump never stops while room exists and a request could go:
            // nothing else would wake the core for it once nothing is in flight).
            let mut short_of_quantum = false;
            let n = self.queues.len();
            for step in 0..n {
                let i = (self.cursor + step) % n;
                let disk = Arc::clone(&self.queues[i].disk);
                let drain = draining(&disk);
                let group = if drain { None } else { limited_group(&disk) };
                let resumed = std::mem::take(&mut resuming);
                // A direction whose head waits for its group's budget: the other one may go.
                let mut held = [false; 2];
                if group.is_some() && !limits_changed {
                    for (d, h) in held.iter_mut().enumerate() {
                        let not_before = self.queues[i].not_before[d];
                        if !self.queues[i].waiting[d].is_empty() && now < not_before {
                            // Its budget is known not to admit it before then: no lock taken.
                            *h = true;
                            deadline = Some(deadline.map_or(not_before, |t| t.min(not_before)));
                        }
                    }
                }
                if self.queues[i].next(held).is_none() {
                    continue;
                }
                if group.is_none() && !drain && !resumed {
                    self.queues[i].deficit += QUANTUM;
                }
                let mut let_go = 0usize;
                while let Some(d) = self.queues[i].next(held) {
                    let (cost, dir, bytes, metered) = self.queues[i].waiting[d]
                        .front()
                        .map(|h| (h.cost(), h.dir, h.bytes, h.metered))
                        .expect("next() names a direction with a head");
                    if !drain {
                        if group.is_some() && let_go > 0 {
                            break; // one per visit: members of a group alternate
                        }
                        if group.is_none() && cost > self.queues[i].deficit {
                            short_of_quantum = true;
                            break;
                        }
                        if !self.room_or_block(cost) {
                            self.cursor = i;
                            self.resuming = true;
                            full = true;
                            break;
                        }
                        if let (Some(g), true) = (&group, metered) {
                            if let Err(wait) = g.try_admit(now, dir, bytes) {
                                let at = now.saturating_add(wait);
                                self.queues[i].not_before[d] = at;
                                deadline = Some(deadline.map_or(at, |t| t.min(at)));
                                held[d] = true;
                                continue;
                            }
                        }
                    }
                    let q = &mut self.queues[i];
                    let Some(w) = q.waiting[d].pop_front() else {
                        break;
                    };
                    q.deficit = q.deficit.saturating_sub(cost);
                    self.queued -= 1;
                    uncount(&disk, &w, now);
                    let Waiting { req, mut done, .. } = w;
                    self.charge(&mut done, cost);
                    ready.push((Arc::clone(&disk), req, done));
                    let_go += 1;
                    progress = true;
                    last_served = Some(i);
                }
                if self.queues[i].is_empty() || group.is_some() {
                    self.queues[i].deficit = 0;
                }
                if full {
                    break 'rounds;
                }
            }
            // Each round adds a quantum to every disk short of one, so this ends within
            // `MAX_COST / QUANTUM` rounds of the last request let go (or at a full core).
            if !progress && !short_of_quantum {
                break;
            }
        }
        // The next pump starts after the last disk served (or at the one that found no room).
        let n = self.queues.len();
        if !full && n > 0 {
            if let Some(i) = last_served {
                self.cursor = (i + 1) % n;
            }
        }
        if !full {
            self.load.set_blocked(false);
        }
        // Forget the disks with nothing waiting (their place in the round goes with them).
        if self.queues.iter().any(DiskQueue::is_empty) {
            // The cursor moves to the first disk kept at or after it.
            let kept_before = self.queues[..self.cursor.min(n)]
                .iter()
                .filter(|q| !q.is_empty())
                .count();
            self.queues.retain(|q| !q.is_empty());
            self.cursor = if self.queues.is_empty() {
                0
            } else {
                kept_before % self.queues.len()
            };
        }
        self.deadline = if self.queued == 0 { None } else { deadline };
    }
}
