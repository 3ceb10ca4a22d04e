//! The fair-share accounting of one core: requests (and their bytes) it admitted and that are
//! not answered yet. A [`Charge`] travels with each admitted request and gives its share back
//! when the request is answered, on whichever thread that happens.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;

/// What one core has admitted and not yet seen answered.
pub struct CoreLoad {
    requests: AtomicUsize,
    bytes: AtomicU64,
    /// The core stopped admitting for lack of room: the next answer wakes it (unless it is
    /// answered on the core itself, which looks again after its completions anyway).
    blocked: AtomicBool,
    /// The core's thread.
    thread: ThreadId,
    wake: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for CoreLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreLoad")
            .field("requests", &self.requests)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl CoreLoad {
    /// The load of the core running on the calling thread; `wake` wakes that core.
    pub fn new(wake: Box<dyn Fn() + Send + Sync>) -> CoreLoad {
        CoreLoad {
            requests: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            thread: std::thread::current().id(),
            wake,
        }
    }

    /// Requests and bytes admitted and not answered.
    pub fn get(&self) -> (usize, u64) {
        (
            self.requests.load(Ordering::SeqCst),
            self.bytes.load(Ordering::SeqCst),
        )
    }

    /// Marks the core as waiting for room (before it looks at [`CoreLoad::get`] once more, so
    /// an answer in between either is seen by that look or wakes the core).
    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::SeqCst);
    }

    /// Counts a request of `bytes` until the returned charge is dropped.
    pub fn charge(self: &Arc<Self>, bytes: u64) -> Charge {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        Charge {
            load: Arc::clone(self),
            bytes,
        }
    }
}

/// One admitted request's share of its core's load; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    load: Arc<CoreLoad>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let l = &self.load;
        l.requests.fetch_sub(1, Ordering::SeqCst);
        l.bytes.fetch_sub(self.bytes, Ordering::SeqCst);
        if l.blocked.load(Ordering::SeqCst)
            && std::thread::current().id() != l.thread
            && l.blocked.swap(false, Ordering::SeqCst)
        {
            (l.wake)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_counts_until_dropped_and_wakes_a_blocked_core_from_another_thread() {
        let woken = Arc::new(AtomicUsize::new(0));
        let w = Arc::clone(&woken);
        let load = Arc::new(CoreLoad::new(Box::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        })));
        let a = load.charge(4096);
        let b = load.charge(100);
        assert_eq!(load.get(), (2, 4196));
        drop(a);
        assert_eq!(load.get(), (1, 100));
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        load.set_blocked(true);
        // Dropped on the core's own thread: no wakeup (the core looks again by itself).
        let c = load.charge(1);
        drop(c);
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        std::thread::spawn(move || drop(b)).join().unwrap();
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        assert_eq!(load.get(), (0, 0));
    }
}
