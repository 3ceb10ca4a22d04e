//! Throttle limits and fair share on a real engine, real files: requests wait on their core for
//! their group's budget (counted, in order), limit changes and closes let them go, members of a
//! group alternate, FLUSH never waits, and a flooded disk cannot hold another disk's requests
//! behind all of its own. Assertions are on order and counts; the only time bound is a lower
//! bound proving enforcement, or a generous upper bound proving a release (the throttled
//! alternative takes several times longer).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use addcow_engine::qos::{ThrottleGroup, ThrottleLimits};
use addcow_engine::{Disk, Done, Engine, EngineConfig, Request, RequestError};
use addcow_engine_testkit::harness::*;

type Log<T> = Arc<Mutex<Vec<(T, Result<(), i32>)>>>;

/// Submits `req` to `core`; its answer goes into `log` under `tag`.
fn submit<T: Send + 'static>(d: &Disk, core: usize, req: Request, tag: T, log: &Log<T>) {
    let log = Arc::clone(log);
    d.submit(
        core,
        req,
        Box::new(move |r: Result<Done, RequestError>| {
            log.lock()
                .unwrap()
                .push((tag, r.map(|_| ()).map_err(|e| e.errno)));
        }),
    );
}

fn read(offset: u64) -> Request {
    Request::Read { offset, len: 4096 }
}

fn write(e: &Engine, offset: u64, len: usize) -> Request {
    let mut data = e.alloc_buf(len);
    data.fill(0x77);
    Request::Write {
        offset,
        data: data.into(),
        fua: false,
    }
}

/// Polls `cond` until it holds; panics with `what` after `secs` seconds.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn len<T>(log: &Log<T>) -> usize {
    log.lock().unwrap().len()
}

fn iops(n: u64) -> ThrottleLimits {
    ThrottleLimits {
        iops_total: Some(n),
        ..Default::default()
    }
}

#[test]
fn a_limited_group_throttles_requests_in_order_and_counts_them() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    // 10 IOPS: a tenth of a second of slack (1 request) plus the first, then one per 100 ms.
    let g = ThrottleGroup::new("g", iops(10)).unwrap();
    d.set_throttle(Some(g.clone()));
    let log: Log<u64> = Arc::default();
    let start = Instant::now();
    for i in 0..14u64 {
        submit(&d, 0, read(i * 4096), i, &log);
    }
    wait_for(5, "some requests waiting", || d.throttle_stats().queued > 0);
    wait_for(30, "every answer", || len(&log) == 14);
    let took = start.elapsed();
    let log = log.lock().unwrap();
    assert!(log.iter().all(|(_, r)| r.is_ok()), "{log:?}");
    let mut order: Vec<u64> = log.iter().map(|(i, _)| *i).collect();
    // The first two go at once (in either order); the ones that waited go one by one, in the
    // order they arrived.
    order[..2].sort_unstable();
    assert_eq!(
        order,
        (0..14).collect::<Vec<_>>(),
        "answered in arrival order"
    );
    // 12 requests past the slack at 10 per second: at least 1.2 s (not a speed check: proof
    // that the limit held them back).
    assert!(took >= Duration::from_millis(1100), "{took:?}");
    let s = d.throttle_stats();
    assert!(s.throttled_requests >= 11, "{s:?}");
    assert!(s.throttled_ns >= 1_000_000_000, "{s:?}");
    assert_eq!(s.queued, 0);
    assert_eq!(g.stats(), s, "the group's counters sum its one member's");
    d.close().unwrap();
    e.shutdown().unwrap();
}

/// Queues `n` reads of `d` behind a 1-IOPS group (so they would take `n - 2` seconds) and waits
/// until they wait.
fn queue_behind_one_iops(d: &Disk, n: u64) -> (ThrottleGroup, Log<u64>) {
    let g = ThrottleGroup::new("slow", iops(1)).unwrap();
    d.set_throttle(Some(g.clone()));
    let log: Log<u64> = Arc::default();
    for i in 0..n {
        submit(d, 0, read(i * 4096), i, &log);
    }
    wait_for(10, "requests waiting", || {
        d.throttle_stats().queued >= n - 2
    });
    (g, log)
}

