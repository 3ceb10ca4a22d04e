//! The servers under test: how to start each one on a Unix socket, wait until it accepts, and
//! stop it; and which external tools (with their Debian package) a run needs.

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::error::{io_err, BenchError, Result};

/// One way of serving the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Server {
    /// `addcow serve --cache direct` on the add-cow overlay.
    Addcow,
    /// `qemu-nbd -f qcow2 --cache=none --aio=io_uring` on the qcow2 overlay.
    QemuNbdQcow2,
    /// `qemu-nbd -f raw --cache=none --aio=io_uring` on the raw copy.
    QemuNbdRaw,
    /// `nbdkit --filter=cow file` on the raw copy.
    NbdkitCow,
    /// No server: fio's io_uring engine with O_DIRECT on the raw copy (the disk's limit).
    FioRaw,
}

impl Server {
    /// Every server, in run order (addcow first, then its peers).
    pub const ALL: [Server; 5] = [
        Server::Addcow,
        Server::QemuNbdQcow2,
        Server::QemuNbdRaw,
        Server::NbdkitCow,
        Server::FioRaw,
    ];

    /// Short id used on the command line, in JSON and in file names.
    pub fn id(self) -> &'static str {
        match self {
            Server::Addcow => "addcow",
            Server::QemuNbdQcow2 => "qemu-nbd-qcow2",
            Server::QemuNbdRaw => "qemu-nbd-raw",
            Server::NbdkitCow => "nbdkit-cow",
            Server::FioRaw => "fio-raw",
        }
    }

    /// What it is, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Server::Addcow => "addcow serve --cache direct, add-cow overlay (50% written)",
            Server::QemuNbdQcow2 => {
                "qemu-nbd -f qcow2 --cache=none --aio=io_uring -t -e 0, qcow2 overlay (50% written)"
            }
            Server::QemuNbdRaw => "qemu-nbd -f raw --cache=none --aio=io_uring -t -e 0, raw copy",
            Server::NbdkitCow => {
                "nbdkit --filter=cow file (cache=none), raw copy under the cow filter"
            }
            Server::FioRaw => "no server: fio io_uring --direct=1 on the raw copy (disk limit)",
        }
    }

    /// Parses an id.
    pub fn from_id(id: &str) -> Option<Server> {
        Server::ALL.into_iter().find(|s| s.id() == id)
    }

    /// External programs this server needs, with the Debian package that provides each.
    fn tools(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Server::Addcow | Server::FioRaw => &[],
            Server::QemuNbdQcow2 => &[("qemu-nbd", "qemu-utils"), ("qemu-img", "qemu-utils")],
            Server::QemuNbdRaw => &[("qemu-nbd", "qemu-utils")],
            Server::NbdkitCow => &[("nbdkit", "nbdkit")],
        }
    }
}

/// Whether `program` is on `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            let p = d.join(program);
            p.is_file()
        })
    })
}

/// Splits `wanted` into the servers whose tools are installed and messages for the missing ones
/// (`"nbdkit (apt-get install nbdkit): nbdkit-cow skipped"`). fio itself is required: without it
/// nothing can run, which is an error.
pub fn check_tools(wanted: &[Server]) -> Result<(Vec<Server>, Vec<String>)> {
    if !on_path("fio") {
        return Err(BenchError::Missing(
            "fio is not installed (Debian: apt-get install fio)".to_owned(),
        ));
    }
    let mut ok = Vec::new();
    let mut missing = Vec::new();
    for &s in wanted {
        let absent: Vec<_> = s.tools().iter().filter(|(t, _)| !on_path(t)).collect();
        if absent.is_empty() {
            ok.push(s);
        } else {
            for (tool, pkg) in absent {
                missing.push(format!(
                    "{tool} not found (Debian: apt-get install {pkg}): {} skipped",
                    s.id()
                ));
            }
        }
    }
    Ok((ok, missing))
}

