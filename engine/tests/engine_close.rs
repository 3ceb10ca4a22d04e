//! Closing a disk or stopping the engine never drops an acknowledged write and never leaves a
//! request unanswered:
//!
//! * `Disk::close` / `Engine::shutdown` right after many writes were submitted: every write that
//!   was answered OK is on disk after a reopen (the final commit runs after the last accepted
//!   request was answered, not before);
//! * the last `Engine` handle dropped inside a completion (on a core thread) while a client keeps
//!   submitting: every request is answered exactly once, and `Disk::close` returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use addcow_engine::{Disk, Engine, Request, RequestError};
use addcow_engine_testkit::harness::*;

const WRITES: u64 = 1500;
const LEN: usize = 4096;

/// Submits `WRITES` writes of fresh 4 KiB blocks over both cores without waiting; the answers
/// arrive on the returned channel as (write number, result).
fn submit_writes(engine: &Engine, disk: &Disk) -> mpsc::Receiver<(u64, Result<(), RequestError>)> {
    let (tx, rx) = mpsc::channel();
    for i in 0..WRITES {
        let mut buf = engine.alloc_buf(LEN);
        buf.copy_from_slice(&payload(i, LEN));
        let tx = tx.clone();
        disk.submit(
            i as usize,
            Request::Write {
                offset: i * LEN as u64,
                data: buf.into(),
                fua: false,
            },
            Box::new(move |r| {
                let _ = tx.send((i, r.map(|_| ())));
            }),
        );
    }
    rx
}

/// Collects exactly one answer per write (within a deadline) and returns the acknowledged ones.
fn acknowledged(rx: mpsc::Receiver<(u64, Result<(), RequestError>)>) -> Vec<u64> {
    let mut seen = HashMap::new();
    for _ in 0..WRITES {
        let (i, r) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("every write is answered");
        assert!(
            seen.insert(i, r.clone()).is_none(),
            "write {i} answered twice"
        );
    }
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "no answer beyond one per write"
    );
    let mut ok: Vec<u64> = seen
        .into_iter()
        .filter_map(|(i, r)| match r {
            Ok(()) => Some(i),
            Err(e) => {
                assert_eq!(e.errno, libc::ESHUTDOWN, "write {i}: {e}");
                None
            }
        })
        .collect();
    ok.sort_unstable();
    ok
}

fn check_acknowledged(f: &Fixture, ok: &[u64]) {
    let e = engine(1);
    let d = open(&e, &f.overlay);
    for &i in ok {
        let got = d.read_at(i * LEN as u64, LEN as u32).expect("read");
        assert!(
            got == payload(i, LEN),
            "write {i} was acknowledged before the close but is not on disk after reopening \
             ({} of {} writes acknowledged)",
            ok.len(),
            WRITES
        );
    }
    d.close().expect("close");
}

#[test]
fn close_right_after_submitting_keeps_every_acknowledged_write() {
    for _ in 0..3 {
        let f = fixture(WRITES * LEN as u64, 1 << 20);
        let e = engine(2);
        let d = open(&e, &f.overlay);
        let rx = submit_writes(&e, &d);
        d.close().expect("close");
        let ok = acknowledged(rx);
        assert!(!ok.is_empty(), "close waits for the accepted writes");
        e.shutdown().expect("shutdown");
        drop((d, e));
        check_acknowledged(&f, &ok);
    }
}

#[test]
fn shutdown_right_after_submitting_keeps_every_acknowledged_write() {
    for _ in 0..3 {
        let f = fixture(WRITES * LEN as u64, 1 << 20);
        let e = engine(2);
        let d = open(&e, &f.overlay);
        let rx = submit_writes(&e, &d);
        e.shutdown().expect("shutdown");
        let ok = acknowledged(rx);
        assert!(!ok.is_empty(), "shutdown waits for the accepted writes");
        drop((d, e));
        check_acknowledged(&f, &ok);
    }
}

#[test]
fn engine_dropped_on_a_core_thread_answers_every_request_once_and_close_returns() {
    for round in 0..5 {
        let f = fixture(4 << 20, 4 << 20);
        let e = engine(2);
        let d = open(&e, &f.overlay);
        let holder = Arc::new(Mutex::new(Some(e)));
        let (tx, rx) = mpsc::channel::<(u64, bool)>();
        // Request 0's completion drops the last Engine handle on core 0's thread.
        {
            let (holder, tx) = (holder.clone(), tx.clone());
            d.submit(
                0,
                Request::Read {
                    offset: 0,
                    len: 4096,
                },
                Box::new(move |r| {
                    let e = holder.lock().map(|mut h| h.take()).ok().flatten();
                    drop(e);
                    let _ = tx.send((0, r.is_ok()));
                }),
            );
        }
        // Meanwhile a client keeps submitting to both cores until it is refused.
        let refused = Arc::new(AtomicBool::new(false));
        let mut n = 1u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !refused.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            let (tx, refused) = (tx.clone(), refused.clone());
            let i = n;
            d.submit(
                i as usize,
                Request::Read {
                    offset: (i % 1000) * 4096,
                    len: 4096,
                },
                Box::new(move |r| {
                    if let Err(e) = &r {
                        assert_eq!(e.errno, libc::ESHUTDOWN, "{e}");
                        refused.store(true, Ordering::SeqCst);
                    }
                    let _ = tx.send((i, r.is_ok()));
                }),
            );
            n += 1;
        }
        drop(tx);
        // Close must return: it waits for every accepted request, so a dropped one hangs it.
        let (ctx, crx) = mpsc::channel();
        let closer = {
            let d = d.clone();
            std::thread::spawn(move || {
                let _ = ctx.send(d.close().map_err(|e| e.to_string()));
            })
        };
        let closed = crx.recv_timeout(Duration::from_secs(20));
        assert!(
            closed.is_ok(),
            "round {round}: Disk::close did not return: a request was dropped without an answer"
        );
        closer.join().expect("closer");
        let mut answers = vec![0u32; n as usize];
        while let Ok((i, _)) = rx.recv_timeout(Duration::from_secs(5)) {
            answers[i as usize] += 1;
        }
        for (i, &c) in answers.iter().enumerate() {
            assert_eq!(
                c, 1,
                "round {round}: request {i} of {n} answered {c} times (must be exactly once)"
            );
        }
        drop(holder);
    }
}
