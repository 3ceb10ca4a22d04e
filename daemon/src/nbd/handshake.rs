//! The fixed-newstyle handshake: greeting, client flags and option haggling up to `GO` or
//! `EXPORT_NAME`. Works on any `Read + Write` stream, so it is tested against byte fixtures.
//!
//! Supported options: `EXPORT_NAME` (with `NO_ZEROES`), `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `EXTENDED_HEADERS`, `LIST_META_CONTEXT`, `SET_META_CONTEXT`, each handled
//! by its own function that [`negotiate`]'s loop dispatches to; every other option is answered
//! `ERR_UNSUP` and haggling continues.
//!
//! TLS ([`negotiate_tls`], with a [`Tls`] policy): `STARTTLS` is answered `ERR_UNSUP` when the
//! connection offers no TLS, `ACK` when it does, after which haggling stops
//! ([`Haggled::StartTls`]) so that the caller runs the TLS handshake and calls
//! [`negotiate_tls`] again over the encrypted stream, without a new greeting and with everything
//! agreed before forgotten (NBD spec). With TLS required and not yet on, every option but
//! `STARTTLS` and `ABORT` is answered `ERR_TLS_REQD` (`EXPORT_NAME`, which has no error reply,
//! drops the connection): no export list, no data, no downgrade. Once TLS is on, a second
//! `STARTTLS` is `ERR_INVALID`. An export with an authorization list ([`Export::tls_authz`])
//! is `ERR_TLS_REQD` to a client without TLS, `ERR_POLICY` to a TLS client whose identity is
//! not on it (logged, counted in [`TLS_AUTHZ_DENIED`]) and left out of its `LIST`.
//!
//! Corners (NBD spec): `STRUCTURED_REPLY` after `EXTENDED_HEADERS` gets `ERR_EXT_HEADER_REQD`;
//! either header option asked for a second time gets `ERR_INVALID`; an option whose payload is
//! over 64 KiB is read and discarded (within the handshake time limit) and answered
//! `ERR_TOO_BIG` (`EXPORT_NAME`, which has no error reply, drops the connection); every error
//! message fits the protocol's 4096-byte string limit.

use std::io::{self, Read, Write};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::export::{Export, Exports};
use super::wire::{self, Cursor};

/// Largest option payload we take in; longer ones are discarded and answered `ERR_TOO_BIG` (no
/// legitimate option comes near this).
const MAX_OPTION_LEN: u32 = 64 << 10;

/// Meta-context id of `base:allocation` on every connection.
pub const CTX_BASE_ALLOCATION: u32 = 1;
/// Meta-context id of `qemu:allocation-depth` on every connection.
pub const CTX_ALLOCATION_DEPTH: u32 = 2;

/// Meta-context id of `qemu:dirty-bitmap:NAME` for the export's `i`-th exported bitmap
/// ([`crate::backend::disk::Backend::exported_bitmaps`]): `CTX_DIRTY_BITMAP + i`.
pub const CTX_DIRTY_BITMAP: u32 = 3;
/// Prefix of the dirty-bitmap meta contexts (QEMU's: flag 1 = dirty).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
pub use crate::backend::disk::MAX_EXPORTED_BITMAPS;

/// The meta contexts a client selected for block status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaContexts {
    /// `base:allocation` selected.
    pub base_allocation: bool,
    /// `qemu:allocation-depth` selected.
    pub allocation_depth: bool,
    /// `qemu:dirty-bitmap:NAME` selected: bit `i` for the export's `i`-th exported bitmap.
    pub dirty: u64,
}

impl MetaContexts {
    /// Whether any context is selected.
    pub fn any(&self) -> bool {
        self.base_allocation || self.allocation_depth || self.dirty != 0
    }

    /// How many contexts are selected.
    pub fn count(&self) -> u64 {
        u64::from(self.base_allocation)
            + u64::from(self.allocation_depth)
            + u64::from(self.dirty.count_ones())
    }
}

/// What a successful handshake agreed on. `G`: what the caller's `attach` returned for the
/// export (the connection's membership of its client table).
pub struct Negotiated<G = ()> {
    /// The export the client entered transmission on.
    pub export: Arc<Export>,
    /// Structured replies were negotiated (implied by extended headers).
    pub structured: bool,
    /// Extended headers were negotiated: 32-byte requests and replies.
    pub extended: bool,
    /// The meta contexts selected for this export (empty unless structured).
    pub contexts: MetaContexts,
    /// Transmission flags sent to the client.
    pub flags: u16,
    /// The caller's `attach` result.
    pub guard: G,
}

/// How a handshake ended without entering transmission, or failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client sent `ABORT` (answered) or hung up between options.
    #[error("client ended the handshake")]
    Ended,
    /// The client broke the protocol; the connection is dropped.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The socket failed (including the handshake time limit).
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// Option `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// Reply `NBD_REP_ERR_POLICY`: forbidden by the server's policy.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// Reply `NBD_REP_ERR_TLS_REQD`: TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

/// Clients refused by an authorization list since the daemon started: the daemon's (after the
/// TLS handshake) and an export's (its `GO`/`INFO`/`EXPORT_NAME`).
pub static TLS_AUTHZ_DENIED: AtomicU64 = AtomicU64::new(0);

/// How TLS figures in one run of the option haggling.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tls<'a> {
    /// `STARTTLS` is answered `ACK` (credentials are loaded and this listener may use them).
    pub offer: bool,
    /// Every option but `STARTTLS`/`ABORT` is refused until TLS is on.
    pub require: bool,
    /// TLS is on: this run is over the encrypted stream (no greeting is sent).
    pub active: bool,
    /// The client's identity once TLS is on: its certificate's subject DN (RFC 4514) or its
    /// PSK identity; what authorization lists are compared with.
    pub identity: Option<&'a str>,
}

/// How a run of the haggling ended well: transmission, or `STARTTLS` was acknowledged and the
/// caller now runs the TLS handshake, then the haggling again over TLS.
pub enum Haggled<G> {
    /// The client entered transmission.
    Go(Negotiated<G>),
    /// `STARTTLS` was acknowledged. `no_zeroes`: the client's `NO_ZEROES` from the greeting,
    /// for the run over TLS (which sends no new greeting).
    StartTls {
        /// The client asked for `NO_ZEROES` in its greeting flags.
        no_zeroes: bool,
    },
}

