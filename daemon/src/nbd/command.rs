//! Validation of transmission requests: a decoded header plus what the connection negotiated
//! becomes either a [`Command`] to run or a [`Rejection`] with the spec's error.
//!
//! Pure functions, no I/O; the rules (in the order checked):
//! 1. unknown command type → `EINVAL`;
//! 2. flags not valid for the command (or `DF` without structured replies) → `EINVAL`;
//! 3. a WRITE payload over the maximum block size closes the connection (it cannot be drained
//!    cheaply); a READ over it → `EINVAL`;
//! 4. writes of any kind on a read-only export → `EPERM`;
//! 5. ranges past the end → `ENOSPC` for WRITE/WRITE_ZEROES, `EINVAL` otherwise;
//! 6. BLOCK_STATUS without a negotiated meta context or with length 0 → `EINVAL`;
//! 7. WRITE_ZEROES with `FAST_ZERO` that cannot be done by punching holes alone (no hole
//!    punching on the raw image, `NO_HOLE`, or a range not aligned to the unit the engine
//!    zeroes in) → `ENOTSUP`, at once, with nothing changed.
//!
//! With extended headers a command other than WRITE that sets `PAYLOAD_LEN` has its payload
//! drained and is refused; a WRITE carries its payload with or without the flag (QEMU 10 does
//! not set it).

use super::handshake::MetaContexts;
use super::wire::{self, RequestHeader};

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes; `df`: send one data chunk, no holes.
    Read { offset: u64, len: u32, df: bool },
    /// Write the `len`-byte payload that follows the header.
    Write { offset: u64, len: u32, fua: bool },
    /// Finish outstanding requests and close.
    Disc,
    /// Make every answered write durable.
    Flush,
    /// Discard a range.
    Trim { offset: u64, len: u64, fua: bool },
    /// Prefetch hint.
    Cache { offset: u64, len: u64 },
    /// Zero a range; `punch`: may deallocate; `fast`: the client asked for FAST_ZERO.
    WriteZeroes {
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
        fast: bool,
    },
    /// Report allocation; `req_one`: exactly one extent.
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
}

impl Command {
    /// A zero-length WRITE, TRIM, CACHE or WRITE_ZEROES: it changes nothing, so it is answered
    /// OK without the engine (whichever way the connection is served).
    pub fn changes_nothing(&self) -> bool {
        match *self {
            Command::Write { len, .. } => len == 0,
            Command::Trim { len, .. }
            | Command::Cache { len, .. }
            | Command::WriteZeroes { len, .. } => len == 0,
            _ => false,
        }
    }
}

/// A request that gets an error reply (or closes the connection when `fatal`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// NBD error value.
    pub error: u32,
    /// Why, for the error chunk and the log.
    pub message: String,
    /// Payload bytes that follow the header and must be read and discarded.
    pub drain: u32,
    /// The connection cannot go on (the stream can no longer be trusted).
    pub fatal: bool,
}

/// What a connection negotiated that affects validation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Export is read-only.
    pub read_only: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Selected meta contexts.
    pub contexts: MetaContexts,
    /// Extended headers negotiated (64-bit lengths, `PAYLOAD_LEN` on WRITE).
    pub extended: bool,
    /// Alignment a FAST_ZERO needs (`None`: every FAST_ZERO is refused).
    pub fast_zero_unit: Option<u64>,
}

fn reject(error: u32, message: impl Into<String>, drain: u32) -> Rejection {
    Rejection {
        error,
        message: message.into(),
        drain,
        fatal: false,
    }
}

