// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The keyed hash of run keys: fast where SipHash is slow, seeded per pool because keys are
//! chosen by untrusted guests.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// A keyed multiply-fold hasher: a few nanoseconds for a run key where SipHash takes tens,
/// seeded per pool from the process's random source so guests cannot aim at one bucket.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyedHasher {
    h: u64,
    k: u64,
}

const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

fn fold(a: u64, b: u64) -> u64 {
    let p = (a as u128).wrapping_mul(b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Hasher for KeyedHasher {
    fn write(&mut self, bytes: &[u8]) {
        // A word at a time: an `Oid` (`[u64; 3]`) hashes as one 24-byte write, three folds.
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.write_u64(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let tail = words.remainder();
        if !tail.is_empty() {
            let mut w = [0u8; 8];
            w[..tail.len()].copy_from_slice(tail);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    // Slice lengths (the prefix an array's hash writes) and other integers: one fold each,
    // not a byte write.
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }

    fn write_u64(&mut self, x: u64) {
        self.h = fold(self.h ^ x, self.k);
    }

    fn finish(&self) -> u64 {
        fold(self.h, MUL ^ self.k).rotate_left(23)
    }
}

/// Per-pool random seeds for [`KeyedHasher`].
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyedState {
    seed: u64,
    k: u64,
}

impl KeyedState {
    pub(super) fn new() -> Self {
        let r = RandomState::new();
        KeyedState {
            seed: r.hash_one(1u64),
            // Odd, so the multiplication loses nothing.
            k: r.hash_one(2u64) | 1,
        }
    }
}

impl BuildHasher for KeyedState {
    type Hasher = KeyedHasher;

    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            h: self.seed,
            k: self.k,
        }
    }
}
