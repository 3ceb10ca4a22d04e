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
