//! Aligned I/O buffers and the registered buffer arena.
//!
//! An [`IoBuf`] is 4096-byte aligned memory that is either a slot of the engine's [`Arena`]
//! (registered with every core's ring, so reads and writes through it use
//! `ReadFixed`/`WriteFixed`) or a heap allocation. It is `Send`: a buffer taken on one thread may
//! be filled, sent and dropped on any other; dropping an arena slot returns it to the arena.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Alignment of every [`IoBuf`]: enough for `O_DIRECT` on any device we know of.
pub const BUF_ALIGN: usize = 4096;

/// An aligned buffer, either a slot of the engine's registered arena or a heap allocation.
/// Derefs to `[u8]` of its current length (at most its capacity).
///
/// Invariant: `ptr` points to `cap` bytes aligned to [`BUF_ALIGN`], owned by this value (heap) or
/// reserved for it in the arena until it is dropped; `len <= cap`.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    origin: Origin,
}

enum Origin {
    Heap,
    Arena { arena: Arc<Arena>, slot: u32 },
}

// SAFETY: an IoBuf exclusively owns its memory (heap) or its reserved arena slot; nothing else
// aliases it while the IoBuf lives, so moving it to another thread is sound. The arena's free
// list is behind a Mutex, so returning a slot from any thread is sound too.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give out `&[u8]`, which is Sync.
unsafe impl Sync for IoBuf {}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("arena_slot", &self.arena_slot())
            .finish()
    }
}

fn heap_layout(cap: usize) -> Layout {
    // `cap` is non-zero and rounded to BUF_ALIGN by the callers; a layout error would mean a
    // size near usize::MAX, which the allocator could not give anyway.
    Layout::from_size_align(cap, BUF_ALIGN).unwrap_or_else(|_| {
        std::alloc::handle_alloc_error(
            // A valid stand-in layout for the error report.
            Layout::new::<[u8; BUF_ALIGN]>(),
        )
    })
}

