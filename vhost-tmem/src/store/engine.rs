// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-memory tmem engine.
//!
//! Layout: a client holds up to `max_pools` pools; a pool is split into shards, each a mutex
//! over `oid -> index -> entry` maps plus, for ephemeral pools, an LRU queue. Pages hash to a
//! shard by object id and index (16-page runs stay together), so requests from different
//! workers rarely meet on a lock and no lock is global. The hash is keyed per process
//! (`RandomState`) because keys are chosen by untrusted guests.
//!
//! Memory: every byte a page costs (payload rounded to the allocator's 16-byte granule, the
//! entry, the map slot and the LRU record) is charged to the pool's account (the client's, or
//! the shared pool's own) and to the global total. A put that would exceed the client's quota
//! or the global limit first evicts ephemeral pages: from its own account when over quota,
//! otherwise from the account that uses the most memory relative to its weight. If nothing
//! can be evicted the put fails with `NoSpace`; persistent pages are never evicted.
//!
//! Eviction order is LRU within a shard and round-robin across an account's pools and shards:
//! an approximation of Xen's global LRU that needs no global list.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use shared_proto::{Oid, PAGE_SIZE};

use super::codec::{self, Codecs, Compressor, Encoding};
use super::stats::{ClientStats, Counters, PoolStats, SharedPoolStats, StoreStats};
use super::{format_uuid, Error, GetHit, PoolId, PoolSpec, Result, Tmem, Uuid};

/// Shards per pool: a power of two, a few times the number of worker threads.
const SHARDS: usize = 16;
/// Consecutive page indexes that land in the same shard.
const RUN_SHIFT: u32 = 4;
/// Pages evicted per round when room is needed, so that eviction is not paid per put.
const EVICT_BATCH: usize = 16;
/// Rounds of evict-and-retry before a put gives up.
const RESERVE_ROUNDS: usize = 64;

/// What happens to an ephemeral page that does not compress below the raw threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IncompressiblePolicy {
    /// Refuse it: the guest can reread a clean page from disk, so host memory is better spent
    /// on pages that compress.
    #[default]
    Refuse,
    /// Store it raw.
    Store,
}

/// Engine-wide settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Global memory limit in bytes (payload and metadata).
    pub memory_limit: u64,
    /// Default compressor (clients may override).
    pub compressor: Compressor,
    /// A compressed page of this many bytes or more is stored raw (persistent) or handled by
    /// `ephemeral_incompressible` (ephemeral).
    pub raw_threshold: usize,
    /// Policy for incompressible ephemeral pages.
    pub ephemeral_incompressible: IncompressiblePolicy,
    /// Most pools per client.
    pub max_pools: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            memory_limit: 1 << 30,
            compressor: Compressor::Lz4,
            raw_threshold: PAGE_SIZE * 7 / 8,
            ephemeral_incompressible: IncompressiblePolicy::Refuse,
            max_pools: 16,
        }
    }
}

/// A client as configured by the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Name shown in statistics and used by the control interface.
    pub name: String,
    /// Memory quota in bytes; 0: only the global limit applies.
    pub quota: u64,
    /// Eviction weight (relative share of memory); at least 1.
    pub weight: u32,
    /// Compressor override.
    pub compressor: Option<Compressor>,
    /// Shared pools this client may join.
    pub shared: Vec<Uuid>,
}

impl ClientConfig {
    /// A client with default settings.
    pub fn named(name: &str) -> Self {
        ClientConfig {
            name: name.to_string(),
            quota: 0,
            weight: 100,
            compressor: None,
            shared: Vec::new(),
        }
    }
}

/// Where a pool's memory is charged: a client, or a shared pool.
#[derive(Debug)]
struct Account {
    weight: AtomicU32,
    quota: AtomicU64,
    used: AtomicU64,
    /// Ephemeral pages held, so that eviction can skip accounts with nothing to give.
    ephemeral_pages: AtomicU64,
    /// Ephemeral pools charged here, in eviction rotation.
    pools: Mutex<Vec<Weak<Pool>>>,
    cursor: AtomicUsize,
    /// Gauges of everything charged here, and evictions from it.
    counters: Counters,
}

