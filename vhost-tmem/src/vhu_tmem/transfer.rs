// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device state transfer (VHOST_USER_PROTOCOL_F_DEVICE_STATE) for live migration and
//! snapshots: SET_DEVICE_STATE_FD hands the daemon one end of a pipe, the client's state goes
//! through it in the state format (docs/state-format.md), and CHECK_DEVICE_STATE asks how it
//! went.
//!
//! The transfer runs on a thread of its own: the protocol wants SET_DEVICE_STATE_FD answered
//! before the frontend starts reading or writing the pipe. The frontend is not trusted to keep
//! its end moving, so the pipe is non-blocking and a transfer that makes no progress for
//! [`STALL_TIMEOUT`] fails: a saving thread holds one shard lock at a time while it writes, and
//! may not hold it for ever.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

use crate::store::state::Tally;
use crate::store::Tmem;

/// How long a transfer waits for the frontend to take or give more bytes before it fails.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a whole transfer may take: a frontend that trickles the stream cannot keep the
/// thread (and the connection's CHECK_DEVICE_STATE) for ever. QEMU moves gigabytes a second
/// through the pipe, with the guest stopped.
pub const TRANSFER_LIMIT: Duration = Duration::from_secs(600);

/// Bytes buffered between the store and the pipe (a pipe holds 64 KiB by default).
const BUFFER: usize = 256 << 10;

/// Whether and what a client's state migrates (`--migration`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Migration {
    /// Not offered: QEMU refuses to migrate the guest (dirty-page logging and state transfer
    /// are not advertised).
    #[default]
    Off,
    /// Persistent pools with their pages; ephemeral pools arrive empty.
    Persistent,
    /// Every pool with its pages.
    All,
}

/// Why a transfer was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("device state transfer is off (--migration off)")]
    Off,
    #[error("unknown transfer phase")]
    Phase,
    #[error("a device state transfer is already under way")]
    Busy,
    #[error("no device state transfer to check")]
    NoTransfer,
    #[error("cannot make the state pipe non-blocking")]
    Pipe(#[source] io::Error),
    #[error("cannot start the transfer thread")]
    Thread(#[source] io::Error),
    #[error("saving the state failed: {0}")]
    Save(String),
    #[error("loading the state failed: {0}")]
    Load(String),
    #[error("the transfer thread panicked")]
    Panicked,
}

impl From<TransferError> for io::Error {
    fn from(e: TransferError) -> Self {
        io::Error::other(e)
    }
}

/// What a finished transfer moved.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub save: bool,
    pub tally: Tally,
    /// Bytes that went through the pipe.
    pub stream_bytes: u64,
    pub took: Duration,
}

struct Pending {
    save: bool,
    started: Instant,
    thread: JoinHandle<Result<(Tally, u64), String>>,
}

/// The device's one transfer at a time.
pub struct Transfers {
    mode: Migration,
    pending: Mutex<Option<Pending>>,
    stall: Duration,
}

impl std::fmt::Debug for Transfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transfers")
            .field("pending", &self.pending.lock().is_some())
            .finish()
    }
}

impl Drop for Transfers {
    fn drop(&mut self) {
        // The connection ended with a transfer its frontend never checked: wait for it (its
        // pipe's other end is gone with the frontend, or it stalls), so that nothing it loads
        // lands after the connection's end was settled.
        if let Some(p) = self.pending.get_mut().take() {
            if let Ok(Ok(_)) = p.thread.join() {
                tracing::info!(
                    "a device state transfer ({}) ended after its frontend went away without \
                     checking it",
                    if p.save { "save" } else { "load" }
                );
            }
        }
    }
}

impl Transfers {
    /// Transfers of what `mode` says, failing after [`STALL_TIMEOUT`] without progress.
    pub fn new(mode: Migration) -> Self {
        Transfers::with_stall(mode, STALL_TIMEOUT)
    }

    /// Transfers that fail after `stall` without progress.
    pub fn with_stall(mode: Migration, stall: Duration) -> Self {
        Transfers {
            mode,
            pending: Mutex::new(None),
            stall,
        }
    }

