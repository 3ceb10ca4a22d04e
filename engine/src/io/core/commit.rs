//! The group commit as a core runs it (DESIGN invariant 3), and the background-commit timers.
//!
//! 1. Take the dirty marks (`DirtyBlocks::take`) and copy the blocks' bytes from the in-memory
//!    bitmap (`commit_plan`), all before anything is submitted.
//! 2. Run the steps in the order `commit_order::steps` gives, as linked chains of at most
//!    [`MAX_CHAIN`] ops (and what one submission can take); each chain is pushed once the one
//!    before it completed, so a commit with more spans than fit one submission keeps the order.
//!    Usually everything is one chain: fdatasync(raw) → write(spans)… → fdatasync(meta).
//! 3. When all completed (or one failed: the kernel cancels the rest of its chain and no later
//!    chain is pushed), answer every waiter; a failed commit re-marks its blocks.
//!
//! One commit is in flight per disk (`CommitState::in_flight`); FLUSH/FUA requests arriving
//! meanwhile wait in `CommitState::next` and share the next one, unless nothing was written or
//! marked since the running one read the write generation: then the running one covers them
//! (`CommitState::riders`).
//!
//! A commit with nothing to make durable (no op changed the raw image since the durable point
//! and no metadata block is marked; see `DiskState::written`) answers its waiters at once
//! with no sync at all. A commit with no new bits is one fdatasync of the raw image.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::super::request::RequestError;
use super::commit_order::{self, Step};
use super::mailbox::Msg;
use super::ops::{CoreOp, Mem, OpKind, Region};
use super::tasks::{CommitTask, Task};
use super::Core;
use crate::io::disk::commit_plan;
use crate::io::disk::state::{DiskState, Role, Waiter, META_BLOCK};
use crate::io::uring::buf::IoBuf;
use crate::sync::lock;

/// Most ops in one linked chain of a commit.
const MAX_CHAIN: usize = 64;

impl Core {
    pub(super) fn start_commit(&mut self, disk: &Arc<DiskState>, waiters: Vec<Waiter>) {
        {
            let mut st = lock(&disk.commit);
            if st.in_flight {
                match st.in_flight_gen {
                    Some(g) if disk.nothing_to_commit(g) => st.riders.extend(waiters),
                    _ => st.next.extend(waiters),
                }
                return;
            }
            st.in_flight = true;
            st.in_flight_gen = None;
        }
        self.launch_commit(Arc::clone(disk), waiters);
    }

    /// Takes the dirty marks, copies the blocks, and pushes the first chain of the steps.
    /// A commit with nothing to make durable answers its waiters at once (and then the ones
    /// queued meanwhile, until some commit has work or none is queued).
    pub(super) fn launch_commit(&mut self, disk: Arc<DiskState>, mut waiters: Vec<Waiter>) {
        loop {
            if disk.sync_failed.load(Ordering::Acquire) {
                self.refuse_commits(&disk, waiters);
                return;
            }
            // The generation is read before the dirty marks are taken and before any sync is
            // pushed: every mutation that completed before this read is covered by the syncs.
            let skip = {
                let mut st = lock(&disk.commit);
                let gen = disk.written.load(Ordering::SeqCst);
                let skip = disk.nothing_to_commit(st.durable);
                st.in_flight_gen = (!skip).then_some(gen);
                skip
            };
            if !skip {
                break;
            }
            disk.counters.commit_skipped();
            for w in waiters {
                self.answer_waiter(w, Ok(()));
            }
            let mut st = lock(&disk.commit);
            if st.next.is_empty() {
                st.in_flight = false;
                return;
            }
            waiters = std::mem::take(&mut st.next);
        }
        let blocks = disk.dirty.take();
        let spans = commit_plan::spans(&blocks, META_BLOCK, disk.meta_len);
        let writes: Vec<(u64, IoBuf)> = spans
            .iter()
            .map(|s| {
                let mut b = IoBuf::new_zeroed(s.len as usize);
                commit_plan::copy_span(&disk.header, &disk.bitmap, s.offset, &mut b);
                (s.offset, b)
            })
            .collect();
        let bytes = spans.iter().map(|s| s.len).sum();
        let key = self.tasks.insert(Task::Commit(CommitTask {
            disk: Arc::clone(&disk),
            waiters,
            blocks,
            chains: Default::default(),
            pending: 0,
            bytes,
            err: None,
        }));
        let image = self.image_file(&disk);
        let meta = self.meta_file(&disk);
        let mut ops: Vec<CoreOp> = Vec::new();
        for step in commit_order::steps(writes) {
            let kind = match step {
                Step::Sync(role) => OpKind::Sync {
                    file: if role == Role::Image { image } else { meta },
                    id: disk.next_sync_id(),
                },
                Step::Write { offset, buf } => {
                    let len = buf.len();
                    let Some(from) = Region::new(Mem::Owned(buf), 0, len, None) else {
                        self.internal(key, "internal error: commit span too long");
                        continue;
                    };
                    OpKind::Write {
                        file: meta,
                        off: offset,
                        from,
                    }
                }
            };
            ops.push(CoreOp::new(key, kind));
        }
        let max = MAX_CHAIN.min(self.ring.max_chain()).max(1);
        let mut chains = std::collections::VecDeque::new();
        let mut ops = ops.into_iter().peekable();
        while ops.peek().is_some() {
            let mut chain: Vec<CoreOp> = ops.by_ref().take(max).collect();
            // Inside a chain, the kernel starts a linked fdatasync when the op before it
            // completes: the recorder logs its start then (a chain's first op is logged when
            // the chain is pushed).
            for i in 1..chain.len() {
                if let OpKind::Sync { file, id } = &chain[i].kind {
                    let next = (file.role, *id);
                    chain[i - 1].then_sync = Some(next);
                }
            }
            chains.push_back(chain);
        }
        if let Some(Task::Commit(c)) = self.tasks.get_mut(key) {
            c.chains = chains;
        }
        self.push_commit_chain(key);
    }

