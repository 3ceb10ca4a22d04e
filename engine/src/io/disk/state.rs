//! The state one open disk shares between the cores that serve it: its files, the bitmap, the
//! dirty marks, the commit state and the range lock.
//!
//! This is all that the cores serving one disk share (DESIGN "shared per-disk state is small").
//! Everything else (rings, in-flight operations, buffers in use) belongs to one core. The module
//! is a leaf of the engine: it knows nothing of cores, rings or the engine handle.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::bitmap::{DirtyBlocks, SparseBitmap};
use crate::error::{Error, ErrorKind, Result};
use crate::format::overlay::{FileStamp, OverlayStamp};
use crate::format::{bitmap_len, OpenOptions, Overlay, HEADER_SIZE, SECTOR_SIZE};
use crate::sys::{ofd_lock, ofd_unlock, LockKind};

use super::extent_ahead::ExtentAhead;
use super::file_slot::FileSlot;
use super::range_lock::RangeLocks;
use super::stats::DiskCounters;
use crate::io::align::{dio_align, DioAlign};
use crate::io::base::{BaseSource, ChainBase};
use crate::io::config::{CacheMode, DiskOptions, EngineConfig};
use crate::io::remote::RemoteOptions;
use crate::io::request::responder::Responder;
use crate::io::request::{Request, RequestError};
use crate::sync::lock;

/// Block size of the metadata file for dirty marks and commit writes.
pub(crate) const META_BLOCK: u64 = 4096;

/// Which file of a disk an operation touches (the index of its registered-file slot, too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Image = 0,
    Meta = 1,
    Base = 2,
    /// The scratch file of a point-in-time view (never a registered slot: always a plain fd).
    Scratch = 3,
}

/// Registered-file slots per disk: image, meta, base.
pub(crate) const SLOTS_PER_DISK: u32 = 3;

/// A write-like request parked in the range lock until a release grants it what it waits for
/// (the core that releases then goes on with it).
pub(crate) struct Parked {
    pub req: Request,
    pub done: Responder,
}

/// A request waiting for a commit: answered on `core` with the commit's result. Dropping the
/// answer unrun still answers the request (its [`Responder`] does).
pub(crate) struct Waiter {
    pub core: usize,
    pub answer: Box<dyn FnOnce(std::result::Result<(), RequestError>) + Send>,
}

/// The per-disk commit state, behind the disk's mutex.
///
/// Durable point: `durable` is the value of [`DiskState::written`] that the last successful
/// commit read before it submitted its raw-image fdatasync; every mutation that completed before
/// that read is durable. A commit that fails leaves it where it was.
#[derive(Default)]
pub(crate) struct CommitState {
    /// A commit is running (one at a time per disk).
    pub in_flight: bool,
    /// The [`DiskState::written`] value the running commit read at launch (before it pushed its
    /// first sync); `None` while it is not launched yet, or answers without a sync.
    pub in_flight_gen: Option<u64>,
    /// Waiters that arrived while a commit was in flight: they need the next commit.
    pub next: Vec<Waiter>,
    /// Waiters that arrived while a commit was in flight with nothing written or marked since
    /// its launch: the running commit covers them, and answers them with its own result.
    pub riders: Vec<Waiter>,
    /// See the type's docs (0 at open: the first commit always syncs).
    pub durable: u64,
}

/// One count in a disk's requests in flight, given back when dropped (see
/// [`DiskState::enter`]).
pub(crate) struct Entered(Arc<AtomicUsize>);

