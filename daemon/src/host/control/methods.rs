//! The control methods: one table of name, parameters and handler (the `job-*` handlers live in
//! `job_methods.rs`). Adding a method (say `export-resize`) is one more entry here and its
//! handler; `hello` announces every entry, and `addcow ctl` reads the parameter kinds from the
//! same table to turn `key=value` words into JSON.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::super::events;
use super::super::runtime::{DeleteMode, Host, HostError, Origin, Served};
use super::super::snapshot;
use super::super::throttle::ExportThrottle;
use super::super::vhost_export::VhostParams;
use super::backup;
use super::bitmaps;
use super::job_methods;
use super::record::{not_recorded, recorded};
use super::rpc::{params, NoParams, RpcError, INVALID_PARAMS, SERVER_ERROR};
use super::throttle;

/// What kind of value a parameter takes (for `addcow ctl`'s `key=value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Any string.
    Str,
    /// A file path (`addcow ctl` makes a relative one absolute).
    Path,
    /// true/false.
    Bool,
    /// One of the listed strings.
    Choice(&'static [&'static str]),
}

/// One parameter of a method.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// Its name in `params`.
    pub name: &'static str,
    /// Its kind.
    pub kind: Kind,
    /// Whether it must be given.
    pub required: bool,
}

/// One method: name, parameters, what it does, and its handler.
pub struct Method {
    /// The JSON-RPC method name.
    pub name: &'static str,
    /// Its parameters.
    pub params: &'static [Param],
    /// One line for `addcow ctl --help`.
    pub summary: &'static str,
    /// The handler: runs on the control connection's thread; may block (e.g. `export-del`).
    pub call: fn(&Host, Map<String, Value>) -> Result<Value, RpcError>,
}

const fn p(name: &'static str, kind: Kind, required: bool) -> Param {
    Param {
        name,
        kind,
        required,
    }
}

