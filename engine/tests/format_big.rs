//! Opening a fresh 1 TiB overlay streams its (sparse, all-clear) bitmap through a small buffer:
//! the process grows by well under 16 MiB. One test in its own binary, so no other test's memory
//! is counted.

use addcow_engine::format::{create, CreateOptions, OpenOptions, Overlay};

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn fresh_one_tib_overlay_opens_small() {
    let t = tempfile::tempdir().unwrap();
    let overlay = t.path().join("big.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        size: Some(1 << 40),
        ..Default::default()
    })
    .unwrap();
    let before = rss_bytes();
    let o = Overlay::open(&overlay, &OpenOptions::default()).unwrap();
    let after = rss_bytes();
    assert_eq!(o.virtual_size, 1 << 40);
    assert_eq!(o.bitmap.count_set(), 0);
    assert!(
        o.bitmap.heap_bytes() < 1 << 20,
        "bitmap heap {}",
        o.bitmap.heap_bytes()
    );
    let grew = after.saturating_sub(before);
    assert!(grew < 16 << 20, "open grew RSS by {grew} bytes");
    eprintln!(
        "1 TiB open: RSS grew {} KiB, bitmap heap {} KiB",
        grew / 1024,
        o.bitmap.heap_bytes() / 1024
    );
}
