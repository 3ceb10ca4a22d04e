//! What the engine's threads share: the core handles (channel + eventfd), the buffer arena, the
//! configuration and the registered-file slot allocator.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use super::buf::Arena;
use super::disk::DiskShared;
use super::{Completion, EngineConfig, Request};

/// Disks that can have registered files at once (each takes 3 slots of every ring's table).
pub(crate) const MAX_REGISTERED_DISKS: u32 = 256;

/// A message to a core thread.
pub(crate) enum Msg {
    /// Serve `req` for `disk`; call `done` when finished.
    Submit {
        disk: Arc<DiskShared>,
        req: Request,
        done: Completion,
    },
    /// Put `fds` into registered-file slots `3k..3k+3`; answer on `ack`.
    Register {
        index: u32,
        fds: [i32; 3],
        ack: Sender<()>,
    },
    /// Empty registered-file slots `3k..3k+3`.
    Unregister { index: u32 },
    /// Run a closure on the core (answers forwarded from another core).
    Run(Box<dyn FnOnce() + Send>),
    /// Finish in-flight work and exit.
    Shutdown,
}

/// How other threads reach one core: its channel plus the eventfd its ring always reads.
pub(crate) struct CoreHandle {
    pub tx: Sender<Msg>,
    pub eventfd: OwnedFd,
    /// True while the core is (about to be) blocked in `submit_and_wait` with an empty
    /// channel. A sender that flips it back to false writes the eventfd; every other send costs
    /// no syscall. Both sides use SeqCst, so either the core sees the message before it blocks
    /// or the sender sees the flag and wakes it.
    pub sleeping: AtomicBool,
}

impl CoreHandle {
    /// Creates the eventfd; the channel is passed in.
    pub(crate) fn new(tx: Sender<Msg>) -> std::io::Result<CoreHandle> {
        // SAFETY: eventfd has no memory effects; we check the result.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
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
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let _ = unsafe {
            libc::write(
                self.eventfd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// State shared by every core thread and every handle of one engine.
pub(crate) struct EngineShared {
    pub cores: Vec<CoreHandle>,
    pub arena: Option<Arc<Arena>>,
    pub config: EngineConfig,
    pub stopped: AtomicBool,
    disk_slots: Mutex<Vec<u32>>,
}

impl EngineShared {
    pub(crate) fn new(
        cores: Vec<CoreHandle>,
        arena: Option<Arc<Arena>>,
        config: EngineConfig,
    ) -> Self {
        EngineShared {
            cores,
            arena,
            config,
            stopped: AtomicBool::new(false),
            disk_slots: Mutex::new((0..MAX_REGISTERED_DISKS).rev().collect()),
        }
    }

    /// A free registered-file slot index, if any.
    pub(crate) fn take_disk_slot(&self) -> Option<u32> {
        self.disk_slots.lock().ok()?.pop()
    }

    /// Empties slot `k` on every core, then makes it reusable. Messages to a core are handled in
    /// order, so a later `Register` of `k` cannot overtake this `Unregister`.
    pub(crate) fn release_disk_slot(&self, k: u32) {
        for core in &self.cores {
            let _ = core.send(Msg::Unregister { index: k });
        }
        if let Ok(mut slots) = self.disk_slots.lock() {
            slots.push(k);
        }
    }

    /// The core handle for `core` (modulo the core count).
    pub(crate) fn core(&self, core: usize) -> &CoreHandle {
        &self.cores[core % self.cores.len()]
    }
}
