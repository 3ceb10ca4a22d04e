//! Unaligned writes through read-modify-write: only the partial head and tail units bounce
//! through daemon memory (the whole units between them are written from the caller's buffer),
//! and the disk reads back what was written, with the bits of exactly the units written.
//!
//! One test in its own binary: it measures the process-wide heap-buffer count around requests.

use addcow_engine::{CacheMode, Done, Engine, EngineConfig, ExtentKind, IoBuf, Request};
use addcow_engine_testkit::harness::*;

const MIB: u64 = 1 << 20;

fn write(d: &addcow_engine::Disk, offset: u64, data: IoBuf) {
    let (tx, rx) = std::sync::mpsc::channel();
    d.submit(
        0,
        Request::Write {
            offset,
            data: data.into(),
            fua: false,
        },
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    match rx.recv().expect("answer") {
        Ok(Done::Written(_)) => {}
        other => panic!("write of at {offset}: {other:?}"),
    }
}

#[test]
fn unaligned_large_writes_bounce_only_their_edge_units_and_read_back_exactly() {
    // Buffered: the read-modify-write unit is the sector and any payload byte can be written
    // from, so every case below read-modify-writes only its edges. Direct: the same data
    // through O_DIRECT, where a payload byte the memory alignment refuses bounces whole.
    for cache in [CacheMode::Buffered, CacheMode::Direct] {
        run(cache);
    }
}

fn run(cache: CacheMode) {
    let f = fixture(32 * MIB, 12 * MIB);
    let mut model = Model::new(&f);
    let e = Engine::start(EngineConfig {
        image_cache: cache,
        ..config(1)
    })
    .expect("start engine");
    let d = open(&e, &f.overlay);
    // (offset, length): head and tail in different units, across the base's end; head only;
    // tail only; inside one unit; whole sectors.
    let cases: &[(u64, usize)] = &[
        (12345, 9 * MIB as usize + 1000),
        (10 * MIB + 100, 4 * MIB as usize - 100),
        (16 * MIB, 3 * MIB as usize + 1536 + 17),
        (20 * MIB + 1024 + 3, 200),
        (24 * MIB + 512, 2 * MIB as usize),
        (26 * MIB + 12344, MIB as usize + 1000),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = payload(i as u64 + 1, len);
        let buf = IoBuf::from_slice(&data);
        let before = IoBuf::heap_bytes_allocated();
        write(&d, offset, buf);
        let bounced = IoBuf::heap_bytes_allocated() - before;
        // Two edge units (arena slots, or the heap when the arena is short), never the request.
        assert!(
            cache == CacheMode::Direct || bounced <= 2 * 64 * 1024,
            "{cache:?}: write of {len} at {offset}: {bounced} bytes of heap buffers allocated for it"
        );
        model.write(offset, &data);
    }
    d.flush().expect("flush");
    model.check(&d);
    // Bits: every sector written is set; nothing outside the units the writes covered is.
    let image: Vec<(u64, u64)> = d
        .allocation(0, f.size)
        .iter()
        .filter(|x| x.kind == ExtentKind::Image)
        .map(|x| (x.offset, x.offset + x.len))
        .collect();
    for &(offset, len) in cases {
        let end = offset + len as u64;
        let (lo, hi) = (offset / 512 * 512, end.div_ceil(512) * 512);
        assert!(
            image.iter().any(|&(s, e)| s <= lo && hi <= e),
            "{cache:?}: write of {len} at {offset}: its sectors are not all set: {image:?}"
        );
    }
    for &(s, e) in &image {
        let covered = cases.iter().any(|&(offset, len)| {
            let end = offset + len as u64;
            s >= offset / 4096 * 4096 && e <= end.div_ceil(4096) * 4096
        });
        assert!(
            covered,
            "{cache:?}: extent [{s}, {e}) set outside every write: {image:?}"
        );
    }
    model.check_after_reopen(d, e, &f.overlay);
}
