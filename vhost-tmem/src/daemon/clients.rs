// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The clients a running daemon serves, changed at run time: `ctl add-client`,
//! `remove-client`, `list-clients` and `reload` (which SIGHUP runs too).
//!
//! One lock orders every change: a name or socket path is either served, being removed (not
//! yet free), or free. A removal decides under it (refused while a frontend is connected,
//! unless forced), then waits without it for the client's thread to end, and frees the
//! client's memory and socket under it again. A reload parses and checks the whole file and
//! binds every new socket before it changes anything, so a bad file changes nothing.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vhost::vhost_user::Listener;

use super::{error_chain, listen, supervise, ClientCtl, Error, StopRefused};
use crate::config::{parse_client_spec, ClientSpec, DaemonConfig, Endpoint, ServeArgs};
use crate::control::{ClientAdmin, ClientInfo, ReloadReport, Removed};
use crate::size::{format_duration, format_size};
use crate::sock::Claim;
use crate::store::{format_uuid, Client, Engine};

/// How long a removal waits for the client's connection and threads to end before it answers
/// (the removal then completes in the background).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// The clients served, and the settings in force.
#[derive(Debug)]
pub struct Clients {
    engine: Arc<Engine>,
    /// The command line, read again with the configuration file on reload (its options still
    /// override the file's).
    args: Option<ServeArgs>,
    state: Mutex<State>,
    /// Itself, for a removal that completes in the background.
    me: std::sync::Weak<Clients>,
    /// The daemon's pid, taken before confinement (the sandbox allows no getpid, which then
    /// fails with -1, and kill(-1) would signal every process the daemon may signal).
    pid: libc::pid_t,
}

#[derive(Debug)]
struct State {
    /// The settings in force (its `clients` are those of the start).
    cfg: DaemonConfig,
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    client: Arc<Client>,
    endpoint: Endpoint,
    ctl: Arc<ClientCtl>,
    /// The listening socket (a second descriptor of it): shutting it down wakes the thread's
    /// accept when the client is removed.
    listening: OwnedFd,
    thread: Option<JoinHandle<()>>,
    claim: Option<Claim>,
    removing: bool,
}

fn endpoint_text(ep: &Endpoint) -> String {
    match ep {
        Endpoint::Path(p) => p.display().to_string(),
        Endpoint::Fd(fd) => format!("fd:{fd}"),
        Endpoint::Listen(n) => format!("listen:{n}"),
    }
}

/// A client bound but not yet served.
struct Bound {
    spec: ClientSpec,
    listener: Listener,
    claim: Option<Claim>,
    /// Its engine client when made before (holding restored state), else made at start.
    client: Option<Arc<Client>>,
}

impl Bound {
    /// Gives the socket up again (a reload that does not go ahead).
    fn abandon(self) {
        drop(self.listener);
        if let (Some(claim), Endpoint::Path(p)) = (self.claim, &self.spec.endpoint) {
            let _ = claim.remove(p);
        }
    }
}

impl Clients {
    /// An empty set under the settings `cfg`; `args` is the command line to reload with.
    pub fn new(engine: Arc<Engine>, cfg: DaemonConfig, args: Option<ServeArgs>) -> Arc<Clients> {
        Arc::new_cyclic(|me| Clients {
            engine,
            args,
            state: Mutex::new(State {
                cfg,
                entries: BTreeMap::new(),
            }),
            me: me.clone(),
            pid: std::process::id() as libc::pid_t,
        })
    }

    /// Binds a client's socket (claim, lock, mode and group as at start).
    fn bind(st: &State, spec: ClientSpec) -> Result<Bound, Error> {
        let (listener, claim) = listen(&spec.config.name, &spec.endpoint, st.cfg.socket_group)?;
        Ok(Bound {
            spec,
            listener,
            claim,
            client: None,
        })
    }

