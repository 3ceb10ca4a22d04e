//! How other threads reach a core: its channel, the eventfd its ring always reads, and the
//! messages they carry.
//!
//! Wakeup protocol: before blocking in `io_uring_enter` the core sets its `sleeping` flag and
//! looks at the channel once more; a sender that finds the flag set clears it and writes the
//! eventfd, whose read completing wakes the core. Both sides use SeqCst, so a message is either
//! seen by the core's last look or wakes it; a busy core is fed with no wakeup syscalls.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::io::disk::state::{DiskState, Waiter};
use crate::io::request::responder::Responder;
use crate::io::request::Request;
use crate::io::source::CoreSource;

/// A read of a disk's point-in-time view: `buf.len()` bytes at `offset` (bounds checked by
/// the sender); `into`: the caller's buffer (answered `Done::Filled`), else `Done::Read`.
pub(crate) struct FleeceRead {
    pub disk: Arc<DiskState>,
    pub fleece: Arc<crate::io::disk::fleece::Fleece>,
    pub offset: u64,
    pub buf: crate::io::uring::buf::DataBuf,
    pub into: bool,
    pub done: Responder,
}

/// A message to a core thread.
pub(crate) enum Msg {
    /// Serve `req` for `disk`; answer through `done`.
    Submit {
        disk: Arc<DiskState>,
        req: Request,
        done: Responder,
    },
    /// Start `req`, which the core's gate (throttle and fair share) already let through and
    /// which waited since for something else (its dirty bits made durable): it is not charged
    /// to the budget a second time.
    Admitted {
        disk: Arc<DiskState>,
        req: Request,
        done: Responder,
    },
    /// Run a commit of `disk` for `waiter` (the final commit of a close, which no longer takes
    /// requests).
    Commit {
        disk: Arc<DiskState>,
        waiter: Waiter,
    },
    /// Put `fds` into registered-file slots `3k..3k+3`; answer on `ack`.
    Register {
        index: u32,
        fds: [i32; 3],
        ack: Sender<()>,
    },
    /// Empty registered-file slots `3k..3k+3`.
    Unregister { index: u32 },
    /// Poll `fd` in the ring and call `source` when it is readable; answer the source's id on
    /// `ack` once the poll is in the ring.
    Attach {
        fd: OwnedFd,
        source: Box<dyn CoreSource>,
        ack: Sender<std::io::Result<u64>>,
    },
    /// Stop polling source `id` and drop it; answer on `ack` after it was dropped.
    Detach { id: u64, ack: Sender<()> },
    /// Run a closure on the core (answers forwarded from another core).
    Run(Box<dyn FnOnce() + Send>),
    /// A read of the remote base finished (from its connection thread): `op` is the core's
    /// key of the waiting read.
    RemoteDone {
        op: usize,
        result: crate::io::remote::ReadResult,
    },
    /// Read the point-in-time view of a disk (`fleece.rs`).
    FleeceRead(FleeceRead),
    /// Finish in-flight work and exit.
    Shutdown,
}

/// How other threads reach one core: its channel plus the eventfd its ring always reads.
pub(crate) struct CoreHandle {
    pub tx: Sender<Msg>,
    pub eventfd: OwnedFd,
    /// True while the core is (about to be) blocked in `io_uring_enter` with an empty channel
    /// (see the module docs).
    pub sleeping: AtomicBool,
}

impl CoreHandle {
    /// Creates the eventfd; the channel is passed in.
    pub(crate) fn new(tx: Sender<Msg>) -> std::io::Result<CoreHandle> {
        let eventfd = crate::sys::eventfd(crate::sys::EventFdMode::Blocking)?;
        Ok(CoreHandle {
            tx,
            eventfd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Sends `msg` and wakes the core if needed. Gives the message back if the core is gone.
    pub(crate) fn send(&self, msg: Msg) -> Result<(), Msg> {
        self.tx.send(msg).map_err(|e| e.0)?;
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
        Ok(())
    }

    /// Writes the eventfd unconditionally.
    pub(crate) fn wake(&self) {
        crate::sys::eventfd_signal(&self.eventfd);
    }
}
