// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Whether a client's pools outlive its frontend's connection: the driver's session.
//!
//! A driver that negotiates `SESSION` keeps its pools when the VMM's connection drops (a QEMU
//! reconnect: the same guest runs on), and says when it starts afresh with a `RESET` at probe;
//! a driver without it loses its pools at every disconnect, as before the feature existed, so
//! that an old driver never finds (or leaks) an earlier boot's pools. Pools kept with no driver
//! to claim them are *orphaned*: freed after the orphan timeout unless a driver comes back
//! first (docs/virtio-tmem.md, "Sessions"). Orphaned pages stay charged to the client.
//!
//! Every change of this state takes the client's session lock, so that a reconnecting driver,
//! its `RESET` and the timeout decide one after the other.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::engine::{Client, ClientRemoval, Engine};

/// A client's session state.
#[derive(Debug, Default)]
pub(crate) struct Session {
    /// Its latest driver negotiated `SESSION`: its pools outlive the connection.
    enabled: bool,
    /// Since when it holds pools no driver has claimed: the wall clock (for people) and the
    /// monotonic one (for the timeout).
    orphaned: Option<(SystemTime, Instant)>,
    /// Its state was handed to another daemon (live migration): when the connection ends its
    /// pools go, rather than wait for a reconnect; cleared if its driver starts again here
    /// (the migration failed and the guest runs on).
    migrated: bool,
    /// Its state came from another daemon (live migration) and no driver has set its
    /// features here yet: its pools outlive the connection, and a driver without `SESSION`
    /// does not drop them (it is the same driver, moved).
    arrived: bool,
}

/// What became of a client's pools when its frontend's connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Kept for a reconnect (its driver negotiated `SESSION`): how many pools, the bytes
    /// charged to the client, and whether they became orphaned now (not at an earlier call).
    Kept { pools: u64, bytes: u64, now: bool },
    /// Freed: its driver did not negotiate `SESSION`, or the orphan timeout is 0.
    Dropped(ClientRemoval),
    /// Freed: its state went to another daemon (live migration) and its guest runs there.
    MigratedOut(ClientRemoval),
}

/// A client whose orphaned pools [`Engine::reap_orphans`] freed.
#[derive(Debug)]
pub struct Reaped {
    pub client: Arc<Client>,
    /// How long it was orphaned.
    pub orphaned_for: Duration,
    pub freed: ClientRemoval,
}

/// An orphan timeout as the engine keeps it: milliseconds, `u64::MAX` for none (kept for ever).
pub(super) fn timeout_ms(t: Option<Duration>) -> u64 {
    t.map_or(u64::MAX, |t| {
        u64::try_from(t.as_millis()).unwrap_or(u64::MAX - 1)
    })
}

impl Client {
    /// Since when the client holds pools that no driver has claimed (kept when its frontend
    /// disconnected, or loaded), if it does.
    pub fn orphaned_since(&self) -> Option<SystemTime> {
        self.session.lock().orphaned.map(|(wall, _)| wall)
    }

    /// Whether its latest driver negotiated `SESSION` (its pools outlive the connection).
    pub fn session(&self) -> bool {
        self.session.lock().enabled
    }

    fn pool_count(&self) -> u64 {
        self.pools.read().iter().flatten().count() as u64
    }
}

impl Engine {
    /// How long orphaned pools wait for their driver before they are freed (`None`: for ever;
    /// zero: pools are not kept at a disconnect at all).
    pub fn set_orphan_timeout(&self, t: Option<Duration>) {
        self.orphan_timeout_ms.store(timeout_ms(t), Relaxed);
    }

