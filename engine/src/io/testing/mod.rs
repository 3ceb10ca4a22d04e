//! Test-only seams: `recorder` (feature `crash-recorder`) logs every write and sync in
//! completion order, and `faults` (feature `fault-injection`) rewrites chosen completions.
//! Both are leaves: the engine's configuration names them, and the disk state calls the
//! recorder (`disk/hooks.rs`, no-ops without the feature).

#[cfg(feature = "fault-injection")]
pub mod faults;
#[cfg(feature = "crash-recorder")]
pub mod recorder;
