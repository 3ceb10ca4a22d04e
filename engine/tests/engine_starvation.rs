//! A core kept busy by a stream of new requests still completes the I/O it submitted earlier.
//!
//! The flood is a CACHE request whose completion (which runs on the core) submits the next one
//! to the same core, so whenever the core looks at its channel there is a message waiting. Under
//! `DEFER_TASKRUN` completions are only posted by an `io_uring_enter` with `GETEVENTS`, so a core
//! that only submits while messages keep arriving never sees a CQE; and a core that drains its
//! channel until it is empty never leaves the drain at all. Either way the read below would
//! never finish while the flood runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use addcow_engine::{Done, Request};
use addcow_engine_testkit::harness::*;

#[test]
fn a_read_finishes_while_its_core_is_flooded_with_new_requests() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    flood(d.clone(), stop.clone(), answered.clone());
    // Let the flood get going.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while answered.load(Ordering::SeqCst) < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the flood never started"
        );
        std::thread::yield_now();
    }
    // Several reads of the base (real I/O) on the flooded core, one after the other.
    for i in 0..20u64 {
        let offset = i * 40_960;
        let (tx, rx) = mpsc::channel();
        let before = answered.load(Ordering::SeqCst);
        d.submit(
            0,
            Request::Read { offset, len: 8192 },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let got = rx.recv_timeout(Duration::from_secs(20));
        let turns = answered.load(Ordering::SeqCst) - before;
        let got = match got {
            Ok(r) => r,
            Err(_) => {
                stop.store(true, Ordering::SeqCst);
                panic!(
                    "read {i} did not finish within 20 s while its core answered {turns} flood \
                     requests: the flood starves its completions"
                );
            }
        };
        match got {
            Ok(Done::Read(buf)) => {
                let want: Vec<u8> = (offset..offset + 8192).map(base_byte).collect();
                assert!(buf[..] == want[..], "read {i} returned wrong bytes");
            }
            other => panic!("read {i}: {other:?}"),
        }
    }
    assert!(
        answered.load(Ordering::SeqCst) > 1000,
        "the flood kept running during the reads"
    );
    stop.store(true, Ordering::SeqCst);
    // The flood ends with its next completion; then the disk closes normally.
    d.close().expect("close");
    e.shutdown().expect("shutdown");
}
