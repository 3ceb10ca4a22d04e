//! The client end of NBD over TLS (a remote base named by `nbds://` or `nbds+unix://`): the TLS
//! session set up on a socket after `NBD_OPT_STARTTLS` ([`start`]), and the stream that carries
//! the rest of the connection over it ([`TlsStream`]). OpenSSL, through the `openssl` crate.
//!
//! # Credentials (libnbd's, see [`TlsParams`])
//! * `tls-certificates=DIR`: the server's certificate must chain to `DIR/ca-cert.pem` (the only
//!   CA trusted then), and carry the host name (the URI's host, or `tls-hostname=`; a Unix
//!   socket has no host: only the chain is checked, unless `tls-hostname=` names one).
//!   `DIR/client-cert.pem` and `DIR/client-key.pem`, when both are there, are presented to a
//!   server that asks for a client certificate; `DIR/ca-crl.pem`, when there, is checked.
//! * `tls-psk-file=FILE`: TLS-PSK with the key of `tls-username=` (or the file's first
//!   identity); no certificates.
//! * Neither: the certificate is checked against the system's CAs (OpenSSL's default paths) and
//!   the host name, as libnbd and a browser do.
//!
//! TLS 1.2 at least; renegotiation off.
//!
//! # One session, two threads
//! A connection of a remote base is written by its driver thread and read by its reply thread
//! at once. An OpenSSL session must not be used by two threads at the same time, so it sits
//! behind a mutex, the socket is non-blocking, and each thread holds the mutex only for one
//! non-blocking `SSL_read` or `SSL_write`: while one waits for its socket to become readable
//! or writable (`poll`, at most [`MAX_POLL`] at a time) the other goes on. A read or write
//! keeps the timeout set on the stream ([`TlsStream::set_timeouts`]), as a plain socket's
//! `SO_RCVTIMEO` does: past it, `WouldBlock`. Shutting the socket down wakes a waiting reader.
//!
//! TLS costs a copy: the bytes of a reply are decrypted from OpenSSL's record buffer into the
//! read's own buffer (a plain socket's bytes land there directly).

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use openssl::ssl::{
    ErrorCode, SslConnector, SslFiletype, SslMethod, SslOptions, SslStream, SslVerifyMode,
    SslVersion,
};
use openssl::x509::store::{X509Lookup, X509StoreBuilder};
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509VerifyResult, X509};

use super::uri::{NbdAddr, NbdUri, TlsParams};
use crate::error::{Error, ErrorKind, Result};
use crate::tls::PskKeys;

/// Longest single wait for the socket: a waiting thread looks again at least this often.
pub const MAX_POLL: Duration = Duration::from_secs(1);

/// Cipher suites of TLS 1.2 for PSK (TLS 1.3's own suites serve PSK and certificates alike).
const PSK_CIPHERS: &str = "ECDHE-PSK:DHE-PSK:PSK:!RSAPSK:!NULL:!3DES:!RC4:!MD5:!CAMELLIA:!ARIA";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn remote_err(uri: &NbdUri, why: impl Into<String>) -> Error {
    Error::new(ErrorKind::Remote {
        uri: uri.text.clone(),
        why: why.into(),
    })
}

/// What a non-blocking OpenSSL call waits for before it is tried again.
#[derive(Debug, Clone, Copy)]
enum Want {
    Read,
    Write,
}

/// Waits until `sock` is ready for `want`, at most until `until` (then `WouldBlock`, what a
/// plain socket's timeout gives) and at most [`MAX_POLL`].
fn wait<S: AsFd>(sock: &S, want: Want, until: Option<Instant>) -> io::Result<()> {
    let mut slice = MAX_POLL;
    if let Some(u) = until {
        let left = u.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "no progress on the TLS connection within the timeout",
            ));
        }
        slice = slice.min(left);
    }
    let events = match want {
        Want::Read => PollFlags::POLLIN,
        Want::Write => PollFlags::POLLOUT,
    };
    let mut fds = [PollFd::new(sock.as_fd(), events)];
    // At most MAX_POLL (1 s): fits a u16 of milliseconds; rounded up so that a wait never
    // spins on a zero timeout.
    let ms = slice.as_millis().clamp(1, u128::from(u16::MAX)) as u16;
    match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What to do after an OpenSSL call failed: wait and retry, or give up with this error.
