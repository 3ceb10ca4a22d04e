//! The client half of the NBD protocol, blocking and without threads of its own: connecting
//! and the fixed-newstyle handshake ([`connect`]), requests ([`send_request`]) and replies
//! ([`read_reply_header`], [`Chunk`]). The engine's remote base (`io/remote.rs`) runs it on
//! threads of its own, never on a core thread.
//!
//! What is negotiated: fixed newstyle (required), `NO_ZEROES` when offered, TLS first when the
//! URI asks for it (`NBD_OPT_STARTTLS` before any other option, then the TLS handshake: see
//! [`crate::nbd::tls`]; a server that refuses it is an error, never a plain session),
//! structured replies
//! (holes come back as hole chunks, no bytes on the wire), the `base:allocation` meta context
//! (holes of the base known without reading them), and `OPT_GO` asking for `INFO_BLOCK_SIZE`
//! (reads are aligned to the minimum and split to the maximum the server gives). Every length a
//! server sends is bounded before anything is allocated for it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::uri::{NbdAddr, NbdUri};
use super::wire::{self, be16, be32, be64, RequestHeader};
use crate::error::{Error, ErrorKind, Result};

/// Longest option-reply payload taken from a server (an error message, an info block).
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The largest read the client asks for when the server states no maximum.
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

/// Most extents [`zero_ranges`] takes in (beyond: treated as data).
pub const MAX_EXTENTS: usize = 1 << 20;
/// Most zero ranges [`zero_ranges`] keeps (beyond: the rest of the export is treated as data):
/// 16 bytes each, so at most 1 MiB per remote base.
pub const MAX_ZERO_RANGES: usize = 1 << 16;
/// Longest block-status chunk taken in (128 Ki extents).
const MAX_STATUS_CHUNK: u32 = 1 << 20;
/// How long [`zero_ranges`] may take.
pub const DEFAULT_STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected socket (Unix or TCP), or a TLS session over one.
#[derive(Debug)]
pub enum Stream {
    /// A Unix-domain socket.
    Unix(UnixStream),
    /// A TCP connection (`TCP_NODELAY` set).
    Tcp(TcpStream),
    /// TLS over one of the others (its socket non-blocking; reads and writes keep the
    /// timeouts set here, as a plain socket's do).
    #[cfg(feature = "tls")]
    Tls(crate::nbd::tls::TlsStream<Stream>),
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket().as_fd(),
        }
    }
}

impl Stream {
    /// A second handle to the same socket (one thread reads, another writes).
    pub fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => Stream::Tls(s.try_clone()),
        })
    }

    /// Shuts the socket down both ways (wakes a thread blocked reading it).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }

    /// Makes the socket non-blocking (or blocking again).
    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.socket().set_nonblocking(on),
        }
    }

    /// Sets the read timeout alone (`None`: block).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                s.set_read_timeout(t);
                Ok(())
            }
        }
    }

    /// Sets the write timeout alone (`None`: block). A socket's timeouts are shared by every
    /// handle on it, so the reader's blocking reads are left as they are.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                s.set_write_timeout(t);
                Ok(())
            }
        }
    }

    /// For TCP: keepalive probes (after 10 s idle, every 5 s, 3 unanswered: dead) and
    /// `TCP_USER_TIMEOUT` (sent data unacknowledged for `user_timeout`: dead), so a half-open
    /// connection (peer host gone, network cut) fails instead of waiting forever. Unix sockets
    /// need neither (the peer's death closes them).
    pub fn set_liveness(&self, user_timeout: Duration) -> std::io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        #[cfg(feature = "tls")]
        if let Stream::Tls(s) = self {
            return s.socket().set_liveness(user_timeout);
        }
        let Stream::Tcp(s) = self else { return Ok(()) };
        // Clamped to what the kernel's `int` holds.
        let ms = u32::try_from(user_timeout.as_millis().min(i32::MAX as u128)).unwrap_or(1);
        setsockopt(s, sockopt::KeepAlive, &true)?;
        setsockopt(s, sockopt::TcpKeepIdle, &10)?;
        setsockopt(s, sockopt::TcpKeepInterval, &5)?;
        setsockopt(s, sockopt::TcpKeepCount, &3)?;
        setsockopt(s, sockopt::TcpUserTimeout, &ms.max(1))?;
        Ok(())
    }

    /// Sets the read and write timeouts (`None`: block).
    pub fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            #[cfg(feature = "tls")]
            Stream::Tls(s) => {
                s.set_timeouts(t);
                Ok(())
            }
        }
    }
}

