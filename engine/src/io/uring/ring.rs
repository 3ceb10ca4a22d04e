//! One core's io_uring and everything that keeps its submissions sound, in one type
//! (modelled on firecracker's `IoUring<T>`).
//!
//! A [`Ring<T>`] owns:
//! * the io_uring (built on the calling thread: `SINGLE_ISSUER` binds it to its creator);
//! * the *slab* of in-flight ops. An op `T` is moved into the slab when its SQE is pushed, its
//!   key is the SQE's `user_data`, and it is handed back (with the result) only when its CQE is
//!   reaped. An op owns the buffers its SQE points into ([`RingOp`]), so buffer lifetime is a type:
//!   nothing the kernel may still write into can be freed while the op is in flight;
//! * the *in-flight cap*: at most `CQ entries - 1` ops are submitted (one CQE is kept for the
//!   eventfd read), so the completion queue cannot overflow. [`Ring::try_push`] refuses a chain
//!   that does not fit and gives it back;
//! * the *backlog*: whole chains that did not fit, pushed in order as completions make room;
//! * *linked chains*: a chain of ops is pushed with `IOSQE_IO_LINK` on all but the last, into one
//!   submission (never split across two `io_uring_enter` calls, which would cut the link);
//! * the *eventfd read* that is always pending, so another thread can wake a core blocked in
//!   `io_uring_enter`. One SQE is kept free for it, so re-arming cannot fail for lack of room,
//!   and it counts as armed only once it is really in the SQ.
//! * *polls*: file descriptors (eventfds of other subsystems) the ring watches for readability
//!   with a multishot `IORING_OP_POLL_ADD` (a re-armed single-shot poll where the kernel refuses
//!   multishot), each under an id the caller picks; [`Ring::take_fired`] hands out the ids that
//!   became readable. A poll references no memory. Removal (`IORING_OP_POLL_REMOVE`) is
//!   asynchronous: the id stops firing at once and is forgotten when its last CQE arrives.
//!
//! # The `user_data` contract
//! * [`WAKE_UD`] (`u64::MAX`): the 8-byte read of the eventfd; re-armed when reaped.
//! * [`CANCEL_UD`] (`u64::MAX - 1`): the cancels issued at teardown and when a source's ops are
//!   cancelled (`Ring::cancel_where`).
//! * [`POLL_REMOVE_UD`] (`u64::MAX - 2`): poll removals.
//! * [`POLL_TAG`] `| id`: the poll with that id (ids are below `POLL_TAG`).
//! * anything else: the slab key of an op (always below `POLL_TAG`).
//!
//! # Teardown
//! Dropping the ring (also while a panic unwinds) cancels every in-flight op and waits (boundedly)
//! for their CQEs; ops whose CQE never comes are leaked, never freed, because the kernel may
//! still write into their buffers.

use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, EnterFlags, IoUring, Submitter};
use slab::Slab;

/// `user_data` of the eventfd read.
pub(crate) const WAKE_UD: u64 = u64::MAX;
/// `user_data` of the cancels issued at teardown.
pub(crate) const CANCEL_UD: u64 = u64::MAX - 1;
/// `user_data` of poll removals.
pub(crate) const POLL_REMOVE_UD: u64 = u64::MAX - 2;
/// Tag bit of a poll's `user_data`; the bits below it are the poll's id.
pub(crate) const POLL_TAG: u64 = 1 << 62;
/// How long teardown waits for cancelled ops before leaking them.
const TEARDOWN_BUDGET: Duration = Duration::from_secs(10);

/// An operation a [`Ring`] can carry.
///
/// # Safety
/// Every address in the entry that [`RingOp::entry`] builds must point into memory that `self`
/// owns or keeps alive, that does not move when `self` is moved (heap memory, not `self`'s own
/// bytes), and that stays valid until `self` is dropped. The ring keeps a pushed op alive until
/// its CQE has been reaped (or leaks it), which then makes every SQE sound.
pub(crate) unsafe trait RingOp {
    /// The SQE for this op, without `user_data` and link flags (the ring sets those).
    fn entry(&mut self) -> squeue::Entry;
}

