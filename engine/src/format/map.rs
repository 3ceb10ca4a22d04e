//! Allocation runs in the shape of `qemu-img map --output=json`. OWNER: issue #2.

/// One run of `qemu-img map --output=json` shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MapRun {
    /// First byte of the run.
    pub start: u64,
    /// Bytes in the run.
    pub length: u64,
    /// 0 = raw image, 1 = base.
    pub depth: u32,
    /// Whether some layer holds the data (false past the base's end).
    pub present: bool,
    /// Whether the run reads as zeros.
    pub zero: bool,
    /// Whether the run has data.
    pub data: bool,
    /// Offset in the file that holds the data, where it applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Placeholder so the module compiles; issue #2 defines the real signature.
pub fn map_runs() {}
