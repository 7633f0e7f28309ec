// SPDX-License-Identifier: GPL-2.0

//! The virtio-tmem device: its queues, the request path and the batching of invalidations.
//!
//! Requests are synchronous: [`TmemDev::call`] returns with the device's answer, or an error
//! after at most `timeout_ms` (a device that does not answer in time is broken and every later
//! request fails at once). A caller that must not sleep keeps its queue's lock and spins on the
//! used ring; one that may sleep (swap-out, swap-in, pool operations) takes a slot of its own,
//! leaves the queue to others, polls for `poll_us` and then sleeps until the queue's interrupt
//! (see the crate documentation). Answers are checked (used length, token) before use. Buffers
//! are allocated at probe, so the swap-out and reclaim paths allocate nothing. Invalidations are
//! queued and sent in `BATCH` requests; every put and get first waits until the invalidations
//! queued before it have been answered (see [`TmemDev::drain_pending`]). The swap and
//! page-cache operations built on this are in `swap.rs` and `page_cache.rs`.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use kernel::{bindings, c_str, new_spinlock, prelude::*, sync::Arc, sync::SpinLock};

use crate::backend::Page;
use crate::debugfs::Counters;
use crate::proto::{self, BatchEntry, Config, Op, ReqHeader, RespHeader, Status};
use crate::virtio::{self, Elapsed, ReadSg, Used, Virtqueue, WriteSg};
use crate::wait;
use crate::work::{DelayedWork, Work};

/// Swap types are below `MAX_SWAPFILES`, which is at most 32 (5 bits in a swap entry).
pub(crate) const SWAP_TYPES: usize = 32;
/// Filesystem slots of the tmem core.
pub(crate) const FS_SLOTS: usize = bindings::TMEM_MAX_FS as usize;
/// A slot without a host pool.
pub(crate) const NO_POOL: u32 = u32::MAX;
const MAX_BATCH: usize = proto::MAX_BATCH as usize;
/// Largest readable payload after the header: a full batch.
const OUT_BUF: usize = ReqHeader::SIZE + MAX_BATCH * BatchEntry::SIZE;
/// Largest writable part after the page: the response and one status byte per batch entry.
const RESP_BUF: usize = RespHeader::SIZE + MAX_BATCH;

/// Requests one queue has in flight at most: slot 0 for callers that must not sleep, who keep
/// the queue's lock until the answer (so slot 0 is free whenever the lock is), and the others
/// for callers that may sleep, who wait without the lock. A caller that may sleep and finds
/// no slot free spins on slot 0 instead.
const SLOTS: usize = 5;

/// Where a slot's request stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// In the ring, its caller waiting.
    InFlight,
    /// Returned with this used length; its caller takes the answer.
    Done(u32),
    /// Its caller gave up (timeout, broken device): it stays in the ring until the device
    /// returns it or is reset, and nothing else is sent on the queue meanwhile (see
    /// `recovery.rs`).
    Abandoned,
    /// Given up on, then returned with this used length: for a recovery to look at.
    Late(u32),
}

/// The buffers of one request in flight.
struct Slot {
    out: KVec<u8>,
    resp: KVec<u8>,
    /// Where the device writes a page the driver reads (see the crate documentation).
    bounce: KVec<u8>,
    state: State,
    /// Bumped for each request, and when a reset takes the ring away: a waiter that finds
    /// another number lost its request.
    seq: u64,
}

/// One virtqueue and its slots.
struct Vq {
    /// `None` while the device is frozen (suspend): the queues were given back to the
    /// transport, and [`TmemDev::restore`] finds new ones.
    vq: Option<Virtqueue>,
    slots: KVec<Slot>,
    /// Slots that fit the ring at once (at most [`SLOTS`], at least 1).
    usable: usize,
    /// Callers asleep until the queue's interrupt: interrupts are on while there are any.
    sleepers: usize,
    /// The queue's index (its wait queue's, see `wait.rs`).
    index: usize,
}

impl Vq {
    /// A request a timeout or a broken device left in the ring: nothing else is sent on the
    /// queue until a recovery has seen its answer (see `recovery.rs`).
    fn stalled(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.state, State::Abandoned | State::Late(_)))
    }

    /// A caller waits for an answer, or has one to take.
    fn busy(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.state, State::InFlight | State::Done(_)))
    }

    /// Takes every request the device returned into its slot, and wakes the queue's sleepers
    /// if one of those has a caller waiting: the interrupt that announced it may find nothing
    /// left to announce. With sleepers, interrupts are armed again after anything was taken
    /// (with EVENT_IDX the device only interrupts for returns past the index the last arming
    /// recorded). A token that is no request in flight breaks the device.
    fn reap(&mut self) -> core::result::Result<(), ExchangeError> {
        let Vq {
            vq: Some(vq),
            slots,
            sleepers,
            index,
            ..
        } = self
        else {
            return Ok(());
        };
        let mut waited_for = false;
        let mut took = false;
        let result = loop {
            match vq.get_used() {
                Used::Request(token, len) => {
                    took = true;
                    match token.checked_sub(1).and_then(|i| slots.get_mut(i)) {
                        Some(s) if s.state == State::InFlight => {
                            s.state = State::Done(len);
                            waited_for = true;
                        }
                        Some(s) if s.state == State::Abandoned => s.state = State::Late(len),
                        _ => {
                            vq.break_device();
                            break Err(ExchangeError::BadToken);
                        }
                    }
                }
                Used::Nothing => {
                    if *sleepers > 0 && took && !vq.enable_cb() {
                        took = false;
                        continue;
                    }
                    break Ok(());
                }
                Used::Broken => break Err(ExchangeError::Broken),
            }
        };
        if waited_for && *sleepers > 0 {
            wait::wake(*index);
        }
        result
    }
}

/// Whether a caller may sleep while the device answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Atomic context, or a hook whose contract forbids sleeping: spin.
    Spin,
    /// Process context: poll for `poll_us`, then sleep until the interrupt.
    Sleep,
}

/// How [`TmemDev::call`]'s exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExchangeError {
    /// The device is broken (before or while the request was waiting); nothing more is sent.
    Broken,
    /// The device did not answer within the bound; the request stays in the ring.
    TimedOut,
    /// The device returned a request that is not in flight: it is broken now.
    BadToken,
    /// A reset (suspend, recovery) took the ring away with the request.
    Reset,
    /// `virtqueue_add_sgs` refused the request.
    Add(Error),
}

