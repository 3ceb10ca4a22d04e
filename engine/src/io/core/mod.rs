//! One core thread: its io_uring, its in-flight operations and the request state machines.
//!
//!
//! # The `user_data` contract
//!
//! Every SQE this core submits carries a `user_data` that says what its CQE completes:
//!
//! * [`EVENTFD_UD`] (`u64::MAX`): the 8-byte read of the core's eventfd that is always pending;
//!   its completion means "messages may be waiting on the channel". It is re-armed at once.
//! * [`CANCEL_UD`] (`u64::MAX - 1`): the cancel of that read at exit.
//! * Anything else: the key of an [`Op`] in the core's `ops` slab. The op is removed when its CQE
//!   arrives; it names its parent task (a key into the `tasks` slab) and holds everything needed
//!   to finish or resubmit it (the buffer pointer stays valid because the task owns the buffer
//!   and a task lives until its last op completed).
//!
//! Operations submitted to the ring (`in_flight`) never exceed `cap = CQ entries - 1` (one CQE is
//! reserved for the eventfd read), so the completion queue cannot overflow; what does not fit
//! waits in `backlog` (whole linked chains at a time) until completions make room.
//!
//! # One loop turn
//!
//! Drain the channel (starting requests, which push SQEs), fire due background commits, move
//! backlog into the SQ, then one `submit_and_wait(1)` (with a timeout when a background commit
//! is due), then handle every CQE that arrived. Before blocking the core sets its `sleeping`
//! flag and checks the channel once more; only a sender that finds the flag set writes the
//! eventfd, so a busy core is fed without any wakeup syscalls.

mod group_commit;
mod ops;
mod rw;
mod tasks;

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crossbeam_channel::Receiver;
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use super::buf::IoBuf;
use super::disk::{DiskShared, Role, SLOTS_PER_DISK};
use super::engine::{EngineShared, Msg, MAX_REGISTERED_DISKS};
use super::split::{Seg, SplitScratch};
use super::Done;
use ops::{build_entry, Op, OpKind, Target};
use tasks::{ReadTask, Task};

/// `user_data` of the eventfd read.
pub(crate) const EVENTFD_UD: u64 = u64::MAX;
/// `user_data` of the cancel of the eventfd read at exit.
pub(crate) const CANCEL_UD: u64 = u64::MAX - 1;
/// Largest single read/write SQE (the kernel caps one transfer a little under 2 GiB).
const SEG_MAX: u64 = 1 << 30;
/// Size of the core's shared zero buffer (WRITE_ZEROES without holes writes from it).
const ZERO_CHUNK: u64 = 1 << 20;
/// Most metadata write spans in one commit chain (a chain must fit one submission).
const MAX_COMMIT_SPANS: usize = 32;

