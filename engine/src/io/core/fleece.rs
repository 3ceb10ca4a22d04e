//! A disk's point-in-time view on the cores: copy-before-write ahead of the writes that change
//! guest-visible bytes, and reads of the frozen view. The shared state (scratch file, copied
//! chunks) is `disk/fleece.rs`; the handle is `engine/fleece.rs`.
//!
//! # Copy-before-write
//! While a view is active, a WRITE, WRITE_ZEROES or TRIM that got its range lock passes
//! [`Core::fleece_gate`] before it starts. POPULATE (copy-up, stream) changes no guest-visible
//! byte and passes untouched. If every chunk the request touches is copied, it goes on as
//! without a view (one atomic load per chunk). Otherwise:
//! 1. it must hold the chunks' whole range *exclusively* in the range lock: if its ticket does
//!    not cover that, it lets go and queues again for the chunks' range (so no other write, and
//!    no other copy, of those chunks is in flight while they are copied);
//! 2. holding it, the uncopied chunks (re-checked: another write may have copied them while
//!    this one waited) are read through the chain exactly as a READ reads them (raw image,
//!    base or zeros by the bits) and written to the scratch, [`FLEECE_BATCH`] chunks at a time
//!    (bounded memory per write, whatever its length);
//! 3. when a batch's scratch writes completed, its chunks are marked copied (SeqCst); when all
//!    are, the write goes on with the lock it holds.
//!
//! If a copy fails (the scratch cannot be read or written), the guest's write fails with the
//! error (EIO, ENOSPC…) and the live disk is not touched: the view must never serve bytes that
//! are not the ones of its instant, and the write was not done. This is QEMU's default for
//! fleecing (`on-cbw-error=break-guest-write`). The chunk stays uncopied, so a retry copies it.
//!
//! # Reads of the frozen view, and why they never see a newer byte
//! A read is split at chunk boundaries. A copied chunk is read from the scratch (written once,
//! before its bit was set, never again). An uncopied chunk is read from the live disk; when
//! every read of the request completed, the bit of each such chunk is loaded again, and a chunk
//! copied meanwhile is read again from the scratch. The argument, for one chunk: a write
//! changes the chunk's live bytes only after the copy's bit was stored (SeqCst; step 3), and
//! the copy read the live bytes only after every earlier write of the chunk finished (step 1).
//! If the view's second load sees the bit clear, that load comes before the store in the single
//! SeqCst order, so the view's live read (completed before the load) finished before any write
//! of the chunk began: it saw the bytes of the instant. If it sees the bit set, the scratch
//! holds the bytes of the instant. No lock is taken and nothing waits: a view read never holds
//! up a guest write, and a guest write never holds up a view read.

use std::sync::Arc;

use super::super::align::DioAlign;
use super::super::request::{req_err, Done, Request};
use super::ops::{FileRef, Mem, OpKind, Region, Target};
use super::shared_buf::SharedBuf;
use super::tasks::{FleeceJob, FleeceTask, Held, Task};
use super::Core;
use crate::io::core::mailbox::FleeceRead;
use crate::io::disk::fleece::Fleece;
use crate::io::disk::range_lock::Ticket;
use crate::io::disk::state::{DiskState, Parked, Role};
use crate::io::uring::buf::{self, DataBuf};

/// Chunks one write copies at a time (with 64 KiB chunks: 1 MiB of buffers in flight).
pub(super) const FLEECE_BATCH: u64 = 16;

/// The scratch file as an op names it: a plain, buffered fd.
fn scratch(f: &Fleece) -> FileRef {
    FileRef {
        target: Target::Fd(f.fd()),
        role: Role::Scratch,
        align: DioAlign::NONE,
    }
}

/// The bytes a request changes, if it changes guest-visible bytes.
fn changed_range(req: &Request) -> Option<(u64, u64)> {
    match req {
        Request::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
        Request::WriteZeroes { offset, len, .. } | Request::Trim { offset, len, .. } => {
            Some((*offset, *len))
        }
        _ => None,
    }
}

