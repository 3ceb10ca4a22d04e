//! Listening sockets and their hygiene.
//!
//! A Unix socket path is owned by one daemon at a time: `PATH.lock` (see [`LockedFile`]) is
//! taken before anything else and held for the daemon's lifetime, so two daemons starting
//! together cannot both bind it. An existing socket file is stale only when connecting to it is
//! refused (`ECONNREFUSED`): then it is removed; a server that answers, or any other outcome
//! (a full backlog, a socket of another type, no permission), is refused and the file left
//! alone. The socket is bound in a private staging folder (made 0700 by `mkdtemp` in the same
//! folder as the path), given its mode and group there through the folder's descriptor, and
//! renamed onto the path once the daemon accepts connections ([`Listener::publish`]), so the
//! path appears only when it works, never wider than its mode. The process umask is never
//! touched (it is process-wide: a snapshot creating files meanwhile would get it). At exit the
//! file is removed only if it is still ours. systemd socket activation (`LISTEN_PID`/
//! `LISTEN_FDS`) is honoured (no file is created or removed then).
//!
//! Who may connect: the socket file's mode and group, and optionally a [`PeerPolicy`] (an
//! allow-list of uids and gids checked on each accepted Unix connection with `SO_PEERCRED`
//! and `SO_PEERGROUPS`); a refused connection is closed at once, logged and counted
//! ([`refused`]). TCP listeners on a non-loopback address, bound here or passed by systemd,
//! must be allowed explicitly (NBD has no authentication here); accepted TCP connections get
//! keepalive probes.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// The socket's name inside its staging folder: this, then `.N` with a number no other
/// staging folder of the process had. The address a socket is bound at (what `getsockname`
/// answers, on the listener and on every connection accepted from it) is
/// `/proc/self/fd/FD/sock.N`, so no two listeners of the process ever share one, even when
/// their folders' descriptors had the same number: a connection's address tells which listener
/// it came from (vhost-user-blk finds the connection the library accepted by it).
const STAGED_NAME: &str = "sock";

/// The number of the next staging folder (see [`STAGED_NAME`]).
static NEXT_STAGE: AtomicU64 = AtomicU64::new(0);
/// What a staging folder's name carries after `.NAME.` (then `mkdtemp`'s six characters).
const STAGE_MARK: &str = "addcow-";

/// A file's (device, inode).
type FileId = (u64, u64);

/// A private staging folder (0700, ours) holding a freshly bound socket until it is published.
#[derive(Debug)]
struct Stage {
    /// The folder's path (to remove it).
    dir: PathBuf,
    /// The folder, opened without following symlinks: the socket is reached through it.
    fd: OwnedFd,
    /// The socket's name in it (see [`STAGED_NAME`]).
    name: String,
}

/// A Unix socket file this daemon created.
#[derive(Debug)]
pub struct SocketFile {
    /// Where clients find it.
    path: PathBuf,
    /// Where it is bound until [`Listener::publish`] renames it onto `path`.
    staged: Option<Stage>,
    /// (device, inode) of the socket file, to remove it only while it is ours.
    id: (u64, u64),
    /// Held for the daemon's lifetime: nobody else binds `path` meanwhile.
    _lock: LockedFile,
}

/// Which of the daemon's sockets a connection came to (for the refusal counters and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// The NBD socket (`--socket`, or one systemd passed).
    Nbd,
    /// A vhost-user-blk socket.
    Vhost,
    /// The control socket.
    Control,
}

impl SocketKind {
    /// Every kind, in the order of [`refused`]'s answer.
    pub const ALL: [SocketKind; 3] = [SocketKind::Nbd, SocketKind::Vhost, SocketKind::Control];

    /// Its name in logs, metrics and `query-sockets`.
    pub fn name(self) -> &'static str {
        match self {
            SocketKind::Nbd => "nbd",
            SocketKind::Vhost => "vhost-user-blk",
            SocketKind::Control => "control",
        }
    }
}