/// Invalidations waiting to be sent in one `BATCH` request.
pub(crate) struct Pending {
    /// The first `len` entries are valid.
    entries: KVec<BatchEntry>,
    len: usize,
    buf: KVec<u8>,
    /// The device's status for each entry of the last BATCH.
    statuses: KVec<u8>,
    /// The pools a recovery took from their slots (here, under the same lock as the queued
    /// invalidations it drops), until it hands them back: see `recovery.rs`.
    pub(crate) orphans: Orphans,
}

impl Pending {
    /// Drops the queued invalidations (a recovery, which ends their epoch).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

/// Queues a device has at most: the control queue and the request queues.
const MAX_QUEUES: usize = wait::MAX_QUEUES;

/// What [`TmemDev::settle_queues`] found.
pub(crate) struct Settled {
    /// Every queue is there, not broken, and has nothing left unanswered.
    pub(crate) usable: bool,
    /// A request a timeout left in a ring is still unanswered.
    pub(crate) unanswered: bool,
    /// ... and one of those is a CREATE_POOL: a pool may exist on the host whose id the
    /// driver never learnt.
    pub(crate) unanswered_create: bool,
    /// Pools that late CREATE_POOL answers made (`nlate` of them): nobody holds their ids,
    /// and a restarted daemon may have given them ids the driver held before.
    pub(crate) late: [u32; MAX_QUEUES * SLOTS],
    pub(crate) nlate: usize,
}

/// Per swap area and per filesystem slot: the pool it had when a recovery began, or
/// [`NO_POOL`], and whether the area or filesystem went away since (swapoff, unmount): then
/// the recovery destroys the pool instead of handing it back.
pub(crate) struct Orphans {
    pub(crate) swap: [(u32, bool); SWAP_TYPES],
    pub(crate) fs: [(u32, bool); FS_SLOTS],
    /// Per swap area: the pool the host lost, for the log once a new one is handed back.
    pub(crate) swap_lost: [u32; SWAP_TYPES],
    /// Pools nobody is to hold, destroyed before any pool is asked about (`ndoomed` of them):
    /// pools late CREATE_POOL answers made, and swap pools that cannot be told from one.
    pub(crate) doomed: [u32; DOOMED],
    pub(crate) ndoomed: usize,
}

/// Most doomed pools: a late pool per slot and every swap pool.
pub(crate) const DOOMED: usize = MAX_QUEUES * SLOTS + SWAP_TYPES;

impl Orphans {
    /// Adds `id` to the pools to destroy, if there is room. A queue adds at most one per
    /// request a timeout left in it, and every swap area one when distrusted; only a device
    /// that keeps failing between them fills the list, and then an id is forgotten (a pool
    /// leaks, and could be taken for a kept swap pool: see `recovery.rs`, known gaps).
    pub(crate) fn doom(&mut self, id: u32) {
        if self.ndoomed < DOOMED {
            self.doomed[self.ndoomed] = id;
            self.ndoomed += 1;
        }
    }
}

/// The page carried by a request, if any.
#[derive(Clone, Copy)]
enum Data<'a> {
    NoPage,
    Out(&'a Page),
    In(&'a Page),
}

/// A bound virtio-tmem device.
pub(crate) struct TmemDev {
    /// Index 0 is the control queue, request queues follow.
    queues: KVec<Pin<KBox<SpinLock<Vq>>>>,
    /// Host pool of each swap area.
    pub(crate) pools: [AtomicU32; SWAP_TYPES],
    /// Host pool of each filesystem slot, and whether it is a shared pool.
    pub(crate) fs_pools: [AtomicU32; FS_SLOTS],
    pub(crate) fs_shared: [AtomicBool; FS_SLOTS],
    pub(crate) pending: Pin<KBox<SpinLock<Pending>>>,
    /// `pending.len`, readable without the lock: a store checks it on every page.
    pub(crate) pending_len: AtomicUsize,
    /// Set once the device stopped answering (or answered what was never asked, or lost a
    /// pool): no request is sent after that, until a recovery sets the device up again.
    pub(crate) broken: AtomicBool,
    /// Bumped by every recovery: each request carries the epoch in which its pool ids were
    /// read, and one from an earlier epoch is never sent (see `recovery.rs`).
    pub(crate) epoch: AtomicU64,
    /// The device, from the end of probe until removal begins (null otherwise): a recovery
    /// needs it, and must not start outside that window.
    pub(crate) vdev: AtomicPtr<bindings::virtio_device>,
    /// Runs [`TmemDev::recover`].
    pub(crate) work: Work,
    /// Reads the host's shrink target and gives swap pages back (`shrink.rs`).
    pub(crate) shrink_work: DelayedWork,
    /// `shrink_work` requeues itself (from the end of probe until removal).
    pub(crate) shrink_on: AtomicBool,
    /// The work is queued or running.
    pub(crate) recovery_queued: AtomicBool,
    /// `ktime` (ns) before which no recovery starts, and the wait after the last failed one.
    pub(crate) next_try_ns: AtomicU64,
    pub(crate) backoff_ms: AtomicU32,
    /// Consecutive attempts that found a request a timeout left in a ring still unanswered.
    pub(crate) unanswered: AtomicU32,
    /// Between [`TmemDev::freeze`] and [`TmemDev::restore`]: requests fail (EAGAIN) without
    /// breaking the device, and queued invalidations wait for the restore.
    frozen: AtomicBool,
    batch: bool,
    /// Whether the device offers shared pools (`SHARED_POOLS`).
    pub(crate) shared_pools: bool,
    /// Most entries in a BATCH: the device's `max_batch`, at most [`MAX_BATCH`]. A BATCH the
    /// device rejects breaks it (see [`TmemDev::send_pending`]), so this limit is honoured.
    max_batch: usize,
    pub(crate) stats: Counters,
}

/// Whether a flush's status means the page is gone: OK, MISS (it was not there), BAD_POOL (no
/// such pool on the host, so nothing can be served from it either).
fn flushed(status: u32) -> bool {
    matches!(
        Status::from_u32(status),
        Some(Status::Ok | Status::Miss | Status::BadPool)
    )
}

/// Logs the 1st, 2nd, 4th, 8th... occurrence only: failures are counted, not flooded.
pub(crate) fn rare(count: u64) -> bool {
    count.is_power_of_two()
}

pub(crate) fn status_name(status: u32) -> &'static str {
    match Status::from_u32(status) {
        Some(Status::Ok) => "ok",
        Some(Status::Miss) => "miss",
        Some(Status::NoSpace) => "no space",
        Some(Status::Refused) => "refused",
        Some(Status::Invalid) => "invalid",
        Some(Status::BadPool) => "bad pool",
        Some(Status::Unsupported) => "unsupported",
        Some(Status::Denied) => "denied",
        Some(Status::TooManyPools) => "too many pools",
        Some(Status::IoError) => "host I/O error",
        None => "unknown status",
    }
}

impl TmemDev {
    /// The request queue of the current CPU (an index into `queues`).
    fn queue_for_cpu(&self) -> usize {
        // At least one request queue follows the control queue (`new`).
        let n = self.queues.len().saturating_sub(1).max(1);
        1 + virtio::this_cpu() % n
    }

