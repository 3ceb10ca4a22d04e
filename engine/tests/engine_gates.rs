//! The core's gates one after the other: a write that passed the throttle and fair-share gate
//! and then waited for its dirty bits to be made durable starts when they are, without going
//! through the first gate again (it would be charged twice, and with a full fair-share cap it
//! would wait for room it holds itself).

use std::sync::mpsc;
use std::time::Duration;

use addcow_engine::qos::{ThrottleGroup, ThrottleLimits};
use addcow_engine::{EngineConfig, Request};
use addcow_engine_testkit::harness::*;

#[test]
fn a_write_that_waited_for_its_dirty_bits_is_not_gated_again() {
    let f = fixture(8 << 20, 0);
    // One request in flight per core: the write holds the cap while it waits for its bits.
    let e = addcow_engine::Engine::start(EngineConfig {
        fair_share_requests: 1,
        ..config(1)
    })
    .unwrap();
    let d = open(&e, &f.overlay);
    d.bitmaps().add("b0", 64 << 10, true, true).unwrap();
    // A limit far above the rate: the throttle path is taken, nothing waits for budget.
    let g = ThrottleGroup::new(
        "g",
        ThrottleLimits {
            iops_total: Some(100_000),
            ..Default::default()
        },
    )
    .unwrap();
    d.set_throttle(Some(g));
    for i in 0..8u64 {
        // Each write opens a fresh granule: it waits for the bitmap's sync, then starts.
        let mut data = e.alloc_buf(4096);
        data.fill(i as u8 + 1);
        let (tx, rx) = mpsc::channel();
        d.submit(
            0,
            Request::Write {
                offset: i * (1 << 20),
                data: data.into(),
                fua: false,
            },
            Box::new(move |r| {
                let _ = tx.send(r.map(|_| ()));
            }),
        );
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("write {i} never answered: it waits for room it holds"));
        r.unwrap();
    }
    assert_eq!(
        d.throttle_stats().throttled_requests,
        0,
        "no write waited for budget"
    );
    let list = d.bitmaps().list();
    assert_eq!(list[0].dirty_bytes, 8 * (64 << 10), "{list:?}");
    d.close().unwrap();
    e.shutdown().unwrap();
}

/// Requests of 1 MiB wait in the fair-share queue (eight times the deficit round robin's
/// quantum): once nothing is in flight any more, nothing but the pump itself can let them go,
/// so one pump must give the disk the quanta it needs instead of one per loop turn (the core
/// would block with room and requests waiting, until some unrelated wake-up).
#[test]
fn requests_larger_than_a_quantum_all_go_when_the_core_has_room() {
    const N: u64 = 16;
    const LEN: u32 = 1 << 20;
    // Over a base: every read is real I/O, answered from a completion.
    let f = fixture(N * u64::from(LEN), N * u64::from(LEN));
    // One request in flight per core: every other one waits in the queue.
    let e = addcow_engine::Engine::start(EngineConfig {
        fair_share_requests: 1,
        ..config(1)
    })
    .unwrap();
    let d = open(&e, &f.overlay);
    let (tx, rx) = mpsc::channel();
    for i in 0..N {
        let tx = tx.clone();
        d.submit(
            0,
            Request::Read {
                offset: i * u64::from(LEN),
                len: LEN,
            },
            Box::new(move |r| {
                let _ = tx.send((i, r.map(|_| ()).map_err(|e| e.errno)));
            }),
        );
    }
    drop(tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut answered = 0;
    while answered < N {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, r)) => {
                assert_eq!(r, Ok(()), "read {i}");
                answered += 1;
            }
            Err(_) => panic!(
                "{answered} of {N} reads answered after 30 s: the rest wait in the fair-share \
                 queue of an idle core"
            ),
        }
    }
    d.close().unwrap();
    e.shutdown().unwrap();
}

#[test]
fn requests_answered_at_once_do_not_leave_the_rest_waiting_on_an_idle_core() {
    const REAL: u64 = 2;
    const AT_ONCE: u64 = 50;
    const LEN: u32 = 1 << 20;
    // A reads its base (ring ops, answered from completions); B has no base and nothing
    // allocated, so its reads are answered on the core, with no I/O, when they start.
    let fa = fixture(REAL * u64::from(LEN), REAL * u64::from(LEN));
    let fb = fixture(AT_ONCE * 4096, 0);
    let e = addcow_engine::Engine::start(EngineConfig {
        fair_share_requests: 1,
        ..config(1)
    })
    .unwrap();
    let a = open(&e, &fa.overlay);
    let b = open(&e, &fb.overlay);
    let (tx, rx) = mpsc::channel();
    let submit = |d: &addcow_engine::Disk, tag: (char, u64), req: Request| {
        let tx = tx.clone();
        d.submit(
            0,
            req,
            Box::new(move |r| {
                let _ = tx.send((tag, r.map(|_| ()).map_err(|e| e.errno)));
            }),
        );
    };
    for i in 0..REAL {
        let req = Request::Read {
            offset: i * u64::from(LEN),
            len: LEN,
        };
        submit(&a, ('a', i), req);
    }
    for i in 0..AT_ONCE {
        let req = Request::Read {
            offset: i * 4096,
            len: 4096,
        };
        submit(&b, ('b', i), req);
    }
    drop(tx);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let total = REAL + AT_ONCE;
    let mut answered = 0;
    while answered < total {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((tag, r)) => {
                assert_eq!(r, Ok(()), "read {tag:?}");
                answered += 1;
            }
            Err(_) => panic!(
                "{answered} of {total} reads answered after 30 s: the rest wait in the \
                 fair-share queue of a core with room and nothing in flight"
            ),
        }
    }
    a.close().unwrap();
    b.close().unwrap();
    e.shutdown().unwrap();
}
