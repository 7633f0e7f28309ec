// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Checks on the guest memory a frontend shares (SET_MEM_TABLE, ADD_MEM_REG) before the device
//! touches any of it.
//!
//! An access to a shared mapping past the end of its file raises SIGBUS, which kills the whole
//! daemon with every client's pages. So a region must lie within its file when it arrives, and
//! the file must be unable to shrink later: a memfd sealed with `F_SEAL_SHRINK` (QEMU's
//! memory-backend-memfd seals by default). Files that cannot be sealed (hugetlbfs, /dev/shm,
//! unsealed memfds) are refused unless the operator accepts the risk with
//! `--allow-unsealed-memory`.

use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{GuestBitmap, Mem};

/// Why a frontend's guest memory is refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The region's mapping runs past the end of the file behind it.
    #[error(
        "guest memory region at {gpa:#x} ({size} bytes at file offset {offset}) extends past \
         the end of its file ({file_size} bytes)"
    )]
    PastEof {
        gpa: u64,
        size: u64,
        offset: u64,
        file_size: u64,
    },
    /// The file could shrink under the mapping later.
    #[error(
        "guest memory region at {gpa:#x} is not sealed against shrinking (F_SEAL_SHRINK): its \
         VMM could truncate it and crash the daemon; use a sealed memfd (QEMU: \
         memory-backend-memfd, whose seal=on is the default) or start the daemon with \
         --allow-unsealed-memory"
    )]
    Unsealed { gpa: u64 },
    /// Not a regular file (a device or a pipe): its size says nothing about what may be mapped.
    #[error("guest memory region at {gpa:#x} is not backed by a regular file")]
    NotRegular { gpa: u64 },
    /// fstat failed.
    #[error("cannot stat the file of guest memory region at {gpa:#x}")]
    Stat {
        gpa: u64,
        #[source]
        source: io::Error,
    },
}

/// Checks every file-backed region of `mem`. Returns the regions accepted only because
/// `allow_unsealed` is set (for a warning), or the first reason to refuse the whole map.
/// Anonymous regions (in-process tests) cannot be truncated and pass.
pub(super) fn check<B: GuestBitmap>(
    mem: &Mem<B>,
    allow_unsealed: bool,
) -> Result<Vec<u64>, MemoryError> {
    let mut unsealed = Vec::new();
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            continue;
        };
        let gpa = r.start_addr().0;
        let meta = fo
            .file()
            .metadata()
            .map_err(|source| MemoryError::Stat { gpa, source })?;
        if !meta.file_type().is_file() {
            return Err(MemoryError::NotRegular { gpa });
        }
        let size = r.len();
        let offset = fo.start();
        if offset.checked_add(size).is_none_or(|end| end > meta.len()) {
            return Err(MemoryError::PastEof {
                gpa,
                size,
                offset,
                file_size: meta.len(),
            });
        }
        // SAFETY: fcntl on a descriptor the region owns, with no pointer argument. Files
        // without seal support (hugetlbfs before memfd, ext4, ...) fail with EINVAL: unsealed.
        let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            if !allow_unsealed {
                return Err(MemoryError::Unsealed { gpa });
            }
            unsealed.push(gpa);
        }
    }
    Ok(unsealed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    fn memfd(size: u64, seals: i32) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        // SAFETY: fcntl with an integer argument on our descriptor.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(r, 0);
        f
    }

    fn map(file: File, offset: u64, size: usize) -> Mem {
        GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0x1000_0000),
            size,
            Some(FileOffset::new(file, offset)),
        )])
        .unwrap()
    }

    #[test]
    fn regions_must_fit_their_sealed_file() {
        let sealed = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        assert!(check(&map(memfd(1 << 20, sealed), 0, 1 << 20), false)
            .unwrap()
            .is_empty());
        assert!(check(&map(memfd(1 << 20, sealed), 4096, (1 << 20) - 4096), false).is_ok());
        let e = check(&map(memfd(1 << 20, sealed), 4096, 1 << 20), false).unwrap_err();
        assert!(matches!(e, MemoryError::PastEof { .. }), "{e}");
        assert!(e.to_string().contains("extends past the end"), "{e}");
        // Past the end is refused even when unsealed memory is allowed.
        let e = check(&map(memfd(4096, 0), 0, 8192), true).unwrap_err();
        assert!(matches!(e, MemoryError::PastEof { .. }), "{e}");
        // Sealed against growing only: it can still shrink.
        let e = check(&map(memfd(8192, libc::F_SEAL_GROW), 0, 8192), false).unwrap_err();
        assert!(
            matches!(e, MemoryError::Unsealed { gpa: 0x1000_0000 }),
            "{e}"
        );
        assert!(e.to_string().contains("--allow-unsealed-memory"), "{e}");
        assert_eq!(
            check(&map(memfd(8192, 0), 0, 8192), true).unwrap(),
            vec![0x1000_0000]
        );
        // A plain file cannot be sealed.
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        assert!(matches!(
            check(&map(f, 0, 8192), false),
            Err(MemoryError::Unsealed { .. })
        ));
        let anon: Mem = Mem::from_ranges(&[(GuestAddress(0), 8192)]).unwrap();
        assert!(check(&anon, false).unwrap().is_empty());
    }
}