    /// Sends one request on queue `qi` and waits until the device answers it (at most
    /// `timeout_ms`, see [`crate::timeout_ns`]): spinning with the queue's lock held, or, when
    /// `wait` allows and a slot is free, polling for `poll_us` and then sleeping until the
    /// queue's interrupt, with the queue free for others meanwhile. `payload` follows the
    /// header in the readable part, and `statuses.len()` status bytes follow the response
    /// header (BATCH); they are copied into `statuses`.
    ///
    /// The answer is checked before anything in it is used: the used length must be exactly
    /// what the operation returns (a page and the response for GET, the response and
    /// `statuses` bytes for BATCH, the response otherwise), else the request fails with EIO
    /// and nothing is copied: the bounce buffer may still hold an earlier request's page. A
    /// device that does not answer in time, or returns what is not in flight, is broken and
    /// every later request fails at once; a request waiting when that happens gives up too.
    ///
    /// `epoch` is the epoch in which the caller read the pool ids in the request: a request
    /// from an epoch a recovery ended is not sent (ENODEV). Only a recovery's own requests
    /// (`recovery`) are sent while the device is broken.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        qi: usize,
        hdr: &ReqHeader,
        payload: &[u8],
        data: Data<'_>,
        statuses: &mut [u8],
        epoch: u64,
        recovery: bool,
        wait: Wait,
    ) -> Result<RespHeader> {
        if !recovery && self.broken.load(Ordering::Acquire) {
            self.kick_recovery();
            return Err(ENODEV);
        }
        let out_len = ReqHeader::SIZE + payload.len();
        let resp_len = RespHeader::SIZE + statuses.len();
        let q = &self.queues[qi];
        let mut guard = q.lock();
        // Under the queue lock, which a recovery takes after ending the epoch: a request whose
        // pool ids are from before it never reaches a pool the host re-created since.
        if self.epoch.load(Ordering::Acquire) != epoch {
            return Err(ENODEV);
        }
        if guard.stalled() {
            return Err(ENODEV);
        }
        if guard.vq.is_none() {
            // Frozen for a suspend: the host still holds the pages, this request just cannot
            // reach it now.
            return Err(EAGAIN);
        }
        if out_len > OUT_BUF || resp_len > RESP_BUF {
            return Err(EINVAL);
        }
        let vq = &mut *guard;
        let free = match wait {
            Wait::Sleep => (1..vq.usable).find(|&i| vq.slots[i].state == State::Free),
            Wait::Spin => None,
        };
        let (i, sleeping) = match free {
            Some(i) => (i, true),
            // Slot 0 is free whenever the lock is (its users keep the lock), unless a
            // request stalled in it, and then the queue is stalled (above).
            None => (0, false),
        };
        let Vq {
            vq: Some(virtqueue),
            slots,
            ..
        } = vq
        else {
            return Err(EAGAIN);
        };
        let slot = &mut slots[i];
        slot.out[..ReqHeader::SIZE].copy_from_slice(&hdr.encode());
        slot.out[ReqHeader::SIZE..out_len].copy_from_slice(payload);
        // A device that answers without writing the response leaves this unknown status.
        let unknown = RespHeader {
            status: u32::MAX,
            flags: 0,
            value: 0,
        };
        slot.resp[..RespHeader::SIZE].copy_from_slice(&unknown.encode());
        let out = ReadSg::bytes(&slot.out, out_len);
        let resp = WriteSg::bytes(&mut slot.resp, resp_len);
        let token = i + 1;
        // SAFETY: the slot's buffers are only touched under the queue lock by the slot's
        // owner, and the slot stays `InFlight` (then `Abandoned`) until `reap` saw the device
        // return the request, or a reset took the ring away (`freeze`, which waits for
        // callers first); the queues and their buffers are freed only after the device was
        // reset. A PUT's page is only read by the device, and its lender keeps it until this
        // call returns; a late read after a timeout reads a page the kernel may reuse, which
        // leaks nothing to the host it did not have. A GET's page goes through the bounce
        // buffer, so a late write never reaches a page the kernel owns.
        let added = unsafe {
            match data {
                Data::NoPage => virtqueue.add(&mut [out], &mut [resp], token),
                Data::Out(page) => {
                    virtqueue.add(&mut [out, ReadSg::page(page)], &mut [resp], token)
                }
                Data::In(_) => {
                    let bounce = WriteSg::bytes(&mut slot.bounce, proto::PAGE_SIZE);
                    virtqueue.add(&mut [out], &mut [bounce, resp], token)
                }
            }
        };
        if let Err(e) = added {
            let e = if virtqueue.is_broken() {
                ExchangeError::Broken
            } else {
                ExchangeError::Add(e)
            };
            return Err(self.exchange_failed(hdr, e));
        }
        slot.seq = slot.seq.wrapping_add(1);
        slot.state = State::InFlight;
        let seq = slot.seq;
        let expected = match data {
            Data::In(_) => proto::PAGE_SIZE + resp_len,
            _ => resp_len,
        };
        let timeout = if recovery {
            crate::timeout_ns().min(crate::recovery::PROBE_TIMEOUT_NS)
        } else {
            crate::timeout_ns()
        };
        let mut clock = Elapsed::start();
        let (mut guard, used) = if sleeping {
            drop(guard);
            self.sleep_for_answer(qi, i, seq, hdr, recovery, timeout, &mut clock)?
        } else {
            loop {
                match self.check_slot(&mut guard, i, seq, recovery, timeout, &mut clock) {
                    Ok(Some(used)) => break (guard, used),
                    Ok(None) => core::hint::spin_loop(),
                    Err(e) => return Err(self.exchange_failed(hdr, e)),
                }
            }
        };
        let slot = &mut guard.slots[i];
        slot.state = State::Free;
        let used = used as usize;
        if used != expected {
            let count = self.stats.bad_answers.fetch_add(1, Ordering::Relaxed) + 1;
            if rare(count) {
                pr_err!(
                    "{:?}: used length {}, expected {} ({} bad answers)\n",
                    Op::from_u32(hdr.op),
                    used,
                    expected,
                    count
                );
            }
            return Err(EIO);
        }
        let mut b = [0u8; RespHeader::SIZE];
        b.copy_from_slice(&slot.resp[..RespHeader::SIZE]);
        let resp = RespHeader::decode(&b);
        if let Data::In(page) = data {
            if resp.status == Status::Ok as u32 {
                page.write(&slot.bounce);
            }
        }
        statuses.copy_from_slice(&slot.resp[RespHeader::SIZE..resp_len]);
        Ok(resp)
    }

