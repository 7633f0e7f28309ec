// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The memory limit means resident memory: a store filled to its limit by several threads with
//! a churn of mixed payload sizes stays within the documented bound over the limit, and gives
//! the memory back once the pages are gone (docs/operations.md, "Memory limit and RSS").
//!
//! Its own test binary, so that no other test's allocations move this process's RSS.

use std::sync::Arc;

use vhost_tmem::store::codec::Compressor;
use vhost_tmem::store::{
    ClientConfig, Engine, EngineConfig, Error, IncompressiblePolicy, PageKey, PoolSpec, Tmem,
};

const LIMIT: u64 = 64 << 20;
const THREADS: u64 = 4;
const ROUNDS: u64 = 4;
const MIB: u64 = 1 << 20;
/// The documented bound over the limit: 10 % of it plus 32 MiB.
fn bound() -> u64 {
    LIMIT + LIMIT / 10 + 32 * MIB
}

fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A page that compresses to about `n` bytes: `n` random bytes, then zeros.
fn page(rng: &mut Rng, n: usize, buf: &mut [u8]) {
    for b in buf[..n].iter_mut() {
        *b = rng.next() as u8;
    }
    buf[n..].fill(0);
}

fn key(pool: u32, thread: u64, i: u64) -> PageKey {
    PageKey {
        pool,
        oid: [1 + thread, 0, 0],
        index: i,
    }
}

#[test]
fn rss_stays_within_bound_under_churn_and_returns_after_free() {
    let e = Arc::new(Engine::new(EngineConfig {
        memory_limit: LIMIT,
        compressor: Compressor::Lz4,
        ephemeral_incompressible: IncompressiblePolicy::Store,
        ..EngineConfig::default()
    }));
    let client = e.add_client(ClientConfig::named("rss"));
    let pool = e
        .create_pool(
            &client,
            PoolSpec {
                persistent: true,
                shared: None,
            },
        )
        .unwrap();
    let base = rss();
    let mut peak = base;
    // Keys each thread holds, per thread.
    let mut held: Vec<Vec<u64>> = vec![Vec::new(); THREADS as usize];
    let mut next_index = vec![0u64; THREADS as usize];
    for round in 0..ROUNDS {
        // Fill to the limit: every thread puts until the store says no room. Each round uses
        // other payload sizes, so freed space of one size must serve another; the first round
        // stores small payloads and keeps every 8th, leaving holes big payloads cannot use.
        let (lo, hi): (u64, u64) =
            [(40, 300), (2500, 4000), (100, 1500), (600, 3000)][round as usize];
        let fills: Vec<_> = (0..THREADS)
            .map(|t| {
                let (e, client) = (e.clone(), client.clone());
                let start = next_index[t as usize];
                std::thread::spawn(move || {
                    let mut w = e.new_worker().unwrap();
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((t + 1) * (round + 7)));
                    let mut buf = vec![0u8; 4096];
                    let mut keys = Vec::new();
                    let mut i = start;
                    loop {
                        let n = (lo + rng.next() % (hi - lo)) as usize;
                        page(&mut rng, n, &mut buf);
                        match e.put(&mut w, &client, &key(pool, t, i), &buf) {
                            Ok(()) => keys.push(i),
                            Err(Error::NoSpace) => break,
                            Err(err) => panic!("put: {err}"),
                        }
                        i += 1;
                    }
                    (keys, i)
                })
            })
            .collect();
        for (t, h) in fills.into_iter().enumerate() {
            let (keys, end) = h.join().unwrap();
            held[t].extend(keys);
            next_index[t] = end;
        }
        peak = peak.max(rss());
        // Free 7/8 (round 0) or a random half, each thread another thread's pages (frees cross
        // threads).
        let frees: Vec<_> = (0..THREADS)
            .map(|t| {
                let (e, client) = (e.clone(), client.clone());
                let victim = (t + 1) % THREADS;
                let mut keys = std::mem::take(&mut held[victim as usize]);
                std::thread::spawn(move || {
                    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((t + 3) * (round + 11)));
                    let mut kept = Vec::with_capacity(keys.len() / 2 + 1);
                    for i in keys.drain(..) {
                        let free = if round == 0 {
                            i % 8 != 0
                        } else {
                            rng.next().is_multiple_of(2)
                        };
                        if free {
                            e.flush_page(&client, &key(pool, victim, i)).unwrap();
                        } else {
                            kept.push(i);
                        }
                    }
                    (victim, kept)
                })
            })
            .collect();
        for h in frees {
            let (victim, kept) = h.join().unwrap();
            held[victim as usize] = kept;
        }
        peak = peak.max(rss());
        let used = e.memory_used();
        assert!(
            peak <= bound(),
            "round {round}: RSS peaked at {} MiB (baseline {} MiB, charged {} MiB) over the bound \
             of {} MiB for a {} MiB limit",
            peak / MIB,
            base / MIB,
            used / MIB,
            bound() / MIB,
            LIMIT / MIB,
        );
    }
    drop(held);
    e.destroy_pool(&client, pool).unwrap();
    assert_eq!(e.memory_used(), 0);
    let after = rss();
    eprintln!(
        "rss: baseline {} MiB, peak {} MiB, after freeing everything {} MiB",
        base / MIB,
        peak / MIB,
        after / MIB
    );
    assert!(
        after <= base + 8 * MIB,
        "RSS stayed at {} MiB after every page was freed (baseline {} MiB, peak {} MiB)",
        after / MIB,
        base / MIB,
        peak / MIB
    );
}
