//! One request's plan: what a transport does with a request header, decided once for both
//! ([`super::connection`]'s reader thread and [`super::ring_conn`] on the engine core), as
//! nbdkit's validate → handle → send.
//!
//! [`plan`] is pure: it validates the header ([`command::validate`]), asks the disk's
//! allocation map at most once (for a READ, through the caller's lookup, so a core thread can
//! ask without waiting) and returns a [`Plan`]. The transport only executes it: it takes the
//! plan's [`Plan::cost`] from its budget, then answers, submits, receives a WRITE's payload or
//! answers block status its own way.
//!
//! The rules, in the order applied:
//! 1. DISC → [`Plan::Disconnect`]; a refusal [`command::validate`] calls fatal →
//!    [`Plan::Close`]; any other refusal → [`Plan::Refuse`] (its payload drained, an error
//!    reply);
//! 2. a zero-length WRITE, TRIM, CACHE or WRITE_ZEROES changes nothing → [`Plan::Answer`] OK;
//! 3. a READ of length 0, or one the map says is one hole from end to end → [`Plan::Answer`]
//!    with zeros from a static page (no buffer, no budget bytes);
//! 4. any other READ → [`Plan::Submit`], answered with its data and the holes the map named;
//! 5. WRITE → [`Plan::Write`]: receive the payload into an engine buffer, then submit;
//! 6. FLUSH, TRIM, CACHE, WRITE_ZEROES → [`Plan::Submit`], answered OK or with the error the
//!    command's kind maps the engine's errno to;
//! 7. BLOCK_STATUS → [`Plan::BlockStatus`], answered from the map (it may wait for a disk
//!    switch: not on an engine core).
//!
//! Budget ([`Plan::cost`]): the bytes a request holds until its reply is sent. A READ sent
//! from the disk and a WRITE hold their length, block status the most its reply can take
//! ([`status::reply_cost`]), everything else nothing (but a request slot). A close or DISC
//! takes no budget at all. No cost exceeds [`MAX_COST`].
//!
//! Invariants (unit tests below, and the `nbd_plan` fuzz target through [`fuzz_one`]): an
//! engine request, a WRITE or block status lies inside the export and is not empty; nothing
//! that changes the disk is planned on a read-only export; a READ's holes are the map's.

use addcow_engine::{Done, Extent, ExtentKind, Request, RequestError};

use crate::backend::disk::Backend;
use crate::nbd::command::{self, Command, Limits};
use crate::nbd::handshake::MetaContexts;
use crate::nbd::reply::{self, Body};
use crate::nbd::status;
use crate::nbd::wire::{self, RequestHeader};

/// Most budget bytes one request takes: a full-size READ or WRITE (block status replies are
/// bounded well below it).
pub const MAX_COST: u64 = wire::MAX_PAYLOAD as u64;

// Every request fits the smallest pool: none can wait for more bytes than there are.
const _: () = assert!(MAX_COST <= super::budget::MIN_POOL);

/// What a transport does with one request. Plain values: building one allocates nothing but
/// what the answer itself holds (a refusal's message, a READ's holes).
#[derive(Debug)]
pub enum Plan {
    /// The stream can no longer be trusted (an oversized WRITE payload): take nothing more in,
    /// answer what was taken in, close. Not answered.
    Close(String),
    /// The client's DISC: take nothing more in, answer what was taken in, close.
    Disconnect,
    /// Answer with the error `error` (`message` for the log and the error chunk) after reading
    /// and discarding the `drain` payload bytes that follow the header.
    Refuse {
        error: u32,
        message: String,
        drain: u32,
    },
    /// Answer with `body` (`Ok` or `Zeros`) at once, with no engine request.
    Answer(Body),
    /// Submit `req` to the engine; [`Then::answer`] makes its completion the reply.
    Submit { req: Request, then: Then },
    /// Receive the `len`-byte payload into an engine buffer, then submit
    /// `Request::Write { offset, data, fua }`, answered through [`Then::WRITE`].
    Write { offset: u64, len: u32, fua: bool },
    /// Answer with the block status of a range ([`Status::answer`]).
    BlockStatus(Status),
}

