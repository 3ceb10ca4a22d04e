//! The one walk down a backing chain: [`Runs`] splits a byte range into runs, each supplied by
//! one layer of a [`Stack`] (or by none: zeros).
//!
//! A layer supplies a byte when it lies inside the layer's size and, for an add-cow layer, its
//! sector's bit is set; a clear sector goes on to the layer below; a byte past a layer's end
//! (or under the bottom layer) reads as zeros, as a qcow2 chain reads in QEMU. Serving
//! (`io/base.rs`, `io/split.rs`), `map` and allocation depths, and the offline tools all walk
//! chains through this one iterator and only differ in what they make of a run (which file
//! descriptor, which `qemu-img map` attributes, which bytes to copy).
//!
//! The walk allocates nothing: the state is a fixed array with one entry per layer, so it runs
//! on the read path per request.

use crate::bitmap::SparseBitmap;
use crate::format::header::SECTOR_SIZE;

use super::MAX_CHAIN_DEPTH;

/// Layers whose clear runs a walk remembers: a top, [`MAX_CHAIN_DEPTH`] layers below it and a
/// remote bottom. (A deeper stack is still walked exactly, only without the memo below that.)
const MEMO: usize = MAX_CHAIN_DEPTH + 2;

/// What the walk needs to know of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerShape<'a> {
    /// Bytes the layer presents; past them it reads as zeros (and nothing below shows).
    pub size: u64,
    /// `Some`: an add-cow layer (set bits are its own, clear ones fall through to the layer
    /// below). `None`: every byte inside `size` is the layer's own (a raw file, a remote
    /// export, or a base the caller does not look into).
    pub bitmap: Option<&'a SparseBitmap>,
}

/// Layers, top (depth 0) first, each one the base of the one before.
pub trait Stack {
    /// How many layers there are.
    fn count(&self) -> usize;
    /// The shape of layer `depth` (`depth < count()`).
    fn shape(&self, depth: usize) -> LayerShape<'_>;
}

/// Where a run's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunSrc {
    /// Layer `depth` of the stack supplies them, at the run's own offset.
    Layer(usize),
    /// No layer does: past a layer's end, or under the bottom layer; they read as zeros.
    Zero,
}

/// One run of a walk: `len` bytes at `offset` (of the disk and, for a layer, of its data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First byte.
    pub offset: u64,
    /// Bytes (never 0).
    pub len: u64,
    /// Who supplies them.
    pub src: RunSrc,
}

/// The runs of `[offset, offset + len)` down `stack`, in order, covering the range exactly.
/// Neighbouring runs may have the same source (a bitmap lookup may stop early, at a word or
/// chunk edge, or where a layer above changes): every consumer appends runs to a list that
/// merges a run continuing the last one anyway, so the walk does not look ahead to merge.
#[derive(Debug)]
pub struct Runs<'a, S: Stack + ?Sized> {
    stack: &'a S,
    pos: u64,
    end: u64,
    /// `clear_to[d] > pos`: layer `d` is known clear (falls through) on `[pos, clear_to[d])`,
    /// from an earlier bitmap lookup (kept when an add-cow layer lies under it); so the layers
    /// above a deep run are asked once per run of their own, not once per run below them.
    clear_to: [u64; MEMO],
}

impl<'a, S: Stack + ?Sized> Runs<'a, S> {
    /// Walks `[offset, offset + len)` (saturating at `u64::MAX`).
    #[inline]
    pub fn new(stack: &'a S, offset: u64, len: u64) -> Runs<'a, S> {
        Runs {
            stack,
            pos: offset,
            end: offset.saturating_add(len),
            clear_to: [0; MEMO],
        }
    }
}

impl<S: Stack + ?Sized> Iterator for Runs<'_, S> {
    type Item = Run;

