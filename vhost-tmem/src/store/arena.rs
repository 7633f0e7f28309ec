// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Payload memory: a size-class slab arena, so that the memory limit means resident memory.
//!
//! With payloads in the C heap, freed space stayed resident (per-thread malloc arenas, holes
//! between live blocks) and the daemon's RSS reached 2-3 times its limit. Here payloads live in
//! 32 KiB chunks of one size class each (64-byte granules), carved from 2 MiB regions obtained
//! with mmap. A chunk whose last object is freed goes back to the kernel (MADV_DONTNEED), after
//! a cache of warm chunks (1/16 of the limit, emptied when a pool is drained), so memory is
//! returned after frees. Objects never move, so freed
//! slots in partly used chunks are fragmentation: the arena counts it ([`Arena::overhead`])
//! and the budget charges it against the global limit, so that accounting and RSS agree under
//! any pattern of puts and frees.
//!
//! Each thread allocates from one of a few shards (chosen per thread), each with its own lock,
//! so puts on different workers do not contend; a free locks the shard that owns the chunk.

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

/// Allocation granule: every payload is rounded up to a multiple of it.
pub(super) const GRANULE: usize = 64;
/// The largest payload (a raw page is 4 KiB; a codec's worst case is a little over).
pub(super) const MAX_PAYLOAD: usize = 8192;
/// Size classes: GRANULE, 2 * GRANULE, ..., MAX_PAYLOAD.
const CLASSES: usize = MAX_PAYLOAD / GRANULE;
/// A chunk: objects of one class. Aligned, so an object finds its chunk by masking.
const CHUNK: usize = 32 << 10;
/// A region: mapped at once, aligned; its first chunk holds the other chunks' headers.
const REGION: usize = 2 << 20;
const CHUNKS_PER_REGION: usize = REGION / CHUNK;
/// Empty chunks kept resident for reuse, as a share of the memory limit (1/16), so that a
/// store that is emptied and refilled does not fault its memory in again, and at most
/// `WARM_MAX` bytes. Given back when a pool is drained ([`Arena::purge`]).
const WARM_SHARE: u64 = 16;
const WARM_MAX: u64 = 256 << 20;
/// Allocation shards; threads are spread over them.
const SHARDS: usize = 4;
/// Resident bytes of a region's header chunk (only its first page is ever touched).
const HEADER_PAGE: u64 = 4096;
/// The most overhead the limit tolerates before it counts: about one partly used chunk per
/// shard for each of the 64 classes a page can take, so that chunk granularity does not eat
/// a limit. Part of the documented bound of RSS over the limit.
pub(super) const SLACK: u64 = (SHARDS * (4096 / GRANULE) * CHUNK) as u64;
/// The tolerated overhead is at most this share of the limit (1/32), so that resident memory
/// stays within a few percent of a smaller limit too; but never under half of [`SLACK`], so
/// that the partly used chunks of a few dozen classes do not take a tiny limit's room.
const SLACK_SHARE: u64 = 32;

/// What one payload of `len` bytes occupies (and is charged): its size class (0 for none).
pub(super) fn class_size(len: usize) -> usize {
    len.div_ceil(GRANULE) * GRANULE
}

/// A chunk's bookkeeping, in its region's header chunk; changed only under the owning shard's
/// lock, except `inner`, `shard` and `class`, which are fixed while the chunk has objects.
#[repr(C)]
struct Header {
    inner: *const Inner,
    shard: u32,
    class: u32,
    /// Objects handed out and not freed.
    live: u32,
    /// Objects ever handed out from the untouched end (the rest were never used).
    bump: u32,
    /// Offset + 1 of the first free object (0: none); a free object holds the next as u32.
    free: u32,
    /// The shard's list of chunks with room, for this class (chunk addresses, 0: none).
    prev: usize,
    next: usize,
}

const _: () = assert!(CHUNKS_PER_REGION * std::mem::size_of::<Header>() <= HEADER_PAGE as usize);

fn header(chunk: usize) -> *mut Header {
    let region = chunk & !(REGION - 1);
    let index = (chunk - region) / CHUNK;
    (region as *mut Header).wrapping_add(index)
}

/// Per shard: for each class, the first chunk of the list of chunks with room.
struct Shard {
    heads: [usize; CLASSES],
}

