//! The group commit as a core runs it (DESIGN invariant 3; the sequence is in `io/commit.rs`
//! and docs/ARCHITECTURE.md), and the background-commit timers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::squeue;

use super::super::buf::IoBuf;
use super::super::commit::{self, Waiter};
use super::super::disk::{DiskShared, Role, META_BLOCK};
use super::super::engine::Msg;
use super::super::lock;
use super::super::RequestError;
use super::ops::{OpKind, Xfer};
use super::tasks::{CommitTask, Task};
use super::{Core, MAX_COMMIT_SPANS};

impl Core {
    // ---- commit ----------------------------------------------------------------------------

    pub(super) fn start_commit(&mut self, disk: &Arc<DiskShared>, waiters: Vec<Waiter>) {
        {
            let mut st = lock(&disk.commit);
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
    pub(super) fn launch_commit(&mut self, disk: Arc<DiskShared>, waiters: Vec<Waiter>) {
        if disk.sync_failed.load(Ordering::Acquire) {
            self.refuse_commits(&disk, waiters);
            return;
        }
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
            bufs,
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

    pub(super) fn finish_commit(&mut self, t: CommitTask) {
        let CommitTask {
            disk,
            waiters,
            blocks,
            bufs,
            err,
            ..
        } = t;
        let bitmap_bytes = bufs.iter().map(|b| b.len() as u64).sum();
        disk.counters
            .commit_done(err.is_none(), waiters.len(), bitmap_bytes);
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

    pub(super) fn arm_bg(&mut self, disk: &Arc<DiskShared>) {
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
                if !disk.closed.load(Ordering::Acquire) {
                    self.start_commit(&disk, Vec::new());
                }
            }
        }
    }
    /// The raw image's durability is unknown since an fdatasync failed: fail `waiters` and
    /// everything queued behind them with EIO, and leave no commit in flight.
    fn refuse_commits(&mut self, disk: &Arc<DiskShared>, mut waiters: Vec<Waiter>) {
        {
            let mut st = lock(&disk.commit);
            waiters.append(&mut st.next);
            st.in_flight = false;
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
            if cfg!(feature = "unsafe-bits-before-sync") && role == Role::Meta {
                if let Some(Task::Commit(c)) = self.tasks.get(task) {
                    disk.rec_sync(Role::Image, c.image_sync, false);
                }
            }
        }
        self.step(task);
    }
}
