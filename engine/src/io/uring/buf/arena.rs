//! The registered buffer arena: one aligned allocation, registered with every core's ring (one
//! fixed buffer per slot; the buffer index is the slot's global number), cut into one *pool* per
//! core, each with size classes of 4 KiB, 16 KiB, 64 KiB, 256 KiB and 1 MiB.
//!
//! No lock is taken per buffer:
//! * A core thread allocates from and frees into its own pool through a thread-local free list
//!   (plain `Vec`s, no atomics), last freed first used.
//! * Every class of every pool also has a lock-free queue of returned slots (a bounded
//!   `crossbeam-channel`, one slot per message). A buffer dropped on any other thread goes back to
//!   the queue of the pool it came from; its core takes such slots back into its local list in
//!   batches, when that list runs dry. Other threads (say a connection reading a WRITE payload)
//!   allocate from these queues too, and a core keeps no more than half of a class in its local
//!   list, so they find slots.
//! * Slots never used yet are handed out last, from a cursor (one atomic add), so the slots in
//!   use stay few and warm (in the CPU caches, and the kernel's records of the registered
//!   buffers) instead of rotating through the whole arena.
//!
//! Invariants: a slot is in exactly one place at a time (never used yet, a local list, a queue,
//! or an `IoBuf`); the memory lives as long as the arena or any buffer (each holds an `Arc` of
//! its pool, which holds the memory).

use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::{IoBuf, Origin, BUF_ALIGN};

/// Size classes and the share (in sixteenths) of a pool's bytes each gets.
const CLASSES: [(usize, usize); 5] = [
    (4 << 10, 1),
    (16 << 10, 1),
    (64 << 10, 2),
    (256 << 10, 4),
    (1 << 20, 8),
];
/// io_uring accepts at most 16384 registered buffers.
const MAX_SLOTS: usize = 16384;
/// Slots a core takes from its queue at once when its local list is empty.
const BATCH: usize = 32;

static NEXT_ARENA_ID: AtomicU64 = AtomicU64::new(1);

/// The arena's memory; freed when the arena and every buffer are gone.
struct Memory {
    base: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the memory is only handed out slot by slot (each slot to one IoBuf at a time); the base
// pointer itself is never dereferenced.
unsafe impl Send for Memory {}
// SAFETY: see Send.
unsafe impl Sync for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: base was allocated with exactly this layout; every IoBuf holding a slot holds an
        // Arc of its pool, which holds this memory, so none is alive when this runs.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

/// One size class of one pool.
struct Class {
    size: usize,
    /// Global slot number of its first slot.
    first: u32,
    /// Byte offset of its first slot from the arena's base.
    offset: usize,
    count: u32,
    /// Slots `first + fresh ..` were never handed out.
    fresh: AtomicU32,
    /// Returned slots any thread may take; a slot freed off its core comes back here.
    free_tx: Sender<u32>,
    free_rx: Receiver<u32>,
}

impl Class {
    /// A slot never handed out before, if any is left.
    fn take_fresh(&self) -> Option<u32> {
        if self.fresh.load(Ordering::Relaxed) >= self.count {
            return None;
        }
        let i = self.fresh.fetch_add(1, Ordering::Relaxed);
        (i < self.count).then_some(self.first + i)
    }

    /// A returned slot, else a fresh one.
    fn take_any(&self) -> Option<u32> {
        self.free_rx.try_recv().ok().or_else(|| self.take_fresh())
    }
}

/// One core's share of the arena.
pub(crate) struct Pool {
    arena_id: u64,
    mem: Arc<Memory>,
    classes: Vec<Class>,
}

/// The free lists of the pool owned by the current (core) thread.
struct Local {
    pool: Arc<Pool>,
    free: Vec<Vec<u32>>,
}

impl Drop for Local {
    fn drop(&mut self) {
        // The core thread ends: its slots go back to the shared queues.
        for (class, list) in self.pool.classes.iter().zip(&mut self.free) {
            for slot in list.drain(..) {
                let _ = class.free_tx.try_send(slot);
            }
        }
    }
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
    /// Where a thread that owns no pool starts looking (round robin, per thread: no shared
    /// counter).
    static NEXT_POOL: Cell<usize> = const { Cell::new(0) };
}

impl Pool {
    pub(crate) fn arena_id(&self) -> u64 {
        self.arena_id
    }

