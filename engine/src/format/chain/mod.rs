//! Backing chains: the layers under an overlay, and the one walk down them.
//!
//! An overlay's base is either a raw image or itself an add-cow overlay (told apart by the
//! add-cow magic in its first eight bytes, [`is_add_cow`]), whose own base may again be either,
//! down to [`MAX_CHAIN_DEPTH`] layers, and may end in a remote (NBD) export. One opener reads
//! them all: [`BaseChain::open`] (the layers under an overlay that serving or a tool opened
//! itself), [`Chain::open`] (an image and everything under it, for the offline tools) and
//! [`Chain::files_of`] (only the files' names and roles, for the daemon's checks). It opens
//! every layer read-only, takes a shared lock on each of its files (QEMU's lock bytes for a
//! read-only backing file, so nobody can write or commit into a layer while it is a base),
//! loads each add-cow layer's bitmap, and refuses a file named twice anywhere in the chain (by
//! device and inode: a layer's overlay, its raw image, the top overlay and its raw image all
//! count).
//!
//! [`runs::Runs`] is the one walk down a chain: every reader (serving, `map`, allocation
//! depths, the tools) asks it which layer supplies each run of a range.
//!
//! Invariant: while an overlay is a base, nobody writes it (its files are share-locked; serving
//! writes only the top layer), so its bitmap never changes, and loading it once at open is
//! exact for as long as the chain is open.

pub mod runs;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::bitmap::SparseBitmap;
use crate::error::{BackingLoop, Error, ErrorKind, Result};
use crate::format::header::{bitmap_len, check_virtual_size, HEADER_SIZE, MAGIC, SECTOR_SIZE};
use crate::format::open::{file_len, load_bitmap, read_header, share_lock_base, soft_findings};
use crate::format::paths::{nbd_uri, resolve};
use crate::format::Header;
use crate::nbd::client::{self, Session};
use crate::nbd::uri::NbdUri;

pub use runs::{LayerShape, Opaque, Over, Run, RunSrc, Runs, Stack};

/// How long connecting to a remote base's image server may take when a chain is opened.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most layers below the top overlay. Every read of a sector clear in every layer walks each
/// layer's bitmap and every layer holds two open files and its bitmap in memory, so the depth
/// is bounded; 16 is far beyond the snapshot chains hosts keep in practice (a handful, flattened
/// by `stream`/`commit`), and low enough that a runaway chain (a snapshot script in a loop) is
/// stopped with a clear error instead of exhausting descriptors.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// What a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerFormat {
    /// A raw image: every byte is the layer's own; the chain ends here.
    Raw,
    /// An add-cow overlay: set bits are read from its raw image, clear ones from the next layer.
    AddCow,
    /// A raw export of an NBD image server (the chain's bottom; named by a URI).
    Nbd,
}

/// One opened layer of a backing chain.
#[derive(Debug)]
pub struct Layer {
    /// The file that names the layer (the `.add-cow` file, or the raw image), as resolved.
    pub path: PathBuf,
    /// Raw or add-cow.
    pub format: LayerFormat,
    /// Bytes the layer presents (a raw image's length, an add-cow layer's virtual size).
    pub size: u64,
    /// The file holding the layer's bytes: the raw image itself, or the add-cow layer's raw
    /// image. Read-only.
    pub data: File,
    /// The path of `data`.
    pub data_path: PathBuf,
    /// The add-cow layer's metadata file (held open for its lock), read-only.
    pub meta: Option<File>,
    /// The add-cow layer's parsed header.
    pub header: Option<Header>,
    /// The add-cow layer's bitmap, loaded once at open (immutable while it is a base).
    pub bitmap: Option<SparseBitmap>,
    /// Non-fatal findings of an add-cow layer (see `Overlay::warnings`), when the chain was
    /// opened with [`ChainOpenOptions::findings`]; empty otherwise.
    pub warnings: Vec<String>,
}

