// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's seccomp allow-list: the syscalls its threads make once it is set up, found by
//! tracing (`strace -f`) the daemon through the end-to-end tests after the sandbox point, with
//! arguments pinned where that is cheap and closes something off (threads but no processes,
//! no executable memory, socket options and fcntl commands the daemon uses, file removal only
//! in the socket directories). Everything else fails (EPERM), kills or is logged, as
//! `--seccomp-action` says.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule,
};

use super::Action;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Which threads a set of filters is for. Filters stack: a serving thread runs under both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Every thread, installed once the daemon is set up (TSYNC): the serving rules plus what
    /// run-time administration over the control socket needs (`add-client` claims and binds a
    /// Unix socket, `reload` reads the configuration file) and installing the serving filters.
    Process,
    /// Stacked on the threads that serve frontends (a client's thread and, inherited, its queue
    /// workers): no file opened, no socket made, nothing in the filesystem changed.
    Serving,
}

/// glibc's internal signal for credential changes in every thread.
const SIGSETXID: u64 = 33;

/// A rule whose conditions all hold.
fn rule(conds: &[(u8, Len, Op, u64)]) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(
        conds
            .iter()
            .map(|(arg, len, op, v)| Cond::new(*arg, len.clone(), op.clone(), *v))
            .collect::<Result<_, _>>()?,
    )
}

/// Argument `arg` (a 32-bit value) equals `v`.
fn eq(arg: u8, v: u64) -> (u8, Len, Op, u64) {
    (arg, Len::Dword, Op::Eq, v)
}

/// Argument `arg` (32-bit) has none of `bits` set.
fn none_of(arg: u8, bits: u64) -> (u8, Len, Op, u64) {
    (arg, Len::Dword, Op::MaskedEq(bits), 0)
}

/// Argument `arg` (64-bit) has all of `bits` set.
fn all_of(arg: u8, bits: u64) -> (u8, Len, Op, u64) {
    (arg, Len::Qword, Op::MaskedEq(bits), bits)
}

/// One rule per value of argument `arg`: it is one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values.iter().map(|v| rule(&[eq(arg, *v)])).collect()
}

