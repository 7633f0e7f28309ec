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
    /// MiB added to every guest's RAM (`GUEST_EXTRA_MIB`, 0 if absent): a KASAN kernel keeps
    /// about 90 MiB for itself (shadow, stack depot), so its guests get that much more and
    /// the scenarios find the memory they were sized for.
    pub guest_extra_mib: u64,
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
            guest_extra_mib: match vars.get("GUEST_EXTRA_MIB") {
                None => 0,
                Some(v) => v.parse().map_err(|_| Error::ImagesValue {
                    path: path.to_path_buf(),
                    key: "GUEST_EXTRA_MIB",
                    value: v.to_string(),
                })?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An images file naming files that exist, plus `extra` lines.
    fn images_file(dir: &Path, extra: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        for f in ["qemu", "bzImage", "initramfs"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let text = format!(
            "QEMU={0}/qemu\nKERNEL={0}/bzImage\nINITRAMFS={0}/initramfs\n{extra}",
            dir.display()
        );
        let path = dir.join("images.env");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn guest_extra_mib_is_read_and_checked() {
        let dir = std::env::temp_dir().join(format!("tmem-images-{}", std::process::id()));
        let plain = Images::load(&images_file(&dir, "")).unwrap();
        assert_eq!(plain.guest_extra_mib, 0);
        let kasan = Images::load(&images_file(&dir, "GUEST_EXTRA_MIB=96\n")).unwrap();
        assert_eq!(kasan.guest_extra_mib, 96);
        let bad = Images::load(&images_file(&dir, "GUEST_EXTRA_MIB=lots\n")).unwrap_err();
        assert!(bad.to_string().contains("GUEST_EXTRA_MIB=lots"), "{bad}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
