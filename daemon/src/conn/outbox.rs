//! The reply path of one connection: a queue of finished replies and the writer thread that
//! sends them, in the order they were posted, one batch (one `sendmsg`) at a time.
//!
//! A finished request [`Ticket::send`]s its [`Reply`] from the thread it finished on (an engine
//! core thread, or the reader for replies that needed no engine): a short critical section that
//! never touches the socket, so a core thread never waits on a slow client. The writer blocks on
//! a condition variable while the queue is empty (no spinning or yielding), and is woken only
//! when it actually waits; one wake-up takes everything queued since.
//!
//! Each reply holds a share of the connection's [`Budget`], given back once it is sent (or
//! dropped because the client is gone; a WRITE's buffer bytes as soon as the engine is done
//! with them, [`Ticket::free_bytes`]). The writer ends once the reader has closed the outbox
//! and every ticket handed out has been sent or dropped. A request that must not be answered
//! (the engine refused it because it is shutting down) gives its ticket up with
//! [`Ticket::unanswered`], which also stops the connection's reader: a reconnecting client
//! resends what was never answered.
//!
//! Each ticket also carries its request's [`Stamp`]: the writer records the request in the
//! export's [`ExportStats`] (shard of the connection's core) once the reply is sent, with the
//! latency from header parsed to reply handed to the kernel.

use std::collections::VecDeque;
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::budget::Budget;
use super::conns::ClientHandle;
use super::sock::Sock;
use super::tls::TlsConn;
use crate::nbd::reply::{self, Body, Framing, Reply};
use crate::nbd::stats::{ExportStats, Stamp};
use addcow_engine::sync::{lock, wait};

/// Most replies the writer sends with one `sendmsg` batch.
const WRITER_BATCH: usize = 64;
/// Most READ bytes the writer batches before sending.
const WRITER_BATCH_BYTES: u64 = 1 << 20;

/// A reply waiting for the writer, with the budget bytes it holds and its request's stamp.
type Pending = (Reply, u64, Stamp);

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    /// Tickets handed out and not yet sent or dropped.
    outstanding: usize,
    /// The writer waits on `ready` and nobody has woken it yet.
    writer_waiting: bool,
    /// The reader is done: no new tickets.
    closed: bool,
    /// A send failed: the client is gone; replies are dropped.
    broken: bool,
    /// READ payload bytes posted while not broken.
    bytes: u64,
    /// Error replies posted.
    errors: u64,
    /// When the writer last handed replies to the kernel.
    last_sent: Option<Instant>,
}

/// See the module docs.
pub struct Outbox {
    sock: Sock,
    /// Replies go through this TLS session (with its write timeout) instead of `sendmsg`.
    tls: Option<(TlsConn, Option<std::time::Duration>)>,
    framing: Framing,
    budget: Arc<Budget>,
    stats: Arc<ExportStats>,
    shard: usize,
    handle: Arc<ClientHandle>,
    state: Mutex<State>,
    ready: Condvar,
}

/// The right (and duty) to send one reply, holding `cost` of the budget. Dropping it unsent
/// gives the budget back and sends nothing.
pub struct Ticket {
    outbox: Arc<Outbox>,
    cost: u64,
    stamp: Stamp,
    used: bool,
}

impl Ticket {
    /// Queues `reply` for the writer.
    pub fn send(mut self, reply: Reply) {
        self.used = true;
        self.outbox.post(reply, self.cost, self.stamp);
    }

    /// Gives the buffer bytes this ticket holds back to the budget now (the request stays in
    /// flight until its reply is sent).
    pub fn free_bytes(&mut self) {
        self.outbox.budget.release_bytes(self.cost);
        self.cost = 0;
    }

    /// Leaves the request unanswered and stops the connection's reader: the request was
    /// refused because the engine is shutting down, and a reconnecting client resends it.
    pub fn unanswered(self) {
        tracing::debug!("request refused by a stopping engine; stopping the connection");
        self.outbox.handle.stop_reading();
        drop(self);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.used {
            self.outbox.abandon(self.cost, &self.stamp);
        }
    }
}

fn is_error(reply: &Reply) -> bool {
    matches!(reply.body, Body::Error { .. })
}

fn payload_bytes(reply: &Reply) -> u64 {
    match &reply.body {
        Body::Read { data, .. } => data.len() as u64,
        Body::Zeros { len, .. } => u64::from(*len),
        _ => 0,
    }
}

impl Outbox {
    /// An outbox sending on `sock` (a clone of the connection's socket), recording requests in
    /// `stats` shard `shard`; `handle` stops the connection's reader.
    pub fn new(
        sock: Sock,
        framing: Framing,
        budget: Arc<Budget>,
        stats: Arc<ExportStats>,
        shard: usize,
        handle: Arc<ClientHandle>,
    ) -> Arc<Outbox> {
        Self::build(sock, None, framing, budget, stats, shard, handle)
    }

