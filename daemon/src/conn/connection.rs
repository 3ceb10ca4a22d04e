//! One client connection: handshake, then transmission on the connection's engine core
//! ([`super::ring_conn`], `--conn-mode ring`, the default) or, as described here, with a reader
//! (this thread) and a writer thread (`--conn-mode threads`).
//!
//! The reader parses request headers, plans each ([`super::plan`]: validation, the hole
//! shortcut, the cost), takes a [`Ticket`] for the plan's cost (a share of the connection's
//! request budget and of the daemon's buffer [`Pool`]), reads WRITE payloads straight into
//! engine buffers and submits to the engine on the connection's core. Each completion (on a core thread) sends its [`Reply`] through the connection's
//! [`Outbox`] to the writer thread. Replies go out in completion order.
//!
//! Garbage (bad magic), oversized WRITE payloads, truncated frames, a frame that does not
//! arrive within the payload timeout, an idle connection (with `--idle-timeout`) and vanished
//! clients end this connection only; every request already submitted still completes before
//! the sockets close.
//!
//! Stopping ([`ClientHandle::stop_reading`], from an `export-del hard` or a daemon-wide stop):
//! no new request is read, the ones taken in are answered, then the socket closes; no request
//! is failed because of the stop. A request the engine refuses because it is shutting down is
//! not answered either: the connection stops, and a reconnecting client resends it.
//!
//! TLS (`STARTTLS`, see [`super::tls`]): the TLS handshake runs here, on the connection's
//! thread, within the handshake time limit, then the option haggling again over TLS; such a
//! connection is always served with the reader and the writer thread (its socket carries
//! records, not NBD frames, so a core's ring cannot serve it), both going through the one TLS
//! session.
//!
//! A panic in the writer thread is caught: it is logged, counted in [`WRITER_PANICS`] and
//! reported in the connection's [`Totals`]; the connection then ends as if the client had gone.

use std::io::{self, Read};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use addcow_engine::Request;

use super::budget::Budget;
use super::conns::ClientHandle;
use super::outbox::{Outbox, Ticket};
use super::plan::{self, Plan, Then};
use super::sock::{Deadline, Sock};
use super::tls::{TlsConn, TlsSession};
use crate::backend::disk::Backend;
use crate::nbd::command::Limits;
use crate::nbd::export::{Attached, Export};
use crate::nbd::handshake::{self, Haggled, HandshakeError, Negotiated, Tls};
use crate::nbd::reply::{Body, Framing, Reply};
use crate::nbd::stats::{Op, Stamp};
use crate::nbd::wire::{self, RequestHeader};

pub use super::conn_config::{ConnConfig, Ended, Totals, MAX_IN_FLIGHT, WRITER_PANICS};

/// Bytes of the reader's socket buffer (request headers and small payloads).
const READ_BUFFER: usize = 64 << 10;