#[cfg(feature = "tls")]
impl crate::nbd::tls::Socket for Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Stream::try_clone(self)
    }

    fn shutdown(&self) {
        Stream::shutdown(self)
    }

    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        Stream::set_nonblocking(self, on)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An export after a successful `OPT_GO`: the socket in transmission phase and what was agreed.
#[derive(Debug)]
pub struct Session {
    /// The socket.
    pub stream: Stream,
    /// The export's size in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
    /// Minimum, preferred and maximum block size (1, 4096, 32 MiB when not stated).
    pub min_block: u32,
    /// Preferred block size.
    pub pref_block: u32,
    /// Maximum block size.
    pub max_block: u32,
    /// Structured replies are on.
    pub structured: bool,
    /// The id of `base:allocation`, when the server agreed to it.
    pub allocation_ctx: Option<u32>,
    /// When [`connect`] began: a caller that bounds a whole open (connect, handshake, what it
    /// asks next) counts its deadline from here.
    pub began: Instant,
}

impl Session {
    /// Whether the server allows several connections to the export (`CAN_MULTI_CONN`).
    pub fn multi_conn(&self) -> bool {
        self.flags & wire::FLAG_CAN_MULTI_CONN != 0
    }
}

fn remote_err(uri: &NbdUri, why: impl Into<String>) -> Error {
    Error::new(ErrorKind::Remote {
        uri: uri.text.clone(),
        why: why.into(),
    })
}

fn io_err(uri: &NbdUri, what: &str, e: std::io::Error) -> Error {
    remote_err(uri, format!("{what}: {e}"))
}

/// Connects a Unix-domain stream socket to `path`, giving up after `timeout`. A plain
/// blocking `connect` waits without bound while the listener's backlog is full (a server that
/// stopped accepting); here the socket is non-blocking during the connect, which then fails
/// with `EAGAIN` instead of waiting, and is retried until the deadline.
fn connect_unix(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use nix::errno::Errno;
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
    let deadline = Instant::now() + timeout;
    let addr = UnixAddr::new(path).map_err(std::io::Error::from)?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(std::io::Error::from)?;
    let mut pause = Duration::from_millis(1);
    loop {
        use std::os::fd::AsRawFd;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            Err(Errno::EINTR) => {}
            // The listener's backlog is full: try again until the deadline.
            Err(Errno::EAGAIN) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the server did not accept within {:.1} s (its backlog is full)",
                            timeout.as_secs_f64()
                        ),
                    ));
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let s = UnixStream::from(fd);
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Connects to the server `uri` names and negotiates its export, all of it (the connect and the
/// whole handshake) within `timeout`: a server that trickles its handshake a byte at a time
/// cannot stretch it past the deadline. The returned session's socket has no timeouts.
pub fn connect(uri: &NbdUri, timeout: Duration) -> Result<Session> {
    let began = Instant::now();
    let until = began + timeout;
    let stream = match &uri.addr {
        NbdAddr::Unix(path) => {
            Stream::Unix(connect_unix(path, timeout).map_err(|e| io_err(uri, "connect", e))?)
        }
        NbdAddr::Tcp { host, port } => {
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| io_err(uri, "resolve host", e))?;
            let mut last = None;
            let mut got = None;
            for a in addrs {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    last = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no connection within the timeout",
                    ));
                    break;
                }
                match TcpStream::connect_timeout(&a, left) {
                    Ok(s) => {
                        got = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let s = got.ok_or_else(|| {
                io_err(
                    uri,
                    "connect",
                    last.unwrap_or_else(|| std::io::Error::other("no address")),
                )
            })?;
            let _ = s.set_nodelay(true);
            Stream::Tcp(s)
        }
    };
    let mut session = handshake(stream, uri, until)?;
    session.began = began;
    session
        .stream
        .set_timeouts(None)
        .map_err(|e| io_err(uri, "set socket timeout", e))?;
    Ok(session)
}

fn read_n<const N: usize>(s: &mut impl Read, uri: &NbdUri, what: &str) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).map_err(|e| io_err(uri, what, e))?;
    Ok(b)
}

