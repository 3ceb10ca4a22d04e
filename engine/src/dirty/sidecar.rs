//! The bitmaps sidecar file (`X.add-cow.bitmaps`): its layout, parser and writer. Pure: bytes in,
//! bytes out; the file I/O is the caller's (see `docs/FORMAT.md`, "Bitmaps sidecar").
//!
//! Layout (all numbers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0-7 | magic `ADDCOWBM` |
//! | 8-11 | version, u32, must be 1 |
//! | 12-15 | number of bitmaps, at most [`MAX_BITMAPS`] |
//! | 16-23 | virtual size the bitmaps cover (the overlay's) |
//! | 24-27 | header length `H` in bytes, a multiple of [`BLOCK`] |
//! | 28-31 | CRC-32 (IEEE) of bytes `0..H` with this field read as zero |
//! | 32.. | one entry per bitmap, then zeros up to `H` |
//!
//! An entry: name length u16 (1..=[`MAX_NAME`]), flags u8 (bit 0: enabled; others zero),
//! granularity as log2 u8 (9..=26), bits offset u64 (a multiple of [`BLOCK`], at or after `H`),
//! bits length u64 (`ceil(ceil(size / granularity) / 8)` rounded up to [`BLOCK`]), then the
//! name's UTF-8 bytes. Bits regions do not overlap and lie inside the file. Bit `b` of byte `j`
//! of a region is granule `8*j + b` (LSB first, as the add-cow bitmap); set = dirty. The
//! regions are not covered by the checksum: they are rewritten in place block by block, and
//! while serving their bits only go from 0 to 1, so a torn block is still between its old and
//! its new value.

/// Magic of a bitmaps sidecar.
pub const MAGIC: [u8; 8] = *b"ADDCOWBM";
/// The only version written and read.
pub const VERSION: u32 = 1;
/// Header and bits regions are laid out in blocks of this many bytes (also the unit of the
/// in-place writes of bits).
pub const BLOCK: u64 = 4096;
/// Most bitmaps one overlay may have.
pub const MAX_BITMAPS: usize = 64;
/// Longest name, in bytes.
pub const MAX_NAME: usize = 1023;
/// Smallest granularity (log2): 512 bytes.
pub const MIN_GRAN_LOG2: u8 = 9;
/// Largest granularity (log2): 64 MiB.
pub const MAX_GRAN_LOG2: u8 = 26;
/// Bytes before the entries.
const FIXED: usize = 32;
/// Bytes of an entry before its name.
const ENTRY_FIXED: usize = 20;

/// One bitmap's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub enabled: bool,
    pub gran_log2: u8,
    pub bits_offset: u64,
    pub bits_len: u64,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub size: u64,
    pub header_len: u64,
    pub entries: Vec<Entry>,
}

/// Bytes of bits region a bitmap of `size` bytes at granularity `1 << gran_log2` needs.
pub fn bits_len(size: u64, gran_log2: u8) -> u64 {
    let granules = size.div_ceil(1u64 << gran_log2);
    granules.div_ceil(8).div_ceil(BLOCK) * BLOCK
}

/// Checks a bitmap name: 1..=[`MAX_NAME`] bytes, no NUL or control character.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!(
            "bitmap name must be 1 to {MAX_NAME} bytes, got {}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("bitmap name {name:?} has a control character"));
    }
    Ok(())
}

