//! TLS for NBD connections (`NBD_OPT_STARTTLS`), in userspace with OpenSSL.
//!
//! [`TlsServer`] holds the credentials: x509 (`--tls-creds DIR`: `ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, the names QEMU's `tls-creds-x509` reads) and/or a PSK
//! file (`--tls-psk FILE`, `identity:hexkey` lines, parsed by [`PskKeys`]); they are read when
//! the daemon starts and again on [`TlsServer::reload`] (SIGHUP, control `tls-reload`), which
//! swaps the context new handshakes use: a connection already up keeps the session it has.
//!
//! [`TlsServer::accept`] runs the TLS handshake on the connection's own thread (never an engine
//! core) within the handshake deadline; a client that sends anything but a ClientHello, or
//! stalls, fails it and is closed. With `--tls-verify-peer` a client certificate signed by the
//! CA is required. The client's identity is its certificate's subject DN (RFC 4514, as GnuTLS
//! and QEMU's `authz-simple` print it: `CN=alice,O=example`) or its PSK identity; a daemon-wide
//! authorization list (`--tls-authz`) that does not hold it ends the connection right after the
//! TLS handshake, before any NBD reply, as qemu-nbd does (logged, counted in
//! [`crate::nbd::handshake::TLS_AUTHZ_DENIED`]).
//!
//! Transmission over TLS ([`TlsConn`]) runs on the connection's reader and writer threads
//! (`connection.rs`): one OpenSSL session shared under a mutex, over a non-blocking socket.
//! Neither thread holds the mutex while it waits: each call into OpenSSL is non-blocking and a
//! thread that must wait polls the socket without the lock. Only TLS 1.2 and later are
//! accepted; session resumption is off (every connection presents its credentials again).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use addcow_engine::tls::PskKeys;
use openssl::error::ErrorStack;
use openssl::nid::Nid;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions,
    SslSessionCacheMode, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509NameRef;

use super::sock::Sock;
use crate::nbd::handshake::TLS_AUTHZ_DENIED;

/// TLS handshakes that succeeded since the daemon started.
pub static TLS_HANDSHAKES: AtomicU64 = AtomicU64::new(0);
/// TLS handshakes that failed (bad or no credentials, garbage, timeouts, clients gone).
pub static TLS_HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// `--tls`: whether NBD clients may, must or cannot use TLS (nbdkit's meaning).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `STARTTLS` is answered `ERR_UNSUP`.
    #[default]
    Off,
    /// TLS is offered; clients may also haggle and be served in the clear.
    On,
    /// TLS is required on TCP: every option but `STARTTLS` is refused before it.
    Require,
}

/// The TLS part of the daemon's configuration, checked (see `serve::config`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// `--tls`.
    pub mode: TlsMode,
    /// `--tls-creds`: folder of `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    pub creds: Option<PathBuf>,
    /// `--tls-psk`: the PSK file.
    pub psk: Option<PathBuf>,
    /// `--tls-verify-peer`: clients must present a certificate signed by the CA.
    pub verify_peer: bool,
    /// `--tls-authz`: the identities allowed in (empty: every client the credentials let in).
    pub authz: Vec<String>,
}

impl TlsSettings {
    /// Whether TLS is used at all.
    pub fn enabled(&self) -> bool {
        self.mode != TlsMode::Off
    }
}

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file could not be used.
    #[error("{}: {what}: {source}", path.display())]
    Creds {
        /// The file.
        path: PathBuf,
        /// What was being done with it.
        what: &'static str,
        /// OpenSSL's reasons.
        source: ErrorStack,
    },
    /// The PSK file was refused.
    #[error(transparent)]
    Psk(#[from] addcow_engine::tls::PskError),
    /// OpenSSL could not set up a context.
    #[error("setting up TLS: {0}")]
    Setup(#[from] ErrorStack),
}

/// How a connection's TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The TLS handshake itself failed (or timed out, or the client left).
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The client's identity is not on the daemon's authorization list.
    #[error("TLS client {0:?} is not on the authorization list")]
    Denied(String),
}

/// The daemon's TLS credentials, reloadable. See the module docs.
pub struct TlsServer {
    settings: TlsSettings,
    ctx: RwLock<SslContext>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Loads the credentials `settings` name.
    pub fn load(settings: TlsSettings) -> Result<TlsServer, TlsError> {
        let ctx = build(&settings)?;
        Ok(TlsServer {
            settings,
            ctx: RwLock::new(ctx),
        })
    }

