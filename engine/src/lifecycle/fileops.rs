//! The one layer through which the lifecycle tools (resize, rebase, commit) change files.
//!
//! Every write, size change, hole punch, preallocation, fdatasync, file creation, rename,
//! unlink and directory fsync they issue goes through [`Ops`] and an [`OpFile`], so the order in
//! which they reach the kernel is visible in one place and, with the test-only `crash-recorder`
//! feature, recorded in an [`OpLog`] that the lifecycle crash checker replays into every crash
//! state a power cut could leave.
//!
//! Durability model the checker applies to the log (documented here because the code relies on
//! it): an operation on a file is durable once a later [`FileOp::Sync`] of that file completed
//! (an fdatasync also makes a size change durable); a directory operation (create, rename,
//! unlink) is durable once a later [`FileOp::SyncDir`] completed. Anything not yet durable may
//! or may not have reached the disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// One recorded file operation, in the order it completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOp {
    /// An existing file at `path` was opened for the operation; later events name it by `id`.
    Open { id: u64, path: PathBuf },
    /// A new, empty file was created at `path` (a directory operation).
    Create { id: u64, path: PathBuf },
    /// `data` was written at `offset`.
    Write { id: u64, offset: u64, data: Vec<u8> },
    /// The file's size was set to `len` (truncate or extend; extended bytes read as zeros).
    SetLen { id: u64, len: u64 },
    /// `[offset, offset + len)` was punched (reads as zeros; the size is kept).
    Punch { id: u64, offset: u64, len: u64 },
    /// Blocks for `[offset, offset + len)` were allocated (contents and size unchanged).
    Allocate { id: u64, offset: u64, len: u64 },
    /// An fdatasync of the file completed.
    Sync { id: u64 },
    /// `from` was renamed over `to` (a directory operation).
    Rename { from: PathBuf, to: PathBuf },
    /// `path` was removed (a directory operation).
    Unlink { path: PathBuf },
    /// An fsync of the directory `path` completed: every directory operation before it is durable.
    SyncDir { path: PathBuf },
}

/// An append-only log of [`FileOp`]s (filled only through [`Ops::recording`]).
#[derive(Debug, Default)]
pub struct OpLog {
    ops: Mutex<Vec<FileOp>>,
    next_id: AtomicU64,
}

impl OpLog {
    /// A new, empty log.
    pub fn new() -> Arc<OpLog> {
        Arc::new(OpLog::default())
    }

    fn push(&self, op: FileOp) {
        if let Ok(mut ops) = self.ops.lock() {
            ops.push(op);
        }
    }

    /// A copy of every operation so far.
    pub fn snapshot(&self) -> Vec<FileOp> {
        self.ops.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

/// Issues (and, when recording, logs) the lifecycle tools' file operations.
#[derive(Clone, Default)]
pub struct Ops {
    log: Option<Arc<OpLog>>,
    /// Test-only: the index of the file change (write, set_len, allocate, punch, sync) that
    /// fails with an injected ENOSPC instead of being issued, and the count of changes so far.
    fail: Option<Arc<(usize, AtomicU64)>>,
    /// Test-only: run once just before the tool locks its overlay (see [`Ops::before_lock`]).
    #[cfg(feature = "lifecycle-hooks")]
    before_lock: Option<Arc<BeforeLock>>,
}

/// A closure run once, at the moment a tool is about to lock its overlay.
#[cfg(feature = "lifecycle-hooks")]
type BeforeLock = Mutex<Option<Box<dyn FnOnce() + Send>>>;

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("recording", &self.log.is_some())
            .field("fail", &self.fail.as_ref().map(|f| f.0))
            .finish_non_exhaustive()
    }
}

impl Ops {
    /// Operations that are only issued.
    pub fn new() -> Ops {
        Ops::default()
    }

    /// These operations, with `f` run once at the moment the tool is about to lock the overlay
    /// it changes (test-only feature `lifecycle-hooks`): before that lock, another process (a
    /// server stopping) may still hold it and change the overlay, and a test acts as that
    /// process here, at exactly that point.
    #[cfg(feature = "lifecycle-hooks")]
    pub fn before_lock(mut self, f: impl FnOnce() + Send + 'static) -> Ops {
        self.before_lock = Some(Arc::new(Mutex::new(Some(Box::new(f)))));
        self
    }

    /// Called by a tool just before it locks the overlay (a no-op outside tests): runs the
    /// closure given to [`Ops::before_lock`], once.
    pub(crate) fn about_to_lock(&self) {
        #[cfg(feature = "lifecycle-hooks")]
        if let Some(hook) = &self.before_lock {
            let f = hook.lock().ok().and_then(|mut f| f.take());
            if let Some(f) = f {
                f();
            }
        }
    }

    /// Operations that are issued and logged into `log` (test-only feature `crash-recorder`).
    #[cfg(feature = "crash-recorder")]
    pub fn recording(log: Arc<OpLog>) -> Ops {
        Ops {
            log: Some(log),
            fail: None,
            #[cfg(feature = "lifecycle-hooks")]
            before_lock: None,
        }
    }

    /// Like [`Ops::recording`], but file change number `n` (counting from 0: writes, size
    /// changes, allocations, punches and syncs of opened files) fails with ENOSPC without being
    /// issued, and every change after it is issued normally: the error path of a tool, including
    /// what it does to undo, is recorded like its success path.
    #[cfg(feature = "crash-recorder")]
    pub fn recording_failing_at(log: Arc<OpLog>, n: usize) -> Ops {
        Ops {
            log: Some(log),
            fail: Some(Arc::new((n, AtomicU64::new(0)))),
            #[cfg(feature = "lifecycle-hooks")]
            before_lock: None,
        }
    }

