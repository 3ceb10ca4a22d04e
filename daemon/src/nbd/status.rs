//! BLOCK_STATUS answers, bounded.
//!
//! The allocation is walked in growing windows (4 KiB, doubling up to 64 MiB) and the walk
//! stops as soon as enough extents are complete: one for `REQ_ONE`, [`MAX_EXTENTS`] otherwise.
//! So a request's work is proportional to what its reply reports (plus at most one window),
//! never to the whole range asked about: `qemu-img map`, which asks `REQ_ONE` from each
//! extent's end to the end of the disk, stays linear on a fragmented overlay.
//!
//! `base:allocation`: raw-image and base runs are data (`0`), except where the file underneath
//! has a hole (a trimmed or zeroed range of the raw image, a sparse region of the base): those,
//! and runs past the base, read as zeros with nothing allocated (`HOLE|ZERO`), so copying
//! clients skip them. `qemu:allocation-depth`: the layer that supplies each range, `1` the raw
//! image, `2` the base, `3` the base's base (a backing chain), ..., `0` unallocated in every
//! layer (zeros).
//! `qemu:dirty-bitmap:NAME` (the export's bitmaps): `1` dirty, `0` clean, in runs of whole
//! granules (the first and last clipped to the request).
//! Extents stay 512-aligned inside the request: the one sector a base of unaligned size ends
//! in is reported with the status its two parts share (data, depth 2).

use addcow_engine::{DepthExtent, Extent, ExtentKind};

use super::handshake::{self, MetaContexts};
use super::wire;
use crate::backend::disk::Backend;

/// Most extents in one block-status chunk (QEMU's server uses the same bound; the spec allows
/// up to 2^20).
pub const MAX_EXTENTS: usize = 1 << 17;

const FIRST_WINDOW: u64 = 4 << 10;
const MAX_WINDOW: u64 = 64 << 20;
const SECTOR: u64 = 512;

/// Bytes a block-status reply for `len` bytes with `contexts` selected can take at most (what
/// the request is charged to the buffer budget).
pub fn reply_cost(len: u64, req_one: bool, contexts: MetaContexts) -> u64 {
    let n = if req_one {
        1
    } else {
        (len / SECTOR + 2).min(MAX_EXTENTS as u64)
    };
    let per_ctx = 16 * n + 64;
    per_ctx * contexts.count()
}

/// A run of an allocation answer: extents of one kind (or depth) merge when they touch.
trait Span: Copy {
    fn start(&self) -> u64;
    fn len(&self) -> u64;
    fn grow(&mut self, by: u64);
    fn same_as(&self, other: &Self) -> bool;
}

