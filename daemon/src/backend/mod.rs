//! The engine seam: what the protocols need from a disk, and the disks that provide it.
//!
//! [`disk`]: the [`disk::Backend`] trait (size, submit, allocation, holes) and
//! [`disk::EngineDisk`], an engine disk switchable under its clients (live snapshot, resize);
//! [`fleece`]: a backup's point-in-time view as a read-only backend, and the backups running;
//! `memory`: `MemDisk`, the in-memory backend of the protocol tests and the fuzz harness
//! (`cfg(test)` or feature `fuzzing`); [`probe`]: where the files under a disk have holes, and
//! whether the raw image can punch them; [`files`]: the files an overlay's header names;
//! [`dirty`]: any backend plus dirty bitmaps to serve (a frozen one for a backup view).
//!
//! May import: [`crate::process`]. Never a protocol, transport or the host: both the NBD
//! layers and [`crate::vhost`] stand on this one.

pub mod dirty;
pub mod disk;
pub mod files;
pub mod fleece;
#[cfg(any(test, feature = "fuzzing"))]
pub mod memory;
pub mod probe;
