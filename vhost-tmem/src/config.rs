// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command line and configuration file, validated into one [`DaemonConfig`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::control::Request;
use crate::sandbox::{Action as SeccompAction, Mode as SandboxMode, Sandbox};
use crate::size::{format_duration, format_size, parse_duration, parse_size};
use crate::store::{
    check_memory_limit, check_weight, parse_uuid, ClientConfig, EngineConfig, IncompressiblePolicy,
    Uuid, DEFAULT_COMPRESSOR, DEFAULT_MAX_POOLS, DEFAULT_MEMORY_LIMIT, DEFAULT_ORPHAN_TIMEOUT,
    DEFAULT_RAW_THRESHOLD, DEFAULT_WEIGHT,
};
use crate::vhu_tmem::{DeviceConfig, Migration, MAX_QUEUE_SIZE};
use shared_proto::{MAX_REQUEST_QUEUES, PAGE_SIZE};

// Defaults of the device settings; only the configuration sets them.

/// Request queues per device.
pub const DEFAULT_QUEUES: u16 = 1;
/// Largest virtqueue size offered.
pub const DEFAULT_QUEUE_SIZE: usize = 256;
/// Microseconds a request queue's thread polls after a burst.
pub const DEFAULT_POLL_US: u64 = 50;
/// The longest poll window: longer would keep a thread spinning.
pub const MAX_POLL_US: u64 = 10_000;

