// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Why the lab refused an experiment or could not run it.

use std::path::PathBuf;

/// Errors of `vhost-tmem-lab`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML or serde: the message names the key and its line.
    #[error("{0}")]
    Toml(String),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{key}: {why}")]
    Invalid { key: String, why: String },
    #[error("the experiment does not fit on this machine: {0}")]
    DoesNotFit(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
    #[error("{0}")]
    Vm(#[from] tmem_vmtest::error::Error),
    #[error("daemon: {0}")]
    Daemon(#[source] tmem_testguest::daemon::Error),
    #[error("signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// Result of the lab.
pub type Result<T> = std::result::Result<T, Error>;
