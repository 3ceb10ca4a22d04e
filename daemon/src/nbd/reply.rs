//! Replies: what a finished request answers ([`Reply`]), how it is framed on the wire (simple
//! replies, structured chunks or extended-header chunks), and sending a batch of replies with as
//! few `sendmsg` calls as the iovec limit allows (`MSG_MORE` between calls).

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};

use addcow_engine::{Done, IoBuf, RequestError, SendList};

use super::wire;

/// 64 KiB of zeros, the source of hole bytes in simple replies and DF reads.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Most slices handed to one `sendmsg` (below Linux's `IOV_MAX` of 1024).
const MAX_IOV: usize = 512;

/// What a request is answered with.
#[derive(Debug)]
pub enum Body {
    /// Success without payload.
    Ok,
    /// Failure: NBD error value and a message (sent in structured mode).
    Error { error: u32, message: String },
    /// A READ's data. `holes`: absolute `(offset, len)` ranges inside the request that read as
    /// zeros without touching a disk, in order (sent as `OFFSET_HOLE` chunks unless `df`).
    Read {
        offset: u64,
        data: IoBuf,
        holes: Vec<(u64, u64)>,
        df: bool,
    },
    /// A READ that is entirely a hole: no buffer was needed.
    Zeros { offset: u64, len: u32, df: bool },
    /// BLOCK_STATUS: per selected context, its id and `(length, flags)` extents.
    BlockStatus {
        contexts: Vec<(u32, Vec<(u64, u32)>)>,
    },
}

/// A reply to the request with `cookie`.
#[derive(Debug)]
pub struct Reply {
    /// The request's cookie.
    pub cookie: u64,
    /// The request's offset (echoed in extended reply headers).
    pub offset: u64,
    /// The answer.
    pub body: Body,
}

/// One piece of a framed reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    /// `headers[start..end]`.
    Head(usize, usize),
    /// `data[start..end]` of the READ buffer.
    Data(usize, usize),
    /// That many zero bytes.
    Zeros(usize),
}

/// A reply framed as header bytes plus segments pointing into them and into the data.
#[derive(Debug, Default)]
struct Framed {
    headers: Vec<u8>,
    segs: Vec<Seg>,
}

impl Framed {
    fn head(&mut self, bytes: &[u8]) {
        let start = self.headers.len();
        self.headers.extend_from_slice(bytes);
        let end = self.headers.len();
        match self.segs.last_mut() {
            Some(Seg::Head(_, e)) if *e == start => *e = end,
            _ => self.segs.push(Seg::Head(start, end)),
        }
    }
}

/// How replies are framed on a connection, fixed by the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// 16-byte simple replies only.
    Simple,
    /// Structured replies: READ and BLOCK_STATUS as 20-byte-header chunks, the rest simple.
    Structured,
    /// Extended headers: every reply is 32-byte-header chunks.
    Extended,
}

/// Builds the chunks of one reply.
struct Framer {
    f: Framed,
    mode: Framing,
    cookie: u64,
    req_offset: u64,
}

impl Framer {
    /// A chunk header (20 bytes, or 32 with extended headers).
    fn chunk(&mut self, done: bool, kind: u16, len: u64) {
        let flags = if done { wire::REPLY_FLAG_DONE } else { 0 };
        if self.mode == Framing::Extended {
            let h = wire::extended_header(flags, kind, self.cookie, self.req_offset, len);
            self.f.head(&h);
        } else {
            let h = wire::chunk_header(flags, kind, self.cookie, len as u32);
            self.f.head(&h);
        }
    }

    fn data(&mut self, offset: u64, len: usize, done: bool) {
        self.chunk(done, wire::REPLY_TYPE_OFFSET_DATA, 8 + len as u64);
        self.f.head(&offset.to_be_bytes());
    }

    fn hole(&mut self, offset: u64, len: u64, done: bool) {
        self.chunk(done, wire::REPLY_TYPE_OFFSET_HOLE, 12);
        self.f.head(&offset.to_be_bytes());
        self.f.head(&(len as u32).to_be_bytes());
    }

