//! The remote base's reply parsing on arbitrary server bytes: reply headers and the chunks of a
//! read, placed into the read's buffer. The first 8 bytes give where the read starts, the next
//! 2 its length; the rest is what the server sends. Nothing a server sends may panic.
#![no_main]

use addcow_engine::nbd::client::{self, ReplyHeader};
use libfuzzer_sys::fuzz_target;
use std::io::Read;

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let start = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
    let len = usize::from(u16::from_be_bytes([data[8], data[9]]));
    let mut buf = vec![0u8; len];
    let mut s = &data[10..];
    for _ in 0..64 {
        match client::read_reply_header(&mut s) {
            Ok(ReplyHeader::Simple { error, .. }) => {
                if error == 0 && s.read_exact(&mut buf).is_err() {
                    return;
                }
            }
            Ok(ReplyHeader::Chunk(c)) => {
                if client::read_chunk_into(&mut s, &c, start, &mut buf).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
});
