//! One core thread: its [`Ring`], the requests it serves and the loop that drives both.
//!
//! The ring plumbing (slab of in-flight ops keyed by `user_data`, in-flight cap, backlog, linked
//! chains, the eventfd read) is all in [`Ring`]; this module and the request state machines
//! (`rw.rs`: READ, WRITE, WRITE_ZEROES, TRIM; `commit.rs`: the group commit and its timers) only
//! plan ops and react to their completions. An op ([`ops::CoreOp`]) owns the memory its SQE
//! points into and comes back from the ring with its result.
//!
//! # One loop turn
//! 1. Handle the messages waiting in the channel, at most [`MAX_MSGS_PER_TURN`]: a stream of
//!    new messages (say completions that submit the next request to the same core) cannot hold
//!    the loop here.
//! 2. Fire due background commits; move backlog chains into the SQ.
//! 3. One `io_uring_enter`: when messages are waiting it does not block but still asks for
//!    events when the kernel flags some waiting (`GETEVENTS`: under `DEFER_TASKRUN` completions
//!    are posted only then; see `Wait::Poll`); otherwise it
//!    blocks until a completion, the eventfd, or the next background commit is due. Before
//!    blocking the core sets its `sleeping` flag and looks at the channel once more (see
//!    `mailbox.rs`).
//! 4. Handle every completion that arrived, then call `ready` on every attached source whose
//!    eventfd fired (`sources.rs`); before blocking in step 3, every source's `idle` is called.
//!
//! # Exit and panics
//! After `Shutdown` the loop ends once no task is left; messages still in the channel are
//! answered (`ESHUTDOWN`), and any that arrive later are dropped by the channel, which answers
//! them too ([`Responder`]). If the core panics, unwinding drops the ring first, which cancels
//! and reaps in-flight ops or leaks them (never frees memory the kernel may write), then the
//! tasks, whose responders answer with an error.

mod commit;
mod commit_order;
mod dirty_gate;
mod fleece;
#[cfg(feature = "fault-injection")]
mod inject;
pub(super) mod mailbox;
mod ops;
mod populate;
mod qos;
mod remote_read;
mod rw;
pub(super) mod shared;
mod shared_buf;
mod sources;
mod tasks;

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crossbeam_channel::Receiver;
use slab::Slab;

use super::request::{req_err, Done, MAX_POPULATE};
use super::split::{Seg, SplitScratch};
use crate::io::disk::state::{DiskState, Entered, Role, SLOTS_PER_DISK};
use crate::io::request::responder::Responder;
use crate::io::uring::buf::{self, DataBuf, IoBuf};
use crate::io::uring::ring::{Ring, Wait};
use mailbox::Msg;
use ops::{CoreOp, FileRef, OpKind, Target};
use shared::{EngineShared, MAX_REGISTERED_DISKS};
use shared_buf::SharedBuf;
use tasks::{ReadTask, Task};

/// Largest single read/write SQE (the kernel caps one transfer a little under 2 GiB).
const SEG_MAX: u64 = 1 << 30;
/// Size of the core's shared zero buffer (WRITE_ZEROES without holes writes from it).
const ZERO_CHUNK: u64 = 1 << 20;
/// Most messages handled in one loop turn.
const MAX_MSGS_PER_TURN: usize = 256;

