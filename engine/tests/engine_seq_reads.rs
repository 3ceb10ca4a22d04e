//! Large reads across many runs (the benchmark's half-allocated layout and finer patterns):
//! every byte matches a model, with the base read through O_DIRECT and through the page cache.

use addcow_engine::{CacheMode, Engine, EngineConfig};
use addcow_engine_testkit::harness::*;

const CHUNK: u64 = 64 << 10;

/// Writes a fixed pattern: a half of the 64 KiB chunks (alternating and in runs), then single
/// sectors, 4 KiB pieces and unaligned pieces inside unwritten chunks, so reads meet runs that
/// end at sector, word (32 KiB), chunk and 1 MiB edges.
fn write_pattern(d: &addcow_engine::Disk, model: &mut Model, size: u64) {
    let mut n = 0;
    let mut put = |off: u64, len: usize| {
        n += 1;
        let data = payload(n, len);
        d.write_at(off, &data, false).expect("write");
        model.write(off, &data);
    };
    for i in 0..size / CHUNK {
        if [
            true, false, true, true, false, false, true, false, false, false, false, true,
        ][i as usize % 12]
        {
            put(i * CHUNK, CHUNK as usize);
        }
    }
    // Inside chunk 1 (unwritten): every other sector of its first 16 KiB.
    for s in 0..16 {
        put(CHUNK + s * 1024, 512);
    }
    // Inside chunk 4 (unwritten): 4 KiB pieces with 4 KiB gaps, then one unaligned piece.
    for k in 0..6 {
        put(4 * CHUNK + k * 8192, 4096);
    }
    put(4 * CHUNK + 50_001, 3_333);
    // Ending exactly at a 1 MiB edge and starting right after it.
    put((1 << 20) - 4096, 4096);
    put((1 << 20) + 512, 1024);
}

fn reads_match_the_model(base_cache: CacheMode) {
    let size = 4u64 << 20;
    // The base ends inside the last MiB, not on a sector: its tail reads as zeros.
    let f = fixture(size, size - (700 << 10) - 77);
    let mut model = Model::new(&f);
    let cfg = EngineConfig {
        base_cache,
        ..config(2)
    };
    {
        let e = Engine::start(cfg.clone()).expect("engine");
        let d = open(&e, &f.overlay);
        write_pattern(&d, &mut model, size);
        d.flush().expect("flush");
        check_reads(&d, &model, size);
        d.close().expect("close");
    }
    // Again after a reopen: the bits now come from the metadata file.
    let e = Engine::start(cfg).expect("engine");
    let d = open(&e, &f.overlay);
    check_reads(&d, &model, size);
}

fn check_reads(d: &addcow_engine::Disk, model: &Model, size: u64) {
    let mut cases: Vec<(u64, u32)> = Vec::new();
    for start in (0..size).step_by(1 << 20) {
        cases.push((start, 1 << 20));
    }
    cases.extend([
        (0, 4 << 20),
        (100, (1 << 20) + 999),
        (CHUNK - 512, 3 * 512),
        (CHUNK + 300, 20_000),
        (4 * CHUNK + 4000, 60_000),
        (size - (1 << 20) - 333, 1 << 20),
        (size - 5000, 5000),
        ((1 << 20) - 4096, 8192),
    ]);
    for (off, len) in cases {
        let got = d.read_at(off, len).expect("read");
        let want = &model.bytes[off as usize..off as usize + len as usize];
        if got != want {
            let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "read of {len} at {off}: byte {} differs: got {} want {}",
                off + i as u64,
                got[i],
                want[i]
            );
        }
    }
    model.check(d);
}

#[test]
fn reads_across_many_runs_with_a_direct_base() {
    reads_match_the_model(CacheMode::Direct);
}

#[test]
fn reads_across_many_runs_with_a_cached_base() {
    reads_match_the_model(CacheMode::Buffered);
}
