// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target `device`: the request path, from the rings to the store and back.
//!
//! The input is a program for a driver (decoded with `arbitrary`): well-formed requests of
//! every operation, framed in every way the protocol allows (split descriptors, indirect
//! tables, a page straddling two memory regions), mixed with hostile steps (raw descriptors,
//! avail indexes, ring addresses, stray bytes, ring restarts) and kicks, which run the device's
//! `VhostUserBackend::handle_event` as its worker thread would. The oracles:
//!
//! - memory: around each kick guest memory is snapshotted; afterwards every changed byte must
//!   lie in a device-writable descriptor of a chain the queue made available (walked
//!   independently here, indirect tables included) or in the queue's used ring;
//! - used ring: every used element names an available head and reports at most the chain's
//!   writable length;
//! - liveness: with only well-formed chains made available, a kick answers all of them;
//! - store: until the first hostile step a model of pools and pages checks every status and
//!   every page a GET returns (exactly what was last put, or a miss where one is allowed; a
//!   persistent page is never lost; a miss leaves the guest's buffer alone).

use std::collections::HashMap;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use shared_proto::{
    req_flags, resp_flags, BatchEntry, CreatePool, Op, ReqHeader, RespHeader, Status, PAGE_SIZE,
};
use vhost_tmem::store::{ClientConfig, Engine, EngineConfig, IncompressiblePolicy};
use vhost_tmem::vhu_tmem::{DeviceConfig, Migration, TmemDevice};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

type Mem = vhost_tmem::vhu_tmem::Mem;
use vhost_tmem::vhu_tmem::Vring;

/// Guest memory: two adjacent regions (a page may straddle them), nothing past `MEM_END`.
const REGION_A: usize = 0x4_0000;
const REGION_B: usize = 0x1_0000;
const MEM_END: u64 = (REGION_A + REGION_B) as u64;
/// Queue q's descriptor table, available and used rings: `ring_base(q)` + 0, 0x1000, 0x2000.
fn ring_base(q: u16) -> u64 {
    q as u64 * 0x3000
}
/// Chain slots: an indirect table, a header area (response at `RESP_OFF`) and a data page.
const SLOTS: usize = 32;
const INDIRECT: u64 = 0x6000;
const INDIRECT_STRIDE: u64 = 0x100;
const HDR: u64 = 0x8000;
const HDR_STRIDE: u64 = 0x400;
const RESP_OFF: u64 = 0x380;
const DATA: u64 = 0x1_0000;
/// A page that starts in region A and ends in region B (one chain at a time uses it).
const STRADDLE: u64 = REGION_A as u64 - 0x800;
const MAX_QUEUE: u16 = 256;
const MAX_STEPS: usize = 96;
/// Shared pool names: the client is authorized for the first only.
const UUIDS: [[u8; 16]; 2] = [[0xa5; 16], [0x5a; 16]];

#[derive(Arbitrary, Debug)]
struct Setup {
    event_idx: bool,
    /// log2 of the queue size, folded into 1..=8.
    size_log2: u8,
    /// Memory limit in pages, folded into 2..=1026.
    limit_pages: u16,
    /// Quota in pages (0: none), folded into 0..=255.
    quota_pages: u8,
    compressor: u8,
    refuse_incompressible: bool,
    max_pools: u8,
    poll: bool,
    /// Hostile steps and framing apply only when this is 3 mod 4: three programs in four
    /// stay well-formed, so that the store model checks them to the end.
    hostile: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Content {
    Zero,
    Fill(u8),
    Words(u64),
    Text(u8),
    Random(u64),
}

impl Content {
    fn bytes(self) -> Vec<u8> {
        match self {
            Content::Zero => vec![0; PAGE_SIZE],
            Content::Fill(b) => vec![b; PAGE_SIZE],
            Content::Words(w) => w.to_le_bytes().repeat(PAGE_SIZE / 8),
            Content::Text(seed) => (0..PAGE_SIZE)
                .map(|i| b"tmem pages, compressible "[(i + seed as usize) % 25] ^ (i / 512) as u8)
                .collect(),
            Content::Random(mut x) => {
                x |= 1;
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
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    CreatePool {
        persistent: bool,
        /// None: private; Some(i): shared pool `UUIDS[i % 2]`.
        shared: Option<u8>,
    },
    DestroyPool,
    Put(Content),
    Get {
        exclusive: bool,
    },
    FlushPage,
    FlushObject,
    Batch,
    Unknown(u32),
}

/// Where a page lives: one descriptor in the chain's slot, several, or across the regions.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Place {
    Slot,
    Split(u16, u16),
    Straddle,
}

/// Deviations from the protocol that the device must answer as malformed.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Hostile {
    /// A buffer length off by this much.
    Length(i8),
    /// The page or response placed at this offset past the end of guest memory.
    Outside(u32),
    /// Zero-length readable descriptors in front (too many makes the chain too long).
    Padding(u8),
    /// Readable and writable parts swapped in order.
    WritableFirst,
    /// Unknown request flags.
    Flags(u32),
    /// The CREATE_POOL payload's page size or reserved field.
    Payload(u32),
}

#[derive(Arbitrary, Debug, Clone)]
struct Req {
    kind: Kind,
    pool: u8,
    oid: u8,
    index: u8,
    place: Place,
    indirect: bool,
    /// Sent on the other queue than its operation belongs on (when 7 mod 8).
    wrong_queue: u8,
    /// BATCH entries: the first `batch_len % 5` (fixed size, so a request costs few bytes).
    batch_len: u8,
    batch: [(u8, u8, u8, u8); 4],
    hostile: Option<Hostile>,
}

#[derive(Arbitrary, Debug, Clone)]
enum Step {
    Req(Req),
    Kick(bool),
    RawDesc {
        queue: bool,
        index: u16,
        addr: u32,
        len: u32,
        flags: u16,
        next: u16,
    },
    AvailIdx {
        queue: bool,
        delta: u16,
    },
    AvailEntry {
        queue: bool,
        slot: u16,
        head: u16,
    },
    Poke {
        addr: u32,
        bytes: Vec<u8>,
    },
    Rings {
        queue: bool,
        desc: u32,
        avail: u32,
        used: u32,
    },
    Restart {
        queue: bool,
        next_avail: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct Program {
    setup: Setup,
    steps: Vec<Step>,
}

/// One descriptor as built: address, length, device-writable.
type Seg = (u64, u32, bool);

/// A page's place in the model: a private pool by id, a shared pool by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PoolRef {
    Private(u32),
    Shared([u8; 16]),
}

#[derive(Clone, Copy, Debug)]
struct PoolModel {
    persistent: bool,
    shared: Option<[u8; 16]>,
}

impl PoolModel {
    fn key(&self, id: u32) -> PoolRef {
        match self.shared {
            Some(u) => PoolRef::Shared(u),
            None => PoolRef::Private(id),
        }
    }
}

type Key = (PoolRef, [u64; 3], u64);

/// What the store may hold for a key: a hit must return one of `allowed`; a miss is a bug
/// when `must_hit`.
#[derive(Clone, Debug, Default)]
struct PageModel {
    allowed: Vec<Vec<u8>>,
    must_hit: bool,
}

#[derive(Default)]
struct Model {
    pools: HashMap<u32, PoolModel>,
    pages: HashMap<Key, PageModel>,
}

impl Model {
    fn page(&self, k: &Key) -> PageModel {
        self.pages.get(k).cloned().unwrap_or_default()
    }

