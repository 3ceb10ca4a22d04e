//! What a running daemon hosts: the engine, the export table, the allowed folders, the event
//! broadcaster and the stop switch; and the operations that change the exports at runtime
//! ([`Host::add_export`], [`Host::delete_export`]) or report on them ([`Host::export_info`],
//! [`Host::export_stats`]). The command line, the control socket and the metrics endpoint all
//! go through here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use addcow_engine::{DiskOptions, DiskStats, Engine};
use serde::Serialize;

use super::allow::{AllowError, AllowedDirs};
use super::events::{self, Events};
use super::jobs::Jobs;
use super::throttle::{ExportThrottle, ThrottleError, ThrottleGroups};
use super::vhost_export::{self, VhostExport, VhostInfo, VhostParams, VhostSetupError};
use crate::backend::disk::EngineDisk;
use crate::backend::probe::LayerFiles;
use crate::conn::budget::Pool;
use crate::conn::listener::PeerPolicy;
use crate::nbd::export::{DeleteRefused, Export, Exports};
use crate::nbd::stats::{Op, Percentiles};
use crate::nbd::wire;
use crate::process::signals::Stop;
use addcow_engine::sync::lock;

/// Who asks to add an export: the command line is trusted; the control socket is held to the
/// allowed folders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `addcow serve --export` / the positional overlay.
    CommandLine,
    /// `export-add` on the control socket.
    Control,
}

/// How `export-del` treats connected clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeleteMode {
    /// Refuse while clients are connected.
    Safe,
    /// Stop the clients' readers, answer what is in flight, disconnect them.
    Hard,
}

/// Why an export operation failed. The message is what a person reads (the control socket
/// sends it as the JSON-RPC error message; the command line prints it).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The name is too long or holds a NUL byte.
    #[error("invalid export name {0:?}: at most 4096 bytes, no NUL")]
    BadName(String),
    /// Another export (or an add under way) has this name.
    #[error("export name {0:?} is already in use")]
    NameTaken(String),
    /// This daemon already serves the overlay, under another name.
    #[error("{}: already served by this daemon as export {export:?}", overlay.display())]
    AlreadyServed {
        /// The overlay as given.
        overlay: PathBuf,
        /// The export serving it.
        export: String,
    },
    /// No export has this name.
    #[error("no export named {0:?}")]
    NoSuchExport(String),
    /// The export's throttling was refused (bad limits, no such group).
    #[error("{0}")]
    Throttle(#[from] ThrottleError),
    /// The allowed-folders rule refused a file.
    #[error("{0}")]
    NotAllowed(#[from] AllowError),
    /// The engine could not open the overlay (missing file, corrupt header, locked, ...).
    #[error("opening export {name:?}: {error}")]
    Open {
        /// The export name.
        name: String,
        /// The engine's error, as the command line prints it.
        error: Box<addcow_engine::Error>,
    },
    /// `safe` delete with clients connected.
    #[error("export {name:?} has {clients} client(s) connected; mode \"hard\" disconnects them")]
    Busy {
        /// The export name.
        name: String,
        /// Connected clients.
        clients: usize,
    },
    /// A delete of this export is already under way.
    #[error("export {0:?} is already being deleted")]
    Deleting(String),
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The vhost-user-blk side of an `export-add` could not be set up (bad `num-queues`, the
    /// socket in use, ...); nothing was opened or is left behind.
    #[error("export {name:?}: {error}")]
    Vhost {
        /// The export name.
        name: String,
        /// What failed.
        error: VhostSetupError,
    },
    /// A backup runs on the export, or the export is a backup's point-in-time view.
    #[error("{0}")]
    BackupRunning(String),
    /// The export is gone, but committing its overlay on the way out failed.
    #[error("export {name:?} was removed, but committing its overlay failed: {error}")]
    Close {
        /// The export name.
        name: String,
        /// The engine's error.
        error: Box<addcow_engine::Error>,
    },
}

impl HostError {
    /// A short, stable name of the error class (sent as the JSON-RPC error's `data.class`).
    pub fn class(&self) -> &'static str {
        match self {
            HostError::BadName(_) => "invalid-name",
            HostError::NameTaken(_) => "name-taken",
            HostError::AlreadyServed { .. } => "already-served",
            HostError::NoSuchExport(_) => "no-such-export",
            HostError::Throttle(t) => t.class(),
            HostError::NotAllowed(_) => "not-allowed",
            HostError::Open { .. } => "open-failed",
            HostError::Busy { .. } => "busy",
            HostError::Deleting(_) => "deleting",
            HostError::ShuttingDown => "shutting-down",
            HostError::Close { .. } => "commit-failed",
            HostError::BackupRunning(_) => "backup-running",
            HostError::Vhost {
                error: VhostSetupError::Queues { .. },
                ..
            } => "invalid-queues",
            HostError::Vhost { .. } => "socket-failed",
        }
    }
}

/// What an NBD export serves beyond its disk: who may use it and which dirty bitmaps (both
/// set before it is published, so no client ever sees it without them).
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// The TLS identities allowed to use it (`None`: every client the listener admits).
    pub tls_authz: Option<Vec<String>>,
    /// The disk's dirty bitmaps served as `qemu:dirty-bitmap:NAME` (each must exist on the
    /// disk; checked before the export is published).
    pub bitmaps: Vec<String>,
}

