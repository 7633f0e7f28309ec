// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use super::*;
use crate::store::layout::SLOT_BYTES;
use crate::store::runs::{MANY_RUN_BYTES, NODE_META, NODE_RUN_META, ONE_META};
use crate::store::testutil::random_page;
use shared_proto::PAGE_SIZE;

const EPH: PoolSpec = PoolSpec {
    persistent: false,
    shared: None,
};
const PERS: PoolSpec = PoolSpec {
    persistent: true,
    shared: None,
};

/// A page that lz4 compresses to roughly a third, distinct per (seed).
fn page(seed: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(PAGE_SIZE);
    let mut i = 0u64;
    while p.len() < PAGE_SIZE {
        p.extend_from_slice(format!("{seed:016x} row {i:05} lorem ipsum dolor\n").as_bytes());
        i += 1;
    }
    p.truncate(PAGE_SIZE);
    p
}

fn engine(limit: u64) -> Engine {
    Engine::new(EngineConfig {
        memory_limit: limit,
        ..EngineConfig::default()
    })
}

const OID: Oid = [1, 2, 3];

/// A client authorized for the shared pool `uuid`.
fn member(e: &Engine, name: &str, uuid: Uuid) -> Arc<Client> {
    e.add_client(ClientConfig {
        shared: vec![uuid],
        ..ClientConfig::named(name)
    })
}

fn key(pool: PoolId, oid: Oid, index: u64) -> PageKey {
    PageKey { pool, oid, index }
}

#[test]
fn persistent_put_get_flush() {
    let e = engine(1 << 30);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let p = e.create_pool(&c, PERS).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    for i in 0..100 {
        e.put(&mut w, &c, &key(p, OID, i), &page(i)).unwrap();
    }
    // Non-exclusive gets keep the page: it must come back every time until flushed.
    for _ in 0..2 {
        for i in 0..100 {
            let hit = e.get(&mut w, &c, &key(p, OID, i), &mut out, false).unwrap();
            assert!(!hit.dropped);
            assert_eq!(out, page(i));
        }
    }
    e.flush_page(&c, &key(p, OID, 5)).unwrap();
    assert!(matches!(
        e.get(&mut w, &c, &key(p, OID, 5), &mut out, false),
        Err(Error::Miss)
    ));
    assert!(matches!(
        e.flush_page(&c, &key(p, OID, 5)),
        Err(Error::Miss)
    ));
    // Exclusive get on a persistent pool drops the copy.
    assert!(
        e.get(&mut w, &c, &key(p, OID, 6), &mut out, true)
            .unwrap()
            .dropped
    );
    assert!(matches!(
        e.get(&mut w, &c, &key(p, OID, 6), &mut out, false),
        Err(Error::Miss)
    ));
    assert_eq!(e.flush_object(&c, p, &OID).unwrap(), 98);
    assert_eq!(e.memory_used(), 0);
    let s = e.stats();
    assert_eq!(s.clients[0].counters.puts, 100);
    assert_eq!(s.clients[0].counters.get_hits, 201);
    assert_eq!(s.clients[0].counters.stored_pages, 0);
}

#[test]
fn replacing_put_and_same_filled_pages() {
    let e = engine(1 << 30);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let p = e.create_pool(&c, PERS).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    e.put(&mut w, &c, &key(p, OID, 0), &page(1)).unwrap();
    e.put(&mut w, &c, &key(p, OID, 0), &page(2)).unwrap();
    e.get(&mut w, &c, &key(p, OID, 0), &mut out, false).unwrap();
    assert_eq!(out, page(2));
    let mut same = vec![0u8; PAGE_SIZE];
    codec::fill_same(&mut same, 0xabab_abab_1234_5678);
    e.put(&mut w, &c, &key(p, OID, 1), &same).unwrap();
    e.put(&mut w, &c, &key(p, OID, 2), &[0u8; PAGE_SIZE])
        .unwrap();
    e.get(&mut w, &c, &key(p, OID, 1), &mut out, false).unwrap();
    assert_eq!(out, same);
    e.get(&mut w, &c, &key(p, OID, 2), &mut out, false).unwrap();
    assert_eq!(out, vec![0u8; PAGE_SIZE]);
    let s = e.stats();
    let k = &s.clients[0].counters;
    assert_eq!((k.stored_pages, k.same_filled_pages), (3, 2));
    // Same-filled pages cost metadata only: one object with its single run, three slots (a
    // vector of capacity 4 behind a pointer).
    let slots = MANY_RUN_BYTES + 4 * SLOT_BYTES;
    assert_eq!(
        e.memory_used(),
        ONE_META + slots + payload_cost(k.compressed_bytes as usize)
    );
    assert_eq!(s.clients[0].pools[0].counters.memory_used, e.memory_used());
    let meta = (ONE_META + slots) as f64 / 3.0;
    assert_eq!(s.metadata_bytes_per_page, (meta * 10.0).round() / 10.0);
}

#[test]
fn object_with_a_second_run_in_a_shard_gets_a_node_and_charges_follow() {
    let e = engine(1 << 30);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    let zero = [0u8; PAGE_SIZE];
    for spec in [PERS, EPH] {
        let p = e.create_pool(&c, spec).unwrap();
        // One run: one entry, and its one slot inline in the run; ephemeral pools charge
        // nothing more (a reference bit, no LRU record).
        e.put(&mut w, &c, &key(p, OID, 3), &zero).unwrap();
        assert_eq!(e.memory_used(), ONE_META);
        assert_eq!(e.object_shapes(&c, p), (1, 1));
        // Forty runs of one page each over 16 shards (placed by a per-pool random hash):
        // some shards hold several of the object's runs, under a node.
        let idx: Vec<u64> = (0..40).map(|r| r * 16 + 3).collect();
        for &i in &idx[1..] {
            e.put(&mut w, &c, &key(p, OID, i), &zero).unwrap();
        }
        let (objects, single) = e.object_shapes(&c, p);
        let runs = idx.len() as u64;
        assert!(single < objects, "40 runs over 16 shards: some share one");
        assert_eq!(
            e.memory_used(),
            single * ONE_META + (objects - single) * NODE_META + (runs - single) * NODE_RUN_META
        );
        if spec.persistent {
            for &i in &idx {
                e.get(&mut w, &c, &key(p, OID, i), &mut out, false).unwrap();
                assert_eq!(out, zero);
            }
        }
        // Emptying runs one by one releases exactly what was charged.
        for &i in &idx {
            e.flush_page(&c, &key(p, OID, i)).unwrap();
        }
        assert_eq!(e.memory_used(), 0);
        assert_eq!(e.object_shapes(&c, p), (0, 0));
        e.destroy_pool(&c, p).unwrap();
    }
}

