//! What one SQE is: [`CoreOp`], the op a core keeps in its ring's slab, owning the memory its
//! SQE points into, and how its entry is built.

use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

use super::super::align::DioAlign;
use super::super::source::SockOp;
use super::shared_buf::SharedBuf;
use crate::io::disk::state::Role;
use crate::io::source::sock::{SendList, SockDone, SockFd};
use crate::io::uring::buf::IoBuf;
use crate::io::uring::ring::RingOp;

/// A file as an SQE names it: a plain fd or a registered-file slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
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

/// Which file an op touches, as what, and the alignment its transfers need.
#[derive(Debug, Clone, Copy)]
pub(super) struct FileRef {
    pub(super) target: Target,
    pub(super) role: Role,
    pub(super) align: DioAlign,
}

/// The memory an op reads into or writes from; the op keeps it alive.
pub(super) enum Mem {
    /// Part of a request's buffer (other ops may use other parts).
    Shared(SharedBuf),
    /// A buffer of this op alone (a bounce buffer, a commit span).
    Owned(IoBuf),
    /// The core's zero buffer (only ever read by the kernel).
    Zero(Rc<IoBuf>),
}

impl Mem {
    fn len(&self) -> usize {
        match self {
            Mem::Shared(b) => b.len(),
            Mem::Owned(b) => b.len(),
            Mem::Zero(b) => b.len(),
        }
    }

    fn base_ptr(&self) -> *mut u8 {
        match self {
            Mem::Shared(b) => b.region_ptr(0, 0).unwrap_or(std::ptr::null_mut()),
            Mem::Owned(b) => b.raw_ptr(),
            Mem::Zero(b) => b.raw_ptr(),
        }
    }
}

/// `len` bytes at `at` of `mem` (`fixed`: the registered-buffer index of `mem` on this ring).
///
/// Invariant: `at + len <= mem.len()` and `len <= u32::MAX` (checked by [`Region::new`]).
pub(super) struct Region {
    mem: Mem,
    at: usize,
    len: usize,
    fixed: Option<u16>,
}

