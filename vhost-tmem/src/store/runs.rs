// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where a shard keeps its runs: found by (object, run number), swept by a CLOCK hand.
//!
//! With sparse keys (a page cache of small files, scattered swap slots) a run holds one page,
//! so the structure around a run is what a page costs. It is kept small:
//! - an object with one run in the shard is a 48-byte [`OneRun`] (its key and the run) in a
//!   slab, found through `index`, a table of 4-byte slab positions hashed by object id;
//! - an object with more runs here gets a [`Node`] (its slot in `index` says so): its runs
//!   are 32-byte [`NodeRun`]s in a second slab, found through the node's own table of
//!   positions hashed by run number.
//!
//! Slabs grow in fixed chunks, so growing never copies a whole slab under the shard lock, and
//! stay dense: a removal moves the last entry into the hole and repoints its table slot.
//! Ephemeral pools evict with reference bits instead of LRU records: the hand sweeps the
//! index's buckets (and a node's own, at a node), clearing bits, and stops at a run without
//! one.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::ops::{Index, IndexMut};

use hashbrown::HashTable;
use shared_proto::Oid;

use super::hash::KeyedState;
use super::layout::{RunKey, RUN_PAGES};
use super::slot::Slot;

/// Up to 16 consecutive pages of one object: 16 bytes. A run of one page keeps its slot
/// inline, its page's bit and reference bit in the slot's tag; more pages go behind one
/// pointer. A run is empty only between its creation and its first page, or its last page's
/// removal and its own.
#[derive(Debug, Default)]
pub(super) enum Run {
    #[default]
    Empty,
    One(Slot),
    Many(Box<ManyRun>),
}

const _: () = assert!(std::mem::size_of::<Run>() == 16);

/// The pages of a run of two or more, in index order.
#[derive(Debug)]
pub(super) struct ManyRun {
    /// Bit i: page `run * 16 + i` is stored, at `slots[popcount(present below i)]`.
    present: u16,
    referenced: bool,
    slots: Vec<Slot>,
}

/// Heap bytes of a run of many besides its slot vector's room.
pub(super) const MANY_RUN_BYTES: u64 = std::mem::size_of::<ManyRun>() as u64;

/// A run of one page: its bit in the tag's low bits, the reference bit in its top one.
const TAG_BIT: u8 = 0x0f;
const TAG_REF: u8 = 0x80;

/// Room the vector gets when a run gets its second page: runs grow 2, 4, 8, 16.
const FIRST_MANY: usize = 2;

fn pos(present: u16, bit: u32) -> usize {
    (present & ((1u16 << bit) - 1)).count_ones() as usize
}

impl Run {
    /// Bit i: page `run * 16 + i` is stored.
    pub(super) fn present(&self) -> u16 {
        match self {
            Run::Empty => 0,
            Run::One(s) => 1 << (s.tag() & TAG_BIT),
            Run::Many(m) => m.present,
        }
    }

