//! POPULATE (copy-up, the engine half of `stream`): make the raw image hold a range without
//! changing what the disk reads.
//!
//! # Order (why a crash at any point leaves an allowed state)
//! 1. The request takes its whole range (widened to read-modify-write units) *exclusively* in
//!    the range lock. Writes that hold any of it finish first (their bits are set by then); writes
//!    that arrive later wait in the lock and go on after populate released it, so they win.
//! 2. Holding the lock, it reads the bitmap: that is the re-check that matters, as no write can
//!    set or need a bit of the range until the release. Units whose sectors are all set are
//!    left alone. A unit whose clear sectors all read as zeros from the base (past its end, or a
//!    hole of the base file found with `SEEK_DATA`/`SEEK_HOLE`) and which has no set sector is
//!    *punched*; every other unit with a clear sector is *copied*: its current content (raw image
//!    for set sectors, base or zeros for clear ones, the read path of `rw.rs`) is read into a
//!    buffer and written back whole. So set sectors get their own bytes back; clear ones get the
//!    bytes they already read as.
//! 3. Only when every write and punch completed are the bits set (and marked dirty), exactly
//!    as for a client write (`finish_write`): the group commit makes them durable after an
//!    fdatasync of the raw image. Before that commit a crash leaves clear bits over raw-image
//!    bytes nobody reads; after it, the bits cover durable bytes equal to what the base served.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::super::request::{req_err, Done, MAX_POPULATE};
use super::super::run::BaseRun;
use super::ops::OpKind;
use super::shared_buf::SharedBuf;
use super::tasks::{Held, PopulateTask, Task};
use super::{round_down, round_up, Core};
use crate::bitmap::SparseBitmap;
use crate::format::SECTOR_SIZE;
use crate::io::disk::range_lock::Ticket;
use crate::io::disk::state::{DiskState, Parked};
use crate::io::request::responder::Responder;
use crate::io::uring::buf;
use crate::sys::{next_data, next_hole};

/// What populate does with one run of units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Copy,
    Punch,
}

/// The units of a populate range, widened from the request.
pub(super) fn populate_units(size: u64, unit: u64, offset: u64, len: u64) -> (u64, u64) {
    let end = offset + len;
    (round_down(offset, unit), round_up(end, unit).min(size))
}

/// The byte ranges of `[offset, offset+len)` (clear sectors of the overlay) where the base
/// holds data that must be copied (everything else reads as zeros from the base). Errors of
/// `SEEK_DATA`/`SEEK_HOLE` count as data (copying is always correct).
fn base_data(disk: &DiskState, offset: u64, len: u64, out: &mut Vec<(u64, u64)>) {
    let Some(base) = disk.base.as_ref() else {
        return;
    };
    let in_base = (offset + len).min(base.size()).saturating_sub(offset);
    if in_base == 0 {
        return;
    }
    let mut runs = Vec::new();
    base.map(offset, in_base, &mut runs);
    let mut at = offset;
    for run in runs {
        match run {
            BaseRun::Zero { len } | BaseRun::Hole { len, .. } => at += len,
            BaseRun::Remote { len, .. } => {
                // The remote base's holes are zero runs already (`base:allocation` at open).
                out.push((at, len));
                at += len;
            }
            BaseRun::File {
                fd,
                offset: f_off,
                len,
                ..
            } => {
                // SAFETY: `fd` is the base layer's open file, which the disk keeps open for as
                // long as `disk` lives (the borrow ends with this arm). SEEK_DATA/SEEK_HOLE only
                // return an offset (the file position they move is not used by the engine's I/O).
                let file = unsafe { BorrowedFd::borrow_raw(fd) };
                let f_end = f_off + len;
                let mut pos = f_off;
                while pos < f_end {
                    let d = match next_data(file, pos) {
                        Ok(Some(d)) => d,
                        Ok(None) => break, // only a hole follows
                        Err(_) => pos,
                    };
                    if d >= f_end {
                        break;
                    }
                    let h = next_hole(file, d, f_end).unwrap_or(f_end).min(f_end);
                    let h = h.max(d + 1);
                    out.push((at + (d - f_off), h - d));
                    pos = h;
                }
                at += len;
            }
        }
    }
}

/// What a populate does, unit by unit: runs of units to copy or punch (neighbours with the same
/// action merged), and the bytes of clear sectors in each kind.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    runs: Vec<(Action, u64, u64)>,
    copied: u64,
    zeroed: u64,
}

