//! Who the frontend is: the connection the `vhost-user-backend` library accepted, found
//! among the process's descriptors, so that its peer's credentials can be checked against the
//! socket's [`PeerPolicy`].
//!
//! The library accepts the connection itself (`VhostUserDaemon::start` takes the listener and
//! keeps the stream private), so the daemon cannot check the peer at accept as it does for NBD
//! and control. Instead the device starts gated (its queues serve nothing, see
//! `BlkDevice::authorize`), and right after the accept the listener thread looks for the new
//! connection in `/proc/self/fd`: a connected (not listening) Unix stream socket whose local
//! address is the listener's (an accepted socket carries its listener's address, and no two
//! listeners of the process share one: see `conn::listener`) and that was not there before the
//! accept ([`Snapshot`]). Exactly one such socket must be new: the previous frontend's
//! connection belongs to a library thread that was joined, and its handler dropped, before
//! the next accept, and only this thread accepts on the listener. Anything else (none: the
//! frontend already went; more than one) is refused, never guessed.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};

use crate::conn::listener::PeerPolicy;

/// The connections of one listener open before an accept (their socket inodes).
pub struct Snapshot {
    addr: UnixAddr,
    before: HashSet<u64>,
}

impl Snapshot {
    /// The connections accepted from `listener` that are open now.
    pub fn take(listener: &UnixListener) -> io::Result<Snapshot> {
        let addr: UnixAddr = getsockname(listener.as_raw_fd())?;
        let before = connections(&addr)?
            .into_iter()
            .map(|(ino, _)| ino)
            .collect();
        Ok(Snapshot { addr, before })
    }

    /// Checks the one connection accepted since the snapshot against `policy`: true lets it
    /// in; false (refused, or not exactly one new connection found) was logged and counted,
    /// and the caller ends the connection.
    pub fn admit(&self, policy: &PeerPolicy) -> bool {
        let mut new: Vec<OwnedFd> = match connections(&self.addr) {
            Ok(all) => all
                .into_iter()
                .filter(|(ino, _)| !self.before.contains(ino))
                .map(|(_, fd)| fd)
                .collect(),
            Err(e) => {
                policy.refuse_unidentified(&format!("listing the process's sockets: {e}"));
                return false;
            }
        };
        match (new.pop(), new.len()) {
            (Some(fd), 0) => policy.admit(&fd).is_ok(),
            (None, _) => {
                policy.refuse_unidentified("the accepted connection is gone already");
                false
            }
            (Some(_), more) => {
                policy.refuse_unidentified(&format!(
                    "{} new connections to the socket, not one",
                    more + 1
                ));
                false
            }
        }
    }
}

/// This process's connected Unix stream sockets whose local address is `addr`: each socket
/// once (the library holds several descriptors of its connection), as its inode and a
/// duplicate of one of its descriptors (ours: a number closed and reused by another thread
/// meanwhile cannot make it name another socket).
fn connections(addr: &UnixAddr) -> io::Result<Vec<(u64, OwnedFd)>> {
    let mut out: Vec<(u64, OwnedFd)> = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // `socket:[INODE]` for a socket; anything else (or a number closed meanwhile) is not
        // one of ours.
        let Some(ino) = std::fs::read_link(entry.path()).ok().and_then(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        }) else {
            continue;
        };
        if out.iter().any(|(seen, _)| *seen == ino) {
            continue;
        }
        // SAFETY: F_DUPFD_CLOEXEC only reads the number; on success the new descriptor is ours
        // alone (owned by the OwnedFd below). A number closed meanwhile fails with EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` was just returned by fcntl and nothing else owns it.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        // The number may name another file by now: everything is checked on the duplicate.
        let same = nix::sys::stat::fstat(dup.as_raw_fd()).is_ok_and(|st| st.st_ino == ino);
        if same
            && getsockname::<UnixAddr>(dup.as_raw_fd()).is_ok_and(|a| &a == addr)
            && getsockopt(&dup, sockopt::SockType).is_ok_and(|t| t == SockType::Stream)
            && getsockopt(&dup, sockopt::AcceptConn).is_ok_and(|listening| !listening)
        {
            out.push((ino, dup));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::listener::{refused, SocketKind};
    use std::os::unix::net::UnixStream;

    /// The accepted connection is told apart from the listener, from connections open before,
    /// and from the client's end; the policy decides on its peer.
    #[test]
    fn the_new_connection_is_found_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let _c1 = UnixStream::connect(&path).unwrap();
        let (a1, _) = l.accept().unwrap();
        // A second descriptor of the same connection (as the library keeps) is one connection.
        let _a1_dup = a1.try_clone().unwrap();
        let snap = Snapshot::take(&l).unwrap();
        assert_eq!(snap.before.len(), 1, "the connection open before");
        let me = nix::unistd::geteuid().as_raw();
        let allow = PeerPolicy::new(SocketKind::Vhost, &[me], &[]);
        let deny = PeerPolicy::new(SocketKind::Vhost, &[me.wrapping_add(1)], &[]);
        let before = refused(SocketKind::Vhost);
        // Nothing accepted since: refused (counted), never guessed.
        assert!(!snap.admit(&allow));
        let after_none = refused(SocketKind::Vhost);
        assert!(after_none > before, "counted");
        let _c2 = UnixStream::connect(&path).unwrap();
        let (a2, _) = l.accept().unwrap();
        let _a2_dup = a2.try_clone().unwrap();
        assert!(snap.admit(&allow));
        assert!(!snap.admit(&deny));
        assert!(refused(SocketKind::Vhost) > after_none, "counted");
        // Two new ones: refused.
        let _c3 = UnixStream::connect(&path).unwrap();
        let (_a3, _) = l.accept().unwrap();
        assert!(!snap.admit(&allow));
    }
}