#[test]
fn private_ephemeral_get_is_exclusive() {
    let e = engine(1 << 30);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let p = e.create_pool(&c, EPH).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    e.put(&mut w, &c, &key(p, OID, 7), &page(7)).unwrap();
    let hit = e.get(&mut w, &c, &key(p, OID, 7), &mut out, false).unwrap();
    assert!(hit.dropped);
    assert_eq!(out, page(7));
    assert!(matches!(
        e.get(&mut w, &c, &key(p, OID, 7), &mut out, false),
        Err(Error::Miss)
    ));
    assert_eq!(e.memory_used(), 0);
}

#[test]
fn failed_put_drops_older_copy() {
    let e = engine(1 << 30);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let p = e.create_pool(&c, EPH).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    e.put(&mut w, &c, &key(p, OID, 1), &page(1)).unwrap();
    // Incompressible ephemeral page: refused, and the old copy must be gone.
    let r = e.put(&mut w, &c, &key(p, OID, 1), &random_page(9));
    assert!(matches!(r, Err(Error::Refused(_))), "{r:?}");
    assert!(matches!(
        e.get(&mut w, &c, &key(p, OID, 1), &mut out, false),
        Err(Error::Miss)
    ));

    // Same through a quota: a persistent put over an existing key that no longer fits.
    let q = e.create_pool(&c, PERS).unwrap();
    e.put(&mut w, &c, &key(q, OID, 1), &page(1)).unwrap();
    e.set_quota(&c, e.memory_used());
    let r = e.put(&mut w, &c, &key(q, OID, 1), &random_page(3));
    assert!(matches!(r, Err(Error::NoSpace)), "{r:?}");
    assert!(matches!(
        e.get(&mut w, &c, &key(q, OID, 1), &mut out, false),
        Err(Error::Miss)
    ));
    assert_eq!(e.memory_used(), 0);

    // And through a frozen client.
    e.set_quota(&c, 0);
    e.put(&mut w, &c, &key(q, OID, 2), &page(2)).unwrap();
    e.set_frozen(&c, true);
    assert!(matches!(
        e.put(&mut w, &c, &key(q, OID, 2), &page(3)),
        Err(Error::Refused(_))
    ));
    assert!(matches!(
        e.get(&mut w, &c, &key(q, OID, 2), &mut out, false),
        Err(Error::Miss)
    ));
}

#[test]
fn persistent_stored_raw_when_incompressible() {
    let e = engine(1 << 30);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let p = e.create_pool(&c, PERS).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    e.put(&mut w, &c, &key(p, OID, 1), &random_page(5)).unwrap();
    e.get(&mut w, &c, &key(p, OID, 1), &mut out, false).unwrap();
    assert_eq!(out, random_page(5));
    assert_eq!(e.stats().clients[0].counters.raw_pages, 1);
}

#[test]
fn persistent_incompressible_refused_when_told_and_the_old_copy_goes() {
    let e = Engine::new(EngineConfig {
        memory_limit: 1 << 30,
        persistent_incompressible: IncompressiblePolicy::Refuse,
        ..EngineConfig::default()
    });
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let p = e.create_pool(&c, PERS).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    // A page that compresses is stored; the same key rewritten with one that does not is
    // refused, and the older copy must not be served in its place.
    e.put(&mut w, &c, &key(p, OID, 1), &page(1)).unwrap();
    let r = e.put(&mut w, &c, &key(p, OID, 1), &random_page(5));
    assert!(matches!(r, Err(Error::Refused(_))), "{r:?}");
    assert!(matches!(
        e.get(&mut w, &c, &key(p, OID, 1), &mut out, false),
        Err(Error::Miss)
    ));
    let s = e.stats();
    assert_eq!(s.clients[0].counters.raw_pages, 0);
    assert_eq!(s.clients[0].counters.stored_pages, 0);
    assert_eq!(e.memory_used(), 0);
}

#[test]
fn ephemeral_eviction_under_limit_persistent_never_evicted() {
    // Room for roughly 40 compressed pages.
    let one = {
        let e = engine(1 << 30);
        let c = e.add_client(ClientConfig::named("x"));
        let mut w = e.new_worker().unwrap();
        let p = e.create_pool(&c, EPH).unwrap();
        e.put(&mut w, &c, &key(p, OID, 0), &page(0)).unwrap();
        e.memory_used()
    };
    let e = engine(one * 40);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let eph = e.create_pool(&c, EPH).unwrap();
    let pers = e.create_pool(&c, PERS).unwrap();
    for i in 0..20 {
        e.put(&mut w, &c, &key(pers, OID, i), &page(1000 + i))
            .unwrap();
    }
    for i in 0..200 {
        e.put(&mut w, &c, &key(eph, OID, i), &page(i)).unwrap();
        assert!(e.memory_used() <= one * 40);
    }
    let s = e.stats();
    assert!(
        s.clients[0].counters.evictions >= 150,
        "{:?}",
        s.clients[0].counters
    );
    // Every persistent page is still there, byte for byte.
    let mut out = vec![0u8; PAGE_SIZE];
    for i in 0..20 {
        e.get(&mut w, &c, &key(pers, OID, i), &mut out, false)
            .unwrap();
        assert_eq!(out, page(1000 + i));
    }
    // The newest ephemeral pages survived (LRU), the oldest were evicted.
    assert!(e
        .get(&mut w, &c, &key(eph, OID, 199), &mut out, false)
        .is_ok());
    assert_eq!(out, page(199));
    assert!(matches!(
        e.get(&mut w, &c, &key(eph, OID, 0), &mut out, false),
        Err(Error::Miss)
    ));
    // Fill the rest with persistent pages: they are refused once nothing is left to evict.
    let mut refused = 0;
    for i in 0..200 {
        match e.put(&mut w, &c, &key(pers, OID, 100 + i), &page(5000 + i)) {
            Ok(()) => {}
            Err(Error::NoSpace) => refused += 1,
            Err(x) => panic!("{x}"),
        }
    }
    assert!(refused > 100);
    assert!(e.memory_used() <= one * 40);
    for i in 0..20 {
        e.get(&mut w, &c, &key(pers, OID, i), &mut out, false)
            .unwrap();
        assert_eq!(out, page(1000 + i));
    }
}