/// The allow-list. `dir_fds`: directories in which files may be removed (the socket files at
/// exit).
pub fn rules(dir_fds: &[RawFd], proc_fd: Option<RawFd>, tier: Tier) -> Result<Rules, BackendError> {
    use libc::*;
    let mut r = Rules::new();
    let mut allow = |nr: c_long| {
        r.insert(nr, Vec::new());
    };
    // vhost-user messages (with SCM_RIGHTS), the control socket, /metrics, logging to stderr.
    for nr in [
        SYS_read,
        SYS_write,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_recvfrom,
        SYS_sendto,
        SYS_shutdown,
        SYS_close,
        // Accepting frontends, control and metrics connections on the listeners bound before.
        SYS_accept4,
        // The device's event loop: epoll over the vring kick and exit eventfds.
        SYS_epoll_create1,
        SYS_epoll_ctl,
        #[cfg(target_arch = "x86_64")]
        SYS_epoll_wait,
        #[cfg(not(target_arch = "x86_64"))]
        SYS_epoll_pwait,
        SYS_eventfd2,
        // Device state transfers wait for their pipe with a deadline.
        #[cfg(target_arch = "x86_64")]
        SYS_poll,
        #[cfg(not(target_arch = "x86_64"))]
        SYS_ppoll,
        // Guest memory regions, the payload arena, the allocator (malloc_trim too), stacks.
        SYS_munmap,
        SYS_brk,
        // glibc's realloc of a large block (none in the tests; it falls back to copying).
        SYS_mremap,
        // Threads: locks, the per-thread setup of glibc and Rust's std, the restart backoff.
        SYS_futex,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sigaltstack,
        SYS_rt_sigprocmask,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_clock_nanosleep,
        SYS_gettid,
        SYS_getrandom,
        SYS_exit,
        SYS_exit_group,
        // The control socket's owner is the daemon's user as it starts serving.
        SYS_geteuid,
        // The main thread waits for SIGTERM/SIGINT.
        SYS_rt_sigtimedwait,
    ] {
        allow(nr);
    }
    // The payload arena gives chunks back and keeps its regions out of huge pages; glibc
    // frees thread stacks and trims the heap.
    r.insert(
        SYS_madvise,
        one_of(2, &[MADV_DONTNEED as u64, MADV_NOHUGEPAGE as u64])?,
    );
    // glibc's SIGSETXID handler (setuid and friends across threads), installed at the first
    // thread: signal 33, the kernel's SIGRTMIN + 1 (libc::SIGRTMIN() is glibc's, above it).
    r.insert(SYS_rt_sigaction, one_of(0, &[SIGSETXID])?);
    // No executable memory: mappings and protection changes without PROT_EXEC.
    let no_exec = vec![rule(&[none_of(2, PROT_EXEC as u64)])?];
    r.insert(SYS_mmap, no_exec.clone());
    r.insert(SYS_mprotect, no_exec);
    // Threads only, never a new process (clone3's flags are in memory, out of a filter's
    // reach: it gets ENOSYS, see REFUSED, and glibc falls back to clone).
    r.insert(SYS_clone, vec![rule(&[all_of(0, CLONE_THREAD as u64)])?]);
    // Refused by a filter of their own whatever the action (see REFUSED): here only so that
    // this filter does not override that answer.
    for (nr, _) in REFUSED {
        r.insert(nr, Vec::new());
    }
    // File::metadata of guest memory files: statx(fd, "", AT_EMPTY_PATH), never a path from
    // the working directory. And the socket files' inodes at exit, through the directory
    // descriptors (newfstatat).
    r.insert(
        SYS_statx,
        vec![rule(&[
            (0, Len::Dword, Op::Ne, AT_FDCWD as u32 as u64),
            eq(2, AT_EMPTY_PATH as u64),
        ])?],
    );
    let mut stat = Vec::new();
    let mut unlink = Vec::new();
    for fd in dir_fds {
        stat.push(rule(&[
            eq(0, *fd as u64),
            eq(3, AT_SYMLINK_NOFOLLOW as u64),
        ])?);
        unlink.push(rule(&[eq(0, *fd as u64), eq(2, 0)])?);
    }
    if !stat.is_empty() {
        r.insert(SYS_newfstatat, stat);
        r.insert(SYS_unlinkat, unlink);
    }
    // Guest memory seals; try_clone of control connections; in debug builds, Rust's std
    // checks with F_GETFD that a descriptor it closes is open; device state pipes are made
    // non-blocking (F_GETFL, F_SETFL).
    r.insert(
        SYS_fcntl,
        one_of(
            1,
            &[
                F_GET_SEALS as u64,
                F_DUPFD_CLOEXEC as u64,
                F_GETFD as u64,
                F_GETFL as u64,
                F_SETFL as u64,
            ],
        )?,
    );
    // Read and write timeouts of control and metrics connections.
    r.insert(
        SYS_setsockopt,
        vec![
            rule(&[eq(1, SOL_SOCKET as u64), eq(2, SO_RCVTIMEO as u64)])?,
            rule(&[eq(1, SOL_SOCKET as u64), eq(2, SO_SNDTIMEO as u64)])?,
        ],
    );
    // The control socket's peer check.
    r.insert(
        SYS_getsockopt,
        vec![
            rule(&[eq(1, SOL_SOCKET as u64), eq(2, SO_PEERCRED as u64)])?,
            rule(&[eq(1, SOL_SOCKET as u64), eq(2, SO_PEERGROUPS as u64)])?,
        ],
    );
    // The kick/call fd check reads /proc/self/fd/N links, relative to that directory only.
    if let Some(fd) = proc_fd {
        r.insert(SYS_readlinkat, vec![rule(&[eq(0, fd as u64)])?]);
    }
    // Thread names (Rust's std names each thread it starts).
    r.insert(SYS_prctl, vec![rule(&[eq(0, PR_SET_NAME as u64)])?]);
    if tier == Tier::Process {
        admin_rules(&mut r)?;
    }
    Ok(r)
}

