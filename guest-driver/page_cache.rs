// SPDX-License-Identifier: GPL-2.0

//! Page-cache operations: every filesystem that opted in (ext4) gets an ephemeral pool on the
//! host, and clean page-cache pages evicted by reclaim go there and come back on a read miss
//! ("cleancache" semantics).
//!
//! The pool is private, or shared by UUID for read-only mounts when the host authorizes it
//! (a `DENIED` shared pool falls back to a private one). Gets from private pools are
//! exclusive: the page moves back into the guest's cache. Gets from shared pools leave the
//! page for the other guests.

use core::sync::atomic::Ordering;
use kernel::prelude::*;

use crate::backend::{self, Oid, Page};
use crate::device::{status_name, TmemDev, Wait, NO_POOL};
use crate::proto::{self, BatchEntry, CreatePool, Op, ReqHeader, Status};

impl TmemDev {
    /// The host pool of filesystem slot `fs` and whether it is shared, if it has one, and the
    /// epoch it was read in.
    fn fs_pool(&self, fs: u32) -> Option<(u32, bool, u64)> {
        let fs = fs as usize;
        let epoch = self.epoch();
        let pool = self.fs_pools.get(fs)?.load(Ordering::Acquire);
        if pool == NO_POOL {
            self.kick_if_broken();
            return None;
        }
        Some((pool, self.fs_shared[fs].load(Ordering::Relaxed), epoch))
    }

    fn create_cache_pool(&self, shared: Option<&[u8; 16]>, epoch: u64) -> Result<u32> {
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
        // Mount, registration or `invalidate_bdev()`: process context.
        let resp = self.control_status(&hdr, &create.encode(), epoch, Wait::Sleep)?;
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

    /// Takes filesystem slot `fs`'s pool away and destroys it on the host: from now on the
    /// filesystem does not use tmem (until it is mounted again). Never sleeps: it runs from
    /// the flush path, with the pending lock held. `epoch` is the current one (the caller
    /// holds the pending lock, under which a recovery ends it).
    pub(crate) fn release_fs_pool(&self, fs: usize, why: &str, epoch: u64) {
        let pool = self.fs_pools[fs].swap(NO_POOL, Ordering::AcqRel);
        if pool == NO_POOL {
            return;
        }
        self.stats.cache_pools.fetch_sub(1, Ordering::Relaxed);
        if self.fs_shared[fs].swap(false, Ordering::Relaxed) {
            self.stats
                .cache_shared_pools
                .fetch_sub(1, Ordering::Relaxed);
        }
        self.destroy_pool(pool, "page cache", epoch, Wait::Spin);
        pr_info!("filesystem {}: host pool {} {}\n", fs, pool, why);
    }

    /// Queues a FLUSH_PAGE or FLUSH_OBJECT for filesystem slot `fs`.
    fn cache_invalidate(&self, fs: u32, op: Op, oid: &Oid, index: u64) {
        let Some((pool, _, epoch)) = self.fs_pool(fs) else {
            return;
        };
        self.stats
            .cache_invalidations
            .fetch_add(1, Ordering::Relaxed);
        let entry = BatchEntry {
            op: op as u32,
            pool_id: pool,
            oid: *oid,
            index,
        };
        self.invalidate(entry, epoch);
    }
}

impl backend::PageCache for TmemDev {
    fn cache_init(&self, fs: u32, shared: Option<&[u8; 16]>) -> Result {
        let slot = self.fs_pools.get(fs as usize).ok_or(EINVAL)?;
        if slot.load(Ordering::Acquire) != NO_POOL {
            return Err(EBUSY);
        }
        // Without the device's SHARED_POOLS a shared request would only be refused.
        let shared = shared.filter(|_| self.shared_pools);
        let epoch = self.epoch();
        let (pool, is_shared) = match shared {
            Some(uuid) => match self.create_cache_pool(Some(uuid), epoch) {
                Ok(pool) => (pool, true),
                Err(e) => {
                    // Sharing needs the host's authorization for this UUID (DENIED); any
                    // other failure of the shared pool falls back to a private one too.
                    pr_info!(
                        "filesystem {}: shared pool refused ({:?}), using a private one\n",
                        fs,
                        e
                    );
                    (self.create_cache_pool(None, epoch)?, false)
                }
            },
            None => (self.create_cache_pool(None, epoch)?, false),
        };
        self.fs_shared[fs as usize].store(is_shared, Ordering::Relaxed);
        if !self.publish(slot, pool, epoch) {
            // As in `swap_init`: a recovery began meanwhile.
            self.fs_shared[fs as usize].store(false, Ordering::Relaxed);
            return Err(EAGAIN);
        }
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

    fn cache_put(&self, fs: u32, oid: &Oid, index: usize, page: &Page) -> Result {
        // The pool is read after the queued invalidations are carried out: one that failed
        // takes the pool away (see `TmemDev::flush_failed`).
        self.drain_pending();
        let (pool, _, epoch) = self.fs_pool(fs).ok_or(ENODEV)?;
        let hdr = ReqHeader {
            op: Op::Put as u32,
            pool_id: pool,
            oid: *oid,
            index: index as u64,
            ..Default::default()
        };
        let s = &self.stats;
        self.put(
            &hdr,
            page,
            [&s.cache_puts, &s.cache_puts_refused],
            "page-cache put",
            epoch,
            Wait::Spin,
        )
    }

    fn cache_get(&self, fs: u32, oid: &Oid, index: usize, page: &Page) -> Result {
        // As in `cache_put`: a get never reaches a pool whose flush failed.
        self.drain_pending();
        let (pool, shared, epoch) = self.fs_pool(fs).ok_or(ENODEV)?;
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
            oid: *oid,
            index: index as u64,
            ..Default::default()
        };
        let s = &self.stats;
        let counters = [&s.cache_gets, &s.cache_hits, &s.cache_misses];
        self.get(&hdr, page, counters, "page-cache get", epoch, Wait::Spin)
            .map(|_| ())
    }

