// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon: one engine, one listening socket and serving thread per client, plus the
//! control socket and the metrics endpoint.

use std::collections::HashSet;
use std::convert::Infallible;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{DaemonConfig, Endpoint};
use crate::control::{self, Controls};
use crate::sock::{self, is_socket, Claim};
use crate::store::{Client, Engine, Tmem};
use crate::vhu_tmem::{self, DeviceConfig, TmemDevice};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("client \"{name}\"")]
    SocketPath {
        name: String,
        #[source]
        source: sock::Error,
    },
    #[error("client \"{name}\": fd {fd} is not an open socket")]
    NotASocket { name: String, fd: RawFd },
    #[error("fd {0} is given to more than one client")]
    SharedFd(RawFd),
    #[error(transparent)]
    Control(#[from] control::Error),
    #[error("client \"{name}\": cannot set up the device")]
    Device {
        name: String,
        #[source]
        source: vhu_tmem::Error,
    },
    // vhost_user_backend::Error implements Display but not std::error::Error.
    #[error("client \"{name}\": vhost-user daemon failed: {cause}")]
    Daemon {
        name: String,
        cause: vhost_user_backend::Error,
    },
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("client \"{name}\": cannot register the worker exit event")]
    ExitEvent {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Listens on a client's endpoint; a path comes with its claim, to be held while it serves.
fn listen(
    name: &str,
    ep: &Endpoint,
    group: Option<u32>,
) -> Result<(Listener, Option<Claim>), Error> {
    match ep {
        Endpoint::Path(p) => {
            let (fd, claim) = sock::bind(p, group).map_err(|source| Error::SocketPath {
                name: name.to_string(),
                source,
            })?;
            // SAFETY: fd is a listening Unix socket just bound, handed over whole.
            let l = unsafe { Listener::from_raw_fd(fd.into_raw_fd()) };
            Ok((l, Some(claim)))
        }
        Endpoint::Fd(fd) => {
            if !is_socket(*fd) {
                return Err(Error::NotASocket {
                    name: name.to_string(),
                    fd: *fd,
                });
            }
            // SAFETY: the fd is an open socket inherited for this purpose, and the config check
            // made sure no other client takes ownership of the same fd.
            Ok((unsafe { Listener::from_raw_fd(*fd) }, None))
        }
    }
}

type Device = TmemDevice<Engine>;

/// One connection's device and vhost-user daemon, built before the frontend is accepted.
/// Dropping it stops the device's worker threads before the daemon joins them.
struct Connection {
    daemon: VhostUserDaemon<Arc<Device>>,
    dev: Arc<Device>,
}

impl Connection {
    fn new(
        engine: &Arc<Engine>,
        client: &Arc<Client>,
        name: &str,
        dev_cfg: DeviceConfig,
    ) -> Result<Connection, Error> {
        let dev =
            TmemDevice::new(engine.clone(), client.clone(), name, dev_cfg).map_err(|source| {
                Error::Device {
                    name: name.to_string(),
                    source,
                }
            })?;
        let dev = Arc::new(dev);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let daemon = VhostUserDaemon::new(name.to_string(), dev.clone(), mem).map_err(|cause| {
            Error::Daemon {
                name: name.to_string(),
                cause,
            }
        })?;
        if let Err(source) = dev.register_exit(&daemon.get_epoll_handlers()) {
            // Some worker threads could not be told how to exit, and dropping the daemon
            // would wait for them forever: leave them (and this connection's resources)
            // behind rather than hang this client.
            std::mem::forget(daemon);
            return Err(Error::ExitEvent {
                name: name.to_string(),
                source,
            });
        }
        Ok(Connection { daemon, dev })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Before the fields drop: the daemon's drop joins the worker threads.
        self.dev.stop_workers();
    }
}

/// Serves one client's socket: one frontend at a time, accepting the next when it leaves.
/// Returns only on an error (the caller restarts it).
fn serve_client(
    engine: &Arc<Engine>,
    client: &Arc<Client>,
    listener: &mut Listener,
    dev_cfg: DeviceConfig,
    served: &mut bool,
) -> Result<Infallible, Error> {
    loop {
        serve_connection(engine, client, listener, dev_cfg)?;
        *served = true;
    }
}

/// Accepts one frontend on `listener` and serves it with a device of its own until it
/// disconnects or breaks the protocol (which ends only its connection, logged). The client's
/// private pools are freed before and after. `Err` only when the connection cannot be set up
/// or accepted. This is all the daemon does per connection; it is public so that the fuzz
/// targets (tests/fuzz) can drive exactly this.
pub fn serve_connection(
    engine: &Arc<Engine>,
    client: &Arc<Client>,
    listener: &mut Listener,
    dev_cfg: DeviceConfig,
) -> Result<(), Error> {
    let name = client.name().to_string();
    // Anything a previous connection's stragglers created is gone before the next starts.
    engine.reset_client(client);
    let mut conn = Connection::new(engine, client, &name, dev_cfg)?;
    conn.daemon.start(listener).map_err(|cause| Error::Daemon {
        name: name.clone(),
        cause,
    })?;
    client.set_connected(true);
    tracing::info!(client = %name, "frontend connected");
    let result = conn.daemon.wait();
    drop(conn);
    client.set_connected(false);
    engine.reset_client(client);
    use vhost::vhost_user::Error as VuError;
    match result {
        // wait() reports a peer that closed the socket as an error; it is the normal end.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VuError::Disconnected | VuError::PartialMessage,
        )) => tracing::info!(client = %name, "frontend disconnected"),
        // A frontend that breaks the protocol loses its connection, not the daemon.
        Err(e) => tracing::warn!(client = %name, "connection ended: {e}"),
    }
    Ok(())
}

