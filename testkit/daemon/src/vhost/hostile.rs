//! A hand-written vhost-user frontend that misbehaves as a hostile guest or frontend would: it
//! writes its own descriptor table and rings in a sealed memfd shared with the daemon, and can
//! re-post heads that are in flight, change a descriptor while the daemon reads it, post chains
//! faster than they are answered, or hand the daemon a pipe as its call fd.
//!
//! Layout of the guest memory (one queue of [`RING`] entries): descriptor table at 0, avail ring
//! at [`AVAIL`], used ring at [`USED`], request headers at [`HDRS`] (16 bytes per head), status
//! bytes at [`STATUS`] (one per head), data from [`DATA`].

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const RING: u16 = 256;
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const HDRS: u64 = 0x10000;
pub const STATUS: u64 = 0x20000;
pub const DATA: u64 = 1 << 20;

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

/// virtio-blk request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_GET_ID: u32 = 8;

/// Feature bits.
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const EVENT_IDX: u64 = 1 << 29;

/// What the frontend hands the daemon as the queue's call fd.
pub enum Call {
    /// An eventfd (what a well-behaved frontend sends).
    EventFd,
    /// The write end of a pipe nobody reads, shrunk to one page (the read end is kept open).
    Pipe,
}

/// Guest memory: a memfd, sealed against shrinking, that both sides map shared.
pub struct Memory {
    pub mem: GuestMemoryMmap,
    file: File,
    pub size: u64,
}

impl Memory {
    pub fn new(size: u64) -> Memory {
        // SAFETY: a NUL-terminated name and valid flags; the fd returned (if any) is ours.
        let fd = unsafe {
            libc::memfd_create(
                c"addcow-hostile-guest".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).expect("size guest memory");
        // SAFETY: fcntl on an fd we own.
        let sealed = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(sealed, 0, "seal: {}", std::io::Error::last_os_error());
        let fo = FileOffset::new(file.try_clone().expect("dup"), 0);
        let mem =
            GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size as usize, Some(fo))])
                .expect("map guest memory");
        Memory { mem, file, size }
    }

    pub fn u16_at(&self, addr: u64) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).expect("read u16"))
    }

    pub fn avail_idx(&self) -> u16 {
        self.u16_at(AVAIL + 2)
    }

    pub fn used_idx(&self) -> u16 {
        self.u16_at(USED + 2)
    }

    /// Used entry `n`: (head, length).
    pub fn used(&self, n: u16) -> (u16, u32) {
        let at = USED + 4 + 8 * u64::from(n % RING);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (u32::from_le(id) as u16, u32::from_le(len))
    }

    pub fn status(&self, head: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUS + u64::from(head)))
            .expect("status")
    }

    /// Descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, GuestAddress(DESC + 16 * u64::from(i)))
            .unwrap();
    }

    /// Sets only the length of descriptor `i` (what a guest flipping it does).
    pub fn set_desc_len(&self, i: u16, len: u32) {
        self.mem
            .write_obj(len.to_le(), GuestAddress(DESC + 16 * u64::from(i) + 8))
            .unwrap();
    }

    /// The request header for head `head`: `kind` at `sector`.
    pub fn header(&self, head: u16, kind: u32, sector: u64) -> u64 {
        let at = HDRS + 16 * u64::from(head);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
        at
    }

    /// A GET_ID chain of two descriptors at `head`, `head + 1`: the header, then 20 bytes of
    /// ID and the status byte in one device-writable descriptor.
    pub fn get_id_chain(&self, head: u16) {
        let hdr = self.header(head, T_GET_ID, 0);
        let buf = DATA + 64 * u64::from(head);
        self.desc(head, hdr, 16, NEXT, head + 1);
        self.desc(head + 1, buf, 21, WRITE, 0);
    }

    /// A chain of three descriptors at `head..head + 3`: header (`kind` at `sector`), `len`
    /// bytes of data at `data` (device-readable for T_OUT, device-writable for the others:
    /// T_IN, T_GET_ID), status (set to 0xff until answered).
    pub fn data_chain(&self, head: u16, kind: u32, sector: u64, data: u64, len: u32) {
        let hdr = self.header(head, kind, sector);
        let dflags = if kind == T_OUT { NEXT } else { NEXT | WRITE };
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + u64::from(head)))
            .unwrap();
        self.desc(head, hdr, 16, NEXT, head + 1);
        self.desc(head + 1, data, len, dflags, head + 2);
        self.desc(head + 2, STATUS + u64::from(head), 1, WRITE, 0);
    }

    /// Appends `heads` to the avail ring (whether or not they are in flight) and publishes the
    /// new index.
    pub fn post(&self, heads: &[u16]) {
        let mut idx = self.avail_idx();
        for &h in heads {
            let slot = AVAIL + 4 + 2 * u64::from(idx % RING);
            self.mem.write_obj(h.to_le(), GuestAddress(slot)).unwrap();
            idx = idx.wrapping_add(1);
        }
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }
}

