//! The operating-system calls the engine and the daemon make outside the io_uring ring, its
//! buffers and the bitmap, each written once: OFD locks, `statx` direct-I/O alignment,
//! `fallocate`, `SEEK_DATA`/`SEEK_HOLE`, the `O_DIRECT` check and eventfds.
//!
//! Every function borrows its descriptor ([`AsFd`]), so none can outlive or close it. The plain
//! calls return [`std::io::Result`] with the OS error, like `std`: the caller knows the path and
//! the operation, and wraps the error with both ([`Error::io`]`(op, e).with_path(path)`). The
//! locks, whose "someone else holds it" is an answer rather than a failure, say so in their
//! result ([`ofd_try_lock`]) or as [`ErrorKind::Locked`] ([`ofd_lock`]).
//!
//! `nix` makes the calls where it has them; `statx`, which it lacks, is the only call here that
//! needs `unsafe`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FallocateFlags, FcntlArg, OFlag};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::unistd::{lseek, Whence};

use crate::error::{Error, ErrorKind, Result};

/// Which OFD lock to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A read lock (`F_RDLCK`): any number of open file descriptions may hold one at once.
    Shared,
    /// A write lock (`F_WRLCK`): conflicts with every other lock on the same bytes.
    Exclusive,
}

impl LockKind {
    /// `Exclusive` when `write`, else `Shared`.
    pub fn for_write(write: bool) -> LockKind {
        if write {
            LockKind::Exclusive
        } else {
            LockKind::Shared
        }
    }

    fn l_type(self) -> libc::c_short {
        (match self {
            LockKind::Shared => libc::F_RDLCK,
            LockKind::Exclusive => libc::F_WRLCK,
        }) as libc::c_short
    }
}

/// A byte range for an OFD lock: `start` and `len` as `fcntl` takes them (`len` 0: to the end
/// of the file, however long it grows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRange {
    /// First byte.
    pub start: i64,
    /// Number of bytes; 0 for "to the end of the file".
    pub len: i64,
}

impl LockRange {
    /// The whole file, including bytes appended later.
    pub const WHOLE: LockRange = LockRange { start: 0, len: 0 };

    /// The single byte at `at`.
    pub fn byte(at: i64) -> LockRange {
        LockRange { start: at, len: 1 }
    }
}

/// A `flock` for `l_type` over `range` (`l_pid` 0, as OFD locks require).
fn flock(l_type: libc::c_short, range: LockRange) -> libc::flock {
    libc::flock {
        l_type,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: range.start,
        l_len: range.len,
        l_pid: 0,
    }
}

/// Tries to take an OFD lock (`F_OFD_SETLK`, never waiting) of `kind` on `range` of `fd`.
/// `Ok(false)`: another open file description holds a conflicting lock. An OFD lock belongs to
/// the open file description: it is dropped when the last descriptor of it is closed, and two
/// opens of one file in the same process conflict like two processes do.
pub fn ofd_try_lock(fd: impl AsFd, kind: LockKind, range: LockRange) -> std::io::Result<bool> {
    let fl = flock(kind.l_type(), range);
    match fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Takes an OFD lock of `kind` on the whole of `fd` without waiting. A lock held by someone
/// else is [`ErrorKind::Locked`] (op "lock for writing"/"lock for reading"); any other failure
/// is an [`ErrorKind::Io`] with op "lock". The caller adds the path.
pub fn ofd_lock(fd: impl AsFd, kind: LockKind) -> Result<()> {
    match ofd_try_lock(fd, kind, LockRange::WHOLE) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::new(ErrorKind::Locked).with_op(match kind {
            LockKind::Exclusive => "lock for writing",
            LockKind::Shared => "lock for reading",
        })),
        Err(e) => Err(Error::io("lock", e)),
    }
}

/// Whether another open file description holds a lock on `range` of `fd` that conflicts with
/// one of `kind` (`F_OFD_GETLK`; nothing is taken).
pub fn ofd_conflicts(fd: impl AsFd, kind: LockKind, range: LockRange) -> std::io::Result<bool> {
    let mut fl = flock(kind.l_type(), range);
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Drops every OFD lock this open file description holds on `fd` (a no-op when none is held;
/// an error, which cannot happen on an open descriptor, is ignored: closing it drops them too).
pub fn ofd_unlock(fd: impl AsFd) {
    let fl = flock(libc::F_UNLCK as libc::c_short, LockRange::WHOLE);
    let _ = fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl));
}

/// What `statx(STATX_DIOALIGN)` reports for direct I/O on a file: 0 in both means the file
/// does not support `O_DIRECT` at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatxDioAlign {
    /// Required alignment of buffer addresses, in bytes.
    pub mem: u32,
    /// Required alignment of file offsets and lengths, in bytes.
    pub offset: u32,
}

