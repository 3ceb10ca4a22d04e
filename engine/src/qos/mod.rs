//! Per-disk quality of service: throttle limits with QEMU's semantics (`docs/throttle.txt`,
//! libvirt's `<iotune>`), and throttle groups, several disks that share one budget.
//!
//! This module holds the configuration and the shared state of a group (what the cores serving
//! its members consult before they submit a request). It is a leaf of the engine: it knows
//! nothing of cores, rings or disks. Where a throttled request waits, and how a core's timer
//! wakes it, is the core's business (`io/core/`).

mod bucket;
mod group;
mod limits;
mod share;

pub use bucket::{instant_of, now_ns, Direction, Meter};
pub(crate) use group::{bump_limits_epoch, limits_epoch, StatsCounters};
pub use group::{ThrottleGroup, ThrottleStats};
pub use limits::{LimitsError, ThrottleLimits, VALUE_MAX};
pub(crate) use share::{Charge, CoreLoad};
