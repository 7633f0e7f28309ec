// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The driver's requests: how each tmem operation is encoded into a request slot and a
//! descriptor chain, pipelines that keep many in flight over one or several queues, the
//! one-request calls built on them, control-queue requests and hand-built chains.

use std::cell::OnceCell;

use shared_proto::{
    req_flags, BatchEntry, CreatePool, Oid, Op, ReqHeader, RespHeader, Status, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::ring::{reap_any, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use crate::{Error, Guest, Result};

/// Guest-RAM bytes reserved per request slot: header, page, response, batch area.
pub(crate) const SLOT_BYTES: u64 = 16 * 1024;
/// Largest BATCH this guest sends (its slot area bounds it).
pub const MAX_GUEST_BATCH: usize = 200;

/// A request for [`Guest::pipeline`].
#[derive(Clone, Copy, Debug)]
pub enum Req<'a> {
    Put {
        pool: u32,
        oid: Oid,
        index: u64,
        page: &'a [u8],
    },
    /// A put of the page already in page frame `frame` ([`crate::GuestOptions::page_frames`]):
    /// the chain points at the frame, as a kernel driver's points at the page it swaps out.
    PutFrame {
        pool: u32,
        oid: Oid,
        index: u64,
        frame: usize,
    },
    Get {
        pool: u32,
        oid: Oid,
        index: u64,
        exclusive: bool,
    },
    FlushPage {
        pool: u32,
        oid: Oid,
        index: u64,
    },
    FlushObject {
        pool: u32,
        oid: Oid,
    },
}

/// A completed pipelined request.
#[derive(Debug)]
pub struct Done<'a> {
    /// The tag the request was submitted with.
    pub tag: usize,
    /// The device's status.
    pub status: Status,
    /// Response flags.
    pub flags: u32,
    /// GET hits: where the device wrote the page.
    hit: Option<(&'a GuestMemoryMmap, u64)>,
    page: OnceCell<Vec<u8>>,
}

impl Done<'_> {
    /// GET hits: the page; otherwise empty (also if it cannot be read). It is read from guest
    /// memory on the first call only: a driver hands the device's page to its user without
    /// copying it, so a pipeline that does not look pays no copy.
    pub fn page(&self) -> &[u8] {
        self.page.get_or_init(|| {
            let Some((mem, addr)) = self.hit else {
                return Vec::new();
            };
            let mut page = vec![0u8; PAGE_SIZE];
            match mem.read_slice(&mut page, GuestAddress(addr)) {
                Ok(()) => page,
                Err(_) => Vec::new(),
            }
        })
    }
}

/// A segment of a hand-built chain for [`Guest::raw_chain`].
#[derive(Clone, Debug)]
pub enum Seg {
    /// Device-readable bytes.
    Read(Vec<u8>),
    /// Device-writable buffer of this length.
    Write(u32),
    /// A descriptor with an arbitrary guest address, e.g. outside guest memory.
    Raw { addr: u64, len: u32, write: bool },
}

/// One queue's request slots: slot `s` owns descriptors `3s..3s+3` and `SLOT_BYTES` of guest
/// RAM; descriptors past them are free for raw chains.
pub(crate) struct Slots {
    /// Guest-physical base of the slots.
    base: u64,
    n: usize,
    /// Per slot: the tag and operation of the request in flight.
    inflight: Vec<Option<(usize, Op)>>,
    free: Vec<usize>,
}

impl Slots {
    /// `n` free slots from `base`.
    pub(crate) fn new(base: u64, n: usize) -> Slots {
        Slots {
            base,
            n,
            inflight: vec![None; n],
            free: (0..n).rev().collect(),
        }
    }

    /// Guest-physical layout of slot `s`: (header, page, response, batch area).
    pub(crate) fn addrs(&self, s: usize) -> (u64, u64, u64, u64) {
        let base = self.base + s as u64 * SLOT_BYTES;
        (base, base + 4096, base + 8192, base + 8192 + 64)
    }
}

fn ok(st: Status) -> Result<()> {
    if st == Status::Ok {
        Ok(())
    } else {
        Err(Error::Status(st))
    }
}

fn status(raw: u32) -> Result<Status> {
    Status::from_u32(raw).ok_or(Error::UnknownStatus(raw))
}

