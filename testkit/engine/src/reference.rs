//! An independent add-cow version 1 reader (and a minimal writer for building test overlays),
//! written from the format section of `DESIGN.md`, not from the library:
//!
//! * header: 2560 bytes; magic `ADD_COW\xff`; version u32 big-endian = 1; `backing_file` at
//!   12..1036 and `image_file` at 1036..2060, NUL-padded, each with at least one NUL;
//!   reserved 2060..2560.
//! * bitmap from byte 2560, `ceil(sectors / 8)` bytes, `sectors = image_size / 512`; bit `b`
//!   (value `1 << b`) of byte `j` covers sector `8 * j + b`.
//! * a set bit reads the raw image; a clear bit reads the base, or zeros past the base's end or
//!   with no base.

/// Bytes in the header.
pub const HEADER_SIZE: usize = 2560;
/// The magic.
pub const MAGIC: [u8; 8] = *b"ADD_COW\xff";
/// Bytes per sector (one bit each).
pub const SECTOR: usize = 512;
const BACKING_FIELD: std::ops::Range<usize> = 12..1036;
const IMAGE_FIELD: std::ops::Range<usize> = 1036..2060;

/// The decoded header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefHeader {
    /// Stored base path; empty = no base.
    pub backing_file: Vec<u8>,
    /// Stored raw-image path; never empty.
    pub image_file: Vec<u8>,
}

fn path_field(meta: &[u8], range: std::ops::Range<usize>, name: &str) -> Result<Vec<u8>, String> {
    let field = &meta[range];
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| format!("{name} field has no NUL"))?;
    Ok(field[..end].to_vec())
}

/// Parses the header of an `.add-cow` file.
pub fn parse_header(meta: &[u8]) -> Result<RefHeader, String> {
    if meta.len() < HEADER_SIZE {
        return Err(format!(
            "metadata file has {} bytes, header needs 2560",
            meta.len()
        ));
    }
    if meta[0..8] != MAGIC {
        return Err(format!("bad magic {:02x?}", &meta[0..8]));
    }
    let version = u32::from_be_bytes([meta[8], meta[9], meta[10], meta[11]]);
    if version != 1 {
        return Err(format!("version {version}, expected 1"));
    }
    let backing_file = path_field(meta, BACKING_FIELD, "backing_file")?;
    let image_file = path_field(meta, IMAGE_FIELD, "image_file")?;
    if image_file.is_empty() {
        return Err("image_file is empty".into());
    }
    Ok(RefHeader {
        backing_file,
        image_file,
    })
}

/// Bitmap bytes for `sectors` sectors.
pub fn bitmap_len(sectors: u64) -> usize {
    sectors.div_ceil(8) as usize
}

/// A decoded overlay over borrowed file contents.
#[derive(Debug)]
pub struct RefView<'a> {
    /// The header.
    pub header: RefHeader,
    bitmap: &'a [u8],
    image: &'a [u8],
    base: Option<&'a [u8]>,
    sectors: u64,
}

impl<'a> RefView<'a> {
    /// Decodes an overlay from its `.add-cow` bytes, raw-image bytes and base bytes (`None` when
    /// the header names no base; a header naming one needs `Some`).
    pub fn decode(
        meta: &'a [u8],
        image: &'a [u8],
        base: Option<&'a [u8]>,
    ) -> Result<RefView<'a>, String> {
        let header = parse_header(meta)?;
        if image.len() % SECTOR != 0 {
            return Err(format!(
                "raw image size {} is not a multiple of 512",
                image.len()
            ));
        }
        let sectors = (image.len() / SECTOR) as u64;
        let need = HEADER_SIZE + bitmap_len(sectors);
        if meta.len() < need {
            return Err(format!(
                "metadata file has {} bytes, header + bitmap need {need}",
                meta.len()
            ));
        }
        let base = match (header.backing_file.is_empty(), base) {
            (true, _) => None,
            (false, Some(b)) => Some(b),
            (false, None) => return Err("header names a base but none was given".into()),
        };
        Ok(RefView {
            header,
            bitmap: &meta[HEADER_SIZE..need],
            image,
            base,
            sectors,
        })
    }

    /// Sectors of the virtual disk.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Virtual size in bytes (the raw image's size).
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR as u64
    }

    /// Whether `sector`'s bit is set (LSB-first within each byte).
    pub fn bit(&self, sector: u64) -> bool {
        self.bitmap[(sector / 8) as usize] & (1u8 << (sector % 8)) != 0
    }

    /// The guest-visible bytes of `sector` into `out`.
    pub fn read_sector(&self, sector: u64, out: &mut [u8; SECTOR]) {
        let start = sector as usize * SECTOR;
        if self.bit(sector) {
            out.copy_from_slice(&self.image[start..start + SECTOR]);
            return;
        }
        out.fill(0);
        if let Some(base) = self.base {
            if start < base.len() {
                let end = (start + SECTOR).min(base.len());
                out[..end - start].copy_from_slice(&base[start..end]);
            }
        }
    }

    /// The guest-visible bytes of `[offset, offset + len)`.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut sector_buf = [0u8; SECTOR];
        let mut pos = offset;
        let end = offset + len as u64;
        while pos < end {
            let sector = pos / SECTOR as u64;
            self.read_sector(sector, &mut sector_buf);
            let from = (pos % SECTOR as u64) as usize;
            let to = ((end - sector * SECTOR as u64).min(SECTOR as u64)) as usize;
            out.extend_from_slice(&sector_buf[from..to]);
            pos = sector * SECTOR as u64 + to as u64;
        }
        out
    }

    /// The whole virtual disk.
    pub fn read_all(&self) -> Vec<u8> {
        self.read(0, self.size() as usize)
    }
}

/// The bytes of a fresh `.add-cow` file: header naming `backing` (may be empty) and `image`,
/// then a bitmap for `sectors` sectors whose bit `s` is `set(s)`.
pub fn build_meta(backing: &str, image: &str, sectors: u64, set: impl Fn(u64) -> bool) -> Vec<u8> {
    assert!(backing.len() < 1024 && !image.is_empty() && image.len() < 1024);
    let mut meta = vec![0u8; HEADER_SIZE + bitmap_len(sectors)];
    meta[0..8].copy_from_slice(&MAGIC);
    meta[8..12].copy_from_slice(&1u32.to_be_bytes());
    meta[12..12 + backing.len()].copy_from_slice(backing.as_bytes());
    meta[1036..1036 + image.len()].copy_from_slice(image.as_bytes());
    for s in 0..sectors {
        if set(s) {
            meta[HEADER_SIZE + (s / 8) as usize] |= 1 << (s % 8);
        }
    }
    meta
}

/// Sets the bits of `[first, first + count)` in a metadata buffer.
pub fn set_bits(meta: &mut [u8], first: u64, count: u64) {
    for s in first..first + count {
        meta[HEADER_SIZE + (s / 8) as usize] |= 1 << (s % 8);
    }
}
