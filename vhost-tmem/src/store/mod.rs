// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The tmem store: clients, pools, objects and pages, independent of any transport.
//!
//! The vhost-user glue talks to the store only through the [`Tmem`] trait, so the store can be
//! tested and benchmarked in-process and replaced without touching the device code.

mod arena;
mod budget;
pub mod codec;
mod counters;
mod engine;
mod hash;
mod layout;
pub mod page;
mod runs;
mod session;
mod slot;
mod snapshot;
pub mod state;
pub mod stats;

use shared_proto::{Oid, Status, PAGE_SIZE};

use codec::Compressor;
pub use engine::{Client, ClientConfig, ClientRemoval, Engine, EngineConfig, IncompressiblePolicy};
pub use page::{PageDst, PageSrc};
pub use session::{Ended, Reaped};
pub use slot::Payload;
pub use snapshot::{RestoreError, DAEMON_VERSION};

// The defaults of the engine's and the clients' settings, here once for the engine, the
// configuration file and the command line.

/// Global memory limit in bytes.
pub const DEFAULT_MEMORY_LIMIT: u64 = 1 << 30;
/// Compressor of clients that do not choose their own.
pub const DEFAULT_COMPRESSOR: Compressor = Compressor::Lz4;
/// Compressed size from which a page counts as incompressible (seven eighths of a page).
pub const DEFAULT_RAW_THRESHOLD: usize = PAGE_SIZE * 7 / 8;
/// Pools per client.
pub const DEFAULT_MAX_POOLS: usize = 16;
/// A client's eviction weight.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The largest eviction weight (weights are relative; the smallest is 1).
pub const MAX_WEIGHT: u32 = 10_000;
/// How long pools kept for a reconnect wait for their driver before they are freed.
pub const DEFAULT_ORPHAN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// The smallest memory limit: one page plus the metadata that stores it.
pub const MIN_MEMORY_LIMIT: u64 = 2 * PAGE_SIZE as u64;

/// Checks an eviction weight, wherever it comes from (command line, file, control socket).
pub fn check_weight(weight: u32) -> Result<u32> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(weight)
    } else {
        Err(Error::BadWeight(weight))
    }
}

/// Checks a global memory limit, wherever it comes from (command line, file, control socket).
pub fn check_memory_limit(bytes: u64) -> Result<u64> {
    if bytes >= MIN_MEMORY_LIMIT {
        Ok(bytes)
    } else {
        Err(Error::LimitTooSmall(bytes))
    }
}

/// A pool id as the guest sees it (per client).
pub type PoolId = u32;

/// A shared pool's 128-bit name.
pub type Uuid = [u8; 16];

/// Formats a UUID in the usual 8-4-4-4-12 form.
pub fn format_uuid(u: &Uuid) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses a UUID written as 32 hex digits, with or without the dashes.
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 || s.len() - hex.len() > 4 {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let txt = std::str::from_utf8(pair).ok()?;
        u[i] = u8::from_str_radix(txt, 16).ok()?;
    }
    Some(u)
}

/// Errors of store operations; each maps to a wire status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pool id names no pool of this client.
    #[error("no pool with id {0}")]
    BadPool(PoolId),
    /// GET/FLUSH of a page the store does not hold.
    #[error("page not found")]
    Miss,
    /// No room within the global limit or the client's quota.
    #[error("no room left within the memory limit or the client's quota")]
    NoSpace,
    /// Refused by policy (frozen client, incompressible ephemeral page).
    #[error("put refused: {0}")]
    Refused(&'static str),
    /// Shared pool the client is not authorized for.
    #[error("client is not authorized for shared pool {}", format_uuid(.0))]
    Denied(Uuid),
    /// The client has its maximum number of pools.
    #[error("client has the maximum number of pools ({0})")]
    TooManyPools(usize),
    /// Pool flags this store does not accept.
    #[error("invalid pool: {0}")]
    InvalidPool(&'static str),
    /// A stored page failed to decompress.
    #[error(transparent)]
    Codec(#[from] codec::Error),
    /// An eviction weight out of range (a host setting, not a guest request).
    #[error("invalid weight {0}: must be 1..={MAX_WEIGHT}")]
    BadWeight(u32),
    /// A memory limit too small to store a page (a host setting, not a guest request).
    #[error("memory limit must be at least one page plus metadata ({MIN_MEMORY_LIMIT} bytes), got {0} bytes")]
    LimitTooSmall(u64),
}

impl Error {
    /// The wire status for this error.
    pub fn status(&self) -> Status {
        match self {
            Error::BadPool(_) => Status::BadPool,
            Error::Miss => Status::Miss,
            Error::NoSpace => Status::NoSpace,
            Error::Refused(_) => Status::Refused,
            Error::Denied(_) => Status::Denied,
            Error::TooManyPools(_) => Status::TooManyPools,
            Error::InvalidPool(_) => Status::Invalid,
            Error::Codec(_) => Status::IoError,
            Error::BadWeight(_) | Error::LimitTooSmall(_) => Status::Invalid,
        }
    }
}

/// Result of store operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Names one page: the pool, the object in it and the page's index in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub pool: PoolId,
    pub oid: Oid,
    pub index: u64,
}

/// What a pool is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    /// Persistent (kept until flushed) or ephemeral (may be dropped at any time).
    pub persistent: bool,
    /// Shared pools are named by a UUID; `None` for a private pool.
    pub shared: Option<Uuid>,
}

/// Outcome of a GET hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GetHit {
    /// The store dropped its copy (exclusive get).
    pub dropped: bool,
}