/// One option reply: its type and payload.
fn option_reply(s: &mut impl Read, uri: &NbdUri, option: u32) -> Result<(u32, Vec<u8>)> {
    let h: [u8; wire::OPTION_REPLY_LEN] = read_n(s, uri, "read option reply")?;
    if be64(&h, 0) != wire::OPTION_REPLY_MAGIC {
        return Err(remote_err(uri, "bad option reply magic"));
    }
    if be32(&h, 8) != option {
        return Err(remote_err(
            uri,
            format!("option reply for option {} to option {option}", be32(&h, 8)),
        ));
    }
    let len = be32(&h, 16);
    if len > MAX_OPTION_REPLY {
        return Err(remote_err(uri, format!("option reply of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)
        .map_err(|e| io_err(uri, "read option reply", e))?;
    Ok((be32(&h, 12), payload))
}

fn send_option(s: &mut impl Write, uri: &NbdUri, option: u32, payload: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + payload.len());
    b.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b).map_err(|e| io_err(uri, "send option", e))
}

fn is_error(reply: u32) -> bool {
    reply & 0x8000_0000 != 0
}

fn error_text(reply: u32, payload: &[u8]) -> String {
    let msg = String::from_utf8_lossy(payload);
    let name = match reply {
        wire::REP_ERR_UNSUP => "unsupported",
        wire::REP_ERR_INVALID => "invalid",
        wire::REP_ERR_UNKNOWN => "unknown export",
        wire::REP_ERR_SHUTDOWN => "server shutting down",
        wire::REP_ERR_TOO_BIG => "too big",
        wire::REP_ERR_POLICY => "refused by policy",
        wire::REP_ERR_TLS_REQD => "TLS required",
        _ => "error",
    };
    if msg.is_empty() {
        format!("{name} ({reply:#x})")
    } else {
        format!("{name} ({reply:#x}): {}", wire::cut(&msg, 200))
    }
}

/// TLS on `stream` after the server accepted `NBD_OPT_STARTTLS` (see [`crate::nbd::tls`]).
#[cfg(feature = "tls")]
fn start_tls(
    stream: Stream,
    uri: &NbdUri,
    tls: &super::uri::TlsParams,
    until: Instant,
) -> Result<Stream> {
    crate::nbd::tls::start(stream, uri, tls, until).map(Stream::Tls)
}

/// Without the `tls` feature a TLS URI cannot be served.
#[cfg(not(feature = "tls"))]
fn start_tls(
    _stream: Stream,
    uri: &NbdUri,
    _tls: &super::uri::TlsParams,
    _until: Instant,
) -> Result<Stream> {
    Err(remote_err(
        uri,
        "this build has no TLS support (the engine's `tls` feature is off)",
    ))
}

/// The fixed-newstyle handshake on `stream`, every read and write of it limited to what is left
/// until `until` (see [`Deadline`]).
fn handshake(mut stream: Stream, uri: &NbdUri, until: Instant) -> Result<Session> {
    let mut s = Deadline {
        s: &mut stream,
        until,
    };
    let g: [u8; 18] = read_n(&mut s, uri, "read greeting")?;
    if be64(&g, 0) != wire::NBD_MAGIC || be64(&g, 8) != wire::IHAVEOPT {
        return Err(remote_err(uri, "not a newstyle NBD server (bad greeting)"));
    }
    let hflags = be16(&g, 16);
    if hflags & wire::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(remote_err(uri, "the server does not speak fixed newstyle"));
    }
    let mut cflags = wire::FLAG_C_FIXED_NEWSTYLE;
    if hflags & wire::FLAG_NO_ZEROES != 0 {
        cflags |= wire::FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())
        .map_err(|e| io_err(uri, "send client flags", e))?;
    if let Some(tls) = &uri.tls {
        // TLS before any other option; a server that refuses it gets no other (the URI asked
        // for TLS: nothing goes in plain).
        send_option(&mut s, uri, wire::OPT_STARTTLS, &[])?;
        let (rep, payload) = option_reply(&mut s, uri, wire::OPT_STARTTLS)?;
        if rep != wire::REP_ACK {
            return Err(remote_err(
                uri,
                format!(
                    "the server refused STARTTLS ({}); the URI asks for TLS, so nothing is \
                     read in plain",
                    error_text(rep, &payload)
                ),
            ));
        }
        stream = start_tls(stream, uri, tls, until)?;
    }
    let mut s = Deadline {
        s: &mut stream,
        until,
    };

    send_option(&mut s, uri, wire::OPT_STRUCTURED_REPLY, &[])?;
    let (rep, _) = option_reply(&mut s, uri, wire::OPT_STRUCTURED_REPLY).map_err(|e| {
        // Under TLS 1.3 the server judges the client's certificate after the client's side of
        // the handshake is over: its refusal shows as the connection closing here.
        match (e.kind(), &uri.tls) {
            (ErrorKind::Remote { why, .. }, Some(_)) => remote_err(
                uri,
                format!(
                    "{why} (right after the TLS handshake: the server may have refused this \
                     client, or want a client certificate: client-cert.pem and client-key.pem \
                     in the tls-certificates folder)"
                ),
            ),
            _ => e,
        }
    })?;
    let structured = rep == wire::REP_ACK;

    let name = uri.export.as_bytes();
    let mut allocation_ctx = None;
    if structured {
        let ctx = wire::CONTEXT_BASE_ALLOCATION.as_bytes();
        let mut p = Vec::new();
        p.extend_from_slice(&(name.len() as u32).to_be_bytes());
        p.extend_from_slice(name);
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
        p.extend_from_slice(ctx);
        send_option(&mut s, uri, wire::OPT_SET_META_CONTEXT, &p)?;
        loop {
            let (rep, payload) = option_reply(&mut s, uri, wire::OPT_SET_META_CONTEXT)?;
            match rep {
                wire::REP_META_CONTEXT if payload.len() >= 4 => {
                    if &payload[4..] == ctx {
                        allocation_ctx = Some(be32(&payload, 0));
                    }
                }
                wire::REP_ACK => break,
                r if is_error(r) => {
                    if r == wire::REP_ERR_UNKNOWN {
                        return Err(remote_err(
                            uri,
                            format!("export {:?} not found on the server", uri.export),
                        ));
                    }
                    break;
                }
                _ => return Err(remote_err(uri, "unexpected meta context reply")),
            }
        }
    }

    let mut p = Vec::new();
    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
    p.extend_from_slice(name);
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
    send_option(&mut s, uri, wire::OPT_GO, &p)?;
    let mut export = None;
    let (mut min_block, mut pref_block, mut max_block) = (1, 4096, DEFAULT_MAX_BLOCK);
    loop {
        let (rep, payload) = option_reply(&mut s, uri, wire::OPT_GO)?;
        match rep {
            wire::REP_ACK => break,
            wire::REP_INFO if payload.len() >= 2 => match be16(&payload, 0) {
                wire::INFO_EXPORT if payload.len() >= 12 => {
                    export = Some((be64(&payload, 2), be16(&payload, 10)));
                }
                wire::INFO_BLOCK_SIZE if payload.len() >= 14 => {
                    min_block = be32(&payload, 2);
                    pref_block = be32(&payload, 6);
                    max_block = be32(&payload, 10);
                }
                _ => {}
            },
            wire::REP_INFO => return Err(remote_err(uri, "short info reply")),
            r if is_error(r) => {
                let why = if r == wire::REP_ERR_UNKNOWN {
                    format!("export {:?} not found on the server", uri.export)
                } else if r == wire::REP_ERR_TLS_REQD {
                    format!(
                        "the server requires TLS: name it nbds:// (or nbds+unix://) with its \
                         credentials ({})",
                        error_text(r, &payload)
                    )
                } else {
                    format!("OPT_GO refused: {}", error_text(r, &payload))
                };
                return Err(remote_err(uri, why));
            }
            r => {
                return Err(remote_err(
                    uri,
                    format!("unexpected reply {r:#x} to OPT_GO"),
                ))
            }
        }
    }
    let (size, flags) = export.ok_or_else(|| remote_err(uri, "OPT_GO without export info"))?;
    if !min_block.is_power_of_two() || min_block > 65536 || max_block < min_block {
        return Err(remote_err(
            uri,
            format!("nonsense block sizes: minimum {min_block}, maximum {max_block}"),
        ));
    }
    let max_block = max_block.min(DEFAULT_MAX_BLOCK).max(min_block);
    Ok(Session {
        stream,
        size,
        flags,
        min_block,
        pref_block,
        max_block,
        structured,
        allocation_ctx,
        began: Instant::now(),
    })
}

/// Sends one request (a READ or BLOCK_STATUS: no payload).
pub fn send_request(
    s: &mut impl Write,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> std::io::Result<()> {
    send_request_flagged(s, 0, kind, cookie, offset, len)
}

/// [`send_request`] with command flags (`CMD_FLAG_*`).
pub fn send_request_flagged(
    s: &mut impl Write,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> std::io::Result<()> {
    let h = RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        len: u64::from(len),
    };
    s.write_all(&h.encode())
}

/// A reply header as read off the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: its error (0 = success; a READ's data follows).
    Simple { cookie: u64, error: u32 },
    /// A structured reply chunk: its payload of `len` bytes follows.
    Chunk(Chunk),
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

/// Why a reply could not be taken in: the connection must be dropped.
#[derive(Debug)]
pub enum ReplyError {
    /// The socket failed or closed.
    Io(std::io::Error),
    /// The server broke the protocol (bad magic, a chunk outside its request, ...).
    Protocol(String),
    /// The server answered `NBD_ESHUTDOWN`: it is going away. Nothing it answered with that is
    /// an answer to the read; the connection is closed and the read is sent again on the next.
    ShuttingDown,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyError::Io(e) => write!(f, "{e}"),
            ReplyError::Protocol(p) => write!(f, "protocol error: {p}"),
            ReplyError::ShuttingDown => write!(f, "the server is shutting down (ESHUTDOWN)"),
        }
    }
}

