// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! cargo-fuzz target `config`: the command line and the TOML configuration file. The body and its oracles are
//! `tmem_fuzz::config::run` (tests/fuzz), which `cargo test` also runs over the seed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tmem_fuzz::config::run(data));
