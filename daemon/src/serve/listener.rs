//! Listening sockets and their hygiene: a stale Unix socket file is removed at start (a live one
//! is refused), the socket gets its mode (0600 unless told), our own socket file is removed at
//! exit, and systemd socket activation (`LISTEN_PID`/`LISTEN_FDS`) is honoured.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::sock::Sock;

/// First file descriptor systemd passes.
const SD_LISTEN_FDS_START: RawFd = 3;

/// One listening socket.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket; `path` is set when we created the file (and remove it at exit).
    Unix {
        /// The listener.
        sock: UnixListener,
        /// The socket file we own.
        path: Option<PathBuf>,
    },
    /// A TCP socket.
    Tcp(TcpListener),
}

/// Errors setting up listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another server answers on the socket path.
    #[error("{0}: another server is listening on this socket")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0}: exists and is not a socket; not removing it")]
    NotASocket(PathBuf),
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: io::Error,
    },
}

impl Listener {
    /// Binds a Unix socket at `path` with permission bits `mode`, removing a stale socket file
    /// first (one nobody answers on).
    pub fn bind_unix(path: &Path, mode: u32) -> Result<Listener, ListenError> {
        let io_err = |what, source| ListenError::Io {
            what,
            path: path.display().to_string(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ListenError::InUse(path.to_path_buf()));
                }
                tracing::info!(path = %path.display(), "removing stale socket");
                std::fs::remove_file(path).map_err(|e| io_err("remove stale socket", e))?;
            }
            Ok(_) => return Err(ListenError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat", e)),
        }
        // Bind under a restrictive umask so the socket is never briefly wider than `mode`.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let sock = bound.map_err(|e| io_err("bind", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_err("chmod", e))?;
        Ok(Listener::Unix {
            sock,
            path: Some(path.to_path_buf()),
        })
    }

    /// Binds a TCP socket.
    pub fn bind_tcp(addr: &str) -> Result<Listener, ListenError> {
        let sock = TcpListener::bind(addr).map_err(|source| ListenError::Io {
            what: "bind",
            path: addr.to_string(),
            source,
        })?;
        if !sock.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
            tracing::warn!(%addr, "TCP listener is not on loopback; NBD has no authentication here");
        }
        Ok(Listener::Tcp(sock))
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
                        path: None,
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

    /// Accepts one connection (blocking mode for the connection itself).
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
                Ok(Sock::Tcp(s))
            }
        }
    }

    /// Removes the socket file we created, if any.
    pub fn remove_file(&self) {
        if let Listener::Unix { path: Some(p), .. } = self {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove socket");
            }
        }
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix { sock, path } => match path {
                Some(p) => p.display().to_string(),
                None => format!("systemd unix fd {}", sock.as_raw_fd()),
            },
            Listener::Tcp(s) => s
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
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

    use super::*;

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        {
            let _stale = UnixListener::bind(&p).unwrap();
        } // dropped: file stays, nobody listens
        assert!(p.exists());
        let l = Listener::bind_unix(&p, 0o600).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            Listener::bind_unix(&p, 0o600),
            Err(ListenError::InUse(_))
        ));
        l.remove_file();
        assert!(!p.exists());

        let f = dir.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            Listener::bind_unix(&f, 0o600),
            Err(ListenError::NotASocket(_))
        ));
    }

    #[test]
    fn socket_mode_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.sock");
        let _l = Listener::bind_unix(&p, 0o660).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }
}
