//! One connection in transmission served on its engine core's ring (`--conn-mode ring`): a
//! [`CoreSource`] that receives, parses, submits and answers on the core thread, with no
//! reader or writer thread.
//!
//! The way of a request: a `recv` on the core's ring fills a 64 KiB buffer (one recv takes in
//! every request the client pipelined); the parser ([`RingConn::pump`]) plans each header
//! ([`super::plan`]: validation, the hole shortcut, the cost), takes its budget (a request
//! slot, counted here, and bytes of the daemon's [`Pool`] through a non-blocking [`Share`])
//! and submits it with [`Backend::try_submit_local`]. A WRITE's payload goes into an engine buffer: what the
//! header recv already brought is copied, the rest is received straight into it. A disk switch
//! that holds new requests back hands the request to this connection's one waiter thread,
//! which submits it with [`Backend::submit`]; the core never blocks. Completions (on the core)
//! queue their replies in [`Shared`]; at the end of the core's turn
//! ([`CoreSource::end_of_batch`]) every queued reply is framed ([`reply::gather`], READ data not
//! copied) into one `sendmsg`, one in flight at a time, in completion order. Budget is given
//! back and the request recorded in the export's stats once its reply was sent.
//!
//! Backpressure: while a request cannot take its budget no recv is posted; the pool wakes the
//! connection (its eventfd) when bytes come back, the connection's own sends free slots.
//!
//! Ending: DISC, EOF, a stop ([`ClientHandle::stop_reading`] shuts the socket's read side, so
//! a posted recv ends, and writes the eventfd, for a connection with none posted), bad magic,
//! an oversized WRITE, a frame not received within the payload timeout or an idle connection:
//! no new request is taken in, the ones taken in are answered, then the socket is shut down and the source detaches. A send that fails drops the
//! replies left; a send that makes no progress for the idle timeout shuts the socket down.
//! A request the engine refuses because it is shutting down is left unanswered and stops the
//! connection. When the source is dropped (also after a panic, caught by the core) its
//! [`Totals`] go to the connection's thread, which logs them and frees its slot.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use addcow_engine::{
    Completion, CoreSource, Engine, IoBuf, Request, SendList, SockDone, SockFd, SourceCtx,
};

use super::budget::{Share, Waker};
use super::conn_config::{ConnConfig, Totals, MAX_IN_FLIGHT, WRITER_PANICS};
use super::conns::ClientHandle;
use super::plan::{self, Plan, Then};
use super::sock::Sock;
use crate::backend::disk::Backend;
use crate::nbd::command::Limits;
use crate::nbd::export::Attached;
use crate::nbd::handshake::Negotiated;
use crate::nbd::reply::{self, Body, Framing, Reply};
use crate::nbd::stats::{ExportStats, Op, Stamp};
use crate::nbd::wire::{self, RequestHeader};
use addcow_engine::sync::lock;

/// Bytes of the receive buffer (request headers and what follows them).
const RECV_BUFFER: usize = 64 << 10;
/// Tag of the recv into the receive buffer.
const TAG_RECV: u64 = 1;
/// Tag of the recv into a WRITE's payload buffer.
const TAG_PAYLOAD: u64 = 2;
/// Tag of the reply `sendmsg`.
const TAG_SEND: u64 = 3;

/// Work for the connection's waiter thread.
type Job = Box<dyn FnOnce() + Send>;

/// How a request the engine ran came back (pushed by its completion, from any thread).
enum Outcome {
    /// Answer with `reply`; `freed`: its budget bytes may be given back now (a WRITE).
    Reply {
        reply: Reply,
        cost: u64,
        stamp: Stamp,
        freed: bool,
    },
    /// Not answered (the engine is shutting down): the connection stops.
    Unanswered { cost: u64, stamp: Stamp },
    /// The completion was dropped without running.
    Abandoned { cost: u64, stamp: Stamp },
}

/// What completions share with the source: the queue of outcomes and the eventfd that wakes
/// the source when an outcome is pushed off its core thread.
pub struct Shared {
    queue: Mutex<Vec<Outcome>>,
    any: AtomicBool,
    wake: File,
}