    /// Success without payload: a simple reply, or a NONE chunk with extended headers.
    fn ok(&mut self) {
        if self.mode == Framing::Extended {
            self.chunk(true, wire::REPLY_TYPE_NONE, 0);
        } else {
            self.f.head(&wire::simple_reply(0, self.cookie));
        }
    }
}

/// Frames `reply` for a connection with framing `mode`.
fn frame(mode: Framing, reply: &Reply) -> Framed {
    let cookie = reply.cookie;
    if mode == Framing::Simple {
        let mut f = Framed::default();
        match &reply.body {
            Body::Ok => f.head(&wire::simple_reply(0, cookie)),
            Body::Error { error, .. } => f.head(&wire::simple_reply(*error, cookie)),
            Body::Read { data, .. } => {
                f.head(&wire::simple_reply(0, cookie));
                f.segs.push(Seg::Data(0, data.len()));
            }
            Body::Zeros { len, .. } => {
                f.head(&wire::simple_reply(0, cookie));
                f.segs.push(Seg::Zeros(*len as usize));
            }
            // Unreachable by validation (needs structured replies); answer safely anyway.
            Body::BlockStatus { .. } => f.head(&wire::simple_reply(wire::NBD_EINVAL, cookie)),
        }
        return f;
    }
    let mut fr = Framer {
        f: Framed::default(),
        mode,
        cookie,
        req_offset: reply.offset,
    };
    match &reply.body {
        Body::Ok => fr.ok(),
        Body::Error { error, message } => {
            let msg = wire::cut(message, 1024);
            fr.chunk(true, wire::REPLY_TYPE_ERROR, 6 + msg.len() as u64);
            fr.f.head(&error.to_be_bytes());
            fr.f.head(&(msg.len() as u16).to_be_bytes());
            fr.f.head(msg.as_bytes());
        }
        Body::Zeros { offset, len, df } => {
            if *len == 0 {
                fr.chunk(true, wire::REPLY_TYPE_NONE, 0);
            } else if *df {
                fr.data(*offset, *len as usize, true);
                fr.f.segs.push(Seg::Zeros(*len as usize));
            } else {
                fr.hole(*offset, u64::from(*len), true);
            }
        }
        Body::Read {
            offset,
            data,
            holes,
            df,
        } => {
            if data.is_empty() {
                fr.chunk(true, wire::REPLY_TYPE_NONE, 0);
            } else if *df || holes.is_empty() {
                fr.data(*offset, data.len(), true);
                fr.f.segs.push(Seg::Data(0, data.len()));
            } else {
                // Alternate data runs and holes; the last chunk carries DONE.
                let end = offset + data.len() as u64;
                let mut pos = *offset;
                let mut holes = holes.iter().peekable();
                while pos < end {
                    match holes.peek() {
                        Some(&&(h, hl)) if h <= pos => {
                            holes.next();
                            let hend = (h + hl).min(end);
                            if hend > pos {
                                fr.hole(pos, hend - pos, hend == end);
                                pos = hend;
                            }
                        }
                        next => {
                            let dend = next.map_or(end, |&&(h, _)| h.min(end));
                            let (a, b) = ((pos - offset) as usize, (dend - offset) as usize);
                            fr.data(pos, b - a, dend == end);
                            fr.f.segs.push(Seg::Data(a, b));
                            pos = dend;
                        }
                    }
                }
            }
        }
        Body::BlockStatus { contexts } => {
            for (i, (id, extents)) in contexts.iter().enumerate() {
                let last = i + 1 == contexts.len();
                let n = extents.len() as u64;
                if mode == Framing::Extended {
                    fr.chunk(last, wire::REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * n);
                    fr.f.head(&id.to_be_bytes());
                    fr.f.head(&(n as u32).to_be_bytes());
                    for (len, flags) in extents {
                        fr.f.head(&len.to_be_bytes());
                        fr.f.head(&u64::from(*flags).to_be_bytes());
                    }
                } else {
                    fr.chunk(last, wire::REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
                    fr.f.head(&id.to_be_bytes());
                    for (len, flags) in extents {
                        // Compact requests are under 4 GiB, so are their extents.
                        let l = u32::try_from(*len).unwrap_or(u32::MAX);
                        fr.f.head(&l.to_be_bytes());
                        fr.f.head(&flags.to_be_bytes());
                    }
                }
            }
            if contexts.is_empty() {
                fr.chunk(true, wire::REPLY_TYPE_NONE, 0);
            }
        }
    }
    fr.f
}

/// The slices of a framed reply, in order.
fn slices<'a>(f: &'a Framed, data: Option<&'a [u8]>) -> Vec<IoSlice<'a>> {
    let mut out = Vec::with_capacity(f.segs.len() + 4);
    for seg in &f.segs {
        match *seg {
            Seg::Head(a, b) => out.push(IoSlice::new(&f.headers[a..b])),
            Seg::Data(a, b) => {
                if let Some(d) = data.and_then(|d| d.get(a..b)) {
                    out.push(IoSlice::new(d));
                }
            }
            Seg::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(ZEROS.len());
                    out.push(IoSlice::new(&ZEROS[..k]));
                    n -= k;
                }
            }
        }
    }
    out
}