/// One export as `query-exports` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// How it was added: `nbd`, or `vhost-user-blk` (then also reachable over NBD by name).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The vhost-user-blk socket and queues (type `vhost-user-blk` only).
    #[serde(rename = "vhost-user-blk", skip_serializing_if = "Option::is_none")]
    pub vhost_user_blk: Option<VhostInfo>,
    /// The `.add-cow` file.
    pub overlay: Option<PathBuf>,
    /// Virtual size in bytes.
    pub size: u64,
    /// Writes refused.
    pub read_only: bool,
    /// NBD connections in transmission.
    pub clients: usize,
    /// Bytes held by the raw image (bits set).
    pub allocated_bytes: Option<u64>,
    /// Every bit set: the raw image is a standalone disk.
    pub complete: Option<bool>,
    /// An `export-del` is under way.
    pub shutting_down: bool,
    /// The throttle limits in force (its own, or its group's); absent: not throttled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<addcow_engine::qos::ThrottleLimits>,
    /// The named throttle group it is in; absent: none (limits of its own, or none).
    #[serde(rename = "throttle-group", skip_serializing_if = "Option::is_none")]
    pub throttle_group: Option<String>,
    /// The backup running on this export, or the one whose point-in-time view it serves
    /// (with what its copy-before-write has cost so far).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<serde_json::Value>,
}

/// One operation's figures in `query-stats`.
#[derive(Debug, Clone, Serialize)]
pub struct OpStats {
    /// Requests ended.
    pub requests: u64,
    /// Bytes they covered.
    pub bytes: u64,
    /// Error replies.
    pub errors: u64,
    /// In flight now.
    pub in_flight: u64,
    /// Latency percentiles in µs (header parsed → reply sent); `null` before the first reply.
    pub latency_us: Option<Percentiles>,
}

/// One export's figures in `query-stats`.
#[derive(Debug, Clone, Serialize)]
pub struct ExportStatsReport {
    /// Export name.
    pub name: String,
    /// Connections in transmission.
    pub clients: usize,
    /// Requests in flight over every operation.
    pub in_flight: u64,
    /// Per operation name (read, write, flush, trim, zeroes, block-status, cache, other).
    pub ops: serde_json::Map<String, serde_json::Value>,
    /// Group commits that completed.
    pub commits: u64,
    /// Group commits that failed.
    pub commits_failed: u64,
    /// FLUSH/FUA requests a commit answered, on average.
    pub average_commit_batch: f64,
    /// Bitmap bytes written by commits.
    pub commit_bytes: u64,
    /// FLUSH/FUA commits answered with no sync: nothing was written since the last durable
    /// point.
    pub commits_skipped: u64,
    /// Bytes read from the base.
    pub base_bytes_read: u64,
    /// Sectors whose bit went from clear to set.
    pub bits_set: u64,
    /// What its throttle group held its requests back (zeros when never throttled).
    pub throttle: super::throttle::StatsReport,
}

/// What an `export-del` did.
#[derive(Debug, Clone, Serialize)]
pub struct Deleted {
    /// Export name.
    pub name: String,
    /// The `.add-cow` file (committed and unlocked).
    pub overlay: Option<PathBuf>,
    /// The mode used.
    pub mode: DeleteMode,
    /// Clients that were disconnected (NBD connections, and a vhost-user-blk frontend).
    pub clients_disconnected: usize,
}

