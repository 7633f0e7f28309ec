// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest images `vm-images/build.sh` built: QEMU, the kernel, the initramfs and QEMU's
//! firmware, named in `target/vm/images.env`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Paths from `target/vm/images.env`.
#[derive(Debug)]
pub struct Images {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub firmware: Vec<PathBuf>,
}

impl Images {
    /// Reads the images file; every image it names must exist.
    pub fn load(path: &Path) -> Result<Images> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ImagesFile {
            path: path.to_path_buf(),
            source,
        })?;
        let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |key: &'static str| {
            vars.get(key)
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .ok_or_else(|| Error::ImagesKey {
                    path: path.to_path_buf(),
                    key,
                })
        };
        Ok(Images {
            qemu: get("QEMU")?,
            kernel: get("KERNEL")?,
            initramfs: get("INITRAMFS")?,
            firmware: vars
                .get("FIRMWARE")
                .map(|f| {
                    f.split(':')
                        .map(PathBuf::from)
                        .filter(|p| p.exists())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}
