//! `export-resize`: grow a served overlay without disconnecting its clients.
//!
//! The engine fixes a disk's size, bitmap and dirty marks for as long as it is open, so a served
//! overlay is grown under [`EngineDisk::switch`], the same hold-and-swap a live snapshot uses:
//! new requests are held back (their connections wait, nobody is disconnected or answered with
//! an error), every submitted request is answered, the overlay is flushed (every answered write
//! durable; if that fails, nothing changes and the disk keeps serving), its disk lets go of its
//! locks but stays open, the overlay is grown with the offline `resize` (the crash-safe order of
//! `docs/LIFECYCLE.md`) and opened again, and the export switches to the reopened disk before the
//! held requests flow; then the old disk is closed. If the grow or the reopen fails, the old disk
//! takes its locks back and keeps serving at its old size (it writes nothing past its old end,
//! and its header only as it was, which a grow leaves alone, so grown files are safe under it),
//! once it checked that its files are as it let go of them (or as the grow left them) and that
//! their paths still name them; if not, it is closed without a final commit and the export
//! fails every request. The overlay is unlocked twice meanwhile (the grow and the reopen each
//! take their own lock): see `docs/LIFECYCLE.md` for what a racing process can do. Sizes above the engine's `MAX_VIRTUAL_SIZE` are refused.
//!
//! NBD has no way to tell a connected client that the size changed: connected clients keep the
//! size they negotiated and see the new one when they reconnect. Shrinking a disk under a
//! running guest is refused: stop serving it and use `addcow resize --shrink`. A resize is
//! refused while the export runs a job (a stream holds the open disk); cancel or wait for the
//! job first.

use std::path::PathBuf;

use addcow_engine::format::MAX_VIRTUAL_SIZE;
use addcow_engine::lifecycle::{resize, Ops, ResizeOptions};
use serde::Serialize;

use super::rpc::RpcError;
use crate::backend::disk::{EngineDisk, Generation};

use super::super::runtime::{Host, HostError};

/// What `export-resize` did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportResized {
    /// The export.
    pub name: String,
    /// Its overlay.
    pub overlay: PathBuf,
    /// The size before.
    pub old_size: u64,
    /// The size now.
    pub new_size: u64,
    /// Clients disconnected by the resize: always 0 (a resize keeps every connection).
    pub clients_disconnected: usize,
}

fn refused(class: &str, message: String) -> RpcError {
    RpcError::server(class, message)
}

fn job_running(name: &str, id: &str, status: impl std::fmt::Debug) -> RpcError {
    refused(
        "job-running",
        format!(
            "export {name:?} runs job {id} ({status:?}): cancel it or wait until it ends \
             before resizing"
        ),
    )
}

/// Grows export `name` to `size` bytes (see the module docs). Refused: no such export, one
/// that is not an engine disk, a read-only one, one running a job, a size that is not a
/// multiple of 512, a smaller size.
pub fn resize_export(host: &Host, name: &str, size: u64) -> Result<ExportResized, RpcError> {
    if host.stop.is_set() {
        return Err(refused(
            "shutting-down",
            "the daemon is shutting down".to_string(),
        ));
    }
    let export = host
        .exports
        .get(name)
        .filter(|e| !e.is_deleting())
        .ok_or_else(|| HostError::NoSuchExport(name.to_string()))?;
    let Some(ed) = export.backend.engine_disk() else {
        return Err(refused(
            "not-resizable",
            format!("export {name:?} is not an overlay"),
        ));
    };
    if let Some((id, status)) = host.jobs.active_on(name) {
        return Err(job_running(name, &id, status));
    }
    if let Some(why) = host.backup_refusal(name) {
        return Err(refused("backup-running", why));
    }
    let result = ed.switch(|cur| {
        // Again under the switch (a backup-begin freezes the disk under it).
        if cur.disk.fleece_active() {
            let why = host.backup_refusal(name).unwrap_or_else(|| {
                format!("export {name:?} has a backup starting: end it with backup-end first")
            });
            return (None, Err(refused("backup-running", why)));
        }
        // An export-del that began meanwhile wins: it closes whatever disk is current after us.
        if export.is_deleting() {
            return (None, Err(HostError::NoSuchExport(name.to_string()).into()));
        }
        // Again under the switch: a job-start pins the disk while it registers, so a job that
        // started since the check above is seen here.
        if let Some((id, status)) = host.jobs.active_on(name) {
            return (None, Err(job_running(name, &id, status)));
        }
        grow(ed, cur, name, size)
    });
    if let Ok(r) = &result {
        if r.new_size != r.old_size {
            tracing::info!(export = ?name, old_size = r.old_size, new_size = r.new_size,
                "export resized; clients see the new size when they reconnect");
        }
    }
    result
}

