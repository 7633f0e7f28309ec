// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A misbehaving virtio-tmem device for the `bad-device` scenario: the driver must survive a
//! device that answers wrongly, and only a device can answer wrongly.
//!
//! It is a small vhost-user backend, served in the runner's process, with a plain in-memory
//! store (one map per pool). It answers like the real device until the runner switches it, at
//! a barrier, to one [`Fault`]: a `GET` hit answered with a used length that leaves the page
//! out, flushes answered with an error and not carried out, a `BATCH` answered without its
//! status bytes, a used-ring entry whose id is out of range. It never creates a shared pool
//! (a host I/O error). The guest's data must stay correct (it falls back to the disk), and the
//! guest must neither crash nor hang.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use shared_proto::{
    feature, req_flags, BatchEntry, Config, CreatePool, Op, ReqHeader, RespHeader, Status,
    MAX_BATCH, PAGE_SHIFT, PAGE_SIZE,
};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;

use crate::error::{Error, Result};

type Mem = GuestMemoryMmap<()>;
type Vring = VringRwLock<GuestMemoryAtomic<Mem>>;

/// How the device misbehaves; the `bad-device` scenario's barriers are named after these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Answers like the real device.
    None,
    /// A `GET` hit writes the response but not the page, and reports 16 bytes used: a driver
    /// that does not check the length copies whatever its buffer held before.
    ShortGet,
    /// Every flush (single or `BATCH` entry) fails with `IO_ERROR` and drops nothing.
    FailFlush,
    /// A `BATCH` is carried out but answered without its status bytes.
    BatchLength,
    /// Every answer names a descriptor beyond the end of the ring.
    UsedId,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::None,
        Fault::ShortGet,
        Fault::FailFlush,
        Fault::BatchLength,
        Fault::UsedId,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::ShortGet => "short-get",
            Fault::FailFlush => "fail-flush",
            Fault::BatchLength => "batch-length",
            Fault::UsedId => "used-id",
        }
    }
}

type Key = ([u64; 3], u64);

#[derive(Default)]
struct Store {
    next_pool: u32,
    pools: HashMap<u32, HashMap<Key, Box<[u8]>>>,
}

impl Store {
    fn flush(&mut self, op: Option<Op>, pool: u32, oid: [u64; 3], index: u64) -> Status {
        let Some(p) = self.pools.get_mut(&pool) else {
            return Status::BadPool;
        };
        let found = match op {
            Some(Op::FlushPage) => p.remove(&(oid, index)).is_some(),
            Some(Op::FlushObject) => {
                let before = p.len();
                p.retain(|(o, _), _| *o != oid);
                p.len() != before
            }
            _ => return Status::Unsupported,
        };
        if found {
            Status::Ok
        } else {
            Status::Miss
        }
    }
}

/// The backend.
struct Device {
    fault: AtomicU8,
    mem: RwLock<Option<GuestMemoryAtomic<Mem>>>,
    store: Mutex<Store>,
}

impl Device {
    fn fault(&self) -> Fault {
        Fault::ALL[self.fault.load(Ordering::Acquire) as usize]
    }

    /// Serves one chain; returns the used length it reports.
    fn serve(&self, mem: &Mem, chain: DescriptorChain<&Mem>) -> io::Result<u32> {
        let fault = self.fault();
        let mut r = chain.clone().reader(mem).map_err(io::Error::other)?;
        let mut w = chain.writer(mem).map_err(io::Error::other)?;
        let mut b = [0u8; ReqHeader::SIZE];
        r.read_exact(&mut b)?;
        let hdr = ReqHeader::decode(&b);
        let op = Op::from_u32(hdr.op);
        let mut store = self.store.lock().expect("store lock");
        let mut resp = RespHeader::status(Status::Ok);
        match op {
            Some(Op::CreatePool) if hdr.flags & req_flags::POOL_SHARED != 0 => {
                // Always, whatever the fault: a shared pool fails with an error other than
                // DENIED, and the driver must fall back to a private pool.
                resp = RespHeader::status(Status::IoError);
            }
            Some(Op::CreatePool) => {
                let mut b = [0u8; CreatePool::SIZE];
                r.read_exact(&mut b)?;
                store.next_pool += 1;
                let id = store.next_pool;
                store.pools.insert(id, HashMap::new());
                resp.value = u64::from(id);
            }
            Some(Op::Reset) => {
                resp.value = store.pools.len() as u64;
                store.pools.clear();
            }
            Some(Op::DestroyPool) => {
                if store.pools.remove(&hdr.pool_id).is_none() {
                    resp = RespHeader::status(Status::BadPool);
                }
            }
            Some(Op::Put) => {
                let mut page = vec![0u8; PAGE_SIZE].into_boxed_slice();
                r.read_exact(&mut page)?;
                match store.pools.get_mut(&hdr.pool_id) {
                    Some(p) => {
                        p.insert((hdr.oid, hdr.index), page);
                    }
                    None => resp = RespHeader::status(Status::BadPool),
                }
            }
            Some(Op::Get) => {
                let exclusive = hdr.flags & req_flags::GET_EXCLUSIVE != 0;
                let key = (hdr.oid, hdr.index);
                let page = match store.pools.get_mut(&hdr.pool_id) {
                    Some(p) if exclusive && fault != Fault::ShortGet => p.remove(&key),
                    Some(p) => p.get(&key).cloned(),
                    None => {
                        resp = RespHeader::status(Status::BadPool);
                        None
                    }
                };
                match page {
                    Some(page) if fault == Fault::ShortGet => {
                        drop(page);
                        let mut at = w.split_at(PAGE_SIZE).map_err(io::Error::other)?;
                        at.write_all(&resp.encode())?;
                        return Ok(RespHeader::SIZE as u32);
                    }
                    Some(page) => w.write_all(&page)?,
                    None => {
                        if resp.status == Status::Ok as u32 {
                            resp = RespHeader::status(Status::Miss);
                        }
                        let rest = w.split_at(PAGE_SIZE).map_err(io::Error::other)?;
                        w = rest;
                    }
                }
                w.write_all(&resp.encode())?;
                return Ok((PAGE_SIZE + RespHeader::SIZE) as u32);
            }
            Some(Op::FlushPage | Op::FlushObject) => {
                resp = RespHeader::status(if fault == Fault::FailFlush {
                    Status::IoError
                } else {
                    store.flush(op, hdr.pool_id, hdr.oid, hdr.index)
                });
            }
            Some(Op::Batch) => {
                let n = (hdr.count as usize).min(MAX_BATCH as usize);
                let mut statuses = vec![0u8; n];
                for s in &mut statuses {
                    let mut b = [0u8; BatchEntry::SIZE];
                    r.read_exact(&mut b)?;
                    let e = BatchEntry::decode(&b);
                    *s = if fault == Fault::FailFlush {
                        Status::IoError
                    } else {
                        store.flush(Op::from_u32(e.op), e.pool_id, e.oid, e.index)
                    } as u8;
                }
                w.write_all(&resp.encode())?;
                if fault == Fault::BatchLength {
                    return Ok(RespHeader::SIZE as u32);
                }
                w.write_all(&statuses)?;
                return Ok((RespHeader::SIZE + n) as u32);
            }
            None => resp = RespHeader::status(Status::Unsupported),
        }
        w.write_all(&resp.encode())?;
        Ok(RespHeader::SIZE as u32)
    }

