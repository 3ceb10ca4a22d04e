//! What a caller says to a disk and what it hears back: [`Request`], [`Done`],
//! [`RequestError`], [`Completion`], and the allocation map ([`Extent`]).

pub(super) mod responder;

use crate::io::uring::buf::{DataBuf, IoBuf};

/// Largest READ the engine serves (256 MiB); larger ones fail with `EINVAL` rather than
/// allocate an unbounded buffer.
pub const MAX_READ: u32 = 256 << 20;

/// One request to a disk. Offsets and lengths are bytes; nothing needs to be aligned.
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes (at most [`MAX_READ`]) at `offset`; the completion carries the filled
    /// buffer.
    Read { offset: u64, len: u32 },
    /// Read `buf.len()` bytes (at most [`MAX_READ`]) at `offset` into the caller's `buf` (owned,
    /// or memory a guest lent: [`crate::LentBuf`]); answered with [`Done::Filled`], which
    /// carries `buf` back, filled.
    ReadInto { offset: u64, buf: DataBuf },
    /// Write `data` at `offset`; with `fua`, answered only once data and bits are durable.
    /// Lent memory ([`crate::LentBuf`]) is written from in place; where the engine needs the
    /// bytes themselves (the partial units of a read-modify-write), it copies them.
    Write {
        offset: u64,
        data: DataBuf,
        fua: bool,
    },
    /// Make every write answered before this request arrived durable (data, then bits).
    Flush,
    /// Make `[offset, offset+len)` read as zeros. `punch`: may deallocate (punch a hole);
    /// otherwise real zeros are written.
    WriteZeroes {
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    },
    /// Discard `[offset, offset+len)`; afterwards it reads as zeros (base data never re-exposed).
    Trim { offset: u64, len: u64, fua: bool },
    /// Prefetch hint: no semantic effect.
    Cache { offset: u64, len: u64 },
    /// Copy-up (stream): make the raw image hold `[offset, offset+len)` (widened to the disk's
    /// read-modify-write units, at most [`MAX_POPULATE`] bytes) without changing what it reads.
    /// Every clear sector gets the base's bytes written into the raw image (or, where the base
    /// reads as zeros, the raw image range is punched) and then its bit set, through the same
    /// ordering as a write (bits durable only after the data, by the group commit). Sectors
    /// whose bits are set are never overwritten with other bytes: the range is held exclusively
    /// in the range lock, so a write that lands meanwhile waits and wins. Not durable until the
    /// next FLUSH (or background commit). Answered with [`Done::Populated`].
    Populate { offset: u64, len: u64 },
}

/// Largest [`Request::Populate`] range (64 MiB): the engine buffers the bytes it copies.
pub const MAX_POPULATE: u64 = 64 << 20;

/// A successful request's result.
#[derive(Debug)]
pub enum Done {
    /// A [`Request::Read`]'s data, exactly the requested length.
    Read(IoBuf),
    /// A [`Request::ReadInto`] finished: the caller's buffer back, filled.
    Filled(DataBuf),
    /// A write finished; its buffer is handed back for reuse.
    Written(DataBuf),
    /// FLUSH, WRITE_ZEROES, TRIM or CACHE finished.
    Ok,
    /// A populate finished: bytes of clear sectors it copied from the base, and bytes of clear
    /// sectors it made read as zeros in the raw image (the base reads zeros there).
    Populated { copied: u64, zeroed: u64 },
}

/// Why a request failed. `errno` is a Linux errno (EIO, ENOSPC, EINVAL, EPERM, ESHUTDOWN, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} at offset {offset}: {}", std::io::Error::from_raw_os_error(*errno))]
pub struct RequestError {
    /// Linux errno.
    pub errno: i32,
    /// What the engine was doing ("read raw image", "fdatasync raw image", ...).
    pub op: &'static str,
    /// Byte offset of the request (0 for FLUSH).
    pub offset: u64,
}

/// Called exactly once, on a core thread, when a request finishes (with `ESHUTDOWN` if the
/// engine stops before it could be served). Keep it short (send to a channel), and never block
/// on the engine from inside it (the blocking helpers would deadlock there).
pub type Completion = Box<dyn FnOnce(std::result::Result<Done, RequestError>) + Send + 'static>;

/// Where the bytes of a range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ExtentKind {
    /// Bits set: read from the raw image.
    Image,
    /// Bits clear, inside the base: read from the base.
    Base,
    /// Bits clear, past the base's end or no base: reads as zeros without touching a disk.
    Zero,
}

/// A run of bytes with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where they come from.
    pub kind: ExtentKind,
}

/// A run of bytes supplied by one layer of the backing chain, in the numbering of QEMU's
/// `qemu:allocation-depth`: `1` the top overlay's raw image, `2` its base, `3` the base's base,
/// and so on; `0` no layer (zeros: clear in every layer, or past a layer's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DepthExtent {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// The supplying layer (see the type's docs).
    pub depth: u32,
}

/// A request error with `errno`, `op` and `offset`.
pub(crate) fn req_err(errno: i32, op: &'static str, offset: u64) -> RequestError {
    RequestError { errno, op, offset }
}
