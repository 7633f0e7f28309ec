// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
use super::*;
use crate::store::engine::EngineConfig;
use crate::store::testutil::random_page;
use crate::store::{ClientConfig, Tmem, Uuid};
use shared_proto::PAGE_SIZE;

const UUID: Uuid = [7; 16];

fn engine(limit: u64) -> Engine {
    Engine::new(EngineConfig {
        memory_limit: limit,
        ..EngineConfig::default()
    })
}

fn client(e: &Engine, name: &str) -> Arc<Client> {
    e.add_client(ClientConfig {
        shared: vec![UUID],
        ..ClientConfig::named(name)
    })
}

/// Page `i`: zero, same-filled, compressible or random.
fn page(i: u64) -> Vec<u8> {
    match i % 4 {
        0 => vec![0; PAGE_SIZE],
        1 => vec![i as u8; PAGE_SIZE],
        2 => (0..PAGE_SIZE).map(|j| (j / 64) as u8 ^ i as u8).collect(),
        _ => random_page(i),
    }
}

fn key(pool: PoolId, obj: u64, index: u64) -> PageKey {
    PageKey {
        pool,
        oid: [obj, 0, 0],
        index,
    }
}

/// Client "a": a persistent pool (id 0), an ephemeral pool at id 2 (id 1 destroyed), and the
/// shared pool (id 3) where "b" (id 0 there) puts pages too. Returns the pages per key.
/// Each page stored: its key, whether "a" put it (else "b"), its content.
type Stored = Vec<(PageKey, bool, Vec<u8>)>;

fn fill(e: &Engine) -> (Arc<Client>, Arc<Client>, Stored) {
    let (a, b) = (client(e, "a"), client(e, "b"));
    let mut w = e.new_worker().unwrap();
    let pers = e
        .create_pool(
            &a,
            PoolSpec {
                persistent: true,
                shared: None,
            },
        )
        .unwrap();
    let gone = e
        .create_pool(
            &a,
            PoolSpec {
                persistent: false,
                shared: None,
            },
        )
        .unwrap();
    let eph = e
        .create_pool(
            &a,
            PoolSpec {
                persistent: false,
                shared: None,
            },
        )
        .unwrap();
    let sh_a = e
        .create_pool(
            &a,
            PoolSpec {
                persistent: false,
                shared: Some(UUID),
            },
        )
        .unwrap();
    e.destroy_pool(&a, gone).unwrap();
    let sh_b = e
        .create_pool(
            &b,
            PoolSpec {
                persistent: false,
                shared: Some(UUID),
            },
        )
        .unwrap();
    assert_eq!((pers, eph, sh_a, sh_b), (0, 2, 3, 0));
    let mut pages = Vec::new();
    for i in 0..600u64 {
        // Dense runs, scattered single pages and a second object.
        let k = key(pers, i % 3, if i % 5 == 0 { i * 1000 } else { i });
        let p = page(i);
        e.put(&mut w, &a, &k, &p).unwrap();
        pages.retain(|(x, _, _)| *x != k);
        pages.push((k, true, p));
    }
    for i in 0..200u64 {
        let p = page(i * 4 + 2);
        e.put(&mut w, &a, &key(eph, 9, i), &p).unwrap();
        pages.push((key(eph, 9, i), true, p));
        let p = page(i * 4 + 2 + 1000);
        e.put(&mut w, &a, &key(sh_a, 1, i), &p).unwrap();
        pages.push((key(sh_a, 1, i), true, p));
        let p = page(i * 4 + 2 + 2000);
        e.put(&mut w, &b, &key(sh_b, 1, 1000 + i), &p).unwrap();
        pages.push((key(sh_b, 1, 1000 + i), false, p));
    }
    (a, b, pages)
}

fn save(e: &Engine, clients: &[&Arc<Client>]) -> Vec<u8> {
    let mut w = StateWriter::new(Vec::new(), Scope::Daemon, "t", 0, clients.len() as u32).unwrap();
    for c in clients {
        e.save_client(c, &mut w, true, &mut |_| Ok(())).unwrap();
    }
    w.finish().unwrap().0
}

fn restore(e: &Engine, clients: &[&Arc<Client>], bytes: &[u8]) -> Result<(), RestoreError> {
    let mut r = StateReader::new(bytes)?;
    let mut i = 0;
    while let Some(rec) = r.next_client()? {
        assert_eq!(rec.name, clients[i].name);
        e.restore_client(clients[i], &rec, &mut r)?;
        i += 1;
    }
    Ok(())
}

fn gauges(e: &Engine, name: &str) -> (u64, u64, u64, u64, u64) {
    let s = e.stats();
    let c = s.clients.iter().find(|c| c.name == name).unwrap();
    let k = &c.counters;
    (
        k.stored_pages,
        k.same_filled_pages,
        k.raw_pages,
        k.compressed_bytes,
        k.puts,
    )
}