thread_local! {
    static ON_CORE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is one of the engine's core threads (blocking on the engine from
/// one would deadlock).
pub fn on_core_thread() -> bool {
    ON_CORE.with(|c| c.get())
}

fn round_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// A core thread's state. Field order matters for drop: the ring goes first (it waits for, or
/// leaks, every in-flight op), so nothing the kernel may still touch (op buffers, the registered
/// arena held through `shared`) is freed before it.
pub(crate) struct Core {
    ring: Ring<CoreOp>,
    id: usize,
    shared: Arc<EngineShared>,
    tasks: Slab<Task>,
    files_ok: bool,
    registered: Vec<bool>,
    /// The arena's id when its slots are registered on this ring.
    fixed_arena: Option<u64>,
    zero: Rc<IoBuf>,
    timers: Vec<(Instant, Weak<DiskState>)>,
    stopping: bool,
    reaped: Vec<(CoreOp, i32)>,
    segs: Vec<Seg>,
    scratch: SplitScratch,
    sources: sources::Sources,
    /// Reads of a remote base in flight on its connection threads.
    remote_ops: Slab<remote_read::RemoteOp>,
    /// Reads finished while an op still held their buffer: answered once it lets go.
    held: Vec<HeldRead>,
    /// Throttle and fair share: requests waiting for their budget or their turn.
    gate: qos::Gate,
    #[cfg(feature = "fault-injection")]
    faults: Option<Arc<crate::io::testing::faults::FaultPlan>>,
}

impl Core {
    /// Builds the ring (on the core thread: `SINGLE_ISSUER` binds it to its creator), registers
    /// the sparse file table and the arena, and makes this thread the owner of its arena pool.
    pub(crate) fn new(id: usize, shared: Arc<EngineShared>) -> std::io::Result<Core> {
        ON_CORE.with(|c| c.set(true));
        let eventfd = shared.core(id).eventfd.as_raw_fd();
        let ring: Ring<CoreOp> = Ring::new(shared.config.queue_depth, eventfd)?;
        let files_ok = match ring
            .submitter()
            .register_files_sparse(MAX_REGISTERED_DISKS * SLOTS_PER_DISK)
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(core = id, error = %e,
                    "registering a file table failed; using plain file descriptors");
                false
            }
        };
        let fixed_arena = match &shared.arena {
            Some(arena) => {
                buf::bind_core_pool(arena, id);
                let iov = arena.iovecs();
                // SAFETY: the iovecs describe the arena's memory, which lives (held through
                // `shared`, an Arc this core keeps) until after the ring is dropped (field order
                // of Core).
                match unsafe { ring.submitter().register_buffers(&iov) } {
                    Ok(()) => Some(arena.id()),
                    Err(e) => {
                        tracing::warn!(core = id, error = %e, buffers = iov.len(),
                            "registering the buffer arena failed (RLIMIT_MEMLOCK?); reads and \
                             writes use unregistered buffers");
                        None
                    }
                }
            }
            None => None,
        };
        tracing::debug!(core = id, mode = ring.mode(), files_ok, "core ring ready");
        let gate = {
            let engine = Arc::downgrade(&shared);
            qos::Gate::new(
                shared.config.fair_share_requests,
                shared.config.fair_share_bytes,
                Box::new(move || {
                    if let Some(e) = engine.upgrade() {
                        e.core(id).wake();
                    }
                }),
            )
        };
        Ok(Core {
            gate,
            ring,
            id,
            #[cfg(feature = "fault-injection")]
            faults: shared.config.faults.clone(),
            shared,
            tasks: Slab::new(),
            files_ok,
            registered: vec![false; MAX_REGISTERED_DISKS as usize],
            fixed_arena,
            zero: Rc::new(IoBuf::new_zeroed(ZERO_CHUNK as usize)),
            timers: Vec::new(),
            stopping: false,
            reaped: Vec::new(),
            segs: Vec::new(),
            scratch: SplitScratch::default(),
            sources: sources::Sources::default(),
            remote_ops: Slab::new(),
            held: Vec::new(),
        })
    }

    /// The loop: runs until a `Shutdown` message arrived and every task finished.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        while self.turn(&rx) {}
        // What is still in the channel is answered (or run); what arrives after the channel is
        // dropped below is dropped by it, and a dropped request answers itself.
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Submit { done, .. } | Msg::Admitted { done, .. } => {
                    done.answer(Err(req_err(libc::ESHUTDOWN, "engine shut down", 0)));
                }
                Msg::Run(f) => f(),
                Msg::Register { ack, .. } | Msg::Detach { ack, .. } => {
                    let _ = ack.send(());
                }
                Msg::Attach { ack, .. } => {
                    let _ = ack.send(Err(std::io::Error::from_raw_os_error(libc::ESHUTDOWN)));
                }
                Msg::Commit { .. }
                | Msg::Unregister { .. }
                | Msg::Shutdown
                | Msg::RemoteDone { .. } => {}
                // Dropped: its responder answers ESHUTDOWN.
                Msg::FleeceRead(_) => {}
            }
        }
        drop(rx);
        // Drop the ring's file references now (ring teardown would do it later, in a kernel
        // worker), so a closed overlay's files are really closed when the engine has stopped.
        if self.files_ok {
            let _ = self.ring.submitter().unregister_files();
        }
    }

    /// One loop turn (see the module docs); false once the core may exit.
    fn turn(&mut self, rx: &Receiver<Msg>) -> bool {
        for _ in 0..MAX_MSGS_PER_TURN {
            let Ok(msg) = rx.try_recv() else { break };
            self.handle(msg);
        }
        self.fire_timers();
        if self.stopping {
            self.qos_shutdown();
        } else {
            self.pump_qos();
        }
        self.ring.flush_backlog();
        if self.stopping && self.tasks.is_empty() {
            // Sources go first: their socket ops (a recv waiting for a client) would keep the
            // ring busy for ever; removing them cancels those ops.
            self.remove_all_sources();
            if self.ring.is_idle() {
                return false;
            }
        }
        // Every turn, not only when the core is about to block: under a steady stream of
        // messages (NBD traffic on the same core) the channel never empties, and a source's
        // end-of-batch work (a vhost queue's call eventfd) must not wait for it to.
        self.idle_sources();
        let handle = self.shared.core(self.id);
        handle.sleeping.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let wait = if !rx.is_empty() {
            handle.sleeping.store(false, Ordering::SeqCst);
            Wait::Poll
        } else if let Some(deadline) = [
            self.next_deadline(),
            self.sources_deadline(),
            self.qos_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
        {
            Wait::Until(deadline)
        } else {
            Wait::Block
        };
        if let Err(e) = self.ring.enter(wait) {
            tracing::error!(core = self.id, error = %e, "io_uring_enter failed");
        }
        handle.sleeping.store(false, Ordering::SeqCst);
        let mut reaped = std::mem::take(&mut self.reaped);
        self.ring.reap(&mut reaped);
        for (op, res) in reaped.drain(..) {
            self.complete(op, res);
        }
        self.reaped = reaped;
        // Answers freed fair-share room.
        self.pump_qos();
        self.run_sources();
        true
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit { disk, req, done } => self.submit(disk, req, done),
            Msg::Admitted { disk, req, done } => self.start_request(disk, req, done),
            Msg::Commit { disk, waiter } => self.start_commit(&disk, vec![waiter]),
            Msg::Register { index, fds, ack } => {
                if self.files_ok {
                    let ok = self
                        .ring
                        .submitter()
                        .register_files_update(index * SLOTS_PER_DISK, &fds)
                        .is_ok();
                    if let Some(r) = self.registered.get_mut(index as usize) {
                        *r = ok;
                    }
                }
                let _ = ack.send(());
            }
            Msg::Unregister { index } => {
                if let Some(r) = self.registered.get_mut(index as usize) {
                    if *r {
                        let _ = self
                            .ring
                            .submitter()
                            .register_files_update(index * SLOTS_PER_DISK, &[-1, -1, -1]);
                        *r = false;
                    }
                }
            }
            Msg::Attach { fd, source, ack } => self.attach_source(fd, source, ack),
            Msg::Detach { id, ack } => self.detach_source(id, ack),
            Msg::Run(f) => f(),
            Msg::RemoteDone { op, result } => self.remote_done(op, result),
            Msg::FleeceRead(r) => self.fleece_read(r),
            Msg::Shutdown => self.stopping = true,
        }
    }

    // ---- planning helpers ------------------------------------------------------------------

    /// How this ring names the file `fd` of `disk` in `role`: its registered slot when that
    /// file is registered here.
    fn target(&self, disk: &DiskState, role: Role, fd: std::os::fd::RawFd) -> Target {
        match disk.slot_index() {
            Some(k)
                if self.registered.get(k as usize) == Some(&true)
                    && fd >= 0
                    && fd == disk.fd(role) =>
            {
                Target::Fixed(k * SLOTS_PER_DISK + role as u32)
            }
            _ => Target::Fd(fd),
        }
    }

    /// The raw image (up to its partial last unit, if it has one).
    fn image_file(&self, disk: &DiskState) -> FileRef {
        FileRef {
            target: self.target(disk, Role::Image, disk.fd(Role::Image)),
            role: Role::Image,
            align: disk.image_align,
        }
    }

    /// The metadata file (never O_DIRECT).
    fn meta_file(&self, disk: &DiskState) -> FileRef {
        FileRef {
            target: self.target(disk, Role::Meta, disk.fd(Role::Meta)),
            role: Role::Meta,
            align: super::align::DioAlign::NONE,
        }
    }

    /// The registered-buffer index of a buffer with this `arena_slot()`, when its arena is
    /// registered on this ring.
    fn fixed_slot(&self, slot: Option<(u64, u32)>) -> Option<u16> {
        let (arena, slot) = slot?;
        (self.fixed_arena == Some(arena))
            .then(|| u16::try_from(slot).ok())
            .flatten()
    }

    /// Pushes one linked chain to the ring.
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_mut))]
    fn push_chain(&mut self, mut chain: Vec<CoreOp>) {
        #[cfg(feature = "fault-injection")]
        self.inject(&mut chain);
        self.ring.push(chain);
    }

    /// Pushes one op to the ring.
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_mut))]
    fn push_op(&mut self, mut op: CoreOp) {
        #[cfg(feature = "fault-injection")]
        self.inject(std::slice::from_mut(&mut op));
        self.ring.push_one(op);
    }

    /// Issues one op for `task`; returns 1 (ops issued).
    fn issue(&mut self, task: usize, kind: OpKind) -> usize {
        self.push_op(CoreOp::new(task, kind));
        1
    }

    // ---- completions -----------------------------------------------------------------------

    fn complete(&mut self, op: CoreOp, res: i32) {
        #[cfg(feature = "fault-injection")]
        let res = crate::io::testing::faults::rewrite(op.fault.as_ref(), res);
        let CoreOp {
            task,
            kind,
            then_sync,
            stalls,
            ..
        } = op;
        let kind = match kind {
            OpKind::Sock { source, tag, io } => {
                self.sock_done(source, tag, io, res);
                return;
            }
            kind => kind,
        };
        // Whether the op did all it was asked (in a linked chain, only then does the next op
        // start).
        let whole = match &kind {
            OpKind::Read { into, .. } => res >= 0 && res as usize >= into.len(),
            OpKind::Write { from, .. } => res >= 0 && res as usize >= from.len(),
            OpKind::Punch { .. }
            | OpKind::Allocate { .. }
            | OpKind::Sync { .. }
            | OpKind::Sock { .. } => res >= 0,
        };
        match kind {
            OpKind::Read {
                file,
                off,
                into,
                copy_out,
            } => self.read_done(task, file, off, into, copy_out, stalls, res),
            OpKind::Write { file, off, from } => {
                self.write_done(task, file, off, from, stalls, res)
            }
            OpKind::Punch { off, len, .. } => self.punch_done(task, off, len, res),
            OpKind::Allocate { .. } => self.allocate_done(task, res),
            OpKind::Sync { file, id } => self.sync_done(task, file.role, id, res),
            OpKind::Sock { .. } => {}
        }
        if let (true, Some((role, id)), Some(t)) = (whole, then_sync, self.tasks.get(task)) {
            // The linked fdatasync after this op starts now (logged after this op's own
            // completion, which the reaction above logged).
            t.disk().rec_sync(role, id, false);
        }
        self.step(task);
    }

    /// One op of `task` is done (its reaction may have issued more): when none is left, the
    /// task moves on.
    fn step(&mut self, task: usize) {
        let Some(t) = self.tasks.get_mut(task) else {
            return;
        };
        let p = t.pending_mut();
        *p = p.saturating_sub(1);
        if *p == 0 {
            self.advance(task);
        }
    }

    /// `task` issued `n` more ops (moves on at once when it issued none).
    fn add_pending(&mut self, task: usize, n: usize) {
        if let Some(t) = self.tasks.get_mut(task) {
            *t.pending_mut() += n;
            if *t.pending_mut() == 0 {
                self.advance(task);
            }
        }
    }

    fn fail(&mut self, task: usize, errno: i32, op: &'static str) {
        if let Some(t) = self.tasks.get_mut(task) {
            t.fail(errno, op);
        }
    }

    /// A logic error inside the engine: fails `task` with `EIO` (never answers stale bytes as
    /// success) and logs it.
    fn internal(&mut self, task: usize, what: &'static str) {
        let (disk, offset) = match self.tasks.get(task) {
            Some(t) => (t.disk().meta_path.display().to_string(), t.offset()),
            None => (String::from("(request already gone)"), 0),
        };
        tracing::error!(
            core = self.id,
            disk,
            offset,
            what,
            "internal error; failing the request with EIO"
        );
        self.fail(task, libc::EIO, what);
    }

    /// A task's outstanding ops all completed: move it to its next stage or finish it.
    fn advance(&mut self, key: usize) {
        if !self.held.is_empty() {
            self.release_held();
        }
        match self.tasks.get(key) {
            Some(Task::Write(w)) if w.filling && w.err.is_none() => {
                self.write_fills_done(key);
                return;
            }
            Some(Task::Commit(c)) if c.err.is_none() && !c.chains.is_empty() => {
                self.push_commit_chain(key);
                return;
            }
            Some(Task::Populate(p)) if p.filling && p.err.is_none() => {
                self.populate_fills_done(key);
                return;
            }
            Some(Task::Fleece(_)) => {
                self.fleece_advance(key);
                return;
            }
            _ => {}
        }
        let Some(task) = self.tasks.try_remove(key) else {
            return;
        };
        match task {
            Task::Read(t) => self.finish_read(t),
            Task::Write(t) => self.finish_write(t),
            Task::Commit(t) => self.finish_commit(t),
            Task::Populate(t) => self.finish_populate(t),
            Task::Fleece(t) => self.fleece_finish(t),
        }
    }

    fn finish_read(&mut self, t: ReadTask) {
        let ReadTask {
            buf,
            into,
            err,
            done,
            disk,
            offset,
            copy_up,
            ..
        } = t;
        if let Some(e) = err {
            done.answer(Err(e));
            return;
        }
        let buf = match buf.into_inner() {
            Ok(buf) => buf,
            Err(shared) => {
                // Unreachable today: every op of a read holds a clone of its buffer only until
                // its completion is handled, and the task finishes only after its last op's
                // completion dropped that clone (`debug_assert` below keeps it so in tests).
                // Were it reached, an op would still point into the buffer (with a lent guest
                // buffer: guest memory). Answering now would hand that memory back while
                // the kernel may still write it, so the answer is held until the last clone is
                // gone (`release_held`).
                debug_assert!(false, "a read finished while an op still held its buffer");
                tracing::error!(core = self.id, disk = %disk.meta_path.display(), offset,
                    "internal error: a read finished while an op still held its buffer; its \
                     answer waits until the op lets go");
                self.held.push(HeldRead {
                    buf: shared,
                    done,
                    disk,
                    offset,
                });
                return;
            }
        };
        // A copy-on-read is admitted while the read itself still counts as a request of the
        // disk, so no close (or switch) can complete between the read's answer and the copy-up:
        // it either refuses the copy-up here or waits for it.
        let copy_up = copy_up.and_then(|len| Some((len, disk.enter()?)));
        let answer = match (into, buf) {
            (false, DataBuf::Owned(b)) => Done::Read(b),
            // A `ReadInto`'s buffer (a `Read`'s is always the engine's own).
            (_, b) => Done::Filled(b),
        };
        done.answer(Ok(answer));
        if let Some((len, admitted)) = copy_up {
            self.copy_up(disk, offset, len, admitted);
        }
    }

    /// Answers the reads held by `finish_read` whose buffers no op holds any more.
    fn release_held(&mut self) {
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].buf.is_unique() {
                let h = self.held.swap_remove(i);
                match h.buf.into_inner() {
                    Ok(_) => {
                        tracing::error!(core = self.id, disk = %h.disk.meta_path.display(),
                            offset = h.offset, "a held read fails with EIO now that its buffer \
                            is free");
                        h.done.answer(Err(req_err(
                            libc::EIO,
                            "internal error: read buffer was still shared",
                            h.offset,
                        )));
                    }
                    Err(b) => self.held.push(HeldRead { buf: b, ..h }),
                }
            } else {
                i += 1;
            }
        }
    }

    /// Copy-on-read of `[offset, offset + len)` after its read was answered: populates of at
    /// most [`MAX_POPULATE`] bytes each, counted as requests of the disk (a close waits for
    /// them). `admitted` counts the copy-up as a request until its populates are submitted (each
    /// then counts itself). Skipped (counted, logged once per disk) while
    /// `MAX_COPY_UP_INFLIGHT` bytes or more of copy-up are in flight on the disk, so guest
    /// reads cannot queue unbounded work.
    fn copy_up(&mut self, disk: Arc<DiskState>, offset: u64, len: u64, admitted: Entered) {
        #[cfg(feature = "fault-injection")]
        if let Some(plan) = &self.faults {
            plan.park_at(crate::io::testing::faults::ParkPoint::CopyUp, 0);
        }
        if len == 0 {
            return;
        }
        if disk.copy_up_inflight.load(Ordering::SeqCst) >= MAX_COPY_UP_INFLIGHT {
            if disk.copy_ups_skipped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(disk = %disk.meta_path.display(), offset, len,
                    limit = MAX_COPY_UP_INFLIGHT,
                    "copy-on-read skipped: too much copy-up in flight (logged once per disk; the \
                     read itself succeeded and later reads copy up again)");
            }
            return;
        }
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let piece = (end - at).min(MAX_POPULATE);
            disk.active.fetch_add(1, Ordering::SeqCst);
            disk.copy_up_inflight.fetch_add(piece, Ordering::SeqCst);
            let inflight = Arc::clone(&disk.copy_up_inflight);
            let path = disk.meta_path.clone();
            let answer = Responder::new(
                Box::new(move |r| {
                    inflight.fetch_sub(piece, Ordering::SeqCst);
                    if let Err(e) = r {
                        tracing::warn!(disk = %path.display(), offset = at, len = piece,
                            error = %e, "copy-on-read failed (the read itself succeeded)");
                    }
                }),
                Arc::clone(&disk.active),
            );
            self.submit_populate(Arc::clone(&disk), at, piece, answer);
            at += piece;
        }
        drop(admitted);
    }
}

/// Most bytes of copy-on-read populates in flight per disk before further copy-ups are
/// skipped.
pub(crate) const MAX_COPY_UP_INFLIGHT: u64 = 64 << 20;

/// A read whose answer waits until no op points into its buffer (see `finish_read`).
struct HeldRead {
    buf: SharedBuf,
    done: Responder,
    disk: Arc<DiskState>,
    offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_helpers() {
        assert_eq!(round_down(4097, 4096), 4096);
        assert_eq!(round_up(4097, 4096), 8192);
        assert_eq!(round_up(4096, 512), 4096);
    }
}
