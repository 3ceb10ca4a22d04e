//! Per-export request statistics: per operation, requests, bytes, errors and a latency
//! histogram, recorded without any lock.
//!
//! Every export has one [`Shard`] per engine core; a connection records into the shard of the
//! core it was given, so the counters of different cores never share a cache line. Each counter
//! is a relaxed atomic; latency goes into a log-linear bucket array of atomics (32 buckets per
//! power of two of nanoseconds, so a bucket's midpoint is within 1.6 % of any value in it).
//! Nothing on the request path takes a lock; the one allocation is a bucket array's, the first
//! time its (shard, operation) records a latency.
//!
//! A query ([`ExportStats::snapshot`]) adds the shards up; percentiles come from an
//! `hdrhistogram` built from the merged buckets, and the Prometheus histogram buckets are exact
//! sums of whole fine buckets (the fine buckets never straddle a power of two).
//!
//! Latency is measured from the moment the request's header was parsed to the moment its reply
//! was handed to the kernel (`sendmsg` returned): what a client sees, minus the network.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use super::wire;

/// Operations counted separately. `Other` holds requests with an unknown command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    Zeroes,
    /// NBD_CMD_BLOCK_STATUS.
    BlockStatus,
    /// NBD_CMD_CACHE.
    Cache,
    /// Anything else (answered with an error).
    Other,
}

impl Op {
    /// Every operation, in report order.
    pub const ALL: [Op; 8] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::Zeroes,
        Op::BlockStatus,
        Op::Cache,
        Op::Other,
    ];

    /// The operation of an NBD command type.
    pub fn from_kind(kind: u16) -> Op {
        match kind {
            wire::CMD_READ => Op::Read,
            wire::CMD_WRITE => Op::Write,
            wire::CMD_FLUSH => Op::Flush,
            wire::CMD_TRIM => Op::Trim,
            wire::CMD_WRITE_ZEROES => Op::Zeroes,
            wire::CMD_BLOCK_STATUS => Op::BlockStatus,
            wire::CMD_CACHE => Op::Cache,
            _ => Op::Other,
        }
    }

    /// The name used in `query-stats` and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::Zeroes => "zeroes",
            Op::BlockStatus => "block-status",
            Op::Cache => "cache",
            Op::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the writer needs to account a request once its reply is sent: the operation, the bytes
/// it covers (payload for READ/WRITE, range length for TRIM/WRITE_ZEROES/BLOCK_STATUS/CACHE)
/// and when its header was parsed.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// The operation.
    pub op: Op,
    /// Bytes the request covers.
    pub bytes: u64,
    /// When its header was parsed.
    pub start: Instant,
}

impl Stamp {
    /// A stamp for `op` over `bytes`, starting now.
    pub fn now(op: Op, bytes: u64) -> Stamp {
        Stamp {
            op,
            bytes,
            start: Instant::now(),
        }
    }
}

/// Fine latency buckets: values below 32 ns have one bucket each; above, each power of two
/// `[2^e, 2^(e+1))` is split into 32 equal buckets, up to `2^36` ns (68.7 s); slower requests
/// land in the last bucket.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const MAX_EXP: u32 = 36;
/// Number of fine buckets.
pub const BUCKETS: usize = ((MAX_EXP - SUB_BITS + 2) as u64 * SUB) as usize;

/// The fine bucket of a latency of `ns` nanoseconds.
pub fn bucket_index(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let e = 63 - ns.leading_zeros();
    if e > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = (ns >> (e - SUB_BITS)) & (SUB - 1);
    (u64::from(e - SUB_BITS + 1) * SUB + sub) as usize
}

/// The first value (ns) of fine bucket `i` and its width.
pub fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, 1);
    }
    let e = (i / SUB) as u32 + SUB_BITS - 1;
    let sub = i % SUB;
    ((SUB + sub) << (e - SUB_BITS), 1 << (e - SUB_BITS))
}

/// Upper bounds (ns) of the Prometheus histogram buckets: powers of two from 1.024 µs to
/// 8.6 s. Each is the start of a fine bucket, so every fine bucket falls wholly under one bound
/// (a latency equal to a bound, to the nanosecond, is counted in the next bucket).
pub fn prometheus_bounds_ns() -> impl Iterator<Item = u64> {
    (10..=33).map(|k| 1u64 << k)
}

