//! [`DirtySet`]: an overlay's named dirty bitmaps, in memory and (the persistent ones) in its
//! sidecar file, with the flusher thread that makes dirty bits durable before the data they
//! cover may be written.
//!
//! # The crash rule and how it is kept
//! Every sector whose bytes may differ from what they were at a bitmap's last clear is dirty in
//! the reopened bitmap. The write path asks [`DirtySet::admit`] before a write's data can be
//! issued: a write whose granules are all *durably* dirty (`durable`: set in the sidecar on
//! stable storage, and not cleared since) in every enabled persistent bitmap passes at once;
//! otherwise its bits are set in memory and it waits ([`DirtySet::enqueue`]) for a flusher
//! round: the round takes every waiter queued so far, copies the sidecar blocks marked since
//! the last round (after those waiters set their bits), writes them, fdatasyncs the sidecar,
//! marks the waiters' granules durable and lets them go. One round serves every write waiting
//! (group commit); a region pays once per backup cycle (until its bitmap is cleared).
//!
//! Invariant: `durable ⊆` the bits in the sidecar on stable storage, for each persistent
//! bitmap. It holds because `durable` is only set after the sync of a round whose copy
//! included those bits, only when no change of structure (`epoch`) happened since the waiter
//! set them, and is emptied by a clear before the clear's new bits are written.
//!
//! # Clear against writes in flight
//! A write is *in flight* from the moment it passes the gate until it is answered. A clear sets
//! the bitmap to exactly the granules of the writes in flight (not to empty): their data may
//! still land after the clear, and stays covered. Writes still waiting in the gate are not in
//! flight: they go through the gate again when their round lets them go.
//!
//! # Structure changes
//! Adding, removing, clearing, enabling, disabling, merging and resizing rewrite the whole
//! sidecar atomically (a temporary file, fdatasync, rename, fsync of the directory) in a round;
//! the calls wait for that round. Rounds run one at a time on the flusher thread, so in-place
//! block writes never race a rewrite. A failed sidecar write or sync is sticky: every later
//! gated write and change fails (reopen to recover), because the sidecar's state is unknown.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use super::sidecar::{self, BLOCK};
use super::words;
use crate::error::{Error, ErrorKind, Result};
use crate::sync::{lock, wait, wait_timeout};

/// Default granularity: 64 KiB.
pub const DEFAULT_GRANULARITY: u64 = 64 << 10;

/// Most bytes of bits one bitmap may hold in memory (twice: its bits and its durable marks):
/// the default 64 KiB granularity fits the largest disk (64 TiB); a finer one is refused where
/// it would need more.
pub const MAX_BITS_BYTES: u64 = 128 << 20;

/// Refuses a bitmap of granularity `1 << gran_log2` over `size` bytes that needs more than
/// [`MAX_BITS_BYTES`].
fn check_budget(name: &str, size: u64, gran_log2: u8) -> std::result::Result<(), String> {
    let need = sidecar::bits_len(size, gran_log2);
    if need > MAX_BITS_BYTES {
        return Err(format!(
            "bitmap {name:?} at granularity {} over {size} bytes needs {need} bytes of bits, \
             more than {MAX_BITS_BYTES}: use a larger granularity",
            1u64 << gran_log2
        ));
    }
    Ok(())
}

/// Most bytes of bits all the bitmaps of one disk may hold in memory together (twice: bits and
/// durable marks): four bitmaps at the largest size [`MAX_BITS_BYTES`] allows. Checked when a
/// bitmap is added, when the disk is resized, and when a sidecar is opened (a crafted one may
/// not make the process allocate more).
pub const MAX_TOTAL_BITS_BYTES: u64 = 4 * MAX_BITS_BYTES;

/// Refuses bitmaps of granularities `1 << gran_log2` (each) over `size` bytes that together need
/// more than [`MAX_TOTAL_BITS_BYTES`].
fn check_total(size: u64, grans: impl Iterator<Item = u8>) -> std::result::Result<(), String> {
    let need: u64 = grans.map(|l| sidecar::bits_len(size, l)).sum();
    if need > MAX_TOTAL_BITS_BYTES {
        return Err(format!(
            "the bitmaps of this disk would need {need} bytes of bits over {size} bytes, more \
             than {MAX_TOTAL_BITS_BYTES}: remove a bitmap or use larger granularities"
        ));
    }
    Ok(())
}

/// Words of bits in one sidecar block.
const BLOCK_WORDS: usize = (BLOCK / 8) as usize;

/// What a gated write is told to do.
pub enum Gate {
    /// Issue the data now; keep the guard until the write is answered.
    Pass(Option<Inflight>),
    /// Its bits are not durable yet: hand it to [`DirtySet::enqueue`] with this ticket.
    Wait(Ticket),
    /// The sidecar failed earlier; the write must fail (EIO).
    Fail,
}

/// What [`DirtySet::admit`] saw when it set a waiting write's bits: the structure epoch of that
/// moment. A round marks the write's granules durable only if no clear or change of structure
/// came between (the bits it set are then in the round's copy).
#[derive(Debug)]
pub struct Ticket {
    epoch: u64,
}

/// Called once by the flusher when a waiting write may go on (`Ok`) or must fail (`Err`).
pub type Resume = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

/// What the flusher did to the sidecar, for the test-only crash recorder.
#[derive(Debug)]
pub enum LogEvent<'a> {
    /// An in-place write of `data` at `offset` completed.
    Write { offset: u64, data: &'a [u8] },
    /// An fdatasync was issued (`end == false`) or completed (`end == true`).
    Sync { id: u64, end: bool },
}

/// A sink for [`LogEvent`]s.
pub type Log = Arc<dyn Fn(LogEvent<'_>) + Send + Sync>;

/// One bitmap as listed by [`DirtySet::list`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    pub enabled: bool,
    pub persistent: bool,
    /// Bytes of the disk covered by dirty granules (the last one clipped to the disk's size).
    pub dirty_bytes: u64,
}

/// A bitmap's dirty state copied at one instant: what a backup reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenBitmap {
    pub name: String,
    pub granularity: u64,
    pub size: u64,
    words: Vec<u64>,
}

/// A run of granules that are all dirty or all clean (bytes, clipped to the disk's size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyExtent {
    pub offset: u64,
    pub len: u64,
    pub dirty: bool,
}

/// Something that answers "which of `[offset, offset+len)` is dirty": a live bitmap of an open
/// disk or a [`FrozenBitmap`]. What NBD's `qemu:dirty-bitmap:NAME` serves.
pub trait DirtySource: Send + Sync {
    /// The granules overlapping `[offset, offset+len)` as runs, the first starting at the
    /// granule that holds `offset` clipped to `offset`, the last clipped to the disk's end;
    /// `None` if the bitmap is gone.
    /// At most `max` runs (the last one then ends where the walk stopped).
    fn dirty_extents(&self, offset: u64, len: u64, max: usize) -> Option<Vec<DirtyExtent>>;
}

/// A guard for a write in flight (see the module docs); dropped when the write is answered.
pub struct Inflight {
    set: Weak<DirtySet>,
    key: usize,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        if let Some(set) = self.set.upgrade() {
            let mut g = lock(&set.inner);
            if g.inflight.contains(self.key) {
                g.inflight.remove(self.key);
            }
        }
    }
}

/// A write in flight that took the gate's fast path ([`DirtySet::untracked`]); dropped when the
/// write is answered.
pub struct Untracked(Arc<AtomicUsize>);

