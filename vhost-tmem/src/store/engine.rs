// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-memory tmem engine: clients, pools and the [`Tmem`] operations.
//!
//! Where pages live is in [`layout`](super::layout), how memory is charged and reclaimed in
//! [`budget`](super::budget), and what the control interface reports in [`stats`](super::stats).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use shared_proto::{Oid, PAGE_SIZE};

use super::budget::Budget;
#[cfg(test)]
use super::codec;
use super::codec::{Codecs, Compressor};
use super::counters::Counters;
use super::hash::KeyedState;
use super::layout::{
    count_page, due, key_of, payload_cost, remove_run, renew_shared, shared_bits, shared_bits_at,
    take_page, take_shared_page, Account, MemberLru, Pool, Rotation, RunKey, Shard,
    MAX_STRUCT_COST, RUN_PAGES, SHARDS, SHARED_PAGE_META,
};
use super::session::Session;
use super::slot::{Payload, Slot};
use super::{
    format_uuid, Error, GetHit, PageDst, PageKey, PageSrc, PoolId, PoolSpec, Result, Tmem, Uuid,
};

/// What happens to a page that does not compress below the raw threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncompressiblePolicy {
    /// Refuse it: an ephemeral page is reread from disk, a persistent one goes to the guest's
    /// swap device, so host memory is spent on pages that compress (as zswap does).
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
    /// A compressed page of this many bytes or more is incompressible: stored raw or refused,
    /// as the policy of its pool's kind says.
    pub raw_threshold: usize,
    /// Policy for incompressible ephemeral pages (default: refuse).
    pub ephemeral_incompressible: IncompressiblePolicy,
    /// Policy for incompressible persistent pages (default: store).
    pub persistent_incompressible: IncompressiblePolicy,
    /// Most pools per client.
    pub max_pools: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            memory_limit: super::DEFAULT_MEMORY_LIMIT,
            compressor: super::DEFAULT_COMPRESSOR,
            raw_threshold: super::DEFAULT_RAW_THRESHOLD,
            ephemeral_incompressible: IncompressiblePolicy::Refuse,
            persistent_incompressible: IncompressiblePolicy::Store,
            max_pools: super::DEFAULT_MAX_POOLS,
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
            weight: super::DEFAULT_WEIGHT,
            compressor: None,
            shared: Vec::new(),
        }
    }
}

/// Numbers clients for the life of the process, so that a worker's copy of a client's pool
/// table ([`PoolCache`]) is never taken for another client's.
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// A client's pools by id, with a generation that every change moves on: a worker's copy of
/// the table ([`PoolCache`]) sees it is stale from one load, so that a request takes neither
/// the table's lock nor a reference count.
#[derive(Debug, Default)]
pub(super) struct PoolTable {
    table: RwLock<Vec<Option<Arc<Pool>>>>,
    generation: AtomicU64,
}

impl PoolTable {
    pub(super) fn read(&self) -> RwLockReadGuard<'_, Vec<Option<Arc<Pool>>>> {
        self.table.read()
    }

    /// The table, to change. The generation moves on first: a request that still sees the
    /// old one is served as if it came before the change.
    pub(super) fn write(&self) -> RwLockWriteGuard<'_, Vec<Option<Arc<Pool>>>> {
        let t = self.table.write();
        self.generation.fetch_add(1, Release);
        t
    }
}

/// A worker's copy of the pool table of the client it served last.
#[derive(Debug, Default)]
struct PoolCache {
    /// That client's number (0: none yet).
    client: u64,
    /// The table's generation the copy is of, or an older one.
    generation: u64,
    pools: Vec<Option<Arc<Pool>>>,
}

impl PoolCache {
    /// Pool `id` of `client`, from the copy, refreshed if the table changed since. A pool
    /// destroyed since it was copied is dead (`Pool::dead`): puts into it are refused, and
    /// the copy lets it go at the next refresh.
    fn pool(&mut self, client: &Client, id: PoolId) -> Result<&Arc<Pool>> {
        // Loaded before the table is read: a change in between leaves an older generation
        // with the newer table, and the next request reads the table again.
        let generation = client.pools.generation.load(Acquire);
        if self.client != client.serial || self.generation != generation {
            self.pools.clone_from(&client.pools.read());
            self.client = client.serial;
            self.generation = generation;
        }
        self.pools
            .get(id as usize)
            .and_then(Option::as_ref)
            .ok_or(Error::BadPool(id))
    }
}

