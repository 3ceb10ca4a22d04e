//! What every thread of one engine shares: the core handles, the buffer arena, the
//! configuration and the registered-file slot allocator.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::mailbox::{CoreHandle, Msg};
use crate::io::config::EngineConfig;
use crate::io::disk::file_slot::{FileSlot, SlotOwner};
use crate::io::uring::buf::Arena;
use crate::sync::lock;

/// Disks that can have registered files at once (each takes 3 slots of every ring's table).
pub(crate) const MAX_REGISTERED_DISKS: u32 = 256;

/// State shared by every core thread and every handle of one engine.
pub(crate) struct EngineShared {
    pub cores: Vec<CoreHandle>,
    pub arena: Option<Arena>,
    pub config: EngineConfig,
    pub stopped: AtomicBool,
    disk_slots: Mutex<Vec<u32>>,
}

impl EngineShared {
    pub(crate) fn new(cores: Vec<CoreHandle>, arena: Option<Arena>, config: EngineConfig) -> Self {
        EngineShared {
            cores,
            arena,
            config,
            stopped: AtomicBool::new(false),
            disk_slots: Mutex::new((0..MAX_REGISTERED_DISKS).rev().collect()),
        }
    }

    /// A free registered-file slot, if any, lent until the returned lease is dropped.
    pub(crate) fn take_file_slot(self: &Arc<Self>) -> Option<FileSlot> {
        let index = lock(&self.disk_slots).pop()?;
        Some(FileSlot::new(index, Arc::clone(self) as Arc<dyn SlotOwner>))
    }

    /// Wakes every core (each looks at its waiting requests again: throttle limits changed, a
    /// disk is closing).
    pub(crate) fn wake_all(&self) {
        for core in &self.cores {
            core.wake();
        }
    }

    /// The core handle for `core` (modulo the core count).
    pub(crate) fn core(&self, core: usize) -> &CoreHandle {
        &self.cores[core % self.cores.len()]
    }
}

impl SlotOwner for EngineShared {
    /// Empties slot `k` on every core, then makes it reusable. Messages to a core are handled in
    /// order, so a later `Register` of `k` cannot overtake this `Unregister`.
    fn release(&self, index: u32) {
        for core in &self.cores {
            let _ = core.send(Msg::Unregister { index });
        }
        lock(&self.disk_slots).push(index);
    }
}
