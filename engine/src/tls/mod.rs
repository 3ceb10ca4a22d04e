//! TLS credentials the NBD server (the daemon) and the NBD client (a remote base) share: the
//! PSK keys file. Setting up a TLS session itself lives with each side.

pub mod psk;

pub use psk::{PskError, PskKeys};
