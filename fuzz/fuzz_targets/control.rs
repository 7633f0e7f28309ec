// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! cargo-fuzz target `control`: control socket request lines against a real store. The body and its oracles are
//! `tmem_fuzz::control::run` (tests/fuzz), which `cargo test` also runs over the seed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tmem_fuzz::control::run(data));
