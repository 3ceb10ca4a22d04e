//! Granule bit arrays as `u64` words (word `i` bit `k` = granule `64*i + k`; as bytes, little
//! endian, which is the sidecar's LSB-first byte order).

/// Sets granules `[g0, g1)`; returns whether any bit changed.
pub(crate) fn set_range(words: &mut [u64], g0: u64, g1: u64) -> bool {
    let mut changed = false;
    let mut g = g0;
    while g < g1 {
        let w = (g / 64) as usize;
        let b = g % 64;
        let n = (64 - b).min(g1 - g);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        if let Some(word) = words.get_mut(w) {
            changed |= *word & mask != mask;
            *word |= mask;
        }
        g += n;
    }
    changed
}

/// Whether every granule of `[g0, g1)` is set.
pub(crate) fn all_set(words: &[u64], g0: u64, g1: u64) -> bool {
    let mut g = g0;
    while g < g1 {
        let w = (g / 64) as usize;
        let b = g % 64;
        let n = (64 - b).min(g1 - g);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << b
        };
        match words.get(w) {
            Some(word) if word & mask == mask => {}
            _ => return false,
        }
        g += n;
    }
    true
}

/// Whether granule `g` is set.
pub(crate) fn get(words: &[u64], g: u64) -> bool {
    words
        .get((g / 64) as usize)
        .is_some_and(|w| w & (1 << (g % 64)) != 0)
}

/// Clears every granule at or after `g` (what a shrink drops).
pub(crate) fn clear_from(words: &mut [u64], g: u64) {
    let w = (g / 64) as usize;
    if let Some(word) = words.get_mut(w) {
        let b = g % 64;
        *word &= if b == 0 { 0 } else { (1u64 << b) - 1 };
    }
    for word in words.iter_mut().skip(w + 1) {
        *word = 0;
    }
}

/// The bytes of words `[w0, w1)`.
pub(crate) fn to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Words from bytes (a length that is a multiple of 8).
pub(crate) fn from_bytes(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_bytes() {
        let mut w = vec![0u64; 4];
        assert!(set_range(&mut w, 3, 70));
        assert!(!set_range(&mut w, 10, 20));
        assert!(all_set(&w, 3, 70));
        assert!(!all_set(&w, 2, 70));
        assert!(!all_set(&w, 3, 71));
        assert!(get(&w, 69) && !get(&w, 70));
        let b = to_bytes(&w);
        assert_eq!(b[0], 0b1111_1000, "LSB first");
        assert_eq!(from_bytes(&b), w);
        clear_from(&mut w, 65);
        assert!(get(&w, 64) && !get(&w, 65));
        assert!(!all_set(&w, 0, 1000), "past the end is not set");
    }
}
