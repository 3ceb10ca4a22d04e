//! What `addcow serve` runs with: [`DaemonConfig`], built once from the command line by
//! `TryFrom<ServeArgs>` ([`super::ServeArgs`]). Every value is checked and converted here
//! (seconds to [`Duration`]s, `0` to "off", the export specs split, the options that need one
//! another matched), so the rest of the daemon takes plain, valid values and nothing is parsed
//! twice. The conversion is pure: it reads no file and binds nothing, and its errors name the
//! option and the value.
//!
//! The configuration file (`--config`, [`super::config_file`]) is merged into the same raw
//! values as the command line before this conversion: its `[[export]]` tables arrive as
//! export-add parameters (`ServeArgs::file_exports`) and become [`ExportSpec`]s here. The
//! fields are plain data (paths, numbers, durations, small enums) for that reason.
//!
//! The clap `value_parser` functions below ([`parse_mode`], [`parse_cache`], [`parse_bytes`])
//! return `String`, clap's convention: clap prints their message with the option's name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use addcow_engine::{CacheMode, EngineConfig};

use super::{demo, ConnMode, ServeArgs};
use crate::conn::tls::{TlsMode, TlsSettings};
use crate::error::{Error, ErrorKind, Result};
use crate::host::runtime::HostConfig;
use crate::host::throttle::{self, ExportThrottle};
use crate::nbd::wire;
use addcow_engine::qos::ThrottleLimits;

/// The longest time any `SECS` option takes (ten years): deadlines computed from it can never
/// overflow an `Instant`.
pub const MAX_SECS: u64 = 10 * 365 * 24 * 3600;

/// The daemon's whole configuration, validated and in its final units. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// The exports given on the command line, in order: the positional `OVERLAY` (the default
    /// export, empty name) first, then each `--export`. Names are unique; `--read-only` is
    /// already folded into each. Empty in demo mode (the demo's overlay is made at start).
    /// Every `throttle-group` an export names is one of `throttle_groups`.
    pub exports: Vec<ExportSpec>,
    /// `--throttle-group`: named throttle groups made at start (names unique, limits valid).
    pub throttle_groups: Vec<(String, ThrottleLimits)>,
    /// The built-in demo: no `OVERLAY`, no `--export` and no `--control` were given.
    pub demo: bool,
    /// The sockets to serve NBD (and vhost-user-blk) on.
    pub listen: ListenConfig,
    /// TLS on NBD connections: mode, credentials, peer verification, authorization list.
    pub tls: TlsSettings,
    /// `--control`: the control socket (JSON-RPC, mode 0600). Default: none.
    pub control: Option<PathBuf>,
    /// `--state`: the state file (see [`crate::host::state`]). Default: none (runtime changes
    /// are not recorded).
    pub state: Option<PathBuf>,
    /// `--allow-dir`: the folders `export-add` may open files in, as given (resolved at start).
    /// Empty: the folders of the command-line overlays' files.
    pub allow_dirs: Vec<PathBuf>,
    /// `--allow-remote-bases`: `export-add` may open overlays over TCP image servers. Default
    /// false.
    pub allow_remote_bases: bool,
    /// `--metrics`: where to serve Prometheus metrics, a TCP address or (with a `/`) a Unix
    /// socket path. Default: none.
    pub metrics: Option<String>,
    /// `--metrics-allow-remote`: `metrics` may be a non-loopback TCP address. Default false.
    pub metrics_allow_remote: bool,
    /// `--control-idle-timeout`: close a control connection that sent no request this long;
    /// `None` (given 0): never. Default 300 s.
    pub control_idle_timeout: Option<Duration>,
    /// `--pid-file`: the pid file, locked while the daemon runs. Default: none.
    pub pid_file: Option<PathBuf>,
    /// How the engine runs.
    pub engine: EngineSettings,
    /// Connections: how many, how much memory, how long they may take.
    pub conn: ConnSettings,
    /// What [`crate::host::runtime::Host::new`] takes: grace period, copy-on-read, lock wait,
    /// extent-ahead.
    pub host: HostConfig,
}

/// One command-line export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// The export name (empty: the default export).
    pub name: String,
    /// The `.add-cow` file.
    pub overlay: PathBuf,
    /// Served read-only (`:ro`, or `--read-only` for every command-line export).
    pub read_only: bool,
    /// Its throttling (`,iops-total=N,...` or `,throttle-group=G`); default none.
    pub throttle: ExportThrottle,
    /// export-add's other parameters (`type`, `addr`, `copy_on_read`, `tls-authz`, ...): from
    /// a `--config` file's `[[export]]` table; empty for `OVERLAY` and `--export`.
    pub options: serde_json::Map<String, serde_json::Value>,
    /// Dirty bitmaps of the disk served as `qemu:dirty-bitmap:NAME` (`,bitmap=NAME`, repeatable).
    pub bitmaps: Vec<String>,
}

impl ExportSpec {
    /// The export as export-add's parameters (what the daemon adds it with, and what the state
    /// file records).
    pub fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut p = self.options.clone();
        p.insert("name".into(), self.name.clone().into());
        p.insert("overlay".into(), self.overlay.display().to_string().into());
        p.insert("read_only".into(), self.read_only.into());
        if !self.throttle.limits.is_empty() {
            if let Ok(v) = serde_json::to_value(self.throttle.limits) {
                p.insert("throttle".into(), v);
            }
        }
        if let Some(g) = &self.throttle.group {
            p.insert("throttle-group".into(), g.clone().into());
        }
        if !self.bitmaps.is_empty() {
            p.insert("bitmaps".into(), self.bitmaps.clone().into());
        }
        p
    }
}