/// How [`Ring::enter`] may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Submit and collect completions without waiting. Under `DEFER_TASKRUN` completions are
    /// only posted by an enter that asks for events (`GETEVENTS`); the ring is set up with
    /// `TASKRUN_FLAG`, so the kernel flags when some are waiting and the enter asks exactly then.
    Poll,
    /// Block until at least one completion (or the eventfd) arrives.
    Block,
    /// Like `Block`, but not past this instant.
    Until(Instant),
}

/// The eventfd read that is always pending.
struct Wake {
    fd: RawFd,
    buf: Box<u64>,
    armed: bool,
}

/// One watched file descriptor (see the module docs).
struct Poll {
    fd: RawFd,
    /// A POLL_ADD for it is in the SQ or in the kernel.
    armed: bool,
    /// It was removed: it never fires again and is forgotten once disarmed.
    removing: bool,
    /// The POLL_REMOVE for it is in the SQ or in the kernel.
    remove_sent: bool,
}

/// See the module docs.
pub(crate) struct Ring<T: RingOp> {
    uring: IoUring,
    mode: &'static str,
    ops: Slab<T>,
    backlog: VecDeque<Vec<T>>,
    /// Most ops in flight: CQ entries - 1.
    cap: usize,
    /// SQEs ops may use: SQ entries - 1 (one is kept for the eventfd read).
    sq_room: usize,
    wake: Wake,
    /// A non-blocking enter must always ask for events (the kernel cannot flag waiting task
    /// work: no TASKRUN_FLAG).
    poll_events: bool,
    /// Watched fds by id.
    polls: HashMap<u64, Poll>,
    /// Ids whose fd became readable since the last [`Ring::take_fired`].
    fired: Vec<u64>,
    /// Whether polls are armed multishot (cleared when the kernel refuses it).
    multishot: bool,
}