#[test]
fn eviction_passes_over_runs_put_since_the_hand_last_came() {
    // CLOCK: a put sets its run's reference bit, eviction clears the bits it passes and takes
    // the first run without one. Runs put again after the hand went by survive the next
    // evictions; untouched ones go.
    let e = engine(1 << 30);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let p = e.create_pool(&c, EPH).unwrap();
    for o in 0..400u64 {
        e.put(&mut w, &c, &key(p, [o, 0, 0], 0), &page(o)).unwrap();
    }
    // Room for what is there: the next put evicts, and the hand passes every shard's runs.
    e.set_memory_limit(e.memory_used());
    let mut o = 400u64;
    while e.stats().clients[0].counters.evictions == 0 {
        e.put(&mut w, &c, &key(p, [o, 0, 0], 0), &page(o)).unwrap();
        o += 1;
    }
    let mut out = vec![0u8; PAGE_SIZE];
    let present = |e: &Engine, i: u64| {
        let _ = e;
        let pool = c.pool(p).unwrap();
        let k = RunKey {
            oid: [i, 0, 0],
            run: 0,
        };
        let found = pool.shard(&k).lock().runs.get(&k).is_some();
        found
    };
    let touched: Vec<u64> = (0..400).filter(|&i| present(&e, i)).take(40).collect();
    assert_eq!(touched.len(), 40);
    for &i in &touched {
        e.put(&mut w, &c, &key(p, [i, 0, 0], 0), &page(i)).unwrap();
    }
    let before = e.stats().clients[0].counters.evictions;
    for n in 0..100 {
        e.put(&mut w, &c, &key(p, [1000 + n, 0, 0], 0), &page(1000 + n))
            .unwrap();
    }
    let evicted = e.stats().clients[0].counters.evictions - before;
    assert!(evicted >= 90, "{evicted} evicted");
    for &i in &touched {
        assert!(present(&e, i), "object {i}, put again, was evicted");
        e.get(&mut w, &c, &key(p, [i, 0, 0], 0), &mut out, false)
            .unwrap();
        assert_eq!(out, page(i));
    }
}

#[test]
fn weighted_eviction_prefers_client_over_its_share() {
    // Runs are evicted whole (16 pages): the limit holds enough runs per client that one run
    // more or less, which the per-pool random hash seeds decide, does not move the ratio much.
    let e = engine(800 * 1024);
    let heavy = e.add_client(ClientConfig::named("heavy"));
    let light = e.add_client(ClientConfig {
        weight: 300,
        ..ClientConfig::named("light")
    });
    let mut w = e.new_worker().unwrap();
    let ph = e.create_pool(&heavy, EPH).unwrap();
    let pl = e.create_pool(&light, EPH).unwrap();
    // Both want far more than the limit: the weights decide who keeps what.
    for i in 0..4000 {
        e.put(&mut w, &light, &key(pl, OID, i), &page(i)).unwrap();
        e.put(&mut w, &heavy, &key(ph, OID, i), &page(i + 7))
            .unwrap();
    }
    let s = e.stats();
    let (h, l) = (&s.clients[0].counters, &s.clients[1].counters);
    // light (weight 300) keeps about three times heavy's (weight 100) memory.
    let ratio = l.memory_used as f64 / h.memory_used as f64;
    assert!(
        (2.5..3.5).contains(&ratio),
        "{ratio}: heavy {h:?} light {l:?}"
    );
    assert!(h.evictions > l.evictions);

    // A client below its share loses nothing while another is over it.
    let e = engine(200 * 1024);
    let big = e.add_client(ClientConfig::named("big"));
    let small = e.add_client(ClientConfig::named("small"));
    let pb = e.create_pool(&big, EPH).unwrap();
    let ps = e.create_pool(&small, EPH).unwrap();
    for i in 0..40 {
        e.put(&mut w, &small, &key(ps, OID, i), &page(i)).unwrap();
    }
    for i in 0..1000 {
        e.put(&mut w, &big, &key(pb, OID, i), &page(i)).unwrap();
    }
    let s = e.stats();
    assert_eq!(s.clients[1].counters.evictions, 0);
    assert_eq!(s.clients[1].counters.stored_pages, 40);
    assert!(s.clients[0].counters.evictions > 500);
}

#[test]
fn quota_evicts_own_pages_only() {
    let e = engine(1 << 30);
    let a = e.add_client(ClientConfig::named("a"));
    let b = e.add_client(ClientConfig {
        quota: 30 * 1024,
        ..ClientConfig::named("b")
    });
    let mut w = e.new_worker().unwrap();
    let pa = e.create_pool(&a, EPH).unwrap();
    let pb = e.create_pool(&b, EPH).unwrap();
    for i in 0..50 {
        e.put(&mut w, &a, &key(pa, OID, i), &page(i)).unwrap();
    }
    for i in 0..200 {
        e.put(&mut w, &b, &key(pb, OID, i), &page(i)).unwrap();
    }
    let s = e.stats();
    assert_eq!(s.clients[0].counters.stored_pages, 50);
    assert_eq!(s.clients[0].counters.evictions, 0);
    assert!(s.clients[1].counters.memory_used <= 30 * 1024);
}

