// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A client's pools and pages written into the state format ([`state`](super::state)) and
//! restored into a client of this engine: what the daemon's state file (restart and upgrade)
//! is made of, and what moving one client over a stream (live migration) builds on.
//!
//! Saving reads each shard under its lock and writes its runs as stored: nothing is decoded,
//! recompressed or copied besides the frame being built. Restoring inserts each page as a put
//! would, charged to the client's quota, weight share and the memory limit, but evicts
//! nothing: state that does not fit is refused, and a refused restore is undone whole, so the
//! client holds nothing of it.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::counters::CounterSnapshot;
use super::engine::Insert;
use super::layout::{shared_bits_at, Pool, RUN_PAGES};
use super::slot::{Payload, Slot};
use super::state::{self, ClientRecord, Item, PoolRecord, Scope, StateReader, StateWriter, Tally};
use super::stats::pool_snapshot;
use super::{format_uuid, Client, Engine, Error, PageKey, PoolId, PoolSpec};

/// The version of the daemon writing a stream.
pub const DAEMON_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a client's state was not restored. Nothing of it is left in the engine then.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Format(#[from] state::Error),
    #[error("client \"{client}\" holds pools already: state is restored only into a client that holds none")]
    NotEmpty { client: String },
    #[error("client \"{client}\", pool {pool}: {source}")]
    Pool {
        client: String,
        pool: PoolId,
        #[source]
        source: Error,
    },
    #[error(
        "client \"{client}\" does not fit: {pages} of its pages restored ({charged} bytes charged), \
         the next one (pool {pool}) finds no room within the memory limit, its quota or (without \
         a quota) its weight's share of the limit"
    )]
    NoRoom {
        client: String,
        pool: PoolId,
        pages: u64,
        charged: u64,
    },
    #[error("client \"{client}\", pool {pool}, object {oid:x?} index {index}: {source}")]
    Page {
        client: String,
        pool: PoolId,
        oid: shared_proto::Oid,
        index: u64,
        #[source]
        source: Error,
    },
    #[error("a one-client stream was expected, this one holds a daemon's state")]
    Scope,
}

/// A sink that keeps what is written until [`Spool::drain`], which the saver calls between
/// shards only: a slow reader (a VMM's pipe) then never blocks the store while the saver holds
/// a shard's lock, which other clients' requests and eviction may wait for. It holds at most
/// one shard's pages of the client at a time.
struct Spool<W> {
    buf: Vec<u8>,
    out: W,
}

impl<W: Write> Spool<W> {
    fn new(out: W) -> Self {
        Spool {
            buf: Vec::new(),
            out,
        }
    }

