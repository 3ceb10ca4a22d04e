//! One core thread: its io_uring, its in-flight operations and the request state machines.
//! OWNER: issue #3.
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
//! is due), then handle every CQE that arrived.

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crossbeam_channel::Receiver;
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use super::align::DioAlign;
use super::buf::{self, IoBuf};
use super::commit::{self, Waiter};
use super::disk::{DiskShared, Parked, Role, META_BLOCK, SLOTS_PER_DISK};
use super::engine::{EngineShared, Msg, MAX_REGISTERED_DISKS};
use super::split::{plan_read, Seg, SplitScratch, Src};
use super::{Completion, Done, Request, RequestError};
use crate::format::SECTOR_SIZE;

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

/// A file as an SQE names it: a plain fd or a registered-file slot.
#[derive(Debug, Clone, Copy)]
enum Target {
    Fd(RawFd),
    Fixed(u32),
}

macro_rules! with_target {
    ($t:expr, |$f:ident| $body:expr) => {
        match $t {
            Target::Fd(fd) => {
                let $f = types::Fd(fd);
                $body
            }
            Target::Fixed(i) => {
                let $f = types::Fixed(i);
                $body
            }
        }
    };
}

/// One read/write transfer: enough to build (and rebuild, for a short transfer) its SQE.
#[derive(Debug, Clone, Copy)]
struct Xfer {
    target: Target,
    role: Role,
    ptr: *mut u8,
    len: u32,
    off: u64,
    /// Registered buffer index when `ptr..ptr+len` lies in an arena slot registered here.
    fixed: Option<u16>,
}

/// A read that landed in a bounce buffer because the destination was not aligned for O_DIRECT.
struct Bounce {
    buf: IoBuf,
    skip: usize,
    dest: *mut u8,
    len: usize,
}

enum OpKind {
    Read(Xfer, Option<Bounce>),
    Write(Xfer),
    Punch { target: Target, off: u64, len: u64 },
    Sync { target: Target, role: Role, id: u64 },
}

/// One submitted SQE (key = its `user_data`).
struct Op {
    task: usize,
    kind: OpKind,
}

struct ReadTask {
    disk: Arc<DiskShared>,
    buf: IoBuf,
    offset: u64,
    pending: usize,
    err: Option<RequestError>,
    done: Completion,
}

/// The bytes a write-like task changes inside one read-modify-write buffer.
enum Patch {
    /// Copy the whole client payload to this offset of the buffer.
    Data { at: usize },
    /// Zero `[from, to)` of the buffer.
    Zero { from: usize, to: usize },
}

/// A read-modify-write buffer: whole units at `file_off`, filled from the disk, patched, written.
struct Edge {
    buf: IoBuf,
    file_off: u64,
    patch: Patch,
}

struct WriteTask {
    disk: Arc<DiskShared>,
    offset: u64,
    /// Locked sectors `[start, end)`; their bits are set when the task succeeds.
    lock: (u64, u64),
    pending: usize,
    /// Still reading old bytes into `edges` (read-modify-write); writes of edges come after.
    filling: bool,
    err: Option<RequestError>,
    data: Option<IoBuf>,
    edges: Vec<Edge>,
    fua: bool,
    done: Completion,
}

struct CommitTask {
    disk: Arc<DiskShared>,
    waiters: Vec<Waiter>,
    blocks: Vec<u64>,
    _bufs: Vec<IoBuf>,
    pending: usize,
    writes_left: usize,
    image_sync: u64,
    meta_sync: u64,
    err: Option<RequestError>,
}

enum Task {
    Read(ReadTask),
    Write(WriteTask),
    Commit(CommitTask),
}

impl Task {
    fn disk(&self) -> &Arc<DiskShared> {
        match self {
            Task::Read(t) => &t.disk,
            Task::Write(t) => &t.disk,
            Task::Commit(t) => &t.disk,
        }
    }

    fn pending_mut(&mut self) -> &mut usize {
        match self {
            Task::Read(t) => &mut t.pending,
            Task::Write(t) => &mut t.pending,
            Task::Commit(t) => &mut t.pending,
        }
    }

