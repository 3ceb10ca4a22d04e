//! The dirty bitmaps sidecar's header parser on arbitrary bytes: never a panic; a header it
//! accepts lays out again into one that parses to the same bitmaps (names, flags,
//! granularities) with regions inside the file and apart.
#![no_main]

use addcow_engine::dirty::sidecar;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes pick the file length the regions must fit in; the rest is the file.
    if data.len() < 8 {
        return;
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&data[..8]);
    let file_len = u64::from_le_bytes(len);
    let bytes = &data[8..];
    let _ = sidecar::header_len(bytes);
    let Ok(h) = sidecar::parse(bytes, file_len) else {
        return;
    };
    for e in &h.entries {
        assert!(e.bits_offset >= h.header_len && e.bits_offset + e.bits_len <= file_len);
    }
    let list: Vec<(&str, bool, u8)> = h
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.enabled, e.gran_log2))
        .collect();
    let (head, offsets, total) = sidecar::layout(h.size, &list);
    let again = sidecar::parse(&head, total).expect("a laid out header parses");
    assert_eq!(again.entries.len(), h.entries.len());
    for ((a, b), off) in again.entries.iter().zip(&h.entries).zip(offsets) {
        assert_eq!((&a.name, a.enabled, a.gran_log2), (&b.name, b.enabled, b.gran_log2));
        assert_eq!(a.bits_offset, off);
    }
});
