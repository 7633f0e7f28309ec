// SPDX-License-Identifier: GPL-2.0

//! Swap operations: every swap area gets a persistent private pool on the host, and
//! swapped-out pages go there ("frontswap" semantics).
//!
//! A refused put makes the kernel write the page to the swap device. The tmem core loads only
//! offsets whose last store succeeded, so a failed get of such a page is an I/O error, never
//! stale or zeroed data (with write-through, the kernel reads the swap device's copy instead).
//! A load into the swap cache is an exclusive get: the host drops its copy, as zswap does.

use core::sync::atomic::Ordering;
use kernel::prelude::*;

use crate::backend::{self, Page};
use crate::device::{TmemDev, Wait, NO_POOL};
use crate::proto::{self, BatchEntry, CreatePool, Op, ReqHeader};

impl TmemDev {
    /// The host pool of swap area `type_`, if it has one, and the epoch it was read in.
    fn pool(&self, type_: u32) -> Option<(u32, u64)> {
        let epoch = self.epoch();
        let pool = self.pools.get(type_ as usize)?.load(Ordering::Acquire);
        if pool == NO_POOL {
            // A recovery that failed keeps the pools: the next is up to the hooks.
            self.kick_if_broken();
            return None;
        }
        Some((pool, epoch))
    }
}

impl backend::Swap for TmemDev {
    fn swap_init(&self, type_: u32, nr_pages: usize) -> Result {
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
        let epoch = self.epoch();
        let id = self.control(&hdr, &create.encode(), epoch, Wait::Sleep)?;
        let id = u32::try_from(id).map_err(|_| EIO)?;
        if !self.publish(slot, id, epoch) {
            // A recovery began meanwhile: the id is of the host it ended, and the area goes
            // without tmem rather than risk a pool of the new one.
            return Err(EAGAIN);
        }
        self.stats.pools.fetch_add(1, Ordering::Relaxed);
        pr_info!(
            "swap area {}: host pool {} ({} pages)\n",
            type_,
            id,
            nr_pages
        );
        Ok(())
    }

    fn swap_store(&self, type_: u32, offset: usize, page: &Page) -> Result {
        // The host asked for memory back (`shrink.rs`): new pages go to the swap device. A
        // failed store must leave no copy (the core forgot the offset already): an older one
        // is flushed.
        if self.over_shrink_target() {
            self.stats.shrink_refused.fetch_add(1, Ordering::Relaxed);
            self.swap_invalidate_page(type_, offset);
            return Err(ENOSPC);
        }
        // A queued invalidation of this offset must reach the device before the new copy.
        self.drain_pending();
        let (pool, epoch) = self.pool(type_).ok_or(ENODEV)?;
        let hdr = ReqHeader {
            op: Op::Put as u32,
            pool_id: pool,
            index: offset as u64,
            ..Default::default()
        };
        let s = &self.stats;
        // swap_writepage() may sleep (zswap takes a mutex there).
        self.put(
            &hdr,
            page,
            [&s.puts, &s.puts_refused],
            "put",
            epoch,
            Wait::Sleep,
        )
    }

    fn swap_load(&self, type_: u32, offset: usize, page: &Page, exclusive: bool) -> Result {
        // Every invalidation queued before is carried out first, as for a store.
        self.drain_pending();
        let (pool, epoch) = self.pool(type_).ok_or(ENODEV)?;
        let hdr = ReqHeader {
            op: Op::Get as u32,
            flags: if exclusive {
                proto::req_flags::GET_EXCLUSIVE
            } else {
                0
            },
            pool_id: pool,
            index: offset as u64,
            ..Default::default()
        };
        let s = &self.stats;
        let counters = [&s.gets, &s.hits, &s.misses];
        // swap_read_folio() may sleep (zswap takes a mutex there).
        let flags = self.get(&hdr, page, counters, "get", epoch, Wait::Sleep)?;
        if exclusive && flags & proto::resp_flags::DROPPED == 0 {
            // The core forgets the offset now: a copy the host kept would never be flushed.
            self.swap_invalidate_page(type_, offset);
        }
        Ok(())
    }

    fn swap_writethrough(&self) -> bool {
        crate::writethrough()
    }

    /// Runs with spinlocks held: queues the invalidation, or sends it at once without BATCH.
    fn swap_invalidate_page(&self, type_: u32, offset: usize) {
        let Some((pool, epoch)) = self.pool(type_) else {
            return;
        };
        let entry = BatchEntry {
            op: Op::FlushPage as u32,
            pool_id: pool,
            oid: [0; 3],
            index: offset as u64,
        };
        self.invalidate(entry, epoch);
    }

    fn swap_invalidate_area(&self, type_: u32) {
        let Some(slot) = self.pools.get(type_ as usize) else {
            return;
        };
        let mut pending = self.pending.lock();
        self.send_pending(&mut pending);
        // Under the pending lock, where a recovery takes the pools and ends the epoch.
        let epoch = self.epoch();
        let pool = slot.swap(NO_POOL, Ordering::AcqRel);
        if pool == NO_POOL {
            // A recovery may hold the area's pool: it is to destroy it, not hand it back.
            let orphan = &mut pending.orphans.swap[type_ as usize];
            orphan.1 = orphan.0 != NO_POOL;
            return;
        }
        drop(pending);
        self.stats.pools.fetch_sub(1, Ordering::Relaxed);
        self.destroy_pool(pool, "swap", epoch, Wait::Sleep);
        pr_info!("swap area {}: host pool {} destroyed\n", type_, pool);
    }
}
