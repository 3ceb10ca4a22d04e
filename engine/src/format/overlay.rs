//! Opening (with full validation) and creating overlays. OWNER: issue #2.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::bitmap::SparseBitmap;
use crate::error::Result;
use crate::format::Header;

/// How to open an overlay's files.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open the raw image and metadata read-only (no lock for writing is taken).
    pub read_only: bool,
    /// Open the raw image with `O_DIRECT`.
    pub direct_image: bool,
    /// Open the base with `O_DIRECT`.
    pub direct_base: bool,
}

/// An open, validated overlay: its three files, resolved paths, sizes and the loaded bitmap.
///
/// Invariants: `virtual_size` is the raw image's size and a multiple of 512; the metadata file
/// holds at least `HEADER_SIZE + bitmap_len(virtual_size)` bytes; the base (if any) is open
/// read-only; a writable overlay holds an exclusive OFD lock on its metadata file.
#[derive(Debug)]
pub struct Overlay {
    /// The `.add-cow` file as given to `open`.
    pub meta_path: PathBuf,
    /// The parsed header.
    pub header: Header,
    /// The raw image's resolved path.
    pub image_path: PathBuf,
    /// The base's resolved path, if any.
    pub base_path: Option<PathBuf>,
    /// Bytes the guest sees: the raw image's size.
    pub virtual_size: u64,
    /// The base's size in bytes, if any (reads past it return zeros).
    pub base_size: Option<u64>,
    /// The `.add-cow` file (read-write unless read-only; never `O_DIRECT`).
    pub meta: File,
    /// The raw image.
    pub image: File,
    /// The base image, always read-only.
    pub base: Option<File>,
    /// The allocation bitmap, loaded from the file.
    pub bitmap: SparseBitmap,
    /// Non-fatal findings (non-zero reserved bytes, bits past the end).
    pub warnings: Vec<String>,
}

impl Overlay {
    /// Opens and validates `path`. Every failure is a typed [`crate::Error`] with the path in it.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Overlay> {
        let _ = (path, opts);
        unimplemented!("issue #2")
    }
}

/// What `create` makes.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The `.add-cow` file to write.
    pub overlay: PathBuf,
    /// The base image; `None` = no base.
    pub base: Option<PathBuf>,
    /// The raw image; default: the overlay's name with `.raw`.
    pub image: Option<PathBuf>,
    /// Size for a new raw image; default: the base's size.
    pub size: Option<u64>,
    /// Overwrite an existing overlay.
    pub force: bool,
}

/// Creates an overlay: header plus an all-clear bitmap, and a sparse raw image if it is missing.
pub fn create(opts: &CreateOptions) -> Result<()> {
    let _ = opts;
    unimplemented!("issue #2")
}
