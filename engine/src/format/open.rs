//! The steps of reading an `.add-cow` file that opening an overlay ([`super::overlay`]) and
//! opening the layers of a backing chain ([`super::chain`]) share: the file's length, its
//! header, its bitmap, the findings that do not stop it from being served, and QEMU's share lock
//! on a base. Below both openers, so neither depends on the other for them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::bitmap::{SparseBitmap, CHUNK_BYTES};
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{bitmap_len, Header, BITMAP_OFFSET, HEADER_SIZE, SECTOR_SIZE};
use crate::sys::{self, LockKind, LockRange};

/// Bytes read at a time while loading the bitmap (a multiple of the bitmap's chunk size, so
/// all-clear and all-set chunks are recognised and cost no memory).
const LOAD_BUF: usize = 256 * CHUNK_BYTES as usize;

/// QEMU's lock bytes (`block/file-posix.c`): a process holding permission `i` on an image
/// share-locks byte `100 + i`; one that does not let others have permission `i` share-locks byte
/// `200 + i`. Permission bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize.
const QEMU_PERM_BYTE: libc::off_t = 100;
const QEMU_UNSHARED_BYTE: libc::off_t = 200;
const QEMU_CONSISTENT_READ: libc::off_t = 0;
const QEMU_WRITE: libc::off_t = 1;
const QEMU_RESIZE: libc::off_t = 3;

/// Share-locks the base the way QEMU locks a read-only backing file, so both can read one base
/// at once: we hold "consistent read" (byte 100) and do not share "write" or "resize" (bytes
/// 201, 203). Anyone who writes or resizes the base (a lock on byte 101 or 103, or a whole-file
/// write lock) makes this fail with [`ErrorKind::Locked`]; while we hold it, they cannot take it
/// (QEMU checks byte 201; a whole-file write lock conflicts with all three).
pub(crate) fn share_lock_base(file: &File) -> Result<()> {
    let locked = || {
        Error::new(ErrorKind::Locked).with_op("lock base for reading (someone may be writing it)")
    };
    for byte in [
        QEMU_PERM_BYTE + QEMU_CONSISTENT_READ,
        QEMU_UNSHARED_BYTE + QEMU_WRITE,
        QEMU_UNSHARED_BYTE + QEMU_RESIZE,
    ] {
        match sys::ofd_try_lock(file, LockKind::Shared, LockRange::byte(byte)) {
            Ok(true) => {}
            Ok(false) => {
                sys::ofd_unlock(file);
                return Err(locked());
            }
            Err(e) => {
                sys::ofd_unlock(file);
                return Err(Error::io("lock base", e));
            }
        }
    }
    // Nobody may hold what we do not share (write, resize) nor refuse what we need (read): a
    // write lock's test finds a lock of either kind.
    for byte in [
        QEMU_PERM_BYTE + QEMU_WRITE,
        QEMU_PERM_BYTE + QEMU_RESIZE,
        QEMU_UNSHARED_BYTE + QEMU_CONSISTENT_READ,
    ] {
        match sys::ofd_conflicts(file, LockKind::Exclusive, LockRange::byte(byte)) {
            Ok(false) => {}
            Ok(true) => {
                sys::ofd_unlock(file);
                return Err(locked());
            }
            Err(e) => {
                sys::ofd_unlock(file);
                return Err(Error::io("test base lock", e));
            }
        }
    }
    Ok(())
}

/// Reads and parses the header of the `.add-cow` file `meta` (at `path`), returning it with the
/// file's length: a file shorter than a header is [`ErrorKind::ShortHeader`]; errors carry the
/// path and `stat_op` or `read_op`.
pub(crate) fn read_header(
    meta: &File,
    path: &Path,
    stat_op: &'static str,
    read_op: &'static str,
) -> Result<(Header, u64)> {
    let meta_len = file_len(meta, path, stat_op)?;
    if meta_len < HEADER_SIZE as u64 {
        return Err(Error::new(ErrorKind::ShortHeader {
            need: HEADER_SIZE as u64,
            have: meta_len,
        })
        .with_path(path)
        .with_op(read_op));
    }
    let mut hbuf = vec![0u8; HEADER_SIZE];
    read_exact_at(meta, &mut hbuf, 0, path, read_op)?;
    let header = Header::parse(&hbuf).map_err(|e| e.with_path(path).with_op(read_op))?;
    Ok((header, meta_len))
}

