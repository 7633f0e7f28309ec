// SPDX-License-Identifier: GPL-2.0

//! Coming back from a broken device: the daemon was restarted, or QEMU reconnected to it.
//!
//! A device that stopped answering, or that no longer knows a pool the driver holds (a daemon
//! restarted without its state), is broken: every hook fails at once (see `device.rs`). The
//! next hook that finds it broken queues a recovery on the freezable system workqueue, at most
//! every second while the device has not answered what it was sent (an attempt then sends
//! nothing), and after a wait doubling from 1 s to 32 s after an attempt that failed further
//! on. The recovery:
//!
//! 1. ends the epoch: under the pending lock, it takes every pool from its slot (into
//!    [`Orphans`](crate::device::Orphans)), drops the queued invalidations and bumps `epoch`.
//!    A request carries the epoch in which its pool ids were read and is not sent from an
//!    earlier one, so no id of the host's previous life reaches a pool that a restarted daemon
//!    gave the same number;
//! 2. waits for the device to answer what it was asked: a request that timed out stays in its
//!    ring, and a device that comes back (a hung daemon that goes on, or a restarted one that
//!    QEMU hands the ring to) answers it. Until then the attempt fails without touching the
//!    device: resetting it would make QEMU wait for a hung daemon with its global lock held,
//!    stalling the whole guest. Only queues the virtio core broke (the device returned what
//!    was never asked, or QEMU broke the ring of a daemon that died) are reset and set up again,
//!    as the core does at resume, and a device that never answers (about a minute of tries).
//!    A late CREATE_POOL answer made a pool nobody holds: it is destroyed first, since a
//!    restarted daemon may have given it an id the driver held before (and if such a request
//!    is never answered, no swap pool is kept: none could be told from the pool it made);
//! 3. asks the device about each swap pool (a FLUSH_PAGE of an offset no swap area has:
//!    MISS if the host still holds the pool, BAD_POOL if not) and destroys every page-cache
//!    pool: invalidations were dropped while the device was away, so what the host kept of
//!    one may be stale;
//! 4. creates what is missing: a persistent pool for each swap area whose pool the host lost
//!    (the pages stored before are gone with it: their loads fail, as for a device that went
//!    away), a private pool for each filesystem;
//! 5. hands the pools back and clears `broken`.
//!
//! Every verdict of step 3 and every pool of step 4 is recorded in the orphans as it is made,
//! so that an attempt that fails halfway (the device stops answering: each answer is awaited
//! 1 s at most) leaves the next one only ids of the host it talks to. A swap area or
//! filesystem that goes away meanwhile marks its orphan, whose pool is then destroyed instead.
//!
//! Known gaps: a daemon that restarts, empty, between two requests of one attempt (a
//! transparent reconnect) could give out again an id step 3 found kept, and a device that
//! keeps failing between late answers can overflow the doomed list. Closing both needs an
//! instance identifier from the host; see `docs/guest.md`.

use core::sync::atomic::{AtomicU32, Ordering};
use kernel::{bindings, prelude::*};

use crate::device::{TmemDev, FS_SLOTS, NO_POOL, SWAP_TYPES};
use crate::proto::{self, CreatePool, Op, ReqHeader, Status};
use crate::virtio;

/// An orphan whose pool the host no longer has (or was destroyed): a new one is to be made.
const NEW_POOL: u32 = u32::MAX - 1;

/// Whether `id` names a host pool (not [`NO_POOL`] nor [`NEW_POOL`]).
fn is_pool(id: u32) -> bool {
    id < NEW_POOL
}

/// Attempts (about a second apart) that find the request a timeout left in a ring still
/// unanswered before the device is reset anyway. Until then a reset is avoided: QEMU would wait
/// for a hung daemon with its global lock held, stalling the guest.
const RESET_AFTER_UNANSWERED: u32 = 60;

/// The wait before the first recovery attempt, and after a successful one.
pub(crate) const FIRST_RETRY_MS: u32 = 1000;
/// The longest wait between attempts.
const MAX_RETRY_MS: u32 = 32_000;
/// How long a recovery waits for each answer, at most: the device answers at once or is not
/// back.
pub(crate) const PROBE_TIMEOUT_NS: u64 = 1_000_000_000;

/// Why an attempt stopped.
enum Failed {
    /// The request a timeout left in a ring is still unanswered: nothing was sent, so the next
    /// attempt costs as little and comes as soon.
    Unanswered,
    /// The device did not answer (or the queues could not be set up).
    Device(Error),
}

impl TmemDev {
    /// Allows recoveries of `vdev` (the end of probe).
    pub(crate) fn enable_recovery(&self, vdev: &virtio::Device) {
        self.vdev.store(vdev.as_raw(), Ordering::Release);
    }