impl Layer {
    /// Whether sector `sector` of this layer is supplied by its own data file (always for a
    /// raw layer inside its size).
    pub fn holds(&self, sector: u64) -> bool {
        match &self.bitmap {
            None => sector * SECTOR_SIZE < self.size,
            Some(b) => b.get(sector),
        }
    }

    fn shape(&self) -> LayerShape<'_> {
        LayerShape {
            size: self.size,
            bitmap: self.bitmap.as_ref(),
        }
    }

    /// The layer's files at `depth`: the file naming it, and an add-cow layer's raw image.
    fn files(&self, depth: usize, out: &mut Vec<ChainFile>) {
        out.push(ChainFile {
            depth,
            role: FileRole::Named,
            path: self.path.clone(),
            format: Some(self.format),
        });
        if self.format == LayerFormat::AddCow {
            out.push(ChainFile {
                depth,
                role: FileRole::Data,
                path: self.data_path.clone(),
                format: Some(self.format),
            });
        }
    }
}

/// What a file is to its chain (see [`ChainFile`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRole {
    /// The file that names the layer: an add-cow layer's `.add-cow` file, or a raw layer's
    /// image itself.
    Named,
    /// An add-cow layer's raw image.
    Data,
    /// A remote layer: `path` is its URI as stored.
    Remote(NbdUri),
}

/// One file of a chain, with its role and depth (0: the image the chain was opened from, or
/// an overlay's direct base for a [`BaseChain`] opened under that overlay, which is depth 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFile {
    /// The layer's depth.
    pub depth: usize,
    /// What the file is.
    pub role: FileRole,
    /// Its path, resolved the way the engine resolves it (not canonicalised).
    pub path: PathBuf,
    /// The layer's format; `None` when the file is shown to a [`ChainOpenOptions::gate`]
    /// before it is opened (the format is not known yet).
    pub format: Option<LayerFormat>,
}

/// One file an open disk holds, as [`crate::Disk::opened_files`] lists it: what the engine
/// actually opened (the descriptor), not a path to open again. A caller that must know which
/// files a disk reads and writes (the daemon's allowed folders) checks these: nothing swapped at
/// a path after the open can change which file a descriptor refers to.
#[derive(Debug)]
pub struct OpenedFile<'a> {
    /// Its depth and role, and the path it was opened by (the layer's format is known).
    pub file: ChainFile,
    /// The open file; `None` for a remote layer (an image server, no file).
    pub fd: Option<std::os::fd::BorrowedFd<'a>>,
}

/// A base served by an NBD image server: the bottom of a chain whose last backing path is an
/// NBD URI. Opening the chain connects once (the export's size is needed to read the layers
/// above); the engine takes that connection over (`io/remote.rs`).
#[derive(Debug)]
pub struct RemoteLayer {
    /// The URI, as stored.
    pub uri: NbdUri,
    /// The export's size.
    pub size: u64,
    /// The connection made at open (taken by the engine).
    pub session: Option<Session>,
}

/// The layers under an overlay, `layers[0]` its direct base, each one the base of the one before.
#[derive(Debug)]
pub struct BaseChain {
    /// The file layers; the last one is raw, an add-cow overlay with no base, or an add-cow
    /// overlay whose base is `remote`. Empty only when the overlay's own base is remote.
    pub layers: Vec<Layer>,
    /// The remote base under the last file layer (or under the overlay), if the chain ends in
    /// an NBD URI.
    pub remote: Option<RemoteLayer>,
}

/// A check every file of a chain passes before it is opened (and a remote layer before it is
/// connected to); an error stops the open with that error.
pub type Gate<'g> = &'g dyn Fn(&ChainFile) -> Result<()>;

/// Options for opening a chain.
#[derive(Clone, Copy, Default)]
pub struct ChainOpenOptions<'g> {
    /// Open layers' data files with `O_DIRECT`.
    pub direct: bool,
    /// Take no lock (inspection tools).
    pub no_lock: bool,
    /// Refuse a remote (NBD) layer without connecting (the offline tools do not read them).
    pub offline: bool,
    /// Collect each add-cow layer's non-fatal findings into [`Layer::warnings`].
    pub findings: bool,
    /// See [`Gate`].
    pub gate: Option<Gate<'g>>,
}