/// Builds an io_uring, trying the cheapest task-run mode the kernel accepts first.
fn build(entries: u32) -> std::io::Result<(IoUring, &'static str)> {
    // At least 8 entries: a commit chain (fdatasync, a span, fdatasync) must fit one submission
    // next to the eventfd read.
    let entries = entries.clamp(8, 32768).next_power_of_two();
    let mut last = None;
    for mode in 0..4 {
        let mut b = IoUring::builder();
        b.setup_cqsize(entries * 2);
        // TASKRUN_FLAG: the kernel flags the SQ ring when completions wait to be posted, so a
        // non-blocking enter asks for events exactly when there are some (see Wait::Poll).
        let name = match mode {
            0 => {
                b.setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_taskrun_flag();
                "SINGLE_ISSUER+DEFER_TASKRUN+TASKRUN_FLAG"
            }
            1 => {
                b.setup_single_issuer()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag();
                "SINGLE_ISSUER+COOP_TASKRUN+TASKRUN_FLAG"
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

impl<T: RingOp> Ring<T> {
    /// A ring of about `entries` SQ entries (rounded to a power of two, at least 8; the CQ is
    /// twice that) that keeps a read of `wake_fd` pending (none when negative).
    pub(crate) fn new(entries: u32, wake_fd: RawFd) -> std::io::Result<Ring<T>> {
        let (uring, mode) = build(entries)?;
        let sq = uring.params().sq_entries() as usize;
        let poll_events = !mode.contains("TASKRUN_FLAG");
        let cq = uring.params().cq_entries() as usize;
        let mut ring = Ring {
            uring,
            mode,
            ops: Slab::with_capacity(cq),
            backlog: VecDeque::new(),
            cap: cq.saturating_sub(1).max(1),
            sq_room: sq.saturating_sub(1).max(1),
            wake: Wake {
                fd: wake_fd,
                buf: Box::new(0),
                armed: false,
            },
            poll_events,
            polls: HashMap::new(),
            fired: Vec::new(),
            multishot: true,
        };
        ring.arm_wake();
        Ok(ring)
    }

    /// The task-run mode the kernel accepted.
    pub(crate) fn mode(&self) -> &'static str {
        self.mode
    }

    /// For registering files and buffers.
    pub(crate) fn submitter(&self) -> Submitter<'_> {
        self.uring.submitter()
    }

    /// The longest chain [`Ring::try_push`] can ever accept.
    pub(crate) fn max_chain(&self) -> usize {
        self.cap.min(self.sq_room)
    }

    /// Ops submitted and not yet reaped.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// No op in flight and none waiting in the backlog.
    pub(crate) fn is_idle(&self) -> bool {
        self.ops.is_empty() && self.backlog.is_empty()
    }

    /// Whether the eventfd read is pending.
    pub(crate) fn wake_armed(&self) -> bool {
        self.wake.armed || self.wake.fd < 0
    }

    /// Pushes `chain` (linked in order; a single op is a chain of one) into the SQ, or refuses
    /// and hands it back when it does not fit: the in-flight cap or the free SQEs (it is never
    /// split). An empty chain is accepted.
    pub(crate) fn try_push(&mut self, chain: Vec<T>) -> Result<(), Vec<T>> {
        let n = chain.len();
        if n == 0 {
            return Ok(());
        }
        if !self.has_room(n) {
            return Err(chain);
        }
        self.push_unchecked(chain, n);
        Ok(())
    }

    /// Like [`Ring::try_push`] for a single op (no chain to allocate).
    pub(crate) fn try_push_one(&mut self, op: T) -> Result<(), T> {
        if !self.has_room(1) {
            return Err(op);
        }
        self.push_unchecked(std::iter::once(op), 1);
        Ok(())
    }

    /// Whether `n` more ops fit under the in-flight cap and into the SQ (one SQE always stays
    /// free for (re-)arming the eventfd read).
    fn has_room(&mut self, n: usize) -> bool {
        let reserve = usize::from(self.wake.fd >= 0);
        let sq = self.uring.submission();
        let free = sq.capacity() - sq.len();
        self.ops.len() + n <= self.cap && n <= self.sq_room && free >= n + reserve
    }

    /// Pushes the `n` ops of `chain`, linked; room was checked.
    fn push_unchecked(&mut self, chain: impl IntoIterator<Item = T>, n: usize) {
        let mut sq = self.uring.submission();
        for (i, mut op) in chain.into_iter().enumerate() {
            let mut entry = op.entry();
            let key = self.ops.insert(op);
            entry = entry.user_data(key as u64);
            if i + 1 < n {
                entry = entry.flags(squeue::Flags::IO_LINK);
            }
            // SAFETY: the op now lives in the slab until its CQE is reaped (or is leaked at
            // teardown), and by the RingOp contract every address in its entry stays valid that
            // long; room was checked above.
            let pushed = unsafe { sq.push(&entry) };
            debug_assert!(pushed.is_ok(), "SQ room was checked");
        }
    }

    /// Pushes `chain` now if nothing is waiting before it and it fits, else queues it behind the
    /// backlog (chains keep their order).
    pub(crate) fn push(&mut self, chain: Vec<T>) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(chain);
            return;
        }
        if let Err(chain) = self.try_push(chain) {
            self.backlog.push_back(chain);
        }
    }

    /// Pushes one op now if nothing is waiting before it and it fits, else queues it.
    pub(crate) fn push_one(&mut self, op: T) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(vec![op]);
            return;
        }
        if let Err(op) = self.try_push_one(op) {
            self.backlog.push_back(vec![op]);
        }
    }

    /// Cancels the ops `pick` selects: backlogged chains holding one are dropped (never
    /// submitted); each in-flight one gets an `IORING_OP_ASYNC_CANCEL` by its key and still comes
    /// back through [`Ring::reap`] (with `-ECANCELED`, or its own result if it ended first), so
    /// its memory is freed only after the kernel let go of it.
    pub(crate) fn cancel_where(&mut self, mut pick: impl FnMut(&T) -> bool) {
        self.backlog.retain(|chain| !chain.iter().any(&mut pick));
        let keys: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, op)| pick(op))
            .map(|(k, _)| k as u64)
            .collect();
        for key in keys {
            let sqe = opcode::AsyncCancel::new(key).build().user_data(CANCEL_UD);
            // SAFETY: a cancel SQE references no memory.
            while unsafe { self.uring.submission().push(&sqe) }.is_err() {
                // The SQ is full: submit what is in it to make room.
                if self.uring.submit().is_err() {
                    tracing::error!(
                        key,
                        "cannot submit to make room for a cancel; the op \
                        ends when its socket does"
                    );
                    break;
                }
            }
        }
    }

    /// Moves backlog chains into the SQ while they fit.
    pub(crate) fn flush_backlog(&mut self) {
        while let Some(chain) = self.backlog.pop_front() {
            if let Err(chain) = self.try_push(chain) {
                self.backlog.push_front(chain);
                break;
            }
        }
    }

    /// Watches `fd` for readability under `id` (below [`POLL_TAG`]; not in use). The poll is
    /// armed now if an SQE is free, else at the next [`Ring::enter`] or [`Ring::reap`]; a fd that
    /// is readable already fires once armed.
    pub(crate) fn add_poll(&mut self, id: u64, fd: RawFd) {
        debug_assert!(id < POLL_TAG && !self.polls.contains_key(&id));
        self.polls.insert(
            id,
            Poll {
                fd,
                armed: false,
                removing: false,
                remove_sent: false,
            },
        );
        self.arm_polls();
    }

    /// Stops watching `id`: it is never reported by [`Ring::take_fired`] again (also not for an
    /// event already reaped and not yet taken), and is forgotten once the kernel let it go.
    pub(crate) fn remove_poll(&mut self, id: u64) {
        self.fired.retain(|&f| f != id);
        let Some(p) = self.polls.get_mut(&id) else {
            return;
        };
        if !p.armed {
            self.polls.remove(&id);
            return;
        }
        p.removing = true;
        self.arm_polls();
    }

    /// Polls still known to the ring (armed, waiting to be armed, or being removed).
    #[cfg(test)]
    pub(crate) fn polls(&self) -> usize {
        self.polls.len()
    }

    /// Moves the ids whose fd became readable into `out` (each at most once per call).
    pub(crate) fn take_fired(&mut self, out: &mut Vec<u64>) {
        self.fired.sort_unstable();
        self.fired.dedup();
        out.append(&mut self.fired);
    }

    /// Pushes the POLL_ADDs and POLL_REMOVEs that are due, while SQEs are free beyond the one
    /// kept for the eventfd read.
    fn arm_polls(&mut self) {
        if self.polls.is_empty() {
            return;
        }
        let reserve = usize::from(self.wake.fd >= 0 && !self.wake.armed);
        let multishot = self.multishot;
        let mut sq = self.uring.submission();
        for (&id, p) in self.polls.iter_mut() {
            let sqe = if p.removing && p.armed && !p.remove_sent {
                opcode::PollRemove::new(POLL_TAG | id)
                    .build()
                    .user_data(POLL_REMOVE_UD)
            } else if !p.removing && !p.armed {
                opcode::PollAdd::new(types::Fd(p.fd), libc::POLLIN as u32)
                    .multi(multishot)
                    .build()
                    .user_data(POLL_TAG | id)
            } else {
                continue;
            };
            if sq.capacity() - sq.len() <= reserve {
                break;
            }
            // SAFETY: POLL_ADD and POLL_REMOVE reference no memory (an fd and an event mask, or
            // a user_data to match); room beyond the reserved SQE was checked above.
            if unsafe { sq.push(&sqe) }.is_err() {
                break;
            }
            if p.removing {
                p.remove_sent = true;
            } else {
                p.armed = true;
            }
        }
    }

    /// A CQE of poll `id`.
    fn poll_cqe(&mut self, id: u64, res: i32, flags: u32) {
        let Some(p) = self.polls.get_mut(&id) else {
            return;
        };
        let more = cqueue::more(flags);
        if !more {
            p.armed = false;
        }
        if res > 0 {
            if !p.removing {
                self.fired.push(id);
            }
        } else if res == -libc::EINVAL && self.multishot && !p.removing {
            // No multishot poll on this kernel: single-shot, re-armed after every event.
            tracing::debug!("multishot poll refused; re-arming single-shot polls");
            self.multishot = false;
        } else if res < 0 && res != -libc::ECANCELED && !p.removing {
            // Re-arming a poll the kernel refuses would spin: stop watching it.
            tracing::error!(
                id,
                fd = p.fd,
                errno = -res,
                "polling a watched file descriptor failed; it is no longer watched"
            );
            p.removing = true;
        }
        if p.removing && !p.armed {
            self.polls.remove(&id);
        }
    }

    fn arm_wake(&mut self) {
        if self.wake.armed || self.wake.fd < 0 {
            return;
        }
        let ptr: *mut u64 = &mut *self.wake.buf;
        let sqe = opcode::Read::new(types::Fd(self.wake.fd), ptr.cast(), 8)
            .build()
            .user_data(WAKE_UD);
        // SAFETY: the buffer is a Box owned by the ring: it is freed only after this read's CQE
        // was reaped, or leaked at teardown.
        self.wake.armed = unsafe { self.uring.submission().push(&sqe) }.is_ok();
    }

    /// Submits what is in the SQ and collects completions, waiting as `wait` says. The eventfd
    /// read is (re-)armed first; if it could not be, a blocking wait is cut to 10 ms so a message
    /// cannot be missed. A backlog is moved in first, after submitting what takes its room, so
    /// the ring never waits with chains queued and nothing in flight. Interruptions and timeouts
    /// are not errors.
    pub(crate) fn enter(&mut self, wait: Wait) -> std::io::Result<()> {
        self.arm_wake();
        self.arm_polls();
        if !self.backlog.is_empty() {
            self.flush_backlog();
            if !self.backlog.is_empty() && wait != Wait::Poll {
                self.enter_raw(Wait::Poll)?;
                self.flush_backlog();
            }
        }
        self.enter_raw(wait)
    }

    fn enter_raw(&mut self, wait: Wait) -> std::io::Result<()> {
        let wait = match wait {
            Wait::Block | Wait::Until(_) if !self.wake_armed() => {
                let soon = Instant::now() + Duration::from_millis(10);
                match wait {
                    Wait::Until(t) if t < soon => wait,
                    _ => Wait::Until(soon),
                }
            }
            w => w,
        };
        let res = match wait {
            // `submit` adds GETEVENTS when the kernel flagged waiting task work (TASKRUN_FLAG);
            // `poll_events` forces it where the flag is not available.
            Wait::Poll if self.poll_events => {
                let pending = self.uring.submission().len();
                // SAFETY: no argument pointer is passed; GETEVENTS with min_complete 0 only runs
                // deferred task work and posts completions.
                unsafe {
                    self.uring.submitter().enter::<libc::sigset_t>(
                        pending as u32,
                        0,
                        EnterFlags::GETEVENTS.bits(),
                        None,
                    )
                }
            }
            Wait::Poll => self.uring.submit(),
            Wait::Block => self.uring.submit_and_wait(1),
            Wait::Until(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let ts = types::Timespec::new()
                    .sec(left.as_secs())
                    .nsec(left.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            }
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY) => Ok(()),
                _ => Err(e),
            },
        }
    }

    /// Takes every completion that arrived: each op comes back out of the slab with its result
    /// (ownership of its buffers returns to the caller). Returns whether the eventfd fired (the
    /// read is re-armed).
    pub(crate) fn reap(&mut self, out: &mut Vec<(T, i32)>) -> bool {
        let mut woken = false;
        let mut polled = Vec::new();
        let mut cq = self.uring.completion();
        cq.sync();
        for cqe in &mut cq {
            match cqe.user_data() {
                WAKE_UD => {
                    self.wake.armed = false;
                    woken = true;
                }
                CANCEL_UD | POLL_REMOVE_UD => {}
                key if key & POLL_TAG != 0 => {
                    polled.push((key & !POLL_TAG, cqe.result(), cqe.flags()));
                }
                key => match self.ops.try_remove(key as usize) {
                    Some(op) => out.push((op, cqe.result())),
                    None => tracing::error!(key, "completion for an unknown op"),
                },
            }
        }
        drop(cq);
        for (id, res, flags) in polled {
            self.poll_cqe(id, res, flags);
        }
        self.arm_wake();
        self.arm_polls();
        woken
    }

    /// Cancels every in-flight op (when `cancel`) and reaps until none is left or `budget` has
    /// passed; what is still in flight then is leaked. Backlog chains were never submitted and
    /// are dropped normally.
    fn teardown(&mut self, cancel: bool, budget: Duration) {
        self.backlog.clear();
        let busy = |r: &Self| !r.ops.is_empty() || r.wake.armed;
        if cancel && busy(self) {
            let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_UD);
            // SAFETY: a cancel SQE references no memory. One SQE is always free for the wake
            // read; if it is armed the SQ may be full, then the per-key cancels below retry.
            let _ = unsafe { self.uring.submission().push(&sqe) };
        }
        let deadline = Instant::now() + budget;
        let mut per_key_cancels = false;
        while busy(self) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let left = (deadline - now).min(Duration::from_millis(100));
            let ts = types::Timespec::new()
                .sec(left.as_secs())
                .nsec(left.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.uring.submitter().submit_with_args(1, &args);
            let mut refused = false;
            let mut cq = self.uring.completion();
            cq.sync();
            for cqe in &mut cq {
                match cqe.user_data() {
                    WAKE_UD => self.wake.armed = false,
                    CANCEL_UD => refused |= cqe.result() == -libc::EINVAL,
                    key => {
                        // The kernel is done with it: dropping the op (and its buffers) is safe.
                        drop(self.ops.try_remove(key as usize));
                    }
                }
            }
            drop(cq);
            if cancel && refused && !per_key_cancels {
                // No IORING_ASYNC_CANCEL_ANY (before 5.19): cancel each op by its key.
                per_key_cancels = true;
                let mut keys: Vec<u64> = self.ops.iter().map(|(k, _)| k as u64).collect();
                if self.wake.armed {
                    keys.push(WAKE_UD);
                }
                for key in keys {
                    let sqe = opcode::AsyncCancel::new(key).build().user_data(CANCEL_UD);
                    // SAFETY: a cancel SQE references no memory.
                    while unsafe { self.uring.submission().push(&sqe) }.is_err() {
                        let _ = self.uring.submit();
                        let mut cq = self.uring.completion();
                        cq.sync();
                        for cqe in &mut cq {
                            match cqe.user_data() {
                                WAKE_UD => self.wake.armed = false,
                                CANCEL_UD => {}
                                k => drop(self.ops.try_remove(k as usize)),
                            }
                        }
                    }
                }
            }
        }
        if !self.ops.is_empty() {
            tracing::error!(
                ops = self.ops.len(),
                "io_uring ops still in flight at teardown: leaking their buffers rather than \
                 freeing memory the kernel may still write into"
            );
            for op in self.ops.drain() {
                std::mem::forget(op);
            }
        }
        if self.wake.armed {
            std::mem::forget(std::mem::replace(&mut self.wake.buf, Box::new(0)));
            self.wake.armed = false;
        }
    }
}

