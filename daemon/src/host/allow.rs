//! Which files `export-add` may open: the control socket must not become a way to open arbitrary
//! files with the daemon's (usually root) privileges.
//!
//! An overlay may be added only if its `.add-cow` file, its raw image and every file of its base
//! (every layer of a backing chain) are regular files that lie under one of the allowed folders
//! (`--allow-dir`, or by default the folders holding the command-line overlays and their raw
//! images and bases). Device nodes, FIFOs, sockets and folders are refused in every role: a
//! disk on a device is given on the command line, never through the control socket.
//!
//! # What is checked: the files opened, not their paths
//!
//! A check of a path followed by an open of the same path is a race: whoever can change what
//! the path names in between (a symlink anywhere along it, say a folder symlink outside every
//! allowed folder that another process keeps switching) decides which file is opened. So the
//! decision is taken on the files the engine has open ([`AllowedDirs::check_opened`]), after
//! the open and before the disk is served; a disk that fails it is closed again and the add
//! refused. For each descriptor:
//!
//! 1. `fstat`: it must be a regular file.
//! 2. The kernel's own name of the open file (`/proc/self/fd/N`) must lie under an allowed
//!    folder `D` (a file with no name left, unlinked, is refused).
//! 3. That name, relative to `D`, is opened again from a handle of `D` taken when the folders
//!    were given (`O_PATH`), with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: no symlink,
//!    no `..` out of `D`, no absolute jump. It must be the same file (device and inode) as the
//!    descriptor.
//!
//! Why no swap can get a file outside the folders served: the device and inode of an open
//! descriptor never change, and they are what the engine reads and writes through. Step 3
//! proves that, at the time of the check, that very inode has a name beneath `D` reached
//! through real folders only. Whatever a path named before (the swap the check-then-open race
//! relies on) is not looked at; whatever it names after the check does not change the
//! descriptor. The only way an outside file passes is to give that same inode a name inside `D`
//! (a hard link or a rename into the folder), which needs write access inside an allowed
//! folder, the trust boundary `--allow-dir` draws (and the kernel's `protected_hardlinks`
//! stops a hard link to another user's file; a device node is refused by step 1 anyway).
//!
//! The same paths are also checked before the open ([`AllowedDirs::check_before_open`]): the
//! engine's chain walk names each file, and one that resolves outside, or is not a regular
//! file, is refused before anything is opened (so a header naming `/dev/watchdog` or a FIFO
//! gets no open at all when nobody races). That check is only a filter: under a race its answer
//! means nothing, and the check of the opened files decides.
//!
//! A remote (NBD) base of any layer is no file, but it is still something the daemon connects
//! to with its privileges: an `nbd+unix` base's socket must lie inside too (its folder resolved,
//! the socket's name kept), and an `nbd://` or `nbds://` (TCP) base is refused unless the daemon
//! was started with `--allow-remote-bases` (`nbds+unix://`: a socket, like `nbd+unix://`). The engine connects by the socket's path, so this one is a path
//! check (before the open and again after it).
//!
//! # Sockets `export-add` creates
//!
//! A vhost-user-blk socket's folder is resolved to its real path, opened beneath its allowed
//! folder the same way (no symlink, no `..`), and the socket is bound at that real path, never
//! at the client's, so a symlink in the client's path is followed once, by the check, and not
//! again by the bind ([`SocketDir`]). Every folder of the real path is a real folder when it is
//! checked; to move the bind elsewhere afterwards one must replace one of them, which needs
//! write access to the folder holding it: inside an allowed folder (the trust boundary) or
//! above it. After the bind the socket file is looked up again beneath the held folder.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use addcow_engine::format::{Chain, ChainFile, FileRole, OpenedFile, MAX_CHAIN_DEPTH};
use addcow_engine::nbd::uri::{NbdAddr, NbdUri};
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

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
    /// A file is not a regular file (a device node, FIFO, socket or folder).
    #[error("{}: the {role} is not a regular file ({kind}); export-add opens only regular files (a device is given on the command line)", path.display())]
    NotRegular {
        /// "overlay", "raw image" or "base".
        role: &'static str,
        /// Its path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
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
    /// A TCP (`nbd://`, `nbds://`) base, and the daemon was not started with `--allow-remote-bases`.
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
    /// An `O_PATH` handle of each of `dirs` (same order), taken when the folders were given:
    /// the folders checks are made beneath, whatever their paths name later.
    handles: Vec<Arc<OwnedFd>>,
    /// `--allow-remote-bases`: TCP image servers may be bases.
    remote_bases: bool,
}

