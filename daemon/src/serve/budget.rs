//! The in-flight budget of one connection: at most `max_requests` requests and about
//! `max_bytes` of buffers between "header read" and "reply sent". The reader takes a share before
//! it reads a payload or submits; the writer gives it back after the reply is sent. When the
//! budget is spent the reader blocks, so it stops reading the socket: backpressure instead of
//! unbounded buffering.

use std::sync::{Condvar, Mutex};

/// See the module docs.
#[derive(Debug)]
pub struct Budget {
    /// (requests, bytes, whether the reader waits): the flag spares the writer a futex wake
    /// per reply when nobody waits.
    state: Mutex<(usize, u64, bool)>,
    freed: Condvar,
    max_requests: usize,
    max_bytes: u64,
}

impl Budget {
    /// A budget of `max_requests` (at least 1) and `max_bytes`. One request is always let through
    /// when nothing is in flight, however large.
    pub fn new(max_requests: usize, max_bytes: u64) -> Self {
        Budget {
            state: Mutex::new((0, 0, false)),
            freed: Condvar::new(),
            max_requests: max_requests.max(1),
            max_bytes,
        }
    }

    /// Blocks until one more request of `bytes` fits, then takes it.
    pub fn acquire(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.0 >= self.max_requests || (s.0 > 0 && s.1 + bytes > self.max_bytes) {
            s.2 = true;
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.0 += 1;
        s.1 += bytes;
    }

    /// Gives back a request of `bytes`.
    pub fn release(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = s.0.saturating_sub(1);
        s.1 = s.1.saturating_sub(bytes);
        let waiting = std::mem::replace(&mut s.2, false);
        drop(s);
        if waiting {
            self.freed.notify_all();
        }
    }

    /// Requests in flight now.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Whether an acquirer is parked waiting for a release. The flag is set under the lock right
    /// before the wait, which releases the lock atomically: once this reads true, the acquirer
    /// is inside the wait (or re-checking after a spurious wake-up, and about to wait again).
    #[cfg(test)]
    pub fn has_waiter(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).2
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    /// Spins (bounded) until an acquirer of `b` is parked in its wait.
    fn wait_parked(b: &Budget) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.has_waiter() {
            assert!(Instant::now() < deadline, "the acquirer never blocked");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts `acquire(bytes)` on a thread; the receiver gets a message once it returned.
    fn acquire_on_thread(
        b: &Arc<Budget>,
        bytes: u64,
    ) -> (std::sync::mpsc::Receiver<()>, std::thread::JoinHandle<()>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            b2.acquire(bytes);
            tx.send(()).unwrap();
        });
        (rx, t)
    }

    #[test]
    fn blocks_when_full_and_resumes_on_release() {
        // Full by request count.
        let b = Arc::new(Budget::new(2, 1 << 20));
        b.acquire(10);
        b.acquire(10);
        let (rx, t) = acquire_on_thread(&b, 10);
        wait_parked(&b);
        // Parked, and it stays parked while nothing is released.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(b.in_flight(), 2);
        b.release(10);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a release did not wake the acquirer");
        t.join().unwrap();
        assert_eq!(b.in_flight(), 2);

        // Full by bytes: 60 + 60 > 100 waits even though requests are left.
        let b = Arc::new(Budget::new(8, 100));
        b.acquire(60);
        let (rx, t) = acquire_on_thread(&b, 60);
        wait_parked(&b);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(b.in_flight(), 1);
        b.release(60);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a release did not wake the acquirer");
        t.join().unwrap();
        assert_eq!(b.in_flight(), 1);
    }

    #[test]
    fn one_oversized_request_passes_when_idle() {
        let b = Budget::new(4, 100);
        b.acquire(1000);
        assert_eq!(b.in_flight(), 1);
        b.release(1000);
        assert_eq!(b.in_flight(), 0);
    }
}
