// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-tmem wire format. Compiled into `shared-proto` and, by path, into the guest driver:
//! keep it free of dependencies, `unsafe` and crate-level attributes.

use core::mem::{offset_of, size_of};

/// Experimental virtio device id (unassigned by the virtio TC; see docs/virtio-tmem.md).
pub const VIRTIO_ID_TMEM: u32 = 63;

/// Log2 of the only page size the protocol supports.
pub const PAGE_SHIFT: u32 = 12;
/// The only page size the protocol supports (4 KiB).
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;

/// Index of the control queue. Request queues follow it: 1..=num_request_queues.
pub const CONTROL_QUEUE: u16 = 0;

/// Most request queues a device may offer.
pub const MAX_REQUEST_QUEUES: u16 = 16;

/// Most entries in one `BATCH` request.
pub const MAX_BATCH: u32 = 256;

/// Feature bits (device-specific bits 0..=23).
pub mod feature {
    /// The device offers more than one request queue (`num_request_queues` is valid).
    pub const MQ: u32 = 0;
    /// The device supports shared pools (`POOL_F_SHARED`).
    pub const SHARED_POOLS: u32 = 1;
    /// The device accepts `BATCH` requests.
    pub const BATCH: u32 = 2;
    /// The device may ask the driver to shrink through `shrink_target_pages`.
    pub const SHRINK: u32 = 3;
    /// The driver's pools outlive the VMM's connection to the device (a reconnect keeps them),
    /// and the driver sends `RESET` when it starts, to drop what an earlier boot left.
    pub const SESSION: u32 = 4;
}

/// Request operations (`ReqHeader::op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Op {
    /// Create a pool (control queue). Payload: [`CreatePool`]. Result in `RespHeader::value`.
    CreatePool = 1,
    /// Destroy a pool and everything in it (control queue).
    DestroyPool = 2,
    /// Store one page (request queue). Payload: the page.
    Put = 3,
    /// Load one page (request queue). Device-writable: the page, then the response.
    Get = 4,
    /// Drop one page.
    FlushPage = 5,
    /// Drop every page of one object.
    FlushObject = 6,
    /// Several `FlushPage`/`FlushObject` requests in one chain. Payload: `count` [`BatchEntry`].
    Batch = 7,
    /// Drop every pool of this driver (control queue): sent at probe with `SESSION`, before
    /// the first CREATE_POOL. `RespHeader::value`: the number of pools dropped.
    Reset = 8,
}

impl Op {
    /// Decodes a wire value; `None` for an operation this protocol version does not know.
    pub const fn from_u32(v: u32) -> Option<Op> {
        Some(match v {
            1 => Op::CreatePool,
            2 => Op::DestroyPool,
            3 => Op::Put,
            4 => Op::Get,
            5 => Op::FlushPage,
            6 => Op::FlushObject,
            7 => Op::Batch,
            8 => Op::Reset,
            _ => return None,
        })
    }

    /// Whether the operation belongs on the control queue (otherwise on a request queue).
    pub const fn is_control(self) -> bool {
        matches!(self, Op::CreatePool | Op::DestroyPool | Op::Reset)
    }
}

/// Request flags (`ReqHeader::flags`).
pub mod req_flags {
    /// CREATE_POOL: persistent pool (pages kept until flushed). Without it: ephemeral.
    pub const POOL_PERSISTENT: u32 = 1 << 0;
    /// CREATE_POOL: shared pool, named by `CreatePool::uuid`.
    pub const POOL_SHARED: u32 = 1 << 1;
    /// GET: drop the host copy on a hit (always done for private ephemeral pools).
    pub const GET_EXCLUSIVE: u32 = 1 << 2;
    /// Every flag this version defines; a request with any other bit set is INVALID.
    pub const ALL: u32 = POOL_PERSISTENT | POOL_SHARED | GET_EXCLUSIVE;
}

/// Response flags (`RespHeader::flags`).
pub mod resp_flags {
    /// GET hit: the host no longer holds the page (it was an exclusive get).
    pub const DROPPED: u32 = 1 << 0;
}

/// Response status codes (`RespHeader::status`, and the per-entry statuses of `BATCH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// GET/FLUSH: no such page (a legal outcome for ephemeral pools).
    Miss = 1,
    /// PUT: no room within the host's limits; the page is not stored (nor any older copy).
    NoSpace = 2,
    /// PUT: refused by policy (incompressible ephemeral page, frozen client); nothing stored.
    Refused = 3,
    /// Malformed request: chain layout, sizes, flags or reserved fields.
    Invalid = 4,
    /// The pool id does not name a pool of this client.
    BadPool = 5,
    /// Unknown operation, or an operation on the wrong queue.
    Unsupported = 6,
    /// Shared pool not authorized for this client.
    Denied = 7,
    /// CREATE_POOL: the client has `max_pools` pools already.
    TooManyPools = 8,
    /// The device failed internally (e.g. a stored page failed to decompress).
    IoError = 9,
}