/// An `O_PATH` handle of the folder `dir`.
fn dir_handle(dir: &Path) -> std::io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    // SAFETY: `open` returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `rel` beneath the folder `dir` (`O_PATH`, no symlink anywhere, nothing out of `dir`);
/// an empty `rel` is `dir` itself.
fn open_beneath(dir: BorrowedFd<'_>, rel: &Path) -> std::io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = nix::fcntl::openat2(dir.as_raw_fd(), rel, how)?;
    // SAFETY: `openat2` returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Device and inode of an open file.
fn file_id(fd: BorrowedFd<'_>) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok((st.st_dev, st.st_ino))
}

/// What a file of type `mode` (`st_mode`) is, when it is not a regular file.
fn irregular(mode: u32) -> Option<&'static str> {
    match mode & libc::S_IFMT {
        libc::S_IFREG => None,
        libc::S_IFBLK => Some("a block device"),
        libc::S_IFCHR => Some("a character device"),
        libc::S_IFIFO => Some("a FIFO"),
        libc::S_IFSOCK => Some("a socket"),
        libc::S_IFDIR => Some("a folder"),
        libc::S_IFLNK => Some("a symlink"),
        _ => Some("not a file"),
    }
}

/// The kernel's name of the open file `fd` (`None`: it has none any more, or no `/proc`).
fn kernel_path(fd: BorrowedFd<'_>) -> Option<PathBuf> {
    let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let deleted = p.as_os_str().as_bytes().ends_with(b" (deleted)");
    (p.is_absolute() && !deleted).then_some(p)
}

/// Where `real` (an absolute, resolved path) lies beneath one of `dirs`: the folder's index and
/// the rest of the path. `None` when it is under none of them, or when the rest holds anything
/// but plain names (`.`, `..`; a resolved path has none, so such a path is refused).
pub fn beneath<'p>(dirs: &[PathBuf], real: &'p Path) -> Option<(usize, &'p Path)> {
    dirs.iter().enumerate().find_map(|(i, d)| {
        let rel = real.strip_prefix(d).ok()?;
        rel.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
            .then_some((i, rel))
    })
}

/// The name of a file's role, for messages.
fn role_name(f: &ChainFile) -> &'static str {
    match (&f.role, f.depth) {
        (FileRole::Remote(_), 0 | 1) => "remote base's socket",
        (FileRole::Remote(_), _) => "remote base's socket of a base layer",
        (FileRole::Named, 0) => "overlay",
        (FileRole::Data, 0) => "raw image",
        (FileRole::Named, 1) => "base",
        (FileRole::Named, _) => "base of a base layer",
        (FileRole::Data, _) => "raw image of a base layer",
    }
}

