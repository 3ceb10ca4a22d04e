//! A vhost-user-blk load generator: libblkio's `virtio-blk-vhost-user` driver (the `blkio`
//! crate) keeps `depth` requests in flight on one queue, like fio's `iodepth`, for a fixed time.
//! Each slot owns its own `bs`-byte part of one shared buffer region; a completed slot is
//! resubmitted at once (random offsets aligned to `bs`, or the next sequential one), so the
//! queue never drains until the end. Latency is measured per request from submission (the
//! `do_io` that kicks it) to the completion being seen.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::error::{BenchError, Result};

/// What the generator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Reads at random `bs`-aligned offsets.
    RandRead,
    /// Writes random bytes at random `bs`-aligned offsets.
    RandWrite,
    /// Reads in order, wrapping at the end of the span.
    SeqRead,
    /// Writes random bytes in order, wrapping at the end of the span.
    SeqWrite,
}

/// One run's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Kind of requests.
    pub pattern: Pattern,
    /// Bytes per request.
    pub bs: usize,
    /// Requests in flight.
    pub depth: usize,
    /// Bytes of the disk covered (from offset 0).
    pub span: u64,
    /// How long to keep submitting.
    pub runtime: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct LoadResult {
    /// Requests completed.
    pub ops: u64,
    /// Seconds from the first submission to the last completion.
    pub secs: f64,
    /// Requests per second.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: f64,
    /// Completion latency percentiles in µs.
    pub lat_p50_us: f64,
    /// 99th percentile.
    pub lat_p99_us: f64,
    /// 99.9th percentile.
    pub lat_p999_us: f64,
}

fn blkio_err(what: &str) -> impl FnOnce(blkio::Error) -> BenchError + '_ {
    move |e| BenchError::Command {
        command: format!("libblkio virtio-blk-vhost-user: {what}"),
        message: e.message().to_owned(),
    }
}

/// Connects to the vhost-user-blk socket `sock` and runs `load` on one queue.
pub fn run(sock: &Path, load: Load) -> Result<LoadResult> {
    let path = sock
        .to_str()
        .ok_or_else(|| BenchError::Usage(format!("{}: not UTF-8", sock.display())))?;
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("create"))?;
    b.set_str("path", path).map_err(blkio_err("path"))?;
    b.connect().map_err(blkio_err("connect"))?;
    b.set_i32("num-queues", 1)
        .map_err(blkio_err("num-queues"))?;
    let started = b.start().map_err(blkio_err("start"))?;
    let mut q = started
        .queues
        .into_iter()
        .next()
        .ok_or_else(|| BenchError::Usage("libblkio started no queue".to_owned()))?;
    let capacity = b.get_u64("capacity").map_err(blkio_err("capacity"))?;
    let span = load.span.min(capacity) / load.bs as u64 * load.bs as u64;
    if span == 0 || load.depth == 0 {
        return Err(BenchError::Usage(format!(
            "disk of {capacity} bytes too small for {} byte requests",
            load.bs
        )));
    }
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(blkio_err("mem-region-alignment"))? as usize;
    let want = load.bs * load.depth;
    let region = b
        .alloc_mem_region(want.div_ceil(align.max(1)) * align.max(1))
        .map_err(blkio_err("alloc_mem_region"))?;
    b.map_mem_region(&region)
        .map_err(blkio_err("map_mem_region"))?;
    let base = region.addr as *mut u8;
    let mut rng = SmallRng::seed_from_u64(0x5EED);
    if matches!(load.pattern, Pattern::RandWrite | Pattern::SeqWrite) {
        // SAFETY: the region is a live mapping of at least `want` bytes owned by `b` (freed
        // when `b` drops, after this function), and no request is in flight yet.
        let buf = unsafe { std::slice::from_raw_parts_mut(base, want) };
        rng.fill_bytes(buf);
    }
    let blocks = span / load.bs as u64;
    let mut next_seq = 0u64;
    let mut offset = |rng: &mut SmallRng| match load.pattern {
        Pattern::SeqRead | Pattern::SeqWrite => {
            let o = next_seq * load.bs as u64;
            next_seq = (next_seq + 1) % blocks;
            o
        }
        _ => rng.gen_range(0..blocks) * load.bs as u64,
    };
    let submit = |q: &mut Blkioq, slot: usize, off: u64| {
        // SAFETY: slot < depth, so the slot's part lies inside the region.
        let buf = unsafe { base.add(slot * load.bs) };
        match load.pattern {
            Pattern::RandWrite | Pattern::SeqWrite => {
                q.write(off, buf, load.bs, slot, ReqFlags::empty())
            }
            _ => q.read(off, buf, load.bs, slot, ReqFlags::empty()),
        }
    };

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| BenchError::Usage(format!("histogram: {e}")))?;
    let mut sent = vec![Instant::now(); load.depth];
    let start = Instant::now();
    for (slot, at) in sent.iter_mut().enumerate() {
        let off = offset(&mut rng);
        submit(&mut q, slot, off);
        *at = start;
    }
    let end = start + load.runtime;
    let mut in_flight = load.depth;
    let mut ops = 0u64;
    let mut done: Vec<MaybeUninit<Completion>> =
        (0..load.depth).map(|_| MaybeUninit::uninit()).collect();
    while in_flight > 0 {
        let mut timeout = Duration::from_secs(30);
        let n = q
            .do_io(&mut done, 1, Some(&mut timeout), None)
            .map_err(blkio_err("do_io"))?;
        if n == 0 {
            return Err(BenchError::Command {
                command: "libblkio virtio-blk-vhost-user".to_owned(),
                message: format!("no completion within 30 s ({in_flight} in flight)"),
            });
        }
        let now = Instant::now();
        for c in &done[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(BenchError::Command {
                    command: "libblkio virtio-blk-vhost-user".to_owned(),
                    message: format!(
                        "request failed: {}",
                        std::io::Error::from_raw_os_error(-c.ret)
                    ),
                });
            }
            let slot = c.user_data;
            let Some(at) = sent.get_mut(slot) else {
                continue;
            };
            let us = now.duration_since(*at).as_micros().max(1) as u64;
            let _ = hist.record(us.min(60_000_000));
            ops += 1;
            if now < end {
                let off = offset(&mut rng);
                submit(&mut q, slot, off);
                *at = now;
            } else {
                in_flight -= 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(q);
    drop(b);
    Ok(LoadResult {
        ops,
        secs,
        iops: ops as f64 / secs,
        bw_bytes: (ops * load.bs as u64) as f64 / secs,
        lat_p50_us: hist.value_at_quantile(0.50) as f64,
        lat_p99_us: hist.value_at_quantile(0.99) as f64,
        lat_p999_us: hist.value_at_quantile(0.999) as f64,
    })
}
