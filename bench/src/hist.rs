// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A log-linear latency histogram: exact below 64 ns, then 32 buckets per power of two (about
//! 3 % relative error), so percentiles need no stored samples.

const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
const EXACT: usize = 64;
const BUCKETS: usize = EXACT + (64 - 6) * SUB;

/// Counts of nanosecond values.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
        }
    }
}

fn bucket(v: u64) -> usize {
    if v < EXACT as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let sub = (v >> (e - SUB_BITS)) as usize & (SUB - 1);
    EXACT + (e as usize - 6) * SUB + sub
}

/// The middle of bucket `i`.
fn value(i: usize) -> u64 {
    if i < EXACT {
        return i as u64;
    }
    let e = ((i - EXACT) / SUB + 6) as u32;
    let sub = ((i - EXACT) % SUB) as u64;
    let width = 1u64 << (e - SUB_BITS);
    ((SUB as u64 + sub) << (e - SUB_BITS)) + width / 2
}

impl Histogram {
    /// Records one value (ns).
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket(ns)] += 1;
        self.total += 1;
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(o.counts.iter()) {
            *a += b;
        }
        self.total += o.total;
    }

    /// The value at quantile `q` (0..=1); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i);
            }
        }
        value(BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for v in [
            0u64,
            1,
            63,
            64,
            65,
            100,
            1000,
            4096,
            10_000,
            1 << 30,
            u64::MAX / 2,
        ] {
            let b = bucket(v);
            assert!(b >= last, "{v}");
            last = b;
            let mid = value(b) as f64;
            assert!(
                (mid - v as f64).abs() <= v as f64 * 0.04 + 1.0,
                "{v} -> {mid}"
            );
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 100);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 - 50_000.0).abs() < 50_000.0 * 0.04, "{p50}");
        assert!((p99 - 99_000.0).abs() < 99_000.0 * 0.04, "{p99}");
        let mut g = Histogram::default();
        g.merge(&h);
        assert_eq!(g.total, 1000);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
