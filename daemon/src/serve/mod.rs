//! `addcow serve`: the process's top, which wires the layers together (see the crate docs):
//! the command line ([`ServeArgs`]) and what it means once checked ([`config::DaemonConfig`]),
//! [`run`] (engine, exports, listeners, control socket, signals, then the accept loop that
//! hands each connection to [`crate::conn`]), the Prometheus endpoint ([`metrics`]), the
//! built-in [`demo`] and the fuzz entry points (`harness`, feature `fuzzing`).
//!
//! May import every layer; no layer imports this one.

pub mod config;
pub mod config_file;
pub mod demo;
#[cfg(any(test, feature = "fuzzing"))]
pub mod harness;
pub mod metrics;

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use addcow_engine::{CacheMode, Engine};

use self::config::{
    parse_bytes, parse_cache, parse_group, parse_mode, parse_user, secs_parser, DaemonConfig,
    ExportSpec, MAX_SECS,
};

use crate::backend::files::OverlayFiles;
use crate::conn::budget::Pool;
use crate::conn::connection::{self, ConnConfig};
use crate::conn::conns::{ClientHandle, Live};
use crate::conn::listener::{self, Listener};
use crate::conn::tls::{TlsMode, TlsServer};
use crate::error::{Error, ErrorKind, Result};
use crate::host::allow::AllowedDirs;
use crate::host::control;
use crate::host::control::methods::add_export_params;
use crate::host::events;
use crate::host::runtime::{Host, Origin};
use crate::host::state::{ConfigExport, Planned, State};
use crate::nbd::export::Exports;
use crate::process::lockfile::LockedFile;
use crate::process::signals;

