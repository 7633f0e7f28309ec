// SPDX-License-Identifier: GPL-2.0

//! The driver's counters and their read-only files in `/sys/kernel/debug/tmem/`.
//!
//! The VM tests and `make demo` read these files, so their names are part of the driver's
//! interface (listed in `guest-driver/README.md`).

use core::ptr;
use core::sync::atomic::AtomicU64;
use kernel::{bindings, c_str, prelude::*, sync::Arc};

use crate::device::TmemDev;

/// Request counters: the swap side, the page-cache side (`cache_*`), and what both share.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) puts: AtomicU64,
    pub(crate) puts_refused: AtomicU64,
    pub(crate) gets: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) cache_puts: AtomicU64,
    pub(crate) cache_puts_refused: AtomicU64,
    pub(crate) cache_gets: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) cache_invalidations: AtomicU64,
    pub(crate) cache_pools: AtomicU64,
    pub(crate) cache_shared_pools: AtomicU64,
    /// Filesystem pools replaced by an empty one (`invalidate_bdev()`).
    pub(crate) cache_pool_resets: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Answers whose used length was not what the operation returns.
    pub(crate) bad_answers: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) pools: AtomicU64,
    /// Recovery attempts (see `recovery.rs`).
    pub(crate) recoveries: AtomicU64,
    /// Requests whose caller slept until the queue's interrupt (see `device.rs`).
    pub(crate) sleeps: AtomicU64,
    /// The host's `shrink_target_pages` as last read (`u64::MAX`: none), the swap pages the
    /// host held then, the pages written back to the swap devices for it, and the new swap
    /// pages sent to the swap device because of it (see `shrink.rs`).
    pub(crate) shrink_target: AtomicU64,
    pub(crate) swap_stored: AtomicU64,
    pub(crate) shrink_writebacks: AtomicU64,
    pub(crate) shrink_refused: AtomicU64,
}

/// The `tmem` directory, one file per counter of a device; dropping it removes them.
pub(crate) struct Dir {
    dentry: *mut bindings::dentry,
    /// The device whose counters the files show: it outlives them.
    _dev: Arc<TmemDev>,
}

impl Dir {
    /// Creates the files. debugfs errors are not fatal: the driver works without its files.
    pub(crate) fn new(dev: &Arc<TmemDev>) -> Self {
        // SAFETY: the name is a NUL-terminated string; a NULL parent is the debugfs root.
        let dir =
            unsafe { bindings::debugfs_create_dir(c_str!("tmem").as_char_ptr(), ptr::null_mut()) };
        let s = &dev.stats;
        let files: [(&CStr, &AtomicU64); 25] = [
            (c_str!("puts"), &s.puts),
            (c_str!("puts_refused"), &s.puts_refused),
            (c_str!("gets"), &s.gets),
            (c_str!("hits"), &s.hits),
            (c_str!("misses"), &s.misses),
            (c_str!("cache_puts"), &s.cache_puts),
            (c_str!("cache_puts_refused"), &s.cache_puts_refused),
            (c_str!("cache_gets"), &s.cache_gets),
            (c_str!("cache_hits"), &s.cache_hits),
            (c_str!("cache_misses"), &s.cache_misses),
            (c_str!("cache_invalidations"), &s.cache_invalidations),
            (c_str!("cache_pools"), &s.cache_pools),
            (c_str!("cache_shared_pools"), &s.cache_shared_pools),
            (c_str!("cache_pool_resets"), &s.cache_pool_resets),
            (c_str!("failures"), &s.failures),
            (c_str!("bad_answers"), &s.bad_answers),
            (c_str!("flushes"), &s.flushes),
            (c_str!("batches"), &s.batches),
            (c_str!("pools"), &s.pools),
            (c_str!("recoveries"), &s.recoveries),
            (c_str!("sleeps"), &s.sleeps),
            (c_str!("shrink_target"), &s.shrink_target),
            (c_str!("swap_stored"), &s.swap_stored),
            (c_str!("shrink_writebacks"), &s.shrink_writebacks),
            (c_str!("shrink_refused"), &s.shrink_refused),
        ];
        for (name, counter) in files {
            // SAFETY: debugfs accepts an error pointer as parent (it then does nothing); the
            // counter lives in the device, which this directory keeps alive until the files
            // are removed.
            unsafe {
                bindings::debugfs_create_u64(name.as_char_ptr(), 0o444, dir, counter.as_ptr())
            };
        }
        Self {
            dentry: dir,
            _dev: dev.clone(),
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: `dentry` is the directory `new` created (or an error pointer, which debugfs
        // ignores); removing it removes the files before the device can go.
        unsafe { bindings::debugfs_remove(self.dentry) };
    }
}
