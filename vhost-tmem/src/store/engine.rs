// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-memory tmem engine.
//!
//! Layout: a client holds up to `max_pools` pools; a pool is split into shards, each a mutex
//! over `oid -> run -> Run` maps, where a run is 16 consecutive page indexes of one object. A
//! run holds a 16-bit presence mask and its pages' 16-byte slots in index order, so a densely
//! used run costs 16 bytes per page plus its share of one map entry. Runs hash to shards, so
//! requests from different workers rarely meet on a lock and no lock is global; flushing an
//! object visits each shard once. The hash is keyed per pool
//! with random seeds because keys are chosen by untrusted guests.
//!
//! Memory: every byte is charged to the pool's account (the client's, or the shared pool's
//! own) and to the global total: a page's payload (rounded to the allocator's 16-byte granule)
//! and slot capacity, a run's map entry and, for ephemeral pools, its LRU records. A put
//! reserves the most it can cost before taking the shard lock and gives back what it did not
//! use, so usage never passes the limit. A put that would exceed the client's quota or the
//! global limit first evicts ephemeral pages: from its own account when over quota, otherwise
//! from the account that uses the most memory relative to its weight. If nothing can be
//! evicted the put fails with `NoSpace`; persistent pages are never evicted.
//!
//! Eviction order is LRU of runs within a shard and round-robin across an account's pools and
//! shards: an approximation of Xen's global LRU that needs no global list. A run is evicted
//! whole (up to 16 pages), which is also the eviction batch.
//!
//! Gauges (pages, bytes) and the per-pool request counters live in the shards, updated under
//! the lock the request holds anyway; only per-client counters are atomics on the hot path.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use shared_proto::{Oid, PAGE_SIZE};

use super::codec::{self, Codecs, Compressor, Encoding};
use super::slot::{Payload, Slot};
use super::stats::{
    ClientStats, CounterSnapshot, Counters, PoolStats, SharedPoolStats, StoreStats,
};
use super::{format_uuid, Error, GetHit, PoolId, PoolSpec, Result, Tmem, Uuid};

/// Shards per pool: a power of two, a few times the number of worker threads.
const SHARDS: usize = 16;
/// log2 of the pages in a run.
const RUN_SHIFT: u32 = 4;
/// Pages in a run.
const RUN_PAGES: usize = 1 << RUN_SHIFT;
/// Pages evicted per round when room is needed (at least; runs go whole).
const EVICT_BATCH: usize = 16;
/// Rounds of evict-and-retry before a put gives up.
const RESERVE_ROUNDS: usize = 64;

/// Charged per slot of a run's slot vector (by capacity).
const SLOT_BYTES: u64 = std::mem::size_of::<Slot>() as u64;
/// Charged per run in an object's run map: its entry (key, run, control byte) at the lowest
/// load factor the map keeps (7/16, just after it grows), so the charge covers what is
/// allocated, small maps' minimum sizes included.
const RUN_META: u64 = ((std::mem::size_of::<(u64, Run)>() + 1) * 16 / 7) as u64;
/// Charged per object per shard: its entry in the shard's object map (an object's single run
/// lives in it), at the same load factor.
const OBJ_META: u64 = ((std::mem::size_of::<(Oid, Object)>() + 1) * 16 / 7) as u64;
/// Charged per run of an ephemeral pool: LRU records (compaction keeps them under two per
/// run, see `compact_lru`).
const LRU_META: u64 = 2 * std::mem::size_of::<LruRef>() as u64;
/// The most a put can add besides its payload: a new object, an object's single run moving
/// into a map with the new run beside it, an LRU share, or the slot vector growing from 8 to 16.
const MAX_STRUCT_COST: u64 = OBJ_META + 2 * RUN_META + LRU_META + RUN_PAGES as u64 * SLOT_BYTES;

/// A payload's charge: allocations come in 16-byte granules.
fn payload_cost(len: usize) -> u64 {
    (len as u64).div_ceil(16) * 16
}

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
    /// Ephemeral runs held, so that eviction can skip accounts with nothing to give.
    ephemeral_runs: AtomicU64,
    /// Ephemeral pools charged here, in eviction rotation.
    pools: Mutex<Vec<Weak<Pool>>>,
    cursor: AtomicUsize,
    /// Pages evicted from this account.
    evictions: AtomicU64,
}

