// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a stored page costs in memory: metadata and allocator slack (counted by the global
//! allocator), resident memory (from /proc), and stored payload beside the bare codec's output.

use shared_proto::PAGE_SIZE;
use vhost_tmem::store::codec::Compressor;
use vhost_tmem::store::{ClientConfig, PageKey, PoolSpec, Tmem};

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
    /// Bytes the allocator handed out beyond those requested, per page.
    pub slack_bytes_per_page: f64,
    /// Growth of the resident set per page.
    pub rss_bytes_per_page: f64,
    /// What the engine charges against limits per page for metadata.
    pub charged_metadata_bytes_per_page: f64,
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
    let r = (|| {
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
        Ok(Footprint {
            pages: k.stored_pages,
            payload_bytes_per_page: k.compressed_bytes as f64 / n,
            metadata_bytes_per_page: ((req1 - req0) as f64 - k.compressed_bytes as f64) / n,
            slack_bytes_per_page: ((use1 - use0) - (req1 - req0)) as f64 / n,
            rss_bytes_per_page: rss1.saturating_sub(rss0) as f64 / n,
            charged_metadata_bytes_per_page: charged,
        })
    })();
    alloc::set_counting(false);
    alloc::trim();
    r
}

/// Compression ratio of stored payload: input bytes over payload bytes.
pub fn ratio(f: &Footprint) -> f64 {
    PAGE_SIZE as f64 / f.payload_bytes_per_page.max(1e-9)
}
