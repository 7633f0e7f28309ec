// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device's vring: vhost-user-backend's `VringRwLock` with a check of the kick and call
//! file descriptors the frontend sends (SET_VRING_KICK, SET_VRING_CALL) as they arrive.
//!
//! The crate reads a kick with one blocking 8-byte read and signals a call with one blocking
//! 8-byte write, which is right for an eventfd only: on a pipe or a socket, half a kick blocks
//! the queue's worker thread for good, end-of-file ends that thread (silently, with the other
//! queues it serves), and a full call pipe blocks it in the write; a blocked worker then also
//! blocks the connection's teardown, so the client could never connect again. The crate gives
//! a backend no hook between receiving such a file and using it, except the vring type itself:
//! so this type refuses anything but an eventfd before the crate sees it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, RwLockReadGuard, RwLockWriteGuard};

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as QueueError;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;

use super::{GuestBitmap, LogLimiter, Mem};

type Am<B> = GuestMemoryAtomic<Mem<B>>;

/// What the frontend sent that was refused, per vring.
#[derive(Debug, Default)]
struct Refused {
    kick: AtomicBool,
    call: AtomicBool,
    /// SET_VRING_* messages are the frontend's to repeat: their log lines are limited too.
    log: LogLimiter,
}

/// A vring whose kick and call file descriptors are eventfds or absent (see the module
/// documentation). A refused one is dropped and the vring is left without it; a refused kick
/// means the queue never starts, a refused call that it is not served (see
/// [`Vring::notify_fd_refused`]), until the frontend sends an eventfd (or no descriptor, for
/// polling) or stops the ring.
#[derive(Clone)]
pub struct Vring<B: GuestBitmap = super::DirtyLog> {
    inner: VringRwLock<Am<B>>,
    refused: Arc<Refused>,
}

/// `/proc/self/fd`, opened once: the daemon opens it before it confines itself (the namespace
/// sandbox hides /proc, the seccomp one allows `readlinkat` only relative to it).
static FD_DIR: OnceLock<Option<OwnedFd>> = OnceLock::new();

/// The descriptor of `/proc/self/fd` the kick and call check reads links in (opened on first
/// use), or `None` if /proc is not there: then every kick and call is refused.
pub fn fd_dir() -> Option<RawFd> {
    FD_DIR
        .get_or_init(|| File::open("/proc/self/fd").ok().map(OwnedFd::from))
        .as_ref()
        .map(AsRawFd::as_raw_fd)
}

/// What /proc shows for file `f` (e.g. `anon_inode:[eventfd]`, `pipe:[1234]`).
fn fd_link(f: &File) -> io::Result<String> {
    let dir = fd_dir().ok_or_else(|| io::Error::other("/proc/self/fd is not available"))?;
    let name = CString::new(f.as_raw_fd().to_string()).expect("digits only");
    // Longer links are truncated, and none of those is an eventfd's.
    let mut buf = [0u8; 64];
    // SAFETY: name is NUL-terminated, buf is writable for its length, and dir stays open for
    // the life of the process (a static).
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
}

impl<B: GuestBitmap> std::fmt::Debug for Vring<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vring")
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl<B: GuestBitmap> Vring<B> {
    /// Whether the frontend's last kick or call file descriptor for this vring was refused:
    /// the queue is not served until it sends an acceptable one.
    pub fn notify_fd_refused(&self) -> bool {
        self.refused.kick.load(Relaxed) || self.refused.call.load(Relaxed)
    }

    /// `file` if it is an eventfd (or absent), else `None` with `flag` set and a log line.
    fn check(&self, file: Option<File>, what: &str, flag: &AtomicBool) -> Option<File> {
        let Some(f) = file else {
            flag.store(false, Relaxed);
            return None;
        };
        let kind = fd_link(&f);
        if matches!(&kind, Ok(link) if link == "anon_inode:[eventfd]") {
            flag.store(false, Relaxed);
            return Some(f);
        }
        flag.store(true, Relaxed);
        if let Some(suppressed) = self.refused.log.allow() {
            let kind = kind.unwrap_or_else(|e| format!("cannot tell: {e}"));
            // The crate names the connection's request thread after the client.
            let thread = std::thread::current();
            let client = thread.name().unwrap_or("?");
            tracing::warn!(
                client,
                suppressed,
                "refused a {what} file descriptor that is not an eventfd ({kind}): the queue is \
                 not served until the frontend sends an eventfd"
            );
        }
        None
    }
}

impl<'a, B: GuestBitmap> VringStateGuard<'a, Am<B>> for Vring<B> {
    type G = RwLockReadGuard<'a, VringState<Am<B>>>;
}

impl<'a, B: GuestBitmap> VringStateMutGuard<'a, Am<B>> for Vring<B> {
    type G = RwLockWriteGuard<'a, VringState<Am<B>>>;
}

impl<B: GuestBitmap> VringT<Am<B>> for Vring<B> {
    fn new(mem: Am<B>, max_queue_size: u16) -> Result<Self, QueueError> {
        Ok(Vring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            refused: Arc::default(),
        })
    }

    fn get_ref(&self) -> RwLockReadGuard<'_, VringState<Am<B>>> {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> RwLockWriteGuard<'_, VringState<Am<B>>> {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), QueueError> {
        self.inner.set_queue_info(desc, avail, used)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        // The crate watches the kick it had when the ring was enabled and reads the current
        // one: replaced while the ring runs, a kick on the old one has the worker read the
        // new one, which blocks or fails (ending the thread). A VMM stops the ring
        // (GET_VRING_BASE) or disables it first; so a running ring keeps its kick. Only the
        // connection's request thread calls this, so the state cannot change in between.
        let watched = {
            let state = self.inner.get_ref();
            state.get_queue().ready() && state.is_enabled() && state.get_kick().is_some()
        };
        if watched {
            if let Some(suppressed) = self.refused.log.allow() {
                let thread = std::thread::current();
                tracing::warn!(
                    client = thread.name().unwrap_or("?"),
                    suppressed,
                    "refused a new kick file descriptor for a running queue: the frontend must \
                     stop or disable the ring first; the queue keeps its kick"
                );
            }
            return;
        }
        let file = self.check(file, "kick", &self.refused.kick);
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        let file = self.check(file, "call", &self.refused.call);
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        // Never used by the crate or the device: kept as it is.
        self.inner.set_err(file)
    }
}
