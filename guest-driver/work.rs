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

/// A `struct delayed_work`: a work item queued after a delay (a timer queues it).
///
/// # Invariants
///
/// Initialized by [`DelayedWork::init`] before it is queued.
#[repr(transparent)]
pub(crate) struct DelayedWork(Opaque<bindings::delayed_work>);

// SAFETY: the delayed_work is only used through the workqueue and timer APIs, which serialize
// their users.
unsafe impl Send for DelayedWork {}
// SAFETY: as above.
unsafe impl Sync for DelayedWork {}

static DELAYED_KEY: Key = Key(Opaque::uninit());
static TIMER_KEY: Key = Key(Opaque::uninit());

impl DelayedWork {
    /// A delayed work item to be initialized by [`DelayedWork::init`].
    pub(crate) const fn new() -> Self {
        DelayedWork(Opaque::uninit())
    }

    /// Makes the work item run `func`, which receives a pointer to its `work_struct` (the
    /// first field of the `delayed_work`). What C's `INIT_DELAYED_WORK()` does.
    ///
    /// # Safety
    ///
    /// Called once, before the work item is queued, and `self` does not move afterwards.
    pub(crate) unsafe fn init(&self, func: unsafe extern "C" fn(*mut bindings::work_struct)) {
        let dw = self.0.get();
        // SAFETY: the caller guarantees the item is not in use and stays where it is; the
        // names and keys are static; `delayed_work_timer_fn` is the kernel's, which queues
        // the work when the timer fires.
        unsafe {
            bindings::init_work_with_key(
                core::ptr::addr_of_mut!((*dw).work),
                Some(func),
                false,
                c"tmem_shrink".as_ptr().cast(),
                DELAYED_KEY.0.get(),
            );
            bindings::init_timer_key(
                core::ptr::addr_of_mut!((*dw).timer),
                Some(bindings::delayed_work_timer_fn),
                bindings::TIMER_IRQSAFE,
                c"tmem_shrink_timer".as_ptr().cast(),
                TIMER_KEY.0.get(),
            );
        }
    }

    /// Queues it on the freezable system workqueue after `ms` milliseconds. False if it was
    /// queued already.
    pub(crate) fn queue_after(&self, ms: u32) -> bool {
        // SAFETY: initialized (type invariant); `system_freezable_wq` is set up at boot and
        // never changes; `__msecs_to_jiffies` only computes.
        unsafe {
            bindings::queue_delayed_work_on(
                bindings::wq_misc_consts_WORK_CPU_UNBOUND as _,
                bindings::system_freezable_wq,
                self.0.get(),
                bindings::__msecs_to_jiffies(ms),
            )
        }
    }

    /// Takes it off its timer and queue, or waits for the run in progress to end. Sleeps.
    pub(crate) fn cancel_sync(&self) {
        // SAFETY: initialized (type invariant).
        unsafe { bindings::cancel_delayed_work_sync(self.0.get()) };
    }
}
