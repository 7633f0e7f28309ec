// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A split queue's available and used rings seen as slices of host memory, read and written
//! as virtio-queue's `AvailIter` and `add_used` do, without a region look-up and a checked
//! copy per entry; and the EVENT_IDX decision `needs_notification` makes, on a count the
//! device keeps itself (virtio-queue counts only what its own `add_used` adds).
//!
//! The rings are the guest's: every index read from them is checked before use, and every
//! access stays inside the slices, whatever the guest writes meanwhile.

use std::num::Wrapping;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, VolatileSlice};

/// Offset of the first entry in either ring (flags, then index, 2 bytes each).
const RING_HEADER: usize = 4;
/// Offset of the ring index in either ring.
const IDX: usize = 2;
/// An available ring entry (a head index) and a used ring entry (id, length).
const AVAIL_ENTRY: usize = 2;
const USED_ENTRY: usize = 8;

/// Bytes of an available ring of `size` entries, `used_event` included.
pub(super) fn avail_ring_bytes(size: u16) -> usize {
    RING_HEADER + AVAIL_ENTRY * usize::from(size) + 2
}

/// Bytes of a used ring of `size` entries, `avail_event` included.
pub(super) fn used_ring_bytes(size: u16) -> usize {
    RING_HEADER + USED_ENTRY * usize::from(size) + 2
}

/// Where `used_event` lies in the available ring.
pub(super) fn used_event_offset(size: u16) -> u64 {
    (RING_HEADER + AVAIL_ENTRY * usize::from(size)) as u64
}

/// The two rings of a queue of `size` entries, each one slice of host memory.
pub(super) struct Rings<'a, B> {
    avail: VolatileSlice<'a, B>,
    used: VolatileSlice<'a, B>,
    size: u16,
}

impl<'a, B: BitmapSlice> Rings<'a, B> {
    /// The rings in `avail` and `used` (what `get_slice` gave for each ring's guest range),
    /// if each is whole and its host address aligned for the ring's widest field (the guest
    /// addresses are, virtio-queue checks that; a region's host mapping need not keep it, and
    /// vm-memory refuses an unaligned atomic access). `None` leaves the queue to virtio-queue.
    pub(super) fn new(
        avail: VolatileSlice<'a, B>,
        used: VolatileSlice<'a, B>,
        size: u16,
    ) -> Option<Self> {
        let aligned = |s: &VolatileSlice<'a, B>, a: usize| {
            (s.ptr_guard().as_ptr() as usize).is_multiple_of(a)
        };
        (size != 0
            && avail.len() == avail_ring_bytes(size)
            && used.len() == used_ring_bytes(size)
            && aligned(&avail, 2)
            && aligned(&used, 4))
        .then_some(Rings { avail, used, size })
    }

    /// The available index, read as `Queue::iter` reads it (acquire: the entries it announces
    /// are read after it). `None` only if the slice refuses the access, which `new` rules out.
    pub(super) fn avail_idx(&self) -> Option<u16> {
        self.avail.load::<u16>(IDX, Acquire).ok().map(u16::from_le)
    }

    /// The head index the driver put at position `pos` of the available ring (taken modulo
    /// the queue size, as `AvailIter` does). Not checked against the queue size: the caller
    /// does that.
    pub(super) fn head(&self, pos: u16) -> Option<u16> {
        let off = RING_HEADER + AVAIL_ENTRY * usize::from(pos % self.size);
        self.avail.load::<u16>(off, Acquire).ok().map(u16::from_le)
    }

    /// Returns chain `head` with `len` bytes written at position `next_used` of the used ring
    /// and publishes `next_used + 1` as the used index, as `add_used` does: the entry first,
    /// the index after it with release order. `None` (nothing written) for a head past the
    /// queue, as `add_used` refuses one.
    pub(super) fn push_used(&self, next_used: u16, head: u16, len: u32) -> Option<()> {
        if head >= self.size {
            return None;
        }
        let off = RING_HEADER + USED_ENTRY * usize::from(next_used % self.size);
        self.used
            .store(u32::from(head).to_le(), off, Relaxed)
            .ok()?;
        self.used.store(len.to_le(), off + 4, Relaxed).ok()?;
        self.used
            .store(next_used.wrapping_add(1).to_le(), IDX, Release)
            .ok()
    }
}

