//! The per-request state a core keeps in its `tasks` slab until the request is answered.

use std::sync::Arc;

use super::super::buf::IoBuf;
use super::super::commit::Waiter;
use super::super::disk::DiskShared;
use super::super::{Completion, RequestError};

pub(super) struct ReadTask {
    pub(super) disk: Arc<DiskShared>,
    pub(super) buf: IoBuf,
    pub(super) offset: u64,
    pub(super) pending: usize,
    pub(super) err: Option<RequestError>,
    pub(super) done: Completion,
}

/// The bytes a write-like task changes inside one read-modify-write buffer.
pub(super) enum Patch {
    /// Copy the whole client payload to this offset of the buffer.
    Data { at: usize },
    /// Zero `[from, to)` of the buffer.
    Zero { from: usize, to: usize },
}

/// A read-modify-write buffer: whole units at `file_off`, filled from the disk, patched, written.
pub(super) struct Edge {
    pub(super) buf: IoBuf,
    pub(super) file_off: u64,
    pub(super) patch: Patch,
}

pub(super) struct WriteTask {
    pub(super) disk: Arc<DiskShared>,
    pub(super) offset: u64,
    /// Locked sectors `[start, end)`; their bits are set when the task succeeds.
    pub(super) lock: (u64, u64),
    pub(super) pending: usize,
    /// Still reading old bytes into `edges` (read-modify-write); writes of edges come after.
    pub(super) filling: bool,
    pub(super) err: Option<RequestError>,
    pub(super) data: Option<IoBuf>,
    pub(super) edges: Vec<Edge>,
    pub(super) fua: bool,
    pub(super) done: Completion,
}

impl WriteTask {
    /// A write-like task over the locked sectors `lock`, with nothing in flight yet. It starts
    /// by filling its `edges` (read-modify-write) when it has any.
    pub(super) fn new(
        disk: Arc<DiskShared>,
        offset: u64,
        lock: (u64, u64),
        data: Option<IoBuf>,
        edges: Vec<Edge>,
        fua: bool,
        done: Completion,
    ) -> WriteTask {
        WriteTask {
            disk,
            offset,
            lock,
            pending: 0,
            filling: !edges.is_empty(),
            err: None,
            data,
            edges,
            fua,
            done,
        }
    }
}

pub(super) struct CommitTask {
    pub(super) disk: Arc<DiskShared>,
    pub(super) waiters: Vec<Waiter>,
    pub(super) blocks: Vec<u64>,
    pub(super) bufs: Vec<IoBuf>,
    pub(super) pending: usize,
    pub(super) writes_left: usize,
    pub(super) image_sync: u64,
    pub(super) meta_sync: u64,
    pub(super) err: Option<RequestError>,
}

pub(super) enum Task {
    Read(ReadTask),
    Write(WriteTask),
    Commit(CommitTask),
}

impl Task {
    pub(super) fn disk(&self) -> &Arc<DiskShared> {
        match self {
            Task::Read(t) => &t.disk,
            Task::Write(t) => &t.disk,
            Task::Commit(t) => &t.disk,
        }
    }

    pub(super) fn pending_mut(&mut self) -> &mut usize {
        match self {
            Task::Read(t) => &mut t.pending,
            Task::Write(t) => &mut t.pending,
            Task::Commit(t) => &mut t.pending,
        }
    }

    pub(super) fn fail(&mut self, errno: i32, op: &'static str) {
        let (err, offset) = match self {
            Task::Read(t) => (&mut t.err, t.offset),
            Task::Write(t) => (&mut t.err, t.offset),
            Task::Commit(t) => (&mut t.err, 0),
        };
        if err.is_none() {
            *err = Some(RequestError { errno, op, offset });
        }
    }
}

pub(super) fn req_err(errno: i32, op: &'static str, offset: u64) -> RequestError {
    RequestError { errno, op, offset }
}
