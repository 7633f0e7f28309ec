// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The statistics in the Prometheus text exposition format (prometheus-client's 0.0.4
//! encoder), for `vhost-tmem stats --prometheus` and the `--metrics-listen` HTTP endpoint
//! (requests parsed with httparse, served by the bounded connection threads of `conn.rs`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::conn::{self, Deadline, RateLimited, Slots};
use super::Error;
use crate::store::stats::StoreStats;
use crate::store::Engine;

/// Renders statistics in the Prometheus text exposition format (version 0.0.4), with the
/// `prometheus-client` crate's encoder.
pub fn prometheus(s: &StoreStats) -> String {
    let mut registry = Registry::with_prefix("vhost_tmem");
    registry.register_collector(Box::new(Snapshot(s.clone())));
    let mut o = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut o, &registry);
    o
}

/// One snapshot of the statistics, encoded on scrape.
#[derive(Debug)]
struct Snapshot(StoreStats);

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: `name` gets the `_total` suffix from the encoder if a counter.
fn family(
    e: &mut DescriptorEncoder,
    name: &str,
    counter: bool,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let kind = if counter {
        MetricType::Counter
    } else {
        MetricType::Gauge
    };
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let f = m.encode_family(labels)?;
        if counter {
            ConstCounter::new(*v).encode(f)?;
        } else {
            ConstGauge::new(*v).encode(f)?;
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        family(
            &mut e,
            "memory_limit_bytes",
            false,
            "Global memory limit.",
            &[(vec![], s.memory_limit_bytes)],
        )?;
        family(
            &mut e,
            "memory_used_bytes",
            false,
            "Memory used by stored pages, payload and metadata.",
            &[(vec![], s.memory_used_bytes)],
        )?;
        let client = |c: &crate::store::stats::ClientStats| vec![("client", c.name.clone())];
        let fields = crate::store::stats::CounterSnapshot::default().fields();
        for (i, (name, _, counter)) in fields.iter().enumerate() {
            let rows: Vec<_> = s
                .clients
                .iter()
                .map(|c| (client(c), c.counters.fields()[i].1))
                .collect();
            let help = format!("Per-client {}.", name.replace('_', " "));
            family(&mut e, &format!("client_{name}"), *counter, &help, &rows)?;
        }
        let rows: Vec<_> = s
            .clients
            .iter()
            .map(|c| (client(c), c.connected as u64))
            .collect();
        family(
            &mut e,
            "client_connected",
            false,
            "Whether a frontend is connected.",
            &rows,
        )?;
        let rows: Vec<_> = s
            .clients
            .iter()
            .map(|c| (client(c), c.orphaned_since.is_some() as u64))
            .collect();
        family(
            &mut e,
            "client_orphaned",
            false,
            "Whether the client holds pools kept for a reconnect that no driver has claimed.",
            &rows,
        )?;
        for (i, (name, _, counter)) in fields.iter().enumerate() {
            let rows: Vec<_> = s
                .clients
                .iter()
                .flat_map(|c| {
                    c.pools.iter().map(move |p| {
                        (
                            vec![
                                ("client", c.name.clone()),
                                ("pool", p.id.to_string()),
                                ("kind", p.kind.to_string()),
                            ],
                            p.counters.fields()[i].1,
                        )
                    })
                })
                .collect();
            let help = format!("Per-pool {}.", name.replace('_', " "));
            family(&mut e, &format!("pool_{name}"), *counter, &help, &rows)?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` on `addr` until the process exits: a thread per connection (at most
/// [`conn::MAX_CONNECTIONS`]), each read and write time-bounded, one request per connection.
pub fn serve_metrics(
    engine: Arc<Engine>,
    addr: SocketAddr,
) -> Result<std::thread::JoinHandle<()>, Error> {
    bind_metrics(addr)?.spawn(engine)
}

/// The metrics listener, bound but not served yet (the daemon confines itself in between).
#[derive(Debug)]
pub struct MetricsListener(TcpListener);

/// Binds the metrics listener of [`serve_metrics`].
pub fn bind_metrics(addr: SocketAddr) -> Result<MetricsListener, Error> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "--metrics-listen {addr} is not a loopback address: anyone who can reach it reads \
             the statistics (client names, memory use); prefer 127.0.0.1 or a firewall"
        );
    }
    let listener = TcpListener::bind(addr).map_err(|source| Error::BindMetrics { addr, source })?;
    Ok(MetricsListener(listener))
}

impl MetricsListener {
    /// Serves `/metrics` on a thread of its own until the process exits.
    pub fn spawn(self, engine: Arc<Engine>) -> Result<std::thread::JoinHandle<()>, Error> {
        let listener = self.0;
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
    }

    /// The encoder change kept every name, label, help line and value.
    #[test]
    fn same_text_as_before() {
        use crate::store::{PoolSpec, Tmem};
        let engine = Engine::new(EngineConfig::default());
        let a = engine.add_client(ClientConfig::named("vm1"));
        let b = engine.add_client(ClientConfig::named("we\"ird\\name"));
        for (c, persistent) in [(&a, true), (&a, false), (&b, true)] {
            engine
                .create_pool(
                    c,
                    PoolSpec {
                        persistent,
                        shared: None,
                    },
                )
                .unwrap();
        }
        b.set_connected(true);
        let st = engine.stats();
        // Checked line for line against the hand-written renderer the encoder replaced; these
        // are the lines scrapers and tests depend on.
        let text = prometheus(&st);
        for line in [
            "# HELP vhost_tmem_memory_limit_bytes Global memory limit.\n\
             # TYPE vhost_tmem_memory_limit_bytes gauge\n\
             vhost_tmem_memory_limit_bytes 1073741824\n",
            "# HELP vhost_tmem_client_puts_total Per-client puts.\n\
             # TYPE vhost_tmem_client_puts_total counter\n\
             vhost_tmem_client_puts_total{client=\"vm1\"} 0\n\
             vhost_tmem_client_puts_total{client=\"we\\\"ird\\\\name\"} 0\n",
            "# TYPE vhost_tmem_client_stored_pages gauge\n",
            "vhost_tmem_client_connected{client=\"we\\\"ird\\\\name\"} 1\n",
            "# HELP vhost_tmem_pool_stored_pages Per-pool stored pages.\n\
             # TYPE vhost_tmem_pool_stored_pages gauge\n\
             vhost_tmem_pool_stored_pages{client=\"vm1\",pool=\"0\",kind=\"persistent\"} 0\n\
             vhost_tmem_pool_stored_pages{client=\"vm1\",pool=\"1\",kind=\"ephemeral\"} 0\n",
            "# TYPE vhost_tmem_pool_puts_total counter\n",
        ] {
            assert!(text.contains(line), "{line}\nnot in:\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
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
