//! Opening (with full validation) and creating overlays.

use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::bitmap::SparseBitmap;
use crate::error::{Error, ErrorKind, Result};
use crate::format::chain::{base_virtual_size, BaseChain, ChainOpenOptions};
use crate::format::header::check_storable;
use crate::format::header::{
    bitmap_len, check_virtual_size, BITMAP_OFFSET, HEADER_SIZE, SECTOR_SIZE,
};
use crate::format::open::{file_len, load_bitmap, read_header, soft_findings};
use crate::format::paths::{refuse_protocol, resolve, storage_path};
use crate::format::Header;
use crate::sys::{self, LockKind};

/// How to open an overlay's files.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open the raw image and metadata read-only (no lock for writing is taken; shared locks
    /// are).
    pub read_only: bool,
    /// Open the raw image with `O_DIRECT`.
    pub direct_image: bool,
    /// Open the base with `O_DIRECT`.
    pub direct_base: bool,
    /// Take no lock at all (inspection tools, like `qemu-img -U`): the bitmap may be changing
    /// under a serving process. Only sensible together with `read_only`.
    pub no_lock: bool,
    /// Do not open the base chain at all (`base_path`, `base` and `base_size` are `None`): for
    /// `rebase -u`, which replaces a base that may have moved or vanished.
    pub skip_base: bool,
    /// Lock the overlay's own files as usual but take no lock on its base chain: for `commit`,
    /// which locks the base for writing itself (our own shared lock on it would conflict).
    pub no_base_lock: bool,
}

/// An open, validated overlay: its three files, resolved paths, sizes and the loaded bitmap.
///
/// Invariants: `virtual_size` is the raw image's size and a multiple of 512; the metadata file
/// holds at least `HEADER_SIZE + bitmap_len(virtual_size)` bytes; the base (if any) is open
/// read-only. Unless `no_lock`, a writable overlay holds exclusive OFD locks on its metadata file
/// and its raw image (a read-only one shared locks), and (unless `no_base_lock`) a shared lock on
/// its base in QEMU's lock-byte layout (so QEMU can read the same base, but nobody can write it).
/// The locks live as long as the files. Both of the overlay's locks are taken before its header
/// and bitmap are read: a writer changes them only while it holds its lock, so what is loaded is
/// what the last writer left when it let go, and nobody changes it while we hold ours. (With
/// `no_lock` the bitmap is a snapshot that may already be stale: only for inspection.)
#[derive(Debug)]
pub struct Overlay {
    /// The `.add-cow` file as given to `open`.
    pub meta_path: PathBuf,
    /// The parsed header.
    pub header: Header,
    /// The raw image's resolved path.
    pub image_path: PathBuf,
    /// The base's resolved path, if any.
    pub base_path: Option<PathBuf>,
    /// Bytes the guest sees: the raw image's size.
    pub virtual_size: u64,
    /// The base's size in bytes, if any (reads past it return zeros): a raw base's length, an
    /// add-cow base's virtual size.
    pub base_size: Option<u64>,
    /// The `.add-cow` file (read-write unless read-only; never `O_DIRECT`).
    pub meta: File,
    /// The raw image.
    pub image: File,
    /// The backing chain (the base and, when the base is itself an add-cow overlay, the layers
    /// under it), every file read-only; see [`BaseChain`].
    pub base: Option<BaseChain>,
    /// The allocation bitmap, loaded from the file.
    pub bitmap: SparseBitmap,
    /// Non-fatal findings (non-zero reserved bytes, bits past the end).
    pub warnings: Vec<String>,
}

/// Allocates the blocks of `[offset, offset + len)` of `file` (`fallocate` mode 0: contents
/// and, inside the file, size unchanged), so later writes there cannot fail with ENOSPC. A file
/// system without `fallocate` (EOPNOTSUPP) is not an error: the range stays sparse.
pub(crate) fn preallocate(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match sys::allocate(file, offset, len) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        other => other,
    }
}

/// Opens a file for the overlay with the given access, mapping errors with path and op.
fn open_file(path: &Path, write: bool, direct: bool, op: &'static str) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(write);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| Error::io(op, e).with_path(path))
}

/// How often [`open_locked`] opens a path again that was replaced while it took the lock.
const RELOCK_TRIES: usize = 8;

