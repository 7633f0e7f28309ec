// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control socket's serving side: a thread that accepts connections and answers each
//! request line with one response line.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use super::conn::{self, Deadline, RateLimited, Slots};
use super::{Controls, Error, Request, Response};
use crate::sock::PeerCred;

/// Who may use the control socket: it changes limits, so not every process of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The daemon's uid.
    pub owner: u32,
    /// A group whose members may use it too.
    pub group: Option<u32>,
}

impl Access {
    /// Root, the daemon's user, and members (primary or supplementary) of the group.
    pub fn allows(&self, p: &PeerCred) -> bool {
        p.uid == 0
            || p.uid == self.owner
            || self
                .group
                .is_some_and(|g| p.gid == g || p.groups.contains(&g))
    }
}

/// A bound control socket not served yet: the daemon binds everything, confines itself
/// (sandbox), then starts serving.
#[derive(Debug)]
pub struct BoundControl {
    controls: Controls,
    listener: UnixListener,
    claim: crate::sock::Claim,
    group: Option<u32>,
}

impl Controls {
    /// Serves the control socket until the process exits: its file is 0600, or 0660 for
    /// `group`, whose members may then use it besides root and the daemon's user.
    pub fn serve(
        self,
        path: &Path,
        group: Option<u32>,
    ) -> Result<std::thread::JoinHandle<()>, Error> {
        self.bind(path, group)?.spawn()
    }

    /// Binds the control socket (see [`Controls::serve`]) without serving it yet.
    pub fn bind(self, path: &Path, group: Option<u32>) -> Result<BoundControl, Error> {
        let (fd, claim) = crate::sock::bind(path, group)?;
        Ok(BoundControl {
            controls: self,
            listener: UnixListener::from(fd),
            claim,
            group,
        })
    }
}

impl BoundControl {
    /// Serves the socket on a thread of its own until the process exits.
    pub fn spawn(self) -> Result<std::thread::JoinHandle<()>, Error> {
        let BoundControl {
            controls,
            listener,
            claim,
            group,
        } = self;
        let access = Access {
            // The daemon's user as it serves (after a --user drop, not root's).
            // SAFETY: geteuid has no preconditions.
            owner: unsafe { libc::geteuid() },
            group,
        };
        let handle = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                // The claim lives as long as the socket is served.
                let _claim = claim;
                let slots = Slots::default();
                let busy = RateLimited::default();
                let refused = Arc::new(RateLimited::default());
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => {
                            let (this, refused) = (controls.clone(), refused.clone());
                            conn::dispatch(&slots, "control-conn", s, &busy, move |s| {
                                if let Err(e) = this.session(s, access, &refused) {
                                    tracing::debug!("control connection: {e}");
                                }
                            });
                        }
                        Err(e) => busy.log(|n| {
                            tracing::warn!("control socket accept failed ({n} times): {e}")
                        }),
                    }
                }
            })?;
        Ok(handle)
    }
}

impl Controls {
    /// Answers one request line (JSON) as the control socket does: a line that is not a
    /// request gets an error response, never a closed connection.
    pub fn answer(&self, line: &str) -> Response {
        match serde_json::from_str::<Request>(line) {
            Ok(req) => self.handle(req),
            Err(e) => Response {
                ok: false,
                error: Some(format!("bad request: {e}")),
                ..Response::default()
            },
        }
    }

    fn session(&self, stream: UnixStream, access: Access, refused: &RateLimited) -> io::Result<()> {
        let deadline = Deadline::start();
        stream.set_write_timeout(deadline.next_timeout())?;
        let mut out = stream.try_clone()?;
        let peer = crate::sock::peer_cred(&stream)?;
        if !access.allows(&peer) {
            refused.log(|n| {
                tracing::warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "control connection refused ({n} in the last second or so): not root, \
                     the daemon's user or a member of --control-group"
                )
            });
            let resp = Response {
                ok: false,
                error: Some(format!(
                    "permission denied: uid {} is not allowed on this control socket",
                    peer.uid
                )),
                ..Response::default()
            };
            send(&mut out, &resp)?;
            // Let the peer finish sending its request (bounded), so that it reads this answer
            // rather than a broken pipe.
            out.shutdown(std::net::Shutdown::Write)?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
            let _ = io::copy(&mut (&stream).take(64 * 1024), &mut io::sink());
            return Ok(());
        }
        // Bounded lines: a request is small, a runaway writer is cut off.
        let mut reader = BufReader::new((&stream).take(64 * 1024));
        let mut line = String::new();
        loop {
            // Every read and write is bounded, and so is the whole session: a peer that does
            // not read its answers, or trickles its requests, only holds its own thread.
            let Some(t) = deadline.next_timeout() else {
                return Ok(());
            };
            stream.set_read_timeout(Some(t))?;
            stream.set_write_timeout(Some(t))?;
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line.trim().is_empty() {
                continue;
            }
            send(&mut out, &self.answer(&line))?;
        }
    }
}

fn send(out: &mut UnixStream, resp: &Response) -> io::Result<()> {
    let mut text = serde_json::to_string(resp).map_err(io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())
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
        Controls {
            engine,
            admin: None,
        }
    }

    #[test]
    fn socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let c = controls();
        let vm1 = c.engine.client("vm1").unwrap();
        c.serve(&path, None).unwrap();
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

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> PeerCred {
        PeerCred {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    /// The credential check with synthetic credentials (the e2e test runs a real peer as
    /// another user where it can).
    #[test]
    fn access_root_owner_and_group_only() {
        let a = Access {
            owner: 1000,
            group: None,
        };
        assert!(a.allows(&peer(0, 0, &[])));
        assert!(a.allows(&peer(1000, 1000, &[])));
        assert!(!a.allows(&peer(1001, 1000, &[1000])));
        let g = Access {
            owner: 1000,
            group: Some(64),
        };
        assert!(g.allows(&peer(1001, 64, &[])));
        assert!(g.allows(&peer(1001, 100, &[5, 64])));
        assert!(!g.allows(&peer(1001, 100, &[5, 65])));
        assert!(!g.allows(&peer(65534, 65534, &[])));
    }

    /// A peer that sends requests without reading answers holds only its own connection.
    #[test]
    fn a_peer_not_reading_does_not_block_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        controls().serve(&path, None).unwrap();
        let mut hog = UnixStream::connect(&path).unwrap();
        hog.write_all("{\"cmd\":\"stats\"}\n".repeat(3000).as_bytes())
            .unwrap();
        for _ in 0..3 {
            request(&path, &Request::Stats).unwrap();
        }
        drop(hog);
    }
}
