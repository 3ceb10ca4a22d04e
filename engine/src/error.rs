//! The crate's one error type: a small matchable [`ErrorKind`], the context a person needs to act
//! on it (path, offset, operation) and the underlying source, if any.

use std::fmt;
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form callers can match on. The message for a person is [`Error`]'s
/// `Display`, which adds the context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The metadata file is shorter than the 2560-byte header.
    #[error("file too short for an add-cow header: need {need} bytes, file has {have}")]
    ShortHeader { need: u64, have: u64 },
    /// The first 8 bytes are not `ADD_COW\xff`.
    #[error("bad magic: not an add-cow file")]
    BadMagic,
    /// The version field is not 1.
    #[error("unsupported add-cow version {0} (only version 1 is supported)")]
    UnsupportedVersion(u32),
    /// A 1024-byte path field has no NUL terminator.
    #[error("{field} field is not NUL-terminated within its 1024 bytes")]
    UnterminatedPath { field: &'static str },
    /// A path is too long to be stored (1024 bytes or more).
    #[error("{field} path is {len} bytes; at most 1023 fit")]
    PathTooLong { field: &'static str, len: usize },
    /// `image_file` is empty.
    #[error("image_file is empty: an add-cow overlay needs a raw image")]
    EmptyImagePath,
    /// A path names a protocol other than the NBD URIs (`nbd://`, `nbd+unix://`, and with TLS
    /// `nbds://`, `nbds+unix://`) the engine opens.
    #[error(
        "unsupported protocol in {field} path {path:?} (a base over the network is named \
         nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH, or with TLS nbds://... or \
         nbds+unix://...)"
    )]
    UnsupportedProtocol { field: &'static str, path: String },
    /// The raw image size is not a multiple of 512.
    #[error("raw image size {size} is not a multiple of 512")]
    UnalignedImageSize { size: u64 },
    /// A virtual size over [`crate::format::MAX_VIRTUAL_SIZE`] (asked for by create or
    /// resize, or the size of a raw image being opened).
    #[error(
        "virtual size {size} bytes is over the largest an overlay may have, {max} bytes (64 TiB)"
    )]
    TooLarge { size: u64, max: u64 },
    /// The bitmap is shorter than the virtual size needs.
    #[error("bitmap truncated: need {need} bytes, file has {have}")]
    BitmapTruncated { need: u64, have: u64 },
    /// A file that should exist does not.
    #[error("file not found")]
    NotFound,
    /// A file exists and would be overwritten (use `--force`).
    #[error("file already exists")]
    AlreadyExists,
    /// Another process holds the overlay's lock.
    #[error("overlay is locked by another process")]
    Locked,
    /// Two roles of an overlay name the same file (say the raw image is the base), which would
    /// make serving write to a file that must not be written.
    #[error("the {a} and the {b} are the same file")]
    SameFile { a: &'static str, b: &'static str },
    /// A file appears twice in a backing chain (by device and inode); see [`BackingLoop`].
    #[error("{0}")]
    BackingLoop(Box<BackingLoop>),
    /// A backing chain has more layers below the top overlay than the engine opens.
    #[error("backing chain too deep: more than {limit} layers below the top overlay (at {path})")]
    ChainTooDeep { limit: usize, path: String },
    /// A file of an open overlay changed, or its path names another file now, while the disk
    /// had let go of its locks (see [`crate::Disk::relock_overlay`]): someone else may have
    /// written it, so this disk must not write it any more.
    #[error("changed while its lock was let go: {0}")]
    ChangedWhileUnlocked(String),
    /// The dirty bitmaps sidecar (`X.add-cow.bitmaps`) is corrupt or failed.
    #[error("bad dirty bitmaps file: {0}")]
    BadBitmaps(String),
    /// An argument is out of range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An NBD URI is malformed.
    #[error("bad NBD URI {uri:?}: {why}")]
    BadUri { uri: String, why: String },
    /// The image server of a remote base refused or broke the protocol, or changed under us.
    #[error("image server {uri}: {why}")]
    Remote { uri: String, why: String },
    /// The engine is shut down or shutting down.
    #[error("engine is shut down")]
    Shutdown,
    /// An operating-system error (the errno is in the source).
    #[error("I/O error")]
    Io,
}

/// The two names of one file found twice in a backing chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backing chain loop: {again} is the same file as {first} (the {role} of an upper layer)")]
pub struct BackingLoop {
    /// The path under which the file is already in the chain.
    pub first: String,
    /// The path that names it again (the layer being opened).
    pub again: String,
    /// What the first one is: "overlay" or "raw image" (of the top or of a base layer).
    pub role: &'static str,
}

/// An error with context: what kind, which file, where in it, doing what, and why.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    offset: Option<u64>,
    op: Option<&'static str>,
    source: Option<std::io::Error>,
}

impl Error {
    /// A new error of `kind` with no context yet.
    pub fn new(kind: ErrorKind) -> Self {
        Error {
            kind,
            path: None,
            offset: None,
            op: None,
            source: None,
        }
    }

    /// An [`ErrorKind::Io`] (or [`ErrorKind::NotFound`]) error wrapping `source`, doing `op`.
    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        let kind = if source.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        Error {
            kind,
            path: None,
            offset: None,
            op: Some(op),
            source: Some(source),
        }
    }

    /// Adds the file the error is about.
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Adds the byte offset the error is about.
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// Adds the operation that failed ("open", "read header", "fdatasync", ...).
    pub fn with_op(mut self, op: &'static str) -> Self {
        self.op = Some(op);
        self
    }

    /// The matchable kind.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The file the error is about, if known.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// The byte offset the error is about, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The raw OS error number, if the error came from the kernel.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(|e| e.raw_os_error())
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        if let Some(op) = self.op {
            write!(f, "{op}: ")?;
        }
        write!(f, "{}", self.kind)?;
        if let Some(offset) = self.offset {
            write!(f, " (at offset {offset})")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_carries_context() {
        let e = Error::new(ErrorKind::BitmapTruncated { need: 100, have: 7 })
            .with_path("/x/a.add-cow")
            .with_op("open");
        assert_eq!(
            e.to_string(),
            "/x/a.add-cow: open: bitmap truncated: need 100 bytes, file has 7"
        );
    }

    #[test]
    fn io_not_found_maps_to_kind() {
        let e = Error::io("open", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(e.kind(), &ErrorKind::NotFound);
    }
}
