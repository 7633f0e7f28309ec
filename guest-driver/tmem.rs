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
//! Requests are synchronous and polled: a request queue carries one request at a time under its
//! spinlock, and the driver spins on the used ring until the device answers. The tmem hooks need
//! a synchronous answer anyway (a swap-in waits for its page); polling saves an interrupt and a
//! wakeup per page, and lets one path serve the hooks that run under spinlocks, where sleeping
//! is not allowed. Buffers are allocated at probe, so the swap-out and reclaim paths, which run
//! under memory pressure, allocate nothing. Invalidations are queued and sent in `BATCH`
//! requests; every put and get sends the queued ones first, so the device sees them in order.
//!
//! A page read from the host lands in a per-queue bounce buffer and is copied into its target
//! by the CPU. The host could write it in place, but an emulator that caches translated guest
//! code (QEMU's TCG) does not see writes made by a vhost-user backend into guest memory, so a
//! code page filled that way (a swapped-out shmem or executable page) would run stale code.
//! Seen in this project's VM tests; the copy costs one 4 KiB memcpy per hit.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use kernel::ffi::{c_int, c_uint, c_ulong};
use kernel::{bindings, c_str, error::to_result, new_spinlock, prelude::*, sync::SpinLock};

// The wire format shared with the host daemon, included by path (Kbuild builds one crate).
// The driver uses the guest side of it only, and its `pub` items are for the host crates.
#[allow(dead_code, unreachable_pub)]
#[path = "../shared-proto/src/wire.rs"]
mod proto;

use proto::{BatchEntry, Config, CreatePool, Op, ReqHeader, RespHeader, Status};

module! {
    type: TmemModule,
    name: "tmem",
    author: "vhost-tmem developers",
    description: "virtio-tmem: swap and page-cache pages kept by the host (transcendent memory)",
    license: "GPL",
}

/// `VIRTIO_DEV_ANY_ID`: any vendor.
const ANY_VENDOR: u32 = 0xffff_ffff;

/// Swap types are below `MAX_SWAPFILES`, which is at most 32 (5 bits in a swap entry).
const SWAP_TYPES: usize = 32;
/// Filesystem slots of the tmem core.
const FS_SLOTS: usize = bindings::TMEM_MAX_FS as usize;
const NO_POOL: u32 = u32::MAX;
const MAX_BATCH: usize = proto::MAX_BATCH as usize;
/// Largest readable payload after the header: a full batch.
const OUT_BUF: usize = ReqHeader::SIZE + MAX_BATCH * BatchEntry::SIZE;
/// Largest writable part after the page: the response and one status byte per batch entry.
const RESP_BUF: usize = RespHeader::SIZE + MAX_BATCH;

static ID_TABLE: [bindings::virtio_device_id; 2] = [
    bindings::virtio_device_id {
        device: proto::VIRTIO_ID_TMEM,
        vendor: ANY_VENDOR,
    },
    bindings::virtio_device_id {
        device: 0,
        vendor: 0,
    },
];

static FEATURES: [c_uint; 2] = [proto::feature::MQ, proto::feature::BATCH];

static OPS: bindings::tmem_backend_ops = bindings::tmem_backend_ops {
    swap_init: Some(swap_init),
    swap_store: Some(swap_store),
    swap_load: Some(swap_load),
    swap_invalidate_page: Some(swap_invalidate_page),
    swap_invalidate_area: Some(swap_invalidate_area),
    cache_init: Some(cache_init),
    cache_put: Some(cache_put),
    cache_get: Some(cache_get),
    cache_invalidate_page: Some(cache_invalidate_page),
    cache_invalidate_inode: Some(cache_invalidate_inode),
    cache_invalidate_fs: Some(cache_invalidate_fs),
    cache_exit: Some(cache_exit),
};

/// Counters shown in debugfs (`/sys/kernel/debug/tmem/`): the swap side, the page-cache side
/// (`cache_*`), and what both share.
#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    puts_refused: AtomicU64,
    gets: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    cache_puts: AtomicU64,
    cache_puts_refused: AtomicU64,
    cache_gets: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_invalidations: AtomicU64,
    cache_pools: AtomicU64,
    cache_shared_pools: AtomicU64,
    failures: AtomicU64,
    flushes: AtomicU64,
    batches: AtomicU64,
    pools: AtomicU64,
}

/// One virtqueue and the buffers of its one request in flight.
struct Vq {
    vq: *mut bindings::virtqueue,
    out: KVec<u8>,
    resp: KVec<u8>,
    /// Where the device writes a page the driver reads (see the module documentation).
    bounce: KVec<u8>,
}

// SAFETY: the virtqueue is used only under the lock that owns this value.
unsafe impl Send for Vq {}

/// Invalidations waiting to be sent in one `BATCH` request.
struct Pending {
    /// The first `len` entries are valid.
    entries: KVec<BatchEntry>,
    len: usize,
    buf: KVec<u8>,
}

/// The page carried by a request, if any.
enum Data {
    NoPage,
    Out(*mut bindings::page),
    In(*mut bindings::page),
}