#[test]
fn shared_pools_need_authorization() {
    let e = engine(1 << 30);
    let uuid = [9u8; 16];
    let a = member(&e, "a", uuid);
    let b = member(&e, "b", uuid);
    let m = e.add_client(ClientConfig::named("mallory"));
    let spec = PoolSpec {
        persistent: false,
        shared: Some(uuid),
    };
    let mut w = e.new_worker().unwrap();
    let pa = e.create_pool(&a, spec).unwrap();
    let pb = e.create_pool(&b, spec).unwrap();
    assert!(matches!(e.create_pool(&m, spec), Err(Error::Denied(_))));
    assert!(matches!(
        e.create_pool(
            &a,
            PoolSpec {
                persistent: true,
                shared: Some(uuid)
            }
        ),
        Err(Error::InvalidPool(_))
    ));
    e.put(&mut w, &a, &key(pa, OID, 1), &page(1)).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    // Shared ephemeral gets are not exclusive by default: both members can read it.
    assert!(
        !e.get(&mut w, &b, &key(pb, OID, 1), &mut out, false)
            .unwrap()
            .dropped
    );
    assert_eq!(out, page(1));
    e.get(&mut w, &a, &key(pa, OID, 1), &mut out, false)
        .unwrap();
    // Mallory cannot reach it through her own pool ids.
    let pm = e.create_pool(&m, EPH).unwrap();
    assert!(matches!(
        e.get(&mut w, &m, &key(pm, OID, 1), &mut out, false),
        Err(Error::Miss)
    ));
    // Revoking authorization stops new joins.
    e.set_shared_auth(&b, uuid, false);
    assert!(matches!(e.create_pool(&b, spec), Err(Error::Denied(_))));
    // The pool lives while a member remains; the last one leaving frees it.
    e.reset_client(&a);
    e.get(&mut w, &b, &key(pb, OID, 1), &mut out, false)
        .unwrap();
    assert_eq!(e.stats().shared_pools.len(), 1);
    e.destroy_pool(&b, pb).unwrap();
    assert_eq!(e.stats().shared_pools.len(), 0);
    assert_eq!(e.memory_used(), 0);
}

#[test]
fn pool_ids_limits_and_reset() {
    let e = Engine::new(EngineConfig {
        max_pools: 2,
        ..EngineConfig::default()
    });
    let a = e.add_client(ClientConfig::named("a"));
    let b = e.add_client(ClientConfig::named("b"));
    let mut w = e.new_worker().unwrap();
    let p0 = e.create_pool(&a, PERS).unwrap();
    let p1 = e.create_pool(&a, EPH).unwrap();
    assert!(matches!(
        e.create_pool(&a, EPH),
        Err(Error::TooManyPools(2))
    ));
    let mut out = vec![0u8; PAGE_SIZE];
    e.put(&mut w, &a, &key(p0, OID, 0), &page(0)).unwrap();
    // Another client's pool ids are its own namespace.
    assert!(matches!(
        e.get(&mut w, &b, &key(p0, OID, 0), &mut out, false),
        Err(Error::BadPool(_))
    ));
    assert!(matches!(
        e.put(&mut w, &a, &key(99, OID, 0), &page(0)),
        Err(Error::BadPool(99))
    ));
    e.destroy_pool(&a, p1).unwrap();
    assert!(matches!(e.destroy_pool(&a, p1), Err(Error::BadPool(_))));
    assert_eq!(e.create_pool(&a, EPH).unwrap(), p1);
    e.reset_client(&a);
    assert_eq!(e.memory_used(), 0);
    assert!(matches!(
        e.get(&mut w, &a, &key(p0, OID, 0), &mut out, false),
        Err(Error::BadPool(_))
    ));
}

#[test]
fn concurrent_clients_and_lru_compaction() {
    let e = Arc::new(engine(1 << 30));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                let c = e.add_client(ClientConfig::named(&format!("c{t}")));
                let mut w = e.new_worker().unwrap();
                let p = e.create_pool(&c, PERS).unwrap();
                let q = e.create_pool(&c, EPH).unwrap();
                let mut out = vec![0u8; PAGE_SIZE];
                for round in 0..3u64 {
                    for i in 0..500u64 {
                        let v = i * 31 + round + t * 1_000_000;
                        e.put(&mut w, &c, &key(p, OID, i), &page(v)).unwrap();
                        e.put(&mut w, &c, &key(q, OID, i), &page(v)).unwrap();
                    }
                    for i in 0..500u64 {
                        let v = i * 31 + round + t * 1_000_000;
                        e.get(&mut w, &c, &key(p, OID, i), &mut out, false).unwrap();
                        assert_eq!(out, page(v));
                        e.get(&mut w, &c, &key(q, OID, i), &mut out, false).unwrap();
                        assert_eq!(out, page(v));
                    }
                }
                e.reset_client(&c);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(e.memory_used(), 0);
}

#[test]
fn pool_churn_leaves_nothing_behind() {
    // A guest creating and destroying pools in a loop must not grow anything in the daemon:
    // the account's pool list, the shared-pool registry and the eviction account list stay
    // at what exists now.
    let e = engine(1 << 30);
    let uuid = [7u8; 16];
    let c = member(&e, "churn", uuid);
    let shared = PoolSpec {
        persistent: false,
        shared: Some(uuid),
    };
    let mut w = e.new_worker().unwrap();
    let keep = e.create_pool(&c, EPH).unwrap();
    e.put(&mut w, &c, &key(keep, OID, 0), &page(0)).unwrap();
    let accounts = e.budget.accounts_len();
    for i in 0..100_000u32 {
        let spec = if i % 3 == 0 { shared } else { EPH };
        let p = e.create_pool(&c, spec).unwrap();
        e.destroy_pool(&c, p).unwrap();
    }
    assert_eq!(c.account.pools.lock().len(), 1, "one live ephemeral pool");
    assert_eq!(e.budget.accounts_len(), accounts);
    assert!(e.shared.lock().is_empty());
    // Nothing was charged; the page of the pool kept is still there.
    let mut out = vec![0u8; PAGE_SIZE];
    e.get(&mut w, &c, &key(keep, OID, 0), &mut out, false)
        .unwrap();
    assert_eq!(out, page(0));
    assert_eq!(e.memory_used(), 0);
}

