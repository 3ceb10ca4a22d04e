//! Exports: the named disks a daemon serves, and the [`Backend`] seam between the protocol and
//! the engine.
//!
//! The protocol layer talks to a `dyn Backend`; in the daemon that is an engine [`Disk`] (plus its
//! [`Engine`] for buffers). Tests of the protocol layer use an in-memory backend.

use std::sync::Arc;

use addcow_engine::{Completion, Disk, Engine, Extent, IoBuf, Request};

use super::wire;

/// What the protocol needs from a disk. Implementations are shared by every connection
/// (so a FLUSH on one connection covers writes answered on any other: multi-conn safe).
pub trait Backend: Send + Sync + 'static {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Submits `req` on core `core`; `done` runs once, when it finishes.
    fn submit(&self, core: usize, req: Request, done: Completion);
    /// Where the bytes of `[offset, offset+len)` come from (no I/O).
    fn allocation(&self, offset: u64, len: u64) -> Vec<Extent>;
    /// A buffer of `len` bytes to receive a WRITE payload into. Its contents are unspecified
    /// (stale bytes of an earlier request, not zeroed): the caller fills all of it, or drops it
    /// unsubmitted.
    fn alloc_buf(&self, len: usize) -> IoBuf;
}

/// An engine disk as a [`Backend`].
pub struct EngineDisk {
    /// The engine the disk is open on (for buffers).
    pub engine: Engine,
    /// The disk.
    pub disk: Disk,
}

impl Backend for EngineDisk {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_only(&self) -> bool {
        self.disk.read_only()
    }
    fn submit(&self, core: usize, req: Request, done: Completion) {
        self.disk.submit(core, req, done)
    }
    fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        self.disk.allocation(offset, len)
    }
    fn alloc_buf(&self, len: usize) -> IoBuf {
        // The reader overwrites the whole buffer with the payload (or drops it): zeroing it
        // first would be wasted memset.
        self.engine.alloc_buf_unzeroed(len)
    }
}

/// One export: a name clients ask for and the disk behind it.
#[derive(Clone)]
pub struct Export {
    /// The export name ("" = the default export).
    pub name: String,
    /// The disk.
    pub backend: Arc<dyn Backend>,
}

impl Export {
    /// Transmission flags for this export. `structured`: whether structured replies were
    /// negotiated (DF is only advertised then).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = wire::FLAG_HAS_FLAGS
            | wire::FLAG_SEND_FLUSH
            | wire::FLAG_SEND_FUA
            | wire::FLAG_CAN_MULTI_CONN
            | wire::FLAG_SEND_CACHE;
        if self.backend.read_only() {
            flags |= wire::FLAG_READ_ONLY;
        } else {
            flags |=
                wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES | wire::FLAG_SEND_FAST_ZERO;
        }
        if structured {
            flags |= wire::FLAG_SEND_DF;
        }
        flags
    }
}

/// The exports of a daemon, looked up by name.
#[derive(Clone, Default)]
pub struct Exports {
    list: Vec<Export>,
}

impl Exports {
    /// A table of `list` (names are unique; the caller checks).
    pub fn new(list: Vec<Export>) -> Self {
        Exports { list }
    }

    /// The export called `name`.
    pub fn find(&self, name: &str) -> Option<&Export> {
        self.list.iter().find(|e| e.name == name)
    }

    /// Every export, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.list.iter()
    }
}

/// An in-memory backend for the protocol layer's tests: a byte vector whose second half is
/// "unallocated past the base" (reads as zeros, reported as [`ExtentKind::Zero`]) until written.
#[cfg(test)]
pub mod memory {
    use std::sync::Mutex;

    use addcow_engine::{Done, ExtentKind, RequestError};

    use super::*;

    /// See the module docs.
    pub struct MemDisk {
        pub data: Mutex<Vec<u8>>,
        /// Per 512-byte sector: 0 zero, 1 image, 2 base.
        pub kinds: Mutex<Vec<u8>>,
        pub read_only: bool,
        pub flushes: std::sync::atomic::AtomicUsize,
    }

