//! Windows where a preempted core must not lose or misplace data, reached on purpose: the fault
//! plan parks one core at the point a preemption would hit (feature `fault-injection`).
//!
//! * Publication of bits across cores (DESIGN invariant 3, "across cores"): a FLUSH must carry
//!   the bits of every write answered before it, even when another core set those bits first
//!   and has not marked their metadata blocks yet.
//! * Copy-on-read after its read was answered: a close (which a snapshot or resize switch does
//!   to the old disk) must wait for it, or it writes the disk after its final commit.
#![cfg(feature = "fault-injection")]

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use addcow_engine::io::faults::FaultPlan;
use addcow_engine::{Disk, DiskOptions, Engine, IoBuf, Request};
use addcow_engine_testkit::harness::*;

const HEADER: u64 = 2560;
const WAIT: Duration = Duration::from_secs(20);

fn parking_engine(cores: usize) -> (Engine, std::sync::Arc<FaultPlan>) {
    let plan = FaultPlan::new();
    let mut cfg = config(cores);
    cfg.faults = Some(plan.clone());
    (Engine::start(cfg).expect("engine"), plan)
}

/// The fixture's overlay opened with copy-on-read.
fn open_copy_on_read(e: &Engine, f: &Fixture) -> Disk {
    e.open(
        &f.overlay,
        DiskOptions {
            copy_on_read: true,
            ..DiskOptions::default()
        },
    )
    .expect("open with copy-on-read")
}

/// Whether the bit of `sector` is set in the metadata file on disk.
fn bit_on_disk(overlay: &Path, sector: u64) -> bool {
    let meta = std::fs::read(overlay).expect("read metadata");
    meta[(HEADER + sector / 8) as usize] & (1 << (sector % 8)) != 0
}

/// Submits `req` on `core`; the receiver gets whether it succeeded.
fn submit(d: &Disk, core: usize, req: Request) -> mpsc::Receiver<Result<(), String>> {
    let (tx, rx) = mpsc::channel();
    d.submit(
        core,
        req,
        Box::new(move |r| {
            let _ = tx.send(r.map(|_| ()).map_err(|e| e.to_string()));
        }),
    );
    rx
}

fn write(offset: u64, data: &[u8]) -> Request {
    Request::Write {
        offset,
        data: IoBuf::from_slice(data).into(),
        fua: false,
    }
}

/// Runs: core 0 publishes write A and is parked before marking; core 1 writes B over the same
/// sectors (its bits are already set) and is answered; a FLUSH on core 1 is answered. Returns
/// whether the sectors' bit was on disk when the FLUSH was answered (A still parked).
fn flush_with_a_publication_parked(offset: u64, second: Request) -> bool {
    let f = fixture(8 << 20, 8 << 20);
    let (e, plan) = parking_engine(2);
    let d = open(&e, &f.overlay);
    let sector = offset / 512;
    plan.park_next_publication(sector);
    let a = submit(&d, 0, write(offset, &payload(1, 4096)));
    assert!(
        plan.wait_parked(WAIT),
        "write A's publication never reached the parking point"
    );
    let b = submit(&d, 1, second);
    b.recv_timeout(WAIT)
        .expect("write B answered while A is parked")
        .expect("write B");
    submit(&d, 1, Request::Flush)
        .recv_timeout(WAIT)
        .expect("FLUSH answered while A is parked")
        .expect("FLUSH");
    let durable = bit_on_disk(&f.overlay, sector);
    plan.release_parked();
    a.recv_timeout(WAIT)
        .expect("write A answered")
        .expect("write A");
    d.close().expect("close");
    durable
}

#[test]
fn a_flush_carries_bits_another_core_set_first_and_has_not_marked() {
    let durable = flush_with_a_publication_parked(64 << 10, write(64 << 10, &payload(2, 4096)));
    assert!(
        durable,
        "write B was answered and flushed, but its sectors' bit (set first by the parked write \
         A, not yet marked) was not on disk: a crash would read the base there"
    );
}

#[test]
fn a_flush_carries_bits_of_a_partly_overlapping_write() {
    // B covers A's sectors and the next 4 KiB: its set_range changes bits of the next
    // metadata block only (bitmap byte 1536 starts block 1 of the `.add-cow` file), but the block
    // of the sectors A set first must be carried too.
    let a = 12_280 * 512;
    let durable = flush_with_a_publication_parked(a, write(a, &payload(3, 8 << 10)));
    assert!(
        durable,
        "a partly overlapping write B was flushed without the bit A set first"
    );
}

