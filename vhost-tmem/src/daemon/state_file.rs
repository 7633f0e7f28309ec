// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--state-file`: what a daemon hands its successor. At start the file is loaded into the
//! engine before any client is served, then removed (a later crash must not load the same,
//! by then stale, state again); at SIGTERM or `ctl handover` every client's section is
//! written to PATH.tmp, made durable and renamed over PATH, so a crash mid-write never leaves
//! a half file there.
//!
//! The file is reached through a descriptor of its directory taken at start: the namespace
//! sandbox's empty root has no path to it at exit, and the seccomp filter allows what writing
//! it needs in the process tier only (never in a serving thread).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::{StateFileConfig, StateFileInvalid};
use crate::size::format_size;
use crate::store::state::{self, Scope, StateReader, StateWriter, Tally};
use crate::store::{Client, Engine, RestoreError};

/// Buffer between the store and the file, each way.
const BUFFER: usize = 1 << 20;

/// Why a state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--state-file {path}: cannot open its directory")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path}: cannot open it")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state file {path} is refused, the daemon does not start (--state-file-invalid=start-empty \
         starts it without that state)"
    )]
    Refused {
        path: PathBuf,
        #[source]
        source: LoadError,
    },
    #[error("state file {path}: loaded, but cannot {what} it")]
    Loaded {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("state file {path}: cannot write it")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What is wrong with a state file's content.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Format(#[from] state::Error),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(
        "it holds client \"{0}\", which is not configured: configure it again (--client, \
         [[client]]), or start with --state-file-invalid=start-empty to drop the file's state"
    )]
    UnknownClient(String),
    #[error("it holds client \"{0}\" twice")]
    Duplicate(String),
    #[error("it holds one client's stream (a migration), not a daemon's state")]
    Scope,
}