impl Guest {
    /// Encodes `req` into slot `s` of queue `q` and chains its descriptors; returns the head.
    fn submit(&mut self, q: usize, s: usize, req: &Req<'_>) -> Result<(u16, Op)> {
        let (h, mut p, r, _) = self.slots[q].addrs(s);
        let (op, pool, oid, index, flags) = match *req {
            Req::Put {
                pool,
                oid,
                index,
                page,
            } => {
                if page.len() != PAGE_SIZE {
                    return Err(Error::Invalid("page must be 4096 bytes"));
                }
                self.vmm.write(p, page)?;
                (Op::Put, pool, oid, index, 0)
            }
            Req::PutFrame {
                pool,
                oid,
                index,
                frame,
            } => {
                p = self
                    .frame_addr(frame)
                    .ok_or(Error::Invalid("no such page frame"))?;
                (Op::Put, pool, oid, index, 0)
            }
            Req::Get {
                pool,
                oid,
                index,
                exclusive,
            } => {
                let f = if exclusive {
                    req_flags::GET_EXCLUSIVE
                } else {
                    0
                };
                (Op::Get, pool, oid, index, f)
            }
            Req::FlushPage { pool, oid, index } => (Op::FlushPage, pool, oid, index, 0),
            Req::FlushObject { pool, oid } => (Op::FlushObject, pool, oid, 0, 0),
        };
        let hdr = ReqHeader {
            op: op as u32,
            flags,
            pool_id: pool,
            count: 0,
            oid,
            index,
        };
        self.vmm.write(h, &hdr.encode())?;
        self.vmm.write(r, &[0xff; RespHeader::SIZE])?;
        // Like a kernel driver: header, page and response in separate descriptors.
        let (ring, mem) = (&self.rings[q], &self.vmm.mem);
        let d = (s * 3) as u16;
        let (n, w) = (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE);
        let hl = ReqHeader::SIZE as u32;
        let rl = RespHeader::SIZE as u32;
        match op {
            Op::Put => {
                ring.set_desc(mem, d, h, hl, n, d + 1)?;
                ring.set_desc(mem, d + 1, p, PAGE_SIZE as u32, n, d + 2)?;
                ring.set_desc(mem, d + 2, r, rl, w, 0)?;
            }
            Op::Get => {
                ring.set_desc(mem, d, h, hl, n, d + 1)?;
                ring.set_desc(mem, d + 1, p, PAGE_SIZE as u32, w | n, d + 2)?;
                ring.set_desc(mem, d + 2, r, rl, w, 0)?;
            }
            _ => {
                ring.set_desc(mem, d, h, hl, n, d + 1)?;
                ring.set_desc(mem, d + 1, r, rl, w, 0)?;
            }
        }
        Ok((d, op))
    }

    fn status_at(&self, addr: u64) -> Result<(Status, RespHeader)> {
        let mut b = [0u8; RespHeader::SIZE];
        self.vmm.read(addr, &mut b)?;
        let r = RespHeader::decode(&b);
        Ok((status(r.status)?, r))
    }

