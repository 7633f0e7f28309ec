// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Running under a service manager (systemd's protocols, which others speak too): listening
//! sockets passed at start (`LISTEN_FDS`, named by `LISTEN_FDNAMES`), so that a socket unit
//! owns each client's socket and QEMU can connect before the daemon runs or while it
//! restarts; and state notifications on `$NOTIFY_SOCKET` (READY, RELOADING, STOPPING), so that
//! `Type=notify` units start their guests only once the daemon serves.
//!
//! Both are read once, before the sandbox: the notification socket is connected then, and
//! later sends need no filesystem (the namespace sandbox has none) and no new socket.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The first descriptor a service manager passes (after stdin, stdout and stderr).
const LISTEN_FDS_START: RawFd = 3;

/// Errors of the service-manager protocols.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NOTIFY_SOCKET={path}: cannot connect")]
    NotifySocket {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{var}={value} is not a number")]
    BadNumber { var: &'static str, value: String },
    #[error(
        "LISTEN_FDS: {count} descriptors would run past the descriptor limit; the service \
         manager's environment is damaged"
    )]
    TooManyFds { count: u32 },
    #[error(
        "LISTEN_FDNAMES names {names} sockets but LISTEN_FDS passes {fds}: the names cannot be \
         matched to the descriptors"
    )]
    NamesMismatch { names: usize, fds: usize },
    #[error(
        "client \"{client}\": listen={name}, but no socket was passed by a service manager \
         (LISTEN_FDS is not set for this process: {why})"
    )]
    NotActivated {
        client: String,
        name: String,
        why: &'static str,
    },
    #[error(
        "client \"{client}\": no passed socket is named \"{name}\" (LISTEN_FDNAMES: {known}); \
         set FileDescriptorName={name} in its socket unit"
    )]
    NoSuchName {
        client: String,
        name: String,
        known: String,
    },
}

/// A state change for the service manager (`sd_notify(3)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Set up and serving every client.
    Ready,
    /// Re-reading the configuration (`READY` follows).
    Reloading,
    /// Ending: the sockets go, the guests lose their device.
    Stopping,
}

/// Where state changes go: the service manager's socket, if it gave one.
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace); without
    /// it, notifications go nowhere. The variable is removed so that nothing started by the
    /// daemon would notify in its name.
    pub fn from_env() -> Result<Notifier, Error> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(Notifier::default());
        };
        std::env::remove_var("NOTIFY_SOCKET");
        let path = path.to_string_lossy().into_owned();
        let err = |source| Error::NotifySocket {
            path: path.clone(),
            source,
        };
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&path),
        }
        .map_err(err)?;
        let socket = UnixDatagram::unbound().map_err(err)?;
        socket.connect_addr(&addr).map_err(err)?;
        // A manager that stopped reading must not stall the signal loop.
        socket
            .set_write_timeout(Some(Duration::from_secs(1)))
            .map_err(err)?;
        Ok(Notifier {
            socket: Some(socket),
        })
    }

    /// Tells the service manager about `state`, with a status line for `systemctl status`.
    /// A failure is logged: the daemon serves whether or not its manager listens.
    pub fn notify(&self, state: State, status: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        let msg = message(state, status, monotonic_usec());
        if let Err(e) = socket.send(msg.as_bytes()) {
            tracing::warn!("cannot notify the service manager ({state:?}): {e}");
        }
    }
}

/// The notification datagram: newline-separated assignments. RELOADING carries the time it
/// started, as `Type=notify-reload` units require.
fn message(state: State, status: &str, now_usec: u64) -> String {
    let status = status.replace('\n', " ");
    match state {
        State::Ready => format!("READY=1\nSTATUS={status}\n"),
        State::Reloading => format!("RELOADING=1\nMONOTONIC_USEC={now_usec}\nSTATUS={status}\n"),
        State::Stopping => format!("STOPPING=1\nSTATUS={status}\n"),
    }
}