impl Drop for Entered {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The partial last O_DIRECT unit of the raw image: when the disk's size is not a multiple of
/// the raw image's O_DIRECT alignment, `O_DIRECT` can neither write the last `size - start`
/// bytes (too short) nor a whole unit there (it would grow the file). Every transfer at or past
/// `start` goes through `file`, a second, buffered open of the same raw image (it takes no lock
/// of its own; the fdatasync of the first one flushes the file's pages, whichever fd dirtied
/// them).
#[derive(Debug)]
pub(crate) struct Tail {
    pub start: u64,
    pub file: File,
}

/// See the module docs.
///
/// Invariants: bits in `bitmap` only go 0→1 and are set only after the data write that covers
/// them completed (DESIGN invariant 2); a bit set since the last commit has its metadata block
/// marked in `dirty` (set first, mark second); at most one commit is in flight (`commit`).
pub(crate) struct DiskState {
    pub meta_path: PathBuf,
    /// The raw image's resolved path.
    pub image_path: PathBuf,
    pub size: u64,
    pub read_only: bool,
    /// Copy-on-read: a read served (partly) from the base is followed by a populate of its
    /// range, so the bytes move into the raw image with the normal ordering.
    pub copy_on_read: bool,
    pub image: File,
    pub image_align: DioAlign,
    /// Read-modify-write unit: the sector, or the raw image's O_DIRECT alignment if larger.
    pub unit: u64,
    /// The partial last O_DIRECT unit, if there is one.
    pub tail: Option<Tail>,
    /// Extent-ahead allocation of the raw image (`None`: off, read-only, or no holes at open).
    pub extent_ahead: Option<ExtentAhead>,
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
    /// Stripes being written: shared for whole units, exclusive for read-modify-write.
    pub locks: RangeLocks<Parked>,
    /// No new request is accepted.
    pub closed: AtomicBool,
    /// Work the engine starts on its own (copy-on-read) is refused (see `Disk::quiesce`).
    pub quiesced: AtomicBool,
    /// What the overlay's files were when `Disk::unlock_overlay` let go of their locks (or why
    /// they could not be stamped); taken by `Disk::relock_overlay`.
    pub unlocked: Mutex<Option<std::result::Result<OverlayStamp, String>>>,
    /// The result of closing, once closed (the first close does the work, later ones wait).
    pub close_result: OnceLock<std::result::Result<(), RequestError>>,
    /// An fdatasync of the raw image failed. The kernel may have dropped the unsynced data and
    /// a later fdatasync could still succeed, so no later commit can vouch for it: every FLUSH
    /// and FUA now fails with EIO and no bit is persisted any more (reopen to recover).
    pub sync_failed: AtomicBool,
    /// Requests accepted and not yet answered (close waits for it to reach zero).
    pub active: Arc<AtomicUsize>,
    /// Bytes of copy-on-read populates in flight (bounded by `MAX_COPY_UP_INFLIGHT`).
    pub copy_up_inflight: Arc<AtomicU64>,
    /// Copy-on-reads skipped because too many were in flight (logged once per disk).
    pub copy_ups_skipped: AtomicU64,
    pub bg_armed: AtomicBool,
    /// The write generation: bumped at the completion of every op that changed the raw image
    /// (write, zero write, punch, copy-up write; through either fd), after the op is recorded
    /// and before its request is answered. Starts at 1, so the first commit after open syncs
    /// (an earlier process may have left unsynced pages of the raw image behind).
    pub written: AtomicU64,
    pub next_core: AtomicUsize,
    pub sync_ids: AtomicU64,
    /// What the engine did for this disk (read by `Disk::stats`).
    pub counters: DiskCounters,
    /// The throttle group this disk draws its budget from (`Disk::set_throttle`).
    pub throttle: std::sync::RwLock<Option<crate::qos::ThrottleGroup>>,
    /// Whether `throttle` holds a group (read without the lock on every request).
    pub throttle_on: AtomicBool,
    /// What this disk's requests waited for their group's budget (`Disk::throttle_stats`).
    pub throttle_stats: crate::qos::StatsCounters,
    /// The point-in-time view being served, if any (copy-before-write; `core/fleece.rs`).
    pub fleece: super::fleece::FleeceSlot,
    /// The overlay's dirty bitmaps (changed-block tracking); writes pass its gate.
    pub bitmaps: Arc<crate::dirty::DirtySet>,
    #[cfg(feature = "crash-recorder")]
    pub recorder: Option<Arc<crate::io::testing::recorder::Recorder>>,
    /// Test-only: where publications may be parked (see [`crate::io::testing::faults`]).
    #[cfg(feature = "fault-injection")]
    pub faults: Option<Arc<crate::io::testing::faults::FaultPlan>>,
    /// This disk's registered-file slots; dropped last, when nothing can use them any more.
    pub slot: Option<FileSlot>,
}

impl std::fmt::Debug for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
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
                ..opts.clone()
            };
            Overlay::open(path, &buffered)
        }
        other => other,
    }
}