impl Account {
    fn new(weight: u32, quota: u64) -> Self {
        Account {
            weight: AtomicU32::new(weight.max(1)),
            quota: AtomicU64::new(quota),
            used: AtomicU64::new(0),
            ephemeral_pages: AtomicU64::new(0),
            pools: Mutex::new(Vec::new()),
            cursor: AtomicUsize::new(0),
            counters: Counters::default(),
        }
    }
}

#[derive(Debug)]
enum Payload {
    /// Every 8-byte word of the page is this value.
    Same(u64),
    /// Compressed or raw bytes.
    Stored(Encoding, Box<[u8]>),
}

#[derive(Debug)]
struct Entry {
    payload: Payload,
    /// LRU stamp (ephemeral pools): matches the newest LRU record of this key.
    stamp: u64,
}

/// An LRU record; stale when the entry's stamp has moved on or the entry is gone.
#[derive(Debug)]
struct LruRef {
    oid: Oid,
    index: u64,
    stamp: u64,
}

/// Charged per page besides its payload: the entry, its map slot (key, value, control byte).
const ENTRY_META: u64 = (std::mem::size_of::<(u64, Entry)>() + 1) as u64;
/// Charged per ephemeral page on top of `ENTRY_META`.
const LRU_META: u64 = std::mem::size_of::<LruRef>() as u64;

fn payload_cost(p: &Payload) -> u64 {
    match p {
        Payload::Same(_) => 0,
        // Allocations come in 16-byte granules.
        Payload::Stored(_, b) => (b.len() as u64).div_ceil(16) * 16,
    }
}

#[derive(Debug, Default)]
struct Shard {
    objects: HashMap<Oid, HashMap<u64, Entry>>,
    lru: VecDeque<LruRef>,
    clock: u64,
    /// Pages in `objects`, kept so that LRU compaction needs no scan.
    live: usize,
}

/// A pool. Shared pools are one `Pool` referenced by every member client.
#[derive(Debug)]
struct Pool {
    persistent: bool,
    shared: Option<Uuid>,
    compressor: Compressor,
    account: Arc<Account>,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    evict_cursor: AtomicUsize,
    /// Set once the pool is destroyed; puts that raced with it must not insert.
    dead: AtomicBool,
    members: AtomicU64,
    counters: Counters,
}

impl Pool {
    fn shard(&self, oid: &Oid, index: u64) -> &Mutex<Shard> {
        let h = self.hasher.hash_one((oid, index >> RUN_SHIFT));
        &self.shards[(h as usize) & (SHARDS - 1)]
    }

    fn cost(&self, p: &Payload) -> u64 {
        payload_cost(p) + ENTRY_META + if self.persistent { 0 } else { LRU_META }
    }

    /// Gauge bookkeeping for a page entering (`add`) or leaving the pool.
    fn gauge(&self, p: &Payload, cost: u64, add: bool) {
        let bytes = match p {
            Payload::Same(_) => 0,
            Payload::Stored(_, b) => b.len() as u64,
        };
        let same = matches!(p, Payload::Same(_)) as u64;
        let raw = matches!(p, Payload::Stored(Encoding::Raw, _)) as u64;
        let apply = |c: &Counters| {
            let op = |a: &AtomicU64, v: u64| {
                if add {
                    a.fetch_add(v, Relaxed);
                } else {
                    a.fetch_sub(v, Relaxed);
                }
            };
            op(&c.stored_pages, 1);
            op(&c.same_filled_pages, same);
            op(&c.raw_pages, raw);
            op(&c.compressed_bytes, bytes);
            op(&c.memory_used, cost);
        };
        apply(&self.counters);
        apply(&self.account.counters);
        if !self.persistent {
            if add {
                self.account.ephemeral_pages.fetch_add(1, Relaxed);
            } else {
                self.account.ephemeral_pages.fetch_sub(1, Relaxed);
            }
        }
    }
}

/// A client of the engine (one guest).
#[derive(Debug)]
pub struct Client {
    name: String,
    compressor: Compressor,
    account: Arc<Account>,
    shared_auth: RwLock<HashSet<Uuid>>,
    frozen: AtomicBool,
    connected: AtomicBool,
    pools: RwLock<Vec<Option<Arc<Pool>>>>,
    counters: Counters,
}

