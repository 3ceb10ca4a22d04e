//! The dirty-bitmap verbs (QMP's `block-dirty-bitmap-*` in this daemon's vocabulary):
//! `bitmap-add`, `bitmap-remove`, `bitmap-clear`, `bitmap-enable`, `bitmap-disable`,
//! `bitmap-merge` and `query-bitmaps`, on an export's disk. Each change is durable in the
//! overlay's sidecar when the call returns (persistent bitmaps); it runs with the export's disk
//! pinned, so a live snapshot or resize cannot switch the disk under it. `bitmap-clear`,
//! `bitmap-enable` and an enabled `bitmap-add` hold the export's writes and flush first, so the
//! bitmap's reference point is durable (see `on_export_held`).

use addcow_engine::dirty::{DirtySet, DEFAULT_GRANULARITY};
use addcow_engine::Disk;
use serde_json::{json, Map, Value};
use std::sync::Arc;

use super::super::runtime::{Host, HostError};
use super::rpc::{params, RpcError, INVALID_PARAMS};
use crate::backend::disk::EngineDisk;
use crate::nbd::export::Export;

fn invalid(msg: String) -> RpcError {
    RpcError::new(INVALID_PARAMS, format!("invalid params: {msg}"))
}

fn engine_err(verb: &str, e: addcow_engine::Error) -> RpcError {
    match e.kind() {
        addcow_engine::ErrorKind::InvalidArgument(m) => invalid(format!("{verb}: {m}")),
        _ => RpcError::server("bitmap-failed", format!("{verb}: {e}")),
    }
}

/// Runs `f` on export `name` and its engine disk, if it is served from an overlay (the only
/// kind with bitmaps).
fn with_overlay<T>(
    host: &Host,
    name: &str,
    f: impl FnOnce(&Export, &EngineDisk) -> Result<T, RpcError>,
) -> Result<T, RpcError> {
    let export = host
        .exports
        .get(name)
        .filter(|e| !e.is_deleting())
        .ok_or_else(|| HostError::NoSuchExport(name.to_string()))?;
    let Some(ed) = export.backend.engine_disk() else {
        return Err(RpcError::server(
            "no-bitmaps",
            format!("export {name:?} is not an overlay: it has no bitmaps"),
        ));
    };
    f(&export, ed)
}

/// Runs `f` on export `name`'s disk and bitmaps, with the disk pinned; also hands `f` the
/// bitmaps the export serves over NBD.
fn on_export<T>(
    host: &Host,
    name: &str,
    f: impl FnOnce(&Disk, &Arc<DirtySet>, &[String]) -> Result<T, RpcError>,
) -> Result<T, RpcError> {
    with_overlay(host, name, |export, ed| {
        let exported = export.backend.exported_bitmaps();
        ed.pinned(|disk| f(disk, disk.bitmaps(), &exported))
    })
}

/// Like [`on_export`], with the export's writes held and the disk flushed before `f`: for a
/// change that makes a bitmap's reference point "now" (clear, add or enable). A write answered
/// before it may have its overlay bits only in memory; after a crash its sectors would read
/// older bytes again while the bitmap, clean there, says they did not change. The flush makes
/// every write answered before the reference point durable first, and none is answered
/// between the flush and `f`.
fn on_export_held<T>(
    host: &Host,
    name: &str,
    verb: &str,
    f: impl FnOnce(&Disk, &Arc<DirtySet>, &[String]) -> Result<T, RpcError>,
) -> Result<T, RpcError> {
    with_overlay(host, name, |export, ed| {
        let exported = export.backend.exported_bitmaps();
        ed.switch(|cur| {
            if export.is_deleting() {
                return (None, Err(HostError::NoSuchExport(name.to_string()).into()));
            }
            if !cur.disk.read_only() {
                if let Err(e) = cur.disk.flush() {
                    return (
                        None,
                        Err(RpcError::server(
                            "bitmap-failed",
                            format!("{verb}: flushing export {name:?}: {e}"),
                        )),
                    );
                }
            }
            (None, f(&cur.disk, cur.disk.bitmaps(), &exported))
        })
    })
}

