//! The sources attached to a core ([`CoreSource`]): their eventfds polled in the core's ring,
//! `ready` when one fires, `end_of_batch` every turn, their socket ops' completions
//! (`io_done`), their timers (`deadline`), and their removal (from outside, from within, after
//! a panic, at shutdown). Every callback runs under `catch_unwind`: a source that panics is
//! detached, the core goes on.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::super::request::Request;
use super::super::source::{CoreSource, LocalSubmit, SockOp, SourceCtx};
use super::ops::{CoreOp, OpKind, SockIo};
use super::Core;
use crate::io::disk::state::DiskState;
use crate::io::request::responder::Responder;
use crate::io::source::sock::SockDone;

/// One attached source and the eventfd it is polled by (kept open while attached).
struct Entry {
    fd: File,
    source: Box<dyn CoreSource>,
}

/// A core's attached sources by id (ids are never reused, so a late CQE of a detached poll
/// or socket op can never be taken for a newer source).
#[derive(Default)]
pub(super) struct Sources {
    next: u64,
    map: HashMap<u64, Entry>,
    fired: Vec<u64>,
    /// Scratch list of ids for the calls of one turn.
    ids: Vec<u64>,
}

/// Reads `buf` from `fd` without ever blocking the core: `preadv2` with `RWF_NOWAIT`, which
/// fails with `EAGAIN` instead of waiting whatever the file description's flags say. The
/// `O_NONBLOCK` set at attach is on a description the fd's other holders share (a vhost-user
/// frontend's kick eventfd), who can clear it; and a poll event does not promise a count (the
/// other holder may read it first). Where the file does not support `RWF_NOWAIT`, a plain
/// read (non-blocking by the flag set at attach).
fn read_nowait(fd: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, valid for writes of its length during the call; offset -1
    // reads at the file position (an eventfd has none to move).
    let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return (&*fd).read(buf);
    }
    Err(err)
}

/// Not a task: the `task` of a socket op (its completion never reaches a task).
const NO_TASK: usize = usize::MAX;

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

    /// Detaches source `id` (asked from outside) and answers `ack` once it is dropped.
    pub(super) fn detach_source(&mut self, id: u64, ack: Sender<()>) {
        self.remove_source(id);
        let _ = ack.send(());
    }

    /// Removes source `id`: its poll is removed from the ring (its last CQE is ignored when it
    /// comes), its socket ops are cancelled (their buffers are dropped when their CQEs come)
    /// and the source and its fd are dropped.
    fn remove_source(&mut self, id: u64) {
        self.ring.remove_poll(id);
        self.ring
            .cancel_where(|op| matches!(op.kind, OpKind::Sock { source, .. } if source == id));
        self.sources.fired.retain(|&f| f != id);
        drop(self.sources.map.remove(&id));
    }

    /// Removes every source (the core is stopping: their socket ops must end before the ring
    /// can be idle).
    pub(super) fn remove_all_sources(&mut self) {
        let ids: Vec<u64> = self.sources.map.keys().copied().collect();
        for id in ids {
            self.remove_source(id);
        }
    }

    /// Runs `f` on source `id` with a context on this core, catching a panic. A source that
    /// panicked or asked to be detached is removed. False when there is no such source.
    fn call_source(
        &mut self,
        id: u64,
        f: impl FnOnce(&mut dyn CoreSource, &mut SourceCtx<'_>),
    ) -> bool {
        let Some(mut e) = self.sources.map.remove(&id) else {
            return false;
        };
        let mut ctx = SourceCtx {
            local: self,
            source: id,
            detach: false,
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| f(&mut *e.source, &mut ctx)));
        let detach = ctx.detach;
        self.sources.map.insert(id, e);
        if let Err(panic) = outcome {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(not a string)".into());
            tracing::error!(core = self.id, source = id, panic = %what,
                "a source panicked on its core; it is detached, the core goes on");
            self.remove_source(id);
        } else if detach {
            self.remove_source(id);
        }
        true
    }

    /// Calls `ready` on every source whose eventfd fired, after consuming its count.
    pub(super) fn run_sources(&mut self) {
        let mut fired = std::mem::take(&mut self.sources.fired);
        self.ring.take_fired(&mut fired);
        for &id in &fired {
            let Some(e) = self.sources.map.get(&id) else {
                continue;
            };
            let mut count = [0u8; 8];
            match read_nowait(&e.fd, &mut count) {
                Ok(n) if n > 0 => {
                    self.call_source(id, |s, ctx| s.ready(ctx));
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
        }
        fired.clear();
        self.sources.fired = fired;
        self.run_source_deadlines();
    }

    /// Calls `end_of_batch` on every source (the end of a turn: the core is about to enter the
    /// ring).
    pub(super) fn idle_sources(&mut self) {
        if self.sources.map.is_empty() {
            return;
        }
        let mut ids = std::mem::take(&mut self.sources.ids);
        ids.extend(self.sources.map.keys().copied());
        for &id in &ids {
            self.call_source(id, |s, ctx| s.end_of_batch(ctx));
        }
        ids.clear();
        self.sources.ids = ids;
    }

    /// The earliest deadline any source asked for.
    pub(super) fn sources_deadline(&self) -> Option<Instant> {
        self.sources
            .map
            .values()
            .filter_map(|e| {
                catch_unwind(AssertUnwindSafe(|| e.source.next_deadline()))
                    .ok()
                    .flatten()
            })
            .min()
    }

    /// Calls `deadline` on every source whose deadline has passed.
    fn run_source_deadlines(&mut self) {
        if self.sources.map.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut ids = std::mem::take(&mut self.sources.ids);
        let mut panicked = Vec::new();
        for (&id, e) in &self.sources.map {
            match catch_unwind(AssertUnwindSafe(|| e.source.next_deadline())) {
                Ok(Some(t)) if t <= now => ids.push(id),
                Ok(_) => {}
                Err(_) => panicked.push(id),
            }
        }
        for id in panicked {
            tracing::error!(
                core = self.id,
                source = id,
                "a source panicked in next_deadline; it is detached, the core goes on"
            );
            self.remove_source(id);
        }
        for &id in &ids {
            self.call_source(id, |s, ctx| s.deadline(ctx));
        }
        ids.clear();
        self.sources.ids = ids;
    }

    /// A socket op of source `source` ended: hands its buffers back (dropped when the source is
    /// gone).
    pub(super) fn sock_done(&mut self, source: u64, tag: u64, io: SockIo, res: i32) {
        let done: SockDone = io.done(res);
        if !self.sources.map.contains_key(&source) {
            return;
        }
        self.call_source(source, |s, ctx| s.io_done(ctx, tag, done));
    }
}

impl LocalSubmit for Core {
    fn engine_id(&self) -> *const () {
        Arc::as_ptr(&self.shared).cast()
    }

    fn core_id(&self) -> usize {
        self.id
    }

    fn submit_local(&mut self, disk: Arc<DiskState>, req: Request, done: Responder) {
        self.submit(disk, req, done);
    }

    fn push_sock(&mut self, source: u64, tag: u64, op: SockOp) {
        let io = SockIo::from_op(op);
        self.ring
            .push_one(CoreOp::new(NO_TASK, OpKind::Sock { source, tag, io }));
    }
}
