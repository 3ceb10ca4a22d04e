//! Aligned I/O buffers. OWNER: issue #3.

/// An aligned (4096-byte) buffer, either a slot of the engine's registered arena or a heap
/// allocation. Derefs to `[u8]` of its current length.
#[derive(Debug)]
pub struct IoBuf {
    data: Vec<u8>,
}

impl IoBuf {
    /// A zeroed, heap-allocated buffer (issue #3 replaces with aligned allocation).
    pub fn new_zeroed(len: usize) -> IoBuf {
        IoBuf { data: vec![0; len] }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}