impl Client {
    /// The client's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Marks the client connected or not (shown in statistics).
    pub fn set_connected(&self, c: bool) {
        self.connected.store(c, Relaxed);
    }

    fn pool(&self, id: PoolId) -> Result<Arc<Pool>> {
        self.pools
            .read()
            .get(id as usize)
            .and_then(|p| p.clone())
            .ok_or(Error::BadPool(id))
    }
}

/// The engine: see the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    used: AtomicU64,
    limit: AtomicU64,
    accounts: RwLock<Vec<Arc<Account>>>,
    clients: RwLock<Vec<Arc<Client>>>,
    shared: Mutex<HashMap<Uuid, Weak<Pool>>>,
}

/// Per-worker state of the engine.
#[derive(Debug)]
pub struct Worker {
    codecs: Codecs,
}

impl Engine {
    /// A new, empty engine.
    pub fn new(cfg: EngineConfig) -> Self {
        Engine {
            limit: AtomicU64::new(cfg.memory_limit),
            cfg,
            used: AtomicU64::new(0),
            accounts: RwLock::new(Vec::new()),
            clients: RwLock::new(Vec::new()),
            shared: Mutex::new(HashMap::new()),
        }
    }

    /// Adds a client. Names must be unique.
    pub fn add_client(&self, cfg: ClientConfig) -> Arc<Client> {
        let account = Arc::new(Account::new(cfg.weight, cfg.quota));
        self.accounts.write().push(account.clone());
        let client = Arc::new(Client {
            name: cfg.name,
            compressor: cfg.compressor.unwrap_or(self.cfg.compressor),
            account,
            shared_auth: RwLock::new(cfg.shared.into_iter().collect()),
            frozen: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            pools: RwLock::new(Vec::new()),
            counters: Counters::default(),
        });
        self.clients.write().push(client.clone());
        client
    }

    /// Looks a client up by name.
    pub fn client(&self, name: &str) -> Option<Arc<Client>> {
        self.clients.read().iter().find(|c| c.name == name).cloned()
    }

    /// Bytes in use (payload and metadata).
    pub fn memory_used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Changes the global limit; pages over it are evicted by later puts.
    pub fn set_memory_limit(&self, bytes: u64) {
        self.limit.store(bytes, Relaxed);
    }

    /// Changes a client's weight.
    pub fn set_weight(&self, client: &Client, weight: u32) {
        client.account.weight.store(weight.max(1), Relaxed);
    }

    /// Changes a client's quota (0: none).
    pub fn set_quota(&self, client: &Client, bytes: u64) {
        client.account.quota.store(bytes, Relaxed);
    }

    /// Freezes (puts refused) or thaws a client.
    pub fn set_frozen(&self, client: &Client, frozen: bool) {
        client.frozen.store(frozen, Relaxed);
    }

    /// Authorizes a client to join a shared pool, or revokes that.
    pub fn set_shared_auth(&self, client: &Client, uuid: Uuid, allowed: bool) {
        let mut auth = client.shared_auth.write();
        if allowed {
            auth.insert(uuid);
        } else {
            auth.remove(&uuid);
        }
    }

    /// Drops every ephemeral page of a client's private pools; returns how many.
    pub fn flush_client_ephemeral(&self, client: &Client) -> u64 {
        let pools: Vec<Arc<Pool>> = client.pools.read().iter().flatten().cloned().collect();
        let mut n = 0;
        for p in pools.iter().filter(|p| !p.persistent && p.shared.is_none()) {
            n += self.drain(p);
        }
        n
    }

    fn release(&self, account: &Account, cost: u64) {
        account.used.fetch_sub(cost, Relaxed);
        self.used.fetch_sub(cost, Relaxed);
    }

    /// Bookkeeping for a page that left `pool`: its charge is released, gauges go down.
    fn forget(&self, pool: &Pool, p: &Payload) {
        let cost = pool.cost(p);
        self.release(&pool.account, cost);
        pool.gauge(p, cost, false);
    }