impl Status {
    /// Decodes a wire value; unknown values map to `None`.
    pub const fn from_u32(v: u32) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::Miss,
            2 => Status::NoSpace,
            3 => Status::Refused,
            4 => Status::Invalid,
            5 => Status::BadPool,
            6 => Status::Unsupported,
            7 => Status::Denied,
            8 => Status::TooManyPools,
            9 => Status::IoError,
            _ => return None,
        })
    }
}

/// A 192-bit object id: an inode number and generation, an export handle, or a swap type.
pub type Oid = [u64; 3];

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Device configuration space (`virtio_tmem_config`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Config {
    /// Number of request queues (queues 1..=n). At least 1.
    pub num_request_queues: u16,
    /// Most pools the driver may have at once.
    pub max_pools: u16,
    /// Log2 of the page size: always [`PAGE_SHIFT`].
    pub page_shift: u8,
    /// Reserved, zero.
    pub reserved: u8,
    /// Most entries in one BATCH request.
    pub max_batch: u16,
    /// Pages the host allows this driver at most (its quota, payload and metadata), 0 if unlimited.
    pub limit_pages: u64,
    /// The host asks the driver to keep at most this many pages stored; `u64::MAX`: no request.
    /// A change is signalled with a configuration change notification.
    pub shrink_target_pages: u64,
}

impl Config {
    /// Size on the wire.
    pub const SIZE: usize = 24;

    /// Encodes to little-endian bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put_u16(&mut b, 0, self.num_request_queues);
        put_u16(&mut b, 2, self.max_pools);
        b[4] = self.page_shift;
        b[5] = self.reserved;
        put_u16(&mut b, 6, self.max_batch);
        put_u64(&mut b, 8, self.limit_pages);
        put_u64(&mut b, 16, self.shrink_target_pages);
        b
    }

    /// Decodes from little-endian bytes.
    pub fn decode(b: &[u8; Self::SIZE]) -> Self {
        Config {
            num_request_queues: get_u16(b, 0),
            max_pools: get_u16(b, 2),
            page_shift: b[4],
            reserved: b[5],
            max_batch: get_u16(b, 6),
            limit_pages: get_u64(b, 8),
            shrink_target_pages: get_u64(b, 16),
        }
    }
}

/// Request header (`virtio_tmem_req`): the first bytes of every request's device-readable part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ReqHeader {
    /// An [`Op`] value.
    pub op: u32,
    /// [`req_flags`] bits.
    pub flags: u32,
    /// Pool id from CREATE_POOL (ignored by CREATE_POOL and BATCH).
    pub pool_id: u32,
    /// BATCH: number of entries; zero for every other operation.
    pub count: u32,
    /// Object id.
    pub oid: Oid,
    /// Page index within the object.
    pub index: u64,
}

impl ReqHeader {
    /// Size on the wire.
    pub const SIZE: usize = 48;

    /// Encodes to little-endian bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put_u32(&mut b, 0, self.op);
        put_u32(&mut b, 4, self.flags);
        put_u32(&mut b, 8, self.pool_id);
        put_u32(&mut b, 12, self.count);
        put_u64(&mut b, 16, self.oid[0]);
        put_u64(&mut b, 24, self.oid[1]);
        put_u64(&mut b, 32, self.oid[2]);
        put_u64(&mut b, 40, self.index);
        b
    }

    /// Decodes from little-endian bytes.
    pub fn decode(b: &[u8; Self::SIZE]) -> Self {
        ReqHeader {
            op: get_u32(b, 0),
            flags: get_u32(b, 4),
            pool_id: get_u32(b, 8),
            count: get_u32(b, 12),
            oid: [get_u64(b, 16), get_u64(b, 24), get_u64(b, 32)],
            index: get_u64(b, 40),
        }
    }
}

/// CREATE_POOL payload (`virtio_tmem_create_pool`), after the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct CreatePool {
    /// Shared pools: the pool's name. Private pools: zero.
    pub uuid: [u8; 16],
    /// Page size in bytes: must be [`PAGE_SIZE`].
    pub page_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl CreatePool {
    /// Size on the wire.
    pub const SIZE: usize = 24;

    /// Encodes to little-endian bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..16].copy_from_slice(&self.uuid);
        put_u32(&mut b, 16, self.page_size);
        put_u32(&mut b, 20, self.reserved);
        b
    }

    /// Decodes from little-endian bytes.
    pub fn decode(b: &[u8; Self::SIZE]) -> Self {
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[..16]);
        CreatePool {
            uuid,
            page_size: get_u32(b, 16),
            reserved: get_u32(b, 20),
        }
    }
}

