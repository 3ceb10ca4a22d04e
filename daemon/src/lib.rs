//! The `addcow serve` daemon as a library: the NBD server, the control socket and what they are
//! made of. The `addcow` binary runs it ([`serve::run`]); fuzz targets drive its parsers
//! directly (feature `fuzzing`, which also builds the in-memory test backend). [`stream`] is the
//! copy-up loop that `addcow stream` and the control socket's stream job share.

pub mod serve;
pub mod stream;
pub mod vhost;
