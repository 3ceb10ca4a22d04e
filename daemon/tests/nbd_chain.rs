//! Backing chains served over NBD, with real clients: a raw base under three add-cow layers
//! (each written with whole and partial sectors, over and past the layers below) read through
//! the export and compared with `qemu-img compare` against a raw reference the test builds
//! itself; `nbdinfo --map=qemu:allocation-depth` reports depths 1 to 4 and 0 where nothing is
//! allocated; `addcow info --backing-chain`, `addcow map` and `addcow create -b` on a chain.

use std::path::{Path, PathBuf};
use std::process::Command;

use addcow_daemon_testkit::{addcow, addcow_ok, assert_identical, run, text, Daemon};
use addcow_engine::format::{create, CreateOptions};
use addcow_engine::{DiskOptions, Engine, EngineConfig};

const K: u64 = 1024;

struct LayerModel {
    size: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 0x80)
        .collect()
}

/// The bytes a layer serves: the view below clipped/zero-extended to its size, then its writes.
fn view(lower: &[u8], layer: &LayerModel) -> Vec<u8> {
    let mut v = vec![0u8; layer.size as usize];
    let n = lower.len().min(v.len());
    v[..n].copy_from_slice(&lower[..n]);
    for (off, d) in &layer.writes {
        v[*off as usize..*off as usize + d.len()].copy_from_slice(d);
    }
    v
}

/// The NBD allocation depth of sector `s` (1 = top): the top-most layer that wrote any byte of
/// it; past a layer's end nothing below counts (0); the raw bottom covers a sector it has any
/// byte of.
fn sector_depth(s: u64, top_first: &[&LayerModel], raw_len: u64) -> u32 {
    for (i, l) in top_first.iter().enumerate() {
        if s * 512 >= l.size {
            return 0;
        }
        let wrote = l.writes.iter().any(|(off, d)| {
            let (a, b) = (off / 512, (off + d.len() as u64 - 1) / 512);
            (a..=b).contains(&s)
        });
        if wrote {
            return i as u32 + 1;
        }
    }
    if s * 512 < raw_len {
        top_first.len() as u32 + 1
    } else {
        0
    }
}

fn layer_on(dir: &Path, name: &str, base: &Path, size: u64) -> PathBuf {
    let p = dir.join(format!("{name}.add-cow"));
    create(&CreateOptions {
        overlay: p.clone(),
        base: Some(base.to_path_buf()),
        size: Some(size),
        ..CreateOptions::default()
    })
    .expect("create layer");
    p
}

struct Built {
    dir: tempfile::TempDir,
    raw_len: u64,
    /// Top first: c, b, a.
    paths: Vec<PathBuf>,
    models: Vec<LayerModel>,
    reference: Vec<u8>,
}

/// raw r (768 KiB + 100 bytes) <- a (1 MiB) <- b (896 KiB) <- c (1.5 MiB), each written
/// through the engine.
fn build() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let raw_len = 768 * K + 100;
    let raw: Vec<u8> = (0..raw_len).map(|i| (i % 251) as u8 + 1).collect();
    let r = dir.path().join("r.img");
    std::fs::write(&r, &raw).unwrap();
    let a = LayerModel {
        size: K * K,
        writes: vec![
            (0, pattern(1, 64 * K)),
            (100 * K + 7, pattern(2, 1000)),
            (700 * K, pattern(3, 40 * K)),
            (900 * K + 3, pattern(4, 8 * K)),
        ],
    };
    let b = LayerModel {
        size: 896 * K,
        writes: vec![
            (32 * K, pattern(5, 64 * K)),
            (100 * K + 600, pattern(6, 100)),
            (880 * K, pattern(7, 16 * K)),
        ],
    };
    let c = LayerModel {
        size: 1536 * K,
        writes: vec![
            (48 * K, pattern(8, 4 * K)),
            (300 * K + 1, pattern(9, 511)),
            (1000 * K, pattern(10, 4 * K)),
        ],
    };
    let engine = Engine::start(EngineConfig {
        cores: 1,
        ..EngineConfig::default()
    })
    .unwrap();
    let mut below = r.clone();
    let mut paths = Vec::new();
    for (name, m) in [("a", &a), ("b", &b), ("c", &c)] {
        let p = layer_on(dir.path(), name, &below, m.size);
        let d = engine.open(&p, DiskOptions::default()).unwrap();
        for (off, data) in &m.writes {
            d.write_at(*off, data, false).unwrap();
        }
        d.close().unwrap();
        paths.insert(0, p.clone());
        below = p;
    }
    engine.shutdown().unwrap();
    let reference = view(&view(&view(&raw, &a), &b), &c);
    Built {
        dir,
        raw_len,
        paths,
        models: vec![c, b, a],
        reference,
    }
}

