//! [`CoreSource`]: an eventfd polled in a core's own io_uring. Real eventfds written from other
//! threads, a real engine and disk.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use addcow_engine::format::{create, CreateOptions};
use addcow_engine::{
    CoreSource, Disk, DiskOptions, Done, Engine, EngineConfig, Request, SourceCtx,
};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// An eventfd: one end for the engine, a clone to write from a test thread.
fn efd() -> (OwnedFd, OwnedFd) {
    let fd = OwnedFd::from(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"));
    let writer = fd.try_clone().expect("dup eventfd");
    (fd, writer)
}

fn poke(fd: &OwnedFd) {
    let n = nix::unistd::write(fd, &1u64.to_ne_bytes()).expect("write eventfd");
    assert_eq!(n, 8);
}

fn engine(cores: usize) -> Engine {
    Engine::start(EngineConfig {
        cores,
        ..EngineConfig::default()
    })
    .expect("engine")
}

/// A 1 MiB overlay (no base) with `data` at offset 0.
fn disk(engine: &Engine, dir: &tempfile::TempDir, data: &[u8]) -> Disk {
    let overlay = dir.path().join("d.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        size: Some(1 << 20),
        ..CreateOptions::default()
    })
    .expect("create");
    let d = engine.open(&overlay, DiskOptions::default()).expect("open");
    d.write_at(0, data, false).expect("write");
    d
}

fn core_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

/// What the sources below report.
#[derive(Debug)]
enum Ev {
    Ready(String),
    Idle(String),
    Read(String, Vec<u8>),
}

/// Reports `ready` and `idle` (with the thread they ran on) and reads 512 bytes of `disk` at 0
/// through the context on each `ready`.
struct Probe {
    tx: mpsc::Sender<Ev>,
    disk: Disk,
    dropped: Arc<AtomicBool>,
}

impl CoreSource for Probe {
    fn ready(&mut self, ctx: &mut SourceCtx<'_>) {
        let _ = self.tx.send(Ev::Ready(core_name()));
        let tx = self.tx.clone();
        ctx.submit(
            &self.disk,
            Request::Read {
                offset: 0,
                len: 512,
            },
            Box::new(move |r| {
                let data = match r {
                    Ok(Done::Read(b)) => b.to_vec(),
                    other => panic!("read through the source: {other:?}"),
                };
                let _ = tx.send(Ev::Read(core_name(), data));
            }),
        );
    }