#[test]
fn removing_the_limits_releases_waiting_requests() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let (g, log) = queue_behind_one_iops(&d, 30);
    let t = Instant::now();
    g.set_limits(ThrottleLimits::default()).unwrap();
    // Throttled they would take 28 s more.
    wait_for(10, "the released answers", || len(&log) == 30);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(d.throttle_stats().queued, 0);
    assert_eq!(g.stats().queued, 0);
    d.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn raising_the_limits_re_times_waiting_requests() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let (g, log) = queue_behind_one_iops(&d, 30);
    g.set_limits(iops(100_000)).unwrap();
    wait_for(10, "the re-timed answers", || len(&log) == 30);
    d.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn leaving_the_group_releases_waiting_requests() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let (g, log) = queue_behind_one_iops(&d, 30);
    d.set_throttle(None);
    wait_for(10, "the released answers", || len(&log) == 30);
    assert!(log.lock().unwrap().iter().all(|(_, r)| r.is_ok()));
    assert_eq!(g.stats().queued, 0);
    assert!(d.throttle().is_none());
    d.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn close_and_quiesce_do_not_wait_for_budget() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let (_g, log) = queue_behind_one_iops(&d, 30);
    // A quiesce (a disk switch) waits for every accepted request: they are let go.
    let t = Instant::now();
    d.quiesce();
    assert_eq!(len(&log), 30);
    d.resume();
    // And a close with writes waiting.
    let log2: Log<u64> = Arc::default();
    for i in 0..20u64 {
        submit(&d, 0, write(&e, i * 4096, 4096), i, &log2);
    }
    wait_for(10, "writes waiting", || d.throttle_stats().queued >= 10);
    d.close().unwrap();
    assert!(t.elapsed() < Duration::from_secs(20), "throttled: 45 s");
    let log2 = log2.lock().unwrap();
    assert_eq!(log2.len(), 20, "each accepted write answered once");
    assert!(log2.iter().all(|(_, r)| r.is_ok()), "{log2:?}");
    e.shutdown().unwrap();
}

#[test]
fn shutdown_answers_waiting_requests_once() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let answers = Arc::new(AtomicUsize::new(0));
    let g = ThrottleGroup::new("slow", iops(1)).unwrap();
    d.set_throttle(Some(g));
    let log: Log<u64> = Arc::default();
    for i in 0..20u64 {
        let a = Arc::clone(&answers);
        let log = Arc::clone(&log);
        d.submit(
            0,
            read(i * 4096),
            Box::new(move |r| {
                a.fetch_add(1, Ordering::SeqCst);
                log.lock()
                    .unwrap()
                    .push((i, r.map(|_| ()).map_err(|e| e.errno)));
            }),
        );
    }
    wait_for(10, "requests waiting", || d.throttle_stats().queued >= 18);
    // Shutdown closes every open disk before it stops the cores, and a closing disk's queue
    // goes at once (without budget): the waiting reads are served, not failed. (The cores'
    // own `ESHUTDOWN` answer for what still waits when they stop is a fallback no public
    // path reaches: see `Core::qos_shutdown`.)
    e.shutdown().unwrap();
    assert_eq!(answers.load(Ordering::SeqCst), 20);
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 20);
    assert!(log.iter().all(|(_, r)| r.is_ok()), "{log:?}");
}

