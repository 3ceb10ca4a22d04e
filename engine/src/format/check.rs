//! Consistency report behind `addcow check`. OWNER: issue #2.

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Severity {
    /// The overlay cannot be served as it is.
    Corruption,
    /// Servable, but something is off.
    Warning,
}

/// One thing `check` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    /// Corruption or warning.
    pub severity: Severity,
    /// What, for a person.
    pub message: String,
}

/// All findings for one overlay.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// Everything found, in the order checked.
    pub findings: Vec<Finding>,
}

/// Checks the overlay at `path` without opening it for writing.
pub fn check(path: &std::path::Path) -> CheckReport {
    let _ = path;
    unimplemented!("issue #2")
}
