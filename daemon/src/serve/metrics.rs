//! `addcow serve --metrics ADDR`: Prometheus text exposition (format 0.0.4) at `GET /metrics`,
//! over HTTP on a TCP address (loopback unless `--metrics-allow-remote`) or a Unix socket path
//! (any ADDR with a `/`, mode 0600).
//!
//! HTTP is the least a scraper needs, read by a small bounded reader ([`serve_one`]): one
//! request per connection (`Connection: close`), a request head of at most
//! [`MAX_REQUEST_HEAD`] bytes (longer: 431 and the connection is closed, nothing more is
//! read), the whole exchange within [`REQUEST_TIMEOUT`], at most [`MAX_CONNECTIONS`] at once
//! (one more closes the one that has waited longest: idle connections cannot lock a scraper
//! out). Nothing a client sends grows the daemon by more than those bounds. The exposition
//! format is `prometheus-client`'s encoder. Nothing is recorded into `prometheus-client` metrics: at
//! each scrape a [`Collector`] reads the daemon's own lock-free counters ([`crate::nbd::stats`])
//! and the engine's per-disk counters, so the request path never touches the metrics code.
//!
//! Series (labels `export`, and `op` = read, write, flush, trim, zeroes, block-status, cache,
//! other): `addcow_requests_total`, `addcow_request_bytes_total`, `addcow_request_errors_total`,
//! `addcow_request_duration_seconds` (histogram), `addcow_requests_in_flight`, `addcow_clients`,
//! `addcow_allocated_bytes`, `addcow_virtual_bytes`, `addcow_commits_total`,
//! `addcow_commits_failed_total`, `addcow_commit_waiters_total`, `addcow_base_read_bytes_total`,
//! `addcow_bits_set_total`, `addcow_throttled_requests_total`, `addcow_throttled_seconds_total`,
//! `addcow_throttle_queued`; daemon-wide `addcow_exports`, `addcow_writer_panics_total` and
//! `addcow_refused_connections_total` (label `socket`: connections refused by a socket's
//! allow-list).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::conn::connection::WRITER_PANICS;
use crate::conn::listener::{self, Listener, SocketKind};
use crate::conn::sock::{Deadline, Sock};
use crate::host::runtime::{engine_stats, Host};
use crate::host::throttle::export_stats as export_throttle_stats;
use crate::nbd::export::Export;
use crate::nbd::stats::{Op, StatsSnapshot};
use addcow_engine::sync::lock;

/// Reads the daemon's counters at each scrape.
struct DaemonCollector {
    host: Arc<Host>,
}

impl std::fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DaemonCollector")
    }
}

type Row<'a> = (&'a Export, StatsSnapshot, addcow_engine::DiskStats);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[Row],
    value: impl Fn(&Row) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for r in rows {
        let labels = [("export", r.0.name.as_str())];
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value(r), None)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[Row],
    value: impl Fn(&Row) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for r in rows {
        let labels = [("export", r.0.name.as_str())];
        m.encode_family(&labels)?.encode_gauge(&value(r))?;
    }
    Ok(())
}

fn per_op(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[Row],
    value: impl Fn(&crate::nbd::stats::OpSnapshot) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for r in rows {
        for op in Op::ALL {
            let labels = [("export", r.0.name.as_str()), ("op", op.name())];
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&value(r.1.op(op)), None)?;
        }
    }
    Ok(())
}

