//! The `vhost-user-backend` device: negotiation answers, and the binding of each queue to the
//! engine core that serves it.
//!
//! No library worker thread serves a queue: [`BlkDevice::queues_per_thread`] names no queue, so
//! the library never registers a kick eventfd in its epoll; each queue's vring is a
//! [`CoreVring`] whose kick is polled by the queue's engine core, where [`Queue`] pops, submits
//! and answers chains (see `queue.rs` and `docs/VHOST_USER_BLK.md`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost_user_backend::VhostUserBackend;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::activity::Activity;
use super::config::DeviceConfig;
use super::device::{GuestMem, Inner, LogLimit};
use super::queue::Queue;
use super::vring::CoreVring;
use crate::backend::disk::Backend;
use addcow_engine::sync::{lock, write};

/// How long a frontend's GET_VRING_BASE waits for the queue's chains in flight. Its own
/// value, well past the engine's default remote base timeout (`--base-timeout`, 30 s), so that
/// chains waiting on an image server that stopped answering fail and are answered before the
/// frontend is told where the ring stands. If it still fires, the queue is fenced: the chains
/// still in flight add no used entry to the ring any more ([`Queue::fence`]). A test sets a
/// shorter one with the `stop-vring-wait` test seam (debug builds only).
pub const STOP_VRING_WAIT: Duration = Duration::from_secs(75);

/// Bytes of daemon memory that one queue's chains in flight may bounce through; popping stops
/// there (at least one chain is always popped) and resumes as they are answered, so a guest
/// cannot make the daemon allocate a whole ring of 256 MiB requests. Direct (zero-copy) chains
/// do not count.
pub const BOUNCE_CAP: u64 = 32 << 20;

/// At most one warning per this interval for requests that failed (per frontend connection);
/// the next one says how many were left out.
const IO_ERROR_LOG_EVERY: Duration = Duration::from_secs(1);

/// One frontend connection's device state, shared with its queues.
#[derive(Clone)]
pub struct BlkDevice {
    inner: Arc<Inner>,
    /// The vrings bound to engine cores ([`BlkDevice::bind`]), shared by every clone.
    vrings: Arc<Mutex<Vec<CoreVring>>>,
}

impl BlkDevice {
    /// A device serving `disk` as described by `config`; its chains in flight are counted in
    /// `activity`. It serves nothing until [`BlkDevice::authorize`]d.
    pub fn new(disk: Arc<dyn Backend>, config: DeviceConfig, activity: Arc<Activity>) -> BlkDevice {
        Self::with_limits(disk, config, activity, BOUNCE_CAP, true)
    }

