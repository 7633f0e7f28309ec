// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon: one engine, one listening socket and serving thread per client, plus the
//! control socket and the metrics endpoint.

use std::collections::HashSet;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::{mpsc, Arc};

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

/// Serves one client's socket: one frontend at a time, accepting the next when it leaves.
fn serve_client(
    engine: Arc<Engine>,
    client: Arc<Client>,
    mut listener: Listener,
    dev_cfg: DeviceConfig,
) -> Result<(), Error> {
    let name = client.name().to_string();
    loop {
        // Anything a previous connection's stragglers created is gone before the next starts.
        engine.reset_client(&client);
        let dev =
            TmemDevice::new(engine.clone(), client.clone(), &name, dev_cfg).map_err(|source| {
                Error::Device {
                    name: name.clone(),
                    source,
                }
            })?;
        let dev = Arc::new(dev);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(name.clone(), dev.clone(), mem).map_err(|source| {
                Error::Daemon {
                    name: name.clone(),
                    cause: source,
                }
            })?;
        daemon.start(&mut listener).map_err(|cause| Error::Daemon {
            name: name.clone(),
            cause,
        })?;
        client.set_connected(true);
        tracing::info!(client = %name, "frontend connected");
        let result = daemon.wait();
        dev.stop_workers();
        client.set_connected(false);
        engine.reset_client(&client);
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
    }
}

/// Runs the daemon until a client's serving thread fails.
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
    let (tx, rx) = mpsc::channel();
    for (client, listener) in prepared {
        let (engine, tx) = (engine.clone(), tx.clone());
        let name = client.name().to_string();
        std::thread::Builder::new()
            .name(format!("client-{name}"))
            .spawn(move || {
                let r = serve_client(engine, client, listener, cfg.device);
                let _ = tx.send(r);
            })
            .map_err(Error::Thread)?;
    }
    tracing::info!(
        clients = cfg.clients.len(),
        memory_limit = cfg.engine.memory_limit,
        compressor = %cfg.engine.compressor,
        queues = cfg.device.request_queues,
        "vhost-tmem serving"
    );
    drop(tx);
    let r = match rx.recv() {
        Ok(r) => r,
        Err(_) => Ok(()),
    };
    drop(claims);
    r
}
