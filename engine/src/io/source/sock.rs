//! Socket I/O a [`CoreSource`](crate::io::CoreSource) runs on its core's ring: the types a source
//! hands in and gets back ([`SockFd`], [`SendList`], [`SockDone`]). The ops themselves are
//! pushed with [`SourceCtx::recv`](crate::io::SourceCtx::recv) and
//! [`SourceCtx::send`](crate::io::SourceCtx::send); nothing here knows what the bytes mean.
//!
//! Ownership is the contract: a recv takes its [`IoBuf`] by value and a send its whole
//! [`SendList`] (header bytes and the `IoBuf`s it sends from); the op keeps them, and a clone of
//! the [`SockFd`], until its completion, when they come back to the source in [`SockDone`]. So
//! nothing the kernel reads or writes can be freed or reused while it may, and the descriptor
//! number cannot be closed and reused for another file while an SQE still names it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::io::uring::buf::IoBuf;

/// Most iovecs one `sendmsg` carries (`IOV_MAX`); a longer list is sent in several SQEs (the
/// first completion reports a short send, the source sends the rest).
pub(crate) const MAX_IOV: usize = 1024;

/// A socket shared by a source and its in-flight ops: closed when the last of them lets go.
#[derive(Debug, Clone)]
pub struct SockFd(Arc<OwnedFd>);

impl SockFd {
    /// Takes ownership of `fd`. The ring waits for readiness itself (a recv with no data waits
    /// in the kernel rather than failing with `EAGAIN`), so the descriptor may be blocking or
    /// not; but a socket read or write timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`) applies to an op
    /// the kernel runs in a blocking worker (rings without fast poll), which then fails with
    /// `EAGAIN`: clear them, or post again on `EAGAIN`.
    pub fn new(fd: OwnedFd) -> SockFd {
        SockFd(Arc::new(fd))
    }
}

impl AsRawFd for SockFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// One piece of a [`SendList`]: a range of its header bytes or of one of its buffers.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Head { at: usize, len: usize },
    Buf { index: usize, at: usize, len: usize },
    Static(&'static [u8]),
}

impl Piece {
    fn len(&self) -> usize {
        match *self {
            Piece::Head { len, .. } | Piece::Buf { len, .. } => len,
            Piece::Static(b) => b.len(),
        }
    }
}

/// Bytes to send in one `sendmsg`, in order: small copied pieces (headers) and ranges of
/// [`IoBuf`]s handed in by value (READ data, never copied). After a short send,
/// [`SendList::advance`] drops what went out and the rest can be sent again; when it is all
/// out, [`SendList::clear`] hands the buffers back and keeps the allocations for reuse.
///
/// Invariant: every piece lies inside its bytes (`head`, `bufs[index]` up to its length, or
/// its static slice),
/// `first <= pieces.len()`, and `skip` is less than the length of `pieces[first]` (0 when
/// `first == pieces.len()`).
#[derive(Debug, Default)]
pub struct SendList {
    head: Vec<u8>,
    bufs: Vec<IoBuf>,
    pieces: Vec<Piece>,
    first: usize,
    skip: usize,
    left: usize,
}

impl SendList {
    /// An empty list.
    pub fn new() -> SendList {
        SendList::default()
    }

