//! What a commit writes to the metadata file: the dirty blocks grouped into spans, and the
//! copy of their bytes from the in-memory bitmap. Pure functions, so their bounds are tested
//! directly (the commit itself is `core/commit.rs`).

use crate::bitmap::SparseBitmap;
use crate::format::HEADER_SIZE;

/// Longest single metadata write. A longer run of dirty blocks becomes several spans (lengths
/// are split, never cut), and one span's buffer stays small.
pub(crate) const SPAN_MAX: u64 = 1 << 20;

/// Clean blocks between two dirty runs that are written too, making one write of two. The
/// bytes a commit writes are then at most `1 + MERGE_GAP` times the dirty blocks' bytes.
pub(crate) const MERGE_GAP: u64 = 1;

/// A contiguous run of metadata-file bytes to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub offset: u64,
    pub len: u64,
}

/// Groups dirty block indices (ascending, as `DirtyBlocks::take` returns them) into spans of the
/// metadata file, in one pass (time linear in the number of blocks):
/// * adjacent dirty blocks share a span, and so do two runs at most [`MERGE_GAP`] clean blocks
///   apart (rewriting a clean block is harmless: a copy only holds bits whose data completed
///   before the copy, and so before the raw-image fdatasync that precedes the write);
/// * no span is longer than [`SPAN_MAX`];
/// * spans are clipped to `meta_len`.
///
/// So the bytes written are at most `(1 + MERGE_GAP) * blocks.len() * block_size`.
pub(crate) fn spans(blocks: &[u64], block_size: u64, meta_len: u64) -> Vec<Span> {
    let block_size = block_size.max(1);
    let max_blocks = (SPAN_MAX / block_size).max(1);
    let mut out = Vec::new();
    let mut emit = |start: u64, end: u64| {
        let from = start.saturating_mul(block_size);
        let to = end.saturating_mul(block_size).min(meta_len);
        let mut at = from;
        while at < to {
            let len = (to - at).min(SPAN_MAX.max(block_size));
            out.push(Span { offset: at, len });
            at += len;
        }
    };
    let mut run: Option<(u64, u64)> = None; // blocks [start, end)
    for &b in blocks {
        run = match run {
            None => Some((b, b + 1)),
            Some((start, end)) if b < end => Some((start, end)),
            Some((start, end)) if b - end <= MERGE_GAP && b + 1 - start <= max_blocks => {
                Some((start, b + 1))
            }
            Some((start, end)) => {
                emit(start, end);
                Some((b, b + 1))
            }
        };
    }
    if let Some((start, end)) = run {
        emit(start, end);
    }
    out
}

