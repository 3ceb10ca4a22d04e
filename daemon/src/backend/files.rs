//! The files an overlay's header names, resolved to real paths: what `export-add`'s folder check
//! ([`crate::host::allow`]) compares and what the hole probe ([`super::probe`]) opens.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use addcow_engine::format::header::{Header, HEADER_SIZE};
use addcow_engine::format::paths;
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
    /// Resolves `overlay`'s files: reads its header, resolves `image_file` and `backing_file`
    /// relative to `overlay`'s folder (as the engine does) and follows every symlink.
    pub fn resolve(overlay: &Path) -> Result<OverlayFiles, String> {
        let canon = |p: &Path, role: &str| {
            std::fs::canonicalize(p).map_err(|e| format!("{}: {role}: {e}", p.display()))
        };
        let real = canon(overlay, "overlay")?;
        let f = std::fs::File::open(overlay)
            .map_err(|e| format!("{}: open overlay: {e}", overlay.display()))?;
        let mut buf = vec![0u8; HEADER_SIZE];
        f.read_exact_at(&mut buf, 0)
            .map_err(|e| format!("{}: read header: {e}", overlay.display()))?;
        let header = Header::parse(&buf).map_err(|e| format!("{}: {e}", overlay.display()))?;
        let image = paths::resolve(overlay, "image_file", &header.image_file)
            .map_err(|e| format!("{}: {e}", overlay.display()))?;
        let image = canon(&image, "raw image")?;
        let mut remote = None;
        let base = if header.backing_file.is_empty() {
            None
        } else {
            let b = paths::resolve(overlay, "backing_file", &header.backing_file)
                .map_err(|e| format!("{}: {e}", overlay.display()))?;
            // A remote (NBD) base is no file here: checked as a server (see the module docs).
            match paths::nbd_uri(&b).map_err(|e| format!("{}: {e}", overlay.display()))? {
                Some(u) => {
                    remote = Some(u);
                    None
                }
                None => Some(canon(&b, "base")?),
            }
        };
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
