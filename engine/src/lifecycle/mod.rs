//! Offline lifecycle operations on an overlay: [`resize`], [`rebase`] and [`commit`].
//!
//! Each one changes on-disk state in an order that keeps every crash state a valid overlay that
//! reads as an allowed state (the orders are documented on each module and in
//! `docs/LIFECYCLE.md`). All their file changes go through [`fileops`], which the crash checker
//! records and replays; guest-visible bytes of bases are read through [`view`].

pub mod commit;
pub mod fileops;
pub mod rebase;
pub mod resize;
pub mod view;

pub use commit::{commit, CommitOptions, Committed};
pub use fileops::{FileOp, OpLog, Ops};
pub use rebase::{rebase, RebaseOptions, Rebased};
pub use resize::{resize, resize_from, ResizeOptions, Resized};
pub use view::View;

use crate::error::{Error, Result};
use crate::format::BITMAP_OFFSET;
use crate::sys::next_data;
use fileops::OpFile;

/// Bytes of bitmap read and rewritten at a time.
const WINDOW: usize = 64 * 1024;

/// Clears, on disk, the bit of every sector from `from_sector` on within the first `end_byte`
/// bytes of the bitmap in `meta` (reading what is there, so stray bits past the end of the disk
/// are cleared too). Only windows that change are written; holes are skipped. No sync.
pub(crate) fn clear_bits_from(meta: &OpFile, from_sector: u64, end_byte: u64) -> Result<()> {
    let mut pos = from_sector / 8;
    let mut buf = vec![0u8; WINDOW];
    while pos < end_byte {
        let Some(data) = next_data(meta.file(), BITMAP_OFFSET + pos)
            .map_err(|e| Error::io("seek data in bitmap", e).with_path(meta.path()))?
        else {
            break;
        };
        let start = data.saturating_sub(BITMAP_OFFSET).max(pos);
        if start >= end_byte {
            break;
        }
        let n = ((end_byte - start) as usize).min(WINDOW);
        let window = &mut buf[..n];
        meta.read_at(window, BITMAP_OFFSET + start, "read bitmap")?;
        let mut changed = false;
        for (i, b) in window.iter_mut().enumerate() {
            let first_sector = (start + i as u64) * 8;
            let keep = if first_sector + 8 <= from_sector {
                0xff
            } else if first_sector >= from_sector {
                0
            } else {
                (1u8 << (from_sector - first_sector)) - 1
            };
            if *b & !keep != 0 {
                *b &= keep;
                changed = true;
            }
        }
        if changed {
            meta.write_at(window, BITMAP_OFFSET + start, "clear bitmap bits")?;
        }
        pos = start + n as u64;
    }
    Ok(())
}

/// Clears, on disk, the bits of `runs` (sorted, disjoint `(first sector, count)`, inside the
/// first `end_byte` bytes of the bitmap) in the bitmap of `meta`, and no other bit: each bitmap
/// window the runs touch is read, cleared under the runs and written back if it changed. No
/// sync.
pub(crate) fn clear_runs(meta: &OpFile, runs: &[(u64, u64)], end_byte: u64) -> Result<()> {
    /// The window in `buf`: its first bitmap byte, its length, whether it changed.
    struct Window {
        start: u64,
        len: usize,
        changed: bool,
    }
    let flush = |buf: &[u8], w: &Window| -> Result<()> {
        if w.changed {
            meta.write_at(&buf[..w.len], BITMAP_OFFSET + w.start, "clear bitmap bits")?;
        }
        Ok(())
    };
    let mut buf = vec![0u8; WINDOW];
    let mut cur: Option<Window> = None;
    for &(first, count) in runs {
        let end = (first + count).min(end_byte * 8);
        let mut s = first;
        while s < end {
            let start = s / 8 / WINDOW as u64 * WINDOW as u64;
            if cur.as_ref().map(|w| w.start) != Some(start) {
                if let Some(w) = cur.take() {
                    flush(&buf, &w)?;
                }
                let len = ((end_byte - start) as usize).min(WINDOW);
                meta.read_at(&mut buf[..len], BITMAP_OFFSET + start, "read bitmap")?;
                cur = Some(Window {
                    start,
                    len,
                    changed: false,
                });
            }
            let Some(w) = cur.as_mut() else { break };
            let first_bit = w.start * 8;
            let stop = end.min(first_bit + w.len as u64 * 8);
            w.changed |= clear_bit_range(&mut buf[..w.len], s - first_bit, stop - first_bit);
            s = stop;
        }
    }
    if let Some(w) = cur {
        flush(&buf, &w)?;
    }
    Ok(())
}

/// Clears bits `[from, to)` of `bytes` (LSB first); whether any was set.
fn clear_bit_range(bytes: &mut [u8], from: u64, to: u64) -> bool {
    let mut changed = false;
    let mut b = from;
    while b < to {
        let byte = (b / 8) as usize;
        let lo = b % 8;
        let hi = (to - b / 8 * 8).min(8);
        let mask = (((1u16 << hi) - 1) as u8) & !(((1u16 << lo) - 1) as u8);
        if bytes[byte] & mask != 0 {
            bytes[byte] &= !mask;
            changed = true;
        }
        b = b / 8 * 8 + hi;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::clear_bit_range;

    #[test]
    fn clear_bit_range_clears_exactly_the_range() {
        for (from, to) in [(0, 24), (3, 5), (7, 9), (1, 23), (8, 16), (5, 5)] {
            let mut b = [0xffu8; 3];
            assert_eq!(clear_bit_range(&mut b, from, to), from < to);
            for bit in 0..24u64 {
                let set = b[(bit / 8) as usize] & (1 << (bit % 8)) != 0;
                assert_eq!(
                    set,
                    !(from..to).contains(&bit),
                    "bit {bit} of [{from}, {to})"
                );
            }
        }
    }
}
