//! Dirty marks of metadata-file blocks, and the protocol that publishes bits through them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::layout::BITMAP_OFFSET;

use super::SparseBitmap;

/// Which blocks of the `.add-cow` file (`block_size` bytes each, counted from file offset 0, so
/// block 0 also holds the header) contain bits set since their last commit.
///
/// Protocol (DESIGN.md invariant 3): a setter publishes a range with [`DirtyBlocks::publish`]
/// (set the bits in the [`SparseBitmap`], then mark their blocks); the committer calls
/// [`DirtyBlocks::take`] (which clears the marks) *before* copying the blocks' bytes. A bit set
/// after the copy re-marks its block for the next commit, so no set bit is ever lost.
///
/// Publication, not change, is what a commit must carry: a setter that finds its bits already
/// set by another setter that has not marked them yet must not return before they are marked,
/// or its caller answers a write whose bits the next commit does not copy (a FLUSH would then
/// be answered with the bits of an acknowledged write not durable). So every publication counts
/// itself in `publishing` for its duration; a setter that sees another one in progress after
/// its own `set_range` marks its *whole* range itself (see [`DirtyBlocks::publish`] for why
/// that suffices).
///
/// The marks are one atomic bit per block: marking is a `fetch_or` (Release), taking a `swap(0)`
/// (Acquire), so a committer that takes a mark also sees every bitmap bit set before it.
#[derive(Debug)]
pub struct DirtyBlocks {
    block_size: u64,
    blocks: u64,
    words: Box<[AtomicU64]>,
    /// Publications in progress (between their count-in and count-out).
    publishing: AtomicUsize,
}

