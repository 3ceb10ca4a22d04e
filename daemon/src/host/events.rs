//! Notifications to control clients: one broadcaster, many subscribers.
//!
//! A notification is a JSON-RPC 2.0 notification (`{"jsonrpc":"2.0","method":EVENT,
//! "params":{...}}`, no `id`), encoded once and handed to every live subscriber. Delivery never
//! blocks the emitter: a subscriber queues the line for its own writer, and one that cannot keep
//! up is disconnected by its own rules (see `control`). New events are a new name in [`ALL`] and
//! an [`Events::emit`] where they happen.

use addcow_engine::sync::lock;
use std::sync::{Arc, Mutex, Weak};

/// An export finished being deleted (`export-del`): its overlay is committed and unlocked.
pub const EXPORT_DELETED: &str = "export-deleted";
/// A live snapshot (`export-snapshot`) switched an export to its new overlay.
pub const EXPORT_SNAPSHOT: &str = "export-snapshot";
/// The daemon began its shutdown (`quit`, SIGTERM or SIGINT).
pub const SHUTDOWN: &str = "shutdown";
/// A job changed status (see `jobs`): `{id, type, export, status}`.
pub const JOB_STATUS_CHANGE: &str = "job-status-change";
/// Every event the daemon emits (announced by `hello`).
pub const ALL: &[&str] = &[EXPORT_DELETED, SHUTDOWN, EXPORT_SNAPSHOT, JOB_STATUS_CHANGE];

/// Where notifications go: a control connection's reply queue.
pub trait Sink: Send + Sync {
    /// Queues one encoded line (with its newline). Must not block; returns false when the
    /// subscriber is gone (it is then forgotten).
    fn deliver(&self, line: &Arc<[u8]>) -> bool;
}

/// See the module docs.
#[derive(Default)]
pub struct Events {
    subs: Mutex<Vec<Weak<dyn Sink>>>,
}

impl Events {
    /// Adds a subscriber; it stays until it is dropped or refuses a delivery.
    pub fn subscribe(&self, sink: Weak<dyn Sink>) {
        let mut subs = lock(&self.subs);
        subs.retain(|s| s.strong_count() > 0);
        subs.push(sink);
    }

    /// Live subscribers.
    #[cfg(test)]
    pub fn subscribers(&self) -> usize {
        let subs = lock(&self.subs);
        subs.iter().filter(|s| s.strong_count() > 0).count()
    }

    /// Sends `event` with `params` to every subscriber.
    pub fn emit(&self, event: &str, params: serde_json::Value) {
        let msg = serde_json::json!({"jsonrpc": "2.0", "method": event, "params": params});
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        let line: Arc<[u8]> = line.into();
        let subs: Vec<Arc<dyn Sink>> = {
            let mut subs = lock(&self.subs);
            subs.retain(|s| s.strong_count() > 0);
            subs.iter().filter_map(Weak::upgrade).collect()
        };
        tracing::info!(event, params = %msg["params"], "event");
        let mut gone = Vec::new();
        for s in &subs {
            if !s.deliver(&line) {
                gone.push(Arc::as_ptr(s) as *const u8);
            }
        }
        if !gone.is_empty() {
            let mut all = lock(&self.subs);
            all.retain(|w| !gone.contains(&(w.as_ptr() as *const u8)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        lines: Mutex<Vec<String>>,
        refuse: bool,
    }

    impl Sink for Collect {
        fn deliver(&self, line: &Arc<[u8]>) -> bool {
            self.lines
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(line).into_owned());
            !self.refuse
        }
    }

    #[test]
    fn every_live_subscriber_gets_each_event_once() {
        let ev = Events::default();
        let a: Arc<Collect> = Arc::new(Collect::default());
        let b: Arc<Collect> = Arc::new(Collect {
            refuse: true,
            ..Default::default()
        });
        let a_dyn: Arc<dyn Sink> = a.clone();
        let b_dyn: Arc<dyn Sink> = b.clone();
        ev.subscribe(Arc::downgrade(&a_dyn));
        ev.subscribe(Arc::downgrade(&b_dyn));
        {
            let c: Arc<dyn Sink> = Arc::new(Collect::default());
            ev.subscribe(Arc::downgrade(&c));
        }
        assert_eq!(ev.subscribers(), 2);
        ev.emit(EXPORT_DELETED, serde_json::json!({"name": "vm1"}));
        ev.emit(SHUTDOWN, serde_json::json!({}));
        let got = a.lines.lock().unwrap().clone();
        assert_eq!(got.len(), 2);
        let v: serde_json::Value = serde_json::from_str(got[0].trim_end()).unwrap();
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["method"], "export-deleted");
        assert_eq!(v["params"]["name"], "vm1");
        assert!(v.get("id").is_none(), "a notification has no id");
        // b refused the first delivery and was dropped.
        assert_eq!(b.lines.lock().unwrap().len(), 1);
        assert_eq!(ev.subscribers(), 1);
    }
}