impl Shared {
    fn push(&self, o: Outcome) {
        lock(&self.queue).push(o);
        self.any.store(true, Ordering::Release);
        // On a core thread the core calls `end_of_batch` before it waits again; elsewhere it
        // must be woken.
        if !addcow_engine::on_core_thread() {
            self.poke();
        }
    }

    fn poke(&self) {
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }
}

/// A request's claim to an outcome: pushes `Abandoned` when dropped unused.
struct Pend {
    shared: Arc<Shared>,
    cost: u64,
    stamp: Stamp,
    used: bool,
}

impl Pend {
    /// [`Pend::finish`] with the reply to `cookie` built from `body` (`None`: unanswered).
    fn answer(self, cookie: u64, offset: u64, body: Option<Body>, freed: bool) {
        let reply = body.map(|body| Reply {
            cookie,
            offset,
            body,
        });
        self.finish(reply, freed);
    }

    fn finish(mut self, reply: Option<Reply>, freed: bool) {
        self.used = true;
        let (cost, stamp) = (self.cost, self.stamp);
        self.shared.push(match reply {
            Some(reply) => Outcome::Reply {
                reply,
                cost,
                stamp,
                freed,
            },
            None => Outcome::Unanswered { cost, stamp },
        });
    }
}

impl Drop for Pend {
    fn drop(&mut self) {
        if !self.used {
            self.shared.push(Outcome::Abandoned {
                cost: self.cost,
                stamp: self.stamp,
            });
        }
    }
}

/// What the parser is in the middle of.
enum In {
    /// At a request boundary (or inside a header).
    Header,
    /// Receiving a WRITE payload into `data` (`None` while a recv into it is posted).
    Payload {
        cookie: u64,
        offset: u64,
        fua: bool,
        data: Option<IoBuf>,
        got: usize,
        len: usize,
        pend: Option<Pend>,
    },
    /// Discarding `left` payload bytes of a refused request.
    Drain { left: u64 },
}

/// A reply queued or in flight, with what its request holds.
struct Queued {
    reply: Reply,
    cost: u64,
    stamp: Stamp,
}

/// See the module docs.
pub struct RingConn {
    fd: SockFd,
    sock: Sock,
    core: usize,
    backend: Arc<dyn Backend>,
    limits: Limits,
    framing: Framing,
    stats: Arc<ExportStats>,
    export: String,
    handle: Arc<ClientHandle>,
    shared: Arc<Shared>,
    share: Share,
    /// The receive buffer (`None` while a recv into it is posted); bytes `[start, end)` are
    /// received and not parsed yet.
    rbuf: Option<IoBuf>,
    start: usize,
    end: usize,
    recv_posted: bool,
    state: In,
    /// When the first byte of the frame being received came.
    frame_start: Option<Instant>,
    /// Requests taken in and not yet answered (or dropped).
    in_flight: usize,
    outq: VecDeque<Queued>,
    /// The send in flight: what its replies hold, and when it last made progress.
    sending: Vec<(u64, Stamp, bool)>,
    send_progress: Option<Instant>,
    spare: Option<SendList>,
    /// No new request is taken in.
    stopping: bool,
    /// The socket failed: replies are dropped.
    broken: bool,
    /// The source asked to be detached.
    closed: bool,
    /// A [`CoreSource`] callback is running (still set in `drop`: it panicked).
    in_callback: bool,
    totals: Totals,
    last_activity: Instant,
    payload_timeout: Duration,
    idle_timeout: Option<Duration>,
    fallback: Option<mpsc::Sender<Job>>,
    done: Option<mpsc::Sender<Totals>>,
}

fn eventfd() -> std::io::Result<OwnedFd> {
    addcow_engine::sys::eventfd(addcow_engine::sys::EventFdMode::NonBlocking)
}

fn owned(sock: Sock) -> OwnedFd {
    match sock {
        Sock::Unix(s) => s.into(),
        Sock::Tcp(s) => s.into(),
    }
}

