//! What the cores serving one open disk share, below the cores and the engine (it knows
//! nothing of either): `state`, the files, bitmap, dirty marks, commit state and unit locks;
//! `range_lock`: the read-modify-write unit locks; `commit_plan`: which metadata bytes a commit
//! writes; `extent_ahead`: which raw-image extents to allocate ahead of writes; `stats`: per-disk
//! counters; `file_slot`: the registered-file slots lent to the disk; `fleece`: the point-in-time view's scratch and copied
//! chunks; `hooks`: where the disk
//! state calls the crash recorder (test-only). The handle requests enter through,
//! [`Disk`](crate::io::Disk), is the engine's (`engine/disk.rs`).

pub(super) mod commit_plan;
pub(super) mod extent_ahead;
pub(super) mod file_slot;
pub(super) mod fleece;
mod hooks;
pub(super) mod range_lock;
pub(super) mod state;
pub(super) mod stats;
