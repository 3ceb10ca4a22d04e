//! A scripted NBD image server on a Unix socket, for tests of the remote-base client against a
//! server that misbehaves in exactly one way: it speaks just enough fixed newstyle (structured
//! replies, `base:allocation` as context 1, `NBD_INFO_BLOCK_SIZE` when given) and answers each
//! READ and BLOCK_STATUS through the test's own closures, which write whatever chunks they like
//! with [`Reply`]. By default reads are answered correctly from the export's bytes and block
//! status says "all data". The handshake of each connection can be honest, silent or trickled
//! ([`Handshake`]).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::raw::{
    IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// Chunk types.
pub const NONE: u16 = 0;
pub const OFFSET_DATA: u16 = 1;
pub const OFFSET_HOLE: u16 = 2;
pub const BLOCK_STATUS: u16 = 5;
pub const ERROR: u16 = 0x8001;
/// `NBD_REPLY_FLAG_DONE`.
pub const DONE: u16 = 1;
/// The id the server gives `base:allocation`.
pub const ALLOCATION_CTX: u32 = 1;

/// One request as the server read it.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// Which connection it came on (0 for the first accepted).
    pub conn: usize,
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// `NBD_CMD_FLAG_REQ_ONE`.
pub const REQ_ONE: u16 = 1 << 3;

/// How the server goes through the handshake of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// As the protocol says.
    Honest,
    /// Accepts and never says a word (reads what the client sends, answers nothing).
    Silent,
    /// Honest, but every byte it sends comes alone, this long after the one before.
    Trickle(Duration),
}

/// Writes replies on one connection.
pub struct Reply<'a> {
    s: &'a mut UnixStream,
    /// The export's bytes.
    pub data: &'a [u8],
}

impl Reply<'_> {
    /// A structured chunk: header and payload.
    pub fn chunk(
        &mut self,
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(20 + payload.len());
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    /// An `OFFSET_DATA` chunk with the export's bytes `[offset, offset + len)`.
    pub fn data(&mut self, flags: u16, cookie: u64, offset: u64, len: u64) -> std::io::Result<()> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&self.data[offset as usize..(offset + len) as usize]);
        self.chunk(flags, OFFSET_DATA, cookie, &p)
    }

    /// An error chunk with NBD error `code`.
    pub fn error(&mut self, flags: u16, cookie: u64, code: u32) -> std::io::Result<()> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(&0u16.to_be_bytes());
        self.chunk(flags, ERROR, cookie, &p)
    }

    /// A simple reply (`error`, no data).
    pub fn simple_error(&mut self, cookie: u64, error: u32) -> std::io::Result<()> {
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&error.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        self.s.write_all(&b)
    }

    /// A `BLOCK_STATUS` chunk for context `ctx` with `extents` (length, flags).
    pub fn status(
        &mut self,
        flags: u16,
        cookie: u64,
        ctx: u32,
        extents: &[(u32, u32)],
    ) -> std::io::Result<()> {
        let mut p = ctx.to_be_bytes().to_vec();
        for (l, f) in extents {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        self.chunk(flags, BLOCK_STATUS, cookie, &p)
    }
}