/// Runs the transmission phase of a negotiated connection on core `core` of `engine`, blocking
/// the calling (connection) thread until the source is gone. `None` when the source cannot be
/// set up (the caller serves the connection on threads then; nothing was read from the socket).
pub fn run(
    engine: &Engine,
    sock: &Sock,
    core: usize,
    neg: &Negotiated<Attached>,
    cfg: &ConnConfig,
    handle: &Arc<ClientHandle>,
) -> Option<Totals> {
    let Some(_slot) = CoreSlot::take(core) else {
        tracing::info!(
            core,
            "{MAX_RING_CONNS_PER_CORE} connections already served on this core's ring; \
             serving this one with threads"
        );
        return None;
    };
    let (conn, efd, rx) = match RingConn::new(sock, core, neg, cfg, handle) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, "cannot serve the connection on its core; using threads");
            return None;
        }
    };
    // The thread path's socket timeouts would make a recv punted to a blocking worker (a ring
    // without fast poll) fail with EAGAIN; the ring path keeps its own deadlines.
    let _ = sock.set_read_timeout(None);
    let _ = sock.set_write_timeout(None);
    if let Err(e) = engine.attach_source(core, efd, Box::new(conn)) {
        tracing::warn!(error = %e, "cannot attach the connection to its core");
        let _ = sock.shutdown(Shutdown::Both);
    }
    // The source sends its totals when it is dropped (also after a panic or a failed attach).
    Some(rx.recv().unwrap_or_default())
}

/// Most connections served on one core's ring at once. Each keeps up to two socket ops in the
/// core's ring (a recv that completes only when its client sends, and a send), and those count
/// against the same in-flight cap as disk I/O: this bound keeps them to a quarter of it (the cap
/// is 511 at the default queue depth of 256), so idle clients can never crowd out disk ops. More
/// connections on a core are served with threads.
pub const MAX_RING_CONNS_PER_CORE: usize = 64;

/// A place among a core's ring connections, given back when dropped.
struct CoreSlot(usize);

impl CoreSlot {
    fn counts() -> &'static Mutex<Vec<usize>> {
        static COUNTS: std::sync::OnceLock<Mutex<Vec<usize>>> = std::sync::OnceLock::new();
        COUNTS.get_or_init(|| Mutex::new(Vec::new()))
    }

    fn take(core: usize) -> Option<CoreSlot> {
        let mut c = lock(Self::counts());
        if c.len() <= core {
            c.resize(core + 1, 0);
        }
        if c[core] >= MAX_RING_CONNS_PER_CORE {
            return None;
        }
        c[core] += 1;
        Some(CoreSlot(core))
    }
}

impl Drop for CoreSlot {
    fn drop(&mut self) {
        let mut c = lock(Self::counts());
        if let Some(n) = c.get_mut(self.0) {
            *n = n.saturating_sub(1);
        }
    }
}

