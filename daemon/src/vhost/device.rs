//! What one frontend connection's device shares with its queues ([`Inner`]): the disk, the
//! guest memory, the negotiated flags and the log limits. A leaf of the device: the device
//! ([`super::backend`]) builds it, its queues ([`super::queue`]) read it.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::activity::Activity;
use super::config::DeviceConfig;
use crate::backend::disk::Backend;
use addcow_engine::sync::lock;

/// A log rate limit: one message per interval, counting the ones left out.
pub(super) struct LogLimit {
    every: Duration,
    /// When the last message was let through, and how many were left out since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    pub(super) fn new(every: Duration) -> LogLimit {
        LogLimit {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last one)` when a message may be logged now, else `None`
    /// (and it is counted).
    pub(super) fn admit(&self) -> Option<u64> {
        let mut s = lock(&self.state);
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let skipped = s.1;
                *s = (Some(now), 0);
                Some(skipped)
            }
        }
    }
}

/// Guest memory as the frontend mapped it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// What a device's queues share.
pub(super) struct Inner {
    pub(super) disk: Arc<dyn Backend>,
    pub(super) activity: Arc<Activity>,
    pub(super) config: DeviceConfig,
    pub(super) mem: RwLock<Option<GuestMem>>,
    pub(super) event_idx: AtomicBool,
    pub(super) writeback: AtomicBool,
    /// See [`super::backend::BOUNCE_CAP`].
    pub(super) batch_bytes: u64,
    /// Hand aligned guest buffers to the engine directly (else always bounce).
    pub(super) direct: bool,
    /// A bad ring was reported once (later ones go to debug, so a guest cannot flood the log).
    pub(super) ring_error_logged: AtomicBool,
    /// Rate limit of the warnings for requests that failed.
    pub(super) io_errors: LogLimit,
    /// The frontend may be served: no chain is popped from any queue before this is set (its
    /// peer is checked against the socket's allow-list first), and never when it stays unset.
    pub(super) authorized: AtomicBool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_limit_lets_one_through_per_interval_and_counts_the_rest() {
        let l = LogLimit::new(Duration::from_millis(200));
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.admit(), Some(2), "two left out since the last one");
        assert_eq!(l.admit(), None);
    }
}