/// `addcow_throttled_requests_total`, `addcow_throttled_seconds_total` and
/// `addcow_throttle_queued`, per export (over every disk the export had).
fn throttle_series(enc: &mut DescriptorEncoder, rows: &[Row]) -> Result<(), std::fmt::Error> {
    let stats: Vec<_> = rows
        .iter()
        .map(|r| (r.0.name.as_str(), export_throttle_stats(r.0)))
        .collect();
    let mut m = enc.encode_descriptor(
        "addcow_throttled_requests",
        "Requests that waited for their throttle group's budget before submission.",
        None,
        MetricType::Counter,
    )?;
    for (name, s) in &stats {
        m.encode_family(&[("export", *name)])?
            .encode_counter::<NoLabelSet, _, u64>(&s.throttled_requests, None)?;
    }
    let mut m = enc.encode_descriptor(
        "addcow_throttled_seconds",
        "Time requests spent waiting for their throttle group's budget.",
        None,
        MetricType::Counter,
    )?;
    for (name, s) in &stats {
        m.encode_family(&[("export", *name)])?
            .encode_counter::<NoLabelSet, _, f64>(&(s.throttled_ns as f64 / 1e9), None)?;
    }
    let mut m = enc.encode_descriptor(
        "addcow_throttle_queued",
        "Requests waiting for their throttle group's budget now.",
        None,
        MetricType::Gauge,
    )?;
    for (name, s) in &stats {
        m.encode_family(&[("export", *name)])?
            .encode_gauge(&s.queued)?;
    }
    Ok(())
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let exports = self.host.exports.all();
        let rows: Vec<Row> = exports
            .iter()
            .map(|e| (e.as_ref(), e.stats.snapshot(), engine_stats(e)))
            .collect();
        let e = &mut enc;
        per_op(
            e,
            "addcow_requests",
            "Requests ended (answered, or dropped with their client), per export and operation.",
            &rows,
            |o| o.requests,
        )?;
        per_op(
            e,
            "addcow_request_bytes",
            "Bytes the ended requests covered (payload of reads and writes, range of the others).",
            &rows,
            |o| o.bytes,
        )?;
        per_op(
            e,
            "addcow_request_errors",
            "Error replies, per export and operation.",
            &rows,
            |o| o.errors,
        )?;
        {
            let mut m = e.encode_descriptor(
                "addcow_request_duration_seconds",
                "Time from request header parsed to reply handed to the kernel.",
                None,
                MetricType::Histogram,
            )?;
            for r in &rows {
                for op in Op::ALL {
                    let o = r.1.op(op);
                    let labels = [("export", r.0.name.as_str()), ("op", op.name())];
                    m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                        o.latency_sum_ns as f64 / 1e9,
                        o.latency_count(),
                        &o.prometheus_buckets(),
                        None,
                    )?;
                }
            }
        }
        gauge(
            e,
            "addcow_requests_in_flight",
            "Requests taken in and not answered yet.",
            &rows,
            |r| r.1.in_flight(),
        )?;
        gauge(
            e,
            "addcow_clients",
            "NBD connections in transmission.",
            &rows,
            |r| r.0.client_count() as u64,
        )?;
        gauge(
            e,
            "addcow_allocated_bytes",
            "Bytes held by the raw image (bits set).",
            &rows,
            |r| r.0.backend.disk().map(|d| d.allocated_bytes()).unwrap_or(0),
        )?;
        gauge(
            e,
            "addcow_virtual_bytes",
            "Virtual size of the export.",
            &rows,
            |r| r.0.backend.size(),
        )?;
        counter(
            e,
            "addcow_commits",
            "Group commits that completed.",
            &rows,
            |r| r.2.commits,
        )?;
        counter(
            e,
            "addcow_commits_failed",
            "Group commits that failed.",
            &rows,
            |r| r.2.commits_failed,
        )?;
        counter(
            e,
            "addcow_commit_waiters",
            "FLUSH/FUA requests answered by commits (divided by commits: the batch size).",
            &rows,
            |r| r.2.commit_waiters,
        )?;
        counter(
            e,
            "addcow_base_read_bytes",
            "Bytes read from the base.",
            &rows,
            |r| r.2.base_bytes_read,
        )?;
        counter(
            e,
            "addcow_bits_set",
            "Sectors whose bit went from clear to set.",
            &rows,
            |r| r.2.bits_set,
        )?;
        throttle_series(e, &rows)?;
        {
            let m =
                e.encode_descriptor("addcow_exports", "Exports served.", None, MetricType::Gauge)?;
            let mut m = m;
            m.encode_gauge(&(exports.len() as u64))?;
        }
        let mut m = e.encode_descriptor(
            "addcow_writer_panics",
            "Connection writer threads that panicked (each ended its connection).",
            None,
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, _, u64>(&WRITER_PANICS.load(Ordering::Relaxed), None)?;
        let mut m = e.encode_descriptor(
            "addcow_refused_connections",
            "Connections refused because their peer is not in the socket's allow-list.",
            None,
            MetricType::Counter,
        )?;
        for k in SocketKind::ALL {
            m.encode_family(&[("socket", k.name())])?
                .encode_counter::<NoLabelSet, _, u64>(&listener::refused(k), None)?;
        }
        for (name, help, v) in [
            (
                "addcow_tls_handshakes",
                "TLS handshakes that succeeded.",
                &crate::conn::tls::TLS_HANDSHAKES,
            ),
            (
                "addcow_tls_handshake_failures",
                "TLS handshakes that failed (credentials, garbage, time limit, client gone).",
                &crate::conn::tls::TLS_HANDSHAKE_FAILURES,
            ),
            (
                "addcow_tls_authz_denied",
                "TLS clients refused by the daemon's or an export's authorization list.",
                &crate::nbd::handshake::TLS_AUTHZ_DENIED,
            ),
        ] {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            m.encode_counter::<NoLabelSet, _, u64>(&v.load(Ordering::Relaxed), None)?;
        }
        Ok(())
    }
}

/// The exposition text for `host` now.
pub fn render(host: &Arc<Host>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector { host: host.clone() }));
    let mut out = String::new();
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        out.clear();
        let _ = writeln!(out, "# encoding failed");
    }
    out
}

/// Longest request head (request line and headers) read from a client.
pub const MAX_REQUEST_HEAD: usize = 8 << 10;
/// Time a client has, from its accept, to send its request head and take the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once; one more closes the one that has waited longest.
pub const MAX_CONNECTIONS: usize = 16;

/// The connections being served: (id, accepted at, a handle to close it).
type Conns = Mutex<Vec<(u64, Instant, Sock)>>;

/// The running metrics endpoint.
pub struct MetricsServer {
    listener: Arc<Listener>,
    stopping: Arc<AtomicBool>,
    describe: String,
    /// The Unix socket file we created (removed at stop, and on every way out).
    file: Mutex<Option<listener::SocketFile>>,
}

