//! Test support shared by the engine's end-to-end tests (each test crate includes it with
//! `mod support;` and uses the parts it needs).
//!
//! * [`reference`]: an independent add-cow v1 reader and writer built from `DESIGN.md`'s format
//!   section (header, LSB-first bitmap at byte 2560, base fallthrough, zeros past the base's end),
//!   deliberately not using the library, so it can judge the library and the engine.
//! * [`engine`]: blocking calls into a real engine and overlay fixtures written from the spec.
//! * [`lifecycle`]: overlay fixtures for resize, rebase and commit.
//! * [`pattern`]: recognizable byte patterns for bases, pre-allocated and stale sectors, and the
//!   round-robin split of a disk between writer threads.
//! * [`crash`]: the crash-state builder and checker over a recorder log (feature
//!   `crash-recorder`).
//! * [`fileops`]: crash states of the lifecycle tools' file-operation logs (feature
//!   `crash-recorder`).
#![allow(dead_code)]

#[cfg(feature = "crash-recorder")]
pub mod crash;
pub mod engine;
#[cfg(feature = "crash-recorder")]
pub mod fileops;
pub mod lifecycle;
pub mod pattern;
pub mod reference;