/// Arguments of `addcow serve`, as clap reads them; [`DaemonConfig`]'s `TryFrom` checks and
/// converts them (a new option goes here and into [`DaemonConfig`]).
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Read options and exports from this TOML file: a [serve] table whose keys are these
    /// long option names (a repeatable option takes a list), and [[export]] tables with
    /// export-add's parameters (name, overlay, read-only, type, ...). The command line
    /// overrides the file option by option. No file is read unless this is given.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Record the exports the control socket adds, deletes, snapshots and throttles, and the
    /// throttle groups it sets and deletes, in this file (JSON, replaced atomically, durable
    /// before each reply) and serve them again at start.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// The `[[export]]` tables of --config, as export-add parameters (filled by
    /// [`config_file::merge`], not by clap).
    #[arg(skip)]
    pub file_exports: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Unix socket to listen on (default with no overlay: ./addcow.sock, the demo). The path
    /// appears once the daemon accepts connections; PATH.lock beside it is held meanwhile.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// An export: NAME=OVERLAY (the .add-cow file); NAME=OVERLAY:ro serves it read-only.
    /// Repeatable; all share one engine. Options follow as ,key=value: bitmap=B (repeatable)
    /// also serves the disk's dirty bitmap B as qemu:dirty-bitmap:B; throttling takes QEMU's
    /// limits (iops-total, iops-read, iops-write, bps-total, bps-read, bps-write, each with -max
    /// and -max-length; iops-size; byte values take K/M/G: bps-write=50M), or
    /// throttle-group=GROUP to share a --throttle-group's budget.
    #[arg(
        long = "export",
        value_name = "NAME=OVERLAY[:ro][,bitmap=B][,iops-total=N,...|,throttle-group=G]"
    )]
    pub exports: Vec<String>,
    /// A named throttle group: GROUP:key=value,... with QEMU's limit names (as in --export);
    /// exports given throttle-group=GROUP share its one budget. Repeatable. More groups can be
    /// made and changed live on the control socket (throttle-group-set).
    #[arg(long = "throttle-group", value_name = "GROUP:iops-total=N,...")]
    pub throttle_groups: Vec<String>,
    /// Serve every command-line export read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Control socket (JSON-RPC 2.0, one object per line; mode 0600): add and remove exports
    /// at runtime, query them, quit. With it the daemon may start with no export.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// A folder export-add may open overlays, raw images and bases in (their real paths).
    /// Repeatable. Default: the folders of the command-line overlays and of their raw images
    /// and bases; with neither, export-add is refused.
    #[arg(long = "allow-dir", value_name = "DIR")]
    pub allow_dirs: Vec<PathBuf>,
    /// Let export-add open overlays whose base (of any layer) is a TCP image server
    /// (`nbd://HOST:PORT/...`). Without it such an add is refused: the daemon would connect
    /// anywhere a control client names. An `nbd+unix` base's socket must lie in an allowed
    /// folder either way.
    #[arg(long)]
    pub allow_remote_bases: bool,
    /// Serve Prometheus metrics at GET /metrics over HTTP on ADDR: a TCP address (keep it on
    /// loopback, e.g. 127.0.0.1:9810) or a Unix socket path (anything with a '/').
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Also listen on TCP (e.g. 127.0.0.1:10809). NBD has no authentication without TLS: anyone
    /// who reaches the port can read and write every export. Only loopback addresses are accepted unless --allow-remote
    /// is given, and then only with --tls require (or --allow-insecure-remote).
    #[arg(long, value_name = "ADDR:PORT")]
    pub tcp: Option<String>,
    /// Let --tcp listen on a non-loopback address; with TLS required (--tls require, the
    /// default once --tls-creds or --tls-psk is given) unless --allow-insecure-remote.
    #[arg(long)]
    pub allow_remote: bool,
    /// Let a non-loopback TCP listener (--tcp, or a systemd socket) serve without TLS required:
    /// anyone who reaches it reads and writes every export (implies --allow-remote).
    #[arg(long)]
    pub allow_insecure_remote: bool,
    /// TLS on NBD connections (STARTTLS): off, on (offered; clients may stay in the clear) or
    /// require (on TCP every option but STARTTLS is refused before TLS: no downgrade). Default:
    /// require when --tls-creds or --tls-psk is given, else off. On a Unix socket TLS is offered
    /// but never required.
    #[arg(long, value_enum, value_name = "MODE")]
    pub tls: Option<crate::conn::tls::TlsMode>,
    /// x509 credentials folder: ca-cert.pem, server-cert.pem, server-key.pem (QEMU's
    /// tls-creds-x509 layout). Reloaded on SIGHUP and control tls-reload.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Pre-shared keys file: IDENTITY:HEXKEY lines (as qemu's tls-creds-psk keys.psk and
    /// nbdkit's --tls-psk). Reloaded on SIGHUP and control tls-reload.
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// Require a client certificate signed by the CA of --tls-creds.
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// A TLS identity allowed to connect: a client certificate's subject DN in RFC 4514 form
    /// (CN=alice,O=example) or a PSK identity. Repeatable; others are disconnected right after
    /// the TLS handshake. Needs --tls require.
    #[arg(long = "tls-authz", value_name = "DN-OR-IDENTITY")]
    pub tls_authz: Vec<String>,
    /// Permission bits of the NBD socket file (--socket), in octal. The vhost-user-blk and
    /// control sockets have their own (--vhost-socket-mode, --control-mode).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub socket_mode: u32,
    /// Group of the NBD socket file (a name or a number; the daemon must be a member), so that
    /// a mode like 0660 lets that group's users in.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub socket_group: Option<u32>,
    /// Let only these users connect to the NBD Unix socket(s), checked on each connection with
    /// SO_PEERCRED (names or numbers, comma-separated or repeated; with --socket-allow-gid a
    /// peer matching either gets in; the daemon's own user is not implied). Refused
    /// connections are logged and counted (addcow_refused_connections_total, query-sockets).
    /// Not for --tcp (no peer credentials there).
    #[arg(long, value_name = "USER", value_delimiter = ',', value_parser = parse_user)]
    pub socket_allow_uid: Vec<u32>,
    /// Let only members of these groups (primary or supplementary) connect to the NBD Unix
    /// socket(s); see --socket-allow-uid.
    #[arg(long, value_name = "GROUP", value_delimiter = ',', value_parser = parse_group)]
    pub socket_allow_gid: Vec<u32>,
    /// Permission bits of the --vhost-user-blk socket file, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub vhost_socket_mode: u32,
    /// Group of the --vhost-user-blk socket file (a name or a number).
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub vhost_socket_group: Option<u32>,
    /// Let only these users' frontends be served on the vhost-user-blk sockets (--vhost-user-blk
    /// and export-add's), checked on each connection with SO_PEERCRED (names or numbers,
    /// comma-separated or repeated; with --vhost-socket-allow-gid a peer matching either gets
    /// in; the daemon's own user is not implied). A refused frontend is disconnected before
    /// any request of it is served, logged and counted (addcow_refused_connections_total,
    /// query-sockets).
    #[arg(long, value_name = "USER", value_delimiter = ',', value_parser = parse_user)]
    pub vhost_socket_allow_uid: Vec<u32>,
    /// Let only members of these groups (primary or supplementary) be served on the
    /// vhost-user-blk sockets; see --vhost-socket-allow-uid.
    #[arg(long, value_name = "GROUP", value_delimiter = ',', value_parser = parse_group)]
    pub vhost_socket_allow_gid: Vec<u32>,
    /// Permission bits of the control socket file, in octal. Whoever connects can add and
    /// remove exports and open files in the allowed folders: keep it narrow.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    pub control_mode: u32,
    /// Group of the control socket file (a name or a number).
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub control_group: Option<u32>,
    /// Let only these users connect to the control socket (SO_PEERCRED; names or numbers,
    /// comma-separated or repeated; see --socket-allow-uid).
    #[arg(long, value_name = "USER", value_delimiter = ',', value_parser = parse_user)]
    pub control_allow_uid: Vec<u32>,
    /// Let only members of these groups connect to the control socket (see
    /// --control-allow-uid).
    #[arg(long, value_name = "GROUP", value_delimiter = ',', value_parser = parse_group)]
    pub control_allow_gid: Vec<u32>,
    /// Close a control connection that sent no request for this many seconds (0: never). A
    /// client that only listens for notifications sends `hello` now and then.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = secs_parser())]
    pub control_idle_timeout: u64,
    /// Let --metrics listen on a non-loopback TCP address (anyone who reaches it reads the
    /// export names and counters).
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Write the daemon's pid here. The file is locked while the daemon runs (a second daemon
    /// with the same pid file is refused) and removed at exit.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Most simultaneous connections; more are accepted and closed at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_connections: usize,
    /// Most bytes of request buffers (WRITE payloads, READ data, block-status replies) held at
    /// once by all connections together, shared fairly between them; a client over its share
    /// is not read from until its replies go out. K/M/G/T suffixes (binary). Default: an eighth
    /// of the machine's memory (at least 64M).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub max_buffer_memory: Option<u64>,
    /// Seconds a client has to finish the handshake.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = secs_parser())]
    pub handshake_timeout: u64,
    /// Seconds a request frame (header and WRITE payload) may take to arrive once its first
    /// byte came; a client that trickles or stalls inside a frame is disconnected.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = secs_parser())]
    pub payload_timeout: u64,
    /// Disconnect a client that sent no request and took no reply for this many seconds (with
    /// nothing in flight), or that takes no reply byte for this long. Default: never.
    #[arg(long, value_name = "SECS", value_parser = secs_parser())]
    pub idle_timeout: Option<u64>,
    /// On SIGTERM/SIGINT/quit (and export-del hard): seconds to wait for the requests in flight
    /// to be answered before the remaining connections are closed. New requests are never
    /// failed by a stop: they are not read, and a reconnecting client resends them.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = secs_parser())]
    pub shutdown_grace: u64,
    /// Engine core threads (default: one per CPU).
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
    /// Seconds a read of a remote (NBD) base may wait for its image server (reconnects
    /// included) before it fails with EIO.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub base_timeout: u64,
    /// Copy-on-read for every export (command line and, unless it says otherwise, export-add):
    /// a read served from the base is also copied into the overlay's raw image (data durable
    /// before bits, as for any write), so a VM's working set moves to the local disk once.
    #[arg(long)]
    pub copy_on_read: bool,
    /// Cache mode of the raw images: direct (O_DIRECT) or buffered.
    #[arg(long, value_name = "MODE", default_value = "direct", value_parser = parse_cache)]
    pub cache: CacheMode,
    /// Also serve the default export (OVERLAY) to one vhost-user-blk frontend at a time (QEMU's
    /// vhost-user-blk-pci, libblkio's virtio-blk-vhost-user) on this Unix socket; a frontend
    /// that disconnects can connect again. One request queue per engine core.
    #[arg(long, value_name = "SOCKET")]
    pub vhost_user_blk: Option<PathBuf>,
    /// Seconds to wait for an overlay locked by another process before refusing it (command
    /// line and export-add). A daemon restarted right after a SIGKILL can find its overlay
    /// still locked for a moment: the kernel releases a dead process's io_uring, and the files
    /// it holds, asynchronously. 0 refuses at once.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = secs_parser())]
    pub lock_wait: u64,
    /// Extent-ahead allocation of sparse raw images: the first write into a clear region also
    /// allocates (fallocate, no data written) the aligned extent of this size around it, once,
    /// so later writes there do not allocate. A power of two of at least 4K (1M is a sensible
    /// size); 0, the default, turns it off (on ext4 it measured within noise of off).
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_bytes)]
    pub extent_ahead: u64,
    /// The default export (empty name). With no overlay, no --export and no --control: the
    /// built-in demo.
    #[arg(value_name = "OVERLAY")]
    pub overlay: Option<PathBuf>,
    /// Cache mode of the bases (every layer of a backing chain), for every export: direct
    /// (O_DIRECT) or buffered (through the page cache, shared by every overlay on one base).
    #[arg(long, value_name = "MODE", default_value = "direct", value_parser = parse_cache)]
    pub base_cache: CacheMode,
    /// How a connection is served once its handshake is done: `ring` (received, executed and
    /// answered on its engine core's io_uring, no thread hop per request) or `threads` (a reader
    /// and a writer thread per connection, the fallback).
    #[arg(long, value_enum, default_value_t = ConnMode::Ring)]
    pub conn_mode: ConnMode,
    /// Seconds after a write before a background commit makes it durable and persists its bits
    /// when no FLUSH/FUA came (bounds what a crash without any FLUSH loses; a guest's FLUSH
    /// commits at once either way). Each background commit costs a data sync of the raw image,
    /// which stalls concurrent writes for as long as the device takes to flush; 0 commits only
    /// on FLUSH/FUA, export-del and shutdown.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = secs_parser())]
    pub commit_interval: u64,
}

