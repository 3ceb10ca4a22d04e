//! What a running daemon hosts and how it is operated: the exports added and deleted at
//! runtime, the control socket, jobs, live snapshots and resizes.
//!
//! [`runtime::Host`] holds the engine, the export table, the allowed folders, the event
//! broadcaster and the stop switch, and adds/removes exports; [`control`] is the JSON-RPC
//! control socket (with `export-resize`, [`control::resize`]), [`events`] its notifications;
//! [`jobs`] the background jobs (stream); [`snapshot`] and `export-resize` change an export's
//! disk under its clients; [`allow`] the folders
//! `export-add` may open; [`vhost_export`] the vhost-user-blk exports the control socket added;
//! [`throttle`] the named throttle groups and the limits an export is given.
//!
//! May import: [`crate::conn`] (listening sockets), [`crate::nbd`], [`crate::vhost`],
//! [`crate::backend`], [`crate::process`], [`crate::stream`]. Never the process's top
//! ([`crate::serve`]).

pub mod allow;
pub mod control;
pub mod events;
pub mod jobs;
pub mod runtime;
pub mod snapshot;
pub mod state;
pub mod throttle;
pub mod vhost_export;
