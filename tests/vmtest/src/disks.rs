// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guests' disks, sparse files made fresh for each scenario: a swap device and ext4
//! file systems with fixed UUIDs (the daemon authorizes shared pools by file-system UUID).

use std::fs::File;
use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};

/// The guest's swap device: a sparse file on the host.
pub const SWAP_MIB: u64 = 512;
/// The ext4 disks (sparse files): /dev/vdb and /dev/vdc.
pub const DATA_MIB: u64 = 1024;
pub const DISK2_MIB: u64 = 256;
pub const DATA_UUID: &str = "5d7c0a4e-1b9f-4d3a-9c61-0f6f3a8e2b10";
pub const DISK2_UUID: &str = "9a1e55c2-7d04-4c8b-a3f0-61b2d9e4c7a5";
/// The read-only disk both guests of `two-guests` mount; the daemon authorizes it for sharing.
pub const SHARED_UUID: &str = "c0ffee00-7e3a-4b5c-8d9e-0a1b2c3d4e5f";

/// Creates an empty sparse file of `mib` MiB.
pub fn sparse(path: &Path, mib: u64) -> Result<()> {
    File::create(path)
        .and_then(|f| f.set_len(mib << 20))
        .map_err(|source| Error::Create {
            path: path.to_path_buf(),
            source,
        })
}

/// Creates a sparse ext4 image with the given UUID.
pub fn make_ext4(path: &Path, mib: u64, uuid: &str) -> Result<()> {
    sparse(path, mib)?;
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-U",
            uuid,
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(path)
        .output()
        .map_err(Error::MkfsSpawn)?;
    if !out.status.success() {
        return Err(Error::Mkfs {
            path: path.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
