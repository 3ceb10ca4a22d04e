//! [`Engine`]: starting and stopping the core threads, and opening disks on them.

pub(super) mod disk;
pub(super) mod fleece;

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use crate::error::{Error, ErrorKind, Result};
use crate::io::config::{DiskOptions, EngineConfig};
use crate::io::core::mailbox::{CoreHandle, Msg};
use crate::io::core::shared::EngineShared;
use crate::io::core::{on_core_thread, Core};
use crate::io::disk::state::{DiskState, Role};
use crate::io::source::{CoreSource, SourceId};
use crate::io::uring::buf::{self, Arena, IoBuf};
use crate::sync::lock;
use disk::{close_disk, Disk};

/// A running engine: N core threads, each with its own io_uring. Cheap to clone.
///
/// ```
/// use addcow_engine::format::{create, CreateOptions};
/// use addcow_engine::{DiskOptions, Engine, EngineConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let overlay = dir.path().join("vm.add-cow");
/// // A 1 MiB overlay with no base: its raw image is created next to it (vm.raw).
/// create(&CreateOptions {
///     overlay: overlay.clone(),
///     size: Some(1 << 20),
///     ..CreateOptions::default()
/// })?;
///
/// let engine = Engine::start(EngineConfig {
///     cores: 2,
///     ..EngineConfig::default()
/// })?;
/// let disk = engine.open(&overlay, DiskOptions::default())?;
/// disk.write_at(4096, b"hello, add-cow", false)?;
/// disk.flush()?; // data, then bits: durable from here on
/// assert_eq!(disk.read_at(4096, 14)?, b"hello, add-cow");
/// disk.close()?;
/// engine.shutdown()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    shared: Arc<EngineShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    disks: Mutex<Vec<Weak<DiskState>>>,
}

