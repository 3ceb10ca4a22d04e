//! The per-request state a core keeps in its `tasks` slab until the request is answered.

use std::collections::VecDeque;
use std::sync::Arc;

use super::super::request::{req_err, RequestError};
use super::ops::CoreOp;
use super::shared_buf::SharedBuf;
use crate::io::disk::fleece::Fleece;
use crate::io::disk::range_lock::Ticket;
use crate::io::disk::state::{DiskState, Parked, Waiter};
use crate::io::request::responder::Responder;

pub(super) struct ReadTask {
    pub(super) disk: Arc<DiskState>,
    pub(super) buf: SharedBuf,
    /// The caller's buffer (`ReadInto`, answered `Done::Filled`), else the engine's (`Read`).
    pub(super) into: bool,
    pub(super) offset: u64,
    /// Copy-on-read: the range to populate once the read succeeded (it read from the base).
    pub(super) copy_up: Option<u64>,
    pub(super) pending: usize,
    pub(super) err: Option<RequestError>,
    pub(super) done: Responder,
}

/// The bytes a write-like task changes inside one read-modify-write buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Patch {
    /// Copy `len` bytes of the client payload, from its byte `from`, to byte `at` of the buffer.
    Data { at: usize, from: usize, len: usize },
    /// Zero `[from, to)` of the buffer.
    Zero { from: usize, to: usize },
}

/// A read-modify-write buffer: whole units at `file_off`, filled from the disk, patched, written.
pub(super) struct Edge {
    pub(super) buf: SharedBuf,
    pub(super) file_off: u64,
    pub(super) patch: Patch,
}

pub(super) struct WriteTask {
    pub(super) disk: Arc<DiskState>,
    pub(super) offset: u64,
    /// Sectors `[start, end)` the task writes whole; their bits are set when it succeeds.
    pub(super) sectors: (u64, u64),
    /// What the task holds of the disk's range lock.
    pub(super) locked: Held,
    pub(super) pending: usize,
    /// Still reading old bytes into `edges` (read-modify-write); writes of edges come after.
    pub(super) filling: bool,
    pub(super) err: Option<RequestError>,
    /// The client's payload (WRITE), handed back when answered.
    pub(super) data: Option<SharedBuf>,
    pub(super) edges: Vec<Edge>,
    pub(super) fua: bool,
    pub(super) done: Responder,
}

/// What a write holds of its disk's range lock. Released by [`Held::release`] when the write
/// finishes; a write dropped unfinished (its core panicked) releases it on drop, so no other
/// write waits forever, and fails the requests that release would have let go on (they have no
/// core to run on here; their responders answer).
pub(super) struct Held {
    disk: Arc<DiskState>,
    ticket: Ticket,
}

impl Held {
    pub(super) fn new(disk: Arc<DiskState>, ticket: Ticket) -> Held {
        Held { disk, ticket }
    }

    /// Releases the hold; the requests it grants a stripe to go into `resume`.
    pub(super) fn release(mut self, resume: &mut Vec<(Ticket, Parked)>) {
        let ticket = std::mem::take(&mut self.ticket);
        self.disk.locks.release(&ticket, resume);
    }

    /// The ticket, still held, handed on to whoever goes on with the request (no release).
    pub(super) fn into_ticket(mut self) -> Ticket {
        std::mem::take(&mut self.ticket)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut resume = Vec::new();
        self.disk.locks.release(&self.ticket, &mut resume);
        while let Some((granted, parked)) = resume.pop() {
            self.disk.locks.release(&granted, &mut resume);
            drop(parked);
        }
    }
}

pub(super) struct CommitTask {
    pub(super) disk: Arc<DiskState>,
    pub(super) waiters: Vec<Waiter>,
    /// The dirty blocks this commit took (re-marked if it fails).
    pub(super) blocks: Vec<u64>,
    /// Linked chains not yet pushed: each goes in when the one before it completed.
    pub(super) chains: VecDeque<Vec<CoreOp>>,
    pub(super) pending: usize,
    /// Bitmap bytes this commit writes.
    pub(super) bytes: u64,
    pub(super) err: Option<RequestError>,
}

