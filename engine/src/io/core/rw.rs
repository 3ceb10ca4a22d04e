//! Requests on a core: validation, READ (split into runs), WRITE (whole units, or
//! read-modify-write of the partial head and tail units), WRITE_ZEROES / TRIM (punch + edges),
//! and their reactions to completions. They plan ops and react; the ring does the rest.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use super::super::align::DioAlign;
use super::super::request::{req_err, Done, Request, RequestError, MAX_READ};
use super::super::split::{plan_read, Src};
use super::ops::{op_name, CopyOut, CoreOp, FileRef, Mem, OpKind, Region, Target};
use super::shared_buf::SharedBuf;
use super::tasks::{Edge, Held, Patch, ReadTask, Task, WriteTask};
use super::{round_down, round_up, Core, SEG_MAX, ZERO_CHUNK};
use crate::format::SECTOR_SIZE;
use crate::io::disk::range_lock::{Acquire, Ticket};
use crate::io::disk::state::{DiskState, Parked, Role, Waiter};
use crate::io::request::responder::Responder;
use crate::io::uring::buf::{self, DataBuf, IoBuf};

/// Short transfers in a row that may make no progress before the request fails with EIO.
const MAX_STALLS: u8 = 8;

/// How a write-like request `[offset, end)` lies over the disk's read-modify-write units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Shape {
    pub(super) offset: u64,
    pub(super) end: u64,
    /// The covering units: `[a_start, a_end)` (the last one may be partial at the disk's end).
    pub(super) a_start: u64,
    pub(super) a_end: u64,
    pub(super) unit: u64,
    /// Start of the partial head unit (read-modify-written), if the request starts inside one.
    pub(super) head: Option<u64>,
    /// Start of the partial tail unit, if the request ends inside one (may equal `head`).
    pub(super) tail: Option<u64>,
}

impl Shape {
    pub(super) fn of(size: u64, unit: u64, offset: u64, end: u64) -> Shape {
        let a_start = round_down(offset, unit);
        let a_end = round_up(end, unit).min(size);
        Shape {
            offset,
            end,
            a_start,
            a_end,
            unit,
            head: (offset != a_start).then_some(a_start),
            tail: (end != a_end).then(|| round_down(end, unit)),
        }
    }

    /// Whether the request reads any unit back.
    pub(super) fn is_rmw(&self) -> bool {
        self.head.is_some() || self.tail.is_some()
    }

    /// What it takes of the range lock: the units it reads back exclusively, the rest shared.
    pub(super) fn ticket(&self) -> Ticket {
        let head = self.head.map(|h| (h, (h + self.unit).min(self.a_end)));
        let tail = self.tail.map(|t| (t, self.a_end));
        let rmw: Vec<(u64, u64)> = head.into_iter().chain(tail).collect();
        Ticket::new(self.a_start, self.a_end, &rmw)
    }

    /// Sectors whose bits the request sets when it succeeds: every unit it writes whole.
    fn sectors(&self) -> (u64, u64) {
        (self.a_start / SECTOR_SIZE, self.a_end.div_ceil(SECTOR_SIZE))
    }
}

/// See [`Core::image_pieces`].
struct ImagePieces {
    main: FileRef,
    /// Where the partial last unit starts, and the buffered fd for it.
    tail: Option<(u64, FileRef)>,
    at: u64,
    end: u64,
    max: u64,
}

impl Iterator for ImagePieces {
    type Item = (FileRef, u64, u64);

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        let (file, limit) = match self.tail {
            Some((start, tail)) if self.at >= start => (tail, self.end),
            Some((start, _)) => (self.main, start.min(self.end)),
            None => (self.main, self.end),
        };
        let n = (limit - self.at).min(self.max);
        let piece = (file, self.at, n);
        self.at += n;
        Some(piece)
    }
}

/// The byte range a write-like request covers (validated before it is parked).
fn write_range(req: &Request) -> (u64, u64) {
    match req {
        Request::Write { offset, data, .. } => (*offset, data.len() as u64),
        Request::WriteZeroes { offset, len, .. }
        | Request::Trim { offset, len, .. }
        | Request::Populate { offset, len } => (*offset, *len),
        _ => (0, 0),
    }
}

/// Checks a read of `len` bytes at `offset` of a disk of `size` bytes.
fn read_bounds(offset: u64, len: u64, size: u64) -> Result<(), RequestError> {
    if offset.checked_add(len).map_or(true, |e| e > size) {
        Err(req_err(libc::EINVAL, "read past the end", offset))
    } else if len > u64::from(MAX_READ) {
        Err(req_err(libc::EINVAL, "read larger than MAX_READ", offset))
    } else {
        Ok(())
    }
}