/// Whether the driver asked to be notified, with EVENT_IDX, now that the used index is
/// `used_idx` after `added` entries since the last decision: whether `used_event` lies among
/// the indexes those entries passed (virtio 1.x 2.7.10; virtio-queue's and Linux's test, with
/// the count kept wide so that more than 65,535 entries between two decisions notify too).
pub(super) fn needs_notification(used_idx: u16, used_event: u16, added: u64) -> bool {
    let passed = (Wrapping(used_idx) - Wrapping(used_event) - Wrapping(1)).0;
    u64::from(passed) < added
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn rings<'a>(mem: &'a GuestMemoryMmap, q: &Queue) -> Rings<'a, ()> {
        let avail = mem
            .get_slice(GuestAddress(q.avail_ring()), avail_ring_bytes(q.size()))
            .expect("avail ring");
        let used = mem
            .get_slice(GuestAddress(q.used_ring()), used_ring_bytes(q.size()))
            .expect("used ring");
        Rings::new(avail, used, q.size()).expect("whole and aligned")
    }

    /// Random ring contents and positions: the heads read from the slice are the ones
    /// virtio-queue's iterator yields, entries pushed leave the used ring byte for byte as
    /// `add_used` leaves it, and the notification decision on the device's own count is
    /// virtio-queue's on its count.
    #[test]
    fn rings_read_and_written_as_virtio_queue_does() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).expect("guest memory");
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (mut notified, mut quiet) = (0, 0);
        for _ in 0..2000 {
            let size = [1u16, 2, 4, 16, 64, 256][rnd(6) as usize];
            let vq = MockSplitQueue::create(&mem, GuestAddress(0), size);
            let mut a: Queue = vq.create_queue().expect("queue");
            a.set_event_idx(true);
            // Random ring contents: heads in and past the queue, any used_event.
            for i in 0..size {
                let h = rnd(u64::from(size) + 2) as u16;
                mem.write_obj(
                    h.to_le(),
                    GuestAddress(a.avail_ring() + 4 + 2 * u64::from(i)),
                )
                .expect("entry");
            }
            // used_event anywhere, or (mostly) around where the used index goes.
            let next_used = rnd(1 << 16) as u16;
            let used_event = if rnd(4) == 0 {
                rnd(1 << 16) as u16
            } else {
                next_used
                    .wrapping_add(rnd(2 * u64::from(size) + 2) as u16)
                    .wrapping_sub(1)
            };
            mem.write_obj(
                used_event.to_le(),
                GuestAddress(a.avail_ring() + used_event_offset(size)),
            )
            .expect("used_event");
            let start = rnd(1 << 16) as u16;
            let pending = rnd(u64::from(size) + 1) as u16;
            a.set_next_avail(start);
            a.set_next_used(next_used);
            mem.write_obj(
                start.wrapping_add(pending).to_le(),
                GuestAddress(a.avail_ring() + 2),
            )
            .expect("avail idx");
            let r = rings(&mem, &a);
            assert_eq!(r.avail_idx(), Some(start.wrapping_add(pending)));
            let heads: Vec<u16> = a
                .iter(&mem)
                .expect("iter")
                .map(|c| c.head_index())
                .collect();
            let ours: Vec<u16> = (0..pending)
                .map(|k| r.head(start.wrapping_add(k)).expect("head"))
                .collect();
            assert_eq!(ours, heads);

            // Return some of those chains both ways, on copies of the used ring.
            let used_at = GuestAddress(a.used_ring());
            let bytes = used_ring_bytes(size);
            let mut before = vec![0u8; bytes];
            mem.read_slice(&mut before, used_at).expect("used ring");
            let first = a.next_used();
            let mut theirs = Vec::new();
            let n = rnd(u64::from(size) + 1) as u16;
            for k in 0..n {
                let (head, len) = (
                    heads.get(usize::from(k)).copied().unwrap_or(0),
                    rnd(1 << 32),
                );
                let ok = a.add_used(&mem, head, len as u32).is_ok();
                theirs.push((head, len as u32, ok));
            }
            let mut after_theirs = vec![0u8; bytes];
            mem.read_slice(&mut after_theirs, used_at)
                .expect("used ring");
            mem.write_slice(&before, used_at).expect("used ring");
            let mut next = first;
            for &(head, len, ok) in &theirs {
                assert_eq!(r.push_used(next, head, len).is_some(), ok);
                if ok {
                    next = next.wrapping_add(1);
                }
            }
            let mut after_ours = vec![0u8; bytes];
            mem.read_slice(&mut after_ours, used_at).expect("used ring");
            assert_eq!(after_ours, after_theirs);
            assert_eq!(next, a.next_used());

            let added = u64::from(next.wrapping_sub(first));
            let want = a.needs_notification(&mem).expect("needs_notification");
            let got = needs_notification(
                next,
                mem.load(
                    GuestAddress(a.avail_ring() + used_event_offset(size)),
                    Ordering::Relaxed,
                )
                .map(u16::from_le)
                .expect("used_event"),
                added,
            );
            assert_eq!(got, want, "size {size} next_used {next} added {added}");
            if want {
                notified += 1;
            } else {
                quiet += 1;
            }
        }
        assert!(
            notified > 100 && quiet > 100,
            "{notified} notified, {quiet} quiet"
        );
    }

    /// Past 65,535 entries between two decisions every used_event has been passed.
    #[test]
    fn a_wrapped_count_still_notifies() {
        for used_event in [0u16, 1, 0x7fff, 0xfffe, 0xffff] {
            assert!(needs_notification(5, used_event, 1 << 16));
            assert!(needs_notification(5, used_event, u64::MAX));
        }
        assert!(!needs_notification(5, 5, 0));
        assert!(needs_notification(5, 4, 1));
        assert!(!needs_notification(5, 5, 1));
    }

    /// A ring that is not whole, or not aligned in host memory, is left to virtio-queue.
    #[test]
    fn rings_are_used_directly_only_whole_and_aligned() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
        let s = |a: u64, n: usize| mem.get_slice(GuestAddress(a), n).expect("slice");
        let (a, u) = (avail_ring_bytes(8), used_ring_bytes(8));
        // (available ring at, its length, used ring at, its length, queue size, direct)
        for (at_a, len_a, at_u, len_u, size, direct) in [
            (0x100, a, 0x200, u, 8, true),
            (0x100, a - 1, 0x200, u, 8, false),
            (0x100, a, 0x200, u - 2, 8, false),
            (0x101, a, 0x200, u, 8, false),
            (0x100, a, 0x202, u, 8, false),
            (
                0x100,
                avail_ring_bytes(0),
                0x200,
                used_ring_bytes(0),
                0,
                false,
            ),
        ] {
            let r = Rings::new(s(at_a, len_a), s(at_u, len_u), size);
            assert_eq!(
                r.is_some(),
                direct,
                "{at_a:#x} {len_a} {at_u:#x} {len_u} {size}"
            );
        }
    }

    /// The used ring's entry and index written through the slice are marked dirty for live
    /// migration, at the right offsets of their region (the ring in the second region, its
    /// index and the entry on different pages).
    #[test]
    fn used_ring_writes_are_logged() {
        use vm_memory::bitmap::{AtomicBitmap, Bitmap};
        use vm_memory::GuestMemoryRegion;
        let mem: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let size = 256u16;
        let (avail, used) = (0x1_1000u64, 0x1_2ff8u64);
        let r = Rings::new(
            mem.get_slice(GuestAddress(avail), avail_ring_bytes(size))
                .unwrap(),
            mem.get_slice(GuestAddress(used), used_ring_bytes(size))
                .unwrap(),
            size,
        )
        .unwrap();
        let dirty = |a: u64| {
            let (reg, off) = mem.to_region_addr(GuestAddress(a)).unwrap();
            reg.bitmap().dirty_at(off.0 as usize)
        };
        assert!(!dirty(used + 2) && !dirty(used + 4 + 8 * 10));
        r.push_used(10, 3, 77).unwrap();
        assert!(dirty(used + 2), "used index not logged");
        assert!(dirty(used + 4 + 8 * 10), "used entry not logged");
        assert!(!dirty(0x1_5000));
        assert!(!dirty(0x2000));
    }
}