/// Runs the server side of the handshake on `stream`.
///
/// `shutting_down` is consulted before each option: once it returns true, options other than
/// `ABORT` get `ERR_SHUTDOWN`.
///
/// `attach` is called on `GO`/`EXPORT_NAME` before anything is answered: the connection joins the
/// export's client table, so from the client's first sight of success it counts as connected.
/// `None` (the export began to be deleted) answers `GO` with `ERR_UNKNOWN` and haggling goes on
/// (`EXPORT_NAME`, which has no error reply, drops the connection).
///
/// The loop reads one option at a time and hands it to the function for that option; each
/// answers it and says whether haggling goes on or transmission begins.
pub fn negotiate<S: Read + Write, G>(
    stream: &mut S,
    exports: &Exports,
    shutting_down: &dyn Fn() -> bool,
    attach: &dyn Fn(&Arc<Export>) -> Option<G>,
) -> Result<Negotiated<G>, HandshakeError> {
    match negotiate_tls(stream, exports, shutting_down, attach, Tls::default(), None)? {
        Haggled::Go(n) => Ok(n),
        // Without an offer STARTTLS is refused, never acknowledged.
        Haggled::StartTls { .. } => Err(HandshakeError::Protocol(
            "STARTTLS acknowledged without TLS".into(),
        )),
    }
}

/// [`negotiate`] with a TLS policy: sends the greeting (and reads the client's flags) when
/// `greeted` is `None` (the first run); after `STARTTLS` no greeting is sent and `greeted`
/// carries the client's `NO_ZEROES` from the first one ([`Haggled::StartTls`] hands it back).
/// See the module docs for what TLS changes.
pub fn negotiate_tls<S: Read + Write, G>(
    stream: &mut S,
    exports: &Exports,
    shutting_down: &dyn Fn() -> bool,
    attach: &dyn Fn(&Arc<Export>) -> Option<G>,
    tls: Tls<'_>,
    greeted: Option<bool>,
) -> Result<Haggled<G>, HandshakeError> {
    // After STARTTLS the flags read at the greeting still hold.
    let no_zeroes = match greeted {
        None => greet(stream)?,
        Some(no_zeroes) => no_zeroes,
    };
    let mut h = Haggle {
        exports,
        attach,
        no_zeroes,
        structured: false,
        extended: false,
        structured_option: false,
        selected: None,
        tls,
    };
    loop {
        // An option over the size limit has been read, discarded and answered.
        let Some((option, data)) = read_option(stream)? else {
            continue;
        };
        if option == wire::OPT_ABORT {
            return Err(abort(stream));
        }
        if shutting_down() {
            refuse_shutting_down(stream, option)?;
            continue;
        }
        if tls.require && !tls.active && option != OPT_STARTTLS {
            refuse_tls_required(stream, option)?;
            stream.flush()?;
            continue;
        }
        let next = match option {
            wire::OPT_EXPORT_NAME => h.export_name(stream, data)?,
            wire::OPT_INFO | wire::OPT_GO => h.info_go(stream, option, &data)?,
            wire::OPT_LIST => h.list(stream, &data)?,
            wire::OPT_STRUCTURED_REPLY => h.structured_reply(stream, &data)?,
            wire::OPT_EXTENDED_HEADERS => h.extended_headers(stream, &data)?,
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                h.meta_context(stream, option, &data)?
            }
            OPT_STARTTLS => {
                if starttls(stream, &tls, &data)? {
                    stream.flush()?;
                    return Ok(Haggled::StartTls {
                        no_zeroes: h.no_zeroes,
                    });
                }
                ControlFlow::Continue(())
            }
            _ => unsupported(stream, option)?,
        };
        if let ControlFlow::Break(negotiated) = next {
            return Ok(Haggled::Go(negotiated));
        }
        stream.flush()?;
    }
}

/// What an option's function tells the loop: haggle on, or enter transmission.
type Next<G> = ControlFlow<Negotiated<G>>;

/// Sends the greeting and reads the client's flags; returns whether the client asked for
/// `NO_ZEROES`.
fn greet<S: Read + Write>(stream: &mut S) -> Result<bool, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&wire::NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    stream.flush()?;

    let mut cf = [0u8; 4];
    read_or_ended(stream, &mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & wire::FLAG_C_NO_ZEROES != 0)
}

/// Fills `buf`; the client hanging up first ends the handshake.
fn read_or_ended<S: Read>(stream: &mut S, buf: &mut [u8]) -> Result<(), HandshakeError> {
    match stream.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(HandshakeError::Ended),
        Err(e) => Err(e.into()),
    }
}

