//! [`FleeceView`]: a disk frozen at an instant, readable while the disk keeps taking writes
//! (copy-before-write into a scratch file, "fleecing", as QEMU's and libvirt's pull-mode backup
//! do). How the cores copy and read, and why a view read never sees a later byte, is in
//! `core/fleece.rs`; the shared state is `disk/fleece.rs`.
//!
//! Crash states: the scratch is never synced and never read after a restart; the live overlay's
//! files and invariants are those of a disk without a view (copy-before-write only reads the
//! live disk, and a write goes on only after its copies, through the normal write path). A
//! crash ends the view; the scratch file left behind is replaced by the next
//! [`Disk::begin_fleece`] on the same path, and removed by [`FleeceView::end`].

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::disk::{accept, Disk};
use crate::error::{Error, ErrorKind, Result};
use crate::io::core::mailbox::{FleeceRead, Msg};
use crate::io::core::shared::EngineShared;
use crate::io::disk::fleece::{self, Fleece};
use crate::io::disk::state::DiskState;
use crate::io::request::{
    req_err, Completion, Done, Extent, ExtentKind, Request, RequestError, MAX_READ,
};
use crate::io::uring::buf;

/// Bytes copied to the scratch before the first write that changes any of them: the view's
/// copy granularity.
pub const FLEECE_CHUNK: u64 = fleece::FLEECE_CHUNK;

/// What a view has cost so far.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FleeceStats {
    /// The scratch file.
    pub scratch: PathBuf,
    /// Chunks copied into the scratch (each before the first write that changed it).
    pub chunks_copied: u64,
    /// Bytes copied into the scratch.
    pub bytes_copied: u64,
    /// Copies that failed (each failed the guest write that needed it).
    pub copy_failures: u64,
}

/// A disk frozen at the instant of [`Disk::begin_fleece`]: reads return the bytes the disk
/// held then, whatever was written since. Read-only. Ended by [`FleeceView::end`] (or on drop),
/// which removes the scratch file; writes to the disk then cost nothing extra.
pub struct FleeceView {
    state: Arc<DiskState>,
    engine: Arc<EngineShared>,
    fleece: Arc<Fleece>,
    ended: bool,
}

impl std::fmt::Debug for FleeceView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleeceView")
            .field("disk", &self.state.meta_path)
            .field("scratch", &self.fleece.path)
            .finish_non_exhaustive()
    }
}

impl Disk {
    /// Freezes the disk's current content as a [`FleeceView`], copying chunks into the new
    /// scratch file `scratch` before writes change them. A file already at `scratch` (left by
    /// a crash) is replaced.
    ///
    /// Precondition: no write-like request of this disk is in flight or queued (the caller
    /// holds its clients' requests back and waits for those accepted to be answered, as for a
    /// live snapshot): the view holds the bytes of that instant. A write in flight across the
    /// call may or may not be in the view, and, if it is still running, may change a chunk
    /// after the view began without a copy.
    ///
    /// Errors: the disk is read-only (nothing to freeze against) or closed; a view is already
    /// active on it; the scratch cannot be created or sized.
    pub fn begin_fleece(&self, scratch: &Path) -> Result<FleeceView> {
        let (state, engine) = self.parts();
        if state.read_only {
            return Err(Error::new(ErrorKind::InvalidArgument(
                "a point-in-time view of a read-only disk is the disk itself".into(),
            ))
            .with_path(&state.meta_path));
        }
        if state.closed.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::Shutdown).with_path(&state.meta_path));
        }
        let fleece = state.fleece.install_with(|| {
            refuse_to_replace(self, scratch)?;
            match std::fs::remove_file(scratch) {
                Ok(()) => {
                    tracing::info!(scratch = %scratch.display(), "replaced a stale backup scratch")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io("remove stale backup scratch", e).with_path(scratch))
                }
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(scratch)
                .map_err(|e| Error::io("create backup scratch", e).with_path(scratch))?;
            if let Err(e) = file.set_len(state.size) {
                let _ = std::fs::remove_file(scratch);
                return Err(Error::io("size backup scratch", e).with_path(scratch));
            }
            Ok(Arc::new(Fleece::new(
                scratch,
                file,
                state.size,
                fleece::FLEECE_CHUNK.max(state.unit),
            )))
        });
        let fleece = match fleece {
            Some(r) => r?,
            None => {
                return Err(Error::new(ErrorKind::InvalidArgument(
                    "a point-in-time view of this disk is already active".into(),
                ))
                .with_path(&state.meta_path))
            }
        };
        Ok(FleeceView {
            state: Arc::clone(state),
            engine: Arc::clone(engine),
            fleece,
            ended: false,
        })
    }
}

