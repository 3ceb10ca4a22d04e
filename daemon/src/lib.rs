//! The `addcow serve` daemon as a library: the NBD server, the vhost-user-blk device, the control
//! socket and what they are made of. The `addcow` binary runs it ([`serve::run`]); fuzz targets
//! drive its parsers directly (feature `fuzzing`, which also builds the in-memory test backend).
//! [`stream`] is the copy-up loop that `addcow stream` and the control socket's stream job share.
//!
//! # Layers
//!
//! One folder per layer; a layer imports only the layers below it, never one above (checked by
//! `scripts/check_modules.py`, which also refuses an import cycle between the files of a layer):
//!
//! ```text
//!   serve      the process's top: command line, run, accept loop, metrics endpoint, demo
//!     │
//!   host       exports at runtime, control socket, jobs, snapshots, resizes, allowed folders
//!     │  ╲
//!   conn   ╲   NBD transports: listeners, connections (threads or the core's ring), budgets
//!     │   vhost  the vhost-user-blk device
//!   nbd     │  the NBD protocol: handshake, validation, replies, block status, export table
//!     │    ╱
//!   backend    the engine seam: `Backend`, `EngineDisk`, the in-memory test disk
//!     │
//!   process    stop switch and signals, owned files (pid file, socket locks), test seams
//! ```
//!
//! [`vhost`] depends only on [`backend`] (and [`process`]); [`stream`] only on the engine.
//! [`error`], the top level's error type, depends on nothing of the crate.

pub mod backend;
pub mod conn;
pub mod error;
pub mod host;
pub mod nbd;
pub mod process;
pub mod serve;
pub mod stream;
pub mod vhost;
