//! Work a core polls in its own ring beside its requests: [`CoreSource`], attached to a core
//! with [`Engine::attach_source`](crate::io::Engine::attach_source) and an eventfd. The core arms a
//! poll of the eventfd in its io_uring; when it fires, the core consumes the eventfd's count and
//! calls [`CoreSource::ready`] on its own thread, where the source may submit requests with no
//! channel hop ([`SourceCtx::submit`]). At the end of every core turn it calls
//! [`CoreSource::end_of_batch`] on every source (by default [`CoreSource::idle`]).
//!
//! A source may also run socket I/O on its core's ring ([`SourceCtx::recv`],
//! [`SourceCtx::send`]): the op owns its buffers until its completion, which comes back on the
//! core thread through [`CoreSource::io_done`], with the buffers. A source may ask for a timer
//! ([`CoreSource::next_deadline`], folded into the core's wait; [`CoreSource::deadline`] when it
//! passed) and may end itself ([`SourceCtx::detach`]).
//!
//! A panic in any of these callbacks is caught on the core: that source is detached (dropped,
//! its socket ops cancelled) and logged; the core and its other sources go on.
//!
//! Nothing here knows what a source serves (a virtqueue, a socket, a timer).

pub(super) mod sock;

use std::sync::Arc;
use std::time::Instant;

use crate::io::disk::state::DiskState;
use crate::io::request::responder::Responder;
use crate::io::request::Request;
use crate::io::uring::buf::IoBuf;
use sock::{SendList, SockDone, SockFd};

/// Work a core polls in its own ring, beside its requests.
pub trait CoreSource: Send + 'static {
    /// The eventfd was written (its count is already consumed: a write after this call began
    /// fires again). Runs on the core thread; requests submitted with `ctx` run on this core.
    fn ready(&mut self, ctx: &mut SourceCtx<'_>);

    /// The end of a core turn, just before the core enters `io_uring_enter` (to block, or to
    /// poll when more messages wait): the end of a batch (e.g. signal a call eventfd once for
    /// every answer since the last call). Called every turn, so a busy core never holds a
    /// source's end-of-batch work back. Runs on the core thread; should be cheap when there is
    /// nothing to do.
    fn idle(&mut self) {}

    /// [`CoreSource::idle`] with the context, for a source that pushes I/O at the end of a
    /// batch (e.g. one `sendmsg` for every reply gathered in the turn); what it pushes is
    /// submitted by the `io_uring_enter` that follows. By default calls `idle`.
    fn end_of_batch(&mut self, ctx: &mut SourceCtx<'_>) {
        let _ = ctx;
        self.idle();
    }

    /// A socket op this source pushed (under `tag`) ended; `done` hands back what it held.
    /// Also called for ops that ended because the source's socket failed or was shut down.
    fn io_done(&mut self, ctx: &mut SourceCtx<'_>, tag: u64, done: SockDone) {
        let _ = (ctx, tag, done);
    }

    /// When [`CoreSource::deadline`] should be called next (`None`: no timer). Asked every
    /// core turn, so it should be cheap; the core's wait does not run past it.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// The instant [`CoreSource::next_deadline`] gave has passed (called on the first turn
    /// after it; a source that wants another call moves its deadline).
    fn deadline(&mut self, ctx: &mut SourceCtx<'_>) {
        let _ = ctx;
    }
}

/// Names an attached source: the core it is attached to and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceId {
    pub(crate) core: usize,
    pub(crate) id: u64,
}

impl SourceId {
    /// The core the source is attached to.
    pub fn core(&self) -> usize {
        self.core
    }
}

/// What a source may do on its core: submit without a channel hop, run socket I/O on the
/// core's ring, end itself.
pub struct SourceCtx<'a> {
    pub(crate) local: &'a mut dyn LocalSubmit,
    /// The source being called.
    pub(crate) source: u64,
    /// It asked to be detached.
    pub(crate) detach: bool,
}

impl SourceCtx<'_> {
    /// Pushes a `recv` on `fd` into `buf[at..buf.len()]` (nothing is received when that is
    /// empty), under `tag`. The op owns `buf` and a clone of `fd` until its completion, which
    /// comes back through [`CoreSource::io_done`] as [`SockDone::Recv`]. Like every op of the
    /// core it obeys the ring's in-flight cap (a op that does not fit waits in the backlog).
    pub fn recv(&mut self, fd: &SockFd, buf: IoBuf, at: usize, tag: u64) {
        let source = self.source;
        self.local.push_sock(
            source,
            tag,
            SockOp::Recv {
                fd: fd.clone(),
                buf,
                at,
            },
        );
    }

    /// Pushes one `sendmsg` (`MSG_NOSIGNAL`: a closed peer is an error, not a signal) of
    /// `list`'s unsent bytes on `fd`, under `tag`. The op owns `list` (its header bytes and
    /// buffers) and a clone of `fd` until its completion, which hands `list` back through
    /// [`CoreSource::io_done`] as [`SockDone::Send`]; a short send is reported as such (advance
    /// the list and send the rest).
    pub fn send(&mut self, fd: &SockFd, list: SendList, tag: u64) {
        let source = self.source;
        self.local.push_sock(
            source,
            tag,
            SockOp::Send {
                fd: fd.clone(),
                list,
            },
        );
    }

    /// Asks for this source to be detached once the current callback returns: it is dropped
    /// (with its eventfd) on the core, its socket ops in flight are cancelled (their buffers are
    /// freed when their completions come), and no callback of it runs again.
    pub fn detach(&mut self) {
        self.detach = true;
    }
}

/// A socket op as a source asks for it (see [`SourceCtx::recv`] and [`SourceCtx::send`]).
pub(crate) enum SockOp {
    Recv { fd: SockFd, buf: IoBuf, at: usize },
    Send { fd: SockFd, list: SendList },
}

/// A core as a [`SourceCtx`] sees it.
pub(crate) trait LocalSubmit {
    /// The engine this core belongs to, as an identity: the address of the state its threads
    /// share (a source submitting to a disk of another engine goes through that disk's channel).
    /// An address, not the type, so that sources sit below the engine's types.
    fn engine_id(&self) -> *const ();
    /// This core's index.
    fn core_id(&self) -> usize;
    /// Starts an accepted request on this core.
    fn submit_local(&mut self, disk: Arc<DiskState>, req: Request, done: Responder);
    /// Pushes a socket op of source `source` to this core's ring.
    fn push_sock(&mut self, source: u64, tag: u64, op: SockOp);
}