fn reply_data(reply: &Reply) -> Option<&[u8]> {
    match &reply.body {
        Body::Read { data, .. } => Some(data),
        _ => None,
    }
}

/// Appends `reply`, framed for `mode`, to `list` for one `sendmsg` on a core's ring: the
/// header bytes are copied, a READ's data buffer is moved in (never copied) with the ranges
/// around its holes, and zeros come from a static page. The same bytes as [`send_many`] sends.
pub fn gather(mode: Framing, reply: Reply, list: &mut SendList) {
    let f = frame(mode, &reply);
    let held = match reply.body {
        Body::Read { data, .. } => Some(list.hold(data)),
        _ => None,
    };
    for seg in &f.segs {
        match *seg {
            Seg::Head(a, b) => list.push_bytes(&f.headers[a..b]),
            Seg::Data(a, b) => {
                if let Some(h) = held {
                    list.push_held(h, a, b - a);
                }
            }
            Seg::Zeros(mut n) => {
                while n > 0 {
                    let k = n.min(ZEROS.len());
                    list.push_static(&ZEROS[..k]);
                    n -= k;
                }
            }
        }
    }
}

/// The reply's bytes in one vector (for tests).
#[cfg(test)]
pub fn encode(mode: Framing, reply: &Reply) -> Vec<u8> {
    let f = frame(mode, reply);
    let mut v = Vec::new();
    for s in slices(&f, reply_data(reply)) {
        v.extend_from_slice(&s);
    }
    v
}

/// Sends several replies back to back in as few `sendmsg` calls as possible (the writer
/// batches what completed while it was busy sending).
pub fn send_many(sock: &impl AsRawFd, mode: Framing, replies: &[Reply]) -> io::Result<()> {
    let framed: Vec<Framed> = replies.iter().map(|r| frame(mode, r)).collect();
    let mut all = Vec::new();
    for (f, r) in framed.iter().zip(replies) {
        all.extend(slices(f, reply_data(r)));
    }
    send_all(sock.as_raw_fd(), &all)
}

/// Sends several replies back to back through `write` (a TLS session, which encrypts each
/// call into records): header-sized pieces are gathered into one buffer of up to
/// [`COALESCE`] bytes so that they do not each become a record; large data slices go as they
/// are. The same bytes as [`send_many`] sends.
pub fn write_many(
    write: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    mode: Framing,
    replies: &[Reply],
) -> io::Result<()> {
    let mut pending: Vec<u8> = Vec::with_capacity(COALESCE);
    for r in replies {
        let f = frame(mode, r);
        for s in slices(&f, reply_data(r)) {
            if pending.len() + s.len() <= COALESCE {
                pending.extend_from_slice(&s);
                continue;
            }
            if !pending.is_empty() {
                write(&pending)?;
                pending.clear();
            }
            if s.len() <= COALESCE {
                pending.extend_from_slice(&s);
            } else {
                write(&s)?;
            }
        }
    }
    if !pending.is_empty() {
        write(&pending)?;
    }
    Ok(())
}

