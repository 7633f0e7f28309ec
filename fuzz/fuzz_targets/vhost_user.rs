// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! cargo-fuzz target `vhost_user`: the vhost-user message layer, served as the daemon serves a connection. The body and its oracles are
//! `tmem_fuzz::vhost_user::run` (tests/fuzz), which `cargo test` also runs over the seed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tmem_fuzz::vhost_user::run(data));