    impl MemDisk {
        /// `size` bytes; the first half "base" filled with 0xab, the second half zeros.
        pub fn new(size: usize, read_only: bool) -> Arc<MemDisk> {
            let mut data = vec![0u8; size];
            data[..size / 2].fill(0xab);
            let sectors = size.div_ceil(512);
            let kinds = (0..sectors)
                .map(|s| if s < sectors / 2 { 2 } else { 0 })
                .collect();
            Arc::new(MemDisk {
                data: Mutex::new(data),
                kinds: Mutex::new(kinds),
                read_only,
                flushes: Default::default(),
            })
        }

        fn mark(&self, offset: u64, len: u64) {
            let mut k = self.kinds.lock().unwrap();
            let first = (offset / 512) as usize;
            let end = (offset + len).div_ceil(512) as usize;
            for s in first..end.min(k.len()) {
                k[s] = 1;
            }
        }

        fn zero(&self, offset: u64, len: u64) {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            drop(d);
            self.mark(offset, len);
        }
    }

    impl Backend for MemDisk {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn submit(&self, _core: usize, req: Request, done: Completion) {
            let err = |offset| RequestError {
                errno: libc::EPERM,
                op: "write",
                offset,
            };
            let r = match req {
                Request::Read { offset, len } => {
                    let d = self.data.lock().unwrap();
                    let mut b = IoBuf::new_zeroed(len as usize);
                    b.copy_from_slice(&d[offset as usize..offset as usize + len as usize]);
                    Ok(Done::Read(b))
                }
                Request::Write { offset, data, .. } => {
                    if self.read_only {
                        Err(err(offset))
                    } else {
                        let mut d = self.data.lock().unwrap();
                        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                        drop(d);
                        self.mark(offset, data.len() as u64);
                        Ok(Done::Written(data))
                    }
                }
                Request::Flush => {
                    self.flushes
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(Done::Ok)
                }
                Request::WriteZeroes { offset, len, .. } | Request::Trim { offset, len, .. } => {
                    self.zero(offset, len);
                    Ok(Done::Ok)
                }
                Request::Cache { .. } => Ok(Done::Ok),
            };
            done(r)
        }
        fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
            let k = self.kinds.lock().unwrap();
            let size = self.data.lock().unwrap().len() as u64;
            let end = (offset + len).min(size);
            let mut out: Vec<Extent> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let kind = match k[(pos / 512) as usize] {
                    0 => ExtentKind::Zero,
                    1 => ExtentKind::Image,
                    _ => ExtentKind::Base,
                };
                let next = ((pos / 512 + 1) * 512).min(end);
                match out.last_mut() {
                    Some(last) if last.kind == kind => last.len += next - pos,
                    _ => out.push(Extent {
                        offset: pos,
                        len: next - pos,
                        kind,
                    }),
                }
                pos = next;
            }
            out
        }
        fn alloc_buf(&self, len: usize) -> IoBuf {
            IoBuf::new_zeroed(len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_read_only_and_structured() {
        let rw = Export {
            name: String::new(),
            backend: memory::MemDisk::new(4096, false),
        };
        let f = rw.transmission_flags(true);
        assert_eq!(f, 0x0ded);
        assert_eq!(rw.transmission_flags(false) & wire::FLAG_SEND_DF, 0);
        let ro = Export {
            name: "ro".into(),
            backend: memory::MemDisk::new(4096, true),
        };
        let f = ro.transmission_flags(true);
        assert_ne!(f & wire::FLAG_READ_ONLY, 0);
        assert_eq!(f & wire::FLAG_SEND_TRIM, 0);
        assert_eq!(f & wire::FLAG_SEND_WRITE_ZEROES, 0);
        let t = Exports::new(vec![rw, ro]);
        assert!(t.find("ro").is_some());
        assert!(t.find("x").is_none());
    }
}