    /// Reads the credentials again; new handshakes use them, connections already up keep
    /// theirs. On error the old credentials stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let ctx = build(&self.settings)?;
        *self.ctx.write().unwrap_or_else(|p| p.into_inner()) = ctx;
        tracing::info!(creds = ?self.settings.creds, psk = ?self.settings.psk, "TLS credentials reloaded");
        Ok(())
    }

    /// The settings.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// (offered, required) on a connection over TCP (`tcp`) or a Unix socket: `--tls` holds
    /// for TCP; on a Unix socket TLS is offered (for `nbds+unix` clients) but never required.
    pub fn policy(&self, tcp: bool) -> (bool, bool) {
        match self.settings.mode {
            TlsMode::Off => (false, false),
            TlsMode::On => (true, false),
            TlsMode::Require => (true, tcp),
        }
    }

    /// Runs the server side of the TLS handshake on `sock` (after `STARTTLS` was acknowledged)
    /// until `deadline`, then checks the daemon's authorization list. Failures are logged by
    /// the caller and counted here.
    pub fn accept(&self, sock: Sock, deadline: Instant) -> Result<TlsSession, AcceptError> {
        let ssl = {
            let ctx = self.ctx.read().unwrap_or_else(|p| p.into_inner());
            Ssl::new(&ctx)
        };
        let fail = |why: String| {
            TLS_HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
            AcceptError::Handshake(why)
        };
        let ssl = ssl.map_err(|e| fail(e.to_string()))?;
        let io = TlsIo {
            sock,
            deadline: Some(deadline),
        };
        let mut stream = SslStream::new(ssl, io).map_err(|e| fail(e.to_string()))?;
        if let Err(e) = stream.accept() {
            return Err(fail(describe(&e)));
        }
        let identity = identity(stream.ssl());
        TLS_HANDSHAKES.fetch_add(1, Ordering::Relaxed);
        if !self.settings.authz.is_empty()
            && !self
                .settings
                .authz
                .iter()
                .any(|a| Some(a) == identity.as_ref())
        {
            TLS_AUTHZ_DENIED.fetch_add(1, Ordering::Relaxed);
            let _ = stream.get_ref().sock.shutdown(std::net::Shutdown::Both);
            return Err(AcceptError::Denied(identity.unwrap_or_default()));
        }
        Ok(TlsSession { stream, identity })
    }
}

/// Builds the context new handshakes use.
fn build(settings: &TlsSettings) -> Result<SslContext, TlsError> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    // PSK suites are part of HIGH; every suite here has forward secrecy or is PSK-only.
    b.set_cipher_list("HIGH:!aNULL:!eNULL:!MD5:!RC4:!3DES:!SHA1:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256")?;
    b.set_mode(
        SslMode::AUTO_RETRY | SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::ENABLE_PARTIAL_WRITE,
    );
    // No resumption: each connection shows its credentials (and the current ones) again.
    b.set_options(SslOptions::NO_TICKET | SslOptions::IGNORE_UNEXPECTED_EOF);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_num_tickets(0)?;
    b.set_session_id_context(b"addcow-nbd")?;
    if let Some(dir) = &settings.creds {
        let file = |name: &str| dir.join(name);
        let creds = |path: PathBuf, what| {
            move |source| TlsError::Creds {
                path: path.clone(),
                what,
                source,
            }
        };
        let cert = file("server-cert.pem");
        b.set_certificate_chain_file(&cert)
            .map_err(creds(cert.clone(), "reading the server certificate"))?;
        let key = file("server-key.pem");
        b.set_private_key_file(&key, SslFiletype::PEM)
            .map_err(creds(key.clone(), "reading the server key"))?;
        b.check_private_key()
            .map_err(creds(key, "the key does not match server-cert.pem"))?;
        let ca = file("ca-cert.pem");
        b.set_ca_file(&ca)
            .map_err(creds(ca.clone(), "reading the CA certificate"))?;
        if settings.verify_peer {
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            let names = openssl::x509::X509::stack_from_pem(&std::fs::read(&ca).map_err(|_| {
                TlsError::Creds {
                    path: ca.clone(),
                    what: "reading the CA certificate",
                    source: ErrorStack::get(),
                }
            })?)
            .map_err(creds(ca.clone(), "reading the CA certificate"))?;
            let mut list = openssl::stack::Stack::new()?;
            for c in names {
                list.push(c.subject_name().to_owned()?)?;
            }
            b.set_client_ca_list(list);
        } else {
            b.set_verify(SslVerifyMode::NONE);
        }
    }
    if let Some(path) = &settings.psk {
        let keys = Arc::new(PskKeys::load(path)?);
        let index = psk_index()?;
        b.set_psk_server_callback(move |ssl, identity, out| {
            let Some((id, key)) = identity
                .and_then(|i| std::str::from_utf8(i).ok())
                .and_then(|i| Some((i, keys.get(i)?)))
            else {
                // Unknown identity: no key, the handshake fails.
                return Ok(0);
            };
            if key.len() > out.len() {
                return Ok(0);
            }
            out[..key.len()].copy_from_slice(key);
            // OpenSSL does not keep the identity for TLS 1.3 sessions: kept here.
            ssl.set_ex_data(index, id.to_string());
            Ok(key.len())
        });
    }
    Ok(b.build())
}

