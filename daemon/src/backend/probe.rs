//! What the files under an export tell about zeros: where the raw image and the base have holes
//! (`SEEK_HOLE`/`SEEK_DATA`), and whether the raw image can punch holes at all (and at which
//! alignment), which decides whether a FAST_ZERO can be done without writing zeros.
//!
//! The engine owns the files it serves; these are separate read-only descriptors of the same
//! files, opened through the engine's own descriptors (the raw image is opened for writing once,
//! at export time, to probe hole punching beyond its end, which changes no byte).

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};

use addcow_engine::format::{FileRole, LayerFormat, OpenedFile};
use addcow_engine::{Disk, ExtentKind};

/// Most hole ranges collected for one request (more are treated as data: always a safe answer).
const MAX_HOLES: usize = 1 << 17;

/// The raw image and base of an export, opened read-only.
#[derive(Debug)]
pub struct LayerFiles {
    image: File,
    base: Option<File>,
    /// See [`crate::backend::disk::Backend::fast_zero_unit`].
    pub fast_zero_unit: Option<u64>,
}

impl LayerFiles {
    /// [`LayerFiles::of_disk`], or `None` with a warning naming export `name`: without the
    /// files nothing is reported as zeros and every FAST_ZERO fails fast, but the export still
    /// serves.
    pub fn open_or_warn(disk: &Disk, name: &str) -> Option<LayerFiles> {
        LayerFiles::of_disk(disk)
            .map_err(|e| {
                tracing::warn!(export = %name, error = %e, "cannot open the layer files; block status reports no zeros");
            })
            .ok()
    }

    /// Opens again the files `disk` serves (the raw image, and a raw direct base): through the
    /// kernel's link to each open descriptor (`/proc/self/fd/N`), so these are the very files
    /// the engine opened (and the allowed-folder check judged), whatever their paths name by
    /// now. A writable disk's raw image is probed for hole punching.
    pub fn of_disk(disk: &Disk) -> Result<LayerFiles, String> {
        let files = disk.opened_files();
        let named = |depth, role: FileRole| {
            files
                .iter()
                .find(|f| f.file.depth == depth && f.file.role == role)
                .and_then(|f| f.fd.map(|fd| (f, fd)))
        };
        let reopen = |(f, fd): (&OpenedFile<'_>, BorrowedFd<'_>), write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|e| format!("{}: reopen: {e}", f.file.path.display()))
        };
        let Some(image) = named(0, FileRole::Data) else {
            return Err(format!("{}: no raw image", disk.path().display()));
        };
        let probe = (!disk.read_only())
            .then(|| reopen(image, true).ok())
            .flatten();
        let image = reopen(image, false)?;
        // An add-cow base (a backing chain) supplies its ranges from several files; holes of
        // its metadata file say nothing about them, so nothing is reported as zeros there (nor
        // for a remote base, which is no file).
        let base = match named(1, FileRole::Named) {
            Some(b) if b.0.file.format == Some(LayerFormat::Raw) => Some(reopen(b, false)?),
            _ => None,
        };
        let fast_zero_unit = match probe {
            Some(f) if can_punch(&f) => Some(dio_unit(&image)),
            _ => None,
        };
        Ok(LayerFiles {
            image,
            base,
            fast_zero_unit,
        })
    }

    /// Appends the holes of `layer`'s file inside `[start, end)`, in order.
    pub fn holes(&self, layer: ExtentKind, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        let f = match layer {
            ExtentKind::Image => &self.image,
            ExtentKind::Base => match &self.base {
                Some(b) => b,
                None => return,
            },
            ExtentKind::Zero => return,
        };
        file_holes(f, start, end, out);
    }
}

/// Appends the holes of `f` inside `[start, end)` (at most [`MAX_HOLES`] of them).
pub fn file_holes(f: &File, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
    use addcow_engine::sys::{seek_data, seek_hole};
    let mut pos = start;
    let mut n = 0;
    while pos < end && n < MAX_HOLES {
        let hole = match seek_hole(f, pos) {
            Ok(Some(h)) => h,
            // At or past the end of the file: nothing more to learn here.
            Ok(None) => return,
            Err(_) => return,
        };
        if hole >= end {
            return;
        }
        let data = match seek_data(f, hole) {
            Ok(Some(d)) => d,
            // No data after the hole: it runs to the end of the file.
            Ok(None) => end,
            Err(_) => return,
        };
        let stop = data.min(end);
        if stop > hole {
            out.push((hole, stop));
            n += 1;
        }
        if data <= pos {
            return;
        }
        pos = data;
    }
}

/// Whether the file system of `image` punches holes: a punch past its end (which changes no
/// byte) is tried.
fn can_punch(f: &File) -> bool {
    let Ok(meta) = f.metadata() else { return false };
    let at = meta.len().div_ceil(4096) * 4096 + 4096;
    addcow_engine::sys::punch_hole(f, at, 4096).is_ok()
}

/// The unit the engine zeroes in: 512, or the raw image's direct-I/O alignment when larger
/// (4096 when the file system does not report it).
fn dio_unit(image: &File) -> u64 {
    let align = match addcow_engine::sys::dio_alignment(image) {
        Some(a) if a.offset > 0 => u64::from(a.offset),
        _ => 4096,
    };
    align.max(512)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn holes_of_a_sparse_file_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 64 << 10).unwrap();
        f.write_all_at(&[1u8; 4096], 512 << 10).unwrap();
        f.flush().unwrap();
        let f = File::open(&p).unwrap();
        let mut out = Vec::new();
        file_holes(&f, 0, 1 << 20, &mut out);
        // File systems allocate in blocks of at least 4 KiB: the data blocks are not holes,
        // the rest is.
        assert_eq!(out.first(), Some(&(0, 64 << 10)), "{out:?}");
        assert!(out.contains(&((64 << 10) + 4096, 512 << 10)), "{out:?}");
        assert_eq!(out.last(), Some(&((512 << 10) + 4096, 1 << 20)), "{out:?}");
        // A window inside one hole, and one inside data.
        let mut out = Vec::new();
        file_holes(&f, 8192, 16384, &mut out);
        assert_eq!(out, [(8192, 16384)]);
        let mut out = Vec::new();
        file_holes(&f, (64 << 10) + 100, (64 << 10) + 200, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }
}
