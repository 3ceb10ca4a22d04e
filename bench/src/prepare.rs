//! Data preparation: identical data for every server, made once per run.
//!
//! * `base.raw`: random bytes (the read-only base).
//! * A *written map*: a seeded random half of the 64 KiB chunks (one qcow2 cluster each).
//! * `disk.raw`: the base with the written chunks replaced by new random bytes: the plain raw copy
//!   for qemu-nbd raw, nbdkit and fio.
//! * `overlay.add-cow` + `overlay.img`: an add-cow overlay on `base.raw` (made by the library's
//!   `create`), the written chunks stored in its raw image and their bits set in its bitmap.
//! * `overlay.qcow2`: `qemu-img create -f qcow2 -b disk.raw`, then `qemu-img rebase -b base.raw`,
//!   which copies exactly the clusters where `disk.raw` differs from `base.raw` into the overlay.
//!
//! All three views hold the same bytes. Write profiles change the overlays, so [`Prepared`] keeps
//! pristine copies and restores an overlay before it is served again (see [`Prepared::restore`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use addcow_engine::format::{self, CreateOptions, BITMAP_OFFSET, SECTOR_SIZE};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::error::{io_err, BenchError, Result};

/// Bytes per chunk of the written map (the qcow2 default cluster size).
pub const CHUNK: u64 = 64 << 10;

/// Which chunks of a disk of `size` bytes are written: chunk `i` is written when `map[i]`.
/// Deterministic for a seed; about half of the chunks.
pub fn written_map(size: u64, seed: u64) -> Vec<bool> {
    let chunks = size.div_ceil(CHUNK);
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..chunks).map(|_| rng.gen_bool(0.5)).collect()
}

/// Runs of equal values of `map` as `(written, first_chunk, chunk_count)`.
pub fn runs(map: &[bool]) -> Vec<(bool, u64, u64)> {
    let mut out: Vec<(bool, u64, u64)> = Vec::new();
    for (i, &w) in map.iter().enumerate() {
        match out.last_mut() {
            Some((v, _, n)) if *v == w => *n += 1,
            _ => out.push((w, i as u64, 1)),
        }
    }
    out
}

/// Sets the bitmap bits of every written chunk in `bitmap` (on-disk order: LSB first).
pub fn set_bits(bitmap: &mut [u8], map: &[bool], size: u64) {
    let sectors_per_chunk = CHUNK / SECTOR_SIZE;
    for (i, _) in map.iter().enumerate().filter(|(_, w)| **w) {
        let first = i as u64 * sectors_per_chunk;
        let end = (first + sectors_per_chunk).min(size / SECTOR_SIZE);
        for s in first..end {
            if let Some(b) = bitmap.get_mut((s / 8) as usize) {
                *b |= 1 << (s % 8);
            }
        }
    }
}

/// The prepared files of one run.
#[derive(Debug)]
pub struct Prepared {
    /// Folder holding everything.
    pub dir: PathBuf,
    /// Virtual size in bytes.
    pub size: u64,
    /// The random base.
    pub base: PathBuf,
    /// The plain raw copy (base + written chunks).
    pub disk_raw: PathBuf,
    /// The add-cow overlay's metadata file.
    pub addcow: PathBuf,
    /// Its raw image.
    pub addcow_img: PathBuf,
    /// The qcow2 overlay, when prepared.
    pub qcow2: Option<PathBuf>,
    /// Which 64 KiB chunks are written.
    pub written: Vec<bool>,
    addcow_pristine: PathBuf,
    qcow2_pristine: Option<PathBuf>,
}

impl Prepared {
    /// Drops the page-cache pages of every prepared data file (base, raw copy, add-cow raw
    /// image, qcow2 overlay) with `posix_fadvise(DONTNEED)` after an fdatasync (the advice
    /// drops clean pages only), so each run starts with a cold cache whether or not its server
    /// reads through the page cache. Needs no root, unlike `drop_caches`.
    pub fn evict_cache(&self) {
        let files = [
            Some(&self.base),
            Some(&self.disk_raw),
            Some(&self.addcow_img),
            self.qcow2.as_ref(),
        ];
        for path in files.into_iter().flatten() {
            if let Ok(f) = File::open(path) {
                let _ = f.sync_data();
                // SAFETY: posix_fadvise only reads its integer arguments; the fd is open.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
        }
    }
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))
}

