//! Backing chains through the engine, on real files: a raw base under three add-cow layers,
//! each written (whole sectors, partial sectors, ranges overlapping a lower layer's writes and
//! ranges past a lower layer's end), read back through the top layer and compared with a
//! reference built in plain Rust from what was written; the per-range depth compared with the
//! layer each byte must come from; loops, a too-deep chain and a write open of a layer in use
//! refused.

use std::path::{Path, PathBuf};

use addcow_engine::format::{create, CreateOptions, OpenOptions, Overlay, MAX_CHAIN_DEPTH};
use addcow_engine::{DiskOptions, ErrorKind};
use addcow_engine_testkit::harness::{base_byte, engine};

/// One layer as the test built it: its size and the writes made to it, in order.
struct LayerModel {
    size: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

/// The bytes a layer serves: the layer below (clipped to this one's size, zeros past its end),
/// then this layer's writes.
fn view(lower: Option<&[u8]>, layer: &LayerModel) -> Vec<u8> {
    let mut v = vec![0u8; layer.size as usize];
    if let Some(l) = lower {
        let n = l.len().min(v.len());
        v[..n].copy_from_slice(&l[..n]);
    }
    for (off, data) in &layer.writes {
        v[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    v
}

/// The depth (1 = top) that supplies byte `b`: layers top first, each with its size and the
/// sectors it wrote; `raw_size` the bottom raw image's length.
fn depth_of(b: u64, layers: &[&LayerModel], raw_size: u64) -> u32 {
    for (i, l) in layers.iter().enumerate() {
        if b >= l.size {
            return 0;
        }
        let s = b / 512;
        if l.writes
            .iter()
            .any(|(off, d)| s >= off / 512 && s <= (off + d.len() as u64 - 1) / 512)
        {
            return i as u32 + 1;
        }
    }
    if b < raw_size {
        layers.len() as u32 + 1
    } else {
        0
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn new_layer(dir: &Path, name: &str, base: &Path, size: u64) -> PathBuf {
    let overlay = dir.join(format!("{name}.add-cow"));
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base.to_path_buf()),
        size: Some(size),
        ..CreateOptions::default()
    })
    .expect("create layer");
    overlay
}

/// Writes `layer.writes` into the overlay at `path` through the engine and closes it.
fn write_layer(eng: &addcow_engine::Engine, path: &Path, layer: &LayerModel) {
    let d = eng.open(path, DiskOptions::default()).expect("open layer");
    for (off, data) in &layer.writes {
        d.write_at(*off, data, false).expect("write");
    }
    d.close().expect("close");
}

/// The chain of the tests: raw R (odd size), A (larger than R), B (smaller than A), C (larger
/// than B), with models.
struct Chain {
    _dir: tempfile::TempDir,
    raw: Vec<u8>,
    layers: Vec<(PathBuf, LayerModel)>,
}

const K: u64 = 1024;

fn build_chain() -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let raw_size = 200 * K + 100;
    let raw: Vec<u8> = (0..raw_size).map(base_byte).collect();
    let r = dir.path().join("r.img");
    std::fs::write(&r, &raw).unwrap();
    let eng = engine(2);
    // A: 384 KiB over R (R ends 100 bytes into a sector, zeros past it).
    let a = LayerModel {
        size: 384 * K,
        writes: vec![
            (0, pattern(1, 8 * K as usize)),
            (64 * K + 7, pattern(2, 1000)), // partial sectors
            (190 * K + 3, pattern(3, 8 * K as usize)), // up to R's last sector, left clear
            (300 * K + 9, pattern(4, 4 * K as usize)), // past R's end, partial sectors
        ],
    };
    let pa = new_layer(dir.path(), "a", &r, a.size);
    write_layer(&eng, &pa, &a);
    // B: 320 KiB over A (A's last 64 KiB are past B's end).
    let b = LayerModel {
        size: 320 * K,
        writes: vec![
            (4 * K, pattern(5, 8 * K as usize)), // overlaps A's first write
            (64 * K + 300, pattern(6, 100)),     // inside A's partial write's sector
            (128 * K + 1, pattern(7, 511)),      // a partial sector over R
            (310 * K, pattern(8, 10 * K as usize)), // up to B's end
        ],
    };
    let pb = new_layer(dir.path(), "b", &pa, b.size);
    write_layer(&eng, &pb, &b);
    // C: 512 KiB over B (past 320 KiB nothing below: zeros).
    let c = LayerModel {
        size: 512 * K,
        writes: vec![
            (6 * K, pattern(9, 512)),               // over B over A
            (100 * K, pattern(10, 3 * K as usize)), // over R only
            (400 * K + 17, pattern(11, 50)),        // past B's end
        ],
    };
    let pc = new_layer(dir.path(), "c", &pb, c.size);
    write_layer(&eng, &pc, &c);
    eng.shutdown().unwrap();
    Chain {
        _dir: dir,
        raw,
        layers: vec![(pa, a), (pb, b), (pc, c)],
    }
}

#[test]
fn depth_three_chain_reads_as_the_reference_and_reports_depths() {
    let ch = build_chain();
    let va = view(Some(&ch.raw), &ch.layers[0].1);
    let vb = view(Some(&va), &ch.layers[1].1);
    let vc = view(Some(&vb), &ch.layers[2].1);
    let eng = engine(2);
    let top = &ch.layers[2].0;
    let d = eng
        .open(
            top,
            DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("open top");
    assert_eq!(d.size(), 512 * K);
    // Whole disk in one read, then odd-sized reads at odd offsets (bounce buffers, short
    // reads at the raw base's unaligned end through O_DIRECT).
    let all = d.read_at(0, (512 * K) as u32).expect("read");
    assert!(all == vc, "whole read differs from the reference");
    let mut off = 0u64;
    let mut step = 777u64;
    while off < 512 * K {
        let len = step.min(512 * K - off);
        let got = d.read_at(off, len as u32).expect("read");
        assert_eq!(
            got,
            vc[off as usize..(off + len) as usize],
            "at {off}+{len}"
        );
        off += len;
        step = step * 7 % 9001 + 1;
    }
    // Depths, byte by byte, against the models.
    let models: Vec<&LayerModel> = ch.layers.iter().rev().map(|(_, m)| m).collect();
    let ext = d.allocation_depth(0, 512 * K);
    let mut pos = 0;
    let mut seen = [false; 5];
    for e in &ext {
        assert_eq!(e.offset, pos);
        for b in e.offset..e.offset + e.len {
            let want = depth_of(b, &models, ch.raw.len() as u64);
            assert_eq!(e.depth, want, "byte {b} in {e:?}");
        }
        seen[e.depth as usize] = true;
        pos += e.len;
    }
    assert_eq!(pos, 512 * K);
    assert_eq!(seen, [true; 5], "depths 0..=4 all present: {ext:?}");
    // A read-write open of the top: a write lands in C only; the base layers stay as they are.
    d.close().unwrap();
    let d = eng.open(top, DiskOptions::default()).expect("open top rw");
    d.write_at(0, &[0xee; 4096], true).unwrap();
    d.close().unwrap();
    let a_only = eng
        .open(
            &ch.layers[0].0,
            DiskOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a_only.read_at(0, 4096).unwrap(), va[..4096]);
    a_only.close().unwrap();
    eng.shutdown().unwrap();
}

/// Whether another open file description could take a whole-file write lock on `p` (what a
/// writer or a `commit` into it takes).
fn lockable_for_writing(p: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: the fd is open for the call; `fl` is a valid flock that outlives it.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) == 0 }
}