/// How connections in transmission are served (`--conn-mode`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnMode {
    /// A reader and a writer thread per connection.
    Threads,
    /// On the connection's engine core ([`crate::conn::ring_conn`]).
    Ring,
}

/// Runs the daemon until SIGTERM/SIGINT or `quit`. `cli`: the command-line words after
/// `serve` (which options the command line gave, so they override `--config`'s).
pub fn run(args: ServeArgs, cli: &[std::ffi::OsString]) -> ExitCode {
    init_logging();
    let args = match config_file::merge(args, cli) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("addcow serve: {e}");
            return ExitCode::from(1);
        }
    };
    match DaemonConfig::try_from(args).and_then(serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("addcow serve: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ADDCOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::process::logline::OneLine(std::io::stderr()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// What this process created: the listeners (their socket files and locks go with them), the
/// control socket's file and the pid file. Dropping it removes them, on every way out.
#[derive(Default)]
struct Created {
    listeners: Vec<Listener>,
    control: Option<listener::SocketFile>,
    vhost: Option<listener::SocketFile>,
    pid_file: Option<LockedFile>,
}

impl Created {
    fn remove_sockets(&mut self) {
        for l in &mut self.listeners {
            l.remove_file();
        }
        self.listeners.clear();
        drop(self.control.take());
        drop(self.vhost.take());
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        self.remove_sockets();
        drop(self.pid_file.take());
    }
}

/// Adds one export at start: the configuration's (a failure stops the daemon, as a bad command
/// line does) or the state file's (held to the allowed folders unless it changed a
/// configuration export, see [`Planned::trusted`]; if it does not open, its fallback is
/// tried, and else it is logged and kept in the state for the next start).
fn serve_planned(host: &Host, p: Planned) -> Result<()> {
    let name = p
        .params
        .get("name")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    if p.from_config {
        return add_export_params(host, p.params, Origin::CommandLine)
            .map(drop)
            .map_err(|e| Error::new(ErrorKind::Export).with_context(e.message));
    }
    let record = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        if let Some(s) = host.state.get() {
            if let Err(e) = s.lock().update_export(&name, f) {
                tracing::error!(export = %name, error = %e, "state: recording the export served");
            }
        }
    };
    let origin = if p.trusted {
        Origin::CommandLine
    } else {
        Origin::Control
    };
    let first = match add_export_params(host, p.params.clone(), origin) {
        Ok(_) => {
            if p.fallback.is_some() {
                record(&|_| {});
            }
            return Ok(());
        }
        Err(e) => e,
    };
    if let Some(fb) = &p.fallback {
        let mut params = p.params.clone();
        params.insert("overlay".into(), fb.display().to_string().into());
        tracing::warn!(export = %name, error = %first.message,
            fallback = %fb.display(), "the interrupted snapshot's overlay does not open: serving the one before");
        if add_export_params(host, params, origin).is_ok() {
            let overlay = fb.display().to_string();
            record(&|p| {
                p.insert("overlay".into(), overlay.clone().into());
            });
            return Ok(());
        }
    }
    tracing::error!(export = %name, error = %first.message,
        "an export of the state file cannot be served; it stays recorded");
    Ok(())
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) the daemon's state.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

fn serve(cfg: DaemonConfig) -> Result<()> {
    // Block the shutdown signals before any thread exists so every thread inherits the mask;
    // one thread then waits for them synchronously.
    let signals = signals::Signals::block().map_err(|e| setup("blocking signals", e))?;
    // SIGHUP reloads the TLS credentials (blocked likewise, taken by its own thread).
    let hangup = if cfg.tls.enabled() {
        Some(block_hangup().map_err(|e| setup("blocking SIGHUP", e))?)
    } else {
        None
    };
    let tls = if cfg.tls.enabled() {
        let server = TlsServer::load(cfg.tls.clone()).map_err(|e| {
            Error::new(ErrorKind::InvalidArgument)
                .with_context("loading the TLS credentials")
                .with_source(e)
        })?;
        Some(Arc::new(server))
    } else {
        None
    };

    let mut named: Vec<ExportSpec> = cfg.exports.clone();
    if cfg.demo {
        let overlay = demo::prepare(Path::new(demo::DEMO_DIR))?;
        named.push(ExportSpec {
            name: String::new(),
            overlay,
            read_only: false,
            throttle: Default::default(),
            options: Default::default(),
            bitmaps: Vec::new(),
        });
    }

    // systemd's sockets: the one named `control` (FileDescriptorName=control) or bound at the
    // --control path is the control socket (not bound again), every other one serves NBD.
    let mut listeners = Vec::new();
    let mut systemd_control = None;
    for (name, l) in Listener::from_systemd_named().unwrap_or_default() {
        if l.is_control(&name, cfg.control.as_deref()) {
            systemd_control = l.into_unix().map(|(sock, _)| sock);
        } else {
            listeners.push(l);
        }
    }
    for l in &listeners {
        l.check_remote(cfg.listen.allow_remote)
            .map_err(listen_err("LISTEN_FDS"))?;
    }
    let socket = cfg.listen.unix_socket(cfg.demo, !listeners.is_empty())?;

    let allowed = if cfg.allow_dirs.is_empty() {
        let files: Vec<OverlayFiles> = named
            .iter()
            .filter_map(|e| OverlayFiles::resolve(&e.overlay).ok())
            .collect();
        AllowedDirs::from_files(&files)
    } else {
        AllowedDirs::new(&cfg.allow_dirs)?
    }
    .with_remote_bases(cfg.allow_remote_bases);

    let engine = Engine::start(cfg.engine.engine_config()).map_err(|e| {
        Error::new(ErrorKind::Engine)
            .with_context("starting the engine")
            .with_source(e)
    })?;
    let (stop, waker) = signals::Stop::new().map_err(|e| setup("stop pipe", e))?;
    let vhost_policy = Arc::new(listener::PeerPolicy::new(
        listener::SocketKind::Vhost,
        &cfg.listen.vhost_socket_allow_uid,
        &cfg.listen.vhost_socket_allow_gid,
    ));
    // The buffer budget of the NBD connections and of the vhost-user-blk queues' bounce
    // buffers: made before any export is served.
    let pool = Pool::new(cfg.conn.max_buffer_memory.unwrap_or_else(Pool::default_cap));
    let host = Arc::new(
        Host::new(
            Some(engine.clone()),
            Exports::new(Vec::new()),
            allowed,
            stop.clone(),
            cfg.host.clone(),
        )
        .with_vhost_policy(vhost_policy.clone())
        .with_buffer_pool(pool.clone()),
    );
    if let Some(t) = &tls {
        let _ = host.tls.set(t.clone());
    }
    // The configuration's throttle groups and exports, changed by what the state file records
    // (see `host::state`); the groups first, so that the exports joining them find them.
    let mut groups: Vec<(String, addcow_engine::qos::ThrottleLimits)> = cfg.throttle_groups.clone();
    let plan = match &cfg.state {
        None => named
            .iter()
            .map(|e| Planned {
                params: e.params(),
                from_config: true,
                trusted: true,
                fallback: None,
            })
            .collect(),
        Some(path) => {
            let config: Vec<ConfigExport> = named
                .iter()
                .map(|e| ConfigExport {
                    name: e.name.clone(),
                    overlay: e.overlay.clone(),
                    params: e.params(),
                })
                .collect();
            let (state, plan) = State::open(path, &config, &groups).map_err(|e| {
                Error::new(ErrorKind::InvalidArgument)
                    .with_flag("--state")
                    .with_source(e)
            })?;
            groups = state.groups().into_iter().collect();
            let _ = host.state.set(Arc::new(state));
            plan
        }
    };
    for (name, limits) in &groups {
        host.throttle_groups
            .set(name, *limits)
            .map_err(|e| Error::invalid("--throttle-group", name.as_str(), e.to_string()))?;
    }
    for p in plan {
        serve_planned(&host, p)?;
    }

    // Bind (staged: the paths appear at publish), take the pid file, go non-blocking;
    // `created` removes what was made on any way out.
    let listen = &cfg.listen;
    let mut created = Created::default();
    let mut control_listener = None;
    if let Some(p) = &socket {
        listeners.push(
            Listener::bind_unix_as(p, listen.socket_mode, listen.socket_group)
                .map_err(listen_err("--socket"))?,
        );
    }
    let nbd_policy = Arc::new(listener::PeerPolicy::new(
        listener::SocketKind::Nbd,
        &listen.socket_allow_uid,
        &listen.socket_allow_gid,
    ));
    created.listeners = listeners
        .into_iter()
        .map(|l| l.with_policy(Some(nbd_policy.clone())))
        .collect();
    if let Some(addr) = &listen.tcp {
        created
            .listeners
            .push(Listener::bind_tcp(addr, listen.allow_remote).map_err(listen_err("--tcp"))?);
    }
    insecure_remote_check(&created.listeners, &cfg)?;
    for l in &created.listeners {
        l.set_nonblocking().map_err(|e| {
            Error::new(ErrorKind::Listen)
                .with_context(l.describe())
                .with_source(e)
        })?;
    }
    // The vhost-user-blk listener thread runs until the process exits.
    let mut vhost_server = None;
    if let Some(p) = &listen.vhost_user_blk {
        let l = Listener::bind_unix_as(p, listen.vhost_socket_mode, listen.vhost_socket_group)
            .map_err(listen_err("--vhost-user-blk"))?;
        if let Some((sock, file)) = l.into_unix() {
            created.vhost = file;
            vhost_server = Some(start_vhost(
                sock,
                p,
                &host,
                &named,
                engine.cores(),
                vhost_policy.clone(),
                pool.clone(),
            )?);
        }
    }
    if let Some(sock) = systemd_control {
        control_listener = Some(sock);
    } else if let Some(c) = &cfg.control {
        let l = Listener::bind_unix_as(c, listen.control_mode, listen.control_group)
            .map_err(listen_err("--control"))?;
        if let Some((sock, file)) = l.into_unix() {
            created.control = file;
            control_listener = Some(sock);
        }
    }
    if let Some(pf) = &cfg.pid_file {
        let pid_err = || Error::new(ErrorKind::PidFile).with_flag("--pid-file");
        let mut f = LockedFile::acquire(pf).map_err(|e| pid_err().with_source(e))?;
        f.write(&format!("{}\n", std::process::id())).map_err(|e| {
            pid_err()
                .with_value(pf.display().to_string())
                .with_source(e)
        })?;
        created.pid_file = Some(f);
    }
    let metrics = match &cfg.metrics {
        // The message names --metrics and the address.
        Some(addr) => Some(
            metrics::MetricsServer::start(addr, host.clone(), cfg.metrics_allow_remote)
                .map_err(|e| Error::new(ErrorKind::Listen).with_source(e))?,
        ),
        None => None,
    };
    let control = match control_listener {
        Some(l) => Some(
            control::ControlServer::start(
                l,
                host.clone(),
                control::ControlLimits {
                    policy: listener::PeerPolicy::new(
                        listener::SocketKind::Control,
                        &listen.control_allow_uid,
                        &listen.control_allow_gid,
                    ),
                    idle_timeout: cfg.control_idle_timeout,
                },
            )
            .map_err(|e| setup("control thread", e))?,
        ),
        None => None,
    };
    let conn_cfg = Arc::new(ConnConfig {
        exports: host.exports.clone(),
        handshake_timeout: cfg.conn.handshake_timeout,
        pool: pool.clone(),
        payload_timeout: cfg.conn.payload_timeout,
        idle_timeout: cfg.conn.idle_timeout,
        ring: (cfg.conn.mode == ConnMode::Ring).then(|| engine.clone()),
        tls: tls.clone(),
    });
    if let (Some(set), Some(t)) = (hangup, &tls) {
        spawn_reloader(set, t.clone()).map_err(|e| setup("SIGHUP thread", e))?;
    }
    signals
        .spawn_waiter(stop.clone())
        .map_err(|e| setup("signal thread", e))?;

    // Ready: the sockets appear at their paths now, and systemd hears READY=1.
    if let Some(c) = &mut created.control {
        c.publish().map_err(listen_err("--control"))?;
    }
    if let Some(v) = &mut created.vhost {
        v.publish().map_err(listen_err("--vhost-user-blk"))?;
    }
    for l in &mut created.listeners {
        l.publish()
            .map_err(|e| Error::new(ErrorKind::Listen).with_source(e))?;
    }
    if let (Some(c), Some(_)) = (&cfg.control, &control) {
        tracing::info!(control = %c.display(), allow_dirs = ?host.allowed.dirs(), "control socket ready");
    }
    if let Some(m) = &metrics {
        tracing::info!(metrics = %m.describe(), "serving metrics at /metrics");
    }
    tracing::info!(
        max_buffer_memory = pool.cap(),
        payload_timeout_s = conn_cfg.payload_timeout.as_secs(),
        idle_timeout_s = conn_cfg.idle_timeout.map(|d| d.as_secs()),
        "limits"
    );
    for l in &created.listeners {
        tracing::info!(listen = %l.describe(), "listening");
    }
    if cfg.demo {
        let sock_abs = socket
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
            .unwrap_or_default();
        let overlay = named.first().map(|n| n.overlay.clone()).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(demo::banner(&overlay, &sock_abs).as_bytes());
        let _ = out.flush();
    }
    notify(&[sd_notify::NotifyState::Ready]);

    let live = Arc::new(Live::default());
    accept_loop(
        &created.listeners,
        &waker,
        engine.cores(),
        &conn_cfg,
        &live,
        cfg.conn.max_connections,
    );

    // Shutdown, as qemu-nbd does it: stop accepting, stop reading new requests (they are never
    // failed: a reconnecting client resends what was not answered), answer the ones in flight,
    // close the connections, commit every overlay.
    notify(&[sd_notify::NotifyState::Stopping]);
    host.events.emit(
        events::SHUTDOWN,
        serde_json::json!({"connections": live.count()}),
    );
    created.remove_sockets();
    let grace = cfg.host.shutdown_grace;
    if let Some(v) = &vhost_server {
        // Like NBD: no new request is taken from the rings, the ones in flight are answered
        // before the engine stops (a frontend that reconnects finds the rest still queued).
        if v.quiesce(Instant::now() + grace) {
            tracing::info!(socket = %v.socket().display(), "vhost-user-blk queues stopped");
        } else {
            tracing::warn!(socket = %v.socket().display(), "vhost-user-blk requests still in flight after the grace period");
        }
    }
    if !host.stop_vhost_exports(Instant::now() + grace) {
        tracing::warn!("vhost-user-blk requests still in flight after the grace period");
    }
    let n = live.count();
    tracing::info!(
        connections = n,
        "shutting down: not accepting; answering requests in flight, then closing connections"
    );
    live.stop_reading_all();
    if !live.wait_empty(Some(Instant::now() + grace)) {
        tracing::info!(
            connections = live.count(),
            "grace period over; closing connections"
        );
        live.close_all();
        live.wait_empty(None);
    }
    // Jobs (streams) stop at their next chunk; what they did is kept and flushed.
    host.jobs.cancel_and_wait(None);
    // Backups end with the daemon: their views go, their scratch files are removed.
    host.backups.end_all();
    let result = engine.shutdown().map_err(|e| {
        Error::new(ErrorKind::Engine)
            .with_context("committing overlays")
            .with_source(e)
    });
    if let Some(c) = &control {
        c.stop_accepting();
        // Let a `quit` (and the shutdown event) reach their clients before the process exits.
        c.flush(Instant::now() + Duration::from_secs(2));
    }
    if let Some(m) = &metrics {
        m.stop();
    }
    drop(created);
    match &result {
        Ok(()) => tracing::info!("all overlays committed; exiting"),
        Err(e) => tracing::error!(error = %e, "shutdown failed"),
    }
    result
}

/// Blocks SIGHUP in the calling thread (before any thread starts, so every thread inherits
/// the mask); [`spawn_reloader`] then takes it.
fn block_hangup() -> nix::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGHUP);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    Ok(set)
}