/// Runs a command, turning a failure into an error with its stderr.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| BenchError::Command {
        command: shown.clone(),
        message: format!("cannot start: {e}"),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BenchError::Command {
            command: shown,
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Writes `size` random bytes to `path` (from `rng`, 4 MiB at a time).
pub fn write_random(path: &Path, size: u64, rng: &mut SmallRng) -> Result<()> {
    let mut f = File::create(path).map_err(io_err("create", path))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let chunk = buf.get_mut(..n).unwrap_or_default();
        rng.fill_bytes(chunk);
        f.write_all(chunk).map_err(io_err("write", path))?;
        left -= n as u64;
    }
    f.sync_all().map_err(io_err("fsync", path))
}

/// Prepares the data of a run in `dir`: base, raw copy, add-cow overlay and (with `qcow2`) the
/// qcow2 overlay, all holding the same bytes. `size` must be a multiple of 512.
pub fn prepare(dir: &Path, size: u64, seed: u64, qcow2: bool) -> Result<Prepared> {
    prepare_layout(dir, size, seed, qcow2, false)
}

/// [`prepare`], or with `full` every chunk written (a fully allocated overlay: every read
/// is one run of the raw image).
pub fn prepare_layout(
    dir: &Path,
    size: u64,
    seed: u64,
    qcow2: bool,
    full: bool,
) -> Result<Prepared> {
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(BenchError::Usage(format!(
            "size {size} is not a positive multiple of 512"
        )));
    }
    std::fs::create_dir_all(dir).map_err(io_err("create folder", dir))?;
    let p = |n: &str| dir.join(n);
    let mut rng = SmallRng::seed_from_u64(seed);
    let base = p("base.raw");
    write_random(&base, size, &mut rng)?;
    let disk_raw = p("disk.raw");
    std::fs::copy(&base, &disk_raw).map_err(io_err("copy base to", &disk_raw))?;

    let addcow = p("overlay.add-cow");
    let addcow_img = p("overlay.img");
    let _ = std::fs::remove_file(&addcow_img);
    format::create(&CreateOptions {
        overlay: addcow.clone(),
        base: Some(base.clone()),
        image: Some(addcow_img.clone()),
        size: Some(size),
        force: true,
    })?;

    let written = if full {
        vec![true; size.div_ceil(CHUNK) as usize]
    } else {
        written_map(size, seed ^ 0x5eed)
    };
    let raw_f = open_rw(&disk_raw)?;
    let img_f = open_rw(&addcow_img)?;
    let mut buf = vec![0u8; CHUNK as usize];
    for (i, _) in written.iter().enumerate().filter(|(_, w)| **w) {
        let off = i as u64 * CHUNK;
        let n = CHUNK.min(size - off) as usize;
        let data = buf.get_mut(..n).unwrap_or_default();
        rng.fill_bytes(data);
        raw_f
            .write_all_at(data, off)
            .map_err(io_err("write", &disk_raw))?;
        img_f
            .write_all_at(data, off)
            .map_err(io_err("write", &addcow_img))?;
    }
    raw_f.sync_all().map_err(io_err("fsync", &disk_raw))?;
    img_f.sync_all().map_err(io_err("fsync", &addcow_img))?;

    let mut bitmap = vec![0u8; format::bitmap_len(size) as usize];
    set_bits(&mut bitmap, &written, size);
    let meta = open_rw(&addcow)?;
    meta.write_all_at(&bitmap, BITMAP_OFFSET)
        .map_err(io_err("write bitmap", &addcow))?;
    meta.sync_all().map_err(io_err("fsync", &addcow))?;
    let addcow_pristine = p("overlay.add-cow.pristine");
    std::fs::copy(&addcow, &addcow_pristine).map_err(io_err("copy", &addcow))?;

    let (qcow2, qcow2_pristine) = if qcow2 {
        let q = p("overlay.qcow2");
        let _ = std::fs::remove_file(&q);
        run_cmd(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-b"])
                .arg(&disk_raw)
                .args(["-F", "raw"])
                .arg(&q),
        )?;
        run_cmd(
            Command::new("qemu-img")
                .args(["rebase", "-q", "-f", "qcow2", "-b"])
                .arg(&base)
                .args(["-F", "raw"])
                .arg(&q),
        )?;
        let qp = p("overlay.qcow2.pristine");
        std::fs::copy(&q, &qp).map_err(io_err("copy", &q))?;
        (Some(q), Some(qp))
    } else {
        (None, None)
    };
    Ok(Prepared {
        dir: dir.to_owned(),
        size,
        base,
        disk_raw,
        addcow,
        addcow_img,
        qcow2,
        written,
        addcow_pristine,
        qcow2_pristine,
    })
}