impl From<std::io::Error> for ReplyError {
    fn from(e: std::io::Error) -> Self {
        ReplyError::Io(e)
    }
}

/// Reads the next reply header (simple or structured chunk).
pub fn read_reply_header(s: &mut impl Read) -> Result<ReplyHeader, ReplyError> {
    let mut m = [0u8; 4];
    s.read_exact(&mut m)?;
    match u32::from_be_bytes(m) {
        wire::SIMPLE_REPLY_MAGIC => {
            let mut b = [0u8; 12];
            s.read_exact(&mut b)?;
            Ok(ReplyHeader::Simple {
                error: be32(&b, 0),
                cookie: be64(&b, 4),
            })
        }
        wire::STRUCTURED_REPLY_MAGIC => {
            let mut b = [0u8; 16];
            s.read_exact(&mut b)?;
            Ok(ReplyHeader::Chunk(Chunk {
                flags: be16(&b, 0),
                kind: be16(&b, 2),
                cookie: be64(&b, 4),
                len: be32(&b, 12),
            }))
        }
        other => Err(ReplyError::Protocol(format!(
            "bad reply magic {other:#010x}"
        ))),
    }
}

/// Largest payload of an error chunk taken in.
pub const MAX_ERROR_CHUNK: u32 = 64 << 10;