    /// Starts saving `client` into `file` (direction SAVE) or loading it from `file` (LOAD).
    pub fn start<S: Tmem>(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
        store: &Arc<S>,
        client: &S::Client,
        name: &str,
    ) -> Result<(), TransferError> {
        let mode = self.mode;
        if mode == Migration::Off {
            return Err(TransferError::Off);
        }
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(TransferError::Phase);
        }
        let mut pending = self.pending.lock();
        if pending.is_some() {
            return Err(TransferError::Busy);
        }
        set_nonblocking(&file).map_err(TransferError::Pipe)?;
        let (store, client, who) = (store.clone(), client.clone(), name.to_string());
        let save = direction == VhostTransferStateDirection::SAVE;
        let ephemeral = mode == Migration::All;
        let file = Stalling {
            file,
            stall: self.stall,
            deadline: Instant::now() + TRANSFER_LIMIT,
            moved: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("{name}-state"))
            // Spawned by the client's request thread, whose confinement it inherits.
            .spawn(move || {
                // The whole chain of causes: the frontend is told nothing, the log all (here:
                // a frontend that fails may never ask).
                let why = |e: &dyn std::error::Error| {
                    let why = crate::daemon::error_chain(e);
                    let what = if save { "saving" } else { "loading" };
                    tracing::warn!(client = %who, "device state transfer failed {what} the state: {why}");
                    why
                };
                if save {
                    let mut w = BufWriter::with_capacity(BUFFER, file);
                    let t = store
                        .save_state(&client, &mut w, ephemeral)
                        .map_err(|e| why(&e))?;
                    let file = w.into_inner().map_err(|e| why(e.error()))?;
                    Ok((t, file.moved))
                } else {
                    let mut r = BufReader::with_capacity(BUFFER, file);
                    let t = store.load_state(&client, &mut r).map_err(|e| why(&e))?;
                    Ok((t, r.into_inner().moved))
                }
            })
            .map_err(TransferError::Thread)?;
        *pending = Some(Pending {
            save,
            started: Instant::now(),
            thread,
        });
        Ok(())
    }

    /// Waits for the transfer under way to end and says how it went.
    pub fn check(&self) -> Result<Done, TransferError> {
        let p = self
            .pending
            .lock()
            .take()
            .ok_or(TransferError::NoTransfer)?;
        let r = p.thread.join().map_err(|_| TransferError::Panicked)?;
        let (tally, stream_bytes) = match r {
            Ok(t) => t,
            Err(e) if p.save => return Err(TransferError::Save(e)),
            Err(e) => return Err(TransferError::Load(e)),
        };
        Ok(Done {
            save: p.save,
            tally,
            stream_bytes,
            took: p.started.elapsed(),
        })
    }
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor `f` owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking pipe end read or written with a deadline: an operation that would block
/// waits for the pipe for at most `stall`, then fails with `TimedOut`.
struct Stalling {
    file: File,
    stall: Duration,
    /// The end of the whole transfer ([`TRANSFER_LIMIT`]).
    deadline: Instant,
    /// Bytes read or written so far.
    moved: u64,
}

impl Stalling {
    fn wait(&self, events: libc::c_short) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events,
            revents: 0,
        };
        let deadline = (Instant::now() + self.stall).min(self.deadline);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = if deadline == self.deadline {
                    format!(
                        "the transfer took longer than {} s",
                        TRANSFER_LIMIT.as_secs()
                    )
                } else {
                    format!(
                        "the frontend moved no state through the pipe for {} ms",
                        self.stall.as_millis()
                    )
                };
                return Err(io::Error::new(io::ErrorKind::TimedOut, why));
            }
            // SAFETY: one pollfd, valid for the call.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(60_000) as i32 + 1) };
            match n {
                n if n > 0 => return Ok(()),
                0 => continue,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLIN)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(n) => {
                    self.moved += n as u64;
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Stalling {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.file.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(libc::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(n) => {
                    self.moved += n as u64;
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
