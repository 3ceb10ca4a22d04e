//! Online stream jobs on a running daemon, with real clients: a stream under a concurrent fio
//! verify workload on the same export; SIGKILL during a stream, restart, stream again; pause,
//! resume, cancel and `export-del` of an export with a running job. Each ends with the raw
//! image alone compared (`qemu-img compare`) with what the export served.
//!
//! Heavy and timing-sensitive (fio, rate-limited streams): `#[ignore]`, run one at a time by
//! scripts/test.sh.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use addcow_daemon_testkit::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// `dir/NAME.add-cow` (virtual size `size`) over a sparse base of `size * 3 / 4` bytes with
/// data in three regions and holes between them.
fn overlay(dir: &Path, name: &str, size: u64) -> PathBuf {
    let base = dir.join(format!("{name}-base.img"));
    let base_len = size * 3 / 4;
    let mut f = File::create(&base).expect("create base");
    f.set_len(base_len).expect("size base");
    for (off, n) in [(0, size / 8), (size / 4, size / 16), (base_len - MIB, MIB)] {
        let bytes: Vec<u8> = (off..off + n).map(|b| (b % 251) as u8 | 1).collect();
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&bytes).expect("write base");
    }
    let ov = dir.join(format!("{name}.add-cow"));
    addcow_engine::format::create(&addcow_engine::format::CreateOptions {
        overlay: ov.clone(),
        base: Some(base),
        image: Some(dir.join(format!("{name}.raw"))),
        size: Some(size),
        force: false,
    })
    .expect("create overlay");
    ov
}

/// Copies what `uri` serves into `out` (qemu-img convert over NBD).
fn snapshot(uri: &str, out: &Path) {
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    );
}

fn assert_same(a: &Path, b: &Path) {
    assert_identical(a.to_str().unwrap(), b.to_str().unwrap());
}

fn job(c: &mut Control, id: &str) -> Value {
    let jobs = c.ok("query-jobs", json!({}));
    jobs.as_array()
        .expect("array")
        .iter()
        .find(|j| j["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no job {id} in {jobs}"))
}