/// Reads the next option: its code and payload. A payload over [`MAX_OPTION_LEN`] is read and
/// discarded and answered `ERR_TOO_BIG` (`None`); an `EXPORT_NAME` that long drops the
/// connection (it has no error reply).
fn read_option<S: Read + Write>(stream: &mut S) -> Result<Option<(u32, Vec<u8>)>, HandshakeError> {
    let mut head = [0u8; 16];
    read_or_ended(stream, &mut head)?;
    let mut c = Cursor::new(&head);
    let magic = u64::from(c.u32().unwrap_or(0)) << 32 | u64::from(c.u32().unwrap_or(0));
    let option = c.u32().unwrap_or(0);
    let len = c.u32().unwrap_or(0);
    if magic != wire::IHAVEOPT {
        return Err(HandshakeError::Protocol(format!(
            "bad option magic {magic:#x}"
        )));
    }
    if len > MAX_OPTION_LEN {
        if option == wire::OPT_EXPORT_NAME {
            return Err(HandshakeError::Protocol(format!(
                "EXPORT_NAME of {len} bytes is too long"
            )));
        }
        let copied = io::copy(
            &mut Read::by_ref(stream).take(u64::from(len)),
            &mut io::sink(),
        )?;
        if copied < u64::from(len) {
            return Err(HandshakeError::Ended);
        }
        reply_err(
            stream,
            option,
            wire::REP_ERR_TOO_BIG,
            &format!("option payload of {len} bytes is over the {MAX_OPTION_LEN}-byte limit"),
        )?;
        return Ok(None);
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    Ok(Some((option, data)))
}

/// `ABORT`: acknowledged (the client may already have closed; a failed ACK is not an error),
/// and the handshake ends.
fn abort<S: Write>(stream: &mut S) -> HandshakeError {
    let _ = stream.write_all(&wire::option_reply(wire::OPT_ABORT, wire::REP_ACK, &[]));
    let _ = stream.flush();
    HandshakeError::Ended
}

/// Any option but `ABORT` once the server is shutting down: `ERR_SHUTDOWN` (`EXPORT_NAME`,
/// which has no error reply, drops the connection).
fn refuse_shutting_down<S: Write>(stream: &mut S, option: u32) -> Result<(), HandshakeError> {
    if option == wire::OPT_EXPORT_NAME {
        return Err(HandshakeError::Protocol("server is shutting down".into()));
    }
    reply_err(
        stream,
        option,
        wire::REP_ERR_SHUTDOWN,
        "server is shutting down",
    )?;
    Ok(())
}

/// `STARTTLS`: `ERR_UNSUP` when this connection offers no TLS (haggling goes on in the clear;
/// the client decides whether that is acceptable), `ERR_INVALID` when TLS is already on or the
/// option carries data; otherwise `ACK` and true: the caller upgrades the stream and haggles
/// again over it, with the state agreed so far forgotten.
fn starttls<S: Write>(stream: &mut S, tls: &Tls<'_>, data: &[u8]) -> Result<bool, HandshakeError> {
    let refusal = if tls.active {
        Some((wire::REP_ERR_INVALID, "STARTTLS: TLS is already on"))
    } else if !tls.offer {
        Some((
            wire::REP_ERR_UNSUP,
            "STARTTLS: this server does not offer TLS here",
        ))
    } else if !data.is_empty() {
        Some((wire::REP_ERR_INVALID, "STARTTLS takes no data"))
    } else {
        None
    };
    match refusal {
        Some((err, msg)) => {
            reply_err(stream, OPT_STARTTLS, err, msg)?;
            Ok(false)
        }
        None => {
            stream.write_all(&wire::option_reply(OPT_STARTTLS, wire::REP_ACK, &[]))?;
            Ok(true)
        }
    }
}

/// Any option but `STARTTLS`/`ABORT` while TLS is required and not on: `ERR_TLS_REQD`
/// (`EXPORT_NAME`, which has no error reply, drops the connection).
fn refuse_tls_required<S: Write>(stream: &mut S, option: u32) -> Result<(), HandshakeError> {
    if option == wire::OPT_EXPORT_NAME {
        return Err(HandshakeError::Protocol(
            "EXPORT_NAME before STARTTLS on a server that requires TLS".into(),
        ));
    }
    reply_err(
        stream,
        option,
        REP_ERR_TLS_REQD,
        "TLS is required: send STARTTLS first",
    )?;
    Ok(())
}

/// Any option this server does not know: `ERR_UNSUP`, and haggling goes on.
fn unsupported<S: Write, G>(stream: &mut S, option: u32) -> Result<Next<G>, HandshakeError> {
    reply_err(
        stream,
        option,
        wire::REP_ERR_UNSUP,
        &format!("option {option} is not supported"),
    )?;
    Ok(ControlFlow::Continue(()))
}

/// `ERR_INVALID` with `msg`, and haggling goes on.
fn invalid<S: Write, G>(stream: &mut S, option: u32, msg: &str) -> Result<Next<G>, HandshakeError> {
    reply_err(stream, option, wire::REP_ERR_INVALID, msg)?;
    Ok(ControlFlow::Continue(()))
}

/// The ACK that ends a successful option.
fn ack<S: Write, G>(stream: &mut S, option: u32) -> Result<Next<G>, HandshakeError> {
    stream.write_all(&wire::option_reply(option, wire::REP_ACK, &[]))?;
    Ok(ControlFlow::Continue(()))
}

/// What the haggling agreed on so far, and what the options' functions need.
struct Haggle<'a, G> {
    exports: &'a Exports,
    attach: &'a dyn Fn(&Arc<Export>) -> Option<G>,
    /// The client asked for `NO_ZEROES` (no 124 zero bytes after `EXPORT_NAME`'s answer).
    no_zeroes: bool,
    /// Structured replies (asked for, or implied by extended headers).
    structured: bool,
    /// Extended headers.
    extended: bool,
    /// `STRUCTURED_REPLY` itself was acked.
    structured_option: bool,
    /// The last `SET_META_CONTEXT`: the export name it named and what it selected.
    selected: Option<(String, MetaContexts)>,
    /// TLS state and the client's identity.
    tls: Tls<'a>,
}

