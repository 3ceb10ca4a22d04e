//! Sparse atomic bitmap.
//!
//! The bits are cut into chunks of [`CHUNK_BITS`] bits (4 KiB of bitmap, 16 MiB of disk). A
//! directory holds one pointer per chunk:
//!
//! * null: every bit of the chunk is clear (costs one pointer);
//! * the address of the static `FULL` chunk: every bit is set (costs one pointer; `FULL` is never
//!   written);
//! * otherwise a heap chunk of atomic words plus a count of its set bits ("mixed").
//!
//! Pointers only move null → `FULL` or null → heap chunk (by compare-and-swap), and a heap chunk
//! lives until the bitmap is dropped, so a reader can dereference any pointer it loaded without a
//! lock. Bits only go 0→1. A heap chunk whose count reaches its number of bits is treated as
//! uniform (all set) by [`SparseBitmap::run_from`], just as `FULL` is.
//!
//! Word layout: sector `s` is bit `s % 64` of word `s / 64`, which is exactly the on-disk
//! LSB-first order read as little-endian 64-bit words.

use std::fmt;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Bits in one chunk of the directory.
pub const CHUNK_BITS: u64 = 32768;
/// Bitmap bytes covered by one chunk.
pub const CHUNK_BYTES: u64 = CHUNK_BITS / 8;
const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;

/// A chunk of bits with a count of how many are set.
struct Chunk {
    /// Set bits in `words` (incremented after the bits are set).
    set: AtomicU32,
    words: [AtomicU64; CHUNK_WORDS],
}

impl Chunk {
    fn boxed_clear() -> Box<Chunk> {
        Box::new(Chunk {
            set: AtomicU32::new(0),
            words: [const { AtomicU64::new(0) }; CHUNK_WORDS],
        })
    }
}

/// The shared "all set" chunk. Never written: setters check for it before touching words.
static FULL: Chunk = Chunk {
    set: AtomicU32::new(CHUNK_BITS as u32),
    words: [const { AtomicU64::new(u64::MAX) }; CHUNK_WORDS],
};

fn full_ptr() -> *mut Chunk {
    ptr::addr_of!(FULL).cast_mut()
}

/// One bit per sector; see the module docs.
///
/// Invariant: while shared, bits only go 0→1 (`set_range`); there is no way to clear a bit.
/// Bits at or past [`SparseBitmap::sectors`] are always clear in memory.
pub struct SparseBitmap {
    sectors: u64,
    dir: Box<[AtomicPtr<Chunk>]>,
    /// Heap chunks allocated (for `heap_bytes`).
    mixed: AtomicUsize,
}

impl fmt::Debug for SparseBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SparseBitmap")
            .field("sectors", &self.sectors)
            .field("chunks", &self.dir.len())
            .field("mixed_chunks", &self.mixed.load(Ordering::Relaxed))
            .finish()
    }
}

/// What a chunk holds, as far as `run_from` needs to know.
enum ChunkState<'a> {
    Uniform(bool),
    Mixed(&'a Chunk),
}

impl SparseBitmap {
    /// A bitmap of `sectors` bits, all clear. Costs O(sectors / bits-per-chunk) pointers.
    pub fn new(sectors: u64) -> Self {
        let chunks = sectors.div_ceil(CHUNK_BITS) as usize;
        let dir = (0..chunks)
            .map(|_| AtomicPtr::new(ptr::null_mut()))
            .collect();
        SparseBitmap {
            sectors,
            dir,
            mixed: AtomicUsize::new(0),
        }
    }

    /// Loads `sectors` bits from `bitmap_bytes` (on-disk order). Extra bytes/bits are ignored.
    /// Chunks that are all clear or all set take no chunk memory.
    pub fn from_bytes(sectors: u64, bitmap_bytes: &[u8]) -> Self {
        let mut b = SparseBitmap::new(sectors);
        b.load_bytes(0, bitmap_bytes);
        b
    }