    /// Pushes the next chain of commit `key`.
    pub(super) fn push_commit_chain(&mut self, key: usize) {
        let Some(Task::Commit(c)) = self.tasks.get_mut(key) else {
            return;
        };
        let Some(chain) = c.chains.pop_front() else {
            return;
        };
        if let Some(OpKind::Sync { file, id }) = chain.first().map(|op| &op.kind) {
            c.disk.rec_sync(file.role, *id, false);
        }
        let n = chain.len();
        self.push_chain(chain);
        self.add_pending(key, n);
    }

    pub(super) fn finish_commit(&mut self, t: CommitTask) {
        let CommitTask {
            disk,
            mut waiters,
            blocks,
            bytes,
            err,
            ..
        } = t;
        {
            let mut st = lock(&disk.commit);
            waiters.append(&mut st.riders);
            if let (None, Some(g)) = (&err, st.in_flight_gen) {
                st.durable = st.durable.max(g);
            }
            st.in_flight_gen = None;
        }
        disk.counters
            .commit_done(err.is_none(), waiters.len(), bytes);
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
            let mut st = lock(&disk.commit);
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

    pub(super) fn answer_waiter(&self, w: Waiter, result: Result<(), RequestError>) {
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

    pub(super) fn arm_bg(&mut self, disk: &Arc<DiskState>) {
        let Some(delay) = self.shared.config.commit_delay else {
            return;
        };
        if disk.read_only || disk.bg_armed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.timers
            .push((Instant::now() + delay, Arc::downgrade(disk)));
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.timers.iter().map(|t| t.0).min()
    }

    pub(super) fn fire_timers(&mut self) {
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
                // A closed disk had its final commit after its last request was answered.
                if !disk.closed.load(Ordering::Acquire) {
                    self.start_commit(&disk, Vec::new());
                }
            }
        }
    }

    /// The raw image's durability is unknown since an fdatasync failed: fail `waiters` and
    /// everything queued behind them with EIO, and leave no commit in flight.
    fn refuse_commits(&mut self, disk: &Arc<DiskState>, mut waiters: Vec<Waiter>) {
        {
            let mut st = lock(&disk.commit);
            waiters.append(&mut st.next);
            waiters.append(&mut st.riders);
            st.in_flight = false;
            st.in_flight_gen = None;
        }
        let err = RequestError {
            errno: libc::EIO,
            op: "commit refused: an earlier fdatasync of the raw image failed",
            offset: 0,
        };
        for w in waiters {
            self.answer_waiter(w, Err(err.clone()));
        }
    }

    pub(super) fn sync_done(&mut self, task: usize, role: Role, id: u64, res: i32) {
        let Some(disk) = self.tasks.get(task).map(|t| Arc::clone(t.disk())) else {
            return;
        };
        if res < 0 && res != -libc::ECANCELED && role == Role::Image {
            tracing::error!(path = %disk.meta_path.display(), errno = -res,
                "fdatasync of the raw image failed; no further commits on this disk");
            disk.sync_failed.store(true, Ordering::Release);
        }
        if res < 0 {
            let op = match role {
                Role::Image => "fdatasync raw image",
                _ => "fdatasync metadata",
            };
            self.fail(task, -res, op);
        } else {
            disk.rec_sync(role, id, true);
        }
    }
}
