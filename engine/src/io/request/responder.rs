//! [`Responder`]: a request's completion, called exactly once.
//!
//! The engine never drops a request silently: a `Responder` that is dropped without having been
//! answered (a message left in a core's channel when the core exits, a task dropped because its
//! core panicked, a forwarded answer whose core is gone) answers `ESHUTDOWN` from its `Drop`.
//! Either way the disk's count of requests in flight goes down exactly once, so `Disk::close`,
//! which waits for that count, cannot wait forever.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Completion, Done, RequestError};

/// See the module docs.
pub(crate) struct Responder {
    done: Option<Completion>,
    /// The disk's count of requests accepted and not yet answered.
    active: Arc<AtomicUsize>,
    /// The request's share of its core's fair-share load, given back once it is answered.
    charge: Option<crate::qos::Charge>,
}

impl Responder {
    /// Wraps `done` for a request the disk accepted (`active` was incremented for it).
    pub(crate) fn new(done: Completion, active: Arc<AtomicUsize>) -> Responder {
        Responder {
            done: Some(done),
            active,
            charge: None,
        }
    }

    /// Holds `charge` until the request is answered.
    pub(crate) fn set_charge(&mut self, charge: crate::qos::Charge) {
        self.charge = Some(charge);
    }

    /// Calls the completion with `result` (a panic in it is caught and logged: it must not take
    /// the core thread down).
    pub(crate) fn answer(mut self, result: Result<Done, RequestError>) {
        self.call(result);
    }

    fn call(&mut self, result: Result<Done, RequestError>) {
        let Some(done) = self.done.take() else {
            return;
        };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(result))).is_err() {
            tracing::error!("a request's completion callback panicked");
        }
        self.charge = None;
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.call(Err(RequestError {
            errno: libc::ESHUTDOWN,
            op: "engine stopped before answering",
            offset: 0,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn responder() -> (
        Responder,
        mpsc::Receiver<Result<Done, RequestError>>,
        Arc<AtomicUsize>,
    ) {
        let (tx, rx) = mpsc::channel();
        let active = Arc::new(AtomicUsize::new(1));
        let r = Responder::new(
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
            Arc::clone(&active),
        );
        (r, rx, active)
    }

    #[test]
    fn answered_once_or_shut_down_when_dropped() {
        let (r, rx, active) = responder();
        r.answer(Ok(Done::Ok));
        assert!(matches!(rx.try_recv(), Ok(Ok(Done::Ok))));
        assert!(rx.try_recv().is_err(), "only once");
        assert_eq!(active.load(Ordering::SeqCst), 0);

        let (r, rx, active) = responder();
        drop(r);
        let got = rx.try_recv().expect("answered on drop");
        assert_eq!(got.expect_err("an error").errno, libc::ESHUTDOWN);
        assert_eq!(active.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_panicking_callback_still_counts_as_answered() {
        let active = Arc::new(AtomicUsize::new(1));
        let r = Responder::new(Box::new(|_| panic!("callback bug")), Arc::clone(&active));
        r.answer(Ok(Done::Ok));
        assert_eq!(active.load(Ordering::SeqCst), 0);
    }
}
