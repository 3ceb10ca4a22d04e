//! The control socket (`addcow serve --control PATH`): JSON-RPC 2.0, one JSON object per line,
//! requests answered in order on each connection, plus notifications ([`super::events`]).
//!
//! Threads: one accept thread; per connection a reader (parses a line, runs the method from
//! [`methods::METHODS`], queues the response) and a writer (sends queued responses and
//! notifications). Nothing the daemon does waits on a control client:
//!
//! * a line longer than [`MAX_LINE`] gets an `INVALID_REQUEST` error, then the connection closes
//!   (the rest of the line cannot be framed);
//! * a client that does not read: its queue is capped at [`MAX_QUEUED`] bytes and each write
//!   at [`WRITE_TIMEOUT`]; past either the connection is closed;
//! * at most [`MAX_CONNECTIONS`] connections; more are closed at once.
//!
//! A method runs on its connection's reader thread, so a slow one (`export-del` waiting for
//! clients) holds up only that connection.

mod job_methods;
pub mod methods;
pub mod resize;
pub mod rpc;

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::events::Sink;
use super::runtime::Host;
use rpc::{RpcError, INVALID_REQUEST, METHOD_NOT_FOUND};

/// Longest request line read (1 MiB).
pub const MAX_LINE: usize = 1 << 20;
/// Most bytes of responses and notifications queued for one client.
pub const MAX_QUEUED: usize = 8 << 20;
/// Longest a single write to a client may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most simultaneous control connections.
pub const MAX_CONNECTIONS: usize = 16;

/// The outgoing side of one connection: a queue of lines and the writer thread's wake-up.
struct Out {
    sock: UnixStream,
    st: Mutex<OutState>,
    cv: Condvar,
}

#[derive(Default)]
struct OutState {
    queue: VecDeque<Arc<[u8]>>,
    bytes: usize,
    /// No more lines will be queued: the writer ends when the queue is empty.
    finishing: bool,
    /// The connection is closed (client gone, too slow, or too much queued).
    dead: bool,
}

impl Out {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `line`; false when the connection is (now) closed.
    fn push(&self, line: Arc<[u8]>) -> bool {
        let mut st = self.lock();
        if st.dead {
            return false;
        }
        if st.bytes + line.len() > MAX_QUEUED {
            st.dead = true;
            st.queue.clear();
            drop(st);
            tracing::warn!(
                limit = MAX_QUEUED,
                "control client does not read its replies; closing the connection"
            );
            let _ = self.sock.shutdown(Shutdown::Both);
            self.cv.notify_all();
            return false;
        }
        st.bytes += line.len();
        st.queue.push_back(line);
        drop(st);
        self.cv.notify_all();
        true
    }

    fn finish(&self) {
        self.lock().finishing = true;
        self.cv.notify_all();
    }

    /// Whether everything queued was written (or the connection is closed).
    fn drained(&self) -> bool {
        let st = self.lock();
        st.dead || st.queue.is_empty()
    }

    /// The writer thread.
    fn run_writer(&self) {
        let mut sock = &self.sock;
        loop {
            let line = {
                let mut st = self.lock();
                loop {
                    if st.dead {
                        return;
                    }
                    if let Some(l) = st.queue.front() {
                        break l.clone();
                    }
                    if st.finishing {
                        return;
                    }
                    st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            };
            if let Err(e) = sock.write_all(&line) {
                tracing::info!(error = %e, "control client not reading or gone; closing");
                let mut st = self.lock();
                st.dead = true;
                st.queue.clear();
                drop(st);
                let _ = self.sock.shutdown(Shutdown::Both);
                self.cv.notify_all();
                return;
            }
            let mut st = self.lock();
            if st.dead {
                return;
            }
            st.queue.pop_front();
            st.bytes -= line.len();
            drop(st);
            self.cv.notify_all();
        }
    }
}

impl Sink for Out {
    fn deliver(&self, line: &Arc<[u8]>) -> bool {
        self.push(line.clone())
    }
}

/// The running control server.
pub struct ControlServer {
    listener: Arc<UnixListener>,
    stopping: Arc<AtomicBool>,
    outs: Arc<Mutex<Vec<Weak<Out>>>>,
}

impl ControlServer {
    /// Starts accepting on `listener` (already bound, mode set) for `host`.
    pub fn start(listener: UnixListener, host: Arc<Host>) -> io::Result<ControlServer> {
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let outs: Arc<Mutex<Vec<Weak<Out>>>> = Arc::default();
        let (l, s, o) = (listener.clone(), stopping.clone(), outs.clone());
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || accept_loop(&l, &s, &host, &o))?;
        Ok(ControlServer {
            listener,
            stopping,
            outs,
        })
    }

