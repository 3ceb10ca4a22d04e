//! NBD wire format: the protocol's constants and the fixed-size frames (request headers, reply
//! headers, option headers), encoded and decoded without any I/O.
//!
//! All integers are big-endian. Names follow the NBD specification (`doc/proto.md`) without the
//! `NBD_` prefix.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also prefixes every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a 28-byte request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a 32-byte extended request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a 32-byte extended reply header.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// Magic of a 16-byte simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a 20-byte structured reply chunk header.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags: `NBD_FLAG_HAS_FLAGS`.
pub const FLAG_HAS_FLAGS: u16 = 0x0001;
/// Transmission flag `NBD_FLAG_READ_ONLY`.
pub const FLAG_READ_ONLY: u16 = 0x0002;
/// Transmission flag `NBD_FLAG_SEND_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 0x0004;
/// Transmission flag `NBD_FLAG_SEND_FUA`.
pub const FLAG_SEND_FUA: u16 = 0x0008;
/// Transmission flag `NBD_FLAG_SEND_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 0x0020;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 0x0040;
/// Transmission flag `NBD_FLAG_SEND_DF`.
pub const FLAG_SEND_DF: u16 = 0x0080;
/// Transmission flag `NBD_FLAG_CAN_MULTI_CONN`.
pub const FLAG_CAN_MULTI_CONN: u16 = 0x0100;
/// Transmission flag `NBD_FLAG_SEND_CACHE`.
pub const FLAG_SEND_CACHE: u16 = 0x0400;
/// Transmission flag `NBD_FLAG_SEND_FAST_ZERO`.
pub const FLAG_SEND_FAST_ZERO: u16 = 0x0800;

/// Options: `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// Option `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// Option `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// Option `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// Option `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option `NBD_OPT_EXTENDED_HEADERS`.
pub const OPT_EXTENDED_HEADERS: u32 = 11;
/// Option `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;

/// Option reply types: `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// Option reply type `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// Option reply type `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Option reply type `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Option reply type `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Option reply type `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// Option reply type `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
/// Option reply type `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
/// Option reply type `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
/// Option reply type `NBD_REP_ERR_EXT_HEADER_REQD`.
pub const REP_ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;
/// Option reply type `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// Option reply type `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

/// Info types: `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// Info type `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// Info type `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands: `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// Command `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// Command `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// Command `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// Command `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// Command `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// Command `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags: `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length field is the payload's length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk type `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply chunk type `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply chunk type `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply chunk type `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply chunk type `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Structured reply chunk type `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

/// Error values on the wire (never raw errno of the host): `NBD_EPERM`.
pub const NBD_EPERM: u32 = 1;
/// Error value `NBD_EIO`.
pub const NBD_EIO: u32 = 5;
/// Error value `NBD_ENOMEM`.
pub const NBD_ENOMEM: u32 = 12;
/// Error value `NBD_EINVAL`.
pub const NBD_EINVAL: u32 = 22;
/// Error value `NBD_ENOSPC`.
pub const NBD_ENOSPC: u32 = 28;
/// Error value `NBD_EOVERFLOW`.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error value `NBD_ENOTSUP`.
pub const NBD_ENOTSUP: u32 = 95;
/// Error value `NBD_ESHUTDOWN`.
pub const NBD_ESHUTDOWN: u32 = 108;

/// `base:allocation` status bits: `NBD_STATE_HOLE`.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status bit `NBD_STATE_ZERO`.
pub const STATE_ZERO: u32 = 1 << 1;

/// Longest string (export name, context name) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest READ/WRITE payload we accept (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size we advertise.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Minimum block size we advertise: any byte offset works (the engine does read-modify-write).
pub const MIN_BLOCK: u32 = 1;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of an extended reply header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of the option reply header (magic, option, reply type, length).
pub const OPTION_REPLY_LEN: usize = 20;
/// The meta context that reports holes and zeros.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

/// The NBD error a command of type `kind` (`fast_zero`: a WRITE_ZEROES with FAST_ZERO) is
/// answered with when the engine fails it with the Linux `errno`.
///
/// The spec's rules: `ENOSPC` only where space is allocated (WRITE, WRITE_ZEROES, TRIM and the
/// FLUSH that commits them); `ENOTSUP` only for FAST_ZERO; `EPERM` for writes refused by the
/// file system; `ENOMEM` as is. Everything else is `EIO`: the daemon validated the request
/// before the engine saw it, so an engine `EINVAL` (or `EOVERFLOW`) is the server's fault, not
/// the client's. (`ESHUTDOWN` from a stopping engine is never answered: see
/// `Ticket::unanswered`.)
pub fn reply_error(kind: u16, fast_zero: bool, errno: i32) -> u32 {
    let allocates = matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_FLUSH);
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => NBD_EPERM,
        libc::ENOMEM => NBD_ENOMEM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG if allocates => NBD_ENOSPC,
        libc::ENOTSUP if fast_zero && kind == CMD_WRITE_ZEROES => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A decoded transmission request header (28-byte compact or 32-byte extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub kind: u16,
    /// Opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for WRITE); at most `u32::MAX` in compact headers.
    pub len: u64,
}