impl Drop for Untracked {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Bm {
    name: String,
    gran_log2: u8,
    enabled: bool,
    persistent: bool,
    bits: Vec<u64>,
    durable: Vec<u64>,
    /// Sidecar blocks (of this bitmap's region) changed in memory since they were copied.
    marked: BTreeSet<usize>,
    /// Where its region starts in the current sidecar (persistent bitmaps after a rewrite).
    offset: Option<u64>,
}

impl Bm {
    fn granules(&self, offset: u64, end: u64) -> (u64, u64) {
        (
            offset >> self.gran_log2,
            end.div_ceil(1u64 << self.gran_log2),
        )
    }

    fn set_marking(&mut self, g0: u64, g1: u64) {
        if words::set_range(&mut self.bits, g0, g1) && self.persistent {
            let b0 = (g0 / 64) as usize / BLOCK_WORDS;
            let b1 = ((g1.max(g0 + 1) - 1) / 64) as usize / BLOCK_WORDS;
            self.marked.extend(b0..=b1);
        }
    }

    fn frozen(&self, size: u64) -> FrozenBitmap {
        FrozenBitmap {
            name: self.name.clone(),
            granularity: 1 << self.gran_log2,
            size,
            words: self.bits.clone(),
        }
    }
}

struct Waiter {
    offset: u64,
    end: u64,
    epoch: u64,
    resume: Resume,
}

struct Inner {
    size: u64,
    bms: Vec<Bm>,
    inflight: slab::Slab<(u64, u64)>,
    queue: Vec<Waiter>,
    /// The sidecar must be rewritten whole by the next round.
    rewrite: bool,
    /// Rounds asked for by changes, and rounds done (a change waits for its number).
    requested: u64,
    completed: u64,
    /// A flusher thread is running.
    running: bool,
    /// Adds and enables that turned `tracking` on before their bitmap is enabled.
    arming: usize,
    error: Option<String>,
    /// Bumped by every change of structure or clear (see the module docs).
    epoch: u64,
    file: Option<File>,
    sync_ids: u64,
}

/// See the module docs.
pub struct DirtySet {
    path: PathBuf,
    read_only: bool,
    inner: Mutex<Inner>,
    work: Condvar,
    done: Condvar,
    /// Some bitmap is enabled, or one is being added or enabled (the gate's lock-free fast path
    /// when neither).
    tracking: AtomicBool,
    /// Writes that took the fast path (not registered in flight) and are not answered yet: an
    /// add or enable turns `tracking` on, then waits for these to drain, so every write in
    /// flight when the bitmap starts tracking is registered and goes into it.
    untracked: Arc<AtomicUsize>,
    log: Option<Log>,
}

impl std::fmt::Debug for DirtySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtySet")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The sidecar of the overlay at `meta`: `META.bitmaps`.
pub fn sidecar_path(meta: &Path) -> PathBuf {
    let mut s = meta.as_os_str().to_os_string();
    s.push(".bitmaps");
    PathBuf::from(s)
}

fn bad(path: &Path, why: String) -> Error {
    Error::new(ErrorKind::BadBitmaps(why)).with_path(path)
}

fn invalid(why: String) -> Error {
    Error::new(ErrorKind::InvalidArgument(why))
}

impl DirtySet {
    /// Opens the sidecar of the overlay at `meta` (of `size` bytes); a missing sidecar is a set
    /// with no bitmaps. The caller holds the overlay's lock (it covers the sidecar too). A
    /// corrupt sidecar is an [`ErrorKind::BadBitmaps`] error naming what is wrong.
    pub fn open(
        meta: &Path,
        size: u64,
        read_only: bool,
        log: Option<Log>,
    ) -> Result<Arc<DirtySet>> {
        let path = sidecar_path(meta);
        let mut bms = Vec::new();
        let mut file = None;
        let mut covered = size;
        match std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
        {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("open bitmaps", e).with_path(&path)),
            Ok(f) => {
                let len = f
                    .metadata()
                    .map_err(|e| Error::io("stat bitmaps", e).with_path(&path))?
                    .len();
                let mut first = [0u8; 32];
                let got = read_some(&f, &mut first, 0).map_err(|e| e.with_path(&path))?;
                let h = sidecar::header_len(&first[..got]).map_err(|e| bad(&path, e))?;
                let mut head = vec![0u8; h as usize];
                let got = read_some(&f, &mut head, 0).map_err(|e| e.with_path(&path))?;
                let header = sidecar::parse(&head[..got], len).map_err(|e| bad(&path, e))?;
                covered = header.size;
                for e in &header.entries {
                    check_budget(&e.name, size.max(covered), e.gran_log2)
                        .map_err(|why| bad(&path, why))?;
                }
                check_total(
                    size.max(covered),
                    header.entries.iter().map(|e| e.gran_log2),
                )
                .map_err(|why| bad(&path, why))?;
                for e in header.entries {
                    let mut bytes = vec![0u8; e.bits_len as usize];
                    f.read_exact_at(&mut bytes, e.bits_offset).map_err(|err| {
                        Error::io("read bitmap bits", err)
                            .with_path(&path)
                            .with_offset(e.bits_offset)
                    })?;
                    let bits = words::from_bytes(&bytes);
                    bms.push(Bm {
                        name: e.name,
                        gran_log2: e.gran_log2,
                        enabled: e.enabled,
                        persistent: true,
                        durable: bits.clone(),
                        bits,
                        marked: BTreeSet::new(),
                        offset: Some(e.bits_offset),
                    });
                }
                file = Some(f);
            }
        }
        if !read_only {
            let _ = std::fs::remove_file(tmp_path(&path));
        }
        let tracking = bms.iter().any(|b| b.enabled);
        let set = Arc::new(DirtySet {
            path,
            read_only,
            inner: Mutex::new(Inner {
                size: covered,
                bms,
                inflight: slab::Slab::new(),
                queue: Vec::new(),
                rewrite: false,
                requested: 0,
                completed: 0,
                running: false,
                arming: 0,
                error: None,
                epoch: 0,
                file,
                sync_ids: 1,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            tracking: AtomicBool::new(tracking),
            untracked: Arc::new(AtomicUsize::new(0)),
            log,
        });
        if covered != size {
            // A resize of the overlay that did not get to its sidecar (a crash in between, or
            // an offline tool): the same change as `resize`, durable unless read-only.
            tracing::warn!(path = %set.path.display(), from = covered, to = size, "the dirty bitmaps cover another size than the overlay; resizing them (a grown area is dirty)");
            let mut g = lock(&set.inner);
            let any = Self::resize_locked(&mut g, size);
            set.changed(&mut g, any);
            if !read_only && any {
                set.persist(g)?;
            }
        }
        Ok(set)
    }

    /// The sidecar's path (it may not exist: no persistent bitmap).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether some bitmap is enabled (writes must go through [`DirtySet::admit`]).
    pub fn tracking(&self) -> bool {
        self.tracking.load(Ordering::SeqCst)
    }

    /// The gate's fast path: `Some` (keep the guard until the write is answered) when no bitmap
    /// tracks writes, so the write may be issued without [`DirtySet::admit`]; `None`: go
    /// through `admit`. Lock-free. An add or enable waits for every such guard to be dropped
    /// after it turned tracking on (the counter is raised before `tracking` is read, both
    /// SeqCst: either the add sees this write, or this write sees tracking on).
    pub fn untracked(&self) -> Option<Untracked> {
        self.untracked.fetch_add(1, Ordering::SeqCst);
        if self.tracking.load(Ordering::SeqCst) {
            self.untracked.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Untracked(Arc::clone(&self.untracked)))
    }

    /// Turns tracking on ahead of an add or enable and waits until no write that took the fast
    /// path is left in flight; from then on every write is registered in flight. The caller
    /// then takes the lock, calls `disarm` under it, and [`DirtySet::retrack`]s (by `changed`
    /// or directly) before letting go of it.
    fn arm(&self) {
        {
            let mut g = lock(&self.inner);
            g.arming += 1;
            self.tracking.store(true, Ordering::SeqCst);
        }
        // Writes are answered by the engine's cores without this set's lock: polled.
        while self.untracked.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Ends an [`DirtySet::arm`] (under the lock). `tracking` stays on until the caller's
    /// `retrack` (after its bitmap is enabled: no write may take the fast path in between).
    fn disarm(&self, g: &mut Inner) {
        g.arming -= 1;
    }

    fn retrack(&self, g: &Inner) {
        self.tracking.store(
            g.arming > 0 || g.bms.iter().any(|b| b.enabled),
            Ordering::SeqCst,
        );
    }

    /// Sets bitmap `i`'s bits for every write in flight: it was added or enabled while they
    /// run, and their data may land after.
    fn or_inflight(g: &mut Inner, i: usize) {
        let ranges: Vec<(u64, u64)> = g.inflight.iter().map(|(_, r)| *r).collect();
        let bm = &mut g.bms[i];
        for (o, e) in ranges {
            let (g0, g1) = bm.granules(o, e);
            bm.set_marking(g0, g1);
        }
    }

    /// The gate for a write of `[offset, offset+len)` (see the module docs): sets its bits in
    /// every enabled bitmap and says whether its data may be issued now.
    pub fn admit(self: &Arc<Self>, offset: u64, len: u64) -> Gate {
        let end = offset.saturating_add(len);
        let mut g = lock(&self.inner);
        if g.error.is_some() {
            return Gate::Fail;
        }
        let mut ready = true;
        for bm in g.bms.iter_mut().filter(|b| b.enabled) {
            let (g0, g1) = bm.granules(offset, end);
            if bm.persistent && !words::all_set(&bm.durable, g0, g1) {
                ready = false;
            }
            bm.set_marking(g0, g1);
        }
        if !ready && !cfg!(feature = "unsafe-dirty-bits-after-data") {
            // The epoch under the same lock as the bits: a clear before the enqueue must not
            // let the round count this write's granules as written.
            return Gate::Wait(Ticket { epoch: g.epoch });
        }
        if !ready {
            // Test-only broken order: the bits are persisted by a later round, the data goes now.
            let epoch = g.epoch;
            g.queue.push(Waiter {
                offset,
                end,
                epoch,
                resume: Box::new(|_| {}),
            });
            // Test-only path: a flusher that cannot start fails the set (sticky) anyway.
            drop(self.kick(&mut g));
        }
        let key = g.inflight.insert((offset, end));
        Gate::Pass(Some(Inflight {
            set: Arc::downgrade(self),
            key,
        }))
    }

    /// Queues a write [`DirtySet::admit`] told to wait; `resume` is called (on the flusher
    /// thread) once its bits are durable, or with the error if the sidecar failed. The write must
    /// then go through the gate again. `ticket` is the one `admit` returned.
    pub fn enqueue(self: &Arc<Self>, offset: u64, len: u64, ticket: Ticket, resume: Resume) {
        let mut g = lock(&self.inner);
        if let Some(e) = g.error.clone() {
            drop(g);
            resume(Err(e));
            return;
        }
        g.queue.push(Waiter {
            offset,
            end: offset.saturating_add(len),
            epoch: ticket.epoch,
            resume,
        });
        let failed = self.kick(&mut g);
        drop(g);
        for w in failed {
            (w.resume)(Err("bitmaps flusher not running".into()));
        }
    }

    /// Wakes the flusher, starting it if none runs. If it cannot be started, the set fails
    /// (sticky) and the waiters queued are returned, to be failed once the lock is let go.
    #[must_use]
    fn kick(self: &Arc<Self>, g: &mut Inner) -> Vec<Waiter> {
        if !g.running {
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("addcow-bitmaps".into())
                .spawn(move || flusher(weak));
            match spawned {
                Ok(_) => g.running = true,
                Err(e) => {
                    g.error = Some(format!("cannot start the bitmaps flusher: {e}"));
                    self.done.notify_all();
                    return std::mem::take(&mut g.queue);
                }
            }
        }
        self.work.notify_one();
        Vec::new()
    }

    /// After a change under `g`: asks for a round and waits for it (the change is durable when
    /// this returns Ok).
    fn persist<'a>(self: &'a Arc<Self>, mut g: std::sync::MutexGuard<'a, Inner>) -> Result<()> {
        g.requested += 1;
        let target = g.requested;
        let failed = self.kick(&mut g);
        if !failed.is_empty() {
            drop(g);
            for w in failed {
                (w.resume)(Err("bitmaps flusher not running".into()));
            }
            g = lock(&self.inner);
        }
        loop {
            if let Some(e) = &g.error {
                return Err(bad(&self.path, e.clone()));
            }
            if g.completed >= target {
                return Ok(());
            }
            g = wait(&self.done, g);
        }
    }

    fn writable(&self, g: &Inner) -> Result<()> {
        if self.read_only {
            return Err(invalid(
                "the disk is read-only: its bitmaps cannot change".into(),
            ));
        }
        if let Some(e) = &g.error {
            return Err(bad(&self.path, e.clone()));
        }
        Ok(())
    }

    fn changed(&self, g: &mut Inner, structure: bool) {
        g.epoch += 1;
        if structure {
            g.rewrite = true;
        }
        self.retrack(g);
    }

    /// Adds bitmap `name` with `granularity` bytes per bit (a power of two, 512 B..64 MiB);
    /// `persistent`: kept in the sidecar; `enabled`: tracks writes from now on.
    pub fn add(
        self: &Arc<Self>,
        name: &str,
        granularity: u64,
        persistent: bool,
        enabled: bool,
    ) -> Result<()> {
        if enabled {
            self.arm();
        }
        let mut g = lock(&self.inner);
        if enabled {
            self.disarm(&mut g);
        }
        if let Err(e) = self
            .writable(&g)
            .and_then(|()| self.add_locked(&mut g, name, granularity, persistent, enabled))
        {
            self.retrack(&g);
            return Err(e);
        }
        if enabled {
            let last = g.bms.len() - 1;
            Self::or_inflight(&mut g, last);
        }
        self.changed(&mut g, persistent);
        if persistent {
            self.persist(g)
        } else {
            Ok(())
        }
    }

    fn add_locked(
        &self,
        g: &mut Inner,
        name: &str,
        granularity: u64,
        persistent: bool,
        enabled: bool,
    ) -> Result<()> {
        sidecar::check_name(name).map_err(invalid)?;
        let gran_log2 = sidecar::gran_log2(granularity).map_err(invalid)?;
        check_budget(name, g.size, gran_log2).map_err(invalid)?;
        check_total(g.size, g.bms.iter().map(|b| b.gran_log2).chain([gran_log2]))
            .map_err(invalid)?;
        if g.bms.iter().any(|b| b.name == name) {
            return Err(invalid(format!("a bitmap named {name:?} exists already")));
        }
        if g.bms.len() >= sidecar::MAX_BITMAPS {
            return Err(invalid(format!(
                "at most {} bitmaps per disk",
                sidecar::MAX_BITMAPS
            )));
        }
        let n = (sidecar::bits_len(g.size, gran_log2) / 8) as usize;
        g.bms.push(Bm {
            name: name.to_string(),
            gran_log2,
            enabled,
            persistent,
            bits: vec![0; n],
            durable: vec![0; n],
            marked: BTreeSet::new(),
            offset: None,
        });
        Ok(())
    }

    fn index(g: &Inner, name: &str) -> Result<usize> {
        g.bms
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| invalid(format!("no bitmap named {name:?}")))
    }

