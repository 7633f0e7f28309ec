// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memory accounting: what a put reserves, what a removal releases, and eviction when a
//! reservation does not fit.
//!
//! Every byte is charged to a client's account and to the global total. In a private pool: a
//! page's payload (rounded to its arena size class) and slot capacity, a run's map
//! entry and, for ephemeral pools, its LRU records. In a shared pool each page is charged to
//! the client that put it: its payload plus a flat share of the structure
//! (`SHARED_PAGE_META`). A put reserves the most it can cost before taking the shard lock and
//! gives back what it did not use, so usage never passes the limit. A put that would exceed
//! the client's quota or the global limit first evicts ephemeral pages: from its own account
//! when over quota, otherwise from the account that uses the most memory relative to its
//! weight. If nothing can be evicted the put fails with `NoSpace`; persistent pages are never
//! evicted. A client without a quota holds persistent pages up to its weight's share of the
//! limit only, so that one client cannot take what every other is entitled to.
//! The payload arena's overhead (free slots in partly used chunks) counts against the global
//! limit too, so that the limit bounds resident memory (docs/operations.md).
//!
//! Eviction order is LRU of runs within a shard and round-robin across an account's pools and
//! shards: an approximation of Xen's global LRU that needs no global list. A run is evicted
//! whole (up to 16 pages), which is also the eviction batch; in a shared pool, only the
//! account's own pages of the run. What an eviction attempt costs depends only on what the
//! account holds: each rotation entry counts what it holds in that pool (pools where that is
//! 0 are skipped), and a shared pool's shards keep an LRU queue per member, so one member's
//! eviction never walks past another's runs.
//!
//! Nothing a guest can make the store allocate grows without a charge: pools leave their
//! account's list when destroyed, LRU records of removed runs are compacted away, and maps and
//! queues give back their room as they empty (see `layout`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::RwLock;

use super::arena::Arena;
use super::layout::{
    member_record_live, payload_cost, remove_run, shared_bits_at, take_shared_page, Account, Pool,
    RunKey, SharedTaken, RUN_PAGES, SHARDS, SHARED_PAGE_META,
};
use super::runs::Runs;
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
    /// Sum of the clients' weights: a client without a quota may hold at most
    /// `limit * weight / total_weight` in persistent pages.
    total_weight: AtomicU64,
    /// Where payloads live.
    pub(super) arena: Arena,
    /// Bytes released since the C heap was last trimmed.
    untrimmed: AtomicU64,
    /// LRU records and CLOCK entries evictions examined: the work an eviction attempt costs.
    #[cfg(test)]
    pub(super) lru_examined: AtomicU64,
}