/// Refuses a scratch path that names something other than a stale scratch: not a regular
/// file (a symlink, a device, a folder), one of the files the disk itself holds open (its
/// overlay, raw image or a base layer), its dirty-bitmaps sidecar (or that sidecar's
/// temporary file), or any name of a bitmaps sidecar (`*.bitmaps`, `*.bitmaps.tmp`: an
/// overlay's sidecar, existing or to be). Replacing one of those would destroy data.
fn refuse_to_replace(disk: &Disk, scratch: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let refuse_name = |why: &str| {
        Err(Error::new(ErrorKind::InvalidArgument(format!(
            "the backup scratch path {why}: refused"
        )))
        .with_path(scratch))
    };
    if is_sidecar_name(scratch) {
        return refuse_name("is named like a dirty-bitmaps sidecar (*.bitmaps, *.bitmaps.tmp)");
    }
    let sidecar = disk.bitmaps().path().to_path_buf();
    let sidecar_tmp = {
        let mut s = sidecar.as_os_str().to_os_string();
        s.push(".tmp");
        std::path::PathBuf::from(s)
    };
    let meta = match std::fs::symlink_metadata(scratch) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("look at backup scratch", e).with_path(scratch)),
    };
    let refuse = |why: &str| {
        Err(Error::new(ErrorKind::InvalidArgument(format!(
            "the backup scratch path exists and {why}: not replaced"
        )))
        .with_path(scratch))
    };
    if !meta.file_type().is_file() {
        return refuse("is not a regular file");
    }
    let id = (meta.dev(), meta.ino());
    for side in [&sidecar, &sidecar_tmp] {
        if std::fs::metadata(side).is_ok_and(|m| (m.dev(), m.ino()) == id) {
            return refuse("is the disk's dirty-bitmaps sidecar");
        }
    }
    for f in disk.opened_files() {
        let same =
            f.fd.and_then(|fd| nix_fstat(fd))
                .is_some_and(|other| other == id);
        if same {
            return refuse("is a file of the disk itself");
        }
    }
    Ok(())
}

/// Whether `path`'s file name is one a dirty-bitmaps sidecar has (`*.bitmaps`, or its
/// temporary `*.bitmaps.tmp`).
fn is_sidecar_name(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    path.file_name()
        .map(|n| n.as_bytes())
        .is_some_and(|n| n.ends_with(b".bitmaps") || n.ends_with(b".bitmaps.tmp"))
}