    /// Removes bitmap `name`.
    pub fn remove(self: &Arc<Self>, name: &str) -> Result<()> {
        let mut g = lock(&self.inner);
        self.writable(&g)?;
        let i = Self::index(&g, name)?;
        let bm = g.bms.remove(i);
        self.changed(&mut g, bm.persistent);
        if bm.persistent {
            self.persist(g)
        } else {
            Ok(())
        }
    }

    /// Clears bitmap `name`: afterwards only the granules of writes in flight are dirty (see the
    /// module docs). Durable when it returns.
    pub fn clear(self: &Arc<Self>, name: &str) -> Result<()> {
        let mut g = lock(&self.inner);
        self.writable(&g)?;
        let i = Self::index(&g, name)?;
        Self::clear_locked(&mut g, i);
        let persistent = g.bms[i].persistent;
        self.changed(&mut g, persistent);
        if persistent {
            self.persist(g)
        } else {
            Ok(())
        }
    }

    fn clear_locked(g: &mut Inner, i: usize) {
        let ranges: Vec<(u64, u64)> = g.inflight.iter().map(|(_, r)| *r).collect();
        let bm = &mut g.bms[i];
        bm.durable.iter_mut().for_each(|w| *w = 0);
        bm.bits.iter_mut().for_each(|w| *w = 0);
        for (o, e) in ranges {
            let (g0, g1) = bm.granules(o, e);
            words::set_range(&mut bm.bits, g0, g1);
        }
    }

