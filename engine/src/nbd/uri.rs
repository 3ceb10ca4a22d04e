//! NBD URIs as a backing path: `nbd+unix:///NAME?socket=PATH` and `nbd://HOST[:PORT]/NAME`
//! (the forms qemu and libnbd accept, without TLS or authentication).
//!
//! A URI is stored in the overlay's header unchanged and is never resolved against a folder:
//! [`NbdUri::text`] is exactly what was parsed.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, ErrorKind, Result};

/// The NBD port when a `nbd://` URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the image server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP host (name or address) and port.
    Tcp { host: String, port: u16 },
}

/// A parsed NBD URI: the server's address and the export's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server's address.
    pub addr: NbdAddr,
    /// The export name (may be empty: the server's default export).
    pub export: String,
    /// The URI as given (what is stored and shown).
    pub text: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether `path` is written as an NBD URI (it may still be malformed: [`NbdUri::parse`]).
pub fn is_nbd_uri(path: &[u8]) -> bool {
    path.starts_with(b"nbd://")
        || path.starts_with(b"nbd+unix://")
        || path.starts_with(b"nbd+tcp://")
}

fn bad(uri: &str, why: impl Into<String>) -> Error {
    Error::new(ErrorKind::BadUri {
        uri: uri.to_string(),
        why: why.into(),
    })
}

/// Decodes `%XX` escapes.
fn unescape(uri: &str, s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(uri, "a '%' escape is not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(uri, "escapes decode to invalid UTF-8"))
}

impl NbdUri {
    /// Parses an NBD URI. Anything that is not one of the two forms (another scheme, TLS
    /// `nbds://`, a Unix URI without `socket=`, a TCP URI without a host, unknown query
    /// parameters) is an error that names the problem.
    pub fn parse(text: &str) -> Result<NbdUri> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| bad(text, "not a URI (no \"://\")"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err(bad(text, "a fragment ('#') is not allowed"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let export = unescape(text, path.strip_prefix('/').unwrap_or(path))?;
        let mut socket = None;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|s| !s.is_empty())
        {
            match kv.split_once('=') {
                Some(("socket", v)) if !v.is_empty() => socket = Some(unescape(text, v)?),
                _ => return Err(bad(text, format!("unsupported query parameter {kv:?}"))),
            }
        }
        let addr = match scheme {
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        text,
                        "a Unix-socket URI has no host (nbd+unix:///NAME?socket=PATH)",
                    ));
                }
                let socket = socket.ok_or_else(|| bad(text, "missing ?socket=PATH"))?;
                NbdAddr::Unix(PathBuf::from(socket))
            }
            "nbd" | "nbd+tcp" => {
                if socket.is_some() {
                    return Err(bad(text, "socket= belongs to nbd+unix:// URIs"));
                }
                let (host, port) = split_host_port(text, authority)?;
                NbdAddr::Tcp { host, port }
            }
            "nbds" | "nbds+unix" | "nbds+tcp" => {
                return Err(bad(text, "TLS (nbds) is not supported"));
            }
            _ => {
                return Err(Error::new(ErrorKind::UnsupportedProtocol {
                    field: "backing_file",
                    path: text.to_string(),
                }))
            }
        };
        Ok(NbdUri {
            addr,
            export,
            text: text.to_string(),
        })
    }
}

fn split_host_port(uri: &str, authority: &str) -> Result<(String, u16)> {
    if authority.contains('@') {
        return Err(bad(uri, "user information is not supported"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| bad(uri, "unclosed '[' in the host"))?;
        (h, tail.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad(uri, "no host (nbd://HOST[:PORT]/NAME)"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad(uri, format!("bad port {p:?}")))?,
    };
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_and_tcp_forms_parse() {
        let u = NbdUri::parse("nbd+unix:///base?socket=/run/img.sock").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/run/img.sock".into()));
        assert_eq!(u.export, "base");
        let u = NbdUri::parse("nbd+unix://?socket=/s%20x").unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/s x".into()));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://127.0.0.1:10810/golden%2Fubuntu").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "golden/ubuntu");
        let u = NbdUri::parse("nbd://[::1]/x").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.to_string(), "nbd://[::1]/x");
    }

    #[test]
    fn malformed_uris_say_why() {
        for (uri, why) in [
            ("nbd+unix:///x", "missing ?socket"),
            ("nbd+unix://host/x?socket=/s", "has no host"),
            ("nbd:///x", "no host"),
            ("nbd://h:99999/x", "bad port"),
            ("nbd://h/x?socket=/s", "belongs to nbd+unix"),
            ("nbd+unix:///x?socket=/s&tls=on", "unsupported query"),
            ("nbds://h/x", "TLS"),
            ("nbd://h/%zz", "hex digits"),
        ] {
            let e = NbdUri::parse(uri).unwrap_err();
            assert!(matches!(e.kind(), ErrorKind::BadUri { .. }), "{uri}: {e}");
            assert!(e.to_string().contains(why), "{uri}: {e}");
        }
        let e = NbdUri::parse("http://x/y").unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::UnsupportedProtocol { .. }),
            "{e}"
        );
    }
}
