//! Dirty marks of metadata-file blocks. OWNER: issue #2 (used by the commit path of issue #3).

/// Which blocks of the `.add-cow` file (`block_size` bytes each, counted from file offset 0, so
/// block 0 also holds the header) contain bits set since their last commit.
///
/// Protocol (DESIGN.md invariant 3): a setter first sets the bit in [`super::SparseBitmap`], then
/// calls [`DirtyBlocks::mark_bitmap_bytes`]; the committer calls [`DirtyBlocks::take`] (which
/// clears the marks) *before* copying the blocks' bytes. A bit set after the copy re-marks its
/// block for the next commit, so no set bit is ever lost.
#[derive(Debug)]
pub struct DirtyBlocks {
    block_size: u64,
}

impl DirtyBlocks {
    /// Marks for a metadata file whose bitmap has `bitmap_len` bytes, in blocks of `block_size`.
    pub fn new(bitmap_len: u64, block_size: u64) -> Self {
        let _ = bitmap_len;
        DirtyBlocks { block_size }
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Marks the blocks holding bitmap bytes `first..=last` (bitmap byte indices, not file offsets).
    pub fn mark_bitmap_bytes(&self, first: u64, last: u64) {
        let _ = (first, last);
        unimplemented!("issue #2")
    }

    /// Whether any block is marked.
    pub fn any(&self) -> bool {
        unimplemented!("issue #2")
    }

    /// Clears every mark and returns the marked block indices, ascending.
    pub fn take(&self) -> Vec<u64> {
        unimplemented!("issue #2")
    }

    /// Re-marks blocks (used when a commit fails, so the next one retries them).
    pub fn remark(&self, blocks: &[u64]) {
        let _ = blocks;
        unimplemented!("issue #2")
    }
}