/// Every method the daemon serves.
pub const METHODS: &[Method] = &[
    Method {
        name: "hello",
        params: &[],
        summary: "version, methods and events of the daemon",
        call: hello,
    },
    Method {
        name: "export-add",
        params: &[
            p("name", Kind::Str, true),
            p("overlay", Kind::Path, true),
            p("read_only", Kind::Bool, false),
            p("type", Kind::Choice(&["nbd", "vhost-user-blk"]), false),
            p("addr", Kind::Path, false),
            p("num-queues", Kind::Str, false),
            p("writable", Kind::Bool, false),
            p("serial", Kind::Str, false),
            p("copy_on_read", Kind::Bool, false),
            p("tls-authz", Kind::Str, false),
            p("throttle", Kind::Str, false),
            p("throttle-group", Kind::Str, false),
            p("bitmaps", Kind::Str, false),
        ],
        summary: "open an overlay and export it under a name (visible to NBD LIST/GO at once); \
                  type vhost-user-blk also serves it to one vhost-user-blk frontend at a time \
                  on the Unix socket addr ({type: unix, path} or a path) with num-queues \
                  queues (default and at most the daemon's cores) and serial as GET_ID; \
                  copy_on_read: base reads are also copied into the raw image (default: the \
                  daemon's --copy-on-read); tls-authz: the TLS identities (client \
                  certificate DNs, PSK identities; a list or one string) allowed to use the \
                  export over NBD (others get ERR_POLICY, clients without TLS ERR_TLS_REQD); \
                  throttle: limits of its own (QEMU's keys: {\"iops-total\": 5000, ...} or \
                  \"iops-total=5000,bps-write=50M\"), or throttle-group: join a named group; \
                  bitmaps: dirty bitmaps of the disk served as qemu:dirty-bitmap:NAME",
        call: export_add,
    },
    Method {
        name: "export-set-throttle",
        params: &[
            p("name", Kind::Str, true),
            p("limits", Kind::Str, false),
            p("throttle-group", Kind::Str, false),
        ],
        summary: "change an export's throttling live (clients stay connected): limits of its \
                  own (an empty object removes them), or throttle-group: move it into a named \
                  group",
        call: throttle::export_set_throttle,
    },
    Method {
        name: "throttle-group-set",
        params: &[p("name", Kind::Str, true), p("limits", Kind::Str, true)],
        summary: "create a named throttle group, or change its limits live; exports join it \
                  with throttle-group and share its one budget",
        call: throttle::throttle_group_set,
    },
    Method {
        name: "throttle-group-del",
        params: &[p("name", Kind::Str, true)],
        summary: "delete a named throttle group (refused while an export is in it)",
        call: throttle::throttle_group_del,
    },
    Method {
        name: "query-throttle-groups",
        params: &[],
        summary: "every named throttle group: limits, member exports, throttled requests and \
                  time",
        call: throttle::query_throttle_groups,
    },
    Method {
        name: "bitmap-add",
        params: &[
            p("export", Kind::Str, true),
            p("name", Kind::Str, true),
            p("granularity", Kind::Str, false),
            p("persistent", Kind::Bool, false),
            p("disabled", Kind::Bool, false),
        ],
        summary: "add a dirty bitmap (changed-block tracking) to an export's disk: granularity \
                  bytes per bit (a power of two, 512 to 64M; default 64K), persistent (default \
                  true: kept in the overlay's .bitmaps sidecar, crash-safe), disabled (default \
                  false: records writes from now on)",
        call: bitmaps::bitmap_add,
    },
    Method {
        name: "bitmap-remove",
        params: &[p("export", Kind::Str, true), p("name", Kind::Str, true)],
        summary: "remove a dirty bitmap (refused while the export serves it over NBD)",
        call: bitmaps::bitmap_remove,
    },
    Method {
        name: "bitmap-clear",
        params: &[p("export", Kind::Str, true), p("name", Kind::Str, true)],
        summary: "clear a dirty bitmap (writes still in flight stay dirty)",
        call: bitmaps::bitmap_clear,
    },
    Method {
        name: "bitmap-enable",
        params: &[p("export", Kind::Str, true), p("name", Kind::Str, true)],
        summary: "make a dirty bitmap record writes",
        call: bitmaps::bitmap_enable,
    },
    Method {
        name: "bitmap-disable",
        params: &[p("export", Kind::Str, true), p("name", Kind::Str, true)],
        summary: "stop a dirty bitmap recording writes (its bits stay)",
        call: bitmaps::bitmap_disable,
    },
    Method {
        name: "bitmap-merge",
        params: &[
            p("export", Kind::Str, true),
            p("target", Kind::Str, true),
            p("sources", Kind::Str, true),
        ],
        summary: "make target dirty wherever any of sources (a list, or comma-separated) is",
        call: bitmaps::bitmap_merge,
    },
    Method {
        name: "query-bitmaps",
        params: &[p("export", Kind::Str, true)],
        summary: "an export's dirty bitmaps: name, granularity, enabled, persistent, dirty bytes",
        call: bitmaps::query_bitmaps,
    },
    Method {
        name: "tls-reload",
        params: &[],
        summary: "read the TLS credentials (--tls-creds, --tls-psk) again, as SIGHUP does: new \
                  connections use them, connections already up keep theirs",
        call: tls_reload,
    },
    Method {
        name: "export-del",
        params: &[
            p("name", Kind::Str, true),
            p("mode", Kind::Choice(&["safe", "hard"]), false),
        ],
        summary: "remove an export: safe (default) refuses while clients are connected; hard \
                  disconnects them after answering what is in flight; commits and unlocks the \
                  overlay, then emits export-deleted",
        call: export_del,
    },
    Method {
        name: "export-resize",
        params: &[p("name", Kind::Str, true), p("size", Kind::Str, true)],
        summary: "grow an export to size (bytes, or with K/M/G/T) without disconnecting its \
                  clients, who see the new size when they reconnect; shrinking is refused",
        call: export_resize,
    },
    Method {
        name: "query-exports",
        params: &[],
        summary: "every export: overlay, size, read-only, clients, allocation, throttle limits \
                  and group",
        call: query_exports,
    },
    Method {
        name: "query-stats",
        params: &[p("name", Kind::Str, false)],
        summary: "per export and operation: requests, bytes, errors, latency p50/p99/p99.9; \
                  commits, batch size, base bytes read, bits set",
        call: query_stats,
    },
    Method {
        name: "export-snapshot",
        params: &[p("name", Kind::Str, true), p("overlay", Kind::Path, true)],
        summary: "live snapshot: the export's overlay becomes the read-only base of a new \
                  overlay at OVERLAY (raw image next to it), which takes the writes from now \
                  on; clients stay connected; emits export-snapshot",
        call: export_snapshot,
    },
    Method {
        name: "job-start",
        params: &[
            p("type", Kind::Choice(&["stream"]), true),
            p("export", Kind::Str, true),
            p("rate", Kind::Str, false),
        ],
        summary: "start a job on an export (stream: copy every sector still read from the base \
                  into the raw image; rate in bytes/s, e.g. 50M); returns its id",
        call: job_methods::job_start,
    },
    Method {
        name: "query-jobs",
        params: &[],
        summary: "every job: id, type, export, status, current and total progress, error",
        call: job_methods::query_jobs,
    },
    Method {
        name: "job-pause",
        params: &[p("id", Kind::Str, true)],
        summary: "pause a running job at its next pause point (status paused)",
        call: job_methods::job_pause,
    },
    Method {
        name: "job-resume",
        params: &[p("id", Kind::Str, true)],
        summary: "resume a paused job",
        call: job_methods::job_resume,
    },
    Method {
        name: "job-cancel",
        params: &[p("id", Kind::Str, true)],
        summary: "cancel a job: it finishes what is in flight, keeps what it did (cancelled)",
        call: job_methods::job_cancel,
    },
    Method {
        name: "job-dismiss",
        params: &[p("id", Kind::Str, true)],
        summary: "remove an ended job (concluded, failed or cancelled) from query-jobs",
        call: job_methods::job_dismiss,
    },
    Method {
        name: "backup-begin",
        params: &[
            p("export", Kind::Str, true),
            p("checkpoint", Kind::Str, true),
            p("incremental", Kind::Str, false),
            p("target", Kind::Str, false),
            p("scratch", Kind::Path, false),
            p("granularity", Kind::Str, false),
        ],
        summary: "pull-mode backup: freeze the export at this instant and serve that frozen \
                  view as the read-only export target (default EXPORT-backup) while the guest \
                  keeps writing (copy-before-write into scratch, default OVERLAY.backup-scratch); \
                  checkpoint becomes a bitmap recording from this instant; with incremental, \
                  the view also serves qemu:dirty-bitmap:INCREMENTAL",
        call: backup::backup_begin,
    },
    Method {
        name: "backup-end",
        params: &[p("export", Kind::Str, true)],
        summary: "end the export's backup: its point-in-time export goes (clients disconnected \
                  after their requests are answered), the scratch is removed",
        call: backup::backup_end,
    },
    Method {
        name: "query-sockets",
        params: &[],
        summary: "per socket (nbd, vhost-user-blk, control): connections refused because their \
                  peer is not in the socket's allow-list",
        call: query_sockets,
    },
    Method {
        name: "quit",
        params: &[],
        summary: "shut the daemon down cleanly (as SIGTERM)",
        call: quit,
    },
];

