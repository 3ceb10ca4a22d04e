//! No input from disk makes the format code panic: random corruptions of a valid overlay go
//! through `Overlay::open`, `check` and `map_runs`, which must answer with a value or an error.

use std::os::unix::fs::FileExt;

use addcow_engine::bitmap::SparseBitmap;
use addcow_engine::format::{check, map_runs, Header, OpenOptions, Overlay};
use proptest::prelude::*;

fn valid(backing: &[u8]) -> Vec<u8> {
    let mut v = Header {
        backing_file: backing.to_vec(),
        image_file: b"img.raw".to_vec(),
        reserved_nonzero: false,
    }
    .encode()
    .unwrap()
    .to_vec();
    v.extend_from_slice(&[0u8; 64]);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn corrupted_overlays_never_panic(
        pokes in proptest::collection::vec((0usize..2700, any::<u8>()), 0..12),
        truncate_to in proptest::option::of(0usize..2700),
        image_len in 0u64..(600 * 512),
        with_base in any::<bool>(),
        base_len in 0u64..(700 * 512),
    ) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let mut bytes = valid(if with_base { b"base.img" } else { b"" });
        for (at, val) in pokes {
            if let Some(b) = bytes.get_mut(at) {
                *b = val;
            }
        }
        if let Some(n) = truncate_to {
            bytes.truncate(n);
        }
        let meta = root.join("f.add-cow");
        std::fs::write(&meta, &bytes).unwrap();
        let img = std::fs::File::create(root.join("img.raw")).unwrap();
        img.set_len(image_len).unwrap();
        img.write_all_at(&[1u8; 512], image_len / 2).unwrap();
        let base = std::fs::File::create(root.join("base.img")).unwrap();
        base.set_len(base_len).unwrap();
        if base_len > 8192 {
            base.write_all_at(&[2u8; 4096], 4096).unwrap();
        }
        let _ = Header::parse(&bytes);
        let report = check(&meta);
        match Overlay::open(&meta, &OpenOptions::default()) {
            Ok(o) => {
                // An overlay that opens has no corruption findings, and maps cleanly over
                // exactly the virtual size.
                prop_assert!(!report.has_corruption(), "{:?}", report);
                let runs = map_runs(&o).unwrap();
                let total: u64 = runs.iter().map(|r| r.length).sum();
                prop_assert_eq!(total, o.virtual_size);
            }
            Err(e) => {
                prop_assert!(report.has_corruption(), "open failed ({}) but check is clean", e);
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn bitmap_from_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600),
                             sectors in 0u64..6000) {
        let b = SparseBitmap::from_bytes(sectors, &bytes);
        let mut out = vec![0u8; bytes.len()];
        b.copy_bytes(0, &mut out);
        for s in 0..sectors.min(bytes.len() as u64 * 8) {
            let want = bytes[(s / 8) as usize] >> (s % 8) & 1 == 1;
            prop_assert_eq!(b.get(s), want);
        }
        // Runs alternate in value and tile the whole bitmap.
        let (mut pos, mut prev) = (0u64, None);
        while pos < sectors {
            let (v, n) = b.run_from(pos, u64::MAX);
            prop_assert!(n > 0);
            prop_assert_ne!(Some(v), prev);
            prop_assert_eq!(v, b.get(pos));
            prev = Some(v);
            pos += n;
        }
        prop_assert_eq!(pos, sectors);
    }
}
