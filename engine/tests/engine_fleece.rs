//! The point-in-time view (copy-before-write into a scratch file) on a real engine: after
//! `begin_fleece`, writes, zeroes and trims of the live disk (aligned or not, over raw image,
//! base and zeros) leave the view's bytes exactly the image of the instant, also for view reads
//! running while the writes do; the live disk has every write; `end` removes the scratch and
//! later writes copy nothing; bad calls are refused with an error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use addcow_engine::{Disk, FleeceView, Request, FLEECE_CHUNK};
use addcow_engine_testkit::engine::seed;
use addcow_engine_testkit::harness::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn read_view(v: &FleeceView, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let n = (len - out.len() as u64).min(MIB);
        out.extend(
            v.read_at(off + out.len() as u64, n as u32)
                .expect("view read"),
        );
    }
    out
}

fn first_diff(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// One random write-like request of `[0, size)`; applies it to `model`.
fn random_op(rng: &mut SmallRng, disk: &Disk, model: &mut Model, n: u64, size: u64) {
    let len = match rng.gen_range(0..4) {
        0 => rng.gen_range(1..600),
        1 => 4096 * rng.gen_range(1..4),
        2 => rng.gen_range(1..3 * FLEECE_CHUNK),
        _ => rng.gen_range(FLEECE_CHUNK..600 << 10),
    };
    let off = rng.gen_range(0..size - len);
    let (off, len) = if rng.gen_bool(0.5) {
        (off / 512 * 512, len.div_ceil(512) * 512)
    } else {
        (off, len)
    };
    let len = len.min(size - off);
    let req = match rng.gen_range(0..4) {
        0 | 1 => {
            let data = payload(n, len as usize);
            model.write(off, &data);
            Request::Write {
                offset: off,
                data: addcow_engine::IoBuf::from_slice(&data).into(),
                fua: false,
            }
        }
        2 => {
            model.zero(off, len);
            Request::WriteZeroes {
                offset: off,
                len,
                punch: rng.gen_bool(0.5),
                fua: false,
            }
        }
        _ => {
            model.zero(off, len);
            Request::Trim {
                offset: off,
                len,
                fua: false,
            }
        }
    };
    disk.request(req).expect("live write");
}

#[test]
fn writes_zeroes_and_trims_leave_the_view_at_its_instant() {
    // 8 MiB over a 5 MiB base: base bytes, written bytes and zeros past the base.
    let size = 8 * MIB;
    let f = fixture(size, 5 * MIB);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    let mut model = Model::new(&f);
    let mut rng = SmallRng::seed_from_u64(seed("FLEECE_SEED"));
    for n in 0..40 {
        random_op(&mut rng, &d, &mut model, n, size);
    }
    let instant = model.bytes.clone();
    let scratch = f.dir.path().join("disk.backup-scratch");
    let view = d.begin_fleece(&scratch).expect("begin");
    assert!(scratch.exists());
    assert_eq!(view.size(), size);

    // Readers of the view run while the writes do; every read must be the instant's bytes.
    let view = Arc::new(view);
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let (view, stop, instant) = (Arc::clone(&view), Arc::clone(&stop), instant.clone());
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(i);
                let mut reads = 0u64;
                while !stop.load(Ordering::SeqCst) || reads < 20 {
                    let len = rng.gen_range(1..(300u64 << 10));
                    let off = rng.gen_range(0..size - len);
                    let got = view.read_at(off, len as u32).expect("view read");
                    let want = &instant[off as usize..(off + len) as usize];
                    if let Some(i) = first_diff(&got, want) {
                        panic!("view byte {} is not the instant's", off + i as u64);
                    }
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for n in 100..400 {
        random_op(&mut rng, &d, &mut model, n, size);
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.join().expect("reader") >= 20);
    }
    let got = read_view(&view, 0, size);
    if let Some(i) = first_diff(&got, &instant) {
        panic!("view byte {i} differs from the instant after the writes");
    }
    // The live disk has every write, and the view counted its copies.
    model.check(&d);
    let stats = view.stats();
    assert!(
        stats.chunks_copied > 0 && stats.copy_failures == 0,
        "{stats:?}"
    );
    assert!(stats.chunks_copied <= size.div_ceil(FLEECE_CHUNK));

    // Block status of the view: zeros only where the instant reads zeros.
    for e in view.allocation(0, size) {
        if e.kind == addcow_engine::ExtentKind::Zero {
            let r = &instant[e.offset as usize..(e.offset + e.len) as usize];
            assert!(r.iter().all(|&b| b == 0), "view says zero at {}", e.offset);
        }
    }

    let view = Arc::into_inner(view).expect("one owner");
    view.end().expect("end");
    assert!(!scratch.exists(), "end removes the scratch");
    // After the end, writes copy nothing: no scratch comes back, and a new view starts empty.
    for n in 500..520 {
        random_op(&mut rng, &d, &mut model, n, size);
    }
    assert!(!scratch.exists());
    model.check(&d);
    let again = d.begin_fleece(&scratch).expect("a new view after the end");
    assert_eq!(again.stats().chunks_copied, 0);
    let got = read_view(&again, 0, size);
    assert!(
        first_diff(&got, &model.bytes).is_none(),
        "a new view is the new instant"
    );
    drop(again);
    assert!(!scratch.exists(), "dropping a view ends it");
    d.close().expect("close");
}

#[test]
fn writes_from_many_threads_racing_on_the_same_chunks() {
    // Small writes from 4 threads hammering few chunks: each chunk is copied once, before any
    // of them changes it.
    let size = 2 * MIB;
    let f = fixture(size, size);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    let instant = Model::new(&f).bytes;
    let scratch = f.dir.path().join("s");
    let view = d.begin_fleece(&scratch).expect("begin");
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let d = d.clone();
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t + 7);
                for n in 0..200 {
                    let off = rng.gen_range(0..8 * FLEECE_CHUNK - 700);
                    let data = payload(t * 1000 + n, rng.gen_range(1..700));
                    d.write_at(off, &data, false).expect("write");
                }
            })
        })
        .collect();
    for _ in 0..50 {
        let got = read_view(&view, 0, 8 * FLEECE_CHUNK);
        assert!(first_diff(&got, &instant[..got.len()]).is_none());
    }
    for w in writers {
        w.join().expect("writer");
    }
    let got = read_view(&view, 0, size);
    assert!(first_diff(&got, &instant).is_none());
    assert_eq!(view.stats().chunks_copied, 8);
    view.end().expect("end");
    d.close().expect("close");
}