/// The method called `name`.
pub fn find(name: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.name == name)
}

impl From<HostError> for RpcError {
    fn from(e: HostError) -> RpcError {
        match e {
            HostError::Throttle(t) => RpcError::from(t),
            e => RpcError::server(e.class(), e.to_string()),
        }
    }
}

fn hello(_: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let NoParams {} = params(p)?;
    let methods: Vec<Value> = METHODS
        .iter()
        .map(|m| {
            let params: Vec<Value> = m
                .params
                .iter()
                .map(|p| {
                    let kind = match p.kind {
                        Kind::Str => json!("string"),
                        Kind::Path => json!("path"),
                        Kind::Bool => json!("bool"),
                        Kind::Choice(c) => json!(c),
                    };
                    json!({"name": p.name, "type": kind, "required": p.required})
                })
                .collect();
            json!({"name": m.name, "summary": m.summary, "params": params})
        })
        .collect();
    Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": "jsonrpc-2.0",
        "features": METHODS.iter().map(|m| m.name).collect::<Vec<_>>(),
        "events": events::ALL,
        "methods": methods,
    }))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportAdd {
    name: String,
    overlay: PathBuf,
    #[serde(default)]
    read_only: bool,
    #[serde(default, rename = "type")]
    kind: ExportType,
    /// vhost-user-blk: `{"type": "unix", "path": P}` (qemu-storage-daemon's form) or `P`.
    #[serde(default)]
    addr: Option<Value>,
    /// vhost-user-blk: a number (or a string holding one).
    #[serde(default, rename = "num-queues")]
    num_queues: Option<Value>,
    /// qemu-storage-daemon's spelling of the opposite of `read_only`.
    #[serde(default)]
    writable: Option<bool>,
    /// vhost-user-blk: the GET_ID answer (at most 20 bytes are sent).
    #[serde(default)]
    serial: Option<String>,
    #[serde(default, alias = "copy-on-read")]
    copy_on_read: Option<bool>,
    /// The TLS identities allowed to use the export: a list of strings, or one string.
    #[serde(default, rename = "tls-authz", alias = "tls_authz")]
    tls_authz: Option<Value>,
    /// Limits of its own: an object of QEMU's keys, or `key=value,...`.
    #[serde(default)]
    throttle: Option<Value>,
    /// A named throttle group to join.
    #[serde(default, rename = "throttle-group")]
    throttle_group: Option<String>,
    /// Dirty bitmaps of the disk to serve as `qemu:dirty-bitmap:NAME` (a list, or one string).
    #[serde(default)]
    bitmaps: Option<Value>,
}