#[test]
fn emptied_shards_give_back_their_room() {
    let e = engine(1 << 30);
    let c = e.add_client(ClientConfig::named("a"));
    let mut w = e.new_worker().unwrap();
    let zero = [0u8; PAGE_SIZE];
    let p = e.create_pool(&c, EPH).unwrap();
    // 20,000 objects of one run each, and one object of 2,000 runs, then all flushed: the
    // tables and slabs must not keep room for 22,000 entries (nothing is charged for it).
    for o in 0..20_000u64 {
        e.put(&mut w, &c, &key(p, [o, 0, 0], 0), &zero).unwrap();
    }
    for r in 0..2_000u64 {
        e.put(&mut w, &c, &key(p, OID, r * 16), &zero).unwrap();
    }
    let full = e.allocated_structure(&c, p);
    assert_eq!(full.runs, 22_000, "{full:?}");
    assert!(
        full.run_bytes as u64 >= 22_000 * NODE_RUN_META.min(ONE_META) / 2,
        "{full:?}"
    );
    assert!(full.run_bytes as u64 <= e.memory_used(), "{full:?}");
    for o in 0..20_000u64 {
        e.flush_object(&c, p, &[o, 0, 0]).unwrap();
    }
    // Keep one run of the big object per shard at most: its nodes go with the others.
    for r in 16..2_000u64 {
        e.flush_page(&c, &key(p, OID, r * 16)).unwrap();
    }
    let a = e.allocated_structure(&c, p);
    assert!(a.runs <= 16, "{a:?}");
    // Per shard at most: a slab's first chunk (32 entries of 48 bytes) and small tables.
    assert!(a.run_bytes <= 16 * 2048, "{a:?}");

    // Eviction empties shards too.
    let e = engine(4 << 20);
    let c = e.add_client(ClientConfig::named("a"));
    let eph = e.create_pool(&c, EPH).unwrap();
    let pers = e.create_pool(&c, PERS).unwrap();
    for o in 0..20_000u64 {
        e.put(&mut w, &c, &key(eph, [o, 0, 0], 0), &zero).unwrap();
    }
    // Persistent pages push every ephemeral one out.
    let mut i = 0;
    while e.stats().clients[0].pools[0].counters.stored_pages > 0 {
        e.put(&mut w, &c, &key(pers, OID, i), &page(i)).unwrap();
        i += 1;
    }
    let a = e.allocated_structure(&c, eph);
    assert_eq!(a.runs, 0);
    assert!(a.run_bytes <= 16 * 256, "{a:?}");
}

/// Puts distinct persistent pages into `pool` until the store refuses one; returns how many
/// it took.
fn fill_until_no_space(
    e: &Engine,
    w: &mut Worker,
    c: &Arc<Client>,
    pool: PoolId,
    seed: u64,
) -> u64 {
    for i in 0..1_000_000 {
        match e.put(w, c, &key(pool, OID, i), &page(seed + i)) {
            Ok(()) => {}
            Err(Error::NoSpace) => return i,
            Err(x) => panic!("{x}"),
        }
    }
    panic!("never refused");
}

#[test]
fn default_persistent_share_is_fair() {
    // No quotas: the first guest fills persistent pages until refused; the second can still
    // store its weight's share (weights 100 and 300: a quarter and three quarters).
    let limit = 4 << 20;
    let e = engine(limit);
    let a = e.add_client(ClientConfig::named("a"));
    let b = e.add_client(ClientConfig {
        weight: 300,
        ..ClientConfig::named("b")
    });
    let mut w = e.new_worker().unwrap();
    let pa = e.create_pool(&a, PERS).unwrap();
    let pb = e.create_pool(&b, PERS).unwrap();
    fill_until_no_space(&e, &mut w, &a, pa, 0);
    let used_a = e.stats().clients[0].counters.memory_used;
    assert!(used_a <= limit / 4, "{used_a}");
    fill_until_no_space(&e, &mut w, &b, pb, 1 << 32);
    let used_b = e.stats().clients[1].counters.memory_used;
    assert!(used_b >= limit * 3 / 4 * 95 / 100, "{used_b}");
    assert!(used_b <= limit * 3 / 4, "{used_b}");

    // Ephemeral pages may use what persistent ones leave: a's fill the rest of the limit,
    // and b's persistent share still fits, by evicting them.
    let e = engine(limit);
    let a = e.add_client(ClientConfig::named("a"));
    let b = e.add_client(ClientConfig::named("b"));
    let ea = e.create_pool(&a, EPH).unwrap();
    let pb = e.create_pool(&b, PERS).unwrap();
    for i in 0..12_000 {
        e.put(&mut w, &a, &key(ea, OID, i), &page(i)).unwrap();
    }
    assert!(e.memory_used() > limit * 9 / 10, "{}", e.memory_used());
    fill_until_no_space(&e, &mut w, &b, pb, 1 << 32);
    let used_b = e.stats().clients[1].counters.memory_used;
    assert!(used_b >= limit / 2 * 95 / 100, "{used_b}");

    // A weight change moves the shares; what is stored stays, new puts follow the new share.
    e.set_weight(&b, 300);
    let more = fill_until_no_space(&e, &mut w, &b, pb, 1 << 33);
    assert!(more > 0);
    let used_b = e.stats().clients[1].counters.memory_used;
    assert!(used_b >= limit * 3 / 4 * 95 / 100, "{used_b}");
    // A quota replaces the share.
    e.set_quota(&a, limit / 8);
    let pa = e.create_pool(&a, PERS).unwrap();
    fill_until_no_space(&e, &mut w, &a, pa, 1 << 34);
    assert!(e.stats().clients[0].counters.memory_used <= limit / 8);
}

fn shared_spec(uuid: Uuid) -> PoolSpec {
    PoolSpec {
        persistent: false,
        shared: Some(uuid),
    }
}

