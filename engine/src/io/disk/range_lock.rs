//! The lock that keeps read-modify-writes from losing bytes (DESIGN invariant 4).
//!
//! A write that reads part of a unit back (read-modify-write of a partial head or tail unit, or
//! the copy-up of a sector-aligned write smaller than the O_DIRECT unit) must not race with
//! another write of that unit: it would write the old bytes it read back over the other
//! write's. Writes of whole units cannot lose anyone's bytes among themselves.
//!
//! So the lock is a reader/writer lock over *stripes* of the disk ([`STRIPE`] bytes), hashed
//! onto [`SHARDS`] independently locked shards (never one lock per disk):
//! * a request holds its read-modify-written stripes *exclusively*, and the stripes of the whole
//!   units it writes *shared*;
//! * a shared hold costs one atomic increment and one load per shard when no read-modify-write
//!   is active there (the common case: an aligned write never takes a mutex and never waits);
//!   only a request that needs read-modify-write takes a shard's mutex.
//!
//! It never blocks a thread: a request that cannot have a shard now is parked in the shard's
//! queue (as a value of type `W`, with its [`Ticket`]) and handed back, *already granted that
//! shard*, by the release that makes it free, so the caller resumes acquiring where it stopped.
//! Shards are acquired in ascending order and waiting happens while holding only lower shards,
//! so there is no deadlock. Exclusive requests waiting for a shard keep new shared holders out
//! (they announce themselves in `excl` first), so a stream of aligned writes cannot starve them.
//!
//! The shared fast path and the exclusive acquisition meet Dekker-style: a shared holder
//! increments `shared` then reads `excl`; an exclusive one increments `excl` then reads
//! `shared` (all SeqCst), so at least one of them sees the other.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Mutex;

use crate::sync::lock;

/// Independently locked shards.
pub(crate) const SHARDS: usize = 64;
/// Bytes of disk per stripe (the granule of exclusion).
pub(crate) const STRIPE: u64 = 256 << 10;

/// What one request holds or wants: shard bitmasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Ticket {
    excl: u64,
    shared: u64,
    held: u64,
}

fn shard_of_stripe(stripe: u64) -> usize {
    (stripe.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS
}

/// The shards of the stripes of `[start, end)` bytes.
fn shards_of(start: u64, end: u64) -> u64 {
    if end <= start {
        return 0;
    }
    let (first, last) = (start / STRIPE, (end - 1) / STRIPE);
    if last - first + 1 >= SHARDS as u64 {
        return u64::MAX;
    }
    (first..=last).fold(0, |m, s| m | 1 << shard_of_stripe(s))
}

impl Ticket {
    /// A request writing `[start, end)` (whole units), of which `rmw` (each `(start, end)`)
    /// are read back: those stripes exclusive, the others shared.
    pub(crate) fn new(start: u64, end: u64, rmw: &[(u64, u64)]) -> Ticket {
        let excl = rmw.iter().fold(0, |m, &(a, b)| m | shards_of(a, b));
        Ticket {
            excl,
            shared: shards_of(start, end) & !excl,
            held: 0,
        }
    }

    /// Whether this ticket (acquired) holds every shard `want` wants exclusively, exclusively.
    pub(crate) fn holds_exclusive(&self, want: &Ticket) -> bool {
        self.excl & self.held & want.excl == want.excl
    }

    /// Whether the request wants anything exclusively (it reads units back).
    #[cfg(test)]
    pub(crate) fn is_exclusive(&self) -> bool {
        self.excl != 0
    }
}

/// The result of [`RangeLocks::acquire`].
pub(crate) enum Acquire<W> {
    /// Every shard is held: go on with the request.
    Got(Ticket, W),
    /// Parked until a release grants it the shard it waits for.
    Parked,
}

#[derive(Debug)]
struct Queue<W> {
    /// An exclusive request holds the shard.
    held: bool,
    /// Exclusive requests waiting (for the holder or for shared holders to drain), in order.
    excl_waiting: VecDeque<(Ticket, W)>,
    /// Shared requests waiting for every exclusive one (holding or waiting) to finish.
    shared_waiting: Vec<(Ticket, W)>,
}

/// One shard, on its own cache line.
#[derive(Debug)]
#[repr(align(64))]
struct Shard<W> {
    /// Shared holders (and shared requests trying the fast path).
    shared: AtomicU32,
    /// Exclusive requests holding or waiting; changed only under `queue`'s mutex.
    excl: AtomicU32,
    queue: Mutex<Queue<W>>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct RangeLocks<W> {
    shards: Box<[Shard<W>]>,
}

impl<W> Default for RangeLocks<W> {
    fn default() -> Self {
        RangeLocks {
            shards: (0..SHARDS)
                .map(|_| Shard {
                    shared: AtomicU32::new(0),
                    excl: AtomicU32::new(0),
                    queue: Mutex::new(Queue {
                        held: false,
                        excl_waiting: VecDeque::new(),
                        shared_waiting: Vec::new(),
                    }),
                })
                .collect(),
        }
    }
}

/// The set bits of `m`, ascending.
fn bits(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let b = m.trailing_zeros() as usize;
            m &= m - 1;
            b
        })
    })
}

