// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VMM's half of the guest: the vhost-user frontend that negotiates features, shares
//! memfd-backed guest RAM (SET_MEM_TABLE), hands the device its vrings and eventfds and reads
//! the configuration space, as QEMU does for a real guest.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use shared_proto::{feature, Config, PAGE_SIZE};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostUserDirtyLogRegion;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::ring::Ring;
use crate::{gm, Error, GuestOptions, NotifyFd, RamBacking, Result};

const VIRTIO_F_VERSION_1: u64 = 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 30;
const VHOST_F_LOG_ALL: u64 = 26;

/// Guest RAM per queue for its rings, before its request slots.
const RING_BLOCK: u64 = 0x1_0000;
/// Guest RAM after the queues, for hand-built chains.
const RAW_AREA_BYTES: u64 = 0x2_0000;

/// The connected device and the guest RAM it shares.
pub(crate) struct Vmm {
    frontend: Frontend,
    pub(crate) mem: GuestMemoryMmap<()>,
    /// Guest-physical size of each queue's block: its rings, then its request slots.
    per_queue: u64,
    /// Guest-physical base of the scratch area for raw chains.
    pub(crate) raw_area: u64,
    /// Guest-physical base of the caller's page frames ([`crate::GuestOptions::page_frames`]).
    pub(crate) frames: u64,
    /// The features acked, for SET_FEATURES again with VHOST_F_LOG_ALL.
    features: u64,
    /// The dirty-page log, once started: one bit per 4 KiB guest page.
    log: Option<File>,
}

/// Guest RAM as QEMU's memory-backend-memfd makes it: sized, then sealed against shrinking
/// and growing (and further sealing), unless `seal` is false.
fn memfd(size: u64, seal: bool) -> Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the returned fd is owned by the File.
    let fd = unsafe {
        libc::memfd_create(
            c"tmem-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::Memory(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).map_err(Error::Memory)?;
    if seal {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(Error::Memory(std::io::Error::last_os_error()));
        }
    }
    Ok(f)
}

impl Vmm {
    /// Connects to a vhost-tmem socket and brings the device up with the control queue and
    /// `opts.request_queues` request queues, each followed in guest RAM by `slot_bytes` for
    /// its requests. Returns the device, its rings (control queue first) and its config.
    pub(crate) fn connect<P: AsRef<Path>>(
        path: P,
        opts: &GuestOptions,
        slot_bytes: u64,
    ) -> Result<(Vmm, Vec<Ring>, Config)> {
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
        if opts.session {
            if dev_features & (1 << feature::SESSION) == 0 {
                return Err(Error::MissingFeature(feature::SESSION));
            }
            features |= 1 << feature::SESSION;
        }
        features &= dev_features;
        frontend.set_features(features)?;
        let proto = frontend.get_protocol_features()?;
        let mut want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK;
        if opts.dirty_log {
            if !proto.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
                return Err(Error::Invalid("the device does not offer LOG_SHMFD"));
            }
            want |= VhostUserProtocolFeatures::LOG_SHMFD;
        }
        frontend.set_protocol_features(proto & want)?;
        let got = frontend.get_queue_num()?;
        if got < nq as u64 {
            return Err(Error::Queues { got, want: nq });
        }

