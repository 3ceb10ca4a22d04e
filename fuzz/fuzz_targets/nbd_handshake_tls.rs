//! The NBD handshake under a TLS policy (off / on / require, from the first byte) on arbitrary
//! client bytes, up to the STARTTLS acknowledgement and the haggling after it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| addcow_daemon::serve::harness::handshake_tls(data));
