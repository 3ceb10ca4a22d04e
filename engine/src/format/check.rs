//! Consistency report behind `addcow check`.
//!
//! Corruption (the overlay cannot be served as it is): a header shorter than 2560 bytes, a wrong
//! magic or version, a path field without NUL, an empty or protocol `image_file`, a missing or
//! unreadable raw image or base, a raw image whose size is not a multiple of 512, a truncated
//! bitmap. Warnings (servable, but something is off): non-zero reserved bytes, non-zero bytes
//! after a path's terminating NUL, bits set past the end of the disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{
    bitmap_len, split_path_field, BACKING_FILE_OFFSET, HEADER_SIZE, IMAGE_FILE_OFFSET, MAGIC,
    PATH_FIELD_LEN, RESERVED_OFFSET, SECTOR_SIZE, VERSION, VERSION_OFFSET,
};
use crate::format::open::{file_len, soft_findings};
use crate::format::paths::{nbd_uri, resolve};
use crate::format::Header;
use crate::nbd::client;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Severity {
    /// The overlay cannot be served as it is.
    Corruption,
    /// Servable, but something is off.
    Warning,
}

/// One thing `check` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// Corruption or warning.
    pub severity: Severity,
    /// What, for a person.
    pub message: String,
}

/// All findings for one overlay.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// Everything found, in the order checked.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    fn corrupt(&mut self, message: impl Into<String>) {
        self.findings.push(Finding {
            severity: Severity::Corruption,
            message: message.into(),
        });
    }

    fn warn(&mut self, message: impl Into<String>) {
        self.findings.push(Finding {
            severity: Severity::Warning,
            message: message.into(),
        });
    }

    /// Whether any finding is corruption.
    pub fn has_corruption(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.severity == Severity::Corruption)
    }

    /// Whether nothing at all was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Checks the overlay at `path` without opening it for writing (and without taking a lock).
/// A metadata file that cannot be opened or read is reported as one corruption finding; use
/// [`try_check`] to tell that case apart.
pub fn check(path: &Path) -> CheckReport {
    try_check(path).unwrap_or_else(|e| {
        let mut r = CheckReport::default();
        r.corrupt(e.to_string());
        r
    })
}

/// Like [`check`], but an overlay file that cannot be opened or read at all is an `Err` (an I/O
/// problem, not a finding about the overlay's contents).
pub fn try_check(path: &Path) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let meta = File::open(path).map_err(|e| Error::io("open overlay", e).with_path(path))?;
    let meta_len = meta
        .metadata()
        .map_err(|e| Error::io("stat overlay", e).with_path(path))?
        .len();
    if meta_len < HEADER_SIZE as u64 {
        r.corrupt(
            Error::new(ErrorKind::ShortHeader {
                need: HEADER_SIZE as u64,
                have: meta_len,
            })
            .with_path(path)
            .to_string(),
        );
        return Ok(r);
    }
    let mut h = vec![0u8; HEADER_SIZE];
    meta.read_exact_at(&mut h, 0)
        .map_err(|e| Error::io("read header", e).with_path(path))?;
    let soft_done = check_header_and_files(&mut r, path, &meta, meta_len, &h)?;
    if !soft_done && h[RESERVED_OFFSET..].iter().any(|&b| b != 0) {
        r.warn(format!(
            "{}: reserved header bytes {RESERVED_OFFSET}..{HEADER_SIZE} are not all zero",
            path.display()
        ));
    }
    Ok(r)
}

/// Checks the header `h` and the files it names. Returns whether the soft findings (reserved
/// bytes, bits past the end) were collected, which needs a readable header and raw image.
fn check_header_and_files(
    r: &mut CheckReport,
    path: &Path,
    meta: &File,
    meta_len: u64,
    h: &[u8],
) -> Result<bool> {
    let at = |kind: ErrorKind, off: usize| {
        Error::new(kind)
            .with_path(path)
            .with_offset(off as u64)
            .to_string()
    };
    if h.get(..8) != Some(&MAGIC[..]) {
        r.corrupt(at(ErrorKind::BadMagic, 0));
        return Ok(false);
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&h[VERSION_OFFSET..VERSION_OFFSET + 4]);
    let version = u32::from_be_bytes(v);
    if version != VERSION {
        r.corrupt(at(ErrorKind::UnsupportedVersion(version), VERSION_OFFSET));
        return Ok(false);
    }
    let mut fields_ok = true;
    for (name, off) in [
        ("backing_file", BACKING_FILE_OFFSET),
        ("image_file", IMAGE_FILE_OFFSET),
    ] {
        match split_path_field(&h[off..off + PATH_FIELD_LEN]) {
            None => {
                r.corrupt(at(ErrorKind::UnterminatedPath { field: name }, off));
                fields_ok = false;
            }
            Some((_, true)) => r.warn(format!(
                "{}: bytes after the terminating NUL of the {name} field are not zero (at offset {off})",
                path.display()
            )),
            Some(_) => {}
        }
    }
    if !fields_ok {
        return Ok(false);
    }
    let header = match Header::parse(h) {
        Ok(hd) => hd,
        Err(e) => {
            r.corrupt(e.with_path(path).to_string());
            return Ok(false);
        }
    };

    // The raw image defines the virtual size.
    let mut virtual_size = None;
    match resolve(path, "image_file", &header.image_file) {
        Err(e) => r.corrupt(e.with_path(path).to_string()),
        Ok(ip) => match File::open(&ip)
            .map_err(|e| Error::io("open raw image", e).with_path(&ip))
            .and_then(|f| file_len(&f, &ip, "stat raw image"))
        {
            Err(e) => r.corrupt(e.to_string()),
            Ok(len) if len % SECTOR_SIZE != 0 => r.corrupt(
                Error::new(ErrorKind::UnalignedImageSize { size: len })
                    .with_path(&ip)
                    .to_string(),
            ),
            Ok(len) => virtual_size = Some(len),
        },
    }
    if !header.backing_file.is_empty() {
        match resolve(path, "backing_file", &header.backing_file) {
            Err(e) => r.corrupt(e.with_path(path).to_string()),
            Ok(bp) => match nbd_uri(&bp) {
                // An image server that is down or lost the export is not corruption of the
                // overlay: a warning.
                Ok(Some(uri)) => match client::connect(&uri, Duration::from_secs(10)) {
                    Ok(mut s) => client::disconnect(&mut s.stream),
                    Err(e) => r.warn(format!("remote base: {e}")),
                },
                Ok(None) => {
                    if let Err(e) = File::open(&bp) {
                        r.corrupt(Error::io("open base", e).with_path(&bp).to_string());
                    }
                }
                Err(e) => r.corrupt(e.with_path(path).to_string()),
            },
        }
    }
    let Some(virtual_size) = virtual_size else {
        return Ok(false);
    };
    let need = bitmap_len(virtual_size);
    let have = meta_len - HEADER_SIZE as u64;
    if have < need {
        r.corrupt(
            Error::new(ErrorKind::BitmapTruncated { need, have })
                .with_path(path)
                .to_string(),
        );
        return Ok(false);
    }
    for w in soft_findings(&header, meta, path, meta_len, virtual_size)? {
        r.warn(format!("{}: {w}", path.display()));
    }
    Ok(true)
}
