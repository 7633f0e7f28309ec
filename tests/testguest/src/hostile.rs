// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a hostile driver can do to its rings that a correct one never does, for the isolation
//! tests: the device must survive each with only that queue lost.

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, Guest, Result};

impl Guest {
    /// The available index the driver of queue `q` (0: control, 1..: request queues) has
    /// published so far.
    pub fn avail_idx(&self, q: usize) -> Result<u16> {
        self.rings
            .get(q)
            .map(|r| r.next_avail())
            .ok_or(Error::Invalid("no such queue"))
    }

    /// The size of queue `q`.
    pub fn queue_size(&self, q: usize) -> Result<u16> {
        self.rings
            .get(q)
            .map(|r| r.size())
            .ok_or(Error::Invalid("no such queue"))
    }

    /// Sets queue `q`'s available index to `idx` without publishing any entry, and kicks.
    /// No request may be in flight on `q` afterwards.
    pub fn hostile_set_avail_idx(&mut self, q: usize, idx: u16) -> Result<()> {
        let ring = self
            .rings
            .get_mut(q)
            .ok_or(Error::Invalid("no such queue"))?;
        ring.force_avail_idx(&self.vmm.mem, idx)
    }

    /// Publishes `heads` on queue `q` as they are (e.g. indexes past the descriptor table),
    /// and kicks if the device asked for it.
    pub fn hostile_publish_heads(&mut self, q: usize, heads: &[u16]) -> Result<()> {
        let ring = self
            .rings
            .get_mut(q)
            .ok_or(Error::Invalid("no such queue"))?;
        ring.publish(&self.vmm.mem, heads)
    }

    /// Writes `bytes` as they are to queue `q`'s kick file descriptor: with a kick pipe
    /// ([`crate::NotifyFd::Pipe`]) fewer than 8 bytes is half a kick, which a reader of whole
    /// 8-byte counters waits for the rest of.
    pub fn hostile_kick_bytes(&mut self, q: usize, bytes: &[u8]) -> Result<usize> {
        let ring = self.rings.get(q).ok_or(Error::Invalid("no such queue"))?;
        ring.kick_raw(bytes).map_err(Error::EventFd)
    }

    /// Closes the guest's end of queue `q`'s kick file descriptor: the device's end of a kick
    /// pipe then reads end-of-file. Kicks on `q` go nowhere afterwards.
    pub fn hostile_close_kick(&mut self, q: usize) -> Result<()> {
        self.rings
            .get_mut(q)
            .ok_or(Error::Invalid("no such queue"))?
            .close_kick()
    }

    /// Hands the device a new kick eventfd for queue `q` while the queue runs (a VMM stops the
    /// ring first), a blocking one if `blocking`, and returns the old one, which the device may
    /// still be waiting on: a kick on it then has the device read the new one.
    pub fn hostile_replace_kick(&mut self, q: usize, blocking: bool) -> Result<EventFd> {
        let flags = if blocking { 0 } else { EFD_NONBLOCK };
        let kick = EventFd::new(flags).map_err(Error::EventFd)?;
        if q >= self.rings.len() {
            return Err(Error::Invalid("no such queue"));
        }
        self.vmm.set_vring_kick(q, &kick)?;
        Ok(self.rings[q].replace_kick(kick))
    }
}
