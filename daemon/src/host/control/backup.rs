//! `backup-begin` / `backup-end`: pull-mode backup of a live export through a read-only export
//! of its point-in-time view (copy-before-write into a scratch file: the engine's
//! [`addcow_engine::FleeceView`]).
//!
//! `backup-begin {export, checkpoint, incremental?, target?, scratch?}`:
//! 1. checks the names and the scratch path (absolute, in an allowed folder, not an existing
//!    non-regular file; default `<overlay>.backup-scratch` next to the overlay);
//! 2. under [`crate::backend::disk::EngineDisk::switch`] (the export's new requests held back,
//!    every submitted one answered: the instant is well defined) begins the view;
//! 3. publishes the read-only export `target` (default `<export>-backup`) serving the view.
//!
//! The guest keeps writing to `export` meanwhile. `backup-end {export}` ends the backup: the
//! view's export leaves the table (its clients' readers stop, what they sent is answered, they
//! disconnect), the view ends and its scratch is removed; the export's writes copy nothing
//! any more. While a backup runs, `export-del`, `export-snapshot` and `export-resize` of either
//! export are refused (`backup-running`).
//!
//! Checkpoints: at the same held instant the view begins, `Disk::checkpoint` adds the enabled
//! persistent bitmap `checkpoint` (it records every write after the instant) and, with
//! `incremental: P`, freezes what bitmap P recorded up to the instant (P together with every
//! later bitmap if P was disabled by an earlier backup) and disables P; the view's export then
//! also serves that frozen copy as `qemu:dirty-bitmap:P`. `backup-end` changes no bitmap,
//! whether or not the client copied everything: a failed backup is retried from P (or from any
//! older checkpoint) and still misses nothing. The rules are in docs/BACKUP.md ("Checkpoints
//! and incremental backups").

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::super::runtime::Host;
use super::rpc::{params, RpcError, INVALID_PARAMS};
use crate::backend::dirty::WithBitmaps;
use crate::backend::disk::Backend;
use crate::backend::fleece::{BackupInfo, FleeceBackend};
use crate::nbd::export::Export;
use crate::nbd::wire;
use addcow_engine::dirty::DirtySource;

/// `backup-begin`'s parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupBegin {
    /// The live export to back up.
    export: String,
    /// The name this backup's checkpoint takes.
    checkpoint: String,
    /// The checkpoint it is incremental to.
    #[serde(default)]
    incremental: Option<String>,
    /// The name of the point-in-time export (default `<export>-backup`).
    #[serde(default)]
    target: Option<String>,
    /// The scratch file (default: `<overlay>.backup-scratch`).
    #[serde(default)]
    scratch: Option<PathBuf>,
    /// Bytes per bit of the checkpoint's bitmap (default 64 KiB; a number or `64K`, `1M`).
    #[serde(default)]
    granularity: Option<Value>,
}

/// `backup-end`'s parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupEnd {
    /// The live export whose backup ends.
    export: String,
}

fn invalid(msg: String) -> RpcError {
    RpcError::new(INVALID_PARAMS, format!("invalid params: {msg}"))
}

fn refused(class: &str, msg: String) -> RpcError {
    RpcError::server(class, msg)
}

/// A checkpoint name: 1 to 1023 bytes (a QEMU bitmap name's limit), no NUL, no control
/// character.
fn check_checkpoint(what: &str, name: &str) -> Result<(), RpcError> {
    if name.is_empty() || name.len() > 1023 || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} {name:?}: 1 to 1023 bytes, no control characters"
        )));
    }
    Ok(())
}

/// The point-in-time export's name: `target`, or `<export>-backup`.
fn target_name(b: &BackupBegin) -> Result<String, RpcError> {
    let t = b
        .target
        .clone()
        .unwrap_or_else(|| format!("{}-backup", b.export));
    if t.len() > wire::MAX_STRING || t.contains('\0') || t.is_empty() {
        return Err(invalid(format!(
            "target {t:?}: an export name of 1 to {} bytes, no NUL",
            wire::MAX_STRING
        )));
    }
    Ok(t)
}

