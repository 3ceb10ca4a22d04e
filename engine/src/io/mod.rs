//! The thread-per-core io_uring engine.
//!
//! The public types below are the contract with the daemon and the benchmarks; the engine's
//! internals live in submodules. See `docs/ARCHITECTURE.md`.
//!
//! * `buf`: [`IoBuf`] and the registered arena of aligned buffers.
//! * `engine`: what the threads share (core handles: channel + eventfd, arena, config).
//! * `core`: one core thread: ring, slab of in-flight ops (the `user_data` contract), request
//!   state machines (`core/rw.rs`: read splitting, write / read-modify-write, zeroes;
//!   `core/group_commit.rs`: the commit chain and background timers).
//! * `disk`: per-disk shared state (files, bitmap, dirty marks, commit state, range lock);
//!   `hooks`: the crash-recorder hooks.
//! * `split`: read splitting by the bitmap; `base`: the base behind a small trait;
//!   `range_lock`: the per-sector range lock; `commit`: commit state and block copy;
//!   `align`: `STATX_DIOALIGN`.

mod align;
mod base;
mod buf;
mod commit;
mod core;
mod disk;
mod engine;
mod hooks;
mod range_lock;
#[cfg(feature = "crash-recorder")]
pub mod recorder;
mod split;
mod stats;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

pub use buf::{IoBuf, BUF_ALIGN};
pub use stats::DiskStats;

use crate::error::{Error, ErrorKind, Result};
use disk::DiskShared;
use engine::{CoreHandle, EngineShared, Msg};

/// Whether a file is opened with `O_DIRECT` (bypassing the page cache) or buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum CacheMode {
    /// `O_DIRECT`: aligned buffers, no page cache.
    #[default]
    Direct,
    /// Through the page cache.
    Buffered,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Core threads, each with its own io_uring. Default: one per CPU.
    pub cores: usize,
    /// Submission queue entries per ring (the completion queue is twice that; in-flight
    /// operations are capped so it never overflows).
    pub queue_depth: u32,
    /// Bytes of registered, aligned buffer arena per engine.
    pub arena_bytes: usize,
    /// Cache mode of raw images.
    pub image_cache: CacheMode,
    /// Cache mode of bases.
    pub base_cache: CacheMode,
    /// Delay after the first unflushed write before a background commit; `None` = only on
    /// FLUSH/FUA/close.
    pub commit_delay: Option<Duration>,
    /// Test-only: where to log every write and sync issued (see [`recorder`]).
    #[cfg(feature = "crash-recorder")]
    pub recorder: Option<Arc<recorder::Recorder>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            queue_depth: 256,
            arena_bytes: 64 << 20,
            image_cache: CacheMode::Direct,
            base_cache: CacheMode::Direct,
            commit_delay: Some(Duration::from_secs(1)),
            #[cfg(feature = "crash-recorder")]
            recorder: None,
        }
    }
}

/// How to open a disk on the engine.
#[derive(Debug, Clone, Default)]
pub struct DiskOptions {
    /// Serve read-only: writes fail with `EPERM`, nothing is locked for writing.
    pub read_only: bool,
}

/// Largest READ the engine serves (256 MiB); larger ones fail with `EINVAL` rather than
/// allocate an unbounded buffer.
pub const MAX_READ: u32 = 256 << 20;

/// One request to a disk. Offsets and lengths are bytes; nothing needs to be aligned.
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes (at most [`MAX_READ`]) at `offset`; the completion carries the filled
    /// buffer.
    Read { offset: u64, len: u32 },
    /// Write `data` at `offset`; with `fua`, answered only once data and bits are durable.
    Write { offset: u64, data: IoBuf, fua: bool },
    /// Make every write answered before this request arrived durable (data, then bits).
    Flush,
    /// Make `[offset, offset+len)` read as zeros. `punch`: may deallocate (punch a hole);
    /// otherwise real zeros are written.
    WriteZeroes {
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    },
    /// Discard `[offset, offset+len)`; afterwards it reads as zeros (base data never re-exposed).
    Trim { offset: u64, len: u64, fua: bool },
    /// Prefetch hint: no semantic effect.
    Cache { offset: u64, len: u64 },
}

