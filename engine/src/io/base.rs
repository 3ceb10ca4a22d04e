//! What sits under an overlay: the base image, behind a small trait.
//!
//! The engine asks a [`BaseSource`] to describe a byte range as runs that are either bytes of
//! some file (which the engine reads through its ring) or zeros. A plain raw file is one run; a
//! base that is itself an add-cow overlay can later implement the trait by splitting the range
//! by its own bitmap into runs of its raw image and of its own base.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use super::align::DioAlign;

/// One run of a base range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BaseRun {
    /// `len` bytes at `offset` of the open file `fd`, which needs `align` for I/O.
    File {
        fd: RawFd,
        offset: u64,
        len: u64,
        align: DioAlign,
    },
    /// `len` bytes of zeros.
    Zero { len: u64 },
}

/// A read-only source of base bytes. Invariant: never written through (DESIGN invariant 5).
pub(crate) trait BaseSource: Send + Sync + std::fmt::Debug {
    /// Bytes of base data; reads past this are zeros.
    fn size(&self) -> u64;
    /// Appends runs covering exactly `[offset, offset+len)` (which lies within `size()`).
    fn map(&self, offset: u64, len: u64, out: &mut Vec<BaseRun>);
    /// The file descriptor of the base's main file, if it has one (registered with the rings).
    fn main_fd(&self) -> Option<RawFd>;
    /// Drops the shared lock taken on the base's files when the overlay was opened.
    fn unlock(&self);
}

/// A raw image file as base.
#[derive(Debug)]
pub(crate) struct RawFileBase {
    file: File,
    size: u64,
    align: DioAlign,
}

impl RawFileBase {
    /// Wraps an open (read-only) base file of `size` bytes needing `align`.
    pub(crate) fn new(file: File, size: u64, align: DioAlign) -> RawFileBase {
        RawFileBase { file, size, align }
    }
}

impl BaseSource for RawFileBase {
    fn size(&self) -> u64 {
        self.size
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<BaseRun>) {
        let end = offset.saturating_add(len);
        let in_file = end.min(self.size).saturating_sub(offset);
        if in_file > 0 {
            out.push(BaseRun::File {
                fd: self.file.as_raw_fd(),
                offset,
                len: in_file,
                align: self.align,
            });
        }
        if in_file < len {
            out.push(BaseRun::Zero { len: len - in_file });
        }
    }

    fn main_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn unlock(&self) {
        crate::format::overlay::ofd_unlock(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_base_zero_fills_past_its_end() {
        let f = tempfile::tempfile().expect("tmp");
        let fd = f.as_raw_fd();
        let b = RawFileBase::new(f, 1000, DioAlign::NONE);
        let mut out = Vec::new();
        b.map(900, 300, &mut out);
        assert_eq!(
            out,
            vec![
                BaseRun::File {
                    fd,
                    offset: 900,
                    len: 100,
                    align: DioAlign::NONE
                },
                BaseRun::Zero { len: 200 }
            ]
        );
    }
}
