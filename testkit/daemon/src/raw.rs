//! A raw NBD client for tests that need exact control of what is sent and when: the pieces of the
//! fixed-newstyle handshake and of transmission as free functions over any byte stream (Unix
//! socket or TCP), so a test can send a good handshake and then anything it likes, and
//! [`RawClient`], a minimal client on top of them (GO to an export, simple replies).
//!
//! Every reader here checks the magic it expects; a handshake error is an `Err`, so a probe can
//! tell "not an NBD server (yet)" from a failed test.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The server's greeting starts with this.
pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
/// Every option (client to server) and the fixed-newstyle greeting carry this.
pub const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
/// An option reply's magic.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// A compact request's magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// An extended request's magic (after `NBD_OPT_EXTENDED_HEADERS`).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// A simple reply's magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// A structured reply chunk's magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// An extended reply chunk's magic.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Client flags: `NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES`.
pub const CLIENT_FLAGS: u32 = 3;

/// Options.
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
/// Option reply types with this bit are errors (and final).
pub const REP_FLAG_ERROR: u32 = 0x8000_0000;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const FLAG_FUA: u16 = 1;
pub const FLAG_FAST_ZERO: u16 = 1 << 4;

/// An NBD error number in a reply (0 = success).
pub type NbdError = u32;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// Reads the server's 18-byte fixed-newstyle greeting (`NBDMAGIC`, `IHAVEOPT`, handshake
/// flags); returns the flags. Another greeting is an `InvalidData` error.
pub fn greeting(s: &mut impl Read) -> std::io::Result<u16> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if &g[..8] != NBDMAGIC || &g[8..16] != IHAVEOPT {
        return Err(invalid(format!("not a fixed-newstyle greeting: {g:02x?}")));
    }
    Ok(be16(&g, 16))
}

/// An option as the client sends it: `IHAVEOPT`, the option, its data's length, its data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut o = IHAVEOPT.to_vec();
    o.extend_from_slice(&opt.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    o
}

/// The data of `NBD_OPT_GO` / `NBD_OPT_INFO` for export `name`, asking for no information.
pub fn go_data(name: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name);
    d.extend_from_slice(&[0, 0]);
    d
}

/// Reads option replies up to the final one (`REP_ACK` or an error): (type, payload) of each.
pub fn option_replies(s: &mut impl Read) -> std::io::Result<Vec<(u32, Vec<u8>)>> {
    let mut v = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        if be64(&h, 0) != OPTION_REPLY_MAGIC {
            return Err(invalid(format!("option reply magic {:#x}", be64(&h, 0))));
        }
        let kind = be32(&h, 12);
        let mut p = vec![0u8; be32(&h, 16) as usize];
        s.read_exact(&mut p)?;
        let last = kind == REP_ACK || kind & REP_FLAG_ERROR != 0;
        v.push((kind, p));
        if last {
            return Ok(v);
        }
    }
}

/// What `NBD_OPT_GO` said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

/// The client half of a good handshake on `s`: reads the greeting, sends the client flags, asks
/// each of `options` (each must be acknowledged), then GO to export `name` (must be
/// acknowledged). `s` is then in transmission. A server that breaks the protocol (wrong magic)
/// fails the test; I/O errors and refused options are errors.
pub fn handshake(
    s: &mut (impl Read + Write),
    name: &str,
    options: &[(u32, &[u8])],
) -> std::io::Result<Export> {
    protocol(greeting(s))?;
    s.write_all(&CLIENT_FLAGS.to_be_bytes())?;
    for (opt, data) in options {
        s.write_all(&option(*opt, data))?;
        let r = protocol(option_replies(s))?;
        let (kind, p) = r.last().expect("at least the final reply");
        if *kind != REP_ACK {
            return Err(std::io::Error::other(format!(
                "option {opt} refused: {kind:#x} {}",
                String::from_utf8_lossy(p)
            )));
        }
    }
    s.write_all(&option(OPT_GO, &go_data(name.as_bytes())))?;
    let r = protocol(option_replies(s))?;
    let (kind, p) = r.last().expect("at least the final reply");
    if *kind != REP_ACK {
        return Err(std::io::Error::other(format!(
            "GO refused: {kind:#x} {}",
            String::from_utf8_lossy(p)
        )));
    }
    // NBD_INFO_EXPORT: type 0, size, transmission flags.
    let (_, info) = r
        .iter()
        .find(|(k, p)| *k == REP_INFO && p.len() == 12 && be16(p, 0) == 0)
        .unwrap_or_else(|| panic!("GO acknowledged without NBD_INFO_EXPORT: {r:?}"));
    Ok(Export {
        size: be64(info, 2),
        flags: be16(info, 10),
    })
}

/// A compact request header (28 bytes; a WRITE's payload follows it).
pub fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    header(
        REQUEST_MAGIC,
        kind,
        flags,
        cookie,
        offset,
        &len.to_be_bytes(),
    )
}

/// An extended request header (32 bytes; needs `NBD_OPT_EXTENDED_HEADERS`).
pub fn extended_request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    header(
        EXTENDED_REQUEST_MAGIC,
        kind,
        flags,
        cookie,
        offset,
        &len.to_be_bytes(),
    )
}

/// A request header: the fields in order, big-endian; `len` already encoded (4 or 8 bytes).
fn header(magic: u32, kind: u16, flags: u16, cookie: u64, offset: u64, len: &[u8]) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(len);
    b
}

