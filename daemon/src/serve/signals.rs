//! SIGTERM/SIGINT handling without async-signal-safety worries: the signals are blocked in every
//! thread (the mask is set before any thread starts and inherited), and one thread takes them
//! with `sigwait`, sets the shutdown flag and wakes the accept loop through a pipe.

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

impl Signals {
    /// Blocks SIGTERM and SIGINT in the calling thread (call before starting threads).
    pub fn block() -> nix::Result<Signals> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
        Ok(Signals { set })
    }

    /// Starts the thread that waits for the signals. On the first one it sets `flag` and makes
    /// the returned [`Waker`] readable.
    pub fn spawn_waiter(self, flag: Arc<AtomicBool>) -> std::io::Result<Waker> {
        let (read, write) = nix::unistd::pipe()?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match self.set.wait() {
                    Ok(sig) => {
                        if flag.swap(true, Ordering::SeqCst) {
                            tracing::info!(signal = %sig, "already shutting down");
                            continue;
                        }
                        tracing::info!(signal = %sig, "shutdown requested");
                        let _ = nix::unistd::write(&write, &[1]);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "sigwait failed");
                        return;
                    }
                }
            })?;
        Ok(Waker { read })
    }
}
