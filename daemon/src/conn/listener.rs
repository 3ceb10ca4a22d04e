//! Listening sockets and their hygiene.
//!
//! A Unix socket path is owned by one daemon at a time: `PATH.lock` (see [`LockedFile`]) is
//! taken before anything else and held for the daemon's lifetime, so two daemons starting
//! together cannot both bind it. An existing socket file is stale only when connecting to it is
//! refused (`ECONNREFUSED`): then it is removed; a server that answers, or any other outcome
//! (a full backlog, a socket of another type, no permission), is refused and the file left
//! alone. The socket is bound under a staging name in the same folder and renamed onto the
//! path once the daemon accepts connections ([`Listener::publish`]), so the path appears only
//! when it works. The socket gets its mode (0600 unless told); at exit the file is removed only
//! if it is still ours. systemd socket activation (`LISTEN_PID`/`LISTEN_FDS`) is honoured (no
//! file is created or removed then). TCP listeners on a non-loopback address must be allowed
//! explicitly (NBD has no authentication here); accepted TCP connections get keepalive probes.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::sock::Sock;
use crate::process::lockfile::{LockError, LockedFile};

/// First file descriptor systemd passes.
const SD_LISTEN_FDS_START: RawFd = 3;
/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// TCP keepalive: first probe after this much silence.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// TCP keepalive: between probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// TCP keepalive: unanswered probes before the connection is dropped.
pub const KEEPALIVE_PROBES: u32 = 3;

/// A Unix socket file this daemon created.
#[derive(Debug)]
pub struct SocketFile {
    /// Where clients find it.
    path: PathBuf,
    /// Where it is bound until [`Listener::publish`] renames it onto `path`.
    staged: Option<PathBuf>,
    /// (device, inode) of the socket file, to remove it only while it is ours.
    id: (u64, u64),
    /// Held for the daemon's lifetime: nobody else binds `path` meanwhile.
    _lock: LockedFile,
}

/// One listening socket.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket; `file` is set when we created the file (and remove it at exit).
    Unix {
        /// The listener.
        sock: UnixListener,
        /// The socket file we own.
        file: Option<SocketFile>,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

/// Errors setting up listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another server answers on the socket path.
    #[error("{}: another server is listening on this socket", .0.display())]
    InUse(PathBuf),
    /// Connecting to the existing socket file failed in a way that does not prove it stale.
    #[error(
        "{path}: a socket file exists and connecting to it failed ({source}); not removing it"
    )]
    NotStale {
        /// The path.
        path: PathBuf,
        /// Why connecting failed.
        source: io::Error,
    },
    /// Another daemon is serving on this socket path, or starting on it (it holds the lock).
    #[error("{}: another server is listening on this socket (or starting on it: its .lock file is held)", .0.display())]
    Locked(PathBuf),
    /// The lock file could not be taken.
    #[error("{0}")]
    Lock(LockError),
    /// The path exists and is not a socket.
    #[error("{0}: exists and is not a socket; not removing it")]
    NotASocket(PathBuf),
    /// A TCP address off loopback without `--allow-remote`.
    #[error("--tcp {0}: not a loopback address; NBD has no authentication here, so anyone who can reach it can read and write the exports (add --allow-remote to mean it)")]
    Remote(String),
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
}