/// The direct-I/O alignment the kernel reports for `fd`, or `None` when it reports none (a
/// kernel before 6.1, a file system that does not fill it in, or a failed `statx`).
pub fn dio_alignment(fd: impl AsFd) -> Option<StatxDioAlign> {
    // SAFETY: statx is plain old data for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is borrowed, so open for the call; the path is a valid empty C
    // string, which AT_EMPTY_PATH makes statx read as "the descriptor itself"; `stx` is a
    // valid out pointer that outlives the call.
    let rc = unsafe {
        libc::statx(
            fd.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0).then_some(StatxDioAlign {
        mem: stx.stx_dio_mem_align,
        offset: stx.stx_dio_offset_align,
    })
}

/// Whether `fd` was opened with `O_DIRECT` (`fcntl(F_GETFL)`; false when that fails).
pub fn is_o_direct(fd: impl AsFd) -> bool {
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_GETFL)
        .is_ok_and(|flags| OFlag::from_bits_retain(flags).contains(OFlag::O_DIRECT))
}

/// `offset` and `len` as `off_t`s, or EFBIG.
fn off_range(offset: u64, len: u64) -> std::io::Result<(libc::off_t, libc::off_t)> {
    match (libc::off_t::try_from(offset), libc::off_t::try_from(len)) {
        (Ok(o), Ok(l)) => Ok((o, l)),
        _ => Err(std::io::Error::from_raw_os_error(libc::EFBIG)),
    }
}

/// Allocates the blocks of `[offset, offset + len)` of `fd` (`fallocate` mode 0): later writes
/// there cannot fail with ENOSPC; the contents do not change, and the file grows to
/// `offset + len` if it was shorter. EOPNOTSUPP comes back as is (the caller decides whether a
/// file system without `fallocate` matters). `len` 0 is EINVAL, as for the call.
pub fn allocate(fd: impl AsFd, offset: u64, len: u64) -> std::io::Result<()> {
    let (o, l) = off_range(offset, len)?;
    nix::fcntl::fallocate(fd.as_fd().as_raw_fd(), FallocateFlags::empty(), o, l)?;
    Ok(())
}

/// Deallocates `[offset, offset + len)` of `fd`, which then reads as zeros, keeping the file's
/// size (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`). EOPNOTSUPP comes back as is.
pub fn punch_hole(fd: impl AsFd, offset: u64, len: u64) -> std::io::Result<()> {
    let (o, l) = off_range(offset, len)?;
    nix::fcntl::fallocate(
        fd.as_fd().as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        o,
        l,
    )?;
    Ok(())
}

/// `lseek(fd, from, whence)`: `None` on ENXIO (`from` at or past the end, or for SEEK_DATA no
/// data after it); other errors as they come, with no fallback. `from` past `off_t` is EINVAL.
fn seek(fd: impl AsFd, from: u64, whence: Whence) -> std::io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(from) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // This moves the file position: callers must not rely on it (the engine's and the daemon's
    // reads and writes of the files they walk are positioned: pread/pwrite and ring ops).
    match lseek(fd.as_fd().as_raw_fd(), off, whence) {
        Ok(at) => Ok(Some(at as u64)),
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The first offset at or after `from` that holds data (`lseek(SEEK_DATA)`), `None` when none
/// does (ENXIO). A file system without `SEEK_DATA` is an error here (EINVAL/EOPNOTSUPP); see
/// [`next_data`] for the walk that treats it as all data.
pub fn seek_data(fd: impl AsFd, from: u64) -> std::io::Result<Option<u64>> {
    seek(fd, from, Whence::SeekData)
}

/// The first hole at or after `from` (`lseek(SEEK_HOLE)`; the end of the file counts as one),
/// `None` when `from` is at or past the end (ENXIO). Errors as for [`seek_data`].
pub fn seek_hole(fd: impl AsFd, from: u64) -> std::io::Result<Option<u64>> {
    seek(fd, from, Whence::SeekHole)
}

/// For walks over a file's data: the next offset at or after `from` that holds data, or `None`
/// if only a hole follows (or `from` is past what `off_t` holds). A file system without
/// `SEEK_DATA` reports everything as data (`Some(from)`).
pub fn next_data(fd: impl AsFd, from: u64) -> std::io::Result<Option<u64>> {
    if libc::off_t::try_from(from).is_err() {
        return Ok(None);
    }
    match seek_data(fd, from) {
        Ok(at) => Ok(at),
        Err(e) => match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(from)),
            _ => Err(e),
        },
    }
}

/// For walks over a file's data: the next hole at or after `from`, `file_len` when there is
/// none (or the file system has no `SEEK_HOLE`, or `from` is past what `off_t` holds).
pub fn next_hole(fd: impl AsFd, from: u64, file_len: u64) -> std::io::Result<u64> {
    if libc::off_t::try_from(from).is_err() {
        return Ok(file_len);
    }
    match seek_hole(fd, from) {
        Ok(Some(at)) => Ok(at),
        Ok(None) => Ok(file_len),
        Err(e) => match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(file_len),
            _ => Err(e),
        },
    }
}

/// Whether an eventfd's reads and writes wait ([`eventfd`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFdMode {
    /// Reads wait for a count (the ring reads it this way).
    Blocking,
    /// Reads of a zero count fail with EAGAIN (`EFD_NONBLOCK`).
    NonBlocking,
}