/// Fills `out` with the metadata-file bytes at `offset`: the header as read at open (`header`),
/// then the current in-memory bitmap.
pub(crate) fn copy_span(header: &[u8], bitmap: &SparseBitmap, offset: u64, out: &mut [u8]) {
    let header_len = HEADER_SIZE as u64;
    let mut pos = 0usize;
    if offset < header_len {
        let n = ((header_len - offset) as usize).min(out.len());
        let src = header.get(offset as usize..offset as usize + n);
        if let (Some(src), Some(dst)) = (src, out.get_mut(..n)) {
            dst.copy_from_slice(src);
        }
        pos = n;
    }
    if let Some(rest) = out.get_mut(pos..) {
        if !rest.is_empty() {
            bitmap.copy_bytes(offset + pos as u64 - header_len, rest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::DirtyBlocks;
    use crate::format::{bitmap_len, BITMAP_OFFSET};
    use std::time::{Duration, Instant};

    fn pairs(v: &[Span]) -> Vec<(u64, u64)> {
        v.iter().map(|s| (s.offset, s.len)).collect()
    }

    #[test]
    fn spans_coalesce_small_gaps_and_clip() {
        assert_eq!(
            pairs(&spans(&[0, 1, 2, 5], 4096, 1 << 30)),
            vec![(0, 3 * 4096), (5 * 4096, 4096)]
        );
        // A one-block gap is written too.
        assert_eq!(pairs(&spans(&[0, 2], 4096, 1 << 30)), vec![(0, 3 * 4096)]);
        // The last block is clipped to the file length.
        assert_eq!(
            pairs(&spans(&[2], 4096, 2 * 4096 + 100)),
            vec![(2 * 4096, 100)]
        );
        assert!(spans(&[], 4096, 100).is_empty());
        // A long run is split at SPAN_MAX, never cut.
        let run: Vec<u64> = (0..600).collect();
        let s = spans(&run, 4096, 1 << 30);
        assert_eq!(
            pairs(&s),
            vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 88 * 4096)]
        );
    }

    /// What a commit of `blocks` writes, checked: spans ascending and disjoint, every dirty
    /// block covered, no span over SPAN_MAX. Returns (bytes written, dirty bytes, spans).
    fn check_commit(blocks: &[u64], meta_len: u64) -> (u64, u64, usize) {
        let s = spans(blocks, 4096, meta_len);
        let mut prev_end = 0;
        for span in &s {
            assert!(span.offset >= prev_end, "spans ascend and do not overlap");
            assert!(span.len > 0 && span.len <= SPAN_MAX && span.len <= u64::from(u32::MAX));
            prev_end = span.offset + span.len;
        }
        assert!(prev_end <= meta_len);
        let mut i = 0;
        for &b in blocks {
            let at = b * 4096;
            while i < s.len() && s[i].offset + s[i].len <= at {
                i += 1;
            }
            assert!(
                i < s.len() && s[i].offset <= at,
                "dirty block {b} is written"
            );
        }
        let written = s.iter().map(|x| x.len).sum();
        let dirty = blocks
            .iter()
            .map(|&b| (meta_len - b * 4096).min(4096))
            .sum();
        (written, dirty, s.len())
    }

    /// Runs `f` on a thread and fails (instead of hanging the suite) if it takes over a minute.
    fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("planning one commit took over a minute: not linear in the dirty blocks")
    }

    #[test]
    fn a_commit_on_a_16_tib_bitmap_with_alternating_dirty_blocks_writes_at_most_twice_the_dirty_bytes(
    ) {
        let size = 16u64 << 40;
        let blen = bitmap_len(size);
        assert_eq!(blen, 1 << 32, "a 4 GiB bitmap");
        let meta_len = BITMAP_OFFSET + blen;
        let dirty = DirtyBlocks::new(blen, 4096);
        let every_other: Vec<u64> = (0..dirty.blocks()).step_by(2).collect();
        dirty.remark(&every_other);
        let blocks = dirty.take();
        assert!(blocks.len() > 1 << 18, "half a million dirty blocks");
        let started = Instant::now();
        let (written, dirty_bytes, n) = within_a_minute(move || check_commit(&blocks, meta_len));
        eprintln!(
            "alternating: {n} spans, {written} bytes written for {dirty_bytes} dirty ({:.2}x), \
             planned in {:?}",
            written as f64 / dirty_bytes as f64,
            started.elapsed()
        );
        assert!(
            written <= (1 + MERGE_GAP) * dirty_bytes,
            "{written} bytes written for {dirty_bytes} dirty"
        );
    }

    #[test]
    fn a_commit_on_a_16_tib_bitmap_with_sparse_dirty_blocks_writes_only_them() {
        let meta_len = BITMAP_OFFSET + bitmap_len(16u64 << 40);
        let blocks: Vec<u64> = (0..meta_len.div_ceil(4096)).step_by(1000).collect();
        let n_blocks = blocks.len();
        let (written, dirty_bytes, n) = within_a_minute(move || check_commit(&blocks, meta_len));
        assert_eq!(n, n_blocks, "no gap of 999 blocks is merged");
        assert_eq!(written, dirty_bytes);
        // Every third block: gaps of two are not merged either.
        let blocks: Vec<u64> = (0..meta_len.div_ceil(4096)).step_by(3).collect();
        let (written, dirty_bytes, _) = within_a_minute(move || check_commit(&blocks, meta_len));
        assert_eq!(written, dirty_bytes);
        // The last block is clipped, whatever the pattern.
        let last = meta_len.div_ceil(4096) - 1;
        let (written, _, _) = check_commit(&[last], meta_len);
        assert_eq!(written, meta_len - last * 4096);
    }

    #[test]
    fn copy_span_puts_the_header_before_the_bitmap() {
        let bm = SparseBitmap::new(64 * 1024);
        bm.set_range(0, 8);
        let header = vec![0xAB; HEADER_SIZE];
        let mut out = vec![0u8; 4096];
        copy_span(&header, &bm, 0, &mut out);
        assert!(out[..HEADER_SIZE].iter().all(|&b| b == 0xAB));
        assert_eq!(out[HEADER_SIZE], 0xFF);
        assert!(out[HEADER_SIZE + 1..].iter().all(|&b| b == 0));
        let mut out = vec![0u8; 16];
        copy_span(&header, &bm, HEADER_SIZE as u64, &mut out);
        assert_eq!(out[0], 0xFF);
    }
}