/// How a [`Host`] treats exports: the part of the daemon's configuration it takes whole at
/// construction (built from `addcow serve`'s options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// `--shutdown-grace`: how long an `export-del hard` (and a shutdown) waits for requests in
    /// flight before closing the connections.
    pub shutdown_grace: Duration,
    /// `--copy-on-read`: whether an export turns copy-on-read on when it is not asked.
    pub copy_on_read: bool,
    /// `--lock-wait`: how long opening an overlay locked by another process is retried (zero:
    /// refused at once).
    pub lock_wait: Duration,
    /// `--extent-ahead`: extent-ahead allocation size for every export, in bytes (a power of
    /// two of at least 4 KiB; 0 = off).
    pub extent_ahead: u64,
}

impl Default for HostConfig {
    /// No grace, no copy-on-read, no lock wait, the engine's default extent-ahead.
    fn default() -> Self {
        HostConfig {
            shutdown_grace: Duration::ZERO,
            copy_on_read: false,
            lock_wait: Duration::ZERO,
            extent_ahead: addcow_engine::DEFAULT_EXTENT_AHEAD,
        }
    }
}

/// See the module docs.
pub struct Host {
    engine: Option<Engine>,
    /// The export table the NBD side reads.
    pub exports: Arc<Exports>,
    /// Folders `export-add` may open files in.
    pub allowed: AllowedDirs,
    /// Notifications to control clients.
    pub events: Arc<Events>,
    /// Background jobs (`job-start`, `query-jobs`, ...).
    pub jobs: Jobs,
    /// Backups running (`backup-begin` / `backup-end`).
    pub backups: crate::backend::fleece::Backups,
    /// The daemon's stop switch.
    pub stop: Arc<Stop>,
    /// The named throttle groups (`throttle-group-set`, `--throttle-group`).
    pub throttle_groups: ThrottleGroups,
    /// Fixed at construction.
    config: HostConfig,
    shards: usize,
    /// Exports served over vhost-user-blk (added with `type: "vhost-user-blk"`), by name.
    vhost: Mutex<HashMap<String, VhostExport>>,
    /// The NBD listeners' TLS credentials (set once at start when `--tls` is not off), for
    /// `tls-reload`.
    pub tls: std::sync::OnceLock<Arc<crate::conn::tls::TlsServer>>,
    /// The state file (`--state`, set once at start), where the control calls that change the
    /// served set record it before replying (see [`super::state`]).
    pub state: std::sync::OnceLock<Arc<super::state::State>>,
    /// Who may connect to the sockets of those exports (`--vhost-socket-allow-uid/gid`).
    vhost_policy: Option<Arc<PeerPolicy>>,
    /// The daemon's buffer pool, which the vhost-user-blk exports added here bounce through
    /// (`None`: only their per-queue cap).
    buffer_pool: Option<Arc<Pool>>,
}

impl Host {
    /// A host over `engine` (`None`: the exports are given, none can be added) whose counters
    /// have one shard per engine core, treating exports as `config` says.
    pub fn new(
        engine: Option<Engine>,
        exports: Arc<Exports>,
        allowed: AllowedDirs,
        stop: Arc<Stop>,
        config: HostConfig,
    ) -> Host {
        let shards = engine.as_ref().map(Engine::cores).unwrap_or(1);
        let events = Arc::new(Events::default());
        Host {
            engine,
            exports,
            allowed,
            jobs: Jobs::new(Arc::clone(&events)),
            backups: Default::default(),
            events,
            stop,
            throttle_groups: ThrottleGroups::default(),
            config,
            shards,
            vhost: Mutex::new(HashMap::new()),
            tls: std::sync::OnceLock::new(),
            state: std::sync::OnceLock::new(),
            vhost_policy: None,
            buffer_pool: None,
        }
    }

    /// The host, whose vhost-user-blk exports let in only the frontends `policy` allows.
    pub fn with_vhost_policy(mut self, policy: Arc<PeerPolicy>) -> Host {
        self.vhost_policy = Some(policy);
        self
    }

    /// The host with `pool` as the buffer budget of the vhost-user-blk exports it adds (the one
    /// the NBD connections draw from: `--max-buffer-memory`).
    pub fn with_buffer_pool(mut self, pool: Arc<Pool>) -> Host {
        self.buffer_pool = Some(pool);
        self
    }

