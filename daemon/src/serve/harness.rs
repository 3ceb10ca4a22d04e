//! Entry points for the fuzz targets (feature `fuzzing`): each takes arbitrary bytes and drives
//! one parser of the daemon the way a client would, on in-memory exports. None may panic, hang
//! or leak a thread; that is what the fuzzer checks.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::backend::memory::MemDisk;
use crate::conn::connection::{self, ConnConfig};
use crate::conn::conns::ClientHandle;
use crate::conn::sock::Sock;
use crate::host::allow::AllowedDirs;
use crate::host::runtime::{Host, HostConfig};
use crate::nbd::command::{self, Limits};
use crate::nbd::export::{Export, Exports};
use crate::nbd::handshake::{self, MetaContexts};
use crate::nbd::wire::{self, RequestHeader};
use crate::process::signals::Stop;

/// Bytes a scripted client sends (`input`) and the server's answers (`output`).
struct Script<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Script<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Bounded: a handshake answers with a few KiB at most per option.
        if self.output.len() < 16 << 20 {
            self.output.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn exports() -> Arc<Exports> {
    Exports::new(vec![
        Export::new("", MemDisk::new(1 << 20, false), 1),
        Export::new("ro", MemDisk::new(64 << 10, true), 1),
    ])
}

/// The server side of the handshake on `data` (client flags, then options).
pub fn handshake(data: &[u8]) {
    let mut s = Script {
        input: data,
        output: Vec::new(),
    };
    let exports = exports();
    let _ = handshake::negotiate(&mut s, &exports, &|| false, &|_| Some(()));
}

/// The handshake under a TLS policy, up to and past the `STARTTLS` acknowledgement, without a
/// TLS session: `data[0] % 3` picks the policy (0 off: nothing offered; 1 `--tls on`: offered;
/// 2 `--tls require`: offered and required), the rest is the client (flags, then options).
/// When the first run acknowledges `STARTTLS`, the rest of the input is haggled again as if
/// over TLS (no greeting, state from before forgotten, a client identity set).
///
/// Panics (what the fuzzer reports) if `STARTTLS` is acknowledged without an offer or over
/// TLS, or if under `require` any option but `STARTTLS`/`ABORT` got an answer other than
/// `ERR_TLS_REQD` (or `ERR_TOO_BIG` for an oversized payload, read and discarded before any
/// policy applies) before TLS: nothing, not even an export list, leaks in the clear.
pub fn handshake_tls(data: &[u8]) {
    let Some((&policy, client)) = data.split_first() else {
        return;
    };
    let (offer, require) = match policy % 3 {
        0 => (false, false),
        1 => (true, false),
        _ => (true, true),
    };
    let mut s = Script {
        input: client,
        output: Vec::new(),
    };
    let exports = exports();
    let tls = handshake::Tls {
        offer,
        require,
        active: false,
        identity: None,
    };
    let first = handshake::negotiate_tls(&mut s, &exports, &|| false, &|_| Some(()), tls, None);
    if require {
        check_only_tls_required(&s.output);
    }
    if let Ok(handshake::Haggled::StartTls { no_zeroes }) = first {
        assert!(offer, "STARTTLS acknowledged without an offer");
        s.output.clear();
        let tls = handshake::Tls {
            active: true,
            identity: Some("CN=fuzz,O=addcow-fuzz"),
            ..tls
        };
        let again = handshake::negotiate_tls(
            &mut s,
            &exports,
            &|| false,
            &|_| Some(()),
            tls,
            Some(no_zeroes),
        );
        assert!(
            !matches!(again, Ok(handshake::Haggled::StartTls { .. })),
            "STARTTLS acknowledged over TLS"
        );
    }
}

/// Checks the server's side of a handshake run in the clear under `--tls require` (`out`: the
/// greeting, then option replies): see [`handshake_tls`].
fn check_only_tls_required(out: &[u8]) {
    let mut rest = out.get(18..).unwrap_or_default();
    while rest.len() >= 20 {
        let magic = u64::from_be_bytes(rest[..8].try_into().unwrap_or_default());
        let option = u32::from_be_bytes(rest[8..12].try_into().unwrap_or_default());
        let kind = u32::from_be_bytes(rest[12..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(rest[16..20].try_into().unwrap_or_default()) as usize;
        assert_eq!(magic, wire::OPTION_REPLY_MAGIC, "option reply out of step");
        if option != handshake::OPT_STARTTLS && option != wire::OPT_ABORT {
            assert!(
                kind == handshake::REP_ERR_TLS_REQD || kind == wire::REP_ERR_TOO_BIG,
                "option {option} answered {kind:#x} before TLS under require"
            );
        }
        rest = rest.get(20 + len..).unwrap_or_default();
    }
}

/// Request headers and their validation, then a whole connection: `data[0]` picks what the
/// client negotiates (bit 0 extended headers, bit 1 structured replies, bit 2 base:allocation,
/// bit 3 qemu:allocation-depth, bit 4 the read-only export), the rest is the request stream.
pub fn transmission(data: &[u8]) {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let extended = mode & 1 != 0;
    // The decoders alone, on every frame-sized piece.
    let limits = Limits {
        size: 1 << 20,
        read_only: mode & 16 != 0,
        structured: extended || mode & 2 != 0,
        contexts: MetaContexts {
            base_allocation: mode & 4 != 0,
            allocation_depth: mode & 8 != 0,
            dirty: 0,
        },
        extended,
        fast_zero_unit: if mode & 32 != 0 { None } else { Some(512) },
    };
    for chunk in stream.chunks(wire::EXTENDED_REQUEST_LEN) {
        let h = if extended {
            chunk.try_into().ok().map(RequestHeader::parse_extended)
        } else {
            chunk
                .get(..wire::REQUEST_LEN)
                .and_then(|c| c.try_into().ok())
                .map(RequestHeader::parse)
        };
        if let Some(Ok(h)) = h {
            let _ = command::validate(&h, &limits);
        }
    }
    // A whole connection: handshake for the chosen mode, then the stream, then EOF.
    let mut client = vec![0, 0, 0, 3];
    let opt = |o: u32, d: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&o.to_be_bytes());
        out.extend_from_slice(&(d.len() as u32).to_be_bytes());
        out.extend_from_slice(d);
    };
    if extended {
        opt(wire::OPT_EXTENDED_HEADERS, &[], &mut client);
    } else if mode & 2 != 0 {
        opt(wire::OPT_STRUCTURED_REPLY, &[], &mut client);
    }
    let name: &[u8] = if mode & 16 != 0 { b"ro" } else { b"" };
    let mut meta = (name.len() as u32).to_be_bytes().to_vec();
    meta.extend_from_slice(name);
    meta.extend_from_slice(&2u32.to_be_bytes());
    for q in ["base:allocation", "qemu:allocation-depth"] {
        meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
        meta.extend_from_slice(q.as_bytes());
    }
    opt(wire::OPT_SET_META_CONTEXT, &meta, &mut client);
    let mut go = (name.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(name);
    go.extend_from_slice(&[0, 0]);
    opt(wire::OPT_GO, &go, &mut client);
    client.extend_from_slice(stream);
    run_connection(client);
}

/// Serves one connection whose client sends `client` and then closes its side.
fn run_connection(client: Vec<u8>) {
    let Ok((a, b)) = UnixStream::pair() else {
        return;
    };
    let mut cfg = ConnConfig::for_tests(exports());
    cfg.handshake_timeout = Duration::from_secs(5);
    cfg.payload_timeout = Duration::from_secs(5);
    let Ok(hs) = a.try_clone() else { return };
    let handle = Arc::new(ClientHandle::new(Sock::Unix(hs)));
    let server = std::thread::spawn(move || connection::serve(Sock::Unix(a), 0, 0, &cfg, handle));
    let Ok(mut w) = b.try_clone() else { return };
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&client);
        let _ = w.shutdown(Shutdown::Write);
    });
    let mut sink = [0u8; 64 << 10];
    let mut r = &b;
    while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
    let _ = writer.join();
    let _ = server.join();
}

