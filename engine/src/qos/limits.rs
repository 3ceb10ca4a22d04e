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
    /// Whether no limit is set (a group with these limits admits everything at once). A value of
    /// 0 is no limit (see [`ThrottleLimits::normalized`]).
    pub fn is_empty(&self) -> bool {
        self.normalized() == ThrottleLimits::default()
    }

    /// The same limits with every "no limit" spelled `None`: a rate, burst or `iops-size` of 0
    /// becomes `None`, and so does a burst length whose burst is unset (it has no effect;
    /// [`ThrottleLimits::validate`] only lets 1 through there). What a group keeps and shows.
    pub fn normalized(&self) -> ThrottleLimits {
        fn some(v: Option<u64>) -> Option<u64> {
            v.filter(|&v| v != 0)
        }
        fn burst(avg: &mut Option<u64>, max: &mut Option<u64>, len: &mut Option<u64>) {
            *avg = some(*avg);
            *max = some(*max);
            if max.is_none() {
                *len = None;
            }
        }
        let mut l = *self;
        burst(
            &mut l.iops_total,
            &mut l.iops_total_max,
            &mut l.iops_total_max_length,
        );
        burst(
            &mut l.iops_read,
            &mut l.iops_read_max,
            &mut l.iops_read_max_length,
        );
        burst(
            &mut l.iops_write,
            &mut l.iops_write_max,
            &mut l.iops_write_max_length,
        );
        burst(
            &mut l.bps_total,
            &mut l.bps_total_max,
            &mut l.bps_total_max_length,
        );
        burst(
            &mut l.bps_read,
            &mut l.bps_read_max,
            &mut l.bps_read_max_length,
        );
        burst(
            &mut l.bps_write,
            &mut l.bps_write_max,
            &mut l.bps_write_max_length,
        );
        l.iops_size = some(l.iops_size);
        l
    }

    /// The six buckets (`iops-total`, ..., `bps-write`) in a fixed order (see [`Bucket`]):
    /// average, burst, burst length (`None` = unset), with their QEMU names.
    pub(crate) fn buckets(&self) -> [BucketLimits; 6] {
        let b = |name: &'static str,
                 max_name: &'static str,
                 len_name: &'static str,
                 avg: Option<u64>,
                 max: Option<u64>,
                 len: Option<u64>| BucketLimits {
            name,
            max_name,
            len_name,
            avg: avg.unwrap_or(0),
            max: max.unwrap_or(0),
            length: len,
        };
        [
            b(
                "iops-total",
                "iops-total-max",
                "iops-total-max-length",
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ),
            b(
                "iops-read",
                "iops-read-max",
                "iops-read-max-length",
                self.iops_read,
                self.iops_read_max,
                self.iops_read_max_length,
            ),
            b(
                "iops-write",
                "iops-write-max",
                "iops-write-max-length",
                self.iops_write,
                self.iops_write_max,
                self.iops_write_max_length,
            ),
            b(
                "bps-total",
                "bps-total-max",
                "bps-total-max-length",
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ),
            b(
                "bps-read",
                "bps-read-max",
                "bps-read-max-length",
                self.bps_read,
                self.bps_read_max,
                self.bps_read_max_length,
            ),
            b(
                "bps-write",
                "bps-write-max",
                "bps-write-max-length",
                self.bps_write,
                self.bps_write_max,
                self.bps_write_max_length,
            ),
        ]
    }

    /// Checks QEMU's rules (`throttle_is_valid` in QEMU's `util/throttle.c`); see the type's
    /// invariant. In order: a `*-total` limit (average or burst) excludes its `*-read` and
    /// `*-write` pair; `iops-size` needs an iops limit; then for each bucket: values at most
    /// [`VALUE_MAX`], a burst length of at least 1, a burst length above 1 only with a burst,
    /// `max * length` at most [`VALUE_MAX`], a burst only with an average and never below it.
    /// A burst length of exactly 1 without a burst is accepted (it is the default, as in QEMU).
    pub fn validate(&self) -> Result<(), LimitsError> {
        let err = |key: &'static str, reason: &str| {
            Err(LimitsError {
                key,
                reason: reason.to_string(),
            })
        };
        let [it, ir, iw, bt, br, bw] = self.buckets();
        for (total, read, write) in [(&it, &ir, &iw), (&bt, &br, &bw)] {
            if total.avg != 0 && (read.avg != 0 || write.avg != 0) {
                let other = if read.avg != 0 { read.name } else { write.name };
                return err(
                    total.name,
                    &format!("cannot be used together with `{other}` (total excludes read/write)"),
                );
            }
            if total.max != 0 && (read.max != 0 || write.max != 0) {
                let other = if read.max != 0 {
                    read.max_name
                } else {
                    write.max_name
                };
                return err(
                    total.max_name,
                    &format!("cannot be used together with `{other}` (total excludes read/write)"),
                );
            }
        }
        if self.iops_size.unwrap_or(0) != 0 && it.avg == 0 && ir.avg == 0 && iw.avg == 0 {
            return err(
                "iops-size",
                "needs an iops limit (`iops-total`, `iops-read` or `iops-write`)",
            );
        }
        if self.iops_size.unwrap_or(0) > VALUE_MAX {
            return err("iops-size", &format!("must be at most {VALUE_MAX}"));
        }
        for b in [&it, &ir, &iw, &bt, &br, &bw] {
            if b.avg > VALUE_MAX {
                return err(b.name, &format!("must be at most {VALUE_MAX}"));
            }
            if b.max > VALUE_MAX {
                return err(b.max_name, &format!("must be at most {VALUE_MAX}"));
            }
            let length = b.length.unwrap_or(1);
            if length == 0 {
                return err(b.len_name, "must be at least 1 (seconds)");
            }
            if length > 1 && b.max == 0 {
                return err(b.len_name, &format!("set without `{}`", b.max_name));
            }
            if b.max != 0 && length > VALUE_MAX / b.max {
                return err(
                    b.len_name,
                    &format!(
                        "too long for `{}` (their product exceeds {VALUE_MAX})",
                        b.max_name
                    ),
                );
            }
            if b.max != 0 && b.avg == 0 {
                return err(b.max_name, &format!("needs `{}`", b.name));
            }
            if b.max != 0 && b.max < b.avg {
                return err(b.max_name, &format!("cannot be lower than `{}`", b.name));
            }
        }
        Ok(())
    }
}