    /// What the host was built with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The options an export's disk is opened with, at `export-add` and at every later switch
    /// of its disk (a snapshot, a resize): the daemon's `--extent-ahead`, and `read_only` and
    /// `copy_on_read` as asked (copy-on-read defaults to `--copy-on-read`).
    pub fn disk_options(&self, read_only: bool, copy_on_read: Option<bool>) -> DiskOptions {
        DiskOptions {
            read_only,
            copy_on_read: copy_on_read.unwrap_or(self.config.copy_on_read),
            extent_ahead: self.config.extent_ahead,
        }
    }

    fn vhost_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VhostExport>> {
        lock(&self.vhost)
    }

    /// [`Host::add_export`], then serves the export over vhost-user-blk on `params.socket`
    /// too. The socket is bound (and `num-queues` checked) before the overlay is opened; if
    /// serving fails after the open, the export is deleted again. From the control socket the
    /// socket's folder must be an allowed folder. In throttle group `group` from its first
    /// request (see [`ThrottleGroups::join`]).
    pub fn add_vhost_export(
        &self,
        name: &str,
        overlay: &Path,
        opts: DiskOptions,
        origin: Origin,
        params: VhostParams,
        group: Option<addcow_engine::qos::ThrottleGroup>,
    ) -> Result<Arc<Export>, HostError> {
        if self.stop.is_set() {
            return Err(HostError::ShuttingDown);
        }
        // From the control socket: bound at the folder's real path, checked and held (see
        // `allow::SocketDir`), then looked up again once it is there.
        let mut params = params;
        let socket_dir = match origin {
            Origin::Control => {
                let d = self.allowed.check_socket(&params.socket)?;
                params.socket = d.path().to_path_buf();
                Some(d)
            }
            _ => None,
        };
        crate::process::seam::pause("vhost-socket-checked");
        let vhost_err = |error| HostError::Vhost {
            name: name.to_string(),
            error,
        };
        let bound = vhost_export::bind(params, self.shards).map_err(vhost_err)?;
        let export =
            self.add_export_in_group(name, overlay, opts, origin, group, Served::default())?;
        let served = bound
            .serve(
                export.backend.clone(),
                overlay,
                self.vhost_policy.clone(),
                self.buffer_pool.clone(),
            )
            .map_err(vhost_err)
            .and_then(|v| match socket_dir.as_ref().map(|d| d.verify_bound()) {
                Some(Err(e)) => {
                    v.stop(Instant::now());
                    Err(e.into())
                }
                _ => Ok(v),
            });
        match served {
            Ok(v) => {
                self.vhost_lock().insert(export.name.clone(), v);
                Ok(export)
            }
            Err(e) => {
                if let Err(d) = self.delete_export(&export.name, DeleteMode::Hard) {
                    tracing::warn!(export = %name, error = %d, "removing the half-added export");
                }
                Err(e)
            }
        }
    }

    /// Opens `overlay` on the engine and publishes it as export `name` (LIST and GO see it at
    /// once). From the control socket, every file must lie in the allowed folders. `opts`:
    /// read-only, copy-on-read.
    pub fn add_export(
        &self,
        name: &str,
        overlay: &Path,
        opts: DiskOptions,
        origin: Origin,
    ) -> Result<Arc<Export>, HostError> {
        self.add_export_authz(name, overlay, opts, origin, None)
    }

    /// [`Host::add_export`] for an export only the TLS clients with one of the `tls_authz`
    /// identities may use (set before it is published: no client ever sees it without).
    pub fn add_export_authz(
        &self,
        name: &str,
        overlay: &Path,
        opts: DiskOptions,
        origin: Origin,
        tls_authz: Option<Vec<String>>,
    ) -> Result<Arc<Export>, HostError> {
        let served = Served {
            tls_authz,
            ..Served::default()
        };
        self.add_export_in_group(name, overlay, opts, origin, None, served)
    }

    /// [`Host::add_export_authz`] for an export throttled as `throttle` says (its own limits, a
    /// named group, or none) from its first request: the disk is put in its group before the
    /// export is published. A named group that does not exist is refused before anything is
    /// opened. `served`: its TLS identities and the dirty bitmaps it serves.
    pub fn add_export_throttled(
        &self,
        name: &str,
        overlay: &Path,
        opts: DiskOptions,
        origin: Origin,
        throttle: &ExportThrottle,
        served: Served,
    ) -> Result<Arc<Export>, HostError> {
        let joining = self.throttle_groups.join(name, throttle)?;
        let export =
            self.add_export_in_group(name, overlay, opts, origin, joining.group.clone(), served)?;
        // Published in its group: a throttle-group-del from now on sees it as a member.
        drop(joining);
        Ok(export)
    }

