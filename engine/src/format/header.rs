//! The 2560-byte add-cow header.
//!
//! Layout (all numbers big-endian): bytes 0-7 magic `ADD_COW\xff`; 8-11 version (1);
//! 12-1035 `backing_file` and 1036-2059 `image_file`, each a path NUL-padded to 1024 bytes
//! (so at most 1023 bytes of path); 2060-2559 reserved, zero. The bitmap follows at byte 2560.

use crate::error::{Error, ErrorKind, Result};
pub use crate::layout::{BITMAP_OFFSET, HEADER_SIZE};

/// `ADD_COW\xff`.
pub const MAGIC: [u8; 8] = *b"ADD_COW\xff";
/// The only version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Bytes in each of the two NUL-padded path fields.
pub const PATH_FIELD_LEN: usize = 1024;
/// One bit of the bitmap covers this many bytes.
pub const SECTOR_SIZE: u64 = 512;

/// Byte offset of the version field.
pub const VERSION_OFFSET: usize = 8;
/// Byte offset of the `backing_file` field.
pub const BACKING_FILE_OFFSET: usize = 12;
/// Byte offset of the `image_file` field.
pub const IMAGE_FILE_OFFSET: usize = BACKING_FILE_OFFSET + PATH_FIELD_LEN;
/// Byte offset of the reserved bytes (up to [`HEADER_SIZE`]).
pub const RESERVED_OFFSET: usize = IMAGE_FILE_OFFSET + PATH_FIELD_LEN;

/// The largest virtual size (raw image size) an overlay may have: 64 TiB (2^46 bytes).
///
/// Why this value: it is the largest block device the clouds offer (EBS io2 Block Express,
/// Persistent Disk) and VHDX's limit, four times ext4's largest file, and it keeps what a size
/// costs bounded: opening an overlay allocates the bitmap's directory, one pointer per 16 MiB
/// of disk (32 MiB of memory at this size), and `create` and `resize` allocate the on-disk
/// bitmap (16 GiB at this size). Without a limit a size near 2^63 asked for terabytes of
/// directory, and a failed allocation aborts the process (a daemon serving every other disk).
/// Checked by `create`, `resize` (offline and the daemon's `export-resize`) and when an
/// overlay, or an add-cow layer of a backing chain, is opened ([`check_virtual_size`]).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 46;

/// Refuses a virtual size over [`MAX_VIRTUAL_SIZE`] with [`ErrorKind::TooLarge`] (callers add
/// the path and the operation).
pub fn check_virtual_size(size: u64) -> Result<()> {
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::new(ErrorKind::TooLarge {
            size,
            max: MAX_VIRTUAL_SIZE,
        }));
    }
    Ok(())
}

/// Bytes of bitmap needed for `virtual_size` bytes: `ceil(virtual_size / 512 / 8)`.
pub fn bitmap_len(virtual_size: u64) -> u64 {
    (virtual_size / SECTOR_SIZE).div_ceil(8)
}

/// Refuses a path that does not fit a 1024-byte NUL-padded field (1024 bytes or more), or that
/// holds a NUL byte.
pub fn check_storable(field: &'static str, path: &[u8]) -> Result<()> {
    if path.len() >= PATH_FIELD_LEN {
        return Err(Error::new(ErrorKind::PathTooLong {
            field,
            len: path.len(),
        }));
    }
    if path.contains(&0) {
        return Err(Error::new(ErrorKind::InvalidArgument(format!(
            "{field} path contains a NUL byte"
        ))));
    }
    Ok(())
}

/// A parsed header. Paths are the raw bytes as stored (not resolved; see [`super::paths`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Path of the base image as stored; empty = no base.
    pub backing_file: Vec<u8>,
    /// Path of the raw image as stored; never empty in a valid header.
    pub image_file: Vec<u8>,
    /// True when bytes 2060..2560 are not all zero (a warning for `check`, not an error).
    pub reserved_nonzero: bool,
}