/// One operation's counters in one shard. The 8 KiB bucket array is allocated by the first
/// latency recorded (most exports use few operations on few cores); after that, reaching it is
/// one atomic load.
struct OpCell {
    started: AtomicU64,
    done: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_sum_ns: AtomicU64,
    buckets: OnceLock<Box<[AtomicU64]>>,
}

impl OpCell {
    fn new() -> OpCell {
        OpCell {
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency_sum_ns: AtomicU64::new(0),
            buckets: OnceLock::new(),
        }
    }

    fn buckets(&self) -> &[AtomicU64] {
        self.buckets
            .get_or_init(|| (0..BUCKETS).map(|_| AtomicU64::new(0)).collect())
    }
}

/// One core's counters, on their own cache lines.
#[repr(align(128))]
struct Shard {
    ops: [OpCell; Op::ALL.len()],
}

/// See the module docs.
pub struct ExportStats {
    shards: Box<[Shard]>,
}

impl std::fmt::Debug for ExportStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportStats")
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl ExportStats {
    /// Counters for `shards` cores (at least one).
    pub fn new(shards: usize) -> ExportStats {
        ExportStats {
            shards: (0..shards.max(1))
                .map(|_| Shard {
                    ops: std::array::from_fn(|_| OpCell::new()),
                })
                .collect(),
        }
    }

    fn cell(&self, shard: usize, op: Op) -> &OpCell {
        &self.shards[shard % self.shards.len()].ops[op.index()]
    }

    /// A request was taken in (it is in flight until [`ExportStats::finished`]).
    pub fn started(&self, shard: usize, op: Op) {
        self.cell(shard, op).started.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ended. `latency_ns`: `Some` when its reply was sent (recorded in the histogram),
    /// `None` when it was dropped (client gone, or never answered). `error`: an error reply.
    pub fn finished(&self, shard: usize, stamp: &Stamp, latency_ns: Option<u64>, error: bool) {
        let c = self.cell(shard, stamp.op);
        c.bytes.fetch_add(stamp.bytes, Ordering::Relaxed);
        if error {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ns) = latency_ns {
            c.buckets()[bucket_index(ns)].fetch_add(1, Ordering::Relaxed);
            c.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
        }
        // Last, so a reader that sees `done` also sees the rest (in-flight never goes negative
        // in a snapshot that reads `done` before `started`).
        c.done.fetch_add(1, Ordering::Release);
    }

    /// Adds the shards up.
    pub fn snapshot(&self) -> StatsSnapshot {
        let ops = Op::ALL.map(|op| {
            let mut s = OpSnapshot {
                requests: 0,
                in_flight: 0,
                bytes: 0,
                errors: 0,
                latency_sum_ns: 0,
                buckets: vec![0; BUCKETS],
            };
            let mut started = 0u64;
            for shard in self.shards.iter() {
                let c = &shard.ops[op.index()];
                let done = c.done.load(Ordering::Acquire);
                s.requests += done;
                started += c.started.load(Ordering::Relaxed).max(done);
                s.bytes += c.bytes.load(Ordering::Relaxed);
                s.errors += c.errors.load(Ordering::Relaxed);
                s.latency_sum_ns += c.latency_sum_ns.load(Ordering::Relaxed);
                if let Some(buckets) = c.buckets.get() {
                    for (sum, b) in s.buckets.iter_mut().zip(buckets.iter()) {
                        *sum += b.load(Ordering::Relaxed);
                    }
                }
            }
            s.in_flight = started - s.requests;
            s
        });
        StatsSnapshot { ops }
    }
}

/// One operation's totals over every shard.
#[derive(Debug, Clone)]
pub struct OpSnapshot {
    /// Requests that ended (answered, or dropped with their client).
    pub requests: u64,
    /// Requests taken in and not ended yet.
    pub in_flight: u64,
    /// Bytes the ended requests covered.
    pub bytes: u64,
    /// Error replies.
    pub errors: u64,
    /// Sum of the recorded latencies.
    pub latency_sum_ns: u64,
    /// Fine bucket counts (see [`bucket_index`]).
    pub buckets: Vec<u64>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

impl OpSnapshot {
    /// Latencies recorded (replies sent).
    pub fn latency_count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// p50/p99/p99.9 in microseconds, from an `hdrhistogram` holding each fine bucket's count at
    /// its midpoint; `None` when nothing was recorded.
    pub fn percentiles(&self) -> Option<Percentiles> {
        if self.latency_count() == 0 {
            return None;
        }
        let (top, width) = bucket_range(BUCKETS - 1);
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, top + width, 3).ok()?;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 {
                let (low, width) = bucket_range(i);
                h.record_n((low + width / 2).max(1), n).ok()?;
            }
        }
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Some(Percentiles {
            p50: us(0.5),
            p99: us(0.99),
            p999: us(0.999),
        })
    }

    /// Per Prometheus bucket (upper bound in seconds, count of requests in it, not cumulative),
    /// for [`prometheus_bounds_ns`]; what is slower than the last bound is left to `+Inf`.
    pub fn prometheus_buckets(&self) -> Vec<(f64, u64)> {
        let bounds: Vec<u64> = prometheus_bounds_ns().collect();
        let mut counts = vec![0u64; bounds.len()];
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let (low, _) = bucket_range(i);
            if let Some(k) = bounds.iter().position(|&b| low < b) {
                counts[k] += n;
            }
        }
        bounds.iter().map(|&b| b as f64 / 1e9).zip(counts).collect()
    }
}

