//! io_uring and the memory its ops read and write: [`ring::Ring`], one core's ring with its slab
//! of in-flight ops, and [`buf`], the aligned [`IoBuf`](buf::IoBuf)s and the per-core arena
//! registered with the ring.

pub(super) mod buf;
pub(super) mod ring;