/// `tls-authz`: a non-empty list of non-empty strings (or one string).
fn tls_authz(v: &Option<Value>) -> Result<Option<Vec<String>>, RpcError> {
    let list = match v {
        None => return Ok(None),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid(format!("tls-authz {v:?}: expected a list of strings")))?,
        Some(other) => {
            return Err(invalid(format!(
                "tls-authz {other}: expected a list of strings"
            )))
        }
    };
    if list.is_empty() || list.iter().any(String::is_empty) {
        return Err(invalid(
            "tls-authz: give at least one identity, none empty".into(),
        ));
    }
    Ok(Some(list))
}

fn tls_reload(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let NoParams {} = params(p)?;
    let Some(tls) = host.tls.get() else {
        return Err(RpcError::new(
            INVALID_PARAMS,
            "tls-reload: TLS is off (start the daemon with --tls-creds or --tls-psk)",
        ));
    };
    tls.reload().map_err(|e| {
        RpcError::new(
            SERVER_ERROR,
            format!("tls-reload: {e}; the old credentials stay in use"),
        )
    })?;
    Ok(json!({}))
}

/// How `export-add` serves the export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ExportType {
    /// Over NBD only.
    #[default]
    Nbd,
    /// Over vhost-user-blk on its own socket, and over NBD.
    VhostUserBlk,
}

fn invalid(msg: String) -> RpcError {
    RpcError::new(INVALID_PARAMS, format!("invalid params: {msg}"))
}

