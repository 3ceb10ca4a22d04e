//! What every connection shares whichever way it is served (a reader and a writer thread,
//! `connection.rs`, or its core's ring, `ring_conn.rs`): the settings, the per-connection
//! request limit, the totals logged when it closes, and the writer-panic counter.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use super::budget::Pool;
use crate::nbd::export::Exports;

/// Writer threads that panicked since the daemon started (each one ended its connection).
pub static WRITER_PANICS: AtomicU64 = AtomicU64::new(0);

/// Requests in flight per connection.
pub const MAX_IN_FLIGHT: usize = 128;

/// Settings and shared state every connection sees.
pub struct ConnConfig {
    /// The exports.
    pub exports: Arc<Exports>,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// The daemon-wide buffer budget.
    pub pool: Arc<Pool>,
    /// Time allowed for a request frame (header and WRITE payload) once its first byte came.
    pub payload_timeout: Duration,
    /// Close a connection with nothing in flight that sent no request and took no reply for
    /// this long (also: a client that takes no reply byte for this long is dropped).
    pub idle_timeout: Option<Duration>,
    /// Serve transmission on the connection's core of this engine ([`super::ring_conn`])
    /// instead of with a reader and a writer thread (`--conn-mode ring`).
    pub ring: Option<addcow_engine::Engine>,
    /// TLS credentials and mode (`None`: `--tls off`). A connection that negotiates TLS is
    /// served on threads ([`super::connection`]), never on a core's ring.
    pub tls: Option<Arc<super::tls::TlsServer>>,
}

impl ConnConfig {
    /// Settings for tests: 10 s handshake, a 256 MiB pool, 30 s payload timeout, no idle
    /// timeout.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn for_tests(exports: Arc<Exports>) -> ConnConfig {
        ConnConfig {
            exports,
            handshake_timeout: Duration::from_secs(10),
            pool: Pool::new(256 << 20),
            payload_timeout: Duration::from_secs(30),
            idle_timeout: None,
            ring: None,
            tls: None,
        }
    }
}

/// Totals of one connection, logged when it closes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Requests received (valid or not).
    pub requests: u64,
    /// Bytes written by the client.
    pub bytes_written: u64,
    /// Bytes sent back as READ data.
    pub bytes_read: u64,
    /// Error replies sent.
    pub errors: u64,
    /// The writer thread panicked (the connection was ended).
    pub writer_panicked: bool,
}

/// How a connection ended, for the one log line written once its slot is free.
#[derive(Debug)]
pub enum Ended {
    /// The client left (or was dropped) before transmission.
    Handshake,
    /// Transmission ran; its totals.
    Transmission { export: String, totals: Totals },
}

impl Ended {
    /// Writes the connection's closing log line.
    pub fn log(&self, id: u64, peer: &str) {
        match self {
            Ended::Handshake => {
                tracing::info!(conn = id, %peer, "connection closed during handshake")
            }
            Ended::Transmission { export, totals: t } => tracing::info!(
                conn = id,
                %peer,
                export = %export,
                requests = t.requests,
                bytes_written = t.bytes_written,
                bytes_read = t.bytes_read,
                errors = t.errors,
                "connection closed"
            ),
        }
    }
}
