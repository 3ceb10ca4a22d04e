//! `addcow ctl`: a control-socket client for people and scripts.
//!
//! `addcow ctl --control PATH METHOD [key=value ...]` sends one JSON-RPC request and prints the
//! result as a table (or the raw JSON result with `--json`). `key=value` words are typed by the
//! method's parameter table (the daemon's own, [`addcow_daemon::host::control::methods::METHODS`]):
//! booleans become `true`/`false`, paths are made absolute against the caller's folder, the rest
//! are strings; `key:=JSON` passes any JSON value as is. A JSON-RPC error prints its message on
//! stderr and exits 1.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::tools::human_size;
use addcow_daemon::host::control::methods::{self, Kind};

/// Arguments of `addcow ctl`.
#[derive(clap::Args, Debug)]
#[command(after_help = METHODS_HELP)]
pub struct CtlArgs {
    /// The daemon's control socket (`addcow serve --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Print the JSON result as the daemon sent it.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for the answer (export-del waits for clients and a commit).
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// The method: hello, export-add, export-del, export-resize, export-snapshot,
    /// query-exports, query-stats, query-sockets, tls-reload, job-start, query-jobs, job-pause, job-resume, job-cancel,
    /// job-dismiss, export-set-throttle, throttle-group-set, throttle-group-del,
    /// query-throttle-groups, bitmap-add, bitmap-remove, bitmap-clear, bitmap-enable,
    /// bitmap-disable, bitmap-merge, query-bitmaps, backup-begin, backup-end, quit.
    #[arg(value_name = "METHOD")]
    pub method: String,
    /// Parameters: key=value (typed by the method) or key:=JSON.
    #[arg(value_name = "KEY=VALUE")]
    pub params: Vec<String>,
}

