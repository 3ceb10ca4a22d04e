//! Exports served over vhost-user-blk that the control socket added (`export-add` with
//! `type: "vhost-user-blk"`) and that `export-del` stops: each one's socket, listener thread
//! and parameters. The export itself is an ordinary entry of the export table (named, counted,
//! reachable over NBD by its name like the command line's `--vhost-user-blk` export); this
//! holds what is served on top of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::disk::Backend;
use crate::conn::budget::Pool;
use crate::conn::listener::{ListenError, Listener, PeerPolicy, SocketFile};
use crate::vhost::VhostServer;

/// What `export-add` asks of a vhost-user-blk export.
#[derive(Debug, Clone)]
pub struct VhostParams {
    /// The Unix socket the frontend connects to.
    pub socket: PathBuf,
    /// Request queues offered (`None`: one per engine core).
    pub num_queues: Option<u16>,
    /// The GET_ID answer (`None`: the overlay's file stem); at most 20 bytes are sent.
    pub serial: Option<String>,
}

/// How an export is served, as `query-exports` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct VhostInfo {
    /// The socket path.
    pub socket: PathBuf,
    /// Request queues offered.
    #[serde(rename = "num-queues")]
    pub num_queues: u16,
    /// The GET_ID answer.
    pub serial: String,
    /// Whether a frontend is connected now.
    pub frontend_connected: bool,
}

/// Why a vhost-user-blk export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VhostSetupError {
    /// `num-queues` is 0 or more than the engine's cores.
    #[error("num-queues {asked}: must be between 1 and the daemon's core count ({cores})")]
    Queues {
        /// What was asked.
        asked: u16,
        /// The engine's cores.
        cores: usize,
    },
    /// The socket could not be bound (in use, not a socket, no permission, ...).
    #[error("vhost-user-blk socket {0}")]
    Bind(ListenError),
    /// The listener thread could not be started.
    #[error("vhost-user-blk socket {}: {error}", path.display())]
    Start {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
}

/// A bound, not yet serving socket: checked before the overlay is opened, so a socket that is
/// in use fails the add before anything else happens. Dropping it removes the staged file.
pub struct BoundSocket {
    params: VhostParams,
    num_queues: u16,
    listener: Listener,
}

/// Checks `num-queues` against `cores` and binds the socket (lock file, stale-only
/// replacement, mode 0600: the NBD socket's rules).
pub fn bind(params: VhostParams, cores: usize) -> Result<BoundSocket, VhostSetupError> {
    let max = u16::try_from(cores.min(64)).unwrap_or(64).max(1);
    let num_queues = params.num_queues.unwrap_or(max);
    if num_queues == 0 || num_queues > max {
        return Err(VhostSetupError::Queues {
            asked: num_queues,
            cores,
        });
    }
    let listener = Listener::bind_unix(&params.socket, 0o600).map_err(VhostSetupError::Bind)?;
    Ok(BoundSocket {
        params,
        num_queues,
        listener,
    })
}

/// A vhost-user-blk export being served.
pub struct VhostExport {
    server: VhostServer,
    /// Removed (if still ours) when this is dropped, after the server stopped.
    file: Option<SocketFile>,
    info: VhostInfo,
}

impl BoundSocket {
    /// Starts serving `disk` (whose overlay is `overlay`, for the default serial) to the
    /// frontends `policy` lets in (the daemon's `--vhost-socket-allow-uid/gid`), its bounce
    /// buffers taken from `pool`, and makes the socket appear at its path.
    pub fn serve(
        self,
        disk: Arc<dyn Backend>,
        overlay: &Path,
        policy: Option<Arc<PeerPolicy>>,
        pool: Option<Arc<Pool>>,
    ) -> Result<VhostExport, VhostSetupError> {
        let path = self.params.socket.clone();
        let serial = self.params.serial.clone().unwrap_or_else(|| {
            overlay
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let start = |e| VhostSetupError::Start {
            path: path.clone(),
            error: e,
        };
        let (sock, file) = self
            .listener
            .into_unix()
            .ok_or_else(|| start(std::io::Error::other("not a Unix socket listener")))?;
        let mut server = VhostServer::start(
            sock,
            &path,
            disk,
            self.num_queues,
            serial.clone(),
            policy,
            pool,
        )
        .map_err(start)?;
        let mut file = file;
        if let Some(f) = &mut file {
            if let Err(e) = f.publish() {
                server.stop(Instant::now());
                return Err(VhostSetupError::Bind(e));
            }
        }
        tracing::info!(socket = %path.display(), queues = self.num_queues, "serving vhost-user-blk");
        Ok(VhostExport {
            server,
            file,
            info: VhostInfo {
                socket: path,
                num_queues: self.num_queues,
                serial,
                frontend_connected: false,
            },
        })
    }
}

impl VhostExport {
    /// Whether a frontend is connected now.
    pub fn frontend_connected(&self) -> bool {
        self.server.frontend_connected()
    }

    /// See [`VhostServer::close_if_idle`].
    pub fn close_if_idle(&self) -> bool {
        self.server.close_if_idle()
    }

    /// See [`VhostServer::reopen`].
    pub fn reopen(&self) {
        self.server.reopen()
    }

    /// Its parameters and state.
    pub fn info(&self) -> VhostInfo {
        VhostInfo {
            frontend_connected: self.frontend_connected(),
            ..self.info.clone()
        }
    }

    /// Stops it (see [`VhostServer::stop`]: no new frontend or request, requests in flight
    /// answered until `deadline`, the frontend disconnected) and removes the socket file.
    /// False when requests were still in flight at `deadline`.
    pub fn stop(mut self, deadline: Instant) -> bool {
        let drained = self.server.stop(deadline);
        drop(self.file.take());
        tracing::info!(socket = %self.info.socket.display(), drained, "vhost-user-blk export stopped");
        drained
    }
}
