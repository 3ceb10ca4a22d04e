//! The NBD handshake (client flags and option haggling) on arbitrary client bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| addcow_daemon::serve::harness::handshake(data));