/// Patches bytes of `payload` (for [`Patch::Data`]) or zeros into a read-modify-write buffer.
/// Anything that does not fit is an error, never a silently skipped patch (that would write the
/// old bytes back and answer success).
///
/// The payload is copied with `ptr::copy` from [`SharedBuf::region_ptr`], never through a
/// `&[u8]`: it may be memory a guest lent ([`crate::LentBuf`]) and may change under the copy,
/// and other ops in flight (the write of the whole units in the middle) point into it.
pub(super) fn apply_patch(
    buf: &mut [u8],
    patch: Patch,
    payload: Option<&SharedBuf>,
) -> Result<(), &'static str> {
    match patch {
        Patch::Data { at, from, len } => {
            let data = payload.ok_or("internal error: read-modify-write without its payload")?;
            let src = data
                .region_ptr(from, len)
                .ok_or("internal error: patch range outside the payload")?;
            let end = at
                .checked_add(len)
                .ok_or("internal error: payload offset overflows")?;
            let dst = buf
                .get_mut(at..end)
                .ok_or("internal error: payload does not fit its read-modify-write buffer")?;
            // SAFETY: `src` points to `len` readable bytes of the payload (region_ptr checked the
            // range); `dst` is `len` bytes of a buffer this task owns exclusively, which cannot
            // overlap the payload (a separate allocation). Ops in flight only read the payload.
            unsafe { std::ptr::copy(src, dst.as_mut_ptr(), len) };
        }
        Patch::Zero { from, to } => buf
            .get_mut(from..to)
            .ok_or("internal error: zeroed range does not fit its read-modify-write buffer")?
            .fill(0),
    }
    Ok(())
}

/// The bytes of a completed bounce read that belong to the request: `bounce[skip..skip + len]`.
/// Out of range is an error, never a silently skipped copy (that would answer whatever the
/// destination held).
pub(super) fn bounce_bytes(
    bounce: Option<&IoBuf>,
    skip: usize,
    len: usize,
) -> Result<&[u8], &'static str> {
    let bounce = bounce.ok_or("internal error: bounce read without its bounce buffer")?;
    skip.checked_add(len)
        .and_then(|end| bounce.get(skip..end))
        .ok_or("internal error: bounce copy out of range")
}

impl Core {
    // ---- requests --------------------------------------------------------------------------

    /// Starts `req` once its throttle group and the core's fair share let it go (at once, or
    /// later from the core's queue: `qos.rs`). The disk accepted it already (`Disk::submit`
    /// checked that it is open), so it is served even if the disk is closing now.
    pub(super) fn submit(&mut self, disk: Arc<DiskState>, req: Request, done: Responder) {
        if let Some((disk, req, done)) = self.gate(disk, req, done) {
            self.start_request(disk, req, done);
        }
    }

    /// Validates and starts `req` (let go by the gate).
    pub(super) fn start_request(&mut self, disk: Arc<DiskState>, req: Request, done: Responder) {
        let size = disk.size;
        match req {
            Request::Read { offset, len } => {
                if let Err(e) = read_bounds(offset, u64::from(len), size) {
                    done.answer(Err(e));
                } else {
                    let buf = buf::alloc(self.shared.arena.as_ref(), len as usize, false);
                    self.start_read(disk, offset, buf.into(), false, done);
                }
            }
            Request::ReadInto { offset, buf } => {
                if let Err(e) = read_bounds(offset, buf.len() as u64, size) {
                    done.answer(Err(e));
                } else {
                    self.start_read(disk, offset, buf, true, done);
                }
            }
            Request::Flush => {
                if disk.read_only {
                    done.answer(Ok(Done::Ok));
                    return;
                }
                let waiter = Waiter {
                    core: self.id,
                    answer: Box::new(move |r| done.answer(r.map(|()| Done::Ok))),
                };
                self.start_commit(&disk, vec![waiter]);
            }
            Request::Cache { offset, len } => {
                if offset.checked_add(len).map_or(true, |e| e > size) {
                    done.answer(Err(req_err(libc::EINVAL, "cache past the end", offset)));
                } else {
                    done.answer(Ok(Done::Ok));
                }
            }
            req @ (Request::Write { .. } | Request::WriteZeroes { .. } | Request::Trim { .. }) => {
                self.start_write_like(disk, req, done)
            }
            Request::Populate { offset, len } => self.submit_populate(disk, offset, len, done),
        }
    }

    fn start_write_like(&mut self, disk: Arc<DiskState>, req: Request, done: Responder) {
        let (offset, len) = write_range(&req);
        if disk.read_only {
            done.answer(Err(req_err(
                libc::EPERM,
                "write to a read-only disk",
                offset,
            )));
            return;
        }
        let Some(end) = offset.checked_add(len).filter(|&e| e <= disk.size) else {
            done.answer(Err(req_err(libc::ENOSPC, "write past the end", offset)));
            return;
        };
        if len == 0 {
            let answer = match req {
                Request::Write { data, .. } => Done::Written(data),
                _ => Done::Ok,
            };
            done.answer(Ok(answer));
            return;
        }
        let Some((req, done)) = self.dirty_gate(&disk, offset, len, req, done) else {
            return;
        };
        let ticket = Shape::of(disk.size, disk.unit, offset, end).ticket();
        self.lock_and_start(disk, ticket, Parked { req, done });
    }