    fn slot_ptr(&self, class: &Class, slot: u32) -> Option<NonNull<u8>> {
        let index = (slot - class.first) as usize;
        // SAFETY: offset + index * size + size <= the arena's bytes by construction.
        NonNull::new(unsafe {
            self.mem
                .base
                .as_ptr()
                .add(class.offset + index * class.size)
        })
    }

    fn buf(self: &Arc<Self>, class: usize, slot: u32, len: usize, zero: bool) -> Option<IoBuf> {
        let c = self.classes.get(class)?;
        let ptr = self.slot_ptr(c, slot)?;
        if zero {
            // SAFETY: the slot's `size` bytes are reserved for this buffer and len <= size.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        }
        Some(IoBuf {
            ptr,
            len,
            cap: c.size,
            origin: Origin::Pool {
                pool: Arc::clone(self),
                class: class as u8,
                slot,
            },
        })
    }

    /// A free slot of a class that fits `len`, from the shared queues (any thread).
    fn alloc_shared(self: &Arc<Self>, len: usize, zero: bool) -> Option<IoBuf> {
        for (i, c) in self.classes.iter().enumerate() {
            if c.size < len || c.count == 0 {
                continue;
            }
            if let Some(slot) = c.take_any() {
                return self.buf(i, slot, len, zero);
            }
        }
        None
    }

    /// Returns a slot: to the thread-local list when this is the owning core's thread, else to
    /// the shared queue.
    pub(crate) fn release(self: &Arc<Self>, class: u8, slot: u32) {
        let class = class as usize;
        let local = LOCAL
            .try_with(|l| {
                let Ok(mut l) = l.try_borrow_mut() else {
                    return false;
                };
                match l.as_mut() {
                    Some(local) if Arc::ptr_eq(&local.pool, self) => {
                        local.push(class, slot);
                        true
                    }
                    _ => false,
                }
            })
            .unwrap_or(false);
        if !local {
            if let Some(c) = self.classes.get(class) {
                // The queue holds every slot of its class, so it is never full.
                let _ = c.free_tx.try_send(slot);
            }
        }
    }
}

impl Local {
    fn push(&mut self, class: usize, slot: u32) {
        let Some(list) = self.free.get_mut(class) else {
            return;
        };
        list.push(slot);
        // Keep at most half of the class here, so other threads find slots in the queue.
        let Some(c) = self.pool.classes.get(class) else {
            return;
        };
        let keep = (c.count as usize / 2).max(BATCH);
        if list.len() > keep + BATCH {
            for s in list.drain(keep..) {
                let _ = c.free_tx.try_send(s);
            }
        }
    }

