//! The [`Backend`] seam between the protocols and the engine, and its engine implementation,
//! [`EngineDisk`] (an engine [`Disk`] whose disk a live snapshot or resize can switch under
//! connected clients).
//!
//! The protocol layers (NBD and vhost-user-blk) talk to a `dyn Backend`; in the daemon that is
//! an engine [`Disk`] (plus its [`Engine`] for buffers). Tests of the protocol layers use an
//! in-memory backend (`super::memory`, in test and fuzzing builds).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use addcow_engine::{
    Completion, DepthExtent, Disk, DiskOptions, Engine, Extent, ExtentKind, IoBuf, Request,
    SourceCtx,
};

use super::probe::LayerFiles;
use addcow_engine::sync::{lock, read, wait_timeout, write};

/// Most bitmaps one export exposes (one bit each in NBD's meta-context selection); bounded so that a
/// block-status reply with every context selected stays within one payload's budget.
pub const MAX_EXPORTED_BITMAPS: usize = 8;

/// What the protocol needs from a disk. Implementations are shared by every connection
/// (so a FLUSH on one connection covers writes answered on any other: multi-conn safe).
pub trait Backend: Send + Sync + 'static {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Submits `req` on core `core`; `done` runs once, when it finishes.
    fn submit(&self, core: usize, req: Request, done: Completion);
    /// Submits `req` from a source running on an engine core thread ([`SourceCtx`]): on that
    /// core with no channel hop where the backend is an engine disk. Never blocks the core:
    /// when the request would have to wait (a disk switch holds new requests back), it is
    /// handed back untouched and the caller submits it from another thread with
    /// [`Backend::submit`]. By default: [`Backend::submit`] to the context's core.
    fn try_submit_local(
        &self,
        ctx: &mut SourceCtx<'_>,
        req: Request,
        done: Completion,
    ) -> Option<(Request, Completion)> {
        self.submit(ctx.core(), req, done);
        None
    }
    /// Where the bytes of `[offset, offset+len)` come from (no I/O).
    fn allocation(&self, offset: u64, len: u64) -> Vec<Extent>;
    /// [`Backend::allocation`] if it can be had without waiting (`None` while a disk switch
    /// holds the disk): for callers on an engine core thread. By default always.
    fn try_allocation(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        Some(self.allocation(offset, len))
    }
    /// Whether the disk's requests are held to throttle limits: a READ then goes to the engine
    /// even where the map says it reads as zeros, so it is metered like any other read (QEMU
    /// meters every read). Lock-free; never waits for a disk switch. By default no.
    fn metered(&self) -> bool {
        false
    }
    /// Which layer supplies each part of `[offset, offset+len)`, numbered like
    /// `qemu:allocation-depth` (no I/O). By default from [`Backend::allocation`]: `1` raw
    /// image, `2` base, `0` zeros (exact for a disk with at most one base layer).
    fn allocation_depth(&self, offset: u64, len: u64) -> Vec<DepthExtent> {
        self.allocation(offset, len)
            .into_iter()
            .map(|e| DepthExtent {
                offset: e.offset,
                len: e.len,
                depth: match e.kind {
                    ExtentKind::Image => 1,
                    ExtentKind::Base => 2,
                    ExtentKind::Zero => 0,
                },
            })
            .collect()
    }
    /// Holds the current disk until the returned guard is dropped: no disk switch can begin or
    /// end meanwhile, so every answer made from this backend's [`Backend::size`],
    /// [`Backend::allocation`], [`Backend::allocation_depth`] and [`Backend::zero_ranges`]
    /// while it is held (block status: extents, then the holes of the files under them)
    /// describes one disk. `None` when the backend's disk never changes. Never from an engine
    /// core thread (a switch waits for requests a core completes).
    fn pin_layout(&self) -> Option<RwLockReadGuard<'_, ()>> {
        None
    }
    /// A buffer of `len` bytes to receive a WRITE payload into. Its contents are unspecified
    /// (stale bytes of an earlier request, not zeroed): the caller fills all of it, or drops it
    /// unsubmitted.
    fn alloc_buf(&self, len: usize) -> IoBuf;
    /// The engine disk behind this backend, if it is one (for its path, counters and close).
    /// After a live snapshot, the new one.
    fn disk(&self) -> Option<Disk> {
        None
    }
    /// The switchable engine disk behind this backend, if it is one (for a live snapshot).
    fn engine_disk(&self) -> Option<&EngineDisk> {
        None
    }
    /// Appends the ranges inside `[start, end)` that the file of `layer` (`Image`: the raw
    /// image, `Base`: the base) is known to read as zeros without holding data (holes), in
    /// order. Nothing appended means nothing is known.
    fn zero_ranges(&self, layer: ExtentKind, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        let _ = (layer, start, end, out);
    }
    /// The alignment (bytes) a WRITE_ZEROES must have to be done by punching a hole alone, with
    /// no zeros written; `None` when the raw image cannot punch holes at all (then every
    /// FAST_ZERO fails fast).
    fn fast_zero_unit(&self) -> Option<u64> {
        Some(512)
    }
    /// The dirty bitmaps this export serves as `qemu:dirty-bitmap:NAME`, in context-id order
    /// (at most [`MAX_EXPORTED_BITMAPS`]).
    fn exported_bitmaps(&self) -> Vec<String> {
        Vec::new()
    }
    /// Dirty and clean runs of exported bitmap `name` over `[offset, offset+len)`, at most
    /// `max`; `None` if it is gone. A live bitmap of the disk, or a frozen one a backup view
    /// serves (both are [`addcow_engine::dirty::DirtySource`]s).
    fn dirty_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Option<Vec<addcow_engine::dirty::DirtyExtent>> {
        let _ = (name, offset, len, max);
        None
    }
}

