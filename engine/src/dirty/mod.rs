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
