// SPDX-License-Identifier: GPL-2.0

//! virtio-tmem guest driver.
//!
//! Binds to the virtio-tmem device (virtio id 63, `docs/virtio-tmem.md`) and registers as the
//! kernel's tmem backend (`include/linux/tmem.h`, added by `vm-images/patches/linux/0001`):
//! every swap area gets a persistent private pool on the host, and swapped-out pages go there;
//! every filesystem that opted in (ext4) gets an ephemeral pool, private, or shared by UUID for
//! read-only mounts when the host authorizes it, and clean page-cache pages evicted by reclaim
//! go there and come back on a read miss.
//!
//! Requests are synchronous: the tmem hooks need their answer before they return (a swap-in
//! waits for its page). Hooks that must not sleep spin on the used ring with the queue's lock
//! held; hooks that may (swap-out, swap-in, pool operations) poll for `poll_us` and then sleep
//! until the queue's interrupt, so a slow answer does not keep the CPU, and several of them
//! are in flight per queue. Either way a request waits at most `timeout_ms` (module
//! parameters), after which the device is broken and every request fails until it answers
//! again (`recovery.rs`). Buffers are allocated at probe, so the swap-out and reclaim paths, which run
//! under memory pressure, allocate nothing. Invalidations are queued and sent in `BATCH`
//! requests; every put and get sends the queued ones first, so the device sees them in order.
//!
//! A page read from the host lands in a per-queue bounce buffer and is copied into its target
//! by the CPU. The host could write it in place, but an emulator that caches translated guest
//! code (QEMU's TCG) does not see writes made by a vhost-user backend into guest memory, so a
//! code page filled that way (a swapped-out shmem or executable page) would run stale code.
//! Seen in this project's VM tests; the copy costs one 4 KiB memcpy per hit.
//!
//! Files, one concern each: `virtio.rs` (a small safe wrapper of the C virtio API),
//! `backend.rs` (the tmem backend interface as safe traits and its registration), `device.rs`
//! (queues, the request path, batched invalidations), `wait.rs` (sleeping until a queue's
//! interrupt), `recovery.rs` (setting a broken device
//! up again when it answers again), `swap.rs` and `page_cache.rs` (the tmem operations),
//! `debugfs.rs` (counters), `work.rs` (the recovery's work item). This file binds the device
//! and registers the backend.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use kernel::{bindings, c_str, prelude::*, sync::Arc};

mod backend;
mod debugfs;
mod device;
mod page_cache;
mod recovery;
mod shrink;
mod swap;
mod virtio;
mod wait;
mod work;

// The wire format shared with the host daemon, included by path (Kbuild builds one crate).
// The driver uses the guest side of it only, and its `pub` items are for the host crates.
#[allow(dead_code, unreachable_pub)]
#[path = "../shared-proto/src/wire.rs"]
mod proto;

use backend::{PageCache, Swap};
use device::{TmemDev, FS_SLOTS, SWAP_TYPES};

// A request carries one kernel page and the protocol's pages are 4 KiB: on a kernel with
// larger pages only the start of each page would be stored. The module is built out of tree,
// so no Kconfig `depends on PAGE_SIZE_4KB` can keep it off such a kernel: its build fails.
kernel::static_assert!(kernel::page::PAGE_SIZE == proto::PAGE_SIZE);

module! {
    type: TmemModule,
    name: "tmem",
    author: "vhost-tmem developers",
    description: "virtio-tmem: swap and page-cache pages kept by the host (transcendent memory)",
    license: "GPL",
}

/// The devices the driver binds to. Its symbol name is what C's `MODULE_DEVICE_TABLE(virtio,
/// ...)` gives it: modpost finds it by that name and writes the `virtio:d0000003Fv*` alias into
/// the module's `.modinfo`, so that udev or mdev load the module when the device appears.
#[export_name = "__mod_virtio__tmem_id_table_device_table"]
static ID_TABLE: [bindings::virtio_device_id; 2] = [
    bindings::virtio_device_id {
        device: proto::VIRTIO_ID_TMEM,
        vendor: virtio::ANY_VENDOR,
    },
    bindings::virtio_device_id {
        device: 0,
        vendor: 0,
    },
];

static FEATURES: [u32; 5] = [
    proto::feature::MQ,
    proto::feature::SHARED_POOLS,
    proto::feature::BATCH,
    proto::feature::SESSION,
    proto::feature::SHRINK,
];