/// The vhost-user-blk part of `export-add`, checked; `None` for type `nbd` (which refuses
/// vhost-only parameters).
fn vhost_params(a: &ExportAdd) -> Result<Option<VhostParams>, RpcError> {
    if a.kind == ExportType::Nbd {
        for (given, name) in [
            (a.addr.is_some(), "addr"),
            (a.num_queues.is_some(), "num-queues"),
            (a.serial.is_some(), "serial"),
        ] {
            if given {
                return Err(invalid(format!(
                    "{name} is a vhost-user-blk parameter; add type: \"vhost-user-blk\""
                )));
            }
        }
        return Ok(None);
    }
    let socket = match &a.addr {
        None => {
            return Err(invalid(
                "type vhost-user-blk needs addr (the socket path)".into(),
            ))
        }
        Some(Value::String(p)) => PathBuf::from(p),
        Some(Value::Object(o)) => match (o.get("type"), o.get("path"), o.len()) {
            (Some(Value::String(t)), Some(Value::String(p)), 2) if t == "unix" => PathBuf::from(p),
            (Some(Value::String(t)), _, _) if t != "unix" => {
                return Err(invalid(format!(
                "addr type {t:?}: vhost-user-blk is served on a Unix socket only (type \"unix\")"
            )))
            }
            _ => {
                return Err(invalid(format!(
                    "addr {}: expected {{\"type\": \"unix\", \"path\": PATH}}",
                    Value::Object(o.clone())
                )))
            }
        },
        Some(other) => {
            return Err(invalid(format!(
                "addr {other}: expected a socket path or {{\"type\": \"unix\", \"path\": PATH}}"
            )))
        }
    };
    let num_queues = match &a.num_queues {
        None => None,
        Some(v) => Some(
            match v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.trim().parse::<u64>().ok(),
                _ => None,
            }
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| invalid(format!("num-queues {v} is not a queue count")))?,
        ),
    };
    Ok(Some(VhostParams {
        socket,
        num_queues,
        serial: a.serial.clone(),
    }))
}

fn export_add(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let export = recorded(
        host,
        || add_export_params(host, p.clone(), Origin::Control),
        |r, _| r.added(&p),
    )?;
    let info = host
        .export_info()
        .into_iter()
        .find(|i| i.name == export.name)
        .map(|i| serde_json::to_value(i).unwrap_or_default())
        .unwrap_or_default();
    Ok(info)
}

