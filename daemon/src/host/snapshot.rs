//! Live snapshots (`export-snapshot`): the export's current overlay becomes a read-only,
//! point-in-time base, and a new, empty overlay on top of it takes the export's writes, without
//! disconnecting anyone.
//!
//! # Order (what makes it crash-safe)
//! Under [`EngineDisk::switch`] (new requests held back, every submitted one answered, the disk
//! quiesced: no copy-on-read sets bits any more):
//! 1. FLUSH the current overlay: every write answered so far is durable in it (data, then bits).
//! 2. Create the new overlay with the current one as its base (`format::create_exclusive`:
//!    both files `O_EXCL`, so a failure removes exactly what this snapshot made): its header
//!    and all-clear bitmap and its sparse raw image, each fsynced, then their directory. The
//!    new overlay is durable before anything points at it or writes into it.
//! 3. The current disk lets go of its exclusive locks but stays open (nothing is submitted to
//!    it, nothing is dirty).
//! 4. Open the new overlay: its chain opens the old one read-only and share-locks it, so from now
//!    on nobody can write it (it is the stable point-in-time image). Then close the old disk
//!    (nothing left to commit).
//! 5. The new disk becomes the export's; held requests go to it. Only then is the reply sent
//!    and `export-snapshot` emitted.
//!
//! The new overlay cannot be opened before requests are held: its chain loads the old overlay's
//! bitmap, which must have taken its last write first. A crash before 2 completes leaves the old
//! overlay in use and possibly a partial new file (never referenced). Held requests reach the new
//! overlay at 5, a moment before the reply, so after a crash the rule is: if the new overlay
//! exists and opens, serve it (it was durable before any request reached it, and may hold
//! answered writes); otherwise serve the old one. If 4 fails (an image server under the chain is
//! down, ...), the old disk takes its locks back and keeps serving unchanged (nothing is
//! reopened), the new files are removed and the error says so. Taking the locks back checks that
//! the old overlay's files are as they were let go (identity, size, times) and that their paths
//! still name them: if another process locked, wrote or replaced them in between, the old disk
//! is closed without a final commit ([`addcow_engine::Disk::abandon`]) and the export fails
//! every request ([`SnapshotError::Lost`]).

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use addcow_engine::format::overlay::default_image_path;
use addcow_engine::format::{create_exclusive, CreateOptions, Created};
use addcow_engine::Disk;
use serde::Serialize;

use super::allow::{AllowError, AllowedDirs};
use super::events;
use super::runtime::Host;
use crate::backend::disk::{EngineDisk, Generation};

/// What a snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshotted {
    /// The export.
    pub name: String,
    /// The new overlay the export now writes to.
    pub overlay: PathBuf,
    /// Its raw image.
    pub image: PathBuf,
    /// The previous overlay: now the new one's read-only base, a stable point-in-time image.
    pub base: PathBuf,
}

/// Why a snapshot was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No export has this name.
    #[error("no export named {0:?}")]
    NoSuchExport(String),
    /// The export is read-only: nothing is written, there is nothing to snapshot into.
    #[error("export {0:?} is read-only: a snapshot needs a writable export")]
    ReadOnly(String),
    /// The export is not backed by an engine disk.
    #[error("export {0:?} cannot be snapshotted (not an engine disk)")]
    Unsupported(String),
    /// The target path is relative.
    #[error("{}: the new overlay's path must be absolute", .0.display())]
    Relative(PathBuf),
    /// The new overlay or its raw image exists.
    #[error("{}: already exists (a snapshot never overwrites a file)", .0.display())]
    Exists(PathBuf),
    /// The target's folder is not one export-add may open files in.
    #[error("{}: the new overlay's folder is not one the control socket may create files in ({dirs}; see --allow-dir)", path.display())]
    NotAllowed {
        /// The new overlay.
        path: PathBuf,
        /// The allowed folders.
        dirs: String,
    },
    /// A file the snapshot created is not in an allowed folder (a folder on its path was
    /// swapped after the check); it was removed again.
    #[error("{0}")]
    Outside(AllowError),
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The export runs a job (a stream holds the open disk).
    #[error("export {name:?} runs job {id}: cancel it or wait until it ends before a snapshot")]
    JobRunning {
        /// The export.
        name: String,
        /// The job.
        id: String,
    },
    /// A backup runs on the export (or it is a backup's point-in-time view).
    #[error("{0}")]
    BackupRunning(String),
    /// A step failed; the export still serves its disk as before (`serving`).
    #[error("snapshot of export {name:?} failed while {step}: {error}; nothing changed: the export still serves {}", serving.display())]
    Failed {
        /// The export.
        name: String,
        /// The step.
        step: &'static str,
        /// The cause.
        error: String,
        /// The overlay the export serves after the failure.
        serving: PathBuf,
    },
    /// The snapshot failed and the export's overlay was locked, written or replaced by another
    /// process meanwhile: the export no longer writes it (not even a final commit) and fails
    /// every request.
    #[error("snapshot of export {name:?} failed: {error}; the overlay is lost to this export: it is not written any more and the export fails every request until it is deleted and added again")]
    Lost {
        /// The export.
        name: String,
        /// What failed.
        error: String,
    },
}

