//! The bitmap snapshot / dirty-marks protocol of group commit (DESIGN.md invariant 3) under
//! concurrent setters: setters do `SparseBitmap::set_range` then `DirtyBlocks::mark_bitmap_bytes`
//! while a committer repeatedly `take()`s the marks and copies the marked blocks' bytes into
//! its "on-disk" copy. No set bit may ever be lost: every commit that *starts* after a setter
//! finished marking must carry that setter's bits, and after a final commit the on-disk copy
//! equals the in-memory bitmap equals the union of everything set.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use addcow_engine::bitmap::{DirtyBlocks, SparseBitmap};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const HEADER: u64 = 2560;

/// Four chunks of the sparse bitmap and a partial one, so ranges cross chunk boundaries and
/// whole chunks flip from "all clear" to "all set" while others copy them.
const SECTORS: u64 = 4 * 32768 + 1000;

fn seed() -> u64 {
    let seed = std::env::var("DIRTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("dirty protocol seed {seed} (set DIRTY_SEED to replay)");
    seed
}

/// A random range: mostly small, sometimes a whole chunk or more.
fn random_range(rng: &mut SmallRng) -> (u64, u64) {
    let start = rng.gen_range(0..SECTORS);
    let count = match rng.gen_range(0..8000) {
        0 => rng.gen_range(30_000..70_000),
        1..=20 => rng.gen_range(1..2_000),
        _ => rng.gen_range(1..12),
    };
    (start, count.min(SECTORS - start))
}

fn model_bytes(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut bytes = vec![0u8; SECTORS.div_ceil(8) as usize];
    for &(start, count) in ranges {
        for s in start..start + count {
            bytes[(s / 8) as usize] |= 1 << (s % 8);
        }
    }
    bytes
}

/// The committer's side: on-disk copy of the bitmap, built only from taken blocks.
struct Committer {
    bitmap: Arc<SparseBitmap>,
    dirty: Arc<DirtyBlocks>,
    started: Arc<AtomicUsize>,
    disk: Vec<u8>,
    /// The on-disk copy after each commit.
    history: Vec<Vec<u8>>,
}

impl Committer {
    fn commit(&mut self) {
        let index = self.started.fetch_add(1, Ordering::SeqCst);
        assert_eq!(index, self.history.len());
        let bs = self.dirty.block_size();
        let len = self.disk.len() as u64;
        for block in self.dirty.take() {
            let file_from = (block * bs).max(HEADER);
            let file_to = ((block + 1) * bs).min(HEADER + len);
            if file_from >= file_to {
                continue;
            }
            let (from, to) = ((file_from - HEADER) as usize, (file_to - HEADER) as usize);
            let mut copy = vec![0u8; to - from];
            self.bitmap.copy_bytes(from as u64, &mut copy);
            for (i, (&new, old)) in copy.iter().zip(&self.disk[from..to]).enumerate() {
                assert_eq!(
                    new & old,
                    *old,
                    "commit {index}: bitmap byte {} lost bits: copied {new:#010b}, committed before {old:#010b}",
                    from + i
                );
            }
            self.disk[from..to].copy_from_slice(&copy);
        }
        self.history.push(self.disk.clone());
    }
}

fn run_protocol(block_size: u64, setters: usize, ops_per_setter: usize, seed: u64) {
    let bitmap = Arc::new(SparseBitmap::new(SECTORS));
    let bitmap_len = SECTORS.div_ceil(8);
    let dirty = Arc::new(DirtyBlocks::new(bitmap_len, block_size));
    let started = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // (start, count, commits started when the setter finished marking)
    let records = Arc::new(Mutex::new(Vec::new()));

    let committer = {
        let mut c = Committer {
            bitmap: bitmap.clone(),
            dirty: dirty.clone(),
            started: started.clone(),
            disk: vec![0u8; bitmap_len as usize],
            history: Vec::new(),
        };
        let done = done.clone();
        thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if c.history.len() < 2000 {
                    c.commit();
                }
                thread::yield_now();
            }
            c
        })
    };

    let handles: Vec<_> = (0..setters)
        .map(|t| {
            let (bitmap, dirty, started, records) = (
                bitmap.clone(),
                dirty.clone(),
                started.clone(),
                records.clone(),
            );
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ (t as u64 + 1).wrapping_mul(0x9e37));
                let mut mine = Vec::with_capacity(ops_per_setter);
                for _ in 0..ops_per_setter {
                    let (start, count) = random_range(&mut rng);
                    if let Some((first, last)) = bitmap.set_range(start, count) {
                        dirty.mark_bitmap_bytes(first, last);
                    }
                    mine.push((start, count, started.load(Ordering::SeqCst)));
                    if mine.len() % 32 == 0 {
                        thread::yield_now();
                    }
                }
                records.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let mut c = committer.join().unwrap();
    c.commit(); // the final commit (close / shutdown)

    let records = records.lock().unwrap();
    let ranges: Vec<(u64, u64)> = records.iter().map(|&(s, n, _)| (s, n)).collect();
    let model = model_bytes(&ranges);
    let mut memory = vec![0u8; bitmap_len as usize];
    bitmap.copy_bytes(0, &mut memory);
    assert_eq!(
        memory, model,
        "in-memory bitmap differs from the union of set ranges (seed {seed})"
    );
    assert_eq!(
        c.disk, model,
        "committed bitmap differs from the union of set ranges (seed {seed})"
    );
    assert_eq!(
        bitmap.count_set(),
        model.iter().map(|b| u64::from(b.count_ones())).sum::<u64>()
    );
    assert!(!dirty.any(), "marks left after the final commit");

    // Every range was on disk after the first commit that started after its marking.
    for &(start, count, commits_before) in records.iter() {
        let snapshot = &c.history[commits_before];
        for s in start..start + count {
            assert!(
                snapshot[(s / 8) as usize] & (1 << (s % 8)) != 0,
                "sector {s} (range {start}+{count}) missing from commit {commits_before}, which started after it was marked (seed {seed})"
            );
        }
    }
    eprintln!(
        "{} setters x {ops_per_setter} ranges, block size {block_size}: {} commits, {} bits set",
        setters,
        c.history.len(),
        bitmap.count_set()
    );
}