/// Opens the overlay at `path` and takes its OFD lock (exclusive when `write`), making sure the
/// file locked is the one `path` names once the lock is held: a tool that replaces the overlay
/// by renaming a new file over it (rebase) does so under the old file's lock, so a process that
/// opened the old file before the rename and gets the lock after it would hold a file no one
/// opens any more (its bits lost, or a commit emptying it while the new file's bits point into
/// the shared raw image). Such a file is dropped and the path opened again. `between` runs after
/// each open and before its lock (a test seam; a no-op otherwise).
fn open_locked(path: &Path, write: bool, mut between: impl FnMut()) -> Result<File> {
    for _ in 0..RELOCK_TRIES {
        let file = open_file(path, write, false, "open overlay")?;
        between();
        sys::ofd_lock(&file, LockKind::for_write(write)).map_err(|e| e.with_path(path))?;
        let named =
            std::fs::metadata(path).map_err(|e| Error::io("stat overlay", e).with_path(path));
        if let Ok(m) = named {
            use std::os::unix::fs::MetadataExt;
            if file_id(&file, path)? == (m.dev(), m.ino()) {
                return Ok(file);
            }
        }
    }
    Err(Error::new(ErrorKind::InvalidArgument(format!(
        "the overlay was replaced {RELOCK_TRIES} times while it was being opened"
    )))
    .with_path(path)
    .with_op("open overlay"))
}

/// The (device, inode) of an open file, to tell whether two paths name one file.
fn file_id(file: &File, path: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| Error::io("stat", e).with_path(path))
}

/// What a file is and when it last changed, from `fstat`/`stat`: its identity (device, inode),
/// its size, and its modification and status-change times (seconds, nanoseconds). Two stamps of
/// one file differ once anything wrote it, resized it, renamed it or changed its attributes in
/// between (to the file system's timestamp granularity); a stamp of a path names the file the
/// path leads to at that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes (`st_size`).
    pub size: u64,
    /// Last modification (`st_mtime`).
    pub mtime: (i64, i64),
    /// Last status change (`st_ctime`).
    pub ctime: (i64, i64),
}

