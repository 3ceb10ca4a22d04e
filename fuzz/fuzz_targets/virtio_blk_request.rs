//! The virtio-blk request parser on arbitrary descriptor chains and guest memory contents:
//! every chain is answered (a status or nothing), no request reaches past the disk or the
//! request limit, and no borrowed buffer is wider than what was checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| addcow_daemon::vhost::request::fuzz_parse(data));