fn retry_or_fail(e: openssl::ssl::Error, again: Want) -> io::Result<Want> {
    match e.code() {
        ErrorCode::WANT_READ => Ok(Want::Read),
        ErrorCode::WANT_WRITE => Ok(Want::Write),
        ErrorCode::SYSCALL => match e.into_io_error() {
            Ok(io) if io.kind() == io::ErrorKind::Interrupted => Ok(again),
            Ok(io) => Err(io),
            Err(e) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the TLS connection ended: {e}"),
            )),
        },
        ErrorCode::ZERO_RETURN => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the TLS session",
        )),
        _ => Err(io::Error::other(format!("TLS: {e}"))),
    }
}

/// What a TLS session needs of the socket under it: bytes both ways, a descriptor to wait on,
/// a second handle, and a way to shut it down and make it non-blocking. The NBD client's
/// `Stream` is one.
pub trait Socket: Read + Write + AsFd + std::fmt::Debug + Send + Sync + Sized + 'static {
    /// A second handle on the same socket.
    fn try_clone(&self) -> io::Result<Self>;
    /// Shuts the socket down both ways (wakes a thread waiting on it).
    fn shutdown(&self);
    /// Makes the socket non-blocking (or blocking again).
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
}

struct Shared<S: Socket> {
    /// The session, used by one non-blocking call at a time.
    ssl: Mutex<SslStream<S>>,
    /// Another handle on the same (non-blocking) socket: to wait on it, shut it down, set its
    /// options, without the session's mutex.
    sock: S,
    /// Read and write timeouts (`None`: wait without end), shared by every handle as a plain
    /// socket's are.
    timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
}

impl<S: Socket> Drop for Shared<S> {
    /// The last handle is gone: a best-effort `close_notify` (the socket is non-blocking, so
    /// this never waits), so that the server sees a clean end rather than a cut session.
    fn drop(&mut self) {
        if let Ok(s) = self.ssl.get_mut() {
            let _ = s.shutdown();
        }
    }
}

/// A TLS session over a socket, shared by the handles [`TlsStream::try_clone`] makes (one
/// thread reads, another writes). See the module docs.
pub struct TlsStream<S: Socket>(Arc<Shared<S>>);

impl<S: Socket> Clone for TlsStream<S> {
    fn clone(&self) -> Self {
        TlsStream(Arc::clone(&self.0))
    }
}

impl<S: Socket> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.0.sock)
            .finish_non_exhaustive()
    }
}

impl<S: Socket> TlsStream<S> {
    /// A second handle on the same session.
    pub fn try_clone(&self) -> TlsStream<S> {
        self.clone()
    }

    /// The socket under the session.
    pub fn socket(&self) -> &S {
        &self.0.sock
    }

    /// Ends the session: a best-effort TLS close (`close_notify`, when the session is not in
    /// use this instant and the socket takes it at once), then the socket is shut down both
    /// ways (which wakes a thread waiting on it). Never waits.
    pub fn shutdown(&self) {
        if let Ok(mut s) = self.0.ssl.try_lock() {
            let _ = s.shutdown();
        }
        self.0.sock.shutdown();
    }

    /// Sets the read timeout alone.
    pub fn set_read_timeout(&self, t: Option<Duration>) {
        lock(&self.0.timeouts).0 = t;
    }

    /// Sets the write timeout alone.
    pub fn set_write_timeout(&self, t: Option<Duration>) {
        lock(&self.0.timeouts).1 = t;
    }

    /// Sets both timeouts.
    pub fn set_timeouts(&self, t: Option<Duration>) {
        *lock(&self.0.timeouts) = (t, t);
    }
}