/// Why a request header could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The magic is not `NBD_REQUEST_MAGIC`: the stream is out of sync or garbage.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

impl RequestHeader {
    /// Decodes a request header.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, FrameError> {
        let magic = be32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            len: u64::from(be32(b, 24)),
        })
    }

    /// Decodes an extended request header.
    pub fn parse_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<RequestHeader, FrameError> {
        let magic = be32(b, 0);
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            len: be64(b, 24),
        })
    }

    /// Encodes the header (the engine's remote-base client sends it; tests act as a client).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&(self.len as u32).to_be_bytes());
        b
    }
}

/// A simple reply header: magic, error, cookie.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header: magic, flags, type, cookie, payload length.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An extended reply header: magic, flags, type, cookie, the request's offset, payload length.
pub fn extended_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> [u8; EXTENDED_REPLY_LEN] {
    let mut b = [0u8; EXTENDED_REPLY_LEN];
    b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option reply: magic, option echoed, reply type, payload length, then the payload.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// Big-endian u16 at `at` of a buffer known to be long enough.
pub fn be16(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    x.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(x)
}

/// Big-endian u32 at `at` of a buffer known to be long enough.
pub fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

/// Big-endian u64 at `at` of a buffer known to be long enough.
pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// A cursor over an option's payload that fails (instead of panicking) when the client's
/// lengths do not add up.
#[derive(Debug)]
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { rest: data }
    }

    /// The next `n` bytes, or `None` if fewer remain.
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }

    /// The next big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| be16(b, 0))
    }

    /// The next big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| be32(b, 0))
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_fixture() {
        let fixture: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags FUA
            0x00, 0x01, // WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0, 0, 2, 0, // len 512
        ];
        let h = RequestHeader::parse(&fixture).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0x0102030405060708,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(h.encode(), fixture);
    }

    #[test]
    fn extended_request_fixture() {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&[0x21, 0xe4, 0x1c, 0x71]);
        b[4..6].copy_from_slice(&CMD_FLAG_PAYLOAD_LEN.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&9u64.to_be_bytes());
        b[16..24].copy_from_slice(&512u64.to_be_bytes());
        b[24..32].copy_from_slice(&(5u64 << 32).to_be_bytes());
        let h = RequestHeader::parse_extended(&b).unwrap();
        assert_eq!(
            (h.kind, h.cookie, h.offset, h.len),
            (CMD_WRITE, 9, 512, 5 << 32)
        );
        assert!(RequestHeader::parse(&b[..28].try_into().unwrap()).is_err());
        let e = extended_header(1, 6, 2, 3, 4);
        assert_eq!(&e[..8], &[0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 6]);
        assert_eq!(&e[24..], &4u64.to_be_bytes());
    }

    #[test]
    fn bad_magic_is_an_error() {
        let mut b = [0u8; 28];
        b[0] = 0xde;
        assert_eq!(
            RequestHeader::parse(&b),
            Err(FrameError::BadMagic(0xde00_0000))
        );
    }

    #[test]
    fn reply_headers_encode_exactly() {
        assert_eq!(
            simple_reply(NBD_EINVAL, 7),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(
            chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 9, 12),
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 12]
        );
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(
            r,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn cursor_never_overruns() {
        let mut c = Cursor::new(&[0, 0, 0, 5, 1]);
        assert_eq!(c.u32(), Some(5));
        assert_eq!(c.u16(), None);
        assert_eq!(c.take(1), Some(&[1u8][..]));
        assert!(c.is_empty());
        assert_eq!(c.u32(), None);
    }

    #[test]
    fn errno_mapping_follows_the_command() {
        assert_eq!(reply_error(CMD_WRITE, false, libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(reply_error(CMD_FLUSH, false, libc::ENOSPC), NBD_ENOSPC);
        assert_eq!(reply_error(CMD_READ, false, libc::ENOSPC), NBD_EIO);
        assert_eq!(reply_error(CMD_WRITE, false, libc::EROFS), NBD_EPERM);
        assert_eq!(reply_error(CMD_READ, false, libc::EBADF), NBD_EIO);
        // An engine EINVAL is not the client's fault.
        assert_eq!(reply_error(CMD_READ, false, libc::EINVAL), NBD_EIO);
        assert_eq!(reply_error(CMD_WRITE, false, libc::EOVERFLOW), NBD_EIO);
        // ENOTSUP only for FAST_ZERO.
        assert_eq!(
            reply_error(CMD_WRITE_ZEROES, true, libc::ENOTSUP),
            NBD_ENOTSUP
        );
        assert_eq!(reply_error(CMD_WRITE_ZEROES, false, libc::ENOTSUP), NBD_EIO);
        assert_eq!(reply_error(CMD_TRIM, false, libc::ENOTSUP), NBD_EIO);
        assert_eq!(reply_error(CMD_READ, false, libc::ENOMEM), NBD_ENOMEM);
    }
}