/// The thread that reloads the TLS credentials on each SIGHUP (a failed reload is logged and
/// the old credentials stay).
fn spawn_reloader(set: nix::sys::signal::SigSet, tls: Arc<TlsServer>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(_) => {
                    if let Err(e) = tls.reload() {
                        tracing::error!(error = %e, "SIGHUP: TLS credentials not reloaded; the old ones stay in use");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "sigwait(SIGHUP) failed");
                    return;
                }
            }
        })?;
    Ok(())
}

/// A TCP listener off loopback (`--tcp` with `--allow-remote`, or one systemd passed) serves
/// only with TLS required, unless `--allow-insecure-remote` says otherwise.
fn insecure_remote_check(listeners: &[Listener], cfg: &DaemonConfig) -> Result<()> {
    if cfg.tls.mode == TlsMode::Require || cfg.listen.allow_insecure_remote {
        return Ok(());
    }
    for l in listeners {
        let Listener::Tcp(t) = l else { continue };
        if t.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
            continue;
        }
        return Err(Error::invalid(
            "--tcp",
            l.describe(),
            "not a loopback address and TLS is not required: anyone who reaches it could read \
             and write every export; give --tls-creds DIR or --tls-psk FILE (TLS required), or \
             --allow-insecure-remote to mean it",
        ));
    }
    Ok(())
}