impl RingConn {
    /// A source for the negotiated connection on `sock`, the eventfd to attach it with (already
    /// written once, so the first turn posts the first recv) and where its totals arrive.
    #[allow(clippy::type_complexity)]
    pub fn new(
        sock: &Sock,
        core: usize,
        neg: &Negotiated<Attached>,
        cfg: &ConnConfig,
        handle: &Arc<ClientHandle>,
    ) -> std::io::Result<(RingConn, OwnedFd, mpsc::Receiver<Totals>)> {
        let efd = eventfd()?;
        let wake = File::from(efd.try_clone()?);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            any: AtomicBool::new(false),
            wake,
        });
        let waker_shared = Arc::clone(&shared);
        let share = Share::new(
            cfg.pool.clone(),
            Waker(Arc::new(move || waker_shared.poke())),
        );
        let backend = neg.export.backend.clone();
        let framing = if neg.extended {
            Framing::Extended
        } else if neg.structured {
            Framing::Structured
        } else {
            Framing::Simple
        };
        let stop_shared = Arc::clone(&shared);
        handle.on_stop(Waker(Arc::new(move || stop_shared.poke())));
        let (tx, rx) = mpsc::channel();
        let conn = RingConn {
            fd: SockFd::new(owned(sock.try_clone()?)),
            sock: sock.try_clone()?,
            core,
            limits: Limits {
                size: backend.size(),
                read_only: backend.read_only(),
                structured: neg.structured,
                contexts: neg.contexts,
                extended: neg.extended,
                fast_zero_unit: backend.fast_zero_unit(),
            },
            backend,
            framing,
            stats: neg.export.stats.clone(),
            export: neg.export.name.clone(),
            handle: Arc::clone(handle),
            shared,
            share,
            rbuf: Some(IoBuf::new_zeroed(RECV_BUFFER)),
            start: 0,
            end: 0,
            recv_posted: false,
            state: In::Header,
            frame_start: None,
            in_flight: 0,
            outq: VecDeque::new(),
            sending: Vec::new(),
            send_progress: None,
            spare: Some(SendList::new()),
            stopping: false,
            broken: false,
            closed: false,
            in_callback: false,
            totals: Totals::default(),
            last_activity: Instant::now(),
            payload_timeout: cfg.payload_timeout,
            idle_timeout: cfg.idle_timeout,
            fallback: None,
            done: Some(tx),
        };
        conn.shared.poke();
        Ok((conn, efd, rx))
    }

    fn hlen(&self) -> usize {
        if self.limits.extended {
            wire::EXTENDED_REQUEST_LEN
        } else {
            wire::REQUEST_LEN
        }
    }

    /// Ends taking in requests because of a protocol error.
    fn fatal(&mut self, why: String) {
        if self.handle.stopped() {
            tracing::debug!(error = %why, "connection stopped mid-request (stop)");
        } else {
            tracing::warn!(export = %self.export, error = %why, "connection ended by protocol error");
        }
        self.stopping = true;
    }

    /// Takes a request slot and `cost` bytes of the pool, or nothing.
    fn take(&mut self, cost: u64) -> bool {
        if self.in_flight >= MAX_IN_FLIGHT || !self.share.try_take(cost) {
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// A request is done: recorded, its budget given back.
    fn release(&mut self, cost: u64, stamp: &Stamp, latency: Option<u64>, error: bool) {
        self.stats.finished(self.core, stamp, latency, error);
        self.share.give_back(cost);
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    fn pend(&self, cost: u64, stamp: Stamp) -> Pend {
        Pend {
            shared: Arc::clone(&self.shared),
            cost,
            stamp,
            used: false,
        }
    }

    /// Queues a reply that needed no engine request.
    fn answer(&mut self, cost: u64, stamp: Stamp, cookie: u64, offset: u64, body: Body) {
        self.outq.push_back(Queued {
            reply: Reply {
                cookie,
                offset,
                body,
            },
            cost,
            stamp,
        });
    }

    /// Parses and dispatches what was received, as far as budget allows; posts the next recv.
    fn pump(&mut self, ctx: &mut SourceCtx<'_>) {
        let mut want = true;
        while !self.stopping {
            let avail = self.end - self.start;
            match &mut self.state {
                In::Header => {
                    if self.handle.stopped() {
                        self.stopping = true;
                        break;
                    }
                    let hlen = self.hlen();
                    if avail < hlen {
                        if avail > 0 {
                            self.frame_start.get_or_insert_with(Instant::now);
                        }
                        break;
                    }
                    if !self.header(ctx) {
                        want = false;
                        break;
                    }
                }
                In::Payload { data, got, len, .. } => {
                    let Some(buf) = data.as_mut() else {
                        want = false;
                        break;
                    };
                    let k = avail.min(*len - *got);
                    if k > 0 {
                        let rb = self.rbuf.as_ref().expect("receive buffer present");
                        buf[*got..*got + k].copy_from_slice(&rb[self.start..self.start + k]);
                        *got += k;
                        self.start += k;
                    }
                    if *got < *len {
                        break;
                    }
                    self.submit_write(ctx);
                }
                In::Drain { left } => {
                    let k = (avail as u64).min(*left);
                    self.start += k as usize;
                    *left -= k;
                    if *left > 0 {
                        break;
                    }
                    self.state = In::Header;
                    self.frame_start = None;
                }
            }
        }
        if want && !self.stopping {
            self.post_recv(ctx);
        }
    }

    /// Posts the next recv if none is: into the WRITE payload buffer when the receive buffer
    /// is empty and a payload is due, else into the receive buffer.
    fn post_recv(&mut self, ctx: &mut SourceCtx<'_>) {
        if self.recv_posted {
            return;
        }
        if let In::Payload { data, got, .. } = &mut self.state {
            if self.start == self.end {
                if let Some(buf) = data.take() {
                    ctx.recv(&self.fd, buf, *got, TAG_PAYLOAD);
                    self.recv_posted = true;
                }
                return;
            }
        }
        let Some(mut rb) = self.rbuf.take() else {
            return;
        };
        if self.start > 0 {
            rb.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        ctx.recv(&self.fd, rb, self.end, TAG_RECV);
        self.recv_posted = true;
    }

    /// Handles the header at the parse cursor. False when it must wait for budget (nothing
    /// consumed).
    fn header(&mut self, ctx: &mut SourceCtx<'_>) -> bool {
        let hlen = self.hlen();
        let rb = self.rbuf.as_ref().expect("receive buffer present");
        let raw = &rb[self.start..self.start + hlen];
        let parsed = if self.limits.extended {
            let mut b = [0u8; wire::EXTENDED_REQUEST_LEN];
            b.copy_from_slice(raw);
            RequestHeader::parse_extended(&b)
        } else {
            let mut b = [0u8; wire::REQUEST_LEN];
            b.copy_from_slice(raw);
            RequestHeader::parse(&b)
        };
        let h = match parsed {
            Ok(h) => h,
            Err(e) => {
                self.start += hlen;
                self.totals.requests += 1;
                self.fatal(format!("garbage from client: {e}"));
                return true;
            }
        };
        let op = Op::from_kind(h.kind);
        let bytes = match op {
            Op::Flush | Op::Other => 0,
            _ => h.len,
        };
        if h.kind == wire::CMD_WRITE_ZEROES {
            // The disk's, not the one negotiated with: a switch may have changed it (read
            // without waiting: an atomic the switch updates).
            self.limits.fast_zero_unit = self.backend.fast_zero_unit();
        }
        // Never wait for a disk switch on the core: without the map a READ goes to the engine
        // whole (holes read as zeros, sent as data). So does every READ of a throttled disk:
        // the engine meters it.
        let backend = &self.backend;
        let plan = plan::plan(&h, &self.limits, |o, l| {
            if backend.metered() {
                return Vec::new();
            }
            backend.try_allocation(o, l).unwrap_or_default()
        });
        let cost = plan.cost();
        if let Some(cost) = cost {
            if !self.take(cost) {
                // The frame is whole: waiting for budget (a slot, or room in the pool) is
                // backpressure, not a client stalling inside a frame, so the payload clock
                // stops.
                self.frame_start = None;
                return false;
            }
        }
        self.start += hlen;
        self.totals.requests += 1;
        self.last_activity = Instant::now();
        self.frame_start = None;
        let stamp = Stamp::now(op, bytes);
        self.execute(ctx, &h, plan, cost.unwrap_or(0), stamp);
        true
    }

    /// Carries out `plan` for the request `h`, which took `cost` bytes of budget (and a slot,
    /// unless the plan closes the connection).
    fn execute(
        &mut self,
        ctx: &mut SourceCtx<'_>,
        h: &RequestHeader,
        plan: Plan,
        cost: u64,
        stamp: Stamp,
    ) {
        let (cookie, offset) = (h.cookie, h.offset);
        if !matches!(plan, Plan::Close(_) | Plan::Disconnect) {
            self.stats.started(self.core, stamp.op);
        }
        match plan {
            Plan::Close(why) => self.fatal(why),
            Plan::Disconnect => self.stopping = true,
            Plan::Refuse {
                error,
                message,
                drain,
            } => {
                tracing::debug!(cookie, error, msg = %message, "request refused");
                self.answer(cost, stamp, cookie, offset, Body::Error { error, message });
                if drain > 0 {
                    self.frame_start = Some(self.last_activity);
                    self.state = In::Drain {
                        left: u64::from(drain),
                    };
                }
            }
            Plan::Answer(body) => self.answer(cost, stamp, cookie, offset, body),
            Plan::Submit { req, then } => {
                let pend = self.pend(cost, stamp);
                self.submit(
                    ctx,
                    req,
                    Box::new(move |r| pend.answer(cookie, offset, then.answer(r), false)),
                );
            }
            Plan::Write { offset, len, fua } => {
                // Not zeroed: every byte is overwritten by the payload before it is submitted.
                let data = self.backend.alloc_buf(len as usize);
                self.frame_start = Some(self.last_activity);
                self.state = In::Payload {
                    cookie,
                    offset,
                    fua,
                    data: Some(data),
                    got: 0,
                    len: len as usize,
                    pend: Some(self.pend(cost, stamp)),
                };
            }
            Plan::BlockStatus(status) => {
                // The map may be held by a disk switch, which waits for requests this core
                // completes: answered on the connection's waiter thread.
                let pend = self.pend(cost, stamp);
                let backend = Arc::clone(&self.backend);
                self.off_core(Box::new(move || {
                    let reply = Reply {
                        cookie,
                        offset,
                        body: status.answer(&*backend),
                    };
                    pend.finish(Some(reply), false);
                }));
            }
        }
    }

    /// The payload of the WRITE being received is complete: submits it.
    fn submit_write(&mut self, ctx: &mut SourceCtx<'_>) {
        let In::Payload {
            cookie,
            offset,
            fua,
            data,
            pend,
            ..
        } = std::mem::replace(&mut self.state, In::Header)
        else {
            return;
        };
        self.frame_start = None;
        let (Some(data), Some(pend)) = (data, pend) else {
            return;
        };
        self.totals.bytes_written += data.len() as u64;
        self.submit(
            ctx,
            Request::Write {
                offset,
                data: data.into(),
                fua,
            },
            Box::new(move |r| {
                // The engine is done with the buffer: its bytes go back at once.
                pend.answer(cookie, offset, Then::WRITE.answer(r), true);
            }),
        );
    }

    /// Submits on this core; when a disk switch holds new requests back, hands the request to
    /// this connection's waiter thread instead (the core must not wait).
    fn submit(&mut self, ctx: &mut SourceCtx<'_>, req: Request, done: Completion) {
        let Some((req, done)) = self.backend.try_submit_local(ctx, req, done) else {
            return;
        };
        let backend = Arc::clone(&self.backend);
        let core = self.core;
        self.off_core(Box::new(move || backend.submit(core, req, done)));
    }

    /// Runs `job` on this connection's waiter thread (started on first use): work that may wait
    /// for a disk switch, which the core must never do.
    fn off_core(&mut self, job: Job) {
        if self.fallback.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name("nbd-ring-wait".into())
                .spawn(move || rx.into_iter().for_each(|job| job()));
            match spawned {
                Ok(_) => self.fallback = Some(tx),
                Err(e) => {
                    // The job is dropped: its request is released unanswered.
                    tracing::warn!(error = %e, "cannot start the connection's waiter thread");
                    self.fatal("cannot start the connection's waiter thread".into());
                    return;
                }
            }
        }
        if let Some(tx) = &self.fallback {
            let _ = tx.send(job);
        }
    }

    /// Takes the outcomes the completions pushed.
    fn collect(&mut self) {
        if !self.shared.any.swap(false, Ordering::Acquire) {
            return;
        }
        let outcomes = std::mem::take(&mut *lock(&self.shared.queue));
        for o in outcomes {
            match o {
                Outcome::Reply {
                    reply,
                    mut cost,
                    stamp,
                    freed,
                } => {
                    if freed {
                        self.share.give_back(cost);
                        cost = 0;
                    }
                    if self.broken {
                        let error = matches!(reply.body, Body::Error { .. });
                        self.release(cost, &stamp, None, error);
                    } else {
                        self.outq.push_back(Queued { reply, cost, stamp });
                    }
                }
                Outcome::Unanswered { cost, stamp } => {
                    tracing::debug!(
                        "request refused by a stopping engine; stopping the connection"
                    );
                    self.stopping = true;
                    self.handle.stop_reading();
                    self.release(cost, &stamp, None, false);
                }
                Outcome::Abandoned { cost, stamp } => self.release(cost, &stamp, None, false),
            }
        }
    }

    /// Sends every queued reply in one `sendmsg` unless one is in flight.
    fn flush(&mut self, ctx: &mut SourceCtx<'_>) {
        if self.broken {
            while let Some(q) = self.outq.pop_front() {
                let error = matches!(q.reply.body, Body::Error { .. });
                self.release(q.cost, &q.stamp, None, error);
            }
            return;
        }
        if !self.sending.is_empty() || self.outq.is_empty() {
            return;
        }
        let mut list = self.spare.take().unwrap_or_default();
        while let Some(q) = self.outq.pop_front() {
            let error = matches!(q.reply.body, Body::Error { .. });
            if error {
                self.totals.errors += 1;
            }
            self.totals.bytes_read += match &q.reply.body {
                Body::Read { data, .. } => data.len() as u64,
                Body::Zeros { len, .. } => u64::from(*len),
                _ => 0,
            };
            self.sending.push((q.cost, q.stamp, error));
            reply::gather(self.framing, q.reply, &mut list);
        }
        self.send_progress = Some(Instant::now());
        ctx.send(&self.fd, list, TAG_SEND);
    }

    /// The send in flight is over: `sent` tells whether its replies reached the kernel.
    fn sent(&mut self, sent: bool) {
        let at = Instant::now();
        for (cost, stamp, error) in std::mem::take(&mut self.sending) {
            let latency = sent.then(|| at.saturating_duration_since(stamp.start).as_nanos() as u64);
            self.release(cost, &stamp, latency, error);
        }
        self.send_progress = None;
        if sent {
            self.last_activity = at;
        }
    }

    /// The socket failed or the client stopped taking replies: nothing more is sent.
    fn break_socket(&mut self) {
        self.broken = true;
        self.stopping = true;
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    /// One step of the loop: take outcomes, parse, send, and detach once everything taken in
    /// is answered after a stop.
    fn turn(&mut self, ctx: &mut SourceCtx<'_>) {
        if self.closed {
            return;
        }
        self.pump(ctx);
        if self.stopping && matches!(self.state, In::Payload { .. }) {
            // A WRITE whose payload will never be complete: never submitted, its budget given
            // back (its claim is dropped as abandoned, collected just below).
            self.state = In::Header;
        }
        self.collect();
        self.flush(ctx);
        if self.stopping && self.in_flight == 0 && self.sending.is_empty() && self.outq.is_empty() {
            let _ = self.sock.shutdown(Shutdown::Both);
            self.closed = true;
            ctx.detach();
        }
    }
}

impl RingConn {
    fn on_io_done(&mut self, ctx: &mut SourceCtx<'_>, tag: u64, done: SockDone) {
        match done {
            SockDone::Recv { buf, at, result } => {
                self.recv_posted = false;
                let n = match result {
                    Ok(n) => n,
                    Err(e)
                        if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) =>
                    {
                        // Nothing arrived (a recv run by a blocking worker can say so): the
                        // buffer goes back untouched and the next turn receives again.
                        if tag == TAG_PAYLOAD {
                            if let In::Payload { data, .. } = &mut self.state {
                                *data = Some(buf);
                            }
                        } else {
                            self.rbuf = Some(buf);
                        }
                        self.turn(ctx);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "recv failed; client gone");
                        0
                    }
                };
                if tag == TAG_PAYLOAD {
                    if let In::Payload { data, got, .. } = &mut self.state {
                        *data = Some(buf);
                        *got = at + n;
                    }
                } else {
                    self.rbuf = Some(buf);
                    self.end = at + n;
                }
                if n == 0 {
                    let mid_frame = self.start < self.end || !matches!(self.state, In::Header);
                    if mid_frame && !self.handle.stopped() && !self.stopping {
                        self.fatal("client vanished inside a request".into());
                    }
                    self.stopping = true;
                } else {
                    // A frame has begun; taking in a whole header clears this again.
                    self.frame_start.get_or_insert_with(Instant::now);
                }
            }
            SockDone::Send { mut list, result } => match result {
                Ok(n) if n > 0 && n < list.len() => {
                    list.advance(n);
                    self.send_progress = Some(Instant::now());
                    ctx.send(&self.fd, list, TAG_SEND);
                    return;
                }
                Ok(n) if n > 0 => {
                    list.clear();
                    self.spare = Some(list);
                    self.sent(true);
                }
                other => {
                    tracing::debug!(result = ?other, "reply not sent; client gone");
                    drop(list);
                    self.sent(false);
                    self.break_socket();
                }
            },
        }
        self.turn(ctx);
    }

    fn on_deadline(&mut self, ctx: &mut SourceCtx<'_>) {
        let now = Instant::now();
        if !self.stopping {
            if let Some(s) = self.frame_start {
                if now >= s + self.payload_timeout {
                    let t = self.payload_timeout;
                    self.fatal(format!(
                        "request frame not received within {t:?} (payload timeout)"
                    ));
                }
            }
        }
        if let Some(idle) = self.idle_timeout.filter(|_| !self.broken) {
            if let Some(p) = self.send_progress {
                if now >= p + idle {
                    tracing::info!(?idle, "client takes no reply; closing the connection");
                    self.break_socket();
                }
            } else if !self.stopping
                && self.in_flight == 0
                && self.frame_start.is_none()
                && now >= self.last_activity + idle
            {
                tracing::info!(error = %format!("no request for {idle:?} (idle timeout)"), "closing idle connection");
                self.stopping = true;
            }
        }
        self.turn(ctx);
    }
}

impl CoreSource for RingConn {
    fn ready(&mut self, ctx: &mut SourceCtx<'_>) {
        self.in_callback = true;
        self.turn(ctx);
        self.in_callback = false;
    }

    fn end_of_batch(&mut self, ctx: &mut SourceCtx<'_>) {
        if self.shared.any.load(Ordering::Acquire) || !self.outq.is_empty() {
            self.in_callback = true;
            self.turn(ctx);
            self.in_callback = false;
        }
    }

    fn io_done(&mut self, ctx: &mut SourceCtx<'_>, tag: u64, done: SockDone) {
        self.in_callback = true;
        self.on_io_done(ctx, tag, done);
        self.in_callback = false;
    }

    fn deadline(&mut self, ctx: &mut SourceCtx<'_>) {
        self.in_callback = true;
        self.on_deadline(ctx);
        self.in_callback = false;
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let mut d: Option<Instant> = None;
        let mut at = |t: Instant| d = Some(d.map_or(t, |x| x.min(t)));
        if !self.stopping {
            if let Some(s) = self.frame_start {
                at(s + self.payload_timeout);
            }
        }
        if let Some(idle) = self.idle_timeout.filter(|_| !self.broken) {
            if let Some(p) = self.send_progress {
                at(p + idle);
            } else if !self.stopping && self.in_flight == 0 && self.frame_start.is_none() {
                at(self.last_activity + idle);
            }
        }
        d
    }
}

impl Drop for RingConn {
    fn drop(&mut self) {
        if self.in_callback {
            // A callback panicked (the core caught it and drops the source).
            WRITER_PANICS.fetch_add(1, Ordering::Relaxed);
            self.totals.writer_panicked = true;
            tracing::error!("connection source panicked; closing the connection");
        }
        if !self.closed {
            // Ended from outside (a panic, the engine stopping): the client sees the end.
            let _ = self.sock.shutdown(Shutdown::Both);
        }
        if let Some(tx) = self.done.take() {
            let _ = tx.send(self.totals);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A core serves at most [`MAX_RING_CONNS_PER_CORE`] connections on its ring; a place is
    /// given back when its connection ends. (A core index no other test uses.)
    #[test]
    fn a_core_takes_a_bounded_number_of_ring_connections() {
        let core = 4093;
        let slots: Vec<_> = (0..MAX_RING_CONNS_PER_CORE)
            .map(|_| CoreSlot::take(core).expect("a place on the ring"))
            .collect();
        assert!(
            CoreSlot::take(core).is_none(),
            "one connection past the bound was put on the ring"
        );
        assert!(
            CoreSlot::take(core + 1).is_some(),
            "other cores are not counted"
        );
        drop(slots);
        assert!(CoreSlot::take(core).is_some(), "places come back");
    }
}
