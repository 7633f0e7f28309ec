// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The in-process store (`Engine` through the `Tmem` trait, as the device glue calls it) and
//! the limits beside it: a 4 KiB memcpy and the bare codec on the same pages.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use shared_proto::PAGE_SIZE;
use vhost_tmem::store::codec::{Codecs, Compressor, Encoding};
use vhost_tmem::store::{ClientConfig, Engine, EngineConfig, PageKey, PoolId, PoolSpec, Tmem};
use vhost_tmem::store::{PageDst, PageSrc};

use crate::corpus::Corpus;

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

/// Latencies in ns: an HDR histogram with 3 significant digits (0.1 %) from 1 ns to 10 s, so
/// percentiles need no stored samples; a longer operation counts as 10 s.
pub type Histogram = hdrhistogram::Histogram<u64>;

/// An empty [`Histogram`]. Fixed bounds: recording never allocates, and histograms from
/// here always merge.
pub fn histogram() -> Histogram {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("1 ns..10 s at 3 digits is valid")
}

/// Adds `o`'s counts to `h`.
pub fn merge(h: &mut Histogram, o: &Histogram) {
    h.add(o)
        .expect("histograms with the same bounds always merge");
}

/// One operation's figures.
#[derive(Clone, Debug)]
pub struct OpStats {
    pub hist: Histogram,
    pub ops: u64,
    pub seconds: f64,
}

impl Default for OpStats {
    fn default() -> Self {
        Self {
            hist: histogram(),
            ops: 0,
            seconds: 0.0,
        }
    }
}

impl OpStats {
    /// Empty figures.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one timed phase.
    pub fn add(&mut self, h: &Histogram, ops: u64, seconds: f64) {
        merge(&mut self.hist, h);
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
                            st[0].hist.saturating_record(ns(t0));
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
                            st[1].hist.saturating_record(ns(t0));
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
                            st[2].hist.saturating_record(ns(t0));
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
            merge(&mut a.hist, &b.hist);
            a.ops += b.ops;
            a.seconds = a.seconds.max(b.seconds);
        }
    }
    let [put, get, flush] = total;
    Ok(StoreRun { put, get, flush })
}

/// The single-thread store on one corpus, a round at a time, so its rounds can alternate
/// with the limits' rounds on the same pages (and, end to end, with the daemon's).
pub struct InProcess<'c> {
    e: Engine,
    client: <Engine as Tmem>::Client,
    pool: PoolId,
    w: <Engine as Tmem>::Worker,
    out: Vec<u8>,
    corpus: &'c Corpus,
    c: Compressor,
}

impl<'c> InProcess<'c> {
    /// A fresh engine (see [`engine`]) with one persistent pool.
    pub fn new(corpus: &'c Corpus, c: Compressor) -> Result<Self, Error> {
        let e = engine(c);
        let client = e.add_client(ClientConfig::named("bench"));
        let spec = PoolSpec {
            persistent: true,
            shared: None,
        };
        let pool = e
            .create_pool(&client, spec)
            .map_err(|source| Error::Store {
                op: "create_pool",
                source,
            })?;
        let w = e.new_worker().map_err(|source| Error::Store {
            op: "new_worker",
            source,
        })?;
        Ok(Self {
            e,
            client,
            pool,
            w,
            out: vec![0u8; PAGE_SIZE],
            corpus,
            c,
        })
    }

    fn key(&self, i: usize) -> PageKey {
        PageKey {
            pool: self.pool,
            oid: [1, 0, 0],
            index: i as u64,
        }
    }

    /// One round: put every page, get every page (checked, the check untimed), flush every
    /// page. Returns the put, get and flush figures of this round.
    pub fn round(&mut self) -> Result<[OpStats; 3], Error> {
        let corpus = self.corpus;
        let n = corpus.len() as u64;
        let mut st = [OpStats::new(), OpStats::new(), OpStats::new()];
        let phase = Instant::now();
        for i in 0..corpus.len() {
            let key = self.key(i);
            let t0 = Instant::now();
            let r = self.e.put(&mut self.w, &self.client, &key, corpus.page(i));
            st[0].hist.saturating_record(ns(t0));
            r.map_err(|source| Error::Store { op: "put", source })?;
        }
        st[0].seconds = phase.elapsed().as_secs_f64();
        st[0].ops = n;
        let phase = Instant::now();
        let mut check = 0.0;
        for i in 0..corpus.len() {
            let key = self.key(i);
            let t0 = Instant::now();
            let r = self
                .e
                .get(&mut self.w, &self.client, &key, &mut self.out, false);
            st[1].hist.saturating_record(ns(t0));
            r.map_err(|source| Error::Store { op: "get", source })?;
            let c0 = Instant::now();
            if self.out != corpus.page(i) {
                return Err(Error::Corrupt {
                    corpus: corpus.name,
                    compressor: self.c.to_string(),
                    index: i,
                });
            }
            check += c0.elapsed().as_secs_f64();
        }
        st[1].seconds = phase.elapsed().as_secs_f64() - check;
        st[1].ops = n;
        let phase = Instant::now();
        for i in 0..corpus.len() {
            let key = self.key(i);
            let t0 = Instant::now();
            let r = self.e.flush_page(&self.client, &key);
            st[2].hist.saturating_record(ns(t0));
            r.map_err(|source| Error::Store {
                op: "flush",
                source,
            })?;
        }
        st[2].seconds = phase.elapsed().as_secs_f64();
        st[2].ops = n;
        Ok(st)
    }
}