/// Checks the request and grows the overlay, with new requests held and none in flight.
fn grow(
    ed: &EngineDisk,
    cur: &Generation,
    name: &str,
    size: u64,
) -> (Option<Generation>, Result<ExportResized, RpcError>) {
    let disk = &cur.disk;
    let (overlay, old_size) = (disk.path().to_path_buf(), disk.size());
    let done = |new_size| ExportResized {
        name: name.to_string(),
        overlay: overlay.clone(),
        old_size,
        new_size,
        clients_disconnected: 0,
    };
    if disk.read_only() {
        let e = format!("export {name:?} is read-only: it cannot be resized");
        return (None, Err(refused("read-only", e)));
    }
    if size % 512 != 0 {
        let e = format!(
            "export {name:?} ({}): new size {size} is not a multiple of 512",
            overlay.display()
        );
        return (None, Err(refused("invalid-size", e)));
    }
    if size > MAX_VIRTUAL_SIZE {
        let e = format!(
            "new size {size} is too large: an export can be at most {MAX_VIRTUAL_SIZE} bytes \
             (64 TiB)"
        );
        return (None, Err(refused("invalid-size", e)));
    }
    if size < old_size {
        let e = format!(
            "export {name:?} is {old_size} bytes: shrinking a served disk to {size} is refused \
             (stop serving it and run addcow resize --shrink)"
        );
        return (None, Err(refused("shrink-refused", e)));
    }
    if size == old_size {
        return (None, Ok(done(size)));
    }
    // Every answered write durable first: if this fails, the disk keeps serving with its bits in
    // memory (closing now would drop the acknowledged writes whose bits did not reach the disk).
    if let Err(e) = disk.flush() {
        let e = format!("flushing export {name:?} before the resize failed: {e}; nothing changed");
        return (None, Err(refused("resize-failed", e)));
    }
    // The offline grow and the reopen lock the overlay themselves: let go of this disk's locks
    // but keep it open (flushed, nothing submitted to it), so that if either fails (an image
    // server under the chain is down, ...) the export goes on serving it without opening
    // anything again.
    disk.unlock_overlay();
    crate::process::seam::pause("resize-unlocked");
    tracing::info!(export = ?name, old_size, new_size = size, "resizing export");
    let grown = if crate::process::seam::fail("resize-grow") {
        Err(addcow_engine::Error::io(
            "resize (test seam)",
            std::io::Error::from_raw_os_error(libc::EIO),
        ))
    } else {
        resize(
            &ResizeOptions {
                overlay: overlay.clone(),
                size,
                shrink: false,
            },
            &Ops::new(),
        )
    };
    // What the old disk must find when it takes its locks back: the files as it let go of
    // them, or as the grow left them.
    let (failure, left) = match grown {
        Ok(r) => match ed.open_generation(&overlay, name) {
            Ok(next) => {
                // Quiesced, flushed and untouched since: the close commits nothing.
                if let Err(e) = disk.close() {
                    tracing::warn!(export = ?name, error = %e, "closing the disk replaced by a resize");
                }
                return (Some(next), Ok(done(size)));
            }
            // The old disk writes nothing past its old end, and its header only as it was (a
            // grow leaves it alone), so it serves the grown files as they are; a later
            // export-resize to the same size only opens them.
            Err(e) => (
                format!(
                    "{} was grown to {size} bytes but opening it failed: {e}",
                    overlay.display()
                ),
                Some(r.left),
            ),
        },
        // A failed grow leaves the overlay as it was (the offline resize undoes itself).
        Err(e) => (format!("resizing export {name:?} failed: {e}"), None),
    };
    if let Err(again) = disk.relock_overlay(left.as_ref()) {
        // Another process locked, wrote or replaced the overlay meanwhile: this disk's bitmap
        // is stale or its files are not the overlay any more, so it must not write them again,
        // not even a final commit.
        if let Err(c) = disk.abandon() {
            tracing::error!(export = ?name, overlay = ?overlay, error = %c, "closing the disk of a lost overlay");
        }
        tracing::error!(export = ?name, overlay = ?overlay, error = %again, "the overlay was locked, written or replaced by another process during a failed resize; the export no longer writes it and fails every request");
        let msg = format!(
            "{failure}; taking {} back failed: {again}; the overlay is lost to this export: it is \
             not written any more and the export fails every request until it is deleted and \
             added again",
            overlay.display()
        );
        return (None, Err(refused("resize-failed", msg)));
    }
    let msg = format!("{failure}; the export still serves its disk at {old_size} bytes");
    (None, Err(refused("resize-failed", msg)))
}