/// A POPULATE holding its range exclusively (see `populate.rs`).
pub(super) struct PopulateTask {
    pub(super) disk: Arc<DiskState>,
    pub(super) offset: u64,
    pub(super) locked: Held,
    pub(super) pending: usize,
    /// Still reading the copied units' current bytes; their writes come after.
    pub(super) filling: bool,
    pub(super) err: Option<RequestError>,
    /// Buffers of the copied units and where they go in the raw image.
    pub(super) copies: Vec<(SharedBuf, u64)>,
    /// Byte ranges (whole units) copied or punched: their bits are set when it succeeds.
    pub(super) runs: Vec<(u64, u64)>,
    pub(super) copied: u64,
    pub(super) zeroed: u64,
    pub(super) done: Responder,
}

/// Work of a disk's point-in-time view (see `fleece.rs`).
pub(super) struct FleeceTask {
    pub(super) disk: Arc<DiskState>,
    pub(super) fleece: Arc<Fleece>,
    pub(super) offset: u64,
    pub(super) pending: usize,
    pub(super) err: Option<RequestError>,
    pub(super) job: FleeceJob,
}

pub(super) enum FleeceJob {
    /// Copy-before-write of the chunks a write is about to change, holding them exclusively.
    Copy {
        /// The chunks' range lock (handed to the write when the copies are done).
        locked: Option<Held>,
        /// The write waiting for the copies.
        parked: Option<Parked>,
        /// Chunks still to look at (copied a batch at a time).
        todo: std::ops::Range<u64>,
        /// The batch being copied: its buffers and chunks.
        batch: Vec<(SharedBuf, u64)>,
        /// The batch's reads are done; its scratch writes are in flight.
        writing: bool,
    },
    /// A read of the frozen view.
    Read {
        buf: SharedBuf,
        into: bool,
        /// Pieces read from the live disk, (chunk, at in buf, offset, len): re-read from the
        /// scratch if their chunk was copied meanwhile.
        live: Vec<(u64, usize, u64, u64)>,
        checked: bool,
        done: Responder,
    },
}

pub(super) enum Task {
    Read(ReadTask),
    Write(WriteTask),
    Commit(CommitTask),
    Populate(PopulateTask),
    Fleece(FleeceTask),
}

impl Task {
    pub(super) fn disk(&self) -> &Arc<DiskState> {
        match self {
            Task::Read(t) => &t.disk,
            Task::Write(t) => &t.disk,
            Task::Commit(t) => &t.disk,
            Task::Populate(t) => &t.disk,
            Task::Fleece(t) => &t.disk,
        }
    }

    /// The request's offset (0 for a commit, which has none).
    pub(super) fn offset(&self) -> u64 {
        match self {
            Task::Read(t) => t.offset,
            Task::Write(t) => t.offset,
            Task::Commit(_) => 0,
            Task::Populate(t) => t.offset,
            Task::Fleece(t) => t.offset,
        }
    }

    pub(super) fn pending_mut(&mut self) -> &mut usize {
        match self {
            Task::Read(t) => &mut t.pending,
            Task::Write(t) => &mut t.pending,
            Task::Commit(t) => &mut t.pending,
            Task::Populate(t) => &mut t.pending,
            Task::Fleece(t) => &mut t.pending,
        }
    }

    /// Records the task's first error (later ones are consequences of it).
    pub(super) fn fail(&mut self, errno: i32, op: &'static str) {
        let (err, offset) = match self {
            Task::Read(t) => (&mut t.err, t.offset),
            Task::Write(t) => (&mut t.err, t.offset),
            Task::Commit(t) => (&mut t.err, 0),
            Task::Populate(t) => (&mut t.err, t.offset),
            Task::Fleece(t) => (&mut t.err, t.offset),
        };
        if err.is_none() {
            *err = Some(req_err(errno, op, offset));
        }
    }
}
