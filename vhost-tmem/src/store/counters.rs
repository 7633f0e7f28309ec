// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The counters kept per client, per pool and per shard, defined once.
//!
//! Request counters are monotonic; gauges say what is stored now. A client's request counters
//! are relaxed atomics ([`Counters`]) bumped on the hot path. A pool's gauges and its common
//! request counters live in its shards as plain numbers ([`CounterSnapshot`]), updated under
//! the shard lock the request holds anyway; the pool's rare events (refusals, errors, object
//! flushes, evictions) are atomics beside them. The table at the bottom generates the atomics,
//! the snapshot (its field names are the JSON names), the merges and the Prometheus list, so a
//! counter is added in one place.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

/// Generates [`Counters`] and [`CounterSnapshot`] from one list of request counters and one
/// of gauges, each entry `json_name: "prometheus_name"` in output order.
macro_rules! counters {
    (
        requests { $($(#[$rdoc:meta])* $r:ident: $rprom:literal,)* }
        gauges { $($(#[$gdoc:meta])* $g:ident: $gprom:literal,)* }
    ) => {
        /// Request counters (monotonic), bumped with relaxed atomics: a client's on every
        /// request, a pool's on its rare events.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$rdoc])* pub $r: AtomicU64,)*
        }

        /// Counter values as plain numbers: a snapshot (request counters, then gauges), or a
        /// shard's own tallies under its lock.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct CounterSnapshot {
            $($(#[$rdoc])* pub $r: u64,)*
            $($(#[$gdoc])* pub $g: u64,)*
        }

        impl Counters {
            /// The request counters now; gauges are zero.
            pub fn snapshot(&self) -> CounterSnapshot {
                CounterSnapshot {
                    $($r: self.$r.load(Relaxed),)*
                    ..CounterSnapshot::default()
                }
            }

            /// Adds a snapshot's request counters (restoring saved state).
            pub fn add(&self, s: &CounterSnapshot) {
                $(self.$r.fetch_add(s.$r, Relaxed);)*
            }
        }

        impl CounterSnapshot {
            /// How many fields there are.
            pub const LEN: usize = [$(stringify!($r),)* $(stringify!($g),)*].len();

            /// How many request counters there are (the first fields).
            pub const REQUESTS: usize = [$(stringify!($r),)*].len();

            /// The request counters in their fixed order (the state format stores them so).
            pub fn requests(&self) -> [u64; Self::REQUESTS] {
                [$(self.$r,)*]
            }

            /// Request counters from values in their fixed order; missing ones are 0, extra
            /// ones (a newer daemon's) are ignored.
            pub fn from_requests(v: &[u64]) -> Self {
                let mut it = v.iter().copied();
                CounterSnapshot {
                    $($r: it.next().unwrap_or(0),)*
                    ..CounterSnapshot::default()
                }
            }

            /// Adds another snapshot's request counters.
            pub fn add_requests(&mut self, o: &CounterSnapshot) {
                $(self.$r += o.$r;)*
            }

            /// Adds another snapshot's gauges.
            pub fn add_gauges(&mut self, o: &CounterSnapshot) {
                $(self.$g += o.$g;)*
            }

            /// Sets the gauges to zero (nothing stored), keeping the request counters.
            pub fn clear_gauges(&mut self) {
                $(self.$g = 0;)*
            }

            /// The fields in a fixed order, for the Prometheus exposition: (name, value,
            /// whether it is a counter rather than a gauge).
            pub fn fields(&self) -> [(&'static str, u64, bool); Self::LEN] {
                [$(($rprom, self.$r, true),)* $(($gprom, self.$g, false),)*]
            }
        }
    };
}

impl Counters {
    /// Bumps one counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

counters! {
    requests {
        puts: "puts",
        /// Puts that stored nothing (frozen client, policy, no space).
        puts_refused: "puts_refused",
        gets: "gets",
        get_hits: "get_hits",
        get_misses: "get_misses",
        /// Gets that found the page but could not return it.
        get_errors: "get_errors",
        /// FLUSH_PAGE and FLUSH_OBJECT requests.
        flushes: "flushes",
        /// Pages those requests removed.
        flushed_pages: "flushed_pages",
        /// Pages evicted to make room.
        evictions: "evictions",
        /// Puts to a shared pool refused because the key holds other content (first put wins).
        shared_put_conflicts: "shared_put_conflicts",
    }
    gauges {
        stored_pages: "stored_pages",
        /// Pages stored as a repeated word, with no payload.
        same_filled_pages: "same_filled_pages",
        /// Pages stored uncompressed.
        raw_pages: "raw_pages",
        /// Payload bytes of compressed and raw pages.
        compressed_bytes: "compressed_bytes",
        /// Everything charged: payloads and structure.
        memory_used: "memory_used_bytes",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON field names and the Prometheus names are an interface (the e2e tests,
    /// tmem-vmtest and the bench read them): they and their order must not change.
    #[test]
    fn names_and_order_are_pinned() {
        let requests = [
            "puts",
            "puts_refused",
            "gets",
            "get_hits",
            "get_misses",
            "get_errors",
            "flushes",
            "flushed_pages",
            "evictions",
            "shared_put_conflicts",
        ];
        let gauges = [
            "stored_pages",
            "same_filled_pages",
            "raw_pages",
            "compressed_bytes",
            "memory_used",
        ];
        // Every value is a number, so the quoted strings are the keys, in order.
        let text = serde_json::to_string(&CounterSnapshot::default()).unwrap();
        let keys: Vec<&str> = text.split('"').skip(1).step_by(2).collect();
        assert_eq!(keys, [&requests[..], &gauges[..]].concat());
        let fields = CounterSnapshot::default().fields();
        let prom: Vec<(&str, bool)> = fields.iter().map(|(n, _, c)| (*n, *c)).collect();
        let mut want: Vec<(&str, bool)> = requests.iter().map(|n| (*n, true)).collect();
        want.extend(gauges[..4].iter().map(|n| (*n, false)));
        want.push(("memory_used_bytes", false));
        assert_eq!(prom, want);
    }
}