/// A client of the engine (one guest).
#[derive(Debug)]
pub struct Client {
    pub(super) name: String,
    /// Unique for the life of the process (`NEXT_CLIENT`).
    serial: u64,
    pub(super) compressor: Compressor,
    pub(super) account: Arc<Account>,
    shared_auth: RwLock<HashSet<Uuid>>,
    pub(super) frozen: AtomicBool,
    pub(super) connected: AtomicBool,
    pub(super) pools: PoolTable,
    pub(super) counters: Counters,
    /// The shrink request its device advertises in config space, in pages (`u64::MAX`:
    /// none). Kept here, not in the device, so that it outlives reconnections.
    shrink_target: AtomicU64,
    /// Whether its pools outlive its connection, and since when nobody claims them
    /// (`store/session.rs`).
    pub(super) session: Mutex<Session>,
    /// It holds pools restored from saved state that no frontend has seen yet: the first
    /// connection must find them (not reset them as stragglers of a previous one).
    pub(super) restored: AtomicBool,
}

impl Client {
    /// The client's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its quota in bytes (0: none).
    pub fn quota(&self) -> u64 {
        self.account.quota.load(Relaxed)
    }

    /// Its eviction weight.
    pub fn weight(&self) -> u32 {
        self.account.weight.load(Relaxed)
    }

    /// The compressor of its private pools.
    pub fn compressor(&self) -> Compressor {
        self.compressor
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

    /// Whether it holds restored pools that no frontend has connected to yet.
    pub fn restored(&self) -> bool {
        self.restored.load(Relaxed)
    }

    /// A frontend connected: restored pools are its own from now on.
    pub fn clear_restored(&self) {
        self.restored.store(false, Relaxed);
    }

    pub(super) fn pool(&self, id: PoolId) -> Result<Arc<Pool>> {
        self.pools
            .read()
            .get(id as usize)
            .and_then(|p| p.clone())
            .ok_or(Error::BadPool(id))
    }
}

/// What [`Engine::remove_client`] freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientRemoval {
    pub pools: u64,
    pub persistent_pages: u64,
    pub ephemeral_pages: u64,
    pub shared_pages: u64,
    pub bytes: u64,
}

/// The engine: see the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    pub(super) budget: Budget,
    pub(super) clients: RwLock<Vec<Arc<Client>>>,
    pub(super) shared: Mutex<HashMap<Uuid, Weak<Pool>>>,
    /// How long pools kept for a reconnect wait for their driver, in milliseconds
    /// (`u64::MAX`: for ever); see `store/session.rs`.
    pub(super) orphan_timeout_ms: AtomicU64,
}

/// Per-worker state of the engine.
#[derive(Debug)]
pub struct Worker {
    codecs: Codecs,
    pools: PoolCache,
}

impl Engine {
    /// A new, empty engine.
    pub fn new(cfg: EngineConfig) -> Self {
        Engine {
            budget: Budget::new(cfg.memory_limit),
            cfg,
            clients: RwLock::new(Vec::new()),
            shared: Mutex::new(HashMap::new()),
            orphan_timeout_ms: AtomicU64::new(super::session::timeout_ms(Some(
                super::DEFAULT_ORPHAN_TIMEOUT,
            ))),
        }
    }