#[test]
fn layers_in_use_are_share_locked_against_writers() {
    let ch = build_chain();
    let eng = engine(1);
    let top = eng
        .open(&ch.layers[2].0, DiskOptions::default())
        .expect("serve top");
    // Every lower add-cow layer is a base now: a writable open (as serving or commit would
    // do) is refused; a read-only one is fine.
    for (p, _) in &ch.layers[..2] {
        let e = Overlay::open(p, &OpenOptions::default()).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Locked, "{}: {e}", p.display());
        Overlay::open(
            p,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .expect("read-only open of a base layer");
    }
    // Each file of each lower layer, and the raw bottom, on its own.
    let dir = ch.layers[0].0.parent().unwrap().to_path_buf();
    for name in ["a.add-cow", "a.raw", "b.add-cow", "b.raw", "r.img"] {
        assert!(
            !lockable_for_writing(&dir.join(name)),
            "{name} is not locked"
        );
    }
    top.close().unwrap();
    for name in ["a.add-cow", "a.raw", "b.add-cow", "b.raw", "r.img"] {
        assert!(lockable_for_writing(&dir.join(name)), "{name} still locked");
    }
    // Closed: writable again.
    drop(Overlay::open(&ch.layers[0].0, &OpenOptions::default()).expect("unlocked"));
    eng.shutdown().unwrap();
}

