//! The state file (`addcow serve --state FILE`): what the control calls changed in the served
//! set, recorded durably before each call's reply, so that a restarted daemon serves exactly
//! what was served before.
//!
//! # What is recorded
//! Each export is kept as the `export-add` parameters it is served with (a JSON object), so a
//! parameter export-add learns is persisted with no code here. The file holds only what the
//! control socket changed; the configuration (command line, `--config` file) is not copied:
//!
//! * an export added at runtime: its parameters;
//! * a configuration export changed at runtime (snapshotted, deleted, deleted and added again,
//!   or updated with [`Recorder::update_export`]): its new parameters (`null`: deleted),
//!   together with the overlay the configuration named for it then (`replaces`), and the keys
//!   the runtime changed (`changed`: at start they are laid over the configuration's present
//!   parameters, so a later edit of another key such as `read-only` or `tls-authz` is
//!   followed). An export added (export-add) under a configuration export's name is marked
//!   `added`: a control client chose its overlay, so at start it is held to the allowed
//!   folders like any runtime export (only the configuration's own export and its snapshots
//!   keep the configuration's trust), and its parameters are served whole.
//!
//! Throttling: an export's limits (`export-set-throttle`) are its `throttle` / `throttle-group`
//! parameters (removing the limits removes both keys). Named throttle groups are kept under
//! `throttle-groups`, name -> `{limits}`, the same way as exports:
//!
//! * a group made or changed at runtime (`throttle-group-set`): its limits;
//! * a configuration group (`--throttle-group`, `throttle-group` in `[serve]`) changed or
//!   deleted at runtime: its new limits (`null`: deleted), together with the limits the
//!   configuration gave it then (`replaces`).
//!
//! A file without `throttle-groups` (written before groups were recorded) is read as recording
//! none; the key is written only when a group is recorded, so the version stays 1 (an older
//! daemon refuses a file that has it, naming the key, rather than forget the groups).
//!
//! # The rule between the configuration and the state (at start, [`State::open`])
//! * A configuration export whose recorded change `replaces` the overlay the configuration
//!   still names: the recorded change wins (a snapshotted export comes back on its new
//!   overlay, a deleted one stays deleted).
//! * A configuration export whose name the state records otherwise (added at runtime under a
//!   name the configuration took since, or changed at runtime while the configuration named
//!   another overlay): **the configuration wins**, the state's entry is dropped (logged). An
//!   operator who edits the configuration gets what it says.
//! * A recorded change of a configuration export the configuration no longer names: dropped
//!   (logged).
//! * Every other recorded export is served as recorded.
//!
//! Named throttle groups follow the same rule, the configuration's limits in place of its
//! overlay: a recorded change of a configuration group wins while the configuration still gives
//! it the limits it `replaces`; once the configuration gives it other limits, or no longer names
//! it, **the configuration wins** and the entry is dropped (logged). A configuration group
//! recorded as deleted that a configuration export served at start joins is made again
//! (logged: the configuration wins). The groups ([`State::groups`]) are made before any export
//! is added, so a recorded export with a `throttle-group` finds its group.
//!
//! A recorded export whose `throttle-group` neither the configuration nor the state makes any
//! more (the configuration dropped it) is served without limits, with a loud warning, rather
//! than not at all; its record keeps the group.
//!
//! An export that cannot be opened at start (a file gone, a folder no longer allowed) is
//! logged and kept in the state: it comes back once it can be opened again.
//!
//! # Durability and ordering
//! One daemon uses a state file at a time: it holds an OFD lock on `FILE.lock` beside it for
//! its lifetime, and a second daemon given the same file is refused at start.
//!
//! A change is written to `FILE.tmp` (beside it, `.`-prefixed, created afresh with `O_EXCL`
//! and `O_NOFOLLOW`), fsynced, renamed over `FILE`,
//! and the folder fsynced; only then does the control call reply
//! (`control::record::recorded`). The calls
//! that change the served set and record it run one at a time under the state's lock, so the
//! order of the records is the order of the changes. A crash at any point leaves the file
//! either before or after the change.
//!
//! A snapshot is recorded twice: before it starts (the new overlay, with the old one as
//! `fallback`), so that writes answered on the new overlay are never lost to a restart on the
//! old one, and after it ends (the fallback dropped; on failure the old entry back). At start
//! an export with a fallback is served on its new overlay if that opens, else on the fallback
//! (the rule of [`super::snapshot`]: the new overlay is durable before any request reaches
//! it).
//!
//! `export-resize` records nothing: the size is in the overlay's header, made durable by the
//! resize before its reply.
//!
//! # For new control verbs that change an export (bitmaps, ...)
//! Wrap the verb's effect in `control::record::recorded` and update the export's parameters in
//! its record closure, as `export-set-throttle` does (`control/throttle.rs`):
//!
//! ```ignore
//! super::record::recorded(host, || apply_limits(host, &name, &limits), |r, _| {
//!     r.update_export(&name, |p| { p.insert("throttle".into(), limits_json.clone()); })
//! })
//! ```
//!
//! so a restarted daemon's export-add (from these parameters) sets them again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use addcow_engine::qos::ThrottleLimits;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::process::seam;

