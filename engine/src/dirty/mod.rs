//! Changed-block tracking: named dirty bitmaps per overlay, the persistent ones kept in a
//! sidecar file next to the `.add-cow` (`X.add-cow.bitmaps`; the add-cow format itself is
//! unchanged). A leaf: the engine's write path asks it before a write's data may go
//! ([`DirtySet::admit`]), the daemon and the tools change and read bitmaps through it.
//!
//! * `sidecar`: the file's layout, parser and writer (pure, fuzzed).
//! * `words`: granule bit arrays.
//! * `set`: [`DirtySet`], its crash rule, clear rule and flusher thread.

mod set;
pub mod sidecar;
mod words;

pub use set::{
    sidecar_path, BitmapInfo, DirtyExtent, DirtySet, DirtySource, FrozenBitmap, Gate, Inflight,
    Log, LogEvent, Resume, Ticket, Untracked, DEFAULT_GRANULARITY,
};

/// The bitmaps of an overlay that no process serves, for the offline tools: holds the
/// overlay's locks (shared when read-only, exclusive otherwise) as long as it lives.
pub struct Offline {
    _overlay: crate::format::Overlay,
    /// The overlay's bitmaps.
    pub set: std::sync::Arc<DirtySet>,
}

/// Opens the overlay at `path` (locking it; its base chain is not opened) and its bitmaps.
pub fn open_offline(path: &std::path::Path, read_only: bool) -> crate::Result<Offline> {
    let overlay = crate::format::Overlay::open(
        path,
        &crate::format::OpenOptions {
            read_only,
            skip_base: true,
            ..crate::format::OpenOptions::default()
        },
    )?;
    let set = DirtySet::open(&overlay.meta_path, overlay.virtual_size, read_only, None)?;
    Ok(Offline {
        _overlay: overlay,
        set,
    })
}

/// Deletes the dirty-bitmaps sidecar of the overlay at `path` (and a temporary one a crash left),
/// every bitmap with it, durably (the folder is synced): the way out when the sidecar cannot be
/// opened (corrupt, or too large for this build's limits). Takes the overlay's exclusive lock,
/// so not while it is served. The next backup of the disk must then be a full one. Returns
/// whether a sidecar was there.
pub fn drop_offline(path: &std::path::Path) -> crate::Result<bool> {
    let overlay = crate::format::Overlay::open(
        path,
        &crate::format::OpenOptions {
            read_only: false,
            skip_base: true,
            ..crate::format::OpenOptions::default()
        },
    )?;
    let side = sidecar_path(&overlay.meta_path);
    let mut tmp = side.clone().into_os_string();
    tmp.push(".tmp");
    let mut was = false;
    for p in [side.clone(), std::path::PathBuf::from(tmp)] {
        match std::fs::remove_file(&p) {
            Ok(()) => was |= p == side,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::Error::io("remove bitmaps sidecar", e).with_path(&p)),
        }
    }
    let dir = side.parent().unwrap_or(std::path::Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| crate::Error::io("fsync the folder of", e).with_path(&side))?;
    drop(overlay);
    Ok(was)
}

#[cfg(test)]
mod tests {
    /// A corrupt sidecar keeps the overlay's bitmaps from opening; dropping it recovers.
    #[test]
    fn drop_offline_removes_a_corrupt_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = dir.path().join("x.add-cow");
        crate::format::create(&crate::format::CreateOptions {
            overlay: overlay.clone(),
            size: Some(1 << 20),
            ..Default::default()
        })
        .unwrap();
        {
            let off = super::open_offline(&overlay, false).unwrap();
            off.set.add("b", 65536, true, true).unwrap();
        }
        let side = super::sidecar_path(&overlay);
        std::fs::write(&side, b"not a sidecar at all").unwrap();
        assert!(super::open_offline(&overlay, true).is_err());
        assert!(super::drop_offline(&overlay).unwrap());
        assert!(!side.exists());
        let off = super::open_offline(&overlay, true).unwrap();
        assert!(off.set.list().is_empty());
        drop(off);
        assert!(
            !super::drop_offline(&overlay).unwrap(),
            "nothing left to drop"
        );
    }
}