impl<S: Socket> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let until = lock(&self.0.timeouts).0.map(|t| Instant::now() + t);
        loop {
            let r = lock(&self.0.ssl).ssl_read(buf);
            let want = match r {
                Ok(n) => return Ok(n),
                // The server's close_notify, or the socket's end without one: end of stream
                // (NBD's framing tells a cut reply from a whole one).
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(0),
                Err(e) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => return Ok(0),
                Err(e) => retry_or_fail(e, Want::Read)?,
            };
            wait(&self.0.sock, want, until)?;
        }
    }
}

impl<S: Socket> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let until = lock(&self.0.timeouts).1.map(|t| Instant::now() + t);
        loop {
            let r = lock(&self.0.ssl).ssl_write(buf);
            let want = match r {
                Ok(n) => return Ok(n),
                Err(e) => retry_or_fail(e, Want::Write)?,
            };
            wait(&self.0.sock, want, until)?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The OpenSSL context `tls` asks for. Errors name the file and what is wrong with it, never
/// a key.
fn connector(tls: &TlsParams) -> std::result::Result<SslConnector, String> {
    let ssl_err = |what: &str, e: openssl::error::ErrorStack| format!("{what}: {e}");
    // Certificates checked against OpenSSL's default CA paths, hostname checks possible.
    let mut b = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| ssl_err("setting up OpenSSL", e))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| ssl_err("setting the TLS version", e))?;
    b.set_options(SslOptions::NO_RENEGOTIATION);
    if let Some(file) = &tls.psk_file {
        let keys = PskKeys::load(file).map_err(|e| e.to_string())?;
        let (identity, key) = match &tls.username {
            Some(u) => match keys.get(u) {
                Some(k) => (u.clone(), k.to_vec()),
                None => {
                    return Err(format!(
                        "{}: no key for the identity {u:?} (tls-username)",
                        file.display()
                    ))
                }
            },
            None => {
                let (id, k) = keys.first();
                (id.to_string(), k.to_vec())
            }
        };
        b.set_cipher_list(PSK_CIPHERS)
            .map_err(|e| ssl_err("choosing the PSK cipher suites", e))?;
        // No certificate to check: the key is the server's proof. A server may still answer
        // with a certificate handshake that ignores the key (TLS 1.3 lets it); `start` refuses
        // such a session after the handshake, so only a server holding the key gets through.
        b.set_verify(SslVerifyMode::NONE);
        b.set_psk_client_callback(move |_ssl, _hint, id_buf, key_buf| {
            // The identity goes out NUL-terminated.
            if identity.len() >= id_buf.len() || key.len() > key_buf.len() {
                return Err(openssl::error::ErrorStack::get());
            }
            id_buf[..identity.len()].copy_from_slice(identity.as_bytes());
            id_buf[identity.len()] = 0;
            key_buf[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
    } else if let Some(dir) = &tls.certificates {
        let ca = dir.join("ca-cert.pem");
        let pem = std::fs::read(&ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let certs = X509::stack_from_pem(&pem)
            .map_err(|e| ssl_err(&format!("{}: not PEM certificates", ca.display()), e))?;
        if certs.is_empty() {
            return Err(format!("{}: holds no certificate", ca.display()));
        }
        let mut store = X509StoreBuilder::new().map_err(|e| ssl_err("a CA store", e))?;
        for c in certs {
            store
                .add_cert(c)
                .map_err(|e| ssl_err(&ca.display().to_string(), e))?;
        }
        let crl = dir.join("ca-crl.pem");
        if crl.exists() {
            let name = crl
                .to_str()
                .ok_or_else(|| format!("{}: the path is not UTF-8", crl.display()))?;
            store
                .add_lookup(X509Lookup::file())
                .and_then(|l| l.load_crl_file(name, SslFiletype::PEM))
                .map_err(|e| ssl_err(name, e))?;
            store
                .set_flags(X509VerifyFlags::CRL_CHECK)
                .map_err(|e| ssl_err(name, e))?;
        }
        // Only this CA: the system's are not trusted for this server.
        b.set_cert_store(store.build());
        let cert = dir.join("client-cert.pem");
        let key = dir.join("client-key.pem");
        if cert.exists() && key.exists() {
            b.set_certificate_chain_file(&cert)
                .map_err(|e| ssl_err(&cert.display().to_string(), e))?;
            b.set_private_key_file(&key, SslFiletype::PEM)
                .map_err(|e| ssl_err(&key.display().to_string(), e))?;
            b.check_private_key().map_err(|e| {
                ssl_err(
                    &format!("{} does not match {}", key.display(), cert.display()),
                    e,
                )
            })?;
        }
    }
    Ok(b.build())
}

/// Sets up TLS on `sock`, whose server just accepted `NBD_OPT_STARTTLS`: the whole handshake
/// done by `until`, the server's certificate (or key) checked as `tls` asks. The returned
/// stream carries the rest of the NBD handshake and the transmission phase; it has no
/// timeouts of its own.
pub fn start<S: Socket>(
    sock: S,
    uri: &NbdUri,
    tls: &TlsParams,
    until: Instant,
) -> Result<TlsStream<S>> {
    let conn = connector(tls).map_err(|why| remote_err(uri, format!("TLS credentials: {why}")))?;
    let mut cfg = conn
        .configure()
        .map_err(|e| remote_err(uri, format!("TLS session: {e}")))?;
    // The name the certificate must carry: `tls-hostname=`, else a TCP URI's host; a Unix
    // socket has none (the chain alone is checked). PSK checks no name.
    let name = tls.hostname.clone().or_else(|| match &uri.addr {
        NbdAddr::Tcp { host, .. } => Some(host.clone()),
        NbdAddr::Unix(_) => None,
    });
    let name = match name {
        Some(n) => {
            cfg.set_verify_hostname(tls.psk_file.is_none());
            n
        }
        None => {
            cfg.set_verify_hostname(false);
            cfg.set_use_server_name_indication(false);
            String::new()
        }
    };
    let ssl = cfg
        .into_ssl(&name)
        .map_err(|e| remote_err(uri, format!("TLS session for {name:?}: {e}")))?;
    let io = |what: &str, e: io::Error| remote_err(uri, format!("{what}: {e}"));
    let other = sock.try_clone().map_err(|e| io("clone the socket", e))?;
    sock.set_nonblocking(true)
        .map_err(|e| io("make the socket non-blocking", e))?;
    let mut s = SslStream::new(ssl, sock).map_err(|e| remote_err(uri, format!("TLS: {e}")))?;
    loop {
        let e = match s.connect() {
            Ok(()) => break,
            Err(e) => e,
        };
        let want = match e.code() {
            ErrorCode::WANT_READ => Want::Read,
            ErrorCode::WANT_WRITE => Want::Write,
            _ => {
                let v = s.ssl().verify_result();
                let why = if v != X509VerifyResult::OK {
                    format!(
                        "TLS handshake: the server's certificate is not trusted: {}",
                        v.error_string()
                    )
                } else {
                    match e.into_io_error() {
                        Ok(io) => format!("TLS handshake: {io}"),
                        Err(e) if e.ssl_error().is_none() => {
                            "TLS handshake: the server closed the connection (wrong key or \
                             identity, or it refused this client)"
                                .to_string()
                        }
                        Err(e) => format!("TLS handshake: {e}"),
                    }
                };
                return Err(remote_err(uri, why));
            }
        };
        wait(&other, want, Some(until))
            .map_err(|e| io("TLS handshake: no answer within the timeout", e))?;
    }
    if tls.psk_file.is_some() && s.ssl().peer_certificate().is_some() {
        return Err(remote_err(
            uri,
            "TLS handshake: the server answered with a certificate instead of the pre-shared \
             key, which proves nothing about it: refused",
        ));
    }
    Ok(TlsStream(Arc::new(Shared {
        ssl: Mutex::new(s),
        sock: other,
        timeouts: Mutex::new((None, None)),
    })))
}
