// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target `vhost_user`: the vhost-user message layer, served as the daemon serves it.
//!
//! Each input is one connection to `vhost_tmem::daemon::serve_connection` (the daemon's own
//! per-connection code: a fresh device and vhost-user-backend daemon, accept, serve, tear
//! down) on a real Unix socket. The input is a sequence of frontend messages, with real
//! memfds and eventfds attached: memory tables with many, overlapping, odd, unsealed or
//! too-short regions, vring setup with any indexes and addresses, feature negotiation, raw
//! messages with any code, flags, size and fd count; plus kicks, stray writes into guest
//! memory and well-formed requests on rings set up by a canned, correct bring-up, so that
//! the worker threads run while messages arrive. Oracles: no panic in any thread; after the
//! frontend closes its side the daemon closes the connection and returns within
//! `HANG_LIMIT`; the client's pools are gone afterwards; and (when [`Checks::fds`]) the
//! process holds exactly the descriptors it held before the connection.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use shared_proto::{feature, Op, ReqHeader, PAGE_SIZE};
use vhost::vhost_user::Listener;
use vhost_tmem::daemon::serve_connection;
use vhost_tmem::store::{Client, ClientConfig, Engine, EngineConfig};
use vhost_tmem::vhu_tmem::{DeviceConfig, Migration};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Longest the daemon may take to close a connection whose frontend has gone, and to return.
const HANG_LIMIT: Duration = Duration::from_secs(10);
const MAX_MSGS: usize = 48;
/// Queues of the device: the control queue and two request queues.
const QUEUES: u8 = 3;
/// The canned bring-up: its memfd's size, where it puts guest RAM, and the ring size.
const RAM: u64 = 0x4_0000;
const RAM_GPA: u64 = 0x1_0000_0000;
const RAM_UVA: u64 = 0x7f00_0000_0000;
const RING: u16 = 64;

/// Which checks apply (the descriptor count only means something in a process that runs
/// nothing else meanwhile, as a fuzzer does and a parallel test run does not).
#[derive(Clone, Copy, Debug)]
pub struct Checks {
    pub fds: bool,
}

/// Runs one input with every check.
pub fn run(data: &[u8]) {
    run_with(data, Checks { fds: true });
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Region {
    memfd: u8,
    gpa: u32,
    pages: u16,
    odd_size: Option<u16>,
    uva: Option<u64>,
    offset_pages: u8,
    odd_offset: Option<u16>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct MemfdSpec {
    pages: u8,
    /// Bit 0: F_SEAL_SHRINK, 1: F_SEAL_GROW, 2: F_SEAL_SEAL, 3: F_SEAL_WRITE.
    seals: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// In the canned RAM at this offset.
    Ram(u32),
    /// The user address of region i of the last table plus an offset.
    Region(u8, u32),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone)]
enum Msg {
    /// A correct bring-up (features, memory, every ring), as QEMU does it.
    Setup {
        event_idx: bool,
    },
    GetFeatures,
    SetFeatures(u64, bool),
    GetProtocolFeatures,
    SetProtocolFeatures(u64, bool),
    SetOwner,
    ResetOwner,
    GetQueueNum,
    SetMemTable(Vec<Region>, i8),
    AddMemReg(Region),
    RemMemReg(Region),
    VringNum(u8, u16),
    VringAddr {
        index: u8,
        flags: u32,
        desc: Addr,
        used: Addr,
        avail: Addr,
    },
    VringBase(u8, u16),
    GetVringBase(u8),
    VringKick(u8, bool),
    VringCall(u8, bool),
    VringErr(u8, bool),
    VringEnable(u8, u32),
    GetConfig(u32, u32),
    SetConfig(u32, Vec<u8>),
    Raw {
        code: u32,
        flags: u32,
        size: Option<u32>,
        body: Vec<u8>,
        fds: u8,
    },
    /// Signals queue q's kick eventfd.
    Kick(u8),
    /// A well-formed request on a queue of the canned bring-up, then its kick.
    Request {
        queue: u8,
        op: u8,
        pool: u8,
        index: u8,
        fill: u8,
    },
    /// Bytes written into a memfd (guest memory, as the guest would write it).
    Poke(u8, u32, Vec<u8>),
    Truncate(u8, u32),
}

#[derive(Arbitrary, Debug)]
struct Program {
    memfds: [MemfdSpec; 3],
    need_reply: bool,
    msgs: Vec<Msg>,
}

/// The daemon side, one per process (as in the daemon: one listener, a connection at a time).
struct Server {
    engine: Arc<Engine>,
    client: Arc<Client>,
    listener: Mutex<Listener>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // libFuzzer's main is not Rust's: a write to a closed socket must not kill the process.
        // SAFETY: installs the ignore disposition; no handler code runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("vhost-tmem.sock");
        let listener = Listener::new(&path, true).expect("listening socket");
        let engine = Arc::new(Engine::new(EngineConfig {
            memory_limit: 4 << 20,
            ..EngineConfig::default()
        }));
        let client = engine.add_client(ClientConfig::named("fuzz"));
        Server {
            engine,
            client,
            listener: Mutex::new(listener),
            path,
            _dir: dir,
        }
    })
}