#[test]
fn shared_pool_pages_count_against_the_putters_quota() {
    let e = engine(1 << 30);
    let uuid = [3u8; 16];
    let quota = 4 << 20;
    let q = e.add_client(ClientConfig {
        quota,
        shared: vec![uuid],
        ..ClientConfig::named("q")
    });
    let b = member(&e, "b", uuid);
    let mut w = e.new_worker().unwrap();
    let pq = e.create_pool(&q, shared_spec(uuid)).unwrap();
    let pb = e.create_pool(&b, shared_spec(uuid)).unwrap();
    // Far more than the quota, through the shared pool: the oldest of q's own pages go.
    for i in 0..20_000 {
        e.put(&mut w, &q, &key(pq, OID, i), &page(i)).unwrap();
    }
    let s = e.stats();
    let pool_bytes = s.shared_pools[0].counters.memory_used;
    assert!(
        pool_bytes <= quota,
        "shared pool holds {pool_bytes} for a {quota}-byte quota"
    );
    assert_eq!(s.clients[0].charged_bytes, pool_bytes);
    assert!(s.clients[0].counters.evictions > 0);
    // b's pages are charged to b, and q's need for room never evicts them.
    for i in 0..100 {
        e.put(&mut w, &b, &key(pb, [9, 9, 9], i), &page(1 << 40 | i))
            .unwrap();
    }
    let b_bytes = e.stats().clients[1].charged_bytes;
    assert!(b_bytes > 0);
    for i in 20_000..30_000 {
        e.put(&mut w, &q, &key(pq, OID, i), &page(i)).unwrap();
    }
    let mut out = vec![0u8; PAGE_SIZE];
    for i in 0..100 {
        e.get(&mut w, &q, &key(pq, [9, 9, 9], i), &mut out, false)
            .unwrap();
        assert_eq!(out, page(1 << 40 | i));
    }
    assert_eq!(e.stats().clients[1].charged_bytes, b_bytes);
    assert!(e.stats().clients[0].charged_bytes <= quota);
    // q leaving keeps its pages for b, still charged to q; the last member leaving frees all.
    e.reset_client(&q);
    e.get(&mut w, &b, &key(pb, OID, 29_999), &mut out, false)
        .unwrap();
    assert_eq!(out, page(29_999));
    e.destroy_pool(&b, pb).unwrap();
    let s = e.stats();
    assert_eq!(
        (s.clients[0].charged_bytes, s.clients[1].charged_bytes),
        (0, 0)
    );
    assert_eq!(e.memory_used(), 0);
}

#[test]
fn shared_pool_first_put_wins() {
    let e = engine(1 << 30);
    let uuid = [5u8; 16];
    let a = member(&e, "a", uuid);
    let b = member(&e, "b", uuid);
    let mut w = e.new_worker().unwrap();
    let pa = e.create_pool(&a, shared_spec(uuid)).unwrap();
    let pb = e.create_pool(&b, shared_spec(uuid)).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    e.put(&mut w, &a, &key(pa, OID, 1), &page(1)).unwrap();
    // b overwriting a's page with other content is refused, and counted.
    assert!(matches!(
        e.put(&mut w, &b, &key(pb, OID, 1), &page(666)),
        Err(Error::Refused(_))
    ));
    for (c, p) in [(&a, pa), (&b, pb)] {
        e.get(&mut w, c, &key(p, OID, 1), &mut out, false).unwrap();
        assert_eq!(out, page(1));
    }
    let s = e.stats();
    assert_eq!(s.clients[1].counters.shared_put_conflicts, 1);
    assert_eq!(s.clients[1].counters.puts_refused, 1);
    assert_eq!(s.shared_pools[0].counters.shared_put_conflicts, 1);
    assert_eq!(s.clients[0].counters.shared_put_conflicts, 0);
    // In the statistics JSON and the Prometheus text, through the counters table.
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["clients"][1]["shared_put_conflicts"], 1);
    let prom = crate::control::prometheus(&s);
    assert!(
        prom.contains("vhost_tmem_client_shared_put_conflicts_total{client=\"b\"} 1"),
        "{prom}"
    );
    // The same content is agreement: accepted, nothing changes (a keeps the charge).
    let charged = s.clients[0].charged_bytes;
    e.put(&mut w, &b, &key(pb, OID, 1), &page(1)).unwrap();
    let s = e.stats();
    assert_eq!(s.clients[0].charged_bytes, charged);
    assert_eq!(s.clients[1].charged_bytes, 0);
    assert_eq!(s.shared_pools[0].counters.stored_pages, 1);
    // Even the owner cannot change it in place: it flushes first.
    assert!(matches!(
        e.put(&mut w, &a, &key(pa, OID, 1), &page(2)),
        Err(Error::Refused(_))
    ));
    e.get(&mut w, &b, &key(pb, OID, 1), &mut out, false)
        .unwrap();
    assert_eq!(out, page(1));
    // A failed put by b (no space in b's quota) does not drop a's page either.
    e.set_quota(&b, 1);
    assert!(matches!(
        e.put(&mut w, &b, &key(pb, OID, 1), &page(1)),
        Err(Error::NoSpace)
    ));
    e.set_quota(&b, 0);
    // Only the member that put a page can flush it or take it with an exclusive get.
    assert!(matches!(
        e.flush_page(&b, &key(pb, OID, 1)),
        Err(Error::Miss)
    ));
    assert_eq!(e.flush_object(&b, pb, &OID).unwrap(), 0);
    let hit = e.get(&mut w, &b, &key(pb, OID, 1), &mut out, true).unwrap();
    assert!(!hit.dropped);
    assert_eq!(out, page(1));
    e.get(&mut w, &a, &key(pa, OID, 1), &mut out, false)
        .unwrap();
    assert_eq!(out, page(1));
    // b's own pages in the same object are b's to flush.
    e.put(&mut w, &b, &key(pb, OID, 2), &page(2)).unwrap();
    e.put(&mut w, &b, &key(pb, OID, 300), &page(300)).unwrap();
    assert_eq!(e.flush_object(&b, pb, &OID).unwrap(), 2);
    assert!(matches!(
        e.get(&mut w, &a, &key(pa, OID, 2), &mut out, false),
        Err(Error::Miss)
    ));
    assert_eq!(e.stats().clients[1].charged_bytes, 0);
    // The owner flushes; then the key is free for anyone's first put.
    e.flush_page(&a, &key(pa, OID, 1)).unwrap();
    assert!(matches!(
        e.get(&mut w, &b, &key(pb, OID, 1), &mut out, false),
        Err(Error::Miss)
    ));
    e.put(&mut w, &b, &key(pb, OID, 1), &page(7)).unwrap();
    let hit = e.get(&mut w, &b, &key(pb, OID, 1), &mut out, true).unwrap();
    assert!(hit.dropped);
    assert_eq!(out, page(7));
    assert_eq!(e.stats().clients[0].charged_bytes, 0);
    assert_eq!(e.memory_used(), 0);
}

