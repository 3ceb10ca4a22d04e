//! Background jobs on a running daemon (the control socket's `job-*` methods), in the
//! vocabulary of QMP's `query-jobs`: each job has an id, a type, a status, current and total
//! progress, and an error once it failed.
//!
//! # State machine
//! ```text
//!   job-start ──> running ──job-pause──> paused ──job-resume──> running
//!                    │                     │
//!                    │ job-cancel          │ job-cancel
//!                    v                     v
//!                 aborting ──(in-flight work finished, flushed)──> cancelled
//!   running ──(done)──> concluded        running ──(error)──> failed
//!   concluded | failed | cancelled ──job-dismiss──> (removed)
//! ```
//! `paused` is entered when the job actually stops (its in-flight requests answered), not when
//! the pause is asked for; a pause asked for meanwhile is reported by `pause_requested`.
//! Every change of status emits `job-status-change {id, type, export, status}`. Terminal jobs
//! stay listed until `job-dismiss` (QMP's `auto-dismiss: false`); `query-jobs` shows them with
//! their final progress and error.
//!
//! Each job runs on a thread of its own, never on an engine core or an NBD connection thread;
//! it talks to the engine with ordinary requests. At most one job per export at a time. What a
//! job does is a closure over a [`JobCtl`] (pause points, cancellation, progress): the table
//! knows nothing of streams, so other job types are one more `start` caller.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::Serialize;

use super::events::{self, Events};
use addcow_engine::sync::{lock, wait};

/// A job's status (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Working.
    Running,
    /// Stopped at a pause point until `job-resume`.
    Paused,
    /// `job-cancel` was asked for: finishing what is in flight.
    Aborting,
    /// Finished its work.
    Concluded,
    /// Stopped on an error (see `error`).
    Failed,
    /// Stopped by `job-cancel`; what it did is kept.
    Cancelled,
}

impl JobStatus {
    /// Whether the job has ended (it can only be dismissed).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Concluded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Why a job operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No job has this id.
    #[error("no job with id {0:?}")]
    NoSuchJob(String),
    /// The export already has a job that has not ended.
    #[error("export {export:?} already has job {id:?} ({status:?}); one job per export")]
    ExportBusy {
        /// The export.
        export: String,
        /// Its job.
        id: String,
        /// That job's status.
        status: JobStatus,
    },
    /// The job is not in a state the operation applies to.
    #[error("job {id:?} is {status:?}: cannot {op}")]
    BadState {
        /// The job.
        id: String,
        /// Its status.
        status: JobStatus,
        /// What was asked.
        op: &'static str,
    },
    /// The job's thread could not be started.
    #[error("cannot start a job thread: {0}")]
    Spawn(#[from] std::io::Error),
}

impl JobError {
    /// A short, stable name of the error class (the JSON-RPC error's `data.class`).
    pub fn class(&self) -> &'static str {
        match self {
            JobError::NoSuchJob(_) => "no-such-job",
            JobError::ExportBusy { .. } => "job-exists",
            JobError::BadState { .. } => "bad-job-state",
            JobError::Spawn(_) => "spawn-failed",
        }
    }
}

struct State {
    status: JobStatus,
    pause_requested: bool,
    cancel_requested: bool,
    error: Option<String>,
}