    pub(super) fn with_limits(
        disk: Arc<dyn Backend>,
        config: DeviceConfig,
        activity: Arc<Activity>,
        batch_bytes: u64,
        direct: bool,
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
                io_errors: LogLimit::new(IO_ERROR_LOG_EVERY),
                authorized: AtomicBool::new(false),
                batch_bytes,
                direct,
            }),
            vrings: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The queue for vring `index` of this device.
    pub(super) fn queue(&self, index: usize, vring: &CoreVring) -> Arc<Queue> {
        Arc::new(Queue::new(
            index,
            Arc::clone(&self.inner),
            vring.inner().clone(),
        ))
    }

    /// Binds each of `vrings` (in queue order, as the library created them) to engine core
    /// `index % cores`. Fails when the disk is not an engine disk (nothing could poll the
    /// kicks).
    pub fn bind(&self, vrings: Vec<CoreVring>) -> io::Result<()> {
        let engine = self
            .inner
            .disk
            .engine_disk()
            .map(|d| d.engine.clone())
            .ok_or_else(|| io::Error::other("vhost-user-blk needs an engine disk"))?;
        let cores = engine.cores().max(1);
        for (index, v) in vrings.iter().enumerate() {
            v.bind(self.queue(index, v), engine.clone(), index % cores);
        }
        *lock(&self.vrings) = vrings;
        Ok(())
    }

    /// Lets the frontend be served (its peer passed the socket's allow-list, or there is
    /// none): from now on its queues pop chains, and each bound queue looks at its ring once
    /// (chains it posted while it waited are served without another kick).
    pub fn authorize(&self) {
        self.inner.authorized.store(true, Ordering::SeqCst);
        for v in lock(&self.vrings).iter() {
            v.poke();
        }
    }

    /// Stops polling every queue's kick (the frontend is gone). Chains in flight still
    /// complete into the old frontend's memory, which they keep mapped.
    pub fn unbind(&self) {
        let vrings = std::mem::take(&mut *lock(&self.vrings));
        for v in vrings {
            v.unbind();
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = CoreVring;

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
        *write(&self.inner.mem) = Some(mem);
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the library marked the queue not ready (no chain is popped from it
        // any more); every popped chain is answered first, so its used entry lands before the
        // frontend reads where the ring stands.
        let wait = crate::process::seam::duration("stop-vring-wait").unwrap_or(STOP_VRING_WAIT);
        let deadline = Instant::now() + wait;
        if self
            .inner
            .activity
            .wait_queue_idle(queue_index as usize, deadline)
        {
            Ok(())
        } else {
            let vrings = lock(&self.vrings);
            if let Some(v) = vrings.get(queue_index as usize) {
                v.fence();
            }
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("queue {queue_index}: requests still in flight after {wait:?}"),
            ))
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One library worker thread (it only waits for its exit event) and no queue in its
        // mask: the kicks go to the engine cores (`CoreVring`).
        vec![0]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[CoreVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // No queue is registered with the library's epoll.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::memory::MemDisk;
    use addcow_engine::{Completion, Request};
    use std::io::Read;
    use vhost_user_backend::VringT;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{
        Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    };

    fn config(size: u64) -> DeviceConfig {
        DeviceConfig {
            size,
            num_queues: 1,
            queue_size: 16,
            read_only: false,
            serial: String::new(),
            name: "test.sock".into(),
            pool: None,
        }
    }

    fn vring(mem: &GuestMem, desc: u64, avail: u64, used: u64) -> CoreVring {
        let vring = CoreVring::new(mem.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(desc, avail, used).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    fn eventfd() -> std::fs::File {
        let fd = addcow_engine::sys::eventfd(addcow_engine::sys::EventFdMode::NonBlocking);
        std::fs::File::from(fd.expect("eventfd"))
    }

    /// `n` chains on `ring` (descriptors 3k..3k+2): header, one data descriptor of `len` bytes
    /// at `data(k)`, status at 0x30000 + k. `read`: VIRTIO_BLK_T_IN at sector 8k, else
    /// VIRTIO_BLK_T_OUT at sector k with bytes k + 1.
    fn chains(
        mem: &GuestMemoryMmap,
        ring: &MockSplitQueue<'_, GuestMemoryMmap>,
        n: u64,
        len: u32,
        read: bool,
        data: impl Fn(u64) -> u64,
    ) {
        let mut descs = Vec::new();
        for k in 0..n {
            let (hdr, status) = (0x10000 + k * 0x100, 0x30000 + k);
            let mut h = [0u8; 16];
            let (kind, sector) = if read {
                (VIRTIO_BLK_T_IN, 8 * k)
            } else {
                (VIRTIO_BLK_T_OUT, k)
            };
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            if !read {
                mem.write_slice(&vec![k as u8 + 1; len as usize], GuestAddress(data(k)))
                    .unwrap();
            }
            let i = 3 * k as u16;
            let next = VRING_DESC_F_NEXT as u16;
            let w = VRING_DESC_F_WRITE as u16;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                hdr,
                16,
                next,
                i + 1,
            )));
            let dflags = if read { next | w } else { next };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                data(k),
                len,
                dflags,
                i + 2,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(status, 1, w, 0)));
        }
        ring.add_desc_chains(&descs, 0).unwrap();
    }

    #[test]
    fn chains_past_the_bounce_cap_wait_for_answers_and_the_queue_is_woken() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap(),
        );
        let guard = mem.memory();
        let ring = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
        chains(&guard, &ring, 3, 512, false, |k| 0x20000 + k * 0x1000);
        let disk = MemDisk::new(1 << 20, false);
        // A cap one chain's data exceeds half of: two chains are popped, then the third waits.
        let dev = BlkDevice::with_limits(
            disk.clone(),
            config(1 << 20),
            Arc::new(Activity::new(1)),
            600,
            false,
        );
        dev.update_memory(mem.clone()).unwrap();
        dev.authorize();
        let v = vring(
            &mem,
            ring.desc_table_addr().0,
            ring.avail_addr().0,
            ring.used_addr().0,
        );
        let q = dev.queue(0, &v);
        let mut wake = eventfd();
        q.set_poke(Some(wake.try_clone().unwrap()));
        let mut submit = |req: Request, done: Completion| disk.submit(0, req, done);
        q.serve(&mut submit);
        let used =
            |g: &GuestMemoryMmap| -> u16 { g.read_obj(ring.used_addr().unchecked_add(2)).unwrap() };
        assert_eq!(used(&guard), 2, "the cap held the third chain back");
        let mut count = [0u8; 8];
        assert_eq!(
            wake.read(&mut count).unwrap(),
            8,
            "answers under the cap woke the queue"
        );
        q.serve(&mut submit);
        assert_eq!(used(&guard), 3, "the wake-up served the rest");
        let data = disk.data.lock().unwrap();
        for k in 0..3usize {
            assert!(data[k * 512..(k + 1) * 512]
                .iter()
                .all(|&b| b == k as u8 + 1));
            let status: u8 = guard.read_obj(GuestAddress(0x30000 + k as u64)).unwrap();
            assert_eq!(status, 0, "chain {k} status");
        }
    }

    /// A queue whose bounce bytes the daemon's pool cannot give now pops nothing (the chains
    /// stay in the ring, nothing answered), and is woken when another member gives bytes back.
    #[test]
    fn chains_wait_in_the_ring_for_pool_memory_and_the_pool_wakes_the_queue() {
        use crate::conn::budget::{Pool, Share, Waker, MIN_POOL};
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap(),
        );
        let guard = mem.memory();
        let ring = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
        // Unaligned data: every chain bounces.
        chains(&guard, &ring, 3, 512, false, |k| 0x20200 + k * 0x1000);
        let disk = MemDisk::new(1 << 20, false);
        guard
            .write_slice(&[0xee; 3], GuestAddress(0x30000))
            .unwrap();
        let pool = Pool::new(MIN_POOL);
        let mut hog = Share::new(pool.clone(), Waker(Arc::new(|| {})));
        assert!(hog.try_take(MIN_POOL));
        let dev = BlkDevice::new(
            disk.clone(),
            DeviceConfig {
                pool: Some(pool.clone()),
                ..config(1 << 20)
            },
            Arc::new(Activity::new(1)),
        );
        dev.update_memory(mem.clone()).unwrap();
        dev.authorize();
        let v = vring(
            &mem,
            ring.desc_table_addr().0,
            ring.avail_addr().0,
            ring.used_addr().0,
        );
        let q = dev.queue(0, &v);
        let mut wake = eventfd();
        q.set_poke(Some(wake.try_clone().unwrap()));
        let mut submit = |req: Request, done: Completion| disk.submit(0, req, done);
        q.serve(&mut submit);
        let used =
            |g: &GuestMemoryMmap| -> u16 { g.read_obj(ring.used_addr().unchecked_add(2)).unwrap() };
        assert_eq!(used(&guard), 0, "no chain served without pool memory");
        let status: u8 = guard.read_obj(GuestAddress(0x30000)).unwrap();
        assert_eq!(status, 0xee, "the first chain was not answered");
        hog.give_back(MIN_POOL);
        let mut count = [0u8; 8];
        assert_eq!(
            wake.read(&mut count).unwrap(),
            8,
            "bytes given back woke the queue"
        );
        q.serve(&mut submit);
        // Had the chains been consumed when refused, they would be lost: all three are served.
        assert_eq!(used(&guard), 3, "the wake-up served every chain");
        assert_eq!(pool.used(), 0, "the queue gave its bytes back");
        assert_eq!(pool.peak(), MIN_POOL, "never past the pool");
        let data = disk.data.lock().unwrap();
        for k in 0..3usize {
            assert!(data[k * 512..(k + 1) * 512]
                .iter()
                .all(|&b| b == k as u8 + 1));
        }
    }

    #[test]
    fn aligned_buffers_go_direct_and_misaligned_ones_bounce_with_the_same_data() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap(),
        );
        let guard = mem.memory();
        let disk = MemDisk::new(1 << 20, false);
        {
            let mut d = disk.data.lock().unwrap();
            for (i, b) in d.iter_mut().enumerate() {
                *b = (i / 512) as u8 ^ (i as u8);
            }
        }
        // Chain k's buffer: page-aligned for even k, 512 bytes off for odd k.
        let at = |k: u64| 0x40000 + k * 0x4000 + (k % 2) * 512;
        for direct in [true, false] {
            let ring = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
            chains(&guard, &ring, 4, 4096, true, at);
            let dev = BlkDevice::with_limits(
                disk.clone(),
                config(1 << 20),
                Arc::new(Activity::new(1)),
                BOUNCE_CAP,
                direct,
            );
            dev.update_memory(mem.clone()).unwrap();
            dev.authorize();
            let v = vring(
                &mem,
                ring.desc_table_addr().0,
                ring.avail_addr().0,
                ring.used_addr().0,
            );
            let q = dev.queue(0, &v);
            let mut kinds = Vec::new();
            let mut submit = |req: Request, done: Completion| {
                kinds.push(match &req {
                    Request::ReadInto { buf, .. } => buf.is_borrowed(),
                    _ => false,
                });
                disk.submit(0, req, done)
            };
            q.serve(&mut submit);
            let want_direct: Vec<bool> = (0..4).map(|k| direct && k % 2 == 0).collect();
            assert_eq!(
                kinds, want_direct,
                "direct={direct}: which chains went direct"
            );
            let d = disk.data.lock().unwrap();
            for k in 0..4u64 {
                let mut got = vec![0u8; 4096];
                guard.read_slice(&mut got, GuestAddress(at(k))).unwrap();
                let off = (8 * k * 512) as usize;
                assert!(got == d[off..off + 4096], "direct={direct}: chain {k} data");
                let status: u8 = guard.read_obj(GuestAddress(0x30000 + k)).unwrap();
                assert_eq!(status, 0, "chain {k} status");
            }
        }
    }

    /// A device not authorized pops nothing however often its queue is served (kicks,
    /// pokes); once authorized, the same queue serves what was posted meanwhile.
    #[test]
    fn a_device_serves_nothing_until_authorized() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap(),
        );
        let guard = mem.memory();
        let ring = MockSplitQueue::create(&*guard, GuestAddress(0), 16);
        chains(&guard, &ring, 2, 512, false, |k| 0x20000 + k * 0x1000);
        let disk = MemDisk::new(1 << 20, false);
        let dev = BlkDevice::new(disk.clone(), config(1 << 20), Arc::new(Activity::new(1)));
        dev.update_memory(mem.clone()).unwrap();
        let v = vring(
            &mem,
            ring.desc_table_addr().0,
            ring.avail_addr().0,
            ring.used_addr().0,
        );
        let q = dev.queue(0, &v);
        let submitted = std::cell::Cell::new(0);
        let mut submit = |req: Request, done: Completion| {
            submitted.set(submitted.get() + 1);
            disk.submit(0, req, done)
        };
        let used =
            |g: &GuestMemoryMmap| -> u16 { g.read_obj(ring.used_addr().unchecked_add(2)).unwrap() };
        for _ in 0..3 {
            q.serve(&mut submit);
        }
        assert_eq!(used(&guard), 0, "a chain was answered before authorization");
        assert_eq!(
            submitted.get(),
            0,
            "a request was submitted before authorization"
        );
        assert!(
            disk.data.lock().unwrap()[..1024].iter().all(|&b| b == 0xab),
            "a write landed before authorization"
        );
        dev.authorize();
        q.serve(&mut submit);
        assert_eq!(used(&guard), 2, "both chains served once authorized");
        assert_eq!(submitted.get(), 2);
        assert!(disk.data.lock().unwrap()[..512].iter().all(|&b| b == 1));
    }

    #[test]
    fn a_ring_outside_guest_memory_is_reported_not_fatal() {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
        );
        let disk = MemDisk::new(1 << 20, false);
        let dev = BlkDevice::new(disk.clone(), config(1 << 20), Arc::new(Activity::new(1)));
        dev.update_memory(mem.clone()).unwrap();
        dev.authorize();
        // The available ring's index is inside memory (and says 5 chains wait); its entries and
        // the descriptor table are not.
        let v = vring(&mem, 0x20000, 0xfffc, 0x30000);
        let q = dev.queue(0, &v);
        let mut submit = |req: Request, done: Completion| disk.submit(0, req, done);
        for event_idx in [false, true] {
            dev.set_event_idx(event_idx);
            q.serve(&mut submit);
        }
        assert!(
            dev.inner.ring_error_logged.load(Ordering::Relaxed),
            "reported"
        );
    }
}
