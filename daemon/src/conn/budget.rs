//! In-flight limits: per connection at most `max_requests` requests between "header read" and
//! "reply sent", and daemon-wide at most [`Pool::cap`] bytes of request buffers (WRITE payloads
//! until the engine wrote them, READ data until it was sent, block-status replies until sent).
//!
//! The reader takes a share before it reads a payload or submits; it is given back when the
//! reply is sent (a WRITE's bytes as soon as the engine is done with its buffer). When a share
//! cannot be had the reader blocks, so it stops reading its socket: backpressure instead of
//! unbounded buffering.
//!
//! **Fair sharing of the pool.** With `n` connections in transmission a connection may hold
//! about `cap / n` bytes: one that holds more waits (however much of the pool is free) until its
//! own replies have gone out; one that holds nothing may always take one request, however large,
//! as soon as the pool has room for it. Connections that do wait for room are served in the
//! order they asked (first come, first served), so a new client waits behind at most one request
//! of each other connection, never behind a client that keeps pipelining.

use addcow_engine::sync::{lock, wait};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Smallest daemon-wide buffer budget: two requests of the largest size pass at once.
pub const MIN_POOL: u64 = 64 << 20;

/// The daemon-wide buffer budget shared by every connection. See the module docs.
#[derive(Debug)]
pub struct Pool {
    cap: u64,
    state: Mutex<PoolState>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Bytes held by every connection together.
    used: u64,
    /// Highest `used` seen (for tests and reports).
    peak: u64,
    /// Connections sharing the pool.
    members: usize,
    /// Next first-come-first-served number handed to a waiter.
    next: u64,
    /// The number whose turn it is.
    serving: u64,
    /// Whether anyone waits (spares the release path a futex wake when nobody does).
    waiters: usize,
    /// Non-blocking members ([`Share`]) waiting for room, first come first served: their ids
    /// and how to wake them.
    queued: std::collections::VecDeque<(u64, Waker)>,
    /// Next [`Share`] id.
    next_share: u64,
}

/// Wakes a non-blocking member of the pool (writes its eventfd) when bytes come back.
#[derive(Clone)]
pub struct Waker(pub Arc<dyn Fn() + Send + Sync>);

impl Waker {
    /// Calls it.
    pub fn wake(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Waker")
    }
}

impl Pool {
    /// A pool of `cap` bytes (at least [`MIN_POOL`]).
    pub fn new(cap: u64) -> Arc<Pool> {
        Arc::new(Pool {
            cap: cap.max(MIN_POOL),
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
        })
    }

    /// The default size: an eighth of the machine's memory, between [`MIN_POOL`] and 16 GiB.
    pub fn default_cap() -> u64 {
        let ram = total_ram().unwrap_or(8 << 30);
        (ram / 8).clamp(MIN_POOL, 16 << 30)
    }

    /// The budget in bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Most bytes ever held at once.
    pub fn peak(&self) -> u64 {
        self.lock().peak
    }

    fn join(&self) {
        self.lock().members += 1;
        self.freed.notify_all();
    }

    fn leave(&self) {
        let mut s = self.lock();
        s.members = s.members.saturating_sub(1);
        let wake = s.waiters > 0;
        let queued = Self::wakers(&s);
        drop(s);
        if wake {
            // A smaller membership raises everyone's share.
            self.freed.notify_all();
        }
        queued.iter().for_each(Waker::wake);
    }

    fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut s = self.lock();
        s.used = s.used.saturating_sub(bytes);
        let wake = s.waiters > 0;
        let queued = Self::wakers(&s);
        drop(s);
        if wake {
            self.freed.notify_all();
        }
        queued.iter().for_each(Waker::wake);
    }

    /// The wakers of the queued non-blocking members (called outside the lock).
    fn wakers(s: &PoolState) -> Vec<Waker> {
        s.queued.iter().map(|(_, w)| w.clone()).collect()
    }
}

/// The machine's memory in bytes.
fn total_ram() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The in-flight budget of one connection: its request count and its holding of the [`Pool`].
#[derive(Debug)]
pub struct Budget {
    /// (requests, bytes held, whether the reader waits): the flag spares the writer a futex
    /// wake per reply when nobody waits.
    state: Mutex<(usize, u64, bool)>,
    freed: Condvar,
    max_requests: usize,
    pool: Arc<Pool>,
}

