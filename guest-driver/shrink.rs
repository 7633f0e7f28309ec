// SPDX-License-Identifier: GPL-2.0

//! `VIRTIO_TMEM_F_SHRINK`: the host asks for memory back by setting `shrink_target_pages` in
//! the config space. The host can evict page-cache pages itself; swap pages are the only copy,
//! so the driver gives them back: the tmem core writes them to their swap devices, as zswap's
//! shrinker does (`tmem_swap_writeback()`), until the host holds at most the target, and new
//! swap pages beyond it go to the swap device.
//!
//! The daemon cannot send config change notifications (see docs/virtio-tmem.md), so a delayed
//! work reads the target every [`PERIOD_MS`], on the freezable workqueue (never while the
//! system suspends).

use core::sync::atomic::Ordering;

use kernel::bindings;

use crate::device::TmemDev;
use crate::proto;
use crate::virtio;

/// How often the target is read.
const PERIOD_MS: u32 = 1000;
/// The wait before the next batch while the host holds more than its target.
const BUSY_MS: u32 = 50;
/// Pages written back per run of the work (16 MiB): the work must not hold the workqueue long.
const BATCH: u64 = 4096;
/// `shrink_target_pages` when the host asks for nothing.
pub(crate) const NO_TARGET: u64 = u64::MAX;
/// Where `shrink_target_pages` sits in the config space.
const TARGET_OFFSET: usize = 16;

impl TmemDev {
    /// Starts reading the target (the end of probe), if the device may set one. The work
    /// runs on the freezable workqueue, so it is still across a suspend.
    pub(crate) fn start_shrink(&self, vdev: &virtio::Device) {
        if vdev.has_feature(proto::feature::SHRINK) {
            self.shrink_on.store(true, Ordering::Release);
            self.shrink_work.queue_after(PERIOD_MS);
        }
    }

    /// Stops it and waits for a run in progress (removal). The target is forgotten.
    pub(crate) fn stop_shrink(&self) {
        self.shrink_on.store(false, Ordering::Release);
        self.shrink_work.cancel_sync();
        self.stats.shrink_target.store(NO_TARGET, Ordering::Relaxed);
    }

    /// Whether a new swap page would take the host past its target (it then goes to the swap
    /// device). Any context.
    pub(crate) fn over_shrink_target(&self) -> bool {
        let target = self.stats.shrink_target.load(Ordering::Relaxed);
        // SAFETY: reads an atomic counter of the tmem core.
        target != NO_TARGET && unsafe { bindings::tmem_swap_stored() } as u64 >= target
    }

    fn shrink(&self) {
        let raw = self.vdev.load(Ordering::Acquire);
        if raw.is_null() || !self.shrink_on.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: `vdev` is set from the end of probe until removal begins, and removal waits
        // for this work (`stop_shrink`) before the device goes.
        let vdev = unsafe { virtio::Device::from_raw(raw) };
        let mut b = [0u8; 8];
        let target = match vdev.read_config(TARGET_OFFSET, &mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => NO_TARGET,
        };
        self.stats.shrink_target.store(target, Ordering::Relaxed);
        // SAFETY: reads an atomic counter of the tmem core.
        let held = unsafe { bindings::tmem_swap_stored() } as u64;
        let mut next = PERIOD_MS;
        if target != NO_TARGET && held > target {
            let want = (held - target).min(BATCH);
            // SAFETY: process context (a work item), outside every backend operation; the core
            // calls the backend's operations, which this device serves.
            let done = unsafe { bindings::tmem_swap_writeback(want as _) } as u64;
            self.stats
                .shrink_writebacks
                .fetch_add(done, Ordering::Relaxed);
            if done > 0 {
                next = BUSY_MS;
            }
        }
        // SAFETY: as above.
        let held = unsafe { bindings::tmem_swap_stored() } as u64;
        self.stats.swap_stored.store(held, Ordering::Relaxed);
        if self.shrink_on.load(Ordering::Acquire) {
            self.shrink_work.queue_after(next);
        }
    }
}

/// The work function of [`TmemDev::shrink_work`].
///
/// # Safety
///
/// `work` is the `work_struct` of the `shrink_work` of a live `TmemDev`.
pub(crate) unsafe extern "C" fn shrink_work(work: *mut bindings::work_struct) {
    // SAFETY: the `work_struct` is the first field of the `delayed_work`, which
    // `DelayedWork` wraps transparently, and the caller guarantees it is the field of a live
    // `TmemDev`.
    let dev = unsafe {
        &*kernel::container_of!(
            work.cast::<crate::work::DelayedWork>(),
            TmemDev,
            shrink_work
        )
    };
    dev.shrink();
}