    /// Stops recoveries and waits for one in progress (removal, before anything of the device
    /// goes). No hook may run any more: none could queue another.
    pub(crate) fn stop_recovery(&self) {
        self.vdev.store(core::ptr::null_mut(), Ordering::Release);
        self.work.cancel_sync();
        self.recovery_queued.store(false, Ordering::Release);
    }

    /// Sets when the next recovery may start: now, or after the current backoff.
    pub(crate) fn schedule_recovery(&self, now: bool) {
        self.schedule_after(if now {
            0
        } else {
            self.backoff_ms.load(Ordering::Relaxed)
        });
    }

    fn schedule_after(&self, ms: u32) {
        let at = (virtio::now_ns() as u64).saturating_add(u64::from(ms) * 1_000_000);
        self.next_try_ns.store(at, Ordering::Relaxed);
    }

    /// Queues a recovery if the device may be recovered and it is time. Any context.
    pub(crate) fn kick_recovery(&self) {
        if self.vdev.load(Ordering::Acquire).is_null()
            || (virtio::now_ns() as u64) < self.next_try_ns.load(Ordering::Relaxed)
            || self.recovery_queued.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.work.queue();
    }

    /// Queues a recovery if the device is broken and it is time (a hook that found no pool:
    /// a recovery that failed keeps them, so the hooks stop at the lookup). Any context.
    pub(crate) fn kick_if_broken(&self) {
        if self.broken.load(Ordering::Acquire) {
            self.kick_recovery();
        }
    }

    /// The device answered BAD_POOL for `pool`, whose id was read in `epoch`: if the driver
    /// still holds that pool, the host lost it (a daemon restarted without its state), and
    /// whatever else it held. The device is broken until a recovery sets it up again.
    pub(crate) fn pool_lost(&self, pool: u32, epoch: u64) {
        if self.epoch() != epoch {
            return;
        }
        let held = |slots: &[AtomicU32]| slots.iter().any(|p| p.load(Ordering::Acquire) == pool);
        // Released or replaced meanwhile (a page-cache pool whose flush failed, say): not lost.
        if !held(&self.pools) && !held(&self.fs_pools) {
            return;
        }
        if !self.broken.swap(true, Ordering::AcqRel) {
            pr_err!(
                "device broken: it does not know pool {} (the host lost it); tmem requests fail until it is set up again\n",
                pool
            );
            self.wake_waiters();
            self.schedule_recovery(true);
        }
        self.kick_recovery();
    }

