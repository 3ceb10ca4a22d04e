//! Files owned by one daemon at a time: an open file description lock (`F_OFD_SETLK`) held for
//! the daemon's lifetime, taken on a file that is checked, after locking, to still be the one
//! at the path (so a file removed and recreated meanwhile is never "owned" twice). The owner
//! removes the file when it lets go; a file left by a killed daemon is unlocked and taken over.
//!
//! Used for the pid file (`--pid-file`) and for the lock beside each Unix socket the daemon
//! binds (`PATH.lock`), which keeps two daemons starting together from both binding it.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A locked file at a path, removed when dropped.
#[derive(Debug)]
pub struct LockedFile {
    file: File,
    path: PathBuf,
}

/// Why a lock file could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock; `holder` is what the file says (a pid file's pid).
    #[error("{}: held by another running process{}", path.display(), holder.as_deref().map(|h| format!(" (pid {h})")).unwrap_or_default())]
    Held {
        /// The file.
        path: PathBuf,
        /// Its contents, trimmed, when they are short and printable.
        holder: Option<String>,
    },
    /// A system call failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl LockedFile {
    /// Opens (creating it, mode 0644, never through a symlink) and locks the file at `path`.
    pub fn acquire(path: &Path) -> Result<LockedFile, LockError> {
        let io_err = |what, source| LockError::Io {
            path: path.to_path_buf(),
            what,
            source,
        };
        for _ in 0..16 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| io_err("open", e))?;
            if !try_lock(&file).map_err(|e| io_err("lock", e))? {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let t = text.trim();
                let holder =
                    (!t.is_empty() && t.len() <= 32 && t.chars().all(|c| c.is_ascii_graphic()))
                        .then(|| t.to_string());
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    holder,
                });
            }
            // Locked; but is it still the file at the path? (Its owner may have removed it
            // between our open and our lock.)
            let ours = file.metadata().map_err(|e| io_err("stat", e))?;
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {
                    return Ok(LockedFile {
                        file,
                        path: path.to_path_buf(),
                    })
                }
                _ => continue,
            }
        }
        Err(io_err(
            "lock",
            io::Error::other("the file keeps being replaced"),
        ))
    }

    /// Replaces the file's contents with `text`.
    pub fn write(&mut self, text: &str) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())?;
        self.file.sync_all()
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LockedFile {
    fn drop(&mut self) {
        // Still locked: nobody else can own this file now. Remove it only if it is ours.
        if let (Ok(ours), Ok(m)) = (self.file.metadata(), std::fs::symlink_metadata(&self.path)) {
            if m.dev() == ours.dev() && m.ino() == ours.ino() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Takes a write lock on the whole of `f`; false when another open file description holds one.
fn try_lock(f: &File) -> io::Result<bool> {
    use addcow_engine::sys::{ofd_try_lock, LockKind, LockRange};
    ofd_try_lock(f, LockKind::Exclusive, LockRange::WHOLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_at_a_time_and_only_the_owner_removes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pid");
        let mut a = LockedFile::acquire(&p).unwrap();
        a.write("1234\n").unwrap();
        match LockedFile::acquire(&p) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder.as_deref(), Some("1234")),
            other => panic!("second owner: {other:?}"),
        }
        // Someone replaces the file: its owner no longer removes the new one.
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, "other\n").unwrap();
        drop(a);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "other\n");
        // An unlocked file (left by a killed owner) is taken over, then removed by its owner.
        let b = LockedFile::acquire(&p).unwrap();
        drop(b);
        assert!(!p.exists());
        // Never through a symlink.
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, &p).unwrap();
        assert!(LockedFile::acquire(&p).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
