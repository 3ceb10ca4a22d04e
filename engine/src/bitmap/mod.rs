//! The in-memory allocation bitmap and the dirty marks of bitmap blocks.
//!
//! * [`SparseBitmap`]: one bit per 512-byte sector, LSB-first within each byte exactly as on disk.
//!   Bits only go 0→1 while serving, with atomic operations, so readers never lock. Memory grows with
//!   *mixed* regions: a chunk whose bits are all clear or all set is a null/sentinel pointer.
//! * [`DirtyBlocks`]: which metadata-file blocks hold bits set since the last commit.
//!
//! The signatures are the contract.

mod dirty;
mod sparse;

pub use dirty::DirtyBlocks;
pub use sparse::{SparseBitmap, CHUNK_BITS, CHUNK_BYTES};
