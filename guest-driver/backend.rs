// SPDX-License-Identifier: GPL-2.0

//! The backend side of the kernel's tmem interface (`include/linux/tmem.h`, added by
//! `vm-images/patches/linux/`), as safe Rust.
//!
//! A backend implements [`Swap`] and [`PageCache`], and [`Registration`] hands it to the tmem
//! core. The core calls C function pointers with a private pointer, raw pages and raw keys;
//! the trampolines here turn them into references that live for the call, so the
//! implementations need no `unsafe`.

use core::ffi::c_void;
use kernel::ffi::{c_int, c_uint, c_ulong};
use kernel::{bindings, page::PAGE_SIZE, prelude::*, sync::Arc, types::Opaque};

/// Object id of a page-cache file: inode number, inode generation, 0.
pub(crate) type Oid = [u64; 3];

/// A page the tmem core lends for one call: order-0 and locked, or otherwise owned by the
/// caller until the call returns.
#[repr(transparent)]
pub(crate) struct Page(Opaque<bindings::page>);

impl Page {
    /// # Safety
    ///
    /// `ptr` is an order-0 page the caller owns, and nobody else writes it, for `'a`.
    unsafe fn from_raw<'a>(ptr: *mut bindings::page) -> &'a Self {
        // SAFETY: `Page` is a transparent wrapper of `page`; the caller guarantees the rest.
        unsafe { &*ptr.cast::<Self>() }
    }

    pub(crate) fn as_raw(&self) -> *mut bindings::page {
        self.0.get()
    }

    /// Copies `src` (at most a page) to the start of the page.
    pub(crate) fn write(&self, src: &[u8]) {
        let len = src.len().min(PAGE_SIZE);
        // SAFETY: the page is the lender's for the borrow (type invariant); the mapping is
        // local to this block and covers the `len <= PAGE_SIZE` bytes written.
        unsafe {
            let dst = bindings::kmap_local_page(self.as_raw());
            core::ptr::copy_nonoverlapping(src.as_ptr(), dst.cast::<u8>(), len);
            bindings::kunmap_local(dst);
        }
    }
}

/// Swap operations ("frontswap" semantics), called for swap area `type_`. See
/// `struct tmem_backend_ops` in `include/linux/tmem.h` for the contract of each.
pub(crate) trait Swap {
    /// A swap area of `nr_pages` pages is in use. May sleep.
    fn swap_init(&self, type_: u32, nr_pages: usize) -> Result;
    /// Stores `page` at `offset`, replacing any older copy; on failure none is left. May sleep.
    fn swap_store(&self, type_: u32, offset: usize, page: &Page) -> Result;
    /// Fills `page` with the page at `offset`; `ENOENT` if not held. With `exclusive` (the
    /// swap cache takes the page over), a success also drops the backend's copy. May sleep.
    fn swap_load(&self, type_: u32, offset: usize, page: &Page, exclusive: bool) -> Result;
    /// Forgets the page at `offset`. Must not sleep (the swap_info lock is held).
    fn swap_invalidate_page(&self, type_: u32, offset: usize);
    /// The area is disabled: releases everything stored for it. May sleep.
    fn swap_invalidate_area(&self, type_: u32);
    /// Whether every page the backend accepts goes to the swap device too (write-through):
    /// read once, at registration.
    fn swap_writethrough(&self) -> bool;
}

