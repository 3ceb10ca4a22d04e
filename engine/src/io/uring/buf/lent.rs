//! Memory another party lends to the engine ([`LentBuf`]), and the buffer a request carries
//! ([`DataBuf`]): the engine's own [`IoBuf`] or a lent one.
//!
//! Lent memory (a guest's buffer in shared memory) may be written by its owner at any moment,
//! also while the engine reads or writes it: a Rust reference (`&[u8]`, `&mut [u8]`) into it
//! would be undefined behaviour, whatever the code does with it. So a [`LentBuf`] has no `Deref`,
//! no `AsRef<[u8]>` and no slice accessor at all: its bytes are reached only by the kernel (an
//! SQE built from [`LentBuf::as_ptr`]) and by copies through raw pointers
//! ([`LentBuf::copy_to`], [`LentBuf::copy_from`]). A torn copy can only tear the data of the
//! lender's own request, never the engine's state: the engine never decides anything from a
//! data buffer's contents.
//!
//! Its bytes are reached by copies (this compiles, so the paths below name real types and the
//! examples after it fail for the reason they state):
//!
//! ```
//! fn first_bytes(b: &addcow_engine::LentBuf, d: &addcow_engine::DataBuf) -> [u8; 4] {
//!     let mut out = [0u8; 4];
//!     b.copy_to(0, &mut out);
//!     d.copy_to(0, &mut out);
//!     out
//! }
//! ```
//!
//! ```compile_fail
//! // A lent buffer cannot be viewed as a slice: no `Deref<Target = [u8]>`.
//! fn view(b: &addcow_engine::LentBuf) -> &[u8] {
//!     &b[..]
//! }
//! ```
//!
//! ```compile_fail
//! // Nor through `AsRef`.
//! fn view(b: &addcow_engine::LentBuf) -> &[u8] {
//!     b.as_ref()
//! }
//! ```
//!
//! ```compile_fail
//! // A request's buffer, which may be lent, derefs to no slice either.
//! fn view(b: &addcow_engine::DataBuf) -> &[u8] {
//!     &b[..]
//! }
//! ```

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{IoBuf, BUF_ALIGN};

/// `len` bytes of memory another party lent to the engine (e.g. a guest's buffer in a shared
/// memory mapping), which that party may write at any time.
///
/// Invariant: `ptr` is aligned to [`BUF_ALIGN`] and valid for reads and writes of `len` bytes
/// while `keep` lives (`keep` keeps the memory mapped; it is dropped with this value). No Rust
/// reference into those bytes is ever made: they are touched through raw pointers only.
pub struct LentBuf {
    ptr: NonNull<u8>,
    len: usize,
    _keep: Arc<dyn Any + Send + Sync>,
}

// SAFETY: a LentBuf is a pointer to memory that, by `LentBuf::new`'s contract, stays valid
// while its `Send + Sync` keeper lives wherever it is dropped, and is only ever accessed through
// raw-pointer copies (never references), which are sound from any thread.
unsafe impl Send for LentBuf {}
// SAFETY: `&LentBuf` gives out no reference into the memory and no way to write it (copy_from
// takes `&mut self`); copies out of it through raw pointers are sound from several threads.
unsafe impl Sync for LentBuf {}

impl std::fmt::Debug for LentBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LentBuf").field("len", &self.len).finish()
    }
}

impl LentBuf {
    /// A buffer over `len` bytes at `ptr` that the caller lends to the engine: reads land there
    /// and writes are taken from there, with no copy. `keep` is whatever keeps that memory
    /// mapped (e.g. an `Arc` of a guest memory mapping); it is dropped when the buffer is, which
    /// is after the request that carries it was answered (the engine drops a request's buffer
    /// only once no operation points into it), so the memory outlives every I/O into it.
    ///
    /// # Safety
    ///
    /// `ptr` must be aligned to [`BUF_ALIGN`] and valid for reads and writes of `len` bytes
    /// for as long as `keep` lives. Another party may write the bytes concurrently (a guest
    /// changing its own in-flight buffer, as hardware DMA allows): the engine never forms a
    /// reference into them, and a concurrent change can only tear the data of that request.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize, keep: Arc<dyn Any + Send + Sync>) -> LentBuf {
        debug_assert_eq!(
            ptr.as_ptr() as usize % BUF_ALIGN,
            0,
            "lent buffer alignment"
        );
        LentBuf {
            ptr,
            len,
            _keep: keep,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte, for the kernel (an iovec or SQE): valid for `len()` bytes while this
    /// buffer lives. Dereferencing it is the caller's `unsafe` business; making a reference
    /// from it is never sound (the lender may be writing).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The buffer as one iovec, for vectored I/O.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.as_ptr().cast(),
            iov_len: self.len,
        }
    }

    /// Copies bytes `[at, at + dst.len())` of the buffer into `dst`. `false` (nothing copied)
    /// when that range is not inside the buffer.
    pub fn copy_to(&self, at: usize, dst: &mut [u8]) -> bool {
        if at.checked_add(dst.len()).map_or(true, |end| end > self.len) {
            return false;
        }
        // SAFETY: [at, at + dst.len()) lies inside the lent memory (checked), valid for reads
        // while `self` lives (type invariant); `dst` is memory of this process the caller holds
        // exclusively, so it cannot overlap memory nobody may reference. Raw copy: no reference
        // into the lent bytes is made.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(at), dst.as_mut_ptr(), dst.len())
        };
        true
    }

    /// Copies `src` into bytes `[at, at + src.len())` of the buffer. `false` (nothing copied)
    /// when that range is not inside the buffer.
    pub fn copy_from(&mut self, at: usize, src: &[u8]) -> bool {
        if at.checked_add(src.len()).map_or(true, |end| end > self.len) {
            return false;
        }
        // SAFETY: [at, at + src.len()) lies inside the lent memory (checked), valid for writes
        // while `self` lives (type invariant); `src` is a reference, so it is not lent memory
        // (no reference into that is ever made) and cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(at), src.len()) };
        true
    }
}

