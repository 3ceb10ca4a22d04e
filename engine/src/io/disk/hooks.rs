//! Crash-recorder hooks (feature `crash-recorder`; no-ops otherwise).
//!
//! Where the engine calls them (the contract is in `crate::io::testing::recorder`):
//! * `rec_write`: at the CQE of every successful write to the raw image or the metadata file,
//!   with the bytes written, *before* the bits of that write are set;
//! * `rec_punch`: at the CQE of every hole punch of the raw image;
//! * `rec_sync(.., false)`: when an fdatasync is submitted (for the metadata sync, which its link
//!   starts only once the last bitmap write completed: at that write's CQE);
//! * `rec_sync(.., true)`: at the CQE of every successful fdatasync.

use super::state::{DiskState, Role};

impl DiskState {
    /// Records a completed write (crash-recorder feature; no-op otherwise).
    #[allow(unused_variables)]
    pub(crate) fn rec_write(&self, role: Role, offset: u64, data: &[u8]) {
        #[cfg(feature = "crash-recorder")]
        if let (Some(r), Some(file)) = (&self.recorder, file_role(role)) {
            r.push(crate::io::testing::recorder::Event::Write {
                file,
                offset,
                data: data.to_vec(),
            });
        }
    }

    /// Records a completed hole punch.
    #[allow(unused_variables)]
    pub(crate) fn rec_punch(&self, role: Role, offset: u64, len: u64) {
        #[cfg(feature = "crash-recorder")]
        if let (Some(r), Some(file)) = (&self.recorder, file_role(role)) {
            r.push(crate::io::testing::recorder::Event::Punch { file, offset, len });
        }
    }

    /// Records the submission (`end == false`) or successful completion of an fdatasync.
    #[allow(unused_variables)]
    pub(crate) fn rec_sync(&self, role: Role, id: u64, end: bool) {
        #[cfg(feature = "crash-recorder")]
        if let (Some(r), Some(file)) = (&self.recorder, file_role(role)) {
            r.push(if end {
                crate::io::testing::recorder::Event::SyncEnd { file, id }
            } else {
                crate::io::testing::recorder::Event::SyncBegin { file, id }
            });
        }
    }
}

#[cfg(feature = "crash-recorder")]
fn file_role(role: Role) -> Option<crate::io::testing::recorder::FileRole> {
    match role {
        Role::Image => Some(crate::io::testing::recorder::FileRole::Image),
        Role::Meta => Some(crate::io::testing::recorder::FileRole::Meta),
        Role::Base | Role::Scratch => None,
    }
}
