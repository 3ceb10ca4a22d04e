//! One virtio-blk request: parsing a descriptor chain into engine requests, and writing the
//! answer (data and status byte) back into guest memory.
//!
//! Every guest address goes through `virtio-queue`'s [`Reader`]/[`Writer`], which resolve it
//! against the frontend's memory table: a descriptor outside the guest's regions fails the chain
//! here, before any byte is touched.

use std::io::{Read, Write};

use addcow_engine::io::MAX_READ;
use addcow_engine::{Done, IoBuf, Request, RequestError};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{Reader, Writer};

use super::config::{ID_BYTES, MAX_ZERO_SECTORS, MAX_ZERO_SEGMENTS};

/// Bytes of the request header (`struct virtio_blk_outhdr`: type, reserved, sector).
const HEADER_LEN: usize = 16;
/// Bytes of one DISCARD / WRITE_ZEROES segment (sector, num_sectors, flags).
const SEGMENT_LEN: usize = 16;
const SECTOR: u64 = 512;

/// What the device knows when it parses a request.
pub struct Limits<'s> {
    /// Virtual size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// Write cache on (`CONFIG_WCE` writeback = 1): writes are durable at the next FLUSH.
    /// Off: every write, discard and write-zeroes is submitted with FUA.
    pub writeback: bool,
    /// GET_ID answer.
    pub serial: &'s str,
}

/// A parsed request on its way through the engine.
pub struct Pending<'m> {
    /// Head descriptor index (what the used ring reports).
    pub head: u16,
    /// Where READ data goes (the chain's writable bytes before the status byte).
    data: Option<Writer<'m>>,
    /// The status byte (`None`: the chain has no writable byte to put it in).
    status: Option<Writer<'m>>,
    /// Status so far (`VIRTIO_BLK_S_OK` until a part fails).
    code: u8,
    /// Bytes written into the chain's writable descriptors (data, not the status byte).
    written: u32,
    /// Engine requests not answered yet.
    pub outstanding: usize,
}

impl<'m> Pending<'m> {
    /// An engine request of this one finished.
    pub fn complete(&mut self, r: Result<Done, RequestError>) {
        self.outstanding = self.outstanding.saturating_sub(1);
        match r {
            Ok(Done::Read(buf)) => {
                let ok = match self.data.as_mut() {
                    Some(w) if w.available_bytes() >= buf.len() => w.write_all(&buf).is_ok(),
                    _ => false,
                };
                if ok {
                    self.written = self.written.saturating_add(buf.len() as u32);
                } else {
                    self.code = VIRTIO_BLK_S_IOERR as u8;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "vhost-user-blk request failed");
                self.code = VIRTIO_BLK_S_IOERR as u8;
            }
        }
    }

    /// Writes the status byte; returns the used length (bytes written into the chain).
    pub fn finish(mut self) -> u32 {
        let code = self.code;
        let wrote_status = self
            .status
            .as_mut()
            .is_some_and(|w| w.write_all(&[code]).is_ok());
        if wrote_status {
            self.written.saturating_add(1)
        } else {
            self.written
        }
    }