fn monotonic_usec() -> u64 {
    // SAFETY: timespec is plain data that clock_gettime fills.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: ts is a live timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// Listening sockets passed by a service manager, by name.
#[derive(Debug, Default)]
pub struct ListenFds {
    /// Descriptor and name, in the order they were passed; taken ones are removed.
    fds: VecDeque<(RawFd, String)>,
    /// Why there are none, if so (for the error of a client that wants one).
    missing: Option<&'static str>,
}

impl ListenFds {
    /// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` and removes them from the
    /// environment. Sockets passed to another process (`LISTEN_PID` is not ours) are none.
    pub fn from_env() -> Result<ListenFds, Error> {
        let var = |k: &str| std::env::var(k).ok();
        let (pid, count, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
        parse(
            pid.as_deref(),
            count.as_deref(),
            names.as_deref(),
            std::process::id(),
        )
    }

    /// The descriptor passed under `name`, for `client`; each is handed out once.
    pub fn take(&mut self, client: &str, name: &str) -> Result<RawFd, Error> {
        if let Some(why) = self.missing {
            return Err(Error::NotActivated {
                client: client.into(),
                name: name.into(),
                why,
            });
        }
        match self.fds.iter().position(|(_, n)| n == name) {
            Some(i) => Ok(self.fds.remove(i).map(|(fd, _)| fd).expect("found above")),
            None => Err(Error::NoSuchName {
                client: client.into(),
                name: name.into(),
                known: self.known(),
            }),
        }
    }

    /// Names of the passed sockets no client took (worth a warning: a unit names a client the
    /// configuration does not have).
    pub fn untaken(&self) -> Vec<String> {
        self.fds
            .iter()
            .map(|(fd, n)| format!("{n} (fd {fd})"))
            .collect()
    }

    fn known(&self) -> String {
        if self.fds.is_empty() {
            return "none left".into();
        }
        let names: Vec<&str> = self.fds.iter().map(|(_, n)| n.as_str()).collect();
        names.join(", ")
    }
}

fn parse(
    pid: Option<&str>,
    count: Option<&str>,
    names: Option<&str>,
    our_pid: u32,
) -> Result<ListenFds, Error> {
    let none = |why| {
        Ok(ListenFds {
            fds: VecDeque::new(),
            missing: Some(why),
        })
    };
    let number = |var: &'static str, v: &str| {
        v.parse::<u32>().map_err(|_| Error::BadNumber {
            var,
            value: v.to_string(),
        })
    };
    let (Some(pid), Some(count)) = (pid, count) else {
        return none("no LISTEN_PID and LISTEN_FDS in the environment");
    };
    if number("LISTEN_PID", pid)? != our_pid {
        return none("LISTEN_PID names another process");
    }
    let count = number("LISTEN_FDS", count)?;
    if count > 4096 {
        return Err(Error::TooManyFds { count });
    }
    // Unnamed sockets are called "unknown", as sd_listen_fds_with_names(3) does.
    let names: Vec<String> = match names {
        Some(n) => n.split(':').map(str::to_string).collect(),
        None => vec!["unknown".into(); count as usize],
    };
    if names.len() != count as usize {
        return Err(Error::NamesMismatch {
            names: names.len(),
            fds: count as usize,
        });
    }
    let fds = names
        .into_iter()
        .enumerate()
        .map(|(i, n)| (LISTEN_FDS_START + i as RawFd, n))
        .collect();
    Ok(ListenFds { fds, missing: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passed_sockets_are_found_by_name_once() {
        let mut l = parse(Some("42"), Some("2"), Some("vm1:vm2"), 42).unwrap();
        assert_eq!(l.take("b", "vm2").unwrap(), 4);
        assert_eq!(l.take("a", "vm1").unwrap(), 3);
        let e = l.take("c", "vm1").unwrap_err().to_string();
        assert!(e.contains("no passed socket is named \"vm1\""), "{e}");
        assert!(e.contains("none left"), "{e}");
        assert!(l.untaken().is_empty());
    }

    #[test]
    fn sockets_for_another_process_or_none_are_refused_with_why() {
        let mut l = parse(Some("41"), Some("1"), Some("vm1"), 42).unwrap();
        let e = l.take("a", "vm1").unwrap_err().to_string();
        assert!(e.contains("LISTEN_PID names another process"), "{e}");
        let mut l = parse(None, None, None, 42).unwrap();
        let e = l.take("a", "vm1").unwrap_err().to_string();
        assert!(e.contains("client \"a\": listen=vm1"), "{e}");
    }

    #[test]
    fn damaged_variables_are_errors() {
        let e = parse(Some("42"), Some("2"), Some("vm1"), 42).unwrap_err();
        assert!(matches!(e, Error::NamesMismatch { names: 1, fds: 2 }));
        let e = parse(Some("x"), Some("2"), None, 42).unwrap_err();
        assert!(e.to_string().contains("LISTEN_PID=x is not a number"));
        let e = parse(Some("42"), Some("-1"), None, 42).unwrap_err();
        assert!(e.to_string().contains("LISTEN_FDS=-1"));
        let l = parse(Some("42"), Some("2"), None, 42).unwrap();
        assert_eq!(l.untaken(), ["unknown (fd 3)", "unknown (fd 4)"]);
    }

    #[test]
    fn messages() {
        assert_eq!(
            message(State::Ready, "2 clients", 5),
            "READY=1\nSTATUS=2 clients\n"
        );
        assert_eq!(
            message(State::Reloading, "a\nb", 7),
            "RELOADING=1\nMONOTONIC_USEC=7\nSTATUS=a b\n"
        );
        assert!(message(State::Stopping, "", 0).starts_with("STOPPING=1\n"));
    }

    #[test]
    fn notifications_reach_the_socket() {
        let dir = std::env::temp_dir().join(format!("vhost-tmem-sd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let manager = UnixDatagram::bind(&path).unwrap();
        let socket = UnixDatagram::unbound().unwrap();
        socket.connect(&path).unwrap();
        let n = Notifier {
            socket: Some(socket),
        };
        n.notify(State::Ready, "serving");
        let mut buf = [0u8; 256];
        let len = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving\n");
        // Nobody listening: nothing happens.
        Notifier::default().notify(State::Stopping, "bye");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