    /// Waits (up to `deadline`) until every queued response and notification was written, so a
    /// `quit` is answered before the process exits.
    pub fn flush(&self, deadline: Instant) {
        loop {
            let outs: Vec<Arc<Out>> = self
                .outs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            if outs.iter().all(|o| o.drained()) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops accepting (existing connections go on until their clients leave).
    pub fn stop_accepting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Ok(addr) = self.listener.local_addr() {
            if let Some(p) = addr.as_pathname() {
                let _ = UnixStream::connect(p);
            }
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    stopping: &AtomicBool,
    host: &Arc<Host>,
    outs: &Arc<Mutex<Vec<Weak<Out>>>>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    loop {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        if live.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!(
                max = MAX_CONNECTIONS,
                "control connection refused: too many connections"
            );
            let _ = sock.shutdown(Shutdown::Both);
            continue;
        }
        let id = next_id;
        next_id += 1;
        live.fetch_add(1, Ordering::SeqCst);
        let (host, live2, outs) = (host.clone(), live.clone(), outs.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("control-{id}"))
            .spawn(move || {
                serve_connection(sock, id, &host, &outs);
                live2.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            live.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot start a control connection thread");
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (without its newline).
enum Line {
    Full(Vec<u8>),
    TooLong,
    Eof,
}

fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Full(std::mem::take(buf)));
    }
    if buf.len() > MAX_LINE {
        return Ok(Line::TooLong);
    }
    // The last line, without a newline.
    Ok(Line::Full(std::mem::take(buf)))
}

/// Runs one request line: the response to queue, if any.
pub fn handle_line(host: &Host, line: &[u8]) -> Option<Vec<u8>> {
    let call = match rpc::parse(line) {
        Ok(c) => c,
        Err((id, e)) => {
            tracing::debug!(error = %e.message, "bad control request");
            return id.map(|id| rpc::response(&id, Err(e)));
        }
    };
    let result = match methods::find(&call.method) {
        Some(m) => {
            tracing::debug!(method = m.name, "control request");
            (m.call)(host, call.params)
        }
        None => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!("no method {:?} (try \"hello\")", call.method),
        )),
    };
    if let Err(e) = &result {
        tracing::info!(method = %call.method, error = %e.message, "control request failed");
    }
    call.id.map(|id| rpc::response(&id, result))
}

fn serve_connection(sock: UnixStream, id: u64, host: &Host, outs: &Mutex<Vec<Weak<Out>>>) {
    let (rsock, wsock) = match (sock.try_clone(), sock.try_clone()) {
        (Ok(r), Ok(w)) => (r, w),
        _ => return,
    };
    if wsock.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let out = Arc::new(Out {
        sock: wsock,
        st: Mutex::new(OutState::default()),
        cv: Condvar::new(),
    });
    {
        let mut o = outs.lock().unwrap_or_else(|p| p.into_inner());
        o.retain(|w| w.strong_count() > 0);
        o.push(Arc::downgrade(&out));
    }
    let sink: Arc<dyn Sink> = out.clone();
    host.events.subscribe(Arc::downgrade(&sink));
    let wout = out.clone();
    let writer = match std::thread::Builder::new()
        .name(format!("control-{id}-writer"))
        .spawn(move || wout.run_writer())
    {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a control writer thread");
            return;
        }
    };
    tracing::info!(conn = id, "control connection open");
    let mut reader = BufReader::with_capacity(64 << 10, rsock);
    let mut buf = Vec::new();
    let mut requests = 0u64;
    loop {
        match read_line(&mut reader, &mut buf) {
            Ok(Line::Eof) | Err(_) => break,
            Ok(Line::TooLong) => {
                let e = RpcError::new(
                    INVALID_REQUEST,
                    format!("request line longer than {MAX_LINE} bytes; closing the connection"),
                );
                tracing::warn!(conn = id, "control request line too long; closing");
                out.push(rpc::response(&Value::Null, Err(e)).into());
                break;
            }
            Ok(Line::Full(line)) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                requests += 1;
                if let Some(resp) = handle_line(host, &line) {
                    if !out.push(resp.into()) {
                        break;
                    }
                }
            }
        }
    }
    out.finish();
    let _ = writer.join();
    let _ = sock.shutdown(Shutdown::Both);
    drop(sink);
    tracing::info!(conn = id, requests, "control connection closed");
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn lines_are_framed_and_bounded() {
        let mut input = b"{\"a\":1}\n\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\nlast");
        let mut r = Cursor::new(input);
        let mut buf = Vec::new();
        assert!(matches!(read_line(&mut r, &mut buf).unwrap(), Line::Full(l) if l == b"{\"a\":1}"));
        assert!(matches!(read_line(&mut r, &mut buf).unwrap(), Line::Full(l) if l.is_empty()));
        assert!(matches!(
            read_line(&mut r, &mut buf).unwrap(),
            Line::TooLong
        ));
        // Exactly MAX_LINE bytes plus newline is fine.
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        let mut r = Cursor::new(exact);
        assert!(
            matches!(read_line(&mut r, &mut buf).unwrap(), Line::Full(l) if l.len() == MAX_LINE)
        );
        assert!(matches!(read_line(&mut r, &mut buf).unwrap(), Line::Eof));
    }

    #[test]
    fn a_client_that_never_reads_is_cut_off_at_the_queue_limit() {
        let (a, _b) = UnixStream::pair().unwrap();
        let out = Out {
            sock: a,
            st: Mutex::new(OutState::default()),
            cv: Condvar::new(),
        };
        // No writer thread: nothing drains, as with a client that never reads.
        let line: Arc<[u8]> = vec![b'x'; 64 << 10].into();
        let mut pushed = 0;
        while out.push(line.clone()) {
            pushed += 1;
            assert!(
                pushed <= MAX_QUEUED / line.len(),
                "queue grew past its limit"
            );
        }
        assert_eq!(pushed, MAX_QUEUED / line.len());
        assert!(out.drained(), "a dead connection holds nothing");
        assert!(!out.push(line), "stays closed");
    }
}
