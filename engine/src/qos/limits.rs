//! The limits of one throttle group, field for field QEMU's `ThrottleLimits` (`iops-total`,
//! `bps-read-max`, `iops-size`, ...), with its validation rules.

use serde::{Deserialize, Serialize};

/// The largest value any limit may take (QEMU's `THROTTLE_VALUE_MAX`).
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// Throttle limits, in QEMU's vocabulary (JSON names are QEMU's, kebab-case). `None` (or 0) is
/// "no limit". A `*-total` limit excludes its `*-read`/`*-write` pair. `*-max` is the burst rate
/// allowed for `*-max-length` seconds (default 1); `iops-size` makes a request of `n` bytes count
/// as `n / iops-size` operations (at least one).
///
/// Invariant (after [`ThrottleLimits::validate`]): every value is at most [`VALUE_MAX`]; a
/// burst is never below its average rate and never without one; a burst length is at least 1
/// and only set with its burst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ThrottleLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_total_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_total_max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_read: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_read_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_read_max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_write: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_write_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_write_max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_total_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_total_max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_read: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_read_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_read_max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_write: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_write_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_write_max_length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_size: Option<u64>,
}

/// Why a set of limits was refused: the limit's name and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("throttle limit `{key}`: {reason}")]
pub struct LimitsError {
    /// The QEMU name of the offending limit (`bps-total-max`, ...).
    pub key: &'static str,
    pub reason: String,
}

impl ThrottleLimits {
    /// Whether no limit is set (a group with these limits admits everything at once).
    pub fn is_empty(&self) -> bool {
        *self == ThrottleLimits::default()
    }

    /// Checks QEMU's rules (`throttle_is_valid`); see the type's invariant.
    pub fn validate(&self) -> Result<(), LimitsError> {
        // Filled in by the throttle implementation.
        Ok(())
    }
}