    /// Puts pool `id`, created with the ids of `epoch`, in `slot`, unless a recovery ended
    /// that epoch meanwhile or the slot is taken. Returns whether it did.
    pub(crate) fn publish(&self, slot: &AtomicU32, id: u32, epoch: u64) -> bool {
        let _pending = self.pending.lock();
        self.epoch() == epoch
            && slot
                .compare_exchange(NO_POOL, id, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// The work item: one recovery attempt, then the wait before the next.
    fn recover(&self) {
        let raw = self.vdev.load(Ordering::Acquire);
        if !raw.is_null() && self.broken.load(Ordering::Acquire) {
            // SAFETY: `vdev` is set from the end of probe until removal begins, and removal
            // waits for this work item (`stop_recovery`) before the device goes.
            let vdev = unsafe { virtio::Device::from_raw(raw) };
            match self.attempt(vdev) {
                Ok(()) => self.backoff_ms.store(FIRST_RETRY_MS, Ordering::Relaxed),
                Err(Failed::Unanswered) => {
                    let tries = self.stats.recoveries.load(Ordering::Relaxed);
                    if crate::device::rare(tries) {
                        pr_info!(
                            "device not back yet: no answer to the request it was sent ({} tries)\n",
                            tries
                        );
                    }
                    self.schedule_after(FIRST_RETRY_MS);
                }
                Err(Failed::Device(e)) => {
                    let ms = self.backoff_ms.load(Ordering::Relaxed);
                    pr_info!("device not back yet ({:?}); next try in {} ms\n", e, ms);
                    self.schedule_after(ms);
                    let next = ms.saturating_mul(2).min(MAX_RETRY_MS);
                    self.backoff_ms.store(next, Ordering::Relaxed);
                }
            }
        }
        self.recovery_queued.store(false, Ordering::Release);
    }

    fn attempt(&self, vdev: &virtio::Device) -> core::result::Result<(), Failed> {
        self.stats.recoveries.fetch_add(1, Ordering::Relaxed);
        // 1. End the epoch.
        {
            let mut p = self.pending.lock();
            p.clear();
            self.pending_len.store(0, Ordering::Release);
            for (t, slot) in self.pools.iter().enumerate() {
                let id = slot.swap(NO_POOL, Ordering::AcqRel);
                if id != NO_POOL {
                    p.orphans.swap[t] = (id, false);
                    self.stats.pools.fetch_sub(1, Ordering::Relaxed);
                }
            }
            for (fs, slot) in self.fs_pools.iter().enumerate() {
                let id = slot.swap(NO_POOL, Ordering::AcqRel);
                if id != NO_POOL {
                    p.orphans.fs[fs] = (id, false);
                    self.stats.cache_pools.fetch_sub(1, Ordering::Relaxed);
                    if self.fs_shared[fs].swap(false, Ordering::Relaxed) {
                        self.stats
                            .cache_shared_pools
                            .fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        // 2. Wait for the answers a timeout left behind, or reset and set up again.
        let settled = self.settle_queues();
        // Pools late CREATE_POOL answers made are doomed at once, before anything can fail:
        // the answers are consumed.
        {
            let mut p = self.pending.lock();
            for &id in settled.late[..settled.nlate]
                .iter()
                .filter(|id| is_pool(**id))
            {
                p.orphans.doom(id);
            }
        }
        let mut reset = !settled.usable;
        if settled.unanswered {
            let waits = self.unanswered.fetch_add(1, Ordering::Relaxed) + 1;
            if waits < RESET_AFTER_UNANSWERED {
                return Err(Failed::Unanswered);
            }
            // Never answered (a device that dropped it): reset after all.
            pr_info!("device still silent after {} tries: resetting it\n", waits);
            reset = true;
            if settled.unanswered_create {
                // The creation may have made a pool under an id a swap pool had: no swap
                // pool can be told from it, so none is kept (their pages are lost, none is
                // misread), and each is destroyed.
                let mut p = self.pending.lock();
                for t in 0..SWAP_TYPES {
                    let id = p.orphans.swap[t].0;
                    if is_pool(id) {
                        p.orphans.doom(id);
                        p.orphans.swap_lost[t] = id;
                        p.orphans.swap[t].0 = NEW_POOL;
                    }
                }
            }
        }
        self.unanswered.store(0, Ordering::Relaxed);
        if reset {
            self.reinit(vdev)?;
        }
        let epoch = self.epoch();
        // Before anything is asked by id: a doomed pool may have an id the driver held before.
        loop {
            let id = {
                let p = self.pending.lock();
                match p.orphans.ndoomed {
                    0 => break,
                    n => p.orphans.doomed[n - 1],
                }
            };
            self.destroy(id, epoch)?;
            let mut p = self.pending.lock();
            p.orphans.ndoomed -= 1;
        }
        // 3. What the host still has; away with page-cache pools. Each verdict is recorded
        // at once (`NEW_POOL`): a later attempt must not ask about an id this host may have
        // given out again since.
        let (swap, fs) = self.orphans();
        for (t, &(id, _)) in swap.iter().enumerate() {
            if is_pool(id) && !self.pool_exists(id, epoch)? {
                self.record(|o| &mut o.swap[t], id, NEW_POOL);
                let mut p = self.pending.lock();
                p.orphans.swap_lost[t] = id;
            }
        }
        for (i, &(id, _)) in fs.iter().enumerate() {
            if is_pool(id) {
                self.destroy(id, epoch)?;
                self.record(|o| &mut o.fs[i], id, NEW_POOL);
            }
        }
        // 4. What is missing, each new pool recorded at once too.
        let (swap, fs) = self.orphans();
        for (t, &(id, dead)) in swap.iter().enumerate() {
            if id == NEW_POOL && !dead {
                let new = self.create(true, epoch)?;
                self.record(|o| &mut o.swap[t], id, new);
            }
        }
        for (i, &(id, dead)) in fs.iter().enumerate() {
            if id == NEW_POOL && !dead {
                let new = self.create(false, epoch)?;
                self.record(|o| &mut o.fs[i], id, new);
            }
        }
        // 5. Hand them back.
        let mut dead = [NO_POOL; SWAP_TYPES + FS_SLOTS];
        let mut ndead = 0;
        {
            let mut p = self.pending.lock();
            // The pool an orphan hands back, if any; one whose area went away is to destroy.
            let mut take = |o: &mut (u32, bool)| {
                let (id, gone) = core::mem::replace(o, (NO_POOL, false));
                if gone && is_pool(id) {
                    dead[ndead] = id;
                    ndead += 1;
                }
                (is_pool(id) && !gone).then_some(id)
            };
            for t in 0..SWAP_TYPES {
                let lost = core::mem::replace(&mut p.orphans.swap_lost[t], NO_POOL);
                let Some(id) = take(&mut p.orphans.swap[t]) else {
                    continue;
                };
                self.pools[t].store(id, Ordering::Release);
                self.stats.pools.fetch_add(1, Ordering::Relaxed);
                if lost == NO_POOL {
                    pr_info!("swap area {}: host pool {} kept\n", t, id);
                } else {
                    pr_err!(
                        "swap area {}: host pool {} lost with the pages in it; new pool {}\n",
                        t,
                        lost,
                        id
                    );
                }
            }
            for i in 0..FS_SLOTS {
                let Some(id) = take(&mut p.orphans.fs[i]) else {
                    continue;
                };
                self.fs_pools[i].store(id, Ordering::Release);
                self.stats.cache_pools.fetch_add(1, Ordering::Relaxed);
                pr_info!("filesystem {}: new host pool {}\n", i, id);
            }
            self.broken.store(false, Ordering::Release);
        }
        for &id in &dead[..ndead] {
            // The device answers: a failure here only leaves an empty pool on the host.
            let _ = self.destroy(id, epoch);
        }
        pr_info!("device answers again: tmem requests are served\n");
        Ok(())
    }

    /// A copy of the orphans.
    fn orphans(&self) -> ([(u32, bool); SWAP_TYPES], [(u32, bool); FS_SLOTS]) {
        let p = self.pending.lock();
        (p.orphans.swap, p.orphans.fs)
    }

    /// Records in the orphan `slot` that pool `id` was replaced by `new`, if it still holds
    /// `id` (a swap area or filesystem that went away keeps its mark).
    fn record(
        &self,
        slot: impl FnOnce(&mut crate::device::Orphans) -> &mut (u32, bool),
        id: u32,
        new: u32,
    ) {
        let mut p = self.pending.lock();
        let o = slot(&mut p.orphans);
        if o.0 == id {
            o.0 = new;
        }
    }

    /// Resets the device and sets it up again: the queues are broken (by the virtio core, or
    /// by a device that returned what was never asked).
    fn reinit(&self, vdev: &virtio::Device) -> core::result::Result<(), Failed> {
        self.freeze(vdev);
        vdev.renegotiate()
            .and_then(|()| self.restore(vdev))
            .map_err(Failed::Device)
    }

    /// Whether the host holds pool `id` (FLUSH_PAGE of an index no swap area has: a pool that
    /// exists answers MISS).
    fn pool_exists(&self, id: u32, epoch: u64) -> core::result::Result<bool, Failed> {
        let hdr = ReqHeader {
            op: Op::FlushPage as u32,
            pool_id: id,
            index: u64::MAX,
            ..Default::default()
        };
        let resp = self
            .recovery_call(1, &hdr, &[], epoch)
            .map_err(Failed::Device)?;
        match Status::from_u32(resp.status) {
            Some(Status::Ok | Status::Miss) => Ok(true),
            Some(Status::BadPool) => Ok(false),
            // Not an answer about the pool: ask again next time rather than give up its pages.
            _ => Err(Failed::Device(EIO)),
        }
    }

    /// Destroys pool `id` if the host has it.
    fn destroy(&self, id: u32, epoch: u64) -> core::result::Result<(), Failed> {
        let hdr = ReqHeader {
            op: Op::DestroyPool as u32,
            pool_id: id,
            ..Default::default()
        };
        self.recovery_call(0, &hdr, &[], epoch)
            .map(|_| ())
            .map_err(Failed::Device)
    }

    /// Creates a private pool, persistent (swap) or ephemeral (page cache); [`NO_POOL`] if the
    /// host refuses one (its pool limit, say: the area or filesystem then goes without).
    fn create(&self, persistent: bool, epoch: u64) -> core::result::Result<u32, Failed> {
        let hdr = ReqHeader {
            op: Op::CreatePool as u32,
            flags: if persistent {
                proto::req_flags::POOL_PERSISTENT
            } else {
                0
            },
            ..Default::default()
        };
        let create = CreatePool {
            uuid: [0; 16],
            page_size: proto::PAGE_SIZE as u32,
            reserved: 0,
        };
        let resp = self
            .recovery_call(0, &hdr, &create.encode(), epoch)
            .map_err(Failed::Device)?;
        match Status::from_u32(resp.status) {
            Some(Status::Ok) => match u32::try_from(resp.value) {
                Ok(id) if is_pool(id) => Ok(id),
                _ => Err(Failed::Device(EIO)),
            },
            _ => {
                pr_err!(
                    "creating a pool failed: {}\n",
                    crate::device::status_name(resp.status)
                );
                Ok(NO_POOL)
            }
        }
    }
}

/// The work function of [`TmemDev::work`].
///
/// # Safety
///
/// `work` is the `work` field of a live [`TmemDev`] (`stop_recovery` keeps it alive until
/// this returns).
pub(crate) unsafe extern "C" fn recover_work(work: *mut bindings::work_struct) {
    // SAFETY: `Work` is a transparent wrapper of `work_struct`, and the caller guarantees
    // `work` is the field of a live `TmemDev`.
    let dev = unsafe { &*kernel::container_of!(work.cast::<crate::work::Work>(), TmemDev, work) };
    dev.recover();
}
