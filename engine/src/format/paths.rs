//! Path rules: stored paths are relative to the `.add-cow` file's directory; protocol prefixes
//! are refused for now. OWNER: issue #2.