impl Plan {
    /// Budget bytes the request holds until its reply is sent; `None`: it takes no budget at
    /// all, not even a request slot (the connection closes).
    pub fn cost(&self) -> Option<u64> {
        Some(match self {
            Plan::Close(_) | Plan::Disconnect => return None,
            Plan::Refuse { .. } | Plan::Answer(_) => 0,
            Plan::Submit {
                req: Request::Read { len, .. },
                ..
            } => u64::from(*len),
            Plan::Submit { .. } => 0,
            Plan::Write { len, .. } => u64::from(*len),
            Plan::BlockStatus(s) => status::reply_cost(s.len, s.req_one, s.contexts),
        })
    }
}

/// How an engine request's completion becomes the reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Then {
    /// A READ's data; `holes`: the ranges the map said read as zeros, sent as hole chunks
    /// unless `df`.
    Read {
        offset: u64,
        len: u32,
        holes: Vec<(u64, u64)>,
        df: bool,
    },
    /// OK, or the error a failed `kind` command gets (`fast_zero`: the client asked FAST_ZERO).
    Done { kind: u16, fast_zero: bool },
}

impl Then {
    /// A WRITE's completion.
    pub const WRITE: Then = Then::Done {
        kind: wire::CMD_WRITE,
        fast_zero: false,
    };

    /// The reply body for the engine's answer `r`; `None`: not answered (the engine is
    /// shutting down, and the connection stops so that a reconnecting client resends it).
    pub fn answer(self, r: Result<Done, RequestError>) -> Option<Body> {
        match self {
            Then::Read {
                offset,
                len,
                holes,
                df,
            } => reply::read_answer(r, offset, len, holes, df),
            Then::Done { kind, fast_zero } => reply::done_answer(kind, fast_zero, r),
        }
    }
}

/// A BLOCK_STATUS to answer: `len` bytes at `offset` (inside the export, not empty), for the
/// negotiated `contexts`; `req_one`: one extent per context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub offset: u64,
    pub len: u64,
    pub req_one: bool,
    pub contexts: MetaContexts,
}

impl Status {
    /// The answer, from `backend`'s map (waits while a disk switch holds it).
    pub fn answer(&self, backend: &dyn Backend) -> Body {
        let contexts = status::answer(backend, self.offset, self.len, self.contexts, self.req_one);
        Body::BlockStatus { contexts }
    }
}

/// The plan for header `h` on a connection that negotiated `limits` (see the module docs).
/// `allocation(offset, len)`: the disk's map of a range, asked only for a READ of at least one
/// byte; an empty map (the caller could not have it without waiting) sends the READ to the
/// engine whole.
pub fn plan(
    h: &RequestHeader,
    limits: &Limits,
    allocation: impl FnOnce(u64, u64) -> Vec<Extent>,
) -> Plan {
    if h.kind == wire::CMD_DISC {
        // Whatever its flags and length: the connection closes anyway.
        return Plan::Disconnect;
    }
    let cmd = match command::validate(h, limits) {
        Ok(cmd) => cmd,
        Err(rej) if rej.fatal => return Plan::Close(rej.message),
        Err(rej) => {
            return Plan::Refuse {
                error: rej.error,
                message: rej.message,
                drain: rej.drain,
            }
        }
    };
    if cmd.changes_nothing() {
        return Plan::Answer(Body::Ok);
    }
    let done = |kind| Then::Done {
        kind,
        fast_zero: false,
    };
    match cmd {
        // Not reached: answered above.
        Command::Disc => Plan::Disconnect,
        Command::Read { offset, len, df } => {
            let holes: Vec<(u64, u64)> = if len == 0 {
                Vec::new()
            } else {
                allocation(offset, u64::from(len))
                    .into_iter()
                    .filter(|e| e.kind == ExtentKind::Zero)
                    .map(|e| (e.offset, e.len))
                    .collect()
            };
            let all_hole = len == 0 || (holes.len() == 1 && holes[0] == (offset, u64::from(len)));
            if all_hole {
                // No buffer: the reply's zeros come from a static page.
                return Plan::Answer(Body::Zeros { offset, len, df });
            }
            Plan::Submit {
                req: Request::Read { offset, len },
                then: Then::Read {
                    offset,
                    len,
                    holes,
                    df,
                },
            }
        }
        Command::Write { offset, len, fua } => Plan::Write { offset, len, fua },
        Command::Flush => Plan::Submit {
            req: Request::Flush,
            then: done(wire::CMD_FLUSH),
        },
        Command::Trim { offset, len, fua } => Plan::Submit {
            req: Request::Trim { offset, len, fua },
            then: done(wire::CMD_TRIM),
        },
        Command::Cache { offset, len } => Plan::Submit {
            req: Request::Cache { offset, len },
            then: done(wire::CMD_CACHE),
        },
        Command::WriteZeroes {
            offset,
            len,
            punch,
            fua,
            fast,
        } => Plan::Submit {
            req: Request::WriteZeroes {
                offset,
                len,
                punch,
                fua,
            },
            then: Then::Done {
                kind: wire::CMD_WRITE_ZEROES,
                fast_zero: fast,
            },
        },
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => Plan::BlockStatus(Status {
            offset,
            len,
            req_one,
            contexts: limits.contexts,
        }),
    }
}

