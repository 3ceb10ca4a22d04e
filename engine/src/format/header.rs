//! The 2560-byte add-cow header. OWNER: issue #2.

use crate::error::Result;

/// `ADD_COW\xff`.
pub const MAGIC: [u8; 8] = *b"ADD_COW\xff";
/// The only version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Bytes in the header; the bitmap starts right after it.
pub const HEADER_SIZE: usize = 2560;
/// Byte offset of the bitmap in the `.add-cow` file.
pub const BITMAP_OFFSET: u64 = HEADER_SIZE as u64;
/// Bytes in each of the two NUL-padded path fields.
pub const PATH_FIELD_LEN: usize = 1024;
/// One bit of the bitmap covers this many bytes.
pub const SECTOR_SIZE: u64 = 512;

/// Bytes of bitmap needed for `virtual_size` bytes: `ceil(virtual_size / 512 / 8)`.
pub fn bitmap_len(virtual_size: u64) -> u64 {
    (virtual_size / SECTOR_SIZE).div_ceil(8)
}

/// A parsed header. Paths are the raw bytes as stored (not resolved; see [`super::paths`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Path of the base image as stored; empty = no base.
    pub backing_file: Vec<u8>,
    /// Path of the raw image as stored; never empty in a valid header.
    pub image_file: Vec<u8>,
    /// True when bytes 2060..2560 are not all zero (a warning for `check`, not an error).
    pub reserved_nonzero: bool,
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of an `.add-cow` file. `bytes` shorter than the
    /// header gives [`crate::ErrorKind::ShortHeader`].
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let _ = bytes;
        unimplemented!("issue #2")
    }

    /// The exact 2560 bytes of this header (reserved bytes zero).
    pub fn encode(&self) -> Result<[u8; HEADER_SIZE]> {
        unimplemented!("issue #2")
    }
}