#[test]
fn members_of_a_group_on_one_core_alternate() {
    let fa = fixture(1 << 20, 1 << 20);
    let fb = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let a = open(&e, &fa.overlay);
    let b = open(&e, &fb.overlay);
    let g = ThrottleGroup::new("tenant", iops(20)).unwrap();
    a.set_throttle(Some(g.clone()));
    b.set_throttle(Some(g.clone()));
    let log: Log<char> = Arc::default();
    // All of A's requests arrive before any of B's.
    for i in 0..12u64 {
        submit(&a, 0, read(i * 4096), 'a', &log);
    }
    for i in 0..12u64 {
        submit(&b, 0, read(i * 4096), 'b', &log);
    }
    wait_for(30, "every answer", || len(&log) == 24);
    let order: String = log.lock().unwrap().iter().map(|(c, _)| *c).collect();
    // After A's first few (the bucket's slack), the two alternate: B is not served after all
    // of A, and A never gets more than the slack in a row once B waits.
    let first_half = &order[..12];
    assert!(
        first_half.matches('b').count() >= 4,
        "B waited behind A: {order}"
    );
    assert!(!order[4..].contains("aaa"), "no round-robin: {order}");
    let s = g.stats();
    assert_eq!(
        s.throttled_requests,
        a.throttle_stats().throttled_requests + b.throttle_stats().throttled_requests
    );
    assert!(s.throttled_requests >= 18, "{s:?}");
    a.close().unwrap();
    b.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn flush_never_waits_for_the_budget() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    d.write_at(0, &[1u8; 4096], false).unwrap();
    let g = ThrottleGroup::new("slow", iops(1)).unwrap();
    d.set_throttle(Some(g));
    let log: Log<u64> = Arc::default();
    for i in 0..10u64 {
        submit(&d, 0, write(&e, (i + 1) * 4096, 4096), i, &log);
    }
    wait_for(10, "writes waiting", || d.throttle_stats().queued >= 8);
    let flushed: Log<&str> = Arc::default();
    submit(&d, 0, Request::Flush, "flush", &flushed);
    wait_for(10, "the flush", || len(&flushed) == 1);
    assert_eq!(flushed.lock().unwrap()[0].1, Ok(()));
    assert!(
        d.throttle_stats().queued >= 5,
        "the flush went ahead of the throttled writes"
    );
    d.set_throttle(None);
    wait_for(10, "the writes", || len(&log) == 10);
    d.close().unwrap();
    e.shutdown().unwrap();
}

/// Submits, on its core, a flood of writes of `a` at the first `ready`, then at each `ready` one
/// read of `b`; each read's answer reports how many of `a`'s writes were answered since the core
/// took the read in.
struct FloodThenReads {
    a: Disk,
    b: Disk,
    flood: Vec<Request>,
    done_a: Arc<AtomicUsize>,
    next_read: u64,
    between: std::sync::mpsc::Sender<(bool, usize)>,
}

impl addcow_engine::CoreSource for FloodThenReads {
    fn ready(&mut self, ctx: &mut addcow_engine::SourceCtx<'_>) {
        for req in self.flood.drain(..) {
            let n = Arc::clone(&self.done_a);
            ctx.submit(
                &self.a,
                req,
                Box::new(move |r| {
                    assert!(r.is_ok(), "{r:?}");
                    n.fetch_add(1, Ordering::SeqCst);
                }),
            );
        }
        let n = Arc::clone(&self.done_a);
        let tx = self.between.clone();
        // Counted here, on the core, as the read goes to the gate: what happened before the
        // core had the read is not the queue's doing.
        let before = n.load(Ordering::SeqCst);
        ctx.submit(
            &self.b,
            read(self.next_read * 4096),
            Box::new(move |r| {
                let _ = tx.send((r.is_ok(), n.load(Ordering::SeqCst) - before));
            }),
        );
        self.next_read += 1;
    }
}