    /// The orphan timeout (see [`Engine::set_orphan_timeout`]).
    pub fn orphan_timeout(&self) -> Option<Duration> {
        match self.orphan_timeout_ms.load(Relaxed) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The frontend's connection ended (or a new one starts, and anything the last one left
    /// must be settled): a session's pools are kept, and orphaned if there are any; without a
    /// session (or with an orphan timeout of 0) they are freed. Nothing runs on the client's
    /// behalf when this is called.
    pub fn connection_ended(&self, client: &Arc<Client>) -> Ended {
        let mut s = client.session.lock();
        if std::mem::take(&mut s.migrated) {
            s.orphaned = None;
            return Ended::MigratedOut(self.drop_pools(client));
        }
        if (s.enabled || s.arrived) && self.orphan_timeout() != Some(Duration::ZERO) {
            let pools = client.pool_count();
            let now = pools > 0 && s.orphaned.is_none();
            if now {
                s.orphaned = Some((SystemTime::now(), Instant::now()));
            }
            return Ended::Kept {
                pools,
                bytes: client.account.used.load(Relaxed),
                now,
            };
        }
        s.orphaned = None;
        Ended::Dropped(self.drop_pools(client))
    }

    /// Marks what `client` holds as orphaned, as if its session's frontend had just
    /// disconnected: pools put in place without a driver (a loaded state) wait for it like
    /// pools kept at a disconnect, and are freed after the orphan timeout. A driver without
    /// `SESSION` that connects drops them.
    pub fn keep_orphaned(&self, client: &Arc<Client>) {
        let mut s = client.session.lock();
        s.enabled = true;
        if client.pool_count() > 0 && s.orphaned.is_none() {
            s.orphaned = Some((SystemTime::now(), Instant::now()));
        }
    }

    /// Frees the pools of every client orphaned for longer than the orphan timeout. Returns
    /// the clients freed, and when the next orphan is due (`None`: none is).
    pub fn reap_orphans(&self) -> (Vec<Reaped>, Option<Instant>) {
        let mut freed = Vec::new();
        let Some(timeout) = self.orphan_timeout() else {
            return (freed, None);
        };
        let mut next: Option<Instant> = None;
        let clients = self.clients.read().clone();
        for c in clients {
            let mut s = c.session.lock();
            let Some((_, since)) = s.orphaned else {
                continue;
            };
            let due = since + timeout;
            let now = Instant::now();
            if now >= due {
                s.orphaned = None;
                let r = self.drop_pools(&c);
                drop(s);
                freed.push(Reaped {
                    client: c,
                    orphaned_for: now - since,
                    freed: r,
                });
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        (freed, next)
    }

    /// `RESET` from the client's driver: every pool it holds goes (private pools with their
    /// pages; it leaves its shared pools), and nothing is orphaned any more.
    pub(super) fn reset_session(&self, client: &Arc<Client>) -> ClientRemoval {
        let mut s = client.session.lock();
        s.orphaned = None;
        self.drop_pools(client)
    }

    /// The driver's features were set: a driver is there to claim the client's pools (they are
    /// no longer orphaned). One without `SESSION` after one with it is another driver (the
    /// guest rebooted into an older one): the pools kept for the session go.
    pub(super) fn negotiated(&self, client: &Arc<Client>, session: bool) -> ClientRemoval {
        let mut s = client.session.lock();
        let dropped = if s.enabled && !session && !s.arrived {
            self.drop_pools(client)
        } else {
            ClientRemoval::default()
        };
        s.enabled = session;
        s.orphaned = None;
        s.migrated = false;
        s.arrived = false;
        dropped
    }

    /// The client's state was saved for a live migration and the frontend read all of it:
    /// its pools are freed when the connection ends, unless its driver's features are set
    /// again before (the VMM restarts the device: the migration failed, the guest runs on).
    pub(super) fn mark_migrated(&self, client: &Arc<Client>) {
        client.session.lock().migrated = true;
    }

    /// The client's state was loaded from another daemon: it is kept until its driver's
    /// features are set here, and then served to that driver whatever they are.
    pub(super) fn mark_arrived(&self, client: &Arc<Client>) {
        client.session.lock().arrived = true;
    }

    /// Frees the client's private pools and leaves its shared ones (its pages there stay its
    /// own, as for DESTROY_POOL). Called with its session lock held.
    fn drop_pools(&self, client: &Arc<Client>) -> ClientRemoval {
        let before = client.account.used.load(Relaxed);
        let pools: Vec<_> = client.pools.write().drain(..).flatten().collect();
        let mut r = ClientRemoval::default();
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
        r.bytes = before.saturating_sub(client.account.used.load(Relaxed));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testutil::random_page;
    use crate::store::{ClientConfig, EngineConfig, PageKey, PoolSpec, Tmem};

    const PERSISTENT: PoolSpec = PoolSpec {
        persistent: true,
        shared: None,
    };

    fn engine() -> Engine {
        Engine::new(EngineConfig::default())
    }

    /// A client with a persistent pool holding `n` pages.
    fn with_pages(e: &Engine, name: &str, n: u64) -> (Arc<Client>, u32) {
        let c = e.add_client(ClientConfig::named(name));
        let pool = e.create_pool(&c, PERSISTENT).unwrap();
        let mut w = e.new_worker().unwrap();
        for i in 0..n {
            let key = PageKey {
                pool,
                oid: [1, 0, 0],
                index: i,
            };
            e.put(&mut w, &c, &key, &random_page(i + 1)).unwrap();
        }
        (c, pool)
    }

    fn holds(e: &Engine, c: &Arc<Client>, pool: u32, n: u64) -> bool {
        let mut w = e.new_worker().unwrap();
        let mut out = vec![0u8; shared_proto::PAGE_SIZE];
        (0..n).all(|i| {
            let key = PageKey {
                pool,
                oid: [1, 0, 0],
                index: i,
            };
            e.get(&mut w, c, &key, &mut out[..], false).is_ok() && out == random_page(i + 1)
        })
    }

    #[test]
    fn without_a_session_a_disconnect_frees_the_pools() {
        let e = engine();
        let (c, _) = with_pages(&e, "a", 10);
        e.driver_features(&c, false);
        match e.connection_ended(&c) {
            Ended::Dropped(r) => assert_eq!((r.pools, r.persistent_pages), (1, 10)),
            k => panic!("{k:?}"),
        }
        assert_eq!(e.memory_used(), 0);
        assert_eq!(c.orphaned_since(), None);
    }

    #[test]
    fn a_session_keeps_pools_over_a_disconnect_until_reset() {
        let e = engine();
        let (c, pool) = with_pages(&e, "a", 10);
        assert_eq!(e.driver_features(&c, true), ClientRemoval::default());
        assert!(matches!(
            e.connection_ended(&c),
            Ended::Kept { pools: 1, .. }
        ));
        let since = c.orphaned_since().expect("orphaned");
        // A new connection settles the last one again: still kept, orphaned since the first.
        assert!(matches!(
            e.connection_ended(&c),
            Ended::Kept { pools: 1, .. }
        ));
        assert_eq!(c.orphaned_since(), Some(since));
        assert!(e.memory_used() > 0);
        // The driver comes back: its pages are served, it is no longer orphaned.
        e.driver_features(&c, true);
        assert_eq!(c.orphaned_since(), None);
        assert!(holds(&e, &c, pool, 10));
        let r = e.reset_client(&c);
        assert_eq!((r.pools, r.persistent_pages), (1, 10));
        assert_eq!(e.memory_used(), 0);
        // Ids start again at 0 after a reset.
        assert_eq!(e.create_pool(&c, PERSISTENT).unwrap(), 0);
    }

    #[test]
    fn a_driver_without_session_after_one_with_it_drops_the_kept_pools() {
        let e = engine();
        let (c, _) = with_pages(&e, "a", 5);
        e.driver_features(&c, true);
        e.connection_ended(&c);
        // Features set again with SESSION (a pause and resume) keep them.
        assert_eq!(e.driver_features(&c, true).pools, 0);
        let r = e.driver_features(&c, false);
        assert_eq!((r.pools, r.persistent_pages), (1, 5));
        assert_eq!(e.memory_used(), 0);
        // An old driver's own pools survive its features being set again (a pause and
        // resume), and go at its disconnect.
        let p = e.create_pool(&c, PERSISTENT).unwrap();
        assert_eq!(e.driver_features(&c, false).pools, 0);
        assert!(e.client("a").unwrap().pools.read()[p as usize].is_some());
        assert!(matches!(e.connection_ended(&c), Ended::Dropped(r) if r.pools == 1));
    }

    #[test]
    fn orphans_are_freed_after_the_timeout_and_not_before() {
        let e = engine();
        e.set_orphan_timeout(Some(Duration::from_secs(3600)));
        let (a, _) = with_pages(&e, "a", 4);
        let (b, bpool) = with_pages(&e, "b", 4);
        for c in [&a, &b] {
            e.driver_features(c, true);
            e.connection_ended(c);
        }
        let (freed, next) = e.reap_orphans();
        assert!(freed.is_empty());
        assert!(next.expect("two orphans due") > Instant::now());
        // b's driver comes back in time; a's does not.
        e.driver_features(&b, true);
        e.set_orphan_timeout(Some(Duration::from_millis(1)));
        std::thread::sleep(Duration::from_millis(2));
        let (freed, next) = e.reap_orphans();
        assert_eq!(freed.len(), 1);
        let Reaped {
            client,
            orphaned_for,
            freed: r,
        } = &freed[0];
        assert_eq!(client.name(), "a");
        assert!(*orphaned_for >= Duration::from_millis(1));
        assert_eq!((r.pools, r.persistent_pages), (1, 4));
        assert_eq!(next, None);
        assert_eq!(a.orphaned_since(), None);
        assert!(holds(&e, &b, bpool, 4));
    }

    #[test]
    fn timeout_zero_keeps_nothing_and_none_keeps_for_ever() {
        let e = engine();
        assert_eq!(
            e.orphan_timeout(),
            Some(crate::store::DEFAULT_ORPHAN_TIMEOUT)
        );
        e.set_orphan_timeout(Some(Duration::ZERO));
        let (c, _) = with_pages(&e, "a", 3);
        e.driver_features(&c, true);
        assert!(matches!(e.connection_ended(&c), Ended::Dropped(r) if r.persistent_pages == 3));
        e.set_orphan_timeout(None);
        let (d, _) = with_pages(&e, "d", 3);
        e.driver_features(&d, true);
        assert!(matches!(e.connection_ended(&d), Ended::Kept { .. }));
        assert_eq!(e.reap_orphans().1, None);
        assert!(d.orphaned_since().is_some());
    }

    #[test]
    fn keep_orphaned_puts_loaded_pools_on_the_clock() {
        let e = engine();
        e.set_orphan_timeout(Some(Duration::from_millis(1)));
        let (c, _) = with_pages(&e, "a", 2);
        e.keep_orphaned(&c);
        assert!(c.session() && c.orphaned_since().is_some());
        std::thread::sleep(Duration::from_millis(2));
        let (freed, _) = e.reap_orphans();
        assert_eq!(freed.len(), 1);
        assert_eq!(e.memory_used(), 0);
    }
}
