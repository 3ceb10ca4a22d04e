//! Socket I/O of a [`CoreSource`] on its core's ring ([`SourceCtx::recv`], [`SourceCtx::send`],
//! [`CoreSource::io_done`]), its timer, its detaching from within and outside, and a panic in
//! it: real Unix stream socket pairs, a real engine.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use addcow_engine::{
    CoreSource, Engine, EngineConfig, IoBuf, SendList, SockDone, SockFd, SourceCtx, SourceId,
};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// What the test source reports (with the thread it ran on where that matters).
#[derive(Debug)]
enum Ev {
    Recv(std::io::Result<usize>, Vec<u8>, String),
    /// A send's completion: its result and the bytes still unsent before it.
    Sent(std::io::Result<usize>, usize),
    /// Every byte of a list went out.
    AllSent(usize),
    Deadline(Instant),
    Dropped,
}

/// What the test asks the source to do on its next `ready`.
enum Cmd {
    Recv(usize),
    /// Send the list; on a short send, send the rest (`true`) or stop.
    Send(SendList, bool),
    Detach,
    Panic,
    Timer(Instant),
}

struct Probe {
    fd: SockFd,
    tx: mpsc::Sender<Ev>,
    cmds: Arc<Mutex<VecDeque<Cmd>>>,
    finish: bool,
    timer: Option<Instant>,
    /// Detach from within once a recv ends (end of stream or error).
    detach_on_recv_end: bool,
}

impl CoreSource for Probe {
    fn ready(&mut self, ctx: &mut SourceCtx<'_>) {
        let cmds: Vec<Cmd> = self.cmds.lock().unwrap().drain(..).collect();
        for c in cmds {
            match c {
                Cmd::Recv(n) => ctx.recv(&self.fd, IoBuf::new_zeroed(n), 0, 7),
                Cmd::Send(list, finish) => {
                    self.finish = finish;
                    ctx.send(&self.fd, list, 8);
                }
                Cmd::Detach => ctx.detach(),
                Cmd::Panic => panic!("a source panics on purpose"),
                Cmd::Timer(t) => self.timer = Some(t),
            }
        }
    }

