//! The pre-shared keys file QEMU's `tls-creds-psk` (its folder's `keys.psk`), nbdkit's
//! `--tls-psk` and libnbd's `tls-psk-file` read: one `identity:hexkey` per line.
//!
//! Rules, as those tools apply them: an identity is non-empty and holds no `:`; a key is an even
//! number of hex digits (upper or lower case), at least one byte; empty lines are skipped. The
//! first entry of an identity wins (nbdkit's and GnuTLS's lookup), and a later duplicate is
//! refused here rather than silently ignored. The keys never appear in an error message or in
//! `Debug` output.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a PSK file was refused. Messages name the file and the line, never a key.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    /// The file could not be read.
    #[error("{}: reading the PSK file: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `identity:hexkey`.
    #[error("{}:{line}: {why} (each line is IDENTITY:HEXKEY)", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An identity appears twice.
    #[error("{}:{line}: identity {identity:?} appears twice", path.display())]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the second one.
        line: usize,
        /// The identity.
        identity: String,
    },
    /// No key at all.
    #[error("{}: the PSK file holds no key", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The keys of a PSK file, in file order.
#[derive(Clone, PartialEq, Eq)]
pub struct PskKeys {
    keys: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskKeys")
            .field("identities", &self.identities().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PskKeys {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<PskKeys, PskError> {
        let text = std::fs::read_to_string(path).map_err(|source| PskError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        PskKeys::parse(path, &text)
    }

    /// Parses the text of a PSK file (`path` only names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<PskKeys, PskError> {
        let bad = |line, why| PskError::Line {
            path: path.to_path_buf(),
            line,
            why,
        };
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim_end_matches('\r');
            if l.trim().is_empty() {
                continue;
            }
            let Some((id, hex)) = l.split_once(':') else {
                return Err(bad(line, "no ':' between identity and key"));
            };
            if id.is_empty() {
                return Err(bad(line, "empty identity"));
            }
            if hex.contains(':') {
                return Err(bad(line, "more than one ':'"));
            }
            let key = decode_hex(hex).ok_or_else(|| bad(line, "the key is not hex digits"))?;
            if key.is_empty() {
                return Err(bad(line, "empty key"));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(PskError::Duplicate {
                    path: path.to_path_buf(),
                    line,
                    identity: id.to_string(),
                });
            }
            keys.push((id.to_string(), key));
        }
        if keys.is_empty() {
            return Err(PskError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(PskKeys { keys })
    }

    /// The key of `identity`, if the file has one.
    pub fn get(&self, identity: &str) -> Option<&[u8]> {
        self.keys
            .iter()
            .find(|(id, _)| id == identity)
            .map(|(_, k)| k.as_slice())
    }

    /// The first entry (a client given no `tls-username` uses it, as libnbd does).
    pub fn first(&self) -> (&str, &[u8]) {
        let (id, k) = &self.keys[0];
        (id, k)
    }

    /// The identities, in file order.
    pub fn identities(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PskKeys, PskError> {
        PskKeys::parse(Path::new("keys.psk"), text)
    }

    #[test]
    fn reads_what_qemu_and_nbdkit_read() {
        let k = parse("alice:00ff10\r\n\nBob:ABCDEF\n").unwrap();
        assert_eq!(k.get("alice"), Some(&[0x00, 0xff, 0x10][..]));
        assert_eq!(k.get("Bob"), Some(&[0xab, 0xcd, 0xef][..]));
        assert_eq!(k.get("bob"), None, "identities are case-sensitive");
        assert_eq!(k.first().0, "alice");
        assert_eq!(k.identities().collect::<Vec<_>>(), ["alice", "Bob"]);
    }

    #[test]
    fn refuses_what_is_not_a_key_naming_the_line_but_never_the_key() {
        for (text, line, want) in [
            ("alice", 1, "no ':'"),
            ("\n:00", 2, "empty identity"),
            ("a:b:00", 1, "more than one ':'"),
            ("alice:0g", 1, "not hex"),
            ("alice:abc", 1, "not hex"),
            ("alice:", 1, "empty key"),
        ] {
            let e = parse(text).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(&format!("keys.psk:{line}:")), "{msg}");
            assert!(msg.contains(want), "{text:?}: {msg}");
        }
        let e = parse("alice:00\nalice:c0ffee11\n").unwrap_err().to_string();
        assert!(
            e.contains("keys.psk:2: identity \"alice\" appears twice"),
            "{e}"
        );
        assert!(!e.contains("c0ffee"), "{e}");
        assert!(parse("\n\n")
            .unwrap_err()
            .to_string()
            .contains("holds no key"));
        let k = parse("alice:deadbeef").unwrap();
        assert!(!format!("{k:?}").contains("deadbeef"), "{k:?}");
    }
}
