//! Crash consistency of the lifecycle tools: resize (grow, shrink), rebase (safe, to another
//! base and to none; unsafe) and commit (into a raw base and into an add-cow base).
//!
//! Each tool runs on real files with its file operations recorded (`Ops::recording`); every
//! crash state the log allows (see `addcow_engine_testkit::fileops`) is written to a directory, opened with
//! `Overlay::open` (no error, no warning) and read back: it must read as an allowed state.
//! With the feature `unsafe-lifecycle-order` each tool runs in a deliberately broken order and
//! the checker must find violating states.
#![cfg(feature = "crash-recorder")]

use std::path::Path;

use addcow_engine::format::{OpenOptions, Overlay};
use addcow_engine::lifecycle::{
    commit, rebase, resize, CommitOptions, OpLog, Ops, RebaseOptions, ResizeOptions, View,
};
use addcow_engine_testkit::fileops::{crash_states, materialize, snapshot_dir, Files};
use addcow_engine_testkit::lifecycle::{guest, overlay, raw_base};

const SECTORS: u64 = 300;
const PER_POINT: usize = 32;
const MAX_STATES: usize = 1500;

/// The checker's findings.
#[derive(Debug, Default)]
struct Report {
    states: usize,
    points: usize,
    violations: usize,
    examples: Vec<String>,
}

/// Runs `op` with recording on the directory `dir`, then checks every crash state of the
/// overlay `meta_name` with `allowed` (given the guest-visible bytes).
fn check(
    dir: &Path,
    meta_name: &str,
    op: impl FnOnce(&Ops),
    allowed: impl Fn(&[u8]) -> Result<(), String>,
) -> Report {
    check_with(dir, meta_name, Ops::recording, op, allowed)
}

/// [`check`] with the tool's [`Ops`] made by `ops` from the log (e.g. one that injects a
/// failure).
fn check_with(
    dir: &Path,
    meta_name: &str,
    ops: impl FnOnce(std::sync::Arc<OpLog>) -> Ops,
    op: impl FnOnce(&Ops),
    allowed: impl Fn(&[u8]) -> Result<(), String>,
) -> Report {
    let initial = snapshot_dir(dir);
    let log = OpLog::new();
    op(&ops(log.clone()));
    let ops = log.snapshot();
    assert!(!ops.is_empty(), "nothing recorded");
    let seed = addcow_engine_testkit::engine::seed("LIFECYCLE_SEED");
    // Every crash point; more states per point for short logs, at least 6 for long ones.
    let per_point = (MAX_STATES / (ops.len() + 1)).clamp(6, PER_POINT);
    let states = crash_states(&initial, &ops, seed, per_point);
    let scratch = tempfile::tempdir().unwrap();
    let mut r = Report {
        points: ops.len() + 1,
        ..Report::default()
    };
    for st in &states {
        r.states += 1;
        if let Err(why) = check_state(scratch.path(), meta_name, &st.files, &allowed) {
            r.violations += 1;
            if r.examples.len() < 5 {
                r.examples.push(format!(
                    "crash point {} of {} ({}): {why}",
                    st.point,
                    ops.len(),
                    st.how
                ));
            }
        }
    }
    eprintln!(
        "{} crash points, {} states, {} violating; first: {:?}",
        r.points, r.states, r.violations, r.examples
    );
    r
}

fn check_state(
    scratch: &Path,
    meta_name: &str,
    files: &Files,
    allowed: &impl Fn(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    materialize(scratch, files);
    let meta = scratch.join(meta_name);
    let o = Overlay::open(
        &meta,
        &OpenOptions {
            read_only: true,
            no_lock: true,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| format!("does not open: {e}"))?;
    if !o.warnings.is_empty() {
        return Err(format!("opens with warnings: {:?}", o.warnings));
    }
    drop(o);
    let layer = View::open(Some(&meta), false).map_err(|e| format!("does not open: {e}"))?;
    // Every add-cow layer below (a base that is itself an overlay) must be clean too.
    for l in layer.chain().into_iter().flat_map(|c| c.layers()) {
        if !l.warnings.is_empty() {
            return Err(format!(
                "{} opens with warnings: {:?}",
                l.path.display(),
                l.warnings
            ));
        }
    }
    let got = layer
        .read_all()
        .map_err(|e| format!("does not read: {e}"))?;
    allowed(&got)
}

fn same_as(want: &[u8], got: &[u8]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("size {}, expected {}", got.len(), want.len()));
    }
    match (0..want.len()).find(|&b| got[b] != want[b]) {
        Some(b) => Err(format!(
            "byte {b} reads {:#04x}, expected {:#04x}",
            got[b], want[b]
        )),
        None => Ok(()),
    }
}