/// Closes every disk still open (a final commit each), stops the cores and joins them.
fn stop_all(
    shared: &EngineShared,
    disks: Vec<Weak<DiskState>>,
    threads: Vec<JoinHandle<()>>,
) -> Result<()> {
    let mut first_err = None;
    for d in disks.into_iter().filter_map(|w| w.upgrade()) {
        if let Err(e) = close_disk(shared, &d, true) {
            first_err.get_or_insert(
                Error::io(
                    "commit at shutdown",
                    std::io::Error::from_raw_os_error(e.errno),
                )
                .with_path(&d.meta_path),
            );
        }
    }
    for c in &shared.cores {
        let _ = c.send(Msg::Shutdown);
    }
    for t in threads {
        let _ = t.join();
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl EngineInner {
    /// Stops the engine (once). On a core thread (the last handle dropped in a completion) the
    /// work moves to a helper thread: a core cannot wait for the requests it must serve itself.
    fn stop(&self) -> Result<()> {
        if self.shared.stopped.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let disks = std::mem::take(&mut *lock(&self.disks));
        let threads = std::mem::take(&mut *lock(&self.threads));
        if on_core_thread() {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("addcow-stop".into())
                .spawn(move || {
                    if let Err(e) = stop_all(&shared, disks, threads) {
                        tracing::error!(error = %e, "stopping the engine");
                    }
                });
            if let Err(e) = spawned {
                // No thread: at least tell the cores to finish; the disks' final commits are
                // lost with the process anyway if it cannot start a thread.
                tracing::error!(error = %e, "cannot start a thread to stop the engine");
                for c in &self.shared.cores {
                    let _ = c.send(Msg::Shutdown);
                }
            }
            return Ok(());
        }
        stop_all(&self.shared, disks, threads)
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
    /// fds / unregistered buffers, with a warning, when that fails).
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
        let arena = Arena::new(config.arena_bytes, cores);
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
                .spawn(move || match Core::new(id, shared) {
                    Ok(c) => {
                        let _ = ready.send(Ok(()));
                        // A panic unwinds through the core: its ring cancels and reaps (or
                        // leaks) in-flight ops, and every request it held is answered.
                        let run = std::panic::AssertUnwindSafe(move || c.run(rx));
                        if std::panic::catch_unwind(run).is_err() {
                            tracing::error!(
                                core = id,
                                "core thread panicked; its requests were \
                                answered with errors and it serves no more"
                            );
                        }
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                })
                .map_err(|e| Error::io("spawn core thread", e))?;
            lock(&inner.threads).push(spawned);
        }
        drop(ready_tx);
        for _ in 0..cores {
            let failed = match ready_rx.recv() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(std::io::Error::other("core thread exited")),
            };
            if let Some(e) = failed {
                let _ = inner.stop();
                return Err(Error::io("io_uring setup", e));
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
    /// with every core's ring; any core may serve it. Writable, it holds exclusive locks on the
    /// overlay and its raw image and a shared lock on the base until it is closed.
    pub fn open(&self, path: &Path, opts: DiskOptions) -> Result<Disk> {
        let shared = &self.inner.shared;
        if shared.stopped.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Shutdown).with_path(path));
        }
        let slot = shared.take_file_slot();
        let disk = Arc::new(DiskState::open(path, &opts, &shared.config, slot)?);
        if let Some(k) = disk.slot_index() {
            let fds = [
                disk.fd(Role::Image),
                disk.fd(Role::Meta),
                disk.fd(Role::Base),
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
        Ok(Disk::new(disk, Arc::clone(shared)))
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

    /// Has core `core` poll `fd` (an eventfd; made non-blocking) in its io_uring and call
    /// `source` on that core when it is written: [`CoreSource::ready`] after the count was
    /// consumed, [`CoreSource::end_of_batch`] at the end of every turn, and its socket ops'
    /// completions and timer (see [`CoreSource`]). Returns once the poll is in the
    /// core's ring (a write from then on, or one already pending, fires it). Not from a core
    /// thread (it waits for the core).
    pub fn attach_source(
        &self,
        core: usize,
        fd: OwnedFd,
        source: Box<dyn CoreSource>,
    ) -> Result<SourceId> {
        let shared = &self.inner.shared;
        if core >= shared.cores.len() {
            return Err(Error::new(ErrorKind::InvalidArgument(format!(
                "attach_source: no core {core} (the engine has {})",
                shared.cores.len()
            ))));
        }
        if on_core_thread() {
            return Err(Error::new(ErrorKind::InvalidArgument(
                "attach_source called on a core thread".into(),
            )));
        }
        let (ack, answer) = crossbeam_channel::bounded(1);
        let msg = Msg::Attach { fd, source, ack };
        if shared.cores[core].send(msg).is_err() {
            return Err(Error::new(ErrorKind::Shutdown));
        }
        match answer.recv() {
            Ok(Ok(id)) => Ok(SourceId { core, id }),
            Ok(Err(e)) => Err(Error::io("attach a source to a core", e)),
            Err(_) => Err(Error::new(ErrorKind::Shutdown)),
        }
    }

    /// Stops polling `id`'s fd and drops the source (and its fd) on its core; when this returns,
    /// none of its callbacks runs again. Its socket ops in flight are cancelled (their buffers
    /// are freed at their completions); requests the source submitted still complete (into
    /// whatever their completions hold). A source of a stopped engine is already gone. Not from
    /// a core thread (it waits for the core; a source ends itself with
    /// [`SourceCtx::detach`](crate::io::SourceCtx::detach)).
    pub fn detach_source(&self, id: SourceId) -> Result<()> {
        if on_core_thread() {
            return Err(Error::new(ErrorKind::InvalidArgument(
                "detach_source called on a core thread".into(),
            )));
        }
        let Some(handle) = self.inner.shared.cores.get(id.core) else {
            return Ok(());
        };
        let (ack, answer) = crossbeam_channel::bounded(1);
        if handle.send(Msg::Detach { id: id.id, ack }).is_ok() {
            // A core that exits answers (or drops) the message: either way the source is gone.
            let _ = answer.recv();
        }
        Ok(())
    }

    /// Closes every open disk (each waits for its accepted requests, then commits) and stops
    /// the core threads. Requests submitted afterwards fail with `ESHUTDOWN`. Do not call it
    /// from a completion callback.
    pub fn shutdown(&self) -> Result<()> {
        self.inner.stop()
    }
}