/// The bytes of a NUL-padded path field up to its first NUL, and whether anything after that NUL
/// is non-zero. `None` when the field holds no NUL.
pub(crate) fn split_path_field(field: &[u8]) -> Option<(&[u8], bool)> {
    let nul = field.iter().position(|&b| b == 0)?;
    let (path, rest) = field.split_at(nul);
    Some((path, rest.iter().any(|&b| b != 0)))
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of an `.add-cow` file. `bytes` shorter than the
    /// header gives [`crate::ErrorKind::ShortHeader`]; then, in this order, wrong magic
    /// ([`ErrorKind::BadMagic`]), version not 1 ([`ErrorKind::UnsupportedVersion`]), a path field
    /// without NUL ([`ErrorKind::UnterminatedPath`]) and an empty `image_file`
    /// ([`ErrorKind::EmptyImagePath`]). Error offsets are the byte offset of the bad field.
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let Some(h) = bytes.get(..HEADER_SIZE) else {
            return Err(Error::new(ErrorKind::ShortHeader {
                need: HEADER_SIZE as u64,
                have: bytes.len() as u64,
            }));
        };
        if h.get(..8) != Some(&MAGIC[..]) {
            return Err(Error::new(ErrorKind::BadMagic).with_offset(0));
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&h[VERSION_OFFSET..VERSION_OFFSET + 4]);
        let version = u32::from_be_bytes(v);
        if version != VERSION {
            return Err(Error::new(ErrorKind::UnsupportedVersion(version))
                .with_offset(VERSION_OFFSET as u64));
        }
        let field =
            |name: &'static str, off: usize| -> Result<Vec<u8>> {
                let raw = &h[off..off + PATH_FIELD_LEN];
                match split_path_field(raw) {
                    Some((path, _)) => Ok(path.to_vec()),
                    None => Err(Error::new(ErrorKind::UnterminatedPath { field: name })
                        .with_offset(off as u64)),
                }
            };
        let backing_file = field("backing_file", BACKING_FILE_OFFSET)?;
        let image_file = field("image_file", IMAGE_FILE_OFFSET)?;
        if image_file.is_empty() {
            return Err(Error::new(ErrorKind::EmptyImagePath).with_offset(IMAGE_FILE_OFFSET as u64));
        }
        let reserved_nonzero = h[RESERVED_OFFSET..HEADER_SIZE].iter().any(|&b| b != 0);
        Ok(Header {
            backing_file,
            image_file,
            reserved_nonzero,
        })
    }

    /// The exact 2560 bytes of this header (reserved bytes zero). Refuses paths of 1024 bytes or
    /// more ([`ErrorKind::PathTooLong`]), paths holding a NUL, and an empty `image_file`.
    pub fn encode(&self) -> Result<[u8; HEADER_SIZE]> {
        check_storable("backing_file", &self.backing_file)?;
        check_storable("image_file", &self.image_file)?;
        if self.image_file.is_empty() {
            return Err(Error::new(ErrorKind::EmptyImagePath));
        }
        let mut out = [0u8; HEADER_SIZE];
        out[..8].copy_from_slice(&MAGIC);
        out[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&VERSION.to_be_bytes());
        out[BACKING_FILE_OFFSET..BACKING_FILE_OFFSET + self.backing_file.len()]
            .copy_from_slice(&self.backing_file);
        out[IMAGE_FILE_OFFSET..IMAGE_FILE_OFFSET + self.image_file.len()]
            .copy_from_slice(&self.image_file);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(backing: &[u8], image: &[u8]) -> Header {
        Header {
            backing_file: backing.to_vec(),
            image_file: image.to_vec(),
            reserved_nonzero: false,
        }
    }

    #[test]
    fn field_offsets_match_the_spec() {
        assert_eq!(BACKING_FILE_OFFSET, 12);
        assert_eq!(IMAGE_FILE_OFFSET, 1036);
        assert_eq!(RESERVED_OFFSET, 2060);
        assert_eq!(HEADER_SIZE, 2560);
    }

    #[test]
    fn encode_lays_out_every_field() {
        let b = hdr(b"base.img", b"disk.raw").encode().unwrap();
        assert_eq!(&b[0..8], &[0x41, 0x44, 0x44, 0x5F, 0x43, 0x4F, 0x57, 0xFF]);
        assert_eq!(&b[8..12], &[0, 0, 0, 1]);
        assert_eq!(&b[12..20], b"base.img");
        assert!(b[20..1036].iter().all(|&x| x == 0));
        assert_eq!(&b[1036..1044], b"disk.raw");
        assert!(b[1044..2560].iter().all(|&x| x == 0));
    }

    #[test]
    fn roundtrip() {
        for h in [
            hdr(b"", b"x.raw"),
            hdr(b"/abs/base", b"../rel/img.raw"),
            hdr(&[b'b'; 1023], &[b'i'; 1023]),
        ] {
            assert_eq!(Header::parse(&h.encode().unwrap()).unwrap(), h);
        }
    }

    #[test]
    fn parse_ignores_bytes_after_header() {
        let mut v = hdr(b"b", b"i").encode().unwrap().to_vec();
        v.extend_from_slice(&[0xff; 100]);
        assert_eq!(Header::parse(&v).unwrap(), hdr(b"b", b"i"));
    }

    #[test]
    fn parse_errors() {
        let good = hdr(b"b", b"i").encode().unwrap();
        let e = Header::parse(&good[..2559]).unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::ShortHeader {
                need: 2560,
                have: 2559
            }
        );
        assert_eq!(
            Header::parse(&[]).unwrap_err().kind(),
            &ErrorKind::ShortHeader {
                need: 2560,
                have: 0
            }
        );

        let mut b = good;
        b[7] = 0;
        assert_eq!(Header::parse(&b).unwrap_err().kind(), &ErrorKind::BadMagic);

        let mut b = good;
        b[11] = 2;
        assert_eq!(
            Header::parse(&b).unwrap_err().kind(),
            &ErrorKind::UnsupportedVersion(2)
        );
        let mut b = good;
        b[8] = 1; // 0x01000001
        assert_eq!(
            Header::parse(&b).unwrap_err().kind(),
            &ErrorKind::UnsupportedVersion(0x0100_0001)
        );

        let mut b = good;
        b[12..1036].fill(b'a');
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::UnterminatedPath {
                field: "backing_file"
            }
        );
        assert_eq!(e.offset(), Some(12));

        let mut b = good;
        b[1036..2060].fill(b'a');
        assert_eq!(
            Header::parse(&b).unwrap_err().kind(),
            &ErrorKind::UnterminatedPath {
                field: "image_file"
            }
        );

        let mut b = good;
        b[1036] = 0;
        assert_eq!(
            Header::parse(&b).unwrap_err().kind(),
            &ErrorKind::EmptyImagePath
        );
    }

    #[test]
    fn reserved_nonzero_is_flagged_not_refused() {
        let mut b = hdr(b"", b"i").encode().unwrap();
        b[2559] = 1;
        assert!(Header::parse(&b).unwrap().reserved_nonzero);
        let mut b = hdr(b"", b"i").encode().unwrap();
        b[2060] = 1;
        assert!(Header::parse(&b).unwrap().reserved_nonzero);
    }

    #[test]
    fn encode_refuses_bad_paths() {
        assert_eq!(
            hdr(&[b'a'; 1024], b"i").encode().unwrap_err().kind(),
            &ErrorKind::PathTooLong {
                field: "backing_file",
                len: 1024
            }
        );
        assert_eq!(
            hdr(b"", &[b'a'; 2000]).encode().unwrap_err().kind(),
            &ErrorKind::PathTooLong {
                field: "image_file",
                len: 2000
            }
        );
        assert_eq!(
            hdr(b"", b"").encode().unwrap_err().kind(),
            &ErrorKind::EmptyImagePath
        );
        assert!(hdr(b"a\0b", b"i").encode().is_err());
    }

    #[test]
    fn bitmap_len_rounds_up() {
        assert_eq!(bitmap_len(0), 0);
        assert_eq!(bitmap_len(512), 1);
        assert_eq!(bitmap_len(8 * 512), 1);
        assert_eq!(bitmap_len(9 * 512), 2);
        assert_eq!(bitmap_len(1 << 40), (1 << 40) / 4096);
    }

    #[test]
    fn storable_limits() {
        assert!(check_storable("image_file", &[b'a'; 1023]).is_ok());
        let e = check_storable("image_file", &[b'a'; 1024]).unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::PathTooLong {
                field: "image_file",
                len: 1024
            }
        );
        assert!(check_storable("image_file", b"a\0b").is_err());
    }
}
