// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target `config`: the command line and the TOML configuration file.
//!
//! The input is a configuration file, a NUL byte, then command-line arguments separated by
//! NUL bytes (any bytes, UTF-8 or not). The file is written where `--config` finds it (the
//! harness owns that option, so no input reads any other file) and the arguments go through
//! clap (`Cli`) and `DaemonConfig::try_from`, as `main` does. Oracles: no panic; an error
//! says something; an accepted configuration holds every range the daemon relies on (memory
//! limit, weights, raw threshold, pool count, poll window, queues, client names unique and
//! valid, sockets unique); and a `ctl` action is a control request that survives the socket's
//! JSON round trip.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use clap::Parser;
use vhost_tmem::config::{Cli, Command, DaemonConfig, Endpoint, MAX_POLL_US};
use vhost_tmem::control::Request;
use vhost_tmem::store::{check_memory_limit, check_weight};

/// Where the input's configuration file goes (one per process).
fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temporary directory");
            let path = dir.path().join("vhost-tmem.toml");
            (dir, path)
        })
        .1
}

/// Runs one input; panics on a finding.
pub fn run(data: &[u8]) {
    let mut parts = data.split(|&b| b == 0);
    let file = parts.next().unwrap_or_default();
    let mut args: Vec<OsString> = vec!["vhost-tmem".into()];
    if !file.is_empty() {
        std::fs::write(config_path(), file).expect("write the configuration file");
        args.push("--config".into());
        args.push(config_path().into());
    }
    args.extend(
        parts
            .take(64)
            .filter(|a| !a.starts_with(b"--config"))
            .map(|a| OsString::from_vec(a.to_vec())),
    );
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            // Help and version are not errors, but every outcome must say something.
            assert!(
                !e.to_string().is_empty(),
                "a silent clap error for {args:?}"
            );
            return;
        }
    };
    match cli.command {
        Some(Command::Ctl { action, .. }) => {
            let json = serde_json::to_string(&action).expect("a request serializes");
            let back: Request = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("ctl sends {json}, which the daemon refuses: {e}"));
            assert_eq!(serde_json::to_string(&back).expect("serializes"), json);
        }
        Some(Command::Stats { .. }) => {}
        None => match DaemonConfig::try_from(cli.serve) {
            Err(e) => assert!(!e.to_string().is_empty(), "a silent error for {args:?}"),
            Ok(c) => check(&c, &args),
        },
    }
}

/// The ranges an accepted configuration must hold.
fn check(c: &DaemonConfig, args: &[OsString]) {
    let e = &c.engine;
    assert!(
        check_memory_limit(e.memory_limit).is_ok(),
        "{args:?}: {c:?}"
    );
    assert!((64..=4096).contains(&e.raw_threshold), "{args:?}: {c:?}");
    assert!((1..=1024).contains(&e.max_pools), "{args:?}: {c:?}");
    assert!(c.device.validate().is_ok(), "{args:?}: {c:?}");
    assert!(
        c.device.poll.as_micros() <= MAX_POLL_US as u128,
        "{args:?}: {c:?}"
    );
    assert_eq!(c.device.max_pools as usize, e.max_pools, "{args:?}");
    assert!(!c.clients.is_empty(), "{args:?}: no clients");
    let mut names = std::collections::HashSet::new();
    let mut paths = std::collections::HashSet::new();
    for s in &c.clients {
        let n = &s.config.name;
        assert!(
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "{args:?}: client name {n:?}"
        );
        assert!(names.insert(n.clone()), "{args:?}: two clients named {n}");
        assert!(check_weight(s.config.weight).is_ok(), "{args:?}: {s:?}");
        if let Endpoint::Path(p) = &s.endpoint {
            assert!(paths.insert(p.clone()), "{args:?}: two clients on {p:?}");
        }
    }
}
