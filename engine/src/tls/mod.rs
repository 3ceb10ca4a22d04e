//! TLS credentials the NBD server (the daemon) and the NBD client (a remote base) share: the
//! PSK keys file. Setting up a TLS session itself lives with each side: the client's (a remote
//! base over `nbds://`) is `nbd::tls`, present with the `tls` feature (on by default).

pub mod psk;

pub use psk::{PskError, PskKeys};