/// One bucket's limits, as [`ThrottleLimits::buckets`] lists them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BucketLimits {
    pub name: &'static str,
    pub max_name: &'static str,
    pub len_name: &'static str,
    /// Average rate per second (0: no limit).
    pub avg: u64,
    /// Burst rate per second (0: none).
    pub max: u64,
    /// Burst length in seconds, as given.
    pub length: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(l: ThrottleLimits) -> &'static str {
        l.validate().expect_err("should be refused").key
    }

    #[test]
    fn empty_and_plain_limits_are_valid() {
        ThrottleLimits::default().validate().unwrap();
        ThrottleLimits {
            iops_total: Some(100),
            iops_total_max: Some(200),
            iops_total_max_length: Some(10),
            bps_read: Some(1 << 20),
            bps_write: Some(2 << 20),
            iops_size: Some(4096),
            ..Default::default()
        }
        .validate()
        .unwrap();
        // A burst length of 1 is the default and needs no burst (as in QEMU).
        ThrottleLimits {
            bps_total: Some(10),
            bps_total_max_length: Some(1),
            ..Default::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn total_excludes_read_and_write() {
        let l = ThrottleLimits {
            iops_total: Some(10),
            iops_read: Some(5),
            ..Default::default()
        };
        let e = l.validate().unwrap_err();
        assert_eq!(e.key, "iops-total");
        assert!(e.to_string().contains("iops-read"), "{e}");
        assert_eq!(
            key(ThrottleLimits {
                bps_total: Some(10),
                bps_write: Some(5),
                ..Default::default()
            }),
            "bps-total"
        );
        assert_eq!(
            key(ThrottleLimits {
                bps_read: Some(10),
                bps_write: Some(10),
                bps_total: Some(5),
                bps_total_max: Some(5),
                ..Default::default()
            }),
            "bps-total"
        );
        assert_eq!(
            key(ThrottleLimits {
                iops_total_max: Some(10),
                iops_write_max: Some(10),
                ..Default::default()
            }),
            "iops-total-max"
        );
        // Totals of iops with read/write of bps are fine.
        ThrottleLimits {
            iops_total: Some(10),
            bps_read: Some(5),
            ..Default::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn values_are_bounded() {
        assert_eq!(
            key(ThrottleLimits {
                bps_read: Some(VALUE_MAX + 1),
                ..Default::default()
            }),
            "bps-read"
        );
        assert_eq!(
            key(ThrottleLimits {
                iops_write: Some(VALUE_MAX),
                iops_write_max: Some(VALUE_MAX + 1),
                ..Default::default()
            }),
            "iops-write-max"
        );
        ThrottleLimits {
            bps_total: Some(VALUE_MAX),
            ..Default::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn burst_needs_an_average_and_is_not_below_it() {
        assert_eq!(
            key(ThrottleLimits {
                iops_read_max: Some(10),
                ..Default::default()
            }),
            "iops-read-max"
        );
        let e = ThrottleLimits {
            bps_total: Some(100),
            bps_total_max: Some(99),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.key, "bps-total-max");
        assert!(e.reason.contains("lower"), "{e}");
    }

    #[test]
    fn burst_length_rules() {
        assert_eq!(
            key(ThrottleLimits {
                iops_total: Some(10),
                iops_total_max: Some(20),
                iops_total_max_length: Some(0),
                ..Default::default()
            }),
            "iops-total-max-length"
        );
        assert_eq!(
            key(ThrottleLimits {
                iops_total: Some(10),
                iops_total_max_length: Some(5),
                ..Default::default()
            }),
            "iops-total-max-length"
        );
        assert_eq!(
            key(ThrottleLimits {
                bps_write: Some(VALUE_MAX / 2),
                bps_write_max: Some(VALUE_MAX / 2),
                bps_write_max_length: Some(3),
                ..Default::default()
            }),
            "bps-write-max-length"
        );
    }

    #[test]
    fn iops_size_needs_an_iops_limit() {
        assert_eq!(
            key(ThrottleLimits {
                bps_total: Some(10),
                iops_size: Some(4096),
                ..Default::default()
            }),
            "iops-size"
        );
        ThrottleLimits {
            iops_write: Some(10),
            iops_size: Some(4096),
            ..Default::default()
        }
        .validate()
        .unwrap();
    }
}