    /// Adds a client. Names must be unique.
    pub fn add_client(&self, cfg: ClientConfig) -> Arc<Client> {
        let account = self.budget.new_client_account(cfg.weight, cfg.quota);
        let client = Arc::new(Client {
            name: cfg.name,
            serial: NEXT_CLIENT.fetch_add(1, Relaxed),
            compressor: cfg.compressor.unwrap_or(self.cfg.compressor),
            account,
            shared_auth: RwLock::new(cfg.shared.into_iter().collect()),
            frozen: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            pools: PoolTable::default(),
            counters: Counters::default(),
            shrink_target: AtomicU64::new(u64::MAX),
            session: Mutex::new(Session::default()),
            restored: AtomicBool::new(false),
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
        self.budget.used()
    }

    /// Resident bytes of the payload arena: payloads at their size class plus the free space
    /// of partly used chunks (which `memory_used` does not include but the limit does).
    pub fn payload_resident(&self) -> u64 {
        self.budget.arena.resident()
    }

    /// Changes the global limit; pages over it are evicted by later puts.
    pub fn set_memory_limit(&self, bytes: u64) {
        self.budget.set_limit(bytes);
    }

    /// Changes a client's weight.
    pub fn set_weight(&self, client: &Client, weight: u32) {
        self.budget.set_weight(&client.account, weight);
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

    /// The shared pools a client may join.
    pub fn shared_auth(&self, client: &Client) -> Vec<Uuid> {
        let mut v: Vec<Uuid> = client.shared_auth.read().iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Takes a client out of the engine and frees everything it holds: its pools (persistent
    /// ones too: the caller decided) and its pages in shared pools, which other members keep.
    /// Its frontend must be gone (no device uses it any more). Its account leaves the weights,
    /// so the other clients' shares return to what they were without it.
    pub fn remove_client(&self, client: &Arc<Client>) -> ClientRemoval {
        self.clients.write().retain(|c| !Arc::ptr_eq(c, client));
        let r = self.free_client(client);
        self.budget.retire(&client.account);
        r
    }

    /// Frees everything a client holds: its pools and its pages in shared pools.
    pub(super) fn free_client(&self, client: &Arc<Client>) -> ClientRemoval {
        let before = client.account.used.load(Relaxed);
        let mut r = ClientRemoval::default();
        let pools: Vec<Arc<Pool>> = client.pools.write().drain(..).flatten().collect();
        for pool in pools {
            r.pools += 1;
            match pool.shared {
                Some(uuid) => self.release_shared_pool(&uuid, &pool),
                None => {
                    let n = self.budget.kill_pool(&pool);
                    if pool.persistent {
                        r.persistent_pages += n;
                    } else {
                        r.ephemeral_pages += n;
                    }
                }
            }
        }
        // Shared pools it joined, also earlier connections': its pages there are its own.
        let shared: Vec<Arc<Pool>> = client
            .account
            .pools
            .lock()
            .iter()
            .filter_map(|r| r.pool.upgrade())
            .filter(|p| p.shared.is_some())
            .collect();
        for pool in shared {
            r.shared_pages += self.budget.drain_owner(&pool, client.account.id);
        }
        r.bytes = before.saturating_sub(client.account.used.load(Relaxed));
        r
    }

    /// Drops every ephemeral page of a client's private pools; returns how many.
    pub fn flush_client_ephemeral(&self, client: &Client) -> u64 {
        let pools: Vec<Arc<Pool>> = client.pools.read().iter().flatten().cloned().collect();
        let mut n = 0;
        for p in pools.iter().filter(|p| !p.persistent && p.shared.is_none()) {
            n += self.budget.drain(p);
        }
        n
    }

    pub(super) fn release_shared_pool(&self, uuid: &Uuid, pool: &Arc<Pool>) {
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
        let n = self.budget.kill_pool(pool);
        self.budget.forget_shared_pool(pool);
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
            held: Arc::new(AtomicU64::new(0)),
            member_held: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
            members: AtomicU64::new(1),
            counters: Counters::default(),
        });
        if !spec.persistent && spec.shared.is_none() {
            account.pools.lock().push(Rotation {
                pool: Arc::downgrade(&pool),
                held: pool.held.clone(),
            });
        }
        pool
    }
}

impl Engine {
    /// Removes one key; returns whether it was there. In a shared pool, only a page `client`
    /// put itself.
    fn remove_key(&self, client: &Client, pool: &Pool, page_key: &PageKey) -> bool {
        let (key, bit) = key_of(page_key);
        if pool.shared.is_some() {
            let taken = take_shared_page(
                &mut pool.shard(&key).lock(),
                &key,
                bit,
                Some(client.account.id),
            );
            return match taken {
                Some(t) => {
                    self.budget.release_shared(t.owner, t.charge, 1);
                    true
                }
                None => false,
            };
        }
        let taken = take_page(pool, &mut pool.shard(&key).lock(), &key, bit);
        match taken {
            Some((slot, freed)) => {
                drop(slot);
                self.budget.release_pool(pool, freed);
                true
            }
            None => false,
        }
    }

    fn count_get(
        &self,
        client: &Client,
        pool: &Pool,
        page_key: &PageKey,
        result: Result<GetHit>,
    ) -> Result<GetHit> {
        match &result {
            Ok(_) => Counters::inc(&client.counters.get_hits),
            Err(Error::Miss) => Counters::inc(&client.counters.get_misses),
            Err(e) => {
                // The lookup counted a hit; the page could not be returned.
                Counters::inc(&client.counters.get_errors);
                Counters::inc(&pool.counters.get_errors);
                tracing::error!(client = %client.name, pool = page_key.pool, index = page_key.index, "get failed: {e}");
            }
        }
        result
    }

    /// Stores a page in a shared pool, charged to `client`. First put wins: a key holds the
    /// content of its first put until that member flushes it (or it is evicted); a later put
    /// of the same content is accepted and changes nothing, one of other content is refused,
    /// counted, and leaves the stored page alone.
    fn put_shared(
        &self,
        client: &Client,
        pool: &Pool,
        page_key: &PageKey,
        slot: Slot,
        how: Insert,
    ) -> Result<()> {
        let me = client.account.id;
        let cost = payload_cost(slot.len()) + SHARED_PAGE_META;
        if let Err(e) = self
            .budget
            .reserve(&client.account, cost, false, how == Insert::Put)
        {
            return Err(self.refuse(client, pool, page_key, e, how));
        }
        let (key, bit) = key_of(page_key);
        enum Outcome {
            Agreed,
            Conflict,
        }
        let outcome = {
            let mut g = pool.shard(&key).lock();
            if pool.dead.load(Relaxed) {
                drop(g);
                self.budget.unreserve(&client.account, cost, false);
                return Err(Error::BadPool(page_key.pool));
            }
            let sh = &mut *g;
            sh.counts.puts += u64::from(how == Insert::Put);
            let window = (sh.runs.len() as u64 / 4).max(8);
            let Some((run, _)) = sh.runs.run_or_insert(&key) else {
                drop(g);
                self.budget.unreserve(&client.account, cost, false);
                return Err(self.refuse(client, pool, page_key, Error::NoSpace, how));
            };
            match run.get(bit) {
                // Same codec and settings for every member, and the codecs are deterministic:
                // equal content gives equal stored bytes.
                Some(old) if old.payload() == slot.payload() => Outcome::Agreed,
                Some(_) => Outcome::Conflict,
                None => {
                    let sr = sh.shared.entry(key).or_default();
                    let had = shared_bits(run, &sr.owners, Some(me)) != 0;
                    sr.owners[bit as usize] = me;
                    run.put(bit, slot);
                    // A member's first page in the run needs a record in its queue.
                    let renew = !had || due(sh.clock, sr.stamp, window);
                    count_page(
                        &mut sh.counts,
                        &mut sh.payload_charged,
                        run.get(bit).expect("just put"),
                        true,
                    );
                    sh.counts.memory_used += SHARED_PAGE_META;
                    // Under the lock, before anyone can take the page and count it out.
                    client.account.ephemeral_runs.fetch_add(1, Relaxed);
                    let m = match sh.members.entry(me) {
                        Entry::Occupied(o) => o.into_mut(),
                        Entry::Vacant(v) => v.insert(MemberLru {
                            lru: VecDeque::new(),
                            runs: 0,
                            // Its pages here counted in its rotation (made when it joined).
                            held: pool.member_held.lock().get(&me).cloned().expect("a member"),
                        }),
                    };
                    m.held.fetch_add(1, Relaxed);
                    m.runs += usize::from(!had);
                    if renew {
                        renew_shared(sh, key);
                    }
                    return Ok(());
                }
            }
        };
        self.budget.unreserve(&client.account, cost, false);
        match outcome {
            Outcome::Agreed => Ok(()),
            Outcome::Conflict if how == Insert::Restore => Err(Error::Refused(
                "differs from the shared page stored under this key",
            )),
            Outcome::Conflict => {
                Counters::inc(&client.counters.shared_put_conflicts);
                Counters::inc(&pool.counters.shared_put_conflicts);
                Counters::inc(&client.counters.puts_refused);
                Counters::inc(&pool.counters.puts_refused);
                Err(Error::Refused(
                    "differs from the shared page stored under this key",
                ))
            }
        }
    }

    /// Flushes the pages of an object in a shared pool that `client` put; returns how many.
    fn flush_shared_object(&self, client: &Client, pool: &Pool, oid: &Oid) -> u64 {
        let me = client.account.id;
        Counters::inc(&pool.counters.flushes);
        let mut n = 0;
        for shard in pool.shards.iter() {
            let taken = {
                let mut g = shard.lock();
                let sh = &mut *g;
                let runs = sh.runs.runs_of(oid);
                if runs.is_empty() {
                    continue;
                }
                let mut taken = Vec::new();
                for run in runs {
                    let key = RunKey { oid: *oid, run };
                    let mine = shared_bits_at(sh, &key, Some(me));
                    for bit in 0..RUN_PAGES as u32 {
                        if mine & (1 << bit) != 0 {
                            taken.push(take_shared_page(sh, &key, bit, Some(me)).expect("listed"));
                        }
                    }
                }
                sh.counts.flushed_pages += taken.len() as u64;
                taken
            };
            let pages = taken.len() as u64;
            let charge = taken.iter().map(|t| t.charge).sum();
            drop(taken);
            if pages > 0 {
                self.budget.release_shared(me, charge, pages);
            }
            n += pages;
        }
        n
    }

    fn refuse(
        &self,
        client: &Client,
        pool: &Pool,
        page_key: &PageKey,
        err: Error,
        how: Insert,
    ) -> Error {
        if how == Insert::Restore {
            // Not a guest's request: nothing to count, and the restore is undone whole.
            return err;
        }
        // Never leave an older copy behind a failed put: a later get would return stale data.
        // (In a shared pool only the client's own: what others put is theirs to flush.)
        self.remove_key(client, pool, page_key);
        Counters::inc(&client.counters.puts_refused);
        Counters::inc(&pool.counters.puts_refused);
        Counters::inc(&pool.counters.puts);
        err
    }
}

/// Why a slot is inserted: a guest's put, or restoring saved state (which evicts nothing,
/// counts no request and is undone whole if it fails).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Insert {
    Put,
    Restore,
}

impl Engine {
    /// A new pool for `client`, or the shared pool it joins (not yet in its pool table).
    fn make_pool(&self, client: &Arc<Client>, spec: PoolSpec) -> Result<Arc<Pool>> {
        Ok(match spec.shared {
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
                let p = match shared.get(&uuid).and_then(Weak::upgrade) {
                    Some(p) if !p.dead.load(Relaxed) => {
                        p.members.fetch_add(1, Relaxed);
                        p
                    }
                    _ => {
                        // Pages are charged to the members that put them: the pool's own
                        // account is never charged (and is no candidate for eviction).
                        let unused = Arc::new(Account::new(u32::MAX, 1, 0));
                        let p = self.new_pool(spec, self.cfg.compressor, unused);
                        shared.insert(uuid, Arc::downgrade(&p));
                        p
                    }
                };
                // Its pages in the pool are evicted from its account, also after it leaves
                // (they stay its own until evicted or the pool goes): once per pool.
                let held = p
                    .member_held
                    .lock()
                    .entry(client.account.id)
                    .or_default()
                    .clone();
                let mut list = client.account.pools.lock();
                if !list.iter().any(|r| std::ptr::eq(r.pool.as_ptr(), &*p)) {
                    list.push(Rotation {
                        pool: Arc::downgrade(&p),
                        held,
                    });
                }
                drop(list);
                p
            }
        })
    }

    /// Puts a pool into `client`'s table at `id` (restoring saved state: the guest knows it
    /// by that id); refused if the id is taken or beyond `max_pools`.
    pub(super) fn restore_pool(
        &self,
        client: &Arc<Client>,
        id: PoolId,
        spec: PoolSpec,
    ) -> Result<Arc<Pool>> {
        if id as usize >= self.cfg.max_pools {
            return Err(Error::TooManyPools(self.cfg.max_pools));
        }
        let pool = self.make_pool(client, spec)?;
        let mut pools = client.pools.write();
        if pools.len() <= id as usize {
            pools.resize(id as usize + 1, None);
        }
        if pools[id as usize].is_some() {
            drop(pools);
            match spec.shared {
                Some(uuid) => self.release_shared_pool(&uuid, &pool),
                None => {
                    self.budget.kill_pool(&pool);
                }
            }
            return Err(Error::InvalidPool("the same pool id is given twice"));
        }
        pools[id as usize] = Some(pool.clone());
        Ok(pool)
    }

    /// Stores an encoded page under `page_key`, charged to `client` (see [`Tmem::put`]).
    pub(super) fn insert(
        &self,
        client: &Client,
        pool: &Pool,
        page_key: &PageKey,
        slot: Slot,
        how: Insert,
    ) -> Result<()> {
        if pool.shared.is_some() {
            return self.put_shared(client, pool, page_key, slot, how);
        }
        let reserved = payload_cost(slot.len()) + MAX_STRUCT_COST;
        if let Err(e) =
            self.budget
                .reserve(&pool.account, reserved, pool.persistent, how == Insert::Put)
        {
            return Err(self.refuse(client, pool, page_key, e, how));
        }
        let (key, bit) = key_of(page_key);
        let (old, used) = {
            let mut g = pool.shard(&key).lock();
            if pool.dead.load(Relaxed) {
                drop(g);
                self.budget.unreserve_pool(pool, reserved);
                return Err(Error::BadPool(page_key.pool));
            }
            let sh = &mut *g;
            sh.counts.puts += u64::from(how == Insert::Put);
            let Some((run, mut structure)) = sh.runs.run_or_insert(&key) else {
                drop(g);
                self.budget.unreserve_pool(pool, reserved);
                return Err(self.refuse(client, pool, page_key, Error::NoSpace, how));
            };
            // Runs leave the store when their last page does: an empty one is new.
            let new_run = run.present() == 0;
            let held = run.heap_bytes();
            let old = run.put(bit, slot);
            if !pool.persistent {
                // Used now: the CLOCK hand passes it once before it can be evicted.
                run.set_referenced(true);
            }
            structure += run.heap_bytes() - held;
            let stored = run.get(bit).expect("just put");
            let added = payload_cost(stored.len());
            count_page(&mut sh.counts, &mut sh.payload_charged, stored, true);
            sh.counts.memory_used += structure;
            if let Some(o) = &old {
                count_page(&mut sh.counts, &mut sh.payload_charged, o, false);
            }
            if new_run && !pool.persistent {
                pool.account.ephemeral_runs.fetch_add(1, Relaxed);
                pool.held.fetch_add(1, Relaxed);
            }
            (old, added + structure)
        };
        let freed = old.as_ref().map_or(0, |o| payload_cost(o.len()));
        drop(old);
        self.budget.unreserve_pool(pool, reserved - used);
        self.budget.release_pool(pool, freed);
        Ok(())
    }
}

impl Tmem for Engine {
    type Client = Arc<Client>;
    type Worker = Worker;