    /// Runs `reqs` on request queue `queue` (0-based) with up to `depth` in flight, calling
    /// `done` for each completion (in completion order).
    pub fn pipeline<'r, I, F>(&mut self, queue: usize, depth: usize, reqs: I, done: F) -> Result<()>
    where
        I: IntoIterator<Item = (usize, Req<'r>)>,
        F: FnMut(Done<'_>),
    {
        self.pipeline_queues(&[queue], depth, reqs, done)
    }

    /// Like [`Guest::pipeline`], over several request queues at once: each request goes to the
    /// next queue (round robin) with fewer than `depth` in flight, as a multi-queue driver
    /// spreads its CPUs' requests.
    pub fn pipeline_queues<'r, I, F>(
        &mut self,
        queues: &[usize],
        depth: usize,
        reqs: I,
        mut done: F,
    ) -> Result<()>
    where
        I: IntoIterator<Item = (usize, Req<'r>)>,
        F: FnMut(Done<'_>),
    {
        let qs: Vec<usize> = queues.iter().map(|q| q + 1).collect();
        if qs.is_empty() || qs.iter().any(|&q| q >= self.rings.len()) {
            return Err(Error::Invalid("no such request queue"));
        }
        let depth = qs
            .iter()
            .map(|&q| self.slots[q].n)
            .min()
            .map_or(1, |n| depth.clamp(1, n));
        let mut it = reqs.into_iter();
        let mut exhausted = false;
        let mut in_flight = vec![0usize; qs.len()];
        let mut used = vec![Vec::new(); qs.len()];
        let mut heads: Vec<Vec<u16>> = vec![Vec::with_capacity(depth); qs.len()];
        let mut next = 0;
        loop {
            for h in heads.iter_mut() {
                h.clear();
            }
            // Fill every queue up to `depth`, round robin. A request is taken from `reqs` only
            // when it can be sent at once: callers time requests from when they yield them.
            let mut stalled = 0;
            while !exhausted && stalled < qs.len() {
                let i = next % qs.len();
                next += 1;
                if in_flight[i] >= depth {
                    stalled += 1;
                    continue;
                }
                let Some((tag, req)) = it.next() else {
                    exhausted = true;
                    break;
                };
                stalled = 0;
                let q = qs[i];
                let s = self.slots[q].free.pop().expect("a free slot below depth");
                let (head, op) = self.submit(q, s, &req)?;
                self.slots[q].inflight[s] = Some((tag, op));
                heads[i].push(head);
                in_flight[i] += 1;
            }
            for (i, &q) in qs.iter().enumerate() {
                if !heads[i].is_empty() {
                    self.rings[q].publish(&self.vmm.mem, &heads[i])?;
                }
            }
            if in_flight.iter().all(|&n| n == 0) {
                return Ok(());
            }
            for u in used.iter_mut() {
                u.clear();
            }
            reap_any(&self.vmm.mem, &mut self.rings, &qs, self.timeout, &mut used)?;
            for (i, &q) in qs.iter().enumerate() {
                for &(id, _len) in &used[i] {
                    let s = id as usize / 3;
                    let Some((tag, op)) = self.slots[q].inflight.get_mut(s).and_then(Option::take)
                    else {
                        return Err(Error::BadUsedId(id));
                    };
                    self.slots[q].free.push(s);
                    in_flight[i] -= 1;
                    let (_, p, r, _) = self.slots[q].addrs(s);
                    let (status, resp) = self.status_at(r)?;
                    let hit = (op == Op::Get && status == Status::Ok).then_some((&self.vmm.mem, p));
                    done(Done {
                        tag,
                        status,
                        flags: resp.flags,
                        hit,
                        page: OnceCell::new(),
                    });
                }
            }
        }
    }

    fn one(&mut self, req: Req<'_>, out: Option<&mut [u8]>) -> Result<(Status, u32)> {
        let mut result = None;
        let mut out = out;
        self.pipeline(0, 1, [(0, req)], |d| {
            if let (Some(o), false) = (out.as_deref_mut(), d.page().is_empty()) {
                o.copy_from_slice(d.page());
            }
            result = Some((d.status, d.flags));
        })?;
        result.ok_or(Error::Invalid("no completion"))
    }

    /// Stores a page (request queue 0).
    pub fn put(&mut self, pool: u32, oid: Oid, index: u64, page: &[u8]) -> Result<()> {
        ok(self
            .one(
                Req::Put {
                    pool,
                    oid,
                    index,
                    page,
                },
                None,
            )?
            .0)
    }

    /// Loads a page into `out`; returns the response flags (`resp_flags::DROPPED`).
    pub fn get(
        &mut self,
        pool: u32,
        oid: Oid,
        index: u64,
        exclusive: bool,
        out: &mut [u8],
    ) -> Result<u32> {
        if out.len() != PAGE_SIZE {
            return Err(Error::Invalid("out must be 4096 bytes"));
        }
        let (st, flags) = self.one(
            Req::Get {
                pool,
                oid,
                index,
                exclusive,
            },
            Some(out),
        )?;
        ok(st).map(|()| flags)
    }

    /// Drops a page.
    pub fn flush_page(&mut self, pool: u32, oid: Oid, index: u64) -> Result<()> {
        ok(self.one(Req::FlushPage { pool, oid, index }, None)?.0)
    }

    /// Drops an object.
    pub fn flush_object(&mut self, pool: u32, oid: Oid) -> Result<()> {
        ok(self.one(Req::FlushObject { pool, oid }, None)?.0)
    }

    /// Sends one BATCH of flushes on request queue 0; returns the per-entry statuses.
    pub fn batch(&mut self, entries: &[BatchEntry]) -> Result<Vec<Status>> {
        if entries.len() > MAX_GUEST_BATCH {
            return Err(Error::Invalid("too many batch entries for this guest"));
        }
        let mut payload = ReqHeader {
            op: Op::Batch as u32,
            count: entries.len() as u32,
            ..ReqHeader::default()
        }
        .encode()
        .to_vec();
        for e in entries {
            payload.extend_from_slice(&e.encode());
        }
        let (_, written) = self.raw_chain(
            1,
            &[
                Seg::Read(payload),
                Seg::Write((RespHeader::SIZE + entries.len()) as u32),
            ],
        )?;
        let w = &written[0];
        let resp = RespHeader::decode(w[..RespHeader::SIZE].try_into().expect("16 bytes"));
        ok(status(resp.status)?)?;
        w[RespHeader::SIZE..]
            .iter()
            .map(|&b| status(b as u32))
            .collect()
    }

    fn control(&mut self, hdr: ReqHeader, payload: &[u8]) -> Result<RespHeader> {
        let mut b = hdr.encode().to_vec();
        b.extend_from_slice(payload);
        let (_, w) = self.raw_chain(0, &[Seg::Read(b), Seg::Write(RespHeader::SIZE as u32)])?;
        Ok(RespHeader::decode(w[0][..].try_into().expect("16 bytes")))
    }

    /// Creates a pool (control queue); returns its id.
    pub fn create_pool(&mut self, persistent: bool, shared: Option<[u8; 16]>) -> Result<u32> {
        let mut flags = 0;
        if persistent {
            flags |= req_flags::POOL_PERSISTENT;
        }
        if shared.is_some() {
            flags |= req_flags::POOL_SHARED;
        }
        let cp = CreatePool {
            uuid: shared.unwrap_or([0; 16]),
            page_size: PAGE_SIZE as u32,
            reserved: 0,
        };
        let r = self.control(
            ReqHeader {
                op: Op::CreatePool as u32,
                flags,
                ..ReqHeader::default()
            },
            &cp.encode(),
        )?;
        ok(status(r.status)?)?;
        Ok(r.value as u32)
    }

    /// RESET (control queue): drops every pool of this client, as a driver with
    /// VIRTIO_TMEM_F_SESSION does at probe. Returns how many pools the device dropped.
    pub fn reset(&mut self) -> Result<u64> {
        let r = self.control(
            ReqHeader {
                op: Op::Reset as u32,
                ..ReqHeader::default()
            },
            &[],
        )?;
        ok(status(r.status)?)?;
        Ok(r.value)
    }

    /// Destroys a pool (control queue).
    pub fn destroy_pool(&mut self, pool: u32) -> Result<()> {
        let r = self.control(
            ReqHeader {
                op: Op::DestroyPool as u32,
                pool_id: pool,
                ..ReqHeader::default()
            },
            &[],
        )?;
        ok(status(r.status)?)
    }

    /// Sends a hand-built chain on queue `q` (0: control, 1..: request queues) and waits for it.
    /// Returns the used length and the contents of each `Seg::Write` after the device is done.
    /// No pipelined request may be in flight on that queue.
    pub fn raw_chain(&mut self, q: usize, segs: &[Seg]) -> Result<(u32, Vec<Vec<u8>>)> {
        if q >= self.rings.len() || segs.is_empty() || segs.len() > 32 {
            return Err(Error::Invalid("bad queue or segment count"));
        }
        if self.slots[q].free.len() != self.slots[q].n {
            return Err(Error::Invalid("raw_chain with requests in flight"));
        }
        // Descriptors past the slots' range; buffers in the raw area.
        let first = (self.slots[q].n * 3) as u16;
        if first as usize + segs.len() > self.rings[q].size() as usize {
            return Err(Error::Invalid("queue too small for this chain"));
        }
        let mut at = self.vmm.raw_area;
        let mut places = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let d = first + i as u16;
            let next = if i + 1 < segs.len() {
                VRING_DESC_F_NEXT
            } else {
                0
            };
            let (addr, len, write) = match s {
                Seg::Read(b) => {
                    self.vmm.write(at, b)?;
                    let a = at;
                    at += (b.len() as u64).next_multiple_of(64);
                    (a, b.len() as u32, false)
                }
                Seg::Write(n) => {
                    self.vmm.write(at, &vec![0xa5; *n as usize])?;
                    places.push((at, *n));
                    let a = at;
                    at += (*n as u64).next_multiple_of(64);
                    (a, *n, true)
                }
                Seg::Raw { addr, len, write } => (*addr, *len, *write),
            };
            let flags = next | if write { VRING_DESC_F_WRITE } else { 0 };
            self.rings[q].set_desc(&self.vmm.mem, d, addr, len, flags, d + 1)?;
        }
        self.rings[q].publish(&self.vmm.mem, &[first])?;
        let mut used = Vec::new();
        reap_any(
            &self.vmm.mem,
            &mut self.rings,
            &[q],
            self.timeout,
            std::slice::from_mut(&mut used),
        )?;
        let &(id, len) = used.first().ok_or(Error::Invalid("nothing used"))?;
        if id != first as u32 || used.len() != 1 {
            return Err(Error::BadUsedId(id));
        }
        let mut out = Vec::new();
        for (a, n) in places {
            let mut b = vec![0u8; n as usize];
            self.vmm.read(a, &mut b)?;
            out.push(b);
        }
        Ok((len, out))
    }
}