impl<T: RingOp> Drop for Ring<T> {
    fn drop(&mut self) {
        self.teardown(true, TEARDOWN_BUDGET);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A read into an owned heap buffer; counts its drops.
    #[derive(Debug)]
    struct PipeRead {
        fd: RawFd,
        buf: Box<[u8; 64]>,
        drops: Arc<AtomicUsize>,
    }

    // SAFETY: the entry points into `buf`, a Box owned by the op.
    unsafe impl RingOp for PipeRead {
        fn entry(&mut self) -> squeue::Entry {
            opcode::Read::new(types::Fd(self.fd), self.buf.as_mut_ptr(), 64).build()
        }
    }

    impl Drop for PipeRead {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds we own.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn op(fd: RawFd, drops: &Arc<AtomicUsize>) -> PipeRead {
        PipeRead {
            fd,
            buf: Box::new([0; 64]),
            drops: Arc::clone(drops),
        }
    }

    #[test]
    fn builds_with_some_taskrun_mode_and_a_cq_twice_the_sq() {
        let ring: Ring<PipeRead> = Ring::new(48, -1).expect("io_uring available");
        assert!(!ring.mode().is_empty());
        assert_eq!(
            ring.uring.params().sq_entries(),
            64,
            "rounded to a power of two"
        );
        assert_eq!(ring.uring.params().cq_entries(), 128);
        assert_eq!(ring.max_chain(), 63);
        assert_ne!(WAKE_UD, CANCEL_UD);
    }

    #[test]
    fn push_refuses_at_the_in_flight_cap_and_completion_hands_the_op_back() {
        let (r, w) = pipe();
        let drops = Arc::new(AtomicUsize::new(0));
        let mut ring: Ring<PipeRead> = Ring::new(8, -1).expect("ring");
        // 8 SQ entries, 16 CQ entries: cap 15, but only 7 SQEs per submission.
        let too_long: Vec<_> = (0..8).map(|_| op(r.as_raw_fd(), &drops)).collect();
        let back = ring
            .try_push(too_long)
            .expect_err("a chain longer than the SQ room");
        assert_eq!(back.len(), 8, "refused chains are handed back whole");
        drop(back);
        let mut chain: Vec<_> = (0..3).map(|_| op(r.as_raw_fd(), &drops)).collect();
        while ring.in_flight() < 15 {
            match ring.try_push(chain) {
                Ok(()) => chain = (0..3).map(|_| op(r.as_raw_fd(), &drops)).collect(),
                Err(back) => {
                    chain = back;
                    ring.enter(Wait::Poll).expect("submit");
                }
            }
        }
        drop(chain);
        assert_eq!(ring.in_flight(), 15);
        let refused = ring
            .try_push(vec![op(r.as_raw_fd(), &drops)])
            .expect_err("the cap is reached");
        assert_eq!(refused.len(), 1);
        drop(refused);
        ring.push(vec![op(r.as_raw_fd(), &drops)]);
        assert!(!ring.is_idle());
        let before = drops.load(Ordering::SeqCst);
        assert_eq!(before, 12, "only ops never pushed were dropped");
        // Feed the pipe: every read completes and hands its op back with its bytes.
        let data = [5u8; 64 * 16];
        // SAFETY: writes from a valid buffer to our pipe.
        let n = unsafe { libc::write(w.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(n, data.len() as isize);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < 16 && Instant::now() < deadline {
            ring.enter(Wait::Until(Instant::now() + Duration::from_millis(50)))
                .expect("enter");
            ring.reap(&mut out);
            ring.flush_backlog();
        }
        assert_eq!(out.len(), 16, "15 in flight plus the backlogged one");
        for (op, res) in &out {
            assert!(*res > 0);
            assert_eq!(op.buf[0], 5);
        }
        assert_eq!(
            drops.load(Ordering::SeqCst),
            before,
            "not dropped by the ring"
        );
        drop(out);
        assert!(ring.is_idle());
    }

    /// A read of a regular file (completes at once).
    fn file_read(fd: RawFd, drops: &Arc<AtomicUsize>) -> PipeRead {
        op(fd, drops)
    }

    #[test]
    fn a_backlogged_chain_goes_in_before_the_ring_waits() {
        let (wr, _ww) = pipe();
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(4096).expect("size");
        let drops = Arc::new(AtomicUsize::new(0));
        let mut ring: Ring<PipeRead> = Ring::new(8, wr.as_raw_fd()).expect("ring");
        // The wake read sits in the SQ, so the longest chain does not fit now.
        let chain: Vec<_> = (0..ring.max_chain())
            .map(|_| file_read(f.as_raw_fd(), &drops))
            .collect();
        ring.push(chain);
        assert!(!ring.is_idle());
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < 7 && Instant::now() < deadline {
            ring.enter(Wait::Until(deadline)).expect("enter");
            ring.reap(&mut out);
        }
        assert_eq!(
            out.len(),
            7,
            "the chain was submitted, not left behind a blocking wait"
        );
    }

    #[test]
    fn teardown_cancels_in_flight_ops_and_drops_them_only_after_their_completion() {
        let (r, _w) = pipe();
        let drops = Arc::new(AtomicUsize::new(0));
        let mut ring: Ring<PipeRead> = Ring::new(8, -1).expect("ring");
        ring.push(vec![op(r.as_raw_fd(), &drops), op(r.as_raw_fd(), &drops)]);
        ring.enter(Wait::Poll).expect("submit");
        assert_eq!(ring.in_flight(), 2);
        drop(ring);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            2,
            "cancelled, reaped, then dropped"
        );
    }

    #[test]
    fn teardown_leaks_ops_whose_completion_never_comes() {
        let (r, w) = pipe();
        let drops = Arc::new(AtomicUsize::new(0));
        let mut ring: Ring<PipeRead> = Ring::new(8, -1).expect("ring");
        ring.push(vec![op(r.as_raw_fd(), &drops)]);
        ring.enter(Wait::Poll).expect("submit");
        // No cancel and a short budget: the read is still pending when the budget ends.
        ring.teardown(false, Duration::from_millis(50));
        assert_eq!(ring.in_flight(), 0);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            0,
            "an op the kernel may still complete is leaked, not freed"
        );
        drop(ring);
        drop((r, w));
    }

    #[test]
    fn the_wake_read_is_re_armed_even_when_ops_fill_the_sq() {
        let mut efd = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe(efd.as_mut_ptr()) }, 0);
        // SAFETY: fresh fds we own.
        let (wr, ww) = unsafe { (OwnedFd::from_raw_fd(efd[0]), OwnedFd::from_raw_fd(efd[1])) };
        let poke = || {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a valid array to our pipe.
            let n = unsafe { libc::write(ww.as_raw_fd(), one.as_ptr().cast(), 8) };
            assert_eq!(n, 8);
        };
        let (r, _w) = pipe();
        let drops = Arc::new(AtomicUsize::new(0));
        let mut ring: Ring<PipeRead> = Ring::new(8, wr.as_raw_fd()).expect("ring");
        ring.enter(Wait::Poll).expect("submit the wake read");
        poke();
        ring.enter(Wait::Poll).expect("its completion is posted");
        // Before that completion is reaped, ops take every SQE they may have.
        let mut pushed = 0;
        while ring.try_push(vec![op(r.as_raw_fd(), &drops)]).is_ok() {
            pushed += 1;
        }
        assert_eq!(pushed, 7, "one SQE is kept back");
        let mut out = Vec::new();
        assert!(ring.reap(&mut out), "the wake read completed");
        assert!(ring.wake_armed(), "and went back into the SQ at once");
        // It really is pending: a second poke wakes a blocking wait.
        poke();
        let mut woken = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !woken && Instant::now() < deadline {
            ring.enter(Wait::Until(Instant::now() + Duration::from_millis(100)))
                .expect("enter");
            woken = ring.reap(&mut out);
        }
        assert!(woken, "a wakeup was lost");
        drop(ring);
    }

