//! Where the bitmap sits in an `.add-cow` file: right after the fixed-size header.
//!
//! The two layers that need it build on this module: [`crate::bitmap`] (the dirty marks count
//! metadata-file blocks from offset 0, so block 0 holds the header and the bitmap's first bytes)
//! and [`crate::format`] (the header, which re-exports both constants). It depends on nothing.

/// Bytes in the header; the bitmap starts right after it.
pub const HEADER_SIZE: usize = 2560;
/// Byte offset of the bitmap in the `.add-cow` file.
pub const BITMAP_OFFSET: u64 = HEADER_SIZE as u64;
