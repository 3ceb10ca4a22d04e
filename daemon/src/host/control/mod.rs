//! The control socket (`addcow serve --control PATH`): JSON-RPC 2.0, one JSON object per line,
//! requests answered in order on each connection, plus notifications ([`super::events`]).
//!
//! Threads: one accept thread; per connection a reader (parses a line, runs the method from
//! [`methods::METHODS`], queues the response) and a writer (sends queued responses and
//! notifications). Nothing the daemon does waits on a control client:
//!
//! * a line longer than [`MAX_LINE`] gets an `INVALID_REQUEST` error, then the connection closes
//!   (the rest of the line cannot be framed);
//! * a client that does not read: its queue is capped at [`MAX_QUEUED`] bytes and each write
//!   at [`WRITE_TIMEOUT`]; past either the connection is closed;
//! * who may connect: the socket file's mode and group, and an optional allow-list of uids
//!   and gids checked with `SO_PEERCRED` ([`ControlLimits::policy`]; refusals are logged and
//!   counted);
//! * a connection that sends no request for [`ControlLimits::idle_timeout`] is closed;
//! * slots per uid ([`Slots`]): one uid holds at most [`MAX_PER_UID`] connections, and a new
//!   one past that replaces the same uid's longest-idle connection (so a uid never locks
//!   itself out); uids other than root and the daemon's own share [`MAX_CONNECTIONS`] slots,
//!   and when those are full a newcomer takes the longest-idle slot of the uid holding the
//!   most (so no uid can take them all); root and the daemon's own uid, the operators, are
//!   outside that pool and never locked out by others.
//!
//! A method runs on its connection's reader thread, so a slow one (`export-del` waiting for
//! clients) holds up only that connection. Names a client chose are logged with `Debug`
//! formatting (quoted, escaped).

pub mod backup;
mod bitmaps;
mod job_methods;
pub mod methods;
pub mod record;
pub mod resize;
pub mod rpc;
pub mod throttle;

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::events::Sink;
use super::runtime::Host;
use crate::conn::listener::{PeerCred, PeerPolicy};
use addcow_engine::sync::{lock, wait};
use rpc::{RpcError, INVALID_REQUEST, METHOD_NOT_FOUND};

/// Longest request line read (1 MiB).
pub const MAX_LINE: usize = 1 << 20;
/// Most bytes of responses and notifications queued for one client.
pub const MAX_QUEUED: usize = 8 << 20;
/// Longest a single write to a client may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most simultaneous control connections of uids other than root and the daemon's own.
pub const MAX_CONNECTIONS: usize = 16;
/// Most simultaneous control connections of one uid.
pub const MAX_PER_UID: usize = 8;

/// What limits who connects to the control socket and for how long.
#[derive(Debug, Clone)]
pub struct ControlLimits {
    /// The allow-list (empty: whoever can open the socket file).
    pub policy: PeerPolicy,
    /// Close a connection that sent no request for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
}

/// One connection's place in [`Slots`].
struct Slot {
    id: u64,
    uid: u32,
    /// Root or the daemon's own uid: outside the shared pool.
    operator: bool,
    /// A method is running (the connection is not idle: never evicted).
    busy: bool,
    /// When its last request ended (or it connected).
    last_active: Instant,
    /// To close it when evicted.
    sock: UnixStream,
}

/// The control connections, by uid (see the module docs for the rules).
#[derive(Default)]
pub struct Slots {
    slots: Vec<Slot>,
}

/// What [`Slots::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Room: take a slot.
    Yes,
    /// Take the slot of connection `id` (idle the longest), which is closed.
    Evict(u64),
    /// No slot: close the new connection.
    No,
}

