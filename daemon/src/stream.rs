//! The stream loop: walks an open overlay's clear sectors and populates them through the engine
//! (`Request::Populate`, a few chunks in flight on the engine's cores), throttled to a rate, until
//! the overlay is complete or its controller says stop. Shared by the offline `addcow stream`
//! and the control socket's stream job.
//!
//! Crash safety is the engine's (see `engine/src/io/core/populate.rs`): a populate sets bits only
//! after its data is written and the group commit makes them durable after an fdatasync of the
//! raw image, so stopping (or dying) at any point leaves a valid overlay that reads the same, and
//! a later stream continues from the bits. The loop itself never waits on anything but its
//! own requests: it runs on a thread of its own, never on a core or connection thread.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use addcow_engine::{Disk, Done, Request, RequestError};

/// Bytes per populate request.
pub const CHUNK: u64 = 1 << 20;
/// Populate requests in flight at once.
const WINDOW: usize = 4;
/// Longest time between two counts of the bitmap for progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// What drives a stream from outside: pause, stop, rate, progress.
pub trait StreamControl {
    /// Called before each chunk: blocks while paused; `false` stops the stream (the chunks in
    /// flight finish first).
    fn proceed(&self) -> bool;
    /// The rate limit in bytes per second, if any (asked before each chunk, so it may change).
    fn rate(&self) -> Option<u64>;
    /// Progress: of the `total` bytes clear at the start, how many are no longer clear
    /// (populated by the stream, or written by clients meanwhile). Never goes back.
    fn progress(&self, done: u64, total: u64);
    /// Whether a pause (or stop) is coming: no new chunk is issued until the ones in flight
    /// are answered, so that [`StreamControl::proceed`] blocks with nothing in flight and the
    /// progress stands still while paused.
    fn wants_pause(&self) -> bool {
        false
    }
}

/// What a stream did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamStats {
    /// Bytes of clear sectors at the start (what a full stream handles).
    pub total: u64,
    /// Bytes copied from the base into the raw image.
    pub copied: u64,
    /// Bytes made to read as zeros in the raw image (the base reads zeros there).
    pub zeroed: u64,
    /// Whether the controller stopped it before the end.
    pub stopped: bool,
    /// Wall time.
    #[serde(skip)]
    pub elapsed: Duration,
}

impl StreamStats {
    /// Bytes of clear sectors handled.
    pub fn done(&self) -> u64 {
        self.copied + self.zeroed
    }
}

/// Why a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A populate or the final flush failed.
    #[error("stream of {path}: {err}")]
    Request {
        path: String,
        #[source]
        err: RequestError,
    },
}

/// Paces submissions to a byte rate (no burst larger than one second's worth after a pause).
struct Pacer {
    next: Instant,
}

impl Pacer {
    /// Waits until `bytes` more may be issued; false (nothing counted) when a pause or stop
    /// came meanwhile: the caller then drains and goes through [`StreamControl::proceed`].
    fn wait(&mut self, bytes: u64, rate: Option<u64>, ctl: &dyn StreamControl) -> bool {
        let Some(rate) = rate.filter(|&r| r > 0) else {
            self.next = Instant::now();
            return true;
        };
        let now = Instant::now();
        if self.next + Duration::from_secs(1) < now {
            self.next = now;
        }
        loop {
            let now = Instant::now();
            if now >= self.next {
                break;
            }
            if ctl.wants_pause() {
                return false;
            }
            std::thread::sleep((self.next - now).min(Duration::from_millis(20)));
        }
        self.next += Duration::from_secs_f64(bytes as f64 / rate as f64);
        true
    }
}

/// Streams `disk` (see the module docs) and flushes at the end, also when stopped: what was
/// populated is durable when this returns `Ok`.
pub fn stream(disk: &Disk, ctl: &dyn StreamControl) -> Result<StreamStats, StreamError> {
    let started = Instant::now();
    let mut stats = StreamStats {
        total: disk.size() - disk.allocated_bytes(),
        ..StreamStats::default()
    };
    let fail = |err| StreamError::Request {
        path: disk.path().display().to_string(),
        err,
    };
    ctl.progress(0, stats.total);
    let (tx, rx) = mpsc::channel::<Result<Done, RequestError>>();
    let mut pacer = Pacer {
        next: Instant::now(),
    };
    let (mut at, mut inflight, mut core) = (0u64, 0usize, 0usize);
    let mut walking = true;
    let mut first_err = None;
    let (mut progress, mut last_count) = (0u64, Instant::now());
    loop {
        // Set when a pause or stop is coming: issue nothing until what is in flight is back.
        let mut draining = false;
        while walking && inflight < WINDOW && first_err.is_none() {
            if inflight > 0 && ctl.wants_pause() {
                draining = true;
                break;
            }
            if !ctl.proceed() {
                stats.stopped = true;
                walking = false;
                break;
            }
            let Some((offset, len)) = disk.next_clear(at, CHUNK) else {
                walking = false;
                break;
            };
            if !pacer.wait(len, ctl.rate(), ctl) {
                draining = true;
                break;
            }
            let tx = tx.clone();
            disk.submit(
                core,
                Request::Populate { offset, len },
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            core = core.wrapping_add(1);
            inflight += 1;
            at = offset + len;
        }
        if inflight == 0 {
            if draining && walking && first_err.is_none() {
                continue; // on to proceed(): it blocks while paused, or says stop
            }
            break;
        }
        let r = rx.recv().unwrap_or(Err(RequestError {
            errno: libc::ESHUTDOWN,
            op: "engine dropped a populate",
            offset: 0,
        }));
        inflight -= 1;
        match r {
            Ok(Done::Populated { copied, zeroed }) => {
                stats.copied += copied;
                stats.zeroed += zeroed;
                // Writes of clients count too (they fill clear sectors); the bitmap is counted
                // at most every PROGRESS_EVERY.
                if last_count.elapsed() >= PROGRESS_EVERY {
                    last_count = Instant::now();
                    let clear = disk.size() - disk.allocated_bytes();
                    progress = progress.max(stats.total.saturating_sub(clear));
                }
                progress = progress.max(stats.done()).min(stats.total);
                ctl.progress(progress, stats.total);
            }
            Ok(_) => {}
            Err(e) => {
                first_err.get_or_insert(e);
                walking = false;
            }
        }
    }
    // What was populated becomes durable (also when stopped or failed: it is all valid).
    let flushed = disk.flush();
    let clear = disk.size() - disk.allocated_bytes();
    ctl.progress(progress.max(stats.total.saturating_sub(clear)), stats.total);
    stats.elapsed = started.elapsed();
    if let Some(e) = first_err {
        return Err(fail(e));
    }
    flushed.map_err(fail)?;
    Ok(stats)
}