    /// ORs on-disk bitmap bytes that start at bitmap byte `byte_offset` into the bitmap (bits past
    /// the end are ignored). Used to stream a bitmap in through a small buffer: a call that covers
    /// a whole chunk which is all clear or all set allocates nothing for it, so callers should
    /// pass buffers aligned to [`CHUNK_BYTES`].
    pub fn load_bytes(&mut self, byte_offset: u64, bytes: &[u8]) {
        let total_bytes = self.sectors.div_ceil(8);
        let end = byte_offset
            .saturating_add(bytes.len() as u64)
            .min(total_bytes);
        let mut pos = byte_offset;
        while pos < end {
            let c = pos / CHUNK_BYTES;
            let chunk_first = c * CHUNK_BYTES;
            let chunk_end = (chunk_first + CHUNK_BYTES).min(total_bytes);
            let seg_end = end.min(chunk_end);
            let seg = &bytes[(pos - byte_offset) as usize..(seg_end - byte_offset) as usize];
            let whole = pos == chunk_first && seg_end == chunk_end;
            if seg.iter().all(|&b| b == 0) {
                pos = seg_end;
                continue;
            }
            if whole && self.all_ones(chunk_first, seg) {
                let slot = &self.dir[c as usize];
                if slot.load(Ordering::Acquire).is_null() {
                    slot.store(full_ptr(), Ordering::Release);
                    pos = seg_end;
                    continue;
                }
            }
            if let Some(chunk) = self.chunk_for_write(c as usize) {
                // OR whole words made of up to 8 bytes each.
                let mut p = pos;
                while p < seg_end {
                    let word_first = p & !7;
                    let mut val = 0u64;
                    let stop = (word_first + 8).min(seg_end);
                    for q in p..stop {
                        let byte = seg[(q - pos) as usize];
                        val |= u64::from(byte) << (8 * (q - word_first));
                    }
                    let bit0 = word_first * 8;
                    val &= self.valid_mask(bit0);
                    let wi = ((bit0 % CHUNK_BITS) / 64) as usize;
                    Self::or_word(chunk, wi, val);
                    p = stop;
                }
            }
            pos = seg_end;
        }
    }

    /// Whether `seg`, the bitmap bytes of a whole chunk starting at byte `first`, has every bit
    /// below `sectors` set.
    fn all_ones(&self, first: u64, seg: &[u8]) -> bool {
        let Some((&last, body)) = seg.split_last() else {
            return false;
        };
        if !body.iter().all(|&b| b == 0xff) {
            return false;
        }
        let last_byte = first + body.len() as u64;
        let bits = (self.sectors - last_byte * 8).min(8);
        let mask = if bits == 8 { 0xff } else { (1u8 << bits) - 1 };
        last & mask == mask
    }

    /// Mask of the bits of the word starting at bit `bit0` that lie below `sectors`.
    fn valid_mask(&self, bit0: u64) -> u64 {
        let left = self.sectors.saturating_sub(bit0);
        if left >= 64 {
            u64::MAX
        } else {
            (1u64 << left) - 1
        }
    }

    /// ORs `val` into word `wi` of `chunk`; returns the bits that went 0→1.
    fn or_word(chunk: &Chunk, wi: usize, val: u64) -> u64 {
        if val == 0 {
            return 0;
        }
        let old = chunk.words[wi].fetch_or(val, Ordering::AcqRel);
        let new = val & !old;
        if new != 0 {
            chunk.set.fetch_add(new.count_ones(), Ordering::AcqRel);
        }
        new
    }

    /// Number of sectors covered.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Bits (sectors) held by chunk `c`.
    fn chunk_bits(&self, c: usize) -> u64 {
        (self.sectors - c as u64 * CHUNK_BITS).min(CHUNK_BITS)
    }

    /// The chunk behind slot `c`, or `None` when it is all clear.
    fn chunk(&self, c: usize) -> Option<&Chunk> {
        let p = self.dir.get(c)?.load(Ordering::Acquire);
        // SAFETY: a non-null slot points either at the static FULL or at a heap chunk that was
        // published by a compare-and-swap (Release) and is only freed in `Drop`, which needs
        // `&mut self`; so it lives at least as long as `&self`.
        unsafe { p.as_ref() }
    }