    fn fail(&mut self, errno: i32, op: &'static str) {
        let (err, offset) = match self {
            Task::Read(t) => (&mut t.err, t.offset),
            Task::Write(t) => (&mut t.err, t.offset),
            Task::Commit(t) => (&mut t.err, 0),
        };
        if err.is_none() {
            *err = Some(RequestError { errno, op, offset });
        }
    }
}

fn req_err(errno: i32, op: &'static str, offset: u64) -> RequestError {
    RequestError { errno, op, offset }
}

fn op_name(role: Role, write: bool) -> &'static str {
    match (role, write) {
        (Role::Image, false) => "read raw image",
        (Role::Image, true) => "write raw image",
        (Role::Meta, false) => "read metadata",
        (Role::Meta, true) => "write bitmap",
        (Role::Base, _) => "read base",
    }
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
    let entries = entries.clamp(2, 32768).next_power_of_two();
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
            let res = match self.next_deadline() {
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

    fn fixed_index(&self, buf: &IoBuf) -> Option<u16> {
        let (arena, slot) = buf.arena_slot()?;
        let ours = self.shared.arena.as_ref()?.id();
        (self.bufs_ok && arena == ours)
            .then(|| u16::try_from(slot).ok())
            .flatten()
    }

    // ---- requests --------------------------------------------------------------------------

    fn submit(&mut self, disk: Arc<DiskShared>, req: Request, done: Completion) {
        if disk.closed.load(Ordering::Acquire) {
            done(Err(req_err(libc::ESHUTDOWN, "disk closed", 0)));
            return;
        }
        let size = disk.size;
        match req {
            Request::Read { offset, len } => {
                if offset
                    .checked_add(u64::from(len))
                    .map_or(true, |e| e > size)
                {
                    done(Err(req_err(libc::EINVAL, "read past the end", offset)));
                    return;
                }
                self.start_read(disk, offset, len, done);
            }
            Request::Flush => {
                if disk.read_only {
                    done(Ok(Done::Ok));
                    return;
                }
                let waiter = Waiter {
                    core: self.id,
                    answer: Box::new(move |r| done(r.map(|()| Done::Ok))),
                };
                self.start_commit(&disk, vec![waiter]);
            }
            Request::Cache { offset, len } => {
                if offset.checked_add(len).map_or(true, |e| e > size) {
                    done(Err(req_err(libc::EINVAL, "cache past the end", offset)));
                } else {
                    done(Ok(Done::Ok));
                }
            }
            req @ (Request::Write { .. } | Request::WriteZeroes { .. } | Request::Trim { .. }) => {
                let (offset, len) = match &req {
                    Request::Write { offset, data, .. } => (*offset, data.len() as u64),
                    Request::WriteZeroes { offset, len, .. }
                    | Request::Trim { offset, len, .. } => (*offset, *len),
                    _ => (0, 0),
                };
                if disk.read_only {
                    done(Err(req_err(
                        libc::EPERM,
                        "write to a read-only disk",
                        offset,
                    )));
                    return;
                }
                let end = match offset.checked_add(len) {
                    Some(end) if end <= size => end,
                    _ => {
                        done(Err(req_err(libc::ENOSPC, "write past the end", offset)));
                        return;
                    }
                };
                if len == 0 {
                    let answer = match req {
                        Request::Write { data, .. } => Done::Written(data),
                        _ => Done::Ok,
                    };
                    done(Ok(answer));
                    return;
                }
                let unit = disk.unit;
                let a_start = round_down(offset, unit);
                let a_end = round_up(end, unit).min(size);
                let lock = (a_start / SECTOR_SIZE, a_end.div_ceil(SECTOR_SIZE));
                let mut parked = Some(Parked {
                    core: self.id,
                    req,
                    done,
                });
                if !disk.locks.lock_or_park(lock, &mut parked) {
                    return; // resubmitted by the unlock of an overlapping write
                }
                let Some(Parked { req, done, .. }) = parked else {
                    return;
                };
                match req {
                    Request::Write { offset, data, fua } => {
                        self.start_write(disk, lock, offset, data, fua, done)
                    }
                    Request::WriteZeroes {
                        offset,
                        len,
                        punch,
                        fua,
                    } => self.start_zero(disk, lock, offset, len, punch, fua, done),
                    Request::Trim { offset, len, fua } => {
                        self.start_zero(disk, lock, offset, len, true, fua, done)
                    }
                    _ => {}
                }
            }
        }
    }

    /// Issues the reads that fill `[dest, dest+len)` with the disk's bytes at `offset`
    /// (zero-filling what needs no I/O). Returns how many ops were issued.
    fn issue_read(
        &mut self,
        task: usize,
        disk: &Arc<DiskShared>,
        dest: *mut u8,
        dest_fixed: Option<u16>,
        offset: u64,
        len: u64,
    ) -> usize {
        let mut segs = std::mem::take(&mut self.segs);
        segs.clear();
        plan_read(
            &disk.bitmap,
            disk.base.as_deref(),
            offset,
            len,
            &mut self.scratch,
            &mut segs,
        );
        let mut issued = 0;
        let base_fd = disk.fd(Role::Base);
        for seg in &segs {
            // SAFETY: seg.dest + seg.len <= len, so the pointer stays inside the destination.
            let p = unsafe { dest.add(seg.dest as usize) };
            match seg.src {
                Src::Zero => {
                    // SAFETY: as above; the destination is owned by the task.
                    unsafe { std::ptr::write_bytes(p, 0, seg.len as usize) };
                }
                Src::Image { offset } => {
                    let t = self.target(disk, Role::Image, disk.fd(Role::Image));
                    issued += self.issue_file_read(
                        task,
                        t,
                        Role::Image,
                        disk.image_align,
                        p,
                        dest_fixed,
                        offset,
                        seg.len,
                    );
                }
                Src::File { fd, offset, align } => {
                    let t = if fd == base_fd {
                        self.target(disk, Role::Base, fd)
                    } else {
                        Target::Fd(fd)
                    };
                    issued += self.issue_file_read(
                        task,
                        t,
                        Role::Base,
                        align,
                        p,
                        dest_fixed,
                        offset,
                        seg.len,
                    );
                }
            }
        }
        self.segs = segs;
        issued
    }

    #[allow(clippy::too_many_arguments)]
    fn issue_file_read(
        &mut self,
        task: usize,
        target: Target,
        role: Role,
        align: DioAlign,
        dest: *mut u8,
        dest_fixed: Option<u16>,
        off: u64,
        len: u64,
    ) -> usize {
        let mut issued = 0;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(SEG_MAX);
            // SAFETY: done < len: inside the destination.
            let p = unsafe { dest.add(done as usize) };
            let o = off + done;
            let kind = if align.fits(p as usize, o, n) {
                OpKind::Read(
                    Xfer {
                        target,
                        role,
                        ptr: p,
                        len: n as u32,
                        off: o,
                        fixed: dest_fixed,
                    },
                    None,
                )
            } else {
                let a_off = round_down(o, align.offset);
                let a_end = round_up(o + n, align.offset);
                let mut bounce =
                    buf::alloc(self.shared.arena.as_ref(), (a_end - a_off) as usize, false);
                let fixed = self.fixed_index(&bounce);
                let ptr = bounce.as_mut_ptr();
                OpKind::Read(
                    Xfer {
                        target,
                        role,
                        ptr,
                        len: (a_end - a_off) as u32,
                        off: a_off,
                        fixed,
                    },
                    Some(Bounce {
                        buf: bounce,
                        skip: (o - a_off) as usize,
                        dest: p,
                        len: n as usize,
                    }),
                )
            };
            self.issue(task, kind);
            issued += 1;
            done += n;
        }
        issued
    }

    #[allow(clippy::too_many_arguments)]
    fn issue_write(
        &mut self,
        task: usize,
        target: Target,
        role: Role,
        ptr: *mut u8,
        len: u64,
        off: u64,
        fixed: Option<u16>,
    ) -> usize {
        let mut issued = 0;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(SEG_MAX);
            let xfer = Xfer {
                target,
                role,
                // SAFETY: done < len: inside the source buffer.
                ptr: unsafe { ptr.add(done as usize) },
                len: n as u32,
                off: off + done,
                fixed,
            };
            self.issue(task, OpKind::Write(xfer));
            issued += 1;
            done += n;
        }
        issued
    }

    /// Real zeros over `[off, off+len)` of the raw image, from the core's zero buffer.
    fn issue_zero_writes(&mut self, task: usize, disk: &DiskShared, off: u64, len: u64) -> usize {
        let target = self.target(disk, Role::Image, disk.fd(Role::Image));
        let ptr = self.zero.as_ptr() as *mut u8; // only ever read by the kernel (writes from it)
        let mut issued = 0;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            let xfer = Xfer {
                target,
                role: Role::Image,
                ptr,
                len: n as u32,
                off: off + done,
                fixed: None,
            };
            self.issue(task, OpKind::Write(xfer));
            issued += 1;
            done += n;
        }
        issued
    }

    fn start_read(&mut self, disk: Arc<DiskShared>, offset: u64, len: u32, done: Completion) {
        let mut buf = buf::alloc(self.shared.arena.as_ref(), len as usize, false);
        let fixed = self.fixed_index(&buf);
        let ptr = buf.as_mut_ptr();
        let key = self.tasks.insert(Task::Read(ReadTask {
            disk: Arc::clone(&disk),
            buf,
            offset,
            pending: 0,
            err: None,
            done,
        }));
        let n = self.issue_read(key, &disk, ptr, fixed, offset, u64::from(len));
        self.set_pending(key, n);
    }

    fn set_pending(&mut self, key: usize, n: usize) {
        if let Some(t) = self.tasks.get_mut(key) {
            *t.pending_mut() += n;
        }
        if n == 0 {
            self.advance(key);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_write(
        &mut self,
        disk: Arc<DiskShared>,
        lock: (u64, u64),
        offset: u64,
        mut data: IoBuf,
        fua: bool,
        done: Completion,
    ) {
        let len = data.len() as u64;
        let end = offset + len;
        let (a_start, a_end) = (lock.0 * SECTOR_SIZE, lock.1 * SECTOR_SIZE);
        let unit = disk.unit;
        if offset == a_start && end == a_end {
            // Aligned: straight from the caller's buffer to the raw image.
            let fixed = self.fixed_index(&data);
            let ptr = data.as_mut_ptr();
            let key = self.tasks.insert(Task::Write(WriteTask {
                disk: Arc::clone(&disk),
                offset,
                lock,
                pending: 0,
                filling: false,
                err: None,
                data: Some(data),
                edges: Vec::new(),
                fua,
                done,
            }));
            let target = self.target(&disk, Role::Image, disk.fd(Role::Image));
            let n = self.issue_write(key, target, Role::Image, ptr, len, offset, fixed);
            self.set_pending(key, n);
            return;
        }
        // Read-modify-write of whole units: fill the partial head and tail units with the
        // current bytes (raw image, base or zeros by their bits), then patch and write.
        let mut bounce = buf::alloc(
            self.shared.arena.as_ref(),
            (a_end - a_start) as usize,
            false,
        );
        let fixed = self.fixed_index(&bounce);
        let ptr = bounce.as_mut_ptr();
        let key = self.tasks.insert(Task::Write(WriteTask {
            disk: Arc::clone(&disk),
            offset,
            lock,
            pending: 0,
            filling: true,
            err: None,
            data: Some(data),
            edges: vec![Edge {
                buf: bounce,
                file_off: a_start,
                patch: Patch::Data {
                    at: (offset - a_start) as usize,
                },
            }],
            fua,
            done,
        }));
        let mut n = 0;
        let head = offset != a_start;
        if head {
            let head_end = (a_start + unit).min(a_end);
            n += self.issue_read(key, &disk, ptr, fixed, a_start, head_end - a_start);
        }
        if end != a_end {
            let ts = round_down(end, unit);
            if !(head && ts == a_start) {
                // SAFETY: ts - a_start < a_end - a_start: inside the bounce buffer.
                let p = unsafe { ptr.add((ts - a_start) as usize) };
                n += self.issue_read(key, &disk, p, fixed, ts, a_end - ts);
            }
        }
        self.set_pending(key, n);
    }

    #[allow(clippy::too_many_arguments)]
    fn start_zero(
        &mut self,
        disk: Arc<DiskShared>,
        lock: (u64, u64),
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
        done: Completion,
    ) {
        let end = offset + len;
        let (a_start, a_end) = (lock.0 * SECTOR_SIZE, lock.1 * SECTOR_SIZE);
        let unit = disk.unit;
        let mut edges = Vec::new();
        let head = offset != a_start;
        if head {
            let e_end = (a_start + unit).min(a_end);
            edges.push(Edge {
                buf: buf::alloc(
                    self.shared.arena.as_ref(),
                    (e_end - a_start) as usize,
                    false,
                ),
                file_off: a_start,
                patch: Patch::Zero {
                    from: (offset - a_start) as usize,
                    to: (end.min(e_end) - a_start) as usize,
                },
            });
        }
        let mut inner_end = end;
        if end != a_end {
            let ts = round_down(end, unit);
            inner_end = ts;
            if !(head && ts == a_start) {
                edges.push(Edge {
                    buf: buf::alloc(self.shared.arena.as_ref(), (a_end - ts) as usize, false),
                    file_off: ts,
                    patch: Patch::Zero {
                        from: (offset.max(ts) - ts) as usize,
                        to: (end - ts) as usize,
                    },
                });
            }
        }
        let inner_start = if head { a_start + unit } else { offset };
        let mut fills = Vec::new();
        for e in &mut edges {
            let fixed = self.fixed_index(&e.buf);
            fills.push((e.buf.as_mut_ptr(), fixed, e.file_off, e.buf.len() as u64));
        }
        let key = self.tasks.insert(Task::Write(WriteTask {
            disk: Arc::clone(&disk),
            offset,
            lock,
            pending: 0,
            filling: true,
            err: None,
            data: None,
            edges,
            fua,
            done,
        }));
        let mut n = 0;
        for (ptr, fixed, off, len) in fills {
            n += self.issue_read(key, &disk, ptr, fixed, off, len);
        }
        if inner_start < inner_end {
            if punch {
                let target = self.target(&disk, Role::Image, disk.fd(Role::Image));
                self.issue(
                    key,
                    OpKind::Punch {
                        target,
                        off: inner_start,
                        len: inner_end - inner_start,
                    },
                );
                n += 1;
            } else {
                n += self.issue_zero_writes(key, &disk, inner_start, inner_end - inner_start);
            }
        }
        self.set_pending(key, n);
    }

    // ---- commit ----------------------------------------------------------------------------

    fn start_commit(&mut self, disk: &Arc<DiskShared>, waiters: Vec<Waiter>) {
        {
            let mut st = match disk.commit.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if st.in_flight {
                st.next.extend(waiters);
                return;
            }
            st.in_flight = true;
        }
        self.launch_commit(Arc::clone(disk), waiters);
    }

    /// DESIGN invariant 3: take the dirty marks, copy the blocks, then one linked chain
    /// fdatasync(raw) → write(bitmap spans) → fdatasync(meta).
    fn launch_commit(&mut self, disk: Arc<DiskShared>, waiters: Vec<Waiter>) {
        let blocks = disk.dirty.take();
        let max_spans = MAX_COMMIT_SPANS
            .min(self.sq_entries.saturating_sub(2))
            .max(1);
        let spans = commit::spans(&blocks, META_BLOCK, disk.meta_len, max_spans);
        let mut bufs = Vec::with_capacity(spans.len());
        for s in &spans {
            let mut b = IoBuf::new_zeroed(s.len as usize);
            commit::copy_span(&disk, s.offset, &mut b);
            bufs.push(b);
        }
        let image_sync = disk.next_sync_id();
        let meta_sync = disk.next_sync_id();
        let image_t = self.target(&disk, Role::Image, disk.fd(Role::Image));
        let meta_t = self.target(&disk, Role::Meta, disk.fd(Role::Meta));
        let writes: Vec<Xfer> = spans
            .iter()
            .zip(bufs.iter_mut())
            .map(|(s, b)| Xfer {
                target: meta_t,
                role: Role::Meta,
                ptr: b.as_mut_ptr(),
                len: s.len as u32,
                off: s.offset,
                fixed: None,
            })
            .collect();
        let nwrites = writes.len();
        let key = self.tasks.insert(Task::Commit(CommitTask {
            disk: Arc::clone(&disk),
            waiters,
            blocks,
            _bufs: bufs,
            pending: 0,
            writes_left: nwrites,
            image_sync,
            meta_sync,
            err: None,
        }));
        let image_sync_op = OpKind::Sync {
            target: image_t,
            role: Role::Image,
            id: image_sync,
        };
        let meta_sync_op = OpKind::Sync {
            target: meta_t,
            role: Role::Meta,
            id: meta_sync,
        };
        let mut chain: Vec<OpKind> = Vec::with_capacity(nwrites + 2);
        if cfg!(feature = "unsafe-bits-before-sync") {
            // TEST-ONLY, deliberately wrong: bits reach the disk before their data does.
            chain.extend(writes.into_iter().map(OpKind::Write));
            if nwrites > 0 {
                chain.push(meta_sync_op);
            }
            chain.push(image_sync_op);
            if nwrites == 0 {
                disk.rec_sync(Role::Image, image_sync, false);
            }
        } else {
            chain.push(image_sync_op);
            chain.extend(writes.into_iter().map(OpKind::Write));
            if nwrites > 0 {
                chain.push(meta_sync_op);
            }
            disk.rec_sync(Role::Image, image_sync, false);
        }
        let len = chain.len();
        let mut group = Vec::with_capacity(len);
        for (i, kind) in chain.into_iter().enumerate() {
            let mut e = self.add_op(key, kind);
            if i + 1 < len {
                e = e.flags(squeue::Flags::IO_LINK);
            }
            group.push(e);
        }
        self.push_group(group);
        self.set_pending(key, len);
    }

    fn finish_commit(&mut self, t: CommitTask) {
        let CommitTask {
            disk,
            waiters,
            blocks,
            err,
            ..
        } = t;
        if let Some(e) = &err {
            tracing::warn!(path = %disk.meta_path.display(), error = %e, "commit failed");
            disk.dirty.remark(&blocks);
        }
        let result = match err {
            Some(e) => Err(e),
            None => Ok(()),
        };
        for w in waiters {
            self.answer_waiter(w, result.clone());
        }
        let next = {
            let mut st = match disk.commit.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if st.next.is_empty() {
                st.in_flight = false;
                None
            } else {
                Some(std::mem::take(&mut st.next))
            }
        };
        if let Some(next) = next {
            self.launch_commit(Arc::clone(&disk), next);
        } else if disk.dirty.any() {
            self.arm_bg(&disk);
        }
    }

    fn answer_waiter(&self, w: Waiter, result: Result<(), RequestError>) {
        let Waiter { core, answer } = w;
        if core == self.id {
            answer(result);
            return;
        }
        let msg = Msg::Run(Box::new(move || answer(result)));
        if let Err(Msg::Run(f)) = self.shared.core(core).send(msg) {
            f(); // that core is gone: answer here rather than never
        }
    }

    fn arm_bg(&mut self, disk: &Arc<DiskShared>) {
        let Some(delay) = self.shared.config.commit_delay else {
            return;
        };
        if disk.read_only || disk.bg_armed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.timers
            .push((Instant::now() + delay, Arc::downgrade(disk)));
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.timers.iter().map(|t| t.0).min()
    }

    fn fire_timers(&mut self) {
        if self.timers.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        self.timers.retain(|(at, d)| {
            if *at <= now {
                due.push(d.clone());
                false
            } else {
                true
            }
        });
        for d in due {
            if let Some(disk) = d.upgrade() {
                disk.bg_armed.store(false, Ordering::Release);
                if !disk.closed.load(Ordering::Acquire) {
                    self.start_commit(&disk, Vec::new());
                }
            }
        }
    }

    // ---- completions -----------------------------------------------------------------------

    fn complete(&mut self, ud: u64, res: i32) {
        if ud == EVENTFD_UD {
            // Clear before the channel is drained (next turn), so no send goes unnoticed.
            self.shared
                .core(self.id)
                .notified
                .store(false, Ordering::SeqCst);
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
            OpKind::Punch { target, off, len } => self.punch_done(task, target, off, len, res),
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

    fn read_done(&mut self, task: usize, x: Xfer, bounce: Option<Bounce>, res: i32) {
        if res < 0 {
            self.fail(task, -res, op_name(x.role, false));
        } else {
            let n = (res as usize).min(x.len as usize);
            // A short read means end of file: the rest reads as zeros.
            // SAFETY: ptr..ptr+len is this op's buffer region, owned by the task or bounce.
            unsafe { std::ptr::write_bytes(x.ptr.add(n), 0, x.len as usize - n) };
            if let Some(b) = bounce {
                if let Some(src) = b.buf.get(b.skip..b.skip + b.len) {
                    // SAFETY: dest..dest+len lies in the task's destination; src is the bounce.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), b.dest, b.len) };
                }
            }
        }
        self.step(task);
    }

    fn write_done(&mut self, task: usize, x: Xfer, res: i32) {
        let Some(disk) = self.tasks.get(task).map(|t| Arc::clone(t.disk())) else {
            return;
        };
        if res < 0 {
            self.fail(task, -res, op_name(x.role, true));
            self.step(task);
            return;
        }
        let n = (res as u32).min(x.len);
        if n > 0 {
            // SAFETY: the kernel wrote n bytes from ptr; the region is owned by the task.
            let data = unsafe { std::slice::from_raw_parts(x.ptr, n as usize) };
            disk.rec_write(x.role, x.off, data);
        }
        let is_commit = matches!(self.tasks.get(task), Some(Task::Commit(_)));
        if n < x.len {
            if n == 0 || is_commit {
                self.fail(
                    task,
                    if n == 0 { libc::ENOSPC } else { libc::EIO },
                    op_name(x.role, true),
                );
                self.step(task);
            } else {
                // Short write: submit the rest as a new op of the same task.
                let rest = Xfer {
                    // SAFETY: n < len: still inside the buffer.
                    ptr: unsafe { x.ptr.add(n as usize) },
                    len: x.len - n,
                    off: x.off + u64::from(n),
                    fixed: x.fixed,
                    ..x
                };
                self.issue(task, OpKind::Write(rest));
            }
            return;
        }
        if let Some(Task::Commit(c)) = self.tasks.get_mut(task) {
            c.writes_left = c.writes_left.saturating_sub(1);
            if c.writes_left == 0 && c.err.is_none() {
                // The linked fdatasync(meta) starts now that its last write completed.
                disk.rec_sync(Role::Meta, c.meta_sync, false);
            }
        }
        self.step(task);
    }

    fn punch_done(&mut self, task: usize, target: Target, off: u64, len: u64, res: i32) {
        let Some(disk) = self.tasks.get(task).map(|t| Arc::clone(t.disk())) else {
            return;
        };
        let _ = target;
        if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
            // No hole punching here: write real zeros instead.
            let n = self.issue_zero_writes(task, &disk, off, len);
            if let Some(t) = self.tasks.get_mut(task) {
                *t.pending_mut() += n;
            }
        } else if res < 0 {
            self.fail(task, -res, "punch hole in raw image");
        } else {
            disk.rec_punch(Role::Image, off, len);
        }
        self.step(task);
    }

    fn sync_done(&mut self, task: usize, role: Role, id: u64, res: i32) {
        let Some(disk) = self.tasks.get(task).map(|t| Arc::clone(t.disk())) else {
            return;
        };
        if res < 0 {
            let op = match role {
                Role::Image => "fdatasync raw image",
                _ => "fdatasync metadata",
            };
            self.fail(task, -res, op);
        } else {
            disk.rec_sync(role, id, true);
            if cfg!(feature = "unsafe-bits-before-sync") && role == Role::Meta {
                if let Some(Task::Commit(c)) = self.tasks.get(task) {
                    disk.rec_sync(Role::Image, c.image_sync, false);
                }
            }
        }
        self.step(task);
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

    /// Read-modify-write: the old bytes are in; patch the new ones in and write the units.
    fn write_fills_done(&mut self, key: usize) {
        let mut writes = Vec::new();
        let disk = match self.tasks.get_mut(key) {
            Some(Task::Write(w)) => {
                w.filling = false;
                for e in &mut w.edges {
                    match e.patch {
                        Patch::Data { at } => {
                            if let (Some(data), Some(dst)) = (
                                w.data.as_ref(),
                                e.buf
                                    .get_mut(at..at + w.data.as_ref().map_or(0, |d| d.len())),
                            ) {
                                dst.copy_from_slice(data);
                            }
                        }
                        Patch::Zero { from, to } => {
                            if let Some(dst) = e.buf.get_mut(from..to) {
                                dst.fill(0);
                            }
                        }
                    }
                    let len = e.buf.len() as u64;
                    writes.push((e.buf.as_mut_ptr(), len, e.file_off, e.buf.arena_slot()));
                }
                Arc::clone(&w.disk)
            }
            _ => return,
        };
        let target = self.target(&disk, Role::Image, disk.fd(Role::Image));
        let mut n = 0;
        for (ptr, len, off, slot) in writes {
            let fixed = match (slot, &self.shared.arena) {
                (Some((aid, s)), Some(a)) if self.bufs_ok && aid == a.id() => u16::try_from(s).ok(),
                _ => None,
            };
            n += self.issue_write(key, target, Role::Image, ptr, len, off, fixed);
        }
        self.set_pending(key, n);
    }

    fn finish_write(&mut self, t: WriteTask) {
        let WriteTask {
            disk,
            lock,
            err,
            data,
            fua,
            done,
            ..
        } = t;
        if err.is_none() {
            // DESIGN invariant 2: bits only after the data write completed.
            disk.set_bits(lock.0, lock.1);
            self.arm_bg(&disk);
        }
        for p in disk.locks.unlock(lock) {
            let Parked { core, req, done } = p;
            let msg = Msg::Submit {
                disk: Arc::clone(&disk),
                req,
                done,
            };
            if let Err(Msg::Submit { done, .. }) = self.shared.core(core).send(msg) {
                done(Err(req_err(libc::ESHUTDOWN, "engine shut down", 0)));
            }
        }
        if let Some(e) = err {
            done(Err(e));
            return;
        }
        let answer = match data {
            Some(d) => Done::Written(d),
            None => Done::Ok,
        };
        if fua {
            let waiter = Waiter {
                core: self.id,
                answer: Box::new(move |r| done(r.map(|()| answer))),
            };
            self.start_commit(&disk, vec![waiter]);
        } else {
            done(Ok(answer));
        }
    }
}

fn build_entry(kind: &OpKind) -> squeue::Entry {
    match kind {
        OpKind::Read(x, _) => match x.fixed {
            Some(i) => with_target!(x.target, |f| opcode::ReadFixed::new(f, x.ptr, x.len, i)
                .offset(x.off)
                .build()),
            None => with_target!(x.target, |f| opcode::Read::new(f, x.ptr, x.len)
                .offset(x.off)
                .build()),
        },
        OpKind::Write(x) => match x.fixed {
            Some(i) => with_target!(x.target, |f| opcode::WriteFixed::new(f, x.ptr, x.len, i)
                .offset(x.off)
                .build()),
            None => with_target!(x.target, |f| opcode::Write::new(f, x.ptr, x.len)
                .offset(x.off)
                .build()),
        },
        OpKind::Punch { target, off, len } => {
            with_target!(*target, |f| opcode::Fallocate::new(f, *len)
                .offset(*off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build())
        }
        OpKind::Sync { target, .. } => with_target!(*target, |f| opcode::Fsync::new(f)
            .flags(types::FsyncFlags::DATASYNC)
            .build()),
    }
}
