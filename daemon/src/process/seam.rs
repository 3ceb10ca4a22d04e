//! Test seams: named points where an integration test can pause the daemon, see that it got
//! somewhere, or make a step fail, so that a race between two requests happens the same way on
//! every run instead of by luck.
//!
//! Only in debug builds (what `cargo test` builds the daemon as) and only when the environment
//! variable `ADDCOW_TEST_SEAMS` names a folder; otherwise every function here does nothing and
//! returns at once. A test arms a point by creating a file in that folder:
//!
//! * [`pause`]: `POINT.pause` exists → it is removed (the pause happens once), `POINT.reached`
//!   is created, and the caller waits until `POINT.go` exists (at most [`MAX_PAUSE`]).
//! * [`mark`]: `POINT.reached` is created every time the point is passed (nothing to arm).
//! * [`fail`]: `POINT.fail` exists → it is removed and `true` is returned once (the caller fails
//!   the step as if it had failed for real).
//! * [`duration`]: `NAME.ms` holds a number of milliseconds → the caller waits that long in
//!   place of its own timeout (a test that cannot wait for the real one).

use std::path::PathBuf;
#[cfg(debug_assertions)]
use std::sync::OnceLock;
use std::time::Duration;

/// Longest a [`pause`] waits for its `go` file: a test that died never wedges a daemon.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

#[cfg(debug_assertions)]
fn dir() -> Option<&'static PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("ADDCOW_TEST_SEAMS").map(PathBuf::from))
        .as_ref()
}

#[cfg(not(debug_assertions))]
fn dir() -> Option<&'static PathBuf> {
    None
}

/// Waits at `point` when a test armed it (see the module docs).
pub fn pause(point: &str) {
    let Some(d) = dir() else { return };
    if std::fs::remove_file(d.join(format!("{point}.pause"))).is_err() {
        return;
    }
    let _ = std::fs::write(d.join(format!("{point}.reached")), b"");
    let go = d.join(format!("{point}.go"));
    let deadline = std::time::Instant::now() + MAX_PAUSE;
    while !go.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Records that `point` was passed (see the module docs).
pub fn mark(point: &str) {
    if let Some(d) = dir() {
        let _ = std::fs::write(d.join(format!("{point}.reached")), b"");
    }
}

/// Whether a test asked the step at `point` to fail (once; see the module docs).
pub fn fail(point: &str) -> bool {
    dir().is_some_and(|d| std::fs::remove_file(d.join(format!("{point}.fail"))).is_ok())
}

/// A duration a test set in place of the timeout `name` (see the module docs), read each time.
pub fn duration(name: &str) -> Option<Duration> {
    let d = dir()?;
    let text = std::fs::read_to_string(d.join(format!("{name}.ms"))).ok()?;
    text.trim().parse().ok().map(Duration::from_millis)
}