/// Serves one accepted connection to the end. `core`: the engine core its requests run on;
/// `handle`: how the daemon stops it (already in the daemon's table of live connections).
pub fn serve(
    mut sock: Sock,
    id: u64,
    core: usize,
    cfg: &ConnConfig,
    handle: Arc<ClientHandle>,
) -> Ended {
    let peer = sock.peer();
    let deadline = Instant::now() + cfg.handshake_timeout;
    // From GO on the connection is also in its export's client table (export-del hard).
    let attach = |e: &Arc<Export>| e.attach(id, handle.clone());
    let (offer, require) = cfg
        .tls
        .as_ref()
        .map_or((false, false), |t| t.policy(matches!(sock, Sock::Tcp(_))));
    let failed = |e: HandshakeError, sock: &Sock| {
        match e {
            HandshakeError::Ended => {}
            e if handle.stopped() => {
                tracing::debug!(conn = id, %peer, error = %e, "handshake ended by a stop")
            }
            e => {
                tracing::warn!(conn = id, %peer, error = %e, "handshake failed; connection dropped");
                let _ = sock.shutdown(Shutdown::Both);
            }
        }
        Ended::Handshake
    };
    let first = {
        let mut d = Deadline::new(&mut sock, deadline);
        let tls = Tls {
            offer,
            require,
            ..Tls::default()
        };
        handshake::negotiate_tls(
            &mut d,
            &cfg.exports,
            &|| handle.stopped(),
            &attach,
            tls,
            None,
        )
    };
    let (neg, session) = match first {
        Ok(Haggled::Go(n)) => (n, None),
        Ok(Haggled::StartTls { no_zeroes }) => {
            let Some(server) = cfg.tls.as_ref() else {
                return failed(
                    HandshakeError::Protocol("STARTTLS without TLS".into()),
                    &sock,
                );
            };
            let tcp = match sock.try_clone() {
                Ok(s) => s,
                Err(e) => return failed(e.into(), &sock),
            };
            let mut session: TlsSession = match server.accept(tcp, deadline) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(conn = id, %peer, error = %e, "TLS refused; connection dropped");
                    let _ = sock.shutdown(Shutdown::Both);
                    return Ended::Handshake;
                }
            };
            let identity = session.identity().map(str::to_owned);
            tracing::debug!(conn = id, %peer, identity = ?identity, "TLS handshake done");
            let tls = Tls {
                offer,
                require,
                active: true,
                identity: identity.as_deref(),
            };
            let r = handshake::negotiate_tls(
                &mut session,
                &cfg.exports,
                &|| handle.stopped(),
                &attach,
                tls,
                Some(no_zeroes),
            );
            match r {
                Ok(Haggled::Go(n)) => (n, Some(session)),
                Ok(Haggled::StartTls { .. }) => {
                    let e = HandshakeError::Protocol("STARTTLS acknowledged twice".into());
                    return failed(e, &sock);
                }
                Err(e) => return failed(e, &sock),
            }
        }
        Err(e) => return failed(e, &sock),
    };
    // Reads wake up at least this often to check the frame and idle deadlines; a client that
    // takes no reply byte for the idle time is dropped.
    let tick = cfg
        .idle_timeout
        .map_or(cfg.payload_timeout, |i| i.min(cfg.payload_timeout))
        .max(Duration::from_millis(100));
    let tls = match session.map(TlsSession::into_conn).transpose() {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(conn = id, %peer, error = %e, "cannot set up the TLS session");
            let _ = sock.shutdown(Shutdown::Both);
            return Ended::Handshake;
        }
    };
    if tls.is_none()
        && (sock.set_read_timeout(Some(tick)).is_err()
            || sock.set_write_timeout(cfg.idle_timeout).is_err())
    {
        return Ended::Handshake;
    }
    tracing::info!(
        conn = id,
        %peer,
        export = %neg.export.name,
        core,
        structured = neg.structured,
        tls = tls.is_some(),
        flags = format_args!("{:#06x}", neg.flags),
        "connection open"
    );
    let ring = match (&cfg.ring, &tls) {
        (Some(engine), None) => super::ring_conn::run(engine, &sock, core, &neg, cfg, &handle),
        _ => None,
    };
    let totals = match ring {
        Some(t) => t,
        None => transmission(sock, core, &neg, cfg, &handle, tls.map(|t| (t, tick))),
    };
    // Leave the export's client table only now: every request of this connection is answered.
    let Negotiated { export, guard, .. } = neg;
    drop(guard);
    Ended::Transmission {
        export: export.name.clone(),
        totals,
    }
}

/// The transmission phase: runs the reader here and the writer on its own thread; returns when
/// both are done (every submitted request answered or dropped with the socket). `tls`: the
/// connection's TLS session and how long a read of it waits before the reader checks its
/// deadlines (plain sockets have that as their read timeout).
fn transmission(
    sock: Sock,
    core: usize,
    neg: &Negotiated<Attached>,
    cfg: &ConnConfig,
    handle: &Arc<ClientHandle>,
    tls: Option<(TlsConn, Duration)>,
) -> Totals {
    match tls {
        None => match sock.try_clone() {
            Ok(rsock) => transmit(rsock, sock, None, core, neg, cfg, handle),
            Err(e) => {
                tracing::warn!(error = %e, "cannot clone socket");
                Totals::default()
            }
        },
        Some((t, tick)) => {
            let reader = t.reader(Some(tick));
            transmit(reader, sock, Some(t), core, neg, cfg, handle)
        }
    }
}