impl SnapshotError {
    /// The error class reported in the JSON-RPC error's `data`.
    pub fn class(&self) -> &'static str {
        match self {
            SnapshotError::NoSuchExport(_) => "no-such-export",
            SnapshotError::ReadOnly(_) => "read-only",
            SnapshotError::Unsupported(_) => "unsupported",
            SnapshotError::Relative(_)
            | SnapshotError::NotAllowed { .. }
            | SnapshotError::Outside(_) => "not-allowed",
            SnapshotError::Exists(_) => "exists",
            SnapshotError::ShuttingDown => "shutting-down",
            SnapshotError::JobRunning { .. } => "job-running",
            SnapshotError::BackupRunning(_) => "backup-running",
            SnapshotError::Failed { .. } | SnapshotError::Lost { .. } => "snapshot-failed",
        }
    }
}

/// Checks the target: absolute, new (overlay and raw image), in an allowed folder.
fn check_target(host: &Host, overlay: &Path) -> Result<PathBuf, SnapshotError> {
    if !overlay.is_absolute() {
        return Err(SnapshotError::Relative(overlay.to_path_buf()));
    }
    let image = default_image_path(overlay);
    for p in [overlay, image.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(SnapshotError::Exists(p.to_path_buf()));
        }
    }
    let dirs = host.allowed.dirs();
    let describe = || {
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let parent = overlay.parent().and_then(|p| std::fs::canonicalize(p).ok());
    match parent {
        Some(real) if dirs.iter().any(|d| real.starts_with(d)) => Ok(image),
        _ => Err(SnapshotError::NotAllowed {
            path: overlay.to_path_buf(),
            dirs: describe(),
        }),
    }
}

/// Whether the new disk `next` opened the snapshot's files: at depth 0 the files `made`
/// created (by device and inode), below them only files the current disk `cur` holds (its
/// overlay, raw image and chain). What the paths name by now does not count.
fn same_files(next: &Disk, made: &Created, cur: &Disk) -> Result<(), String> {
    let id = |fd: std::os::fd::BorrowedFd<'_>| {
        nix::sys::stat::fstat(fd.as_raw_fd())
            .map(|st| (st.st_dev, st.st_ino))
            .ok()
    };
    let made: Vec<_> = made.files().filter_map(|(_, f)| id(f.as_fd())).collect();
    let held: Vec<_> = cur
        .opened_files()
        .iter()
        .filter_map(|f| f.fd.and_then(id))
        .collect();
    for f in next.opened_files() {
        let Some(fd) = f.fd else { continue };
        let want = if f.file.depth == 0 { &made } else { &held };
        if !id(fd).is_some_and(|i| want.contains(&i)) {
            return Err(format!(
                "{}: the file opened is not the one the snapshot {} (a path was swapped meanwhile)",
                f.file.path.display(),
                if f.file.depth == 0 {
                    "created"
                } else {
                    "stands on"
                }
            ));
        }
    }
    Ok(())
}

