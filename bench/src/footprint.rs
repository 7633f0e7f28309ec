// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a stored page costs in memory: metadata and allocator slack (counted by the global
//! allocator and the store's payload arena), resident memory (from /proc) beside the bytes the
//! store charges against its limit, and stored payload beside the bare codec's output. The
//! churn workload checks that the memory limit bounds resident memory and that memory comes
//! back after frees (docs/operations.md).

use std::sync::Arc;

use shared_proto::PAGE_SIZE;
use vhost_tmem::store::codec::Compressor;
use vhost_tmem::store::{
    ClientConfig, Engine, EngineConfig, IncompressiblePolicy, PageKey, PoolSpec, Tmem,
};

use crate::alloc;
use crate::corpus::Corpus;
use crate::store::{engine, Error};

/// Per-page costs of one fill of the store.
#[derive(Debug)]
pub struct Footprint {
    pub pages: u64,
    /// Payload bytes (compressed output, raw pages; same-filled pages have none).
    pub payload_bytes_per_page: f64,
    /// Every other byte the store allocated per page: maps, entries, LRU records.
    pub metadata_bytes_per_page: f64,
    /// Bytes the allocators (heap and payload arena) hold beyond those requested, per page.
    pub slack_bytes_per_page: f64,
    /// Growth of the resident set per page.
    pub rss_bytes_per_page: f64,
    /// What the engine charges against limits per page for metadata.
    pub charged_metadata_bytes_per_page: f64,
    /// What the engine charged against its limit once filled.
    pub charged_bytes: u64,
    /// Growth of the resident set once filled.
    pub rss_bytes: u64,
    /// Growth of the resident set left once every page was freed.
    pub rss_after_free_bytes: u64,
}

/// How the stored pages' keys are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keys {
    /// Consecutive indexes, an object per 64 Ki pages: a swap area, large files.
    Dense,
    /// One page per object: a page cache full of small files.
    ObjectPerPage,
    /// Every 16th index of large objects, so no two pages share a run: scattered swap slots.
    Scattered,
}

impl Keys {
    pub const ALL: [Keys; 3] = [Keys::Dense, Keys::ObjectPerPage, Keys::Scattered];

    pub fn name(self) -> &'static str {
        match self {
            Keys::Dense => "dense",
            Keys::ObjectPerPage => "object per page",
            Keys::Scattered => "scattered",
        }
    }

    /// The key of the i-th page.
    fn key(self, i: usize) -> ([u64; 3], u64) {
        let i = i as u64;
        match self {
            Keys::Dense => ([1 + (i >> 16), 0, 0], i),
            Keys::ObjectPerPage => ([1 + i, 0, 0], 0),
            Keys::Scattered => ([1 + (i >> 16), 0, 0], i * 16),
        }
    }
}

/// Puts `pages` pages of `corpus` (cycled, distinct keys laid out as `keys` says) into a fresh
/// store and measures.
pub fn measure(
    corpus: &Corpus,
    c: Compressor,
    persistent: bool,
    keys: Keys,
    pages: usize,
) -> Result<Footprint, Error> {
    alloc::trim();
    alloc::set_counting(true);
    let r = (|| -> Result<(Footprint, u64), Error> {
        let e = engine(c);
        let client = e.add_client(ClientConfig::named("footprint"));
        let pool = e
            .create_pool(
                &client,
                PoolSpec {
                    persistent,
                    shared: None,
                },
            )
            .map_err(|source| Error::Store {
                op: "create_pool",
                source,
            })?;
        let mut w = e.new_worker().map_err(|source| Error::Store {
            op: "new_worker",
            source,
        })?;
        let (req0, use0) = alloc::live();
        let rss0 = alloc::rss_bytes();
        for i in 0..pages {
            let (oid, index) = keys.key(i);
            // An ephemeral pool refuses incompressible pages; stored_pages counts the rest.
            let key = PageKey { pool, oid, index };
            let _ = e.put(&mut w, &client, &key, corpus.page(i % corpus.len()));
        }
        let (req1, use1) = alloc::live();
        let rss1 = alloc::rss_bytes();
        let st = e.stats();
        let k = &st.clients[0].counters;
        let n = k.stored_pages.max(1) as f64;
        let charged = st.metadata_bytes_per_page;
        // Payloads live in the store's arena, not the heap: the heap holds metadata only.
        let arena_slack = e.payload_resident() as f64 - k.compressed_bytes as f64;
        let fp = Footprint {
            pages: k.stored_pages,
            payload_bytes_per_page: k.compressed_bytes as f64 / n,
            metadata_bytes_per_page: (req1 - req0) as f64 / n,
            slack_bytes_per_page: (((use1 - use0) - (req1 - req0)) as f64 + arena_slack) / n,
            rss_bytes_per_page: rss1.saturating_sub(rss0) as f64 / n,
            charged_metadata_bytes_per_page: charged,
            charged_bytes: e.memory_used(),
            rss_bytes: rss1.saturating_sub(rss0),
            rss_after_free_bytes: 0,
        };
        // As a guest's reset or pool destroy frees it in the daemon.
        e.destroy_pool(&client, pool)
            .map_err(|source| Error::Store {
                op: "destroy_pool",
                source,
            })?;
        drop((w, client, e));
        Ok((fp, rss0))
    })();
    alloc::set_counting(false);
    let (mut fp, rss0) = r?;
    // No trim here: what the store gives back by itself is the measurement.
    fp.rss_after_free_bytes = alloc::rss_bytes().saturating_sub(rss0);
    alloc::trim();
    Ok(fp)
}