    fn alloc(&mut self, len: usize, zero: bool) -> Option<IoBuf> {
        for class in 0..self.free.len() {
            let c = &self.pool.classes[class];
            if c.size < len || c.count == 0 {
                continue;
            }
            let list = &mut self.free[class];
            if list.is_empty() {
                list.extend(c.free_rx.try_iter().take(BATCH));
            }
            if let Some(slot) = list.pop().or_else(|| c.take_fresh()) {
                return self.pool.buf(class, slot, len, zero);
            }
        }
        None
    }
}

/// The registered buffer arena of one engine (see the module docs).
pub(crate) struct Arena {
    id: u64,
    pools: Vec<Arc<Pool>>,
    slots: u32,
}

impl Arena {
    /// An arena of about `bytes` bytes for `cores` core threads: one pool per core, each
    /// split over the size classes (at most 16384 slots in all). `None` when `bytes` is too small
    /// for one slot per pool.
    pub(crate) fn new(bytes: usize, cores: usize) -> Option<Arena> {
        let cores = cores.max(1);
        let per_core = bytes / cores;
        let mut counts: Vec<usize> = CLASSES
            .iter()
            .map(|&(size, share)| per_core * share / 16 / size)
            .collect();
        while counts.iter().sum::<usize>() * cores > MAX_SLOTS {
            let Some(most) = (0..counts.len()).max_by_key(|&i| counts[i]) else {
                break;
            };
            counts[most] /= 2;
        }
        if counts.iter().all(|&c| c == 0) {
            // Too small for the shares: everything in the smallest class.
            let smallest = CLASSES[0].0;
            counts[0] = (per_core / smallest).min(MAX_SLOTS / cores);
        }
        let pool_bytes: usize = counts
            .iter()
            .zip(CLASSES.iter())
            .map(|(&n, &(size, _))| n * size)
            .sum();
        let total = pool_bytes * cores;
        if total == 0 {
            return None;
        }
        let layout = Layout::from_size_align(total, BUF_ALIGN).ok()?;
        // SAFETY: total is non-zero.
        let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        let mem = Arc::new(Memory { base, layout });
        let id = NEXT_ARENA_ID.fetch_add(1, Ordering::Relaxed);
        let mut pools = Vec::with_capacity(cores);
        let mut next_slot = 0u32;
        let mut offset = 0usize;
        for _ in 0..cores {
            let mut classes = Vec::with_capacity(CLASSES.len());
            for (&n, &(size, _)) in counts.iter().zip(CLASSES.iter()) {
                let (free_tx, free_rx) = crossbeam_channel::bounded(n.max(1));
                classes.push(Class {
                    size,
                    first: next_slot,
                    offset,
                    count: n as u32,
                    fresh: AtomicU32::new(0),
                    free_tx,
                    free_rx,
                });
                next_slot += n as u32;
                offset += n * size;
            }
            pools.push(Arc::new(Pool {
                arena_id: id,
                mem: Arc::clone(&mem),
                classes,
            }));
        }
        Some(Arena {
            id,
            pools,
            slots: next_slot,
        })
    }

    /// This arena's id (to tell whether an IoBuf's slot is registered with a given ring).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// One iovec per slot, in slot order (index = slot number), for `register_buffers`.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        let mut out = Vec::with_capacity(self.slots as usize);
        for pool in &self.pools {
            for c in &pool.classes {
                for s in c.first..c.first + c.count {
                    if let Some(p) = pool.slot_ptr(c, s) {
                        out.push(libc::iovec {
                            iov_base: p.as_ptr().cast(),
                            iov_len: c.size,
                        });
                    }
                }
            }
        }
        out
    }

    /// Makes the calling thread the owner of pool `core` (see the module docs).
    pub(crate) fn bind_local(&self, core: usize) {
        let Some(pool) = self.pools.get(core % self.pools.len().max(1)) else {
            return;
        };
        let local = Local {
            pool: Arc::clone(pool),
            free: vec![Vec::new(); pool.classes.len()],
        };
        let _ = LOCAL.try_with(|l| {
            if let Ok(mut l) = l.try_borrow_mut() {
                *l = Some(local);
            }
        });
    }

    /// A slot of the smallest class that fits `len` and has one free, with length `len`, or
    /// `None` (none free, or `len` over 1 MiB). The contents are whatever the slot last held
    /// unless `zero`.
    pub(crate) fn alloc(&self, len: usize, zero: bool) -> Option<IoBuf> {
        let local = LOCAL
            .try_with(|l| {
                let mut l = l.try_borrow_mut().ok()?;
                let local = l.as_mut()?;
                if local.pool.arena_id != self.id {
                    return None;
                }
                local.alloc(len, zero)
            })
            .ok()
            .flatten();
        if local.is_some() {
            return local;
        }
        let n = self.pools.len();
        let start = NEXT_POOL
            .try_with(|c| {
                let v = c.get();
                c.set(v.wrapping_add(1));
                v
            })
            .unwrap_or(0);
        (0..n).find_map(|i| self.pools[(start + i) % n].alloc_shared(len, zero))
    }

    /// Free slots right now: in the shared queues plus the calling thread's local list.
    #[cfg(test)]
    pub(crate) fn free_slots(&self) -> usize {
        let shared: usize = self
            .pools
            .iter()
            .flat_map(|p| p.classes.iter())
            .map(|c| {
                c.free_rx.len() + (c.count - c.fresh.load(Ordering::Relaxed).min(c.count)) as usize
            })
            .sum();
        let local = LOCAL
            .try_with(|l| {
                l.borrow()
                    .as_ref()
                    .filter(|l| l.pool.arena_id == self.id)
                    .map_or(0, |l| l.free.iter().map(Vec::len).sum())
            })
            .unwrap_or(0);
        shared + local
    }