/// Where the bytes `[off, off + n)` of a chunk land in the buffer of a read of
/// `[start, start + len)`: an error when any part lies outside it. `off` and `n` come from the
/// server, so nothing here can overflow or index out of bounds whatever they are.
pub fn chunk_range(
    start: u64,
    len: usize,
    off: u64,
    n: u64,
) -> Result<std::ops::Range<usize>, String> {
    let outside = || format!("chunk [{off}, +{n}) outside its read [{start}, +{len})",);
    let at = off.checked_sub(start).ok_or_else(outside)?;
    let end = at.checked_add(n).ok_or_else(outside)?;
    if end > len as u64 {
        return Err(outside());
    }
    // Both fit: they are at most `len`, a `usize`.
    Ok(at as usize..end as usize)
}

/// What one structured-reply chunk of a read brought.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkPayload {
    /// Data or a hole: these bytes of the read's buffer are now filled in.
    Covered(std::ops::Range<usize>),
    /// The server's error for the read: its NBD error value and message.
    Error { code: u32, msg: String },
    /// Nothing (`NONE`).
    Nothing,
}

/// Most disjoint pieces a [`Coverage`] keeps apart: chunks sent in order merge into one, so
/// only a server scattering its chunks reaches it (its read then fails).
pub const MAX_COVERAGE_PIECES: usize = 4096;

/// Which bytes of one read the chunks of its reply filled in, to require that every byte is
/// covered exactly once: two chunks over the same byte, or a byte no chunk covered, make the
/// read fail instead of answering with a stale or zero byte. Sorted, disjoint, merged
/// `[start, end)` ranges, at most [`MAX_COVERAGE_PIECES`] of them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Coverage {
    pieces: Vec<(usize, usize)>,
}