/// Plans `[a_start, a_end)` (whole units of `unit` bytes, the last one possibly short) from the
/// bitmap and `data`, the sorted byte ranges where the base holds data under clear sectors.
/// A unit whose sectors are all set is skipped; a unit whose sectors are all clear and that
/// holds no base data is punched; every other unit (some base data, or set and clear sectors
/// mixed) is copied, so a punch never reaches a set sector.
fn plan(bits: &SparseBitmap, unit: u64, a_start: u64, a_end: u64, data: &[(u64, u64)]) -> Plan {
    let mut out = Plan {
        runs: Vec::new(),
        copied: 0,
        zeroed: 0,
    };
    let mut di = 0;
    let mut pos = a_start;
    while pos < a_end {
        let u_end = (pos + unit).min(a_end);
        let (us, ue) = (pos / SECTOR_SIZE, u_end.div_ceil(SECTOR_SIZE));
        let (first_set, n) = bits.run_from(us, ue - us);
        let uniform = n >= ue - us;
        if first_set && uniform {
            pos = u_end;
            continue;
        }
        let mut clear = 0;
        let mut t = us;
        while t < ue {
            let (set, n) = bits.run_from(t, ue - t);
            if n == 0 {
                break;
            }
            if !set {
                clear += n;
            }
            t += n;
        }
        while di < data.len() && data[di].0 + data[di].1 <= pos {
            di += 1;
        }
        let has_data = di < data.len() && data[di].0 < u_end;
        let action = if uniform && !has_data {
            out.zeroed += clear * SECTOR_SIZE;
            Action::Punch
        } else {
            out.copied += clear * SECTOR_SIZE;
            Action::Copy
        };
        match out.runs.last_mut() {
            Some((a, _, end)) if *a == action && *end == pos => *end = u_end,
            _ => out.runs.push((action, pos, u_end)),
        }
        pos = u_end;
    }
    out
}

impl Core {
    /// Validates a POPULATE and parks it in the range lock for its whole range, exclusively.
    pub(super) fn submit_populate(
        &mut self,
        disk: Arc<DiskState>,
        offset: u64,
        len: u64,
        done: Responder,
    ) {
        if disk.read_only {
            done.answer(Err(req_err(
                libc::EPERM,
                "populate a read-only disk",
                offset,
            )));
            return;
        }
        if offset.checked_add(len).map_or(true, |e| e > disk.size) {
            done.answer(Err(req_err(libc::EINVAL, "populate past the end", offset)));
            return;
        }
        if len > MAX_POPULATE {
            done.answer(Err(req_err(
                libc::EINVAL,
                "populate larger than MAX_POPULATE",
                offset,
            )));
            return;
        }
        if len == 0 {
            done.answer(Ok(Done::Populated {
                copied: 0,
                zeroed: 0,
            }));
            return;
        }
        let (a, b) = populate_units(disk.size, disk.unit, offset, len);
        let ticket = Ticket::new(a, b, &[(a, b)]);
        let req = super::super::request::Request::Populate { offset, len };
        self.lock_and_start(disk, ticket, Parked { req, done });
    }

    /// The range lock is held: plan the units (see the module docs) and start reads and punches.
    pub(super) fn start_populate(
        &mut self,
        disk: Arc<DiskState>,
        ticket: Ticket,
        offset: u64,
        len: u64,
        done: Responder,
    ) {
        let unit = disk.unit;
        let (a_start, a_end) = populate_units(disk.size, unit, offset, len);
        // Where the base has data, over the clear sectors of the range.
        let mut data = Vec::new();
        let mut s = a_start / SECTOR_SIZE;
        let s_end = a_end.div_ceil(SECTOR_SIZE);
        while s < s_end {
            let (set, n) = disk.bitmap.run_from(s, s_end - s);
            if n == 0 {
                break;
            }
            if !set {
                base_data(&disk, s * SECTOR_SIZE, n * SECTOR_SIZE, &mut data);
            }
            s += n;
        }
        let Plan {
            runs,
            copied,
            zeroed,
        } = plan(&disk.bitmap, unit, a_start, a_end, &data);
        let copies: Vec<(SharedBuf, u64)> = runs
            .iter()
            .filter(|r| r.0 == Action::Copy)
            .map(|&(_, a, b)| {
                let buf = buf::alloc(self.shared.arena.as_ref(), (b - a) as usize, false);
                (SharedBuf::new(buf), a)
            })
            .collect();
        let key = self.tasks.insert(Task::Populate(PopulateTask {
            disk: Arc::clone(&disk),
            offset,
            locked: Held::new(Arc::clone(&disk), ticket),
            pending: 0,
            filling: !copies.is_empty(),
            err: None,
            copies: copies.clone(),
            runs: runs.iter().map(|&(_, a, b)| (a, b)).collect(),
            copied,
            zeroed,
            done,
        }));
        let mut n = 0;
        for (buf, off) in copies {
            let len = buf.len() as u64;
            n += self.issue_read(key, &disk, &buf, 0, off, len);
        }
        let file = self.image_file(&disk);
        for &(action, a, b) in &runs {
            if action == Action::Punch {
                n += self.issue(
                    key,
                    OpKind::Punch {
                        file,
                        off: a,
                        len: b - a,
                    },
                );
            }
        }
        self.add_pending(key, n);
    }

