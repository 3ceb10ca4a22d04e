//! One virtqueue served on its engine core: [`Queue`] (popping chains, answering them) and
//! [`QueueSource`], the [`CoreSource`] that runs it in the core's own loop.
//!
//! The queue's kick eventfd is polled by the core's io_uring. When it fires, the core calls
//! [`QueueSource::ready`], which pops the available chains (each counted in [`Activity`]
//! before it is popped), parses them and submits their engine requests on the same core with no
//! channel hop. What a guest can make it do is bounded: at most the queue size of chains in
//! flight, at most [`READY_BUDGET`] chains per turn (then a pause, see there), at most
//! `BOUNCE_CAP` bytes bounced, and a head in flight is never served twice. The bytes a chain
//! bounces through are also taken from the daemon's buffer pool (`--max-buffer-memory`, shared
//! with the NBD connections) through a non-blocking [`Share`]: when the pool has no room the
//! chain is put back in the ring (nothing of it done) and the queue stops popping until bytes
//! come back (its own answers, or the pool's [`Waker`] when another member gives some back, both
//! wake it through its kick eventfd): never a wait on the core, never a busy loop. Each chain is answered on its own when its requests complete (on that core):
//! data and status byte into guest memory, then its used entry. Just before the core blocks,
//! [`QueueSource::idle`] signals the call eventfd once for every answer since the last signal
//! (as `EVENT_IDX` allows): one interrupt per batch, and no batch barrier: chains complete
//! independently.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use addcow_engine::{Completion, CoreSource, Done, Request, RequestError, SourceCtx};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;

use super::activity::Ticket;
use super::device::Inner;
use super::request::{parse, status_slot, Limits, Pending};
use crate::conn::budget::{Share, Waker};
use addcow_engine::sync::{lock, read};

/// One virtqueue of one frontend connection, served by engine core `index % cores`.
pub struct Queue {
    /// The queue index.
    pub index: usize,
    dev: Arc<Inner>,
    vring: VringRwLock,
    /// A chain was answered since the last call-eventfd signal.
    answered: AtomicBool,
    /// Bytes of daemon memory that chains popped and not answered bounce through.
    bounced: AtomicU64,
    /// Popping stopped at the bounce cap, the queue size in flight or a want of pool memory;
    /// the answer that brings the queue under its caps (and gives its bytes back) wakes it again.
    capped: AtomicBool,
    /// A duplicate of the kick eventfd, written to wake the queue's poll from here (after the
    /// cap, when the frontend enables the queue, or when the pool has room again).
    poke: Arc<Mutex<Option<File>>>,
    /// This queue's holding of the daemon's buffer pool (`None`: no pool, only the cap):
    /// exactly the `bounced` bytes of its chains in flight.
    share: Option<Mutex<Share>>,
    /// Requests that met a disk switch, in order, and whether a thread is submitting them.
    deferred: Mutex<Deferred>,
    /// Per head descriptor index: a chain with that head is popped and not answered. A head
    /// posted again while it is in flight is refused (answered `IOERR` at once, nothing of it
    /// parsed), so no descriptor is ever used by two chains of the daemon at once.
    heads: Vec<AtomicBool>,
    /// Chains popped and not answered (direct, bounced and dataless alike). Popping stops at
    /// the queue size: a driver that re-posts heads without waiting for used entries cannot
    /// make the daemon hold more than a ring's worth.
    in_flight: AtomicUsize,
    /// Bumped (under the vring's lock) when a GET_VRING_BASE gave up waiting for this queue's
    /// chains: a chain popped under an older generation adds no used entry any more (the
    /// frontend was told where the ring stands and may reuse it).
    generation: AtomicU64,
}

/// Chains one [`QueueSource::ready`] pops at most, over every pass of its loop, before it
/// yields the core: one ring's worth (a driver that waits for its answers never posts more at
/// once). A queue that spent its budget is served again only after [`YIELD_FACTOR`] times the
/// time it just took, so a guest that keeps posting chains answered at once (GET_ID, refused
/// heads) gets at most a fifth of its core's time, and everything else on the core keeps at
/// least four fifths of it.
pub const READY_BUDGET: usize = super::QUEUE_SIZE as usize;

/// See [`READY_BUDGET`].
const YIELD_FACTOR: u32 = 4;