/// [`transmission`] with requests read from `input` (the socket, or its TLS session).
fn transmit<R: Read>(
    input: R,
    sock: Sock,
    tls: Option<TlsConn>,
    core: usize,
    neg: &Negotiated<Attached>,
    cfg: &ConnConfig,
    handle: &Arc<ClientHandle>,
) -> Totals {
    let budget = Arc::new(Budget::new(MAX_IN_FLIGHT, cfg.pool.clone()));
    let wsock = match sock.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot clone socket");
            return Totals::default();
        }
    };
    let structured = neg.structured;
    let framing = if neg.extended {
        Framing::Extended
    } else if structured {
        Framing::Structured
    } else {
        Framing::Simple
    };
    let closer = tls.clone();
    let outbox = match tls {
        None => Outbox::new(
            wsock,
            framing,
            budget,
            neg.export.stats.clone(),
            core,
            handle.clone(),
        ),
        Some(t) => Outbox::over_tls(
            wsock,
            (t, cfg.idle_timeout),
            framing,
            budget,
            neg.export.stats.clone(),
            core,
            handle.clone(),
        ),
    };
    let woutbox = outbox.clone();
    let writer = std::thread::Builder::new()
        .name("nbd-writer".into())
        .spawn(move || {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| woutbox.run_writer())) {
                Ok((bytes, errors)) => (bytes, errors, false),
                Err(_) => {
                    WRITER_PANICS.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("connection writer thread panicked; closing the connection");
                    woutbox.writer_failed();
                    (0, 0, true)
                }
            }
        });
    let writer = match writer {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start writer thread");
            return Totals::default();
        }
    };
    let backend = neg.export.backend.clone();
    let mut reader = Reader {
        sock: std::io::BufReader::with_capacity(READ_BUFFER, input),
        core,
        limits: Limits {
            size: backend.size(),
            read_only: backend.read_only(),
            structured,
            contexts: neg.contexts,
            extended: neg.extended,
            fast_zero_unit: backend.fast_zero_unit(),
        },
        backend,
        outbox,
        handle: handle.as_ref(),
        stamp: Stamp::now(Op::Other, 0),
        totals: Totals::default(),
        payload_timeout: cfg.payload_timeout,
        idle_timeout: cfg.idle_timeout,
        last_request: Instant::now(),
    };
    let end = reader.run();
    match &end {
        Err(e) if handle.stopped() => {
            tracing::debug!(export = %neg.export.name, error = %e, "reader stopped mid-request (stop)")
        }
        Err(ConnError::Idle(_)) => {
            tracing::info!(export = %neg.export.name, error = %end.as_ref().err().map(ToString::to_string).unwrap_or_default(), "closing idle connection")
        }
        Err(e) => {
            tracing::warn!(export = %neg.export.name, error = %e, "connection ended by protocol error")
        }
        Ok(()) => {}
    }
    let mut totals = reader.totals;
    drop(reader.sock);
    reader.outbox.close();
    // The writer ends once every in-flight completion has been answered. It catches its own
    // panics, so a failed join is one more panic (in the catch itself).
    let (bytes_read, errors, panicked) = writer.join().unwrap_or_else(|_| {
        WRITER_PANICS.fetch_add(1, Ordering::Relaxed);
        (0, 0, true)
    });
    totals.bytes_read = bytes_read;
    totals.errors += errors;
    totals.writer_panicked = panicked;
    if let Some(t) = closer {
        t.close_notify();
    }
    let _ = sock.shutdown(Shutdown::Both);
    totals
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("garbage from client: {0}")]
    Frame(#[from] wire::FrameError),
    #[error("{0}")]
    Fatal(String),
    #[error("request frame not received within {0:?} (payload timeout)")]
    Timeout(Duration),
    #[error("no request for {0:?} (idle timeout)")]
    Idle(Duration),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

struct Reader<'a, R> {
    /// The socket (or its TLS session), buffered: one `read` takes in every request the
    /// client has pipelined.
    sock: std::io::BufReader<R>,
    core: usize,
    backend: Arc<dyn Backend>,
    limits: Limits,
    outbox: Arc<Outbox>,
    /// Tells the reader to stop taking in requests.
    handle: &'a ClientHandle,
    /// The request being handled.
    stamp: Stamp,
    totals: Totals,
    payload_timeout: Duration,
    idle_timeout: Option<Duration>,
    /// When the last request header was read.
    last_request: Instant,
}

enum Filled {
    Full,
    Eof,
    Partial,
}

