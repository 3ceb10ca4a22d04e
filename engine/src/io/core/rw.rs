//! Requests on a core: validation, READ (split into runs), WRITE (direct or read-modify-write),
//! WRITE_ZEROES / TRIM (punch + edges), and their completions.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::super::align::DioAlign;
use super::super::buf::{self, IoBuf};
use super::super::commit::Waiter;
use super::super::disk::{DiskShared, Parked, Role};
use super::super::engine::Msg;
use super::super::split::{plan_read, Src};
use super::super::{Completion, Done, Request};
use super::ops::{op_name, Bounce, OpKind, Target, Xfer};
use super::tasks::{req_err, Edge, Patch, ReadTask, Task, WriteTask};
use super::{round_down, round_up, Core, SEG_MAX, ZERO_CHUNK};
use crate::format::SECTOR_SIZE;

impl Core {
    // ---- requests --------------------------------------------------------------------------

    pub(super) fn submit(&mut self, disk: Arc<DiskShared>, req: Request, done: Completion) {
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
                if len > super::super::MAX_READ {
                    done(Err(req_err(
                        libc::EINVAL,
                        "read larger than MAX_READ",
                        offset,
                    )));
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
    pub(super) fn issue_read(
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
    pub(super) fn issue_file_read(
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
    pub(super) fn issue_write(
        &mut self,
        task: usize,
        target: Target,
        role: Role,
        ptr: *mut u8,
        len: u64,
        off: u64,
        fixed: Option<u16>,
    ) -> usize {
        let first = Xfer {
            target,
            role,
            ptr,
            len: 0,
            off,
            fixed,
        };
        self.issue_write_pieces(task, first, len, SEG_MAX, true)
    }

    /// Real zeros over `[off, off+len)` of the raw image, from the core's zero buffer.
    pub(super) fn issue_zero_writes(
        &mut self,
        task: usize,
        disk: &DiskShared,
        off: u64,
        len: u64,
    ) -> usize {
        let first = Xfer {
            target: self.target(disk, Role::Image, disk.fd(Role::Image)),
            role: Role::Image,
            ptr: self.zero.as_ptr() as *mut u8, // only ever read by the kernel (writes from it)
            len: 0,
            off,
            fixed: None,
        };
        self.issue_write_pieces(task, first, len, ZERO_CHUNK, false)
    }

    /// Issues writes of `total` bytes at `first.off` in pieces of at most `piece` bytes (the
    /// `len` of `first` is ignored). With `advance` each piece writes from its own part of the
    /// source at `first.ptr`; without it every piece writes the same `piece`-byte source (the
    /// zero buffer). Returns how many ops were issued.
    fn issue_write_pieces(
        &mut self,
        task: usize,
        first: Xfer,
        total: u64,
        piece: u64,
        advance: bool,
    ) -> usize {
        let mut issued = 0;
        let mut done = 0;
        while done < total {
            let n = (total - done).min(piece);
            let ptr = if advance {
                // SAFETY: done < total: inside the source buffer.
                unsafe { first.ptr.add(done as usize) }
            } else {
                first.ptr
            };
            let xfer = Xfer {
                ptr,
                len: n as u32,
                off: first.off + done,
                ..first
            };
            self.issue(task, OpKind::Write(xfer));
            issued += 1;
            done += n;
        }
        issued
    }

    pub(super) fn start_read(
        &mut self,
        disk: Arc<DiskShared>,
        offset: u64,
        len: u32,
        done: Completion,
    ) {
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

    pub(super) fn set_pending(&mut self, key: usize, n: usize) {
        if let Some(t) = self.tasks.get_mut(key) {
            *t.pending_mut() += n;
        }
        if n == 0 {
            self.advance(key);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_write(
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
            let key = self.tasks.insert(Task::Write(WriteTask::new(
                Arc::clone(&disk),
                offset,
                lock,
                Some(data),
                Vec::new(),
                fua,
                done,
            )));
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
        let key = self.tasks.insert(Task::Write(WriteTask::new(
            Arc::clone(&disk),
            offset,
            lock,
            Some(data),
            vec![Edge {
                buf: bounce,
                file_off: a_start,
                patch: Patch::Data {
                    at: (offset - a_start) as usize,
                },
            }],
            fua,
            done,
        )));
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
    pub(super) fn start_zero(
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
        let key = self.tasks.insert(Task::Write(WriteTask::new(
            Arc::clone(&disk),
            offset,
            lock,
            None,
            edges,
            fua,
            done,
        )));
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

    pub(super) fn read_done(&mut self, task: usize, x: Xfer, bounce: Option<Bounce>, res: i32) {
        if res < 0 {
            self.fail(task, -res, op_name(x.role, false));
        } else if self.short_inside_file(task, &x, res as u64) {
            // The file ended before the size it had at open (truncated behind our back):
            // answering zeros would silently return bytes nobody wrote.
            self.fail(task, libc::EIO, op_name(x.role, false));
        } else {
            let n = (res as usize).min(x.len as usize);
            if x.role == Role::Base {
                if let Some(t) = self.tasks.get(task) {
                    t.disk().counters.base_read(n as u64);
                }
            }
            // A short read at the file's end (e.g. an O_DIRECT read of a base whose size is
            // not a multiple of the alignment): the rest reads as zeros.
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

    /// Whether a read of `x` that returned `got` bytes stopped before the end of its file as
    /// known at open (only a read that reaches the file's end may come back short).
    fn short_inside_file(&self, task: usize, x: &Xfer, got: u64) -> bool {
        let Some(t) = self.tasks.get(task) else {
            return false;
        };
        let want_end = x.off.saturating_add(u64::from(x.len));
        let file_end = t.disk().file_len(x.role);
        got < u64::from(x.len) && x.off.saturating_add(got) < want_end.min(file_end)
    }

    pub(super) fn write_done(&mut self, task: usize, x: Xfer, res: i32) {
        let Some(t) = self.tasks.get(task) else {
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
            t.disk().rec_write(x.role, x.off, data);
        }
        let is_commit = matches!(t, Task::Commit(_));
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
                c.disk.rec_sync(Role::Meta, c.meta_sync, false);
            }
        }
        self.step(task);
    }

    pub(super) fn punch_done(&mut self, task: usize, off: u64, len: u64, res: i32) {
        let Some(disk) = self.tasks.get(task).map(|t| Arc::clone(t.disk())) else {
            return;
        };
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

    /// Read-modify-write: the old bytes are in; patch the new ones in and write the units.
    pub(super) fn write_fills_done(&mut self, key: usize) {
        let mut writes = Vec::new();
        let disk = match self.tasks.get_mut(key) {
            Some(Task::Write(w)) => {
                w.filling = false;
                for e in &mut w.edges {
                    match e.patch {
                        Patch::Data { at } => {
                            if let Some(data) = w.data.as_ref() {
                                if let Some(dst) = e.buf.get_mut(at..at + data.len()) {
                                    dst.copy_from_slice(data);
                                }
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
            let fixed = self.fixed_slot(slot);
            n += self.issue_write(key, target, Role::Image, ptr, len, off, fixed);
        }
        self.set_pending(key, n);
    }

    pub(super) fn finish_write(&mut self, t: WriteTask) {
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