    #[inline]
    fn next(&mut self) -> Option<Run> {
        let pos = self.pos;
        if pos >= self.end {
            return None;
        }
        let mut limit = self.end;
        let mut d = 0;
        let count = self.stack.count();
        // Whether layer `d - 1` was just found clear up to `limit` by a bitmap lookup.
        let mut fresh = false;
        let src = loop {
            if d >= count {
                break RunSrc::Zero;
            }
            let shape = self.stack.shape(d);
            if pos >= shape.size {
                break RunSrc::Zero;
            }
            let Some(bitmap) = shape.bitmap else {
                limit = limit.min(shape.size);
                break RunSrc::Layer(d);
            };
            // A run of this add-cow layer may end before the clear run above does: remember
            // that run, so the next step does not ask the layer above again. (Under a layer
            // without a bitmap the run above is handed out whole: nothing to remember.)
            if fresh {
                if let Some(to) = self.clear_to.get_mut(d - 1) {
                    *to = limit;
                }
            }
            limit = limit.min(shape.size);
            if let Some(&to) = self.clear_to.get(d) {
                if to > pos {
                    limit = limit.min(to);
                    d += 1;
                    fresh = false;
                    continue;
                }
            }
            let sector = pos / SECTOR_SIZE;
            let max = (limit - 1) / SECTOR_SIZE - sector + 1;
            let (set, n) = bitmap.run_from(sector, max);
            if n == 0 {
                // Past the bitmap's end: nothing there.
                break RunSrc::Zero;
            }
            limit = limit.min((sector + n).saturating_mul(SECTOR_SIZE));
            if set {
                break RunSrc::Layer(d);
            }
            d += 1;
            fresh = true;
        };
        self.pos = limit;
        Some(Run {
            offset: pos,
            len: limit - pos,
            src,
        })
    }
}

/// A stack of one layer that holds every byte inside `size` (a base the caller does not look
/// into), or of none.
#[derive(Debug, Clone, Copy)]
pub struct Opaque(pub Option<u64>);

impl Stack for Opaque {
    #[inline]
    fn count(&self) -> usize {
        usize::from(self.0.is_some())
    }

    #[inline]
    fn shape(&self, _depth: usize) -> LayerShape<'_> {
        LayerShape {
            size: self.0.unwrap_or(0),
            bitmap: None,
        }
    }
}

/// An add-cow top (its bitmap, `size` bytes) over the layers of `lower` (depth `d` of `lower`
/// is depth `d + 1` here).
#[derive(Debug, Clone, Copy)]
pub struct Over<'a, S: Stack + ?Sized> {
    /// The top's bitmap.
    pub top: &'a SparseBitmap,
    /// The top's size.
    pub size: u64,
    /// What is under it.
    pub lower: &'a S,
}