impl Slots {
    /// Where a new connection of `uid` goes.
    pub fn admit(&self, uid: u32, operator: bool) -> Admit {
        let idlest = |of: u32| {
            self.slots
                .iter()
                .filter(|s| s.uid == of && !s.busy)
                .min_by_key(|s| s.last_active)
                .map(|s| s.id)
        };
        let mine = self.slots.iter().filter(|s| s.uid == uid).count();
        if mine >= MAX_PER_UID {
            return idlest(uid).map_or(Admit::No, Admit::Evict);
        }
        if operator {
            return Admit::Yes;
        }
        let shared = self.slots.iter().filter(|s| !s.operator).count();
        if shared < MAX_CONNECTIONS {
            return Admit::Yes;
        }
        // Full: the uid holding the most gives up its idlest slot, if it holds more than the
        // newcomer would.
        let mut counts: Vec<(u32, usize)> = Vec::new();
        for s in self.slots.iter().filter(|s| !s.operator) {
            match counts.iter_mut().find(|(u, _)| *u == s.uid) {
                Some((_, n)) => *n += 1,
                None => counts.push((s.uid, 1)),
            }
        }
        match counts.iter().max_by_key(|(_, n)| *n) {
            Some(&(top, n)) if n > mine + 1 => idlest(top).map_or(Admit::No, Admit::Evict),
            _ => Admit::No,
        }
    }

    fn insert(&mut self, id: u64, uid: u32, operator: bool, sock: UnixStream) {
        self.slots.push(Slot {
            id,
            uid,
            operator,
            busy: false,
            last_active: Instant::now(),
            sock,
        });
    }

    /// Takes slot `id` away and closes its connection.
    fn evict(&mut self, id: u64) {
        if let Some(i) = self.slots.iter().position(|s| s.id == id) {
            let s = self.slots.swap_remove(i);
            let _ = s.sock.shutdown(Shutdown::Both);
        }
    }

    fn remove(&mut self, id: u64) {
        self.slots.retain(|s| s.id != id);
    }

    fn set_busy(&mut self, id: u64, busy: bool) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.id == id) {
            s.busy = busy;
            s.last_active = Instant::now();
        }
    }
}

/// The slot table shared by the accept thread and the connections.
type SharedSlots = Arc<Mutex<Slots>>;

fn lock_slots(s: &Mutex<Slots>) -> std::sync::MutexGuard<'_, Slots> {
    lock(s)
}

/// The outgoing side of one connection: a queue of lines and the writer thread's wake-up.
struct Out {
    sock: UnixStream,
    st: Mutex<OutState>,
    cv: Condvar,
}

#[derive(Default)]
struct OutState {
    queue: VecDeque<Arc<[u8]>>,
    bytes: usize,
    /// No more lines will be queued: the writer ends when the queue is empty.
    finishing: bool,
    /// The connection is closed (client gone, too slow, or too much queued).
    dead: bool,
}

impl Out {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        lock(&self.st)
    }

    /// Queues `line`; false when the connection is (now) closed.
    fn push(&self, line: Arc<[u8]>) -> bool {
        let mut st = self.lock();
        if st.dead {
            return false;
        }
        if st.bytes + line.len() > MAX_QUEUED {
            st.dead = true;
            st.queue.clear();
            drop(st);
            tracing::warn!(
                limit = MAX_QUEUED,
                "control client does not read its replies; closing the connection"
            );
            let _ = self.sock.shutdown(Shutdown::Both);
            self.cv.notify_all();
            return false;
        }
        st.bytes += line.len();
        st.queue.push_back(line);
        drop(st);
        self.cv.notify_all();
        true
    }

    fn finish(&self) {
        self.lock().finishing = true;
        self.cv.notify_all();
    }

    /// Whether everything queued was written (or the connection is closed).
    fn drained(&self) -> bool {
        let st = self.lock();
        st.dead || st.queue.is_empty()
    }

    /// The writer thread.
    fn run_writer(&self) {
        let mut sock = &self.sock;
        loop {
            let line = {
                let mut st = self.lock();
                loop {
                    if st.dead {
                        return;
                    }
                    if let Some(l) = st.queue.front() {
                        break l.clone();
                    }
                    if st.finishing {
                        return;
                    }
                    st = wait(&self.cv, st);
                }
            };
            if let Err(e) = sock.write_all(&line) {
                tracing::info!(error = %e, "control client not reading or gone; closing");
                let mut st = self.lock();
                st.dead = true;
                st.queue.clear();
                drop(st);
                let _ = self.sock.shutdown(Shutdown::Both);
                self.cv.notify_all();
                return;
            }
            let mut st = self.lock();
            if st.dead {
                return;
            }
            st.queue.pop_front();
            st.bytes -= line.len();
            drop(st);
            self.cv.notify_all();
        }
    }
}