    /// The copied units' current bytes are in: write them back to the raw image.
    pub(super) fn populate_fills_done(&mut self, key: usize) {
        let Some(Task::Populate(p)) = self.tasks.get_mut(key) else {
            return;
        };
        p.filling = false;
        let disk = Arc::clone(&p.disk);
        let copies = std::mem::take(&mut p.copies);
        #[cfg(feature = "unsafe-populate-bits-first")]
        for &(a, b) in &p.runs {
            // Deliberately broken (test-only): bits before the data they cover is written.
            disk.set_bits(a / SECTOR_SIZE, b.div_ceil(SECTOR_SIZE));
        }
        let mut n = 0;
        for (buf, off) in copies {
            let len = buf.len() as u64;
            n += self.issue_image_writes(key, &disk, &buf, 0, off, len);
        }
        self.add_pending(key, n);
    }

    /// Every write and punch completed (or one failed): set the bits, release the range, answer.
    pub(super) fn finish_populate(&mut self, t: PopulateTask) {
        let PopulateTask {
            disk,
            locked,
            err,
            runs,
            copied,
            zeroed,
            done,
            ..
        } = t;
        if err.is_none() {
            // DESIGN invariant 2: bits only after the data writes (and punches) completed.
            for (a, b) in runs {
                disk.set_bits(a / SECTOR_SIZE, b.div_ceil(SECTOR_SIZE));
            }
            self.arm_bg(&disk);
        }
        let mut resume = Vec::new();
        locked.release(&mut resume);
        for (ticket, parked) in resume {
            self.lock_and_start(Arc::clone(&disk), ticket, parked);
        }
        done.answer(match err {
            Some(e) => Err(e),
            None => Ok(Done::Populated { copied, zeroed }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_punch_never_reaches_a_set_sector() {
        // 4 units of 4096 bytes (8 sectors each); base data only in unit 2.
        let bits = SparseBitmap::new(32);
        bits.set_range(3, 1); // unit 0: one set sector, no base data -> copied, not punched
        bits.set_range(8, 8); // unit 1: all set -> skipped
        let p = plan(&bits, 4096, 0, 4 * 4096, &[(2 * 4096 + 100, 10)]);
        assert_eq!(
            p.runs,
            vec![
                (Action::Copy, 0, 4096),
                (Action::Copy, 2 * 4096, 3 * 4096),
                (Action::Punch, 3 * 4096, 4 * 4096),
            ]
        );
        assert_eq!(p.copied, (7 + 8) * 512, "clear sectors of copied units");
        assert_eq!(p.zeroed, 8 * 512);
        // Everything set: nothing to do.
        let full = SparseBitmap::new(32);
        full.set_range(0, 32);
        assert!(plan(&full, 4096, 0, 4 * 4096, &[]).runs.is_empty());
        // A short last unit, all clear, no base: punched whole.
        let p = plan(&SparseBitmap::new(9), 4096, 4096, 4608, &[]);
        assert_eq!(p.runs, vec![(Action::Punch, 4096, 4608)]);
        assert_eq!(p.zeroed, 512);
    }

    #[test]
    fn populate_widens_to_units_within_the_disk() {
        assert_eq!(populate_units(1 << 20, 4096, 512, 512), (0, 4096));
        assert_eq!(
            populate_units(4096 * 3 + 512, 4096, 4096 * 3, 512),
            (4096 * 3, 4096 * 3 + 512)
        );
        assert_eq!(populate_units(1 << 20, 512, 512, 1024), (512, 1536));
    }
}
