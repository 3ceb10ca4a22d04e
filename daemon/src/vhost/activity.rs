//! Which queues have chains popped and not yet answered, and the switch that stops them taking
//! new ones: what lets a frontend's `GET_VRING_BASE` and the daemon's shutdown wait for requests
//! in flight instead of failing them.
//!
//! Counting is per chain: a [`Ticket`] is taken before a chain is popped and dropped after its
//! used entry was added. The counts are atomics on the request path; the mutex and condvar are
//! touched only when a count drops to zero (to wake a waiter).

use addcow_engine::sync::{lock, wait_timeout};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Shared by every connection's queues (a queue index of an old connection still finishing its
/// chains and of the new one count together, which only makes a wait longer).
pub struct Activity {
    /// No new chain may be popped (the daemon is stopping).
    stopping: AtomicBool,
    /// Per queue index: chains popped and not answered.
    busy: Vec<AtomicUsize>,
    lock: Mutex<()>,
    changed: Condvar,
}

/// One popped chain of one queue; dropping it (after its used entry was added) marks it
/// answered.
pub struct Ticket {
    activity: Arc<Activity>,
    queue: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.activity.finish(self.queue);
    }
}

impl Activity {
    /// For `queues` queues, none busy.
    pub fn new(queues: usize) -> Activity {
        Activity {
            stopping: AtomicBool::new(false),
            busy: (0..queues).map(|_| AtomicUsize::new(0)).collect(),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }

    /// A ticket for one chain of `queue`, to be taken before the chain is popped; `None` once
    /// [`Activity::stop`] was called (the chains stay in the ring, unanswered, for the next
    /// daemon) or for a queue index out of range.
    pub fn begin(self: &Arc<Self>, queue: usize) -> Option<Ticket> {
        let busy = self.busy.get(queue)?;
        // SeqCst pairs this increment with stop's store of `stopping`: either stop sees the
        // chain counted, or this sees `stopping`.
        busy.fetch_add(1, Ordering::SeqCst);
        if self.stopping.load(Ordering::SeqCst) {
            self.finish(queue);
            return None;
        }
        Some(Ticket {
            activity: Arc::clone(self),
            queue,
        })
    }

    fn finish(&self, queue: usize) {
        let Some(busy) = self.busy.get(queue) else {
            return;
        };
        if busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Taking the lock orders this wake-up after a waiter's check (made under the lock).
            let _g = lock(&self.lock);
            self.changed.notify_all();
        }
    }

    /// Whether [`Activity::stop`] was called.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Chains of `queue` popped and not answered.
    pub fn in_flight(&self, queue: usize) -> usize {
        self.busy.get(queue).map_or(0, |b| b.load(Ordering::SeqCst))
    }

    /// Waits until every chain popped from `queue` was answered (or `deadline`); false on
    /// timeout.
    pub fn wait_queue_idle(&self, queue: usize, deadline: Instant) -> bool {
        self.wait(deadline, |a| a.in_flight(queue) == 0)
    }

    /// Waits until no queue has a chain popped and not answered (or `deadline`), without
    /// stopping anything; false on timeout.
    pub fn wait_idle(&self, deadline: Instant) -> bool {
        self.wait(deadline, |a| {
            a.busy.iter().all(|b| b.load(Ordering::SeqCst) == 0)
        })
    }

    /// Chains popped and not answered, over every queue.
    pub fn total_in_flight(&self) -> usize {
        self.busy.iter().map(|b| b.load(Ordering::SeqCst)).sum()
    }

    /// Lets no new chain be popped, then waits until every popped one was answered (or
    /// `deadline`); false on timeout.
    pub fn stop(&self, deadline: Instant) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        self.wait_idle(deadline)
    }

    fn wait(&self, deadline: Instant, done: impl Fn(&Activity) -> bool) -> bool {
        let mut g = lock(&self.lock);
        loop {
            if done(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = wait_timeout(&self.changed, g, deadline - now).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stop_waits_for_chains_and_refuses_new_ones() {
        let a = Arc::new(Activity::new(2));
        let t = a.begin(1).expect("not stopping");
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(!a.wait_queue_idle(1, soon), "queue 1 is busy");
        assert!(a.wait_queue_idle(0, soon), "queue 0 is idle");
        assert!(!a.stop(Instant::now() + Duration::from_millis(50)));
        assert!(a.begin(0).is_none(), "no new chain once stopping");
        assert_eq!(a.in_flight(0), 0, "a refused ticket is not counted");
        let waiter = {
            let a = Arc::clone(&a);
            std::thread::spawn(move || a.stop(Instant::now() + Duration::from_secs(5)))
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(t);
        assert!(waiter.join().unwrap(), "the last answer wakes the waiter");
    }
}