/// One entry of a BATCH request (`virtio_tmem_batch_entry`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BatchEntry {
    /// [`Op::FlushPage`] or [`Op::FlushObject`].
    pub op: u32,
    /// Pool id.
    pub pool_id: u32,
    /// Object id.
    pub oid: Oid,
    /// Page index (FLUSH_PAGE only).
    pub index: u64,
}

impl BatchEntry {
    /// Size on the wire.
    pub const SIZE: usize = 40;

    /// Encodes to little-endian bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put_u32(&mut b, 0, self.op);
        put_u32(&mut b, 4, self.pool_id);
        put_u64(&mut b, 8, self.oid[0]);
        put_u64(&mut b, 16, self.oid[1]);
        put_u64(&mut b, 24, self.oid[2]);
        put_u64(&mut b, 32, self.index);
        b
    }

    /// Decodes from little-endian bytes.
    pub fn decode(b: &[u8; Self::SIZE]) -> Self {
        BatchEntry {
            op: get_u32(b, 0),
            pool_id: get_u32(b, 4),
            oid: [get_u64(b, 8), get_u64(b, 16), get_u64(b, 24)],
            index: get_u64(b, 32),
        }
    }
}

/// Response (`virtio_tmem_resp`): the first bytes of the device-writable part after any page
/// (GET) and before any per-entry statuses (BATCH).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RespHeader {
    /// A [`Status`] value.
    pub status: u32,
    /// [`resp_flags`] bits.
    pub flags: u32,
    /// CREATE_POOL: the new pool id. BATCH: entries that returned OK. RESET: pools dropped.
    /// Otherwise zero.
    pub value: u64,
}

impl RespHeader {
    /// Size on the wire.
    pub const SIZE: usize = 16;

    /// A response with `status` and nothing else.
    pub const fn status(status: Status) -> Self {
        RespHeader {
            status: status as u32,
            flags: 0,
            value: 0,
        }
    }

    /// Encodes to little-endian bytes.
    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put_u32(&mut b, 0, self.status);
        put_u32(&mut b, 4, self.flags);
        put_u64(&mut b, 8, self.value);
        b
    }

    /// Decodes from little-endian bytes.
    pub fn decode(b: &[u8; Self::SIZE]) -> Self {
        RespHeader {
            status: get_u32(b, 0),
            flags: get_u32(b, 4),
            value: get_u64(b, 8),
        }
    }
}

/// Bytes the device reads for a request: header, then the op's payload.
pub const fn readable_len(op: Op, count: u32) -> usize {
    ReqHeader::SIZE
        + match op {
            Op::CreatePool => CreatePool::SIZE,
            Op::Put => PAGE_SIZE,
            Op::Batch => count as usize * BatchEntry::SIZE,
            Op::DestroyPool | Op::Get | Op::FlushPage | Op::FlushObject | Op::Reset => 0,
        }
}

/// Bytes the device writes for a request: the page (GET), the response, per-entry statuses (BATCH).
pub const fn writable_len(op: Op, count: u32) -> usize {
    RespHeader::SIZE
        + match op {
            Op::Get => PAGE_SIZE,
            Op::Batch => count as usize,
            _ => 0,
        }
}

// The layouts are part of the ABI: fail the build if a field moves.
const _: () = {
    assert!(size_of::<Config>() == Config::SIZE);
    assert!(offset_of!(Config, max_pools) == 2);
    assert!(offset_of!(Config, page_shift) == 4);
    assert!(offset_of!(Config, max_batch) == 6);
    assert!(offset_of!(Config, limit_pages) == 8);
    assert!(offset_of!(Config, shrink_target_pages) == 16);
    assert!(size_of::<ReqHeader>() == ReqHeader::SIZE);
    assert!(offset_of!(ReqHeader, flags) == 4);
    assert!(offset_of!(ReqHeader, pool_id) == 8);
    assert!(offset_of!(ReqHeader, count) == 12);
    assert!(offset_of!(ReqHeader, oid) == 16);
    assert!(offset_of!(ReqHeader, index) == 40);
    assert!(size_of::<CreatePool>() == CreatePool::SIZE);
    assert!(offset_of!(CreatePool, page_size) == 16);
    assert!(offset_of!(CreatePool, reserved) == 20);
    assert!(size_of::<BatchEntry>() == BatchEntry::SIZE);
    assert!(offset_of!(BatchEntry, pool_id) == 4);
    assert!(offset_of!(BatchEntry, oid) == 8);
    assert!(offset_of!(BatchEntry, index) == 32);
    assert!(size_of::<RespHeader>() == RespHeader::SIZE);
    assert!(offset_of!(RespHeader, flags) == 4);
    assert!(offset_of!(RespHeader, value) == 8);
    assert!(PAGE_SIZE == 4096);
};