impl FileStamp {
    /// The stamp of what `m` describes.
    pub fn of(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The stamp of the open file `file` (`fstat`).
    pub fn of_file(file: &File) -> std::io::Result<FileStamp> {
        file.metadata().map(|m| FileStamp::of(&m))
    }

    /// Whether `self` and `other` are one file (device and inode).
    pub fn same_file(&self, other: &FileStamp) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// The stamps of an overlay's two files (see [`FileStamp`]): what a writer that let go of its
/// locks compares against before it takes them back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayStamp {
    /// The `.add-cow` file.
    pub meta: FileStamp,
    /// The raw image.
    pub image: FileStamp,
}

impl OverlayStamp {
    /// The stamps of the open files `meta` and `image` (`fstat` of each).
    pub fn of_files(meta: &File, image: &File) -> std::io::Result<OverlayStamp> {
        Ok(OverlayStamp {
            meta: FileStamp::of_file(meta)?,
            image: FileStamp::of_file(image)?,
        })
    }
}

/// Refuses `a` and `b` being one file.
fn refuse_same(a: (&'static str, &File, &Path), b: (&'static str, &File, &Path)) -> Result<()> {
    if file_id(a.1, a.2)? == file_id(b.1, b.2)? {
        return Err(Error::new(ErrorKind::SameFile { a: a.0, b: b.0 }).with_path(b.2));
    }
    Ok(())
}

impl Overlay {
    /// Opens and validates `path`. Every failure is a typed [`crate::Error`] with the path in it:
    /// the metadata file missing or unreadable, it, its raw image or its base locked by another
    /// open (say a second overlay naming the same raw image; [`ErrorKind::Locked`]), shorter than the header, with a bad magic, version, path field,
    /// empty or protocol `image_file`; the raw image or base missing or unreadable; a raw image
    /// size that is not a multiple of 512; a bitmap shorter than the raw image needs.
    ///
    /// Non-zero reserved bytes and set bits past the end are collected in `warnings`.
    ///
    /// # Example
    ///
    /// Open a fresh overlay for writing, look at what it holds, and see its lock at work:
    ///
    /// ```
    /// use addcow_engine::format::{create, CreateOptions, OpenOptions, Overlay};
    /// use addcow_engine::ErrorKind;
    ///
    /// let dir = tempfile::tempdir()?;
    /// let base = dir.path().join("base.img");
    /// std::fs::write(&base, vec![0xab; 64 * 1024])?;
    /// let path = dir.path().join("vm.add-cow");
    /// create(&CreateOptions {
    ///     overlay: path.clone(),
    ///     base: Some(base.clone()),
    ///     size: Some(1 << 20), // 1 MiB disk over a 64 KiB base: the rest reads as zeros
    ///     ..CreateOptions::default()
    /// })?;
    ///
    /// let o = Overlay::open(&path, &OpenOptions::default())?;
    /// assert_eq!(o.virtual_size, 1 << 20);
    /// assert_eq!(o.sectors(), 2048);
    /// assert_eq!(o.base_path.as_deref(), Some(base.as_path()));
    /// assert_eq!(o.base_size, Some(64 * 1024));
    /// assert_eq!(o.image_path, dir.path().join("vm.raw"));
    /// assert_eq!(o.bitmap.count_set(), 0); // nothing written yet: every sector is the base's
    /// assert!(o.warnings.is_empty());
    ///
    /// // A writable overlay holds an exclusive lock: a second writer is refused...
    /// let again = Overlay::open(&path, &OpenOptions::default()).unwrap_err();
    /// assert_eq!(again.kind(), &ErrorKind::Locked);
    /// // ...while an inspection tool can still read it without taking the lock.
    /// let peek = OpenOptions {
    ///     read_only: true,
    ///     no_lock: true,
    ///     ..OpenOptions::default()
    /// };
    /// assert_eq!(Overlay::open(&path, &peek)?.virtual_size, 1 << 20);
    ///
    /// // A file that is not an overlay: a typed error that names the file.
    /// let e = Overlay::open(&base, &peek).unwrap_err();
    /// assert_eq!(e.kind(), &ErrorKind::BadMagic);
    /// assert!(e.to_string().contains("base.img"), "{e}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Overlay> {
        let meta = if opts.no_lock {
            open_file(path, !opts.read_only, false, "open overlay")?
        } else {
            open_locked(path, !opts.read_only, || {})?
        };
        let (header, meta_len) = read_header(&meta, path, "stat overlay", "read header")?;

        let image_path = resolve(path, "image_file", &header.image_file)
            .map_err(|e| e.with_path(path).with_op("resolve image_file"))?;
        let image = open_file(
            &image_path,
            !opts.read_only,
            opts.direct_image,
            "open raw image",
        )?;
        let virtual_size = file_len(&image, &image_path, "stat raw image")?;
        if virtual_size % SECTOR_SIZE != 0 {
            return Err(
                Error::new(ErrorKind::UnalignedImageSize { size: virtual_size })
                    .with_path(&image_path)
                    .with_op("open raw image"),
            );
        }
        check_virtual_size(virtual_size)
            .map_err(|e| e.with_path(&image_path).with_op("open raw image"))?;

        refuse_same(("overlay", &meta, path), ("raw image", &image, &image_path))?;
        if !opts.no_lock {
            // Two overlays naming one raw image must not both write it.
            sys::ofd_lock(&image, LockKind::for_write(!opts.read_only))
                .map_err(|e| e.with_path(&image_path))?;
        }
        let base = if header.backing_file.is_empty() || opts.skip_base {
            None
        } else {
            let bp = resolve(path, "backing_file", &header.backing_file)
                .map_err(|e| e.with_path(path).with_op("resolve backing_file"))?;
            let chain_opts = ChainOpenOptions {
                direct: opts.direct_base,
                no_lock: opts.no_lock || opts.no_base_lock,
                ..ChainOpenOptions::default()
            };
            let upper = [
                (&meta, path, "overlay"),
                (&image, image_path.as_path(), "raw image"),
            ];
            let chain = BaseChain::open(&bp, &upper, chain_opts).map_err(|e| {
                // The direct base being one of the overlay's own files keeps its plain name.
                match e.kind() {
                    ErrorKind::BackingLoop(l) if Path::new(&l.again) == bp => {
                        Error::new(ErrorKind::SameFile {
                            a: l.role,
                            b: "base",
                        })
                        .with_path(&bp)
                    }
                    _ => e,
                }
            })?;
            Some(chain)
        };
        let base_path = base.as_ref().and_then(|c| c.path()).map(Path::to_path_buf);
        let base_size = base.as_ref().map(BaseChain::size);

