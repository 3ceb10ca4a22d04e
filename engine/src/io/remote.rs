//! A base served by an NBD image server: [`RemoteBase`], the bottom layer of a chain whose
//! backing path is an NBD URI.
//!
//! # Threads, and why a slow server never stalls a core
//! The socket I/O never runs on a core thread. Each connection has a *driver* thread (connects,
//! handshakes, sends requests, expires overdue reads, reconnects) and, while connected, a
//! *reader* thread (takes in replies). A core hands a read to [`RemoteBase::read`], which only
//! queues it under the connection's mutex and wakes the driver; the reply's bytes reach the core
//! as a message on its channel (the way other cross-thread completions reach it), and the core
//! copies them into the request's buffer. Meanwhile the core goes on serving everything else:
//! a read of the overlay's own data on the same core completes while base reads wait.
//!
//! One more thread per base, the *expiry* thread, fails overdue reads every 100 ms whatever
//! the drivers do: a driver inside a connect (up to 10 s for the connect and its whole
//! handshake) holds no read past its deadline.
//!
//! # Connections
//! One per core when the server advertises `CAN_MULTI_CONN`, otherwise one shared by every core
//! (a core's reads go to connection `core % n`).
//!
//! A TLS URI (`nbds://`, `nbds+unix://`) changes nothing here: `client::connect` (every connect
//! and reconnect) does STARTTLS and the handshake, and the [`Stream`] it returns keeps the same
//! contract (one handle reads while another writes; timeouts as set; `shutdown` wakes a blocked
//! reader; see `crate::nbd::tls`).
//!
//! # Failures
//! * The connection drops (server restarted, killed, network): the driver reconnects with
//!   backoff (50 ms doubling to 2 s) and resends every read not yet answered (reads are
//!   idempotent). Reads wait meanwhile, up to their deadline. Each connect, handshake
//!   included, gives up after 10 s in all (a server that trickles its handshake cannot stretch
//!   it).
//! * A read not answered within the timeout (default 30 s) fails with `EIO`: never a hang.
//!   A read that was *sent* and not answered in time also drops the connection (a server
//!   that stopped answering, a half-open TCP connection): the driver reconnects and resends
//!   what is still waiting. Writes to the server are bounded the same way (a server that stops
//!   reading cannot block the driver), and TCP connections carry keepalive and
//!   `TCP_USER_TIMEOUT`. The reply buffer of a read that timed out is freed at once; a late
//!   reply to it is read and dropped.
//! * On reconnect, an export that vanished or whose size changed is logged as an error and
//!   every read fails with `EIO` at once until a reconnect finds it as it was.
//! * A server that breaks the protocol (bad magic, a chunk outside its request, a reply to no
//!   request) loses its connection; what it had in flight is resent on the next one, but the
//!   read the bad chunk was for fails with `EIO`.
//! * A reply must cover every byte of its read exactly once ([`Coverage`]): overlapping chunks
//!   or a gap fail the read with `EIO`, never answer it with stale or zero bytes.
//! * A server going away (`ESHUTDOWN` on a read) is treated as a drop: the connection is
//!   closed (after `NBD_CMD_DISC`) and the read resent on the next one. A connection with
//!   nothing in flight for about [`RemoteOptions::probe_interval`] (default 5 s, jittered)
//!   sends a probe (a one-extent block-status query when `base:allocation` was agreed, else a
//!   small read), so that an idle connection to a server that waits for its clients to leave
//!   (nbdkit after SIGTERM) is closed too.
//! * Requests respect the server's block sizes: a read that does not fit one request once
//!   aligned to the minimum is cut into several ([`Blocks`]), its bytes gathered.
//!
//! Every read handed to [`RemoteBase::read`] is answered exactly once ([`ReadDone`]).
//!
//! # Closing
//! Dropping a [`RemoteBase`] (on the core thread that closes its disk) only signals its
//! threads to stop and wakes them; it never waits for them (a driver may be inside a connect
//! for up to the handshake timeout). They answer what they hold with `EIO` and end on their
//! own.
//!
//! # Holes
//! At open the whole export is asked for `base:allocation` block status once (the base is
//! read-only, so the answer stays true); ranges that read as zeros become zero runs of
//! [`RemoteBase::map`]: neither reads nor populate (stream) fetch them. The query is bounded
//! (with the connect and handshake before it, one deadline: [`OPEN_TIMEOUT`] from when the
//! connect began; and by the base timeout) and in the ranges it keeps; what it did not learn is
//! read from the server. A connection whose query failed may hold unread replies: it is
//! dropped, never used. The open makes no other connection: those connect in their drivers.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::run::{push_run, BaseRun};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::client::{self, ChunkPayload, Coverage, ReplyError, ReplyHeader, Session, Stream};
use crate::nbd::uri::NbdUri;
use crate::nbd::wire;
use crate::sync::{lock, wait_timeout};

/// How long a connect and its whole handshake (and so a reconnect attempt) may take. Reads do
/// not wait for it: they expire on their own deadline meanwhile (see [`expiry`]).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole open of a remote base, from the moment its first connect began: connect,
/// handshake and the holes query ([`RemoteBase::start`]). The open's other connections connect
/// in their own drivers afterwards, never inside the open.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest wait between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A connection that lived this long resets the reconnect backoff.
const STABLE: Duration = Duration::from_secs(5);
/// How often a waiting driver, and the expiry thread, look at deadlines.
const TICK: Duration = Duration::from_millis(100);
/// The default of [`RemoteOptions::probe_interval`].
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// What a remote read produces: exactly the bytes asked for, or an errno.
pub(crate) type ReadResult = std::result::Result<Vec<u8>, i32>;

/// The answer of one remote read: called exactly once; dropped uncalled it answers `EIO`.
pub(crate) struct ReadDone(Option<Box<dyn FnOnce(ReadResult) + Send>>);