#[test]
fn a_flooded_disk_does_not_hold_a_qd1_disk_behind_its_queue() {
    use std::os::fd::OwnedFd;
    let fa = fixture(64 << 20, 0);
    let fb = fixture(1 << 20, 1 << 20);
    // B's reads come from its base through the page cache (A has no base): they stay ring ops,
    // waiting behind whatever the core let go before them, but once submitted they complete at
    // once. With O_DIRECT the device (shared with A's writes and, under a test runner, with
    // other tests) serves them when it likes: the first read of a file, in an io-wq worker,
    // could outlast dozens of A's writes whatever the queue did.
    let e = Engine::start(EngineConfig {
        fair_share_requests: 8,
        base_cache: addcow_engine::CacheMode::Buffered,
        ..config(1)
    })
    .unwrap();
    let a = open(&e, &fa.overlay);
    let b = open(&e, &fb.overlay);
    let done_a = Arc::new(AtomicUsize::new(0));
    // A floods the core: 600 writes of 64 KiB, all at once, submitted on the core as the NBD
    // ring mode and vhost-user-blk do (not through the core's channel, where B's read would
    // wait behind them before the core even saw it).
    const FLOOD: usize = 600;
    let flood = (0..FLOOD as u64)
        .map(|i| write(&e, i * (64 << 10), 64 << 10))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let efd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
        .expect("eventfd");
    let fd = OwnedFd::from(efd);
    let poke = fd.try_clone().unwrap();
    let source = e
        .attach_source(
            0,
            fd,
            Box::new(FloodThenReads {
                a: a.clone(),
                b: b.clone(),
                flood,
                done_a: Arc::clone(&done_a),
                next_read: 0,
                between: tx,
            }),
        )
        .expect("attach");
    // B reads at QD1 meanwhile (the first read right behind the whole flood): each read is
    // served within a round of the flood, not after it. Counted on the core: A's answers
    // between the core taking a read in and its answer.
    let mut between = Vec::new();
    for _ in 0..5 {
        nix::unistd::write(&poke, &1u64.to_ne_bytes()).expect("poke");
        let (ok, n) = rx.recv_timeout(Duration::from_secs(60)).expect("B's read");
        assert!(ok);
        between.push(n);
    }
    wait_for(120, "the flood", || done_a.load(Ordering::SeqCst) == FLOOD);
    // Served in turn (8 in flight, two 64 KiB writes of A per round), each of B's reads waits for
    // a few of A's writes. Without fair share the first of them waits behind every write the
    // ring holds and the rest of A's backlog.
    assert!(
        between.iter().all(|&n| n <= 64),
        "A's writes answered while each of B's reads waited: {between:?}"
    );
    e.detach_source(source).expect("detach");
    a.close().unwrap();
    b.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn invalid_limits_are_refused_with_their_key_and_change_nothing() {
    let g = ThrottleGroup::new("g", iops(10)).unwrap();
    let bad = ThrottleLimits {
        iops_total: Some(10),
        iops_read: Some(5),
        ..Default::default()
    };
    assert_eq!(g.set_limits(bad).unwrap_err().key, "iops-total");
    assert_eq!(g.limits(), iops(10));
    assert_eq!(ThrottleGroup::new("h", bad).unwrap_err().key, "iops-total");
}

#[test]
fn a_group_is_one_budget_across_cores() {
    let fa = fixture(1 << 20, 1 << 20);
    let fb = fixture(1 << 20, 1 << 20);
    let e = engine(2);
    let a = open(&e, &fa.overlay);
    let b = open(&e, &fb.overlay);
    let g = ThrottleGroup::new("tenant", iops(10)).unwrap();
    a.set_throttle(Some(g.clone()));
    b.set_throttle(Some(g.clone()));
    let log: Log<char> = Arc::default();
    let start = Instant::now();
    for i in 0..10u64 {
        submit(&a, 0, read(i * 4096), 'a', &log);
        submit(&b, 1, read(i * 4096), 'b', &log);
    }
    wait_for(30, "every answer", || len(&log) == 20);
    // 20 requests at 10 per second for the two cores together (2 go at once): at least 1.8 s;
    // a budget per core would let them through in 0.8 s.
    assert!(
        start.elapsed() >= Duration::from_millis(1600),
        "{:?}",
        start.elapsed()
    );
    assert!(g.stats().throttled_requests >= 16, "{:?}", g.stats());
    a.close().unwrap();
    b.close().unwrap();
    e.shutdown().unwrap();
}

/// Submits `n` reads of its disk through its core's context on `ready` (as NBD ring mode and
/// vhost-user-blk do), counting the answers.
struct Burst {
    disk: Disk,
    n: u64,
    answered: Arc<AtomicUsize>,
}

impl addcow_engine::CoreSource for Burst {
    fn ready(&mut self, ctx: &mut addcow_engine::SourceCtx<'_>) {
        for i in 0..self.n {
            let answered = Arc::clone(&self.answered);
            ctx.submit(
                &self.disk,
                read(i * 4096),
                Box::new(move |r| {
                    assert!(r.is_ok(), "{r:?}");
                    answered.fetch_add(1, Ordering::SeqCst);
                }),
            );
        }
    }
}

#[test]
fn requests_submitted_on_the_core_by_a_source_are_throttled_too() {
    use std::os::fd::OwnedFd;
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let g = ThrottleGroup::new("g", iops(5)).unwrap();
    d.set_throttle(Some(g.clone()));
    let answered = Arc::new(AtomicUsize::new(0));
    let efd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
        .expect("eventfd");
    let fd = OwnedFd::from(efd);
    let writer = fd.try_clone().unwrap();
    e.attach_source(
        0,
        fd,
        Box::new(Burst {
            disk: d.clone(),
            n: 10,
            answered: Arc::clone(&answered),
        }),
    )
    .expect("attach");
    nix::unistd::write(&writer, &1u64.to_ne_bytes()).expect("poke");
    wait_for(10, "throttled requests of the source", || {
        d.throttle_stats().queued > 0
    });
    assert!(answered.load(Ordering::SeqCst) < 10);
    g.set_limits(ThrottleLimits::default()).unwrap();
    wait_for(10, "every answer", || answered.load(Ordering::SeqCst) == 10);
    assert!(d.throttle_stats().throttled_requests >= 7);
    d.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn reads_do_not_wait_behind_writes_that_wait_for_their_budget() {
    const MIB: u64 = 1 << 20;
    // No base: the reads (of areas nothing wrote) are answered as they start, so the log's
    // order is the order the core let them go.
    let f = fixture(16 * MIB, 0);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let g = ThrottleGroup::new(
        "w",
        ThrottleLimits {
            bps_write: Some(MIB),
            ..Default::default()
        },
    )
    .unwrap();
    d.set_throttle(Some(g));
    let log: Log<String> = Arc::default();
    // The first 4 MiB write goes at once and overfills the write bucket: the second waits for
    // it to leak (about 4 s at 1 MiB/s), the third about 4 s more.
    for i in 0..3u64 {
        submit(
            &d,
            0,
            write(&e, i * 4 * MIB, 4 << 20),
            format!("w{i}"),
            &log,
        );
    }
    wait_for(10, "the writes waiting", || d.throttle_stats().queued == 2);
    // Reads have no limit: they go now, not after the writes queued before them.
    for i in 0..8u64 {
        submit(&d, 0, read(12 * MIB + i * 4096), format!("r{i}"), &log);
    }
    wait_for(30, "every answer", || len(&log) == 11);
    let log = log.lock().unwrap();
    assert!(log.iter().all(|(_, r)| r.is_ok()), "{log:?}");
    let order: Vec<&str> = log.iter().map(|(t, _)| t.as_str()).collect();
    let pos = |t: &str| order.iter().position(|o| *o == t).unwrap();
    assert!(
        (0..8).all(|i| pos(&format!("r{i}")) < pos("w1")),
        "reads answered after a write that waited for its budget: {order:?}"
    );
    // Each direction keeps its order.
    assert!(pos("w0") < pos("w1") && pos("w1") < pos("w2"), "{order:?}");
    let reads: Vec<&str> = order
        .iter()
        .copied()
        .filter(|t| t.starts_with('r'))
        .collect();
    let want: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    assert_eq!(reads, want, "reads in arrival order");
    drop(log);
    d.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn trim_is_not_metered_by_the_throttle() {
    const MIB: u64 = 1 << 20;
    let f = fixture(256 * MIB, 0);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let g = ThrottleGroup::new(
        "t",
        ThrottleLimits {
            bps_write: Some(MIB),
            iops_write: Some(100),
            iops_size: Some(4096),
            ..Default::default()
        },
    )
    .unwrap();
    d.set_throttle(Some(g.clone()));
    let log: Log<u64> = Arc::default();
    // Counted, each TRIM would hold the next request back for about 64 s (its bytes) or
    // 160 s (its 16384 operations).
    for i in 0..3u64 {
        let req = Request::Trim {
            offset: i * 64 * MIB,
            len: 64 * MIB,
            fua: false,
        };
        submit(&d, 0, req, i, &log);
    }
    submit(&d, 0, write(&e, 200 * MIB, 4096), 3, &log);
    wait_for(30, "every answer", || len(&log) == 4);
    assert!(
        log.lock().unwrap().iter().all(|(_, r)| r.is_ok()),
        "{:?}",
        log.lock().unwrap()
    );
    assert_eq!(d.throttle_stats().throttled_requests, 0);
    assert_eq!(g.stats().throttled_requests, 0);
    // WRITE_ZEROES is metered as a write of its length (as in QEMU): the second of two 2 MiB
    // ones waits for the first to leak.
    for i in 0..2u64 {
        let req = Request::WriteZeroes {
            offset: 200 * MIB + i * 2 * MIB,
            len: 2 * MIB,
            punch: false,
            fua: false,
        };
        submit(&d, 0, req, 10 + i, &log);
    }
    wait_for(30, "the WRITE_ZEROES answers", || len(&log) == 6);
    assert_eq!(d.throttle_stats().throttled_requests, 1);
    d.close().unwrap();
    e.shutdown().unwrap();
}

/// Queues reads of its disk behind nothing but order: when poked, removes the group's limits
/// and submits one more read on the core, at once, before the core's pump runs.
struct LiftThenRead {
    d: Disk,
    g: ThrottleGroup,
    log: Log<u64>,
}

impl addcow_engine::CoreSource for LiftThenRead {
    fn ready(&mut self, ctx: &mut addcow_engine::SourceCtx<'_>) {
        self.g.set_limits(ThrottleLimits::default()).unwrap();
        let log = Arc::clone(&self.log);
        ctx.submit(
            &self.d,
            read(100 * 4096),
            Box::new(move |r| {
                log.lock()
                    .unwrap()
                    .push((100, r.map(|_| ()).map_err(|e| e.errno)));
            }),
        );
    }
}

#[test]
fn without_fair_share_a_request_does_not_pass_its_disks_waiting_ones() {
    use std::os::fd::OwnedFd;
    // No base, nothing allocated: every read is answered as it starts, so the log's order is
    // the order the core let them go.
    let f = fixture(1 << 20, 0);
    let e = Engine::start(EngineConfig {
        fair_share_requests: 0,
        ..config(1)
    })
    .unwrap();
    let d = open(&e, &f.overlay);
    let (g, log) = queue_behind_one_iops(&d, 10);
    let efd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
        .expect("eventfd");
    let fd = OwnedFd::from(efd);
    let poke = fd.try_clone().unwrap();
    let source = e
        .attach_source(
            0,
            fd,
            Box::new(LiftThenRead {
                d: d.clone(),
                g,
                log: Arc::clone(&log),
            }),
        )
        .expect("attach");
    nix::unistd::write(&poke, &1u64.to_ne_bytes()).expect("poke");
    wait_for(10, "every answer", || len(&log) == 11);
    let order: Vec<u64> = log.lock().unwrap().iter().map(|(i, _)| *i).collect();
    assert_eq!(
        order.last(),
        Some(&100),
        "the read submitted last passed the disk's waiting ones: {order:?}"
    );
    e.detach_source(source).expect("detach");
    d.close().unwrap();
    e.shutdown().unwrap();
}
