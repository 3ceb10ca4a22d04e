//! Running one fio job file section and reading its JSON output.
//!
//! fio's nbd engine prints `fio: connected to NBD server` lines before the JSON document, so the
//! parser starts at the first `{`. Job files use `group_reporting=1`, so `jobs[0]` aggregates all
//! jobs of the run.

use std::path::Path;
use std::process::Command;

use serde::Serialize;
use serde_json::Value;

use crate::error::{BenchError, Result};

/// Where fio sends the I/O.
#[derive(Debug, Clone)]
pub enum Target<'a> {
    /// An NBD server on this Unix socket (section `[nbd]`).
    Nbd(&'a Path),
    /// A raw file with io_uring and O_DIRECT (section `[file]`).
    File(&'a Path),
}

/// Completion-latency percentiles of one direction, in nanoseconds.
///
/// NaN means fio did not report that percentile: the value is *missing*, never zero, and every
/// number derived from it (the worse of two directions, a median, a ratio) is missing too, so a
/// comparison can never read a missing percentile as "no worse". `results.json` stores a
/// missing value as `null`, which reads back as NaN.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct Latency {
    /// Median.
    #[serde(deserialize_with = "nan_if_null")]
    pub p50_ns: f64,
    /// 99th percentile.
    #[serde(deserialize_with = "nan_if_null")]
    pub p99_ns: f64,
    /// 99.9th percentile.
    #[serde(deserialize_with = "nan_if_null")]
    pub p999_ns: f64,
}

impl Latency {
    /// Every percentile missing.
    pub const MISSING: Latency = Latency {
        p50_ns: f64::NAN,
        p99_ns: f64::NAN,
        p999_ns: f64::NAN,
    };

    /// Per percentile, the worse (higher) of `self` and `other`; missing if either is missing.
    pub fn worse(self, other: Latency) -> Latency {
        let w = |a: f64, b: f64| {
            if a.is_nan() || b.is_nan() {
                f64::NAN
            } else {
                a.max(b)
            }
        };
        Latency {
            p50_ns: w(self.p50_ns, other.p50_ns),
            p99_ns: w(self.p99_ns, other.p99_ns),
            p999_ns: w(self.p999_ns, other.p999_ns),
        }
    }
}

/// Reads a number, or `null` (how serde_json writes NaN) as NaN: a missing value stays missing
/// through a `results.json` round trip.
pub fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    use serde::Deserialize;
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// The numbers of one fio run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct FioResult {
    /// Read + write operations per second.
    pub iops: f64,
    /// Read + write bytes per second.
    pub bw_bytes: f64,
    /// Read completion latency, when the run read.
    pub read_lat: Option<Latency>,
    /// Write completion latency, when the run wrote.
    pub write_lat: Option<Latency>,
    /// Errors fio counted (non-zero means the server failed requests).
    pub errors: u64,
    /// Requests completed (reads + writes).
    #[serde(default)]
    pub total_ios: u64,
}

impl FioResult {
    /// The worse (higher) of the read and write percentiles: the latency a profile is judged by.
    /// A percentile missing in either direction that ran is missing here (NaN), not the other
    /// direction's value and not zero.
    pub fn latency(&self) -> Latency {
        let mut dirs = [self.read_lat, self.write_lat].into_iter().flatten();
        match dirs.next() {
            Some(first) => dirs.fold(first, Latency::worse),
            None => Latency::MISSING,
        }
    }
}

