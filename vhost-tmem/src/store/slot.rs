// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One stored page in 16 bytes: a same-filled pattern, or a thin pointer to its payload.
//!
//! A `Box<[u8]>` is a fat pointer (16 bytes) and an enum around it takes 24; keeping the length
//! beside a thin pointer in one 16-byte slot is what keeps the store under 32 bytes of metadata
//! per page (see the engine's layout notes).

use std::ptr::NonNull;

use super::arena::{self, Arena};
use super::codec::Encoding;
use super::page::PageSrc;
use shared_proto::PAGE_SIZE;

/// A stored page. Owns its payload, an object of the engine's [`Arena`].
pub struct Slot {
    /// The payload's first byte, or the fill pattern when `len == 0`.
    word: u64,
    /// Payload length; 0 for a same-filled page.
    len: u16,
    enc: Encoding,
    /// A byte of the slot's padding lent to whoever holds it: a run of one page keeps its
    /// page's bit and its reference bit here (see `runs::Run`).
    tag: u8,
}

// SAFETY: a Slot owns its payload object exclusively (like a Box<[u8]>), and the arena frees
// from any thread, so moving it to or sharing it with another thread is as safe as for a Box.
unsafe impl Send for Slot {}
// SAFETY: see Send; shared access only reads.
unsafe impl Sync for Slot {}

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Every 8-byte word of the page is this value.
    Same(u64),
    /// Compressed or raw bytes.
    Stored(Encoding, &'a [u8]),
}

impl Slot {
    /// A same-filled page.
    pub fn same(pattern: u64) -> Slot {
        Slot {
            word: pattern,
            len: 0,
            enc: Encoding::Raw,
            tag: 0,
        }
    }

    /// A page stored as `bytes` (1..=`arena::MAX_PAYLOAD` bytes), copied into an arena
    /// object of its size class.
    pub(super) fn stored(arena: &Arena, enc: Encoding, bytes: &[u8]) -> Slot {
        let p = arena.alloc_copy(bytes);
        Slot {
            word: p.as_ptr() as u64,
            len: bytes.len() as u16,
            enc,
            tag: 0,
        }
    }

    /// A page stored as it is (raw), copied straight from where it lies, guest memory
    /// included: the one copy a raw page gets.
    pub(super) fn stored_page(arena: &Arena, page: PageSrc<'_>) -> Slot {
        // SAFETY: a `PageSrc` points to PAGE_SIZE readable bytes (its invariant), which are a
        // guest page or a caller's buffer, never a free arena object.
        let p = unsafe { arena.alloc_copy_raw(page.as_ptr(), PAGE_SIZE) };
        Slot {
            word: p.as_ptr() as u64,
            len: PAGE_SIZE as u16,
            enc: Encoding::Raw,
            tag: 0,
        }
    }

    /// The page's content.
    pub fn payload(&self) -> Payload<'_> {
        if self.len == 0 {
            return Payload::Same(self.word);
        }
        // SAFETY: `word` is an arena object holding `len` bytes copied in `stored`, freed only
        // in Drop, so it points to `len` initialized bytes that live as long as self.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.word as *const u8, self.len as usize) };
        Payload::Stored(self.enc, bytes)
    }

    /// Payload bytes (0 for a same-filled page).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub(super) fn tag(&self) -> u8 {
        self.tag
    }

    pub(super) fn set_tag(&mut self, tag: u8) {
        self.tag = tag;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        let p = NonNull::new(self.word as *mut u8).expect("a stored slot has a payload");
        // SAFETY: `p` is the object `stored` allocated for `len` bytes, and Drop runs once.
        unsafe { arena::free(p, self.len as usize) };
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.payload() {
            Payload::Same(w) => write!(f, "Slot::Same({w:#x})"),
            Payload::Stored(e, b) => write!(f, "Slot::Stored({e:?}, {} bytes)", b.len()),
        }
    }
}

/// A run's slots in index order. A run of one page (small files, scattered swap slots: the
/// common sparse case) keeps its slot inline, with no allocation; more go to a vector behind
/// one pointer, so that `Slots` stays 16 bytes (the tag lives in the slot's encoding byte).
#[derive(Debug, Default)]
pub(super) enum Slots {
    #[default]
    Empty,
    One(Slot),
    // Boxed on purpose: a thin pointer keeps `Slots` at 16 bytes (see above).
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Slot>>),
}

const _: () = assert!(std::mem::size_of::<Slots>() == 16);