/// Connections refused by a [`PeerPolicy`], per [`SocketKind`] (process-wide).
static REFUSED: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Connections refused so far because of their peer's credentials, per socket kind.
pub fn refused(kind: SocketKind) -> u64 {
    REFUSED[kind as usize].load(Ordering::Relaxed)
}

/// The credentials of a Unix socket's peer (as they were when it connected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process.
    pub pid: i32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
    /// Its supplementary groups (empty when the kernel cannot tell: before Linux 4.13).
    pub groups: Vec<u32>,
}

impl PeerCred {
    /// Reads the peer credentials of `sock` (`SO_PEERCRED`, `SO_PEERGROUPS`).
    pub fn of(sock: &impl AsFd) -> io::Result<PeerCred> {
        use nix::sys::socket::{getsockopt, sockopt};
        let c = getsockopt(sock, sockopt::PeerCredentials)?;
        Ok(PeerCred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
            groups: peer_groups(sock.as_fd()).unwrap_or_default(),
        })
    }
}

/// The peer's supplementary groups (`SO_PEERGROUPS`).
fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` has room for `len` bytes and outlives the call; `len` is a valid
        // in/out length; the fd is open (borrowed).
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: `len` says how much room it needs.
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() && n <= 1 << 16 {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// Who may connect to a Unix socket besides the file permissions: an allow-list of uids and
/// gids. A peer is let in when its uid is listed, or its gid or one of its supplementary groups
/// is; nobody is implied (not even the daemon's own uid). An empty policy lets everyone in who
/// can open the socket file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Which socket it guards (for logs and counters).
    pub kind: SocketKind,
    /// Uids let in.
    pub uids: Vec<u32>,
    /// Gids let in (primary or supplementary).
    pub gids: Vec<u32>,
}

impl PeerPolicy {
    /// A policy for `kind` letting in `uids` and members of `gids` (no list: everyone).
    pub fn new(kind: SocketKind, uids: &[u32], gids: &[u32]) -> PeerPolicy {
        PeerPolicy {
            kind,
            uids: uids.to_vec(),
            gids: gids.to_vec(),
        }
    }

    /// Whether any list is set.
    pub fn restricts(&self) -> bool {
        !self.uids.is_empty() || !self.gids.is_empty()
    }

    /// Whether `peer` may connect (see the type's docs).
    pub fn allows(&self, peer: &PeerCred) -> bool {
        !self.restricts()
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
            || peer.groups.iter().any(|g| self.gids.contains(g))
    }

    /// Checks a connection just accepted: `Ok` lets it in; a refused one (or one whose
    /// credentials cannot be read) is logged and counted, and the caller closes it.
    pub fn admit(&self, sock: &impl AsFd) -> Result<(), PeerCred> {
        if !self.restricts() {
            return Ok(());
        }
        match PeerCred::of(sock) {
            Ok(peer) if self.allows(&peer) => Ok(()),
            Ok(peer) => {
                REFUSED[self.kind as usize].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    socket = self.kind.name(),
                    pid = peer.pid,
                    uid = peer.uid,
                    gid = peer.gid,
                    "connection refused: peer not in the allow-list"
                );
                Err(peer)
            }
            Err(e) => {
                REFUSED[self.kind as usize].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(socket = self.kind.name(), error = %e,
                    "connection refused: cannot read the peer's credentials");
                Err(PeerCred {
                    pid: 0,
                    uid: u32::MAX,
                    gid: u32::MAX,
                    groups: Vec::new(),
                })
            }
        }
    }
}

impl PeerPolicy {
    /// Counts and logs a connection refused because its peer could not be told (`why`), for
    /// a socket whose connections are accepted by code that cannot check them on accept (the
    /// vhost-user-blk library's).
    pub fn refuse_unidentified(&self, why: &str) {
        REFUSED[self.kind as usize].fetch_add(1, Ordering::Relaxed);
        tracing::warn!(socket = self.kind.name(), why = ?why,
            "connection refused: cannot tell who the peer is");
    }
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
        /// Who may connect (checked at each accept); `None`: whoever can open the file.
        policy: Option<Arc<PeerPolicy>>,
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
    /// A TCP socket systemd passed, off loopback, without `--allow-remote`.
    #[error("systemd socket on {0}: not a loopback address; NBD has no authentication here, so anyone who can reach it can read and write the exports (add --allow-remote to mean it)")]
    RemotePassed(String),
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
    /// Binds a Unix socket for `path` with permission bits `mode` (see [`Listener::bind_unix_as`]).
    pub fn bind_unix(path: &Path, mode: u32) -> Result<Listener, ListenError> {
        Self::bind_unix_as(path, mode, None)
    }

    /// Binds a Unix socket for `path` with permission bits `mode` and, when given, group
    /// `group`: takes `PATH.lock`, removes a stale socket file (one whose connections are
    /// refused) and staging folders a killed daemon left, binds in a private staging folder
    /// (the path itself appears at [`Listener::publish`]). The process umask is not touched.
    pub fn bind_unix_as(
        path: &Path,
        mode: u32,
        group: Option<u32>,
    ) -> Result<Listener, ListenError> {
        let io_err = |what, source| ListenError::Io {
            what,
            path: path.display().to_string(),
            source,
        };
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(io_err(
                "bind",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a socket path holds at most {MAX_SOCKET_PATH} bytes"),
                ),
            ));
        }
        let lock = LockedFile::acquire(&lock_path(path)).map_err(|e| match e {
            LockError::Held { .. } => ListenError::Locked(path.to_path_buf()),
            other => ListenError::Lock(other),
        })?;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match socket_in_use(path) {
                Ok(true) => return Err(ListenError::InUse(path.to_path_buf())),
                Ok(false) => {
                    tracing::info!(path = ?path, "removing stale socket");
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
        // We hold the path's lock: staging folders of this path are a killed daemon's.
        remove_stale_stages(path);
        let stage = Stage::create(path).map_err(|e| io_err("make a staging folder for", e))?;
        let (sock, id) = match stage.bind(mode, group) {
            Ok(b) => b,
            Err((what, e)) => {
                stage.remove();
                return Err(io_err(what, e));
            }
        };
        Ok(Listener::Unix {
            sock,
            file: Some(SocketFile {
                path: path.to_path_buf(),
                staged: Some(stage),
                id,
                _lock: lock,
            }),
            policy: None,
        })
    }

    /// Lets only the peers `policy` allows connect (checked at each accept; Unix sockets
    /// only: TCP has no peer credentials).
    pub fn with_policy(mut self, policy: Option<Arc<PeerPolicy>>) -> Listener {
        if let Listener::Unix { policy: p, .. } = &mut self {
            *p = policy.filter(|p| p.restricts());
        }
        self
    }

    /// Refuses a TCP listener off loopback unless `allow_remote` (for one systemd passed; one
    /// bound by [`Listener::bind_tcp`] was checked there). Unix listeners pass.
    pub fn check_remote(&self, allow_remote: bool) -> Result<(), ListenError> {
        if let Listener::Tcp(sock) = self {
            let addr = sock.local_addr().map_err(|source| ListenError::Io {
                what: "getsockname",
                path: "systemd socket".into(),
                source,
            })?;
            if !addr.ip().is_loopback() {
                if !allow_remote {
                    return Err(ListenError::RemotePassed(addr.to_string()));
                }
                tracing::warn!(%addr, "systemd TCP listener is not on loopback; NBD has no authentication here");
            }
        }
        Ok(())
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
        Self::from_systemd_named().map(|v| v.into_iter().map(|(_, l)| l).collect())
    }

    /// [`Listener::from_systemd`] with each listener's name from `LISTEN_FDNAMES` (the socket
    /// unit's `FileDescriptorName=`; systemd's default is the unit's name, `unknown` when the
    /// variable is missing or short).
    pub fn from_systemd_named() -> Option<Vec<(String, Listener)>> {
        let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
        if pid != std::process::id() {
            return None;
        }
        let n: RawFd = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_string).collect())
            .unwrap_or_default();
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
                        policy: None,
                    },
                    _ => Listener::Tcp(TcpListener::from_raw_fd(fd)),
                }
            };
            let i = usize::try_from(fd - SD_LISTEN_FDS_START).unwrap_or(usize::MAX);
            let name = names.get(i).cloned().unwrap_or_else(|| "unknown".into());
            out.push((name, l));
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
    /// `TCP_NODELAY` and keepalive probes). A Unix peer the listener's [`PeerPolicy`] refuses
    /// is closed (logged and counted there) and reported as `PermissionDenied`.
    pub fn accept(&self) -> io::Result<Sock> {
        match self {
            Listener::Unix { sock, policy, .. } => {
                let (s, _) = sock.accept()?;
                if let Some(p) = policy {
                    if p.admit(&s).is_err() {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                        return Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            "peer not in the allow-list",
                        ));
                    }
                }
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
            Listener::Unix { sock, file, .. } => Some((sock, file)),
            Listener::Tcp(_) => None,
        }
    }

    /// Whether this systemd socket is the control socket: a Unix listener named `control`
    /// (`FileDescriptorName=control`) or bound at `control` (the `--control` path); every
    /// other one serves NBD.
    pub fn is_control(&self, name: &str, control: Option<&Path>) -> bool {
        match self {
            Listener::Unix { sock, .. } => {
                name == "control"
                    || control.is_some_and(|c| {
                        sock.local_addr()
                            .ok()
                            .as_ref()
                            .and_then(|a| a.as_pathname())
                            == Some(c)
                    })
            }
            Listener::Tcp(_) => false,
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
            Listener::Unix { sock, file, .. } => match file {
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
    /// Renames the staged socket onto its path and removes the staging folder (see
    /// [`Listener::publish`]).
    pub fn publish(&mut self) -> Result<(), ListenError> {
        let Some(stage) = self.staged.take() else {
            return Ok(());
        };
        use nix::fcntl::{renameat2, RenameFlags};
        let from = Some(stage.fd.as_raw_fd());
        let r = match renameat2(
            from,
            stage.name.as_str(),
            None,
            &self.path,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            // File systems without RENAME_NOREPLACE: a plain rename (we hold the path's lock).
            Err(nix::errno::Errno::EINVAL) => {
                nix::fcntl::renameat(from, stage.name.as_str(), None, &self.path)
                    .map_err(io::Error::from)
            }
            other => other.map_err(io::Error::from),
        };
        stage.remove();
        if let Err(e) = r {
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
        if let Some(stage) = self.staged.take() {
            stage.remove();
            return;
        }
        let at = &self.path;
        match std::fs::symlink_metadata(at) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(at) {
                    tracing::warn!(path = ?at, error = %e, "cannot remove socket");
                }
            }
            _ => tracing::warn!(path = ?at, "socket file is no longer ours; left alone"),
        }
    }
}

impl Stage {
    /// Makes a private staging folder `.NAME.addcow-XXXXXX` beside `path` (`mkdtemp`: mode
    /// 0700, a fresh name) and opens it without following symlinks; refused unless it is a
    /// folder of our own with no access for others.
    fn create(path: &Path) -> io::Result<Stage> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let mut template = std::ffi::OsString::from(".");
        template.push(name);
        template.push(format!(".{STAGE_MARK}XXXXXX"));
        let dir = nix::unistd::mkdtemp(&path.with_file_name(template))?;
        let stage = |dir: &Path| -> io::Result<OwnedFd> {
            use nix::fcntl::OFlag;
            let fd = nix::fcntl::open(
                dir,
                OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
                nix::sys::stat::Mode::empty(),
            )?;
            // SAFETY: `open` just returned this descriptor; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
            if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the staging folder is not private to this daemon",
                ));
            }
            Ok(fd)
        };
        match stage(&dir) {
            Ok(fd) => Ok(Stage {
                dir,
                fd,
                name: format!(
                    "{STAGED_NAME}.{}",
                    NEXT_STAGE.fetch_add(1, Ordering::Relaxed)
                ),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Binds the socket in the folder, gives it `mode` and `group` through the folder's
    /// descriptor (nobody else can reach it there), and returns it with its (device, inode).
    fn bind(
        &self,
        mode: u32,
        group: Option<u32>,
    ) -> Result<(UnixListener, FileId), (&'static str, io::Error)> {
        use nix::fcntl::AtFlags;
        use nix::sys::stat::{fchmodat, fstatat, FchmodatFlags, Mode};
        let fd = self.fd.as_raw_fd();
        // Through the folder's descriptor: the socket lands in this very folder whatever
        // happens to the path meanwhile. Without /proc, the folder's path (private to us).
        let name = self.name.as_str();
        let via_fd = PathBuf::from(format!("/proc/self/fd/{fd}/{name}"));
        let sock = match UnixListener::bind(&via_fd) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let direct = self.dir.join(name);
                if direct.as_os_str().len() > MAX_SOCKET_PATH {
                    return Err(("bind (no /proc, and the staging path is too long)", e));
                }
                UnixListener::bind(direct)
            }
            other => other,
        }
        .map_err(|e| ("bind", e))?;
        fchmodat(
            Some(fd),
            name,
            Mode::from_bits_truncate(mode),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| ("chmod", e.into()))?;
        if let Some(gid) = group {
            nix::unistd::fchownat(
                Some(fd),
                name,
                None,
                Some(nix::unistd::Gid::from_raw(gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| ("chgrp", e.into()))?;
        }
        let st = fstatat(Some(fd), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| ("stat", e.into()))?;
        Ok((sock, (st.st_dev, st.st_ino)))
    }

    /// Removes the staged socket (if still there) and the folder.
    fn remove(self) {
        let _ = nix::unistd::unlinkat(
            Some(self.fd.as_raw_fd()),
            self.name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(path = ?self.dir, error = %e, "cannot remove a socket staging folder");
        }
    }
}

/// Removes staging folders of `path` a killed daemon left (`.NAME.addcow-XXXXXX`, ours, holding
/// at most a socket). Called with the path's lock held, so none is in use.
fn remove_stale_stages(path: &Path) {
    let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(name.as_bytes());
    prefix.extend_from_slice(format!(".{STAGE_MARK}").as_bytes());
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for e in entries.flatten() {
        let n = e.file_name();
        let b = n.as_bytes();
        if !(b.starts_with(&prefix) && b.len() == prefix.len() + 6) {
            continue;
        }
        let dir = e.path();
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() && m.uid() == me => {}
            _ => continue,
        }
        // Its socket: `sock.N` (or `sock`, as older daemons named it).
        for sock in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let n = sock.file_name();
            let ours = n.as_bytes() == STAGED_NAME.as_bytes()
                || n.as_bytes()
                    .starts_with(format!("{STAGED_NAME}.").as_bytes());
            if ours && sock.file_type().is_ok_and(|t| t.is_socket()) {
                let _ = std::fs::remove_file(sock.path());
            }
        }
        // Fails (and leaves it) when it holds anything else.
        if std::fs::remove_dir(&dir).is_ok() {
            tracing::info!(path = ?dir, "removed a stale socket staging folder");
        }
    }
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

    /// The process umask as /proc/self/status shows it.
    fn umask_now() -> u32 {
        let st = std::fs::read_to_string("/proc/self/status").unwrap();
        let v = st.lines().find_map(|l| l.strip_prefix("Umask:")).unwrap();
        u32::from_str_radix(v.trim(), 8).unwrap()
    }

    /// Runs `bind_all` on a thread whose `bind(2)` calls each stop (a seccomp user
    /// notification) until `at_bind` ran on this thread: `at_bind` sees the process as it is
    /// *inside* every bind, deterministically. Returns how many binds were seen.
    fn observe_binds(bind_all: impl FnOnce() + Send + 'static, mut at_bind: impl FnMut()) -> usize {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let (tx, rx) = std::sync::mpsc::channel::<RawFd>();
        let t = std::thread::spawn(move || {
            let ins = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
                code: code as u16,
                jt,
                jf,
                k,
            };
            // nr == bind ? USER_NOTIF : ALLOW (seccomp_data.nr is at offset 0).
            let filter = [
                ins(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
                ins(
                    libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                    0,
                    1,
                    libc::SYS_bind as u32,
                ),
                ins(
                    libc::BPF_RET | libc::BPF_K,
                    0,
                    0,
                    libc::SECCOMP_RET_USER_NOTIF,
                ),
                ins(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            // SAFETY: plain prctl; no_new_privs applies to this thread only (and lets an
            // unprivileged thread install a filter).
            let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(r, 0);
            // SAFETY: `prog` points at `filter`, both alive for the call; the filter applies to
            // this thread only (no TSYNC) and ends with it.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                    &prog as *const libc::sock_fprog,
                )
            };
            assert!(fd >= 0, "seccomp: {}", io::Error::last_os_error());
            tx.send(fd as RawFd).unwrap();
            bind_all();
        });
        // SAFETY: the thread just created this descriptor and handed it over; only we own it.
        let notify = unsafe { OwnedFd::from_raw_fd(rx.recv().unwrap()) };
        let mut seen = 0;
        while !t.is_finished() {
            let mut fds = [PollFd::new(notify.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(50u16)).unwrap_or(0) == 0 {
                continue;
            }
            // SAFETY: a zeroed seccomp_notif is a valid buffer for the kernel to fill.
            let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
            // SAFETY: `req` is a seccomp_notif the kernel fills; the fd is a notify fd.
            if unsafe { libc::ioctl(notify.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) }
                != 0
            {
                continue;
            }
            at_bind();
            seen += 1;
            let resp = libc::seccomp_notif_resp {
                id: req.id,
                val: 0,
                error: 0,
                flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
            };
            // SAFETY: `resp` is a valid seccomp_notif_resp for the request just received.
            unsafe { libc::ioctl(notify.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) };
        }
        t.join().unwrap();
        seen
    }

    /// Binding never changes the process umask (it is process-wide: a snapshot creating files
    /// on another thread meanwhile would get it): seen from inside each `bind(2)`, and after,
    /// the umask is the one the process had. The socket still has exactly its mode.
    #[test]
    fn binding_leaves_the_process_umask_alone() {
        let before = umask_now();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let mut inside = Vec::new();
        let seen = observe_binds(
            move || {
                for i in 0..3 {
                    let p = d.join(format!("u{i}.sock"));
                    let mut l = Listener::bind_unix(&p, 0o640).unwrap();
                    l.publish().unwrap();
                    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                    assert_eq!(mode, 0o640);
                }
            },
            || inside.push(umask_now()),
        );
        assert!(seen >= 3, "binds not observed ({seen})");
        assert!(
            inside.iter().all(|&u| u == before),
            "the umask inside bind was {inside:?} (octal {:o}), the process's is {before:o}",
            inside.iter().max().copied().unwrap_or(0)
        );
        assert_eq!(umask_now(), before);
    }

    /// The staging folder is private, the socket never appears in the folder under a
    /// predictable name, and one a killed daemon left is cleaned up by the next bind.
    #[test]
    fn staging_folder_is_private_and_stale_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("st.sock");
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let l = Listener::bind_unix(&p, 0o666).unwrap();
        let staged: Vec<String> = names(dir.path())
            .into_iter()
            .filter(|n| n.starts_with(".st.sock.addcow-"))
            .collect();
        assert_eq!(staged.len(), 1, "{:?}", names(dir.path()));
        let stage = dir.path().join(&staged[0]);
        let m = std::fs::symlink_metadata(&stage).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        // A killed daemon: its staging folder stays behind (leak the listener's file).
        std::mem::forget(l);
        // The lock went with the process in real life; here the leaked lock is still held, so
        // free it by hand as the kernel would.
        std::fs::remove_file(lock_path(&p)).unwrap();
        let mut l2 = Listener::bind_unix(&p, 0o600).unwrap();
        assert!(!stage.exists(), "a stale staging folder was left");
        l2.publish().unwrap();
        assert_eq!(names(dir.path()), ["st.sock", "st.sock.lock"]);
    }

    /// The allow-list: the test's own uid listed lets it in; a list without it refuses the
    /// connection, closes it and counts it.
    #[test]
    fn peer_policy_lets_in_listed_peers_only() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        let me = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pol.sock");
        let mut l = Listener::bind_unix(&p, 0o600)
            .unwrap()
            .with_policy(Some(Arc::new(PeerPolicy::new(
                SocketKind::Vhost,
                &[me],
                &[],
            ))));
        l.publish().unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        assert!(l.accept().is_ok());
        let before = refused(SocketKind::Vhost);
        let other = me.wrapping_add(1);
        let l = l.with_policy(Some(Arc::new(PeerPolicy::new(
            SocketKind::Vhost,
            &[other],
            &[gid.wrapping_add(1)],
        ))));
        let mut c = UnixStream::connect(&p).unwrap();
        let e = l.accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(refused(SocketKind::Vhost) > before);
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).unwrap(), 0, "a refused peer is closed");
        // By group.
        let l = l.with_policy(Some(Arc::new(PeerPolicy::new(
            SocketKind::Vhost,
            &[other],
            &[gid],
        ))));
        let _c = UnixStream::connect(&p).unwrap();
        assert!(l.accept().is_ok());
        let peer = PeerCred::of(&UnixStream::pair().unwrap().0).unwrap();
        assert_eq!((peer.uid, peer.gid), (me, gid));
    }

    /// Listeners bound one after the other (each staging folder's descriptor closed before
    /// the next is made, so they get the same number) still have addresses of their own.
    #[test]
    fn no_two_listeners_share_an_address() {
        use nix::sys::socket::{getsockname, UnixAddr};
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Vec::new();
        for i in 0..3 {
            let mut l = Listener::bind_unix(&dir.path().join(format!("{i}.sock")), 0o600).unwrap();
            l.publish().unwrap();
            let a: UnixAddr = getsockname(l.as_raw_fd()).unwrap();
            assert!(!seen.contains(&a), "{a} bound twice");
            seen.push(a);
        }
    }

    #[test]
    fn remote_tcp_needs_allowing() {
        assert!(matches!(
            Listener::bind_tcp("0.0.0.0:0", false),
            Err(ListenError::Remote(_))
        ));
        assert!(Listener::bind_tcp("0.0.0.0:0", true).is_ok());
        assert!(Listener::bind_tcp("127.0.0.1:0", false).is_ok());
        // As systemd would pass it.
        let passed = Listener::Tcp(TcpListener::bind("0.0.0.0:0").unwrap());
        assert!(matches!(
            passed.check_remote(false),
            Err(ListenError::RemotePassed(_))
        ));
        assert!(passed.check_remote(true).is_ok());
        let lo = Listener::Tcp(TcpListener::bind("127.0.0.1:0").unwrap());
        assert!(lo.check_remote(false).is_ok());
    }
}
