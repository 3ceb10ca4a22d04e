//! The bitmap snapshot / dirty-marks protocol of group commit (DESIGN.md invariant 3) under
//! concurrent setters: setters publish ranges with `DirtyBlocks::publish` (set the bits, then
//! mark their blocks) while a committer repeatedly `take()`s the marks and copies the marked
//! blocks' bytes into its "on-disk" copy. No set bit may ever be lost: every commit that *starts*
//! (takes the marks) after a setter's publication returned must carry that setter's bits, even
//! those another setter set first and has not marked yet; after a final commit the on-disk copy
//! equals the in-memory bitmap equals the union of everything set.
//!
//! The interleavings that matter are reached on purpose: a quarter of the ranges come from a
//! small shared set of hot ranges, so setters often publish bits another setter already set, and
//! a setter sometimes yields between setting and marking (as a preempted core would). Each run
//! also proves it exercised the race: setters keep going past their quota until the committer
//! has made [`MIN_CONCURRENT_COMMITS`] commits that took marks while setters were running, and a
//! run that never gets there fails. The negative controls run the same concurrent setters and
//! committer with a wrong protocol and must be caught: marking before setting, and marking only
//! the bytes a setter changed (which loses the bits of a write whose bits another setter set
//! first). `scripts/test.sh` runs this file pinned to one CPU as well, where preemption between
//! the two steps is what happens.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use addcow_engine::bitmap::{DirtyBlocks, SparseBitmap};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const HEADER: u64 = 2560;

/// Four chunks of the sparse bitmap and a partial one, so ranges cross chunk boundaries and
/// whole chunks flip from "all clear" to "all set" while others copy them.
const SECTORS: u64 = 4 * 32768 + 1000;

/// Commits that must take marks while setters are running before the setters may stop.
const MIN_CONCURRENT_COMMITS: usize = 20;
/// How long setters keep going past their quota (at most 100 quotas) to see those commits; a
/// run that has not seen them by then fails (the race was not exercised). Past the quota the
/// setters pause briefly between batches, so a committer starved by a loaded machine gets the
/// CPU it needs to make those commits.
const OVERLAP_DEADLINE: Duration = Duration::from_secs(60);

/// The run's seed (`DIRTY_SEED` to replay).
fn seed() -> u64 {
    addcow_engine_testkit::engine::seed("DIRTY_SEED")
}

/// Hot ranges every setter of a run draws from (a quarter of its ranges).
const HOT_RANGES: u64 = 16;

/// A range for a setter, and whether it is hot: a quarter of the time one of the run's
/// [`HOT_RANGES`] hot ranges (the same for every setter, so setters publish bits others set),
/// else [`random_range`].
fn setter_range(rng: &mut SmallRng, seed: u64, sectors: u64) -> ((u64, u64), bool) {
    if rng.gen_range(0..4) == 0 {
        let mut hot = SmallRng::seed_from_u64(seed ^ rng.gen_range(0..HOT_RANGES));
        // Later setters re-draw the same small ranges; sometimes one grows past the first.
        let (start, count) = {
            let start = hot.gen_range(0..sectors);
            (start, hot.gen_range(1..24u64).min(sectors - start))
        };
        let extra = if rng.gen_range(0..4) == 0 {
            rng.gen_range(0..2_000)
        } else {
            0
        };
        return ((start, (count + extra).min(sectors - start)), true);
    }
    (random_range(rng, sectors), false)
}

/// A random range of a `sectors`-sector bitmap: mostly small, sometimes a whole chunk or more.
fn random_range(rng: &mut SmallRng, sectors: u64) -> (u64, u64) {
    let start = rng.gen_range(0..sectors);
    let count = match rng.gen_range(0..8000) {
        0 => rng.gen_range(30_000..70_000),
        1..=20 => rng.gen_range(1..2_000),
        _ => rng.gen_range(1..12),
    };
    (start, count.min(sectors - start))
}