/// An [`ErrorKind::Setup`] error: `what` could not be set up.
fn setup(what: &str, source: impl Into<crate::error::Source>) -> Error {
    Error::new(ErrorKind::Setup)
        .with_context(what)
        .with_source(source)
}

/// Maps a listener error of the socket given with `flag` to an [`ErrorKind::Listen`] error
/// (the listener's message names the path).
fn listen_err(flag: &'static str) -> impl Fn(listener::ListenError) -> Error {
    move |e| Error::new(ErrorKind::Listen).with_flag(flag).with_source(e)
}

/// Serves the default export over vhost-user-blk on `sock` (bound at `socket`, with the same
/// hygiene as the NBD socket), with one queue per engine core and the overlay's file name (at
/// most 20 bytes) as its GET_ID serial, to the frontends `policy` lets in. The configuration
/// guarantees a default export.
fn start_vhost(
    sock: std::os::unix::net::UnixListener,
    socket: &Path,
    host: &Host,
    named: &[ExportSpec],
    cores: usize,
    policy: Arc<listener::PeerPolicy>,
    pool: Arc<Pool>,
) -> Result<crate::vhost::VhostServer> {
    let vhost_err = |kind| {
        Error::new(kind)
            .with_flag("--vhost-user-blk")
            .with_value(socket.display().to_string())
    };
    let Some(export) = host.exports.get("") else {
        return Err(vhost_err(ErrorKind::InvalidArgument)
            .with_context("serves the default export: give OVERLAY"));
    };
    let serial = named
        .iter()
        .find(|e| e.name.is_empty())
        .and_then(|e| e.overlay.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let queues = u16::try_from(cores).unwrap_or(u16::MAX);
    let server = crate::vhost::VhostServer::start(
        sock,
        socket,
        export.backend.clone(),
        queues,
        serial,
        Some(policy),
        Some(pool),
    )
    .map_err(|e| vhost_err(ErrorKind::Listen).with_source(e))?;
    tracing::info!(socket = %socket.display(), queues, "serving vhost-user-blk");
    Ok(server)
}

/// How long the accept loop stops accepting after the process ran out of file descriptors (or
/// memory) for a new connection: doubled on each failure in a row, from the first value up to
/// the second.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// Whether an `accept` error means the process (or system) is out of a resource: waiting helps,
/// retrying at once only spins.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts connections until the signal waiter wakes us; each connection gets a thread and the
/// next engine core (round-robin).
///
/// Running out of file descriptors: the listeners are left alone for a back-off period (the
/// pending connections wait in the backlog) while the stop pipe is still watched; one warning
/// is logged per run of failures, with their count when accepting works again.
fn accept_loop(
    listeners: &[Listener],
    waker: &signals::Waker,
    cores: usize,
    cfg: &Arc<ConnConfig>,
    live: &Arc<Live>,
    max_connections: usize,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let cores = cores.max(1);
    let mut next_id: u64 = 0;
    // Back-off after running out of resources: until when, the next period, failures counted.
    let mut resting: Option<Instant> = None;
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut failures: u64 = 0;
    loop {
        let now = Instant::now();
        let rest_left = resting.map(|t| t.saturating_duration_since(now));
        let listening = !matches!(rest_left, Some(d) if !d.is_zero());
        let mut fds: Vec<PollFd<'_>> = if listening {
            listeners
                .iter()
                .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
                .collect()
        } else {
            Vec::new()
        };
        fds.push(PollFd::new(waker.fd().as_fd(), PollFlags::POLLIN));
        let timeout = match rest_left {
            Some(d) if !d.is_zero() => {
                PollTimeout::try_from(d.as_millis().max(1) as i32).unwrap_or(PollTimeout::MAX)
            }
            _ => PollTimeout::NONE,
        };
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "poll failed; stopping");
                return;
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        if ready.last().copied().unwrap_or(false) {
            return;
        }
        if !listening {
            continue;
        }
        resting = None;
        for (l, _) in listeners.iter().zip(&ready).filter(|(_, r)| **r) {
            let sock = match l.accept() {
                Ok(s) => {
                    if failures > 0 {
                        tracing::info!(failures, "accepting connections again");
                        failures = 0;
                        backoff = ACCEPT_BACKOFF.0;
                    }
                    s
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                // Refused by the peer policy (logged and counted there).
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => continue,
                Err(e) if out_of_resources(&e) => {
                    if failures == 0 {
                        tracing::warn!(listen = %l.describe(), error = %e,
                            "cannot accept: out of resources; pausing accepts (pending connections wait)");
                    }
                    failures += 1;
                    resting = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    break;
                }
                Err(e) => {
                    tracing::warn!(listen = %l.describe(), error = %e, "accept failed");
                    continue;
                }
            };
            if live.count() >= max_connections {
                tracing::warn!(max_connections, "connection refused: too many connections");
                let _ = sock.shutdown(std::net::Shutdown::Both);
                continue;
            }
            let id = next_id;
            next_id += 1;
            let core = (id as usize) % cores;
            let peer = sock.peer();
            // The connection is tracked (so a stop reaches it) before its thread starts; one
            // that cannot be tracked is not served.
            let handle = match sock.try_clone() {
                Ok(s) => Arc::new(ClientHandle::new(s)),
                Err(e) => {
                    tracing::warn!(conn = id, %peer, error = %e, "connection refused: cannot set it up");
                    let _ = sock.shutdown(std::net::Shutdown::Both);
                    if out_of_resources(&e) {
                        resting = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                        break;
                    }
                    continue;
                }
            };
            let slot = live.insert(id, handle.clone());
            let cfg = cfg.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    let ended = connection::serve(sock, id, core, &cfg, handle);
                    drop(slot);
                    // Logged after the slot is free, so "closed" in the log means it is.
                    ended.log(id, &peer);
                });
            if let Err(e) = spawned {
                // The closure (socket and slot) was dropped: the connection is closed and gone
                // from the table.
                tracing::warn!(conn = id, error = %e, "connection refused: cannot start its thread");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::backend::memory::MemDisk;
    use crate::nbd::export::Export;

    /// A server on in-memory disks ("" and read-only "ro", 8 MiB, base half 0xab) on a temp
    /// socket, served by the real accept loop and connection code.
    struct MemServer {
        _dir: tempfile::TempDir,
        sock: PathBuf,
        wake: Option<std::os::fd::OwnedFd>,
        thread: Option<std::thread::JoinHandle<()>>,
        live: Arc<Live>,
    }

    impl MemServer {
        fn start() -> MemServer {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("s.sock");
            let mut l = Listener::bind_unix(&sock, 0o600).unwrap();
            l.publish().unwrap();
            l.set_nonblocking().unwrap();
            let (waker, wake) = signals::Waker::pipe().unwrap();
            let cfg = Arc::new(ConnConfig::for_tests(Exports::new(vec![
                Export::new("", MemDisk::new(8 << 20, false), 2),
                Export::new("ro", MemDisk::new(8 << 20, true), 2),
            ])));
            let live = Arc::new(Live::default());
            let live2 = live.clone();
            let thread = std::thread::spawn(move || {
                accept_loop(&[l], &waker, 2, &cfg, &live2, 16);
            });
            MemServer {
                _dir: dir,
                sock,
                wake: Some(wake),
                thread: Some(thread),
                live,
            }
        }
    }

    impl Drop for MemServer {
        fn drop(&mut self) {
            if let Some(w) = self.wake.take() {
                let _ = nix::unistd::write(&w, &[1]);
            }
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            self.live
                .wait_empty(Some(Instant::now() + Duration::from_secs(30)));
        }
    }

    fn run_tool(cmd: &mut Command) -> String {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?} (install it: scripts/test.sh): {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd:?} failed:\n{text}");
        text
    }

    /// `nbdinfo --list` output as (export name, [(field, value)]) in the order listed.
    fn parse_nbdinfo_list(text: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("export=\"") {
                let name = rest.strip_suffix("\":").expect("export line ends with \":");
                out.push((name.to_string(), Vec::new()));
            } else if let (Some(body), Some(last)) = (line.strip_prefix('\t'), out.last_mut()) {
                if let Some((k, v)) = body.split_once(": ") {
                    last.1.push((k.to_string(), v.to_string()));
                }
            }
        }
        out
    }

    #[test]
    fn nbdinfo_list_parser_reads_blocks() {
        let t = "export=\"\":\n\texport-size: 1\n\tis_read_only: false\nexport=\"a b\":\n\texport-size: 2\n";
        let l = parse_nbdinfo_list(t);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].0, "a b");
        assert_eq!(l[1].1, [("export-size".to_string(), "2".to_string())]);
    }

    #[test]
    fn real_clients_handshake_and_protocol_corners_on_memory_disks() {
        let s = MemServer::start();
        let sock = s.sock.display().to_string();
        let list = run_tool(
            Command::new("nbdinfo")
                .arg("--list")
                .arg(format!("nbd+unix:///?socket={sock}")),
        );
        // Every export is listed with its own size and read-only flag, and nothing else is.
        let listed = parse_nbdinfo_list(&list);
        let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["", "ro"], "{list}");
        for (name, fields) in &listed {
            let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
            assert_eq!(
                field("export-size"),
                Some("8388608 (8M)"),
                "{name:?}: {list}"
            );
            let ro = if name == "ro" { "true" } else { "false" };
            assert_eq!(field("is_read_only"), Some(ro), "{name:?}: {list}");
        }
        let l = run_tool(Command::new("qemu-nbd").args(["-L", "-k", &sock]));
        assert!(l.contains("base:allocation"), "{l}");
        assert!(l.contains("qemu:allocation-depth"), "{l}");
        assert!(l.contains("multi"), "{l}");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd_corners.py");
        let out = run_tool(Command::new("/usr/bin/python3").arg(script).arg(&sock));
        assert!(out.contains("checks passed"), "{out}");
        drop(s);

        // QEMU 10 negotiates extended headers: data, holes, zeroing, discard and block status.
        let s = MemServer::start();
        let sock = s.sock.display().to_string();
        let uri = format!("nbd+unix:///?socket={sock}");
        let io = run_tool(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 4M 64k",
            "-c",
            "read -P 0xab 4194300 4",
            "-c",
            "write -P 0x5a 5M 4k",
            "-c",
            "read -P 0x5a 5M 4k",
            "-c",
            "write -z 8k 8k",
            "-c",
            "read -P 0 8k 8k",
            "-c",
            "discard 64k 64k",
            "-c",
            "flush",
            &uri,
        ]));
        assert!(!io.contains("failed"), "{io}");
        let map =
            run_tool(Command::new("qemu-img").args(["map", "-f", "raw", "--output=json", &uri]));
        assert!(map.contains("\"start\": 4194304, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), "{map}");
        let ro = run_tool(Command::new("qemu-io").args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 4k",
            &format!("nbd+unix:///ro?socket={sock}"),
        ]));
        assert!(!ro.contains("failed"), "{ro}");
        eprintln!("{list}\n{l}\n{io}\n{map}");
    }
}
