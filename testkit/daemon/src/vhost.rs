//! A vhost-user-blk frontend for the end-to-end tests: libblkio's Rust implementation (the
//! `blkio` crate, driver `virtio-blk-vhost-user`), which maps its own memory into the daemon
//! over the socket and drives real split virtqueues with EVENT_IDX.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

/// The client's shared buffer (every request's data goes through it).
pub const REGION: usize = 64 << 20;

/// One libblkio `virtio-blk-vhost-user` connection with one mapped buffer region.
pub struct Frontend {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

impl Frontend {
    /// Connects to `sock` and starts `queues` request queues.
    pub fn connect(sock: &Path, queues: i32) -> Result<Frontend, blkio::Error> {
        Self::connect_with(sock, queues, false)
    }

    /// Like [`Frontend::connect`]; `read_only`: ask for a read-only device.
    pub fn connect_with(
        sock: &Path,
        queues: i32,
        read_only: bool,
    ) -> Result<Frontend, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", sock.to_str().expect("utf-8 path"))?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", queues)?;
        let started = blkio.start()?;
        let align = blkio.get_u64("mem-region-alignment")? as usize;
        let len = REGION.div_ceil(align) * align;
        let region = blkio.alloc_mem_region(len)?;
        blkio.map_mem_region(&region)?;
        Ok(Frontend {
            blkio,
            queues: started.queues,
            region,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    /// The shared buffer. Callers touch only parts no request in flight uses.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live shared mapping of `len` bytes owned by `self.blkio`
        // (freed only when it is dropped); callers do not touch the parts a request in flight
        // uses (the daemon writes only into those).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Waits up to `secs` for completions on queue `q`; returns each one's (user_data, ret).
    pub fn wait(&mut self, q: usize, min: usize, secs: u64) -> Vec<(usize, i32)> {
        let mut done: Vec<MaybeUninit<blkio::Completion>> =
            (0..256).map(|_| MaybeUninit::uninit()).collect();
        let mut timeout = Duration::from_secs(secs);
        match self.queues[q].do_io(&mut done, min, Some(&mut timeout), None) {
            Ok(n) => done[..n]
                .iter()
                // SAFETY: do_io initialised the first `n` completions.
                .map(|c| unsafe { c.assume_init_read() })
                .map(|c| (c.user_data, c.ret))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits (bounded) for the one request in flight on queue `q`; returns its `ret` (0 or
    /// -errno).
    pub fn complete(&mut self, q: usize) -> i32 {
        let got = self.wait(q, 1, 60);
        assert_eq!(got.len(), 1, "no completion within 60 s");
        got[0].1
    }

    /// Queues a write of `len` bytes from buffer offset `at` (no wait).
    pub fn submit_write(&mut self, q: usize, offset: u64, at: usize, len: usize, tag: usize) {
        assert!(at + len <= self.region.len);
        // SAFETY: in bounds of the region (checked above).
        let addr = unsafe { (self.region.addr as *const u8).add(at) };
        self.queues[q].write(offset, addr, len, tag, ReqFlags::empty());
    }

    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.buf()[..data.len()].copy_from_slice(data);
        self.submit_write(q, offset, 0, data.len(), 0);
        self.complete(q)
    }

    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Vec<u8> {
        self.buf()[..len].fill(0x5c);
        let addr = self.region.addr as *mut u8;
        self.queues[q].read(offset, addr, len, 0, ReqFlags::empty());
        assert_eq!(self.complete(q), 0, "read {len} at {offset}");
        self.buf()[..len].to_vec()
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.complete(q)
    }

    /// Like [`Frontend::complete`], but `None` when nothing completes within `secs` (or the
    /// connection is gone).
    pub fn try_complete(&mut self, q: usize, secs: u64) -> Option<i32> {
        self.wait(q, 1, secs).first().map(|c| c.1)
    }

    /// Writes `data` at `offset` from byte `at` of the shared region.
    pub fn write_from(&mut self, q: usize, offset: u64, data: &[u8], at: usize) -> i32 {
        self.buf()[at..at + data.len()].copy_from_slice(data);
        self.submit_write(q, offset, at, data.len(), 0);
        self.complete(q)
    }

    /// Reads `len` bytes at `offset` into byte `at` of the shared region.
    pub fn read_into(&mut self, q: usize, offset: u64, len: usize, at: usize) -> Vec<u8> {
        self.buf()[at..at + len].fill(0x5c);
        // SAFETY: `at + len` lies inside the region (the fill above checked it).
        let addr = unsafe { (self.region.addr as *mut u8).add(at) };
        self.queues[q].read(offset, addr, len, 0, ReqFlags::empty());
        assert_eq!(self.complete(q), 0, "read {len} at {offset} into byte {at}");
        self.buf()[at..at + len].to_vec()
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        self.complete(q)
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(offset, len, 0, ReqFlags::empty());
        self.complete(q)
    }
}

/// A recognisable pattern for `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as u8).wrapping_mul(31) ^ (i as u8) ^ ((i >> 9) as u8))
        .collect()
}

/// A misbehaving frontend written by hand (re-posted heads, flipped lengths, a pipe as call fd).
pub mod hostile;