fn model_bytes(ranges: &[(u64, u64)], sectors: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; sectors.div_ceil(8) as usize];
    for &(start, count) in ranges {
        for s in start..start + count {
            bytes[(s / 8) as usize] |= 1 << (s % 8);
        }
    }
    bytes
}

/// The order in which a setter publishes a range.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Order {
    /// The engine's: `DirtyBlocks::publish` (set the bits, then mark; a setter that sees another
    /// publication in progress marks its whole range). It yields between the two steps for half
    /// of the hot ranges and one other range in sixteen.
    Publish,
    /// Wrong: set, then mark only the bytes that changed. A setter whose bits another setter set
    /// first (and has not marked yet) returns with nothing marked, and the commit that follows
    /// misses its bits. It yields between the two steps as often as `Publish` does.
    MarkChangedOnly,
    /// Wrong: mark first, then set. A commit that takes the mark before the bits are set copies
    /// them clear, and nothing marks the block again. Between the two steps the setter yields,
    /// as a preempted thread would, so that the committer gets to run in that window often
    /// rather than rarely.
    MarkThenSet,
}

/// The committer's side: the on-disk copy of the bitmap, built only from taken blocks, checked
/// after every commit against the ranges published before the commit took its marks.
struct Committer {
    bitmap: Arc<SparseBitmap>,
    dirty: Arc<DirtyBlocks>,
    /// Ranges setters finished publishing (set and marked), in the order they finished.
    published: mpsc::Receiver<(u64, u64)>,
    /// Setters still running.
    active: Arc<AtomicUsize>,
    disk: Vec<u8>,
    /// Every range received, for the final model.
    ranges: Vec<(u64, u64)>,
    commits: usize,
    /// Commits that took marks while setters were running (from before the take until after
    /// the copy).
    concurrent: Arc<AtomicUsize>,
    /// Ranges checked by such a commit (not only by the final one).
    checked_mid_run: usize,
}

impl Committer {
    /// One commit. Every range published before it took the marks must be on disk after it.
    fn commit(&mut self) -> Result<(), String> {
        let index = self.commits;
        self.commits += 1;
        let during = self.active.load(Ordering::SeqCst) > 0;
        // Published before the take, so this commit must carry them.
        let due: Vec<(u64, u64)> = self.published.try_iter().collect();
        let bs = self.dirty.block_size();
        let len = self.disk.len() as u64;
        let blocks = self.dirty.take();
        for &block in &blocks {
            let file_from = (block * bs).max(HEADER);
            let file_to = ((block + 1) * bs).min(HEADER + len);
            if file_from >= file_to {
                continue;
            }
            let (from, to) = ((file_from - HEADER) as usize, (file_to - HEADER) as usize);
            let mut copy = vec![0u8; to - from];
            self.bitmap.copy_bytes(from as u64, &mut copy);
            for (i, (&new, old)) in copy.iter().zip(&self.disk[from..to]).enumerate() {
                if new & old != *old {
                    return Err(format!(
                        "commit {index}: bitmap byte {} lost bits: copied {new:#010b}, committed before {old:#010b}",
                        from + i
                    ));
                }
            }
            self.disk[from..to].copy_from_slice(&copy);
        }
        for &(start, count) in &due {
            for s in start..start + count {
                if self.disk[(s / 8) as usize] & (1 << (s % 8)) == 0 {
                    return Err(format!(
                        "sector {s} (range {start}+{count}) missing from commit {index}, which took the marks after the range was set and marked"
                    ));
                }
            }
        }
        let concurrent = during && !blocks.is_empty() && self.active.load(Ordering::SeqCst) > 0;
        if concurrent {
            self.concurrent.fetch_add(1, Ordering::SeqCst);
            self.checked_mid_run += due.len();
        }
        self.ranges.extend(due);
        Ok(())
    }
}

