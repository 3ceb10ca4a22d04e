//! Exports: the named disks a daemon serves, looked up by the handshake, and each export's
//! table of the connections in transmission on it.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use super::stats::ExportStats;
use super::wire;
use crate::backend::disk::Backend;
use addcow_engine::sync::{lock, read, wait, wait_timeout, write};

/// A connection in an export's client table, as the table needs it: stopped by an
/// `export-del`. The transport's per-connection handle implements it (so the protocol layer
/// does not depend on a transport).
pub trait Client: Send + Sync + std::fmt::Debug {
    /// Stops the connection's reader: no new request is read; in-flight ones are answered,
    /// then the connection closes.
    fn stop_reading(&self);
    /// Closes the connection's socket both ways (a client that does not read its replies).
    fn close(&self);
}

/// Whether an export takes new clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Serving,
    /// `export-del` began: invisible to LIST/GO, no client may attach.
    Deleting,
}

#[derive(Debug)]
struct Clients {
    state: State,
    conns: HashMap<u64, Arc<dyn Client>>,
}

/// Why an export could not start being deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteRefused {
    /// `safe` mode and clients are connected.
    Busy(usize),
    /// Another `export-del` of this export is under way.
    AlreadyDeleting,
}

/// One export: a name clients ask for, the disk behind it, its request statistics and the
/// connections in transmission on it.
pub struct Export {
    /// The export name ("" = the default export).
    pub name: String,
    /// The disk.
    pub backend: Arc<dyn Backend>,
    /// Request counters, one shard per engine core.
    pub stats: Arc<ExportStats>,
    clients: Mutex<Clients>,
    left: Condvar,
    /// The TLS identities (client certificate DNs, PSK identities) allowed to use this export;
    /// unset: everyone the daemon lets in. Set at most once, before the export is published.
    tls_authz: std::sync::OnceLock<Vec<String>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").field("name", &self.name).finish()
    }
}

/// A connection's membership of an export's client table; leaving the table (and waking an
/// `export-del` waiting for it) happens when this is dropped, also on unwinding.
pub struct Attached {
    export: Arc<Export>,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut c = self.export.lock_clients();
        c.conns.remove(&self.id);
        drop(c);
        self.export.left.notify_all();
    }
}

impl Export {
    /// An export of `backend` called `name`, counting on `shards` cores.
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>, shards: usize) -> Arc<Export> {
        Arc::new(Export {
            name: name.into(),
            backend,
            stats: Arc::new(ExportStats::new(shards)),
            clients: Mutex::new(Clients {
                state: State::Serving,
                conns: HashMap::new(),
            }),
            left: Condvar::new(),
            tls_authz: std::sync::OnceLock::new(),
        })
    }

    /// Restricts the export to TLS clients with one of these identities (see
    /// [`Export::tls_authz`]). Call before the export is published; a second call is ignored
    /// (and returns false).
    pub fn set_tls_authz(&self, identities: Vec<String>) -> bool {
        self.tls_authz.set(identities).is_ok()
    }

    /// The export's authorization list, if it has one: only TLS clients whose identity is on
    /// it may use the export.
    pub fn tls_authz(&self) -> Option<&[String]> {
        self.tls_authz.get().map(Vec::as_slice)
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, Clients> {
        lock(&self.clients)
    }

    /// Transmission flags for this export. `structured`: whether structured replies were
    /// negotiated (DF is only advertised then).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = wire::FLAG_HAS_FLAGS
            | wire::FLAG_SEND_FLUSH
            | wire::FLAG_SEND_FUA
            | wire::FLAG_CAN_MULTI_CONN
            | wire::FLAG_SEND_CACHE;
        if self.backend.read_only() {
            flags |= wire::FLAG_READ_ONLY;
        } else {
            flags |=
                wire::FLAG_SEND_TRIM | wire::FLAG_SEND_WRITE_ZEROES | wire::FLAG_SEND_FAST_ZERO;
        }
        if structured {
            flags |= wire::FLAG_SEND_DF;
        }
        flags
    }

    /// Adds connection `id` to the client table, unless a delete has begun (then `None`: the
    /// connection must close without serving).
    pub fn attach(self: &Arc<Self>, id: u64, handle: Arc<dyn Client>) -> Option<Attached> {
        let mut c = self.lock_clients();
        if c.state != State::Serving {
            return None;
        }
        c.conns.insert(id, handle);
        Some(Attached {
            export: Arc::clone(self),
            id,
        })
    }

    /// Connections in transmission on this export.
    pub fn client_count(&self) -> usize {
        self.lock_clients().conns.len()
    }

    /// Whether an `export-del` has begun.
    pub fn is_deleting(&self) -> bool {
        self.lock_clients().state == State::Deleting
    }

    /// Starts a delete: from now on no connection can attach. `safe`: refuse while clients are
    /// connected (checked under the same lock as [`Export::attach`], so none can slip in).
    /// Otherwise every client's reader is stopped: in-flight requests are answered, then the
    /// connections close.
    pub fn begin_delete(&self, safe: bool) -> Result<usize, DeleteRefused> {
        let mut c = self.lock_clients();
        if c.state == State::Deleting {
            return Err(DeleteRefused::AlreadyDeleting);
        }
        if safe && !c.conns.is_empty() {
            return Err(DeleteRefused::Busy(c.conns.len()));
        }
        c.state = State::Deleting;
        for h in c.conns.values() {
            h.stop_reading();
        }
        Ok(c.conns.len())
    }

    /// Waits until no client is left or `deadline` passes; returns whether none is left.
    pub fn wait_clients_gone(&self, deadline: Option<Instant>) -> bool {
        let mut c = self.lock_clients();
        while !c.conns.is_empty() {
            match deadline {
                None => c = wait(&self.left, c),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    c = wait_timeout(&self.left, c, left).0;
                }
            }
        }
        true
    }

    /// Closes every remaining client's socket both ways.
    pub fn close_clients(&self) {
        for h in self.lock_clients().conns.values() {
            h.close();
        }
    }
}

