//! Extent-ahead allocation of the raw image: which aligned extents were already given a
//! `fallocate`, so each is asked for once.
//!
//! On ext4 (and most file systems) a write into a hole of a sparse file allocates blocks in
//! the write path: io_uring cannot do it without blocking, so it punts the write to a worker,
//! and the allocation is a journal transaction. Allocating a larger aligned extent once, on the
//! first write that lands on a clear sector of it, turns the later first writes there into
//! writes over allocated (unwritten) blocks. The fallocate changes only allocation, never
//! bytes (mode 0, KEEP_SIZE), so it needs no ordering: the data fdatasync of the next commit
//! covers the extents the writes converted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// See the module docs. Invariant: an extent's bit goes 0→1 once; the op that set it is the
/// only fallocate issued for that extent.
#[derive(Debug)]
pub(crate) struct ExtentAhead {
    /// Extent size in bytes (a power of two).
    pub size: u64,
    /// Extents of the disk (the last one may be partial).
    count: u64,
    claimed: Vec<AtomicU64>,
    /// A fallocate failed with EOPNOTSUPP (or the like): no more are issued for this disk.
    pub disabled: AtomicBool,
    /// A failure was logged (once per disk).
    pub logged: AtomicBool,
}

impl ExtentAhead {
    /// For a disk of `disk_size` bytes with extents of `size` bytes (a power of two).
    pub(crate) fn new(size: u64, disk_size: u64) -> ExtentAhead {
        let extents = disk_size.div_ceil(size);
        ExtentAhead {
            size,
            count: extents,
            claimed: (0..extents.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            disabled: AtomicBool::new(false),
            logged: AtomicBool::new(false),
        }
    }

    /// Claims extent `idx`: true only for the first caller (and never once disabled or out of
    /// range).
    pub(crate) fn claim(&self, idx: u64) -> bool {
        if idx >= self.count || self.disabled.load(Ordering::Relaxed) {
            return false;
        }
        let Some(word) = usize::try_from(idx / 64)
            .ok()
            .and_then(|w| self.claimed.get(w))
        else {
            return false;
        };
        let bit = 1u64 << (idx % 64);
        word.fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// The extents `[off, end)` touches, as (index, extent start, extent length clipped to
    /// `disk_size`).
    pub(crate) fn extents(
        &self,
        off: u64,
        end: u64,
        disk_size: u64,
    ) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let first = off / self.size;
        let last = end.saturating_sub(1) / self.size;
        (first..=last)
            .map(move |i| (i, i * self.size))
            .filter(move |&(_, start)| start < disk_size && off < end)
            .map(move |(i, start)| (i, start, (disk_size - start).min(self.size)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_extent_is_claimed_once_and_clipped_to_the_disk() {
        let size = 3 * (1 << 20) + 4096;
        let ea = ExtentAhead::new(1 << 20, size);
        let got: Vec<_> = ea.extents((1 << 20) - 512, (1 << 20) + 512, size).collect();
        assert_eq!(got, [(0, 0, 1 << 20), (1, 1 << 20, 1 << 20)]);
        let tail: Vec<_> = ea.extents(size - 512, size, size).collect();
        assert_eq!(tail, [(3, 3 << 20, 4096)], "never past the disk's end");
        assert_eq!(ea.extents(5, 5, size).count(), 0);
        assert!(ea.claim(1));
        assert!(!ea.claim(1));
        assert!(ea.claim(3));
        assert!(!ea.claim(4), "out of range");
        ea.disabled.store(true, Ordering::Relaxed);
        assert!(!ea.claim(0));
    }
}
