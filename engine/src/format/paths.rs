//! Path rules: stored paths are relative to the `.add-cow` file's directory; a backing path may
//! be an NBD URI, any other protocol prefix is refused.
//!
//! * A stored path that is absolute is used as is.
//! * A stored relative path is relative to the directory holding the `.add-cow` file, not to the
//!   process's working directory, so an overlay keeps working when its folder is moved.
//! * A `backing_file` that is an NBD URI (`nbd://HOST[:PORT]/NAME`,
//!   `nbd+unix:///NAME?socket=PATH`, their TLS forms `nbds://`, `nbds+unix://`; see
//!   [`crate::nbd::uri`]) is stored and returned unchanged:
//!   it is never joined to a folder.
//! * Any other path that starts with a protocol prefix (`nbd:`, `http:`, ...; the rule is
//!   qemu's: the text before the first `:` contains no `/`), and a URI as `image_file`, is
//!   refused with [`ErrorKind::UnsupportedProtocol`].
//! * [`storage_path`] turns a path as a user typed it (relative to the working directory) into the
//!   path to store (relative to the overlay's directory).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::nbd::uri::{is_nbd_uri, NbdUri};

/// The NBD URI `path` names, if it is one (a path that merely looks like one is an error).
pub fn nbd_uri(path: &Path) -> Result<Option<NbdUri>> {
    let b = path.as_os_str().as_bytes();
    if !is_nbd_uri(b) {
        return Ok(None);
    }
    refuse_protocol("backing_file", b)?;
    Ok(Some(NbdUri::parse(&String::from_utf8_lossy(b))?))
}

/// Whether `path` starts with a protocol prefix such as `nbd:` or `http://`: some bytes, none of
/// them `/`, then `:`. (The same test as qemu's `path_has_protocol`.)
pub fn has_protocol(path: &[u8]) -> bool {
    match path.iter().position(|&b| b == b':' || b == b'/') {
        Some(i) => path.get(i) == Some(&b':') && i > 0,
        None => false,
    }
}

/// Refuses a path that names a protocol, except an NBD URI as `backing_file` (which must parse).
/// `field` is `"backing_file"` or `"image_file"`.
pub fn refuse_protocol(field: &'static str, path: &[u8]) -> Result<()> {
    if field == "backing_file" && is_nbd_uri(path) {
        let text = std::str::from_utf8(path).map_err(|_| {
            Error::new(ErrorKind::BadUri {
                uri: String::from_utf8_lossy(path).into_owned(),
                why: "not UTF-8".into(),
            })
        })?;
        NbdUri::parse(text)?;
        return Ok(());
    }
    if has_protocol(path) {
        return Err(Error::new(ErrorKind::UnsupportedProtocol {
            field,
            path: String::from_utf8_lossy(path).into_owned(),
        }));
    }
    Ok(())
}

/// Resolves a stored path against the overlay at `meta_path`: absolute paths as they are,
/// relative ones joined to `meta_path`'s directory, an NBD URI (`backing_file` only) unchanged.
/// Refuses other protocol prefixes.
pub fn resolve(meta_path: &Path, field: &'static str, stored: &[u8]) -> Result<PathBuf> {
    refuse_protocol(field, stored)?;
    let stored = Path::new(OsStr::from_bytes(stored));
    if is_nbd_uri(stored.as_os_str().as_bytes()) {
        return Ok(stored.to_path_buf());
    }
    if stored.is_absolute() {
        return Ok(stored.to_path_buf());
    }
    let dir = meta_path.parent().unwrap_or(Path::new(""));
    Ok(dir.join(stored))
}

/// The path to store in the header for `target`, a path as the user gave it (relative to the
/// working directory), for an overlay at `overlay` (also as given).
///
/// An absolute `target` is stored as given. A relative one is stored relative to the overlay's
/// directory: both directories are made canonical (they must exist) and the stored path climbs
/// out of the overlay's directory with `..` as needed.
pub fn storage_path(overlay: &Path, target: &Path) -> Result<PathBuf> {
    if target.is_absolute() || is_nbd_uri(target.as_os_str().as_bytes()) {
        return Ok(target.to_path_buf());
    }
    let overlay_dir = canonical_dir(overlay)?;
    let target_dir = canonical_dir(target)?;
    let name = target.file_name().ok_or_else(|| {
        Error::new(ErrorKind::InvalidArgument(format!(
            "{} does not name a file",
            target.display()
        )))
    })?;
    let mut rel = relative_dir(&overlay_dir, &target_dir);
    rel.push(name);
    Ok(rel)
}

/// The canonical form of the directory that holds `file`.
fn canonical_dir(file: &Path) -> Result<PathBuf> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    dir.canonicalize()
        .map_err(|e| Error::io("resolve directory", e).with_path(dir.to_path_buf()))
}

