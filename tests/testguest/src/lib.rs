// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A userspace virtio-tmem guest: it plays the VMM (vhost-user frontend, memfd-backed guest
//! RAM, eventfds) and the guest driver (split virtqueues, requests, notifications) at once.
//!
//! Used by the end-to-end tests, the demo and the benchmarks:
//!
//! ```no_run
//! use tmem_testguest::{Guest, GuestOptions, Req};
//! let mut g = Guest::connect("/tmp/vm1.sock", GuestOptions::default()).unwrap();
//! let pool = g.create_pool(true, None).unwrap();
//! let page = vec![7u8; 4096];
//! g.put(pool, [1, 0, 0], 0, &page).unwrap();
//! let mut out = vec![0u8; 4096];
//! g.get(pool, [1, 0, 0], 0, false, &mut out).unwrap();
//! assert_eq!(out, page);
//! ```

use std::cell::OnceCell;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use shared_proto::{
    feature, req_flags, BatchEntry, Config, CreatePool, Oid, Op, ReqHeader, RespHeader, Status,
    PAGE_SIZE,
};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VIRTIO_F_VERSION_1: u64 = 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 30;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Guest-RAM bytes reserved per request slot: header, page, response, batch area.
const SLOT_BYTES: u64 = 16 * 1024;
/// How long the guest polls for completions before it sleeps on the call eventfd.
const SPIN: Duration = Duration::from_micros(50);
/// Largest BATCH this guest sends (its slot area bounds it).
pub const MAX_GUEST_BATCH: usize = 200;

/// Errors of the test guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error("cannot create guest memory")]
    Memory(#[source] std::io::Error),
    #[error("guest memory access failed: {0}")]
    GuestMemory(String),
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("the device offers {got} queues, {want} needed")]
    Queues { got: u64, want: usize },
    #[error("the device lacks feature bit {0}")]
    MissingFeature(u32),
    #[error("no answer from the device within {0:?}")]
    Timeout(Duration),
    #[error("the device returned an unknown descriptor head {0}")]
    BadUsedId(u32),
    #[error("request failed with status {0:?}")]
    Status(Status),
    #[error("the device answered with an unknown status {0}")]
    UnknownStatus(u32),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
}

/// Result of the test guest.
pub type Result<T> = std::result::Result<T, Error>;

pub mod daemon;

fn gm<E: std::fmt::Display>(e: E) -> Error {
    Error::GuestMemory(e.to_string())
}

/// How to set the device up.
#[derive(Clone, Debug)]
pub struct GuestOptions {
    /// Request queues to use (the device must offer at least this many).
    pub request_queues: usize,
    /// Virtqueue size.
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// How long to wait for any answer.
    pub timeout: Duration,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            request_queues: 1,
            queue_size: 256,
            event_idx: true,
            timeout: Duration::from_secs(30),
        }
    }
}

/// A request for [`Guest::pipeline`].
#[derive(Clone, Copy, Debug)]
pub enum Req<'a> {
    Put {
        pool: u32,
        oid: Oid,
        index: u64,
        page: &'a [u8],
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

/// One driver-side split virtqueue.
struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Guest-physical base of this queue's request slots.
    slots: u64,
    nslots: usize,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
    /// Per slot: the tag of the request in flight.
    inflight: Vec<Option<(usize, Op)>>,
    free: Vec<usize>,
}

/// The userspace guest: see the crate documentation.
pub struct Guest {
    frontend: Frontend,
    mem: GuestMemoryMmap<()>,
    queues: Vec<Queue>,
    config: Config,
    event_idx: bool,
    timeout: Duration,
    /// Scratch area for raw chains.
    raw_area: u64,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn memfd(size: u64) -> Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the returned fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"tmem-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).map_err(Error::Memory)?;
    Ok(f)
}