#[test]
fn dirty_protocol_never_loses_bits_small_blocks() {
    run_protocol(512, 4, 10_000, seed());
}

#[test]
fn dirty_protocol_never_loses_bits_page_blocks() {
    run_protocol(4096, 3, 10_000, seed());
}

#[test]
fn dirty_protocol_set_range_reports_every_changed_byte() {
    // Overlapping concurrent setters: every byte that ends non-zero was reported changed by
    // some set_range call (so some mark covers it), and reported ranges hold only bytes that
    // really carry bits of that call's range.
    let seed = seed();
    let bitmap = Arc::new(SparseBitmap::new(SECTORS));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let bitmap = bitmap.clone();
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed.wrapping_add(t));
                let mut out = Vec::new();
                for _ in 0..3000 {
                    let (start, count) = random_range(&mut rng);
                    let changed = bitmap.set_range(start, count);
                    if let Some((first, last)) = changed {
                        assert!(first <= last);
                        assert!(
                            first >= start / 8 && last <= (start + count - 1) / 8,
                            "set_range({start}, {count}) reported bytes {first}..={last}"
                        );
                    }
                    out.push(((start, count), changed));
                }
                out
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let ranges: Vec<(u64, u64)> = results.iter().map(|(r, _)| *r).collect();
    let model = model_bytes(&ranges);
    let mut reported = vec![false; model.len()];
    for (_, changed) in &results {
        if let Some((first, last)) = changed {
            for b in *first..=*last {
                reported[b as usize] = true;
            }
        }
    }
    for (i, &byte) in model.iter().enumerate() {
        if byte != 0 {
            assert!(
                reported[i],
                "bitmap byte {i} changed but no set_range reported it (seed {seed})"
            );
        }
    }
    let mut memory = vec![0u8; model.len()];
    bitmap.copy_bytes(0, &mut memory);
    assert_eq!(memory, model);
    // Setting everything again changes nothing.
    for &(start, count) in &ranges {
        assert_eq!(bitmap.set_range(start, count), None);
    }
}

#[test]
fn dirty_protocol_remark_after_failed_commit_keeps_blocks() {
    // A failed commit re-marks what it took; the next take returns those blocks again, merged
    // with blocks marked meanwhile.
    let dirty = DirtyBlocks::new(SECTORS.div_ceil(8), 512);
    dirty.mark_bitmap_bytes(0, 0);
    dirty.mark_bitmap_bytes(5000, 5000);
    let taken = dirty.take();
    assert_eq!(taken, vec![5, (HEADER + 5000) / 512]);
    assert!(!dirty.any());
    dirty.mark_bitmap_bytes(10_000, 10_000);
    dirty.remark(&taken);
    assert_eq!(
        dirty.take(),
        vec![5, (HEADER + 5000) / 512, (HEADER + 10_000) / 512]
    );
}

#[test]
fn dirty_protocol_check_catches_mark_before_set() {
    // The checks above can fail: a setter that marks its block *before* setting the bit
    // (wrong order) loses the bit when a commit takes the mark in between. Scripted here.
    let bitmap = Arc::new(SparseBitmap::new(SECTORS));
    let dirty = Arc::new(DirtyBlocks::new(SECTORS.div_ceil(8), 512));
    let mut c = Committer {
        bitmap: bitmap.clone(),
        dirty: dirty.clone(),
        started: Arc::new(AtomicUsize::new(0)),
        disk: vec![0u8; SECTORS.div_ceil(8) as usize],
        history: Vec::new(),
    };
    dirty.mark_bitmap_bytes(10 / 8, 10 / 8); // wrong: mark first...
    c.commit(); // ...a commit takes the mark and copies a clear bit...
    assert!(bitmap.set_range(10, 1).is_some()); // ...then the bit is set, never re-marked.
    c.commit(); // the final commit
    let model = model_bytes(&[(10, 1)]);
    assert_ne!(c.disk, model, "the lost bit went unnoticed");
    let mut memory = vec![0u8; model.len()];
    bitmap.copy_bytes(0, &mut memory);
    assert_eq!(memory, model);
}
