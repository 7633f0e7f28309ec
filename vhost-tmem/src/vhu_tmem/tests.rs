// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device tests: requests built as descriptor chains with virtio-queue's mock split queue.

use super::*;
use crate::store::{
    ClientConfig, Engine, EngineConfig, GetHit, PageDst, PageSrc, PoolId, PoolSpec,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Bytes;

const MEM_SIZE: u64 = 0x40_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const RESP: u64 = 0x30_0000;

struct Env {
    mem: Mem,
    dev: TmemDevice<Engine>,
    engine: Arc<Engine>,
}

mod migration;

fn env_with(engine: Arc<Engine>, name: &str) -> Env {
    env_cfg(engine, name, Migration::Off)
}

fn env_cfg(engine: Arc<Engine>, name: &str, migration: Migration) -> Env {
    let client = engine
        .client(name)
        .unwrap_or_else(|| engine.add_client(ClientConfig::named(name)));
    let dev = TmemDevice::new(
        engine.clone(),
        client,
        name,
        DeviceConfig {
            request_queues: 2,
            queue_size: 256,
            max_pools: 16,
            poll: std::time::Duration::ZERO,
            allow_unsealed_memory: false,
            migration,
        },
    )
    .unwrap();
    Env {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
        dev,
        engine,
    }
}

fn env() -> Env {
    env_with(Arc::new(Engine::new(EngineConfig::default())), "guest")
}

/// A descriptor: (address, length, device-writable).
type D = (u64, u32, bool);

impl Env {
    /// Gives the device this memory and returns a ready vring of 256 entries on `vq`'s rings.
    fn vring(&self, vq: &MockSplitQueue<'_, Mem>) -> Vring {
        let atomic = GuestMemoryAtomic::new(self.mem.clone());
        self.dev.update_memory(atomic.clone()).unwrap();
        let vring = Vring::new(atomic, 256).unwrap();
        vring.set_queue_size(256);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        vring
    }

    /// Serves one chain; returns the used length.
    fn run(&self, descs: &[D], control: bool) -> u32 {
        let q = MockSplitQueue::new(&self.mem, 64);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, w)| {
                let f = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(a, l, f, 0))
            })
            .collect();
        let chain = q.build_desc_chain(&raw).unwrap();
        let mut w = self.dev.workers[0].lock();
        match Chain::parse(chain) {
            Ok(c) => self.dev.serve_chain(&self.mem, &c, control, &mut w),
            Err(_) => 0,
        }
    }

    fn write(&self, addr: u64, b: &[u8]) {
        self.mem.write_slice(b, GuestAddress(addr)).unwrap();
    }

    fn resp(&self, addr: u64) -> RespHeader {
        let mut b = [0u8; RespHeader::SIZE];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        RespHeader::decode(&b)
    }

    fn status(&self, addr: u64) -> Option<Status> {
        Status::from_u32(self.resp(addr).status)
    }

    fn header(&self, op: Op, flags: u32, pool: u32, index: u64) {
        let h = ReqHeader {
            op: op as u32,
            flags,
            pool_id: pool,
            count: 0,
            oid: [1, 2, 3],
            index,
        };
        self.write(HDR, &h.encode());
    }

    fn create_pool(&self, flags: u32, uuid: [u8; 16]) -> RespHeader {
        self.header(Op::CreatePool, flags, 0, 0);
        let cp = CreatePool {
            uuid,
            page_size: PAGE_SIZE as u32,
            reserved: 0,
        };
        self.write(HDR + 48, &cp.encode());
        self.write(RESP, &[0xff; 16]);
        assert_eq!(self.run(&[(HDR, 72, false), (RESP, 16, true)], true), 16);
        self.resp(RESP)
    }

    fn put(&self, pool: u32, index: u64, page: &[u8]) -> Option<Status> {
        self.header(Op::Put, 0, pool, index);
        self.write(DATA, page);
        self.write(RESP, &[0xff; 16]);
        self.run(
            &[(HDR, 48, false), (DATA, 4096, false), (RESP, 16, true)],
            false,
        );
        self.status(RESP)
    }

    fn get(&self, pool: u32, index: u64, flags: u32) -> (RespHeader, Vec<u8>) {
        self.header(Op::Get, flags, pool, index);
        self.write(DATA, &[0xee; PAGE_SIZE]);
        self.write(RESP, &[0xff; 16]);
        self.run(
            &[(HDR, 48, false), (DATA, 4096, true), (RESP, 16, true)],
            false,
        );
        let mut page = vec![0u8; PAGE_SIZE];
        self.mem.read_slice(&mut page, GuestAddress(DATA)).unwrap();
        (self.resp(RESP), page)
    }
}

fn page(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (i / 64) as u8 ^ seed).collect()
}

#[test]
fn create_put_get_round_trip() {
    let e = env();
    let r = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]);
    assert_eq!(Status::from_u32(r.status), Some(Status::Ok));
    let pool = r.value as u32;
    assert_eq!(e.put(pool, 9, &page(1)), Some(Status::Ok));
    let (r, got) = e.get(pool, 9, 0);
    assert_eq!(Status::from_u32(r.status), Some(Status::Ok));
    assert_eq!(r.flags & resp_flags::DROPPED, 0);
    assert_eq!(got, page(1));
    let (r, _) = e.get(pool, 9, req_flags::GET_EXCLUSIVE);
    assert_eq!(r.flags & resp_flags::DROPPED, resp_flags::DROPPED);
    let (r, got) = e.get(pool, 9, 0);
    assert_eq!(Status::from_u32(r.status), Some(Status::Miss));
    // A miss leaves the guest's page buffer alone.
    assert_eq!(got, vec![0xee; PAGE_SIZE]);
}

#[test]
fn page_split_across_descriptors_uses_bounce_buffer() {
    let e = env();
    let pool = e.create_pool(0, [0; 16]).value as u32;
    let p = page(7);
    e.header(Op::Put, 0, pool, 1);
    // Header and the first 100 page bytes in one descriptor, the rest in two more.
    e.write(HDR + 48, &p[..100]);
    e.write(DATA, &p[100..2000]);
    e.write(DATA + 0x2000, &p[2000..]);
    e.run(
        &[
            (HDR, 148, false),
            (DATA, 1900, false),
            (DATA + 0x2000, 2096, false),
            (RESP, 16, true),
        ],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Ok));
    // And back into a split buffer, response sharing the last descriptor.
    e.header(Op::Get, 0, pool, 1);
    let used = e.run(
        &[
            (HDR, 48, false),
            (DATA, 3000, true),
            (DATA + 0x2000, 1096 + 16, true),
        ],
        false,
    );
    assert_eq!(used, 4096 + 16);
    let mut got = vec![0u8; PAGE_SIZE];
    e.mem
        .read_slice(&mut got[..3000], GuestAddress(DATA))
        .unwrap();
    e.mem
        .read_slice(&mut got[3000..], GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(got, p);
    assert_eq!(e.status(DATA + 0x2000 + 1096), Some(Status::Ok));
}

