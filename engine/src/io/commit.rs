//! Group commit state and the bitmap-block copy (DESIGN invariant 3).
//!
//! The sequence one commit runs (submitted by the core that starts it, as one linked chain):
//!
//! 1. `DirtyBlocks::take()` clears the marks and returns the dirty metadata blocks;
//! 2. their bytes are copied from the in-memory bitmap ([`copy_spans`]); only bits whose data
//!    write already completed are set, so every copied bit covers completed data;
//! 3. `fdatasync(raw image)` ─link→ `write(meta, span)`… ─link→ `fdatasync(meta)`.
//!
//! A failed step cancels the rest of the chain; the commit then re-marks its blocks and fails
//! the FLUSHes waiting on it. One commit is in flight per disk ([`CommitState::in_flight`]);
//! FLUSH/FUA requests arriving meanwhile wait in [`CommitState::next`] and share the next one.

use crate::format::HEADER_SIZE;

use super::disk::DiskShared;
use super::RequestError;

/// A request waiting for a commit: answered on `core` with the commit's result.
pub(crate) struct Waiter {
    pub core: usize,
    pub answer: Box<dyn FnOnce(Result<(), RequestError>) + Send>,
}

/// The per-disk commit state, behind the disk's mutex.
#[derive(Default)]
pub(crate) struct CommitState {
    /// A commit chain is submitted and not finished.
    pub in_flight: bool,
    /// Waiters that arrived while a commit was in flight: they need the next commit.
    pub next: Vec<Waiter>,
}

/// A contiguous run of metadata-file bytes to write: `[offset, offset + data.len())`.
#[derive(Debug)]
pub(crate) struct Span {
    pub offset: u64,
    pub len: u64,
}

/// Groups dirty block indices (ascending) into at most `max_spans` byte spans of the metadata
/// file, clipped to `meta_len`. Gaps between blocks may be merged into a span: rewriting a clean
/// block is harmless, because a copy only ever contains bits whose data completed before the
/// copy (and so before the raw-image fdatasync that precedes the write).
pub(crate) fn spans(blocks: &[u64], block_size: u64, meta_len: u64, max_spans: usize) -> Vec<Span> {
    let mut runs: Vec<(u64, u64)> = Vec::new(); // inclusive block ranges
    for &b in blocks {
        match runs.last_mut() {
            Some(last) if b <= last.1 + 1 => last.1 = last.1.max(b),
            _ => runs.push((b, b)),
        }
    }
    let max_spans = max_spans.max(1);
    while runs.len() > max_spans {
        // Merge the pair with the smallest gap.
        let Some(i) = (0..runs.len() - 1).min_by_key(|&i| runs[i + 1].0 - runs[i].1) else {
            break;
        };
        runs[i].1 = runs[i + 1].1;
        runs.remove(i + 1);
    }
    runs.into_iter()
        .filter_map(|(a, b)| {
            let start = a * block_size;
            let end = ((b + 1) * block_size).min(meta_len);
            (end > start).then(|| Span {
                offset: start,
                len: end - start,
            })
        })
        .collect()
}

/// Fills `out` with the metadata-file bytes at `offset`: the header as read at open, then the
/// current in-memory bitmap.
pub(crate) fn copy_span(disk: &DiskShared, offset: u64, out: &mut [u8]) {
    let header = HEADER_SIZE as u64;
    let mut pos = 0usize;
    if offset < header {
        let n = ((header - offset) as usize).min(out.len());
        let src = disk.header.get(offset as usize..offset as usize + n);
        if let (Some(src), Some(dst)) = (src, out.get_mut(..n)) {
            dst.copy_from_slice(src);
        }
        pos = n;
    }
    if let Some(rest) = out.get_mut(pos..) {
        if !rest.is_empty() {
            disk.bitmap.copy_bytes(offset + pos as u64 - header, rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[Span]) -> Vec<(u64, u64)> {
        v.iter().map(|s| (s.offset, s.len)).collect()
    }

    #[test]
    fn spans_coalesce_and_clip() {
        assert_eq!(
            pairs(&spans(&[0, 1, 2, 5], 4096, 1 << 30, 8)),
            vec![(0, 3 * 4096), (5 * 4096, 4096)]
        );
        // The last block is clipped to the file length.
        assert_eq!(
            pairs(&spans(&[2], 4096, 2 * 4096 + 100, 8)),
            vec![(2 * 4096, 100)]
        );
        // Too many runs: the closest ones merge.
        assert_eq!(
            pairs(&spans(&[0, 2, 10], 4096, 1 << 30, 2)),
            vec![(0, 3 * 4096), (10 * 4096, 4096)]
        );
        assert!(spans(&[], 4096, 100, 4).is_empty());
    }
}