    fn io_done(&mut self, ctx: &mut SourceCtx<'_>, tag: u64, done: SockDone) {
        match done {
            SockDone::Recv { buf, at, result } => {
                assert_eq!(tag, 7);
                let n = *result.as_ref().unwrap_or(&0);
                let bytes = buf[at..at + n].to_vec();
                let end = !matches!(result, Ok(n) if n > 0);
                let thread = std::thread::current().name().unwrap_or("?").to_string();
                let _ = self.tx.send(Ev::Recv(result, bytes, thread));
                if end && self.detach_on_recv_end {
                    ctx.detach();
                }
            }
            SockDone::Send { mut list, result } => {
                assert_eq!(tag, 8);
                let before = list.len();
                let _ = self.tx.send(Ev::Sent(
                    result.as_ref().map(|n| *n).map_err(clone_err),
                    before,
                ));
                if let Ok(n) = result {
                    list.advance(n);
                    if list.is_empty() {
                        let bufs = list.clear().count();
                        let _ = self.tx.send(Ev::AllSent(bufs));
                    } else if self.finish {
                        ctx.send(&self.fd, list, 8);
                    }
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.timer
    }

    fn deadline(&mut self, _ctx: &mut SourceCtx<'_>) {
        self.timer = None;
        let _ = self.tx.send(Ev::Deadline(Instant::now()));
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.tx.send(Ev::Dropped);
    }
}

fn clone_err(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(n) => std::io::Error::from_raw_os_error(n),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// A probe attached to core 0 of `e` on one end of a socket pair; the test keeps the other.
struct Rig {
    id: SourceId,
    peer: UnixStream,
    poke: OwnedFd,
    cmds: Arc<Mutex<VecDeque<Cmd>>>,
    rx: mpsc::Receiver<Ev>,
}

impl Rig {
    fn new(e: &Engine, nonblocking: bool, detach_on_recv_end: bool) -> Rig {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(nonblocking).expect("O_NONBLOCK");
        let efd = OwnedFd::from(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).expect("eventfd"));
        let poke = efd.try_clone().expect("dup eventfd");
        let (tx, rx) = mpsc::channel();
        let cmds = Arc::new(Mutex::new(VecDeque::new()));
        let probe = Probe {
            fd: SockFd::new(OwnedFd::from(ours)),
            tx,
            cmds: Arc::clone(&cmds),
            finish: false,
            timer: None,
            detach_on_recv_end,
        };
        let id = e.attach_source(0, efd, Box::new(probe)).expect("attach");
        Rig {
            id,
            peer,
            poke,
            cmds,
            rx,
        }
    }

    fn run(&self, cmd: Cmd) {
        self.cmds.lock().unwrap().push_back(cmd);
        let n = nix::unistd::write(&self.poke, &1u64.to_ne_bytes()).expect("write eventfd");
        assert_eq!(n, 8);
    }

    fn next(&self, what: &str) -> Ev {
        self.rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
    }

    /// Whether the source's socket is closed (the peer reads end of stream), within 10 s.
    fn peer_sees_eof(&mut self) -> bool {
        self.peer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 16];
        matches!(self.peer.read(&mut b), Ok(0))
    }
}

fn engine() -> Engine {
    Engine::start(EngineConfig {
        cores: 1,
        ..EngineConfig::default()
    })
    .expect("engine")
}

#[test]
fn a_recv_on_the_ring_gets_the_peers_bytes_on_the_core_thread_and_waits_without_eagain() {
    let e = engine();
    for nonblocking in [true, false] {
        let mut rig = Rig::new(&e, nonblocking, false);
        rig.run(Cmd::Recv(64 << 10));
        // No data yet: the recv waits in the kernel (no EAGAIN handed back, even on a
        // non-blocking socket).
        match rig.rx.recv_timeout(Duration::from_millis(300)) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            other => {
                panic!("a recv with nothing to read ended (nonblocking {nonblocking}): {other:?}")
            }
        }
        rig.peer.write_all(b"three pipelined requests").unwrap();
        match rig.next("the recv") {
            Ev::Recv(Ok(n), bytes, thread) => {
                assert_eq!(n, 24);
                assert_eq!(bytes, b"three pipelined requests");
                assert_eq!(thread, "addcow-core-0", "io_done ran off the core");
            }
            other => panic!("{other:?}"),
        }
        e.detach_source(rig.id).expect("detach");
        assert!(matches!(rig.next("drop"), Ev::Dropped));
    }
    e.shutdown().expect("shutdown");
}

/// A 1 MiB reply made of headers and buffers, sent through a 4 KiB socket buffer to a slow
/// reader: short sends are reported and the rest, sent again, arrives complete and in order.
#[test]
fn short_sends_are_reported_and_the_rest_goes_out_in_order() {
    let e = engine();
    let mut rig = Rig::new(&e, true, false);
    // The source owns its end; shrinking the peer's receive side bounds what is in flight.
    nix::sys::socket::setsockopt(&rig.peer, nix::sys::socket::sockopt::RcvBuf, &4096)
        .expect("SO_RCVBUF");
    let mut list = SendList::new();
    let mut expect = Vec::new();
    for i in 0..16u8 {
        let head = [b'H', i, i, i];
        list.push_bytes(&head);
        expect.extend_from_slice(&head);
        let data: Vec<u8> = (0..64 * 1024).map(|j| (j as u8) ^ i).collect();
        // Send the middle of each buffer only, to exercise the ranges.
        list.push_buf(IoBuf::from_slice(&data), 100, 64 * 1024 - 200);
        expect.extend_from_slice(&data[100..64 * 1024 - 100]);
    }
    let total = list.len();
    assert_eq!(total, expect.len());
    rig.run(Cmd::Send(list, true));
    let mut got = Vec::new();
    let mut buf = vec![0u8; 3000];
    let mut short = 0;
    let mut all = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < total || all.is_none() {
        assert!(Instant::now() < deadline, "the send never finished");
        if got.len() < total {
            std::thread::sleep(Duration::from_micros(200));
            let n = rig.peer.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        while let Ok(ev) = rig.rx.try_recv() {
            match ev {
                Ev::Sent(Ok(n), before) if n < before => short += 1,
                Ev::Sent(Ok(_), _) => {}
                Ev::AllSent(bufs) => all = Some(bufs),
                other => panic!("{other:?}"),
            }
        }
        if got.len() >= total && all.is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(
        short > 0,
        "no short send through a 4 KiB buffer: the test proves nothing"
    );
    assert_eq!(all, Some(16), "the buffers come back when the list is done");
    assert_eq!(got.len(), total);
    assert!(got == expect, "the bytes arrived changed or out of order");
    e.shutdown().expect("shutdown");
}

/// A closed peer: the recv ends with end of stream, a send fails with EPIPE (no SIGPIPE: the
/// default action is restored for this test, which would kill the test binary), and a source
/// that detaches itself then is dropped on its core.
#[test]
fn a_peer_that_closes_ends_the_recv_fails_the_send_and_the_source_detaches_itself() {
    // SAFETY: restores the default SIGPIPE action (the Rust runtime ignores it); no handler
    // runs Rust code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let e = engine();
    let rig = Rig::new(&e, true, true);
    let mut list = SendList::new();
    list.push_bytes(b"a reply nobody reads");
    drop(rig.peer.try_clone().unwrap());
    rig.peer.shutdown(std::net::Shutdown::Both).unwrap();
    rig.run(Cmd::Send(list, false));
    match rig.next("the send") {
        Ev::Sent(Err(err), _) => assert_eq!(err.raw_os_error(), Some(libc::EPIPE), "{err}"),
        other => panic!("{other:?}"),
    }
    rig.run(Cmd::Recv(4096));
    match rig.next("the recv") {
        Ev::Recv(Ok(0), _, _) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(rig.next("drop"), Ev::Dropped),
        "the source asked to be detached"
    );
    e.detach_source(rig.id)
        .expect("detaching a gone source is fine");
    e.shutdown().expect("shutdown");
}

/// A recv outstanding when the source is detached from outside, or when the engine shuts down:
/// the op is cancelled and reaped, so the socket is really closed (the peer reads end of
/// stream) and nothing hangs.
#[test]
fn teardown_with_a_recv_outstanding_cancels_it_and_closes_the_socket() {
    let e = engine();
    let mut rig = Rig::new(&e, true, false);
    rig.run(Cmd::Recv(4096));
    std::thread::sleep(Duration::from_millis(100));
    e.detach_source(rig.id).expect("detach");
    assert!(matches!(rig.next("drop"), Ev::Dropped));
    assert!(
        rig.peer_sees_eof(),
        "the socket stayed open after detach (the recv op still holds it)"
    );

    let mut rig = Rig::new(&e, true, false);
    rig.run(Cmd::Recv(4096));
    std::thread::sleep(Duration::from_millis(100));
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(e.shutdown());
    });
    match finished.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => r.expect("shutdown"),
        Err(_) => panic!("shutdown hangs on a recv nobody cancelled"),
    }
    assert!(matches!(rig.next("drop"), Ev::Dropped));
    assert!(rig.peer_sees_eof(), "the socket stayed open after shutdown");
}

