//! The dirty-bitmap gate of the write path: a WRITE, WRITE_ZEROES or TRIM changes guest-visible
//! bytes, so its granules must be durably dirty in every enabled persistent bitmap before its
//! data may be issued (see `crate::dirty`). Populate, copy-on-read and stream do not pass here:
//! they leave the guest-visible bytes as they were.

use std::sync::Arc;

use super::mailbox::Msg;
use super::Core;
use crate::dirty::Gate;
use crate::io::disk::state::DiskState;
use crate::io::request::responder::Responder;
use crate::io::request::{req_err, Request};

impl Core {
    /// Lets the write-like `req` of `[offset, offset+len)` through (returned, with a responder
    /// that ends its in-flight registration when it is answered), or keeps it until its dirty
    /// bits are durable and then starts it on this core again (`None`; past the throttle gate,
    /// which let it through once), or fails it.
    pub(super) fn dirty_gate(
        &mut self,
        disk: &Arc<DiskState>,
        offset: u64,
        len: u64,
        req: Request,
        done: Responder,
    ) -> Option<(Request, Responder)> {
        let set = &disk.bitmaps;
        // No bitmap tracks writes: counted, so an add or enable waits for it to be answered.
        if let Some(untracked) = set.untracked() {
            return Some((req, guarded(disk, untracked, done)));
        }
        match set.admit(offset, len) {
            Gate::Pass(None) => Some((req, done)),
            Gate::Pass(Some(inflight)) => Some((req, guarded(disk, inflight, done))),
            Gate::Fail => {
                done.answer(Err(req_err(
                    libc::EIO,
                    "dirty bitmaps sidecar failed earlier",
                    offset,
                )));
                None
            }
            Gate::Wait(ticket) => {
                let shared = Arc::clone(&self.shared);
                let core = self.id;
                let d = Arc::clone(disk);
                set.enqueue(
                    offset,
                    len,
                    ticket,
                    Box::new(move |r| match r {
                        Ok(()) => {
                            // Admitted by the throttle gate already: not charged again.
                            let msg = Msg::Admitted { disk: d, req, done };
                            if let Err(Msg::Admitted { done, .. }) = shared.core(core).send(msg) {
                                done.answer(Err(req_err(
                                    libc::ESHUTDOWN,
                                    "engine shut down",
                                    offset,
                                )));
                            }
                        }
                        Err(_) => done.answer(Err(req_err(
                            libc::EIO,
                            "persist dirty bitmap bits",
                            offset,
                        ))),
                    }),
                );
                None
            }
        }
    }
}

/// `done`, keeping `guard` until the request is answered.
fn guarded<G: Send + 'static>(disk: &Arc<DiskState>, guard: G, done: Responder) -> Responder {
    disk.active
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Responder::new(
        Box::new(move |r| {
            drop(guard);
            done.answer(r);
        }),
        Arc::clone(&disk.active),
    )
}