        // Layout: per queue, rings (one 64 KiB block) then its request slots; then a raw area.
        let per_queue = RING_BLOCK + slot_bytes;
        let raw_area = nq as u64 * per_queue;
        let frames = raw_area + RAW_AREA_BYTES;
        let total = (frames + (opts.page_frames * PAGE_SIZE) as u64).next_multiple_of(0x20_0000);
        let file = memfd(total, opts.ram != RamBacking::UnsealedMemfd)?;
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
        let mut info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        if let RamBacking::Oversized { extra } = opts.ram {
            // Declares more than the file holds: the device's mapping then runs past its end.
            info.memory_size += extra;
        }
        frontend.set_mem_table(&[info])?;

        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut rings = Vec::new();
        for q in 0..nq {
            // The control queue always gets eventfds: a hostile choice is for request queues.
            let (call, kick) = if q == 0 {
                (NotifyFd::EventFd, NotifyFd::EventFd)
            } else {
                (opts.call_fd, opts.kick_fd)
            };
            let ring = Ring::new(q as u64 * per_queue, opts.queue_size, event_idx, call, kick)?;
            frontend.set_vring_num(q, opts.queue_size)?;
            frontend.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: host + ring.desc,
                    used_ring_addr: host + ring.used,
                    avail_ring_addr: host + ring.avail,
                    log_addr: None,
                },
            )?;
            frontend.set_vring_base(q, 0)?;
            frontend.set_vring_call(q, ring.device_call())?;
            frontend.set_vring_kick(q, ring.device_kick())?;
            frontend.set_vring_enable(q, true)?;
            rings.push(ring);
        }
        let mut vmm = Vmm {
            frontend,
            mem,
            per_queue,
            raw_area,
            frames,
            features,
            log: None,
        };
        let config = vmm.read_config()?;
        Ok((vmm, rings, config))
    }

    /// Sends SET_LOG_BASE with a fresh log and SET_FEATURES with VHOST_F_LOG_ALL.
    pub(crate) fn start_dirty_log(&mut self) -> Result<()> {
        let pages = self.ram_size().div_ceil(4096);
        let size = pages.div_ceil(8).next_multiple_of(4096);
        let file = memfd(size, true)?;
        self.frontend.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: size,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }),
        )?;
        self.frontend
            .set_features(self.features | 1 << VHOST_F_LOG_ALL)?;
        // SET_FEATURES has no reply: a message that has one makes sure the backend logs before
        // the next request reaches a queue (QEMU waits the same way when it turns logging on).
        self.frontend.get_features()?;
        self.log = Some(file);
        Ok(())
    }

    /// Guest-physical addresses of the pages marked in the log.
    pub(crate) fn dirty_pages(&self) -> Result<Vec<u64>> {
        let file = self.log.as_ref().ok_or(Error::Invalid("no dirty log"))?;
        let mut bits = Vec::new();
        let mut f = file;
        f.seek(SeekFrom::Start(0)).map_err(Error::Memory)?;
        f.read_to_end(&mut bits).map_err(Error::Memory)?;
        Ok(bits
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                (0..8)
                    .filter(move |bit| b & (1 << bit) != 0)
                    .map(move |bit| (i as u64 * 8 + bit) * 4096)
            })
            .collect())
    }

    /// Guest-physical base of queue `q`'s request slots.
    pub(crate) fn slots_base(&self, q: usize) -> u64 {
        q as u64 * self.per_queue + RING_BLOCK
    }

    /// Reads the device's configuration space.
    pub(crate) fn read_config(&mut self) -> Result<Config> {
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
        Ok(Config::decode(&cfg))
    }

    /// Writes guest memory.
    pub(crate) fn write(&self, addr: u64, b: &[u8]) -> Result<()> {
        self.mem.write_slice(b, GuestAddress(addr)).map_err(gm)
    }

    /// Reads guest memory.
    pub(crate) fn read(&self, addr: u64, b: &mut [u8]) -> Result<()> {
        self.mem.read_slice(b, GuestAddress(addr)).map_err(gm)
    }

    /// Truncates the file behind guest RAM to `len` bytes, as a hostile VMM could.
    pub(crate) fn truncate_ram(&self, len: u64) -> std::io::Result<()> {
        let region = self
            .mem
            .find_region(GuestAddress(0))
            .ok_or_else(|| std::io::Error::other("no region"))?;
        let fo = region
            .file_offset()
            .ok_or_else(|| std::io::Error::other("anonymous guest RAM"))?;
        fo.file().set_len(len)
    }

    /// Sends SET_VRING_KICK for queue `q` with `fd`, whatever state the ring is in.
    pub(crate) fn set_vring_kick(
        &mut self,
        q: usize,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<()> {
        Ok(self.frontend.set_vring_kick(q, fd)?)
    }

    /// Guest RAM size (addresses at or past it are outside guest memory).
    pub(crate) fn ram_size(&self) -> u64 {
        self.mem.last_addr().0 + 1
    }
}
