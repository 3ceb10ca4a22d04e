//! `addcow serve --vhost-user-blk SOCKET`: the vhost-user-blk front end.
//!
//! A vhost-user frontend (QEMU's `vhost-user-blk-pci`, libblkio's `virtio-blk-vhost-user`)
//! connects to a Unix socket, shares the guest's memory and hands over its virtqueues; requests
//! are read from the rings in shared memory and answered by writing the used ring and the call
//! eventfd. The protocol is the rust-vmm crates' (`vhost`, `vhost-user-backend`,
//! `virtio-queue`, `vm-memory`); the device ([`backend`]) turns each chain ([`request`]) into
//! engine requests on the disk behind an export. Each queue's kick eventfd is polled by its
//! engine core's io_uring, which pops, submits and answers chains itself; aligned guest buffers
//! are handed to the engine directly. See `docs/VHOST_USER_BLK.md` for the design.
//!
//! Modules: [`activity`] (chains in flight per queue; stopping them), [`config`] (features
//! and config space), [`request`] (one chain), [`queue`] (one queue on its core), [`vring`]
//! (the library's vring with its kick handed to a core), [`backend`] (the device), [`peer`]
//! (who the frontend is), and here the listener that serves one frontend at a time and waits
//! for the next when it goes (reconnect). With an allow-list (`--vhost-socket-allow-uid`,
//! `--vhost-socket-allow-gid`), a frontend's queues serve nothing until its peer credentials
//! passed it; a frontend refused is disconnected, logged and counted.

pub mod activity;
pub mod backend;
pub mod config;
pub mod device;
pub mod peer;
pub mod queue;
pub mod request;
pub mod vring;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::disk::Backend;
use crate::conn::listener::PeerPolicy;
use activity::Activity;
use addcow_engine::sync::lock;
use backend::BlkDevice;
use config::DeviceConfig;

/// Default ring size offered to frontends.
pub const QUEUE_SIZE: u16 = 256;

/// The least [`VhostServer::stop`] waits for the listener thread (a frontend's connection
/// thread ends once its socket is shut down).
const LISTENER_JOIN_MIN: Duration = Duration::from_secs(2);

/// How long the listener waits for a gone frontend's chains before it says so in the log (it
/// goes on waiting: the next frontend is never served while an older one's chains can still
/// write into the guest's rings or its disk).
const PREVIOUS_CHAINS_WAIT: Duration = Duration::from_secs(30);

/// The vhost-user-blk listener: one frontend at a time; when it disconnects the device is reset
/// and the next one is accepted on the same socket.
pub struct VhostServer {
    socket: PathBuf,
    activity: Arc<Activity>,
    conn: Arc<Connection>,
    /// The listening socket (the same one the thread accepts on), to wake that accept.
    listener: UnixListener,
    thread: Option<JoinHandle<()>>,
}

/// The current frontend connection, shared by the listener thread and [`VhostServer::stop`].
#[derive(Default)]
struct Connection {
    /// Set by [`VhostServer::stop`]: accept no frontend any more, end the current one.
    state: Mutex<ConnState>,
    /// A frontend is connected now.
    connected: AtomicBool,
}

#[derive(Default)]
struct ConnState {
    stopped: bool,
    /// [`VhostServer::close_if_idle`]: a frontend accepted now is disconnected at once (the
    /// export is being deleted); [`VhostServer::reopen`] clears it.
    closed: bool,
    /// Ends the current frontend's connection (the socket is shut down).
    current: Option<ShutdownHandle>,
}

impl Connection {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        lock(&self.state)
    }

    fn stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Records the frontend just accepted; ends it at once when the server is stopping or
    /// closed.
    fn connected(&self, handle: Option<ShutdownHandle>) {
        let mut s = self.lock();
        if s.stopped || s.closed {
            if let Some(h) = &handle {
                h.shutdown();
            }
            if s.closed && !s.stopped {
                tracing::info!("vhost-user-blk: a frontend connected while its export is being deleted; disconnected");
            }
            return;
        }
        self.connected.store(true, Ordering::Release);
        s.current = handle;
    }

    fn disconnected(&self) {
        self.lock().current = None;
        self.connected.store(false, Ordering::Release);
    }
}

