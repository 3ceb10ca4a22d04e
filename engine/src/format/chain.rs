//! Backing chains: the layers under an overlay.
//!
//! An overlay's base is either a raw image or itself an add-cow overlay (told apart by the
//! add-cow magic in its first eight bytes), whose own base may again be either, down to
//! [`MAX_CHAIN_DEPTH`] layers. [`BaseChain::open`] opens every layer read-only, takes a shared
//! lock on each of its files (QEMU's lock bytes for a read-only backing file, so nobody can
//! write or commit into a layer while it is a base), loads each add-cow layer's bitmap, and
//! refuses a file named twice anywhere in the chain (by device and inode: a layer's overlay, its
//! raw image, the top overlay and its raw image all count).
//!
//! Invariant: while an overlay is a base, nobody writes it (its files are share-locked; serving
//! writes only the top layer), so its bitmap never changes, and loading it once at open is
//! exact for as long as the chain is open.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::bitmap::SparseBitmap;
use crate::error::{BackingLoop, Error, ErrorKind, Result};
use crate::format::header::{bitmap_len, check_virtual_size, HEADER_SIZE, MAGIC, SECTOR_SIZE};
use crate::format::overlay::{file_len, load_bitmap, share_lock_base};
use crate::format::paths::{nbd_uri, resolve};
use crate::format::Header;
use crate::nbd::client::{self, Session};
use crate::nbd::uri::NbdUri;

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

/// Options for opening a chain.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChainOpenOptions {
    /// Open layers' data files with `O_DIRECT`.
    pub direct: bool,
    /// Take no lock (inspection tools).
    pub no_lock: bool,
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
pub(crate) fn is_add_cow(file: &File, path: &Path) -> Result<bool> {
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
        let mut seen = Vec::with_capacity(upper.len() + 2 * MAX_CHAIN_DEPTH);
        for (f, p, role) in upper {
            let id = file_id(f, p)?;
            seen.push(Seen {
                id,
                path: p.to_path_buf(),
                role,
            });
        }
        let mut layers: Vec<Layer> = Vec::new();
        let mut remote = None;
        let mut next = Some(base.to_path_buf());
        while let Some(path) = next.take() {
            if let Some(uri) = nbd_uri(&path)? {
                let session = client::connect(&uri, CONNECT_TIMEOUT)
                    .map_err(|e| e.with_op("open remote base"))?;
                remote = Some(RemoteLayer {
                    size: session.size,
                    uri,
                    session: Some(session),
                });
                break;
            }
            if layers.len() == MAX_CHAIN_DEPTH {
                return Err(Error::new(ErrorKind::ChainTooDeep {
                    limit: MAX_CHAIN_DEPTH,
                    path: path.display().to_string(),
                })
                .with_op("open backing chain"));
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
                if !opts.no_lock {
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
                });
                break;
            }
            seen.push(Seen {
                id,
                path: path.clone(),
                role: "overlay",
            });
            let layer = open_add_cow_layer(&path, probe, &seen, opts)?;
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
        Ok(BaseChain { layers, remote })
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
}

/// Opens the add-cow layer at `path` (its metadata file already open as `meta`): header, raw
/// image (checked against `seen`), sizes and bitmap, with shared locks.
fn open_add_cow_layer(
    path: &Path,
    meta: File,
    seen: &[Seen],
    opts: ChainOpenOptions,
) -> Result<Layer> {
    let meta_len = file_len(&meta, path, "stat base overlay")?;
    if meta_len < HEADER_SIZE as u64 {
        return Err(Error::new(ErrorKind::ShortHeader {
            need: HEADER_SIZE as u64,
            have: meta_len,
        })
        .with_path(path)
        .with_op("read base header"));
    }
    let mut hbuf = vec![0u8; HEADER_SIZE];
    meta.read_exact_at(&mut hbuf, 0)
        .map_err(|e| Error::io("read base header", e).with_path(path))?;
    let header = Header::parse(&hbuf).map_err(|e| e.with_path(path).with_op("read base header"))?;
    let data_path = resolve(path, "image_file", &header.image_file)
        .map_err(|e| e.with_path(path).with_op("resolve image_file"))?;
    let data = open_ro(&data_path, opts.direct, "open base's raw image")?;
    Seen::check(seen, &data, &data_path)?;
    if !opts.no_lock {
        share_lock_base(&meta).map_err(|e| e.with_path(path))?;
        share_lock_base(&data).map_err(|e| e.with_path(&data_path))?;
    }
    let size = file_len(&data, &data_path, "stat base's raw image")?;
    if size % SECTOR_SIZE != 0 {
        return Err(Error::new(ErrorKind::UnalignedImageSize { size })
            .with_path(&data_path)
            .with_op("open base's raw image"));
    }
    check_virtual_size(size)
        .map_err(|e| e.with_path(&data_path).with_op("open base's raw image"))?;
    let need = bitmap_len(size);
    let have = meta_len - HEADER_SIZE as u64;
    if have < need {
        return Err(Error::new(ErrorKind::BitmapTruncated { need, have })
            .with_path(path)
            .with_op("open base overlay"));
    }
    let bitmap = load_bitmap(&meta, path, size / SECTOR_SIZE)?;
    Ok(Layer {
        path: path.to_path_buf(),
        format: LayerFormat::AddCow,
        size,
        data,
        data_path,
        meta: Some(meta),
        header: Some(header),
        bitmap: Some(bitmap),
    })
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
    let f = open_ro(base, false, "open base")?;
    if !is_add_cow(&f, base)? {
        return file_len(&f, base, "stat base");
    }
    let mut hbuf = vec![0u8; HEADER_SIZE];
    f.read_exact_at(&mut hbuf, 0)
        .map_err(|e| Error::io("read base header", e).with_path(base))?;
    let header = Header::parse(&hbuf).map_err(|e| e.with_path(base).with_op("read base header"))?;
    let image = resolve(base, "image_file", &header.image_file)
        .map_err(|e| e.with_path(base).with_op("resolve image_file"))?;
    let img = open_ro(&image, false, "open base's raw image")?;
    file_len(&img, &image, "stat base's raw image")
}