/// Turns a failed step's error into a message naming the step.
fn step<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// One frontend connection with queue 0 running.
pub struct Hostile {
    pub fe: Frontend,
    pub kick: EventFd,
    /// The call fd handed over (kept open), and a pipe's read end if it is a pipe.
    _call: (OwnedFd, Option<OwnedFd>),
}

impl Hostile {
    /// Connects to `sock`, maps `mem`, starts queue 0 of [`RING`] entries at the avail index
    /// `mem` holds now, with `call` as its call fd and, if `event_idx`,
    /// VIRTIO_RING_F_EVENT_IDX.
    pub fn connect(sock: &Path, mem: &Memory, call: Call, event_idx: bool) -> Hostile {
        Self::connect_queue(sock, mem, call, event_idx, 0, mem.avail_idx())
    }

    /// [`Hostile::connect`] asking for `q + 1` queues and starting only queue `q`, at avail
    /// index `base` (where a frontend that reconnects after GET_VRING_BASE resumes).
    pub fn connect_queue(
        sock: &Path,
        mem: &Memory,
        call: Call,
        event_idx: bool,
        q: usize,
        base: u16,
    ) -> Hostile {
        Self::try_connect_queue(sock, mem, call, event_idx, q, base)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Hostile::connect`], with the step that failed (the daemon refused or closed the
    /// connection) as an error in place of a panic.
    pub fn try_connect(
        sock: &Path,
        mem: &Memory,
        call: Call,
        event_idx: bool,
    ) -> Result<Hostile, String> {
        Self::try_connect_queue(sock, mem, call, event_idx, 0, mem.avail_idx())
    }

    /// [`Hostile::connect_queue`], failing with the step that failed.
    pub fn try_connect_queue(
        sock: &Path,
        mem: &Memory,
        call: Call,
        event_idx: bool,
        q: usize,
        base: u16,
    ) -> Result<Hostile, String> {
        let mut fe = Frontend::connect(sock, q as u64 + 1).map_err(step("vhost-user connect"))?;
        fe.set_owner().map_err(step("SET_OWNER"))?;
        let offered = fe.get_features().map_err(step("GET_FEATURES"))?;
        let want = VERSION_1 | PROTOCOL_FEATURES | if event_idx { EVENT_IDX } else { 0 };
        if offered & want != want {
            return Err(format!("features offered: {offered:#x}"));
        }
        fe.set_features(want).map_err(step("SET_FEATURES"))?;
        let pf = fe
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        fe.set_protocol_features(pf & VhostUserProtocolFeatures::MQ)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        let host = mem
            .mem
            .get_host_address(GuestAddress(0))
            .expect("host address") as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.size,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        }])
        .map_err(step("SET_MEM_TABLE"))?;
        fe.set_vring_num(q, RING).map_err(step("SET_VRING_NUM"))?;
        fe.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: RING,
                queue_size: RING,
                flags: 0,
                desc_table_addr: host + DESC,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .map_err(step("SET_VRING_ADDR"))?;
        fe.set_vring_base(q, base).map_err(step("SET_VRING_BASE"))?;
        let (call_fd, keep): (OwnedFd, Option<OwnedFd>) = match call {
            Call::EventFd => {
                let e = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                // SAFETY: a dup of a live eventfd, owned by the new OwnedFd.
                (
                    unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) },
                    None,
                )
            }
            Call::Pipe => {
                let (r, w) = nix::unistd::pipe().expect("pipe");
                // SAFETY: fcntl on a pipe fd we own; one page is the least a pipe holds.
                unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
                (w, Some(r))
            }
        };
        // The vhost crate takes an EventFd; any fd goes over the socket as it is.
        // SAFETY: a dup of `call_fd` owned by the temporary EventFd, closed when it drops.
        let as_eventfd = unsafe { EventFd::from_raw_fd(libc::dup(call_fd.as_raw_fd())) };
        fe.set_vring_call(q, &as_eventfd)
            .map_err(step("SET_VRING_CALL"))?;
        drop(as_eventfd);
        let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        fe.set_vring_kick(q, &kick)
            .map_err(step("SET_VRING_KICK"))?;
        fe.set_vring_enable(q, true)
            .map_err(step("SET_VRING_ENABLE"))?;
        Ok(Hostile {
            fe,
            kick,
            _call: (call_fd, keep),
        })
    }

    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }
}