    /// [`Outbox::new`] for a connection in TLS: replies are written through `tls.0`, giving up
    /// when the client takes no byte for `tls.1` (the write timeout); `sock` is its socket
    /// (shut down when the client is gone).
    pub fn over_tls(
        sock: Sock,
        tls: (TlsConn, Option<std::time::Duration>),
        framing: Framing,
        budget: Arc<Budget>,
        stats: Arc<ExportStats>,
        shard: usize,
        handle: Arc<ClientHandle>,
    ) -> Arc<Outbox> {
        Self::build(sock, Some(tls), framing, budget, stats, shard, handle)
    }

    fn build(
        sock: Sock,
        tls: Option<(TlsConn, Option<std::time::Duration>)>,
        framing: Framing,
        budget: Arc<Budget>,
        stats: Arc<ExportStats>,
        shard: usize,
        handle: Arc<ClientHandle>,
    ) -> Arc<Outbox> {
        Arc::new(Outbox {
            sock,
            tls,
            framing,
            budget,
            stats,
            shard,
            handle,
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
        })
    }

    /// Tickets handed out and not yet sent or dropped (requests in flight).
    pub fn outstanding(&self) -> usize {
        self.lock().outstanding
    }

    /// When replies were last handed to the kernel (`None` before the first).
    pub fn last_sent(&self) -> Option<Instant> {
        self.lock().last_sent
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Takes `cost` of the budget (blocking while it is spent: backpressure on the reader) and
    /// returns the ticket for the reply to the request `stamp` describes.
    pub fn ticket(self: &Arc<Self>, cost: u64, stamp: Stamp) -> Ticket {
        self.budget.acquire(cost);
        self.stats.started(self.shard, stamp.op);
        self.lock().outstanding += 1;
        Ticket {
            outbox: Arc::clone(self),
            cost,
            stamp,
            used: false,
        }
    }

    /// No more tickets will be handed out; the writer ends once every outstanding one is done.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        if std::mem::take(&mut st.writer_waiting) {
            // One wake-up per wait, however many replies arrive before the writer runs.
            self.ready.notify_one();
        }
    }

    fn abandon(&self, cost: u64, stamp: &Stamp) {
        self.stats.finished(self.shard, stamp, None, false);
        let mut st = self.lock();
        st.outstanding = st.outstanding.saturating_sub(1);
        if std::mem::take(&mut st.writer_waiting) {
            // One wake-up per wait, however many replies arrive before the writer runs.
            self.ready.notify_one();
        }
        drop(st);
        self.budget.release(cost);
    }

    fn break_socket(&self, st: &mut State, e: &std::io::Error) {
        tracing::debug!(error = %e, "reply not sent; client gone");
        st.broken = true;
        // Wake the reader if it is blocked reading from a dead peer.
        let _ = self.sock.shutdown(Shutdown::Both);
    }

    fn post(&self, reply: Reply, cost: u64, stamp: Stamp) {
        let mut st = self.lock();
        st.outstanding = st.outstanding.saturating_sub(1);
        let error = is_error(&reply);
        if error {
            st.errors += 1;
        }
        if st.broken {
            if std::mem::take(&mut st.writer_waiting) {
                self.ready.notify_one();
            }
            drop(st);
            self.stats.finished(self.shard, &stamp, None, error);
            self.budget.release(cost);
            return;
        }
        st.bytes += payload_bytes(&reply);
        st.queue.push_back((reply, cost, stamp));
        if std::mem::take(&mut st.writer_waiting) {
            // One wake-up per wait, however many replies arrive before the writer runs.
            self.ready.notify_one();
        }
    }

    /// After the writer thread panicked: the client is treated as gone (socket shut down, so
    /// the reader ends too), and every reply queued or posted from now on is dropped with its
    /// budget share given back, so nothing waits for a writer that is no more.
    pub fn writer_failed(&self) {
        let mut st = self.lock();
        st.broken = true;
        let _ = self.sock.shutdown(Shutdown::Both);
        let dropped: Vec<Pending> = st.queue.drain(..).collect();
        drop(st);
        for (reply, cost, stamp) in dropped {
            self.stats
                .finished(self.shard, &stamp, None, is_error(&reply));
            self.budget.release(cost);
        }
    }

    /// The writer thread: sends queued replies until the outbox is closed and every ticket is
    /// done. Returns (READ bytes sent, error replies sent).
    pub fn run_writer(&self) -> (u64, u64) {
        let mut batch: Vec<Reply> = Vec::with_capacity(WRITER_BATCH);
        let mut metas: Vec<(u64, Stamp, bool)> = Vec::with_capacity(WRITER_BATCH);
        let mut st = self.lock();
        loop {
            while st.queue.is_empty() {
                if st.closed && st.outstanding == 0 {
                    return (st.bytes, st.errors);
                }
                st.writer_waiting = true;
                st = wait(&self.ready, st);
                st.writer_waiting = false;
            }
            let mut batch_bytes = 0u64;
            while batch.len() < WRITER_BATCH && batch_bytes < WRITER_BATCH_BYTES {
                let Some((reply, cost, stamp)) = st.queue.pop_front() else {
                    break;
                };
                batch_bytes += payload_bytes(&reply);
                metas.push((cost, stamp, is_error(&reply)));
                batch.push(reply);
            }
            let broken = st.broken;
            drop(st);
            let result = if broken {
                Ok(())
            } else {
                match &self.tls {
                    Some((t, timeout)) => {
                        reply::write_many(&mut |b| t.write_all(b, *timeout), self.framing, &batch)
                    }
                    None => reply::send_many(&self.sock, self.framing, &batch),
                }
            };
            batch.clear();
            let sent_at = std::time::Instant::now();
            let progressed = result.is_ok() && !broken;
            for (cost, stamp, error) in metas.drain(..) {
                let latency = match (&result, broken) {
                    (Ok(()), false) => {
                        Some(sent_at.saturating_duration_since(stamp.start).as_nanos() as u64)
                    }
                    _ => None,
                };
                self.stats.finished(self.shard, &stamp, latency, error);
                self.budget.release(cost);
            }
            st = self.lock();
            if progressed {
                st.last_sent = Some(sent_at);
            }
            if let Err(e) = result {
                self.break_socket(&mut st, &e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use addcow_engine::IoBuf;

    use super::*;
    use crate::nbd::reply::encode;
    use crate::nbd::stats::Op;

    fn stamp() -> Stamp {
        Stamp::now(Op::Read, 0)
    }

    fn read_reply(cookie: u64, len: usize) -> Reply {
        let mut data = IoBuf::new_zeroed(len);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8 ^ cookie as u8;
        }
        Reply {
            cookie,
            offset: 0,
            body: Body::Read {
                offset: 0,
                data,
                holes: vec![],
                df: false,
            },
        }
    }

    fn ok_reply(cookie: u64) -> Reply {
        Reply {
            cookie,
            offset: 0,
            body: Body::Ok,
        }
    }

    type Setup = (
        Arc<Outbox>,
        Arc<Budget>,
        UnixStream,
        std::thread::JoinHandle<(u64, u64)>,
    );

    fn setup() -> Setup {
        let (a, b) = UnixStream::pair().unwrap();
        let budget = Arc::new(Budget::new(16, super::super::budget::Pool::new(64 << 20)));
        let stats = Arc::new(ExportStats::new(1));
        let handle = Arc::new(ClientHandle::new(Sock::Unix(a.try_clone().unwrap())));
        let outbox = Outbox::new(
            Sock::Unix(a),
            Framing::Structured,
            budget.clone(),
            stats,
            0,
            handle,
        );
        let w = outbox.clone();
        let writer = std::thread::spawn(move || w.run_writer());
        (outbox, budget, b, writer)
    }

    #[test]
    fn replies_larger_than_the_socket_buffer_go_out_whole_and_in_order() {
        let (outbox, budget, mut client, writer) = setup();
        // A reply far larger than the socket buffer (this thread never waits for the client,
        // which is not reading yet): the writer sends it whole, the replies after it behind it.
        let replies = vec![
            read_reply(1, 3 << 20),
            ok_reply(2),
            read_reply(3, 100_000),
            ok_reply(4),
        ];
        let want: Vec<u8> = replies
            .iter()
            .flat_map(|r| encode(Framing::Structured, r))
            .collect();
        for r in replies {
            let cost = payload_bytes(&r);
            outbox.ticket(cost, stamp()).send(r);
        }
        outbox.close();
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).unwrap();
        assert!(
            got == want,
            "bytes differ from the replies' encodings in order"
        );
        assert_eq!(writer.join().unwrap(), ((3 << 20) + 100_000, 0));
        assert_eq!(budget.in_flight(), 0);
        // Nothing more was written.
        drop(outbox);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn dropped_tickets_give_budget_back_and_the_writer_ends() {
        let (outbox, budget, mut client, writer) = setup();
        let t = outbox.ticket(4096, stamp());
        outbox.ticket(0, stamp()).send(ok_reply(9));
        assert!(budget.in_flight() >= 1, "the held ticket keeps its share");
        outbox.close();
        drop(t);
        assert_eq!(writer.join().unwrap(), (0, 0));
        assert_eq!(budget.in_flight(), 0);
        let want = encode(Framing::Structured, &ok_reply(9));
        let mut got = vec![0u8; want.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn a_vanished_client_frees_every_reply() {
        let (outbox, budget, client, writer) = setup();
        drop(client);
        for cookie in 0..8 {
            outbox
                .ticket(1 << 20, stamp())
                .send(read_reply(cookie, 1 << 20));
        }
        outbox.ticket(0, stamp()).send(Reply {
            cookie: 99,
            offset: 0,
            body: Body::Error {
                error: 5,
                message: "x".into(),
            },
        });
        outbox.close();
        let (_, errors) = writer.join().unwrap();
        assert_eq!(errors, 1);
        assert_eq!(budget.in_flight(), 0);
    }
}
