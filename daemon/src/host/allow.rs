//! Which files `export-add` may open: the control socket must not become a way to open arbitrary
//! files with the daemon's (usually root) privileges.
//!
//! An overlay may be added only if the resolved real paths (symlinks followed, `..` removed) of
//! its `.add-cow` file, its raw image and its base all lie under one of the allowed folders
//! (`--allow-dir`, or by default the folders holding the command-line overlays and their raw
//! images and bases). The paths inside the header are resolved the way the engine resolves
//! them: relative to the folder of the `.add-cow` path as given. When the base is itself an
//! add-cow overlay (a backing chain), every file of every layer under it must lie inside too;
//! each layer is checked before it is opened to read the next one's name.
//!
//! A remote (NBD) base of any layer is no file, but it is still something the daemon connects
//! to with its privileges: an `nbd+unix` base's socket must lie inside too (its folder resolved,
//! the socket's name kept), and an `nbd://` (TCP) base is refused unless the daemon was started
//! with `--allow-remote-bases`.
//!
//! The check runs twice: before the open (refusing what is outside; what cannot be read yet is
//! left to the open, so its error is the engine's own) and after it (everything must now
//! resolve, and be inside; otherwise the disk is closed again and the add refused). A file
//! swapped between the two checks and back is not caught: that needs write access inside an
//! allowed folder.

use std::path::{Path, PathBuf};

use addcow_engine::format::{Chain, ChainFile, FileRole, MAX_CHAIN_DEPTH};
use addcow_engine::nbd::uri::{NbdAddr, NbdUri};

use crate::backend::files::OverlayFiles;

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
    /// A vhost-user-blk socket path is relative.
    #[error("{}: the vhost-user-blk socket path must be absolute", .0.display())]
    RelativeSocket(PathBuf),
    /// A TCP (`nbd://`) base, and the daemon was not started with `--allow-remote-bases`.
    #[error("{0}: export-add may not use a TCP image server as a base unless the daemon runs with --allow-remote-bases")]
    RemoteBase(String),
    /// A file could not be resolved after the overlay was opened.
    #[error("{0}")]
    Unresolved(String),
}

/// See the module docs.
#[derive(Debug, Clone, Default)]
pub struct AllowedDirs {
    dirs: Vec<PathBuf>,
    /// `--allow-remote-bases`: TCP image servers may be bases.
    remote_bases: bool,
}

impl AllowedDirs {
    /// The folders `dirs` (`--allow-dir`), resolved to real paths (each must exist and be a
    /// folder).
    pub fn new(dirs: &[PathBuf]) -> crate::error::Result<AllowedDirs> {
        use crate::error::Error;
        let mut out: Vec<PathBuf> = Vec::new();
        for d in dirs {
            let bad = || {
                Error::new(crate::error::ErrorKind::InvalidArgument)
                    .with_flag("--allow-dir")
                    .with_value(d.display().to_string())
            };
            let real = std::fs::canonicalize(d).map_err(|e| bad().with_source(e))?;
            if !real.is_dir() {
                return Err(bad().with_context("not a folder"));
            }
            if !out.contains(&real) {
                out.push(real);
            }
        }
        Ok(AllowedDirs {
            dirs: out,
            remote_bases: false,
        })
    }

