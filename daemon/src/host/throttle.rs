//! Per-export throttling as the daemon operates it: named throttle groups ([`ThrottleGroups`]),
//! the limits an export takes at `export-add` (`throttle`, `throttle-group`); the control
//! methods that change them live (`export-set-throttle`, `throttle-group-set`,
//! `throttle-group-del`, `query-throttle-groups`) are in `control/throttle.rs`.
//!
//! The engine enforces the limits (a throttle group is a handle on its budget; a disk given one
//! with `Disk::set_throttle` draws from it on whichever core serves it, for every front end).
//! The daemon decides who is in which group:
//!
//! * an export with a `throttle-group` joins that named group (made by `throttle-group-set` or
//!   `--throttle-group`); every member shares its one budget;
//! * an export with limits and no group gets a private group of its own, named after it (not in
//!   the named registry, so not listed by `query-throttle-groups` nor deletable);
//! * an export with neither has none.
//!
//! Changing a group's limits (`throttle-group-set`, or `export-set-throttle` on an export with
//! a private group) changes the budget in place: connected clients keep their connections and
//! their next requests are held to the new limits. A live snapshot or an online resize moves
//! the group to the new disk (`EngineDisk::switch`), so a switch never lifts a limit.
//!
//! Invariant: a named group in use by an export (or by an `export-add` under way) is never
//! deleted ([`ThrottleGroups::remove_unused`] checks both under the registry's lock).

use std::collections::BTreeMap;
use std::sync::Mutex;

use addcow_engine::qos::{LimitsError, ThrottleGroup, ThrottleLimits, ThrottleStats};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::nbd::export::Export;
use addcow_engine::sync::lock;

/// Every limit's name, QEMU's spelling (the JSON keys of [`ThrottleLimits`]).
pub const LIMIT_KEYS: [&str; 19] = [
    "iops-total",
    "iops-total-max",
    "iops-total-max-length",
    "iops-read",
    "iops-read-max",
    "iops-read-max-length",
    "iops-write",
    "iops-write-max",
    "iops-write-max-length",
    "bps-total",
    "bps-total-max",
    "bps-total-max-length",
    "bps-read",
    "bps-read-max",
    "bps-read-max-length",
    "bps-write",
    "bps-write-max",
    "bps-write-max-length",
    "iops-size",
];

/// Longest throttle group name.
pub const MAX_GROUP_NAME: usize = 128;

/// Why a throttle operation was refused. Every variant names what it refers to (the limit's
/// key, the group, the export).
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// A limit is unknown, not a number, or breaks QEMU's rules.
    #[error("throttle limit `{key}`: {reason}")]
    Invalid {
        /// The limit's name as given (`iops-total`, or the unknown key).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No named group has this name.
    #[error("no throttle group named {0:?} (create it with throttle-group-set)")]
    NoSuchGroup(String),
    /// The group still has members (or an export-add is joining it).
    #[error("throttle group {name:?} is in use by export(s) {members:?}; move them out first (export-set-throttle)")]
    InUse {
        /// The group.
        name: String,
        /// Its members (export names; `(export-add under way)` for a pending join).
        members: Vec<String>,
    },
    /// The name is empty, too long or has characters other than letters, digits, `-_.:@`.
    #[error("invalid throttle group name {0:?}: 1 to 128 of letters, digits and -_.:@")]
    BadName(String),
    /// `limits` and `throttle-group` given together.
    #[error("give either throttle limits or a throttle-group, not both")]
    Both,
    /// The export has no engine disk to hold a throttle group.
    #[error("export {0:?} has no engine disk to throttle")]
    NotThrottleable(String),
}

impl From<LimitsError> for ThrottleError {
    fn from(e: LimitsError) -> ThrottleError {
        ThrottleError::Invalid {
            key: e.key.to_string(),
            reason: e.reason,
        }
    }
}