/// The sockets the daemon serves on (besides systemd's, found at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    /// `--socket`: the NBD Unix socket. Default: none (in demo mode without systemd sockets,
    /// `./addcow.sock`; see [`ListenConfig::unix_socket`]).
    pub socket: Option<PathBuf>,
    /// `--socket-mode`: permission bits of the NBD socket file. Default 0600.
    pub socket_mode: u32,
    /// `--socket-group`: group of the NBD socket file. Default: the daemon's.
    pub socket_group: Option<u32>,
    /// `--socket-allow-uid`: the only users that may connect to the NBD Unix sockets (with
    /// `socket_allow_gid`: a peer matching either). Both empty (default): whoever can open the
    /// socket file.
    pub socket_allow_uid: Vec<u32>,
    /// `--socket-allow-gid`: the only groups whose members may connect to the NBD Unix
    /// sockets; see `socket_allow_uid`.
    pub socket_allow_gid: Vec<u32>,
    /// `--vhost-socket-mode`: permission bits of the vhost-user-blk socket file. Default 0600.
    pub vhost_socket_mode: u32,
    /// `--vhost-socket-group`: group of the vhost-user-blk socket file. Default: the daemon's.
    pub vhost_socket_group: Option<u32>,
    /// `--vhost-socket-allow-uid`: the only users whose frontends are served on the
    /// vhost-user-blk sockets (the command line's and export-add's; see `socket_allow_uid`).
    /// Default: whoever can open the socket file.
    pub vhost_socket_allow_uid: Vec<u32>,
    /// `--vhost-socket-allow-gid`: the only groups whose members' frontends are served on the
    /// vhost-user-blk sockets.
    pub vhost_socket_allow_gid: Vec<u32>,
    /// `--control-mode`: permission bits of the control socket file. Default 0600.
    pub control_mode: u32,
    /// `--control-group`: group of the control socket file. Default: the daemon's.
    pub control_group: Option<u32>,
    /// `--control-allow-uid`: the only users that may connect to the control socket (see
    /// `socket_allow_uid`). Default: whoever can open the socket file.
    pub control_allow_uid: Vec<u32>,
    /// `--control-allow-gid`: the only groups whose members may connect to the control
    /// socket.
    pub control_allow_gid: Vec<u32>,
    /// `--tcp`: also listen on this TCP address. Default: none.
    pub tcp: Option<String>,
    /// `--allow-remote` (or `--allow-insecure-remote`): `--tcp` may be off loopback. Default
    /// false.
    pub allow_remote: bool,
    /// `--allow-insecure-remote`: a non-loopback TCP listener may serve without TLS required.
    /// Default false.
    pub allow_insecure_remote: bool,
    /// `--vhost-user-blk`: serve the default export to a vhost-user-blk frontend on this Unix
    /// socket. Default: none. Only with a default export (checked).
    pub vhost_user_blk: Option<PathBuf>,
}

/// Engine settings of the daemon ([`EngineSettings::engine_config`] makes the engine's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    /// `--cores`: engine core threads (at least 1). Default: one per CPU.
    pub cores: Option<usize>,
    /// `--cache`: cache mode of the raw images. Default direct.
    pub image_cache: CacheMode,
    /// `--base-cache`: cache mode of every base layer. Default direct.
    pub base_cache: CacheMode,
    /// `--base-timeout`: how long a read of a remote base may wait for its image server (at
    /// least 1 s). Default 30 s.
    pub base_timeout: Duration,
    /// `--commit-interval`: delay before a background commit after a write; `None` (given 0):
    /// commits only on FLUSH/FUA, export-del and shutdown. Default 5 s.
    pub commit_delay: Option<Duration>,
}

impl EngineSettings {
    /// The engine's configuration: these settings over the engine's defaults.
    pub fn engine_config(&self) -> EngineConfig {
        let mut config = EngineConfig {
            image_cache: self.image_cache,
            base_cache: self.base_cache,
            base_timeout: self.base_timeout,
            commit_delay: self.commit_delay,
            ..EngineConfig::default()
        };
        if let Some(c) = self.cores {
            config.cores = c;
        }
        config
    }
}

/// Connection limits and how connections are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSettings {
    /// `--max-connections`: most simultaneous connections. Default 64.
    pub max_connections: usize,
    /// `--max-buffer-memory`: bytes of request buffers all connections may hold. Default
    /// (`None`): an eighth of the machine's memory, at least 64 MiB (decided at start).
    pub max_buffer_memory: Option<u64>,
    /// `--handshake-timeout`: time a client has to finish the handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// `--payload-timeout`: time a request frame may take once its first byte came (at least
    /// 1 s). Default 30 s.
    pub payload_timeout: Duration,
    /// `--idle-timeout`: disconnect a client idle this long (at least 1 s). Default: never.
    pub idle_timeout: Option<Duration>,
    /// `--conn-mode`: on the engine core's ring, or a thread pair per connection. Default ring.
    pub mode: ConnMode,
}

impl ListenConfig {
    /// The NBD Unix socket to bind: `--socket`, or in demo mode `./addcow.sock` unless systemd
    /// passed sockets (`systemd`). Refused when there is nothing at all to listen on.
    pub fn unix_socket(&self, demo: bool, systemd: bool) -> Result<Option<PathBuf>> {
        let socket = match (&self.socket, demo) {
            (Some(p), _) => Some(p.clone()),
            (None, true) if !systemd => Some(PathBuf::from(demo::DEMO_SOCKET)),
            _ => None,
        };
        if socket.is_none() && !systemd && self.tcp.is_none() && self.vhost_user_blk.is_none() {
            return Err(ErrorKind::NothingToListenOn.into());
        }
        Ok(socket)
    }
}

impl TryFrom<ServeArgs> for DaemonConfig {
    type Error = Error;