/// What a run that passed its checks saw.
#[derive(Debug)]
struct Outcome {
    /// Ranges published.
    ranges: usize,
    /// Commits, the final one included.
    commits: usize,
    /// Commits that took marks while setters were running.
    concurrent_commits: usize,
    /// Ranges checked by such a commit (not only by the final one).
    checked_mid_run: usize,
}

/// Runs `setters` threads publishing random ranges of a `sectors`-sector bitmap in `order`
/// against a committer thread: `ops_per_setter` each, then on until enough commits overlapped
/// them. `Err` names the first check that failed; `Ok` only if every bit reached every commit
/// it had to.
fn run_protocol(
    sectors: u64,
    block_size: u64,
    setters: usize,
    ops_per_setter: usize,
    seed: u64,
    order: Order,
) -> Result<Outcome, String> {
    let bitmap = Arc::new(SparseBitmap::new(sectors));
    let bitmap_len = sectors.div_ceil(8);
    let dirty = Arc::new(DirtyBlocks::new(bitmap_len, block_size));
    let active = Arc::new(AtomicUsize::new(setters));
    let concurrent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let go = Arc::new(Barrier::new(setters + 1));
    let (tx, published) = mpsc::channel();

    let committer = {
        let mut c = Committer {
            bitmap: bitmap.clone(),
            dirty: dirty.clone(),
            published,
            active: active.clone(),
            disk: vec![0u8; bitmap_len as usize],
            ranges: Vec::new(),
            commits: 0,
            concurrent: concurrent.clone(),
            checked_mid_run: 0,
        };
        let (done, go, failed) = (done.clone(), go.clone(), failed.clone());
        thread::spawn(move || -> Result<Committer, String> {
            go.wait();
            while !done.load(Ordering::SeqCst) {
                if let Err(e) = c.commit() {
                    failed.store(true, Ordering::SeqCst);
                    return Err(e);
                }
                thread::yield_now();
            }
            Ok(c)
        })
    };

    let handles: Vec<_> = (0..setters)
        .map(|t| {
            let (bitmap, dirty, tx) = (bitmap.clone(), dirty.clone(), tx.clone());
            let (active, concurrent, failed, go) = (
                active.clone(),
                concurrent.clone(),
                failed.clone(),
                go.clone(),
            );
            thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed ^ (t as u64 + 1).wrapping_mul(0x9e37));
                go.wait();
                let deadline = Instant::now() + OVERLAP_DEADLINE;
                let mut n = 0;
                // The quota, then on until enough commits overlapped the setters (or the
                // committer failed, or the deadline or 100 times the quota passed: the caller
                // checks the count).
                while n < ops_per_setter
                    || (concurrent.load(Ordering::SeqCst) < MIN_CONCURRENT_COMMITS
                        && !failed.load(Ordering::SeqCst)
                        && n < 100 * ops_per_setter
                        && Instant::now() < deadline)
                {
                    let ((start, count), hot) = setter_range(&mut rng, seed, sectors);
                    let preempted = rng.gen_range(0..if hot { 2 } else { 16 }) == 0;
                    let between = || {
                        if preempted {
                            thread::yield_now();
                        }
                    };
                    match order {
                        Order::Publish => {
                            dirty.publish_with(&bitmap, start, count, between);
                        }
                        Order::MarkChangedOnly => {
                            let changed = bitmap.set_range(start, count);
                            between();
                            if let Some((first, last)) = changed {
                                dirty.mark_bitmap_bytes(first, last);
                            }
                        }
                        Order::MarkThenSet => {
                            dirty.mark_bitmap_bytes(start / 8, (start + count - 1) / 8);
                            thread::yield_now();
                            bitmap.set_range(start, count);
                        }
                    }
                    let _ = tx.send((start, count));
                    n += 1;
                    if n % 32 == 0 {
                        if n > ops_per_setter {
                            thread::sleep(Duration::from_micros(200));
                        } else {
                            thread::yield_now();
                        }
                    }
                }
                active.fetch_sub(1, Ordering::SeqCst);
            })
        })
        .collect();
    drop(tx);
    for h in handles {
        h.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let mut c = committer.join().unwrap()?;
    c.commit()?; // the final commit (close / shutdown) checks every range not yet checked

    let model = model_bytes(&c.ranges, sectors);
    let mut memory = vec![0u8; bitmap_len as usize];
    bitmap.copy_bytes(0, &mut memory);
    if memory != model {
        return Err(format!(
            "in-memory bitmap differs from the union of set ranges (seed {seed})"
        ));
    }
    if c.disk != model {
        return Err(format!(
            "committed bitmap differs from the union of set ranges (seed {seed})"
        ));
    }
    assert_eq!(
        bitmap.count_set(),
        model.iter().map(|b| u64::from(b.count_ones())).sum::<u64>()
    );
    if dirty.any() {
        return Err("marks left after the final commit".to_owned());
    }
    let out = Outcome {
        ranges: c.ranges.len(),
        commits: c.commits,
        concurrent_commits: concurrent.load(Ordering::SeqCst),
        checked_mid_run: c.checked_mid_run,
    };
    eprintln!(
        "{setters} setters ({order:?}), {sectors} sectors, block size {block_size}: {out:?}, {} bits set",
        bitmap.count_set()
    );
    Ok(out)
}