    /// Total slots.
    #[cfg(test)]
    pub(crate) fn slots(&self) -> usize {
        self.slots as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_takes_the_smallest_class_that_fits() {
        let arena = Arena::new(8 << 20, 1).expect("arena");
        for (len, cap) in [
            (1, 4096),
            (4096, 4096),
            (4097, 16 << 10),
            (60_000, 64 << 10),
            (200_000, 256 << 10),
            (1 << 20, 1 << 20),
        ] {
            let b = arena.alloc(len, true).expect("slot");
            assert_eq!((b.len(), b.capacity()), (len, cap), "request of {len}");
            assert!(b.is_registered() && b.as_ptr() as usize % BUF_ALIGN == 0);
        }
        assert!(arena.alloc((1 << 20) + 1, false).is_none(), "too big");
    }

    #[test]
    fn slots_come_back_from_any_thread() {
        let arena = Arena::new(4 << 20, 2).expect("arena");
        let total = arena.free_slots();
        assert_eq!(total, arena.slots());
        let mut bufs = Vec::new();
        while let Some(b) = arena.alloc(4096, true) {
            bufs.push(b);
        }
        assert_eq!(arena.free_slots(), 0, "every slot handed out");
        assert_eq!(bufs.len(), total);
        bufs[0][0] = 7;
        std::thread::spawn(move || drop(bufs))
            .join()
            .expect("thread");
        assert_eq!(arena.free_slots(), total);
        let again = arena.alloc(4096, true).expect("slot");
        assert!(again.iter().all(|&b| b == 0), "zeroed on request");
    }

    #[test]
    fn a_core_thread_reuses_its_own_slots_and_gets_remote_frees_back_in_batches() {
        let arena = Arc::new(Arena::new(4 << 20, 2).expect("arena"));
        let a = Arc::clone(&arena);
        std::thread::spawn(move || {
            a.bind_local(1);
            let b = a.alloc(4096, false).expect("slot");
            let slot = b.arena_slot().expect("arena").1;
            drop(b);
            // Dropped on its own core: straight back into the local list, reused next.
            let again = a.alloc(100, false).expect("slot");
            assert_eq!(again.arena_slot().expect("arena").1, slot);
            // Taken here, dropped on another thread: back through the queue.
            let all: Vec<IoBuf> = std::iter::from_fn(|| a.alloc(4096, false))
                .take(10_000)
                .collect();
            let n = all.len();
            assert!(n > BATCH);
            std::thread::spawn(move || drop(all))
                .join()
                .expect("remote drop");
            drop(again);
            let back: Vec<IoBuf> = std::iter::from_fn(|| a.alloc(4096, false))
                .take(n)
                .collect();
            assert_eq!(back.len(), n, "every remotely freed slot came back");
        })
        .join()
        .expect("core thread");
        assert_eq!(arena.free_slots(), arena.slots());
    }

    #[test]
    fn growing_never_exposes_old_bytes() {
        let arena = Arena::new(4 << 20, 1).expect("arena");
        let mut a = arena.alloc(4096, false).expect("slot");
        a.fill(0xAA);
        drop(a);
        let mut b = arena.alloc(16, true).expect("same class again");
        b.set_len(4096);
        assert!(b.iter().all(|&x| x == 0));
        b.set_len(usize::MAX);
        assert_eq!(b.len(), b.capacity());
    }

    #[test]
    fn iovecs_match_slots_and_the_slot_count_is_capped() {
        let arena = Arena::new(8 << 20, 2).expect("arena");
        let iov = arena.iovecs();
        assert_eq!(iov.len(), arena.slots());
        let big = arena.alloc(1 << 20, false).expect("large slot");
        let (_, slot) = big.arena_slot().expect("slot");
        let v = &iov[slot as usize];
        assert_eq!(v.iov_base as usize, big.as_ptr() as usize);
        assert_eq!(v.iov_len, 1 << 20);
        let huge = Arena::new(1 << 30, 64).expect("arena");
        assert!(huge.slots() <= MAX_SLOTS);
        assert!(Arena::new(1000, 1).is_none());
    }
}
