//! The thread-per-core io_uring engine.
//!
//! The public types are re-exported here; each lives in the module named after it. See
//! `docs/ARCHITECTURE.md` for how a request travels and where durability is decided.
//!
//! * `engine`: [`Engine`]: core threads started and stopped, disks opened;
//!   `engine_shared`: what those threads share (core handles, arena, config, file slots).
//! * `disk`: [`Disk`]: where a request enters (submit, blocking helpers, close);
//!   `disk_state`: what the cores serving one disk share (files, bitmap, dirty marks, commit
//!   state, unit locks). A leaf: it knows nothing of cores or the engine.
//! * `request`: [`Request`], [`Done`], [`RequestError`], [`Completion`], [`Extent`];
//!   `config`: [`EngineConfig`], [`CacheMode`], [`DiskOptions`]; `responder`: a completion
//!   called exactly once.
//! * `mailbox`: how other threads reach a core (channel + eventfd + messages).
//! * `source`: [`CoreSource`], work a core polls in its own ring (an eventfd) beside its
//!   requests, and [`SourceCtx`], how it submits on that core and runs socket I/O on its ring;
//!   `sock`: the socket I/O's types ([`SockFd`], [`SendList`], [`SockDone`]).
//! * `ring`: [`ring::Ring`], one core's io_uring with its slab of in-flight ops, in-flight cap,
//!   backlog, linked chains and eventfd read; buffer lifetime is the ops' ownership.
//! * `core`: one core thread: the loop, and the request state machines that plan ops and react
//!   (`core/rw.rs` READ/WRITE/zeroes, `core/commit.rs` the group commit, `core/commit_order.rs`
//!   the order of its steps).
//! * `commit_plan`: which metadata bytes a commit writes; `split`: read splitting by the bitmap;
//!   `base`: the base behind a small trait; `range_lock`: the read-modify-write unit locks;
//!   `buf`: [`IoBuf`] and the per-core arena pools; `align`: `STATX_DIOALIGN`; `stats`:
//!   per-disk counters; `file_slot`: registered-file slots lent to a disk; `mutex`: locking a
//!   mutex whose holder panicked; `remote`: a base on an NBD image server (its connection
//!   threads; `core/remote_read.rs` is the core's side).
//! * Test-only: `recorder` (feature `crash-recorder`), `faults` (feature `fault-injection`),
//!   `hooks` (where the engine calls the recorder).

mod align;
mod base;
mod buf;
mod commit_plan;
mod config;
mod core;
mod disk;
mod disk_state;
mod engine;
mod engine_shared;
mod extent_ahead;
#[cfg(feature = "fault-injection")]
pub mod faults;
mod file_slot;
mod hooks;
mod mailbox;
mod mutex;
mod range_lock;
#[cfg(feature = "crash-recorder")]
pub mod recorder;
mod remote;
mod request;
mod responder;
mod ring;
mod sock;
mod source;
mod split;
mod stats;

pub use buf::{IoBuf, BUF_ALIGN};
pub use config::{CacheMode, DiskOptions, EngineConfig, DEFAULT_EXTENT_AHEAD};
pub use core::on_core_thread;
pub use disk::Disk;
pub use engine::Engine;
pub use request::{
    Completion, DepthExtent, Done, Extent, ExtentKind, Request, RequestError, MAX_POPULATE,
    MAX_READ,
};
pub use sock::{Held, SendList, SockDone, SockFd};
pub use source::{CoreSource, SourceCtx, SourceId};
pub use stats::DiskStats;