/// The lock file beside a socket path.
fn lock_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Whether a server listens on the socket file at `path`: `Ok(false)` only when connecting is
/// refused (nobody listens: the file is stale). Never blocks (a full backlog is "in use").
fn socket_in_use(path: &Path) -> Result<bool, io::Error> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => Ok(true),
        // A listener with a full backlog: alive, just busy.
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINPROGRESS) => Ok(true),
        Err(nix::errno::Errno::ECONNREFUSED) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Listener {
    /// Binds a Unix socket for `path` with permission bits `mode`: takes `PATH.lock`, removes a
    /// stale socket file (one whose connections are refused), binds under a staging name (the
    /// path itself appears at [`Listener::publish`]).
    pub fn bind_unix(path: &Path, mode: u32) -> Result<Listener, ListenError> {
        let io_err = |what, source| ListenError::Io {
            what,
            path: path.display().to_string(),
            source,
        };
        let lock = LockedFile::acquire(&lock_path(path)).map_err(|e| match e {
            LockError::Held { .. } => ListenError::Locked(path.to_path_buf()),
            other => ListenError::Lock(other),
        })?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match socket_in_use(path) {
                Ok(true) => return Err(ListenError::InUse(path.to_path_buf())),
                Ok(false) => {
                    tracing::info!(path = %path.display(), "removing stale socket");
                    std::fs::remove_file(path).map_err(|e| io_err("remove stale socket", e))?;
                }
                Err(source) => {
                    return Err(ListenError::NotStale {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            },
            Ok(_) => return Err(ListenError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat", e)),
        }
        let staged = staging_path(path);
        let at = staged.as_deref().unwrap_or(path);
        if let Some(s) = &staged {
            // A staging file left by a killed daemon of the same pid (it is ours to replace).
            let _ = std::fs::remove_file(s);
        }
        // Bind under a restrictive umask so the socket is never briefly wider than `mode`.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(at);
        nix::sys::stat::umask(old);
        let sock = bound.map_err(|e| io_err("bind", e))?;
        let cleanup = |e| {
            let _ = std::fs::remove_file(at);
            e
        };
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode))
            .map_err(|e| cleanup(io_err("chmod", e)))?;
        let meta = std::fs::symlink_metadata(at).map_err(|e| cleanup(io_err("stat", e)))?;
        Ok(Listener::Unix {
            sock,
            file: Some(SocketFile {
                path: path.to_path_buf(),
                staged,
                id: (meta.dev(), meta.ino()),
                _lock: lock,
            }),
        })
    }

    /// Binds a TCP socket. A non-loopback address needs `allow_remote`.
    pub fn bind_tcp(addr: &str, allow_remote: bool) -> Result<Listener, ListenError> {
        let sock = TcpListener::bind(addr).map_err(|source| ListenError::Io {
            what: "bind",
            path: addr.to_string(),
            source,
        })?;
        let loopback = sock.local_addr().is_ok_and(|a| a.ip().is_loopback());
        if !loopback {
            if !allow_remote {
                return Err(ListenError::Remote(addr.to_string()));
            }
            tracing::warn!(%addr, "TCP listener is not on loopback; NBD has no authentication here");
        }
        Ok(Listener::Tcp(sock))
    }

    /// Makes the socket reachable at its path (renames the staged file onto it). Call once the
    /// daemon accepts connections. Nothing to do for TCP and systemd sockets.
    pub fn publish(&mut self) -> Result<(), ListenError> {
        match self {
            Listener::Unix { file: Some(f), .. } => f.publish(),
            _ => Ok(()),
        }
    }

    /// The listeners systemd passed us, if `LISTEN_PID` names this process. Clears the
    /// variables so children do not inherit them.
    pub fn from_systemd() -> Option<Vec<Listener>> {
        let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
        if pid != std::process::id() {
            return None;
        }
        let n: RawFd = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
        let mut out = Vec::new();
        for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START.saturating_add(n.max(0)) {
            // Mark close-on-exec; a failure means the fd is not open: skip it.
            if nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .is_err()
            {
                continue;
            }
            let family = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd)
                .ok()
                .and_then(|a| nix::sys::socket::SockaddrLike::family(&a));
            // SAFETY: systemd hands us ownership of fds LISTEN_FDS_START..+n, each a listening
            // socket; we take each exactly once and nothing else in the process uses them.
            let l = unsafe {
                match family {
                    Some(nix::sys::socket::AddressFamily::Unix) => Listener::Unix {
                        sock: UnixListener::from_raw_fd(fd),
                        file: None,
                    },
                    _ => Listener::Tcp(TcpListener::from_raw_fd(fd)),
                }
            };
            out.push(l);
        }
        Some(out)
    }

    /// Makes `accept` return `WouldBlock` instead of blocking (the accept loop polls).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix { sock, .. } => sock.set_nonblocking(true),
            Listener::Tcp(s) => s.set_nonblocking(true),
        }
    }

    /// Accepts one connection (blocking mode for the connection itself; TCP ones get
    /// `TCP_NODELAY` and keepalive probes).
    pub fn accept(&self) -> io::Result<Sock> {
        match self {
            Listener::Unix { sock, .. } => {
                let (s, _) = sock.accept()?;
                s.set_nonblocking(false)?;
                Ok(Sock::Unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _): (TcpStream, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                set_keepalive(&s)?;
                Ok(Sock::Tcp(s))
            }
        }
    }

    /// The Unix listener, for the control socket (which accepts on its own thread).
    pub fn into_unix(self) -> Option<(UnixListener, Option<SocketFile>)> {
        match self {
            Listener::Unix { sock, file } => Some((sock, file)),
            Listener::Tcp(_) => None,
        }
    }

    /// Removes the socket file we created, if it is still ours (and stops owning the path).
    pub fn remove_file(&mut self) {
        if let Listener::Unix { file, .. } = self {
            drop(file.take());
        }
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix { sock, file } => match file {
                Some(f) => f.path.display().to_string(),
                None => format!("systemd unix fd {}", sock.as_raw_fd()),
            },
            Listener::Tcp(s) => s
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
        }
    }
}

impl SocketFile {
    /// Renames the staged socket onto its path (see [`Listener::publish`]).
    pub fn publish(&mut self) -> Result<(), ListenError> {
        let Some(staged) = self.staged.take() else {
            return Ok(());
        };
        use nix::fcntl::{renameat2, RenameFlags};
        let r = match renameat2(
            None,
            &staged,
            None,
            &self.path,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            // File systems without RENAME_NOREPLACE: a plain rename (we hold the path's lock).
            Err(nix::errno::Errno::EINVAL) => std::fs::rename(&staged, &self.path),
            other => other.map_err(io::Error::from),
        };
        if let Err(e) = r {
            let _ = std::fs::remove_file(&staged);
            return Err(ListenError::Io {
                what: "publish socket",
                path: self.path.display().to_string(),
                source: e,
            });
        }
        Ok(())
    }
}

