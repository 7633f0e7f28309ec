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
//!
//! The parts: `frontend` is the VMM side (vhost-user, guest RAM), `ring` the driver's split
//! virtqueue, `ops` the requests and pipelines on top of it, [`pages`] test data and
//! [`daemon`] a handle on a real `vhost-tmem` process.

use std::path::Path;
use std::time::Duration;

use shared_proto::{Config, Status, PAGE_SIZE};

pub mod daemon;
mod frontend;
mod hostile;
mod ops;
pub mod pages;
mod ring;

pub use ops::{Done, Req, Seg, MAX_GUEST_BATCH};

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
    /// How guest RAM is backed and declared to the device.
    pub ram: RamBacking,
    /// What the request queues' call (used-buffer notification) file descriptors are.
    pub call_fd: NotifyFd,
    /// What the request queues' kick (available-buffer notification) file descriptors are.
    pub kick_fd: NotifyFd,
    /// Negotiate VIRTIO_TMEM_F_SESSION: the pools outlive this connection (a later one with
    /// the feature finds them), and [`Guest::reset`] drops them. Without it (the default, as
    /// drivers before the feature), the daemon frees them when the connection ends.
    pub session: bool,
    /// Negotiate VHOST_USER_PROTOCOL_F_LOG_SHMFD, so that [`Guest::start_dirty_log`] can put
    /// a dirty-page log under the device as QEMU does for live migration (the daemon offers it
    /// only with `--migration` on).
    pub dirty_log: bool,
    /// Page frames of guest RAM for the caller's own pages ([`Guest::write_frame`]), which
    /// [`Req::PutFrame`] stores in place, as a kernel driver hands the device the page it
    /// swaps out instead of copying it into a request buffer.
    pub page_frames: usize,
}

/// What the VMM hands the device as a request queue's call or kick file descriptor (the
/// control queue always gets eventfds). Only `EventFd` is what a well-behaved VMM does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NotifyFd {
    /// An eventfd, as QEMU's irqfd and ioeventfd are.
    #[default]
    EventFd,
    /// A blocking pipe: the device gets the write end of a call pipe (which this guest never
    /// drains, so it fills after 8192 notifications) or the read end of a kick pipe (written by
    /// the guest's kicks, or by [`Guest::hostile_kick_bytes`]).
    Pipe,
}

/// How the VMM backs guest RAM and declares it in SET_MEM_TABLE. Only `SealedMemfd` is what a
/// well-behaved VMM does; the others are attacks on the daemon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamBacking {
    /// A memfd sealed against shrinking and growing after sizing, as QEMU's
    /// memory-backend-memfd does by default (`seal=on`).
    #[default]
    SealedMemfd,
    /// A memfd without seals: the VMM could truncate it under the device.
    UnsealedMemfd,
    /// A sealed memfd, but the region declared to the device is `extra` bytes longer than the
    /// file: device accesses past the file's end would fault (SIGBUS).
    Oversized { extra: u64 },
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            request_queues: 1,
            queue_size: 256,
            event_idx: true,
            timeout: Duration::from_secs(30),
            ram: RamBacking::default(),
            call_fd: NotifyFd::default(),
            kick_fd: NotifyFd::default(),
            session: false,
            dirty_log: false,
            page_frames: 0,
        }
    }
}

/// The userspace guest: see the crate documentation. Queue 0 is the control queue, 1.. the
/// request queues; each has a ring and request slots.
pub struct Guest {
    vmm: frontend::Vmm,
    rings: Vec<ring::Ring>,
    slots: Vec<ops::Slots>,
    config: Config,
    timeout: Duration,
    /// Page frames for the caller's pages ([`GuestOptions::page_frames`]).
    frames: usize,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Guest {
    /// Connects to a vhost-tmem socket and brings the device up.
    pub fn connect<P: AsRef<Path>>(path: P, opts: GuestOptions) -> Result<Self> {
        if opts.request_queues == 0 || !opts.queue_size.is_power_of_two() || opts.queue_size < 8 {
            return Err(Error::Invalid(
                "need >= 1 request queue and a power-of-two queue size >= 8",
            ));
        }
        let nslots = (opts.queue_size / 4).max(1) as usize;
        let (vmm, rings, config) =
            frontend::Vmm::connect(path, &opts, nslots as u64 * ops::SLOT_BYTES)?;
        let slots = (0..rings.len())
            .map(|q| ops::Slots::new(vmm.slots_base(q), nslots))
            .collect();
        Ok(Guest {
            vmm,
            rings,
            slots,
            config,
            timeout: opts.timeout,
            frames: opts.page_frames,
        })
    }

    /// The device's configuration space, as read at connection time.
    pub fn config(&self) -> Config {
        self.config
    }

    /// Reads the configuration space again.
    pub fn read_config(&mut self) -> Result<Config> {
        self.config = self.vmm.read_config()?;
        Ok(self.config)
    }

    /// Number of request queues in use.
    pub fn request_queues(&self) -> usize {
        self.rings.len() - 1
    }

    /// Guest RAM size (addresses at or past it are outside guest memory).
    pub fn ram_size(&self) -> u64 {
        self.vmm.ram_size()
    }

    /// Gives the device a dirty-page log (SET_LOG_BASE, a memfd of one bit per guest page)
    /// and turns logging on (VHOST_F_LOG_ALL), as QEMU does when a live migration starts.
    /// Needs [`GuestOptions::dirty_log`].
    pub fn start_dirty_log(&mut self) -> Result<()> {
        self.vmm.start_dirty_log()
    }

    /// Guest-physical addresses of the pages the device marked dirty in its log so far.
    pub fn dirty_pages(&self) -> Result<Vec<u64>> {
        self.vmm.dirty_pages()
    }

    /// Guest-physical addresses of request slot `s` of queue `q`: (header, page, response).
    /// The guest uses slot 0 first when all are free.
    pub fn slot_addrs(&self, q: usize, s: usize) -> (u64, u64, u64) {
        let (h, p, r, _) = self.slots[q].addrs(s);
        (h, p, r)
    }

    /// Guest-physical address of page frame `i` ([`GuestOptions::page_frames`]).
    pub fn frame_addr(&self, i: usize) -> Option<u64> {
        (i < self.frames).then(|| self.vmm.frames + i as u64 * PAGE_SIZE as u64)
    }

    /// Writes `page` (4096 bytes) into page frame `i`.
    pub fn write_frame(&self, i: usize, page: &[u8]) -> Result<()> {
        let addr = self
            .frame_addr(i)
            .ok_or(Error::Invalid("no such page frame"))?;
        if page.len() != PAGE_SIZE {
            return Err(Error::Invalid("page must be 4096 bytes"));
        }
        self.vmm.write(addr, page)
    }

    /// Guest-physical address of queue `q`'s used ring.
    pub fn used_ring(&self, q: usize) -> u64 {
        self.rings[q].used
    }

    /// Hostile VMM: truncates the memfd behind guest RAM to `len` bytes. A sealed memfd (the
    /// default [`RamBacking`]) refuses with EPERM.
    pub fn truncate_ram(&self, len: u64) -> std::io::Result<()> {
        self.vmm.truncate_ram(len)
    }
}
