// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-tmem device as a vhost-user backend: queues, request parsing, responses.
//!
//! Requests are parsed straight out of guest memory with no allocation: the chain's
//! descriptors go into a fixed array, the small header is copied, and the page of a PUT or GET
//! is handed to the store as a raw pointer into guest memory ([`PageSrc`]/[`PageDst`], never a
//! Rust reference: the guest may write it meanwhile) when it is contiguous in one region (the
//! normal case), so a page is copied at most once: by the compressor or decompressor itself.
//! A page split across descriptors or regions goes through the worker's bounce buffer.
//!
//! Everything here treats the guest as hostile: any malformed chain gets an INVALID status when
//! there is room to write one, or is returned unused with a rate-limited log line. A ring in a
//! state no driver can produce (rings outside guest memory, an available index more than a
//! queue ahead, a head index past the queue) breaks that queue: it is no longer served, with
//! one rate-limited log line, until the frontend restarts or reconfigures the ring (virtio's
//! DEVICE_NEEDS_RESET, which a vhost-user backend cannot signal). Its worker thread goes on
//! serving its other queues and never spins on it.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{
    fence, AtomicBool, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
    Ordering::SeqCst,
};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use shared_proto::{
    feature, readable_len, req_flags, resp_flags, writable_len, BatchEntry, Config, CreatePool, Op,
    ReqHeader, RespHeader, Status, MAX_BATCH, MAX_REQUEST_QUEUES, PAGE_SHIFT, PAGE_SIZE,
};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::store::{PageDst, PageKey, PageSrc, PoolSpec, Tmem};

mod chain;
mod dirty;
mod memory;
mod rings;
mod transfer;
mod vring;
pub use chain::MAX_SEGMENTS;
use chain::{contiguous, desc_table_bytes, read_part, write_part, Chain, ChainError, DescTable};
pub use dirty::{DirtyLog, GuestBitmap};
pub use memory::MemoryError;
use rings::{avail_ring_bytes, needs_notification, used_event_offset, used_ring_bytes, Rings};
use transfer::Transfers;
pub use transfer::{Migration, TransferError, STALL_TIMEOUT};
pub use vring::{fd_dir, Vring};

/// Guest memory with a dirty-page bitmap that the frontend's log (SET_LOG_BASE) can be put
/// under, for live migration: writes through vm-memory mark the pages they touch, and the
/// device marks the pages it writes through raw pointers itself (see `TmemDevice::get`).
/// With `--migration off` the device uses `()`, no bitmap at all: vm-memory's generic paths
/// then compile to plain copies (see [`GuestBitmap`]).
pub type Mem<B = DirtyLog> = GuestMemoryMmap<B>;

/// The vhost feature bit of dirty-page logging (VHOST_F_LOG_ALL).
const VHOST_F_LOG_ALL: u32 = 26;

/// Largest queue the device accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Most chains taken from the available ring at a time (see `process_queue`).
const BURST: usize = 32;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option out of range.
    #[error("request queues must be 1..={MAX_REQUEST_QUEUES}, got {0}")]
    BadQueueCount(u16),
    /// An option out of range.
    #[error("queue size must be a power of two in 2..={MAX_QUEUE_SIZE}, got {0}")]
    BadQueueSize(usize),
    /// The exit event could not be created.
    #[error("cannot create the worker exit event")]
    ExitEvent(#[source] io::Error),
    /// The store could not build a worker's state.
    #[error("cannot create worker state")]
    Worker(#[source] crate::store::Error),
    /// Event set other than IN on a queue.
    #[error("unexpected event set {0:?} on queue {1}")]
    UnexpectedEvent(EventSet, u16),
    /// Event for a queue this device does not have.
    #[error("event for unknown queue {0}")]
    UnknownQueue(u16),
    /// A virtqueue operation failed (the ring itself is unusable).
    #[error("virtqueue failure")]
    Queue(#[source] virtio_queue::Error),
    /// Signalling the guest failed.
    #[error("cannot signal the used queue")]
    Signal(#[source] io::Error),
    /// The workers were told to exit (not a failure: it ends their event loops).
    #[error("worker stopped")]
    Stopped,
    /// The frontend's guest memory is refused (the connection ends).
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Migration asked of a device whose guest memory carries no dirty-page bitmap.
    #[error("migration {0:?} needs guest memory with a dirty-page log (a DirtyLog device)")]
    NoDirtyLog(Migration),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

/// Device settings that do not depend on the client.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig {
    /// Request queues (the control queue comes on top).
    pub request_queues: u16,
    /// Largest queue size offered.
    pub queue_size: usize,
    /// Pools per client, advertised in config space.
    pub max_pools: u16,
    /// How long a request queue's thread polls for more requests after a burst before it
    /// sleeps (0: never polls).
    pub poll: Duration,
    /// Accept guest memory whose file can shrink (not a memfd sealed with F_SEAL_SHRINK): a
    /// frontend that then truncates it kills the daemon with SIGBUS.
    pub allow_unsealed_memory: bool,
    /// Offer dirty-page logging and device state transfer (live migration), and what goes.
    pub migration: Migration,
}

impl DeviceConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=MAX_REQUEST_QUEUES).contains(&self.request_queues) {
            return Err(Error::BadQueueCount(self.request_queues));
        }
        if !(2..=MAX_QUEUE_SIZE).contains(&self.queue_size) || !self.queue_size.is_power_of_two() {
            return Err(Error::BadQueueSize(self.queue_size));
        }
        Ok(())
    }
}

/// Allows a few log lines per second per device, so that a guest cannot flood the host log.
#[derive(Debug, Default)]
pub struct LogLimiter {
    second: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    const PER_SECOND: u64 = 10;

