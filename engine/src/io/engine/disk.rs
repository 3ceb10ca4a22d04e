//! [`Disk`]: an open overlay on an engine, where requests enter: submit (to a core's mailbox,
//! or from a source on its own core), the blocking helpers, close. Above the cores it sends to;
//! what the cores serving it share is in `disk/` (the disk state, a leaf below the cores).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::overlay::OverlayStamp;
use crate::io::core::mailbox::Msg;
use crate::io::core::on_core_thread;
use crate::io::core::shared::EngineShared;
use crate::io::disk::state::{DiskState, Waiter};
use crate::io::disk::stats::DiskStats;
use crate::io::request::responder::Responder;
use crate::io::request::{req_err, Completion, DepthExtent, Done, Extent, Request, RequestError};
use crate::io::source::SourceCtx;
use crate::io::split;
use crate::io::uring::buf;

/// An open overlay on an engine. Cheap to clone; all clones share one state (so a FLUSH through
/// any clone covers writes answered through every other: multi-conn safe).
///
/// Requests go in with [`Disk::submit`] (asynchronous: the completion runs on a core thread) or
/// the blocking helpers ([`Disk::read_at`], [`Disk::write_at`], [`Disk::flush`], ...):
///
/// ```
/// use std::sync::mpsc;
///
/// use addcow_engine::format::{create, CreateOptions};
/// use addcow_engine::{Done, DiskOptions, Engine, EngineConfig, Request};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let overlay = dir.path().join("vm.add-cow");
/// create(&CreateOptions {
///     overlay: overlay.clone(),
///     size: Some(1 << 20),
///     ..CreateOptions::default()
/// })?;
/// let engine = Engine::start(EngineConfig {
///     cores: 1,
///     ..EngineConfig::default()
/// })?;
/// let disk = engine.open(&overlay, DiskOptions::default())?;
///
/// // An unaligned write, submitted asynchronously with an engine buffer.
/// let mut data = engine.alloc_buf(100);
/// data.fill(0x5a);
/// let (tx, rx) = mpsc::channel();
/// disk.submit(0, Request::Write { offset: 7, data: data.into(), fua: false }, Box::new(move |r| {
///     let _ = tx.send(r);
/// }));
/// assert!(matches!(rx.recv()?, Ok(Done::Written(_))));
///
/// disk.flush()?;
/// let back = disk.read_at(0, 512)?;
/// assert_eq!(&back[7..107], &[0x5a; 100][..]);
/// assert_eq!(back[0], 0, "no base: the rest of the sector reads as zeros");
/// // The written sector (or the O_DIRECT unit around it) is now held by the raw image.
/// assert!(disk.allocated_bytes() >= 512);
/// disk.close()?;
/// # engine.shutdown()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Disk {
    state: Arc<DiskState>,
    engine: Arc<EngineShared>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.state.fmt(f)
    }
}

fn shut(op: &'static str) -> RequestError {
    req_err(libc::ESHUTDOWN, op, 0)
}

/// Accepts `req` for `disk` (unless it is closed) and sends it to `core`.
fn submit(
    engine: &EngineShared,
    disk: &Arc<DiskState>,
    core: usize,
    req: Request,
    done: Completion,
) {
    let Some(done) = accept(disk, done) else {
        return;
    };
    let msg = Msg::Submit {
        disk: Arc::clone(disk),
        req,
        done,
    };
    if let Err(Msg::Submit { done, .. }) = engine.core(core).send(msg) {
        done.answer(Err(shut("engine shut down")));
    }
}

/// Counts a request for `disk` until it is answered (so close can wait for every accepted
/// request), or answers it at once when the disk is closed.
pub(super) fn accept(disk: &Arc<DiskState>, done: Completion) -> Option<Responder> {
    // SeqCst pairs the increment with close's store of `closed`: one of the two sides sees the
    // other.
    disk.active.fetch_add(1, Ordering::SeqCst);
    let done = Responder::new(done, Arc::clone(&disk.active));
    if disk.closed.load(Ordering::SeqCst) {
        done.answer(Err(shut("disk closed")));
        return None;
    }
    Some(done)
}