impl DirtyBlocks {
    /// Marks for a metadata file whose bitmap has `bitmap_len` bytes, in blocks of `block_size`
    /// (a `block_size` of 0 is treated as 1).
    pub fn new(bitmap_len: u64, block_size: u64) -> Self {
        let block_size = block_size.max(1);
        let blocks = (BITMAP_OFFSET + bitmap_len).div_ceil(block_size);
        let words = (0..blocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyBlocks {
            block_size,
            blocks,
            words,
            publishing: AtomicUsize::new(0),
        }
    }

    /// Publishes sectors `[start, start+count)` of `bitmap`: sets their bits, then marks every
    /// block a commit must copy for them; returns how many bits went from 0 to 1. When it
    /// returns, a commit that takes the marks from then on carries every one of these bits,
    /// whoever set them first.
    ///
    /// Why: publications count themselves in (`publishing`, SeqCst) before `set_range` and out
    /// after marking. If this setter finds a bit already set by setter A, it read it with an
    /// acquire of A's release (the word's `fetch_or`, the chunk slot's failed CAS, or the load
    /// that sees the slot `FULL`), so A's `set_range`, and A's count-in before it, happened
    /// before ours. Our load of the count
    /// after our `set_range` then either includes A (count > 1: we mark our whole range
    /// ourselves) or already sees A counted out, and A's count-out is after A's mark, which
    /// therefore happened before we return. Otherwise only the bytes that changed need marks.
    pub fn publish(&self, bitmap: &SparseBitmap, start: u64, count: u64) -> u64 {
        self.publish_with(bitmap, start, count, || {})
    }

    /// [`DirtyBlocks::publish`], running `between` after the bits are set and before anything is
    /// marked: what a setter preempted there would look like to everyone else. For tests that
    /// must reach that window on purpose.
    #[doc(hidden)]
    pub fn publish_with(
        &self,
        bitmap: &SparseBitmap,
        start: u64,
        count: u64,
        between: impl FnOnce(),
    ) -> u64 {
        if count == 0 {
            return 0;
        }
        self.publishing.fetch_add(1, Ordering::SeqCst);
        let (changed, newly) = bitmap.set_range_counted(start, count);
        between();
        let others = self.publishing.load(Ordering::SeqCst) > 1;
        let marks = if others {
            let last = start
                .saturating_add(count - 1)
                .min(bitmap.sectors().saturating_sub(1));
            (start < bitmap.sectors()).then_some((start / 8, last / 8))
        } else {
            changed
        };
        if let Some((first, last)) = marks {
            self.mark_bitmap_bytes(first, last);
        }
        self.publishing.fetch_sub(1, Ordering::SeqCst);
        newly
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks covered (header and bitmap).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn mark(&self, block: u64) {
        if block >= self.blocks {
            return;
        }
        if let Some(w) = self.words.get((block / 64) as usize) {
            w.fetch_or(1 << (block % 64), Ordering::AcqRel);
        }
    }

    /// Marks the blocks holding bitmap bytes `first..=last` (bitmap byte indices, not file offsets).
    /// Blocks past the end are ignored.
    pub fn mark_bitmap_bytes(&self, first: u64, last: u64) {
        let (first, last) = (first.min(last), first.max(last));
        let b0 = (BITMAP_OFFSET.saturating_add(first)) / self.block_size;
        let b1 = (BITMAP_OFFSET.saturating_add(last)) / self.block_size;
        for b in b0..=b1.min(self.blocks.saturating_sub(1)) {
            self.mark(b);
        }
    }

    /// Whether any block is marked.
    pub fn any(&self) -> bool {
        self.words.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }

    /// Clears every mark and returns the marked block indices, ascending.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                out.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Re-marks blocks (used when a commit fails, so the next one retries them).
    pub fn remark(&self, blocks: &[u64]) {
        for &b in blocks {
            self.mark(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::SparseBitmap;

    #[test]
    fn marks_map_bitmap_bytes_to_file_blocks() {
        // 10000 bitmap bytes + 2560 header = 12560 bytes = 4 blocks of 4096.
        let d = DirtyBlocks::new(10_000, 4096);
        assert_eq!(d.blocks(), 4);
        assert!(!d.any());
        d.mark_bitmap_bytes(0, 0); // file offset 2560: block 0
        d.mark_bitmap_bytes(1536, 1536); // file offset 4096: block 1
        assert!(d.any());
        assert_eq!(d.take(), vec![0, 1]);
        assert!(!d.any());
        assert_eq!(d.take(), Vec::<u64>::new());
        d.mark_bitmap_bytes(1535, 9999); // 4095..12559: blocks 0..=3
        assert_eq!(d.take(), vec![0, 1, 2, 3]);
        d.mark_bitmap_bytes(50_000, 60_000); // past the end: ignored
        assert!(!d.any());
    }

    #[test]
    fn remark_and_many_blocks() {
        let d = DirtyBlocks::new(1 << 20, 512);
        d.remark(&[3, 64, 65, 1000, 2052]);
        assert_eq!(d.take(), vec![3, 64, 65, 1000, 2052]);
        d.remark(&[1 << 40]);
        assert!(!d.any());
    }

    #[test]
    fn concurrent_set_then_mark_is_never_lost() {
        // Setters set a bit then mark; a committer takes then copies. After all setters finish
        // and a final take+copy, every set bit must have been copied by some commit.
        let sectors = 64 * 1024u64;
        let bm = SparseBitmap::new(sectors);
        let d = DirtyBlocks::new(sectors / 8, 512);
        let mut persisted = vec![0u8; (BITMAP_OFFSET + sectors / 8) as usize];
        let done = std::sync::atomic::AtomicBool::new(false);
        let commit = |persisted: &mut Vec<u8>| {
            for blk in d.take() {
                let start = blk * 512;
                let end = (start + 512).min(persisted.len() as u64);
                let bstart = start.max(BITMAP_OFFSET);
                let dst = &mut persisted[bstart as usize..end as usize];
                bm.copy_bytes(bstart - BITMAP_OFFSET, dst);
            }
        };
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let (bm, d) = (&bm, &d);
                s.spawn(move || {
                    let mut i = t;
                    while i < sectors {
                        if let Some((a, b)) = bm.set_range(i, 1) {
                            d.mark_bitmap_bytes(a, b);
                        }
                        i += 3;
                    }
                });
            }
            s.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    // Committer runs concurrently with the setters.
                    commit(&mut persisted);
                    if bm.count_set() == sectors {
                        done.store(true, Ordering::Release);
                    }
                }
            });
        });
        commit(&mut persisted);
        let back = SparseBitmap::from_bytes(sectors, &persisted[BITMAP_OFFSET as usize..]);
        assert_eq!(back.count_set(), sectors);
    }
}
