//! The connection tests both transports run: each test body serves its connections on reader
//! and writer threads ([`super::connection`], `--conn-mode threads`) as a `#[test]` of its own,
//! and again on an engine core's ring ([`super::ring_conn`], the default) through its `ring_`
//! wrapper ([`on_the_ring`]). Tests that only make sense on the ring (a panic in the source,
//! a stop while waiting for the pool) run only there. Clients are raw sockets speaking the
//! protocol byte by byte; the exports are in-memory disks, some of them with injected holds
//! and failures.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use addcow_engine::{Completion, Done, Extent, Request};

use super::budget::Pool;
use super::connection::{serve, ConnConfig, Ended, Totals, MAX_IN_FLIGHT};
use super::conns::ClientHandle;
use super::sock::Sock;
use crate::backend::disk::Backend;
use crate::backend::memory::MemDisk;
use crate::nbd::export::{Export, Exports};
use crate::nbd::wire::{self, RequestHeader};

type Conn = std::thread::JoinHandle<Ended>;

fn start(size: usize) -> (UnixStream, Conn, Arc<MemDisk>) {
    let disk = MemDisk::new(size, false);
    let (c, t) = start_on(disk.clone());
    (c, t, disk)
}

/// Asserts the connection thread ended normally, in transmission, with no writer panic.
fn ended_cleanly(t: Conn) -> Totals {
    match t.join().expect("connection thread panicked") {
        Ended::Transmission { totals, .. } => {
            assert!(!totals.writer_panicked, "the writer thread panicked");
            totals
        }
        other => panic!("connection ended before transmission: {other:?}"),
    }
}

/// A test backend: a memory disk with one behaviour injected by `I` (holds, failures, a
/// panic); what `I` leaves alone is the memory disk's, and the rest keeps the trait's defaults.
/// Derefs to `I`, for the test to reach the state it keeps.
struct Injected<I> {
    inner: Arc<MemDisk>,
    inject: I,
}

/// What an [`Injected`] backend changes of its memory disk; by default nothing.
trait Inject: Send + Sync + 'static {
    fn submit(&self, inner: &MemDisk, core: usize, req: Request, done: Completion) {
        inner.submit(core, req, done)
    }
    fn allocation(&self, inner: &MemDisk, offset: u64, len: u64) -> Vec<Extent> {
        inner.allocation(offset, len)
    }
    /// Whether every local submit is handed back, as while a disk switch holds them.
    fn refuses_local(&self) -> bool {
        false
    }
}

impl<I: Inject> Injected<I> {
    /// A `size`-byte memory disk (writable) with `inject`.
    fn new(size: usize, inject: I) -> Arc<Injected<I>> {
        Arc::new(Injected {
            inner: MemDisk::new(size, false),
            inject,
        })
    }
}

impl<I> std::ops::Deref for Injected<I> {
    type Target = I;
    fn deref(&self) -> &I {
        &self.inject
    }
}

impl<I: Inject> Backend for Injected<I> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn submit(&self, core: usize, req: Request, done: Completion) {
        self.inject.submit(&self.inner, core, req, done)
    }
    fn try_submit_local(
        &self,
        ctx: &mut addcow_engine::SourceCtx<'_>,
        req: Request,
        done: Completion,
    ) -> Option<(Request, Completion)> {
        if self.inject.refuses_local() {
            return Some((req, done));
        }
        self.submit(ctx.core(), req, done);
        None
    }
    fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        self.inject.allocation(&self.inner, offset, len)
    }
    fn alloc_buf(&self, len: usize) -> addcow_engine::IoBuf {
        self.inner.alloc_buf(len)
    }
}

/// WRITE completions wait until the test opens the gate (takes them from `held`).
#[derive(Default)]
struct GatedWrites {
    held: std::sync::Mutex<Vec<Completion>>,
}

impl Inject for GatedWrites {
    fn submit(&self, inner: &MemDisk, core: usize, req: Request, done: Completion) {
        if matches!(req, Request::Write { .. }) {
            let (tx, rx) = std::sync::mpsc::channel();
            inner.submit(core, req, Box::new(move |r| tx.send(r).unwrap()));
            let r = rx.recv().unwrap();
            self.held.lock().unwrap().push(Box::new(move |_| done(r)));
        } else {
            inner.submit(core, req, done)
        }
    }
}