/// A successful request's result.
#[derive(Debug)]
pub enum Done {
    /// A read's data, exactly the requested length.
    Read(IoBuf),
    /// A write finished; its buffer is handed back for reuse.
    Written(IoBuf),
    /// FLUSH, WRITE_ZEROES, TRIM or CACHE finished.
    Ok,
}

/// Why a request failed. `errno` is a Linux errno (EIO, ENOSPC, EINVAL, EPERM, ESHUTDOWN, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} at offset {offset}: {}", std::io::Error::from_raw_os_error(*errno))]
pub struct RequestError {
    /// Linux errno.
    pub errno: i32,
    /// What the engine was doing ("read raw image", "fdatasync raw image", ...).
    pub op: &'static str,
    /// Byte offset of the request (0 for FLUSH).
    pub offset: u64,
}

/// Called once, on a core thread, when a request finishes. Keep it short (send to a channel),
/// and never block on the engine from inside it (the blocking helpers would deadlock there).
pub type Completion = Box<dyn FnOnce(std::result::Result<Done, RequestError>) + Send + 'static>;

/// Where the bytes of a range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ExtentKind {
    /// Bits set: read from the raw image.
    Image,
    /// Bits clear, inside the base: read from the base.
    Base,
    /// Bits clear, past the base's end or no base: reads as zeros without touching a disk.
    Zero,
}

/// A run of bytes with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Where they come from.
    pub kind: ExtentKind,
}

/// A running engine: N core threads, each with its own ring. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    shared: Arc<EngineShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    disks: Mutex<Vec<Weak<DiskShared>>>,
}

