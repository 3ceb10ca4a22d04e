//! [`CoreVring`]: the library's vring with the kick eventfd handed to an engine core.
//!
//! `vhost-user-backend` registers a queue's kick eventfd in the epoll of the worker thread whose
//! `queues_per_thread` mask names the queue, and has no hook for `SET_VRING_KICK`. The device
//! names no queue in any mask (so no worker thread ever sees a kick), and the vring type it
//! gives the library is this wrapper around [`VringRwLock`]: its `set_kick` hands a duplicate
//! of the eventfd to the queue's engine core ([`Engine::attach_source`], polled in the core's
//! io_uring, served by a [`QueueSource`]), and detaches it when the kick is replaced or cleared
//! (`GET_VRING_BASE` clears it after the queue was stopped). Everything else is the library's
//! vring, unchanged.
//!
//! The library creates the vrings itself (`VringT::new` takes no context). While a device is
//! being created, [`collect`] gathers the vrings created on the calling thread so the device
//! can bind each to its [`Queue`].

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use addcow_engine::{Engine, SourceId};
use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;

use super::device::GuestMem;
use super::queue::{Queue, QueueSource};
use addcow_engine::sync::lock;

thread_local! {
    /// Vrings created on this thread while [`collect`] runs.
    static CREATED: RefCell<Option<Vec<CoreVring>>> = const { RefCell::new(None) };
}

/// Runs `f` (which creates a device and with it its vrings) and returns what it returned with
/// the vrings it created, in creation order (= queue index order).
pub fn collect<T>(f: impl FnOnce() -> T) -> (T, Vec<CoreVring>) {
    let previous = CREATED.with(|c| c.borrow_mut().replace(Vec::new()));
    let out = f();
    let created = CREATED.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
    (out, created.unwrap_or_default())
}

/// Whether `f` is an eventfd (its `/proc/self/fd` link names the eventfd anonymous inode).
///
/// Only eventfds are accepted as a queue's call and kick: a write to an eventfd blocks only
/// when its counter would pass `u64::MAX - 1`, which the daemon's writes of 1 cannot reach in
/// practice, so the blocking `write` of the call fd on an engine core never blocks (a pipe that
/// is never read would block the core once full); and reading an eventfd consumes it whole.
pub fn is_eventfd(f: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]")
}

/// Where a bound vring's kick goes.
struct Binding {
    queue: Arc<Queue>,
    engine: Engine,
    core: usize,
}

#[derive(Default)]
struct Hook {
    binding: Option<Binding>,
    attached: Option<SourceId>,
}

/// The library's [`VringRwLock`] whose kick eventfd is polled by an engine core once bound
/// ([`CoreVring::bind`]). Unbound, it is the library's vring (nothing reads its kick).
#[derive(Clone)]
pub struct CoreVring {
    inner: VringRwLock,
    hook: Arc<Mutex<Hook>>,
}

impl CoreVring {
    /// The library's vring inside.
    pub fn inner(&self) -> &VringRwLock {
        &self.inner
    }

    /// From now on, a kick eventfd set on this vring is polled by core `core` of `engine`,
    /// serving `queue`.
    pub fn bind(&self, queue: Arc<Queue>, engine: Engine, core: usize) {
        self.lock().binding = Some(Binding {
            queue,
            engine,
            core,
        });
    }

    /// Stops polling the kick eventfd (requests already submitted still complete) and forgets
    /// the binding. Not on an engine core thread.
    pub fn unbind(&self) {
        self.detach();
        if let Some(b) = self.lock().binding.take() {
            b.queue.set_poke(None);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hook> {
        lock(&self.hook)
    }

    fn detach(&self) {
        let (id, engine) = {
            let mut h = self.lock();
            let Some(id) = h.attached.take() else { return };
            let Some(b) = &h.binding else { return };
            (id, b.engine.clone())
        };
        if let Err(e) = engine.detach_source(id) {
            tracing::warn!(error = %e, "vhost-user-blk: detaching a queue's kick eventfd");
        }
    }

    /// Hands a duplicate of `kick` to the bound core (if bound).
    fn attach(&self, kick: &File) -> io::Result<()> {
        let (queue, engine, core) = {
            let h = self.lock();
            let Some(b) = &h.binding else { return Ok(()) };
            (Arc::clone(&b.queue), b.engine.clone(), b.core)
        };
        let polled = OwnedFd::from(kick.try_clone()?);
        queue.set_poke(Some(kick.try_clone()?));
        let source = Box::new(QueueSource::new(Arc::clone(&queue)));
        let id = engine
            .attach_source(core, polled, source)
            .map_err(|e| io::Error::other(format!("polling queue {}'s kick: {e}", queue.index)))?;
        self.lock().attached = Some(id);
        // Chains the driver added before the poll was armed: look once.
        queue.poke();
        Ok(())
    }

    /// See [`Queue::fence`] (nothing when unbound).
    pub fn fence(&self) {
        let q = self.lock().binding.as_ref().map(|b| Arc::clone(&b.queue));
        if let Some(q) = q {
            q.fence();
        }
    }

    /// Wakes the bound queue's poll as a kick would (nothing when unbound).
    pub(super) fn poke(&self) {
        let q = self.lock().binding.as_ref().map(|b| Arc::clone(&b.queue));
        if let Some(q) = q {
            q.poke();
        }
    }
}

impl<'a> VringStateGuard<'a, GuestMem> for CoreVring {
    type G = <VringRwLock as VringStateGuard<'a, GuestMem>>::G;
}

impl<'a> VringStateMutGuard<'a, GuestMem> for CoreVring {
    type G = <VringRwLock as VringStateMutGuard<'a, GuestMem>>::G;
}

impl VringT<GuestMem> for CoreVring {
    fn new(mem: GuestMem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        let v = CoreVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            hook: Arc::default(),
        };
        CREATED.with(|c| {
            if let Some(list) = c.borrow_mut().as_mut() {
                list.push(v.clone());
            }
        });
        Ok(v)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, GuestMem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, GuestMem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        if enabled {
            // Kicks that came while the queue was disabled were consumed without popping.
            self.poke();
        }
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready);
        if ready {
            self.poke();
        }
    }

    fn set_kick(&self, file: Option<File>) {
        // The old eventfd's poll goes first: two polls must never serve one queue.
        self.detach();
        let file = file.filter(|f| {
            let ok = is_eventfd(f);
            if !ok {
                tracing::error!("vhost-user-blk: the frontend's kick fd is not an eventfd; refused (the queue is not served)");
            }
            ok
        });
        let attach = file.as_ref().map(|f| self.attach(f));
        if let Some(Err(e)) = attach {
            tracing::error!(error = %e, "vhost-user-blk: the queue's kick cannot be polled; it is not served");
        }
        self.inner.set_kick(file);
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        // Written with a blocking write on the engine core: only an eventfd cannot block it.
        let file = file.filter(|f| {
            let ok = is_eventfd(f);
            if !ok {
                tracing::error!("vhost-user-blk: the frontend's call fd is not an eventfd; refused (the queue's answers are not signalled)");
            }
            ok
        });
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}