thread_local! {
    static ON_CORE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is one of the engine's core threads (blocking on the engine from
/// one would deadlock).
pub(crate) fn on_core_thread() -> bool {
    ON_CORE.with(|c| c.get())
}

fn round_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn round_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// A core thread's state. Field order matters for drop: the ring goes first, so the kernel
/// releases registered buffers before the arena (held through `shared`) can be freed.
pub(crate) struct Core {
    ring: IoUring,
    id: usize,
    shared: Arc<EngineShared>,
    ops: Slab<Op>,
    tasks: Slab<Task>,
    backlog: VecDeque<Vec<squeue::Entry>>,
    in_flight: usize,
    cap: usize,
    sq_entries: usize,
    files_ok: bool,
    registered: Vec<bool>,
    bufs_ok: bool,
    zero: IoBuf,
    timers: Vec<(Instant, Weak<DiskShared>)>,
    evbuf: Box<u64>,
    eventfd: RawFd,
    eventfd_armed: bool,
    stopping: bool,
    cqes: Vec<(u64, i32)>,
    segs: Vec<Seg>,
    scratch: SplitScratch,
}

/// Builds a ring, trying the cheapest task-run mode the kernel accepts first.
fn build_ring(entries: u32) -> std::io::Result<(IoUring, &'static str)> {
    // At least 8 entries: a commit chain (fdatasync, spans, fdatasync) must fit one submission.
    let entries = entries.clamp(8, 32768).next_power_of_two();
    let mut last = None;
    for mode in 0..4 {
        let mut b = IoUring::builder();
        b.setup_cqsize(entries * 2);
        let name = match mode {
            0 => {
                b.setup_single_issuer().setup_defer_taskrun();
                "SINGLE_ISSUER+DEFER_TASKRUN"
            }
            1 => {
                b.setup_single_issuer().setup_coop_taskrun();
                "SINGLE_ISSUER+COOP_TASKRUN"
            }
            2 => {
                b.setup_coop_taskrun();
                "COOP_TASKRUN"
            }
            _ => "plain",
        };
        match b.build(entries) {
            Ok(ring) => return Ok((ring, name)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL)))
}

impl Core {
    /// Builds the ring (on the core thread: SINGLE_ISSUER binds it to its creator) and
    /// registers the sparse file table and the arena.
    pub(crate) fn new(id: usize, shared: Arc<EngineShared>) -> std::io::Result<Core> {
        let (ring, mode) = build_ring(shared.config.queue_depth)?;
        let files_ok = ring
            .submitter()
            .register_files_sparse(MAX_REGISTERED_DISKS * SLOTS_PER_DISK)
            .is_ok();
        let bufs_ok = match &shared.arena {
            Some(arena) => {
                let iov = arena.iovecs();
                // SAFETY: the iovecs describe the arena's memory, which lives in `shared` (an Arc
                // this core holds) until after the ring is dropped (field order of Core).
                unsafe { ring.submitter().register_buffers(&iov) }.is_ok()
            }
            None => false,
        };
        tracing::debug!(core = id, mode, files_ok, bufs_ok, "core ring ready");
        let sq_entries = ring.params().sq_entries() as usize;
        let cap = (ring.params().cq_entries() as usize)
            .saturating_sub(1)
            .max(1);
        let eventfd = shared.core(id).eventfd.as_raw_fd();
        Ok(Core {
            ring,
            id,
            shared,
            ops: Slab::with_capacity(cap),
            tasks: Slab::new(),
            backlog: VecDeque::new(),
            in_flight: 0,
            cap,
            sq_entries,
            files_ok,
            registered: vec![false; MAX_REGISTERED_DISKS as usize],
            bufs_ok,
            zero: IoBuf::new_zeroed(ZERO_CHUNK as usize),
            timers: Vec::new(),
            evbuf: Box::new(0),
            eventfd,
            eventfd_armed: false,
            stopping: false,
            cqes: Vec::new(),
            segs: Vec::new(),
            scratch: SplitScratch::default(),
        })
    }

    /// Marks the calling thread as a core thread.
    pub(crate) fn mark_thread() {
        ON_CORE.with(|c| c.set(true));
    }

    /// The loop: runs until a `Shutdown` message arrived and every task finished.
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        self.arm_eventfd();
        loop {
            while let Ok(msg) = rx.try_recv() {
                self.handle(msg);
            }
            self.fire_timers();
            self.flush_backlog();
            if self.stopping && self.tasks.is_empty() && self.backlog.is_empty() {
                break;
            }
            // Announce the sleep, then look at the channel once more (see CoreHandle::sleeping).
            let handle = self.shared.core(self.id);
            handle.sleeping.store(true, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            let idle = rx.is_empty();
            let res = match self.next_deadline() {
                _ if !idle => {
                    handle.sleeping.store(false, Ordering::SeqCst);
                    self.ring.submit()
                }
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    let ts = types::Timespec::new()
                        .sec(wait.as_secs())
                        .nsec(wait.subsec_nanos());
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                None => self.ring.submit_and_wait(1),
            };
            handle.sleeping.store(false, Ordering::SeqCst);
            if let Err(e) = res {
                match e.raw_os_error() {
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EAGAIN)
                    | Some(libc::EBUSY) => {}
                    _ => tracing::error!(core = self.id, error = %e, "io_uring_enter failed"),
                }
            }
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &cqes {
                self.complete(ud, res);
            }
            cqes.clear();
            self.cqes = cqes;
        }
        self.cancel_eventfd();
        // Drop the ring's file references now (ring teardown would do it later, in a kernel
        // worker), so a closed overlay's files are really closed when the engine has stopped.
        if self.files_ok {
            let _ = self.ring.submitter().unregister_files();
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit { disk, req, done } => self.submit(disk, req, done),
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
            Msg::Run(f) => f(),
            Msg::Shutdown => self.stopping = true,
        }
    }

    // ---- submission plumbing -------------------------------------------------------------

    fn arm_eventfd(&mut self) {
        let ptr: *mut u64 = &mut *self.evbuf;
        let sqe = opcode::Read::new(types::Fd(self.eventfd), ptr.cast(), 8)
            .build()
            .user_data(EVENTFD_UD);
        // SAFETY: evbuf is a Box owned by the core; it outlives the read (cancelled and reaped
        // in cancel_eventfd before the core is dropped).
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // SQ full: submit to make room, then push again (the SQ is empty after a submit).
            let _ = self.ring.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(&sqe) };
        }
        self.eventfd_armed = true;
    }

    fn cancel_eventfd(&mut self) {
        if !self.eventfd_armed {
            return;
        }
        let sqe = opcode::AsyncCancel::new(EVENTFD_UD)
            .build()
            .user_data(CANCEL_UD);
        // SAFETY: a cancel SQE references no memory.
        let _ = unsafe { self.ring.submission().push(&sqe) };
        for _ in 0..100 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let seen = self.ring.completion().any(|c| c.user_data() == EVENTFD_UD);
            if seen {
                self.eventfd_armed = false;
                return;
            }
        }
        // The read could not be reaped: leak its buffer rather than free memory the kernel may
        // still write into.
        std::mem::forget(std::mem::replace(&mut self.evbuf, Box::new(0)));
    }

    /// Queues one linked chain (or single SQE): straight into the SQ when it fits under the
    /// in-flight cap, else behind the backlog.
    fn push_group(&mut self, group: Vec<squeue::Entry>) {
        if self.backlog.is_empty() && self.try_push(&group) {
            return;
        }
        self.backlog.push_back(group);
    }

    fn try_push(&mut self, group: &[squeue::Entry]) -> bool {
        if self.in_flight + group.len() > self.cap {
            return false;
        }
        let mut sq = self.ring.submission();
        if sq.capacity() - sq.len() < group.len() {
            return false;
        }
        for e in group {
            // SAFETY: every SQE's buffers are owned by its task (or the core) and stay valid
            // until its CQE is handled; space was checked above.
            let _ = unsafe { sq.push(e) };
        }
        drop(sq);
        self.in_flight += group.len();
        true
    }

    fn flush_backlog(&mut self) {
        while let Some(group) = self.backlog.pop_front() {
            if !self.try_push(&group) {
                self.backlog.push_front(group);
                break;
            }
        }
    }

    fn add_op(&mut self, task: usize, kind: OpKind) -> squeue::Entry {
        let entry = build_entry(&kind);
        let key = self.ops.insert(Op { task, kind });
        entry.user_data(key as u64)
    }

    fn issue(&mut self, task: usize, kind: OpKind) {
        let e = self.add_op(task, kind);
        if self.backlog.is_empty() && self.try_push(std::slice::from_ref(&e)) {
            return;
        }
        self.backlog.push_back(vec![e]);
    }

    fn target(&self, disk: &DiskShared, role: Role, fd: RawFd) -> Target {
        if let Some(k) = disk.slot_index {
            if self.registered.get(k as usize) == Some(&true) && fd == disk.fd(role) && fd >= 0 {
                return Target::Fixed(k * SLOTS_PER_DISK + role as u32);
            }
        }
        Target::Fd(fd)
    }

    /// The registered-buffer index of `buf`, when it is an arena slot registered on this ring.
    fn fixed_index(&self, buf: &IoBuf) -> Option<u16> {
        self.fixed_slot(buf.arena_slot())
    }

    /// [`Core::fixed_index`] from a buffer's `arena_slot()`.
    fn fixed_slot(&self, slot: Option<(u64, u32)>) -> Option<u16> {
        let (arena, slot) = slot?;
        let ours = self.shared.arena.as_ref()?.id();
        (self.bufs_ok && arena == ours)
            .then(|| u16::try_from(slot).ok())
            .flatten()
    }

    // ---- completions -----------------------------------------------------------------------

    fn complete(&mut self, ud: u64, res: i32) {
        if ud == EVENTFD_UD {
            // The channel is drained at the top of the next turn.
            self.arm_eventfd();
            return;
        }
        if ud == CANCEL_UD {
            return;
        }
        let Some(op) = self.ops.try_remove(ud as usize) else {
            tracing::error!(core = self.id, ud, "completion for an unknown op");
            return;
        };
        self.in_flight = self.in_flight.saturating_sub(1);
        let task = op.task;
        match op.kind {
            OpKind::Read(x, bounce) => self.read_done(task, x, bounce, res),
            OpKind::Write(x) => self.write_done(task, x, res),
            OpKind::Punch { off, len, .. } => self.punch_done(task, off, len, res),
            OpKind::Sync { role, id, .. } => self.sync_done(task, role, id, res),
        }
    }

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

    fn fail(&mut self, task: usize, errno: i32, op: &'static str) {
        if let Some(t) = self.tasks.get_mut(task) {
            t.fail(errno, op);
        }
    }

    /// A task's outstanding ops all completed: move it to its next stage or finish it.
    fn advance(&mut self, key: usize) {
        let filling =
            matches!(self.tasks.get(key), Some(Task::Write(w)) if w.filling && w.err.is_none());
        if filling {
            self.write_fills_done(key);
            return;
        }
        let Some(task) = self.tasks.try_remove(key) else {
            return;
        };
        match task {
            Task::Read(t) => {
                let ReadTask { buf, err, done, .. } = t;
                done(match err {
                    Some(e) => Err(e),
                    None => Ok(Done::Read(buf)),
                });
            }
            Task::Write(t) => self.finish_write(t),
            Task::Commit(t) => self.finish_commit(t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_builds_with_some_taskrun_mode_and_cq_twice_sq() {
        let (ring, mode) = build_ring(48).expect("io_uring available");
        assert!(!mode.is_empty());
        assert_eq!(ring.params().sq_entries(), 64, "rounded to a power of two");
        assert_eq!(ring.params().cq_entries(), 128);
    }

    #[test]
    fn rounding_helpers() {
        assert_eq!(round_down(4097, 4096), 4096);
        assert_eq!(round_up(4097, 4096), 8192);
        assert_eq!(round_up(4096, 512), 4096);
        assert_ne!(EVENTFD_UD, CANCEL_UD);
    }
}