/// `nbdinfo --map=CONTEXT` rows: (offset, length, type).
fn map(context: &str, uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run("nbdinfo", &[&format!("--map={context}"), uri]);
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn a_depth_three_chain_is_served_byte_for_byte_with_its_depths() {
    let b = build();
    let refp = b.dir.path().join("reference.raw");
    std::fs::write(&refp, &b.reference).unwrap();
    let d = Daemon::start(
        &b.dir.path().join("s.sock"),
        &[b.paths[0].to_str().unwrap()],
    );
    let uri = d.uri();
    assert_identical(refp.to_str().unwrap(), &uri);
    // The same by nbdcopy, whole, as a second client.
    let copy = b.dir.path().join("copy.raw");
    run("nbdcopy", &[&uri, copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == b.reference,
        "nbdcopy copy differs"
    );

    // qemu:allocation-depth: per sector from the models, merged into runs.
    let models: Vec<&LayerModel> = b.models.iter().collect();
    let size = b.reference.len() as u64;
    let mut want: Vec<(u64, u64, u32)> = Vec::new();
    for s in 0..size / 512 {
        let dep = sector_depth(s, &models, b.raw_len);
        match want.last_mut() {
            Some(l) if l.2 == dep => l.1 += 512,
            _ => want.push((s * 512, 512, dep)),
        }
    }
    let got = map("qemu:allocation-depth", &uri);
    assert_eq!(got, want, "nbdinfo --map=qemu:allocation-depth");
    for depth in 0..=4 {
        assert!(
            got.iter().any(|r| r.2 == depth),
            "depth {depth} missing: {got:?}"
        );
    }
    // base:allocation still answers and covers the disk.
    let ba = map("base:allocation", &uri);
    assert_eq!(ba.iter().map(|r| r.1).sum::<u64>(), size);
    d.stop();

    // `addcow map --json`: qemu-img's numbering (0 = top raw image), the same layers.
    let out = addcow_ok(".", &["map", "--json", b.paths[0].to_str().unwrap()]);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let mut covered = 0;
    for r in &runs {
        let (start, len) = (r["start"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        let present = r["present"].as_bool().unwrap();
        let depth = r["depth"].as_u64().unwrap() as u32;
        for s in (start / 512)..(start + len).div_ceil(512) {
            let nbd = sector_depth(s, &models, b.raw_len);
            let qemu = if present { depth + 1 } else { 0 };
            // The raw bottom's last sector is partly past its end: map splits it.
            if s * 512 < b.raw_len && (s + 1) * 512 > b.raw_len {
                continue;
            }
            assert_eq!(qemu, nbd, "addcow map at sector {s}: {r}");
        }
        covered += len;
    }
    assert_eq!(covered, size);
    let table = addcow_ok(".", &["map", b.paths[0].to_str().unwrap()]);
    assert!(
        table.contains("layer 3") && table.contains("layer 4"),
        "{table}"
    );
}

#[test]
fn info_lists_the_backing_chain() {
    let b = build();
    let top = b.paths[0].to_str().unwrap();
    let out = addcow_ok(".", &["info", "--backing-chain", "--json", top]);
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(v.len(), 4, "{out}");
    let names: Vec<&str> = v.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert!(
        names[0].ends_with("c.add-cow") && names[1].ends_with("b.add-cow"),
        "{out}"
    );
    assert!(
        names[2].ends_with("a.add-cow") && names[3].ends_with("r.img"),
        "{out}"
    );
    let formats: Vec<&str> = v.iter().map(|l| l["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["add-cow", "add-cow", "add-cow", "raw"]);
    let sizes: Vec<u64> = v
        .iter()
        .map(|l| l["virtual_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [1536 * K, 896 * K, K * K, 768 * K + 100]);
    for (i, l) in v.iter().enumerate() {
        assert_eq!(l["depth"].as_u64(), Some(i as u64 + 1));
        assert_eq!(l["backing_file"].as_str(), names.get(i + 1).copied());
    }
    let text = addcow_ok(".", &["info", "--backing-chain", top]);
    assert_eq!(text.matches("layer ").count(), 4, "{text}");
    assert!(text.contains("format:         raw"), "{text}");

    // create -b over the top of the chain takes its virtual size.
    let d = b.dir.path().join("d.add-cow");
    let out = addcow_ok(".", &["create", "-b", top, d.to_str().unwrap()]);
    assert!(out.contains(&format!("({} bytes)", 1536 * K)), "{out}");
    let out = addcow_ok(
        ".",
        &["info", "--backing-chain", "--json", d.to_str().unwrap()],
    );
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(v.len(), 5);
}

#[test]
fn serving_refuses_a_loop_with_a_clear_error() {
    let b = build();
    // a's base becomes c: c -> b -> a -> c.
    let a = &b.paths[2];
    let mut meta = std::fs::read(a).unwrap();
    meta[12..1036].fill(0);
    meta[12..21].copy_from_slice(b"c.add-cow");
    std::fs::write(a, &meta).unwrap();
    let o = addcow(".", &["info", b.paths[0].to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("backing chain loop") && err.contains("c.add-cow"),
        "{err}"
    );
    let out = Command::new(addcow_daemon_testkit::addcow_bin())
        .args(["serve", "--socket"])
        .arg(b.dir.path().join("s.sock"))
        .arg(&b.paths[0])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backing chain loop"), "{err}");
}
