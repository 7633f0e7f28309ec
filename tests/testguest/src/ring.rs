// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The driver's side of one split virtqueue in guest memory: descriptors, publishing chains
//! on the available ring (with the device's notification suppression) and taking used
//! elements (with ours), kept apart from what the requests mean.

use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{gm, Error, NotifyFd, Result};

/// The descriptor continues in `next`.
pub(crate) const VRING_DESC_F_NEXT: u16 = 1;
/// The device writes this descriptor's buffer.
pub(crate) const VRING_DESC_F_WRITE: u16 = 2;

/// How long the guest polls for completions before it sleeps on the call eventfd.
const SPIN: Duration = Duration::from_micros(50);

/// One driver-side split virtqueue.
pub(crate) struct Ring {
    size: u16,
    /// Guest-physical addresses of the descriptor table, available and used rings.
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    next_avail: u16,
    last_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    event_idx: bool,
    /// The guest's ends: it writes `kick` and waits on `call`.
    pub(crate) kick: EventFd,
    pub(crate) call: EventFd,
    /// The device's ends, when they are not the same file (pipes).
    device_kick: Option<EventFd>,
    device_call: Option<EventFd>,
}

/// A blocking pipe as (read end, write end), each in an `EventFd`, which is only a wrapper
/// around a file descriptor and reads or writes 8 bytes at a time.
fn pipe() -> Result<(EventFd, EventFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::EventFd(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (EventFd::from_raw_fd(fds[0]), EventFd::from_raw_fd(fds[1])) })
}

impl Ring {
    /// A ring of `size` entries laid out from `base` (it needs well under 64 KiB there), with
    /// call and kick file descriptors of the kinds given.
    pub(crate) fn new(
        base: u64,
        size: u16,
        event_idx: bool,
        call: NotifyFd,
        kick: NotifyFd,
    ) -> Result<Ring> {
        let n = size as u64;
        let avail = base + 16 * n;
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd);
        let (call, device_call) = match call {
            NotifyFd::EventFd => (eventfd()?, None),
            NotifyFd::Pipe => {
                let (r, w) = pipe()?;
                (r, Some(w))
            }
        };
        let (kick, device_kick) = match kick {
            NotifyFd::EventFd => (eventfd()?, None),
            NotifyFd::Pipe => {
                let (r, w) = pipe()?;
                (w, Some(r))
            }
        };
        Ok(Ring {
            size,
            desc: base,
            avail,
            used: (avail + 6 + 2 * n).next_multiple_of(4096),
            next_avail: 0,
            last_used: 0,
            event_idx,
            kick,
            call,
            device_kick,
            device_call,
        })
    }

    /// The file descriptor the device gets for kicks.
    pub(crate) fn device_kick(&self) -> &EventFd {
        self.device_kick.as_ref().unwrap_or(&self.kick)
    }

    /// The file descriptor the device gets for calls.
    pub(crate) fn device_call(&self) -> &EventFd {
        self.device_call.as_ref().unwrap_or(&self.call)
    }

    /// Whether the guest drains its call file descriptor: a call pipe is left to fill.
    fn drains_call(&self) -> bool {
        self.device_call.is_none()
    }

    /// Writes `bytes` as they are to the guest's end of the kick file descriptor.
    pub(crate) fn kick_raw(&self, bytes: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writes from a valid buffer of the given length to a descriptor we own.
        let r = unsafe { libc::write(self.kick.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    /// Puts `kick` in place of the guest's kick file descriptor; returns the old one.
    pub(crate) fn replace_kick(&mut self, kick: EventFd) -> EventFd {
        self.device_kick = None;
        std::mem::replace(&mut self.kick, kick)
    }

    /// Closes the guest's end of the kick file descriptor (a fresh eventfd takes its place):
    /// the device's end of a kick pipe then reads end-of-file.
    pub(crate) fn close_kick(&mut self) -> Result<()> {
        self.kick = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        Ok(())
    }

    /// Number of descriptors.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i`.
    pub(crate) fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let d = self.desc + 16 * i as u64;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&b, GuestAddress(d)).map_err(gm)
    }

    /// Makes chains headed by `heads` available and notifies the device if it wants that.
    pub(crate) fn publish(&mut self, mem: &GuestMemoryMmap, heads: &[u16]) -> Result<()> {
        let (size, avail, used) = (self.size, self.avail, self.used);
        let old = self.next_avail;
        let mut idx = old;
        for &h in heads {
            let slot = avail + 4 + 2 * (idx % size) as u64;
            mem.write_obj(h.to_le(), GuestAddress(slot)).map_err(gm)?;
            idx = idx.wrapping_add(1);
        }
        // Ring entries before the index that publishes them.
        fence(Ordering::SeqCst);
        mem.store(idx.to_le(), GuestAddress(avail + 2), Ordering::Release)
            .map_err(gm)?;
        self.next_avail = idx;
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let avail_event: u16 = u16::from_le(
                mem.load(GuestAddress(used + 4 + 8 * size as u64), Ordering::Acquire)
                    .map_err(gm)?,
            );
            // vring_need_event(): did the index pass the device's avail_event?
            idx.wrapping_sub(avail_event).wrapping_sub(1) < idx.wrapping_sub(old)
        } else {
            let flags: u16 = u16::from_le(
                mem.load(GuestAddress(used), Ordering::Acquire)
                    .map_err(gm)?,
            );
            flags & 1 == 0 // VRING_USED_F_NO_NOTIFY
        };
        if kick {
            self.kick.write(1).map_err(Error::EventFd)?;
        }
        Ok(())
    }

    /// The index the next published chain gets.
    pub(crate) fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Sets the available index to `idx` without writing any entry, and kicks: a hostile
    /// driver's move (more than a queue ahead is a state no driver can be in).
    pub(crate) fn force_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) -> Result<()> {
        fence(Ordering::SeqCst);
        mem.store(idx.to_le(), GuestAddress(self.avail + 2), Ordering::Release)
            .map_err(gm)?;
        self.next_avail = idx;
        self.kick.write(1).map_err(Error::EventFd)
    }

    /// Takes every used element without waiting. With `arm` (the caller will sleep if nothing
    /// comes), re-arms `used_event` first, so a completion that lands meanwhile is seen or
    /// notified; a caller that spins leaves it alone, as the kernel driver does, so the
    /// device sends at most one interrupt (for the last armed index) meanwhile.
    pub(crate) fn collect_used(
        &mut self,
        mem: &GuestMemoryMmap,
        out: &mut Vec<(u32, u32)>,
        arm: bool,
    ) -> Result<()> {
        loop {
            let (size, used) = (self.size, self.used);
            let used_idx: u16 = u16::from_le(
                mem.load(GuestAddress(used + 2), Ordering::Acquire)
                    .map_err(gm)?,
            );
            fence(Ordering::SeqCst);
            let mut last = self.last_used;
            let before = out.len();
            while last != used_idx {
                let e = used + 4 + 8 * (last % size) as u64;
                let id: u32 = u32::from_le(mem.read_obj(GuestAddress(e)).map_err(gm)?);
                let len: u32 = u32::from_le(mem.read_obj(GuestAddress(e + 4)).map_err(gm)?);
                out.push((id, len));
                last = last.wrapping_add(1);
            }
            self.last_used = last;
            if !arm {
                return Ok(());
            }
            if self.event_idx {
                // used_event: interrupt us on the next used element.
                mem.store(
                    last.to_le(),
                    GuestAddress(self.avail + 4 + 2 * size as u64),
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
                mem.load(GuestAddress(used + 2), Ordering::Acquire)
                    .map_err(gm)?,
            );
            if again == last {
                return Ok(());
            }
        }
    }
}

