//! One virtio-blk request: parsing a descriptor chain into engine requests, and writing the
//! answer (data and status byte) back into guest memory.
//!
//! The descriptor chain is walked once (by the caller, into a list of [`Descriptor`]s); every
//! length check, every copy and every lent buffer is made from that one list, so a guest
//! that changes its descriptor table while the chain is parsed cannot pass a check with one
//! length and be served with another. Every descriptor is checked against the frontend's
//! memory table first: one outside the guest's regions fails the chain here, before any byte
//! is touched.
//!
//! Data moves in one of two ways. **Direct**: a READ or WRITE whose data is one descriptor,
//! contiguous in the daemon's mapping of guest memory and aligned to [`BUF_ALIGN`], is handed to
//! the engine as a [`LentBuf`] pointing into guest memory (the engine reads into it or writes
//! from it; no copy here; it gives no reference to the guest's bytes, which the guest may be
//! changing). The buffer keeps the memory table's mapping (an `Arc`) alive
//! until the request is answered, so a frontend that disconnects or replaces its memory table
//! mid-request cannot unmap it under the I/O. **Bounce**: anything else is copied through an
//! engine buffer (WRITE: out of the guest before submitting; READ: into the guest when
//! answered).

use std::ptr::NonNull;
use std::sync::Arc;

use addcow_engine::io::BUF_ALIGN;
use addcow_engine::{DataBuf, Done, IoBuf, LentBuf, Request, RequestError};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::{ID_BYTES, MAX_REQUEST_BYTES, MAX_ZERO_SECTORS, MAX_ZERO_SEGMENTS};

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
    /// Hand aligned single-descriptor data to the engine directly (else always bounce).
    pub direct: bool,
}

/// A parsed request on its way through the engine. Owns what its answer needs: the memory
/// table it was parsed against (kept mapped until it is dropped) and guest addresses, so it may
/// be completed on any thread after the frontend is gone.
pub struct Pending {
    /// Head descriptor index (what the used ring reports).
    pub head: u16,
    /// The memory table the chain was parsed against.
    mem: Arc<GuestMemoryMmap>,
    /// Where bounced READ data goes: the chain's writable bytes before the status byte, as
    /// (guest address, length) pieces, each checked to lie inside `mem`.
    data: Vec<(GuestAddress, usize)>,
    /// The status byte, checked to lie inside `mem` (`None`: the chain has no writable byte
    /// to put it in).
    status: Option<GuestAddress>,
    /// Status so far (`VIRTIO_BLK_S_OK` until a part fails).
    code: u8,
    /// Bytes written into the chain's writable descriptors (data, not the status byte).
    written: u32,
    /// Engine requests not answered yet.
    pub outstanding: usize,
    /// Bytes of daemon memory this request bounces through (0 when direct or dataless).
    pub bounced: u64,
    /// The data moves directly between the engine and guest memory.
    pub direct: bool,
    /// The request's operation ("read", "write", ...), for the log.
    pub op: &'static str,
    /// The request's first sector, for the log.
    pub sector: u64,
}