impl Region {
    /// `None` when `[at, at + len)` is not inside `mem` or is longer than one SQE can carry.
    pub(super) fn new(mem: Mem, at: usize, len: usize, fixed: Option<u16>) -> Option<Region> {
        let end = at.checked_add(len)?;
        if end > mem.len() || u32::try_from(len).is_err() {
            return None;
        }
        Some(Region {
            mem,
            at,
            len,
            fixed,
        })
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The first byte of the region.
    pub(super) fn ptr(&self) -> *mut u8 {
        // SAFETY: at <= mem.len() (invariant), so the pointer stays inside the allocation.
        unsafe { self.mem.base_ptr().add(self.at) }
    }

    /// A copy of the region's first `n` bytes (for the crash recorder, after the kernel finished
    /// with them). Copied through a raw pointer, never viewed as a slice: the region may be
    /// memory a guest lent, which it may be writing.
    pub(super) fn copy_bytes(&self, n: usize) -> Vec<u8> {
        let n = n.min(self.len);
        let mut out = vec![0u8; n];
        // SAFETY: [at, at + n) lies inside `mem` (invariant; n clamped to the region), which the
        // op keeps alive; `out` is a fresh allocation, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(), out.as_mut_ptr(), n) };
        out
    }

    /// Zeroes the region from byte `from` to its end (the part past a file's end).
    pub(super) fn zero_from(&mut self, from: usize) {
        if from < self.len {
            // SAFETY: [at + from, at + len) lies inside `mem` (invariant); after the op's CQE
            // only the core touches the region.
            unsafe { std::ptr::write_bytes(self.ptr().add(from), 0, self.len - from) };
        }
    }

    /// The rest of the region after its first `n` bytes (for the rest of a short transfer).
    pub(super) fn advance(self, n: usize) -> Region {
        let n = n.min(self.len);
        Region {
            at: self.at + n,
            len: self.len - n,
            ..self
        }
    }

    /// The owned buffer behind the region, if it is one (a bounce buffer).
    pub(super) fn owned(&self) -> Option<&IoBuf> {
        match &self.mem {
            Mem::Owned(b) => Some(b),
            _ => None,
        }
    }
}

/// Where a bounce read's bytes go once the read is complete: `bounce[skip..skip + len]` to
/// `dest[at..at + len]`.
pub(super) struct CopyOut {
    pub(super) dest: SharedBuf,
    pub(super) at: usize,
    pub(super) skip: usize,
    pub(super) len: usize,
}

pub(super) enum OpKind {
    Read {
        file: FileRef,
        off: u64,
        into: Region,
        copy_out: Option<CopyOut>,
    },
    Write {
        file: FileRef,
        off: u64,
        from: Region,
    },
    Punch {
        file: FileRef,
        off: u64,
        len: u64,
    },
    /// Extent-ahead: allocate `[off, off + len)` of the raw image (fallocate mode 0, KEEP_SIZE;
    /// no byte changes). Its failure never fails its task.
    Allocate {
        file: FileRef,
        off: u64,
        len: u64,
    },
    Sync {
        file: FileRef,
        id: u64,
    },
    /// Socket I/O of an attached source (`source`, under the source's `tag`); not a task's op.
    Sock {
        source: u64,
        tag: u64,
        io: SockIo,
    },
}

/// A socket op and the memory its SQE points into.
pub(super) enum SockIo {
    /// `recv` into `buf[at..]` (`at <= buf.len()`).
    Recv { fd: SockFd, buf: IoBuf, at: usize },
    /// `sendmsg` of `list`'s unsent bytes: `iov` and `hdr` are built by `entry` and point into
    /// `list` (heap memory: the header bytes and the `IoBuf`s it owns) and into each other.
    Send {
        fd: SockFd,
        list: SendList,
        iov: Vec<libc::iovec>,
        hdr: Box<libc::msghdr>,
    },
}

impl SockIo {
    pub(super) fn from_op(op: SockOp) -> SockIo {
        match op {
            SockOp::Recv { fd, buf, at } => {
                let at = at.min(buf.len());
                SockIo::Recv { fd, buf, at }
            }
            SockOp::Send { fd, list } => SockIo::Send {
                fd,
                list,
                iov: Vec::new(),
                // SAFETY: msghdr is plain data (pointers and integers) for which all-zero bytes
                // are a valid value (no name, no iovecs, no control data).
                hdr: Box::new(unsafe { std::mem::zeroed() }),
            },
        }
    }

    /// What the source gets back, with the op's result.
    pub(super) fn done(self, res: i32) -> SockDone {
        let result = if res < 0 {
            Err(std::io::Error::from_raw_os_error(-res))
        } else {
            Ok(res as usize)
        };
        match self {
            SockIo::Recv { buf, at, .. } => SockDone::Recv { buf, at, result },
            SockIo::Send { list, .. } => SockDone::Send { list, result },
        }
    }

    fn entry(&mut self) -> squeue::Entry {
        match self {
            SockIo::Recv { fd, buf, at } => {
                let len = u32::try_from(buf.len() - *at).unwrap_or(u32::MAX);
                // `at <= buf.len()` (invariant): the address stays inside the buffer.
                let ptr = buf.raw_ptr().wrapping_add(*at);
                opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, len).build()
            }
            SockIo::Send { fd, list, iov, hdr } => {
                list.iovecs(iov);
                hdr.msg_iov = iov.as_mut_ptr();
                hdr.msg_iovlen = iov.len() as _;
                let hdr: *const libc::msghdr = &**hdr;
                opcode::SendMsg::new(types::Fd(fd.as_raw_fd()), hdr)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
            }
        }
    }
}