#[test]
fn a_close_waits_for_a_copy_on_read_admitted_before_it() {
    let f = fixture(1 << 20, 1 << 20);
    // Two cores: the final commit of the close can run on the core that is not parked, so a
    // close that does not wait for the copy-up completes while it is parked.
    let (e, plan) = parking_engine(2);
    let d = open_copy_on_read(&e, &f);
    plan.park_next_copy_up();
    let (offset, len) = (128 << 10, 64 << 10);
    let read = d.read_at(offset, len).expect("read of the base");
    assert_eq!(
        read[..16],
        (offset..offset + 16).map(base_byte).collect::<Vec<_>>()[..]
    );
    assert!(plan.wait_parked(WAIT), "the copy-on-read never started");
    // The read is answered and its copy-up is parked on the core: a close must wait for it.
    let closer = {
        let d = d.clone();
        std::thread::spawn(move || d.close())
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(closer.join());
    });
    let closed_while_parked = rx.recv_timeout(Duration::from_secs(2)).is_ok();
    plan.release_parked();
    if !closed_while_parked {
        rx.recv_timeout(WAIT)
            .expect("close returned after the copy-up")
            .expect("close thread")
            .expect("close");
    }
    assert!(
        !closed_while_parked,
        "the disk closed (final commit, locks released) while an admitted copy-on-read was \
         still to write it"
    );
    // The copy-up was carried by the final commit: its bits are on disk.
    for sector in [offset / 512, (offset + u64::from(len)) / 512 - 1] {
        assert!(
            bit_on_disk(&f.overlay, sector),
            "sector {sector} copied up before the close is not set on disk"
        );
    }
}

/// A disk switch quiesces the old disk before its last flush: `quiesce` waits for a
/// copy-on-read admitted before it (which would otherwise set bits after the flush, and have the
/// close commit them into an overlay that is now a read-only base or another process's) and
/// refuses new ones (reads are still answered), until `resume`.
#[test]
fn quiesce_waits_for_an_admitted_copy_on_read_and_refuses_new_ones() {
    let f = fixture(1 << 20, 1 << 20);
    // Two cores: A's copy-up parks one, B is read on the other.
    let (e, plan) = parking_engine(2);
    let d = open_copy_on_read(&e, &f);
    let len = 64 << 10;
    let (a, b, c) = (128 << 10, 384 << 10, 640 << 10);
    let copied = move |d: &Disk, offset: u64| {
        d.allocation(offset, u64::from(len))
            .iter()
            .all(|x| x.kind == addcow_engine::ExtentKind::Image)
    };
    plan.park_next_copy_up();
    let read_on = |core: usize, offset: u64| {
        submit(&d, core, Request::Read { offset, len })
            .recv_timeout(WAIT)
            .expect("answered")
    };
    read_on(0, a).expect("read A of the base");
    assert!(
        plan.wait_parked(WAIT),
        "the copy-on-read of A never started"
    );

    // A's copy-up is admitted and parked on the core.
    let (tx, quiesced) = mpsc::channel();
    {
        let d = d.clone();
        std::thread::spawn(move || {
            d.quiesce();
            let _ = tx.send(copied(&d, a));
        });
    }
    wait_until(|| d.is_quiesced());
    // A read while quiesced is answered, and its copy-up is refused.
    read_on(1, b).expect("read B while quiesced");
    assert!(
        quiesced.try_recv().is_err(),
        "quiesce returned while an admitted copy-on-read was still to set its bits"
    );
    plan.release_parked();
    let a_copied = quiesced.recv_timeout(WAIT).expect("quiesce returns");
    assert!(
        a_copied,
        "quiesce returned before the admitted copy-on-read of A set its bits"
    );
    assert!(
        !copied(&d, b),
        "a copy-on-read started while the disk was quiesced"
    );
    d.flush().expect("flush while quiesced");
    d.resume();
    assert!(!d.is_quiesced());
    read_on(1, c).expect("read C after resume");
    wait_until(|| copied(&d, c));
    d.close().expect("close");
}

/// Polls `cond` until it holds (panics after [`WAIT`]).
fn wait_until(cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