    fn drain(&mut self) -> io::Result<()> {
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

impl<W: Write> Write for Spool<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Pools whose counters are added once the restore has succeeded.
type Pending = Vec<(Arc<Pool>, CounterSnapshot)>;

impl Engine {
    /// Writes `client`'s section: its request counters, each pool (id, kind, shared UUID,
    /// counters) and the pages it holds there, in shared pools the pages it put; the pages of
    /// ephemeral pools only if `ephemeral` (else those pools are restored empty). The caller
    /// makes sure nothing changes the client meanwhile (its queues are stopped). `unlocked`
    /// is called with the sink after each shard, when no store lock is held.
    pub fn save_client<W: Write>(
        &self,
        client: &Client,
        w: &mut StateWriter<W>,
        ephemeral: bool,
        unlocked: &mut dyn FnMut(&mut W) -> io::Result<()>,
    ) -> io::Result<Tally> {
        let mut counters = client.counters.snapshot();
        counters.evictions = client.account.evictions.load(Relaxed);
        w.begin_client(&client.name, &counters)?;
        let pools: Vec<(PoolId, Arc<Pool>)> = client
            .pools
            .read()
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.clone().map(|p| (i as PoolId, p)))
            .collect();
        let me = client.account.id;
        for (id, pool) in pools {
            let (counters, _) = pool_snapshot(&pool);
            w.pool(&PoolRecord {
                id,
                persistent: pool.persistent,
                shared: pool.shared,
                counters,
            })?;
            if !pool.persistent && !ephemeral {
                continue;
            }
            for shard in pool.shards.iter() {
                let g = shard.lock();
                for (key, run) in g.runs.iter() {
                    let mask = if pool.shared.is_some() {
                        shared_bits_at(&g, &key, Some(me))
                    } else {
                        run.present()
                    };
                    if mask == 0 {
                        continue;
                    }
                    w.begin_run(id, &key.oid, key.run, mask)?;
                    for bit in 0..RUN_PAGES as u32 {
                        if mask & (1 << bit) != 0 {
                            w.page(run.get(bit).expect("in the mask").payload());
                        }
                    }
                }
                drop(g);
                unlocked(w.get_mut())?;
            }
        }
        w.end_client()
    }

    /// Restores a client's section into `client`, which must hold no pools; `rec` is the
    /// section's first record, as [`StateReader::next_client`] returned it. Its pools get the
    /// ids of the section (the guest asks for them by those), its pages are charged to it as
    /// puts would be, but nothing is evicted: if they do not fit, or the section is malformed,
    /// everything restored so far is freed again and the error says why. The caller reads the
    /// rest of the stream; if that fails, [`Engine::discard_client`] undoes this.
    pub fn restore_client<R: Read>(
        &self,
        client: &Arc<Client>,
        rec: &ClientRecord,
        r: &mut StateReader<R>,
    ) -> Result<Tally, RestoreError> {
        let (t, pending) = self.restore_section(client, r)?;
        self.apply_counters(client, rec, pending);
        // Restored pools wait for their driver as after a reconnect: a driver with SESSION
        // claims them, one without drops them, and nobody within the orphan timeout frees them.
        self.keep_orphaned(client);
        Ok(t)
    }

    /// Frees every pool and page `client` holds (a restore the caller gives up on).
    pub fn discard_client(&self, client: &Arc<Client>) {
        self.free_client(client);
        client.clear_restored();
    }

    /// Writes a one-client stream of `client` (live migration); returns the writer.
    pub fn save_client_stream<W: Write>(
        &self,
        client: &Client,
        w: W,
        ephemeral: bool,
    ) -> io::Result<(W, Tally)> {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut sw = StateWriter::new(Spool::new(w), Scope::Client, DAEMON_VERSION, created, 1)?;
        self.save_client(client, &mut sw, ephemeral, &mut Spool::drain)?;
        let (mut spool, t) = sw.finish()?;
        spool.drain()?;
        Ok((spool.out, t))
    }

    /// Restores a one-client stream into `client` (which holds no pools), whatever name the
    /// stream gives it; all or nothing.
    pub fn restore_client_stream<R: Read>(
        &self,
        client: &Arc<Client>,
        r: R,
    ) -> Result<Tally, RestoreError> {
        let mut sr = StateReader::new(r)?;
        if sr.header().scope != Scope::Client {
            return Err(RestoreError::Scope);
        }
        let Some(rec) = sr.next_client()? else {
            // The header says one client; an end record right away contradicts it and is
            // refused by the reader, so this is not reached.
            return Err(RestoreError::Scope);
        };
        let (t, pending) = self.restore_section(client, &mut sr)?;
        if let Err(e) = sr.next_client() {
            self.discard_client(client);
            return Err(e.into());
        }
        self.apply_counters(client, &rec, pending);
        Ok(t)
    }

    fn apply_counters(&self, client: &Arc<Client>, rec: &ClientRecord, pending: Pending) {
        let mut c = rec.counters;
        // A client's evictions are its account's.
        client.account.evictions.fetch_add(c.evictions, Relaxed);
        c.evictions = 0;
        client.counters.add(&c);
        for (pool, k) in pending {
            pool.counters.add(&k);
        }
        client.restored.store(true, Relaxed);
    }

    /// Reads a section into `client`; on any error frees what it restored.
    fn restore_section<R: Read>(
        &self,
        client: &Arc<Client>,
        r: &mut StateReader<R>,
    ) -> Result<(Tally, Pending), RestoreError> {
        if client.pools.read().iter().any(Option::is_some) {
            return Err(RestoreError::NotEmpty {
                client: client.name.clone(),
            });
        }
        let mut pending = Vec::new();
        let result = self.read_section(client, r, &mut pending);
        match result {
            Ok(t) => Ok((t, pending)),
            Err(e) => {
                drop(pending);
                self.discard_client(client);
                Err(e)
            }
        }
    }

    fn read_section<R: Read>(
        &self,
        client: &Arc<Client>,
        r: &mut StateReader<R>,
        pending: &mut Pending,
    ) -> Result<Tally, RestoreError> {
        let name = || client.name.clone();
        let charged_before = client.account.used.load(Relaxed);
        let mut restored = 0u64;
        loop {
            match r.next_item()? {
                Item::Pool(p) => {
                    let spec = PoolSpec {
                        persistent: p.persistent,
                        shared: p.shared,
                    };
                    let pool = self.restore_pool(client, p.id, spec).map_err(|source| {
                        RestoreError::Pool {
                            client: name(),
                            pool: p.id,
                            source,
                        }
                    })?;
                    // A shared pool's counters are the pool's, written in each member's
                    // section: counted once, by the member that brings the pool back.
                    if p.shared.is_none() || pool.members.load(Relaxed) == 1 {
                        pending.push((pool, p.counters));
                    }
                    if let Some(u) = p.shared {
                        tracing::debug!(client = %client.name, uuid = %format_uuid(&u), "shared pool restored");
                    }
                }
                Item::Pages(mut pages) => {
                    let id = pages.pool();
                    let pool = client.pool(id).map_err(|source| RestoreError::Pool {
                        client: name(),
                        pool: id,
                        source,
                    })?;
                    while let Some(pg) = pages.next()? {
                        let slot = match pg.payload {
                            Payload::Same(w) => Slot::same(w),
                            Payload::Stored(enc, b) => Slot::stored(&self.budget.arena, enc, b),
                        };
                        let key = PageKey {
                            pool: id,
                            oid: pg.oid,
                            index: pg.index,
                        };
                        match self.insert(client, &pool, &key, slot, Insert::Restore) {
                            Ok(()) => restored += 1,
                            Err(Error::NoSpace) => {
                                return Err(RestoreError::NoRoom {
                                    client: name(),
                                    pool: id,
                                    pages: restored,
                                    charged: client
                                        .account
                                        .used
                                        .load(Relaxed)
                                        .saturating_sub(charged_before),
                                })
                            }
                            Err(source) => {
                                return Err(RestoreError::Page {
                                    client: name(),
                                    pool: id,
                                    oid: pg.oid,
                                    index: pg.index,
                                    source,
                                })
                            }
                        }
                    }
                }
                Item::End(t) => return Ok(t),
            }
        }
    }
}

#[cfg(test)]
mod tests;
