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
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Latency {
    /// Median.
    pub p50_ns: f64,
    /// 99th percentile.
    pub p99_ns: f64,
    /// 99.9th percentile.
    pub p999_ns: f64,
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
    pub fn latency(&self) -> Latency {
        let mut out = Latency::default();
        for l in [self.read_lat, self.write_lat].into_iter().flatten() {
            out.p50_ns = out.p50_ns.max(l.p50_ns);
            out.p99_ns = out.p99_ns.max(l.p99_ns);
            out.p999_ns = out.p999_ns.max(l.p999_ns);
        }
        out
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