/// Room the vector gets when a run gets its second page: runs grow 2, 4, 8, 16.
const FIRST_MANY: usize = 2;

impl Slots {
    pub(super) fn as_slice(&self) -> &[Slot] {
        match self {
            Slots::Empty => &[],
            Slots::One(s) => std::slice::from_ref(s),
            Slots::Many(v) => v,
        }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [Slot] {
        match self {
            Slots::Empty => &mut [],
            Slots::One(s) => std::slice::from_mut(s),
            Slots::Many(v) => v,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Heap bytes held (the vector and its room); what a run's charge for its slots covers.
    /// They only grow while the run lives, so a charge taken per insert is given back whole
    /// when the run goes.
    pub(super) fn heap_bytes(&self) -> u64 {
        match self {
            Slots::Empty | Slots::One(_) => 0,
            Slots::Many(v) => {
                (std::mem::size_of::<Vec<Slot>>() + v.capacity() * std::mem::size_of::<Slot>())
                    as u64
            }
        }
    }

    /// Inserts `slot` at `at` (at most `len()`).
    pub(super) fn insert(&mut self, at: usize, slot: Slot) {
        match self {
            Slots::Empty => {
                debug_assert_eq!(at, 0);
                *self = Slots::One(slot);
            }
            Slots::One(_) => {
                let Slots::One(first) = std::mem::take(self) else {
                    unreachable!("matched One")
                };
                let mut v = Vec::with_capacity(FIRST_MANY);
                v.push(first);
                v.insert(at, slot);
                *self = Slots::Many(Box::new(v));
            }
            Slots::Many(v) => v.insert(at, slot),
        }
    }

    /// Removes the slot at `at`. A vector keeps its room (see [`Slots::heap_bytes`]).
    pub(super) fn remove(&mut self, at: usize) -> Slot {
        match self {
            Slots::Empty => panic!("remove from no slots"),
            Slots::One(_) => {
                assert_eq!(at, 0, "one slot");
                let Slots::One(s) = std::mem::take(self) else {
                    unreachable!("matched One")
                };
                s
            }
            Slots::Many(v) => v.remove(at),
        }
    }
}

impl std::ops::Index<usize> for Slots {
    type Output = Slot;
    fn index(&self, i: usize) -> &Slot {
        &self.as_slice()[i]
    }
}

impl std::ops::IndexMut<usize> for Slots {
    fn index_mut(&mut self, i: usize) -> &mut Slot {
        &mut self.as_mut_slice()[i]
    }
}

impl<'a> IntoIterator for &'a Slots {
    type Item = &'a Slot;
    type IntoIter = std::slice::Iter<'a, Slot>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_grow_inline_then_on_the_heap_and_keep_their_order() {
        let mut s = Slots::default();
        assert_eq!((s.len(), s.heap_bytes()), (0, 0));
        s.insert(0, Slot::same(5));
        assert!(matches!(s, Slots::One(_)));
        assert_eq!(s.heap_bytes(), 0);
        s.insert(0, Slot::same(3));
        s.insert(2, Slot::same(9));
        s.insert(2, Slot::same(7));
        let words: Vec<_> = s.as_slice().iter().map(|x| x.payload()).collect();
        assert_eq!(
            words,
            [3, 5, 7, 9].map(Payload::Same),
            "index order is kept"
        );
        let held = s.heap_bytes();
        assert_eq!(held, (24 + 4 * 16) as u64);
        assert_eq!(s.remove(1).payload(), Payload::Same(5));
        // The room stays while the run lives: its charge is given back with the run.
        assert_eq!(s.heap_bytes(), held);
        assert_eq!(s[2].payload(), Payload::Same(9));
        // One slot removed from one: nothing left, nothing held.
        let mut one = Slots::default();
        one.insert(0, Slot::same(1));
        assert_eq!(one.remove(0).payload(), Payload::Same(1));
        assert!(one.len() == 0 && one.heap_bytes() == 0);
    }

    #[test]
    fn slot_round_trip() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
        let s = Slot::same(7);
        assert_eq!(s.payload(), Payload::Same(7));
        assert_eq!(s.len(), 0);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let a = Arena::default();
        let s = Slot::stored(&a, Encoding::Raw, &data);
        assert_eq!(s.payload(), Payload::Stored(Encoding::Raw, &data[..]));
        let t = Slot::stored(&a, Encoding::Lz4, &data[..3]);
        assert_eq!(t.len(), 3);
        drop(s);
        assert_eq!(t.payload(), Payload::Stored(Encoding::Lz4, &data[..3]));
    }
}
