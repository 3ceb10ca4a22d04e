//! The `vhost-user-backend` device: negotiation answers and the per-queue request loop.
//!
//! First version of the request path: each queue has its own worker thread (the library's epoll
//! loop), which wakes on the queue's kick eventfd, pops every available chain, submits their
//! engine requests to the queue's core, **waits** for all of them, then writes data and status
//! bytes, adds the used entries and signals the call eventfd once for the batch (as `EVENT_IDX`
//! allows). The next step moves the kick eventfd into the core's io_uring so the core pops and
//! completes chains itself (see `docs/VHOST_USER_BLK.md`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

use addcow_engine::{Done, RequestError};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::activity::Activity;
use super::config::DeviceConfig;
use super::request::{parse, status_slot, Limits, Pending};
use crate::serve::export::Backend;

/// How long a frontend's GET_VRING_BASE waits for the queue's batch in flight.
const STOP_VRING_WAIT: Duration = Duration::from_secs(30);

/// Data bytes of the chains one batch pops (the rest wait for the next batch).
const BATCH_BYTES: u64 = 32 << 20;

/// Guest memory as the frontend mapped it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// One frontend connection's device state. Cloned into each queue's worker thread.
#[derive(Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
}

struct Inner {
    disk: Arc<dyn Backend>,
    activity: Arc<Activity>,
    config: DeviceConfig,
    mem: RwLock<Option<GuestMem>>,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    /// Data bytes popped into one batch before it is served (at least one chain per batch).
    batch_bytes: u64,
    /// A bad ring was reported once (later ones go to debug, so a guest cannot flood the log).
    ring_error_logged: AtomicBool,
}

impl BlkDevice {
    /// A device serving `disk` as described by `config`; its queue batches are tracked in
    /// `activity`.
    pub fn new(disk: Arc<dyn Backend>, config: DeviceConfig, activity: Arc<Activity>) -> BlkDevice {
        Self::with_batch_bytes(disk, config, activity, BATCH_BYTES)
    }

    fn with_batch_bytes(
        disk: Arc<dyn Backend>,
        config: DeviceConfig,
        activity: Arc<Activity>,
        batch_bytes: u64,
    ) -> BlkDevice {
        BlkDevice {
            inner: Arc::new(Inner {
                disk,
                activity,
                config,
                mem: RwLock::new(None),
                event_idx: AtomicBool::new(false),
                writeback: AtomicBool::new(true),
                ring_error_logged: AtomicBool::new(false),
                batch_bytes,
            }),
        }
    }