impl IoBuf {
    /// A zeroed, 4096-aligned heap buffer of `len` bytes.
    pub fn new_zeroed(len: usize) -> IoBuf {
        let cap = len.max(1).next_multiple_of(BUF_ALIGN);
        let layout = heap_layout(cap);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            len,
            cap,
            origin: Origin::Heap,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::new_zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length to `len`, at most [`IoBuf::capacity`] (larger values are clamped).
    /// Bytes that become visible by growing are zeroed (an arena slot may have held another
    /// request's data).
    pub fn set_len(&mut self, len: usize) {
        let len = len.min(self.cap);
        if len > self.len {
            // SAFETY: [self.len, len) lies within the cap bytes this buffer owns.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(self.len), 0, len - self.len) };
        }
        self.len = len;
    }

    /// Whether this buffer is a slot of a registered arena.
    pub fn is_registered(&self) -> bool {
        matches!(self.origin, Origin::Arena { .. })
    }

    /// The arena id and slot index, if this buffer is an arena slot.
    pub(crate) fn arena_slot(&self) -> Option<(u64, u32)> {
        match &self.origin {
            Origin::Heap => None,
            Origin::Arena { arena, slot } => Some((arena.id, *slot)),
        }
    }

    /// Copies `data` into the buffer (length becomes `data.len()`, which must fit the capacity;
    /// extra bytes are dropped) and returns it.
    pub(crate) fn filled(mut self, data: &[u8]) -> IoBuf {
        self.set_len(data.len());
        let n = self.len;
        self[..n].copy_from_slice(&data[..n]);
        self
    }

    /// Raw pointer to the first byte (for building SQEs).
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Heap => {
                // SAFETY: ptr was allocated with exactly this layout in new_zeroed.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr(), heap_layout(self.cap)) }
            }
            Origin::Arena { arena, slot } => arena.release(*slot),
        }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to cap >= len initialized bytes (zeroed at allocation, or written
        // since) owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// One size class of the arena: `count` slots of `slot_size` bytes starting at `offset`.
struct SizeClass {
    slot_size: usize,
    first_slot: u32,
    offset: usize,
    free: Mutex<Vec<u32>>,
}

static NEXT_ARENA_ID: AtomicU64 = AtomicU64::new(1);

/// The engine's registered buffer arena: one aligned allocation cut into slots of two size
/// classes (64 KiB for small requests, 1 MiB for large ones). Every core's ring registers every
/// slot as one fixed buffer whose index is the slot number.
///
/// Invariant: the memory lives as long as the arena; rings that registered it hold an
/// `Arc<Arena>` (through the engine's shared state) for longer than the ring itself.
pub(crate) struct Arena {
    id: u64,
    base: NonNull<u8>,
    bytes: usize,
    classes: Vec<SizeClass>,
    slots: u32,
}

// SAFETY: the arena's memory is only handed out slot by slot (each slot to one IoBuf at a time,
// tracked by the Mutex-protected free lists); the base pointer itself is never dereferenced.
unsafe impl Send for Arena {}
// SAFETY: see Send; all mutation goes through the free lists' Mutexes.
unsafe impl Sync for Arena {}

/// Small slot size (4 KiB .. 64 KiB requests).
const SMALL_SLOT: usize = 64 << 10;
/// Large slot size (up to 1 MiB requests).
const LARGE_SLOT: usize = 1 << 20;
/// io_uring allows at most 16384 registered buffers.
const MAX_SLOTS: usize = 16384;

impl Arena {
    /// An arena of about `bytes` bytes (half small slots, half large slots). `None` when
    /// `bytes` is too small for one slot.
    pub(crate) fn new(bytes: usize) -> Option<Arc<Arena>> {
        let large = ((bytes / 2) / LARGE_SLOT).min(MAX_SLOTS / 2);
        let small = ((bytes - large * LARGE_SLOT) / SMALL_SLOT).min(MAX_SLOTS / 2);
        if large + small == 0 {
            return None;
        }
        let total = large * LARGE_SLOT + small * SMALL_SLOT;
        let layout = Layout::from_size_align(total, BUF_ALIGN).ok()?;
        // SAFETY: total is non-zero.
        let base = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        let mut classes = Vec::new();
        let mut next_slot = 0u32;
        let mut offset = 0usize;
        for (slot_size, count) in [(SMALL_SLOT, small), (LARGE_SLOT, large)] {
            if count == 0 {
                continue;
            }
            let count = count as u32;
            classes.push(SizeClass {
                slot_size,
                first_slot: next_slot,
                offset,
                free: Mutex::new((next_slot..next_slot + count).rev().collect()),
            });
            next_slot += count;
            offset += count as usize * slot_size;
        }
        Some(Arc::new(Arena {
            id: NEXT_ARENA_ID.fetch_add(1, Ordering::Relaxed),
            base,
            bytes: total,
            classes,
            slots: next_slot,
        }))
    }

    /// This arena's id (to tell whether an IoBuf's slot is registered with a given ring).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    fn class_of(&self, slot: u32) -> Option<&SizeClass> {
        self.classes
            .iter()
            .rev()
            .find(|c| slot >= c.first_slot)
            .filter(|_| slot < self.slots)
    }

    fn slot_ptr(&self, class: &SizeClass, slot: u32) -> *mut u8 {
        let index = (slot - class.first_slot) as usize;
        // SAFETY: offset + index * slot_size + slot_size <= bytes by construction.
        unsafe {
            self.base
                .as_ptr()
                .add(class.offset + index * class.slot_size)
        }
    }

    /// One iovec per slot, in slot order (index = slot number), for `register_buffers`.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        let mut out = Vec::with_capacity(self.slots as usize);
        for class in &self.classes {
            let count = self
                .classes
                .iter()
                .find(|c| c.first_slot > class.first_slot)
                .map(|c| c.first_slot)
                .unwrap_or(self.slots)
                - class.first_slot;
            for i in 0..count {
                out.push(libc::iovec {
                    iov_base: self.slot_ptr(class, class.first_slot + i).cast(),
                    iov_len: class.slot_size,
                });
            }
        }
        out
    }