impl<G> Haggle<'_, G> {
    /// Whether this client may use `export` under its authorization list: `None` if so, else
    /// the error reply and its message (a refused TLS client is logged and counted).
    fn refusal(&self, export: &Export) -> Option<(u32, String)> {
        let list = export.tls_authz()?;
        if !self.tls.active {
            return Some((
                REP_ERR_TLS_REQD,
                format!("export {} requires TLS", quoted(&export.name)),
            ));
        }
        let id = self.tls.identity.unwrap_or("");
        if list.iter().any(|a| a == id) {
            return None;
        }
        TLS_AUTHZ_DENIED.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(export = ?export.name, identity = ?id, "TLS client not on the export's authorization list; refused");
        Some((
            REP_ERR_POLICY,
            format!("export {}: not authorized", quoted(&export.name)),
        ))
    }

    /// What transmission on `export` (named `name`) begins with.
    fn negotiated(&self, export: Arc<Export>, name: &str, flags: u16, guard: G) -> Negotiated<G> {
        Negotiated {
            export,
            structured: self.structured,
            extended: self.extended,
            contexts: contexts_for(&self.selected, name, self.structured),
            flags,
            guard,
        }
    }

    /// `EXPORT_NAME`: the old way into transmission. It has no error reply, so anything wrong
    /// (extended headers negotiated, a name not UTF-8, no such export, one being deleted)
    /// drops the connection.
    fn export_name<S: Write>(
        &mut self,
        stream: &mut S,
        data: Vec<u8>,
    ) -> Result<Next<G>, HandshakeError> {
        if self.extended {
            return Err(HandshakeError::Protocol(
                "EXPORT_NAME after extended headers".into(),
            ));
        }
        let name = String::from_utf8(data)
            .map_err(|_| HandshakeError::Protocol("export name is not UTF-8".into()))?;
        let Some(export) = self.exports.find(&name) else {
            return Err(HandshakeError::Protocol(format!(
                "EXPORT_NAME for unknown export {name:?}"
            )));
        };
        if let Some((_, why)) = self.refusal(&export) {
            return Err(HandshakeError::Protocol(format!("EXPORT_NAME: {why}")));
        }
        let Some(guard) = (self.attach)(&export) else {
            return Err(HandshakeError::Protocol(format!(
                "EXPORT_NAME for export {name:?}, which is being deleted"
            )));
        };
        let flags = export.transmission_flags(self.structured);
        let mut b = Vec::with_capacity(134);
        b.extend_from_slice(&export.backend.size().to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            b.extend_from_slice(&[0u8; 124]);
        }
        stream.write_all(&b)?;
        stream.flush()?;
        Ok(ControlFlow::Break(
            self.negotiated(export, &name, flags, guard),
        ))
    }

    /// `INFO` and `GO`: the export's size and flags, its name if asked, its block sizes. `GO`
    /// then enters transmission (after `attach`: an export being deleted is `ERR_UNKNOWN`).
    fn info_go<S: Write>(
        &mut self,
        stream: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Next<G>, HandshakeError> {
        let Some((name, requests)) = parse_info(data) else {
            return invalid(stream, option, "malformed INFO/GO");
        };
        let Some(export) = self.exports.find(&name) else {
            reply_err(
                stream,
                option,
                wire::REP_ERR_UNKNOWN,
                &format!("no export named {}", quoted(&name)),
            )?;
            return Ok(ControlFlow::Continue(()));
        };
        if let Some((err, why)) = self.refusal(&export) {
            reply_err(stream, option, err, &why)?;
            return Ok(ControlFlow::Continue(()));
        }
        let guard = if option == wire::OPT_GO {
            let Some(g) = (self.attach)(&export) else {
                reply_err(
                    stream,
                    option,
                    wire::REP_ERR_UNKNOWN,
                    &format!("export {} is being deleted", quoted(&name)),
                )?;
                return Ok(ControlFlow::Continue(()));
            };
            Some(g)
        } else {
            None
        };
        let flags = export.transmission_flags(self.structured);
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&wire::INFO_EXPORT.to_be_bytes());
        p.extend_from_slice(&export.backend.size().to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        stream.write_all(&wire::option_reply(option, wire::REP_INFO, &p))?;
        if requests.contains(&wire::INFO_NAME) {
            let mut p = Vec::with_capacity(2 + name.len());
            p.extend_from_slice(&wire::INFO_NAME.to_be_bytes());
            p.extend_from_slice(name.as_bytes());
            stream.write_all(&wire::option_reply(option, wire::REP_INFO, &p))?;
        }
        let mut p = Vec::with_capacity(14);
        p.extend_from_slice(&wire::INFO_BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&wire::MIN_BLOCK.to_be_bytes());
        p.extend_from_slice(&wire::PREFERRED_BLOCK.to_be_bytes());
        p.extend_from_slice(&wire::MAX_PAYLOAD.to_be_bytes());
        stream.write_all(&wire::option_reply(option, wire::REP_INFO, &p))?;
        stream.write_all(&wire::option_reply(option, wire::REP_ACK, &[]))?;
        match guard {
            Some(guard) => {
                stream.flush()?;
                Ok(ControlFlow::Break(
                    self.negotiated(export, &name, flags, guard),
                ))
            }
            None => Ok(ControlFlow::Continue(())),
        }
    }

    /// `LIST`: one `SERVER` reply per export being served.
    fn list<S: Write>(&mut self, stream: &mut S, data: &[u8]) -> Result<Next<G>, HandshakeError> {
        if !data.is_empty() {
            return invalid(stream, wire::OPT_LIST, "LIST takes no data");
        }
        for e in self.exports.serving() {
            // Quietly: a listing is no attempt to use the export.
            if e.tls_authz().is_some_and(|list| {
                !self.tls.active || !list.iter().any(|a| Some(a.as_str()) == self.tls.identity)
            }) {
                continue;
            }
            let mut p = Vec::with_capacity(4 + e.name.len());
            p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
            p.extend_from_slice(e.name.as_bytes());
            stream.write_all(&wire::option_reply(wire::OPT_LIST, wire::REP_SERVER, &p))?;
        }
        ack(stream, wire::OPT_LIST)
    }

    /// `STRUCTURED_REPLY`: once, not after extended headers (`ERR_EXT_HEADER_REQD`).
    fn structured_reply<S: Write>(
        &mut self,
        stream: &mut S,
        data: &[u8],
    ) -> Result<Next<G>, HandshakeError> {
        let option = wire::OPT_STRUCTURED_REPLY;
        if self.extended {
            reply_err(
                stream,
                option,
                wire::REP_ERR_EXT_HEADER_REQD,
                "extended headers are already negotiated",
            )?;
            return Ok(ControlFlow::Continue(()));
        }
        if self.structured_option {
            return invalid(stream, option, "structured replies are already negotiated");
        }
        if !data.is_empty() {
            return invalid(stream, option, "STRUCTURED_REPLY takes no data");
        }
        self.structured = true;
        self.structured_option = true;
        ack(stream, option)
    }

    /// `EXTENDED_HEADERS`: once; implies structured replies.
    fn extended_headers<S: Write>(
        &mut self,
        stream: &mut S,
        data: &[u8],
    ) -> Result<Next<G>, HandshakeError> {
        let option = wire::OPT_EXTENDED_HEADERS;
        if self.extended {
            return invalid(stream, option, "extended headers are already negotiated");
        }
        if !data.is_empty() {
            return invalid(stream, option, "EXTENDED_HEADERS takes no data");
        }
        self.extended = true;
        self.structured = true;
        ack(stream, option)
    }

    /// `LIST_META_CONTEXT` and `SET_META_CONTEXT` (needs structured replies): the contexts
    /// the queries name, with their ids for `SET`. A `SET` replaces the previous selection,
    /// even when it fails.
    fn meta_context<S: Write>(
        &mut self,
        stream: &mut S,
        option: u32,
        data: &[u8],
    ) -> Result<Next<G>, HandshakeError> {
        let set = option == wire::OPT_SET_META_CONTEXT;
        if set {
            self.selected = None;
        }
        if !self.structured {
            return invalid(stream, option, "meta contexts need structured replies");
        }
        let Some((name, queries)) = parse_meta(data) else {
            return invalid(stream, option, "malformed meta request");
        };
        let Some(export) = self.exports.find(&name) else {
            reply_err(
                stream,
                option,
                wire::REP_ERR_UNKNOWN,
                &format!("no export named {}", quoted(&name)),
            )?;
            return Ok(ControlFlow::Continue(()));
        };
        let bitmaps = export.backend.exported_bitmaps();
        let ctx = match_contexts(&queries, set, &bitmaps);
        if ctx.base_allocation {
            let id = if set { CTX_BASE_ALLOCATION } else { 0 };
            meta_reply(stream, option, id, wire::CONTEXT_BASE_ALLOCATION)?;
        }
        if ctx.allocation_depth {
            let id = if set { CTX_ALLOCATION_DEPTH } else { 0 };
            meta_reply(stream, option, id, "qemu:allocation-depth")?;
        }
        for (i, b) in bitmaps.iter().enumerate() {
            if ctx.dirty & (1 << i) != 0 {
                let id = if set { CTX_DIRTY_BITMAP + i as u32 } else { 0 };
                meta_reply(stream, option, id, &format!("{DIRTY_BITMAP_PREFIX}{b}"))?;
            }
        }
        if set {
            self.selected = Some((name, ctx));
        }
        ack(stream, option)
    }
}