/// Errors in options or the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no client to serve: give --socket-path, --fd, --client or a config file with [[client]] entries (or --control-socket, to add clients at run time)")]
    NoClients,
    #[error("--socket-path and --fd are for a single client; use --client for more")]
    SingleAndMulti,
    #[error("invalid --client \"{spec}\": {why}")]
    ClientSpec { spec: String, why: String },
    #[error("client \"{0}\": give exactly one of socket=, fd= or listen=")]
    ClientSocket(String),
    #[error("two clients are named \"{0}\"")]
    DuplicateName(String),
    #[error("two clients use the socket {0}")]
    DuplicateSocket(PathBuf),
    #[error("invalid client name \"{0}\": use 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    #[error(transparent)]
    Size(#[from] crate::size::Error),
    /// A weight or memory limit out of range.
    #[error(transparent)]
    Setting(#[from] crate::store::Error),
    /// A poll window that would keep a thread spinning.
    #[error("--poll-us {0} is too long: at most {MAX_POLL_US} (10 ms)")]
    PollTooLong(u64),
    #[error("invalid shared pool UUID \"{0}\"")]
    BadUuid(String),
    #[error("--raw-threshold must be 64..={PAGE_SIZE}, got {0}")]
    BadRawThreshold(usize),
    #[error("--max-pools must be 1..=1024, got {0}")]
    BadMaxPools(usize),
    #[error(transparent)]
    Compressor(#[from] crate::store::codec::Error),
    #[error(transparent)]
    Device(#[from] crate::vhu_tmem::Error),
    #[error("unknown group \"{group}\" for {option}")]
    UnknownGroup { option: &'static str, group: String },
    #[error("invalid --metrics-listen \"{0}\": expected PORT or ADDRESS:PORT")]
    BadListen(String),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::Error),
    #[error("--state-file \"{0}\" names no file")]
    StateFilePath(PathBuf),
    #[error("--state-file-invalid is given without --state-file")]
    StateFileInvalidAlone,
    #[error("cannot read the configuration file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
}

/// vhost-tmem: transcendent memory for virtio guests, as a vhost-user backend.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands that talk to a running daemon.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the daemon's statistics (JSON, or Prometheus text with --prometheus).
    Stats {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Print the Prometheus text exposition instead of JSON.
        #[arg(long)]
        prometheus: bool,
    },
    /// Change a running daemon's settings.
    Ctl {
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        #[command(subcommand)]
        action: Request,
    },
}

/// Options of the daemon itself.
#[derive(Clone, Debug, Default, Args)]
pub struct ServeArgs {
    /// Listen for one frontend on this Unix socket (single client; see --client).
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Serve one frontend on this inherited, listening Unix socket fd (single client).
    #[arg(long, value_name = "FD", conflicts_with = "socket_path")]
    pub fd: Option<RawFd>,
    /// Name of the single client of --socket-path/--fd.
    #[arg(long, default_value = "guest")]
    pub name: String,
    /// A client: name=N,socket=PATH|fd=FD|listen=NAME[,quota=SIZE][,weight=W][,compressor=C][,shared=UUID+UUID]
    #[arg(long = "client", value_name = "SPEC")]
    pub clients: Vec<String>,
    /// TOML configuration file (options given here override it; clients add up).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "SIZE", help = with_default(
        "Global memory limit for stored pages, payload and metadata",
        format_size(DEFAULT_MEMORY_LIMIT),
    ))]
    pub memory_limit: Option<String>,
    #[arg(long, help = with_default(
        "Compressor: lz4, zstd, zstd:LEVEL (-7..=19) or none",
        DEFAULT_COMPRESSOR,
    ))]
    pub compressor: Option<String>,
    #[arg(long, value_name = "BYTES", help = with_default(
        "Pages that compress to this many bytes or more count as incompressible",
        DEFAULT_RAW_THRESHOLD,
    ))]
    pub raw_threshold: Option<usize>,
    /// What to do with incompressible ephemeral pages [default: refuse]
    #[arg(long, value_enum)]
    pub ephemeral_incompressible: Option<Incompressible>,
    /// What to do with incompressible persistent (swap) pages: `refuse` sends them to the
    /// guest's swap device, as zswap does [default: store]
    #[arg(long, value_enum)]
    pub persistent_incompressible: Option<Incompressible>,
    #[arg(long, help = with_default("Most pools per client", DEFAULT_MAX_POOLS))]
    pub max_pools: Option<usize>,
    #[arg(long, help = with_default(
        "Request queues per device, each served by its own thread",
        DEFAULT_QUEUES,
    ))]
    pub queues: Option<u16>,
    #[arg(long, help = with_default("Largest virtqueue size offered", DEFAULT_QUEUE_SIZE))]
    pub queue_size: Option<usize>,
    #[arg(long, value_name = "US", help = with_default(
        "Microseconds a request queue's thread keeps polling after a burst before it sleeps; \
         0 never polls (saves CPU on hosts with many idle guests)",
        DEFAULT_POLL_US,
    ))]
    pub poll_us: Option<u64>,
    #[arg(long, value_name = "DURATION", help = with_default(
        "How long the pools of a guest whose frontend disconnected wait for it to reconnect \
         (drivers with the SESSION feature; others lose their pools at once) before they are \
         freed: seconds, or 500ms, 30s, 10m, 2h; 0 keeps nothing, off keeps them until the \
         guest's driver resets them or the client is removed",
        format_duration(DEFAULT_ORPHAN_TIMEOUT),
    ))]
    pub orphan_timeout: Option<String>,
    /// Accept guest memory that is not a memfd sealed against shrinking (F_SEAL_SHRINK), such
    /// as hugetlbfs or /dev/shm files. Unsafe with an untrusted VMM: one that truncates such a
    /// file under its mapping kills the daemon (SIGBUS) and every client's pages with it.
    #[arg(long)]
    pub allow_unsealed_memory: bool,
    #[arg(long, value_enum, value_name = "WHAT", help = with_default(
        "Live migration and snapshots of guests (QEMU's migratable=on): off, persistent \
         (their swap pages go with them, page-cache pools arrive empty) or all (page-cache \
         pages too). Not off offers dirty-page logging, whose log memory the vhost-user \
         crate maps without checking its seals: only for VMMs trusted not to truncate it",
        "off",
    ))]
    pub migration: Option<MigrationMode>,
    /// Control socket for `vhost-tmem stats` and `vhost-tmem ctl`.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Give the client sockets to this group (name or gid), mode 0660, e.g. the group QEMU
    /// runs in; without it they are 0600 (the daemon's user only).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Give the control socket to this group (name or gid), mode 0660, and let its members
    /// use it; without it only root and the daemon's user may.
    #[arg(long, value_name = "GROUP")]
    pub control_group: Option<String>,
    /// Serve Prometheus metrics over HTTP on PORT (loopback) or ADDRESS:PORT.
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub metrics_listen: Option<String>,
    #[arg(long, value_enum, help = with_default(
        "Confinement once set up: none, seccomp (a syscall allow-list) or namespace (seccomp \
         and new mount/network/IPC/UTS namespaces with an empty root)",
        "seccomp",
    ))]
    pub sandbox: Option<SandboxMode>,
    #[arg(long, value_enum, help = with_default(
        "What a syscall outside the seccomp allow-list does: errno (fails with EPERM, the \
         daemon keeps serving), kill (the daemon dies, every guest's pages with it) or log \
         (allowed and logged by the kernel)",
        "errno",
    ))]
    pub seccomp_action: Option<SeccompAction>,
    /// Once the sockets exist, run as this user (name or uid): its uid, gid and groups. Only
    /// when started as root; the socket and lock files are given to the user.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Hand the daemon's state to its successor through this file: on SIGTERM or `ctl
    /// handover` the daemon stops serving and writes every client's pools and pages here; at
    /// start it loads the file (before serving) and removes it.
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,
    #[arg(long, value_enum, value_name = "WHAT", help = with_default(
        "What a start does with a state file it cannot load (corrupt, truncated, another \
         format version, a client no longer configured, pages that do not fit): refuse (the \
         daemon does not start) or start-empty (it starts without that state and keeps the \
         file as PATH.rejected)",
        "refuse",
    ))]
    pub state_file_invalid: Option<StateFileInvalid>,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