/// The default scratch: next to the overlay, named after it.
fn default_scratch(overlay: &Path) -> PathBuf {
    let mut name = overlay.file_name().unwrap_or_default().to_os_string();
    name.push(".backup-scratch");
    overlay.with_file_name(name)
}

/// The scratch must be absolute, in a folder the control socket may create files in, and, if
/// it exists, a regular file that is no export's (the engine also refuses its own disk's).
fn check_scratch(host: &Host, scratch: &Path) -> Result<(), RpcError> {
    if !scratch.is_absolute() {
        return Err(invalid(format!(
            "scratch {}: the path must be absolute",
            scratch.display()
        )));
    }
    let dirs = host.allowed.dirs();
    let parent = scratch.parent().and_then(|p| std::fs::canonicalize(p).ok());
    if !parent.is_some_and(|real| dirs.iter().any(|d| real.starts_with(d))) {
        let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(refused(
            "not-allowed",
            format!(
                "{}: the scratch's folder is not one the control socket may create files in \
                 ({}; see --allow-dir)",
                scratch.display(),
                list.join(", ")
            ),
        ));
    }
    {
        use std::os::unix::ffi::OsStrExt;
        let name = scratch
            .file_name()
            .map(|n| n.as_bytes())
            .unwrap_or_default();
        if name.ends_with(b".bitmaps") || name.ends_with(b".bitmaps.tmp") {
            return Err(refused(
                "not-allowed",
                format!(
                    "{}: is named like an overlay's dirty-bitmaps sidecar (*.bitmaps, \
                     *.bitmaps.tmp), not a scratch",
                    scratch.display()
                ),
            ));
        }
    }
    if let Ok(meta) = scratch.symlink_metadata() {
        use std::os::unix::fs::MetadataExt;
        // Another backup's scratch (in use) or an export's sidecar.
        for e in host.exports.all() {
            let mut theirs = Vec::new();
            if let Some(b) = host.backups.of(&e.name) {
                theirs.push(("the scratch of the backup of", b.info.scratch.clone()));
            }
            if let Some(ed) = e.backend.engine_disk() {
                let side = ed.pinned(|d| d.bitmaps().path().to_path_buf());
                theirs.push(("the dirty-bitmaps sidecar of", side));
            }
            for (what, p) in theirs {
                if std::fs::metadata(&p)
                    .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
                {
                    return Err(refused(
                        "not-allowed",
                        format!("{}: is {what} export {:?}", scratch.display(), e.name),
                    ));
                }
            }
        }
        if !meta.file_type().is_file() {
            return Err(refused(
                "not-allowed",
                format!("{}: exists and is not a regular file", scratch.display()),
            ));
        }
        let id = (meta.dev(), meta.ino());
        for e in host.exports.all() {
            let Some(disk) = e.backend.disk() else {
                continue;
            };
            for f in disk.opened_files() {
                let same = f
                    .fd
                    .and_then(|fd| nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd)).ok())
                    .is_some_and(|st| (st.st_dev, st.st_ino) == id);
                if same {
                    return Err(refused(
                        "not-allowed",
                        format!(
                            "{}: is a file of export {:?}, not a scratch",
                            scratch.display(),
                            e.name
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks, before anything starts, that checkpoint `b.checkpoint` can be added to `disk`'s
/// bitmaps and that `b.incremental` names one of them (the checkpoint itself re-checks under
/// the held writes).
fn check_checkpoints(disk: &addcow_engine::Disk, b: &BackupBegin) -> Result<(), RpcError> {
    let set = disk.bitmaps();
    if set.contains(&b.checkpoint) {
        return Err(refused(
            "checkpoint-exists",
            format!(
                "backup-begin of {:?}: a bitmap named {:?} exists already (each checkpoint takes \
                 a new name; a retry of a failed backup takes a new one too)",
                b.export, b.checkpoint
            ),
        ));
    }
    if let Some(prev) = &b.incremental {
        if !set.contains(prev) {
            return Err(refused(
                "no-such-checkpoint",
                format!(
                    "backup-begin of {:?}: incremental {prev:?}: no bitmap of that name (take a \
                     full backup: leave out incremental)",
                    b.export
                ),
            ));
        }
    }
    Ok(())
}

/// `backup-begin` (see the module docs).
pub fn backup_begin(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let b: BackupBegin = params(p)?;
    check_checkpoint("checkpoint", &b.checkpoint)?;
    if let Some(prev) = &b.incremental {
        check_checkpoint("incremental", prev)?;
        if prev == &b.checkpoint {
            return Err(invalid(format!(
                "incremental {prev:?} is the checkpoint being taken"
            )));
        }
    }
    let target = target_name(&b)?;
    if host.stop.is_set() {
        return Err(refused(
            "shutting-down",
            "the daemon is shutting down".into(),
        ));
    }
    let name = &b.export;
    let export = host
        .exports
        .find(name)
        .ok_or_else(|| refused("no-such-export", format!("no export named {name:?}")))?;
    if host.backups.serving(name).is_some() {
        return Err(refused(
            "read-only",
            format!("export {name:?} is a backup's point-in-time view: it is not backed up"),
        ));
    }
    let Some(ed) = export.backend.engine_disk() else {
        return Err(refused(
            "unsupported",
            format!("export {name:?} is not an overlay"),
        ));
    };
    if export.backend.read_only() {
        return Err(refused(
            "read-only",
            format!(
                "export {name:?} is read-only: it does not change, so back it up directly \
                 (no point-in-time view is needed)"
            ),
        ));
    }
    if let Some(b) = host.backups.of(name) {
        return Err(refused(
            "backup-running",
            format!(
                "export {name:?} has a backup running already (checkpoint {:?}, served as {:?})",
                b.info.checkpoint, b.info.target
            ),
        ));
    }
    ed.pinned(|d| check_checkpoints(d, &b))?;
    let granularity = super::bitmaps::granularity(&b.granularity)?;
    let overlay = ed.pinned(|d| d.path().to_path_buf());
    let scratch = b
        .scratch
        .clone()
        .unwrap_or_else(|| default_scratch(&overlay));
    check_scratch(host, &scratch)?;
    let claim = host.exports.claim(&target).ok_or_else(|| {
        refused(
            "name-taken",
            format!("export name {target:?} is already in use (give another target)"),
        )
    })?;
    let view = ed.switch(|cur| {
        // An export-del that began meanwhile wins.
        if export.is_deleting() {
            return (None, Err(format!("export {name:?} is being deleted")));
        }
        // Writes answered before this instant may have their overlay bits only in memory: a
        // crash would give those sectors back their older bytes, which the new checkpoint
        // (clean there) would then never report. One commit makes the instant durable first.
        if let Err(e) = cur.disk.flush() {
            return (None, Err(format!("flushing the overlay: {e}")));
        }
        let view = match cur.disk.begin_fleece(&scratch) {
            Ok(v) => v,
            Err(e) => return (None, Err(e.to_string())),
        };
        // The same instant: no write in flight, none admitted until this returns.
        match cur
            .disk
            .checkpoint(&b.checkpoint, granularity, b.incremental.as_deref())
        {
            Ok(frozen) => (None, Ok((view, frozen))),
            Err(e) => (None, Err(format!("checkpoint {:?}: {e}", b.checkpoint))),
        }
    });
    let (view, frozen) =
        view.map_err(|e| refused("backup-failed", format!("backup-begin of {name:?}: {e}")))?;
    // The file made, not its path: a folder swapped since the check put it elsewhere.
    if let Err(e) = host
        .allowed
        .check_fd("backup scratch", &scratch, view.scratch_fd())
    {
        drop(view);
        return Err(refused("not-allowed", e.to_string()));
    }
    let info = BackupInfo {
        export: name.clone(),
        target: target.clone(),
        checkpoint: b.checkpoint.clone(),
        incremental: b.incremental.clone(),
        scratch: scratch.clone(),
    };
    let backend = Arc::new(FleeceBackend::new(view, ed.engine.clone(), info.clone()));
    if !host.backups.insert(Arc::clone(&backend)) {
        backend.end();
        return Err(refused(
            "backup-running",
            format!("export {name:?} has a backup running already"),
        ));
    }
    let shards = ed.engine.cores();
    let served: Arc<dyn Backend> = match frozen {
        Some(f) => {
            let src: Arc<dyn DirtySource> = Arc::new(f);
            let prev = b.incremental.clone().unwrap_or_default();
            match WithBitmaps::new(backend.clone(), vec![(prev, src)]) {
                Ok(w) => Arc::new(w),
                Err(e) => {
                    host.backups.remove(name);
                    backend.end();
                    return Err(refused(
                        "backup-failed",
                        format!("backup-begin of {name:?}: {e}"),
                    ));
                }
            }
        }
        None => backend,
    };
    let export = Export::new(claim.name(), served, shards);
    claim.publish(export);
    tracing::info!(export = %name, target = %target, checkpoint = %b.checkpoint,
        scratch = %scratch.display(), "backup begun: point-in-time view exported");
    Ok(serde_json::to_value(&info).unwrap_or_default())
}

/// `backup-end` (see the module docs).
pub fn backup_end(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let e: BackupEnd = params(p)?;
    let name = &e.export;
    let Some(b) = host.backups.of(name) else {
        let why = match host.exports.get(name) {
            None => format!("no export named {name:?}"),
            Some(_) => format!("export {name:?} has no backup running"),
        };
        return Err(refused("no-backup", why));
    };
    let mut clients = 0;
    if let Some(view) = host.exports.get(&b.info.target) {
        // Its clients stop being read, what they sent is answered, then they are disconnected.
        clients = view.begin_delete(false).unwrap_or(0);
        let grace = Instant::now() + host.config().shutdown_grace;
        if !view.wait_clients_gone(Some(grace)) {
            view.close_clients();
            view.wait_clients_gone(None);
        }
        host.exports.remove(&view);
    }
    host.backups.remove(name);
    let stats = b.end().transpose().map_err(|e| {
        refused(
            "backup-failed",
            format!("backup-end of {name:?}: the backup ended, but {e}"),
        )
    })?;
    tracing::info!(export = %name, target = %b.info.target, "backup ended");
    let mut out = serde_json::to_value(&b.info).unwrap_or_default();
    out["clients_disconnected"] = json!(clients);
    if let Some(s) = stats {
        out["bytes_copied"] = json!(s.bytes_copied);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(
            default_scratch(Path::new("/v/vm.add-cow")),
            PathBuf::from("/v/vm.add-cow.backup-scratch")
        );
        assert!(check_checkpoint("checkpoint", "c1").is_ok());
        assert!(check_checkpoint("checkpoint", "").is_err());
        assert!(check_checkpoint("checkpoint", "a\nb").is_err());
        assert!(check_checkpoint("checkpoint", &"x".repeat(1024)).is_err());
        let b = |target: Option<&str>| BackupBegin {
            export: "vm".into(),
            checkpoint: "c".into(),
            incremental: None,
            target: target.map(str::to_string),
            scratch: None,
            granularity: None,
        };
        assert_eq!(target_name(&b(None)).unwrap(), "vm-backup");
        assert_eq!(target_name(&b(Some("t"))).unwrap(), "t");
        assert!(target_name(&b(Some(""))).is_err());
    }
}