/// Waits (bounded) until `until` holds for job `id`; `what` names the wait in the failure.
fn wait_job(c: &mut Control, id: &str, what: &str, until: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let j = job(c, id);
        if until(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job never {what}: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until job `id` has `status`.
fn wait_status(c: &mut Control, id: &str, status: &str) -> Value {
    wait_job(c, id, &format!("became {status}"), |j| {
        assert!(
            !(j["status"] == "failed" && status != "failed"),
            "job failed: {j}"
        );
        j["status"] == status
    })
}

/// The statuses announced for job `id` by `job-status-change`, in order (from notifications
/// received so far).
fn announced(c: &mut Control, id: &str) -> Vec<String> {
    c.ok("query-jobs", json!({})); // collects notifications that arrived meanwhile
    c.notifications
        .iter()
        .filter(|n| n["method"] == "job-status-change" && n["params"]["id"] == id)
        .map(|n| n["params"]["status"].as_str().unwrap_or("").to_string())
        .collect()
}

fn export_complete(c: &mut Control, name: &str) -> bool {
    let ex = c.ok("query-exports", json!({}));
    ex.as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["complete"] == true)
        .unwrap_or_else(|| panic!("no export {name}: {ex}"))
}

#[test]
#[ignore = "heavy: fio verify against a stream; run by scripts/test.sh one at a time"]
fn online_stream_under_fio_verify() {
    let f = Fixture::new(MIB);
    let size = 128 * MIB;
    let ov = overlay(f.dir.path(), "vm", size);
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--control",
            control.to_str().unwrap(),
            "--export",
            &format!("vm={}", ov.display()),
        ],
    );
    let mut c = Control::connect(&control);
    let uri = d.uri_of("vm");
    // fio: two writers over 2 x 48 MiB (base data, base holes and past the base), random 4-64 KiB
    // blocks with crc32c headers, verified as they go (verify_backlog) and at the end of each of
    // six loops.
    let fio = std::process::Command::new("timeout")
        .args([
            "300",
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=48M",
            "--offset_increment=56M",
            "--loops=6",
            "--verify=crc32c",
            "--verify_backlog=64",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio (scripts/test.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.ok("query-stats", json!({"name": "vm"}))[0]["ops"]["write"]["requests"]
        .as_u64()
        .unwrap_or(0)
        < 100
    {
        assert!(Instant::now() < deadline, "fio never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    let id = c.ok(
        "job-start",
        json!({"type": "stream", "export": "vm", "rate": "48M"}),
    )["id"]
        .as_str()
        .expect("id")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let j = job(&mut c, &id);
        if j["status"] != "running" {
            break j;
        }
        assert!(Instant::now() < deadline, "stream never ended: {j}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut fio = fio;
    let overlapped = fio.try_wait().expect("fio").is_none();
    let out = fio.wait_with_output().expect("fio");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(done["status"], "concluded", "{done}");
    assert!(
        out.status.success(),
        "fio failed (verify errors?):\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).expect("JSON");
    let mut written = 0;
    for j in v["jobs"].as_array().expect("jobs") {
        assert_eq!(j["error"].as_i64(), Some(0), "{j}");
        written += j["write"]["io_bytes"].as_u64().unwrap_or(0);
    }
    assert!(written >= 2 * 48 * MIB, "fio wrote only {written} bytes");
    assert!(
        overlapped,
        "fio ended before the stream did: they did not overlap"
    );
    assert_eq!(done["current-progress"], done["total-progress"], "{done}");
    assert!(export_complete(&mut c, "vm"), "complete after the stream");
    let statuses = announced(&mut c, &id);
    assert_eq!(
        statuses,
        ["running", "concluded"],
        "job-status-change events"
    );
    // The raw image alone is what the export serves.
    let served = f.path("served.img");
    snapshot(&uri, &served);
    c.ok("export-del", json!({"name": "vm", "mode": "hard"}));
    assert_same(&f.path("vm.raw"), &served);
    d.stop();
}

#[test]
#[ignore = "kills the daemon mid-stream; run by scripts/test.sh one at a time"]
fn sigkill_during_online_stream_then_stream_again() {
    let f = Fixture::new(MIB);
    let size = 96 * MIB;
    let ov = overlay(f.dir.path(), "vm", size);
    let control = f.path("ctl.sock");
    let args = [
        "--control".to_string(),
        control.to_str().unwrap().to_string(),
        "--export".to_string(),
        format!("vm={}", ov.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start(&f.path("nbd.sock"), &args);
    let uri = d.uri_of("vm");
    qemu_io(
        &uri,
        &["write -P 0x5c 1m 3m", "write -P 0x5d 90m 64k", "flush"],
    );
    let reference = f.path("reference.img");
    snapshot(&uri, &reference);
    let mut c = Control::connect(&control);
    let id = c.ok(
        "job-start",
        json!({"type": "stream", "export": "vm", "rate": 16 * MIB}),
    )["id"]
        .as_str()
        .expect("id")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while job(&mut c, &id)["current-progress"].as_u64().unwrap_or(0) < 16 * MIB {
        assert!(Instant::now() < deadline, "stream made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A client's FLUSH makes what was streamed so far durable (the stream goes on meanwhile);
    // then the daemon dies mid-stream.
    qemu_io(&uri, &["flush"]);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit();
    drop(c);
    // The overlay is valid and reads what it read before.
    let o = std::process::Command::new(addcow_bin())
        .args(["check", ov.to_str().unwrap()])
        .output()
        .expect("check");
    assert!(
        o.status.success(),
        "check after SIGKILL: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let _ = std::fs::remove_file(&control);
    let d = Daemon::start(&f.path("nbd.sock"), &args);
    let mut c = Control::connect(&control);
    assert!(!export_complete(&mut c, "vm"), "killed before the end");
    let after_kill = f.path("after-kill.img");
    snapshot(&uri, &after_kill);
    assert_same(&after_kill, &reference);
    let id = c.ok("job-start", json!({"type": "stream", "export": "vm"}))["id"]
        .as_str()
        .expect("id")
        .to_string();
    let j = wait_status(&mut c, &id, "concluded");
    assert!(
        j["total-progress"].as_u64().unwrap() <= size - 16 * MIB,
        "the second stream continued from the bits: {j}"
    );
    assert!(export_complete(&mut c, "vm"));
    c.ok("export-del", json!({"name": "vm", "mode": "hard"}));
    assert_same(&f.path("vm.raw"), &reference);
    d.stop();
}

#[test]
#[ignore = "rate-limited stream timing; run by scripts/test.sh one at a time"]
fn pause_resume_cancel_and_export_del_of_a_streaming_export() {
    let f = Fixture::new(MIB);
    let size = 64 * MIB;
    let ov = overlay(f.dir.path(), "vm", size);
    let ov2 = overlay(f.dir.path(), "vm2", size);
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--control",
            control.to_str().unwrap(),
            "--export",
            &format!("vm={}", ov.display()),
            "--export",
            &format!("vm2={}", ov2.display()),
        ],
    );
    let uri = d.uri_of("vm");
    let reference = f.path("reference.img");
    snapshot(&uri, &reference);
    let mut c = Control::connect(&control);
    // Errors: unknown type, unknown export, bad rate, unknown job.
    for (params, needle) in [
        (
            json!({"type": "mirror", "export": "vm"}),
            "unknown job type",
        ),
        (json!({"type": "stream", "export": "nope"}), "no export"),
        (
            json!({"type": "stream", "export": "vm", "rate": "fast"}),
            "rate",
        ),
    ] {
        let e = c.call("job-start", params).expect_err("refused");
        assert!(e["message"].as_str().unwrap().contains(needle), "{e}");
    }
    let e = c
        .call("job-pause", json!({"id": "stream-999"}))
        .expect_err("no job");
    assert!(e["message"].as_str().unwrap().contains("no job"), "{e}");

    let id = c.ok(
        "job-start",
        json!({"type": "stream", "export": "vm", "rate": "8M"}),
    )["id"]
        .as_str()
        .expect("id")
        .to_string();
    let e = c
        .call("job-start", json!({"type": "stream", "export": "vm"}))
        .expect_err("one job per export");
    assert!(
        e["message"].as_str().unwrap().contains("already has job"),
        "{e}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while job(&mut c, &id)["current-progress"].as_u64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.ok("job-pause", json!({"id": id}));
    let paused = wait_status(&mut c, &id, "paused");
    std::thread::sleep(Duration::from_millis(1500));
    let still = job(&mut c, &id);
    assert_eq!(still["status"], "paused");
    assert_eq!(
        still["current-progress"], paused["current-progress"],
        "progress moved while paused"
    );
    assert!(
        c.call("job-dismiss", json!({"id": id})).is_err(),
        "dismiss a live job"
    );
    c.ok("job-resume", json!({"id": id}));
    wait_status(&mut c, &id, "running");
    let deadline = Instant::now() + Duration::from_secs(60);
    while job(&mut c, &id)["current-progress"] == paused["current-progress"] {
        assert!(Instant::now() < deadline, "no progress after resume");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.ok("job-cancel", json!({"id": id}));
    let cancelled = wait_status(&mut c, &id, "cancelled");
    assert!(
        cancelled["current-progress"].as_u64().unwrap()
            < cancelled["total-progress"].as_u64().unwrap(),
        "cancelled before the end: {cancelled}"
    );
    assert!(!export_complete(&mut c, "vm"));
    let statuses = announced(&mut c, &id);
    assert_eq!(
        statuses,
        ["running", "paused", "running", "aborting", "cancelled"],
        "job-status-change events"
    );
    // The partly streamed overlay serves what it served; a new stream completes it.
    let partial = f.path("partial.img");
    snapshot(&uri, &partial);
    assert_same(&partial, &reference);
    c.ok("job-dismiss", json!({"id": id}));
    assert!(c.ok("query-jobs", json!({})).as_array().unwrap().is_empty());
    let id = c.ok("job-start", json!({"type": "stream", "export": "vm"}))["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_status(&mut c, &id, "concluded");
    assert!(export_complete(&mut c, "vm"));

    // export-del of an export whose stream runs: the job is cancelled first, then the export
    // goes; the overlay stays valid.
    let id2 = c.ok(
        "job-start",
        json!({"type": "stream", "export": "vm2", "rate": "4M"}),
    )["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_status(&mut c, &id2, "running");
    c.ok("export-del", json!({"name": "vm2", "mode": "safe"}));
    assert_eq!(job(&mut c, &id2)["status"], "cancelled");
    let o = std::process::Command::new(addcow_bin())
        .args(["check", ov2.to_str().unwrap()])
        .output()
        .expect("check");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    c.ok("export-del", json!({"name": "vm", "mode": "hard"}));
    assert_same(&f.path("vm.raw"), &reference);
    d.stop();
}

/// Waits (bounded) until job `id` has ended; returns it.
fn wait_ended(c: &mut Control, id: &str) -> Value {
    wait_job(c, id, "ended", |j| {
        ["concluded", "failed", "cancelled"].contains(&j["status"].as_str().unwrap_or(""))
    })
}

#[test]
#[ignore = "races job-start against export-resize and export-snapshot; run by scripts/test.sh one at a time"]
fn a_job_start_racing_a_resize_or_a_snapshot_never_streams_a_closed_disk() {
    let f = Fixture::new(MIB);
    let size = 64 * MIB;
    let ov = overlay(f.dir.path(), "vm", size);
    let control = f.path("ctl.sock");
    let d = Daemon::start(
        &f.path("nbd.sock"),
        &[
            "--control",
            control.to_str().unwrap(),
            "--export",
            &format!("vm={}", ov.display()),
        ],
    );
    let mut c = Control::connect(&control);
    let (mut jobs, mut switches) = (0, 0);
    // Slow streams (1 MiB chunks at 8 MiB/s), so a job is still working when the switch it
    // raced comes: a job left holding a switched-away (closed) disk fails at its next chunk.
    let mut grown = size;
    for i in 0..30u64 {
        // Both calls leave at the same moment on two connections (two daemon threads).
        let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (g, path) = (gate.clone(), control.clone());
        let starter = std::thread::spawn(move || {
            let mut c = Control::connect(&path);
            g.wait();
            c.call(
                "job-start",
                json!({"type": "stream", "export": "vm", "rate": "8M"}),
            )
        });
        let mut other = Control::connect(&control);
        gate.wait();
        let switched = if i % 2 == 0 {
            other.call("export-resize", json!({"name": "vm", "size": grown + MIB}))
        } else {
            let snap = f.path(&format!("snap-{i}.add-cow"));
            other.call(
                "export-snapshot",
                json!({"name": "vm", "overlay": snap.to_str().unwrap()}),
            )
        };
        let started = starter.join().expect("job-start thread");
        match &switched {
            Ok(_) => {
                switches += 1;
                if i % 2 == 0 {
                    grown += MIB;
                }
            }
            Err(e) => assert_eq!(
                e["data"]["class"], "job-running",
                "refused for another reason: {e}"
            ),
        }
        if let Ok(r) = started {
            jobs += 1;
            let id = r["id"].as_str().expect("job id").to_string();
            std::thread::sleep(Duration::from_millis(300));
            let _ = c.call("job-cancel", json!({"id": id}));
            let j = wait_ended(&mut c, &id);
            assert_ne!(
                j["status"], "failed",
                "round {i}: the job streamed a disk that was switched away under it: {j}"
            );
            c.ok("job-dismiss", json!({"id": id}));
        }
    }
    eprintln!("race rounds: {jobs} jobs started, {switches} switches");
    assert!(
        jobs > 0 && switches > 0,
        "both sides won sometimes: {jobs} jobs, {switches} switches"
    );
    drop(d);
}
