// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Deterministic page contents of several kinds, for tests that must verify every byte.

use shared_proto::PAGE_SIZE;

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Fills `out` with page number `seed`: a mix of zero, same-filled, text-like, structured
/// binary and incompressible pages, chosen by the seed.
pub fn fill(seed: u64, out: &mut [u8]) {
    assert_eq!(out.len(), PAGE_SIZE);
    let h = mix(seed);
    match h % 10 {
        0 => out.fill(0),
        1 => {
            let w = mix(h).to_le_bytes();
            for c in out.chunks_exact_mut(8) {
                c.copy_from_slice(&w);
            }
        }
        2..=5 => {
            // Text: words from a small vocabulary, numbered lines.
            const WORDS: [&str; 12] = [
                "memory", "page", "guest", "host", "swap", "cache", "the", "of", "pool", "object",
                "index", "tmem",
            ];
            let mut i = 0;
            let mut x = h;
            let mut line = 0u64;
            while i < PAGE_SIZE {
                x = mix(x);
                let w = if x.is_multiple_of(9) {
                    line += 1;
                    format!("\n{seed}:{line} ")
                } else {
                    format!("{} ", WORDS[(x % 12) as usize])
                };
                let n = w.len().min(PAGE_SIZE - i);
                out[i..i + n].copy_from_slice(&w.as_bytes()[..n]);
                i += n;
            }
        }
        6..=8 => {
            // Binary: records with small counters and a few random fields.
            for (i, c) in out.chunks_exact_mut(16).enumerate() {
                c[..8].copy_from_slice(&(seed.wrapping_mul(4096) + i as u64).to_le_bytes());
                let r = mix(h ^ i as u64);
                c[8..12].copy_from_slice(&((r & 0xff) as u32).to_le_bytes());
                c[12..16].copy_from_slice(&[0, 0, (r >> 8) as u8, 0]);
            }
        }
        _ => {
            let mut x = h;
            for c in out.chunks_exact_mut(8) {
                x = mix(x);
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Page number `seed` as a new vector.
pub fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    fill(seed, &mut p);
    p
}