    fn add_export_in_group(
        &self,
        name: &str,
        overlay: &Path,
        opts: DiskOptions,
        origin: Origin,
        group: Option<addcow_engine::qos::ThrottleGroup>,
        served: Served,
    ) -> Result<Arc<Export>, HostError> {
        let Served { tls_authz, bitmaps } = served;
        if self.stop.is_set() {
            return Err(HostError::ShuttingDown);
        }
        if name.len() > wire::MAX_STRING || name.contains('\0') {
            return Err(HostError::BadName(name.to_string()));
        }
        let Some(engine) = &self.engine else {
            return Err(HostError::ShuttingDown);
        };
        let claim = self
            .exports
            .claim(name)
            .ok_or_else(|| HostError::NameTaken(name.to_string()))?;
        if origin == Origin::Control {
            self.allowed.check_before_open(overlay)?;
        }
        crate::process::seam::pause("export-add-checked");
        if let Some(export) = self.serving_file(overlay) {
            return Err(HostError::AlreadyServed {
                overlay: overlay.to_path_buf(),
                export,
            });
        }
        let disk = self
            .open_waiting_for_lock(engine, overlay, &opts)
            .map_err(|error| HostError::Open {
                name: name.to_string(),
                error: Box::new(error),
            })?;
        crate::process::seam::pause("export-add-opened");
        // The files the engine opened decide, not what their paths name now (see `allow`).
        if origin == Origin::Control {
            if let Err(e) = self.allowed.check_opened(&disk.opened_files()) {
                let _ = disk.close();
                return Err(e.into());
            }
        }
        tracing::info!(
            export = %name,
            overlay = %overlay.display(),
            size = disk.size(),
            read_only = disk.read_only(),
            copy_on_read = opts.copy_on_read && !disk.read_only(),
            "export ready"
        );
        // The files underneath, for hole queries and the hole-punching probe; without them
        // nothing is reported as zeros and every FAST_ZERO fails fast.
        let files = LayerFiles::open_or_warn(&disk, name);
        let backend = EngineDisk::new(engine.clone(), opts, disk.clone(), files);
        if !bitmaps.is_empty() {
            if let Err(why) = backend.export_bitmaps(bitmaps) {
                let _ = disk.close();
                return Err(HostError::Open {
                    name: name.to_string(),
                    error: Box::new(addcow_engine::Error::new(
                        addcow_engine::ErrorKind::InvalidArgument(why),
                    )),
                });
            }
        }
        let export = Export::new(claim.name(), Arc::new(backend), self.shards);
        if let Some(ids) = tls_authz {
            export.set_tls_authz(ids);
        }
        if let Some(g) = &group {
            tracing::info!(export = %name, group = %g.name(), limits = ?g.limits(), "export throttled");
        }
        if let Some(d) = export.backend.disk() {
            d.set_throttle(group);
        }
        claim.publish(Arc::clone(&export));
        Ok(export)
    }