    /// Its pages in index order.
    pub(super) fn slots(&self) -> &[Slot] {
        match self {
            Run::Empty => &[],
            Run::One(s) => std::slice::from_ref(s),
            Run::Many(m) => &m.slots,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.slots().len()
    }

    pub(super) fn get(&self, bit: u32) -> Option<&Slot> {
        match self {
            Run::Empty => None,
            Run::One(s) => (u32::from(s.tag() & TAG_BIT) == bit).then_some(s),
            Run::Many(m) => m
                .slots
                .get(pos(m.present, bit))
                .filter(|_| m.present & (1 << bit) != 0),
        }
    }

    /// Stores `slot` as page `bit`; returns the page it replaced.
    pub(super) fn put(&mut self, bit: u32, mut slot: Slot) -> Option<Slot> {
        debug_assert!(bit < RUN_PAGES as u32);
        match self {
            Run::Empty => {
                slot.set_tag(bit as u8);
                *self = Run::One(slot);
                None
            }
            Run::One(s) if u32::from(s.tag() & TAG_BIT) == bit => {
                slot.set_tag(s.tag());
                Some(std::mem::replace(s, slot))
            }
            Run::One(_) => {
                let Run::One(mut first) = std::mem::take(self) else {
                    unreachable!("matched One")
                };
                let (tag, b) = (first.tag(), u32::from(first.tag() & TAG_BIT));
                first.set_tag(0);
                let mut slots = Vec::with_capacity(FIRST_MANY);
                if b < bit {
                    slots.extend([first, slot]);
                } else {
                    slots.extend([slot, first]);
                }
                *self = Run::Many(Box::new(ManyRun {
                    present: (1 << b) | (1 << bit),
                    referenced: tag & TAG_REF != 0,
                    slots,
                }));
                None
            }
            Run::Many(m) => {
                let at = pos(m.present, bit);
                if m.present & (1 << bit) != 0 {
                    Some(std::mem::replace(&mut m.slots[at], slot))
                } else {
                    m.slots.insert(at, slot);
                    m.present |= 1 << bit;
                    None
                }
            }
        }
    }

    /// Takes page `bit` out. A run of many keeps its room while it lives (see
    /// [`Run::heap_bytes`]); a run of one is empty after.
    pub(super) fn take(&mut self, bit: u32) -> Option<Slot> {
        match self {
            Run::One(s) if u32::from(s.tag() & TAG_BIT) == bit => {
                let Run::One(mut s) = std::mem::take(self) else {
                    unreachable!("matched One")
                };
                s.set_tag(0);
                Some(s)
            }
            Run::Many(m) if m.present & (1 << bit) != 0 => {
                let at = pos(m.present, bit);
                m.present &= !(1 << bit);
                Some(m.slots.remove(at))
            }
            _ => None,
        }
    }

    /// Heap bytes held besides the run itself: what its charge for slots covers. They only
    /// grow while the run lives, so a charge taken per insert is given back whole when the run
    /// goes.
    pub(super) fn heap_bytes(&self) -> u64 {
        match self {
            Run::Empty | Run::One(_) => 0,
            Run::Many(m) => {
                MANY_RUN_BYTES + (m.slots.capacity() * std::mem::size_of::<Slot>()) as u64
            }
        }
    }

    /// Whether the run was used since the CLOCK hand last passed it (ephemeral pools).
    pub(super) fn referenced(&self) -> bool {
        match self {
            Run::Empty => false,
            Run::One(s) => s.tag() & TAG_REF != 0,
            Run::Many(m) => m.referenced,
        }
    }

    /// CLOCK's second chance: whether the reference bit was set, clearing it.
    fn second_chance(&mut self) -> bool {
        let was = self.referenced();
        if was {
            self.set_referenced(false);
        }
        was
    }

    pub(super) fn set_referenced(&mut self, on: bool) {
        match self {
            Run::Empty => {}
            Run::One(s) => s.set_tag(if on {
                s.tag() | TAG_REF
            } else {
                s.tag() & !TAG_REF
            }),
            Run::Many(m) => m.referenced = on,
        }
    }
}

/// An object's only run in the shard, with its key.
#[derive(Debug)]
pub(super) struct OneRun {
    pub(super) oid: Oid,
    pub(super) run: u64,
    pub(super) data: Run,
}

const _: () = assert!(std::mem::size_of::<OneRun>() == 48);

/// A run of an object with several runs in the shard; `node` is the object's node.
#[derive(Debug)]
struct NodeRun {
    run: u64,
    node: u32,
    data: Run,
}

const _: () = assert!(std::mem::size_of::<NodeRun>() == 32);

/// An object with several runs in the shard: their positions in the run slab by run number.
#[derive(Debug)]
pub(super) struct Node {
    oid: Oid,
    runs: HashTable<u32>,
    /// The CLOCK hand within the node: a bucket of `runs`.
    hand: usize,
}

/// Entries per slab chunk (the first grows to it by doubling, from 4).
const CHUNK: usize = 32;

/// A vector in chunks of [`CHUNK`]: growing allocates a chunk, never copies the others.
#[derive(Debug)]
struct Chunked<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Chunked<T> {
    fn new() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Appends; returns the position.
    fn push(&mut self, v: T) -> usize {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(v),
            _ => {
                let mut c = Vec::with_capacity(if self.chunks.is_empty() { 4 } else { CHUNK });
                c.push(v);
                self.chunks.push(c);
            }
        }
        self.len += 1;
        self.len - 1
    }

    /// Removes entry `i`, moving the last one into its place; returns the entry and, if one
    /// moved, its old position.
    fn swap_remove(&mut self, i: usize) -> (T, Option<usize>) {
        assert!(i < self.len, "position {i} of {}", self.len);
        let chunk = self.chunks.last_mut().expect("not empty");
        let last = chunk.pop().expect("chunks are never empty");
        if chunk.is_empty() {
            self.chunks.pop();
            let n = self.chunks.len();
            if self.chunks.capacity() > 2 * n + 4 {
                self.chunks.shrink_to(n + n / 2);
            }
        }
        self.len -= 1;
        if i == self.len {
            (last, None)
        } else {
            (std::mem::replace(&mut self[i], last), Some(self.len))
        }
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    /// Bytes allocated.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Vec<T>>()
            + self
                .chunks
                .iter()
                .map(|c| c.capacity() * std::mem::size_of::<T>())
                .sum::<usize>()
    }
}

impl<T> Index<usize> for Chunked<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl<T> IndexMut<usize> for Chunked<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}

/// The nodes of a shard, at fixed positions (their runs and index slot name them by position,
/// so moving one would cost as much as its runs): freed positions are reused, and the vector
/// shrinks when its tail is free. Free positions below the last node stay allocated: at most
/// the node count at its peak, whose charge was taken then.
#[derive(Debug, Default)]
struct Nodes {
    slots: Vec<Option<Node>>,
    /// Free positions; may hold stale ones (popped with the tail, or reused), skipped on use.
    free: Vec<u32>,
    live: usize,
}