    fn idle(&mut self) {
        let _ = self.tx.send(Ev::Idle(core_name()));
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

fn next(rx: &mpsc::Receiver<Ev>, what: &str) -> Ev {
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

#[test]
fn a_written_eventfd_wakes_ready_on_its_core_which_submits_there_then_idles() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(2);
    let d = disk(&e, &dir, &[0x5a; 512]);
    let (fd, writer) = efd();
    let (tx, rx) = mpsc::channel();
    let dropped = Arc::new(AtomicBool::new(false));
    let probe = Probe {
        tx,
        disk: d.clone(),
        dropped: Arc::clone(&dropped),
    };
    let id = e.attach_source(1, fd, Box::new(probe)).expect("attach");
    assert_eq!(id.core(), 1);
    // Nothing written yet: no ready (idle may run).
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        rx.try_iter().all(|ev| matches!(ev, Ev::Idle(_))),
        "ready before any write"
    );
    for round in 0..3 {
        let w = std::thread::spawn({
            let writer = writer.try_clone().unwrap();
            move || poke(&writer)
        });
        w.join().unwrap();
        let mut ready = None;
        let mut read = None;
        let mut idle_after_read = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !idle_after_read {
            assert!(Instant::now() < deadline, "round {round}: events stopped");
            match next(&rx, "the source's events") {
                Ev::Ready(t) => ready = Some(t),
                Ev::Read(t, data) => {
                    assert!(ready.is_some(), "read answered before ready");
                    assert_eq!(t, "addcow-core-1", "the completion ran on another core");
                    read = Some(data);
                }
                Ev::Idle(t) => {
                    assert_eq!(t, "addcow-core-1", "idle on the wrong thread");
                    idle_after_read = read.is_some();
                }
            }
        }
        assert_eq!(ready.as_deref(), Some("addcow-core-1"), "round {round}");
        assert_eq!(read, Some(vec![0x5a; 512]));
    }
    e.detach_source(id).expect("detach");
    assert!(
        dropped.load(Ordering::SeqCst),
        "source not dropped by detach"
    );
    drop(d);
    e.shutdown().expect("shutdown");
}

/// Counts `ready` calls and remembers the highest value of `seq` any of them saw.
struct Counter {
    seq: Arc<AtomicU64>,
    seen: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    dropped: Arc<AtomicBool>,
}

impl CoreSource for Counter {
    fn ready(&mut self, _ctx: &mut SourceCtx<'_>) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen
            .fetch_max(self.seq.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

struct Counted {
    seq: Arc<AtomicU64>,
    seen: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    dropped: Arc<AtomicBool>,
}

fn counter() -> (Counter, Counted) {
    let c = Counted {
        seq: Arc::new(AtomicU64::new(0)),
        seen: Arc::new(AtomicU64::new(0)),
        calls: Arc::new(AtomicUsize::new(0)),
        dropped: Arc::new(AtomicBool::new(false)),
    };
    let s = Counter {
        seq: Arc::clone(&c.seq),
        seen: Arc::clone(&c.seen),
        calls: Arc::clone(&c.calls),
        dropped: Arc::clone(&c.dropped),
    };
    (s, c)
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn detach_stops_ready_and_drops_the_source() {
    let e = engine(1);
    let (fd, writer) = efd();
    let (s, c) = counter();
    let id = e.attach_source(0, fd, Box::new(s)).expect("attach");
    poke(&writer);
    wait_until("first ready", || c.calls.load(Ordering::SeqCst) == 1);
    e.detach_source(id).expect("detach");
    assert!(c.dropped.load(Ordering::SeqCst), "not dropped by detach");
    let calls = c.calls.load(Ordering::SeqCst);
    for _ in 0..10 {
        poke(&writer);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.calls.load(Ordering::SeqCst), calls, "ready after detach");
    // Detaching twice (or a stale id) is harmless.
    e.detach_source(id).expect("detach again");
    e.shutdown().expect("shutdown");
}

#[test]
fn no_wakeup_is_lost_when_written_many_times_quickly() {
    let e = engine(2);
    // Ping-pong: every write must be followed by a ready that sees it (a lost wakeup hangs here
    // and times out).
    let (fd, writer) = efd();
    let (s, c) = counter();
    let id = e.attach_source(0, fd, Box::new(s)).expect("attach");
    for i in 1..=5000u64 {
        c.seq.store(i, Ordering::SeqCst);
        poke(&writer);
        wait_until("ping-pong ready", || c.seen.load(Ordering::SeqCst) >= i);
    }
    e.detach_source(id).expect("detach");
    // Bursts from four threads at once: the last value written must be seen, and the count
    // is folded (far fewer calls than writes is fine; none after the last write is a lost
    // wakeup).
    let (fd, writer) = efd();
    let (s, c) = counter();
    let id = e.attach_source(1, fd, Box::new(s)).expect("attach");
    let writer = Arc::new(writer);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (writer, seq) = (Arc::clone(&writer), Arc::clone(&c.seq));
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    seq.fetch_add(1, Ordering::SeqCst);
                    poke(&writer);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let last = c.seq.load(Ordering::SeqCst);
    assert_eq!(last, 80_000);
    wait_until("the last burst write seen", || {
        c.seen.load(Ordering::SeqCst) == last
    });
    let calls = c.calls.load(Ordering::SeqCst);
    assert!((1..=80_000).contains(&calls), "{calls} ready calls");
    e.detach_source(id).expect("detach");
    e.shutdown().expect("shutdown");
}

#[test]
fn detaching_during_a_pending_poll_completes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(2);
    let d = disk(&e, &dir, &[7; 512]);
    // Polls armed and never fired, detached at once; and detached while being written.
    let mut writers = Vec::new();
    for k in 0..64 {
        let (fd, writer) = efd();
        let (s, c) = counter();
        let id = e.attach_source(k % 2, fd, Box::new(s)).expect("attach");
        let stop = Arc::new(AtomicBool::new(false));
        let hammer = (k % 4 == 0).then(|| {
            let (writer, stop) = (writer.try_clone().unwrap(), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    poke(&writer);
                }
            })
        });
        let t = Instant::now();
        e.detach_source(id).expect("detach");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "detach took {:?}",
            t.elapsed()
        );
        assert!(c.dropped.load(Ordering::SeqCst), "source {k} not dropped");
        let calls = c.calls.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(c.calls.load(Ordering::SeqCst), calls, "ready after detach");
        stop.store(true, Ordering::SeqCst);
        if let Some(h) = hammer {
            h.join().unwrap();
        }
        writers.push(writer);
    }
    // The cores still serve requests and new sources.
    assert_eq!(d.read_at(0, 512).expect("read"), vec![7; 512]);
    let (fd, writer) = efd();
    let (s, c) = counter();
    let _id = e
        .attach_source(1, fd, Box::new(s))
        .expect("attach after detaches");
    poke(&writer);
    wait_until("ready of a source attached after the detaches", || {
        c.calls.load(Ordering::SeqCst) >= 1
    });
    // Shutdown with a source still attached (its poll pending) drops it.
    drop(d);
    e.shutdown().expect("shutdown");
    assert!(
        c.dropped.load(Ordering::SeqCst),
        "attached source not dropped at shutdown"
    );
    drop(writers);
}

#[test]
fn a_detached_poll_lets_go_of_its_file() {
    // A pipe's read end as the source's fd: once the core dropped its copy and the kernel's
    // poll let go of the file, no reader is left and a write fails with EPIPE. A poll left
    // armed in the ring would keep the file (and the reader) alive.
    let e = engine(1);
    let (r, w) = nix::unistd::pipe().expect("pipe");
    let (s, c) = counter();
    let id = e.attach_source(0, r, Box::new(s)).expect("attach");
    nix::unistd::write(&w, b"x").expect("write");
    wait_until("ready on the pipe", || c.calls.load(Ordering::SeqCst) >= 1);
    e.detach_source(id).expect("detach");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match nix::unistd::write(&w, b"y") {
            Err(nix::errno::Errno::EPIPE) => break,
            Ok(_) => {}
            Err(other) => panic!("write to the pipe: {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "the pipe still has a reader 10 s after detach: the poll kept its file"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    e.shutdown().expect("shutdown");
}

/// Counts `ready` and `idle` calls.
struct IdleCounter {
    ready: Arc<AtomicUsize>,
    idle: Arc<AtomicUsize>,
}

impl CoreSource for IdleCounter {
    fn ready(&mut self, _ctx: &mut SourceCtx<'_>) {
        self.ready.fetch_add(1, Ordering::SeqCst);
    }

    fn idle(&mut self) {
        self.idle.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_source_ends_its_batch_while_its_core_is_flooded_with_messages() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(1);
    let d = disk(&e, &dir, &[1; 512]);
    let (fd, writer) = efd();
    let (ready, idle) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let s = IdleCounter {
        ready: Arc::clone(&ready),
        idle: Arc::clone(&idle),
    };
    let id = e.attach_source(0, fd, Box::new(s)).expect("attach");
    let (stop, answered) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    addcow_engine_testkit::harness::flood(d.clone(), Arc::clone(&stop), Arc::clone(&answered));
    wait_until("the flood to get going", || {
        answered.load(Ordering::SeqCst) > 1000
    });
    // While the channel never empties, each kick must still be followed by the end of a batch
    // (for vhost-user-blk: the call eventfd that tells the guest its requests are answered).
    for round in 0..20 {
        let r0 = ready.load(Ordering::SeqCst);
        poke(&writer);
        wait_until("ready under the flood", || {
            ready.load(Ordering::SeqCst) > r0
        });
        let i0 = idle.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while idle.load(Ordering::SeqCst) == i0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: idle never called after ready while the core answered {} flood \
                 requests",
                answered.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(answered.load(Ordering::SeqCst) > 1000);
    stop.store(true, Ordering::SeqCst);
    e.detach_source(id).expect("detach");
    drop(d);
    e.shutdown().expect("shutdown");
}