/// The contexts a GO/EXPORT_NAME to `name` may use: those of the last SET, if it named `name`.
fn contexts_for(
    selected: &Option<(String, MetaContexts)>,
    name: &str,
    structured: bool,
) -> MetaContexts {
    match selected {
        Some((n, ctx)) if n == name && structured => *ctx,
        _ => MetaContexts::default(),
    }
}

/// Which contexts the queries name. LIST with no queries lists everything; `base:` and
/// `qemu:` are wildcards in LIST only. Unknown names are ignored.
/// `bitmaps`: the export's exported dirty bitmaps (`qemu:dirty-bitmap:NAME`, QEMU's
/// `qemu:dirty-bitmap:` wildcard in LIST).
fn match_contexts(queries: &[String], set: bool, bitmaps: &[String]) -> MetaContexts {
    let all_dirty = if bitmaps.len() >= 64 {
        u64::MAX
    } else {
        (1u64 << bitmaps.len()) - 1
    };
    let mut ctx = MetaContexts::default();
    if queries.is_empty() && !set {
        return MetaContexts {
            base_allocation: true,
            allocation_depth: true,
            dirty: all_dirty,
        };
    }
    for q in queries {
        match q.as_str() {
            wire::CONTEXT_BASE_ALLOCATION => ctx.base_allocation = true,
            "qemu:allocation-depth" => ctx.allocation_depth = true,
            "base:" if !set => ctx.base_allocation = true,
            "qemu:" if !set => {
                ctx.allocation_depth = true;
                ctx.dirty = all_dirty;
            }
            DIRTY_BITMAP_PREFIX if !set => ctx.dirty = all_dirty,
            q => {
                if let Some(name) = q.strip_prefix(DIRTY_BITMAP_PREFIX) {
                    if let Some(i) = bitmaps.iter().position(|b| b == name) {
                        ctx.dirty |= 1 << i;
                    }
                }
            }
        }
    }
    ctx
}

fn meta_reply<S: Write>(stream: &mut S, option: u32, id: u32, name: &str) -> io::Result<()> {
    let mut p = Vec::with_capacity(4 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    stream.write_all(&wire::option_reply(option, wire::REP_META_CONTEXT, &p))
}

/// Sends an error reply; its message is cut to the protocol's 4096-byte string limit.
fn reply_err<S: Write>(stream: &mut S, option: u32, err: u32, msg: &str) -> io::Result<()> {
    let msg = wire::cut(msg, wire::MAX_STRING);
    stream.write_all(&wire::option_reply(option, err, msg.as_bytes()))?;
    stream.flush()
}

/// A client-supplied name, quoted and escaped for a message, at most about 200 bytes.
fn quoted(name: &str) -> String {
    const SHOWN: usize = 160;
    let cut = wire::cut(name, SHOWN);
    if cut.len() < name.len() {
        format!("{cut:?}... ({} bytes)", name.len())
    } else {
        format!("{name:?}")
    }
}

/// A length-prefixed string of at most [`wire::MAX_STRING`] bytes.
fn string(c: &mut Cursor<'_>) -> Option<String> {
    let len = c.u32()? as usize;
    if len > wire::MAX_STRING {
        return None;
    }
    String::from_utf8(c.take(len)?.to_vec()).ok()
}

/// INFO/GO payload: export name, then the requested info types.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor::new(data);
    let name = string(&mut c)?;
    let n = c.u16()?;
    let mut reqs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        reqs.push(c.u16()?);
    }
    c.is_empty().then_some((name, reqs))
}

