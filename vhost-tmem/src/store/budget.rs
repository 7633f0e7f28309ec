// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory accounting: what a put reserves, what a removal releases, and eviction when a
//! reservation does not fit.
//!
//! Every byte is charged to the pool's account (the client's, or the shared pool's own) and to
//! the global total: a page's payload (rounded to its arena size class) and slot
//! capacity, a run's map entry and, for ephemeral pools, its LRU records. A put reserves the
//! most it can cost before taking the shard lock and gives back what it did not use, so usage
//! never passes the limit. A put that would exceed the client's quota or the global limit first
//! evicts ephemeral pages: from its own account when over quota, otherwise from the account
//! that uses the most memory relative to its weight. If nothing can be evicted the put fails
//! with `NoSpace`; persistent pages are never evicted. The payload arena's overhead (free
//! slots in partly used chunks) counts against the global limit too, so that the limit bounds
//! resident memory (docs/operations.md).
//!
//! Eviction order is LRU of runs within a shard and round-robin across an account's pools and
//! shards: an approximation of Xen's global LRU that needs no global list. A run is evicted
//! whole (up to 16 pages), which is also the eviction batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use super::arena::Arena;
use super::layout::{remove_run, Account, Pool, SHARDS};
use super::{Error, Result};

/// Pages evicted per round when room is needed (at least; runs go whole).
const EVICT_BATCH: usize = 16;
/// Rounds of evict-and-retry before a put gives up.
const RESERVE_ROUNDS: usize = 64;
/// Bytes freed (payload and metadata) after which the C heap is trimmed.
const TRIM_AFTER: u64 = 16 << 20;
/// Bytes freed after which draining a pool (destroy, reset) trims the C heap.
const TRIM_AFTER_DRAIN: u64 = 1 << 20;

/// The global limit and total, and the accounts eviction chooses from.
#[derive(Debug)]
pub(super) struct Budget {
    used: AtomicU64,
    limit: AtomicU64,
    accounts: RwLock<Vec<Arc<Account>>>,
    /// Where payloads live.
    pub(super) arena: Arena,
    /// Bytes released since the C heap was last trimmed.
    untrimmed: AtomicU64,
}

impl Budget {
    pub(super) fn new(limit: u64) -> Self {
        Budget {
            used: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            accounts: RwLock::new(Vec::new()),
            arena: {
                let a = Arena::default();
                a.set_limit(limit);
                a
            },
            untrimmed: AtomicU64::new(0),
        }
    }

    /// Bytes in use (payload and metadata).
    pub(super) fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// The global limit in bytes.
    pub(super) fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    /// Changes the global limit; pages over it are evicted by later puts.
    pub(super) fn set_limit(&self, bytes: u64) {
        self.limit.store(bytes, Relaxed);
        self.arena.set_limit(bytes);
    }

    /// Makes an account a candidate for global eviction.
    pub(super) fn add_account(&self, account: Arc<Account>) {
        self.accounts.write().push(account);
    }

    /// Forgets an account (a shared pool's, once the pool is gone).
    pub(super) fn remove_account(&self, account: &Arc<Account>) {
        self.accounts.write().retain(|a| !Arc::ptr_eq(a, account));
    }

    /// Gives `cost` back to `account` and the global total.
    pub(super) fn release(&self, account: &Account, cost: u64) {
        if cost > 0 {
            account.used.fetch_sub(cost, Relaxed);
            self.used.fetch_sub(cost, Relaxed);
            self.trim_after(cost, TRIM_AFTER);
        }
    }

