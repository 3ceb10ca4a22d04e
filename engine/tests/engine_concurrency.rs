//! Concurrency: overlapping sub-sector writes from many threads and cores never lose bytes
//! outside their overlap (DESIGN invariant 4), and a FLUSH through one clone of a disk covers
//! writes answered through another clone on another core (multi-conn).

use std::sync::mpsc;

use addcow_engine::{Done, Request};
use addcow_engine_testkit::harness::*;

#[test]
fn overlapping_subsector_writes_keep_every_writers_bytes() {
    let f = fixture(1 << 20, 1 << 20);
    let mut model = Model::new(&f);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    const WRITERS: u64 = 7;
    const SECTORS: u64 = 96;
    // Writer t owns bytes [t*70, t*70+60) of every sector: disjoint bytes, same sectors, and
    // gaps whose base bytes must survive every read-modify-write.
    let threads: Vec<_> = (0..WRITERS)
        .map(|t| {
            let d = d.clone();
            let e = e.clone();
            std::thread::spawn(move || {
                let (tx, rx) = mpsc::channel();
                // Submit everything first so many writes to one sector are in flight at once.
                for i in 0..SECTORS {
                    let s = (i * 37 + t * 11) % SECTORS;
                    let mut buf = e.alloc_buf(60);
                    buf.copy_from_slice(&payload(t * 1000 + s, 60));
                    let tx = tx.clone();
                    d.submit(
                        (t + i) as usize,
                        Request::Write {
                            offset: s * 512 + t * 70,
                            data: buf.into(),
                            fua: false,
                        },
                        Box::new(move |r| {
                            let _ = tx.send(r.map(|_| ()));
                        }),
                    );
                }
                for _ in 0..SECTORS {
                    rx.recv().expect("answer").expect("write");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    for t in 0..WRITERS {
        for s in 0..SECTORS {
            model.write(s * 512 + t * 70, &payload(t * 1000 + s, 60));
        }
    }
    model.check(&d);
    model.check_after_reopen(d, e, &f.overlay);
}

#[test]
fn overlapping_writes_of_different_shapes_are_serialized_per_range() {
    // A sub-sector write and a large unaligned write that share a sector (disjoint bytes) over
    // unallocated sectors, on two cores at once: both writers' bytes and the base bytes
    // between them must survive.
    let f = fixture(1 << 20, 1 << 20);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    let (tx, rx) = mpsc::channel();
    for round in 0..40u64 {
        let base = round * 8192;
        let small = payload(round, 100);
        let big = payload(round + 500, 3000);
        for (core, (off, data)) in [(base + 10, small), (base + 300, big)]
            .into_iter()
            .enumerate()
        {
            let tx = tx.clone();
            let mut buf = e.alloc_buf(data.len());
            buf.copy_from_slice(&data);
            d.submit(
                core,
                Request::Write {
                    offset: off,
                    data: buf.into(),
                    fua: false,
                },
                Box::new(move |r| {
                    let _ = tx.send(r.map(|_| ()));
                }),
            );
        }
    }
    for _ in 0..80 {
        rx.recv().expect("answer").expect("write");
    }
    for round in 0..40u64 {
        let base = round * 8192;
        let got = d.read_at(base, 4096).expect("read");
        let small = payload(round, 100);
        let big = payload(round + 500, 3000);
        assert_eq!(&got[10..110], &small[..], "round {round}");
        assert_eq!(&got[300..3300], &big[..], "round {round}");
        assert_eq!(
            got[9],
            base_byte(base + 9),
            "round {round}: base byte before"
        );
        assert_eq!(
            got[3300],
            base_byte(base + 3300),
            "round {round}: base byte after"
        );
        assert!(
            (110..300).all(|i| got[i] == base_byte(base + i as u64)),
            "round {round}: gap keeps base"
        );
    }
}

#[test]
fn flush_through_one_clone_covers_writes_answered_through_another() {
    let f = fixture(4 << 20, 0);
    let e = engine(2);
    let d1 = open(&e, &f.overlay);
    let d2 = d1.clone();
    // Writes answered on core 0 through d1...
    for i in 0..16u64 {
        let (tx, rx) = mpsc::channel();
        let mut buf = e.alloc_buf(4096);
        buf.fill(i as u8 + 1);
        d1.submit(
            0,
            Request::Write {
                offset: i * 65536,
                data: buf.into(),
                fua: false,
            },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        assert!(matches!(rx.recv().expect("answer"), Ok(Done::Written(_))));
    }
    // ...then a FLUSH through d2 on core 1 must have written their bits to the metadata file.
    let (tx, rx) = mpsc::channel();
    d2.submit(
        1,
        Request::Flush,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    assert!(matches!(rx.recv().expect("answer"), Ok(Done::Ok)));
    let meta = std::fs::read(&f.overlay).expect("read meta");
    for i in 0..16u64 {
        let sector = i * 65536 / 512;
        let byte = meta[2560 + (sector / 8) as usize];
        assert_eq!(
            byte, 0xff,
            "bits of write {i} committed by the other clone's flush"
        );
    }
    drop(d1);
    d2.close().expect("close");
}

#[test]
fn a_tiny_ring_queues_what_does_not_fit_and_never_overflows() {
    // queue_depth 1 becomes an 8-entry SQ / 16-entry CQ: hundreds of concurrent requests (each
    // several SQEs) must wait in the backlog, under the in-flight cap, and all complete.
    let f = fixture(4 << 20, 2 << 20);
    let mut model = Model::new(&f);
    let mut cfg = config(1);
    cfg.queue_depth = 1;
    let e = addcow_engine::Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    let (tx, rx) = mpsc::channel();
    let mut expected = 0;
    for i in 0..300u64 {
        let offset = (i * 13_001) % ((4 << 20) - 70_000);
        let tx = tx.clone();
        let req = if i % 3 == 0 {
            Request::Read {
                offset,
                len: 70_000,
            }
        } else {
            let data = payload(i, 5_000 + (i as usize % 7) * 100);
            let mut buf = e.alloc_buf(data.len());
            buf.copy_from_slice(&data);
            // Overlapping writes complete in an unknown order: keep them disjoint here.
            let offset = i * 12_000 % (4 << 20);
            if offset + data.len() as u64 > 4 << 20 {
                continue;
            }
            model.write(offset, &data);
            Request::Write {
                offset,
                data: buf.into(),
                fua: i % 10 == 1,
            }
        };
        expected += 1;
        d.submit(
            0,
            req,
            Box::new(move |r| {
                let _ = tx.send(r.map(|_| ()));
            }),
        );
    }
    for _ in 0..expected {
        rx.recv().expect("answer").expect("request");
    }
    model.check(&d);
    d.close().expect("close");
}
