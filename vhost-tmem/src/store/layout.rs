// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! How pages are laid out in memory, and what each piece costs.
//!
//! A client holds up to `max_pools` pools; a pool is split into shards, each a mutex over its
//! runs ([`Runs`]): a run is 16 consecutive page indexes of one object, with a 16-bit presence
//! mask and its pages' 16-byte slots in index order, so a densely used run costs 16 bytes per
//! page plus its share of one entry, and a run of one page 48 to 60 bytes all told. Runs hash
//! to shards, so requests from different workers rarely meet on a lock and no lock is global;
//! flushing an object visits each shard once. The hash is keyed per pool with random seeds
//! because keys are chosen by untrusted guests.
//!
//! The helpers here change a shard's contents and its gauges together, under its lock, and
//! return what they freed, for the caller to release once the lock is dropped.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use shared_proto::Oid;

use super::codec::{Compressor, Encoding};
use super::counters::{CounterSnapshot, Counters};
use super::hash::KeyedState;
use super::runs::{Run, Runs, NODE_META, NODE_RUN_META, ONE_META};
use super::slot::{Payload, Slot};
use super::{PageKey, Uuid};

/// Shards per pool: a power of two, a few times the number of worker threads.
pub(super) const SHARDS: usize = 16;
/// log2 of the pages in a run.
pub(super) const RUN_SHIFT: u32 = 4;
/// Pages in a run.
pub(super) const RUN_PAGES: usize = 1 << RUN_SHIFT;

/// Charged per slot of a run's slot vector (by capacity), beside the vector itself
/// ([`Run::heap_bytes`]); a run's single slot is inline and costs nothing extra.
pub(super) const SLOT_BYTES: u64 = std::mem::size_of::<Slot>() as u64;
/// Charged per run of a shared pool: its entry in the shard's table of owners and stamps (at
/// the lowest load factor the table keeps, 7/16) and the owner table.
pub(super) const SHARED_RUN_META: u64 = ((std::mem::size_of::<(RunKey, SharedRun)>() + 1) * 16 / 7)
    as u64
    + std::mem::size_of::<[u32; RUN_PAGES]>() as u64;
/// Charged per LRU record room of a shared pool's member queues, three per run: compaction
/// keeps the records under one and a half per run and the room under twice the records
/// (beyond a constant per queue), see `compact_member`.
pub(super) const LRU_META: u64 = 3 * std::mem::size_of::<LruRef>() as u64;
/// The most a put can add besides its payload: an object's single run moving into a node with
/// the new run beside it, and the run's slots growing (at most from 8 to 16, 128 bytes; from
/// one inline slot to a vector of two, the vector's header and 32).
pub(super) const MAX_STRUCT_COST: u64 = {
    let a = NODE_META + 2 * NODE_RUN_META;
    let b = ONE_META;
    (if a > b { a } else { b }) + RUN_PAGES as u64 * SLOT_BYTES + 32
};

/// Charged per page of a shared pool besides its payload, to the client that put it: at least
/// the page's share of any structure around it, so that each page's charge can go to its own
/// client without tracking who created that structure. Per page at most: a one-run entry
/// (alone in its shard) or half a node and a node run (two or more runs), its run's owner
/// entry and LRU records (a run of one page), and three slots (a run of n pages holds at
/// most 32 + 16 * cap bytes of slots, cap < 2n for n > 2, so under 48 bytes per page).
pub(super) const SHARED_PAGE_META: u64 = {
    let node_share = NODE_META.div_ceil(2) + NODE_RUN_META;
    let obj_share = if ONE_META > node_share {
        ONE_META
    } else {
        node_share
    };
    obj_share + SHARED_RUN_META + LRU_META + 3 * SLOT_BYTES
};

/// A payload's charge: its arena size class (64-byte granules). The arena's other resident
/// bytes (partly used chunks) are charged globally, see `Budget::reserve`.
pub(super) fn payload_cost(len: usize) -> u64 {
    super::arena::class_size(len) as u64
}

/// Where memory is charged: a client's account (a shared pool's pages are charged to the
/// clients that put them; its own account is never charged).
#[derive(Debug)]
pub(super) struct Account {
    /// The client's index in the budget's account list (a shared page's owner).
    pub(super) id: u32,
    pub(super) weight: AtomicU32,
    pub(super) quota: AtomicU64,
    pub(super) used: AtomicU64,
    /// The persistent pages' part of `used`.
    pub(super) persistent_used: AtomicU64,
    /// Ephemeral runs of private pools and pages of shared pools held, so that eviction can
    /// skip accounts with nothing to give.
    pub(super) ephemeral_runs: AtomicU64,
    /// Ephemeral pools charged here, in eviction rotation: the client's private ones and the
    /// shared pools it joined (until they are destroyed: its pages there stay its own).
    pub(super) pools: Mutex<Vec<Rotation>>,
    pub(super) cursor: AtomicUsize,
    /// Pages evicted from this account.
    pub(super) evictions: AtomicU64,
    /// Its client was removed: its weight no longer counts, and its id may be given to a new
    /// client once nothing refers to it any more.
    pub(super) retired: AtomicBool,
}

