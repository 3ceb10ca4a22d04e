//! What sits under an overlay: the base image, behind a small trait.
//!
//! The engine asks a [`BaseSource`] to describe a byte range as runs that are either bytes of
//! some file (which the engine reads through its ring) or zeros. A plain raw file is one run
//! ([`RawFileBase`]); a backing chain ([`ChainBase`]) splits the range by each add-cow layer's
//! bitmap into runs of that layer's raw image and of the layers under it, through the chain's
//! one walk (`format::chain::Runs`), which allocates nothing.
//!
//! Only the first layer's data file ([`BaseSource::main_fd`]) is registered with the rings; the
//! files of deeper layers are read through their plain descriptors (`Target::Fd`), which the
//! cores fall back to for any descriptor that is not the registered one.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::PathBuf;

use crate::bitmap::SparseBitmap;
#[cfg(test)]
use crate::format::chain::Opaque;
use crate::format::chain::{
    BaseChain, ChainFile, FileRole, LayerFormat, LayerShape, OpenedFile, RunSrc, Runs, Stack,
};

use super::align::{dio_align, DioAlign};
use super::remote::{RemoteBase, RemoteOptions};
use super::run::{push_run, BaseRun};
use crate::error::Result;

/// A read-only source of base bytes. Invariant: never written through (DESIGN invariant 5).
pub(crate) trait BaseSource: Send + Sync + std::fmt::Debug {
    /// Bytes of base data; reads past this are zeros.
    fn size(&self) -> u64;
    /// Appends runs covering exactly `[offset, offset+len)` (which lies within `size()`).
    fn map(&self, offset: u64, len: u64, out: &mut Vec<BaseRun>);
    /// The file descriptor of the base's main file, if it has one (registered with the rings).
    fn main_fd(&self) -> Option<RawFd>;
    /// The length, as known at open, of the file behind `fd` (one that [`BaseSource::map`]
    /// returned): a read that ends short before it has not reached the end of the file.
    fn file_len(&self, fd: RawFd) -> u64;
    /// Drops the shared lock taken on the base's files when the overlay was opened.
    fn unlock(&self);
    /// The remote base that serves [`BaseRun::Remote`] runs, if the chain ends in one.
    fn remote(&self) -> Option<&RemoteBase> {
        None
    }
    /// The base's layers (its direct base at depth 0), for the chain's walk when only which
    /// layer supplies a range matters (allocation depths).
    fn layers(&self) -> &dyn Stack;
    /// Appends the files the base holds open, its direct base at depth `first` (see
    /// [`crate::Disk::opened_files`]).
    fn opened_files<'a>(&'a self, first: usize, out: &mut Vec<OpenedFile<'a>>) {
        let _ = (first, out);
    }
}

/// A raw image file as base (the engine serves every base as a [`ChainBase`]; this simplest
/// form is what the read-splitting tests use).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct RawFileBase {
    file: File,
    size: u64,
    align: DioAlign,
    shape: Opaque,
}

#[cfg(test)]
impl RawFileBase {
    /// Wraps an open (read-only) base file of `size` bytes needing `align`.
    pub(crate) fn new(file: File, size: u64, align: DioAlign) -> RawFileBase {
        RawFileBase {
            file,
            size,
            align,
            shape: Opaque(Some(size)),
        }
    }
}

#[cfg(test)]
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
                layer: 0,
            });
        }
        if in_file < len {
            out.push(BaseRun::Zero { len: len - in_file });
        }
    }

    fn main_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn file_len(&self, _fd: RawFd) -> u64 {
        self.size
    }

    fn unlock(&self) {
        crate::sys::ofd_unlock(&self.file);
    }

    fn layers(&self) -> &dyn Stack {
        &self.shape
    }
}

/// One layer of a [`ChainBase`].
#[derive(Debug)]
struct ChainLayer {
    /// The file that names the layer (as the chain's opener resolved it) and its format.
    path: PathBuf,
    format: LayerFormat,
    /// The path `data` was opened by.
    data_path: PathBuf,
    /// The layer's bytes (a raw image, or an add-cow layer's raw image), read-only.
    data: File,
    /// The add-cow layer's metadata file (kept open: its shared lock lives with it).
    meta: Option<File>,
    /// Bytes the layer presents: its data file's length.
    size: u64,
    align: DioAlign,
    /// `None`: a raw layer (every byte its own). `Some`: the add-cow layer's bitmap, loaded at
    /// open. Invariant: a layer under an overlay is never written while it is a base (its
    /// files are share-locked against writers), so the bitmap never changes and this copy
    /// stays exact.
    bitmap: Option<SparseBitmap>,
}

/// A backing chain as base: the overlay's direct base is `layers[0]`; a range is split by each
/// add-cow layer's bitmap into runs of that layer's raw image and runs of the layers below,
/// and zeros past each layer's end (as a qcow2 chain reads in QEMU).
#[derive(Debug)]
pub(crate) struct ChainBase {
    layers: Vec<ChainLayer>,
    /// The remote base under the last file layer, if the chain ends in an NBD URI.
    remote: Option<RemoteBase>,
}

