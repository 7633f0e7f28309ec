// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the control interface reports: the snapshot of every client, pool and shared pool
//! (JSON on the control socket, text for Prometheus), gathered from the engine.

use std::sync::atomic::Ordering::Relaxed;

use serde::Serialize;

use super::engine::Engine;
use super::format_uuid;
use super::layout::Pool;

pub use super::counters::CounterSnapshot;

/// One pool in a snapshot.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PoolStats {
    pub id: u32,
    pub kind: String,
    pub shared: Option<String>,
    pub compressor: String,
    #[serde(flatten)]
    pub counters: CounterSnapshot,
}

/// One client in a snapshot. Its counters are its own requests; its gauges cover its private
/// pools (shared pools are listed under `shared_pools`; the pages a client puts there are
/// charged to it and included in `charged_bytes`).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ClientStats {
    pub name: String,
    pub connected: bool,
    /// Unix time (seconds) since which it holds pools kept for a reconnect that no driver has
    /// claimed (freed after the orphan timeout); `None` when it is not orphaned.
    #[serde(default)]
    pub orphaned_since: Option<u64>,
    pub frozen: bool,
    pub weight: u32,
    pub quota_bytes: u64,
    /// Everything charged to the client, what its quota and persistent share bound: its
    /// private pools and the pages it put in shared pools.
    #[serde(default)]
    pub charged_bytes: u64,
    pub compressor: String,
    #[serde(flatten)]
    pub counters: CounterSnapshot,
    pub pools: Vec<PoolStats>,
}

/// A shared pool in a snapshot.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct SharedPoolStats {
    pub uuid: String,
    pub members: u64,
    #[serde(flatten)]
    pub counters: CounterSnapshot,
}

/// The whole store.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct StoreStats {
    pub memory_limit_bytes: u64,
    pub memory_used_bytes: u64,
    /// Memory charged per stored page besides its payload (maps, slots, LRU records),
    /// averaged over the pages stored now.
    pub metadata_bytes_per_page: f64,
    pub clients: Vec<ClientStats>,
    pub shared_pools: Vec<SharedPoolStats>,
}

impl Engine {
    /// A snapshot of every counter.
    pub fn stats(&self) -> StoreStats {
        let clients = self.clients.read().clone();
        let mut out = Vec::new();
        let (mut pages, mut meta) = (0u64, 0u64);
        for c in clients {
            let pools = c.pools.read().clone();
            let mut counters = c.counters.snapshot();
            counters.evictions = c.account.evictions.load(Relaxed);
            let pools = pools
                .iter()
                .enumerate()
                .filter_map(|(id, p)| p.as_ref().map(|p| (id, p)))
                .map(|(id, p)| {
                    let (k, payload) = pool_snapshot(p);
                    if p.shared.is_none() {
                        // The client's gauges cover its private pools.
                        counters.add_gauges(&k);
                        pages += k.stored_pages;
                        meta += k.memory_used - payload;
                    }
                    PoolStats {
                        id: id as u32,
                        kind: if p.persistent {
                            "persistent"
                        } else {
                            "ephemeral"
                        }
                        .into(),
                        shared: p.shared.as_ref().map(format_uuid),
                        compressor: p.compressor.to_string(),
                        counters: k,
                    }
                })
                .collect();
            out.push(ClientStats {
                name: c.name.clone(),
                connected: c.connected.load(Relaxed),
                orphaned_since: c.orphaned_since().map(unix_seconds),
                frozen: c.frozen.load(Relaxed),
                weight: c.account.weight.load(Relaxed),
                quota_bytes: c.account.quota.load(Relaxed),
                charged_bytes: c.account.used.load(Relaxed),
                compressor: c.compressor.to_string(),
                counters,
                pools,
            });
        }
        let shared_pools = self
            .shared
            .lock()
            .iter()
            .filter_map(|(u, w)| w.upgrade().map(|p| (*u, p)))
            .map(|(u, p)| {
                let (k, payload) = pool_snapshot(&p);
                pages += k.stored_pages;
                meta += k.memory_used - payload;
                SharedPoolStats {
                    uuid: format_uuid(&u),
                    members: p.members.load(Relaxed),
                    counters: k,
                }
            })
            .collect();
        StoreStats {
            memory_limit_bytes: self.budget.limit(),
            memory_used_bytes: self.budget.used(),
            metadata_bytes_per_page: if pages == 0 {
                0.0
            } else {
                (meta as f64 / pages as f64 * 10.0).round() / 10.0
            },
            clients: out,
            shared_pools,
        }
    }
}

/// Seconds since the Unix epoch (0 for a time before it).
pub fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The pool's counters, and the payload part of its memory use.
pub(super) fn pool_snapshot(pool: &Pool) -> (CounterSnapshot, u64) {
    let mut k = pool.counters.snapshot();
    let mut payload = 0;
    for s in pool.shards.iter() {
        let sh = s.lock();
        payload += sh.payload_charged;
        k.add_requests(&sh.counts);
        k.add_gauges(&sh.counts);
    }
    (k, payload)
}