impl ThrottleError {
    /// The error class sent as the JSON-RPC error's `data.class`.
    pub fn class(&self) -> &'static str {
        match self {
            ThrottleError::Invalid { .. } | ThrottleError::Both => "invalid-limits",
            ThrottleError::NoSuchGroup(_) => "no-such-group",
            ThrottleError::InUse { .. } => "group-in-use",
            ThrottleError::BadName(_) => "invalid-name",
            ThrottleError::NotThrottleable(_) => "not-throttleable",
        }
    }
}

fn is_size_key(key: &str) -> bool {
    key.starts_with("bps-") && !key.ends_with("-length") || key == "iops-size"
}

/// One limit's value: a number, or a string holding one (byte rates and `iops-size` also take
/// a binary suffix: `50M` is 50 MiB).
fn limit_value(key: &str, v: &Value) -> Result<u64, ThrottleError> {
    let bad = |reason: String| ThrottleError::Invalid {
        key: key.to_string(),
        reason,
    };
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| bad(format!("{n} is not a whole number >= 0"))),
        Value::String(s) => {
            let s = s.trim();
            if is_size_key(key) {
                parse_size::Config::new()
                    .with_binary()
                    .parse_size(s)
                    .map_err(|e| bad(format!("{s:?}: {e}")))
            } else {
                s.parse::<u64>()
                    .map_err(|_| bad(format!("{s:?} is not a whole number >= 0")))
            }
        }
        other => Err(bad(format!("{other} is not a number"))),
    }
}

/// Limits from `key=value` pairs (the command line's and `addcow ctl`'s form), checked as
/// [`parse_limits`] checks an object.
pub fn limits_from_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<ThrottleLimits, ThrottleError> {
    let mut m = Map::new();
    for (k, v) in pairs {
        if m.insert(k.to_string(), Value::String(v.to_string()))
            .is_some()
        {
            return Err(ThrottleError::Invalid {
                key: k.to_string(),
                reason: "given twice".into(),
            });
        }
    }
    parse_limits(&Value::Object(m))
}

/// Throttle limits from a control parameter: an object of QEMU's keys (numbers, or strings
/// like `"50M"` for byte rates), or a string `key=value,key=value`. Unknown keys are refused
/// by name; the result is validated ([`ThrottleLimits::validate`]). An empty object is no
/// limits, and a key given 0 is no limit (left out, as libvirt does).
pub fn parse_limits(v: &Value) -> Result<ThrottleLimits, ThrottleError> {
    let obj = match v {
        Value::Object(o) => o,
        Value::String(s) if s.trim().is_empty() => return Ok(ThrottleLimits::default()),
        Value::String(s) => {
            let mut pairs = Vec::new();
            for w in s.split(',') {
                let (k, val) = w.split_once('=').ok_or_else(|| ThrottleError::Invalid {
                    key: w.to_string(),
                    reason: "expected key=value".into(),
                })?;
                pairs.push((k.trim(), val.trim()));
            }
            return limits_from_pairs(pairs);
        }
        other => {
            return Err(ThrottleError::Invalid {
                key: "limits".into(),
                reason: format!("{other} is not an object of limits"),
            })
        }
    };
    let mut norm = Map::new();
    for (k, val) in obj {
        let Some(key) = LIMIT_KEYS.iter().find(|n| **n == k.as_str()) else {
            return Err(ThrottleError::Invalid {
                key: k.clone(),
                reason: format!("unknown limit (known: {})", LIMIT_KEYS.join(", ")),
            });
        };
        // 0 means no limit (libvirt's `<iotune>` and QEMU's options say so): the key is left
        // out, so limits of only zeros are no limits (no limited group is made).
        let n = limit_value(key, val)?;
        if n != 0 {
            norm.insert((*key).to_string(), json!(n));
        }
    }
    let limits: ThrottleLimits =
        serde_json::from_value(Value::Object(norm)).map_err(|e| ThrottleError::Invalid {
            key: "limits".into(),
            reason: e.to_string(),
        })?;
    limits.validate()?;
    Ok(limits)
}

