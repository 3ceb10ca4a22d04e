//! Embedding the engine: create an overlay over a base, start an engine, write (aligned and
//! not), flush, read back through the asynchronous API and the blocking helpers.
//!
//! Run with `cargo run -p addcow-engine --example embed`.

use std::sync::mpsc;

use addcow_engine::format::{create, CreateOptions};
use addcow_engine::{DiskOptions, Done, Engine, EngineConfig, Request};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![0xBB; 1 << 20])?;
    let overlay = dir.path().join("vm.add-cow");
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        ..CreateOptions::default()
    })?;

    let engine = Engine::start(EngineConfig {
        cores: 2,
        arena_bytes: 8 << 20,
        ..EngineConfig::default()
    })?;
    let disk = engine.open(&overlay, DiskOptions::default())?;
    println!(
        "opened {} ({} bytes) on {} cores",
        overlay.display(),
        disk.size(),
        engine.cores()
    );

    // Asynchronous: a buffer from the engine's registered arena, a completion that sends to a
    // channel.
    let (tx, rx) = mpsc::channel();
    let mut buf = engine.alloc_buf(4096);
    buf.fill(0x42);
    let tx2 = tx.clone();
    disk.submit(
        0,
        Request::Write {
            offset: 8192,
            data: buf.into(),
            fua: false,
        },
        Box::new(move |r| {
            let _ = tx2.send(r);
        }),
    );
    match rx.recv()? {
        Ok(Done::Written(_buf)) => println!("wrote 4096 bytes at 8192"),
        other => return Err(format!("write: {other:?}").into()),
    }

    // Blocking helpers: an unaligned write (read-modify-write over the base), then FLUSH.
    disk.write_at(100, b"hello, add-cow", false)?;
    disk.flush()?;

    disk.submit(
        1,
        Request::Read {
            offset: 0,
            len: 12288,
        },
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    let Ok(Done::Read(data)) = rx.recv()? else {
        return Err("read failed".into());
    };
    assert_eq!(&data[100..114], b"hello, add-cow");
    assert_eq!(data[99], 0xBB, "base bytes around the write are kept");
    assert!(data[8192..12288].iter().all(|&b| b == 0x42));
    for e in disk.allocation(0, 16384) {
        println!("{:>6} +{:<6} {:?}", e.offset, e.len, e.kind);
    }
    disk.close()?;
    engine.shutdown()?;
    println!("ok");
    Ok(())
}