/// Takes a live snapshot of export `name` into the new overlay `overlay` (see the module docs).
pub fn snapshot_export(
    host: &Host,
    name: &str,
    overlay: &Path,
) -> Result<Snapshotted, SnapshotError> {
    if host.stop.is_set() {
        return Err(SnapshotError::ShuttingDown);
    }
    let export = host
        .exports
        .find(name)
        .ok_or_else(|| SnapshotError::NoSuchExport(name.to_string()))?;
    let ed = export
        .backend
        .engine_disk()
        .ok_or_else(|| SnapshotError::Unsupported(name.to_string()))?;
    if export.backend.read_only() {
        return Err(SnapshotError::ReadOnly(name.to_string()));
    }
    if let Some((id, _)) = host.jobs.active_on(name) {
        return Err(SnapshotError::JobRunning {
            name: name.to_string(),
            id,
        });
    }
    if let Some(why) = host.backup_refusal(name) {
        return Err(SnapshotError::BackupRunning(why));
    }
    let image = check_target(host, overlay)?;
    let result = ed.switch(|cur| {
        // Again under the switch (a backup-begin freezes the disk under it): the view would be
        // left on the old disk while the writes go to the new one.
        if cur.disk.fleece_active() {
            let why = host.backup_refusal(name).unwrap_or_else(|| {
                format!("export {name:?} has a backup starting: end it with backup-end first")
            });
            return (None, Err(SnapshotError::BackupRunning(why)));
        }
        // An export-del that began meanwhile wins: it closes whatever disk is current after us.
        if export.is_deleting() {
            return (None, Err(SnapshotError::NoSuchExport(name.to_string())));
        }
        // Again under the switch: a job-start pins the disk while it registers, so a job that
        // started since the check above is seen here.
        if let Some((id, _)) = host.jobs.active_on(name) {
            let e = SnapshotError::JobRunning {
                name: name.to_string(),
                id,
            };
            return (None, Err(e));
        }
        take(ed, cur, name, overlay, &image, &host.allowed)
    });
    if let Ok(s) = &result {
        tracing::info!(export = %name, overlay = %s.overlay.display(), base = %s.base.display(), "live snapshot");
        host.events.emit(
            events::EXPORT_SNAPSHOT,
            serde_json::to_value(s).unwrap_or_default(),
        );
    }
    result
}

/// Copies every dirty bitmap of `cur` into the new overlay `next` (durably, before any write
/// reaches `next`): the export's bitmaps go on tracking the export's writes after the switch.
/// The old overlay's sidecar keeps its copy as it was at the snapshot.
fn copy_bitmaps(cur: &Disk, next: &Disk) -> Result<(), String> {
    for b in cur.bitmaps().list() {
        cur.bitmaps()
            .copy_to(&b.name, next.bitmaps())
            .map_err(|e| format!("copying dirty bitmap {:?} to the new overlay: {e}", b.name))?;
    }
    Ok(())
}

