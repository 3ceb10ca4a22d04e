//! One virtqueue served on its engine core: [`Queue`] (popping chains, answering them) and
//! [`QueueSource`], the [`CoreSource`] that runs it in the core's own loop.
//!
//! The queue's kick eventfd is polled by the core's io_uring. When it fires, the core calls
//! [`QueueSource::ready`], which pops every available chain (each counted in [`Activity`]
//! before it is popped), parses it and submits its engine requests on the same core with no
//! channel hop. Each chain is answered on its own when its requests complete (on that core):
//! data and status byte into guest memory, then its used entry. Just before the core blocks,
//! [`QueueSource::idle`] signals the call eventfd once for every answer since the last signal
//! (as `EVENT_IDX` allows): one interrupt per batch, and no batch barrier: chains complete
//! independently.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use addcow_engine::{Completion, CoreSource, Done, Request, RequestError, SourceCtx};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestAddressSpace;

use super::activity::Ticket;
use super::device::Inner;
use super::request::{parse, Limits, Pending};

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
    /// Popping stopped at the bounce cap; the answer that brings `bounced` under it wakes the
    /// queue again.
    capped: AtomicBool,
    /// A duplicate of the kick eventfd, written to wake the queue's poll from here (after the
    /// cap, or when the frontend enables the queue).
    poke: Mutex<Option<File>>,
    /// Requests that met a disk switch, in order, and whether a thread is submitting them.
    deferred: Mutex<Deferred>,
}

/// Requests of one queue waiting for a disk switch to end: one thread per queue submits them
/// in order (at most a ring's worth of requests wait, never a thread each).
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
    /// memory table, bounce cap): they wait for a later wake-up.
    Held,
}

/// One chain being answered: its request state, its activity ticket, its bounced bytes.
struct Chain {
    pending: Pending,
    ticket: Ticket,
}

impl Queue {
    /// Queue `index` of the device `dev`, on `vring`.
    pub(super) fn new(index: usize, dev: Arc<Inner>, vring: VringRwLock) -> Queue {
        Queue {
            index,
            dev,
            vring,
            answered: AtomicBool::new(false),
            bounced: AtomicU64::new(0),
            capped: AtomicBool::new(false),
            poke: Mutex::new(None),
            deferred: Mutex::new(Deferred::default()),
        }
    }

    /// Submits `req` to core `core` from this queue's waiter thread (started if none runs),
    /// which may block until the disk switch ends; the answer still comes on the core. One
    /// waiter per queue, submitting in order.
    fn defer(self: &Arc<Self>, core: usize, req: Request, done: Completion) {
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
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
                    let mut d = queue.deferred.lock().unwrap_or_else(|p| p.into_inner());
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
                let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
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
        *self.poke.lock().unwrap_or_else(|p| p.into_inner()) = fd;
    }

    /// Wakes the queue's poll as a kick would.
    pub(super) fn poke(&self) {
        if let Some(f) = &*self.poke.lock().unwrap_or_else(|p| p.into_inner()) {
            let mut f: &File = f;
            if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
                tracing::debug!(queue = self.index, error = %e, "vhost-user-blk: waking a queue failed");
            }
        }
    }

    /// Serves the ring after a kick: pops and submits every available chain through `submit`.
    /// With `EVENT_IDX`, driver notifications stay off while chains are popped and the ring is
    /// checked again after turning them back on. A bad ring (the frontend's fault) is reported
    /// once per connection and the queue stays.
    pub fn serve(self: &Arc<Self>, submit: &mut dyn FnMut(Request, Completion)) {
        if let Err(e) = self.serve_inner(submit) {
            if !self.dev.ring_error_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(queue = self.index, error = %e, "vhost-user-blk: bad virtqueue; requests on it are not served");
            } else {
                tracing::debug!(queue = self.index, error = %e, "vhost-user-blk: bad virtqueue");
            }
        }
    }

    fn serve_inner(
        self: &Arc<Self>,
        submit: &mut dyn FnMut(Request, Completion),
    ) -> io::Result<()> {
        let event_idx = self.dev.event_idx.load(Ordering::Relaxed);
        if !event_idx {
            self.pump(submit)?;
            return Ok(());
        }
        loop {
            self.vring
                .disable_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?;
            if self.pump(submit)? == Pumped::Held {
                return Ok(());
            }
            let more = self
                .vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Pops available chains until the ring is empty or the bounce cap is reached, and submits
    /// their engine requests (outside the vring's lock: a completion may run inline).
    fn pump(self: &Arc<Self>, submit: &mut dyn FnMut(Request, Completion)) -> io::Result<Pumped> {
        let Some(atomic) = self
            .dev
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
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
            loop {
                if self.bounced.load(Ordering::SeqCst) >= self.dev.batch_bytes {
                    self.capped.store(true, Ordering::SeqCst);
                    // An answer may have brought the count under the cap between the two
                    // lines above without seeing `capped`: look again.
                    if self.bounced.load(Ordering::SeqCst) >= self.dev.batch_bytes {
                        break Pumped::Held;
                    }
                    self.capped.store(false, Ordering::SeqCst);
                }
                let Some(ticket) = self.dev.activity.begin(self.index) else {
                    break Pumped::Held;
                };
                let Some(chain) = iter.next() else {
                    break Pumped::Drained;
                };
                let head = chain.head_index();
                let descs: Vec<Descriptor> = chain.clone().collect();
                let reader = Reader::new(&*mem, chain.clone());
                let writer = Writer::new(&*mem, chain);
                let (pending, reqs) = parse(head, &mem, &descs, reader, writer, &limits, &alloc);
                self.bounced.fetch_add(pending.bounced, Ordering::SeqCst);
                popped.push((Chain { pending, ticket }, reqs));
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
            let mut slot = chain.lock().unwrap_or_else(|p| p.into_inner());
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
        let Chain { pending, ticket } = chain;
        let head = pending.head;
        let bounced = pending.bounced;
        let len = pending.finish();
        if let Err(e) = self.vring.add_used(head, len) {
            tracing::debug!(queue = self.index, error = %e, "vhost-user-blk: used ring");
        }
        self.answered.store(true, Ordering::SeqCst);
        drop(ticket);
        if bounced > 0 {
            let before = self.bounced.fetch_sub(bounced, Ordering::SeqCst);
            let cap = self.dev.batch_bytes;
            if before - bounced < cap && self.capped.swap(false, Ordering::SeqCst) {
                self.poke();
            }
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

/// A [`Queue`] as a source polled by its engine core.
pub struct QueueSource {
    /// The queue.
    pub queue: Arc<Queue>,
}

impl CoreSource for QueueSource {
    fn ready(&mut self, ctx: &mut SourceCtx<'_>) {
        let disk = Arc::clone(&self.queue.dev.disk);
        let core = ctx.core();
        let queue = Arc::clone(&self.queue);
        self.queue.serve(&mut |req, done| {
            if let Some((req, done)) = disk.try_submit_local(ctx, req, done) {
                // The disk is being switched (a live snapshot): its lock would block this core,
                // which must go on completing the requests the switch waits for.
                queue.defer(core, req, done);
            }
        });
    }

    fn idle(&mut self) {
        self.queue.notify();
    }
}
