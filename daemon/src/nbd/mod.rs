//! The NBD protocol, server side: what goes over the wire and what it means, with no socket
//! and no thread of its own.
//!
//! [`wire`] (constants, request and reply headers; it lives in the engine, whose remote-base
//! client speaks the same protocol), [`handshake`] (option haggling, up to the chosen export),
//! [`command`] (request validation), [`status`] (block status, bounded), [`reply`] (framing),
//! [`export`] (the export table the handshake looks names up in, each export's client table)
//! and [`stats`] (lock-free per-export request counters).
//!
//! May import: [`crate::backend`] and [`crate::process`]. Never a transport
//! ([`crate::conn`]), the host or the process's top ([`crate::serve`]).

pub mod command;
pub mod export;
pub mod handshake;
pub mod reply;
pub mod stats;
pub mod status;
pub use addcow_engine::nbd::wire;