    fn state(&self, c: usize) -> ChunkState<'_> {
        let p = self.dir[c].load(Ordering::Acquire);
        if p.is_null() {
            return ChunkState::Uniform(false);
        }
        if p == full_ptr() {
            return ChunkState::Uniform(true);
        }
        // SAFETY: as in `chunk`: published heap chunk, freed only on drop.
        let chunk = unsafe { &*p };
        // `set` is incremented after the bits themselves, so a full count proves every bit is
        // set; a zero count proves nothing (a setter may be between its two steps), so such a
        // chunk is scanned word by word.
        let set = u64::from(chunk.set.load(Ordering::Acquire));
        if set >= self.chunk_bits(c) {
            ChunkState::Uniform(true)
        } else {
            ChunkState::Mixed(chunk)
        }
    }

    /// The heap chunk of slot `c` to set bits in, allocating it if the slot is null; `None` when
    /// the slot is `FULL` (nothing to set).
    fn chunk_for_write(&self, c: usize) -> Option<&Chunk> {
        let slot = &self.dir[c];
        let mut p = slot.load(Ordering::Acquire);
        if p.is_null() {
            let fresh = Box::into_raw(Chunk::boxed_clear());
            match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.mixed.fetch_add(1, Ordering::Relaxed);
                    p = fresh;
                }
                Err(current) => {
                    // SAFETY: `fresh` came from `Box::into_raw` above and was never published.
                    drop(unsafe { Box::from_raw(fresh) });
                    p = current;
                }
            }
        }
        if p == full_ptr() {
            return None;
        }
        // SAFETY: non-null, not FULL: a published heap chunk that lives until drop.
        Some(unsafe { &*p })
    }

    /// Whether `sector` is set. Out-of-range sectors read as clear.
    pub fn get(&self, sector: u64) -> bool {
        if sector >= self.sectors {
            return false;
        }
        let c = (sector / CHUNK_BITS) as usize;
        match self.chunk(c) {
            None => false,
            Some(chunk) => {
                let wi = ((sector % CHUNK_BITS) / 64) as usize;
                chunk.words[wi].load(Ordering::Acquire) >> (sector % 64) & 1 == 1
            }
        }
    }

    /// Sets bits `[start, start+count)` (clipped to the size) atomically; returns the inclusive
    /// range of bitmap *byte* indices whose value changed, or `None` if none changed.
    pub fn set_range(&self, start: u64, count: u64) -> Option<(u64, u64)> {
        self.set_range_counted(start, count).0
    }

    /// [`SparseBitmap::set_range`], also returning how many bits went from 0 to 1.
    pub fn set_range_counted(&self, start: u64, count: u64) -> (Option<(u64, u64)>, u64) {
        let end = start.saturating_add(count).min(self.sectors);
        let mut changed: Option<(u64, u64)> = None;
        let mut newly = 0u64;
        let mut note = |first: u64, last: u64, n: u64| {
            newly += n;
            changed = Some(match changed {
                None => (first, last),
                Some((a, b)) => (a.min(first), b.max(last)),
            });
        };
        let mut pos = start;
        while pos < end {
            let c = (pos / CHUNK_BITS) as usize;
            let chunk_first = c as u64 * CHUNK_BITS;
            let chunk_end = chunk_first + self.chunk_bits(c);
            let seg_end = end.min(chunk_end);
            if pos == chunk_first && seg_end == chunk_end {
                let slot = &self.dir[c];
                if slot
                    .compare_exchange(
                        ptr::null_mut(),
                        full_ptr(),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    note(pos, seg_end - 1, seg_end - pos);
                    pos = seg_end;
                    continue;
                }
            }
            if let Some(chunk) = self.chunk_for_write(c) {
                let mut p = pos;
                while p < seg_end {
                    let word_first = p & !63;
                    let stop = (word_first + 64).min(seg_end);
                    let lo = p - word_first;
                    let n = stop - p;
                    let mask = if n == 64 {
                        u64::MAX
                    } else {
                        ((1u64 << n) - 1) << lo
                    };
                    let wi = ((word_first % CHUNK_BITS) / 64) as usize;
                    let new = Self::or_word(chunk, wi, mask);
                    if new != 0 {
                        let first = word_first + u64::from(new.trailing_zeros());
                        let last = word_first + 63 - u64::from(new.leading_zeros());
                        note(first, last, u64::from(new.count_ones()));
                    }
                    p = stop;
                }
            }
            pos = seg_end;
        }
        (changed.map(|(a, b)| (a / 8, b / 8)), newly)
    }

    /// The value of bit `start` and how many consecutive bits from `start` share it, at most
    /// `max` (and never past the end). `max == 0` or `start` past the end gives `(false, 0)`.
    ///
    /// Cost: O(1) per uniform chunk, one word load per 64 bits of a mixed chunk.
    pub fn run_from(&self, start: u64, max: u64) -> (bool, u64) {
        if max == 0 || start >= self.sectors {
            return (false, 0);
        }
        // A run is never empty: if bit `start` went 0→1 between reading it and scanning its chunk,
        // the scan finds 0 bits equal to the old value; bits never go back, so one retry (which
        // reads it as set) is enough.
        loop {
            let run = self.run_of(start, max, self.get(start));
            if run.1 > 0 {
                return run;
            }
        }
    }

    /// How many bits from `start` (valid, `max` non-zero) equal `value`, which the caller read
    /// from bit `start` a moment ago (so the answer is 0 if that bit has since been set).
    fn run_of(&self, start: u64, max: u64, value: bool) -> (bool, u64) {
        let end = start.saturating_add(max).min(self.sectors);
        let mut pos = start;
        'chunks: while pos < end {
            let c = (pos / CHUNK_BITS) as usize;
            let chunk_end = (c as u64 * CHUNK_BITS + CHUNK_BITS).min(end);
            match self.state(c) {
                ChunkState::Uniform(v) => {
                    if v != value {
                        break;
                    }
                    pos = chunk_end;
                }
                ChunkState::Mixed(chunk) => {
                    while pos < chunk_end {
                        let wi = ((pos % CHUNK_BITS) / 64) as usize;
                        let w = chunk.words[wi].load(Ordering::Acquire);
                        // Bits that differ from `value` are ones in `diff`.
                        let diff = if value { !w } else { w };
                        let off = pos % 64;
                        let avail = 64 - off;
                        let rest = diff >> off;
                        let same = if rest == 0 {
                            avail
                        } else {
                            u64::from(rest.trailing_zeros()).min(avail)
                        };
                        pos += same;
                        if same < avail {
                            break 'chunks;
                        }
                    }
                }
            }
        }
        (value, pos.min(end) - start)
    }

    /// Number of set bits.
    pub fn count_set(&self) -> u64 {
        (0..self.dir.len())
            .map(|c| match self.state(c) {
                ChunkState::Uniform(false) => 0,
                ChunkState::Uniform(true) => self.chunk_bits(c),
                ChunkState::Mixed(chunk) => u64::from(chunk.set.load(Ordering::Acquire)),
            })
            .sum()
    }

    /// Whether every bit is set (the raw image is a complete disk).
    pub fn is_full(&self) -> bool {
        self.sectors == 0 || self.run_from(0, u64::MAX) == (true, self.sectors)
    }

    /// Copies bitmap bytes `[byte_offset, byte_offset + out.len())` in on-disk order into `out`;
    /// bytes past the end of the bitmap are written as zero.
    pub fn copy_bytes(&self, byte_offset: u64, out: &mut [u8]) {
        let total_bytes = self.sectors.div_ceil(8);
        let mut i = 0usize;
        while i < out.len() {
            let b = byte_offset.saturating_add(i as u64);
            if b >= total_bytes {
                out[i..].fill(0);
                return;
            }
            let c = (b / CHUNK_BYTES) as usize;
            let chunk_stop = ((c as u64 + 1) * CHUNK_BYTES).min(total_bytes);
            let n = ((chunk_stop - b) as usize).min(out.len() - i);
            let dst = &mut out[i..i + n];
            match self.chunk(c) {
                None => dst.fill(0),
                Some(chunk) => {
                    // One atomic load per word, not per byte.
                    let mut cached: Option<(usize, u64)> = None;
                    for (k, d) in dst.iter_mut().enumerate() {
                        let byte = b + k as u64;
                        let wi = ((byte % CHUNK_BYTES) / 8) as usize;
                        let w = match cached {
                            Some((i, w)) if i == wi => w,
                            _ => {
                                let w = chunk.words[wi].load(Ordering::Acquire)
                                    & self.valid_mask((byte & !7) * 8);
                                cached = Some((wi, w));
                                w
                            }
                        };
                        *d = (w >> (8 * (byte % 8))) as u8;
                    }
                }
            }
            i += n;
        }
    }

    /// Heap bytes used (for the memory benchmark): the directory plus every mixed chunk.
    pub fn heap_bytes(&self) -> usize {
        self.dir.len() * std::mem::size_of::<AtomicPtr<Chunk>>()
            + self.mixed.load(Ordering::Relaxed) * std::mem::size_of::<Chunk>()
    }
}