/// A granularity: a number, or a string with an optional K/M suffix (binary).
pub(super) fn granularity(v: &Option<Value>) -> Result<u64, RpcError> {
    let bad = || invalid(format!("granularity {v:?}: a power of two from 512 to 64M"));
    match v {
        None => Ok(DEFAULT_GRANULARITY),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(bad),
        Some(Value::String(s)) => parse_size::Config::new()
            .with_binary()
            .parse_size(s.trim())
            .map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

fn flag(v: &Option<Value>, name: &str, default: bool) -> Result<bool, RpcError> {
    match v {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" || s == "on" => Ok(true),
        Some(Value::String(s)) if s == "false" || s == "off" => Ok(false),
        Some(other) => Err(invalid(format!("{name} {other}: expected true or false"))),
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Add {
    export: String,
    name: String,
    #[serde(default)]
    granularity: Option<Value>,
    #[serde(default)]
    persistent: Option<Value>,
    #[serde(default)]
    disabled: Option<Value>,
}

/// `bitmap-add {export, name, granularity?, persistent? (default true), disabled?}`.
pub fn bitmap_add(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let a: Add = params(p)?;
    let gran = granularity(&a.granularity)?;
    let persistent = flag(&a.persistent, "persistent", true)?;
    let disabled = flag(&a.disabled, "disabled", false)?;
    let add = |_: &Disk, set: &Arc<DirtySet>, _: &[String]| {
        set.add(&a.name, gran, persistent, !disabled)
            .map_err(|e| engine_err("bitmap-add", e))
    };
    if disabled {
        on_export(host, &a.export, add)?;
    } else {
        on_export_held(host, &a.export, "bitmap-add", add)?;
    }
    Ok(json!({}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Named {
    export: String,
    name: String,
}

/// `bitmap-remove {export, name}`: refused while the export serves it over NBD.
pub fn bitmap_remove(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let a: Named = params(p)?;
    on_export(host, &a.export, |_, set, exported| {
        if exported.contains(&a.name) {
            return Err(RpcError::server(
                "bitmap-busy",
                format!(
                    "bitmap-remove: export {:?} serves bitmap {:?} as qemu:dirty-bitmap:{}",
                    a.export, a.name, a.name
                ),
            ));
        }
        set.remove(&a.name)
            .map_err(|e| engine_err("bitmap-remove", e))
    })?;
    Ok(json!({}))
}

/// `bitmap-clear {export, name}`: afterwards only the granules of writes in flight are dirty.
pub fn bitmap_clear(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let a: Named = params(p)?;
    on_export_held(host, &a.export, "bitmap-clear", |_, set, _| {
        set.clear(&a.name)
            .map_err(|e| engine_err("bitmap-clear", e))
    })?;
    Ok(json!({}))
}

/// `bitmap-enable {export, name}`.
pub fn bitmap_enable(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let a: Named = params(p)?;
    on_export_held(host, &a.export, "bitmap-enable", |_, set, _| {
        set.set_enabled(&a.name, true)
            .map_err(|e| engine_err("bitmap-enable", e))
    })?;
    Ok(json!({}))
}

/// `bitmap-disable {export, name}`.
pub fn bitmap_disable(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let a: Named = params(p)?;
    on_export(host, &a.export, |_, set, _| {
        set.set_enabled(&a.name, false)
            .map_err(|e| engine_err("bitmap-disable", e))
    })?;
    Ok(json!({}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Merge {
    export: String,
    target: String,
    /// A list of names, or one string of comma-separated names.
    sources: Value,
}

/// `bitmap-merge {export, target, sources}`: target |= every source.
pub fn bitmap_merge(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let a: Merge = params(p)?;
    let sources: Vec<String> = match &a.sources {
        Value::String(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
        Value::Array(v) => v
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("sources: expected a list of bitmap names".into()))?,
        other => {
            return Err(invalid(format!(
                "sources {other}: expected a list of names"
            )))
        }
    };
    if sources.is_empty() || sources.iter().any(String::is_empty) {
        return Err(invalid("sources: name at least one bitmap".into()));
    }
    let refs: Vec<&str> = sources.iter().map(String::as_str).collect();
    on_export(host, &a.export, |_, set, _| {
        set.merge(&a.target, &refs)
            .map_err(|e| engine_err("bitmap-merge", e))
    })?;
    Ok(json!({}))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    export: String,
}

/// `query-bitmaps {export}`: every bitmap of the export's disk with its dirty byte count
/// (`count`, as QMP names it), whether the export serves it over NBD, and its part in a
/// running backup (`backup`: `"checkpoint"` for the bitmap that began recording at the
/// backup's instant, `"incremental"` for the one whose frozen copy the point-in-time export
/// serves; absent otherwise).
pub fn query_bitmaps(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let a: Query = params(p)?;
    let running = host.backups.of(&a.export).map(|b| b.info.clone());
    let role = |name: &str| -> Option<&'static str> {
        let b = running.as_ref()?;
        if b.checkpoint == name {
            Some("checkpoint")
        } else if b.incremental.as_deref() == Some(name) {
            Some("incremental")
        } else {
            None
        }
    };
    on_export(host, &a.export, |_, set, exported| {
        Ok(Value::Array(
            set.list()
                .into_iter()
                .map(|b| {
                    let mut v = json!({
                        "name": b.name,
                        "granularity": b.granularity,
                        "enabled": b.enabled,
                        "recording": b.enabled,
                        "persistent": b.persistent,
                        "dirty-bytes": b.dirty_bytes,
                        "count": b.dirty_bytes,
                        "exported": exported.contains(&b.name),
                    });
                    if let Some(r) = role(&b.name) {
                        v["backup"] = json!(r);
                    }
                    v
                })
                .collect(),
        ))
    })
}

/// Parses `p` with the parameter struct of bitmap method `method` (for the method table's test
/// that the declared parameters match the handlers); `None` for another method.
#[cfg(test)]
pub fn check_params(method: &str, p: Map<String, Value>) -> Option<Result<(), RpcError>> {
    Some(match method {
        "bitmap-add" => params::<Add>(p).map(|_| ()),
        "bitmap-remove" | "bitmap-clear" | "bitmap-enable" | "bitmap-disable" => {
            params::<Named>(p).map(|_| ())
        }
        "bitmap-merge" => params::<Merge>(p).map(|_| ()),
        "query-bitmaps" => params::<Query>(p).map(|_| ()),
        _ => return None,
    })
}
