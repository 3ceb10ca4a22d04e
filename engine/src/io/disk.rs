//! Per-disk shared state: the files, the bitmap, the dirty marks, the commit state and the range
//! lock.
//!
//! This is all that the cores serving one disk share (DESIGN "shared per-disk state is small").
//! Everything else (rings, in-flight operations, buffers in use) belongs to one core.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::bitmap::{DirtyBlocks, SparseBitmap};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{bitmap_len, OpenOptions, Overlay, HEADER_SIZE, SECTOR_SIZE};

use super::align::{dio_align, DioAlign};
use super::base::{BaseSource, RawFileBase};
use super::commit::CommitState;
use super::engine::EngineShared;
use super::range_lock::RangeLock;
use super::stats::DiskCounters;
use super::{CacheMode, Completion, DiskOptions, Request};

/// Block size of the metadata file for dirty marks and commit writes.
pub(crate) const META_BLOCK: u64 = 4096;

/// Which file of a disk an operation touches (the index of its registered-file slot, too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Image = 0,
    Meta = 1,
    Base = 2,
}

/// Registered-file slots per disk: image, meta, base.
pub(crate) const SLOTS_PER_DISK: u32 = 3;

/// A request parked in the range lock, resubmitted to `core` when an overlapping range frees.
pub(crate) struct Parked {
    pub core: usize,
    pub req: Request,
    pub done: Completion,
}

/// The state one open disk shares between the cores that serve it.
///
/// Invariants: bits in `bitmap` only go 0→1 and are set only after the data write that covers
/// them completed (DESIGN invariant 2); a bit set since the last commit has its metadata block
/// marked in `dirty` (set first, mark second); at most one commit is in flight (`commit`).
pub(crate) struct DiskShared {
    pub engine: Arc<EngineShared>,
    pub meta_path: PathBuf,
    pub size: u64,
    pub read_only: bool,
    pub image: File,
    pub image_align: DioAlign,
    /// Read-modify-write unit: the sector, or the raw image's O_DIRECT alignment if larger.
    pub unit: u64,
    pub meta: File,
    pub base: Option<Box<dyn BaseSource>>,
    pub bitmap: SparseBitmap,
    pub dirty: DirtyBlocks,
    /// The metadata file's first HEADER_SIZE bytes as read at open (rewritten unchanged when
    /// block 0 is committed).
    pub header: Vec<u8>,
    /// HEADER_SIZE + bitmap length: commit writes never go past this.
    pub meta_len: u64,
    pub commit: Mutex<CommitState>,
    pub locks: RangeLock<Parked>,
    /// Index `k` of this disk's registered-file slots `3k..3k+3` on every core, if one was free.
    pub slot_index: Option<u32>,
    pub closed: AtomicBool,
    /// An fdatasync of the raw image failed. The kernel may have dropped the unsynced data and
    /// a later fdatasync could still succeed, so no later commit can vouch for it: every FLUSH
    /// and FUA now fails with EIO and no bit is persisted any more (reopen to recover).
    pub sync_failed: AtomicBool,
    /// Requests submitted and not yet answered (close waits for it to reach zero).
    pub active: Arc<AtomicUsize>,
    pub bg_armed: AtomicBool,
    pub next_core: AtomicUsize,
    pub sync_ids: AtomicU64,
    /// What the engine did for this disk (read by `Disk::stats`).
    pub counters: DiskCounters,
    #[cfg(feature = "crash-recorder")]
    pub recorder: Option<Arc<super::recorder::Recorder>>,
}

impl std::fmt::Debug for DiskShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskShared")
            .field("meta_path", &self.meta_path)
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

fn open_overlay(path: &Path, opts: &OpenOptions) -> Result<Overlay> {
    match Overlay::open(path, opts) {
        // A file system without O_DIRECT support refuses the open with EINVAL: serve buffered.
        Err(e)
            if (opts.direct_image || opts.direct_base)
                && e.raw_os_error() == Some(libc::EINVAL) =>
        {
            tracing::warn!(path = %path.display(), "O_DIRECT refused; opening buffered");
            let buffered = OpenOptions {
                read_only: opts.read_only,
                direct_image: false,
                direct_base: false,
                no_lock: opts.no_lock,
            };
            Overlay::open(path, &buffered)
        }
        other => other,
    }
}