/// A shard with its live bytes beside its lock, on its own cache lines, so that threads on
/// different shards share no written memory.
#[repr(align(128))]
struct ShardCell {
    lock: Mutex<Shard>,
    /// Bytes of live objects in this shard's chunks, by size class.
    live: AtomicU64,
}

#[derive(Default)]
struct Chunks {
    regions: Vec<usize>,
    /// Empty chunks still resident.
    warm: Vec<usize>,
    /// Empty chunks given back to the kernel.
    clean: Vec<usize>,
    /// Next never-used chunk of the newest region (0: none).
    fresh: usize,
}

struct Inner {
    shards: [ShardCell; SHARDS],
    chunks: Mutex<Chunks>,
    /// Resident bytes: chunks held by shards and header pages.
    held: AtomicU64,
    /// Resident bytes of warm (empty, not yet returned) chunks.
    warm: AtomicU64,
    /// The most warm bytes kept.
    warm_cap: AtomicU64,
    /// Overhead not charged: [`SLACK`], or less for a small limit.
    slack: AtomicU64,
}

// SAFETY: the raw addresses in Inner name memory it owns (its regions); every access to chunk
// headers and free lists is under the owning shard's lock.
unsafe impl Send for Inner {}
// SAFETY: as for Send.
unsafe impl Sync for Inner {}

/// The payload arena of one engine. Dropped, it unmaps its regions once every payload is
/// freed (payloads may outlive the engine inside clients that still hold their pools).
pub(super) struct Arena {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("held", &self.inner.held.load(Relaxed))
            .field("warm", &self.inner.warm.load(Relaxed))
            .field("live", &self.inner.live())
            .finish()
    }
}

fn thread_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SHARD: Cell<usize> = const { Cell::new(usize::MAX) });
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Relaxed) % SHARDS);
        }
        s.get()
    })
}

impl Default for Arena {
    fn default() -> Self {
        Arena {
            inner: Arc::new(Inner {
                shards: std::array::from_fn(|_| ShardCell {
                    lock: Mutex::new(Shard {
                        heads: [0; CLASSES],
                    }),
                    live: AtomicU64::new(0),
                }),
                chunks: Mutex::new(Chunks::default()),
                held: AtomicU64::new(0),
                warm: AtomicU64::new(0),
                warm_cap: AtomicU64::new(0),
                slack: AtomicU64::new(SLACK),
            }),
        }
    }
}

impl Arena {
    /// Resident bytes not holding live payload (free slots in partly used chunks, chunk
    /// tails and header pages) beyond the slack ([`SLACK`], less for a limit under 256 MiB):
    /// charged against the global limit. Warm empty
    /// chunks are not: they are reused before any new chunk, so with them the arena never
    /// holds more than its charged peak.
    pub(super) fn overhead(&self) -> u64 {
        let held = self.inner.held.load(Relaxed);
        held.saturating_sub(self.inner.live() + self.inner.slack.load(Relaxed))
    }

    /// Resident bytes of the arena (payloads, overhead, warm chunks).
    pub(super) fn resident(&self) -> u64 {
        self.inner.held.load(Relaxed) + self.inner.warm.load(Relaxed)
    }

    /// Follows the memory limit: how many empty chunks stay warm, how much overhead is free.
    pub(super) fn set_limit(&self, limit: u64) {
        self.inner
            .slack
            .store((limit / SLACK_SHARE).clamp(SLACK / 2, SLACK), Relaxed);
        self.inner
            .warm_cap
            .store((limit / WARM_SHARE).min(WARM_MAX), Relaxed);
    }

    /// Returns every warm chunk to the kernel.
    pub(super) fn purge(&self) {
        self.inner.purge();
    }

    /// Copies `bytes` (1..=MAX_PAYLOAD) into a new object of its size class.
    pub(super) fn alloc_copy(&self, bytes: &[u8]) -> NonNull<u8> {
        // SAFETY: `bytes` is `bytes.len()` readable bytes of another allocation.
        unsafe { self.alloc_copy_raw(bytes.as_ptr(), bytes.len()) }
    }