fn start_on(backend: Arc<dyn Backend>) -> (UnixStream, Conn) {
    let exports = Exports::new(vec![Export::new("", backend, 1)]);
    start_in(&exports)
}

thread_local! {
    /// Set: connections started by this test thread are served on this engine's core 0
    /// ([`super::ring_conn`]) instead of on reader and writer threads.
    static RING: std::cell::RefCell<Option<addcow_engine::Engine>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `body` with its connections served on a one-core engine's ring.
fn on_the_ring(body: fn()) {
    let engine = addcow_engine::Engine::start(addcow_engine::EngineConfig {
        cores: 1,
        arena_bytes: 4 << 20,
        ..Default::default()
    })
    .expect("engine starts");
    RING.with(|r| *r.borrow_mut() = Some(engine.clone()));
    body();
    RING.with(|r| r.borrow_mut().take());
    engine.shutdown().expect("engine stops");
}

// The tests above and below, with the connection served on an engine core's ring.
#[test]
fn ring_replies_go_out_in_completion_order() {
    on_the_ring(replies_go_out_in_completion_order);
}
#[test]
fn ring_write_read_status_and_errors_over_a_socket() {
    on_the_ring(write_read_status_and_errors_over_a_socket);
}
#[test]
fn ring_garbage_and_truncation_close_only_this_connection() {
    on_the_ring(garbage_and_truncation_close_only_this_connection);
}
#[test]
fn ring_a_request_waiting_for_budget_is_not_timed_as_a_stalled_frame() {
    on_the_ring(a_request_waiting_for_budget_is_not_timed_as_a_stalled_frame);
}
#[test]
fn ring_stops_receiving_when_the_budget_is_spent() {
    on_the_ring(reader_stops_reading_when_the_budget_is_spent);
}
#[test]
fn ring_stopping_answers_in_flight_requests_then_closes() {
    on_the_ring(stopping_the_reader_answers_in_flight_requests_then_closes);
}
#[test]
fn ring_a_stopping_engine_leaves_the_request_unanswered_and_closes() {
    on_the_ring(a_stopping_engine_leaves_the_request_unanswered_and_closes);
}
#[test]
fn ring_random_request_streams_never_panic() {
    on_the_ring(random_request_streams_never_panic);
}
#[test]
fn ring_many_pipelined_requests_all_answered() {
    on_the_ring(many_pipelined_requests_all_answered);
}
#[test]
fn ring_a_write_payload_split_over_several_recvs() {
    on_the_ring(a_write_payload_split_over_several_recvs);
}
#[test]
fn ring_a_switch_submits_from_the_waiter_thread_not_the_core() {
    on_the_ring(a_switch_submits_from_the_waiter_thread_not_the_core);
}

#[test]
fn ring_a_panic_in_the_source_ends_only_its_connection() {
    on_the_ring(a_panic_in_the_source_ends_only_its_connection);
}

/// The allocation map panics for reads at 512 KiB.
struct PanicsAt;

impl Inject for PanicsAt {
    fn allocation(&self, inner: &MemDisk, offset: u64, len: u64) -> Vec<Extent> {
        assert_ne!(offset, 512 << 10, "injected panic");
        inner.allocation(offset, len)
    }
}

/// On the ring only (a reader thread's panic is not caught): a panic while serving one
/// connection closes it and is reported in its totals; the core and the other connection
/// on it go on.
fn a_panic_in_the_source_ends_only_its_connection() {
    let exports = Exports::new(vec![Export::new("", Injected::new(1 << 20, PanicsAt), 1)]);
    let (mut b, tb) = start_in(&exports);
    handshake(&mut b);
    roundtrip(&mut b, 10, 0x21);
    let (mut a, ta) = start_in(&exports);
    handshake(&mut a);
    req(&mut a, wire::CMD_READ, 0, 1, 512 << 10, 512);
    assert!(read_until_closed(&mut a).is_empty(), "no reply expected");
    match ta.join().expect("connection thread") {
        Ended::Transmission { totals, .. } => assert!(totals.writer_panicked),
        other => panic!("{other:?}"),
    }
    roundtrip(&mut b, 20, 0x22);
    req(&mut b, wire::CMD_DISC, 0, 99, 0, 0);
    ended_cleanly(tb);
}

#[test]
fn ring_a_stop_reaches_a_connection_waiting_for_the_pool() {
    on_the_ring(a_stop_reaches_a_connection_waiting_for_the_pool);
}

/// A connection that waits for room in the pool (nothing in flight, no recv posted) still
/// sees a stop: it closes without answering the request it could not take in.
fn a_stop_reaches_a_connection_waiting_for_the_pool() {
    let exports = Exports::new(vec![Export::new("", MemDisk::new(8 << 20, false), 1)]);
    let (a, mut c) = UnixStream::pair().unwrap();
    let mut cfg = ConnConfig::for_tests(exports);
    cfg.pool = Pool::new(super::budget::MIN_POOL);
    cfg.ring = RING.with(|r| r.borrow().clone());
    // Another member holds the whole pool.
    let mut hog =
        super::budget::Share::new(cfg.pool.clone(), super::budget::Waker(Arc::new(|| {})));
    assert!(hog.try_take(super::budget::MIN_POOL));
    let handle = Arc::new(ClientHandle::new(Sock::Unix(a.try_clone().unwrap())));
    let h2 = handle.clone();
    let t = std::thread::spawn(move || serve(Sock::Unix(a), 0, 0, &cfg, h2));
    handshake(&mut c);
    // The header only: the connection cannot take its bytes, so it never reads the payload.
    req(&mut c, wire::CMD_WRITE, 0, 1, 0, 1 << 20);
    std::thread::sleep(Duration::from_millis(200));
    handle.stop_reading();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let end = c.read_to_end(&mut rest);
    assert!(
        end.is_ok(),
        "the connection did not close after the stop: {end:?}"
    );
    assert!(rest.is_empty(), "the request not taken in was answered");
    let totals = ended_cleanly(t);
    assert_eq!(totals.requests, 0);
    drop(hog);
}

/// A WRITE whose header and payload arrive in pieces, with pauses, then a pipelined READ
/// in the same segment as the payload's tail: the data is whole and both are answered.
#[test]
fn a_write_payload_split_over_several_recvs() {
    let (mut c, t, disk) = start(1 << 20);
    handshake(&mut c);
    let h = RequestHeader {
        flags: 0,
        kind: wire::CMD_WRITE,
        cookie: 1,
        offset: 4096,
        len: 100_000,
    }
    .encode();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    c.write_all(&h[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    // The rest of the header with the payload's first bytes: one segment, received into the
    // header buffer together, so those bytes are copied into the payload buffer.
    let mut first = h[10..].to_vec();
    first.extend_from_slice(&payload[..1000]);
    c.write_all(&first).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    c.write_all(&payload[1000..70_000]).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let mut tail = payload[70_000..].to_vec();
    let r = RequestHeader {
        flags: 0,
        kind: wire::CMD_READ,
        cookie: 2,
        offset: 4096 + 99_000,
        len: 1000,
    };
    tail.extend_from_slice(&r.encode());
    c.write_all(&tail).unwrap();
    let mut ok = [0u8; 16];
    c.read_exact(&mut ok).unwrap();
    assert_eq!(ok, wire::simple_reply(0, 1));
    // The read's structured chunk: 20-byte header, 8-byte offset, data.
    let mut rd = vec![0u8; 20 + 8 + 1000];
    c.read_exact(&mut rd).unwrap();
    assert_eq!(&rd[8..16], &2u64.to_be_bytes());
    assert_eq!(&rd[28..], &payload[99_000..]);
    assert_eq!(
        &disk.data.lock().unwrap()[4096..4096 + 100_000],
        &payload[..]
    );
    req(&mut c, wire::CMD_DISC, 0, 3, 0, 0);
    assert_eq!(ended_cleanly(t).bytes_written, 100_000);
}

/// Every local submit is refused (as a disk switch does); counts submits, and those that ran
/// on an engine core thread.
#[derive(Default)]
struct Switching {
    on_core: AtomicU64,
    submits: AtomicU64,
}

impl Inject for Switching {
    fn submit(&self, inner: &MemDisk, core: usize, req: Request, done: Completion) {
        self.submits.fetch_add(1, Ordering::SeqCst);
        if addcow_engine::on_core_thread() {
            self.on_core.fetch_add(1, Ordering::SeqCst);
        }
        inner.submit(core, req, done)
    }
    fn refuses_local(&self) -> bool {
        true
    }
}

/// While a switch holds local submits back, requests still complete, submitted from a
/// thread that is not the core (which must never wait on the switch).
#[test]
fn a_switch_submits_from_the_waiter_thread_not_the_core() {
    let backend = Injected::new(1 << 20, Switching::default());
    let (mut c, t) = start_on(backend.clone());
    handshake(&mut c);
    for i in 0..20 {
        roundtrip(&mut c, i, i as u8);
    }
    req(&mut c, wire::CMD_DISC, 0, 99, 0, 0);
    ended_cleanly(t);
    assert_eq!(backend.submits.load(Ordering::SeqCst), 40);
    assert_eq!(
        backend.on_core.load(Ordering::SeqCst),
        0,
        "a submit ran on an engine core thread"
    );
}

/// A connection to the exports `exports`, served on its own thread.
fn start_in(exports: &Arc<Exports>) -> (UnixStream, Conn) {
    start_with(exports, |_| {})
}

/// [`start_in`] with the settings changed by `tune`.
fn start_with(exports: &Arc<Exports>, tune: impl FnOnce(&mut ConnConfig)) -> (UnixStream, Conn) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let (a, b) = UnixStream::pair().unwrap();
    let mut cfg = ConnConfig::for_tests(exports.clone());
    cfg.ring = RING.with(|r| r.borrow().clone());
    tune(&mut cfg);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let handle = Arc::new(ClientHandle::new(Sock::Unix(a.try_clone().unwrap())));
    let t = std::thread::spawn(move || serve(Sock::Unix(a), id, 0, &cfg, handle));
    (b, t)
}

#[test]
fn replies_go_out_in_completion_order() {
    let gated = Injected::new(1 << 20, GatedWrites::default());
    let (mut c, t) = start_on(gated.clone());
    handshake(&mut c);
    // A write whose completion is held, then a read: the read is answered first.
    req(&mut c, wire::CMD_WRITE, 0, 1, 0, 512);
    c.write_all(&[9u8; 512]).unwrap();
    req(&mut c, wire::CMD_READ, 0, 2, 4096, 512);
    let mut r = [0u8; 20];
    c.read_exact(&mut r).unwrap();
    assert_eq!(
        &r[8..16],
        &2u64.to_be_bytes(),
        "read answered while the write is held"
    );
    let mut p = vec![0u8; 8 + 512];
    c.read_exact(&mut p).unwrap();
    // Release the write: its reply follows.
    let held: Vec<_> = gated.held.lock().unwrap().drain(..).collect();
    assert_eq!(held.len(), 1);
    for done in held {
        done(Ok(Done::Ok));
    }
    let mut r = [0u8; 16];
    c.read_exact(&mut r).unwrap();
    assert_eq!(r, wire::simple_reply(0, 1));
    req(&mut c, wire::CMD_DISC, 0, 3, 0, 0);
    ended_cleanly(t);
}

/// Client side of a handshake with structured replies and base:allocation.
fn handshake(c: &mut UnixStream) {
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&[0, 0, 0, 3]).unwrap();
    let opt = |o: u32, d: &[u8]| {
        let mut b = wire::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(d.len() as u32).to_be_bytes());
        b.extend_from_slice(d);
        b
    };
    c.write_all(&opt(wire::OPT_STRUCTURED_REPLY, &[])).unwrap();
    let mut meta = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
    meta.extend_from_slice(b"base:allocation");
    c.write_all(&opt(wire::OPT_SET_META_CONTEXT, &meta))
        .unwrap();
    c.write_all(&opt(wire::OPT_GO, &[0, 0, 0, 0, 0, 0]))
        .unwrap();
    // Replies: ACK(20), META(20+4+15), ACK(20), INFO_EXPORT(32), BLOCK_SIZE(34), ACK(20).
    let mut r = vec![0u8; 20 + 39 + 20 + 32 + 34 + 20];
    c.read_exact(&mut r).unwrap();
    assert_eq!(&r[r.len() - 8..r.len() - 4], &wire::REP_ACK.to_be_bytes());
}

