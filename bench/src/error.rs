//! The runner's error type: what failed, with the path or command in the message.

use std::path::Path;

/// Everything that can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the runner was doing.
        what: &'static str,
        /// The file involved.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An external command could not be started or failed.
    #[error("{command}: {message}")]
    Command {
        /// The command line (program and first arguments).
        command: String,
        /// Why it failed (exit status and the tail of its stderr).
        message: String,
    },
    /// fio's output could not be understood.
    #[error("fio output: {0}")]
    FioOutput(String),
    /// Tools the run needs are not installed.
    #[error("missing tools: {0}")]
    Missing(String),
    /// The add-cow library or engine refused something.
    #[error("addcow engine: {0}")]
    Engine(#[from] addcow_engine::Error),
    /// A request through the embedded engine failed.
    #[error("embedded request: {0}")]
    Request(#[from] addcow_engine::RequestError),
    /// Bad command-line input.
    #[error("{0}")]
    Usage(String),
}

/// Result with [`BenchError`].
pub type Result<T> = std::result::Result<T, BenchError>;

/// Builds a `map_err` closure that wraps an `io::Error` with what was done to which path.
pub fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BenchError {
    let path = path.display().to_string();
    move |source| BenchError::Io { what, path, source }
}
