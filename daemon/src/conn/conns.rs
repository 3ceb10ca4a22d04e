//! The connections alive now and the one way every one of them is stopped.
//!
//! Every accepted connection gets a [`ClientHandle`] before its thread starts; the daemon's
//! table ([`Live`]) and, from GO on, its export's client table hold it. Both a daemon-wide stop
//! (SIGTERM, `quit`) and an `export-del hard` go through [`ClientHandle::stop_reading`]: the
//! reader takes in no new request, the requests taken in are answered, then the connection
//! closes. No request is ever answered with an error because of a stop: a client that
//! reconnects (QEMU with `reconnect-delay`) resends what was never answered.

use std::collections::HashMap;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use super::budget::Waker;
use super::sock::Sock;
use crate::nbd::export::Client;
use addcow_engine::sync::{lock, wait, wait_timeout};

/// How a connection is told to stop: a flag its reader checks before each request, and a
/// handle on its socket to wake a reader blocked in `read` (shutting down the read side makes
/// that read return end-of-file; requests already taken in are still answered).
#[derive(Debug)]
pub struct ClientHandle {
    sock: Sock,
    stop: AtomicBool,
    /// Wakes a connection served on an engine core (its eventfd) when it is stopped: it may
    /// have no recv posted for the socket shutdown to end.
    wake: Mutex<Option<Waker>>,
}

impl ClientHandle {
    /// A handle on `sock` (a clone of the connection's socket).
    pub fn new(sock: Sock) -> ClientHandle {
        ClientHandle {
            sock,
            stop: AtomicBool::new(false),
            wake: Mutex::new(None),
        }
    }

    /// From now on a stop also calls `wake` (at once if already stopped).
    pub fn on_stop(&self, wake: Waker) {
        *lock(&self.wake) = Some(wake.clone());
        if self.stopped() {
            wake.wake();
        }
    }

    fn wake(&self) {
        let w = lock(&self.wake).clone();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Stops the reader: no new request is read; in-flight ones are answered, then the
    /// connection closes. No request gets an error because of this.
    pub fn stop_reading(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.sock.shutdown(Shutdown::Read);
        self.wake();
    }

    /// Whether the reader was told to stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Closes the socket both ways (a client that does not read its replies).
    pub fn close(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.sock.shutdown(Shutdown::Both);
        self.wake();
    }
}

impl Client for ClientHandle {
    fn stop_reading(&self) {
        ClientHandle::stop_reading(self);
    }

    fn close(&self) {
        ClientHandle::close(self);
    }
}

/// Connections alive now (handshake or transmission), by id, and a condition signalled
/// whenever one ends.
#[derive(Default)]
pub struct Live {
    conns: Mutex<HashMap<u64, Arc<ClientHandle>>>,
    ended: Condvar,
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<ClientHandle>>> {
        lock(&self.conns)
    }

    /// Connections alive now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Adds connection `id`; the returned slot removes it when dropped (also on unwinding).
    pub fn insert(self: &Arc<Self>, id: u64, handle: Arc<ClientHandle>) -> LiveSlot {
        self.lock().insert(id, handle);
        LiveSlot {
            live: Arc::clone(self),
            id,
        }
    }

    /// Stops every connection's reader (see [`ClientHandle::stop_reading`]).
    pub fn stop_reading_all(&self) {
        for h in self.lock().values() {
            h.stop_reading();
        }
    }

    /// Closes every connection's socket both ways.
    pub fn close_all(&self) {
        for h in self.lock().values() {
            h.close();
        }
    }

    /// Waits until no connection is left or `deadline` passes; returns whether none is left.
    pub fn wait_empty(&self, deadline: Option<Instant>) -> bool {
        let mut m = self.lock();
        while !m.is_empty() {
            match deadline {
                None => m = wait(&self.ended, m),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    m = wait_timeout(&self.ended, m, left).0;
                }
            }
        }
        true
    }
}

/// A connection's place in [`Live`]; removes it when dropped.
pub struct LiveSlot {
    live: Arc<Live>,
    id: u64,
}

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
        self.live.ended.notify_all();
    }
}
