// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control interface: a Unix socket speaking one JSON request and one JSON response per
//! line, and the Prometheus text exposition of the same statistics.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::stats::StoreStats;
use crate::store::{parse_uuid, Engine};

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
                if !(1..=10_000).contains(&weight) {
                    return Err(format!("invalid weight {weight}: must be 1..=10000"));
                }
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
                if bytes < 2 * shared_proto::PAGE_SIZE as u64 {
                    return Err(format!("memory limit {bytes} is below two pages"));
                }
                e.set_memory_limit(bytes)
            }
            Request::Shrink { client: c, pages } => {
                client(&c)?.set_shrink_target(pages.unwrap_or(u64::MAX))
            }
        }
        Ok(r)
    }

    /// Serves the control socket until the process exits.
    pub fn serve(self, path: &Path) -> Result<std::thread::JoinHandle<()>, Error> {
        crate::daemon::remove_stale_socket(path).map_err(|source| Error::Bind {
            path: path.to_owned(),
            source,
        })?;
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.to_owned(),
            source,
        })?;
        let handle = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => {
                            if let Err(e) = self.session(s) {
                                tracing::debug!("control connection: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("control socket accept failed: {e}"),
                    }
                }
            })?;
        Ok(handle)
    }

    fn session(&self, stream: UnixStream) -> io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut out = stream.try_clone()?;
        // Bounded lines: a request is small, a runaway writer is cut off.
        let reader = BufReader::new(stream.take(64 * 1024));
        for line in reader.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => self.handle(req),
                Err(e) => Response {
                    ok: false,
                    error: Some(format!("bad request: {e}")),
                    ..Response::default()
                },
            };
            let mut text = serde_json::to_string(&resp).map_err(io::Error::other)?;
            text.push('\n');
            out.write_all(text.as_bytes())?;
        }
        Ok(())
    }
}

/// Sends one request to a daemon's control socket and returns its answer.
pub fn request(path: &Path, req: &Request) -> Result<Response, Error> {
    let mut s = UnixStream::connect(path).map_err(|source| Error::Connect {
        path: path.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req).map_err(io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    let resp: Response = serde_json::from_str(&answer).map_err(Error::BadAnswer)?;
    if !resp.ok {
        return Err(Error::Refused(resp.error.unwrap_or_default()));
    }
    Ok(resp)
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders statistics in the Prometheus text exposition format (version 0.0.4).
pub fn prometheus(s: &StoreStats) -> String {
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
        let _ = writeln!(o, "# HELP vhost_tmem_{name} {help}");
        let _ = writeln!(o, "# TYPE vhost_tmem_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(o, "vhost_tmem_{name}{labels} {v}");
        }
    };
    metric(
        "memory_limit_bytes",
        "gauge",
        "Global memory limit.",
        &[(String::new(), s.memory_limit_bytes)],
    );
    metric(
        "memory_used_bytes",
        "gauge",
        "Memory used by stored pages, payload and metadata.",
        &[(String::new(), s.memory_used_bytes)],
    );
    let client_rows = |i: usize| -> Vec<(String, u64)> {
        s.clients
            .iter()
            .map(|c| {
                (
                    format!("{{client=\"{}\"}}", escape_label(&c.name)),
                    c.counters.fields()[i].1,
                )
            })
            .collect()
    };
    let fields = crate::store::stats::CounterSnapshot::default().fields();
    for (i, (name, _, counter)) in fields.iter().enumerate() {
        let (n, kind) = if *counter {
            (format!("client_{name}_total"), "counter")
        } else {
            (format!("client_{name}"), "gauge")
        };
        metric(
            &n,
            kind,
            &format!("Per-client {}.", name.replace('_', " ")),
            &client_rows(i),
        );
    }
    let connected: Vec<_> = s
        .clients
        .iter()
        .map(|c| {
            (
                format!("{{client=\"{}\"}}", escape_label(&c.name)),
                c.connected as u64,
            )
        })
        .collect();
    metric(
        "client_connected",
        "gauge",
        "Whether a frontend is connected.",
        &connected,
    );
    for (i, (name, _, counter)) in fields.iter().enumerate() {
        let rows: Vec<_> = s
            .clients
            .iter()
            .flat_map(|c| {
                c.pools.iter().map(move |p| {
                    (
                        format!(
                            "{{client=\"{}\",pool=\"{}\",kind=\"{}\"}}",
                            escape_label(&c.name),
                            p.id,
                            p.kind
                        ),
                        p.counters.fields()[i].1,
                    )
                })
            })
            .collect();
        let (n, kind) = if *counter {
            (format!("pool_{name}_total"), "counter")
        } else {
            (format!("pool_{name}"), "gauge")
        };
        metric(
            &n,
            kind,
            &format!("Per-pool {}.", name.replace('_', " ")),
            &rows,
        );
    }
    o
}

/// Serves `GET /metrics` on `addr` until the process exits.
pub fn serve_metrics(
    engine: Arc<Engine>,
    addr: SocketAddr,
) -> Result<std::thread::JoinHandle<()>, Error> {
    let listener = TcpListener::bind(addr).map_err(|source| Error::BindMetrics { addr, source })?;
    let handle = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if req.starts_with("GET ") && (path == "/metrics" || path == "/") {
                    ("200 OK", prometheus(&engine.stats()))
                } else {
                    ("404 Not Found", "not found: try /metrics\n".to_string())
                };
                let _ = write!(
                    s,
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ClientConfig, EngineConfig};

    fn controls() -> Controls {
        let engine = Arc::new(Engine::new(EngineConfig::default()));
        engine.add_client(ClientConfig::named("vm1"));
        Controls { engine }
    }

    #[test]
    fn socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let c = controls();
        let vm1 = c.engine.client("vm1").unwrap();
        c.serve(&path).unwrap();
        let r = request(&path, &Request::Stats).unwrap();
        assert_eq!(r.stats.unwrap().clients[0].name, "vm1");
        request(
            &path,
            &Request::Freeze {
                client: "vm1".into(),
            },
        )
        .unwrap();
        let r = request(&path, &Request::Stats).unwrap();
        assert!(r.stats.unwrap().clients[0].frozen);
        request(
            &path,
            &Request::Shrink {
                client: "vm1".into(),
                pages: Some(5),
            },
        )
        .unwrap();
        assert_eq!(vm1.shrink_target(), 5);
        let e = request(
            &path,
            &Request::Thaw {
                client: "nobody".into(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("no client named \"nobody\""), "{e}");
        let e = request(
            &path,
            &Request::Weight {
                client: "vm1".into(),
                weight: 0,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid weight"), "{e}");
        // Garbage gets an error answer, not a dead server.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{not json\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut a = String::new();
        BufReader::new(s).read_line(&mut a).unwrap();
        assert!(
            a.contains("\"ok\":false") && a.contains("bad request"),
            "{a}"
        );
        request(&path, &Request::Stats).unwrap();
    }

    #[test]
    fn prometheus_text() {
        let c = controls();
        let text = prometheus(&c.engine.stats());
        assert!(text.contains("# TYPE vhost_tmem_client_puts_total counter"));
        assert!(text.contains("vhost_tmem_client_puts_total{client=\"vm1\"} 0"));
        assert!(text.contains("vhost_tmem_memory_limit_bytes 1073741824"));
        assert_eq!(escape_label("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