struct TmemDev {
    /// Index 0 is the control queue, request queues follow.
    queues: KVec<Pin<KBox<SpinLock<Vq>>>>,
    pools: [AtomicU32; SWAP_TYPES],
    /// Host pool of each filesystem slot, and whether it is a shared pool.
    fs_pools: [AtomicU32; FS_SLOTS],
    fs_shared: [AtomicBool; FS_SLOTS],
    pending: Pin<KBox<SpinLock<Pending>>>,
    /// `pending.len`, readable without the lock: a store checks it on every page.
    pending_len: AtomicUsize,
    batch: bool,
    stats: Counters,
    backend: UnsafeCell<bindings::tmem_backend>,
    debugfs: *mut bindings::dentry,
}

// SAFETY: shared state is atomics or behind spinlocks; the raw pointers are set at probe and
// stay valid until remove, after the backend is unregistered.
unsafe impl Sync for TmemDev {}
// SAFETY: as above.
unsafe impl Send for TmemDev {}

/// Logs the 1st, 2nd, 4th, 8th... occurrence only: failures are counted, not flooded.
fn rare(count: u64) -> bool {
    count.is_power_of_two()
}

fn status_name(status: u32) -> &'static str {
    match Status::from_u32(status) {
        Some(Status::Ok) => "ok",
        Some(Status::Miss) => "miss",
        Some(Status::NoSpace) => "no space",
        Some(Status::Refused) => "refused",
        Some(Status::Invalid) => "invalid",
        Some(Status::BadPool) => "bad pool",
        Some(Status::Unsupported) => "unsupported",
        Some(Status::Denied) => "denied",
        Some(Status::TooManyPools) => "too many pools",
        Some(Status::IoError) => "host I/O error",
        None => "unknown status",
    }
}

impl TmemDev {
    fn queue_for_cpu(&self) -> &SpinLock<Vq> {
        let n = self.queues.len() - 1;
        // SAFETY: reading the CPU number has no precondition; a stale value only picks
        // another queue.
        let cpu = unsafe { bindings::raw_smp_processor_id() } as usize;
        &self.queues[1 + cpu % n]
    }

    /// Sends one request and spins until the device answers it. `payload` follows the header
    /// in the readable part, `statuses` status bytes follow the response header (BATCH), and
    /// the number of entries whose status is not OK is returned with the response.
    fn call(
        &self,
        q: &SpinLock<Vq>,
        hdr: &ReqHeader,
        payload: &[u8],
        data: Data,
        statuses: usize,
    ) -> Result<(RespHeader, usize)> {
        let out_len = ReqHeader::SIZE + payload.len();
        let resp_len = RespHeader::SIZE + statuses;
        let mut guard = q.lock();
        let vq = &mut *guard;
        if out_len > vq.out.len() || resp_len > vq.resp.len() {
            return Err(EINVAL);
        }
        vq.out[..ReqHeader::SIZE].copy_from_slice(&hdr.encode());
        vq.out[ReqHeader::SIZE..out_len].copy_from_slice(payload);
        // A device that answers without writing the response leaves this unknown status.
        let unknown = RespHeader {
            status: u32::MAX,
            flags: 0,
            value: 0,
        };
        vq.resp[..RespHeader::SIZE].copy_from_slice(&unknown.encode());

        // SAFETY: `scatterlist` is plain data for which all zeroes is a valid (empty) value.
        let mut sg_out: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut sg_page: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: as above.
        let mut sg_resp: bindings::scatterlist = unsafe { core::mem::zeroed() };
        // SAFETY: the buffers are kmalloc'ed (linear map), at least `out_len` and `resp_len`
        // bytes long, and are not touched by the CPU until the device returns them below.
        unsafe {
            bindings::sg_init_one(&mut sg_out, vq.out.as_ptr().cast(), out_len as c_uint);
            bindings::sg_init_one(
                &mut sg_resp,
                vq.resp.as_mut_ptr().cast(),
                resp_len as c_uint,
            );
        }
        let (page, nout, nin) = match data {
            Data::NoPage => (ptr::null_mut(), 1, 1),
            Data::Out(p) => (p, 2, 1),
            Data::In(p) => (p, 1, 2),
        };
        let mut sgs: [*mut bindings::scatterlist; 3] = [&mut sg_out, &mut sg_resp, ptr::null_mut()];
        if nout == 2 {
            // SAFETY: `page` is a locked order-0 page the caller owns for the whole call.
            unsafe {
                bindings::sg_init_table(&mut sg_page, 1);
                bindings::sg_set_page(&mut sg_page, page, proto::PAGE_SIZE as c_uint, 0);
            }
            sgs = [&mut sg_out, &mut sg_page, &mut sg_resp];
        } else if nin == 2 {
            // SAFETY: the bounce buffer is kmalloc'ed and `PAGE_SIZE` bytes long.
            unsafe {
                bindings::sg_init_one(
                    &mut sg_page,
                    vq.bounce.as_mut_ptr().cast(),
                    proto::PAGE_SIZE as c_uint,
                )
            };
            sgs = [&mut sg_out, &mut sg_page, &mut sg_resp];
        }
        // SAFETY: the scatterlists describe live buffers as required above; the token is any
        // non-null pointer, and only one request is in flight on this queue (we hold its lock).
        to_result(unsafe {
            bindings::virtqueue_add_sgs(
                vq.vq,
                sgs.as_mut_ptr(),
                nout,
                nin,
                vq.out.as_mut_ptr().cast::<c_void>(),
                bindings::GFP_ATOMIC,
            )
        })?;
        // SAFETY: the virtqueue is live and we hold its lock.
        unsafe { bindings::virtqueue_kick(vq.vq) };
        loop {
            let mut len: c_uint = 0;
            // SAFETY: as above.
            let token = unsafe { bindings::virtqueue_get_buf(vq.vq, &mut len) };
            if !token.is_null() {
                break;
            }
            // SAFETY: as above.
            if unsafe { bindings::virtqueue_is_broken(vq.vq) } {
                return Err(EIO);
            }
            core::hint::spin_loop();
        }
        let mut b = [0u8; RespHeader::SIZE];
        b.copy_from_slice(&vq.resp[..RespHeader::SIZE]);
        let resp = RespHeader::decode(&b);
        if nin == 2 && resp.status == Status::Ok as u32 {
            // SAFETY: `page` is the caller's locked order-0 page; the mapping is local to this
            // block and the bounce buffer holds `PAGE_SIZE` bytes the device wrote.
            unsafe {
                let dst = bindings::kmap_local_page(page);
                ptr::copy_nonoverlapping(vq.bounce.as_ptr(), dst.cast::<u8>(), proto::PAGE_SIZE);
                bindings::kunmap_local(dst);
            }
        }
        let failed = vq.resp[RespHeader::SIZE..resp_len]
            .iter()
            .filter(|s| **s != Status::Ok as u8 && **s != Status::Miss as u8)
            .count();
        Ok((resp, failed))
    }