/// Device and inode of an open file.
fn nix_fstat(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `struct stat` into `st` (valid, writable memory of its size) for
    // an open descriptor the borrow keeps open; `st` is read only when it succeeded.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

impl Disk {
    /// Whether a point-in-time view of this disk is active (a live snapshot or a resize would
    /// leave it behind: the daemon refuses them meanwhile).
    pub fn fleece_active(&self) -> bool {
        self.parts().0.fleece.get().is_some()
    }
}

/// Checks a read of `len` bytes at `offset` of a view of `size` bytes.
fn read_bounds(offset: u64, len: u64, size: u64) -> std::result::Result<(), RequestError> {
    if offset.checked_add(len).map_or(true, |e| e > size) {
        Err(req_err(libc::EINVAL, "read past the end", offset))
    } else if len > u64::from(MAX_READ) {
        Err(req_err(libc::EINVAL, "read larger than MAX_READ", offset))
    } else {
        Ok(())
    }
}

impl FleeceView {
    /// Virtual size in bytes (the disk's).
    pub fn size(&self) -> u64 {
        self.fleece.size
    }

    /// The scratch file.
    pub fn scratch(&self) -> &Path {
        &self.fleece.path
    }

    /// The open scratch file (to check where it really is).
    pub fn scratch_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fleece.file.as_fd()
    }

    /// What the view has cost so far.
    pub fn stats(&self) -> FleeceStats {
        let chunks = self.fleece.chunks_copied.load(Ordering::Relaxed);
        FleeceStats {
            scratch: self.fleece.path.clone(),
            chunks_copied: chunks,
            bytes_copied: chunks * self.fleece.chunk,
            copy_failures: self.fleece.copy_failures.load(Ordering::Relaxed),
        }
    }

    /// Submits `req` to core `core % engine.cores()`; `done` runs once, on a core thread (or at
    /// once on the calling thread for a request refused before it reaches a core). READ and
    /// READ_INTO read the frozen view; FLUSH and CACHE succeed (nothing to make durable);
    /// writes fail with `EPERM`. Never blocks the core: a view read takes no lock.
    pub fn submit(&self, core: usize, req: Request, done: Completion) {
        let (offset, buf, into) = match req {
            Request::Read { offset, len } => {
                if let Err(e) = read_bounds(offset, u64::from(len), self.size()) {
                    done(Err(e));
                    return;
                }
                let b = buf::alloc(self.engine.arena.as_ref(), len as usize, false);
                (offset, b.into(), false)
            }
            Request::ReadInto { offset, buf } => {
                if let Err(e) = read_bounds(offset, buf.len() as u64, self.size()) {
                    done(Err(e));
                    return;
                }
                (offset, buf, true)
            }
            Request::Flush | Request::Cache { .. } => {
                done(Ok(Done::Ok));
                return;
            }
            Request::Write { offset, .. }
            | Request::WriteZeroes { offset, .. }
            | Request::Trim { offset, .. }
            | Request::Populate { offset, .. } => {
                done(Err(req_err(
                    libc::EPERM,
                    "write to a read-only point-in-time view",
                    offset,
                )));
                return;
            }
        };
        if self.ended {
            done(Err(req_err(
                libc::ESHUTDOWN,
                "point-in-time view ended",
                offset,
            )));
            return;
        }
        let Some(done) = accept(&self.state, done) else {
            return;
        };
        let msg = Msg::FleeceRead(FleeceRead {
            disk: Arc::clone(&self.state),
            fleece: Arc::clone(&self.fleece),
            offset,
            buf,
            into,
            done,
        });
        if let Err(Msg::FleeceRead(r)) = self.engine.core(core).send(msg) {
            r.done
                .answer(Err(req_err(libc::ESHUTDOWN, "engine shut down", offset)));
        }
    }

    /// Blocking convenience: read `len` bytes of the view at `offset`. Not from a completion
    /// callback or a core thread.
    pub fn read_at(&self, offset: u64, len: u32) -> std::result::Result<Vec<u8>, RequestError> {
        if crate::io::core::on_core_thread() {
            return Err(req_err(libc::EDEADLK, "blocking call on a core thread", 0));
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let core = self.state.next_core.fetch_add(1, Ordering::Relaxed);
        self.submit(
            core,
            Request::Read { offset, len },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        match rx.recv() {
            Ok(Ok(Done::Read(b))) => Ok(b.to_vec()),
            Ok(Ok(_)) => Err(req_err(
                libc::EIO,
                "internal error: unexpected answer",
                offset,
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(req_err(libc::ESHUTDOWN, "engine shut down", offset)),
        }
    }

    /// Where the view's bytes of `[offset, offset+len)` come from (clipped to the size): a
    /// copied chunk is data ([`ExtentKind::Image`]); elsewhere the disk's own allocation, which
    /// is the instant's there (no write changed those chunks; a copy-up since may turn a base
    /// or zero run into an image one, never the other way). No I/O.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        let f = &self.fleece;
        let start = offset.min(f.size);
        let end = offset.saturating_add(len).min(f.size);
        let disk = Disk::new(Arc::clone(&self.state), Arc::clone(&self.engine));
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match out.last_mut() {
            Some(l) if l.kind == e.kind && l.offset + l.len == e.offset => l.len += e.len,
            _ => out.push(e),
        };
        let mut at = start;
        while at < end {
            let c = at / f.chunk;
            let copied = f.is_copied(c);
            // A run of chunks in the same state.
            let mut run_end = f.chunk_range(c).1.min(end);
            while run_end < end && f.is_copied(run_end / f.chunk) == copied {
                run_end = f.chunk_range(run_end / f.chunk).1.min(end);
            }
            if copied {
                push(Extent {
                    offset: at,
                    len: run_end - at,
                    kind: ExtentKind::Image,
                });
            } else {
                for e in disk.allocation(at, run_end - at) {
                    push(e);
                }
            }
            at = run_end;
        }
        out
    }

    /// Ends the view: writes to the disk no longer copy anything, and the scratch file is
    /// removed (reads of the view still in flight finish from the open file).
    pub fn end(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        self.state.fleece.remove(&self.fleece);
        match std::fs::remove_file(&self.fleece.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove backup scratch", e).with_path(&self.fleece.path)),
        }
    }
}

impl Drop for FleeceView {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(error = %e, "ending a point-in-time view");
        }
    }
}
