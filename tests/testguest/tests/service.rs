// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon under a service manager, end to end, as systemd runs it: client sockets passed
//! at start (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`) and state notifications on
//! `$NOTIFY_SOCKET`, in the default (seccomp) and the namespace sandbox.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tmem_testguest::daemon;
use tmem_testguest::{pages, Guest, GuestOptions};

/// A fresh directory for one test.
fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vhost-tmem-service-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the daemon as a service manager would: `listeners` become descriptors 3, 4, ...,
/// `LISTEN_PID` is the daemon's own pid (set by a shell that then execs it), and `env` is
/// added. Its log goes to DIR/daemon.log.
fn spawn(dir: &Path, listeners: &[OwnedFd], env: &[(&str, String)], args: &[&str]) -> Child {
    let raw: Vec<i32> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(daemon::binary().unwrap())
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: between fork and exec only dup2 and fcntl run, both async-signal-safe. The
    // sources are moved above every target first, so no dup2 overwrites a source still needed.
    unsafe {
        cmd.pre_exec(move || {
            let high: Vec<i32> = raw
                .iter()
                .map(|&fd| libc::fcntl(fd, libc::F_DUPFD, 100))
                .collect();
            for (i, fd) in high.iter().enumerate() {
                if *fd < 0 || libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*fd);
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn listener(path: &Path) -> OwnedFd {
    OwnedFd::from(UnixListener::bind(path).unwrap())
}

/// The next notification, within 20 s.
fn next(manager: &UnixDatagram, child: &mut Child, log: &Path) -> String {
    manager
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 512];
    loop {
        if let Ok(n) = manager.recv(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "the daemon exited ({st}) before notifying: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "no notification within 20 s");
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill takes no pointers; the pid is our child's, not yet reaped.
    unsafe { libc::kill(child.id() as i32, sig) };
}

fn wait(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon did not exit within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Puts and gets a page on a client's socket.
fn round_trip(path: &Path, seed: u64) {
    let mut g = Guest::connect(path, GuestOptions::default()).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    g.put(pool, [seed, 0, 0], 0, &pages::page(seed)).unwrap();
    let mut out = vec![0u8; 4096];
    g.get(pool, [seed, 0, 0], 0, false, &mut out).unwrap();
    assert_eq!(out, pages::page(seed));
}

/// Two clients on sockets a service manager bound and passed by name (in the order the names
/// do not follow), READY once both serve, RELOADING then READY around a SIGHUP, STOPPING at
/// SIGTERM; the passed sockets' files are the manager's and stay.
fn activated(sandbox: &str) {
    let dir = tempdir(sandbox);
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let fds = [listener(&b), listener(&a)];
    let manager = UnixDatagram::bind(dir.join("notify")).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        "[[client]]\nname = \"a\"\nlisten = \"vm-a\"\n[[client]]\nname = \"b\"\nlisten = \"vm-b\"\n",
    )
    .unwrap();
    let log = dir.join("daemon.log");
    let mut child = spawn(
        &dir,
        &fds,
        &[
            ("LISTEN_FDS", "2".into()),
            ("LISTEN_FDNAMES", "vm-b:vm-a".into()),
            ("NOTIFY_SOCKET", dir.join("notify").display().to_string()),
        ],
        &["--config", config.to_str().unwrap(), "--sandbox", sandbox],
    );
    drop(fds);
    let ready = next(&manager, &mut child, &log);
    assert_eq!(ready, "READY=1\nSTATUS=serving 2 clients\n");
    round_trip(&a, 1);
    round_trip(&b, 2);
    if sandbox != "namespace" {
        // Reloading reads the configuration file, which the namespace sandbox cannot see.
        signal(&child, libc::SIGHUP);
        let reloading = next(&manager, &mut child, &log);
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading}"
        );
        assert!(next(&manager, &mut child, &log).starts_with("READY=1\n"));
    }
    signal(&child, libc::SIGTERM);
    assert!(next(&manager, &mut child, &log).starts_with("STOPPING=1\n"));
    assert!(wait(&mut child).success());
    // The daemon did not bind these files: it leaves them to the manager.
    assert!(a.exists() && b.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn socket_activation_and_notifications() {
    activated("seccomp");
}

#[test]
fn socket_activation_and_notifications_in_the_namespace_sandbox() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the namespace sandbox needs root here");
        return;
    }
    activated("namespace");
}

/// A client that names a socket the manager did not pass, or a daemon started without any (or
/// with another process's), exits 1 with a message naming the client, the name and why.
#[test]
fn missing_passed_sockets_are_named() {
    let dir = tempdir("missing");
    let log = dir.join("daemon.log");
    let cases: [(&[(&str, String)], &str); 3] = [
        (
            &[
                ("LISTEN_FDS", "1".into()),
                ("LISTEN_FDNAMES", "vm-a".into()),
            ],
            "client \"x\": no passed socket is named \"vm-x\" (LISTEN_FDNAMES: vm-a)",
        ),
        (&[], "client \"x\": listen=vm-x, but no socket was passed"),
        (
            &[("LISTEN_FDS", "1".into()), ("LISTEN_FDNAMES", "a:b".into())],
            "LISTEN_FDNAMES names 2 sockets but LISTEN_FDS passes 1",
        ),
    ];
    for (env, want) in cases {
        let fds = [listener(&dir.join("a.sock"))];
        let mut child = spawn(&dir, &fds, env, &["--client", "name=x,listen=vm-x"]);
        let st = wait(&mut child);
        assert_eq!(st.code(), Some(1), "{env:?}");
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(err.contains(want), "{env:?}: {err}");
        let _ = std::fs::remove_file(dir.join("a.sock"));
    }
    // LISTEN_PID of another process: the sockets are not ours.
    let out = Command::new(daemon::binary().unwrap())
        .args(["--client", "name=x,listen=vm-x"])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("LISTEN_PID names another process"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
