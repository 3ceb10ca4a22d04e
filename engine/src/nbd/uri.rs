//! NBD URIs as a backing path: `nbd+unix:///NAME?socket=PATH` and `nbd://HOST[:PORT]/NAME`
//! (the forms qemu and libnbd accept), and their TLS forms `nbds+unix://` and `nbds://`.
//!
//! A TLS URI takes libnbd's query parameters for its credentials ([`TlsParams`]):
//! `tls-certificates=DIR` (x509: `DIR/ca-cert.pem` is the only CA trusted, `client-cert.pem` /
//! `client-key.pem` are presented when both are there, `ca-crl.pem` is checked when there) or
//! `tls-psk-file=FILE` (TLS-PSK, the `identity:hexkey` file), `tls-username=NAME` (the PSK
//! identity; libnbd's `nbds://NAME@HOST/` user part is taken too) and `tls-hostname=NAME` (the
//! name the server's certificate must carry, instead of the URI's host). Neither credential
//! given: x509 against the system's trusted CAs. A `tls-*` parameter on a plain `nbd://` URI is
//! refused (it would be silently unencrypted).
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

/// What a TLS URI (`nbds://`, `nbds+unix://`) asks for: the session is TLS or nothing (a
/// server that refuses `NBD_OPT_STARTTLS` is an error, never a plain connection).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsParams {
    /// `tls-certificates=DIR`: x509 credentials in GnuTLS's (QEMU's, libnbd's) layout. `None`
    /// (and no `psk_file`): the server's certificate is checked against the system's CAs.
    pub certificates: Option<PathBuf>,
    /// `tls-psk-file=FILE`: TLS-PSK with a key of this file (no certificates then).
    pub psk_file: Option<PathBuf>,
    /// `tls-username=NAME` (or the URI's user part): the PSK identity. `None`: the file's
    /// first identity.
    pub username: Option<String>,
    /// `tls-hostname=NAME`: the name the server's certificate must carry. `None`: the URI's
    /// host for TCP; for a Unix socket, no name is checked (the certificate must still be
    /// signed by the trusted CA).
    pub hostname: Option<String>,
}