/// Steps 1-5 of the module docs, with new requests held back and none in flight.
fn take(
    ed: &EngineDisk,
    cur: &Generation,
    name: &str,
    overlay: &Path,
    image: &Path,
    allowed: &AllowedDirs,
) -> (Option<Generation>, Result<Snapshotted, SnapshotError>) {
    let old = cur.disk.path().to_path_buf();
    let failed = |step: &'static str, error: String| SnapshotError::Failed {
        name: name.to_string(),
        step,
        error,
        serving: old.clone(),
    };
    if cur.disk.read_only() {
        return (None, Err(SnapshotError::ReadOnly(name.to_string())));
    }
    if let Err(e) = cur.disk.flush() {
        return (
            None,
            Err(failed("flushing the current overlay", e.to_string())),
        );
    }
    let opts = CreateOptions {
        overlay: overlay.to_path_buf(),
        base: Some(old.clone()),
        image: None,
        // The export's size.
        size: Some(cur.disk.size()),
        force: false,
    };
    // Both files are made here (`O_EXCL`): on failure exactly these are removed, never a file
    // someone else put at one of the paths.
    let made = match create_exclusive(&opts) {
        Ok(made) => made,
        Err(e) => return (None, Err(failed("creating the new overlay", e.to_string()))),
    };
    debug_assert!(made.paths().eq([image, overlay]));
    let remove_new = || {
        if let Err(e) = made.remove() {
            tracing::warn!(export = %name, error = %e, "cannot remove a file of a failed snapshot");
        }
    };
    // The files made, not their paths: a folder swapped since `check_target` put them
    // elsewhere (see `allow`).
    let roles = ["new overlay's raw image", "new overlay"];
    let outside = made
        .files()
        .zip(roles)
        .find_map(|((p, f), role)| allowed.check_fd(role, p, f.as_fd()).err());
    if let Some(e) = outside {
        remove_new();
        return (None, Err(SnapshotError::Outside(e)));
    }
    if crate::process::seam::fail("snapshot-create") {
        remove_new();
        let e = addcow_engine::Error::io(
            "create (test seam)",
            std::io::Error::from_raw_os_error(libc::EIO),
        );
        return (None, Err(failed("creating the new overlay", e.to_string())));
    }
    // The new overlay's chain share-locks the old one, which this disk holds exclusively: let
    // go of that lock but keep the disk open (quiesced, flushed, nothing submitted to it), so
    // that if the new overlay cannot be opened (an image server under the chain is down, ...)
    // the export goes on serving this disk as it is, without opening anything again.
    cur.disk.unlock_overlay();
    crate::process::seam::pause("snapshot-unlocked");
    let opened = if crate::process::seam::fail("snapshot-open") {
        Err(addcow_engine::Error::io(
            "open (test seam)",
            std::io::Error::from_raw_os_error(libc::EIO),
        ))
    } else {
        ed.open_generation(overlay, name)
    };
    let opened = opened.map_err(|e| e.to_string()).and_then(|next| {
        match same_files(&next.disk, &made, &cur.disk)
            .and_then(|()| copy_bitmaps(&cur.disk, &next.disk))
        {
            Ok(()) => Ok(next),
            Err(e) => {
                if let Err(c) = next.disk.close() {
                    tracing::warn!(export = %name, error = %c, "closing a refused snapshot's disk");
                }
                // Bitmaps copied before the refusal: not left for a later overlay at this path.
                let _ = std::fs::remove_file(next.disk.bitmaps().path());
                Err(e)
            }
        }
    });
    match opened {
        Ok(next) => {
            // Quiesced, flushed and untouched since: the close commits nothing; it only lets go
            // of the files (the new disk holds the old overlay share-locked through its own).
            if let Err(e) = cur.disk.close() {
                tracing::warn!(export = %name, overlay = %old.display(), error = %e, "closing the snapshotted overlay");
            }
            let done = Snapshotted {
                name: name.to_string(),
                overlay: overlay.to_path_buf(),
                image: image.to_path_buf(),
                base: old,
            };
            (Some(next), Ok(done))
        }
        Err(e) => {
            remove_new();
            match cur.disk.relock_overlay(None) {
                Ok(()) => (None, Err(failed("opening the new overlay", e))),
                Err(again) => {
                    // Another process locked, wrote or replaced the overlay while it was
                    // unlocked: this disk's bitmap is stale or its files are not the overlay any
                    // more, so it must not write them again, not even a final commit.
                    if let Err(c) = cur.disk.abandon() {
                        tracing::error!(export = %name, overlay = %old.display(), error = %c, "closing the disk of a lost overlay");
                    }
                    tracing::error!(export = %name, overlay = %old.display(), error = %again, "the overlay was locked, written or replaced by another process during a failed snapshot; the export no longer writes it and fails every request");
                    (
                        None,
                        Err(SnapshotError::Lost {
                            name: name.to_string(),
                            error: format!(
                                "opening the new overlay failed: {e}; taking {} back failed: \
                                 {again}",
                                old.display()
                            ),
                        }),
                    )
                }
            }
        }
    }
}
