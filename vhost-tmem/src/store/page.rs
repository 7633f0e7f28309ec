// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The page a PUT reads and a GET writes, as raw pointers rather than Rust references.
//!
//! For the device these point straight into guest memory, which the guest (another process
//! or vCPU) may write while the store works on it. A `&[u8]` over such memory would promise
//! Rust that it does not change, so the store never builds one: it reads and writes pages only
//! through these types, with volatile accesses, byte copies and C codecs that take pointers.
//! What the guest does to its own page meanwhile can garble what is stored or returned for that
//! page, never the store: no length, offset or decision about other memory comes from it.
//!
//! Both types are `!Send` (raw pointers): they live for one request on one worker thread.

use std::marker::PhantomData;
use std::ptr;

use shared_proto::PAGE_SIZE;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// PAGE_SIZE readable bytes: a page in guest memory or a buffer of the caller's.
#[derive(Clone, Copy, Debug)]
pub struct PageSrc<'a> {
    ptr: *const u8,
    _borrow: PhantomData<&'a [u8]>,
}

/// PAGE_SIZE writable bytes: a page in guest memory or a buffer of the caller's.
#[derive(Debug)]
pub struct PageDst<'a> {
    ptr: *mut u8,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> PageSrc<'a> {
    /// A page of the caller's own memory (in-process users, bounce buffers).
    ///
    /// # Panics
    /// If `buf` is not exactly one page: a caller's bug, never guest input.
    pub fn new(buf: &'a [u8]) -> Self {
        assert_eq!(buf.len(), PAGE_SIZE, "a page is {PAGE_SIZE} bytes");
        PageSrc {
            ptr: buf.as_ptr(),
            _borrow: PhantomData,
        }
    }

    /// A page of guest memory, if `vs` is exactly one page.
    pub fn guest<B: BitmapSlice>(vs: &VolatileSlice<'a, B>) -> Option<Self> {
        (vs.len() == PAGE_SIZE).then(|| PageSrc {
            // The guard of a plain mmap region is the pointer itself; the mapping outlives
            // 'a, the borrow of the guest memory snapshot the slice came from.
            ptr: vs.ptr_guard().as_ptr(),
            _borrow: PhantomData,
        })
    }

    /// The first byte, for C functions that read PAGE_SIZE bytes from it.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// If every 8-byte word of the page is the same, that word. Reads each byte at most once
    /// and stops at the first 256-byte block that differs (most pages differ in the first).
    ///
    /// Each block is copied out of the page first and checked in our own memory: a byte copy
    /// is the one way to read memory the guest may write that is both defined and fast (the
    /// check then vectorizes; volatile word loads made a zero-page put 5x slower).
    pub fn same_filled(&self) -> Option<u64> {
        const WORDS: usize = 32;
        let mut block = [0u64; WORDS];
        let mut first = None;
        for at in (0..PAGE_SIZE).step_by(WORDS * 8) {
            // SAFETY: at + 256 <= PAGE_SIZE readable bytes from `ptr` (the type's invariant)
            // into a 256-byte local; a byte copy, as vm-memory reads guest memory.
            unsafe {
                ptr::copy_nonoverlapping(self.ptr.add(at), block.as_mut_ptr().cast(), WORDS * 8)
            };
            let f = *first.get_or_insert(block[0]);
            // No exit inside the block, so that the compiler vectorizes it.
            if block.iter().fold(0, |d, w| d | (w ^ f)) != 0 {
                return None;
            }
        }
        first
    }

    /// Copies the page into `out` (exactly one page).
    pub fn copy_to(&self, out: &mut [u8]) {
        assert_eq!(out.len(), PAGE_SIZE);
        // SAFETY: PAGE_SIZE readable bytes at `ptr` (invariant) and PAGE_SIZE writable ones
        // in `out`, which is ours and so cannot overlap guest memory or a borrowed source.
        // A byte copy of memory the guest may write concurrently is how vm-memory copies
        // guest memory too (copy_nonoverlapping in its copy_slice): the bytes are opaque.
        unsafe { ptr::copy_nonoverlapping(self.ptr, out.as_mut_ptr(), PAGE_SIZE) }
    }
}

