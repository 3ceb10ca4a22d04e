//! Helpers to drive a real engine from tests: blocking request calls and overlay fixtures built
//! byte by byte from the spec (so the engine is judged against the format, not the library).

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use addcow_engine::{Disk, Done, Engine, Request, RequestError};

use crate::pattern;
use crate::reference::{build_meta, SECTOR};

/// Submits `req` to `core` and waits for its completion.
pub fn call(disk: &Disk, core: usize, req: Request) -> Result<Done, RequestError> {
    let (tx, rx) = mpsc::channel();
    disk.submit(
        core,
        req,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv()
        .expect("engine dropped a completion without calling it")
}

/// Writes `data` at `offset` through an engine buffer.
pub fn write(
    engine: &Engine,
    disk: &Disk,
    core: usize,
    offset: u64,
    data: &[u8],
    fua: bool,
) -> Result<(), RequestError> {
    let mut buf = engine.alloc_buf(data.len());
    buf.copy_from_slice(data);
    call(
        disk,
        core,
        Request::Write {
            offset,
            data: buf.into(),
            fua,
        },
    )
    .map(|_| ())
}

/// Reads `len` bytes at `offset`.
pub fn read(disk: &Disk, core: usize, offset: u64, len: u32) -> Result<Vec<u8>, RequestError> {
    match call(disk, core, Request::Read { offset, len })? {
        Done::Read(buf) => Ok(buf.to_vec()),
        other => panic!("read answered {other:?}"),
    }
}

/// An overlay on disk: `disk.add-cow` over `disk.raw` and `base.img` in a temporary directory.
pub struct Fixture {
    /// Holds the directory.
    pub dir: tempfile::TempDir,
    /// The `.add-cow` file.
    pub meta: PathBuf,
    /// The raw image.
    pub image: PathBuf,
    /// The base.
    pub base: PathBuf,
}

impl Fixture {
    /// `sectors` sectors over a base of `base_len` bytes (`base_byte` pattern; need not be a
    /// multiple of 512: the sector at its end reads partly base, partly zeros). Sectors
    /// with `prealloc(s)` are allocated with the `prealloc_byte` pattern; every other sector with
    /// `stale(s)` holds `stale_byte` garbage in the raw image under a clear bit; the rest of
    /// the raw image is a hole.
    pub fn new(
        sectors: u64,
        base_len: u64,
        prealloc: impl Fn(u64) -> bool,
        stale: impl Fn(u64) -> bool,
    ) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.img");
        let image = dir.path().join("disk.raw");
        let meta = dir.path().join("disk.add-cow");
        std::fs::write(
            &base,
            pattern::fill(0, base_len as usize, pattern::base_byte),
        )
        .expect("write base");
        let meta_bytes = build_meta("base.img", "disk.raw", sectors, &prealloc);
        std::fs::write(&meta, meta_bytes).expect("write meta");
        let f = std::fs::File::create(&image).expect("create image");
        f.set_len(sectors * SECTOR as u64).expect("size image");
        use std::os::unix::fs::FileExt;
        for s in 0..sectors {
            let off = s * SECTOR as u64;
            if prealloc(s) {
                f.write_all_at(&pattern::fill(off, SECTOR, pattern::prealloc_byte), off)
                    .expect("prealloc");
            } else if stale(s) {
                f.write_all_at(&pattern::fill(off, SECTOR, pattern::stale_byte), off)
                    .expect("stale");
            }
        }
        f.sync_all().expect("sync image");
        Fixture {
            dir,
            meta,
            image,
            base,
        }
    }

    /// Reads the three files.
    pub fn files(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let read = |p: &Path| std::fs::read(p).expect("read fixture file");
        (read(&self.meta), read(&self.image), read(&self.base))
    }
}

/// A seed from `var` or the clock, printed so a failure can be replayed.
pub fn seed(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("seed {seed} (set {var}={seed} to replay)");
    seed
}

/// Submits `req` to `core`; `on_done` runs on the core thread with the result (e.g. to log the
/// answer), then the result is sent to the returned receiver.
pub fn submit_with(
    disk: &Disk,
    core: usize,
    req: Request,
    on_done: impl FnOnce(&Result<Done, RequestError>) + Send + 'static,
) -> mpsc::Receiver<Result<Done, RequestError>> {
    let (tx, rx) = mpsc::channel();
    disk.submit(
        core,
        req,
        Box::new(move |r| {
            on_done(&r);
            let _ = tx.send(r);
        }),
    );
    rx
}

/// The files of an add-cow layer put under a [`Fixture`]'s overlay, making a backing chain:
/// `base.img` is rewritten as an add-cow overlay (`mid.raw` its raw image, `bottom.img` its raw
/// base), so the fixture's own header (which names `base.img`) now points at an overlay.
pub struct LowerLayer {
    /// `(file name, bytes)` of every file under the top overlay, to rewrite them elsewhere.
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// What the layer presents (its virtual disk, decoded by the reference reader): the bytes
    /// the top overlay reads for its clear sectors.
    pub view: Vec<u8>,
}

/// Turns `fx`'s base into a `sectors`-sector add-cow layer over a raw `bottom.img` of
/// `bottom_len` bytes (`base_byte` pattern). Sectors with `set(s)` hold the layer's own bytes
/// (`prealloc_byte` pattern of offset + 1); the rest of `mid.raw` holds `stale_byte` garbage
/// under clear bits, which a read through the chain must never return.
pub fn chain_under(
    fx: &Fixture,
    sectors: u64,
    bottom_len: u64,
    set: impl Fn(u64) -> bool,
) -> LowerLayer {
    use std::os::unix::fs::FileExt;
    let dir = fx.dir.path();
    let bottom = pattern::fill(0, bottom_len as usize, pattern::base_byte);
    let meta = build_meta("bottom.img", "mid.raw", sectors, &set);
    let mut raw = vec![0u8; (sectors * SECTOR as u64) as usize];
    for s in 0..sectors {
        let off = s * SECTOR as u64;
        let bytes = if set(s) {
            pattern::fill(off + 1, SECTOR, pattern::prealloc_byte)
        } else {
            pattern::fill(off, SECTOR, pattern::stale_byte)
        };
        raw[off as usize..off as usize + SECTOR].copy_from_slice(&bytes);
    }
    std::fs::write(dir.join("bottom.img"), &bottom).expect("write bottom");
    let f = std::fs::File::create(dir.join("mid.raw")).expect("create mid.raw");
    f.write_all_at(&raw, 0).expect("write mid.raw");
    f.sync_all().expect("sync mid.raw");
    std::fs::write(&fx.base, &meta).expect("write mid overlay");
    let view = crate::reference::RefView::decode(&meta, &raw, Some(&bottom))
        .expect("lower layer decodes")
        .read_all();
    LowerLayer {
        files: vec![("base.img", meta), ("mid.raw", raw), ("bottom.img", bottom)],
        view,
    }
}