impl Account {
    fn new(weight: u32, quota: u64) -> Self {
        Account {
            weight: AtomicU32::new(weight.max(1)),
            quota: AtomicU64::new(quota),
            used: AtomicU64::new(0),
            ephemeral_runs: AtomicU64::new(0),
            pools: Mutex::new(Vec::new()),
            cursor: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
        }
    }
}

/// A run's key: the object and the run number (index >> RUN_SHIFT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RunKey {
    oid: Oid,
    run: u64,
}

impl Hash for RunKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Four words, without the slice length `[u64; 3]` would add.
        h.write_u64(self.oid[0]);
        h.write_u64(self.oid[1]);
        h.write_u64(self.oid[2]);
        h.write_u64(self.run);
    }
}

/// A keyed multiply-fold hasher: a few nanoseconds for a run key where SipHash takes tens,
/// seeded per pool from the process's random source so guests cannot aim at one bucket.
#[derive(Clone, Copy, Debug)]
struct KeyedHasher {
    h: u64,
    k: u64,
}

const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

fn fold(a: u64, b: u64) -> u64 {
    let p = (a as u128).wrapping_mul(b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Hasher for KeyedHasher {
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.h = fold(self.h ^ x, self.k);
    }

    fn finish(&self) -> u64 {
        fold(self.h, MUL ^ self.k).rotate_left(23)
    }
}

/// Per-pool random seeds for [`KeyedHasher`].
#[derive(Clone, Copy, Debug)]
struct KeyedState {
    seed: u64,
    k: u64,
}

impl KeyedState {
    fn new() -> Self {
        let r = RandomState::new();
        KeyedState {
            seed: r.hash_one(1u64),
            // Odd, so the multiplication loses nothing.
            k: r.hash_one(2u64) | 1,
        }
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            h: self.seed,
            k: self.k,
        }
    }
}

/// Up to 16 consecutive pages of one object.
#[derive(Debug, Default)]
struct Run {
    /// Bit i: page `run * 16 + i` is stored, at `slots[popcount(present below i)]`.
    present: u16,
    /// LRU stamp of this run's newest record (ephemeral pools).
    stamp: u64,
    slots: Vec<Slot>,
}

impl Run {
    fn pos(&self, bit: u32) -> usize {
        (self.present & ((1u16 << bit) - 1)).count_ones() as usize
    }

    fn get(&self, bit: u32) -> Option<&Slot> {
        (self.present & (1 << bit) != 0).then(|| &self.slots[self.pos(bit)])
    }

    fn take(&mut self, bit: u32) -> Option<Slot> {
        if self.present & (1 << bit) == 0 {
            return None;
        }
        let at = self.pos(bit);
        self.present &= !(1 << bit);
        Some(self.slots.remove(at))
    }
}

/// An LRU record; stale when the run's stamp has moved on or the run is gone.
#[derive(Debug)]
struct LruRef {
    key: RunKey,
    stamp: u64,
}

/// Gauges and request counters of the pages in one shard.
#[derive(Debug, Default, Clone, Copy)]
struct ShardCounts {
    puts: u64,
    gets: u64,
    get_hits: u64,
    get_misses: u64,
    flushes: u64,
    flushed_pages: u64,
    stored_pages: u64,
    same_filled_pages: u64,
    raw_pages: u64,
    compressed_bytes: u64,
    /// Everything charged for this shard: payloads and structure.
    memory_used: u64,
    /// The payloads' part of `memory_used`.
    payload_charged: u64,
}

