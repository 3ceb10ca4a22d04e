//! Test-only fault injection (feature `fault-injection`): rewrites what the kernel answers to
//! chosen ops, so the paths for a failed fdatasync, a failed bitmap write, a cancelled chain or a
//! short transfer run in tests on any machine.
//!
//! A [`FaultPlan`] (installed through `EngineConfig::faults`) holds [`FaultRule`]s. Each op a core
//! pushes is matched by the file it touches and its kind; a rule lets `skip` matching ops pass,
//! then fires on the next `times`. What firing does, faithful to what the kernel would do:
//! * [`FaultAction::Fail`]`(errno)`: the op is not run (a NOP goes in its place) and completes
//!   with `-errno`;
//! * [`FaultAction::Cancel`]: likewise with `-ECANCELED`, as if the chain had been cancelled;
//! * [`FaultAction::Short`]`(n)`: the op runs, but its result is cut to at most `n` bytes;
//! * [`FaultAction::Panic`]: the op runs, and the core panics when its completion arrives.
//!
//! In a linked chain, every op after one that failed, was cancelled or came back short is not
//! run either and completes with `-ECANCELED`, as the kernel does.
//!
//! A plan can also park a core at one point, as a core preempted there would be: one publication
//! of bits (`DiskState::set_bits`) between setting the bits and marking their blocks
//! ([`FaultPlan::park_next_publication`]), or one copy-on-read after it was admitted and before
//! it is submitted ([`FaultPlan::park_next_copy_up`]). The parked core waits until the test
//! releases it ([`FaultPlan::release_parked`]) or [`PARK_LIMIT`] passed.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue};

/// Which file of an overlay an op touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultFile {
    /// The raw image.
    Image,
    /// The `.add-cow` metadata file.
    Meta,
    /// The base.
    Base,
    /// The scratch file of a point-in-time view (copy-before-write).
    Scratch,
}

/// What kind of op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    /// fdatasync.
    Sync,
    /// Hole punch.
    Punch,
    /// Extent-ahead fallocate.
    Allocate,
}

/// What a firing rule does to its op (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Not run; completes with `-errno`.
    Fail(i32),
    /// Not run; completes with `-ECANCELED`.
    Cancel,
    /// Runs; its result is cut to at most this many bytes.
    Short(u32),
    /// Runs; the core panics at its completion.
    Panic,
}

/// Fires `action` on the matching ops after the first `skip`, `times` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    pub file: FaultFile,
    pub op: FaultOp,
    pub skip: u64,
    pub times: u64,
    pub action: FaultAction,
}

impl FaultRule {
    /// Fires once, on the first matching op.
    pub fn new(file: FaultFile, op: FaultOp, action: FaultAction) -> FaultRule {
        FaultRule {
            file,
            op,
            skip: 0,
            times: 1,
            action,
        }
    }

    /// Lets the first `n` matching ops pass.
    pub fn skip(mut self, n: u64) -> FaultRule {
        self.skip = n;
        self
    }

    /// Fires on `n` matching ops (`u64::MAX`: on every one).
    pub fn times(mut self, n: u64) -> FaultRule {
        self.times = n;
        self
    }
}

#[derive(Debug)]
struct RuleState {
    rule: FaultRule,
    seen: u64,
    fired: u64,
}

/// The longest a parked publication waits for its release: a test that failed before releasing
/// it does not leave its core blocked for good.
pub const PARK_LIMIT: Duration = Duration::from_secs(30);

/// Where a core can be parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParkPoint {
    /// A publication of bits whose range covers this sector, between set and mark.
    Publication(u64),
    /// A copy-on-read, admitted and not yet submitted.
    CopyUp,
    /// A read of a point-in-time view about to read an uncopied chunk from the live disk.
    ViewRead,
}

/// Where the parking is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Park {
    #[default]
    Off,
    /// The next core to reach this point parks.
    Armed(ParkPoint),
    /// A core is parked.
    Parked,
    /// Released (or timed out): nothing parks any more.
    Released,
}

/// The rules of one engine (see the module docs).
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<RuleState>>,
    park: Mutex<Park>,
    park_changed: Condvar,
}

impl FaultPlan {
    /// An empty plan.
    pub fn new() -> Arc<FaultPlan> {
        Arc::new(FaultPlan::default())
    }

    /// Adds a rule (rules are tried in the order added; the first that fires wins).
    pub fn add(&self, rule: FaultRule) {
        if let Ok(mut r) = self.rules.lock() {
            r.push(RuleState {
                rule,
                seen: 0,
                fired: 0,
            });
        }
    }