/// Help text that shows a default, the way clap shows `default_value`s: these options have no
/// clap default because an unset option must leave the configuration file's value in force.
fn with_default(help: &str, default: impl std::fmt::Display) -> String {
    format!("{help} [default: {default}]")
}

/// `--ephemeral-incompressible` and `--persistent-incompressible` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Incompressible {
    /// Refuse them (the guest rereads clean pages from disk, writes swap pages to its disk).
    Refuse,
    /// Store them raw.
    Store,
}

/// `--migration` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Not offered: QEMU refuses to migrate or snapshot the guest.
    Off,
    /// Persistent pools with their pages; ephemeral pools arrive empty.
    Persistent,
    /// Every pool with its pages.
    All,
}

/// `--state-file-invalid` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateFileInvalid {
    /// The daemon does not start.
    #[default]
    Refuse,
    /// The daemon starts without the file's state (and keeps the file as PATH.rejected).
    StartEmpty,
}

impl std::fmt::Display for StateFileInvalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateFileInvalid::Refuse => "refuse",
            StateFileInvalid::StartEmpty => "start-empty",
        })
    }
}

/// Where the daemon's state goes at handover and comes from at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateFileConfig {
    pub path: PathBuf,
    pub invalid: StateFileInvalid,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub memory_limit: Option<SizeValue>,
    pub compressor: Option<String>,
    pub raw_threshold: Option<usize>,
    pub ephemeral_incompressible: Option<Incompressible>,
    pub persistent_incompressible: Option<Incompressible>,
    pub max_pools: Option<usize>,
    pub queues: Option<u16>,
    pub queue_size: Option<usize>,
    pub poll_us: Option<u64>,
    pub orphan_timeout: Option<DurationValue>,
    pub allow_unsealed_memory: Option<bool>,
    pub migration: Option<MigrationMode>,
    pub control_socket: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub control_group: Option<String>,
    pub metrics_listen: Option<String>,
    pub sandbox: Option<SandboxMode>,
    pub seccomp_action: Option<SeccompAction>,
    pub user: Option<String>,
    pub state_file: Option<PathBuf>,
    pub state_file_invalid: Option<StateFileInvalid>,
    #[serde(default, rename = "client")]
    pub clients: Vec<FileClient>,
}

/// A size written as a number of bytes or a string with a suffix.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64, Error> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(t) => Ok(parse_size(t)?),
        }
    }
}

/// A duration written as a number of seconds or a string (`"10m"`, `"off"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(u64),
    Text(String),
}

impl DurationValue {
    fn duration(&self) -> Result<Option<Duration>, Error> {
        match self {
            DurationValue::Seconds(s) => Ok(Some(Duration::from_secs(*s))),
            DurationValue::Text(t) => Ok(parse_duration(t)?),
        }
    }
}

/// A `[[client]]` of the configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileClient {
    pub name: String,
    pub socket: Option<PathBuf>,
    pub fd: Option<RawFd>,
    pub listen: Option<String>,
    pub quota: Option<SizeValue>,
    pub weight: Option<u32>,
    pub compressor: Option<String>,
    #[serde(default)]
    pub shared: Vec<String>,
}

/// Where a client's frontend connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A socket path the daemon binds.
    Path(PathBuf),
    /// A listening socket inherited as a file descriptor.
    Fd(RawFd),
    /// A listening socket passed by a service manager under this name (`LISTEN_FDNAMES`,
    /// systemd's `FileDescriptorName=`).
    Listen(String),
}

/// One client: engine settings and endpoint.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub config: ClientConfig,
    pub endpoint: Endpoint,
}

/// Everything the daemon needs, validated.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub engine: EngineConfig,
    pub device: DeviceConfig,
    pub clients: Vec<ClientSpec>,
    pub control_socket: Option<PathBuf>,
    /// Group (gid) of the client sockets, which are then 0660 instead of 0600.
    pub socket_group: Option<u32>,
    /// Group (gid) of the control socket, whose members may use it.
    pub control_group: Option<u32>,
    pub metrics_listen: Option<SocketAddr>,
    /// How the daemon confines itself once set up.
    pub sandbox: Sandbox,
    /// How long pools kept for a reconnect wait for their driver (`None`: for ever).
    pub orphan_timeout: Option<Duration>,
    /// `--state-file`: the state handed over at exit and loaded at start.
    pub state_file: Option<StateFileConfig>,
}