/// The state file, and a handle on its directory.
#[derive(Debug)]
pub struct StateFile {
    cfg: StateFileConfig,
    dir: OwnedFd,
    name: CString,
    tmp: CString,
    rejected: CString,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl StateFile {
    /// Opens the directory of `cfg.path` (which must exist).
    pub fn open(cfg: &StateFileConfig) -> Result<StateFile, Error> {
        let path = &cfg.path;
        let err = |source| Error::Dir {
            path: path.clone(),
            source,
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = path.file_name().expect("checked by the configuration");
        let with = |suffix: &str| {
            let mut n = name.to_os_string();
            n.push(suffix);
            cstr(Path::new(&n)).map_err(err)
        };
        let cparent = cstr(parent).map_err(err)?;
        // Read-only, not O_PATH: fsync of the directory makes the rename durable.
        // SAFETY: cparent is NUL-terminated; the fd returned is owned right below.
        let fd = unsafe {
            libc::open(
                cparent.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(StateFile {
            cfg: cfg.clone(),
            // SAFETY: fd is a fresh descriptor nothing else owns.
            dir: unsafe { OwnedFd::from_raw_fd(fd) },
            name: with("")?,
            tmp: with(".tmp")?,
            rejected: with(".rejected")?,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.cfg.path
    }

    fn openat(&self, name: &CString, flags: libc::c_int) -> io::Result<File> {
        // SAFETY: name is NUL-terminated; dir is an open directory we own.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o600,
            )
        };
        check(fd)?;
        // SAFETY: fd is a fresh descriptor nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn rename(&self, from: &CString, to: &CString) -> io::Result<()> {
        let d = self.dir.as_raw_fd();
        // SAFETY: both names are NUL-terminated; dir is an open directory we own.
        check(unsafe { libc::renameat(d, from.as_ptr(), d, to.as_ptr()) })?;
        // SAFETY: fsync on a descriptor we own.
        check(unsafe { libc::fsync(d) })
    }

    fn unlink(&self, name: &CString) -> io::Result<()> {
        // SAFETY: name is NUL-terminated; dir is an open directory we own.
        check(unsafe { libc::unlinkat(self.dir.as_raw_fd(), name.as_ptr(), 0) })?;
        // SAFETY: fsync on a descriptor we own.
        check(unsafe { libc::fsync(self.dir.as_raw_fd()) })
    }

    /// Loads the file, if there is one, into `engine`'s `clients` (which hold nothing yet),
    /// then removes it. A file that cannot be loaded stops the start, or with
    /// `--state-file-invalid=start-empty` is kept as PATH.rejected and `Ok(None)` tells the
    /// caller to start with a fresh engine: nothing of it may stay in this one.
    pub fn load(&self, engine: &Engine, clients: &[Arc<Client>]) -> Result<Option<Tally>, Error> {
        let path = &self.cfg.path;
        if self.unlink(&self.tmp).is_ok() {
            tracing::warn!(
                path = %path.display(),
                "removed the state file's leftover .tmp: a handover was cut short while \
                 writing it (the state it held was not handed over)"
            );
        }
        let file = match self.openat(&self.name, libc::O_RDONLY) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                tracing::info!(path = %path.display(), "no state file: starting empty");
                return Ok(Some(Tally::default()));
            }
            Err(source) => {
                return Err(Error::Open {
                    path: path.clone(),
                    source,
                })
            }
        };
        let size = file.metadata().map_or(0, |m| m.len());
        let start = Instant::now();
        match self.read(engine, clients, file) {
            Ok((t, writer)) => {
                let done = |what, source| Error::Loaded {
                    path: path.clone(),
                    what,
                    source,
                };
                self.unlink(&self.name).map_err(|e| done("remove", e))?;
                tracing::info!(
                    path = %path.display(),
                    written_by = %writer,
                    clients = t.clients,
                    pools = t.pools,
                    pages = t.pages,
                    payload = %format_size(t.bytes),
                    file = %format_size(size),
                    ms = start.elapsed().as_millis() as u64,
                    "state loaded; the file is removed (a later start must not load it again)"
                );
                Ok(Some(t))
            }
            Err(source) => match self.cfg.invalid {
                StateFileInvalid::Refuse => Err(Error::Refused {
                    path: path.clone(),
                    source,
                }),
                StateFileInvalid::StartEmpty => {
                    let why = crate::daemon::error_chain(&source);
                    // Kept aside for a look (or a start with more memory), out of the way of
                    // the next handover and of the next start.
                    match self.rename(&self.name, &self.rejected) {
                        Ok(()) => tracing::error!(
                            path = %path.display(),
                            kept_as = %format!("{}.rejected", path.display()),
                            "state file refused: {why}; starting empty as \
                             --state-file-invalid=start-empty says"
                        ),
                        Err(e) => tracing::error!(
                            path = %path.display(),
                            "state file refused: {why}; starting empty as \
                             --state-file-invalid=start-empty says (it could not be kept \
                             aside: {e})"
                        ),
                    }
                    Ok(None)
                }
            },
        }
    }

    fn read(
        &self,
        engine: &Engine,
        clients: &[Arc<Client>],
        file: File,
    ) -> Result<(Tally, String), LoadError> {
        let mut r = StateReader::new(BufReader::with_capacity(BUFFER, file))?;
        if r.header().scope != Scope::Daemon {
            return Err(LoadError::Scope);
        }
        let writer = r.header().writer.clone();
        let mut seen = Vec::new();
        while let Some(rec) = r.next_client()? {
            let c = clients
                .iter()
                .find(|c| c.name() == rec.name)
                .ok_or_else(|| LoadError::UnknownClient(rec.name.clone()))?;
            if seen.contains(&rec.name) {
                return Err(LoadError::Duplicate(rec.name));
            }
            let t = engine.restore_client(c, &rec, &mut r)?;
            tracing::debug!(client = %rec.name, pools = t.pools, pages = t.pages, "client restored");
            seen.push(rec.name);
        }
        Ok((r.finish()?, writer))
    }

    /// Writes every client's section to PATH.tmp, makes it durable and renames it over PATH.
    /// The clients' queues must be stopped.
    pub fn save(&self, engine: &Engine, clients: &[Arc<Client>]) -> Result<Tally, Error> {
        let start = Instant::now();
        let err = |source| Error::Write {
            path: self.cfg.path.clone(),
            source,
        };
        let result = self.write(engine, clients);
        let t = match result {
            Ok(t) => t,
            Err(e) => {
                let _ = self.unlink(&self.tmp);
                return Err(err(e));
            }
        };
        self.rename(&self.tmp, &self.name).map_err(err)?;
        tracing::info!(
            path = %self.cfg.path.display(),
            clients = t.clients,
            pools = t.pools,
            pages = t.pages,
            payload = %format_size(t.bytes),
            ms = start.elapsed().as_millis() as u64,
            "state written for the next daemon"
        );
        Ok(t)
    }

    fn write(&self, engine: &Engine, clients: &[Arc<Client>]) -> io::Result<Tally> {
        let file = self.openat(&self.tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut w = StateWriter::new(
            BufWriter::with_capacity(BUFFER, file),
            Scope::Daemon,
            crate::store::DAEMON_VERSION,
            created,
            clients.len() as u32,
        )?;
        for c in clients {
            engine.save_client(c, &mut w, true, &mut |_| Ok(()))?;
        }
        let (buf, t) = w.finish()?;
        let file = buf.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(t)
    }
}