/// Builds the base the engine reads through from the chain `o` opened (connecting to a remote
/// bottom layer's image server).
fn base_source(o: &mut Overlay, remote: RemoteOptions) -> Result<Option<Box<dyn BaseSource>>> {
    match o.base.take() {
        Some(chain) => {
            let base = ChainBase::new(chain, remote).map_err(|e| e.with_path(&o.meta_path))?;
            Ok(Some(Box::new(base)))
        }
        None => Ok(None),
    }
}

/// A complete overlay (every sector's bit set) never reads its base: when its base cannot be
/// opened (an image server that is down or gone after a stream, a base file that was
/// removed), it is opened without one instead of refused, with a warning. Anything else that
/// failed (the overlay or its raw image, a bitmap with clear bits) returns `err`, the error of
/// the ordinary open.
fn complete_without_base(
    path: &Path,
    opts: &OpenOptions,
    err: Error,
) -> Result<(Overlay, Option<Box<dyn BaseSource>>)> {
    let without = OpenOptions {
        skip_base: true,
        ..opts.clone()
    };
    match open_overlay(path, &without) {
        Ok(o) if !o.header.backing_file.is_empty() && o.bitmap.is_full() => {
            tracing::warn!(path = %path.display(), error = %err,
                "the base cannot be opened; the overlay is complete (every sector is its own), \
                 so it is opened without it");
            Ok((o, None))
        }
        _ => Err(err),
    }
}

/// A [`ErrorKind::ChangedWhileUnlocked`] error for `path`.
fn changed(path: &Path, what: String) -> Error {
    Error::new(ErrorKind::ChangedWhileUnlocked(what))
        .with_path(path)
        .with_op("lock again")
}

/// Checks that the open `file` (the overlay's `role` file at `path`) is as `want` stamped it, and
/// that `path` still names it.
fn check_stamp(role: &str, file: &File, path: &Path, want: &FileStamp) -> Result<()> {
    let now = FileStamp::of_file(file).map_err(|e| Error::io("stat", e).with_path(path))?;
    if !now.same_file(want) {
        return Err(changed(
            path,
            format!("the {role} open is not the file that was let go"),
        ));
    }
    if now != *want {
        return Err(changed(
            path,
            format!(
                "the {role} was written, resized or renamed meanwhile (size {} -> {}, \
                 modified {:?} -> {:?}, changed {:?} -> {:?})",
                want.size, now.size, want.mtime, now.mtime, want.ctime, now.ctime
            ),
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if FileStamp::of(&m).same_file(&now) => Ok(()),
        Ok(_) => Err(changed(
            path,
            format!("another file was put at the {role}'s path meanwhile"),
        )),
        Err(e) => Err(changed(
            path,
            format!("the {role}'s path names no file any more: {e}"),
        )),
    }
}

/// Opens `path` (the raw image) a second time, buffered, and checks it is the file `image`.
fn open_tail(image: &File, path: &Path, read_only: bool) -> Result<File> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| Error::io("open raw image for its last partial unit", e).with_path(path))?;
    let id = |f: &File| f.metadata().map(|m| (m.dev(), m.ino()));
    match (id(image), id(&file)) {
        (Ok(a), Ok(b)) if a == b => Ok(file),
        (Err(e), _) | (_, Err(e)) => Err(Error::io("stat raw image", e).with_path(path)),
        _ => Err(Error::new(ErrorKind::InvalidArgument(
            "the raw image was replaced while it was being opened".into(),
        ))
        .with_path(path)),
    }
}