/// One job. Shared by the table and its thread.
pub struct Job {
    id: String,
    kind: &'static str,
    export: String,
    st: Mutex<State>,
    cv: Condvar,
    current: AtomicU64,
    total: AtomicU64,
    events: Arc<Events>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A job as `query-jobs` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// Its type (`stream`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The export it works on.
    pub export: String,
    /// Its status.
    pub status: JobStatus,
    /// Progress so far, in the job's unit (bytes for a stream).
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    /// Total progress expected (bytes for a stream).
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// A pause was asked for and the job has not reached its pause point yet.
    pub pause_requested: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.st)
    }

    /// Sets the status and emits `job-status-change` (when it changed).
    fn set_status(&self, st: &mut State, status: JobStatus) {
        if st.status == status {
            return;
        }
        st.status = status;
        self.cv.notify_all();
        self.events.emit(
            events::JOB_STATUS_CHANGE,
            serde_json::json!({
                "id": self.id,
                "type": self.kind,
                "export": self.export,
                "status": status,
            }),
        );
    }

    /// What `query-jobs` reports.
    pub fn info(&self) -> JobInfo {
        let st = self.lock();
        JobInfo {
            id: self.id.clone(),
            kind: self.kind.to_string(),
            export: self.export.clone(),
            status: st.status,
            current_progress: self.current.load(Ordering::Relaxed),
            total_progress: self.total.load(Ordering::Relaxed),
            pause_requested: st.pause_requested && st.status == JobStatus::Running,
            error: st.error.clone(),
        }
    }

    /// Waits until the job's thread ended.
    fn join(&self) {
        let handle = lock(&self.thread).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// What a job's body uses to honour pause and cancel and to report progress.
pub struct JobCtl {
    job: Arc<Job>,
}

impl JobCtl {
    /// A pause point: blocks while the job is paused (reporting `paused`); false once it is
    /// cancelled (the body then finishes what is in flight and returns).
    pub fn proceed(&self) -> bool {
        let job = &self.job;
        let mut st = job.lock();
        loop {
            if st.cancel_requested {
                return false;
            }
            if !st.pause_requested {
                job.set_status(&mut st, JobStatus::Running);
                return true;
            }
            job.set_status(&mut st, JobStatus::Paused);
            st = wait(&job.cv, st);
        }
    }

    /// Whether a pause or cancel was asked for (the body should stop issuing new work and let
    /// what is in flight finish before its next [`JobCtl::proceed`]).
    pub fn wants_stop(&self) -> bool {
        let st = self.job.lock();
        st.pause_requested || st.cancel_requested
    }

    /// Progress: `current` of `total`.
    pub fn progress(&self, current: u64, total: u64) {
        self.job.total.store(total, Ordering::Relaxed);
        self.job.current.store(current, Ordering::Relaxed);
    }
}

/// What a job's body returns: `Ok(true)` finished, `Ok(false)` stopped by a cancel, `Err` failed.
pub type JobResult = Result<bool, String>;

/// The job table (see the module docs).
pub struct Jobs {
    events: Arc<Events>,
    table: Mutex<BTreeMap<String, Arc<Job>>>,
    next_id: AtomicU64,
}

impl Jobs {
    /// An empty table whose jobs notify through `events`.
    pub fn new(events: Arc<Events>) -> Jobs {
        Jobs {
            events,
            table: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Job>>> {
        lock(&self.table)
    }

    /// Starts a job of type `kind` on `export`, running `body` on a thread of its own; returns
    /// its id. Refused while the export has a job that has not ended.
    pub fn start(
        &self,
        kind: &'static str,
        export: &str,
        body: impl FnOnce(&JobCtl) -> JobResult + Send + 'static,
    ) -> Result<String, JobError> {
        let mut table = self.lock();
        if let Some(j) = table
            .values()
            .find(|j| j.export == export && !j.lock().status.is_terminal())
        {
            return Err(JobError::ExportBusy {
                export: export.to_string(),
                id: j.id.clone(),
                status: j.lock().status,
            });
        }
        let id = format!("{kind}-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let job = Arc::new(Job {
            id: id.clone(),
            kind,
            export: export.to_string(),
            st: Mutex::new(State {
                status: JobStatus::Running,
                pause_requested: false,
                cancel_requested: false,
                error: None,
            }),
            cv: Condvar::new(),
            current: AtomicU64::new(0),
            total: AtomicU64::new(0),
            events: Arc::clone(&self.events),
            thread: Mutex::new(None),
        });
        let ctl = JobCtl {
            job: Arc::clone(&job),
        };
        // Announced before the thread can end it (events of one job arrive in order).
        self.events.emit(
            events::JOB_STATUS_CHANGE,
            serde_json::json!({"id": id, "type": kind, "export": export, "status": JobStatus::Running}),
        );
        let handle = std::thread::Builder::new()
            .name(format!("job {id}"))
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&ctl)))
                    .unwrap_or_else(|_| Err("internal error: the job panicked".into()));
                let job = &ctl.job;
                let mut st = job.lock();
                let status = match result {
                    Ok(true) => JobStatus::Concluded,
                    Ok(false) => JobStatus::Cancelled,
                    Err(e) => {
                        tracing::warn!(job = %job.id, error = %e, "job failed");
                        st.error = Some(e);
                        JobStatus::Failed
                    }
                };
                job.set_status(&mut st, status);
            })?;
        *lock(&job.thread) = Some(handle);
        tracing::info!(job = %id, kind, export, "job started");
        table.insert(id.clone(), job);
        Ok(id)
    }

    fn get(&self, id: &str) -> Result<Arc<Job>, JobError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| JobError::NoSuchJob(id.to_string()))
    }

    /// Every job, in id order.
    pub fn query(&self) -> Vec<JobInfo> {
        let jobs: Vec<Arc<Job>> = self.lock().values().cloned().collect();
        let mut out: Vec<JobInfo> = jobs.iter().map(|j| j.info()).collect();
        out.sort_by_key(|j| {
            let n: u64 =
                j.id.rsplit('-')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            n
        });
        out
    }

    /// Asks a running job to pause at its next pause point.
    pub fn pause(&self, id: &str) -> Result<(), JobError> {
        let job = self.get(id)?;
        let mut st = job.lock();
        if st.status != JobStatus::Running || st.pause_requested {
            return Err(JobError::BadState {
                id: id.to_string(),
                status: st.status,
                op: "pause",
            });
        }
        st.pause_requested = true;
        job.cv.notify_all();
        Ok(())
    }

    /// Resumes a paused job (or takes back a pause not reached yet).
    pub fn resume(&self, id: &str) -> Result<(), JobError> {
        let job = self.get(id)?;
        let mut st = job.lock();
        if !st.pause_requested || st.status.is_terminal() || st.cancel_requested {
            return Err(JobError::BadState {
                id: id.to_string(),
                status: st.status,
                op: "resume",
            });
        }
        st.pause_requested = false;
        job.cv.notify_all();
        Ok(())
    }

    /// Cancels a job: it finishes what is in flight, keeps what it did, and ends `cancelled`.
    /// Returns at once (the job reports `aborting` until then).
    pub fn cancel(&self, id: &str) -> Result<(), JobError> {
        let job = self.get(id)?;
        let mut st = job.lock();
        if st.status.is_terminal() {
            return Err(JobError::BadState {
                id: id.to_string(),
                status: st.status,
                op: "cancel",
            });
        }
        st.cancel_requested = true;
        job.set_status(&mut st, JobStatus::Aborting);
        Ok(())
    }

    /// Removes an ended job from the table.
    pub fn dismiss(&self, id: &str) -> Result<(), JobError> {
        let job = self.get(id)?;
        let status = job.lock().status;
        if !status.is_terminal() {
            return Err(JobError::BadState {
                id: id.to_string(),
                status,
                op: "dismiss",
            });
        }
        job.join();
        self.lock().remove(id);
        Ok(())
    }

    /// The id and status of `export`'s job that has not ended, if it has one.
    pub fn active_on(&self, export: &str) -> Option<(String, JobStatus)> {
        self.lock().values().find_map(|j| {
            let status = j.lock().status;
            (j.export == export && !status.is_terminal()).then(|| (j.id.clone(), status))
        })
    }

    /// Cancels the jobs of `export` (every export when `None`) and waits until they ended.
    pub fn cancel_and_wait(&self, export: Option<&str>) {
        let jobs: Vec<Arc<Job>> = self
            .lock()
            .values()
            .filter(|j| export.map_or(true, |e| j.export == e))
            .cloned()
            .collect();
        for job in &jobs {
            let mut st = job.lock();
            if !st.status.is_terminal() {
                st.cancel_requested = true;
                job.set_status(&mut st, JobStatus::Aborting);
            }
        }
        for job in &jobs {
            job.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn wait(jobs: &Jobs, id: &str, status: JobStatus) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while jobs.query().iter().find(|j| j.id == id).map(|j| j.status) != Some(status) {
            assert!(
                std::time::Instant::now() < deadline,
                "job never became {status:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_state_machine_pauses_resumes_cancels_and_dismisses() {
        let jobs = Jobs::new(Arc::new(Events::default()));
        let id = jobs
            .start("test", "vm1", |ctl| {
                let mut n = 0;
                while ctl.proceed() {
                    n += 1;
                    ctl.progress(n, 1_000_000);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Ok(false)
            })
            .expect("start");
        assert!(matches!(
            jobs.start("test", "vm1", |_| Ok(true)),
            Err(JobError::ExportBusy { .. })
        ));
        // What export-snapshot and export-resize consult before they close the disk.
        assert_eq!(
            jobs.active_on("vm1"),
            Some((id.clone(), JobStatus::Running))
        );
        assert_eq!(jobs.active_on("vm2"), None);
        jobs.pause(&id).expect("pause");
        wait(&jobs, &id, JobStatus::Paused);
        let a = jobs.query()[0].current_progress;
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            jobs.query()[0].current_progress,
            a,
            "no progress while paused"
        );
        assert!(jobs.dismiss(&id).is_err(), "a live job cannot be dismissed");
        jobs.resume(&id).expect("resume");
        wait(&jobs, &id, JobStatus::Running);
        std::thread::sleep(Duration::from_millis(20));
        assert!(jobs.query()[0].current_progress > a, "progress again");
        jobs.cancel(&id).expect("cancel");
        wait(&jobs, &id, JobStatus::Cancelled);
        assert_eq!(jobs.active_on("vm1"), None, "an ended job holds nothing");
        assert!(jobs.resume(&id).is_err());
        jobs.dismiss(&id).expect("dismiss");
        assert!(jobs.query().is_empty());
        // A failing job reports its error; a new job on the export may start after it ended.
        let id = jobs
            .start("test", "vm1", |_| Err("disk on fire".into()))
            .expect("start");
        wait(&jobs, &id, JobStatus::Failed);
        assert_eq!(jobs.query()[0].error.as_deref(), Some("disk on fire"));
        let ok = jobs.start("test", "vm1", |_| Ok(true)).expect("start");
        wait(&jobs, &ok, JobStatus::Concluded);
    }
}