    /// Starts serving a bound client.
    fn start(&self, st: &mut State, b: Bound) -> Result<(), Error> {
        let name = b.spec.config.name.clone();
        // SAFETY: the listener's fd is open for as long as `b.listener` lives, which is past
        // this statement; the clone is a descriptor of its own.
        let listening =
            match unsafe { BorrowedFd::borrow_raw(b.listener.as_raw_fd()) }.try_clone_to_owned() {
                Ok(fd) => fd,
                Err(e) => {
                    b.abandon();
                    return Err(Error::Dup(e));
                }
            };
        let client = match b.client {
            Some(c) => c,
            None => self.engine.add_client(b.spec.config.clone()),
        };
        let ctl = Arc::new(ClientCtl::default());
        let (engine, c, t, dev) = (
            self.engine.clone(),
            client.clone(),
            ctl.clone(),
            st.cfg.device,
        );
        let listener = b.listener;
        let thread = std::thread::Builder::new()
            .name(format!("client-{name}"))
            .spawn(move || {
                crate::sandbox::confine_serving_thread();
                supervise(engine, c, listener, t, dev)
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                self.engine.remove_client(&client);
                if let (Some(claim), Endpoint::Path(p)) = (b.claim, &b.spec.endpoint) {
                    let _ = claim.remove(p);
                }
                return Err(Error::Thread(e));
            }
        };
        st.entries.insert(
            name,
            Entry {
                client,
                endpoint: b.spec.endpoint,
                ctl,
                listening,
                thread: Some(thread),
                claim: b.claim,
                removing: false,
            },
        );
        Ok(())
    }

    /// Serves the clients of the start (their sockets bound and their engine clients made by
    /// the caller, in order).
    pub(crate) fn start_all(
        &self,
        bound: Vec<(ClientSpec, Listener, Option<Claim>, Arc<Client>)>,
    ) -> Result<(), Error> {
        let mut st = self.state.lock();
        for (spec, listener, claim, client) in bound {
            self.start(
                &mut st,
                Bound {
                    spec,
                    listener,
                    claim,
                    client: Some(client),
                },
            )?;
        }
        Ok(())
    }

