//! Which files `export-add` may open: the control socket must not become a way to open arbitrary
//! files with the daemon's (usually root) privileges.
//!
//! An overlay may be added only if the resolved real paths (symlinks followed, `..` removed) of
//! its `.add-cow` file, its raw image and its base all lie under one of the allowed folders
//! (`--allow-dir`, or by default the folders holding the command-line overlays and their raw
//! images and bases). The paths inside the header are resolved the way the engine resolves
//! them: relative to the folder of the `.add-cow` path as given.
//!
//! The check runs twice: before the open (refusing what is outside; what cannot be read yet is
//! left to the open, so its error is the engine's own) and after it (everything must now
//! resolve, and be inside; otherwise the disk is closed again and the add refused). A file
//! swapped between the two checks and back is not caught: that needs write access inside an
//! allowed folder.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use addcow_engine::format::header::{Header, HEADER_SIZE};
use addcow_engine::format::paths;

/// Why a path may not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AllowError {
    /// A file lies outside every allowed folder.
    #[error("{}: the {role} lies outside the folders export-add may open ({dirs}; see --allow-dir)", path.display())]
    Outside {
        /// "overlay", "raw image" or "base".
        role: &'static str,
        /// Its resolved real path.
        path: PathBuf,
        /// The allowed folders, for the message.
        dirs: String,
    },
    /// No folder is allowed at all.
    #[error("export-add is disabled: no --allow-dir was given and no overlay was given on the command line")]
    NoDirs,
    /// The overlay path is relative (the daemon's working folder means nothing to a client).
    #[error("{}: the overlay path must be absolute", .0.display())]
    Relative(PathBuf),
    /// A file could not be resolved after the overlay was opened.
    #[error("{0}")]
    Unresolved(String),
}

/// The resolved real paths of an overlay's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayFiles {
    /// The `.add-cow` file.
    pub overlay: PathBuf,
    /// The raw image.
    pub image: PathBuf,
    /// The base, if any.
    pub base: Option<PathBuf>,
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
        let base = if header.backing_file.is_empty() {
            None
        } else {
            let b = paths::resolve(overlay, "backing_file", &header.backing_file)
                .map_err(|e| format!("{}: {e}", overlay.display()))?;
            Some(canon(&b, "base")?)
        };
        Ok(OverlayFiles {
            overlay: real,
            image,
            base,
        })
    }

    /// The folders holding the files.
    pub fn folders(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = [Some(&self.overlay), Some(&self.image), self.base.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        v.dedup();
        v
    }
}

/// See the module docs.
#[derive(Debug, Clone, Default)]
pub struct AllowedDirs {
    dirs: Vec<PathBuf>,
}

impl AllowedDirs {
    /// The folders `dirs`, resolved to real paths (each must exist and be a folder).
    pub fn new(dirs: &[PathBuf]) -> Result<AllowedDirs, String> {
        let mut out: Vec<PathBuf> = Vec::new();
        for d in dirs {
            let real = std::fs::canonicalize(d)
                .map_err(|e| format!("--allow-dir {}: {e}", d.display()))?;
            if !real.is_dir() {
                return Err(format!("--allow-dir {}: not a folder", d.display()));
            }
            if !out.contains(&real) {
                out.push(real);
            }
        }
        Ok(AllowedDirs { dirs: out })
    }

    /// The default: the folders of `files` (the command-line overlays' files).
    pub fn from_files(files: &[OverlayFiles]) -> AllowedDirs {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for d in files.iter().flat_map(OverlayFiles::folders) {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        AllowedDirs { dirs }
    }

    /// The allowed folders.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn describe(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn inside(&self, role: &'static str, path: &Path) -> Result<(), AllowError> {
        if self.dirs.iter().any(|d| path.starts_with(d)) {
            Ok(())
        } else {
            Err(AllowError::Outside {
                role,
                path: path.to_path_buf(),
                dirs: self.describe(),
            })
        }
    }

    fn check_files(&self, f: &OverlayFiles) -> Result<(), AllowError> {
        self.inside("overlay", &f.overlay)?;
        self.inside("raw image", &f.image)?;
        if let Some(b) = &f.base {
            self.inside("base", b)?;
        }
        Ok(())
    }

