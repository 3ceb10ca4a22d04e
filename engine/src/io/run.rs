//! What a base range is made of: [`BaseRun`]s, the vocabulary between the bases that describe
//! ranges (`base`: raw files and backing chains; `remote`: a base on an NBD image server) and the
//! engine that reads them (`split`, the cores). Below all of them.

use std::os::fd::RawFd;

use super::align::DioAlign;

/// One run of a base range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BaseRun {
    /// `len` bytes at `offset` of the open file `fd`, which needs `align` for I/O; `layer`:
    /// which layer supplies them (0 = the overlay's direct base, 1 = its base, ...).
    File {
        fd: RawFd,
        offset: u64,
        len: u64,
        align: DioAlign,
        layer: u32,
    },
    /// `len` bytes at `offset` of the remote base (read through `BaseSource::remote`);
    /// `layer` as for `File`.
    Remote { offset: u64, len: u64, layer: u32 },
    /// `len` bytes of layer `layer` that its server reported as reading zeros (a hole of a
    /// remote base, known from `base:allocation`): read as zeros without I/O, but supplied by
    /// that layer (allocation depth).
    Hole { len: u64, layer: u32 },
    /// `len` bytes of zeros.
    Zero { len: u64 },
}

/// Appends `run`, merging it into the last run when they continue each other.
pub(crate) fn push_run(out: &mut Vec<BaseRun>, run: BaseRun) {
    match (out.last_mut(), run) {
        (_, BaseRun::Zero { len: 0 })
        | (_, BaseRun::File { len: 0, .. })
        | (_, BaseRun::Remote { len: 0, .. })
        | (_, BaseRun::Hole { len: 0, .. }) => {}
        (
            Some(BaseRun::Hole { len, layer }),
            BaseRun::Hole {
                len: more,
                layer: l2,
            },
        ) if *layer == l2 => *len += more,
        (
            Some(BaseRun::Remote { offset, len, .. }),
            BaseRun::Remote {
                offset: off2,
                len: more,
                ..
            },
        ) if *offset + *len == off2 => *len += more,
        (Some(BaseRun::Zero { len }), BaseRun::Zero { len: more }) => *len += more,
        (
            Some(BaseRun::File {
                fd, offset, len, ..
            }),
            BaseRun::File {
                fd: fd2,
                offset: off2,
                len: more,
                ..
            },
        ) if *fd == fd2 && *offset + *len == off2 => *len += more,
        _ => out.push(run),
    }
}