impl InProcess<'_> {
    // The workloads `--instructions` counts under callgrind: out of line (callgrind charges
    // each one's instructions to it), no clock reads, no check (a round checked the pages).

    /// Puts every page.
    #[inline(never)]
    pub fn put_all(&mut self) -> Result<(), Error> {
        for i in 0..self.corpus.len() {
            let key = self.key(i);
            self.e
                .put(&mut self.w, &self.client, &key, self.corpus.page(i))
                .map_err(|source| Error::Store { op: "put", source })?;
        }
        Ok(())
    }

    /// Gets every page.
    #[inline(never)]
    pub fn get_all(&mut self) -> Result<(), Error> {
        for i in 0..self.corpus.len() {
            let key = self.key(i);
            self.e
                .get(&mut self.w, &self.client, &key, &mut self.out, false)
                .map_err(|source| Error::Store { op: "get", source })?;
            std::hint::black_box(&mut self.out);
        }
        Ok(())
    }

    /// Flushes every page.
    #[inline(never)]
    pub fn flush_all(&mut self) -> Result<(), Error> {
        for i in 0..self.corpus.len() {
            let key = self.key(i);
            self.e
                .flush_page(&self.client, &key)
                .map_err(|source| Error::Store {
                    op: "flush",
                    source,
                })?;
        }
        Ok(())
    }
}

/// The limits on one corpus, a round at a time: the bare codec (compress with the store's raw
/// threshold, a page that does not compress copied as a raw page would be; decompress what
/// compressed) and a 4 KiB memcpy of every page.
pub struct Limits<'c> {
    corpus: &'c Corpus,
    c: Compressor,
    codecs: Codecs,
    threshold: usize,
    /// Every page's codec output, made once outside the timing: decompress reads these.
    stored: Vec<(Encoding, Vec<u8>)>,
    /// Bytes of codec output over all pages.
    pub bytes: u64,
    raw: Vec<u8>,
}

impl<'c> Limits<'c> {
    /// Compresses every page once (untimed) for the decompress rounds.
    pub fn new(corpus: &'c Corpus, c: Compressor) -> Result<Self, Error> {
        let threshold = EngineConfig::default().raw_threshold;
        let mut codecs = Codecs::new()?;
        let mut stored = Vec::with_capacity(corpus.len());
        let mut bytes = 0;
        for i in 0..corpus.len() {
            let page = corpus.page(i);
            let kept = match codecs.compress(c, PageSrc::new(page), threshold)? {
                Some((enc, b)) => (enc, b.to_vec()),
                None => (Encoding::Raw, page.to_vec()),
            };
            bytes += kept.1.len() as u64;
            stored.push(kept);
        }
        Ok(Self {
            corpus,
            c,
            codecs,
            threshold,
            stored,
            bytes,
            raw: vec![0u8; PAGE_SIZE],
        })
    }

    /// One round: compress, decompress and memcpy every page. Returns their figures.
    pub fn round(&mut self) -> Result<[OpStats; 3], Error> {
        let corpus = self.corpus;
        let n = corpus.len() as u64;
        let mut st = [OpStats::new(), OpStats::new(), OpStats::new()];
        let phase = Instant::now();
        for i in 0..corpus.len() {
            let page = corpus.page(i);
            let t0 = Instant::now();
            let out = self
                .codecs
                .compress(self.c, PageSrc::new(page), self.threshold)?;
            if out.is_none() {
                // A page that does not compress is kept raw: a copy is part of the floor.
                self.raw.copy_from_slice(page);
                std::hint::black_box(&mut self.raw);
            } else {
                std::hint::black_box(out);
            }
            st[0].hist.saturating_record(ns(t0));
        }
        st[0].seconds = phase.elapsed().as_secs_f64();
        st[0].ops = n;
        // Checked like the store's gets, the check untimed: both then start each timed
        // operation with the same caches (the check reads the corpus page).
        let phase = Instant::now();
        let mut check = 0.0;
        for (i, (enc, b)) in self.stored.iter().enumerate() {
            let t0 = Instant::now();
            self.codecs
                .decompress(*enc, b, PageDst::new(&mut self.raw))?;
            st[1].hist.saturating_record(ns(t0));
            let c0 = Instant::now();
            if self.raw != corpus.page(i) {
                return Err(Error::Corrupt {
                    corpus: corpus.name,
                    compressor: format!("bare {}", self.c),
                    index: i,
                });
            }
            check += c0.elapsed().as_secs_f64();
        }
        st[1].seconds = phase.elapsed().as_secs_f64() - check;
        st[1].ops = n;
        let phase = Instant::now();
        for i in 0..corpus.len() {
            let t0 = Instant::now();
            self.raw
                .copy_from_slice(std::hint::black_box(corpus.page(i)));
            std::hint::black_box(&mut self.raw);
            st[2].hist.saturating_record(ns(t0));
        }
        st[2].seconds = phase.elapsed().as_secs_f64();
        st[2].ops = n;
        Ok(st)
    }
}