/// The relative path that leads from directory `from` to directory `to` (both canonical).
fn relative_dir(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    let common = from
        .iter()
        .zip(to.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in to.iter().skip(common) {
        rel.push(c.as_os_str());
    }
    rel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_prefixes_are_detected() {
        for p in [
            &b"nbd:localhost:10809"[..],
            b"nbd+unix:///?socket=/s",
            b"http://x/y.img",
            b"https://x",
            b"file:foo.img",
        ] {
            assert!(has_protocol(p), "{}", String::from_utf8_lossy(p));
        }
        for p in [
            &b"base.img"[..],
            b"/abs/base.img",
            b"./a:b.img",
            b"dir/x:y",
            b":leading",
            b"",
        ] {
            assert!(!has_protocol(p), "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn refuse_protocol_gives_kind() {
        let e = refuse_protocol("backing_file", b"nbd:host:1").unwrap_err();
        assert_eq!(
            e.kind(),
            &ErrorKind::UnsupportedProtocol {
                field: "backing_file",
                path: "nbd:host:1".into()
            }
        );
        assert!(e.to_string().contains("unsupported protocol"));
    }

    #[test]
    fn resolve_relative_to_overlay_dir() {
        let meta = Path::new("/vms/a/disk.add-cow");
        assert_eq!(
            resolve(meta, "image_file", b"disk.raw").unwrap(),
            Path::new("/vms/a/disk.raw")
        );
        assert_eq!(
            resolve(meta, "backing_file", b"../base/u.img").unwrap(),
            Path::new("/vms/a/../base/u.img")
        );
        assert_eq!(
            resolve(meta, "backing_file", b"/abs/u.img").unwrap(),
            Path::new("/abs/u.img")
        );
        // An overlay named without a directory resolves against the working directory.
        assert_eq!(
            resolve(Path::new("disk.add-cow"), "image_file", b"disk.raw").unwrap(),
            Path::new("disk.raw")
        );
        assert!(resolve(meta, "image_file", b"http://x").is_err());
        // An NBD URI is never joined to a folder; as image_file it is refused.
        let uri = b"nbd+unix:///base?socket=rel/s.sock";
        assert_eq!(
            resolve(meta, "backing_file", uri).unwrap(),
            Path::new("nbd+unix:///base?socket=rel/s.sock")
        );
        assert!(resolve(meta, "image_file", uri).is_err());
        assert!(resolve(meta, "backing_file", b"nbd+unix:///base").is_err());
        assert!(resolve(meta, "backing_file", b"nbd:localhost:10809").is_err());
        assert_eq!(
            storage_path(Path::new("x.add-cow"), Path::new("nbd://127.0.0.1/b")).unwrap(),
            Path::new("nbd://127.0.0.1/b")
        );
        // The TLS forms too, their relative credential paths kept as written.
        for uri in [
            "nbds://img:10809/b?tls-certificates=pki",
            "nbds+unix:///b?socket=/s&tls-psk-file=k.psk",
        ] {
            assert_eq!(
                resolve(meta, "backing_file", uri.as_bytes()).unwrap(),
                Path::new(uri)
            );
            assert_eq!(
                storage_path(Path::new("x.add-cow"), Path::new(uri)).unwrap(),
                Path::new(uri)
            );
        }
        assert!(resolve(meta, "backing_file", b"nbds://img/b?tls-certificates=").is_err());
    }

    #[test]
    fn relative_dir_climbs() {
        assert_eq!(
            relative_dir(Path::new("/a/b/c"), Path::new("/a/d")),
            Path::new("../../d")
        );
        assert_eq!(
            relative_dir(Path::new("/a"), Path::new("/a")),
            Path::new("")
        );
        assert_eq!(
            relative_dir(Path::new("/a"), Path::new("/a/x/y")),
            Path::new("x/y")
        );
    }

    #[test]
    fn storage_path_relative_to_overlay_dir() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("vms/a")).unwrap();
        std::fs::create_dir_all(root.join("base")).unwrap();
        let overlay = root.join("vms/a/x.add-cow");
        // Absolute stays absolute.
        let abs = root.join("base/u.img");
        assert_eq!(storage_path(&overlay, &abs).unwrap(), abs);
        // Relative (to the working directory) becomes relative to the overlay's directory. Use
        // paths relative to `root` by going through a relative path from the cwd.
        let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
        let rel_base = relative_dir(&cwd, &root.join("base")).join("u.img");
        let rel_overlay = relative_dir(&cwd, &root.join("vms/a")).join("x.add-cow");
        assert_eq!(
            storage_path(&rel_overlay, &rel_base).unwrap(),
            Path::new("../../base/u.img")
        );
        let rel_img = relative_dir(&cwd, &root.join("vms/a")).join("x.raw");
        assert_eq!(
            storage_path(&rel_overlay, &rel_img).unwrap(),
            Path::new("x.raw")
        );
        // A directory that does not exist is an error with the path in it.
        let e = storage_path(&overlay, Path::new("no/such/dir/f")).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::NotFound);
    }
}
