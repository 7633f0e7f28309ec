// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request chains: a descriptor chain copied into a fixed array and split into its readable
//! and writable parts, and byte access to each part however the driver split it into
//! descriptors (the framing is the driver's choice, see docs/virtio-tmem.md).
//!
//! Nothing here trusts the guest: lengths and addresses are checked, a chain too long or with
//! a readable descriptor after a writable one is refused.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, VolatileMemory, VolatileSlice,
};

/// Most descriptors in one request chain; longer chains are INVALID.
pub const MAX_SEGMENTS: usize = 16;

/// One descriptor of a parsed chain.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Seg {
    pub(super) addr: u64,
    pub(super) len: u32,
}

/// A chain split into its device-readable and device-writable parts, without allocation.
#[derive(Debug)]
pub(super) struct Chain {
    /// The head descriptor's index, for the used ring.
    pub(super) head: u16,
    segs: [Seg; MAX_SEGMENTS],
    /// `segs[..n_read]` are readable, `segs[n_read..n]` writable.
    n_read: usize,
    n: usize,
    pub(super) read_len: usize,
    pub(super) write_len: usize,
}

const DESC_SIZE: usize = std::mem::size_of::<Descriptor>();

/// A split ring's descriptor table seen as one slice of host memory, when it lies in one
/// memory region at a host address aligned for a descriptor.
pub(super) struct DescTable<'a, B> {
    slice: VolatileSlice<'a, B>,
    size: u16,
}

/// Bytes of a descriptor table of `size` entries.
pub(super) fn desc_table_bytes(size: u16) -> usize {
    usize::from(size) * DESC_SIZE
}

impl<'a, B: BitmapSlice> DescTable<'a, B> {
    /// The table of `size` descriptors in `slice` (what `get_slice` gave for the table's
    /// guest range), if its host address is aligned for a `Descriptor`: the ring is 16-byte
    /// aligned in guest memory, but a region's host mapping need not keep that. vm-memory
    /// 0.18 loads through a packed wrapper, so an unaligned table would read correctly too;
    /// the check keeps `load` from depending on that (a VMM that misaligns its regions only
    /// gets the slower walk).
    pub(super) fn new(slice: VolatileSlice<'a, B>, size: u16) -> Option<Self> {
        let aligned = (slice.ptr_guard().as_ptr() as usize)
            .is_multiple_of(std::mem::align_of::<Descriptor>());
        (aligned && slice.len() == desc_table_bytes(size)).then_some(DescTable { slice, size })
    }

    /// Asks for the cache line of descriptor `index` (a hint; an index past the table is
    /// ignored).
    pub(super) fn prefetch(&self, index: u16) {
        if index < self.size {
            super::prefetch_ptr(
                self.slice
                    .ptr_guard()
                    .as_ptr()
                    .wrapping_add(usize::from(index) * DESC_SIZE),
            );
        }
    }
}

/// Why a chain could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChainError {
    TooLong,
    ReadableAfterWritable,
}

impl Chain {
    /// A chain with no descriptors, the room for the most a chain may have (the worker keeps
    /// a burst of them and parses into them in place: a chain is a few hundred bytes).
    pub(super) fn empty(head: u16) -> Chain {
        Chain {
            head,
            segs: [Seg::default(); MAX_SEGMENTS],
            n_read: 0,
            n: 0,
            read_len: 0,
            write_len: 0,
        }
    }

    /// Forgets the descriptors, to parse the chain at `head` into this room.
    fn reset(&mut self, head: u16) {
        self.head = head;
        self.n_read = 0;
        self.n = 0;
        self.read_len = 0;
        self.write_len = 0;
    }

    /// Appends the next descriptor of the chain.
    fn push(&mut self, d: &Descriptor) -> Result<(), ChainError> {
        if self.n == MAX_SEGMENTS {
            return Err(ChainError::TooLong);
        }
        if d.is_write_only() {
            self.write_len += d.len() as usize;
        } else {
            if self.n != self.n_read {
                return Err(ChainError::ReadableAfterWritable);
            }
            self.n_read += 1;
            self.read_len += d.len() as usize;
        }
        self.segs[self.n] = Seg {
            addr: d.addr().0,
            len: d.len(),
        };
        self.n += 1;
        Ok(())
    }