    /// Enables (`true`) or disables bitmap `name`.
    pub fn set_enabled(self: &Arc<Self>, name: &str, enabled: bool) -> Result<()> {
        if enabled {
            self.arm();
        }
        let mut g = lock(&self.inner);
        if enabled {
            self.disarm(&mut g);
        }
        let i = match self.writable(&g).and_then(|()| Self::index(&g, name)) {
            Ok(i) => i,
            Err(e) => {
                self.retrack(&g);
                return Err(e);
            }
        };
        if g.bms[i].enabled == enabled {
            self.retrack(&g);
            return Ok(());
        }
        g.bms[i].enabled = enabled;
        if enabled {
            Self::or_inflight(&mut g, i);
        }
        let persistent = g.bms[i].persistent;
        self.changed(&mut g, persistent);
        if persistent {
            self.persist(g)
        } else {
            Ok(())
        }
    }

    /// Makes `target` dirty wherever any of `sources` is (OR; granularities may differ: a dirty
    /// source granule dirties every target granule it overlaps).
    pub fn merge(self: &Arc<Self>, target: &str, sources: &[&str]) -> Result<()> {
        let mut g = lock(&self.inner);
        self.writable(&g)?;
        let t = Self::index(&g, target)?;
        // Each source once; the target into itself changes nothing.
        let mut from = BTreeSet::new();
        for s in sources {
            from.insert(Self::index(&g, s)?);
        }
        from.remove(&t);
        let size = g.size;
        for i in from {
            let (dst, src) = pair(&mut g.bms, t, i);
            or_from(&mut dst.bits, dst.gran_log2, src, size);
        }
        let persistent = g.bms[t].persistent;
        self.changed(&mut g, persistent);
        if persistent {
            self.persist(g)
        } else {
            Ok(())
        }
    }

    /// Makes `[offset, offset+len)` dirty in every enabled bitmap, durably: for changes of the
    /// guest-visible bytes that do not go through the write path (a commit into this overlay
    /// from above, the grown area of a resize).
    pub fn mark(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        let mut g = lock(&self.inner);
        self.writable(&g)?;
        let end = offset.saturating_add(len).min(g.size);
        let mut any = false;
        for bm in g.bms.iter_mut().filter(|b| b.enabled) {
            let (g0, g1) = bm.granules(offset, end);
            bm.set_marking(g0, g1);
            any |= bm.persistent;
        }
        if any {
            self.persist(g)
        } else {
            Ok(())
        }
    }

    /// [`DirtySet::mark`] for several ranges `(offset, len)` at once (one sidecar sync).
    pub fn mark_ranges(self: &Arc<Self>, ranges: &[(u64, u64)]) -> Result<()> {
        let mut g = lock(&self.inner);
        self.writable(&g)?;
        let size = g.size;
        let mut any = false;
        for bm in g.bms.iter_mut().filter(|b| b.enabled) {
            for &(offset, len) in ranges {
                let end = offset.saturating_add(len).min(size);
                let (g0, g1) = bm.granules(offset, end);
                bm.set_marking(g0, g1);
            }
            any |= bm.persistent;
        }
        if any {
            self.persist(g)
        } else {
            Ok(())
        }
    }

    /// Changes the size the bitmaps cover to `size`: grown granules are dirty in enabled
    /// bitmaps (clean in disabled ones), a shrink drops what lies past the new end. Durable when
    /// it returns.
    pub fn resize(self: &Arc<Self>, size: u64) -> Result<()> {
        let mut g = lock(&self.inner);
        self.writable(&g)?;
        for b in &g.bms {
            check_budget(&b.name, size, b.gran_log2).map_err(invalid)?;
        }
        check_total(size, g.bms.iter().map(|b| b.gran_log2)).map_err(invalid)?;
        let any = Self::resize_locked(&mut g, size);
        self.changed(&mut g, any);
        if any {
            self.persist(g)
        } else {
            Ok(())
        }
    }

    /// The in-memory part of [`DirtySet::resize`]; returns whether a persistent bitmap changed.
    fn resize_locked(g: &mut Inner, size: u64) -> bool {
        let old = g.size;
        g.size = size;
        let mut any = false;
        for bm in g.bms.iter_mut() {
            let n = (sidecar::bits_len(size, bm.gran_log2) / 8) as usize;
            bm.bits.resize(n, 0);
            bm.durable.resize(n, 0);
            if size < old {
                let keep = size.div_ceil(1u64 << bm.gran_log2);
                words::clear_from(&mut bm.bits, keep);
                words::clear_from(&mut bm.durable, keep);
            } else if bm.enabled {
                let (g0, g1) = bm.granules(old, size);
                words::set_range(&mut bm.bits, g0, g1);
            }
            bm.marked.clear();
            bm.offset = None;
            any |= bm.persistent;
        }
        any
    }

