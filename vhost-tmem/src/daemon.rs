// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon: one engine, one listening socket and serving thread per client, plus the
//! control socket and the metrics endpoint.

use std::collections::HashSet;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

mod clients;
mod state_file;

pub use clients::Clients;
pub use state_file::{LoadError, StateFile};

use crate::config::{DaemonConfig, Endpoint, ServeArgs};
use crate::control::{self, Controls};
use crate::sandbox;
use crate::sd;
use crate::size::format_duration;
use crate::sock::{self, is_socket, Claim};
use crate::store::{Client, Ended, Engine, Reaped};
use crate::vhu_tmem::{self, DeviceConfig, DirtyLog, GuestBitmap, Migration, TmemDevice};

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
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error(transparent)]
    ServiceManager(#[from] sd::Error),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot keep a second descriptor of a listening socket")]
    Dup(#[source] std::io::Error),
    #[error(transparent)]
    StateFile(#[from] state_file::Error),
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
        Endpoint::Listen(_) => unreachable!("resolved to a descriptor by run"),
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

/// One connection's device and vhost-user daemon, built before the frontend is accepted.
/// Dropping it stops the device's worker threads before the daemon joins them. `B` is the
/// guest memory's dirty-page bitmap: `()` unless the daemon offers migration.
struct Connection<B: GuestBitmap> {
    daemon: VhostUserDaemon<Arc<TmemDevice<Engine, B>>>,
    dev: Arc<TmemDevice<Engine, B>>,
}

impl<B: GuestBitmap> Connection<B> {
    fn new(
        engine: &Arc<Engine>,
        client: &Arc<Client>,
        name: &str,
        dev_cfg: DeviceConfig,
    ) -> Result<Self, Error> {
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

impl<B: GuestBitmap> Drop for Connection<B> {
    fn drop(&mut self) {
        // Before the fields drop: the daemon's drop joins the worker threads.
        self.dev.stop_workers();
    }
}

/// A client thread's link to whoever may stop it (`ctl remove-client`): whether it is told to
/// stop, and how to end its connection. The serving thread registers each connection here
/// under the same lock the remover decides under, so that a removal sees every connection
/// (refuses, or ends it) and none starts after a removal was decided.
#[derive(Default)]
pub(crate) struct ClientCtl {
    state: parking_lot::Mutex<CtlState>,
    wake: parking_lot::Condvar,
}

#[derive(Default)]
struct CtlState {
    stopping: bool,
    conn: Option<vhost_user_backend::ShutdownHandle>,
}

impl std::fmt::Debug for ClientCtl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("ClientCtl")
            .field("stopping", &s.stopping)
            .field("connected", &s.conn.is_some())
            .finish()
    }
}

/// Why a removal was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StopRefused {
    /// A frontend is connected and the removal is not forced.
    Connected,
    /// Already being removed.
    Stopping,
}

impl ClientCtl {
    /// Records a new connection; false if the client is being removed (the caller ends it).
    fn connected(&self, h: vhost_user_backend::ShutdownHandle) -> bool {
        let mut s = self.state.lock();
        if s.stopping {
            return false;
        }
        s.conn = Some(h);
        true
    }

    fn disconnected(&self) {
        self.state.lock().conn = None;
    }

    /// Ends the frontend's connection, if there is one, and keeps serving the client: the
    /// frontend may connect again. Returns whether one was ended.
    pub(crate) fn disconnect(&self) -> bool {
        let s = self.state.lock();
        match &s.conn {
            Some(h) if !s.stopping => {
                h.shutdown();
                true
            }
            _ => false,
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.state.lock().stopping
    }

    /// Tells the client to stop; with `force`, ends its connection. Returns whether one was
    /// ended.
    pub(crate) fn stop(&self, force: bool) -> Result<bool, StopRefused> {
        let mut s = self.state.lock();
        if s.stopping {
            return Err(StopRefused::Stopping);
        }
        if s.conn.is_some() && !force {
            return Err(StopRefused::Connected);
        }
        s.stopping = true;
        self.wake.notify_all();
        Ok(match s.conn.take() {
            Some(h) => {
                h.shutdown();
                true
            }
            None => false,
        })
    }

    /// Sleeps for `d` unless told to stop first; returns whether it is told to stop.
    fn sleep(&self, d: Duration) -> bool {
        let mut s = self.state.lock();
        if !s.stopping {
            self.wake.wait_for(&mut s, d);
        }
        s.stopping
    }
}

/// How a serving thread ended without an error: told to stop.
#[derive(Debug)]
struct Stopped;

/// Serves one client's socket: one frontend at a time, accepting the next when it leaves.
/// Returns when told to stop, or on an error (the caller restarts it).
fn serve_client(
    engine: &Arc<Engine>,
    client: &Arc<Client>,
    listener: &mut Listener,
    ctl: &ClientCtl,
    dev_cfg: DeviceConfig,
    served: &mut bool,
) -> Result<Stopped, Error> {
    loop {
        if serve_one(engine, client, listener, ctl, dev_cfg, served)? {
            return Ok(Stopped);
        }
    }
}

/// Accepts one frontend on `listener` and serves it with a device of its own until it
/// disconnects or breaks the protocol (which ends only its connection, logged). Before and
/// after, the client's private pools are freed, unless its driver negotiated SESSION (then
/// they are kept for a reconnect: see [`Engine::connection_ended`]). `Err` only when the
/// connection cannot be set up or accepted. This is all the daemon does per connection; it is
/// public so that the fuzz targets (tests/fuzz) can drive exactly this.
pub fn serve_connection(
    engine: &Arc<Engine>,
    client: &Arc<Client>,
    listener: &mut Listener,
    dev_cfg: DeviceConfig,
) -> Result<(), Error> {
    serve_one(
        engine,
        client,
        listener,
        &ClientCtl::default(),
        dev_cfg,
        &mut false,
    )
    .map(|_| ())
}

/// One connection of [`serve_client`]; true when the client is being removed (stop serving).
fn serve_one(
    engine: &Arc<Engine>,
    client: &Arc<Client>,
    listener: &mut Listener,
    ctl: &ClientCtl,
    dev_cfg: DeviceConfig,
    served: &mut bool,
) -> Result<bool, Error> {
    let name = client.name().to_string();
    if ctl.stopping() {
        return Ok(true);
    }
    // Whatever the last connection left is settled before the next starts: a session's pools
    // stay (orphaned until a driver claims them), anything else is gone.
    settle(engine, client);
    let result = if dev_cfg.migration == Migration::Off {
        serve_frontend::<()>(engine, client, listener, ctl, dev_cfg, served)?
    } else {
        serve_frontend::<DirtyLog>(engine, client, listener, ctl, dev_cfg, served)?
    };
    let Some(result) = result else {
        return Ok(true);
    };
    ctl.disconnected();
    client.set_connected(false);
    if ctl.stopping() {
        // Removed: the remover frees the pools and says what went.
        tracing::info!(client = %name, "connection ended: the client is being removed");
        return Ok(true);
    }
    settle(engine, client);
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
    Ok(false)
}

/// Accepts one frontend and serves it until its connection ends, with guest memory carrying
/// bitmap `B`. `None` when it was accepted just as the client was being removed.
fn serve_frontend<B: GuestBitmap>(
    engine: &Arc<Engine>,
    client: &Arc<Client>,
    listener: &mut Listener,
    ctl: &ClientCtl,
    dev_cfg: DeviceConfig,
    served: &mut bool,
) -> Result<Option<Result<(), vhost_user_backend::Error>>, Error> {
    let name = client.name().to_string();
    let mut conn = Connection::<B>::new(engine, client, &name, dev_cfg)?;
    conn.daemon.start(listener).map_err(|cause| Error::Daemon {
        name: name.clone(),
        cause,
    })?;
    *served = true;
    let handle = conn.daemon.shutdown_handle();
    if !handle.is_some_and(|h| ctl.connected(h)) {
        // Accepted just as the client was being removed: not served.
        conn.daemon.request_shutdown();
        let _ = conn.daemon.wait();
        return Ok(None);
    }
    client.set_connected(true);
    let restored = client.restored();
    client.clear_restored();
    tracing::info!(client = %name, restored, "frontend connected");
    let result = conn.daemon.wait();
    drop(conn);
    Ok(Some(result))
}

/// Settles what a connection that ended left of `client`'s pools, and says what became of
/// them if anything did.
fn settle(engine: &Engine, client: &Arc<Client>) {
    let name = client.name();
    match engine.connection_ended(client) {
        Ended::Kept { now: false, .. } => {}
        Ended::Kept { pools, bytes, .. } => {
            let when = match engine.orphan_timeout() {
                Some(t) => format!("freed after {} unless it does", format_duration(t)),
                None => "kept until it does (no orphan timeout)".into(),
            };
            tracing::info!(
                client = %name,
                pools,
                charged_bytes = bytes,
                "pools kept for the driver's session: served again when the frontend \
                 reconnects, {when}"
            );
        }
        Ended::MigratedOut(r) => {
            tracing::info!(
                client = %name,
                pools = r.pools,
                persistent_pages = r.persistent_pages,
                ephemeral_pages = r.ephemeral_pages,
                "client migrated: its frontend took its state to another daemon and \
                 disconnected; freed its pools here"
            );
        }
        Ended::Dropped(r) if r.pools == 0 => {}
        Ended::Dropped(r) => {
            // Not silent: a guest that is gone cannot read its swap pages back, but say so.
            tracing::info!(
                client = %name,
                pools = r.pools,
                persistent_pages = r.persistent_pages,
                ephemeral_pages = r.ephemeral_pages,
                "client reset: freed its private pools (its driver keeps no session)"
            );
        }
    }
}

/// How often the orphan timeout is checked at most: an orphan is freed at most this late.
const REAP_TICK: Duration = Duration::from_secs(1);

/// Frees the pools of clients orphaned longer than the orphan timeout, for as long as the
/// daemon runs.
fn reap_orphans(engine: Arc<Engine>) {
    crate::sandbox::confine_serving_thread();
    loop {
        let (freed, next) = engine.reap_orphans();
        for Reaped {
            client,
            orphaned_for,
            freed: r,
        } in freed
        {
            // Dropped by policy, with pages the guest may still want: said at warning level.
            tracing::warn!(
                client = %client.name(),
                orphaned_for = %format_duration(Duration::from_secs(orphaned_for.as_secs())),
                pools = r.pools,
                persistent_pages = r.persistent_pages,
                ephemeral_pages = r.ephemeral_pages,
                bytes = r.bytes,
                "orphaned pools freed: the frontend did not come back within the orphan timeout"
            );
        }
        let now = Instant::now();
        let wait = next.map_or(REAP_TICK, |n| {
            n.saturating_duration_since(now).min(REAP_TICK)
        });
        std::thread::sleep(wait.max(Duration::from_millis(10)));
    }
}

/// First wait before a failed client thread is started again; doubled per failure in a row.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait between restarts (a client that keeps failing logs at most this often).
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Serves a client until it is removed. A serving thread that fails (an error, e.g. no file
/// descriptor left to accept with, or a panic) is logged and started again after a backoff;
/// nothing of it reaches the other clients. A removal wakes it from the backoff.
pub(crate) fn supervise(
    engine: Arc<Engine>,
    client: Arc<Client>,
    mut listener: Listener,
    ctl: Arc<ClientCtl>,
    dev_cfg: DeviceConfig,
) {
    let name = client.name().to_string();
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        let mut served = false;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            serve_client(&engine, &client, &mut listener, &ctl, dev_cfg, &mut served)
        }));
        ctl.disconnected();
        client.set_connected(false);
        if ctl.stopping() {
            // Whatever ended it (an accept woken by the removal fails), it is not a failure.
            return;
        }
        settle(&engine, &client);
        let why = match outcome {
            Ok(Ok(Stopped)) => return,
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
        if ctl.sleep(backoff) {
            return;
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

/// An error with its sources, for one log line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// Runs the daemon: returns an error if it cannot be set up, else serves (client threads
/// restart themselves, clients come and go at run time) until SIGTERM or SIGINT, then removes
/// its socket files and returns. `args` is the command line, read again with the configuration
/// file by `ctl reload` and SIGHUP.
pub fn run(cfg: DaemonConfig, args: Option<ServeArgs>) -> Result<(), Error> {
    let mut engine = Arc::new(Engine::new(cfg.engine.clone()));
    engine.set_orphan_timeout(cfg.orphan_timeout);
    // Both read (and taken out of the environment) before any thread exists.
    let notifier = sd::Notifier::from_env()?;
    let mut passed = sd::ListenFds::from_env()?;
    let mut fds = HashSet::new();
    let mut bound = Vec::new();
    // Bind everything first, so that a bad socket fails the start rather than a thread later.
    for spec in &cfg.clients {
        let endpoint = match &spec.endpoint {
            Endpoint::Listen(n) => Endpoint::Fd(passed.take(&spec.config.name, n)?),
            e => e.clone(),
        };
        if let Endpoint::Fd(fd) = endpoint {
            if !fds.insert(fd) {
                return Err(Error::SharedFd(fd));
            }
        }
        let (listener, claim) = listen(&spec.config.name, &endpoint, cfg.socket_group)?;
        bound.push((spec.clone(), listener, claim));
    }
    let untaken = passed.untaken();
    if !untaken.is_empty() {
        tracing::warn!(
            sockets = ?untaken,
            "sockets passed by the service manager that no client listens on"
        );
    }
    // The state a previous daemon handed over, loaded before anything is served (the sockets
    // are bound first: a start that cannot bind them must not have consumed the file).
    let add = |e: &Engine| -> Vec<Arc<Client>> {
        cfg.clients
            .iter()
            .map(|c| e.add_client(c.config.clone()))
            .collect()
    };
    let mut made = add(&engine);
    let state = match cfg.state_file.as_ref().map(|c| {
        let f = StateFile::open(c)?;
        f.load(&engine, &made).map(|t| (f, t))
    }) {
        None => None,
        Some(Ok((f, loaded))) => {
            if loaded.is_none() {
                // Refused and told to start empty: nothing of it may remain.
                engine = Arc::new(Engine::new(cfg.engine.clone()));
                engine.set_orphan_timeout(cfg.orphan_timeout);
                made = add(&engine);
            }
            Some(f)
        }
        Some(Err(e)) => {
            for (spec, listener, claim) in bound {
                drop(listener);
                if let (Some(claim), Endpoint::Path(p)) = (claim, &spec.endpoint) {
                    let _ = claim.remove(p);
                }
            }
            return Err(e.into());
        }
    };
    let bound = bound
        .into_iter()
        .zip(made)
        .map(|((spec, listener, claim), client)| (spec, listener, claim, client))
        .collect();
    let clients = Clients::new(engine.clone(), cfg.clone(), args);
    let control = match &cfg.control_socket {
        Some(path) => Some(
            Controls {
                engine: engine.clone(),
                admin: Some(clients.clone()),
            }
            .bind(path, cfg.control_group)?,
        ),
        None => None,
    };
    let metrics = cfg.metrics_listen.map(control::bind_metrics).transpose()?;
    // Set up: confine the process before any thread exists (namespaces and credentials are
    // per thread, inherited by the threads started later).
    let paths = cfg.clients.iter().filter_map(|c| match &c.endpoint {
        Endpoint::Path(p) => Some(p.as_path()),
        Endpoint::Fd(_) | Endpoint::Listen(_) => None,
    });
    let files = sandbox::SocketFiles::record(paths.chain(cfg.control_socket.as_deref()))?;
    // SIGTERM, SIGINT and SIGHUP: blocked in every thread, taken by this one below.
    sandbox::block_signals()?;
    if let Err(e) = sandbox::enter(&cfg.sandbox, &files) {
        // Not serving: the sockets go (the next start would find them stale anyway).
        files.remove();
        return Err(e.into());
    }
    // Served before the control socket answers, so that its first request sees every client.
    clients.start_all(bound)?;
    if let (Some(c), Some(path)) = (control, &cfg.control_socket) {
        c.spawn()?;
        tracing::info!(path = %path.display(), "control socket ready");
    }
    std::thread::Builder::new()
        .name("orphans".into())
        .spawn({
            let engine = engine.clone();
            move || reap_orphans(engine)
        })
        .map_err(Error::Thread)?;
    if let (Some(m), Some(addr)) = (metrics, cfg.metrics_listen) {
        m.spawn(engine.clone())?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
    tracing::info!(
        clients = cfg.clients.len(),
        memory_limit = cfg.engine.memory_limit,
        compressor = %cfg.engine.compressor,
        queues = cfg.device.request_queues,
        sandbox = %cfg.sandbox.mode,
        user = cfg.sandbox.user.as_ref().map(|u| u.name.as_str()),
        "vhost-tmem serving"
    );
    let serving = || format!("serving {} clients", clients.count());
    notifier.notify(sd::State::Ready, &serving());
    // Client threads restart themselves and never end: the daemon ends on a signal.
    loop {
        let sig = sandbox::wait_for_signal();
        if sig != libc::SIGHUP {
            tracing::info!(signal = sig, "exiting");
            notifier.notify(sd::State::Stopping, "exiting: removing the sockets");
            break;
        }
        tracing::info!("SIGHUP: reloading the configuration");
        notifier.notify(sd::State::Reloading, "reloading the configuration");
        // The outcome is logged by reload itself.
        let _ = control::ClientAdmin::reload(&*clients);
        notifier.notify(sd::State::Ready, &serving());
    }
    let saved = state.map(|f| {
        // Stop accepting and end every connection: each queue finishes the requests it is
        // serving and takes no more, so no request is half served and nothing changes while
        // the state is written.
        let list = clients.stop_all(HANDOVER_WAIT);
        f.save(&engine, &list)
    });
    clients.remove_added_socket_files(&files);
    files.remove();
    match saved {
        Some(Err(e)) => Err(e.into()),
        _ => Ok(()),
    }
}

/// How long a handover waits for the clients' connections to end before it writes anyway.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);
