//! A commit on a large, fragmented bitmap writes a small multiple of the dirty bytes (not the
//! whole range between the first and the last dirty block), and a commit with more spans than
//! one submission holds runs as successive chains and persists every bit.
//!
//! Most patterns use a 64 GiB overlay (sparse): its bitmap is 16 MiB, 4096 metadata blocks. One
//! uses the largest overlay ext4 holds, 16 TiB less 4 KiB: a 4 GiB bitmap of about a million
//! blocks, where a span from the first to the last dirty block would not fit in a `u32`. Each
//! pattern dirties blocks by writing one sector whose bit lives in that block.

use addcow_engine_testkit::harness::*;

const SIZE: u64 = 64 << 30;
const HEADER: u64 = 2560;
const BLOCK: u64 = 4096;

/// A sector whose bit lives in metadata block `b` (b >= 1).
fn sector_in_block(b: u64) -> u64 {
    (b * BLOCK - HEADER + 8) * 8
}

/// Dirties `blocks`, flushes, and returns (bitmap bytes the commit wrote, dirty bytes).
fn commit_of(size: u64, blocks: &[u64]) -> (u64, u64) {
    let f = fixture(size, 0);
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
    let (written, dirty) = commit_of(SIZE, &blocks);
    assert!(
        written <= 2 * dirty,
        "{written} bytes written for {dirty} dirty"
    );
}

#[test]
fn sparse_dirty_blocks_cost_only_their_bytes() {
    // Every 3rd block: 1365 spans, far more than one submission (so several chains).
    let blocks: Vec<u64> = (1..4096).step_by(3).collect();
    let (written, dirty) = commit_of(SIZE, &blocks);
    assert_eq!(written, dirty);
    // Every 64th block: merging them would rewrite the whole bitmap.
    let blocks: Vec<u64> = (1..4096).step_by(64).collect();
    let (written, dirty) = commit_of(SIZE, &blocks);
    assert_eq!(written, dirty, "only the dirty blocks are written");
}

#[test]
fn a_16_tib_disk_with_alternating_dirty_blocks_commits_at_most_twice_their_bytes() {
    // ext4's largest file: 16 TiB less one 4 KiB block.
    let size: u64 = (16 << 40) - 4096;
    let bitmap_end = HEADER + size / 512 / 8;
    let last_block = (bitmap_end - 1) / BLOCK;
    // Alternating blocks at the start, then alternating pairs spread over the whole bitmap up to
    // its last full block: the dirty range spans about 4 GiB of bitmap.
    let mut blocks: Vec<u64> = (1..2048).step_by(2).collect();
    let stride = last_block / 256;
    for k in 1..256 {
        blocks.push(k * stride);
        blocks.push(k * stride + 2);
    }
    blocks.push(last_block - 1);
    blocks.sort_unstable();
    blocks.dedup();
    assert!(sector_in_block(last_block - 1) < size / 512);
    let (written, dirty) = commit_of(size, &blocks);
    assert!(
        written <= 2 * dirty,
        "{written} bytes written for {dirty} dirty over a 16 TiB disk"
    );
}