/// Waits (bounded by `timeout`) until any of the rings `qs` has used elements, and takes
/// them: `out[i]` gets ring `qs[i]`'s.
pub(crate) fn reap_any(
    mem: &GuestMemoryMmap,
    rings: &mut [Ring],
    qs: &[usize],
    timeout: Duration,
    out: &mut [Vec<(u32, u32)>],
) -> Result<()> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        // Poll a little before sleeping, as the kernel driver does: an answer usually comes
        // within microseconds, a wakeup costs more. Interrupts are asked for only once the
        // spinning is over.
        let now = Instant::now();
        let spinning = now - start < SPIN;
        let mut any = false;
        for (i, &q) in qs.iter().enumerate() {
            rings[q].collect_used(mem, &mut out[i], !spinning)?;
            any |= !out[i].is_empty();
        }
        if any {
            return Ok(());
        }
        if spinning {
            std::hint::spin_loop();
            continue;
        }
        if now >= deadline {
            return Err(Error::Timeout(timeout));
        }
        let mut pfds: Vec<libc::pollfd> = qs
            .iter()
            .map(|&q| libc::pollfd {
                fd: rings[q].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = (deadline - now).as_millis().min(1000) as i32;
        // SAFETY: `pfds` is a valid array of pollfds for the duration of the call.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        for &q in qs {
            // A call pipe is left to fill (see NotifyFd::Pipe).
            let woken = pfds
                .iter()
                .any(|p| p.fd == rings[q].call.as_raw_fd() && p.revents != 0);
            if woken && rings[q].drains_call() {
                let _ = rings[q].call.read();
            }
        }
    }
}