/// Validates `h` against `lim` (see the module docs for the rules).
pub fn validate(h: &RequestHeader, lim: &Limits) -> Result<Command, Rejection> {
    // A WRITE always carries its payload. With extended headers the spec has the client set
    // PAYLOAD_LEN on it, but QEMU 10 does not: its writes would be refused and the stream lost
    // if a WRITE without the flag were taken to have none (QEMU's own server reads the payload
    // of every WRITE too).
    let has_payload =
        h.kind == wire::CMD_WRITE || (lim.extended && h.flags & wire::CMD_FLAG_PAYLOAD_LEN != 0);
    if has_payload && h.len > u64::from(wire::MAX_PAYLOAD) {
        return Err(Rejection {
            error: wire::NBD_EINVAL,
            message: format!("payload of {} bytes exceeds the maximum", h.len),
            drain: 0,
            fatal: true,
        });
    }
    // Fits: checked against MAX_PAYLOAD just above.
    let payload = if has_payload { h.len as u32 } else { 0 };
    use wire::*;
    let ext_write = if lim.extended {
        CMD_FLAG_PAYLOAD_LEN
    } else {
        0
    };
    let allowed = match h.kind {
        CMD_READ => CMD_FLAG_FUA | if lim.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE => CMD_FLAG_FUA | ext_write,
        CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => {
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | if lim.read_only { 0 } else { CMD_FLAG_FAST_ZERO }
        }
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_CACHE => CMD_FLAG_FUA,
        CMD_DISC => u16::MAX,
        other => {
            return Err(reject(
                NBD_EINVAL,
                format!("unknown command {other}"),
                payload,
            ));
        }
    };
    if h.flags & !allowed != 0 {
        return Err(reject(
            NBD_EINVAL,
            format!("flags {:#x} not valid for command {}", h.flags, h.kind),
            payload,
        ));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && lim.read_only {
        return Err(reject(NBD_EPERM, "export is read-only", payload));
    }
    let in_range = h
        .offset
        .checked_add(h.len)
        .is_some_and(|end| end <= lim.size);
    if !in_range && !matches!(h.kind, CMD_DISC | CMD_FLUSH) {
        let error = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        };
        return Err(reject(
            error,
            format!(
                "range {}+{} is past the end of the {}-byte export",
                h.offset, h.len, lim.size
            ),
            payload,
        ));
    }
    let (offset, len) = (h.offset, h.len);
    Ok(match h.kind {
        CMD_READ => {
            if len > u64::from(MAX_PAYLOAD) {
                return Err(reject(
                    NBD_EINVAL,
                    format!("read of {len} bytes exceeds the maximum block size"),
                    0,
                ));
            }
            Command::Read {
                offset,
                len: len as u32,
                df: h.flags & CMD_FLAG_DF != 0,
            }
        }
        CMD_WRITE => Command::Write {
            offset,
            len: payload,
            fua,
        },
        CMD_DISC => Command::Disc,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => {
            let punch = h.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = h.flags & CMD_FLAG_FAST_ZERO != 0;
            if fast {
                let punchable = match lim.fast_zero_unit {
                    Some(u) => punch && offset % u == 0 && len % u == 0,
                    None => false,
                };
                if !punchable {
                    let why = match lim.fast_zero_unit {
                        None => "the raw image cannot punch holes".to_string(),
                        Some(_) if !punch => "NO_HOLE".to_string(),
                        Some(u) => format!("range not aligned to {u} bytes"),
                    };
                    return Err(reject(
                        NBD_ENOTSUP,
                        format!("fast zero would write zeros: {why}"),
                        0,
                    ));
                }
            }
            Command::WriteZeroes {
                offset,
                len,
                punch,
                fua,
                fast,
            }
        }
        _ => {
            if !lim.contexts.any() {
                return Err(reject(NBD_EINVAL, "no meta context was negotiated", 0));
            }
            if len == 0 {
                return Err(reject(NBD_EINVAL, "block status of length 0", 0));
            }
            Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
    })
}

/// Limits and request headers for the tests of the checks here and of the plans made from
/// them (`conn::plan`).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A writable 1 MiB export with structured replies and `base:allocation`.
    pub(crate) fn lim() -> Limits {
        Limits {
            size: 1 << 20,
            read_only: false,
            structured: true,
            contexts: MetaContexts {
                base_allocation: true,
                allocation_depth: false,
                dirty: 0,
            },
            extended: false,
            fast_zero_unit: Some(512),
        }
    }

    /// A request header (cookie 1).
    pub(crate) fn h(kind: u16, flags: u16, offset: u64, len: u64) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 1,
            offset,
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{h, lim};
    use super::*;
    use wire::*;

    #[test]
    fn good_requests_pass() {
        assert_eq!(
            validate(&h(CMD_READ, CMD_FLAG_DF, 0, 4096), &lim()),
            Ok(Command::Read {
                offset: 0,
                len: 4096,
                df: true
            })
        );
        assert_eq!(
            validate(&h(CMD_WRITE, CMD_FLAG_FUA, 7, 100), &lim()),
            Ok(Command::Write {
                offset: 7,
                len: 100,
                fua: true
            })
        );
        assert_eq!(
            validate(&h(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 512, 1024), &lim()),
            Ok(Command::WriteZeroes {
                offset: 512,
                len: 1024,
                punch: true,
                fua: false,
                fast: true
            })
        );
        assert_eq!(validate(&h(CMD_FLUSH, 0, 0, 0), &lim()), Ok(Command::Flush));
        assert_eq!(
            validate(&h(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &lim()),
            Ok(Command::BlockStatus {
                offset: 0,
                len: 1 << 20,
                req_one: true
            })
        );
        // Zero-length requests are answered, not refused.
        assert!(validate(&h(CMD_READ, 0, 1 << 20, 0), &lim()).is_ok());
    }

    #[test]
    fn errors_follow_the_spec() {
        let e = |r: Result<Command, Rejection>| r.unwrap_err();
        assert_eq!(e(validate(&h(9, 0, 0, 0), &lim())).error, NBD_EINVAL);
        let r = e(validate(&h(CMD_WRITE, CMD_FLAG_DF, 0, 512), &lim()));
        assert_eq!((r.error, r.drain, r.fatal), (NBD_EINVAL, 512, false));
        let r = e(validate(&h(CMD_WRITE, 0, (1 << 20) - 1, 2), &lim()));
        assert_eq!((r.error, r.drain), (NBD_ENOSPC, 2));
        assert_eq!(
            e(validate(&h(CMD_READ, 0, 1 << 20, 1), &lim())).error,
            NBD_EINVAL
        );
        assert_eq!(
            e(validate(&h(CMD_READ, 0, u64::MAX, 10), &lim())).error,
            NBD_EINVAL
        );
        let mut ro = lim();
        ro.read_only = true;
        let r = e(validate(&h(CMD_WRITE, 0, 0, 512), &ro));
        assert_eq!((r.error, r.drain), (NBD_EPERM, 512));
        assert_eq!(e(validate(&h(CMD_TRIM, 0, 0, 512), &ro)).error, NBD_EPERM);
        let mut simple = lim();
        simple.structured = false;
        assert_eq!(
            e(validate(&h(CMD_READ, CMD_FLAG_DF, 0, 512), &simple)).error,
            NBD_EINVAL
        );
        assert_eq!(
            e(validate(
                &h(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 1, 512),
                &lim()
            ))
            .error,
            NBD_ENOTSUP
        );
        assert_eq!(
            e(validate(
                &h(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                    0,
                    512
                ),
                &lim()
            ))
            .error,
            NBD_ENOTSUP
        );
        // A FAST_ZERO the engine would do by writing zeros: not aligned to its unit, or no
        // hole punching at all.
        let mut unit4k = lim();
        unit4k.fast_zero_unit = Some(4096);
        assert_eq!(
            e(validate(
                &h(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 512, 4096),
                &unit4k
            ))
            .error,
            NBD_ENOTSUP
        );
        assert!(validate(
            &h(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 4096, 4096),
            &unit4k
        )
        .is_ok());
        let mut nopunch = lim();
        nopunch.fast_zero_unit = None;
        assert_eq!(
            e(validate(
                &h(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096),
                &nopunch
            ))
            .error,
            NBD_ENOTSUP
        );
        // Without FAST_ZERO, zeroing is never refused for it.
        assert!(validate(&h(CMD_WRITE_ZEROES, 0, 1, 100), &nopunch).is_ok());
        let mut none = lim();
        none.contexts = MetaContexts::default();
        assert_eq!(
            e(validate(&h(CMD_BLOCK_STATUS, 0, 0, 512), &none)).error,
            NBD_EINVAL
        );
        assert_eq!(
            e(validate(&h(CMD_BLOCK_STATUS, 0, 0, 0), &lim())).error,
            NBD_EINVAL
        );
        assert_eq!(
            e(validate(&h(CMD_CACHE, CMD_FLAG_NO_HOLE, 0, 512), &lim())).error,
            NBD_EINVAL
        );
        let mut big = lim();
        big.size = 1 << 40;
        let over = u64::from(MAX_PAYLOAD) + 1;
        assert_eq!(
            e(validate(&h(CMD_READ, 0, 0, over), &big)).error,
            NBD_EINVAL
        );
        assert!(e(validate(&h(CMD_WRITE, 0, 0, over), &big)).fatal);
        // PAYLOAD_LEN only means something with extended headers.
        assert_eq!(
            e(validate(
                &h(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512),
                &lim()
            ))
            .drain,
            512
        );
    }

    #[test]
    fn extended_headers_allow_big_lengths_and_payload_flags() {
        let mut x = lim();
        x.extended = true;
        x.size = 1 << 40;
        assert_eq!(
            validate(&h(CMD_TRIM, 0, 0, 8 << 30), &x),
            Ok(Command::Trim {
                offset: 0,
                len: 8 << 30,
                fua: false
            })
        );
        assert_eq!(
            validate(&h(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512), &x),
            Ok(Command::Write {
                offset: 0,
                len: 512,
                fua: false
            })
        );
        // A WRITE without PAYLOAD_LEN (as QEMU 10 sends it) still carries its payload.
        assert_eq!(
            validate(&h(CMD_WRITE, 0, 0, 512), &x),
            Ok(Command::Write {
                offset: 0,
                len: 512,
                fua: false
            })
        );
        // A payload on a command that takes none: refused, payload drained.
        let r = validate(&h(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 8), &x).unwrap_err();
        assert_eq!((r.error, r.drain, r.fatal), (NBD_EINVAL, 8, false));
        let r = validate(&h(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 1 << 40), &x);
        assert!(r.unwrap_err().fatal);
    }
}
