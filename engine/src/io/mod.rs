//! The thread-per-core io_uring engine. OWNER: issue #3.
//!
//! The public types below are the contract with the daemon (issue #4) and the benchmarks
//! (issue #5); the engine's internals live in submodules. See `docs/ARCHITECTURE.md`.

mod buf;
#[cfg(feature = "crash-recorder")]
pub mod recorder;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use buf::IoBuf;

use crate::error::Result;

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

/// One request to a disk. Offsets and lengths are bytes; nothing needs to be aligned.
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes at `offset`; the completion carries the filled buffer.
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

/// Called once, on a core thread, when a request finishes. Keep it short (send to a channel).
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
    _inner: Arc<()>,
}

impl Engine {
    /// Starts the core threads.
    pub fn start(config: EngineConfig) -> Result<Engine> {
        let _ = config;
        unimplemented!("issue #3")
    }

    /// Number of core threads.
    pub fn cores(&self) -> usize {
        unimplemented!("issue #3")
    }

    /// Opens the overlay at `path` (an `.add-cow` file) on this engine.
    pub fn open(&self, path: &Path, opts: DiskOptions) -> Result<Disk> {
        let _ = (path, opts);
        unimplemented!("issue #3")
    }

    /// An aligned buffer of `len` bytes (from the registered arena when one is free), e.g. to
    /// receive a WRITE payload straight from a socket.
    pub fn alloc_buf(&self, len: usize) -> IoBuf {
        IoBuf::new_zeroed(len)
    }

    /// Commits every open disk and stops the core threads.
    pub fn shutdown(&self) -> Result<()> {
        unimplemented!("issue #3")
    }
}

/// An open overlay on an engine. Cheap to clone; all clones share one state (so a FLUSH through
/// any clone covers writes answered through every other: multi-conn safe).
#[derive(Clone)]
pub struct Disk {
    _inner: Arc<()>,
}

impl Disk {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        unimplemented!("issue #3")
    }

    /// Whether the disk was opened read-only.
    pub fn read_only(&self) -> bool {
        unimplemented!("issue #3")
    }

    /// Submits `req` to core `core % engine.cores()`; `done` is called on that core when it finishes.
    pub fn submit(&self, core: usize, req: Request, done: Completion) {
        let _ = (core, req, done);
        unimplemented!("issue #3")
    }

    /// Where the bytes of `[offset, offset+len)` come from, as consecutive extents (clipped to
    /// the disk size). From the in-memory bitmap; no I/O.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        let _ = (offset, len);
        unimplemented!("issue #3")
    }

    /// Blocking convenience: read `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: u32) -> std::result::Result<Vec<u8>, RequestError> {
        let _ = (offset, len);
        unimplemented!("issue #3")
    }

    /// Blocking convenience: write `data` at `offset`.
    pub fn write_at(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> std::result::Result<(), RequestError> {
        let _ = (offset, data, fua);
        unimplemented!("issue #3")
    }

    /// Blocking convenience: FLUSH.
    pub fn flush(&self) -> std::result::Result<(), RequestError> {
        unimplemented!("issue #3")
    }

    /// Commits and detaches this disk from the engine (other clones stop working).
    pub fn close(&self) -> Result<()> {
        unimplemented!("issue #3")
    }
}