impl Pending {
    /// An engine request of this one finished. Returns the engine's error, if it failed (the
    /// guest sees `IOERR`; the caller logs it with the queue's context).
    pub fn complete(&mut self, r: Result<Done, RequestError>) -> Option<RequestError> {
        self.outstanding = self.outstanding.saturating_sub(1);
        match r {
            Ok(Done::Filled(DataBuf::Lent(buf))) => {
                // Read straight into the guest's buffer.
                self.written = self.written.saturating_add(buf.len() as u32);
            }
            Ok(Done::Read(buf) | Done::Filled(DataBuf::Owned(buf))) => {
                if self.copy_out(&buf) {
                    self.written = self.written.saturating_add(buf.len() as u32);
                } else {
                    self.code = VIRTIO_BLK_S_IOERR as u8;
                    return Some(RequestError {
                        errno: libc::EFAULT,
                        op: "copy read data into guest memory",
                        offset: self.sector.saturating_mul(SECTOR),
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                self.code = VIRTIO_BLK_S_IOERR as u8;
                return Some(e);
            }
        }
        None
    }

    /// Copies bounced READ data into the chain's data pieces; false if it does not fit.
    fn copy_out(&self, buf: &[u8]) -> bool {
        let room: usize = self.data.iter().map(|&(_, n)| n).sum();
        if room < buf.len() {
            return false;
        }
        let mut at = 0;
        for &(addr, n) in &self.data {
            if at == buf.len() {
                break;
            }
            let n = n.min(buf.len() - at);
            if self.mem.write_slice(&buf[at..at + n], addr).is_err() {
                return false;
            }
            at += n;
        }
        true
    }

    /// Writes the status byte; returns the used length (bytes written into the chain).
    pub fn finish(self) -> u32 {
        let wrote_status = self
            .status
            .is_some_and(|at| self.mem.write_slice(&[self.code], at).is_ok());
        if wrote_status {
            self.written.saturating_add(1)
        } else {
            self.written
        }
    }

    /// The status this request is answered with so far.
    pub fn code(&self) -> u8 {
        self.code
    }

    /// A request answered at once with `code` (nothing submitted), its status byte at `status`.
    pub fn answered(
        head: u16,
        mem: &Arc<GuestMemoryMmap>,
        status: Option<GuestAddress>,
        code: u32,
    ) -> Pending {
        Pending {
            head,
            mem: Arc::clone(mem),
            data: Vec::new(),
            status,
            code: code as u8,
            written: 0,
            outstanding: 0,
            bounced: 0,
            direct: false,
            op: "",
            sector: 0,
        }
    }
}

/// The (guest address, length) pieces of `descs` that are left after skipping `front` bytes
/// from the start and `back` bytes from the end; zero-length pieces are left out.
fn pieces(
    descs: &[(GuestAddress, usize)],
    front: usize,
    back: usize,
) -> Vec<(GuestAddress, usize)> {
    let total: usize = descs.iter().map(|&(_, n)| n).sum();
    let Some(keep) = total.checked_sub(front).and_then(|t| t.checked_sub(back)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut skip = front;
    let mut left = keep;
    for &(addr, n) in descs {
        if left == 0 {
            break;
        }
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(left);
        if let Some(a) = addr.checked_add(skip as u64) {
            out.push((a, take));
        }
        left -= take;
        skip = 0;
    }
    out
}

/// A lent engine buffer over the single piece `data` of guest memory, when it is one
/// contiguous range of the daemon's mapping aligned to [`BUF_ALIGN`]; `None` otherwise (then
/// the request bounces).
fn direct_buf(mem: &Arc<GuestMemoryMmap>, data: &[(GuestAddress, usize)]) -> Option<LentBuf> {
    let [(addr, len)] = *data else {
        return None;
    };
    // One region holds the whole range (get_slice fails across a region boundary).
    let slice = mem.get_slice(addr, len).ok()?;
    let ptr = NonNull::new(slice.ptr_guard_mut().as_ptr())?;
    if ptr.as_ptr() as usize % BUF_ALIGN != 0 {
        return None;
    }
    let keep: Arc<dyn std::any::Any + Send + Sync> = mem.clone();
    // SAFETY: `ptr` is aligned to BUF_ALIGN (checked above) and points to `len` bytes of one
    // region of `mem` (get_slice checked the range), which is a MAP_SHARED mapping readable and
    // writable by the daemon. `keep` holds the `GuestMemoryMmap` whose regions own that mapping,
    // so it stays mapped until the buffer is dropped, whatever the frontend does meanwhile.
    // The guest may write its buffer concurrently: a LentBuf makes no reference into it (raw
    // pointers and copies only), and a torn copy only tears the data of its own request.
    Some(unsafe { LentBuf::new(ptr, len, keep) })
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

/// Where the status byte goes: the last byte of the chain's last descriptor, which must be
/// device-writable and inside guest memory. Found on its own (before the other descriptors are
/// checked) so that a chain with a bad data descriptor still gets its `IOERR`.
pub fn status_slot(mem: &GuestMemoryMmap, last: Option<&Descriptor>) -> Option<GuestAddress> {
    let d = last?;
    if !d.is_write_only() || d.len() == 0 {
        return None;
    }
    let at = d.addr().checked_add(u64::from(d.len()) - 1)?;
    mem.get_slice(at, 1).ok().map(|_| at)
}

/// Copies `dst.len()` bytes of the guest pieces `from`, starting `skip` bytes in, into `dst`;
/// false when the pieces hold fewer or guest memory refuses the copy.
fn gather(
    mem: &GuestMemoryMmap,
    from: &[(GuestAddress, usize)],
    skip: usize,
    dst: &mut [u8],
) -> bool {
    let src = pieces(from, skip, 0);
    let mut at = 0;
    for (addr, n) in src {
        if at == dst.len() {
            break;
        }
        let n = n.min(dst.len() - at);
        if mem.read_slice(&mut dst[at..at + n], addr).is_err() {
            return false;
        }
        at += n;
    }
    at == dst.len()
}

/// Copies `src` into the guest pieces `to`; false when they are too short or guest memory
/// refuses the copy.
fn scatter(mem: &GuestMemoryMmap, to: &[(GuestAddress, usize)], src: &[u8]) -> bool {
    let mut at = 0;
    for &(addr, n) in to {
        if at == src.len() {
            break;
        }
        let n = n.min(src.len() - at);
        if mem.write_slice(&src[at..at + n], addr).is_err() {
            return false;
        }
        at += n;
    }
    at == src.len()
}

/// The daemon's buffer pool has no room for a chain's bounce buffer now: nothing of the chain
/// was done (nothing allocated, nothing written into guest memory); it is to be parsed again
/// once memory is given back.
#[derive(Debug, PartialEq, Eq)]
pub struct NoBounceMemory;

/// Parses the request whose chain (`descs`: the chain walked once, in order) starts at `head`,
/// over guest memory `mem`. Returns the pending request and the engine requests to submit for
/// it (none: it is answered already, e.g. GET_ID or a malformed chain). A chain that bounces
/// first takes its bytes with `take` (which must not block: `false` when they cannot be had
/// now), before anything is allocated; the bytes taken are [`Pending::bounced`], to be given
/// back when the chain is answered. `alloc` gives engine buffers for bounced WRITE payloads.
pub fn parse(
    head: u16,
    mem: &Arc<GuestMemoryMmap>,
    descs: &[Descriptor],
    limits: &Limits<'_>,
    alloc: &dyn Fn(usize) -> IoBuf,
    take: &mut dyn FnMut(u64) -> bool,
) -> Result<(Pending, Vec<Request>), NoBounceMemory> {
    let status = status_slot(mem, descs.last());
    let ioerr = |status| {
        Ok((
            Pending::answered(head, mem, status, VIRTIO_BLK_S_IOERR),
            Vec::new(),
        ))
    };
    if status.is_none() {
        return ioerr(None);
    }
    if !directions_in_order(descs.iter().map(|d| d.is_write_only())) {
        return ioerr(status);
    }
    // Every descriptor inside guest memory, before anything is read or written.
    if !descs
        .iter()
        .all(|d| GuestMemoryBackend::check_range(&**mem, d.addr(), d.len() as usize))
    {
        return ioerr(status);
    }
    let side = |writable: bool| -> Vec<(GuestAddress, usize)> {
        descs
            .iter()
            .filter(|d| d.is_write_only() == writable)
            .map(|d| (d.addr(), d.len() as usize))
            .collect()
    };
    let (readable, writable) = (side(false), side(true));
    let total = |p: &[(GuestAddress, usize)]| p.iter().map(|&(_, n)| n as u64).sum::<u64>();
    // The data: the writable bytes before the status byte (the last writable byte).
    let data_len = total(&writable) - 1;
    let data_out = pieces(&writable, 0, 1);
    let mut hdr = [0u8; HEADER_LEN];
    if !gather(mem, &readable, 0, &mut hdr) {
        return ioerr(status);
    }
    // The device-readable bytes after the header.
    let payload_len = total(&readable) - HEADER_LEN as u64;
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
    let mut pending = Pending::answered(head, mem, status, VIRTIO_BLK_S_OK);
    pending.sector = sector;
    pending.op = match kind {
        VIRTIO_BLK_T_IN => "read",
        VIRTIO_BLK_T_OUT => "write",
        VIRTIO_BLK_T_FLUSH => "flush",
        VIRTIO_BLK_T_DISCARD => "discard",
        VIRTIO_BLK_T_WRITE_ZEROES => "write-zeroes",
        _ => "other",
    };
    let mut reqs = Vec::new();
    match kind {
        VIRTIO_BLK_T_IN => {
            let len = data_len;
            if len % SECTOR != 0 || len > u64::from(MAX_REQUEST_BYTES) {
                return ioerr(pending.status);
            }
            let Some(offset) = byte_range(sector, len, limits.size) else {
                return ioerr(pending.status);
            };
            if len > 0 {
                match limits.direct.then(|| direct_buf(mem, &data_out)).flatten() {
                    Some(buf) => {
                        pending.direct = true;
                        reqs.push(Request::ReadInto {
                            offset,
                            buf: buf.into(),
                        });
                    }
                    None => {
                        if !take(len) {
                            return Err(NoBounceMemory);
                        }
                        pending.bounced = len;
                        pending.data = data_out;
                        reqs.push(Request::Read {
                            offset,
                            len: len as u32,
                        });
                    }
                }
            }
        }
        VIRTIO_BLK_T_OUT => {
            if payload_len % SECTOR != 0 || payload_len > u64::from(MAX_REQUEST_BYTES) {
                return ioerr(pending.status);
            }
            let len = payload_len as usize;
            let Some(offset) = byte_range(sector, len as u64, limits.size) else {
                return ioerr(pending.status);
            };
            if len > 0 {
                let pieces = pieces(&readable, HEADER_LEN, 0);
                let data: DataBuf = match limits.direct.then(|| direct_buf(mem, &pieces)).flatten()
                {
                    Some(buf) => {
                        pending.direct = true;
                        buf.into()
                    }
                    None => {
                        if !take(len as u64) {
                            return Err(NoBounceMemory);
                        }
                        pending.bounced = len as u64;
                        let mut buf = alloc(len);
                        if !gather(mem, &readable, HEADER_LEN, &mut buf[..len]) {
                            // Dropped unsubmitted: its stale contents never reach the disk. The
                            // bytes taken are given back when the IOERR is answered.
                            let mut failed =
                                Pending::answered(head, mem, pending.status, VIRTIO_BLK_S_IOERR);
                            failed.bounced = pending.bounced;
                            return Ok((failed, Vec::new()));
                        }
                        buf.into()
                    }
                };
                reqs.push(Request::Write { offset, data, fua });
            }
        }
        VIRTIO_BLK_T_FLUSH => reqs.push(Request::Flush),
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let s = limits.serial.as_bytes();
            let n = s.len().min(ID_BYTES);
            id[..n].copy_from_slice(&s[..n]);
            let n = (data_len as usize).min(ID_BYTES);
            if !scatter(mem, &data_out, &id[..n]) {
                return ioerr(pending.status);
            }
            pending.written = n as u32;
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let segs = payload_len as usize;
            if payload_len > u64::from(MAX_ZERO_SEGMENTS) * SEGMENT_LEN as u64
                || segs == 0
                || segs % SEGMENT_LEN != 0
                || segs / SEGMENT_LEN > MAX_ZERO_SEGMENTS as usize
            {
                return ioerr(pending.status);
            }
            for i in 0..segs / SEGMENT_LEN {
                let mut seg = [0u8; SEGMENT_LEN];
                if !gather(mem, &readable, HEADER_LEN + i * SEGMENT_LEN, &mut seg) {
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
                    return Ok((
                        Pending::answered(head, mem, pending.status, VIRTIO_BLK_S_UNSUPP),
                        Vec::new(),
                    ));
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
            return Ok((
                Pending::answered(head, mem, pending.status, VIRTIO_BLK_S_UNSUPP),
                Vec::new(),
            ))
        }
    }
    pending.outstanding = reqs.len();
    Ok((pending, reqs))
}

/// The fuzz target's entry (`fuzz/fuzz_targets/virtio_blk_request.rs`): `data` is a descriptor
/// chain and the guest memory it points into. Byte 0: the number of descriptors (1..=16) and, in
/// its top bits, the limits (read-only, writeback, direct); then 9 bytes per descriptor (guest
/// address u32 LE, length u32 LE, flags: bit 0 device-writable); the rest fills 64 KiB of guest
/// memory. Checks what the parser promises: every engine request lies inside the disk and the
/// request limit, a lent buffer is no wider than the range checked, and the chain is answered.
#[cfg(feature = "fuzzing")]
pub fn fuzz_parse(data: &[u8]) {
    const MEM: usize = 64 << 10;
    const SIZE: u64 = 1 << 20;
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(first & 0x0f) + 1;
    let Some(table) = rest.get(..n * 9) else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let mem = Arc::new(mem);
    let contents = &rest[n * 9..];
    let _ = mem.write_slice(&contents[..contents.len().min(MEM)], GuestAddress(0));
    let descs: Vec<Descriptor> = table
        .chunks_exact(9)
        .map(|d| {
            let addr = u64::from(le_u32(&d[0..4]));
            let len = le_u32(&d[4..8]);
            let flags = if d[8] & 1 != 0 {
                virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let limits = Limits {
        size: SIZE,
        read_only: first & 0x10 != 0,
        writeback: first & 0x20 != 0,
        serial: "fuzz",
        direct: first & 0x40 != 0,
    };
    let alloc = |len: usize| IoBuf::new_zeroed(len);
    let (mut pending, reqs) =
        parse(0, &mem, &descs, &limits, &alloc, &mut |_| true).expect("every take succeeds");
    assert_eq!(pending.outstanding, reqs.len());
    let within = |offset: u64, len: u64| {
        assert!(
            len <= u64::from(MAX_REQUEST_BYTES),
            "request of {len} bytes"
        );
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= SIZE),
            "past the disk"
        );
    };
    for req in reqs {
        match req {
            Request::Read { offset, len } => {
                within(offset, u64::from(len));
                let buf = IoBuf::new_zeroed(len as usize);
                let _ = pending.complete(Ok(Done::Read(buf)));
            }
            Request::ReadInto { offset, buf } => {
                within(offset, buf.len() as u64);
                let _ = pending.complete(Ok(Done::Filled(buf)));
            }
            Request::Write { offset, data, .. } => {
                within(offset, data.len() as u64);
                let _ = pending.complete(Ok(Done::Written(data)));
            }
            Request::Trim { offset, len, .. } | Request::WriteZeroes { offset, len, .. } => {
                assert!(
                    offset.checked_add(len).is_some_and(|e| e <= SIZE),
                    "past the disk"
                );
                let _ = pending.complete(Ok(Done::Ok));
            }
            _ => {
                let _ = pending.complete(Ok(Done::Ok));
            }
        }
    }
    assert_eq!(pending.outstanding, 0);
    let _ = pending.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Guest memory: one 1 MiB region at 0; the ring at 0, buffers from 64 KiB.
    const MEM: u64 = 1 << 20;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap())
    }

    fn limits(read_only: bool) -> Limits<'static> {
        Limits {
            size: 1 << 20,
            read_only,
            writeback: true,
            serial: "vm-disk-serial",
            direct: false,
        }
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Parses the chain of `descs` (addr, len, device-writable); returns the engine requests,
    /// the used length, and the status byte at `STATUS` (0xee: not written).
    fn run(
        mem: &Arc<GuestMemoryMmap>,
        descs: &[(u64, u32, bool)],
        limits: &Limits<'_>,
    ) -> (Vec<Request>, u32, u8) {
        mem.write_slice(&[0xee], GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::create(&**mem, GuestAddress(0), 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, w)| {
                let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(a, l, flags, 0))
            })
            .collect();
        let chain = q.build_desc_chain(&raw).unwrap();
        let list: Vec<Descriptor> = chain.collect();
        let alloc = |n: usize| IoBuf::new_zeroed(n);
        let (p, reqs) = parse(0, mem, &list, limits, &alloc, &mut |_| true).expect("memory");
        assert_eq!(p.outstanding, reqs.len());
        let used = p.finish();
        let status = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
        (reqs, used, status)
    }

    /// A descriptor: guest address, length, device-writable.
    type Desc = (u64, u32, bool);

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

    #[test]
    fn get_id_writes_the_serial_nul_padded() {
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
        let (reqs, used, status) = run(
            &mem,
            &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
            &limits(false),
        );
        assert!(reqs.is_empty());
        assert_eq!((used, status), (21, OK));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..14], b"vm-disk-serial");
        assert_eq!(&id[14..], &[0u8; 6]);
    }

    #[test]
    fn read_and_write_become_engine_requests() {
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_IN, 3);
        let (reqs, _, _) = run(
            &mem,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
            &limits(false),
        );
        assert!(matches!(
            reqs[..],
            [Request::Read {
                offset: 1536,
                len: 1024
            }]
        ));
        header(&mem, VIRTIO_BLK_T_OUT, 2);
        mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
        let (reqs, used, status) = run(
            &mem,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            &limits(false),
        );
        match &reqs[..] {
            [Request::Write { offset, data, fua }] => {
                assert_eq!((*offset, data.len(), *fua), (1024, 512, false));
                let mut got = [0u8; 512];
                assert!(data.copy_to(0, &mut got));
                assert!(got.iter().all(|&b| b == 7));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((used, status), (1, OK));
    }

    #[test]
    fn malformed_chains_fail_with_ioerr_and_submit_nothing() {
        let mem = memory();
        let l = limits(false);
        let cases: Vec<(&str, u32, u64, Vec<Desc>)> = vec![
            (
                "data outside guest memory",
                VIRTIO_BLK_T_IN,
                0,
                vec![(HDR, 16, false), (MEM - 256, 512, true), (STATUS, 1, true)],
            ),
            (
                "write payload outside guest memory",
                VIRTIO_BLK_T_OUT,
                0,
                vec![
                    (HDR, 16, false),
                    (MEM + 4096, 512, false),
                    (STATUS, 1, true),
                ],
            ),
            (
                "readable after writable",
                VIRTIO_BLK_T_IN,
                0,
                vec![
                    (HDR, 16, false),
                    (DATA, 512, true),
                    (DATA, 512, false),
                    (STATUS, 1, true),
                ],
            ),
            (
                "short header",
                VIRTIO_BLK_T_IN,
                0,
                vec![(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)],
            ),
            (
                "length not whole sectors",
                VIRTIO_BLK_T_IN,
                0,
                vec![(HDR, 16, false), (DATA, 500, true), (STATUS, 1, true)],
            ),
            (
                "past the end",
                VIRTIO_BLK_T_IN,
                2047,
                vec![(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
            ),
            (
                "sector overflows",
                VIRTIO_BLK_T_OUT,
                u64::MAX / 256,
                vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            ),
            (
                "discard segment cut short",
                VIRTIO_BLK_T_DISCARD,
                0,
                vec![(HDR, 16, false), (DATA, 12, false), (STATUS, 1, true)],
            ),
        ];
        for (what, kind, sector, descs) in cases {
            header(&mem, kind, sector);
            let (reqs, used, status) = run(&mem, &descs, &l);
            assert!(reqs.is_empty(), "{what}: submitted {reqs:?}");
            assert_eq!(status, IOERR, "{what}: status");
            assert_eq!(used, 1, "{what}: used length");
        }
        // No writable byte at all: nothing is written anywhere, used length 0.
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let (reqs, used, status) = run(&mem, &[(HDR, 16, false)], &l);
        assert!(reqs.is_empty());
        assert_eq!((used, status), (0, 0xee));
    }

    #[test]
    fn read_only_refuses_writes_and_unknown_types_are_unsupported() {
        let mem = memory();
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let (reqs, _, status) = run(
            &mem,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            &limits(true),
        );
        assert!(reqs.is_empty());
        assert_eq!(status, IOERR);
        header(&mem, 0x7777, 0);
        let (reqs, _, status) = run(&mem, &[(HDR, 16, false), (STATUS, 1, true)], &limits(false));
        assert!(reqs.is_empty());
        assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn requests_past_the_advertised_size_fail_before_anything_is_allocated() {
        let mem = memory();
        let l = Limits {
            size: 64 << 20,
            ..limits(false)
        };
        // Overlapping 1 MiB descriptors (the whole guest memory) make a 4 MiB chain.
        let at_limit = MAX_REQUEST_BYTES as usize / MEM as usize;
        for (kind, writable) in [(VIRTIO_BLK_T_IN, true), (VIRTIO_BLK_T_OUT, false)] {
            for extra in [0u32, 512] {
                let mut descs: Vec<Desc> = vec![(HDR, 16, false)];
                descs.extend((0..at_limit).map(|_| (0, MEM as u32, writable)));
                if extra > 0 {
                    descs.push((DATA, extra, writable));
                }
                descs.push((STATUS, 1, true));
                header(&mem, kind, 0);
                let (reqs, _, status) = run(&mem, &descs, &l);
                if extra == 0 {
                    assert_eq!(reqs.len(), 1, "type {kind}: {MAX_REQUEST_BYTES} bytes");
                    assert_eq!(status, OK);
                } else {
                    assert!(reqs.is_empty(), "type {kind}: past the limit: {reqs:?}");
                    assert_eq!(status, IOERR, "type {kind}: past the limit");
                }
            }
        }
    }

    /// A chain that bounces takes its bytes before anything is allocated or written; refused,
    /// it is left as it was (nothing allocated, no status byte). A direct chain takes nothing.
    #[test]
    fn a_bounced_chain_without_pool_memory_is_left_untouched() {
        let mem = memory();
        let allocs = std::cell::Cell::new(0usize);
        let alloc = |n: usize| {
            allocs.set(allocs.get() + 1);
            IoBuf::new_zeroed(n)
        };
        let q = MockSplitQueue::create(&*mem, GuestAddress(0), 16);
        let chain = |descs: &[(u64, u32, bool)]| -> Vec<Descriptor> {
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .map(|&(a, l, w)| {
                    let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                    RawDescriptor::from(SplitDescriptor::new(a, l, flags, 0))
                })
                .collect();
            q.build_desc_chain(&raw).unwrap().collect()
        };
        let mut asked = Vec::new();
        for (kind, writable) in [(VIRTIO_BLK_T_OUT, false), (VIRTIO_BLK_T_IN, true)] {
            header(&mem, kind, 0);
            mem.write_slice(&[0xee], GuestAddress(STATUS)).unwrap();
            // Unaligned data: it bounces.
            let list = chain(&[
                (HDR, 16, false),
                (DATA + 512, 4096, writable),
                (STATUS, 1, true),
            ]);
            let mut refuse = |n: u64| {
                asked.push(n);
                false
            };
            let r = parse(0, &mem, &list, &limits(false), &alloc, &mut refuse);
            assert_eq!(r.err(), Some(NoBounceMemory), "type {kind}");
            let status = mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap();
            assert_eq!(status, 0xee, "type {kind}: nothing written into the guest");
            // Given the memory, the same chain is served and says what it took.
            let (p, reqs) =
                parse(0, &mem, &list, &limits(false), &alloc, &mut |_| true).expect("memory");
            assert_eq!((p.bounced, reqs.len()), (4096, 1), "type {kind}");
        }
        assert_eq!(asked, [4096, 4096]);
        assert_eq!(
            allocs.get(),
            1,
            "only the WRITE that got its memory allocated"
        );
        // Direct (aligned, one piece): nothing to take.
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let list = chain(&[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)]);
        let direct = Limits {
            direct: true,
            ..limits(false)
        };
        let (p, _) = parse(0, &mem, &list, &direct, &alloc, &mut |_| false).expect("no take");
        assert!(p.direct && p.bounced == 0);
    }

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
