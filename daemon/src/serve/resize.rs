//! `export-resize`: grow a served overlay.
//!
//! The engine cannot change a disk's size while it is open (its bitmap, dirty marks and size are
//! fixed for the life of the disk), so a served overlay is grown the way a restart works: the
//! export is taken down hard (its clients' readers stop taking requests, what is in flight is
//! answered, the overlay is committed and unlocked; the connections close), the overlay is grown
//! with the offline `resize` (the crash-safe order of `docs/LIFECYCLE.md`), and it is opened and
//! published again under the same name. NBD has no way to tell a connected client that the size
//! changed, so clients see the new size when they reconnect (QEMU with `reconnect-delay` does so
//! by itself). Shrinking a disk under a running guest is refused: stop serving it and use
//! `addcow resize --shrink`.

use std::path::PathBuf;

use addcow_engine::lifecycle::{resize, Ops, ResizeOptions};
use serde::Serialize;

use super::control::rpc::RpcError;
use super::host::{DeleteMode, Host, HostError, Origin};

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
    /// Clients that were connected and had to reconnect.
    pub clients_disconnected: usize,
}

fn refused(class: &str, message: String) -> RpcError {
    RpcError::server(class, message)
}

/// Grows export `name` to `size` bytes (see the module docs). Refused: no such export, a
/// read-only one, a size that is not a multiple of 512, a smaller size.
pub fn resize_export(host: &Host, name: &str, size: u64) -> Result<ExportResized, RpcError> {
    let export = host
        .exports
        .get(name)
        .ok_or_else(|| HostError::NoSuchExport(name.to_string()))?;
    let Some(disk) = export.backend.disk() else {
        return Err(refused(
            "not-resizable",
            format!("export {name:?} is not an overlay"),
        ));
    };
    let (overlay, old_size, read_only) = (disk.path().to_path_buf(), disk.size(), disk.read_only());
    drop(export);
    if read_only {
        return Err(refused(
            "read-only",
            format!("export {name:?} is read-only: it cannot be resized"),
        ));
    }
    if size % 512 != 0 {
        return Err(refused(
            "invalid-size",
            format!("new size {size} is not a multiple of 512"),
        ));
    }
    if size < old_size {
        return Err(refused(
            "shrink-refused",
            format!(
                "export {name:?} is {old_size} bytes: shrinking a served disk to {size} is refused \
                 (stop serving it and run addcow resize --shrink)"
            ),
        ));
    }
    if size == old_size {
        return Ok(ExportResized {
            name: name.to_string(),
            overlay,
            old_size,
            new_size: size,
            clients_disconnected: 0,
        });
    }
    let deleted = host.delete_export(name, DeleteMode::Hard)?;
    tracing::info!(export = %name, old_size, new_size = size, "resizing export");
    let grown = resize(
        &ResizeOptions {
            overlay: overlay.clone(),
            size,
            shrink: false,
        },
        &Ops::new(),
    );
    // Serve it again whatever happened: a failed grow leaves the old size (crash-safe order).
    let readd = host.add_export(name, &overlay, false, Origin::CommandLine);
    if let Err(e) = grown {
        return Err(refused(
            "resize-failed",
            format!(
                "resizing export {name:?} failed: {e}{}",
                match &readd {
                    Ok(_) => " (served again at its old size)".to_string(),
                    Err(r) => format!("; serving it again failed too: {r}"),
                }
            ),
        ));
    }
    readd?;
    Ok(ExportResized {
        name: name.to_string(),
        overlay,
        old_size,
        new_size: size,
        clients_disconnected: deleted.clients_disconnected,
    })
}