    fn new_worker(&self) -> Result<Worker> {
        Ok(Worker {
            codecs: Codecs::new()?,
            pools: PoolCache::default(),
        })
    }

    fn create_pool(&self, client: &Arc<Client>, spec: PoolSpec) -> Result<PoolId> {
        let pool = self.make_pool(client, spec)?;
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
                self.budget.kill_pool(&pool);
            }
        }
        Ok(())
    }

    fn put<'p>(
        &self,
        worker: &mut Worker,
        client: &Arc<Client>,
        page_key: &PageKey,
        page: impl Into<PageSrc<'p>>,
    ) -> Result<()> {
        let page = page.into();
        let Worker { codecs, pools } = worker;
        let pool = pools.pool(client, page_key.pool)?;
        Counters::inc(&client.counters.puts);
        if client.frozen.load(Relaxed) {
            return Err(self.refuse(
                client,
                pool,
                page_key,
                Error::Refused("client frozen"),
                Insert::Put,
            ));
        }
        // Zero and same-filled pages never reach the codec. The check reads words up to the
        // first that differs (usually within the first 256 bytes), the codec the whole page
        // once; only an incompressible page is read a second time, to store it raw.
        let slot = match page.same_filled() {
            Some(w) => Slot::same(w),
            None => match codecs.compress(pool.compressor, page, self.cfg.raw_threshold)? {
                Some((enc, bytes)) => Slot::stored(&self.budget.arena, enc, bytes),
                None => {
                    let (policy, why) = if pool.persistent {
                        (
                            self.cfg.persistent_incompressible,
                            "incompressible persistent page",
                        )
                    } else {
                        (
                            self.cfg.ephemeral_incompressible,
                            "incompressible ephemeral page",
                        )
                    };
                    if policy == IncompressiblePolicy::Refuse {
                        return Err(self.refuse(
                            client,
                            pool,
                            page_key,
                            Error::Refused(why),
                            Insert::Put,
                        ));
                    }
                    Slot::stored_page(&self.budget.arena, page)
                }
            },
        };
        self.insert(client, pool, page_key, slot, Insert::Put)
    }

    fn get<'p>(
        &self,
        worker: &mut Worker,
        client: &Arc<Client>,
        page_key: &PageKey,
        out: impl Into<PageDst<'p>>,
        exclusive: bool,
    ) -> Result<GetHit> {
        let out = out.into();
        let Worker { codecs, pools } = worker;
        let pool = pools.pool(client, page_key.pool)?;
        Counters::inc(&client.counters.gets);
        // Private ephemeral pages move back into the guest: keeping a copy would only waste
        // memory on a page the guest now caches itself.
        let exclusive = exclusive || (!pool.persistent && pool.shared.is_none());
        let (key, bit) = key_of(page_key);
        if exclusive && pool.shared.is_some() {
            // An exclusive get drops a shared page only for the member that put it; anyone
            // else gets a copy (dropped: false) and the page stays for the others.
            let taken = {
                let mut g = pool.shard(&key).lock();
                let t = take_shared_page(&mut g, &key, bit, Some(client.account.id));
                if t.is_some() {
                    g.counts.gets += 1;
                    g.counts.get_hits += 1;
                }
                t
            };
            if let Some(t) = taken {
                let r = decode(codecs, &t.slot, out);
                let (owner, charge) = (t.owner, t.charge);
                drop(t);
                self.budget.release_shared(owner, charge, 1);
                return self.count_get(
                    client,
                    pool,
                    page_key,
                    r.map(|()| GetHit { dropped: true }),
                );
            }
        }
        let exclusive = exclusive && pool.shared.is_none();
        let result = if exclusive {
            let taken = {
                let mut g = pool.shard(&key).lock();
                g.counts.gets += 1;
                let t = take_page(pool, &mut g, &key, bit);
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
                    let r = decode(codecs, &slot, out);
                    drop(slot);
                    self.budget.release_pool(pool, freed);
                    r.map(|()| GetHit { dropped: true })
                }
            }
        } else {
            let mut g = pool.shard(&key).lock();
            let sh = &mut *g;
            sh.counts.gets += 1;
            let window = (sh.runs.len() as u64 / 4).max(8);
            let hit = sh.runs.get(&key).and_then(|run| {
                let r = decode(codecs, run.get(bit)?, out);
                Some(r)
            });
            match hit {
                None => {
                    sh.counts.get_misses += 1;
                    Err(Error::Miss)
                }
                Some(r) => {
                    // Only shared pools get here with ephemeral pages (private ones move
                    // out): a hit makes the run recently used again for its owners.
                    let renew = !pool.persistent
                        && sh
                            .shared
                            .get(&key)
                            .is_some_and(|sr| due(sh.clock, sr.stamp, window));
                    sh.counts.get_hits += 1;
                    if renew {
                        renew_shared(sh, key);
                    }
                    r.map(|()| GetHit { dropped: false })
                }
            }
        };
        self.count_get(client, pool, page_key, result)
    }

    fn flush_page(&self, client: &Arc<Client>, page_key: &PageKey) -> Result<()> {
        let pool = client.pool(page_key.pool)?;
        Counters::inc(&client.counters.flushes);
        let (key, bit) = key_of(page_key);
        if pool.shared.is_some() {
            let taken = {
                let mut g = pool.shard(&key).lock();
                g.counts.flushes += 1;
                // Only the page's owner may flush it; to anyone else it is not theirs.
                let t = take_shared_page(&mut g, &key, bit, Some(client.account.id));
                g.counts.flushed_pages += t.is_some() as u64;
                t
            };
            return match taken {
                Some(t) => {
                    let (owner, charge) = (t.owner, t.charge);
                    drop(t);
                    self.budget.release_shared(owner, charge, 1);
                    Counters::inc(&client.counters.flushed_pages);
                    Ok(())
                }
                None => Err(Error::Miss),
            };
        }
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
                self.budget.release_pool(&pool, freed);
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
        if pool.shared.is_some() {
            let n = self.flush_shared_object(client, &pool, oid);
            client.counters.flushed_pages.fetch_add(n, Relaxed);
            return Ok(n);
        }
        let mut n = 0;
        // An object's runs are spread over every shard.
        for shard in pool.shards.iter() {
            let (runs, freed) = {
                let mut g = shard.lock();
                let sh = &mut *g;
                let keys = sh.runs.runs_of(oid);
                if keys.is_empty() {
                    continue;
                }
                let mut runs = Vec::with_capacity(keys.len());
                let mut freed = 0;
                for run in keys {
                    let key = RunKey { oid: *oid, run };
                    let (r, f) = remove_run(&pool, sh, &key).expect("listed above");
                    n += r.len() as u64;
                    sh.counts.flushed_pages += r.len() as u64;
                    freed += f;
                    runs.push(r);
                }
                (runs, freed)
            };
            drop(runs);
            self.budget.release_pool(&pool, freed);
        }
        client.counters.flushed_pages.fetch_add(n, Relaxed);
        Ok(n)
    }

    fn limit_pages(&self, client: &Arc<Client>) -> u64 {
        match client.account.quota.load(Relaxed) {
            0 => 0,
            // At least one page: 0 would tell the driver it has no limit.
            bytes => (bytes / PAGE_SIZE as u64).max(1),
        }
    }

    fn shrink_target(&self, client: &Arc<Client>) -> u64 {
        client.shrink_target()
    }

    fn reset_client(&self, client: &Arc<Client>) -> ClientRemoval {
        self.reset_session(client)
    }

    fn driver_features(&self, client: &Arc<Client>, session: bool) -> ClientRemoval {
        self.negotiated(client, session)
    }

    fn save_state(
        &self,
        client: &Arc<Client>,
        w: &mut dyn std::io::Write,
        ephemeral: bool,
    ) -> std::io::Result<super::state::Tally> {
        self.save_client_stream(client, w, ephemeral)
            .map(|(_, t)| t)
    }

    fn load_state(
        &self,
        client: &Arc<Client>,
        r: &mut dyn std::io::Read,
    ) -> std::result::Result<super::state::Tally, super::RestoreError> {
        self.restore_client_stream(client, r)
    }

    fn migrated_out(&self, client: &Arc<Client>) {
        self.mark_migrated(client);
    }

    fn migrated_in(&self, client: &Arc<Client>) {
        self.mark_arrived(client);
    }
}