impl Span for Extent {
    fn start(&self) -> u64 {
        self.offset
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn grow(&mut self, by: u64) {
        self.len += by;
    }
    fn same_as(&self, other: &Self) -> bool {
        self.kind == other.kind
    }
}

impl Span for DepthExtent {
    fn start(&self) -> u64 {
        self.offset
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn grow(&mut self, by: u64) {
        self.len += by;
    }
    fn same_as(&self, other: &Self) -> bool {
        self.depth == other.depth
    }
}

/// The raw allocation of `[offset, offset+len)`, walked until more than `max` extents are known
/// (or the range ends). Returns the extents and the end of the part they describe exactly.
pub fn walk(disk: &dyn Backend, offset: u64, len: u64, max: usize) -> (Vec<Extent>, u64) {
    walk_with(disk.size(), |o, l| disk.allocation(o, l), offset, len, max)
}

/// [`walk`] over `fetch` (a window's extents, in order).
fn walk_with<T: Span>(
    size: u64,
    fetch: impl Fn(u64, u64) -> Vec<T>,
    offset: u64,
    len: u64,
    max: usize,
) -> (Vec<T>, u64) {
    let end = offset.saturating_add(len).min(size);
    let mut out: Vec<T> = Vec::new();
    let mut pos = offset;
    let mut window = FIRST_WINDOW;
    while pos < end {
        let w = window.min(end - pos);
        let got = fetch(pos, w);
        let Some(last) = got.last() else { break };
        let next = last.start() + last.len();
        for e in got {
            match out.last_mut() {
                Some(l) if l.same_as(&e) && l.start() + l.len() == e.start() => l.grow(e.len()),
                _ => out.push(e),
            }
        }
        if next <= pos {
            break;
        }
        pos = next;
        if out.len() > max {
            // The last extent may go on past what was walked; every one before it is whole.
            let last_start = out.last().map_or(pos, |e| e.start());
            let exact = (last_start.div_ceil(SECTOR) * SECTOR).min(pos);
            return (out, exact.max(offset.min(end)));
        }
        window = (window * 2).min(MAX_WINDOW);
    }
    (out, pos.max(offset.min(end)))
}

/// Block-status extents per selected context: `(context id, [(length, flags)])`. Every part of
/// the answer comes from one disk: a disk switch (a live snapshot, a resize) waits until it is
/// made (extents of the old overlay with the holes of the new one's empty raw image would report
/// the old overlay's data as holes, which copying clients skip).
pub fn answer(
    backend: &dyn Backend,
    offset: u64,
    len: u64,
    ctx: MetaContexts,
    req_one: bool,
) -> Vec<(u32, Vec<(u64, u32)>)> {
    let _pinned = backend.pin_layout();
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut out = Vec::new();
    if ctx.base_allocation {
        let (extents, exact) = walk(backend, offset, len, max);
        crate::process::seam::pause("status-walked");
        let runs = base_allocation_runs(backend, &extents, exact);
        let runs = finish(runs, exact, req_one, |a, b| a & b);
        out.push((handshake::CTX_BASE_ALLOCATION, lengths(runs, len)));
    }
    if ctx.allocation_depth {
        let fetch = |o, l| backend.allocation_depth(o, l);
        let (extents, exact) = walk_with(backend.size(), fetch, offset, len, max);
        let runs: Vec<Run> = extents
            .iter()
            .filter_map(|e| {
                let end = (e.offset + e.len).min(exact);
                (end > e.offset).then_some((e.offset, end, e.depth))
            })
            .collect();
        let runs = finish(runs, exact, req_one, |a, b| match (a, b) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        });
        out.push((handshake::CTX_ALLOCATION_DEPTH, lengths(runs, len)));
    }
    if ctx.dirty != 0 {
        let names = backend.exported_bitmaps();
        for (i, name) in names.iter().enumerate() {
            if ctx.dirty & (1 << i) != 0 {
                let runs = dirty_runs(backend, name, offset, len, max);
                out.push((handshake::CTX_DIRTY_BITMAP + i as u32, lengths(runs, len)));
            }
        }
    }
    out
}

/// `qemu:dirty-bitmap:NAME` runs, as QEMU's server reports them: flag 1 (dirty) or 0, the first
/// run from `offset` to its granule's run end, the last clipped to the request (or the disk);
/// a bitmap that is gone reads as all dirty (a backup then copies too much, never too little).
fn dirty_runs(backend: &dyn Backend, name: &str, offset: u64, len: u64, max: usize) -> Vec<Run> {
    let Some(extents) = backend.dirty_extents(name, offset, len, max) else {
        let end = offset.saturating_add(len).min(backend.size());
        return if end > offset {
            vec![(offset, end, 1)]
        } else {
            Vec::new()
        };
    };
    extents
        .iter()
        .map(|e| (e.offset, e.offset + e.len, u32::from(e.dirty)))
        .collect()
}

/// `(start, end, flags)`.
type Run = (u64, u64, u32);

fn clip(e: &Extent, exact: u64) -> Option<(u64, u64, ExtentKind)> {
    let end = (e.offset + e.len).min(exact);
    (end > e.offset).then_some((e.offset, end, e.kind))
}

/// `base:allocation` runs: data, split where the layer's file has holes.
fn base_allocation_runs(backend: &dyn Backend, extents: &[Extent], exact: u64) -> Vec<Run> {
    const ZERO: u32 = wire::STATE_HOLE | wire::STATE_ZERO;
    let mut runs = Vec::with_capacity(extents.len());
    let mut holes = Vec::new();
    for (s, e, kind) in extents.iter().filter_map(|x| clip(x, exact)) {
        if kind == ExtentKind::Zero {
            runs.push((s, e, ZERO));
            continue;
        }
        holes.clear();
        backend.zero_ranges(kind, s, e, &mut holes);
        let mut pos = s;
        for &(hs, he) in &holes {
            let (hs, he) = (hs.max(pos), he.min(e));
            if he <= hs {
                continue;
            }
            if hs > pos {
                runs.push((pos, hs, 0));
            }
            runs.push((hs, he, ZERO));
            pos = he;
        }
        if pos < e {
            runs.push((pos, e, 0));
        }
    }
    runs
}

/// Aligns inner boundaries to sectors (a sector two runs share gets `combine` of their flags),
/// merges equal neighbours, and keeps one run for `REQ_ONE` or [`MAX_EXTENTS`] otherwise.
fn finish(runs: Vec<Run>, exact: u64, req_one: bool, combine: fn(u32, u32) -> u32) -> Vec<Run> {
    let mut aligned: Vec<Run> = Vec::with_capacity(runs.len());
    for (s, e, f) in runs {
        let mut s = s;
        // Part of this run may already be covered by a sector merged into the previous one.
        if let Some(last) = aligned.last_mut() {
            if last.1 > s {
                last.2 = combine(last.2, f);
                if e <= last.1 {
                    continue;
                }
                s = last.1;
            }
        }
        if e % SECTOR != 0 && e < exact {
            let body_end = e / SECTOR * SECTOR;
            let sector_end = (body_end + SECTOR).min(exact);
            if body_end > s {
                aligned.push((s, body_end, f));
            }
            aligned.push((body_end.max(s), sector_end, f));
        } else {
            aligned.push((s, e, f));
        }
    }
    let mut merged: Vec<Run> = Vec::with_capacity(aligned.len());
    for r in aligned {
        match merged.last_mut() {
            Some(l) if l.2 == r.2 && l.1 == r.0 => l.1 = r.1,
            _ => merged.push(r),
        }
    }
    merged.truncate(if req_one { 1 } else { MAX_EXTENTS });
    merged
}

/// `(length, flags)` extents; when nothing is known (an empty range), one extent of status 0.
fn lengths(runs: Vec<Run>, len: u64) -> Vec<(u64, u32)> {
    let v: Vec<(u64, u32)> = runs.into_iter().map(|(s, e, f)| (e - s, f)).collect();
    if v.is_empty() {
        return vec![(len.clamp(1, u64::from(u32::MAX)), 0)];
    }
    v
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use addcow_engine::{Completion, IoBuf, Request};

    use super::*;
    use crate::backend::memory::MemDisk;

    const BOTH: MetaContexts = MetaContexts {
        base_allocation: true,
        allocation_depth: true,
        dirty: 0,
    };

    /// A disk of `sectors` whose allocation is given per sector (0 zero, 1 image, 2 base,
    /// 3 image hole), counting the extents the daemon asked the allocation for.
    struct Counted {
        kinds: Vec<u8>,
        base_end: Option<u64>,
        walked: AtomicU64,
    }

    impl Backend for Counted {
        fn size(&self) -> u64 {
            self.kinds.len() as u64 * SECTOR
        }
        fn read_only(&self) -> bool {
            true
        }
        fn submit(&self, _: usize, _: Request, _: Completion) {
            unreachable!()
        }
        fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
            let end = (offset + len).min(self.size());
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let k = self.kinds[(pos / SECTOR) as usize];
                let next = ((pos / SECTOR + 1) * SECTOR).min(end);
                let mut push = |kind, a: u64, b: u64| {
                    if b <= a {
                        return;
                    }
                    match out.last_mut() {
                        Some(l) if l.kind == kind && l.offset + l.len == a => l.len += b - a,
                        _ => out.push(Extent {
                            offset: a,
                            len: b - a,
                            kind,
                        }),
                    }
                };
                match (k, self.base_end) {
                    (1 | 3, _) => push(ExtentKind::Image, pos, next),
                    (2, Some(be)) => {
                        push(ExtentKind::Base, pos, next.min(be.max(pos)));
                        push(ExtentKind::Zero, next.min(be.max(pos)), next);
                    }
                    _ => push(ExtentKind::Zero, pos, next),
                }
                pos = next;
            }
            self.walked.fetch_add(out.len() as u64, Ordering::Relaxed);
            out
        }
        fn alloc_buf(&self, len: usize) -> IoBuf {
            IoBuf::new_zeroed(len)
        }
        fn zero_ranges(&self, layer: ExtentKind, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
            if layer != ExtentKind::Image {
                return;
            }
            let mut s = start / SECTOR;
            while s * SECTOR < end {
                if self.kinds[s as usize] == 3 {
                    out.push(((s * SECTOR).max(start), ((s + 1) * SECTOR).min(end)));
                }
                s += 1;
            }
        }
    }

    fn counted(kinds: Vec<u8>, base_end: Option<u64>) -> Counted {
        Counted {
            kinds,
            base_end,
            walked: AtomicU64::new(0),
        }
    }

    /// The work of a REQ_ONE request is bounded by what it reports, not by the range asked
    /// about: walking a whole fragmented disk extent by extent (what `qemu-img map` does) looks
    /// at each extent a bounded number of times.
    #[test]
    fn req_one_walks_are_linear_over_a_fragmented_disk() {
        // 64 MiB: alternating single sectors of image and base.
        let n = 32 * 1024;
        let d = counted(
            (0..n).map(|i| 1 + (i % 2) as u8).collect(),
            Some(n as u64 * 512),
        );
        let size = d.size();
        let mut pos = 0;
        let mut calls = 0u64;
        while pos < size {
            let r = answer(&d, pos, size - pos, BOTH, true);
            let l = r[1].1[0].0;
            assert_eq!(r[1].1.len(), 1);
            pos += l;
            calls += 1;
        }
        assert_eq!(calls, n as u64);
        let walked = d.walked.load(Ordering::Relaxed);
        // Each call looks at one window of 4 KiB (8 extents) here, once per context.
        assert!(
            walked <= calls * 20,
            "walked {walked} extents for {calls} requests: not linear"
        );
    }

    #[test]
    fn a_capped_walk_stops_after_the_cap() {
        let n = 4 * MAX_EXTENTS;
        let d = counted(
            (0..n).map(|i| 1 + (i % 2) as u8).collect(),
            Some(n as u64 * 512),
        );
        let r = answer(&d, 0, d.size(), BOTH, false);
        assert_eq!(r[1].1.len(), MAX_EXTENTS);
        let walked = d.walked.load(Ordering::Relaxed);
        // Once per context.
        assert!(walked <= 4 * MAX_EXTENTS as u64 + 512, "walked {walked}");
    }

    #[test]
    fn holes_read_as_zero_and_extents_stay_sector_aligned() {
        // image, image hole x2, base (ends 100 bytes into sector 4), zero.
        let d = counted(vec![1, 3, 3, 2, 2, 0, 0], Some(3 * 512 + 612));
        let r = answer(&d, 0, d.size(), BOTH, false);
        assert_eq!(r[0].0, handshake::CTX_BASE_ALLOCATION);
        assert_eq!(r[0].1, vec![(512, 0), (1024, 3), (1024, 0), (1024, 3)]);
        assert_eq!(r[1].1, vec![(1536, 1), (1024, 2), (1024, 0)]);
        for (_, ext) in &r {
            let mut pos = 0;
            for (l, _) in ext {
                pos += l;
                assert!(pos % 512 == 0 || pos == d.size(), "{r:?}");
            }
            assert_eq!(pos, d.size());
        }
        // REQ_ONE on the base's last sector alone: one aligned extent.
        let r = answer(&d, 4 * 512, 512, BOTH, true);
        assert_eq!(r[0].1, vec![(512, 0)]);
        assert_eq!(r[1].1, vec![(512, 2)]);
    }

    #[test]
    fn memory_disk_reports_trims_as_zero() {
        let m: Arc<MemDisk> = MemDisk::new(8192, false);
        let (tx, rx) = std::sync::mpsc::channel();
        m.submit(
            0,
            Request::Trim {
                offset: 1024,
                len: 2048,
                fua: false,
            },
            Box::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
        assert!(rx.recv().unwrap());
        let r = answer(&*m, 0, 8192, BOTH, false);
        assert_eq!(r[0].1, vec![(1024, 0), (2048, 3), (1024, 0), (4096, 3)]);
    }

    /// A frozen bitmap served by a wrapped backend answers block status as QEMU's server does.
    #[test]
    fn a_frozen_bitmap_is_served_as_a_dirty_bitmap_context() {
        let dir = tempfile::tempdir().unwrap();
        let set = addcow_engine::dirty::DirtySet::open(
            &dir.path().join("x.add-cow"),
            1 << 20,
            false,
            None,
        )
        .unwrap();
        set.add("c1", 65536, false, true).unwrap();
        set.mark(70_000, 10).unwrap();
        let frozen: Arc<dyn addcow_engine::dirty::DirtySource> =
            Arc::new(set.freeze("c1").unwrap());
        let b = crate::backend::dirty::WithBitmaps::new(
            MemDisk::new(1 << 20, true),
            vec![("c1".into(), frozen)],
        )
        .unwrap();
        assert_eq!(b.exported_bitmaps(), vec!["c1".to_string()]);
        let ctx = MetaContexts {
            dirty: 1,
            ..MetaContexts::default()
        };
        let r = answer(&b, 1000, 1 << 20, ctx, false);
        assert_eq!(r[0].0, handshake::CTX_DIRTY_BITMAP);
        assert_eq!(
            r[0].1,
            vec![(65536 - 1000, 0), (65536, 1), ((1 << 20) - 2 * 65536, 0)]
        );
        let r = answer(&b, 65536 + 5, 100, ctx, true);
        assert_eq!(r[0].1, vec![(100, 1)]);
        assert!(crate::backend::dirty::WithBitmaps::new(
            MemDisk::new(4096, true),
            vec![
                (
                    "a".into(),
                    Arc::new(set.freeze("c1").unwrap())
                        as Arc<dyn addcow_engine::dirty::DirtySource>
                ),
                (
                    "a".into(),
                    Arc::new(set.freeze("c1").unwrap())
                        as Arc<dyn addcow_engine::dirty::DirtySource>
                )
            ]
        )
        .is_err());
    }
}