    /// For a point-in-time backup: adds enabled persistent bitmap `new` (granularity bytes per
    /// bit) and, with `incremental`, returns a frozen copy of that bitmap (what changed since
    /// that checkpoint) and disables it, all in one step, durable when it returns.
    ///
    /// A disabled `incremental` (a backup from it began before, so a later checkpoint took
    /// over at that backup's instant) is frozen together with every bitmap added after it
    /// (OR): the chain of later checkpoints covers everything written since its own instant,
    /// so a retried or repeated backup from an older checkpoint still misses no change (a
    /// later bitmap that is not a checkpoint only adds false positives).
    ///
    /// Precondition: the disk's writes are held (no write in flight and none admitted until
    /// this returns), so that the new bitmap and the frozen one split the writes at one instant.
    pub fn checkpoint(
        self: &Arc<Self>,
        new: &str,
        granularity: u64,
        incremental: Option<&str>,
    ) -> Result<Option<FrozenBitmap>> {
        let mut g = lock(&self.inner);
        self.writable(&g)?;
        let frozen = match incremental {
            Some(name) => {
                let i = Self::index(&g, name)?;
                Some(i)
            }
            None => None,
        };
        self.add_locked(&mut g, new, granularity, true, true)?;
        let frozen = frozen.map(|i| {
            let mut f = g.bms[i].frozen(g.size);
            if !g.bms[i].enabled {
                // The new bitmap (last) is empty: it adds nothing.
                for later in &g.bms[i + 1..] {
                    or_from(&mut f.words, g.bms[i].gran_log2, later, g.size);
                }
            }
            g.bms[i].enabled = false;
            f
        });
        self.changed(&mut g, true);
        self.persist(g)?;
        Ok(frozen)
    }

    /// A copy of bitmap `name` now.
    pub fn freeze(&self, name: &str) -> Result<FrozenBitmap> {
        let g = lock(&self.inner);
        let i = Self::index(&g, name)?;
        Ok(g.bms[i].frozen(g.size))
    }

    /// Every bitmap, in the order they were added.
    pub fn list(&self) -> Vec<BitmapInfo> {
        let g = lock(&self.inner);
        g.bms
            .iter()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: 1 << b.gran_log2,
                enabled: b.enabled,
                persistent: b.persistent,
                dirty_bytes: dirty_bytes(&b.bits, b.gran_log2, g.size),
            })
            .collect()
    }

    /// Whether a bitmap named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        lock(&self.inner).bms.iter().any(|b| b.name == name)
    }

    /// Dirty and clean runs of bitmap `name` over `[offset, offset+len)`, at most `max` (see
    /// [`DirtySource`]).
    pub fn extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<DirtyExtent>> {
        // Walked in windows of words copied under the lock, so the lock (which every gated
        // write takes) is held for one small copy at a time, however large the range.
        const WINDOW_WORDS: u64 = 4096;
        let mut out: Vec<DirtyExtent> = Vec::new();
        let mut at = offset;
        loop {
            let (words, gran_log2, size) = {
                let g = lock(&self.inner);
                let i = Self::index(&g, name)?;
                let b = &g.bms[i];
                let w0 = ((at >> b.gran_log2) / 64).min(b.bits.len() as u64);
                let w1 = (w0 + WINDOW_WORDS).min(b.bits.len() as u64);
                (
                    (w0, b.bits[w0 as usize..w1 as usize].to_vec()),
                    b.gran_log2,
                    g.size,
                )
            };
            let end = offset.saturating_add(len).min(size);
            if at >= end {
                break;
            }
            let (w0, bits) = words;
            let base = (w0 * 64) << gran_log2;
            let window_end = (((w0 + bits.len() as u64) * 64) << gran_log2).min(end);
            if window_end <= at {
                break;
            }
            let part = runs(
                &bits,
                gran_log2,
                size - base,
                at - base,
                window_end - at,
                max.saturating_sub(out.len()).saturating_add(1),
            );
            for mut e in part {
                e.offset += base;
                match out.last_mut() {
                    Some(last) if last.dirty == e.dirty && last.offset + last.len == e.offset => {
                        last.len += e.len
                    }
                    _ => out.push(e),
                }
            }
            if out.len() > max {
                out.truncate(max);
                break;
            }
            at = window_end;
        }
        Ok(out)
    }

    /// A [`DirtySource`] for bitmap `name` of this set (live: it follows the bitmap).
    pub fn source(self: &Arc<Self>, name: &str) -> Result<Arc<dyn DirtySource>> {
        if !self.contains(name) {
            return Err(invalid(format!("no bitmap named {name:?}")));
        }
        Ok(Arc::new(Live {
            set: Arc::clone(self),
            name: name.to_string(),
        }))
    }

    /// Copies bitmap `name` into `to` (a set for the same size) under the same name, durably:
    /// for a snapshot that moves the disk to a new overlay whose writes the bitmap must keep
    /// tracking. The caller holds the writes of both.
    pub fn copy_to(&self, name: &str, to: &Arc<DirtySet>) -> Result<()> {
        let (bits, gran_log2, enabled, persistent) = {
            let g = lock(&self.inner);
            let b = &g.bms[Self::index(&g, name)?];
            (b.bits.clone(), b.gran_log2, b.enabled, b.persistent)
        };
        let mut g = lock(&to.inner);
        to.writable(&g)?;
        to.add_locked(&mut g, name, 1 << gran_log2, persistent, enabled)?;
        let last = g.bms.len() - 1;
        let n = g.bms[last].bits.len();
        g.bms[last].bits = bits;
        g.bms[last].bits.resize(n, 0);
        to.changed(&mut g, persistent);
        if persistent {
            to.persist(g)
        } else {
            Ok(())
        }
    }

    /// One round of the flusher (see the module docs). Returns false when there was nothing to do.
    fn round(self: &Arc<Self>) -> bool {
        let mut g = lock(&self.inner);
        if g.queue.is_empty() && g.requested == g.completed {
            return false;
        }
        let waiters = std::mem::take(&mut g.queue);
        let target = g.requested;
        if let Some(e) = g.error.clone() {
            // The sidecar's state is unknown (a failed write, sync or rewrite): no more I/O to
            // it; what waits fails.
            g.completed = target;
            drop(g);
            self.done.notify_all();
            for w in waiters {
                (w.resume)(Err(e.clone()));
            }
            return true;
        }
        let plan = if g.rewrite {
            g.rewrite = false;
            Plan::Rewrite(self.rewrite_plan(&mut g))
        } else {
            let mut blocks = Vec::new();
            for bm in g.bms.iter_mut().filter(|b| b.persistent) {
                let Some(base) = bm.offset else { continue };
                for blk in std::mem::take(&mut bm.marked) {
                    let w0 = blk * BLOCK_WORDS;
                    let w1 = (w0 + BLOCK_WORDS).min(bm.bits.len());
                    if w0 < w1 {
                        blocks.push((base + blk as u64 * BLOCK, words::to_bytes(&bm.bits[w0..w1])));
                    }
                }
            }
            Plan::Blocks(blocks)
        };
        let file = g.file.as_ref().and_then(|f| f.try_clone().ok());
        let sync_id = g.sync_ids;
        g.sync_ids += 1;
        drop(g);

        let mut new_offsets = None;
        let res = match plan {
            Plan::Rewrite(mut p) => {
                new_offsets = Some(std::mem::take(&mut p.names));
                self.do_rewrite(p)
            }
            Plan::Blocks(blocks) if blocks.is_empty() => Ok(None),
            Plan::Blocks(blocks) => self.do_blocks(file, &blocks, sync_id).map(|()| None),
        };

        let mut g = lock(&self.inner);
        let outcome = match res {
            Ok(new_file) => {
                if let Some(f) = new_file {
                    g.file = f;
                }
                if let Some(names) = new_offsets {
                    // The new layout is on disk: blocks go to its offsets from now on. A bitmap
                    // added meanwhile has none until the rewrite its change asked for.
                    for bm in g.bms.iter_mut().filter(|b| b.persistent) {
                        bm.offset = names.iter().find(|(n, _)| *n == bm.name).map(|(_, o)| *o);
                    }
                }
                let epoch = g.epoch;
                for w in waiters.iter().filter(|w| w.epoch == epoch) {
                    for bm in g.bms.iter_mut().filter(|b| b.enabled && b.persistent) {
                        let (g0, g1) = bm.granules(w.offset, w.end);
                        // Only granules set in memory (so in this round's copy: no clear came
                        // since, the epoch says); a granule not set stays not durable.
                        if words::all_set(&bm.bits, g0, g1) {
                            words::set_range(&mut bm.durable, g0, g1);
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "bitmaps sidecar failed; gated writes now fail");
                g.error = Some(e.clone());
                Err(e)
            }
        };
        g.completed = target;
        drop(g);
        self.done.notify_all();
        for w in waiters {
            (w.resume)(outcome.clone());
        }
        true
    }

    fn rewrite_plan(&self, g: &mut Inner) -> Rewrite {
        let list: Vec<(&str, bool, u8)> = g
            .bms
            .iter()
            .filter(|b| b.persistent)
            .map(|b| (b.name.as_str(), b.enabled, b.gran_log2))
            .collect();
        if list.is_empty() {
            for bm in g.bms.iter_mut() {
                bm.marked.clear();
            }
            return Rewrite {
                head: Vec::new(),
                regions: Vec::new(),
                names: Vec::new(),
            };
        }
        let (head, offsets, _) = sidecar::layout(g.size, &list);
        let mut regions = Vec::new();
        let mut names = Vec::new();
        let mut k = 0;
        for bm in g.bms.iter_mut() {
            bm.marked.clear();
            if bm.persistent {
                // `bm.offset` changes once the rewrite is done (see `round`).
                names.push((bm.name.clone(), offsets[k]));
                regions.push((offsets[k], words::to_bytes(&bm.bits)));
                k += 1;
            }
        }
        Rewrite {
            head,
            regions,
            names,
        }
    }

    fn do_blocks(
        &self,
        file: Option<File>,
        blocks: &[(u64, Vec<u8>)],
        sync_id: u64,
    ) -> std::result::Result<(), String> {
        let f = file.ok_or_else(|| "the bitmaps sidecar is not open".to_string())?;
        for (off, data) in blocks {
            f.write_all_at(data, *off)
                .map_err(|e| format!("write bitmaps {} at {off}: {e}", self.path.display()))?;
            if let Some(log) = &self.log {
                log(LogEvent::Write { offset: *off, data });
            }
        }
        if let Some(log) = &self.log {
            log(LogEvent::Sync {
                id: sync_id,
                end: false,
            });
        }
        f.sync_data()
            .map_err(|e| format!("fdatasync bitmaps {}: {e}", self.path.display()))?;
        if let Some(log) = &self.log {
            log(LogEvent::Sync {
                id: sync_id,
                end: true,
            });
        }
        Ok(())
    }

    /// Writes a whole new sidecar and renames it into place (or removes the sidecar when no
    /// bitmap is persistent); returns the file to write blocks into from now on.
    fn do_rewrite(&self, p: Rewrite) -> std::result::Result<Option<Option<File>>, String> {
        let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", self.path.display());
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if p.head.is_empty() {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err("remove", e)),
            }
            sync_dir(dir).map_err(|e| err("fsync the directory of", e))?;
            return Ok(Some(None));
        }
        let tmp = tmp_path(&self.path);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| err("create", e))?;
        f.write_all_at(&p.head, 0).map_err(|e| err("write", e))?;
        for (off, data) in &p.regions {
            f.write_all_at(data, *off).map_err(|e| err("write", e))?;
        }
        f.sync_all().map_err(|e| err("fsync", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| err("rename into", e))?;
        sync_dir(dir).map_err(|e| err("fsync the directory of", e))?;
        Ok(Some(Some(f)))
    }
}

