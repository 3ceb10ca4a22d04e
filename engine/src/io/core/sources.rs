//! The sources attached to a core ([`CoreSource`]): their eventfds polled in the core's ring,
//! `ready` when one fires, `idle` before the core blocks.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use crossbeam_channel::Sender;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::super::disk_state::DiskState;
use super::super::engine_shared::EngineShared;
use super::super::request::Request;
use super::super::responder::Responder;
use super::super::source::{CoreSource, LocalSubmit, SourceCtx};
use super::Core;

/// One attached source and the eventfd it is polled by (kept open while attached).
struct Entry {
    fd: File,
    source: Box<dyn CoreSource>,
}

/// A core's attached sources by id (ids are never reused, so a late CQE of a detached poll
/// can never be taken for a newer source).
#[derive(Default)]
pub(super) struct Sources {
    next: u64,
    map: HashMap<u64, Entry>,
    fired: Vec<u64>,
}

impl Core {
    /// Attaches `source`, polled by `fd` (made non-blocking: the core reads it only after a
    /// poll said it is readable, and a second poll event for the same write finds it empty).
    pub(super) fn attach_source(
        &mut self,
        fd: OwnedFd,
        source: Box<dyn CoreSource>,
        ack: Sender<std::io::Result<u64>>,
    ) {
        let nonblocking = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).and_then(|fl| {
            let fl = OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK;
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(fl))
        });
        if let Err(e) = nonblocking {
            let _ = ack.send(Err(std::io::Error::from(e)));
            return;
        }
        let id = self.sources.next;
        self.sources.next += 1;
        self.ring.add_poll(id, fd.as_raw_fd());
        self.sources.map.insert(
            id,
            Entry {
                fd: File::from(fd),
                source,
            },
        );
        let _ = ack.send(Ok(id));
    }

    /// Detaches source `id`: its poll is removed from the ring (its last CQE is ignored when it
    /// comes), and the source and its fd are dropped before `ack` is answered.
    pub(super) fn detach_source(&mut self, id: u64, ack: Sender<()>) {
        self.ring.remove_poll(id);
        self.sources.fired.retain(|&f| f != id);
        drop(self.sources.map.remove(&id));
        let _ = ack.send(());
    }

    /// Calls `ready` on every source whose eventfd fired, after consuming its count.
    pub(super) fn run_sources(&mut self) {
        let mut fired = std::mem::take(&mut self.sources.fired);
        self.ring.take_fired(&mut fired);
        for &id in &fired {
            let Some(mut e) = self.sources.map.remove(&id) else {
                continue;
            };
            let mut count = [0u8; 8];
            match (&e.fd).read(&mut count) {
                Ok(n) if n > 0 => {
                    let mut ctx = SourceCtx { local: self };
                    e.source.ready(&mut ctx);
                }
                // Consumed by an earlier read whose `ready` covered it.
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                other => {
                    // Not an eventfd (end of file, or an error): polling it again would spin.
                    tracing::error!(core = self.id, source = id, result = ?other,
                        "a source's file descriptor cannot be read as an eventfd; \
                         it is no longer polled");
                    self.ring.remove_poll(id);
                }
            }
            self.sources.map.insert(id, e);
        }
        fired.clear();
        self.sources.fired = fired;
    }

    /// Calls `idle` on every source (the end of a turn: the core is about to enter the ring).
    pub(super) fn idle_sources(&mut self) {
        for e in self.sources.map.values_mut() {
            e.source.idle();
        }
    }
}

impl LocalSubmit for Core {
    fn engine(&self) -> &Arc<EngineShared> {
        &self.shared
    }

    fn core_id(&self) -> usize {
        self.id
    }

    fn submit_local(&mut self, disk: Arc<DiskState>, req: Request, done: Responder) {
        self.submit(disk, req, done);
    }
}
