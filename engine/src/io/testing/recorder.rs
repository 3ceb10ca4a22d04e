//! Test-only crash recorder (feature `crash-recorder`).
//!
//! The engine pushes one [`Event`] per write, hole punch and fdatasync it issues to an overlay's
//! files: writes and punches when their completion arrives, syncs twice (when submitted and when
//! completed), in that order on a single timeline. A test harness may push its own
//! [`Event::Client`] marks (e.g. "write 7 answered", "flush 3 answered") into the same timeline.
//!
//! Durability model the crash checker uses: a write to file F is durable at a point P of the log
//! if it completed before the `SyncBegin` of some sync of F whose `SyncEnd` comes before P.

use std::sync::{Arc, Mutex};

/// Which file of an overlay an event touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileRole {
    /// The raw image.
    Image,
    /// The `.add-cow` metadata file.
    Meta,
    /// The dirty bitmaps sidecar (`X.add-cow.bitmaps`).
    Bitmaps,
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A write completed: `data` now sits at `offset` of `file` (volatile until synced).
    Write {
        file: FileRole,
        offset: u64,
        data: Vec<u8>,
    },
    /// A hole punch / zero range completed on `file` (volatile until synced).
    Punch {
        file: FileRole,
        offset: u64,
        len: u64,
    },
    /// An fdatasync of `file` was submitted; `id` pairs it with its end.
    SyncBegin { file: FileRole, id: u64 },
    /// That fdatasync completed successfully.
    SyncEnd { file: FileRole, id: u64 },
    /// A mark from the test harness (what a client was answered).
    Client(ClientEvent),
}

/// What the test harness saw a client get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A write (or write-zeroes/trim, with zeros as data) was answered successfully.
    WriteAnswered { id: u64, offset: u64, data: Vec<u8> },
    /// A flush was answered successfully.
    FlushAnswered { id: u64 },
}

/// A shared, append-only log of events. Install one per disk through the engine config.
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    /// A new, empty recorder.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    /// Appends an event.
    pub fn push(&self, event: Event) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }

    /// A copy of every event so far.
    pub fn snapshot(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}