impl Nodes {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.live
    }

    fn add(&mut self, node: Node) -> usize {
        self.live += 1;
        while let Some(k) = self.free.pop() {
            let k = k as usize;
            if k < self.slots.len() && self.slots[k].is_none() {
                self.slots[k] = Some(node);
                return k;
            }
        }
        self.slots.push(Some(node));
        self.slots.len() - 1
    }

    fn remove(&mut self, n: usize) -> Node {
        let node = self.slots[n].take().expect("a live node");
        self.live -= 1;
        self.free.push(n as u32);
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
        let holes = self.slots.len() - self.live;
        if self.free.len() > 2 * holes + 8 {
            // Stale and repeated positions out, so the list stays O(holes): amortized, as it
            // takes that many frees again to get here.
            let slots = &self.slots;
            self.free
                .retain(|&k| (k as usize) < slots.len() && slots[k as usize].is_none());
            self.free.sort_unstable();
            self.free.dedup();
            self.free.shrink_to(2 * self.free.len() + 8);
        }
        if self.slots.capacity() > 2 * self.slots.len() + 2 {
            self.slots
                .shrink_to(self.slots.len() + self.slots.len() / 2);
        }
        node
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &Node> {
        self.slots.iter().flatten()
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Option<Node>>() + self.free.capacity() * 4
    }
}

impl Index<usize> for Nodes {
    type Output = Node;
    fn index(&self, n: usize) -> &Node {
        self.slots[n].as_ref().expect("a live node")
    }
}

impl IndexMut<usize> for Nodes {
    fn index_mut(&mut self, n: usize) -> &mut Node {
        self.slots[n].as_mut().expect("a live node")
    }
}

/// An `index` entry that names a node (else a one-run entry).
const NODE: u32 = 1 << 31;
/// Runs per shard at most (both slabs together; nodes are fewer), so that positions fit their
/// tables' u32s beside the `NODE` bit. At over 50 bytes charged per run a shard reaches it
/// only past 100 GiB of metadata; a put beyond it is refused.
const MAX_ENTRIES: usize = (NODE - 1) as usize;

/// Table slots charged per entry of `index` or a node's table: 4 bytes and a control byte at
/// the lowest load factor a table keeps (7/32: it shrinks to half once under a quarter full).
pub(super) const TABLE_SLOT: u64 = (5 * 32u64).div_ceil(7);
/// A slab entry's share of the slab's chunk list (a pointer triple per chunk, the list's room
/// up to twice that).
const CHUNK_SHARE: u64 = (2 * std::mem::size_of::<Vec<u8>>() as u64).div_ceil(CHUNK as u64);
/// Charged per object with one run in the shard.
pub(super) const ONE_META: u64 = std::mem::size_of::<OneRun>() as u64 + CHUNK_SHARE + TABLE_SLOT;
/// Charged per run of an object with several in the shard.
pub(super) const NODE_RUN_META: u64 =
    std::mem::size_of::<NodeRun>() as u64 + CHUNK_SHARE + TABLE_SLOT;
/// Charged per node: its slot in the node vector (up to twice its size with the vector's room)
/// and its table's allocation while it never shrinks (16 buckets and a group of control bytes).
pub(super) const NODE_META: u64 = 2 * std::mem::size_of::<Option<Node>>() as u64 + 16 * 5 + 16;

fn hash_oid(h: &KeyedState, oid: &Oid) -> u64 {
    let mut s = h.build_hasher();
    s.write_u64(oid[0]);
    s.write_u64(oid[1]);
    s.write_u64(oid[2]);
    s.finish()
}

fn hash_run(h: &KeyedState, run: u64) -> u64 {
    let mut s = h.build_hasher();
    s.write_u64(run);
    s.finish()
}

/// Where a run is.
#[derive(Clone, Copy, Debug)]
enum Loc {
    /// `ones[i]`.
    One(usize),
    /// `many[i]`, of node `n`.
    Node(usize, usize),
}

/// A shard's runs.
#[derive(Debug)]
pub(super) struct Runs {
    hasher: KeyedState,
    /// The last object id hashed and its hash: a swap device is one object, so nearly every
    /// look-up repeats the last one's.
    last_oid: Cell<(Oid, u64)>,
    /// The last run found or made and where it is: consecutive pages of an object (swap-in
    /// readahead, swap-out, a file read in order) fall in one run 15 times in 16. Forgotten
    /// before anything moves (`run_or_insert` and `remove` are the only changes of position).
    last_loc: Cell<Option<(RunKey, Loc)>>,
    /// By object id: a position in `ones`, or `NODE |` one in `nodes`.
    index: HashTable<u32>,
    ones: Chunked<OneRun>,
    nodes: Nodes,
    many: Chunked<NodeRun>,
    /// The CLOCK hand: a bucket of `index`.
    hand: usize,
}

impl Runs {
    pub(super) fn new(hasher: KeyedState) -> Self {
        Runs {
            hasher,
            last_oid: Cell::new(([0; 3], hash_oid(&hasher, &[0; 3]))),
            last_loc: Cell::new(None),
            index: HashTable::new(),
            ones: Chunked::new(),
            nodes: Nodes::default(),
            many: Chunked::new(),
            hand: 0,
        }
    }

    /// Runs held.
    pub(super) fn len(&self) -> usize {
        self.ones.len() + self.many.len()
    }

    /// Objects with runs here, and how many of them have one run.
    #[cfg(test)]
    pub(super) fn shapes(&self) -> (usize, usize) {
        (self.ones.len() + self.nodes.len(), self.ones.len())
    }

    fn oid_of<'a>(ones: &'a Chunked<OneRun>, nodes: &'a Nodes, e: u32) -> &'a Oid {
        if e & NODE != 0 {
            &nodes[(e & !NODE) as usize].oid
        } else {
            &ones[e as usize].oid
        }
    }