    /// Charges `cost` to `account` and the global total, evicting ephemeral pages if needed.
    fn reserve(&self, account: &Arc<Account>, cost: u64) -> Result<()> {
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
            if prev + cost > self.limit.load(Relaxed) {
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
    fn evict_global(&self, n: usize) -> usize {
        let victim = {
            let accounts = self.accounts.read();
            accounts
                .iter()
                .filter(|a| a.ephemeral_pages.load(Relaxed) > 0)
                .max_by_key(|a| {
                    // used / weight, compared without division.
                    let used = a.used.load(Relaxed) as u128;
                    used * 1_000_000 / a.weight.load(Relaxed).max(1) as u128
                })
                .cloned()
        };
        victim.map_or(0, |a| self.evict_from(&a, n))
    }

    /// Evicts up to `n` ephemeral pages charged to `account`, oldest first per shard.
    fn evict_from(&self, account: &Account, n: usize) -> usize {
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
        // Visit pools round-robin; within a pool, shards round-robin, one page per visit.
        let mut idle_visits = 0;
        let mut i = start;
        while evicted < n && idle_visits < pools.len() * SHARDS {
            let pool = &pools[i % pools.len()];
            i += 1;
            if self.evict_one(pool) {
                evicted += 1;
                idle_visits = 0;
            } else {
                idle_visits += 1;
            }
        }
        evicted
    }

    fn evict_one(&self, pool: &Pool) -> bool {
        let si = pool.evict_cursor.fetch_add(1, Relaxed) % SHARDS;
        let removed = {
            let mut shard = pool.shards[si].lock();
            let Shard { objects, lru, .. } = &mut *shard;
            let mut removed = None;
            while let Some(r) = lru.pop_front() {
                let Some(obj) = objects.get_mut(&r.oid) else {
                    continue;
                };
                if obj.get(&r.index).is_some_and(|e| e.stamp == r.stamp) {
                    removed = obj.remove(&r.index);
                    if obj.is_empty() {
                        objects.remove(&r.oid);
                    }
                    break;
                }
            }
            shard.live -= removed.is_some() as usize;
            removed
        };
        let Some(e) = removed else {
            return false;
        };
        self.forget(pool, &e.payload);
        Counters::inc(&pool.account.counters.evictions);
        Counters::inc(&pool.counters.evictions);
        true
    }

    /// Removes every page of a pool; returns how many there were.
    fn drain(&self, pool: &Pool) -> u64 {
        let mut n = 0;
        for shard in pool.shards.iter() {
            let taken = {
                let mut s = shard.lock();
                s.lru.clear();
                s.live = 0;
                std::mem::take(&mut s.objects)
            };
            for (_, obj) in taken {
                for (_, e) in obj {
                    self.forget(pool, &e.payload);
                    n += 1;
                }
            }
        }
        n
    }

    fn kill_pool(&self, pool: &Pool) -> u64 {
        // Under every shard lock in turn, so that a racing put sees `dead` before inserting.
        for shard in pool.shards.iter() {
            let _g = shard.lock();
            pool.dead.store(true, Relaxed);
        }
        self.drain(pool)
    }

    fn release_shared_pool(&self, uuid: &Uuid, pool: &Arc<Pool>) {
        if pool.members.fetch_sub(1, Relaxed) != 1 {
            return;
        }
        let mut shared = self.shared.lock();
        // A client may have joined again since; only the last member tears it down.
        if pool.members.load(Relaxed) != 0 {
            return;
        }
        shared.remove(uuid);
        drop(shared);
        let n = self.kill_pool(pool);
        self.accounts
            .write()
            .retain(|a| !Arc::ptr_eq(a, &pool.account));
        tracing::info!(uuid = %format_uuid(uuid), pages = n, "shared pool destroyed: no members left");
    }

    fn new_pool(&self, spec: PoolSpec, compressor: Compressor, account: Arc<Account>) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            persistent: spec.persistent,
            shared: spec.shared,
            compressor,
            account: account.clone(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            evict_cursor: AtomicUsize::new(0),
            dead: AtomicBool::new(false),
            members: AtomicU64::new(1),
            counters: Counters::default(),
        });
        if !spec.persistent {
            account.pools.lock().push(Arc::downgrade(&pool));
        }
        pool
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> StoreStats {
        let clients = self.clients.read().clone();
        let mut out = Vec::new();
        for c in clients {
            let pools = c.pools.read().clone();
            let pools = pools
                .iter()
                .enumerate()
                .filter_map(|(id, p)| p.as_ref().map(|p| (id, p)))
                .map(|(id, p)| PoolStats {
                    id: id as u32,
                    kind: if p.persistent {
                        "persistent"
                    } else {
                        "ephemeral"
                    }
                    .into(),
                    shared: p.shared.as_ref().map(format_uuid),
                    compressor: p.compressor.to_string(),
                    counters: p.counters.snapshot(),
                })
                .collect();
            out.push(ClientStats {
                name: c.name.clone(),
                connected: c.connected.load(Relaxed),
                frozen: c.frozen.load(Relaxed),
                weight: c.account.weight.load(Relaxed),
                quota_bytes: c.account.quota.load(Relaxed),
                compressor: c.compressor.to_string(),
                counters: {
                    let mut k = c.counters.snapshot();
                    let a = c.account.counters.snapshot();
                    k.add_gauges(&a);
                    k.evictions = a.evictions;
                    k
                },
                pools,
            });
        }
        let shared_pools = self
            .shared
            .lock()
            .iter()
            .filter_map(|(u, w)| w.upgrade().map(|p| (*u, p)))
            .map(|(u, p)| SharedPoolStats {
                uuid: format_uuid(&u),
                members: p.members.load(Relaxed),
                counters: p.counters.snapshot(),
            })
            .collect();
        StoreStats {
            memory_limit_bytes: self.limit.load(Relaxed),
            memory_used_bytes: self.used.load(Relaxed),
            metadata_bytes_per_page: ENTRY_META,
            ephemeral_extra_metadata_bytes_per_page: LRU_META,
            clients: out,
            shared_pools,
        }
    }
}

impl Engine {
    /// Removes one key; returns whether it was there.
    fn remove_key(&self, pool: &Pool, oid: &Oid, index: u64) -> bool {
        let e = {
            let mut shard = pool.shard(oid, index).lock();
            let Some(obj) = shard.objects.get_mut(oid) else {
                return false;
            };
            let e = obj.remove(&index);
            if obj.is_empty() {
                shard.objects.remove(oid);
            }
            shard.live -= e.is_some() as usize;
            e
        };
        match e {
            Some(e) => {
                self.forget(pool, &e.payload);
                true
            }
            None => false,
        }
    }

