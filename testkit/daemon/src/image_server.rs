//! Real NBD image servers (nbdkit, qemu-nbd, qemu-storage-daemon) in the foreground, as the
//! remote bases of the tests' overlays: started, waited for until they send the NBD greeting,
//! stopped and started again, killed on drop.

use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::raw;

/// Where an image server listens.
pub enum Listen {
    /// `127.0.0.1:PORT`.
    Tcp(u16),
    /// A Unix socket path (removed before each start and after a kill).
    Unix(PathBuf),
}

impl Listen {
    /// The server's arguments for it: `UNIX SOCK`, or `HOST 127.0.0.1 PORT N` (each server
    /// names these options its own way).
    fn args(&self, unix: &str, host: &str, port: &str) -> Vec<String> {
        match self {
            Listen::Tcp(n) => vec![host.into(), "127.0.0.1".into(), port.into(), n.to_string()],
            Listen::Unix(p) => vec![unix.into(), p.display().to_string()],
        }
    }
}

/// A TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// An image server in the foreground (stdout dropped, stderr inherited), killed on drop.
pub struct ImageServer {
    prog: &'static str,
    args: Vec<String>,
    listen: Listen,
    child: Option<Child>,
}

impl ImageServer {
    /// Starts `prog ARGS...` (which listen on `listen`) and waits until it sends the NBD
    /// greeting.
    pub fn start(prog: &'static str, args: Vec<String>, listen: Listen) -> ImageServer {
        let mut s = ImageServer {
            prog,
            args,
            listen,
            child: None,
        };
        s.restart();
        s
    }

    /// `nbdkit -f LISTEN ARGS...` (the plugin, its filters and options in `args`), `LISTEN`
    /// being `-U SOCK` or `-i 127.0.0.1 -p PORT`.
    pub fn nbdkit(listen: Listen, args: &[&str]) -> ImageServer {
        let mut a: Vec<String> = vec!["-f".into()];
        a.extend(listen.args("-U", "-i", "-p"));
        a.extend(args.iter().map(|s| s.to_string()));
        ImageServer::start("nbdkit", a, listen)
    }

    /// `qemu-nbd -f raw -r -t --shared=16 LISTEN EXTRA... FILE` (read-only, so it allows
    /// multi-conn), `LISTEN` being `-k SOCK` or `-b 127.0.0.1 -p PORT`.
    pub fn qemu_nbd(listen: Listen, file: &std::path::Path, extra: &[&str]) -> ImageServer {
        let mut a: Vec<String> = ["-f", "raw", "-r", "-t", "--shared=16"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(listen.args("-k", "-b", "-p"));
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(file.display().to_string());
        ImageServer::start("qemu-nbd", a, listen)
    }

    /// The plain NBD URI of its default export (`nbd+unix:///?socket=SOCK` or
    /// `nbd://127.0.0.1:PORT/`).
    pub fn uri(&self) -> String {
        match &self.listen {
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/"),
            Listen::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
        }
    }

    /// (Re)starts the server and waits (bounded) until it sends the NBD greeting (in plain,
    /// before any TLS).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
        let child = Command::new(self.prog)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (scripts/test.sh installs it): {e}",
                    self.prog
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let greeted = match &self.listen {
                Listen::Tcp(port) => TcpStream::connect(("127.0.0.1", *port))
                    .map(|mut s| raw::greeting(&mut s).is_ok())
                    .unwrap_or(false),
                Listen::Unix(p) => UnixStream::connect(p)
                    .map(|mut s| raw::greeting(&mut s).is_ok())
                    .unwrap_or(false),
            };
            if greeted {
                return;
            }
            assert!(Instant::now() < deadline, "{} never listened", self.prog);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as an operator stops the server for a planned restart; then waits (bounded)
    /// for it to exit, and kills it if it did not. Whether it exited within `within`.
    pub fn terminate(&mut self, within: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + within;
        let exited = loop {
            if let Ok(Some(_)) = c.try_wait() {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = c.kill();
        let _ = c.wait();
        self.remove_socket();
        exited
    }

    /// SIGKILL: the server vanishes (mid-transfer, if one was going on).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.remove_socket();
    }

    fn remove_socket(&self) {
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.kill();
    }
}
