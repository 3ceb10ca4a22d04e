//! An in-memory backend for the protocol layer's tests: a byte vector whose second half is
//! "unallocated past the base" (reads as zeros, reported as [`ExtentKind::Zero`]) until written.

use std::sync::{Arc, Mutex};

use addcow_engine::{Completion, DataBuf, Done, Extent, ExtentKind, IoBuf, Request, RequestError};

use super::disk::Backend;

/// See the module docs.
pub struct MemDisk {
    pub data: Mutex<Vec<u8>>,
    /// Per 512-byte sector: 0 zero, 1 image, 2 base, 3 image zeroed (a hole in the image).
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

    fn mark(&self, offset: u64, len: u64, kind: u8) {
        let mut k = self.kinds.lock().unwrap();
        let first = (offset / 512) as usize;
        let end = (offset + len).div_ceil(512) as usize;
        for s in first..end.min(k.len()) {
            k[s] = kind;
        }
    }

    fn zero(&self, offset: u64, len: u64) {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        drop(d);
        // Whole sectors become holes of the image; partial ones are written zeros.
        let first = offset.div_ceil(512) * 512;
        let end = (offset + len) / 512 * 512;
        self.mark(offset, len, 1);
        if end > first {
            self.mark(first, end - first, 3);
        }
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
            Request::ReadInto { offset, buf } => {
                let d = self.data.lock().unwrap();
                let n = buf.len();
                let src = &d[offset as usize..offset as usize + n];
                let buf = match buf {
                    DataBuf::Owned(mut b) => {
                        b.copy_from_slice(src);
                        DataBuf::Owned(b)
                    }
                    DataBuf::Lent(mut b) => {
                        b.copy_from(0, src);
                        DataBuf::Lent(b)
                    }
                };
                Ok(Done::Filled(buf))
            }
            Request::Write { offset, data, .. } => {
                if self.read_only {
                    Err(err(offset))
                } else {
                    let mut d = self.data.lock().unwrap();
                    data.copy_to(0, &mut d[offset as usize..offset as usize + data.len()]);
                    drop(d);
                    self.mark(offset, data.len() as u64, 1);
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
            Request::Populate { .. } => Ok(Done::Populated {
                copied: 0,
                zeroed: 0,
            }),
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
                1 | 3 => ExtentKind::Image,
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
    fn zero_ranges(&self, layer: ExtentKind, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        if layer != ExtentKind::Image {
            return;
        }
        let k = self.kinds.lock().unwrap();
        let mut s = start / 512;
        while s * 512 < end && (s as usize) < k.len() {
            if k[s as usize] == 3 {
                let a = (s * 512).max(start);
                let mut e = s;
                while (e as usize) < k.len() && k[e as usize] == 3 && e * 512 < end {
                    e += 1;
                }
                out.push((a, (e * 512).min(end)));
                s = e;
            } else {
                s += 1;
            }
        }
    }
}