    /// Serves every chain on `vring` and signals the driver.
    fn serve_queue(&self, vring: &Vring) -> io::Result<()> {
        let Some(atomic) = self.mem.read().expect("mem lock").clone() else {
            return Ok(());
        };
        let guard: GuestMemoryLoadGuard<Mem> = atomic.memory();
        let mem: &Mem = &guard;
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        let chains: Vec<_> = q.iter(mem).map_err(io::Error::other)?.collect();
        for chain in chains {
            let head = chain.head_index();
            // A chain that does not parse gets an empty answer: the driver must cope.
            let used = self.serve(mem, chain).unwrap_or(0);
            if self.fault() == Fault::UsedId {
                // What `add_used` refuses to write: an id beyond the ring.
                let (size, next, ring) = (q.size(), q.next_used(), q.used_ring());
                let mut elem = [0u8; 8];
                elem[..4].copy_from_slice(&(u32::from(size) + 5).to_le_bytes());
                elem[4..].copy_from_slice(&used.to_le_bytes());
                let at = GuestAddress(ring + 4 + u64::from(next % size) * 8);
                mem.write_slice(&elem, at).map_err(io::Error::other)?;
                let next = next.wrapping_add(1);
                mem.write_obj(next.to_le(), GuestAddress(ring + 2))
                    .map_err(io::Error::other)?;
                q.set_next_used(next);
            } else {
                q.add_used(mem, head, used).map_err(io::Error::other)?;
            }
        }
        drop(state);
        vring.signal_used_queue()
    }
}

impl VhostUserBackend for Device {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << feature::SHARED_POOLS
            | 1 << feature::BATCH
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = Config {
            num_request_queues: 1,
            max_pools: 16,
            page_shift: PAGE_SHIFT as u8,
            reserved: 0,
            max_batch: MAX_BATCH as u16,
            limit_pages: 0,
            shrink_target_pages: u64::MAX,
        }
        .encode();
        let (start, end) = (offset as usize, offset as usize + size as usize);
        cfg.get(start..end).map(<[u8]>::to_vec).unwrap_or_default()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<Mem>) -> io::Result<()> {
        *self.mem.write().expect("mem lock") = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event"));
        }
        match vrings.get(device_event as usize) {
            Some(vring) => self.serve_queue(vring),
            None => Err(io::Error::other("unknown queue")),
        }
    }
}

/// A running bad device: the runner sets its fault at the scenario's barriers.
pub struct BadDevice {
    dev: Arc<Device>,
}

impl BadDevice {
    /// Listens on `socket` (before QEMU starts) and serves one connection in a thread of its
    /// own, which ends with the connection.
    pub fn serve(socket: &Path) -> Result<Self> {
        let dev = Arc::new(Device {
            fault: AtomicU8::new(Fault::None as u8),
            mem: RwLock::new(None),
            store: Mutex::new(Store::default()),
        });
        let mut listener =
            Listener::new(socket, true).map_err(|e| Error::BadDevice(e.to_string()))?;
        let mut daemon = VhostUserDaemon::new(
            "tmem-baddev".into(),
            dev.clone(),
            GuestMemoryAtomic::new(Mem::new()),
        )
        .map_err(|e| Error::BadDevice(e.to_string()))?;
        std::thread::spawn(move || {
            if let Err(e) = daemon.start(&mut listener).and_then(|()| daemon.wait()) {
                eprintln!("  bad-device: the device's connection ended: {e}");
            }
        });
        Ok(Self { dev })
    }

    /// Switches to the fault named `name` (a barrier of the scenario).
    pub fn set_fault(&self, name: &str) -> Result<()> {
        let fault = Fault::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| Error::BadDevice(format!("no fault named {name}")))?;
        self.dev.fault.store(fault as u8, Ordering::Release);
        eprintln!("  bad-device: the device now answers with fault {name}");
        Ok(())
    }
}
