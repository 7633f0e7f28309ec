// SPDX-License-Identifier: GPL-2.0

//! Sleeping until a virtqueue's interrupt: one wait queue per queue index, and the callback
//! the virtio core runs when the device returns requests.
//!
//! The wait queues are statics, initialized when the module loads, because the callback runs
//! in interrupt context and must find its wait queue without touching memory a removal could
//! be freeing: a static outlives every virtqueue (they are deleted before the module can be
//! unloaded). Queues are picked by index, so a second device of this driver (which cannot
//! register as the tmem backend and so sends nothing) could only cause spurious wakeups.
//! 6.12's Rust `CondVar` has no uninterruptible timed wait: a task waiting for its swap page
//! must not return early on a signal, nor spin through one.

use kernel::{bindings, types::Opaque};

use crate::proto;

/// Queues a device has at most: the control queue and the request queues.
pub(crate) const MAX_QUEUES: usize = 1 + proto::MAX_REQUEST_QUEUES as usize;

/// A `struct wait_queue_head`.
///
/// # Invariants
///
/// Initialized by [`init`] before any other use (module load, before the driver registers).
#[repr(transparent)]
struct WaitQueue(Opaque<bindings::wait_queue_head>);

// SAFETY: a wait queue head is used only through the kernel's wait API, which locks it.
unsafe impl Sync for WaitQueue {}

/// The lockdep class of the wait queues' locks (lockdep wants a static key).
#[repr(transparent)]
struct Key(Opaque<bindings::lock_class_key>);

// SAFETY: lockdep synchronizes its use of the key itself.
unsafe impl Sync for Key {}

static KEY: Key = Key(Opaque::uninit());
static QUEUES: [WaitQueue; MAX_QUEUES] = [const { WaitQueue(Opaque::uninit()) }; MAX_QUEUES];

/// Initializes the wait queues.
///
/// # Safety
///
/// Called once, at module load, before any virtqueue with [`callback`] exists.
pub(crate) unsafe fn init() {
    for q in &QUEUES {
        // SAFETY: the caller guarantees nothing uses the wait queue yet; name and key are
        // static.
        unsafe {
            bindings::__init_waitqueue_head(q.0.get(), c"tmem_vq_wait".as_ptr().cast(), KEY.0.get())
        };
    }
}

/// Wakes every task sleeping on queue `index`. Callable in any context.
pub(crate) fn wake(index: usize) {
    if let Some(q) = QUEUES.get(index) {
        // SAFETY: initialized at module load (type invariant).
        unsafe { bindings::__wake_up(q.0.get(), bindings::TASK_NORMAL, 0, core::ptr::null_mut()) };
    }
}

/// The virtqueue callback (interrupt context): the device returned requests on the queue,
/// whose sleepers take them (`device.rs`). It touches nothing else: taking them needs the
/// queue's lock, which process context holds with interrupts on. Interrupts are enabled while
/// a caller sleeps; disabling them is a hint to the device, so a stray one only wakes
/// sleepers that find nothing and sleep again.
pub(crate) unsafe extern "C" fn callback(vq: *mut bindings::virtqueue) {
    // SAFETY: the virtio core passes a virtqueue of this driver's device, valid during the
    // call.
    let index = unsafe { (*vq).index } as usize;
    wake(index);
}

/// Sleeps (uninterruptibly) on queue `index` for at most `timeout_ns`, unless `check`, run
/// after the task is on the wait queue, says not to (returns false): a wakeup between the
/// check and the sleep is not lost. Returns after a wakeup, the timeout, or a false check.
/// Sleeps: only for callers that may.
pub(crate) fn sleep(index: usize, timeout_ns: u64, check: impl FnOnce() -> bool) {
    let Some(q) = QUEUES.get(index) else {
        return;
    };
    let entry = Opaque::<bindings::wait_queue_entry>::uninit();
    // At least one jiffy: 0 would not sleep at all.
    let ms = timeout_ns.div_ceil(1_000_000).clamp(1, u64::from(u32::MAX)) as u32;
    // SAFETY: `entry` lives on this stack frame and does not move until `finish_wait` took it
    // off the queue below; the queue is initialized (type invariant). `__msecs_to_jiffies`
    // only computes.
    unsafe {
        bindings::init_wait(entry.get());
        bindings::prepare_to_wait(q.0.get(), entry.get(), bindings::TASK_UNINTERRUPTIBLE as _);
        if check() {
            bindings::schedule_timeout(bindings::__msecs_to_jiffies(ms) as _);
        }
        bindings::finish_wait(q.0.get(), entry.get());
    }
}