/// Where the PSK callback keeps the identity whose key it gave.
fn psk_index() -> Result<openssl::ex_data::Index<Ssl, String>, ErrorStack> {
    static INDEX: std::sync::OnceLock<openssl::ex_data::Index<Ssl, String>> =
        std::sync::OnceLock::new();
    if let Some(i) = INDEX.get() {
        return Ok(*i);
    }
    let i = Ssl::new_ex_index::<String>()?;
    Ok(*INDEX.get_or_init(|| i))
}

/// The client's identity: its PSK identity, else its certificate's subject DN (RFC 4514).
fn identity(ssl: &openssl::ssl::SslRef) -> Option<String> {
    if let Some(id) = psk_index().ok().and_then(|i| ssl.ex_data(i)) {
        return Some(id.clone());
    }
    if let Some(id) = ssl.psk_identity() {
        return Some(String::from_utf8_lossy(id).into_owned());
    }
    ssl.peer_certificate().map(|c| rfc4514(c.subject_name()))
}

/// `name` as RFC 4514 prints it: the last RDN first, `TYPE=value` joined by commas, with the
/// special characters escaped.
pub fn rfc4514(name: &X509NameRef) -> String {
    let parts: Vec<String> = name
        .entries()
        .map(|e| {
            let nid = e.object().nid();
            let key = match nid {
                Nid::UNDEF => e.object().to_string(),
                n => n.short_name().map(str::to_string).unwrap_or_default(),
            };
            let value = e.data().to_string().unwrap_or_default();
            format!("{key}={}", escape_dn_value(&value))
        })
        .collect();
    parts.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// Escapes an attribute value as RFC 4514 section 2.4 says.
fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One line about a failed handshake: OpenSSL's reasons, or the socket's error.
fn describe(e: &openssl::ssl::Error) -> String {
    match (e.io_error(), e.ssl_error()) {
        (Some(io), _) => format!("socket: {io}"),
        (None, Some(stack)) => stack.to_string(),
        (None, None) if e.code() == ErrorCode::SYSCALL => "the client closed the connection".into(),
        _ => e.to_string(),
    }
}

/// The socket under a TLS session: during the handshake each read and write gets the time
/// left before the deadline; afterwards the socket is non-blocking ([`TlsConn`] polls).
pub struct TlsIo {
    sock: Sock,
    deadline: Option<Instant>,
}

impl TlsIo {
    fn left(&self) -> io::Result<Option<Duration>> {
        let Some(d) = self.deadline else {
            return Ok(None);
        };
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        Ok(Some(left))
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "handshake time limit reached")
}

/// A blocking call's `EAGAIN` after its timeout is the deadline, not "try again".
fn deadline_error(e: io::Error, deadline: bool) -> io::Error {
    if deadline && e.kind() == io::ErrorKind::WouldBlock {
        timed_out()
    } else {
        e
    }
}

impl Read for TlsIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        if left.is_some() {
            self.sock.set_read_timeout(left)?;
        }
        self.sock
            .read(buf)
            .map_err(|e| deadline_error(e, left.is_some()))
    }
}

impl Write for TlsIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        if left.is_some() {
            self.sock.set_write_timeout(left)?;
        }
        self.sock
            .write(buf)
            .map_err(|e| deadline_error(e, left.is_some()))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS session right after its handshake: the NBD option haggling runs over it (`Read +
/// Write`, still within the handshake deadline), then [`TlsSession::into_conn`] serves it.
pub struct TlsSession {
    stream: SslStream<TlsIo>,
    identity: Option<String>,
}

impl TlsSession {
    /// The client's certificate DN or PSK identity.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// The session for transmission: no deadline, socket non-blocking.
    pub fn into_conn(mut self) -> io::Result<TlsConn> {
        let io = self.stream.get_mut();
        io.deadline = None;
        let sock = io.sock.try_clone()?;
        match &sock {
            Sock::Tcp(s) => s.set_nonblocking(true)?,
            Sock::Unix(s) => s.set_nonblocking(true)?,
        }
        Ok(TlsConn {
            inner: Arc::new(Shared {
                ssl: Mutex::new(self.stream),
                sock,
            }),
        })
    }
}

