//! The control socket's job methods: `job-start`, `query-jobs`, `job-pause`, `job-resume`,
//! `job-cancel`, `job-dismiss` (the table entries are in `methods.rs`; the job table and its
//! state machine in `host/jobs.rs`; the stream loop in `crate::stream`).

use serde_json::{json, Map, Value};

use super::super::jobs::{JobCtl, JobError};
use super::super::runtime::Host;
use super::rpc::{params, NoParams, RpcError, INVALID_PARAMS};
use crate::stream::{stream, StreamControl};

impl From<JobError> for RpcError {
    fn from(e: JobError) -> RpcError {
        RpcError::server(e.class(), e.to_string())
    }
}

/// `job-start` parameters.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JobStart {
    #[serde(rename = "type")]
    kind: String,
    export: String,
    /// Bytes per second: a number, or a string with a binary suffix (`50M`).
    #[serde(default)]
    rate: Option<Value>,
}

/// Parameters naming one job.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JobId {
    id: String,
}

fn rate_of(v: Option<Value>) -> Result<Option<u64>, RpcError> {
    let bad = |what: String| RpcError::new(INVALID_PARAMS, format!("invalid params: rate {what}"));
    let rate = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad(format!("{n}: not a byte count")))?,
        Some(Value::String(s)) => {
            let t = s.trim();
            parse_size::Config::new()
                .with_binary()
                .parse_size(t.strip_suffix("/s").unwrap_or(t))
                .map_err(|e| bad(format!("{s:?}: {e}")))?
        }
        Some(other) => return Err(bad(format!("{other}: expected bytes per second"))),
    };
    if rate == 0 {
        return Err(bad("0: must be above 0".into()));
    }
    Ok(Some(rate))
}

/// A stream job's controller: the job's pause points and progress, a fixed rate.
struct JobStream<'a> {
    ctl: &'a JobCtl,
    rate: Option<u64>,
}

impl StreamControl for JobStream<'_> {
    fn proceed(&self) -> bool {
        self.ctl.proceed()
    }
    fn rate(&self) -> Option<u64> {
        self.rate
    }
    fn progress(&self, done: u64, total: u64) {
        self.ctl.progress(done, total);
    }
    fn wants_pause(&self) -> bool {
        self.ctl.wants_stop()
    }
}

pub(super) fn job_start(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let a: JobStart = params(p)?;
    if a.kind != "stream" {
        return Err(RpcError::new(
            INVALID_PARAMS,
            format!(
                "invalid params: unknown job type {:?} (known: stream)",
                a.kind
            ),
        ));
    }
    let rate = rate_of(a.rate)?;
    let export = host
        .exports
        .get(&a.export)
        .filter(|e| !e.is_deleting())
        .ok_or_else(|| {
            RpcError::server("no-such-export", format!("no export named {:?}", a.export))
        })?;
    let Some(ed) = export.backend.engine_disk() else {
        return Err(RpcError::server(
            "not-an-overlay",
            format!("export {:?} is not backed by an overlay", a.export),
        ));
    };
    // Registered with the disk pinned: a snapshot or resize either finished before (the job
    // streams the new disk) or sees this job when it looks and refuses; it never closes the
    // disk under a job that started meanwhile.
    let id = ed.pinned(|disk| {
        if disk.read_only() {
            return Err(RpcError::server(
                "read-only",
                format!(
                    "export {:?} is read-only: a stream writes its raw image",
                    a.export
                ),
            ));
        }
        let disk = disk.clone();
        Ok(host.jobs.start("stream", &a.export, move |ctl| {
            let c = JobStream { ctl, rate };
            match stream(&disk, &c) {
                Ok(s) => {
                    tracing::info!(overlay = ?disk.path(), copied = s.copied,
                        zeroed = s.zeroed, stopped = s.stopped, "stream ended");
                    Ok(!s.stopped)
                }
                Err(e) => Err(e.to_string()),
            }
        })?)
    })?;
    Ok(json!({ "id": id }))
}

pub(super) fn query_jobs(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let NoParams {} = params(p)?;
    Ok(serde_json::to_value(host.jobs.query()).unwrap_or_default())
}

pub(super) fn job_pause(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let j: JobId = params(p)?;
    host.jobs.pause(&j.id)?;
    Ok(json!({}))
}

pub(super) fn job_resume(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let j: JobId = params(p)?;
    host.jobs.resume(&j.id)?;
    Ok(json!({}))
}

pub(super) fn job_cancel(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let j: JobId = params(p)?;
    host.jobs.cancel(&j.id)?;
    Ok(json!({}))
}

pub(super) fn job_dismiss(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let j: JobId = params(p)?;
    host.jobs.dismiss(&j.id)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_numbers_or_sizes() {
        assert_eq!(rate_of(None).unwrap(), None);
        assert_eq!(rate_of(Some(json!(4096))).unwrap(), Some(4096));
        assert_eq!(rate_of(Some(json!("50M"))).unwrap(), Some(50 << 20));
        assert_eq!(rate_of(Some(json!("1G/s"))).unwrap(), Some(1 << 30));
        for bad in [json!(0), json!(-1), json!("fast"), json!(true), json!("0")] {
            let e = rate_of(Some(bad.clone())).unwrap_err();
            assert_eq!(e.code, INVALID_PARAMS, "{bad}");
        }
    }
}