/// What the server answers a request with (`Ok(())` once it wrote what it wanted; an error
/// ends the connection).
pub type Handler = dyn Fn(&mut Reply<'_>, Request) -> std::io::Result<()> + Send + Sync;

/// The correct answer to a read: one data chunk, done.
pub fn honest_read(r: &mut Reply<'_>, q: Request) -> std::io::Result<()> {
    r.data(DONE, q.cookie, q.offset, u64::from(q.len))
}

/// A correct block-status answer: all of it data.
pub fn honest_status(r: &mut Reply<'_>, q: Request) -> std::io::Result<()> {
    r.status(DONE, q.cookie, ALLOCATION_CTX, &[(q.len, 0)])
}

/// How the server behaves.
pub struct Script {
    /// The export's bytes (its size is their length).
    pub data: Vec<u8>,
    /// `NBD_INFO_BLOCK_SIZE` (minimum, preferred, maximum), when stated.
    pub block_sizes: Option<(u32, u32, u32)>,
    pub on_read: Box<Handler>,
    pub on_block_status: Box<Handler>,
    /// The handshake of connection `n` (0 for the first accepted).
    pub handshake: Box<dyn Fn(usize) -> Handshake + Send + Sync>,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// Agree to `base:allocation` when asked.
    pub allocation: bool,
}

impl Script {
    /// Honest answers over `data`.
    pub fn honest(data: Vec<u8>) -> Script {
        Script {
            data,
            block_sizes: None,
            on_read: Box::new(honest_read),
            on_block_status: Box::new(honest_status),
            handshake: Box::new(|_| Handshake::Honest),
            multi_conn: false,
            allocation: true,
        }
    }
}

/// The server: listening on its socket until dropped (its connections are closed then too).
pub struct ScriptedServer {
    pub sock: PathBuf,
    stop: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// A handle on every connection accepted, to close them when dropped.
    live: Arc<Mutex<Vec<UnixStream>>>,
}

impl ScriptedServer {
    /// Listens on `sock` (replacing a stale file) and serves every connection with `script`.
    pub fn start(sock: &Path, script: Script) -> ScriptedServer {
        let _ = std::fs::remove_file(sock);
        let l = UnixListener::bind(sock).expect("bind the scripted server's socket");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let live: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let script = Arc::new(script);
        {
            let stop = stop.clone();
            let connections = connections.clone();
            let live = live.clone();
            std::thread::spawn(move || {
                for c in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(c) = c else { continue };
                    if let Ok(h) = c.try_clone() {
                        live.lock().expect("live").push(h);
                    }
                    let conn = connections.fetch_add(1, Ordering::SeqCst);
                    let script = script.clone();
                    std::thread::spawn(move || {
                        let _ = serve(c, conn, &script);
                    });
                }
            });
        }
        ScriptedServer {
            sock: sock.to_path_buf(),
            stop,
            connections,
            live,
        }
    }

    /// `nbd+unix:///?socket=SOCK`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then ends.
        let _ = UnixStream::connect(&self.sock);
        let _ = std::fs::remove_file(&self.sock);
        if let Ok(live) = self.live.lock() {
            for c in live.iter() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

fn read_n(s: &mut UnixStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Writes the handshake's bytes: at once, or one at a time (`Handshake::Trickle`).
fn hs_write(s: &mut UnixStream, how: Handshake, b: &[u8]) -> std::io::Result<()> {
    match how {
        Handshake::Trickle(pause) => {
            for x in b {
                std::thread::sleep(pause);
                s.write_all(std::slice::from_ref(x))?;
            }
            Ok(())
        }
        _ => s.write_all(b),
    }
}

fn option_reply(
    s: &mut UnixStream,
    how: Handshake,
    opt: u32,
    kind: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    hs_write(s, how, &b)
}

fn serve(mut s: UnixStream, conn: usize, script: &Script) -> std::io::Result<()> {
    let how = (script.handshake)(conn);
    if how == Handshake::Silent {
        // Takes in whatever comes until the client gives up.
        let mut b = [0u8; 4096];
        while s.read(&mut b)? > 0 {}
        return Ok(());
    }
    // Handshake flags: FIXED_NEWSTYLE | NO_ZEROES.
    let greeting = [&NBDMAGIC[..], &IHAVEOPT[..], &[0, 3]].concat();
    hs_write(&mut s, how, &greeting)?;
    read_n(&mut s, 4)?;
    loop {
        let h = read_n(&mut s, 16)?;
        let opt = be32(&h, 8);
        let payload = read_n(&mut s, be32(&h, 12) as usize)?;
        match opt {
            // STRUCTURED_REPLY
            8 => option_reply(&mut s, how, opt, 1, &[])?,
            // SET_META_CONTEXT: base:allocation, if asked for, is context 1.
            10 => {
                if script.allocation && payload.windows(15).any(|w| w == b"base:allocation") {
                    let mut p = ALLOCATION_CTX.to_be_bytes().to_vec();
                    p.extend_from_slice(b"base:allocation");
                    option_reply(&mut s, how, opt, 4, &p)?;
                }
                option_reply(&mut s, how, opt, 1, &[])?;
            }
            // GO
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&(script.data.len() as u64).to_be_bytes());
                // HAS_FLAGS | READ_ONLY | SEND_DF (structured reads) [| CAN_MULTI_CONN]
                let multi = if script.multi_conn { 0x100 } else { 0 };
                info.extend_from_slice(&(1u16 | 2 | 0x80 | multi).to_be_bytes());
                option_reply(&mut s, how, opt, 3, &info)?;
                if let Some((min, pref, max)) = script.block_sizes {
                    let mut b = 3u16.to_be_bytes().to_vec();
                    for x in [min, pref, max] {
                        b.extend_from_slice(&x.to_be_bytes());
                    }
                    option_reply(&mut s, how, opt, 3, &b)?;
                }
                option_reply(&mut s, how, opt, 1, &[])?;
                break;
            }
            // Anything else: unsupported.
            _ => option_reply(&mut s, how, opt, 0x8000_0001, &[])?,
        }
    }
    loop {
        let h = read_n(&mut s, 28)?;
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let q = Request {
            conn,
            flags: u16::from_be_bytes([h[4], h[5]]),
            cookie: u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(h[16..24].try_into().expect("8 bytes")),
            len: be32(&h, 24),
        };
        let mut r = Reply {
            s: &mut s,
            data: &script.data,
        };
        match kind {
            0 => (script.on_read)(&mut r, q)?,
            7 => (script.on_block_status)(&mut r, q)?,
            // DISC
            2 => return Ok(()),
            _ => r.error(DONE, q.cookie, 22)?,
        }
    }
}