impl Core {
    /// The copy-before-write gate (see the module docs), for a write-like request that holds
    /// `ticket`. Hands the request back when it may go on now; otherwise keeps it (queued again
    /// in `resume` for a wider ticket, or waiting for its copies) and returns `None`.
    pub(super) fn fleece_gate(
        &mut self,
        disk: &Arc<DiskState>,
        ticket: Ticket,
        parked: Parked,
        resume: &mut Vec<(Ticket, Parked)>,
    ) -> Option<(Ticket, Parked)> {
        let Some(f) = disk.fleece.get() else {
            return Some((ticket, parked));
        };
        let Some((offset, len)) = changed_range(&parked.req).filter(|r| r.1 > 0) else {
            return Some((ticket, parked));
        };
        let (c0, c1) = f.chunks(offset, offset + len);
        if f.uncopied(c0, c1).next().is_none() {
            return Some((ticket, parked));
        }
        let (cs, ce) = (f.chunk_range(c0).0, f.chunk_range(c1 - 1).1);
        let want = Ticket::new(cs, ce, &[(cs, ce)]);
        if !ticket.holds_exclusive(&want) {
            disk.locks.release(&ticket, resume);
            resume.push((want, parked));
            return None;
        }
        let key = self.tasks.insert(Task::Fleece(FleeceTask {
            disk: Arc::clone(disk),
            fleece: f,
            offset,
            pending: 0,
            err: None,
            job: FleeceJob::Copy {
                locked: Some(Held::new(Arc::clone(disk), ticket)),
                parked: Some(parked),
                todo: c0..c1,
                batch: Vec::new(),
                writing: false,
            },
        }));
        self.fleece_copy_batch(key);
        None
    }

    /// Starts the next batch of copies of a copy-before-write task (reads through the chain),
    /// or finishes it when no uncopied chunk is left.
    fn fleece_copy_batch(&mut self, key: usize) {
        let Some(Task::Fleece(t)) = self.tasks.get_mut(key) else {
            return;
        };
        let (disk, f) = (Arc::clone(&t.disk), Arc::clone(&t.fleece));
        let FleeceJob::Copy { todo, .. } = &mut t.job else {
            return;
        };
        let mut chunks = Vec::new();
        while (chunks.len() as u64) < FLEECE_BATCH {
            let Some(c) = todo.next() else {
                break;
            };
            if !f.is_copied(c) {
                chunks.push(c);
            }
        }
        if chunks.is_empty() {
            if let Some(Task::Fleece(t)) = self.tasks.try_remove(key) {
                self.fleece_finish(t);
            }
            return;
        }
        let arena = self.shared.arena.as_ref();
        let batch: Vec<(SharedBuf, u64)> = chunks
            .into_iter()
            .map(|c| {
                let (a, b) = f.chunk_range(c);
                (
                    SharedBuf::new(buf::alloc(arena, (b - a) as usize, false)),
                    c,
                )
            })
            .collect();
        let mut n = 0;
        for (b, c) in &batch {
            let (a, _) = f.chunk_range(*c);
            n += self.issue_read(key, &disk, b, 0, a, b.len() as u64);
        }
        if let Some(Task::Fleece(FleeceTask {
            job:
                FleeceJob::Copy {
                    batch: slot,
                    writing,
                    ..
                },
            ..
        })) = self.tasks.get_mut(key)
        {
            *slot = batch;
            *writing = false;
        }
        self.add_pending(key, n);
    }

    /// A fleece task's ops all completed: its next stage, or its end.
    pub(super) fn fleece_advance(&mut self, key: usize) {
        let Some(Task::Fleece(t)) = self.tasks.get_mut(key) else {
            return;
        };
        let failed = t.err.is_some();
        let f = Arc::clone(&t.fleece);
        match &mut t.job {
            FleeceJob::Copy { batch, writing, .. } if !failed && !batch.is_empty() => {
                if *writing {
                    // The batch is in the scratch: only now are its chunks copied.
                    for (_, c) in batch.drain(..) {
                        f.mark_copied(c);
                    }
                    self.fleece_copy_batch(key);
                    return;
                }
                *writing = true;
                let batch: Vec<(SharedBuf, u64)> =
                    batch.iter().map(|(b, c)| (b.clone(), *c)).collect();
                let mut n = 0;
                for (b, c) in batch {
                    let (a, _) = f.chunk_range(c);
                    let fixed = self.fixed_slot(b.arena_slot());
                    let len = b.len();
                    match Region::new(Mem::Shared(b), 0, len, fixed) {
                        Some(from) => {
                            n += self.issue(
                                key,
                                OpKind::Write {
                                    file: scratch(&f),
                                    off: a,
                                    from,
                                },
                            )
                        }
                        None => self.internal(key, "internal error: scratch write out of range"),
                    }
                }
                self.add_pending(key, n);
            }
            FleeceJob::Copy { .. } if !failed => self.fleece_copy_batch(key),
            FleeceJob::Read {
                live, checked, buf, ..
            } if !failed && !*checked => {
                *checked = true;
                let again: Vec<(usize, u64, u64)> = live
                    .iter()
                    .filter(|p| f.is_copied(p.0))
                    .map(|&(_, at, off, len)| (at, off, len))
                    .collect();
                let buf = buf.clone();
                let mut n = 0;
                for (at, off, len) in again {
                    n += self.fleece_scratch_read(key, &f, &buf, at, off, len);
                }
                drop(buf);
                self.add_pending(key, n);
            }
            _ => {
                if let Some(Task::Fleece(t)) = self.tasks.try_remove(key) {
                    self.fleece_finish(t);
                }
            }
        }
    }