    fn refuse(&self, client: &Client, pool: &Pool, oid: &Oid, index: u64, err: Error) -> Error {
        // Never leave an older copy behind a failed put: a later get would return stale data.
        self.remove_key(pool, oid, index);
        Counters::inc(&client.counters.puts_refused);
        Counters::inc(&pool.counters.puts_refused);
        err
    }
}

impl Tmem for Engine {
    type Client = Arc<Client>;
    type Worker = Worker;

    fn new_worker(&self) -> Result<Worker> {
        Ok(Worker {
            codecs: Codecs::new()?,
        })
    }

    fn create_pool(&self, client: &Arc<Client>, spec: PoolSpec) -> Result<PoolId> {
        let pool = match spec.shared {
            None => self.new_pool(spec, client.compressor, client.account.clone()),
            Some(uuid) => {
                if spec.persistent {
                    // As in Xen: a persistent page must be returned to the guest that put it,
                    // which a pool any member can flush cannot promise.
                    return Err(Error::InvalidPool("shared pools must be ephemeral"));
                }
                if !client.shared_auth.read().contains(&uuid) {
                    return Err(Error::Denied(uuid));
                }
                let mut shared = self.shared.lock();
                match shared.get(&uuid).and_then(Weak::upgrade) {
                    Some(p) if !p.dead.load(Relaxed) => {
                        p.members.fetch_add(1, Relaxed);
                        p
                    }
                    _ => {
                        let account = Arc::new(Account::new(100, 0));
                        self.accounts.write().push(account.clone());
                        let p = self.new_pool(spec, self.cfg.compressor, account);
                        shared.insert(uuid, Arc::downgrade(&p));
                        p
                    }
                }
            }
        };
        let mut pools = client.pools.write();
        let slot = match pools.iter().position(Option::is_none) {
            Some(i) => i,
            None if pools.len() < self.cfg.max_pools => {
                pools.push(None);
                pools.len() - 1
            }
            None => {
                drop(pools);
                if let Some(uuid) = spec.shared {
                    self.release_shared_pool(&uuid, &pool);
                }
                return Err(Error::TooManyPools(self.cfg.max_pools));
            }
        };
        pools[slot] = Some(pool);
        Ok(slot as PoolId)
    }