/// One generation of an [`EngineDisk`]: the open disk and its files for hole queries.
pub struct Generation {
    /// The disk.
    pub disk: Disk,
    /// The raw image and base, opened read-only to ask the file system where their holes are
    /// (`None` when they could not be opened: nothing is reported as zeros then).
    pub files: Option<LayerFiles>,
}

impl Generation {
    /// Opens `overlay` on `engine` with the export's options (every switch opens its disk
    /// with the options the export was added with) and its layer files.
    pub fn open(
        engine: &Engine,
        overlay: &std::path::Path,
        name: &str,
        opts: &DiskOptions,
    ) -> addcow_engine::Result<Generation> {
        let disk = engine.open(overlay, opts.clone())?;
        let files = LayerFiles::open_or_warn(&disk, name);
        Ok(Generation { disk, files })
    }

    /// The FAST_ZERO unit of this disk's raw image, as stored in [`EngineDisk`] (0: none).
    fn fast_zero_code(&self) -> u64 {
        self.files
            .as_ref()
            .and_then(|f| f.fast_zero_unit)
            .unwrap_or(0)
    }
}

/// Requests submitted to the current generation and not yet answered: an atomic count on the
/// request path; the mutex and condvar are touched only when it drops to zero (to wake a
/// switch waiting for it).
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    lock: Mutex<()>,
    idle: Condvar,
}

impl InFlight {
    fn start(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn finish(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _g = lock(&self.lock);
            self.idle.notify_all();
        }
    }

    /// Waits until the count is zero (new requests must be held back by the caller).
    fn wait_idle(&self) {
        let mut g = lock(&self.lock);
        while self.count.load(Ordering::SeqCst) > 0 {
            g = wait_timeout(&self.idle, g, Duration::from_millis(50)).0;
        }
    }
}

/// An engine disk as a [`Backend`], whose disk can be switched under connected clients (a live
/// snapshot: [`EngineDisk::switch`]).
///
/// Every request enters through a read lock on the current generation and is counted until it
/// is answered. A switch takes the write lock, so requests arriving meanwhile wait (their
/// connections' readers block) and then go to the new disk; it waits until every request
/// already submitted was answered, and only then replaces the disk. No request is failed or
/// lost by a switch, and no client is disconnected.
pub struct EngineDisk {
    /// The engine the disk is open on (for buffers).
    pub engine: Engine,
    /// The options the export was added with: every generation is opened with them.
    pub opts: DiskOptions,
    current: RwLock<Arc<Generation>>,
    /// Held shared by [`Backend::pin_layout`] and exclusively by a switch (taken before
    /// `current`, so a pinned reader that takes `current` shared never waits for a switch).
    layout: RwLock<()>,
    /// The current generation's FAST_ZERO unit (0: it cannot punch holes), readable without
    /// the lock (connections check it on engine core threads, which must not wait for a
    /// switch). Updated when a generation is installed, before requests flow to it.
    fast_zero: AtomicU64,
    in_flight: Arc<InFlight>,
    /// The throttle counters of the generations switched away from (added to the current
    /// disk's, so an export's counters never go back at a snapshot or resize).
    retired_throttle: Mutex<addcow_engine::qos::ThrottleStats>,
    /// The bitmaps served as `qemu:dirty-bitmap:NAME` (set once, before the export is published).
    exported_bitmaps: std::sync::OnceLock<Vec<String>>,
}