    fn try_from(args: ServeArgs) -> Result<DaemonConfig> {
        let demo = args.overlay.is_none()
            && args.exports.is_empty()
            && args.file_exports.is_empty()
            && args.control.is_none();
        let mut exports: Vec<ExportSpec> = Vec::new();
        if let Some(o) = &args.overlay {
            exports.push(ExportSpec {
                name: String::new(),
                overlay: o.clone(),
                read_only: false,
                throttle: ExportThrottle::default(),
                options: Default::default(),
                bitmaps: Vec::new(),
            });
        }
        let throttle_groups = throttle_groups(&args.throttle_groups)?;
        for s in &args.exports {
            let e = parse_export(s)?;
            if let Some(g) = &e.throttle.group {
                if !throttle_groups.iter().any(|(n, _)| n == g) {
                    return Err(Error::invalid(
                        "--export",
                        s.as_str(),
                        format!("no --throttle-group {g:?}"),
                    ));
                }
            }
            if exports.iter().any(|m| m.name == e.name) {
                return Err(Error::invalid(
                    "--export",
                    s.as_str(),
                    format!("export name {:?} given twice", e.name),
                ));
            }
            exports.push(e);
        }
        // The configuration file's exports (checked there), after those of the command line,
        // which replace one of the same name.
        for p in &args.file_exports {
            let mut options = p.clone();
            let name = options.remove("name");
            let overlay = options.remove("overlay");
            let read_only = options.remove("read_only");
            let (Some(serde_json::Value::String(name)), Some(serde_json::Value::String(overlay))) =
                (name, overlay)
            else {
                return Err(Error::invalid(
                    "--config",
                    serde_json::Value::Object(p.clone()).to_string(),
                    "an export needs a name and an overlay (strings)",
                ));
            };
            if exports.iter().any(|e| e.name == name) {
                continue;
            }
            exports.push(ExportSpec {
                name,
                overlay: PathBuf::from(overlay),
                read_only: read_only.and_then(|v| v.as_bool()).unwrap_or(false),
                // A table's `throttle`, `throttle-group` and `bitmaps` stay in `options` (export-add's
                // own).
                throttle: ExportThrottle::default(),
                bitmaps: Vec::new(),
                options,
            });
        }
        for e in &mut exports {
            e.read_only |= args.read_only;
        }

        if let Some(v) = &args.vhost_user_blk {
            if !demo && !exports.iter().any(|e| e.name.is_empty()) {
                return Err(Error::invalid(
                    "--vhost-user-blk",
                    v.display().to_string(),
                    "serves the default export: give OVERLAY (or --export =OVERLAY)",
                ));
            }
        }
        let ea = args.extent_ahead;
        if ea != 0 && (!ea.is_power_of_two() || ea < 4096) {
            return Err(Error::invalid(
                "--extent-ahead",
                ea.to_string(),
                "not a power of two of at least 4K (or 0 for off)",
            ));
        }
        let tls = tls_settings(&args)?;
        Ok(DaemonConfig {
            exports,
            throttle_groups,
            demo,
            tls,
            listen: ListenConfig {
                socket: args.socket,
                socket_mode: mode("--socket-mode", args.socket_mode)?,
                socket_group: args.socket_group,
                socket_allow_uid: args.socket_allow_uid,
                socket_allow_gid: args.socket_allow_gid,
                vhost_socket_mode: mode("--vhost-socket-mode", args.vhost_socket_mode)?,
                vhost_socket_group: args.vhost_socket_group,
                vhost_socket_allow_uid: args.vhost_socket_allow_uid,
                vhost_socket_allow_gid: args.vhost_socket_allow_gid,
                control_mode: mode("--control-mode", args.control_mode)?,
                control_group: args.control_group,
                control_allow_uid: args.control_allow_uid,
                control_allow_gid: args.control_allow_gid,
                tcp: args.tcp,
                allow_remote: args.allow_remote || args.allow_insecure_remote,
                allow_insecure_remote: args.allow_insecure_remote,
                vhost_user_blk: args.vhost_user_blk,
            },
            control: args.control,
            state: args.state,
            allow_dirs: args.allow_dirs,
            allow_remote_bases: args.allow_remote_bases,
            metrics: args.metrics,
            metrics_allow_remote: args.metrics_allow_remote,
            control_idle_timeout: nonzero(secs(
                "--control-idle-timeout",
                args.control_idle_timeout,
            )?),
            pid_file: args.pid_file,
            engine: EngineSettings {
                cores: args.cores.map(|c| c.max(1)),
                image_cache: args.cache,
                base_cache: args.base_cache,
                base_timeout: positive_secs("--base-timeout", args.base_timeout)?,
                commit_delay: nonzero(secs("--commit-interval", args.commit_interval)?),
            },
            conn: ConnSettings {
                max_connections: args.max_connections,
                max_buffer_memory: args.max_buffer_memory,
                handshake_timeout: secs("--handshake-timeout", args.handshake_timeout)?,
                payload_timeout: secs("--payload-timeout", args.payload_timeout)?.max(SECOND),
                idle_timeout: args
                    .idle_timeout
                    .map(|s| secs("--idle-timeout", s).map(|d| d.max(SECOND)))
                    .transpose()?,
                mode: args.conn_mode,
            },
            host: HostConfig {
                shutdown_grace: secs("--shutdown-grace", args.shutdown_grace)?,
                copy_on_read: args.copy_on_read,
                lock_wait: secs("--lock-wait", args.lock_wait)?,
                extent_ahead: ea,
            },
        })
    }
}

