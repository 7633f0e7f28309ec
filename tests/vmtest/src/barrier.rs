// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Barriers: the meeting points where the guests of a scenario wait for each other (and for
//! the runner's checks). A guest prints `guest-sync NAME` on its console and blocks reading
//! its second serial port, a Unix socket this runner listens on; once every guest got there,
//! the runner writes NAME back to each.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Lines the console readers pass on: a guest reached a barrier, or its console closed.
#[derive(Debug)]
pub enum Event {
    Sync(usize, String),
    Closed(usize),
}

/// A guest's barrier port (its ttyS1) before QEMU connected.
#[derive(Debug)]
pub struct Port {
    listener: UnixListener,
}

impl Port {
    /// Listens on `path` (a leftover socket there is replaced).
    pub fn bind(path: &Path) -> Result<Port> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| Error::Path {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Port { listener })
    }

    /// Waits until QEMU, which connects while it starts, is there; gives up after 30 s or
    /// once `qemu` exited.
    pub fn accept(self, qemu: &mut Child) -> Result<UnixStream> {
        self.listener
            .set_nonblocking(true)
            .map_err(Error::Process)?;
        let t0 = Instant::now();
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t0.elapsed() > Duration::from_secs(30)
                        || qemu.try_wait().ok().flatten().is_some()
                    {
                        return Err(Error::NoControlConnection);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::ControlSocket(e)),
            }
        };
        stream.set_nonblocking(false).map_err(Error::Process)?;
        Ok(stream)
    }
}

/// Which guests wait at which barrier.
#[derive(Debug)]
pub struct Barriers {
    guests: usize,
    waiting: BTreeMap<String, Vec<usize>>,
}

impl Barriers {
    /// Barriers for `guests` guests.
    pub fn new(guests: usize) -> Barriers {
        Barriers {
            guests,
            waiting: BTreeMap::new(),
        }
    }

    /// Guest `i` reached barrier `name`; true if it was the last one to.
    pub fn arrive(&mut self, i: usize, name: &str) -> bool {
        let at = self.waiting.entry(name.to_string()).or_default();
        at.push(i);
        if at.len() == self.guests {
            self.waiting.remove(name);
            true
        } else {
            false
        }
    }

    /// Some guest waits at a barrier.
    pub fn pending(&self) -> bool {
        !self.waiting.is_empty()
    }
}

/// Lets every guest past barrier `name`.
pub fn release(ports: &mut [UnixStream], name: &str) {
    for c in ports.iter_mut() {
        let _ = writeln!(c, "{name}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_opens_when_every_guest_is_there() {
        let mut b = Barriers::new(2);
        assert!(!b.pending());
        assert!(!b.arrive(0, "written"));
        assert!(b.pending());
        assert!(!b.arrive(0, "other"));
        assert!(b.arrive(1, "written"));
        assert!(b.pending(), "guest 0 still waits at `other`");
        assert!(b.arrive(1, "other"));
        assert!(!b.pending());
    }
}