/// Resident memory of a store under churn at a memory limit.
#[derive(Debug)]
pub struct Churn {
    /// Pages stored at the end of the last fill.
    pub pages: u64,
    /// The most the store charged (at the end of a fill).
    pub charged_bytes: u64,
    /// Peak growth of the resident set over the run.
    pub rss_bytes: u64,
    /// Growth of the resident set left once every page was freed.
    pub rss_after_free_bytes: u64,
}

/// Threads putting and freeing in the churn workload (frees cross threads, as workers do).
const CHURN_THREADS: usize = 4;

/// Fills a store with a `limit` to the limit from several threads with mixed-size pages,
/// frees a random half, refills with pages of other sizes (the next corpus of `corpora`),
/// `rounds` times, then frees everything.
pub fn churn(corpora: &[&Corpus], limit: u64, rounds: usize) -> Result<Churn, Error> {
    alloc::trim();
    let rss0 = alloc::rss_bytes();
    let e = Arc::new(Engine::new(EngineConfig {
        memory_limit: limit,
        compressor: Compressor::Lz4,
        ephemeral_incompressible: IncompressiblePolicy::Store,
        ..EngineConfig::default()
    }));
    let client = e.add_client(ClientConfig::named("churn"));
    let pool = e
        .create_pool(
            &client,
            PoolSpec {
                persistent: true,
                shared: None,
            },
        )
        .map_err(|source| Error::Store {
            op: "create_pool",
            source,
        })?;
    let key = |t: usize, i: u64| PageKey {
        pool,
        oid: [1 + t as u64, 0, 0],
        index: i,
    };
    let mut held: Vec<Vec<u64>> = vec![Vec::new(); CHURN_THREADS];
    let mut next = [0u64; CHURN_THREADS];
    let (mut peak, mut charged, mut pages) = (0, 0, 0);
    for round in 0..rounds {
        let filled = std::thread::scope(|s| {
            let hs: Vec<_> = (0..CHURN_THREADS)
                .map(|t| {
                    let (e, client) = (&e, &client);
                    let start = next[t];
                    let corpus = corpora[round % corpora.len()];
                    s.spawn(move || -> Result<(Vec<u64>, u64), Error> {
                        let mut w = e.new_worker().map_err(|source| Error::Store {
                            op: "new_worker",
                            source,
                        })?;
                        let mut keys = Vec::new();
                        let mut i = start;
                        let mut at = t * 7919;
                        loop {
                            let page = corpus.page(at % corpus.len());
                            at += 1;
                            match e.put(&mut w, client, &key(t, i), page) {
                                Ok(()) => keys.push(i),
                                Err(vhost_tmem::store::Error::NoSpace) => break,
                                Err(source) => return Err(Error::Store { op: "put", source }),
                            }
                            i += 1;
                        }
                        Ok((keys, i))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("churn thread"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        for (t, (keys, end)) in filled.into_iter().enumerate() {
            held[t].extend(keys);
            next[t] = end;
        }
        charged = charged.max(e.memory_used());
        pages = held.iter().map(|h| h.len() as u64).sum();
        peak = peak.max(alloc::rss_bytes());
        if round + 1 == rounds {
            break;
        }
        // A random half of every thread's pages, freed on other threads than put them.
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ round as u64;
        std::thread::scope(|s| {
            for (t, keys) in held.iter_mut().enumerate() {
                let (e, client) = (&e, &client);
                let (gone, kept): (Vec<u64>, Vec<u64>) = keys.iter().partition(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x & 1 == 0
                });
                *keys = kept;
                s.spawn(move || {
                    for i in gone {
                        let _ = e.flush_page(client, &key(t, i));
                    }
                });
            }
        });
        peak = peak.max(alloc::rss_bytes());
    }
    e.destroy_pool(&client, pool)
        .map_err(|source| Error::Store {
            op: "destroy_pool",
            source,
        })?;
    drop((client, e));
    let after = alloc::rss_bytes();
    alloc::trim();
    Ok(Churn {
        pages,
        charged_bytes: charged,
        rss_bytes: peak.saturating_sub(rss0),
        rss_after_free_bytes: after.saturating_sub(rss0),
    })
}

/// Compression ratio of stored payload: input bytes over payload bytes.
pub fn ratio(f: &Footprint) -> f64 {
    PAGE_SIZE as f64 / f.payload_bytes_per_page.max(1e-9)
}
