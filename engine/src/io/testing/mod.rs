//! Test-only seams: `recorder` (feature `crash-recorder`) logs every write and sync in
//! completion order, `faults` (feature `fault-injection`) rewrites chosen completions, and
//! `hooks` is where the engine calls the recorder (no-ops without the feature).

#[cfg(feature = "fault-injection")]
pub mod faults;
pub(super) mod hooks;
#[cfg(feature = "crash-recorder")]
pub mod recorder;