impl DaemonConfig {
    /// The overlay of the default export given on the command line, if any.
    pub fn default_overlay(&self) -> Option<&Path> {
        self.exports
            .iter()
            .find(|e| e.name.is_empty())
            .map(|e| e.overlay.as_path())
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// The TLS options, matched: a mode other than off needs credentials; credentials without
/// `--tls` mean `require` (as qemu-nbd's `--tls-creds`), with `--tls off` they contradict it;
/// `--tls-verify-peer` needs the CA of `--tls-creds`; `--tls-authz` needs `require` (with `on`
/// clients in the clear would pass unchecked) and an identity to compare: a verified client
/// certificate or a PSK.
fn tls_settings(args: &ServeArgs) -> Result<TlsSettings> {
    let creds = args.tls_creds.is_some() || args.tls_psk.is_some();
    let mode = match (args.tls, creds) {
        (None, false) => TlsMode::Off,
        (None, true) => TlsMode::Require,
        (Some(TlsMode::Off), true) => {
            return Err(Error::invalid(
                "--tls",
                "off",
                "contradicts --tls-creds/--tls-psk (drop one)",
            ))
        }
        (Some(m @ (TlsMode::On | TlsMode::Require)), false) => {
            return Err(Error::invalid(
                "--tls",
                format!("{m:?}").to_lowercase(),
                "needs credentials: --tls-creds DIR or --tls-psk FILE",
            ))
        }
        (Some(m), _) => m,
    };
    if args.tls_verify_peer && args.tls_creds.is_none() {
        return Err(Error::invalid(
            "--tls-verify-peer",
            "",
            "needs --tls-creds (its ca-cert.pem verifies the clients)",
        ));
    }
    if let Some(bad) = args.tls_authz.iter().find(|a| a.is_empty()) {
        return Err(Error::invalid(
            "--tls-authz",
            bad.as_str(),
            "empty identity",
        ));
    }
    if let Some(first) = args.tls_authz.first() {
        if mode != TlsMode::Require {
            return Err(Error::invalid(
                "--tls-authz",
                first.as_str(),
                "needs --tls require (with --tls on, clients in the clear are not checked)",
            ));
        }
        if args.tls_psk.is_none() && !args.tls_verify_peer {
            return Err(Error::invalid(
                "--tls-authz",
                first.as_str(),
                "needs --tls-verify-peer (or --tls-psk): without a verified client certificate \
                 there is no identity to check",
            ));
        }
    }
    Ok(TlsSettings {
        mode,
        creds: args.tls_creds.clone(),
        psk: args.tls_psk.clone(),
        verify_peer: args.tls_verify_peer,
        authz: args.tls_authz.clone(),
    })
}

/// `value` seconds of option `flag`, at most [`MAX_SECS`] (clap checks the command line's;
/// this holds for values from anywhere else).
fn secs(flag: &'static str, value: u64) -> Result<Duration> {
    if value > MAX_SECS {
        return Err(Error::invalid(
            flag,
            value.to_string(),
            format!("more than {MAX_SECS} seconds (ten years)"),
        ));
    }
    Ok(Duration::from_secs(value))
}

/// Like [`secs`], and at least 1.
fn positive_secs(flag: &'static str, value: u64) -> Result<Duration> {
    if value == 0 {
        return Err(Error::invalid(flag, "0", "must be at least 1 second"));
    }
    secs(flag, value)
}

/// Zero means "off".
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Permission bits of option `flag`: at most 0777.
fn mode(flag: &'static str, value: u32) -> Result<u32> {
    if value > 0o777 {
        return Err(Error::invalid(
            flag,
            format!("{value:o}"),
            "mode has bits above 0777",
        ));
    }
    Ok(value)
}

/// The clap parser of a `SECS` option: a number of seconds up to [`MAX_SECS`].
pub fn secs_parser() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(..=MAX_SECS)
}

/// The clap parser of the `--*-mode` options: octal permission bits, at most 0777.
pub fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode"))?;
    if m > 0o777 {
        return Err(format!("{s:?}: mode has bits above 0777"));
    }
    Ok(m)
}

/// The clap parser of a group option: a number, or a name looked up in the group database.
pub fn parse_group(s: &str) -> std::result::Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("{s:?}: no such group")),
        Err(e) => Err(format!("{s:?}: looking the group up: {e}")),
    }
}

/// The clap parser of a user option: a number, or a name looked up in the user database.
pub fn parse_user(s: &str) -> std::result::Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("{s:?}: no such user")),
        Err(e) => Err(format!("{s:?}: looking the user up: {e}")),
    }
}

/// The clap parser of `--cache` and `--base-cache`.
pub fn parse_cache(s: &str) -> std::result::Result<CacheMode, String> {
    match s {
        "direct" | "none" => Ok(CacheMode::Direct),
        "buffered" | "writeback" => Ok(CacheMode::Buffered),
        _ => Err(format!("{s:?}: expected direct or buffered")),
    }
}

/// The clap parser of a byte count with an optional binary suffix (`512M`, `2G`, `1GiB`).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// Every `--throttle-group`, checked; a name given twice is refused.
fn throttle_groups(args: &[String]) -> Result<Vec<(String, ThrottleLimits)>> {
    let mut out: Vec<(String, ThrottleLimits)> = Vec::new();
    for s in args {
        let g = parse_throttle_group(s)?;
        if out.iter().any(|(n, _)| *n == g.0) {
            return Err(Error::invalid(
                "--throttle-group",
                s.as_str(),
                format!("throttle group {:?} given twice", g.0),
            ));
        }
        out.push(g);
    }
    Ok(out)
}

/// Splits `GROUP:key=value,...` (a `--throttle-group`): the name and its checked limits.
fn parse_throttle_group(s: &str) -> Result<(String, ThrottleLimits)> {
    let bad = |why: String| Error::invalid("--throttle-group", s, why);
    let (name, rest) = s
        .split_once(':')
        .ok_or_else(|| bad("expected GROUP:key=value,...".into()))?;
    throttle::check_group_name(name).map_err(|e| bad(e.to_string()))?;
    let limits = throttle::parse_limits(&serde_json::Value::String(rest.to_string()))
        .map_err(|e| bad(e.to_string()))?;
    Ok((name.to_string(), limits))
}