/// The version written in the file; a file of another version is refused.
pub const VERSION: u32 = 1;

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing it failed.
    #[error("state file {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// Another running daemon uses it (its lock file, `FILE.lock`, is held): two daemons
    /// recording into one file would each forget the other's exports.
    #[error("state file {path}: used by another running daemon ({source}); give each daemon its own --state")]
    InUse {
        /// The file.
        path: PathBuf,
        /// The lock that could not be taken.
        source: crate::process::lockfile::LockError,
    },
    /// It is not a state file this daemon can read. The daemon refuses to start rather than
    /// forget the exports it records.
    #[error("state file {path}: {why} (move it away to start without the exports it records)")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// One configuration export (command line or `--config`), as [`State::open`] matches it.
#[derive(Debug, Clone)]
pub struct ConfigExport {
    /// Its name.
    pub name: String,
    /// Its overlay, as the configuration names it.
    pub overlay: PathBuf,
    /// Its export-add parameters.
    pub params: Map<String, Value>,
}

/// One export to serve at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Its export-add parameters.
    pub params: Map<String, Value>,
    /// Whether it is the configuration's, unchanged.
    pub from_config: bool,
    /// Whether it is served with the command line's trust (not held to the allowed folders):
    /// the configuration's exports, and the recorded changes of configuration exports (a
    /// snapshot of a command-line overlay outside the allowed folders stacks its new overlay,
    /// which is inside, on that one; its target was checked when it was taken). The other
    /// recorded exports, an export-add under a configuration export's name included, are held
    /// to the allowed folders again, as export-add.
    pub trusted: bool,
    /// The overlay to serve if `params`'s does not open (an interrupted snapshot's old one).
    pub fallback: Option<PathBuf>,
}

/// One recorded export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Its export-add parameters; `None`: a configuration export deleted at runtime.
    params: Option<Map<String, Value>>,
    /// The overlay the configuration named for this export when it was changed at runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replaces: Option<PathBuf>,
    /// A snapshot in progress: the overlay to serve if `params`'s does not open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fallback: Option<PathBuf>,
    /// Added by `export-add` under a configuration export's name (after an `export-del`): a
    /// control client chose its overlay, so it is held to the allowed folders at start like
    /// any export added at runtime, never trusted like the configuration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    added: bool,
    /// The parameters the runtime changed (`overlay` after a snapshot, `throttle`,
    /// `throttle-group`, ...) of a configuration export: at start they are laid over the
    /// configuration's present parameters, so a later edit of any other key (`read-only`,
    /// `tls-authz`, ...) is not hidden by the record. Empty in a file written before it was
    /// kept: `params` is then served as recorded.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    changed: std::collections::BTreeSet<String>,
}

/// One recorded named throttle group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupEntry {
    /// Its limits; `None`: a configuration group deleted at runtime.
    limits: Option<ThrottleLimits>,
    /// The limits the configuration gave this group when it was changed at runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replaces: Option<ThrottleLimits>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    exports: BTreeMap<String, Entry>,
    /// Absent in a file written before groups were recorded: none.
    #[serde(
        default,
        rename = "throttle-groups",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    throttle_groups: BTreeMap<String, GroupEntry>,
}

struct Inner {
    /// The configuration's exports, by name.
    config: BTreeMap<String, ConfigExport>,
    /// The configuration's named throttle groups, by name.
    config_groups: BTreeMap<String, ThrottleLimits>,
    /// What is recorded, as on disk.
    entries: BTreeMap<String, Entry>,
    /// The recorded throttle groups, as on disk.
    groups: BTreeMap<String, GroupEntry>,
}

