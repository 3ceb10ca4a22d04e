//! How an engine and its disks are set up: [`EngineConfig`], [`CacheMode`], [`DiskOptions`].

use std::time::Duration;

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
    /// Bytes of registered, aligned buffer arena per engine (split into one pool per core).
    pub arena_bytes: usize,
    /// Cache mode of raw images.
    pub image_cache: CacheMode,
    /// Cache mode of bases.
    pub base_cache: CacheMode,
    /// Delay after the first write completed since the last commit before a background commit
    /// makes it durable and persists its bits; `None` = only on FLUSH/FUA/close. Default 5 s:
    /// each background commit begins with a data sync of the raw image, which holds back
    /// concurrent writes until the device has flushed (measured: stalls of up to 2 s under
    /// 1 MiB sequential writes, every second at a 1 s delay).
    pub commit_delay: Option<Duration>,
    /// A read of a remote (NBD) base not answered within this fails with `EIO` (the image
    /// server is reconnected meanwhile). Default 30 s.
    pub base_timeout: Duration,
    /// Fair share between the disks a core serves: the most requests the core keeps submitted
    /// and unanswered (`0`: no fair share, every request is submitted at once). Below it a
    /// request is submitted at once; at it, requests wait in a queue per disk and are let go
    /// round-robin by bytes (deficit round robin) as answers free room, so a disk with a deep
    /// queue cannot hold the others' requests behind all of its own. Default
    /// [`DEFAULT_FAIR_SHARE_REQUESTS`].
    pub fair_share_requests: usize,
    /// Fair share: the most bytes of data a core keeps submitted and unanswered (a request
    /// larger than this still goes alone). Default [`DEFAULT_FAIR_SHARE_BYTES`].
    pub fair_share_bytes: u64,
    /// Test-only: where to log every write and sync issued (see [`crate::io::testing::recorder`]).
    #[cfg(feature = "crash-recorder")]
    pub recorder: Option<std::sync::Arc<crate::io::testing::recorder::Recorder>>,
    /// Test-only: completion results to rewrite (see [`crate::io::testing::faults`]).
    #[cfg(feature = "fault-injection")]
    pub faults: Option<std::sync::Arc<crate::io::testing::faults::FaultPlan>>,
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
            commit_delay: Some(Duration::from_secs(5)),
            base_timeout: Duration::from_secs(30),
            fair_share_requests: DEFAULT_FAIR_SHARE_REQUESTS,
            fair_share_bytes: DEFAULT_FAIR_SHARE_BYTES,
            #[cfg(feature = "crash-recorder")]
            recorder: None,
            #[cfg(feature = "fault-injection")]
            faults: None,
        }
    }
}

/// The default of [`EngineConfig::fair_share_requests`]: 64 per core. Above what the embedded
/// benchmark's deepest profile keeps in flight per core (QD32 over the cores), so one busy disk
/// alone loses nothing; a QD1 request of another disk waits behind at most this many.
pub const DEFAULT_FAIR_SHARE_REQUESTS: usize = 64;

/// The default of [`EngineConfig::fair_share_bytes`]: 32 MiB per core (32 requests of 1 MiB,
/// what a sequential QD32 stream of 1 MiB keeps in flight).
pub const DEFAULT_FAIR_SHARE_BYTES: u64 = 32 << 20;

/// The default of [`DiskOptions::extent_ahead`]: off. Measured on ext4 (docs/PERFORMANCE.md
/// "Writes into holes"), 1 MiB extents ahead made no difference beyond the run-to-run noise:
/// `fallocate` leaves unwritten extents, and each first write still converts its blocks.
pub const DEFAULT_EXTENT_AHEAD: u64 = 0;

/// How to open a disk on the engine.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Serve read-only: writes fail with `EPERM`, nothing is locked for writing.
    pub read_only: bool,
    /// Copy-on-read: every read served (partly) from the base also copies the units it covers
    /// into the raw image and sets their bits (a populate, with its ordering: data durable
    /// before bits, a guest write never clobbered), so a VM's working set moves to the local
    /// disk once. Ignored for a read-only disk.
    pub copy_on_read: bool,
    /// Extent-ahead allocation, in bytes (a power of two of at least 4 KiB; 0 = off): the
    /// first WRITE that lands on a clear sector of an aligned extent of this size also
    /// `fallocate`s that extent of the raw image (mode 0 with KEEP_SIZE: allocation only, no
    /// byte changes, never past the disk's size), once per extent, so later writes there do not
    /// allocate. Off by itself when the raw image has no holes at open; a failing fallocate
    /// never fails the write. Default [`DEFAULT_EXTENT_AHEAD`] (off); 1 MiB is a sensible size.
    pub extent_ahead: u64,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            read_only: false,
            copy_on_read: false,
            extent_ahead: DEFAULT_EXTENT_AHEAD,
        }
    }
}