/// Page-cache operations ("cleancache" semantics), called for filesystem slot `fs`. See
/// `struct tmem_backend_ops` in `include/linux/tmem.h` for the contract of each.
pub(crate) trait PageCache {
    /// The filesystem is mounted: creates its pool, shared under `shared` if given. May sleep.
    fn cache_init(&self, fs: u32, shared: Option<&[u8; 16]>) -> Result;
    /// Stores a clean page under (`oid`, `index`), replacing; on failure none is left. Must not
    /// sleep.
    fn cache_put(&self, fs: u32, oid: &Oid, index: usize, page: &Page) -> Result;
    /// Fills `page` with the page under the key; any error is a miss. Must not sleep.
    fn cache_get(&self, fs: u32, oid: &Oid, index: usize, page: &Page) -> Result;
    /// Forgets one page. Must not sleep.
    fn cache_invalidate_page(&self, fs: u32, oid: &Oid, index: usize);
    /// Forgets every page of `oid`. Must not sleep.
    fn cache_invalidate_inode(&self, fs: u32, oid: &Oid);
    /// Forgets every page of the filesystem and keeps its pool usable. May sleep.
    fn cache_invalidate_fs(&self, fs: u32);
    /// The filesystem is unmounted: releases its pool. May sleep.
    fn cache_exit(&self, fs: u32);
}

/// `T` registered as the tmem backend; dropping it unregisters it.
pub(crate) struct Registration<T: Swap + PageCache> {
    backend: Pin<KBox<Opaque<bindings::tmem_backend>>>,
    /// What `backend.priv_` points to: it outlives the registration.
    _data: Arc<T>,
}

impl<T: Swap + PageCache + Send + Sync> Registration<T> {
    const OPS: bindings::tmem_backend_ops = bindings::tmem_backend_ops {
        swap_init: Some(Self::swap_init),
        swap_store: Some(Self::swap_store),
        swap_load: Some(Self::swap_load),
        swap_invalidate_page: Some(Self::swap_invalidate_page),
        swap_invalidate_area: Some(Self::swap_invalidate_area),
        cache_init: Some(Self::cache_init),
        cache_put: Some(Self::cache_put),
        cache_get: Some(Self::cache_get),
        cache_invalidate_page: Some(Self::cache_invalidate_page),
        cache_invalidate_inode: Some(Self::cache_invalidate_inode),
        cache_invalidate_fs: Some(Self::cache_invalidate_fs),
        cache_exit: Some(Self::cache_exit),
    };

    /// Makes `data` the target of the tmem hooks. The core replays the swap areas and
    /// filesystems already in use (`swap_init`, `cache_init`) before this returns. Fails with
    /// `EBUSY` when another backend is registered.
    pub(crate) fn register(data: Arc<T>, owner: &'static ThisModule) -> Result<Self> {
        let backend = KBox::pin(
            Opaque::new(bindings::tmem_backend {
                ops: &Self::OPS,
                priv_: (&*data as *const T).cast_mut().cast(),
                owner: owner.as_ptr(),
                swap_writethrough: data.swap_writethrough(),
            }),
            GFP_KERNEL,
        )?;
        // SAFETY: the backend structure and what its `priv_` points to live until `drop`
        // unregisters it.
        let err = unsafe { bindings::tmem_register_backend(backend.get()) };
        if err != 0 {
            return Err(Error::from_errno(err));
        }
        Ok(Self {
            backend,
            _data: data,
        })
    }

    /// # Safety
    ///
    /// `priv_` is the `priv_` of a registered backend, and the call is one the core makes
    /// while the backend is registered (unregistering waits for the calls in flight).
    unsafe fn data<'a>(priv_: *mut c_void) -> &'a T {
        // SAFETY: `priv_` points to the `T` the registration keeps alive.
        unsafe { &*priv_.cast::<T>() }
    }

    unsafe extern "C" fn swap_init(priv_: *mut c_void, type_: c_uint, nr_pages: c_ulong) -> c_int {
        // SAFETY: called by the tmem core for this backend.
        errno(unsafe { Self::data(priv_) }.swap_init(type_, nr_pages))
    }

    unsafe extern "C" fn swap_store(
        priv_: *mut c_void,
        type_: c_uint,
        offset: c_ulong,
        page: *mut bindings::page,
    ) -> c_int {
        // SAFETY: called by the tmem core for this backend, with the locked swap-cache page
        // being written out.
        let (data, page) = unsafe { (Self::data(priv_), Page::from_raw(page)) };
        errno(data.swap_store(type_, offset, page))
    }