    /// Trims the C heap once `threshold` bytes were released since the last trim. Payloads go
    /// back to the kernel with their arena chunks; freed metadata (maps, slot vectors, in
    /// per-thread malloc arenas) stays resident in the heap unless trimmed.
    fn trim_after(&self, freed: u64, threshold: u64) {
        if self.untrimmed.fetch_add(freed, Relaxed) + freed < threshold {
            return;
        }
        if self.untrimmed.swap(0, Relaxed) >= threshold {
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim has no preconditions.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Charges `cost` to `account` and the global total, evicting ephemeral pages if needed.
    pub(super) fn reserve(&self, account: &Arc<Account>, cost: u64) -> Result<()> {
        for _ in 0..RESERVE_ROUNDS {
            let quota = account.quota.load(Relaxed);
            let prev = account.used.fetch_add(cost, Relaxed);
            if quota != 0 && prev + cost > quota {
                account.used.fetch_sub(cost, Relaxed);
                if self.evict_from(account, EVICT_BATCH) == 0 {
                    return Err(Error::NoSpace);
                }
                continue;
            }
            let prev = self.used.fetch_add(cost, Relaxed);
            if prev + cost + self.arena.overhead() > self.limit.load(Relaxed) {
                self.used.fetch_sub(cost, Relaxed);
                account.used.fetch_sub(cost, Relaxed);
                if self.evict_global(EVICT_BATCH) == 0 {
                    return Err(Error::NoSpace);
                }
                continue;
            }
            return Ok(());
        }
        Err(Error::NoSpace)
    }

    /// Evicts from the account using the most memory for its weight that has ephemeral pages.
    pub(super) fn evict_global(&self, n: usize) -> usize {
        let victim = {
            let accounts = self.accounts.read();
            accounts
                .iter()
                .filter(|a| a.ephemeral_runs.load(Relaxed) > 0)
                .max_by_key(|a| {
                    // used / weight, compared without division.
                    let used = a.used.load(Relaxed) as u128;
                    used * 1_000_000 / a.weight.load(Relaxed).max(1) as u128
                })
                .cloned()
        };
        victim.map_or(0, |a| self.evict_from(&a, n))
    }

    /// Evicts at least `n` ephemeral pages charged to `account` if it has them, oldest run
    /// first per shard; returns how many.
    pub(super) fn evict_from(&self, account: &Account, n: usize) -> usize {
        let pools: Vec<Arc<Pool>> = {
            let mut list = account.pools.lock();
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        if pools.is_empty() {
            return 0;
        }
        let mut evicted = 0;
        let start = account.cursor.fetch_add(1, Relaxed);
        // Visit pools round-robin; within a pool, shards round-robin, one run per visit.
        let mut idle_visits = 0;
        let mut i = start;
        while evicted < n && idle_visits < pools.len() * SHARDS {
            let pool = &pools[i % pools.len()];
            i += 1;
            match self.evict_one(pool) {
                0 => idle_visits += 1,
                k => {
                    evicted += k;
                    idle_visits = 0;
                }
            }
        }
        evicted
    }

    /// Evicts the least recently used run of the next shard; returns its pages.
    pub(super) fn evict_one(&self, pool: &Pool) -> usize {
        let si = pool.evict_cursor.fetch_add(1, Relaxed) % SHARDS;
        let (run, freed) = {
            let mut g = pool.shards[si].lock();
            let sh = &mut *g;
            let mut found = None;
            while let Some(r) = sh.lru.pop_front() {
                let Some(obj) = sh.objects.get_mut(&r.key.oid) else {
                    continue;
                };
                if obj.get(r.key.run).is_some_and(|run| run.stamp == r.stamp) {
                    found = Some(r.key);
                    break;
                }
            }
            let Some(key) = found else {
                return 0;
            };
            remove_run(pool, sh, &key).expect("found above")
        };
        let pages = run.slots.len();
        // Payloads are freed here, outside the lock.
        drop(run);
        self.release(&pool.account, freed);
        pool.account.evictions.fetch_add(pages as u64, Relaxed);
        pool.counters.evictions.fetch_add(pages as u64, Relaxed);
        pages
    }

    /// Removes every page of a pool; returns how many there were.
    pub(super) fn drain(&self, pool: &Pool) -> u64 {
        let mut n = 0;
        for shard in pool.shards.iter() {
            let (taken, freed, runs) = {
                let mut s = shard.lock();
                s.lru.clear();
                let runs = std::mem::take(&mut s.runs) as u64;
                let freed = s.counts.memory_used;
                n += s.counts.stored_pages;
                // Gauges go to zero; request counters stay.
                s.counts.clear_gauges();
                s.payload_charged = 0;
                let h = pool.hasher;
                (
                    std::mem::replace(&mut s.objects, HashMap::with_hasher(h)),
                    freed,
                    runs,
                )
            };
            if !pool.persistent {
                pool.account.ephemeral_runs.fetch_sub(runs, Relaxed);
            }
            drop(taken);
            self.release(&pool.account, freed);
        }
        // A pool gone is a moment to give memory back, even after smaller frees.
        self.arena.purge();
        self.trim_after(0, TRIM_AFTER_DRAIN);
        n
    }

    /// Marks a pool dead and removes its pages; returns how many there were.
    pub(super) fn kill_pool(&self, pool: &Pool) -> u64 {
        // Under every shard lock in turn, so that a racing put sees `dead` before inserting.
        for shard in pool.shards.iter() {
            let _g = shard.lock();
            pool.dead.store(true, Relaxed);
        }
        self.drain(pool)
    }
}
