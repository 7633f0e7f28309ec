// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a stored page costs in memory: metadata and allocator slack (counted by the global
//! allocator), resident memory (from /proc), and stored payload beside the bare codec's output.

use shared_proto::PAGE_SIZE;
use vhost_tmem::store::codec::Compressor;
use vhost_tmem::store::{ClientConfig, PoolSpec, Tmem};

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

/// Puts `pages` pages of `corpus` (cycled, distinct keys) into a fresh store and measures.
pub fn measure(
    corpus: &Corpus,
    c: Compressor,
    persistent: bool,
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
        // An object per 64 Ki pages, as a large swap area or file would use.
        for i in 0..pages {
            let oid = [1 + (i >> 16) as u64, 0, 0];
            // An ephemeral pool refuses incompressible pages; stored_pages counts the rest.
            let _ = e.put(
                &mut w,
                &client,
                pool,
                &oid,
                i as u64,
                corpus.page(i % corpus.len()),
            );
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