#[test]
fn concurrent_shared_pool_members_keep_exact_accounts() {
    // Three members put (the same content per key, so they agree), get, flush and evict each
    // other's room concurrently under a small limit; every charge must come back.
    let e = Arc::new(engine(2 << 20));
    let uuid = [4u8; 16];
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let e = e.clone();
            std::thread::spawn(move || {
                let c = e.add_client(ClientConfig {
                    quota: if t == 0 { 256 << 10 } else { 0 },
                    shared: vec![uuid],
                    ..ClientConfig::named(&format!("m{t}"))
                });
                let mut w = e.new_worker().unwrap();
                let p = e.create_pool(&c, shared_spec(uuid)).unwrap();
                let q = e.create_pool(&c, EPH).unwrap();
                let mut out = vec![0u8; PAGE_SIZE];
                for i in 0..3000u64 {
                    let k = (i * 7 + t * 13) % 1500;
                    let _ = e.put(&mut w, &c, &key(p, [k % 50, 0, 0], k), &page(k));
                    let _ = e.put(&mut w, &c, &key(q, OID, i), &page(i));
                    let g = key(p, [(k / 2) % 50, 0, 0], k / 2);
                    if e.get(&mut w, &c, &g, &mut out, i % 3 == 0).is_ok() {
                        assert_eq!(out, page(k / 2));
                    }
                    if i % 10 == 0 {
                        let _ = e.flush_object(&c, p, &[k % 50, 0, 0]);
                    }
                    if t == 0 {
                        assert!(c.account.used.load(Relaxed) <= 256 << 10);
                    }
                }
                c
            })
        })
        .collect();
    let clients: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(e.memory_used() <= 2 << 20);
    // What eviction skips on stayed exact: per pool, what each member holds there.
    for c in &clients {
        let held: u64 = c
            .account
            .pools
            .lock()
            .iter()
            .map(|r| r.held.load(Relaxed))
            .sum();
        assert_eq!(held, c.account.ephemeral_runs.load(Relaxed), "{}", c.name);
    }
    for c in &clients {
        e.reset_client(c);
    }
    assert_eq!(e.memory_used(), 0);
    for c in e.stats().clients {
        assert_eq!(c.charged_bytes, 0, "{}", c.name);
    }
    for c in &clients {
        assert_eq!(c.account.ephemeral_runs.load(Relaxed), 0, "{}", c.name);
    }
    assert!(e.shared.lock().is_empty());
}

#[test]
fn removing_a_client_frees_all_it_holds_and_its_share() {
    let limit = 4 << 20;
    let e = engine(limit);
    let uuid = [5u8; 16];
    let a = member(&e, "a", uuid);
    let mut w = e.new_worker().unwrap();
    let pa = e.create_pool(&a, PERS).unwrap();
    let sa = e.create_pool(&a, shared_spec(uuid)).unwrap();
    for i in 0..50 {
        e.put(&mut w, &a, &key(pa, OID, i), &page(i)).unwrap();
        e.put(&mut w, &a, &key(sa, OID, i), &page(i)).unwrap();
    }
    let alone = e.memory_used();
    // With a second client of weight 300, a's persistent share is a quarter of the limit.
    let r = member(&e, "r", uuid);
    e.set_weight(&r, 300);
    let pr = e.create_pool(&r, PERS).unwrap();
    let er = e.create_pool(&r, EPH).unwrap();
    let sr = e.create_pool(&r, shared_spec(uuid)).unwrap();
    for i in 0..40 {
        e.put(&mut w, &r, &key(pr, OID, i), &page(1000 + i))
            .unwrap();
        e.put(&mut w, &r, &key(er, OID, i), &page(2000 + i))
            .unwrap();
        e.put(&mut w, &r, &key(sr, [7, 7, 7], i), &page(3000 + i))
            .unwrap();
    }
    // Left the shared pool earlier (a reconnect): its pages there are still its own.
    e.destroy_pool(&r, sr).unwrap();
    let gone = e.remove_client(&r);
    assert_eq!(
        (
            gone.pools,
            gone.persistent_pages,
            gone.ephemeral_pages,
            gone.shared_pages
        ),
        (2, 40, 40, 40)
    );
    assert!(gone.bytes > 0);
    assert_eq!(e.memory_used(), alone, "accounting back to what it was");
    assert!(e.client("r").is_none());
    assert_eq!(e.stats().clients.len(), 1);
    assert_eq!(e.stats().shared_pools[0].counters.stored_pages, 50);
    // The other member's pages are untouched.
    let mut out = vec![0u8; PAGE_SIZE];
    for i in 0..50 {
        e.get(&mut w, &a, &key(sa, OID, i), &mut out, false)
            .unwrap();
        assert_eq!(out, page(i));
    }
    // Its weight left with it: a alone may again fill the whole limit with persistent pages.
    fill_until_no_space(&e, &mut w, &a, pa, 1 << 32);
    assert!(e.memory_used() > limit * 9 / 10, "{}", e.memory_used());
    // A weight change that raced the removal changes nothing.
    e.set_weight(&r, 5000);
    assert_eq!(e.budget.persistent_share(&a.account), limit);
    // Its account's place is taken by the next client once nothing refers to it.
    drop(r);
    let n = e.budget.accounts_len();
    let c = e.add_client(ClientConfig::named("c"));
    assert_eq!(e.budget.accounts_len(), n);
    assert_eq!(c.account.used.load(Relaxed), 0);
}