    /// Before the open: refuses a relative path, no allowed folder at all, and any file that
    /// resolves outside. Files that cannot be read or resolved yet pass (the open reports them).
    pub fn check_before_open(&self, overlay: &Path) -> Result<(), AllowError> {
        if self.dirs.is_empty() {
            return Err(AllowError::NoDirs);
        }
        if !overlay.is_absolute() {
            return Err(AllowError::Relative(overlay.to_path_buf()));
        }
        if let Ok(real) = std::fs::canonicalize(overlay) {
            self.inside("overlay", &real)?;
        }
        match OverlayFiles::resolve(overlay) {
            Ok(f) => self.check_files(&f),
            Err(_) => Ok(()),
        }
    }

    /// After a successful open: every file must resolve, and lie inside.
    pub fn check_after_open(&self, overlay: &Path) -> Result<(), AllowError> {
        let f = OverlayFiles::resolve(overlay).map_err(AllowError::Unresolved)?;
        self.check_files(&f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay_in(dir: &Path, name: &str, base: &Path) -> PathBuf {
        let overlay = dir.join(format!("{name}.add-cow"));
        addcow_engine::format::create(&addcow_engine::format::CreateOptions {
            overlay: overlay.clone(),
            base: Some(base.to_path_buf()),
            image: None,
            size: Some(1 << 20),
            force: false,
        })
        .unwrap();
        overlay
    }

    #[test]
    fn files_inside_pass_and_every_role_outside_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let (vms, images, other) = (
            t.path().join("vms"),
            t.path().join("img"),
            t.path().join("x"),
        );
        for d in [&vms, &images, &other] {
            std::fs::create_dir(d).unwrap();
        }
        let base = images.join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let ok = overlay_in(&vms, "ok", &base);
        let allow = AllowedDirs::new(&[vms.clone(), images.clone()]).unwrap();
        allow.check_before_open(&ok).unwrap();
        allow.check_after_open(&ok).unwrap();

        // The overlay itself outside.
        let out = overlay_in(&other, "out", &base);
        let e = allow.check_before_open(&out).unwrap_err();
        assert!(
            matches!(
                e,
                AllowError::Outside {
                    role: "overlay",
                    ..
                }
            ),
            "{e}"
        );
        // Inside, but its base is not.
        let other_base = other.join("b.raw");
        std::fs::write(&other_base, vec![0u8; 1 << 20]).unwrap();
        let bad_base = overlay_in(&vms, "badbase", &other_base);
        let e = allow.check_before_open(&bad_base).unwrap_err();
        assert!(matches!(e, AllowError::Outside { role: "base", .. }), "{e}");
        assert!(e.to_string().contains("--allow-dir"), "{e}");
        // A symlink inside that points outside is judged by where it points.
        let link = vms.join("link.add-cow");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        let e = allow.check_before_open(&link).unwrap_err();
        assert!(
            matches!(
                e,
                AllowError::Outside {
                    role: "overlay",
                    ..
                }
            ),
            "{e}"
        );
        // `..` does not escape.
        let dotdot = vms.join("../x/out.add-cow");
        assert!(allow.check_before_open(&dotdot).is_err());
        // Missing files pass the first check (the engine reports them) but not the second.
        let missing = vms.join("missing.add-cow");
        allow.check_before_open(&missing).unwrap();
        assert!(allow.check_after_open(&missing).is_err());
        // Relative paths and an empty list are refused.
        assert!(matches!(
            allow.check_before_open(Path::new("ok.add-cow")),
            Err(AllowError::Relative(_))
        ));
        assert!(matches!(
            AllowedDirs::default().check_before_open(&ok),
            Err(AllowError::NoDirs)
        ));
        // The default allows the folders of the command-line overlays' files.
        let d = AllowedDirs::from_files(&[OverlayFiles::resolve(&ok).unwrap()]);
        assert_eq!(
            d.dirs(),
            &[vms.canonicalize().unwrap(), images.canonicalize().unwrap()]
        );
    }
}