#[test]
fn malformed_requests_get_statuses() {
    let e = env();
    let pool = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;

    // Header too short.
    e.write(RESP, &[0xff; 16]);
    assert_eq!(e.run(&[(HDR, 20, false), (RESP, 16, true)], false), 16);
    assert_eq!(e.status(RESP), Some(Status::Invalid));

    // Unknown operation.
    let mut h = ReqHeader {
        op: 99,
        ..ReqHeader::default()
    };
    e.write(HDR, &h.encode());
    e.run(&[(HDR, 48, false), (RESP, 16, true)], false);
    assert_eq!(e.status(RESP), Some(Status::Unsupported));

    // Control operation on a request queue, page operation on the control queue.
    h.op = Op::DestroyPool as u32;
    e.write(HDR, &h.encode());
    e.run(&[(HDR, 48, false), (RESP, 16, true)], false);
    assert_eq!(e.status(RESP), Some(Status::Unsupported));
    e.header(Op::FlushPage, 0, pool, 0);
    e.run(&[(HDR, 48, false), (RESP, 16, true)], true);
    assert_eq!(e.status(RESP), Some(Status::Unsupported));

    // PUT with a short page.
    e.header(Op::Put, 0, pool, 0);
    e.run(
        &[(HDR, 48, false), (DATA, 4000, false), (RESP, 16, true)],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    // PUT whose page is device-writable (wrong direction).
    e.run(
        &[(HDR, 48, false), (DATA, 4096, true), (RESP, 16, true)],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    // GET with a page buffer the device may not write: wrong sizes.
    e.header(Op::Get, 0, pool, 0);
    e.run(
        &[(HDR, 48, false), (DATA, 4096, false), (RESP, 16, true)],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    // GET with too large a buffer.
    e.write(DATA + 4096, &[0xff; 16]);
    e.run(&[(HDR, 48, false), (DATA, 4096 + 64, true)], false);
    assert_eq!(e.status(DATA + 4096), Some(Status::Invalid));

    // Unknown flags.
    e.header(Op::Get, 1 << 20, pool, 0);
    e.run(
        &[(HDR, 48, false), (DATA, 4096, true), (RESP, 16, true)],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    // Nonzero count on a non-batch request.
    e.write(
        HDR,
        &ReqHeader {
            op: Op::FlushPage as u32,
            count: 3,
            ..ReqHeader::default()
        }
        .encode(),
    );
    e.run(&[(HDR, 48, false), (RESP, 16, true)], false);
    assert_eq!(e.status(RESP), Some(Status::Invalid));

    // Bad pool ids.
    for bad in [pool + 1, 16, u32::MAX] {
        assert_eq!(e.put(bad, 0, &page(0)), Some(Status::BadPool));
        assert_eq!(
            Status::from_u32(e.get(bad, 0, 0).0.status),
            Some(Status::BadPool)
        );
    }

    // CREATE_POOL with a bad page size, reserved bits, a UUID on a private pool.
    for cp in [
        CreatePool {
            uuid: [0; 16],
            page_size: 8192,
            reserved: 0,
        },
        CreatePool {
            uuid: [0; 16],
            page_size: 4096,
            reserved: 1,
        },
        CreatePool {
            uuid: [1; 16],
            page_size: 4096,
            reserved: 0,
        },
    ] {
        e.header(Op::CreatePool, 0, 0, 0);
        e.write(HDR + 48, &cp.encode());
        e.run(&[(HDR, 72, false), (RESP, 16, true)], true);
        assert_eq!(e.status(RESP), Some(Status::Invalid));
    }
    // Unauthorized shared pool; shared + persistent.
    assert_eq!(
        Status::from_u32(e.create_pool(req_flags::POOL_SHARED, [5; 16]).status),
        Some(Status::Denied)
    );

    // Nothing was stored by any of this.
    assert_eq!(e.engine.stats().clients[0].counters.stored_pages, 0);
}

/// Chains served through the queue, more than one burst of them and a malformed one among
/// them: every chain is returned to the used ring once, in order, with its own length and
/// status, and the ring's state is consistent afterwards.
#[test]
fn bursts_serve_every_chain_in_order() {
    let e = env();
    let pool = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
    let n = BURST as u64 + 9;
    let vq = MockSplitQueue::create(&e.mem, GuestAddress(0), 256);
    let mut descs = Vec::new();
    let hdr = |i: u64| HDR + i * 64;
    let data = |i: u64| DATA + i * 4096;
    let resp = |i: u64| RESP + i * 32;
    // Request i puts page i, except: every 10th is a get of the page put just before it, and
    // request 7 has a readable descriptor after a writable one.
    for i in 0..n {
        let (h, d, r) = (hdr(i), data(i), resp(i));
        let (op, index) = if i % 10 == 9 {
            (Op::Get, i - 1)
        } else {
            (Op::Put, i)
        };
        let head = ReqHeader {
            op: op as u32,
            flags: 0,
            pool_id: pool,
            count: 0,
            oid: [1, 2, 3],
            index,
        };
        e.write(h, &head.encode());
        e.write(r, &[0xff; 16]);
        let mut chain = if op == Op::Put {
            e.write(d, &page(i as u8));
            [(h, 48, 0), (d, 4096, 0), (r, 16, VRING_DESC_F_WRITE)]
        } else {
            [
                (h, 48, 0),
                (d, 4096, VRING_DESC_F_WRITE),
                (r, 16, VRING_DESC_F_WRITE),
            ]
        };
        if i == 7 {
            chain[1].2 = VRING_DESC_F_WRITE;
            chain[2].2 = 0;
        }
        for (k, &(addr, len, flags)) in chain.iter().enumerate() {
            let more = if k < 2 { VRING_DESC_F_NEXT } else { 0 };
            let next = descs.len() as u16 + 1;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                (flags | more) as u16,
                next,
            )));
        }
    }
    vq.add_desc_chains(&descs, 0).unwrap();

    let vring = e.vring(&vq);
    let mut w = e.dev.workers[0].lock();
    assert_eq!(
        e.dev.process_queue(&vring, 1, false, &mut w).unwrap(),
        Pass::Served
    );
    assert_eq!(
        e.dev.process_queue(&vring, 1, false, &mut w).unwrap(),
        Pass::Empty
    );
    drop(w);

    assert_eq!(vring.queue_used_idx().unwrap(), n as u16);
    for i in 0..n {
        let elem = vq.used().ring().ref_at(i as usize).unwrap().load();
        let (id, len) = (elem.id(), elem.len());
        assert_eq!(id, 3 * i as u32, "used element {i} names the wrong chain");
        let (d, r) = (data(i), resp(i));
        if i == 7 {
            assert_eq!(len, 0, "the malformed chain is returned unused");
        } else if i % 10 == 9 {
            assert_eq!(len, 4096 + 16);
            assert_eq!(e.status(r), Some(Status::Ok), "get {i}");
            let mut got = vec![0u8; 4096];
            e.mem.read_slice(&mut got, GuestAddress(d)).unwrap();
            assert_eq!(got, page((i - 1) as u8), "get {i} returned other bytes");
        } else {
            assert_eq!(len, 16);
            assert_eq!(e.status(r), Some(Status::Ok), "put {i}");
        }
    }
}

/// Chains the worker does not read straight from the descriptor table still go through
/// virtio-queue: a put through an indirect table, and every chain when the table (walked by
/// virtio-queue from each chain's position), the available ring or the used ring (the rings
/// then go through virtio-queue too) lies across two memory regions. The get after the put
/// returns its page.
#[test]
fn chains_off_the_direct_table_path_are_served_too() {
    // (where the queue starts, where a second region starts): a 256-entry queue at 0x800 has
    // its table at 0x800-0x1800 and its used ring at 0x1a08-0x220e; at 0xff0, its available
    // ring at 0x1ff0-0x21f6.
    for (base, split) in [
        (0x800, None),
        (0x800, Some(0x1000)),
        (0xff0, Some(0x2000)),
        (0x800, Some(0x2000)),
    ] {
        let mut e = env();
        if let Some(at) = split {
            e.mem = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), at),
                (GuestAddress(at as u64), MEM_SIZE as usize - at),
            ])
            .unwrap();
        }
        let pool = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
        let vq = MockSplitQueue::create(&e.mem, GuestAddress(base), 256);
        let header = |op: Op| ReqHeader {
            op: op as u32,
            flags: 0,
            pool_id: pool,
            count: 0,
            oid: [1, 2, 3],
            index: 5,
        };
        let (put_hdr, get_hdr) = (HDR, HDR + 64);
        let (put_data, get_data) = (DATA, DATA + 4096);
        let (put_resp, get_resp) = (RESP, RESP + 32);
        e.write(put_hdr, &header(Op::Put).encode());
        e.write(get_hdr, &header(Op::Get).encode());
        e.write(put_data, &page(42));
        e.write(put_resp, &[0xff; 16]);
        e.write(get_resp, &[0xff; 16]);
        let (n, w) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let desc = |a, l, f, next| RawDescriptor::from(SplitDescriptor::new(a, l, f, next));
        // Chain 0, the put: one indirect descriptor naming a table of three.
        let indirect = MEM_SIZE - 0x1000;
        for (i, d) in [
            desc(put_hdr, 48, n, 1),
            desc(put_data, 4096, n, 2),
            desc(put_resp, 16, w, 0),
        ]
        .into_iter()
        .enumerate()
        {
            e.mem
                .write_obj(d, GuestAddress(indirect + 16 * i as u64))
                .unwrap();
        }
        let table = vq.desc_table();
        table
            .store(0, desc(indirect, 48, VRING_DESC_F_INDIRECT as u16, 0))
            .unwrap();
        // Chain 1, the get: three descriptors in the table.
        table.store(1, desc(get_hdr, 48, n, 2)).unwrap();
        table.store(2, desc(get_data, 4096, w | n, 3)).unwrap();
        table.store(3, desc(get_resp, 16, w, 0)).unwrap();
        for (slot, head) in [0u16, 1].into_iter().enumerate() {
            vq.avail().ring().ref_at(slot).unwrap().store(head);
        }
        vq.avail().idx().store(2);

        let vring = e.vring(&vq);
        let mut wk = e.dev.workers[0].lock();
        assert_eq!(
            e.dev.process_queue(&vring, 1, false, &mut wk).unwrap(),
            Pass::Served,
            "split: {split:?}"
        );
        drop(wk);
        assert_eq!(vring.queue_used_idx().unwrap(), 2);
        let used = |i: usize| {
            let elem = vq.used().ring().ref_at(i).unwrap().load();
            (elem.id(), elem.len())
        };
        assert_eq!(used(0), (0, 16), "the indirect put, split: {split:?}");
        assert_eq!(used(1), (1, 4096 + 16), "the get, split: {split:?}");
        assert_eq!(e.status(put_resp), Some(Status::Ok));
        assert_eq!(e.status(get_resp), Some(Status::Ok));
        let mut got = vec![0u8; 4096];
        e.mem.read_slice(&mut got, GuestAddress(get_data)).unwrap();
        assert_eq!(got, page(42), "split: {split:?}");
    }
}

