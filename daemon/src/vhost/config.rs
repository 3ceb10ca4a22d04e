//! The virtio-blk device description a frontend negotiates: feature bits and the config space.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

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
}

impl DeviceConfig {
    /// Device feature bits offered: virtio 1.0, event index, indirect descriptors, and the
    /// virtio-blk features this backend serves.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
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

    /// `struct virtio_blk_config` (little endian), with `writeback` as given.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let put = |c: &mut [u8; CONFIG_LEN], at: usize, bytes: &[u8]| {
            c[at..at + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut c, 0, &(self.size / 512).to_le_bytes()); // capacity (sectors)
                                                          // size_max (8) stays 0: VIRTIO_BLK_F_SIZE_MAX is not offered.
        let seg_max = u32::from(self.queue_size.saturating_sub(2).max(1));
        put(&mut c, 12, &seg_max.to_le_bytes());
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
        };
        let c = d.config_space(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
        assert_ne!(d.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(d.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    }
}