impl Account {
    pub(super) fn new(id: u32, weight: u32, quota: u64) -> Self {
        Account {
            id,
            weight: AtomicU32::new(weight.max(1)),
            quota: AtomicU64::new(quota),
            used: AtomicU64::new(0),
            persistent_used: AtomicU64::new(0),
            ephemeral_runs: AtomicU64::new(0),
            pools: Mutex::new(Vec::new()),
            cursor: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        }
    }
}

/// A pool in an account's eviction rotation, with what the account holds there that can be
/// evicted (a private pool's runs, its own pages in a shared pool): eviction skips pools where
/// that is 0, so that its cost never depends on what other clients hold.
#[derive(Debug)]
pub(super) struct Rotation {
    pub(super) pool: Weak<Pool>,
    pub(super) held: Arc<AtomicU64>,
}

/// A member's LRU queue in one shard of a shared pool: records of the runs holding pages it
/// put, so that evicting its pages never looks at other members' runs.
#[derive(Debug)]
pub(super) struct MemberLru {
    pub(super) lru: VecDeque<LruRef>,
    /// Runs of the shard holding at least one of its pages (one live record each).
    pub(super) runs: usize,
    /// Its pages in the pool: the count in its [`Rotation`].
    pub(super) held: Arc<AtomicU64>,
}

/// A run's key: the object and the run number (index >> RUN_SHIFT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunKey {
    pub(super) oid: Oid,
    pub(super) run: u64,
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

/// A shared pool's run: who put each page (by index bit), who is charged for it and alone may
/// flush it; and the stamp of the run's newest LRU records in its owners' queues (0: none yet).
/// 32 bits: stamps wrap after 2^32 records in a shard, and a record that old has been
/// compacted away long before (a false match would only reorder eviction).
#[derive(Debug)]
pub(super) struct SharedRun {
    pub(super) owners: Box<[u32; RUN_PAGES]>,
    pub(super) stamp: u32,
}

impl Default for SharedRun {
    fn default() -> Self {
        SharedRun {
            owners: Box::new([0; RUN_PAGES]),
            stamp: 0,
        }
    }
}

/// An LRU record; stale when the run's stamp has moved on or the run is gone.
#[derive(Debug)]
pub(super) struct LruRef {
    pub(super) key: RunKey,
    pub(super) stamp: u32,
}

/// Counts a page in or out of a shard's gauges and its payload charge.
pub(super) fn count_page(
    counts: &mut CounterSnapshot,
    payload_charged: &mut u64,
    s: &Slot,
    add: bool,
) {
    let (same, raw, bytes) = match s.payload() {
        Payload::Same(_) => (1, 0, 0),
        Payload::Stored(e, b) => (0, (e == Encoding::Raw) as u64, b.len() as u64),
    };
    let cost = payload_cost(s.len());
    if add {
        counts.stored_pages += 1;
        counts.same_filled_pages += same;
        counts.raw_pages += raw;
        counts.compressed_bytes += bytes;
        counts.memory_used += cost;
        *payload_charged += cost;
    } else {
        counts.stored_pages -= 1;
        counts.same_filled_pages -= same;
        counts.raw_pages -= raw;
        counts.compressed_bytes -= bytes;
        counts.memory_used -= cost;
        *payload_charged -= cost;
    }
}

#[derive(Debug)]
pub(super) struct Shard {
    pub(super) runs: Runs,
    /// Shared pools: each run's owners and LRU stamp.
    pub(super) shared: HashMap<RunKey, SharedRun, KeyedState>,
    /// Shared pools: a queue per member with pages here (by account id).
    pub(super) members: HashMap<u32, MemberLru, KeyedState>,
    /// The last stamp given (see [`SharedRun::stamp`]).
    pub(super) clock: u32,
    /// Gauges and the common request counters of this shard's pages; `memory_used` is
    /// everything charged for the shard, payloads and structure.
    pub(super) counts: CounterSnapshot,
    /// The payloads' part of `counts.memory_used`.
    pub(super) payload_charged: u64,
}

impl Shard {
    pub(super) fn new(h: KeyedState) -> Self {
        Shard {
            runs: Runs::new(h),
            shared: HashMap::with_hasher(h),
            members: HashMap::with_hasher(h),
            clock: 0,
            counts: CounterSnapshot::default(),
            payload_charged: 0,
        }
    }
}

