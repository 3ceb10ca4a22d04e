//! Live snapshots (`export-snapshot`): the export's current overlay becomes a read-only,
//! point-in-time base, and a new, empty overlay on top of it takes the export's writes, without
//! disconnecting anyone.
//!
//! # Order (what makes it crash-safe)
//! Under [`EngineDisk::switch`] (new requests held back, every submitted one answered):
//! 1. FLUSH the current overlay: every write answered so far is durable in it (data, then bits).
//! 2. Create the new overlay with the current one as its base (`format::create`): its header and
//!    all-clear bitmap, and its sparse raw image next to it, each fsynced, then their directory
//!    fsynced. The new overlay is durable before anything points at it or writes into it.
//! 3. Close the current overlay (a final commit; its exclusive locks are released).
//! 4. Open the new overlay: its chain opens the old one read-only and share-locks it, so from now
//!    on nobody can write it (it is the stable point-in-time image).
//! 5. The new disk becomes the export's; held requests go to it. Only then is the reply sent
//!    and `export-snapshot` emitted.
//!
//! A crash before 2 completes leaves the old overlay in use and possibly a partial new file
//! (never referenced). Held requests reach the new overlay at 5, a moment before the reply, so
//! after a crash the rule is: if the new overlay exists and opens, serve it (it was durable
//! before any request reached it, and may hold answered writes); otherwise serve the old one.
//! If 3-4 fail, the old overlay is reopened and keeps serving, and the new files are removed.

use std::path::{Path, PathBuf};

use addcow_engine::format::overlay::default_image_path;
use addcow_engine::format::{create, CreateOptions};
use serde::Serialize;

use super::events;
use super::export::{EngineDisk, Generation};
use super::host::Host;

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
    /// A step failed; `serving` says what the export serves now.
    #[error("snapshot of export {name:?} failed while {step}: {error}; the export serves {}", serving.display())]
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
}

impl SnapshotError {
    /// The error class reported in the JSON-RPC error's `data`.
    pub fn class(&self) -> &'static str {
        match self {
            SnapshotError::NoSuchExport(_) => "no-such-export",
            SnapshotError::ReadOnly(_) => "read-only",
            SnapshotError::Unsupported(_) => "unsupported",
            SnapshotError::Relative(_) | SnapshotError::NotAllowed { .. } => "not-allowed",
            SnapshotError::Exists(_) => "exists",
            SnapshotError::ShuttingDown => "shutting-down",
            SnapshotError::JobRunning { .. } => "job-running",
            SnapshotError::Failed { .. } => "snapshot-failed",
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
    let image = check_target(host, overlay)?;
    let result = ed.switch(|cur| {
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
        take(ed, cur, name, overlay, &image)
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

/// Steps 1-5 of the module docs, with new requests held back and none in flight.
fn take(
    ed: &EngineDisk,
    cur: &Generation,
    name: &str,
    overlay: &Path,
    image: &Path,
) -> (Option<Generation>, Result<Snapshotted, SnapshotError>) {
    let old = cur.disk.path().to_path_buf();
    let failed = |step: &'static str, error: String, serving: &Path| SnapshotError::Failed {
        name: name.to_string(),
        step,
        error,
        serving: serving.to_path_buf(),
    };
    if cur.disk.read_only() {
        return (None, Err(SnapshotError::ReadOnly(name.to_string())));
    }
    if let Err(e) = cur.disk.flush() {
        return (
            None,
            Err(failed("flushing the current overlay", e.to_string(), &old)),
        );
    }
    let opts = CreateOptions {
        overlay: overlay.to_path_buf(),
        base: Some(old.clone()),
        image: None,
        // The export's size, whatever file may have appeared at the raw image's path.
        size: Some(cur.disk.size()),
        force: false,
    };
    if let Err(e) = create(&opts) {
        // Nothing of ours to remove unless create made it (it refuses existing files).
        return (
            None,
            Err(failed("creating the new overlay", e.to_string(), &old)),
        );
    }
    let remove_new = || {
        let _ = std::fs::remove_file(overlay);
        let _ = std::fs::remove_file(image);
    };
    let reopen_old = |step: &'static str, error: String| {
        remove_new();
        match Generation::open(&ed.engine, &old, name, ed.copy_on_read) {
            Ok(g) => (Some(g), Err(failed(step, error, &old))),
            Err(again) => {
                tracing::error!(export = %name, error = %again, "cannot reopen the overlay after a failed snapshot; the export fails every request");
                (
                    None,
                    Err(failed(
                        step,
                        format!("{error}; reopening {} failed too: {again}", old.display()),
                        &old,
                    )),
                )
            }
        }
    };
    if let Err(e) = cur.disk.close() {
        return reopen_old("closing the current overlay", e.to_string());
    }
    let next = match Generation::open(&ed.engine, overlay, name, ed.copy_on_read) {
        Ok(g) => g,
        Err(e) => return reopen_old("opening the new overlay", e.to_string()),
    };
    let done = Snapshotted {
        name: name.to_string(),
        overlay: overlay.to_path_buf(),
        image: image.to_path_buf(),
        base: old,
    };
    (Some(next), Ok(done))
}