        let need = bitmap_len(virtual_size);
        let have = meta_len - HEADER_SIZE as u64;
        if have < need {
            return Err(Error::new(ErrorKind::BitmapTruncated { need, have })
                .with_path(path)
                .with_op("open"));
        }
        let bitmap = load_bitmap(&meta, path, virtual_size / SECTOR_SIZE)?;
        let warnings = soft_findings(&header, &meta, path, meta_len, virtual_size)?;
        Ok(Overlay {
            meta_path: path.to_path_buf(),
            header,
            image_path,
            base_path,
            virtual_size,
            base_size,
            meta,
            image,
            base,
            bitmap,
            warnings,
        })
    }

    /// Sectors (bits) covered by the bitmap.
    pub fn sectors(&self) -> u64 {
        self.virtual_size / SECTOR_SIZE
    }
}

/// What `create` makes.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// The `.add-cow` file to write.
    pub overlay: PathBuf,
    /// The base image; `None` = no base.
    pub base: Option<PathBuf>,
    /// The raw image; default: the overlay's name with `.raw`.
    pub image: Option<PathBuf>,
    /// Size for a new raw image; default: the base's size.
    pub size: Option<u64>,
    /// Overwrite an existing overlay.
    pub force: bool,
}

/// How [`create_with`] allocates a raw image it creates (qemu-img's `preallocation` names and
/// meanings). The metadata file's bitmap is always allocated. The format has no field for it:
/// `info` cannot tell how an image was made (`stat`'s block count or `qemu-img map` can).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Sparse: blocks are allocated by the file system as the sectors are first written.
    #[default]
    Off,
    /// `fallocate` the whole raw image (unwritten extents: reads zeros, no data written).
    Falloc,
    /// Write zeros over the whole raw image.
    Full,
}

impl Preallocation {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

impl std::fmt::Display for Preallocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Preallocation {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" => Ok(Preallocation::Off),
            "falloc" => Ok(Preallocation::Falloc),
            "full" => Ok(Preallocation::Full),
            _ => Err(format!(
                "unknown preallocation {s:?} (expected off, falloc or full)"
            )),
        }
    }
}