/// Reads exactly `buf.len()` bytes at `offset`, with the path/offset/op in the error.
fn read_exact_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    path: &Path,
    op: &'static str,
) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|e| Error::io(op, e).with_path(path).with_offset(offset))
}

/// The size of a regular file or a block device (whose `st_size` is 0, so it is asked with
/// `lseek(SEEK_END)`; callers use positioned I/O, so the file offset does not matter).
pub(crate) fn file_len(file: &File, path: &Path, op: &'static str) -> Result<u64> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let m = file
        .metadata()
        .map_err(|e| Error::io(op, e).with_path(path))?;
    if m.file_type().is_block_device() {
        let mut f: &File = file;
        return f
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(op, e).with_path(path));
    }
    Ok(m.len())
}

/// Streams the bitmap of `sectors` bits from `meta` (starting at [`BITMAP_OFFSET`]) through a
/// small buffer, skipping holes with `SEEK_DATA`. Never holds more than one buffer of file bytes.
pub(crate) fn load_bitmap(meta: &File, meta_path: &Path, sectors: u64) -> Result<SparseBitmap> {
    let mut bitmap = SparseBitmap::new(sectors);
    let total = sectors.div_ceil(8);
    let mut buf = vec![0u8; LOAD_BUF.min(total as usize)];
    let mut pos = 0u64; // bitmap byte offset
    while pos < total {
        let data = sys::next_data(meta, BITMAP_OFFSET + pos)
            .map_err(|e| Error::io("seek data in bitmap", e).with_path(meta_path))?;
        let Some(data) = data else { break };
        // Start at the chunk holding the data, so whole chunks are loaded at once.
        let data_pos = data.saturating_sub(BITMAP_OFFSET).max(pos);
        let start = (data_pos / CHUNK_BYTES * CHUNK_BYTES).max(pos);
        if start >= total {
            break;
        }
        let n = ((total - start) as usize).min(buf.len());
        let chunk = &mut buf[..n];
        read_exact_at(meta, chunk, BITMAP_OFFSET + start, meta_path, "read bitmap")?;
        bitmap.load_bytes(start, chunk);
        pos = start + n as u64;
    }
    Ok(bitmap)
}

/// Findings that do not stop an overlay from being served: reserved bytes, bits past the end of
/// the disk in the last bitmap byte or in bytes after the bitmap.
pub(crate) fn soft_findings(
    header: &Header,
    meta: &File,
    meta_path: &Path,
    meta_len: u64,
    virtual_size: u64,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if header.reserved_nonzero {
        out.push(format!(
            "reserved header bytes {}..{} are not all zero",
            crate::format::header::RESERVED_OFFSET,
            HEADER_SIZE
        ));
    }
    let sectors = virtual_size / SECTOR_SIZE;
    let need = bitmap_len(virtual_size);
    if sectors % 8 != 0 && need > 0 {
        let mut last = [0u8; 1];
        let off = BITMAP_OFFSET + need - 1;
        read_exact_at(meta, &mut last, off, meta_path, "read bitmap")?;
        let used = (1u8 << (sectors % 8)) - 1;
        if last[0] & !used != 0 {
            out.push(format!(
                "bits set past the end of the disk in the last bitmap byte (offset {off}, value {:#04x}, {} sectors)",
                last[0], sectors
            ));
        }
    }
    // Bytes after the bitmap: any set bit there is past the end of the disk.
    let mut pos = BITMAP_OFFSET + need;
    let mut buf = vec![0u8; 64 * 1024];
    while pos < meta_len {
        let Some(data) = sys::next_data(meta, pos)
            .map_err(|e| Error::io("seek data after bitmap", e).with_path(meta_path))?
        else {
            break;
        };
        if data >= meta_len {
            break;
        }
        let n = ((meta_len - data) as usize).min(buf.len());
        read_exact_at(meta, &mut buf[..n], data, meta_path, "read after bitmap")?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            out.push(format!(
                "bits set past the end of the disk: {} bytes follow the {}-byte bitmap and byte at offset {} is not zero",
                meta_len - BITMAP_OFFSET - need,
                need,
                data + i as u64
            ));
            break;
        }
        pos = data + n as u64;
    }
    Ok(out)
}