impl<W> RangeLocks<W> {
    /// Acquires what `ticket` still lacks, or parks `waiter` on the first shard it cannot have.
    /// Requests handed back by releases this call made (undoing a failed fast path) are put in
    /// `resume`.
    pub(crate) fn acquire(
        &self,
        mut t: Ticket,
        waiter: W,
        resume: &mut Vec<(Ticket, W)>,
    ) -> Acquire<W> {
        if t.excl == 0 && t.held == 0 {
            // Fast path: announce on every shard, then look for exclusive requests.
            for s in bits(t.shared) {
                self.shards[s].shared.fetch_add(1, SeqCst);
            }
            if bits(t.shared).all(|s| self.shards[s].excl.load(SeqCst) == 0) {
                t.held = t.shared;
                return Acquire::Got(t, waiter);
            }
            for s in bits(t.shared) {
                self.release_shared(s, resume);
            }
        }
        for s in bits((t.excl | t.shared) & !t.held) {
            let shard = &self.shards[s];
            let mut q = lock(&shard.queue);
            if t.excl & 1 << s != 0 {
                shard.excl.fetch_add(1, SeqCst);
                if q.held || !q.excl_waiting.is_empty() || shard.shared.load(SeqCst) > 0 {
                    q.excl_waiting.push_back((t, waiter));
                    return Acquire::Parked;
                }
                q.held = true;
            } else {
                if shard.excl.load(SeqCst) > 0 {
                    q.shared_waiting.push((t, waiter));
                    return Acquire::Parked;
                }
                shard.shared.fetch_add(1, SeqCst);
            }
            t.held |= 1 << s;
        }
        Acquire::Got(t, waiter)
    }

    /// Releases everything `ticket` holds; the requests this grants a shard to are put in
    /// `resume` (they go on acquiring from there).
    pub(crate) fn release(&self, t: &Ticket, resume: &mut Vec<(Ticket, W)>) {
        for s in bits(t.held) {
            if t.excl & 1 << s != 0 {
                let shard = &self.shards[s];
                let mut q = lock(&shard.queue);
                q.held = false;
                shard.excl.fetch_sub(1, SeqCst);
                if let Some(next) = Self::grant_exclusive(shard, &mut q, s) {
                    resume.push(next);
                } else if shard.excl.load(SeqCst) == 0 {
                    for (mut w_t, w) in q.shared_waiting.drain(..) {
                        shard.shared.fetch_add(1, SeqCst);
                        w_t.held |= 1 << s;
                        resume.push((w_t, w));
                    }
                }
            } else {
                self.release_shared(s, resume);
            }
        }
    }

    fn release_shared(&self, s: usize, resume: &mut Vec<(Ticket, W)>) {
        let shard = &self.shards[s];
        if shard.shared.fetch_sub(1, SeqCst) == 1 && shard.excl.load(SeqCst) > 0 {
            let mut q = lock(&shard.queue);
            if let Some(next) = Self::grant_exclusive(shard, &mut q, s) {
                resume.push(next);
            }
        }
    }