    fn destroy_pool(&self, client: &Arc<Client>, id: PoolId) -> Result<()> {
        let pool = {
            let mut pools = client.pools.write();
            pools
                .get_mut(id as usize)
                .and_then(Option::take)
                .ok_or(Error::BadPool(id))?
        };
        match pool.shared {
            Some(uuid) => self.release_shared_pool(&uuid, &pool),
            None => {
                self.kill_pool(&pool);
            }
        }
        Ok(())
    }

    fn put(
        &self,
        worker: &mut Worker,
        client: &Arc<Client>,
        pool_id: PoolId,
        oid: &Oid,
        index: u64,
        page: &[u8],
    ) -> Result<()> {
        let pool = client.pool(pool_id)?;
        Counters::inc(&client.counters.puts);
        Counters::inc(&pool.counters.puts);
        if client.frozen.load(Relaxed) {
            return Err(self.refuse(client, &pool, oid, index, Error::Refused("client frozen")));
        }
        // Zero and same-filled pages never reach the codec.
        let payload = match codec::same_filled(page) {
            Some(w) => Payload::Same(w),
            None => match worker
                .codecs
                .compress(pool.compressor, page, self.cfg.raw_threshold)?
            {
                Some((enc, bytes)) => Payload::Stored(enc, bytes.into()),
                None if pool.persistent
                    || self.cfg.ephemeral_incompressible == IncompressiblePolicy::Store =>
                {
                    Payload::Stored(Encoding::Raw, page.into())
                }
                None => {
                    return Err(self.refuse(
                        client,
                        &pool,
                        oid,
                        index,
                        Error::Refused("incompressible ephemeral page"),
                    ))
                }
            },
        };
        let cost = pool.cost(&payload);
        if let Err(e) = self.reserve(&pool.account, cost) {
            return Err(self.refuse(client, &pool, oid, index, e));
        }
        let old = {
            let mut guard = pool.shard(oid, index).lock();
            if pool.dead.load(Relaxed) {
                drop(guard);
                self.release(&pool.account, cost);
                return Err(Error::BadPool(pool_id));
            }
            let shard = &mut *guard;
            shard.clock += 1;
            let stamp = shard.clock;
            let old = shard
                .objects
                .entry(*oid)
                .or_default()
                .insert(index, Entry { payload, stamp });
            shard.live += old.is_none() as usize;
            if !pool.persistent {
                shard.lru.push_back(LruRef {
                    oid: *oid,
                    index,
                    stamp,
                });
                compact_lru(shard);
            }
            // Gauges while the entry is still reachable through the guard.
            let e = &shard.objects[oid][&index];
            pool.gauge(&e.payload, cost, true);
            old
        };
        if let Some(old) = old {
            self.forget(&pool, &old.payload);
        }
        Ok(())
    }

    fn get(
        &self,
        worker: &mut Worker,
        client: &Arc<Client>,
        pool_id: PoolId,
        oid: &Oid,
        index: u64,
        out: &mut [u8],
        exclusive: bool,
    ) -> Result<GetHit> {
        let pool = client.pool(pool_id)?;
        Counters::inc(&client.counters.gets);
        Counters::inc(&pool.counters.gets);
        // Private ephemeral pages move back into the guest: keeping a copy would only waste
        // memory on a page the guest now caches itself.
        let exclusive = exclusive || (!pool.persistent && pool.shared.is_none());
        let result = if exclusive {
            let taken = {
                let mut shard = pool.shard(oid, index).lock();
                let taken = shard.objects.get_mut(oid).and_then(|o| o.remove(&index));
                if shard.objects.get(oid).is_some_and(HashMap::is_empty) {
                    shard.objects.remove(oid);
                }
                shard.live -= taken.is_some() as usize;
                taken
            };
            match taken {
                None => Err(Error::Miss),
                Some(e) => {
                    let r = decode(worker, &e.payload, out);
                    self.forget(&pool, &e.payload);
                    r.map(|()| GetHit { dropped: true })
                }
            }
        } else {
            let mut guard = pool.shard(oid, index).lock();
            let shard = &mut *guard;
            shard.clock += 1;
            let stamp = shard.clock;
            match shard.objects.get_mut(oid).and_then(|o| o.get_mut(&index)) {
                None => Err(Error::Miss),
                Some(e) => {
                    let r = decode(worker, &e.payload, out);
                    if !pool.persistent {
                        // A shared ephemeral hit makes the page recently used again.
                        e.stamp = stamp;
                        shard.lru.push_back(LruRef {
                            oid: *oid,
                            index,
                            stamp,
                        });
                        compact_lru(shard);
                    }
                    r.map(|()| GetHit { dropped: false })
                }
            }
        };
        match &result {
            Ok(_) => {
                Counters::inc(&client.counters.get_hits);
                Counters::inc(&pool.counters.get_hits);
            }
            Err(Error::Miss) => {
                Counters::inc(&client.counters.get_misses);
                Counters::inc(&pool.counters.get_misses);
            }
            Err(e) => {
                Counters::inc(&client.counters.get_errors);
                Counters::inc(&pool.counters.get_errors);
                tracing::error!(client = %client.name, pool = pool_id, index, "get failed: {e}");
            }
        }
        result
    }

