//! Test support of the engine's end-to-end tests (`engine/tests/*.rs`), one crate that every test
//! file takes as a dev-dependency (`use addcow_engine_testkit::...`).
//!
//! * [`harness`]: overlays created with the library in a temporary directory, small engines, and
//!   a [`harness::Model`] of what the disk must read as.
//! * [`reference`]: an independent add-cow v1 reader and writer built from `DESIGN.md`'s format
//!   section (header, LSB-first bitmap at byte 2560, base fallthrough, zeros past the base's end),
//!   deliberately not using the library, so it can judge the library and the engine.
//! * [`engine`]: blocking calls into a real engine and overlay fixtures written from the spec.
//! * [`lifecycle`]: overlay fixtures for resize, rebase and commit.
//! * [`pattern`]: recognizable byte patterns for bases, pre-allocated and stale sectors, and the
//!   round-robin split of a disk between writer threads. Every base any fixture writes holds
//!   [`pattern::base_byte`].
//! * [`crash`]: the crash-state builder and checker over a recorder log (feature
//!   `crash-recorder`, which addcow-engine's own `crash-recorder` feature turns on).
//! * [`crash_dirty`]: crash states of the dirty-bitmap sidecar against the raw image's writes
//!   (feature `crash-recorder`).
//! * [`fileops`]: crash states of the lifecycle tools' file-operation logs (feature
//!   `crash-recorder`).
//!
//! The crate depends on `addcow-engine` by path; in addcow-engine's integration tests cargo builds
//! that library once, so the engine types here are the test's own.

#[cfg(feature = "crash-recorder")]
pub mod crash;
#[cfg(feature = "crash-recorder")]
pub mod crash_dirty;
pub mod engine;
#[cfg(feature = "crash-recorder")]
pub mod fileops;
pub mod harness;
pub mod lifecycle;
pub mod pattern;
pub mod reference;
