// SPDX-License-Identifier: GPL-2.0

//! A small safe wrapper of the C virtio API: what this driver needs of it.
//!
//! Linux 6.12 has no Rust virtio abstractions, so this file provides them for the driver's
//! use only: driver registration with probe and remove, feature and config-space reads, and
//! polled virtqueues carrying requests made of scatterlists. The raw bindings and the helpers
//! for inline C functions come from `vm-images/patches/linux/` (the Rust bindings patch). The
//! `unsafe` blocks of the driver live here and in `backend.rs`, `debugfs.rs`, `wait.rs` and
//! `work.rs` (and the work function's one in `recovery.rs`), so the device logic is safe Rust.

use core::marker::PhantomData;
use core::ptr;
use kernel::ffi::{c_int, c_uint};
use kernel::{bindings, error::to_result, page::PAGE_SIZE, prelude::*, types::Opaque};

use crate::backend::Page;

/// `VIRTIO_DEV_ANY_ID`: any vendor.
pub(crate) const ANY_VENDOR: u32 = 0xffff_ffff;

/// `VIRTIO_RING_F_INDIRECT_DESC`, a transport feature (virtio 1.x, 6.3).
pub(crate) const RING_F_INDIRECT_DESC: u32 = 28;

/// Most buffers one request has: a header, a page and a response.
const MAX_SGS: usize = 3;

/// Descriptors one request takes at most (no indirect descriptors): a queue of `n` entries
/// holds `n / DESCS_PER_REQUEST` requests at once.
pub(crate) const DESCS_PER_REQUEST: usize = MAX_SGS;

/// A virtio device the driver is bound to (`struct virtio_device`).
///
/// # Invariants
///
/// The device is valid: it is being probed, or bound to the driver until its removal ends.
#[repr(transparent)]
pub(crate) struct Device(Opaque<bindings::virtio_device>);

impl Device {
    /// # Safety
    ///
    /// `ptr` is a device being probed or bound to the driver, valid for `'a`.
    pub(crate) unsafe fn from_raw<'a>(ptr: *mut bindings::virtio_device) -> &'a Self {
        // SAFETY: `Device` is a transparent wrapper of `virtio_device`; the caller guarantees
        // the pointer is valid for `'a`.
        unsafe { &*ptr.cast::<Self>() }
    }

    pub(crate) fn as_raw(&self) -> *mut bindings::virtio_device {
        self.0.get()
    }

    /// Whether the device and the driver agreed on feature `bit`.
    pub(crate) fn has_feature(&self, bit: u32) -> bool {
        // SAFETY: the device is valid (type invariant).
        unsafe { bindings::virtio_has_feature(self.as_raw(), bit) }
    }