impl Budget {
    pub(super) fn new(limit: u64) -> Self {
        Budget {
            used: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            accounts: RwLock::new(Vec::new()),
            total_weight: AtomicU64::new(0),
            arena: {
                let a = Arena::default();
                a.set_limit(limit);
                a
            },
            untrimmed: AtomicU64::new(0),
            #[cfg(test)]
            lru_examined: AtomicU64::new(0),
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

    /// A new client's account: a candidate for eviction whose weight counts in everyone's
    /// persistent share. Its id is its index, which shared pages record as their owner: a
    /// removed client's id is given again only once nothing is charged to it and nothing
    /// holds its account (so no page and no eviction in flight can name it).
    pub(super) fn new_client_account(&self, weight: u32, quota: u64) -> Arc<Account> {
        let mut accounts = self.accounts.write();
        let reuse = accounts.iter().position(|a| {
            a.retired.load(Relaxed) && Arc::strong_count(a) == 1 && a.used.load(Relaxed) == 0
        });
        let id = match reuse {
            Some(i) => i,
            None => {
                assert!(
                    accounts.len() < u32::MAX as usize,
                    "fewer than 2^32 clients"
                );
                accounts.len()
            }
        };
        let account = Arc::new(Account::new(id as u32, weight, quota));
        self.total_weight
            .fetch_add(account.weight.load(Relaxed).into(), Relaxed);
        match reuse {
            Some(i) => accounts[i] = account.clone(),
            None => accounts.push(account.clone()),
        }
        account
    }

    /// Takes a removed client's account out of the weights. What is still charged to it is
    /// released as usual; nothing new is (its client is gone).
    pub(super) fn retire(&self, account: &Account) {
        let _g = self.accounts.write();
        if !account.retired.swap(true, Relaxed) {
            self.total_weight
                .fetch_sub(account.weight.load(Relaxed).into(), Relaxed);
        }
    }

    /// Changes a client's weight (and so every client's persistent share).
    pub(super) fn set_weight(&self, account: &Account, weight: u32) {
        // Under the accounts lock, so that concurrent changes keep the total exact.
        let _g = self.accounts.write();
        if account.retired.load(Relaxed) {
            // A request that found the client just before it was removed.
            return;
        }
        let old = account.weight.swap(weight.max(1), Relaxed);
        self.total_weight.fetch_add(weight.max(1).into(), Relaxed);
        self.total_weight.fetch_sub(old.into(), Relaxed);
    }

    /// The persistent pages' share of a client without a quota: its weight's share of the
    /// limit, so that one guest cannot take the memory every other guest is entitled to.
    pub(super) fn persistent_share(&self, account: &Account) -> u64 {
        let total = self.total_weight.load(Relaxed).max(1) as u128;
        let w = account.weight.load(Relaxed) as u128;
        (self.limit() as u128 * w / total).min(u64::MAX as u128) as u64
    }

    /// Takes a destroyed shared pool out of every client's eviction rotation.
    pub(super) fn forget_shared_pool(&self, pool: &Pool) {
        for a in self.accounts.read().iter() {
            a.pools
                .lock()
                .retain(|r| r.pool.strong_count() > 0 && !std::ptr::eq(r.pool.as_ptr(), pool));
        }
    }

    /// Gives a shared pool's page back to the client that was charged for it.
    pub(super) fn release_shared(&self, owner: u32, charge: u64, pages: u64) {
        let account = self.accounts.read()[owner as usize].clone();
        account.ephemeral_runs.fetch_sub(pages, Relaxed);
        self.release(&account, charge, false);
    }

    /// Accounts in the eviction list.
    #[cfg(test)]
    pub(super) fn accounts_len(&self) -> usize {
        self.accounts.read().len()
    }

    /// Gives `cost` of freed memory back to `account` and the global total.
    pub(super) fn release(&self, account: &Account, cost: u64, persistent: bool) {
        if cost > 0 {
            self.unreserve(account, cost, persistent);
            self.trim_after(cost, TRIM_AFTER);
        }
    }

    /// Gives back the part of a reservation a put did not use. Nothing was freed, so this
    /// does not count towards trimming the heap: a trim per so many puts would hand the
    /// heap's free pages to the kernel only for the next allocations to fault them back in.
    pub(super) fn unreserve(&self, account: &Account, cost: u64, persistent: bool) {
        if cost > 0 {
            if persistent {
                account.persistent_used.fetch_sub(cost, Relaxed);
            }
            account.used.fetch_sub(cost, Relaxed);
            self.used.fetch_sub(cost, Relaxed);
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

    /// Gives `cost` back to the pool's account (private pools: a shared pool's pages are
    /// charged to the clients that put them).
    pub(super) fn release_pool(&self, pool: &Pool, cost: u64) {
        debug_assert!(pool.shared.is_none());
        self.release(&pool.account, cost, pool.persistent);
    }

    /// [`Budget::unreserve`] for a private pool.
    pub(super) fn unreserve_pool(&self, pool: &Pool, cost: u64) {
        debug_assert!(pool.shared.is_none());
        self.unreserve(&pool.account, cost, pool.persistent);
    }

    /// Charges `cost` to `account` and the global total, evicting ephemeral pages if needed.
    /// Persistent pages of an account without a quota also stay within its
    /// [`persistent_share`](Self::persistent_share); evicting cannot make room for those.
    /// Without `evict`, a reservation that does not fit fails at once (restoring saved
    /// state must not evict what it restored a moment before).
    pub(super) fn reserve(
        &self,
        account: &Arc<Account>,
        cost: u64,
        persistent: bool,
        evict: bool,
    ) -> Result<()> {
        if persistent && account.quota.load(Relaxed) == 0 {
            let share = self.persistent_share(account);
            let prev = account.persistent_used.fetch_add(cost, Relaxed);
            if prev + cost > share {
                account.persistent_used.fetch_sub(cost, Relaxed);
                return Err(Error::NoSpace);
            }
        } else if persistent {
            account.persistent_used.fetch_add(cost, Relaxed);
        }
        let r = self.reserve_total(account, cost, evict);
        if r.is_err() && persistent {
            account.persistent_used.fetch_sub(cost, Relaxed);
        }
        r
    }

    fn reserve_total(&self, account: &Arc<Account>, cost: u64, evict: bool) -> Result<()> {
        for _ in 0..RESERVE_ROUNDS {
            let quota = account.quota.load(Relaxed);
            let prev = account.used.fetch_add(cost, Relaxed);
            if quota != 0 && prev + cost > quota {
                account.used.fetch_sub(cost, Relaxed);
                if !evict || self.evict_from(account, EVICT_BATCH) == 0 {
                    return Err(Error::NoSpace);
                }
                continue;
            }
            let prev = self.used.fetch_add(cost, Relaxed);
            if prev + cost + self.arena.overhead() > self.limit.load(Relaxed) {
                self.used.fetch_sub(cost, Relaxed);
                account.used.fetch_sub(cost, Relaxed);
                if !evict || self.evict_global(EVICT_BATCH) == 0 {
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
    /// first per shard; returns how many. What it costs depends on what the account holds,
    /// never on what other clients hold: pools where it holds nothing are skipped, and in a
    /// shared pool only its own queue is looked at.
    pub(super) fn evict_from(&self, account: &Account, n: usize) -> usize {
        if account.ephemeral_runs.load(Relaxed) == 0 {
            return 0;
        }
        // Held for the whole round (no copy of the list per put); only shard locks, atomics
        // and the allocator's locks are taken under it.
        let mut list = account.pools.lock();
        list.retain(|r| r.pool.strong_count() > 0);
        let len = list.len();
        if len == 0 {
            return 0;
        }
        let mut evicted = 0;
        let start = account.cursor.fetch_add(1, Relaxed);
        // Visit pools round-robin; within a pool, shards round-robin, one run per visit.
        let mut idle_visits = 0;
        let mut i = start;
        while evicted < n && idle_visits < len * SHARDS {
            let r = &list[i % len];
            i += 1;
            let pool = match r.pool.upgrade() {
                Some(p) if r.held.load(Relaxed) > 0 => p,
                _ => {
                    // Nothing of its there: as good as a round of empty shards.
                    idle_visits += SHARDS;
                    continue;
                }
            };
            let k = if pool.shared.is_some() {
                self.evict_shared(&pool, account)
            } else {
                self.evict_one(&pool)
            };
            match k {
                0 => idle_visits += 1,
                k => {
                    evicted += k;
                    idle_visits = 0;
                }
            }
        }
        evicted
    }

    /// Evicts a run of the next shard that was not used since the CLOCK hand last passed it;
    /// returns its pages.
    pub(super) fn evict_one(&self, pool: &Pool) -> usize {
        let si = pool.evict_cursor.fetch_add(1, Relaxed) % SHARDS;
        let (run, freed) = {
            let mut g = pool.shards[si].lock();
            let sh = &mut *g;
            let mut steps = 0;
            let victim = sh.runs.clock_victim(&mut steps);
            #[cfg(test)]
            self.lru_examined.fetch_add(steps, Relaxed);
            let Some(key) = victim else {
                return 0;
            };
            remove_run(pool, sh, &key).expect("the hand stopped at it")
        };
        let pages = run.len();
        // Payloads are freed here, outside the lock.
        drop(run);
        self.release_pool(pool, freed);
        pool.account.evictions.fetch_add(pages as u64, Relaxed);
        pool.counters.evictions.fetch_add(pages as u64, Relaxed);
        pages
    }

    /// Evicts the pages `owner` put in the least recently used of its runs in the next shard
    /// of a shared pool; returns how many. Only its own queue is looked at: one client's need
    /// for room never evicts what another is charged for, nor costs more for what others hold.
    pub(super) fn evict_shared(&self, pool: &Pool, owner: &Account) -> usize {
        let si = pool.evict_cursor.fetch_add(1, Relaxed) % SHARDS;
        let me = owner.id;
        // At most 16 pages, kept on the stack: nothing allocated per eviction.
        let mut taken: [Option<SharedTaken>; RUN_PAGES] = Default::default();
        let mut pages = 0;
        {
            let mut g = pool.shards[si].lock();
            let sh = &mut *g;
            let mut found = None;
            if let Some(m) = sh.members.get_mut(&me) {
                // Stale records here are its own, at most half its runs beyond those
                // (`compact_member`): the work is bounded by what it holds.
                while let Some(r) = m.lru.pop_front() {
                    #[cfg(test)]
                    self.lru_examined.fetch_add(1, Relaxed);
                    if member_record_live(&sh.runs, &sh.shared, me, &r) {
                        found = Some(r.key);
                        break;
                    }
                }
            }
            let Some(key) = found else {
                return 0;
            };
            let mine = shared_bits_at(sh, &key, Some(me));
            for bit in 0..RUN_PAGES as u32 {
                if mine & (1 << bit) != 0 {
                    taken[pages] = Some(take_shared_page(sh, &key, bit, Some(me)).expect("listed"));
                    pages += 1;
                }
            }
        }
        let charge: u64 = taken.iter().flatten().map(|t| t.charge).sum();
        // Payloads are freed here, outside the lock.
        drop(taken);
        if pages > 0 {
            owner.ephemeral_runs.fetch_sub(pages as u64, Relaxed);
            self.release(owner, charge, false);
            owner.evictions.fetch_add(pages as u64, Relaxed);
            pool.counters.evictions.fetch_add(pages as u64, Relaxed);
        }
        pages
    }

    /// Removes every page of a pool; returns how many there were.
    pub(super) fn drain(&self, pool: &Pool) -> u64 {
        let n = if pool.shared.is_some() {
            self.drain_shared(pool)
        } else {
            self.drain_private(pool)
        };
        // A pool gone is a moment to give memory back, even after smaller frees.
        self.arena.purge();
        self.trim_after(0, TRIM_AFTER_DRAIN);
        n
    }

    /// Removes every page of a private pool.
    fn drain_private(&self, pool: &Pool) -> u64 {
        let mut n = 0;
        for shard in pool.shards.iter() {
            let (taken, freed, runs) = {
                let mut s = shard.lock();
                let runs = s.runs.len() as u64;
                let freed = s.counts.memory_used;
                n += s.counts.stored_pages;
                // Gauges go to zero; request counters stay.
                s.counts.clear_gauges();
                s.payload_charged = 0;
                // Fresh, not cleared: cleared tables would keep their room.
                (
                    std::mem::replace(&mut s.runs, Runs::new(pool.hasher)),
                    freed,
                    runs,
                )
            };
            if !pool.persistent {
                pool.account.ephemeral_runs.fetch_sub(runs, Relaxed);
                pool.held.fetch_sub(runs, Relaxed);
            }
            drop(taken);
            self.release_pool(pool, freed);
        }
        n
    }

    /// Removes every page of a shared pool, each released to its owner.
    fn drain_shared(&self, pool: &Pool) -> u64 {
        let mut n = 0;
        for shard in pool.shards.iter() {
            let (taken, per_owner) = {
                let mut g = shard.lock();
                let sh = &mut *g;
                let mut per_owner: HashMap<u32, (u64, u64)> = HashMap::new();
                for (key, run) in sh.runs.iter() {
                    let owners = &sh.shared.get(&key).expect("shared runs have owners").owners;
                    for bit in 0..RUN_PAGES as u32 {
                        if let Some(slot) = run.get(bit) {
                            let e = per_owner.entry(owners[bit as usize]).or_default();
                            e.0 += payload_cost(slot.len()) + SHARED_PAGE_META;
                            e.1 += 1;
                        }
                    }
                }
                for (owner, m) in sh.members.drain() {
                    let pages = per_owner.get(&owner).map_or(0, |e| e.1);
                    m.held.fetch_sub(pages, Relaxed);
                }
                sh.members = HashMap::with_hasher(pool.hasher);
                sh.shared = HashMap::with_hasher(pool.hasher);
                n += sh.counts.stored_pages;
                sh.counts.clear_gauges();
                sh.payload_charged = 0;
                (
                    std::mem::replace(&mut sh.runs, Runs::new(pool.hasher)),
                    per_owner,
                )
            };
            drop(taken);
            for (owner, (charge, pages)) in per_owner {
                self.release_shared(owner, charge, pages);
            }
        }
        n
    }

    /// Removes every page `owner` put in a shared pool (the other members' stay); returns how
    /// many.
    pub(super) fn drain_owner(&self, pool: &Pool, owner: u32) -> u64 {
        debug_assert!(pool.shared.is_some());
        let mut n = 0;
        for shard in pool.shards.iter() {
            let taken = {
                let mut g = shard.lock();
                let sh = &mut *g;
                let keys: Vec<RunKey> = sh.runs.iter().map(|(k, _)| k).collect();
                let mut taken = Vec::new();
                for key in keys {
                    let mine = shared_bits_at(sh, &key, Some(owner));
                    for bit in 0..RUN_PAGES as u32 {
                        if mine & (1 << bit) != 0 {
                            taken.push(
                                take_shared_page(sh, &key, bit, Some(owner)).expect("listed"),
                            );
                        }
                    }
                }
                taken
            };
            let pages = taken.len() as u64;
            let charge = taken.iter().map(|t| t.charge).sum();
            drop(taken);
            if pages > 0 {
                self.release_shared(owner, charge, pages);
            }
            n += pages;
        }
        n
    }

    /// Marks a pool dead and removes its pages; returns how many there were.
    pub(super) fn kill_pool(&self, pool: &Pool) -> u64 {
        // Under every shard lock in turn, so that a racing put sees `dead` before inserting.
        for shard in pool.shards.iter() {
            let _g = shard.lock();
            pool.dead.store(true, Relaxed);
        }
        // Out of the account's eviction rotation now, not at the next eviction: a guest that
        // creates and destroys pools in a loop would grow the list without bound.
        pool.account
            .pools
            .lock()
            .retain(|r| r.pool.strong_count() > 0 && !std::ptr::eq(r.pool.as_ptr(), pool));
        self.drain(pool)
    }
}