/// First wait before a failed client thread is started again; doubled per failure in a row.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between restarts (a client that keeps failing logs at most this often).
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Serves a client for as long as the daemon runs. A serving thread that fails (an error,
/// e.g. no file descriptor left to accept with, or a panic) is logged and started again after
/// a backoff; nothing of it reaches the other clients.
fn supervise(
    engine: Arc<Engine>,
    client: Arc<Client>,
    mut listener: Listener,
    dev_cfg: DeviceConfig,
) {
    let name = client.name().to_string();
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        let mut served = false;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            serve_client(&engine, &client, &mut listener, dev_cfg, &mut served)
        }));
        client.set_connected(false);
        engine.reset_client(&client);
        let why = match outcome {
            Ok(Ok(never)) => match never {},
            Ok(Err(e)) => error_chain(&e),
            Err(panic) => panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into()),
        };
        if served {
            // It served a connection since the last failure: not failing in a row.
            backoff = RESTART_BACKOFF_MIN;
        }
        tracing::error!(client = %name, "serving thread failed, restarting in {backoff:?}: {why}");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

/// An error with its sources, for one log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// Runs the daemon; returns only if it cannot be set up (client threads restart themselves).
pub fn run(cfg: DaemonConfig) -> Result<(), Error> {
    let engine = Arc::new(Engine::new(cfg.engine.clone()));
    let mut fds = HashSet::new();
    let mut prepared = Vec::new();
    // Held until the daemon ends, so that no second daemon takes over a live socket.
    let mut claims = Vec::new();
    // Bind everything first, so that a bad socket fails the start rather than a thread later.
    for spec in &cfg.clients {
        if let Endpoint::Fd(fd) = spec.endpoint {
            if !fds.insert(fd) {
                return Err(Error::SharedFd(fd));
            }
        }
        let (listener, claim) = listen(&spec.config.name, &spec.endpoint, cfg.socket_group)?;
        claims.extend(claim);
        let client = engine.add_client(spec.config.clone());
        prepared.push((client, listener));
    }
    if let Some(path) = &cfg.control_socket {
        Controls {
            engine: engine.clone(),
        }
        .serve(path, cfg.control_group)?;
        tracing::info!(path = %path.display(), "control socket ready");
    }
    if let Some(addr) = cfg.metrics_listen {
        control::serve_metrics(engine.clone(), addr)?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    let mut threads = Vec::new();
    for (client, listener) in prepared {
        let engine = engine.clone();
        let name = client.name().to_string();
        let t = std::thread::Builder::new()
            .name(format!("client-{name}"))
            .spawn(move || supervise(engine, client, listener, cfg.device))
            .map_err(Error::Thread)?;
        threads.push(t);
    }
    tracing::info!(
        clients = cfg.clients.len(),
        memory_limit = cfg.engine.memory_limit,
        compressor = %cfg.engine.compressor,
        queues = cfg.device.request_queues,
        "vhost-tmem serving"
    );
    for t in threads {
        let _ = t.join();
    }
    drop(claims);
    Ok(())
}
