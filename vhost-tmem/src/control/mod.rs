// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control interface: what a host administrator can ask a running daemon, as the requests
//! and answers a Unix socket carries, one JSON object per line each way.
//!
//! `server.rs` serves the socket, `client.rs` is the side of `vhost-tmem ctl` and `stats`, and
//! `prometheus.rs` renders the same statistics for Prometheus.

mod client;
mod prometheus;
mod server;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::stats::StoreStats;
use crate::store::{check_memory_limit, check_weight, parse_uuid, Engine};

pub use client::request;
pub use prometheus::{prometheus, serve_metrics};

/// Errors of the control interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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

/// A control request.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Stats,
    Freeze { client: String },
    Thaw { client: String },
    Flush { client: String },
    Weight { client: String, weight: u32 },
    Quota { client: String, bytes: u64 },
    Authorize { client: String, uuid: String },
    Revoke { client: String, uuid: String },
    Limit { bytes: u64 },
    Shrink { client: String, pages: Option<u64> },
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
}

/// What the control server acts on.
#[derive(Debug, Clone)]
pub struct Controls {
    pub engine: Arc<Engine>,
    /// Per client: the shrink target its device advertises.
    pub shrink: HashMap<String, Arc<AtomicU64>>,
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
                let weight = check_weight(weight).map_err(|e| e.to_string())?;
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
                e.set_memory_limit(check_memory_limit(bytes).map_err(|e| e.to_string())?)
            }
            Request::Shrink { client: c, pages } => {
                client(&c)?;
                let slot = self
                    .shrink
                    .get(&c)
                    .ok_or_else(|| format!("no device for \"{c}\""))?;
                slot.store(pages.unwrap_or(u64::MAX), Relaxed);
            }
        }
        Ok(r)
    }
}
