//! The NBD protocol, both ends: [`wire`] holds every constant and the header encoders and
//! decoders (the daemon's server and the engine's remote-base client both use it); [`uri`]
//! parses the NBD URIs a backing path may name; [`client`] is the engine's client for a remote
//! base, and `tls` its TLS session (feature `tls`).

pub mod client;
#[cfg(feature = "tls")]
pub mod tls;
pub mod uri;
pub mod wire;
