//! `O_DIRECT` alignment of an open file, from `statx(STATX_DIOALIGN)`.

use std::os::fd::AsFd;

use crate::sys;

/// Fallback alignment when the kernel does not report one.
pub(crate) const FALLBACK_ALIGN: u64 = 4096;

/// What `O_DIRECT` I/O on a file needs: buffer address alignment and file offset/length
/// alignment. A buffered file needs neither (both 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DioAlign {
    /// Buffer addresses must be multiples of this.
    pub mem: u64,
    /// File offsets and lengths must be multiples of this.
    pub offset: u64,
}

impl DioAlign {
    /// No alignment needed (buffered I/O).
    pub(crate) const NONE: DioAlign = DioAlign { mem: 1, offset: 1 };

    /// Whether a transfer of `len` bytes at file offset `off` into/from `ptr` is aligned.
    pub(crate) fn fits(&self, ptr: usize, off: u64, len: u64) -> bool {
        ptr as u64 % self.mem == 0 && off % self.offset == 0 && len % self.offset == 0
    }
}

/// The alignment `O_DIRECT` needs on `file` (opened with `O_DIRECT` when `direct`).
pub(crate) fn dio_align(file: impl AsFd, direct: bool) -> DioAlign {
    if !direct {
        return DioAlign::NONE;
    }
    match sys::dio_alignment(file) {
        Some(a) if a.offset != 0 && a.mem != 0 => DioAlign {
            mem: u64::from(a.mem).next_power_of_two(),
            offset: u64::from(a.offset).next_power_of_two(),
        },
        _ => DioAlign {
            mem: FALLBACK_ALIGN,
            offset: FALLBACK_ALIGN,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_needs_nothing_and_direct_is_a_power_of_two() {
        let f = tempfile::tempfile().expect("tempfile");
        assert_eq!(dio_align(&f, false), DioAlign::NONE);
        let a = dio_align(&f, true);
        assert!(a.mem.is_power_of_two() && a.offset.is_power_of_two());
        assert!(a.fits(0, 0, a.offset));
        assert!(!DioAlign {
            mem: 512,
            offset: 512
        }
        .fits(0, 7, 512));
    }
}