/// A pool. Shared pools are one `Pool` referenced by every member client.
#[derive(Debug)]
pub(super) struct Pool {
    pub(super) persistent: bool,
    pub(super) shared: Option<Uuid>,
    pub(super) compressor: Compressor,
    pub(super) account: Arc<Account>,
    pub(super) shards: Box<[Mutex<Shard>]>,
    pub(super) hasher: KeyedState,
    pub(super) evict_cursor: AtomicUsize,
    /// Private ephemeral pools: runs held (the count in the account's [`Rotation`]).
    pub(super) held: Arc<AtomicU64>,
    /// Shared pools: each member's pages held, by account id (the counts in the members'
    /// rotations). A member's entry stays while the pool lives: at most one per client.
    pub(super) member_held: Mutex<HashMap<u32, Arc<AtomicU64>>>,
    /// Set once the pool is destroyed; puts that raced with it must not insert.
    pub(super) dead: AtomicBool,
    pub(super) members: AtomicU64,
    /// The rare events, counted outside the shard locks.
    pub(super) counters: Counters,
}

impl Pool {
    pub(super) fn shard(&self, key: &RunKey) -> &Mutex<Shard> {
        // The full keyed hash: in a shared pool, keys one member could aim at one shard
        // would make the others wait on its lock.
        let h = self.hasher.hash_one(key);
        // High bits: hashbrown uses the low ones for buckets and the top 7 for tags.
        &self.shards[(h >> 40) as usize & (SHARDS - 1)]
    }
}

/// A page's run and its bit in the run.
pub(super) fn key_of(key: &PageKey) -> (RunKey, u32) {
    (
        RunKey {
            oid: key.oid,
            run: key.index >> RUN_SHIFT,
        },
        (key.index & (RUN_PAGES as u64 - 1)) as u32,
    )
}

/// Takes a whole run of a private pool out of a shard with its bookkeeping; returns it and
/// the bytes it had charged (payloads and structure), to release once the lock is dropped.
pub(super) fn remove_run(pool: &Pool, sh: &mut Shard, key: &RunKey) -> Option<(Run, u64)> {
    debug_assert!(pool.shared.is_none(), "shared pools charge per page");
    let (run, mut freed) = sh.runs.remove(key)?;
    freed += run.heap_bytes();
    sh.counts.memory_used -= freed;
    for s in run.slots() {
        count_page(&mut sh.counts, &mut sh.payload_charged, s, false);
        freed += payload_cost(s.len());
    }
    if !pool.persistent {
        pool.account.ephemeral_runs.fetch_sub(1, Relaxed);
        pool.held.fetch_sub(1, Relaxed);
    }
    Some((run, freed))
}

/// Gives back a map's room once it is under a quarter full, so that a map that once held
/// many entries does not keep their room when only a few remain (nothing is charged for
/// it then). Shrinking to half full means it takes as many removals again to shrink once
/// more: amortized O(1) per removal.
pub(super) fn shrink_map<K: Eq + Hash, V>(m: &mut HashMap<K, V, KeyedState>) {
    if m.capacity() > 16 && m.capacity() > 4 * m.len() {
        m.shrink_to(2 * m.len());
    }
}

/// A page of a shared pool taken out: the slot, its owner and what the owner was charged.
pub(super) struct SharedTaken {
    pub(super) slot: Slot,
    pub(super) owner: u32,
    pub(super) charge: u64,
}

/// Takes one page out of a shared pool's shard, if it is stored and (with `only`) that
/// client put it; the run goes when empty. The caller gives the charge back to the owner (see
/// [`Budget::release_shared`](super::budget::Budget::release_shared)).
pub(super) fn take_shared_page(
    sh: &mut Shard,
    key: &RunKey,
    bit: u32,
    only: Option<u32>,
) -> Option<SharedTaken> {
    let run = sh.runs.get_mut(key)?;
    run.get(bit)?;
    let owners = *sh.shared.get(key).expect("shared runs have owners").owners;
    let owner = owners[bit as usize];
    if only.is_some_and(|o| o != owner) {
        return None;
    }
    let slot = run.take(bit).expect("present");
    let emptied = run.present() == 0;
    let left = shared_bits(run, &owners, Some(owner)) == 0;
    count_page(&mut sh.counts, &mut sh.payload_charged, &slot, false);
    sh.counts.memory_used -= SHARED_PAGE_META;
    if emptied {
        sh.runs.remove(key).expect("the run is there");
        sh.shared.remove(key);
        shrink_map(&mut sh.shared);
    }
    let m = sh.members.get_mut(&owner).expect("an owner has a queue");
    m.held.fetch_sub(1, Relaxed);
    if left {
        m.runs -= 1;
        if m.runs == 0 {
            // Every record of its is stale now: the queue goes with its room.
            sh.members.remove(&owner);
            shrink_map(&mut sh.members);
        } else {
            compact_member(&sh.runs, &sh.shared, owner, m);
        }
    }
    let charge = payload_cost(slot.len()) + SHARED_PAGE_META;
    Some(SharedTaken {
        slot,
        owner,
        charge,
    })
}