/// Locks `m`, taking the data over from a thread that panicked while holding it (every value
/// kept behind the engine's mutexes stays consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl EngineInner {
    /// Commits every open disk (unless called on a core thread), then stops and joins the cores.
    fn stop(&self) -> Result<()> {
        if self.shared.stopped.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut first_err = None;
        if !core::on_core_thread() {
            let disks: Vec<_> = lock(&self.disks)
                .drain(..)
                .filter_map(|w| w.upgrade())
                .collect();
            for d in disks {
                if d.closed.load(Ordering::Acquire) {
                    continue;
                }
                if let Err(e) = close_disk(&d) {
                    first_err.get_or_insert(
                        Error::io(
                            "commit at shutdown",
                            std::io::Error::from_raw_os_error(e.errno),
                        )
                        .with_path(&d.meta_path),
                    );
                }
            }
        }
        for c in &self.shared.cores {
            let _ = c.send(Msg::Shutdown);
        }
        if !core::on_core_thread() {
            for t in lock(&self.threads).drain(..) {
                let _ = t.join();
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl Engine {
    /// Starts the core threads. Each builds its ring on its own thread (`SINGLE_ISSUER` +
    /// `DEFER_TASKRUN`, falling back to `COOP_TASKRUN` and then to no flags when the kernel
    /// refuses), registers a sparse file table and the buffer arena (falling back to plain
    /// fds / unregistered buffers when that fails).
    pub fn start(config: EngineConfig) -> Result<Engine> {
        let cores = config.cores.max(1);
        if config.queue_depth == 0 {
            return Err(Error::new(ErrorKind::InvalidArgument(
                "queue_depth must be at least 1".into(),
            )));
        }
        let mut handles = Vec::with_capacity(cores);
        let mut receivers = Vec::with_capacity(cores);
        for _ in 0..cores {
            let (tx, rx) = crossbeam_channel::unbounded();
            handles.push(CoreHandle::new(tx).map_err(|e| Error::io("eventfd", e))?);
            receivers.push(rx);
        }
        let arena = buf::Arena::new(config.arena_bytes);
        let shared = Arc::new(EngineShared::new(
            handles,
            arena,
            EngineConfig { cores, ..config },
        ));
        let inner = EngineInner {
            shared: Arc::clone(&shared),
            threads: Mutex::new(Vec::new()),
            disks: Mutex::new(Vec::new()),
        };
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        for (id, rx) in receivers.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("addcow-core-{id}"))
                .spawn(move || {
                    core::Core::mark_thread();
                    match core::Core::new(id, shared) {
                        Ok(c) => {
                            let _ = ready.send(Ok(()));
                            c.run(rx);
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })
                .map_err(|e| Error::io("spawn core thread", e))?;
            lock(&inner.threads).push(spawned);
        }
        drop(ready_tx);
        for _ in 0..cores {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = inner.stop();
                    return Err(Error::io("io_uring setup", e));
                }
                Err(_) => {
                    let _ = inner.stop();
                    return Err(Error::io(
                        "io_uring setup",
                        std::io::Error::other("core thread exited"),
                    ));
                }
            }
        }
        Ok(Engine {
            inner: Arc::new(inner),
        })
    }

    /// Number of core threads.
    pub fn cores(&self) -> usize {
        self.inner.shared.cores.len()
    }

    /// Opens the overlay at `path` (an `.add-cow` file) on this engine. Its files are registered
    /// with every core's ring; any core may serve it.
    pub fn open(&self, path: &Path, opts: DiskOptions) -> Result<Disk> {
        let shared = &self.inner.shared;
        if shared.stopped.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Shutdown).with_path(path));
        }
        let disk = Arc::new(DiskShared::open(Arc::clone(shared), path, &opts)?);
        if let Some(k) = disk.slot_index {
            let fds = [
                disk.fd(disk::Role::Image),
                disk.fd(disk::Role::Meta),
                disk.fd(disk::Role::Base),
            ];
            let (ack_tx, ack_rx) = crossbeam_channel::unbounded();
            let mut sent = 0;
            for c in &shared.cores {
                let msg = Msg::Register {
                    index: k,
                    fds,
                    ack: ack_tx.clone(),
                };
                if c.send(msg).is_ok() {
                    sent += 1;
                }
            }
            for _ in 0..sent {
                let _ = ack_rx.recv();
            }
        }
        let mut disks = lock(&self.inner.disks);
        disks.retain(|w| w.strong_count() > 0);
        disks.push(Arc::downgrade(&disk));
        Ok(Disk { inner: disk })
    }

    /// An aligned, zeroed buffer of `len` bytes (a slot of the registered arena when one is
    /// free, so reads and writes through it use `ReadFixed`/`WriteFixed`), e.g. to receive a
    /// WRITE payload straight from a socket. It may be dropped on any thread.
    pub fn alloc_buf(&self, len: usize) -> IoBuf {
        buf::alloc(self.inner.shared.arena.as_ref(), len, true)
    }

    /// Like [`Engine::alloc_buf`] but without zeroing an arena slot: for a buffer the caller
    /// overwrites completely (e.g. a WRITE payload read straight from a socket).
    ///
    /// The contents are unspecified: an arena slot still holds whatever an earlier request left
    /// in it (never uninitialised memory: the arena is zeroed when created, and the heap
    /// fallback is zeroed). The caller must fill all `len` bytes before reading the buffer or
    /// submitting it, and must drop it unsubmitted if it cannot (e.g. the socket read fails
    /// midway), so no stale bytes reach a disk or a client.
    pub fn alloc_buf_unzeroed(&self, len: usize) -> IoBuf {
        buf::alloc(self.inner.shared.arena.as_ref(), len, false)
    }

    /// Commits every open disk and stops the core threads. Requests submitted afterwards fail
    /// with `ESHUTDOWN`. Do not call it from a completion callback.
    pub fn shutdown(&self) -> Result<()> {
        self.inner.stop()
    }
}

