// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The dirty-page bitmap guest memory carries, for live migration.
//!
//! vhost-user-backend's own [`BitmapMmapRegion`] takes a lock on every write through vm-memory
//! and clones an `Arc` for every slice it makes, whether or not a log is set: that cost the
//! GET path about a fifth of its end-to-end throughput with migration off. [`DirtyLog`] wraps
//! it behind one atomic load: until the frontend sets a log (SET_LOG_BASE), marking a page is a
//! load and a branch, and slices borrow the region's bitmap instead of cloning it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering::Acquire, Ordering::Release};
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// One region's dirty-page bitmap: nothing until a log is set, then the log.
#[derive(Clone, Default)]
pub struct DirtyLog {
    // Shared by the clones the backend makes of a region's bitmap, so that the log it puts
    // under one is seen through all.
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Set once a log is in `log`; read before every mark.
    logging: AtomicBool,
    /// Region-relative: never sliced, its base is the region's start.
    log: BitmapMmapRegion,
}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("logging", &self.logging())
            .finish()
    }
}

impl DirtyLog {
    /// Whether a log has been set, so that writes are marked in it.
    pub fn logging(&self) -> bool {
        self.inner.logging.load(Acquire)
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.logging() {
            self.inner.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.logging() && self.inner.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.inner.log.replace(bitmap);
        // After the log is in place, so that a writer that sees the flag finds the log.
        self.inner.logging.store(true, Release);
    }
}

/// The bitmap a device's guest memory carries: [`DirtyLog`] when the daemon offers live
/// migration, `()` when it does not. With `()` every mark compiles away, and so does much of
/// vm-memory's generic copying around it: on the GET path that is worth more than the marks
/// themselves (measured with `make bench`; see CHANGELOG).
pub trait GuestBitmap:
    BitmapReplace + NewBitmap + Clone + Default + Send + Sync + fmt::Debug + 'static
{
    /// Whether a frontend's log can be put under this bitmap (VHOST_USER_PROTOCOL_F_LOG_SHMFD
    /// may be offered).
    const LOGS: bool;
}

impl GuestBitmap for () {
    const LOGS: bool = false;
}

impl GuestBitmap for DirtyLog {
    const LOGS: bool = true;
}