    /// Reads the device's config space from `offset` into `buf`. A space that ends before
    /// `buf` would is `EINVAL`: virtio-pci would stop the read with a BUG.
    pub(crate) fn read_config(&self, offset: usize, buf: &mut [u8]) -> Result {
        // SAFETY: the device is valid (type invariant).
        let len = unsafe { bindings::virtio_config_len(self.as_raw()) };
        let end = offset.checked_add(buf.len()).ok_or(EINVAL)?;
        if len < end {
            pr_err!(
                "the device's config space has {} bytes, the driver reads {}\n",
                len,
                end
            );
            return Err(EINVAL);
        }
        // SAFETY: the device is valid (type invariant), `buf` is writable for its length, and
        // the config space holds that many bytes from `offset` (checked above).
        unsafe {
            bindings::virtio_cread_bytes(
                self.as_raw(),
                offset as u32,
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Finds one virtqueue per name, each with `callback` for its interrupts, which start
    /// disabled: a caller enables them while it waits ([`Virtqueue::enable_cb`]).
    pub(crate) fn find_vqs(
        &self,
        names: &[&'static CStr],
        callback: unsafe extern "C" fn(*mut bindings::virtqueue),
    ) -> Result<KVec<Virtqueue>> {
        let mut infos = KVec::with_capacity(names.len(), GFP_KERNEL)?;
        for name in names {
            infos.push(
                bindings::virtqueue_info {
                    name: name.as_char_ptr(),
                    callback: Some(callback),
                    ctx: false,
                },
                GFP_KERNEL,
            )?;
        }
        let mut vqs = KVec::with_capacity(names.len(), GFP_KERNEL)?;
        for _ in names {
            vqs.push(Virtqueue(ptr::null_mut()), GFP_KERNEL)?;
        }
        // SAFETY: the device is valid; both arrays hold `names.len()` entries (`Virtqueue` is a
        // transparent wrapper of a virtqueue pointer) and the names are static strings.
        to_result(unsafe {
            bindings::virtio_find_vqs(
                self.as_raw(),
                names.len() as c_uint,
                vqs.as_mut_ptr().cast::<*mut bindings::virtqueue>(),
                infos.as_mut_ptr(),
                ptr::null_mut(),
            )
        })?;
        for vq in vqs.iter_mut() {
            vq.disable_cb();
        }
        Ok(vqs)
    }

    /// Tells the device the driver is ready (`DRIVER_OK`): requests may be sent from now on.
    pub(crate) fn ready(&self) {
        // SAFETY: the device is valid (type invariant).
        unsafe { bindings::virtio_device_ready(self.as_raw()) };
    }

    /// Resets the device: it stops using the virtqueues.
    pub(crate) fn reset(&self) {
        // SAFETY: the device is valid (type invariant).
        unsafe { bindings::virtio_reset_device(self.as_raw()) };
    }

    /// Resets the device and negotiates again the features agreed at probe, as the core
    /// does at probe and resume (`virtio_device_restore`, without its driver callback: the
    /// caller finds its virtqueues next, then [`Device::ready`]). The driver must have given
    /// its virtqueues back. Sleeps.
    pub(crate) fn renegotiate(&self) -> Result {
        let dev = self.as_raw();
        // SAFETY: the device is valid (type invariant); its config operations are the
        // transport's, set before probe and never changed; no virtqueue is in use.
        unsafe {
            bindings::virtio_reset_device(dev);
            bindings::virtio_add_status(dev, bindings::VIRTIO_CONFIG_S_ACKNOWLEDGE);
            bindings::virtio_add_status(dev, bindings::VIRTIO_CONFIG_S_DRIVER);
            let config = (*dev).config;
            let finalize = (*config).finalize_features.ok_or(EINVAL)?;
            to_result(finalize(dev))?;
            if bindings::virtio_has_feature(dev, bindings::VIRTIO_F_VERSION_1) {
                bindings::virtio_add_status(dev, bindings::VIRTIO_CONFIG_S_FEATURES_OK);
                let get_status = (*config).get_status.ok_or(EINVAL)?;
                if u32::from(get_status(dev)) & bindings::VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                    return Err(ENODEV);
                }
            }
        }
        Ok(())
    }

    /// Frees the virtqueues [`Device::find_vqs`] found.
    ///
    /// # Safety
    ///
    /// No request is in flight and no [`Virtqueue`] of this device is used afterwards.
    pub(crate) unsafe fn del_vqs(&self) {
        // SAFETY: the device is valid (type invariant); the caller guarantees the queues are
        // unused.
        unsafe { bindings::virtio_del_vqs(self.as_raw()) };
    }
}

/// A virtqueue.
///
/// # Invariants
///
/// The virtqueue was found by [`Device::find_vqs`] and is not deleted yet.
#[repr(transparent)]
pub(crate) struct Virtqueue(*mut bindings::virtqueue);

// SAFETY: a virtqueue can be used from any CPU; `&mut self` methods serialize its users.
unsafe impl Send for Virtqueue {}

/// What the device returned, from [`Virtqueue::get_used`].
pub(crate) enum Used {
    /// The request added with this token, and the used length.
    Request(usize, u32),
    /// Nothing (yet).
    Nothing,
    /// The device is broken (the virtio core broke it, for one because the used ring named a
    /// descriptor out of range or not at the head of a request).
    Broken,
}

impl Virtqueue {
    /// Adds one request, device-readable buffers `out` then device-writable buffers `inp`,
    /// under `token` (not 0: [`Virtqueue::get_used`] returns it with the request), and
    /// notifies the device.
    ///
    /// # Safety
    ///
    /// The buffers stay valid, and are not used by the CPU (the readable ones not written),
    /// until [`Virtqueue::get_used`] returns the request or the device is reset: the device
    /// may read and write them until then, whatever the borrows of the scatterlists say.
    pub(crate) unsafe fn add(
        &mut self,
        out: &mut [ReadSg<'_>],
        inp: &mut [WriteSg<'_>],
        token: usize,
    ) -> Result {
        if out.len() + inp.len() > MAX_SGS || token == 0 {
            return Err(EINVAL);
        }
        let mut sgs = [ptr::null_mut::<bindings::scatterlist>(); MAX_SGS];
        let readable = out.iter_mut().map(|sg| &mut sg.sg);
        let writable = inp.iter_mut().map(|sg| &mut sg.sg);
        for (slot, sg) in sgs.iter_mut().zip(Iterator::chain(readable, writable)) {
            *slot = sg;
        }
        // SAFETY: the virtqueue is valid (type invariant) and `&mut self` serializes its
        // users; each scatterlist describes a buffer the caller keeps for the device (see
        // above). The token is only handed back, never dereferenced.
        to_result(unsafe {
            bindings::virtqueue_add_sgs(
                self.0,
                sgs.as_mut_ptr(),
                out.len() as c_uint,
                inp.len() as c_uint,
                token as *mut core::ffi::c_void,
                bindings::GFP_ATOMIC,
            )
        })?;
        // SAFETY: as above.
        unsafe { bindings::virtqueue_kick(self.0) };
        Ok(())
    }

    /// The next request the device returned, if any. Never waits.
    pub(crate) fn get_used(&mut self) -> Used {
        let mut len: c_uint = 0;
        // SAFETY: the virtqueue is valid (type invariant); `&mut self` makes this its only
        // user. `virtqueue_get_buf` breaks the device when the used ring names a descriptor
        // out of range or not at the head of a request.
        let token = unsafe { bindings::virtqueue_get_buf(self.0, &mut len) };
        if !token.is_null() {
            Used::Request(token as usize, len)
        } else if self.is_broken() {
            Used::Broken
        } else {
            Used::Nothing
        }
    }

    /// Asks for an interrupt ([`crate::wait::callback`]) when the device returns a request
    /// from now on; false if it has returned some already (take them first: no interrupt
    /// may come for them).
    pub(crate) fn enable_cb(&mut self) -> bool {
        // SAFETY: the virtqueue is valid (type invariant); `&mut self` serializes its users.
        unsafe { bindings::virtqueue_enable_cb(self.0) }
    }

    /// Asks the device for no more interrupts (a hint: one may still come).
    pub(crate) fn disable_cb(&mut self) {
        // SAFETY: as in `enable_cb`.
        unsafe { bindings::virtqueue_disable_cb(self.0) };
    }

    /// How many entries the ring has.
    pub(crate) fn size(&self) -> usize {
        // SAFETY: the virtqueue is valid (type invariant).
        unsafe { bindings::virtqueue_get_vring_size(self.0) as usize }
    }

    pub(crate) fn is_broken(&self) -> bool {
        // SAFETY: the virtqueue is valid (type invariant).
        unsafe { bindings::virtqueue_is_broken(self.0) }
    }

    /// Marks the device and every one of its virtqueues broken: requests in flight are never
    /// returned, new ones fail. Callable in atomic context (it takes a spinlock only).
    pub(crate) fn break_device(&self) {
        // SAFETY: the virtqueue is valid (type invariant), so is the device it belongs to.
        unsafe { bindings::virtio_break_device((*self.0).vdev) };
    }
}

/// Real time spent since `start`, robust to a clocksource that wraps between timekeeping
/// updates (a 24-bit ACPI PM timer wraps in 4.7 s, and with interrupts off on the only CPU
/// nothing updates the timekeeping base): only forward steps between successive reads count,
/// and the caller reads far more often than the counter wraps.
pub(crate) struct Elapsed {
    last: i64,
    total: u64,
}

impl Elapsed {
    pub(crate) fn start() -> Self {
        Self {
            last: now_ns(),
            total: 0,
        }
    }

    pub(crate) fn elapsed_ns(&mut self) -> u64 {
        let now = now_ns();
        if now > self.last {
            self.total += (now - self.last) as u64;
        }
        self.last = now;
        self.total
    }
}

/// `ktime_get()`: monotonic nanoseconds; usable with interrupts off and spinlocks held.
pub(crate) fn now_ns() -> i64 {
    // SAFETY: `ktime_get` has no precondition outside NMI context.
    unsafe { bindings::ktime_get() }
}

/// A zeroed scatterlist entry, to be filled in.
fn empty_sg() -> bindings::scatterlist {
    // SAFETY: `scatterlist` is plain data for which all zeroes is a valid (empty) value.
    unsafe { core::mem::zeroed() }
}

/// One device-readable buffer of a request.
pub(crate) struct ReadSg<'a> {
    sg: bindings::scatterlist,
    _buf: PhantomData<&'a [u8]>,
}

impl<'a> ReadSg<'a> {
    /// The first `len` bytes of `buf` (at most all of it).
    pub(crate) fn bytes(buf: &'a KVec<u8>, len: usize) -> Self {
        let mut sg = empty_sg();
        // SAFETY: a `KVec` is kmalloc'ed, so in the linear map, and holds at least the
        // `len.min(buf.len())` bytes described; the borrow keeps it alive and unchanged.
        unsafe {
            bindings::sg_init_one(&mut sg, buf.as_ptr().cast(), len.min(buf.len()) as c_uint)
        };
        Self {
            sg,
            _buf: PhantomData,
        }
    }

    /// A whole page.
    pub(crate) fn page(page: &'a Page) -> Self {
        let mut sg = empty_sg();
        // SAFETY: `page` is an order-0 page its lender owns for the borrow.
        unsafe {
            bindings::sg_init_table(&mut sg, 1);
            bindings::sg_set_page(&mut sg, page.as_raw(), PAGE_SIZE as c_uint, 0);
        }
        Self {
            sg,
            _buf: PhantomData,
        }
    }
}

/// One device-writable buffer of a request.
pub(crate) struct WriteSg<'a> {
    sg: bindings::scatterlist,
    _buf: PhantomData<&'a mut [u8]>,
}

impl<'a> WriteSg<'a> {
    /// The first `len` bytes of `buf` (at most all of it).
    pub(crate) fn bytes(buf: &'a mut KVec<u8>, len: usize) -> Self {
        let mut sg = empty_sg();
        // SAFETY: a `KVec` is kmalloc'ed, so in the linear map, and holds at least the
        // `len.min(buf.len())` bytes described; the borrow is exclusive.
        unsafe {
            bindings::sg_init_one(
                &mut sg,
                buf.as_mut_ptr().cast(),
                len.min(buf.len()) as c_uint,
            )
        };
        Self {
            sg,
            _buf: PhantomData,
        }
    }
}

/// The CPU the caller runs on, to pick a per-CPU queue; a stale value is harmless.
pub(crate) fn this_cpu() -> usize {
    // SAFETY: reading the CPU number has no precondition; the caller may migrate right after,
    // which only picks another queue.
    unsafe { bindings::raw_smp_processor_id() as usize }
}

/// A virtio driver: what `probe` builds is kept until `remove`.
pub(crate) trait Driver {
    /// The state of a bound device.
    type Data;

    /// Transport features (ring layout and the like) the driver refuses even when the device
    /// offers them; the virtio core accepts every one it knows otherwise.
    const REFUSED_FEATURES: &'static [u32] = &[];

    /// Binds to `dev`.
    fn probe(dev: &Device) -> Result<KBox<Self::Data>>;

    /// Unbinds from `dev`, which stays valid during the call.
    fn remove(dev: &Device, data: KBox<Self::Data>);

    /// Suspend or hibernation: the device will be reset before [`Driver::restore`], so the
    /// driver stops using it and gives its virtqueues back. An error refuses the suspend.
    fn freeze(dev: &Device, data: &Self::Data) -> Result;

    /// Resume: the device was reset and its features negotiated again; the driver sets its
    /// virtqueues up again. An error leaves the device failed.
    fn restore(dev: &Device, data: &Self::Data) -> Result;
}

/// A registered virtio driver; dropping it unregisters it (which removes its devices).
pub(crate) struct Registration<T: Driver> {
    driver: Pin<KBox<Opaque<bindings::virtio_driver>>>,
    _driver: PhantomData<T>,
}

// SAFETY: the driver structure is written before registration and then owned by the virtio
// core, which serializes probe and remove; `T::Data` lives in the devices, not here.
unsafe impl<T: Driver> Sync for Registration<T> {}
// SAFETY: as above.
unsafe impl<T: Driver> Send for Registration<T> {}

impl<T: Driver> Registration<T> {
    /// Registers driver `name` for the devices in `ids` (which ends with an all-zero entry, as
    /// in C), offering `features`.
    pub(crate) fn new(
        name: &'static CStr,
        ids: &'static [bindings::virtio_device_id],
        features: &'static [c_uint],
        module: &'static ThisModule,
    ) -> Result<Self> {
        if ids.last().map_or(true, |id| id.device != 0) {
            return Err(EINVAL);
        }
        // SAFETY: `virtio_driver` is plain data for which all zeroes means "no callbacks".
        let driver = KBox::pin(
            Opaque::<bindings::virtio_driver>::new(unsafe { core::mem::zeroed() }),
            GFP_KERNEL,
        )?;
        let drv = driver.get();
        // SAFETY: `drv` is ours until registered; the name and the tables are statics.
        unsafe {
            (*drv).driver.name = name.as_char_ptr();
            (*drv).id_table = ids.as_ptr();
            (*drv).feature_table = features.as_ptr();
            (*drv).feature_table_size = features.len() as c_uint;
            (*drv).validate = Some(Self::validate_callback);
            (*drv).probe = Some(Self::probe_callback);
            (*drv).remove = Some(Self::remove_callback);
            #[cfg(CONFIG_PM_SLEEP)]
            {
                (*drv).freeze = Some(Self::freeze_callback);
                (*drv).restore = Some(Self::restore_callback);
            }
            to_result(bindings::__register_virtio_driver(drv, module.as_ptr()))?;
        }
        Ok(Self {
            driver,
            _driver: PhantomData,
        })
    }

    /// Runs after feature negotiation and before `probe`: what it clears is written to the
    /// device again, before the virtqueues are set up.
    unsafe extern "C" fn validate_callback(vdev: *mut bindings::virtio_device) -> c_int {
        for bit in T::REFUSED_FEATURES {
            // SAFETY: the virtio core passes the device being probed, whose feature bits are
            // the driver's to change here (what C's `__virtio_clear_bit()` does).
            unsafe { (*vdev).features &= !(1u64 << bit) };
        }
        0
    }

    unsafe extern "C" fn probe_callback(vdev: *mut bindings::virtio_device) -> c_int {
        // SAFETY: the virtio core passes the device being probed.
        let dev = unsafe { Device::from_raw(vdev) };
        match T::probe(dev) {
            Ok(data) => {
                // SAFETY: as above; `remove_callback` takes the data back.
                unsafe { (*vdev).priv_ = KBox::into_raw(data).cast() };
                0
            }
            Err(e) => e.to_errno(),
        }
    }

    unsafe extern "C" fn remove_callback(vdev: *mut bindings::virtio_device) {
        // SAFETY: the virtio core passes a device this driver probed, valid during the call.
        let dev = unsafe { Device::from_raw(vdev) };
        // SAFETY: as above.
        let data = unsafe { (*vdev).priv_ }.cast::<T::Data>();
        if data.is_null() {
            return;
        }
        // SAFETY: as above; `data` came from `KBox::into_raw` in `probe_callback`.
        let data = unsafe {
            (*vdev).priv_ = ptr::null_mut();
            KBox::from_raw(data)
        };
        T::remove(dev, data);
    }

    /// The data `probe_callback` stored for `vdev`, if any.
    ///
    /// # Safety
    ///
    /// `vdev` is a device this driver probed, valid and bound for `'a`.
    #[cfg(CONFIG_PM_SLEEP)]
    unsafe fn data<'a>(vdev: *mut bindings::virtio_device) -> Option<&'a T::Data> {
        // SAFETY: the caller guarantees `vdev` is valid; `priv_` is null or what
        // `probe_callback` stored, which `remove_callback` alone takes back (the driver core
        // does not run remove concurrently with a PM callback of the same device).
        unsafe { (*vdev).priv_.cast::<T::Data>().as_ref() }
    }

    #[cfg(CONFIG_PM_SLEEP)]
    unsafe extern "C" fn freeze_callback(vdev: *mut bindings::virtio_device) -> c_int {
        // SAFETY: the virtio core passes a device this driver probed, valid during the call.
        let (dev, data) = unsafe { (Device::from_raw(vdev), Self::data(vdev)) };
        match data.map_or(Ok(()), |d| T::freeze(dev, d)) {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }

    #[cfg(CONFIG_PM_SLEEP)]
    unsafe extern "C" fn restore_callback(vdev: *mut bindings::virtio_device) -> c_int {
        // SAFETY: as in `freeze_callback`.
        let (dev, data) = unsafe { (Device::from_raw(vdev), Self::data(vdev)) };
        match data.map_or(Ok(()), |d| T::restore(dev, d)) {
            Ok(()) => 0,
            Err(e) => e.to_errno(),
        }
    }
}

impl<T: Driver> Drop for Registration<T> {
    fn drop(&mut self) {
        // SAFETY: registered in `new`; this calls `remove` for the bound devices.
        unsafe { bindings::unregister_virtio_driver(self.driver.get()) };
    }
}
