//! The transports: NBD connections from accept to close, over a Unix socket or TCP.
//!
//! Request path (see `docs/ARCHITECTURE.md`, "A request's way"): [`listener`] accepts, a thread
//! per connection runs the [`crate::nbd::handshake`], then the connection runs on its engine
//! core as a [`ring_conn::RingConn`]: received on the core's io_uring, parsed and validated
//! ([`crate::nbd::command`]), submitted on the core, answered with one `sendmsg` per core turn
//! ([`crate::nbd::reply`]). With `--conn-mode threads`, [`connection`]'s reader thread parses and
//! submits and [`outbox`]'s writer thread sends the replies instead.
//!
//! Modules: [`connection`] (handshake, then the reader), [`ring_conn`] (a connection on its
//! core), [`plan`] (what both do with a request: one planner they execute), [`conn_config`]
//! (what both share), [`outbox`] (reply queue and writer), [`budget`]
//! (in-flight limits and the daemon-wide buffer pool), [`conns`] (live connections and the one
//! way they are stopped), [`sock`] (a client socket), [`listener`] (listening sockets, their
//! hygiene, systemd), [`tls`] (STARTTLS: credentials, the TLS handshake, transmission over TLS).
//!
//! May import: [`crate::nbd`], [`crate::backend`], [`crate::process`]. Never the host or the
//! process's top ([`crate::serve`]): the host reaches connections through the export table's
//! client handles.

pub mod budget;
pub mod conn_config;
pub mod connection;
pub mod conns;
pub mod listener;
pub mod outbox;
pub mod plan;
pub mod ring_conn;
pub mod sock;
pub mod tls;
#[cfg(test)]
mod transport_tests;