impl ReadDone {
    pub(crate) fn new(f: impl FnOnce(ReadResult) + Send + 'static) -> ReadDone {
        ReadDone(Some(Box::new(f)))
    }

    fn answer(mut self, r: ReadResult) {
        if let Some(f) = self.0.take() {
            f(r);
        }
    }
}

impl Drop for ReadDone {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(libc::EIO));
        }
    }
}

/// Settings of a remote base.
#[derive(Debug, Clone, Copy)]
pub struct RemoteOptions {
    /// A read not answered within this fails with `EIO`.
    pub timeout: Duration,
    /// Connections to open when the server allows several (one per core).
    pub conns: usize,
    /// A connection with nothing in flight for about this long (give or take a quarter, at
    /// random, so that a fleet's probes spread out) sends a probe: a block-status query of one
    /// block when `base:allocation` was agreed (answered from metadata, no data read on the
    /// server), else a read of one minimum block. A server that is going away answers it with
    /// `ESHUTDOWN` (nbdkit waits for its idle clients to leave before it exits), a dead one
    /// leaves it unanswered; either way the connection is closed. Default
    /// [`DEFAULT_PROBE_INTERVAL`].
    pub probe_interval: Duration,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            timeout: Duration::from_secs(30),
            conns: 1,
            probe_interval: DEFAULT_PROBE_INTERVAL,
        }
    }
}

/// A remote base: the export's size and holes, and its connections.
pub(crate) struct RemoteBase {
    uri: NbdUri,
    size: u64,
    /// Sorted, disjoint `[start, end)` byte ranges that read as zeros (`base:allocation`).
    zeros: Vec<(u64, u64)>,
    /// Largest read one request may carry (the server's maximum, less alignment slack).
    max_read: u64,
    conns: Vec<Conn>,
}

impl std::fmt::Debug for RemoteBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBase")
            .field("uri", &self.uri.text)
            .field("size", &self.size)
            .field("zero_ranges", &self.zeros.len())
            .field("conns", &self.conns.len())
            .finish()
    }
}

impl RemoteBase {
    /// Takes over `sess` (the connection made when the chain was opened): reads its holes,
    /// then starts its connections (`opts.conns` when the server allows multi-conn).
    ///
    /// Bounded: the holes are asked until [`OPEN_TIMEOUT`] after `sess`'s connect began (and
    /// within `opts.timeout`); when that query fails or times out the session may hold unread
    /// replies, so it is dropped and the first connection's driver connects afresh. The other
    /// connections are made by their own drivers, after the open: the open never waits for
    /// them (their reads wait, up to their deadline, like reads during a reconnect).
    pub(crate) fn start(uri: NbdUri, mut sess: Session, opts: RemoteOptions) -> Result<RemoteBase> {
        let until = (sess.began + OPEN_TIMEOUT).min(Instant::now() + opts.timeout);
        let (zeros, in_step) = client::zero_ranges_in_step(&mut sess, &uri, until);
        let n = if sess.multi_conn() {
            opts.conns.max(1)
        } else {
            1
        };
        let blocks = Blocks::new(sess.min_block, sess.pref_block, sess.max_block);
        let max_read = blocks.max_read();
        let size = sess.size;
        let mut conns = Vec::with_capacity(n);
        let mut first = if in_step {
            Some(sess)
        } else {
            sess.stream.shutdown();
            None
        };
        for i in 0..n {
            conns.push(Conn::start(&uri, i, size, blocks, &opts, first.take())?);
        }
        expiry(&conns)?;
        tracing::info!(uri = %uri, size, conns = n, zero_ranges = zeros.len(),
            "remote base connected");
        Ok(RemoteBase {
            uri,
            size,
            zeros,
            max_read,
            conns,
        })
    }

    /// The URI it was opened by, as stored.
    pub(crate) fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// The export's size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The largest read [`RemoteBase::read`] takes.
    pub(crate) fn max_read(&self) -> u64 {
        self.max_read
    }

    /// Appends runs covering `[offset, offset + len)` (inside the export): zeros where
    /// `base:allocation` said so, remote bytes elsewhere (merged into `out`'s last run when
    /// they continue it).
    pub(crate) fn map(&self, offset: u64, len: u64, layer: u32, out: &mut Vec<BaseRun>) {
        let end = offset + len;
        let mut pos = offset;
        let mut i = self.zeros.partition_point(|z| z.1 <= offset);
        while pos < end {
            match self.zeros.get(i) {
                Some(&(zs, ze)) if zs < end => {
                    if zs > pos {
                        push_run(
                            out,
                            BaseRun::Remote {
                                offset: pos,
                                len: zs - pos,
                                layer,
                            },
                        );
                        pos = zs;
                    }
                    let z_end = ze.min(end);
                    push_run(
                        out,
                        BaseRun::Hole {
                            len: z_end - pos,
                            layer,
                        },
                    );
                    pos = z_end;
                    i += 1;
                }
                _ => {
                    push_run(
                        out,
                        BaseRun::Remote {
                            offset: pos,
                            len: end - pos,
                            layer,
                        },
                    );
                    pos = end;
                }
            }
        }
    }

    /// Reads `[offset, offset + len)` (`len <= max_read()`, inside the export) for core
    /// `core`; `done` is answered from another thread.
    pub(crate) fn read(&self, core: usize, offset: u64, len: u64, done: ReadDone) {
        match self.conns.get(core % self.conns.len().max(1)) {
            Some(c) => c.read(offset, len, done),
            None => done.answer(Err(libc::EIO)),
        }
    }
}