/// A source's deadline wakes its core (nothing else happens) and `deadline` runs after it.
#[test]
fn a_source_deadline_wakes_the_core() {
    let e = engine();
    let rig = Rig::new(&e, true, false);
    let at = Instant::now() + Duration::from_millis(150);
    rig.run(Cmd::Timer(at));
    match rig.next("the deadline") {
        Ev::Deadline(when) => {
            assert!(when >= at, "called before its deadline");
            assert!(
                when < at + Duration::from_secs(5),
                "called long after its deadline: the core's wait ignored it"
            );
        }
        other => panic!("{other:?}"),
    }
    e.shutdown().expect("shutdown");
}

/// A source that panics is detached; the core and another source on it go on.
#[test]
fn a_panicking_source_is_detached_and_the_core_goes_on() {
    let e = engine();
    let bad = Rig::new(&e, true, false);
    let mut good = Rig::new(&e, true, false);
    bad.run(Cmd::Panic);
    assert!(matches!(bad.next("drop"), Ev::Dropped));
    good.run(Cmd::Recv(64));
    good.peer.write_all(b"still served").unwrap();
    match good.next("the recv") {
        Ev::Recv(Ok(12), bytes, _) => assert_eq!(bytes, b"still served"),
        other => panic!("{other:?}"),
    }
    good.run(Cmd::Detach);
    assert!(matches!(good.next("drop"), Ev::Dropped));
    assert!(good.peer_sees_eof());
    e.shutdown().expect("shutdown");
}