    /// `hash_oid` of `oid`, remembered for the next look-up.
    fn oid_hash(&self, oid: &Oid) -> u64 {
        let (last, h) = self.last_oid.get();
        if last == *oid {
            return h;
        }
        let h = hash_oid(&self.hasher, oid);
        self.last_oid.set((*oid, h));
        h
    }

    /// The object's entry in `index`.
    fn find(&self, oid: &Oid) -> Option<u32> {
        let (ones, nodes) = (&self.ones, &self.nodes);
        self.index
            .find(self.oid_hash(oid), |&e| Self::oid_of(ones, nodes, e) == oid)
            .copied()
    }

    /// Where run `key` is, if it is the last one found.
    fn remembered(&self, key: &RunKey) -> Option<Loc> {
        let loc = self
            .last_loc
            .get()
            .and_then(|(k, loc)| (k == *key).then_some(loc))?;
        debug_assert!(
            match loc {
                Loc::One(i) => self.ones[i].oid == key.oid && self.ones[i].run == key.run,
                Loc::Node(n, i) =>
                    self.many[i].run == key.run
                        && self.many[i].node as usize == n
                        && self.nodes[n].oid == key.oid,
            },
            "a remembered position that moved"
        );
        Some(loc)
    }

    fn locate(&self, key: &RunKey) -> Option<Loc> {
        if let Some(loc) = self.remembered(key) {
            return Some(loc);
        }
        let e = self.find(&key.oid)?;
        let loc = if e & NODE == 0 {
            let i = e as usize;
            (self.ones[i].run == key.run).then_some(Loc::One(i))?
        } else {
            let n = (e & !NODE) as usize;
            let many = &self.many;
            let i = *self.nodes[n]
                .runs
                .find(hash_run(&self.hasher, key.run), |&i| {
                    many[i as usize].run == key.run
                })?;
            Loc::Node(n, i as usize)
        };
        self.last_loc.set(Some((*key, loc)));
        Some(loc)
    }

    pub(super) fn get(&self, key: &RunKey) -> Option<&Run> {
        Some(match self.locate(key)? {
            Loc::One(i) => &self.ones[i].data,
            Loc::Node(_, i) => &self.many[i].data,
        })
    }

    pub(super) fn get_mut(&mut self, key: &RunKey) -> Option<&mut Run> {
        let loc = self.locate(key)?;
        Some(self.run_at(loc))
    }

    /// Repoints `index`'s entry `from` (for object `oid`) to `to`.
    fn repoint_index(&mut self, oid: &Oid, from: u32, to: u32) {
        let slot = self
            .index
            .find_mut(self.oid_hash(oid), |&e| e == from)
            .expect("every entry has its index slot");
        *slot = to;
    }

    /// Removes `ones[i]`, keeping `index` right for the entry that moves into its place.
    fn remove_one(&mut self, i: usize) -> OneRun {
        let (one, moved) = self.ones.swap_remove(i);
        if let Some(from) = moved {
            let oid = self.ones[i].oid;
            self.repoint_index(&oid, from as u32, i as u32);
        }
        one
    }

    /// Removes `many[i]`, keeping its node's table right for the entry that moves into its
    /// place (the caller has taken `i` out of its own node's table).
    fn remove_many(&mut self, i: usize) -> NodeRun {
        let (r, moved) = self.many.swap_remove(i);
        if let Some(from) = moved {
            let (run, n) = (self.many[i].run, self.many[i].node as usize);
            let slot = self.nodes[n]
                .runs
                .find_mut(hash_run(&self.hasher, run), |&x| x as usize == from)
                .expect("every run has its node's slot");
            *slot = i as u32;
        }
        r
    }

    /// Appends a run to node `n`'s slab entries and table.
    fn push_many(&mut self, n: usize, run: u64, data: Run) -> usize {
        let i = self.many.push(NodeRun {
            run,
            node: n as u32,
            data,
        });
        let (h, many) = (&self.hasher, &self.many);
        self.nodes[n]
            .runs
            .insert_unique(hash_run(h, run), i as u32, |&x| {
                hash_run(h, many[x as usize].run)
            });
        i
    }