/// Sends one compact request header.
fn req(c: &mut UnixStream, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    addcow_engine::nbd::client::send_request_flagged(c, flags, kind, cookie, offset, len).unwrap();
}

#[test]
fn write_read_status_and_errors_over_a_socket() {
    let (mut c, t, disk) = start(1 << 20);
    handshake(&mut c);
    // WRITE 100 bytes at 7, FUA.
    req(&mut c, wire::CMD_WRITE, wire::CMD_FLAG_FUA, 1, 7, 100);
    c.write_all(&[0x5a; 100]).unwrap();
    let mut r = [0u8; 16];
    c.read_exact(&mut r).unwrap();
    assert_eq!(r, wire::simple_reply(0, 1));
    assert_eq!(disk.data.lock().unwrap()[7..107], [0x5a; 100]);

    // Bad request with payload: drained, EINVAL error chunk, connection goes on.
    req(&mut c, wire::CMD_WRITE, 0x100, 2, 0, 10);
    c.write_all(&[1; 10]).unwrap();
    let mut r = [0u8; 20];
    c.read_exact(&mut r).unwrap();
    assert_eq!(&r[6..8], &wire::REPLY_TYPE_ERROR.to_be_bytes());
    let l = u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize;
    let mut p = vec![0u8; l];
    c.read_exact(&mut p).unwrap();
    assert_eq!(&p[..4], &wire::NBD_EINVAL.to_be_bytes());

    // Read in the zero half: one hole chunk.
    req(&mut c, wire::CMD_READ, 0, 3, 1 << 19, 4096);
    let mut r = [0u8; 32];
    c.read_exact(&mut r).unwrap();
    assert_eq!(&r[4..8], &[0, 1, 0, 2]);
    assert_eq!(&r[28..32], &4096u32.to_be_bytes());

    // Block status over the boundary: data, then hole|zero.
    req(&mut c, wire::CMD_BLOCK_STATUS, 0, 4, (1 << 19) - 512, 1024);
    let mut r = vec![0u8; 20 + 4 + 16];
    c.read_exact(&mut r).unwrap();
    assert_eq!(&r[24..], &[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3]);

    // Read past the end: EINVAL; then DISC closes.
    req(&mut c, wire::CMD_READ, 0, 5, 1 << 20, 1);
    let mut r = [0u8; 20];
    c.read_exact(&mut r).unwrap();
    assert_eq!(&r[6..8], &wire::REPLY_TYPE_ERROR.to_be_bytes());
    let mut p = vec![0u8; u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize];
    c.read_exact(&mut p).unwrap();
    req(&mut c, wire::CMD_DISC, 0, 6, 0, 0);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    ended_cleanly(t);
}