impl Budget {
    /// A budget of `max_requests` (at least 1) drawing bytes from `pool`; the connection is one
    /// of the pool's members until the budget is dropped.
    pub fn new(max_requests: usize, pool: Arc<Pool>) -> Self {
        pool.join();
        Budget {
            state: Mutex::new((0, 0, false)),
            freed: Condvar::new(),
            max_requests: max_requests.max(1),
            pool,
        }
    }

    fn lock(&self) -> MutexGuard<'_, (usize, u64, bool)> {
        lock(&self.state)
    }

    /// Blocks until one more request of `bytes` fits, then takes it.
    pub fn acquire(&self, bytes: u64) {
        let mut s = self.lock();
        while s.0 >= self.max_requests {
            s.2 = true;
            s = wait(&self.freed, s);
        }
        s.0 += 1;
        drop(s);
        if bytes > 0 {
            self.pool.acquire_for(self, bytes);
            self.lock().1 += bytes;
        }
    }

    /// Bytes this connection holds now.
    fn held(&self) -> u64 {
        self.lock().1
    }

    /// Gives back `bytes` of buffer early (the request itself is still in flight).
    pub fn release_bytes(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut s = self.lock();
        s.1 = s.1.saturating_sub(bytes);
        drop(s);
        self.pool.release(bytes);
    }

    /// Gives back a request and the `bytes` it still holds.
    pub fn release(&self, bytes: u64) {
        let mut s = self.lock();
        s.0 = s.0.saturating_sub(1);
        s.1 = s.1.saturating_sub(bytes);
        let waiting = std::mem::replace(&mut s.2, false);
        drop(s);
        self.pool.release(bytes);
        if waiting {
            self.freed.notify_all();
        }
    }

    /// Requests in flight now.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.lock().0
    }

    /// Whether an acquirer is parked waiting for a release of the request count. The flag is
    /// set under the lock right before the wait, which releases the lock atomically: once this
    /// reads true, the acquirer is inside the wait (or re-checking after a spurious wake-up,
    /// and about to wait again).
    #[cfg(test)]
    pub fn has_waiter(&self) -> bool {
        self.lock().2
    }
}

/// A connection's holding of the [`Pool`] when it must never block (served on an engine core):
/// [`Share::try_take`] either takes the bytes now or queues the connection, first come first
/// served, and its [`Waker`] is called whenever bytes come back so it can try again. Same
/// fairness rules as a blocking [`Budget`]: a connection over its own share waits for its own
/// give-backs, outside the queue; only a want of room in the pool queues it. The connection is
/// a member of the pool until the share is dropped, which gives back every byte it still holds.
pub struct Share {
    pool: Arc<Pool>,
    id: u64,
    held: u64,
    wake: Waker,
}