    /// Whether a line may be logged now; if some were suppressed before, how many.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.second.swap(now, Relaxed) != now {
            self.count.store(0, Relaxed);
        }
        if self.count.fetch_add(1, Relaxed) < Self::PER_SECOND {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Thread 0 serves the control queue and request queue 1; each further request queue has a
/// thread of its own.
fn thread_masks(request_queues: u16) -> Vec<u64> {
    let mut masks = vec![0b11u64];
    masks.extend((2..=request_queues as u64).map(|q| 1 << q));
    masks
}

/// Asks the CPU to start loading every cache line of the page at `p`: the guest wrote it on
/// another CPU just before, and the compressor's reads would otherwise wait for the lines one
/// after another (`make bench`'s QD1 put row shows it). A hint only.
fn prefetch_page(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..PAGE_SIZE).step_by(64) {
        // SAFETY: a prefetch does not access memory as far as the program is concerned: it
        // cannot fault, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(off).cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks the CPU to start loading the cache line of guest address `addr`, if it is in guest
/// memory. A hint only: it never faults and changes no state the program can observe.
fn prefetch<B: GuestBitmap>(mem: &Mem<B>, addr: u64) {
    // Where prefetch_ptr does nothing, neither does the look-up.
    #[cfg(target_arch = "x86_64")]
    if let Ok(p) = mem.get_host_address(GuestAddress(addr)) {
        prefetch_ptr(p);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (mem, addr);
}

/// Asks the CPU to start loading the cache line at `p`. A hint only: it never faults and
/// changes no state the program can observe.
fn prefetch_ptr(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of the x86_64 baseline, and a prefetch does not access memory as
    // far as the program is concerned: it cannot fault, even on a bad address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Whether the used ring, which the device writes, covers the available index, which it
/// reads: then every chain returned moves the index, and the queue never runs dry. (Other
/// overlaps only garble what the guest gets back; virtio-queue's own mock lays the used ring
/// over the available ring's upper entries.)
fn used_ring_covers_avail_index(q: &Queue) -> bool {
    let (used, used_len) = (q.used_ring(), 4 + 8 * q.size() as u64);
    let idx = q.avail_ring().saturating_add(2);
    idx < used.saturating_add(used_len) && used < idx.saturating_add(2)
}

/// Asks for the cache line of a parsed chain's request header (see `process_queue`).
fn prefetch_header<B: GuestBitmap>(mem: &Mem<B>, chain: &Chain) {
    if let Some(s) = chain.readable().first() {
        prefetch(mem, s.addr);
    }
}

/// The chains of one burst, parsed in place into room allocated once per worker (a chain is
/// a few hundred bytes: moving each one would copy it twice).
struct Burst {
    chains: Vec<Chain>,
    /// Per chain, why it could not be parsed.
    errors: [Option<ChainError>; BURST],
    /// Chains taken.
    n: usize,
}

impl Burst {
    fn new() -> Burst {
        Burst {
            chains: (0..BURST).map(|_| Chain::empty(0)).collect(),
            errors: [None; BURST],
            n: 0,
        }
    }

    /// The room for the next chain.
    fn next(&mut self) -> &mut Chain {
        &mut self.chains[self.n]
    }

    /// Counts the chain just parsed into [`Burst::next`], with what parsing found.
    fn took(&mut self, parsed: Result<(), ChainError>) {
        self.errors[self.n] = parsed.err();
        self.n += 1;
    }
}

/// Takes up to [`BURST`] chains from the available ring into `burst`, reading the ring
/// straight from its slice, with virtio-queue's checks: an index more than a queue ahead or a
/// head past the queue breaks the queue (the chains before it are still served). Descriptors
/// are read straight from the table `table()` gives, when there are chains and it is one
/// slice; a chain that reaches an indirect table, or every chain when the table is not one
/// slice, is walked by virtio-queue: the queue is set back to the chain's position for one
/// step of its iterator.
fn take_direct<'m, B: GuestBitmap, S: BitmapSlice>(
    queue: &mut Queue,
    mem: &Mem<B>,
    rings: &Rings<'_, S>,
    table: impl FnOnce() -> Option<DescTable<'m, S>>,
    burst: &mut Burst,
) -> Option<Broken> {
    let size = queue.size();
    let start = queue.next_avail();
    // virtio-queue's iterator refuses an available ring at address 0 as not ready; so does
    // this path, which needs that iterator for indirect chains.
    if queue.avail_ring() == 0 {
        return Some(Broken::AvailRing(queue_error(
            &virtio_queue::Error::QueueNotReady,
        )));
    }
    let Some(idx) = rings.avail_idx() else {
        return Some(Broken::AvailRing("available ring unreadable"));
    };
    let pending = idx.wrapping_sub(start);
    if pending > size {
        return Some(Broken::AvailRing(queue_error(
            &virtio_queue::Error::InvalidAvailRingIndex,
        )));
    }
    if pending == 0 {
        return None;
    }
    let table = table();
    let mut heads = [0u16; BURST];
    let mut n = 0;
    // Where the ring stands after this burst: past the chains taken, and past a head out of
    // range, as virtio-queue's iterator takes one before the check (the broken mark records
    // the position, which GET_VRING_BASE reports).
    let mut end = None;
    let mut bad = None;
    for (k, slot) in heads.iter_mut().enumerate().take(usize::from(pending)) {
        let pos = start.wrapping_add(k as u16);
        let Some(h) = rings.head(pos) else {
            (bad, end) = (
                Some(Broken::AvailRing("available ring unreadable")),
                Some(pos),
            );
            break;
        };
        if h >= size {
            (bad, end) = (Some(Broken::HeadOutOfRange(h)), Some(pos.wrapping_add(1)));
            break;
        }
        match &table {
            Some(t) => t.prefetch(h),
            None => prefetch(mem, queue.desc_table().wrapping_add(16 * u64::from(h))),
        }
        *slot = h;
        n += 1;
    }
    let end = end.unwrap_or(start.wrapping_add(n as u16));
    for (k, &head) in heads[..n].iter().enumerate() {
        let chain = burst.next();
        let parsed = match table.as_ref().and_then(|t| chain.parse_in_place(t, head)) {
            Some(r) => r,
            None => {
                // An indirect chain, or a table across regions: virtio-queue walks it, one
                // step of its iterator from this chain's position. The iterator reads the
                // entry again; a driver that changed it meanwhile (none does) gets what the
                // entry says now, checked.
                let at = start.wrapping_add(k as u16);
                queue.set_next_avail(at);
                let Some(c) = queue.iter(mem).ok().and_then(|mut it| it.next()) else {
                    // The driver moved its index back meanwhile (no driver does): the chains
                    // before this one are served, this one is not taken.
                    queue.set_next_avail(at);
                    return Some(Broken::AvailRing("available index moved back"));
                };
                if c.head_index() >= size {
                    queue.set_next_avail(at.wrapping_add(1));
                    return Some(Broken::HeadOutOfRange(c.head_index()));
                }
                chain.parse_from(c)
            }
        };
        prefetch_header(mem, chain);
        burst.took(parsed);
    }
    queue.set_next_avail(end);
    bad
}

/// A short name for a virtqueue error, for the log.
fn queue_error(e: &virtio_queue::Error) -> &'static str {
    match e {
        virtio_queue::Error::InvalidAvailRingIndex => "available index more than a queue ahead",
        virtio_queue::Error::QueueNotReady => "queue not ready or available ring at address 0",
        _ => "available ring unreadable",
    }
}

/// A worker thread's state: the store's per-worker state, a bounce page and the parsed chains
/// of the current burst (allocated once).
struct WorkerState<W> {
    store: W,
    bounce: Box<[u8; PAGE_SIZE]>,
    burst: Option<Box<Burst>>,
    /// Per queue, the setup (`next_avail` 0) its rings were last found valid in: passes skip
    /// the checks, a region look-up per ring, until the rings or the memory table change.
    valid: Vec<Option<RingSetup>>,
    /// Per queue, chains returned to the used ring since the guest was last considered for a
    /// notification: EVENT_IDX's decision needs the count, and virtio-queue keeps one only
    /// for its own `add_used`.
    unsignalled: Vec<u64>,
}

/// Why a queue is broken: a ring state that no correct driver produces.
#[derive(Clone, Copy, Debug)]
enum Broken {
    /// The descriptor table, available or used ring is not (wholly) in guest memory.
    RingsOutsideMemory,
    /// The used ring covers the available index: each chain returned would make more
    /// available, and the worker would serve forever.
    RingsOverlap,
    /// The available ring cannot be iterated (an index more than a queue size ahead).
    AvailRing(&'static str),
    /// An available entry names a descriptor past the end of the table.
    HeadOutOfRange(u16),
    /// Returning a chain to the used ring failed.
    UsedRing,
    /// Notification suppression fields could not be accessed.
    Notification,
    /// The available index said there was work, twice in a row, with nothing to take.
    NoProgress,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::RingsOutsideMemory => f.write_str("rings not in guest memory"),
            Broken::RingsOverlap => f.write_str("used ring over the available index"),
            Broken::AvailRing(why) => f.write_str(why),
            Broken::HeadOutOfRange(h) => write!(f, "head index {h} past the queue"),
            Broken::UsedRing => f.write_str("used ring not writable"),
            Broken::Notification => f.write_str("notification fields not accessible"),
            Broken::NoProgress => f.write_str("available index moves without chains"),
        }
    }
}

/// What one pass over a queue found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// At least one chain was served.
    Served,
    /// Nothing available.
    Empty,
    /// The ring is not ready (being stopped or set up by the frontend): do not touch it.
    Stopped,
}