impl std::fmt::Debug for ChainOpenOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainOpenOptions")
            .field("direct", &self.direct)
            .field("no_lock", &self.no_lock)
            .field("offline", &self.offline)
            .field("findings", &self.findings)
            .field("gate", &self.gate.is_some())
            .finish()
    }
}

/// How far an open goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Every layer, refusing more than this many ([`ErrorKind::ChainTooDeep`]).
    Limit(usize),
    /// Only the files' names: no bitmaps, no locks, no connection; stop (without error) once
    /// this many layers are open, after naming the next one.
    Names(usize),
}

/// A file already in the chain: its identity, path and role (for the loop error).
struct Seen {
    id: (u64, u64),
    path: PathBuf,
    role: &'static str,
}

fn file_id(file: &File, path: &Path) -> Result<(u64, u64)> {
    file.metadata()
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| Error::io("stat", e).with_path(path))
}

fn open_ro(path: &Path, direct: bool, op: &'static str) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| Error::io(op, e).with_path(path))
}

/// Whether `file` starts with the add-cow magic (a file shorter than the magic is raw).
pub fn is_add_cow(file: &File, path: &Path) -> Result<bool> {
    let mut m = [0u8; 8];
    let mut got = 0;
    while got < m.len() {
        match file.read_at(&mut m[got..], got as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read magic", e).with_path(path)),
        }
    }
    Ok(m == MAGIC)
}

impl Seen {
    fn check(seen: &[Seen], file: &File, path: &Path) -> Result<(u64, u64)> {
        let id = file_id(file, path)?;
        if let Some(s) = seen.iter().find(|s| s.id == id) {
            return Err(Error::new(ErrorKind::BackingLoop(Box::new(BackingLoop {
                first: s.path.display().to_string(),
                again: path.display().to_string(),
                role: s.role,
            })))
            .with_op("open backing chain"));
        }
        Ok(id)
    }
}

