//! Sparse atomic bitmap. OWNER: issue #2.

/// One bit per sector; see the module docs.
///
/// Invariant: while shared, bits only go 0→1 (`set_range`); there is no way to clear a bit.
#[derive(Debug)]
pub struct SparseBitmap {
    sectors: u64,
}

impl SparseBitmap {
    /// A bitmap of `sectors` bits, all clear. Costs O(sectors / bits-per-chunk) pointers.
    pub fn new(sectors: u64) -> Self {
        SparseBitmap { sectors }
    }

    /// Loads `sectors` bits from `bitmap_bytes` (on-disk order). Extra bytes/bits are ignored.
    /// Chunks that are all clear or all set take no chunk memory.
    pub fn from_bytes(sectors: u64, bitmap_bytes: &[u8]) -> Self {
        let _ = bitmap_bytes;
        SparseBitmap { sectors }
    }

    /// Number of sectors covered.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether `sector` is set. Out-of-range sectors read as clear.
    pub fn get(&self, sector: u64) -> bool {
        let _ = sector;
        unimplemented!("issue #2")
    }

    /// Sets bits `[start, start+count)` (clipped to the size) atomically; returns the inclusive
    /// range of bitmap *byte* indices whose value changed, or `None` if none changed.
    pub fn set_range(&self, start: u64, count: u64) -> Option<(u64, u64)> {
        let _ = (start, count);
        unimplemented!("issue #2")
    }

    /// The value of bit `start` and how many consecutive bits from `start` share it, at most
    /// `max` (and never past the end). `max == 0` or `start` past the end gives `(false, 0)`.
    pub fn run_from(&self, start: u64, max: u64) -> (bool, u64) {
        let _ = (start, max);
        unimplemented!("issue #2")
    }

    /// Number of set bits.
    pub fn count_set(&self) -> u64 {
        unimplemented!("issue #2")
    }

    /// Copies bitmap bytes `[byte_offset, byte_offset + out.len())` in on-disk order into `out`;
    /// bytes past the end of the bitmap are written as zero.
    pub fn copy_bytes(&self, byte_offset: u64, out: &mut [u8]) {
        let _ = (byte_offset, out);
        unimplemented!("issue #2")
    }

    /// Heap bytes used (for the memory benchmark).
    pub fn heap_bytes(&self) -> usize {
        0
    }
}