/// The setup of a ring as the frontend gave it, recorded when the queue broke: the queue stays
/// broken while this is unchanged (a driver repairing its ring in place is no reset), and any
/// SET_VRING_NUM/ADDR/BASE or new memory table that changes it lets the queue be tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RingSetup {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_avail: u16,
    mem_generation: u64,
}

/// See `TmemDevice::pass_hook`.
#[cfg(test)]
type PassHook<S, B> = Box<dyn FnOnce(&TmemDevice<S, B>) + Send>;

/// The device, one per connected client.
pub struct TmemDevice<S: Tmem, B: GuestBitmap = DirtyLog> {
    store: Arc<S>,
    client: S::Client,
    cfg: DeviceConfig,
    /// The guest memory this device reads and writes: the frontend's latest map once checked
    /// (see `update_memory`). Never the handler's own copy, which holds a new map before it
    /// is checked; so every guest access here, rings included, goes through this one.
    mem: GuestMemoryAtomic<Mem<B>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// One per worker thread; each thread only ever locks its own, so these never contend.
    workers: Vec<Mutex<WorkerState<S::Worker>>>,
    exit: (EventConsumer, EventNotifier),
    /// Set by [`TmemDevice::stop_workers`]: a worker in the middle of serving a queue returns
    /// after its current burst, however fast the frontend keeps the ring supplied (the exit
    /// event alone is seen only between events, and a queue that never runs dry is one event).
    stopping: AtomicBool,
    /// Queues served by each worker thread, as bit masks (computed once).
    thread_masks: Vec<u64>,
    /// Per queue: the ring setup it broke in, while it is broken.
    broken: Vec<Mutex<Option<RingSetup>>>,
    /// Bumped twice by every new memory table, odd while the map is replaced (a seqlock).
    mem_generation: AtomicU64,
    /// Tests: run once by the next pass between its generation and map reads, to put a new
    /// memory table exactly there.
    #[cfg(test)]
    pass_hook: Mutex<Option<PassHook<S, B>>>,
    /// The frontend logs dirty pages (VHOST_F_LOG_ALL acked): pages written through raw
    /// pointers are marked in its log.
    log_all: AtomicBool,
    /// Device state transfer (live migration), one at a time.
    transfers: Transfers,
    log: LogLimiter,
    name: String,
}

