// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM runner as a library: `tmem-vmtest` (src/main.rs) runs the scenarios with it, and
//! the overcommit lab (`vhost-tmem-lab`, lab/) boots its guests with the same images, QEMU
//! command line, disks and serial ports.
//!
//! The parts: `images` (what `vm-images/build.sh` built), `disks`, `qemu` (command line,
//! accelerator), `boot` (QEMU processes and their consoles), `barrier` (meeting points over
//! the second serial port), `scenarios` (set-up and checks), `baddev` (the misbehaving device
//! of `bad-device`), `demo`, `error`.

mod baddev;
pub mod barrier;
pub mod boot;
mod demo;
pub mod disks;
pub mod error;
pub mod images;
pub mod migrate;
pub mod qemu;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

pub use scenarios::SCENARIOS;

use crate::images::Images;

/// What every guest of a run shares: images, accelerator, time limit, CPUs, and the
/// workspace root (for `target/vm/logs`).
#[derive(Debug)]
pub struct Runner {
    pub images: Images,
    pub accel: &'static str,
    pub timeout: Duration,
    /// Virtual CPUs per guest, if not each scenario's own.
    pub smp: Option<u32>,
    pub root: PathBuf,
}