    /// Copies `len` (1..=MAX_PAYLOAD) bytes at `src` into a new object of its size class, in
    /// one read of `src`: for pages in guest memory, which no Rust reference may cover.
    ///
    /// # Safety
    /// `src` is valid for reads of `len` bytes and does not point into this arena's free
    /// objects (any other memory, guest memory included, is fine).
    pub(super) unsafe fn alloc_copy_raw(&self, src: *const u8, len: usize) -> NonNull<u8> {
        assert!(len > 0 && len <= MAX_PAYLOAD);
        let class = len.div_ceil(GRANULE) - 1;
        let size = (class + 1) * GRANULE;
        let per_chunk = (CHUNK / size) as u32;
        let inner = &*self.inner;
        let si = thread_shard();
        let next;
        let p = {
            let cell = &inner.shards[si];
            cell.live.fetch_add(size as u64, Relaxed);
            let mut sh = cell.lock.lock();
            let mut chunk = sh.heads[class];
            if chunk == 0 {
                chunk = inner.take_chunk();
                // SAFETY: `chunk` is an unused chunk of one of our regions; its header is ours
                // alone until it is published in the shard's list, under the shard lock.
                unsafe {
                    header(chunk).write(Header {
                        inner: Arc::as_ptr(&self.inner),
                        shard: si as u32,
                        class: class as u32,
                        live: 0,
                        bump: 0,
                        free: 0,
                        prev: 0,
                        next: 0,
                    })
                };
                sh.heads[class] = chunk;
            }
            // SAFETY: the chunk is in this shard's list, so its header is valid and guarded
            // by the lock we hold; a free object's first 4 bytes hold the next free offset.
            unsafe {
                let h = header(chunk);
                let off = if (*h).free != 0 {
                    let off = ((*h).free - 1) as usize;
                    (*h).free = ((chunk + off) as *const u32).read();
                    off
                } else {
                    (*h).bump += 1;
                    ((*h).bump - 1) as usize * size
                };
                (*h).live += 1;
                // The object this class hands out next in this chunk, if it has one.
                next = if (*h).free != 0 {
                    chunk + ((*h).free - 1) as usize
                } else if (*h).bump < per_chunk {
                    chunk + (*h).bump as usize * size
                } else {
                    0
                };
                if (*h).live == per_chunk {
                    // Full: leaves the list of chunks with room.
                    let next = (*h).next;
                    sh.heads[class] = next;
                    if next != 0 {
                        (*header(next)).prev = 0;
                    }
                    (*h).next = 0;
                }
                (chunk + off) as *mut u8
            }
        };
        // SAFETY: `p` is a free object of `size >= len` bytes in a mapped chunk, now ours;
        // `src` is readable for `len` bytes and is not this free object (caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(src, p, len) };
        if next != 0 {
            prefetch_for_write(next, size);
        }
        NonNull::new(p).expect("chunk addresses are not null")
    }
}