impl<S: Stack + ?Sized> Stack for Over<'_, S> {
    #[inline]
    fn count(&self) -> usize {
        1 + self.lower.count()
    }

    #[inline]
    fn shape(&self, depth: usize) -> LayerShape<'_> {
        match depth {
            0 => LayerShape {
                size: self.size,
                bitmap: Some(self.top),
            },
            d => self.lower.shape(d - 1),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Layers in memory: `(size, Some(bits))` or `(size, None)`.
    struct Mem(Vec<(u64, Option<SparseBitmap>)>);

    impl Stack for Mem {
        fn count(&self) -> usize {
            self.0.len()
        }
        fn shape(&self, depth: usize) -> LayerShape<'_> {
            LayerShape {
                size: self.0[depth].0,
                bitmap: self.0[depth].1.as_ref(),
            }
        }
    }

    /// Who supplies byte `at`, byte by byte.
    fn brute(m: &Mem, at: u64) -> RunSrc {
        for (d, (size, bm)) in m.0.iter().enumerate() {
            if at >= *size {
                return RunSrc::Zero;
            }
            match bm {
                None => return RunSrc::Layer(d),
                Some(b) if b.get(at / SECTOR_SIZE) => return RunSrc::Layer(d),
                Some(_) => {}
            }
        }
        RunSrc::Zero
    }

    fn check(m: &Mem, offset: u64, len: u64) {
        let runs = merged(Runs::new(m, offset, len));
        let mut at = offset;
        for r in &runs {
            assert_eq!(r.offset, at, "{runs:?}");
            assert!(r.len > 0);
            // Every 64th byte and both ends of the run.
            for b in (r.offset..r.offset + r.len)
                .step_by(64)
                .chain([r.offset + r.len - 1])
            {
                assert_eq!(brute(m, b), r.src, "byte {b} in {r:?} of {runs:?}");
            }
            at += r.len;
        }
        assert_eq!(at, offset + len, "{runs:?}");
    }

    /// The runs with neighbours of one source merged, as every consumer merges them.
    pub(crate) fn merged(runs: impl Iterator<Item = Run>) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        for r in runs {
            match out.last_mut() {
                Some(last) if last.src == r.src => {
                    assert_eq!(last.offset + last.len, r.offset);
                    last.len += r.len;
                }
                _ => out.push(r),
            }
        }
        out
    }

    fn bits(sectors: u64, set: &[(u64, u64)]) -> Option<SparseBitmap> {
        let b = SparseBitmap::new(sectors);
        for &(s, n) in set {
            b.set_range(s, n);
        }
        Some(b)
    }

    #[test]
    fn three_layers_with_holes_and_a_short_base() {
        let m = Mem(vec![
            (64 * 512, bits(64, &[(0, 2), (10, 5), (40, 1)])),
            (48 * 512, bits(48, &[(1, 3), (12, 20)])),
            (20 * 512 + 100, None),
        ]);
        for (o, l) in [(0, 64 * 512), (100, 5000), (20 * 512, 30 * 512), (0, 1)] {
            check(&m, o, l);
        }
        let runs: Vec<_> = merged(Runs::new(&m, 0, 64 * 512))
            .into_iter()
            .map(|r| (r.offset, r.src))
            .collect();
        assert_eq!(
            runs,
            vec![
                (0, RunSrc::Layer(0)),
                (1024, RunSrc::Layer(1)),
                (2048, RunSrc::Layer(2)),
                (5120, RunSrc::Layer(0)),
                (7680, RunSrc::Layer(1)),
                (16384, RunSrc::Zero),
                (20480, RunSrc::Layer(0)),
                (20992, RunSrc::Zero),
            ]
        );
    }

    #[test]
    fn opaque_and_over() {
        let top = SparseBitmap::new(8);
        top.set_range(2, 2);
        let base = Opaque(Some(5 * 512 + 7));
        let s = Over {
            top: &top,
            size: 8 * 512,
            lower: &base,
        };
        let runs = merged(Runs::new(&s, 0, 8 * 512));
        assert_eq!(
            runs.iter().map(|r| (r.offset, r.src)).collect::<Vec<_>>(),
            vec![
                (0, RunSrc::Layer(1)),
                (1024, RunSrc::Layer(0)),
                (2048, RunSrc::Layer(1)),
                (5 * 512 + 7, RunSrc::Zero),
            ]
        );
        let none = Opaque(None);
        let s = Over {
            top: &top,
            size: 8 * 512,
            lower: &none,
        };
        assert_eq!(merged(Runs::new(&s, 0, 4096)).len(), 3);
    }

    proptest::proptest! {
        #[test]
        fn runs_match_the_per_sector_model(
            layers in proptest::collection::vec(
                (0u64..80, proptest::option::of(proptest::collection::vec((0u64..80, 1u64..20), 0..6)), 0u64..512),
                1..5,
            ),
            offset in 0u64..(90 * 512),
            len in 1u64..(90 * 512),
        ) {
            let m = Mem(
                layers
                    .into_iter()
                    .map(|(sectors, set, extra)| match set {
                        Some(set) => {
                            let set: Vec<_> = set
                                .into_iter()
                                .filter(|(s, _)| *s < sectors)
                                .map(|(s, n)| (s, n.min(sectors - s)))
                                .collect();
                            (sectors * 512, bits(sectors, &set))
                        }
                        None => (sectors * 512 + extra, None),
                    })
                    .collect(),
            );
            check(&m, offset, len);
        }
    }
}
