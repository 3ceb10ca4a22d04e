//! The read-only backend of a backup's point-in-time export ([`FleeceBackend`]: an engine
//! [`FleeceView`] as a [`Backend`]) and the table of backups running ([`Backups`], by the
//! export they freeze).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use addcow_engine::sync::{lock, read, write};
use addcow_engine::{
    Completion, Engine, Extent, FleeceStats, FleeceView, IoBuf, Request, RequestError,
};
use serde::Serialize;

use super::disk::Backend;

/// What a running backup is (as `query-exports` and `backup-end` report it).
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    /// The live export being backed up.
    pub export: String,
    /// The read-only export serving the point-in-time view.
    pub target: String,
    /// The checkpoint this backup is taken as.
    pub checkpoint: String,
    /// The checkpoint the backup is incremental to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incremental: Option<String>,
    /// The scratch file the copy-before-write goes to.
    pub scratch: PathBuf,
}

/// A point-in-time view served as a read-only export. Ended by [`FleeceBackend::end`]; a
/// request after that fails with `ESHUTDOWN`.
pub struct FleeceBackend {
    view: RwLock<Option<FleeceView>>,
    engine: Engine,
    size: u64,
    /// What the backup is.
    pub info: BackupInfo,
}

impl FleeceBackend {
    /// `view` (of a disk on `engine`) as a backend.
    pub fn new(view: FleeceView, engine: Engine, info: BackupInfo) -> FleeceBackend {
        FleeceBackend {
            size: view.size(),
            view: RwLock::new(Some(view)),
            engine,
            info,
        }
    }

    /// What the view has cost so far (`None` once ended).
    pub fn stats(&self) -> Option<FleeceStats> {
        read(&self.view).as_ref().map(FleeceView::stats)
    }

    /// Ends the view (writes to the live disk copy nothing from now on) and removes the
    /// scratch; returns what it cost. `None` if it was ended already.
    pub fn end(&self) -> Option<addcow_engine::Result<FleeceStats>> {
        let view = write(&self.view).take()?;
        let stats = view.stats();
        Some(view.end().map(|()| stats))
    }
}

impl Backend for FleeceBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn submit(&self, core: usize, req: Request, done: Completion) {
        match read(&self.view).as_ref() {
            Some(v) => v.submit(core, req, done),
            None => done(Err(RequestError {
                errno: libc::ESHUTDOWN,
                op: "read of an ended backup",
                offset: 0,
            })),
        }
    }
    fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        match read(&self.view).as_ref() {
            Some(v) => v.allocation(offset, len),
            // Ended: every read fails; report data (never a false zero).
            None => vec![Extent {
                offset,
                len: len.min(self.size.saturating_sub(offset)),
                kind: addcow_engine::ExtentKind::Image,
            }],
        }
    }
    fn alloc_buf(&self, len: usize) -> IoBuf {
        self.engine.alloc_buf_unzeroed(len)
    }
    fn fast_zero_unit(&self) -> Option<u64> {
        None
    }
}

/// The backups running, by the live export they freeze (one at a time per export).
#[derive(Default)]
pub struct Backups {
    by_export: Mutex<HashMap<String, Arc<FleeceBackend>>>,
}

impl Backups {
    /// Records `b` as the backup of its export; false if that export has one already.
    pub fn insert(&self, b: Arc<FleeceBackend>) -> bool {
        let mut m = lock(&self.by_export);
        if m.contains_key(&b.info.export) {
            return false;
        }
        m.insert(b.info.export.clone(), b);
        true
    }

    /// The backup of live export `export`.
    pub fn of(&self, export: &str) -> Option<Arc<FleeceBackend>> {
        lock(&self.by_export).get(export).cloned()
    }

    /// The backup whose point-in-time export is `target`.
    pub fn serving(&self, target: &str) -> Option<Arc<FleeceBackend>> {
        lock(&self.by_export)
            .values()
            .find(|b| b.info.target == target)
            .cloned()
    }

    /// Forgets the backup of `export`.
    pub fn remove(&self, export: &str) -> Option<Arc<FleeceBackend>> {
        lock(&self.by_export).remove(export)
    }

    /// Ends every backup (at shutdown): their scratch files are removed.
    pub fn end_all(&self) {
        let all: Vec<_> = lock(&self.by_export).drain().map(|(_, b)| b).collect();
        for b in all {
            if let Some(Err(e)) = b.end() {
                tracing::warn!(export = %b.info.export, error = %e, "ending a backup");
            }
        }
    }
}
