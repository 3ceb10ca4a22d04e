//! What the cores share of a disk's point-in-time view (copy-before-write, "fleecing"): the
//! scratch file and the map of chunks already copied into it. The copying and the view's reads
//! are the cores' (`core/fleece.rs`); the handle is the engine's (`engine/fleece.rs`).
//!
//! Invariants:
//! * A chunk's bit in `copied` goes 0→1 once, and only after the scratch holds the chunk's
//!   bytes as they were when the view began (the write of the copy completed). It never goes
//!   back while the view lives, and the chunk's range of the scratch is never written again.
//! * While the view is active ([`FleeceSlot::get`] returns it), no write changes the bytes of a
//!   chunk whose bit is clear: a write first takes the chunk exclusively in the disk's range
//!   lock, copies it, sets the bit (SeqCst), and only then goes on.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock};

use crate::sync::{read, write};

/// Bytes copied before a write at a time: the granule of the copied-chunk map.
pub(crate) const FLEECE_CHUNK: u64 = 64 << 10;

/// A disk's point-in-time view: see the module docs.
#[derive(Debug)]
pub(crate) struct Fleece {
    pub path: PathBuf,
    /// The scratch file (buffered, sized like the disk; sparse where nothing was copied).
    pub file: File,
    pub size: u64,
    pub chunk: u64,
    /// One bit per chunk: copied into the scratch.
    copied: Box<[AtomicU64]>,
    /// Chunks copied so far.
    pub chunks_copied: AtomicU64,
    /// Copies that failed (each failed the guest write that needed it).
    pub copy_failures: AtomicU64,
}

impl Fleece {
    /// A view of a disk of `size` bytes over the open scratch `file` (already `size` bytes).
    pub(crate) fn new(path: &Path, file: File, size: u64, chunk: u64) -> Fleece {
        let chunks = size.div_ceil(chunk);
        Fleece {
            path: path.to_path_buf(),
            file,
            size,
            chunk,
            copied: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            chunks_copied: AtomicU64::new(0),
            copy_failures: AtomicU64::new(0),
        }
    }

    /// The chunks `[first, end)` covering bytes `[start, end)`.
    pub(crate) fn chunks(&self, start: u64, end: u64) -> (u64, u64) {
        (start / self.chunk, end.div_ceil(self.chunk))
    }

    /// Bytes `[start, end)` of chunk `c` (the last one may be short).
    pub(crate) fn chunk_range(&self, c: u64) -> (u64, u64) {
        let start = c * self.chunk;
        (start, (start + self.chunk).min(self.size))
    }

    /// Whether chunk `c` is in the scratch (SeqCst: see `core/fleece.rs` for the argument).
    pub(crate) fn is_copied(&self, c: u64) -> bool {
        self.copied
            .get((c / 64) as usize)
            .is_some_and(|w| w.load(SeqCst) & (1 << (c % 64)) != 0)
    }

    /// Records chunk `c` as copied: only after the scratch write of its bytes completed.
    pub(crate) fn mark_copied(&self, c: u64) {
        if let Some(w) = self.copied.get((c / 64) as usize) {
            if w.fetch_or(1 << (c % 64), SeqCst) & (1 << (c % 64)) == 0 {
                self.chunks_copied.fetch_add(1, SeqCst);
            }
        }
    }

    /// The uncopied chunks among `[first, end)`.
    pub(crate) fn uncopied(&self, first: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
        (first..end).filter(|&c| !self.is_copied(c))
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Where a disk keeps its active view, if any.
#[derive(Debug, Default)]
pub(crate) struct FleeceSlot {
    /// A view is active (read without a lock on every write).
    on: AtomicBool,
    view: RwLock<Option<Arc<Fleece>>>,
}

impl FleeceSlot {
    /// The active view, if any.
    pub(crate) fn get(&self) -> Option<Arc<Fleece>> {
        if !self.on.load(SeqCst) {
            return None;
        }
        read(&self.view).clone()
    }

    /// Installs the view `make` builds, unless one is active (`None` then; `make` is not
    /// called). Holding the slot while `make` runs, so two begins cannot both build.
    pub(crate) fn install_with<E>(
        &self,
        make: impl FnOnce() -> Result<Arc<Fleece>, E>,
    ) -> Option<Result<Arc<Fleece>, E>> {
        let mut v = write(&self.view);
        if v.is_some() {
            return None;
        }
        Some(make().inspect(|f| {
            *v = Some(Arc::clone(f));
            self.on.store(true, SeqCst);
        }))
    }

    /// Removes the active view `f` (if it is still the one installed).
    pub(crate) fn remove(&self, f: &Arc<Fleece>) {
        let mut v = write(&self.view);
        if v.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, f)) {
            self.on.store(false, SeqCst);
            *v = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_marked_once_and_only_inside_the_disk() {
        let f = Fleece::new(
            Path::new("x"),
            tempfile::tempfile().unwrap(),
            130 * 1024,
            64 * 1024,
        );
        assert_eq!(f.chunks(0, 130 * 1024), (0, 3));
        assert_eq!(f.chunk_range(2), (128 * 1024, 130 * 1024));
        assert_eq!(f.uncopied(0, 3).collect::<Vec<_>>(), vec![0, 1, 2]);
        f.mark_copied(1);
        f.mark_copied(1);
        f.mark_copied(999); // out of the map: ignored, never a panic
        assert!(f.is_copied(1) && !f.is_copied(0) && !f.is_copied(999));
        assert_eq!(f.chunks_copied.load(SeqCst), 1);
        assert_eq!(f.uncopied(0, 3).collect::<Vec<_>>(), vec![0, 2]);
    }
}