/// A claim on an export name while its overlay is being opened: no one else can take the name
/// meanwhile. Dropped unused, it frees the name.
pub struct NameClaim {
    exports: Arc<Exports>,
    name: String,
    used: bool,
}

impl NameClaim {
    /// The claimed name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Publishes `export` (named as claimed): LIST and GO see it from now on.
    pub fn publish(mut self, export: Arc<Export>) {
        let mut t = self.exports.write();
        t.pending.retain(|n| n != &self.name);
        t.list.push(export);
        self.used = true;
    }
}

impl Drop for NameClaim {
    fn drop(&mut self) {
        if !self.used {
            self.exports.write().pending.retain(|n| n != &self.name);
        }
    }
}

#[derive(Default)]
struct Table {
    list: Vec<Arc<Export>>,
    /// Names claimed by an `export-add` still opening its overlay.
    pending: Vec<String>,
}

/// The exports of a daemon, looked up by name. Changed at runtime by `export-add` and
/// `export-del`; read by the handshake (never on the request path: a connection holds its
/// export from GO on).
#[derive(Default)]
pub struct Exports {
    table: RwLock<Table>,
}

impl Exports {
    /// A table of `list` (names are unique; the caller checks).
    pub fn new(list: Vec<Arc<Export>>) -> Arc<Self> {
        Arc::new(Exports {
            table: RwLock::new(Table {
                list,
                pending: Vec::new(),
            }),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        read(&self.table)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        write(&self.table)
    }

    /// The export called `name` that clients may use (not being deleted).
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.read()
            .list
            .iter()
            .find(|e| e.name == name && !e.is_deleting())
            .cloned()
    }

    /// The export called `name`, also while it is being deleted.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.read().list.iter().find(|e| e.name == name).cloned()
    }

    /// The exports clients may use, in the order they were added.
    pub fn serving(&self) -> Vec<Arc<Export>> {
        self.read()
            .list
            .iter()
            .filter(|e| !e.is_deleting())
            .cloned()
            .collect()
    }

    /// Every export, also those being deleted, in the order they were added.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.read().list.clone()
    }

    /// Claims `name` for an export about to be added; `None` if it is taken (by an export,
    /// one being deleted, or another add under way).
    pub fn claim(self: &Arc<Self>, name: &str) -> Option<NameClaim> {
        let mut t = self.write();
        if t.list.iter().any(|e| e.name == name) || t.pending.iter().any(|n| n == name) {
            return None;
        }
        t.pending.push(name.to_string());
        Some(NameClaim {
            exports: Arc::clone(self),
            name: name.to_string(),
            used: false,
        })
    }

    /// Removes `export` from the table (its name is free again).
    pub fn remove(&self, export: &Arc<Export>) {
        self.write().list.retain(|e| !Arc::ptr_eq(e, export));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory;

    #[test]
    fn flags_follow_read_only_and_structured() {
        let rw = Export::new("", memory::MemDisk::new(4096, false), 1);
        let f = rw.transmission_flags(true);
        assert_eq!(f, 0x0ded);
        assert_eq!(rw.transmission_flags(false) & wire::FLAG_SEND_DF, 0);
        let ro = Export::new("ro", memory::MemDisk::new(4096, true), 1);
        let f = ro.transmission_flags(true);
        assert_ne!(f & wire::FLAG_READ_ONLY, 0);
        assert_eq!(f & wire::FLAG_SEND_TRIM, 0);
        assert_eq!(f & wire::FLAG_SEND_WRITE_ZEROES, 0);
        let t = Exports::new(vec![rw, ro]);
        assert!(t.find("ro").is_some());
        assert!(t.find("x").is_none());
    }
}
