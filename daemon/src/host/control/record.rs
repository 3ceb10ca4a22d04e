//! A control call's change of the served set, recorded in the state file (`--state`,
//! [`super::super::state`]) before the call replies.

use std::io;
use std::path::Path;

use super::super::runtime::Host;
use super::super::state::Recorder;
use super::rpc::{RpcError, SERVER_ERROR};

/// Runs a control call's `change` of the served set and, if it succeeded, `record`s it, both
/// under the state's lock, and returns `change`'s result once the record is durable. Without
/// `--state`, just `change`. A record that fails is the call's error (the change stands; the
/// message says so).
pub fn recorded<T>(
    host: &Host,
    change: impl FnOnce() -> Result<T, RpcError>,
    record: impl FnOnce(&mut Recorder<'_>, &T) -> io::Result<()>,
) -> Result<T, RpcError> {
    let Some(state) = host.state.get() else {
        return change();
    };
    let mut r = state.lock();
    let done = change()?;
    record(&mut r, &done).map_err(|e| not_recorded(state.path(), e))?;
    Ok(done)
}

/// The error of a change made but not recorded.
pub fn not_recorded(path: &Path, e: io::Error) -> RpcError {
    RpcError::new(
        SERVER_ERROR,
        format!(
            "done, but not recorded in the state file {} ({e}): a restarted daemon will not \
             serve this change",
            path.display()
        ),
    )
}