/// What run-time administration needs beyond serving: claiming and binding a Unix socket
/// (lock file, mode, group, stale socket check and removal), reading the configuration file,
/// writing the state file at handover, and a client thread stacking the serving filters on
/// itself.
fn admin_rules(r: &mut Rules) -> Result<(), BackendError> {
    use libc::*;
    for nr in [
        SYS_openat,
        SYS_bind,
        SYS_listen,
        SYS_connect,
        SYS_flock,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchown,
        SYS_fchownat,
        SYS_renameat,
        SYS_renameat2,
        SYS_unlinkat,
        SYS_newfstatat,
        SYS_statx,
        SYS_lseek,
        #[cfg(target_arch = "x86_64")]
        SYS_chmod,
        #[cfg(target_arch = "x86_64")]
        SYS_lchown,
        #[cfg(target_arch = "x86_64")]
        SYS_rename,
        #[cfg(target_arch = "x86_64")]
        SYS_unlink,
    ] {
        r.insert(nr, Vec::new());
    }
    // The state file is made durable before it replaces the old one (handover).
    r.insert(SYS_fsync, Vec::new());
    // `ctl handover` ends the daemon as SIGTERM does: by sending it to itself, nothing else.
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { getpid() } as u64;
    r.insert(SYS_kill, vec![rule(&[eq(0, pid), eq(1, SIGTERM as u64)])?]);
    // Unix sockets only: the metrics listener was bound at start, nothing else talks IP.
    r.insert(SYS_socket, vec![rule(&[eq(0, AF_UNIX as u64)])?]);
    // seccompiler's apply_filter: no_new_privs (already set), then the filter, without TSYNC.
    r.insert(
        SYS_prctl,
        vec![
            rule(&[eq(0, PR_SET_NAME as u64)])?,
            rule(&[eq(0, PR_SET_NO_NEW_PRIVS as u64)])?,
        ],
    );
    r.insert(
        SYS_seccomp,
        vec![rule(&[eq(0, SECCOMP_SET_MODE_FILTER as u64), eq(1, 0)])?],
    );
    Ok(())
}

/// Syscalls the daemon's libraries make after setup that get a fixed error in every mode
/// (even with the kill action): clone3, whose flags a filter cannot see, says ENOSYS so that
/// glibc creates threads with clone, checked above; openat says EACCES in serving threads
/// (the process tier allows it for administration): glibc's malloc reads
/// /proc/sys/vm/overcommit_memory the first time a thread's heap shrinks and, unable to,
/// gives the memory back with MADV_DONTNEED (right unless overcommit is strict, mode 2).
/// Nothing else in a serving thread opens a file.
pub const REFUSED: [(i64, i32); 2] = [
    (libc::SYS_clone3, libc::ENOSYS),
    (libc::SYS_openat, libc::EACCES),
];

/// The filters to install, in order: one per [`REFUSED`] syscall, then the allow-list (other
/// syscalls take `action`; it goes last since it forbids installing more). Where several
/// filters answer, the kernel takes an error over the allow-list's "allow".
pub fn programs(
    action: Action,
    dir_fds: &[RawFd],
    proc_fd: Option<RawFd>,
    tier: Tier,
) -> Result<Vec<BpfProgram>, BackendError> {
    let arch = std::env::consts::ARCH.try_into()?;
    let mismatch = match action {
        Action::Errno => SeccompAction::Errno(libc::EPERM as u32),
        Action::Kill => SeccompAction::KillProcess,
        Action::Log => SeccompAction::Log,
    };
    let mut progs = Vec::new();
    for (nr, errno) in REFUSED {
        if tier == Tier::Process && nr == libc::SYS_openat {
            continue;
        }
        let f = SeccompFilter::new(
            [(nr, Vec::new())].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            arch,
        )?;
        progs.push(f.try_into()?);
    }
    let allow = SeccompFilter::new(
        rules(dir_fds, proc_fd, tier)?,
        mismatch,
        SeccompAction::Allow,
        arch,
    )?;
    progs.push(allow.try_into()?);
    Ok(progs)
}

