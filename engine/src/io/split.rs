//! Read splitting: a byte range becomes runs of raw image, base and zeros.
//!
//! Pure functions over the bitmap and the base, so they are easy to test and to benchmark.

use crate::bitmap::SparseBitmap;
use crate::format::SECTOR_SIZE;

use super::align::DioAlign;
use super::base::{BaseRun, BaseSource};
use super::request::{DepthExtent, Extent, ExtentKind};

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
/// exact at the ends). The range must lie within the bitmap's sectors.
pub(crate) fn extents(
    bitmap: &SparseBitmap,
    base_size: Option<u64>,
    offset: u64,
    len: u64,
    out: &mut Vec<Extent>,
) {
    let end = offset.saturating_add(len);
    let base_end = base_size.unwrap_or(0);
    let push = |out: &mut Vec<Extent>, offset: u64, len: u64, kind: ExtentKind| {
        if len == 0 {
            return;
        }
        if let Some(last) = out.last_mut() {
            if last.kind == kind && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        out.push(Extent { offset, len, kind });
    };
    let mut pos = offset;
    while pos < end {
        let sector = pos / SECTOR_SIZE;
        let max = (end - 1) / SECTOR_SIZE - sector + 1;
        let (set, n) = bitmap.run_from(sector, max);
        if n == 0 {
            // Past the bitmap's end: nothing is allocated there.
            push(out, pos, end - pos, ExtentKind::Zero);
            break;
        }
        let run_end = ((sector + n) * SECTOR_SIZE).min(end);
        if set {
            push(out, pos, run_end - pos, ExtentKind::Image);
        } else {
            let split = run_end.min(base_end.max(pos));
            push(out, pos, split - pos, ExtentKind::Base);
            push(out, split, run_end - split, ExtentKind::Zero);
        }
        pos = run_end;
    }
}

/// Splits `[offset, offset+len)` by the layer that supplies each byte (see [`DepthExtent`]):
/// the top bitmap first, then the base's runs for its clear sectors.
pub(crate) fn depth_extents(
    bitmap: &SparseBitmap,
    base: Option<&dyn BaseSource>,
    offset: u64,
    len: u64,
    out: &mut Vec<DepthExtent>,
) {
    let mut ext = Vec::new();
    extents(bitmap, base.map(|b| b.size()), offset, len, &mut ext);
    let push = |out: &mut Vec<DepthExtent>, offset: u64, len: u64, depth: u32| {
        if len == 0 {
            return;
        }
        if let Some(last) = out.last_mut() {
            if last.depth == depth && last.offset + last.len == offset {
                last.len += len;
                return;
            }
        }
        out.push(DepthExtent { offset, len, depth });
    };
    let mut runs = Vec::new();
    for e in ext {
        match (e.kind, base) {
            (ExtentKind::Image, _) => push(out, e.offset, e.len, 1),
            (ExtentKind::Base, Some(b)) => {
                runs.clear();
                b.map(e.offset, e.len, &mut runs);
                let mut at = e.offset;
                for r in &runs {
                    let (len, depth) = match *r {
                        BaseRun::File { len, layer, .. }
                        | BaseRun::Remote { len, layer, .. }
                        | BaseRun::Hole { len, layer } => (len, layer.saturating_add(2)),
                        BaseRun::Zero { len } => (len, 0),
                    };
                    push(out, at, len, depth);
                    at += len;
                }
            }
            (ExtentKind::Base, None) | (ExtentKind::Zero, _) => push(out, e.offset, e.len, 0),
        }
    }
}

/// Reusable vectors for [`plan_read`] (so the read path does not allocate per request).
#[derive(Debug, Default)]
pub(crate) struct SplitScratch {
    ext: Vec<Extent>,
    runs: Vec<BaseRun>,
}

/// Plans a read of `[offset, offset+len)`: appends segments whose `dest` is relative to
/// `offset`, covering it exactly, in order.
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
    for e in ext.iter().copied() {
        let dest = e.offset - offset;
        match e.kind {
            ExtentKind::Image => out.push(Seg {
                dest,
                len: e.len,
                src: Src::Image { offset: e.offset },
            }),
            ExtentKind::Zero => out.push(Seg {
                dest,
                len: e.len,
                src: Src::Zero,
            }),
            ExtentKind::Base => {
                let Some(base) = base else {
                    out.push(Seg {
                        dest,
                        len: e.len,
                        src: Src::Zero,
                    });
                    continue;
                };
                runs.clear();
                base.map(e.offset, e.len, runs);
                let mut d = dest;
                for run in runs.iter() {
                    match *run {
                        BaseRun::File {
                            fd,
                            offset,
                            len,
                            align,
                            ..
                        } => {
                            out.push(Seg {
                                dest: d,
                                len,
                                src: Src::File { fd, offset, align },
                            });
                            d += len;
                        }
                        BaseRun::Remote { offset, len, .. } => {
                            out.push(Seg {
                                dest: d,
                                len,
                                src: Src::Remote { offset },
                            });
                            d += len;
                        }
                        BaseRun::Zero { len } | BaseRun::Hole { len, .. } => {
                            out.push(Seg {
                                dest: d,
                                len,
                                src: Src::Zero,
                            });
                            d += len;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::base::RawFileBase;

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
}
