//! The control socket's JSON-RPC handling on arbitrary lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| addcow_daemon::serve::harness::control_line(data));