    /// At handover: stops accepting on every client's socket and ends every connection, then
    /// waits (at most `wait`) for each client's thread, whose queues finish the requests they
    /// are serving and take no more; their pools stay. Returns the clients to save, in name
    /// order (not those being removed: their pools are being freed). Puts of a connection that
    /// has not ended by then are refused from here on (the client is frozen).
    pub(crate) fn stop_all(&self, wait: Duration) -> Vec<Arc<Client>> {
        let start = Instant::now();
        let (threads, clients) = {
            let mut st = self.state.lock();
            let mut threads = Vec::new();
            let mut clients = Vec::new();
            for (name, e) in st.entries.iter_mut() {
                if e.removing {
                    continue;
                }
                // Refused only when it is already stopping: nothing more to do then.
                let _ = e.ctl.stop(true);
                // SAFETY: shutdown on a descriptor we own; wakes the thread's accept.
                unsafe { libc::shutdown(e.listening.as_raw_fd(), libc::SHUT_RD) };
                threads.push((name.clone(), e.thread.take()));
                clients.push(e.client.clone());
            }
            (threads, clients)
        };
        let deadline = start + wait;
        for (name, t) in threads {
            let Some(t) = t else { continue };
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::error!(
                    client = %name,
                    "handover: its connection has not ended after {wait:?}; its state is written \
                     anyway and its puts are refused from now on"
                );
            }
        }
        for c in &clients {
            self.engine.set_frozen(c, true);
        }
        tracing::info!(
            clients = clients.len(),
            ms = start.elapsed().as_millis() as u64,
            "handover: stopped serving"
        );
        clients
    }

    /// Why `name` or `endpoint` cannot be taken by a new client, if so.
    fn conflict(st: &State, name: &str, endpoint: &Endpoint) -> Option<String> {
        if let Some(e) = st.entries.get(name) {
            return Some(if e.removing {
                format!("client \"{name}\" is being removed: add it again once it is gone")
            } else {
                format!("a client named \"{name}\" exists")
            });
        }
        match endpoint {
            Endpoint::Fd(_) | Endpoint::Listen(_) => Some(format!(
                "client \"{name}\": a client added at run time needs socket=PATH (fd= and \
                 listen= are for sockets inherited at start)"
            )),
            Endpoint::Path(p) => st
                .entries
                .iter()
                .find(|(_, e)| e.endpoint == *endpoint)
                .map(|(other, _)| format!("client \"{other}\" already serves {}", p.display())),
        }
    }

    /// The removal's last step, under the lock: frees the client and its socket.
    fn finish_removal(&self, st: &mut State, name: &str, disconnected: bool) -> Removed {
        let e = st.entries.remove(name).expect("being removed");
        let r = self.engine.remove_client(&e.client);
        drop(e.listening);
        if let (Some(claim), Endpoint::Path(p)) = (e.claim, &e.endpoint) {
            if let Err(err) = claim.remove(p) {
                tracing::warn!(client = %name, "cannot remove the socket {}: {err}", p.display());
            }
        }
        // Dropped on purpose by the operator, so said once, with what went.
        tracing::warn!(
            client = %name,
            socket = %endpoint_text(&e.endpoint),
            disconnected,
            pools = r.pools,
            persistent_pages = r.persistent_pages,
            ephemeral_pages = r.ephemeral_pages,
            shared_pages = r.shared_pages,
            bytes = r.bytes,
            "client removed by the operator: every page it stored is dropped, persistent \
             (swap) pages too; its guest cannot read them back"
        );
        Removed {
            client: name.to_string(),
            disconnected,
            pools: r.pools,
            persistent_pages: r.persistent_pages,
            ephemeral_pages: r.ephemeral_pages,
            shared_pages: r.shared_pages,
            bytes: r.bytes,
        }
    }

    fn reload_locked(&self, st: &mut State, new: DaemonConfig) -> Result<ReloadReport, String> {
        let mut report = ReloadReport::default();
        // Check everything first.
        let mut fresh = Vec::new();
        for c in &new.clients {
            let name = &c.config.name;
            match st.entries.get(name) {
                Some(e) if e.removing => {
                    return Err(format!(
                        "client \"{name}\" is being removed: reload once it is gone"
                    ))
                }
                Some(e) => {
                    if e.endpoint != c.endpoint {
                        report.needs_restart.push(format!(
                            "{name}: socket {} in the file, serving {} (remove-client and \
                             reload to move it)",
                            endpoint_text(&c.endpoint),
                            endpoint_text(&e.endpoint)
                        ));
                    }
                    let want = c.config.compressor.unwrap_or(new.engine.compressor);
                    if e.client.compressor() != want {
                        report.needs_restart.push(format!(
                            "{name}: compressor {want} (now {}): remove and add the client",
                            e.client.compressor()
                        ));
                    }
                }
                None => {
                    if let Some(why) = Self::conflict(st, name, &c.endpoint) {
                        return Err(why);
                    }
                    fresh.push(c.clone());
                }
            }
        }
        // Bind the new sockets; any failure gives back the ones bound and changes nothing.
        let mut bound = Vec::new();
        for c in fresh {
            match Self::bind(st, c) {
                Ok(b) => bound.push(b),
                Err(e) => {
                    bound.into_iter().for_each(Bound::abandon);
                    return Err(error_chain(&e));
                }
            }
        }
        // Apply.
        let e = &self.engine;
        let (old_limit, limit) = (st.cfg.engine.memory_limit, new.engine.memory_limit);
        if old_limit != limit {
            e.set_memory_limit(limit);
            st.cfg.engine.memory_limit = limit;
            report.changed.push(format!(
                "memory limit {} -> {}",
                format_size(old_limit),
                format_size(limit)
            ));
        }
        if st.cfg.orphan_timeout != new.orphan_timeout {
            e.set_orphan_timeout(new.orphan_timeout);
            report.changed.push(format!(
                "orphan timeout {} -> {}",
                timeout_text(st.cfg.orphan_timeout),
                timeout_text(new.orphan_timeout)
            ));
            st.cfg.orphan_timeout = new.orphan_timeout;
        }
        for c in &new.clients {
            let Some(entry) = st.entries.get(&c.config.name) else {
                continue;
            };
            let (name, cl) = (&c.config.name, &entry.client);
            let quota = cl.quota();
            if quota != c.config.quota {
                e.set_quota(cl, c.config.quota);
                report.changed.push(format!(
                    "{name}: quota {} -> {}",
                    quota_text(quota),
                    quota_text(c.config.quota)
                ));
            }
            let weight = cl.weight();
            if weight != c.config.weight {
                e.set_weight(cl, c.config.weight);
                report
                    .changed
                    .push(format!("{name}: weight {weight} -> {}", c.config.weight));
            }
            let auth = e.shared_auth(cl);
            let mut want = c.config.shared.clone();
            want.sort_unstable();
            want.dedup();
            for u in want.iter().filter(|u| !auth.contains(u)) {
                e.set_shared_auth(cl, *u, true);
                report
                    .changed
                    .push(format!("{name}: authorized shared pool {}", format_uuid(u)));
            }
            for u in auth.iter().filter(|u| !want.contains(u)) {
                e.set_shared_auth(cl, *u, false);
                report
                    .changed
                    .push(format!("{name}: revoked shared pool {}", format_uuid(u)));
            }
        }
        let mut bound = bound.into_iter();
        while let Some(b) = bound.next() {
            let name = b.spec.config.name.clone();
            let socket = endpoint_text(&b.spec.endpoint);
            // Only a thread that cannot start fails here (the host is out of resources); what
            // is applied stays applied, and the answer says what that is.
            if let Err(err) = self.start(st, b) {
                bound.for_each(Bound::abandon);
                return Err(format!(
                    "client \"{name}\": {}; applied before it: {:?}, added: {:?}",
                    error_chain(&err),
                    report.changed,
                    report.added
                ));
            }
            tracing::info!(client = %name, %socket, "client added by reload");
            report.added.push(name);
        }
        report.not_in_file = st
            .entries
            .iter()
            .filter(|(name, e)| !e.removing && !new.clients.iter().any(|c| c.config.name == **name))
            .map(|(name, _)| name.clone())
            .collect();
        let old = &st.cfg;
        let mut restart = |what: &str, differs: bool| {
            if differs {
                report
                    .needs_restart
                    .push(format!("{what} changed: takes effect at the next start"));
            }
        };
        restart("compressor", old.engine.compressor != new.engine.compressor);
        restart(
            "raw_threshold",
            old.engine.raw_threshold != new.engine.raw_threshold,
        );
        restart(
            "ephemeral_incompressible",
            old.engine.ephemeral_incompressible != new.engine.ephemeral_incompressible,
        );
        restart(
            "persistent_incompressible",
            old.engine.persistent_incompressible != new.engine.persistent_incompressible,
        );
        restart("max_pools", old.engine.max_pools != new.engine.max_pools);
        restart(
            "queues",
            old.device.request_queues != new.device.request_queues,
        );
        restart("queue_size", old.device.queue_size != new.device.queue_size);
        restart("poll_us", old.device.poll != new.device.poll);
        restart(
            "allow_unsealed_memory",
            old.device.allow_unsealed_memory != new.device.allow_unsealed_memory,
        );
        restart("control_socket", old.control_socket != new.control_socket);
        restart("socket_group", old.socket_group != new.socket_group);
        restart("control_group", old.control_group != new.control_group);
        restart("metrics_listen", old.metrics_listen != new.metrics_listen);
        Ok(report)
    }
}

