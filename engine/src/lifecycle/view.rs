//! What a guest sees through an image, read synchronously: the lifecycle tools compare and copy
//! guest-visible bytes of bases (raw files or add-cow overlays, to the depth serving allows)
//! without starting an engine. The image and its chain are opened once, as one [`Chain`] (each
//! layer's bitmap loaded once), and read through its runs.

use std::path::Path;

use crate::error::Result;
use crate::format::chain::{Chain, ChainOpenOptions};

/// An image and everything below it, or no image at all (every byte reads as zero).
#[derive(Debug)]
pub struct View(Option<Chain>);

impl View {
    /// Opens the image at `path` read-only (`None`: no image, zeros). With `lock`, every file
    /// is share-locked the way serving locks a base, so nobody can write it meanwhile. A chain
    /// with a remote (NBD) layer is refused: the offline tools do not read image servers.
    pub fn open(path: Option<&Path>, lock: bool) -> Result<View> {
        let Some(path) = path else {
            return Ok(View(None));
        };
        let opts = ChainOpenOptions {
            no_lock: !lock,
            offline: true,
            findings: true,
            ..ChainOpenOptions::default()
        };
        Chain::open(path, opts).map(|c| View(Some(c)))
    }

    /// The chain, if there is an image.
    pub fn chain(&self) -> Option<&Chain> {
        self.0.as_ref()
    }

    /// Guest-visible size: the raw file's size, the overlay's virtual size, 0 for no image.
    pub fn size(&self) -> u64 {
        self.0.as_ref().map_or(0, Chain::size)
    }

    /// Fills `buf` with the guest-visible bytes at `offset`; bytes past the end read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.0 {
            Some(c) => c.read_at(buf, offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Every guest-visible byte (for tests and small images).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.size() as usize];
        self.read_at(&mut out, 0)?;
        Ok(out)
    }
}
