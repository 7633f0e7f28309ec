// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unix socket helpers shared by the client listeners and the control socket, so that neither
//! depends on the other to bind a path or check an inherited fd.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// Whether `fd` is an open socket.
pub fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat writes into the zeroed stat buffer we own; any fd value is safe to ask about.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

/// Removes a stale socket at `path` so that it can be bound again, but never anything else:
/// a mistyped path must not delete a file.
pub fn remove_stale_socket(path: &Path) -> Result<(), io::Error> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