impl VhostServer {
    /// Serves `disk` on the bound socket `sock` (a blocking listener; `socket` is its path, for
    /// logs) from a thread, with `num_queues` request queues (queue q is served by engine core
    /// q modulo the core count) and `serial` as the GET_ID answer, to frontends `policy` lets
    /// in (`None` or an empty policy: whoever can open the socket file). Bounce buffers come out
    /// of `pool` (the daemon's `--max-buffer-memory`; `None`: only the per-queue cap). The
    /// caller owns the socket file (binding, publishing and removing it).
    pub fn start(
        sock: UnixListener,
        socket: &Path,
        disk: Arc<dyn Backend>,
        num_queues: u16,
        serial: String,
        policy: Option<Arc<PeerPolicy>>,
        pool: Option<Arc<crate::conn::budget::Pool>>,
    ) -> io::Result<VhostServer> {
        // Accepting must block: the library's accept loop retries at once on EAGAIN.
        sock.set_nonblocking(false)?;
        let accept_side = sock.try_clone()?;
        let policy = policy.filter(|p| p.restricts());
        // Kept to find each accepted connection by the listener's address (see `peer`).
        let checked_side = match policy {
            Some(_) => Some(sock.try_clone()?),
            None => None,
        };
        let mut listener = Listener::from(sock);
        let config = DeviceConfig {
            size: disk.size(),
            num_queues: num_queues.clamp(1, 64),
            queue_size: QUEUE_SIZE,
            read_only: disk.read_only(),
            serial,
            name: socket.display().to_string(),
            pool,
        };
        let path = socket.to_path_buf();
        let activity = Arc::new(Activity::new(usize::from(config.num_queues)));
        let acts = Arc::clone(&activity);
        let conn = Arc::new(Connection::default());
        let thread_conn = Arc::clone(&conn);
        let thread = std::thread::Builder::new()
            .name("addcow-vhost".into())
            .spawn(move || loop {
                let gate = policy
                    .as_ref()
                    .zip(checked_side.as_ref())
                    .map(|(p, l)| (p.as_ref(), l));
                let result = serve_one(&mut listener, &disk, &config, &acts, &thread_conn, gate);
                if thread_conn.stopped() {
                    tracing::info!(socket = %path.display(), "vhost-user-blk listener stopped");
                    return;
                }
                if let Err(e) = result {
                    tracing::warn!(socket = %path.display(), error = %e, "vhost-user-blk connection ended");
                    // A listener that fails to accept would spin: slow down.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                } else {
                    tracing::info!(socket = %path.display(), "vhost-user-blk frontend disconnected; waiting for the next");
                }
            })?;
        Ok(VhostServer {
            socket: socket.to_path_buf(),
            activity,
            conn,
            listener: accept_side,
            thread: Some(thread),
        })
    }

    /// Whether a frontend is connected now.
    pub fn frontend_connected(&self) -> bool {
        self.conn.connected.load(Ordering::Acquire)
    }

    /// For a delete that must not disconnect a frontend (`export-del` safe): when no frontend
    /// is connected, closes the server to new ones (a frontend accepted from now on is
    /// disconnected before it is recorded) and returns true; false (nothing changed) when one
    /// is connected. The check and the closing are one step under the connection's lock, so a
    /// frontend that connects after the check is the one refused, never one already served.
    pub fn close_if_idle(&self) -> bool {
        let mut s = self.conn.lock();
        if s.current.is_some() || self.conn.connected.load(Ordering::Acquire) {
            return false;
        }
        s.closed = true;
        true
    }

    /// Undoes [`VhostServer::close_if_idle`] (the delete was refused for another reason).
    pub fn reopen(&self) {
        self.conn.lock().closed = false;
    }