const METHODS_HELP: &str = "Methods:
  hello                                         version, methods and events
  export-add name=NAME overlay=PATH [read_only=true]
                                                open an overlay and export it
  export-del name=NAME [mode=safe|hard]         remove an export (hard: disconnect clients)
  export-resize name=NAME size=SIZE            grow an export (new clients see the new size)
  query-exports                                 every export
  query-stats [name=NAME]                       requests, bytes, errors, latency per operation
  query-sockets                                 connections refused per socket (peer allow-lists)
  tls-reload                                    reload the TLS credentials (as SIGHUP)
  export-snapshot name=NAME overlay=PATH        live snapshot: PATH (new) takes the writes, the
                                                current overlay becomes its read-only base
  backup-begin export=NAME checkpoint=C [incremental=P] [granularity=64K]
                  [target=T] [scratch=PATH]
                                                serve the export frozen now as T (read-only);
                                                C records from now; with P, T also serves
                                                qemu:dirty-bitmap:P (what changed since P)
  backup-end export=NAME                        end the backup (T removed, scratch deleted)
  bitmap-add export=NAME name=B [granularity=64K] [persistent=false] [disabled=true]
                                                a dirty bitmap (changed-block tracking)
  bitmap-remove | bitmap-clear | bitmap-enable | bitmap-disable export=NAME name=B
                                                remove / clear / start / stop recording
  bitmap-merge export=NAME target=B sources=B1,B2
                                                B dirty wherever any source is
  query-bitmaps export=NAME                     the export's bitmaps and their dirty bytes
  job-start type=stream export=NAME [rate=50M]  stream the export's base into its raw image
  query-jobs                                    every job: status, progress, error
  job-pause id=ID | job-resume id=ID            pause / resume a job
  job-cancel id=ID | job-dismiss id=ID          cancel a job / remove an ended one
  export-add ... throttle=iops-total=N,bps-write=50M | throttle-group=G
                                                an export with limits of its own / in a group
  export-set-throttle name=NAME limits=iops-total=5000,bps-total=50M
                                                change its limits live (limits= removes them)
  export-set-throttle name=NAME throttle-group=G
                                                move it into named group G
  throttle-group-set name=G limits=iops-total=N,...
                                                create group G or change its limits live
  throttle-group-del name=G                     delete group G (refused while in use)
  query-throttle-groups                         every group: limits, members, throttled
                                                (limits keys: QEMU's iops-total, iops-read,
                                                iops-write, bps-*, each -max, -max-length;
                                                iops-size; limits:={\"iops-total\":5000} too)
  quit                                          shut the daemon down

Examples:
  addcow ctl --control /run/addcow.ctl export-add name=vm1 overlay=/vms/vm1.add-cow
  addcow ctl --control /run/addcow.ctl query-stats name=vm1
  addcow ctl --control /run/addcow.ctl job-start type=stream export=vm1 rate=50M
  addcow ctl --control /run/addcow.ctl export-set-throttle name=vm1 limits=iops-total=2000
  addcow ctl --control /run/addcow.ctl --json query-exports";

/// Turns `key=value` / `key:=json` words into the request's params, typed by `method`'s table.
pub fn build_params(method: &str, words: &[String]) -> Result<Map<String, Value>, String> {
    let table = methods::find(method).map(|m| m.params).unwrap_or(&[]);
    let mut out = Map::new();
    for w in words {
        let (key, value) = if let Some((k, v)) = w.split_once(":=") {
            let v: Value =
                serde_json::from_str(v).map_err(|e| format!("{w:?}: not valid JSON: {e}"))?;
            (k, v)
        } else if let Some((k, v)) = w.split_once('=') {
            let kind = table.iter().find(|p| p.name == k).map(|p| p.kind);
            let v = match kind {
                Some(Kind::Bool) => match v.to_ascii_lowercase().as_str() {
                    "true" | "yes" | "on" | "1" => Value::Bool(true),
                    "false" | "no" | "off" | "0" => Value::Bool(false),
                    _ => return Err(format!("{w:?}: {k} takes true or false")),
                },
                Some(Kind::Path) => {
                    let p = std::path::absolute(v).map_err(|e| format!("{w:?}: {e}"))?;
                    Value::String(p.to_string_lossy().into_owned())
                }
                _ => Value::String(v.to_string()),
            };
            (k, v)
        } else {
            return Err(format!("{w:?}: expected key=value or key:=JSON"));
        };
        if key.is_empty() {
            return Err(format!("{w:?}: empty key"));
        }
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

/// Sends one request on `control` and waits for its response (notifications are skipped).
pub fn call(
    control: &std::path::Path,
    method: &str,
    params: Map<String, Value>,
    timeout: Duration,
) -> Result<Result<Value, Value>, String> {
    let sock = UnixStream::connect(control)
        .map_err(|e| format!("{}: cannot connect: {e}", control.display()))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    let mut line = req.to_string();
    line.push('\n');
    (&sock)
        .write_all(line.as_bytes())
        .map_err(|e| format!("{}: {e}", control.display()))?;
    let mut r = BufReader::new(&sock);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = r
            .read_line(&mut buf)
            .map_err(|e| format!("{}: no answer within {timeout:?}: {e}", control.display()))?;
        if n == 0 {
            return Err(format!(
                "{}: the daemon closed the connection without answering",
                control.display()
            ));
        }
        let v: Value = serde_json::from_str(buf.trim_end())
            .map_err(|e| format!("bad answer from the daemon: {e}"))?;
        if v.get("id") != Some(&json!(1)) {
            continue; // a notification
        }
        if let Some(e) = v.get("error") {
            return Ok(Err(e.clone()));
        }
        return Ok(Ok(v.get("result").cloned().unwrap_or(Value::Null)));
    }
}

/// Runs `addcow ctl`.
pub fn run(args: CtlArgs) -> ExitCode {
    let params = match build_params(&args.method, &args.params) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("addcow ctl: {e}");
            return ExitCode::from(1);
        }
    };
    let timeout = Duration::from_secs(args.timeout.max(1));
    match call(&args.control, &args.method, params, timeout) {
        Err(e) => {
            eprintln!("addcow ctl: {e}");
            ExitCode::from(1)
        }
        Ok(Err(e)) => {
            let msg = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("error without a message");
            eprintln!("addcow ctl: {msg}");
            if args.json {
                println!("{}", json!({"error": e}));
            }
            ExitCode::from(1)
        }
        Ok(Ok(result)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&result).unwrap_or_default()
                );
            } else {
                print!("{}", render(&args.method, &result));
            }
            ExitCode::SUCCESS
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn size(v: &Value) -> String {
    v.as_u64().map(human_size).unwrap_or_else(|| "-".into())
}

fn yes_no(v: &Value) -> String {
    match v.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}

/// Lays out rows under a header, columns padded to their widest cell; columns whose header
/// starts with `>` are right-aligned.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let cols = header.len();
    let mut width: Vec<usize> = header
        .iter()
        .map(|h| h.trim_start_matches('>').chars().count())
        .collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let right = header[i].starts_with('>');
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                l.push_str("  ");
            }
            if right {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                if i + 1 < cols {
                    l.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(
        header.iter().map(|h| h.trim_start_matches('>')).collect(),
        &mut out,
    );
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// Operations in the order `query-stats` tables list them.
const OP_ORDER: &[&str] = &[
    "read",
    "write",
    "flush",
    "trim",
    "zeroes",
    "block-status",
    "cache",
    "other",
];

fn us(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_f64)
        .map(|x| format!("{x:.1}"))
        .unwrap_or_else(|| "-".into())
}

/// The text `addcow ctl` prints for `method`'s `result`.
pub fn render(method: &str, result: &Value) -> String {
    match method {
        "query-exports" => {
            let rows: Vec<Vec<String>> = result
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or(&[])
                .iter()
                .map(|e| {
                    vec![
                        s(&e["name"]),
                        s(&e["overlay"]),
                        size(&e["size"]),
                        yes_no(&e["read_only"]),
                        s(&e["clients"]),
                        size(&e["allocated_bytes"]),
                        yes_no(&e["complete"]),
                        if e["shutting_down"].as_bool() == Some(true) {
                            "deleting".into()
                        } else {
                            "serving".into()
                        },
                    ]
                })
                .collect();
            if rows.is_empty() {
                return "no exports\n".into();
            }
            table(
                &[
                    "NAME",
                    "OVERLAY",
                    ">SIZE",
                    "RO",
                    ">CLIENTS",
                    ">ALLOCATED",
                    "COMPLETE",
                    "STATE",
                ],
                &rows,
            )
        }
        "query-stats" => {
            let mut out = String::new();
            for e in result.as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&format!(
                    "export {:?}: {} client(s), {} request(s) in flight\n",
                    s(&e["name"]),
                    s(&e["clients"]),
                    s(&e["in_flight"])
                ));
                let mut rows = Vec::new();
                if let Some(ops) = e["ops"].as_object() {
                    // The daemon's order (JSON objects have none), then any other.
                    let mut names: Vec<&str> = OP_ORDER
                        .iter()
                        .copied()
                        .filter(|n| ops.contains_key(*n))
                        .collect();
                    names.extend(
                        ops.keys()
                            .map(String::as_str)
                            .filter(|k| !OP_ORDER.contains(k)),
                    );
                    for op in names {
                        let o = &ops[op];
                        let lat = &o["latency_us"];
                        rows.push(vec![
                            op.to_string(),
                            s(&o["requests"]),
                            size(&o["bytes"]),
                            s(&o["errors"]),
                            us(lat, "p50"),
                            us(lat, "p99"),
                            us(lat, "p999"),
                        ]);
                    }
                }
                out.push_str(&table(
                    &[
                        "OP",
                        ">REQUESTS",
                        ">BYTES",
                        ">ERRORS",
                        ">P50 us",
                        ">P99 us",
                        ">P99.9 us",
                    ],
                    &rows,
                ));
                out.push_str(&format!(
                    "commits: {} ({} failed), average batch {:.2}; base read: {}; bits set: {}\n",
                    s(&e["commits"]),
                    s(&e["commits_failed"]),
                    e["average_commit_batch"].as_f64().unwrap_or(0.0),
                    size(&e["base_bytes_read"]),
                    s(&e["bits_set"]),
                ));
                let t = &e["throttle"];
                if t["throttled_requests"].as_u64().unwrap_or(0) > 0
                    || t["queued"].as_u64().unwrap_or(0) > 0
                {
                    out.push_str(&format!(
                        "throttled: {} request(s), {:.3} s waiting, {} queued now\n",
                        s(&t["throttled_requests"]),
                        t["throttled_seconds"].as_f64().unwrap_or(0.0),
                        s(&t["queued"]),
                    ));
                }
            }
            if out.is_empty() {
                out.push_str("no exports\n");
            }
            out
        }
        "hello" => {
            let list = |v: &Value| {
                v.as_array()
                    .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            };
            format!(
                "addcow {} ({})\nmethods: {}\nevents:  {}\n",
                s(&result["version"]),
                s(&result["protocol"]),
                list(&result["features"]),
                list(&result["events"]),
            )
        }
        "export-add" => format!(
            "added export {:?}: {} ({}, {}, {} allocated)\n",
            s(&result["name"]),
            s(&result["overlay"]),
            size(&result["size"]),
            if result["read_only"].as_bool() == Some(true) {
                "read-only"
            } else {
                "read-write"
            },
            size(&result["allocated_bytes"]),
        ),
        "export-del" => format!(
            "deleted export {:?} ({} client(s) disconnected); overlay {} committed and unlocked\n",
            s(&result["name"]),
            s(&result["clients_disconnected"]),
            s(&result["overlay"]),
        ),
        "export-snapshot" => format!(
            "export {:?} now writes to {}; {} is its read-only base (the snapshot)\n",
            s(&result["name"]),
            s(&result["overlay"]),
            s(&result["base"]),
        ),
        "quit" => "daemon shutting down\n".into(),
        "job-start" => format!("started job {}\n", s(&result["id"])),
        "query-jobs" => {
            let rows: Vec<Vec<String>> = result
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or(&[])
                .iter()
                .map(|j| {
                    let (cur, total) = (&j["current-progress"], &j["total-progress"]);
                    let pct = match (cur.as_u64(), total.as_u64()) {
                        (Some(c), Some(t)) if t > 0 => {
                            format!("{:.1}%", c as f64 * 100.0 / t as f64)
                        }
                        _ => "-".into(),
                    };
                    vec![
                        s(&j["id"]),
                        s(&j["type"]),
                        s(&j["export"]),
                        s(&j["status"]),
                        size(cur),
                        size(total),
                        pct,
                        j.get("error").map(s).unwrap_or_default(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                return "no jobs\n".into();
            }
            table(
                &[
                    "ID", "TYPE", "EXPORT", "STATUS", ">DONE", ">TOTAL", ">%", "ERROR",
                ],
                &rows,
            )
        }
        _ => match result {
            Value::Object(m) if !m.is_empty() => {
                let rows: Vec<Vec<String>> = m
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(", "),
                            other => s(other),
                        };
                        vec![format!("{k}:"), v]
                    })
                    .collect();
                let mut t = table(&["", ""], &rows);
                // Drop the empty header line.
                t.drain(..t.find('\n').map(|i| i + 1).unwrap_or(0));
                t
            }
            Value::Object(_) => "ok\n".into(),
            other => format!(
                "{}\n",
                serde_json::to_string_pretty(other).unwrap_or_default()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_become_typed_params() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let p = build_params(
            "export-add",
            &w(&["name=123", "overlay=rel/x.add-cow", "read_only=yes"]),
        )
        .unwrap();
        assert_eq!(p["name"], json!("123"), "names stay strings");
        assert_eq!(p["read_only"], json!(true));
        let o = p["overlay"].as_str().unwrap();
        assert!(o.starts_with('/') && o.ends_with("rel/x.add-cow"), "{o}");
        assert!(build_params("export-add", &w(&["read_only=maybe"])).is_err());
        assert!(build_params("export-add", &w(&["novalue"])).is_err());
        let p = build_params("x", &w(&["a:=[1,2]", "b=c"])).unwrap();
        assert_eq!(p["a"], json!([1, 2]));
        assert_eq!(p["b"], json!("c"));
        assert!(build_params("x", &w(&["a:={"])).is_err());
    }

    #[test]
    fn help_names_every_method() {
        for m in methods::METHODS {
            assert!(
                METHODS_HELP.contains(m.name),
                "{} missing from ctl --help",
                m.name
            );
        }
    }

    #[test]
    fn jobs_render_as_a_table() {
        let r = serde_json::json!([{"id": "stream-1", "type": "stream", "export": "vm1",
            "status": "failed", "current-progress": 1 << 20, "total-progress": 4 << 20,
            "error": "stream of /vms/vm1.add-cow: read base at offset 0: EIO"}]);
        let t = render("query-jobs", &r);
        assert!(t.starts_with("ID"), "{t}");
        assert!(
            t.contains("stream-1") && t.contains("failed") && t.contains("25.0%"),
            "{t}"
        );
        assert!(t.contains("EIO"), "{t}");
        assert_eq!(render("query-jobs", &serde_json::json!([])), "no jobs\n");
        assert_eq!(
            render("job-start", &serde_json::json!({"id": "stream-2"})),
            "started job stream-2\n"
        );
    }

    #[test]
    fn stats_render_as_a_table() {
        let r = json!([{
            "name": "vm1", "clients": 1, "in_flight": 0,
            "ops": {
                "read": {"requests": 10, "bytes": 40960, "errors": 0, "in_flight": 0,
                         "latency_us": {"p50": 12.34, "p99": 100.0, "p999": 250.5}},
                "write": {"requests": 0, "bytes": 0, "errors": 0, "in_flight": 0,
                          "latency_us": null}
            },
            "commits": 3, "commits_failed": 0, "average_commit_batch": 1.5,
            "commit_bytes": 4096, "base_bytes_read": 8192, "bits_set": 16
        }]);
        let t = render("query-stats", &r);
        assert!(t.contains("export \"vm1\": 1 client(s)"), "{t}");
        let read = t.lines().find(|l| l.starts_with("read")).unwrap();
        let cols: Vec<&str> = read.split_whitespace().collect();
        assert_eq!(
            cols,
            ["read", "10", "40", "KiB", "0", "12.3", "100.0", "250.5"]
        );
        assert!(
            t.lines().any(|l| l.starts_with("write") && l.contains('-')),
            "{t}"
        );
        assert!(t.contains("average batch 1.50"), "{t}");
    }
}