/// Bytes [`write_many`] gathers before writing: one TLS record's worth.
pub const COALESCE: usize = 16 << 10;

/// Writes every byte of `parts` to `fd`, resuming after partial writes.
fn send_all(fd: RawFd, parts: &[IoSlice<'_>]) -> io::Result<()> {
    let mut idx = 0; // first slice not fully sent
    let mut off = 0; // bytes of parts[idx] already sent
    while idx < parts.len() {
        let end = (idx + MAX_IOV).min(parts.len());
        let mut batch: Vec<IoSlice<'_>> = Vec::with_capacity(end - idx);
        batch.push(IoSlice::new(&parts[idx][off..]));
        batch.extend(parts[idx + 1..end].iter().map(|s| IoSlice::new(s)));
        let mut flags = nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
        if end < parts.len() {
            flags |= nix::sys::socket::MsgFlags::from_bits_retain(libc::MSG_MORE);
        }
        let n = match nix::sys::socket::sendmsg::<()>(fd, &batch, &[], flags, None) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "socket took nothing",
            ));
        }
        // Advance (idx, off) by n bytes.
        let mut left = n;
        while left > 0 && idx < parts.len() {
            let rem = parts[idx].len() - off;
            if left >= rem {
                left -= rem;
                idx += 1;
                off = 0;
            } else {
                off += left;
                left = 0;
            }
        }
        while idx < parts.len() && parts[idx].len() == off {
            idx += 1;
            off = 0;
        }
    }
    Ok(())
}

/// What the engine's answer to a READ of `len` bytes at `offset` becomes on the wire (`holes`
/// and `df` as the request was planned). `None`: the engine is stopping (`ESHUTDOWN`), and such
/// a request is never answered, so a reconnecting client resends it.
pub fn read_answer(
    r: Result<Done, RequestError>,
    offset: u64,
    len: u32,
    holes: Vec<(u64, u64)>,
    df: bool,
) -> Option<Body> {
    Some(match r {
        Ok(Done::Read(data)) if data.len() == len as usize => Body::Read {
            offset,
            data,
            holes,
            df,
        },
        Ok(_) => Body::Error {
            error: wire::NBD_EIO,
            message: "engine returned a short read".into(),
        },
        Err(e) if e.errno == libc::ESHUTDOWN => return None,
        Err(e) => engine_error(wire::CMD_READ, false, &e),
    })
}

/// What the engine's answer to a `kind` request with no data to send back (WRITE, TRIM,
/// WRITE_ZEROES, FLUSH, CACHE) becomes on the wire; the answer (a WRITE's buffer) is dropped
/// here. `None` as for [`read_answer`].
pub fn done_answer(kind: u16, fast_zero: bool, r: Result<Done, RequestError>) -> Option<Body> {
    match r {
        Ok(done) => {
            drop(done);
            Some(Body::Ok)
        }
        Err(e) if e.errno == libc::ESHUTDOWN => None,
        Err(e) => Some(engine_error(kind, fast_zero, &e)),
    }
}