impl<R: Read> Reader<'_, R> {
    /// Takes a ticket of `cost` for the request being handled.
    fn ticket(&self, cost: u64) -> Ticket {
        self.outbox.ticket(cost, self.stamp)
    }

    /// Fills `buf` from the socket. `frame_start`: when the frame this belongs to began
    /// (`None` for a header at a request boundary, where the client may stay silent as long
    /// as it likes, or up to the idle timeout). Tells a clean EOF before the first byte from
    /// one in the middle.
    fn fill(
        &mut self,
        buf: &mut [u8],
        mut frame_start: Option<Instant>,
    ) -> Result<Filled, ConnError> {
        let mut got = 0;
        while got < buf.len() {
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => {
                    return Ok(if got == 0 {
                        Filled::Eof
                    } else {
                        Filled::Partial
                    })
                }
                Ok(n) => {
                    got += n;
                    frame_start.get_or_insert_with(Instant::now);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(if got == 0 {
                        Filled::Eof
                    } else {
                        Filled::Partial
                    })
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if frame_start.is_none() {
                        if let Some(idle) = self.idle_timeout {
                            let quiet = self
                                .outbox
                                .last_sent()
                                .map_or(self.last_request, |t| t.max(self.last_request));
                            if self.outbox.outstanding() == 0 && quiet.elapsed() >= idle {
                                return Err(ConnError::Idle(idle));
                            }
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(t) = frame_start {
                if got < buf.len() && t.elapsed() >= self.payload_timeout {
                    return Err(ConnError::Timeout(self.payload_timeout));
                }
            }
        }
        Ok(Filled::Full)
    }

    /// Reads and dispatches requests until DISC, EOF, a fatal error or a stop.
    fn run(&mut self) -> Result<(), ConnError> {
        loop {
            if self.handle.stopped() {
                return Ok(());
            }
            let mut hb = [0u8; wire::EXTENDED_REQUEST_LEN];
            let hlen = if self.limits.extended {
                wire::EXTENDED_REQUEST_LEN
            } else {
                wire::REQUEST_LEN
            };
            match self.fill(&mut hb[..hlen], None)? {
                Filled::Eof => return Ok(()),
                Filled::Partial => return Err(ConnError::Fatal("truncated request header".into())),
                Filled::Full => {}
            }
            self.last_request = Instant::now();
            let h = if self.limits.extended {
                RequestHeader::parse_extended(&hb)?
            } else {
                let mut compact = [0u8; wire::REQUEST_LEN];
                compact.copy_from_slice(&hb[..wire::REQUEST_LEN]);
                RequestHeader::parse(&compact)?
            };
            self.totals.requests += 1;
            let op = Op::from_kind(h.kind);
            let bytes = match op {
                Op::Flush | Op::Other => 0,
                _ => h.len,
            };
            self.stamp = Stamp::now(op, bytes);
            if h.kind == wire::CMD_WRITE_ZEROES {
                // The disk's, not the one negotiated with: a switch may have changed it.
                self.limits.fast_zero_unit = self.backend.fast_zero_unit();
            }
            let backend = &self.backend;
            // A throttled disk's READs all go to the engine, which meters them.
            let plan = plan::plan(&h, &self.limits, |o, l| {
                if backend.metered() {
                    Vec::new()
                } else {
                    backend.allocation(o, l)
                }
            });
            if !self.execute(h.cookie, h.offset, plan)? {
                return Ok(());
            }
        }
    }

    /// Reads and discards `n` payload bytes.
    fn drain(&mut self, n: u32) -> Result<(), ConnError> {
        let mut left = u64::from(n);
        let mut scratch = [0u8; 64 << 10];
        let start = Some(self.last_request);
        while left > 0 {
            let k = left.min(scratch.len() as u64) as usize;
            match self.fill(&mut scratch[..k], start)? {
                Filled::Full => left -= k as u64,
                _ => return Err(ConnError::Fatal("client vanished inside a payload".into())),
            }
        }
        Ok(())
    }

    /// Carries out the plan for the request with `cookie` at `offset`. False: the client
    /// disconnected.
    fn execute(&mut self, cookie: u64, offset: u64, plan: Plan) -> Result<bool, ConnError> {
        let ticket = match plan {
            Plan::Close(why) => return Err(ConnError::Fatal(why)),
            Plan::Disconnect => return Ok(false),
            Plan::Refuse {
                error,
                message,
                drain,
            } => {
                self.drain(drain)?;
                tracing::debug!(cookie, error, msg = %message, "request refused");
                // It holds a budget share like any request.
                let body = Body::Error { error, message };
                self.answer(self.ticket(0), cookie, offset, body);
                return Ok(true);
            }
            // Waits (the reader stops reading) until the request's budget is free.
            _ => self.ticket(plan.cost().unwrap_or(0)),
        };
        match plan {
            // Done above.
            Plan::Close(_) | Plan::Disconnect | Plan::Refuse { .. } => {}
            Plan::Answer(body) => self.answer(ticket, cookie, offset, body),
            Plan::Submit { req, then } => self.submit(ticket, cookie, offset, req, then),
            Plan::Write { offset, len, fua } => {
                // Not zeroed: holds stale bytes until `fill` overwrites all of it. On a short
                // or failed read it is dropped here, never submitted.
                let mut data = self.backend.alloc_buf(len as usize);
                match self.fill(&mut data, Some(self.last_request))? {
                    Filled::Full => {}
                    // Dropping the ticket gives the budget back.
                    _ => {
                        return Err(ConnError::Fatal("client vanished inside a write".into()));
                    }
                }
                self.totals.bytes_written += u64::from(len);
                self.backend.submit(
                    self.core,
                    Request::Write {
                        offset,
                        data: data.into(),
                        fua,
                    },
                    Box::new(move |r| {
                        // The engine is done with the buffer: drop it and give its bytes back
                        // now, not when the reply is sent (a client that does not read its
                        // replies then holds no buffer memory).
                        let Some(body) = Then::WRITE.answer(r) else {
                            return ticket.unanswered();
                        };
                        let mut ticket = ticket;
                        ticket.free_bytes();
                        ticket.send(Reply {
                            cookie,
                            offset,
                            body,
                        });
                    }),
                );
            }
            Plan::BlockStatus(status) => {
                let body = status.answer(&*self.backend);
                self.answer(ticket, cookie, offset, body);
            }
        }
        Ok(true)
    }

    /// Sends a reply that needed no engine request.
    fn answer(&mut self, ticket: Ticket, cookie: u64, offset: u64, body: Body) {
        ticket.send(Reply {
            cookie,
            offset,
            body,
        });
    }

    /// Submits `req`; its completion is answered through `then`.
    fn submit(&mut self, ticket: Ticket, cookie: u64, offset: u64, req: Request, then: Then) {
        self.backend.submit(
            self.core,
            req,
            Box::new(move |r| {
                let Some(body) = then.answer(r) else {
                    return ticket.unanswered();
                };
                ticket.send(Reply {
                    cookie,
                    offset,
                    body,
                });
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::backend::memory::MemDisk;
    use crate::nbd::export::{Export, Exports};

    #[test]
    fn random_handshakes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let exports = Exports::new(vec![Export::new("", MemDisk::new(4096, false), 1)]);
        for _ in 0..2000 {
            let mut input = vec![0, 0, 0, rng.gen_range(0..4u8)];
            for _ in 0..rng.gen_range(0..6) {
                input.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
                input.extend_from_slice(&rng.gen_range(0..13u32).to_be_bytes());
                let data: Vec<u8> = (0..rng.gen_range(0..40))
                    .map(|_| rng.gen_range(0..8u8))
                    .collect();
                let len = if rng.gen_bool(0.9) {
                    data.len() as u32
                } else {
                    rng.gen()
                };
                input.extend_from_slice(&len.to_be_bytes());
                input.extend_from_slice(&data);
            }
            if rng.gen_bool(0.2) {
                let at = rng.gen_range(0..input.len());
                input[at] = rng.gen();
            }
            let (a, mut b) = UnixStream::pair().unwrap();
            let writer = std::thread::spawn(move || {
                let _ = b.write_all(&input);
                let _ = b.shutdown(Shutdown::Write);
                let mut sink = Vec::new();
                let _ = b.read_to_end(&mut sink);
            });
            let mut sock = Sock::Unix(a);
            let r = handshake::negotiate(&mut sock, &exports, &|| false, &|_| Some(()));
            drop(r);
            drop(sock);
            writer.join().unwrap();
        }
    }
}