    unsafe extern "C" fn swap_load(
        priv_: *mut c_void,
        type_: c_uint,
        offset: c_ulong,
        page: *mut bindings::page,
        exclusive: bool,
    ) -> c_int {
        // SAFETY: called by the tmem core for this backend, with the locked page being read.
        let (data, page) = unsafe { (Self::data(priv_), Page::from_raw(page)) };
        errno(data.swap_load(type_, offset, page, exclusive))
    }

    unsafe extern "C" fn swap_invalidate_page(priv_: *mut c_void, type_: c_uint, offset: c_ulong) {
        // SAFETY: called by the tmem core for this backend.
        unsafe { Self::data(priv_) }.swap_invalidate_page(type_, offset)
    }

    unsafe extern "C" fn swap_invalidate_area(priv_: *mut c_void, type_: c_uint) {
        // SAFETY: called by the tmem core for this backend.
        unsafe { Self::data(priv_) }.swap_invalidate_area(type_)
    }

    unsafe extern "C" fn cache_init(
        priv_: *mut c_void,
        fs: c_uint,
        shared: *const bindings::uuid_t,
    ) -> c_int {
        // SAFETY: called by the tmem core for this backend, with NULL or a UUID that lives for
        // the call.
        let (data, shared) = unsafe { (Self::data(priv_), shared.as_ref()) };
        errno(data.cache_init(fs, shared.map(|u| &u.b)))
    }

    unsafe extern "C" fn cache_put(
        priv_: *mut c_void,
        fs: c_uint,
        oid: *const bindings::tmem_oid,
        index: c_ulong,
        page: *mut bindings::page,
    ) -> c_int {
        // SAFETY: called by the tmem core for this backend, with a key that lives for the call
        // and the locked folio's page.
        let (data, oid, page) = unsafe { (Self::data(priv_), &(*oid).oid, Page::from_raw(page)) };
        errno(data.cache_put(fs, oid, index, page))
    }

    unsafe extern "C" fn cache_get(
        priv_: *mut c_void,
        fs: c_uint,
        oid: *const bindings::tmem_oid,
        index: c_ulong,
        page: *mut bindings::page,
    ) -> c_int {
        // SAFETY: as in `cache_put`.
        let (data, oid, page) = unsafe { (Self::data(priv_), &(*oid).oid, Page::from_raw(page)) };
        errno(data.cache_get(fs, oid, index, page))
    }

    unsafe extern "C" fn cache_invalidate_page(
        priv_: *mut c_void,
        fs: c_uint,
        oid: *const bindings::tmem_oid,
        index: c_ulong,
    ) {
        // SAFETY: called by the tmem core for this backend, with a key that lives for the call.
        let (data, oid) = unsafe { (Self::data(priv_), &(*oid).oid) };
        data.cache_invalidate_page(fs, oid, index)
    }

    unsafe extern "C" fn cache_invalidate_inode(
        priv_: *mut c_void,
        fs: c_uint,
        oid: *const bindings::tmem_oid,
    ) {
        // SAFETY: as in `cache_invalidate_page`.
        let (data, oid) = unsafe { (Self::data(priv_), &(*oid).oid) };
        data.cache_invalidate_inode(fs, oid)
    }

    unsafe extern "C" fn cache_invalidate_fs(priv_: *mut c_void, fs: c_uint) {
        // SAFETY: called by the tmem core for this backend.
        unsafe { Self::data(priv_) }.cache_invalidate_fs(fs)
    }

    unsafe extern "C" fn cache_exit(priv_: *mut c_void, fs: c_uint) {
        // SAFETY: called by the tmem core for this backend.
        unsafe { Self::data(priv_) }.cache_exit(fs)
    }
}

impl<T: Swap + PageCache> Drop for Registration<T> {
    fn drop(&mut self) {
        // SAFETY: registered in `register`; this waits for the calls in flight, after which
        // the core no longer uses the structure or `priv_`.
        unsafe { bindings::tmem_unregister_backend(self.backend.get()) };
    }
}

fn errno(r: Result) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}
