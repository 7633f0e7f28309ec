// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A counting global allocator: live bytes requested and live bytes the allocator really
//! handed out (`malloc_usable_size`), so metadata and allocator slack per stored page are
//! measured, not computed from type sizes. Counting is off (one relaxed load per call) except
//! while a footprint is measured, so it does not tax the timed runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

/// The allocator; installed in `main.rs`.
#[derive(Debug)]
pub struct Counting;

static ON: AtomicBool = AtomicBool::new(false);
static REQUESTED: AtomicI64 = AtomicI64::new(0);
static USABLE: AtomicI64 = AtomicI64::new(0);

fn usable(p: *mut u8, layout: Layout) -> i64 {
    if layout.align() > 16 {
        // System uses posix_memalign for these; usable size still applies.
        return layout.size() as i64;
    }
    // SAFETY: `p` was returned by System's malloc/realloc (alignment <= 16) and is live.
    unsafe { libc::malloc_usable_size(p.cast()) as i64 }
}

fn count(p: *mut u8, layout: Layout, sign: i64) {
    if !p.is_null() && ON.load(Relaxed) {
        REQUESTED.fetch_add(sign * layout.size() as i64, Relaxed);
        USABLE.fetch_add(sign * usable(p, layout), Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` unchanged; counting only reads the result.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        count(p, layout, 1);
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        count(p, layout, 1);
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        count(p, layout, -1);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(p, layout, -1);
        // SAFETY: same contract as ours.
        let q = unsafe { System.realloc(p, layout, new_size) };
        if q.is_null() {
            // The old block is still live.
            count(p, layout, 1);
        } else {
            // SAFETY: new_size is valid for this alignment, as the caller promised.
            count(
                q,
                unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) },
                1,
            );
        }
        q
    }
}

/// Live (requested, usable) bytes counted since counting was switched on.
pub fn live() -> (i64, i64) {
    (REQUESTED.load(Relaxed), USABLE.load(Relaxed))
}

/// Switches counting on or off. Blocks freed while off are not subtracted, so measure
/// only what is allocated and freed while on.
pub fn set_counting(on: bool) {
    ON.store(on, Relaxed);
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// Gives freed heap memory back to the kernel, so RSS deltas measure live data.
pub fn trim() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}