/// The state file of a running daemon. See the module docs.
pub struct State {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// `FILE.lock`, locked (OFD) for as long as this daemon uses the file.
    _lock: crate::process::lockfile::LockedFile,
}

impl State {
    /// Reads `path` (absent: nothing recorded), matches it with the configuration's exports
    /// and named throttle groups (`config_groups`; the rule in the module docs), writes back
    /// what it keeps (which also proves the folder writable before anything is served), and
    /// returns what to serve, configuration first. The throttle groups to make before serving
    /// it are [`State::groups`].
    pub fn open(
        path: &Path,
        config: &[ConfigExport],
        config_groups: &[(String, ThrottleLimits)],
    ) -> Result<(State, Vec<Planned>), StateError> {
        let invalid = |why: String| StateError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        // The file itself is replaced by each save: the lock lives beside it.
        let mut lock_path = path.as_os_str().to_os_string();
        lock_path.push(".lock");
        let lock = crate::process::lockfile::LockedFile::acquire(Path::new(&lock_path)).map_err(
            |source| StateError::InUse {
                path: path.to_path_buf(),
                source,
            },
        )?;
        let (mut entries, mut groups) = match std::fs::read(path) {
            Ok(bytes) => {
                let disk: OnDisk =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Invalid {
                        path: path.to_path_buf(),
                        why: e.to_string(),
                    })?;
                if disk.version != VERSION {
                    return Err(StateError::Invalid {
                        path: path.to_path_buf(),
                        why: format!("version {} (this daemon reads {VERSION})", disk.version),
                    });
                }
                for (name, g) in &disk.throttle_groups {
                    super::throttle::check_group_name(name).map_err(|e| invalid(e.to_string()))?;
                    if let Some(l) = &g.limits {
                        l.validate().map_err(|e| {
                            invalid(format!(
                                "throttle group {name:?}: limit `{}`: {}",
                                e.key, e.reason
                            ))
                        })?;
                    }
                }
                (disk.exports, disk.throttle_groups)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (BTreeMap::new(), BTreeMap::new()),
            Err(source) => {
                return Err(StateError::Io {
                    path: path.to_path_buf(),
                    op: "reading",
                    source,
                })
            }
        };
        let mut plan = Vec::new();
        for c in config {
            match entries.get(&c.name) {
                Some(e) if e.replaces.as_deref() == Some(c.overlay.as_path()) => {
                    let e = entries.get_mut(&c.name).expect("matched above");
                    if let Some(p) = &mut e.params {
                        if !e.added && !e.changed.is_empty() {
                            *p = merge_changed(&c.params, p, &e.changed);
                        }
                        plan.push(Planned {
                            params: p.clone(),
                            from_config: false,
                            trusted: !e.added,
                            fallback: e.fallback.clone(),
                        });
                    }
                    continue;
                }
                Some(_) => {
                    tracing::warn!(export = %c.name, state = %path.display(),
                        "the configuration names this export anew: its recorded state is dropped");
                    entries.remove(&c.name);
                }
                None => {}
            }
            plan.push(Planned {
                params: c.params.clone(),
                from_config: true,
                trusted: true,
                fallback: None,
            });
        }
        let config: BTreeMap<String, ConfigExport> =
            config.iter().map(|c| (c.name.clone(), c.clone())).collect();
        entries.retain(|name, e| {
            if config.contains_key(name) {
                return true;
            }
            if e.replaces.is_some() {
                tracing::warn!(export = %name, state = %path.display(),
                    "the configuration no longer names this export: its recorded change is dropped");
                return false;
            }
            match &e.params {
                Some(p) => {
                    plan.push(Planned {
                        params: p.clone(),
                        from_config: false,
                        trusted: false,
                        fallback: e.fallback.clone(),
                    });
                    true
                }
                None => false,
            }
        });
        // Throttle groups: the same rule, the configuration's limits in place of its overlay.
        let config_groups: BTreeMap<String, ThrottleLimits> =
            config_groups.iter().cloned().collect();
        groups.retain(|name, g| match config_groups.get(name) {
            Some(c) if g.replaces.as_ref() == Some(c) => true,
            Some(_) => {
                tracing::warn!(group = %name, state = %path.display(),
                    "the configuration gives this throttle group new limits: its recorded state is dropped");
                false
            }
            None if g.replaces.is_some() => {
                tracing::warn!(group = %name, state = %path.display(),
                    "the configuration no longer names this throttle group: its recorded change is dropped");
                false
            }
            None => g.limits.is_some(),
        });
        // A configuration group deleted at runtime that an export served now joins (the
        // configuration's, its recorded change dropped above): the configuration wins.
        groups.retain(|name, g| {
            let joined = plan
                .iter()
                .any(|p| p.params.get("throttle-group").and_then(Value::as_str) == Some(name));
            if g.limits.is_none() && joined {
                tracing::warn!(group = %name, state = %path.display(),
                    "an export of the configuration joins this throttle group: it is no longer deleted");
                return false;
            }
            true
        });
        // A recorded export that joins a named group nobody makes any more (the configuration
        // dropped it): served without limits, loudly, rather than not at all. Its record keeps
        // the group, so it joins it again once the configuration names it again.
        let made = |name: &str| match groups.get(name) {
            Some(g) => g.limits.is_some(),
            None => config_groups.contains_key(name),
        };
        for p in plan.iter_mut().filter(|p| !p.from_config) {
            let Some(group) = p.params.get("throttle-group").and_then(Value::as_str) else {
                continue;
            };
            if !made(group) {
                let export = p.params.get("name").and_then(Value::as_str);
                tracing::warn!(export = %export.unwrap_or_default(), group = %group, state = %path.display(),
                    "THIS EXPORT IS SERVED WITHOUT LIMITS: the throttle group it joins is no longer in the configuration (name it again, or throttle-group-set it, then export-set-throttle)");
                p.params.remove("throttle-group");
            }
        }
        save(path, &entries, &groups)?;
        Ok((
            State {
                path: path.to_path_buf(),
                inner: Mutex::new(Inner {
                    config,
                    config_groups,
                    entries,
                    groups,
                }),
                _lock: lock,
            },
            plan,
        ))
    }

