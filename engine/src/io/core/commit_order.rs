//! The order of a commit's steps (DESIGN invariant 3): the one place that decides it.
//!
//! `core/commit.rs` runs the steps in this order, as linked chains pushed one after another, so
//! a step never starts before every step before it completed. The test-only feature
//! `unsafe-bits-before-sync` swaps in a deliberately wrong order here, so the ordering tests can
//! prove they catch it; nothing else in the engine knows about that feature.

use crate::io::disk::state::Role;
use crate::io::uring::buf::IoBuf;

/// One step of a commit.
pub(super) enum Step {
    /// fdatasync of the raw image or of the metadata file.
    Sync(Role),
    /// Write the copied bitmap bytes `buf` at `offset` of the metadata file.
    Write { offset: u64, buf: IoBuf },
}

/// fdatasync(raw image), then the bitmap writes, then fdatasync(metadata) (none of the last two
/// when nothing is dirty): every bit written covers data the first sync made durable, because
/// the bits were copied before it began and a bit is set only after its data write completed.
#[cfg(not(feature = "unsafe-bits-before-sync"))]
pub(super) fn steps(writes: Vec<(u64, IoBuf)>) -> Vec<Step> {
    let any = !writes.is_empty();
    let mut steps = Vec::with_capacity(writes.len() + 2);
    steps.push(Step::Sync(Role::Image));
    steps.extend(
        writes
            .into_iter()
            .map(|(offset, buf)| Step::Write { offset, buf }),
    );
    if any {
        steps.push(Step::Sync(Role::Meta));
    }
    steps
}

/// TEST-ONLY, deliberately wrong: the bitmap reaches the disk before its data does.
#[cfg(feature = "unsafe-bits-before-sync")]
pub(super) fn steps(writes: Vec<(u64, IoBuf)>) -> Vec<Step> {
    let any = !writes.is_empty();
    let mut steps: Vec<Step> = writes
        .into_iter()
        .map(|(offset, buf)| Step::Write { offset, buf })
        .collect();
    if any {
        steps.push(Step::Sync(Role::Meta));
    }
    steps.push(Step::Sync(Role::Image));
    steps
}

#[cfg(all(test, not(feature = "unsafe-bits-before-sync")))]
mod tests {
    use super::*;

    #[test]
    fn data_sync_first_metadata_sync_last() {
        let order = |n: usize| -> Vec<String> {
            let writes = (0..n as u64)
                .map(|i| (i * 4096, IoBuf::new_zeroed(1)))
                .collect();
            steps(writes)
                .iter()
                .map(|s| match s {
                    Step::Sync(r) => format!("sync {r:?}"),
                    Step::Write { offset, .. } => format!("write {offset}"),
                })
                .collect()
        };
        assert_eq!(order(0), ["sync Image"]);
        assert_eq!(
            order(2),
            ["sync Image", "write 0", "write 4096", "sync Meta"]
        );
    }
}