    /// Whether the injected failure happened (see [`Ops::recording_failing_at`]).
    pub fn injected_failure_happened(&self) -> bool {
        self.fail
            .as_ref()
            .is_some_and(|f| f.1.load(Ordering::Relaxed) > f.0 as u64)
    }

    /// Counts one file change; the injected ENOSPC when it is the chosen one.
    fn inject(&self, op: &'static str, path: &Path) -> Result<()> {
        if let Some(f) = &self.fail {
            if f.1.fetch_add(1, Ordering::Relaxed) == f.0 as u64 {
                let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
                return Err(Error::io(op, e).with_path(path));
            }
        }
        Ok(())
    }

    fn record(&self, op: impl FnOnce() -> FileOp) {
        if let Some(log) = &self.log {
            log.push(op());
        }
    }

    fn id(&self) -> u64 {
        self.log
            .as_ref()
            .map_or(0, |l| l.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Wraps an already open `file` (its descriptor is duplicated, so locks held on it stay in
    /// force for the copy).
    pub fn open(&self, file: &File, path: &Path) -> Result<OpFile> {
        let dup = file
            .try_clone()
            .map_err(|e| Error::io("duplicate descriptor", e).with_path(path))?;
        let id = self.id();
        self.record(|| FileOp::Open {
            id,
            path: path.to_path_buf(),
        });
        Ok(OpFile {
            file: dup,
            path: path.to_path_buf(),
            id,
            ops: self.clone(),
        })
    }

    /// Creates a new, empty file at `path` (refused if it exists), readable and writable.
    pub fn create(&self, path: &Path) -> Result<OpFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create file", e).with_path(path))?;
        let id = self.id();
        self.record(|| FileOp::Create {
            id,
            path: path.to_path_buf(),
        });
        Ok(OpFile {
            file,
            path: path.to_path_buf(),
            id,
            ops: self.clone(),
        })
    }

    /// Renames `from` over `to`.
    pub fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(|e| Error::io("rename", e).with_path(from))?;
        self.record(|| FileOp::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
        });
        Ok(())
    }

    /// Removes `path` if it exists (a missing file is not an error).
    pub fn remove_if_present(&self, path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {
                self.record(|| FileOp::Unlink {
                    path: path.to_path_buf(),
                });
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove file", e).with_path(path)),
        }
    }

    /// fsyncs the directory `dir`, making the creates, renames and unlinks in it durable.
    pub fn sync_dir(&self, dir: &Path) -> Result<()> {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("sync directory", e).with_path(dir))?;
        self.record(|| FileOp::SyncDir {
            path: dir.to_path_buf(),
        });
        Ok(())
    }
}

/// A file opened through [`Ops`]: every change to it is issued (and logged) here.
#[derive(Debug)]
pub struct OpFile {
    file: File,
    path: PathBuf,
    id: u64,
    ops: Ops,
}

impl OpFile {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (for reads and locks; changes go through the methods here).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64, op: &'static str) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(op, e).with_path(&self.path).with_offset(offset))
    }

    /// Writes all of `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64, op: &'static str) -> Result<()> {
        self.ops.inject(op, &self.path)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(op, e).with_path(&self.path).with_offset(offset))?;
        self.ops.record(|| FileOp::Write {
            id: self.id,
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    /// Sets the file's size (ftruncate).
    pub fn set_len(&self, len: u64, op: &'static str) -> Result<()> {
        self.ops.inject(op, &self.path)?;
        self.file
            .set_len(len)
            .map_err(|e| Error::io(op, e).with_path(&self.path).with_offset(len))?;
        self.ops.record(|| FileOp::SetLen { id: self.id, len });
        Ok(())
    }

    /// Allocates blocks for `[offset, offset + len)` without changing contents or size, so a
    /// later write there cannot fail with ENOSPC. File systems without `fallocate` skip it.
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.ops.inject("preallocate", &self.path)?;
        crate::format::overlay::preallocate(&self.file, offset, len).map_err(|e| {
            Error::io("preallocate", e)
                .with_path(&self.path)
                .with_offset(offset)
        })?;
        self.ops.record(|| FileOp::Allocate {
            id: self.id,
            offset,
            len,
        });
        Ok(())
    }

    /// Punches `[offset, offset + len)` (reads as zeros, frees the blocks, keeps the size). File
    /// systems that cannot punch keep the bytes: callers only punch what no bit refers to.
    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if libc::off_t::try_from(offset).is_err() || libc::off_t::try_from(len).is_err() {
            return Ok(());
        }
        self.ops.inject("punch hole", &self.path)?;
        match crate::sys::punch_hole(&self.file, offset, len) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
            Err(e) => {
                return Err(Error::io("punch hole", e)
                    .with_path(&self.path)
                    .with_offset(offset))
            }
        }
        self.ops.record(|| FileOp::Punch {
            id: self.id,
            offset,
            len,
        });
        Ok(())
    }

    /// fdatasync: every change above (including the size) is durable once this returns.
    pub fn sync(&self, op: &'static str) -> Result<()> {
        self.ops.inject(op, &self.path)?;
        self.file
            .sync_data()
            .map_err(|e| Error::io(op, e).with_path(&self.path))?;
        self.ops.record(|| FileOp::Sync { id: self.id });
        Ok(())
    }
}