    /// One look at slot `i` of queue `qi` (lock held): takes what the device returned, and
    /// says whether the slot's request (number `seq`) is answered (its used length), still
    /// worth waiting for (`None`), or given up on: then the slot is `Abandoned`, left in the
    /// ring.
    fn check_slot(
        &self,
        vq: &mut Vq,
        i: usize,
        seq: u64,
        recovery: bool,
        timeout: u64,
        clock: &mut Elapsed,
    ) -> core::result::Result<Option<u32>, ExchangeError> {
        if vq.slots[i].seq != seq {
            // A reset took the ring away with the request (a suspend, or a recovery, after
            // waiting twice the timeout for this caller).
            return Err(ExchangeError::Reset);
        }
        // An answer taken before a reset is kept for its caller (`freeze`).
        if let State::Done(used) = vq.slots[i].state {
            return Ok(Some(used));
        }
        if vq.vq.is_none() {
            return Err(ExchangeError::Reset);
        }
        let reaped = vq.reap();
        if let State::Done(used) = vq.slots[i].state {
            return Ok(Some(used));
        }
        let e = match reaped {
            Err(e) => e,
            // Another request timed out, or answered what was never asked: this one would
            // only wait out its own timeout.
            Ok(_) if !recovery && self.broken.load(Ordering::Acquire) => ExchangeError::Broken,
            Ok(_) if clock.elapsed_ns() >= timeout => ExchangeError::TimedOut,
            Ok(_) => return Ok(None),
        };
        vq.slots[i].state = State::Abandoned;
        Err(e)
    }