/// The block sizes the server stated, and how a read is cut into requests that respect them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Blocks {
    /// Every request starts and ends on a multiple of this (but at the export's end).
    min: u64,
    /// The largest request: a multiple of `min`, at most the server's maximum.
    max: u64,
    /// Where long reads are cut: a multiple of `min` (of the preferred size when that fits),
    /// at most `max`.
    step: u64,
}

impl Blocks {
    /// From the sizes a session agreed (`min` a power of two, `min <= max`: checked at the
    /// handshake; anything else is made safe here).
    fn new(min: u32, pref: u32, max: u32) -> Blocks {
        let min = u64::from(min.max(1));
        let max = u64::from(max).max(min);
        let max = max - max % min;
        let pref = u64::from(pref);
        let step = if pref >= min && pref % min == 0 && pref <= max {
            max - max % pref
        } else {
            max
        };
        Blocks { min, max, step }
    }

    /// The largest read the cores hand over: one that fits a single request whatever its
    /// alignment when the maximum leaves room for the slack, else the maximum (such a read
    /// is cut into several requests, see [`Blocks::requests`]).
    fn max_read(&self) -> u64 {
        if self.max >= 4 * self.min {
            self.max - 2 * self.min
        } else {
            self.max
        }
    }

    /// The requests that read `[offset, offset + len)` of an export of `size` bytes: aligned to
    /// the minimum (the last one may stop at the export's end), cut at multiples of `step`,
    /// none longer than `max`.
    fn requests(&self, offset: u64, len: u64, size: u64) -> Vec<(u64, u64)> {
        let a_off = offset - offset % self.min;
        let a_end = (offset + len).div_ceil(self.min) * self.min;
        let a_end = a_end.min(size.max(offset + len));
        let mut out = Vec::new();
        let mut pos = a_off;
        while pos < a_end {
            let cut = (pos / self.step + 1) * self.step;
            let end = cut.min(a_end);
            out.push((pos, end - pos));
            pos = end;
        }
        out
    }
}

/// Starts the thread that expires the reads of `conns` every [`TICK`], whatever their drivers
/// are doing (a driver inside a connect or handshake does not look at deadlines for up to
/// [`HANDSHAKE_TIMEOUT`]). It holds the connections weakly and ends once all of them stop.
fn expiry(conns: &[Conn]) -> Result<()> {
    let weak: Vec<std::sync::Weak<ConnShared>> =
        conns.iter().map(|c| Arc::downgrade(&c.shared)).collect();
    std::thread::Builder::new()
        .name("addcow-nbd-expiry".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            let mut live = false;
            for c in weak.iter().filter_map(std::sync::Weak::upgrade) {
                if c.stopping() {
                    continue;
                }
                live = true;
                let mut st = lock(&c.state);
                c.expire(&mut st, Instant::now());
            }
            if !live {
                return;
            }
        })
        .map_err(|e| Error::io("start remote base thread", e))?;
    Ok(())
}

/// `d` give or take a quarter, at random (spreads the probes of many connections out).
fn jittered(d: Duration) -> Duration {
    use std::hash::BuildHasher;
    // A random 64-bit value from the standard library's per-process random hash keys.
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let frac = (r >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.75 + 0.5 * frac)
}

/// A read cut into several requests: their bytes gathered, answered once all came (or at the
/// first failure).
struct Join {
    buf: Vec<u8>,
    left: usize,
    done: Option<ReadDone>,
}

impl Join {
    /// One request's bytes, for `[at, at + bytes.len())` of the read, or its failure.
    fn piece(join: &Mutex<Join>, at: usize, r: ReadResult) {
        let mut j = lock(join);
        if j.done.is_none() {
            return;
        }
        let r = match r {
            Ok(bytes) => match j.buf.get_mut(at..at + bytes.len()) {
                Some(dst) => {
                    dst.copy_from_slice(&bytes);
                    j.left -= 1;
                    if j.left > 0 {
                        return;
                    }
                    Ok(std::mem::take(&mut j.buf))
                }
                None => Err(libc::EIO),
            },
            Err(e) => Err(e),
        };
        let done = j.done.take();
        j.buf = Vec::new();
        drop(j);
        if let Some(d) = done {
            d.answer(r);
        }
    }
}

/// One connection: its shared state and driver thread (never joined: see *Closing*).
struct Conn {
    shared: Arc<ConnShared>,
    driver: Option<JoinHandle<()>>,
}

/// What [`ConnShared::take_buf`] found for a reply's cookie.
enum Taken {
    /// A read still waiting: where its request starts, and its buffer (moved out).
    Live(u64, Vec<u8>),
    /// A block-status probe still waiting (nothing of its reply is kept).
    Status,
    /// A read already answered (it timed out): its reply is read and dropped. The length of
    /// its request bounds what a reply to it may carry.
    Answered(u32),
}