fn is_direct(file: &File) -> bool {
    // SAFETY: F_GETFL on an open fd has no memory effects.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

impl DiskShared {
    /// Opens and validates the overlay and builds its shared state (files not yet registered).
    pub(crate) fn open(
        engine: Arc<EngineShared>,
        path: &Path,
        opts: &DiskOptions,
    ) -> Result<DiskShared> {
        let open_opts = OpenOptions {
            read_only: opts.read_only,
            direct_image: engine.config.image_cache == CacheMode::Direct,
            direct_base: engine.config.base_cache == CacheMode::Direct,
            no_lock: false,
        };
        let overlay = open_overlay(path, &open_opts)?;
        let Overlay {
            meta_path,
            virtual_size,
            base_size,
            meta,
            image,
            base,
            bitmap,
            ..
        } = overlay;
        let mut header = vec![0u8; HEADER_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&meta, &mut header, 0)
            .map_err(|e| Error::io("read header", e).with_path(&meta_path))?;
        if virtual_size % SECTOR_SIZE != 0 {
            return Err(
                Error::new(ErrorKind::UnalignedImageSize { size: virtual_size })
                    .with_path(&meta_path),
            );
        }
        let image_align = dio_align(&image, is_direct(&image));
        let unit = image_align.offset.max(SECTOR_SIZE);
        let base: Option<Box<dyn BaseSource>> = base.map(|f| {
            let align = dio_align(&f, is_direct(&f));
            let size = base_size.unwrap_or_else(|| f.metadata().map(|m| m.len()).unwrap_or(0));
            Box::new(RawFileBase::new(f, size, align)) as Box<dyn BaseSource>
        });
        let blen = bitmap_len(virtual_size);
        let slot_index = engine.take_disk_slot();
        Ok(DiskShared {
            #[cfg(feature = "crash-recorder")]
            recorder: engine.config.recorder.clone(),
            engine,
            meta_path,
            size: virtual_size,
            read_only: opts.read_only,
            image,
            image_align,
            unit,
            meta,
            base,
            bitmap,
            dirty: DirtyBlocks::new(blen, META_BLOCK),
            header,
            meta_len: HEADER_SIZE as u64 + blen,
            commit: Mutex::new(CommitState::default()),
            locks: RangeLock::default(),
            slot_index,
            closed: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            active: Arc::new(AtomicUsize::new(0)),
            bg_armed: AtomicBool::new(false),
            next_core: AtomicUsize::new(0),
            sync_ids: AtomicU64::new(1),
            counters: DiskCounters::default(),
        })
    }

    /// The raw fd of `role`'s file (-1 when the disk has no base).
    /// Bytes in the file behind `role` as known at open: the virtual size for the raw image,
    /// the base's size for the base (0 if none), the bitmap's end for the metadata file. A read
    /// that ends short before this is an I/O error, not end of file.
    pub(crate) fn file_len(&self, role: Role) -> u64 {
        match role {
            Role::Image => self.size,
            Role::Meta => self.meta_len,
            Role::Base => self.base.as_ref().map_or(0, |b| b.size()),
        }
    }

    pub(crate) fn fd(&self, role: Role) -> RawFd {
        match role {
            Role::Image => self.image.as_raw_fd(),
            Role::Meta => self.meta.as_raw_fd(),
            Role::Base => self.base.as_ref().and_then(|b| b.main_fd()).unwrap_or(-1),
        }
    }

    /// Sets the bits of sectors `[start, end)` after their data write completed, then marks
    /// their metadata blocks dirty (in that order; see [`DirtyBlocks`]).
    pub(crate) fn set_bits(&self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let (changed, newly) = self.bitmap.set_range_counted(start, end - start);
        if let Some((first, last)) = changed {
            self.dirty.mark_bitmap_bytes(first, last);
        }
        self.counters.bits_set(newly);
    }

    /// After close: waits until every accepted request was answered, then drops the overlay's
    /// OFD lock so the overlay can be opened again (by this process or another) even while
    /// clones of the closed `Disk` still hold its file descriptors.
    pub(crate) fn release(&self) {
        while self.active.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.unlock();
    }

    /// Drops the OFD lock on the metadata file. The rings may still hold registered references
    /// to the file for a moment; the lock must not wait for them.
    fn unlock(&self) {
        crate::format::overlay::ofd_unlock(&self.meta);
    }

    /// The next id for a recorded fdatasync.
    pub(crate) fn next_sync_id(&self) -> u64 {
        self.sync_ids.fetch_add(1, Ordering::Relaxed)
    }
}

impl Drop for DiskShared {
    fn drop(&mut self) {
        // Nothing can use the files any more (every task holds an Arc of this state).
        self.unlock();
        if let Some(k) = self.slot_index {
            self.engine.release_disk_slot(k);
        }
    }
}