/// Runs the engine's order and requires that the run passed *and* exercised the race.
fn run_and_require_overlap(block_size: u64, setters: usize, ops_per_setter: usize) {
    let seed = seed();
    let out = run_protocol(
        SECTORS,
        block_size,
        setters,
        ops_per_setter,
        seed,
        Order::Publish,
    )
    .unwrap_or_else(|e| panic!("{e} (seed {seed})"));
    assert!(
        out.concurrent_commits >= MIN_CONCURRENT_COMMITS,
        "only {} of {} commits took marks while setters ran {} ranges (need {MIN_CONCURRENT_COMMITS}): the race was not exercised (seed {seed})",
        out.concurrent_commits,
        out.commits,
        out.ranges
    );
    assert!(
        out.checked_mid_run > 0,
        "no range was checked by a commit made while setters ran (seed {seed})"
    );
}

#[test]
fn dirty_protocol_never_loses_bits_small_blocks() {
    run_and_require_overlap(512, 4, 10_000);
}

#[test]
fn dirty_protocol_never_loses_bits_page_blocks() {
    run_and_require_overlap(4096, 3, 10_000);
}

#[test]
fn dirty_protocol_check_catches_mark_before_set() {
    require_caught(Order::MarkThenSet);
}

#[test]
fn dirty_protocol_check_catches_marking_only_what_changed() {
    require_caught(Order::MarkChangedOnly);
}

/// The negative control, run for real: the same concurrent setters and committer with the
/// wrong `order`. Whether a commit takes its marks inside the window the wrong order opens, and
/// no other mark heals the block before the next commit, is up to the scheduler; so the bitmap
/// is large (1 GiB disk, 517 blocks: a block is rarely marked twice between commits) and rounds
/// repeat, each with enough overlapping commits, until the checks catch the lost bit.
fn require_caught(order: Order) {
    let seed = seed();
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in 0u64.. {
        let r = run_protocol(64 * 32768, 512, 4, 10_000, seed.wrapping_add(round), order);
        match r {
            Err(e) => {
                eprintln!("wrong order {order:?} caught in round {round}: {e}");
                assert!(
                    e.contains("missing from commit") || e.contains("committed bitmap differs"),
                    "caught, but not as a lost bit: {e}"
                );
                return;
            }
            Ok(out) => assert!(
                Instant::now() < deadline,
                "{order:?} went unnoticed for {} rounds (last: {out:?}, seed {seed})",
                round + 1
            ),
        }
    }
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
                    let (start, count) = random_range(&mut rng, SECTORS);
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
    let model = model_bytes(&ranges, SECTORS);
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
