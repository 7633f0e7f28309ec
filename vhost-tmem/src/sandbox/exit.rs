// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A clean exit on SIGTERM or SIGINT that removes the daemon's socket files, whatever the
//! sandbox hides: each file is reached through a descriptor of its directory taken before
//! confinement (a mount namespace with an empty root has no path to it any more), and the
//! seccomp filter allows removing files only through those descriptors.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Error, User};

/// One socket file the daemon bound: its directory, its name there and its inode (a file put
/// there by someone else after us is left alone).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dir: OwnedFd,
    name: CString,
    dev: u64,
    ino: u64,
}

/// The socket files to remove at exit.
#[derive(Debug, Default)]
pub struct SocketFiles(Vec<SocketFile>);

fn stat_at(dir: &OwnedFd, name: &CString) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstatat fills it; name is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; dir is an open descriptor we own.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl SocketFiles {
    /// Records the bound socket files at `paths`.
    pub fn record<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<SocketFiles, Error> {
        let mut files = Vec::new();
        for path in paths {
            let err = |source| Error::SocketDir {
                path: path.to_owned(),
                source,
            };
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let name = path
                .file_name()
                .and_then(|n| CString::new(n.as_bytes()).ok())
                .ok_or_else(|| err(io::ErrorKind::InvalidInput.into()))?;
            let cparent = CString::new(parent.as_os_str().as_bytes())
                .map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
            // O_PATH: enough to name files in it (unlinkat, fchownat), not to read it.
            // SAFETY: cparent is NUL-terminated; the fd returned is owned right below.
            let fd = unsafe {
                libc::open(
                    cparent.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(err(io::Error::last_os_error()));
            }
            // SAFETY: fd is a fresh descriptor nothing else owns.
            let dir = unsafe { OwnedFd::from_raw_fd(fd) };
            let st = stat_at(&dir, &name).map_err(err)?;
            files.push(SocketFile {
                path: path.to_owned(),
                dir,
                name,
                dev: st.st_dev,
                ino: st.st_ino,
            });
        }
        Ok(SocketFiles(files))
    }

    /// Whether `path` is one of these files and still the socket recorded there (a client
    /// removed and added again at run time has a new one).
    pub fn holds(&self, path: &Path) -> bool {
        self.0.iter().any(|f| {
            f.path == path
                && stat_at(&f.dir, &f.name).is_ok_and(|st| (st.st_dev, st.st_ino) == (f.dev, f.ino))
        })
    }

    /// The directory descriptors (the only ones the filter lets the daemon remove files in).
    pub fn dir_fds(&self) -> Vec<RawFd> {
        self.0.iter().map(|f| f.dir.as_raw_fd()).collect()
    }

    /// Gives each socket file and its lock file to `u` (the group stays: it may be
    /// --socket-group's), so that the daemon as `u`, and a later one, can use them.
    pub fn chown(&self, u: &User) -> Result<(), Error> {
        for f in &self.0 {
            let lock = crate::sock::lock_path(Path::new(f.name.to_str().unwrap_or_default()));
            let lock = CString::new(lock.as_os_str().as_bytes()).unwrap_or_default();
            for name in [&f.name, &lock] {
                // SAFETY: name is NUL-terminated and dir is an open descriptor we own.
                let r = unsafe {
                    libc::fchownat(
                        f.dir.as_raw_fd(),
                        name.as_ptr(),
                        u.uid,
                        u32::MAX,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                if r != 0 {
                    return Err(Error::Chown {
                        user: u.name.clone(),
                        path: f
                            .path
                            .parent()
                            .unwrap_or(Path::new(""))
                            .join(std::ffi::OsStr::from_bytes(name.as_bytes())),
                        source: io::Error::last_os_error(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes each socket file that is still the one the daemon bound. The lock files stay:
    /// see [`crate::sock::Claim`].
    pub fn remove(&self) {
        for f in &self.0 {
            match stat_at(&f.dir, &f.name) {
                Ok(st) if (st.st_dev, st.st_ino) == (f.dev, f.ino) => {}
                // Replaced or gone: not ours to remove.
                _ => continue,
            }
            // SAFETY: name is NUL-terminated and dir is an open descriptor we own.
            if unsafe { libc::unlinkat(f.dir.as_raw_fd(), f.name.as_ptr(), 0) } != 0 {
                tracing::warn!(
                    path = %f.path.display(),
                    "cannot remove the socket file: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a live sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread, and so in every thread it starts
/// later: only [`wait_for_signal`] takes them. Call before starting any thread.
pub fn block_signals() -> Result<(), Error> {
    let set = termination_signals();
    // SAFETY: set is a live sigset_t; no old mask is asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Error::Signals(io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

/// Waits until SIGTERM, SIGINT or SIGHUP arrives; returns the signal.
pub fn wait_for_signal() -> libc::c_int {
    let set = termination_signals();
    loop {
        let mut sig = 0;
        // SAFETY: set and sig are live.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            return sig;
        }
    }
}