/// Runs `job` (a file of `fio-configs/`) against `target` with `SIZE` and `RUNTIME` set.
pub fn run(job: &Path, target: &Target<'_>, size: u64, runtime_s: u64) -> Result<FioResult> {
    let mut cmd = Command::new("fio");
    cmd.arg("--output-format=json")
        .env("SIZE", size.to_string())
        .env("RUNTIME", runtime_s.to_string());
    match target {
        Target::Nbd(sock) => cmd.arg("--section=nbd").env("SOCK", sock),
        Target::File(file) => cmd.arg("--section=file").env("FILE", file),
    };
    cmd.arg(job);
    let shown = format!("fio {}", job.display());
    let out = cmd.output().map_err(|e| BenchError::Command {
        command: shown.clone(),
        message: format!("cannot start: {e}"),
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(BenchError::Command {
            command: shown,
            message: format!(
                "{}: {}",
                out.status,
                tail(&format!("{stdout}{stderr}"), 800)
            ),
        });
    }
    parse(&stdout)
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s.get(start..).unwrap_or("")
}

/// Parses fio's `--output-format=json` output, skipping anything before the first `{`.
pub fn parse(text: &str) -> Result<FioResult> {
    let start = text
        .find('{')
        .ok_or_else(|| BenchError::FioOutput(format!("no JSON in: {}", tail(text, 300))))?;
    let json = text.get(start..).unwrap_or("");
    let doc: Value = serde_json::from_str(json)
        .map_err(|e| BenchError::FioOutput(format!("invalid JSON: {e}")))?;
    let job = doc
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| BenchError::FioOutput("no jobs[0]".to_owned()))?;
    let mut res = FioResult {
        errors: job.get("error").and_then(Value::as_u64).unwrap_or(0),
        ..FioResult::default()
    };
    for (dir, slot) in [("read", &mut res.read_lat), ("write", &mut res.write_lat)] {
        let Some(d) = job.get(dir) else { continue };
        let ios = d.get("total_ios").and_then(Value::as_u64).unwrap_or(0);
        if ios == 0 {
            continue;
        }
        res.total_ios += ios;
        res.iops += d.get("iops").and_then(Value::as_f64).unwrap_or(0.0);
        res.bw_bytes += d.get("bw_bytes").and_then(Value::as_f64).unwrap_or(0.0);
        let pct = d.get("clat_ns").and_then(|c| c.get("percentile"));
        let get = |k: &str| {
            pct.and_then(|p| p.get(k))
                .and_then(Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        *slot = Some(Latency {
            p50_ns: get("50.000000"),
            p99_ns: get("99.000000"),
            p999_ns: get("99.900000"),
        });
    }
    if res.read_lat.is_none() && res.write_lat.is_none() {
        return Err(BenchError::FioOutput("the run did no I/O".to_owned()));
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"fio: connected to NBD server
fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "nbd", "error" : 0,
      "read" : { "iops" : 1000.5, "bw_bytes" : 4098048, "total_ios" : 2001,
        "clat_ns" : { "percentile" : { "50.000000" : 800, "99.000000" : 1600, "99.900000" : 2900 } } },
      "write" : { "iops" : 500.0, "bw_bytes" : 2048000, "total_ios" : 1000,
        "clat_ns" : { "percentile" : { "50.000000" : 900, "99.000000" : 1500, "99.900000" : 4000 } } }
    }
  ]
}
"#;

    #[test]
    fn parses_after_preamble_and_sums_directions() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.iops, 1500.5);
        assert_eq!(r.bw_bytes, 4098048.0 + 2048000.0);
        let l = r.latency();
        assert_eq!((l.p50_ns, l.p99_ns, l.p999_ns), (900.0, 1600.0, 4000.0));
        assert_eq!(r.errors, 0);
        assert_eq!(r.total_ios, 3001);
    }

    #[test]
    fn skips_idle_direction() {
        let text = SAMPLE.replace("\"total_ios\" : 1000", "\"total_ios\" : 0");
        let r = parse(&text).unwrap();
        assert_eq!(r.iops, 1000.5);
        assert!(r.write_lat.is_none());
    }

    #[test]
    fn a_missing_percentile_stays_missing() {
        // The write direction ran but fio gave no 99th percentile for it: the profile's p99 is
        // missing (not the read's 1600, not 0); the percentiles both directions have still count.
        let text = SAMPLE.replace("\"99.000000\" : 1500, ", "");
        let r = parse(&text).unwrap();
        assert!(r.write_lat.unwrap().p99_ns.is_nan());
        let l = r.latency();
        assert!(
            l.p99_ns.is_nan(),
            "p99 of a run missing one direction's p99: {l:?}"
        );
        assert_eq!((l.p50_ns, l.p999_ns), (900.0, 4000.0));
        // An idle write direction is not a missing one.
        let text = text.replace("\"total_ios\" : 1000", "\"total_ios\" : 0");
        assert_eq!(parse(&text).unwrap().latency().p99_ns, 1600.0);
        // No direction at all: everything missing.
        let none = FioResult::default().latency();
        assert!(none.p50_ns.is_nan() && none.p99_ns.is_nan() && none.p999_ns.is_nan());
    }

    #[test]
    fn missing_percentiles_survive_a_json_round_trip() {
        let l = Latency {
            p50_ns: 5.0,
            ..Latency::MISSING
        };
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"p50_ns":5.0,"p99_ns":null,"p999_ns":null}"#);
        let back: Latency = serde_json::from_str(&json).unwrap();
        assert_eq!(back.p50_ns, 5.0);
        assert!(back.p99_ns.is_nan() && back.p999_ns.is_nan());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("fio: connected to NBD server\n").is_err());
        assert!(parse("{ not json").is_err());
        assert!(parse("{\"jobs\": []}").is_err());
    }

    #[test]
    fn tail_is_char_safe() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("ab", 10), "ab");
    }
}