impl Drop for SocketFile {
    /// Removes the socket file (staged or published) if it is still ours; the lock goes after.
    fn drop(&mut self) {
        let at = self.staged.as_deref().unwrap_or(&self.path);
        match std::fs::symlink_metadata(at) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(at) {
                    tracing::warn!(path = %at.display(), error = %e, "cannot remove socket");
                }
            }
            _ => tracing::warn!(path = %at.display(), "socket file is no longer ours; left alone"),
        }
    }
}

/// A staging name for a socket at `path`, in the same folder (so the rename is atomic), or
/// `None` when such a name would be too long for a socket address (then it is bound in place).
fn staging_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let mut staged = std::ffi::OsString::from(".");
    staged.push(name);
    staged.push(format!(".{}.tmp", std::process::id()));
    let p = path.with_file_name(staged);
    (p.as_os_str().len() <= MAX_SOCKET_PATH).then_some(p)
}

/// Turns on TCP keepalive ([`KEEPALIVE_IDLE`], [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_PROBES`]):
/// a peer that vanished without a word is noticed within about a minute.
fn set_keepalive(s: &TcpStream) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(s, sockopt::KeepAlive, &true)?;
    setsockopt(s, sockopt::TcpKeepIdle, &(KEEPALIVE_IDLE.as_secs() as u32))?;
    setsockopt(
        s,
        sockopt::TcpKeepInterval,
        &(KEEPALIVE_INTERVAL.as_secs() as u32),
    )?;
    setsockopt(s, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    Ok(())
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix { sock, .. } => sock.as_fd(),
            Listener::Tcp(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix { sock, .. } => sock.as_raw_fd(),
            Listener::Tcp(s) => s.as_raw_fd(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixDatagram, UnixStream};

    use super::*;

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        {
            let _stale = UnixListener::bind(&p).unwrap();
        } // dropped: file stays, nobody listens
        assert!(p.exists());
        let mut l = Listener::bind_unix(&p, 0o600).unwrap();
        // Staged: the path appears only when published.
        assert!(!p.exists(), "the path must not appear before publish");
        // A second daemon starting meanwhile (it would see no socket at all) is refused.
        assert!(matches!(
            Listener::bind_unix(&p, 0o600),
            Err(ListenError::Locked(_))
        ));
        l.publish().unwrap();
        assert!(UnixStream::connect(&p).is_ok());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // The owner holds the path's lock: a second daemon is refused before it looks.
        assert!(matches!(
            Listener::bind_unix(&p, 0o600),
            Err(ListenError::Locked(_))
        ));
        l.remove_file();
        assert!(!p.exists());
        assert!(!lock_path(&p).exists(), "the lock file goes with its owner");

        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            Listener::bind_unix(&f, 0o600),
            Err(ListenError::NotASocket(_))
        ));
    }

    /// Only a refused connection proves a socket file stale: a live server (even one whose
    /// backlog is full) and a socket of another type are left alone.
    #[test]
    fn only_econnrefused_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        // Another program's listener (not an addcow: no lock file).
        let p = dir.path().join("live.sock");
        let other = UnixListener::bind(&p).unwrap();
        assert!(matches!(
            Listener::bind_unix(&p, 0o600),
            Err(ListenError::InUse(_))
        ));
        // Its backlog full (it never accepts): still alive, and asking must not block.
        let mut held = Vec::new();
        for _ in 0..512 {
            let s = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            let addr = nix::sys::socket::UnixAddr::new(&p).unwrap();
            let r = nix::sys::socket::connect(s.as_raw_fd(), &addr);
            held.push(s);
            if r == Err(nix::errno::Errno::EAGAIN) {
                break;
            }
        }
        assert!(matches!(
            Listener::bind_unix(&p, 0o600),
            Err(ListenError::InUse(_))
        ));
        assert!(p.exists());
        drop(held);
        drop(other);
        // A datagram socket's file: connecting fails with EPROTOTYPE, which proves nothing.
        let d = dir.path().join("dgram.sock");
        let _dg = UnixDatagram::bind(&d).unwrap();
        assert!(matches!(
            Listener::bind_unix(&d, 0o600),
            Err(ListenError::NotStale { .. })
        ));
        assert!(d.exists(), "another program's socket was removed");
    }

    #[test]
    fn socket_mode_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.sock");
        let mut l = Listener::bind_unix(&p, 0o660).unwrap();
        l.publish().unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }

    #[test]
    fn remote_tcp_needs_allowing() {
        assert!(matches!(
            Listener::bind_tcp("0.0.0.0:0", false),
            Err(ListenError::Remote(_))
        ));
        assert!(Listener::bind_tcp("0.0.0.0:0", true).is_ok());
        assert!(Listener::bind_tcp("127.0.0.1:0", false).is_ok());
    }
}