    /// Waits without the queue lock for slot `i`'s answer: polls for `poll_us`, then sleeps
    /// until the queue's interrupt (or a caller that took the answer wakes it), at most until
    /// the timeout. Returns the lock and the used length.
    #[allow(clippy::too_many_arguments)]
    fn sleep_for_answer<'a>(
        &'a self,
        qi: usize,
        i: usize,
        seq: u64,
        hdr: &ReqHeader,
        recovery: bool,
        timeout: u64,
        clock: &mut Elapsed,
    ) -> Result<(
        kernel::sync::lock::Guard<'a, Vq, kernel::sync::lock::spinlock::SpinLockBackend>,
        u32,
    )> {
        let q = &self.queues[qi];
        let poll_ns = crate::poll_ns();
        let mut slept = false;
        loop {
            let mut guard = q.lock();
            match self.check_slot(&mut guard, i, seq, recovery, timeout, clock) {
                Ok(Some(used)) => {
                    if slept {
                        self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok((guard, used));
                }
                Ok(None) => {}
                Err(e) => {
                    drop(guard);
                    return Err(self.exchange_failed(hdr, e));
                }
            }
            drop(guard);
            let elapsed = clock.elapsed_ns();
            if elapsed < poll_ns {
                for _ in 0..32 {
                    core::hint::spin_loop();
                }
                continue;
            }
            let mut asleep = false;
            // In slices of at most a second: a long `timeout_ms` must not look like a hung
            // task (the loop checks the clock again).
            let slice = timeout.saturating_sub(elapsed).min(1_000_000_000);
            wait::sleep(qi, slice, || {
                let mut guard = q.lock();
                let vq = &mut *guard;
                if vq.slots[i].seq != seq || vq.slots[i].state != State::InFlight {
                    return false;
                }
                // Checked after joining the wait queue: a breaker sets the flag, then wakes.
                if !recovery && self.broken.load(Ordering::Acquire) {
                    return false;
                }
                let Some(virtqueue) = vq.vq.as_mut() else {
                    return false;
                };
                // No interrupt comes from a broken virtqueue.
                if virtqueue.is_broken() {
                    return false;
                }
                vq.sleepers += 1;
                // False: the device returned requests already, which no interrupt announces.
                if !virtqueue.enable_cb() {
                    vq.sleepers -= 1;
                    if vq.sleepers == 0 {
                        virtqueue.disable_cb();
                    }
                    return false;
                }
                asleep = true;
                true
            });
            if asleep {
                slept = true;
                let mut guard = q.lock();
                let vq = &mut *guard;
                vq.sleepers -= 1;
                if vq.sleepers == 0 {
                    if let Some(virtqueue) = vq.vq.as_mut() {
                        virtqueue.disable_cb();
                    }
                }
            }
        }
    }

    /// Records a request the device did not answer: once the device is broken (by a timeout,
    /// a bad answer, or the virtio core), the driver stops sending. Returns the hook's error.
    fn exchange_failed(&self, hdr: &ReqHeader, e: ExchangeError) -> Error {
        match e {
            ExchangeError::Add(e) => e,
            // Frozen for a suspend: the host keeps its pages, the device is not broken.
            ExchangeError::Reset if self.frozen.load(Ordering::Acquire) => EAGAIN,
            // A recovery's reset: the device is broken already.
            ExchangeError::Reset => ENODEV,
            ExchangeError::Broken | ExchangeError::TimedOut | ExchangeError::BadToken => {
                if !self.broken.swap(true, Ordering::AcqRel) {
                    self.wake_waiters();
                    self.schedule_recovery(false);
                    let op = Op::from_u32(hdr.op);
                    match e {
                        ExchangeError::TimedOut => pr_err!(
                            "device broken: {:?} not answered in {} ms; tmem requests fail until it answers again\n",
                            op,
                            crate::timeout_ns() / 1_000_000
                        ),
                        ExchangeError::BadToken => pr_err!(
                            "device broken: it returned a request not in flight ({:?}); tmem requests fail until it answers again\n",
                            op
                        ),
                        _ => pr_err!(
                            "device broken: the virtqueue broke ({:?}); tmem requests fail until it answers again\n",
                            op
                        ),
                    }
                }
                ENODEV
            }
        }
    }

    /// Wakes every caller asleep until an interrupt: the device broke, and they give up.
    pub(crate) fn wake_waiters(&self) {
        for qi in 0..self.queues.len() {
            wait::wake(qi);
        }
    }

    /// A request on the control queue that must succeed; returns the response's value.
    pub(crate) fn control(
        &self,
        hdr: &ReqHeader,
        payload: &[u8],
        epoch: u64,
        wait: Wait,
    ) -> Result<u64> {
        let resp = self.control_status(hdr, payload, epoch, wait)?;
        match Status::from_u32(resp.status) {
            Some(Status::Ok) => Ok(resp.value),
            Some(Status::TooManyPools) => Err(ENOSPC),
            _ => {
                pr_err!(
                    "{:?} failed: {}\n",
                    Op::from_u32(hdr.op),
                    status_name(resp.status)
                );
                Err(EIO)
            }
        }
    }

    /// A request on the control queue whose status the caller interprets.
    pub(crate) fn control_status(
        &self,
        hdr: &ReqHeader,
        payload: &[u8],
        epoch: u64,
        wait: Wait,
    ) -> Result<RespHeader> {
        self.call(0, hdr, payload, Data::NoPage, &mut [], epoch, false, wait)
    }

    /// A recovery's request (sent while the device is broken) on queue `q`: the control
    /// queue for pool operations, a request queue for the probe of a pool.
    pub(crate) fn recovery_call(
        &self,
        q: usize,
        hdr: &ReqHeader,
        payload: &[u8],
        epoch: u64,
    ) -> Result<RespHeader> {
        // The recovery is a work item: it may sleep.
        self.call(
            q,
            hdr,
            payload,
            Data::NoPage,
            &mut [],
            epoch,
            true,
            Wait::Sleep,
        )
    }

    /// The current epoch (see [`TmemDev::call`]): read it before the pool ids a request uses.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Sends the queued invalidations, and waits for the ones another CPU is sending: on
    /// return, every invalidation queued before the call has been carried out by the device
    /// (or the device is broken, and every request fails). Puts and gets call this first: one
    /// of the invalidations may name their key.
    ///
    /// Why that holds: `pending_len` is nonzero from the moment an invalidation is queued until
    /// the BATCH carrying it has been *completed* by the device, because [`Self::send_pending`]
    /// keeps the pending lock, and sets `pending_len` to 0, only after the device returned the
    /// BATCH; no entry can be queued in between (the lock is held). An invalidation that
    /// happened before this call (the hook returned, and the caller synchronized with it: a
    /// freed swap slot is reused under the swap_info lock, a truncated page is read again
    /// after the truncation) stored a nonzero `pending_len` with Release that this Acquire load
    /// sees, or sees a later value: nonzero again (we take the lock, which waits for a BATCH
    /// in flight, and send whatever is still queued), or the 0 that its own BATCH's completion
    /// stored. Requests on different queues are served in parallel by the device, so "sent
    /// before" is not enough: the BATCH must have come back before the PUT or GET is added.
    pub(crate) fn drain_pending(&self) {
        if self.pending_len.load(Ordering::Acquire) != 0 {
            self.send_pending(&mut self.pending.lock());
        }
    }

    /// Sends a PUT of `page`, counted in `counters` (puts, refused puts). NO_SPACE and REFUSED
    /// return ENOSPC; other failures are counted and logged as `what`.
    pub(crate) fn put(
        &self,
        hdr: &ReqHeader,
        page: &Page,
        counters: [&AtomicU64; 2],
        what: &str,
        epoch: u64,
        wait: Wait,
    ) -> Result {
        counters[0].fetch_add(1, Ordering::Relaxed);
        let q = self.queue_for_cpu();
        match self.call(q, hdr, &[], Data::Out(page), &mut [], epoch, false, wait) {
            Ok(resp) => match Status::from_u32(resp.status) {
                Some(Status::Ok) => Ok(()),
                Some(Status::NoSpace | Status::Refused) => {
                    counters[1].fetch_add(1, Ordering::Relaxed);
                    Err(ENOSPC)
                }
                Some(Status::BadPool) => {
                    self.pool_lost(hdr.pool_id, epoch);
                    Err(self.failure(what, resp.status))
                }
                _ => Err(self.failure(what, resp.status)),
            },
            Err(e) => Err(self.transport_failure(what, e)),
        }
    }

    /// Sends a GET into `page`, counted in `counters` (gets, hits, misses). A hit returns the
    /// response flags (`DROPPED`); a miss returns ENOENT; other failures are counted and logged
    /// as `what`.
    pub(crate) fn get(
        &self,
        hdr: &ReqHeader,
        page: &Page,
        counters: [&AtomicU64; 3],
        what: &str,
        epoch: u64,
        wait: Wait,
    ) -> Result<u32> {
        counters[0].fetch_add(1, Ordering::Relaxed);
        let q = self.queue_for_cpu();
        match self.call(q, hdr, &[], Data::In(page), &mut [], epoch, false, wait) {
            Ok(resp) => match Status::from_u32(resp.status) {
                Some(Status::BadPool) => {
                    self.pool_lost(hdr.pool_id, epoch);
                    Err(self.failure(what, resp.status))
                }
                Some(Status::Ok) => {
                    counters[1].fetch_add(1, Ordering::Relaxed);
                    Ok(resp.flags)
                }
                Some(Status::Miss) => {
                    counters[2].fetch_add(1, Ordering::Relaxed);
                    Err(ENOENT)
                }
                _ => Err(self.failure(what, resp.status)),
            },
            Err(e) => Err(self.transport_failure(what, e)),
        }
    }

    /// Queues a FLUSH_PAGE or FLUSH_OBJECT, or sends it at once without BATCH. Never sleeps.
    /// One whose pool id was read in an epoch a recovery ended is dropped: the recovery
    /// re-creates a page-cache pool, and a swap offset is harmless (see `flush_failed`).
    pub(crate) fn invalidate(&self, entry: BatchEntry, epoch: u64) {
        if !self.batch {
            let hdr = ReqHeader {
                op: entry.op,
                pool_id: entry.pool_id,
                oid: entry.oid,
                index: entry.index,
                ..Default::default()
            };
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            // Synchronous: the flush is carried out before this hook returns.
            let q = self.queue_for_cpu();
            match self.call(
                q,
                &hdr,
                &[],
                Data::NoPage,
                &mut [],
                epoch,
                false,
                Wait::Spin,
            ) {
                Ok(resp) if flushed(resp.status) => {}
                Ok(resp) => {
                    self.failure("flush", resp.status);
                    self.flush_failed(&entry, epoch);
                }
                // Its pool id is of an epoch a recovery ended: that recovery destroys the pool.
                Err(_) if self.epoch() != epoch => {}
                Err(e) => {
                    self.transport_failure("flush", e);
                    self.unvouched_flush();
                }
            }
            return;
        }
        let mut pending = self.pending.lock();
        // A recovery ends an epoch under this lock.
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if pending.len >= self.max_batch {
            self.send_pending(&mut pending);
        }
        if pending.len >= self.max_batch {
            // Frozen with a full batch: this invalidation cannot be vouched for (fail closed).
            drop(pending);
            self.unvouched_flush();
            return;
        }
        let at = pending.len;
        pending.entries[at] = entry;
        pending.len = at + 1;
        self.pending_len.store(pending.len, Ordering::Release);
    }

    /// Sends the queued invalidations in one BATCH request and waits for its answer, with the
    /// pending lock held throughout (see [`Self::drain_pending`] for why). A MISS (nothing to
    /// drop) or BAD_POOL (no such pool, so nothing to serve either) is fine; any other entry
    /// status is a failed flush (see [`Self::flush_failed`]), handled before `pending_len`
    /// drops to 0, so that a get ordered after the invalidation sees its outcome. A BATCH
    /// that is not answered properly (no answer in time, a wrong used length, a
    /// malformed-request status) may or may not have been carried out, so the invalidations
    /// cannot be vouched for: the device is broken, so that no later get can return a page one
    /// of them should have dropped.
    pub(crate) fn send_pending(&self, pending: &mut Pending) {
        let n = pending.len;
        // While frozen the entries wait (every put and get fails until the restore sends them).
        if n == 0 || self.frozen.load(Ordering::Acquire) {
            return;
        }
        for (i, entry) in pending.entries[..n].iter().enumerate() {
            let at = i * BatchEntry::SIZE;
            pending.buf[at..at + BatchEntry::SIZE].copy_from_slice(&entry.encode());
        }
        let hdr = ReqHeader {
            op: Op::Batch as u32,
            count: n as u32,
            ..Default::default()
        };
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.flushes.fetch_add(n as u64, Ordering::Relaxed);
        let payload = &pending.buf[..n * BatchEntry::SIZE];
        let statuses = &mut pending.statuses[..n];
        // Every queued entry is of the current epoch: a recovery ends it under this lock,
        // dropping the entries.
        let epoch = self.epoch.load(Ordering::Acquire);
        let q = self.queue_for_cpu();
        // The pending lock is held: spin.
        match self.call(
            q,
            &hdr,
            payload,
            Data::NoPage,
            statuses,
            epoch,
            false,
            Wait::Spin,
        ) {
            Ok(resp) if resp.status == Status::Ok as u32 => {
                let mut failed = 0;
                for (entry, status) in pending.entries[..n].iter().zip(&pending.statuses[..n]) {
                    if !flushed(u32::from(*status)) {
                        failed += 1;
                        self.flush_failed(entry, epoch);
                    }
                }
                if failed > 0 {
                    let count = self.stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
                    if rare(count) {
                        pr_warn!(
                            "batch of {} flushes: {} entries failed ({} failures)\n",
                            n,
                            failed,
                            count
                        );
                    }
                }
            }
            Ok(resp) => {
                self.failure("batch", resp.status);
                self.unvouched_flush();
            }
            Err(e) => {
                self.transport_failure("batch", e);
                self.unvouched_flush();
            }
        }
        // Only now, with the answer in and acted on (or the device broken): every entry has
        // reached the device, and a put or get that reads 0 below may overtake none of them.
        pending.len = 0;
        self.pending_len.store(0, Ordering::Release);
    }

    /// A flush the device answered with an error status: the page (or object) may still be
    /// on the host. A swap offset is harmless (the core never loads an invalidated offset,
    /// and a later store replaces the copy), so it is only counted. A page-cache pool could
    /// serve the stale page to a later get: the filesystem loses its pool (fail closed).
    /// `epoch` is the request's: a pool id of an ended epoch is no longer the filesystem's.
    fn flush_failed(&self, entry: &BatchEntry, epoch: u64) {
        if self.epoch() != epoch {
            return;
        }
        let fs = self
            .fs_pools
            .iter()
            .position(|p| p.load(Ordering::Acquire) == entry.pool_id);
        if let Some(fs) = fs {
            self.release_fs_pool(fs, "a flush failed", epoch);
        }
    }

    /// An invalidation may not have been carried out, nor any other: stale pages could be read
    /// back, so the device is broken (fail closed). Nothing to do if it is broken already.
    fn unvouched_flush(&self) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        self.wake_waiters();
        self.schedule_recovery(false);
        // Frozen, the queues are gone and the flag alone stops every request.
        if let Some(vq) = &self.queues[0].lock().vq {
            vq.break_device();
        }
        pr_err!(
            "device broken: an invalidation was not acknowledged; tmem requests fail until it answers again\n"
        );
    }

    /// RESET (with `SESSION`): drops every pool the host holds for this driver, such as an
    /// earlier boot's, whose ids the pools created after it must never meet.
    pub(crate) fn reset(&self) -> Result {
        let hdr = ReqHeader {
            op: Op::Reset as u32,
            ..Default::default()
        };
        let dropped = self.control(&hdr, &[], self.epoch(), Wait::Sleep)?;
        if dropped > 0 {
            pr_info!("host dropped {} pools of an earlier start\n", dropped);
        }
        Ok(())
    }

    /// Destroys host pool `pool`, whose id was read in `epoch`.
    pub(crate) fn destroy_pool(&self, pool: u32, what: &str, epoch: u64, wait: Wait) {
        let hdr = ReqHeader {
            op: Op::DestroyPool as u32,
            pool_id: pool,
            ..Default::default()
        };
        if let Err(e) = self.control(&hdr, &[], epoch, wait) {
            pr_err!("{}: destroying host pool {} failed: {:?}\n", what, pool, e);
        }
    }

    fn failure(&self, what: &str, status: u32) -> Error {
        let count = self.stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if rare(count) {
            pr_err!(
                "{} failed: {} ({} failures)\n",
                what,
                status_name(status),
                count
            );
        }
        EIO
    }

    fn transport_failure(&self, what: &str, e: Error) -> Error {
        let count = self.stats.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if rare(count) {
            pr_err!("{}: virtqueue error {:?} ({} failures)\n", what, e, count);
        }
        EIO
    }

    /// Reads the device's config, finds its queues and allocates every buffer the requests
    /// use. On failure the queues are deleted again.
    pub(crate) fn new(vdev: &virtio::Device) -> Result<Arc<TmemDev>> {
        let mut raw = [0u8; Config::SIZE];
        vdev.read_config(0, &mut raw)?;
        if raw.iter().all(|&b| b == 0xff) {
            // What QEMU's virtio-pci reads past a device's config space: an attach line
            // without `config_size`.
            pr_err!(
                "the device's config space is empty (QEMU: config_size={})\n",
                Config::SIZE
            );
            return Err(EINVAL);
        }
        let config = Config::decode(&raw);
        if u32::from(config.page_shift) != proto::PAGE_SHIFT {
            pr_err!("device page shift {} is not supported\n", config.page_shift);
            return Err(EINVAL);
        }
        let nreq = if vdev.has_feature(proto::feature::MQ) {
            usize::from(config.num_request_queues).clamp(1, usize::from(proto::MAX_REQUEST_QUEUES))
        } else {
            1
        };
        let nvqs = 1 + nreq;
        let vqs = vdev.find_vqs(&queue_names(nvqs)?, wait::callback)?;

        let max_batch = usize::from(config.max_batch).min(MAX_BATCH);
        // A device that takes no batch entry cannot batch at all.
        let batch = vdev.has_feature(proto::feature::BATCH) && max_batch > 0;
        let build = || -> Result<Arc<TmemDev>> {
            let mut queues = KVec::with_capacity(nvqs, GFP_KERNEL)?;
            for (index, vq) in vqs.into_iter().enumerate() {
                let mut slots = KVec::with_capacity(SLOTS, GFP_KERNEL)?;
                for _ in 0..SLOTS {
                    slots.push(
                        Slot {
                            out: KVec::from_elem(0u8, OUT_BUF, GFP_KERNEL)?,
                            resp: KVec::from_elem(0u8, RESP_BUF, GFP_KERNEL)?,
                            bounce: KVec::from_elem(0u8, proto::PAGE_SIZE, GFP_KERNEL)?,
                            state: State::Free,
                            seq: 0,
                        },
                        GFP_KERNEL,
                    )?;
                }
                let vq = Vq {
                    usable: usable_slots(&vq),
                    vq: Some(vq),
                    slots,
                    sleepers: 0,
                    index,
                };
                let q = KBox::pin_init(new_spinlock!(vq, "tmem_vq"), GFP_KERNEL)?;
                queues.push(q, GFP_KERNEL)?;
            }
            let pending = Pending {
                entries: KVec::from_elem(BatchEntry::default(), MAX_BATCH, GFP_KERNEL)?,
                len: 0,
                buf: KVec::from_elem(0u8, MAX_BATCH * BatchEntry::SIZE, GFP_KERNEL)?,
                statuses: KVec::from_elem(0u8, MAX_BATCH, GFP_KERNEL)?,
                orphans: Orphans {
                    swap: [(NO_POOL, false); SWAP_TYPES],
                    fs: [(NO_POOL, false); FS_SLOTS],
                    swap_lost: [NO_POOL; SWAP_TYPES],
                    doomed: [NO_POOL; DOOMED],
                    ndoomed: 0,
                },
            };
            Ok(Arc::new(
                TmemDev {
                    queues,
                    pools: [const { AtomicU32::new(NO_POOL) }; SWAP_TYPES],
                    fs_pools: [const { AtomicU32::new(NO_POOL) }; FS_SLOTS],
                    fs_shared: [const { AtomicBool::new(false) }; FS_SLOTS],
                    pending: KBox::pin_init(new_spinlock!(pending, "tmem_pending"), GFP_KERNEL)?,
                    pending_len: AtomicUsize::new(0),
                    broken: AtomicBool::new(false),
                    epoch: AtomicU64::new(0),
                    vdev: AtomicPtr::new(core::ptr::null_mut()),
                    work: Work::new(),
                    shrink_work: DelayedWork::new(),
                    shrink_on: AtomicBool::new(false),
                    recovery_queued: AtomicBool::new(false),
                    next_try_ns: AtomicU64::new(0),
                    backoff_ms: AtomicU32::new(crate::recovery::FIRST_RETRY_MS),
                    unanswered: AtomicU32::new(0),
                    frozen: AtomicBool::new(false),
                    batch,
                    shared_pools: vdev.has_feature(proto::feature::SHARED_POOLS),
                    max_batch,
                    stats: Counters::default(),
                },
                GFP_KERNEL,
            )?)
        };
        let dev = match build() {
            Ok(dev) => {
                // SAFETY: once, before anything can queue them (`vdev` is null until the end
                // of probe, and so is `shrink_on`), in an `Arc`, which never moves its
                // contents.
                unsafe {
                    dev.work.init(crate::recovery::recover_work);
                    dev.shrink_work.init(crate::shrink::shrink_work);
                }
                dev.stats
                    .shrink_target
                    .store(crate::shrink::NO_TARGET, Ordering::Relaxed);
                dev
            }
            Err(e) => {
                // SAFETY: the queues were found above, no request was queued and their handles
                // were dropped with the failed build.
                unsafe { vdev.del_vqs() };
                return Err(e);
            }
        };
        pr_info!(
            "device ready: {} request queue(s), batch {} (up to {}), host limit {} pages\n",
            nreq,
            if dev.batch { "on" } else { "off" },
            dev.max_batch,
            config.limit_pages
        );
        Ok(dev)
    }

    /// Suspend: sends the queued invalidations, gives the virtqueues back and resets the
    /// device. The host keeps the pools (the VMM's connection to it stays; with sessions even a
    /// reconnect keeps them), so [`Self::restore`] carries on where this stopped. Requests in
    /// the meantime fail with EAGAIN and leave the device working; none are expected, as
    /// the kernel freezes tasks before devices.
    pub(crate) fn freeze(&self, vdev: &virtio::Device) {
        self.send_pending(&mut self.pending.lock());
        self.frozen.store(true, Ordering::Release);
        // A request sent after this finds no queue.
        let mut had_queues = false;
        for (qi, q) in self.queues.iter().enumerate() {
            let mut guard = self.idle_queue(qi, q);
            let vq = &mut *guard;
            had_queues |= vq.vq.take().is_some();
            // The reset below takes the ring from the device, with any request in it.
            // A caller still waiting after all finds its request gone (`seq`); an answer
            // already taken stays for its caller.
            for slot in vq.slots.iter_mut() {
                if !matches!(slot.state, State::Done(_)) {
                    slot.state = State::Free;
                    slot.seq = slot.seq.wrapping_add(1);
                }
            }
        }
        vdev.reset();
        // A restore that failed (or a recovery's) left none to delete: the transport may not
        // take a second deletion (virtio-mmio frees their interrupt again).
        if had_queues {
            // SAFETY: no request is in flight and every `Virtqueue` handle was dropped above;
            // new requests find none until `restore` puts new ones in.
            unsafe { vdev.del_vqs() };
        }
    }

    /// Queue `qi`'s lock, once no caller waits on it for an answer nor has one to take:
    /// callers that sleep are bounded by the timeout, and give up early when the device is
    /// broken (a recovery resets it then). After twice the timeout the queue is taken anyway:
    /// a caller still waiting then finds its request gone (`seq`) and fails. Sleeps.
    fn idle_queue<'a>(
        &self,
        qi: usize,
        q: &'a SpinLock<Vq>,
    ) -> kernel::sync::lock::Guard<'a, Vq, kernel::sync::lock::spinlock::SpinLockBackend> {
        let mut clock = Elapsed::start();
        loop {
            let guard = q.lock();
            if !guard.busy() || clock.elapsed_ns() >= 2 * crate::timeout_ns() {
                return guard;
            }
            drop(guard);
            wait::sleep(qi, 1_000_000, || true);
        }
    }

    /// Resume: finds the virtqueues again (the device was reset and its features negotiated
    /// again), marks the device ready and sends the invalidations queued while frozen. If the
    /// queues cannot be set up, the device is broken: every request fails at once.
    pub(crate) fn restore(&self, vdev: &virtio::Device) -> Result {
        let vqs = match queue_names(self.queues.len())
            .and_then(|n| vdev.find_vqs(&n, wait::callback))
        {
            Ok(vqs) => vqs,
            Err(e) => {
                self.broken.store(true, Ordering::Release);
                pr_err!(
                    "device broken: its queues could not be set up again after a resume ({}); tmem requests fail until it answers again\n",
                    e.to_errno()
                );
                return Err(e);
            }
        };
        for (q, vq) in self.queues.iter().zip(vqs) {
            let mut q = q.lock();
            q.usable = usable_slots(&vq);
            q.vq = Some(vq);
        }
        self.frozen.store(false, Ordering::Release);
        vdev.ready();
        self.send_pending(&mut self.pending.lock());
        Ok(())
    }

    /// Where the queues stand for a recovery: takes the answers that came since a timeout
    /// left a request in a ring, and says whether the device can be used again without a
    /// reset. Takes every queue lock, so that a request sent after this carries the current
    /// epoch.
    pub(crate) fn settle_queues(&self) -> Settled {
        let mut st = Settled {
            usable: true,
            unanswered: false,
            unanswered_create: false,
            late: [NO_POOL; MAX_QUEUES * SLOTS],
            nlate: 0,
        };
        for q in self.queues.iter() {
            let mut guard = q.lock();
            let vq = &mut *guard;
            if vq.vq.is_none() {
                st.usable = false;
                continue;
            }
            if vq.reap().is_err() {
                st.usable = false;
            }
            for slot in vq.slots.iter_mut() {
                let mut h = [0u8; ReqHeader::SIZE];
                h.copy_from_slice(&slot.out[..ReqHeader::SIZE]);
                let create = ReqHeader::decode(&h).op == Op::CreatePool as u32;
                match slot.state {
                    State::Late(len) => {
                        slot.state = State::Free;
                        let mut r = [0u8; RespHeader::SIZE];
                        r.copy_from_slice(&slot.resp[..RespHeader::SIZE]);
                        let resp = RespHeader::decode(&r);
                        // A pool nobody holds the id of. Only a full answer counts (`call`
                        // wrote an unknown status over the response before sending).
                        if create
                            && len as usize == RespHeader::SIZE
                            && resp.status == Status::Ok as u32
                            && st.nlate < st.late.len()
                        {
                            if let Ok(id) = u32::try_from(resp.value) {
                                st.late[st.nlate] = id;
                                st.nlate += 1;
                            }
                        }
                    }
                    // Not answered yet; a caller still waiting gives up soon (the device is
                    // broken), and its request counts as unanswered meanwhile.
                    State::Abandoned | State::InFlight => {
                        st.unanswered = true;
                        st.unanswered_create |= create;
                    }
                    State::Free | State::Done(_) => {}
                }
            }
            if vq.vq.as_ref().is_some_and(|v| v.is_broken()) {
                st.usable = false;
            }
        }
        st
    }

    /// Whether the device has its virtqueues (not frozen, nor failed to restore).
    pub(crate) fn has_queues(&self) -> bool {
        self.queues.first().is_some_and(|q| q.lock().vq.is_some())
    }
}

/// How many slots fit `vq`'s ring at once.
fn usable_slots(vq: &Virtqueue) -> usize {
    (vq.size() / virtio::DESCS_PER_REQUEST).clamp(1, SLOTS)
}

/// The virtqueue names: the control queue, then the request queues.
fn queue_names(nvqs: usize) -> Result<KVec<&'static CStr>> {
    let mut names = KVec::with_capacity(nvqs, GFP_KERNEL)?;
    for i in 0..nvqs {
        let name = if i == 0 {
            c_str!("tmem-control")
        } else {
            c_str!("tmem-request")
        };
        names.push(name, GFP_KERNEL)?;
    }
    Ok(names)
}