/// A throttle group name: 1 to [`MAX_GROUP_NAME`] bytes of letters, digits and `-_.:@`.
pub fn check_group_name(name: &str) -> Result<(), ThrottleError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_GROUP_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ThrottleError::BadName(name.to_string()))
    }
}

/// What throttling an export is given: limits of its own, or a named group (or neither).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportThrottle {
    /// Its own limits (a private group); empty: none.
    pub limits: ThrottleLimits,
    /// The named group it joins.
    pub group: Option<String>,
}

impl ExportThrottle {
    /// From the `throttle` and `throttle-group` parameters of `export-add`.
    pub fn from_params(
        limits: Option<&Value>,
        group: Option<&str>,
    ) -> Result<ExportThrottle, ThrottleError> {
        let limits = limits.map(parse_limits).transpose()?.unwrap_or_default();
        if let Some(g) = group {
            check_group_name(g)?;
            if !limits.is_empty() {
                return Err(ThrottleError::Both);
            }
        }
        Ok(ExportThrottle {
            limits,
            group: group.map(str::to_string),
        })
    }
}

/// The daemon's named throttle groups, and the `export-add`s joining one right now.
#[derive(Debug, Default)]
pub struct ThrottleGroups {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    groups: BTreeMap<String, ThrottleGroup>,
    /// Group name -> `export-add`s that resolved it and have not published their export yet.
    joining: BTreeMap<String, usize>,
}

/// Held by an `export-add` from resolving its group until the export is published (or the add
/// failed): the group cannot be deleted meanwhile.
pub struct Joining<'a> {
    groups: &'a ThrottleGroups,
    name: Option<String>,
    /// The group the export gets (`None`: no throttling).
    pub group: Option<ThrottleGroup>,
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.name.take() {
            let mut r = lock(&self.groups.inner);
            if let Some(c) = r.joining.get_mut(&n) {
                *c -= 1;
                if *c == 0 {
                    r.joining.remove(&n);
                }
            }
        }
    }
}

impl ThrottleGroups {
    /// Creates group `name` with `limits`, or sets the limits of the existing one (members are
    /// held to them from their next request). True when it was created.
    pub fn set(&self, name: &str, limits: ThrottleLimits) -> Result<bool, ThrottleError> {
        check_group_name(name)?;
        limits.validate()?;
        let mut r = lock(&self.inner);
        match r.groups.get(name) {
            Some(g) => {
                g.set_limits(limits)?;
                Ok(false)
            }
            None => {
                let g = ThrottleGroup::new(name, limits)?;
                r.groups.insert(name.to_string(), g);
                Ok(true)
            }
        }
    }

    /// The named group `name`.
    pub fn get(&self, name: &str) -> Option<ThrottleGroup> {
        lock(&self.inner).groups.get(name).cloned()
    }

    /// Every named group, by name.
    pub fn all(&self) -> Vec<ThrottleGroup> {
        lock(&self.inner).groups.values().cloned().collect()
    }

    /// Whether `g` is one of the named groups (not an export's private one).
    pub fn is_named(&self, g: &ThrottleGroup) -> bool {
        lock(&self.inner)
            .groups
            .get(g.name())
            .is_some_and(|n| n.same_group(g))
    }

    /// The group an export added with `t` and called `export` gets: the named group (which
    /// cannot be deleted until the returned guard is dropped), a new private group, or none.
    pub fn join(&self, export: &str, t: &ExportThrottle) -> Result<Joining<'_>, ThrottleError> {
        if let Some(name) = &t.group {
            let mut r = lock(&self.inner);
            let g = r
                .groups
                .get(name)
                .cloned()
                .ok_or_else(|| ThrottleError::NoSuchGroup(name.clone()))?;
            *r.joining.entry(name.clone()).or_default() += 1;
            return Ok(Joining {
                groups: self,
                name: Some(name.clone()),
                group: Some(g),
            });
        }
        let group = if t.limits.is_empty() {
            None
        } else {
            Some(ThrottleGroup::new(export, t.limits)?)
        };
        Ok(Joining {
            groups: self,
            name: None,
            group,
        })
    }

    /// Deletes named group `name` unless an export is in it or joining it.
    pub fn remove_unused(
        &self,
        name: &str,
        members: impl FnOnce(&ThrottleGroup) -> Vec<String>,
    ) -> Result<(), ThrottleError> {
        let mut r = lock(&self.inner);
        let g = r
            .groups
            .get(name)
            .cloned()
            .ok_or_else(|| ThrottleError::NoSuchGroup(name.to_string()))?;
        let mut members = members(&g);
        if r.joining.get(name).is_some_and(|c| *c > 0) {
            members.push("(export-add under way)".into());
        }
        if !members.is_empty() {
            return Err(ThrottleError::InUse {
                name: name.to_string(),
                members,
            });
        }
        r.groups.remove(name);
        Ok(())
    }
}