    /// Removes every rule.
    pub fn clear(&self) {
        if let Ok(mut r) = self.rules.lock() {
            r.clear();
        }
    }

    /// How many faults were injected so far.
    pub fn fired(&self) -> u64 {
        self.rules
            .lock()
            .map(|r| r.iter().map(|s| s.fired).sum())
            .unwrap_or(0)
    }

    /// The next publication of bits whose range covers `sector` stops after setting the bits and
    /// before marking their blocks, blocking its core, until [`FaultPlan::release_publication`].
    pub fn park_next_publication(&self, sector: u64) {
        self.set_park(Park::Armed(ParkPoint::Publication(sector)));
    }

    /// The next copy-on-read stops after it was admitted (counted as a request of its disk)
    /// and before its populate is submitted, blocking its core, until
    /// [`FaultPlan::release_parked`].
    pub fn park_next_copy_up(&self) {
        self.set_park(Park::Armed(ParkPoint::CopyUp));
    }

    /// The next read of a point-in-time view stops when it found a chunk uncopied and before
    /// it reads that chunk from the live disk, blocking its core, until
    /// [`FaultPlan::release_parked`].
    pub fn park_next_view_read(&self) {
        self.set_park(Park::Armed(ParkPoint::ViewRead));
    }

    /// Waits until a core is parked (`false` if none was within `timeout`).
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Ok(mut park) = self.park.lock() else {
            return false;
        };
        while *park != Park::Parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            park = match self.park_changed.wait_timeout(park, left) {
                Ok((p, _)) => p,
                Err(_) => return false,
            };
        }
        true
    }

    /// Lets the parked core (if any) go on; nothing parks after this.
    pub fn release_parked(&self) {
        self.set_park(Park::Released);
    }

    fn set_park(&self, to: Park) {
        if let Ok(mut park) = self.park.lock() {
            *park = to;
            self.park_changed.notify_all();
        }
    }

    /// Called by a core at `point` (for a publication: of sectors `[start, end)`, with the
    /// point's sector `start`): parks it if that point is armed.
    pub(crate) fn park_at(&self, point: ParkPoint, end: u64) {
        let Ok(mut park) = self.park.lock() else {
            return;
        };
        let armed = match (*park, point) {
            (Park::Armed(ParkPoint::Publication(s)), ParkPoint::Publication(start)) => {
                (start..end).contains(&s)
            }
            (Park::Armed(ParkPoint::CopyUp), ParkPoint::CopyUp) => true,
            (Park::Armed(ParkPoint::ViewRead), ParkPoint::ViewRead) => true,
            _ => false,
        };
        if !armed {
            return;
        }
        *park = Park::Parked;
        self.park_changed.notify_all();
        let deadline = Instant::now() + PARK_LIMIT;
        while *park == Park::Parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *park = Park::Released;
                break;
            }
            park = match self.park_changed.wait_timeout(park, left) {
                Ok((p, _)) => p,
                Err(_) => return,
            };
        }
    }

    /// The action for the next op on `file` of kind `op`, if a rule fires on it.
    pub(crate) fn decide(&self, file: FaultFile, op: FaultOp) -> Option<FaultAction> {
        let mut rules = self.rules.lock().ok()?;
        for s in rules.iter_mut() {
            if s.rule.file != file || s.rule.op != op {
                continue;
            }
            s.seen += 1;
            if s.seen > s.rule.skip && s.fired < s.rule.times {
                s.fired += 1;
                return Some(s.rule.action);
            }
        }
        None
    }
}

/// What injection did to one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injected {
    /// Replaced by a NOP that completes with this result.
    Result(i32),
    /// Runs; the result is cut to this many bytes.
    Short(u32),
    /// Runs; the core panics at its completion.
    Panic,
}

/// The NOP that replaces an op that must not run.
pub(crate) fn nop_entry(fault: Option<&Injected>) -> Option<squeue::Entry> {
    matches!(fault, Some(Injected::Result(_))).then(|| opcode::Nop::new().build())
}

/// The result the engine sees for an op whose kernel result was `res`.
pub(crate) fn rewrite(fault: Option<&Injected>, res: i32) -> i32 {
    match fault {
        None => res,
        Some(Injected::Result(r)) => *r,
        Some(Injected::Short(n)) => {
            if res > 0 {
                res.min(i32::try_from(*n).unwrap_or(i32::MAX))
            } else {
                res
            }
        }
        Some(Injected::Panic) => panic!("fault injection: panic at a completion"),
    }
}