impl ShardCounts {
    fn page(&mut self, s: &Slot, add: bool) {
        let (same, raw, bytes) = match s.payload() {
            Payload::Same(_) => (1, 0, 0),
            Payload::Stored(e, b) => (0, (e == Encoding::Raw) as u64, b.len() as u64),
        };
        let cost = payload_cost(s.len());
        if add {
            self.stored_pages += 1;
            self.same_filled_pages += same;
            self.raw_pages += raw;
            self.compressed_bytes += bytes;
            self.memory_used += cost;
            self.payload_charged += cost;
        } else {
            self.stored_pages -= 1;
            self.same_filled_pages -= same;
            self.raw_pages -= raw;
            self.compressed_bytes -= bytes;
            self.memory_used -= cost;
            self.payload_charged -= cost;
        }
    }
}

/// An object's runs within one shard. Most objects of a page cache are small files with a
/// single run: it is kept inline, where a map of one entry would cost a few hundred bytes.
/// An object that gets a second run moves to a map and stays there until it is gone.
#[derive(Debug)]
enum Object {
    One(u64, Run),
    Many(HashMap<u64, Run, KeyedState>),
}

impl Object {
    fn get(&self, run: u64) -> Option<&Run> {
        match self {
            Object::One(r, x) => (*r == run).then_some(x),
            Object::Many(m) => m.get(&run),
        }
    }

    fn get_mut(&mut self, run: u64) -> Option<&mut Run> {
        match self {
            Object::One(r, x) => (*r == run).then_some(x),
            Object::Many(m) => m.get_mut(&run),
        }
    }

    /// The run numbered `run`, created empty if missing; and the map charge that added
    /// (`RUN_META` for each run that now sits in a map and did not before).
    fn run_or_insert(&mut self, run: u64, h: KeyedState) -> (&mut Run, u64) {
        let mut charge = 0;
        if let Object::One(r, x) = self {
            if *r != run {
                let mut m = HashMap::with_capacity_and_hasher(2, h);
                m.insert(*r, std::mem::take(x));
                *self = Object::Many(m);
                charge += RUN_META;
            }
        }
        match self {
            Object::One(_, x) => (x, charge),
            Object::Many(m) => {
                let x = m.entry(run).or_insert_with(|| {
                    charge += RUN_META;
                    Run::default()
                });
                (x, charge)
            }
        }
    }

    /// The object's run numbers.
    fn runs(&self) -> Vec<u64> {
        match self {
            Object::One(r, _) => vec![*r],
            Object::Many(m) => m.keys().copied().collect(),
        }
    }
}

#[derive(Debug)]
struct Shard {
    objects: HashMap<Oid, Object, KeyedState>,
    /// Runs in `objects`, so that LRU compaction needs no count.
    runs: usize,
    lru: VecDeque<LruRef>,
    clock: u64,
    counts: ShardCounts,
}

impl Shard {
    fn new(h: KeyedState) -> Self {
        Shard {
            objects: HashMap::with_hasher(h),
            runs: 0,
            lru: VecDeque::new(),
            clock: 0,
            counts: ShardCounts::default(),
        }
    }

    fn run_mut(&mut self, key: &RunKey) -> Option<&mut Run> {
        self.objects.get_mut(&key.oid)?.get_mut(key.run)
    }
}

/// A pool. Shared pools are one `Pool` referenced by every member client.
#[derive(Debug)]
struct Pool {
    persistent: bool,
    shared: Option<Uuid>,
    compressor: Compressor,
    account: Arc<Account>,
    shards: Box<[Mutex<Shard>]>,
    hasher: KeyedState,
    evict_cursor: AtomicUsize,
    /// Set once the pool is destroyed; puts that raced with it must not insert.
    dead: AtomicBool,
    members: AtomicU64,
    /// The rare events, counted outside the shard locks.
    counters: Counters,
}

impl Pool {
    fn shard(&self, key: &RunKey) -> &Mutex<Shard> {
        let h = self.hasher.hash_one(key);
        // High bits: hashbrown uses the low ones for buckets and the top 7 for tags.
        &self.shards[(h >> 40) as usize & (SHARDS - 1)]
    }

    /// A run's charge wherever it sits: its LRU share (ephemeral pools).
    fn run_cost(&self) -> u64 {
        if self.persistent {
            0
        } else {
            LRU_META
        }
    }