/// The throttle group of export `e`'s current disk.
pub fn group_of(e: &Export) -> Option<ThrottleGroup> {
    e.backend.disk().and_then(|d| d.throttle())
}

/// Puts export `e`'s disk in `group` (`None`: out of any), with no disk switch able to run
/// meanwhile (a snapshot or resize then moves the new setting to its new disk).
pub fn set_export_group(e: &Export, group: Option<ThrottleGroup>) -> Result<(), ThrottleError> {
    match e.backend.engine_disk() {
        Some(ed) => ed.pinned(|d| d.set_throttle(group)),
        None => match e.backend.disk() {
            Some(d) => d.set_throttle(group),
            None => return Err(ThrottleError::NotThrottleable(e.name.clone())),
        },
    }
    Ok(())
}

/// What export `e`'s requests were held back since it was added (over every disk it had: a
/// snapshot or resize does not reset it).
pub fn export_stats(e: &Export) -> ThrottleStats {
    match e.backend.engine_disk() {
        Some(ed) => ed.throttle_stats(),
        None => e
            .backend
            .disk()
            .map(|d| d.throttle_stats())
            .unwrap_or_default(),
    }
}

/// Throttle counters as the control socket reports them.
#[derive(Debug, Clone, Serialize)]
pub struct StatsReport {
    /// Requests that had to wait for the budget.
    pub throttled_requests: u64,
    /// Total time they waited, in seconds.
    pub throttled_seconds: f64,
    /// Requests waiting now.
    pub queued: u64,
}

impl From<ThrottleStats> for StatsReport {
    fn from(s: ThrottleStats) -> StatsReport {
        StatsReport {
            throttled_requests: s.throttled_requests,
            throttled_seconds: s.throttled_ns as f64 / 1e9,
            queued: s.queued,
        }
    }
}

/// An export's throttling as `query-exports` shows it: the limits in force and, for a named
/// group, its name (`None` for both: not throttled).
pub fn describe(groups: &ThrottleGroups, e: &Export) -> (Option<ThrottleLimits>, Option<String>) {
    match group_of(e) {
        None => (None, None),
        Some(g) => {
            let named = groups.is_named(&g).then(|| g.name().to_string());
            (Some(g.limits()), named)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 0 is "no limit": `{"iops-total": 0}` is no limits at all, and a 0 beside a real limit
    /// is left out (so a burst length of 0 takes the default, not an invalid 0).
    #[test]
    fn a_zero_limit_is_no_limit() {
        assert!(parse_limits(&json!({"iops-total": 0})).unwrap().is_empty());
        assert!(parse_limits(&json!("bps-total=0,iops-read=0"))
            .unwrap()
            .is_empty());
        let l = parse_limits(&json!({"iops-total": 100, "bps-write": "0",
                                     "iops-total-max-length": 0}))
        .unwrap();
        assert_eq!(l.iops_total, Some(100));
        assert_eq!(l.bps_write, None);
        assert_eq!(l.iops_total_max_length, None);
        let e = ExportThrottle::from_params(Some(&json!({"iops-total": 0})), None).unwrap();
        assert!(e.limits.is_empty() && e.group.is_none());
    }
}