    /// The run `key`, created empty if missing, and the charge that added (see the `*_META`
    /// constants). `None` if the shard can take no more entries.
    pub(super) fn run_or_insert(&mut self, key: &RunKey) -> Option<(&mut Run, u64)> {
        if let Some(loc) = self.remembered(key) {
            return Some((self.run_at(loc), 0));
        }
        self.last_loc.set(None);
        let h = self.oid_hash(&key.oid);
        let (ones, nodes) = (&self.ones, &self.nodes);
        let found = self
            .index
            .find(h, |&e| Self::oid_of(ones, nodes, e) == &key.oid)
            .copied();
        // Totals: a node going back to one run moves its last run into `ones`.
        let full = self.ones.len() + self.many.len() + 2 > MAX_ENTRIES;
        let (loc, charge) = match found {
            None => {
                if full {
                    return None;
                }
                let i = self.ones.push(OneRun {
                    oid: key.oid,
                    run: key.run,
                    data: Run::Empty,
                });
                let (hs, ones, nodes) = (&self.hasher, &self.ones, &self.nodes);
                self.index
                    .insert_unique(h, i as u32, |&e| hash_oid(hs, Self::oid_of(ones, nodes, e)));
                (Loc::One(i), ONE_META)
            }
            Some(e) if e & NODE == 0 && self.ones[e as usize].run == key.run => {
                (Loc::One(e as usize), 0)
            }
            Some(e) if e & NODE == 0 => {
                // A second run: the object gets a node, and its first run moves there.
                if full {
                    return None;
                }
                let n = self.nodes.add(Node {
                    oid: key.oid,
                    runs: HashTable::new(),
                    hand: 0,
                });
                self.repoint_index(&key.oid, e, NODE | n as u32);
                let first = self.remove_one(e as usize);
                self.push_many(n, first.run, first.data);
                let i = self.push_many(n, key.run, Run::Empty);
                (Loc::Node(n, i), NODE_META + 2 * NODE_RUN_META - ONE_META)
            }
            Some(e) => {
                let n = (e & !NODE) as usize;
                let many = &self.many;
                let at = self.nodes[n]
                    .runs
                    .find(hash_run(&self.hasher, key.run), |&i| {
                        many[i as usize].run == key.run
                    })
                    .copied();
                match at {
                    Some(i) => (Loc::Node(n, i as usize), 0),
                    None if full => return None,
                    None => (
                        Loc::Node(n, self.push_many(n, key.run, Run::Empty)),
                        NODE_RUN_META,
                    ),
                }
            }
        };
        // Every move is done: the position holds until the next change.
        self.last_loc.set(Some((*key, loc)));
        Some((self.run_at(loc), charge))
    }

    fn run_at(&mut self, loc: Loc) -> &mut Run {
        match loc {
            Loc::One(i) => &mut self.ones[i].data,
            Loc::Node(_, i) => &mut self.many[i].data,
        }
    }

    /// Takes run `key` out; returns it and the charge that frees.
    pub(super) fn remove(&mut self, key: &RunKey) -> Option<(Run, u64)> {
        let loc = self.locate(key)?;
        self.last_loc.set(None);
        let r = match loc {
            Loc::One(i) => {
                let h = self.oid_hash(&key.oid);
                self.index
                    .find_entry(h, |&e| e == i as u32)
                    .expect("every entry has its index slot")
                    .remove();
                let one = self.remove_one(i);
                (one.data, ONE_META)
            }
            Loc::Node(n, i) => {
                let h = hash_run(&self.hasher, key.run);
                let node = &mut self.nodes[n];
                node.runs
                    .find_entry(h, |&x| x as usize == i)
                    .expect("every run has its node's slot")
                    .remove();
                let left = node.runs.len();
                let r = self.remove_many(i);
                let mut freed = NODE_RUN_META;
                if left == 1 {
                    // Back to one run: a node of one would keep the room of every run it held.
                    let j = *self.nodes[n].runs.iter().next().expect("one left") as usize;
                    let last = self.remove_many(j);
                    let k = self.ones.push(OneRun {
                        oid: key.oid,
                        run: last.run,
                        data: last.data,
                    });
                    self.repoint_index(&key.oid, NODE | n as u32, k as u32);
                    self.nodes.remove(n);
                    freed += NODE_META + NODE_RUN_META - ONE_META;
                } else {
                    shrink_table(&mut self.nodes[n].runs, &self.hasher, &self.many);
                }
                (r.data, freed)
            }
        };
        shrink_index(&mut self.index, &self.hasher, &self.ones, &self.nodes);
        Some(r)
    }

    /// Run numbers of object `oid` here.
    pub(super) fn runs_of(&self, oid: &Oid) -> Vec<u64> {
        match self.find(oid) {
            None => Vec::new(),
            Some(e) if e & NODE == 0 => vec![self.ones[e as usize].run],
            Some(e) => self.nodes[(e & !NODE) as usize]
                .runs
                .iter()
                .map(|&i| self.many[i as usize].run)
                .collect(),
        }
    }

    /// Every run with its key.
    pub(super) fn iter(&self) -> impl Iterator<Item = (RunKey, &Run)> {
        let ones = self.ones.iter().map(|o| {
            (
                RunKey {
                    oid: o.oid,
                    run: o.run,
                },
                &o.data,
            )
        });
        let many = self.many.iter().map(|r| {
            (
                RunKey {
                    oid: self.nodes[r.node as usize].oid,
                    run: r.run,
                },
                &r.data,
            )
        });
        ones.chain(many)
    }

    /// The run the CLOCK hand stops at: the next one without a reference bit, clearing the
    /// bits of those it passes. `steps` counts the entries looked at.
    pub(super) fn clock_victim(&mut self, steps: &mut u64) -> Option<RunKey> {
        if self.len() == 0 {
            return None;
        }
        // Every bit the hand passes is cleared and nothing sets one meanwhile (the caller
        // holds the shard lock), so a run is found within two sweeps after the first wrap;
        // the count of wraps only guards that.
        let mut wraps = 0;
        loop {
            if self.hand >= self.index.num_buckets() {
                self.hand = 0;
                wraps += 1;
                if wraps > 3 {
                    return None;
                }
            }
            *steps += 1;
            let Some(&e) = self.index.get_bucket(self.hand) else {
                self.hand += 1;
                continue;
            };
            if e & NODE == 0 {
                let one = &mut self.ones[e as usize];
                if !one.data.second_chance() {
                    return Some(RunKey {
                        oid: one.oid,
                        run: one.run,
                    });
                }
                self.hand += 1;
                continue;
            }
            let node = &mut self.nodes[(e & !NODE) as usize];
            while node.hand < node.runs.num_buckets() {
                *steps += 1;
                let Some(&i) = node.runs.get_bucket(node.hand) else {
                    node.hand += 1;
                    continue;
                };
                let r = &mut self.many[i as usize];
                if !r.data.second_chance() {
                    return Some(RunKey {
                        oid: node.oid,
                        run: r.run,
                    });
                }
                node.hand += 1;
            }
            node.hand = 0;
            self.hand += 1;
        }
    }

