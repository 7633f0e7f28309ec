// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The statistics in the Prometheus text exposition format, for `vhost-tmem stats --prometheus`
//! and the `--metrics-listen` HTTP endpoint.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use super::Error;
use crate::store::stats::StoreStats;
use crate::store::Engine;

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

    #[test]
    fn prometheus_text() {
        let engine = Engine::new(EngineConfig::default());
        engine.add_client(ClientConfig::named("vm1"));
        let text = prometheus(&engine.stats());
        assert!(text.contains("# TYPE vhost_tmem_client_puts_total counter"));
        assert!(text.contains("vhost_tmem_client_puts_total{client=\"vm1\"} 0"));
        assert!(text.contains("vhost_tmem_memory_limit_bytes 1073741824"));
        assert_eq!(escape_label("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
