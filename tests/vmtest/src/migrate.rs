// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Migrating a test guest: QMP (QEMU's JSON control protocol) and what the migration
//! scenarios ask of it: a live migration to a second QEMU attached to a second daemon, or a
//! snapshot to a file restored by a fresh QEMU and daemon.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tmem_testguest::daemon::Daemon;

use crate::error::{Error, Result};

/// How long a migration may take before the runner gives up on it.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// How a scenario's guest moves at its `migrate` barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Live, to a QEMU started with `-incoming unix:...` against the target daemon.
    Live,
    /// `migrate file:`, then the source quits and a QEMU against the target daemon restores
    /// the file.
    Snapshot,
}

/// The migration of a scenario's guest.
#[derive(Debug)]
pub struct MigrateTo<'a> {
    pub kind: Kind,
    /// The daemon the guest's device is served by afterwards.
    pub daemon: &'a Daemon,
    /// The target cannot take the guest's pages: the migration must fail and the guest run on
    /// at the source.
    pub refused: bool,
}

/// What QEMU said about a finished migration.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub completed: bool,
    /// `query-migrate`'s whole answer, for the report and for failures.
    pub info: Value,
}

impl Outcome {
    /// A number of `query-migrate`'s answer, e.g. `downtime` or `ram.transferred`.
    pub fn n(&self, path: &str) -> u64 {
        path.split('.')
            .fold(&self.info, |v, k| &v[k])
            .as_u64()
            .unwrap_or(0)
    }
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (waiting up to 30 s for QEMU to create it) and
    /// leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(source) => {
                    return Err(Error::Path {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(Error::Process)?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().map_err(Error::Process)?),
            writer: stream,
            path: path.to_path_buf(),
        };
        // The greeting, then the negotiation.
        q.read()?;
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.error("QEMU closed the QMP connection".into())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| self.error(format!("unreadable QMP message {line:?}: {e}"))),
            Err(e) => Err(self.error(format!("reading QMP: {e}"))),
        }
    }

    fn error(&self, why: String) -> Error {
        Error::Qmp {
            socket: self.path.clone(),
            why,
        }
    }

    /// Runs a command; its `return` value, or its error as an [`Error::Qmp`]. Events that
    /// arrive meanwhile are skipped.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").map_err(|e| self.error(format!("{cmd}: {e}")))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(self.error(format!("{cmd}: {}", v["error"])));
        }
    }

    /// Starts a migration to `uri` (bandwidth unlimited, up to 1 s of downtime allowed, so
    /// that a busy TCG guest converges) and waits until it ends.
    pub fn migrate(&mut self, uri: &str) -> Result<Outcome> {
        self.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 4u64 << 30, "downtime-limit": 1000 }),
        )?;
        self.execute("migrate", json!({ "uri": uri }))?;
        self.wait_migration()
    }

    /// Waits until the migration (outgoing, or incoming on a target) completed or failed.
    pub fn wait_migration(&mut self) -> Result<Outcome> {
        let t0 = Instant::now();
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            match info["status"].as_str() {
                Some("completed") => {
                    return Ok(Outcome {
                        completed: true,
                        info,
                    })
                }
                Some("failed") | Some("cancelled") => {
                    return Ok(Outcome {
                        completed: false,
                        info,
                    })
                }
                _ if t0.elapsed() > MIGRATION_TIMEOUT => {
                    return Err(self.error(format!(
                        "the migration did not end in {} s: {info}",
                        MIGRATION_TIMEOUT.as_secs()
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The VM's run state (`running`, `postmigrate`, `inmigrate`, ...).
    pub fn status(&mut self) -> Result<String> {
        let v = self.execute("query-status", json!({}))?;
        Ok(v["status"].as_str().unwrap_or("?").to_string())
    }

    /// Asks QEMU to quit (the answer may not come: it is gone).
    pub fn quit(mut self) {
        let _ = writeln!(self.writer, "{}", json!({ "execute": "quit" }));
        let _ = self.read();
    }
}

/// The `device state saved` line of a daemon's log: (pages, payload bytes, stream bytes).
pub fn saved_state(log: &str) -> Option<(u64, u64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("device state saved"))?;
    let field = |k: &str| -> Option<u64> {
        let at = line.find(&format!("{k}="))? + k.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((
        field("pages")?,
        field("payload_bytes")?,
        field("stream_bytes")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_state_line_is_read() {
        let log = "2026-11-30T12:00:00Z  INFO vhost_tmem::vhu_tmem: device state saved: freed \
                   here when the frontend disconnects client=guest pools=2 pages=1234 \
                   payload_bytes=567890 stream_bytes=600000 ms=12\n";
        assert_eq!(saved_state(log), Some((1234, 567890, 600000)));
        assert_eq!(saved_state("nothing"), None);
    }

    #[test]
    fn outcome_numbers() {
        let o = Outcome {
            completed: true,
            info: json!({ "downtime": 120, "ram": { "transferred": 5000 } }),
        };
        assert_eq!((o.n("downtime"), o.n("ram.transferred")), (120, 5000));
        assert_eq!(o.n("ram.nothing"), 0);
    }
}