#[test]
fn a_saved_engine_comes_back_byte_exact() {
    let e = engine(1 << 30);
    let (a, b, pages) = fill(&e);
    let bytes = save(&e, &[&a, &b]);
    let f = engine(1 << 30);
    let (a2, b2) = (client(&f, "a"), client(&f, "b"));
    restore(&f, &[&a2, &b2], &bytes).unwrap();
    assert!(a2.restored() && b2.restored());
    for n in ["a", "b"] {
        assert_eq!(gauges(&e, n), gauges(&f, n), "{n}");
    }
    assert_eq!(
        e.stats().clients[0].pools.len(),
        f.stats().clients[0].pools.len()
    );
    // Metadata is rebuilt, not copied: charges agree within map growth.
    let (used, used2) = (e.memory_used(), f.memory_used());
    assert!(
        used2 <= used + used / 10 && used <= used2 + used2 / 10,
        "{used} {used2}"
    );
    let mut w = f.new_worker().unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    for (k, of_a, p) in &pages {
        let c = if *of_a { &a2 } else { &b2 };
        f.get(&mut w, c, k, &mut out, false).unwrap();
        assert_eq!(&out, p, "{k:?}");
    }
    // The shared pool's pages stay their putter's: "b" cannot flush "a"'s.
    assert!(matches!(f.flush_page(&b2, &key(0, 1, 0)), Err(Error::Miss)));
    f.flush_page(&b2, &key(0, 1, 1000)).unwrap();
    // Pool 1 stays free for the guest's next create.
    let id = f
        .create_pool(
            &a2,
            PoolSpec {
                persistent: true,
                shared: None,
            },
        )
        .unwrap();
    assert_eq!(id, 1);
}

#[test]
fn state_that_does_not_fit_is_refused_and_leaves_nothing() {
    let e = engine(1 << 30);
    let (a, b, _) = fill(&e);
    let bytes = save(&e, &[&a, &b]);
    let f = engine(1 << 20);
    let (a2, b2) = (client(&f, "a"), client(&f, "b"));
    let err = restore(&f, &[&a2, &b2], &bytes).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RestoreError::NoRoom { .. }), "{msg}");
    assert!(msg.starts_with("client \"a\" does not fit:"), "{msg}");
    assert_eq!(f.memory_used(), 0);
    assert_eq!(f.payload_resident(), f.payload_resident().min(2 << 20));
    assert!(!a2.restored());
    assert!(f.stats().clients.iter().all(|c| c.pools.is_empty()));
    // Nothing of it is evicted to make room either: a quota works the same.
    let g = engine(1 << 30);
    let a3 = g.add_client(ClientConfig {
        quota: 256 << 10,
        shared: vec![UUID],
        ..ClientConfig::named("a")
    });
    let mut r = StateReader::new(&bytes[..]).unwrap();
    let rec = r.next_client().unwrap().unwrap();
    let err = g.restore_client(&a3, &rec, &mut r).unwrap_err();
    assert!(matches!(err, RestoreError::NoRoom { .. }), "{err}");
    assert_eq!(g.memory_used(), 0);
}

#[test]
fn a_revoked_shared_pool_or_a_lower_pool_limit_is_refused() {
    let e = engine(1 << 30);
    let (a, b, _) = fill(&e);
    let bytes = save(&e, &[&a, &b]);
    let f = engine(1 << 30);
    let a2 = f.add_client(ClientConfig::named("a"));
    let mut r = StateReader::new(&bytes[..]).unwrap();
    let rec = r.next_client().unwrap().unwrap();
    let err = f.restore_client(&a2, &rec, &mut r).unwrap_err().to_string();
    assert!(
        err.starts_with("client \"a\", pool 3: client is not authorized"),
        "{err}"
    );
    assert_eq!(f.memory_used(), 0);
    let g = Engine::new(EngineConfig {
        max_pools: 3,
        ..EngineConfig::default()
    });
    let a3 = client(&g, "a");
    let mut r = StateReader::new(&bytes[..]).unwrap();
    let rec = r.next_client().unwrap().unwrap();
    let err = g.restore_client(&a3, &rec, &mut r).unwrap_err().to_string();
    assert!(
        err.contains("pool 3: client has the maximum number of pools (3)"),
        "{err}"
    );
    assert_eq!(g.memory_used(), 0);
    // A client that holds pools already is not restored into.
    let h = engine(1 << 30);
    let a4 = client(&h, "a");
    h.create_pool(
        &a4,
        PoolSpec {
            persistent: true,
            shared: None,
        },
    )
    .unwrap();
    let mut r = StateReader::new(&bytes[..]).unwrap();
    let rec = r.next_client().unwrap().unwrap();
    let err = h.restore_client(&a4, &rec, &mut r).unwrap_err().to_string();
    assert!(err.contains("holds pools already"), "{err}");
}

/// One client over a stream (live migration): all or nothing, under any name.
#[test]
fn one_client_streams_restore_all_or_nothing() {
    let e = engine(1 << 30);
    let (a, _b, pages) = fill(&e);
    let (bytes, t) = e.save_client_stream(&a, Vec::new(), true).unwrap();
    assert_eq!(t.clients, 1);
    let f = engine(1 << 30);
    for cut in [bytes.len() - 1, bytes.len() / 2, 100] {
        let m = client(&f, "moved");
        let err = f.restore_client_stream(&m, &bytes[..cut]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert_eq!(f.memory_used(), 0);
        assert!(m.pools.read().iter().all(Option::is_none));
        assert!(!m.restored());
        f.remove_client(&m);
    }
    let m = client(&f, "moved");
    assert_eq!(
        f.restore_client_stream(&m, &bytes[..]).unwrap().pages,
        t.pages
    );
    let mut w = f.new_worker().unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    for (k, of_a, p) in pages.iter().filter(|x| x.1) {
        assert!(of_a);
        f.get(&mut w, &m, k, &mut out, false).unwrap();
        assert_eq!(&out, p);
    }
    // A daemon's state is not a one-client stream.
    let whole = save(&e, &[&a]);
    let n = client(&f, "n");
    assert!(matches!(
        f.restore_client_stream(&n, &whole[..]),
        Err(RestoreError::Scope)
    ));
}
