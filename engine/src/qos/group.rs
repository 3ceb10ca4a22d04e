//! A throttle group: one budget shared by its member disks, on whichever cores serve them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::bucket::{now_ns, Direction, Meter};
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

/// The counters behind a [`ThrottleStats`] (of a group, or of one disk): atomics, so reading
/// them takes no lock.
#[derive(Debug, Default)]
pub struct StatsCounters {
    throttled_requests: AtomicU64,
    throttled_ns: AtomicU64,
    queued: AtomicU64,
}

impl StatsCounters {
    /// A request starts waiting for the budget.
    pub fn queued(&self) {
        self.throttled_requests.fetch_add(1, Ordering::Relaxed);
        self.queued.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that waited `waited_ns` for the budget stops waiting (admitted or answered).
    pub fn dequeued(&self, waited_ns: u64) {
        self.throttled_ns.fetch_add(waited_ns, Ordering::Relaxed);
        self.queued.fetch_sub(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> ThrottleStats {
        ThrottleStats {
            throttled_requests: self.throttled_requests.load(Ordering::Relaxed),
            throttled_ns: self.throttled_ns.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
        }
    }
}

/// Bumped whenever any group's limits or any disk's group change: a core that put a throttled
/// disk aside until a known time looks at it again at once when this moved.
static LIMITS_EPOCH: AtomicU64 = AtomicU64::new(0);

/// See [`LIMITS_EPOCH`].
pub(crate) fn limits_epoch() -> u64 {
    LIMITS_EPOCH.load(Ordering::SeqCst)
}

/// Records a change of limits or of a disk's group (before the cores are woken).
pub(crate) fn bump_limits_epoch() {
    LIMITS_EPOCH.fetch_add(1, Ordering::SeqCst);
}

/// Called when a group's limits change, so the cores holding its waiting requests look at them
/// again; returns false once what it wakes is gone (it is then forgotten).
pub type Waker = Box<dyn Fn() -> bool + Send + Sync>;

/// A named throttle budget. Cloning gives another handle to the same group; every disk given a
/// handle (`Disk::set_throttle`) draws from the same budget, and changing the limits takes effect
/// for the next request of every member, without reconnecting anything.
#[derive(Debug, Clone)]
pub struct ThrottleGroup {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    limits: RwLock<ThrottleLimits>,
    /// Whether `limits` is not empty: read on every request of a member, without a lock.
    limited: AtomicBool,
    /// The buckets, taken only to admit a request of a member while the group has limits.
    meter: Mutex<Meter>,
    stats: StatsCounters,
    /// Keyed by who registered them (an engine), so a key registers once.
    wakers: Mutex<Vec<(usize, Waker)>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottleGroup")
            .field("name", &self.name)
            .field("limits", &*crate::sync::read(&self.limits))
            .finish_non_exhaustive()
    }
}

impl ThrottleGroup {
    /// A group named `name` with `limits` (validated).
    pub fn new(name: &str, limits: ThrottleLimits) -> Result<ThrottleGroup, LimitsError> {
        limits.validate()?;
        let limits = limits.normalized();
        Ok(ThrottleGroup {
            inner: Arc::new(Inner {
                name: name.to_string(),
                limited: AtomicBool::new(!limits.is_empty()),
                meter: Mutex::new(Meter::new(&limits, now_ns())),
                limits: RwLock::new(limits),
                stats: StatsCounters::default(),
                wakers: Mutex::new(Vec::new()),
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
        let limits = limits.normalized();
        {
            let mut l = crate::sync::write(&self.inner.limits);
            crate::sync::lock(&self.inner.meter).set_limits(&limits, now_ns());
            *l = limits;
            self.inner
                .limited
                .store(!limits.is_empty(), Ordering::SeqCst);
        }
        bump_limits_epoch();
        self.wake();
        Ok(())
    }

    /// What the group held back so far (all members together). Lock-free.
    pub fn stats(&self) -> ThrottleStats {
        self.inner.stats.snapshot()
    }

    /// The group's counters (the cores update them).
    pub(crate) fn counters(&self) -> &StatsCounters {
        &self.inner.stats
    }

    /// Whether the group has any limit (no lock).
    pub(crate) fn is_limited(&self) -> bool {
        self.inner.limited.load(Ordering::Relaxed)
    }

    /// Admits a request of `bytes` in `dir` now if the budget allows (accounting it), or
    /// returns the nanoseconds until it may ask again. `now` is [`now_ns`].
    pub(crate) fn try_admit(&self, now: u64, dir: Direction, bytes: u64) -> Result<(), u64> {
        if !self.is_limited() {
            return Ok(());
        }
        crate::sync::lock(&self.inner.meter).try_admit(now, dir, bytes)
    }

    /// Registers `waker` under `key` (once per key: a later call with the same key does
    /// nothing), to be called whenever the limits change.
    pub(crate) fn add_waker(&self, key: usize, waker: Waker) {
        let mut w = crate::sync::lock(&self.inner.wakers);
        if !w.iter().any(|(k, _)| *k == key) {
            w.push((key, waker));
        }
    }

    /// Calls every waker (dropping those whose target is gone).
    fn wake(&self) {
        crate::sync::lock(&self.inner.wakers).retain(|(_, w)| w());
    }

    /// Whether `self` and `other` are handles to the same group.
    pub fn same_group(&self, other: &ThrottleGroup) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_limits_are_no_limits() {
        let zeros: ThrottleLimits =
            serde_json::from_str(r#"{"iops-total": 0, "bps-read": 0, "bps-write-max": 0}"#)
                .unwrap();
        let g = ThrottleGroup::new("z", zeros).unwrap();
        assert!(
            !g.is_limited(),
            "a group of zeros takes no lock per request"
        );
        assert_eq!(g.limits(), ThrottleLimits::default());
        assert_eq!(serde_json::to_string(&g.limits()).unwrap(), "{}");
        g.set_limits(ThrottleLimits {
            iops_total: Some(10),
            ..Default::default()
        })
        .unwrap();
        assert!(g.is_limited());
        g.set_limits(zeros).unwrap();
        assert!(!g.is_limited());
        assert_eq!(g.limits(), ThrottleLimits::default());
        // A zero next to a real limit is dropped; the limit stays.
        let mixed = ThrottleLimits {
            bps_total: Some(0),
            iops_read: Some(5),
            iops_size: Some(0),
            ..Default::default()
        };
        g.set_limits(mixed).unwrap();
        assert!(g.is_limited());
        assert_eq!(
            g.limits(),
            ThrottleLimits {
                iops_read: Some(5),
                ..Default::default()
            }
        );
    }
}
