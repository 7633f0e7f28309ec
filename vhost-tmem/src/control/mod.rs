// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control interface: what a host administrator can ask a running daemon, as the requests
//! and answers a Unix socket carries, one JSON object per line each way.
//!
//! `server.rs` serves the socket, `client.rs` is the side of `vhost-tmem ctl` and `stats`, and
//! `prometheus.rs` renders the same statistics for Prometheus.

mod client;
mod conn;
mod prometheus;
mod server;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Subcommand;
use serde::{Deserialize, Serialize};

use crate::size::{format_size, parse_size};
use crate::store::stats::StoreStats;
use crate::store::{check_memory_limit, check_weight, parse_uuid, Engine};

pub use client::request;
pub use prometheus::{bind_metrics, prometheus, serve_metrics, MetricsListener};
pub use server::{Access, BoundControl};

/// Errors of the control interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("control socket")]
    Socket(#[from] crate::sock::Error),
    #[error("cannot listen for metrics on {addr}")]
    BindMetrics {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the daemon's control socket {path} (is the daemon running with --control-socket?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket I/O failed")]
    Io(#[from] io::Error),
    #[error("the daemon sent a malformed answer")]
    BadAnswer(#[source] serde_json::Error),
    #[error("the daemon refused: {0}")]
    Refused(String),
}

/// A control request: one JSON line on the socket, and the `vhost-tmem ctl` action that sends
/// it (the doc comments are the actions' help).
#[derive(Clone, Debug, Serialize, Deserialize, Subcommand)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The daemon's statistics; `vhost-tmem stats` asks for them, so it is no `ctl` action.
    #[command(skip)]
    Stats,
    /// Refuse the client's puts (gets and flushes still work).
    Freeze { client: String },
    /// Accept the client's puts again.
    Thaw { client: String },
    /// Drop the client's ephemeral pages (persistent pages are never dropped).
    Flush { client: String },
    /// Set the client's eviction weight.
    Weight { client: String, weight: u32 },
    /// Set the client's memory quota (0: none).
    Quota {
        client: String,
        #[arg(value_name = "SIZE", value_parser = parse_size)]
        bytes: u64,
    },
    /// Allow the client to join a shared pool.
    Authorize { client: String, uuid: String },
    /// Stop allowing the client to join a shared pool (members stay members).
    Revoke { client: String, uuid: String },
    /// Set the global memory limit.
    Limit {
        #[arg(value_name = "SIZE", value_parser = parse_size)]
        bytes: u64,
    },
    /// Ask the client's driver to keep at most PAGES pages (config space); "none" clears it.
    Shrink {
        client: String,
        // Spelled out so that clap takes the argument as required, with `none` for `None`.
        #[arg(value_parser = pages_arg)]
        pages: std::option::Option<u64>,
    },
    /// Add a client and serve its socket, as --client does at start.
    ///
    /// SPEC is name=N,socket=PATH[,quota=SIZE][,weight=W][,compressor=C][,shared=UUID+UUID];
    /// the socket is made as at start (0600, or 0660 for --socket-group).
    AddClient {
        #[arg(value_name = "SPEC")]
        spec: String,
    },
    /// End the client's frontend connection and keep serving the client.
    ///
    /// The frontend may connect again (QEMU does with reconnect-ms); a guest driver with
    /// sessions keeps its pools and pages meanwhile, as after any disconnect.
    Disconnect { client: String },
    /// Stop serving a client, free its pools and remove its socket.
    ///
    /// Refused while a frontend is connected, unless --force. Every page the client stored is
    /// dropped, persistent (swap) pages too, and the log says how many.
    RemoveClient {
        client: String,
        /// End the frontend's connection first; the guest loses every page stored here.
        #[arg(long)]
        #[serde(default)]
        force: bool,
    },
    /// List the clients: socket, state (connected, orphaned and since when, ...), pools,
    /// pages, quota, weight.
    ListClients,
    /// Re-read the configuration file (--config) and apply it, as SIGHUP does.
    ///
    /// Applies the memory limit, quotas, weights, shared pool authorizations and new clients,
    /// all or nothing; reports clients not in the file (it never removes one) and settings that
    /// need a restart.
    Reload,
    /// End the daemon as SIGTERM does, handing its state over: it stops serving, writes every
    /// client's pools and pages to --state-file and exits (refused without --state-file).
    Handover,
}

/// One client as `list-clients` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub name: String,
    /// The socket path, or `fd:N` for an inherited socket.
    pub socket: String,
    pub connected: bool,
    /// Being removed: waiting for its connection to end.
    #[serde(default)]
    pub removing: bool,
    /// Unix time (seconds) since which its pools wait for their driver to reconnect (freed
    /// after the orphan timeout); `None` when it is not orphaned.
    #[serde(default)]
    pub orphaned_since: Option<u64>,
    pub pools: u64,
    /// Pages stored in its private pools.
    pub pages: u64,
    /// Bytes charged to it (its quota and share bound these).
    pub charged_bytes: u64,
    pub quota_bytes: u64,
    pub weight: u32,
}

/// What removing a client freed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub client: String,
    /// Whether a connected frontend was disconnected (`--force`).
    pub disconnected: bool,
    pub pools: u64,
    pub persistent_pages: u64,
    pub ephemeral_pages: u64,
    /// Its pages in shared pools (other members keep the pools).
    pub shared_pages: u64,
    /// Memory given back (payload and metadata).
    pub bytes: u64,
}

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Settings changed, one line each (`a: quota 32 MiB -> 48 MiB`).
    pub changed: Vec<String>,
    /// Clients added.
    pub added: Vec<String>,
    /// Clients the daemon serves that the file does not name: a reload never removes one
    /// (`remove-client` does).
    pub not_in_file: Vec<String>,
    /// Settings changed in the file that apply only at the next start.
    pub needs_restart: Vec<String>,
}