/// `timeout_ms`: how long a request may wait for the device's answer before the driver marks
/// the device broken (see `docs/guest.md`). Read on every request, settable at `insmod` and in
/// `/sys/module/tmem/parameters/timeout_ms`; values are clamped to
/// [`MIN_TIMEOUT_MS`, `MAX_TIMEOUT_MS`].
static TIMEOUT_MS: AtomicU32 = AtomicU32::new(5000);
const MIN_TIMEOUT_MS: u32 = 100;
const MAX_TIMEOUT_MS: u32 = 600_000;

/// The request timeout in nanoseconds.
pub(crate) fn timeout_ns() -> u64 {
    let ms = TIMEOUT_MS
        .load(Ordering::Relaxed)
        .clamp(MIN_TIMEOUT_MS, MAX_TIMEOUT_MS);
    u64::from(ms) * 1_000_000
}

/// `poll_us`: how long a request from a hook that may sleep (swap-out, swap-in, pool
/// operations) polls for its answer before it sleeps until the queue's interrupt (see
/// `docs/guest.md`). 0 sleeps at once; settable at `insmod` and in
/// `/sys/module/tmem/parameters/poll_us`, clamped to [`MAX_POLL_US`].
static POLL_US: AtomicU32 = AtomicU32::new(50);
const MAX_POLL_US: u32 = 1_000_000;

/// The polling time in nanoseconds.
pub(crate) fn poll_ns() -> u64 {
    u64::from(POLL_US.load(Ordering::Relaxed).min(MAX_POLL_US)) * 1000
}

/// `writethrough`: every swap page the host takes is written to the swap device as well, so
/// that a host that crashes loses none (see `docs/guest.md`). Off by default: it costs the
/// swap-out I/O tmem otherwise saves. Set at `insmod` (or `tmem.writethrough=1` on the kernel
/// command line); read-only afterwards, because the tmem core takes it at registration.
static WRITETHROUGH: AtomicBool = AtomicBool::new(false);

/// Whether the `writethrough` parameter is set.
pub(crate) fn writethrough() -> bool {
    WRITETHROUGH.load(Ordering::Relaxed)
}

/// A `struct kernel_param` in the `__param` section, where the module loader looks for the
/// module's parameters (what C's `module_param()` emits; Rust's `module!` in 6.12 has none).
/// No `parm=` `.modinfo` string: a `#[used]` static there lands in a second `.modinfo` section
/// (retained, unlike `module!`'s), which the module loader refuses.
#[repr(transparent)]
struct Param(bindings::kernel_param);

// SAFETY: the parameters are immutable; the pointers in them are to statics (a name, the
// kernel's `param_ops_uint` or `param_ops_bool`, an atomic the kernel writes as an
// `unsigned int` or a `bool`).
unsafe impl Sync for Param {}

#[used]
#[link_section = "__param"]
static WRITETHROUGH_PARAM: Param = Param(bindings::kernel_param {
    name: c"writethrough".as_ptr().cast(),
    mod_: core::ptr::null_mut(),
    // A `bool` parameter: the kernel writes the atomic as a C `bool` (same layout).
    ops: &raw const bindings::param_ops_bool,
    perm: 0o444,
    level: -1,
    flags: 0,
    __bindgen_anon_1: bindings::kernel_param__bindgen_ty_1 {
        arg: WRITETHROUGH.as_ptr().cast(),
    },
});

#[used]
#[link_section = "__param"]
static POLL_US_PARAM: Param = Param(bindings::kernel_param {
    name: c"poll_us".as_ptr().cast(),
    mod_: core::ptr::null_mut(),
    ops: &raw const bindings::param_ops_uint,
    perm: 0o644,
    level: -1,
    flags: 0,
    __bindgen_anon_1: bindings::kernel_param__bindgen_ty_1 {
        arg: POLL_US.as_ptr().cast(),
    },
});

#[used]
#[link_section = "__param"]
static TIMEOUT_MS_PARAM: Param = Param(bindings::kernel_param {
    name: c"timeout_ms".as_ptr().cast(),
    // Only used to pick the lock that serializes the parameter's readers and writers: NULL
    // means the kernel's global one.
    mod_: core::ptr::null_mut(),
    ops: &raw const bindings::param_ops_uint,
    perm: 0o644,
    level: -1,
    flags: 0,
    __bindgen_anon_1: bindings::kernel_param__bindgen_ty_1 {
        arg: TIMEOUT_MS.as_ptr().cast(),
    },
});