#[test]
fn loops_are_refused_naming_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r.img");
    std::fs::write(&r, vec![1u8; 64 * 1024]).unwrap();
    let a = new_layer(dir.path(), "a", &r, 64 * 1024);
    let b = new_layer(dir.path(), "b", &a, 64 * 1024);
    let c = new_layer(dir.path(), "c", &b, 64 * 1024);
    // A's base becomes C: C -> B -> A -> C.
    let mut meta = std::fs::read(&a).unwrap();
    let name = b"c.add-cow";
    meta[12..1036].fill(0);
    meta[12..12 + name.len()].copy_from_slice(name);
    std::fs::write(&a, &meta).unwrap();
    let ro = OpenOptions {
        read_only: true,
        no_lock: true,
        ..OpenOptions::default()
    };
    let e = Overlay::open(&c, &ro).unwrap_err();
    match e.kind() {
        ErrorKind::BackingLoop(l) => {
            let (first, again) = (&l.first, &l.again);
            assert!(
                first.ends_with("c.add-cow") && again.ends_with("c.add-cow"),
                "{e}"
            );
        }
        k => panic!("expected a loop, got {k:?}: {e}"),
    }
    assert!(e.to_string().contains("loop"), "{e}");
    // Through the engine too (with locks): the same refusal, nothing left locked.
    let eng = engine(1);
    let e = eng.open(&b, DiskOptions::default()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::BackingLoop(_)), "{e}");
    eng.shutdown().unwrap();

    // A file named twice without a cycle through the overlays: the bottom raw image is also a
    // middle layer's raw image (x's raw image is r.img, and r.img is the bottom).
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r.img");
    std::fs::write(&r, vec![1u8; 64 * 1024]).unwrap();
    let x = dir.path().join("x.add-cow");
    let y = dir.path().join("y.add-cow");
    // y's raw image is r.img; x's base is y, so y's base r.img... build y over nothing first.
    create(&CreateOptions {
        overlay: y.clone(),
        image: Some(r.clone()),
        ..CreateOptions::default()
    })
    .unwrap();
    new_layer(dir.path(), "z", &r, 64 * 1024);
    // Point y's base at z: y (raw image r.img) -> z -> r.img.
    let mut meta = std::fs::read(&y).unwrap();
    meta[12..1036].fill(0);
    meta[12..12 + 9].copy_from_slice(b"z.add-cow");
    std::fs::write(&y, &meta).unwrap();
    create(&CreateOptions {
        overlay: x.clone(),
        base: Some(y.clone()),
        ..CreateOptions::default()
    })
    .unwrap();
    let e = Overlay::open(&x, &ro).unwrap_err();
    match e.kind() {
        ErrorKind::BackingLoop(l) => {
            let (first, again, role) = (&l.first, &l.again, &l.role);
            assert!(first.ends_with("r.img") && again.ends_with("r.img"), "{e}");
            assert_eq!(*role, "raw image");
        }
        k => panic!("expected a loop, got {k:?}: {e}"),
    }
}

#[test]
fn chains_deeper_than_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r.img");
    std::fs::write(&r, vec![7u8; 4096]).unwrap();
    let mut below = r.clone();
    let mut layers = Vec::new();
    for i in 0..MAX_CHAIN_DEPTH {
        below = new_layer(dir.path(), &format!("l{i}"), &below, 4096);
        layers.push(below.clone());
    }
    // The top of MAX_CHAIN_DEPTH overlays has MAX_CHAIN_DEPTH layers below it: accepted.
    let eng = engine(1);
    let d = eng
        .open(&below, DiskOptions::default())
        .expect("at the limit");
    assert_eq!(d.read_at(0, 4096).unwrap(), vec![7u8; 4096]);
    let depth = d.allocation_depth(0, 4096);
    assert_eq!(depth.len(), 1);
    assert_eq!(depth[0].depth, MAX_CHAIN_DEPTH as u32 + 1);
    d.close().unwrap();
    // One more: refused, naming the file that would be too deep.
    let top = new_layer(dir.path(), "top", &below, 4096);
    let e = eng.open(&top, DiskOptions::default()).unwrap_err();
    match e.kind() {
        ErrorKind::ChainTooDeep { limit, path } => {
            assert_eq!(*limit, MAX_CHAIN_DEPTH);
            assert!(path.ends_with("r.img"), "{e}");
        }
        k => panic!("expected too deep, got {k:?}: {e}"),
    }
    eng.shutdown().unwrap();
}

#[test]
fn create_over_an_add_cow_base_takes_its_virtual_size() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r.img");
    std::fs::write(&r, vec![1u8; 4096]).unwrap();
    let a = new_layer(dir.path(), "a", &r, 1 << 20);
    let b = dir.path().join("b.add-cow");
    create(&CreateOptions {
        overlay: b.clone(),
        base: Some(a),
        ..CreateOptions::default()
    })
    .unwrap();
    let o = Overlay::open(&b, &OpenOptions::default()).unwrap();
    assert_eq!(o.virtual_size, 1 << 20);
    assert_eq!(o.base_size, Some(1 << 20));
    assert_eq!(o.base.as_ref().unwrap().layers.len(), 2);
}
