//! Registered-file slots lent to a disk.
//!
//! Every core's ring has a sparse table of registered files; disk `k` owns entries `3k..3k+3`
//! (raw image, metadata, base) on every ring. A [`FileSlot`] is that lease: it lives as long as
//! the disk's shared state (so as long as any request of the disk may still issue an SQE naming
//! the slot), and dropping it empties the entries on every ring before the index can be lent
//! again. Who empties them is behind [`SlotOwner`], so the disk state does not depend on the
//! engine's types.

use std::sync::Arc;

/// Gives slot indices back (the engine: empties the ring entries, then reuses the index).
pub(crate) trait SlotOwner: Send + Sync {
    /// Empties entries `3k..3k+3` on every ring, then makes `k` reusable.
    fn release(&self, index: u32);
}

/// Slot index `k` lent to one disk; released when dropped.
pub(crate) struct FileSlot {
    index: u32,
    owner: Arc<dyn SlotOwner>,
}

impl FileSlot {
    /// A lease of `index`, given back to `owner` on drop.
    pub(crate) fn new(index: u32, owner: Arc<dyn SlotOwner>) -> FileSlot {
        FileSlot { index, owner }
    }

    /// The slot index `k`.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for FileSlot {
    fn drop(&mut self) {
        self.owner.release(self.index);
    }
}