impl Limits<'_> {
    /// Compresses every page (a page that does not compress is copied), untimed: see
    /// [`InProcess::put_all`].
    #[inline(never)]
    pub fn compress_all(&mut self) -> Result<(), Error> {
        for i in 0..self.corpus.len() {
            let page = self.corpus.page(i);
            let out = self
                .codecs
                .compress(self.c, PageSrc::new(page), self.threshold)?;
            if out.is_none() {
                self.raw.copy_from_slice(page);
                std::hint::black_box(&mut self.raw);
            } else {
                std::hint::black_box(out);
            }
        }
        Ok(())
    }

    /// Decompresses every page's codec output.
    #[inline(never)]
    pub fn decompress_all(&mut self) -> Result<(), Error> {
        for (enc, b) in &self.stored {
            self.codecs
                .decompress(*enc, b, PageDst::new(&mut self.raw))?;
            std::hint::black_box(&mut self.raw);
        }
        Ok(())
    }
}

/// Store and limit rounds of one (corpus, compressor), interleaved: each pair is a store
/// round and then a limit round on the same pages.
#[derive(Debug)]
pub struct Paired {
    /// Per pair: put, get, flush.
    pub store: Vec<[OpStats; 3]>,
    /// Per pair: compress, decompress, memcpy.
    pub limits: Vec<[OpStats; 3]>,
    /// Bytes of bare codec output over the corpus.
    pub bytes: u64,
}

impl Paired {
    /// Operation `op` of every store round merged.
    pub fn store_total(&self, op: usize) -> OpStats {
        total(self.store.iter().map(|r| &r[op]))
    }

    /// Limit `what` of every limit round merged.
    pub fn limit_total(&self, what: usize) -> OpStats {
        total(self.limits.iter().map(|r| &r[what]))
    }
}

fn total<'a>(rounds: impl Iterator<Item = &'a OpStats>) -> OpStats {
    let mut t = OpStats::new();
    for r in rounds {
        t.add(&r.hist, r.ops, r.seconds);
    }
    t
}

/// Index of put, get and flush in a store round's figures.
pub const PUT: usize = 0;
/// See [`PUT`].
pub const GET: usize = 1;
/// Index of compress, decompress and memcpy in a limit round's figures.
pub const COMPRESS: usize = 0;
/// See [`COMPRESS`].
pub const DECOMPRESS: usize = 1;
/// See [`COMPRESS`].
pub const MEMCPY: usize = 2;

/// `pairs` store/limit pairs on one thread (ABAB...), after one untimed round of each.
pub fn paired(corpus: &Corpus, c: Compressor, pairs: usize) -> Result<Paired, Error> {
    let mut s = InProcess::new(corpus, c)?;
    let mut l = Limits::new(corpus, c)?;
    // Warm-up (allocator, page faults, caches): not recorded.
    s.round()?;
    l.round()?;
    let mut p = Paired {
        store: Vec::with_capacity(pairs),
        limits: Vec::with_capacity(pairs),
        bytes: l.bytes,
    };
    for _ in 0..pairs {
        p.store.push(s.round()?);
        p.limits.push(l.round()?);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_merge_and_bounds() {
        let mut h = histogram();
        for v in 1..=1000u64 {
            h.saturating_record(v * 100);
        }
        // 3 significant digits: within 0.1 % of the exact rank.
        let p50 = h.value_at_quantile(0.5) as f64;
        let p99 = h.value_at_quantile(0.99) as f64;
        assert!((p50 - 50_000.0).abs() <= 50.0, "{p50}");
        assert!((p99 - 99_000.0).abs() <= 99.0, "{p99}");
        let mut st = OpStats::new();
        st.add(&h, 1000, 0.5);
        st.add(&h, 1000, 0.5);
        assert_eq!(st.hist.len(), 2000);
        assert_eq!(st.ops_per_s(), 2000.0);
        // A clock that did not move, and an operation past the top, are both counted.
        let mut h = histogram();
        h.saturating_record(0);
        h.saturating_record(u64::MAX);
        assert_eq!(h.len(), 2);
        assert_eq!(h.value_at_quantile(0.0), 0);
        assert!(h.value_at_quantile(1.0) >= 10_000_000_000);
        assert_eq!(OpStats::new().ops_per_s(), 0.0);
    }
}