    /// The pool's counters, and the payload part of its memory use.
    fn snapshot(&self) -> (CounterSnapshot, u64) {
        let mut k = self.counters.snapshot();
        let mut payload = 0;
        for s in self.shards.iter() {
            let c = s.lock().counts;
            payload += c.payload_charged;
            k.puts += c.puts;
            k.gets += c.gets;
            k.get_hits += c.get_hits;
            k.get_misses += c.get_misses;
            k.flushes += c.flushes;
            k.flushed_pages += c.flushed_pages;
            k.stored_pages += c.stored_pages;
            k.same_filled_pages += c.same_filled_pages;
            k.raw_pages += c.raw_pages;
            k.compressed_bytes += c.compressed_bytes;
            k.memory_used += c.memory_used;
        }
        (k, payload)
    }
}

fn key_of(oid: &Oid, index: u64) -> (RunKey, u32) {
    (
        RunKey {
            oid: *oid,
            run: index >> RUN_SHIFT,
        },
        (index & (RUN_PAGES as u64 - 1)) as u32,
    )
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
    /// The shrink request its device advertises in config space, in pages (`u64::MAX`:
    /// none). Kept here, not in the device, so that it outlives reconnections.
    shrink_target: AtomicU64,
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

    /// The shrink request for the client's driver, in pages (`u64::MAX`: none).
    pub fn shrink_target(&self) -> u64 {
        self.shrink_target.load(Relaxed)
    }

    /// Asks the client's driver to shrink to `pages` (`u64::MAX`: no request).
    pub fn set_shrink_target(&self, pages: u64) {
        self.shrink_target.store(pages, Relaxed);
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
            shrink_target: AtomicU64::new(u64::MAX),
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
        if cost > 0 {
            account.used.fetch_sub(cost, Relaxed);
            self.used.fetch_sub(cost, Relaxed);
        }
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
    fn evict_one(&self, pool: &Pool) -> usize {
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
    fn drain(&self, pool: &Pool) -> u64 {
        let mut n = 0;
        for shard in pool.shards.iter() {
            let (taken, freed, runs) = {
                let mut s = shard.lock();
                s.lru.clear();
                let runs = std::mem::take(&mut s.runs) as u64;
                let freed = s.counts.memory_used;
                n += s.counts.stored_pages;
                let (puts, gets, get_hits, get_misses, flushes, flushed_pages) = {
                    let k = &s.counts;
                    (
                        k.puts,
                        k.gets,
                        k.get_hits,
                        k.get_misses,
                        k.flushes,
                        k.flushed_pages,
                    )
                };
                // Gauges go to zero; request counters stay.
                s.counts = ShardCounts {
                    puts,
                    gets,
                    get_hits,
                    get_misses,
                    flushes,
                    flushed_pages,
                    ..ShardCounts::default()
                };
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
        let hasher = KeyedState::new();
        let pool = Arc::new(Pool {
            persistent: spec.persistent,
            shared: spec.shared,
            compressor,
            account: account.clone(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(hasher)))
                .collect(),
            hasher,
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
        let (mut pages, mut meta) = (0u64, 0u64);
        for c in clients {
            let pools = c.pools.read().clone();
            let mut counters = c.counters.snapshot();
            counters.evictions = c.account.evictions.load(Relaxed);
            let pools = pools
                .iter()
                .enumerate()
                .filter_map(|(id, p)| p.as_ref().map(|p| (id, p)))
                .map(|(id, p)| {
                    let (k, payload) = p.snapshot();
                    if p.shared.is_none() {
                        // The client's gauges cover its private pools.
                        counters.add_gauges(&k);
                        pages += k.stored_pages;
                        meta += k.memory_used - payload;
                    }
                    PoolStats {
                        id: id as u32,
                        kind: if p.persistent {
                            "persistent"
                        } else {
                            "ephemeral"
                        }
                        .into(),
                        shared: p.shared.as_ref().map(format_uuid),
                        compressor: p.compressor.to_string(),
                        counters: k,
                    }
                })
                .collect();
            out.push(ClientStats {
                name: c.name.clone(),
                connected: c.connected.load(Relaxed),
                frozen: c.frozen.load(Relaxed),
                weight: c.account.weight.load(Relaxed),
                quota_bytes: c.account.quota.load(Relaxed),
                compressor: c.compressor.to_string(),
                counters,
                pools,
            });
        }
        let shared_pools = self
            .shared
            .lock()
            .iter()
            .filter_map(|(u, w)| w.upgrade().map(|p| (*u, p)))
            .map(|(u, p)| {
                let (k, payload) = p.snapshot();
                pages += k.stored_pages;
                meta += k.memory_used - payload;
                SharedPoolStats {
                    uuid: format_uuid(&u),
                    members: p.members.load(Relaxed),
                    counters: k,
                }
            })
            .collect();
        StoreStats {
            memory_limit_bytes: self.limit.load(Relaxed),
            memory_used_bytes: self.used.load(Relaxed),
            metadata_bytes_per_page: if pages == 0 {
                0.0
            } else {
                (meta as f64 / pages as f64 * 10.0).round() / 10.0
            },
            clients: out,
            shared_pools,
        }
    }
}

/// Takes a whole run out of a shard with its bookkeeping; returns it and the bytes it had
/// charged (payloads and structure), to release once the lock is dropped.
fn remove_run(pool: &Pool, sh: &mut Shard, key: &RunKey) -> Option<(Run, u64)> {
    let obj = sh.objects.get_mut(&key.oid)?;
    let (run, mut freed, emptied) = match obj {
        Object::One(r, _) if *r != key.run => return None,
        Object::One(_, x) => (std::mem::take(x), 0, true),
        Object::Many(m) => {
            let run = m.remove(&key.run)?;
            (run, RUN_META, m.is_empty())
        }
    };
    if emptied {
        sh.objects.remove(&key.oid);
        freed += OBJ_META;
    }
    freed += pool.run_cost() + run.slots.capacity() as u64 * SLOT_BYTES;
    sh.counts.memory_used -= freed;
    for s in &run.slots {
        sh.counts.page(s, false);
        freed += payload_cost(s.len());
    }
    sh.runs -= 1;
    if !pool.persistent {
        pool.account.ephemeral_runs.fetch_sub(1, Relaxed);
    }
    Some((run, freed))
}

/// Takes one page out of a shard with its bookkeeping (the run and object go when empty);
/// returns it and the bytes to release once the lock is dropped.
fn take_page(pool: &Pool, sh: &mut Shard, key: &RunKey, bit: u32) -> Option<(Slot, u64)> {
    let run = sh.run_mut(key)?;
    let slot = run.take(bit)?;
    let emptied = run.present == 0;
    sh.counts.page(&slot, false);
    let mut freed = payload_cost(slot.len());
    if emptied {
        let (_, f) = remove_run(pool, sh, key).expect("the run is there");
        freed += f;
    }
    Some((slot, freed))
}

impl Engine {
    /// Removes one key; returns whether it was there.
    fn remove_key(&self, pool: &Pool, oid: &Oid, index: u64) -> bool {
        let (key, bit) = key_of(oid, index);
        let taken = take_page(pool, &mut pool.shard(&key).lock(), &key, bit);
        match taken {
            Some((slot, freed)) => {
                drop(slot);
                self.release(&pool.account, freed);
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
        Counters::inc(&pool.counters.puts);
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
        if client.frozen.load(Relaxed) {
            return Err(self.refuse(client, &pool, oid, index, Error::Refused("client frozen")));
        }
        // Zero and same-filled pages never reach the codec.
        let slot = match codec::same_filled(page) {
            Some(w) => Slot::same(w),
            None => match worker
                .codecs
                .compress(pool.compressor, page, self.cfg.raw_threshold)?
            {
                Some((enc, bytes)) => Slot::stored(enc, bytes),
                None if pool.persistent
                    || self.cfg.ephemeral_incompressible == IncompressiblePolicy::Store =>
                {
                    Slot::stored(Encoding::Raw, page)
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
        let reserved = payload_cost(slot.len()) + MAX_STRUCT_COST;
        if let Err(e) = self.reserve(&pool.account, reserved) {
            return Err(self.refuse(client, &pool, oid, index, e));
        }
        let (key, bit) = key_of(oid, index);
        let (old, used) = {
            let mut g = pool.shard(&key).lock();
            if pool.dead.load(Relaxed) {
                drop(g);
                self.release(&pool.account, reserved);
                return Err(Error::BadPool(pool_id));
            }
            let sh = &mut *g;
            sh.counts.puts += 1;
            // Structure this put adds: object entry, run map entries, LRU share, slot capacity.
            let mut structure = 0;
            let obj = sh.objects.entry(*oid).or_insert_with(|| {
                structure += OBJ_META;
                Object::One(key.run, Run::default())
            });
            let (run, map_charge) = obj.run_or_insert(key.run, pool.hasher);
            structure += map_charge;
            // Runs leave the store when their last page does: an empty one is new.
            let new_run = run.present == 0;
            if new_run {
                structure += pool.run_cost();
            }
            let cap = run.slots.capacity();
            let at = run.pos(bit);
            let old = if run.present & (1 << bit) != 0 {
                Some(std::mem::replace(&mut run.slots[at], slot))
            } else {
                // A run's first page gets a slot vector of one, not the default four: runs
                // of one page are common (small files, scattered swap slots).
                run.slots.reserve_exact(usize::from(run.slots.is_empty()));
                run.slots.insert(at, slot);
                run.present |= 1 << bit;
                None
            };
            structure += (run.slots.capacity() - cap) as u64 * SLOT_BYTES;
            let mut push = None;
            if !pool.persistent {
                // A run recorded recently is near the LRU's tail already: skip the record, so
                // a run filled page by page costs one record, not sixteen.
                let window = (sh.runs as u64 / 4).max(8);
                if run.stamp == 0 || sh.clock - run.stamp >= window {
                    sh.clock += 1;
                    run.stamp = sh.clock;
                    push = Some(sh.clock);
                }
            }
            let added = payload_cost(run.slots[at].len());
            sh.counts.page(&run.slots[at], true);
            sh.counts.memory_used += structure;
            if let Some(o) = &old {
                sh.counts.page(o, false);
            }
            if new_run {
                sh.runs += 1;
                if !pool.persistent {
                    pool.account.ephemeral_runs.fetch_add(1, Relaxed);
                }
            }
            if let Some(stamp) = push {
                sh.lru.push_back(LruRef { key, stamp });
                compact_lru(sh);
            }
            (old, added + structure)
        };
        let freed = old.as_ref().map_or(0, |o| payload_cost(o.len()));
        drop(old);
        self.release(&pool.account, reserved - used + freed);
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
        // Private ephemeral pages move back into the guest: keeping a copy would only waste
        // memory on a page the guest now caches itself.
        let exclusive = exclusive || (!pool.persistent && pool.shared.is_none());
        let (key, bit) = key_of(oid, index);
        let result = if exclusive {
            let taken = {
                let mut g = pool.shard(&key).lock();
                g.counts.gets += 1;
                let t = take_page(&pool, &mut g, &key, bit);
                if t.is_some() {
                    g.counts.get_hits += 1;
                } else {
                    g.counts.get_misses += 1;
                }
                t
            };
            match taken {
                None => Err(Error::Miss),
                Some((slot, freed)) => {
                    let r = decode(worker, &slot, out);
                    drop(slot);
                    self.release(&pool.account, freed);
                    r.map(|()| GetHit { dropped: true })
                }
            }
        } else {
            let mut g = pool.shard(&key).lock();
            let sh = &mut *g;
            sh.counts.gets += 1;
            let window = (sh.runs as u64 / 4).max(8);
            let found = sh.objects.get_mut(oid).and_then(|o| o.get_mut(key.run));
            let hit = found.and_then(|run| {
                let r = decode(worker, run.get(bit)?, out);
                Some((run, r))
            });
            match hit {
                None => {
                    sh.counts.get_misses += 1;
                    Err(Error::Miss)
                }
                Some((run, r)) => {
                    let mut push = None;
                    if !pool.persistent && sh.clock - run.stamp >= window {
                        // A shared ephemeral hit makes the run recently used again.
                        sh.clock += 1;
                        run.stamp = sh.clock;
                        push = Some(sh.clock);
                    }
                    sh.counts.get_hits += 1;
                    if let Some(stamp) = push {
                        sh.lru.push_back(LruRef { key, stamp });
                        compact_lru(sh);
                    }
                    r.map(|()| GetHit { dropped: false })
                }
            }
        };
        match &result {
            Ok(_) => Counters::inc(&client.counters.get_hits),
            Err(Error::Miss) => Counters::inc(&client.counters.get_misses),
            Err(e) => {
                // The lookup counted a hit; the page could not be returned.
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
        let (key, bit) = key_of(oid, index);
        let taken = {
            let mut g = pool.shard(&key).lock();
            g.counts.flushes += 1;
            let t = take_page(&pool, &mut g, &key, bit);
            g.counts.flushed_pages += t.is_some() as u64;
            t
        };
        match taken {
            Some((slot, freed)) => {
                drop(slot);
                self.release(&pool.account, freed);
                Counters::inc(&client.counters.flushed_pages);
                Ok(())
            }
            None => Err(Error::Miss),
        }
    }

    fn flush_object(&self, client: &Arc<Client>, pool_id: PoolId, oid: &Oid) -> Result<u64> {
        let pool = client.pool(pool_id)?;
        Counters::inc(&client.counters.flushes);
        Counters::inc(&pool.counters.flushes);
        let mut n = 0;
        // An object's runs are spread over every shard.
        for shard in pool.shards.iter() {
            let (runs, freed) = {
                let mut g = shard.lock();
                let sh = &mut *g;
                let keys = match sh.objects.get(oid) {
                    Some(obj) => obj.runs(),
                    None => continue,
                };
                let mut runs = Vec::with_capacity(keys.len());
                let mut freed = 0;
                for run in keys {
                    let key = RunKey { oid: *oid, run };
                    let (r, f) = remove_run(&pool, sh, &key).expect("listed above");
                    n += r.slots.len() as u64;
                    sh.counts.flushed_pages += r.slots.len() as u64;
                    freed += f;
                    runs.push(r);
                }
                (runs, freed)
            };
            drop(runs);
            self.release(&pool.account, freed);
        }
        client.counters.flushed_pages.fetch_add(n, Relaxed);
        Ok(n)
    }

    fn shrink_target(&self, client: &Arc<Client>) -> u64 {
        client.shrink_target()
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

#[cfg(test)]
impl Engine {
    /// A pool's object entries over all shards, and how many of them hold a single run
    /// inline.
    fn object_shapes(&self, client: &Client, id: PoolId) -> (u64, u64) {
        let pool = client.pool(id).expect("a pool of the client");
        let mut shapes = (0, 0);
        for shard in pool.shards.iter() {
            for obj in shard.lock().objects.values() {
                shapes.0 += 1;
                shapes.1 += matches!(obj, Object::One(..)) as u64;
            }
        }
        shapes
    }
}

fn decode(worker: &mut Worker, s: &Slot, out: &mut [u8]) -> Result<()> {
    match s.payload() {
        Payload::Same(w) => {
            codec::fill_same(out, w);
            Ok(())
        }
        Payload::Stored(enc, bytes) => Ok(worker.codecs.decompress(enc, bytes, out)?),
    }
}

/// Drops stale LRU records once they outnumber live runs by half, so the queue stays
/// O(runs) and within what `LRU_META` charges.
fn compact_lru(sh: &mut Shard) {
    if sh.lru.len() < 64 || sh.lru.len() < sh.runs + sh.runs / 2 {
        return;
    }
    let objects = &sh.objects;
    sh.lru.retain(|r| {
        objects
            .get(&r.key.oid)
            .and_then(|o| o.get(r.key.run))
            .is_some_and(|run| run.stamp == r.stamp)
    });
    if sh.lru.capacity() > 4 * sh.lru.len().max(16) {
        sh.lru.shrink_to(2 * sh.lru.len());
    }
}

#[cfg(test)]
mod tests;
