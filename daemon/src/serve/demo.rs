//! The built-in demo of `addcow serve` with no overlay: a small base image with a recognizable
//! pattern and an overlay on it in `addcow-demo/`, created once and reused afterwards, plus the
//! client commands to try (printed exactly as they work).

use std::io::Write;
use std::path::{Path, PathBuf};

use addcow_engine::format::{create, CreateOptions};

use crate::error::{Error, ErrorKind, Result, Source};

/// The demo directory, relative to the working directory.
pub const DEMO_DIR: &str = "addcow-demo";
/// The demo socket, relative to the working directory.
pub const DEMO_SOCKET: &str = "addcow.sock";
/// Bytes of the demo base, every one `BASE_BYTE`.
pub const BASE_SIZE: u64 = 16 << 20;
/// The base's fill byte.
pub const BASE_BYTE: u8 = 0xab;
/// Virtual size of the demo overlay (past the base it reads as zeros).
pub const DISK_SIZE: u64 = 64 << 20;

/// Creates `dir/base.raw` and `dir/disk.add-cow` (+ `disk.raw`) unless the overlay exists;
/// returns the overlay's path.
pub fn prepare(dir: &Path) -> Result<PathBuf> {
    let failed = |path: &Path, e: Source| {
        Error::new(ErrorKind::Demo)
            .with_context(path.display().to_string())
            .with_source(e)
    };
    let overlay = dir.join("disk.add-cow");
    if overlay.exists() {
        return Ok(overlay);
    }
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e.into()))?;
    let base = dir.join("base.raw");
    let write_base = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&base)?;
        let block = vec![BASE_BYTE; 1 << 20];
        for _ in 0..BASE_SIZE / block.len() as u64 {
            f.write_all(&block)?;
        }
        f.sync_all()
    };
    write_base().map_err(|e| failed(&base, e.into()))?;
    create(&CreateOptions {
        overlay: overlay.clone(),
        base: Some(base),
        image: Some(dir.join("disk.raw")),
        size: Some(DISK_SIZE),
        force: false,
    })
    .map_err(|e| Error::new(ErrorKind::Demo).with_source(e))?;
    Ok(overlay)
}

/// Single-quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The commands to try against the demo socket, one shell command line each.
pub fn commands(socket: &Path) -> Vec<String> {
    let uri = shell_quote(&format!("nbd+unix:///?socket={}", socket.display()));
    vec![
        format!("qemu-img info {uri}"),
        format!("nbdinfo {uri}"),
        format!("nbdinfo --map {uri}"),
        format!("nbdinfo --map=qemu:allocation-depth {uri}"),
        format!(
            "qemu-io -f raw -c 'read -P 0x{BASE_BYTE:x} 0 1M' -c 'write -P 0x5a 1M 64k' \
             -c 'read -P 0x5a 1M 64k' -c 'read -P 0 32M 1M' -c flush {uri}"
        ),
        format!("qemu-img map -f raw --output=json {uri}"),
    ]
}

/// The text printed when the demo is ready.
pub fn banner(overlay: &Path, socket: &Path) -> String {
    let mut s = format!(
        "addcow demo: serving {} on {}\n  {} MiB disk; its first {} MiB come from base.raw \
         (every byte 0x{:x}), the rest reads as zeros; writes land in disk.raw.\n\
         Try, from another terminal:\n",
        overlay.display(),
        socket.display(),
        DISK_SIZE >> 20,
        BASE_SIZE >> 20,
        BASE_BYTE
    );
    for c in commands(socket) {
        s.push_str("  $ ");
        s.push_str(&c);
        s.push('\n');
    }
    s.push_str("Stop with Ctrl-C (finishes requests and commits the overlay).\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_quote_the_uri() {
        let c = commands(Path::new("/tmp/a b/addcow.sock"));
        assert_eq!(
            c[0],
            "qemu-img info 'nbd+unix:///?socket=/tmp/a b/addcow.sock'"
        );
        assert!(c.iter().all(|l| l.contains("socket=/tmp/a b/addcow.sock'")));
        let b = banner(Path::new("x"), Path::new("/s"));
        assert_eq!(b.lines().filter(|l| l.starts_with("  $ ")).count(), c.len());
    }
}