/// Whether `p` are parameters export-add accepts (names and types; not whether the files
/// exist): for the configuration file's `[[export]]` tables.
pub fn check_export_params(p: &Map<String, Value>) -> Result<(), String> {
    let a: ExportAdd = params(p.clone()).map_err(|e| e.message)?;
    let vhost = vhost_params(&a).map_err(|e| e.message)?;
    if tls_authz(&a.tls_authz).map_err(|e| e.message)?.is_some() && vhost.is_some() {
        return Err("tls-authz applies to NBD exports; not with type vhost-user-blk".into());
    }
    if a.read_only && a.writable == Some(true) {
        return Err("read_only and writable: true contradict each other".into());
    }
    ExportThrottle::from_params(a.throttle.as_ref(), a.throttle_group.as_deref())
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Adds the export `p` (export-add's parameters) describes, as asked by `origin`: what
/// export-add does, and what the daemon does at start for the configuration's exports and the
/// state's.
pub fn add_export_params(
    host: &Host,
    p: Map<String, Value>,
    origin: Origin,
) -> Result<std::sync::Arc<crate::nbd::export::Export>, RpcError> {
    let a: ExportAdd = params(p)?;
    if a.read_only && a.writable == Some(true) {
        return Err(invalid(
            "read_only and writable: true contradict each other".into(),
        ));
    }
    let read_only = a.read_only || a.writable == Some(false);
    let opts = host.disk_options(read_only, a.copy_on_read);
    let authz = tls_authz(&a.tls_authz)?;
    let t = ExportThrottle::from_params(a.throttle.as_ref(), a.throttle_group.as_deref())?;
    let bitmaps = match &a.bitmaps {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("bitmaps: expected a list of bitmap names".into()))?,
        Some(other) => return Err(invalid(format!("bitmaps {other}: expected a list"))),
    };
    Ok(match vhost_params(&a)? {
        Some(_) if !bitmaps.is_empty() => {
            return Err(invalid(
                "bitmaps are served over NBD; not with type vhost-user-blk".into(),
            ))
        }
        None => {
            let served = Served {
                tls_authz: authz,
                bitmaps,
            };
            host.add_export_throttled(&a.name, &a.overlay, opts, origin, &t, served)?
        }
        Some(_) if authz.is_some() => {
            return Err(invalid(
                "tls-authz applies to NBD exports; not with type vhost-user-blk".into(),
            ))
        }
        Some(v) => {
            let joining = host.throttle_groups.join(&a.name, &t)?;
            let group = joining.group.clone();
            host.add_vhost_export(&a.name, &a.overlay, opts, origin, v, group)?
        }
    })
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportDel {
    name: String,
    #[serde(default = "safe")]
    mode: DeleteMode,
}

fn safe() -> DeleteMode {
    DeleteMode::Safe
}

fn export_del(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let d: ExportDel = params(p)?;
    let deleted = recorded(
        host,
        || Ok(host.delete_export(&d.name, d.mode)?),
        |r, _| r.deleted(&d.name),
    )?;
    Ok(serde_json::to_value(deleted).unwrap_or_default())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportResize {
    name: String,
    /// Bytes as a number, or a string with an optional K/M/G/T suffix (binary).
    size: Value,
}

fn export_resize(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let r: ExportResize = params(p)?;
    let size = match &r.size {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => parse_size::Config::new().with_binary().parse_size(s).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        RpcError::new(
            INVALID_PARAMS,
            format!(
                "invalid params: size {} is not a byte count (e.g. 1073741824 or \"20G\")",
                r.size
            ),
        )
    })?;
    let done = super::resize::resize_export(host, &r.name, size)?;
    Ok(serde_json::to_value(done).unwrap_or_default())
}

fn query_exports(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let NoParams {} = params(p)?;
    Ok(serde_json::to_value(host.export_info()).unwrap_or_default())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryStats {
    #[serde(default)]
    name: Option<String>,
}

fn query_stats(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let q: QueryStats = params(p)?;
    let stats = host.export_stats(q.name.as_deref())?;
    Ok(serde_json::to_value(stats).unwrap_or_default())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportSnapshot {
    name: String,
    overlay: PathBuf,
}

fn export_snapshot(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let s: ExportSnapshot = params(p)?;
    let snap = || {
        snapshot::snapshot_export(host, &s.name, &s.overlay)
            .map(|done| serde_json::to_value(done).unwrap_or_default())
            .map_err(|e| RpcError::server(e.class(), e.to_string()))
    };
    let Some(st) = host.state.get() else {
        return snap();
    };
    // Recorded on the new overlay before any write can reach it (see `state`); a target that
    // exists already is refused by the snapshot, and must not be what a restart serves.
    let mut r = st.lock();
    if std::fs::symlink_metadata(&s.overlay).is_ok() {
        return snap();
    }
    let before = r
        .snapshot_begin(&s.name, &s.overlay)
        .map_err(|e| not_recorded(st.path(), e))?;
    match snap() {
        Ok(done) => {
            let overlay = done["overlay"].clone();
            r.update_export(&s.name, |p| {
                p.insert("overlay".into(), overlay);
            })
            .map_err(|e| not_recorded(st.path(), e))?;
            Ok(done)
        }
        Err(e) => {
            if let Err(w) = r.restore(&s.name, before) {
                tracing::error!(export = %s.name, error = %w, "state: undoing the failed snapshot's record");
            }
            Err(e)
        }
    }
}

fn query_sockets(_host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    use crate::conn::listener::{refused, SocketKind};
    let NoParams {} = params(p)?;
    let mut out = Map::new();
    for k in SocketKind::ALL {
        out.insert(
            k.name().into(),
            json!({ "refused_connections": refused(k) }),
        );
    }
    Ok(Value::Object(out))
}

fn quit(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let NoParams {} = params(p)?;
    host.stop.request("quit on the control socket");
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter table `addcow ctl` uses agrees with what each handler accepts: a value of
    /// each declared kind is accepted (the call fails later, for want of a daemon state, but not
    /// with INVALID_PARAMS), and an undeclared parameter is refused.
    #[test]
    fn declared_params_match_the_handlers() {
        let sample = |k: Kind| match k {
            Kind::Str => json!("x"),
            Kind::Path => json!("/nonexistent/x.add-cow"),
            Kind::Bool => json!(true),
            Kind::Choice(c) => json!(c[0]),
        };
        for m in METHODS {
            let mut all = Map::new();
            for prm in m.params {
                all.insert(prm.name.into(), sample(prm.kind));
            }
            let mut extra = all.clone();
            extra.insert("no_such_param".into(), json!(1));
            // Parse-only check through each handler's own struct.
            let ok = match m.name {
                "hello" | "query-exports" | "query-sockets" | "quit" | "tls-reload" => {
                    params::<NoParams>(all).map(|_| ())
                }
                "export-add" => params::<ExportAdd>(all).map(|_| ()),
                "export-del" => params::<ExportDel>(all).map(|_| ()),
                "export-resize" => params::<ExportResize>(all).map(|_| ()),
                "query-stats" => params::<QueryStats>(all).map(|_| ()),
                "export-snapshot" => params::<ExportSnapshot>(all).map(|_| ()),
                "backup-begin" => params::<backup::BackupBegin>(all).map(|_| ()),
                "backup-end" => params::<backup::BackupEnd>(all).map(|_| ()),
                "job-start" => params::<job_methods::JobStart>(all).map(|_| ()),
                "query-jobs" => params::<NoParams>(all).map(|_| ()),
                "job-pause" | "job-resume" | "job-cancel" | "job-dismiss" => {
                    params::<job_methods::JobId>(all).map(|_| ())
                }
                "export-set-throttle" => params::<throttle::ExportSetThrottle>(all).map(|_| ()),
                "throttle-group-set" => params::<throttle::GroupSet>(all).map(|_| ()),
                "throttle-group-del" => params::<throttle::GroupName>(all).map(|_| ()),
                "query-throttle-groups" => params::<NoParams>(all).map(|_| ()),
                other => bitmaps::check_params(other, all)
                    .unwrap_or_else(|| panic!("method {other} has no parameter check here")),
            };
            assert!(ok.is_ok(), "{}: {ok:?}", m.name);
            let bad = match m.name {
                "hello" | "query-exports" | "query-sockets" | "quit" | "tls-reload" => {
                    params::<NoParams>(extra).map(|_| ())
                }
                "export-add" => params::<ExportAdd>(extra).map(|_| ()),
                "export-del" => params::<ExportDel>(extra).map(|_| ()),
                "export-resize" => params::<ExportResize>(extra).map(|_| ()),
                "export-snapshot" => params::<ExportSnapshot>(extra).map(|_| ()),
                "backup-begin" => params::<backup::BackupBegin>(extra).map(|_| ()),
                "backup-end" => params::<backup::BackupEnd>(extra).map(|_| ()),
                "job-start" => params::<job_methods::JobStart>(extra).map(|_| ()),
                "query-jobs" => params::<NoParams>(extra).map(|_| ()),
                "job-pause" | "job-resume" | "job-cancel" | "job-dismiss" => {
                    params::<job_methods::JobId>(extra).map(|_| ())
                }
                "export-set-throttle" => params::<throttle::ExportSetThrottle>(extra).map(|_| ()),
                "throttle-group-set" => params::<throttle::GroupSet>(extra).map(|_| ()),
                "throttle-group-del" => params::<throttle::GroupName>(extra).map(|_| ()),
                "query-throttle-groups" => params::<NoParams>(extra).map(|_| ()),
                other => bitmaps::check_params(other, extra.clone())
                    .unwrap_or_else(|| params::<QueryStats>(extra).map(|_| ())),
            };
            assert_eq!(bad.unwrap_err().code, INVALID_PARAMS, "{}", m.name);
        }
        // Wrong types and values say what is wrong.
        let e = params::<ExportAdd>(
            json!({"name": 5, "overlay": "/x"})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap_err();
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = params::<ExportDel>(
            json!({"name": "a", "mode": "soft"})
                .as_object()
                .unwrap()
                .clone(),
        )
        .unwrap_err();
        assert!(e.message.contains("soft"), "{}", e.message);
    }
}
