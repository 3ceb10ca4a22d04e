//! Work a core polls in its own ring beside its requests: [`CoreSource`], attached to a core
//! with [`Engine::attach_source`](super::Engine::attach_source) and an eventfd. The core arms a
//! poll of the eventfd in its io_uring; when it fires, the core consumes the eventfd's count and
//! calls [`CoreSource::ready`] on its own thread, where the source may submit requests with no
//! channel hop ([`SourceCtx::submit`]). Just before the core blocks it calls
//! [`CoreSource::idle`] on every source: the end of a batch.
//!
//! Nothing here knows what a source serves (a virtqueue, a socket, a timer).

use std::sync::Arc;

use super::disk_state::DiskState;
use super::engine_shared::EngineShared;
use super::request::Request;
use super::responder::Responder;

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

/// What a source may do on its core: submit without a channel hop.
pub struct SourceCtx<'a> {
    pub(crate) local: &'a mut dyn LocalSubmit,
}

/// A core as a [`SourceCtx`] sees it.
pub(crate) trait LocalSubmit {
    /// The engine this core belongs to.
    fn engine(&self) -> &Arc<EngineShared>;
    /// This core's index.
    fn core_id(&self) -> usize;
    /// Starts an accepted request on this core.
    fn submit_local(&mut self, disk: Arc<DiskState>, req: Request, done: Responder);
}