/// The bits of a shared run's pages that `owner` put (all of them with `None`).
pub(super) fn shared_bits(run: &Run, owners: &[u32; RUN_PAGES], owner: Option<u32>) -> u16 {
    let present = run.present();
    (0..RUN_PAGES as u32)
        .filter(|&b| present & (1 << b) != 0 && owner.is_none_or(|o| owners[b as usize] == o))
        .fold(0, |m, b| m | (1 << b))
}

/// [`shared_bits`] of run `key` of a shared pool's shard (0 if it is not there).
pub(super) fn shared_bits_at(sh: &Shard, key: &RunKey, owner: Option<u32>) -> u16 {
    match (sh.runs.get(key), sh.shared.get(key)) {
        (Some(run), Some(sr)) => shared_bits(run, &sr.owners, owner),
        _ => 0,
    }
}

/// Takes one page out of a shard with its bookkeeping (the run goes when empty); returns it
/// and the bytes to release once the lock is dropped.
pub(super) fn take_page(
    pool: &Pool,
    sh: &mut Shard,
    key: &RunKey,
    bit: u32,
) -> Option<(Slot, u64)> {
    let run = sh.runs.get_mut(key)?;
    let slot = run.take(bit)?;
    let emptied = run.present() == 0;
    count_page(&mut sh.counts, &mut sh.payload_charged, &slot, false);
    let mut freed = payload_cost(slot.len());
    if emptied {
        let (_, f) = remove_run(pool, sh, key).expect("the run is there");
        freed += f;
    }
    Some((slot, freed))
}

/// A new stamp from a shard's clock: it moves on, wrapping past 0 (which means "no record").
pub(super) fn tick(clock: &mut u32) -> u32 {
    *clock = clock.wrapping_add(1).max(1);
    *clock
}

/// Whether a run stamped `stamp` is due a new record: it has none, or its last one is at least
/// `window` records back in the queue.
pub(super) fn due(clock: u32, stamp: u32, window: u64) -> bool {
    stamp == 0 || u64::from(clock.wrapping_sub(stamp)) >= window
}

/// Records a shared run as recently used for every member with pages in it: a new stamp and a
/// record in each of their queues (at most 16), which makes their older records stale.
pub(super) fn renew_shared(sh: &mut Shard, key: RunKey) {
    let stamp = tick(&mut sh.clock);
    let Some(present) = sh.runs.get(&key).map(Run::present) else {
        return;
    };
    let Some(sr) = sh.shared.get_mut(&key) else {
        return;
    };
    sr.stamp = stamp;
    let owners = *sr.owners;
    for bit in 0..RUN_PAGES {
        let o = owners[bit];
        // Once per owner: at its lowest bit.
        if present & (1 << bit) == 0 || (0..bit).any(|b| present & (1 << b) != 0 && owners[b] == o)
        {
            continue;
        }
        let m = sh.members.get_mut(&o).expect("an owner has a queue");
        m.lru.push_back(LruRef { key, stamp });
        compact_member(&sh.runs, &sh.shared, o, m);
    }
}

/// Whether a member's record is live: the run has its stamp and pages of the member's.
pub(super) fn member_record_live(
    runs: &Runs,
    shared: &HashMap<RunKey, SharedRun, KeyedState>,
    owner: u32,
    r: &LruRef,
) -> bool {
    shared.get(&r.key).is_some_and(|sr| {
        sr.stamp == r.stamp
            && runs
                .get(&r.key)
                .is_some_and(|run| shared_bits(run, &sr.owners, Some(owner)) != 0)
    })
}

/// Drops a member's stale LRU records in a shared pool once they outnumber its live runs by
/// half, so the queue stays O(its runs) whatever others do to the runs it shares. The queue's
/// room shrinks with it (eviction pops records without compacting).
pub(super) fn compact_member(
    runs: &Runs,
    shared: &HashMap<RunKey, SharedRun, KeyedState>,
    owner: u32,
    m: &mut MemberLru,
) {
    if m.lru.len() >= 16 && m.lru.len() >= m.runs + m.runs / 2 {
        m.lru.retain(|r| member_record_live(runs, shared, owner, r));
    }
    // Growth doubles the room, so it is at most twice the records; shrinking to one and a
    // half times them leaves a margin both ways, so neither repeats at once.
    let len = m.lru.len();
    if m.lru.capacity() > 2 * len.max(8) {
        m.lru.shrink_to((len + len / 2).max(8));
    }
}