impl ChainBase {
    /// Takes over the files of an opened chain; each data file's `O_DIRECT` alignment is
    /// asked of the file system. A remote bottom gets its connections (`remote`).
    pub(crate) fn new(chain: BaseChain, remote: RemoteOptions) -> Result<ChainBase> {
        let remote = match chain.remote {
            Some(r) => {
                let sess = match r.session {
                    Some(s) => s,
                    None => {
                        crate::nbd::client::connect(&r.uri, std::time::Duration::from_secs(10))?
                    }
                };
                Some(RemoteBase::start(r.uri, sess, remote)?)
            }
            None => None,
        };
        let layers = chain
            .layers
            .into_iter()
            .map(|l| {
                let align = dio_align(&l.data, crate::sys::is_o_direct(&l.data));
                ChainLayer {
                    path: l.path,
                    format: l.format,
                    data_path: l.data_path,
                    data: l.data,
                    meta: l.meta,
                    size: l.size,
                    align,
                    bitmap: l.bitmap,
                }
            })
            .collect();
        Ok(ChainBase { layers, remote })
    }
}

/// The file layers, then the remote bottom: the chain's one walk ([`Runs`]) runs over these.
impl Stack for ChainBase {
    #[inline]
    fn count(&self) -> usize {
        self.layers.len() + usize::from(self.remote.is_some())
    }

    #[inline]
    fn shape(&self, depth: usize) -> LayerShape<'_> {
        match self.layers.get(depth) {
            Some(l) => LayerShape {
                size: l.size,
                bitmap: l.bitmap.as_ref(),
            },
            None => LayerShape {
                size: self.remote.as_ref().map_or(0, |r| r.size()),
                bitmap: None,
            },
        }
    }
}

impl BaseSource for ChainBase {
    fn size(&self) -> u64 {
        self.shape(0).size
    }

    fn remote(&self) -> Option<&RemoteBase> {
        self.remote.as_ref()
    }

    fn map(&self, offset: u64, len: u64, out: &mut Vec<BaseRun>) {
        for run in Runs::new(self, offset, len) {
            let layer = match run.src {
                RunSrc::Zero => {
                    push_run(out, BaseRun::Zero { len: run.len });
                    continue;
                }
                RunSrc::Layer(d) => d,
            };
            match (self.layers.get(layer), &self.remote) {
                (Some(l), _) => push_run(
                    out,
                    BaseRun::File {
                        fd: l.data.as_raw_fd(),
                        offset: run.offset,
                        len: run.len,
                        align: l.align,
                        layer: layer as u32,
                    },
                ),
                (None, Some(r)) => r.map(run.offset, run.len, layer as u32, out),
                (None, None) => push_run(out, BaseRun::Zero { len: run.len }),
            }
        }
    }

    fn main_fd(&self) -> Option<RawFd> {
        self.layers.first().map(|l| l.data.as_raw_fd())
    }

    fn file_len(&self, fd: RawFd) -> u64 {
        self.layers
            .iter()
            .find(|l| l.data.as_raw_fd() == fd)
            .map_or(0, |l| l.size)
    }

    fn unlock(&self) {
        for l in &self.layers {
            crate::sys::ofd_unlock(&l.data);
            if let Some(m) = &l.meta {
                crate::sys::ofd_unlock(m);
            }
        }
    }

    fn layers(&self) -> &dyn Stack {
        self
    }

    fn opened_files<'a>(&'a self, first: usize, out: &mut Vec<OpenedFile<'a>>) {
        for (i, l) in self.layers.iter().enumerate() {
            let file = |role, path: &PathBuf| ChainFile {
                depth: first + i,
                role,
                path: path.clone(),
                format: Some(l.format),
            };
            match &l.meta {
                Some(meta) => {
                    out.push(OpenedFile {
                        file: file(FileRole::Named, &l.path),
                        fd: Some(meta.as_fd()),
                    });
                    out.push(OpenedFile {
                        file: file(FileRole::Data, &l.data_path),
                        fd: Some(l.data.as_fd()),
                    });
                }
                None => out.push(OpenedFile {
                    file: file(FileRole::Named, &l.path),
                    fd: Some(l.data.as_fd()),
                }),
            }
        }
        if let Some(r) = &self.remote {
            out.push(OpenedFile {
                file: ChainFile {
                    depth: first + self.layers.len(),
                    role: FileRole::Remote(r.uri().clone()),
                    path: PathBuf::from(&r.uri().text),
                    format: Some(LayerFormat::Nbd),
                },
                fd: None,
            });
        }
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
                    align: DioAlign::NONE,
                    layer: 0,
                },
                BaseRun::Zero { len: 200 }
            ]
        );
    }
}
