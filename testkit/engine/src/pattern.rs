//! Byte patterns that make every origin of a byte recognizable.
//!
//! None of them produces a zero byte, so a sector of zeros (the content of a sparse raw image)
//! can never be mistaken for base data, pre-allocated data or written data.

/// The base image's byte at `offset`.
pub fn base_byte(offset: u64) -> u8 {
    let sector = offset / 512;
    ((offset.wrapping_mul(7) ^ sector.wrapping_mul(31)) % 251) as u8 + 1
}

/// The byte at `offset` of a sector that the initial overlay already has allocated.
pub fn prealloc_byte(offset: u64) -> u8 {
    let sector = offset / 512;
    ((offset.wrapping_mul(13) ^ sector.wrapping_mul(101) ^ 0x55) % 241) as u8 + 3
}

/// The byte at `offset` of a raw-image sector whose bit is clear: garbage that must never be read.
pub fn stale_byte(offset: u64) -> u8 {
    ((offset.wrapping_mul(3) ^ 0xa5) % 239) as u8 + 5
}

/// `len` bytes of `f` from `offset`.
pub fn fill(offset: u64, len: usize, f: fn(u64) -> u8) -> Vec<u8> {
    (0..len as u64).map(|i| f(offset + i)).collect()
}

/// Payload of client write `id` at `offset`: never zero, different for every write.
pub fn write_data(id: u64, offset: u64, len: usize) -> Vec<u8> {
    let salt = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0xff51_afd7_ed55_8ccd) ^ salt;
            ((x >> 29) % 255) as u8 + 1
        })
        .collect()
}

/// Byte ranges of a `size`-byte disk owned by `thread` of `threads`: chunks of `chunk` bytes
/// whose boundaries are shifted by 300 bytes (so neighbours share a sector), dealt round-robin.
pub fn owned_ranges(thread: usize, threads: usize, size: u64, chunk: u64) -> Vec<(u64, u64)> {
    let bound = |c: u64| {
        if c == 0 {
            0
        } else {
            (c * chunk + 300).min(size)
        }
    };
    (0..size.div_ceil(chunk))
        .filter(|c| *c as usize % threads == thread)
        .map(|c| (bound(c), bound(c + 1)))
        .filter(|(a, b)| a < b)
        .collect()
}