fn set(s: u64) -> bool {
    s % 3 == 0 || (100..140).contains(&s) || s == SECTORS - 1
}

/// Base shorter than the disk (and not a multiple of 512), so the disk has sectors partly and
/// wholly past the base's end.
fn fixture() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    raw_base(dir.path(), "base.img", 100_000, 0);
    let meta = overlay(dir.path(), Some("base.img"), SECTORS, set);
    (dir, meta)
}

fn run_grow() -> Report {
    let (dir, meta) = fixture();
    let before = guest(&meta);
    let new_size = 403 * 512;
    let mut after = before.clone();
    after.resize(new_size, 0);
    let r = check(
        dir.path(),
        "disk.add-cow",
        |ops| {
            resize(
                &ResizeOptions {
                    overlay: meta.clone(),
                    size: new_size as u64,
                    shrink: false,
                },
                ops,
            )
            .unwrap();
        },
        |got| {
            same_as(&before, got).or_else(|a| same_as(&after, got).map_err(|b| format!("{a}; {b}")))
        },
    );
    assert_eq!(guest(&meta), after, "grown disk reads zeros past the base");
    r
}

/// A grow that fails (ENOSPC injected) at each of its file changes in turn, until one runs
/// without reaching the injected failure. Every crash state of the failed grow and of what it
/// undoes must read as before or as grown; once the tool has returned the error, the overlay
/// reads as before and its `.add-cow` file has its old length again (nothing half-grown is
/// left behind). (The broken order has no undo path of its own: `run_grow` catches it.)
#[cfg(not(feature = "unsafe-lifecycle-order"))]
fn run_grow_failing_at_each_step() -> Report {
    let mut total = Report::default();
    for n in 0.. {
        let (dir, meta) = fixture();
        let before = guest(&meta);
        let len_before = std::fs::metadata(&meta).unwrap().len();
        let new_size = 403 * 512;
        let mut after = before.clone();
        after.resize(new_size, 0);
        let failed = std::cell::Cell::new(false);
        let r = check_with(
            dir.path(),
            "disk.add-cow",
            |log| Ops::recording_failing_at(log, n),
            |ops| {
                let res = resize(
                    &ResizeOptions {
                        overlay: meta.clone(),
                        size: new_size as u64,
                        shrink: false,
                    },
                    ops,
                );
                failed.set(ops.injected_failure_happened());
                assert_eq!(res.is_err(), failed.get(), "{res:?}");
            },
            |got| {
                same_as(&before, got)
                    .or_else(|a| same_as(&after, got).map_err(|b| format!("{a}; {b}")))
            },
        );
        total.states += r.states;
        total.points += r.points;
        total.violations += r.violations;
        total.examples.extend(
            r.examples
                .into_iter()
                .map(|e| format!("failing at change {n}: {e}")),
        );
        if !failed.get() {
            assert_eq!(guest(&meta), after, "the grow that did not fail grew");
            break;
        }
        assert_eq!(
            guest(&meta),
            before,
            "failing at change {n}: reads as before"
        );
        assert_eq!(
            std::fs::metadata(&meta).unwrap().len(),
            len_before,
            "failing at change {n}: the .add-cow file is back to its old length"
        );
    }
    total
}

fn run_shrink() -> Report {
    let (dir, meta) = fixture();
    let before = guest(&meta);
    let new_size = 201 * 512;
    let r = check(
        dir.path(),
        "disk.add-cow",
        |ops| {
            resize(
                &ResizeOptions {
                    overlay: meta.clone(),
                    size: new_size as u64,
                    shrink: true,
                },
                ops,
            )
            .unwrap();
        },
        |got| {
            if got.len() != before.len() && got.len() != new_size {
                return Err(format!("size {}", got.len()));
            }
            same_as(&before[..new_size], &got[..new_size])
        },
    );
    assert_eq!(guest(&meta), before[..new_size]);
    r
}

fn run_rebase(to: Option<&str>) -> Report {
    let (dir, meta) = fixture();
    // A new base that differs from the old one in some sectors and is longer.
    let nb = raw_base(dir.path(), "new-base.img", 140_000, 0);
    let mut data = std::fs::read(&nb).unwrap();
    for s in (0..data.len() / 512).step_by(7) {
        data[s * 512 + 3] ^= 0x5a;
    }
    std::fs::write(&nb, data).unwrap();
    let before = guest(&meta);
    let r = check(
        dir.path(),
        "disk.add-cow",
        |ops| {
            rebase(
                &RebaseOptions {
                    overlay: meta.clone(),
                    new_base: to.map(|n| dir.path().join(n)),
                    unsafe_: false,
                },
                ops,
            )
            .unwrap();
        },
        |got| same_as(&before, got),
    );
    assert_eq!(guest(&meta), before);
    r
}