    /// The default: the folders of `files` (the command-line overlays' files).
    pub fn from_files(files: &[OverlayFiles]) -> AllowedDirs {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for d in files.iter().flat_map(OverlayFiles::folders) {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        AllowedDirs {
            dirs,
            remote_bases: false,
        }
    }

    /// Lets TCP image servers be bases (`--allow-remote-bases`).
    pub fn with_remote_bases(mut self, allow: bool) -> AllowedDirs {
        self.remote_bases = allow;
        self
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

    /// A remote base: its Unix socket must lie inside (the socket's folder resolved, so a
    /// socket not there yet is judged by where it would be); TCP needs `--allow-remote-bases`.
    fn check_remote(&self, role: &'static str, uri: &NbdUri) -> Result<(), AllowError> {
        match &uri.addr {
            NbdAddr::Unix(sock) => {
                if !sock.is_absolute() {
                    return Err(AllowError::Outside {
                        role,
                        path: sock.clone(),
                        dirs: self.describe(),
                    });
                }
                let real = match std::fs::canonicalize(sock) {
                    Ok(r) => r,
                    Err(_) => {
                        let folder = sock.parent().unwrap_or(Path::new("/"));
                        let f = std::fs::canonicalize(folder).map_err(|e| {
                            AllowError::Unresolved(format!("{}: {e}", folder.display()))
                        })?;
                        match sock.file_name() {
                            Some(n) => f.join(n),
                            None => f,
                        }
                    }
                };
                self.inside(role, &real)
            }
            NbdAddr::Tcp { .. } if self.remote_bases => Ok(()),
            NbdAddr::Tcp { .. } => Err(AllowError::RemoteBase(uri.text.clone())),
        }
    }

    /// One file of the chain, as the engine's walk names it: it must lie inside (a remote
    /// layer: see [`AllowedDirs::check_remote`]). `strict`: it must resolve; otherwise a file
    /// that cannot be resolved yet passes (the open reports it).
    fn check_file(&self, f: &ChainFile, strict: bool) -> Result<(), AllowError> {
        let role = match (&f.role, f.depth) {
            (FileRole::Remote(u), 0 | 1) => return self.check_remote("remote base's socket", u),
            (FileRole::Remote(u), _) => {
                return self.check_remote("remote base's socket of a base layer", u)
            }
            (FileRole::Named, 0) => "overlay",
            (FileRole::Data, 0) => "raw image",
            (FileRole::Named, 1) => "base",
            (FileRole::Named, _) => "base of a base layer",
            (FileRole::Data, _) => "raw image of a base layer",
        };
        match std::fs::canonicalize(&f.path) {
            Ok(real) => self.inside(role, &real),
            Err(e) if strict => Err(AllowError::Unresolved(format!(
                "{}: {role}: {e}",
                f.path.display()
            ))),
            Err(_) => Ok(()),
        }
    }

    /// Walks the chain under `overlay` with the engine's opener (names only: no bitmap, lock
    /// or connection), each file checked before it is opened to read the next one's name.
    /// `strict`: the walk must succeed; otherwise what cannot be read is left to the open.
    /// Stops after the engine's depth limit (the open refuses deeper chains and loops itself).
    fn check_chain(&self, overlay: &Path, strict: bool) -> Result<(), AllowError> {
        let refused = std::cell::RefCell::new(None);
        let gate = |f: &ChainFile| match self.check_file(f, strict) {
            Ok(()) => Ok(()),
            Err(e) => {
                *refused.borrow_mut() = Some(e);
                Err(addcow_engine::Error::new(
                    addcow_engine::ErrorKind::InvalidArgument("outside the allowed folders".into()),
                ))
            }
        };
        let walked = Chain::files_of(overlay, MAX_CHAIN_DEPTH, Some(&gate));
        if let Some(e) = refused.into_inner() {
            return Err(e);
        }
        match walked {
            Ok(_) => Ok(()),
            Err(e) if strict => Err(AllowError::Unresolved(e.to_string())),
            Err(_) => Ok(()),
        }
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
        self.check_chain(overlay, false)
    }

    /// A socket `export-add` is to create: its path must be absolute and its folder (which must
    /// exist) must lie inside.
    pub fn check_socket(&self, socket: &Path) -> Result<(), AllowError> {
        if self.dirs.is_empty() {
            return Err(AllowError::NoDirs);
        }
        if !socket.is_absolute() {
            return Err(AllowError::RelativeSocket(socket.to_path_buf()));
        }
        let folder = socket.parent().unwrap_or(Path::new("/"));
        let real = std::fs::canonicalize(folder)
            .map_err(|e| AllowError::Unresolved(format!("{}: {e}", folder.display())))?;
        self.inside("vhost-user-blk socket's folder", &real)
    }

    /// After a successful open: every file must resolve, and lie inside.
    pub fn check_after_open(&self, overlay: &Path) -> Result<(), AllowError> {
        self.check_chain(overlay, true)
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
    fn every_layer_of_a_backing_chain_must_be_inside() {
        let t = tempfile::tempdir().unwrap();
        let (vms, other) = (t.path().join("vms"), t.path().join("x"));
        std::fs::create_dir(&vms).unwrap();
        std::fs::create_dir(&other).unwrap();
        // vms/top -> vms/mid -> x/bottom.raw: the top's base is inside, the layer under it not.
        let bottom = other.join("bottom.raw");
        std::fs::write(&bottom, vec![0u8; 1 << 20]).unwrap();
        let mid = overlay_in(&vms, "mid", &bottom);
        let top = overlay_in(&vms, "top", &mid);
        let allow = AllowedDirs::new(std::slice::from_ref(&vms)).unwrap();
        let e = allow.check_before_open(&top).unwrap_err();
        assert!(
            matches!(
                e,
                AllowError::Outside {
                    role: "base of a base layer",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("bottom.raw"), "{e}");
        // A middle layer whose raw image is outside.
        let mid2 = vms.join("mid2.add-cow");
        addcow_engine::format::create(&addcow_engine::format::CreateOptions {
            overlay: mid2.clone(),
            image: Some(other.join("mid2.raw")),
            size: Some(1 << 20),
            ..Default::default()
        })
        .unwrap();
        let top2 = overlay_in(&vms, "top2", &mid2);
        let e = allow.check_after_open(&top2).unwrap_err();
        assert!(
            matches!(
                e,
                AllowError::Outside {
                    role: "raw image of a base layer",
                    ..
                }
            ),
            "{e}"
        );
        // All inside: accepted.
        let inside = AllowedDirs::new(&[vms.clone(), other.clone()]).unwrap();
        inside.check_before_open(&top).unwrap();
        inside.check_after_open(&top2).unwrap();
    }

    #[test]
    fn remote_bases_need_their_socket_inside_and_tcp_needs_the_flag() {
        let t = tempfile::tempdir().unwrap();
        let (vms, run) = (t.path().join("vms"), t.path().join("run"));
        std::fs::create_dir(&vms).unwrap();
        std::fs::create_dir(&run).unwrap();
        let remote = |name: &str, uri: &str| {
            let overlay = vms.join(format!("{name}.add-cow"));
            addcow_engine::format::create(&addcow_engine::format::CreateOptions {
                overlay: overlay.clone(),
                base: Some(PathBuf::from(uri)),
                size: Some(1 << 20),
                ..Default::default()
            })
            .unwrap();
            overlay
        };
        let inside = remote(
            "in",
            &format!("nbd+unix:///golden?socket={}/img.sock", vms.display()),
        );
        let outside = remote(
            "out",
            &format!("nbd+unix:///golden?socket={}/img.sock", run.display()),
        );
        let tcp = remote("tcp", "nbd://127.0.0.1:10809/golden");
        let allow = AllowedDirs::new(std::slice::from_ref(&vms)).unwrap();
        // The socket need not exist yet: judged by where it would be.
        allow.check_before_open(&inside).unwrap();
        let e = allow.check_before_open(&outside).unwrap_err();
        assert!(
            matches!(
                e,
                AllowError::Outside {
                    role: "remote base's socket",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("img.sock"), "{e}");
        assert!(allow.check_after_open(&outside).is_err());
        let e = allow.check_before_open(&tcp).unwrap_err();
        assert!(matches!(e, AllowError::RemoteBase(_)), "{e}");
        assert!(e.to_string().contains("--allow-remote-bases"), "{e}");
        assert!(
            e.to_string().contains("nbd://127.0.0.1:10809/golden"),
            "{e}"
        );
        // With the flag, a TCP base passes; a socket outside still does not.
        let flagged = allow.clone().with_remote_bases(true);
        flagged.check_before_open(&tcp).unwrap();
        flagged.check_after_open(&tcp).unwrap();
        assert!(flagged.check_before_open(&outside).is_err());
        // A remote base under a local layer is checked too.
        let top = overlay_in(&vms, "top", &outside);
        let e = allow.check_before_open(&top).unwrap_err();
        assert!(
            matches!(
                e,
                AllowError::Outside {
                    role: "remote base's socket of a base layer",
                    ..
                }
            ),
            "{e}"
        );
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
