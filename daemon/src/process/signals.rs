//! SIGTERM/SIGINT handling without async-signal-safety worries: the signals are blocked in every
//! thread (the mask is set before any thread starts and inherited), and one thread takes them
//! with `sigwait` and pulls the daemon's [`Stop`] switch, which sets the shutdown flag and wakes
//! the accept loop through a pipe. The control socket's `quit` pulls the same switch.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// The blocked shutdown signals.
pub struct Signals {
    set: SigSet,
}

/// The read end of the wake-up pipe: readable once shutdown has begun.
pub struct Waker {
    read: OwnedFd,
}

impl Waker {
    /// A waker not tied to signals, and the pipe end that wakes it (for tests).
    #[cfg(test)]
    pub fn pipe() -> std::io::Result<(Waker, OwnedFd)> {
        let (read, write) = nix::unistd::pipe()?;
        Ok((Waker { read }, write))
    }

    /// The fd to poll.
    pub fn fd(&self) -> &OwnedFd {
        &self.read
    }
}

/// The daemon's stop switch: once pulled, the shutting-down flag is set (`export-add` is
/// refused) and the accept loop wakes and begins the shutdown, which stops every connection's
/// reader (see `conns`): no request is ever answered with an error because of a stop.
pub struct Stop {
    flag: Arc<AtomicBool>,
    write: OwnedFd,
}

impl Stop {
    /// A switch and the [`Waker`] the accept loop polls.
    pub fn new() -> std::io::Result<(Arc<Stop>, Waker)> {
        let (read, write) = nix::unistd::pipe()?;
        let stop = Stop {
            flag: Arc::new(AtomicBool::new(false)),
            write,
        };
        Ok((Arc::new(stop), Waker { read }))
    }

    /// Pulls the switch; `why` is logged. Returns false if it was already pulled.
    pub fn request(&self, why: &str) -> bool {
        if self.flag.swap(true, Ordering::SeqCst) {
            tracing::info!(reason = why, "already shutting down");
            return false;
        }
        tracing::info!(reason = why, "shutdown requested");
        let _ = nix::unistd::write(&self.write, &[1]);
        true
    }

    /// Whether the switch was pulled.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The shutting-down flag.
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.flag
    }
}

impl Signals {
    /// Blocks SIGTERM and SIGINT in the calling thread (call before starting threads).
    pub fn block() -> nix::Result<Signals> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        Ok(Signals { set })
    }

    /// Starts the thread that waits for the signals; each one pulls `stop`.
    pub fn spawn_waiter(self, stop: Arc<Stop>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match self.set.wait() {
                    Ok(sig) => {
                        stop.request(sig.as_str());
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "sigwait failed");
                        return;
                    }
                }
            })?;
        Ok(())
    }
}