/// One fuzzing input for the planner (the `nbd_plan` fuzz target; unit tests run it on random
/// bytes): `data` gives the negotiated limits, a request header and the disk's map of the
/// range; the plan must keep every invariant of the module docs. Panics when one is broken.
///
/// Layout: byte 0 bits: 0 extended, 1 structured, 2 base:allocation, 3 allocation-depth,
/// 4 read-only, 5 no hole punching, 6 a small (64 KiB) export; bytes 1..3 the kind and flags,
/// 3..11 the offset, 11..19 the length (its high half only with extended headers), then one
/// byte per run of the map (kind and length, cycled).
#[cfg(any(test, feature = "fuzzing"))]
pub fn fuzz_one(data: &[u8]) {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let be = |at: usize, n: usize| (at..at + n).fold(0u64, |v, i| (v << 8) | u64::from(byte(i)));
    let mode = byte(0);
    let extended = mode & 1 != 0;
    let limits = Limits {
        size: if mode & 64 != 0 { 64 << 10 } else { 1 << 40 },
        read_only: mode & 16 != 0,
        structured: extended || mode & 2 != 0,
        contexts: MetaContexts {
            base_allocation: mode & 4 != 0,
            allocation_depth: mode & 8 != 0,
            dirty: 0,
        },
        extended,
        fast_zero_unit: if mode & 32 != 0 { None } else { Some(4096) },
    };
    let len = be(11, 8);
    let h = RequestHeader {
        kind: u16::from(byte(1) % 12),
        flags: u16::from(byte(2)) | (u16::from(byte(1) >> 4) << 8),
        cookie: 7,
        offset: be(3, 8),
        len: if extended { len } else { len & 0xffff_ffff },
    };
    let runs = data.get(19..).unwrap_or_default();
    let mut asked = 0;
    let mut map = Vec::new();
    let p = plan(&h, &limits, |offset, len| {
        asked += 1;
        // A map as `Backend::allocation` gives it: runs in order, covering the range.
        let mut at = offset;
        let end = offset + len;
        for (i, &r) in runs.iter().cycle().enumerate() {
            if at >= end || i >= 64 {
                break;
            }
            let kind = [ExtentKind::Image, ExtentKind::Base, ExtentKind::Zero][usize::from(r % 3)];
            let run = if i == 63 {
                end - at
            } else {
                (u64::from(r >> 2) + 1) << 9
            };
            let run = run.min(end - at);
            map.push(Extent {
                offset: at,
                len: run,
                kind,
            });
            at += run;
        }
        if at < end && runs.is_empty() {
            map.push(Extent {
                offset,
                len,
                kind: ExtentKind::Zero,
            });
        }
        map.clone()
    });
    check(&h, &limits, &map, asked, &p);
}