/// The daemon's clients, as the control socket manages them (the daemon implements this;
/// the control module only carries the requests).
pub trait ClientAdmin: Send + Sync + std::fmt::Debug {
    /// Adds and serves a client given as a `--client` spec.
    fn add_client(&self, spec: &str) -> Result<(), String>;
    /// Ends a client's frontend connection (an error if none is connected).
    fn disconnect(&self, name: &str) -> Result<(), String>;
    /// Stops serving a client and frees everything it holds.
    fn remove_client(&self, name: &str, force: bool) -> Result<Removed, String>;
    /// Every client served.
    fn list_clients(&self) -> Vec<ClientInfo>;
    /// Re-reads the configuration file and applies it.
    fn reload(&self) -> Result<ReloadReport, String>;
    /// Starts the handover to a successor (the daemon then ends).
    fn handover(&self) -> Result<(), String>;
}

/// An age in the largest whole unit: `45s`, `12m`, `3h`, `2d`.
fn age_text(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// An answer's client list, removal or reload report as text for people (`vhost-tmem ctl`);
/// empty for the other answers.
pub fn describe(r: &Response) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(list) = &r.clients {
        let _ = writeln!(
            out,
            "{:<16} {:<13} {:>5} {:>10} {:>10} {:>10} {:>6}  SOCKET",
            "NAME", "STATE", "POOLS", "PAGES", "CHARGED", "QUOTA", "WEIGHT"
        );
        for c in list {
            let state = if c.removing {
                "removing".to_string()
            } else if c.connected {
                "connected".to_string()
            } else if let Some(since) = c.orphaned_since {
                let now = crate::store::stats::unix_seconds(std::time::SystemTime::now());
                format!("orphaned {}", age_text(now.saturating_sub(since)))
            } else {
                "not connected".to_string()
            };
            let quota = if c.quota_bytes == 0 {
                "none".to_string()
            } else {
                format_size(c.quota_bytes)
            };
            let _ = writeln!(
                out,
                "{:<16} {:<13} {:>5} {:>10} {:>10} {:>10} {:>6}  {}",
                c.name,
                state,
                c.pools,
                c.pages,
                format_size(c.charged_bytes),
                quota,
                c.weight,
                c.socket
            );
        }
    }
    if let Some(x) = &r.removed {
        let _ = writeln!(
            out,
            "removed client {}{}: {} pools, {} persistent pages, {} ephemeral pages, {} pages \
             in shared pools, {} freed",
            x.client,
            if x.disconnected {
                " (its frontend was disconnected)"
            } else {
                ""
            },
            x.pools,
            x.persistent_pages,
            x.ephemeral_pages,
            x.shared_pages,
            format_size(x.bytes)
        );
    }
    if let Some(x) = &r.reload {
        if x.changed.is_empty() && x.added.is_empty() {
            let _ = writeln!(out, "reloaded: nothing changed");
        }
        for c in &x.changed {
            let _ = writeln!(out, "changed: {c}");
        }
        for c in &x.added {
            let _ = writeln!(out, "added: {c}");
        }
        for c in &x.not_in_file {
            let _ = writeln!(
                out,
                "kept: {c} is not in the configuration file (ctl remove-client {c} removes it)"
            );
        }
        for c in &x.needs_restart {
            let _ = writeln!(out, "not applied: {c}");
        }
    }
    out
}

