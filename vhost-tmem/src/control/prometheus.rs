// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The statistics in the Prometheus text exposition format, for `vhost-tmem stats --prometheus`
//! and the `--metrics-listen` HTTP endpoint.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use super::conn::{self, Deadline, RateLimited, Slots};
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

/// Serves `GET /metrics` on `addr` until the process exits: a thread per connection (at most
/// [`conn::MAX_CONNECTIONS`]), each read and write time-bounded, one request per connection.
pub fn serve_metrics(
    engine: Arc<Engine>,
    addr: SocketAddr,
) -> Result<std::thread::JoinHandle<()>, Error> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "--metrics-listen {addr} is not a loopback address: anyone who can reach it reads \
             the statistics (client names, memory use); prefer 127.0.0.1 or a firewall"
        );
    }
    let listener = TcpListener::bind(addr).map_err(|source| Error::BindMetrics { addr, source })?;
    let handle = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let slots = Slots::default();
            let busy = RateLimited::default();
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        let engine = engine.clone();
                        conn::dispatch(&slots, "metrics-conn", s, &busy, move |s| {
                            if let Err(e) = answer(&engine, s) {
                                tracing::debug!("metrics connection: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        busy.log(|n| tracing::warn!("metrics accept failed ({n} times): {e}"))
                    }
                }
            }
        })?;
    Ok(handle)
}

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;

/// Reads one request and answers it; the connection then closes.
fn answer(engine: &Engine, mut s: TcpStream) -> io::Result<()> {
    let deadline = Deadline::start();
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let (version, status, body) = loop {
        let Some(t) = deadline.next_timeout() else {
            return Ok(());
        };
        s.set_read_timeout(Some(t))?;
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let version = req.version.unwrap_or(0);
                break match (req.method, req.path) {
                    (Some("GET"), Some("/metrics" | "/")) => {
                        (version, "200 OK", prometheus(&engine.stats()))
                    }
                    (Some("GET"), _) => {
                        (version, "404 Not Found", "not found: try /metrics\n".into())
                    }
                    _ => (version, "405 Method Not Allowed", "only GET\n".into()),
                };
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            Ok(httparse::Status::Partial) => {
                break (0, "431 Request Header Fields Too Large", String::new())
            }
            Err(_) => break (0, "400 Bad Request", String::new()),
        }
    };
    s.set_write_timeout(deadline.next_timeout())?;
    write!(
        s,
        "HTTP/1.{version} {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // Close gently: unread request bytes (an oversized head) would otherwise make the kernel
    // reset the connection and the peer could lose the answer. Bounded in bytes and time.
    s.shutdown(std::net::Shutdown::Write)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let _ = io::copy(&mut (&mut s).take(64 * 1024), &mut io::sink());
    Ok(())
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

    fn get(port: u16, req: &[u8]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s.write_all(req).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    }

    #[test]
    fn http_endpoint() {
        let engine = Arc::new(Engine::new(EngineConfig::default()));
        engine.add_client(ClientConfig::named("vm1"));
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        serve_metrics(engine, SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
        // Idle connections hold their own threads only.
        let idle: Vec<_> = (0..4)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let r = get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains("vhost_tmem_client_puts_total{client=\"vm1\"} 0"),
            "{r}"
        );
        // A head in two pieces.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET / HTT").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.write_all(b"P/1.0\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.starts_with("HTTP/1.0 200 OK"), "{r}");
        assert!(get(port, b"GET /x HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
        assert!(get(port, b"POST /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 405"));
        assert!(get(port, b"\x01\x02 nonsense\r\n\r\n").starts_with("HTTP/1.0 400"));
        let huge = [b"GET /metrics HTTP/1.0\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
        assert!(get(port, &huge).starts_with("HTTP/1.0 431"));
        drop(idle);
    }
}