    /// Serves `vring` (queue `queue`) after a kick: with `EVENT_IDX`, notifications stay off
    /// while chains are served and the ring is checked again after turning them back on.
    fn serve_queue(&self, vring: &VringRwLock, queue: usize) -> io::Result<()> {
        if !self.inner.event_idx.load(Ordering::Relaxed) {
            while self.serve_available(vring, queue)? {}
            return Ok(());
        }
        loop {
            vring
                .disable_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?;
            while self.serve_available(vring, queue)? {}
            // Chains that cannot be served now (stopping, queue stopped, no memory table) stay
            // in the ring; looping on them would spin.
            let stuck = self.inner.activity.stopping()
                || !vring.get_ref().get_queue().ready()
                || self
                    .inner
                    .mem
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_none();
            if stuck {
                return Ok(());
            }
            let more = vring
                .enable_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Pops every available chain of `vring` (queue `queue`), serves them on core `queue`
    /// (modulo the core count), and publishes their used entries. Returns whether any chain was
    /// served. Pops nothing once the daemon is stopping or the frontend stopped the queue.
    fn serve_available(&self, vring: &VringRwLock, queue: usize) -> io::Result<bool> {
        let Some(_batch) = self.inner.activity.begin(queue) else {
            return Ok(false);
        };
        if !vring.get_ref().get_queue().ready() {
            return Ok(false);
        }
        let core = queue;
        let Some(atomic) = self
            .inner
            .mem
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(false);
        };
        let mem = atomic.memory();
        // Pop chains until their data adds up to the batch cap: every byte of a batch is
        // bounced through engine buffers at once, so a guest cannot make the daemon allocate a
        // whole ring of 256 MiB requests. The rest stay in the ring for the next batch.
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            let mut iter = state
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(|e| io::Error::other(format!("virtqueue: {e}")))?;
            let mut chains = Vec::new();
            let mut bytes = 0u64;
            while bytes < self.inner.batch_bytes {
                let Some(chain) = iter.next() else { break };
                bytes += chain.clone().map(|d| u64::from(d.len())).sum::<u64>();
                chains.push(chain);
            }
            chains
        };
        if chains.is_empty() {
            return Ok(false);
        }
        let limits = Limits {
            size: self.inner.config.size,
            read_only: self.inner.config.read_only,
            writeback: self.inner.writeback.load(Ordering::Relaxed),
            serial: &self.inner.config.serial,
        };
        let disk = &self.inner.disk;
        let alloc = |len: usize| disk.alloc_buf(len);
        let (tx, rx) = mpsc::channel::<(usize, Result<Done, RequestError>)>();
        let mut pending: Vec<Pending<'_>> = Vec::with_capacity(chains.len());
        let mut waiting = 0usize;
        for chain in chains {
            let head = chain.head_index();
            let flags = chain.clone().map(|d| d.is_write_only()).collect::<Vec<_>>();
            let status = status_slot(&mem, chain.clone().last());
            let reader = Reader::new(&*mem, chain.clone());
            let writer = Writer::new(&*mem, chain);
            let (p, reqs) = parse(
                head,
                status,
                flags.into_iter(),
                reader,
                writer,
                &limits,
                &alloc,
            );
            let idx = pending.len();
            pending.push(p);
            for req in reqs {
                waiting += 1;
                let tx = tx.clone();
                disk.submit(
                    core,
                    req,
                    Box::new(move |r| {
                        let _ = tx.send((idx, r));
                    }),
                );
            }
        }
        drop(tx);
        for _ in 0..waiting {
            match rx.recv() {
                Ok((idx, r)) => {
                    if let Some(p) = pending.get_mut(idx) {
                        p.complete(r);
                    }
                }
                // Every completion is called exactly once; a closed channel means all of them
                // ran (or were dropped by a stopping engine): the rest stay IOERR-free only if
                // they were answered, so mark what is left failed below.
                Err(_) => break,
            }
        }
        for p in pending {
            let head = p.head;
            let failed_unanswered = p.outstanding > 0;
            let mut p = p;
            if failed_unanswered {
                p.complete(Err(RequestError {
                    errno: libc::ESHUTDOWN,
                    op: "engine stopped",
                    offset: 0,
                }));
            }
            let len = p.finish();
            vring
                .add_used(head, len)
                .map_err(|e| io::Error::other(format!("used ring: {e}")))?;
        }
        let notify = if self.inner.event_idx.load(Ordering::Relaxed) {
            vring
                .needs_notification()
                .map_err(|e| io::Error::other(format!("event index: {e}")))?
        } else {
            true
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(true)
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.config.queue_size)
    }