    /// The named throttle groups to serve, by name: the configuration's as changed at runtime,
    /// and those made at runtime. Made before the exports that join them are added.
    pub fn groups(&self) -> BTreeMap<String, ThrottleLimits> {
        let r = self.lock();
        let mut out = r.inner.config_groups.clone();
        for (n, g) in &r.inner.groups {
            match g.limits {
                Some(l) => out.insert(n.clone(), l),
                None => out.remove(n),
            };
        }
        out
    }

    /// Takes the state's lock: the served-set changes and their records happen one at a time
    /// (`control::record::recorded` holds it across a control call's change and its record).
    pub fn lock(&self) -> Recorder<'_> {
        Recorder {
            path: &self.path,
            inner: self.inner.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// The recorded export-add parameters of every export, by name (the configuration's
    /// exports included, as changed at runtime).
    pub fn exports(&self) -> BTreeMap<String, Map<String, Value>> {
        let r = self.lock();
        let mut out: BTreeMap<String, Map<String, Value>> = r
            .inner
            .config
            .iter()
            .map(|(n, c)| (n.clone(), c.params.clone()))
            .collect();
        for (n, e) in &r.inner.entries {
            match &e.params {
                Some(p) => out.insert(n.clone(), p.clone()),
                None => out.remove(n),
            };
        }
        out
    }
}

/// What an export's record was before [`Recorder::snapshot_begin`] changed it.
pub struct Before(Option<Entry>);

/// The state under its lock, to record changes with (each call durable when it returns).
pub struct Recorder<'a> {
    path: &'a Path,
    inner: MutexGuard<'a, Inner>,
}

