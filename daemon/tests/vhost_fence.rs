//! GET_VRING_BASE while a chain is held past its wait: the daemon waits for the queue's chains
//! only so long (75 s; a test seam shortens it), then fails the request, and the chain it gave
//! up on adds no used entry when it completes later (the frontend was told where the ring
//! stands and may reuse it). The chain is a read of a remote base whose image server holds the
//! read until the test lets it go.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ::vhost::VhostBackend;
use addcow_daemon_testkit::scripted::{self, Reply, Request, Script, ScriptedServer};
use addcow_daemon_testkit::vhost::hostile::{Call, Hostile, Memory, DATA, T_IN};
use addcow_daemon_testkit::*;

const MIB: u64 = 1 << 20;

/// The wait the test gives GET_VRING_BASE (the `stop-vring-wait` seam).
const WAIT: Duration = Duration::from_millis(1000);

#[test]
fn get_vring_base_gives_up_after_its_wait_and_the_held_chain_adds_no_used_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |n: &str| dir.path().join(n);
    let seams = path("seams");
    std::fs::create_dir(&seams).expect("seams folder");
    std::fs::write(
        seams.join("stop-vring-wait.ms"),
        WAIT.as_millis().to_string(),
    )
    .expect("arm the seam");

    // The image server: honest, except that while `hold` is set every read waits for it to
    // be cleared before it is answered.
    let hold = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicUsize::new(0));
    let mut script = Script::honest(vec![0x3c; (16 * MIB) as usize]);
    {
        let (hold, held) = (hold.clone(), held.clone());
        script.on_read = Box::new(move |r: &mut Reply<'_>, q: Request| {
            if hold.load(Ordering::SeqCst) {
                held.fetch_add(1, Ordering::SeqCst);
                while hold.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            scripted::honest_read(r, q)
        });
    }
    let server = ScriptedServer::start(&path("img.sock"), script);
    let overlay = path("vm.add-cow");
    addcow_ok(
        ".",
        &["create", "-b", &server.uri(), overlay.to_str().unwrap()],
    );
    let (nbd, vsock) = (path("nbd.sock"), path("vhost.sock"));
    let d = Daemon::start_seamed(
        &nbd,
        &[
            "--cores",
            "1",
            "--base-timeout",
            "120",
            "--vhost-user-blk",
            vsock.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
        &seams,
    );
    wait_until("the vhost socket is published", || vsock.exists());

    // A 4 KiB read at sector 0: the overlay has nothing there, so it goes to the server.
    let mem = Memory::new(4 * MIB);
    mem.data_chain(0, T_IN, 0, DATA, 4096);
    let h = Hostile::connect(&vsock, &mem, Call::EventFd, false);
    hold.store(true, Ordering::SeqCst);
    mem.post(&[0]);
    h.kick();
    wait_until("the server holds the chain's read", || {
        held.load(Ordering::SeqCst) > 0
    });

    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let started = Instant::now();
        let r = h.fe.get_vring_base(0).map_err(|e| e.to_string());
        let _ = tx.send((r, started.elapsed(), h));
    });
    let (answer, took, _h) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("GET_VRING_BASE never returned while a chain was held");
    assert!(
        answer.is_err(),
        "GET_VRING_BASE claimed a ring position with a chain in flight: {answer:?}"
    );
    assert!(
        took >= WAIT,
        "GET_VRING_BASE gave up after {took:?}, before its wait"
    );
    assert!(hold.load(Ordering::SeqCst), "the read is still held");
    assert_eq!(mem.used_idx(), 0);

    // The read is answered now; the chain completes (its status byte is written) but adds no
    // used entry.
    hold.store(false, Ordering::SeqCst);
    wait_until("the held chain completed", || mem.status(0) != 0xff);
    // Logged once every chain of the connection was answered.
    d.wait_log("vhost-user-blk connection ended");
    assert_eq!(
        mem.used_idx(),
        0,
        "the chain GET_VRING_BASE gave up on added a used entry after it"
    );
    let log = d.stop();
    assert!(log.contains("requests still in flight after"), "{log}");
    drop(server);
}
