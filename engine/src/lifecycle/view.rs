//! What a guest sees through an image, read synchronously: the lifecycle tools compare and copy
//! guest-visible bytes of bases (raw files or add-cow overlays, to any depth up to
//! [`MAX_DEPTH`]) without starting an engine.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::format::overlay::{file_len, share_lock_base};
use crate::format::{OpenOptions, Overlay, MAGIC, SECTOR_SIZE};

/// Deepest chain of add-cow images read through one [`Layer`] (a longer one, or a loop, is
/// refused rather than followed forever).
pub const MAX_DEPTH: usize = 16;

/// One image and, for an overlay, everything below it.
#[derive(Debug)]
pub enum Layer {
    /// No image: every byte reads as zero.
    Zeros,
    /// A raw file; bytes past its end read as zero.
    Raw {
        /// The file, read-only.
        file: File,
        /// Its size.
        size: u64,
    },
    /// An add-cow overlay: set sectors from its raw image, clear ones from `below`.
    Overlay {
        /// The overlay, opened read-only.
        overlay: Box<Overlay>,
        /// Its base.
        below: Box<Layer>,
    },
}

/// Whether the file at `path` starts with the add-cow magic.
pub fn is_add_cow(file: &File, path: &Path) -> Result<bool> {
    let mut magic = [0u8; 8];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::io("read magic", e).with_path(path)),
    }
}

impl Layer {
    /// Opens the image at `path` read-only (`None`: [`Layer::Zeros`]). With `lock`, every file
    /// is share-locked the way serving locks a base, so nobody can write it meanwhile.
    pub fn open(path: Option<&Path>, lock: bool) -> Result<Layer> {
        Self::open_depth(path, lock, 0)
    }

    fn open_depth(path: Option<&Path>, lock: bool, depth: usize) -> Result<Layer> {
        let Some(path) = path else {
            return Ok(Layer::Zeros);
        };
        if depth > MAX_DEPTH {
            return Err(Error::new(ErrorKind::InvalidArgument(format!(
                "backing chain deeper than {MAX_DEPTH} images (or a loop) at {}",
                path.display()
            ))));
        }
        if crate::format::paths::nbd_uri(path)?.is_some() {
            return Err(Error::new(ErrorKind::InvalidArgument(format!(
                "{}: a base on an image server (NBD) is not read by the offline tools; stream \
                 the overlay first (then `rebase -u -b \"\"`), or use `rebase -u`",
                path.display()
            ))));
        }
        let file = File::open(path).map_err(|e| Error::io("open base", e).with_path(path))?;
        if is_add_cow(&file, path)? {
            let overlay = Overlay::open(
                path,
                &OpenOptions {
                    read_only: true,
                    no_lock: !lock,
                    ..OpenOptions::default()
                },
            )?;
            let below = Self::open_depth(overlay.base_path.as_deref(), lock, depth + 1)?;
            return Ok(Layer::Overlay {
                overlay: Box::new(overlay),
                below: Box::new(below),
            });
        }
        if lock {
            share_lock_base(&file).map_err(|e| e.with_path(path))?;
        }
        let size = file_len(&file, path, "stat image")?;
        Ok(Layer::Raw { file, size })
    }

    /// Guest-visible size: the raw file's size, the overlay's virtual size, 0 for no image.
    pub fn size(&self) -> u64 {
        match self {
            Layer::Zeros => 0,
            Layer::Raw { size, .. } => *size,
            Layer::Overlay { overlay, .. } => overlay.virtual_size,
        }
    }

    /// Fills `buf` with the guest-visible bytes at `offset`; bytes past the end read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let buf = &mut buf[..inside];
        match self {
            Layer::Zeros => {}
            Layer::Raw { file, .. } => file
                .read_exact_at(buf, offset)
                .map_err(|e| Error::io("read image", e).with_offset(offset))?,
            Layer::Overlay { overlay, below } => {
                let mut pos = 0usize;
                while pos < buf.len() {
                    let at = offset + pos as u64;
                    let sector = at / SECTOR_SIZE;
                    let sector_end = (sector + 1) * SECTOR_SIZE;
                    let want_sectors = (offset + buf.len() as u64).div_ceil(SECTOR_SIZE) - sector;
                    let (set, n) = overlay.bitmap.run_from(sector, want_sectors);
                    let run_end =
                        (sector_end + (n.max(1) - 1) * SECTOR_SIZE).min(offset + buf.len() as u64);
                    let piece = &mut buf[pos..(run_end - offset) as usize];
                    if set {
                        overlay.image.read_exact_at(piece, at).map_err(|e| {
                            Error::io("read raw image", e)
                                .with_path(&overlay.image_path)
                                .with_offset(at)
                        })?;
                    } else {
                        below.read_at(piece, at)?;
                    }
                    pos = (run_end - offset) as usize;
                }
            }
        }
        Ok(())
    }

    /// Every guest-visible byte (for tests and small images).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.size() as usize];
        self.read_at(&mut out, 0)?;
        Ok(out)
    }
}