fn parse_listen(s: &str) -> Result<SocketAddr, Error> {
    if let Ok(port) = s.parse::<u16>() {
        // A bare port binds loopback only: statistics are not for the network by default.
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| Error::BadListen(s.to_string()))
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

fn parse_uuids<'a>(it: impl Iterator<Item = &'a str>) -> Result<Vec<Uuid>, Error> {
    it.filter(|s| !s.is_empty())
        .map(|s| parse_uuid(s).ok_or_else(|| Error::BadUuid(s.to_string())))
        .collect()
}

/// Parses one `--client` value.
pub fn parse_client_spec(spec: &str) -> Result<ClientSpec, Error> {
    let err = |why: String| Error::ClientSpec {
        spec: spec.to_string(),
        why,
    };
    let mut cfg = ClientConfig::named("");
    let (mut socket, mut fd, mut listen) = (None, None, None);
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| err(format!("\"{kv}\" is not key=value")))?;
        match k {
            "name" => cfg.name = v.to_string(),
            "socket" => socket = Some(PathBuf::from(v)),
            "fd" => fd = Some(v.parse().map_err(|_| err(format!("bad fd \"{v}\"")))?),
            "listen" => listen = Some(v.to_string()),
            "quota" => cfg.quota = parse_size(v)?,
            "weight" => {
                cfg.weight =
                    check_weight(v.parse().map_err(|_| err(format!("bad weight \"{v}\"")))?)?
            }
            "compressor" => cfg.compressor = Some(v.parse()?),
            "shared" => cfg.shared = parse_uuids(v.split('+'))?,
            _ => return Err(err(format!("unknown key \"{k}\""))),
        }
    }
    if cfg.name.is_empty() {
        return Err(err("name= is missing".into()));
    }
    check_name(&cfg.name)?;
    let endpoint = endpoint(socket, fd, listen).ok_or(Error::ClientSocket(cfg.name.clone()))?;
    Ok(ClientSpec {
        config: cfg,
        endpoint,
    })
}

/// The one endpoint given, if exactly one is.
fn endpoint(
    socket: Option<PathBuf>,
    fd: Option<RawFd>,
    listen: Option<String>,
) -> Option<Endpoint> {
    match (socket, fd, listen) {
        (Some(p), None, None) => Some(Endpoint::Path(p)),
        (None, Some(f), None) => Some(Endpoint::Fd(f)),
        (None, None, Some(n)) if !n.is_empty() => Some(Endpoint::Listen(n)),
        _ => None,
    }
}

fn file_client(c: &FileClient) -> Result<ClientSpec, Error> {
    check_name(&c.name)?;
    let endpoint = endpoint(c.socket.clone(), c.fd, c.listen.clone())
        .ok_or_else(|| Error::ClientSocket(c.name.clone()))?;
    Ok(ClientSpec {
        config: ClientConfig {
            name: c.name.clone(),
            quota: c
                .quota
                .as_ref()
                .map(SizeValue::bytes)
                .transpose()?
                .unwrap_or(0),
            weight: check_weight(c.weight.unwrap_or(DEFAULT_WEIGHT))?,
            compressor: c.compressor.as_deref().map(str::parse).transpose()?,
            shared: parse_uuids(c.shared.iter().map(String::as_str))?,
        },
        endpoint,
    })
}

