// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! cargo-fuzz target `device`: the device request path (rings, descriptors, indirect tables, handle_event). The body and its oracles are
//! `tmem_fuzz::device::run` (tests/fuzz), which `cargo test` also runs over the seed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tmem_fuzz::device::run(data));