impl MetricsServer {
    /// Binds `addr` (a path with `/`: a Unix socket, mode 0600, same stale/live rules as the NBD
    /// socket; else a TCP address, refused off loopback unless `allow_remote`) and starts
    /// serving.
    pub fn start(addr: &str, host: Arc<Host>, allow_remote: bool) -> Result<MetricsServer, String> {
        let mut file = None;
        let (listener, describe) = if addr.contains('/') {
            let l = Listener::bind_unix(std::path::Path::new(addr), 0o600)
                .map_err(|e| format!("--metrics {addr}: {e}"))?;
            let Some((sock, f)) = l.into_unix() else {
                return Err(format!("--metrics {addr}: not a Unix socket"));
            };
            file = f;
            let l = Listener::Unix {
                sock,
                file: None,
                policy: None,
            };
            (l, addr.to_string())
        } else {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("--metrics {addr}: bind: {e}"))?;
            let local = l
                .local_addr()
                .map_err(|e| format!("--metrics {addr}: {e}"))?;
            if !local.ip().is_loopback() {
                if !allow_remote {
                    return Err(format!("--metrics {addr}: not a loopback address; anyone who reaches it reads the export names and counters (add --metrics-allow-remote to mean it)"));
                }
                tracing::warn!(%addr, "metrics endpoint is not on loopback");
            }
            (Listener::Tcp(l), local.to_string())
        };
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let (l, st) = (listener.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_loop(&l, &st, &host))
            .map_err(|e| format!("metrics thread: {e}"))?;
        if let Some(f) = &mut file {
            f.publish().map_err(|e| format!("--metrics {addr}: {e}"))?;
        }
        Ok(MetricsServer {
            listener,
            stopping,
            describe,
            file: Mutex::new(file),
        })
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Stops the serving thread and removes the Unix socket file, if any.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept (it fails from now on).
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        drop(lock(&self.file).take());
    }
}

/// Accepts until stopped; each connection is served on its own thread, at most
/// [`MAX_CONNECTIONS`] at once (one more closes the oldest).
fn accept_loop(listener: &Listener, stopping: &AtomicBool, host: &Arc<Host>) {
    let conns: Arc<Conns> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let sock = match listener.accept() {
            Ok(s) => s,
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let id = next_id;
        next_id += 1;
        let Ok(handle) = sock.try_clone() else {
            continue;
        };
        {
            let mut c = lock(&conns);
            if c.len() >= MAX_CONNECTIONS {
                // The one accepted first has waited longest: it goes.
                if let Some(i) = (0..c.len()).min_by_key(|&i| c[i].1) {
                    let (old, _, s) = c.swap_remove(i);
                    let _ = s.shutdown(Shutdown::Both);
                    tracing::debug!(conn = old, "metrics connection closed to make room");
                }
            }
            c.push((id, Instant::now(), handle));
        }
        let (host, conns2) = (host.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("metrics-{id}"))
            .spawn(move || {
                if let Err(e) = serve_one(sock, &host) {
                    tracing::debug!(error = %e, "metrics client");
                }
                lock(&conns2).retain(|(i, _, _)| *i != id);
            });
        if spawned.is_err() {
            let mut c = lock(&conns);
            if let Some(i) = c.iter().position(|(i, _, _)| *i == id) {
                let (_, _, s) = c.swap_remove(i);
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Where the request head ends (after its blank line), if it is complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Serves one request on `sock`: reads the head (bounded in size and time), answers, closes.
fn serve_one(mut sock: Sock, host: &Arc<Host>) -> io::Result<()> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut head: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = Deadline::new(&mut sock, deadline).read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head) {
            break end;
        }
        if head.len() > MAX_REQUEST_HEAD {
            let body = format!("request head longer than {MAX_REQUEST_HEAD} bytes\n");
            let _ = respond(
                &mut sock,
                deadline,
                431,
                "Request Header Fields Too Large",
                "text/plain",
                &body,
                true,
            );
            let _ = sock.shutdown(Shutdown::Both);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too long",
            ));
        }
    };
    let line = head[..end].split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_ascii_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let r = match (method, path) {
        ("GET" | "HEAD", "/metrics") => respond(
            &mut sock,
            deadline,
            200,
            "OK",
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            &render(host),
            method == "GET",
        ),
        (_, "/metrics") => respond(
            &mut sock,
            deadline,
            405,
            "Method Not Allowed",
            "text/plain",
            "only GET\n",
            true,
        ),
        _ => respond(
            &mut sock,
            deadline,
            404,
            "Not Found",
            "text/plain",
            "not found; try /metrics\n",
            true,
        ),
    };
    let _ = sock.shutdown(Shutdown::Both);
    r
}

/// Writes one response (`Connection: close`) before `deadline`.
fn respond(
    sock: &mut Sock,
    deadline: Instant,
    code: u16,
    reason: &str,
    content_type: &str,
    body: &str,
    with_body: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body.as_bytes());
    }
    Deadline::new(sock, deadline).write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_end_at_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nX: AAAA"), None);
    }
}
