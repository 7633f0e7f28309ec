// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Request chains: a descriptor chain copied into a fixed array and split into its readable
//! and writable parts, and byte access to each part however the driver split it into
//! descriptors (the framing is the driver's choice, see docs/virtio-tmem.md).
//!
//! Nothing here trusts the guest: lengths and addresses are checked, a chain too long or with
//! a readable descriptor after a writable one is refused.

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

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

/// Why a chain could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChainError {
    TooLong,
    ReadableAfterWritable,
}

impl Chain {
    /// Parses a chain; on failure, returns its head with the reason.
    pub(super) fn parse<M>(chain: DescriptorChain<M>) -> Result<Chain, (u16, ChainError)>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut c = Chain {
            head,
            segs: [Seg::default(); MAX_SEGMENTS],
            n_read: 0,
            n: 0,
            read_len: 0,
            write_len: 0,
        };
        for d in chain {
            if c.n == MAX_SEGMENTS {
                return Err((head, ChainError::TooLong));
            }
            if d.is_write_only() {
                c.write_len += d.len() as usize;
            } else {
                if c.n != c.n_read {
                    return Err((head, ChainError::ReadableAfterWritable));
                }
                c.n_read += 1;
                c.read_len += d.len() as usize;
            }
            c.segs[c.n] = Seg {
                addr: d.addr().0,
                len: d.len(),
            };
            c.n += 1;
        }
        Ok(c)
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
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryMmap, GuestMemoryRegion};

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
