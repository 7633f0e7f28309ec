// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Unix socket helpers shared by the client listeners and the control socket, so that neither
//! depends on the other to claim a path or check an inherited fd.
//!
//! A socket path is claimed before it is bound: a lock file `PATH.lock` held (flock) for the
//! life of the process closes the race between two daemons starting at once, and a connect to
//! an existing socket tells a live one (another process serves it: refuse) from a stale one
//! (left by a daemon that died: remove it).

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a socket path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on {}: cannot lock {}", .path.display(), lock_path(.path).display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot give {path} to group {gid}")]
    Group {
        path: PathBuf,
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot check or remove the old socket {path}")]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether `fd` is an open socket.
pub fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat writes into the zeroed stat buffer we own; any fd value is safe to ask about.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

/// A claimed socket path: the lock is held while this lives. The lock file is left behind on
/// exit; [`Claim::remove`] gives a path up for good (a removed client).
#[derive(Debug)]
pub struct Claim {
    _lock: File,
}

impl Claim {
    /// Removes the socket file at `path` (if it is a socket) and then the lock file, with the
    /// lock still held. A process that opened the lock file before it went and gets the lock
    /// afterwards sees that it no longer is the file at `PATH.lock` and tries again, so two
    /// processes never hold a claim on one path.
    pub fn remove(self, path: &Path) -> io::Result<()> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            _ => {}
        }
        match std::fs::remove_file(lock_path(path)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Whether `f` is the file at `path` now (not one unlinked or replaced since it was opened).
fn is_at(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// `PATH.lock`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".lock");
    PathBuf::from(s)
}

/// Claims `path` for binding: takes its lock file, refuses a socket another process serves,
/// and removes a stale one — but never anything that is not a socket, so that a mistyped path
/// cannot delete a file.
pub fn claim(path: &Path) -> Result<Claim, Error> {
    let lp = lock_path(path);
    let lock_err = |source| Error::Lock {
        path: path.to_owned(),
        source,
    };
    // A lock file removed (by `Claim::remove`) between our open and our lock is not the
    // path's lock any more: open the new one. Each round means another process removed the
    // path meanwhile, so a few rounds are plenty.
    let mut rounds = 0;
    let lock = loop {
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lp)
            .map_err(lock_err)?;
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                Error::InUse(path.to_owned())
            } else {
                lock_err(e)
            });
        }
        if is_at(&lock, &lp) {
            break lock;
        }
        rounds += 1;
        if rounds == 8 {
            return Err(Error::InUse(path.to_owned()));
        }
    };
    let stale = |source| Error::Stale {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A process that does not take the lock (an older daemon, another program) may
            // still serve it.
            if probe(path).map_err(stale)? {
                return Err(Error::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(stale)?;
        }
        Ok(_) => return Err(Error::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(stale(e)),
    }
    Ok(Claim { _lock: lock })
}

/// Claims `path` and listens on it, the socket file created 0600 (owner only) or, with a
/// group, 0660 owned by that group. Returns the listening socket and its claim.
pub fn bind(path: &Path, group: Option<u32>) -> Result<(OwnedFd, Claim), Error> {
    let claim = claim(path)?;
    let bind_err = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    // With a group the socket is set up under a side name and renamed into place, so that
    // PATH never exists with the wrong group or mode (a frontend of the group started as soon
    // as PATH appears must not be refused). Our claim on PATH covers the side name.
    let side = group.map(|_| {
        let mut s = OsString::from(path.as_os_str());
        s.push("~");
        PathBuf::from(s)
    });
    let at = side.as_deref().unwrap_or(path);
    if let Some(side) = &side {
        match std::fs::symlink_metadata(side) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(side).map_err(bind_err)?,
            Ok(_) => return Err(Error::NotASocket(side.clone())),
            Err(_) => {}
        }
    }
    let addr = sockaddr(at).map_err(bind_err)?;
    // SAFETY: socket() takes no pointers; the fd it returns is owned right below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Linux creates the socket file with the socket inode's mode (less the umask): set before
    // bind, the file is never reachable by others, not even for an instant.
    // SAFETY: fchmod on an fd we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: addr is a valid sockaddr_un of the size passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: listen on an fd we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(at);
        return Err(bind_err(e));
    }
    if let (Some(gid), Some(side)) = (group, &side) {
        let group_err = |source| Error::Group {
            path: path.to_owned(),
            gid,
            source,
        };
        let r = std::os::unix::fs::lchown(side, None, Some(gid))
            .and_then(|()| std::fs::set_permissions(side, std::fs::Permissions::from_mode(0o660)))
            .map_err(group_err)
            .and_then(|()| std::fs::rename(side, path).map_err(bind_err));
        if let Err(e) = r {
            let _ = std::fs::remove_file(side);
            return Err(e);
        }
    }
    Ok((fd, claim))
}