enum Plan {
    Rewrite(Rewrite),
    Blocks(Vec<(u64, Vec<u8>)>),
}

struct Rewrite {
    /// Empty: no persistent bitmap is left, remove the sidecar.
    head: Vec<u8>,
    regions: Vec<(u64, Vec<u8>)>,
    /// Where each persistent bitmap's region is in the new layout.
    names: Vec<(String, u64)>,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn read_some(f: &File, buf: &mut [u8], at: u64) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read bitmaps header", e).with_offset(at)),
        }
    }
    Ok(got)
}

/// The flusher thread: runs rounds while the set lives.
fn flusher(weak: Weak<DirtySet>) {
    loop {
        let Some(set) = weak.upgrade() else {
            return;
        };
        if set.round() {
            continue;
        }
        let g = lock(&set.inner);
        if g.queue.is_empty() && g.requested == g.completed {
            // Idle for a while (or the set is only ours): stop; the next `kick` starts another.
            let (mut g, _) = wait_timeout(&set.work, g, Duration::from_millis(500));
            if g.queue.is_empty() && g.requested == g.completed {
                g.running = false;
                return;
            }
        }
    }
}

/// Bytes covered by the set granules of `bits` (a popcount; the last granule clipped to `size`).
fn dirty_bytes(bits: &[u64], gran_log2: u8, size: u64) -> u64 {
    let ones: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
    let mut bytes = ones << gran_log2;
    if size > 0 && words::get(bits, (size - 1) >> gran_log2) {
        let granules = size.div_ceil(1u64 << gran_log2);
        bytes -= (granules << gran_log2) - size;
    }
    bytes
}

/// Byte ranges `[o, e)` of the dirty granules of `bm` over `[offset, end)`, merged.
/// `bms[t]` to change and `bms[s]` to read (`t != s`).
fn pair(bms: &mut [Bm], t: usize, s: usize) -> (&mut Bm, &Bm) {
    assert_ne!(t, s, "a bitmap paired with itself");
    if t < s {
        let (a, b) = bms.split_at_mut(s);
        (&mut a[t], &b[0])
    } else {
        let (a, b) = bms.split_at_mut(t);
        (&mut b[0], &a[s])
    }
}

/// Sets in `dst` (bits at granularity `1 << dst_log2` over `size` bytes) every granule that
/// overlaps a dirty granule of `src`: word by word when the granularities are equal, else by
/// walking `src`'s runs a window at a time (no list of every run in memory).
fn or_from(dst: &mut [u64], dst_log2: u8, src: &Bm, size: u64) {
    if src.gran_log2 == dst_log2 {
        for (d, s) in dst.iter_mut().zip(&src.bits) {
            *d |= *s;
        }
        return;
    }
    let mut at = 0;
    while at < size {
        let window = runs(&src.bits, src.gran_log2, size, at, size - at, 4096);
        let Some(last) = window.last() else { break };
        let next = last.offset + last.len;
        for r in window.iter().filter(|r| r.dirty) {
            let g0 = r.offset >> dst_log2;
            let g1 = (r.offset + r.len).div_ceil(1u64 << dst_log2);
            words::set_range(dst, g0, g1);
        }
        if next <= at {
            break;
        }
        at = next;
    }
}

