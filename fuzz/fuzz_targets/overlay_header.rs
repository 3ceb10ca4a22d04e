//! The add-cow header and bitmap parsers on arbitrary bytes: never a panic; a parsed header
//! encodes back to the bytes it came from (fields and padding); a bitmap loaded from bytes
//! reports runs that add up to its size and copies back exactly the bits it was given.
#![no_main]

use addcow_engine::bitmap::SparseBitmap;
use addcow_engine::format::header::{Header, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::parse(data) {
        if let Ok(bytes) = h.encode() {
            let again = Header::parse(&bytes).expect("an encoded header parses");
            assert_eq!(again.encode().ok(), Some(bytes));
        }
    }
    // The bitmap: the first two bytes pick a sector count (up to 2^16), the rest is the bitmap.
    if data.len() < 2 {
        return;
    }
    let sectors = u64::from(u16::from_le_bytes([data[0], data[1]]));
    let bytes = &data[2..];
    let bm = SparseBitmap::from_bytes(sectors, bytes);
    let mut pos = 0;
    let mut set = 0;
    while pos < sectors {
        let (is_set, n) = bm.run_from(pos, sectors - pos);
        assert!(n > 0 && pos + n <= sectors, "run {n} at {pos} of {sectors}");
        for s in pos..pos + n {
            assert_eq!(bm.get(s), is_set);
        }
        if is_set {
            set += n;
        }
        pos += n;
    }
    assert_eq!(set, bm.count_set());
    let len = sectors.div_ceil(8) as usize;
    let mut out = vec![0u8; len];
    bm.copy_bytes(0, &mut out);
    for (i, b) in out.iter().enumerate() {
        let given = bytes.get(i).copied().unwrap_or(0);
        let valid = if (i + 1) * 8 <= sectors as usize {
            0xff
        } else {
            (1u16 << (sectors as usize - i * 8)) as u8 - 1
        };
        assert_eq!(*b & valid, given & valid, "bitmap byte {i}");
    }
    let _ = HEADER_SIZE;
});
