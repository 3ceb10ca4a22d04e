//! # addcow-engine
//!
//! The add-cow copy-on-write disk format (version 1) and a thread-per-core io_uring engine that
//! serves reads, writes and flushes on add-cow overlays.
//!
//! * [`format`]: the on-disk format: header, path rules, validation on open, `create`, `check`, `map`.
//! * [`bitmap`]: the in-memory allocation bitmap (atomic, sparse) and the dirty marks of the
//!   bitmap blocks used by group commit.
//! * [`dirty`]: changed-block tracking: named dirty bitmaps in a sidecar file, and the
//!   crash rule that keeps them (a dirty bit is durable before its data may be).
//! * [`io`]: the engine: core threads, io_uring rings, aligned buffers, requests and completions.
//! * [`sys`]: the OS calls made outside the ring (OFD locks, `fallocate`, `SEEK_DATA`/`SEEK_HOLE`,
//!   direct-I/O alignment, eventfds), shared with the daemon.
//!
//! Errors are one type, [`Error`]: a matchable [`ErrorKind`] plus context (path, offset, operation).

pub mod bitmap;
pub mod dirty;
pub mod error;
pub mod format;
pub mod io;
mod layout;
pub mod lifecycle;
pub mod nbd;
pub mod qos;
pub mod sync;
pub mod sys;
pub mod tls;

pub use error::{BackingLoop, Error, ErrorKind, Result};
pub use io::on_core_thread;
pub use io::{
    CacheMode, Completion, CoreSource, DataBuf, DepthExtent, Disk, DiskOptions, DiskStats, Done,
    Engine, EngineConfig, Extent, ExtentKind, FleeceStats, FleeceView, IoBuf, LentBuf, Request,
    RequestError, SendList, SockDone, SockFd, SourceCtx, SourceId, DEFAULT_EXTENT_AHEAD,
    DEFAULT_FAIR_SHARE_BYTES, DEFAULT_FAIR_SHARE_REQUESTS, FLEECE_CHUNK, MAX_POPULATE,
};