/// Reads until the server closes; fails (instead of hanging) if it does not within 10 s.
fn read_until_closed(c: &mut UnixStream) -> Vec<u8> {
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)
        .expect("the server did not close the connection within 10 s");
    rest
}

/// On connection `b`: FUA-writes `fill` over 0..512, reads it back, checks both replies.
fn roundtrip(b: &mut UnixStream, cookie: u64, fill: u8) {
    req(b, wire::CMD_WRITE, wire::CMD_FLAG_FUA, cookie, 0, 512);
    b.write_all(&[fill; 512]).unwrap();
    let mut r = [0u8; 16];
    b.read_exact(&mut r).unwrap();
    assert_eq!(
        r,
        wire::simple_reply(0, cookie),
        "write on the good connection"
    );
    req(b, wire::CMD_READ, 0, cookie + 1, 0, 512);
    let mut r = vec![0u8; 20 + 8 + 512];
    b.read_exact(&mut r).unwrap();
    assert_eq!(&r[8..16], &(cookie + 1).to_be_bytes());
    assert!(
        r[28..].iter().all(|&x| x == fill),
        "read back on the good connection"
    );
}

#[test]
fn garbage_and_truncation_close_only_this_connection() {
    // One export, a good connection `b` that stays open throughout, and three bad ones.
    let disk = MemDisk::new(1 << 16, false);
    let exports = Exports::new(vec![Export::new("", disk.clone(), 1)]);
    let (mut b, tb) = start_in(&exports);
    handshake(&mut b);
    roundtrip(&mut b, 10, 0x77);

    // Bad magic: closed at once, without a reply.
    let (mut a, ta) = start_in(&exports);
    handshake(&mut a);
    a.write_all(&[0xff; 28]).unwrap();
    assert!(read_until_closed(&mut a).is_empty());
    ended_cleanly(ta);
    roundtrip(&mut b, 20, 0x66);

    // A WRITE cut short inside its payload: closed, and nothing of it reaches the disk.
    let (mut a, ta) = start_in(&exports);
    handshake(&mut a);
    req(&mut a, wire::CMD_WRITE, 0, 1, 0, 4096);
    a.write_all(&[1; 100]).unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&mut a).is_empty());
    let totals = ended_cleanly(ta);
    assert_eq!(totals.bytes_written, 0);
    assert!(disk.data.lock().unwrap()[..512].iter().all(|&x| x == 0x66));
    roundtrip(&mut b, 30, 0x55);

    // A WRITE announcing 4 GiB (over the 32 MiB limit): closed without reading the payload
    // or answering, while the client still holds its socket open.
    let (mut a, ta) = start_in(&exports);
    handshake(&mut a);
    req(&mut a, wire::CMD_WRITE, 0, 1, 0, u32::MAX);
    assert!(read_until_closed(&mut a).is_empty(), "no reply expected");
    ended_cleanly(ta);
    roundtrip(&mut b, 40, 0x44);

    req(&mut b, wire::CMD_DISC, 0, 99, 0, 0);
    assert!(read_until_closed(&mut b).is_empty());
    let totals = ended_cleanly(tb);
    assert_eq!(
        totals.requests, 9,
        "4 write/read pairs and DISC on the good connection"
    );
}