/// One op in the ring (key = its `user_data`).
pub(super) struct CoreOp {
    /// The task (key in the core's task slab) the op belongs to.
    pub(super) task: usize,
    pub(super) kind: OpKind,
    /// In a commit chain: the next op is this fdatasync, which the kernel starts when this op
    /// completes (the crash recorder logs its start then).
    pub(super) then_sync: Option<(Role, u64)>,
    /// Short transfers in a row that made no progress (the continuation could not advance).
    pub(super) stalls: u8,
    /// Test-only: what fault injection does to this op.
    #[cfg(feature = "fault-injection")]
    pub(super) fault: Option<crate::io::testing::faults::Injected>,
}

impl CoreOp {
    pub(super) fn new(task: usize, kind: OpKind) -> CoreOp {
        CoreOp {
            task,
            kind,
            then_sync: None,
            stalls: 0,
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }

    /// The file the op touches (none for socket I/O).
    #[cfg(feature = "fault-injection")]
    pub(super) fn file(&self) -> Option<&FileRef> {
        match &self.kind {
            OpKind::Read { file, .. }
            | OpKind::Write { file, .. }
            | OpKind::Punch { file, .. }
            | OpKind::Allocate { file, .. }
            | OpKind::Sync { file, .. } => Some(file),
            OpKind::Sock { .. } => None,
        }
    }
}

pub(super) fn op_name(role: Role, write: bool) -> &'static str {
    match (role, write) {
        (Role::Image, false) => "read raw image",
        (Role::Image, true) => "write raw image",
        (Role::Meta, false) => "read metadata",
        (Role::Meta, true) => "write bitmap",
        (Role::Base, _) => "read base",
        (Role::Scratch, false) => "read backup scratch",
        (Role::Scratch, true) => "copy before write to backup scratch",
    }
}

// SAFETY: every address in the entry is inside the op's `Region`, whose memory the op keeps
// alive (an owned IoBuf, a clone of a shared one, or an Rc of the zero buffer), or inside its
// `SockIo` (an owned IoBuf; a SendList's heap bytes and IoBufs, the iovec Vec and the boxed
// msghdr pointing at them): heap memory that does not move with the op and lives at least as
// long as it. A socket op also keeps its descriptor open (a SockFd clone), so the number in the
// SQE cannot name another file before the op ends.
unsafe impl RingOp for CoreOp {
    fn entry(&mut self) -> squeue::Entry {
        #[cfg(feature = "fault-injection")]
        if let Some(e) = crate::io::testing::faults::nop_entry(self.fault.as_ref()) {
            return e;
        }
        match &mut self.kind {
            OpKind::Read {
                file, off, into, ..
            } => {
                let (ptr, len) = (into.ptr(), into.len() as u32);
                match into.fixed {
                    Some(i) => {
                        with_target!(file.target, |f| opcode::ReadFixed::new(f, ptr, len, i)
                            .offset(*off)
                            .build())
                    }
                    None => with_target!(file.target, |f| opcode::Read::new(f, ptr, len)
                        .offset(*off)
                        .build()),
                }
            }
            OpKind::Write { file, off, from } => {
                let (ptr, len) = (from.ptr(), from.len() as u32);
                match from.fixed {
                    Some(i) => {
                        with_target!(file.target, |f| opcode::WriteFixed::new(f, ptr, len, i)
                            .offset(*off)
                            .build())
                    }
                    None => with_target!(file.target, |f| opcode::Write::new(f, ptr, len)
                        .offset(*off)
                        .build()),
                }
            }
            OpKind::Punch { file, off, len } => {
                with_target!(file.target, |f| opcode::Fallocate::new(f, *len)
                    .offset(*off)
                    .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                    .build())
            }
            OpKind::Allocate { file, off, len } => {
                with_target!(file.target, |f| opcode::Fallocate::new(f, *len)
                    .offset(*off)
                    .mode(libc::FALLOC_FL_KEEP_SIZE)
                    .build())
            }
            OpKind::Sync { file, .. } => with_target!(file.target, |f| opcode::Fsync::new(f)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            OpKind::Sock { io, .. } => io.entry(),
        }
    }
}
