//! Per-disk counters of what the engine did for a disk (commits, bits set, base bytes read).
//!
//! Counters are relaxed atomics bumped where the work completes; [`Disk::stats`] reads a
//! consistent-enough snapshot (each counter on its own; no lock on the request path).
//!
//! [`Disk::stats`]: crate::io::Disk::stats

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of one disk's engine counters since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskStats {
    /// Group commits that completed successfully.
    pub commits: u64,
    /// Group commits that failed (their waiters got the error).
    pub commits_failed: u64,
    /// FLUSH and FUA requests answered by a commit (successful or not). `commit_waiters /
    /// (commits + commits_failed)` is the average batch a commit served.
    pub commit_waiters: u64,
    /// Bitmap bytes written to the metadata file by commits.
    pub commit_bytes: u64,
    /// Commits that needed no sync at all (nothing written since the last durable point):
    /// their FLUSH/FUA waiters were answered at once. Not counted in `commits`.
    pub commits_skipped: u64,
    /// Sectors whose bit went from clear to set (bits set in memory, durable at the next commit).
    pub bits_set: u64,
    /// Bytes read from the base for clear sectors.
    pub base_bytes_read: u64,
    /// Extent-ahead fallocates of the raw image that succeeded.
    pub extents_allocated: u64,
}

impl DiskStats {
    /// The average number of FLUSH/FUA requests one commit answered (0 when none ran).
    pub fn average_commit_batch(&self) -> f64 {
        let commits = self.commits + self.commits_failed;
        if commits == 0 {
            0.0
        } else {
            self.commit_waiters as f64 / commits as f64
        }
    }
}

/// The live counters behind [`DiskStats`].
#[derive(Debug, Default)]
pub(crate) struct DiskCounters {
    commits: AtomicU64,
    commits_failed: AtomicU64,
    commit_waiters: AtomicU64,
    commit_bytes: AtomicU64,
    commits_skipped: AtomicU64,
    bits_set: AtomicU64,
    base_bytes_read: AtomicU64,
    extents_allocated: AtomicU64,
}

impl DiskCounters {
    /// A commit finished: `ok` or not, answering `waiters`, having written `bytes` of bitmap.
    pub(crate) fn commit_done(&self, ok: bool, waiters: usize, bytes: u64) {
        if ok {
            self.commits.fetch_add(1, Ordering::Relaxed);
            self.commit_bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.commits_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.commit_waiters
            .fetch_add(waiters as u64, Ordering::Relaxed);
    }

    /// A commit was answered without a sync: nothing was written since the last durable point.
    pub(crate) fn commit_skipped(&self) {
        self.commits_skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` bits went from clear to set.
    pub(crate) fn bits_set(&self, n: u64) {
        if n > 0 {
            self.bits_set.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// An extent-ahead fallocate succeeded.
    pub(crate) fn extent_allocated(&self) {
        self.extents_allocated.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` bytes were read from the base.
    pub(crate) fn base_read(&self, n: u64) {
        self.base_bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    /// The current values.
    pub(crate) fn snapshot(&self) -> DiskStats {
        DiskStats {
            commits: self.commits.load(Ordering::Relaxed),
            commits_failed: self.commits_failed.load(Ordering::Relaxed),
            commit_waiters: self.commit_waiters.load(Ordering::Relaxed),
            commit_bytes: self.commit_bytes.load(Ordering::Relaxed),
            commits_skipped: self.commits_skipped.load(Ordering::Relaxed),
            bits_set: self.bits_set.load(Ordering::Relaxed),
            base_bytes_read: self.base_bytes_read.load(Ordering::Relaxed),
            extents_allocated: self.extents_allocated.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_average_counts_failed_commits_too() {
        let c = DiskCounters::default();
        assert_eq!(c.snapshot().average_commit_batch(), 0.0);
        c.commit_done(true, 3, 4096);
        c.commit_done(false, 1, 0);
        let s = c.snapshot();
        assert_eq!((s.commits, s.commits_failed, s.commit_waiters), (1, 1, 4));
        assert_eq!(s.commit_bytes, 4096);
        assert_eq!(s.average_commit_batch(), 2.0);
    }
}
