// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-tmem: a transcendent memory (tmem) backend for virtio guests over vhost-user.
//!
//! - [`store`]: the tmem engine (clients, pools, pages, compression, eviction), behind a trait.
//! - [`vhu_tmem`]: the virtio-tmem device as a vhost-user backend.
//! - [`daemon`]: sockets, one serving thread per client.
//! - [`sandbox`]: seccomp, namespaces and a user drop once the daemon is set up.
//! - [`sd`]: service managers: sockets passed at start, readiness notifications.
//! - [`sock`]: Unix socket helpers for the client and control sockets.
//! - [`config`], [`control`]: command line, configuration file, control socket, metrics.
//! - [`size`]: sizes such as `64K` or `1G`, parsed and formatted.

pub mod config;
pub mod control;
pub mod daemon;
pub mod sandbox;
pub mod sd;
pub mod size;
pub mod sock;
pub mod store;
pub mod vhu_tmem;