/// The error reply for an engine failure of a `kind` command (see [`wire::reply_error`]).
fn engine_error(kind: u16, fast_zero: bool, e: &RequestError) -> Body {
    tracing::warn!(error = %e, "request failed in the engine");
    Body::Error {
        error: wire::reply_error(kind, fast_zero, e.errno),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn buf(bytes: &[u8]) -> IoBuf {
        let mut b = IoBuf::new_zeroed(bytes.len());
        b.copy_from_slice(bytes);
        b
    }

    #[test]
    fn simple_read_is_header_then_data() {
        let r = Reply {
            offset: 0,
            cookie: 5,
            body: Body::Read {
                offset: 0,
                data: buf(&[1, 2, 3]),
                holes: vec![],
                df: false,
            },
        };
        let mut want = wire::simple_reply(0, 5).to_vec();
        want.extend_from_slice(&[1, 2, 3]);
        assert_eq!(encode(Framing::Simple, &r), want);
        let z = Reply {
            offset: 0,
            cookie: 5,
            body: Body::Zeros {
                offset: 0,
                len: 70_000,
                df: false,
            },
        };
        let e = encode(Framing::Simple, &z);
        assert_eq!(e.len(), 16 + 70_000);
        assert!(e[16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn structured_read_splits_holes() {
        // 3 KiB read at 1024: data [1024,2048), hole [2048,3072), data [3072,4096).
        let mut data = vec![7u8; 3072];
        data[1024..2048].fill(0);
        let r = Reply {
            offset: 0,
            cookie: 9,
            body: Body::Read {
                offset: 1024,
                data: buf(&data),
                holes: vec![(2048, 1024)],
                df: false,
            },
        };
        let e = encode(Framing::Structured, &r);
        let mut want = Vec::new();
        want.extend_from_slice(&wire::chunk_header(
            0,
            wire::REPLY_TYPE_OFFSET_DATA,
            9,
            8 + 1024,
        ));
        want.extend_from_slice(&1024u64.to_be_bytes());
        want.extend_from_slice(&[7u8; 1024]);
        want.extend_from_slice(&wire::chunk_header(0, wire::REPLY_TYPE_OFFSET_HOLE, 9, 12));
        want.extend_from_slice(&2048u64.to_be_bytes());
        want.extend_from_slice(&1024u32.to_be_bytes());
        want.extend_from_slice(&wire::chunk_header(
            wire::REPLY_FLAG_DONE,
            wire::REPLY_TYPE_OFFSET_DATA,
            9,
            8 + 1024,
        ));
        want.extend_from_slice(&3072u64.to_be_bytes());
        want.extend_from_slice(&[7u8; 1024]);
        assert_eq!(e, want);

        // With DF the same read is one data chunk.
        let r = Reply {
            offset: 0,
            cookie: 9,
            body: Body::Read {
                offset: 1024,
                data: buf(&data),
                holes: vec![(2048, 1024)],
                df: true,
            },
        };
        let e = encode(Framing::Structured, &r);
        assert_eq!(e.len(), 20 + 8 + 3072);
        assert_eq!(&e[4..6], &wire::REPLY_FLAG_DONE.to_be_bytes());
    }

    #[test]
    fn structured_hole_at_the_end_carries_done() {
        let r = Reply {
            offset: 0,
            cookie: 1,
            body: Body::Read {
                offset: 0,
                data: buf(&[0u8; 1024]),
                holes: vec![(512, 4096)],
                df: false,
            },
        };
        let e = encode(Framing::Structured, &r);
        assert_eq!(e.len(), 20 + 8 + 512 + 20 + 12);
        let hole = &e[20 + 8 + 512..];
        assert_eq!(&hole[4..8], &[0, 1, 0, 2]);
        assert_eq!(&hole[28..32], &512u32.to_be_bytes());
    }

    #[test]
    fn error_and_status_chunks() {
        let r = Reply {
            offset: 0,
            cookie: 3,
            body: Body::Error {
                error: wire::NBD_EINVAL,
                message: "bad".into(),
            },
        };
        let mut want =
            wire::chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_ERROR, 3, 9).to_vec();
        want.extend_from_slice(&[0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);
        assert_eq!(encode(Framing::Structured, &r), want);
        assert_eq!(encode(Framing::Simple, &r), wire::simple_reply(22, 3));

        let r = Reply {
            offset: 0,
            cookie: 3,
            body: Body::BlockStatus {
                contexts: vec![(1, vec![(512, 0), (1024, 3)]), (2, vec![(1536, 1)])],
            },
        };
        let e = encode(Framing::Structured, &r);
        assert_eq!(e.len(), 20 + 4 + 16 + 20 + 4 + 8);
        assert_eq!(&e[4..6], &[0, 0]); // first chunk not DONE
        assert_eq!(
            &e[24..40],
            &[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 3]
        );
        assert_eq!(&e[44..46], &[0, 1]); // last chunk DONE
    }

    #[test]
    fn extended_framing_uses_32_byte_headers_everywhere() {
        let ok = Reply {
            offset: 4096,
            cookie: 8,
            body: Body::Ok,
        };
        assert_eq!(
            encode(Framing::Extended, &ok),
            wire::extended_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, 8, 4096, 0)
        );
        let st = Reply {
            offset: 0,
            cookie: 8,
            body: Body::BlockStatus {
                contexts: vec![(1, vec![(5 << 30, 3)])],
            },
        };
        let e = encode(Framing::Extended, &st);
        assert_eq!(e.len(), 32 + 8 + 16);
        assert_eq!(&e[6..8], &wire::REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
        assert_eq!(&e[32..40], &[0, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(&e[40..48], &(5u64 << 30).to_be_bytes());
        assert_eq!(&e[48..56], &3u64.to_be_bytes());
        let rd = Reply {
            offset: 512,
            cookie: 8,
            body: Body::Zeros {
                offset: 512,
                len: 1024,
                df: false,
            },
        };
        let e = encode(Framing::Extended, &rd);
        assert_eq!(e.len(), 32 + 12);
        assert_eq!(&e[24..32], &12u64.to_be_bytes());
    }

    /// The list `gather` builds holds exactly the bytes `send_many` sends, in every framing,
    /// for every kind of reply (READ data around holes, DF, all-hole, errors, status).
    #[test]
    fn gather_is_the_same_bytes_as_send_many() {
        let replies = || {
            vec![
                Reply {
                    offset: 4096,
                    cookie: 1,
                    body: Body::Read {
                        offset: 4096,
                        data: buf(&(0..200u8).collect::<Vec<_>>()),
                        holes: vec![(4096 + 10, 20), (4096 + 100, 50), (4096 + 190, 10)],
                        df: false,
                    },
                },
                Reply {
                    offset: 0,
                    cookie: 2,
                    body: Body::Read {
                        offset: 0,
                        data: buf(&[7u8; 300]),
                        holes: vec![(100, 100)],
                        df: true,
                    },
                },
                Reply {
                    offset: 0,
                    cookie: 3,
                    body: Body::Zeros {
                        offset: 0,
                        len: 100_000,
                        df: false,
                    },
                },
                Reply {
                    offset: 0,
                    cookie: 4,
                    body: Body::Error {
                        error: wire::NBD_EIO,
                        message: "it broke".into(),
                    },
                },
                Reply {
                    offset: 0,
                    cookie: 5,
                    body: Body::Ok,
                },
                Reply {
                    offset: 0,
                    cookie: 6,
                    body: Body::BlockStatus {
                        contexts: vec![(1, vec![(4096, 0), (512, 3)])],
                    },
                },
            ]
        };
        for mode in [Framing::Simple, Framing::Structured, Framing::Extended] {
            let want: Vec<u8> = replies().iter().flat_map(|r| encode(mode, r)).collect();
            let mut list = SendList::new();
            for r in replies() {
                gather(mode, r, &mut list);
            }
            assert_eq!(list.len(), want.len(), "{mode:?}");
            assert!(list.to_vec() == want, "{mode:?}: gathered bytes differ");
        }
    }

    #[test]
    fn send_many_is_the_concatenation() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let replies: Vec<Reply> = (0..700)
            .map(|i| Reply {
                offset: 0,
                cookie: i,
                body: Body::Read {
                    offset: 0,
                    data: buf(&[i as u8; 100]),
                    holes: vec![(50, 25)],
                    df: false,
                },
            })
            .collect();
        let want: Vec<u8> = replies
            .iter()
            .flat_map(|r| encode(Framing::Structured, r))
            .collect();
        let n = want.len();
        let t = std::thread::spawn(move || send_many(&a, Framing::Structured, &replies).unwrap());
        let mut got = vec![0u8; n];
        b.read_exact(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn send_writes_everything_through_a_socket() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let reply = Reply {
            offset: 0,
            cookie: 77,
            body: Body::Read {
                offset: 0,
                data: buf(&data),
                holes: vec![],
                df: false,
            },
        };
        let want = encode(Framing::Structured, &reply);
        let t = std::thread::spawn(move || {
            send_many(&a, Framing::Structured, std::slice::from_ref(&reply)).unwrap();
        });
        let mut got = vec![0u8; want.len()];
        b.read_exact(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got, want);
    }
}