/// Splits `NAME=OVERLAY`, `NAME=OVERLAY:ro` or `NAME=OVERLAY:rw` (an `--export`), with
/// throttling options after it: `,key=value,...` (QEMU's limit names, or `throttle-group`).
/// A comma in the path is kept unless what follows is a list of `key=value`.
fn parse_export(s: &str) -> Result<ExportSpec> {
    let bad = |why: &str| Error::invalid("--export", s, why);
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=OVERLAY[:ro]"))?;
    let (path, opts) = match path.split_once(',') {
        Some((p, o)) if o.split(',').all(|w| w.contains('=')) => (p, Some(o)),
        _ => (path, None),
    };
    let mut throttle = ExportThrottle::default();
    // `,bitmap=B` (repeatable): dirty bitmaps served as qemu:dirty-bitmap:B.
    let mut bitmaps = Vec::new();
    if let Some(o) = opts {
        let mut pairs = Vec::new();
        let mut group = None;
        for kv in o.split(',').filter_map(|w| w.split_once('=')) {
            match kv {
                ("throttle-group", g) => group = Some(g.to_string()),
                ("bitmap", b) if !b.is_empty() => bitmaps.push(b.to_string()),
                ("bitmap", _) => return Err(bad("expected ,bitmap=NAME (a bitmap name)")),
                kv => pairs.push(kv),
            }
        }
        throttle.limits = throttle::limits_from_pairs(pairs).map_err(|e| bad(&e.to_string()))?;
        if let Some(g) = &group {
            throttle::check_group_name(g).map_err(|e| bad(&e.to_string()))?;
            if !throttle.limits.is_empty() {
                return Err(bad(&throttle::ThrottleError::Both.to_string()));
            }
        }
        throttle.group = group;
    }
    if name.len() > wire::MAX_STRING || name.contains('\0') {
        return Err(bad("bad export name (at most 4096 bytes, no NUL)"));
    }
    let (path, read_only) = if let Some(p) = path.strip_suffix(":ro") {
        (p, true)
    } else if let Some(p) = path.strip_suffix(":rw") {
        (p, false)
    } else {
        (path, false)
    };
    if path.is_empty() {
        return Err(bad("empty overlay path"));
    }
    Ok(ExportSpec {
        name: name.to_string(),
        overlay: PathBuf::from(path),
        read_only,
        throttle,
        options: Default::default(),
        bitmaps,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// `addcow serve ARGS` as clap reads it.
    fn args(line: &[&str]) -> ServeArgs {
        let mut all = vec!["serve"];
        all.extend_from_slice(line);
        Cli::try_parse_from(all).expect("clap accepts it").serve
    }

    fn config(line: &[&str]) -> Result<DaemonConfig> {
        DaemonConfig::try_from(args(line))
    }

    #[test]
    fn export_bitmaps_parse() {
        let e = parse_export("a=/x.add-cow:ro,bitmap=b0,bitmap=b1").unwrap();
        assert_eq!(e.bitmaps, vec!["b0".to_string(), "b1".to_string()]);
        assert!(e.read_only);
        assert_eq!(e.overlay, PathBuf::from("/x.add-cow"));
        assert!(parse_export("a=/x,bitmap=").is_err());
        assert!(parse_export("a=/x,bitmap=b,foo=1").is_err());
        assert!(parse_export("a=/x").unwrap().bitmaps.is_empty());
    }

    fn spec(name: &str, p: &str, read_only: bool) -> ExportSpec {
        ExportSpec {
            name: name.into(),
            overlay: PathBuf::from(p),
            read_only,
            throttle: ExportThrottle::default(),
            options: Default::default(),
            bitmaps: Vec::new(),
        }
    }

    /// The refusal's kind, option and value, and its message.
    fn refused(line: &[&str]) -> (ErrorKind, Option<&'static str>, Option<String>, String) {
        let e = config(line).expect_err("refused");
        (
            e.kind(),
            e.flag(),
            e.value().map(str::to_string),
            e.to_string(),
        )
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = config(&["--socket", "/s", "/a.add-cow"]).unwrap();
        assert!(!c.demo);
        assert_eq!(c.exports, [spec("", "/a.add-cow", false)]);
        assert_eq!(
            c.listen,
            ListenConfig {
                socket: Some("/s".into()),
                socket_mode: 0o600,
                socket_group: None,
                socket_allow_uid: vec![],
                socket_allow_gid: vec![],
                vhost_socket_mode: 0o600,
                vhost_socket_group: None,
                vhost_socket_allow_uid: vec![],
                vhost_socket_allow_gid: vec![],
                control_mode: 0o600,
                control_group: None,
                control_allow_uid: vec![],
                control_allow_gid: vec![],
                tcp: None,
                allow_remote: false,
                allow_insecure_remote: false,
                vhost_user_blk: None,
            }
        );
        assert!(!c.metrics_allow_remote);
        assert_eq!(c.control_idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.tls, TlsSettings::default());
        assert_eq!(c.tls.mode, TlsMode::Off);
        assert_eq!(
            c.engine,
            EngineSettings {
                cores: None,
                image_cache: CacheMode::Direct,
                base_cache: CacheMode::Direct,
                base_timeout: Duration::from_secs(30),
                commit_delay: Some(Duration::from_secs(5)),
            }
        );
        assert_eq!(
            c.conn,
            ConnSettings {
                max_connections: 64,
                max_buffer_memory: None,
                handshake_timeout: Duration::from_secs(10),
                payload_timeout: Duration::from_secs(30),
                idle_timeout: None,
                mode: ConnMode::Ring,
            }
        );
        assert_eq!(
            c.host,
            HostConfig {
                shutdown_grace: Duration::from_secs(5),
                copy_on_read: false,
                lock_wait: Duration::from_secs(5),
                extent_ahead: 0,
            }
        );
        assert_eq!((c.control, c.metrics, c.pid_file), (None, None, None));
        assert!(c.allow_dirs.is_empty() && !c.allow_remote_bases);
    }

    #[test]
    fn values_are_converted_once() {
        let c = config(&[
            "--socket-mode",
            "0660",
            "--cache",
            "buffered",
            "--base-cache",
            "writeback",
            "--cores",
            "0",
            "--commit-interval",
            "0",
            "--payload-timeout",
            "0",
            "--idle-timeout",
            "0",
            "--handshake-timeout",
            "0",
            "--shutdown-grace",
            "7",
            "--lock-wait",
            "0",
            "--extent-ahead",
            "1M",
            "--max-buffer-memory",
            "512M",
            "--conn-mode",
            "threads",
            "--copy-on-read",
            "--tcp",
            "127.0.0.1:10809",
            "/a.add-cow",
        ])
        .unwrap();
        assert_eq!(c.listen.socket_mode, 0o660);
        assert_eq!(c.listen.tcp.as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(c.engine.image_cache, CacheMode::Buffered);
        assert_eq!(c.engine.base_cache, CacheMode::Buffered);
        assert_eq!(c.engine.cores, Some(1), "at least one core");
        assert_eq!(c.engine.commit_delay, None, "0: only on FLUSH");
        assert_eq!(
            c.conn.payload_timeout,
            Duration::from_secs(1),
            "at least 1 s"
        );
        assert_eq!(c.conn.idle_timeout, Some(Duration::from_secs(1)));
        assert_eq!(c.conn.handshake_timeout, Duration::ZERO);
        assert_eq!(c.conn.max_buffer_memory, Some(512 << 20));
        assert_eq!(c.conn.mode, ConnMode::Threads);
        assert_eq!(c.host.shutdown_grace, Duration::from_secs(7));
        assert_eq!(c.host.lock_wait, Duration::ZERO);
        assert_eq!(c.host.extent_ahead, 1 << 20);
        assert!(c.host.copy_on_read);
        let e = c.engine.engine_config();
        assert_eq!((e.cores, e.commit_delay), (1, None));
        assert_eq!(e.image_cache, CacheMode::Buffered);
    }

    #[test]
    fn socket_permissions_and_peer_lists_are_per_socket() {
        let c = config(&[
            "--socket",
            "/s",
            "--socket-mode",
            "0660",
            "--socket-group",
            "0",
            "--socket-allow-uid",
            "0,1",
            "--socket-allow-gid",
            "2",
            "--vhost-socket-mode",
            "0640",
            "--vhost-socket-group",
            "3",
            "--vhost-socket-allow-uid",
            "8,9",
            "--vhost-socket-allow-gid",
            "10",
            "--control",
            "/c",
            "--control-mode",
            "0700",
            "--control-group",
            "4",
            "--control-allow-uid",
            "5",
            "--control-allow-uid",
            "6",
            "--control-allow-gid",
            "7",
            "--control-idle-timeout",
            "0",
            "--metrics-allow-remote",
            "/a.add-cow",
        ])
        .unwrap();
        let l = &c.listen;
        assert_eq!((l.socket_mode, l.socket_group), (0o660, Some(0)));
        assert_eq!(
            (&l.socket_allow_uid[..], &l.socket_allow_gid[..]),
            (&[0, 1][..], &[2][..])
        );
        assert_eq!(
            (l.vhost_socket_mode, l.vhost_socket_group),
            (0o640, Some(3))
        );
        assert_eq!(
            (&l.vhost_socket_allow_uid[..], &l.vhost_socket_allow_gid[..]),
            (&[8, 9][..], &[10][..])
        );
        assert_eq!((l.control_mode, l.control_group), (0o700, Some(4)));
        assert_eq!(
            (&l.control_allow_uid[..], &l.control_allow_gid[..]),
            (&[5, 6][..], &[7][..])
        );
        assert_eq!(c.control_idle_timeout, None, "0 means never");
        assert!(c.metrics_allow_remote);
        let mut args = args(&["/a.add-cow"]);
        args.control_mode = 0o1777;
        let e = DaemonConfig::try_from(args).unwrap_err();
        assert_eq!(e.flag(), Some("--control-mode"), "{e}");
    }

    #[test]
    fn exports_are_split_named_once_and_read_only_folded_in() {
        let c = config(&[
            "--export",
            "vm1=/a/b.add-cow",
            "--export",
            "v=/a/c:ro",
            "--export",
            "w=/a/d:rw",
            "/a/default.add-cow",
        ])
        .unwrap();
        assert_eq!(
            c.exports,
            [
                spec("", "/a/default.add-cow", false),
                spec("vm1", "/a/b.add-cow", false),
                spec("v", "/a/c", true),
                spec("w", "/a/d", false),
            ]
        );
        assert_eq!(c.default_overlay(), Some(Path::new("/a/default.add-cow")));
        let c = config(&["--read-only", "--export", "=x", "--export", "y=z:rw"]).unwrap();
        assert_eq!(c.exports, [spec("", "x", true), spec("y", "z", true)]);
        assert_eq!(c.default_overlay(), Some(Path::new("x")));
        assert!(!c.demo);
    }

    /// `--export ...,key=value` carries throttle limits (byte values with suffixes) or a
    /// group made by `--throttle-group`; bad keys, unknown groups and both forms at once are
    /// refused naming the option, the value and the key.
    #[test]
    fn throttle_options_parse_and_bad_ones_name_the_key() {
        let c = config(&[
            "--throttle-group",
            "gold:iops-total=3000,bps-total=100M",
            "--export",
            "a=/x/a.add-cow:ro,iops-total=5000,bps-write=50M,iops-total-max=6000",
            "--export",
            "b=/x/b.add-cow,throttle-group=gold",
            "--export",
            "c=/x/c,d.add-cow",
        ])
        .unwrap();
        assert_eq!(c.throttle_groups.len(), 1);
        let (name, g) = &c.throttle_groups[0];
        assert_eq!(name, "gold");
        assert_eq!((g.iops_total, g.bps_total), (Some(3000), Some(100 << 20)));
        let a = &c.exports[0];
        assert_eq!(
            (a.name.as_str(), a.overlay.as_path(), a.read_only),
            ("a", Path::new("/x/a.add-cow"), true)
        );
        assert_eq!(a.throttle.limits.iops_total, Some(5000));
        assert_eq!(a.throttle.limits.iops_total_max, Some(6000));
        assert_eq!(a.throttle.limits.bps_write, Some(50 << 20));
        assert_eq!(a.throttle.group, None);
        assert_eq!(c.exports[1].throttle.group.as_deref(), Some("gold"));
        assert!(c.exports[1].throttle.limits.is_empty());
        // A comma not followed by key=value stays in the path.
        assert_eq!(c.exports[2].overlay, Path::new("/x/c,d.add-cow"));
        assert_eq!(c.exports[2].throttle, ExportThrottle::default());

        for (line, flag, needle) in [
            (
                vec!["--export", "a=/x,iops-totl=5"],
                "--export",
                "iops-totl",
            ),
            (
                vec!["--export", "a=/x,iops-total=5k"],
                "--export",
                "iops-total",
            ),
            (
                vec!["--export", "a=/x,throttle-group=nope"],
                "--export",
                "no --throttle-group \"nope\"",
            ),
            (
                vec![
                    "--throttle-group",
                    "g:iops-total=1",
                    "--export",
                    "a=/x,throttle-group=g,iops-total=2",
                ],
                "--export",
                "not both",
            ),
            (
                vec!["--throttle-group", "g", "--export", "a=/x"],
                "--throttle-group",
                "GROUP:key=value",
            ),
            (
                vec!["--throttle-group", "g h:iops-total=1", "--export", "a=/x"],
                "--throttle-group",
                "invalid throttle group name",
            ),
            (
                vec!["--throttle-group", "g:bps-reed=1", "--export", "a=/x"],
                "--throttle-group",
                "bps-reed",
            ),
            (
                vec![
                    "--throttle-group",
                    "g:iops-total=1",
                    "--throttle-group",
                    "g:iops-total=2",
                    "--export",
                    "a=/x",
                ],
                "--throttle-group",
                "given twice",
            ),
        ] {
            let (kind, f, _, msg) = refused(&line);
            assert_eq!(kind, ErrorKind::InvalidArgument, "{line:?}");
            assert_eq!(f, Some(flag), "{line:?}");
            assert!(msg.contains(needle), "{line:?}: {msg}");
        }
    }

    #[test]
    fn bad_exports_name_the_option_and_the_value() {
        for (value, why) in [
            ("novalue", "expected NAME=OVERLAY[:ro]"),
            ("a=", "empty overlay path"),
            ("v=:ro", "empty overlay path"),
            ("a\0b=x", "bad export name"),
        ] {
            let (kind, flag, v, msg) = refused(&["--export", value]);
            assert_eq!(kind, ErrorKind::InvalidArgument);
            assert_eq!((flag, v.as_deref()), (Some("--export"), Some(value)));
            assert!(msg.starts_with(&format!("--export {value:?}: ")), "{msg}");
            assert!(msg.contains(why), "{msg}");
        }
        let long = format!("{}=x", "n".repeat(wire::MAX_STRING + 1));
        assert!(refused(&["--export", &long]).3.contains("bad export name"));
        // The positional overlay is the default export: "=x" names it a second time.
        let (_, flag, v, msg) = refused(&["--export", "=x", "/d.add-cow"]);
        assert_eq!((flag, v.as_deref()), (Some("--export"), Some("=x")));
        assert!(msg.contains("export name \"\" given twice"), "{msg}");
        let (_, _, v, msg) = refused(&["--export", "a=1", "--export", "a=2"]);
        assert_eq!(v.as_deref(), Some("a=2"));
        assert!(msg.contains("given twice"), "{msg}");
    }

    #[test]
    fn demo_is_what_no_export_and_no_control_means() {
        let c = config(&[]).unwrap();
        assert!(c.demo && c.exports.is_empty());
        assert!(!config(&["--control", "/c"]).unwrap().demo);
        assert!(!config(&["--export", "a=b"]).unwrap().demo);
        // The demo has a default export, so vhost-user-blk may serve it.
        assert!(config(&["--vhost-user-blk", "/v"]).unwrap().demo);
    }

    #[test]
    fn vhost_needs_a_default_export() {
        let (kind, flag, v, msg) = refused(&["--vhost-user-blk", "/v.sock", "--export", "a=b"]);
        assert_eq!(kind, ErrorKind::InvalidArgument);
        assert_eq!(
            (flag, v.as_deref()),
            (Some("--vhost-user-blk"), Some("/v.sock"))
        );
        assert!(msg.contains("default export"), "{msg}");
        assert!(config(&["--vhost-user-blk", "/v.sock", "--export", "=b"]).is_ok());
        assert!(config(&["--vhost-user-blk", "/v.sock", "/o.add-cow"]).is_ok());
    }

    #[test]
    fn extent_ahead_is_a_power_of_two_of_at_least_4k_or_off() {
        for ok in ["0", "4K", "1M"] {
            assert!(config(&["--extent-ahead", ok, "/o"]).is_ok(), "{ok}");
        }
        for bad in ["3000", "2K", "12K"] {
            let (kind, flag, _, msg) = refused(&["--extent-ahead", bad, "/o"]);
            assert_eq!(
                (kind, flag),
                (ErrorKind::InvalidArgument, Some("--extent-ahead"))
            );
            assert!(msg.contains("power of two"), "{msg}");
        }
    }

    /// Values that reach the conversion without clap's checks (as a configuration file's
    /// would) are refused there too.
    #[test]
    fn out_of_range_values_are_refused_without_clap() {
        let mut a = args(&["/o"]);
        a.lock_wait = MAX_SECS + 1;
        let e = DaemonConfig::try_from(a).unwrap_err();
        assert_eq!(e.flag(), Some("--lock-wait"));
        assert_eq!(e.value(), Some((MAX_SECS + 1).to_string().as_str()));
        let mut a = args(&["/o"]);
        a.socket_mode = 0o1777;
        let e = DaemonConfig::try_from(a).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--socket-mode \"1777\": mode has bits above 0777"
        );
        let mut a = args(&["/o"]);
        a.idle_timeout = Some(u64::MAX);
        assert_eq!(
            DaemonConfig::try_from(a).unwrap_err().flag(),
            Some("--idle-timeout")
        );
        let mut a = args(&["/o"]);
        a.base_timeout = 0;
        assert_eq!(
            DaemonConfig::try_from(a).unwrap_err().to_string(),
            "--base-timeout \"0\": must be at least 1 second"
        );
        // clap's own range checks on the command line.
        for line in [
            &["--handshake-timeout", "315360001"][..],
            &["--base-timeout", "0"],
            &["--socket-mode", "1777"],
            &["--socket-mode", "0999"],
            &["--cache", "x"],
        ] {
            let mut all = vec!["serve"];
            all.extend_from_slice(line);
            assert!(Cli::try_parse_from(all).is_err(), "{line:?}");
        }
    }

    #[test]
    fn the_unix_socket_and_nothing_to_listen_on() {
        let l = |line: &[&str]| config(line).unwrap();
        // Demo: ./addcow.sock unless systemd passed sockets.
        let c = l(&[]);
        assert_eq!(
            c.listen.unix_socket(c.demo, false).unwrap(),
            Some(PathBuf::from(demo::DEMO_SOCKET))
        );
        assert_eq!(c.listen.unix_socket(c.demo, true).unwrap(), None);
        let c = l(&["--socket", "/s", "/o"]);
        assert_eq!(
            c.listen.unix_socket(c.demo, true).unwrap(),
            Some(PathBuf::from("/s"))
        );
        let c = l(&["/o"]);
        assert_eq!(c.listen.unix_socket(c.demo, true).unwrap(), None);
        let e = c.listen.unix_socket(c.demo, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NothingToListenOn);
        assert!(e.to_string().contains("give --socket PATH"), "{e}");
        for other in [
            &["--tcp", "127.0.0.1:1", "/o"][..],
            &["--vhost-user-blk", "/v", "/o"],
        ] {
            let c = l(other);
            assert_eq!(c.listen.unix_socket(c.demo, false).unwrap(), None);
        }
    }

    #[test]
    fn clap_value_parsers() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("1777").is_err());
        assert_eq!(parse_cache("buffered"), Ok(CacheMode::Buffered));
        assert_eq!(parse_cache("none"), Ok(CacheMode::Direct));
        assert!(parse_cache("x").is_err());
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert!(parse_bytes("lots").is_err());
    }

    /// The TLS options: credentials alone mean require; every flag lands in its field.
    #[test]
    fn tls_options_are_matched_and_converted() {
        let c = config(&["--socket", "/s", "--tls-creds", "/pki", "/a.add-cow"]).unwrap();
        assert_eq!(
            c.tls,
            TlsSettings {
                mode: TlsMode::Require,
                creds: Some("/pki".into()),
                psk: None,
                verify_peer: false,
                authz: vec![],
            }
        );
        let c = config(&[
            "--socket",
            "/s",
            "--tls",
            "on",
            "--tls-psk",
            "/k.psk",
            "/a.add-cow",
        ])
        .unwrap();
        assert_eq!(
            (c.tls.mode, c.tls.psk),
            (TlsMode::On, Some("/k.psk".into()))
        );
        let c = config(&[
            "--socket",
            "/s",
            "--tls-creds",
            "/pki",
            "--tls-verify-peer",
            "--tls-authz",
            "CN=alice,O=x",
            "--tls-authz",
            "CN=bob",
            "--tcp",
            "0.0.0.0:10809",
            "--allow-insecure-remote",
            "/a.add-cow",
        ])
        .unwrap();
        assert!(c.tls.verify_peer);
        assert_eq!(c.tls.authz, ["CN=alice,O=x", "CN=bob"]);
        assert!(c.listen.allow_remote && c.listen.allow_insecure_remote);
        // PSK identities need no certificate.
        let c = config(&["--tls-psk", "/k", "--tls-authz", "alice", "/a.add-cow"]).unwrap();
        assert_eq!(c.tls.authz, ["alice"]);
    }

    #[test]
    fn tls_contradictions_are_refused_naming_the_option() {
        let cases: &[(&[&str], &str, &str)] = &[
            (&["--tls", "on"], "--tls", "needs credentials"),
            (&["--tls", "require"], "--tls", "needs credentials"),
            (
                &["--tls", "off", "--tls-creds", "/p"],
                "--tls",
                "contradicts",
            ),
            (
                &["--tls-verify-peer", "--tls-psk", "/k"],
                "--tls-verify-peer",
                "--tls-creds",
            ),
            (
                &["--tls-creds", "/p", "--tls-authz", "CN=a"],
                "--tls-authz",
                "--tls-verify-peer",
            ),
            (
                &["--tls", "on", "--tls-psk", "/k", "--tls-authz", "a"],
                "--tls-authz",
                "--tls require",
            ),
            (
                &["--tls-psk", "/k", "--tls-authz", ""],
                "--tls-authz",
                "empty",
            ),
        ];
        for (line, flag, why) in cases {
            let mut l = line.to_vec();
            l.push("/a.add-cow");
            let (kind, f, _, msg) = refused(&l);
            assert_eq!(kind, ErrorKind::InvalidArgument, "{line:?}");
            assert_eq!(f, Some(*flag), "{line:?}: {msg}");
            assert!(msg.contains(why), "{line:?}: {msg}");
        }
    }
}
