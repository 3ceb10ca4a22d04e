//! Which queues are serving a batch right now, and the switch that stops them taking new ones:
//! what lets a frontend's `GET_VRING_BASE` and the daemon's shutdown wait for requests in
//! flight instead of failing them.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Shared by every connection's queue workers (a queue index of an old connection still
/// finishing its batch and of the new one count together, which only makes a wait longer).
pub struct Activity {
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    /// No new batch may start (the daemon is stopping).
    stopping: bool,
    /// Per queue index: workers inside a batch.
    busy: Vec<usize>,
}

/// A batch being served on one queue; dropping it marks the queue idle again.
pub struct Batch<'a> {
    activity: &'a Activity,
    queue: usize,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        let mut s = self.activity.lock();
        if let Some(b) = s.busy.get_mut(self.queue) {
            *b = b.saturating_sub(1);
        }
        self.activity.changed.notify_all();
    }
}

impl Activity {
    /// For `queues` queues, none busy.
    pub fn new(queues: usize) -> Activity {
        Activity {
            state: Mutex::new(State {
                stopping: false,
                busy: vec![0; queues],
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `queue` busy for the returned batch; `None` once [`Activity::stop`] was called
    /// (the chains stay in the ring, unanswered, for the next daemon).
    pub fn begin(&self, queue: usize) -> Option<Batch<'_>> {
        let mut s = self.lock();
        if s.stopping || queue >= s.busy.len() {
            return None;
        }
        s.busy[queue] += 1;
        Some(Batch {
            activity: self,
            queue,
        })
    }

    /// Whether [`Activity::stop`] was called.
    pub fn stopping(&self) -> bool {
        self.lock().stopping
    }

    /// Waits until no batch of `queue` is being served (or `deadline`); false on timeout.
    pub fn wait_queue_idle(&self, queue: usize, deadline: Instant) -> bool {
        self.wait(deadline, |s| s.busy.get(queue).copied().unwrap_or(0) == 0)
    }

    /// Lets no new batch start, then waits until none is being served (or `deadline`); false
    /// on timeout.
    pub fn stop(&self, deadline: Instant) -> bool {
        self.lock().stopping = true;
        self.wait(deadline, |s| s.busy.iter().all(|&b| b == 0))
    }

    fn wait(&self, deadline: Instant, done: impl Fn(&State) -> bool) -> bool {
        let mut s = self.lock();
        loop {
            if done(&s) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stop_waits_for_batches_and_refuses_new_ones() {
        let a = Activity::new(2);
        let b = a.begin(1).expect("not stopping");
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(!a.wait_queue_idle(1, soon), "queue 1 is busy");
        assert!(a.wait_queue_idle(0, soon), "queue 0 is idle");
        assert!(!a.stop(Instant::now() + Duration::from_millis(50)));
        assert!(a.begin(0).is_none(), "no new batch once stopping");
        drop(b);
        assert!(a.stop(Instant::now() + Duration::from_secs(5)));
    }
}