/// Reads and parses a configuration file.
pub fn read_file(path: &Path) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| Error::ParseFile {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

impl TryFrom<ServeArgs> for DaemonConfig {
    type Error = Error;

    fn try_from(a: ServeArgs) -> Result<Self, Error> {
        let file = match &a.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let memory_limit = match (&a.memory_limit, &file.memory_limit) {
            (Some(s), _) => parse_size(s)?,
            (None, Some(v)) => v.bytes()?,
            (None, None) => DEFAULT_MEMORY_LIMIT,
        };
        check_memory_limit(memory_limit)?;
        let compressor = a
            .compressor
            .as_deref()
            .or(file.compressor.as_deref())
            .map(str::parse)
            .transpose()?
            .unwrap_or(DEFAULT_COMPRESSOR);
        let raw_threshold = a
            .raw_threshold
            .or(file.raw_threshold)
            .unwrap_or(DEFAULT_RAW_THRESHOLD);
        if !(64..=PAGE_SIZE).contains(&raw_threshold) {
            return Err(Error::BadRawThreshold(raw_threshold));
        }
        let max_pools = a.max_pools.or(file.max_pools).unwrap_or(DEFAULT_MAX_POOLS);
        if !(1..=1024).contains(&max_pools) {
            return Err(Error::BadMaxPools(max_pools));
        }
        let policy = |v: Option<Incompressible>, default| match v {
            Some(Incompressible::Store) => IncompressiblePolicy::Store,
            Some(Incompressible::Refuse) => IncompressiblePolicy::Refuse,
            None => default,
        };
        let defaults = EngineConfig::default();
        let incompressible = policy(
            a.ephemeral_incompressible.or(file.ephemeral_incompressible),
            defaults.ephemeral_incompressible,
        );
        let persistent_incompressible = policy(
            a.persistent_incompressible
                .or(file.persistent_incompressible),
            defaults.persistent_incompressible,
        );
        let poll_us = a.poll_us.or(file.poll_us).unwrap_or(DEFAULT_POLL_US);
        if poll_us > MAX_POLL_US {
            return Err(Error::PollTooLong(poll_us));
        }
        let device = DeviceConfig {
            request_queues: a.queues.or(file.queues).unwrap_or(DEFAULT_QUEUES),
            queue_size: a
                .queue_size
                .or(file.queue_size)
                .unwrap_or(DEFAULT_QUEUE_SIZE),
            max_pools: max_pools as u16,
            poll: std::time::Duration::from_micros(poll_us),
            allow_unsealed_memory: a.allow_unsealed_memory
                || file.allow_unsealed_memory.unwrap_or(false),
            migration: match a.migration.or(file.migration) {
                None | Some(MigrationMode::Off) => Migration::Off,
                Some(MigrationMode::Persistent) => Migration::Persistent,
                Some(MigrationMode::All) => Migration::All,
            },
        };
        device.validate()?;
        debug_assert!(
            device.request_queues <= MAX_REQUEST_QUEUES && device.queue_size <= MAX_QUEUE_SIZE
        );

        let mut clients = Vec::new();
        if a.socket_path.is_some() || a.fd.is_some() {
            if !a.clients.is_empty() {
                return Err(Error::SingleAndMulti);
            }
            check_name(&a.name)?;
            let endpoint = match (a.socket_path, a.fd) {
                (Some(p), _) => Endpoint::Path(p),
                (None, Some(f)) => Endpoint::Fd(f),
                (None, None) => unreachable!("checked above"),
            };
            clients.push(ClientSpec {
                config: ClientConfig::named(&a.name),
                endpoint,
            });
        }
        for c in &file.clients {
            clients.push(file_client(c)?);
        }
        for s in &a.clients {
            clients.push(parse_client_spec(s)?);
        }
        let control_socket = a.control_socket.or(file.control_socket);
        // Without clients, a daemon is useful only if clients can be added at run time.
        if clients.is_empty() && control_socket.is_none() {
            return Err(Error::NoClients);
        }
        let mut names = HashSet::new();
        let mut paths = HashSet::new();
        for c in &clients {
            if !names.insert(c.config.name.clone()) {
                return Err(Error::DuplicateName(c.config.name.clone()));
            }
            if let Endpoint::Path(p) = &c.endpoint {
                if !paths.insert(p.clone()) {
                    return Err(Error::DuplicateSocket(p.clone()));
                }
            }
        }
        let metrics_listen = a
            .metrics_listen
            .as_deref()
            .or(file.metrics_listen.as_deref())
            .map(parse_listen)
            .transpose()?;
        let group = |option, name: Option<String>| {
            name.map(|g| {
                crate::sock::resolve_group(&g).ok_or(Error::UnknownGroup { option, group: g })
            })
            .transpose()
        };
        let socket_group = group("--socket-group", a.socket_group.or(file.socket_group))?;
        let control_group = group("--control-group", a.control_group.or(file.control_group))?;
        let sandbox = Sandbox {
            mode: a.sandbox.or(file.sandbox).unwrap_or_default(),
            action: a.seccomp_action.or(file.seccomp_action).unwrap_or_default(),
            user: a
                .user
                .or(file.user)
                .map(|u| crate::sandbox::resolve_user(&u))
                .transpose()?,
        };
        let orphan_timeout = match (&a.orphan_timeout, &file.orphan_timeout) {
            (Some(s), _) => parse_duration(s)?,
            (None, Some(v)) => v.duration()?,
            (None, None) => Some(DEFAULT_ORPHAN_TIMEOUT),
        };
        let invalid = a.state_file_invalid.or(file.state_file_invalid);
        let state_file = match a.state_file.or(file.state_file) {
            Some(path) => {
                if path.file_name().is_none() {
                    return Err(Error::StateFilePath(path));
                }
                Some(StateFileConfig {
                    path,
                    invalid: invalid.unwrap_or_default(),
                })
            }
            None if invalid.is_some() => return Err(Error::StateFileInvalidAlone),
            None => None,
        };
        Ok(DaemonConfig {
            engine: EngineConfig {
                memory_limit,
                compressor,
                raw_threshold,
                ephemeral_incompressible: incompressible,
                persistent_incompressible,
                max_pools,
            },
            device,
            clients,
            control_socket,
            socket_group,
            control_group,
            metrics_listen,
            sandbox,
            orphan_timeout,
            state_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::Compressor;

    fn cfg(args: &[&str]) -> Result<DaemonConfig, Error> {
        let mut v = vec!["vhost-tmem"];
        v.extend_from_slice(args);
        let cli = Cli::try_parse_from(v).unwrap();
        DaemonConfig::try_from(cli.serve)
    }

    #[test]
    fn single_client_defaults() {
        let c = cfg(&["--socket-path", "/tmp/x.sock"]).unwrap();
        assert_eq!(c.clients.len(), 1);
        assert_eq!(c.clients[0].config.name, "guest");
        assert_eq!(c.engine.memory_limit, 1 << 30);
        assert_eq!(c.engine.compressor, Compressor::Lz4);
        assert_eq!(c.device.request_queues, 1);
        assert_eq!(c.device.poll, std::time::Duration::from_micros(50));
        assert!(c.metrics_listen.is_none());
        assert!(!c.device.allow_unsealed_memory);
        assert_eq!(c.sandbox, Sandbox::default());
        assert_eq!(
            (c.sandbox.mode, c.sandbox.action),
            (SandboxMode::Seccomp, SeccompAction::Errno)
        );
        assert_eq!(c.device.migration, Migration::Off);
        let c = cfg(&["--socket-path", "/tmp/x.sock", "--allow-unsealed-memory"]).unwrap();
        assert!(c.device.allow_unsealed_memory);
        let c = cfg(&["--socket-path", "/tmp/x.sock", "--migration", "all"]).unwrap();
        assert_eq!(c.device.migration, Migration::All);
        let e = Cli::try_parse_from(["vhost-tmem", "--migration", "yes"]).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("invalid value 'yes' for '--migration"), "{e}");
        assert!(e.contains("off, persistent, all"), "{e}");
        let c = cfg(&["--socket-path", "/tmp/x.sock", "--poll-us", "0"]).unwrap();
        assert!(c.device.poll.is_zero());
        let e = cfg(&["--socket-path", "/tmp/x.sock", "--poll-us", "20000"]).unwrap_err();
        assert!(e.to_string().contains("--poll-us 20000 is too long"), "{e}");
    }

    #[test]
    fn orphan_timeout() {
        use std::time::Duration;
        let base = ["--socket-path", "/tmp/x.sock"];
        let with = |v: &str| cfg(&[&base[..], &["--orphan-timeout", v]].concat());
        assert_eq!(
            cfg(&base).unwrap().orphan_timeout,
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            with("90").unwrap().orphan_timeout,
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            with("500ms").unwrap().orphan_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(with("0").unwrap().orphan_timeout, Some(Duration::ZERO));
        assert_eq!(with("off").unwrap().orphan_timeout, None);
        let e = with("ten minutes").unwrap_err().to_string();
        assert!(e.contains("invalid duration \"ten minutes\""), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        for (text, want) in [
            ("orphan_timeout = 30", Some(Duration::from_secs(30))),
            ("orphan_timeout = \"2h\"", Some(Duration::from_secs(7200))),
            ("orphan_timeout = \"off\"", None),
        ] {
            std::fs::write(&p, text).unwrap();
            let c = cfg(&[&base[..], &["--config", p.to_str().unwrap()]].concat()).unwrap();
            assert_eq!(c.orphan_timeout, want, "{text}");
        }
        // The command line wins.
        let c = cfg(&[
            &base[..],
            &["--config", p.to_str().unwrap(), "--orphan-timeout", "5s"],
        ]
        .concat())
        .unwrap();
        assert_eq!(c.orphan_timeout, Some(Duration::from_secs(5)));
        std::fs::write(&p, "orphan_timeout = \"5 parsecs\"").unwrap();
        let e = cfg(&[&base[..], &["--config", p.to_str().unwrap()]].concat()).unwrap_err();
        assert!(e.to_string().contains("invalid duration"), "{e}");
    }

    #[test]
    fn migration_from_the_file_and_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        let base = [
            "--socket-path",
            "/tmp/x.sock",
            "--config",
            p.to_str().unwrap(),
        ];
        for (text, want) in [
            ("migration = \"persistent\"", Migration::Persistent),
            ("migration = \"all\"", Migration::All),
            ("migration = \"off\"", Migration::Off),
            ("", Migration::Off),
        ] {
            std::fs::write(&p, text).unwrap();
            assert_eq!(cfg(&base).unwrap().device.migration, want, "{text}");
        }
        let c = cfg(&[&base[..], &["--migration", "persistent"]].concat()).unwrap();
        assert_eq!(c.device.migration, Migration::Persistent);
        std::fs::write(&p, "migration = true").unwrap();
        let e = crate::daemon::error_chain(&cfg(&base).unwrap_err());
        assert!(e.contains("migration"), "{e}");
    }

    #[test]
    fn no_client_at_start_needs_a_control_socket() {
        // Clients can be added at run time, through the control socket only.
        let c = cfg(&["--control-socket", "/tmp/c.sock"]).unwrap();
        assert!(c.clients.is_empty());
        let e = cfg(&[]).unwrap_err().to_string();
        assert!(e.contains("--control-socket"), "{e}");
    }

    #[test]
    fn multi_client() {
        let u = "12345678-9abc-def0-0001-0203040506ff";
        let c = cfg(&[
            "--client",
            &format!("name=a,socket=/tmp/a,quota=64M,weight=300,compressor=zstd:3,shared={u}"),
            "--client",
            "name=b,fd=7",
            "--client",
            "name=c,listen=vm3",
            "--memory-limit",
            "256M",
            "--queues",
            "2",
            "--metrics-listen",
            "9187",
        ])
        .unwrap();
        assert_eq!(c.clients[0].config.quota, 64 << 20);
        assert_eq!(c.clients[0].config.weight, 300);
        assert_eq!(c.clients[0].config.compressor, Some(Compressor::Zstd(3)));
        assert_eq!(c.clients[0].config.shared, vec![parse_uuid(u).unwrap()]);
        assert_eq!(c.clients[1].endpoint, Endpoint::Fd(7));
        assert_eq!(c.clients[2].endpoint, Endpoint::Listen("vm3".into()));
        assert_eq!(c.metrics_listen.unwrap().to_string(), "127.0.0.1:9187");
    }

    #[test]
    fn errors_name_the_problem() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "no client"),
            (
                &["--socket-path", "/x", "--client", "name=a,socket=/y"],
                "single client",
            ),
            (
                &["--client", "name=a"],
                "exactly one of socket=, fd= or listen=",
            ),
            (
                &["--client", "name=a,socket=/a,listen=vm1"],
                "exactly one of socket=, fd= or listen=",
            ),
            (
                &["--client", "name=a,listen="],
                "exactly one of socket=, fd= or listen=",
            ),
            (&["--client", "socket=/a"], "name= is missing"),
            (
                &["--client", "name=a,socket=/a,colour=red"],
                "unknown key \"colour\"",
            ),
            (&["--client", "name=a b,socket=/a"], "invalid client name"),
            (
                &[
                    "--client",
                    "name=a,socket=/a",
                    "--client",
                    "name=a,socket=/b",
                ],
                "two clients are named",
            ),
            (
                &[
                    "--client",
                    "name=a,socket=/a",
                    "--client",
                    "name=b,socket=/a",
                ],
                "two clients use the socket",
            ),
            (&["--client", "name=a,socket=/a,weight=0"], "invalid weight"),
            (
                &["--client", "name=a,socket=/a,shared=xyz"],
                "invalid shared pool UUID",
            ),
            (
                &["--socket-path", "/x", "--memory-limit", "lots"],
                "invalid size \"lots\"",
            ),
            (
                &["--socket-path", "/x", "--memory-limit", "100"],
                "at least one page",
            ),
            (
                &["--socket-path", "/x", "--compressor", "brotli"],
                "unknown compressor \"brotli\"",
            ),
            (
                &["--socket-path", "/x", "--queues", "0"],
                "request queues must be",
            ),
            (
                &["--socket-path", "/x", "--queue-size", "100"],
                "queue size must be",
            ),
            (
                &["--socket-path", "/x", "--raw-threshold", "9000"],
                "--raw-threshold",
            ),
            (&["--socket-path", "/x", "--max-pools", "0"], "--max-pools"),
            (
                &["--socket-path", "/x", "--metrics-listen", "here"],
                "--metrics-listen",
            ),
            (
                &[
                    "--socket-path",
                    "/x",
                    "--control-group",
                    "no-such-group-here",
                ],
                "unknown group \"no-such-group-here\" for --control-group",
            ),
            (
                &["--socket-path", "/x", "--config", "/nonexistent.toml"],
                "cannot read the configuration file",
            ),
            (
                &["--socket-path", "/x", "--state-file", "/"],
                "--state-file \"/\" names no file",
            ),
            (
                &["--socket-path", "/x", "--state-file-invalid", "start-empty"],
                "--state-file-invalid is given without --state-file",
            ),
        ];
        for (args, want) in cases {
            let e = cfg(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn ctl_actions_are_control_requests() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let ctl = |args: &[&str]| -> Result<String, clap::Error> {
            let mut v = vec!["vhost-tmem", "ctl", "--control", "/run/c.sock"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v)?.command {
                Some(Command::Ctl { control, action }) => {
                    assert_eq!(control, Path::new("/run/c.sock"));
                    Ok(serde_json::to_string(&action).unwrap())
                }
                other => panic!("{other:?}"),
            }
        };
        let want = [
            (
                &["quota", "vm1", "8M"][..],
                r#"{"cmd":"quota","client":"vm1","bytes":8388608}"#,
            ),
            (
                &["limit", "1G"][..],
                r#"{"cmd":"limit","bytes":1073741824}"#,
            ),
            (
                &["weight", "vm1", "200"][..],
                r#"{"cmd":"weight","client":"vm1","weight":200}"#,
            ),
            (
                &["shrink", "vm1", "12"][..],
                r#"{"cmd":"shrink","client":"vm1","pages":12}"#,
            ),
            (
                &["shrink", "vm1", "none"][..],
                r#"{"cmd":"shrink","client":"vm1","pages":null}"#,
            ),
            (&["freeze", "vm1"][..], r#"{"cmd":"freeze","client":"vm1"}"#),
        ];
        for (args, json) in want {
            assert_eq!(ctl(args).unwrap(), json, "{args:?}");
        }
        let bad: &[(&[&str], &str)] = &[
            (&["quota", "vm1", "8X"], "invalid size \"8X\""),
            (&["shrink", "vm1", "lots"], "a number of pages or \"none\""),
            (&["shrink", "vm1"], "required"),
            // Statistics have their own command.
            (&["stats"], "unrecognized subcommand"),
        ];
        for (args, want) in bad {
            let e = ctl(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn config_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(
            &p,
            r#"
memory_limit = "2G"
compressor = "zstd"
queues = 2
persistent_incompressible = "refuse"
socket_group = "0"
control_group = "root"
sandbox = "namespace"
seccomp_action = "log"
[[client]]
name = "vm1"
socket = "/run/vm1.sock"
quota = "512M"
weight = 200
[[client]]
name = "vm2"
socket = "/run/vm2.sock"
quota = 1048576
[[client]]
name = "vm3"
listen = "vm3"
"#,
        )
        .unwrap();
        let c = cfg(&["--config", p.to_str().unwrap(), "--memory-limit", "3G"]).unwrap();
        assert_eq!(c.engine.memory_limit, 3 << 30);
        assert_eq!(c.engine.compressor, Compressor::Zstd(1));
        assert_eq!(
            (
                c.engine.persistent_incompressible,
                c.engine.ephemeral_incompressible
            ),
            (IncompressiblePolicy::Refuse, IncompressiblePolicy::Refuse)
        );
        assert_eq!(c.clients.len(), 3);
        assert_eq!(c.clients[2].endpoint, Endpoint::Listen("vm3".into()));
        assert_eq!(c.clients[0].config.quota, 512 << 20);
        assert_eq!(c.clients[1].config.quota, 1 << 20);
        assert_eq!((c.socket_group, c.control_group), (Some(0), Some(0)));
        assert_eq!(
            (c.sandbox.mode, c.sandbox.action),
            (SandboxMode::Namespace, SeccompAction::Log)
        );
        assert_eq!(c.state_file, None);
        // The command line wins.
        let c = cfg(&[
            "--config",
            p.to_str().unwrap(),
            "--sandbox",
            "none",
            "--persistent-incompressible",
            "store",
        ])
        .unwrap();
        assert_eq!(c.sandbox.mode, SandboxMode::None);
        assert_eq!(
            c.engine.persistent_incompressible,
            IncompressiblePolicy::Store
        );
        std::fs::write(
            &p,
            "state_file = \"/var/lib/t.state\"\nstate_file_invalid = \"start-empty\"\n\
             [[client]]\nname = \"vm1\"\nsocket = \"/run/vm1.sock\"\n",
        )
        .unwrap();
        let c = cfg(&["--config", p.to_str().unwrap()]).unwrap();
        let want = StateFileConfig {
            path: "/var/lib/t.state".into(),
            invalid: StateFileInvalid::StartEmpty,
        };
        assert_eq!(c.state_file.as_ref(), Some(&want));
        let c = cfg(&[
            "--config",
            p.to_str().unwrap(),
            "--state-file",
            "/tmp/s",
            "--state-file-invalid",
            "refuse",
        ])
        .unwrap();
        let s = c.state_file.unwrap();
        assert_eq!(
            (s.path.to_str(), s.invalid),
            (Some("/tmp/s"), StateFileInvalid::Refuse)
        );
        let c = cfg(&["--socket-path", "/x", "--state-file", "s"]).unwrap();
        assert_eq!(c.state_file.unwrap().invalid, StateFileInvalid::Refuse);
        std::fs::write(&p, "memory_limit = \"2G\"\nbogus = 1\n").unwrap();
        let e = cfg(&["--config", p.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("invalid configuration file"));
        let src = std::error::Error::source(&e).unwrap().to_string();
        assert!(src.contains("bogus"), "{src}");
    }
}
