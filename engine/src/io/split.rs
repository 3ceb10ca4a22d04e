//! Read splitting: a byte range becomes runs of raw image, base and zeros.
//!
//! Pure functions over the bitmap and the base, so they are easy to test and to benchmark.

use crate::bitmap::SparseBitmap;
use crate::format::chain::{Opaque, Over, RunSrc, Runs, Stack};

use super::align::DioAlign;
use super::base::BaseSource;
use super::request::{DepthExtent, Extent, ExtentKind};
use super::run::BaseRun;

/// Where one segment of a read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    /// The raw image at this byte offset (bits set).
    Image { offset: u64 },
    /// Another file (the base) at this byte offset.
    File {
        fd: std::os::fd::RawFd,
        offset: u64,
        align: DioAlign,
    },
    /// The remote base at this byte offset.
    Remote { offset: u64 },
    /// Zeros (past the base's end, or no base).
    Zero,
}

/// One segment of a planned read: `len` bytes that land at `dest` bytes into the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seg {
    pub dest: u64,
    pub len: u64,
    pub src: Src,
}

/// Splits `[offset, offset+len)` into extents by the bitmap (sector granularity, byte offsets
/// exact at the ends): the chain's walk over the top and its base (as one opaque layer of
/// `base_size` bytes). The range must lie within the bitmap's sectors.
pub(crate) fn extents(
    bitmap: &SparseBitmap,
    base_size: Option<u64>,
    offset: u64,
    len: u64,
    out: &mut Vec<Extent>,
) {
    let base = Opaque(base_size);
    let stack = Over {
        top: bitmap,
        size: u64::MAX,
        lower: &base,
    };
    for r in Runs::new(&stack, offset, len) {
        let kind = match r.src {
            RunSrc::Layer(0) => ExtentKind::Image,
            RunSrc::Layer(_) => ExtentKind::Base,
            RunSrc::Zero => ExtentKind::Zero,
        };
        match out.last_mut() {
            Some(last) if last.kind == kind && last.offset + last.len == r.offset => {
                last.len += r.len;
            }
            _ => out.push(Extent {
                offset: r.offset,
                len: r.len,
                kind,
            }),
        }
    }
}

/// Splits `[offset, offset+len)` by the layer that supplies each byte (see [`DepthExtent`]):
/// one walk down the top and the base's layers.
pub(crate) fn depth_extents(
    bitmap: &SparseBitmap,
    base: Option<&dyn BaseSource>,
    offset: u64,
    len: u64,
    out: &mut Vec<DepthExtent>,
) {
    let none = Opaque(None);
    let lower: &dyn Stack = base.map_or(&none, |b| b.layers());
    let stack = Over {
        top: bitmap,
        size: u64::MAX,
        lower,
    };
    for r in Runs::new(&stack, offset, len) {
        // Depth 0 of the walk is the top (1 in `qemu:allocation-depth`), layer `d` of the
        // base is `d + 1` of the walk (`d + 2` there); zeros are 0.
        let depth = match r.src {
            RunSrc::Layer(d) => u32::try_from(d).map_or(u32::MAX, |d| d.saturating_add(1)),
            RunSrc::Zero => 0,
        };
        match out.last_mut() {
            Some(last) if last.depth == depth && last.offset + last.len == r.offset => {
                last.len += r.len;
            }
            _ => out.push(DepthExtent {
                offset: r.offset,
                len: r.len,
                depth,
            }),
        }
    }
}

/// Reusable vectors for [`plan_read`] (so the read path does not allocate per request).
#[derive(Debug, Default)]
pub(crate) struct SplitScratch {
    ext: Vec<Extent>,
    runs: Vec<BaseRun>,
}

/// Appends `seg`, or grows the last segment when `seg` continues it: the same source at the
/// next offset (image, base file, remote) or zeros after zeros; segments before `first` are
/// not this plan's and are left alone. So one planned segment, hence one SQE, covers what the
/// bitmap walk or the base chain handed over as neighbouring runs.
fn push_seg(out: &mut Vec<Seg>, first: usize, seg: Seg) {
    if seg.len == 0 {
        return;
    }
    if let Some(last) = out.get_mut(first..).and_then(|mine| mine.last_mut()) {
        if last.dest + last.len == seg.dest && continues(last.src, last.len, seg.src) {
            last.len += seg.len;
            return;
        }
    }
    out.push(seg);
}