/// Asks for the `len` bytes at `addr` to be brought into the cache (`prefetchw` where the
/// build enables it, `prefetcht0` otherwise): the next object of a class was last written
/// long ago, and a copy into cold memory stalls the put that makes it (the next locked
/// instruction waits for every missed store). Prefetching it one put of that class ahead
/// hides the misses behind the compression of the pages between.
fn prefetch_for_write(addr: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (addr..addr + len).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        // SAFETY: a prefetch is a hint: it never faults and changes no memory, whatever the
        // address (SSE is part of x86_64).
        unsafe { _mm_prefetch::<_MM_HINT_ET0>(line as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (addr, len);
}

/// Frees an object of `len` bytes that [`Arena::alloc_copy`] returned.
///
/// # Safety
/// `p` came from `alloc_copy` of `len` bytes and is freed once.
pub(super) unsafe fn free(p: NonNull<u8>, len: usize) {
    let addr = p.as_ptr() as usize;
    let chunk = addr & !(CHUNK - 1);
    let h = header(chunk);
    // SAFETY: the object is live, so its chunk is held and `inner`, `shard` and `class` are
    // fixed (written before the object was handed out, which happened-before our caller got
    // it); the Inner is alive because chunks with objects keep it alive.
    let (inner, si, class) = unsafe { ((*h).inner, (*h).shard as usize, (*h).class as usize) };
    let size = (class + 1) * GRANULE;
    debug_assert_eq!(size, class_size(len));
    let per_chunk = (CHUNK / size) as u32;
    // SAFETY: as above.
    let inner_ref = unsafe { &*inner };
    let empty = {
        let cell = &inner_ref.shards[si];
        let mut sh = cell.lock.lock();
        cell.live.fetch_sub(size as u64, Relaxed);
        // SAFETY: the header is guarded by the owning shard's lock, held; the object is ours
        // to reuse as a free-list link. Raw field accesses only: other threads read `inner`,
        // `shard` and `class` unlocked.
        unsafe {
            (addr as *mut u32).write((*h).free);
            (*h).free = (addr - chunk) as u32 + 1;
            let was_full = (*h).live == per_chunk;
            (*h).live -= 1;
            let (prev, next) = ((*h).prev, (*h).next);
            if (*h).live == 0 {
                if !was_full {
                    // Unlink from the list of chunks with room.
                    if prev != 0 {
                        (*header(prev)).next = next;
                    } else {
                        sh.heads[class] = next;
                    }
                    if next != 0 {
                        (*header(next)).prev = prev;
                    }
                }
                true
            } else {
                if was_full {
                    // Has room again: first in the list, so it fills up before fresh chunks.
                    let head = sh.heads[class];
                    (*h).prev = 0;
                    (*h).next = head;
                    if head != 0 {
                        (*header(head)).prev = chunk;
                    }
                    sh.heads[class] = chunk;
                }
                false
            }
        }
    };
    if empty {
        inner_ref.give_chunk(chunk);
        // SAFETY: the reference `take_chunk` took for this chunk; the Inner is not used after.
        unsafe { Arc::decrement_strong_count(inner) };
    }
}

impl Inner {
    /// Bytes of live objects, by size class.
    fn live(&self) -> u64 {
        self.shards.iter().map(|c| c.live.load(Relaxed)).sum()
    }

    /// A chunk for a shard; keeps the Inner alive until the chunk is given back.
    fn take_chunk(self: &Inner) -> usize {
        let mut c = self.chunks.lock();
        let chunk = if let Some(ch) = c.warm.pop() {
            self.warm.fetch_sub(CHUNK as u64, Relaxed);
            self.held.fetch_add(CHUNK as u64, Relaxed);
            ch
        } else if let Some(ch) = c.clean.pop() {
            self.held.fetch_add(CHUNK as u64, Relaxed);
            ch
        } else {
            if c.fresh == 0 {
                let region = map_region();
                self.held.fetch_add(HEADER_PAGE, Relaxed);
                c.regions.push(region);
                c.fresh = region + CHUNK;
            }
            let ch = c.fresh;
            c.fresh += CHUNK;
            if c.fresh.is_multiple_of(REGION) {
                c.fresh = 0;
            }
            self.held.fetch_add(CHUNK as u64, Relaxed);
            ch
        };
        // SAFETY: `self` is the Inner of a live Arc (an Arena or a held chunk refers to it).
        unsafe { Arc::increment_strong_count(self as *const Inner) };
        chunk
    }

    /// Takes back an empty chunk: kept warm, or returned to the kernel.
    fn give_chunk(&self, chunk: usize) {
        let mut c = self.chunks.lock();
        self.held.fetch_sub(CHUNK as u64, Relaxed);
        if ((c.warm.len() + 1) * CHUNK) as u64 <= self.warm_cap.load(Relaxed) {
            c.warm.push(chunk);
            self.warm.fetch_add(CHUNK as u64, Relaxed);
            return;
        }
        release(chunk);
        c.clean.push(chunk);
    }

    fn purge(&self) {
        let mut c = self.chunks.lock();
        let warm = std::mem::take(&mut c.warm);
        for &ch in &warm {
            release(ch);
        }
        c.clean.extend(warm);
        self.warm.store(0, Relaxed);
    }
}

/// Gives an empty chunk's memory back to the kernel (it reads as zeros when next touched).
fn release(chunk: usize) {
    // SAFETY: the chunk is ours and empty: no live object points into it.
    let r = unsafe { libc::madvise(chunk as *mut libc::c_void, CHUNK, libc::MADV_DONTNEED) };
    debug_assert_eq!(r, 0, "madvise(MADV_DONTNEED) of an owned chunk");
}

impl Drop for Inner {
    fn drop(&mut self) {
        for &r in &self.chunks.get_mut().regions {
            // SAFETY: the region was mapped by `map_region`; nothing refers to it any more
            // (every chunk was given back, or the Inner would still be referenced).
            unsafe { libc::munmap(r as *mut libc::c_void, REGION) };
        }
    }
}

/// Maps a REGION-aligned region; aborts like the global allocator when memory is exhausted.
fn map_region() -> usize {
    let len = 2 * REGION;
    // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::alloc::handle_alloc_error(
            std::alloc::Layout::from_size_align(REGION, REGION).unwrap(),
        );
    }
    let start = p as usize;
    let aligned = start.next_multiple_of(REGION);
    // SAFETY: both ranges lie in the mapping just made and are not used by anyone.
    unsafe {
        if aligned > start {
            libc::munmap(p, aligned - start);
        }
        let end = aligned + REGION;
        if start + len > end {
            libc::munmap(end as *mut libc::c_void, start + len - end);
        }
        // Transparent huge pages would make RSS move in 2 MiB steps and keep freed chunks
        // resident; chunks are returned in 32 KiB units.
        libc::madvise(aligned as *mut libc::c_void, REGION, libc::MADV_NOHUGEPAGE);
    }
    aligned
}