    /// Bytes allocated: tables, slabs, nodes (what the charges above must cover).
    #[cfg(test)]
    pub(super) fn allocated(&self) -> usize {
        let table = |t: &HashTable<u32>| {
            if t.num_buckets() == 0 {
                0
            } else {
                t.num_buckets() * 5 + 16
            }
        };
        table(&self.index)
            + self.ones.bytes()
            + self.many.bytes()
            + self.nodes.bytes()
            + self.nodes.iter().map(|n| table(&n.runs)).sum::<usize>()
    }
}

/// Gives back a table's room once it is under a quarter full, so that one that once held many
/// entries does not keep their room when few remain (nothing is charged for it then).
/// Shrinking to half full means it takes as many removals again to shrink once more:
/// amortized O(1) per removal.
fn shrink_index(index: &mut HashTable<u32>, h: &KeyedState, ones: &Chunked<OneRun>, nodes: &Nodes) {
    if index.capacity() > 16 && index.capacity() > 4 * index.len() {
        index.shrink_to(2 * index.len(), |&e| {
            hash_oid(h, Runs::oid_of(ones, nodes, e))
        });
    }
}

fn shrink_table(t: &mut HashTable<u32>, h: &KeyedState, many: &Chunked<NodeRun>) {
    if t.capacity() > 16 && t.capacity() > 4 * t.len() {
        t.shrink_to(2 * t.len(), |&i| hash_run(h, many[i as usize].run));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(o: u64, run: u64) -> RunKey {
        RunKey {
            oid: [o, 0, 0],
            run,
        }
    }

    fn put(r: &mut Runs, k: &RunKey, bit: u32, w: u64) -> u64 {
        let (run, charge) = r.run_or_insert(k).expect("room");
        run.put(bit, Slot::same(w));
        charge
    }

    fn word(r: &Runs, k: &RunKey, bit: u32) -> Option<u64> {
        match r.get(k)?.get(bit)?.payload() {
            super::super::slot::Payload::Same(w) => Some(w),
            _ => None,
        }
    }

    /// The run last found is remembered, and forgotten before entries move: an object
    /// getting its second run moves another object's entry into its slab position, and a
    /// removal moves the last entry into the removed one's; each then is found where it is.
    #[test]
    fn the_run_last_found_is_forgotten_when_entries_move() {
        let mut r = Runs::new(KeyedState::new());
        let (a, b, c) = (key(1, 0), key(2, 0), key(3, 0));
        put(&mut r, &a, 0, 10);
        put(&mut r, &b, 0, 20);
        put(&mut r, &c, 0, 30);
        // c is remembered at its position; a's second run moves c into a's.
        assert_eq!(word(&r, &c, 0), Some(30));
        put(&mut r, &key(1, 1), 0, 11);
        assert_eq!(word(&r, &c, 0), Some(30));
        assert_eq!(
            put(&mut r, &c, 1, 31),
            0,
            "c's run is found, not made again"
        );
        assert_eq!((word(&r, &c, 0), word(&r, &c, 1)), (Some(30), Some(31)));
        // Removals with another run remembered: the rest stay found where they are now.
        assert_eq!(word(&r, &b, 0), Some(20));
        assert!(r.remove(&c).is_some());
        assert_eq!(word(&r, &c, 0), None);
        assert_eq!(word(&r, &b, 0), Some(20));
        assert!(r.remove(&b).is_some());
        assert_eq!(word(&r, &b, 0), None);
        assert_eq!(
            (word(&r, &a, 0), word(&r, &key(1, 1), 0)),
            (Some(10), Some(11))
        );
    }

    #[test]
    fn a_run_keeps_its_pages_in_index_order_inline_then_behind_a_pointer() {
        let mut r = Run::Empty;
        assert_eq!(r.put(5, Slot::same(5)).map(|s| s.len()), None);
        assert!(matches!(r, Run::One(_)));
        assert_eq!((r.present(), r.heap_bytes()), (1 << 5, 0));
        r.set_referenced(true);
        // Replacing keeps the run's bits.
        assert!(r.put(5, Slot::same(6)).is_some());
        assert!(r.referenced() && r.present() == 1 << 5);
        r.put(2, Slot::same(2));
        r.put(9, Slot::same(9));
        assert!(r.referenced(), "the reference bit moves with the run");
        assert_eq!(r.present(), (1 << 2) | (1 << 5) | (1 << 9));
        let words: Vec<_> = r.slots().iter().map(|s| s.payload()).collect();
        use super::super::slot::Payload::Same;
        assert_eq!(words, [Same(2), Same(6), Same(9)]);
        let held = r.heap_bytes();
        assert_eq!(held, (std::mem::size_of::<ManyRun>() + 4 * 16) as u64);
        assert_eq!(r.take(5).map(|s| s.payload() == Same(6)), Some(true));
        assert!(r.take(5).is_none());
        assert_eq!(r.heap_bytes(), held, "the room stays while the run lives");
        assert_eq!(r.get(9).map(|s| s.payload()), Some(Same(9)));
        let mut one = Run::Empty;
        one.put(3, Slot::same(1));
        assert!(one.take(4).is_none());
        assert_eq!(one.take(3).map(|s| s.payload() == Same(1)), Some(true));
        assert!(matches!(one, Run::Empty) && one.len() == 0);
    }

    #[test]
    fn objects_move_between_one_run_and_a_node_and_every_run_stays_found() {
        let mut r = Runs::new(KeyedState::new());
        let mut charged = 0;
        // 300 objects of one run, 20 of many: the slabs move entries on every removal.
        for o in 0..300 {
            charged += put(&mut r, &key(o, o * 7), 1, o);
        }
        for o in 300..320 {
            for run in 0..40 {
                charged += put(&mut r, &key(o, run), 0, o * 1000 + run);
            }
        }
        assert_eq!(r.len(), 300 + 20 * 40);
        assert_eq!(r.shapes(), (320, 300));
        assert_eq!(
            charged,
            300 * ONE_META + 20 * (NODE_META + 40 * NODE_RUN_META)
        );
        assert!(
            r.allocated() as u64 <= charged,
            "{} > {charged}",
            r.allocated()
        );
        // A second run makes a node of a one-run object; removing it makes it one again.
        charged += put(&mut r, &key(5, 1), 3, 55);
        assert_eq!(r.shapes(), (320, 299));
        let mut runs = r.runs_of(&[5, 0, 0]);
        runs.sort();
        assert_eq!(runs, [1, 35]);
        let (_, f) = r.remove(&key(5, 35)).expect("there");
        charged -= f;
        assert_eq!(r.shapes(), (320, 300));
        assert_eq!(word(&r, &key(5, 1), 3), Some(55));
        // Remove every other object's runs, in an order that moves entries around.
        for o in (0..320).rev().step_by(2) {
            for run in r.runs_of(&[o, 0, 0]) {
                let (_, f) = r.remove(&key(o, run)).expect("listed");
                charged -= f;
            }
            assert!(r.runs_of(&[o, 0, 0]).is_empty());
        }
        for o in 0..320 {
            let left = o % 2 == 0;
            if o < 300 {
                let want = if o == 5 { None } else { Some(o) };
                assert_eq!(
                    word(&r, &key(o, o * 7), 1),
                    want.filter(|_| left),
                    "object {o}"
                );
            } else {
                for run in 0..40 {
                    let want = left.then_some(o * 1000 + run);
                    assert_eq!(word(&r, &key(o, run), 0), want, "object {o} run {run}");
                }
            }
        }
        let listed: u64 = r.iter().map(|(_, run)| run.len() as u64).sum();
        assert_eq!(listed, r.len() as u64);
        assert!(
            r.allocated() as u64 <= charged + 64 * 48,
            "{} > {charged}",
            r.allocated()
        );
        // Everything out: nothing charged, next to nothing held.
        let keys: Vec<_> = r.iter().map(|(k, _)| k).collect();
        for k in keys {
            charged -= r.remove(&k).expect("listed").1;
        }
        assert_eq!((charged, r.len(), r.shapes()), (0, 0, (0, 0)));
        assert!(r.allocated() < 1024, "{}", r.allocated());
    }

    #[test]
    fn random_puts_and_removals_match_a_map() {
        use std::collections::HashMap;
        let mut r = Runs::new(KeyedState::new());
        let mut model: HashMap<(u64, u64), u64> = HashMap::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut charged = 0u64;
        let mut prev = key(0, 0);
        for step in 0..40_000u64 {
            // Few objects and runs: objects keep moving between one run and a node.
            let k = key(next() % 40, next() % 12);
            // The previous key is looked up (and remembered) before the change, and again
            // after it: a position the change moved must not be used.
            let _ = word(&r, &prev, 0);
            if next() % 3 == 0 {
                let had = model.remove(&(k.oid[0], k.run));
                let got = r.remove(&k).map(|(run, f)| {
                    charged -= f;
                    match run.get(0).map(|s| s.payload()) {
                        Some(super::super::slot::Payload::Same(w)) => w,
                        _ => panic!("a run of one page at bit 0"),
                    }
                });
                assert_eq!(got, had, "remove {k:?} at step {step}");
            } else {
                charged += put(&mut r, &k, 0, step);
                model.insert((k.oid[0], k.run), step);
            }
            assert_eq!(
                word(&r, &prev, 0),
                model.get(&(prev.oid[0], prev.run)).copied(),
                "{prev:?} after a change to {k:?} at step {step}"
            );
            assert_eq!(word(&r, &k, 0), model.get(&(k.oid[0], k.run)).copied());
            prev = k;
            if step % 1000 == 0 {
                assert_eq!(r.len(), model.len());
                for (key, run) in r.iter() {
                    assert_eq!(
                        model.get(&(key.oid[0], key.run)).copied(),
                        word(&r, &key, 0),
                        "{key:?}"
                    );
                    assert_eq!(run.len(), 1);
                }
                let objects: std::collections::HashSet<u64> = model.keys().map(|k| k.0).collect();
                assert_eq!(r.shapes().0, objects.len());
                assert!(
                    r.allocated() as u64 <= charged + 4096,
                    "{} > {charged}",
                    r.allocated()
                );
            }
        }
    }

    #[test]
    fn the_clock_finds_a_run_among_sparse_node_tables() {
        // Nodes whose tables are far emptier than their room: a sweep costs their buckets,
        // not their runs, and must still end at a run.
        let mut r = Runs::new(KeyedState::new());
        for o in 0..1000 {
            for run in 0..8 {
                put(&mut r, &key(o, run), 0, run);
            }
            for run in 2..8 {
                r.remove(&key(o, run)).expect("there");
            }
        }
        let keys: Vec<_> = r.iter().map(|(k, _)| k).collect();
        for k in &keys {
            r.get_mut(k).expect("there").set_referenced(true);
        }
        let mut steps = 0;
        for left in (1..=keys.len()).rev() {
            assert_eq!(r.len(), left);
            let k = r.clock_victim(&mut steps).expect("a run is left");
            r.remove(&k).expect("there");
        }
        assert!(r.clock_victim(&mut steps).is_none());
    }

    #[test]
    fn charges_cover_tables_left_emptier_by_removals() {
        let mut r = Runs::new(KeyedState::new());
        let mut charged = 0;
        for o in 0..7169 {
            charged += put(&mut r, &key(o, 0), 0, o);
        }
        assert!(
            r.allocated() as u64 <= charged,
            "{} > {charged}",
            r.allocated()
        );
        for o in 3582..7169 {
            charged -= r.remove(&key(o, 0)).expect("there").1;
        }
        assert!(
            r.allocated() as u64 <= charged,
            "{} > {charged}",
            r.allocated()
        );
        // Nodes of two runs whose tables once held eight.
        let mut r = Runs::new(KeyedState::new());
        let mut charged = 0;
        for o in 0..500 {
            for run in 0..8 {
                charged += put(&mut r, &key(o, run), 0, run);
            }
            for run in 2..8 {
                charged -= r.remove(&key(o, run)).expect("there").1;
            }
        }
        assert!(
            r.allocated() as u64 <= charged,
            "{} > {charged}",
            r.allocated()
        );
    }

    #[test]
    fn freed_node_positions_are_reused_and_a_free_tail_goes() {
        let mut r = Runs::new(KeyedState::new());
        // A big object's node last, then small nodes freed before it, in a loop: no node
        // moves, every run stays found, and the free list stays small.
        for o in 0..50 {
            put(&mut r, &key(o, 0), 0, o);
            put(&mut r, &key(o, 1), 0, o);
        }
        for run in 0..500 {
            put(&mut r, &key(999, run), 0, run);
        }
        for round in 0..20u64 {
            for o in 0..50 {
                r.remove(&key(o, 1)).expect("there");
                put(&mut r, &key(o, 1), 0, round);
            }
        }
        assert!(r.nodes.free.len() <= 2 * (r.nodes.slots.len() - r.nodes.live) + 8);
        for run in 0..500 {
            assert_eq!(word(&r, &key(999, run), 0), Some(run));
        }
        let big: Vec<_> = (0..500).map(|run| key(999, run)).collect();
        for k in &big {
            r.remove(k).expect("there");
        }
        for o in 0..50 {
            assert_eq!(word(&r, &key(o, 1), 0), Some(19));
            r.remove(&key(o, 1)).expect("there");
            r.remove(&key(o, 0)).expect("there");
        }
        assert_eq!((r.len(), r.nodes.len(), r.nodes.slots.len()), (0, 0, 0));
    }

    #[test]
    fn the_clock_passes_referenced_runs_once_and_stops_at_the_others() {
        let mut r = Runs::new(KeyedState::new());
        for o in 0..50 {
            put(&mut r, &key(o, 0), 0, o);
        }
        for run in 0..50 {
            put(&mut r, &key(99, run), 0, run);
        }
        let hot = |k: &RunKey| {
            k.oid[0].is_multiple_of(2) && k.oid[0] != 99
                || k.oid[0] == 99 && k.run.is_multiple_of(2)
        };
        let keys: Vec<_> = r.iter().map(|(k, _)| k).collect();
        for k in &keys {
            if hot(k) {
                r.get_mut(k).expect("there").set_referenced(true);
            }
        }
        // The 50 cold runs go first, each found without a full sweep per eviction.
        let mut steps = 0;
        for _ in 0..50 {
            let k = r.clock_victim(&mut steps).expect("a victim");
            assert!(!hot(&k), "{k:?} was referenced");
            r.remove(&k).expect("there");
        }
        assert!(
            steps < 10 * 100,
            "{steps} steps for 50 evictions of 100 runs"
        );
        // Their bits were cleared on the way: the rest go too, then nothing is left.
        for _ in 0..50 {
            let k = r.clock_victim(&mut steps).expect("a victim");
            r.remove(&k).expect("there");
        }
        assert!(r.clock_victim(&mut steps).is_none());
    }
}