/// Why `add-client` and `reload` are refused in the namespace sandbox.
const NO_FILESYSTEM: &str = "not available with --sandbox namespace: the daemon no longer sees \
     the filesystem (its root is empty); use --sandbox seccomp, or restart the daemon with the \
     new configuration";

impl Clients {
    /// How many clients are configured (being removed ones included).
    pub(crate) fn count(&self) -> usize {
        self.state.lock().entries.len()
    }

    /// At exit: removes the socket files of clients added at run time (those of the start are
    /// `files`, removed through their directories). Lock files stay, as at start.
    pub(crate) fn remove_added_socket_files(&self, files: &crate::sandbox::SocketFiles) {
        use std::os::unix::fs::FileTypeExt;
        let st = self.state.lock();
        for e in st.entries.values() {
            let Endpoint::Path(p) = &e.endpoint else {
                continue;
            };
            if e.claim.is_none() || files.holds(p) {
                continue;
            }
            if std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket()) {
                if let Err(err) = std::fs::remove_file(p) {
                    tracing::warn!(path = %p.display(), "cannot remove the socket file: {err}");
                }
            }
        }
    }
}

fn timeout_text(t: Option<Duration>) -> String {
    t.map_or_else(|| "off".into(), format_duration)
}

fn quota_text(q: u64) -> String {
    if q == 0 {
        "none".into()
    } else {
        format_size(q)
    }
}

