//! Image tools: `create`, `info`, `check`, `map`. OWNER: issue #2.

pub mod check;
pub mod create;
pub mod info;
pub mod map;