impl EngineDisk {
    /// `disk` (open on `engine` with `opts`) with its layer files.
    pub fn new(
        engine: Engine,
        opts: DiskOptions,
        disk: Disk,
        files: Option<LayerFiles>,
    ) -> EngineDisk {
        let g = Generation { disk, files };
        EngineDisk {
            engine,
            opts,
            fast_zero: AtomicU64::new(g.fast_zero_code()),
            current: RwLock::new(Arc::new(g)),
            layout: RwLock::new(()),
            in_flight: Arc::default(),
            retired_throttle: Mutex::default(),
            exported_bitmaps: std::sync::OnceLock::new(),
        }
    }

    /// Serves `names` (bitmaps of the disk) as `qemu:dirty-bitmap:NAME`; call before the
    /// export is published. Fails if one is missing or there are too many.
    pub fn export_bitmaps(&self, names: Vec<String>) -> Result<(), String> {
        if names.len() > MAX_EXPORTED_BITMAPS {
            return Err(format!(
                "at most {} bitmaps per export",
                MAX_EXPORTED_BITMAPS
            ));
        }
        let disk = self.current().disk.clone();
        for (i, n) in names.iter().enumerate() {
            if !disk.bitmaps().contains(n) {
                return Err(format!("the disk has no bitmap named {n:?}"));
            }
            if names[..i].contains(n) {
                return Err(format!("bitmap {n:?} named twice"));
            }
        }
        self.exported_bitmaps
            .set(names)
            .map_err(|_| "the export's bitmaps are set already".to_string())
    }

    /// Opens `overlay` as the next generation of this export, with the export's options.
    pub fn open_generation(
        &self,
        overlay: &std::path::Path,
        name: &str,
    ) -> addcow_engine::Result<Generation> {
        Generation::open(&self.engine, overlay, name, &self.opts)
    }

    /// What the export's requests were held back by its throttle group, over every generation.
    pub fn throttle_stats(&self) -> addcow_engine::qos::ThrottleStats {
        let mut s = self.current().disk.throttle_stats();
        let r = lock(&self.retired_throttle);
        s.throttled_requests += r.throttled_requests;
        s.throttled_ns += r.throttled_ns;
        s
    }

    fn current(&self) -> RwLockReadGuard<'_, Arc<Generation>> {
        read(&self.current)
    }

    /// Runs `f` on the current disk with no switch able to begin or end meanwhile (a switch
    /// waits until `f` returned). What `f` decides on the disk it saw (a job that starts
    /// streaming it) is visible to any switch that comes after, which can then refuse.
    pub fn pinned<T>(&self, f: impl FnOnce(&Disk) -> T) -> T {
        let cur = self.current();
        f(&cur.disk)
    }

    /// Holds every new request back, waits until every submitted one was answered and the disk
    /// is quiesced (no copy-on-read the engine admitted for an answered read is left, and none
    /// starts: see [`Disk::quiesce`]), then runs `f` on the current generation: the generation
    /// `f` returns (if any) becomes current before requests flow again (`f` closes the old
    /// one); if none, the current disk takes copy-on-reads again. Requests that arrive during
    /// `f` wait, then go to the current disk. A switch waits for pinned layouts
    /// ([`Backend::pin_layout`]) to be dropped. The new disk is put in the old one's throttle
    /// group before any request reaches it (a switch never lifts a limit).
    pub fn switch<T>(&self, f: impl FnOnce(&Generation) -> (Option<Generation>, T)) -> T {
        let _layout = match self.layout.try_write() {
            Ok(g) => g,
            Err(_) => {
                crate::process::seam::mark("switch-blocked");
                write(&self.layout)
            }
        };
        let mut cur = write(&self.current);
        // Quiesce first: a quiesced disk's throttle queue is let go at once, so the wait below
        // never runs at the throttled rate (with `current` and the caller's locks held). Copy-ups
        // are refused from here on and those admitted before are waited for: a copy-up sets
        // bits after its read was answered, and none may once `f` flushes, lets go of the
        // overlay's locks or closes the disk. No new request reaches the disk meanwhile (the
        // write lock holds `submit` back).
        cur.disk.quiesce();
        // Every request that entered the disk was answered, its completion run.
        self.in_flight.wait_idle();
        // Nothing is in flight: the old disk's throttle counters are final.
        let (group, throttled) = (cur.disk.throttle(), cur.disk.throttle_stats());
        let (next, out) = f(&cur);
        match next {
            Some(g) => {
                g.disk.set_throttle(group);
                let mut r = lock(&self.retired_throttle);
                r.throttled_requests += throttled.throttled_requests;
                r.throttled_ns += throttled.throttled_ns;
                drop(r);
                self.fast_zero.store(g.fast_zero_code(), Ordering::SeqCst);
                *cur = Arc::new(g);
            }
            None => cur.disk.resume(),
        }
        out
    }
}

