//! The error of the daemon's top level (`addcow serve` starting, running and stopping): a small
//! matchable [`ErrorKind`], the context a person needs to act on it (the command-line option
//! and value it is about, what was being done) and the underlying source, if any.
//!
//! The layers below keep their own typed errors (`HostError`, `ListenError`, the engine's
//! `Error`, ...); they become the source of an [`Error`] where the top level meets them. clap's
//! `value_parser` functions return `String`, clap's convention: clap prints those itself.

use std::fmt;

/// Result alias of the daemon's top level.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form callers can match on. The message for a person is [`Error`]'s
/// `Display`, which adds the context (the kind's own text is shown only when there is none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A command-line value is malformed, out of range or contradicts another option (the
    /// error names the option and the value).
    #[error("invalid command line")]
    InvalidArgument,
    /// No socket to serve on: no `--socket`, `--tcp`, `--vhost-user-blk` or systemd socket.
    #[error("nothing to listen on: give --socket PATH (or --tcp, or systemd sockets)")]
    NothingToListenOn,
    /// A socket (NBD, TCP, vhost-user-blk, control, metrics) could not be bound, set up or
    /// published.
    #[error("cannot listen")]
    Listen,
    /// The pid file could not be taken (another daemon holds it) or written.
    #[error("cannot take the pid file")]
    PidFile,
    /// The built-in demo's files could not be created.
    #[error("cannot prepare the demo")]
    Demo,
    /// A command-line export could not be opened or served.
    #[error("cannot open an export")]
    Export,
    /// The engine could not start, or committing the overlays at shutdown failed.
    #[error("engine failure")]
    Engine,
    /// The process could not set itself up: the signal mask, the stop pipe, a thread.
    #[error("cannot set up the process")]
    Setup,
}

/// The source of an [`Error`]: any error (a lower layer's typed error, an I/O error, or a
/// message from a part that still reports with strings).
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error with context: what kind, which option and value, doing what, and why.
///
/// `Display`: `FLAG "VALUE": CONTEXT: SOURCE`, each part present only when known; with none of
/// them, the kind's own text.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    flag: Option<&'static str>,
    value: Option<String>,
    context: Option<String>,
    source: Option<Source>,
}

impl Error {
    /// A new error of `kind` with no context yet.
    pub fn new(kind: ErrorKind) -> Self {
        Error {
            kind,
            flag: None,
            value: None,
            context: None,
            source: None,
        }
    }

    /// An [`ErrorKind::InvalidArgument`] about `flag` given `value`, saying `why` it is refused.
    pub fn invalid(flag: &'static str, value: impl Into<String>, why: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument)
            .with_flag(flag)
            .with_value(value)
            .with_context(why)
    }

    /// Adds the command-line option the error is about (`--control`, ...).
    pub fn with_flag(mut self, flag: &'static str) -> Self {
        self.flag = Some(flag);
        self
    }

    /// Adds the value given to that option.
    pub fn with_value(mut self, value: impl Into<String>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// Adds what was being done, or why a value is refused.
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// Adds the underlying error.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The matchable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The command-line option the error is about, if any.
    pub fn flag(&self) -> Option<&'static str> {
        self.flag
    }

    /// The value of that option, if the error is about it.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error::new(kind)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(flag) = self.flag {
            write!(f, "{flag}")?;
            sep = ": ";
        }
        if let Some(value) = &self.value {
            let space = if self.flag.is_some() { " " } else { "" };
            write!(f, "{space}{value:?}")?;
            sep = ": ";
        }
        if let Some(context) = &self.context {
            write!(f, "{sep}{context}")?;
            sep = ": ";
        }
        match &self.source {
            Some(source) => write!(f, "{sep}{source}"),
            None if sep.is_empty() => write!(f, "{}", self.kind),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| &**e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_joins_what_is_known() {
        let e = Error::invalid("--export", "novalue", "expected NAME=OVERLAY[:ro]");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!((e.flag(), e.value()), (Some("--export"), Some("novalue")));
        assert_eq!(
            e.to_string(),
            "--export \"novalue\": expected NAME=OVERLAY[:ro]"
        );
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let e = Error::new(ErrorKind::Listen)
            .with_flag("--control")
            .with_source(io);
        assert_eq!(e.to_string(), "--control: address in use");
        assert!(std::error::Error::source(&e).is_some());
        let e = Error::new(ErrorKind::Engine)
            .with_context("committing overlays")
            .with_source("disk full".to_string());
        assert_eq!(e.to_string(), "committing overlays: disk full");
        let e = Error::new(ErrorKind::Export).with_source("opening export \"\": locked");
        assert_eq!(e.to_string(), "opening export \"\": locked");
        assert_eq!(
            Error::from(ErrorKind::NothingToListenOn).to_string(),
            ErrorKind::NothingToListenOn.to_string()
        );
    }
}