impl SourceCtx<'_> {
    /// Submits `req` for `disk` on this core, with no channel hop; `done` is called as for
    /// [`Disk::submit`] (on this core). A disk of another engine goes through its channel.
    pub fn submit(&mut self, disk: &Disk, req: Request, done: Completion) {
        let core = self.local.core_id();
        if Arc::as_ptr(&disk.engine).cast::<()>() != self.local.engine_id() {
            disk.submit(core, req, done);
            return;
        }
        if let Some(done) = accept(&disk.state, done) {
            self.local.submit_local(Arc::clone(&disk.state), req, done);
        }
    }

    /// The core this source runs on.
    pub fn core(&self) -> usize {
        self.local.core_id()
    }
}

/// Submits `req` and waits for its answer (not on a core thread: that would deadlock).
fn blocking<T: Send + 'static>(
    engine: &EngineShared,
    disk: &Arc<DiskState>,
    req: Request,
    map: impl FnOnce(Done) -> T + Send + 'static,
) -> std::result::Result<T, RequestError> {
    if on_core_thread() {
        return Err(req_err(libc::EDEADLK, "blocking call on a core thread", 0));
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let core = disk.next_core.fetch_add(1, Ordering::Relaxed);
    submit(
        engine,
        disk,
        core,
        req,
        Box::new(move |r| {
            let _ = tx.send(r.map(map));
        }),
    );
    rx.recv().unwrap_or(Err(shut("engine shut down")))
}

/// Runs the final commit of a closing disk on some core (trying each until one answers).
fn final_commit(
    engine: &EngineShared,
    disk: &Arc<DiskState>,
) -> std::result::Result<(), RequestError> {
    let first = disk.next_core.fetch_add(1, Ordering::Relaxed);
    for i in 0..engine.cores.len() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiter = Waiter {
            core: first + i,
            answer: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        };
        let msg = Msg::Commit {
            disk: Arc::clone(disk),
            waiter,
        };
        if engine.core(first + i).send(msg).is_err() {
            continue; // that core is gone
        }
        if let Ok(r) = rx.recv() {
            return r;
        }
    }
    Err(shut("no core left to commit"))
}

/// Closes `disk` (once; later calls wait for the first and get its result): refuses new
/// requests, waits until every accepted one was answered, commits if `commit` (and the disk is
/// writable; the commit runs after the last answer, so it covers every acknowledged write), and
/// drops the overlay's locks.
pub(crate) fn close_disk(
    engine: &EngineShared,
    disk: &Arc<DiskState>,
    commit: bool,
) -> std::result::Result<(), RequestError> {
    if on_core_thread() {
        return Err(req_err(libc::EDEADLK, "close on a core thread", 0));
    }
    disk.close_result
        .get_or_init(|| {
            disk.closed.store(true, Ordering::SeqCst);
            // Requests waiting for throttle budget or fair share are let go at once.
            engine.wake_all();
            disk.wait_idle();
            let res = if disk.read_only || !commit {
                Ok(())
            } else {
                final_commit(engine, disk)
            };
            disk.release_locks();
            res
        })
        .clone()
}

impl Disk {
    pub(crate) fn new(state: Arc<DiskState>, engine: Arc<EngineShared>) -> Disk {
        Disk { state, engine }
    }

    /// The shared state and the engine (for the point-in-time view, `fleece.rs`).
    pub(super) fn parts(&self) -> (&Arc<DiskState>, &Arc<EngineShared>) {
        (&self.state, &self.engine)
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.state.size
    }

    /// Whether the disk was opened read-only.
    pub fn read_only(&self) -> bool {
        self.state.read_only
    }

    /// Whether reads served from the base are copied into the raw image (copy-on-read).
    pub fn copy_on_read(&self) -> bool {
        self.state.copy_on_read
    }

