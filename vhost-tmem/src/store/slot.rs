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

#[cfg(test)]
mod tests {
    use super::*;

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