impl Drop for SparseBitmap {
    fn drop(&mut self) {
        for slot in self.dir.iter_mut() {
            let p = *slot.get_mut();
            if !p.is_null() && p != full_ptr() {
                // SAFETY: non-null, non-FULL slots hold pointers from `Box::into_raw` that were
                // published once and never freed; `&mut self` means no reader is left.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A plain reference model.
    fn model_run(bits: &[bool], start: u64, max: u64) -> (bool, u64) {
        let n = bits.len() as u64;
        if max == 0 || start >= n {
            return (false, 0);
        }
        let v = bits[start as usize];
        let end = start.saturating_add(max).min(n);
        let mut p = start;
        while p < end && bits[p as usize] == v {
            p += 1;
        }
        (v, p - start)
    }

    #[test]
    fn new_is_clear_and_small() {
        let b = SparseBitmap::new(1000);
        assert!(!b.get(0));
        assert!(!b.get(999));
        assert!(!b.get(5000));
        assert_eq!(b.count_set(), 0);
        assert_eq!(b.run_from(0, u64::MAX), (false, 1000));
        assert_eq!(b.run_from(1000, 5), (false, 0));
        assert_eq!(b.run_from(3, 0), (false, 0));
    }

    #[test]
    fn set_range_reports_changed_bytes() {
        let b = SparseBitmap::new(100);
        assert_eq!(b.set_range(3, 10), Some((0, 1)));
        assert_eq!(b.set_range(3, 10), None);
        assert_eq!(b.set_range(0, 16), Some((0, 1)));
        assert_eq!(b.set_range(90, 1000), Some((11, 12)));
        assert_eq!(b.set_range(100, 5), None);
        assert_eq!(b.count_set(), 16 + 10);
        assert!(b.get(99));
        assert!(!b.get(100));
        let mut out = [0xaau8; 15];
        b.copy_bytes(0, &mut out);
        assert_eq!(
            out,
            [0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfc, 0x0f, 0, 0]
        );
    }

    #[test]
    fn bit_order_is_lsb_first() {
        let mut bytes = vec![0u8; 4];
        bytes[0] = 0b0000_0101; // sectors 0 and 2
        bytes[3] = 0b1000_0000; // sector 31
        let b = SparseBitmap::from_bytes(32, &bytes);
        let set: Vec<u64> = (0..32).filter(|&s| b.get(s)).collect();
        assert_eq!(set, vec![0, 2, 31]);
        let mut out = [0u8; 4];
        b.copy_bytes(0, &mut out);
        assert_eq!(out.to_vec(), bytes);
    }

    #[test]
    fn from_bytes_ignores_bits_past_end() {
        let b = SparseBitmap::from_bytes(3, &[0xff, 0xff]);
        assert_eq!(b.count_set(), 3);
        let mut out = [0u8; 2];
        b.copy_bytes(0, &mut out);
        assert_eq!(out, [0x07, 0]);
        assert!(b.is_full());
    }

    #[test]
    fn run_from_across_chunk_boundaries() {
        let n = 4 * CHUNK_BITS + 100;
        let b = SparseBitmap::new(n);
        // Set from the middle of chunk 0 through chunk 2 and into chunk 3.
        let s = CHUNK_BITS / 2 + 3;
        let e = 3 * CHUNK_BITS + 77;
        b.set_range(s, e - s);
        assert_eq!(b.run_from(0, u64::MAX), (false, s));
        assert_eq!(b.run_from(s, u64::MAX), (true, e - s));
        assert_eq!(b.run_from(s + 1, 10), (true, 10));
        assert_eq!(b.run_from(CHUNK_BITS, u64::MAX), (true, e - CHUNK_BITS));
        assert_eq!(b.run_from(e, u64::MAX), (false, n - e));
        assert_eq!(b.run_from(e - 1, u64::MAX), (true, 1));
        assert_eq!(b.count_set(), e - s);
        // Chunks 1 and 2 became FULL without allocation; 0 and 3 are mixed.
        assert_eq!(b.mixed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn mixed_chunk_filled_up_is_uniform() {
        let b = SparseBitmap::new(2 * CHUNK_BITS);
        b.set_range(0, 1);
        b.set_range(1, CHUNK_BITS - 1);
        assert!(matches!(b.state(0), ChunkState::Uniform(true)));
        assert_eq!(b.run_from(0, u64::MAX), (true, CHUNK_BITS));
    }

    #[test]
    fn random_against_model() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        for &n in &[1u64, 63, 64, 65, 1000, CHUNK_BITS + 1, 3 * CHUNK_BITS - 5] {
            let b = SparseBitmap::new(n);
            let mut model = vec![false; n as usize];
            for _ in 0..60 {
                let start = rng.gen_range(0..n + 10);
                let len = if rng.gen_bool(0.2) {
                    rng.gen_range(0..2 * CHUNK_BITS)
                } else {
                    rng.gen_range(0..200)
                };
                let got = b.set_range(start, len);
                let mut changed: Option<(u64, u64)> = None;
                for s in start..start.saturating_add(len).min(n) {
                    if !model[s as usize] {
                        model[s as usize] = true;
                        let by = s / 8;
                        changed = Some(changed.map_or((by, by), |(a, c)| (a.min(by), c.max(by))));
                    }
                }
                assert_eq!(got, changed, "n={n} start={start} len={len}");
                for _ in 0..20 {
                    let st = rng.gen_range(0..n + 3);
                    let mx = rng.gen_range(0..3 * CHUNK_BITS);
                    assert_eq!(b.run_from(st, mx), model_run(&model, st, mx));
                }
            }
            let expect = model.iter().filter(|&&x| x).count() as u64;
            assert_eq!(b.count_set(), expect);
            let mut bytes = vec![0u8; n.div_ceil(8) as usize + 3];
            b.copy_bytes(0, &mut bytes);
            let back = SparseBitmap::from_bytes(n, &bytes);
            for s in 0..n {
                assert_eq!(back.get(s), model[s as usize]);
            }
            // copy_bytes from an odd offset matches the full copy.
            let mut tail = vec![0u8; 9];
            b.copy_bytes(1, &mut tail);
            for (k, t) in tail.iter().enumerate() {
                assert_eq!(*t, bytes.get(k + 1).copied().unwrap_or(0));
            }
        }
    }

    #[test]
    fn load_bytes_in_pieces_matches_from_bytes() {
        let n = 3 * CHUNK_BITS + 13;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut bytes = vec![0u8; n.div_ceil(8) as usize];
        // Chunk 0 all set, chunk 1 random, chunk 2 clear, tail random.
        bytes[..CHUNK_BYTES as usize].fill(0xff);
        for x in &mut bytes[CHUNK_BYTES as usize..2 * CHUNK_BYTES as usize] {
            *x = rng.gen();
        }
        let last = bytes.len() - 1;
        bytes[last] = 0xff;
        let whole = SparseBitmap::from_bytes(n, &bytes);
        let mut pieces = SparseBitmap::new(n);
        for (i, piece) in bytes.chunks(1000).enumerate() {
            pieces.load_bytes(i as u64 * 1000, piece);
        }
        for s in 0..n {
            assert_eq!(whole.get(s), pieces.get(s), "sector {s}");
        }
        assert!(matches!(whole.state(0), ChunkState::Uniform(true)));
        assert!(matches!(whole.state(2), ChunkState::Uniform(false)));
        assert_eq!(whole.count_set(), pieces.count_set());
    }

    #[test]
    fn one_tib_uniform_bitmaps_are_small() {
        let sectors = (1u64 << 40) / 512;
        let clear = SparseBitmap::new(sectors);
        assert!(clear.heap_bytes() < 1 << 20, "{}", clear.heap_bytes());
        assert_eq!(clear.run_from(0, u64::MAX), (false, sectors));
        let full = SparseBitmap::new(sectors);
        assert_eq!(full.set_range(0, sectors), Some((0, sectors / 8 - 1)));
        assert!(full.heap_bytes() < 1 << 20, "{}", full.heap_bytes());
        assert_eq!(full.count_set(), sectors);
        assert!(full.is_full());
        assert_eq!(full.run_from(5, u64::MAX), (true, sectors - 5));
        // Loading an all-set bitmap through a chunk-aligned buffer allocates no chunk.
        let mut loaded = SparseBitmap::new(sectors);
        let buf = vec![0xffu8; 1 << 20];
        let mut off = 0;
        while off < sectors / 8 {
            loaded.load_bytes(off, &buf);
            off += buf.len() as u64;
        }
        assert_eq!(loaded.mixed.load(Ordering::Relaxed), 0);
        assert!(loaded.is_full());
    }

    #[test]
    fn concurrent_setters() {
        let n = 2 * CHUNK_BITS + 500;
        let b = SparseBitmap::new(n);
        let threads = 4u64;
        let changed_total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..threads {
                let b = &b;
                let changed_total = &changed_total;
                s.spawn(move || {
                    // Interleaved, overlapping single-bit and small-range sets.
                    let mut i = t;
                    while i < n {
                        b.set_range(i, 3);
                        i += threads;
                    }
                    // Readers see a prefix-monotonic view: a set bit stays set.
                    let (v, _) = b.run_from(t, 1);
                    assert!(v);
                    changed_total.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(changed_total.load(Ordering::Relaxed), threads);
        assert_eq!(b.count_set(), n);
        assert!(b.is_full());
        assert_eq!(b.run_from(0, u64::MAX), (true, n));
    }

    #[test]
    fn a_bit_set_after_it_was_read_gives_an_empty_scan_which_run_from_retries() {
        // The interleaving run_from must survive: bit `start` read as clear, then set (in a
        // heap chunk, by a whole-chunk FULL swap, and with other bits around it), then scanned.
        let b = SparseBitmap::new(3 * CHUNK_BITS);
        b.set_range(5, 1);
        b.set_range(CHUNK_BITS, CHUNK_BITS);
        for start in [5, CHUNK_BITS, CHUNK_BITS + 77] {
            assert_eq!(b.run_of(start, 100, false), (false, 0));
            assert!(b.run_from(start, 100).1 > 0);
        }
        assert_eq!(b.run_from(5, 100), (true, 1));
        assert_eq!(
            b.run_from(CHUNK_BITS + 77, u64::MAX),
            (true, CHUNK_BITS - 77)
        );
    }

    #[test]
    fn runs_are_never_empty_while_bits_are_being_set() {
        // A reader racing setters must always get a non-empty run whose first bit matches a
        // value the bit had (clear before its set, set after).
        let n = 4 * CHUNK_BITS;
        let b = SparseBitmap::new(n);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Whole chunks (null -> FULL) and single bits in fresh chunks (count 0 -> 1).
                b.set_range(CHUNK_BITS, CHUNK_BITS);
                for k in 0..CHUNK_BITS {
                    b.set_range(k, 1);
                    b.set_range(2 * CHUNK_BITS + (k * 7919) % CHUNK_BITS, 1);
                }
                b.set_range(3 * CHUNK_BITS, CHUNK_BITS);
                stop.store(true, Ordering::Release);
            });
            s.spawn(|| {
                let mut i = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let start = (i * 104_729) % n;
                    let (_, len) = b.run_from(start, u64::MAX);
                    assert!(len > 0, "empty run at {start}");
                    i += 1;
                }
            });
        });
        assert!(b.is_full());
    }

    #[test]
    fn concurrent_first_touch_of_a_chunk_allocates_once() {
        let b = SparseBitmap::new(CHUNK_BITS * 2);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let b = &b;
                s.spawn(move || {
                    for k in 0..1000u64 {
                        b.set_range(t * 1000 + k, 1);
                    }
                });
            }
        });
        assert_eq!(b.count_set(), 4000);
        assert_eq!(b.mixed.load(Ordering::Relaxed), 1);
        assert_eq!(b.run_from(0, u64::MAX), (true, 4000));
    }
}
