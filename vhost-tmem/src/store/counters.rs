// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The counters kept per client and per pool.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Event counters (monotonic) and gauges, updated with relaxed atomics on the hot path.
#[derive(Debug, Default)]
pub struct Counters {
    pub puts: AtomicU64,
    pub puts_refused: AtomicU64,
    pub gets: AtomicU64,
    pub get_hits: AtomicU64,
    pub get_misses: AtomicU64,
    pub get_errors: AtomicU64,
    pub flushes: AtomicU64,
    pub flushed_pages: AtomicU64,
    pub evictions: AtomicU64,
    // Gauges.
    pub stored_pages: AtomicU64,
    pub same_filled_pages: AtomicU64,
    pub raw_pages: AtomicU64,
    pub compressed_bytes: AtomicU64,
    pub memory_used: AtomicU64,
}

/// A point-in-time copy of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CounterSnapshot {
    pub puts: u64,
    pub puts_refused: u64,
    pub gets: u64,
    pub get_hits: u64,
    pub get_misses: u64,
    pub get_errors: u64,
    pub flushes: u64,
    pub flushed_pages: u64,
    pub evictions: u64,
    pub stored_pages: u64,
    pub same_filled_pages: u64,
    pub raw_pages: u64,
    pub compressed_bytes: u64,
    pub memory_used: u64,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            puts: self.puts.load(Relaxed),
            puts_refused: self.puts_refused.load(Relaxed),
            gets: self.gets.load(Relaxed),
            get_hits: self.get_hits.load(Relaxed),
            get_misses: self.get_misses.load(Relaxed),
            get_errors: self.get_errors.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            flushed_pages: self.flushed_pages.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            stored_pages: self.stored_pages.load(Relaxed),
            same_filled_pages: self.same_filled_pages.load(Relaxed),
            raw_pages: self.raw_pages.load(Relaxed),
            compressed_bytes: self.compressed_bytes.load(Relaxed),
            memory_used: self.memory_used.load(Relaxed),
        }
    }
}

impl CounterSnapshot {
    /// Adds another snapshot's gauges.
    pub fn add_gauges(&mut self, o: &CounterSnapshot) {
        self.stored_pages += o.stored_pages;
        self.same_filled_pages += o.same_filled_pages;
        self.raw_pages += o.raw_pages;
        self.compressed_bytes += o.compressed_bytes;
        self.memory_used += o.memory_used;
    }

    /// The fields in a fixed order, for the Prometheus exposition.
    pub fn fields(&self) -> [(&'static str, u64, bool); 14] {
        [
            ("puts", self.puts, true),
            ("puts_refused", self.puts_refused, true),
            ("gets", self.gets, true),
            ("get_hits", self.get_hits, true),
            ("get_misses", self.get_misses, true),
            ("get_errors", self.get_errors, true),
            ("flushes", self.flushes, true),
            ("flushed_pages", self.flushed_pages, true),
            ("evictions", self.evictions, true),
            ("stored_pages", self.stored_pages, false),
            ("same_filled_pages", self.same_filled_pages, false),
            ("raw_pages", self.raw_pages, false),
            ("compressed_bytes", self.compressed_bytes, false),
            ("memory_used_bytes", self.memory_used, false),
        ]
    }
}