    fn clear(&mut self, k: &Key) {
        self.pages.remove(k);
    }

    fn clear_object(&mut self, pool: PoolRef, oid: [u64; 3]) {
        self.pages.retain(|k, _| !(k.0 == pool && k.1 == oid));
    }

    fn drop_pool(&mut self, id: u32) {
        let Some(p) = self.pools.remove(&id) else {
            return;
        };
        let pr = p.key(id);
        // A shared pool lives on while another id of this client still names it.
        if self.pools.iter().any(|(i, q)| q.key(*i) == pr) {
            return;
        }
        self.pages.retain(|k, _| k.0 != pr);
    }
}

/// A request in flight: its descriptors, slot and what the model expects of it.
struct Pending {
    descs: Vec<u16>,
    slot: usize,
    straddle: bool,
    /// The writable part, in order.
    writable: Vec<Seg>,
    op: Option<Op>,
    raw_op: u32,
    queue_ok: bool,
    flags: u32,
    pool: u32,
    oid: [u64; 3],
    index: u64,
    content: Option<Vec<u8>>,
    batch: Vec<BatchEntry>,
    /// Built as the protocol says (else the model stops: its effect is not predictable).
    clean: bool,
}

struct QueueState {
    free: Vec<u16>,
    pending: HashMap<u16, Pending>,
    used_seen: u16,
    /// Only well-formed chains were made available since the queue was set up.
    sane: bool,
}

struct Env {
    mem: Mem,
    dev: Arc<TmemDevice<Engine>>,
    vrings: Vec<Vring>,
    size: u16,
    queues: [QueueState; 2],
    free_slots: Vec<usize>,
    straddle_busy: bool,
    model: Option<Model>,
    /// Guest memory before and after a kick.
    snapshots: (Vec<u8>, Vec<u8>),
    /// GET hits whose page the model checked.
    hits: usize,
}

/// Runs one input; panics on a finding.
pub fn run(data: &[u8]) {
    let u = Unstructured::new(data);
    if let Ok(p) = Program::arbitrary_take_rest(u) {
        run_program(p);
    }
}

/// Runs a decoded program; returns how many GET hits the model checked.
fn run_program(p: Program) -> usize {
    let mut env = Env::new(&p.setup);
    let hostile = p.setup.hostile % 4 == 3;
    for step in p.steps.into_iter().take(MAX_STEPS) {
        match step {
            Step::Req(mut r) => {
                if !hostile {
                    r.hostile = None;
                }
                env.request(r);
            }
            Step::Kick(q) => env.kick(q as u16),
            s if hostile => env.step(s),
            _ => {}
        }
    }
    // Whatever is still available gets served: the end of a program is a kick on each queue.
    env.kick(0);
    env.kick(1);
    env.hits
}

fn rd16(m: &[u8], a: u64) -> Option<u16> {
    let a = usize::try_from(a).ok()?;
    Some(u16::from_le_bytes(
        m.get(a..a.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn rd32(m: &[u8], a: u64) -> Option<u32> {
    let a = usize::try_from(a).ok()?;
    Some(u32::from_le_bytes(
        m.get(a..a.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn rd64(m: &[u8], a: u64) -> Option<u64> {
    let a = usize::try_from(a).ok()?;
    Some(u64::from_le_bytes(
        m.get(a..a.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// What an independent walk of a queue's available chains finds in a memory snapshot.
#[derive(Default)]
struct Walk {
    /// Device-writable ranges of every available chain (a superset of what the device may
    /// write: it follows the chains as virtio-queue does, only more liberally).
    writable: Vec<(u64, u64)>,
    /// Ranges the device reads to find the chains: tables and the available ring.
    structure: Vec<(u64, u64)>,
    /// The available heads with each chain's writable length.
    heads: Vec<(u16, u64)>,
}

fn walk(m: &[u8], desc: u64, avail: u64, size: u16, next_avail: u16) -> Walk {
    let mut w = Walk::default();
    let size64 = size as u64;
    w.structure.push((desc, 16 * size64));
    w.structure.push((avail, 6 + 2 * size64));
    let Some(avail_idx) = rd16(m, avail.wrapping_add(2)) else {
        return w;
    };
    let n = avail_idx.wrapping_sub(next_avail).min(size);
    for i in 0..n {
        let slot = next_avail.wrapping_add(i) % size;
        let Some(head) = rd16(m, avail.wrapping_add(4 + 2 * slot as u64)) else {
            break;
        };
        let (mut table, mut tsize, mut idx, mut indirect) = (desc, size as u32, head as u32, false);
        let mut total = 0u64;
        let mut steps = 0u32;
        while idx < tsize && steps <= 2 * tsize + 2 {
            steps += 1;
            let a = table.wrapping_add(16 * idx as u64);
            let (Some(addr), Some(len), Some(flags), Some(next)) = (
                rd64(m, a),
                rd32(m, a.wrapping_add(8)),
                rd16(m, a.wrapping_add(12)),
                rd16(m, a.wrapping_add(14)),
            ) else {
                break;
            };
            if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
                if indirect || len % 16 != 0 {
                    break;
                }
                w.structure.push((addr, len as u64));
                (table, tsize, idx, indirect) = (addr, len / 16, 0, true);
                steps = 0;
                continue;
            }
            if flags & VRING_DESC_F_WRITE as u16 != 0 {
                w.writable.push((addr, len as u64));
                total += len as u64;
            }
            if flags & VRING_DESC_F_NEXT as u16 == 0 {
                break;
            }
            idx = next as u32;
        }
        w.heads.push((head, total));
    }
    w
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 != 0 && b.1 != 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

impl Env {
    fn new(s: &Setup) -> Env {
        let compressor = match s.compressor % 4 {
            0 => "lz4",
            1 => "zstd:1",
            2 => "zstd:-3",
            _ => "none",
        };
        let engine = Arc::new(Engine::new(EngineConfig {
            memory_limit: (2 + (s.limit_pages % 1025) as u64) * PAGE_SIZE as u64,
            compressor: compressor.parse().expect("a known compressor"),
            ephemeral_incompressible: if s.refuse_incompressible {
                IncompressiblePolicy::Refuse
            } else {
                IncompressiblePolicy::Store
            },
            max_pools: 1 + (s.max_pools % 8) as usize,
            ..EngineConfig::default()
        }));
        let mut cc = ClientConfig::named("fuzz");
        cc.quota = (s.quota_pages as u64) * PAGE_SIZE as u64;
        cc.shared = vec![UUIDS[0]];
        let client = engine.add_client(cc);
        let size = 1u16 << (1 + s.size_log2 % 8);
        let dev = TmemDevice::new(
            engine,
            client,
            "fuzz",
            DeviceConfig {
                request_queues: 1,
                queue_size: MAX_QUEUE as usize,
                max_pools: 1 + (s.max_pools % 8) as u16,
                poll: std::time::Duration::from_micros(if s.poll { 2 } else { 0 }),
                allow_unsealed_memory: false,
                migration: Migration::Off,
            },
        )
        .expect("a valid device configuration");
        let dev = Arc::new(dev);
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION_A),
            (GuestAddress(REGION_A as u64), REGION_B),
        ])
        .expect("guest memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        dev.update_memory(atomic.clone())
            .expect("anonymous memory passes the check");
        dev.set_event_idx(s.event_idx);
        let vrings: Vec<Vring> = (0..2)
            .map(|_| Vring::new(atomic.clone(), MAX_QUEUE).expect("vring"))
            .collect();
        for (q, v) in vrings.iter().enumerate() {
            let b = ring_base(q as u16);
            v.set_queue_size(size);
            v.set_queue_info(b, b + 0x1000, b + 0x2000)
                .expect("ring addresses");
            v.set_queue_event_idx(s.event_idx);
            v.set_queue_ready(true);
        }
        let queue = || QueueState {
            free: (0..size).rev().collect(),
            pending: HashMap::new(),
            used_seen: 0,
            sane: true,
        };
        Env {
            mem,
            dev,
            vrings,
            size,
            queues: [queue(), queue()],
            free_slots: (0..SLOTS).rev().collect(),
            straddle_busy: false,
            model: Some(Model::default()),
            snapshots: Default::default(),
            hits: 0,
        }
    }

    /// Writes guest memory; where a hostile step moved the rings out of it, nothing happens.
    fn write(&self, addr: u64, b: &[u8]) {
        let _ = self.mem.write_slice(b, GuestAddress(addr));
    }

    /// A copy of all of guest memory (a plain copy: nothing else writes it meanwhile, as the
    /// device runs on this thread).
    fn snapshot(&self, s: &mut Vec<u8>) {
        s.clear();
        for (start, len) in [(0, REGION_A), (REGION_A, REGION_B)] {
            let vs = self
                .mem
                .get_slice(GuestAddress(start as u64), len)
                .expect("a whole region");
            // SAFETY: the slice covers `len` mapped bytes of our own anonymous mapping, which
            // stays mapped while `self.mem` lives, and no other thread writes it now.
            s.extend_from_slice(unsafe {
                std::slice::from_raw_parts(vs.ptr_guard().as_ptr(), len)
            });
        }
    }

    /// A hostile step: the model and the liveness check no longer apply to `queue` (or, for a
    /// stray write, to anything).
    fn hostile(&mut self, queue: Option<usize>) {
        self.model = None;
        match queue {
            Some(q) => self.queues[q].sane = false,
            None => self.queues.iter_mut().for_each(|q| q.sane = false),
        }
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Req(r) => self.request(r),
            Step::Kick(q) => self.kick(q as u16),
            Step::RawDesc {
                queue,
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let q = queue as u16;
                self.hostile(Some(q as usize));
                let desc = self.vrings[q as usize].get_ref().get_queue().desc_table();
                let at = desc.wrapping_add(16 * (index % MAX_QUEUE) as u64);
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&(addr as u64).to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..].copy_from_slice(&next.to_le_bytes());
                let _ = self.mem.write_slice(&d, GuestAddress(at));
            }
            Step::AvailIdx { queue, delta } => {
                let q = queue as usize;
                self.hostile(Some(q));
                let avail = self.vrings[q].get_ref().get_queue().avail_ring();
                if let Ok(idx) = self.mem.read_obj::<u16>(GuestAddress(avail + 2)) {
                    let _ = self
                        .mem
                        .write_obj(idx.wrapping_add(delta), GuestAddress(avail + 2));
                }
            }
            Step::AvailEntry { queue, slot, head } => {
                let q = queue as usize;
                self.hostile(Some(q));
                let avail = self.vrings[q].get_ref().get_queue().avail_ring();
                let at = avail + 4 + 2 * (slot % MAX_QUEUE) as u64;
                let _ = self.mem.write_obj(head, GuestAddress(at));
            }
            Step::Poke { addr, bytes } => {
                self.hostile(None);
                let addr = addr as u64 % (MEM_END + 0x100);
                let n = bytes.len().min(64);
                let _ = self.mem.write_slice(&bytes[..n], GuestAddress(addr));
            }
            Step::Rings {
                queue,
                desc,
                avail,
                used,
            } => {
                let q = queue as usize;
                self.hostile(Some(q));
                // As SET_VRING_ADDR would (the handler checks nothing but the translation).
                let fold = |a: u32| a as u64 % (MEM_END + 0x2000);
                let _ = self.vrings[q].set_queue_info(fold(desc), fold(avail), fold(used));
            }
            Step::Restart { queue, next_avail } => {
                let q = queue as usize;
                self.hostile(Some(q));
                // GET_VRING_BASE, then SET_VRING_BASE and a kick fd: what a frontend does.
                let v = &self.vrings[q];
                v.set_queue_ready(false);
                self.dev.stop_vring(q as u32).expect("stop_vring");
                v.set_queue_next_avail(next_avail);
                v.set_queue_ready(true);
            }
        }
    }

    fn pool_id(&self, sel: u8) -> u32 {
        // Mostly pools the model knows, sometimes ids that never existed.
        if let Some(m) = &self.model {
            if sel < 0xc0 && !m.pools.is_empty() {
                let mut ids: Vec<u32> = m.pools.keys().copied().collect();
                ids.sort_unstable();
                return ids[sel as usize % ids.len()];
            }
        }
        (sel % 16) as u32
    }

    fn request(&mut self, r: Req) {
        let Some(slot) = self.free_slots.pop() else {
            return;
        };
        let (op, raw_op) = match r.kind {
            Kind::CreatePool { .. } => (Some(Op::CreatePool), Op::CreatePool as u32),
            Kind::DestroyPool => (Some(Op::DestroyPool), Op::DestroyPool as u32),
            Kind::Put(_) => (Some(Op::Put), Op::Put as u32),
            Kind::Get { .. } => (Some(Op::Get), Op::Get as u32),
            Kind::FlushPage => (Some(Op::FlushPage), Op::FlushPage as u32),
            Kind::FlushObject => (Some(Op::FlushObject), Op::FlushObject as u32),
            Kind::Batch => (Some(Op::Batch), Op::Batch as u32),
            // Unknown to the protocol: a known value would need that op's buffers.
            Kind::Unknown(v) => match Op::from_u32(v) {
                Some(_) => (None, v | 0x100),
                None => (None, v),
            },
        };
        let control = op.is_some_and(Op::is_control);
        let queue = (control == (r.wrong_queue % 8 == 7)) as u16;
        let hdr_at = HDR + slot as u64 * HDR_STRIDE;
        let data_at = DATA + slot as u64 * PAGE_SIZE as u64;
        let resp_at = hdr_at + RESP_OFF;
        // Few keys, so that gets find what puts stored.
        let oid = [(r.oid & 1) as u64, ((r.oid >> 7) & 1) as u64, 0];
        let index = match r.index {
            i @ 0..=0xef => (i % 4) as u64,
            i => u64::MAX - i as u64,
        };
        let pool = self.pool_id(r.pool);
        let mut flags = match r.kind {
            Kind::CreatePool { persistent, shared } => {
                (if persistent {
                    req_flags::POOL_PERSISTENT
                } else {
                    0
                }) | (if shared.is_some() {
                    req_flags::POOL_SHARED
                } else {
                    0
                })
            }
            Kind::Get { exclusive: true } => req_flags::GET_EXCLUSIVE,
            _ => 0,
        };
        let hostile = r.hostile;
        if let Some(Hostile::Flags(f)) = hostile {
            flags |= f & !req_flags::ALL | (1 << 31);
        }
        let batch: Vec<BatchEntry> = if matches!(r.kind, Kind::Batch) {
            r.batch
                .iter()
                .take((r.batch_len % 5) as usize)
                .map(|&(op, p, o, i)| BatchEntry {
                    op: match op % 5 {
                        0 | 1 => Op::FlushPage as u32,
                        2 | 3 => Op::FlushObject as u32,
                        _ => op as u32,
                    },
                    pool_id: self.pool_id(p),
                    oid: [(o & 1) as u64, ((o >> 7) & 1) as u64, 0],
                    index: (i % 4) as u64,
                })
                .collect()
        } else {
            Vec::new()
        };
        let count = batch.len() as u32;
        let header = ReqHeader {
            op: raw_op,
            flags,
            pool_id: pool,
            count,
            oid,
            index,
        };
        let mut readable = header.encode().to_vec();
        let mut content = None;
        match r.kind {
            Kind::CreatePool { shared, .. } => {
                let mut cp = CreatePool {
                    uuid: shared.map_or([0; 16], |i| UUIDS[i as usize % 2]),
                    page_size: PAGE_SIZE as u32,
                    reserved: 0,
                };
                if let Some(Hostile::Payload(v)) = hostile {
                    cp.reserved = v | 1;
                }
                readable.extend_from_slice(&cp.encode());
            }
            Kind::Batch => batch
                .iter()
                .for_each(|e| readable.extend_from_slice(&e.encode())),
            _ => {}
        }
        self.write(hdr_at, &readable);
        let mut segs: Vec<Seg> = vec![(hdr_at, readable.len() as u32, false)];
        let mut straddle = false;
        let page_at = match r.place {
            Place::Straddle if !self.straddle_busy => {
                straddle = true;
                STRADDLE
            }
            _ => data_at,
        };
        let split = |segs: &mut Vec<Seg>, at: u64, write: bool| match r.place {
            Place::Split(a, b) => {
                let a = (a as usize % PAGE_SIZE) as u32;
                let b = (b as usize % PAGE_SIZE) as u32;
                let (lo, hi) = (a.min(b), a.max(b));
                for (s, e) in [(0, lo), (lo, hi), (hi, PAGE_SIZE as u32)] {
                    if e > s {
                        segs.push((at + s as u64, e - s, write));
                    }
                }
            }
            _ => segs.push((at, PAGE_SIZE as u32, write)),
        };
        match r.kind {
            Kind::Put(c) => {
                let page = c.bytes();
                self.write(page_at, &page);
                content = Some(page);
                split(&mut segs, page_at, false);
            }
            Kind::Get { .. } => {
                // A marker the device must leave alone on a miss.
                self.write(page_at, &[0xe7; PAGE_SIZE]);
                split(&mut segs, page_at, true);
            }
            _ => {}
        }
        let resp_len = (RespHeader::SIZE + count as usize) as u32;
        self.write(resp_at, &[0xd1; 0x80]);
        segs.push((resp_at, resp_len, true));
        let mut clean = true;
        match hostile {
            None | Some(Hostile::Flags(_)) => {}
            Some(Hostile::Length(d)) => {
                clean = false;
                let last = segs.len() - 1;
                let i = (d as u8 as usize) % segs.len();
                let i = if d == 0 { last } else { i };
                let l = segs[i].1 as i64 + if d == 0 { 1 } else { d as i64 };
                segs[i].1 = l.clamp(0, u32::MAX as i64) as u32;
            }
            Some(Hostile::Outside(off)) => {
                clean = false;
                let i = off as usize % segs.len();
                segs[i].0 = MEM_END - 8 + (off as u64 % 0x1_0000);
            }
            Some(Hostile::Padding(n)) => {
                clean = false;
                for _ in 0..(n % 20) {
                    segs.insert(0, (hdr_at, 0, false));
                }
            }
            Some(Hostile::WritableFirst) => {
                clean = false;
                segs.sort_by_key(|s| !s.2);
            }
            Some(Hostile::Payload(_)) => clean = !matches!(r.kind, Kind::CreatePool { .. }),
        }
        let q = queue as usize;
        let needed = if r.indirect { 1 } else { segs.len() };
        if self.queues[q].free.len() < needed || (r.indirect && segs.len() > 16) {
            self.free_slots.push(slot);
            return;
        }
        let descs: Vec<u16> = (0..needed)
            .map(|_| self.queues[q].free.pop().expect("checked"))
            .collect();
        let table = self.vrings[q].get_ref().get_queue().desc_table();
        let raw = |(addr, len, write): Seg, next: Option<u16>| {
            let mut d = [0u8; 16];
            let flags = if write { VRING_DESC_F_WRITE } else { 0 }
                | if next.is_some() { VRING_DESC_F_NEXT } else { 0 };
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
            d[14..].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
            d
        };
        if r.indirect {
            let t = INDIRECT + slot as u64 * INDIRECT_STRIDE;
            for (i, s) in segs.iter().enumerate() {
                let next = (i + 1 < segs.len()).then_some(i as u16 + 1);
                self.write(t + 16 * i as u64, &raw(*s, next));
            }
            let mut d = raw((t, 16 * segs.len() as u32, false), None);
            d[12..14].copy_from_slice(&(VRING_DESC_F_INDIRECT as u16).to_le_bytes());
            self.write(table + 16 * descs[0] as u64, &d);
        } else {
            for (i, s) in segs.iter().enumerate() {
                let next = descs.get(i + 1).copied();
                self.write(table + 16 * descs[i] as u64, &raw(*s, next));
            }
        }
        // Publish: the entry, then the index (the device reads them in that order).
        let avail = self.vrings[q].get_ref().get_queue().avail_ring();
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(avail.wrapping_add(2)))
            .unwrap_or(0);
        self.write(
            avail + 4 + 2 * (idx % self.size) as u64,
            &descs[0].to_le_bytes(),
        );
        self.write(avail + 2, &idx.wrapping_add(1).to_le_bytes());
        self.straddle_busy |= straddle;
        if !clean {
            // Its effect on the store is not something the model predicts (it may not reach
            // the store, or reach it and fail to answer); the memory oracle still applies.
            self.model = None;
        }
        let writable = segs.iter().copied().filter(|s| s.2).collect();
        let pending = Pending {
            descs,
            slot,
            straddle,
            writable,
            op,
            raw_op,
            queue_ok: op.is_some_and(|o| o.is_control() == (queue == 0)),
            flags,
            pool,
            oid,
            index,
            content,
            batch,
            clean,
        };
        let head = pending.descs[0];
        self.queues[q].pending.insert(head, pending);
    }

    fn kick(&mut self, queue: u16) {
        let q = queue as usize;
        let (desc, avail, used, size, next_avail) = {
            let st = self.vrings[q].get_ref();
            let qu = st.get_queue();
            (
                qu.desc_table(),
                qu.avail_ring(),
                qu.used_ring(),
                qu.size(),
                qu.next_avail(),
            )
        };
        // Reused buffers: a fresh 320 KiB allocation per kick costs more in page faults than
        // the whole kick.
        let (mut before, mut after) = std::mem::take(&mut self.snapshots);
        self.snapshot(&mut before);
        let w = walk(&before, desc, avail, size, next_avail);
        let used_len = 6 + 8 * size as u64;
        let r = self.dev.handle_event(queue, EventSet::IN, &self.vrings, 0);
        if let Err(e) = &r {
            panic!("handle_event failed on a plain kick: {e}");
        }
        self.snapshot(&mut after);

        // Memory: put back what the device may have written; the rest must be unchanged.
        let mut allowed = w.writable.clone();
        allowed.push((used, used_len));
        let aliased = allowed
            .iter()
            .any(|a| w.structure.iter().any(|s| overlaps(*a, *s)));
        if !aliased {
            // Compare the gaps between the allowed ranges (slice compares: this runs per kick).
            let mut ranges: Vec<(usize, usize)> = allowed
                .iter()
                .map(|&(a, l)| {
                    let s = a.min(MEM_END) as usize;
                    (s, a.saturating_add(l).min(MEM_END) as usize)
                })
                .collect();
            ranges.sort_unstable();
            let mut at = 0;
            for (s, e) in ranges.into_iter().chain([(after.len(), after.len())]) {
                if s > at && before[at..s] != after[at..s] {
                    let i = at
                        + (at..s)
                            .position(|i| before[i] != after[i])
                            .expect("differs");
                    panic!(
                        "queue {queue}: the device changed guest byte {i:#x} ({:#04x} -> \
                         {:#04x}), outside every writable buffer and the used ring \
                         (writable: {:x?})",
                        before[i], after[i], w.writable
                    );
                }
                at = at.max(e);
            }
        }

        // The used ring: new elements name available heads, with lengths within the chain.
        let used_idx = rd16(&after, used.wrapping_add(2));
        let qs = &mut self.queues[q];
        let Some(used_idx) = used_idx else {
            self.snapshots = (before, after);
            return;
        };
        let new = used_idx.wrapping_sub(qs.used_seen);
        let sane = qs.sane && !aliased;
        if sane {
            assert!(
                new <= size,
                "queue {queue}: used index moved by {new} with a queue of {size}"
            );
            let avail_idx = rd16(&after, avail + 2).expect("avail ring in memory");
            assert_eq!(
                used_idx, avail_idx,
                "queue {queue}: well-formed chains left unanswered after a kick"
            );
        }
        let mut elems = Vec::new();
        for i in 0..new.min(size) {
            let at = used + 4 + 8 * (qs.used_seen.wrapping_add(i) % size) as u64;
            let (Some(id), Some(len)) = (rd32(&after, at), rd32(&after, at + 4)) else {
                break;
            };
            if sane {
                let Some(&(_, total)) = w.heads.iter().find(|h| h.0 as u32 == id) else {
                    panic!("queue {queue}: used element names {id}, which was not available");
                };
                assert!(
                    len as u64 <= total,
                    "queue {queue}: used length {len} for chain {id} with {total} writable bytes"
                );
            }
            elems.push((id, len));
        }
        qs.used_seen = used_idx;
        self.snapshots = (before, after);
        for (id, len) in elems {
            let Some(p) = u16::try_from(id)
                .ok()
                .and_then(|h| self.queues[q].pending.remove(&h))
            else {
                continue;
            };
            self.queues[q].free.extend(p.descs.iter().copied());
            self.free_slots.push(p.slot);
            if p.straddle {
                self.straddle_busy = false;
            }
            self.check(&p, len);
        }
    }

    /// Reads a request's writable part back.
    fn writable(&self, p: &Pending) -> Vec<u8> {
        let mut out = Vec::new();
        for &(a, l, _) in &p.writable {
            let mut b = vec![0u8; l as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(a))
                .expect("clean chains are in memory");
            out.extend_from_slice(&b);
        }
        out
    }

    /// Checks one answered request against the model, and updates it.
    fn check(&mut self, p: &Pending, used_len: u32) {
        if !p.clean || self.model.is_none() {
            return;
        }
        let w = self.writable(p);
        let at = if p.op == Some(Op::Get) { PAGE_SIZE } else { 0 };
        let resp = RespHeader::decode(w[at..at + RespHeader::SIZE].try_into().expect("16"));
        let status = Status::from_u32(resp.status);
        let what = format!(
            "op {:#x} flags {:#x} pool {} oid {:?} index {:#x}",
            p.raw_op, p.flags, p.pool, p.oid, p.index
        );
        let failed_len = (at + RespHeader::SIZE) as u32;
        let Some(op) = p.op.filter(|_| p.queue_ok) else {
            assert_eq!(status, Some(Status::Unsupported), "{what}");
            assert_eq!(used_len, failed_len, "{what}: used length");
            return;
        };
        let allowed_flags = match op {
            Op::CreatePool => req_flags::POOL_PERSISTENT | req_flags::POOL_SHARED,
            Op::Get => req_flags::GET_EXCLUSIVE,
            _ => 0,
        };
        if p.flags & !allowed_flags != 0 {
            assert_eq!(status, Some(Status::Invalid), "{what}: unknown flags");
            assert_eq!(used_len, failed_len, "{what}: used length");
            return;
        }
        assert_eq!(
            used_len,
            failed_len + p.batch.len() as u32,
            "{what}: used length"
        );
        let model = self.model.as_mut().expect("checked");
        let pool = model.pools.get(&p.pool).copied();
        let key = pool.map(|pm| (pm.key(p.pool), p.oid, p.index));
        if pool.is_none() && !matches!(op, Op::CreatePool | Op::Batch | Op::Reset) {
            assert_eq!(
                status,
                Some(Status::BadPool),
                "{what}: a pool the model does not know"
            );
            return;
        }
        match op {
            Op::CreatePool => {
                if status == Some(Status::Ok) {
                    let id = resp.value as u32;
                    assert_eq!(resp.value, id as u64, "{what}: pool id {}", resp.value);
                    assert!(
                        !model.pools.contains_key(&id),
                        "{what}: pool id {id} handed out while in use"
                    );
                    let shared = p.flags & req_flags::POOL_SHARED != 0;
                    let mut b = [0u8; CreatePool::SIZE];
                    self.mem
                        .read_slice(&mut b, GuestAddress(p_hdr(p) + ReqHeader::SIZE as u64))
                        .expect("header slot");
                    let cp = CreatePool::decode(&b);
                    assert!(
                        !shared || cp.uuid == UUIDS[0],
                        "{what}: joined a shared pool the client is not authorized for"
                    );
                    model.pools.insert(
                        id,
                        PoolModel {
                            persistent: p.flags & req_flags::POOL_PERSISTENT != 0,
                            shared: shared.then_some(cp.uuid),
                        },
                    );
                }
            }
            Op::DestroyPool => {
                assert_eq!(status, Some(Status::Ok), "{what}: destroying a live pool");
                model.drop_pool(p.pool);
            }
            Op::Reset => {
                assert_eq!(status, Some(Status::Ok), "{what}");
                assert_eq!(
                    resp.value,
                    model.pools.len() as u64,
                    "{what}: pools dropped"
                );
                let ids: Vec<u32> = model.pools.keys().copied().collect();
                for id in ids {
                    model.drop_pool(id);
                }
            }
            Op::Put => {
                let pm = pool.expect("checked");
                let key = key.expect("checked");
                let content = p.content.clone().expect("a put has content");
                match status {
                    Some(Status::Ok) => {
                        model.pages.insert(
                            key,
                            PageModel {
                                allowed: vec![content],
                                must_hit: pm.persistent && pm.shared.is_none(),
                            },
                        );
                    }
                    Some(Status::NoSpace | Status::Refused) => {
                        if pm.shared.is_some() {
                            // A shared key keeps its first content.
                            model.pages.entry(key).or_default().must_hit = false;
                        } else {
                            model.clear(&key);
                        }
                    }
                    s => panic!("{what}: put answered {s:?}"),
                }
            }
            Op::Get => {
                let pm = pool.expect("checked");
                let key = key.expect("checked");
                let page = &w[..PAGE_SIZE];
                let known = model.page(&key);
                match status {
                    Some(Status::Ok) => {
                        assert!(
                            known.allowed.iter().any(|c| c == page),
                            "{what}: GET returned a page that is not the one last put \
                             (first bytes {:02x?}; {} candidates)",
                            &page[..16],
                            known.allowed.len()
                        );
                        self.hits += 1;
                        let dropped = resp.flags & resp_flags::DROPPED != 0;
                        let must_drop = pm.shared.is_none()
                            && (p.flags & req_flags::GET_EXCLUSIVE != 0 || !pm.persistent);
                        assert!(
                            dropped || !must_drop,
                            "{what}: an exclusive get of a private page kept it"
                        );
                        if dropped {
                            model.clear(&key);
                        }
                    }
                    Some(Status::Miss) => {
                        assert!(
                            !known.must_hit,
                            "{what}: a persistent page put successfully was lost"
                        );
                        assert!(
                            page.iter().all(|&b| b == 0xe7),
                            "{what}: a GET miss wrote into the guest's page buffer"
                        );
                        model.clear(&key);
                    }
                    s => panic!("{what}: get answered {s:?}"),
                }
            }
            Op::FlushPage => {
                let key = key.expect("checked");
                flush_page(model, &key, status, &what);
            }
            Op::FlushObject => {
                assert_eq!(status, Some(Status::Ok), "{what}");
                let pr = key.expect("checked").0;
                model.clear_object(pr, p.oid);
            }
            Op::Batch => {
                assert_eq!(status, Some(Status::Ok), "{what}");
                let statuses = &w[RespHeader::SIZE..];
                let mut ok = 0;
                for (i, e) in p.batch.iter().enumerate() {
                    let st = Status::from_u32(statuses[i] as u32);
                    let what = format!("{what}: batch entry {i} {e:?}");
                    ok += (st == Some(Status::Ok)) as u64;
                    let pool = model.pools.get(&e.pool_id).copied();
                    match (Op::from_u32(e.op), pool) {
                        (Some(Op::FlushPage | Op::FlushObject), None) => {
                            assert_eq!(st, Some(Status::BadPool), "{what}")
                        }
                        (Some(Op::FlushPage), Some(pm)) => {
                            flush_page(model, &(pm.key(e.pool_id), e.oid, e.index), st, &what)
                        }
                        (Some(Op::FlushObject), Some(pm)) => {
                            assert_eq!(st, Some(Status::Ok), "{what}");
                            model.clear_object(pm.key(e.pool_id), e.oid);
                        }
                        _ => assert_eq!(st, Some(Status::Unsupported), "{what}"),
                    }
                }
                assert_eq!(resp.value, ok, "{what}: batch count of successes");
            }
        }
    }
}

/// The header slot of a pending request (its first readable descriptor).
fn p_hdr(p: &Pending) -> u64 {
    HDR + p.slot as u64 * HDR_STRIDE
}

fn flush_page(model: &mut Model, key: &Key, status: Option<Status>, what: &str) {
    let known = model.page(key);
    match status {
        Some(Status::Ok) => assert!(
            !known.allowed.is_empty(),
            "{what}: flushed a page that was never put or was removed"
        ),
        Some(Status::Miss) => assert!(!known.must_hit, "{what}: a persistent page was lost"),
        s => panic!("{what}: flush answered {s:?}"),
    }
    model.clear(key);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: Kind, place: Place, indirect: bool) -> Step {
        Step::Req(Req {
            kind,
            pool: 0,
            oid: 0,
            index: 1,
            place,
            indirect,
            wrong_queue: 0,
            batch_len: 0,
            batch: [(0, 0, 0, 0); 4],
            hostile: None,
        })
    }

    /// The model is live: a put and gets of every framing are checked to the page (a device
    /// that returned other bytes fails here; checked by breaking `get` once by hand).
    #[test]
    fn well_formed_gets_are_checked_against_the_model() {
        let setup = Setup {
            event_idx: true,
            size_log2: 5,
            limit_pages: 200,
            quota_pages: 0,
            compressor: 0,
            refuse_incompressible: false,
            max_pools: 3,
            poll: false,
            hostile: 0,
        };
        let create = Kind::CreatePool {
            persistent: true,
            shared: None,
        };
        let get = Kind::Get { exclusive: false };
        let steps = vec![
            req(create, Place::Slot, false),
            Step::Kick(false),
            req(Kind::Put(Content::Text(3)), Place::Split(100, 3000), true),
            Step::Kick(true),
            req(get, Place::Slot, false),
            req(get, Place::Split(7, 4000), true),
            req(get, Place::Straddle, false),
            Step::Kick(true),
        ];
        assert_eq!(run_program(Program { setup, steps }), 3);
    }
}