impl BaseChain {
    /// Opens the chain whose first layer is `base` (resolved), under an overlay whose own files
    /// are `upper` (`(file, path, role)`: they must not reappear below). Every failure names the
    /// file: a missing or unreadable layer, a corrupt add-cow layer, a loop
    /// ([`ErrorKind::BackingLoop`]), more than [`MAX_CHAIN_DEPTH`] layers
    /// ([`ErrorKind::ChainTooDeep`]), a layer locked for writing ([`ErrorKind::Locked`]).
    pub fn open(
        base: &Path,
        upper: &[(&File, &Path, &'static str)],
        opts: ChainOpenOptions,
    ) -> Result<BaseChain> {
        let mut seen = Vec::with_capacity(upper.len() + 2 * MAX_CHAIN_DEPTH + 2);
        for (f, p, role) in upper {
            let id = file_id(f, p)?;
            seen.push(Seen {
                id,
                path: p.to_path_buf(),
                role,
            });
        }
        open_layers(base, 0, seen, opts, Depth::Limit(MAX_CHAIN_DEPTH)).map(|(c, _)| c)
    }

    /// The direct base's size (what the overlay above reads before zeros).
    pub fn size(&self) -> u64 {
        match (self.layers.first(), &self.remote) {
            (Some(l), _) => l.size,
            (None, Some(r)) => r.size,
            (None, None) => 0,
        }
    }

    /// The direct base's path (an NBD URI as stored, for a remote base).
    pub fn path(&self) -> Option<&Path> {
        match (self.layers.first(), &self.remote) {
            (Some(l), _) => Some(l.path.as_path()),
            (None, Some(r)) => Some(Path::new(r.uri.text.as_str())),
            (None, None) => None,
        }
    }

    /// Every file of the chain with its role, layer by layer; the first layer is at depth
    /// `first`.
    fn files_from(&self, first: usize, out: &mut Vec<ChainFile>) {
        for (i, l) in self.layers.iter().enumerate() {
            l.files(first + i, out);
        }
        if let Some(r) = &self.remote {
            out.push(remote_file(first + self.layers.len(), &r.uri));
        }
    }

    /// Every file of the chain with its role (the direct base at depth 0).
    pub fn files(&self) -> Vec<ChainFile> {
        let mut out = Vec::new();
        self.files_from(0, &mut out);
        out
    }
}

/// The layers of a [`BaseChain`] as a [`Stack`]: the file layers, then the remote bottom.
impl Stack for BaseChain {
    fn count(&self) -> usize {
        self.layers.len() + usize::from(self.remote.is_some())
    }

    fn shape(&self, depth: usize) -> LayerShape<'_> {
        match self.layers.get(depth) {
            Some(l) => l.shape(),
            None => LayerShape {
                size: self.remote.as_ref().map_or(0, |r| r.size),
                bitmap: None,
            },
        }
    }
}

fn remote_file(depth: usize, uri: &NbdUri) -> ChainFile {
    ChainFile {
        depth,
        role: FileRole::Remote(uri.clone()),
        path: PathBuf::from(&uri.text),
        format: Some(LayerFormat::Nbd),
    }
}

/// Shows `path` (about to be opened as `role` of layer `depth`) to the gate, if any.
fn gate(opts: &ChainOpenOptions, depth: usize, role: FileRole, path: &Path) -> Result<()> {
    match opts.gate {
        Some(g) => g(&ChainFile {
            depth,
            role,
            path: path.to_path_buf(),
            format: None,
        }),
        None => Ok(()),
    }
}

/// The one opener: the layers from `first` (at depth `first_depth`) down, checked against the
/// files `seen` above them; with [`Depth::Names`], also the path of the layer named but not
/// opened where the walk stopped.
fn open_layers(
    first: &Path,
    first_depth: usize,
    mut seen: Vec<Seen>,
    opts: ChainOpenOptions,
    depth: Depth,
) -> Result<(BaseChain, Option<PathBuf>)> {
    let names_only = matches!(depth, Depth::Names(_));
    let mut layers: Vec<Layer> = Vec::new();
    let mut remote = None;
    let mut unopened = None;
    let mut next = Some(first.to_path_buf());
    while let Some(path) = next.take() {
        let at = first_depth + layers.len();
        if let Some(uri) = nbd_uri(&path)? {
            gate(&opts, at, FileRole::Remote(uri.clone()), &path)?;
            if opts.offline {
                return Err(Error::new(ErrorKind::InvalidArgument(format!(
                    "{}: a base on an image server (NBD) is not read by the offline tools; \
                     stream the overlay first (then `rebase -u -b \"\"`), or use `rebase -u`",
                    path.display()
                ))));
            }
            if names_only {
                remote = Some(RemoteLayer {
                    uri,
                    size: 0,
                    session: None,
                });
                break;
            }
            let session = client::connect(&uri, CONNECT_TIMEOUT)
                .map_err(|e| e.with_op("open remote base"))?;
            remote = Some(RemoteLayer {
                size: session.size,
                uri,
                session: Some(session),
            });
            break;
        }
        gate(&opts, at, FileRole::Named, &path)?;
        match depth {
            Depth::Names(n) if layers.len() == n => {
                unopened = Some(path);
                break;
            }
            Depth::Limit(n) if layers.len() == n => {
                return Err(Error::new(ErrorKind::ChainTooDeep {
                    limit: MAX_CHAIN_DEPTH,
                    path: path.display().to_string(),
                })
                .with_op("open backing chain"));
            }
            _ => {}
        }
        let probe = open_ro(&path, false, "open base")?;
        let add_cow = is_add_cow(&probe, &path)?;
        let id = Seen::check(&seen, &probe, &path)?;
        if !add_cow {
            let data = if opts.direct {
                let d = open_ro(&path, true, "open base")?;
                if file_id(&d, &path)? != id {
                    return Err(Error::new(ErrorKind::InvalidArgument(
                        "the base was replaced while it was being opened".into(),
                    ))
                    .with_path(&path));
                }
                d
            } else {
                probe
            };
            if !opts.no_lock && !names_only {
                share_lock_base(&data).map_err(|e| e.with_path(&path))?;
            }
            let size = file_len(&data, &path, "stat base")?;
            layers.push(Layer {
                data_path: path.clone(),
                path,
                format: LayerFormat::Raw,
                size,
                data,
                meta: None,
                header: None,
                bitmap: None,
                warnings: Vec::new(),
            });
            break;
        }
        seen.push(Seen {
            id,
            path: path.clone(),
            role: "overlay",
        });
        let layer = open_add_cow_layer(&path, probe, &seen, &opts, at, names_only)?;
        seen.push(Seen {
            id: file_id(&layer.data, &layer.data_path)?,
            path: layer.data_path.clone(),
            role: "raw image",
        });
        if let Some(h) = &layer.header {
            if !h.backing_file.is_empty() {
                next = Some(
                    resolve(&path, "backing_file", &h.backing_file)
                        .map_err(|e| e.with_path(&path).with_op("resolve backing_file"))?,
                );
            }
        }
        layers.push(layer);
    }
    Ok((BaseChain { layers, remote }, unopened))
}

/// Opens the add-cow layer at `path` (its metadata file already open as `meta`): header, raw
/// image (shown to the gate as layer `depth`'s, checked against `seen`), sizes and bitmap,
/// with shared locks. `names_only`: no bitmap and no lock (see [`Depth::Names`]).
fn open_add_cow_layer(
    path: &Path,
    meta: File,
    seen: &[Seen],
    opts: &ChainOpenOptions,
    depth: usize,
    names_only: bool,
) -> Result<Layer> {
    let (header, meta_len) = read_header(&meta, path, "stat base overlay", "read base header")?;
    let data_path = resolve(path, "image_file", &header.image_file)
        .map_err(|e| e.with_path(path).with_op("resolve image_file"))?;
    gate(opts, depth, FileRole::Data, &data_path)?;
    let data = open_ro(&data_path, opts.direct, "open base's raw image")?;
    Seen::check(seen, &data, &data_path)?;
    if !opts.no_lock && !names_only {
        share_lock_base(&meta).map_err(|e| e.with_path(path))?;
        share_lock_base(&data).map_err(|e| e.with_path(&data_path))?;
    }
    let size = file_len(&data, &data_path, "stat base's raw image")?;
    let mut layer = Layer {
        path: path.to_path_buf(),
        format: LayerFormat::AddCow,
        size,
        data,
        data_path,
        meta: None,
        header: Some(header),
        bitmap: None,
        warnings: Vec::new(),
    };
    if names_only {
        layer.meta = Some(meta);
        return Ok(layer);
    }
    let data_path = &layer.data_path;
    if size % SECTOR_SIZE != 0 {
        return Err(Error::new(ErrorKind::UnalignedImageSize { size })
            .with_path(data_path)
            .with_op("open base's raw image"));
    }
    check_virtual_size(size)
        .map_err(|e| e.with_path(data_path).with_op("open base's raw image"))?;
    let need = bitmap_len(size);
    let have = meta_len - HEADER_SIZE as u64;
    if have < need {
        return Err(Error::new(ErrorKind::BitmapTruncated { need, have })
            .with_path(path)
            .with_op("open base overlay"));
    }
    layer.bitmap = Some(load_bitmap(&meta, path, size / SECTOR_SIZE)?);
    if opts.findings {
        if let Some(h) = &layer.header {
            layer.warnings = soft_findings(h, &meta, path, meta_len, size)?;
        }
    }
    layer.meta = Some(meta);
    Ok(layer)
}

/// An image and everything under it: the top layer (an add-cow overlay or a raw file) and the
/// [`BaseChain`] below it, every file read-only. What the offline tools read a guest's disk
/// through (without an engine); each layer's bitmap is loaded once.
#[derive(Debug)]
pub struct Chain {
    /// The image the chain was opened from.
    pub top: Layer,
    /// The layers under it (empty for a raw top or an overlay without a base).
    pub below: BaseChain,
}

impl Chain {
    /// Opens the image at `path` and its whole chain read-only: up to [`MAX_CHAIN_DEPTH`]
    /// layers under the top (as serving allows under an overlay), with the same checks and
    /// errors as [`BaseChain::open`]. Unless `opts.no_lock`, every file is share-locked the
    /// way serving locks a base, so nobody can write any of them meanwhile.
    pub fn open(path: &Path, opts: ChainOpenOptions) -> Result<Chain> {
        let (mut all, _) =
            open_layers(path, 0, Vec::new(), opts, Depth::Limit(MAX_CHAIN_DEPTH + 1))?;
        if all.layers.is_empty() {
            // The path itself is remote: `open_layers` only gets here without `offline`.
            return Err(Error::new(ErrorKind::InvalidArgument(format!(
                "{}: an image on an image server (NBD) is no chain of files",
                path.display()
            ))));
        }
        let top = all.layers.remove(0);
        Ok(Chain { top, below: all })
    }