struct ConnShared {
    uri: NbdUri,
    index: usize,
    size: u64,
    blocks: Blocks,
    timeout: Duration,
    probe_interval: Duration,
    state: Mutex<State>,
    cv: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct State {
    next_cookie: u64,
    /// Cookies waiting to be sent, oldest first.
    queue: VecDeque<u64>,
    inflight: HashMap<u64, Pending>,
    /// The reader saw this connection fail.
    dead: bool,
    /// Why the export cannot be used now (vanished, size changed): reads fail at once.
    broken: Option<String>,
    /// A handle on the live socket, to wake the reader at stop.
    sock: Option<Stream>,
    /// The server said it is shutting down: the driver says goodbye (`NBD_CMD_DISC`) and
    /// closes the connection.
    going_away: bool,
}

struct Pending {
    /// `CMD_READ`, or `CMD_BLOCK_STATUS` for a probe.
    kind: u16,
    /// The request as sent: aligned to the server's minimum block.
    offset: u64,
    len: u32,
    /// Where the asked bytes start in the reply, and how many.
    skip: usize,
    want: usize,
    deadline: Instant,
    /// `None` once answered (it timed out): its reply is still taken in and dropped.
    done: Option<ReadDone>,
    /// Allocated when sent, freed when answered.
    buf: Vec<u8>,
    sent: bool,
    /// The bytes of the reply taken in so far: each must come exactly once.
    covered: Coverage,
    error: Option<String>,
    /// A probe of an idle connection (see [`RemoteOptions::probe_interval`]): nobody waits for
    /// it, and it is not sent again on the next connection.
    probe: bool,
}

impl Conn {
    /// Starts the connection's driver on `sess`, or (`None`) on a connection it makes itself.
    fn start(
        uri: &NbdUri,
        index: usize,
        size: u64,
        blocks: Blocks,
        opts: &RemoteOptions,
        sess: Option<Session>,
    ) -> Result<Conn> {
        let shared = Arc::new(ConnShared {
            uri: uri.clone(),
            index,
            size,
            blocks,
            timeout: opts.timeout,
            probe_interval: opts.probe_interval,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let driver = std::thread::Builder::new()
            .name(format!("addcow-nbd-{index}"))
            .spawn(move || s.drive(sess))
            .map_err(|e| Error::io("start remote base thread", e))?;
        Ok(Conn {
            shared,
            driver: Some(driver),
        })
    }

    /// Queues the requests that read `[offset, offset + len)`: one when it fits the server's
    /// block sizes once aligned, else several whose bytes are gathered ([`Join`]).
    fn read(&self, offset: u64, len: u64, done: ReadDone) {
        let sh = &self.shared;
        if len == 0 {
            done.answer(Ok(Vec::new()));
            return;
        }
        let reqs = sh.blocks.requests(offset, len, sh.size);
        let Ok(want) = usize::try_from(len) else {
            done.answer(Err(libc::EINVAL));
            return;
        };
        let mut st = lock(&sh.state);
        if let Some(why) = &st.broken {
            tracing::debug!(uri = %sh.uri, why, "remote base unusable; read fails");
            drop(st);
            done.answer(Err(libc::EIO));
            return;
        }
        let deadline = Instant::now() + sh.timeout;
        if let [(r_off, r_len)] = reqs[..] {
            let Ok(r_len) = u32::try_from(r_len) else {
                drop(st);
                done.answer(Err(libc::EINVAL));
                return;
            };
            let skip = (offset - r_off) as usize;
            st.queue_read(r_off, r_len, skip, want, deadline, done);
        } else {
            let join = Arc::new(Mutex::new(Join {
                buf: vec![0u8; want],
                left: reqs.len(),
                done: Some(done),
            }));
            for (r_off, r_len) in reqs {
                // Each request is at most the server's maximum (checked at the handshake to
                // fit a u32), and holds some of the asked bytes.
                let first = r_off.max(offset);
                let last = (r_off + r_len).min(offset + len);
                let at = (first - offset) as usize;
                let j = Arc::clone(&join);
                let piece = ReadDone::new(move |r| Join::piece(&j, at, r));
                st.queue_read(
                    r_off,
                    r_len as u32,
                    (first - r_off) as usize,
                    (last - first) as usize,
                    deadline,
                    piece,
                );
            }
        }
        drop(st);
        sh.cv.notify_all();
    }
}

impl State {
    /// Queues one read: `len` bytes at `offset` (as sent), of which `want` from `skip` on
    /// are answered to `done`.
    fn queue_read(
        &mut self,
        offset: u64,
        len: u32,
        skip: usize,
        want: usize,
        deadline: Instant,
        done: ReadDone,
    ) {
        self.queue(
            wire::CMD_READ,
            offset,
            len,
            skip,
            want,
            deadline,
            done,
            false,
        );
    }

    /// Queues a probe of an idle connection: `kind` (`CMD_BLOCK_STATUS` or `CMD_READ`) of `len`
    /// bytes at offset 0, answered to nobody.
    fn queue_probe(&mut self, kind: u16, len: u32, deadline: Instant) {
        let nobody = ReadDone::new(|_| {});
        self.queue(kind, 0, len, 0, 0, deadline, nobody, true);
    }

    #[allow(clippy::too_many_arguments)]
    fn queue(
        &mut self,
        kind: u16,
        offset: u64,
        len: u32,
        skip: usize,
        want: usize,
        deadline: Instant,
        done: ReadDone,
        probe: bool,
    ) {
        self.next_cookie += 1;
        let cookie = self.next_cookie;
        self.inflight.insert(
            cookie,
            Pending {
                kind,
                offset,
                len,
                skip,
                want,
                deadline,
                done: Some(done),
                buf: Vec::new(),
                sent: false,
                covered: Coverage::default(),
                error: None,
                probe,
            },
        );
        self.queue.push_back(cookie);
    }
}

impl Drop for Conn {
    /// Signals the driver to stop and wakes it and its reader; does not wait for them. This
    /// runs on the core thread that closes the disk, and a driver inside a connect may take up
    /// to the handshake timeout to notice: the threads end on their own, answering what they
    /// hold with `EIO` (the expiry thread stops looking at this connection at once).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(s) = &lock(&self.shared.state).sock {
            s.shutdown();
        }
        self.shared.cv.notify_all();
        // Detached, never joined (see above).
        drop(self.driver.take());
    }
}

impl ConnShared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Answers every read past its deadline with `EIO`; one not sent yet is forgotten, one
    /// sent keeps its entry (its buffer freed) so that a late reply is still read and dropped.
    /// A sent read past its deadline means the server stopped answering (or the connection is
    /// half-open): the connection is shut down, which wakes the reader, and the driver
    /// reconnects.
    fn expire(&self, st: &mut State, now: Instant) {
        let mut late = Vec::new();
        let mut sent_late = false;
        let mut probes = 0;
        st.inflight.retain(|_, p| {
            if p.done.is_some() && p.deadline <= now {
                probes += usize::from(p.probe);
                late.push(p.done.take());
                if p.sent {
                    sent_late = true;
                    p.buf = Vec::new();
                }
                return p.sent;
            }
            true
        });
        if late.len() > probes {
            tracing::warn!(uri = %self.uri, conn = self.index, reads = late.len() - probes,
                timeout_s = self.timeout.as_secs_f64(),
                "remote base reads not answered within the timeout fail with EIO");
        }
        if sent_late && !st.dead {
            if let Some(s) = &st.sock {
                tracing::warn!(uri = %self.uri, conn = self.index,
                    "the image server did not answer a read in time; dropping the connection");
                s.shutdown();
                st.dead = true;
            }
        }
        for d in late.into_iter().flatten() {
            d.answer(Err(libc::EIO));
        }
    }