    /// Takes what `ticket` still lacks of the range lock and starts the request, or leaves it
    /// parked in the lock; requests the lock hands back meanwhile go on here too.
    pub(super) fn lock_and_start(&mut self, disk: Arc<DiskState>, ticket: Ticket, parked: Parked) {
        let mut work = vec![(ticket, parked)];
        let mut resume = Vec::new();
        while let Some((ticket, parked)) = work.pop() {
            if let Acquire::Got(ticket, parked) = disk.locks.acquire(ticket, parked, &mut resume) {
                let Some((ticket, Parked { req, done })) =
                    self.fleece_gate(&disk, ticket, parked, &mut resume)
                else {
                    work.append(&mut resume);
                    continue;
                };
                let (offset, len) = write_range(&req);
                let shape = Shape::of(disk.size, disk.unit, offset, offset + len);
                let disk = Arc::clone(&disk);
                match req {
                    Request::Write { data, fua, .. } => {
                        self.start_write(disk, shape, ticket, data, fua, done)
                    }
                    Request::WriteZeroes { punch, fua, .. } => {
                        self.start_zero(disk, shape, ticket, punch, fua, done)
                    }
                    Request::Trim { fua, .. } => {
                        self.start_zero(disk, shape, ticket, true, fua, done)
                    }
                    Request::Populate { offset, len } => {
                        self.start_populate(disk, ticket, offset, len, done)
                    }
                    // Only write-like requests are parked.
                    _ => {
                        disk.locks.release(&ticket, &mut resume);
                        done.answer(Err(req_err(
                            libc::EIO,
                            "internal error: parked a non-write",
                            0,
                        )));
                    }
                }
            }
            work.append(&mut resume);
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf` (bounds checked by the caller); `into`:
    /// the caller's buffer (a `ReadInto`, answered [`Done::Filled`]).
    fn start_read(
        &mut self,
        disk: Arc<DiskState>,
        offset: u64,
        buf: DataBuf,
        into: bool,
        done: Responder,
    ) {
        let len = buf.len() as u64;
        let buf = SharedBuf::new(buf);
        let key = self.tasks.insert(Task::Read(ReadTask {
            disk: Arc::clone(&disk),
            buf: buf.clone(),
            into,
            offset,
            copy_up: None,
            pending: 0,
            err: None,
            done,
        }));
        let n = self.issue_read(key, &disk, &buf, 0, offset, len);
        if disk.copy_on_read
            && self
                .segs
                .iter()
                .any(|s| matches!(s.src, Src::File { .. } | Src::Remote { .. }))
        {
            if let Some(Task::Read(t)) = self.tasks.get_mut(key) {
                t.copy_up = Some(len);
            }
        }
        drop(buf);
        self.add_pending(key, n);
    }

    fn start_write(
        &mut self,
        disk: Arc<DiskState>,
        shape: Shape,
        ticket: Ticket,
        data: DataBuf,
        fua: bool,
        done: Responder,
    ) {
        let data = SharedBuf::new(data);
        let ahead = self.plan_extent_ahead(&disk, shape.a_start, shape.a_end);
        if !shape.is_rmw() {
            // Whole units: straight from the caller's buffer to the raw image.
            let key = self.tasks.insert(Task::Write(WriteTask {
                disk: Arc::clone(&disk),
                offset: shape.offset,
                sectors: shape.sectors(),
                locked: Held::new(Arc::clone(&disk), ticket),
                pending: 0,
                filling: false,
                err: None,
                data: Some(data.clone()),
                edges: Vec::new(),
                fua,
                done,
            }));
            let len = shape.end - shape.offset;
            let n = self.issue_allocations(key, &disk, ahead)
                + self.issue_image_writes(key, &disk, &data, 0, shape.offset, len);
            drop(data);
            self.add_pending(key, n);
            return;
        }
        // Read-modify-write of the partial head and tail units only: each gets a buffer of one
        // unit, filled with the current bytes (raw image, base or zeros by their bits), then
        // patched with its part of the payload and written. The whole units between them are
        // written straight from the caller's buffer, like an aligned write: the daemon memory
        // a write bounces through is at most two units, whatever its length.
        let Shape {
            offset,
            end,
            a_start,
            a_end,
            unit,
            head,
            tail,
        } = shape;
        let arena = self.shared.arena.as_ref();
        let inner_start = head.map_or(offset, |h| (h + unit).min(end));
        let inner_end = tail.unwrap_or(end).max(inner_start);
        // (range in the file, patch) of each read-modify-write buffer; the middle, if any.
        type Span = (u64, u64);
        let (edges, middle): (Vec<(Span, Patch)>, Option<Span>) =
            if (inner_start - offset) % disk.image_align.mem.max(1) != 0 {
                // The whole units start at a payload byte O_DIRECT cannot write from (a payload
                // at a byte offset that is not a multiple of the memory alignment: NBD allows
                // any, virtio-blk sends whole sectors): the covering units bounce through one
                // buffer, whose head and tail units are filled.
                let patch = Patch::Data {
                    at: (offset - a_start) as usize,
                    from: 0,
                    len: (end - offset) as usize,
                };
                (vec![((a_start, a_end), patch)], None)
            } else {
                let mut edges = Vec::new();
                if let Some(h) = head {
                    let e_end = (h + unit).min(a_end);
                    let patch = Patch::Data {
                        at: (offset - h) as usize,
                        from: 0,
                        len: (end.min(e_end) - offset) as usize,
                    };
                    edges.push(((h, e_end), patch));
                }
                if let Some(t) = tail.filter(|&t| Some(t) != head) {
                    let patch = Patch::Data {
                        at: 0,
                        from: (t - offset) as usize,
                        len: (end - t) as usize,
                    };
                    edges.push(((t, a_end), patch));
                }
                let middle = (inner_start < inner_end).then_some((inner_start, inner_end));
                (edges, middle)
            };
        let edges: Vec<Edge> = edges
            .into_iter()
            .map(|((from, to), patch)| Edge {
                buf: SharedBuf::new(buf::alloc(arena, (to - from) as usize, false)),
                file_off: from,
                patch,
            })
            .collect();
        // The units read back: the partial head and tail units, wherever their buffer is.
        let mut fills: Vec<(SharedBuf, usize, u64, u64)> = Vec::new();
        for e in &edges {
            let (lo, hi) = (e.file_off, e.file_off + e.buf.len() as u64);
            if let Some(h) = head.filter(|&h| h >= lo && h < hi) {
                let h_end = (h + unit).min(a_end);
                fills.push((e.buf.clone(), (h - lo) as usize, h, h_end - h));
            }
            if let Some(t) = tail.filter(|&t| t >= lo && t < hi && Some(t) != head) {
                fills.push((e.buf.clone(), (t - lo) as usize, t, a_end - t));
            }
        }
        let key = self.tasks.insert(Task::Write(WriteTask {
            disk: Arc::clone(&disk),
            offset,
            sectors: shape.sectors(),
            locked: Held::new(Arc::clone(&disk), ticket),
            pending: 0,
            filling: true,
            err: None,
            data: Some(data.clone()),
            edges,
            fua,
            done,
        }));
        let mut n = self.issue_allocations(key, &disk, ahead);
        for (buf, at, off, len) in fills {
            n += self.issue_read(key, &disk, &buf, at, off, len);
        }
        if let Some((lo, hi)) = middle {
            n += self.issue_image_writes(key, &disk, &data, (lo - offset) as usize, lo, hi - lo);
        }
        drop(data);
        self.add_pending(key, n);
    }

    fn start_zero(
        &mut self,
        disk: Arc<DiskState>,
        shape: Shape,
        ticket: Ticket,
        punch: bool,
        fua: bool,
        done: Responder,
    ) {
        let Shape {
            offset,
            end,
            a_end,
            unit,
            head,
            tail,
            ..
        } = shape;
        let arena = self.shared.arena.as_ref();
        let mut edges = Vec::new();
        if let Some(h) = head {
            let e_end = (h + unit).min(a_end);
            edges.push(Edge {
                buf: SharedBuf::new(buf::alloc(arena, (e_end - h) as usize, false)),
                file_off: h,
                patch: Patch::Zero {
                    from: (offset - h) as usize,
                    to: (end.min(e_end) - h) as usize,
                },
            });
        }
        if let Some(t) = tail.filter(|&t| Some(t) != head) {
            edges.push(Edge {
                buf: SharedBuf::new(buf::alloc(arena, (a_end - t) as usize, false)),
                file_off: t,
                patch: Patch::Zero {
                    from: (offset.max(t) - t) as usize,
                    to: (end - t) as usize,
                },
            });
        }
        let inner_start = head.map_or(offset, |h| h + unit);
        let inner_end = tail.unwrap_or(end);
        let fills: Vec<(SharedBuf, u64)> =
            edges.iter().map(|e| (e.buf.clone(), e.file_off)).collect();
        let key = self.tasks.insert(Task::Write(WriteTask {
            disk: Arc::clone(&disk),
            offset,
            sectors: shape.sectors(),
            locked: Held::new(Arc::clone(&disk), ticket),
            pending: 0,
            filling: !edges.is_empty(),
            err: None,
            data: None,
            edges,
            fua,
            done,
        }));
        let mut n = 0;
        for (buf, off) in fills {
            let len = buf.len() as u64;
            n += self.issue_read(key, &disk, &buf, 0, off, len);
        }
        if inner_start < inner_end {
            if punch {
                let file = self.image_file(&disk);
                n += self.issue(
                    key,
                    OpKind::Punch {
                        file,
                        off: inner_start,
                        len: inner_end - inner_start,
                    },
                );
            } else {
                n += self.issue_zero_writes(key, &disk, inner_start, inner_end - inner_start);
            }
        }
        self.add_pending(key, n);
    }

    // ---- planning --------------------------------------------------------------------------

    /// Issues the reads that fill `dest[at..at + len]` with the disk's bytes at `offset`
    /// (zero-filling what needs no I/O). Returns how many ops were issued.
    pub(super) fn issue_read(
        &mut self,
        task: usize,
        disk: &DiskState,
        dest: &SharedBuf,
        at: usize,
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
        for seg in &segs {
            let at = at + seg.dest as usize;
            match seg.src {
                Src::Zero => match dest.region_ptr(at, seg.len as usize) {
                    // SAFETY: the region lies inside `dest` and no op covers it (the planned
                    // segments are disjoint).
                    Some(p) => unsafe { std::ptr::write_bytes(p, 0, seg.len as usize) },
                    None => self.internal(task, "internal error: zero fill outside its buffer"),
                },
                Src::Image { offset } => {
                    issued += self.issue_image_read(task, disk, dest, at, offset, seg.len)
                }
                Src::File { fd, offset, align } => {
                    let file = FileRef {
                        target: self.target(disk, Role::Base, fd),
                        role: Role::Base,
                        align,
                    };
                    issued += self.issue_file_read(task, file, dest, at, offset, seg.len);
                }
                Src::Remote { offset } => {
                    issued += self.issue_remote_read(task, disk, dest, at, offset, seg.len);
                }
            }
        }
        self.segs = segs;
        issued
    }

    /// `[off, off + len)` of the raw image as (file, offset, length) pieces of at most `max`
    /// bytes: the part before the partial last unit through the image's fd, the part in it
    /// through the buffered tail fd.
    fn image_pieces(&self, disk: &DiskState, off: u64, len: u64, max: u64) -> ImagePieces {
        let end = off + len;
        ImagePieces {
            main: self.image_file(disk),
            tail: disk.tail.as_ref().map(|t| {
                (
                    t.start,
                    FileRef {
                        target: Target::Fd(t.file.as_raw_fd()),
                        role: Role::Image,
                        align: DioAlign::NONE,
                    },
                )
            }),
            at: off,
            end,
            max: max.max(1),
        }
    }

    fn issue_image_read(
        &mut self,
        task: usize,
        disk: &DiskState,
        dest: &SharedBuf,
        at: usize,
        off: u64,
        len: u64,
    ) -> usize {
        let mut issued = 0;
        for (file, o, n) in self.image_pieces(disk, off, len, SEG_MAX) {
            issued += self.issue_file_read(task, file, dest, at + (o - off) as usize, o, n);
        }
        issued
    }

    /// Reads `[off, off + len)` of `file` into `dest[at..]`: straight when aligned for the
    /// file's O_DIRECT, else through an aligned bounce buffer copied out when it completes.
    fn issue_file_read(
        &mut self,
        task: usize,
        file: FileRef,
        dest: &SharedBuf,
        at: usize,
        off: u64,
        len: u64,
    ) -> usize {
        let mut issued = 0;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(SEG_MAX);
            let (o, a) = (off + done, at + done as usize);
            done += n;
            let Some(ptr) = dest.region_ptr(a, n as usize) else {
                self.internal(task, "internal error: read outside its buffer");
                break;
            };
            let kind = if file.align.fits(ptr as usize, o, n) {
                let fixed = self.fixed_slot(dest.arena_slot());
                Region::new(Mem::Shared(dest.clone()), a, n as usize, fixed).map(|into| {
                    OpKind::Read {
                        file,
                        off: o,
                        into,
                        copy_out: None,
                    }
                })
            } else {
                let a_off = round_down(o, file.align.offset);
                let a_end = round_up(o + n, file.align.offset);
                let bounce =
                    buf::alloc(self.shared.arena.as_ref(), (a_end - a_off) as usize, false);
                let fixed = self.fixed_slot(bounce.arena_slot());
                let blen = bounce.len();
                Region::new(Mem::Owned(bounce), 0, blen, fixed).map(|into| OpKind::Read {
                    file,
                    off: a_off,
                    into,
                    copy_out: Some(CopyOut {
                        dest: dest.clone(),
                        at: a,
                        skip: (o - a_off) as usize,
                        len: n as usize,
                    }),
                })
            };
            match kind {
                Some(kind) => issued += self.issue(task, kind),
                None => {
                    self.internal(task, "internal error: read region out of range");
                    break;
                }
            }
        }
        issued
    }

    /// Writes `src[at..at + len]` to the raw image at `off`.
    pub(super) fn issue_image_writes(
        &mut self,
        task: usize,
        disk: &DiskState,
        src: &SharedBuf,
        at: usize,
        off: u64,
        len: u64,
    ) -> usize {
        let mut issued = 0;
        let fixed = self.fixed_slot(src.arena_slot());
        for (file, o, n) in self.image_pieces(disk, off, len, SEG_MAX) {
            let a = at + (o - off) as usize;
            match Region::new(Mem::Shared(src.clone()), a, n as usize, fixed) {
                Some(from) => issued += self.issue(task, OpKind::Write { file, off: o, from }),
                None => {
                    self.internal(task, "internal error: write region out of range");
                    break;
                }
            }
        }
        issued
    }

    /// Real zeros over `[off, off + len)` of the raw image, from the core's zero buffer.
    fn issue_zero_writes(&mut self, task: usize, disk: &DiskState, off: u64, len: u64) -> usize {
        let mut issued = 0;
        for (file, o, n) in self.image_pieces(disk, off, len, ZERO_CHUNK) {
            match Region::new(Mem::Zero(Rc::clone(&self.zero)), 0, n as usize, None) {
                Some(from) => issued += self.issue(task, OpKind::Write { file, off: o, from }),
                None => {
                    self.internal(task, "internal error: zero write out of range");
                    break;
                }
            }
        }
        issued
    }

    /// The extents a WRITE of `[a_start, a_end)` should allocate ahead: when it lands on a clear
    /// sector, every extent it touches that no earlier write claimed (claimed now).
    fn plan_extent_ahead(&self, disk: &DiskState, a_start: u64, a_end: u64) -> Vec<(u64, u64)> {
        let Some(ea) = &disk.extent_ahead else {
            return Vec::new();
        };
        if disk.bitmap.get(a_start / SECTOR_SIZE) && disk.bitmap.get((a_end - 1) / SECTOR_SIZE) {
            return Vec::new();
        }
        ea.extents(a_start, a_end, disk.size)
            .filter(|&(i, _, _)| ea.claim(i))
            .map(|(_, off, len)| (off, len))
            .collect()
    }

    /// Issues the extent-ahead fallocates `extents` for `task` (alongside its first ops: the
    /// write does not wait for them, and their failure does not fail it).
    fn issue_allocations(
        &mut self,
        task: usize,
        disk: &DiskState,
        extents: Vec<(u64, u64)>,
    ) -> usize {
        let file = self.image_file(disk);
        let mut n = 0;
        for (off, len) in extents {
            n += self.issue(task, OpKind::Allocate { file, off, len });
        }
        n
    }

    /// An extent-ahead fallocate completed. A failure (ENOSPC, EOPNOTSUPP, EIO…) is logged
    /// once per disk and does not fail the write; a file system that cannot fallocate
    /// (EOPNOTSUPP, EINVAL) gets no more of them.
    pub(super) fn allocate_done(&mut self, task: usize, res: i32) {
        let Some(disk) = self.tasks.get(task).map(|t| Arc::clone(t.disk())) else {
            return;
        };
        if res >= 0 {
            disk.counters.extent_allocated();
            return;
        }
        let Some(ea) = &disk.extent_ahead else {
            return;
        };
        if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
            ea.disabled
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if !ea.logged.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(path = %disk.meta_path.display(), errno = -res,
                "extent-ahead fallocate of the raw image failed; the write goes on without it");
        }
    }

    /// Re-issues the rest of a short transfer as a new op of the same task.
    fn reissue(&mut self, task: usize, kind: OpKind, stalls: u8) {
        let mut op = CoreOp::new(task, kind);
        op.stalls = stalls;
        self.push_op(op);
        self.add_pending(task, 1);
    }

    // ---- reactions -------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_done(
        &mut self,
        task: usize,
        file: FileRef,
        off: u64,
        mut into: Region,
        copy_out: Option<CopyOut>,
        stalls: u8,
        res: i32,
    ) {
        if res < 0 {
            self.fail(task, -res, op_name(file.role, false));
            return;
        }
        let fd = match file.target {
            Target::Fd(fd) => Some(fd),
            Target::Fixed(_) => None,
        };
        let Some(file_end) = self
            .tasks
            .get(task)
            .map(|t| t.disk().file_len_of(file.role, fd))
        else {
            return;
        };
        let got = (res as usize).min(into.len());
        if got < into.len() {
            if off + got as u64 >= file_end {
                // At the file's end (e.g. an O_DIRECT read of a base whose size is not a
                // multiple of the alignment): the rest reads as zeros.
                into.zero_from(got);
            } else {
                // Short inside the file: read the rest, from an aligned point for O_DIRECT.
                let step = round_down(got as u64, file.align.offset.max(file.align.mem)) as usize;
                let stalls = if step == 0 { stalls + 1 } else { 0 };
                if got == 0 || stalls > MAX_STALLS {
                    // The file ended before the size it had at open (truncated behind our
                    // back): answering zeros would return bytes nobody wrote.
                    self.fail(task, libc::EIO, op_name(file.role, false));
                    return;
                }
                let kind = OpKind::Read {
                    file,
                    off: off + step as u64,
                    into: into.advance(step),
                    copy_out,
                };
                self.reissue(task, kind, stalls);
                return;
            }
        }
        if file.role == Role::Base {
            if let Some(t) = self.tasks.get(task) {
                t.disk().counters.base_read(got as u64);
            }
        }
        if let Some(c) = copy_out {
            let copied = bounce_bytes(into.owned(), c.skip, c.len).and_then(|src| {
                let dst = c
                    .dest
                    .region_ptr(c.at, c.len)
                    .ok_or("internal error: bounce copy outside its destination")?;
                // SAFETY: dst..dst+len lies inside the destination (checked) and no op in
                // flight covers it (the planned segments are disjoint); src is this op's bounce.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, c.len) };
                Ok(())
            });
            if let Err(what) = copied {
                self.internal(task, what);
            }
        }
    }

    pub(super) fn write_done(
        &mut self,
        task: usize,
        file: FileRef,
        off: u64,
        from: Region,
        stalls: u8,
        res: i32,
    ) {
        let Some(t) = self.tasks.get(task) else {
            return;
        };
        let n = if res < 0 {
            0
        } else {
            (res as usize).min(from.len())
        };
        // Only a crash-recorder build looks at the bytes written, through a copy (they may be
        // memory a guest lent, which it may be changing: no slice is made of them).
        if cfg!(feature = "crash-recorder") && n > 0 {
            t.disk().rec_write(file.role, off, &from.copy_bytes(n));
        }
        if file.role == Role::Image {
            // Even a failed write may have changed bytes: the next commit must sync.
            t.disk().note_written();
        }
        if res < 0 {
            self.fail(task, -res, op_name(file.role, true));
            return;
        }
        if n == from.len() {
            return;
        }
        if matches!(t, Task::Commit(_)) || n == 0 {
            // A short write breaks a commit's linked chain (the commit fails and the next one
            // rewrites the blocks); no progress at all means no space.
            let errno = if n == 0 { libc::ENOSPC } else { libc::EIO };
            self.fail(task, errno, op_name(file.role, true));
            return;
        }
        let step = round_down(n as u64, file.align.offset.max(file.align.mem)) as usize;
        let stalls = if step == 0 { stalls + 1 } else { 0 };
        if stalls > MAX_STALLS {
            self.fail(task, libc::EIO, op_name(file.role, true));
            return;
        }
        let kind = OpKind::Write {
            file,
            off: off + step as u64,
            from: from.advance(step),
        };
        self.reissue(task, kind, stalls);
    }

    pub(super) fn punch_done(&mut self, task: usize, off: u64, len: u64, res: i32) {
        let Some(disk) = self.tasks.get(task).map(|t| Arc::clone(t.disk())) else {
            return;
        };
        if res >= 0 {
            disk.rec_punch(Role::Image, off, len);
        }
        disk.note_written();
        if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
            // No hole punching here: write real zeros instead.
            let n = self.issue_zero_writes(task, &disk, off, len);
            self.add_pending(task, n);
        } else if res < 0 {
            self.fail(task, -res, "punch hole in raw image");
        }
    }

    /// Read-modify-write: the old bytes are in; patch the new ones in and write the units.
    pub(super) fn write_fills_done(&mut self, key: usize) {
        let Some(Task::Write(w)) = self.tasks.get_mut(key) else {
            return;
        };
        w.filling = false;
        let WriteTask {
            disk, data, edges, ..
        } = w;
        let disk = Arc::clone(disk);
        let payload = data.as_ref();
        let mut patched = Ok(());
        for e in edges.iter_mut() {
            patched = patched.and_then(|()| match e.buf.get_mut() {
                Some(buf) => apply_patch(buf, e.patch, payload),
                None => Err("internal error: read-modify-write buffer still shared"),
            });
        }
        let writes: Vec<(SharedBuf, u64)> =
            edges.iter().map(|e| (e.buf.clone(), e.file_off)).collect();
        if let Err(what) = patched {
            self.internal(key, what);
            self.add_pending(key, 0);
            return;
        }
        let mut n = 0;
        for (buf, off) in writes {
            let len = buf.len() as u64;
            n += self.issue_image_writes(key, &disk, &buf, 0, off, len);
        }
        self.add_pending(key, n);
    }

    pub(super) fn finish_write(&mut self, t: WriteTask) {
        let WriteTask {
            disk,
            sectors,
            locked,
            err,
            data,
            fua,
            done,
            ..
        } = t;
        if err.is_none() {
            // DESIGN invariant 2: bits only after the data write completed.
            disk.set_bits(sectors.0, sectors.1);
            self.arm_bg(&disk);
        }
        let mut resume = Vec::new();
        locked.release(&mut resume);
        for (ticket, parked) in resume {
            self.lock_and_start(Arc::clone(&disk), ticket, parked);
        }
        if let Some(e) = err {
            done.answer(Err(e));
            return;
        }
        let answer = match data.map(SharedBuf::into_inner) {
            None => Done::Ok,
            Some(Ok(buf)) => Done::Written(buf),
            Some(Err(_)) => {
                tracing::error!(
                    core = self.id,
                    "a write finished while an op still held its buffer"
                );
                done.answer(Err(req_err(
                    libc::EIO,
                    "internal error: write buffer still shared",
                    0,
                )));
                return;
            }
        };
        if fua {
            let waiter = Waiter {
                core: self.id,
                answer: Box::new(move |r| done.answer(r.map(|()| answer))),
            };
            self.start_commit(&disk, vec![waiter]);
        } else {
            done.answer(Ok(answer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_that_does_not_fit_is_an_error_and_changes_nothing() {
        let ones = SharedBuf::new(IoBuf::from_slice(&[1; 12]));
        let data = |at, from, len| Patch::Data { at, from, len };
        let mut buf = vec![7u8; 512];
        assert!(apply_patch(&mut buf, data(500, 0, 12), Some(&ones)).is_ok());
        assert_eq!(&buf[500..], &[1; 12]);
        let mut buf = vec![7u8; 512];
        assert!(apply_patch(&mut buf, data(0, 10, 2), Some(&ones)).is_ok());
        assert_eq!(&buf[..3], &[1, 1, 7], "a part of the payload");
        let mut buf = vec![7u8; 512];
        let err = apply_patch(&mut buf, data(501, 0, 12), Some(&ones)).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
        assert!(buf.iter().all(|&b| b == 7), "nothing half-written");
        let err = apply_patch(&mut buf, data(0, 4, 12), Some(&ones)).unwrap_err();
        assert!(err.contains("outside the payload"), "{err}");
        assert!(apply_patch(&mut buf, data(0, 0, 1), None).is_err());
        assert!(apply_patch(&mut buf, data(usize::MAX, 0, 1), Some(&ones)).is_err());
        assert!(apply_patch(&mut buf, data(0, usize::MAX, 2), Some(&ones)).is_err());
        assert!(apply_patch(&mut buf, Patch::Zero { from: 10, to: 513 }, None).is_err());
        assert!(apply_patch(&mut buf, Patch::Zero { from: 10, to: 9 }, None).is_err());
        assert!(buf.iter().all(|&b| b == 7));
        assert!(apply_patch(&mut buf, Patch::Zero { from: 10, to: 20 }, None).is_ok());
        assert_eq!(buf[9..21], [7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn a_bounce_copy_out_of_range_is_an_error() {
        let b = IoBuf::from_slice(&[3u8; 4096]);
        assert_eq!(bounce_bytes(Some(&b), 4000, 96).map(<[u8]>::len), Ok(96));
        assert!(bounce_bytes(Some(&b), 4000, 97).is_err());
        assert!(bounce_bytes(Some(&b), usize::MAX, 2).is_err());
        assert!(bounce_bytes(None, 0, 1).is_err());
    }

    #[test]
    fn shapes_read_back_only_partial_units() {
        // Whole units: nothing read back, the lock is only shared.
        let s = Shape::of(1 << 20, 4096, 8192, 16384);
        assert!(!s.is_rmw() && !s.ticket().is_exclusive());
        assert_eq!(s.sectors(), (16, 32));
        // A sub-unit write inside one unit: that unit, exclusively.
        let s = Shape::of(1 << 20, 4096, 8192 + 7, 8192 + 100);
        assert_eq!((s.head, s.tail), (Some(8192), Some(8192)));
        assert!(s.ticket().is_exclusive());
        // Spanning units: head and tail are read back, the middle is not.
        let s = Shape::of(1 << 20, 4096, 4096 + 1, 5 * 4096 - 1);
        assert_eq!((s.head, s.tail), (Some(4096), Some(4 * 4096)));
        // A sector-aligned write smaller than the O_DIRECT unit is a copy-up of its unit.
        let s = Shape::of(1 << 20, 4096, 512, 1024);
        assert_eq!((s.head, s.tail), (Some(0), Some(0)));
        // The partial last unit of a disk whose size is not a multiple of the unit.
        let size = 4096 * 4 + 512;
        let s = Shape::of(size, 4096, size - 512, size);
        assert!(!s.is_rmw(), "it is written whole");
        assert_eq!((s.a_start, s.a_end), (size - 512, size));
        let s = Shape::of(size, 4096, size - 500, size - 10);
        assert_eq!((s.head, s.tail), (Some(size - 512), Some(size - 512)));
        assert_eq!(s.a_end, size);
    }
}