/// `vhost-tmem ctl shrink` targets: a number of pages, or `none`.
fn pages_arg(s: &str) -> Result<Option<u64>, String> {
    match s {
        "none" => Ok(None),
        p => p
            .parse()
            .map(Some)
            .map_err(|_| "expected a number of pages or \"none\"".to_string()),
    }
}

/// A control response.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<StoreStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<ClientInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed: Option<Removed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReport>,
}

/// What the control server acts on.
#[derive(Debug, Clone)]
pub struct Controls {
    pub engine: Arc<Engine>,
    /// Adding, removing, listing clients and reloading; without it those are refused.
    pub admin: Option<Arc<dyn ClientAdmin>>,
}

impl Controls {
    /// Carries out one request.
    pub fn handle(&self, req: Request) -> Response {
        match self.try_handle(req) {
            Ok(r) => r,
            Err(e) => Response {
                ok: false,
                error: Some(e),
                ..Response::default()
            },
        }
    }

    fn admin(&self) -> Result<&dyn ClientAdmin, String> {
        self.admin
            .as_deref()
            .ok_or_else(|| "this daemon does not manage clients at run time".to_string())
    }

    fn try_handle(&self, req: Request) -> Result<Response, String> {
        let e = &self.engine;
        let client = |name: &str| {
            e.client(name)
                .ok_or_else(|| format!("no client named \"{name}\""))
        };
        let uuid = |s: &str| parse_uuid(s).ok_or_else(|| format!("invalid UUID \"{s}\""));
        let mut r = Response {
            ok: true,
            ..Response::default()
        };
        match req {
            Request::Stats => r.stats = Some(e.stats()),
            Request::Freeze { client: c } => e.set_frozen(&*client(&c)?, true),
            Request::Thaw { client: c } => e.set_frozen(&*client(&c)?, false),
            Request::Flush { client: c } => r.value = Some(e.flush_client_ephemeral(&*client(&c)?)),
            Request::Weight { client: c, weight } => {
                let weight = check_weight(weight).map_err(|err| err.to_string())?;
                e.set_weight(&*client(&c)?, weight)
            }
            Request::Quota { client: c, bytes } => e.set_quota(&*client(&c)?, bytes),
            Request::Authorize { client: c, uuid: u } => {
                e.set_shared_auth(&*client(&c)?, uuid(&u)?, true)
            }
            Request::Revoke { client: c, uuid: u } => {
                e.set_shared_auth(&*client(&c)?, uuid(&u)?, false)
            }
            Request::Limit { bytes } => {
                e.set_memory_limit(check_memory_limit(bytes).map_err(|err| err.to_string())?)
            }
            Request::Shrink { client: c, pages } => {
                client(&c)?.set_shrink_target(pages.unwrap_or(u64::MAX))
            }
            Request::AddClient { spec } => self.admin()?.add_client(&spec)?,
            Request::Disconnect { client } => self.admin()?.disconnect(&client)?,
            Request::RemoveClient { client, force } => {
                r.removed = Some(self.admin()?.remove_client(&client, force)?)
            }
            Request::ListClients => r.clients = Some(self.admin()?.list_clients()),
            Request::Reload => r.reload = Some(self.admin()?.reload()?),
            Request::Handover => self.admin()?.handover()?,
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket's JSON is an interface (scripts, tmem-vmtest): it must not drift.
    #[test]
    fn wire_format() {
        let c = || "vm1".to_string();
        let u = || "12345678-9abc-def0-0001-0203040506ff".to_string();
        let cases = [
            (Request::Stats, r#"{"cmd":"stats"}"#),
            (
                Request::Freeze { client: c() },
                r#"{"cmd":"freeze","client":"vm1"}"#,
            ),
            (
                Request::Thaw { client: c() },
                r#"{"cmd":"thaw","client":"vm1"}"#,
            ),
            (
                Request::Flush { client: c() },
                r#"{"cmd":"flush","client":"vm1"}"#,
            ),
            (
                Request::Weight {
                    client: c(),
                    weight: 200,
                },
                r#"{"cmd":"weight","client":"vm1","weight":200}"#,
            ),
            (
                Request::Quota {
                    client: c(),
                    bytes: 8 << 20,
                },
                r#"{"cmd":"quota","client":"vm1","bytes":8388608}"#,
            ),
            (
                Request::Authorize {
                    client: c(),
                    uuid: u(),
                },
                r#"{"cmd":"authorize","client":"vm1","uuid":"12345678-9abc-def0-0001-0203040506ff"}"#,
            ),
            (
                Request::Revoke {
                    client: c(),
                    uuid: u(),
                },
                r#"{"cmd":"revoke","client":"vm1","uuid":"12345678-9abc-def0-0001-0203040506ff"}"#,
            ),
            (
                Request::Limit { bytes: 1 << 30 },
                r#"{"cmd":"limit","bytes":1073741824}"#,
            ),
            (
                Request::Shrink {
                    client: c(),
                    pages: Some(5),
                },
                r#"{"cmd":"shrink","client":"vm1","pages":5}"#,
            ),
            (
                Request::Shrink {
                    client: c(),
                    pages: None,
                },
                r#"{"cmd":"shrink","client":"vm1","pages":null}"#,
            ),
            (
                Request::AddClient {
                    spec: "name=vm3,socket=/run/vm3.sock".into(),
                },
                r#"{"cmd":"add-client","spec":"name=vm3,socket=/run/vm3.sock"}"#,
            ),
            (
                Request::Disconnect { client: c() },
                r#"{"cmd":"disconnect","client":"vm1"}"#,
            ),
            (
                Request::RemoveClient {
                    client: c(),
                    force: true,
                },
                r#"{"cmd":"remove-client","client":"vm1","force":true}"#,
            ),
            (Request::ListClients, r#"{"cmd":"list-clients"}"#),
            (Request::Reload, r#"{"cmd":"reload"}"#),
            (Request::Handover, r#"{"cmd":"handover"}"#),
        ];
        // A removal without force is not forced.
        let r: Request = serde_json::from_str(r#"{"cmd":"remove-client","client":"vm1"}"#).unwrap();
        assert!(matches!(r, Request::RemoveClient { force: false, .. }));
        // A shrink without pages clears the target, as `none` does.
        let r: Request = serde_json::from_str(r#"{"cmd":"shrink","client":"vm1"}"#).unwrap();
        assert!(matches!(r, Request::Shrink { pages: None, .. }));
        for (req, json) in cases {
            assert_eq!(serde_json::to_string(&req).unwrap(), json);
            let back: Request = serde_json::from_str(json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        let ok = Response {
            ok: true,
            value: Some(3),
            ..Response::default()
        };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"ok":true,"value":3}"#
        );
        let refused = Response {
            ok: false,
            error: Some("no".into()),
            ..Response::default()
        };
        assert_eq!(
            serde_json::to_string(&refused).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
    }
}