/// Panics in any thread (worker threads included), counted by a hook installed once.
pub(crate) fn panics() -> usize {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            COUNT.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

fn open_fds() -> usize {
    // The device's kick/call check keeps /proc/self/fd open once it first looked: opened now,
    // it is in both counts.
    let _ = vhost_tmem::vhu_tmem::fd_dir();
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn memfd(spec: MemfdSpec) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor goes to the File.
    let fd = unsafe {
        libc::memfd_create(
            c"fuzz-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(spec.pages as u64 * PAGE_SIZE as u64)
        .expect("memfd size");
    let mut seals = 0;
    for (bit, seal) in [
        libc::F_SEAL_SHRINK,
        libc::F_SEAL_GROW,
        libc::F_SEAL_SEAL,
        libc::F_SEAL_WRITE,
    ]
    .into_iter()
    .enumerate()
    {
        if spec.seals & (1 << bit) != 0 {
            seals |= seal;
        }
    }
    // SAFETY: fcntl with an integer argument on a descriptor we own.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    f
}

/// The frontend's side of one connection.
struct Frontend {
    sock: UnixStream,
    memfds: Vec<File>,
    kicks: Vec<EventFd>,
    need_reply: bool,
    /// User addresses of the regions of the last memory table, for ring addresses.
    regions: Vec<u64>,
    /// Per queue of the canned bring-up: the next available index (None: not set up).
    avail: [Option<u16>; QUEUES as usize],
    alive: bool,
}

impl Frontend {
    fn send(&mut self, code: u32, body: &[u8], fds: &[RawFd]) {
        let flags = 1 | if self.need_reply { 1 << 3 } else { 0 };
        self.send_raw(code, flags, body.len() as u32, body, fds);
    }

    fn send_raw(&mut self, code: u32, flags: u32, size: u32, body: &[u8], fds: &[RawFd]) {
        if !self.alive {
            return;
        }
        let mut m = Vec::with_capacity(12 + body.len());
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(body);
        // The daemon closes the connection on an error: every later message is moot.
        match self.sock.send_with_fds(&[&m[..]], fds) {
            Ok(n) if n == m.len() => {}
            _ => self.alive = false,
        }
    }

    fn u64_msg(&mut self, code: u32, v: u64) {
        self.send(code, &v.to_le_bytes(), &[]);
    }

    fn state(&mut self, code: u32, index: u32, num: u32) {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&num.to_le_bytes());
        self.send(code, &b, &[]);
    }

    fn memfd_fd(&self, i: u8) -> RawFd {
        self.memfds[i as usize % self.memfds.len()].as_raw_fd()
    }

    fn region(&self, r: &Region) -> ([u8; 32], RawFd) {
        let size = match r.odd_size {
            Some(s) => s as u64,
            None => r.pages as u64 % 80 * PAGE_SIZE as u64,
        };
        let gpa = (r.gpa as u64) << 12;
        let offset = match r.odd_offset {
            Some(o) => o as u64,
            None => (r.offset_pages % 8) as u64 * PAGE_SIZE as u64,
        };
        let uva = r.uva.unwrap_or(RAM_UVA + gpa);
        let mut b = [0u8; 32];
        for (i, v) in [gpa, size, uva, offset].into_iter().enumerate() {
            b[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
        }
        (b, self.memfd_fd(r.memfd))
    }

    fn mem_table(&mut self, regions: &[Region], fd_delta: i8) {
        let regions = &regions[..regions.len().min(12)];
        let mut body = (regions.len() as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        let mut fds = Vec::new();
        self.regions.clear();
        for r in regions {
            let (b, fd) = self.region(r);
            body.extend_from_slice(&b);
            fds.push(fd);
            self.regions
                .push(u64::from_le_bytes(b[16..24].try_into().expect("8")));
        }
        // A wrong number of descriptors for the regions.
        match fd_delta.signum() {
            1 => fds.extend(std::iter::repeat_n(
                self.memfd_fd(0),
                (fd_delta % 4) as usize,
            )),
            -1 => fds.truncate(fds.len().saturating_sub((-(fd_delta as i16) % 4) as usize)),
            _ => {}
        }
        self.send(5, &body, &fds);
    }

    fn single_region(&mut self, code: u32, r: &Region) {
        let (b, fd) = self.region(r);
        let mut body = 0u64.to_le_bytes().to_vec();
        body.extend_from_slice(&b);
        let fds = [fd];
        self.send(code, &body, if code == 37 { &fds } else { &[] });
    }

    fn vring_fd(&mut self, code: u32, index: u8, no_fd: bool) {
        let q = index as usize;
        let v = (index as u64) | if no_fd { 1 << 8 } else { 0 };
        if no_fd {
            self.u64_msg(code, v);
            return;
        }
        let e = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let fd = e.as_raw_fd();
        self.send(code, &v.to_le_bytes(), &[fd]);
        if code == 12 {
            if let Some(slot) = self.kicks.get_mut(q) {
                *slot = e;
            }
        }
    }

    fn addr(&self, a: Addr) -> u64 {
        match a {
            Addr::Ram(off) => RAM_UVA + (off as u64 % RAM),
            Addr::Region(i, off) => {
                match self.regions.get(i as usize % self.regions.len().max(1)) {
                    Some(uva) => uva.wrapping_add(off as u64),
                    None => off as u64,
                }
            }
            Addr::Raw(v) => v,
        }
    }

    fn vring_addr(&mut self, index: u32, flags: u32, desc: u64, used: u64, avail: u64) {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&flags.to_le_bytes());
        for v in [desc, used, avail, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        self.send(9, &b, &[]);
    }

    /// Features, protocol features, the canned RAM (memfd 0) and every ring, as QEMU does it.
    fn setup(&mut self, event_idx: bool) {
        const PROTOCOL_FEATURES: u64 = 1 << 30;
        let mut features = 1u64 << 32 | PROTOCOL_FEATURES | 1 << feature::BATCH;
        features |= 1 << feature::SHARED_POOLS | 1 << feature::MQ;
        if event_idx {
            features |= 1 << 29;
        }
        self.send(3, &[], &[]);
        self.send(1, &[], &[]);
        self.u64_msg(2, features);
        self.send(15, &[], &[]);
        // MQ, REPLY_ACK, CONFIG.
        self.u64_msg(16, 1 | 1 << 3 | 1 << 9);
        let ram = self.memfds[0].as_raw_fd();
        let mut body = 1u32.to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        for v in [RAM_GPA, RAM, RAM_UVA, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        self.send(5, &body, &[ram]);
        self.regions = vec![RAM_UVA];
        for q in 0..QUEUES {
            let base = RAM_UVA + q as u64 * 0x3000;
            self.state(8, q as u32, RING as u32);
            self.vring_addr(q as u32, 0, base, base + 0x2000, base + 0x1000);
            self.state(10, q as u32, 0);
            self.vring_fd(13, q, false);
            self.vring_fd(12, q, false);
            self.state(18, q as u32, 1);
            self.avail[q as usize] = Some(0);
        }
    }

    /// A request chain (header, page for PUT/GET, response) on queue `q` of the canned RAM.
    fn request(&mut self, q: u8, op: u8, pool: u8, index: u8, fill: u8) {
        let q = q % QUEUES;
        let Some(idx) = self.avail[q as usize] else {
            return;
        };
        let ram = &self.memfds[0];
        let base = q as u64 * 0x3000;
        let slot = (idx % (RING / 4)) as u64;
        let hdr = 0x1_0000 + q as u64 * 0x1000 + slot * 0x40;
        let resp = 0x1_0000 + q as u64 * 0x1000 + 0x800 + slot * 0x10;
        let page = 0x2_0000 + (q as u64 * 16 + slot) * PAGE_SIZE as u64;
        let op = match (q, op % 4) {
            (0, 0 | 1) => Op::CreatePool,
            (0, _) => Op::DestroyPool,
            (_, 0) => Op::Put,
            (_, 1) => Op::Get,
            (_, 2) => Op::FlushPage,
            _ => Op::FlushObject,
        };
        let h = ReqHeader {
            op: op as u32,
            flags: (op == Op::CreatePool && fill & 1 == 1) as u32,
            pool_id: pool as u32 % 4,
            count: 0,
            oid: [1, 2, 3],
            index: index as u64,
        };
        let mut readable = h.encode().to_vec();
        if op == Op::CreatePool {
            readable.extend_from_slice(&[0; 16]);
            readable.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            readable.extend_from_slice(&0u32.to_le_bytes());
        }
        let mut descs = vec![(RAM_GPA + hdr, readable.len() as u32, 0u16)];
        match op {
            Op::Put => {
                let _ = ram.write_at(&[fill; PAGE_SIZE], page);
                descs.push((RAM_GPA + page, PAGE_SIZE as u32, 0));
            }
            Op::Get => descs.push((RAM_GPA + page, PAGE_SIZE as u32, 2)),
            _ => {}
        }
        descs.push((RAM_GPA + resp, 16, 2));
        let _ = ram.write_at(&readable, hdr);
        let first = (slot * 4) as u16;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = (i + 1 < descs.len()).then_some(first + i as u16 + 1);
            let mut d = addr.to_le_bytes().to_vec();
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&(flags | next.map_or(0, |_| 1)).to_le_bytes());
            d.extend_from_slice(&next.unwrap_or(0).to_le_bytes());
            let _ = ram.write_at(&d, base + 16 * (first as u64 + i as u64));
        }
        let avail = base + 0x1000;
        let _ = ram.write_at(&first.to_le_bytes(), avail + 4 + 2 * (idx % RING) as u64);
        let idx = idx.wrapping_add(1);
        let _ = ram.write_at(&idx.to_le_bytes(), avail + 2);
        self.avail[q as usize] = Some(idx);
        self.kick(q);
    }

    fn kick(&self, q: u8) {
        if let Some(e) = self.kicks.get(q as usize) {
            let _ = e.write(1);
        }
    }

    fn msg(&mut self, m: Msg) {
        match m {
            Msg::Setup { event_idx } => self.setup(event_idx),
            Msg::GetFeatures => self.send(1, &[], &[]),
            Msg::SetFeatures(f, raw) => {
                let f = if raw {
                    f
                } else {
                    f & (1 << 32 | 1 << 30 | 1 << 29 | 0xf)
                };
                self.u64_msg(2, f)
            }
            Msg::GetProtocolFeatures => self.send(15, &[], &[]),
            Msg::SetProtocolFeatures(f, raw) => {
                let f = if raw {
                    f
                } else {
                    f & (1 | 1 << 3 | 1 << 9 | 1 << 15)
                };
                self.u64_msg(16, f)
            }
            Msg::SetOwner => self.send(3, &[], &[]),
            Msg::ResetOwner => self.send(4, &[], &[]),
            Msg::GetQueueNum => self.send(17, &[], &[]),
            Msg::SetMemTable(r, d) => self.mem_table(&r, d),
            Msg::AddMemReg(r) => self.single_region(37, &r),
            Msg::RemMemReg(r) => self.single_region(38, &r),
            Msg::VringNum(i, n) => self.state(8, (i % 4) as u32, n as u32),
            Msg::VringAddr {
                index,
                flags,
                desc,
                used,
                avail,
            } => {
                let (d, u, a) = (self.addr(desc), self.addr(used), self.addr(avail));
                self.vring_addr((index % 4) as u32, flags & 1, d, u, a)
            }
            Msg::VringBase(i, n) => self.state(10, (i % 4) as u32, n as u32),
            Msg::GetVringBase(i) => self.state(11, (i % 4) as u32, 0),
            Msg::VringKick(i, nofd) => self.vring_fd(12, i % 4, nofd),
            Msg::VringCall(i, nofd) => self.vring_fd(13, i % 4, nofd),
            Msg::VringErr(i, nofd) => self.vring_fd(14, i % 4, nofd),
            Msg::VringEnable(i, n) => self.state(18, (i % 4) as u32, n % 3),
            Msg::GetConfig(offset, size) => {
                let size = size % 40;
                let mut b = (offset % 40).to_le_bytes().to_vec();
                b.extend_from_slice(&size.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend(std::iter::repeat_n(0u8, size as usize));
                self.send(24, &b, &[]);
            }
            Msg::SetConfig(offset, payload) => {
                let payload = &payload[..payload.len().min(64)];
                let mut b = (offset % 40).to_le_bytes().to_vec();
                b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend_from_slice(payload);
                self.send(25, &b, &[]);
            }
            Msg::Raw {
                code,
                flags,
                size,
                body,
                fds,
            } => {
                let body = &body[..body.len().min(512)];
                let fds: Vec<RawFd> = (0..fds % 5).map(|i| self.memfd_fd(i)).collect();
                let size = size.map_or(body.len() as u32, |s| s % 0x1100);
                self.send_raw(code % 64, flags, size, body, &fds);
            }
            Msg::Kick(q) => self.kick(q % QUEUES),
            Msg::Request {
                queue,
                op,
                pool,
                index,
                fill,
            } => self.request(queue, op, pool, index, fill),
            Msg::Poke(i, off, bytes) => {
                let f = &self.memfds[i as usize % self.memfds.len()];
                let _ = f.write_at(&bytes[..bytes.len().min(256)], off as u64 % RAM);
            }
            Msg::Truncate(i, len) => {
                let f = &self.memfds[i as usize % self.memfds.len()];
                let _ = f.set_len(len as u64 % (2 * RAM));
            }
        }
    }
}

/// Runs one input; panics on a finding.
pub fn run_with(data: &[u8], checks: Checks) {
    let u = Unstructured::new(data);
    let Ok(p) = Program::arbitrary_take_rest(u) else {
        return;
    };
    let srv = server();
    let panics_before = panics();
    let fds_before = checks.fds.then(open_fds);

    let sock = UnixStream::connect(&srv.path).expect("connect to the daemon's socket");
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let srv = server();
        let mut listener = srv.listener.lock().unwrap_or_else(|e| e.into_inner());
        let cfg = DeviceConfig {
            request_queues: QUEUES as u16 - 1,
            queue_size: 256,
            max_pools: 4,
            poll: Duration::ZERO,
            allow_unsealed_memory: false,
            migration: Migration::Off,
        };
        let r = serve_connection(&srv.engine, &srv.client, &mut listener, cfg);
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });

    let mut memfds = vec![memfd(MemfdSpec {
        pages: (RAM / PAGE_SIZE as u64) as u8,
        seals: 0b111,
    })];
    memfds.extend(p.memfds.iter().map(|s| memfd(*s)));
    let mut fe = Frontend {
        sock,
        memfds,
        kicks: (0..QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect(),
        need_reply: p.need_reply,
        regions: Vec::new(),
        avail: [None; QUEUES as usize],
        alive: true,
    };
    for m in p.msgs.into_iter().take(MAX_MSGS) {
        fe.msg(m);
        if !fe.alive {
            break;
        }
    }

    // The frontend leaves: the daemon must notice, close its side and return.
    let _ = fe.sock.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + HANG_LIMIT;
    fe.sock
        .set_read_timeout(Some(HANG_LIMIT))
        .expect("socket timeout");
    let mut sink = [0u8; 4096];
    loop {
        match fe.sock.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                panic!("hang: the daemon kept the connection open {HANG_LIMIT:?} after the frontend left")
            }
            Err(_) => break,
        }
        assert!(
            Instant::now() < deadline,
            "hang: the daemon kept sending for {HANG_LIMIT:?} after the frontend left"
        );
    }
    match rx.recv_timeout(HANG_LIMIT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("serve_connection failed: {e}"),
        Err(_) => panic!("hang: the connection's teardown did not finish within {HANG_LIMIT:?}"),
    }
    t.join().expect("the serving thread");
    drop(fe);

    assert_eq!(panics(), panics_before, "a thread panicked (see above)");
    let stats = srv.engine.stats();
    let c = stats
        .clients
        .iter()
        .find(|c| c.name == "fuzz")
        .expect("the client");
    assert!(
        c.pools.is_empty() && !c.connected,
        "the client's pools outlived its connection: {:?}",
        c.pools
    );
    assert_eq!(
        srv.engine.memory_used(),
        0,
        "memory still charged after the only client's connection ended"
    );
    if let Some(before) = fds_before {
        let after = open_fds();
        assert_eq!(
            after, before,
            "the connection left {after} descriptors open where {before} were before"
        );
    }
}