    /// Under the shard's mutex: hands the shard to the first exclusive waiter if it is free.
    fn grant_exclusive(shard: &Shard<W>, q: &mut Queue<W>, s: usize) -> Option<(Ticket, W)> {
        if q.held || shard.shared.load(SeqCst) != 0 {
            return None;
        }
        let (mut t, w) = q.excl_waiting.pop_front()?;
        q.held = true;
        t.held |= 1 << s;
        Some((t, w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    use std::sync::Arc;

    fn got<W>(a: Acquire<W>) -> (Ticket, W) {
        match a {
            Acquire::Got(t, w) => (t, w),
            Acquire::Parked => panic!("parked"),
        }
    }

    #[test]
    fn tickets_hold_read_back_stripes_exclusively_and_the_rest_shared() {
        let t = Ticket::new(0, 4096, &[]);
        assert!(!t.is_exclusive());
        assert_eq!(t.shared.count_ones(), 1);
        let t = Ticket::new(0, 3 * STRIPE, &[(0, 4096)]);
        assert_eq!(t.excl.count_ones(), 1);
        assert_eq!(t.excl & t.shared, 0, "a shard is held one way");
        assert_eq!((t.excl | t.shared).count_ones(), 3.min(SHARDS as u32));
        let huge = Ticket::new(0, 1 << 40, &[]);
        assert_eq!(huge.shared, u64::MAX);
    }

    #[test]
    fn shared_holders_share_and_an_exclusive_one_waits_for_them_then_keeps_new_ones_out() {
        let l = RangeLocks::default();
        let mut resume = Vec::new();
        let a = got(l.acquire(Ticket::new(0, 4096, &[]), "a", &mut resume)).0;
        let b = got(l.acquire(Ticket::new(0, 4096, &[]), "b", &mut resume)).0;
        // A read-modify-write of the same stripe waits for both.
        assert!(matches!(
            l.acquire(Ticket::new(0, 4096, &[(0, 4096)]), "x", &mut resume),
            Acquire::Parked
        ));
        // A new aligned write now waits behind it.
        assert!(matches!(
            l.acquire(Ticket::new(4096, 8192, &[]), "c", &mut resume),
            Acquire::Parked
        ));
        l.release(&a, &mut resume);
        assert!(resume.is_empty(), "b still holds the stripe");
        l.release(&b, &mut resume);
        let (x, w) = resume
            .pop()
            .expect("x is granted when the last shared holder leaves");
        assert_eq!(w, "x");
        let x = got(l.acquire(x, w, &mut resume)).0;
        assert!(resume.is_empty());
        l.release(&x, &mut resume);
        let (c, w) = resume.pop().expect("c is granted when x is done");
        assert_eq!(w, "c");
        let c = got(l.acquire(c, w, &mut resume)).0;
        l.release(&c, &mut resume);
        assert!(resume.is_empty());
        // Everything is free again.
        let x = got(l.acquire(Ticket::new(0, 4096, &[(0, 4096)]), "x", &mut resume)).0;
        l.release(&x, &mut resume);
    }

    #[test]
    fn exclusive_requests_of_one_stripe_take_turns_in_order() {
        let l = RangeLocks::default();
        let mut resume = Vec::new();
        let t = || Ticket::new(0, 512, &[(0, 512)]);
        let first = got(l.acquire(t(), 0, &mut resume)).0;
        for i in 1..4 {
            assert!(matches!(l.acquire(t(), i, &mut resume), Acquire::Parked));
        }
        let mut held = first;
        for i in 1..4 {
            l.release(&held, &mut resume);
            let (t, w) = resume.pop().expect("granted");
            assert_eq!(w, i, "in arrival order");
            held = got(l.acquire(t, w, &mut resume)).0;
        }
        l.release(&held, &mut resume);
        assert!(resume.is_empty());
    }

    #[test]
    fn no_exclusive_holder_ever_overlaps_another_holder_and_every_request_finishes() {
        // Threads acquire random mixes of shared and exclusive stripes; a granted request is
        // resumed by whichever thread released the shard. Per shard, an exclusive holder is
        // always alone; and if a wakeup were lost, the served count would never reach the end.
        const REQS: u64 = 3000;
        let l = Arc::new(RangeLocks::<u64>::default());
        let inside: Arc<Vec<AtomicI64>> =
            Arc::new((0..SHARDS).map(|_| AtomicI64::new(0)).collect());
        let served = Arc::new(AtomicU64::new(0));
        let queue = Arc::new(Mutex::new(Vec::<(Ticket, u64)>::new()));
        let ticket_of = |id: u64| {
            let start = (id % 5) * STRIPE / 2;
            let end = start + (1 + id % 3) * STRIPE / 3;
            match id % 4 {
                0 => Ticket::new(start, end, &[(start, start + 512)]),
                1 => Ticket::new(start, end, &[(end - 512, end)]),
                _ => Ticket::new(start, end, &[]),
            }
        };
        let threads: Vec<_> = (0..4u64)
            .map(|k| {
                let (l, inside, served, queue) =
                    (l.clone(), inside.clone(), served.clone(), queue.clone());
                std::thread::spawn(move || {
                    let mut next = k * REQS;
                    let end = next + REQS;
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                    loop {
                        assert!(
                            std::time::Instant::now() < deadline,
                            "a request never finished"
                        );
                        let item = lock(&queue).pop();
                        let (t, id) = match item {
                            Some(x) => x,
                            None if next < end => {
                                next += 1;
                                (ticket_of(next - 1), next - 1)
                            }
                            None if served.load(Ordering::SeqCst) == 4 * REQS => break,
                            None => {
                                std::thread::yield_now();
                                continue;
                            }
                        };
                        let mut resume = Vec::new();
                        if let Acquire::Got(t, id) = l.acquire(t, id, &mut resume) {
                            for s in bits(t.excl) {
                                assert_eq!(inside[s].fetch_add(1 << 20, Ordering::SeqCst), 0);
                            }
                            for s in bits(t.shared) {
                                let was = inside[s].fetch_add(1, Ordering::SeqCst);
                                assert!(was < 1 << 20, "shared holder next to an exclusive one");
                            }
                            std::hint::spin_loop();
                            for s in bits(t.excl) {
                                inside[s].fetch_sub(1 << 20, Ordering::SeqCst);
                            }
                            for s in bits(t.shared) {
                                inside[s].fetch_sub(1, Ordering::SeqCst);
                            }
                            l.release(&t, &mut resume);
                            let _ = id;
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        lock(&queue).extend(resume);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(served.load(Ordering::SeqCst), 4 * REQS);
    }
}
