//! Per-sector range lock for writes (DESIGN invariant 4).
//!
//! Writes that touch overlapping sector ranges are serialized; writes to disjoint ranges never
//! wait for each other. The lock never blocks a thread: a request that finds its range taken is
//! parked *inside* the lock (as a value of type `W`) and handed back by the [`RangeLock::unlock`]
//! that releases an overlapping range, so the caller can resubmit it. Parking and releasing
//! happen under one mutex, so no wakeup is lost.

use std::sync::Mutex;

use super::lock;

/// Held sector ranges `[start, end)` plus the requests waiting for them.
#[derive(Debug)]
pub(crate) struct RangeLock<W> {
    inner: Mutex<Inner<W>>,
}

#[derive(Debug)]
struct Inner<W> {
    held: Vec<(u64, u64)>,
    waiting: Vec<((u64, u64), W)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl<W> Default for RangeLock<W> {
    fn default() -> Self {
        RangeLock {
            inner: Mutex::new(Inner {
                held: Vec::new(),
                waiting: Vec::new(),
            }),
        }
    }
}

impl<W> RangeLock<W> {
    /// Takes `[start, end)` and returns true if no held range overlaps it. Otherwise moves the
    /// waiter out of `waiter` into the lock, to be given back by the `unlock` of an overlapping
    /// range, and returns false.
    pub(crate) fn lock_or_park(&self, range: (u64, u64), waiter: &mut Option<W>) -> bool {
        let mut inner = lock(&self.inner);
        if inner.held.iter().any(|&h| overlaps(h, range)) {
            if let Some(w) = waiter.take() {
                inner.waiting.push((range, w));
            }
            return false;
        }
        inner.held.push(range);
        true
    }

    /// Releases `[start, end)` (which must be held) and returns the parked requests whose
    /// ranges overlap it, for resubmission.
    pub(crate) fn unlock(&self, range: (u64, u64)) -> Vec<W> {
        let mut inner = lock(&self.inner);
        if let Some(i) = inner.held.iter().position(|&h| h == range) {
            inner.held.swap_remove(i);
        }
        let mut woken = Vec::new();
        let mut i = 0;
        while i < inner.waiting.len() {
            if overlaps(inner.waiting[i].0, range) {
                woken.push(inner.waiting.remove(i).1);
            } else {
                i += 1;
            }
        }
        woken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn disjoint_ranges_do_not_wait_overlapping_ones_do() {
        let l = RangeLock::default();
        assert!(l.lock_or_park((0, 8), &mut Some(0)));
        assert!(l.lock_or_park((8, 16), &mut Some(1)));
        let mut w = Some(2);
        assert!(!l.lock_or_park((7, 9), &mut w));
        assert_eq!(w, None, "parked");
        assert!(l.lock_or_park((20, 21), &mut Some(3)));
        assert_eq!(l.unlock((20, 21)), Vec::<i32>::new());
        // Releasing (0, 8) wakes the waiter even though (8, 16) still blocks it; it re-parks.
        assert_eq!(l.unlock((0, 8)), vec![2]);
        assert!(!l.lock_or_park((7, 9), &mut Some(2)));
        assert_eq!(l.unlock((8, 16)), vec![2]);
        let mut w = Some(2);
        assert!(l.lock_or_park((7, 9), &mut w));
        assert_eq!(w, Some(2), "kept when the lock is taken");
    }

    #[test]
    fn concurrent_lockers_never_overlap() {
        let l = Arc::new(RangeLock::<()>::default());
        let inside = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (l, inside) = (Arc::clone(&l), Arc::clone(&inside));
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        while !l.lock_or_park((3, 5), &mut None) {
                            std::thread::yield_now();
                        }
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                        l.unlock((3, 5));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
    }
}