/// Totals of every operation of one export.
#[derive(Debug, Clone)]
pub struct StatsSnapshot {
    /// Per operation, in [`Op::ALL`] order.
    pub ops: [OpSnapshot; Op::ALL.len()],
}

impl StatsSnapshot {
    /// Requests in flight over every operation.
    pub fn in_flight(&self) -> u64 {
        self.ops.iter().map(|o| o.in_flight).sum()
    }

    /// The totals of `op`.
    pub fn op(&self, op: Op) -> &OpSnapshot {
        &self.ops[op.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        // Every bucket starts where the previous ended, and is at most 1/32 of its start wide.
        let mut next = 0u64;
        for i in 0..BUCKETS {
            let (low, width) = bucket_range(i);
            assert_eq!(low, next, "bucket {i}");
            assert_eq!(bucket_index(low), i);
            assert_eq!(bucket_index(low + width - 1), i);
            if low >= SUB {
                assert!(width * SUB <= low, "bucket {i} too wide");
            }
            next = low + width;
        }
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
        // No fine bucket straddles a Prometheus bound.
        for b in prometheus_bounds_ns() {
            let (low, _) = bucket_range(bucket_index(b));
            assert_eq!(low, b);
        }
    }

    #[test]
    fn shards_merge_and_percentiles_follow_the_recorded_values() {
        let s = ExportStats::new(3);
        let t = Stamp::now(Op::Read, 4096);
        // 1000 reads: 980 at 10 µs on shard 0, 15 at 1 ms on shard 1, 5 at 100 ms on shard 2.
        for i in 0..1000u64 {
            let (shard, ns) = match i {
                0..980 => (0, 10_000),
                980..995 => (1, 1_000_000),
                _ => (2, 100_000_000),
            };
            s.started(shard, Op::Read);
            s.finished(shard, &t, Some(ns), i == 0);
        }
        s.started(1, Op::Write);
        let snap = s.snapshot();
        let r = snap.op(Op::Read);
        assert_eq!(
            (r.requests, r.bytes, r.errors, r.in_flight),
            (1000, 4096 * 1000, 1, 0)
        );
        assert_eq!(snap.op(Op::Write).in_flight, 1);
        assert_eq!(snap.in_flight(), 1);
        let p = r.percentiles().unwrap();
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.02;
        assert!(near(p.p50, 10.0), "{p:?}");
        assert!(near(p.p99, 1000.0), "{p:?}");
        assert!(near(p.p999, 100_000.0), "{p:?}");
        assert!(snap.op(Op::Write).percentiles().is_none());
        let buckets = r.prometheus_buckets();
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 1000);
        // 10 µs lies in (8.192 µs, 16.384 µs].
        let at = |secs: f64| {
            buckets
                .iter()
                .find(|b| (b.0 - secs).abs() < 1e-12)
                .unwrap()
                .1
        };
        assert_eq!(at(16_384e-9), 980);
        assert_eq!(at(1_048_576e-9), 15);
        assert_eq!(at(134_217_728e-9), 5);
    }
}