#[test]
fn bad_calls_are_refused() {
    let f = fixture(MIB, 0);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let scratch = f.dir.path().join("s");
    // A stale scratch (a crash during a backup) is replaced.
    std::fs::write(&scratch, b"stale").expect("stale scratch");
    let view = d
        .begin_fleece(&scratch)
        .expect("begin over a stale scratch");
    assert_eq!(std::fs::metadata(&scratch).expect("scratch").len(), MIB);
    let err = d.begin_fleece(&f.dir.path().join("t")).unwrap_err();
    assert!(err.to_string().contains("already active"), "{err}");
    assert!(
        !f.dir.path().join("t").exists(),
        "a refused begin creates nothing"
    );
    // The view is read-only and bounded.
    let write = Request::Write {
        offset: 0,
        data: addcow_engine::IoBuf::from_slice(&[0; 512]).into(),
        fua: false,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    view.submit(0, write, Box::new(move |r| tx.send(r).expect("send")));
    assert_eq!(rx.recv().expect("answer").unwrap_err().errno, libc::EPERM);
    let err = view.read_at(MIB - 512, 1024).unwrap_err();
    assert_eq!(err.errno, libc::EINVAL);
    // Never a file of the disk itself, nor something other than a regular file.
    view.end().expect("end");
    let image = d.opened_files()[1].file.path.clone();
    let before = std::fs::metadata(&image).expect("raw image").len();
    for p in [f.overlay.clone(), image.clone(), f.dir.path().to_path_buf()] {
        let err = d.begin_fleece(&p).unwrap_err();
        assert!(err.to_string().contains("not replaced"), "{err}");
    }
    assert_eq!(std::fs::metadata(&image).expect("raw image").len(), before);
    // Nor the disk's dirty-bitmaps sidecar: by name, or by a link with another name.
    d.bitmaps().add("b", 65536, true, true).expect("bitmap");
    let sidecar = d.bitmaps().path().to_path_buf();
    let side_before = std::fs::read(&sidecar).expect("sidecar");
    let link = f.dir.path().join("link.scratch");
    std::fs::hard_link(&sidecar, &link).expect("link");
    for p in [
        sidecar.clone(),
        link.clone(),
        f.dir.path().join("x.bitmaps.tmp"),
    ] {
        let err = d.begin_fleece(&p).unwrap_err();
        assert!(err.to_string().contains("sidecar"), "{err}");
    }
    assert_eq!(std::fs::read(&sidecar).expect("sidecar"), side_before);
    std::fs::remove_file(&link).expect("unlink");
    assert!(!d.fleece_active());
    let view = d.begin_fleece(&scratch).expect("begin");
    assert!(d.fleece_active());
    // A scratch in a missing directory: a clear error naming it, nothing installed.
    view.end().expect("end");
    let bad = f.dir.path().join("no/such/dir/s");
    let err = d.begin_fleece(&bad).unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
    d.begin_fleece(&scratch)
        .expect("begin after a failed begin")
        .end()
        .expect("end");
    d.close().expect("close");
    // A read-only disk has nothing to freeze against.
    let ro = e
        .open(
            &f.overlay,
            addcow_engine::DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("open read-only");
    assert!(ro.begin_fleece(&scratch).is_err());
    ro.close().expect("close");
}

/// A failed copy fails the guest's write and leaves the live disk and the view untouched.
#[cfg(feature = "fault-injection")]
#[test]
fn a_failed_copy_fails_the_write_and_changes_nothing() {
    use addcow_engine::io::faults::{FaultAction, FaultFile, FaultOp, FaultPlan, FaultRule};
    let size = MIB;
    let f = fixture(size, size);
    let plan = FaultPlan::new();
    let mut cfg = config(1);
    cfg.faults = Some(plan.clone());
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    let mut model = Model::new(&f);
    let instant = model.bytes.clone();
    let view = d.begin_fleece(&f.dir.path().join("s")).expect("begin");
    plan.add(
        FaultRule::new(
            FaultFile::Scratch,
            FaultOp::Write,
            FaultAction::Fail(libc::EIO),
        )
        .times(1),
    );
    let err = d.write_at(4096, &payload(1, 8192), false).unwrap_err();
    assert_eq!(err.errno, libc::EIO, "{err}");
    assert!(err.op.contains("scratch"), "{err}");
    assert_eq!(view.stats().copy_failures, 1);
    model.check(&d); // the live disk did not take the write
                     // The next write copies the chunk and goes through; the view stays at its instant.
    d.write_at(4096, &payload(2, 8192), false).expect("retry");
    model.write(4096, &payload(2, 8192));
    model.check(&d);
    let got = read_view(&view, 0, size);
    assert!(first_diff(&got, &instant).is_none());
    view.end().expect("end");
    d.close().expect("close");
}

/// The interleaving a view read must survive: it finds a chunk uncopied, then (its core parked
/// there) a write copies the chunk and overwrites it on another core, then the view's live read
/// runs and sees the new bytes. Its re-check after the read must notice the copy and answer the
/// scratch's bytes, the instant's.
#[cfg(feature = "fault-injection")]
#[test]
fn a_view_read_overtaken_by_a_copy_and_a_write_answers_the_instant() {
    use addcow_engine::io::faults::FaultPlan;
    let size = MIB;
    let f = fixture(size, 0);
    let plan = FaultPlan::new();
    let mut cfg = config(2);
    cfg.faults = Some(plan.clone());
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    d.write_at(0, &[0x11; 8192], false).expect("write before");
    let view = Arc::new(d.begin_fleece(&f.dir.path().join("s")).expect("begin"));
    plan.park_next_view_read();
    let reader = {
        let view = Arc::clone(&view);
        thread::spawn(move || {
            let (tx, rx) = std::sync::mpsc::channel();
            view.submit(
                0,
                Request::Read {
                    offset: 0,
                    len: 8192,
                },
                Box::new(move |r| tx.send(r).expect("send")),
            );
            rx.recv().expect("answer")
        })
    };
    assert!(
        plan.wait_parked(std::time::Duration::from_secs(20)),
        "the view read parked"
    );
    // Core 0 is parked: the write goes to core 1, copies chunk 0 and overwrites it.
    let (tx, rx) = std::sync::mpsc::channel();
    d.submit(
        1,
        Request::Write {
            offset: 0,
            data: addcow_engine::IoBuf::from_slice(&[0x22; 8192]).into(),
            fua: false,
        },
        Box::new(move |r| tx.send(r).expect("send")),
    );
    rx.recv().expect("answer").expect("write");
    assert_eq!(view.stats().chunks_copied, 1);
    plan.release_parked();
    let got = match reader.join().expect("reader").expect("view read") {
        addcow_engine::Done::Read(b) => b.to_vec(),
        other => panic!("unexpected answer {other:?}"),
    };
    assert!(
        got.iter().all(|&b| b == 0x11),
        "the view read answered bytes written after its instant"
    );
    assert_eq!(d.read_at(0, 8192).expect("read"), vec![0x22; 8192]);
    Arc::into_inner(view)
        .expect("one owner")
        .end()
        .expect("end");
    d.close().expect("close");
}