    fn flush_page(
        &self,
        client: &Arc<Client>,
        pool_id: PoolId,
        oid: &Oid,
        index: u64,
    ) -> Result<()> {
        let pool = client.pool(pool_id)?;
        Counters::inc(&client.counters.flushes);
        Counters::inc(&pool.counters.flushes);
        if self.remove_key(&pool, oid, index) {
            Counters::inc(&client.counters.flushed_pages);
            Counters::inc(&pool.counters.flushed_pages);
            Ok(())
        } else {
            Err(Error::Miss)
        }
    }

    fn flush_object(&self, client: &Arc<Client>, pool_id: PoolId, oid: &Oid) -> Result<u64> {
        let pool = client.pool(pool_id)?;
        Counters::inc(&client.counters.flushes);
        Counters::inc(&pool.counters.flushes);
        let mut n = 0;
        // An object's pages are spread over every shard (in runs of 16 indexes).
        for shard in pool.shards.iter() {
            let Some(obj) = ({
                let mut s = shard.lock();
                let obj = s.objects.remove(oid);
                s.live -= obj.as_ref().map_or(0, HashMap::len);
                obj
            }) else {
                continue;
            };
            for (_, e) in obj {
                self.forget(&pool, &e.payload);
                n += 1;
            }
        }
        client.counters.flushed_pages.fetch_add(n, Relaxed);
        pool.counters.flushed_pages.fetch_add(n, Relaxed);
        Ok(n)
    }

    fn reset_client(&self, client: &Arc<Client>) {
        let pools: Vec<Arc<Pool>> = client.pools.write().drain(..).flatten().collect();
        let mut persistent = 0;
        let mut ephemeral = 0;
        for pool in pools {
            match pool.shared {
                Some(uuid) => self.release_shared_pool(&uuid, &pool),
                None => {
                    let n = self.kill_pool(&pool);
                    if pool.persistent {
                        persistent += n;
                    } else {
                        ephemeral += n;
                    }
                }
            }
        }
        if persistent + ephemeral > 0 {
            // Not silent: a guest that is gone cannot read its swap pages back, but say so.
            tracing::info!(
                client = %client.name,
                persistent_pages = persistent,
                ephemeral_pages = ephemeral,
                "client reset: freed its private pools"
            );
        }
    }
}

fn decode(worker: &mut Worker, p: &Payload, out: &mut [u8]) -> Result<()> {
    match p {
        Payload::Same(w) => {
            codec::fill_same(out, *w);
            Ok(())
        }
        Payload::Stored(enc, bytes) => Ok(worker.codecs.decompress(*enc, bytes, out)?),
    }
}

/// Drops stale LRU records once they outnumber live ones, so the queue stays O(live pages).
fn compact_lru(shard: &mut Shard) {
    if shard.lru.len() < 64 || shard.lru.len() < 2 * shard.live {
        return;
    }
    let objects = &shard.objects;
    shard.lru.retain(|r| {
        objects
            .get(&r.oid)
            .and_then(|o| o.get(&r.index))
            .is_some_and(|e| e.stamp == r.stamp)
    });
}

#[cfg(test)]
mod tests;
