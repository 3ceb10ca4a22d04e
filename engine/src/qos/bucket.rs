//! The throttle algorithm: QEMU's leaky bucket used as a meter (`util/throttle.c`), as pure
//! functions of a time in nanoseconds (no clock is read here, so tests drive it with a fake one).
//!
//! Each limited quantity (iops or bytes; total, read or write) has a bucket whose `level` is the
//! work admitted and not yet leaked; it leaks at the average rate. A request may start when no
//! bucket that concerns it is over its size: the size is `avg / 10` without a burst (a tenth of a
//! second of slack, so requests are not throttled one by one), or `max * max-length` with one.
//! With a burst length above one second a second level, `burst_level`, leaks at the burst rate
//! and holds the rate during the burst to `max` (slack `max / 10`). A request that may start is
//! accounted in full, whatever its size: a request larger than the bucket is admitted when the
//! bucket is not over its size (QEMU's rule), and the requests after it wait until it has leaked.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::limits::ThrottleLimits;

const NS_PER_SEC: f64 = 1e9;

/// Which direction a request goes, for the `*-read` / `*-write` limits (`*-total` counts both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

/// Nanoseconds on the engine's monotonic clock (since the first call in this process).
pub fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The [`Instant`] of a time given by [`now_ns`].
pub fn instant_of(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One leaky bucket (QEMU's `LeakyBucket`).
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Average rate, units per second (0: this bucket does not limit).
    avg: f64,
    /// Burst rate, units per second (0: none).
    max: f64,
    /// Burst length in seconds (at least 1).
    length: f64,
    level: f64,
    burst_level: f64,
}

impl Bucket {
    fn leak(&mut self, delta_ns: u64) {
        let secs = delta_ns as f64 / NS_PER_SEC;
        self.level = (self.level - self.avg * secs).max(0.0);
        if self.length > 1.0 {
            self.burst_level = (self.burst_level - self.max * secs).max(0.0);
        }
    }

    /// Nanoseconds until this bucket lets the next request start (0: now).
    fn wait_ns(&self) -> u64 {
        if self.avg == 0.0 {
            return 0;
        }
        let (size, burst_size) = if self.max == 0.0 {
            (self.avg / 10.0, 0.0)
        } else {
            (self.max * self.length, self.max / 10.0)
        };
        let extra = self.level - size;
        if extra > 0.0 {
            return ceil_ns(extra / self.avg);
        }
        if self.length > 1.0 {
            let extra = self.burst_level - burst_size;
            if extra > 0.0 {
                return ceil_ns(extra / self.max);
            }
        }
        0
    }

    fn account(&mut self, units: f64) {
        if self.avg == 0.0 {
            return;
        }
        self.level += units;
        if self.length > 1.0 {
            self.burst_level += units;
        }
    }
}

/// Seconds to whole nanoseconds, rounded up (at least 1: a positive wait must move the clock).
fn ceil_ns(secs: f64) -> u64 {
    let ns = (secs * NS_PER_SEC).ceil();
    if ns >= u64::MAX as f64 {
        u64::MAX
    } else {
        (ns as u64).max(1)
    }
}

/// The six buckets of one set of limits and the time they were last leaked to.
///
/// Invariant: bucket `i` holds the limits of `ThrottleLimits::buckets()[i]` (iops total, read,
/// write, then bps total, read, write); `last_ns` never goes backwards.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    buckets: [Bucket; 6],
    op_size: u64,
    last_ns: u64,
}

impl Meter {
    /// A meter for `limits` (validated), with empty buckets, at time `now`.
    pub fn new(limits: &ThrottleLimits, now: u64) -> Meter {
        let mut m = Meter {
            last_ns: now,
            ..Meter::default()
        };
        m.set_limits(limits, now);
        m
    }

    /// Puts `limits` in force at `now`: what was admitted so far stays in the buckets (it leaks
    /// at the new rates); a bucket without a limit now is emptied.
    pub fn set_limits(&mut self, limits: &ThrottleLimits, now: u64) {
        self.leak(now);
        for (b, l) in self.buckets.iter_mut().zip(limits.buckets()) {
            b.avg = l.avg as f64;
            b.max = l.max as f64;
            b.length = l.length.unwrap_or(1).max(1) as f64;
            if l.avg == 0 {
                b.level = 0.0;
            }
            if b.length <= 1.0 {
                b.burst_level = 0.0;
            }
        }
        self.op_size = limits.iops_size.unwrap_or(0);
    }

    fn leak(&mut self, now: u64) {
        if now > self.last_ns {
            let delta = now - self.last_ns;
            for b in &mut self.buckets {
                b.leak(delta);
            }
            self.last_ns = now;
        }
    }

    /// The buckets a request in `dir` concerns: iops total and its direction, bps likewise.
    fn concerned(dir: Direction) -> [usize; 4] {
        match dir {
            Direction::Read => [0, 1, 3, 4],
            Direction::Write => [0, 2, 3, 5],
        }
    }