    /// A request on the control queue that must succeed; returns the response's value.
    fn control(&self, hdr: &ReqHeader, payload: &[u8]) -> Result<u64> {
        let (resp, _) = self.call(&self.queues[0], hdr, payload, Data::NoPage, 0)?;
        match Status::from_u32(resp.status) {
            Some(Status::Ok) => Ok(resp.value),
            Some(Status::TooManyPools) => Err(ENOSPC),
            _ => {
                pr_err!(
                    "{:?} failed: {}\n",
                    Op::from_u32(hdr.op),
                    status_name(resp.status)
                );
                Err(EIO)
            }
        }
    }

    fn pool(&self, type_: c_uint) -> Option<u32> {
        let pool = self.pools.get(type_ as usize)?.load(Ordering::Acquire);
        (pool != NO_POOL).then_some(pool)
    }

    fn swap_init(&self, type_: c_uint, nr_pages: c_ulong) -> Result {
        let slot = self.pools.get(type_ as usize).ok_or(EINVAL)?;
        if slot.load(Ordering::Acquire) != NO_POOL {
            // A swapon without swapoff cannot happen: refuse rather than share a pool.
            return Err(EBUSY);
        }
        let hdr = ReqHeader {
            op: Op::CreatePool as u32,
            flags: proto::req_flags::POOL_PERSISTENT,
            ..Default::default()
        };
        let create = CreatePool {
            uuid: [0; 16],
            page_size: proto::PAGE_SIZE as u32,
            reserved: 0,
        };
        let id = self.control(&hdr, &create.encode())?;
        let id = u32::try_from(id).map_err(|_| EIO)?;
        slot.store(id, Ordering::Release);
        self.stats.pools.fetch_add(1, Ordering::Relaxed);
        pr_info!(
            "swap area {}: host pool {} ({} pages)\n",
            type_,
            id,
            nr_pages
        );
        Ok(())
    }

    /// Sends the queued invalidations: one of them may name the key a put or get is for.
    fn drain_pending(&self) {
        if self.pending_len.load(Ordering::Acquire) != 0 {
            self.send_pending(&mut self.pending.lock());
        }
    }

    fn swap_store(&self, type_: c_uint, offset: c_ulong, page: *mut bindings::page) -> Result {
        let pool = self.pool(type_).ok_or(ENODEV)?;
        // A queued invalidation of this offset must reach the device before the new copy.
        self.drain_pending();
        let hdr = ReqHeader {
            op: Op::Put as u32,
            pool_id: pool,
            index: offset as u64,
            ..Default::default()
        };
        let s = &self.stats;
        self.put(&hdr, page, [&s.puts, &s.puts_refused], "put")
    }

    fn swap_load(&self, type_: c_uint, offset: c_ulong, page: *mut bindings::page) -> Result {
        let pool = self.pool(type_).ok_or(ENODEV)?;
        let hdr = ReqHeader {
            op: Op::Get as u32,
            pool_id: pool,
            index: offset as u64,
            ..Default::default()
        };
        let s = &self.stats;
        self.get(&hdr, page, [&s.gets, &s.hits, &s.misses], "get")
    }