/// The longest pause after a spent budget (a core stalled by something else for a while must
/// not keep the queue waiting for twice that long).
const MAX_YIELD: Duration = Duration::from_millis(20);

/// Requests of one queue waiting for a disk switch to end: one thread per queue submits them
/// in order, never a thread each. Bounded: each belongs to a chain in flight, which are at
/// most the queue size, each of at most `MAX_ZERO_SEGMENTS` requests.
#[derive(Default)]
struct Deferred {
    waiting: VecDeque<(Request, Completion)>,
    /// A `addcow-vhost-wait` thread is submitting `waiting`.
    running: bool,
}

/// Why [`Queue::pump`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Pumped {
    /// The available ring is empty.
    Drained,
    /// Chains may be left that cannot be popped now (stopping, queue stopped or disabled, no
    /// memory table, bounce cap, queue size in flight, no room in the buffer pool): they wait
    /// for a later wake-up.
    Held,
    /// This turn's [`READY_BUDGET`] is spent: the queue wakes itself for a later turn.
    Yield,
}

/// One chain being answered: its request state, its activity ticket, its bounced bytes.
struct Chain {
    pending: Pending,
    ticket: Ticket,
    /// Its head is marked in [`Queue::heads`] (not a refused duplicate).
    tracked: bool,
    /// [`Queue::generation`] when it was popped.
    generation: u64,
}

impl Queue {
    /// Queue `index` of the device `dev`, on `vring`.
    pub(super) fn new(index: usize, dev: Arc<Inner>, vring: VringRwLock) -> Queue {
        let poke = Arc::new(Mutex::new(None));
        let share = dev.config.pool.clone().map(|pool| {
            let poke = Arc::clone(&poke);
            // Called from whichever thread gave bytes back; writing an eventfd never blocks.
            let wake = Waker(Arc::new(move || poke_fd(&poke, index)));
            Mutex::new(Share::new(pool, wake))
        });
        Queue {
            index,
            vring,
            answered: AtomicBool::new(false),
            bounced: AtomicU64::new(0),
            capped: AtomicBool::new(false),
            poke,
            share,
            deferred: Mutex::new(Deferred::default()),
            heads: (0..usize::from(dev.config.queue_size).max(1))
                .map(|_| AtomicBool::new(false))
                .collect(),
            in_flight: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            dev,
        }
    }

