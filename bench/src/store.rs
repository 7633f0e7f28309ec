// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-process store (`Engine` through the `Tmem` trait, as the device glue calls it) and
//! the limits beside it: a 4 KiB memcpy and the bare codec on the same pages.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use shared_proto::PAGE_SIZE;
use vhost_tmem::store::codec::{Codecs, Compressor, Encoding};
use vhost_tmem::store::{ClientConfig, Engine, EngineConfig, PageKey, PoolSpec, Tmem};
use vhost_tmem::store::{PageDst, PageSrc};

use crate::corpus::Corpus;
use crate::hist::Histogram;

/// Errors of the store benchmarks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store refused an operation the benchmark needs.
    #[error("{op} failed in the store: {source}")]
    Store {
        op: &'static str,
        #[source]
        source: vhost_tmem::store::Error,
    },
    /// A get returned other bytes than were put.
    #[error("{corpus}/{compressor}: page {index} came back different")]
    Corrupt {
        corpus: &'static str,
        compressor: String,
        index: usize,
    },
    /// The codec failed on a page.
    #[error("codec failed: {0}")]
    Codec(#[from] vhost_tmem::store::codec::Error),
}

/// One operation's figures.
#[derive(Clone, Debug, Default)]
pub struct OpStats {
    pub hist: Histogram,
    pub ops: u64,
    pub seconds: f64,
}

impl OpStats {
    /// Empty figures.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one timed phase.
    pub fn add(&mut self, h: &Histogram, ops: u64, seconds: f64) {
        self.hist.merge(h);
        self.ops += ops;
        self.seconds += seconds;
    }