impl<'a> PageDst<'a> {
    /// A page of the caller's own memory (in-process users, bounce buffers).
    ///
    /// # Panics
    /// If `buf` is not exactly one page: a caller's bug, never guest input.
    pub fn new(buf: &'a mut [u8]) -> Self {
        assert_eq!(buf.len(), PAGE_SIZE, "a page is {PAGE_SIZE} bytes");
        PageDst {
            ptr: buf.as_mut_ptr(),
            _borrow: PhantomData,
        }
    }

    /// A page of guest memory, if `vs` is exactly one page.
    pub fn guest<B: BitmapSlice>(vs: &VolatileSlice<'a, B>) -> Option<Self> {
        (vs.len() == PAGE_SIZE).then(|| PageDst {
            ptr: vs.ptr_guard_mut().as_ptr(),
            _borrow: PhantomData,
        })
    }

    /// The first byte, for C functions that write at most PAGE_SIZE bytes to it.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// Fills the page with the 8-byte `pattern`.
    pub fn fill(&mut self, pattern: u64) {
        if pattern == 0 {
            // SAFETY: PAGE_SIZE writable bytes at `ptr` (invariant); memset, the fastest
            // fill there is, writes each byte once and reads none.
            unsafe { ptr::write_bytes(self.ptr, 0, PAGE_SIZE) };
            return;
        }
        // One 256-byte block built here, copied out 16 times: memcpy speed, each page byte
        // written once.
        let block = [pattern; 32];
        for at in (0..PAGE_SIZE).step_by(256) {
            // SAFETY: at + 256 <= PAGE_SIZE writable bytes at `ptr` (invariant), from our own
            // local; a byte copy into guest memory, as vm-memory does it.
            unsafe { ptr::copy_nonoverlapping(block.as_ptr().cast(), self.ptr.add(at), 256) };
        }
    }

    /// Copies `src` (exactly one page of ours) into the page.
    pub fn copy_from(&mut self, src: &[u8]) {
        assert_eq!(src.len(), PAGE_SIZE);
        // SAFETY: PAGE_SIZE writable bytes at `ptr` (invariant), PAGE_SIZE readable in `src`,
        // which is the store's own memory and cannot overlap the destination. A byte copy
        // into guest memory, as vm-memory does it.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, PAGE_SIZE) }
    }
}

// Conversions for in-process callers; each panics unless the buffer is exactly one page.
impl<'a> From<&'a [u8]> for PageSrc<'a> {
    fn from(b: &'a [u8]) -> Self {
        PageSrc::new(b)
    }
}

impl<'a> From<&'a Vec<u8>> for PageSrc<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        PageSrc::new(b)
    }
}

impl<'a> From<&'a [u8; PAGE_SIZE]> for PageSrc<'a> {
    fn from(b: &'a [u8; PAGE_SIZE]) -> Self {
        PageSrc::new(b)
    }
}

impl<'a> From<&'a mut [u8]> for PageDst<'a> {
    fn from(b: &'a mut [u8]) -> Self {
        PageDst::new(b)
    }
}

impl<'a> From<&'a mut Vec<u8>> for PageDst<'a> {
    fn from(b: &'a mut Vec<u8>) -> Self {
        PageDst::new(b)
    }
}

impl<'a> From<&'a mut [u8; PAGE_SIZE]> for PageDst<'a> {
    fn from(b: &'a mut [u8; PAGE_SIZE]) -> Self {
        PageDst::new(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_filled_and_fill_at_any_alignment() {
        let mut buf = vec![0u8; PAGE_SIZE + 8];
        for off in [0, 1, 3, 8] {
            let page = &mut buf[off..off + PAGE_SIZE];
            PageDst::new(page).fill(0x0102_0304_0506_0708);
            assert_eq!(
                PageSrc::new(page).same_filled(),
                Some(0x0102_0304_0506_0708)
            );
            page[PAGE_SIZE - 1] ^= 1;
            assert_eq!(PageSrc::new(page).same_filled(), None);
            PageDst::new(page).fill(0);
            assert_eq!(PageSrc::new(page).same_filled(), Some(0));
            let mut copy = vec![1u8; PAGE_SIZE];
            PageSrc::new(page).copy_to(&mut copy);
            assert!(copy.iter().all(|b| *b == 0));
        }
    }
}
