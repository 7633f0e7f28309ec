// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon confines itself once it is set up (sockets bound and claimed, control and metrics
//! listeners up, the engine built): it holds every guest's memory and parses what untrusted
//! frontends send, so a bug an attacker reaches there should find as little as possible to
//! use. Modes (`--sandbox`): `none`; `seccomp`, a syscall allow-list for every thread
//! ([`seccomp`]); `namespace`, seccomp plus fresh mount (an empty, read-only root), network,
//! IPC, UTS and cgroup namespaces. `--user` drops root for a user's uid, gid and groups.
//!
//! Everything here runs in the main thread before any other thread exists: namespaces, the
//! root and the uid are per thread in Linux and are inherited only by threads created later.

mod exit;
pub mod seccomp;

use std::ffi::CString;
use std::io;

use clap::ValueEnum;
use serde::Deserialize;

pub use exit::{block_signals, wait_for_signal, SocketFiles};

/// `--sandbox` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No confinement (to debug a refused syscall).
    None,
    /// A seccomp allow-list for every thread; needs no privileges.
    #[default]
    Seccomp,
    /// Seccomp, plus new mount (empty read-only root), network, IPC, UTS and cgroup namespaces;
    /// needs root or unprivileged user namespaces.
    Namespace,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::None => "none",
            Mode::Seccomp => "seccomp",
            Mode::Namespace => "namespace",
        })
    }
}

/// `--seccomp-action` values: what a syscall outside the allow-list does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Fails with EPERM: the thread sees an error, the daemon keeps serving every guest.
    #[default]
    Errno,
    /// Kills the daemon (SIGSYS), and with it every guest's stored pages.
    Kill,
    /// Allowed, and logged by the kernel (dmesg, audit): to find what a new setup needs.
    Log,
}

/// The user `--user` names, resolved while the daemon can still read the user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, as `initgroups` would set them.
    pub groups: Vec<u32>,
}

/// How the daemon confines itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sandbox {
    pub mode: Mode,
    pub action: Action,
    pub user: Option<User>,
}

/// Why the daemon cannot confine itself (it then does not start).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--user {user}: only root can change to another user (the daemon runs as uid {euid})")]
    UserNeedsRoot { user: String, euid: u32 },
    #[error("unknown user \"{0}\" for --user")]
    UnknownUser(String),
    #[error("--user {user}: cannot look up the user's groups")]
    Groups { user: String },
    #[error("--user {user}: cannot {step}")]
    DropUser {
        user: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("--user {user}: cannot give {path} to the user")]
    Chown {
        user: String,
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--sandbox namespace: cannot {step}")]
    Namespace {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("--sandbox {mode}: cannot build the seccomp filter")]
    Filter {
        mode: Mode,
        #[source]
        source: seccompiler::BackendError,
    },
    // seccompiler's Display already includes its source.
    #[error("--sandbox {mode}: cannot install the seccomp filter: {source}")]
    Install {
        mode: Mode,
        source: seccompiler::Error,
    },
    #[error("cannot keep a handle on the directory of {path} (to remove it at exit)")]
    SocketDir {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot block SIGTERM and SIGINT (to exit cleanly on them)")]
    Signals(#[source] io::Error),
}

/// Resolves `--user NAME` (a name or a numeric uid): only root may change users.
pub fn resolve_user(name: &str) -> Result<User, Error> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(Error::UserNeedsRoot {
            user: name.to_string(),
            euid,
        });
    }
    let unknown = || Error::UnknownUser(name.to_string());
    let cname = CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let (uid, gid, pw_name) = loop {
        // SAFETY: passwd is plain data; zeroes are a valid value for getpwnam_r to fill.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live buffer of the length given.
        let r = unsafe {
            match name.parse::<u32>() {
                Ok(uid) => libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out),
                Err(_) => libc::getpwnam_r(
                    cname.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut out,
                ),
            }
        };
        if r == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if r != 0 || out.is_null() {
            return Err(unknown());
        }
        // SAFETY: pw_name points into `buf`, a NUL-terminated string getpwnam_r wrote.
        let pw_name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }.to_owned();
        break (pw.pw_uid, pw.pw_gid, pw_name);
    };
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: groups holds n entries; getgrouplist writes at most n and updates n.
        let r = unsafe { libc::getgrouplist(pw_name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if r >= 0 {
            groups.truncate(n.max(0) as usize);
            break;
        }
        if n as usize <= groups.len() || n > 65536 {
            return Err(Error::Groups {
                user: name.to_string(),
            });
        }
        groups.resize(n as usize, 0);
    }
    Ok(User {
        name: name.to_string(),
        uid,
        gid,
        groups,
    })
}