    /// The `.add-cow` file this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.state.meta_path
    }

    /// Every file this disk holds open, top first: the `.add-cow` file and the raw image (depth
    /// 0, what requests write), then each layer of its base (depth 1 is the direct base), and a
    /// remote bottom layer (no descriptor). The descriptors are the ones the engine reads and
    /// writes through (the raw image's second, buffered descriptor for its partial last unit
    /// is checked at open to be the same file), so a caller that checks these checks exactly
    /// what will be served, whatever the paths name by now.
    pub fn opened_files(&self) -> Vec<crate::format::OpenedFile<'_>> {
        use crate::format::{ChainFile, FileRole, LayerFormat, OpenedFile};
        use std::os::fd::AsFd;
        let s = &self.state;
        let top = |role, path: &Path| ChainFile {
            depth: 0,
            role,
            path: path.to_path_buf(),
            format: Some(LayerFormat::AddCow),
        };
        let mut out = vec![
            OpenedFile {
                file: top(FileRole::Named, &s.meta_path),
                fd: Some(s.meta.as_fd()),
            },
            OpenedFile {
                file: top(FileRole::Data, &s.image_path),
                fd: Some(s.image.as_fd()),
            },
        ];
        if let Some(base) = &s.base {
            base.opened_files(1, &mut out);
        }
        out
    }

    /// What the engine did for this disk since it was opened: commits and their batch size,
    /// bits set, bytes read from the base. Lock-free; cheap enough to poll.
    pub fn stats(&self) -> DiskStats {
        self.state.counters.snapshot()
    }

    /// Bytes whose sectors are held by the raw image (bits set), from the in-memory bitmap.
    pub fn allocated_bytes(&self) -> u64 {
        self.state.bitmap.count_set() * crate::format::SECTOR_SIZE
    }

    /// Whether every sector is held by the raw image (it is then a complete standalone disk).
    pub fn is_complete(&self) -> bool {
        self.state.bitmap.is_full()
    }

    /// This disk's dirty bitmaps (changed-block tracking): add, remove, clear, enable,
    /// disable, merge, list and read them (see [`crate::dirty::DirtySet`]). Writes answered
    /// after a change returns are tracked by it.
    pub fn bitmaps(&self) -> &Arc<crate::dirty::DirtySet> {
        &self.state.bitmaps
    }

    /// For a point-in-time backup: creates the enabled persistent bitmap `new` and, with
    /// `incremental`, returns a frozen copy of that bitmap (what changed since that checkpoint)
    /// and disables it, durably, in one step (see [`crate::dirty::DirtySet::checkpoint`]).
    ///
    /// Precondition: the caller holds this disk's writes (none in flight, none admitted until
    /// this returns: the export's new requests are held and every accepted one was answered),
    /// so the new bitmap and the frozen one split the writes at one instant.
    pub fn checkpoint(
        &self,
        new: &str,
        granularity: u64,
        incremental: Option<&str>,
    ) -> Result<Option<crate::dirty::FrozenBitmap>> {
        self.state.bitmaps.checkpoint(new, granularity, incremental)
    }

    /// Puts this disk in throttle group `group` (`None`: no limits, served by fair share with
    /// the other disks on its cores). Takes effect for the next request; requests already
    /// waiting for the old group's budget are re-timed against the new one.
    pub fn set_throttle(&self, group: Option<crate::qos::ThrottleGroup>) {
        if let Some(g) = &group {
            // The group wakes this engine's cores when its limits change (once per engine).
            let engine = Arc::downgrade(&self.engine);
            g.add_waker(
                Arc::as_ptr(&self.engine) as usize,
                Box::new(move || match engine.upgrade() {
                    Some(e) => {
                        e.wake_all();
                        true
                    }
                    None => false,
                }),
            );
        }
        {
            let mut t = crate::sync::write(&self.state.throttle);
            self.state
                .throttle_on
                .store(group.is_some(), Ordering::SeqCst);
            *t = group;
        }
        // Requests waiting for the old group's budget are looked at again.
        crate::qos::bump_limits_epoch();
        self.engine.wake_all();
    }

    /// Whether this disk is in a throttle group (lock-free: one atomic load). A front end that
    /// answers some requests without the engine (an NBD READ of holes) must not do so for a
    /// throttled disk: every request is metered.
    pub fn is_throttled(&self) -> bool {
        self.state.throttle_on.load(Ordering::SeqCst)
    }

    /// The throttle group this disk is in, if any.
    pub fn throttle(&self) -> Option<crate::qos::ThrottleGroup> {
        crate::sync::read(&self.state.throttle).clone()
    }

    /// What this disk's requests have been held back by its throttle group since it was opened.
    /// Lock-free.
    pub fn throttle_stats(&self) -> crate::qos::ThrottleStats {
        self.state.throttle_stats.snapshot()
    }

    /// Submits `req` to core `core % engine.cores()`; `done` is called exactly once, on a core
    /// thread, when it finishes: on that core, except for a write that had to wait in the range
    /// lock for another write of the same units, which finishes on the core that let it go on.
    /// Requests that fail validation (read-only, out of range) or reach a closed disk are
    /// answered at once, on the calling thread.
    pub fn submit(&self, core: usize, req: Request, done: Completion) {
        submit(&self.engine, &self.state, core, req, done);
    }

    /// Where the bytes of `[offset, offset+len)` come from, as consecutive extents (clipped to
    /// the disk size). From the in-memory bitmap; no I/O.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        let d = &self.state;
        let start = offset.min(d.size);
        let end = offset.saturating_add(len).min(d.size);
        let mut out = Vec::new();
        split::extents(
            &d.bitmap,
            d.base.as_ref().map(|b| b.size()),
            start,
            end - start,
            &mut out,
        );
        out
    }

    /// Which layer of the backing chain supplies each part of `[offset, offset+len)` (clipped
    /// to the disk size), as consecutive extents numbered like `qemu:allocation-depth` (see
    /// [`DepthExtent`]). From the in-memory bitmaps of every layer; no I/O. At most one extent
    /// per 512-byte sector of the range (plus one), like [`Disk::allocation`].
    pub fn allocation_depth(&self, offset: u64, len: u64) -> Vec<DepthExtent> {
        let d = &self.state;
        let start = offset.min(d.size);
        let end = offset.saturating_add(len).min(d.size);
        let mut out = Vec::new();
        split::depth_extents(&d.bitmap, d.base.as_deref(), start, end - start, &mut out);
        out
    }

    /// Blocking convenience: read `len` bytes at `offset`. Not from a completion callback.
    pub fn read_at(&self, offset: u64, len: u32) -> std::result::Result<Vec<u8>, RequestError> {
        blocking(
            &self.engine,
            &self.state,
            Request::Read { offset, len },
            |d| match d {
                Done::Read(b) => b.to_vec(),
                _ => Vec::new(),
            },
        )
    }

    /// Blocking convenience: write `data` at `offset`. Not from a completion callback.
    pub fn write_at(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> std::result::Result<(), RequestError> {
        let data = buf::alloc(self.engine.arena.as_ref(), data.len(), false).filled(data);
        blocking(
            &self.engine,
            &self.state,
            Request::Write {
                offset,
                data: data.into(),
                fua,
            },
            |_| (),
        )
    }

    /// Blocking convenience: any request, answered with its [`Done`]. Not from a completion
    /// callback.
    pub fn request(&self, req: Request) -> std::result::Result<Done, RequestError> {
        blocking(&self.engine, &self.state, req, |d| d)
    }

    /// Blocking convenience: POPULATE `[offset, offset+len)` (see [`Request::Populate`]);
    /// returns (bytes copied from the base, bytes made to read as zeros). Not durable until the
    /// next FLUSH. Not from a completion callback.
    pub fn populate(&self, offset: u64, len: u64) -> std::result::Result<(u64, u64), RequestError> {
        blocking(
            &self.engine,
            &self.state,
            Request::Populate { offset, len },
            |d| match d {
                Done::Populated { copied, zeroed } => (copied, zeroed),
                _ => (0, 0),
            },
        )
    }

    /// The first clear sector's byte range at or after `offset`: `(start, len)` of the run of
    /// clear sectors there (at most `max` bytes), or `None` when every sector from `offset` on
    /// is set. From the in-memory bitmap; no I/O. What a stream walks.
    pub fn next_clear(&self, offset: u64, max: u64) -> Option<(u64, u64)> {
        let bits = &self.state.bitmap;
        let sectors = bits.sectors();
        let mut s = offset / crate::format::SECTOR_SIZE;
        while s < sectors {
            let (set, n) = bits.run_from(s, u64::MAX);
            if n == 0 {
                return None;
            }
            if !set {
                let max_sectors = (max / crate::format::SECTOR_SIZE).max(1);
                let start = s * crate::format::SECTOR_SIZE;
                let len = n.min(max_sectors) * crate::format::SECTOR_SIZE;
                return Some((start, len.min(self.state.size - start)));
            }
            s += n;
        }
        None
    }

    /// Blocking convenience: FLUSH. Not from a completion callback.
    pub fn flush(&self) -> std::result::Result<(), RequestError> {
        blocking(&self.engine, &self.state, Request::Flush, |_| ())
    }

    /// Lets another opener lock this overlay for writing while the disk stays open: records
    /// what its metadata file and raw image are ([`OverlayStamp`]: identity, size, times), then
    /// drops their exclusive locks (the base keeps its shared lock). For a disk switch that
    /// must keep serving this disk if the next one cannot be opened: the caller guarantees that
    /// nothing is submitted to this disk and nothing is dirty (every request answered, the disk
    /// quiesced with [`Disk::quiesce`], then a FLUSH) until it either closes the disk or takes
    /// the locks back with [`Disk::relock_overlay`]. While unlocked, any process can lock the
    /// overlay, write it, or rename another file over its path.
    pub fn unlock_overlay(&self) {
        self.state.unlock_overlay();
    }

    /// Takes back the locks [`Disk::unlock_overlay`] dropped, then checks that nobody touched the
    /// overlay meanwhile: each file's stamp (`fstat` of this disk's descriptors) equals the one
    /// recorded at the unlock, or `changed_to` when the caller changed the files itself in
    /// between (an offline grow: the stamp its tool took before letting go of its own lock), and
    /// each path still names the file this disk has open. Fails with
    /// [`ErrorKind::Locked`](crate::ErrorKind::Locked) when another opener holds the overlay, and
    /// with [`ErrorKind::ChangedWhileUnlocked`](crate::ErrorKind::ChangedWhileUnlocked) when a
    /// file was written, resized or replaced: the disk must then not be written again (its
    /// bitmap is stale, or its files are ones nobody opens any more): [`Disk::abandon`] it. On
    /// failure the disk holds none of the overlay's locks.
    pub fn relock_overlay(&self, changed_to: Option<&OverlayStamp>) -> Result<()> {
        self.state.relock_overlay(changed_to)
    }

    /// Stops the work the engine starts on its own for this disk and waits until none is left:
    /// from now on copy-on-reads are refused (they are optional: the read was answered, a later
    /// read copies up again), then it waits until every accepted request, and every copy-up
    /// admitted before, was answered. Requests submitted meanwhile or later are still served
    /// (a FLUSH after this covers every bit that will ever be set until [`Disk::resume`]). For
    /// a disk switch that holds new requests back: nothing changes the overlay any more once it
    /// is flushed. Not from a completion callback (it waits for cores).
    pub fn quiesce(&self) {
        self.state.quiesced.store(true, Ordering::SeqCst);
        // Requests waiting for throttle budget or fair share are let go at once.
        self.engine.wake_all();
        self.state.wait_idle();
    }

    /// Lets the engine start copy-on-reads again after [`Disk::quiesce`].
    pub fn resume(&self) {
        self.state.quiesced.store(false, Ordering::SeqCst);
    }

    /// Whether [`Disk::quiesce`] was called and [`Disk::resume`] not since.
    pub fn is_quiesced(&self) -> bool {
        self.state.quiesced.load(Ordering::SeqCst)
    }

    /// Closes this disk for every clone WITHOUT a final commit: for a disk whose overlay it must
    /// not write any more ([`Disk::relock_overlay`] failed: another process may hold or have
    /// replaced it). New requests get `ESHUTDOWN`; it waits until every accepted request was
    /// answered, writes nothing, and releases the locks it holds. Bits set since the last
    /// commit are not written (call it on a flushed, quiesced disk, where there are none).
    /// Closing again (or [`Disk::close`] after this) returns `Ok` and does nothing. Not from a
    /// completion callback.
    pub fn abandon(&self) -> Result<()> {
        close_disk(&self.engine, &self.state, false).map_err(|e| {
            Error::io("abandon", std::io::Error::from_raw_os_error(e.errno))
                .with_path(&self.state.meta_path)
        })
    }

    /// Closes this disk for every clone: new requests get `ESHUTDOWN`; then it waits until every
    /// request accepted before was answered, commits (so every acknowledged write is durable),
    /// and releases the overlay's locks. Closing again returns the first close's result. Not
    /// from a completion callback.
    pub fn close(&self) -> Result<()> {
        close_disk(&self.engine, &self.state, true).map_err(|e| {
            Error::io(
                "commit on close",
                std::io::Error::from_raw_os_error(e.errno),
            )
            .with_path(&self.state.meta_path)
        })
    }
}