fn run_commit_raw() -> Report {
    let (dir, meta) = fixture();
    let before = guest(&meta);
    let r = check(
        dir.path(),
        "disk.add-cow",
        |ops| {
            commit(
                &CommitOptions {
                    overlay: meta.clone(),
                },
                ops,
            )
            .unwrap();
        },
        |got| same_as(&before, got),
    );
    assert_eq!(guest(&meta), before);
    assert_eq!(
        std::fs::read(dir.path().join("base.img")).unwrap(),
        before,
        "the base alone reads what the overlay served"
    );
    r
}

/// The base is itself an add-cow overlay (`mid.add-cow` over `base.img`) of `mid_sectors`
/// sectors (fewer than the top's: it grows first).
fn run_commit_add_cow(mid_sectors: u64) -> Report {
    let dir = tempfile::tempdir().unwrap();
    raw_base(dir.path(), "base.img", 100_000, 0);
    let mid = overlay(dir.path(), Some("base.img"), mid_sectors, |s| s % 4 == 1);
    std::fs::rename(&mid, dir.path().join("mid.add-cow")).unwrap();
    std::fs::rename(dir.path().join("disk.raw"), dir.path().join("mid.raw")).unwrap();
    let mid = dir.path().join("mid.add-cow");
    let mut m = std::fs::read(&mid).unwrap();
    m[1036..1036 + 8].copy_from_slice(b"mid.raw\0");
    std::fs::write(&mid, m).unwrap();
    let meta = overlay(dir.path(), Some("mid.add-cow"), SECTORS, set);
    let before = guest(&meta);
    let r = check(
        dir.path(),
        "disk.add-cow",
        |ops| {
            commit(
                &CommitOptions {
                    overlay: meta.clone(),
                },
                ops,
            )
            .unwrap();
        },
        |got| same_as(&before, got),
    );
    assert_eq!(guest(&meta), before);
    assert_eq!(
        guest(&mid),
        before,
        "the base alone reads what the overlay served"
    );
    r
}

#[cfg(not(feature = "unsafe-lifecycle-order"))]
mod safe {
    use super::*;

    fn clean(r: Report) {
        assert!(r.states > 100, "{r:?}");
        assert_eq!(r.violations, 0, "{r:?}");
    }

    #[test]
    fn lifecycle_crash_grow() {
        clean(run_grow());
    }

    #[test]
    fn lifecycle_crash_grow_failing_at_each_step() {
        clean(run_grow_failing_at_each_step());
    }

    #[test]
    fn lifecycle_crash_shrink() {
        clean(run_shrink());
    }

    #[test]
    fn lifecycle_crash_rebase_to_another_base() {
        clean(run_rebase(Some("new-base.img")));
    }

    #[test]
    fn lifecycle_crash_rebase_to_no_base() {
        clean(run_rebase(None));
    }

    #[test]
    fn lifecycle_crash_commit_into_raw_base() {
        clean(run_commit_raw());
    }

    #[test]
    fn lifecycle_crash_commit_into_add_cow_base() {
        clean(run_commit_add_cow(250));
    }

    #[test]
    fn lifecycle_crash_commit_into_add_cow_base_of_the_same_size() {
        clean(run_commit_add_cow(SECTORS));
    }
}

/// With the order broken on purpose, the checker must find violating crash states.
#[cfg(feature = "unsafe-lifecycle-order")]
mod broken {
    use super::*;

    fn caught(r: Report) {
        assert!(
            r.violations > 0,
            "no violation found with the order broken: {r:?}"
        );
    }

    #[test]
    fn lifecycle_crash_checker_detects_broken_grow() {
        caught(run_grow());
    }

    #[test]
    fn lifecycle_crash_checker_detects_broken_shrink() {
        caught(run_shrink());
    }

    #[test]
    fn lifecycle_crash_checker_detects_broken_rebase() {
        caught(run_rebase(Some("new-base.img")));
    }

    #[test]
    fn lifecycle_crash_checker_detects_broken_commit() {
        caught(run_commit_raw());
    }

    #[test]
    fn lifecycle_crash_checker_detects_broken_commit_into_add_cow_base() {
        // As large as the overlay: no grow, so what is caught is the commit's own order.
        caught(run_commit_add_cow(SECTORS));
    }
}