/// Dirty/clean runs over `[offset, offset+len)` clipped to `size`, at most `max` of them (the
/// last one then ends where the walk stopped). Work is bounded by the runs reported plus one
/// word's worth of granules per run: whole clean or dirty words are skipped at once.
fn runs(
    bits: &[u64],
    gran_log2: u8,
    size: u64,
    offset: u64,
    len: u64,
    max: usize,
) -> Vec<DirtyExtent> {
    let end = offset.saturating_add(len).min(size);
    let mut out: Vec<DirtyExtent> = Vec::new();
    let mut at = offset;
    while at < end {
        let g = at >> gran_log2;
        let dirty = words::get(bits, g);
        // How far this run goes: granule by granule to a word boundary, then whole words.
        let mut next_g = g + 1;
        loop {
            if next_g % 64 == 0 {
                let w = bits.get((next_g / 64) as usize).copied().unwrap_or(0);
                if (dirty && w == u64::MAX) || (!dirty && w == 0) {
                    next_g += 64;
                    if next_g << gran_log2 >= end {
                        break;
                    }
                    continue;
                }
            }
            if (next_g << gran_log2) >= end || words::get(bits, next_g) != dirty {
                break;
            }
            next_g += 1;
        }
        let next = (next_g << gran_log2).min(end);
        match out.last_mut() {
            Some(last) if last.dirty == dirty => last.len += next - at,
            _ => {
                if out.len() == max {
                    break;
                }
                out.push(DirtyExtent {
                    offset: at,
                    len: next - at,
                    dirty,
                })
            }
        }
        at = next;
    }
    out
}

struct Live {
    set: Arc<DirtySet>,
    name: String,
}

impl DirtySource for Live {
    fn dirty_extents(&self, offset: u64, len: u64, max: usize) -> Option<Vec<DirtyExtent>> {
        self.set.extents(&self.name, offset, len, max).ok()
    }
}

impl FrozenBitmap {
    /// Bytes covered by dirty granules.
    pub fn dirty_bytes(&self) -> u64 {
        dirty_bytes(
            &self.words,
            self.granularity.trailing_zeros() as u8,
            self.size,
        )
    }
}

impl DirtySource for FrozenBitmap {
    fn dirty_extents(&self, offset: u64, len: u64, max: usize) -> Option<Vec<DirtyExtent>> {
        Some(runs(
            &self.words,
            self.granularity.trailing_zeros() as u8,
            self.size,
            offset,
            len,
            max,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirty_of(set: &DirtySet, name: &str) -> Vec<(u64, u64)> {
        set.extents(name, 0, u64::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .filter(|e| e.dirty)
            .map(|e| (e.offset, e.len))
            .collect()
    }

    /// A clear keeps the granules of writes in flight (passed the gate, not answered), and only
    /// those; a write told to wait is let go once its bits are durable, and then passes.
    #[test]
    fn clear_keeps_writes_in_flight_and_waiters_pass_after_their_round() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("x.add-cow");
        let set = DirtySet::open(&meta, 1 << 20, false, None).unwrap();
        set.add("b", 4096, true, true).unwrap();
        // Not durable yet: wait, then the round lets it go.
        let Gate::Wait(ticket) = set.admit(8192, 100) else {
            panic!("not durable yet: must wait");
        };
        let (tx, rx) = std::sync::mpsc::channel();
        set.enqueue(8192, 100, ticket, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap().unwrap();
        let Gate::Pass(Some(inflight)) = set.admit(8192, 100) else {
            panic!("durable granule must pass");
        };
        set.clear("b").unwrap();
        assert_eq!(
            dirty_of(&set, "b"),
            vec![(8192, 4096)],
            "in flight at the clear"
        );
        // Durable on disk too: a reopen (a crash now) sees it.
        let again = DirtySet::open(&meta, 1 << 20, true, None).unwrap();
        assert_eq!(dirty_of(&again, "b"), vec![(8192, 4096)]);
        drop(inflight);
        set.clear("b").unwrap();
        assert_eq!(dirty_of(&set, "b"), vec![]);
        // The clear emptied the durable marks: the next write waits again.
        assert!(matches!(set.admit(8192, 100), Gate::Wait(_)));
    }

    /// A clear between a write's admit (told to wait) and its enqueue: the round after must not
    /// mark the write's granules durable in the cleared bitmap (their bits are not in it), so
    /// the write, let go, goes through the gate again and waits for its bits to be written.
    #[test]
    fn a_clear_between_admit_and_enqueue_does_not_mark_the_write_durable() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("x.add-cow");
        let set = DirtySet::open(&meta, 1 << 20, false, None).unwrap();
        set.add("b", 4096, true, true).unwrap();
        let Gate::Wait(ticket) = set.admit(8192, 100) else {
            panic!("not durable yet: must wait");
        };
        set.clear("b").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        set.enqueue(8192, 100, ticket, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap().unwrap();
        let again = set.admit(8192, 100);
        let on_disk = dirty_of(&DirtySet::open(&meta, 1 << 20, true, None).unwrap(), "b");
        assert!(
            matches!(again, Gate::Wait(_)) || on_disk == vec![(8192, 4096)],
            "the write would pass with its granule clean in the sidecar: {on_disk:?}"
        );
    }

    /// A bitmap added or enabled while a write is in flight records that write (its data may
    /// land after the bitmap started tracking), as QEMU records it at completion.
    #[test]
    fn add_and_enable_record_writes_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("x.add-cow");
        let set = DirtySet::open(&meta, 1 << 20, false, None).unwrap();
        set.add("a", 4096, false, true).unwrap();
        set.add("c", 4096, true, false).unwrap();
        let Gate::Pass(Some(inflight)) = set.admit(8192, 100) else {
            panic!("a non-persistent bitmap lets writes pass");
        };
        set.add("b", 4096, true, true).unwrap();
        set.set_enabled("c", true).unwrap();
        assert_eq!(dirty_of(&set, "b"), vec![(8192, 4096)], "added");
        assert_eq!(dirty_of(&set, "c"), vec![(8192, 4096)], "enabled");
        let again = DirtySet::open(&meta, 1 << 20, true, None).unwrap();
        assert_eq!(dirty_of(&again, "b"), vec![(8192, 4096)], "durably");
        drop(inflight);
    }

    /// A write that took the fast path (no bitmap enabled) holds an add back until it is
    /// answered; meanwhile new writes go through the gate (registered in flight).
    #[test]
    fn add_waits_for_writes_that_took_the_fast_path() {
        let dir = tempfile::tempdir().unwrap();
        let set = DirtySet::open(&dir.path().join("x.add-cow"), 1 << 20, false, None).unwrap();
        let fast = set.untracked().expect("no bitmap: the fast path");
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = Arc::clone(&set);
        let t = std::thread::spawn(move || tx.send(s2.add("b", 4096, false, true)).unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while set.untracked().is_some() {
            assert!(std::time::Instant::now() < deadline, "add never armed");
            std::thread::yield_now();
        }
        assert!(
            rx.try_recv().is_err(),
            "add returned with a fast-path write in flight"
        );
        drop(fast);
        rx.recv().unwrap().unwrap();
        t.join().unwrap();
        assert!(set.untracked().is_none(), "b tracks");
    }

    /// A failed rewrite leaves the old sidecar with the old layout: no later round writes into
    /// it (at the new layout's offsets or any other), and it still reads as before.
    #[test]
    fn a_failed_rewrite_stops_every_later_round() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("x.add-cow");
        let set = DirtySet::open(&meta, 1 << 20, false, None).unwrap();
        set.add("a", 4096, true, false).unwrap();
        set.add("b", 4096, true, true).unwrap();
        set.mark(8192, 100).unwrap();
        let path = sidecar_path(&meta);
        let before = std::fs::read(&path).unwrap();
        // The temporary file cannot be created: the rewrite of the remove fails.
        std::fs::create_dir(tmp_path(&path)).unwrap();
        set.remove("a").unwrap_err();
        // A round asked for by a change that passed its check before the failure.
        {
            let mut g = lock(&set.inner);
            for bm in g.bms.iter_mut() {
                bm.marked.insert(0);
            }
            g.requested += 1;
            let target = g.requested;
            assert!(set.kick(&mut g).is_empty());
            while g.completed < target {
                g = wait(&set.done, g);
            }
        }
        assert!(
            std::fs::read(&path).unwrap() == before,
            "the old sidecar was written after the failed rewrite"
        );
        std::fs::remove_dir(tmp_path(&path)).unwrap();
        let again = DirtySet::open(&meta, 1 << 20, true, None).unwrap();
        assert_eq!(dirty_of(&again, "a"), vec![]);
        assert_eq!(dirty_of(&again, "b"), vec![(8192, 4096)]);
    }

    /// Merge ORs each source once, word by word at equal granularity and run by run across
    /// granularities (a source granule dirties every target granule it overlaps).
    #[test]
    fn merge_dedupes_sources_and_mixes_granularities() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8u64 << 20;
        let set = DirtySet::open(&dir.path().join("x.add-cow"), size, false, None).unwrap();
        set.add("fine", 4096, false, true).unwrap();
        set.add("same", 65536, false, true).unwrap();
        set.mark(100, 10).unwrap();
        set.mark((5 << 20) + 70000, 1).unwrap();
        set.set_enabled("fine", false).unwrap();
        set.set_enabled("same", false).unwrap();
        set.add("t", 65536, false, false).unwrap();
        set.add("t2", 512, false, false).unwrap();
        set.merge("t", &["fine", "fine", "same", "t"]).unwrap();
        assert_eq!(
            dirty_of(&set, "t"),
            vec![(0, 65536), ((5 << 20) + 65536, 65536)]
        );
        set.merge("t2", &["same", "same"]).unwrap();
        assert_eq!(dirty_of(&set, "t2"), dirty_of(&set, "same"));
    }

    /// Bitmaps that would together need more than the per-disk budget are refused with a clear
    /// error (each one alone fits).
    #[test]
    fn the_bitmaps_of_a_disk_share_one_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        // 1 TiB at 512 B granules: 256 MiB of bits, over the per-bitmap budget; at 1 KiB
        // granules 128 MiB each: four fit, the fifth does not. Nothing is allocated for a
        // refused one.
        let size = 1u64 << 40;
        assert!(check_budget("x", size, 10).is_ok());
        assert!(check_total(size, [10u8; 4].into_iter()).is_ok());
        let err = check_total(size, [10u8; 5].into_iter()).unwrap_err();
        assert!(err.contains("remove a bitmap"), "{err}");
        let set = DirtySet::open(&dir.path().join("x.add-cow"), 64 << 20, false, None).unwrap();
        set.add("a", 512, false, true).unwrap();
    }

    /// Extents walked window by window are the runs of one walk (merged across windows, cut
    /// at `max`).
    #[test]
    fn windowed_extents_equal_one_walk() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8u64 << 30;
        let set = DirtySet::open(&dir.path().join("x.add-cow"), size, false, None).unwrap();
        set.add("b", 512, false, true).unwrap();
        // Dirty across window boundaries (4096 words = 128 MiB at 512 B), and scattered bits.
        set.mark((128 << 20) - 4096, 8192).unwrap();
        set.mark((256 << 20) - 512, (128 << 20) + 1024).unwrap();
        for k in 0..50u64 {
            set.mark(k * 37 * 1000 * 512, 512).unwrap();
        }
        let whole = {
            let g = lock(&set.inner);
            runs(&g.bms[0].bits, 9, size, 0, size, usize::MAX)
        };
        assert_eq!(set.extents("b", 0, size, usize::MAX).unwrap(), whole);
        assert_eq!(set.extents("b", 0, size, 7).unwrap(), whole[..7].to_vec());
        let mid = set.extents("b", 100 << 20, 300 << 20, usize::MAX).unwrap();
        assert_eq!(mid[0].offset, 100 << 20);
        assert_eq!(mid.iter().map(|e| e.len).sum::<u64>(), 300 << 20);
    }