impl Recorder<'_> {
    /// An export was added (export-add) with `params`.
    pub fn added(&mut self, params: &Map<String, Value>) -> io::Result<()> {
        let name = params
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let replaces = self.inner.config.get(&name).map(|c| c.overlay.clone());
        let added = replaces.is_some();
        self.put(
            &name,
            Some(Entry {
                params: Some(params.clone()),
                replaces,
                fallback: None,
                added,
                changed: Default::default(),
            }),
        )
    }

    /// Export `name` was deleted.
    pub fn deleted(&mut self, name: &str) -> io::Result<()> {
        let entry = self.inner.config.get(name).map(|c| Entry {
            params: None,
            replaces: Some(c.overlay.clone()),
            fallback: None,
            added: false,
            changed: Default::default(),
        });
        self.put(name, entry)
    }

    /// Changes the recorded parameters of export `name` with `f` (they are what a restarted
    /// daemon's export-add gets). An export the state does not know (none such) is left alone.
    pub fn update_export(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Map<String, Value>),
    ) -> io::Result<()> {
        let Some(mut params) = self.current(name) else {
            tracing::warn!(export = %name, "no such export in the state: nothing recorded");
            return Ok(());
        };
        let before = params.clone();
        f(&mut params);
        let (added, changed) = self.changes(name, &before, &params);
        let replaces = self.inner.config.get(name).map(|c| c.overlay.clone());
        self.put(
            name,
            Some(Entry {
                params: Some(params),
                replaces,
                fallback: None,
                added,
                changed,
            }),
        )
    }

    /// A snapshot of export `name` onto `overlay` is about to start: recorded on `overlay`
    /// with its present overlay as the fallback. Returns what to put back if it fails
    /// ([`Recorder::restore`]).
    pub fn snapshot_begin(&mut self, name: &str, overlay: &Path) -> io::Result<Before> {
        let Some(mut params) = self.current(name) else {
            return Ok(Before(self.inner.entries.get(name).cloned()));
        };
        let before = self.inner.entries.get(name).cloned();
        let fallback = params
            .get("overlay")
            .and_then(Value::as_str)
            .map(PathBuf::from);
        let old = params.clone();
        params.insert(
            "overlay".into(),
            Value::String(overlay.display().to_string()),
        );
        let (added, changed) = self.changes(name, &old, &params);
        let replaces = self.inner.config.get(name).map(|c| c.overlay.clone());
        self.put(
            name,
            Some(Entry {
                params: Some(params),
                replaces,
                fallback,
                added,
                changed,
            }),
        )?;
        Ok(Before(before))
    }

    /// Puts back what [`Recorder::snapshot_begin`] returned (the snapshot failed).
    pub fn restore(&mut self, name: &str, before: Before) -> io::Result<()> {
        self.put(name, before.0)
    }

    /// Whether export `name`'s record is an `export-add` under a configuration name (kept
    /// across its later changes), and the keys changed at runtime once `before` becomes
    /// `after`: those recorded already, and each key whose value differs.
    fn changes(
        &self,
        name: &str,
        before: &Map<String, Value>,
        after: &Map<String, Value>,
    ) -> (bool, std::collections::BTreeSet<String>) {
        let (added, mut changed) = match self.inner.entries.get(name) {
            Some(e) if e.params.is_some() => (e.added, e.changed.clone()),
            _ => (false, Default::default()),
        };
        if added || !self.inner.config.contains_key(name) {
            // Served from its recorded parameters whole: nothing to lay over.
            return (added, Default::default());
        }
        for k in before.keys().chain(after.keys()) {
            if before.get(k) != after.get(k) {
                changed.insert(k.clone());
            }
        }
        (added, changed)
    }

    /// The export-add parameters export `name` is served with.
    fn current(&self, name: &str) -> Option<Map<String, Value>> {
        match self.inner.entries.get(name) {
            Some(e) => e.params.clone(),
            None => self.inner.config.get(name).map(|c| c.params.clone()),
        }
    }

    /// Named throttle group `name` was made or given new `limits` (`throttle-group-set`).
    pub fn group_set(&mut self, name: &str, limits: ThrottleLimits) -> io::Result<()> {
        let replaces = self.inner.config_groups.get(name).copied();
        self.put_group(
            name,
            Some(GroupEntry {
                limits: Some(limits),
                replaces,
            }),
        )
    }

    /// Named throttle group `name` was deleted (`throttle-group-del`).
    pub fn group_deleted(&mut self, name: &str) -> io::Result<()> {
        let entry = self.inner.config_groups.get(name).map(|c| GroupEntry {
            limits: None,
            replaces: Some(*c),
        });
        self.put_group(name, entry)
    }

    /// Records `entry` for `name` (`None`: nothing recorded), durably, then in memory.
    fn put(&mut self, name: &str, entry: Option<Entry>) -> io::Result<()> {
        let mut next = self.inner.entries.clone();
        match entry {
            Some(e) => next.insert(name.to_string(), e),
            None => next.remove(name),
        };
        save(self.path, &next, &self.inner.groups).map_err(into_io)?;
        self.inner.entries = next;
        Ok(())
    }

    /// Records throttle group `entry` for `name` (`None`: nothing recorded), durably, then in
    /// memory.
    fn put_group(&mut self, name: &str, entry: Option<GroupEntry>) -> io::Result<()> {
        let mut next = self.inner.groups.clone();
        match entry {
            Some(e) => next.insert(name.to_string(), e),
            None => next.remove(name),
        };
        save(self.path, &self.inner.entries, &next).map_err(into_io)?;
        self.inner.groups = next;
        Ok(())
    }
}