/// The buffer a request reads into or writes from: the engine's own memory ([`IoBuf`], which
/// derefs to bytes) or memory lent to it ([`LentBuf`], which does not). Like a [`LentBuf`], a
/// `DataBuf` gives no reference to its bytes: the engine copies ([`DataBuf::copy_to`]) where it
/// needs them, and a caller that knows its buffer is owned takes it back with
/// [`DataBuf::into_owned`].
#[derive(Debug)]
pub enum DataBuf {
    /// The engine's (or the caller's) own buffer.
    Owned(IoBuf),
    /// Memory another party lent.
    Lent(LentBuf),
}

impl From<IoBuf> for DataBuf {
    fn from(b: IoBuf) -> DataBuf {
        DataBuf::Owned(b)
    }
}

impl From<LentBuf> for DataBuf {
    fn from(b: LentBuf) -> DataBuf {
        DataBuf::Lent(b)
    }
}

impl DataBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            DataBuf::Owned(b) => b.len(),
            DataBuf::Lent(b) => b.len(),
        }
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is lent memory.
    pub fn is_borrowed(&self) -> bool {
        matches!(self, DataBuf::Lent(_))
    }

    /// The owned buffer, if this is one.
    pub fn into_owned(self) -> Option<IoBuf> {
        match self {
            DataBuf::Owned(b) => Some(b),
            DataBuf::Lent(_) => None,
        }
    }

    /// Copies bytes `[at, at + dst.len())` into `dst`; `false` when the range is not inside.
    pub fn copy_to(&self, at: usize, dst: &mut [u8]) -> bool {
        match self {
            DataBuf::Owned(b) => {
                let src = at.checked_add(dst.len()).and_then(|end| b.get(at..end));
                src.map(|s| dst.copy_from_slice(s)).is_some()
            }
            DataBuf::Lent(b) => b.copy_to(at, dst),
        }
    }

    /// The arena id and slot, if the buffer is an arena slot.
    pub(crate) fn arena_slot(&self) -> Option<(u64, u32)> {
        match self {
            DataBuf::Owned(b) => b.arena_slot(),
            DataBuf::Lent(_) => None,
        }
    }

    /// Raw pointer to the first byte, for SQEs and raw copies; valid for `len()` bytes while
    /// the buffer lives. Never made into a reference (it may be lent memory).
    pub(crate) fn raw_ptr(&self) -> *mut u8 {
        match self {
            DataBuf::Owned(b) => b.raw_ptr(),
            DataBuf::Lent(b) => b.as_ptr(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Aligned memory standing in for a guest's mapping; freed when the last keeper goes.
    struct Lender(IoBuf);

    fn lent(n: usize) -> (LentBuf, Arc<Lender>) {
        let lender = Arc::new(Lender(IoBuf::from_slice(
            &(0..n).map(|i| i as u8).collect::<Vec<_>>(),
        )));
        let ptr = NonNull::new(lender.0.raw_ptr()).expect("non-null");
        let keep: Arc<dyn Any + Send + Sync> = lender.clone();
        // SAFETY: the lender's heap buffer is aligned, n bytes long, and kept alive by `keep`;
        // the test reads it back only through the LentBuf's copies or after it is dropped.
        (unsafe { LentBuf::new(ptr, n, keep) }, lender)
    }

    #[test]
    fn copies_stay_inside_the_lent_range() {
        let (mut b, lender) = lent(100);
        assert_eq!(b.len(), 100);
        assert!(!b.is_empty());
        let mut out = [0u8; 10];
        assert!(b.copy_to(90, &mut out));
        assert_eq!(out, [90, 91, 92, 93, 94, 95, 96, 97, 98, 99]);
        assert!(!b.copy_to(91, &mut out), "past the end");
        assert!(!b.copy_to(usize::MAX, &mut out), "overflowing offset");
        assert!(b.copy_from(0, &[7; 4]));
        assert!(!b.copy_from(97, &[7; 4]), "past the end");
        assert!(!b.copy_from(usize::MAX - 1, &[7; 4]), "overflowing offset");
        let iov = b.iovec();
        assert_eq!((iov.iov_base.cast::<u8>(), iov.iov_len), (b.as_ptr(), 100));
        let d = DataBuf::from(b);
        assert!(d.is_borrowed());
        assert_eq!(d.arena_slot(), None);
        let mut head = [0u8; 6];
        assert!(d.copy_to(0, &mut head));
        assert_eq!(head, [7, 7, 7, 7, 4, 5]);
        assert!(
            d.into_owned().is_none(),
            "lent memory is never handed out as owned"
        );
        assert_eq!(
            Arc::strong_count(&lender),
            1,
            "the keeper is dropped with the buffer"
        );
        assert_eq!(&lender.0[..6], &[7, 7, 7, 7, 4, 5]);
    }

    #[test]
    fn owned_buffers_copy_and_come_back() {
        let d = DataBuf::from(IoBuf::from_slice(b"abcdef"));
        assert!(!d.is_borrowed());
        assert_eq!(d.len(), 6);
        let mut out = [0u8; 3];
        assert!(d.copy_to(3, &mut out));
        assert_eq!(&out, b"def");
        assert!(!d.copy_to(4, &mut out));
        assert!(!d.copy_to(usize::MAX, &mut out));
        assert_eq!(&d.into_owned().expect("owned")[..], b"abcdef");
    }
}
