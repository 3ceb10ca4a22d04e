//! The virtio-blk device description a frontend negotiates: feature bits and the config space.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::conn::budget::Pool;

/// Logical block size advertised with `VIRTIO_BLK_F_BLK_SIZE` (the engine serves any byte
/// range; 512 matches the overlay's sector, so no read-modify-write is forced on the guest).
pub const BLOCK_SIZE: u32 = 512;

/// Bytes of `virtio_blk_config` this device fills (up to and including `write_zeroes_may_unmap`
/// and its padding).
pub const CONFIG_LEN: usize = 60;

/// Largest DISCARD / WRITE_ZEROES range per segment, in 512-byte sectors (32 MiB): bounded so
/// one guest request cannot make one engine request unboundedly long.
pub const MAX_ZERO_SECTORS: u32 = 64 << 11;

/// Largest number of segments in one DISCARD / WRITE_ZEROES request.
pub const MAX_ZERO_SEGMENTS: u32 = 1;

/// Largest READ or WRITE data of one request, in bytes: what the guest is told
/// ([`SEG_MAX`] segments of at most [`SIZE_MAX`] bytes), and what the device accepts: a chain
/// with more data is answered `IOERR` before anything is allocated for it. It bounds the daemon
/// memory one bounced chain takes (the bounce cap bounds a queue's, but always lets one chain
/// through).
pub const MAX_REQUEST_BYTES: u32 = 4 << 20;

/// Largest number of data segments per request offered (`VIRTIO_BLK_F_SEG_MAX`), at most the
/// ring size minus 2 (header and status). 128 scattered 4 KiB guest pages make 512 KiB requests.
pub const SEG_MAX: u32 = 128;

/// Largest data segment offered (`VIRTIO_BLK_F_SIZE_MAX`): [`SEG_MAX`] of them make
/// [`MAX_REQUEST_BYTES`]. Linux builds no request beyond `seg_max * size_max`. Only the total is
/// enforced: a frontend that sends fewer, larger descriptors (libblkio gives one descriptor per
/// buffer) is served as long as the request stays within [`MAX_REQUEST_BYTES`].
pub const SIZE_MAX: u32 = MAX_REQUEST_BYTES / SEG_MAX;

/// Largest GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;

/// What the device is: size, queues, and whether it takes writes.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Virtual size in bytes.
    pub size: u64,
    /// Number of request queues offered (`VIRTIO_BLK_F_MQ`).
    pub num_queues: u16,
    /// Largest ring size a frontend may choose.
    pub queue_size: u16,
    /// Refuse writes, discards and write-zeroes; offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// GET_ID answer (truncated to [`ID_BYTES`]).
    pub serial: String,
    /// What the logs call this device (its socket path).
    pub name: String,
    /// The daemon's buffer pool (`--max-buffer-memory`, shared with the NBD connections):
    /// every queue takes the bytes its chains bounce through from it, without blocking, and
    /// stops popping chains while it has no room. `None`: only the per-queue bounce cap.
    pub pool: Option<Arc<Pool>>,
}

impl DeviceConfig {
    /// Device feature bits offered: virtio 1.0, event index, indirect descriptors, and the
    /// virtio-blk features this backend serves.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1u64 << VIRTIO_BLK_F_MQ);
        if self.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// Data segments per request offered: [`SEG_MAX`], or fewer for a small ring.
    pub fn seg_max(&self) -> u32 {
        SEG_MAX.min(u32::from(self.queue_size.saturating_sub(2).max(1)))
    }

    /// `struct virtio_blk_config` (little endian), with `writeback` as given.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put = |c: &mut [u8; CONFIG_LEN], at: usize, bytes: &[u8]| {
            c[at..at + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut c, 0, &(self.size / 512).to_le_bytes()); // capacity (sectors)
        put(&mut c, 8, &SIZE_MAX.to_le_bytes());
        put(&mut c, 12, &self.seg_max().to_le_bytes());
        put(&mut c, 20, &BLOCK_SIZE.to_le_bytes()); // blk_size
        c[32] = u8::from(writeback);
        put(&mut c, 34, &self.num_queues.to_le_bytes());
        put(&mut c, 36, &MAX_ZERO_SECTORS.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &MAX_ZERO_SEGMENTS.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_ZERO_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &MAX_ZERO_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let d = DeviceConfig {
            size: 1 << 30,
            num_queues: 3,
            queue_size: 256,
            read_only: true,
            serial: "x".into(),
            name: "x.sock".into(),
            pool: None,
        };
        let c = d.config_space(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        let size_max = u32::from_le_bytes(c[8..12].try_into().unwrap());
        let seg_max = u32::from_le_bytes(c[12..16].try_into().unwrap());
        assert_eq!((size_max, seg_max), (32 << 10, 128));
        assert_eq!(u64::from(size_max) * u64::from(seg_max), 4 << 20);
        assert_ne!(d.features() & (1 << VIRTIO_BLK_F_SIZE_MAX), 0);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
        assert_ne!(d.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(d.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    }
}