impl AllowedDirs {
    fn with_dirs(dirs: Vec<PathBuf>) -> crate::error::Result<AllowedDirs> {
        let mut handles = Vec::with_capacity(dirs.len());
        for d in &dirs {
            let h = dir_handle(d).map_err(|e| {
                crate::error::Error::new(crate::error::ErrorKind::InvalidArgument)
                    .with_flag("--allow-dir")
                    .with_value(d.display().to_string())
                    .with_source(e)
            })?;
            handles.push(Arc::new(h));
        }
        Ok(AllowedDirs {
            dirs,
            handles,
            remote_bases: false,
        })
    }

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
        AllowedDirs::with_dirs(out)
    }

    /// The default: the folders of `files` (the command-line overlays' files). A folder that
    /// cannot be opened is left out (nothing in it can be checked).
    pub fn from_files(files: &[OverlayFiles]) -> AllowedDirs {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for d in files.iter().flat_map(OverlayFiles::folders) {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        dirs.retain(|d| {
            let ok = dir_handle(d).is_ok();
            if !ok {
                tracing::warn!(dir = %d.display(), "cannot open the folder; export-add may not use it");
            }
            ok
        });
        AllowedDirs::with_dirs(dirs).unwrap_or_default()
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

    fn outside(&self, role: &'static str, path: &Path) -> AllowError {
        AllowError::Outside {
            role,
            path: path.to_path_buf(),
            dirs: self.describe(),
        }
    }

    fn inside(&self, role: &'static str, path: &Path) -> Result<(), AllowError> {
        match beneath(&self.dirs, path) {
            Some(_) => Ok(()),
            None => Err(self.outside(role, path)),
        }
    }

    /// A remote base: its Unix socket must lie inside (the socket's folder resolved, so a
    /// socket not there yet is judged by where it would be); TCP needs `--allow-remote-bases`.
    fn check_remote(&self, role: &'static str, uri: &NbdUri) -> Result<(), AllowError> {
        match &uri.addr {
            NbdAddr::Unix(sock) => {
                if !sock.is_absolute() {
                    return Err(self.outside(role, sock));
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

    /// One file of the chain as the engine's walk names it, before it is opened: it must lie
    /// inside and not be a device, FIFO, ... (a remote layer: see
    /// [`AllowedDirs::check_remote`]). A file that cannot be resolved yet passes (the open
    /// reports it).
    fn check_named(&self, f: &ChainFile) -> Result<(), AllowError> {
        let role = role_name(f);
        if let FileRole::Remote(u) = &f.role {
            return self.check_remote(role, u);
        }
        let Ok(real) = std::fs::canonicalize(&f.path) else {
            return Ok(());
        };
        self.inside(role, &real)?;
        match std::fs::metadata(&real)
            .ok()
            .and_then(|m| irregular(m.mode()))
        {
            Some(kind) => Err(AllowError::NotRegular {
                role,
                path: real,
                kind,
            }),
            None => Ok(()),
        }
    }

    /// Before the open, as a filter (see the module docs): refuses a relative path, no allowed
    /// folder at all, and any file of the chain that resolves outside or is not a regular
    /// file, walking the chain with the engine's opener (names only: no bitmap, lock or
    /// connection), each file checked before it is opened to read the next one's name. What
    /// cannot be read or resolved yet passes (the open reports it).
    pub fn check_before_open(&self, overlay: &Path) -> Result<(), AllowError> {
        if self.dirs.is_empty() {
            return Err(AllowError::NoDirs);
        }
        if !overlay.is_absolute() {
            return Err(AllowError::Relative(overlay.to_path_buf()));
        }
        let refused = std::cell::RefCell::new(None);
        let gate = |f: &ChainFile| match self.check_named(f) {
            Ok(()) => Ok(()),
            Err(e) => {
                *refused.borrow_mut() = Some(e);
                Err(addcow_engine::Error::new(
                    addcow_engine::ErrorKind::InvalidArgument("outside the allowed folders".into()),
                ))
            }
        };
        // The walk's own errors (a file that cannot be read yet) are left to the open.
        let _ = Chain::files_of(overlay, MAX_CHAIN_DEPTH, Some(&gate));
        match refused.into_inner() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// One open file, in the role `role` (`path`: the path it was opened by, for messages):
    /// steps 1-3 of the module docs.
    pub fn check_fd(
        &self,
        role: &'static str,
        path: &Path,
        fd: BorrowedFd<'_>,
    ) -> Result<(), AllowError> {
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| {
            AllowError::Unresolved(format!("{}: {role}: fstat: {e}", path.display()))
        })?;
        if let Some(kind) = irregular(st.st_mode) {
            return Err(AllowError::NotRegular {
                role,
                path: path.to_path_buf(),
                kind,
            });
        }
        let Some(real) = kernel_path(fd) else {
            return Err(AllowError::Unresolved(format!(
                "{}: {role}: the open file has no name any more (or /proc is not mounted)",
                path.display()
            )));
        };
        let Some((i, rel)) = beneath(&self.dirs, &real) else {
            return Err(self.outside(role, &real));
        };
        let again = open_beneath(self.handles[i].as_fd(), rel).and_then(|h| file_id(h.as_fd()));
        match again {
            Ok(id) if file_id(fd).ok() == Some(id) => Ok(()),
            // Reached through a symlink, out of the folder, or another file by now: whichever,
            // the open file is not one beneath the folder.
            _ => Err(self.outside(role, &real)),
        }
    }

    /// After a successful open, before the disk is served: every file `files` lists (a
    /// disk's [`addcow_engine::Disk::opened_files`]) must pass [`AllowedDirs::check_fd`], and
    /// a remote layer [`AllowedDirs::check_remote`].
    pub fn check_opened(&self, files: &[OpenedFile<'_>]) -> Result<(), AllowError> {
        if self.dirs.is_empty() {
            return Err(AllowError::NoDirs);
        }
        for f in files {
            let role = role_name(&f.file);
            match (&f.file.role, f.fd) {
                (FileRole::Remote(u), _) => self.check_remote(role, u)?,
                (_, Some(fd)) => self.check_fd(role, &f.file.path, fd)?,
                (_, None) => {
                    return Err(AllowError::Unresolved(format!(
                        "{}: {role}: not open",
                        f.file.path.display()
                    )))
                }
            }
        }
        Ok(())
    }

    /// A socket `export-add` is to create: its path must be absolute and its folder (which must
    /// exist) must lie inside, reached through real folders only. Returns where to bind it.
    pub fn check_socket(&self, socket: &Path) -> Result<SocketDir, AllowError> {
        if self.dirs.is_empty() {
            return Err(AllowError::NoDirs);
        }
        if !socket.is_absolute() {
            return Err(AllowError::RelativeSocket(socket.to_path_buf()));
        }
        let role = "vhost-user-blk socket's folder";
        let (folder, name) = match (socket.parent(), socket.file_name()) {
            (Some(f), Some(n)) => (f, n),
            _ => return Err(self.outside(role, socket)),
        };
        let real = std::fs::canonicalize(folder)
            .map_err(|e| AllowError::Unresolved(format!("{}: {e}", folder.display())))?;
        let Some((i, rel)) = beneath(&self.dirs, &real) else {
            return Err(self.outside(role, &real));
        };
        let held =
            open_beneath(self.handles[i].as_fd(), rel).map_err(|_| self.outside(role, &real))?;
        // The folder the path names now must be the one held (nothing swapped since the
        // resolution above).
        let same = std::fs::metadata(&real)
            .is_ok_and(|m| file_id(held.as_fd()).is_ok_and(|id| id == (m.dev(), m.ino())));
        if !same {
            return Err(self.outside(role, &real));
        }
        Ok(SocketDir {
            path: real.join(name),
            name: name.to_os_string(),
            held,
        })
    }
}

/// The folder of a socket `export-add` creates, checked and held (see the module docs): bind at
/// [`SocketDir::path`], then [`SocketDir::verify_bound`].
#[derive(Debug)]
pub struct SocketDir {
    path: PathBuf,
    name: std::ffi::OsString,
    held: OwnedFd,
}

impl SocketDir {
    /// Where to bind: the socket's real path (its folder resolved when it was checked).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After the bind: a socket must now be in the held folder under the socket's name, and
    /// the path bound must name that same file.
    pub fn verify_bound(&self) -> Result<(), AllowError> {
        let role = "vhost-user-blk socket";
        let outside = || AllowError::Outside {
            role,
            path: self.path.clone(),
            dirs: "the socket was not created in the folder checked".into(),
        };
        let there = nix::sys::stat::fstatat(
            Some(self.held.as_raw_fd()),
            OsStr::new(&self.name),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|_| outside())?;
        let at_path = std::fs::symlink_metadata(&self.path).map_err(|_| outside())?;
        let is_socket = at_path.file_type().is_socket();
        if !is_socket || (there.st_dev, there.st_ino) != (at_path.dev(), at_path.ino()) {
            return Err(outside());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// [`AllowedDirs::check_opened`] on the files of `overlay`'s chain, each opened here (a
    /// remote layer: not connected to).
    fn check_after_open(allow: &AllowedDirs, overlay: &Path) -> Result<(), AllowError> {
        let files = Chain::files_of(overlay, MAX_CHAIN_DEPTH, None)
            .map_err(|e| AllowError::Unresolved(e.to_string()))?;
        let open: Vec<Option<File>> = files
            .iter()
            .map(|f| match f.role {
                FileRole::Remote(_) => None,
                _ => File::open(&f.path).ok(),
            })
            .collect();
        let opened: Vec<OpenedFile<'_>> = files
            .into_iter()
            .zip(&open)
            .map(|(file, f)| OpenedFile {
                file,
                fd: f.as_ref().map(File::as_fd),
            })
            .collect();
        allow.check_opened(&opened)
    }

    #[test]
    fn opened_files_decide_not_paths() {
        let t = tempfile::tempdir().unwrap();
        let (vms, other) = (t.path().join("vms"), t.path().join("x"));
        std::fs::create_dir(&vms).unwrap();
        std::fs::create_dir(&other).unwrap();
        let allow = AllowedDirs::new(std::slice::from_ref(&vms)).unwrap();
        let inside = vms.join("a.raw");
        let outside = other.join("a.raw");
        std::fs::write(&inside, b"in").unwrap();
        std::fs::write(&outside, b"out").unwrap();
        // A folder symlink outside: opened while it points outside, the file is refused
        // whatever the path names when the check runs.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        let f = File::open(link.join("a.raw")).unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&vms, &link).unwrap();
        let e = allow
            .check_fd("raw image", &link.join("a.raw"), f.as_fd())
            .unwrap_err();
        assert!(matches!(e, AllowError::Outside { .. }), "{e}");
        assert!(e.to_string().contains(&*outside.to_string_lossy()), "{e}");
        // The same path, now naming the inside file: opened, it passes.
        let f = File::open(link.join("a.raw")).unwrap();
        allow
            .check_fd("raw image", &link.join("a.raw"), f.as_fd())
            .unwrap();
        // An inside file that was unlinked after the open has no name: refused.
        let gone = vms.join("gone.raw");
        std::fs::write(&gone, b"x").unwrap();
        let f = File::open(&gone).unwrap();
        std::fs::remove_file(&gone).unwrap();
        assert!(allow.check_fd("raw image", &gone, f.as_fd()).is_err());
        // A device node is refused in every role, by path before the open and open.
        let dev = File::open("/dev/null").unwrap();
        let e = allow
            .check_fd("raw image", Path::new("/dev/null"), dev.as_fd())
            .unwrap_err();
        assert!(matches!(e, AllowError::NotRegular { .. }), "{e}");
        let everywhere = AllowedDirs::new(&[PathBuf::from("/dev")]).unwrap();
        let e = everywhere
            .check_fd("raw image", Path::new("/dev/null"), dev.as_fd())
            .unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn beneath_takes_plain_names_under_a_folder_only() {
        let dirs = [PathBuf::from("/srv/vms"), PathBuf::from("/img")];
        let b = |p: &str| beneath(&dirs, Path::new(p)).map(|(i, r)| (i, r.to_path_buf()));
        assert_eq!(b("/srv/vms/a/b"), Some((0, PathBuf::from("a/b"))));
        assert_eq!(b("/img"), Some((1, PathBuf::new())));
        assert_eq!(b("/srv/vmsx/a"), None);
        assert_eq!(b("/srv/vms/../etc/passwd"), None);
        assert_eq!(b("/etc/passwd"), None);
    }

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
        let e = check_after_open(&allow, &top2).unwrap_err();
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
        check_after_open(&inside, &top2).unwrap();
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
        // TLS changes nothing here: nbds:// is TCP, nbds+unix:// a socket.
        let tls = remote("tls", "nbds://127.0.0.1:10809/golden?tls-certificates=/pki");
        let tls_out = remote(
            "tls-out",
            &format!(
                "nbds+unix:///golden?socket={}/img.sock&tls-hostname=img",
                run.display()
            ),
        );
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
        assert!(check_after_open(&allow, &outside).is_err());
        assert!(allow.check_before_open(&tls_out).is_err());
        let e = allow.check_before_open(&tls).unwrap_err();
        assert!(matches!(e, AllowError::RemoteBase(_)), "{e}");
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
        check_after_open(&flagged, &tcp).unwrap();
        flagged.check_before_open(&tls).unwrap();
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
        check_after_open(&allow, &ok).unwrap();

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
        assert!(check_after_open(&allow, &missing).is_err());
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