/// Checks a granularity in bytes and returns its log2.
pub fn gran_log2(granularity: u64) -> Result<u8, String> {
    if !granularity.is_power_of_two()
        || !(1 << MIN_GRAN_LOG2..=1 << MAX_GRAN_LOG2).contains(&granularity)
    {
        return Err(format!(
            "granularity {granularity} must be a power of two from 512 bytes to 64 MiB"
        ));
    }
    Ok(granularity.trailing_zeros() as u8)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The header's length field from its first [`FIXED`] bytes (to know how much to read), after
/// checking magic and version.
pub fn header_len(first: &[u8]) -> Result<u64, String> {
    if first.len() < FIXED {
        return Err(format!(
            "file too short for a bitmaps header: {} bytes",
            first.len()
        ));
    }
    if first[..8] != MAGIC {
        return Err("bad magic: not an add-cow bitmaps file".into());
    }
    let version = be_u32(first, 8);
    if version != VERSION {
        return Err(format!(
            "unsupported bitmaps version {version} (only {VERSION})"
        ));
    }
    let h = u64::from(be_u32(first, 24));
    if h < BLOCK || h % BLOCK != 0 || h > 1 << 20 {
        return Err(format!("bad header length {h}"));
    }
    Ok(h)
}

/// Parses and validates a header; `file_len` is the sidecar's length (every bits region must lie
/// inside it). Never panics, whatever the bytes.
pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header, String> {
    let h = header_len(bytes)?;
    if (bytes.len() as u64) < h {
        return Err(format!(
            "header truncated: need {h} bytes, have {}",
            bytes.len()
        ));
    }
    let head = &bytes[..h as usize];
    let stored = be_u32(head, 28);
    if crc(head) != stored {
        return Err("header checksum mismatch (corrupt bitmaps file)".into());
    }
    let count = be_u32(head, 12) as usize;
    if count > MAX_BITMAPS {
        return Err(format!("{count} bitmaps; at most {MAX_BITMAPS}"));
    }
    let size = be_u64(head, 16);
    let mut at = FIXED;
    let mut entries: Vec<Entry> = Vec::with_capacity(count);
    for i in 0..count {
        if at + ENTRY_FIXED > head.len() {
            return Err(format!("entry {i} runs past the header"));
        }
        let name_len = usize::from(be_u16(head, at));
        let flags = head[at + 2];
        let gran_log2 = head[at + 3];
        let bits_offset = be_u64(head, at + 4);
        let bits_len = be_u64(head, at + 12);
        let name_at = at + ENTRY_FIXED;
        if name_len == 0 || name_len > MAX_NAME || name_at + name_len > head.len() {
            return Err(format!("entry {i}: bad name length {name_len}"));
        }
        let name = std::str::from_utf8(&head[name_at..name_at + name_len])
            .map_err(|_| format!("entry {i}: name is not UTF-8"))?
            .to_string();
        check_name(&name).map_err(|e| format!("entry {i}: {e}"))?;
        if flags & !1 != 0 {
            return Err(format!("entry {i} ({name}): unknown flags {flags:#x}"));
        }
        if !(MIN_GRAN_LOG2..=MAX_GRAN_LOG2).contains(&gran_log2) {
            return Err(format!("entry {i} ({name}): bad granularity 2^{gran_log2}"));
        }
        if bits_len != self::bits_len(size, gran_log2) {
            return Err(format!(
                "entry {i} ({name}): bits length {bits_len}, size {size} needs {}",
                self::bits_len(size, gran_log2)
            ));
        }
        let end = bits_offset.checked_add(bits_len);
        if bits_offset % BLOCK != 0 || bits_offset < h || end.map_or(true, |e| e > file_len) {
            return Err(format!(
                "entry {i} ({name}): bits at {bits_offset}+{bits_len} outside the file ({file_len} bytes)"
            ));
        }
        if entries.iter().any(|e| e.name == name) {
            return Err(format!("entry {i}: name {name:?} twice"));
        }
        let overlaps = entries.iter().any(|e| {
            bits_offset < e.bits_offset + e.bits_len && e.bits_offset < bits_offset + bits_len
        });
        if overlaps {
            return Err(format!("entry {i} ({name}): bits overlap another bitmap's"));
        }
        entries.push(Entry {
            name,
            enabled: flags & 1 != 0,
            gran_log2,
            bits_offset,
            bits_len,
        });
        at = name_at + name_len;
    }
    Ok(Header {
        size,
        header_len: h,
        entries,
    })
}

/// Lays out `bitmaps` (name, enabled, granularity log2) for a disk of `size` bytes: returns the
/// header bytes and each bitmap's bits offset (in order), and the file's total length.
pub fn layout(size: u64, bitmaps: &[(&str, bool, u8)]) -> (Vec<u8>, Vec<u64>, u64) {
    let need: usize = FIXED
        + bitmaps
            .iter()
            .map(|(n, _, _)| ENTRY_FIXED + n.len())
            .sum::<usize>();
    let h = (need as u64).div_ceil(BLOCK).max(1) * BLOCK;
    let mut head = vec![0u8; h as usize];
    head[..8].copy_from_slice(&MAGIC);
    head[8..12].copy_from_slice(&VERSION.to_be_bytes());
    head[12..16].copy_from_slice(&(bitmaps.len() as u32).to_be_bytes());
    head[16..24].copy_from_slice(&size.to_be_bytes());
    head[24..28].copy_from_slice(&(h as u32).to_be_bytes());
    let mut at = FIXED;
    let mut off = h;
    let mut offsets = Vec::with_capacity(bitmaps.len());
    for (name, enabled, gran) in bitmaps {
        let len = bits_len(size, *gran);
        head[at..at + 2].copy_from_slice(&(name.len() as u16).to_be_bytes());
        head[at + 2] = u8::from(*enabled);
        head[at + 3] = *gran;
        head[at + 4..at + 12].copy_from_slice(&off.to_be_bytes());
        head[at + 12..at + 20].copy_from_slice(&len.to_be_bytes());
        head[at + ENTRY_FIXED..at + ENTRY_FIXED + name.len()].copy_from_slice(name.as_bytes());
        at += ENTRY_FIXED + name.len();
        offsets.push(off);
        off += len;
    }
    let c = crc(&head);
    head[28..32].copy_from_slice(&c.to_be_bytes());
    (head, offsets, off)
}

/// CRC-32 of a header with its checksum field (bytes 28..32) read as zero.
fn crc(head: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..28]);
    h.update(&[0u8; 4]);
    h.update(&head[32..]);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_parses_back() {
        let size = 10 << 20;
        let (head, offs, len) = layout(size, &[("a", true, 16), ("bb", false, 9)]);
        let h = parse(&head, len).unwrap();
        assert_eq!(h.size, size);
        assert_eq!(h.entries.len(), 2);
        assert_eq!(h.entries[0].name, "a");
        assert!(h.entries[0].enabled);
        assert_eq!(h.entries[1].gran_log2, 9);
        assert_eq!(h.entries[1].bits_offset, offs[1]);
        assert_eq!(h.entries[1].bits_len, bits_len(size, 9));
        assert_eq!(len, offs[1] + bits_len(size, 9));
    }

    #[test]
    fn corruption_is_a_clear_error() {
        let (head, _, len) = layout(1 << 20, &[("a", true, 16)]);
        let mut bad = head.clone();
        bad[40] ^= 1;
        assert!(parse(&bad, len).unwrap_err().contains("checksum"));
        let mut bad = head.clone();
        bad[0] = b'X';
        assert!(parse(&bad, len).unwrap_err().contains("magic"));
        let mut bad = head.clone();
        bad[11] = 2;
        assert!(parse(&bad, len).unwrap_err().contains("version"));
        assert!(parse(&head, len - 1)
            .unwrap_err()
            .contains("outside the file"));
        assert!(parse(&head[..100], len).is_err());
        assert!(parse(&[], len).is_err());
    }

    #[test]
    fn names_and_granularities_are_checked() {
        assert!(check_name("").is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name(&"x".repeat(MAX_NAME + 1)).is_err());
        assert!(check_name("backup-1").is_ok());
        assert_eq!(gran_log2(65536), Ok(16));
        assert!(gran_log2(256).is_err());
        assert!(gran_log2(3 << 10).is_err());
        assert!(gran_log2(128 << 20).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let (good, _, len) = layout(1 << 30, &[("a", true, 16), ("b", true, 12)]);
        for _ in 0..2000 {
            let mut b = good.clone();
            for _ in 0..rng.gen_range(1..8) {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            let cut = rng.gen_range(0..=b.len());
            let _ = parse(&b[..cut], rng.gen_range(0..len * 2));
        }
    }
}