impl Guest {
    /// Connects to a vhost-tmem socket and brings the device up.
    pub fn connect<P: AsRef<Path>>(path: P, opts: GuestOptions) -> Result<Self> {
        if opts.request_queues == 0 || !opts.queue_size.is_power_of_two() || opts.queue_size < 8 {
            return Err(Error::Invalid(
                "need >= 1 request queue and a power-of-two queue size >= 8",
            ));
        }
        let nq = 1 + opts.request_queues;
        let mut frontend = Frontend::connect(path, nq as u64)?;
        frontend.set_owner()?;
        let dev_features = frontend.get_features()?;
        for bit in [feature::BATCH, feature::SHARED_POOLS] {
            if dev_features & (1 << bit) == 0 {
                return Err(Error::MissingFeature(bit));
            }
        }
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
            | (1 << feature::BATCH)
            | (1 << feature::SHARED_POOLS);
        if opts.event_idx {
            features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.request_queues > 1 {
            features |= 1 << feature::MQ;
        }
        features &= dev_features;
        frontend.set_features(features)?;
        let proto = frontend.get_protocol_features()?;
        let want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        frontend.set_protocol_features(proto & want)?;
        let got = frontend.get_queue_num()?;
        if got < nq as u64 {
            return Err(Error::Queues { got, want: nq });
        }

        // Layout: per queue, rings (one 64 KiB block) then its request slots; then a raw area.
        let size = opts.queue_size as u64;
        let nslots = (opts.queue_size / 4).max(1) as usize;
        let per_queue = 0x1_0000 + nslots as u64 * SLOT_BYTES;
        let raw_area = nq as u64 * per_queue;
        let total = (raw_area + 0x2_0000).next_multiple_of(0x20_0000);
        let file = memfd(total)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            total as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(gm)?;
        let host = mem.get_host_address(GuestAddress(0)).map_err(gm)? as u64;
        let region = mem
            .find_region(GuestAddress(0))
            .ok_or(Error::Invalid("no region"))?;
        frontend.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region)?])?;

        let mut queues = Vec::new();
        for q in 0..nq {
            let base = q as u64 * per_queue;
            let desc = base;
            let avail = base + 16 * size;
            let used = (avail + 6 + 2 * size).next_multiple_of(4096);
            let queue = Queue {
                size: opts.queue_size,
                desc,
                avail,
                used,
                slots: base + 0x1_0000,
                nslots,
                next_avail: 0,
                last_used: 0,
                kick: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
                inflight: vec![None; nslots],
                free: (0..nslots).rev().collect(),
            };
            frontend.set_vring_num(q, opts.queue_size)?;
            frontend.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: host + desc,
                    used_ring_addr: host + used,
                    avail_ring_addr: host + avail,
                    log_addr: None,
                },
            )?;
            frontend.set_vring_base(q, 0)?;
            frontend.set_vring_call(q, &queue.call)?;
            frontend.set_vring_kick(q, &queue.kick)?;
            frontend.set_vring_enable(q, true)?;
            queues.push(queue);
        }
        let buf = [0u8; Config::SIZE];
        let (_, cfg) =
            frontend.get_config(0, Config::SIZE as u32, VhostUserConfigFlags::WRITABLE, &buf)?;
        let cfg: [u8; Config::SIZE] = cfg
            .as_slice()
            .try_into()
            .map_err(|_| Error::Invalid("short config space"))?;
        Ok(Guest {
            frontend,
            mem,
            queues,
            config: Config::decode(&cfg),
            event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            timeout: opts.timeout,
            raw_area,
        })
    }

    /// The device's configuration space, as read at connection time.
    pub fn config(&self) -> Config {
        self.config
    }

    /// Reads the configuration space again.
    pub fn read_config(&mut self) -> Result<Config> {
        let buf = [0u8; Config::SIZE];
        let (_, cfg) = self.frontend.get_config(
            0,
            Config::SIZE as u32,
            VhostUserConfigFlags::WRITABLE,
            &buf,
        )?;
        let cfg: [u8; Config::SIZE] = cfg
            .as_slice()
            .try_into()
            .map_err(|_| Error::Invalid("short config space"))?;
        self.config = Config::decode(&cfg);
        Ok(self.config)
    }

    /// Number of request queues in use.
    pub fn request_queues(&self) -> usize {
        self.queues.len() - 1
    }

    fn write(&self, addr: u64, b: &[u8]) -> Result<()> {
        self.mem.write_slice(b, GuestAddress(addr)).map_err(gm)
    }

    fn read(&self, addr: u64, b: &mut [u8]) -> Result<()> {
        self.mem.read_slice(b, GuestAddress(addr)).map_err(gm)
    }

    fn set_desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> Result<()> {
        let d = self.queues[q].desc + 16 * i as u64;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(d, &b)
    }

    /// Makes chains headed by `heads` available and notifies the device if it wants that.
    fn publish(&mut self, q: usize, heads: &[u16]) -> Result<()> {
        let queue = &self.queues[q];
        let (size, avail, used) = (queue.size, queue.avail, queue.used);
        let old = queue.next_avail;
        let mut idx = old;
        for &h in heads {
            let slot = avail + 4 + 2 * (idx % size) as u64;
            self.mem
                .write_obj(h.to_le(), GuestAddress(slot))
                .map_err(gm)?;
            idx = idx.wrapping_add(1);
        }
        // Ring entries before the index that publishes them.
        fence(Ordering::SeqCst);
        self.mem
            .store(idx.to_le(), GuestAddress(avail + 2), Ordering::Release)
            .map_err(gm)?;
        self.queues[q].next_avail = idx;
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let avail_event: u16 = u16::from_le(
                self.mem
                    .load(GuestAddress(used + 4 + 8 * size as u64), Ordering::Acquire)
                    .map_err(gm)?,
            );
            // vring_need_event(): did the index pass the device's avail_event?
            idx.wrapping_sub(avail_event).wrapping_sub(1) < idx.wrapping_sub(old)
        } else {
            let flags: u16 = u16::from_le(
                self.mem
                    .load(GuestAddress(used), Ordering::Acquire)
                    .map_err(gm)?,
            );
            flags & 1 == 0 // VRING_USED_F_NO_NOTIFY
        };
        if kick {
            self.queues[q].kick.write(1).map_err(Error::EventFd)?;
        }
        Ok(())
    }

    /// Takes every used element of queue `q` without waiting; re-arms `used_event` first when
    /// nothing is there, so a completion that lands meanwhile is seen or notified.
    fn collect_used(&mut self, q: usize, out: &mut Vec<(u32, u32)>) -> Result<()> {
        loop {
            let queue = &self.queues[q];
            let (size, used) = (queue.size, queue.used);
            let used_idx: u16 = u16::from_le(
                self.mem
                    .load(GuestAddress(used + 2), Ordering::Acquire)
                    .map_err(gm)?,
            );
            fence(Ordering::SeqCst);
            let mut last = queue.last_used;
            let before = out.len();
            while last != used_idx {
                let e = used + 4 + 8 * (last % size) as u64;
                let id: u32 = u32::from_le(self.mem.read_obj(GuestAddress(e)).map_err(gm)?);
                let len: u32 = u32::from_le(self.mem.read_obj(GuestAddress(e + 4)).map_err(gm)?);
                out.push((id, len));
                last = last.wrapping_add(1);
            }
            self.queues[q].last_used = last;
            if self.event_idx {
                // used_event: interrupt us on the next used element.
                self.mem
                    .store(
                        last.to_le(),
                        GuestAddress(self.queues[q].avail + 4 + 2 * size as u64),
                        Ordering::Release,
                    )
                    .map_err(gm)?;
                fence(Ordering::SeqCst);
            }
            if out.len() > before {
                return Ok(());
            }
            // Re-check after arming used_event: the device may have used one in between.
            let again: u16 = u16::from_le(
                self.mem
                    .load(GuestAddress(used + 2), Ordering::Acquire)
                    .map_err(gm)?,
            );
            if again == last {
                return Ok(());
            }
        }
    }

    /// Waits (bounded by the timeout) until any of `qs` has used elements, and takes them:
    /// `out[i]` gets queue `qs[i]`'s.
    fn reap_any(&mut self, qs: &[usize], out: &mut [Vec<(u32, u32)>]) -> Result<()> {
        let start = std::time::Instant::now();
        let deadline = start + self.timeout;
        loop {
            let mut any = false;
            for (i, &q) in qs.iter().enumerate() {
                self.collect_used(q, &mut out[i])?;
                any |= !out[i].is_empty();
            }
            if any {
                return Ok(());
            }
            let now = std::time::Instant::now();
            // Poll a little before sleeping, as the kernel driver does: an answer usually
            // comes within microseconds, a wakeup costs more.
            if now - start < SPIN {
                std::hint::spin_loop();
                continue;
            }
            if now >= deadline {
                return Err(Error::Timeout(self.timeout));
            }
            let mut pfds: Vec<libc::pollfd> = qs
                .iter()
                .map(|&q| libc::pollfd {
                    fd: self.queues[q].call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let ms = (deadline - now).as_millis().min(1000) as i32;
            // SAFETY: `pfds` is a valid array of pollfds for the duration of the call.
            unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
            for &q in qs {
                if pfds
                    .iter()
                    .any(|p| p.fd == self.queues[q].call.as_raw_fd() && p.revents != 0)
                {
                    let _ = self.queues[q].call.read();
                }
            }
        }
    }

    /// Takes every used element of one queue; waits (bounded) until there is at least one.
    fn reap(&mut self, q: usize, out: &mut Vec<(u32, u32)>) -> Result<()> {
        self.reap_any(&[q], std::slice::from_mut(out))
    }

    /// Guest-physical layout of slot `s` of queue `q`: (header, page, response, batch area).
    fn slot_addrs(&self, q: usize, s: usize) -> (u64, u64, u64, u64) {
        let base = self.queues[q].slots + s as u64 * SLOT_BYTES;
        (base, base + 4096, base + 8192, base + 8192 + 64)
    }

    fn submit(&mut self, q: usize, s: usize, req: &Req<'_>) -> Result<(u16, Op)> {
        let (h, p, r, _) = self.slot_addrs(q, s);
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
                self.write(p, page)?;
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
        self.write(h, &hdr.encode())?;
        self.write(r, &[0xff; RespHeader::SIZE])?;
        // Like a kernel driver: header, page and response in separate descriptors.
        let d = (s * 3) as u16;
        let w = VRING_DESC_F_WRITE;
        match op {
            Op::Put => {
                self.set_desc(q, d, h, ReqHeader::SIZE as u32, VRING_DESC_F_NEXT, d + 1)?;
                self.set_desc(q, d + 1, p, PAGE_SIZE as u32, VRING_DESC_F_NEXT, d + 2)?;
                self.set_desc(q, d + 2, r, RespHeader::SIZE as u32, w, 0)?;
            }
            Op::Get => {
                self.set_desc(q, d, h, ReqHeader::SIZE as u32, VRING_DESC_F_NEXT, d + 1)?;
                self.set_desc(q, d + 1, p, PAGE_SIZE as u32, w | VRING_DESC_F_NEXT, d + 2)?;
                self.set_desc(q, d + 2, r, RespHeader::SIZE as u32, w, 0)?;
            }
            _ => {
                self.set_desc(q, d, h, ReqHeader::SIZE as u32, VRING_DESC_F_NEXT, d + 1)?;
                self.set_desc(q, d + 1, r, RespHeader::SIZE as u32, w, 0)?;
            }
        }
        Ok((d, op))
    }

    fn status_at(&self, addr: u64) -> Result<(Status, RespHeader)> {
        let mut b = [0u8; RespHeader::SIZE];
        self.read(addr, &mut b)?;
        let r = RespHeader::decode(&b);
        let st = Status::from_u32(r.status).ok_or(Error::UnknownStatus(r.status))?;
        Ok((st, r))
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
        if qs.is_empty() || qs.iter().any(|&q| q >= self.queues.len()) {
            return Err(Error::Invalid("no such request queue"));
        }
        let depth = qs
            .iter()
            .map(|&q| self.queues[q].nslots)
            .min()
            .map_or(1, |n| depth.clamp(1, n));
        let mut it = reqs.into_iter().peekable();
        let mut in_flight = vec![0usize; qs.len()];
        let mut used = vec![Vec::new(); qs.len()];
        let mut heads: Vec<Vec<u16>> = vec![Vec::with_capacity(depth); qs.len()];
        let mut next = 0;
        loop {
            for h in heads.iter_mut() {
                h.clear();
            }
            // Fill every queue up to `depth`, round robin.
            let mut stalled = 0;
            while it.peek().is_some() && stalled < qs.len() {
                let i = next % qs.len();
                next += 1;
                if in_flight[i] >= depth {
                    stalled += 1;
                    continue;
                }
                stalled = 0;
                let q = qs[i];
                let (tag, req) = it.next().expect("peeked");
                let s = self.queues[q].free.pop().expect("a free slot below depth");
                let (head, op) = self.submit(q, s, &req)?;
                self.queues[q].inflight[s] = Some((tag, op));
                heads[i].push(head);
                in_flight[i] += 1;
            }
            for (i, &q) in qs.iter().enumerate() {
                if !heads[i].is_empty() {
                    let hs = std::mem::take(&mut heads[i]);
                    self.publish(q, &hs)?;
                    heads[i] = hs;
                }
            }
            if in_flight.iter().all(|&n| n == 0) {
                return Ok(());
            }
            for u in used.iter_mut() {
                u.clear();
            }
            self.reap_any(&qs, &mut used)?;
            for (i, &q) in qs.iter().enumerate() {
                for &(id, _len) in &used[i] {
                    let s = id as usize / 3;
                    let Some((tag, op)) = self.queues[q].inflight.get_mut(s).and_then(Option::take)
                    else {
                        return Err(Error::BadUsedId(id));
                    };
                    self.queues[q].free.push(s);
                    in_flight[i] -= 1;
                    let (_, p, r, _) = self.slot_addrs(q, s);
                    let (status, resp) = self.status_at(r)?;
                    let hit = (op == Op::Get && status == Status::Ok).then_some((&self.mem, p));
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

    fn ok(st: Status) -> Result<()> {
        if st == Status::Ok {
            Ok(())
        } else {
            Err(Error::Status(st))
        }
    }

    /// Stores a page (request queue 0).
    pub fn put(&mut self, pool: u32, oid: Oid, index: u64, page: &[u8]) -> Result<()> {
        Self::ok(
            self.one(
                Req::Put {
                    pool,
                    oid,
                    index,
                    page,
                },
                None,
            )?
            .0,
        )
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
        Self::ok(st).map(|()| flags)
    }

    /// Drops a page.
    pub fn flush_page(&mut self, pool: u32, oid: Oid, index: u64) -> Result<()> {
        Self::ok(self.one(Req::FlushPage { pool, oid, index }, None)?.0)
    }

    /// Drops an object.
    pub fn flush_object(&mut self, pool: u32, oid: Oid) -> Result<()> {
        Self::ok(self.one(Req::FlushObject { pool, oid }, None)?.0)
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
        Self::ok(Status::from_u32(resp.status).ok_or(Error::UnknownStatus(resp.status))?)?;
        w[RespHeader::SIZE..]
            .iter()
            .map(|&b| Status::from_u32(b as u32).ok_or(Error::UnknownStatus(b as u32)))
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
        Self::ok(Status::from_u32(r.status).ok_or(Error::UnknownStatus(r.status))?)?;
        Ok(r.value as u32)
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
        Self::ok(Status::from_u32(r.status).ok_or(Error::UnknownStatus(r.status))?)
    }

    /// Sends a hand-built chain on queue `q` (0: control, 1..: request queues) and waits for it.
    /// Returns the used length and the contents of each `Seg::Write` after the device is done.
    /// No pipelined request may be in flight on that queue.
    pub fn raw_chain(&mut self, q: usize, segs: &[Seg]) -> Result<(u32, Vec<Vec<u8>>)> {
        if q >= self.queues.len() || segs.is_empty() || segs.len() > 32 {
            return Err(Error::Invalid("bad queue or segment count"));
        }
        if self.queues[q].free.len() != self.queues[q].nslots {
            return Err(Error::Invalid("raw_chain with requests in flight"));
        }
        // Descriptors past the slots' range; buffers in the raw area.
        let first = (self.queues[q].nslots * 3) as u16;
        if first as usize + segs.len() > self.queues[q].size as usize {
            return Err(Error::Invalid("queue too small for this chain"));
        }
        let mut at = self.raw_area;
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
                    self.write(at, b)?;
                    let a = at;
                    at += (b.len() as u64).next_multiple_of(64);
                    (a, b.len() as u32, false)
                }
                Seg::Write(n) => {
                    self.write(at, &vec![0xa5; *n as usize])?;
                    places.push((at, *n));
                    let a = at;
                    at += (*n as u64).next_multiple_of(64);
                    (a, *n, true)
                }
                Seg::Raw { addr, len, write } => (*addr, *len, *write),
            };
            let flags = next | if write { VRING_DESC_F_WRITE } else { 0 };
            self.set_desc(q, d, addr, len, flags, d + 1)?;
        }
        self.publish(q, &[first])?;
        let mut used = Vec::new();
        self.reap(q, &mut used)?;
        let &(id, len) = used.first().ok_or(Error::Invalid("nothing used"))?;
        if id != first as u32 || used.len() != 1 {
            return Err(Error::BadUsedId(id));
        }
        let mut out = Vec::new();
        for (a, n) in places {
            let mut b = vec![0u8; n as usize];
            self.read(a, &mut b)?;
            out.push(b);
        }
        Ok((len, out))
    }

    /// Guest RAM size (addresses at or past it are outside guest memory).
    pub fn ram_size(&self) -> u64 {
        self.mem.last_addr().0 + 1
    }
}

/// Deterministic page contents of several kinds, for tests that must verify every byte.
pub mod pages {
    use shared_proto::PAGE_SIZE;

    fn mix(mut x: u64) -> u64 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    /// Fills `out` with page number `seed`: a mix of zero, same-filled, text-like, structured
    /// binary and incompressible pages, chosen by the seed.
    pub fn fill(seed: u64, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_SIZE);
        let h = mix(seed);
        match h % 10 {
            0 => out.fill(0),
            1 => {
                let w = mix(h).to_le_bytes();
                for c in out.chunks_exact_mut(8) {
                    c.copy_from_slice(&w);
                }
            }
            2..=5 => {
                // Text: words from a small vocabulary, numbered lines.
                const WORDS: [&str; 12] = [
                    "memory", "page", "guest", "host", "swap", "cache", "the", "of", "pool",
                    "object", "index", "tmem",
                ];
                let mut i = 0;
                let mut x = h;
                let mut line = 0u64;
                while i < PAGE_SIZE {
                    x = mix(x);
                    let w = if x.is_multiple_of(9) {
                        line += 1;
                        format!("\n{seed}:{line} ")
                    } else {
                        format!("{} ", WORDS[(x % 12) as usize])
                    };
                    let n = w.len().min(PAGE_SIZE - i);
                    out[i..i + n].copy_from_slice(&w.as_bytes()[..n]);
                    i += n;
                }
            }
            6..=8 => {
                // Binary: records with small counters and a few random fields.
                for (i, c) in out.chunks_exact_mut(16).enumerate() {
                    c[..8].copy_from_slice(&(seed.wrapping_mul(4096) + i as u64).to_le_bytes());
                    let r = mix(h ^ i as u64);
                    c[8..12].copy_from_slice(&((r & 0xff) as u32).to_le_bytes());
                    c[12..16].copy_from_slice(&[0, 0, (r >> 8) as u8, 0]);
                }
            }
            _ => {
                let mut x = h;
                for c in out.chunks_exact_mut(8) {
                    x = mix(x);
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }

    /// Page number `seed` as a new vector.
    pub fn page(seed: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        fill(seed, &mut p);
        p
    }
}