#[test]
fn chains_without_room_for_a_status_are_dropped() {
    let e = env();
    // No writable part at all.
    e.header(Op::FlushPage, 0, 0, 0);
    assert_eq!(e.run(&[(HDR, 48, false)], false), 0);
    // Writable part smaller than a response.
    assert_eq!(e.run(&[(HDR, 48, false), (RESP, 8, true)], false), 0);
    // Readable descriptor after a writable one.
    assert_eq!(
        e.run(
            &[(HDR, 48, false), (RESP, 16, true), (DATA, 16, false)],
            false
        ),
        0
    );
    // Too many descriptors.
    let long: Vec<D> = (0..MAX_SEGMENTS as u64 + 1)
        .map(|i| (HDR + i * 4, 4, false))
        .collect();
    assert_eq!(e.run(&long, false), 0);
}

#[test]
fn addresses_outside_guest_memory() {
    let e = env();
    let pool = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
    // Header outside memory.
    e.write(RESP, &[0xff; 16]);
    e.run(&[(MEM_SIZE + 0x1000, 48, false), (RESP, 16, true)], false);
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    // Page straddling the end of memory.
    e.header(Op::Put, 0, pool, 0);
    e.run(
        &[
            (HDR, 48, false),
            (MEM_SIZE - 100, 4096, false),
            (RESP, 16, true),
        ],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    // Response outside memory: nothing to write, chain returned with length 0.
    e.header(Op::FlushPage, 0, pool, 0);
    assert_eq!(
        e.run(&[(HDR, 48, false), (u64::MAX - 8, 16, true)], false),
        0
    );
    // GET into a page buffer outside memory after a real hit: error status, and the page
    // must still be retrievable afterwards (a non-exclusive get).
    assert_eq!(e.put(pool, 3, &page(3)), Some(Status::Ok));
    e.header(Op::Get, 0, pool, 3);
    e.run(
        &[
            (HDR, 48, false),
            (MEM_SIZE - 10, 4096, true),
            (RESP, 16, true),
        ],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    assert_eq!(e.get(pool, 3, 0).1, page(3));
    // Address arithmetic overflow in a descriptor: header, page, and a page whose start only
    // overflows once the header's offset is added.
    e.run(&[(u64::MAX - 4, 48, false), (RESP, 16, true)], false);
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    e.header(Op::Put, 0, pool, 0);
    e.run(
        &[
            (HDR, 48, false),
            (u64::MAX - 10, 4096, false),
            (RESP, 16, true),
        ],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    e.write(HDR + 48, &[0u8; 8]);
    e.run(
        &[(u64::MAX - 20, 48 + 4096, false), (RESP, 16, true)],
        false,
    );
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    e.header(Op::Get, 0, pool, 3);
    e.run(&[(HDR, 48, false), (u64::MAX - 10, 4096 + 16, true)], false);
}

#[test]
fn batch_flushes() {
    let e = env();
    let pool = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
    for i in 0..4 {
        assert_eq!(e.put(pool, i, &page(i as u8)), Some(Status::Ok));
    }
    let entries = [
        BatchEntry {
            op: Op::FlushPage as u32,
            pool_id: pool,
            oid: [1, 2, 3],
            index: 0,
        },
        BatchEntry {
            op: Op::FlushPage as u32,
            pool_id: pool,
            oid: [1, 2, 3],
            index: 0,
        },
        BatchEntry {
            op: Op::Put as u32,
            pool_id: pool,
            oid: [1, 2, 3],
            index: 1,
        },
        BatchEntry {
            op: Op::FlushObject as u32,
            pool_id: pool,
            oid: [1, 2, 3],
            index: 0,
        },
        BatchEntry {
            op: Op::FlushPage as u32,
            pool_id: 77,
            oid: [1, 2, 3],
            index: 0,
        },
    ];
    e.write(
        HDR,
        &ReqHeader {
            op: Op::Batch as u32,
            count: 5,
            ..ReqHeader::default()
        }
        .encode(),
    );
    for (i, en) in entries.iter().enumerate() {
        e.write(HDR + 48 + 40 * i as u64, &en.encode());
    }
    let used = e.run(&[(HDR, 48 + 200, false), (RESP, 16 + 5, true)], false);
    assert_eq!(used, 21);
    let r = e.resp(RESP);
    assert_eq!((r.status, r.value), (0, 2));
    let mut st = [0u8; 5];
    e.mem.read_slice(&mut st, GuestAddress(RESP + 16)).unwrap();
    assert_eq!(
        st,
        [
            Status::Ok,
            Status::Miss,
            Status::Unsupported,
            Status::Ok,
            Status::BadPool
        ]
        .map(|s| s as u8)
    );
    assert_eq!(e.engine.stats().clients[0].counters.stored_pages, 0);
    // Too many entries.
    e.write(
        HDR,
        &ReqHeader {
            op: Op::Batch as u32,
            count: MAX_BATCH + 1,
            ..ReqHeader::default()
        }
        .encode(),
    );
    e.run(&[(HDR, 48, false), (RESP, 16, true)], false);
    assert_eq!(e.status(RESP), Some(Status::Invalid));
}

#[test]
fn clients_cannot_reach_each_other() {
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    let a = env_with(engine.clone(), "a");
    let b = env_with(engine, "b");
    let pa = a.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
    assert_eq!(a.put(pa, 1, &page(1)), Some(Status::Ok));
    // b has no pool with that id.
    assert_eq!(
        Status::from_u32(b.get(pa, 1, 0).0.status),
        Some(Status::BadPool)
    );
    // b's own pool with the same id and key is a different pool.
    let pb = b.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
    assert_eq!(pb, pa);
    assert_eq!(
        Status::from_u32(b.get(pb, 1, 0).0.status),
        Some(Status::Miss)
    );
    assert_eq!(a.get(pa, 1, 0).1, page(1));
}

#[test]
fn reset_and_session_features() {
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    let e = env_with(engine.clone(), "guest");
    assert_ne!(e.dev.features() & (1 << feature::SESSION), 0);
    e.dev.acked_features(1 << feature::SESSION);
    let pool = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
    assert_eq!(e.put(pool, 1, &page(1)), Some(Status::Ok));
    // The connection ends and a new device (the reconnect) serves the kept pool.
    let client = engine.client("guest").unwrap();
    assert!(matches!(
        engine.connection_ended(&client),
        crate::store::Ended::Kept { pools: 1, .. }
    ));
    drop(e);
    let e = env_with(engine.clone(), "guest");
    e.dev.acked_features(1 << feature::SESSION);
    assert_eq!(client.orphaned_since(), None);
    assert_eq!(e.get(pool, 1, 0).1, page(1));
    // RESET: header only, on the control queue; the value counts the pools dropped.
    e.header(Op::Reset, 0, 0, 0);
    e.write(RESP, &[0xff; 16]);
    assert_eq!(e.run(&[(HDR, 48, false), (RESP, 16, true)], true), 16);
    assert_eq!((e.status(RESP), e.resp(RESP).value), (Some(Status::Ok), 1));
    assert_eq!(
        Status::from_u32(e.get(pool, 1, 0).0.status),
        Some(Status::BadPool)
    );
    // On a request queue, with a payload or with flags: refused.
    e.header(Op::Reset, 0, 0, 0);
    e.write(RESP, &[0xff; 16]);
    e.run(&[(HDR, 48, false), (RESP, 16, true)], false);
    assert_eq!(e.status(RESP), Some(Status::Unsupported));
    e.run(&[(HDR, 72, false), (RESP, 16, true)], true);
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    e.header(Op::Reset, req_flags::POOL_PERSISTENT, 0, 0);
    e.run(&[(HDR, 48, false), (RESP, 16, true)], true);
    assert_eq!(e.status(RESP), Some(Status::Invalid));
    // A driver without SESSION after one with it: the pools kept for the session go.
    let pool = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
    assert_eq!(e.put(pool, 1, &page(2)), Some(Status::Ok));
    e.dev.acked_features(0);
    assert_eq!(
        Status::from_u32(e.get(pool, 1, 0).0.status),
        Some(Status::BadPool)
    );
    assert_eq!(engine.memory_used(), 0);
}

#[test]
fn config_space_and_features() {
    let e = env();
    let cfg = e.dev.get_config(0, Config::SIZE as u32);
    let c = Config::decode(cfg.as_slice().try_into().unwrap());
    assert_eq!(
        (c.num_request_queues, c.page_shift, c.max_pools),
        (2, 12, 16)
    );
    assert_eq!(c.shrink_target_pages, u64::MAX);
    // No quota: no limit advertised.
    assert_eq!(c.limit_pages, 0);
    e.engine.client("guest").unwrap().set_shrink_target(1000);
    assert_eq!(e.dev.get_config(16, 8), 1000u64.to_le_bytes());
    assert!(e.dev.get_config(20, 8).is_empty());
    assert!(e.dev.get_config(u32::MAX, 8).is_empty());
    assert_ne!(e.dev.features() & (1 << feature::MQ), 0);
    assert_eq!(e.dev.num_queues(), 3);
    assert_eq!(e.dev.queues_per_thread(), vec![0b11, 0b100]);
    // (thread, event) -> device queue: thread 0 has queues 0 and 1, thread 1 has queue 2.
    assert_eq!(e.dev.queue_of(0, 0), Some(0));
    assert_eq!(e.dev.queue_of(0, 1), Some(1));
    assert_eq!(e.dev.queue_of(1, 0), Some(2));
    assert_eq!(e.dev.queue_of(1, 1), None);
    assert_eq!(e.dev.queue_of(2, 0), None);
}

#[test]
fn config_space_advertises_the_quota_in_pages() {
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    engine.add_client(ClientConfig {
        quota: 64 << 20,
        ..ClientConfig::named("q")
    });
    let e = env_with(engine, "q");
    let limit = |e: &Env| u64::from_le_bytes(e.dev.get_config(8, 8).try_into().unwrap());
    assert_eq!(limit(&e), (64 << 20) / PAGE_SIZE as u64);
    // The control interface changes the quota while the driver runs: config space follows.
    let client = e.engine.client("q").unwrap();
    e.engine.set_quota(&client, 10 * PAGE_SIZE as u64 + 100);
    assert_eq!(limit(&e), 10);
    // A quota below a page is still a limit, never "unlimited".
    e.engine.set_quota(&client, 100);
    assert_eq!(limit(&e), 1);
    e.engine.set_quota(&client, 0);
    assert_eq!(limit(&e), 0);
}

#[test]
fn log_limiter_bounds_lines() {
    let l = LogLimiter::default();
    let allowed = (0..1000).filter(|_| l.allow().is_some()).count();
    assert!(allowed <= 2 * LogLimiter::PER_SECOND as usize, "{allowed}");
}

#[test]
fn bad_device_config_is_rejected() {
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    let c = engine.add_client(ClientConfig::named("x"));
    for (q, s) in [(0, 256), (17, 256), (1, 0), (1, 100), (1, 4096)] {
        let r = TmemDevice::<_, ()>::new(
            engine.clone(),
            c.clone(),
            "x",
            DeviceConfig {
                request_queues: q,
                queue_size: s,
                max_pools: 16,
                poll: std::time::Duration::ZERO,
                allow_unsealed_memory: false,
                migration: Migration::Off,
            },
        );
        assert!(r.is_err(), "{q} {s}");
    }
}

#[test]
fn migration_needs_a_device_with_a_dirty_log() {
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    let c = engine.add_client(ClientConfig::named("x"));
    let cfg = |migration| DeviceConfig {
        request_queues: 1,
        queue_size: 256,
        max_pools: 16,
        poll: std::time::Duration::ZERO,
        allow_unsealed_memory: false,
        migration,
    };
    for m in [Migration::Persistent, Migration::All] {
        let r = TmemDevice::<_, ()>::new(engine.clone(), c.clone(), "x", cfg(m));
        assert!(matches!(r, Err(Error::NoDirtyLog(_))), "{m:?}");
        assert!(TmemDevice::<_, DirtyLog>::new(engine.clone(), c.clone(), "x", cfg(m)).is_ok());
    }
    let plain = TmemDevice::<_, ()>::new(engine.clone(), c.clone(), "x", cfg(Migration::Off));
    let proto = plain.unwrap().protocol_features();
    assert!(!proto.contains(VhostUserProtocolFeatures::LOG_SHMFD));
}

/// A device whose request queue 1 is a real vring of `QSIZE` entries laid out at guest address
/// 0 (by a `MockSplitQueue`), with EVENT_IDX, as a vhost-user frontend would set it up.
/// `vrings` are thread 0's: the (unused) control queue and queue 1. The test plays the driver
/// by writing the rings directly, hostile values included.
struct RingEnv<S: Tmem = Engine> {
    mem: Mem,
    dev: Arc<TmemDevice<S>>,
    vrings: Vec<Vring>,
    /// Descriptor table, available and used ring addresses.
    desc: u64,
    avail: u64,
    used: u64,
}

const QSIZE: u16 = 256;

impl RingEnv {
    fn new() -> RingEnv {
        let Env { mem, dev, .. } = env();
        RingEnv::with_device(mem, dev)
    }
}

impl<S: Tmem> RingEnv<S> {
    fn with_device(mem: Mem, dev: TmemDevice<S>) -> RingEnv<S> {
        let dev = Arc::new(dev);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        dev.update_memory(atomic.clone()).unwrap();
        dev.set_event_idx(true);
        let vrings: Vec<Vring> = (0..2)
            .map(|_| Vring::new(atomic.clone(), QSIZE).unwrap())
            .collect();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
        let (desc, avail, used) = (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
        let v = &vrings[1];
        v.set_queue_size(QSIZE);
        v.set_queue_info(desc, avail, used).unwrap();
        v.set_queue_event_idx(true);
        v.set_queue_ready(true);
        RingEnv {
            mem,
            dev,
            vrings,
            desc,
            avail,
            used,
        }
    }

    fn set_rings(&self, desc: u64, avail: u64, used: u64) {
        self.vrings[1].set_queue_info(desc, avail, used).unwrap();
    }

    fn avail_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap())
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(u16::to_le(idx), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Writes `head` into the next available entry and publishes it, without any check.
    fn publish_head(&self, head: u16) {
        let idx = self.avail_idx();
        let entry = self.avail + 4 + 2 * (idx % QSIZE) as u64;
        self.mem
            .write_obj(u16::to_le(head), GuestAddress(entry))
            .unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Publishes a one-request chain at descriptors `desc` and `desc + 1` (an unknown op: the
    /// device answers UNSUPPORTED in 16 bytes, so a served chain is easy to see).
    fn publish(&self, desc: u16) {
        let h = ReqHeader {
            op: 0xdead,
            ..ReqHeader::default()
        };
        self.mem
            .write_slice(&h.encode(), GuestAddress(HDR))
            .unwrap();
        self.publish_chain(desc);
    }

    /// Publishes the chain of [`RingEnv::publish`] without writing its request header.
    fn publish_chain(&self, desc: u16) {
        let descs = [
            SplitDescriptor::new(HDR, 48, VRING_DESC_F_NEXT as u16, desc + 1),
            SplitDescriptor::new(RESP, 16, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            let at = self.desc + 16 * (desc as u64 + i as u64);
            self.mem
                .write_obj(RawDescriptor::from(d), GuestAddress(at))
                .unwrap();
        }
        self.publish_head(desc);
    }

    /// Publishes the request of [`RingEnv::publish`] as descriptor `desc`, an indirect one
    /// naming a table of two (the header, then a 16-byte response at `resp`).
    fn publish_indirect(&self, desc: u16, resp: u64) {
        let indirect = MEM_SIZE - 0x1000;
        let descs = [
            SplitDescriptor::new(HDR, 48, VRING_DESC_F_NEXT as u16, 1),
            SplitDescriptor::new(resp, 16, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            self.mem
                .write_obj(
                    RawDescriptor::from(d),
                    GuestAddress(indirect + 16 * i as u64),
                )
                .unwrap();
        }
        let d = SplitDescriptor::new(indirect, 32, VRING_DESC_F_INDIRECT as u16, 0);
        self.mem
            .write_obj(
                RawDescriptor::from(d),
                GuestAddress(self.desc + 16 * desc as u64),
            )
            .unwrap();
        self.publish_head(desc);
    }

    /// Gives the device a call eventfd for queue 1 and returns it, to count notifications.
    fn call_eventfd(&self) -> vmm_sys_util::eventfd::EventFd {
        use std::os::fd::FromRawFd;
        let call =
            vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        // SAFETY: dup returns a fresh descriptor (checked), owned by nobody else.
        let fd = unsafe { libc::dup(call.as_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: see above.
        self.vrings[1].set_call(Some(unsafe { std::fs::File::from_raw_fd(fd) }));
        call
    }

    fn used_idx(&self) -> u16 {
        self.vrings[1].queue_used_idx().unwrap()
    }

    /// A kick on queue 1, handled on another thread and awaited for at most 10 s, so that a
    /// worker that never returns fails the test instead of hanging it.
    fn kick(&self) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (dev, vrings) = (self.dev.clone(), self.vrings.clone());
        std::thread::spawn(move || {
            let _ = tx.send(dev.handle_event(1, EventSet::IN, &vrings, 0));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the worker did not return from handle_event within 10 s")
    }

    /// What a frontend does to restart a ring: GET_VRING_BASE (stops it), then SET_VRING_BASE
    /// and SET_VRING_KICK (ready again).
    fn restart_ring(&self, next_avail: u16) {
        let v = &self.vrings[1];
        v.set_queue_ready(false);
        self.dev.stop_vring(1).unwrap();
        v.set_queue_next_avail(next_avail);
        v.set_queue_ready(true);
    }
}

/// With EVENT_IDX the device notifies the guest when, and only when, the chains it returned
/// since its last decision pass the used_event the guest set: one chain short is quiet, the
/// chain that passes it notifies, and a burst that passes it notifies once.
#[test]
fn the_guest_is_notified_when_its_used_event_is_passed() {
    let r = RingEnv::new();
    let call = r.call_eventfd();
    let used_event = |v: u16| {
        r.mem
            .write_obj(u16::to_le(v), GuestAddress(r.avail + 4 + 2 * QSIZE as u64))
            .unwrap();
    };
    // Notifications the device sent since the last look (0 if none).
    let calls = || call.read().unwrap_or(0);
    used_event(2);
    r.publish(0);
    r.publish(2);
    r.kick().unwrap();
    assert_eq!((r.used_idx(), calls()), (2, 0));
    r.publish(4);
    r.kick().unwrap();
    assert_eq!((r.used_idx(), calls()), (3, 1));
    // Three chains in one pass that pass used_event 4: one notification.
    used_event(4);
    for d in [6, 8, 10] {
        r.publish(d);
    }
    r.kick().unwrap();
    assert_eq!((r.used_idx(), calls()), (6, 1));
    // A used_event already behind: quiet.
    used_event(1);
    r.publish(12);
    r.kick().unwrap();
    assert_eq!((r.used_idx(), calls()), (7, 0));
}

/// GET_VRING_BASE stops a ring as soon as the worker lets go of it and then drops its call
/// eventfd (vhost-user-backend's handler). The chains a pass returned are signalled before
/// then: a signal left for after the pass found no eventfd, and a guest that waits for them
/// (one swap-in, nothing else in flight) hung across a migration or reconnection.
#[test]
fn chains_returned_are_signalled_before_the_ring_can_be_stopped() {
    for event_idx in [true, false] {
        let r = RingEnv::new();
        r.dev.set_event_idx(event_idx);
        r.vrings[1].set_queue_event_idx(event_idx);
        let call = r.call_eventfd();
        // The first chain returned passes used_event 0.
        r.mem
            .write_obj(0u16, GuestAddress(r.avail + 4 + 2 * QSIZE as u64))
            .unwrap();
        r.publish(0);
        let pass = {
            let mut w = r.dev.workers[0].lock();
            r.dev.process_queue(&r.vrings[1], 1, false, &mut w)
        };
        assert_eq!(pass.unwrap(), Pass::Served);
        // What GET_VRING_BASE does right after the pass.
        r.vrings[1].set_queue_ready(false);
        r.vrings[1].set_call(None);
        assert_eq!(r.used_idx(), 1);
        assert_eq!(
            call.read().unwrap_or(0),
            1,
            "a chain returned to a ring about to be stopped was not signalled \
             (EVENT_IDX {event_idx})"
        );
    }
}

/// A pass of two bursts decides once per burst, each on the chains that burst returned: a
/// used_event passed in the first burst notifies once (not again for the second), one passed
/// only in the second notifies once too.
#[test]
fn a_pass_of_two_bursts_notifies_once_for_a_used_event_in_either() {
    let r = RingEnv::new();
    let call = r.call_eventfd();
    let n = BURST as u16 + 9;
    for (used_event, start) in [(5, 0), (n + BURST as u16 + 3, n)] {
        r.mem
            .write_obj(used_event, GuestAddress(r.avail + 4 + 2 * QSIZE as u64))
            .unwrap();
        for k in 0..n {
            r.publish(2 * k);
        }
        r.kick().unwrap();
        assert_eq!(
            (r.used_idx(), call.read().unwrap_or(0)),
            (start + n, 1),
            "used_event {used_event}"
        );
    }
}

/// A driver that moves the available index more than a queue size ahead puts the ring in an
/// impossible state: the queue is broken (not served, no spinning) until the frontend restarts
/// it, and the worker returns.
#[test]
fn avail_index_far_ahead_breaks_the_queue() {
    let r = RingEnv::new();
    r.publish(0);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 1);
    r.set_avail_idx(1 + QSIZE + 7);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 1);
    // Repairing the index is not a reset: the queue stays broken...
    r.set_avail_idx(1);
    r.publish(2);
    r.kick().unwrap();
    assert_eq!(
        r.used_idx(),
        1,
        "a broken queue was served again without a reset"
    );
    // ...until the frontend restarts the ring.
    r.restart_ring(1);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 2);
}

/// A store that holds the first put until the test lets it go, so that the test can act while
/// a worker is in the middle of a burst; everything else goes straight to an [`Engine`].
struct Gated {
    engine: Arc<Engine>,
    first: AtomicBool,
    entered: std::sync::mpsc::SyncSender<()>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Tmem for Gated {
    type Client = <Engine as Tmem>::Client;
    type Worker = <Engine as Tmem>::Worker;

    fn new_worker(&self) -> crate::store::Result<Self::Worker> {
        self.engine.new_worker()
    }
    fn create_pool(&self, c: &Self::Client, spec: PoolSpec) -> crate::store::Result<PoolId> {
        self.engine.create_pool(c, spec)
    }
    fn destroy_pool(&self, c: &Self::Client, pool: PoolId) -> crate::store::Result<()> {
        self.engine.destroy_pool(c, pool)
    }
    fn put<'p>(
        &self,
        w: &mut Self::Worker,
        c: &Self::Client,
        key: &PageKey,
        page: impl Into<PageSrc<'p>>,
    ) -> crate::store::Result<()> {
        if self.first.swap(false, Relaxed) {
            self.entered.send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }
        self.engine.put(w, c, key, page)
    }
    fn get<'p>(
        &self,
        w: &mut Self::Worker,
        c: &Self::Client,
        key: &PageKey,
        out: impl Into<PageDst<'p>>,
        exclusive: bool,
    ) -> crate::store::Result<GetHit> {
        self.engine.get(w, c, key, out, exclusive)
    }
    fn flush_page(&self, c: &Self::Client, key: &PageKey) -> crate::store::Result<()> {
        self.engine.flush_page(c, key)
    }
    fn flush_object(
        &self,
        c: &Self::Client,
        pool: PoolId,
        oid: &shared_proto::Oid,
    ) -> crate::store::Result<u64> {
        self.engine.flush_object(c, pool, oid)
    }
    fn limit_pages(&self, c: &Self::Client) -> u64 {
        self.engine.limit_pages(c)
    }
    fn shrink_target(&self, c: &Self::Client) -> u64 {
        self.engine.shrink_target(c)
    }
    fn reset_client(&self, c: &Self::Client) -> crate::store::ClientRemoval {
        self.engine.reset_client(c)
    }
    fn driver_features(&self, c: &Self::Client, session: bool) -> crate::store::ClientRemoval {
        self.engine.driver_features(c, session)
    }
    fn save_state(
        &self,
        c: &Self::Client,
        w: &mut dyn std::io::Write,
        ephemeral: bool,
    ) -> std::io::Result<crate::store::state::Tally> {
        self.engine.save_state(c, w, ephemeral)
    }
    fn load_state(
        &self,
        c: &Self::Client,
        r: &mut dyn std::io::Read,
    ) -> Result<crate::store::state::Tally, crate::store::RestoreError> {
        self.engine.load_state(c, r)
    }
    fn migrated_out(&self, c: &Self::Client) {
        self.engine.migrated_out(c)
    }
    fn migrated_in(&self, c: &Self::Client) {
        self.engine.migrated_in(c)
    }
}

impl<S: Tmem> RingEnv<S> {
    /// Publishes a PUT of page `index` in `pool` at descriptors `desc`..`desc + 2`.
    fn publish_put(&self, desc: u16, pool: PoolId, index: u64) {
        let h = ReqHeader {
            op: Op::Put as u32,
            pool_id: pool,
            oid: [1, 2, 3],
            index,
            ..ReqHeader::default()
        };
        self.mem
            .write_slice(&h.encode(), GuestAddress(HDR))
            .unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        let descs = [
            SplitDescriptor::new(HDR, 48, next, desc + 1),
            SplitDescriptor::new(DATA, PAGE_SIZE as u32, next, desc + 2),
            SplitDescriptor::new(RESP, 16, VRING_DESC_F_WRITE as u16, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            let at = self.desc + 16 * (desc as u64 + i as u64);
            self.mem
                .write_obj(RawDescriptor::from(d), GuestAddress(at))
                .unwrap();
        }
        self.publish_head(desc);
    }
}

/// A frontend that keeps the ring supplied as fast as the worker serves it must not keep the
/// worker (and so the connection's teardown, which joins it) forever: once the device is
/// stopped, the worker returns after the burst it is in, leaving later chains unserved.
#[test]
fn a_stopped_worker_returns_after_its_burst_however_full_the_ring() {
    let engine = Arc::new(Engine::new(EngineConfig::default()));
    let client = engine.add_client(ClientConfig::named("g"));
    let pool = engine
        .create_pool(
            &client,
            PoolSpec {
                persistent: true,
                shared: None,
            },
        )
        .unwrap();
    let (entered, on_entry) = std::sync::mpsc::sync_channel(1);
    let (go, release) = std::sync::mpsc::channel();
    let store = Arc::new(Gated {
        engine,
        first: AtomicBool::new(true),
        entered,
        release: std::sync::Mutex::new(release),
    });
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let cfg = DeviceConfig {
        request_queues: 2,
        queue_size: 256,
        max_pools: 16,
        poll: Duration::ZERO,
        allow_unsealed_memory: false,
        migration: Migration::Off,
    };
    let r = RingEnv::with_device(mem, TmemDevice::new(store, client, "g", cfg).unwrap());
    for i in 0..4 {
        r.publish_put(3 * i, pool, u64::from(i));
    }
    let (done, finished) = std::sync::mpsc::channel();
    let (dev, vrings) = (r.dev.clone(), r.vrings.clone());
    std::thread::spawn(move || {
        let _ = done.send(dev.handle_event(1, EventSet::IN, &vrings, 0));
    });
    // The worker holds the 4 chains it took and waits in the first put: the frontend adds
    // more, the device is stopped, and the put goes on.
    on_entry
        .recv_timeout(Duration::from_secs(10))
        .expect("the worker never reached the store");
    for i in 4..8 {
        r.publish_put(3 * i, pool, u64::from(i));
    }
    r.dev.stop_workers();
    go.send(()).unwrap();
    finished
        .recv_timeout(Duration::from_secs(10))
        .expect("the stopped worker did not return within 10 s")
        .unwrap();
    assert_eq!(
        r.used_idx(),
        4,
        "the worker went on serving after it was stopped"
    );
}

/// A head index >= the queue size: the chains before it are served, the queue is broken, the
/// worker returns normally (an error would end the worker thread and every queue it serves).
#[test]
fn head_index_beyond_the_queue_breaks_the_queue() {
    let r = RingEnv::new();
    let call = r.call_eventfd();
    r.publish(0);
    r.publish_head(QSIZE + 44);
    r.publish(2);
    r.kick().expect("the worker failed (its thread would end)");
    assert_eq!(r.used_idx(), 1);
    // The chain before the bad head is the guest's again, and it is told so (used_event 0).
    assert_eq!(
        call.read().unwrap_or(0),
        1,
        "the chain served was not signalled"
    );
    // The ring stands past the bad head (what GET_VRING_BASE reports), not past the chain
    // after it, which is not served.
    assert_eq!(r.vrings[1].queue_next_avail(), 2);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 1);
    r.restart_ring(3);
    r.publish(4);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 2);
}

/// Rings that do not lie in guest memory: the queue is broken before anything is taken from it
/// or written to it, and the worker returns; a new ring address (SET_VRING_ADDR) repairs it.
#[test]
fn rings_outside_guest_memory_break_the_queue() {
    // Descriptor table: 4 of its 256 descriptors in memory.
    let r = RingEnv::new();
    r.publish(0);
    r.set_rings(MEM_SIZE - 4 * 16, r.avail, r.used);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 0, "a chain was taken from a broken ring");
    r.kick().unwrap();
    r.set_rings(r.desc, r.avail, r.used);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 1, "the repaired ring was not served");

    // Available ring: its index in memory, its entries not.
    let r = RingEnv::new();
    r.publish(0);
    let avail = MEM_SIZE - 4;
    r.mem
        .write_obj(u16::to_le(1), GuestAddress(avail + 2))
        .unwrap();
    r.set_rings(r.desc, avail, r.used);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 0);

    // Used ring: its index in memory, its entries not.
    let r = RingEnv::new();
    r.publish(0);
    r.set_rings(r.desc, r.avail, MEM_SIZE - 8);
    r.kick().expect("the worker failed (its thread would end)");
    assert_eq!(r.used_idx(), 0);
    r.kick().unwrap();
}

/// A copy of `r`'s memory with a hole over the second half of the descriptor table (the
/// rings follow the table): rings valid in `r.mem` are not in it.
fn table_with_a_hole(r: &RingEnv) -> Mem {
    let table = 16 * QSIZE as u64;
    assert_eq!(r.avail, table, "the mock queue's layout changed");
    let ranges = [(0, table / 2), (table, r.used + 0x1000)];
    let small = GuestMemoryMmap::from_ranges(
        &ranges.map(|(start, end)| (GuestAddress(start), (end - start) as usize)),
    )
    .unwrap();
    for (start, end) in ranges {
        let mut bytes = vec![0u8; (end - start) as usize];
        r.mem.read_slice(&mut bytes, GuestAddress(start)).unwrap();
        small.write_slice(&bytes, GuestAddress(start)).unwrap();
    }
    small
}

/// The used index in `mem` (the vring's own map may be an older one).
fn used_idx_in(r: &RingEnv, mem: &Mem) -> u16 {
    u16::from_le(mem.read_obj(GuestAddress(r.used + 2)).unwrap())
}

/// Rings found valid are checked again when the memory table or the rings change (a worker
/// keeps its verdict only while both stay): a new table with a hole under the descriptor
/// table, a new table that arrives in the middle of a pass (between the worker's reads of the
/// generation and of the map), and rings moved under the same table must each break the
/// queue instead of being served with the old verdict.
#[test]
fn rings_are_checked_again_under_a_new_memory_table() {
    let mut r = RingEnv::new();
    r.publish(0);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 1);
    let small = table_with_a_hole(&r);
    r.dev
        .update_memory(GuestMemoryAtomic::new(small.clone()))
        .unwrap();
    r.mem = small;
    // Its header is outside the new table too: served, it would come back with an empty
    // answer and move the used index.
    r.publish_chain(2);
    r.kick().unwrap();
    assert_eq!(
        used_idx_in(&r, &r.mem),
        1,
        "a chain was taken from rings outside the memory table"
    );

    // The new table lands between the pass's generation and map reads.
    let mut r = RingEnv::new();
    r.publish(0);
    r.kick().unwrap();
    let small = table_with_a_hole(&r);
    let map = small.clone();
    *r.dev.pass_hook.lock() = Some(Box::new(move |dev| {
        dev.update_memory(GuestMemoryAtomic::new(map)).unwrap();
    }));
    r.mem = small;
    r.publish_chain(2);
    r.kick().unwrap();
    assert!(r.dev.pass_hook.lock().is_none(), "the hook did not run");
    assert_eq!(
        used_idx_in(&r, &r.mem),
        1,
        "a chain was taken under a table that arrived mid-pass"
    );

    // Same table, the used ring moved over the available index.
    let r = RingEnv::new();
    r.publish(0);
    r.kick().unwrap();
    r.set_rings(r.desc, r.avail, r.avail);
    r.vrings[1].set_queue_next_used(5);
    r.publish(2);
    r.kick().unwrap();
    assert_eq!(r.avail_idx(), 2, "a chain was taken from overlapping rings");
}

/// A used ring laid over the available ring (found by the `device` fuzz target): every chain
/// returned moves the available index too, so the worker would serve forever and never see
/// its exit event. Such a queue is broken until its rings are set up apart.
#[test]
fn used_ring_over_the_available_index_breaks_the_queue() {
    let r = RingEnv::new();
    r.publish(0);
    r.set_rings(r.desc, r.avail, r.avail);
    // The used index ahead of the available one: each chain returned makes more available.
    r.vrings[1].set_queue_next_used(5);
    r.kick().unwrap();
    assert_eq!(r.avail_idx(), 1, "a chain was taken from a broken ring");
    r.set_rings(r.desc, r.avail, r.used);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 6, "the repaired ring was not served");
}

/// The guest rewrites the page of a PUT while the device reads it, and the page of a GET while
/// the device writes it. Whatever is stored is the guest's own business, but the device must
/// read and write only inside those pages and store only bytes the page held: with every
/// byte 0x11 or 0x22, any other byte in what comes back would be a read outside, or garbage.
#[test]
fn pages_the_guest_changes_meanwhile() {
    use crate::store::codec::Compressor;
    use std::sync::atomic::AtomicBool;
    const PUT_PAGE: u64 = DATA;
    const GET_PAGE: u64 = DATA + 0x1_0000;
    for compressor in [Compressor::Lz4, Compressor::Zstd(1), Compressor::None] {
        let engine = Arc::new(Engine::new(EngineConfig {
            compressor,
            ..EngineConfig::default()
        }));
        let e = env_with(engine, "guest");
        let pool = e.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
        // Guards around both pages, to see that nothing outside them is written.
        for at in [
            PUT_PAGE - 64,
            PUT_PAGE + 4096,
            GET_PAGE - 64,
            GET_PAGE + 4096,
        ] {
            e.write(at, &[0x5a; 64]);
        }
        e.write(PUT_PAGE, &[0x11; PAGE_SIZE]);
        e.write(GET_PAGE, &[0x11; PAGE_SIZE]);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mem, stop) = (e.mem.clone(), stop.clone());
            std::thread::spawn(move || {
                let (a, b) = ([0x11u8; PAGE_SIZE], [0x22u8; PAGE_SIZE]);
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    for (addr, fill) in [(PUT_PAGE, &a), (PUT_PAGE, &b), (GET_PAGE, &a)] {
                        // Half pages, so that the device also sees pages of both.
                        let half = if n.is_multiple_of(3) { 2048 } else { 4096 };
                        mem.write_slice(&fill[..half], GuestAddress(addr)).unwrap();
                        n += 1;
                    }
                }
            })
        };
        let (mut ok, mut corrupt) = (0, 0);
        for i in 0..2_000u64 {
            e.header(Op::Put, 0, pool, i % 64);
            e.run(
                &[(HDR, 48, false), (PUT_PAGE, 4096, false), (RESP, 16, true)],
                false,
            );
            assert_eq!(e.status(RESP), Some(Status::Ok), "{compressor} put {i}");
            e.header(Op::Get, 0, pool, i % 64);
            e.run(
                &[(HDR, 48, false), (GET_PAGE, 4096, true), (RESP, 16, true)],
                false,
            );
            match e.status(RESP) {
                Some(Status::Ok) => ok += 1,
                // A compressor that read a changing page may have stored a block that does
                // not decode to a page: the guest's own page, reported, never a crash.
                Some(Status::IoError) => corrupt += 1,
                s => panic!("{compressor} get {i}: {s:?}"),
            }
            let mut got = vec![0u8; PAGE_SIZE];
            e.mem.read_slice(&mut got, GuestAddress(GET_PAGE)).unwrap();
            assert!(
                got.iter().all(|b| *b == 0x11 || *b == 0x22),
                "{compressor} get {i}: a byte the page never held"
            );
        }
        stop.store(true, Relaxed);
        writer.join().unwrap();
        for at in [
            PUT_PAGE - 64,
            PUT_PAGE + 4096,
            GET_PAGE - 64,
            GET_PAGE + 4096,
        ] {
            let mut g = [0u8; 64];
            e.mem.read_slice(&mut g, GuestAddress(at)).unwrap();
            assert_eq!(g, [0x5a; 64], "{compressor}: guard at {at:#x} changed");
        }
        assert!(ok > 0, "{compressor}: {corrupt} corrupt, no good page");
    }
}

