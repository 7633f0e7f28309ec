// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's serving side: a thread that accepts connections and answers each
//! request line with one response line.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use super::{Controls, Error, Request, Response};

impl Controls {
    /// Serves the control socket until the process exits.
    pub fn serve(self, path: &Path) -> Result<std::thread::JoinHandle<()>, Error> {
        let claim = crate::sock::claim(path)?;
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.to_owned(),
            source,
        })?;
        let handle = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                // The claim lives as long as the socket is served.
                let _claim = claim;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::control::request;
    use crate::store::{ClientConfig, Engine, EngineConfig};

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
}
