//! NBD request headers, their validation, and a whole connection (reader, engine seam, writer)
//! on arbitrary request streams.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| addcow_daemon::serve::harness::transmission(data));