    /// Appends a copy of `bytes`.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let at = self.head.len();
        self.head.extend_from_slice(bytes);
        match self.pieces.last_mut() {
            Some(Piece::Head { at: a, len }) if *a + *len == at => *len += bytes.len(),
            _ => self.pieces.push(Piece::Head {
                at,
                len: bytes.len(),
            }),
        }
        self.left += bytes.len();
    }

    /// Appends bytes that live for ever (a static page of zeros), without copying them.
    pub fn push_static(&mut self, bytes: &'static [u8]) {
        if !bytes.is_empty() {
            self.pieces.push(Piece::Static(bytes));
            self.left += bytes.len();
        }
    }

    /// Appends `buf[at..at + len]` (clamped to the buffer's length), keeping `buf` alive until
    /// the list is cleared.
    pub fn push_buf(&mut self, buf: IoBuf, at: usize, len: usize) {
        let held = self.hold(buf);
        self.push_held(held, at, len);
    }

    /// Keeps `buf` alive until the list is cleared, sending nothing of it yet: ranges of it go in
    /// with [`SendList::push_held`] (a READ's data between its chunk headers).
    pub fn hold(&mut self, buf: IoBuf) -> Held {
        self.bufs.push(buf);
        Held(self.bufs.len() - 1)
    }

    /// Appends `held[at..at + len]` (clamped to the buffer's length; nothing when `held` is not
    /// a buffer of this list).
    pub fn push_held(&mut self, held: Held, at: usize, len: usize) {
        let Some(buf) = self.bufs.get(held.0) else {
            return;
        };
        let at = at.min(buf.len());
        let len = len.min(buf.len() - at);
        if len > 0 {
            self.pieces.push(Piece::Buf {
                index: held.0,
                at,
                len,
            });
            self.left += len;
        }
    }

    /// A copy of the unsent bytes, in order (for tests and diagnostics; the ring never copies).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut iov = Vec::new();
        let mut out = Vec::with_capacity(self.left);
        let mut first = self.first;
        let mut skip = self.skip;
        while first < self.pieces.len() {
            self.iovecs_from(first, skip, &mut iov);
            for v in &iov {
                // SAFETY: the iovecs point into memory this list owns (or static bytes), alive
                // and unchanged while `self` is borrowed.
                out.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>().cast_const(), v.iov_len)
                });
            }
            first += iov.len();
            skip = 0;
        }
        out
    }

    /// Bytes not sent yet.
    pub fn len(&self) -> usize {
        self.left
    }

    /// Whether every byte went out (or none was added).
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    /// Marks the first `n` unsent bytes as sent (a send's result).
    pub fn advance(&mut self, mut n: usize) {
        n = n.min(self.left);
        self.left -= n;
        while n > 0 {
            let rest = self.pieces[self.first].len() - self.skip;
            if n < rest {
                self.skip += n;
                return;
            }
            n -= rest;
            self.first += 1;
            self.skip = 0;
        }
    }

    /// Empties the list and hands back its buffers (the header bytes' allocation is kept).
    pub fn clear(&mut self) -> std::vec::Drain<'_, IoBuf> {
        self.head.clear();
        self.pieces.clear();
        self.first = 0;
        self.skip = 0;
        self.left = 0;
        self.bufs.drain(..)
    }

    /// The iovecs of the unsent bytes, at most [`MAX_IOV`] of them, into `out` (cleared first).
    /// They point into heap memory the list owns; moving the list does not move it.
    pub(crate) fn iovecs(&self, out: &mut Vec<libc::iovec>) {
        self.iovecs_from(self.first, self.skip, out);
    }

    fn iovecs_from(&self, first: usize, skip0: usize, out: &mut Vec<libc::iovec>) {
        out.clear();
        for (i, p) in self.pieces[first..].iter().take(MAX_IOV).enumerate() {
            let skip = if i == 0 { skip0 } else { 0 };
            let (base, at, len) = match *p {
                Piece::Head { at, len } => (self.head.as_ptr(), at, len),
                Piece::Buf { index, at, len } => (self.bufs[index].raw_ptr().cast_const(), at, len),
                Piece::Static(b) => (b.as_ptr(), 0, b.len()),
            };
            out.push(libc::iovec {
                // `at + skip` is inside the bytes (invariant): wrapping_add computes the
                // address without asserting anything about it.
                iov_base: base.wrapping_add(at + skip).cast_mut().cast(),
                iov_len: len - skip,
            });
        }
    }
}

/// A buffer a [`SendList`] holds ([`SendList::hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held(usize);

/// A socket op's end, with what the op held handed back.
#[derive(Debug)]
pub enum SockDone {
    /// A recv into `buf[at..]`: `Ok(0)` is the peer's end of stream; `Ok(n)` filled
    /// `buf[at..at + n]`.
    Recv {
        buf: IoBuf,
        at: usize,
        result: std::io::Result<usize>,
    },
    /// A send of `list`'s unsent bytes: `Ok(n)` sent its first `n` (maybe fewer than all: the
    /// list is not advanced, the source decides).
    Send {
        list: SendList,
        result: std::io::Result<usize>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gathered(list: &SendList) -> Vec<u8> {
        list.to_vec()
    }

    #[test]
    fn a_send_list_gathers_its_pieces_in_order_and_advances_across_them() {
        let mut l = SendList::new();
        l.push_bytes(b"ab");
        l.push_bytes(b"cd");
        l.push_buf(IoBuf::from_slice(b"0123456789"), 2, 5);
        l.push_bytes(b"XY");
        l.push_buf(IoBuf::from_slice(b"zz"), 0, 99);
        l.push_static(b"00");
        let held = l.hold(IoBuf::from_slice(b"abcdef"));
        l.push_held(held, 0, 1);
        l.push_bytes(b"");
        l.push_held(held, 4, 2);
        assert_eq!(l.len(), 2 + 2 + 5 + 2 + 2 + 2 + 3);
        assert_eq!(gathered(&l), b"abcd23456XYzz00aef");
        l.advance(3);
        assert_eq!(gathered(&l), b"d23456XYzz00aef");
        l.advance(1);
        assert_eq!(gathered(&l), b"23456XYzz00aef");
        l.advance(6);
        assert_eq!(gathered(&l), b"Yzz00aef");
        l.advance(4);
        assert_eq!(gathered(&l), b"0aef");
        l.advance(100);
        assert!(l.is_empty());
        assert!(gathered(&l).is_empty());
        assert_eq!(l.clear().count(), 3, "every buffer comes back");
        l.push_bytes(b"again");
        assert_eq!(gathered(&l), b"again");
    }

    #[test]
    fn a_send_list_carries_at_most_iov_max_iovecs_at_once() {
        let mut l = SendList::new();
        for _ in 0..MAX_IOV + 10 {
            l.push_buf(IoBuf::from_slice(b"x"), 0, 1);
        }
        let mut iov = Vec::new();
        l.iovecs(&mut iov);
        assert_eq!(iov.len(), MAX_IOV);
        assert_eq!(
            l.to_vec().len(),
            MAX_IOV + 10,
            "to_vec sees past one sendmsg's worth"
        );
        l.advance(MAX_IOV);
        l.iovecs(&mut iov);
        assert_eq!(iov.len(), 10);
    }
}
