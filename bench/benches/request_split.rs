//! Criterion: request splitting through the engine, `Disk::allocation` (the extents a request is
//! split into: raw image / base / zero), on a 1 GiB overlay whose bitmap is mixed (a random half
//! of the 64 KiB chunks set) or fine-grained (every other 4 KiB set), for 4 KiB, 128 KiB and
//! 1 MiB requests at random offsets; and `Disk::allocation_depth` (the walk serving does down a
//! backing chain for every read of clear sectors) on a three-layer chain of such overlays.

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;

use addcow_engine::format::{self, CreateOptions, BITMAP_OFFSET};
use addcow_engine::{DiskOptions, Engine, EngineConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 1 << 30;

fn make_overlay(dir: &Path, name: &str, bitmap: &[u8]) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    if !base.exists() {
        let f = std::fs::File::create(&base).expect("create base");
        f.set_len(SIZE).expect("size base");
    }
    make_overlay_over(dir, name, bitmap, base)
}

fn make_overlay_over(
    dir: &Path,
    name: &str,
    bitmap: &[u8],
    base: std::path::PathBuf,
) -> std::path::PathBuf {
    let ov = dir.join(format!("{name}.add-cow"));
    format::create(&CreateOptions {
        overlay: ov.clone(),
        base: Some(base),
        image: Some(dir.join(format!("{name}.img"))),
        size: Some(SIZE),
        force: true,
    })
    .expect("create overlay");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&ov)
        .expect("open overlay");
    f.write_all_at(bitmap, BITMAP_OFFSET).expect("write bitmap");
    ov
}

fn allocation(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = (SIZE / 512 / 8) as usize;
    let mut rng = SmallRng::seed_from_u64(1);
    let mut mixed = vec![0u8; bytes];
    for chunk in mixed.chunks_mut(16) {
        if rng.gen_bool(0.5) {
            chunk.fill(0xff);
        }
    }
    // Every other 4 KiB (8 sectors = one byte) set.
    let fine: Vec<u8> = (0..bytes)
        .map(|i| if i % 2 == 0 { 0xff } else { 0 })
        .collect();
    let engine = Engine::start(EngineConfig {
        cores: 1,
        ..EngineConfig::default()
    })
    .expect("engine");
    let mut group = c.benchmark_group("disk_allocation");
    for (name, bm) in [("mixed", &mixed), ("fine", &fine)] {
        let ov = make_overlay(dir.path(), name, bm);
        let disk = engine.open(&ov, DiskOptions::default()).expect("open disk");
        for len in [4096u64, 128 << 10, 1 << 20] {
            group.bench_with_input(BenchmarkId::new(name, len), &len, |b, &len| {
                let mut rng = SmallRng::seed_from_u64(2);
                b.iter(|| {
                    let off = rng.gen_range(0..(SIZE - len) / 4096) * 4096;
                    black_box(disk.allocation(off, len).len())
                })
            });
        }
        let _ = disk.close();
    }
    group.finish();
    // A chain: top (every fourth 4 KiB set) over mid (fine) over low (mixed) over the raw base.
    let mut group = c.benchmark_group("chain_allocation_depth");
    let low = make_overlay(dir.path(), "low", &mixed);
    let mid = make_overlay_over(dir.path(), "mid", &fine, low);
    let sparse: Vec<u8> = (0..bytes)
        .map(|i| if i % 4 == 1 { 0xff } else { 0 })
        .collect();
    let top = make_overlay_over(dir.path(), "top", &sparse, mid);
    let disk = engine
        .open(&top, DiskOptions::default())
        .expect("open chain");
    for len in [4096u64, 128 << 10, 1 << 20] {
        group.bench_with_input(BenchmarkId::new("3-layer", len), &len, |b, &len| {
            let mut rng = SmallRng::seed_from_u64(2);
            b.iter(|| {
                let off = rng.gen_range(0..(SIZE - len) / 4096) * 4096;
                black_box(disk.allocation_depth(off, len).len())
            })
        });
    }
    let _ = disk.close();
    group.finish();
    let _ = engine.shutdown();
}

criterion_group!(benches, allocation);
criterion_main!(benches);
