//! The control methods that operate throttling live: `export-set-throttle`,
//! `throttle-group-set`, `throttle-group-del`, `query-throttle-groups` (the groups and limits
//! themselves are [`crate::host::throttle`]).

use serde_json::{json, Map, Value};

use super::super::runtime::{Host, HostError};
use super::super::throttle::{
    describe, group_of, parse_limits, set_export_group, ExportThrottle, StatsReport, ThrottleError,
};
use super::record::recorded;
use super::rpc::{params, RpcError, INVALID_PARAMS};
use crate::nbd::export::Export;
use addcow_engine::qos::ThrottleGroup;

impl From<ThrottleError> for RpcError {
    fn from(e: ThrottleError) -> RpcError {
        let mut r = match &e {
            ThrottleError::Invalid { .. } | ThrottleError::Both | ThrottleError::BadName(_) => {
                RpcError::new(INVALID_PARAMS, format!("invalid params: {e}"))
            }
            _ => RpcError::server(e.class(), e.to_string()),
        };
        let mut data = json!({ "class": e.class() });
        if let ThrottleError::Invalid { key, .. } = &e {
            data["key"] = json!(key);
        }
        r.data = Some(data);
        r
    }
}

/// The exports whose disk is in group `g`.
fn members(host: &Host, g: &ThrottleGroup) -> Vec<String> {
    host.exports
        .all()
        .iter()
        .filter(|e| group_of(e).is_some_and(|m| m.same_group(g)))
        .map(|e| e.name.clone())
        .collect()
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportSetThrottle {
    name: String,
    #[serde(default)]
    limits: Option<Value>,
    #[serde(default, rename = "throttle-group")]
    throttle_group: Option<String>,
}

/// `export-set-throttle {name, limits}` / `{name, throttle-group}`: new limits of the export's
/// own (an empty `limits` removes them), or moves it into a named group.
pub(super) fn export_set_throttle(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let s: ExportSetThrottle = params(p)?;
    if s.limits.is_none() && s.throttle_group.is_none() {
        return Err(RpcError::new(
            INVALID_PARAMS,
            "invalid params: give limits (an empty object removes them) or throttle-group",
        ));
    }
    let t = ExportThrottle::from_params(s.limits.as_ref(), s.throttle_group.as_deref())?;
    let change = || {
        let e = host
            .exports
            .get(&s.name)
            .ok_or_else(|| HostError::NoSuchExport(s.name.clone()))?;
        let current = group_of(&e);
        match (&t.group, current) {
            // Its own group already: change the budget in place (requests waiting are re-timed).
            (None, Some(g)) if !t.limits.is_empty() && !host.throttle_groups.is_named(&g) => {
                g.set_limits(t.limits).map_err(ThrottleError::from)?;
            }
            _ => {
                let joining = host.throttle_groups.join(&e.name, &t)?;
                set_export_group(&e, joining.group.clone())?;
            }
        }
        tracing::info!(export = ?e.name, group = ?t.group, limits = ?t.limits, "export throttle set");
        Ok(export_throttle_value(host, &e))
    };
    // A restarted daemon's export-add sets the same: `throttle-group`, or `throttle`, or
    // neither (the limits removed).
    recorded(host, change, |r, _| {
        r.update_export(&s.name, |p| {
            p.remove("throttle");
            p.remove("throttle-group");
            if let Some(g) = &t.group {
                p.insert("throttle-group".into(), json!(g));
            } else if !t.limits.is_empty() {
                p.insert("throttle".into(), json!(t.limits));
            }
        })
    })
}

fn export_throttle_value(host: &Host, e: &Export) -> Value {
    let (limits, group) = describe(&host.throttle_groups, e);
    json!({
        "name": e.name,
        "throttle": limits.unwrap_or_default(),
        "throttle-group": group,
    })
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupSet {
    name: String,
    limits: Value,
}

/// `throttle-group-set {name, limits}`: creates the named group or changes its limits.
pub(super) fn throttle_group_set(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let s: GroupSet = params(p)?;
    let limits = parse_limits(&s.limits)?;
    let change = || {
        let created = host.throttle_groups.set(&s.name, limits)?;
        tracing::info!(group = ?s.name, ?limits, created, "throttle group set");
        let g = host
            .throttle_groups
            .get(&s.name)
            .ok_or_else(|| ThrottleError::NoSuchGroup(s.name.clone()))?;
        let mut v = group_value(host, &g);
        v["created"] = json!(created);
        Ok(v)
    };
    recorded(host, change, |r, _| r.group_set(&s.name, limits))
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupName {
    name: String,
}

/// `throttle-group-del {name}`: deletes a named group no export is in.
pub(super) fn throttle_group_del(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let s: GroupName = params(p)?;
    let change = || {
        host.throttle_groups
            .remove_unused(&s.name, |g| members(host, g))?;
        tracing::info!(group = ?s.name, "throttle group deleted");
        Ok(json!({}))
    };
    recorded(host, change, |r, _| r.group_deleted(&s.name))
}

fn group_value(host: &Host, g: &ThrottleGroup) -> Value {
    json!({
        "name": g.name(),
        "limits": g.limits(),
        "members": members(host, g),
        "stats": StatsReport::from(g.stats()),
    })
}

/// `query-throttle-groups`: every named group with its limits, members and counters.
pub(super) fn query_throttle_groups(host: &Host, p: Map<String, Value>) -> Result<Value, RpcError> {
    let super::rpc::NoParams {} = params(p)?;
    Ok(Value::Array(
        host.throttle_groups
            .all()
            .iter()
            .map(|g| group_value(host, g))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::super::throttle::{check_group_name, MAX_GROUP_NAME};
    use super::*;

    #[test]
    fn limits_parse_from_objects_and_strings_and_name_bad_keys() {
        let l = parse_limits(&json!({"iops-total": 5000, "bps-write": "50M"})).unwrap();
        assert_eq!(l.iops_total, Some(5000));
        assert_eq!(l.bps_write, Some(50 << 20));
        let l = parse_limits(&json!("iops-read=10,bps-total=1G,iops-size=4K")).unwrap();
        assert_eq!(
            (l.iops_read, l.bps_total, l.iops_size),
            (Some(10), Some(1 << 30), Some(4096))
        );
        assert!(parse_limits(&json!({})).unwrap().is_empty());
        assert!(parse_limits(&json!("")).unwrap().is_empty());
        for (bad, key) in [
            (json!({"iops-totl": 1}), "iops-totl"),
            (json!({"iops-total": -1}), "iops-total"),
            (json!({"iops-total": "5k"}), "iops-total"),
            (json!({"bps-read": true}), "bps-read"),
            (json!("iops-write"), "iops-write"),
            (json!("iops-write=1,iops-write=2"), "iops-write"),
            (json!([1]), "limits"),
        ] {
            match parse_limits(&bad) {
                Err(ThrottleError::Invalid { key: k, .. }) => assert_eq!(k, key, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let e = RpcError::from(parse_limits(&json!({"nope": 1})).unwrap_err());
        assert_eq!(e.code, INVALID_PARAMS);
        assert_eq!(e.data.as_ref().unwrap()["key"], "nope");
        assert_eq!(e.data.as_ref().unwrap()["class"], "invalid-limits");
    }

    #[test]
    fn group_names_and_both_forms_are_checked() {
        assert!(check_group_name("tenant-1.gold").is_ok());
        for bad in ["", "a b", "x/y", &"g".repeat(MAX_GROUP_NAME + 1)] {
            assert!(matches!(
                check_group_name(bad),
                Err(ThrottleError::BadName(_))
            ));
        }
        assert!(matches!(
            ExportThrottle::from_params(Some(&json!({"iops-total": 1})), Some("g")),
            Err(ThrottleError::Both)
        ));
        let t = ExportThrottle::from_params(Some(&json!({})), Some("g")).unwrap();
        assert_eq!(t.group.as_deref(), Some("g"));
    }
}