    /// Operations per second over the timed phases.
    pub fn ops_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ops as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// put, get and flush figures of one (compressor, corpus, threads) run.
#[derive(Debug)]
pub struct StoreRun {
    pub put: OpStats,
    pub get: OpStats,
    pub flush: OpStats,
}

fn ns(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

/// The engine the benchmarks use: no limit in the way, one persistent pool (swap-like: gets
/// leave the page, so every round reads what it wrote).
pub fn engine(c: Compressor) -> Engine {
    Engine::new(EngineConfig {
        memory_limit: u64::MAX / 4,
        compressor: c,
        ..EngineConfig::default()
    })
}

/// `rounds` of put-all, get-all, flush-all over `corpus` (after one untimed warm-up round), on
/// `threads` threads with disjoint keys; every get is checked against the page put.
pub fn run(
    corpus: &Corpus,
    c: Compressor,
    threads: usize,
    rounds: usize,
) -> Result<StoreRun, Error> {
    let e = Arc::new(engine(c));
    let client = e.add_client(ClientConfig::named("bench"));
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
    let barrier = Barrier::new(threads);
    let results: Vec<Result<[OpStats; 3], Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (e, client, barrier) = (&e, &client, &barrier);
                s.spawn(move || -> Result<[OpStats; 3], Error> {
                    let mut w = e.new_worker().map_err(|source| Error::Store {
                        op: "new_worker",
                        source,
                    })?;
                    let oid = [t as u64 + 1, 0, 0];
                    let mut out = vec![0u8; PAGE_SIZE];
                    let mut st = [OpStats::new(), OpStats::new(), OpStats::new()];
                    // Round 0 warms up (allocator, page faults) and is not recorded.
                    for round in 0..=rounds {
                        if round == 1 {
                            st = [OpStats::new(), OpStats::new(), OpStats::new()];
                        }
                        // put
                        barrier.wait();
                        let phase = Instant::now();
                        for i in 0..corpus.len() {
                            let key = PageKey {
                                pool,
                                oid,
                                index: i as u64,
                            };
                            let t0 = Instant::now();
                            let r = e.put(&mut w, client, &key, corpus.page(i));
                            st[0].hist.record(ns(t0));
                            r.map_err(|source| Error::Store { op: "put", source })?;
                        }
                        st[0].seconds += phase.elapsed().as_secs_f64();
                        st[0].ops += corpus.len() as u64;
                        // get
                        barrier.wait();
                        let phase = Instant::now();
                        let mut check = 0.0;
                        for i in 0..corpus.len() {
                            let key = PageKey {
                                pool,
                                oid,
                                index: i as u64,
                            };
                            let t0 = Instant::now();
                            let r = e.get(&mut w, client, &key, &mut out, false);
                            st[1].hist.record(ns(t0));
                            r.map_err(|source| Error::Store { op: "get", source })?;
                            let c0 = Instant::now();
                            if out != corpus.page(i) {
                                return Err(Error::Corrupt {
                                    corpus: corpus.name,
                                    compressor: c.to_string(),
                                    index: i,
                                });
                            }
                            check += c0.elapsed().as_secs_f64();
                        }
                        // The check is not the store's time.
                        st[1].seconds += phase.elapsed().as_secs_f64() - check;
                        st[1].ops += corpus.len() as u64;
                        // flush
                        barrier.wait();
                        let phase = Instant::now();
                        for i in 0..corpus.len() {
                            let key = PageKey {
                                pool,
                                oid,
                                index: i as u64,
                            };
                            let t0 = Instant::now();
                            let r = e.flush_page(client, &key);
                            st[2].hist.record(ns(t0));
                            r.map_err(|source| Error::Store {
                                op: "flush",
                                source,
                            })?;
                        }
                        st[2].seconds += phase.elapsed().as_secs_f64();
                        st[2].ops += corpus.len() as u64;
                    }
                    Ok(st)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread panicked"))
            .collect()
    });
    // Threads run side by side: ops add up, time is the slowest thread's.
    let mut total = [OpStats::new(), OpStats::new(), OpStats::new()];
    for r in results {
        let st = r?;
        for (a, b) in total.iter_mut().zip(st.iter()) {
            a.hist.merge(&b.hist);
            a.ops += b.ops;
            a.seconds = a.seconds.max(b.seconds);
        }
    }
    let [put, get, flush] = total;
    Ok(StoreRun { put, get, flush })
}

/// One limit's figures.
#[derive(Debug)]
pub struct Limit {
    pub hist: Histogram,
    pub ops_per_s: f64,
}

fn limit_from(hist: Histogram, secs: f64) -> Limit {
    let ops_per_s = if secs > 0.0 {
        hist.count() as f64 / secs
    } else {
        0.0
    };
    Limit { hist, ops_per_s }
}

/// A 4 KiB memcpy of every page into one destination, `rounds` times.
pub fn memcpy(corpus: &Corpus, rounds: usize) -> Limit {
    let mut out = vec![0u8; PAGE_SIZE];
    let mut h = Histogram::default();
    let mut secs = 0.0;
    for _ in 0..rounds {
        let phase = Instant::now();
        for i in 0..corpus.len() {
            let t0 = Instant::now();
            out.copy_from_slice(std::hint::black_box(corpus.page(i)));
            std::hint::black_box(&mut out);
            h.record(ns(t0));
        }
        secs += phase.elapsed().as_secs_f64();
    }
    limit_from(h, secs)
}

/// The bare codec on every page: compress (with the store's raw threshold), then decompress
/// what compressed (a page that did not is copied, as a raw page would be).
/// Returns (compress, decompress, bytes of output over all pages).
pub fn codec(corpus: &Corpus, c: Compressor, rounds: usize) -> Result<(Limit, Limit, u64), Error> {
    let threshold = EngineConfig::default().raw_threshold;
    let mut codecs = Codecs::new()?;
    let mut stored: Vec<(Encoding, Vec<u8>)> = Vec::with_capacity(corpus.len());
    let mut hc = Histogram::default();
    let mut secs_c = 0.0;
    let mut bytes = 0;
    let mut raw = vec![0u8; PAGE_SIZE];
    for r in 0..rounds {
        for i in 0..corpus.len() {
            let page = corpus.page(i);
            let t0 = Instant::now();
            let out = codecs.compress(c, PageSrc::new(page), threshold)?;
            if out.is_none() {
                // A page that does not compress is kept raw: a copy is part of the floor.
                raw.copy_from_slice(page);
                std::hint::black_box(&mut raw);
            }
            let took = ns(t0);
            hc.record(took);
            secs_c += took as f64 * 1e-9;
            // Keeping the output is the store's work, not the codec's: outside the timing.
            let kept = match out {
                Some((enc, b)) => (enc, b.to_vec()),
                None => (Encoding::Raw, page.to_vec()),
            };
            if r == 0 {
                bytes += kept.1.len() as u64;
                stored.push(kept);
            }
        }
    }
    let mut hd = Histogram::default();
    let mut secs_d = 0.0;
    let mut out = vec![0u8; PAGE_SIZE];
    for _ in 0..rounds {
        let phase = Instant::now();
        for (enc, b) in &stored {
            let t0 = Instant::now();
            codecs.decompress(*enc, b, PageDst::new(&mut out))?;
            hd.record(ns(t0));
        }
        secs_d += phase.elapsed().as_secs_f64();
    }
    Ok((limit_from(hc, secs_c), limit_from(hd, secs_d), bytes))
}