    fn answered(head: u16, status: Option<Writer<'m>>, code: u32) -> Pending<'m> {
        Pending {
            head,
            data: None,
            status,
            code: code as u8,
            written: 0,
            outstanding: 0,
        }
    }
}

/// Checks the virtio rule that every device-readable descriptor precedes every device-writable
/// one.
fn directions_in_order<I: Iterator<Item = bool>>(writable: I) -> bool {
    let mut seen_writable = false;
    for w in writable {
        if w {
            seen_writable = true;
        } else if seen_writable {
            return false;
        }
    }
    true
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Byte range of `sectors` sectors at `sector`, if it lies inside the disk.
fn byte_range(sector: u64, bytes: u64, size: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR)?;
    let end = offset.checked_add(bytes)?;
    (end <= size).then_some(offset)
}

/// Parses the request whose chain starts at `head`. Returns the pending request and the engine
/// requests to submit for it (none: it is answered already, e.g. GET_ID or a malformed chain).
/// `alloc` gives engine buffers for WRITE payloads.
pub fn parse<'m>(
    head: u16,
    writable_flags: impl Iterator<Item = bool>,
    reader: Result<Reader<'m>, virtio_queue::Error>,
    writer: Result<Writer<'m>, virtio_queue::Error>,
    limits: &Limits<'_>,
    alloc: &dyn Fn(usize) -> IoBuf,
) -> (Pending<'m>, Vec<Request>) {
    let ioerr = |status| {
        (
            Pending::answered(head, status, VIRTIO_BLK_S_IOERR),
            Vec::new(),
        )
    };
    // The status byte: the last writable byte of the chain.
    let (mut data, status) = match writer {
        Ok(mut w) if w.available_bytes() >= 1 => {
            let at = w.available_bytes() - 1;
            match w.split_at(at) {
                Ok(s) => (w, Some(s)),
                Err(_) => return ioerr(None),
            }
        }
        _ => return ioerr(None),
    };
    let mut reader = match reader {
        Ok(r) => r,
        Err(_) => return ioerr(status),
    };
    if !directions_in_order(writable_flags) {
        return ioerr(status);
    }
    let mut hdr = [0u8; HEADER_LEN];
    if reader.read_exact(&mut hdr).is_err() {
        return ioerr(status);
    }
    let kind = le_u32(&hdr[0..4]);
    let sector = le_u64(&hdr[8..16]);
    let writes = matches!(
        kind,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
    );
    if writes && limits.read_only {
        return ioerr(status);
    }
    let fua = !limits.writeback;
    let mut pending = Pending {
        head,
        data: None,
        status,
        code: VIRTIO_BLK_S_OK as u8,
        written: 0,
        outstanding: 0,
    };
    let mut reqs = Vec::new();
    match kind {
        VIRTIO_BLK_T_IN => {
            let len = data.available_bytes() as u64;
            if len % SECTOR != 0 || len > u64::from(MAX_READ) {
                return ioerr(pending.status);
            }
            let Some(offset) = byte_range(sector, len, limits.size) else {
                return ioerr(pending.status);
            };
            if len > 0 {
                reqs.push(Request::Read {
                    offset,
                    len: len as u32,
                });
            }
            pending.data = Some(data);
        }
        VIRTIO_BLK_T_OUT => {
            let len = reader.available_bytes();
            if len as u64 % SECTOR != 0 || len as u64 > u64::from(MAX_READ) {
                return ioerr(pending.status);
            }
            let Some(offset) = byte_range(sector, len as u64, limits.size) else {
                return ioerr(pending.status);
            };
            if len > 0 {
                let mut buf = alloc(len);
                if reader.read_exact(&mut buf[..len]).is_err() {
                    // Dropped unsubmitted: its stale contents never reach the disk.
                    return ioerr(pending.status);
                }
                reqs.push(Request::Write {
                    offset,
                    data: buf,
                    fua,
                });
            }
        }
        VIRTIO_BLK_T_FLUSH => reqs.push(Request::Flush),
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let s = limits.serial.as_bytes();
            let n = s.len().min(ID_BYTES);
            id[..n].copy_from_slice(&s[..n]);
            let n = data.available_bytes().min(ID_BYTES);
            if data.write_all(&id[..n]).is_err() {
                return ioerr(pending.status);
            }
            pending.written = n as u32;
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let segs = reader.available_bytes();
            if segs == 0
                || segs % SEGMENT_LEN != 0
                || segs / SEGMENT_LEN > MAX_ZERO_SEGMENTS as usize
            {
                return ioerr(pending.status);
            }
            for _ in 0..segs / SEGMENT_LEN {
                let mut seg = [0u8; SEGMENT_LEN];
                if reader.read_exact(&mut seg).is_err() {
                    return ioerr(pending.status);
                }
                let start = le_u64(&seg[0..8]);
                let sectors = le_u32(&seg[8..12]);
                let flags = le_u32(&seg[12..16]);
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                let known = if kind == VIRTIO_BLK_T_DISCARD {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !known != 0 || sectors > MAX_ZERO_SECTORS {
                    return (
                        Pending::answered(head, pending.status, VIRTIO_BLK_S_UNSUPP),
                        Vec::new(),
                    );
                }
                let len = u64::from(sectors) * SECTOR;
                let Some(offset) = byte_range(start, len, limits.size) else {
                    return ioerr(pending.status);
                };
                if len == 0 {
                    continue;
                }
                reqs.push(if kind == VIRTIO_BLK_T_DISCARD {
                    Request::Trim { offset, len, fua }
                } else {
                    Request::WriteZeroes {
                        offset,
                        len,
                        punch: unmap,
                        fua,
                    }
                });
            }
        }
        _ => {
            return (
                Pending::answered(head, pending.status, VIRTIO_BLK_S_UNSUPP),
                Vec::new(),
            )
        }
    }
    pending.outstanding = reqs.len();
    (pending, reqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direction_order() {
        assert!(directions_in_order([false, false, true, true].into_iter()));
        assert!(directions_in_order([true].into_iter()));
        assert!(!directions_in_order([false, true, false].into_iter()));
    }

    #[test]
    fn ranges_stay_inside_the_disk() {
        assert_eq!(byte_range(1, 512, 1024), Some(512));
        assert_eq!(byte_range(1, 1024, 1024), None);
        assert_eq!(byte_range(u64::MAX / 2, 512, u64::MAX), None);
    }
}