#[cfg(test)]
impl Engine {
    /// A pool's objects over all shards (per shard), and how many of them hold a single run.
    fn object_shapes(&self, client: &Client, id: PoolId) -> (u64, u64) {
        let pool = client.pool(id).expect("a pool of the client");
        let mut shapes = (0, 0);
        for shard in pool.shards.iter() {
            let (objects, single) = shard.lock().runs.shapes();
            shapes.0 += objects as u64;
            shapes.1 += single as u64;
        }
        shapes
    }

    /// What a pool's shards hold allocated, summed over shards: runs, bytes of the run
    /// structure (tables, slabs, nodes), and shared pools' LRU records and their capacity.
    fn allocated_structure(&self, client: &Client, id: PoolId) -> AllocatedStructure {
        let pool = client.pool(id).expect("a pool of the client");
        let mut a = AllocatedStructure::default();
        for shard in pool.shards.iter() {
            let sh = shard.lock();
            a.runs += sh.runs.len();
            a.run_bytes += sh.runs.allocated();
            a.shared_cap += sh.shared.capacity();
            for m in sh.members.values() {
                a.lru_len += m.lru.len();
                a.lru_cap += m.lru.capacity();
            }
        }
        a
    }
}

#[cfg(test)]
#[derive(Debug, Default)]
struct AllocatedStructure {
    runs: usize,
    run_bytes: usize,
    shared_cap: usize,
    lru_len: usize,
    lru_cap: usize,
}

fn decode(codecs: &mut Codecs, s: &Slot, mut out: PageDst<'_>) -> Result<()> {
    match s.payload() {
        Payload::Same(w) => {
            out.fill(w);
            Ok(())
        }
        Payload::Stored(enc, bytes) => Ok(codecs.decompress(enc, bytes, out)?),
    }
}

#[cfg(test)]
mod tests;