    /// Nanoseconds from `now` until a request in `dir` may start (0: now).
    pub fn wait_ns(&mut self, now: u64, dir: Direction) -> u64 {
        self.leak(now);
        Self::concerned(dir)
            .iter()
            .map(|&i| self.buckets[i].wait_ns())
            .max()
            .unwrap_or(0)
    }

    /// Accounts a request of `bytes` in `dir` started at `now`: one operation (or
    /// `bytes / iops-size` when that is more) and its bytes.
    pub fn account(&mut self, now: u64, dir: Direction, bytes: u64) {
        self.leak(now);
        let units = if self.op_size != 0 && bytes > self.op_size {
            bytes as f64 / self.op_size as f64
        } else {
            1.0
        };
        let [ops_total, ops_dir, bps_total, bps_dir] = Self::concerned(dir);
        self.buckets[ops_total].account(units);
        self.buckets[ops_dir].account(units);
        self.buckets[bps_total].account(bytes as f64);
        self.buckets[bps_dir].account(bytes as f64);
    }

    /// Starts a request of `bytes` in `dir` at `now` if the buckets allow it (and accounts it);
    /// otherwise returns how many nanoseconds to wait before asking again.
    pub fn try_admit(&mut self, now: u64, dir: Direction, bytes: u64) -> Result<(), u64> {
        match self.wait_ns(now, dir) {
            0 => {
                self.account(now, dir, bytes);
                Ok(())
            }
            w => Err(w),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// A greedy client on a fake clock: from `start`, sends a request of `bytes` in `dir` as
    /// soon as the meter admits one, until `end`; returns the admission times.
    fn greedy(m: &mut Meter, dir: Direction, bytes: u64, start: u64, end: u64) -> Vec<u64> {
        let mut t = start;
        let mut out = Vec::new();
        while t < end {
            match m.try_admit(t, dir, bytes) {
                Ok(()) => out.push(t),
                Err(w) => t += w,
            }
        }
        out
    }

    fn in_window(times: &[u64], from: u64, to: u64) -> usize {
        times.iter().filter(|&&t| t >= from && t < to).count()
    }

    #[test]
    fn steady_state_is_the_average_rate() {
        let l = ThrottleLimits {
            iops_total: Some(100),
            ..Default::default()
        };
        let mut m = Meter::new(&l, 0);
        let t = greedy(&mut m, Direction::Read, 4096, 0, 10 * SEC);
        // A tenth of a second of slack up front (avg/10 + 1), then exactly the rate.
        assert_eq!(in_window(&t, 0, 1), 11, "{:?}", &t[..12]);
        for s in 1..10 {
            let n = in_window(&t, s * SEC, (s + 1) * SEC);
            assert!((99..=101).contains(&n), "second {s}: {n}");
        }
        assert!((1000..=1012).contains(&t.len()), "{}", t.len());
    }

    #[test]
    fn bytes_per_second_and_a_request_larger_than_the_bucket() {
        let l = ThrottleLimits {
            bps_total: Some(1 << 20),
            ..Default::default()
        };
        let mut m = Meter::new(&l, 0);
        // 4 MiB requests against 1 MiB/s (a bucket of 100 KiB): the first is admitted at once
        // (the bucket is not over its size), the next only once it has leaked: every ~4 s.
        let t = greedy(&mut m, Direction::Write, 4 << 20, 0, 20 * SEC);
        assert_eq!(t[0], 0);
        let gap = t[1] - t[0];
        assert!(gap > 3 * SEC && gap < 4 * SEC, "{gap}");
        assert_eq!(t.len(), 6, "{t:?}");
    }

    #[test]
    fn a_burst_runs_at_max_for_max_length_seconds_then_the_average() {
        let l = ThrottleLimits {
            iops_total: Some(100),
            iops_total_max: Some(1000),
            iops_total_max_length: Some(5),
            ..Default::default()
        };
        let mut m = Meter::new(&l, 0);
        let t = greedy(&mut m, Direction::Write, 4096, 0, 20 * SEC);
        // During the burst: about `max` per second.
        for s in 0..5 {
            let n = in_window(&t, s * SEC, (s + 1) * SEC);
            assert!((990..=1101).contains(&n), "second {s}: {n}");
        }
        // The bucket (max * length = 5000) fills at max - avg per second: the burst ends after
        // about 5000 / 900 s, then the average rate holds.
        let end_of_burst = t
            .windows(2)
            .position(|w| w[1] - w[0] > SEC / 500)
            .map(|i| t[i])
            .unwrap();
        assert!(
            (5 * SEC..=5600 * SEC / 1000).contains(&end_of_burst),
            "{end_of_burst}"
        );
        for s in 7..20 {
            let n = in_window(&t, s * SEC, (s + 1) * SEC);
            assert!((99..=101).contains(&n), "second {s}: {n}");
        }
    }

    #[test]
    fn an_idle_bucket_allows_a_burst_again() {
        let l = ThrottleLimits {
            iops_total: Some(10),
            iops_total_max: Some(100),
            ..Default::default()
        };
        let mut m = Meter::new(&l, 0);
        // With a burst length of 1 s: `max` requests at once, then the average.
        let t = greedy(&mut m, Direction::Read, 512, 0, 5 * SEC);
        assert_eq!(in_window(&t, 0, 1), 101);
        // After the bucket drained (idle for 100 / 10 s), the burst is available again.
        let t = greedy(&mut m, Direction::Read, 512, 20 * SEC, 20 * SEC + 1);
        assert_eq!(t.len(), 101);
    }

    #[test]
    fn iops_size_counts_a_large_request_as_several() {
        let l = ThrottleLimits {
            iops_total: Some(100),
            iops_size: Some(4096),
            ..Default::default()
        };
        let mut m = Meter::new(&l, 0);
        let t = greedy(&mut m, Direction::Read, 64 << 10, SEC, 11 * SEC);
        // Each 64 KiB request is 16 operations: 100 / 16 per second.
        let n = in_window(&t, 2 * SEC, 10 * SEC);
        assert!((49..=51).contains(&n), "{n}");
        // Small requests count one each.
        let mut m = Meter::new(&l, 0);
        let t = greedy(&mut m, Direction::Read, 512, SEC, 11 * SEC);
        assert!((799..=801).contains(&in_window(&t, 2 * SEC, 10 * SEC)));
    }

    #[test]
    fn read_and_write_limits_are_separate_and_total_counts_both() {
        let l = ThrottleLimits {
            iops_read: Some(50),
            iops_write: Some(200),
            ..Default::default()
        };
        let mut m = Meter::new(&l, 0);
        let mut t = SEC;
        let (mut r, mut w) = (0, 0);
        while t < 11 * SEC {
            // Reads and writes interleaved as fast as each is allowed.
            let wr = m.try_admit(t, Direction::Read, 4096);
            let ww = m.try_admit(t, Direction::Write, 4096);
            if t >= 2 * SEC {
                r += u64::from(wr.is_ok());
                w += u64::from(ww.is_ok());
            }
            t += match (wr, ww) {
                (Err(a), Err(b)) => a.min(b),
                _ => 0,
            };
        }
        assert!((449..=451).contains(&r), "{r}");
        assert!((1799..=1801).contains(&w), "{w}");

        let total = ThrottleLimits {
            iops_total: Some(100),
            ..Default::default()
        };
        let mut m = Meter::new(&total, 0);
        let mut t = SEC;
        let mut n = 0;
        let mut dir = Direction::Read;
        while t < 11 * SEC {
            match m.try_admit(t, dir, 4096) {
                Ok(()) => {
                    n += u64::from(t >= 2 * SEC);
                    dir = if dir == Direction::Read {
                        Direction::Write
                    } else {
                        Direction::Read
                    };
                }
                Err(w) => t += w,
            }
        }
        assert!((899..=901).contains(&n), "{n}");
    }

    #[test]
    fn a_group_of_members_shares_one_meter() {
        // Three members sending in turn through one meter get the rate together, a third each.
        let l = ThrottleLimits {
            bps_total: Some(3 << 20),
            ..Default::default()
        };
        let mut m = Meter::new(&l, 0);
        let mut t = 0;
        let mut per = [0u64; 3];
        let mut next = 0;
        while t < 10 * SEC {
            match m.try_admit(t, Direction::Write, 64 << 10) {
                Ok(()) => {
                    if t >= SEC {
                        per[next] += 1;
                    }
                    next = (next + 1) % 3;
                }
                Err(w) => t += w,
            }
        }
        let sum: u64 = per.iter().sum();
        // 9 s at 3 MiB/s of 64 KiB requests: 432.
        assert!((431..=433).contains(&sum), "{per:?}");
        assert!(per.iter().all(|&p| p.abs_diff(sum / 3) <= 1), "{per:?}");
    }

    #[test]
    fn changed_limits_apply_to_what_is_already_in_the_bucket() {
        let l = ThrottleLimits {
            iops_total: Some(10),
            ..Default::default()
        };
        let mut m = Meter::new(&l, 0);
        for _ in 0..50 {
            m.account(0, Direction::Read, 512);
        }
        // 49 over the bucket at 10/s: ~4.9 s.
        assert!(m.wait_ns(0, Direction::Read) > 4 * SEC);
        m.set_limits(
            &ThrottleLimits {
                iops_total: Some(1000),
                ..Default::default()
            },
            0,
        );
        let w = m.wait_ns(0, Direction::Read);
        assert!(w < SEC / 10, "{w}");
        m.set_limits(&ThrottleLimits::default(), 0);
        assert_eq!(m.wait_ns(0, Direction::Read), 0);
    }

    #[test]
    fn unlimited_never_waits() {
        let mut m = Meter::new(&ThrottleLimits::default(), 0);
        for i in 0..1000 {
            assert_eq!(m.try_admit(i, Direction::Write, 1 << 30), Ok(()));
        }
    }
}