    /// Sends a PUT of `page`, counted in `counters` (puts, refused puts). NO_SPACE and REFUSED
    /// return ENOSPC; other failures are counted and logged as `what`.
    fn put(
        &self,
        hdr: &ReqHeader,
        page: *mut bindings::page,
        counters: [&AtomicU64; 2],
        what: &str,
    ) -> Result {
        counters[0].fetch_add(1, Ordering::Relaxed);
        match self.call(self.queue_for_cpu(), hdr, &[], Data::Out(page), 0) {
            Ok((resp, _)) => match Status::from_u32(resp.status) {
                Some(Status::Ok) => Ok(()),
                Some(Status::NoSpace | Status::Refused) => {
                    counters[1].fetch_add(1, Ordering::Relaxed);
                    Err(ENOSPC)
                }
                _ => Err(self.failure(what, resp.status)),
            },
            Err(e) => Err(self.transport_failure(what, e)),
        }
    }

    /// Sends a GET into `page`, counted in `counters` (gets, hits, misses). A miss returns
    /// ENOENT; other failures are counted and logged as `what`.
    fn get(
        &self,
        hdr: &ReqHeader,
        page: *mut bindings::page,
        counters: [&AtomicU64; 3],
        what: &str,
    ) -> Result {
        counters[0].fetch_add(1, Ordering::Relaxed);
        match self.call(self.queue_for_cpu(), hdr, &[], Data::In(page), 0) {
            Ok((resp, _)) => match Status::from_u32(resp.status) {
                Some(Status::Ok) => {
                    counters[1].fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Some(Status::Miss) => {
                    counters[2].fetch_add(1, Ordering::Relaxed);
                    Err(ENOENT)
                }
                _ => Err(self.failure(what, resp.status)),
            },
            Err(e) => Err(self.transport_failure(what, e)),
        }
    }

    /// Runs with spinlocks held: queues the invalidation, or sends it at once without BATCH.
    fn swap_invalidate_page(&self, type_: c_uint, offset: c_ulong) {
        let Some(pool) = self.pool(type_) else {
            return;
        };
        self.invalidate(BatchEntry {
            op: Op::FlushPage as u32,
            pool_id: pool,
            oid: [0; 3],
            index: offset as u64,
        });
    }

    /// Queues a FLUSH_PAGE or FLUSH_OBJECT, or sends it at once without BATCH. Never sleeps.
    fn invalidate(&self, entry: BatchEntry) {
        if !self.batch {
            let hdr = ReqHeader {
                op: entry.op,
                pool_id: entry.pool_id,
                oid: entry.oid,
                index: entry.index,
                ..Default::default()
            };
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.call(self.queue_for_cpu(), &hdr, &[], Data::NoPage, 0) {
                self.transport_failure("flush", e);
            }
            return;
        }
        let mut pending = self.pending.lock();
        if pending.len == MAX_BATCH {
            self.send_pending(&mut pending);
        }
        let at = pending.len;
        pending.entries[at] = entry;
        pending.len = at + 1;
        self.pending_len.store(pending.len, Ordering::Release);
    }

    /// Sends the queued invalidations in one BATCH request. A MISS (nothing to drop) is fine;
    /// other failures are counted: the core never loads an invalidated swap offset, and a
    /// page-cache pool whose flush failed (BAD_POOL after a host restart) holds nothing.
    fn send_pending(&self, pending: &mut Pending) {
        let n = pending.len;
        if n == 0 {
            return;
        }
        for (i, entry) in pending.entries[..n].iter().enumerate() {
            let at = i * BatchEntry::SIZE;
            pending.buf[at..at + BatchEntry::SIZE].copy_from_slice(&entry.encode());
        }
        pending.len = 0;
        self.pending_len.store(0, Ordering::Release);
        let hdr = ReqHeader {
            op: Op::Batch as u32,
            count: n as u32,
            ..Default::default()
        };
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.flushes.fetch_add(n as u64, Ordering::Relaxed);
        let payload = &pending.buf[..n * BatchEntry::SIZE];
        match self.call(self.queue_for_cpu(), &hdr, payload, Data::NoPage, n) {
            Ok((resp, 0)) if resp.status == Status::Ok as u32 => {}
            Ok((resp, failed)) => {
                let count = self.stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if rare(count) {
                    pr_warn!(
                        "batch of {} flushes: {}, {} entries failed ({} failures)\n",
                        n,
                        status_name(resp.status),
                        failed,
                        count
                    );
                }
            }
            Err(e) => {
                self.transport_failure("batch", e);
            }
        }
    }

    fn swap_invalidate_area(&self, type_: c_uint) {
        let Some(slot) = self.pools.get(type_ as usize) else {
            return;
        };
        self.send_pending(&mut self.pending.lock());
        let pool = slot.swap(NO_POOL, Ordering::AcqRel);
        if pool == NO_POOL {
            return;
        }
        self.stats.pools.fetch_sub(1, Ordering::Relaxed);
        self.destroy_pool(pool, "swap");
        pr_info!("swap area {}: host pool {} destroyed\n", type_, pool);
    }

    fn fs_pool(&self, fs: c_uint) -> Option<(u32, bool)> {
        let fs = fs as usize;
        let pool = self.fs_pools.get(fs)?.load(Ordering::Acquire);
        (pool != NO_POOL).then(|| (pool, self.fs_shared[fs].load(Ordering::Relaxed)))
    }

    fn create_cache_pool(&self, shared: Option<&[u8; 16]>) -> Result<u32> {
        let hdr = ReqHeader {
            op: Op::CreatePool as u32,
            flags: if shared.is_some() {
                proto::req_flags::POOL_SHARED
            } else {
                0
            },
            ..Default::default()
        };
        let create = CreatePool {
            uuid: shared.copied().unwrap_or([0; 16]),
            page_size: proto::PAGE_SIZE as u32,
            reserved: 0,
        };
        let (resp, _) = self.call(&self.queues[0], &hdr, &create.encode(), Data::NoPage, 0)?;
        match Status::from_u32(resp.status) {
            Some(Status::Ok) => u32::try_from(resp.value).map_err(|_| EIO),
            Some(Status::Denied) => Err(EACCES),
            Some(Status::TooManyPools) => Err(ENOSPC),
            _ => {
                pr_err!(
                    "creating a page-cache pool failed: {}\n",
                    status_name(resp.status)
                );
                Err(EIO)
            }
        }
    }

    fn cache_init(&self, fs: c_uint, shared: *const bindings::uuid_t) -> Result {
        let slot = self.fs_pools.get(fs as usize).ok_or(EINVAL)?;
        if slot.load(Ordering::Acquire) != NO_POOL {
            return Err(EBUSY);
        }
        // SAFETY: the core passes NULL or a UUID that lives for the call.
        let uuid = unsafe { shared.as_ref() }.map(|u| u.b);
        let (pool, is_shared) = match uuid {
            Some(uuid) => match self.create_cache_pool(Some(&uuid)) {
                Ok(pool) => (pool, true),
                Err(EACCES) => {
                    // Sharing needs the host's authorization for this UUID.
                    pr_info!(
                        "filesystem {}: shared pool not authorized, using a private one\n",
                        fs
                    );
                    (self.create_cache_pool(None)?, false)
                }
                Err(e) => return Err(e),
            },
            None => (self.create_cache_pool(None)?, false),
        };
        self.fs_shared[fs as usize].store(is_shared, Ordering::Relaxed);
        slot.store(pool, Ordering::Release);
        self.stats.cache_pools.fetch_add(1, Ordering::Relaxed);
        if is_shared {
            self.stats
                .cache_shared_pools
                .fetch_add(1, Ordering::Relaxed);
        }
        pr_info!(
            "filesystem {}: host pool {} ({})\n",
            fs,
            pool,
            if is_shared { "shared" } else { "private" }
        );
        Ok(())
    }

    fn cache_put(
        &self,
        fs: c_uint,
        oid: &bindings::tmem_oid,
        index: c_ulong,
        page: *mut bindings::page,
    ) -> Result {
        let (pool, _) = self.fs_pool(fs).ok_or(ENODEV)?;
        self.drain_pending();
        let hdr = ReqHeader {
            op: Op::Put as u32,
            pool_id: pool,
            oid: oid.oid,
            index: index as u64,
            ..Default::default()
        };
        let s = &self.stats;
        self.put(
            &hdr,
            page,
            [&s.cache_puts, &s.cache_puts_refused],
            "page-cache put",
        )
    }

    fn cache_get(
        &self,
        fs: c_uint,
        oid: &bindings::tmem_oid,
        index: c_ulong,
        page: *mut bindings::page,
    ) -> Result {
        let (pool, shared) = self.fs_pool(fs).ok_or(ENODEV)?;
        self.drain_pending();
        let hdr = ReqHeader {
            op: Op::Get as u32,
            // A private pool's page moves back into this guest's cache; a shared one stays
            // for the other members.
            flags: if shared {
                0
            } else {
                proto::req_flags::GET_EXCLUSIVE
            },
            pool_id: pool,
            oid: oid.oid,
            index: index as u64,
            ..Default::default()
        };
        let s = &self.stats;
        let counters = [&s.cache_gets, &s.cache_hits, &s.cache_misses];
        self.get(&hdr, page, counters, "page-cache get")
    }

    fn cache_invalidate(&self, fs: c_uint, op: Op, oid: &bindings::tmem_oid, index: u64) {
        let Some((pool, _)) = self.fs_pool(fs) else {
            return;
        };
        self.stats
            .cache_invalidations
            .fetch_add(1, Ordering::Relaxed);
        self.invalidate(BatchEntry {
            op: op as u32,
            pool_id: pool,
            oid: oid.oid,
            index,
        });
    }

    fn destroy_pool(&self, pool: u32, what: &str) {
        let hdr = ReqHeader {
            op: Op::DestroyPool as u32,
            pool_id: pool,
            ..Default::default()
        };
        if let Err(e) = self.control(&hdr, &[]) {
            pr_err!("{}: destroying host pool {} failed: {:?}\n", what, pool, e);
        }
    }

    /// Releases a filesystem's pool (unmount, or the device going away).
    fn cache_exit(&self, fs: c_uint) {
        let Some(slot) = self.fs_pools.get(fs as usize) else {
            return;
        };
        self.send_pending(&mut self.pending.lock());
        let pool = slot.swap(NO_POOL, Ordering::AcqRel);
        if pool == NO_POOL {
            return;
        }
        self.stats.cache_pools.fetch_sub(1, Ordering::Relaxed);
        if self.fs_shared[fs as usize].swap(false, Ordering::Relaxed) {
            self.stats
                .cache_shared_pools
                .fetch_sub(1, Ordering::Relaxed);
        }
        self.destroy_pool(pool, "page cache");
        pr_info!("filesystem {}: host pool {} released\n", fs, pool);
    }

    /// Drops every page of a private filesystem pool: a new, empty pool replaces it.
    fn cache_invalidate_fs(&self, fs: c_uint) {
        let Some(slot) = self.fs_pools.get(fs as usize) else {
            return;
        };
        self.send_pending(&mut self.pending.lock());
        let old = slot.swap(NO_POOL, Ordering::AcqRel);
        if old == NO_POOL {
            return;
        }
        self.destroy_pool(old, "page cache");
        match self.create_cache_pool(None) {
            Ok(pool) => slot.store(pool, Ordering::Release),
            Err(e) => {
                self.stats.cache_pools.fetch_sub(1, Ordering::Relaxed);
                pr_err!(
                    "filesystem {}: new pool failed ({:?}), tmem off for it\n",
                    fs,
                    e
                );
            }
        }
    }

    fn failure(&self, what: &str, status: u32) -> Error {
        let count = self.stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if rare(count) {
            pr_err!(
                "{} failed: {} ({} failures)\n",
                what,
                status_name(status),
                count
            );
        }
        EIO
    }

    fn transport_failure(&self, what: &str, e: Error) -> Error {
        let count = self.stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if rare(count) {
            pr_err!("{}: virtqueue error {:?} ({} failures)\n", what, e, count);
        }
        EIO
    }

    fn create_debugfs(&mut self) {
        // SAFETY: the name is a NUL-terminated string; a NULL parent is the debugfs root.
        let dir =
            unsafe { bindings::debugfs_create_dir(c_str!("tmem").as_char_ptr(), ptr::null_mut()) };
        self.debugfs = dir;
        let s = &self.stats;
        let files: [(&CStr, &AtomicU64); 17] = [
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
            (c_str!("failures"), &s.failures),
            (c_str!("flushes"), &s.flushes),
            (c_str!("batches"), &s.batches),
            (c_str!("pools"), &s.pools),
        ];
        for (name, counter) in files {
            // SAFETY: debugfs accepts an error pointer as parent (it then does nothing); the
            // counter lives in the device, which outlives the directory (removed first).
            unsafe {
                bindings::debugfs_create_u64(name.as_char_ptr(), 0o444, dir, counter.as_ptr())
            };
        }
    }

    fn new(vdev: *mut bindings::virtio_device) -> Result<KBox<TmemDev>> {
        // SAFETY: `vdev` is the device being probed.
        let has = |bit: u32| unsafe { bindings::virtio_has_feature(vdev, bit) };
        let mut raw = [0u8; Config::SIZE];
        // SAFETY: the buffer is `Config::SIZE` bytes, the size of the device's config space.
        unsafe { bindings::virtio_cread_bytes(vdev, 0, raw.as_mut_ptr().cast(), raw.len()) };
        let config = Config::decode(&raw);
        if u32::from(config.page_shift) != proto::PAGE_SHIFT {
            pr_err!("device page shift {} is not supported\n", config.page_shift);
            return Err(EINVAL);
        }
        let nreq = if has(proto::feature::MQ) {
            usize::from(config.num_request_queues).clamp(1, usize::from(proto::MAX_REQUEST_QUEUES))
        } else {
            1
        };
        let nvqs = 1 + nreq;

        let mut infos = KVec::with_capacity(nvqs, GFP_KERNEL)?;
        for i in 0..nvqs {
            let name = if i == 0 {
                c_str!("tmem-control")
            } else {
                c_str!("tmem-request")
            };
            infos.push(
                bindings::virtqueue_info {
                    name: name.as_char_ptr(),
                    // No callback: the queues are polled, so the device sends no interrupts.
                    callback: None,
                    ctx: false,
                },
                GFP_KERNEL,
            )?;
        }
        let mut vqs: KVec<*mut bindings::virtqueue> =
            KVec::from_elem(ptr::null_mut(), nvqs, GFP_KERNEL)?;
        // SAFETY: both arrays hold `nvqs` entries; the device is being probed.
        to_result(unsafe {
            bindings::virtio_find_vqs(
                vdev,
                nvqs as c_uint,
                vqs.as_mut_ptr(),
                infos.as_mut_ptr(),
                ptr::null_mut(),
            )
        })?;

        let batch = has(proto::feature::BATCH);
        let build = || -> Result<KBox<TmemDev>> {
            let mut queues = KVec::with_capacity(nvqs, GFP_KERNEL)?;
            for vq in vqs.iter() {
                let out = KVec::from_elem(0u8, OUT_BUF, GFP_KERNEL)?;
                let resp = KVec::from_elem(0u8, RESP_BUF, GFP_KERNEL)?;
                let bounce = KVec::from_elem(0u8, proto::PAGE_SIZE, GFP_KERNEL)?;
                let vq = Vq {
                    vq: *vq,
                    out,
                    resp,
                    bounce,
                };
                let q = KBox::pin_init(new_spinlock!(vq, "tmem_vq"), GFP_KERNEL)?;
                queues.push(q, GFP_KERNEL)?;
            }
            let pending = Pending {
                entries: KVec::from_elem(BatchEntry::default(), MAX_BATCH, GFP_KERNEL)?,
                len: 0,
                buf: KVec::from_elem(0u8, MAX_BATCH * BatchEntry::SIZE, GFP_KERNEL)?,
            };
            Ok(KBox::new(
                TmemDev {
                    queues,
                    pools: [const { AtomicU32::new(NO_POOL) }; SWAP_TYPES],
                    fs_pools: [const { AtomicU32::new(NO_POOL) }; FS_SLOTS],
                    fs_shared: [const { AtomicBool::new(false) }; FS_SLOTS],
                    pending: KBox::pin_init(new_spinlock!(pending, "tmem_pending"), GFP_KERNEL)?,
                    pending_len: AtomicUsize::new(0),
                    batch,
                    stats: Counters::default(),
                    backend: UnsafeCell::new(bindings::tmem_backend {
                        ops: &OPS,
                        priv_: ptr::null_mut(),
                        owner: THIS_MODULE.as_ptr(),
                    }),
                    debugfs: ptr::null_mut(),
                },
                GFP_KERNEL,
            )?)
        };
        let dev = match build() {
            Ok(dev) => dev,
            Err(e) => {
                // SAFETY: the queues were found above and no request was queued.
                unsafe { bindings::virtio_del_vqs(vdev) };
                return Err(e);
            }
        };
        pr_info!(
            "device ready: {} request queue(s), batch {}, host limit {} pages\n",
            nreq,
            if dev.batch { "on" } else { "off" },
            config.limit_pages
        );
        Ok(dev)
    }
}

fn dev_of(priv_: *mut c_void) -> &'static TmemDev {
    // SAFETY: `priv_` is the `TmemDev` registered with the backend; the core waits for the
    // calls in flight when the backend is unregistered, before the device is freed.
    unsafe { &*(priv_ as *const TmemDev) }
}