impl Coverage {
    /// Records `r` as filled in: an error when it overlaps what is already covered, or when
    /// the reply is scattered over too many pieces. An empty range covers nothing.
    pub fn add(&mut self, r: std::ops::Range<usize>) -> Result<(), String> {
        if r.is_empty() {
            return Ok(());
        }
        // The first piece ending after `r` starts: the only one that can overlap or follow.
        let i = self.pieces.partition_point(|p| p.1 <= r.start);
        if let Some(&(s, e)) = self.pieces.get(i) {
            if s < r.end {
                return Err(format!(
                    "chunk [{}, {}) overlaps bytes [{s}, {e}) already covered",
                    r.start, r.end
                ));
            }
        }
        let joins_prev = i > 0 && self.pieces[i - 1].1 == r.start;
        let joins_next = self.pieces.get(i).is_some_and(|p| p.0 == r.end);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.pieces[i - 1].1 = self.pieces[i].1;
                self.pieces.remove(i);
            }
            (true, false) => self.pieces[i - 1].1 = r.end,
            (false, true) => self.pieces[i].0 = r.start,
            (false, false) => {
                if self.pieces.len() >= MAX_COVERAGE_PIECES {
                    return Err(format!(
                        "reply scattered over more than {MAX_COVERAGE_PIECES} pieces"
                    ));
                }
                self.pieces.insert(i, (r.start, r.end));
            }
        }
        Ok(())
    }

    /// Whether exactly `[0, len)` is covered (every byte once: overlaps were refused).
    pub fn is_complete(&self, len: usize) -> bool {
        match self.pieces.as_slice() {
            [] => len == 0,
            [(0, e)] => *e == len,
            _ => false,
        }
    }

    /// Bytes covered.
    pub fn covered(&self) -> usize {
        self.pieces.iter().map(|p| p.1 - p.0).sum()
    }
}

/// Takes in the payload of chunk `c` of a read of `[start, start + buf.len())` (its header
/// already read from `s`), placing data and holes into `buf`. Every offset and length the
/// server sends is checked against the read before use: a chunk outside it, of an unexpected
/// type or of a bad length is a protocol error, never a panic. (Whether chunks overlap is the
/// caller's [`Coverage`]'s to check.)
pub fn read_chunk_into(
    s: &mut impl Read,
    c: &Chunk,
    start: u64,
    buf: &mut [u8],
) -> Result<ChunkPayload, ReplyError> {
    match c.kind {
        wire::REPLY_TYPE_NONE if c.len == 0 => Ok(ChunkPayload::Nothing),
        wire::REPLY_TYPE_OFFSET_DATA if c.len >= 8 => {
            let mut o = [0u8; 8];
            s.read_exact(&mut o)?;
            let off = u64::from_be_bytes(o);
            let n = u64::from(c.len - 8);
            let r = chunk_range(start, buf.len(), off, n)
                .map_err(|e| ReplyError::Protocol(format!("data {e}")))?;
            s.read_exact(&mut buf[r.clone()])?;
            Ok(ChunkPayload::Covered(r))
        }
        wire::REPLY_TYPE_OFFSET_HOLE if c.len == 12 => {
            let mut h = [0u8; 12];
            s.read_exact(&mut h)?;
            let off = be64(&h, 0);
            let n = u64::from(be32(&h, 8));
            let r = chunk_range(start, buf.len(), off, n)
                .map_err(|e| ReplyError::Protocol(format!("hole {e}")))?;
            buf[r.clone()].fill(0);
            Ok(ChunkPayload::Covered(r))
        }
        k if k & 0x8000 != 0 && (6..=MAX_ERROR_CHUNK).contains(&c.len) => {
            let mut p = vec![0u8; c.len as usize];
            s.read_exact(&mut p)?;
            let code = be32(&p, 0);
            let mlen = usize::from(be16(&p, 4));
            let msg = p
                .get(6..6 + mlen)
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned();
            Ok(ChunkPayload::Error { code, msg })
        }
        k => Err(ReplyError::Protocol(format!(
            "unexpected chunk type {k} of {} bytes",
            c.len
        ))),
    }
}