struct TmemModule {
    _driver: virtio::Registration<TmemDriver>,
}

impl kernel::Module for TmemModule {
    fn init(module: &'static ThisModule) -> Result<Self> {
        // SAFETY: once, before the driver registers: no virtqueue exists yet.
        unsafe { wait::init() };
        let driver = virtio::Registration::new(c_str!("tmem"), &ID_TABLE, &FEATURES, module)?;
        Ok(TmemModule { _driver: driver })
    }
}

/// What a bound device keeps until it is removed.
struct Bound {
    backend: backend::Registration<TmemDev>,
    debugfs: debugfs::Dir,
    dev: Arc<TmemDev>,
}

struct TmemDriver;

impl virtio::Driver for TmemDriver {
    type Data = Bound;

    // Indirect descriptors would make the virtio core allocate a table (GFP_ATOMIC) for every
    // request of more than one buffer, that is every request, in reclaim.
    const REFUSED_FEATURES: &'static [u32] = &[virtio::RING_F_INDIRECT_DESC];

    fn probe(vdev: &virtio::Device) -> Result<KBox<Bound>> {
        // Allocated first: nothing can fail once the backend is registered.
        let bound = KBox::<Bound>::new_uninit(GFP_KERNEL)?;
        let dev = TmemDev::new(vdev)?;
        let debugfs = debugfs::Dir::new(&dev);
        // The core replays the swap areas and filesystems in use at registration: the queues
        // must work by then.
        vdev.ready();
        // With SESSION the host keeps this driver's pools over a reconnect of the VMM, so it
        // may still hold those of an earlier boot or binding: drop them before the first pool.
        if vdev.has_feature(proto::feature::SESSION) {
            if let Err(e) = dev.reset() {
                pr_err!("RESET failed: {}\n", e.to_errno());
                drop(debugfs);
                teardown(vdev, dev);
                return Err(e);
            }
        }
        match backend::Registration::register(dev.clone(), &THIS_MODULE) {
            Ok(backend) => {
                dev.enable_recovery(vdev);
                dev.start_shrink(vdev);
                Ok(bound.write(Bound {
                    backend,
                    debugfs,
                    dev,
                }))
            }
            Err(e) => {
                // EBUSY: another backend (a second virtio-tmem device) is registered; one is
                // served.
                pr_err!("tmem_register_backend failed: {}\n", e.to_errno());
                drop(debugfs);
                teardown(vdev, dev);
                Err(e)
            }
        }
    }

    fn remove(vdev: &virtio::Device, bound: KBox<Bound>) {
        let Bound {
            backend,
            debugfs,
            dev,
        } = KBox::into_inner(bound);
        // Waits for the hooks in flight: none can reach the device after this, nor queue a
        // recovery; then waits for a recovery in progress.
        drop(backend);
        dev.stop_recovery();
        dev.stop_shrink();
        dev.send_pending(&mut dev.pending.lock());
        // Every pool is the driver's to release now: the core will not ask again. A swap area
        // still in use has no page stored (its pages hold module references, so `rmmod`
        // waits for swapoff) or, when the device is unbound, its pages are `lost` to the
        // core: either way nothing will load them, and the host must not keep them counted
        // against this guest's quota and pool limit.
        for type_ in 0..SWAP_TYPES {
            dev.swap_invalidate_area(type_ as u32);
        }
        for fs in 0..FS_SLOTS {
            dev.cache_exit(fs as u32);
        }
        drop(debugfs);
        teardown(vdev, dev);
        pr_info!("device removed\n");
    }

    fn freeze(vdev: &virtio::Device, bound: &Bound) -> Result {
        bound.dev.freeze(vdev);
        pr_info!("suspended: the host keeps the stored pages\n");
        Ok(())
    }

    fn restore(vdev: &virtio::Device, bound: &Bound) -> Result {
        bound.dev.restore(vdev)?;
        pr_info!("resumed\n");
        Ok(())
    }
}

/// Resets the device and frees the driver's state, once nothing else uses `dev`.
fn teardown(vdev: &virtio::Device, dev: Arc<TmemDev>) {
    vdev.reset();
    // Frozen, or a restore that failed, left no queues to delete.
    if dev.has_queues() {
        // SAFETY: the backend is unregistered (or was never registered) and the debugfs files
        // are gone, so no request is in flight and `dev`, the last user of the queues, goes
        // next.
        unsafe { vdev.del_vqs() };
    }
    drop(dev);
}