/// A parsed NBD URI: the server's address and the export's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// The server's address.
    pub addr: NbdAddr,
    /// The export name (may be empty: the server's default export).
    pub export: String,
    /// TLS (`nbds` schemes) and its credentials; `None`: plain NBD.
    pub tls: Option<TlsParams>,
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
    [
        &b"nbd://"[..],
        b"nbd+unix://",
        b"nbd+tcp://",
        b"nbds://",
        b"nbds+unix://",
        b"nbds+tcp://",
    ]
    .iter()
    .any(|p| path.starts_with(p))
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
    /// Parses an NBD URI. Anything that is not one of the forms (another scheme, a Unix URI
    /// without `socket=`, a TCP URI without a host, unknown query parameters, TLS parameters
    /// on a plain URI, both x509 and PSK credentials) is an error that names the problem.
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
        let mut tls = TlsParams::default();
        let mut tls_given = None;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|s| !s.is_empty())
        {
            let slot = match kv.split_once('=') {
                Some((k, v)) if !v.is_empty() => match k {
                    "socket" => {
                        socket = Some(unescape(text, v)?);
                        continue;
                    }
                    "tls-certificates" => {
                        tls.certificates = Some(PathBuf::from(unescape(text, v)?));
                        k
                    }
                    "tls-psk-file" => {
                        tls.psk_file = Some(PathBuf::from(unescape(text, v)?));
                        k
                    }
                    "tls-username" => {
                        tls.username = Some(unescape(text, v)?);
                        k
                    }
                    "tls-hostname" => {
                        tls.hostname = Some(unescape(text, v)?);
                        k
                    }
                    _ => return Err(bad(text, format!("unsupported query parameter {kv:?}"))),
                },
                _ => return Err(bad(text, format!("unsupported query parameter {kv:?}"))),
            };
            tls_given.get_or_insert(slot);
        }
        let is_tls = matches!(scheme, "nbds" | "nbds+unix" | "nbds+tcp");
        if let (false, Some(k)) = (is_tls, tls_given) {
            return Err(bad(
                text,
                format!("{k}= belongs to TLS URIs (nbds:// or nbds+unix://)"),
            ));
        }
        if tls.certificates.is_some() && tls.psk_file.is_some() {
            return Err(bad(
                text,
                "tls-certificates= and tls-psk-file= exclude each other",
            ));
        }
        // A Unix socket has no host name: with neither a CA of the operator's own, a name to
        // check nor a key, any certificate a public CA signed would do, which authenticates
        // nothing.
        if scheme == "nbds+unix"
            && tls.certificates.is_none()
            && tls.hostname.is_none()
            && tls.psk_file.is_none()
        {
            return Err(bad(
                text,
                "an nbds+unix URI needs tls-certificates=DIR (the CA to trust), \
                 tls-hostname=NAME (the name the server's certificate must carry) or \
                 tls-psk-file=FILE",
            ));
        }
        // libnbd's form of the PSK identity: `nbds://alice@host/`, `nbds+unix://alice@/`.
        let authority = match authority.rsplit_once('@') {
            Some((user, host)) if is_tls && !user.is_empty() => {
                let user = unescape(text, user)?;
                if tls.username.as_ref().is_some_and(|u| *u != user) {
                    return Err(bad(
                        text,
                        "the user part and tls-username= name different identities",
                    ));
                }
                tls.username = Some(user);
                host
            }
            _ => authority,
        };
        let addr = match scheme {
            "nbd+unix" | "nbds+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        text,
                        "a Unix-socket URI has no host (nbd+unix:///NAME?socket=PATH)",
                    ));
                }
                let socket = socket.ok_or_else(|| bad(text, "missing ?socket=PATH"))?;
                NbdAddr::Unix(PathBuf::from(socket))
            }
            "nbd" | "nbd+tcp" | "nbds" | "nbds+tcp" => {
                if socket.is_some() {
                    return Err(bad(
                        text,
                        "socket= belongs to nbd+unix:// and nbds+unix:// URIs",
                    ));
                }
                let (host, port) = split_host_port(text, authority)?;
                NbdAddr::Tcp { host, port }
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
            tls: is_tls.then_some(tls),
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
    use std::path::Path;

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
        assert_eq!(u.tls, None);
    }

    #[test]
    fn tls_forms_parse_with_libnbds_parameters() {
        let u = NbdUri::parse("nbds://img.example:10810/golden?tls-certificates=/etc/pki/x%20y")
            .unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "img.example".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "golden");
        assert_eq!(
            u.tls,
            Some(TlsParams {
                certificates: Some("/etc/pki/x y".into()),
                ..TlsParams::default()
            })
        );
        // No credentials: TLS against the system's CAs.
        let u = NbdUri::parse("nbds://h/").unwrap();
        assert_eq!(u.tls, Some(TlsParams::default()));
        let u =
            NbdUri::parse("nbds+unix:///b?socket=/run/s.sock&tls-psk-file=/k.psk&tls-username=vm1")
                .unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/run/s.sock".into()));
        let t = u.tls.unwrap();
        assert_eq!(t.psk_file.as_deref(), Some(Path::new("/k.psk")));
        assert_eq!(t.username.as_deref(), Some("vm1"));
        // libnbd's user part names the PSK identity.
        let u = NbdUri::parse("nbds+unix://alice@/?socket=/s&tls-psk-file=/k").unwrap();
        assert_eq!(u.tls.unwrap().username.as_deref(), Some("alice"));
        let u = NbdUri::parse("nbds://bob@[::1]:99/x?tls-hostname=img").unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        let t = u.tls.unwrap();
        assert_eq!(t.username.as_deref(), Some("bob"));
        assert_eq!(t.hostname.as_deref(), Some("img"));
        assert!(is_nbd_uri(b"nbds://h/x") && is_nbd_uri(b"nbds+unix:///?socket=/s"));
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
            ("nbd://h/x?tls-certificates=/c", "belongs to TLS URIs"),
            (
                "nbd+unix:///x?socket=/s&tls-psk-file=/k",
                "belongs to TLS URIs",
            ),
            (
                "nbds://h/x?tls-certificates=/c&tls-psk-file=/k",
                "exclude each other",
            ),
            ("nbds://h/x?tls-certificates=", "unsupported query"),
            ("nbds://h/x?socket=/s", "belongs to nbd+unix"),
            ("nbds+unix:///x?tls-hostname=h", "missing ?socket"),
            (
                "nbds+unix:///x?socket=/s",
                "an nbds+unix URI needs tls-certificates=DIR",
            ),
            ("nbds://a@h/x?tls-username=b", "different identities"),
            ("nbd://alice@h/x", "user information"),
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
