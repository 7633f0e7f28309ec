// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Starts the real `vhost-tmem` binary for tests, the demo and benchmarks.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting or querying the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vhost-tmem binary not found at {0} (set VHOST_TMEM_BIN or build it first)")]
    NoBinary(PathBuf),
    #[error("cannot build vhost-tmem")]
    Build(#[source] std::io::Error),
    #[error("cannot start vhost-tmem")]
    Spawn(#[source] std::io::Error),
    #[error("vhost-tmem exited early ({status}); log:\n{log}")]
    Exited { status: String, log: String },
    #[error("vhost-tmem did not create {0} in time")]
    NoSocket(PathBuf),
    #[error("control socket: {0}")]
    Control(String),
}

/// The daemon binary: `$VHOST_TMEM_BIN`, else the workspace's target directory for the
/// profile the caller was built with (building it there if missing).
pub fn binary() -> Result<PathBuf, Error> {
    if let Some(p) = std::env::var_os("VHOST_TMEM_BIN") {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(Error::NoBinary(p))
        };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let release = !cfg!(debug_assertions);
    let p = root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("vhost-tmem");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["build", "-q", "-p", "vhost-tmem", "--bin", "vhost-tmem"]);
    if release {
        cmd.arg("--release");
    }
    // Cheap when up to date; makes sure tests never run a stale daemon.
    let st = cmd.status().map_err(Error::Build)?;
    if !st.success() || !p.exists() {
        return Err(Error::NoBinary(p));
    }
    Ok(p)
}

/// A running daemon; killed (and its temporary directory removed) on drop.
#[derive(Debug)]
pub struct Daemon {
    /// The process; replaced by [`Daemon::restart`].
    child: std::sync::Mutex<Child>,
    dir: PathBuf,
    args: Vec<String>,
    keep: std::sync::atomic::AtomicBool,
}

impl Daemon {
    /// Starts `vhost-tmem` with `args` plus `--control-socket DIR/control.sock`, in a fresh
    /// directory, and waits until the control socket and every `socket=`/`--socket-path` exist.
    /// `{dir}` in an argument is replaced by that directory.
    pub fn start(args: &[&str]) -> Result<Daemon, Error> {
        // A sequence number too: two tests of one process starting daemons within the
        // clock's resolution got one directory, and each saw the other's clients.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vhost-tmem-test-{}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(Error::Spawn)?;
        let d = dir.display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("{dir}", &d)).collect();
        let log = std::fs::File::create(dir.join("daemon.log")).map_err(Error::Spawn)?;
        let child = spawn(&dir, &args, log)?;
        let d = Daemon {
            child: std::sync::Mutex::new(child),
            dir,
            args,
            keep: std::sync::atomic::AtomicBool::new(false),
        };
        d.wait_serving()?;
        Ok(d)
    }

    /// Ends the daemon with SIGTERM (waiting at most `bound`: a handover writes its state file
    /// first) and starts it again with the same arguments in the same directory (its log goes
    /// on in the same file), as an operator's restart or upgrade does; returns once the new
    /// one serves. Fails if the old one did not exit 0 or the new one does not serve.
    pub fn restart(&self, bound: Duration) -> Result<(), Error> {
        let st = self.sigterm_wait(bound);
        if !st.success() {
            self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(Error::Exited {
                status: st.to_string(),
                log: self.log(),
            });
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("daemon.log"))
            .map_err(Error::Spawn)?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = spawn(&self.dir, &self.args, log)?;
        self.wait_serving()
    }

    /// Starts the daemon again with the same arguments in the same directory (its log goes on
    /// in the same file) once the running one has died (a crash: the caller killed it), as a
    /// service manager's restart does; returns once the new one serves. Its sockets are the
    /// dead one's paths, which it takes over.
    pub fn respawn(&self) -> Result<(), Error> {
        {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = child.wait();
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("daemon.log"))
            .map_err(Error::Spawn)?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = spawn(&self.dir, &self.args, log)?;
        self.wait_serving()
    }

    /// Waits until the control socket and every client socket exist and the control socket
    /// answers (it does once the daemon is set up and confined: it serves only after the
    /// sandbox is in place), so tests see the daemon as it serves.
    fn wait_serving(&self) -> Result<(), Error> {
        let mut wait_for = vec![self.dir.join("control.sock")];
        for (i, a) in self.args.iter().enumerate() {
            if a == "--socket-path" {
                if let Some(p) = self.args.get(i + 1) {
                    wait_for.push(PathBuf::from(p));
                }
            }
            for kv in a.split(',') {
                if let Some(p) = kv.strip_prefix("socket=") {
                    wait_for.push(PathBuf::from(p));
                }
            }
        }
        let exited = || -> Option<Error> {
            let st = self.child.lock().ok()?.try_wait().ok()??;
            self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
            Some(Error::Exited {
                status: st.to_string(),
                log: self.log(),
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in &wait_for {
            while !p.exists() {
                if let Some(e) = exited() {
                    return Err(e);
                }
                if Instant::now() > deadline {
                    return Err(Error::NoSocket(p.clone()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        while let Err(e) = self.stats() {
            if let Some(e) = exited() {
                return Err(e);
            }
            if Instant::now() > deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Sends SIGTERM and waits (at most 10 s, then SIGKILL) for the daemon to exit; returns
    /// how it ended.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.terminate_within(Duration::from_secs(10))
    }

    /// [`Daemon::terminate`] with another bound (a handover writes its state file first).
    pub fn terminate_within(&mut self, bound: Duration) -> std::process::ExitStatus {
        self.sigterm_wait(bound)
    }

    fn sigterm_wait(&self, bound: Duration) -> std::process::ExitStatus {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: kill takes no pointers; the pid is our child's, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the daemon's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Sends one control request (a JSON object) and returns the answer.
    pub fn control(&self, req: &serde_json::Value) -> Result<serde_json::Value, Error> {
        let mut s = UnixStream::connect(self.dir.join("control.sock"))
            .map_err(|e| Error::Control(e.to_string()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| Error::Control(e.to_string()))?;
        writeln!(s, "{req}").map_err(|e| Error::Control(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .map_err(|e| Error::Control(e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| Error::Control(e.to_string()))?;
        if v["ok"] != serde_json::Value::Bool(true) {
            return Err(Error::Control(v["error"].to_string()));
        }
        Ok(v)
    }

    /// The daemon's statistics.
    pub fn stats(&self) -> Result<serde_json::Value, Error> {
        Ok(self.control(&serde_json::json!({"cmd": "stats"}))?["stats"].take())
    }

    /// One client's statistics.
    pub fn client_stats(&self, name: &str) -> Result<serde_json::Value, Error> {
        let s = self.stats()?;
        s["clients"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["name"] == name).cloned())
            .ok_or_else(|| Error::Control(format!("no client {name} in stats")))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() || *self.keep.get_mut() {
            eprintln!(
                "vhost-tmem log kept in {}:\n{}",
                self.dir.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Starts the daemon binary with `args` in `dir`, its stderr to `log`.
fn spawn(dir: &Path, args: &[String], log: std::fs::File) -> Result<Child, Error> {
    Command::new(binary()?)
        .args(args)
        .arg("--control-socket")
        .arg(dir.join("control.sock"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(Error::Spawn)
}