/// A kick or call file descriptor that is not an eventfd (here a pipe) is refused when it
/// arrives: the vring does not get it, the queue counts as refused until an eventfd or no
/// descriptor comes, and an eventfd is accepted as it is.
#[test]
fn notify_fds_must_be_eventfds() {
    use std::fs::File;
    use std::os::fd::FromRawFd;
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let vring = Vring::new(GuestMemoryAtomic::new(mem), 256).unwrap();
    let pipe = || {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    };
    let eventfd = || {
        let (c, _) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        // SAFETY: the consumer's descriptor is handed over whole.
        unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(c)) }
    };
    assert!(!vring.notify_fd_refused());
    let (r, w) = pipe();
    vring.set_kick(Some(r));
    assert!(vring.notify_fd_refused() && vring.get_ref().get_kick().is_none());
    vring.set_kick(Some(eventfd()));
    assert!(!vring.notify_fd_refused() && vring.get_ref().get_kick().is_some());
    vring.set_call(Some(w));
    assert!(vring.notify_fd_refused() && vring.get_ref().get_call().is_none());
    // No descriptor (a polling frontend) is allowed, and so is an eventfd.
    vring.set_call(None);
    assert!(!vring.notify_fd_refused());
    vring.set_call(Some(eventfd()));
    assert!(!vring.notify_fd_refused() && vring.get_ref().get_call().is_some());
    // A socket is no eventfd either.
    let (s, _) = std::os::unix::net::UnixStream::pair().unwrap();
    vring.set_call(Some(File::from(std::os::fd::OwnedFd::from(s))));
    assert!(vring.notify_fd_refused());
    vring.set_call(None);
    // A running ring keeps the kick it is watched by: a new one (or none) is refused.
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let kick = |v: &Vring| v.get_ref().get_kick().as_ref().map(|k| k.as_raw_fd());
    let watched = kick(&vring);
    vring.set_kick(Some(eventfd()));
    assert_eq!(kick(&vring), watched);
    vring.set_kick(None);
    assert_eq!(kick(&vring), watched);
    // Disabled, it takes a new one (enabling it again watches that).
    vring.set_enabled(false);
    vring.set_kick(Some(eventfd()));
    assert!(kick(&vring).is_some() && !vring.notify_fd_refused());
}