impl Prepared {
    /// Puts the add-cow overlay back in its prepared state: the pristine metadata file, and holes
    /// punched over every chunk that was not written at preparation (so newly allocated blocks of
    /// the raw image are gone again). Bytes overwritten inside written chunks stay changed; only the
    /// allocation state matters for speed.
    pub fn restore_addcow(&self) -> Result<()> {
        std::fs::copy(&self.addcow_pristine, &self.addcow)
            .map_err(io_err("restore", &self.addcow))?;
        let img = open_rw(&self.addcow_img)?;
        for (written, first, count) in runs(&self.written) {
            if written {
                continue;
            }
            let off = first * CHUNK;
            let len = (count * CHUNK).min(self.size - off);
            punch_hole(&img, off, len).map_err(io_err("punch hole in", &self.addcow_img))?;
        }
        img.sync_all().map_err(io_err("fsync", &self.addcow_img))
    }

    /// Puts the qcow2 overlay back in its prepared state (a copy of the pristine file).
    pub fn restore_qcow2(&self) -> Result<()> {
        if let (Some(q), Some(qp)) = (&self.qcow2, &self.qcow2_pristine) {
            std::fs::copy(qp, q).map_err(io_err("restore", q))?;
        }
        Ok(())
    }

    /// A new, empty add-cow overlay on the base (`fresh.add-cow` + `fresh.img`).
    pub fn fresh_addcow(&self) -> Result<PathBuf> {
        let meta = self.dir.join("fresh.add-cow");
        let img = self.dir.join("fresh.img");
        let _ = std::fs::remove_file(&img);
        format::create(&CreateOptions {
            overlay: meta.clone(),
            base: Some(self.base.clone()),
            image: Some(img),
            size: Some(self.size),
            force: true,
        })?;
        Ok(meta)
    }

    /// A new, empty qcow2 overlay on the base.
    pub fn fresh_qcow2(&self) -> Result<PathBuf> {
        let q = self.dir.join("fresh.qcow2");
        let _ = std::fs::remove_file(&q);
        run_cmd(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-b"])
                .arg(&self.base)
                .args(["-F", "raw"])
                .arg(&q),
        )?;
        Ok(q)
    }

    /// A new sparse raw file of the disk's size (the raw servers' "fresh overlay").
    pub fn fresh_raw(&self) -> Result<PathBuf> {
        let r = self.dir.join("fresh.raw");
        let f = File::create(&r).map_err(io_err("create", &r))?;
        f.set_len(self.size).map_err(io_err("truncate", &r))?;
        Ok(r)
    }

    /// Removes the fresh files (between runs, to keep the disk use flat).
    pub fn remove_fresh(&self) {
        for n in ["fresh.add-cow", "fresh.img", "fresh.qcow2", "fresh.raw"] {
            let _ = std::fs::remove_file(self.dir.join(n));
        }
    }
}

/// The folder to put disk images in: `given`, or a fresh temp folder named `prefix…`. Keep the
/// returned guard alive while the folder is in use: dropping it deletes a temp folder.
pub fn work_dir(
    given: Option<&Path>,
    prefix: &str,
) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(w) = given {
        return Ok((w.to_owned(), None));
    }
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(io_err("create temp folder", Path::new("$TMPDIR")))?;
    Ok((tmp.path().to_owned(), Some(tmp)))
}