/// Confines the calling process: namespaces, then the user, then seccomp. Must run before the
/// daemon starts any thread (namespaces and credentials are per thread); `files` are the
/// socket files whose directories stay reachable to remove them at exit.
pub fn enter(sb: &Sandbox, files: &SocketFiles) -> Result<(), Error> {
    // Opened while /proc is still there (the namespace mode's empty root hides it).
    let proc_fd = crate::vhu_tmem::fd_dir();
    if let Some(u) = &sb.user {
        // While still root: the daemon's user must be able to reclaim and remove them later.
        files.chown(u)?;
    }
    if sb.mode == Mode::Namespace {
        namespaces()?;
    }
    if let Some(u) = &sb.user {
        drop_to(u)?;
    }
    if sb.mode != Mode::None {
        cap_malloc_arenas();
        let build = |tier| {
            seccomp::programs(sb.action, &files.dir_fds(), proc_fd, tier).map_err(|source| {
                Error::Filter {
                    mode: sb.mode,
                    source,
                }
            })
        };
        let serving = build(seccomp::Tier::Serving)?;
        let process = build(seccomp::Tier::Process)?;
        seccomp::install(&process).map_err(|source| Error::Install {
            mode: sb.mode,
            source,
        })?;
        let _ = SERVING.set(serving);
    }
    Ok(())
}

/// The serving tier's filters, built by [`enter`] for [`confine_serving_thread`].
static SERVING: std::sync::OnceLock<Vec<seccompiler::BpfProgram>> = std::sync::OnceLock::new();

/// Stacks the serving tier on the calling thread (a client's thread; its queue workers inherit
/// it): no file opened, no socket made there, though the control socket's administration may.
/// Without a sandbox it does nothing. A failure is logged: the thread keeps the process tier.
pub fn confine_serving_thread() {
    if let Some(progs) = SERVING.get() {
        if let Err(e) = seccomp::install_here(progs) {
            tracing::error!("cannot confine a serving thread further: {e}");
        }
    }
}

/// Whether run-time administration that needs the filesystem (adding clients, reloading the
/// configuration file) can work in `mode`: not in the namespace sandbox's empty root.
pub fn sees_filesystem(mode: Mode) -> bool {
    mode != Mode::Namespace
}

/// glibc's malloc reads /sys/devices/system/cpu/online when a thread first needs a new arena
/// (to cap them at 8 per CPU); the sandbox allows opening no file, so the same cap is set now.
fn cap_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: mallopt changes a malloc tunable; no pointers.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, (8 * cpus).min(1024) as libc::c_int) };
    }
}

fn check(step: &'static str, r: libc::c_int) -> Result<(), Error> {
    if r == 0 {
        Ok(())
    } else {
        Err(Error::Namespace {
            step,
            source: io::Error::last_os_error(),
        })
    }
}

/// Where the empty root is mounted before it becomes `/` (private to the new mount namespace,
/// so the host's directory there is untouched).
const NEW_ROOT: &std::ffi::CStr = c"/tmp";