/// Reads and drops `n` bytes.
pub fn skip(s: &mut impl Read, n: u64) -> std::io::Result<()> {
    let got = std::io::copy(&mut s.take(n), &mut std::io::sink())?;
    if got < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Sends `NBD_CMD_DISC` (best effort) before a socket is closed.
pub fn disconnect(s: &mut impl Write) {
    let _ = send_request(s, wire::CMD_DISC, 0, 0, 0);
}

/// Reads from and writes to a socket, each `read` and `write` limited to what is left until
/// `until`: a server that trickles bytes (or takes them slowly) cannot stretch a sequence of
/// them past the deadline.
struct Deadline<'a> {
    s: &'a mut Stream,
    until: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within the timeout",
            ));
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.s.set_write_timeout(Some(left))?;
        self.s.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The extents (length, `STATE_*` flags) of `[offset, offset + len)` under `base:allocation`,
/// asked synchronously on a session nothing else uses (at open), the whole exchange bounded by
/// `until`. Each extent is non-empty and they stay inside the request (the last one is cut at
/// its end); the server's single block-status chunk for the context is taken in, at most
/// `MAX_STATUS_CHUNK` bytes. Any error may leave replies of this request unread in the socket:
/// the caller must then drop the session.
fn block_status(
    sess: &mut Session,
    uri: &NbdUri,
    offset: u64,
    len: u32,
    until: Instant,
) -> Result<Vec<(u32, u32)>> {
    let ctx = sess
        .allocation_ctx
        .ok_or_else(|| remote_err(uri, "base:allocation was not negotiated"))?;
    let mut r = Deadline {
        s: &mut sess.stream,
        until,
    };
    let left = r.left().map_err(|e| io_err(uri, "send block status", e))?;
    r.s.set_write_timeout(Some(left))
        .and_then(|()| send_request(r.s, wire::CMD_BLOCK_STATUS, 1, offset, len))
        .map_err(|e| io_err(uri, "send block status", e))?;
    let mut out = Vec::new();
    let mut seen = false;
    loop {
        let h = read_reply_header(&mut r)
            .map_err(|e| remote_err(uri, format!("block status reply: {e}")))?;
        let c = match h {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    return Err(remote_err(
                        uri,
                        format!("block status failed: error {error}"),
                    ));
                }
                return Err(remote_err(uri, "simple reply to block status"));
            }
            ReplyHeader::Chunk(c) => c,
        };
        if c.cookie != 1 || c.len > MAX_STATUS_CHUNK {
            return Err(remote_err(
                uri,
                format!(
                    "bad block status chunk (cookie {}, {} bytes)",
                    c.cookie, c.len
                ),
            ));
        }
        let mut payload = vec![0u8; c.len as usize];
        r.read_exact(&mut payload)
            .map_err(|e| io_err(uri, "read block status", e))?;
        match c.kind {
            wire::REPLY_TYPE_BLOCK_STATUS if payload.len() >= 4 => {
                if be32(&payload, 0) == ctx {
                    if seen {
                        return Err(remote_err(
                            uri,
                            "two block status chunks for one context in one reply",
                        ));
                    }
                    seen = true;
                    let mut left = u64::from(len);
                    for e in payload[4..].chunks_exact(8) {
                        let l = be32(e, 0);
                        if l == 0 {
                            return Err(remote_err(uri, "block status extent of length 0"));
                        }
                        if left == 0 {
                            break;
                        }
                        let l = u64::from(l).min(left);
                        left -= l;
                        // `l` is at most `len`, a u32.
                        out.push((l as u32, be32(e, 4)));
                    }
                }
            }
            wire::REPLY_TYPE_NONE => {}
            k if k & 0x8000 != 0 => {
                return Err(remote_err(uri, "block status answered with an error"));
            }
            _ => return Err(remote_err(uri, "unexpected chunk in block status")),
        }
        if c.flags & wire::REPLY_FLAG_DONE != 0 {
            return Ok(out);
        }
    }
}

/// The byte ranges of the whole export that read as zeros (`base:allocation` with
/// `STATE_ZERO`), sorted and merged, asked on `sess` before it is used for anything else, with
/// [`DEFAULT_STATUS_TIMEOUT`]. See [`zero_ranges_in_step`]; for a session that is closed
/// afterwards.
pub fn zero_ranges(sess: &mut Session, uri: &NbdUri) -> Vec<(u64, u64)> {
    zero_ranges_in_step(sess, uri, Instant::now() + DEFAULT_STATUS_TIMEOUT).0
}