/// The control socket's request handling on one line.
pub fn control_line(line: &[u8]) {
    static HOST: OnceLock<Host> = OnceLock::new();
    let host = HOST.get_or_init(|| {
        let (stop, waker) = Stop::new().expect("pipe");
        // Kept open for the process's life: a `quit` writes to the pipe.
        std::mem::forget(waker);
        Host::new(
            None,
            exports(),
            AllowedDirs::from_files(&[]),
            stop,
            HostConfig {
                shutdown_grace: Duration::from_millis(10),
                ..HostConfig::default()
            },
        )
    });
    let _ = crate::host::control::handle_line(host, line);
}

/// Inputs the fuzzer reported (crashes, hangs): each must run to its end, quickly, every time.
/// The files are in `fuzz/regressions/TARGET/`.
///
/// `timeout-86d560d7`: reported once as a 32 s hang by a run on a busy machine (a root-only
/// test was loop-mounting file systems meanwhile); a WRITE, a READ, a FAST_ZERO, an
/// out-of-range TRIM, then garbage. It never hung again (hundreds of reruns, and a 5-minute
/// fuzzing run from the same corpus); it stays here so it never will.
#[cfg(test)]
mod regressions {
    use std::time::{Duration, Instant};

    /// Runs `f` on its own thread; fails if it panics or has not finished within 20 s.
    fn bounded(name: &str, f: fn(&[u8]), input: &'static [u8]) {
        let start = Instant::now();
        let t = std::thread::spawn(move || f(input));
        while !t.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{name}: still running after 20 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap_or_else(|_| panic!("{name}: panicked"));
    }

    /// The seeds of `nbd_handshake_tls` (STARTTLS after other options, under each policy).
    #[test]
    fn handshake_tls_seeds() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/seeds/nbd_handshake_tls"
        );
        let mut n = 0;
        for e in std::fs::read_dir(dir).expect("seed folder") {
            let input: &'static [u8] = std::fs::read(e.unwrap().path()).unwrap().leak();
            bounded("nbd_handshake_tls seed", super::handshake_tls, input);
            n += 1;
        }
        assert!(n >= 4, "only {n} seeds");
    }

    #[test]
    fn transmission_timeout_86d560d7() {
        for _ in 0..20 {
            bounded(
                "nbd_transmission/timeout-86d560d7",
                super::transmission,
                include_bytes!("../../../fuzz/regressions/nbd_transmission/timeout-86d560d7"),
            );
        }
    }
}