    /// The files of the image at `path` and of its chain, with their roles, top first, without
    /// loading bitmaps, taking locks or connecting to a remote layer: header by header, each
    /// file shown to `gate` (if any) before it is opened. `layers`: how many layers under the
    /// top to open (the next one is still named), at most [`MAX_CHAIN_DEPTH`]. Fails as
    /// [`Chain::open`] fails (a loop, an unreadable or corrupt layer), or with the gate's error.
    pub fn files_of(path: &Path, layers: usize, gate: Option<Gate>) -> Result<Vec<ChainFile>> {
        let opts = ChainOpenOptions {
            no_lock: true,
            gate,
            ..ChainOpenOptions::default()
        };
        let (all, unopened) = open_layers(
            path,
            0,
            Vec::new(),
            opts,
            Depth::Names(layers.min(MAX_CHAIN_DEPTH) + 1),
        )?;
        let mut out = Vec::new();
        all.files_from(0, &mut out);
        if let Some(p) = unopened {
            out.push(ChainFile {
                depth: all.layers.len(),
                role: FileRole::Named,
                path: p,
                format: None,
            });
        }
        Ok(out)
    }

    /// Every file of the chain with its role, top (depth 0) first.
    pub fn files(&self) -> Vec<ChainFile> {
        let mut out = Vec::new();
        self.top.files(0, &mut out);
        self.below.files_from(1, &mut out);
        out
    }