impl ClientAdmin for Clients {
    fn add_client(&self, spec: &str) -> Result<(), String> {
        let spec = parse_client_spec(spec).map_err(|e| error_chain(&e))?;
        let mut st = self.state.lock();
        if !crate::sandbox::sees_filesystem(st.cfg.sandbox.mode) {
            return Err(NO_FILESYSTEM.into());
        }
        if let Some(why) = Self::conflict(&st, &spec.config.name, &spec.endpoint) {
            return Err(why);
        }
        let name = spec.config.name.clone();
        let socket = endpoint_text(&spec.endpoint);
        let b = Self::bind(&st, spec).map_err(|e| error_chain(&e))?;
        self.start(&mut st, b).map_err(|e| error_chain(&e))?;
        tracing::info!(client = %name, %socket, "client added");
        Ok(())
    }

    fn disconnect(&self, name: &str) -> Result<(), String> {
        let st = self.state.lock();
        let e = st
            .entries
            .get(name)
            .ok_or_else(|| format!("no client named \"{name}\""))?;
        if !e.ctl.disconnect() {
            return Err(format!("client \"{name}\" has no frontend connected"));
        }
        tracing::info!(client = %name, "disconnect asked for (ctl): ending the frontend's connection");
        Ok(())
    }

    fn remove_client(&self, name: &str, force: bool) -> Result<Removed, String> {
        let (thread, disconnected) = {
            let mut st = self.state.lock();
            let e = st
                .entries
                .get_mut(name)
                .ok_or_else(|| format!("no client named \"{name}\""))?;
            let disconnected = e.ctl.stop(force).map_err(|r| match r {
                StopRefused::Connected => format!(
                    "client \"{name}\" has a frontend connected: stop its guest or detach the \
                     device first, or use --force (the guest then loses every page stored \
                     here, its swapped-out pages too)"
                ),
                StopRefused::Stopping => format!("client \"{name}\" is already being removed"),
            })?;
            e.removing = true;
            // Wakes the thread's accept: it fails, and the thread sees it is to stop.
            // SAFETY: shutdown on a descriptor we own.
            unsafe { libc::shutdown(e.listening.as_raw_fd(), libc::SHUT_RD) };
            (e.thread.take(), disconnected)
        };
        let deadline = Instant::now() + STOP_WAIT;
        while thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        match thread {
            Some(t) if !t.is_finished() => {
                tracing::warn!(
                    client = %name,
                    "removal: the connection has not ended after {STOP_WAIT:?}; the client is \
                     removed when it does"
                );
                let (me, name_) = (self.me.clone(), name.to_string());
                let finisher = std::thread::Builder::new()
                    .name(format!("remove-{name}"))
                    .spawn(move || {
                        let _ = t.join();
                        if let Some(me) = me.upgrade() {
                            me.finish_removal(&mut me.state.lock(), &name_, disconnected);
                        }
                    });
                if let Err(e) = finisher {
                    // The entry stays, marked as being removed: its name and socket are not
                    // given again, and nothing is freed twice.
                    tracing::error!(client = %name, "cannot start a thread to finish the removal: {e}");
                }
                Err(format!(
                    "client \"{name}\": its connection has not ended after {} s; it is removed \
                     (and its pages freed) when it does",
                    STOP_WAIT.as_secs()
                ))
            }
            t => {
                if let Some(t) = t {
                    let _ = t.join();
                }
                Ok(self.finish_removal(&mut self.state.lock(), name, disconnected))
            }
        }
    }