/// One reply, or one chunk of a structured or extended reply (its payload read whole, except a
/// simple reply's data, which only the caller knows the length of).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply: its error (0 = success); a successful READ's data follows it.
    Simple { cookie: u64, error: NbdError },
    /// A structured (`extended: false`) or extended reply chunk.
    Chunk {
        extended: bool,
        flags: u16,
        kind: u16,
        cookie: u64,
        /// The extended header's offset field (0 in a structured chunk).
        offset: u64,
        payload: Vec<u8>,
    },
}

impl Reply {
    /// The cookie it answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// Reads one simple reply header or one structured / extended chunk, by its magic.
pub fn read_reply(s: &mut impl Read) -> std::io::Result<Reply> {
    let mut m = [0u8; 4];
    s.read_exact(&mut m)?;
    match u32::from_be_bytes(m) {
        SIMPLE_REPLY_MAGIC => {
            let mut r = [0u8; 12];
            s.read_exact(&mut r)?;
            Ok(Reply::Simple {
                error: be32(&r, 0),
                cookie: be64(&r, 4),
            })
        }
        magic @ (STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC) => {
            let extended = magic == EXTENDED_REPLY_MAGIC;
            let mut r = vec![0u8; if extended { 28 } else { 16 }];
            s.read_exact(&mut r)?;
            let (offset, len) = if extended {
                (be64(&r, 12), be64(&r, 20))
            } else {
                (0, u64::from(be32(&r, 12)))
            };
            let mut payload = vec![0u8; len as usize];
            s.read_exact(&mut payload)?;
            Ok(Reply::Chunk {
                extended,
                flags: be16(&r, 0),
                kind: be16(&r, 2),
                cookie: be64(&r, 4),
                offset,
                payload,
            })
        }
        other => Err(invalid(format!("reply magic {other:#x}"))),
    }
}

/// Reads one simple reply to `cookie` and, on success, its data into `data` if given; returns
/// its error. Another magic or cookie fails the test (a protocol error of the server).
pub fn simple_reply(
    s: &mut impl Read,
    cookie: u64,
    data: Option<&mut [u8]>,
) -> std::io::Result<NbdError> {
    let mut r = [0u8; 16];
    s.read_exact(&mut r)?;
    assert_eq!(be32(&r, 0), SIMPLE_REPLY_MAGIC, "simple reply magic");
    assert_eq!(be64(&r, 8), cookie, "a simple reply to another request");
    let error = be32(&r, 4);
    if error == 0 {
        if let Some(d) = data {
            s.read_exact(d)?;
        }
    }
    Ok(error)
}

/// Fails the test on a protocol error of the server (`InvalidData`); passes I/O errors on.
fn protocol<T>(r: std::io::Result<T>) -> std::io::Result<T> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => panic!("{e}"),
        r => r,
    }
}

/// A minimal NBD client over a raw socket (fixed newstyle, no zeroes, GO to an export, simple
/// replies) on any stream (`UnixStream` by default).
pub struct RawClient<S = UnixStream> {
    /// The connection, for bytes of the test's own.
    pub s: S,
    /// The export as GO described it.
    pub export: Export,
    next: u64,
}

impl RawClient<UnixStream> {
    /// Connects to `sock` (every read waits at most 120 s) and enters transmission on export
    /// `name`.
    pub fn connect(sock: &Path, name: &str) -> std::io::Result<RawClient> {
        let s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        RawClient::handshake(s, name, &[])
    }
}

impl<S: Read + Write> RawClient<S> {
    /// Goes through [`handshake`] on `s` (asking `options` first) to export `name`.
    pub fn handshake(mut s: S, name: &str, options: &[(u32, &[u8])]) -> std::io::Result<Self> {
        let export = handshake(&mut s, name, options)?;
        Ok(RawClient { s, export, next: 1 })
    }

    /// Sends a request header (and `payload`) with the next cookie; returns the cookie.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<u64> {
        let cookie = self.next;
        self.next += 1;
        let mut b = request(kind, flags, cookie, offset, len);
        b.extend_from_slice(payload);
        self.s.write_all(&b)?;
        Ok(cookie)
    }

    /// WRITE (FUA if `fua`); the reply's error.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<NbdError> {
        let flags = if fua { FLAG_FUA } else { 0 };
        let cookie = self.send(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        simple_reply(&mut self.s, cookie, None)
    }

    /// WRITE_ZEROES with `flags`; the reply's error.
    pub fn write_zeroes(&mut self, flags: u16, offset: u64, len: u32) -> std::io::Result<NbdError> {
        let cookie = self.send(CMD_WRITE_ZEROES, flags, offset, len, &[])?;
        simple_reply(&mut self.s, cookie, None)
    }

    /// FLUSH; the reply's error.
    pub fn flush(&mut self) -> std::io::Result<NbdError> {
        let cookie = self.send(CMD_FLUSH, 0, 0, 0, &[])?;
        simple_reply(&mut self.s, cookie, None)
    }

    /// TRIM; the reply's error.
    pub fn trim(&mut self, offset: u64, len: u32) -> std::io::Result<NbdError> {
        let cookie = self.send(CMD_TRIM, 0, offset, len, &[])?;
        simple_reply(&mut self.s, cookie, None)
    }

    /// READ into `buf`; the reply's error.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<NbdError> {
        let cookie = self.send(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        simple_reply(&mut self.s, cookie, Some(buf))
    }

    /// DISC.
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}