/// LIST/SET_META_CONTEXT payload: export name, then the queries.
fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor::new(data);
    let name = string(&mut c)?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(string(&mut c)?);
    }
    c.is_empty().then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor as IoCursor;

    use super::*;
    use crate::backend::memory::MemDisk;

    /// A scripted client: reads come from `input`, writes go to `output`.
    struct Script {
        input: IoCursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = wire::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn exports() -> Arc<Exports> {
        Exports::new(vec![
            Export::new("", MemDisk::new(1 << 20, false), 1),
            Export::new("ro", MemDisk::new(4096, true), 1),
        ])
    }

    fn run(client: Vec<u8>) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        let mut s = Script {
            input: IoCursor::new(client),
            output: Vec::new(),
        };
        let r = negotiate(&mut s, &exports(), &|| false, &|_| Some(()));
        (r, s.output)
    }

    /// Splits option replies after the 18-byte greeting: (option, type, payload).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut rest = &out[18..];
        while rest.len() >= 20 {
            assert_eq!(&rest[0..8], &wire::OPTION_REPLY_MAGIC.to_be_bytes());
            let o = u32::from_be_bytes(rest[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(rest[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            v.push((o, t, rest[20..20 + l].to_vec()));
            rest = &rest[20 + l..];
        }
        v
    }

    fn go(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn greeting_bytes_are_exact() {
        let (r, out) = run(vec![0, 0, 0, 3]);
        assert!(matches!(r, Err(HandshakeError::Ended)));
        assert_eq!(
            out,
            [
                0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f,
                0x50, 0x54, 0, 3
            ]
        );
    }

    #[test]
    fn unknown_client_flags_drop_the_connection() {
        let (r, _) = run(vec![0, 0, 0, 7]);
        assert!(matches!(r, Err(HandshakeError::Protocol(_))));
    }

    #[test]
    fn unknown_option_is_unsup_then_go_works() {
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(42, b"junkjunk"));
        c.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(wire::OPT_GO, &go("", &[wire::INFO_NAME])));
        let (r, out) = run(c);
        let n = r.unwrap();
        assert!(n.structured);
        assert_eq!(n.flags, 0x0ded);
        let reps = replies(&out);
        assert_eq!(reps[0].0, 42);
        assert_eq!(reps[0].1, wire::REP_ERR_UNSUP);
        assert_eq!(reps[1], (wire::OPT_STRUCTURED_REPLY, wire::REP_ACK, vec![]));
        // INFO_EXPORT: type 0, size 1 MiB, flags.
        assert_eq!(reps[2].2, [0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x0d, 0xed]);
        assert_eq!(reps[3].2, [0, 1]); // INFO_NAME ""
        assert_eq!(reps[4].2, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        assert_eq!(reps[5], (wire::OPT_GO, wire::REP_ACK, vec![]));
        assert_eq!(reps.len(), 6);
    }

    #[test]
    fn go_unknown_export_is_err_unknown_and_haggling_goes_on() {
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_GO, &go("nope", &[])));
        c.extend(opt(wire::OPT_GO, &go("ro", &[])));
        let (r, out) = run(c);
        let n = r.unwrap();
        assert_eq!(n.export.name, "ro");
        assert_ne!(n.flags & wire::FLAG_READ_ONLY, 0);
        assert_eq!(n.flags & wire::FLAG_SEND_DF, 0);
        assert_eq!(replies(&out)[0].1, wire::REP_ERR_UNKNOWN);
    }

    /// The connection joins the export's client table before GO is answered; an export being
    /// deleted answers ERR_UNKNOWN and haggling goes on. INFO attaches nothing.
    #[test]
    fn go_attaches_before_answering_and_a_deleted_export_is_unknown() {
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_INFO, &go("ro", &[])));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        c.extend(opt(wire::OPT_GO, &go("ro", &[])));
        let mut s = Script {
            input: IoCursor::new(c),
            output: Vec::new(),
        };
        let asked = std::cell::RefCell::new(Vec::new());
        let attach = |e: &Arc<Export>| {
            asked.borrow_mut().push(e.name.clone());
            (e.name == "ro").then_some(7u8)
        };
        let n = negotiate(&mut s, &exports(), &|| false, &attach).unwrap();
        assert_eq!((n.export.name.as_str(), n.guard), ("ro", 7));
        assert_eq!(*asked.borrow(), ["", "ro"], "INFO must not attach");
        let reps = replies(&s.output);
        // INFO: INFO_EXPORT, BLOCK_SIZE, ACK; GO "": ERR_UNKNOWN; GO "ro": INFO, INFO, ACK.
        let types: Vec<u32> = reps.iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            [
                wire::REP_INFO,
                wire::REP_INFO,
                wire::REP_ACK,
                wire::REP_ERR_UNKNOWN,
                wire::REP_INFO,
                wire::REP_INFO,
                wire::REP_ACK
            ]
        );
    }

    #[test]
    fn malformed_go_is_invalid() {
        let mut c = vec![0, 0, 0, 3];
        let mut bad = go("", &[1]);
        bad.push(9); // trailing byte
        c.extend(opt(wire::OPT_GO, &bad));
        c.extend(opt(wire::OPT_GO, &[0, 0, 0, 200])); // name longer than payload
        let (r, out) = run(c);
        assert!(matches!(r, Err(HandshakeError::Ended)));
        let reps = replies(&out);
        assert_eq!(reps[0].1, wire::REP_ERR_INVALID);
        assert_eq!(reps[1].1, wire::REP_ERR_INVALID);
    }

    #[test]
    fn list_names_every_export() {
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_LIST, &[]));
        c.extend(opt(wire::OPT_ABORT, &[]));
        let (r, out) = run(c);
        assert!(matches!(r, Err(HandshakeError::Ended)));
        let reps = replies(&out);
        assert_eq!(
            reps[0],
            (wire::OPT_LIST, wire::REP_SERVER, vec![0, 0, 0, 0])
        );
        assert_eq!(
            reps[1],
            (
                wire::OPT_LIST,
                wire::REP_SERVER,
                vec![0, 0, 0, 2, b'r', b'o']
            )
        );
        assert_eq!(reps[2], (wire::OPT_LIST, wire::REP_ACK, vec![]));
        assert_eq!(reps[3], (wire::OPT_ABORT, wire::REP_ACK, vec![]));
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (cflags, tail) in [(3u8, 10usize), (1, 134)] {
            let mut c = vec![0, 0, 0, cflags];
            c.extend(opt(wire::OPT_EXPORT_NAME, b""));
            let (r, out) = run(c);
            let n = r.unwrap();
            assert!(!n.structured);
            assert_eq!(out.len(), 18 + tail);
            assert_eq!(&out[18..26], &(1u64 << 20).to_be_bytes());
            assert_eq!(&out[26..28], &0x0d6du16.to_be_bytes());
        }
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_EXPORT_NAME, b"missing"));
        assert!(matches!(run(c).0, Err(HandshakeError::Protocol(_))));
    }

    /// After STARTTLS there is no new greeting: the client's NO_ZEROES from the first one
    /// still decides whether EXPORT_NAME's reply carries the 124 zero bytes.
    #[test]
    fn export_name_over_tls_keeps_the_greetings_no_zeroes() {
        let tls = Tls {
            offer: true,
            active: true,
            ..Tls::default()
        };
        for (no_zeroes, len) in [(true, 10usize), (false, 134)] {
            let mut s = Script {
                input: IoCursor::new(opt(wire::OPT_EXPORT_NAME, b"")),
                output: Vec::new(),
            };
            let r = negotiate_tls(
                &mut s,
                &exports(),
                &|| false,
                &|_| Some(()),
                tls,
                Some(no_zeroes),
            );
            assert!(matches!(r, Ok(Haggled::Go(_))), "NO_ZEROES {no_zeroes}");
            assert_eq!(
                s.output.len(),
                len,
                "NO_ZEROES {no_zeroes}: no greeting, only the reply"
            );
        }
    }

    #[test]
    fn meta_contexts_list_set_and_apply() {
        let mut c = vec![0, 0, 0, 3];
        // SET before STRUCTURED_REPLY is invalid.
        c.extend(opt(
            wire::OPT_SET_META_CONTEXT,
            &meta("", &["base:allocation"]),
        ));
        c.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(wire::OPT_LIST_META_CONTEXT, &meta("", &[])));
        c.extend(opt(
            wire::OPT_SET_META_CONTEXT,
            &meta("", &["base:allocation", "qemu:allocation-depth", "x:y"]),
        ));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        let (r, out) = run(c);
        let n = r.unwrap();
        assert!(n.contexts.base_allocation && n.contexts.allocation_depth);
        let reps = replies(&out);
        assert_eq!(reps[0].1, wire::REP_ERR_INVALID);
        assert_eq!(reps[1].1, wire::REP_ACK);
        let mut ctx = vec![0, 0, 0, 0];
        ctx.extend_from_slice(b"base:allocation");
        assert_eq!(
            reps[2],
            (wire::OPT_LIST_META_CONTEXT, wire::REP_META_CONTEXT, ctx)
        );
        assert_eq!(reps[3].1, wire::REP_META_CONTEXT);
        assert_eq!(reps[4].1, wire::REP_ACK);
        let mut ctx = vec![0, 0, 0, 1];
        ctx.extend_from_slice(b"base:allocation");
        assert_eq!(
            reps[5],
            (wire::OPT_SET_META_CONTEXT, wire::REP_META_CONTEXT, ctx)
        );
        let mut ctx = vec![0, 0, 0, 2];
        ctx.extend_from_slice(b"qemu:allocation-depth");
        assert_eq!(reps[6].2, ctx);
        assert_eq!(reps[7].1, wire::REP_ACK);
    }

    #[test]
    fn extended_headers_imply_structured_and_forbid_export_name() {
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_EXTENDED_HEADERS, &[]));
        c.extend(opt(
            wire::OPT_SET_META_CONTEXT,
            &meta("", &["base:allocation"]),
        ));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        let (r, out) = run(c);
        let n = r.unwrap();
        assert!(n.extended && n.structured && n.contexts.base_allocation);
        assert_eq!(
            replies(&out)[0],
            (wire::OPT_EXTENDED_HEADERS, wire::REP_ACK, vec![])
        );
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_EXTENDED_HEADERS, &[]));
        c.extend(opt(wire::OPT_EXPORT_NAME, b""));
        assert!(matches!(run(c).0, Err(HandshakeError::Protocol(_))));
    }

    #[test]
    fn contexts_set_for_another_export_do_not_apply() {
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(
            wire::OPT_SET_META_CONTEXT,
            &meta("ro", &["base:allocation"]),
        ));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        assert!(!run(c).0.unwrap().contexts.any());
    }

    #[test]
    fn oversized_options_are_drained_and_too_big_garbage_closes() {
        // An option over 64 KiB is read whole, answered ERR_TOO_BIG, and haggling goes on.
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(99, &vec![7u8; (64 << 10) + 1]));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        let (r, out) = run(c);
        assert!(r.is_ok(), "GO after an oversized option");
        let reps = replies(&out);
        assert_eq!(reps[0].0, 99);
        assert_eq!(reps[0].1, wire::REP_ERR_TOO_BIG);
        assert_eq!(reps.last().unwrap().1, wire::REP_ACK);
        // One that announces more than it sends: the client vanished.
        let mut c = vec![0, 0, 0, 3];
        let mut o = opt(99, &[]);
        o[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        c.extend(o);
        assert!(matches!(run(c).0, Err(HandshakeError::Ended)));
        // EXPORT_NAME cannot be answered with an error: dropped.
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_EXPORT_NAME, &vec![b'a'; (64 << 10) + 1]));
        assert!(matches!(run(c).0, Err(HandshakeError::Protocol(_))));
        let mut c = vec![0, 0, 0, 3];
        c.extend_from_slice(&[0xff; 16]);
        assert!(matches!(run(c).0, Err(HandshakeError::Protocol(_))));
        // Truncated option payload: the client vanished.
        let mut c = vec![0, 0, 0, 3];
        let mut o = opt(wire::OPT_GO, &go("", &[]));
        o.truncate(20);
        c.extend(o);
        assert!(run(c).0.is_err());
    }

    /// STRUCTURED_REPLY after EXTENDED_HEADERS: ERR_EXT_HEADER_REQD; either option a second
    /// time: ERR_INVALID; extended headers after structured replies: fine.
    #[test]
    fn header_options_in_the_wrong_order_or_twice() {
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_EXTENDED_HEADERS, &[]));
        c.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(wire::OPT_EXTENDED_HEADERS, &[]));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        let (r, out) = run(c);
        assert!(r.unwrap().extended);
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            &types[..3],
            [
                wire::REP_ACK,
                wire::REP_ERR_EXT_HEADER_REQD,
                wire::REP_ERR_INVALID
            ]
        );
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(wire::OPT_EXTENDED_HEADERS, &[]));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        let (r, out) = run(c);
        assert!(r.unwrap().extended);
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            &types[..3],
            [wire::REP_ACK, wire::REP_ERR_INVALID, wire::REP_ACK]
        );
    }

    /// Error messages stay within the 4096-byte string limit even for a 4096-byte export name
    /// that escapes to six times its length.
    #[test]
    fn error_messages_fit_the_string_limit() {
        let name: String = "\u{1}".repeat(4096);
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(wire::OPT_GO, &go(&name, &[])));
        c.extend(opt(wire::OPT_INFO, &go(&name, &[])));
        c.extend(opt(
            wire::OPT_SET_META_CONTEXT,
            &meta(&name, &["base:allocation"]),
        ));
        c.extend(opt(wire::OPT_ABORT, &[]));
        let (_, out) = run(c);
        let reps = replies(&out);
        assert_eq!(reps.len(), 5);
        for r in &reps[1..4] {
            assert_eq!(r.1, wire::REP_ERR_UNKNOWN);
            assert!(r.2.len() <= wire::MAX_STRING, "{} bytes", r.2.len());
            assert!(std::str::from_utf8(&r.2).is_ok());
        }
    }

    /// STARTTLS is refused (no TLS here) and haggling goes on in the clear.
    #[test]
    fn starttls_is_unsupported_and_haggling_goes_on() {
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(OPT_STARTTLS, &[]));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        let (r, out) = run(c);
        assert_eq!(r.unwrap().export.name, "");
        let reps = replies(&out);
        assert_eq!((reps[0].0, reps[0].1), (OPT_STARTTLS, wire::REP_ERR_UNSUP));
        assert!(std::str::from_utf8(&reps[0].2).unwrap().contains("TLS"));
        assert_eq!(reps.last().unwrap().1, wire::REP_ACK);
    }

    #[test]
    fn shutdown_refuses_options() {
        let mut s = Script {
            input: IoCursor::new({
                let mut c = vec![0, 0, 0, 3];
                c.extend(opt(wire::OPT_GO, &go("", &[])));
                c
            }),
            output: Vec::new(),
        };
        let r = negotiate(&mut s, &exports(), &|| true, &|_| Some(()));
        assert!(matches!(r, Err(HandshakeError::Ended)));
        assert_eq!(replies(&s.output)[0].1, wire::REP_ERR_SHUTDOWN);
    }

    fn run_tls(
        client: Vec<u8>,
        exports: &Exports,
        tls: Tls<'_>,
        greet: bool,
    ) -> (Result<Haggled<()>, HandshakeError>, Vec<u8>) {
        let mut s = Script {
            input: IoCursor::new(client),
            output: Vec::new(),
        };
        let greeted = if greet { None } else { Some(true) };
        let r = negotiate_tls(&mut s, exports, &|| false, &|_| Some(()), tls, greeted);
        (r, s.output)
    }

    /// Required and not on: every option but STARTTLS/ABORT is ERR_TLS_REQD (no export list),
    /// STARTTLS is ACKed and ends the run; EXPORT_NAME drops the connection.
    #[test]
    fn tls_required_refuses_everything_but_starttls() {
        let tls = Tls {
            offer: true,
            require: true,
            ..Tls::default()
        };
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_LIST, &[]));
        c.extend(opt(wire::OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        c.extend(opt(OPT_STARTTLS, &[]));
        c.extend(opt(wire::OPT_GO, &go("", &[]))); // never read: the caller upgrades first
        let (r, out) = run_tls(c, &exports(), tls, true);
        assert!(matches!(r, Ok(Haggled::StartTls { .. })));
        let types: Vec<(u32, u32)> = replies(&out).iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            types,
            [
                (wire::OPT_LIST, REP_ERR_TLS_REQD),
                (wire::OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (wire::OPT_GO, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, wire::REP_ACK),
            ]
        );
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_EXPORT_NAME, b""));
        assert!(matches!(
            run_tls(c, &exports(), tls, true).0,
            Err(HandshakeError::Protocol(_))
        ));
    }

    /// Over TLS (no greeting): STARTTLS again is ERR_INVALID; an export's authorization list
    /// lets its identities in, refuses others with ERR_POLICY (counted) and hides the export
    /// from their LIST; without TLS such an export is ERR_TLS_REQD.
    #[test]
    fn over_tls_starttls_is_invalid_and_export_authz_applies() {
        let exports = Exports::new(vec![
            Export::new("", MemDisk::new(1 << 20, false), 1),
            Export::new("carol", MemDisk::new(4096, true), 1),
        ]);
        exports
            .find("carol")
            .unwrap()
            .set_tls_authz(vec!["CN=carol".into()]);
        let tls = |identity| Tls {
            offer: true,
            require: true,
            active: true,
            identity,
        };
        let mut c = opt(OPT_STARTTLS, &[]);
        c.extend(opt(wire::OPT_LIST, &[]));
        c.extend(opt(wire::OPT_GO, &go("carol", &[])));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        let before = TLS_AUTHZ_DENIED.load(Ordering::Relaxed);
        let (r, out) = run_tls(c.clone(), &exports, tls(Some("CN=alice")), false);
        assert!(matches!(r, Ok(Haggled::Go(ref n)) if n.export.name.is_empty()));
        assert!(TLS_AUTHZ_DENIED.load(Ordering::Relaxed) > before);
        // No greeting over TLS: the first bytes are an option reply.
        assert_eq!(&out[..8], &wire::OPTION_REPLY_MAGIC.to_be_bytes());
        let mut framed = vec![0u8; 18];
        framed.extend_from_slice(&out);
        let reps = replies(&framed);
        assert_eq!(
            (reps[0].0, reps[0].1),
            (OPT_STARTTLS, wire::REP_ERR_INVALID)
        );
        // LIST: only the default export ("" = four zero bytes), then ACK.
        assert_eq!(
            reps[1],
            (wire::OPT_LIST, wire::REP_SERVER, vec![0, 0, 0, 0])
        );
        assert_eq!(reps[2], (wire::OPT_LIST, wire::REP_ACK, vec![]));
        assert_eq!((reps[3].0, reps[3].1), (wire::OPT_GO, REP_ERR_POLICY));
        // carol gets in.
        let mut c = opt(wire::OPT_GO, &go("carol", &[]));
        c.extend(opt(wire::OPT_ABORT, &[]));
        let (r, _) = run_tls(c, &exports, tls(Some("CN=carol")), false);
        assert!(matches!(r, Ok(Haggled::Go(ref n)) if n.export.name == "carol"));
        // Without TLS (offered, not required): ERR_TLS_REQD for that export only.
        let mut c = vec![0, 0, 0, 3];
        c.extend(opt(wire::OPT_GO, &go("carol", &[])));
        c.extend(opt(wire::OPT_GO, &go("", &[])));
        let plain = Tls {
            offer: true,
            ..Tls::default()
        };
        let (r, out) = run_tls(c, &exports, plain, true);
        assert!(matches!(r, Ok(Haggled::Go(ref n)) if n.export.name.is_empty()));
        assert_eq!(replies(&out)[0].1, REP_ERR_TLS_REQD);
    }
}