/// Allocates all `size` bytes of the new raw image `f` as `mode` asks.
fn preallocate_image(f: &File, size: u64, mode: Preallocation) -> std::io::Result<()> {
    match mode {
        Preallocation::Off => Ok(()),
        Preallocation::Falloc => {
            if size == 0 {
                return Ok(());
            }
            sys::allocate(f, 0, size)
        }
        Preallocation::Full => {
            const CHUNK: u64 = 1 << 20;
            let zeros = vec![0u8; CHUNK as usize];
            let mut at = 0;
            while at < size {
                let n = (size - at).min(CHUNK) as usize;
                f.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
    }
}

/// The raw image path `create` uses when none is given: the overlay's name with `.raw`.
pub fn default_image_path(overlay: &Path) -> PathBuf {
    overlay.with_extension("raw")
}

/// Creates an overlay: header plus an all-clear bitmap, and a sparse raw image if it is missing.
///
/// * The base, if given, must exist; the raw image's size is its size when the raw image exists,
///   otherwise `size`, otherwise the base's size; it must be a multiple of 512.
/// * Relative paths (relative to the working directory) are stored relative to the overlay's
///   directory; absolute ones as given. Paths of 1024 bytes or more are refused.
/// * An existing overlay is refused ([`ErrorKind::AlreadyExists`]) unless `force`; with `force`
///   an overlay locked by another process is still refused ([`ErrorKind::Locked`]).
/// * The written files are fsynced, and so is the folder of each file created (the overlay's,
///   and a new raw image's when it is elsewhere, before the overlay is written).
///
/// # Example
///
/// An overlay over a base, with the raw image next to it (`vm.raw`, sparse, as large as the
/// base), then the files it wrote:
///
/// ```
/// use std::os::unix::ffi::OsStrExt;
/// use std::os::unix::fs::MetadataExt;
///
/// use addcow_engine::format::{create, CreateOptions, Header, BITMAP_OFFSET};
/// use addcow_engine::ErrorKind;
///
/// let dir = tempfile::tempdir()?;
/// let base = dir.path().join("base.img");
/// std::fs::write(&base, vec![0xab; 1 << 20])?;
/// let overlay = dir.path().join("vm.add-cow");
/// let opts = CreateOptions {
///     overlay: overlay.clone(),
///     base: Some(base.clone()),
///     ..CreateOptions::default()
/// };
/// create(&opts)?;
///
/// // The raw image: as large as the base, and sparse (no block allocated yet).
/// let raw = std::fs::metadata(dir.path().join("vm.raw"))?;
/// assert_eq!(raw.len(), 1 << 20);
/// assert_eq!(raw.blocks(), 0);
/// // The metadata file: the 2560-byte header, then one clear bit per 512-byte sector.
/// let meta = std::fs::read(&overlay)?;
/// assert_eq!(meta.len() as u64, BITMAP_OFFSET + (1 << 20) / 512 / 8);
/// assert!(meta[BITMAP_OFFSET as usize..].iter().all(|b| *b == 0));
/// let header = Header::parse(&meta[..BITMAP_OFFSET as usize])?;
/// assert_eq!(header.image_file, b"vm.raw"); // stored relative to the overlay
/// assert_eq!(header.backing_file, base.as_os_str().as_bytes());
///
/// // An existing overlay is never overwritten unless asked to (`force`).
/// assert_eq!(create(&opts).unwrap_err().kind(), &ErrorKind::AlreadyExists);
/// create(&CreateOptions { force: true, ..opts })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn create(opts: &CreateOptions) -> Result<()> {
    create_with(opts, Preallocation::Off)
}

/// [`create`], allocating a raw image it creates as `prealloc` asks. An existing raw image is
/// used as it is: any mode but [`Preallocation::Off`] is refused for it (full would overwrite
/// its data). If the allocation fails (ENOSPC; EOPNOTSUPP for falloc on a file system without
/// `fallocate`), the new raw image is removed and nothing else was written.
pub fn create_with(opts: &CreateOptions, prealloc: Preallocation) -> Result<()> {
    create_files(opts, prealloc).map(|_synced_dirs| ())
}

/// The files a [`create_exclusive`] made, each kept open (a descriptor of the open file it was
/// created with, holding no lock): exactly what may be removed again, never a file someone else
/// put at one of the paths since (while it is open, its inode cannot be freed and reused).
#[derive(Debug, Default)]
pub struct Created {
    files: Vec<(PathBuf, File)>,
}

impl Created {
    /// The paths of the files made (the raw image first, then the overlay).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// The files made, each with its path and the descriptor it was created with (the raw
    /// image first, then the overlay): a caller checks what was created, not what its path
    /// names now.
    pub fn files(&self) -> impl Iterator<Item = (&Path, &File)> {
        self.files.iter().map(|(p, f)| (p.as_path(), f))
    }

    /// Records `file`, just created at `path`. If it cannot be kept, it is removed by its path
    /// (created with `O_EXCL` a moment ago, it is ours) and the error returned.
    fn record(&mut self, path: &Path, file: &File, op: &'static str) -> Result<()> {
        match file.try_clone() {
            Ok(kept) => {
                self.files.push((path.to_path_buf(), kept));
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(Error::io(op, e).with_path(path))
            }
        }
    }

    /// Removes the files made that are still at their paths (same device and inode); the
    /// first error, if any (every file is tried).
    pub fn remove(&self) -> Result<()> {
        let mut first = None;
        for (p, kept) in &self.files {
            let ours = match (kept.metadata(), std::fs::symlink_metadata(p)) {
                (Ok(k), Ok(m)) => FileStamp::of(&k).same_file(&FileStamp::of(&m)),
                _ => false,
            };
            if ours {
                if let Err(e) = std::fs::remove_file(p) {
                    first.get_or_insert(Error::io("remove a created file", e).with_path(p));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// [`create`] in exclusive mode: both the overlay and its raw image are created here, each with
/// `O_CREAT|O_EXCL|O_NOFOLLOW`, so nothing at either path (a file, a symlink, one swapped in
/// meanwhile) is ever written or used: that is [`ErrorKind::AlreadyExists`]. `force` is
/// ignored. Returns the files it made; if it fails, it removes what it made (only those) and
/// nothing is left behind. For a caller that must be able to remove exactly what it created
/// (a live snapshot whose next step fails).
pub fn create_exclusive(opts: &CreateOptions) -> Result<Created> {
    let mut made = Created::default();
    match create_inner(opts, Preallocation::Off, true, &mut made) {
        Ok(_synced_dirs) => Ok(made),
        Err(e) => {
            if let Err(again) = made.remove() {
                tracing::warn!(error = %again, "cannot remove a file of a failed create");
            }
            Err(e)
        }
    }
}

/// The folder that holds `path` (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether the folders `a` and `b` are one (by device and inode; unknown counts as not).
fn same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}

/// An error creating `path`: [`ErrorKind::AlreadyExists`] for `EEXIST`, else the I/O error.
fn exists_or_io(e: std::io::Error, path: &Path, op: &'static str) -> Error {
    if e.raw_os_error() == Some(libc::EEXIST) {
        Error::new(ErrorKind::AlreadyExists)
            .with_path(path)
            .with_op(op)
    } else {
        Error::io(op, e).with_path(path)
    }
}

/// fsyncs the folder `dir`, making the files created in it durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", e).with_path(dir))
}

/// [`create_with`]; returns the folders it fsynced, in order: the folder of every file it
/// created, each once. A raw image created in another folder than the overlay's has its folder
/// synced before the overlay is written (so a durable overlay never names a raw image whose
/// directory entry could still be lost); the overlay's folder is synced last, and covers a raw
/// image created next to it.
fn create_files(opts: &CreateOptions, prealloc: Preallocation) -> Result<Vec<PathBuf>> {
    create_inner(opts, prealloc, false, &mut Created::default())
}

/// [`create_files`]; with `exclusive` (see [`create_exclusive`]) both files must be new and
/// each file created is recorded in `made` as soon as it exists.
fn create_inner(
    opts: &CreateOptions,
    prealloc: Preallocation,
    exclusive: bool,
    made: &mut Created,
) -> Result<Vec<PathBuf>> {
    let mut synced_dirs = Vec::new();
    let overlay = &opts.overlay;
    let image = opts
        .image
        .clone()
        .unwrap_or_else(|| default_image_path(overlay));
    if image == *overlay {
        return Err(Error::new(ErrorKind::InvalidArgument(format!(
            "the raw image and the overlay are the same file: {}",
            image.display()
        ))));
    }
    if (exclusive || !opts.force) && overlay.symlink_metadata().is_ok() {
        return Err(Error::new(ErrorKind::AlreadyExists)
            .with_path(overlay)
            .with_op("create overlay (use --force to overwrite)"));
    }

    // What to store, checked before anything is written.
    let stored_base = match &opts.base {
        None => Vec::new(),
        Some(b) => {
            refuse_protocol("backing_file", b.as_os_str().as_bytes())?;
            let s = storage_path(overlay, b)?;
            check_storable("backing_file", s.as_os_str().as_bytes())?;
            s.as_os_str().as_bytes().to_vec()
        }
    };
    refuse_protocol("image_file", image.as_os_str().as_bytes())?;
    // The default image sits next to the overlay: store its bare name.
    let stored_image = match (&opts.image, image.file_name()) {
        (None, Some(name)) => PathBuf::from(name),
        _ => storage_path(overlay, &image)?,
    };
    check_storable("image_file", stored_image.as_os_str().as_bytes())?;
    let header = Header {
        backing_file: stored_base,
        image_file: stored_image.as_os_str().as_bytes().to_vec(),
        reserved_nonzero: false,
    };
    let hbytes = header.encode()?;

    let remote_base = match &opts.base {
        Some(b) => crate::format::paths::nbd_uri(b)?.is_some(),
        None => false,
    };
    let base_file = match &opts.base {
        Some(b) if !remote_base => Some(open_file(b, false, false, "open base")?),
        _ => None,
    };
    // An add-cow base presents its virtual size; a raw one its length; a remote one the size
    // its server states (asked only when no size is given: an overlay can be made while the
    // image server is down).
    let base_size = match &opts.base {
        Some(_) if remote_base && opts.size.is_some() => None,
        Some(b) => Some(base_virtual_size(b)?),
        None => None,
    };
    // No two roles may share a file: overwriting the base (or the raw image) with an overlay
    // header, or serving writes into the base, would destroy data.
    let existing_image = File::open(&image).ok();
    let existing_overlay = File::open(overlay).ok();
    if let (Some(bf), Some(b)) = (&base_file, &opts.base) {
        if let Some(i) = &existing_image {
            refuse_same(("base", bf, b), ("raw image", i, &image))?;
        }
        if let Some(o) = &existing_overlay {
            refuse_same(("base", bf, b), ("overlay", o, overlay))?;
        }
    }
    if let (Some(i), Some(o)) = (&existing_image, &existing_overlay) {
        refuse_same(("raw image", i, &image), ("overlay", o, overlay))?;
    }

    // The raw image: use it if it exists, else create it (sparse unless `prealloc`).
    // In exclusive mode a symlink at the path counts as a file there (it is never followed).
    let found = if exclusive {
        std::fs::symlink_metadata(&image)
    } else {
        std::fs::metadata(&image)
    };
    let virtual_size = match found {
        Ok(_) if exclusive => {
            return Err(Error::new(ErrorKind::AlreadyExists)
                .with_path(&image)
                .with_op("create raw image"));
        }
        Ok(_) if prealloc != Preallocation::Off => {
            return Err(Error::new(ErrorKind::InvalidArgument(format!(
                "preallocation {prealloc} applies to a new raw image, and {} exists",
                image.display()
            )))
            .with_path(&image)
            .with_op("create"));
        }
        Ok(m) => {
            let len = m.len();
            if let Some(s) = opts.size {
                if s != len {
                    return Err(Error::new(ErrorKind::InvalidArgument(format!(
                        "raw image {} exists with size {len}, but a size of {s} was asked for",
                        image.display()
                    ))));
                }
            }
            if len % SECTOR_SIZE != 0 {
                return Err(Error::new(ErrorKind::UnalignedImageSize { size: len })
                    .with_path(&image)
                    .with_op("create"));
            }
            check_virtual_size(len).map_err(|e| e.with_path(&image).with_op("create"))?;
            len
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let size = opts.size.or(base_size).ok_or_else(|| {
                Error::new(ErrorKind::InvalidArgument(
                    "no base and no size: give a size for the new raw image".into(),
                ))
            })?;
            if size % SECTOR_SIZE != 0 {
                return Err(Error::new(ErrorKind::InvalidArgument(format!(
                    "size {size} is not a multiple of 512"
                ))));
            }
            check_virtual_size(size).map_err(|e| e.with_path(&image).with_op("create"))?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&image)
                .map_err(|e| exists_or_io(e, &image, "create raw image"))?;
            made.record(&image, &f, "keep new raw image")?;
            f.set_len(size)
                .map_err(|e| Error::io("size raw image", e).with_path(&image))
                .and_then(|()| {
                    preallocate_image(&f, size, prealloc).map_err(|e| {
                        Error::io(
                            match prealloc {
                                Preallocation::Full => "preallocate raw image (write zeros)",
                                _ => "preallocate raw image (fallocate)",
                            },
                            e,
                        )
                        .with_path(&image)
                    })
                })
                .and_then(|()| {
                    f.sync_all()
                        .map_err(|e| Error::io("sync raw image", e).with_path(&image))
                })
                .and_then(|()| {
                    // Its directory entry durable too, before an overlay names it.
                    let dir = parent_dir(&image);
                    if !same_dir(dir, parent_dir(overlay)) {
                        sync_dir(dir)?;
                        synced_dirs.push(dir.to_path_buf());
                    }
                    Ok(())
                })
                .inspect_err(|_| {
                    // Made here and unusable: leave nothing behind.
                    let _ = std::fs::remove_file(&image);
                })?;
            size
        }
        Err(e) => return Err(Error::io("stat raw image", e).with_path(&image)),
    };

    // The overlay: header + all-clear (sparse) bitmap.
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    if opts.force && !exclusive {
        o.create(true);
    } else {
        o.create_new(true).custom_flags(libc::O_NOFOLLOW);
    }
    let mut f = o
        .open(overlay)
        .map_err(|e| exists_or_io(e, overlay, "create overlay (use --force to overwrite)"))?;
    if exclusive {
        made.record(overlay, &f, "keep new overlay")?;
    }
    sys::ofd_lock(&f, LockKind::Exclusive).map_err(|e| e.with_path(overlay))?;
    // Dirty bitmaps left by an earlier overlay at this path (`X.add-cow.bitmaps`, see
    // `crate::dirty`) describe another disk: gone before the new header is written.
    for suffix in [".bitmaps", ".bitmaps.tmp"] {
        let mut side = overlay.as_os_str().to_os_string();
        side.push(suffix);
        match std::fs::remove_file(&side) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(
                    Error::io("remove stale dirty bitmaps", e).with_path(PathBuf::from(side))
                )
            }
        }
    }
    let len = BITMAP_OFFSET + bitmap_len(virtual_size);
    let write = |f: &mut File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.write_all(&hbytes)?;
        f.set_len(len)?;
        // Blocks for the whole bitmap now, so a later commit cannot stall on ENOSPC.
        preallocate(f, BITMAP_OFFSET, len - BITMAP_OFFSET)?;
        f.sync_all()
    };
    write(&mut f).map_err(|e| Error::io("write overlay", e).with_path(overlay))?;
    // The copy `made` keeps shares this open file, and so its lock: let go of it now.
    sys::ofd_unlock(&f);
    let dir = parent_dir(overlay);
    sync_dir(dir)?;
    synced_dirs.push(dir.to_path_buf());
    Ok(synced_dirs)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_overlay_replaced_before_its_lock_is_opened_again() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.add-cow");
        std::fs::write(&path, b"old").unwrap();
        let new = dir.path().join("vm.add-cow.new");
        std::fs::write(&new, b"new").unwrap();
        let new_ino = std::fs::metadata(&new).unwrap().ino();
        let mut renamed = false;
        let file = super::open_locked(&path, true, || {
            // A rebase renames its new file over the overlay between our open and our lock.
            if !renamed {
                std::fs::rename(&new, &path).unwrap();
                renamed = true;
            }
        })
        .unwrap();
        assert!(renamed);
        assert_eq!(
            file.metadata().unwrap().ino(),
            new_ino,
            "the lock is held on the replaced file, not on the one the path names"
        );
    }

    use super::*;

    #[test]
    fn default_image_name() {
        assert_eq!(
            default_image_path(Path::new("/a/vm.add-cow")),
            Path::new("/a/vm.raw")
        );
        assert_eq!(default_image_path(Path::new("vm")), Path::new("vm.raw"));
    }

    #[test]
    fn create_syncs_the_folder_of_every_file_it_creates_once() {
        let t = tempfile::tempdir().unwrap();
        let (vms, images) = (t.path().join("vms"), t.path().join("images"));
        std::fs::create_dir(&vms).unwrap();
        std::fs::create_dir(&images).unwrap();
        let opts = |overlay: &str, image: Option<PathBuf>| CreateOptions {
            overlay: vms.join(overlay),
            image,
            size: Some(1 << 20),
            ..CreateOptions::default()
        };
        // A raw image created in another folder: that folder first, then the overlay's.
        let synced = create_files(
            &opts("a.add-cow", Some(images.join("a.raw"))),
            Preallocation::Off,
        )
        .unwrap();
        assert_eq!(synced, [images.clone(), vms.clone()]);
        // Next to the overlay (spelled another way): one fsync covers both.
        let synced = create_files(
            &opts("b.add-cow", Some(t.path().join("images/../vms/b.raw"))),
            Preallocation::Off,
        )
        .unwrap();
        assert_eq!(synced, std::slice::from_ref(&vms));
        let synced = create_files(&opts("c.add-cow", None), Preallocation::Off).unwrap();
        assert_eq!(synced, std::slice::from_ref(&vms));
        // An existing raw image was not created: only the overlay's folder.
        let synced = create_files(
            &CreateOptions {
                size: None,
                ..opts("d.add-cow", Some(images.join("a.raw")))
            },
            Preallocation::Off,
        )
        .unwrap();
        assert_eq!(synced, [vms]);
    }
}
