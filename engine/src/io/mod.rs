//! The thread-per-core io_uring engine.
//!
//! The public types are re-exported here; each lives in the module named after it. See
//! `docs/ARCHITECTURE.md` for how a request travels and where durability is decided.
//!
//! The folders import one way: `engine/` uses `core/`, which uses `source/`, which uses
//! `disk/`, which uses the config, the base, `request/`, `uring/` and `testing/`.
//!
//! * `engine/`: [`Engine`]: core threads started and stopped, disks opened; `disk`: [`Disk`],
//!   where a request enters (submit, blocking helpers, close).
//! * `core/`: one core thread: the loop, and the request state machines that plan ops and react
//!   (`core/rw.rs` READ/WRITE/zeroes, `core/commit.rs` the group commit, `core/commit_order.rs`
//!   the order of its steps); `mailbox`: how other threads reach a core (channel + eventfd +
//!   messages); `shared`: what the threads of one engine share (core handles, arena, config).
//! * `disk/`: what the cores serving one disk share (a leaf: it knows nothing of cores or the
//!   engine): `state` (files, bitmap, dirty marks, commit state, unit locks); `range_lock`: the
//!   read-modify-write unit locks; `commit_plan`: which metadata bytes a commit writes;
//!   `extent_ahead`: which raw-image extents to allocate ahead of writes; `stats`: per-disk
//!   counters; `file_slot`: registered-file slots lent to the disk; `hooks`: where the disk
//!   state calls the crash recorder.
//! * `request/`: [`Request`], [`Done`], [`RequestError`], [`Completion`], [`Extent`];
//!   `responder`: a completion called exactly once. `config`: [`EngineConfig`], [`CacheMode`],
//!   [`DiskOptions`].
//! * `source/`: [`CoreSource`], work a core polls in its own ring (an eventfd) beside its
//!   requests, and [`SourceCtx`], how it submits on that core (through the `LocalSubmit` trait
//!   the core implements) and runs socket I/O on its ring;
//!   `sock`: the socket I/O's types ([`SockFd`], [`SendList`], [`SockDone`]).
//! * `uring/`: `ring`, one core's io_uring with its slab of in-flight ops, in-flight cap,
//!   backlog, linked chains and eventfd read (buffer lifetime is the ops' ownership); `buf`:
//!   [`IoBuf`] and the per-core arena pools, [`LentBuf`] (memory a guest lends; never a
//!   reference) and [`DataBuf`] (a request's buffer: either).
//! * The base: `base`, the base behind a small trait; `run`: the runs a base range is made
//!   of (shared by `base` and `remote`); `split`: read splitting by the bitmap;
//!   `remote`: a base on an NBD image server (its connection threads; `core/remote_read.rs` is
//!   the core's side).
//! * `align`: `STATX_DIOALIGN` alignment.
//! * `testing/` (test-only): `recorder` (feature `crash-recorder`), `faults` (feature
//!   `fault-injection`).

mod align;
mod base;
mod config;
mod core;
mod disk;
mod engine;
mod remote;
mod request;
mod run;
mod source;
mod split;
mod testing;
mod uring;

pub use config::{
    CacheMode, DiskOptions, EngineConfig, DEFAULT_EXTENT_AHEAD, DEFAULT_FAIR_SHARE_BYTES,
    DEFAULT_FAIR_SHARE_REQUESTS,
};
pub use core::on_core_thread;
pub use disk::stats::DiskStats;
pub use engine::disk::Disk;
pub use engine::fleece::{FleeceStats, FleeceView, FLEECE_CHUNK};
pub use engine::Engine;
pub use request::{
    Completion, DepthExtent, Done, Extent, ExtentKind, Request, RequestError, MAX_POPULATE,
    MAX_READ,
};
pub use source::sock::{Held, SendList, SockDone, SockFd};
pub use source::{CoreSource, SourceCtx, SourceId};
#[cfg(feature = "fault-injection")]
pub use testing::faults;
#[cfg(feature = "crash-recorder")]
pub use testing::recorder;
pub use uring::buf::{DataBuf, IoBuf, LentBuf, BUF_ALIGN};
