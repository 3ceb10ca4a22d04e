//! The daemon process's own plumbing, which every layer may use: the stop switch and the
//! thread that takes SIGTERM/SIGINT ([`signals`]), files owned by one daemon at a time
//! ([`lockfile`]: the pid file, the lock beside each Unix socket) and the test seams
//! ([`seam`]), and the log's one-record-one-line writer ([`logline`]).
//!
//! May import: nothing of this crate (the bottom layer).

pub mod lockfile;
pub mod logline;
pub mod seam;
pub mod signals;