    /// Reads `[off, off + len)` of the scratch into `dest[at..]`.
    fn fleece_scratch_read(
        &mut self,
        key: usize,
        f: &Fleece,
        dest: &SharedBuf,
        at: usize,
        off: u64,
        len: u64,
    ) -> usize {
        let fixed = self.fixed_slot(dest.arena_slot());
        match Region::new(Mem::Shared(dest.clone()), at, len as usize, fixed) {
            Some(into) => self.issue(
                key,
                OpKind::Read {
                    file: scratch(f),
                    off,
                    into,
                    copy_out: None,
                },
            ),
            None => {
                self.internal(key, "internal error: view read outside its buffer");
                0
            }
        }
    }

    /// A fleece task is done: a copy hands its write on (or fails it), a view read answers.
    pub(super) fn fleece_finish(&mut self, t: FleeceTask) {
        let FleeceTask {
            disk,
            fleece,
            err,
            job,
            ..
        } = t;
        match job {
            FleeceJob::Copy { locked, parked, .. } => {
                let (Some(locked), Some(parked)) = (locked, parked) else {
                    return;
                };
                match err {
                    None => {
                        // Every chunk of the write is copied: it goes on with the lock it holds
                        // (the gate lets it through now).
                        let ticket = locked.into_ticket();
                        self.lock_and_start(disk, ticket, parked);
                    }
                    Some(e) => {
                        fleece
                            .copy_failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(scratch = %fleece.path.display(), error = %e,
                            "copy before write to the backup scratch failed; the guest write fails");
                        let mut resume = Vec::new();
                        locked.release(&mut resume);
                        for (ticket, p) in resume {
                            self.lock_and_start(Arc::clone(&disk), ticket, p);
                        }
                        parked.done.answer(Err(e));
                    }
                }
            }
            FleeceJob::Read {
                buf, into, done, ..
            } => {
                if let Some(e) = err {
                    done.answer(Err(e));
                    return;
                }
                match buf.into_inner() {
                    Ok(DataBuf::Owned(b)) if !into => done.answer(Ok(Done::Read(b))),
                    Ok(b) => done.answer(Ok(Done::Filled(b))),
                    Err(_) => done.answer(Err(req_err(
                        libc::EIO,
                        "internal error: view read buffer still shared",
                        0,
                    ))),
                }
            }
        }
    }

    /// Starts a read of a disk's frozen view (see the module docs).
    pub(super) fn fleece_read(&mut self, r: FleeceRead) {
        let FleeceRead {
            disk,
            fleece,
            offset,
            buf,
            into,
            done,
        } = r;
        let buf = SharedBuf::new(buf);
        let end = offset + buf.len() as u64;
        let key = self.tasks.insert(Task::Fleece(FleeceTask {
            disk: Arc::clone(&disk),
            fleece: Arc::clone(&fleece),
            offset,
            pending: 0,
            err: None,
            job: FleeceJob::Read {
                buf: buf.clone(),
                into,
                live: Vec::new(),
                checked: false,
                done,
            },
        }));
        let mut live = Vec::new();
        let mut n = 0;
        let mut at = offset;
        while at < end {
            let c = at / fleece.chunk;
            let piece_end = fleece.chunk_range(c).1.min(end);
            let (dst, len) = ((at - offset) as usize, piece_end - at);
            if fleece.is_copied(c) {
                n += self.fleece_scratch_read(key, &fleece, &buf, dst, at, len);
            } else {
                #[cfg(feature = "fault-injection")]
                if let Some(plan) = &self.faults {
                    plan.park_at(crate::io::testing::faults::ParkPoint::ViewRead, 0);
                }
                n += self.issue_read(key, &disk, &buf, dst, at, len);
                live.push((c, dst, at, len));
            }
            at = piece_end;
        }
        if let Some(Task::Fleece(FleeceTask {
            job: FleeceJob::Read { live: slot, .. },
            ..
        })) = self.tasks.get_mut(key)
        {
            *slot = live;
        }
        drop(buf);
        self.add_pending(key, n);
    }
}