/// Deallocates `[off, off+len)` of `file` keeping its size.
fn punch_hole(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    addcow_engine::sys::punch_hole(file, off, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_map_is_seeded_and_about_half() {
        let a = written_map(64 << 20, 7);
        assert_eq!(a, written_map(64 << 20, 7));
        assert_ne!(a, written_map(64 << 20, 8));
        assert_eq!(a.len(), 1024);
        let n = a.iter().filter(|w| **w).count();
        assert!((400..=624).contains(&n), "{n} of 1024 written");
    }

    #[test]
    fn runs_group_equal_values() {
        let m = [true, true, false, true, false, false];
        assert_eq!(
            runs(&m),
            vec![(true, 0, 2), (false, 2, 1), (true, 3, 1), (false, 4, 2)]
        );
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn set_bits_covers_written_chunks_lsb_first() {
        let size = 3 * CHUNK;
        let mut bm = vec![0u8; (size / SECTOR_SIZE / 8) as usize];
        set_bits(&mut bm, &[false, true, false], size);
        assert!(bm[..16].iter().all(|b| *b == 0));
        assert!(bm[16..32].iter().all(|b| *b == 0xff));
        assert!(bm[32..].iter().all(|b| *b == 0));
    }

    /// The bytes a reader of the add-cow overlay sees, decoded by hand from the files.
    fn addcow_view(p: &Prepared) -> Vec<u8> {
        let meta = std::fs::read(&p.addcow).unwrap();
        let img = std::fs::read(&p.addcow_img).unwrap();
        let base = std::fs::read(&p.base).unwrap();
        let bm = &meta[BITMAP_OFFSET as usize..];
        let mut out = Vec::with_capacity(p.size as usize);
        for s in 0..(p.size / SECTOR_SIZE) as usize {
            let set = bm[s / 8] & (1 << (s % 8)) != 0;
            let src = if set { &img } else { &base };
            out.extend_from_slice(&src[s * 512..(s + 1) * 512]);
        }
        out
    }

    #[test]
    fn all_views_hold_the_same_bytes_and_restore_works() {
        // Required, never skipped: scripts/test.sh installs qemu-utils.
        assert!(
            crate::servers::on_path("qemu-img"),
            "qemu-img is not installed (apt-get install qemu-utils; scripts/test.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = prepare(dir.path(), 2 << 20, 9, true).unwrap();
        let raw = std::fs::read(&p.disk_raw).unwrap();
        assert_ne!(raw, std::fs::read(&p.base).unwrap());
        assert!(addcow_view(&p) == raw, "add-cow view differs from disk.raw");
        let qcow2 = p.qcow2.clone().unwrap();
        run_cmd(
            Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
                .arg(&p.disk_raw)
                .arg(&qcow2),
        )
        .unwrap();
        // The qcow2 overlay allocates exactly the written chunks.
        let map = Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(&qcow2)
            .output()
            .unwrap();
        let runs: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        let mut in_top = 0u64;
        for r in runs.as_array().unwrap() {
            if r["depth"] == 0 {
                in_top += r["length"].as_u64().unwrap();
            }
        }
        let written = p.written.iter().filter(|w| **w).count() as u64;
        assert_eq!(in_top, written * CHUNK);

        // Dirty the add-cow overlay as a write profile would, then restore it.
        let pristine_meta = std::fs::read(&p.addcow).unwrap();
        let clear = p.written.iter().position(|w| !*w).unwrap() as u64;
        let img = open_rw(&p.addcow_img).unwrap();
        img.write_all_at(&[0xAB; 4096], clear * CHUNK).unwrap();
        let meta = open_rw(&p.addcow).unwrap();
        meta.write_all_at(&[0xff; 16], BITMAP_OFFSET + clear * 16)
            .unwrap();
        p.restore_addcow().unwrap();
        assert!(std::fs::read(&p.addcow).unwrap() == pristine_meta);
        let mut back = [1u8; 4096];
        img.read_exact_at(&mut back, clear * CHUNK).unwrap();
        assert!(back.iter().all(|b| *b == 0), "unwritten chunk not punched");
        assert!(addcow_view(&p) == raw);
    }

    #[test]
    fn punch_hole_zeroes_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * 4096]).unwrap();
        let f = open_rw(&path).unwrap();
        punch_hole(&f, 4096, 4096).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 3 * 4096);
        assert!(data[4096..8192].iter().all(|b| *b == 0));
        assert!(data[..4096].iter().all(|b| *b == 7));
    }
}