    fn cache_invalidate_page(&self, fs: u32, oid: &Oid, index: usize) {
        self.cache_invalidate(fs, Op::FlushPage, oid, index as u64)
    }

    fn cache_invalidate_inode(&self, fs: u32, oid: &Oid) {
        self.cache_invalidate(fs, Op::FlushObject, oid, 0)
    }

    /// Drops every page of a private filesystem pool: a new, empty pool replaces it.
    fn cache_invalidate_fs(&self, fs: u32) {
        let Some(slot) = self.fs_pools.get(fs as usize) else {
            return;
        };
        let mut pending = self.pending.lock();
        self.send_pending(&mut pending);
        // Under the pending lock, where a recovery takes the pools and ends the epoch (a
        // recovery that holds this slot's pool re-creates it empty anyway).
        let epoch = self.epoch();
        let old = slot.swap(NO_POOL, Ordering::AcqRel);
        drop(pending);
        if old == NO_POOL {
            return;
        }
        self.stats.cache_pool_resets.fetch_add(1, Ordering::Relaxed);
        self.destroy_pool(old, "page cache", epoch, Wait::Sleep);
        match self.create_cache_pool(None, epoch) {
            Ok(pool) if self.publish(slot, pool, epoch) => {}
            Ok(_) => {
                self.stats.cache_pools.fetch_sub(1, Ordering::Relaxed);
            }
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

    /// Releases a filesystem's pool (unmount, or the device going away).
    fn cache_exit(&self, fs: u32) {
        if fs as usize >= self.fs_pools.len() {
            return;
        }
        let mut pending = self.pending.lock();
        self.send_pending(&mut pending);
        if self.fs_pools[fs as usize].load(Ordering::Acquire) == NO_POOL {
            // A recovery may hold the filesystem's pool: it is to destroy it, not re-create it.
            let orphan = &mut pending.orphans.fs[fs as usize];
            orphan.1 = orphan.0 != NO_POOL;
            return;
        }
        self.release_fs_pool(fs as usize, "released", self.epoch());
    }
}