    /// Opens `overlay` on `engine`; while it is locked by another process, retries (50 ms,
    /// doubling to 1 s) until [`HostConfig::lock_wait`] has passed or the daemon is stopping, with
    /// one log line when the wait begins. Any other error is returned at once.
    fn open_waiting_for_lock(
        &self,
        engine: &Engine,
        overlay: &Path,
        opts: &DiskOptions,
    ) -> addcow_engine::Result<addcow_engine::Disk> {
        let deadline = Instant::now() + self.config.lock_wait;
        let mut pause = Duration::from_millis(50);
        let mut logged = false;
        loop {
            match engine.open(overlay, opts.clone()) {
                Err(e) if e.kind() == &addcow_engine::ErrorKind::Locked => {
                    let now = Instant::now();
                    if now >= deadline || self.stop.is_set() {
                        return Err(e);
                    }
                    if !logged {
                        tracing::warn!(
                            overlay = %overlay.display(),
                            wait_s = self.config.lock_wait.as_secs_f64(),
                            "overlay is locked by another process; waiting for the lock"
                        );
                        logged = true;
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// Deletes export `name`. A job running on it (a stream) is cancelled first, in either
    /// mode, and waited for: what it did is kept and a later stream continues from there.
    /// It disappears from LIST/GO at once. `Safe` refuses while clients
    /// are connected; `Hard` stops their readers (no new request is taken in, none is failed),
    /// waits for in-flight requests to be answered (up to the grace period, then closes the
    /// sockets) and lets the connections close. Then the overlay is committed and its lock
    /// released (another process may open it), the export removed and `export-deleted`
    /// emitted. Returns once all that is done.
    pub fn delete_export(&self, name: &str, mode: DeleteMode) -> Result<Deleted, HostError> {
        let export = self
            .exports
            .get(name)
            .ok_or_else(|| HostError::NoSuchExport(name.to_string()))?;
        if let Some(why) = self.backup_refusal(name) {
            return Err(HostError::BackupRunning(why));
        }
        // Safe: the check and the closing to new frontends are one step (one that connects
        // after the check is refused, never one that is served disconnected).
        let frontend = self.vhost_lock().get(name).is_some_and(|v| match mode {
            DeleteMode::Safe => !v.close_if_idle(),
            _ => v.frontend_connected(),
        });
        if mode == DeleteMode::Safe && frontend {
            return Err(HostError::Busy {
                name: name.to_string(),
                clients: export.client_count() + 1,
            });
        }
        let clients = export
            .begin_delete(mode == DeleteMode::Safe)
            .inspect_err(|_| {
                if let Some(v) = self.vhost_lock().get(name) {
                    v.reopen();
                }
            })
            .map_err(|r| match r {
                DeleteRefused::Busy(clients) => HostError::Busy {
                    name: name.to_string(),
                    clients,
                },
                DeleteRefused::AlreadyDeleting => HostError::Deleting(name.to_string()),
            })?;
        tracing::info!(export = %name, ?mode, clients, "deleting export");
        // The vhost-user-blk side first: no new frontend or chain, what is in flight answered,
        // the frontend disconnected, the socket file removed.
        let vhost = self.vhost_lock().remove(name);
        let mut frontend = false;
        if let Some(v) = vhost {
            frontend = v.frontend_connected();
            if !v.stop(Instant::now() + self.config.shutdown_grace) {
                tracing::warn!(export = %name, "vhost-user-blk requests still in flight after the grace period");
            }
        }
        let clients = clients + usize::from(frontend);
        self.jobs.cancel_and_wait(Some(name));
        if !export.wait_clients_gone(Some(Instant::now() + self.config.shutdown_grace)) {
            tracing::warn!(export = %name, clients = export.client_count(),
                "clients still busy after the grace period; closing their sockets");
            export.close_clients();
            export.wait_clients_gone(None);
        }
        // Through the switch when there is one: a snapshot or resize in progress finishes first
        // and the disk it installed is the one closed.
        let (overlay, closed) = match export.backend.engine_disk() {
            Some(ed) => ed.switch(|cur| {
                let d = &cur.disk;
                (None, (Some(d.path().to_path_buf()), d.close()))
            }),
            None => {
                let disk = export.backend.disk();
                let disk = disk.as_ref();
                (
                    disk.map(|d| d.path().to_path_buf()),
                    disk.map(|d| d.close()).unwrap_or(Ok(())),
                )
            }
        };
        self.exports.remove(&export);
        let deleted = Deleted {
            name: name.to_string(),
            overlay,
            mode,
            clients_disconnected: clients,
        };
        let mut params = serde_json::to_value(&deleted).unwrap_or_default();
        if let Err(e) = &closed {
            params["error"] = serde_json::Value::String(e.to_string());
        }
        tracing::info!(export = %name, "export deleted");
        self.events.emit(events::EXPORT_DELETED, params);
        closed.map_err(|error| HostError::Close {
            name: name.to_string(),
            error: Box::new(error),
        })?;
        Ok(deleted)
    }

    /// Why export `name` may not be deleted, snapshotted or resized now: a backup runs on it,
    /// or it is a backup's point-in-time view (both end with `backup-end`).
    pub fn backup_refusal(&self, name: &str) -> Option<String> {
        if let Some(b) = self.backups.of(name) {
            return Some(format!(
                "export {name:?} has a backup running (checkpoint {:?}, served as {:?}): end it \
                 with backup-end first",
                b.info.checkpoint, b.info.target
            ));
        }
        self.backups.serving(name).map(|b| {
            format!(
                "export {name:?} is the point-in-time view of a backup of {:?}: end it with \
                 backup-end",
                b.info.export
            )
        })
    }

    /// `query-exports`' `backup` of export `name`: its role (`source`: the live export;
    /// `view`: the point-in-time export), what the backup is, and what it has copied.
    fn backup_info(&self, name: &str) -> Option<serde_json::Value> {
        let (role, b) = match self.backups.of(name) {
            Some(b) => ("source", b),
            None => ("view", self.backups.serving(name)?),
        };
        let mut v = serde_json::to_value(&b.info).unwrap_or_default();
        v["role"] = role.into();
        if let Some(s) = b.stats() {
            v["bytes_copied"] = s.bytes_copied.into();
            v["copy_failures"] = s.copy_failures.into();
        }
        Some(v)
    }

    /// At shutdown: stops every vhost-user-blk export added at runtime (no new chain taken from
    /// the rings, the batches in flight answered until `deadline`, the frontends disconnected,
    /// the sockets removed); false if requests were still in flight at `deadline`.
    pub fn stop_vhost_exports(&self, deadline: Instant) -> bool {
        let all: Vec<VhostExport> = self.vhost_lock().drain().map(|(_, v)| v).collect();
        let mut drained = true;
        for v in all {
            drained &= v.stop(deadline);
        }
        drained
    }

    /// The export (if any) whose `.add-cow` file is the same file as `overlay`.
    fn serving_file(&self, overlay: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        let want = id(overlay)?;
        self.exports.all().into_iter().find_map(|e| {
            let path = e.backend.disk()?.path().to_path_buf();
            (id(&path) == Some(want)).then(|| e.name.clone())
        })
    }

    /// Every export (also those being deleted), as `query-exports` reports them.
    pub fn export_info(&self) -> Vec<ExportInfo> {
        let vhost = self.vhost_lock();
        self.exports
            .all()
            .iter()
            .map(|e| {
                let disk = e.backend.disk();
                let disk = disk.as_ref();
                let v = vhost.get(&e.name).map(VhostExport::info);
                let throttle = super::throttle::describe(&self.throttle_groups, e);
                ExportInfo {
                    name: e.name.clone(),
                    kind: if v.is_some() { "vhost-user-blk" } else { "nbd" },
                    vhost_user_blk: v,
                    overlay: disk.map(|d| d.path().to_path_buf()),
                    size: e.backend.size(),
                    read_only: e.backend.read_only(),
                    clients: e.client_count(),
                    allocated_bytes: disk.map(|d| d.allocated_bytes()),
                    complete: disk.map(|d| d.is_complete()),
                    shutting_down: e.is_deleting(),
                    throttle: throttle.0,
                    throttle_group: throttle.1,
                    backup: self.backup_info(&e.name),
                }
            })
            .collect()
    }

    /// The statistics of export `name`, or of every export.
    pub fn export_stats(&self, name: Option<&str>) -> Result<Vec<ExportStatsReport>, HostError> {
        let list = match name {
            Some(n) => vec![self
                .exports
                .get(n)
                .ok_or_else(|| HostError::NoSuchExport(n.to_string()))?],
            None => self.exports.all(),
        };
        Ok(list.iter().map(|e| stats_report(e)).collect())
    }
}

/// The engine's counters of an export (zeros for a backend without an engine disk).
pub fn engine_stats(e: &Export) -> DiskStats {
    e.backend.disk().map(|d| d.stats()).unwrap_or_default()
}

fn stats_report(e: &Export) -> ExportStatsReport {
    let snap = e.stats.snapshot();
    let mut ops = serde_json::Map::new();
    for op in Op::ALL {
        let s = snap.op(op);
        if op == Op::Other && s.requests == 0 && s.in_flight == 0 {
            continue;
        }
        let v = OpStats {
            requests: s.requests,
            bytes: s.bytes,
            errors: s.errors,
            in_flight: s.in_flight,
            latency_us: s.percentiles(),
        };
        ops.insert(
            op.name().to_string(),
            serde_json::to_value(v).unwrap_or_default(),
        );
    }
    let d = engine_stats(e);
    ExportStatsReport {
        name: e.name.clone(),
        clients: e.client_count(),
        in_flight: snap.in_flight(),
        ops,
        commits: d.commits,
        commits_failed: d.commits_failed,
        average_commit_batch: d.average_commit_batch(),
        commit_bytes: d.commit_bytes,
        commits_skipped: d.commits_skipped,
        base_bytes_read: d.base_bytes_read,
        bits_set: d.bits_set,
        throttle: super::throttle::export_stats(e).into(),
    }
}