    /// A slot of at least `len` bytes with length `len`, or `None` when none is free. The
    /// contents are whatever the slot last held unless `zero`.
    pub(crate) fn alloc(self: &Arc<Self>, len: usize, zero: bool) -> Option<IoBuf> {
        // The smallest class that fits and has a free slot.
        let (class, slot) = self
            .classes
            .iter()
            .filter(|c| c.slot_size >= len.max(1))
            .find_map(|c| Some((c, c.free.lock().ok()?.pop()?)))?;
        let ptr = NonNull::new(self.slot_ptr(class, slot))?;
        if zero {
            // SAFETY: the slot's slot_size bytes are reserved for us and len <= slot_size.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        }
        Some(IoBuf {
            ptr,
            len,
            cap: class.slot_size,
            origin: Origin::Arena {
                arena: Arc::clone(self),
                slot,
            },
        })
    }

    fn release(&self, slot: u32) {
        if let Some(class) = self.class_of(slot) {
            if let Ok(mut free) = class.free.lock() {
                free.push(slot);
            }
        }
    }

    /// Free slots right now (for tests and stats).
    #[cfg(test)]
    pub(crate) fn free_slots(&self) -> usize {
        self.classes
            .iter()
            .map(|c| c.free.lock().map(|f| f.len()).unwrap_or(0))
            .sum()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.bytes, BUF_ALIGN) {
            // SAFETY: base was allocated with exactly this layout in new; every IoBuf holding a
            // slot holds an Arc<Arena>, so none is alive when this runs.
            unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) }
        }
    }
}

/// A buffer for `len` bytes: an arena slot when one is free, else the heap.
pub(crate) fn alloc(arena: Option<&Arc<Arena>>, len: usize, zero: bool) -> IoBuf {
    arena
        .and_then(|a| a.alloc(len, zero))
        .unwrap_or_else(|| IoBuf::new_zeroed(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_aligned_and_zeroed() {
        for len in [0usize, 1, 511, 4096, 70_000] {
            let buf = IoBuf::new_zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn arena_slots_are_returned_from_any_thread() {
        let arena = Arena::new(4 << 20).expect("arena");
        let total = arena.free_slots();
        let mut bufs: Vec<IoBuf> = (0..total)
            .map(|_| arena.alloc(4096, true).expect("slot"))
            .collect();
        assert!(arena.alloc(4096, true).is_none(), "every slot handed out");
        bufs[0][0] = 7;
        assert!(bufs
            .iter()
            .all(|b| b.is_registered() && b.as_ptr() as usize % BUF_ALIGN == 0));
        let handle = std::thread::spawn(move || drop(bufs));
        handle.join().expect("thread");
        assert_eq!(arena.free_slots(), total);
        let again = arena.alloc(4096, true).expect("slot");
        assert!(again.iter().all(|&b| b == 0), "zeroed on request");
    }

    #[test]
    fn growing_never_exposes_old_bytes() {
        let arena = Arena::new(4 << 20).expect("arena");
        let mut a = arena.alloc(4096, false).expect("slot");
        a.fill(0xAA);
        drop(a);
        let mut b = arena.alloc(16, true).expect("same slot again");
        b.set_len(4096);
        assert!(b.iter().all(|&x| x == 0));
        b.set_len(usize::MAX);
        assert_eq!(b.len(), b.capacity());
    }

    #[test]
    fn arena_iovecs_match_slots() {
        let arena = Arena::new(4 << 20).expect("arena");
        let iov = arena.iovecs();
        assert_eq!(iov.len(), arena.free_slots());
        let big = arena.alloc(1 << 20, false).expect("large slot");
        let (_, slot) = big.arena_slot().expect("slot");
        let v = &iov[slot as usize];
        assert_eq!(v.iov_base as usize, big.as_ptr() as usize);
        assert_eq!(v.iov_len, 1 << 20);
        assert!(
            arena.alloc((1 << 20) + 1, false).is_none(),
            "too big for any class"
        );
    }
}