#[test]
fn eviction_work_does_not_depend_on_other_members_pages() {
    // a's puts at its quota look for pages of its own to evict: what b holds in the shared
    // pool they are both members of must cost them nothing (b could make every failing put
    // of a's scan its runs).
    let e = engine(1 << 30);
    let uuid = [6u8; 16];
    let a = e.add_client(ClientConfig {
        quota: 1 << 20,
        shared: vec![uuid],
        ..ClientConfig::named("a")
    });
    let b = member(&e, "b", uuid);
    let mut w = e.new_worker().unwrap();
    let sa = e.create_pool(&a, shared_spec(uuid)).unwrap();
    let sb = e.create_pool(&b, shared_spec(uuid)).unwrap();
    let pa = e.create_pool(&a, PERS).unwrap();
    // b: a run per page, about 250 in each shard's queue.
    for i in 0..4000 {
        e.put(&mut w, &b, &key(sb, OID, i * 16), &page(1 << 40 | i))
            .unwrap();
    }
    // a: 32 pages of its own in the pool, behind b's in every queue.
    for i in 0..32 {
        e.put(&mut w, &a, &key(sa, [5, 5, 5], i * 16), &page(i))
            .unwrap();
    }
    let examined = || e.budget.lru_examined.load(Relaxed);
    // Filling the quota with persistent pages evicts a's shared pages, looking at a's only.
    let stored = fill_until_no_space(&e, &mut w, &a, pa, 7 << 40);
    assert!(stored > 32);
    assert!(
        examined() <= 32,
        "evicting a's 32 runs examined {} LRU records",
        examined()
    );
    let s = e.stats();
    assert_eq!(s.clients[0].counters.evictions, 32);
    assert_eq!(s.shared_pools[0].counters.stored_pages, 4000);
    // Now a has nothing evictable: its failing puts examine nothing at all.
    let before = examined();
    for i in 0..10 {
        assert!(matches!(
            e.put(&mut w, &a, &key(pa, OID, stored + i), &page(9 << 40 | i)),
            Err(Error::NoSpace)
        ));
    }
    assert_eq!(
        examined() - before,
        0,
        "10 failing puts examined LRU records of b's"
    );
    for i in (0..4000).step_by(97) {
        let mut out = vec![0u8; PAGE_SIZE];
        e.get(&mut w, &a, &key(sa, OID, i * 16), &mut out, false)
            .unwrap();
        assert_eq!(out, page(1 << 40 | i));
    }
}

#[test]
fn a_members_queues_stay_bounded_by_its_own_runs() {
    // b's puts and hits renew the runs a shares with it, each renewal a record in a's queue:
    // compaction keeps a's queues within what a holds (which its pages are charged for).
    let e = engine(1 << 30);
    let uuid = [8u8; 16];
    let a = member(&e, "a", uuid);
    let b = member(&e, "b", uuid);
    let mut w = e.new_worker().unwrap();
    let sa = e.create_pool(&a, shared_spec(uuid)).unwrap();
    let sb = e.create_pool(&b, shared_spec(uuid)).unwrap();
    for r in 0..64 {
        e.put(&mut w, &a, &key(sa, OID, r * 16), &page(r * 16))
            .unwrap();
    }
    let mut out = vec![0u8; PAGE_SIZE];
    for round in 0..50 {
        for r in 0..64 {
            let i = r * 16 + 1 + round % 15;
            let _ = e.put(&mut w, &b, &key(sb, OID, i), &page(i));
            e.get(&mut w, &b, &key(sb, OID, r * 16), &mut out, false)
                .unwrap();
        }
    }
    let pool = a.pool(sa).unwrap();
    let mut records = 0;
    for shard in pool.shards.iter() {
        let sh = shard.lock();
        if let Some(m) = sh.members.get(&a.account.id) {
            assert!(
                m.lru.len() <= 16.max(m.runs + m.runs / 2),
                "{}",
                m.lru.len()
            );
            records += m.lru.len();
        }
    }
    // And a's eviction looks at those records only.
    let before = e.budget.lru_examined.load(Relaxed);
    assert_eq!(e.budget.evict_from(&a.account, 64), 64);
    assert!(e.budget.lru_examined.load(Relaxed) - before <= records as u64);
    assert_eq!(a.account.ephemeral_runs.load(Relaxed), 0);
    assert_eq!(e.stats().shared_pools[0].counters.stored_pages, 64 * 15);
}

/// A worker keeps a copy of the pool table of the client it served last: a pool destroyed and
/// its id given to a new pool, a reset, or another client with the same pool ids must never
/// be served from that copy.
#[test]
fn a_workers_copy_of_the_pool_table_follows_every_change() {
    let e = engine(1 << 30);
    let a = e.add_client(ClientConfig::named("a"));
    let b = e.add_client(ClientConfig::named("b"));
    let mut w = e.new_worker().unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    let pa = e.create_pool(&a, PERS).unwrap();
    let pb = e.create_pool(&b, PERS).unwrap();
    assert_eq!(pa, pb, "both clients' first pool has the same id");
    e.put(&mut w, &a, &key(pa, OID, 0), &page(1)).unwrap();
    // The same worker, the other client, the same pool id: b's pool, which is empty.
    assert!(matches!(
        e.get(&mut w, &b, &key(pb, OID, 0), &mut out, false),
        Err(Error::Miss)
    ));
    e.put(&mut w, &b, &key(pb, OID, 0), &page(2)).unwrap();
    e.get(&mut w, &a, &key(pa, OID, 0), &mut out, false)
        .unwrap();
    assert_eq!(out, page(1));
    e.get(&mut w, &b, &key(pb, OID, 0), &mut out, false)
        .unwrap();
    assert_eq!(out, page(2));

    // Destroyed: the id is unknown at once, and a new pool that takes the id is empty.
    e.destroy_pool(&a, pa).unwrap();
    assert!(matches!(
        e.get(&mut w, &a, &key(pa, OID, 0), &mut out, false),
        Err(Error::BadPool(_))
    ));
    assert!(matches!(
        e.put(&mut w, &a, &key(pa, OID, 0), &page(3)),
        Err(Error::BadPool(_))
    ));
    let again = e.create_pool(&a, EPH).unwrap();
    assert_eq!(again, pa);
    assert!(matches!(
        e.get(&mut w, &a, &key(again, OID, 0), &mut out, false),
        Err(Error::Miss)
    ));
    e.put(&mut w, &a, &key(again, OID, 0), &page(4)).unwrap();
    assert_eq!(e.stats().clients[0].pools.len(), 1);

    // A reset drops every pool: none is served from the copy.
    e.reset_client(&b);
    assert!(matches!(
        e.get(&mut w, &b, &key(pb, OID, 0), &mut out, false),
        Err(Error::BadPool(_))
    ));
    // Nothing a worker copied outlives the pages: every byte is released.
    e.reset_client(&a);
    assert_eq!(e.memory_used(), 0);
}
