//! Aligned I/O buffers and where they come from.
//!
//! An [`IoBuf`] is 4096-byte aligned memory that is either a slot of the engine's registered
//! [`Arena`] (so reads and writes through it use `ReadFixed`/`WriteFixed`) or a heap allocation.
//! It is `Send`: a buffer taken on one thread may be filled, sent and dropped on any other.
//! Memory lent by another party (a guest) is not an `IoBuf`: it is a [`LentBuf`], which gives
//! no reference to its bytes.
//!
//! * `arena`: the registered memory, cut into per-core pools of size classes (4 KiB .. 1 MiB),
//!   and the lock-free way a slot finds its way back to its core.
//! * `lent`: [`LentBuf`] and [`DataBuf`] (a request's buffer: owned or lent).

mod arena;
mod lent;

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(crate) use arena::Arena;
use arena::Pool;
pub use lent::{DataBuf, LentBuf};

/// Alignment of every [`IoBuf`]: enough for `O_DIRECT` on any device we know of.
pub const BUF_ALIGN: usize = 4096;

/// An aligned buffer the engine owns: a slot of the engine's registered arena or a heap
/// allocation. Derefs to `[u8]` of its current length (at most its capacity). Memory another
/// party lends is a [`LentBuf`] instead, which never derefs.
///
/// Invariant: `ptr` points to `cap` bytes aligned to [`BUF_ALIGN`], owned by this value (heap)
/// or reserved for it in the arena, that nothing outside this process writes; `len <= cap`.
/// The bytes never move while
/// the buffer lives (moving the `IoBuf` moves only this header), which is what lets an in-flight
/// SQE point into a buffer owned by the op that carries it.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    origin: Origin,
}

enum Origin {
    Heap,
    /// Slot `slot` (global index = registered-buffer index) of size class `class` of `pool`.
    Pool {
        pool: Arc<Pool>,
        class: u8,
        slot: u32,
    },
}

// SAFETY: an IoBuf exclusively owns its memory (heap) or its reserved arena slot; nothing else
// aliases it while the IoBuf lives, so moving it to another thread is sound. Returning a slot
// from any thread goes through the pool's lock-free queue (or the owning core's thread-local
// list when dropped on that core).
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

/// Bytes of heap buffers ([`IoBuf::new_zeroed`], and arena allocations that fell back to the
/// heap) allocated since the process started, and those alive now.
static HEAP_ALLOCATED: AtomicU64 = AtomicU64::new(0);
static HEAP_LIVE: AtomicU64 = AtomicU64::new(0);

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
    /// Heap buffer bytes allocated since the process started (a monotonic count; arena slots
    /// are not counted): what an arena too small for the load costs in
    /// allocations, and what a test measures around one request to bound its buffer memory.
    pub fn heap_bytes_allocated() -> u64 {
        HEAP_ALLOCATED.load(Ordering::Relaxed)
    }

    /// Heap buffer bytes alive now.
    pub fn heap_bytes_live() -> u64 {
        HEAP_LIVE.load(Ordering::Relaxed)
    }

    /// A zeroed, 4096-aligned heap buffer of `len` bytes.
    pub fn new_zeroed(len: usize) -> IoBuf {
        let cap = len.max(1).next_multiple_of(BUF_ALIGN);
        let layout = heap_layout(cap);
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        HEAP_ALLOCATED.fetch_add(cap as u64, Ordering::Relaxed);
        HEAP_LIVE.fetch_add(cap as u64, Ordering::Relaxed);
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
        matches!(self.origin, Origin::Pool { .. })
    }

    /// The arena id and global slot index (= registered-buffer index), if this buffer is an
    /// arena slot.
    pub(crate) fn arena_slot(&self) -> Option<(u64, u32)> {
        match &self.origin {
            Origin::Heap => None,
            Origin::Pool { pool, slot, .. } => Some((pool.arena_id(), *slot)),
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

    /// Raw pointer to the first byte, for building SQEs (the kernel writes through it while an
    /// op that owns this buffer, or a handle to it, is in flight). Valid for `capacity()` bytes
    /// while the buffer lives, wherever the `IoBuf` value is moved.
    pub(crate) fn raw_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Heap => {
                HEAP_LIVE.fetch_sub(self.cap as u64, Ordering::Relaxed);
                // SAFETY: ptr was allocated with exactly this layout in new_zeroed.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr(), heap_layout(self.cap)) }
            }
            Origin::Pool { pool, class, slot } => pool.release(*class, *slot),
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

/// A buffer for `len` bytes: an arena slot when one is free (from the calling core's own pool
/// on a core thread, else from any pool's shared queue), else the heap.
pub(crate) fn alloc(arena: Option<&Arena>, len: usize, zero: bool) -> IoBuf {
    arena
        .and_then(|a| a.alloc(len, zero))
        .unwrap_or_else(|| IoBuf::new_zeroed(len))
}

/// Makes the calling thread (a core thread) the owner of `core`'s pool of `arena`: its
/// allocations and frees then use a thread-local free list, without atomics.
pub(crate) fn bind_core_pool(arena: &Arena, core: usize) {
    arena.bind_local(core);
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
}
