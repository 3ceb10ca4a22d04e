//! Criterion: `SparseBitmap::run_from`, the lookup that splits every request into runs, on four
//! bit patterns of a 1 GiB disk: all clear, all set, mixed (a random half of the 64 KiB chunks
//! set) and alternating (every other sector set: the worst case, runs of one).

use std::hint::black_box;

use addcow_engine::bitmap::SparseBitmap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SECTORS: u64 = 1 << 21;

fn pattern(name: &str) -> Vec<u8> {
    let bytes = (SECTORS / 8) as usize;
    match name {
        "clear" => vec![0; bytes],
        "full" => vec![0xff; bytes],
        "alternating" => vec![0x55; bytes],
        _ => {
            let mut rng = SmallRng::seed_from_u64(1);
            let mut v = vec![0u8; bytes];
            for chunk in v.chunks_mut(16) {
                if rng.gen_bool(0.5) {
                    chunk.fill(0xff);
                }
            }
            v
        }
    }
}

fn run_from(c: &mut Criterion) {
    let mut group = c.benchmark_group("run_from");
    group.throughput(Throughput::Elements(1));
    for name in ["clear", "full", "mixed", "alternating"] {
        let bm = SparseBitmap::from_bytes(SECTORS, &pattern(name));
        for max in [8u64, 256, 2048] {
            group.bench_with_input(BenchmarkId::new(name, max), &max, |b, &max| {
                let mut rng = SmallRng::seed_from_u64(2);
                b.iter(|| {
                    let start = rng.gen_range(0..SECTORS);
                    black_box(bm.run_from(black_box(start), max))
                })
            });
        }
    }
    group.finish();
}

fn split_walk(c: &mut Criterion) {
    // Walks a whole 1 MiB request run by run, as the engine does to build its SQEs.
    let mut group = c.benchmark_group("split_1MiB_with_run_from");
    for name in ["clear", "full", "mixed", "alternating"] {
        let bm = SparseBitmap::from_bytes(SECTORS, &pattern(name));
        group.bench_function(name, |b| {
            let mut rng = SmallRng::seed_from_u64(3);
            b.iter(|| {
                let mut s = rng.gen_range(0..SECTORS - 2048);
                let end = s + 2048;
                let mut runs = 0u32;
                while s < end {
                    let (_, n) = bm.run_from(s, end - s);
                    if n == 0 {
                        break;
                    }
                    s += n;
                    runs += 1;
                }
                black_box(runs)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, run_from, split_walk);
criterion_main!(benches);