/// A configuration export's parameters at start: the configuration's present `config`, with
/// each key in `changed` as the runtime left it in `recorded` (absent there: removed).
fn merge_changed(
    config: &Map<String, Value>,
    recorded: &Map<String, Value>,
    changed: &std::collections::BTreeSet<String>,
) -> Map<String, Value> {
    let mut out = config.clone();
    for k in changed {
        match recorded.get(k) {
            Some(v) => out.insert(k.clone(), v.clone()),
            None => out.remove(k),
        };
    }
    out
}

fn into_io(e: StateError) -> io::Error {
    match e {
        StateError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

impl State {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes `entries` and `groups` to `path` durably: a temporary file beside it, fsynced,
/// renamed over it, the folder fsynced.
fn save(
    path: &Path,
    entries: &BTreeMap<String, Entry>,
    groups: &BTreeMap<String, GroupEntry>,
) -> Result<(), StateError> {
    let io = |op: &'static str| {
        move |source: io::Error| StateError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let mut bytes = serde_json::to_vec_pretty(&OnDisk {
        version: VERSION,
        exports: entries.clone(),
        throttle_groups: groups.clone(),
    })
    .map_err(|e| io("encoding")(io::Error::other(e)))?;
    bytes.push(b'\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp"));
    seam::pause("state-write");
    // Only this daemon writes here (it holds `FILE.lock`): a temporary file left is a stale
    // one (a crash), removed; the new one is created afresh, never through a symlink.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io("removing a stale temporary file")(e))
        }
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(io("creating its temporary file"))?;
    f.write_all(&bytes).map_err(io("writing"))?;
    f.sync_all().map_err(io("fsync"))?;
    drop(f);
    seam::pause("state-synced");
    std::fs::rename(&tmp, path).map_err(io("renaming its temporary file over it"))?;
    seam::pause("state-renamed");
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync of its folder"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn cfg(name: &str, overlay: &str) -> ConfigExport {
        ConfigExport {
            name: name.into(),
            overlay: overlay.into(),
            params: params(json!({"name": name, "overlay": overlay})),
        }
    }

    fn names(plan: &[Planned]) -> Vec<(String, String, bool)> {
        plan.iter()
            .map(|p| {
                (
                    p.params["name"].as_str().unwrap().to_string(),
                    p.params["overlay"].as_str().unwrap().to_string(),
                    p.from_config,
                )
            })
            .collect()
    }

    /// An export-add under a configuration export's name (after its export-del) is a control
    /// client's overlay: held to the allowed folders at start, through its later snapshots and
    /// updates; a snapshot of the configuration's own export stays trusted.
    #[test]
    fn an_export_added_under_a_configuration_name_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let config = [cfg("a", "/a.add-cow"), cfg("b", "/b.add-cow")];
        {
            let (s, _) = State::open(&path, &config, &[]).unwrap();
            let mut r = s.lock();
            r.deleted("a").unwrap();
            r.added(&params(json!({"name": "a", "overlay": "/evil.add-cow"})))
                .unwrap();
            r.snapshot_begin("a", Path::new("/evil2.add-cow")).unwrap();
            r.update_export("a", |_| {}).unwrap();
            r.snapshot_begin("b", Path::new("/b2.add-cow")).unwrap();
            r.update_export("b", |_| {}).unwrap();
        }
        let (_s, plan) = State::open(&path, &config, &[]).unwrap();
        let trust: Vec<_> = plan
            .iter()
            .map(|p| (p.params["overlay"].as_str().unwrap(), p.trusted))
            .collect();
        assert_eq!(trust, [("/evil2.add-cow", false), ("/b2.add-cow", true)]);
    }

    /// A configuration export changed at runtime keeps what the runtime changed (its overlay
    /// after a snapshot, its limits) and takes every other key from the configuration as it is
    /// now: an edit of `read-only` or `tls-authz` after the change is not ignored.
    #[test]
    fn a_configuration_edit_reaches_an_export_changed_at_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let config = [cfg("a", "/a.add-cow")];
        {
            let (s, _) = State::open(&path, &config, &[]).unwrap();
            let mut r = s.lock();
            r.snapshot_begin("a", Path::new("/a2.add-cow")).unwrap();
            r.update_export("a", |_| {}).unwrap();
            r.update_export("a", |p| {
                p.insert("throttle".into(), json!({"iops-total": 100}));
            })
            .unwrap();
        }
        let mut edited = cfg("a", "/a.add-cow");
        edited.params.insert("read-only".into(), json!(true));
        edited.params.insert("tls-authz".into(), json!("/authz"));
        let (_s, plan) = State::open(&path, &[edited], &[]).unwrap();
        assert_eq!(
            Value::Object(plan[0].params.clone()),
            json!({"name": "a", "overlay": "/a2.add-cow", "read-only": true,
                   "tls-authz": "/authz", "throttle": {"iops-total": 100}})
        );
        assert!(plan[0].trusted);
    }

    /// A runtime export in a configuration group the configuration drops since: served
    /// without the group (not refused), its record keeping it.
    #[test]
    fn an_export_in_a_group_the_configuration_dropped_is_served_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let gold = [("gold".to_string(), limits(100))];
        {
            let (s, _) = State::open(&path, &[], &gold).unwrap();
            s.lock()
                .added(&params(
                    json!({"name": "b", "overlay": "/b.add-cow", "throttle-group": "gold"}),
                ))
                .unwrap();
        }
        let (_, plan) = State::open(&path, &[], &gold).unwrap();
        assert_eq!(plan[0].params["throttle-group"], "gold");
        let (s, plan) = State::open(&path, &[], &[]).unwrap();
        assert_eq!(names(&plan), [("b".into(), "/b.add-cow".into(), false)]);
        assert!(plan[0].params.get("throttle-group").is_none(), "{plan:?}");
        assert_eq!(s.exports()["b"]["throttle-group"], "gold");
    }

    /// A second user of one state file is refused while the first holds it, naming the file.
    #[test]
    fn a_state_file_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (first, _) = State::open(&path, &[], &[]).unwrap();
        let e = State::open(&path, &[], &[]).err().expect("refused");
        let msg = e.to_string();
        assert!(
            matches!(e, StateError::InUse { .. }) && msg.contains("state.json"),
            "{msg}"
        );
        drop(first);
        State::open(&path, &[], &[]).unwrap();
    }

    #[test]
    fn runtime_changes_come_back_and_the_configuration_wins_a_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let config = [cfg("a", "/a.add-cow"), cfg("b", "/b.add-cow")];
        {
            let (s, plan) = State::open(&path, &config, &[]).unwrap();
            assert_eq!(plan.len(), 2);
            let mut r = s.lock();
            r.added(&params(
                json!({"name": "c", "overlay": "/c.add-cow", "read_only": true}),
            ))
            .unwrap();
            r.added(&params(json!({"name": "d", "overlay": "/d.add-cow"})))
                .unwrap();
            r.deleted("b").unwrap();
            r.snapshot_begin("a", Path::new("/a2.add-cow")).unwrap();
            r.update_export("a", |_| {}).unwrap();
            r.deleted("d").unwrap();
            r.update_export("c", |p| {
                p.insert("throttle".into(), json!({"iops-total": 100}));
            })
            .unwrap();
        }
        let (s, plan) = State::open(&path, &config, &[]).unwrap();
        assert_eq!(
            names(&plan),
            [
                ("a".into(), "/a2.add-cow".into(), false),
                ("c".into(), "/c.add-cow".into(), false),
            ]
        );
        assert_eq!(plan[1].params["throttle"], json!({"iops-total": 100}));
        assert_eq!(s.exports().len(), 2);
        drop(s);

        // The configuration now names a new overlay for a, and takes the name c: it wins both;
        // b is deleted no more once the configuration names it anew.
        let config = [
            cfg("a", "/new-a.add-cow"),
            cfg("b", "/other-b.add-cow"),
            cfg("c", "/config-c.add-cow"),
        ];
        let (_, plan) = State::open(&path, &config, &[]).unwrap();
        assert_eq!(
            names(&plan),
            [
                ("a".into(), "/new-a.add-cow".into(), true),
                ("b".into(), "/other-b.add-cow".into(), true),
                ("c".into(), "/config-c.add-cow".into(), true),
            ]
        );
        // Dropped entries are gone from the file too.
        let (_, plan) = State::open(&path, &[], &[]).unwrap();
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn an_interrupted_snapshot_keeps_its_fallback_and_a_failed_one_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let config = [cfg("a", "/a.add-cow")];
        let (s, _) = State::open(&path, &config, &[]).unwrap();
        let before = s
            .lock()
            .snapshot_begin("a", Path::new("/a2.add-cow"))
            .unwrap();
        // What a restart would read, from a copy (the running one holds the file).
        let restart = || {
            let copy = dir.path().join("copy.json");
            std::fs::copy(&path, &copy).unwrap();
            State::open(&copy, &config, &[]).unwrap().1
        };
        let plan = restart();
        assert_eq!(plan[0].fallback.as_deref(), Some(Path::new("/a.add-cow")));
        assert_eq!(plan[0].params["overlay"], "/a2.add-cow");
        s.lock().restore("a", before).unwrap();
        let plan = restart();
        assert_eq!(names(&plan), [("a".into(), "/a.add-cow".into(), true)]);
    }

    fn limits(iops: u64) -> ThrottleLimits {
        ThrottleLimits {
            iops_total: Some(iops),
            ..ThrottleLimits::default()
        }
    }

    #[test]
    fn throttle_groups_come_back_and_the_configuration_wins_new_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let groups = [
            ("cfg".to_string(), limits(100)),
            ("gone".to_string(), limits(10)),
            ("kept".to_string(), limits(7)),
        ];
        {
            let (s, _) = State::open(&path, &[], &groups).unwrap();
            let mut r = s.lock();
            r.group_set("gold", limits(1000)).unwrap();
            r.group_set("gold", limits(2000)).unwrap();
            r.group_set("tmp", limits(5)).unwrap();
            r.group_deleted("tmp").unwrap();
            r.group_set("cfg", limits(300)).unwrap();
            r.group_deleted("gone").unwrap();
        }
        let (s, _) = State::open(&path, &[], &groups).unwrap();
        let want: BTreeMap<String, ThrottleLimits> = [
            ("cfg".to_string(), limits(300)),
            ("gold".to_string(), limits(2000)),
            ("kept".to_string(), limits(7)),
        ]
        .into();
        assert_eq!(s.groups(), want);
        drop(s);

        // The configuration gives cfg new limits and gone is joined by one of its exports:
        // the configuration wins both.
        let groups = [
            ("cfg".to_string(), limits(400)),
            ("gone".to_string(), limits(10)),
        ];
        let mut joins = cfg("a", "/a.add-cow");
        joins.params.insert("throttle-group".into(), json!("gone"));
        let (s, _) = State::open(&path, &[joins], &groups).unwrap();
        let want: BTreeMap<String, ThrottleLimits> = [
            ("cfg".to_string(), limits(400)),
            ("gold".to_string(), limits(2000)),
            ("gone".to_string(), limits(10)),
        ]
        .into();
        assert_eq!(s.groups(), want);
    }

    #[test]
    fn a_file_without_throttle_groups_loads_and_bad_groups_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(
            &path,
            r#"{"version": 1, "exports": {"b": {"params": {"name": "b", "overlay": "/b.add-cow"}}}}"#,
        )
        .unwrap();
        let (s, plan) = State::open(&path, &[], &[("g".into(), limits(1))]).unwrap();
        assert_eq!(names(&plan), [("b".into(), "/b.add-cow".into(), false)]);
        assert_eq!(s.groups().len(), 1);
        drop(s);
        std::fs::write(
            &path,
            r#"{"version": 1, "exports": {}, "throttle-groups": {"g": {"limits": {"iops-total-max": 5}}}}"#,
        )
        .unwrap();
        let e = State::open(&path, &[], &[]).err().unwrap().to_string();
        assert!(
            e.contains("throttle group \"g\"") && e.contains("iops-total-max"),
            "{e}"
        );
        std::fs::write(
            &path,
            r#"{"version": 1, "exports": {}, "throttle-groups": {"a b": {"limits": {}}}}"#,
        )
        .unwrap();
        let e = State::open(&path, &[], &[]).err().unwrap().to_string();
        assert!(e.contains("a b"), "{e}");
    }

    #[test]
    fn a_bad_file_is_refused_and_nothing_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{not json").unwrap();
        let e = State::open(&path, &[], &[]).err().unwrap();
        assert!(e.to_string().contains("state.json"), "{e}");
        std::fs::write(&path, r#"{"version": 9, "exports": {}}"#).unwrap();
        assert!(State::open(&path, &[], &[])
            .err()
            .unwrap()
            .to_string()
            .contains("version 9"));
        std::fs::remove_file(&path).unwrap();
        State::open(&path, &[], &[]).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("state.json")]);
    }
}
