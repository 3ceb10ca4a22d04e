//! End-to-end engine tests on real files and real io_uring: read/write/flush round trips
//! (aligned and not), reopen after close, base fallthrough, zeros past the base's end,
//! write-zeroes and trim, read-only and out-of-range errors, background commit.

use addcow_engine::{Done, ExtentKind, Request};
use addcow_engine_testkit::harness::*;

#[test]
fn aligned_write_flush_reopen_shows_data_and_bits() {
    let f = fixture(4 << 20, 4 << 20);
    let mut model = Model::new(&f);
    {
        let e = engine(2);
        let d = open(&e, &f.overlay);
        assert_eq!(d.size(), 4 << 20);
        model.check(&d); // all from the base
        let data = payload(1, 64 << 10);
        d.write_at(1 << 20, &data, false).expect("write");
        model.write(1 << 20, &data);
        d.flush().expect("flush");
        model.check(&d);
        let ext = d.allocation(0, 4 << 20);
        assert_eq!(
            ext.iter()
                .filter(|x| x.kind == ExtentKind::Image)
                .map(|x| (x.offset, x.len))
                .collect::<Vec<_>>(),
            vec![(1 << 20, 64 << 10)]
        );
        d.close().expect("close");
        e.shutdown().expect("shutdown");
    }
    let e = engine(1);
    let d = open(&e, &f.overlay);
    model.check(&d);
    assert!(d
        .allocation(1 << 20, 64 << 10)
        .iter()
        .all(|x| x.kind == ExtentKind::Image));
    assert_eq!(d.allocation(0, 4096)[0].kind, ExtentKind::Base);
}

#[test]
fn unaligned_writes_merge_with_base_bytes() {
    let f = fixture(1 << 20, 1 << 20);
    let mut model = Model::new(&f);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    // Sub-sector, crossing sectors, crossing 4 KiB units, tiny, at the very end.
    let cases: &[(u64, usize)] = &[
        (7, 100),
        (500, 30),
        (4090, 20),
        (12_345, 9_000),
        (1 << 19, 1),
        ((1 << 20) - 3, 3),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = payload(i as u64 + 10, len);
        d.write_at(off, &data, false).expect("write");
        model.write(off, &data);
        model.check(&d);
    }
    // Unaligned reads of every shape.
    for &(off, len) in &[(1u64, 1u32), (511, 2), (4095, 8193), (12_000, 10_000)] {
        let got = d.read_at(off, len).expect("read");
        assert_eq!(got, &model.bytes[off as usize..off as usize + len as usize]);
    }
    model.check_after_reopen(d, e, &f.overlay);
}

#[test]
fn buffered_cache_mode_round_trips() {
    let f = fixture(1 << 20, 1 << 19);
    let mut model = Model::new(&f);
    let mut cfg = config(1);
    cfg.image_cache = addcow_engine::CacheMode::Buffered;
    cfg.base_cache = addcow_engine::CacheMode::Buffered;
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    for (i, &(off, len)) in [(3u64, 700usize), (8192, 4096), (600_000, 5)]
        .iter()
        .enumerate()
    {
        let data = payload(i as u64, len);
        d.write_at(off, &data, false).expect("write");
        model.write(off, &data);
    }
    model.check(&d);
    d.close().expect("close");
}