impl Sink for Out {
    fn deliver(&self, line: &Arc<[u8]>) -> bool {
        self.push(line.clone())
    }
}

/// The running control server.
pub struct ControlServer {
    listener: Arc<UnixListener>,
    stopping: Arc<AtomicBool>,
    outs: Arc<Mutex<Vec<Weak<Out>>>>,
}

impl ControlServer {
    /// Starts accepting on `listener` (already bound, mode set) for `host`, within `limits`.
    pub fn start(
        listener: UnixListener,
        host: Arc<Host>,
        limits: ControlLimits,
    ) -> io::Result<ControlServer> {
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let outs: Arc<Mutex<Vec<Weak<Out>>>> = Arc::default();
        let (l, s, o) = (listener.clone(), stopping.clone(), outs.clone());
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || accept_loop(&l, &s, &host, &o, &limits))?;
        Ok(ControlServer {
            listener,
            stopping,
            outs,
        })
    }

    /// Waits (up to `deadline`) until every queued response and notification was written, so a
    /// `quit` is answered before the process exits.
    pub fn flush(&self, deadline: Instant) {
        loop {
            let outs: Vec<Arc<Out>> = lock(&self.outs).iter().filter_map(Weak::upgrade).collect();
            if outs.iter().all(|o| o.drained()) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops accepting (existing connections go on until their clients leave).
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Ok(addr) = self.listener.local_addr() {
            if let Some(p) = addr.as_pathname() {
                let _ = UnixStream::connect(p);
            }
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    stopping: &AtomicBool,
    host: &Arc<Host>,
    outs: &Arc<Mutex<Vec<Weak<Out>>>>,
    limits: &ControlLimits,
) {
    let slots: SharedSlots = Arc::default();
    let me = nix::unistd::geteuid().as_raw();
    let mut next_id = 0u64;
    loop {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        if limits.policy.admit(&sock).is_err() {
            let _ = sock.shutdown(Shutdown::Both);
            continue;
        }
        let uid = match PeerCred::of(&sock) {
            Ok(c) => c.uid,
            Err(e) => {
                tracing::warn!(error = %e, "control connection refused: cannot read its peer's credentials");
                continue;
            }
        };
        let operator = uid == 0 || uid == me;
        let id = next_id;
        next_id += 1;
        let Ok(handle) = sock.try_clone() else {
            tracing::warn!("control connection refused: cannot set it up");
            continue;
        };
        {
            let mut t = lock_slots(&slots);
            match t.admit(uid, operator) {
                Admit::Yes => {}
                Admit::Evict(old) => {
                    tracing::info!(
                        conn = old,
                        uid,
                        "control connection closed: its slot went to a new connection"
                    );
                    t.evict(old);
                }
                Admit::No => {
                    drop(t);
                    tracing::warn!(
                        uid,
                        max = MAX_CONNECTIONS,
                        max_per_uid = MAX_PER_UID,
                        "control connection refused: no free slot"
                    );
                    let _ = sock.shutdown(Shutdown::Both);
                    continue;
                }
            }
            t.insert(id, uid, operator, handle);
        }
        let (host, slots2, outs, idle) = (
            host.clone(),
            slots.clone(),
            outs.clone(),
            limits.idle_timeout,
        );
        let spawned = std::thread::Builder::new()
            .name(format!("control-{id}"))
            .spawn(move || {
                serve_connection(sock, id, &host, &outs, &slots2, idle);
                lock_slots(&slots2).remove(id);
            });
        if let Err(e) = spawned {
            lock_slots(&slots).remove(id);
            tracing::warn!(error = %e, "cannot start a control connection thread");
        }
    }
}

/// A control connection's reading side: every read waits at most until `deadline` (a request
/// line must be complete by then; it moves on after each request).
struct IdleReader {
    sock: UnixStream,
    idle: Option<Duration>,
    deadline: Option<Instant>,
}

impl IdleReader {
    fn restart(&mut self) {
        self.deadline = self.idle.map(|d| Instant::now() + d);
    }
}

impl Read for IdleReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle"));
                }
                Some(left)
            }
            None => None,
        };
        self.sock.set_read_timeout(left)?;
        self.sock.read(buf)
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (without its newline).
enum Line {
    Full(Vec<u8>),
    TooLong,
    Eof,
}

fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Full(std::mem::take(buf)));
    }
    if buf.len() > MAX_LINE {
        return Ok(Line::TooLong);
    }
    // The last line, without a newline.
    Ok(Line::Full(std::mem::take(buf)))
}

/// Runs one request line: the response to queue, if any.
pub fn handle_line(host: &Host, line: &[u8]) -> Option<Vec<u8>> {
    let call = match rpc::parse(line) {
        Ok(c) => c,
        Err((id, e)) => {
            tracing::debug!(error = ?e.message, "bad control request");
            return id.map(|id| rpc::response(&id, Err(e)));
        }
    };
    let result = match methods::find(&call.method) {
        Some(m) => {
            tracing::debug!(method = m.name, "control request");
            (m.call)(host, call.params)
        }
        None => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!("no method {:?} (try \"hello\")", call.method),
        )),
    };
    if let Err(e) = &result {
        tracing::info!(method = ?call.method, error = ?e.message, "control request failed");
    }
    call.id.map(|id| rpc::response(&id, result))
}

fn serve_connection(
    sock: UnixStream,
    id: u64,
    host: &Host,
    outs: &Mutex<Vec<Weak<Out>>>,
    slots: &Mutex<Slots>,
    idle: Option<Duration>,
) {
    let (rsock, wsock) = match (sock.try_clone(), sock.try_clone()) {
        (Ok(r), Ok(w)) => (r, w),
        _ => return,
    };
    if wsock.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let out = Arc::new(Out {
        sock: wsock,
        st: Mutex::new(OutState::default()),
        cv: Condvar::new(),
    });
    {
        let mut o = lock(outs);
        o.retain(|w| w.strong_count() > 0);
        o.push(Arc::downgrade(&out));
    }
    let sink: Arc<dyn Sink> = out.clone();
    host.events.subscribe(Arc::downgrade(&sink));
    let wout = out.clone();
    let writer = match std::thread::Builder::new()
        .name(format!("control-{id}-writer"))
        .spawn(move || wout.run_writer())
    {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a control writer thread");
            return;
        }
    };
    tracing::info!(conn = id, "control connection open");
    let mut idle_reader = IdleReader {
        sock: rsock,
        idle,
        deadline: None,
    };
    idle_reader.restart();
    let mut reader = BufReader::with_capacity(64 << 10, idle_reader);
    let mut buf = Vec::new();
    let mut requests = 0u64;
    loop {
        match read_line(&mut reader, &mut buf) {
            Ok(Line::Eof) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                tracing::info!(
                    conn = id,
                    idle_timeout_s = idle.map(|d| d.as_secs()),
                    "control connection idle; closing"
                );
                break;
            }
            Err(_) => break,
            Ok(Line::TooLong) => {
                let e = RpcError::new(
                    INVALID_REQUEST,
                    format!("request line longer than {MAX_LINE} bytes; closing the connection"),
                );
                tracing::warn!(conn = id, "control request line too long; closing");
                out.push(rpc::response(&Value::Null, Err(e)).into());
                break;
            }
            Ok(Line::Full(line)) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                requests += 1;
                lock_slots(slots).set_busy(id, true);
                let resp = handle_line(host, &line);
                lock_slots(slots).set_busy(id, false);
                reader.get_mut().restart();
                if let Some(resp) = resp {
                    if !out.push(resp.into()) {
                        break;
                    }
                }
            }
        }
    }
    out.finish();
    let _ = writer.join();
    let _ = sock.shutdown(Shutdown::Both);
    drop(sink);
    tracing::info!(conn = id, requests, "control connection closed");
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn lines_are_framed_and_bounded() {
        let mut input = b"{\"a\":1}\n\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\nlast");
        let mut r = Cursor::new(input);
        let mut buf = Vec::new();
        assert!(matches!(read_line(&mut r, &mut buf).unwrap(), Line::Full(l) if l == b"{\"a\":1}"));
        assert!(matches!(read_line(&mut r, &mut buf).unwrap(), Line::Full(l) if l.is_empty()));
        assert!(matches!(
            read_line(&mut r, &mut buf).unwrap(),
            Line::TooLong
        ));
        // Exactly MAX_LINE bytes plus newline is fine.
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        let mut r = Cursor::new(exact);
        assert!(
            matches!(read_line(&mut r, &mut buf).unwrap(), Line::Full(l) if l.len() == MAX_LINE)
        );
        assert!(matches!(read_line(&mut r, &mut buf).unwrap(), Line::Eof));
    }

    /// One uid cannot take every slot: past its own cap it only replaces its own idle
    /// connections; when the shared pool is full a newcomer takes an idle slot of the uid
    /// holding the most; operators are outside the pool; busy connections are never evicted.
    #[test]
    fn slots_are_per_uid_and_no_uid_takes_them_all() {
        let mut t = Slots::default();
        let mut next = 0u64;
        let mut add = |t: &mut Slots, uid: u32, op: bool| -> Admit {
            let a = t.admit(uid, op);
            match a {
                Admit::Yes => {}
                Admit::Evict(old) => t.evict(old),
                Admit::No => return a,
            }
            let (s, _peer) = UnixStream::pair().unwrap();
            t.insert(next, uid, op, s);
            next += 1;
            a
        };
        // A hostile uid 1000 opens many: it keeps at most MAX_PER_UID, replacing its own.
        for _ in 0..MAX_PER_UID {
            assert_eq!(add(&mut t, 1000, false), Admit::Yes);
        }
        assert_eq!(add(&mut t, 1000, false), Admit::Evict(0));
        assert_eq!(
            t.slots.iter().filter(|s| s.uid == 1000).count(),
            MAX_PER_UID
        );
        // A second one fills the rest of the pool.
        for _ in 0..MAX_CONNECTIONS - MAX_PER_UID {
            assert_eq!(add(&mut t, 1001, false), Admit::Yes);
        }
        // A third uid still gets in: the longest-idle slot of a uid holding the most goes.
        assert!(matches!(add(&mut t, 1002, false), Admit::Evict(_)));
        assert_eq!(t.slots.iter().filter(|s| s.uid == 1002).count(), 1);
        // The operator is outside the pool.
        assert_eq!(add(&mut t, 0, true), Admit::Yes);
        // Busy connections are never taken.
        for s in t.slots.iter_mut() {
            s.busy = true;
        }
        assert_eq!(add(&mut t, 1003, false), Admit::No);
        for _ in 0..MAX_PER_UID - 1 {
            assert_eq!(add(&mut t, 0, true), Admit::Yes);
        }
        assert!(matches!(add(&mut t, 0, true), Admit::Evict(_)));
        for s in t.slots.iter_mut() {
            s.busy = true;
        }
        assert_eq!(add(&mut t, 0, true), Admit::No, "all of its own are busy");
    }

    #[test]
    fn a_client_that_never_reads_is_cut_off_at_the_queue_limit() {
        let (a, _b) = UnixStream::pair().unwrap();
        let out = Out {
            sock: a,
            st: Mutex::new(OutState::default()),
            cv: Condvar::new(),
        };
        // No writer thread: nothing drains, as with a client that never reads.
        let line: Arc<[u8]> = vec![b'x'; 64 << 10].into();
        let mut pushed = 0;
        while out.push(line.clone()) {
            pushed += 1;
            assert!(
                pushed <= MAX_QUEUED / line.len(),
                "queue grew past its limit"
            );
        }
        assert_eq!(pushed, MAX_QUEUED / line.len());
        assert!(out.drained(), "a dead connection holds nothing");
        assert!(!out.push(line), "stays closed");
    }
}