/// A group given by name or number, as its gid.
pub fn resolve_group(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    loop {
        // SAFETY: group is plain data; zeroes are a valid value for getgrnam_r to fill.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live buffer of the length given; the strings it
        // fills in point into `buf`, which we do not read.
        let r = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        };
        if r == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return (r == 0 && !out.is_null()).then_some(grp.gr_gid);
    }
}

/// Who is at the other end of a Unix socket, as the kernel recorded at connect time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (empty where the kernel cannot tell: before Linux 4.13).
    pub groups: Vec<u32>,
}

/// The peer credentials of a connected Unix socket (SO_PEERCRED, SO_PEERGROUPS).
pub fn peer_cred(fd: &impl AsRawFd) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are live and len is cred's size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = std::mem::size_of_val(groups.as_slice()) as libc::socklen_t;
        // SAFETY: groups is a live buffer of len bytes.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // len now says how much room the list needs (NGROUPS_MAX is 65536).
            Some(libc::ERANGE) if n > groups.len() && n <= 65536 => groups.resize(n, 0),
            Some(libc::ENOPROTOOPT) => {
                groups.clear();
                break;
            }
            _ => return Err(e),
        }
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups,
    })
}

/// Whether a process listens on the socket at `path`. Non-blocking, so that a listener with a
/// full backlog counts as live instead of hanging the start.
fn probe(path: &Path) -> io::Result<bool> {
    let addr = sockaddr(path)?;
    // SAFETY: socket() takes no pointers; the fd it returns is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un of the size passed.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Listening, but the backlog is full.
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(true),
        Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => Ok(false),
        _ => Err(e),
    }
}

/// `path` as a Unix socket address, or an error if it does not fit.
pub(crate) fn sockaddr(path: &Path) -> io::Result<libc::sockaddr_un> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // Room for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn claim_refuses_live_and_removes_stale() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        // Nothing there: claimed.
        let c = claim(&p).unwrap();
        // A second claim while the first holds the lock: in use.
        let e = claim(&p).unwrap_err();
        assert!(matches!(e, Error::InUse(_)), "{e}");
        assert_eq!(
            e.to_string(),
            format!("socket {} is in use by another process", p.display())
        );
        drop(c);
        // A live listener that took no lock: in use, and its socket is left alone.
        let l = UnixListener::bind(&p).unwrap();
        assert!(matches!(claim(&p), Err(Error::InUse(_))));
        assert!(p.exists());
        // The listener gone, its file is stale: removed.
        drop(l);
        let _c = claim(&p).unwrap();
        assert!(!p.exists());
        // Never a file that is not a socket.
        let f = dir.path().join("file");
        std::fs::write(&f, b"keep").unwrap();
        assert!(matches!(claim(&f), Err(Error::NotASocket(_))));
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
    }

    #[test]
    fn a_removed_claim_leaves_nothing_and_the_path_can_be_claimed_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.sock");
        let (fd, c) = bind(&p, None).unwrap();
        // A process that opened the lock file before the removal, and locks it after.
        let stale = File::open(lock_path(&p)).unwrap();
        drop(fd);
        c.remove(&p).unwrap();
        assert!(!p.exists() && !lock_path(&p).exists());
        // SAFETY: flock on an fd we own.
        let r = unsafe { libc::flock(stale.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, 0);
        // It holds the old inode's lock, which is no claim: a new claim takes the new file.
        assert!(!is_at(&stale, &lock_path(&p)));
        let (_fd, _c) = bind(&p, None).unwrap();
        assert!(matches!(claim(&p), Err(Error::InUse(_))));
    }

    #[test]
    fn bound_sockets_are_private_and_peers_known() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.sock");
        let (fd, _claim) = bind(&p, None).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let l = std::os::unix::net::UnixListener::from(fd);
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        let (s, _) = l.accept().unwrap();
        let me = peer_cred(&s).unwrap();
        // SAFETY: getuid/getgid/getpid have no preconditions.
        let (uid, gid, pid) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
        assert_eq!((me.uid, me.gid, me.pid), (uid, gid, pid));
        // With a group (our own, which we can always give): 0660 and that group.
        let q = dir.path().join("g.sock");
        let (gfd, _claim) = bind(&q, Some(gid)).unwrap();
        let m = std::fs::metadata(&q).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, gid));
        // Set up under a side name and renamed into place: it serves at PATH, nothing is left.
        let gl = std::os::unix::net::UnixListener::from(gfd);
        let _c = std::os::unix::net::UnixStream::connect(&q).unwrap();
        gl.accept().unwrap();
        assert!(!dir.path().join("g.sock~").exists());
        assert_eq!(resolve_group("0"), Some(0));
        assert_eq!(resolve_group("root"), Some(0));
        assert_eq!(resolve_group("no-such-group-here"), None);
    }
}
