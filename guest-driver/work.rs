// SPDX-License-Identifier: GPL-2.0

//! A work item embedded in the device's structure, on the raw workqueue API.
//!
//! 6.12's Rust `Work` hands the workqueue an `Arc` reference per queueing, which the driver's
//! hooks cannot make (they have `&TmemDev`, never an `Arc`). This one is queued by address
//! instead: the structure holding it must outlive it, which [`Work::cancel_sync`] at removal
//! guarantees.

use kernel::{bindings, types::Opaque};

/// A `struct work_struct`.
///
/// # Invariants
///
/// Initialized by [`Work::init`] before it is queued.
#[repr(transparent)]
pub(crate) struct Work(Opaque<bindings::work_struct>);

// SAFETY: the work_struct is only used through the workqueue API, which serializes its users.
unsafe impl Send for Work {}
// SAFETY: as above.
unsafe impl Sync for Work {}

/// The lockdep class of the work item (lockdep wants a static key).
#[repr(transparent)]
struct Key(Opaque<bindings::lock_class_key>);

// SAFETY: lockdep synchronizes its use of the key itself.
unsafe impl Sync for Key {}

static KEY: Key = Key(Opaque::uninit());

impl Work {
    /// A work item to be initialized by [`Work::init`].
    pub(crate) const fn new() -> Self {
        Work(Opaque::uninit())
    }

    /// Makes the work item run `func`, which receives a pointer to it.
    ///
    /// # Safety
    ///
    /// Called once, before the work item is queued, and `self` does not move afterwards.
    pub(crate) unsafe fn init(&self, func: unsafe extern "C" fn(*mut bindings::work_struct)) {
        // SAFETY: the caller guarantees the work item is not in use and stays where it is;
        // the name and the key are static.
        unsafe {
            bindings::init_work_with_key(
                self.0.get(),
                Some(func),
                false,
                c"tmem_recover".as_ptr().cast(),
                KEY.0.get(),
            )
        };
    }

    /// Queues it on the freezable system workqueue (so it never runs while the system
    /// suspends). Callable in atomic context. False if it was queued already.
    pub(crate) fn queue(&self) -> bool {
        // SAFETY: initialized (type invariant); `system_freezable_wq` is set up at boot and
        // never changes.
        unsafe {
            bindings::queue_work_on(
                bindings::wq_misc_consts_WORK_CPU_UNBOUND as _,
                bindings::system_freezable_wq,
                self.0.get(),
            )
        }
    }

    /// Takes it off its queue, or waits for the run in progress to end. Sleeps.
    pub(crate) fn cancel_sync(&self) {
        // SAFETY: initialized (type invariant).
        unsafe { bindings::cancel_work_sync(self.0.get()) };
    }
}