/// Whether `next` reads on where `prev` (of `len` bytes) ends.
fn continues(prev: Src, len: u64, next: Src) -> bool {
    match (prev, next) {
        (Src::Image { offset: a }, Src::Image { offset: b })
        | (Src::Remote { offset: a }, Src::Remote { offset: b }) => a + len == b,
        (
            Src::File {
                fd: f1, offset: a, ..
            },
            Src::File {
                fd: f2, offset: b, ..
            },
        ) => f1 == f2 && a + len == b,
        (Src::Zero, Src::Zero) => true,
        _ => false,
    }
}

/// How many segments of `segs` need a transfer (every segment but zero-fills): the SQEs a
/// read planned as `segs` issues when no segment is larger than the core's largest op.
#[cfg(test)]
pub(crate) fn transfers(segs: &[Seg]) -> usize {
    segs.iter().filter(|s| s.src != Src::Zero).count()
}

/// Plans a read of `[offset, offset+len)`: appends segments whose `dest` is relative to
/// `offset`, covering it exactly, in order. Neighbouring runs of one source at contiguous
/// offsets become one segment (see [`push_seg`]): invariant, no two neighbours in `out` that
/// this call appended continue each other.
pub(crate) fn plan_read(
    bitmap: &SparseBitmap,
    base: Option<&dyn BaseSource>,
    offset: u64,
    len: u64,
    scratch: &mut SplitScratch,
    out: &mut Vec<Seg>,
) {
    let SplitScratch { ext, runs } = scratch;
    ext.clear();
    extents(bitmap, base.map(|b| b.size()), offset, len, ext);
    let first = out.len();
    for e in ext.iter().copied() {
        let dest = e.offset - offset;
        let base = match (e.kind, base) {
            (ExtentKind::Image, _) => {
                push_seg(
                    out,
                    first,
                    Seg {
                        dest,
                        len: e.len,
                        src: Src::Image { offset: e.offset },
                    },
                );
                continue;
            }
            (ExtentKind::Zero, _) | (ExtentKind::Base, None) => {
                push_seg(
                    out,
                    first,
                    Seg {
                        dest,
                        len: e.len,
                        src: Src::Zero,
                    },
                );
                continue;
            }
            (ExtentKind::Base, Some(base)) => base,
        };
        runs.clear();
        base.map(e.offset, e.len, runs);
        let mut d = dest;
        for run in runs.iter() {
            let (len, src) = match *run {
                BaseRun::File {
                    fd,
                    offset,
                    len,
                    align,
                    ..
                } => (len, Src::File { fd, offset, align }),
                BaseRun::Remote { offset, len, .. } => (len, Src::Remote { offset }),
                BaseRun::Zero { len } | BaseRun::Hole { len, .. } => (len, Src::Zero),
            };
            push_seg(out, first, Seg { dest: d, len, src });
            d += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::SECTOR_SIZE;
    use crate::io::base::RawFileBase;
    use std::fs::File;
    use std::os::fd::{AsRawFd, RawFd};

    impl Seg {
        fn src_fd(&self) -> RawFd {
            match self.src {
                Src::File { fd, .. } => fd,
                _ => -1,
            }
        }
    }

    fn kinds(v: &[Extent]) -> Vec<(u64, u64, ExtentKind)> {
        v.iter().map(|e| (e.offset, e.len, e.kind)).collect()
    }

    #[test]
    fn extents_split_by_bits_and_base_end() {
        let bm = SparseBitmap::new(16);
        bm.set_range(2, 2); // sectors 2,3
        let mut out = Vec::new();
        // Base ends in the middle of sector 5.
        extents(&bm, Some(5 * 512 + 100), 100, 8 * 512 - 100, &mut out);
        assert_eq!(
            kinds(&out),
            vec![
                (100, 1024 - 100, ExtentKind::Base),
                (1024, 1024, ExtentKind::Image),
                (2048, 5 * 512 + 100 - 2048, ExtentKind::Base),
                (5 * 512 + 100, 8 * 512 - 5 * 512 - 100, ExtentKind::Zero),
            ]
        );
        out.clear();
        extents(&bm, None, 0, 16 * 512, &mut out);
        assert_eq!(
            kinds(&out),
            vec![
                (0, 1024, ExtentKind::Zero),
                (1024, 1024, ExtentKind::Image),
                (2048, 12 * 512, ExtentKind::Zero),
            ]
        );
    }

    #[test]
    fn plan_covers_range_exactly() {
        let bm = SparseBitmap::new(64);
        bm.set_range(1, 3);
        bm.set_range(10, 1);
        let f = tempfile::tempfile().expect("tmp");
        let base = RawFileBase::new(f, 20 * 512, DioAlign::NONE);
        let mut segs = Vec::new();
        plan_read(
            &bm,
            Some(&base),
            300,
            30 * 512,
            &mut SplitScratch::default(),
            &mut segs,
        );
        let mut next = 0;
        for s in &segs {
            assert_eq!(s.dest, next, "{segs:?}");
            next += s.len;
        }
        assert_eq!(next, 30 * 512);
        assert!(matches!(segs[0].src, Src::File { offset: 300, .. }));
        assert_eq!(segs[1].src, Src::Image { offset: 512 });
        assert_eq!(segs.last().map(|s| s.src), Some(Src::Zero));
    }

    /// No two neighbouring segments could have been one: every continuation was merged.
    fn assert_coalesced(segs: &[Seg]) {
        for w in segs.windows(2) {
            assert!(
                !(w[0].dest + w[0].len == w[1].dest && continues(w[0].src, w[0].len, w[1].src)),
                "neighbours not merged: {w:?}"
            );
        }
    }

    fn plan(bm: &SparseBitmap, base: &dyn BaseSource, offset: u64, len: u64) -> Vec<Seg> {
        let mut segs = Vec::new();
        plan_read(
            bm,
            Some(base),
            offset,
            len,
            &mut SplitScratch::default(),
            &mut segs,
        );
        segs
    }

    /// The benchmark's layout: 64 KiB chunks, a fixed half of them written (bits set sector
    /// by sector, so the bitmap's chunks are mixed and its walk stops at every word). A 1 MiB
    /// read is one transfer per run of equal chunks, never one per word or per chunk.
    #[test]
    fn one_transfer_per_run_on_the_half_allocated_layout() {
        const CHUNK: u64 = 64 << 10;
        let size = 4u64 << 20;
        let written: Vec<bool> = (0..size / CHUNK)
            .map(|i| [true, true, false, true, false, false, false, true][i as usize % 8])
            .collect();
        let bm = SparseBitmap::new(size / SECTOR_SIZE);
        for (i, w) in written.iter().enumerate() {
            if *w {
                let first = i as u64 * CHUNK / SECTOR_SIZE;
                for s in first..first + CHUNK / SECTOR_SIZE {
                    bm.set_range(s, 1);
                }
            }
        }
        let f = tempfile::tempfile().expect("tmp");
        let base = RawFileBase::new(f, size, DioAlign::NONE);
        for start in [0u64, 1 << 20, 3 << 20] {
            let segs = plan(&bm, &base, start, 1 << 20);
            let chunks = &written[(start / CHUNK) as usize..((start + (1 << 20)) / CHUNK) as usize];
            let runs = 1 + chunks.windows(2).filter(|w| w[0] != w[1]).count();
            assert_eq!(segs.len(), runs, "{segs:?}");
            assert_eq!(transfers(&segs), runs);
            assert_coalesced(&segs);
            let mut at = 0;
            for seg in &segs {
                assert_eq!(seg.dest, at);
                let image = written[((start + at) / CHUNK) as usize];
                match seg.src {
                    Src::Image { offset } => assert!(image && offset == start + at),
                    Src::File { offset, .. } => assert!(!image && offset == start + at),
                    other => panic!("unexpected {other:?}"),
                }
                at += seg.len;
            }
            assert_eq!(at, 1 << 20);
        }
    }

    /// Set bits written in pieces that end at 64-bit word and bitmap-chunk boundaries read as
    /// one run of the raw image.
    #[test]
    fn bits_set_in_pieces_across_word_and_chunk_edges_are_one_transfer() {
        let chunk_bits = 8 * 4096; // bits per bitmap chunk (one 4 KiB metadata block)
        let bm = SparseBitmap::new(3 * chunk_bits);
        for (s, n) in [
            (10, 54),
            (64, 64),
            (128, chunk_bits - 128),
            (chunk_bits, 77),
        ] {
            bm.set_range(s, n);
        }
        let f = tempfile::tempfile().expect("tmp");
        let base = RawFileBase::new(f, 3 * chunk_bits * 512, DioAlign::NONE);
        let segs = plan(&bm, &base, 0, (chunk_bits + 200) * 512);
        assert_eq!(
            segs.iter()
                .map(|s| (s.dest, s.len, s.src))
                .collect::<Vec<_>>(),
            vec![
                (
                    0,
                    10 * 512,
                    Src::File {
                        fd: segs[0].src_fd(),
                        offset: 0,
                        align: DioAlign::NONE
                    }
                ),
                (
                    10 * 512,
                    (chunk_bits + 77 - 10) * 512,
                    Src::Image { offset: 5120 }
                ),
                (
                    (chunk_bits + 77) * 512,
                    123 * 512,
                    Src::File {
                        fd: segs[0].src_fd(),
                        offset: (chunk_bits + 77) * 512,
                        align: DioAlign::NONE
                    }
                ),
            ]
        );
    }

    /// A base that hands out its range in 4 KiB pieces of one file (as a chain whose clear
    /// runs fall through to the same layer piece by piece would) and zeros in pieces past 1 MiB.
    #[derive(Debug)]
    struct Pieces(File);

    impl BaseSource for Pieces {
        fn size(&self) -> u64 {
            2 << 20
        }
        fn map(&self, offset: u64, len: u64, out: &mut Vec<BaseRun>) {
            let mut at = offset;
            while at < offset + len {
                let n = (4096 - at % 4096).min(offset + len - at);
                out.push(if at < 1 << 20 {
                    BaseRun::File {
                        fd: self.0.as_raw_fd(),
                        offset: at,
                        len: n,
                        align: DioAlign::NONE,
                        layer: 0,
                    }
                } else {
                    BaseRun::Zero { len: n }
                });
                at += n;
            }
        }
        fn main_fd(&self) -> Option<RawFd> {
            Some(self.0.as_raw_fd())
        }
        fn file_len(&self, _fd: RawFd) -> u64 {
            1 << 20
        }
        fn unlock(&self) {}
        fn layers(&self) -> &dyn Stack {
            static SHAPE: Opaque = Opaque(Some(2 << 20));
            &SHAPE
        }
    }

    #[test]
    fn neighbouring_base_runs_of_one_file_are_one_transfer() {
        let bm = SparseBitmap::new(6 << 11);
        let base = Pieces(tempfile::tempfile().expect("tmp"));
        let fd = base.0.as_raw_fd();
        // Base file pieces, then base zeros, then zeros past the base's end: two segments.
        let segs = plan(&bm, &base, 100, (3 << 20) - 100);
        assert_eq!(
            segs,
            vec![
                Seg {
                    dest: 0,
                    len: (1 << 20) - 100,
                    src: Src::File {
                        fd,
                        offset: 100,
                        align: DioAlign::NONE
                    }
                },
                Seg {
                    dest: (1 << 20) - 100,
                    len: 2 << 20,
                    src: Src::Zero
                },
            ]
        );
        assert_eq!(transfers(&segs), 1);
        // What the caller had in `out` is never merged into.
        let mut segs = vec![Seg {
            dest: 0,
            len: 100,
            src: Src::File {
                fd,
                offset: 0,
                align: DioAlign::NONE,
            },
        }];
        plan_read(
            &bm,
            Some(&base),
            100,
            4096,
            &mut SplitScratch::default(),
            &mut segs,
        );
        assert_eq!(segs.len(), 2, "{segs:?}");
    }
}