/// An indirect chain in the middle of a burst, the ring not at position 0: virtio-queue walks
/// it from its own position, and the chains around it are served in order.
#[test]
fn an_indirect_chain_inside_a_burst_is_taken_at_its_position() {
    let r = RingEnv::new();
    // Move the ring to position 5 first (five direct chains).
    for _ in 0..5 {
        r.publish(0);
    }
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 5);
    // A burst: direct (head 0), indirect (head 2), direct (head 4).
    r.publish(0);
    let resp2 = RESP + 0x100;
    r.publish_indirect(2, resp2);
    r.publish(4);
    r.kick().unwrap();
    assert_eq!(r.used_idx(), 8);
    let used = |i: u64| -> (u32, u32) {
        let at = r.used + 4 + 8 * (i % QSIZE as u64);
        (
            u32::from_le(r.mem.read_obj(GuestAddress(at)).unwrap()),
            u32::from_le(r.mem.read_obj(GuestAddress(at + 4)).unwrap()),
        )
    };
    assert_eq!([used(5), used(6), used(7)], [(0, 16), (2, 16), (4, 16)]);
    assert_eq!(r.vrings[1].queue_next_avail(), 8);
}

/// An available ring at guest address 0 is not served, as virtio-queue's iterator refuses it
/// ("not ready"), on the direct path too (which needs that iterator for indirect chains).
#[test]
fn an_available_ring_at_address_0_is_not_served() {
    let mut r = RingEnv::new();
    r.desc = 0x8000;
    r.avail = 0;
    r.set_rings(r.desc, r.avail, r.used);
    r.publish(0);
    r.kick().unwrap();
    let direct = r.used_idx();
    r.publish_indirect(2, RESP);
    r.kick().unwrap();
    assert_eq!((direct, r.used_idx()), (0, 0));
}

/// A used ring across two regions goes through virtio-queue's `add_used`; the chains it
/// returns are counted for the notification all the same.
#[test]
fn the_guest_is_notified_when_its_used_ring_crosses_regions() {
    let mem: Mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1800),
        (GuestAddress(0x1800), MEM_SIZE as usize - 0x1800),
    ])
    .unwrap();
    let r = RingEnv::with_device(mem, env().dev);
    assert!(r.used < 0x1800 && r.used + 6 + 8 * QSIZE as u64 > 0x1800);
    let call = r.call_eventfd();
    r.mem
        .write_obj(u16::to_le(0), GuestAddress(r.avail + 4 + 2 * QSIZE as u64))
        .unwrap();
    r.publish(0);
    r.kick().unwrap();
    assert_eq!((r.used_idx(), call.read().unwrap_or(0)), (1, 1));
}