    /// Parses `chain` into this room (its head included, also on failure).
    pub(super) fn parse_from<M>(&mut self, chain: DescriptorChain<M>) -> Result<(), ChainError>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        self.reset(chain.head_index());
        for d in chain {
            self.push(&d)?;
        }
        Ok(())
    }

    /// Parses a chain; on failure, returns its head with the reason.
    #[cfg(test)]
    pub(super) fn parse<M>(chain: DescriptorChain<M>) -> Result<Chain, (u16, ChainError)>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut c = Chain::empty(head);
        c.parse_from(chain).map_err(|e| (head, e))?;
        Ok(c)
    }

    /// Parses the chain at `head` straight from `table` into this room, descriptor for
    /// descriptor as [`Chain::parse_from`] does through virtio-queue (the same end conditions:
    /// an index past the table, `size` descriptors, 4 GiB in total), without a region look-up
    /// per descriptor. `None` when the chain goes through an indirect table: that walk is left
    /// to `parse_from`.
    pub(super) fn parse_in_place<B: BitmapSlice>(
        &mut self,
        table: &DescTable<'_, B>,
        head: u16,
    ) -> Option<Result<(), ChainError>> {
        self.reset(head);
        let (mut next, mut ttl, mut bytes) = (head, table.size, 0u32);
        while ttl != 0 && next < table.size {
            let d: Descriptor = table
                .slice
                .get_ref::<Descriptor>(usize::from(next) * DESC_SIZE)
                .ok()?
                .load();
            if d.refers_to_indirect_table() {
                return None;
            }
            let Some(b) = bytes.checked_add(d.len()) else {
                break;
            };
            bytes = b;
            if d.has_next() {
                next = d.next();
                ttl -= 1;
            } else {
                ttl = 0;
            }
            if let Err(e) = self.push(&d) {
                return Some(Err(e));
            }
        }
        Some(Ok(()))
    }

    pub(super) fn readable(&self) -> &[Seg] {
        &self.segs[..self.n_read]
    }

    pub(super) fn writable(&self) -> &[Seg] {
        &self.segs[self.n_read..self.n]
    }
}

/// Where `[offset, offset + len)` of a part lies, if within one descriptor.
pub(super) fn contiguous(segs: &[Seg], mut offset: usize, len: usize) -> Option<GuestAddress> {
    for s in segs {
        let l = s.len as usize;
        if offset < l {
            if offset + len > l {
                return None;
            }
            // Checked: descriptor addresses come from the guest.
            return s.addr.checked_add(offset as u64).map(GuestAddress);
        }
        offset -= l;
    }
    None
}

/// Calls `f(address, range of the caller's buffer)` for each piece of bytes
/// `[offset, offset + len)` of a part, in order; fails if the part is shorter or `f` fails.
fn for_each_piece(
    segs: &[Seg],
    mut offset: usize,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut done = 0;
    for s in segs {
        if done == len {
            break;
        }
        let l = s.len as usize;
        if offset >= l {
            offset -= l;
            continue;
        }
        let n = (l - offset).min(len - done);
        let addr = GuestAddress(s.addr).checked_add(offset as u64).ok_or(())?;
        f(addr, done..done + n)?;
        done += n;
        offset = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(())
    }
}

/// Copies `buf.len()` bytes from offset `offset` of a part into `buf`.
pub(super) fn read_part<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    offset: usize,
    buf: &mut [u8],
) -> Result<(), ()> {
    for_each_piece(segs, offset, buf.len(), |a, r| {
        let b = &mut buf[r];
        // One region look-up and one copy for a piece inside one region (every header the
        // usual way: `get_slice` gives exactly that many bytes or fails); vm-memory's general
        // path, which walks regions, for the rest.
        match mem.get_slice(a, b.len()) {
            Ok(v) => {
                v.copy_to(b);
                Ok(())
            }
            Err(_) => mem.read_slice(b, a).map_err(|_| ()),
        }
    })
}

