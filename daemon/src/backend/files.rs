//! The files an overlay's header names, resolved to real paths: what `export-add`'s folder check
//! ([`crate::host::allow`]) compares and what the hole probe ([`super::probe`]) opens.

use std::path::{Path, PathBuf};

use addcow_engine::format::{Chain, FileRole, LayerFormat};
use addcow_engine::nbd::uri::{NbdAddr, NbdUri};

/// The resolved real paths of an overlay's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayFiles {
    /// The `.add-cow` file.
    pub overlay: PathBuf,
    /// The raw image.
    pub image: PathBuf,
    /// The base, if any and a file.
    pub base: Option<PathBuf>,
    /// The base, when it is an image server (NBD URI).
    pub remote: Option<NbdUri>,
}

impl OverlayFiles {
    /// Resolves `overlay`'s files: the engine's chain walk reads its header and resolves
    /// `image_file` and `backing_file` relative to `overlay`'s folder; every symlink is then
    /// followed.
    pub fn resolve(overlay: &Path) -> Result<OverlayFiles, String> {
        let canon = |p: &Path, role: &str| {
            std::fs::canonicalize(p).map_err(|e| format!("{}: {role}: {e}", p.display()))
        };
        let real = canon(overlay, "overlay")?;
        let files = Chain::files_of(overlay, 0, None).map_err(|e| e.to_string())?;
        let mut image = None;
        let mut base = None;
        let mut remote = None;
        for f in files {
            match (f.depth, f.role) {
                (0, FileRole::Named) if f.format != Some(LayerFormat::AddCow) => {
                    return Err(format!("{}: not an add-cow overlay", overlay.display()));
                }
                (0, FileRole::Data) => image = Some(canon(&f.path, "raw image")?),
                // A remote (NBD) base is no file here: checked as a server (see the module
                // docs of `crate::host::allow`).
                (1, FileRole::Remote(u)) => remote = Some(u),
                (1, FileRole::Named) => base = Some(canon(&f.path, "base")?),
                _ => {}
            }
        }
        let image = image.ok_or_else(|| format!("{}: no raw image", overlay.display()))?;
        Ok(OverlayFiles {
            overlay: real,
            image,
            base,
            remote,
        })
    }

    /// The folders holding the files (and a remote base's Unix socket).
    pub fn folders(&self) -> Vec<PathBuf> {
        let socket = match self.remote.as_ref().map(|u| &u.addr) {
            Some(NbdAddr::Unix(p)) => std::fs::canonicalize(p).ok(),
            _ => None,
        };
        let mut v: Vec<PathBuf> = [
            Some(&self.overlay),
            Some(&self.image),
            self.base.as_ref(),
            socket.as_ref(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
        v.dedup();
        v
    }
}
