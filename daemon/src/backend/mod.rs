//! The engine seam: what the protocols need from a disk.
//!
//! [`probe`]: where the files under a disk have holes, and whether the raw image can punch them.
//!
//! May import: [`crate::process`]. Never a protocol, transport or the host: both the NBD
//! layers and [`crate::vhost`] stand on this one.

pub mod probe;