    #[test]
    fn a_poll_fires_when_readable_and_is_forgotten_once_its_removal_completes() {
        let (r, w) = pipe();
        let drops = Arc::new(AtomicUsize::new(0));
        let mut ring: Ring<PipeRead> = Ring::new(8, -1).expect("ring");
        ring.add_poll(7, r.as_raw_fd());
        let mut out = Vec::new();
        let mut fired = Vec::new();
        ring.enter(Wait::Poll).expect("submit");
        ring.reap(&mut out);
        ring.take_fired(&mut fired);
        assert!(fired.is_empty(), "fired with nothing to read");
        // SAFETY: writes one byte from a valid buffer to our pipe.
        let n = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        assert_eq!(n, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while fired.is_empty() && Instant::now() < deadline {
            ring.enter(Wait::Until(Instant::now() + Duration::from_millis(50)))
                .expect("enter");
            ring.reap(&mut out);
            ring.take_fired(&mut fired);
        }
        assert_eq!(fired, vec![7]);
        ring.remove_poll(7);
        assert_eq!(ring.polls(), 1, "kept until the kernel let go of it");
        while ring.polls() > 0 && Instant::now() < deadline {
            ring.enter(Wait::Until(Instant::now() + Duration::from_millis(50)))
                .expect("enter");
            ring.reap(&mut out);
        }
        assert_eq!(ring.polls(), 0, "the removal never completed");
        fired.clear();
        ring.take_fired(&mut fired);
        assert!(fired.is_empty(), "fired after removal");
        assert!(out.is_empty());
        drop(drops);
    }
}
