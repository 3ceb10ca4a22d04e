//! A commit on a large, fragmented bitmap writes a small multiple of the dirty bytes (not the
//! whole range between the first and the last dirty block), and a commit with more spans than
//! one submission holds runs as successive chains and persists every bit.
//!
//! The overlay is 64 GiB (sparse): its bitmap is 16 MiB, 4096 metadata blocks. Each pattern
//! dirties blocks by writing one sector whose bit lives in that block.

mod engine_common;

use engine_common::*;

const SIZE: u64 = 64 << 30;
const HEADER: u64 = 2560;
const BLOCK: u64 = 4096;

/// A sector whose bit lives in metadata block `b` (b >= 1).
fn sector_in_block(b: u64) -> u64 {
    (b * BLOCK - HEADER + 8) * 8
}

/// Dirties `blocks`, flushes, and returns (bitmap bytes the commit wrote, dirty bytes).
fn commit_of(blocks: &[u64]) -> (u64, u64) {
    let f = fixture(SIZE, 0);
    let e = engine(2);
    let d = open(&e, &f.overlay);
    for (i, &b) in blocks.iter().enumerate() {
        d.write_at(sector_in_block(b) * 512, &payload(b, 512), false)
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    let before = d.stats().commit_bytes;
    let started = std::time::Instant::now();
    d.flush().expect("flush");
    let took = started.elapsed();
    let written = d.stats().commit_bytes - before;
    let dirty = blocks.len() as u64 * BLOCK;
    eprintln!(
        "{} dirty blocks: commit wrote {written} bytes for {dirty} dirty ({:.2}x) in {took:?}",
        blocks.len(),
        written as f64 / dirty as f64
    );
    d.close().expect("close");
    drop((d, e));
    // Every bit is on disk: reopen and read each sector back.
    let e = engine(1);
    let d = open(&e, &f.overlay);
    for &b in blocks {
        let off = sector_in_block(b) * 512;
        assert_eq!(
            d.read_at(off, 512).expect("read"),
            payload(b, 512),
            "block {b}'s write is durable"
        );
    }
    d.close().expect("close");
    (written, dirty)
}

#[test]
fn alternating_dirty_blocks_cost_at_most_twice_their_bytes() {
    let blocks: Vec<u64> = (1..4096).step_by(2).collect();
    let (written, dirty) = commit_of(&blocks);
    assert!(
        written <= 2 * dirty,
        "{written} bytes written for {dirty} dirty"
    );
}

#[test]
fn sparse_dirty_blocks_cost_only_their_bytes() {
    // Every 3rd block: 1365 spans, far more than one submission (so several chains).
    let blocks: Vec<u64> = (1..4096).step_by(3).collect();
    let (written, dirty) = commit_of(&blocks);
    assert_eq!(written, dirty);
    // Every 64th block: merging them would rewrite the whole bitmap.
    let blocks: Vec<u64> = (1..4096).step_by(64).collect();
    let (written, dirty) = commit_of(&blocks);
    assert_eq!(written, dirty, "only the dirty blocks are written");
}