    /// Stops serving for good: accepts no new frontend, takes no new chain from the rings,
    /// waits until the chains in flight were answered (or `deadline`), then disconnects the
    /// frontend and waits for the listener thread to end, until `deadline` but at least
    /// [`LISTENER_JOIN_MIN`]; a listener still running then is logged and left to end on its
    /// own. False when requests were still in flight at `deadline`. The socket file is the
    /// caller's.
    pub fn stop(&mut self, deadline: Instant) -> bool {
        self.conn.lock().stopped = true;
        // Wakes the blocked accept (EINVAL) and makes every later one fail at once.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let drained = self.activity.stop(deadline);
        if let Some(h) = self.conn.lock().current.take() {
            h.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let until = deadline.max(Instant::now() + LISTENER_JOIN_MIN);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!(socket = %self.socket.display(), "vhost-user-blk: the listener thread did not end within the shutdown grace; left running");
            }
        }
        drained
    }

    /// Stops taking requests from the rings (what is not popped yet stays there, unanswered)
    /// and waits until every batch in flight was answered, or `deadline`; false on timeout.
    /// Called before the engine stops, so no request in flight is failed by a shutdown.
    pub fn quiesce(&self, deadline: Instant) -> bool {
        self.activity.stop(deadline)
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// Waits until every chain of the frontend that just went is answered, before the next one is
/// accepted. A frontend that vanished without GET_VRING_BASE leaves chains in flight that still
/// add used entries through its vrings and still write the disk; a frontend that reconnects
/// (QEMU with `reconnect=1`) resubmits what it saw unanswered, on the same rings: serving it
/// while the old chains complete would give it duplicate used entries and let an old write land
/// after a newer one to the same sectors. Past [`PREVIOUS_CHAINS_WAIT`] this logs an error and
/// keeps waiting (two generations are never served at once), unless the server is stopping.
fn wait_for_previous_chains(activity: &Activity, conn: &Connection) {
    let started = Instant::now();
    let mut next_report = started + PREVIOUS_CHAINS_WAIT;
    loop {
        // Short waits, so that a stopping server is noticed.
        if activity.wait_idle(Instant::now() + Duration::from_secs(1)) || conn.stopped() {
            return;
        }
        if Instant::now() >= next_report {
            next_report += PREVIOUS_CHAINS_WAIT;
            tracing::error!(
                in_flight = activity.total_in_flight(),
                waited_s = started.elapsed().as_secs(),
                "vhost-user-blk: the previous frontend's requests are still in flight; the next frontend waits for them"
            );
        }
    }
}

/// Accepts one frontend and serves it until it disconnects; then stops the queue workers and
/// waits for its chains in flight. With `gate` (the allow-list, and the listening socket to
/// find the accepted connection by), the frontend is served only once its peer passed the
/// list; one refused (or whose connection cannot be told) is disconnected at once, before any
/// chain of it was popped.
fn serve_one(
    listener: &mut Listener,
    disk: &Arc<dyn Backend>,
    config: &DeviceConfig,
    activity: &Arc<Activity>,
    conn: &Connection,
    gate: Option<(&PeerPolicy, &UnixListener)>,
) -> Result<(), String> {
    let device = BlkDevice::new(Arc::clone(disk), config.clone(), Arc::clone(activity));
    // The connections open before the accept, to tell the new one apart.
    let gate = match gate {
        Some((policy, sock)) => Some((
            policy,
            peer::Snapshot::take(sock)
                .map_err(|e| format!("listing the connections of the socket: {e}"))?,
        )),
        None => {
            device.authorize();
            None
        }
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let (daemon, vrings) =
        vring::collect(|| VhostUserDaemon::new("addcow-vhost-conn".into(), device.clone(), mem));
    let mut daemon = daemon.map_err(|e| format!("vhost-user device: {e}"))?;
    device
        .bind(vrings)
        .map_err(|e| format!("vhost-user device: {e}"))?;
    let result = daemon
        .start(listener)
        .map_err(|e| format!("accepting a frontend: {e}"))
        .map(|()| {
            if let Some((policy, snapshot)) = &gate {
                if !snapshot.admit(policy) {
                    // Nothing was popped: the device is not authorized. The library's thread
                    // ends once its socket is shut down.
                    if let Some(h) = daemon.shutdown_handle() {
                        h.shutdown();
                    }
                    return daemon.wait();
                }
                device.authorize();
            }
            tracing::info!("vhost-user-blk frontend connected");
            conn.connected(daemon.shutdown_handle());
            let r = daemon.wait();
            conn.disconnected();
            r
        });
    // The cores stop polling this frontend's kicks; chains in flight still complete into its
    // memory (each holds the mapping) and release their buffers. The library's worker thread
    // exits.
    device.unbind();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    wait_for_previous_chains(activity, conn);
    let result = result?;
    match result {
        Ok(()) => Ok(()),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