/// READ completions are all held until the test releases them; counts submissions.
#[derive(Default)]
struct HeldReads {
    submitted: AtomicU64,
    held: std::sync::Mutex<Vec<(Request, Completion)>>,
}

impl HeldReads {
    /// Waits (up to 10 s) until `k` requests reached the backend.
    fn wait_submitted(&self, k: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.submitted.load(Ordering::SeqCst) < k {
            assert!(
                Instant::now() < deadline,
                "the reads never reached the backend"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Injected<HeldReads> {
    /// Submits the held reads to the memory disk.
    fn release_all(&self) {
        let held: Vec<_> = self.held.lock().unwrap().drain(..).collect();
        for (req, done) in held {
            self.inner.submit(0, req, done);
        }
    }
}

impl Inject for HeldReads {
    fn submit(&self, inner: &MemDisk, core: usize, req: Request, done: Completion) {
        self.submitted.fetch_add(1, Ordering::SeqCst);
        if matches!(req, Request::Read { .. }) {
            self.held.lock().unwrap().push((req, done));
        } else {
            inner.submit(core, req, done)
        }
    }
}

/// Counts complete replies (simple replies, and structured chunks flagged DONE) until EOF.
fn count_replies(mut c: UnixStream) -> u64 {
    let mut n = 0;
    let mut magic = [0u8; 4];
    while c.read_exact(&mut magic).is_ok() {
        match u32::from_be_bytes(magic) {
            wire::SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                c.read_exact(&mut rest).unwrap();
                n += 1;
            }
            wire::STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                c.read_exact(&mut h).unwrap();
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                std::io::copy(&mut (&mut c).take(u64::from(len)), &mut std::io::sink()).unwrap();
                if flags & wire::REPLY_FLAG_DONE != 0 {
                    n += 1;
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }
    n
}

/// Backpressure: once MAX_IN_FLIGHT requests are in flight the reader takes no more, so it
/// stops reading the socket and the client's writes block; releasing the requests resumes it.
#[test]
fn reader_stops_reading_when_the_budget_is_spent() {
    let backend = Injected::new(8 << 20, HeldReads::default());
    let (mut c, t) = start_on(backend.clone());
    handshake(&mut c);
    let replies = {
        let r = c.try_clone().unwrap();
        std::thread::spawn(move || count_replies(r))
    };
    // MAX_IN_FLIGHT reads of the base half (they reach the backend and are held), then
    // 256 writes of 64 KiB (16 MiB) from another thread, counting what the socket took.
    let mut w = c.try_clone().unwrap();
    for i in 0..MAX_IN_FLIGHT as u64 {
        req(&mut w, wire::CMD_READ, 0, i, (i % 64) * 4096, 4096);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let writer = std::thread::spawn(move || {
        let payload = vec![0x3c; 64 << 10];
        for i in 0..256u64 {
            req(
                &mut w,
                wire::CMD_WRITE,
                0,
                1000 + i,
                (4 << 20) + i * 4096,
                64 << 10,
            );
            w.write_all(&payload).unwrap();
            sent2.fetch_add(28 + (64 << 10), Ordering::SeqCst);
        }
        req(&mut w, wire::CMD_DISC, 0, 0, 0, 0);
    });
    backend.wait_submitted(MAX_IN_FLIGHT as u64);
    // Give a reader that does not stop every chance to run ahead.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        backend.submitted.load(Ordering::SeqCst),
        MAX_IN_FLIGHT as u64,
        "the reader took in requests past its budget"
    );
    let taken = sent.load(Ordering::SeqCst);
    assert!(
        taken < 4 << 20,
        "the client wrote {taken} bytes while the budget was spent: the reader kept reading"
    );
    backend.release_all();
    writer.join().unwrap();
    ended_cleanly(t);
    assert_eq!(replies.join().unwrap(), MAX_IN_FLIGHT as u64 + 256);
    assert_eq!(
        backend.submitted.load(Ordering::SeqCst),
        MAX_IN_FLIGHT as u64 + 256
    );
}

/// A whole request waiting for its budget (every slot taken by requests the backend
/// holds) is backpressure, not a client stalling inside a frame: however long the wait, past
/// the payload timeout, it is taken in and answered once budget comes back.
#[test]
fn a_request_waiting_for_budget_is_not_timed_as_a_stalled_frame() {
    let backend = Injected::new(8 << 20, HeldReads::default());
    let exports = Exports::new(vec![Export::new("", backend.clone(), 1)]);
    let (mut c, t) = start_with(&exports, |cfg| {
        cfg.payload_timeout = Duration::from_millis(500)
    });
    handshake(&mut c);
    let replies = {
        let r = c.try_clone().unwrap();
        std::thread::spawn(move || count_replies(r))
    };
    let n = MAX_IN_FLIGHT as u64 + 1;
    for i in 0..n - 1 {
        req(&mut c, wire::CMD_READ, 0, i, (i % 64) * 4096, 4096);
    }
    backend.wait_submitted(MAX_IN_FLIGHT as u64);
    // Every slot is taken: the last request arrives on its own, whole, and waits for a slot
    // while four payload timeouts pass.
    req(&mut c, wire::CMD_READ, 0, n - 1, 0, 4096);
    std::thread::sleep(Duration::from_secs(2));
    backend.release_all();
    backend.wait_submitted(n);
    backend.release_all();
    req(&mut c, wire::CMD_DISC, 0, 0, 0, 0);
    ended_cleanly(t);
    assert_eq!(replies.join().unwrap(), n, "every request answered");
}

/// `export-del hard` on a connection: the reader takes in no new request, the request in
/// flight is answered, then the connection closes; no request is answered with an error.
#[test]
fn stopping_the_reader_answers_in_flight_requests_then_closes() {
    let gated = Injected::new(1 << 20, GatedWrites::default());
    let export = Export::new("", gated.clone(), 1);
    let exports = Exports::new(vec![export.clone()]);
    let (mut c, t) = start_in(&exports);
    handshake(&mut c);
    req(&mut c, wire::CMD_WRITE, 0, 1, 0, 512);
    c.write_all(&[9u8; 512]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gated.held.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the write never reached the backend"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(export.client_count(), 1);
    assert_eq!(export.begin_delete(false), Ok(1));
    // A new connection can no longer attach; LIST/GO no longer see the export.
    assert!(exports.find("").is_none());
    // A request sent now is never taken in (the socket's read side is shut: it may even
    // fail to send).
    let h = RequestHeader {
        flags: 0,
        kind: wire::CMD_READ,
        cookie: 2,
        offset: 0,
        len: 512,
    };
    let _ = c.write_all(&h.encode());
    // The held write is still answered, then the connection closes.
    assert!(!export.wait_clients_gone(Some(Instant::now() + Duration::from_millis(100))));
    for done in gated.held.lock().unwrap().drain(..) {
        done(Ok(Done::Ok));
    }
    let rest = read_until_closed(&mut c);
    assert_eq!(
        rest,
        wire::simple_reply(0, 1),
        "exactly the write's OK, nothing else"
    );
    assert!(export.wait_clients_gone(Some(Instant::now() + Duration::from_secs(10))));
    let totals = ended_cleanly(t);
    assert_eq!(totals.errors, 0);
    assert_eq!(
        export.begin_delete(false),
        Err(crate::nbd::export::DeleteRefused::AlreadyDeleting)
    );
}

/// Every WRITE is refused as a stopping engine does (ESHUTDOWN).
struct Stopping;

impl Inject for Stopping {
    fn submit(&self, inner: &MemDisk, core: usize, req: Request, done: Completion) {
        if matches!(req, Request::Write { .. }) {
            done(Err(addcow_engine::RequestError {
                errno: libc::ESHUTDOWN,
                op: "engine shut down",
                offset: 0,
            }))
        } else {
            inner.submit(core, req, done)
        }
    }
}

/// A request the engine refuses because it is stopping is never answered with an error:
/// the connection answers what else it has, stops and closes, so a reconnecting client
/// resends it.
#[test]
fn a_stopping_engine_leaves_the_request_unanswered_and_closes() {
    let (mut c, t) = start_on(Injected::new(1 << 20, Stopping));
    handshake(&mut c);
    req(&mut c, wire::CMD_READ, 0, 1, 0, 512);
    let mut r = vec![0u8; 20 + 8 + 512];
    c.read_exact(&mut r).unwrap();
    req(&mut c, wire::CMD_WRITE, 0, 2, 0, 512);
    c.write_all(&[1u8; 512]).unwrap();
    let rest = read_until_closed(&mut c);
    assert!(rest.is_empty(), "the refused write was answered: {rest:?}");
    let totals = ended_cleanly(t);
    assert_eq!(totals.errors, 0);
}

/// Invariant 6: no request stream makes the daemon panic. Random (mostly well-framed)
/// requests with random kinds, flags, offsets and lengths, then EOF: the connection must
/// answer or close and its thread must end normally.
#[test]
fn random_request_streams_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0xaddc0);
    for _ in 0..200 {
        let (mut c, t, _) = start(64 << 10);
        handshake(&mut c);
        let mut stream = Vec::new();
        for _ in 0..rng.gen_range(1..40) {
            let kind = rng.gen_range(0..10u16);
            let flags = if rng.gen_bool(0.7) { 0 } else { rng.gen() };
            let offset = match rng.gen_range(0..4) {
                0 => 0,
                1 => rng.gen_range(0..(64u64 << 10)),
                2 => rng.gen_range(0..(128u64 << 10)),
                _ => rng.gen(),
            };
            let len: u32 = match rng.gen_range(0..4) {
                0 => 0,
                1 => rng.gen_range(0..8192),
                2 => rng.gen_range(0..(128 << 10)),
                _ => rng.gen(),
            };
            let h = RequestHeader {
                flags,
                kind,
                cookie: rng.gen(),
                offset,
                len: u64::from(len),
            };
            let mut b = h.encode().to_vec();
            if rng.gen_bool(0.05) {
                b[rng.gen_range(0..28)] ^= 0xff; // corrupt a byte, magic included
            }
            stream.extend_from_slice(&b);
            if kind == wire::CMD_WRITE {
                let n = (len as usize).min(rng.gen_range(0..20_000));
                stream.extend(std::iter::repeat_n(0x5a, n));
            }
        }
        if rng.gen_bool(0.3) {
            let cut = rng.gen_range(0..stream.len());
            stream.truncate(cut);
        }
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&stream);
            let _ = w.shutdown(Shutdown::Write);
        });
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
        writer.join().unwrap();
        ended_cleanly(t);
    }
}

#[test]
fn many_pipelined_requests_all_answered() {
    let (mut c, t, _) = start(1 << 20);
    handshake(&mut c);
    let mut c2 = c.try_clone().unwrap();
    let n = 1000u64;
    let w = std::thread::spawn(move || {
        for i in 0..n {
            req(&mut c2, wire::CMD_READ, 0, i, (i % 128) * 4096, 4096);
        }
        req(&mut c2, wire::CMD_DISC, 0, 0, 0, 0);
    });
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let mut r = [0u8; 20];
        c.read_exact(&mut r).unwrap();
        let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
        let l = u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize;
        let mut p = vec![0u8; l];
        c.read_exact(&mut p).unwrap();
        assert_eq!(&p[8..16], &[0xab; 8]);
        seen[cookie as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    w.join().unwrap();
    ended_cleanly(t);
}