    /// Fails every read held (the export is unusable, or the base is closing).
    fn fail_all(&self, st: &mut State) {
        st.queue.clear();
        for (_, p) in st.inflight.drain() {
            if let Some(d) = p.done {
                d.answer(Err(libc::EIO));
            }
        }
    }

    /// Waits up to `d` (or a wakeup), expiring reads meanwhile.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut st = lock(&self.state);
        loop {
            let now = Instant::now();
            self.expire(&mut st, now);
            if self.stopping() || now >= until {
                return;
            }
            let wait = (until - now).min(TICK);
            st = wait_timeout(&self.cv, st, wait).0;
        }
    }

    /// The driver thread: (re)connect, send, reconnect, until the base is closed.
    fn drive(self: Arc<Self>, mut first: Option<Session>) {
        let mut backoff = BACKOFF_MIN;
        let mut outage: Option<Instant> = None;
        while !self.stopping() {
            let sess = match first.take() {
                Some(s) => s,
                None => match client::connect(&self.uri, HANDSHAKE_TIMEOUT) {
                    Ok(s) if s.size != self.size => {
                        let why = format!(
                            "the export's size changed from {} to {} bytes; reads of the base \
                             fail with EIO",
                            self.size, s.size
                        );
                        self.unusable(why);
                        outage.get_or_insert_with(Instant::now);
                        let mut s = s;
                        client::disconnect(&mut s.stream);
                        self.pause(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                    Ok(s) => s,
                    Err(e) => {
                        let gone = matches!(e.kind(), ErrorKind::Remote { why, .. }
                            if why.contains("not found"));
                        if gone {
                            self.unusable(format!("{e}; reads of the base fail with EIO"));
                        } else if outage.is_none() {
                            tracing::warn!(uri = %self.uri, conn = self.index, error = %e,
                                "image server unreachable; reconnecting (reads wait up to the \
                                 base timeout)");
                        }
                        outage.get_or_insert_with(Instant::now);
                        self.pause(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            if let Some(since) = outage.take() {
                tracing::info!(uri = %self.uri, conn = self.index,
                    after_s = since.elapsed().as_secs_f64(), "image server reconnected");
            }
            let began = Instant::now();
            self.serve(sess);
            // A connection that failed at once (a server that breaks the protocol on every
            // read, or dies right after the handshake) is not retried in a tight loop.
            if began.elapsed() < STABLE {
                self.pause(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            } else {
                backoff = BACKOFF_MIN;
            }
        }
        let mut st = lock(&self.state);
        self.fail_all(&mut st);
    }

    /// The export cannot be used (vanished, resized): reads fail at once until a reconnect
    /// finds it as it was. Logged once per reason.
    fn unusable(&self, why: String) {
        let mut st = lock(&self.state);
        if st.broken.as_deref() != Some(why.as_str()) {
            tracing::error!(uri = %self.uri, conn = self.index, "{why}");
        }
        st.broken = Some(why);
        self.fail_all(&mut st);
    }

    /// Runs one connection until it fails or the base closes.
    fn serve(self: &Arc<Self>, sess: Session) {
        let structured = sess.structured;
        // A probe asks block status when it can (no data read on the server), else reads.
        let probe_kind = if sess.allocation_ctx.is_some() {
            wire::CMD_BLOCK_STATUS
        } else {
            wire::CMD_READ
        };
        let mut writer = sess.stream;
        // A write blocks at most a tick at a time (see `send`), so a server that stops reading
        // cannot hold the driver past the reads' deadlines.
        if let Err(e) = writer.set_write_timeout(Some(TICK)) {
            tracing::warn!(uri = %self.uri, error = %e, "setting the socket's write timeout failed");
            return;
        }
        if let Err(e) = writer.set_liveness(self.timeout) {
            tracing::warn!(uri = %self.uri, error = %e,
                "setting TCP keepalive on the image server's connection failed");
        }
        let (reader, waker) = match (writer.try_clone(), writer.try_clone()) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(uri = %self.uri, error = %e, "cloning the socket failed");
                return;
            }
        };
        {
            let mut st = lock(&self.state);
            st.broken = None;
            st.dead = false;
            st.going_away = false;
            st.sock = Some(waker);
            // Resend what the last connection did not answer (reads are idempotent); a probe
            // of the last connection is forgotten.
            let mut again: Vec<u64> = Vec::new();
            st.inflight.retain(|&c, p| {
                if p.done.is_none() || p.probe {
                    return false;
                }
                if p.sent {
                    p.sent = false;
                    p.covered = Coverage::default();
                    p.error = None;
                    again.push(c);
                }
                true
            });
            again.sort_unstable();
            for c in again.into_iter().rev() {
                st.queue.push_front(c);
            }
        }
        if self.stopping() {
            writer.shutdown();
            return;
        }
        let me = Arc::clone(self);
        let rd = std::thread::Builder::new()
            .name(format!("addcow-nbd-r{}", self.index))
            .spawn(move || me.read_replies(reader, structured));
        let rd = match rd {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "starting the reply thread failed");
                return;
            }
        };
        let mut batch = Vec::with_capacity(64 * wire::REQUEST_LEN);
        // Since when nothing was in flight, and how long that may last before a probe (see
        // `RemoteOptions::probe_interval`).
        let mut idle_since: Option<Instant> = None;
        let mut idle_for = jittered(self.probe_interval);
        let probe_len = self.blocks.min.min(self.size) as u32;
        loop {
            batch.clear();
            {
                let mut st = lock(&self.state);
                loop {
                    let now = Instant::now();
                    self.expire(&mut st, now);
                    if self.stopping() || st.dead || !st.queue.is_empty() {
                        break;
                    }
                    if !st.inflight.is_empty() || probe_len == 0 {
                        idle_since = None;
                    } else if now.duration_since(*idle_since.get_or_insert(now)) >= idle_for {
                        idle_since = None;
                        idle_for = jittered(self.probe_interval);
                        st.queue_probe(probe_kind, probe_len, now + self.timeout);
                        break;
                    }
                    st = wait_timeout(&self.cv, st, TICK).0;
                }
                if self.stopping() || st.dead {
                    break;
                }
                while batch.len() < 64 * wire::REQUEST_LEN {
                    let Some(c) = st.queue.pop_front() else { break };
                    if let Some(p) = st.inflight.get_mut(&c) {
                        if p.done.is_some() && !p.sent {
                            p.sent = true;
                            // A block-status probe asks for one extent and keeps nothing.
                            let flags = if p.kind == wire::CMD_BLOCK_STATUS {
                                wire::CMD_FLAG_REQ_ONE
                            } else {
                                p.buf = vec![0u8; p.len as usize];
                                0
                            };
                            let _ = client::send_request_flagged(
                                &mut batch, flags, p.kind, c, p.offset, p.len,
                            );
                        }
                    }
                }
            }
            if !batch.is_empty() {
                if let Err(e) = self.send(&mut writer, &batch) {
                    tracing::warn!(uri = %self.uri, conn = self.index, error = %e,
                        "sending to the image server failed; reconnecting");
                    lock(&self.state).dead = true;
                    break;
                }
            }
        }
        if self.stopping() || lock(&self.state).going_away {
            client::disconnect(&mut writer);
        }
        writer.shutdown();
        let _ = rd.join();
        let mut st = lock(&self.state);
        st.sock = None;
        st.dead = false;
        st.going_away = false;
    }

    /// Writes all of `batch`, a tick at a time: between tries it expires overdue reads (an
    /// overdue sent read drops the connection) and gives up when the connection is dead or
    /// the base closes.
    fn send(&self, w: &mut Stream, batch: &[u8]) -> std::io::Result<()> {
        use std::io::ErrorKind as K;
        let mut pos = 0;
        while pos < batch.len() {
            match w.write(&batch[pos..]) {
                Ok(0) => return Err(K::WriteZero.into()),
                Ok(n) => pos += n,
                Err(e) if matches!(e.kind(), K::WouldBlock | K::TimedOut | K::Interrupted) => {
                    let mut st = lock(&self.state);
                    self.expire(&mut st, Instant::now());
                    if self.stopping() || st.dead {
                        return Err(std::io::Error::other("the server stopped taking requests"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The reply thread: takes in replies until the socket fails or the server breaks the
    /// protocol; then marks the connection dead for the driver. However it ends (a panic
    /// too), a guard marks the connection dead and wakes the driver, which reconnects.
    fn read_replies(self: Arc<Self>, mut s: Stream, structured: bool) {
        /// Marks the connection dead and wakes the driver when dropped (a connection whose
        /// server is going away is left for the driver to say goodbye on and close).
        struct DeadOnExit<'a>(&'a ConnShared);
        impl Drop for DeadOnExit<'_> {
            fn drop(&mut self) {
                let mut st = lock(&self.0.state);
                st.dead = true;
                if let (Some(s), false) = (&st.sock, st.going_away) {
                    s.shutdown();
                }
                drop(st);
                self.0.cv.notify_all();
            }
        }
        let _guard = DeadOnExit(&self);
        // The read a protocol error was about: failed once the error is logged.
        let mut bad = None;
        let r = loop {
            match self.one_reply(&mut s, structured, &mut bad) {
                Ok(()) => {}
                Err(e) => break e,
            }
        };
        if matches!(r, ReplyError::ShuttingDown) {
            lock(&self.state).going_away = true;
            tracing::info!(uri = %self.uri, conn = self.index,
                "the image server is shutting down; closing the connection, reads wait for \
                 the reconnect");
            return;
        }
        if !self.stopping() {
            match &r {
                ReplyError::Protocol(p) => tracing::error!(uri = %self.uri, conn = self.index,
                    "image server broke the protocol ({p}); dropping the connection"),
                ReplyError::Io(e) => tracing::warn!(uri = %self.uri, conn = self.index,
                    error = %e, "connection to the image server lost; reconnecting"),
                ReplyError::ShuttingDown => {}
            }
        }
        if let Some((cookie, why)) = bad {
            self.finish(cookie, Some(format!("protocol error: {why}")));
        }
        s.shutdown();
    }

    /// Moves the buffer of `cookie` out (to read into it without the lock), or says it was
    /// answered already.
    fn take_buf(&self, cookie: u64) -> std::result::Result<Taken, ReplyError> {
        let mut st = lock(&self.state);
        let p = st
            .inflight
            .get_mut(&cookie)
            .filter(|p| p.sent)
            .ok_or_else(|| ReplyError::Protocol(format!("reply to unknown cookie {cookie}")))?;
        if p.done.is_none() {
            return Ok(Taken::Answered(p.len));
        }
        if p.kind == wire::CMD_BLOCK_STATUS {
            return Ok(Taken::Status);
        }
        Ok(Taken::Live(p.offset, std::mem::take(&mut p.buf)))
    }

    /// Forgets an answered read whose (late) reply is over.
    fn forget(&self, cookie: u64) {
        lock(&self.state).inflight.remove(&cookie);
    }

    /// Gives the buffer of `cookie` back, with the bytes of it a chunk just filled in: bytes
    /// some chunk already covered fail the read (see [`Coverage`]).
    fn put_buf(&self, cookie: u64, buf: Vec<u8>, covered: std::ops::Range<usize>) {
        if let Some(p) = lock(&self.state).inflight.get_mut(&cookie) {
            // A read that timed out meanwhile keeps no buffer.
            if p.done.is_some() {
                p.buf = buf;
            }
            if let Err(e) = p.covered.add(covered) {
                p.error.get_or_insert(format!("protocol error: {e}"));
            }
        }
    }

    /// Removes `cookie` and answers it (`error` from the server, or its bytes).
    fn finish(&self, cookie: u64, error: Option<String>) {
        let p = lock(&self.state).inflight.remove(&cookie);
        let Some(mut p) = p else { return };
        let Some(done) = p.done.take() else { return };
        // A block-status probe's reply carries no bytes of the read to cover.
        let status = p.kind == wire::CMD_BLOCK_STATUS;
        let error = error.or(p.error.take()).or_else(|| {
            (!status && !p.covered.is_complete(p.len as usize)).then(|| {
                format!(
                    "the reply covered {} of {} bytes",
                    p.covered.covered(),
                    p.len
                )
            })
        });
        if let Some(why) = error {
            if p.probe {
                tracing::debug!(uri = %self.uri, why, "probe of an idle connection failed");
            } else {
                tracing::warn!(uri = %self.uri, offset = p.offset, len = p.len, why,
                    "remote base read failed; EIO");
            }
            done.answer(Err(libc::EIO));
            return;
        }
        let mut buf = p.buf;
        if p.skip > 0 {
            buf.drain(..p.skip);
        }
        buf.truncate(p.want);
        done.answer(Ok(buf));
    }

    /// Takes in a chunk of the reply to a block-status probe: its extents are read and dropped
    /// (bounded), an error chunk fails the probe (`ESHUTDOWN`: the server is going away), any
    /// other chunk breaks the protocol.
    fn status_chunk(
        &self,
        s: &mut Stream,
        c: &client::Chunk,
    ) -> std::result::Result<(), ReplyError> {
        match c.kind {
            wire::REPLY_TYPE_BLOCK_STATUS | wire::REPLY_TYPE_NONE => {
                if c.len > client::MAX_ERROR_CHUNK {
                    return Err(ReplyError::Protocol(format!(
                        "block status chunk of {} bytes for a one-extent probe",
                        c.len
                    )));
                }
                client::skip(s, u64::from(c.len))?;
            }
            _ => match client::read_chunk_into(s, c, 0, &mut [])? {
                ChunkPayload::Error { code, msg } => {
                    if code == wire::NBD_ESHUTDOWN {
                        return Err(ReplyError::ShuttingDown);
                    }
                    if let Some(p) = lock(&self.state).inflight.get_mut(&c.cookie) {
                        p.error.get_or_insert(format!("server error {code}: {msg}"));
                    }
                }
                ChunkPayload::Covered(r) if r.is_empty() => {}
                ChunkPayload::Nothing => {}
                ChunkPayload::Covered(_) => {
                    return Err(ReplyError::Protocol("data in a block status reply".into()))
                }
            },
        }
        if c.flags & wire::REPLY_FLAG_DONE != 0 {
            self.finish(c.cookie, None);
        }
        Ok(())
    }

    /// Takes in one reply header and what follows it. A chunk that breaks the protocol for a
    /// known read names that read in `bad` (the caller fails it).
    fn one_reply(
        &self,
        s: &mut Stream,
        structured: bool,
        bad: &mut Option<(u64, String)>,
    ) -> std::result::Result<(), ReplyError> {
        match client::read_reply_header(s)? {
            ReplyHeader::Simple { cookie, error } => {
                if error == wire::NBD_ESHUTDOWN {
                    return Err(ReplyError::ShuttingDown);
                }
                if error == 0 && structured {
                    // Data in a simple reply after structured replies were agreed is not allowed.
                    return Err(ReplyError::Protocol("simple reply with data".into()));
                }
                let mut buf = match self.take_buf(cookie)? {
                    Taken::Live(_, buf) => buf,
                    Taken::Status => Vec::new(),
                    Taken::Answered(len) => {
                        // A late reply to a read that timed out: read and dropped.
                        if error == 0 {
                            client::skip(s, u64::from(len))?;
                        }
                        self.forget(cookie);
                        return Ok(());
                    }
                };
                if error != 0 {
                    self.put_buf(cookie, buf, 0..0);
                    self.finish(cookie, Some(format!("server error {error}")));
                    return Ok(());
                }
                s.read_exact(&mut buf)?;
                let n = buf.len();
                self.put_buf(cookie, buf, 0..n);
                self.finish(cookie, None);
                Ok(())
            }
            ReplyHeader::Chunk(c) => {
                if !structured {
                    return Err(ReplyError::Protocol(
                        "structured reply not negotiated".into(),
                    ));
                }
                let (start, mut buf) = match self.take_buf(c.cookie)? {
                    Taken::Live(start, buf) => (start, buf),
                    Taken::Status => return self.status_chunk(s, &c),
                    Taken::Answered(len) => {
                        // A late chunk of a read that timed out: read and dropped (its size
                        // bounded by what the read could carry).
                        let most = u64::from(len).max(u64::from(client::MAX_ERROR_CHUNK)) + 8;
                        if u64::from(c.len) > most {
                            return Err(ReplyError::Protocol(format!(
                                "chunk of {} bytes for a read of {len}",
                                c.len
                            )));
                        }
                        client::skip(s, u64::from(c.len))?;
                        if c.flags & wire::REPLY_FLAG_DONE != 0 {
                            self.forget(c.cookie);
                        }
                        return Ok(());
                    }
                };
                let got = match client::read_chunk_into(s, &c, start, &mut buf) {
                    Ok(got) => got,
                    Err(ReplyError::Protocol(p)) => {
                        // A chunk outside its read, or of a type a read cannot have: the read
                        // fails now (never answered with what the server sent), and the
                        // connection is dropped.
                        self.put_buf(c.cookie, buf, 0..0);
                        *bad = Some((c.cookie, p.clone()));
                        return Err(ReplyError::Protocol(p));
                    }
                    Err(e) => return Err(e),
                };
                let covered = match &got {
                    ChunkPayload::Covered(r) => r.clone(),
                    _ => 0..0,
                };
                self.put_buf(c.cookie, buf, covered);
                if let ChunkPayload::Error { code, msg } = got {
                    if code == wire::NBD_ESHUTDOWN {
                        return Err(ReplyError::ShuttingDown);
                    }
                    if let Some(p) = lock(&self.state).inflight.get_mut(&c.cookie) {
                        p.error.get_or_insert(format!("server error {code}: {msg}"));
                    }
                }
                if c.flags & wire::REPLY_FLAG_DONE != 0 {
                    self.finish(c.cookie, None);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_gives_the_servers_holes_as_holes_of_their_layer() {
        let b = RemoteBase {
            uri: NbdUri::parse("nbd+unix:///?socket=/x").expect("uri"),
            size: 10_000,
            zeros: vec![(1000, 2000), (5000, 6000)],
            max_read: 1 << 20,
            conns: Vec::new(),
        };
        let mut out = Vec::new();
        b.map(500, 5000, 2, &mut out);
        assert_eq!(
            out,
            vec![
                BaseRun::Remote {
                    offset: 500,
                    len: 500,
                    layer: 2
                },
                BaseRun::Hole {
                    len: 1000,
                    layer: 2
                },
                BaseRun::Remote {
                    offset: 2000,
                    len: 3000,
                    layer: 2
                },
                BaseRun::Hole { len: 500, layer: 2 },
            ]
        );
        out.clear();
        b.map(1500, 100, 0, &mut out);
        assert_eq!(out, vec![BaseRun::Hole { len: 100, layer: 0 }]);
        out.clear();
        b.map(6000, 4000, 0, &mut out);
        assert_eq!(
            out,
            vec![BaseRun::Remote {
                offset: 6000,
                len: 4000,
                layer: 0
            }]
        );
        // A base with no connection answers EIO, never panics or hangs.
        let (tx, rx) = std::sync::mpsc::channel();
        b.read(0, 0, 512, ReadDone::new(move |r| tx.send(r).expect("send")));
        assert_eq!(rx.recv().expect("answered"), Err(libc::EIO));
        // A dropped answer answers EIO.
        let (tx, rx) = std::sync::mpsc::channel();
        drop(ReadDone::new(move |r| tx.send(r).expect("send")));
        assert_eq!(rx.recv().expect("answered"), Err(libc::EIO));
    }
}

#[cfg(test)]
mod block_tests {
    use super::*;

    /// Probe intervals are spread over a quarter either way of the setting, and do vary (a
    /// fleet's connections do not probe in step).
    #[test]
    fn probe_intervals_are_jittered_within_a_quarter() {
        let d = Duration::from_secs(4);
        let got: Vec<Duration> = (0..200).map(|_| jittered(d)).collect();
        for g in &got {
            assert!(*g >= d.mul_f64(0.75) && *g <= d.mul_f64(1.25), "{g:?}");
        }
        let (lo, hi) = (got.iter().min().unwrap(), got.iter().max().unwrap());
        assert!(*hi - *lo > Duration::from_millis(500), "{lo:?}..{hi:?}");
    }

    /// Every read, at every alignment, is cut into requests that start and end on the
    /// minimum block (but at the export's end), are at most the maximum, and cover the read.
    #[test]
    fn requests_respect_the_servers_block_sizes() {
        let size = 1 << 20;
        for (min, pref, max) in [
            (4096, 4096, 8192),
            (4096, 4096, 4096),
            (512, 512, 1024),
            (512, 4096, 65536),
            (1, 4096, 32 << 20),
            (4096, 65536, 65536 + 4096),
        ] {
            let b = Blocks::new(min, pref, max);
            let (min, max) = (u64::from(min), u64::from(max));
            for offset in [0u64, 1, 100, 511, 4095, 4096, 5000, 12345] {
                for len in [1u64, 3, 512, 4096, 8192, b.max_read()] {
                    if offset + len > size {
                        continue;
                    }
                    let reqs = b.requests(offset, len, size);
                    let what = format!("{min}/{pref}/{max}: read {offset}+{len}: {reqs:?}");
                    assert!(!reqs.is_empty(), "{what}");
                    assert!(reqs[0].0 <= offset, "{what}");
                    let last = reqs[reqs.len() - 1];
                    assert!(last.0 + last.1 >= offset + len, "{what}");
                    for w in reqs.windows(2) {
                        assert_eq!(w[0].0 + w[0].1, w[1].0, "{what}");
                    }
                    for &(o, l) in &reqs {
                        assert!(l > 0 && l <= max, "{what}");
                        assert_eq!(o % min, 0, "{what}");
                        assert!(l % min == 0 || o + l == size, "{what}");
                    }
                }
            }
        }
    }
}