    /// GET_VRING_BASE gave up waiting for this queue's chains: from now on, none of the chains
    /// popped so far adds a used entry to the ring (they still complete and release their
    /// buffers). Takes the vring's lock, which every used entry is added under.
    pub(super) fn fence(&self) {
        let _state = self.vring.get_mut();
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Submits `req` to core `core` from this queue's waiter thread (started if none runs),
    /// which may block until the disk switch ends; the answer still comes on the core. One
    /// waiter per queue, submitting in order.
    fn defer(self: &Arc<Self>, core: usize, req: Request, done: Completion) {
        let mut d = lock(&self.deferred);
        d.waiting.push_back((req, done));
        if d.running {
            return;
        }
        d.running = true;
        drop(d);
        let queue = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("addcow-vhost-wait".into())
            .spawn(move || loop {
                let next = {
                    let mut d = lock(&queue.deferred);
                    let next = d.waiting.pop_front();
                    if next.is_none() {
                        d.running = false;
                    }
                    next
                };
                let Some((req, done)) = next else { return };
                queue.dev.disk.submit(core, req, done);
            });
        if let Err(e) = spawned {
            tracing::error!(queue = self.index, error = %e, "vhost-user-blk: no thread to submit requests during a disk switch");
            let failed = {
                let mut d = lock(&self.deferred);
                d.running = false;
                std::mem::take(&mut d.waiting)
            };
            for (_, done) in failed {
                done(Err(RequestError {
                    errno: libc::EAGAIN,
                    op: "submit during a disk switch",
                    offset: 0,
                }));
            }
        }
    }

    /// Sets (or clears) the duplicate of the kick eventfd used to wake the queue.
    pub(super) fn set_poke(&self, fd: Option<File>) {
        *lock(&self.poke) = fd;
    }

    /// Wakes the queue's poll as a kick would.
    pub(super) fn poke(&self) {
        poke_fd(&self.poke, self.index);
    }

    /// Takes `bytes` of bounce memory from the pool without waiting; false when the pool (or
    /// this queue's fair share of it) has no room now. Then `capped` is set, so that the answer
    /// giving this queue's bytes back wakes it; a give-back by another member of the pool
    /// wakes it through the share's waker.
    fn take_bounce(&self, bytes: u64) -> bool {
        let Some(share) = &self.share else {
            return true;
        };
        if lock(share).try_take(bytes) {
            return true;
        }
        self.capped.store(true, Ordering::SeqCst);
        // One of this queue's answers may have given bytes back between the two lines above
        // without seeing `capped`: try again.
        if lock(share).try_take(bytes) {
            self.capped.store(false, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Serves the ring after a kick: pops and submits every available chain through `submit`.
    /// With `EVENT_IDX`, driver notifications stay off while chains are popped and the ring is
    /// checked again after turning them back on. A bad ring (the frontend's fault) is reported
    /// once per connection and the queue stays. True when it stopped at [`READY_BUDGET`]
    /// with chains possibly left (the caller serves it again later, without a kick).
    pub fn serve(self: &Arc<Self>, submit: &mut dyn FnMut(Request, Completion)) -> bool {
        match self.serve_inner(submit) {
            Ok(yielded) => yielded,
            Err(e) => {
                self.report(&e);
                false
            }
        }
    }

    fn report(&self, e: &io::Error) {
        if !self.dev.ring_error_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(queue = self.index, error = %e, "vhost-user-blk: bad virtqueue; requests on it are not served");
        } else {
            tracing::debug!(queue = self.index, error = %e, "vhost-user-blk: bad virtqueue");
        }
    }

    fn serve_inner(
        self: &Arc<Self>,
        submit: &mut dyn FnMut(Request, Completion),
    ) -> io::Result<bool> {
        let event_idx = self.dev.event_idx.load(Ordering::Relaxed);
        let mut budget = READY_BUDGET;
        if !event_idx {
            return Ok(self.pump(submit, &mut budget)? == Pumped::Yield);
        }
        loop {
            self.vring
                .disable_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?;
            match self.pump(submit, &mut budget)? {
                Pumped::Held => return Ok(false),
                // Notifications stay off: the caller comes back without a kick.
                Pumped::Yield => return Ok(true),
                Pumped::Drained => {}
            }
            let more = self
                .vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?;
            if !more {
                return Ok(false);
            }
        }
    }

    /// Whether popping must stop at a cap (`count >= cap`); sets `capped` so that the answer
    /// that brings the count under it wakes the queue.
    fn at_cap(&self, count: &dyn Fn() -> bool) -> bool {
        if !count() {
            return false;
        }
        self.capped.store(true, Ordering::SeqCst);
        // An answer may have brought the count under the cap between the two lines above
        // without seeing `capped`: look again.
        if count() {
            return true;
        }
        self.capped.store(false, Ordering::SeqCst);
        false
    }

    /// Pops available chains until the ring is empty, a cap is reached (bounce bytes, chains
    /// in flight) or `budget` chains were popped, and submits their engine requests (outside
    /// the vring's lock: a completion may run inline). Each chain's descriptors are walked
    /// once, here; the parser sees only that list.
    fn pump(
        self: &Arc<Self>,
        submit: &mut dyn FnMut(Request, Completion),
        budget: &mut usize,
    ) -> io::Result<Pumped> {
        // A frontend not authorized (yet) is not served: `BlkDevice::authorize` wakes the
        // queue when it is.
        if !self.dev.authorized.load(Ordering::SeqCst) {
            return Ok(Pumped::Held);
        }
        let Some(atomic) = read(&self.dev.mem).clone() else {
            return Ok(Pumped::Held);
        };
        let mem = atomic.memory().into_inner();
        let limits = Limits {
            size: self.dev.config.size,
            read_only: self.dev.config.read_only,
            writeback: self.dev.writeback.load(Ordering::Relaxed),
            serial: &self.dev.config.serial,
            direct: self.dev.direct,
        };
        let disk = &self.dev.disk;
        let alloc = |len: usize| disk.alloc_buf(len);
        let mut take = |bytes: u64| self.take_bounce(bytes);
        let mut popped: Vec<(Chain, Vec<Request>)> = Vec::new();
        let result = {
            // The checks, the pops and the tickets happen under the vring's lock, which
            // GET_VRING_BASE's `set_queue_ready(false)` also takes: after it, no chain is popped,
            // and every popped one is counted before the lock is released.
            let mut state = self.vring.get_mut();
            if !state.get_queue().ready() || !state.is_enabled() {
                return Ok(Pumped::Held);
            }
            let mut iter = state
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(|e| io::Error::other(format!("virtqueue: {e}")))?;
            let in_flight_cap = self.heads.len();
            let generation = self.generation.load(Ordering::SeqCst);
            loop {
                if *budget == 0 {
                    break Pumped::Yield;
                }
                if self.at_cap(&|| self.bounced.load(Ordering::SeqCst) >= self.dev.batch_bytes)
                    || self.at_cap(&|| self.in_flight.load(Ordering::SeqCst) >= in_flight_cap)
                {
                    break Pumped::Held;
                }
                let Some(ticket) = self.dev.activity.begin(self.index) else {
                    break Pumped::Held;
                };
                let Some(chain) = iter.next() else {
                    break Pumped::Drained;
                };
                *budget -= 1;
                let head = chain.head_index();
                // The one walk of the descriptor table (bounded by the queue size; indirect
                // tables by their length).
                let descs: Vec<Descriptor> = chain.collect();
                let fresh = self
                    .heads
                    .get(usize::from(head))
                    .is_some_and(|h| !h.swap(true, Ordering::SeqCst));
                let pending = if fresh || self.heads.get(usize::from(head)).is_none() {
                    match parse(head, &mem, &descs, &limits, &alloc, &mut take) {
                        Ok((pending, reqs)) => {
                            self.bounced.fetch_add(pending.bounced, Ordering::SeqCst);
                            Some((pending, reqs))
                        }
                        Err(_) => {
                            // No bounce memory in the pool now: the chain goes back to the
                            // ring as it was (nothing of it was done) and is popped again when
                            // memory comes back (`take_bounce` arranged the wake-up).
                            if fresh {
                                if let Some(h) = self.heads.get(usize::from(head)) {
                                    h.store(false, Ordering::SeqCst);
                                }
                            }
                            iter.go_to_previous_position();
                            *budget += 1;
                            drop(ticket);
                            break Pumped::Held;
                        }
                    }
                } else {
                    None
                };
                let chain = match pending {
                    Some((pending, reqs)) => {
                        self.in_flight.fetch_add(1, Ordering::SeqCst);
                        let c = Chain {
                            pending,
                            ticket,
                            tracked: fresh,
                            generation,
                        };
                        (c, reqs)
                    }
                    None => {
                        // A head already in flight: refused, nothing of it parsed.
                        let status = status_slot(&mem, descs.last());
                        let pending = Pending::answered(head, &mem, status, VIRTIO_BLK_S_IOERR);
                        let c = Chain {
                            pending,
                            ticket,
                            tracked: false,
                            generation,
                        };
                        self.in_flight.fetch_add(1, Ordering::SeqCst);
                        (c, Vec::new())
                    }
                };
                popped.push(chain);
            }
        };
        for (chain, reqs) in popped {
            if reqs.is_empty() {
                self.answer(chain);
                continue;
            }
            let shared = Arc::new(Mutex::new(Some(chain)));
            for req in reqs {
                let q = Arc::clone(self);
                let shared = Arc::clone(&shared);
                submit(req, Box::new(move |r| q.complete(&shared, r)));
            }
        }
        Ok(result)
    }

    /// One engine request of a chain finished; the chain is answered with its last one. A
    /// failure (the guest sees `IOERR`) is logged with its context, rate-limited.
    fn complete(&self, chain: &Mutex<Option<Chain>>, r: Result<Done, RequestError>) {
        let done = {
            let mut slot = lock(chain);
            let Some(c) = slot.as_mut() else { return };
            if let Some(e) = c.pending.complete(r) {
                if let Some(suppressed) = self.dev.io_errors.admit() {
                    tracing::warn!(
                        socket = %self.dev.config.name,
                        queue = self.index,
                        sector = c.pending.sector,
                        op = c.pending.op,
                        error = %e,
                        suppressed_since_last = suppressed,
                        "vhost-user-blk: request failed; the guest sees an I/O error"
                    );
                }
            }
            if c.pending.outstanding > 0 {
                return;
            }
            slot.take()
        };
        if let Some(c) = done {
            self.answer(c);
        }
    }

    /// Writes the chain's status byte, adds its used entry, then lets its ticket go (so a
    /// GET_VRING_BASE waiting for the queue sees the entry).
    fn answer(&self, chain: Chain) {
        let Chain {
            pending,
            ticket,
            tracked,
            generation,
        } = chain;
        let head = pending.head;
        let bounced = pending.bounced;
        let len = pending.finish();
        if tracked {
            // Before the used entry: the driver may post this head again once it sees it.
            if let Some(h) = self.heads.get(usize::from(head)) {
                h.store(false, Ordering::SeqCst);
            }
        }
        {
            let mut state = self.vring.get_mut();
            if self.generation.load(Ordering::SeqCst) == generation {
                if let Err(e) = state.add_used(head, len) {
                    tracing::debug!(queue = self.index, error = %e, "vhost-user-blk: used ring");
                }
            }
        }
        self.answered.store(true, Ordering::SeqCst);
        drop(ticket);
        if let Some(share) = &self.share {
            lock(share).give_back(bounced);
        }
        let cap = self.dev.batch_bytes;
        let before = self.bounced.fetch_sub(bounced, Ordering::SeqCst);
        let chains = self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let under = before - bounced < cap && chains - 1 < self.heads.len();
        if under && self.capped.swap(false, Ordering::SeqCst) {
            self.poke();
        }
    }

    /// The end of a batch: signals the call eventfd if a chain was answered since the last
    /// signal and (with `EVENT_IDX`) the driver asked for it.
    pub fn notify(&self) {
        if !self.answered.swap(false, Ordering::SeqCst) {
            return;
        }
        let notify = if self.dev.event_idx.load(Ordering::Relaxed) {
            self.vring.needs_notification().unwrap_or(true)
        } else {
            true
        };
        if notify {
            if let Err(e) = self.vring.signal_used_queue() {
                tracing::debug!(queue = self.index, error = %e, "vhost-user-blk: call eventfd");
            }
        }
    }
}

/// Writes the kick eventfd duplicate in `poke` (if set), which wakes queue `index`'s poll.
fn poke_fd(poke: &Mutex<Option<File>>, index: usize) {
    if let Some(f) = &*lock(poke) {
        let mut f: &File = f;
        if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
            tracing::debug!(queue = index, error = %e, "vhost-user-blk: waking a queue failed");
        }
    }
}

/// A [`Queue`] as a source polled by its engine core.
pub struct QueueSource {
    /// The queue.
    pub queue: Arc<Queue>,
    /// The queue spent its [`READY_BUDGET`]: it is served again at this instant (by
    /// [`CoreSource::deadline`]), not before, whatever kicks come meanwhile.
    resume: Option<Instant>,
}

impl QueueSource {
    /// The source serving `queue`.
    pub fn new(queue: Arc<Queue>) -> QueueSource {
        QueueSource {
            queue,
            resume: None,
        }
    }

    fn run(&mut self, ctx: &mut SourceCtx<'_>) {
        let disk = Arc::clone(&self.queue.dev.disk);
        let core = ctx.core();
        let queue = Arc::clone(&self.queue);
        let started = Instant::now();
        let yielded = self.queue.serve(&mut |req, done| {
            if let Some((req, done)) = disk.try_submit_local(ctx, req, done) {
                // The disk is being switched (a live snapshot): its lock would block this core,
                // which must go on completing the requests the switch waits for.
                queue.defer(core, req, done);
            }
        });
        if yielded {
            let pause = (started.elapsed() * YIELD_FACTOR).min(MAX_YIELD);
            self.resume = Some(Instant::now() + pause);
        }
    }
}

impl CoreSource for QueueSource {
    fn ready(&mut self, ctx: &mut SourceCtx<'_>) {
        if self.resume.is_some() {
            // Paused after a spent budget: the deadline serves what this kick announced.
            return;
        }
        self.run(ctx);
    }

    fn idle(&mut self) {
        self.queue.notify();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.resume
    }

    fn deadline(&mut self, ctx: &mut SourceCtx<'_>) {
        if self.resume.take().is_some() {
            self.run(ctx);
        }
    }
}