// Cost: the kernel caches, per syscall number, "allowed by every filter whatever the
// arguments", so the hot path's read, write, epoll_wait, futex and recvmsg/sendmsg pay no
// filter run at all; only the argument-checked calls (mmap, madvise, clone, ...) run them.

/// Sets no_new_privs and installs `progs` on every thread of the process (TSYNC).
pub fn install(progs: &[BpfProgram]) -> Result<(), seccompiler::Error> {
    for p in progs {
        seccompiler::apply_filter_all_threads(p)?;
    }
    Ok(())
}

/// Installs `progs` on the calling thread only (and the threads it starts later).
pub fn install_here(progs: &[BpfProgram]) -> Result<(), seccompiler::Error> {
    for p in progs {
        seccompiler::apply_filter(p)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `body` in a forked child with the daemon's filters installed and returns how the
    /// child ended: `Ok(exit code)` or `Err(signal)`. `body` must not allocate (the parent is
    /// multithreaded) and returns the child's exit code.
    fn in_sandboxed_child(action: Action, body: fn() -> i32) -> Result<i32, i32> {
        let progs = programs(action, &[], None, Tier::Serving).unwrap();
        // SAFETY: the child only installs the prebuilt filters and makes raw syscalls before
        // _exit; it touches no lock another thread of the parent might have held.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = match install(&progs) {
                Ok(()) => body(),
                Err(_) => 100,
            };
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: status is a live int; pid is our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFEXITED(status) {
            Ok(libc::WEXITSTATUS(status))
        } else {
            Err(libc::WTERMSIG(status))
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// Bit i of the exit code: the i-th forbidden call was refused with EPERM. 64: an allowed
    /// call failed.
    fn forbidden_calls() -> i32 {
        let mut refused = 0;
        // SAFETY: raw syscalls with valid (or null, where allowed) arguments; none of them
        // gets past the filter to do anything.
        unsafe {
            // Allowed ones work.
            if libc::gettid() <= 0 || libc::write(2, c"".as_ptr().cast(), 0) != 0 {
                return 64;
            }
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            let calls: [&dyn Fn() -> libc::c_long; 6] = [
                &|| libc::execve(argv[0], argv.as_ptr(), std::ptr::null()) as libc::c_long,
                &|| libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as libc::c_long,
                &|| libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
                &|| libc::unlink(c"/nonexistent".as_ptr()) as libc::c_long,
                // A new process, not a thread.
                &|| libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0),
                // Executable memory.
                &|| {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    ) as libc::c_long
                },
            ];
            for (i, call) in calls.iter().enumerate() {
                if call() == -1 && errno() == libc::EPERM {
                    refused |= 1 << i;
                }
            }
            // Data mappings are allowed.
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return 64;
            }
            // Opening a file says EACCES whatever the action.
            if libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) != -1 || errno() != libc::EACCES
            {
                return 64;
            }
            // clone3 says ENOSYS, so that glibc falls back to clone.
            if libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) != -1
                || errno() != libc::ENOSYS
            {
                return 64;
            }
        }
        refused
    }

    #[test]
    fn forbidden_syscalls_are_refused_allowed_ones_work() {
        assert_eq!(
            in_sandboxed_child(Action::Errno, forbidden_calls),
            Ok(0b11_1111),
            "bits: execve, socket(AF_INET), ptrace, unlink, clone (process), mmap(PROT_EXEC)"
        );
    }

    #[test]
    fn the_allow_list() {
        let r = rules(&[7], Some(8), Tier::Serving).unwrap();
        let names = [
            (libc::SYS_execve, "execve"),
            (libc::SYS_ptrace, "ptrace"),
            (libc::SYS_socket, "socket"),
        ];
        for (nr, name) in names {
            assert!(!r.contains_key(&nr), "{name} allowed");
        }
        // Printed for the documentation (docs/operations.md gives the count): the entries
        // less the REFUSED ones, which have an entry only so as not to override their errno.
        eprintln!("allow-list: {} syscalls", r.len() - REFUSED.len());
        // The process tier adds administration, still without processes, exec or IP sockets.
        let p = rules(&[7], Some(8), Tier::Process).unwrap();
        for nr in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_mount] {
            assert!(!p.contains_key(&nr), "{nr} allowed to the process");
        }
        assert!(p.contains_key(&libc::SYS_bind) && !r.contains_key(&libc::SYS_bind));
        // The state file is fsynced at handover; `ctl handover` signals the daemon itself,
        // pinned to its pid and SIGTERM (kill(-1) would reach every process it may signal).
        assert!(p.contains_key(&libc::SYS_fsync) && !r.contains_key(&libc::SYS_fsync));
        assert!(!r.contains_key(&libc::SYS_kill) && !p[&libc::SYS_kill].is_empty());
        // Links are read only in /proc/self/fd, in both tiers.
        for rules in [&r, &p] {
            assert!(
                !rules[&libc::SYS_readlinkat].is_empty(),
                "readlinkat unpinned"
            );
        }
    }

    /// A serving thread under both tiers, as the daemon stacks them: what administration may
    /// do (open a file, make a Unix socket) the serving thread may not.
    #[test]
    fn serving_threads_get_less_than_the_process() {
        fn admin_calls() -> i32 {
            // SAFETY: raw syscalls with valid arguments; the descriptors are closed again.
            unsafe {
                let f = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY);
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let inet = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let mut bits = 0;
                if f >= 0 {
                    bits |= 1;
                    libc::close(f);
                }
                if s >= 0 {
                    bits |= 2;
                    libc::close(s);
                }
                if inet >= 0 {
                    bits |= 4;
                    libc::close(inet);
                }
                bits
            }
        }
        let process = programs(Action::Errno, &[], None, Tier::Process).unwrap();
        let serving = programs(Action::Errno, &[], None, Tier::Serving).unwrap();
        let run = |stack_serving: bool| {
            // SAFETY: as in in_sandboxed_child: only prebuilt filters and raw syscalls.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let mut code = match install(&process) {
                    Ok(()) => 0,
                    Err(_) => 100,
                };
                if code == 0 && stack_serving && install_here(&serving).is_err() {
                    code = 101;
                }
                if code == 0 {
                    code = admin_calls();
                }
                // SAFETY: ends the child without running the parent's exit handlers.
                unsafe { libc::_exit(code) };
            }
            let mut status = 0;
            // SAFETY: status is a live int; pid is our child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status), "child killed: {status}");
            libc::WEXITSTATUS(status)
        };
        assert_eq!(
            run(false),
            0b011,
            "process tier: open and AF_UNIX yes, AF_INET no"
        );
        assert_eq!(run(true), 0b000, "serving tier: none of them");
    }

    #[test]
    fn the_kill_action_kills() {
        fn exec() -> i32 {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            // SAFETY: a valid argv; the filter stops the call.
            unsafe { libc::execve(argv[0], argv.as_ptr(), std::ptr::null()) };
            1
        }
        assert_eq!(in_sandboxed_child(Action::Kill, exec), Err(libc::SIGSYS));
        fn inet_socket() -> i32 {
            // SAFETY: socket takes no pointers.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            i32::from(fd < 0)
        }
        // Refused with errno, allowed (and logged by the kernel) with log.
        assert_eq!(in_sandboxed_child(Action::Errno, inet_socket), Ok(1));
        assert_eq!(in_sandboxed_child(Action::Log, inet_socket), Ok(0));
    }
}