/// A new eventfd (count 0, close-on-exec).
pub fn eventfd(mode: EventFdMode) -> std::io::Result<OwnedFd> {
    let flags = match mode {
        EventFdMode::Blocking => EfdFlags::EFD_CLOEXEC,
        EventFdMode::NonBlocking => EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
    };
    Ok(EventFd::from_flags(flags)?.into())
}

/// Adds 1 to the count of the eventfd `fd`, waking whoever waits on it. A failure (the count
/// at its maximum, which leaves the reader woken anyway) is ignored.
pub fn eventfd_signal(fd: impl AsFd) {
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::*;

    fn reopen(f: &tempfile::NamedTempFile) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap()
    }

    #[test]
    fn ofd_locks_conflict_between_open_file_descriptions() {
        let t = tempfile::NamedTempFile::new().unwrap();
        let (a, b, c) = (reopen(&t), reopen(&t), reopen(&t));
        assert!(ofd_try_lock(&a, LockKind::Shared, LockRange::WHOLE).unwrap());
        assert!(ofd_try_lock(&b, LockKind::Shared, LockRange::WHOLE).unwrap());
        assert!(!ofd_try_lock(&c, LockKind::Exclusive, LockRange::WHOLE).unwrap());
        assert!(ofd_conflicts(&c, LockKind::Exclusive, LockRange::byte(7)).unwrap());
        assert_eq!(
            ofd_lock(&c, LockKind::Exclusive).unwrap_err().kind(),
            &ErrorKind::Locked
        );
        ofd_unlock(&a);
        ofd_unlock(&b);
        assert!(!ofd_conflicts(&c, LockKind::Exclusive, LockRange::byte(7)).unwrap());
        ofd_lock(&c, LockKind::Exclusive).unwrap();
        // A byte-range lock conflicts only on its bytes.
        ofd_unlock(&c);
        assert!(ofd_try_lock(&a, LockKind::Exclusive, LockRange::byte(100)).unwrap());
        assert!(ofd_try_lock(&b, LockKind::Exclusive, LockRange::byte(101)).unwrap());
        assert!(ofd_conflicts(&c, LockKind::Shared, LockRange::byte(100)).unwrap());
        assert!(!ofd_conflicts(&c, LockKind::Shared, LockRange::byte(102)).unwrap());
    }

    #[test]
    fn data_and_holes_of_a_sparse_file() {
        let mut f = tempfile::tempfile().unwrap();
        const MIB: u64 = 1 << 20;
        f.set_len(4 * MIB).unwrap();
        f.write_all_at(&[1u8; 4096], 2 * MIB).unwrap();
        f.flush().unwrap();
        let d = next_data(&f, 0).unwrap().unwrap();
        // Either the file system reports the hole, or (no SEEK_DATA) everything is data.
        assert!(d == 2 * MIB || d == 0, "{d}");
        let h = next_hole(&f, 2 * MIB, 4 * MIB).unwrap();
        assert!(h > 2 * MIB && h <= 4 * MIB, "{h}");
        assert_eq!(seek_hole(&f, 5 * MIB).unwrap(), None);
        assert_eq!(next_hole(&f, 5 * MIB, 4 * MIB).unwrap(), 4 * MIB);
        assert_eq!(next_data(&f, u64::MAX).unwrap(), None);
        if d == 2 * MIB {
            assert_eq!(seek_data(&f, 3 * MIB).unwrap(), None);
        }
    }

    #[test]
    fn allocate_and_punch() {
        let f = tempfile::tempfile().unwrap();
        match allocate(&f, 0, 8192) {
            Ok(()) => assert_eq!(f.metadata().unwrap().len(), 8192),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP)),
        }
        f.set_len(8192).unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        if punch_hole(&f, 0, 4096).is_ok() {
            let mut b = [9u8; 4096];
            f.read_exact_at(&mut b, 0).unwrap();
            assert!(b.iter().all(|&x| x == 0));
            assert_eq!(f.metadata().unwrap().len(), 8192);
        }
        assert_eq!(
            allocate(&f, u64::MAX, 1).unwrap_err().raw_os_error(),
            Some(libc::EFBIG)
        );
    }

    #[test]
    fn o_direct_and_alignment() {
        let f = tempfile::tempfile().unwrap();
        assert!(!is_o_direct(&f));
        if let Some(a) = dio_alignment(&f) {
            assert!(a.mem == 0 || a.mem.is_power_of_two());
        }
    }

    #[test]
    fn eventfd_counts_signals() {
        use std::io::Read;
        let fd = eventfd(EventFdMode::NonBlocking).unwrap();
        let mut f = std::fs::File::from(fd);
        let mut count = [0u8; 8];
        assert_eq!(
            f.read(&mut count).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        eventfd_signal(&f);
        eventfd_signal(&f);
        assert_eq!(f.read(&mut count).unwrap(), 8);
        assert_eq!(u64::from_ne_bytes(count), 2);
    }
}