    /// The layers that are files, top first.
    pub fn layers(&self) -> impl Iterator<Item = &Layer> {
        std::iter::once(&self.top).chain(self.below.layers.iter())
    }

    /// The guest-visible size: the top's.
    pub fn size(&self) -> u64 {
        self.top.size
    }

    /// The runs of `[offset, offset + len)`: depth 0 is the top.
    pub fn runs(&self, offset: u64, len: u64) -> Runs<'_, Chain> {
        Runs::new(self, offset, len)
    }

    /// Fills `buf` with the guest-visible bytes at `offset`; bytes past the end read as zero.
    /// Offline only: a remote layer is never opened by [`Chain::open`] with `offline`, and a
    /// chain with one reads its runs as an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        for run in self.runs(offset, buf.len() as u64) {
            let piece = &mut buf[(run.offset - offset) as usize..][..run.len as usize];
            match run.src {
                RunSrc::Zero => piece.fill(0),
                RunSrc::Layer(d) => {
                    let Some(l) = self.layers().nth(d) else {
                        return Err(Error::new(ErrorKind::InvalidArgument(
                            "a remote layer is not read by the offline tools".into(),
                        ))
                        .with_offset(run.offset));
                    };
                    l.data.read_exact_at(piece, run.offset).map_err(|e| {
                        Error::io(
                            if d == 0 {
                                "read image"
                            } else {
                                "read raw image"
                            },
                            e,
                        )
                        .with_path(&l.data_path)
                        .with_offset(run.offset)
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// The top, then the layers of [`Chain::below`].
impl Stack for Chain {
    fn count(&self) -> usize {
        1 + self.below.count()
    }

    fn shape(&self, depth: usize) -> LayerShape<'_> {
        match depth {
            0 => self.top.shape(),
            d => self.below.shape(d - 1),
        }
    }
}

/// The size a new overlay over `base` takes by default: a raw base's length, an add-cow base's
/// virtual size (its raw image's length).
pub fn base_virtual_size(base: &Path) -> Result<u64> {
    if let Some(uri) = nbd_uri(base)? {
        let mut s =
            client::connect(&uri, CONNECT_TIMEOUT).map_err(|e| e.with_op("open remote base"))?;
        client::disconnect(&mut s.stream);
        return Ok(s.size);
    }
    let opts = ChainOpenOptions {
        no_lock: true,
        ..ChainOpenOptions::default()
    };
    let (first, _) = open_layers(base, 0, Vec::new(), opts, Depth::Names(1))?;
    Ok(first.size())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::BITMAP_OFFSET;

    /// One add-cow layer of the model: its size in sectors and which sectors are set.
    struct Model {
        sectors: u64,
        set: Vec<bool>,
    }

    /// The byte layer `depth` holds at `at` (distinct per layer and per position).
    fn byte(depth: usize, at: u64) -> u8 {
        (at / 7 % 251) as u8 ^ (0x40 * (depth as u8 + 1))
    }

    /// Makes `name.add-cow` over `base` with the model's bits set and its raw image filled,
    /// written byte for byte (the header, then the bitmap; paths stored relative, as `create`
    /// stores them beside the overlay).
    fn layer(dir: &Path, name: &str, base: &Path, depth: usize, m: &Model) -> PathBuf {
        let overlay = dir.join(format!("{name}.add-cow"));
        let header = Header {
            backing_file: base.file_name().unwrap().as_encoded_bytes().to_vec(),
            image_file: format!("{name}.raw").into_bytes(),
            reserved_nonzero: false,
        };
        let mut meta = header.encode().unwrap().to_vec();
        meta.resize(BITMAP_OFFSET as usize + m.sectors.div_ceil(8) as usize, 0);
        for (s, set) in m.set.iter().enumerate() {
            if *set {
                meta[BITMAP_OFFSET as usize + s / 8] |= 1 << (s % 8);
            }
        }
        std::fs::write(&overlay, meta).unwrap();
        let data: Vec<u8> = (0..m.sectors * SECTOR_SIZE)
            .map(|a| byte(depth, a))
            .collect();
        std::fs::write(dir.join(format!("{name}.raw")), data).unwrap();
        overlay
    }

    /// Who supplies byte `at`, sector by sector from the top: the model, not the chain.
    fn brute(layers: &[Model], base_len: u64, at: u64) -> RunSrc {
        for (d, m) in layers.iter().enumerate() {
            if at >= m.sectors * SECTOR_SIZE {
                return RunSrc::Zero;
            }
            if m.set[(at / SECTOR_SIZE) as usize] {
                return RunSrc::Layer(d);
            }
        }
        if at < base_len {
            RunSrc::Layer(layers.len())
        } else {
            RunSrc::Zero
        }
    }

    /// Builds the chain `top -> mid -> base.raw` (`base_len` bytes) on real files, opens it
    /// with [`Chain::open`] and checks its runs and its bytes against the per-sector model.
    fn check_chain(layers: &[Model; 2], base_len: u64, ranges: &[(u64, u64)]) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let data: Vec<u8> = (0..base_len).map(|a| byte(2, a)).collect();
        std::fs::write(&base, data).unwrap();
        let mid = layer(dir.path(), "mid", &base, 1, &layers[1]);
        let top = layer(dir.path(), "top", &mid, 0, &layers[0]);
        let chain = Chain::open(
            &top,
            ChainOpenOptions {
                no_lock: true,
                ..ChainOpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(chain.count(), 3);
        for &(offset, len) in ranges {
            let runs = super::runs::tests::merged(chain.runs(offset, len));
            let mut at = offset;
            for r in &runs {
                assert_eq!(r.offset, at, "{runs:?}");
                for b in r.offset..r.offset + r.len {
                    assert_eq!(brute(layers, base_len, b), r.src, "byte {b} of {runs:?}");
                }
                at += r.len;
            }
            assert_eq!(at, offset + len);
            let mut got = vec![0xeeu8; len as usize];
            chain.read_at(&mut got, offset).unwrap();
            for (i, g) in got.iter().enumerate() {
                let b = offset + i as u64;
                let want = match brute(layers, base_len, b) {
                    RunSrc::Layer(d) => byte(d, b),
                    RunSrc::Zero => 0,
                };
                assert_eq!(*g, want, "byte {b}");
            }
        }
    }

    fn model(sectors: u64, set: &[(u64, u64)]) -> Model {
        let mut v = vec![false; sectors as usize];
        for &(s, n) in set {
            for x in s..(s + n).min(sectors) {
                v[x as usize] = true;
            }
        }
        Model { sectors, set: v }
    }

    #[test]
    fn three_layers_on_files_read_as_the_per_sector_model() {
        // Top 64 sectors, mid 48 with holes (clear runs) falling through, a base that ends
        // inside sector 20.
        let layers = [
            model(64, &[(0, 2), (10, 5), (40, 1), (63, 1)]),
            model(48, &[(1, 3), (12, 20)]),
        ];
        check_chain(
            &layers,
            20 * 512 + 100,
            &[
                (0, 64 * 512),
                (100, 5000),
                (20 * 512, 30 * 512),
                (20 * 512 + 99, 2),
                (0, 1),
                (60 * 512, 8 * 512),
            ],
        );
    }

    #[test]
    fn files_name_every_layer_with_its_role() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![1u8; 4096]).unwrap();
        let mid = layer(dir.path(), "mid", &base, 1, &model(8, &[]));
        let top = layer(dir.path(), "top", &mid, 0, &model(8, &[]));
        let chain = Chain::open(&top, ChainOpenOptions::default()).unwrap();
        let roles: Vec<_> = chain
            .files()
            .into_iter()
            .map(|f| (f.depth, f.role, f.path, f.format))
            .collect();
        let d = dir.path();
        let add_cow = Some(LayerFormat::AddCow);
        assert_eq!(
            roles,
            vec![
                (0, FileRole::Named, top.clone(), add_cow),
                (0, FileRole::Data, d.join("top.raw"), add_cow),
                (1, FileRole::Named, mid.clone(), add_cow),
                (1, FileRole::Data, d.join("mid.raw"), add_cow),
                (2, FileRole::Named, base.clone(), Some(LayerFormat::Raw)),
            ]
        );
        drop(chain);
        // Names only, each shown to the gate first; stopping after the top names its base.
        let shown = std::cell::RefCell::new(Vec::new());
        let gate = |f: &ChainFile| {
            shown.borrow_mut().push((f.depth, f.role.clone()));
            Ok(())
        };
        let files = Chain::files_of(&top, 0, Some(&gate)).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        assert_eq!((files[2].depth, &files[2].path), (1, &mid));
        assert_eq!(
            shown.into_inner(),
            vec![
                (0, FileRole::Named),
                (0, FileRole::Data),
                (1, FileRole::Named)
            ]
        );
        // A gate's error stops the walk before the file is opened.
        let refuse = |f: &ChainFile| {
            if f.depth == 2 {
                Err(Error::new(ErrorKind::InvalidArgument("no".into())))
            } else {
                Ok(())
            }
        };
        let e = Chain::files_of(&top, MAX_CHAIN_DEPTH, Some(&refuse)).unwrap_err();
        assert!(e.to_string().contains("no"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn runs_on_files_match_the_per_sector_model(
            top in proptest::collection::vec(proptest::bool::ANY, 1..40),
            mid in proptest::collection::vec(proptest::bool::ANY, 1..40),
            base_len in 0u64..(45 * 512),
            offset in 0u64..(40 * 512),
            len in 1u64..(40 * 512),
        ) {
            let m = |set: Vec<bool>| Model { sectors: set.len() as u64, set };
            check_chain(&[m(top), m(mid)], base_len, &[(offset, len), (0, 40 * 512)]);
        }
    }
}
