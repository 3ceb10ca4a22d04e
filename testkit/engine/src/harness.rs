//! Overlays created with the library on real files in a temporary directory (their base holds
//! [`base_byte`]), engines with small arenas, and a model of what the disk must read as.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use addcow_engine::format::{create, CreateOptions};
use addcow_engine::{CacheMode, Disk, DiskOptions, Engine, EngineConfig, Request};

pub use crate::pattern::base_byte;

/// An overlay in a temporary directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub overlay: PathBuf,
    pub base: Option<PathBuf>,
    pub size: u64,
    pub base_size: u64,
}

/// Creates an overlay of `size` bytes over a base of `base_size` bytes (0 = no base).
pub fn fixture(size: u64, base_size: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = (base_size > 0).then(|| {
        let p = dir.path().join("base.img");
        let bytes: Vec<u8> = (0..base_size).map(base_byte).collect();
        std::fs::write(&p, bytes).expect("write base");
        p
    });
    let overlay = dir.path().join("disk.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: base.clone(),
        image: None,
        size: Some(size),
        force: false,
    })
    .expect("create overlay");
    Fixture {
        dir,
        overlay,
        base,
        size,
        base_size,
    }
}

/// A small engine: `cores` threads, 8 MiB arena, direct I/O, no background commit.
pub fn engine(cores: usize) -> Engine {
    Engine::start(config(cores)).expect("start engine")
}

/// The settings of [`engine`] (the struct update fills `recorder` under `crash-recorder`).
#[allow(clippy::needless_update)]
pub fn config(cores: usize) -> EngineConfig {
    EngineConfig {
        cores,
        queue_depth: 64,
        arena_bytes: 8 << 20,
        image_cache: CacheMode::Direct,
        base_cache: CacheMode::Direct,
        commit_delay: None,
        ..EngineConfig::default()
    }
}

/// Opens the overlay at `path` with default options; panics on failure.
pub fn open(engine: &Engine, path: &Path) -> Disk {
    engine
        .open(path, DiskOptions::default())
        .expect("open overlay")
}

/// What the disk should read as, kept alongside it.
pub struct Model {
    pub bytes: Vec<u8>,
}

impl Model {
    pub fn new(f: &Fixture) -> Model {
        let bytes = (0..f.size)
            .map(|o| if o < f.base_size { base_byte(o) } else { 0 })
            .collect();
        Model { bytes }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    pub fn zero(&mut self, offset: u64, len: u64) {
        self.bytes[offset as usize..(offset + len) as usize].fill(0);
    }

    /// Asserts every byte of the disk matches, reading in 256 KiB pieces.
    /// Closes `disk`, stops `engine`, reopens the overlay on a fresh one-core engine and checks
    /// it against the model (everything answered before the close must have persisted).
    pub fn check_after_reopen(&self, disk: Disk, old: Engine, overlay: &Path) {
        disk.close().expect("close");
        drop(old);
        let e = engine(1);
        let d = open(&e, overlay);
        self.check(&d);
    }

    pub fn check(&self, disk: &Disk) {
        let mut off = 0u64;
        while off < self.bytes.len() as u64 {
            let n = (self.bytes.len() as u64 - off).min(256 << 10);
            let got = disk.read_at(off, n as u32).expect("read");
            let want = &self.bytes[off as usize..(off + n) as usize];
            if got != want {
                let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                panic!(
                    "byte {} differs: got {} want {}",
                    off + i as u64,
                    got[i],
                    want[i]
                );
            }
            off += n;
        }
    }
}

/// A deterministic payload for write number `n`.
pub fn payload(n: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((n * 31 + i * 17) % 253) as u8 + 2)
        .collect()
}

/// No background-commit delay.
pub const NO_DELAY: Option<Duration> = None;

/// Submits one CACHE request to core 0 whose completion (on the core) submits the next, until
/// `stop`: whenever the core looks at its channel a message is waiting. `answered` counts them.
pub fn flood(disk: Disk, stop: Arc<AtomicBool>, answered: Arc<AtomicU64>) {
    let next = disk.clone();
    disk.submit(
        0,
        Request::Cache {
            offset: 0,
            len: 512,
        },
        Box::new(move |r| {
            assert!(r.is_ok(), "cache hint failed: {r:?}");
            answered.fetch_add(1, Ordering::SeqCst);
            if !stop.load(Ordering::SeqCst) {
                flood(next, stop, answered);
            }
        }),
    );
}
