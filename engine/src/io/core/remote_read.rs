//! Reads of a remote (NBD) base from a core: the read is handed to the base's connection
//! thread ([`RemoteBase::read`]) and the core goes on; the bytes come back as a
//! `Msg::RemoteDone` on the core's channel and are copied into the request's buffer. The core
//! never waits on the network.

use std::sync::Arc;

use super::super::remote::{ReadDone, ReadResult};
use super::mailbox::Msg;
use super::shared_buf::SharedBuf;
use super::Core;
use crate::io::disk::state::DiskState;

/// A remote read in flight: where its bytes go.
pub(super) struct RemoteOp {
    task: usize,
    dest: SharedBuf,
    at: usize,
    len: usize,
}

impl Core {
    /// Reads `[offset, offset + len)` of the remote base into `dest[at..]`, in pieces of at
    /// most the server's maximum block. Returns how many pieces were issued.
    pub(super) fn issue_remote_read(
        &mut self,
        task: usize,
        disk: &DiskState,
        dest: &SharedBuf,
        at: usize,
        offset: u64,
        len: u64,
    ) -> usize {
        let Some(remote) = disk.base.as_ref().and_then(|b| b.remote()) else {
            self.internal(task, "internal error: remote run without a remote base");
            return 0;
        };
        let max = remote.max_read().max(1);
        let mut issued = 0;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            let op = self.remote_ops.insert(RemoteOp {
                task,
                dest: dest.clone(),
                at: at + done as usize,
                len: n as usize,
            });
            let shared = Arc::downgrade(&self.shared);
            let core = self.id;
            remote.read(
                core,
                offset + done,
                n,
                ReadDone::new(move |result| {
                    if let Some(s) = shared.upgrade() {
                        let _ = s.core(core).send(Msg::RemoteDone { op, result });
                    }
                }),
            );
            done += n;
            issued += 1;
        }
        issued
    }

    /// A remote read came back: copy its bytes (or fail the task) and step the task.
    pub(super) fn remote_done(&mut self, op: usize, result: ReadResult) {
        let Some(RemoteOp {
            task,
            dest,
            at,
            len,
        }) = self.remote_ops.try_remove(op)
        else {
            return;
        };
        match result {
            Ok(bytes) if bytes.len() == len => match dest.region_ptr(at, len) {
                Some(p) => {
                    // SAFETY: the region lies inside `dest` (checked) and no other op in
                    // flight covers it (the planned segments are disjoint); the source is a
                    // separate vector of exactly `len` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, len) };
                    if let Some(t) = self.tasks.get(task) {
                        t.disk().counters.base_read(len as u64);
                    }
                }
                None => self.internal(task, "internal error: remote read outside its buffer"),
            },
            Ok(_) => self.internal(task, "internal error: remote read of the wrong length"),
            Err(errno) => self.fail(task, errno, "read remote base"),
        }
        drop(dest);
        self.step(task);
    }
}