/// The extent-ahead state `opts` asks for: `None` when off, read-only, or when the raw image
/// has no holes (every block allocated: nothing to gain).
fn extent_ahead(opts: &DiskOptions, image: &File, size: u64) -> Result<Option<ExtentAhead>> {
    use std::os::unix::fs::MetadataExt;
    let ea = opts.extent_ahead;
    if ea == 0 || opts.read_only {
        return Ok(None);
    }
    if !ea.is_power_of_two() || ea < 4096 {
        return Err(Error::new(ErrorKind::InvalidArgument(format!(
            "extent-ahead size {ea} is not a power of two of at least 4096 (or 0 for off)"
        ))));
    }
    let allocated = image.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    Ok((allocated < size).then(|| ExtentAhead::new(ea, size)))
}

impl DiskState {
    /// Opens and validates the overlay (taking its locks) and builds its shared state; `slot`
    /// is its registered-file lease (the files are registered by the caller).
    pub(crate) fn open(
        path: &Path,
        opts: &DiskOptions,
        config: &EngineConfig,
        slot: Option<FileSlot>,
    ) -> Result<DiskState> {
        let open_opts = OpenOptions {
            read_only: opts.read_only,
            direct_image: config.image_cache == CacheMode::Direct,
            direct_base: config.base_cache == CacheMode::Direct,
            ..OpenOptions::default()
        };
        let remote = RemoteOptions {
            timeout: config.base_timeout,
            conns: config.cores,
            ..RemoteOptions::default()
        };
        let (overlay, base) = match open_overlay(path, &open_opts)
            .and_then(|mut o| base_source(&mut o, remote).map(|b| (o, b)))
        {
            Ok(opened) => opened,
            Err(e) => complete_without_base(path, &open_opts, e)?,
        };
        let Overlay {
            meta_path,
            image_path,
            virtual_size,
            meta,
            image,
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
        let direct = crate::sys::is_o_direct(&image);
        let image_align = dio_align(&image, direct);
        let unit = image_align.offset.max(SECTOR_SIZE);
        let tail = if direct && virtual_size % image_align.offset != 0 {
            Some(Tail {
                start: virtual_size - virtual_size % image_align.offset,
                file: open_tail(&image, &image_path, opts.read_only)?,
            })
        } else {
            None
        };
        let extent_ahead =
            extent_ahead(opts, &image, virtual_size).map_err(|e| e.with_path(&meta_path))?;
        let blen = bitmap_len(virtual_size);
        let bitmaps = crate::dirty::DirtySet::open(
            &meta_path,
            virtual_size,
            opts.read_only,
            bitmaps_log(config),
        )?;
        Ok(DiskState {
            bitmaps,
            #[cfg(feature = "crash-recorder")]
            recorder: config.recorder.clone(),
            #[cfg(feature = "fault-injection")]
            faults: config.faults.clone(),
            meta_path,
            image_path,
            size: virtual_size,
            read_only: opts.read_only,
            copy_on_read: opts.copy_on_read && !opts.read_only,
            copy_up_inflight: Arc::new(AtomicU64::new(0)),
            copy_ups_skipped: AtomicU64::new(0),
            image,
            image_align,
            unit,
            tail,
            extent_ahead,
            meta,
            base,
            bitmap,
            dirty: DirtyBlocks::new(blen, META_BLOCK),
            header,
            meta_len: HEADER_SIZE as u64 + blen,
            commit: Mutex::new(CommitState::default()),
            locks: RangeLocks::default(),
            closed: AtomicBool::new(false),
            quiesced: AtomicBool::new(false),
            unlocked: Mutex::new(None),
            close_result: OnceLock::new(),
            sync_failed: AtomicBool::new(false),
            active: Arc::new(AtomicUsize::new(0)),
            bg_armed: AtomicBool::new(false),
            written: AtomicU64::new(1),
            next_core: AtomicUsize::new(0),
            sync_ids: AtomicU64::new(1),
            counters: DiskCounters::default(),
            throttle: std::sync::RwLock::new(None),
            throttle_on: AtomicBool::new(false),
            throttle_stats: crate::qos::StatsCounters::default(),
            fleece: super::fleece::FleeceSlot::default(),
            slot,
        })
    }

    /// Bytes in the file behind `role` as known at open: the virtual size for the raw image,
    /// the base's size for the base (0 if none), the bitmap's end for the metadata file. A read
    /// that ends short before this has not reached the end of the file.
    pub(crate) fn file_len(&self, role: Role) -> u64 {
        match role {
            Role::Image => self.size,
            Role::Meta => self.meta_len,
            Role::Base => self.base.as_ref().map_or(0, |b| b.size()),
            Role::Scratch => self.size,
        }
    }

    /// The length of the file behind an op's descriptor: [`DiskState::file_len`] of `role`, but
    /// for a base read through a deeper layer's file (`fd` not the base's main one), that
    /// file's length.
    pub(crate) fn file_len_of(&self, role: Role, fd: Option<RawFd>) -> u64 {
        match (role, fd, &self.base) {
            (Role::Base, Some(fd), Some(b)) => b.file_len(fd),
            _ => self.file_len(role),
        }
    }

    /// The raw fd of `role`'s file (-1 when the disk has no base).
    pub(crate) fn fd(&self, role: Role) -> RawFd {
        match role {
            Role::Image => self.image.as_raw_fd(),
            Role::Meta => self.meta.as_raw_fd(),
            Role::Base => self.base.as_ref().and_then(|b| b.main_fd()).unwrap_or(-1),
            Role::Scratch => -1,
        }
    }

    /// This disk's registered-file slot index, if it has one.
    pub(crate) fn slot_index(&self) -> Option<u32> {
        self.slot.as_ref().map(FileSlot::index)
    }

    /// Publishes the bits of sectors `[start, end)` after their data write completed: sets
    /// them, then marks their metadata blocks dirty, so that a commit launched once this
    /// returns carries them even if another core set them first ([`DirtyBlocks::publish`]).
    pub(crate) fn set_bits(&self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        #[cfg(feature = "fault-injection")]
        let newly = self
            .dirty
            .publish_with(&self.bitmap, start, end - start, || {
                if let Some(plan) = &self.faults {
                    plan.park_at(
                        crate::io::testing::faults::ParkPoint::Publication(start),
                        end,
                    );
                }
            });
        #[cfg(not(feature = "fault-injection"))]
        let newly = self.dirty.publish(&self.bitmap, start, end - start);
        self.counters.bits_set(newly);
    }

    /// Counts work the engine starts on its own (a copy-on-read) as a request of the disk, unless
    /// the disk is closed or quiesced: `None` then. The count is taken before `closed` and
    /// `quiesced` are read (all SeqCst, as in `Disk::submit`), so either a close (or quiesce)
    /// sees it and waits, or it sees the close (or quiesce).
    pub(crate) fn enter(&self) -> Option<Entered> {
        self.active.fetch_add(1, Ordering::SeqCst);
        let entered = Entered(Arc::clone(&self.active));
        let refused = self.closed.load(Ordering::SeqCst) || self.quiesced.load(Ordering::SeqCst);
        (!refused).then_some(entered)
    }

    /// Waits until every accepted request was answered (after `closed` was set, no new one is).
    pub(crate) fn wait_idle(&self) {
        while self.active.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Drops the OFD locks on the metadata file, the raw image and the base, so the overlay can
    /// be opened again at once (by this process or another) even while clones of a closed
    /// `Disk`, or the rings' registered-file tables, still hold the file descriptors.
    pub(crate) fn release_locks(&self) {
        ofd_unlock(&self.meta);
        ofd_unlock(&self.image);
        if let Some(b) = &self.base {
            b.unlock();
        }
    }

    /// Stamps the metadata file and the raw image (while still locked), then drops their
    /// exclusive locks (the base keeps its shared lock): see [`crate::Disk::unlock_overlay`].
    pub(crate) fn unlock_overlay(&self) {
        let stamp = OverlayStamp::of_files(&self.meta, &self.image).map_err(|e| e.to_string());
        *lock(&self.unlocked) = Some(stamp);
        ofd_unlock(&self.meta);
        ofd_unlock(&self.image);
    }

    /// Takes the exclusive locks on the metadata file and the raw image again (a writable
    /// disk; a read-only one holds none of its own), then checks that both files are as they
    /// were let go (or as `changed_to` says the caller left them) and that their paths still
    /// name them: see [`crate::Disk::relock_overlay`]. On any failure no lock of the overlay's
    /// own is held.
    pub(crate) fn relock_overlay(&self, changed_to: Option<&OverlayStamp>) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let recorded = lock(&self.unlocked).take();
        ofd_lock(&self.meta, LockKind::Exclusive).map_err(|e| e.with_path(&self.meta_path))?;
        if let Err(e) = ofd_lock(&self.image, LockKind::Exclusive) {
            ofd_unlock(&self.meta);
            return Err(e.with_path(&self.image_path));
        }
        let want = match (changed_to, recorded) {
            (Some(s), _) => Ok(*s),
            (None, Some(r)) => r.map_err(|e| {
                changed(
                    &self.meta_path,
                    format!("its files could not be stamped: {e}"),
                )
            }),
            (None, None) => Err(changed(
                &self.meta_path,
                "it was not let go with unlock_overlay".into(),
            )),
        };
        let checked = want.and_then(|w| {
            check_stamp("overlay", &self.meta, &self.meta_path, &w.meta)?;
            check_stamp("raw image", &self.image, &self.image_path, &w.image)
        });
        if let Err(e) = checked {
            ofd_unlock(&self.meta);
            ofd_unlock(&self.image);
            return Err(e);
        }
        Ok(())
    }

    /// An op that may have changed the raw image completed (successfully or not): a commit
    /// launched from now on must sync it. Call after recording the op, before answering.
    pub(crate) fn note_written(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a commit launched now would have nothing to make durable: no mutation completed
    /// since the durable point `durable` and no metadata block is marked.
    ///
    /// With the test-only feature `unsafe-flush-skips-data-sync` the generation is ignored
    /// (deliberately wrong: an overwrite of set bits is never synced), so the crash checker
    /// can prove it catches a skipped sync.
    pub(crate) fn nothing_to_commit(&self, durable: u64) -> bool {
        let gen_clean = cfg!(feature = "unsafe-flush-skips-data-sync")
            || self.written.load(Ordering::SeqCst) == durable;
        gen_clean && !self.dirty.any()
    }

    /// The next id for a recorded fdatasync.
    pub(crate) fn next_sync_id(&self) -> u64 {
        self.sync_ids.fetch_add(1, Ordering::Relaxed)
    }
}

impl Drop for DiskState {
    fn drop(&mut self) {
        // Nothing can use the files any more (every task holds an Arc of this state); the slot
        // lease (a field) is given back after this.
        self.release_locks();
    }
}

/// What the bitmaps sidecar's flusher logs: its writes and syncs as [`FileRole::Bitmaps`]
/// events (crash-recorder feature; `None` otherwise).
///
/// [`FileRole::Bitmaps`]: crate::io::testing::recorder::FileRole::Bitmaps
#[allow(unused_variables)]
fn bitmaps_log(config: &EngineConfig) -> Option<crate::dirty::Log> {
    #[cfg(feature = "crash-recorder")]
    if let Some(r) = &config.recorder {
        use crate::dirty::LogEvent;
        use crate::io::testing::recorder::{Event, FileRole};
        let r = Arc::clone(r);
        return Some(Arc::new(move |ev: LogEvent<'_>| {
            r.push(match ev {
                LogEvent::Write { offset, data } => Event::Write {
                    file: FileRole::Bitmaps,
                    offset,
                    data: data.to_vec(),
                },
                LogEvent::Sync { id, end: false } => Event::SyncBegin {
                    file: FileRole::Bitmaps,
                    id,
                },
                LogEvent::Sync { id, end: true } => Event::SyncEnd {
                    file: FileRole::Bitmaps,
                    id,
                },
            })
        }));
    }
    None
}