    fn list_clients(&self) -> Vec<ClientInfo> {
        let st = self.state.lock();
        let stats = self.engine.stats();
        st.entries
            .iter()
            .map(|(name, e)| {
                let s = stats.clients.iter().find(|c| &c.name == name);
                ClientInfo {
                    name: name.clone(),
                    socket: endpoint_text(&e.endpoint),
                    connected: s.is_some_and(|s| s.connected),
                    removing: e.removing,
                    orphaned_since: s.and_then(|s| s.orphaned_since),
                    pools: s.map_or(0, |s| s.pools.len() as u64),
                    pages: s.map_or(0, |s| s.counters.stored_pages),
                    charged_bytes: s.map_or(0, |s| s.charged_bytes),
                    quota_bytes: e.client.quota(),
                    weight: e.client.weight(),
                }
            })
            .collect()
    }

    fn reload(&self) -> Result<ReloadReport, String> {
        if !crate::sandbox::sees_filesystem(self.state.lock().cfg.sandbox.mode) {
            return Err(NO_FILESYSTEM.into());
        }
        let args = self
            .args
            .as_ref()
            .filter(|a| a.config.is_some())
            .ok_or_else(|| {
                "nothing to reload: the daemon was started without --config".to_string()
            })?;
        let path: PathBuf = args.config.clone().expect("checked");
        // Read and checked in full before anything changes.
        let new = DaemonConfig::try_from(args.clone()).map_err(|e| {
            let why = error_chain(&e);
            tracing::warn!(path = %path.display(), "reload refused, nothing changed: {why}");
            why
        })?;
        let mut st = self.state.lock();
        let r = self.reload_locked(&mut st, new);
        drop(st);
        match &r {
            Ok(rep) => {
                tracing::info!(
                    path = %path.display(),
                    changed = ?rep.changed,
                    added = ?rep.added,
                    needs_restart = ?rep.needs_restart,
                    "configuration reloaded"
                );
                for name in &rep.not_in_file {
                    tracing::warn!(
                        client = %name,
                        "reload: client {name} is not in the configuration file: still served \
                         (ctl remove-client {name} removes it)"
                    );
                }
            }
            Err(why) => {
                tracing::warn!(path = %path.display(), "reload refused, nothing changed: {why}")
            }
        }
        r
    }

    fn handover(&self) -> Result<(), String> {
        if self.state.lock().cfg.state_file.is_none() {
            return Err(
                "the daemon runs without --state-file: there is no state file to hand \
                        over through (SIGTERM stops it, dropping every page)"
                    .into(),
            );
        }
        tracing::info!("ctl handover: the daemon ends and writes its state file");
        // SIGTERM is blocked in every thread and taken by the main thread, which hands over.
        // SAFETY: kill takes no pointers; the pid is our own, never 0 or negative.
        if self.pid <= 0 || unsafe { libc::kill(self.pid, libc::SIGTERM) } != 0 {
            return Err(format!(
                "cannot signal the daemon: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}
