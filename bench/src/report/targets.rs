//! The performance targets, judged on a compare run: every profile at every size at
//! least 1.3x qemu-nbd qcow2 with p99 no worse (sync write 1.5x), sync write at least 0.5x fio
//! with fsync on the raw file, 4 KiB random read QD32 at least 0.75x fio on the raw file. Each
//! is met, missed, or missing (a server did not run, or fio reported no latency), never a
//! silent pass.

use std::fmt::Write as _;

use crate::profiles::{metric_of_id, Metric};
use crate::report::{Results, Summary, TARGET_PEER};
use crate::stats::ratio;

/// The verdict on one target.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Reached.
    Met,
    /// Not reached.
    Missed,
    /// Cannot be judged; why.
    Missing(String),
}

/// One target at one size.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Disk size in bytes.
    pub size: u64,
    /// Profile id.
    pub profile: String,
    /// What is measured against what (e.g. `throughput vs qemu-nbd-qcow2`).
    pub what: String,
    /// The goal as text (e.g. `≥ 1.3×, p99 no worse`).
    pub goal: String,
    /// The measured ratio, when there is one.
    pub ratio: Option<f64>,
    /// addcow's p99 over the peer's, when judged.
    pub p99_ratio: Option<f64>,
    /// The verdict.
    pub verdict: Verdict,
}

fn metric(s: &Summary, m: Metric) -> f64 {
    match m {
        Metric::Iops => s.iops,
        Metric::Bandwidth => s.bw_bytes,
    }
}

/// The throughput ratio to qemu-nbd qcow2 each profile must reach.
fn peer_goal(profile: &str) -> f64 {
    if profile == "syncwrite" {
        1.5
    } else {
        1.3
    }
}

/// The ratio to `fio-raw` a profile must reach, if it has such a target.
fn raw_goal(profile: &str) -> Option<f64> {
    match profile {
        "syncwrite" => Some(0.5),
        "randread" => Some(0.75),
        _ => None,
    }
}

/// Judges every target on one size's results (profiles in run order).
pub fn checks(r: &Results) -> Vec<Check> {
    let mut out = Vec::new();
    for (pid, _) in &r.profiles {
        let m = metric_of_id(pid);
        let addcow = r.get(pid, "addcow");
        let missing = |who: &str| Verdict::Missing(format!("no {who} result"));
        // Against qemu-nbd qcow2: throughput and p99.
        let goal = peer_goal(pid);
        let peer = r.get(pid, TARGET_PEER);
        let (ratio_v, p99_v, verdict) = match (addcow, peer) {
            (None, _) => (None, None, missing("addcow")),
            (_, None) => (None, None, missing(TARGET_PEER)),
            (Some(a), Some(p)) => {
                let t = ratio(metric(a, m), metric(p, m));
                let p99 = ratio(a.p99_ns, p.p99_ns);
                let v = match (t, p99) {
                    (None, _) => Verdict::Missing("throughput not reported".to_owned()),
                    (_, None) => Verdict::Missing("p99 not reported".to_owned()),
                    (Some(t), Some(l)) if t >= goal && l <= 1.0 => Verdict::Met,
                    _ => Verdict::Missed,
                };
                (t, p99, v)
            }
        };
        out.push(Check {
            size: r.meta.size,
            profile: pid.clone(),
            what: format!("{} vs {TARGET_PEER}", name(m)),
            goal: format!("≥ {goal}×, p99 no worse"),
            ratio: ratio_v,
            p99_ratio: p99_v,
            verdict,
        });
        // Against the disk itself.
        if let Some(goal) = raw_goal(pid) {
            let raw = r.get(pid, "fio-raw");
            let (ratio_v, verdict) = match (addcow, raw) {
                (None, _) => (None, missing("addcow")),
                (_, None) => (None, missing("fio-raw")),
                (Some(a), Some(f)) => match ratio(metric(a, m), metric(f, m)) {
                    None => (None, Verdict::Missing("throughput not reported".to_owned())),
                    Some(t) if t >= goal => (Some(t), Verdict::Met),
                    Some(t) => (Some(t), Verdict::Missed),
                },
            };
            out.push(Check {
                size: r.meta.size,
                profile: pid.clone(),
                what: format!("{} vs fio-raw (the disk's limit)", name(m)),
                goal: format!("≥ {goal}×"),
                ratio: ratio_v,
                p99_ratio: None,
                verdict,
            });
        }
    }
    out
}

fn name(m: Metric) -> &'static str {
    match m {
        Metric::Iops => "IOPS",
        Metric::Bandwidth => "bandwidth",
    }
}

/// Writes the targets block: one row per target and size, and a count of each verdict.
pub fn write_block(s: &mut String, sections: &[Results]) {
    let all: Vec<Check> = sections.iter().flat_map(checks).collect();
    let count = |f: &dyn Fn(&Verdict) -> bool| all.iter().filter(|c| f(&c.verdict)).count();
    let met = count(&|v| *v == Verdict::Met);
    let missed = count(&|v| *v == Verdict::Missed);
    let missing = all.len() - met - missed;
    let _ = writeln!(s, "## Targets of the issue\n");
    let _ = writeln!(
        s,
        "{met} met, {missed} missed, {missing} missing of {} (ratios from this run only).\n",
        all.len()
    );
    let _ = writeln!(
        s,
        "| size | profile | target | goal | ratio | p99 ratio | verdict |"
    );
    let _ = writeln!(s, "|---|---|---|---|---:|---:|---|");
    let r2 = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}×"));
    for c in &all {
        let verdict = match &c.verdict {
            Verdict::Met => "met".to_owned(),
            Verdict::Missed => "**missed**".to_owned(),
            Verdict::Missing(why) => format!("**missing** ({why})"),
        };
        let _ = writeln!(
            s,
            "| {} MiB | {} | {} | {} | {} | {} | {verdict} |",
            c.size >> 20,
            c.profile,
            c.what,
            c.goal,
            r2(c.ratio),
            r2(c.p99_ratio),
        );
    }
    let _ = writeln!(s);
}
