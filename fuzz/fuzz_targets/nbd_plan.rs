//! The request planner both NBD transports execute: arbitrary limits, request headers and
//! allocation maps; every plan must keep the planner's invariants (inside the export, nothing
//! written on a read-only export, costs bounded, holes from the map).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| addcow_daemon::conn::plan::fuzz_one(data));