impl Read for TlsSession {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for TlsSession {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

struct Shared {
    ssl: Mutex<SslStream<TlsIo>>,
    /// The same socket, to poll and shut down without the lock.
    sock: Sock,
}

/// A TLS session in transmission, shared by the connection's reader and writer threads (see
/// the module docs). Clones are handles on the same session.
#[derive(Clone)]
pub struct TlsConn {
    inner: Arc<Shared>,
}

/// What an OpenSSL call asks for before it can go on.
enum Want {
    Read,
    Write,
}

impl TlsConn {
    fn lock(&self) -> MutexGuard<'_, SslStream<TlsIo>> {
        self.inner.ssl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the socket is ready for `want`, up to `timeout` (`None`: no limit); false
    /// when the time ran out.
    fn wait(&self, want: Want, timeout: Option<Duration>) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let flags = match want {
            Want::Read => PollFlags::POLLIN,
            Want::Write => PollFlags::POLLOUT,
        };
        let t = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d.as_millis().clamp(1, i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX),
        };
        let fd = self.fd();
        loop {
            let mut fds = [PollFd::new(fd, flags)];
            match poll(&mut fds, t) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match &self.inner.sock {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }

    /// The raw descriptor (for logs and tests).
    pub fn raw_fd(&self) -> i32 {
        self.inner.sock.as_raw_fd()
    }

    /// Maps an OpenSSL error of a read or write: what to wait for, or the error to return
    /// (`Ok(None)`: the peer closed).
    fn classify(e: openssl::ssl::Error) -> io::Result<Option<Want>> {
        match e.code() {
            ErrorCode::WANT_READ => Ok(Some(Want::Read)),
            ErrorCode::WANT_WRITE => Ok(Some(Want::Write)),
            ErrorCode::ZERO_RETURN => Ok(None),
            ErrorCode::SYSCALL if e.io_error().is_none() => Ok(None),
            _ => Err(match e.into_io_error() {
                Ok(io) => io,
                Err(e) => io::Error::other(describe(&e)),
            }),
        }
    }

    /// Reads plaintext into `buf`; waits at most `timeout` for the socket (then
    /// `WouldBlock`, as a socket with a read timeout does). `Ok(0)`: the client closed.
    pub fn read(&self, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let r = self.lock().ssl_read(buf);
            let want = match r {
                Ok(n) => return Ok(n),
                Err(e) => match Self::classify(e)? {
                    None => return Ok(0),
                    Some(w) => w,
                },
            };
            if !self.wait(want, timeout)? {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "no data within the read timeout",
                ));
            }
        }
    }

    /// Sends all of `buf`; gives up (`TimedOut`) when the socket takes nothing for `timeout`.
    pub fn write_all(&self, mut buf: &[u8], timeout: Option<Duration>) -> io::Result<()> {
        while !buf.is_empty() {
            let r = self.lock().ssl_write(buf);
            let want = match r {
                Ok(n) => {
                    buf = &buf[n..];
                    continue;
                }
                Err(e) => match Self::classify(e)? {
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "the client closed the TLS session",
                        ))
                    }
                    Some(w) => w,
                },
            };
            if !self.wait(want, timeout)? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no reply bytes within the write timeout",
                ));
            }
        }
        Ok(())
    }

    /// Sends `close_notify` if the socket takes it at once (never waits).
    pub fn close_notify(&self) {
        let _ = self.lock().shutdown();
    }

    /// A reader of this session for the connection's reader thread; `timeout` as for
    /// [`TlsConn::read`].
    pub fn reader(&self, timeout: Option<Duration>) -> TlsReader {
        TlsReader {
            conn: self.clone(),
            timeout,
        }
    }
}

/// [`TlsConn::read`] as [`Read`].
pub struct TlsReader {
    conn: TlsConn,
    timeout: Option<Duration>,
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.read(buf, self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dn_values_are_escaped() {
        assert_eq!(escape_dn_value("a,b"), "a\\,b");
        assert_eq!(escape_dn_value(" x "), "\\ x\\ ");
        assert_eq!(escape_dn_value("#1"), "\\#1");
        assert_eq!(escape_dn_value("plain"), "plain");
    }

    #[test]
    fn rfc4514_puts_the_last_rdn_first() {
        let mut b = openssl::x509::X509Name::builder().unwrap();
        b.append_entry_by_text("O", "addcow-tests").unwrap();
        b.append_entry_by_text("CN", "alice").unwrap();
        let n = b.build();
        assert_eq!(rfc4514(&n), "CN=alice,O=addcow-tests");
    }

    #[test]
    fn policy_requires_tls_on_tcp_only() {
        let mk = |mode| TlsServer {
            settings: TlsSettings {
                mode,
                ..TlsSettings::default()
            },
            ctx: RwLock::new(
                SslContextBuilder::new(SslMethod::tls_server())
                    .unwrap()
                    .build(),
            ),
        };
        assert_eq!(mk(TlsMode::Off).policy(true), (false, false));
        assert_eq!(mk(TlsMode::On).policy(true), (true, false));
        assert_eq!(mk(TlsMode::Require).policy(true), (true, true));
        assert_eq!(mk(TlsMode::Require).policy(false), (true, false));
    }
}