    fn features(&self) -> u64 {
        self.inner.config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIGURE_MEM_SLOTS: libblkio adds and removes its buffer regions one at a time.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self
            .inner
            .config
            .config_space(self.inner.writeback.load(Ordering::Relaxed));
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        let mut out = space[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` (offset 32) is writable (CONFIG_WCE).
        if offset == 32 && buf.len() == 1 {
            self.inner.writeback.store(buf[0] != 0, Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("config write of {} bytes at {offset} refused", buf.len()),
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        *self.inner.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the library marked the queue not ready (no new batch pops from it);
        // the batch in flight finishes, so its used entries land before the frontend reads
        // where the ring stands.
        let deadline = Instant::now() + STOP_VRING_WAIT;
        if self
            .inner
            .activity
            .wait_queue_idle(queue_index as usize, deadline)
        {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("queue {queue_index}: requests still in flight after {STOP_VRING_WAIT:?}"),
            ))
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            tracing::debug!(?evset, "vhost-user-blk: unexpected event set ignored");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        // One queue per worker thread: the thread index is the queue index. An error here is
        // the frontend's (a ring outside its memory): reported, and the worker stays (returning
        // it would end the worker thread silently and the queue with it).
        if let Err(e) = self.serve_queue(vring, thread_id) {
            if !self.inner.ring_error_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(queue = thread_id, error = %e, "vhost-user-blk: bad virtqueue; requests on it are not served");
            } else {
                tracing::debug!(queue = thread_id, error = %e, "vhost-user-blk: bad virtqueue");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::export::memory::MemDisk;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn config(size: u64) -> DeviceConfig {
        DeviceConfig {
            size,
            num_queues: 1,
            queue_size: 16,
            read_only: false,
            serial: String::new(),
        }
    }

    #[test]
    fn chains_past_the_batch_cap_are_served_by_the_next_batch() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap(),
        );
        let guard = mem.memory();
        let ring = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
        // Three WRITE chains of one sector each: header, data, status.
        let mut descs = Vec::new();
        for k in 0..3u64 {
            let (hdr, data, status) = (0x10000 + k * 0x100, 0x20000 + k * 0x1000, 0x30000 + k);
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            h[8..16].copy_from_slice(&k.to_le_bytes());
            guard.write_slice(&h, GuestAddress(hdr)).unwrap();
            guard
                .write_slice(&[k as u8 + 1; 512], GuestAddress(data))
                .unwrap();
            let i = 3 * k as u16;
            let next = VRING_DESC_F_NEXT as u16;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                hdr,
                16,
                next,
                i + 1,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                data,
                512,
                next,
                i + 2,
            )));
            let w = VRING_DESC_F_WRITE as u16;
            descs.push(RawDescriptor::from(SplitDescriptor::new(status, 1, w, 0)));
        }
        ring.add_desc_chains(&descs, 0).unwrap();
        let disk = MemDisk::new(1 << 20, false);
        // A cap one chain's data exceeds half of: batches of two chains, then one.
        let dev = BlkDevice::with_batch_bytes(
            disk.clone(),
            config(1 << 20),
            Arc::new(Activity::new(1)),
            600,
        );
        dev.update_memory(mem.clone()).unwrap();
        let vring = VringRwLock::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(
                ring.desc_table_addr().0,
                ring.avail_addr().0,
                ring.used_addr().0,
            )
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        dev.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        let used_idx: u16 = guard.read_obj(ring.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 3, "every chain answered after one kick");
        let data = disk.data.lock().unwrap();
        for k in 0..3usize {
            assert!(data[k * 512..(k + 1) * 512]
                .iter()
                .all(|&b| b == k as u8 + 1));
            let status: u8 = guard.read_obj(GuestAddress(0x30000 + k as u64)).unwrap();
            assert_eq!(status, 0, "chain {k} status");
        }
    }

    #[test]
    fn a_ring_outside_guest_memory_is_reported_not_fatal() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let config = DeviceConfig {
            size: 1 << 20,
            num_queues: 1,
            queue_size: 16,
            read_only: false,
            serial: String::new(),
        };
        let dev = BlkDevice::new(
            MemDisk::new(1 << 20, false),
            config,
            Arc::new(Activity::new(1)),
        );
        dev.update_memory(mem.clone()).unwrap();
        let vring = VringRwLock::new(mem, 16).unwrap();
        vring.set_queue_size(16);
        // The available ring's index is inside memory (and says 5 chains wait); its entries and
        // the descriptor table are not.
        vring.set_queue_info(0x20000, 0xfffc, 0x30000).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        for event_idx in [false, true] {
            dev.set_event_idx(event_idx);
            assert!(dev
                .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
                .is_ok());
        }
        assert!(
            dev.inner.ring_error_logged.load(Ordering::Relaxed),
            "reported"
        );
        // A wrong event set is ignored too.
        assert!(dev
            .handle_event(0, EventSet::OUT, std::slice::from_ref(&vring), 0)
            .is_ok());
    }
}