impl Share {
    /// Joins `pool`; `wake` is called (from any thread) when a queued try may succeed.
    pub fn new(pool: Arc<Pool>, wake: Waker) -> Share {
        pool.join();
        let id = {
            let mut s = pool.lock();
            s.next_share += 1;
            s.next_share
        };
        Share {
            pool,
            id,
            held: 0,
            wake,
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Takes `bytes` if this connection's share and the pool allow it now and nobody queued
    /// before it; otherwise queues it (once) and returns false.
    pub fn try_take(&mut self, bytes: u64) -> bool {
        if bytes == 0 {
            return true;
        }
        let pool = &self.pool;
        let mut s = pool.lock();
        let share = pool.cap / s.members.max(1) as u64;
        let within_share = self.held == 0 || self.held + bytes <= share;
        if !within_share {
            // Over its own share it waits for its own replies to go out (every give-back makes
            // its connection try again), outside the queue: queued, it would hold back every
            // member within its share behind a client that may never read its replies.
            let was_first = s.queued.front().is_some_and(|(id, _)| *id == self.id);
            s.queued.retain(|(id, _)| *id != self.id);
            let next = was_first.then(|| Self::first_waker(&s)).flatten();
            drop(s);
            if let Some(w) = next {
                w.wake();
            }
            return false;
        }
        let my_turn = s.queued.front().map_or(true, |(id, _)| *id == self.id);
        // Blocking members waiting for their turn go first.
        let no_blocked = s.serving == s.next;
        if within_share && my_turn && no_blocked && s.used + bytes <= pool.cap {
            if !s.queued.is_empty() {
                s.queued.pop_front();
            }
            s.used += bytes;
            s.peak = s.peak.max(s.used);
            self.held += bytes;
            let next = Self::first_waker(&s);
            drop(s);
            // The next in line may fit too.
            if let Some(w) = next {
                w.wake();
            }
            return true;
        }
        if !s.queued.iter().any(|(id, _)| *id == self.id) {
            s.queued.push_back((self.id, self.wake.clone()));
        }
        false
    }

    fn first_waker(s: &PoolState) -> Option<Waker> {
        s.queued.front().map(|(_, w)| w.clone())
    }

    /// Gives `bytes` back (clamped to what is held).
    pub fn give_back(&mut self, bytes: u64) {
        let bytes = bytes.min(self.held);
        self.held -= bytes;
        self.pool.release(bytes);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut s = self.pool.lock();
        s.queued.retain(|(id, _)| *id != self.id);
        drop(s);
        self.pool.release(self.held);
        self.pool.leave();
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.pool.leave();
    }
}

impl Pool {
    /// [`Pool::acquire`] for `member`, whose holding is read afresh at every check.
    fn acquire_for(&self, member: &Budget, bytes: u64) {
        let mut s = self.lock();
        loop {
            let share = self.cap / s.members.max(1) as u64;
            let held = member.held();
            if held == 0 || held + bytes <= share {
                break;
            }
            s.waiters += 1;
            s = wait(&self.freed, s);
            s.waiters -= 1;
        }
        let me = s.next;
        s.next += 1;
        while s.serving != me || s.used + bytes > self.cap {
            s.waiters += 1;
            s = wait(&self.freed, s);
            s.waiters -= 1;
        }
        s.serving += 1;
        s.used += bytes;
        s.peak = s.peak.max(s.used);
        let wake = s.waiters > 0;
        drop(s);
        if wake {
            self.freed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// Spins (bounded) until `cond` holds.
    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn pool_waiters(p: &Pool) -> usize {
        p.lock().waiters
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
    fn request_count_blocks_when_full_and_resumes_on_release() {
        let b = Arc::new(Budget::new(2, Pool::new(MIN_POOL)));
        b.acquire(10);
        b.acquire(10);
        let (rx, t) = acquire_on_thread(&b, 10);
        wait_for("the acquirer parks", || b.has_waiter());
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(b.in_flight(), 2);
        b.release(10);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a release did not wake the acquirer");
        t.join().unwrap();
        assert_eq!(b.in_flight(), 2);
    }

    /// The pool never lends more than its cap, whoever asks; a member with nothing held gets a
    /// request larger than its share as soon as there is room.
    #[test]
    fn the_pool_cap_holds_across_connections() {
        let pool = Pool::new(64 * MIB);
        let a = Arc::new(Budget::new(128, pool.clone()));
        let b = Arc::new(Budget::new(128, pool.clone()));
        a.acquire(32 * MIB);
        b.acquire(32 * MIB);
        assert_eq!(pool.used(), 64 * MIB);
        let c = Arc::new(Budget::new(128, pool.clone()));
        let (rx, t) = acquire_on_thread(&c, 32 * MIB);
        wait_for("c waits for room", || pool_waiters(&pool) == 1);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // Early release of a WRITE's buffer frees room while its request is still in flight.
        a.release_bytes(32 * MIB);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("room did not wake the waiter");
        t.join().unwrap();
        assert_eq!(pool.used(), 64 * MIB);
        assert_eq!(pool.peak(), 64 * MIB, "never above the cap");
        a.release(0);
        b.release(32 * MIB);
        c.release(32 * MIB);
        assert_eq!(pool.used(), 0);
    }

    /// A connection over its fair share waits even though the pool has room, until its own
    /// replies go out; a new connection meanwhile is served at once.
    #[test]
    fn a_greedy_connection_is_held_to_its_share() {
        let pool = Pool::new(64 * MIB);
        let greedy = Arc::new(Budget::new(128, pool.clone()));
        let other = Arc::new(Budget::new(128, pool.clone()));
        // Two members: a share is 32 MiB.
        greedy.acquire(30 * MIB);
        let (rx, t) = acquire_on_thread(&greedy, 4 * MIB);
        wait_for("greedy waits for its share", || pool_waiters(&pool) == 1);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        // The other connection is not stuck behind it.
        other.acquire(16 * MIB);
        assert_eq!(pool.used(), 46 * MIB);
        // Greedy's own reply goes out: its holding drops and it proceeds.
        greedy.release(30 * MIB);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("greedy never got its share back");
        t.join().unwrap();
        // Leaving the pool raises the share of those who stay.
        drop(other);
        assert_eq!(pool.lock().members, 1);
    }

    /// Waiters for room are served first come, first served: a connection that keeps asking
    /// cannot overtake one that asked before it.
    #[test]
    fn waiters_are_served_in_order() {
        let pool = Pool::new(64 * MIB);
        let hog = Arc::new(Budget::new(128, pool.clone()));
        hog.acquire(64 * MIB);
        let first = Arc::new(Budget::new(128, pool.clone()));
        let second = Arc::new(Budget::new(128, pool.clone()));
        let (rx1, t1) = acquire_on_thread(&first, 40 * MIB);
        wait_for("first waits", || pool_waiters(&pool) == 1);
        let (rx2, t2) = acquire_on_thread(&second, 8 * MIB);
        wait_for("second waits", || pool_waiters(&pool) == 2);
        // Room for the second (8 MiB) but not the first (40 MiB): nobody passes the first.
        hog.release_bytes(16 * MIB);
        assert!(rx2.recv_timeout(Duration::from_millis(200)).is_err());
        hog.release_bytes(48 * MIB);
        rx1.recv_timeout(Duration::from_secs(10)).unwrap();
        rx2.recv_timeout(Duration::from_secs(10)).unwrap();
        t1.join().unwrap();
        t2.join().unwrap();
        assert_eq!(pool.used(), 48 * MIB);
    }

    #[test]
    fn default_cap_is_a_fraction_of_memory() {
        let cap = Pool::default_cap();
        assert!(cap >= MIN_POOL);
        assert!(cap <= total_ram().unwrap() / 8 + MIN_POOL);
    }

    fn counting_share(pool: &Arc<Pool>) -> (Share, Arc<std::sync::atomic::AtomicU64>) {
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n2 = n.clone();
        let wake = Waker(Arc::new(move || {
            n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        (Share::new(pool.clone(), wake), n)
    }

    /// A non-blocking share never waits: a take that does not fit queues it, first come first
    /// served (a small take that would fit does not overtake a queued one), and it is woken
    /// when bytes come back; dropping a share gives back what it holds.
    #[test]
    fn shares_queue_first_come_first_served_and_are_woken() {
        let pool = Pool::new(64 * MIB);
        let (mut a, _) = counting_share(&pool);
        let (mut b, b_woken) = counting_share(&pool);
        let (mut c, c_woken) = counting_share(&pool);
        assert!(a.try_take(40 * MIB));
        assert!(!b.try_take(40 * MIB), "over the pool's room");
        assert!(
            !c.try_take(MIB),
            "a small take overtook a connection queued before it"
        );
        assert_eq!(b_woken.load(std::sync::atomic::Ordering::SeqCst), 0);
        a.give_back(40 * MIB);
        assert!(
            b_woken.load(std::sync::atomic::Ordering::SeqCst) > 0,
            "b not woken"
        );
        assert!(
            c_woken.load(std::sync::atomic::Ordering::SeqCst) > 0,
            "c not woken"
        );
        assert!(b.try_take(40 * MIB));
        assert!(c.try_take(MIB), "c is first in line now");
        assert_eq!(pool.used(), 41 * MIB);
        drop(b);
        assert_eq!(pool.used(), MIB);
        // Over its share (64 MiB / 2 members) a share waits even with room in the pool.
        assert!(c.try_take(20 * MIB));
        assert!(!c.try_take(20 * MIB), "past its share");
        drop(c);
        assert_eq!(pool.used(), 0);
    }

    /// A connection over its own share (its client does not read its replies) must not stand
    /// in the queue: members within their share take bytes past it while the pool has room.
    #[test]
    fn a_share_over_its_own_share_does_not_hold_back_the_others() {
        let pool = Pool::new(64 * MIB);
        let (mut a, _) = counting_share(&pool);
        let (mut b, _) = counting_share(&pool);
        assert!(a.try_take(32 * MIB));
        assert!(!a.try_take(MIB), "past its share of 32 MiB");
        assert!(
            b.try_take(MIB),
            "b is within its share and the pool has room, but waits behind a"
        );
        a.give_back(32 * MIB);
        assert!(a.try_take(MIB), "a takes again once its replies went out");
    }
}