    /// A bitmap whose bits would take more than `MAX_BITS_BYTES` is refused with a clear error.
    #[test]
    fn bitmap_memory_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let set = DirtySet::open(&dir.path().join("x.add-cow"), 1 << 40, false, None).unwrap();
        let e = set.add("fine", 512, false, true).unwrap_err();
        assert!(e.to_string().contains("larger granularity"), "{e}");
        set.add("ok", DEFAULT_GRANULARITY, false, true).unwrap();
        set.add("k4", 4096, false, true).unwrap();
        assert!(set.resize(2 << 40).is_ok());
        assert!(
            check_budget("x", 64 << 40, 16).is_ok(),
            "64 KiB fits the largest disk"
        );
        assert!(
            set.resize(64 << 40).is_err(),
            "a 4 KiB bitmap over 64 TiB is refused"
        );
    }

    /// One flusher round serves every waiter queued before it started: one sidecar sync for
    /// 200 writes (queued under one hold of the lock, so the round cannot start in between).
    #[test]
    fn waiters_share_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("x.add-cow");
        let set = DirtySet::open(&meta, 64 << 20, false, None).unwrap();
        set.add("b", 512, true, true).unwrap();
        for i in 0..200u64 {
            assert!(matches!(set.admit(i * 4096, 512), Gate::Wait(_)));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let before = {
            let mut g = lock(&set.inner);
            let before = g.sync_ids;
            for i in 0..200u64 {
                let tx = tx.clone();
                let epoch = g.epoch;
                g.queue.push(Waiter {
                    offset: i * 4096,
                    end: i * 4096 + 512,
                    epoch,
                    resume: Box::new(move |r| tx.send(r).unwrap()),
                });
            }
            assert!(set.kick(&mut g).is_empty());
            before
        };
        for _ in 0..200 {
            rx.recv().unwrap().unwrap();
        }
        assert_eq!(lock(&set.inner).sync_ids - before, 1, "one round, one sync");
        for i in 0..200u64 {
            assert!(matches!(set.admit(i * 4096, 512), Gate::Pass(Some(_))));
        }
    }

    #[test]
    fn runs_merge_skip_words_and_stop_at_max() {
        let mut bits = vec![0u64; 8];
        words::set_range(&mut bits, 3, 200);
        let r = runs(&bits, 9, 512 * 512, 0, 512 * 512, usize::MAX);
        assert_eq!(
            r,
            vec![
                DirtyExtent {
                    offset: 0,
                    len: 3 * 512,
                    dirty: false
                },
                DirtyExtent {
                    offset: 3 * 512,
                    len: 197 * 512,
                    dirty: true
                },
                DirtyExtent {
                    offset: 200 * 512,
                    len: 312 * 512,
                    dirty: false
                },
            ]
        );
        // Starting inside a granule, ending inside one, and the size clips.
        let r = runs(
            &bits,
            12,
            100 * 4096 + 512,
            3 * 4096 + 100,
            8000,
            usize::MAX,
        );
        assert_eq!(
            r,
            vec![DirtyExtent {
                offset: 3 * 4096 + 100,
                len: 8000,
                dirty: true
            }]
        );
        let r = runs(&bits, 9, 512 * 512, 0, 512 * 512, 2);
        assert_eq!(r.len(), 2);
        // Alternating granules: one run each.
        let mut alt = vec![0x5555_5555_5555_5555u64; 2];
        alt[1] = 0;
        let r = runs(&alt, 9, 128 * 512, 0, 128 * 512, usize::MAX);
        assert_eq!(r.len(), 64, "granule 63 joins the clean word after it");
        assert_eq!(r.iter().map(|e| e.len).sum::<u64>(), 128 * 512);
    }
}