impl Backend for EngineDisk {
    fn size(&self) -> u64 {
        self.current().disk.size()
    }
    fn read_only(&self) -> bool {
        self.current().disk.read_only()
    }
    fn submit(&self, core: usize, req: Request, done: Completion) {
        // The read lock is held while the request enters the engine, so a switch waits for it
        // and it counts as in flight before the switch looks.
        let cur = self.current();
        self.in_flight.start();
        let in_flight = Arc::clone(&self.in_flight);
        cur.disk.submit(
            core,
            req,
            Box::new(move |r| {
                done(r);
                in_flight.finish();
            }),
        );
    }
    fn try_submit_local(
        &self,
        ctx: &mut SourceCtx<'_>,
        req: Request,
        done: Completion,
    ) -> Option<(Request, Completion)> {
        // A switch holds the write lock while it waits for the requests in flight, some of
        // which this very core must complete: waiting for the lock here would deadlock.
        let Ok(cur) = self.current.try_read() else {
            return Some((req, done));
        };
        self.in_flight.start();
        let in_flight = Arc::clone(&self.in_flight);
        ctx.submit(
            &cur.disk,
            req,
            Box::new(move |r| {
                done(r);
                in_flight.finish();
            }),
        );
        None
    }
    fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        self.current().disk.allocation(offset, len)
    }
    fn try_allocation(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        // A switch holds the write lock while it waits for requests a core must complete.
        let cur = self.current.try_read().ok()?;
        Some(cur.disk.allocation(offset, len))
    }
    fn metered(&self) -> bool {
        // During a switch (the lock held): metered, so a READ goes to the engine whole, which
        // is always right.
        self.current
            .try_read()
            .map_or(true, |cur| cur.disk.is_throttled())
    }
    fn allocation_depth(&self, offset: u64, len: u64) -> Vec<DepthExtent> {
        self.current().disk.allocation_depth(offset, len)
    }
    fn alloc_buf(&self, len: usize) -> IoBuf {
        // The reader overwrites the whole buffer with the payload (or drops it): zeroing it
        // first would be wasted memset.
        self.engine.alloc_buf_unzeroed(len)
    }
    fn disk(&self) -> Option<Disk> {
        Some(self.current().disk.clone())
    }
    fn exported_bitmaps(&self) -> Vec<String> {
        self.exported_bitmaps.get().cloned().unwrap_or_default()
    }
    fn dirty_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Option<Vec<addcow_engine::dirty::DirtyExtent>> {
        self.current()
            .disk
            .bitmaps()
            .extents(name, offset, len, max)
            .ok()
    }
    fn engine_disk(&self) -> Option<&EngineDisk> {
        Some(self)
    }
    fn zero_ranges(&self, layer: ExtentKind, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        if let Some(f) = &self.current().files {
            f.holes(layer, start, end, out);
        }
    }
    fn pin_layout(&self) -> Option<RwLockReadGuard<'_, ()>> {
        Some(read(&self.layout))
    }
    fn fast_zero_unit(&self) -> Option<u64> {
        match self.fast_zero.load(Ordering::SeqCst) {
            0 => None,
            u => Some(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A switch runs its step on a quiesced disk (no copy-on-read can set bits after the
    /// step's flush, unlock or close) and resumes the disk when it stays current.
    #[test]
    fn a_switch_quiesces_the_disk_and_resumes_it_when_it_stays() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = dir.path().join("vm.add-cow");
        addcow_engine::format::create(&addcow_engine::format::CreateOptions {
            overlay: overlay.clone(),
            size: Some(1 << 20),
            ..Default::default()
        })
        .unwrap();
        let engine = Engine::start(addcow_engine::EngineConfig {
            cores: 1,
            arena_bytes: 4 << 20,
            ..Default::default()
        })
        .unwrap();
        let opts = DiskOptions {
            copy_on_read: true,
            ..Default::default()
        };
        let disk = engine.open(&overlay, opts.clone()).unwrap();
        let ed = EngineDisk::new(engine.clone(), opts, disk, None);
        assert!(!ed.disk().unwrap().is_quiesced());
        let during = ed.switch(|cur| (None, cur.disk.is_quiesced()));
        assert!(
            during,
            "the switch ran its step on a disk that could still copy up"
        );
        assert!(
            !ed.disk().unwrap().is_quiesced(),
            "the disk that stays current was not resumed"
        );
        ed.disk().unwrap().close().unwrap();
        engine.shutdown().unwrap();
    }
}