/// Copies `buf` to offset `offset` of a part.
pub(super) fn write_part<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    offset: usize,
    buf: &[u8],
) -> Result<(), ()> {
    for_each_piece(segs, offset, buf.len(), |a, r| {
        let b = &buf[r];
        // As in `read_part`; `copy_from` marks the bytes dirty as `write_slice` does.
        match mem.get_slice(a, b.len()) {
            Ok(v) => {
                v.copy_from(b);
                Ok(())
            }
            Err(_) => mem.write_slice(b, a).map_err(|_| ()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryMmap, GuestMemoryRegion};

    /// Random descriptor tables (flags, next indices in and past the table, lengths up to
    /// 4 GiB, loops): every head parses the same read straight from the table as through
    /// virtio-queue's walk, same segments or same error, and the direct walk declines only
    /// chains that reach an indirect descriptor (those left to virtio-queue).
    #[test]
    fn chains_read_from_the_table_parse_as_virtio_queue_walks_them() {
        // What a parsed chain says (segments past its end are left over from the last one).
        let view = |c: &Chain| {
            format!(
                "{} {:?} {:?} {} {}",
                c.head,
                c.readable(),
                c.writable(),
                c.read_len,
                c.write_len
            )
        };
        // Both walks parse into rooms used over and over, as a worker's burst does.
        let (mut room, mut walked_room) = (Chain::empty(0), Chain::empty(0));
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (mut same, mut errors, mut declined, mut cut) = (0, 0, 0, 0);
        for _ in 0..3000 {
            let size = [1u16, 2, 4, 8, 16, 32, 64, 256][rnd(8) as usize];
            let vq = MockSplitQueue::create(&mem, GuestAddress(0), size);
            let mut descs = Vec::new();
            for i in 0..size {
                let mut flags = 0;
                if rnd(4) != 0 {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                if rnd(3) == 0 {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if rnd(24) == 0 {
                    flags |= VRING_DESC_F_INDIRECT as u16;
                }
                // Mostly the neighbour, as drivers chain them; sometimes anywhere or past the end.
                let next = match rnd(4) {
                    0 => rnd(u64::from(size) + 2) as u16,
                    _ => i.wrapping_add(1),
                };
                let len = [0, 16, 4096, 1 << 31, u32::MAX, rnd(1 << 32) as u32][rnd(6) as usize];
                let d = Descriptor::new(0x8000 + 16 * u64::from(i), len, flags, next);
                vq.desc_table()
                    .store(i, RawDescriptor::from(d))
                    .expect("descriptor");
                descs.push(d);
            }
            for i in 0..size {
                vq.avail().ring().ref_at(i as usize).expect("slot").store(i);
            }
            vq.avail().idx().store(size);
            let mut q: Queue = vq.create_queue().expect("queue");
            let slice = mem
                .get_slice(vq.desc_table_addr(), desc_table_bytes(size))
                .expect("one region");
            let table = DescTable::new(slice, size).expect("aligned");
            for c in q.iter(&mem).expect("ring") {
                let head = c.head_index();
                let direct = room
                    .parse_in_place(&table, head)
                    .map(|r| r.map(|()| view(&room)).map_err(|e| (head, e)));
                let walked = walked_room
                    .parse_from(c)
                    .map(|()| view(&walked_room))
                    .map_err(|e| (head, e));
                // What virtio-queue's walk from `head` meets before it ends: an indirect
                // descriptor, or more than 4 GiB.
                let (mut i, mut steps, mut indirect, mut over, mut total) =
                    (head, 0, false, false, 0u64);
                while steps < size && i < size {
                    let d = descs[usize::from(i)];
                    if d.refers_to_indirect_table() {
                        indirect = true;
                        break;
                    }
                    total += u64::from(d.len());
                    if total > u64::from(u32::MAX) {
                        over = true;
                        break;
                    }
                    steps += 1;
                    if !d.has_next() {
                        break;
                    }
                    i = d.next();
                }
                match direct {
                    None => {
                        assert!(indirect, "declined a chain without an indirect descriptor");
                        declined += 1;
                    }
                    Some(d) => {
                        assert_eq!(format!("{d:?}"), format!("{walked:?}"), "head {head}");
                        same += 1;
                        errors += usize::from(d.is_err());
                        cut += usize::from(over);
                    }
                }
            }
        }
        // Every kind of case came up: plain, refused, over 4 GiB, indirect.
        assert!(same > 10_000 && errors > 1000 && cut > 1000 && declined > 500);
    }

    /// A table at a host address not aligned for a descriptor, or of another length than its
    /// size says, is not read directly.
    #[test]
    fn a_table_is_read_directly_only_aligned_and_whole() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
        let at = |addr, len| mem.get_slice(GuestAddress(addr), len).expect("slice");
        assert!(DescTable::new(at(0x1000, 4 * DESC_SIZE), 4).is_some());
        assert!(DescTable::new(at(0x1008, 4 * DESC_SIZE), 4).is_some());
        assert!(DescTable::new(at(0x1004, 4 * DESC_SIZE), 4).is_none());
        assert!(DescTable::new(at(0x1000, 3 * DESC_SIZE), 4).is_none());
    }

    /// Bytes inside one region take the one-slice path; bytes across two adjacent regions, or
    /// split over descriptors, the general one; bytes partly outside memory are refused.
    #[test]
    fn parts_inside_one_region_or_across_two() {
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let data: Vec<u8> = (0..48u8).collect();
        for (addr, split) in [(0x100, 48), (0x1000 - 24, 48), (0x800, 10)] {
            let segs = [
                Seg { addr, len: split },
                Seg {
                    addr: addr + u64::from(split),
                    len: 48 - split,
                },
            ];
            write_part(&mem, &segs, 0, &data).unwrap();
            let mut back = [0u8; 48];
            mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
            assert_eq!(back[..], data[..], "written at {addr:#x}");
            let mut got = [0u8; 48];
            read_part(&mem, &segs, 0, &mut got).unwrap();
            assert_eq!(got[..], data[..], "read at {addr:#x}");
        }
        // Both paths mark what they write in the dirty log, as `write_slice` does.
        let logged: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x2000), 0x2000),
        ])
        .unwrap();
        for addr in [0x100, 0x2000 - 24] {
            let segs = [Seg { addr, len: 48 }];
            write_part(&logged, &segs, 0, &data).unwrap();
            for a in [addr, addr + 47] {
                let (region, off) = logged.to_region_addr(GuestAddress(a)).unwrap();
                assert!(
                    region.bitmap().dirty_at(off.0 as usize),
                    "{a:#x} not logged"
                );
            }
        }
        let (region, off) = logged.to_region_addr(GuestAddress(0x3000)).unwrap();
        assert!(!region.bitmap().dirty_at(off.0 as usize));

        let outside = [Seg {
            addr: 0x2000 - 8,
            len: 48,
        }];
        let mut got = [0u8; 48];
        assert!(read_part(&mem, &outside, 0, &mut got).is_err());
        assert!(write_part(&mem, &outside, 0, &data).is_err());
    }
}
