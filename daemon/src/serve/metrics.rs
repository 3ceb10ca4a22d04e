//! `addcow serve --metrics ADDR`: Prometheus text exposition (format 0.0.4) at `GET /metrics`,
//! over HTTP on a TCP address (keep it on loopback) or a Unix socket path (any ADDR with a `/`).
//!
//! HTTP is `tiny_http` (a small synchronous server with its own threads); the exposition format
//! is `prometheus-client`'s encoder. Nothing is recorded into `prometheus-client` metrics: at
//! each scrape a [`Collector`] reads the daemon's own lock-free counters ([`crate::nbd::stats`])
//! and the engine's per-disk counters, so the request path never touches the metrics code.
//!
//! Series (labels `export`, and `op` = read, write, flush, trim, zeroes, block-status, cache,
//! other): `addcow_requests_total`, `addcow_request_bytes_total`, `addcow_request_errors_total`,
//! `addcow_request_duration_seconds` (histogram), `addcow_requests_in_flight`, `addcow_clients`,
//! `addcow_allocated_bytes`, `addcow_virtual_bytes`, `addcow_commits_total`,
//! `addcow_commits_failed_total`, `addcow_commit_waiters_total`, `addcow_base_read_bytes_total`,
//! `addcow_bits_set_total`; daemon-wide `addcow_exports` and `addcow_writer_panics_total`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::conn::connection::WRITER_PANICS;
use crate::conn::listener::Listener;
use crate::host::runtime::{engine_stats, Host};
use crate::nbd::export::Export;
use crate::nbd::stats::{Op, StatsSnapshot};

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

/// The running metrics endpoint.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    describe: String,
    /// The Unix socket file we created (removed at stop, and on every way out).
    file: std::sync::Mutex<Option<crate::conn::listener::SocketFile>>,
}

impl MetricsServer {
    /// Binds `addr` (a path with `/`: a Unix socket, mode 0600, same stale/live rules as the NBD
    /// socket; else a TCP address) and starts serving.
    pub fn start(addr: &str, host: Arc<Host>) -> Result<MetricsServer, String> {
        let mut file = None;
        let (listener, describe): (tiny_http::Listener, String) = if addr.contains('/') {
            let l = Listener::bind_unix(std::path::Path::new(addr), 0o600)
                .map_err(|e| format!("--metrics {addr}: {e}"))?;
            let Some((sock, f)) = l.into_unix() else {
                return Err(format!("--metrics {addr}: not a Unix socket"));
            };
            file = f;
            (sock.into(), addr.to_string())
        } else {
            let l = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("--metrics {addr}: bind: {e}"))?;
            let local = l
                .local_addr()
                .map_err(|e| format!("--metrics {addr}: {e}"))?;
            if !local.ip().is_loopback() {
                tracing::warn!(%addr, "metrics endpoint is not on loopback");
            }
            (l.into(), local.to_string())
        };
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| format!("--metrics {addr}: {e}"))?;
        let server = Arc::new(server);
        let s = server.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&s, &host))
            .map_err(|e| format!("metrics thread: {e}"))?;
        if let Some(f) = &mut file {
            f.publish().map_err(|e| format!("--metrics {addr}: {e}"))?;
        }
        Ok(MetricsServer {
            server,
            describe,
            file: std::sync::Mutex::new(file),
        })
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Stops the serving thread and removes the Unix socket file, if any.
    pub fn stop(&self) {
        self.server.unblock();
        drop(self.file.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

fn serve(server: &tiny_http::Server, host: &Arc<Host>) {
    use tiny_http::{Header, Method, Response};
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("");
        let resp = match (req.method(), path) {
            (Method::Get | Method::Head, "/metrics") => {
                let body = render(host);
                let ct = Header::from_bytes(
                    &b"Content-Type"[..],
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE.as_bytes(),
                )
                .ok();
                let mut r = Response::from_string(body);
                if let Some(ct) = ct {
                    r = r.with_header(ct);
                }
                r
            }
            (_, "/metrics") => Response::from_string("only GET\n").with_status_code(405),
            _ => Response::from_string("not found; try /metrics\n").with_status_code(404),
        };
        if let Err(e) = req.respond(resp) {
            tracing::debug!(error = %e, "metrics client gone");
        }
    }
}