/// The tmem operations, as the device glue uses them.
///
/// Every method is called concurrently from several worker threads. `page` and `out` may point
/// straight into guest memory that the guest writes concurrently: implementations access them
/// only through [`PageSrc`]/[`PageDst`] (never as Rust references), read `page` once where they
/// can and write `out` once. In-process callers pass their own buffers (`&[u8]`, `&Vec<u8>`,
/// `&mut [u8]`, ... of one page) and get them converted.
pub trait Tmem: Send + Sync + 'static {
    /// A connected client.
    type Client: Send + Sync + Clone + 'static;
    /// Per-worker-thread state (compressor contexts, scratch buffers), reused for every page.
    type Worker: Send;

    /// Builds the state one worker thread reuses for every request.
    fn new_worker(&self) -> Result<Self::Worker>;

    /// Creates a pool, or joins a shared one; returns the client's id for it.
    fn create_pool(&self, client: &Self::Client, spec: PoolSpec) -> Result<PoolId>;

    /// Destroys a private pool with its pages, or leaves a shared one.
    fn destroy_pool(&self, client: &Self::Client, pool: PoolId) -> Result<()>;

    /// Stores one page. On any error no copy of the key remains (an older one is dropped too).
    fn put<'p>(
        &self,
        worker: &mut Self::Worker,
        client: &Self::Client,
        key: &PageKey,
        page: impl Into<PageSrc<'p>>,
    ) -> Result<()>;

    /// Loads one page into `out`. Private ephemeral pools always drop their copy on a hit;
    /// other pools when `exclusive` is set.
    fn get<'p>(
        &self,
        worker: &mut Self::Worker,
        client: &Self::Client,
        key: &PageKey,
        out: impl Into<PageDst<'p>>,
        exclusive: bool,
    ) -> Result<GetHit>;

    /// Drops one page; `Err(Miss)` if it was not there.
    fn flush_page(&self, client: &Self::Client, key: &PageKey) -> Result<()>;

    /// Drops every page of an object; returns how many there were.
    fn flush_object(&self, client: &Self::Client, pool: PoolId, oid: &Oid) -> Result<u64>;

    /// The pages the client's driver is allowed (its quota), advertised in config space; 0 when
    /// only the global limit applies.
    fn limit_pages(&self, client: &Self::Client) -> u64;

    /// The shrink request advertised to the client's driver, in pages (`u64::MAX`: none).
    fn shrink_target(&self, client: &Self::Client) -> u64;

    /// `RESET` from the client's driver: free its private pools and leave its shared ones;
    /// returns what went.
    fn reset_client(&self, client: &Self::Client) -> ClientRemoval;

    /// The client's driver set its features, with or without `SESSION` (whether its pools
    /// outlive the connection). Its pools are claimed again if they were kept for a
    /// reconnect; a driver without `SESSION` after one with it drops them (returned).
    fn driver_features(&self, client: &Self::Client, session: bool) -> ClientRemoval;

    /// Writes the client's state for a live migration (docs/state-format.md, a one-client
    /// stream): its pools with their counters, and the pages of its persistent pools (of its
    /// ephemeral pools too if `ephemeral`; otherwise those arrive empty). Its queues are
    /// stopped meanwhile.
    fn save_state(
        &self,
        client: &Self::Client,
        w: &mut dyn std::io::Write,
        ephemeral: bool,
    ) -> std::io::Result<state::Tally>;

    /// Loads a stream [`Tmem::save_state`] wrote into the client, which holds no pools:
    /// all or nothing, within the client's quota and the memory limit.
    fn load_state(
        &self,
        client: &Self::Client,
        r: &mut dyn std::io::Read,
    ) -> std::result::Result<state::Tally, RestoreError>;

    /// The client's saved state was read whole by its frontend: its pools go when the
    /// connection ends, unless its driver starts again first (the migration failed).
    fn migrated_out(&self, client: &Self::Client);

    /// The state [`Tmem::load_state`] loaded was confirmed by the frontend: the same driver
    /// runs on here, though it may not have set its features yet (QEMU starts the device when
    /// the guest resumes). Its pools outlive the connection until then, whatever the features.
    fn migrated_in(&self, client: &Self::Client);
}

/// Helpers shared by the store's tests.
#[cfg(test)]
pub(crate) mod testutil {
    use shared_proto::PAGE_SIZE;

    /// An incompressible page: xorshift bytes from `x`.
    pub fn random_page(mut x: u64) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip() {
        let u = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0, 1, 2, 3, 4, 5, 6, 0xff,
        ];
        let s = format_uuid(&u);
        assert_eq!(s, "12345678-9abc-def0-0001-0203040506ff");
        assert_eq!(parse_uuid(&s), Some(u));
        assert_eq!(parse_uuid(&s.replace('-', "")), Some(u));
        assert_eq!(parse_uuid("1234"), None);
        assert_eq!(parse_uuid(&s.replace('f', "g")), None);
    }

    #[test]
    fn setting_ranges() {
        assert_eq!(check_weight(1).unwrap(), 1);
        assert_eq!(check_weight(MAX_WEIGHT).unwrap(), MAX_WEIGHT);
        for w in [0, MAX_WEIGHT + 1] {
            let e = check_weight(w).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("invalid weight {w}: must be 1..=10000")
            );
        }
        assert_eq!(check_memory_limit(8192).unwrap(), 8192);
        let e = check_memory_limit(8191).unwrap_err();
        assert!(
            e.to_string().contains("at least one page plus metadata"),
            "{e}"
        );
        assert_eq!(e.status(), Status::Invalid);
    }
}