/// The invariants of one plan (see [`fuzz_one`]).
#[cfg(any(test, feature = "fuzzing"))]
fn check(h: &RequestHeader, limits: &Limits, map: &[Extent], asked: u32, p: &Plan) {
    let inside = |offset: u64, len: u64| {
        len > 0 && offset.checked_add(len).is_some_and(|e| e <= limits.size)
    };
    let is_read = h.kind == wire::CMD_READ;
    assert!(asked <= 1, "the map was asked {asked} times");
    if asked == 1 {
        assert!(is_read && h.len > 0, "the map was asked for {h:?}");
    }
    if let Some(cost) = p.cost() {
        assert!(cost <= MAX_COST, "cost {cost} for {h:?}");
    }
    let changes = matches!(
        p,
        Plan::Write { .. }
            | Plan::Submit {
                req: Request::Trim { .. } | Request::WriteZeroes { .. } | Request::Write { .. },
                ..
            }
    );
    assert!(
        !(changes && limits.read_only),
        "{p:?} on a read-only export"
    );
    match p {
        Plan::Close(_) => assert!(h.len > u64::from(wire::MAX_PAYLOAD), "{h:?} closes"),
        Plan::Disconnect => assert_eq!(h.kind, wire::CMD_DISC),
        Plan::Refuse { error, drain, .. } => {
            assert_ne!(*error, 0);
            assert!(u64::from(*drain) <= h.len);
        }
        Plan::Answer(Body::Ok) => {
            assert_eq!(h.len, 0);
            assert!(matches!(
                h.kind,
                wire::CMD_WRITE | wire::CMD_TRIM | wire::CMD_CACHE | wire::CMD_WRITE_ZEROES
            ));
        }
        Plan::Answer(Body::Zeros { offset, len, .. }) => {
            assert!(is_read && *offset == h.offset && u64::from(*len) == h.len);
            assert!(
                *len == 0 || map.iter().all(|e| e.kind == ExtentKind::Zero),
                "zeros for a range with data: {map:?}"
            );
            assert!(*len == 0 || inside(*offset, u64::from(*len)));
        }
        Plan::Answer(body) => panic!("answered at once with {body:?}"),
        Plan::Submit { req, then } => {
            match (req, then) {
                (
                    Request::Read { offset, len },
                    Then::Read {
                        offset: o,
                        len: l,
                        holes,
                        ..
                    },
                ) => {
                    assert!(is_read && (*offset, *len) == (*o, *l));
                    assert!(inside(*offset, u64::from(*len)));
                    assert!(*len <= wire::MAX_PAYLOAD);
                    let zeros: Vec<(u64, u64)> = map
                        .iter()
                        .filter(|e| e.kind == ExtentKind::Zero)
                        .map(|e| (e.offset, e.len))
                        .collect();
                    assert_eq!(holes, &zeros, "holes not the map's");
                }
                (Request::Flush, Then::Done { kind, .. }) => assert_eq!(*kind, wire::CMD_FLUSH),
                (Request::Trim { offset, len, .. }, Then::Done { kind, .. }) => {
                    assert_eq!(*kind, wire::CMD_TRIM);
                    assert!(inside(*offset, *len));
                }
                (Request::Cache { offset, len }, Then::Done { kind, .. }) => {
                    assert_eq!(*kind, wire::CMD_CACHE);
                    assert!(inside(*offset, *len));
                }
                (
                    Request::WriteZeroes {
                        offset, len, punch, ..
                    },
                    Then::Done { kind, fast_zero },
                ) => {
                    assert_eq!(*kind, wire::CMD_WRITE_ZEROES);
                    assert!(inside(*offset, *len));
                    if *fast_zero {
                        let unit = limits.fast_zero_unit.expect("FAST_ZERO without punching");
                        assert!(*punch && offset % unit == 0 && len % unit == 0);
                    }
                }
                other => panic!("{other:?} submitted for {h:?}"),
            }
            assert_eq!(p.cost(), Some(if is_read { h.len } else { 0 }));
        }
        Plan::Write { offset, len, .. } => {
            assert_eq!(h.kind, wire::CMD_WRITE);
            assert!(inside(*offset, u64::from(*len)) && *len <= wire::MAX_PAYLOAD);
            assert_eq!(p.cost(), Some(u64::from(*len)));
        }
        Plan::BlockStatus(s) => {
            assert_eq!(h.kind, wire::CMD_BLOCK_STATUS);
            assert!(inside(s.offset, s.len) && s.contexts.any());
            assert_eq!(s.contexts, limits.contexts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::command::testing::{h, lim};
    use wire::*;

    fn ext(offset: u64, len: u64, kind: ExtentKind) -> Extent {
        Extent { offset, len, kind }
    }

    /// The plan for `h` on `limits` with the map `map`, and how often the map was asked.
    fn planned(h: &RequestHeader, limits: &Limits, map: &[Extent]) -> (Plan, u32) {
        let mut asked = 0;
        let p = plan(h, limits, |_, _| {
            asked += 1;
            map.to_vec()
        });
        (p, asked)
    }

    /// Plans compared as their debug forms (an engine request has no `PartialEq`); the
    /// expected plan is still built as a value, so the table is checked by the compiler.
    fn same(got: &Plan, want: &Plan) -> bool {
        format!("{got:?}") == format!("{want:?}")
    }

    fn done(kind: u16) -> Then {
        Then::Done {
            kind,
            fast_zero: false,
        }
    }

    /// The spec, one row per arm: header, map of the range, plan, cost.
    #[test]
    fn each_request_has_one_plan() {
        let data = [ext(0, 4096, ExtentKind::Image)];
        let hole = [ext(1 << 19, 4096, ExtentKind::Zero)];
        let mixed = [
            ext(0, 512, ExtentKind::Zero),
            ext(512, 512, ExtentKind::Base),
            ext(1024, 3072, ExtentKind::Zero),
        ];
        let rows: Vec<(RequestHeader, &[Extent], Plan, Option<u64>)> = vec![
            // Rule 1: refusals.
            (
                h(CMD_WRITE, 0, 0, u64::from(MAX_PAYLOAD) + 1),
                &[],
                Plan::Close(format!(
                    "payload of {} bytes exceeds the maximum",
                    u64::from(MAX_PAYLOAD) + 1
                )),
                None,
            ),
            (h(CMD_DISC, 0, 0, 0), &[], Plan::Disconnect, None),
            (
                h(CMD_WRITE, 0, (1 << 20) - 1, 2),
                &[],
                Plan::Refuse {
                    error: NBD_ENOSPC,
                    message: "range 1048575+2 is past the end of the 1048576-byte export".into(),
                    drain: 2,
                },
                Some(0),
            ),
            // Rule 2: nothing to change.
            (h(CMD_WRITE, 0, 0, 0), &[], Plan::Answer(Body::Ok), Some(0)),
            (
                h(CMD_TRIM, 0, 4096, 0),
                &[],
                Plan::Answer(Body::Ok),
                Some(0),
            ),
            (
                h(CMD_CACHE, 0, 4096, 0),
                &[],
                Plan::Answer(Body::Ok),
                Some(0),
            ),
            (
                h(CMD_WRITE_ZEROES, 0, 4096, 0),
                &[],
                Plan::Answer(Body::Ok),
                Some(0),
            ),
            // Rule 3: reads of nothing or of one hole.
            (
                h(CMD_READ, 0, 1 << 20, 0),
                &[],
                Plan::Answer(Body::Zeros {
                    offset: 1 << 20,
                    len: 0,
                    df: false,
                }),
                Some(0),
            ),
            (
                h(CMD_READ, CMD_FLAG_DF, 1 << 19, 4096),
                &hole,
                Plan::Answer(Body::Zeros {
                    offset: 1 << 19,
                    len: 4096,
                    df: true,
                }),
                Some(0),
            ),
            // Rule 4: reads with data, holes carried to the reply.
            (
                h(CMD_READ, 0, 0, 4096),
                &data,
                Plan::Submit {
                    req: Request::Read {
                        offset: 0,
                        len: 4096,
                    },
                    then: Then::Read {
                        offset: 0,
                        len: 4096,
                        holes: vec![],
                        df: false,
                    },
                },
                Some(4096),
            ),
            (
                h(CMD_READ, 0, 0, 4096),
                &mixed,
                Plan::Submit {
                    req: Request::Read {
                        offset: 0,
                        len: 4096,
                    },
                    then: Then::Read {
                        offset: 0,
                        len: 4096,
                        holes: vec![(0, 512), (1024, 3072)],
                        df: false,
                    },
                },
                Some(4096),
            ),
            // No map (a core that could not have it without waiting): the whole read.
            (
                h(CMD_READ, 0, 1 << 19, 4096),
                &[],
                Plan::Submit {
                    req: Request::Read {
                        offset: 1 << 19,
                        len: 4096,
                    },
                    then: Then::Read {
                        offset: 1 << 19,
                        len: 4096,
                        holes: vec![],
                        df: false,
                    },
                },
                Some(4096),
            ),
            // Rule 5: writes receive their payload first.
            (
                h(CMD_WRITE, CMD_FLAG_FUA, 7, 100),
                &[],
                Plan::Write {
                    offset: 7,
                    len: 100,
                    fua: true,
                },
                Some(100),
            ),
            // Rule 6: the rest go to the engine whole, holding no bytes.
            (
                h(CMD_FLUSH, 0, 0, 0),
                &[],
                Plan::Submit {
                    req: Request::Flush,
                    then: done(CMD_FLUSH),
                },
                Some(0),
            ),
            (
                h(CMD_TRIM, CMD_FLAG_FUA, 512, 1024),
                &[],
                Plan::Submit {
                    req: Request::Trim {
                        offset: 512,
                        len: 1024,
                        fua: true,
                    },
                    then: done(CMD_TRIM),
                },
                Some(0),
            ),
            (
                h(CMD_CACHE, 0, 0, 1 << 20),
                &[],
                Plan::Submit {
                    req: Request::Cache {
                        offset: 0,
                        len: 1 << 20,
                    },
                    then: done(CMD_CACHE),
                },
                Some(0),
            ),
            (
                h(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 1, 100),
                &[],
                Plan::Submit {
                    req: Request::WriteZeroes {
                        offset: 1,
                        len: 100,
                        punch: false,
                        fua: false,
                    },
                    then: done(CMD_WRITE_ZEROES),
                },
                Some(0),
            ),
            (
                h(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 512, 1024),
                &[],
                Plan::Submit {
                    req: Request::WriteZeroes {
                        offset: 512,
                        len: 1024,
                        punch: true,
                        fua: false,
                    },
                    then: Then::Done {
                        kind: CMD_WRITE_ZEROES,
                        fast_zero: true,
                    },
                },
                Some(0),
            ),
            // Rule 7: block status, charged the most its reply can take.
            (
                h(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 4096, 8192),
                &[],
                Plan::BlockStatus(Status {
                    offset: 4096,
                    len: 8192,
                    req_one: true,
                    contexts: lim().contexts,
                }),
                Some(16 + 64),
            ),
            (
                h(CMD_BLOCK_STATUS, 0, 0, 1 << 20),
                &[],
                Plan::BlockStatus(Status {
                    offset: 0,
                    len: 1 << 20,
                    req_one: false,
                    contexts: lim().contexts,
                }),
                Some(16 * ((1 << 20) / 512 + 2) + 64),
            ),
        ];
        for (hdr, map, want, cost) in rows {
            let (got, asked) = planned(&hdr, &lim(), map);
            assert!(same(&got, &want), "{hdr:?}: {got:?}, expected {want:?}");
            assert_eq!(got.cost(), cost, "cost of {got:?}");
            let reads = hdr.kind == CMD_READ && hdr.len > 0;
            assert_eq!(asked, u32::from(reads), "map asked for {hdr:?}");
            check(&hdr, &lim(), map, asked, &got);
        }
    }

    /// Read-only exports: nothing that changes the disk is planned, the rest is.
    #[test]
    fn a_read_only_export_refuses_every_change() {
        let mut ro = lim();
        ro.read_only = true;
        for (kind, flags) in [
            (CMD_WRITE, 0),
            (CMD_TRIM, 0),
            (CMD_WRITE_ZEROES, 0),
            (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO),
        ] {
            let (p, _) = planned(&h(kind, flags, 0, 512), &ro, &[]);
            assert!(
                matches!(
                    p,
                    Plan::Refuse {
                        error: NBD_EPERM | NBD_EINVAL,
                        ..
                    }
                ),
                "{kind}/{flags:#x}: {p:?}"
            );
        }
        let (p, _) = planned(&h(CMD_WRITE, 0, 0, 512), &ro, &[]);
        assert!(matches!(p, Plan::Refuse { drain: 512, .. }), "{p:?}");
        let (p, _) = planned(&h(CMD_FLUSH, 0, 0, 0), &ro, &[]);
        assert!(
            matches!(
                p,
                Plan::Submit {
                    req: Request::Flush,
                    ..
                }
            ),
            "{p:?}"
        );
    }

    /// The completion rules: a READ answers with its data and holes, the rest OK or the error
    /// their kind maps the errno to; a stopping engine is never answered.
    #[test]
    fn completions_become_replies() {
        let then = Then::Read {
            offset: 0,
            len: 4,
            holes: vec![(2, 2)],
            df: false,
        };
        let buf = addcow_engine::IoBuf::new_zeroed(4);
        match then.answer(Ok(Done::Read(buf))) {
            Some(Body::Read { holes, .. }) => assert_eq!(holes, vec![(2, 2)]),
            other => panic!("{other:?}"),
        }
        let err = |errno| {
            Err(RequestError {
                errno,
                op: "test",
                offset: 0,
            })
        };
        assert!(matches!(Then::WRITE.answer(Ok(Done::Ok)), Some(Body::Ok)));
        assert!(Then::WRITE.answer(err(libc::ESHUTDOWN)).is_none());
        match Then::WRITE.answer(err(libc::ENOSPC)) {
            Some(Body::Error { error, .. }) => assert_eq!(error, NBD_ENOSPC),
            other => panic!("{other:?}"),
        }
        let fast = Then::Done {
            kind: CMD_WRITE_ZEROES,
            fast_zero: true,
        };
        match fast.answer(err(libc::ENOTSUP)) {
            Some(Body::Error { error, .. }) => assert_eq!(error, NBD_ENOTSUP),
            other => panic!("{other:?}"),
        }
    }

    /// The largest block-status reply is charged less than [`MAX_COST`].
    #[test]
    fn the_largest_block_status_fits_the_largest_cost() {
        let both = MetaContexts {
            base_allocation: true,
            allocation_depth: true,
            dirty: (1 << crate::nbd::handshake::MAX_EXPORTED_BITMAPS) - 1,
        };
        assert!(status::reply_cost(u64::MAX, false, both) <= MAX_COST);
    }

    /// The fuzz target's invariants on random inputs (cargo-fuzz explores further).
    #[test]
    fn random_requests_keep_the_invariants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x9a1);
        for _ in 0..20_000 {
            let mut data = vec![0u8; rng.gen_range(0..40)];
            rng.fill(&mut data[..]);
            if rng.gen_bool(0.8) && data.len() >= 19 {
                // Mostly known kinds, few flags, small offsets and lengths: valid requests.
                data[1] = rng.gen_range(0..9);
                data[2] = match rng.gen_range(0..3) {
                    0 => 0,
                    1 => 1 << rng.gen_range(0..6),
                    _ => data[2] & 0x3f,
                };
                data[3..9].fill(0);
                data[11..17].fill(0);
            }
            fuzz_one(&data);
        }
    }
}