/// An open overlay on an engine. Cheap to clone; all clones share one state (so a FLUSH through
/// any clone covers writes answered through every other: multi-conn safe).
#[derive(Clone)]
pub struct Disk {
    inner: Arc<DiskShared>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

fn blocking<T: Send + 'static>(
    disk: &Arc<DiskShared>,
    req: Request,
    map: impl FnOnce(Done) -> T + Send + 'static,
) -> std::result::Result<T, RequestError> {
    if core::on_core_thread() {
        return Err(RequestError {
            errno: libc::EDEADLK,
            op: "blocking call on a core thread",
            offset: 0,
        });
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let core = disk.next_core.fetch_add(1, Ordering::Relaxed);
    submit(
        disk,
        core,
        req,
        Box::new(move |r| {
            let _ = tx.send(r.map(map));
        }),
    );
    rx.recv().unwrap_or(Err(RequestError {
        errno: libc::ESHUTDOWN,
        op: "engine shut down",
        offset: 0,
    }))
}

/// Commits (unless read-only), stops accepting requests, waits for the accepted ones and
/// releases the overlay's lock.
fn close_disk(d: &Arc<DiskShared>) -> std::result::Result<(), RequestError> {
    let res = if d.read_only {
        Ok(())
    } else {
        blocking_flush(d)
    };
    d.closed.store(true, Ordering::SeqCst);
    d.release();
    res
}

fn blocking_flush(disk: &Arc<DiskShared>) -> std::result::Result<(), RequestError> {
    blocking(disk, Request::Flush, |_| ())
}

fn submit(disk: &Arc<DiskShared>, core: usize, req: Request, done: Completion) {
    let shut = RequestError {
        errno: libc::ESHUTDOWN,
        op: "engine shut down",
        offset: 0,
    };
    // Counted until answered, so close can wait for every accepted request (SeqCst pairs the
    // increment with close's store of `closed`: one of the two sides sees the other).
    let active = Arc::clone(&disk.active);
    active.fetch_add(1, Ordering::SeqCst);
    if disk.closed.load(Ordering::SeqCst) {
        active.fetch_sub(1, Ordering::SeqCst);
        done(Err(RequestError {
            op: "disk closed",
            ..shut
        }));
        return;
    }
    let done: Completion = Box::new(move |r| {
        // A panicking callback must not take the core thread (and every request on it) down.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(r))).is_err() {
            tracing::error!("a request's completion callback panicked");
        }
        active.fetch_sub(1, Ordering::SeqCst);
    });
    let msg = Msg::Submit {
        disk: Arc::clone(disk),
        req,
        done,
    };
    if let Err(Msg::Submit { done, .. }) = disk.engine.core(core).send(msg) {
        done(Err(shut));
    }
}

impl Disk {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Whether the disk was opened read-only.
    pub fn read_only(&self) -> bool {
        self.inner.read_only
    }

    /// The `.add-cow` file this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.meta_path
    }

    /// What the engine did for this disk since it was opened: commits and their batch size,
    /// bits set, bytes read from the base. Lock-free; cheap enough to poll.
    pub fn stats(&self) -> DiskStats {
        self.inner.counters.snapshot()
    }

    /// Bytes whose sectors are held by the raw image (bits set), from the in-memory bitmap.
    pub fn allocated_bytes(&self) -> u64 {
        self.inner.bitmap.count_set() * crate::format::SECTOR_SIZE
    }

    /// Whether every sector is held by the raw image (it is then a complete standalone disk).
    pub fn is_complete(&self) -> bool {
        self.inner.bitmap.is_full()
    }

    /// Submits `req` to core `core % engine.cores()`; `done` is called on that core when it
    /// finishes. Requests that fail validation (read-only, out of range) are answered at once.
    pub fn submit(&self, core: usize, req: Request, done: Completion) {
        submit(&self.inner, core, req, done);
    }

    /// Where the bytes of `[offset, offset+len)` come from, as consecutive extents (clipped to
    /// the disk size). From the in-memory bitmap; no I/O.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        let d = &self.inner;
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

    /// Blocking convenience: read `len` bytes at `offset`. Not from a completion callback.
    pub fn read_at(&self, offset: u64, len: u32) -> std::result::Result<Vec<u8>, RequestError> {
        blocking(&self.inner, Request::Read { offset, len }, |d| match d {
            Done::Read(b) => b.to_vec(),
            _ => Vec::new(),
        })
    }

    /// Blocking convenience: write `data` at `offset`. Not from a completion callback.
    pub fn write_at(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> std::result::Result<(), RequestError> {
        let data = buf::alloc(self.inner.engine.arena.as_ref(), data.len(), false).filled(data);
        blocking(&self.inner, Request::Write { offset, data, fua }, |_| ())
    }

    /// Blocking convenience: any request, answered with its [`Done`]. Not from a completion
    /// callback.
    pub fn request(&self, req: Request) -> std::result::Result<Done, RequestError> {
        blocking(&self.inner, req, |d| d)
    }

    /// Blocking convenience: FLUSH. Not from a completion callback.
    pub fn flush(&self) -> std::result::Result<(), RequestError> {
        blocking_flush(&self.inner)
    }

    /// Commits and detaches this disk from the engine (other clones then get `ESHUTDOWN`).
    pub fn close(&self) -> Result<()> {
        let d = &self.inner;
        if d.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        close_disk(d).map_err(|e| {
            Error::io(
                "commit on close",
                std::io::Error::from_raw_os_error(e.errno),
            )
            .with_path(&d.meta_path)
        })
    }
}
