//! The add-cow version 1 on-disk format (see `docs/FORMAT.md`).
//!
//! * [`header`]: the 2560-byte header: parse and encode, byte for byte.
//! * [`paths`]: path rules (relative to the overlay's directory, protocol prefixes refused).
//! * [`overlay`]: [`Overlay::open`] validates everything and loads the bitmap; [`create`] makes one.
//! * `open`: the steps of reading an `.add-cow` file both openers share (length, header,
//!   bitmap, soft findings, QEMU's share lock on a base).
//! * [`chain`]: backing chains: the layers under an overlay, opened read-only and share-locked.
//! * [`check`]: the consistency report behind `addcow check`.
//! * [`map`]: allocation runs in the shape of `qemu-img map --output=json`.
//!
//! The engine depends on the items re-exported here; their signatures are the contract between
//! the format and the engine.

pub mod chain;
pub mod check;
pub mod header;
pub mod map;
pub(crate) mod open;
pub mod overlay;
pub mod paths;

pub use chain::{
    is_add_cow, BaseChain, Chain, ChainFile, ChainOpenOptions, FileRole, Layer, LayerFormat,
    OpenedFile, MAX_CHAIN_DEPTH,
};
pub use check::{check, CheckReport, Finding, Severity};
pub use header::{
    bitmap_len, check_virtual_size, Header, BITMAP_OFFSET, HEADER_SIZE, MAGIC, MAX_VIRTUAL_SIZE,
    PATH_FIELD_LEN, SECTOR_SIZE, VERSION,
};
pub use map::{map_runs, MapRun};
pub use overlay::{
    create, create_exclusive, create_with, CreateOptions, Created, OpenOptions, Overlay,
    Preallocation,
};