/// New mount, network, IPC, UTS and cgroup namespaces, and an empty read-only root. Without
/// root, a user namespace first (mapping only the daemon's own uid and gid) gives the
/// privilege to do that.
fn namespaces() -> Result<(), Error> {
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid != 0 {
        // SAFETY: unshare takes no pointers.
        let r = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
        check(
            "create a user namespace (not root, and user namespaces are not allowed?)",
            r,
        )?;
        let write = |step, path: &str, text: String| {
            std::fs::write(path, text).map_err(|source| Error::Namespace { step, source })
        };
        write(
            "map the uid in the user namespace",
            "/proc/self/uid_map",
            format!("{uid} {uid} 1\n"),
        )?;
        write(
            "deny setgroups in the user namespace",
            "/proc/self/setgroups",
            "deny\n".into(),
        )?;
        write(
            "map the gid in the user namespace",
            "/proc/self/gid_map",
            format!("{gid} {gid} 1\n"),
        )?;
    }
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // SAFETY: unshare takes no pointers.
    let r = unsafe { libc::unshare(flags) };
    check(
        "unshare the mount, network, IPC, UTS and cgroup namespaces",
        r,
    )?;
    let null = std::ptr::null::<libc::c_char>();
    // Nothing mounted from here on may reach the host's mount table.
    // SAFETY: the strings are NUL-terminated literals; null is allowed for unused arguments.
    check("make the mounts private", unsafe {
        libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    // SAFETY: as above.
    check("mount an empty tmpfs for the new root", unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            NEW_ROOT.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"size=4k,nr_inodes=2,mode=0555".as_ptr().cast(),
        )
    })?;
    // SAFETY: a NUL-terminated literal.
    check("enter the new root", unsafe {
        libc::chdir(NEW_ROOT.as_ptr())
    })?;
    // pivot_root(".", "."): the old root ends up stacked on the new one, and is then detached.
    // SAFETY: both are NUL-terminated literals.
    check("pivot_root to the empty root", unsafe {
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
    })?;
    // SAFETY: a NUL-terminated literal.
    check("detach the old root", unsafe {
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
    })?;
    // SAFETY: a NUL-terminated literal.
    check("enter the new root", unsafe { libc::chdir(c"/".as_ptr()) })?;
    // SAFETY: as for the mounts above.
    check("make the new root read-only", unsafe {
        libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REMOUNT
                | libc::MS_BIND
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// Root's uid, gid and groups become `u`'s for good (real, effective and saved alike; the
/// capabilities go with them).
fn drop_to(u: &User) -> Result<(), Error> {
    let fail = |step| Error::DropUser {
        user: u.name.clone(),
        step,
        source: io::Error::last_os_error(),
    };
    // SAFETY: groups is a live array of the length given.
    if unsafe { libc::setgroups(u.groups.len(), u.groups.as_ptr()) } != 0 {
        return Err(fail("set its supplementary groups"));
    }
    // SAFETY: no pointers.
    if unsafe { libc::setresgid(u.gid, u.gid, u.gid) } != 0 {
        return Err(fail("change to its group"));
    }
    // SAFETY: no pointers.
    if unsafe { libc::setresuid(u.uid, u.uid, u.uid) } != 0 {
        return Err(fail("change to its uid"));
    }
    // Root must be gone for good (u may be root itself: nothing to check then).
    // SAFETY: no pointers.
    if u.uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(Error::DropUser {
            user: u.name.clone(),
            step: "drop root for good (setuid(0) still works)",
            source: io::Error::from_raw_os_error(libc::EPERM),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_lookup() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let e = resolve_user("root").unwrap_err().to_string();
            assert!(e.contains("only root can change"), "{e}");
            return;
        }
        let r = resolve_user("root").unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        assert!(r.groups.contains(&0));
        let n = resolve_user("65534").unwrap();
        assert_eq!(n.uid, 65534);
        let e = resolve_user("no-such-user-here").unwrap_err().to_string();
        assert_eq!(e, "unknown user \"no-such-user-here\" for --user");
    }
}