fn errno(r: Result) -> c_int {
    match r {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

unsafe extern "C" fn swap_init(priv_: *mut c_void, type_: c_uint, nr_pages: c_ulong) -> c_int {
    errno(dev_of(priv_).swap_init(type_, nr_pages))
}

unsafe extern "C" fn swap_store(
    priv_: *mut c_void,
    type_: c_uint,
    offset: c_ulong,
    page: *mut bindings::page,
) -> c_int {
    errno(dev_of(priv_).swap_store(type_, offset, page))
}

unsafe extern "C" fn swap_load(
    priv_: *mut c_void,
    type_: c_uint,
    offset: c_ulong,
    page: *mut bindings::page,
) -> c_int {
    errno(dev_of(priv_).swap_load(type_, offset, page))
}

unsafe extern "C" fn swap_invalidate_page(priv_: *mut c_void, type_: c_uint, offset: c_ulong) {
    dev_of(priv_).swap_invalidate_page(type_, offset)
}

unsafe extern "C" fn swap_invalidate_area(priv_: *mut c_void, type_: c_uint) {
    dev_of(priv_).swap_invalidate_area(type_)
}

unsafe extern "C" fn cache_init(
    priv_: *mut c_void,
    fs: c_uint,
    shared: *const bindings::uuid_t,
) -> c_int {
    errno(dev_of(priv_).cache_init(fs, shared))
}

unsafe extern "C" fn cache_put(
    priv_: *mut c_void,
    fs: c_uint,
    oid: *const bindings::tmem_oid,
    index: c_ulong,
    page: *mut bindings::page,
) -> c_int {
    // SAFETY: the core passes a key that lives for the call.
    errno(dev_of(priv_).cache_put(fs, unsafe { &*oid }, index, page))
}

unsafe extern "C" fn cache_get(
    priv_: *mut c_void,
    fs: c_uint,
    oid: *const bindings::tmem_oid,
    index: c_ulong,
    page: *mut bindings::page,
) -> c_int {
    // SAFETY: as above.
    errno(dev_of(priv_).cache_get(fs, unsafe { &*oid }, index, page))
}

unsafe extern "C" fn cache_invalidate_page(
    priv_: *mut c_void,
    fs: c_uint,
    oid: *const bindings::tmem_oid,
    index: c_ulong,
) {
    // SAFETY: as above.
    dev_of(priv_).cache_invalidate(fs, Op::FlushPage, unsafe { &*oid }, index as u64)
}

unsafe extern "C" fn cache_invalidate_inode(
    priv_: *mut c_void,
    fs: c_uint,
    oid: *const bindings::tmem_oid,
) {
    // SAFETY: as above.
    dev_of(priv_).cache_invalidate(fs, Op::FlushObject, unsafe { &*oid }, 0)
}

unsafe extern "C" fn cache_invalidate_fs(priv_: *mut c_void, fs: c_uint) {
    dev_of(priv_).cache_invalidate_fs(fs)
}

unsafe extern "C" fn cache_exit(priv_: *mut c_void, fs: c_uint) {
    dev_of(priv_).cache_exit(fs)
}

unsafe extern "C" fn probe(vdev: *mut bindings::virtio_device) -> c_int {
    let mut dev = match TmemDev::new(vdev) {
        Ok(dev) => dev,
        Err(e) => return e.to_errno(),
    };
    dev.create_debugfs();
    let raw = KBox::into_raw(dev);
    // SAFETY: `raw` is a live, uniquely owned device; `vdev` is being probed.
    unsafe {
        (*vdev).priv_ = raw.cast();
        (*(*raw).backend.get()).priv_ = raw.cast();
        bindings::virtio_device_ready(vdev);
    }
    // SAFETY: the backend lives in the device, which stays until `remove` unregisters it.
    let err = unsafe { bindings::tmem_register_backend((*raw).backend.get()) };
    if err != 0 {
        // -EBUSY: another backend (a second virtio-tmem device) is registered; one is served.
        pr_err!("tmem_register_backend failed: {}\n", err);
        // SAFETY: the device was not registered with the tmem core.
        unsafe { teardown(vdev, raw) };
        return err;
    }
    0
}

/// Resets the device and frees the driver's state.
///
/// # Safety
///
/// `raw` came from `probe` for `vdev` and is not registered with the tmem core.
unsafe fn teardown(vdev: *mut bindings::virtio_device, raw: *mut TmemDev) {
    // SAFETY: per the function's contract.
    unsafe {
        bindings::debugfs_remove((*raw).debugfs);
        bindings::virtio_reset_device(vdev);
        bindings::virtio_del_vqs(vdev);
        (*vdev).priv_ = ptr::null_mut();
        drop(KBox::from_raw(raw));
    }
}

unsafe extern "C" fn remove(vdev: *mut bindings::virtio_device) {
    // SAFETY: `priv_` was set by `probe` to the device's state.
    let raw = unsafe { (*vdev).priv_ } as *mut TmemDev;
    if raw.is_null() {
        return;
    }
    // SAFETY: `raw` is live until `teardown`; unregistering waits for the hooks in flight.
    unsafe {
        bindings::tmem_unregister_backend((*raw).backend.get());
        (*raw).send_pending(&mut (*raw).pending.lock());
        // Page-cache pools are the driver's to release now: the core will not ask again.
        for fs in 0..FS_SLOTS {
            (*raw).cache_exit(fs as c_uint);
        }
    }
    // SAFETY: no hook can reach the device any more.
    unsafe { teardown(vdev, raw) };
    pr_info!("device removed\n");
}

struct DriverCell(UnsafeCell<bindings::virtio_driver>);

// SAFETY: the driver structure is written before registration and then owned by the core.
unsafe impl Sync for DriverCell {}
// SAFETY: as above.
unsafe impl Send for DriverCell {}

struct TmemModule {
    driver: KBox<DriverCell>,
}

impl kernel::Module for TmemModule {
    fn init(module: &'static ThisModule) -> Result<Self> {
        // SAFETY: `virtio_driver` is plain data for which all zeroes means "no callbacks".
        let driver = KBox::new(
            DriverCell(UnsafeCell::new(unsafe { core::mem::zeroed() })),
            GFP_KERNEL,
        )?;
        let drv = driver.0.get();
        // SAFETY: `drv` is ours until registered; the tables are statics.
        unsafe {
            (*drv).driver.name = c_str!("tmem").as_char_ptr();
            (*drv).id_table = ID_TABLE.as_ptr();
            (*drv).feature_table = FEATURES.as_ptr();
            (*drv).feature_table_size = FEATURES.len() as c_uint;
            (*drv).probe = Some(probe);
            (*drv).remove = Some(remove);
            to_result(bindings::__register_virtio_driver(drv, module.as_ptr()))?;
        }
        Ok(TmemModule { driver })
    }
}

impl Drop for TmemModule {
    fn drop(&mut self) {
        // SAFETY: registered in `init`; this calls `remove` for the bound device.
        unsafe { bindings::unregister_virtio_driver(self.driver.0.get()) };
    }
}