#[test]
fn base_fallthrough_and_zeros_past_base_end() {
    // The base ends in the middle of a sector.
    let f = fixture(1 << 20, 300_000 + 77);
    let model = Model::new(&f);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    model.check(&d);
    let got = d.read_at(299_000, 4000).expect("read across the base end");
    assert_eq!(got, &model.bytes[299_000..303_000]);
    assert!(got[1077..].iter().all(|&b| b == 0));
    let ext = d.allocation(0, 1 << 20);
    assert_eq!(ext.last().map(|x| x.kind), Some(ExtentKind::Zero));
    // No base at all: zeros everywhere.
    let g = fixture(64 << 10, 0);
    let d2 = open(&e, &g.overlay);
    assert!(d2
        .read_at(0, 64 << 10)
        .expect("read")
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn write_zeroes_and_trim_never_reexpose_base() {
    let f = fixture(2 << 20, 2 << 20);
    let mut model = Model::new(&f);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    // Aligned trim, unaligned trim, zeroes with and without holes, over base and over data.
    let data = payload(3, 128 << 10);
    d.write_at(256 << 10, &data, false).expect("write");
    model.write(256 << 10, &data);
    let ops: &[(u64, u64, Option<bool>)] = &[
        (0, 64 << 10, None),                  // trim
        (100_001, 50_000, None),              // unaligned trim over base
        (250 << 10, 20 << 10, Some(true)),    // zeroes (punch) over base + data
        (300_007, 70_000, Some(false)),       // zeroes without holes, unaligned
        ((2 << 20) - 1000, 1000, Some(true)), // up to the very end
        (777, 10, Some(false)),               // inside one sector
    ];
    for (i, &(off, len, zero)) in ops.iter().enumerate() {
        let req = match zero {
            None => Request::Trim {
                offset: off,
                len,
                fua: i % 2 == 0,
            },
            Some(punch) => Request::WriteZeroes {
                offset: off,
                len,
                punch,
                fua: false,
            },
        };
        assert!(matches!(d.request(req), Ok(Done::Ok)), "op {i}");
        model.zero(off, len);
        model.check(&d);
        assert!(
            d.allocation(off, len)
                .iter()
                .all(|x| x.kind == ExtentKind::Image),
            "zeroed range is allocated (bits set), op {i}"
        );
    }
    model.check_after_reopen(d, e, &f.overlay);
}

#[test]
fn read_only_disks_refuse_writes_with_eperm() {
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(1);
    let d = e
        .open(
            &f.overlay,
            addcow_engine::DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("open read-only");
    assert!(d.read_only());
    let err = d
        .write_at(0, &[1; 512], false)
        .expect_err("write must fail");
    assert_eq!(err.errno, libc::EPERM);
    for req in [
        Request::Trim {
            offset: 0,
            len: 512,
            fua: false,
        },
        Request::WriteZeroes {
            offset: 0,
            len: 512,
            punch: true,
            fua: false,
        },
    ] {
        assert_eq!(d.request(req).expect_err("refused").errno, libc::EPERM);
    }
    d.flush().expect("flush of a read-only disk is a no-op");
    assert_eq!(d.read_at(0, 512).expect("read")[0], base_byte(0));
}

#[test]
fn out_of_range_requests_fail_and_the_engine_keeps_serving() {
    let f = fixture(1 << 20, 0);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    assert_eq!(
        d.read_at((1 << 20) - 10, 11).expect_err("read").errno,
        libc::EINVAL
    );
    assert_eq!(
        d.read_at(u64::MAX - 1, 10).expect_err("read").errno,
        libc::EINVAL
    );
    assert_eq!(
        d.write_at((1 << 20) - 10, &[1; 11], false)
            .expect_err("write")
            .errno,
        libc::ENOSPC
    );
    assert_eq!(
        d.request(Request::Trim {
            offset: 1 << 20,
            len: 1,
            fua: false
        })
        .expect_err("trim")
        .errno,
        libc::ENOSPC
    );
    assert!(d.read_at(0, 0).expect("empty read").is_empty());
    let big = fixture(512 << 20, 0);
    let dbig = open(&e, &big.overlay);
    let err = dbig
        .read_at(0, addcow_engine::io::MAX_READ + 1)
        .expect_err("too large");
    assert_eq!(err.errno, libc::EINVAL);
    d.write_at(0, &[9; 10], true).expect("fua write");
    assert_eq!(d.read_at(0, 10).expect("read"), vec![9; 10]);
    d.close().expect("close");
    assert_eq!(d.read_at(0, 1).expect_err("closed").errno, libc::ESHUTDOWN);
}

#[test]
fn background_commit_persists_without_flush() {
    let f = fixture(1 << 20, 1 << 20);
    let mut cfg = config(1);
    cfg.commit_delay = Some(std::time::Duration::from_millis(1));
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    d.write_at(8192, &[5; 4096], false).expect("write");
    // Wait until the background commit wrote the bit, without any FLUSH. The deadline is no
    // speed target (the commit is due after 1 ms): it only turns a commit that never comes
    // into a failure instead of a hang.
    let meta_bit_set = || {
        let m = std::fs::read(&f.overlay).expect("read meta");
        m[2560 + 2] & 1 != 0 // sector 16 = byte 2, bit 0
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !meta_bit_set() {
        assert!(
            std::time::Instant::now() < deadline,
            "no background commit persisted the bit of an unflushed write within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    d.close().expect("close");
}

#[test]
fn a_panicking_completion_does_not_stop_the_core() {
    let f = fixture(64 << 10, 0);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let (tx, rx) = std::sync::mpsc::channel();
    d.submit(
        0,
        Request::Read {
            offset: 0,
            len: 512,
        },
        Box::new(move |_| {
            let _ = tx.send(());
            panic!("callback bug");
        }),
    );
    rx.recv().expect("callback ran");
    d.write_at(0, &[3; 512], false).expect("core still serves");
    assert_eq!(d.read_at(0, 512).expect("read"), vec![3; 512]);
    d.close().expect("close");
}

/// Memory lent to the engine in the test below: 4096-aligned, freed when the last `Arc` goes.
struct Lent {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the allocation is owned by this value and only accessed through raw pointers.
unsafe impl Send for Lent {}
// SAFETY: as above; no shared references into the bytes are handed out.
unsafe impl Sync for Lent {}

impl Drop for Lent {
    fn drop(&mut self) {
        // SAFETY: allocated with exactly this layout in `lend`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn lend(len: usize) -> std::sync::Arc<Lent> {
    let layout = std::alloc::Layout::from_size_align(len, addcow_engine::io::BUF_ALIGN).unwrap();
    // SAFETY: non-zero size.
    let raw = unsafe { std::alloc::alloc_zeroed(layout) };
    let ptr = std::ptr::NonNull::new(raw).expect("allocation");
    std::sync::Arc::new(Lent { ptr, layout })
}

fn borrowed(lent: &std::sync::Arc<Lent>, len: usize) -> addcow_engine::DataBuf {
    assert!(len <= lent.layout.size());
    // SAFETY: `lent` is 4096-aligned, valid for `len` bytes while the keeper (a clone of the
    // Arc) lives, and the test touches it only after the engine handed the buffer back.
    unsafe { addcow_engine::LentBuf::new(lent.ptr, len, lent.clone()) }.into()
}

fn submit_wait(d: &addcow_engine::Disk, req: Request) -> Done {
    let (tx, rx) = std::sync::mpsc::channel();
    d.submit(
        0,
        req,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv().expect("answer").expect("request")
}

#[test]
fn borrowed_buffers_are_read_into_and_written_from_and_kept_until_answered() {
    let f = fixture(4 << 20, 2 << 20);
    let mut model = Model::new(&f);
    let e = engine(1);
    let d = open(&e, &f.overlay);
    let lent = lend(256 << 10);
    // Whole units, unaligned disk offsets, across the base's end.
    let cases: &[(u64, usize)] = &[
        (1 << 20, 64 << 10),
        (7, 1000),
        ((2 << 20) - 4096, 12288),
        (3 << 20, 4096),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = payload(i as u64 + 70, len);
        // SAFETY: nothing else touches the lent bytes while no request is in flight.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), lent.ptr.as_ptr(), len) };
        let back = match submit_wait(
            &d,
            Request::Write {
                offset: off,
                data: borrowed(&lent, len),
                fua: false,
            },
        ) {
            Done::Written(b) => b,
            other => panic!("{other:?}"),
        };
        assert!(back.is_borrowed());
        assert_eq!(std::sync::Arc::strong_count(&lent), 2, "kept while held");
        drop(back);
        assert_eq!(
            std::sync::Arc::strong_count(&lent),
            1,
            "released with the buffer"
        );
        model.write(off, &data);
    }
    d.flush().expect("flush");
    for &(off, len) in cases {
        for (lo, n) in [(off, len), (off.saturating_sub(512), len + 1024)] {
            let n = n.min((4 << 20) - lo as usize);
            // SAFETY: no request is in flight.
            unsafe { std::ptr::write_bytes(lent.ptr.as_ptr(), 0x5c, n) };
            let buf = match submit_wait(
                &d,
                Request::ReadInto {
                    offset: lo,
                    buf: borrowed(&lent, n),
                },
            ) {
                Done::Filled(b) => b,
                other => panic!("{other:?}"),
            };
            let addcow_engine::DataBuf::Lent(buf) = buf else {
                panic!("a lent buffer came back owned");
            };
            assert!(std::ptr::eq(buf.as_ptr(), lent.ptr.as_ptr()));
            drop(buf);
            // SAFETY: the engine answered and dropped its handle; n bytes are in the allocation.
            let got = unsafe { std::slice::from_raw_parts(lent.ptr.as_ptr(), n) };
            assert!(
                got == &model.bytes[lo as usize..lo as usize + n],
                "read {n} at {lo} into lent memory"
            );
        }
    }
    assert_eq!(std::sync::Arc::strong_count(&lent), 1);
    d.close().expect("close");
    e.shutdown().expect("shutdown");
}
