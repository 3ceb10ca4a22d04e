//! [`SharedBuf`]: a request's buffer, shared by its task and the ops that read into or write
//! from parts of it.

use std::cell::UnsafeCell;
use std::rc::Rc;

use crate::io::uring::buf::{DataBuf, IoBuf};

/// A buffer several in-flight ops point into (a read split into runs, a write split into
/// pieces): the engine's own ([`IoBuf`]) or lent memory ([`crate::LentBuf`]); its bytes are
/// reached through raw pointers only ([`SharedBuf::region_ptr`]), and a `&mut` to an owned
/// one ([`SharedBuf::get_mut`]) exists only for a unique handle. Each op holds a clone, so the memory outlives every SQE that points into it; the
/// task gets the buffer back ([`SharedBuf::into_inner`]) once its last op completed.
///
/// Invariants: while clones are held by ops in flight, each op's region is touched only by the
/// kernel for that op (and by the core, through [`SharedBuf::region_ptr`], for a region no op in
/// flight covers); `&mut` access to the whole buffer exists only through [`SharedBuf::get_mut`],
/// which requires this handle to be the only one. Core-local (`Rc`): never crosses threads.
#[derive(Clone)]
pub(crate) struct SharedBuf(Rc<UnsafeCell<DataBuf>>);

impl std::fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuf")
            .field("len", &self.len())
            .field("handles", &Rc::strong_count(&self.0))
            .finish()
    }
}

impl SharedBuf {
    pub(crate) fn new(buf: impl Into<DataBuf>) -> SharedBuf {
        SharedBuf(Rc::new(UnsafeCell::new(buf.into())))
    }

    fn header(&self) -> &DataBuf {
        // SAFETY: only the buffer's header (pointer, lengths, origin) is read through this
        // reference; it is never changed while clones exist (get_mut needs a unique handle),
        // and the kernel (or a lender) writes only the bytes it points to, never the header.
        // No reference to those bytes is made from it: DataBuf gives none.
        unsafe { &*self.0.get() }
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.header().len()
    }

    /// The arena id and slot, if the buffer is an arena slot.
    pub(crate) fn arena_slot(&self) -> Option<(u64, u32)> {
        self.header().arena_slot()
    }

    /// A pointer to bytes `[at, at + len)`, or `None` when that range is not inside the buffer.
    pub(crate) fn region_ptr(&self, at: usize, len: usize) -> Option<*mut u8> {
        let end = at.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        // SAFETY: at <= len of the buffer, so the pointer stays inside its allocation.
        Some(unsafe { self.header().raw_ptr().add(at) })
    }

    /// The buffer, when this is the only handle (no op in flight points into it) and it is the
    /// engine's own (lent memory is never handed out as a reference).
    pub(crate) fn get_mut(&mut self) -> Option<&mut IoBuf> {
        match Rc::get_mut(&mut self.0).map(UnsafeCell::get_mut)? {
            DataBuf::Owned(b) => Some(b),
            DataBuf::Lent(_) => None,
        }
    }

    /// No other handle exists (no op in flight points into the buffer).
    pub(crate) fn is_unique(&self) -> bool {
        Rc::strong_count(&self.0) == 1
    }

    /// The buffer back, when this is the only handle.
    pub(crate) fn into_inner(self) -> Result<DataBuf, SharedBuf> {
        Rc::try_unwrap(self.0)
            .map(UnsafeCell::into_inner)
            .map_err(SharedBuf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_access_only_without_clones() {
        let mut a = SharedBuf::new(IoBuf::new_zeroed(100));
        let b = a.clone();
        assert!(a.get_mut().is_none(), "a clone is out");
        assert!(a.region_ptr(90, 10).is_some());
        assert!(a.region_ptr(91, 10).is_none());
        assert!(a.region_ptr(usize::MAX, 2).is_none());
        let b = b.into_inner().expect_err("still shared");
        drop(b);
        a.get_mut().expect("unique")[0] = 1;
        let back = a.into_inner().expect("unique").into_owned().expect("owned");
        assert_eq!(back[0], 1);
    }
}