/// The byte ranges of the whole export that read as zeros (`base:allocation` with
/// `STATE_ZERO`), sorted and merged, asked on `sess` before it is used for anything else; and
/// whether the session is still in step (no reply left unread in it) and may be used on.
///
/// Bounded in time and memory whatever the server does: the whole query gives up at `until`
/// (a server that never answers, or answers without end), at most [`MAX_EXTENTS`] extents are
/// looked at and at most [`MAX_ZERO_RANGES`] ranges kept. What is not known to be zero is data
/// (read from the server): always correct, never a hole that is not one. A request's extents
/// count only once its reply completed without error; when the query fails (or times out),
/// what earlier requests found is kept, and the session is out of step: it must be dropped.
pub fn zero_ranges_in_step(
    sess: &mut Session,
    uri: &NbdUri,
    until: Instant,
) -> (Vec<(u64, u64)>, bool) {
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    if sess.allocation_ctx.is_none() {
        return (zeros, true);
    }
    let step = (1u64 << 30) - (1u64 << 30) % u64::from(sess.min_block.max(1));
    let (mut pos, mut extents) = (0u64, 0usize);
    while pos < sess.size && extents < MAX_EXTENTS && zeros.len() < MAX_ZERO_RANGES {
        let len = (sess.size - pos).min(step) as u32;
        let got = match block_status(sess, uri, pos, len, until) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, known_up_to = pos, "block status of the remote base \
                    failed; the rest of it is treated as data, and the connection is dropped");
                return (zeros, false);
            }
        };
        let before = pos;
        for (l, flags) in got {
            if zeros.len() >= MAX_ZERO_RANGES {
                break;
            }
            let end = (pos + u64::from(l)).min(sess.size);
            if flags & wire::STATE_ZERO != 0 && end > pos {
                match zeros.last_mut() {
                    Some(last) if last.1 == pos => last.1 = end,
                    _ => zeros.push((pos, end)),
                }
            }
            pos = end;
            extents += 1;
        }
        if pos == before {
            break;
        }
    }
    let in_step = sess.stream.set_timeouts(None).is_ok();
    (zeros, in_step)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_takes_every_byte_exactly_once() {
        let mut c = Coverage::default();
        assert!(c.is_complete(0));
        // Out of order, adjacent pieces merge.
        c.add(1024..2048).expect("first");
        c.add(0..512).expect("second");
        assert!(!c.is_complete(2048), "a gap");
        c.add(512..1024).expect("fills the gap");
        assert!(c.is_complete(2048));
        assert!(!c.is_complete(4096));
        // Overlaps, however they lie, are refused (and change nothing).
        for r in [0..1, 2047..2049, 100..200, 0..4096] {
            assert!(c.add(r.clone()).is_err(), "{r:?}");
        }
        assert_eq!(c.covered(), 2048);
        // Two chunks whose lengths add up to the read's, one over the other: not complete.
        let mut c = Coverage::default();
        c.add(0..2560).expect("first");
        assert!(c.add(2048..4096 - 512).is_err());
        assert!(!c.is_complete(4096));
        // A reply scattered over too many pieces fails instead of growing without bound.
        let mut c = Coverage::default();
        let mut failed = false;
        for i in 0..=MAX_COVERAGE_PIECES {
            failed |= c.add(i * 2..i * 2 + 1).is_err();
        }
        assert!(failed);
    }

    /// A listener whose backlog is full (it never accepts): the connect gives up by its
    /// timeout with an error naming the server, instead of waiting for the server for ever.
    #[test]
    fn a_unix_connect_to_a_full_backlog_times_out() {
        use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("full.sock");
        let l = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&l),
            &UnixAddr::new(&path).expect("addr"),
        )
        .expect("bind");
        socket::listen(&l, Backlog::new(0).expect("backlog")).expect("listen");
        // With a backlog of 0 one connection waits in the queue; the next one finds it full.
        let mut filled = Vec::new();
        loop {
            match connect_unix(&path, Duration::from_millis(200)) {
                Ok(s) => filled.push(s),
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
                    break;
                }
            }
            assert!(filled.len() < 16, "the backlog never filled up");
        }
        let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", path.display())).expect("uri");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(connect(&uri, Duration::from_secs(1)).map(|_| ()));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("connect still waiting 60 s into a 1 s timeout");
        let e = r.expect_err("a listener that never accepts");
        assert!(e.to_string().contains("full.sock"), "{e}");
        drop(filled);
    }
}