impl Drop for Arena {
    fn drop(&mut self) {
        // Warm chunks hold no reference; the regions go when the last held chunk does.
        self.inner.purge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(a: &Arena, len: usize, fill: u8) -> (NonNull<u8>, usize) {
        (a.alloc_copy(&vec![fill; len]), len)
    }

    fn read(p: NonNull<u8>, len: usize) -> Vec<u8> {
        // SAFETY: a live object of `len` bytes.
        unsafe { std::slice::from_raw_parts(p.as_ptr(), len) }.to_vec()
    }

    #[test]
    fn objects_keep_their_bytes_and_memory_is_returned() {
        let a = Arena::default();
        a.set_limit(16 << 20);
        let mut objs = Vec::new();
        for i in 0..5000usize {
            let len = 1 + (i * 37) % 4096;
            objs.push((obj(&a, len, i as u8), i as u8));
        }
        let live: u64 = objs.iter().map(|((_, l), _)| class_size(*l) as u64).sum();
        assert_eq!(a.inner.live(), live);
        assert!(a.resident() >= live);
        // Free every other one, then check the rest.
        let mut kept = Vec::new();
        for (k, ((p, len), fill)) in objs.into_iter().enumerate() {
            if k % 2 == 0 {
                // SAFETY: allocated above, freed once.
                unsafe { free(p, len) };
            } else {
                kept.push(((p, len), fill));
            }
        }
        for ((p, len), fill) in &kept {
            assert_eq!(read(*p, *len), vec![*fill; *len]);
        }
        for ((p, len), _) in kept {
            // SAFETY: allocated above, freed once.
            unsafe { free(p, len) };
        }
        assert_eq!(a.inner.live(), 0);
        // Only warm chunks (up to 1 MiB, 1/16 of the limit) and header pages stay resident,
        // and the warm ones go on purge.
        let regions = a.inner.chunks.lock().regions.len() as u64;
        assert!(a.resident() <= (1 << 20) + regions * HEADER_PAGE);
        a.purge();
        assert_eq!(a.resident(), regions * HEADER_PAGE);
        drop(a);
    }

    #[test]
    fn payloads_outlive_the_arena_handle() {
        let a = Arena::default();
        let (p, len) = obj(&a, 100, 7);
        let weak = Arc::downgrade(&a.inner);
        drop(a);
        assert_eq!(read(p, len), vec![7; 100]);
        assert!(weak.upgrade().is_some());
        // SAFETY: allocated above, freed once.
        unsafe { free(p, len) };
        assert!(
            weak.upgrade().is_none(),
            "the last chunk took the regions with it"
        );
    }

    #[test]
    fn class_sizes() {
        assert_eq!(class_size(0), 0);
        assert_eq!(class_size(1), 64);
        assert_eq!(class_size(64), 64);
        assert_eq!(class_size(65), 128);
        assert_eq!(class_size(4096), 4096);
        assert_eq!(class_size(MAX_PAYLOAD), MAX_PAYLOAD);
    }
}