/// Whether a server on `socket` accepts a connection and sends the NBD greeting (`NBDMAGIC`).
/// Reading the greeting (not just connecting) makes sure the server has taken the connection
/// before the probe goes away.
pub fn greets(socket: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

/// A started server process.
#[derive(Debug)]
pub struct Running {
    child: Child,
    /// The socket it listens on.
    pub socket: PathBuf,
    log: PathBuf,
}

/// Starts `server` on `socket` serving `image` (the overlay or raw file it should serve); its
/// stdout/stderr go to `log`. Returns once the socket accepts connections.
/// `addcow_args` are appended to `addcow serve` (e.g. `--cores 1`, `--base-cache buffered`;
/// ignored for the other servers).
pub fn start(
    server: Server,
    addcow_bin: &Path,
    addcow_args: &[String],
    image: &Path,
    socket: &Path,
    log: &Path,
) -> Result<Running> {
    let _ = std::fs::remove_file(socket);
    let cmd = match server {
        Server::Addcow => {
            let mut c = Command::new(addcow_bin);
            c.arg("serve")
                .arg("--socket")
                .arg(socket)
                .args(["--cache", "direct"])
                .args(addcow_args)
                .arg(image);
            c
        }
        Server::QemuNbdQcow2 | Server::QemuNbdRaw => {
            let fmt = if server == Server::QemuNbdQcow2 {
                "qcow2"
            } else {
                "raw"
            };
            let mut c = Command::new("qemu-nbd");
            c.args([
                "-f",
                fmt,
                "--cache=none",
                "--aio=io_uring",
                "-t",
                "-e",
                "0",
                "-k",
            ])
            .arg(socket)
            .arg(image);
            c
        }
        Server::NbdkitCow => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "-U"])
                .arg(socket)
                .args(["--filter=cow", "file"]);
            c.arg(format!("file={}", image.display())).arg("cache=none");
            c
        }
        Server::FioRaw => {
            return Err(BenchError::Usage(
                "fio-raw has no server to start".to_owned(),
            ));
        }
    };
    spawn(cmd, socket, log)
}

/// Starts `cmd` (a server that will listen on the NBD Unix socket `socket`) with its
/// stdout/stderr in `log`; returns once the socket greets, or an error with the log's text.
pub fn spawn(cmd: Command, socket: &Path, log: &Path) -> Result<Running> {
    spawn_until_ready(cmd, socket, log, greets)
}

/// Starts `cmd` (stdout/stderr to `log`) and returns once `ready(socket)` holds (an error with
/// the log if it exits first or is not ready within 20 s).
pub fn spawn_until_ready(
    mut cmd: Command,
    socket: &Path,
    log: &Path,
    ready: fn(&Path) -> bool,
) -> Result<Running> {
    let out = File::create(log).map_err(io_err("create", log))?;
    let err = out.try_clone().map_err(io_err("dup", log))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let shown = format!("{cmd:?}");
    let child = cmd.spawn().map_err(|e| BenchError::Command {
        command: shown.clone(),
        message: format!("cannot start: {e}"),
    })?;
    let mut running = Running {
        child,
        socket: socket.to_owned(),
        log: log.to_owned(),
    };
    if let Err(message) = running.wait_ready(Duration::from_secs(20), ready) {
        running.stop();
        return Err(BenchError::Command {
            command: shown,
            message,
        });
    }
    Ok(running)
}

impl Running {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the socket accepts a connection, the process exits (an error with its log), or
    /// `timeout` passes.
    fn wait_ready(
        &mut self,
        timeout: Duration,
        ready: fn(&Path) -> bool,
    ) -> std::result::Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!(
                    "exited with {status} before serving: {}",
                    log.trim()
                ));
            }
            if ready(&self.socket) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "socket {} not ready after {timeout:?}",
                    self.socket.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after 10 s; removes the socket.
    pub fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for s in Server::ALL {
            assert_eq!(Server::from_id(s.id()), Some(s));
        }
        assert_eq!(Server::from_id("qemu"), None);
    }

    #[test]
    fn path_lookup() {
        assert!(on_path("sh"));
        assert!(!on_path("definitely-not-a-program-addcow"));
    }

    #[test]
    fn qemu_nbd_raw_starts_and_stops() {
        // Required, never skipped: scripts/test.sh installs qemu-utils.
        assert!(
            on_path("qemu-nbd"),
            "qemu-nbd is not installed (apt-get install qemu-utils; scripts/test.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let sock = dir.path().join("s.sock");
        let mut r = start(
            Server::QemuNbdRaw,
            Path::new("addcow"),
            &[],
            &img,
            &sock,
            &dir.path().join("log"),
        )
        .unwrap();
        assert!(greets(&sock));
        r.stop();
        assert!(!sock.exists());
    }

    #[test]
    fn a_server_that_fails_reports_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let missing = dir.path().join("missing.add-cow");
        let err = start(
            Server::Addcow,
            Path::new("false"),
            &[],
            &missing,
            &sock,
            &dir.path().join("log"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("before serving"), "{err}");
    }
}