impl<S: Tmem, B: GuestBitmap> std::fmt::Debug for TmemDevice<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TmemDevice")
            .field("name", &self.name)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<S: Tmem, B: GuestBitmap> TmemDevice<S, B> {
    /// A device serving `client` from `store`.
    pub fn new(
        store: Arc<S>,
        client: S::Client,
        name: &str,
        cfg: DeviceConfig,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        if cfg.migration != Migration::Off && !B::LOGS {
            return Err(Error::NoDirtyLog(cfg.migration));
        }
        // Thread 0 serves the control queue and request queue 1; each further request queue
        // has a thread of its own.
        let threads = cfg.request_queues as usize;
        let workers = (0..threads)
            .map(|_| {
                Ok(Mutex::new(WorkerState {
                    store: store.new_worker().map_err(Error::Worker)?,
                    bounce: Box::new([0u8; PAGE_SIZE]),
                    burst: Some(Box::new(Burst::new())),
                    valid: Vec::new(),
                    unsignalled: vec![0; threads + 1],
                }))
            })
            .collect::<Result<_, Error>>()?;
        let exit =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(Error::ExitEvent)?;
        Ok(TmemDevice {
            store,
            client,
            cfg,
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            workers,
            exit,
            stopping: AtomicBool::new(false),
            thread_masks: thread_masks(cfg.request_queues),
            broken: (0..=cfg.request_queues).map(|_| Mutex::new(None)).collect(),
            mem_generation: AtomicU64::new(0),
            #[cfg(test)]
            pass_hook: Mutex::new(None),
            log_all: AtomicBool::new(false),
            transfers: Transfers::new(cfg.migration),
            log: LogLimiter::default(),
            name: name.to_string(),
        })
    }

    /// The epoll token of the exit event: past the queues' and the crate's own (which
    /// `register_listener` reserves).
    fn exit_token(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    /// Registers the device's exit event with each worker thread's event loop, so that
    /// [`TmemDevice::stop_workers`] ends them. Must be called for every handler before the
    /// daemon that owns them is dropped, or dropping it waits forever for its threads.
    ///
    /// This replaces [`VhostUserBackend::exit_event`]: vhost-user-backend 0.24 takes the event
    /// consumer that method returns with `into_raw_fd()` and never closes it, one descriptor
    /// per worker thread per connection (docs/upstream/vhost-user-backend-exit-event-leak.md).
    /// Registered here, the one eventfd stays owned by the device and is closed with it.
    pub fn register_exit(&self, handlers: &[Arc<VringEpollHandler<Arc<Self>>>]) -> io::Result<()> {
        for h in handlers {
            h.register_listener(self.exit.0.as_raw_fd(), EventSet::IN, self.exit_token())?;
        }
        Ok(())
    }

    /// Wakes every worker thread so that it exits; one busy serving a queue returns after its
    /// current burst.
    pub fn stop_workers(&self) {
        self.stopping.store(true, Relaxed);
        if let Err(e) = self.exit.1.notify() {
            tracing::warn!(client = %self.name, "cannot wake worker threads: {e}");
        }
    }

    fn config(&self) -> Config {
        Config {
            num_request_queues: self.cfg.request_queues,
            max_pools: self.cfg.max_pools,
            page_shift: PAGE_SHIFT as u8,
            reserved: 0,
            max_batch: MAX_BATCH as u16,
            limit_pages: self.store.limit_pages(&self.client),
            shrink_target_pages: self.store.shrink_target(&self.client),
        }
    }

    fn warn(&self, what: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log.allow() {
            if suppressed > 0 {
                tracing::warn!(client = %self.name, suppressed, "dropped a malformed request: {what}");
            } else {
                tracing::warn!(client = %self.name, "dropped a malformed request: {what}");
            }
        }
    }

    /// The setup of ring `q` now, under this device's current memory table.
    fn ring_setup(&self, q: &Queue) -> RingSetup {
        RingSetup {
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            size: q.size(),
            next_avail: q.next_avail(),
            mem_generation: self.mem_generation.load(Relaxed),
        }
    }

    /// Marks queue `index` broken in the ring setup `q`; called with the vring's lock held, so
    /// that a GET_VRING_BASE (which takes that lock before it calls `stop_vring`) cannot clear
    /// the mark before it is made.
    fn mark_broken(&self, index: u16, q: &Queue, why: Broken) {
        self.mark_broken_in(index, q, why, self.mem_generation.load(Acquire));
    }

    /// [`Self::mark_broken`] for a verdict made under the map of `generation` (read before
    /// the map): a newer map then reads as another setup, and the queue is tried again
    /// instead of staying broken for a table it was never checked against.
    fn mark_broken_in(&self, index: u16, q: &Queue, why: Broken, generation: u64) {
        let setup = RingSetup {
            mem_generation: generation,
            ..self.ring_setup(q)
        };
        if let Some(b) = self.broken.get(index as usize) {
            *b.lock() = Some(setup);
        }
        if let Some(suppressed) = self.log.allow() {
            tracing::warn!(
                client = %self.name,
                queue = index,
                suppressed,
                "queue needs reset, not served until the frontend restarts it: {why}"
            );
        }
    }

    /// Whether queue `index` is broken in its current setup; forgets a mark made in another.
    fn is_broken(&self, index: u16, vring: &Vring<B>) -> bool {
        let Some(b) = self.broken.get(index as usize) else {
            return false;
        };
        let mut b = b.lock();
        let Some(setup) = *b else {
            return false;
        };
        let state = vring.get_ref();
        let q = state.get_queue();
        let now = self.ring_setup(q);
        if now == setup {
            return true;
        }
        *b = None;
        tracing::info!(client = %self.name, queue = index, "queue reconfigured, serving it again");
        false
    }

    /// Serves every available chain of one queue.
    ///
    /// The vring's lock is taken once per burst, not twice per request (only this thread
    /// serves the queue; the frontend's ring messages wait at most one burst), and chains
    /// borrow the memory snapshot rather than clone it.
    ///
    /// The guest writes the available index, the descriptors and the request headers on
    /// another CPU, so each first read of them misses the cache. Chains are therefore taken in
    /// bursts of up to [`BURST`]: the available index is read once per burst, all head
    /// descriptors are prefetched before any is parsed, and all headers before any request is
    /// served, so the misses overlap instead of adding up. Each chain is still returned to the
    /// used ring as soon as it is served. The driver owns none of these buffers until they are
    /// used, so reading them early reads what it made available.
    ///
    /// A ring in an impossible state is marked broken (see [`Broken`]) and `Err` returned;
    /// the chains taken before the bad entry are still served.
    fn process_queue(
        &self,
        vring: &Vring<B>,
        index: u16,
        control: bool,
        w: &mut WorkerState<S::Worker>,
    ) -> Result<Pass, Broken> {
        // The map's generation, read as a seqlock (odd while `update_memory` replaces the
        // map): `stable` only when the map read is the one of that generation, and only then
        // may a verdict on the rings be kept or reused.
        let before = self.mem_generation.load(Acquire);
        #[cfg(test)]
        if let Some(hook) = self.pass_hook.lock().take() {
            hook(self);
        }
        let mem = self.mem.memory();
        fence(Acquire);
        let mem_generation = self.mem_generation.load(Relaxed);
        let stable = before == mem_generation && mem_generation.is_multiple_of(2);
        // Out of the worker while its chains are served (serving borrows the worker).
        let mut burst = w.burst.take().unwrap_or_else(|| Box::new(Burst::new()));
        let mut pass = Pass::Empty;
        let result = loop {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            if !queue.ready() {
                break Ok(Pass::Stopped);
            }
            // Every ring access below stays inside these ranges, so once they hold each entry
            // the available index announces can be taken: no pass finds work and takes none.
            let setup = RingSetup {
                desc: queue.desc_table(),
                avail: queue.avail_ring(),
                used: queue.used_ring(),
                size: queue.size(),
                next_avail: 0,
                mem_generation,
            };
            let i = index as usize;
            if !stable || w.valid.get(i).copied().flatten() != Some(setup) {
                if !queue.is_valid(&*mem) {
                    self.mark_broken_in(index, queue, Broken::RingsOutsideMemory, before);
                    break Err(Broken::RingsOutsideMemory);
                }
                if used_ring_covers_avail_index(queue) {
                    self.mark_broken_in(index, queue, Broken::RingsOverlap, before);
                    break Err(Broken::RingsOverlap);
                }
                if stable {
                    if w.valid.len() <= i {
                        w.valid.resize(i + 1, None);
                    }
                    w.valid[i] = Some(setup);
                }
            }
            let desc_table = queue.desc_table();
            let size = queue.size();
            // The rings and the descriptor table straight as slices of host memory when each
            // lies in one region (the usual case); else through virtio-queue's accessors.
            let avail = mem.get_slice(GuestAddress(queue.avail_ring()), avail_ring_bytes(size));
            let used = mem.get_slice(GuestAddress(queue.used_ring()), used_ring_bytes(size));
            let rings = avail
                .ok()
                .zip(used.ok())
                .and_then(|(a, u)| Rings::new(a, u, size));
            // Looked up only when there are chains to read (most polling passes find none).
            let table = || {
                mem.get_slice(GuestAddress(desc_table), desc_table_bytes(size))
                    .ok()
                    .and_then(|s| DescTable::new(s, size))
            };
            let mut bad = None;
            burst.n = 0;
            match &rings {
                Some(r) => {
                    bad = take_direct(queue, &mem, r, table, &mut burst);
                }
                None => {
                    let mut raw: [Option<DescriptorChain<&Mem<B>>>; BURST] = Default::default();
                    let mut n = 0;
                    match queue.iter(&*mem) {
                        Ok(iter) => {
                            // `raw` first: zip stops when it runs out without taking a chain
                            // from the ring that it would then drop.
                            for (slot, c) in raw.iter_mut().zip(iter) {
                                if c.head_index() >= size {
                                    bad = Some(Broken::HeadOutOfRange(c.head_index()));
                                    break;
                                }
                                prefetch(&mem, desc_table.wrapping_add(16 * c.head_index() as u64));
                                *slot = Some(c);
                                n += 1;
                            }
                        }
                        Err(e) => bad = Some(Broken::AvailRing(queue_error(&e))),
                    }
                    let table = if n > 0 { table() } else { None };
                    for c in raw[..n].iter_mut().filter_map(Option::take) {
                        let chain = burst.next();
                        let fast = table
                            .as_ref()
                            .and_then(|t| chain.parse_in_place(t, c.head_index()));
                        let parsed = fast.unwrap_or_else(|| chain.parse_from(c));
                        prefetch_header(&mem, chain);
                        burst.took(parsed);
                    }
                }
            }
            let n = burst.n;
            let mut returned_now = 0;
            for (c, error) in burst.chains[..n].iter().zip(&burst.errors) {
                let len = match error {
                    None => self.serve_chain(&mem, c, control, w),
                    Some(e) => {
                        self.warn(format_args!("{e:?}"));
                        0
                    }
                };
                let head = c.head;
                let next_used = queue.next_used();
                let returned = match &rings {
                    Some(r) => r
                        .push_used(next_used, head, len)
                        .map(|()| queue.set_next_used(next_used.wrapping_add(1))),
                    None => queue.add_used(&*mem, head, len).ok(),
                };
                if returned.is_none() {
                    bad = Some(Broken::UsedRing);
                    break;
                }
                if let Some(u) = w.unsignalled.get_mut(i) {
                    *u = u.saturating_add(1);
                }
                returned_now += 1;
                pass = Pass::Served;
            }
            // Nothing more available: the pass ends here, after the decision below, rather
            // than in an empty burst of its own (a lock cycle more per pass, measurable at
            // QD 1).
            let drained = returned_now > 0
                && bad.is_none()
                && match &rings {
                    Some(r) => r.avail_idx(),
                    None => queue.avail_idx(&*mem, Acquire).ok().map(|w| w.0),
                } == Some(queue.next_avail());
            // Decided and signalled before this burst lets go of the ring: GET_VRING_BASE
            // waits for it, stops the ring and drops the call eventfd, so a signal after the
            // release could find none, and the guest would wait for chains it has back. The
            // chains returned before a bad entry too: the queue stays broken until a restart.
            if returned_now > 0 {
                match self.needs_signal(queue, &mem, w, i) {
                    Ok(false) => {}
                    Ok(true) => {
                        if let Err(e) = state.signal_used_queue() {
                            self.warn(format_args!("cannot signal queue {index}: {e}"));
                        }
                    }
                    Err(_) => {
                        let why = bad.unwrap_or(Broken::Notification);
                        self.mark_broken_in(index, state.get_queue(), why, before);
                        break Err(why);
                    }
                }
            }
            if let Some(why) = bad {
                self.mark_broken_in(index, state.get_queue(), why, before);
                break Err(why);
            }
            if drained || n == 0 || self.stopping.load(Relaxed) {
                break Ok(pass);
            }
        };
        w.burst = Some(burst);
        result
    }

    /// Serves one chain; returns the used length.
    fn serve_chain(
        &self,
        mem: &Mem<B>,
        chain: &Chain,
        control: bool,
        w: &mut WorkerState<S::Worker>,
    ) -> u32 {
        let mut hdr = [0u8; ReqHeader::SIZE];
        let parsed = if chain.read_len >= ReqHeader::SIZE {
            read_part(mem, chain.readable(), 0, &mut hdr)
                .map(|()| ReqHeader::decode(&hdr))
                .map_err(|()| "header outside guest memory")
        } else {
            Err("request shorter than its header")
        };
        let hdr = match parsed {
            Ok(h) => h,
            Err(why) => return self.fail(mem, chain, None, Status::Invalid, why),
        };
        let Some(op) = Op::from_u32(hdr.op) else {
            return self.fail(mem, chain, None, Status::Unsupported, "unknown operation");
        };
        if op.is_control() != control {
            return self.fail(
                mem,
                chain,
                Some(op),
                Status::Unsupported,
                "operation on the wrong queue",
            );
        }
        let count = if op == Op::Batch { hdr.count } else { 0 };
        if (op != Op::Batch && hdr.count != 0) || count > MAX_BATCH {
            return self.fail(mem, chain, Some(op), Status::Invalid, "bad count");
        }
        if chain.read_len != readable_len(op, count) || chain.write_len != writable_len(op, count) {
            return self.fail(mem, chain, Some(op), Status::Invalid, "wrong buffer sizes");
        }
        let allowed_flags = match op {
            Op::CreatePool => req_flags::POOL_PERSISTENT | req_flags::POOL_SHARED,
            Op::Get => req_flags::GET_EXCLUSIVE,
            _ => 0,
        };
        if hdr.flags & !allowed_flags != 0 {
            return self.fail(mem, chain, Some(op), Status::Invalid, "unknown flags");
        }

        let mut resp = RespHeader::status(Status::Ok);
        let key = PageKey {
            pool: hdr.pool_id,
            oid: hdr.oid,
            index: hdr.index,
        };
        let store = &*self.store;
        let client = &self.client;
        let result: Result<(), Status> = match op {
            Op::CreatePool => {
                let mut b = [0u8; CreatePool::SIZE];
                if read_part(mem, chain.readable(), ReqHeader::SIZE, &mut b).is_err() {
                    return self.fail(
                        mem,
                        chain,
                        Some(op),
                        Status::Invalid,
                        "payload outside guest memory",
                    );
                }
                let cp = CreatePool::decode(&b);
                let shared = hdr.flags & req_flags::POOL_SHARED != 0;
                if cp.page_size as usize != PAGE_SIZE
                    || cp.reserved != 0
                    || (!shared && cp.uuid != [0; 16])
                {
                    return self.fail(
                        mem,
                        chain,
                        Some(op),
                        Status::Invalid,
                        "bad CREATE_POOL payload",
                    );
                }
                let spec = PoolSpec {
                    persistent: hdr.flags & req_flags::POOL_PERSISTENT != 0,
                    shared: shared.then_some(cp.uuid),
                };
                store
                    .create_pool(client, spec)
                    .map(|id| resp.value = id as u64)
                    .map_err(|e| e.status())
            }
            Op::DestroyPool => store
                .destroy_pool(client, hdr.pool_id)
                .map_err(|e| e.status()),
            Op::FlushPage => store.flush_page(client, &key).map_err(|e| e.status()),
            Op::FlushObject => store
                .flush_object(client, hdr.pool_id, &hdr.oid)
                .map(|_| ())
                .map_err(|e| e.status()),
            Op::Put => self.put(mem, chain, &key, w),
            Op::Get => {
                let exclusive = hdr.flags & req_flags::GET_EXCLUSIVE != 0;
                self.get(mem, chain, &key, exclusive, w).map(|hit| {
                    if hit.dropped {
                        resp.flags |= resp_flags::DROPPED;
                    }
                })
            }
            Op::Batch => {
                return self.batch(mem, chain, count);
            }
            Op::Reset => {
                let r = store.reset_client(client);
                resp.value = r.pools;
                // Once per driver start (a boot, a reload), worth a line even when nothing was
                // kept; the limiter keeps a driver that loops on it quiet.
                if self.log.allow().is_some() {
                    tracing::info!(
                        client = %self.name,
                        pools = r.pools,
                        persistent_pages = r.persistent_pages,
                        ephemeral_pages = r.ephemeral_pages,
                        "driver reset: a driver started, the pools of the one before are \
                         dropped"
                    );
                }
                Ok(())
            }
        };
        if let Err(status) = result {
            resp = RespHeader::status(status);
        }
        let at = if op == Op::Get { PAGE_SIZE } else { 0 };
        self.respond(mem, chain, at, &resp)
    }

    fn put(
        &self,
        mem: &Mem<B>,
        chain: &Chain,
        key: &PageKey,
        w: &mut WorkerState<S::Worker>,
    ) -> Result<(), Status> {
        let WorkerState {
            store: sw, bounce, ..
        } = w;
        // The page stays in guest memory, behind a raw pointer (the guest may write it while
        // the store reads it); `mem` keeps it mapped for this call.
        let direct = contiguous(chain.readable(), ReqHeader::SIZE, PAGE_SIZE)
            .and_then(|a| mem.get_slice(a, PAGE_SIZE).ok());
        let page = match direct.as_ref().and_then(PageSrc::guest) {
            Some(p) => {
                prefetch_page(p.as_ptr());
                p
            }
            None => {
                if read_part(mem, chain.readable(), ReqHeader::SIZE, &mut bounce[..]).is_err() {
                    self.warn(format_args!("PUT page outside guest memory"));
                    return Err(Status::Invalid);
                }
                PageSrc::new(&bounce[..])
            }
        };
        self.store
            .put(sw, &self.client, key, page)
            .map_err(|e| e.status())
    }

    fn get(
        &self,
        mem: &Mem<B>,
        chain: &Chain,
        key: &PageKey,
        exclusive: bool,
        w: &mut WorkerState<S::Worker>,
    ) -> Result<crate::store::GetHit, Status> {
        let WorkerState {
            store: sw, bounce, ..
        } = w;
        // Decompressed straight into guest memory, through a raw pointer.
        let direct = contiguous(chain.writable(), 0, PAGE_SIZE)
            .and_then(|a| mem.get_slice(a, PAGE_SIZE).ok());
        let guest = direct.as_ref().and_then(PageDst::guest);
        let bounced = guest.is_none();
        let out = guest.unwrap_or_else(|| PageDst::new(&mut bounce[..]));
        let hit = self
            .store
            .get(sw, &self.client, key, out, exclusive)
            .map_err(|e| e.status())?;
        if bounced && write_part(mem, chain.writable(), 0, &bounce[..]).is_err() {
            // A page we cannot deliver is an error, never a silent success.
            self.warn(format_args!("GET page buffer outside guest memory"));
            return Err(Status::Invalid);
        }
        if !bounced && self.log_all.load(Relaxed) {
            // Written through a raw pointer, which vm-memory's bitmap did not see (a bounced
            // page was written through vm-memory, which marked it).
            if let Some(vs) = &direct {
                vm_memory::bitmap::Bitmap::mark_dirty(vs.bitmap(), 0, PAGE_SIZE);
            }
        }
        Ok(hit)
    }

    fn batch(&self, mem: &Mem<B>, chain: &Chain, count: u32) -> u32 {
        let mut statuses = [0u8; MAX_BATCH as usize];
        let mut ok = 0u64;
        for (i, status) in statuses.iter_mut().enumerate().take(count as usize) {
            let mut b = [0u8; BatchEntry::SIZE];
            let st = if read_part(
                mem,
                chain.readable(),
                ReqHeader::SIZE + i * BatchEntry::SIZE,
                &mut b,
            )
            .is_err()
            {
                Status::Invalid
            } else {
                let e = BatchEntry::decode(&b);
                let r = match Op::from_u32(e.op) {
                    Some(Op::FlushPage) => {
                        let key = PageKey {
                            pool: e.pool_id,
                            oid: e.oid,
                            index: e.index,
                        };
                        self.store.flush_page(&self.client, &key)
                    }
                    Some(Op::FlushObject) => self
                        .store
                        .flush_object(&self.client, e.pool_id, &e.oid)
                        .map(|_| ()),
                    _ => {
                        *status = Status::Unsupported as u8;
                        continue;
                    }
                };
                match r {
                    Ok(()) => Status::Ok,
                    Err(e) => e.status(),
                }
            };
            ok += (st == Status::Ok) as u64;
            *status = st as u8;
        }
        let resp = RespHeader {
            status: Status::Ok as u32,
            flags: 0,
            value: ok,
        };
        let n = count as usize;
        if write_part(mem, chain.writable(), RespHeader::SIZE, &statuses[..n]).is_err() {
            self.warn(format_args!("batch statuses outside guest memory"));
            return 0;
        }
        self.respond(mem, chain, 0, &resp) + n as u32
    }

    /// Writes the response at offset `at` of the writable part; returns the used length.
    fn respond(&self, mem: &Mem<B>, chain: &Chain, at: usize, resp: &RespHeader) -> u32 {
        match write_part(mem, chain.writable(), at, &resp.encode()) {
            Ok(()) => (at + RespHeader::SIZE) as u32,
            Err(()) => {
                self.warn(format_args!("response buffer outside guest memory"));
                0
            }
        }
    }

    /// Answers a malformed request: at the response's place for `op` if there is room, else
    /// at the start of the writable part, else not at all.
    fn fail(&self, mem: &Mem<B>, chain: &Chain, op: Option<Op>, status: Status, why: &str) -> u32 {
        self.warn(format_args!(
            "{why} (op {op:?}, {} readable / {} writable bytes)",
            chain.read_len, chain.write_len
        ));
        let at = if op == Some(Op::Get) && chain.write_len >= PAGE_SIZE + RespHeader::SIZE {
            PAGE_SIZE
        } else {
            0
        };
        if chain.write_len < at + RespHeader::SIZE {
            return 0;
        }
        self.respond(mem, chain, at, &RespHeader::status(status))
    }

    /// The device queue behind event `slot` of thread `thread`: vhost-user-backend numbers a
    /// thread's events by the queue's position among that thread's queues, not globally.
    fn queue_of(&self, thread: usize, slot: u16) -> Option<u16> {
        let mask = *self.thread_masks.get(thread)?;
        (0..64u16)
            .filter(|q| (mask >> q) & 1 == 1)
            .nth(slot as usize)
    }
}

impl<S: Tmem, B: GuestBitmap> VhostUserBackend for TmemDevice<S, B> {
    type Bitmap = B;
    type Vring = Vring<B>;

    fn num_queues(&self) -> usize {
        1 + self.cfg.request_queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << feature::SHARED_POOLS
            | 1 << feature::BATCH
            | 1 << feature::SHRINK
            | 1 << feature::SESSION
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.cfg.request_queues > 1 {
            f |= 1 << feature::MQ;
        }
        if self.cfg.migration != Migration::Off {
            f |= 1 << VHOST_F_LOG_ALL;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Relaxed);
        self.log_all
            .store(features & (1 << VHOST_F_LOG_ALL) != 0, Relaxed);
        // The driver's features, replayed by the VMM at every start of the device (also after
        // a reconnect): whether its pools outlive the connection, and a driver to claim them.
        let session = features & (1 << feature::SESSION) != 0;
        let dropped = self.store.driver_features(&self.client, session);
        if dropped.pools > 0 && self.log.allow().is_some() {
            tracing::info!(
                client = %self.name,
                pools = dropped.pools,
                persistent_pages = dropped.persistent_pages,
                ephemeral_pages = dropped.ephemeral_pages,
                "driver without SESSION: dropped the pools kept for the previous driver's \
                 session (the guest restarted with another driver)"
            );
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        if self.cfg.migration == Migration::Off {
            return f;
        }
        // QEMU migrates a vhost-user device only if its backend logs the guest pages it
        // writes (LOG_SHMFD) and hands over its own state (DEVICE_STATE).
        f | VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: std::fs::File,
    ) -> io::Result<Option<std::fs::File>> {
        let what = match direction {
            VhostTransferStateDirection::SAVE => "save",
            VhostTransferStateDirection::LOAD => "load",
        };
        match self.transfers.start(
            direction,
            phase,
            file,
            &self.store,
            &self.client,
            &self.name,
        ) {
            Ok(()) => {
                tracing::info!(client = %self.name, "device state transfer started ({what})");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(client = %self.name, "refused a device state transfer ({what}): {e}");
                Err(e.into())
            }
        }
    }

    fn check_device_state(&self) -> io::Result<()> {
        match self.transfers.check() {
            Ok(done) => {
                let t = done.tally;
                tracing::info!(
                    client = %self.name,
                    pools = t.pools,
                    pages = t.pages,
                    payload_bytes = t.bytes,
                    stream_bytes = done.stream_bytes,
                    ms = done.took.as_millis() as u64,
                    "device state {}",
                    if done.save { "saved: freed here when the frontend disconnects, unless the guest runs on here" } else { "loaded" }
                );
                if done.save {
                    self.store.migrated_out(&self.client);
                } else {
                    self.store.migrated_in(&self.client);
                }
                Ok(())
            }
            Err(e) => {
                // The frontend learns only that it failed: the reason is for the log (where
                // the transfer itself put why it failed).
                if !matches!(e, TransferError::Save(_) | TransferError::Load(_)) {
                    tracing::warn!(client = %self.name, "device state check failed: {e}");
                }
                Err(e.into())
            }
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config().encode();
        let (start, end) = (offset as usize, offset as usize + size as usize);
        cfg.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem<B>>) -> io::Result<()> {
        // vhost-user-backend gives new regions an empty bitmap. QEMU sends SET_LOG_BASE again
        // after the table when it starts the device with logging on (as after a failed
        // migration, where refusing the table would break the device under a running guest),
        // and refuses device_add (memory hotplug) while migrating, so a table does not change
        // under a running, logging device.
        // The handler has already made `mem` its current map (and the vrings'), but nothing
        // reads through those: this device uses its own copy, replaced only after the check.
        // On an error the handler ends the connection, and the device keeps the previous map.
        let map = mem.memory();
        match memory::check(&map, self.cfg.allow_unsealed_memory) {
            Ok(unsealed) => {
                for gpa in unsealed {
                    tracing::warn!(
                        client = %self.name,
                        "guest memory region at {gpa:#x} is not sealed against shrinking; \
                         accepted because of --allow-unsealed-memory: if its VMM truncates \
                         it, the daemon dies"
                    );
                }
                // A seqlock around the replacement (odd meanwhile), so that a worker knows
                // which map a generation names: rings found valid are trusted only under the
                // map they were checked against, and rings that were outside the old memory
                // may be inside the new one.
                self.mem_generation.fetch_add(1, Relaxed);
                fence(Release);
                // Only this (the handler's) thread takes the lock, so it is never poisoned.
                let replaced = self
                    .mem
                    .lock()
                    .map_err(|_| io::Error::other("guest memory lock poisoned"))
                    .map(|m| m.replace((*map).clone()));
                self.mem_generation.fetch_add(1, Release);
                replaced?;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(client = %self.name, "refused the frontend's guest memory: {e}");
                Err(Error::from(e).into())
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.thread_masks.clone()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Not through the crate, which leaks the consumer: see `register_exit`.
        None
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if u64::from(device_event) == self.exit_token() {
            // An error is the one way a backend can end the crate's event loop; the event is
            // level-triggered and left unconsumed, so every worker thread sees it.
            return Err(Error::Stopped.into());
        }
        if evset != EventSet::IN {
            return Err(Error::UnexpectedEvent(evset, device_event).into());
        }
        let queue = self
            .queue_of(thread_id, device_event)
            .ok_or(Error::UnknownQueue(device_event))?;
        let vring = vrings
            .get(device_event as usize)
            .ok_or(Error::UnknownQueue(device_event))?;
        let control = queue == shared_proto::CONTROL_QUEUE;
        // A call (or kick) file descriptor that is not an eventfd was refused and logged when
        // it arrived; the queue waits for an acceptable one.
        if vring.notify_fd_refused() || self.is_broken(queue, vring) {
            // The kick was consumed; a broken queue waits for its reset without being read.
            return Ok(());
        }
        let mut w = self.workers[thread_id].lock();
        // A broken queue has been marked and logged; the worker goes on serving the others.
        let _ = self.serve_queue(vring, queue, control, &mut w);
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend stops the ring, which resets a broken queue.
        if let Some(b) = self.broken.get(queue_index as usize) {
            *b.lock() = None;
        }
        Ok(())
    }

    fn reset_device(&self) {
        for b in &self.broken {
            *b.lock() = None;
        }
    }
}

impl<S: Tmem, B: GuestBitmap> TmemDevice<S, B> {
    /// Serves a queue until it is empty with notifications re-enabled (EVENT_IDX) or for one
    /// pass (without); `Err` when the queue broke (it is marked and logged).
    fn serve_queue(
        &self,
        vring: &Vring<B>,
        queue: u16,
        control: bool,
        w: &mut WorkerState<S::Worker>,
    ) -> Result<(), Broken> {
        let event_idx = self.event_idx.load(Relaxed);
        // Rounds in a row that found nothing although the available index announced work: a
        // correct driver cannot cause two (see the end of the loop).
        let mut idle_rounds = 0;
        loop {
            if self.stopping.load(Relaxed) {
                return Ok(());
            }
            if event_idx {
                self.notification(
                    vring,
                    queue,
                    self.ring_op(vring, |q, m| q.disable_notification(m)),
                )?;
            }
            let pass = self.process_queue(vring, queue, control, w)?;
            if pass == Pass::Stopped {
                return Ok(());
            }
            // Served chains were signalled as their burst returned them (see process_queue).
            let mut used = pass == Pass::Served;
            // After a burst, poll briefly before sleeping: a driver with requests in flight
            // refills the ring within microseconds, and a wakeup costs more than that.
            let poll = self.cfg.poll;
            let mut deadline = Instant::now() + poll;
            while used && !control && !poll.is_zero() && !self.stopping.load(Relaxed) {
                std::hint::spin_loop();
                match self.process_queue(vring, queue, control, w)? {
                    Pass::Served => deadline = Instant::now() + poll,
                    Pass::Stopped => return Ok(()),
                    Pass::Empty if Instant::now() >= deadline => used = false,
                    Pass::Empty => {}
                }
            }
            // With EVENT_IDX, re-enable notifications and go again if the guest added more
            // meanwhile; without it, one pass is enough (the guest kicks for new work).
            if !event_idx
                || !self.notification(
                    vring,
                    queue,
                    self.ring_op(vring, |q, m| q.enable_notification(m)),
                )?
            {
                return Ok(());
            }
            // More work was announced. If this round took none, the index moved after the
            // pass read it and the next pass must find the chains (the rings are valid and the
            // index is at most a queue ahead); finding none again means an index that goes
            // back and forth, which no driver does: break the queue instead of spinning.
            idle_rounds = if pass == Pass::Empty {
                idle_rounds + 1
            } else {
                0
            };
            if idle_rounds >= 2 {
                let state = vring.get_ref();
                self.mark_broken(queue, state.get_queue(), Broken::NoProgress);
                return Err(Broken::NoProgress);
            }
        }
    }

    /// Runs a notification-suppression access on the queue with this device's map: the
    /// vring's own helpers read the handler's map, which may be one this device refused.
    fn ring_op<T>(
        &self,
        vring: &Vring<B>,
        f: impl FnOnce(&mut Queue, &Mem<B>) -> Result<T, virtio_queue::Error>,
    ) -> Result<T, virtio_queue::Error> {
        let mem = self.mem.memory();
        f(vring.get_mut().get_queue_mut(), &mem)
    }

    /// The result of a notification-suppression access; a failure breaks the queue (the
    /// rings were checked, so only a ring or memory change since can cause one).
    fn notification<T>(
        &self,
        vring: &Vring<B>,
        queue: u16,
        r: Result<T, virtio_queue::Error>,
    ) -> Result<T, Broken> {
        r.map_err(|_| {
            let state = vring.get_ref();
            if state.get_queue().ready() {
                self.mark_broken(queue, state.get_queue(), Broken::Notification);
            }
            Broken::Notification
        })
    }

    /// Whether the guest asked to be signalled for the chains returned since the last
    /// decision: `Queue::needs_notification`'s test on the worker's count of them (see
    /// `WorkerState::unsignalled`). The count is kept if the decision fails.
    fn needs_signal(
        &self,
        q: &Queue,
        m: &Mem<B>,
        w: &mut WorkerState<S::Worker>,
        i: usize,
    ) -> Result<bool, virtio_queue::Error> {
        // A queue without a count (none: every queue the worker serves has one) notifies.
        let added = w.unsignalled.get_mut(i).map_or(u64::MAX, std::mem::take);
        // The used ring's writes complete before used_event is read.
        fence(SeqCst);
        if !q.event_idx_enabled() {
            return Ok(true);
        }
        let used_event = q
            .avail_ring()
            .checked_add(used_event_offset(q.size()))
            .ok_or(virtio_queue::Error::AddressOverflow)
            .and_then(|at| {
                m.load::<u16>(GuestAddress(at), Relaxed)
                    .map_err(virtio_queue::Error::GuestMemory)
            });
        match used_event {
            Ok(e) => Ok(needs_notification(q.next_used(), u16::from_le(e), added)),
            Err(e) => {
                if let Some(u) = w.unsignalled.get_mut(i) {
                    *u = added;
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests;
