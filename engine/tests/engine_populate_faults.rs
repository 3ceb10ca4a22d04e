//! POPULATE's failure paths (feature `fault-injection`): a failed base read, a failed raw-image
//! write (ENOSPC) and a failed hole punch each fail that populate with the errno and the
//! operation, set no bit, change nothing the disk reads, and leave the disk usable: a later
//! populate of the same range completes it.
#![cfg(feature = "fault-injection")]

use addcow_engine::io::faults::{FaultAction, FaultFile, FaultOp, FaultPlan, FaultRule};
use addcow_engine::{CacheMode, Engine};
use addcow_engine_testkit::harness::*;

#[test]
fn a_failed_populate_sets_no_bit_and_the_next_one_completes() {
    // 1 MiB disk over a 512 KiB base: the first half is copied, the second half punched.
    let f = fixture(1 << 20, 512 << 10);
    let model = Model::new(&f);
    let plan = FaultPlan::new();
    let mut cfg = config(2);
    cfg.image_cache = CacheMode::Direct;
    cfg.faults = Some(plan.clone());
    let e = Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    for (file, op, errno, what, offset) in [
        (FaultFile::Base, FaultOp::Read, libc::EIO, "read base", 0),
        (
            FaultFile::Image,
            FaultOp::Write,
            libc::ENOSPC,
            "write raw image",
            64 << 10,
        ),
        (
            FaultFile::Image,
            FaultOp::Punch,
            libc::EIO,
            "punch hole in raw image",
            768 << 10,
        ),
    ] {
        plan.add(FaultRule::new(file, op, FaultAction::Fail(errno)));
        let err = d.populate(offset, 64 << 10).expect_err("fault injected");
        assert_eq!((err.errno, err.op), (errno, what), "{err}");
        assert_eq!(plan.fired(), 1, "the fault fired");
        plan.clear();
        assert_eq!(d.allocated_bytes(), 0, "{what}: no bit set");
        assert_eq!(d.stats().bits_set, 0);
        model.check(&d);
    }
    // The disk goes on: the whole disk populates, reads the same, and is complete.
    let mut at = 0;
    while let Some((off, len)) = d.next_clear(at, 256 << 10) {
        d.populate(off, len).expect("populate");
        at = off + len;
    }
    assert!(d.is_complete());
    model.check(&d);
    d.flush().expect("flush");
    d.close().expect("close");
    drop((d, e));
    let e = engine(1);
    let d = open(&e, &f.overlay);
    assert!(d.is_complete(), "complete after reopening");
    model.check(&d);
    d.close().expect("close");
}
