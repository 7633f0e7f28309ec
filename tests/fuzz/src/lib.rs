// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bodies of vhost-tmem's fuzz targets, one module each, with their oracles.
//!
//! Each target is a `run(data: &[u8])` that panics on a bug: the oracle's findings as much as
//! a panic inside the daemon. They live in this ordinary library, built on stable Rust, so that
//! the cargo-fuzz binaries in `fuzz/` (nightly, libFuzzer) are thin wrappers and `cargo test`
//! runs every body over the committed seed corpus plus deterministic pseudo-random inputs
//! (`seeded.rs`): the targets cannot rot between fuzzing campaigns.
//!
//! - [`device`]: the request path: split rings, descriptors and indirect tables built in guest
//!   memory, served by the device's `handle_event`; no byte outside the device-writable
//!   buffers and the used ring may change, and the store must behave like a map.
//! - [`vhost_user`]: the vhost-user message layer against the daemon's own connection serving:
//!   memory tables of memfds, vring setup, features, in any order; no panic, no hang, no fd
//!   leak, and the client's pools are freed when the connection ends.
//! - [`control`]: control socket request lines against a real store.
//! - [`config`]: the command line and the TOML configuration file.
//!
//! Everything a target needs from the daemon comes through `vhost_tmem`'s public API.

pub mod config;
pub mod control;
pub mod device;
pub mod vhost_user;

#[cfg(test)]
mod seeded;

/// The targets: the modules above, the binaries in `fuzz/fuzz_targets/` and the corpus
/// directories in `fuzz/corpus/` all go by these names.
pub const TARGETS: [&str; 4] = ["device", "vhost_user", "control", "config"];
