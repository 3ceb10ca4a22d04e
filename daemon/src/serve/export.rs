//! Exports: the named disks a daemon serves, and the [`Backend`] seam between the protocol and
//! the engine.
//!
//! The protocol layer talks to a `dyn Backend`; in the daemon that is an engine [`Disk`] (plus its
//! [`Engine`] for buffers). Tests of the protocol layer use an in-memory backend.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use addcow_engine::{
    Completion, DepthExtent, Disk, DiskOptions, Engine, Extent, ExtentKind, IoBuf, Request,
    SourceCtx,
};

use super::conns::ClientHandle;
use super::probe::LayerFiles;
use super::stats::ExportStats;
use super::wire;

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
        let files = LayerFiles::open_or_warn(overlay, !disk.read_only(), name);
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
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.idle.notify_all();
        }
    }

    /// Waits until the count is zero (new requests must be held back by the caller).
    fn wait_idle(&self) {
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.count.load(Ordering::SeqCst) > 0 {
            g = self
                .idle
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
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
        }
    }

    /// Opens `overlay` as the next generation of this export, with the export's options.
    pub fn open_generation(
        &self,
        overlay: &std::path::Path,
        name: &str,
    ) -> addcow_engine::Result<Generation> {
        Generation::open(&self.engine, overlay, name, &self.opts)
    }

    fn current(&self) -> RwLockReadGuard<'_, Arc<Generation>> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
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
    /// ([`Backend::pin_layout`]) to be dropped.
    pub fn switch<T>(&self, f: impl FnOnce(&Generation) -> (Option<Generation>, T)) -> T {
        let _layout = match self.layout.try_write() {
            Ok(g) => g,
            Err(_) => {
                super::seam::mark("switch-blocked");
                self.layout.write().unwrap_or_else(|p| p.into_inner())
            }
        };
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        self.in_flight.wait_idle();
        // A copy-up sets bits after its read was answered: none may once `f` flushes, lets go
        // of the overlay's locks or closes the disk.
        cur.disk.quiesce();
        let (next, out) = f(&cur);
        match next {
            Some(g) => {
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
    fn engine_disk(&self) -> Option<&EngineDisk> {
        Some(self)
    }
    fn zero_ranges(&self, layer: ExtentKind, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        if let Some(f) = &self.current().files {
            f.holes(layer, start, end, out);
        }
    }
    fn pin_layout(&self) -> Option<RwLockReadGuard<'_, ()>> {
        Some(self.layout.read().unwrap_or_else(|p| p.into_inner()))
    }
    fn fast_zero_unit(&self) -> Option<u64> {
        match self.fast_zero.load(Ordering::SeqCst) {
            0 => None,
            u => Some(u),
        }
    }
}

/// Whether an export takes new clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Serving,
    /// `export-del` began: invisible to LIST/GO, no client may attach.
    Deleting,
}

#[derive(Debug)]
struct Clients {
    state: State,
    conns: HashMap<u64, Arc<ClientHandle>>,
}

/// Why an export could not start being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteRefused {
    /// `safe` mode and clients are connected.
    Busy(usize),
    /// Another `export-del` of this export is under way.
    AlreadyDeleting,
}

/// One export: a name clients ask for, the disk behind it, its request statistics and the
/// connections in transmission on it.
pub struct Export {
    /// The export name ("" = the default export).
    pub name: String,
    /// The disk.
    pub backend: Arc<dyn Backend>,
    /// Request counters, one shard per engine core.
    pub stats: Arc<ExportStats>,
    clients: Mutex<Clients>,
    left: Condvar,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("name", &self.name).finish()
    }
}

/// A connection's membership of an export's client table; leaving the table (and waking an
/// `export-del` waiting for it) happens when this is dropped, also on unwinding.
pub struct Attached {
    export: Arc<Export>,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut c = self.export.lock_clients();
        c.conns.remove(&self.id);
        drop(c);
        self.export.left.notify_all();
    }
}

