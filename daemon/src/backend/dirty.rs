//! [`WithBitmaps`]: any [`Backend`] that also serves given dirty bitmaps as
//! `qemu:dirty-bitmap:NAME`: for a read-only point-in-time view of a disk that serves the
//! [`FrozenBitmap`](addcow_engine::dirty::FrozenBitmap) of what changed since the previous
//! checkpoint (from `Disk::checkpoint`), or any other [`DirtySource`].

use std::sync::{Arc, RwLockReadGuard};

use addcow_engine::dirty::{DirtyExtent, DirtySource};
use addcow_engine::{Completion, DepthExtent, Disk, Extent, ExtentKind, IoBuf, Request, SourceCtx};

use super::disk::{Backend, EngineDisk, MAX_EXPORTED_BITMAPS};

/// `inner`, whose block status also answers `qemu:dirty-bitmap:NAME` for each of `bitmaps`
/// (in context-id order); everything else is `inner`'s.
pub struct WithBitmaps {
    inner: Arc<dyn Backend>,
    bitmaps: Vec<(String, Arc<dyn DirtySource>)>,
}

impl WithBitmaps {
    /// Fails with more than [`MAX_EXPORTED_BITMAPS`] bitmaps or a name given twice.
    pub fn new(
        inner: Arc<dyn Backend>,
        bitmaps: Vec<(String, Arc<dyn DirtySource>)>,
    ) -> Result<WithBitmaps, String> {
        if bitmaps.len() > MAX_EXPORTED_BITMAPS {
            return Err(format!("at most {MAX_EXPORTED_BITMAPS} bitmaps per export"));
        }
        for (i, (n, _)) in bitmaps.iter().enumerate() {
            if bitmaps[..i].iter().any(|(m, _)| m == n) {
                return Err(format!("bitmap {n:?} named twice"));
            }
        }
        Ok(WithBitmaps { inner, bitmaps })
    }
}

impl Backend for WithBitmaps {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn submit(&self, core: usize, req: Request, done: Completion) {
        self.inner.submit(core, req, done)
    }
    fn try_submit_local(
        &self,
        ctx: &mut SourceCtx<'_>,
        req: Request,
        done: Completion,
    ) -> Option<(Request, Completion)> {
        self.inner.try_submit_local(ctx, req, done)
    }
    fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        self.inner.allocation(offset, len)
    }
    fn try_allocation(&self, offset: u64, len: u64) -> Option<Vec<Extent>> {
        self.inner.try_allocation(offset, len)
    }
    fn metered(&self) -> bool {
        self.inner.metered()
    }
    fn allocation_depth(&self, offset: u64, len: u64) -> Vec<DepthExtent> {
        self.inner.allocation_depth(offset, len)
    }
    fn pin_layout(&self) -> Option<RwLockReadGuard<'_, ()>> {
        self.inner.pin_layout()
    }
    fn alloc_buf(&self, len: usize) -> IoBuf {
        self.inner.alloc_buf(len)
    }
    fn disk(&self) -> Option<Disk> {
        self.inner.disk()
    }
    fn engine_disk(&self) -> Option<&EngineDisk> {
        self.inner.engine_disk()
    }
    fn zero_ranges(&self, layer: ExtentKind, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        self.inner.zero_ranges(layer, start, end, out)
    }
    fn fast_zero_unit(&self) -> Option<u64> {
        self.inner.fast_zero_unit()
    }
    fn exported_bitmaps(&self) -> Vec<String> {
        self.bitmaps.iter().map(|(n, _)| n.clone()).collect()
    }
    fn dirty_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Option<Vec<DirtyExtent>> {
        let (_, src) = self.bitmaps.iter().find(|(n, _)| n == name)?;
        src.dirty_extents(offset, len, max)
    }
}