impl Export {
    /// An export of `backend` called `name`, counting on `shards` cores.
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>, shards: usize) -> Arc<Export> {
        Arc::new(Export {
            name: name.into(),
            backend,
            stats: Arc::new(ExportStats::new(shards)),
            clients: Mutex::new(Clients {
                state: State::Serving,
                conns: HashMap::new(),
            }),
            left: Condvar::new(),
        })
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Transmission flags for this export. `structured`: whether structured replies were
    /// negotiated (DF is only advertised then).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = wire::FLAG_HAS_FLAGS
            | wire::FLAG_SEND_FLUSH
            | wire::FLAG_SEND_FUA
            | wire::FLAG_CAN_MULTI_CONN
            | wire::FLAG_SEND_CACHE;
        if self.backend.read_only() {
            flags |= wire::FLAG_READ_ONLY;
        } else {
            flags |=
                wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES | wire::FLAG_SEND_FAST_ZERO;
        }
        if structured {
            flags |= wire::FLAG_SEND_DF;
        }
        flags
    }

    /// Adds connection `id` to the client table, unless a delete has begun (then `None`: the
    /// connection must close without serving).
    pub fn attach(self: &Arc<Self>, id: u64, handle: Arc<ClientHandle>) -> Option<Attached> {
        let mut c = self.lock_clients();
        if c.state != State::Serving {
            return None;
        }
        c.conns.insert(id, handle);
        Some(Attached {
            export: Arc::clone(self),
            id,
        })
    }

    /// Connections in transmission on this export.
    pub fn client_count(&self) -> usize {
        self.lock_clients().conns.len()
    }

    /// Whether an `export-del` has begun.
    pub fn is_deleting(&self) -> bool {
        self.lock_clients().state == State::Deleting
    }

    /// Starts a delete: from now on no connection can attach. `safe`: refuse while clients are
    /// connected (checked under the same lock as [`Export::attach`], so none can slip in).
    /// Otherwise every client's reader is stopped: in-flight requests are answered, then the
    /// connections close.
    pub fn begin_delete(&self, safe: bool) -> Result<usize, DeleteRefused> {
        let mut c = self.lock_clients();
        if c.state == State::Deleting {
            return Err(DeleteRefused::AlreadyDeleting);
        }
        if safe && !c.conns.is_empty() {
            return Err(DeleteRefused::Busy(c.conns.len()));
        }
        c.state = State::Deleting;
        for h in c.conns.values() {
            h.stop_reading();
        }
        Ok(c.conns.len())
    }

    /// Waits until no client is left or `deadline` passes; returns whether none is left.
    pub fn wait_clients_gone(&self, deadline: Option<Instant>) -> bool {
        let mut c = self.lock_clients();
        while !c.conns.is_empty() {
            match deadline {
                None => c = self.left.wait(c).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    c = self
                        .left
                        .wait_timeout(c, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        true
    }

    /// Closes every remaining client's socket both ways.
    pub fn close_clients(&self) {
        for h in self.lock_clients().conns.values() {
            h.close();
        }
    }
}

/// A claim on an export name while its overlay is being opened: no one else can take the name
/// meanwhile. Dropped unused, it frees the name.
pub struct NameClaim {
    exports: Arc<Exports>,
    name: String,
    used: bool,
}

impl NameClaim {
    /// The claimed name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Publishes `export` (named as claimed): LIST and GO see it from now on.
    pub fn publish(mut self, export: Arc<Export>) {
        let mut t = self.exports.write();
        t.pending.retain(|n| n != &self.name);
        t.list.push(export);
        self.used = true;
    }
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        if !self.used {
            self.exports.write().pending.retain(|n| n != &self.name);
        }
    }
}

#[derive(Default)]
struct Table {
    list: Vec<Arc<Export>>,
    /// Names claimed by an `export-add` still opening its overlay.
    pending: Vec<String>,
}

/// The exports of a daemon, looked up by name. Changed at runtime by `export-add` and
/// `export-del`; read by the handshake (never on the request path: a connection holds its
/// export from GO on).
#[derive(Default)]
pub struct Exports {
    table: RwLock<Table>,
}

impl Exports {
    /// A table of `list` (names are unique; the caller checks).
    pub fn new(list: Vec<Arc<Export>>) -> Arc<Self> {
        Arc::new(Exports {
            table: RwLock::new(Table {
                list,
                pending: Vec::new(),
            }),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The export called `name` that clients may use (not being deleted).
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.read()
            .list
            .iter()
            .find(|e| e.name == name && !e.is_deleting())
            .cloned()
    }

    /// The export called `name`, also while it is being deleted.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.read().list.iter().find(|e| e.name == name).cloned()
    }

    /// The exports clients may use, in the order they were added.
    pub fn serving(&self) -> Vec<Arc<Export>> {
        self.read()
            .list
            .iter()
            .filter(|e| !e.is_deleting())
            .cloned()
            .collect()
    }

    /// Every export, also those being deleted, in the order they were added.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.read().list.clone()
    }

    /// Claims `name` for an export about to be added; `None` if it is taken (by an export,
    /// one being deleted, or another add under way).
    pub fn claim(self: &Arc<Self>, name: &str) -> Option<NameClaim> {
        let mut t = self.write();
        if t.list.iter().any(|e| e.name == name) || t.pending.iter().any(|n| n == name) {
            return None;
        }
        t.pending.push(name.to_string());
        Some(NameClaim {
            exports: Arc::clone(self),
            name: name.to_string(),
            used: false,
        })
    }

    /// Removes `export` from the table (its name is free again).
    pub fn remove(&self, export: &Arc<Export>) {
        self.write().list.retain(|e| !Arc::ptr_eq(e, export));
    }
}

/// An in-memory backend for the protocol layer's tests: a byte vector whose second half is
/// "unallocated past the base" (reads as zeros, reported as [`ExtentKind::Zero`]) until written.
#[cfg(any(test, feature = "fuzzing"))]
pub mod memory {
    use std::sync::Mutex;

    use addcow_engine::{Done, ExtentKind, RequestError};

    use super::*;

    /// See the module docs.
    pub struct MemDisk {
        pub data: Mutex<Vec<u8>>,
        /// Per 512-byte sector: 0 zero, 1 image, 2 base, 3 image zeroed (a hole in the image).
        pub kinds: Mutex<Vec<u8>>,
        pub read_only: bool,
        pub flushes: std::sync::atomic::AtomicUsize,
    }

    impl MemDisk {
        /// `size` bytes; the first half "base" filled with 0xab, the second half zeros.
        pub fn new(size: usize, read_only: bool) -> Arc<MemDisk> {
            let mut data = vec![0u8; size];
            data[..size / 2].fill(0xab);
            let sectors = size.div_ceil(512);
            let kinds = (0..sectors)
                .map(|s| if s < sectors / 2 { 2 } else { 0 })
                .collect();
            Arc::new(MemDisk {
                data: Mutex::new(data),
                kinds: Mutex::new(kinds),
                read_only,
                flushes: Default::default(),
            })
        }

        fn mark(&self, offset: u64, len: u64, kind: u8) {
            let mut k = self.kinds.lock().unwrap();
            let first = (offset / 512) as usize;
            let end = (offset + len).div_ceil(512) as usize;
            for s in first..end.min(k.len()) {
                k[s] = kind;
            }
        }

        fn zero(&self, offset: u64, len: u64) {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            drop(d);
            // Whole sectors become holes of the image; partial ones are written zeros.
            let first = offset.div_ceil(512) * 512;
            let end = (offset + len) / 512 * 512;
            self.mark(offset, len, 1);
            if end > first {
                self.mark(first, end - first, 3);
            }
        }
    }

    impl Backend for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn submit(&self, _core: usize, req: Request, done: Completion) {
            let err = |offset| RequestError {
                errno: libc::EPERM,
                op: "write",
                offset,
            };
            let r = match req {
                Request::Read { offset, len } => {
                    let d = self.data.lock().unwrap();
                    let mut b = IoBuf::new_zeroed(len as usize);
                    b.copy_from_slice(&d[offset as usize..offset as usize + len as usize]);
                    Ok(Done::Read(b))
                }
                Request::ReadInto { offset, mut buf } => {
                    let d = self.data.lock().unwrap();
                    let n = buf.len();
                    buf.copy_from_slice(&d[offset as usize..offset as usize + n]);
                    Ok(Done::Read(buf))
                }
                Request::Write { offset, data, .. } => {
                    if self.read_only {
                        Err(err(offset))
                    } else {
                        let mut d = self.data.lock().unwrap();
                        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                        drop(d);
                        self.mark(offset, data.len() as u64, 1);
                        Ok(Done::Written(data))
                    }
                }
                Request::Flush => {
                    self.flushes
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(Done::Ok)
                }
                Request::WriteZeroes { offset, len, .. } | Request::Trim { offset, len, .. } => {
                    self.zero(offset, len);
                    Ok(Done::Ok)
                }
                Request::Cache { .. } => Ok(Done::Ok),
                Request::Populate { .. } => Ok(Done::Populated {
                    copied: 0,
                    zeroed: 0,
                }),
            };
            done(r)
        }
        fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
            let k = self.kinds.lock().unwrap();
            let size = self.data.lock().unwrap().len() as u64;
            let end = (offset + len).min(size);
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let kind = match k[(pos / 512) as usize] {
                    0 => ExtentKind::Zero,
                    1 | 3 => ExtentKind::Image,
                    _ => ExtentKind::Base,
                };
                let next = ((pos / 512 + 1) * 512).min(end);
                match out.last_mut() {
                    Some(last) if last.kind == kind => last.len += next - pos,
                    _ => out.push(Extent {
                        offset: pos,
                        len: next - pos,
                        kind,
                    }),
                }
                pos = next;
            }
            out
        }
        fn alloc_buf(&self, len: usize) -> IoBuf {
            IoBuf::new_zeroed(len)
        }
        fn zero_ranges(&self, layer: ExtentKind, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
            if layer != ExtentKind::Image {
                return;
            }
            let k = self.kinds.lock().unwrap();
            let mut s = start / 512;
            while s * 512 < end && (s as usize) < k.len() {
                if k[s as usize] == 3 {
                    let a = (s * 512).max(start);
                    let mut e = s;
                    while (e as usize) < k.len() && k[e as usize] == 3 && e * 512 < end {
                        e += 1;
                    }
                    out.push((a, (e * 512).min(end)));
                    s = e;
                } else {
                    s += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_read_only_and_structured() {
        let rw = Export::new("", memory::MemDisk::new(4096, false), 1);
        let f = rw.transmission_flags(true);
        assert_eq!(f, 0x0ded);
        assert_eq!(rw.transmission_flags(false) & wire::FLAG_SEND_DF, 0);
        let ro = Export::new("ro", memory::MemDisk::new(4096, true), 1);
        let f = ro.transmission_flags(true);
        assert_ne!(f & wire::FLAG_READ_ONLY, 0);
        assert_eq!(f & wire::FLAG_SEND_TRIM, 0);
        assert_eq!(f & wire::FLAG_SEND_WRITE_ZEROES, 0);
        let t = Exports::new(vec![rw, ro]);
        assert!(t.find("ro").is_some());
        assert!(t.find("x").is_none());
    }

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
