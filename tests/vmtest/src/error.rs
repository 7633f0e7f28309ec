// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Why a scenario, the demo or the runner's setup failed. The message is the verdict printed
//! after `scenario NAME: FAIL (`: its first line stays short, details (console tails) follow.

use std::path::PathBuf;

use tmem_testguest::daemon;

/// Errors of the VM runner, and failed scenario checks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Setup: images, disks, sockets, processes.
    #[error("cannot read {path}: {source} (run `make vm-images`)")]
    ImagesFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {key} is missing or does not exist")]
    ImagesKey { path: PathBuf, key: &'static str },
    #[error("{path}: {key}={value} is not a number of MiB")]
    ImagesValue {
        path: PathBuf,
        key: &'static str,
        value: String,
    },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mkfs.ext4 (e2fsprogs): {0}")]
    MkfsSpawn(#[source] std::io::Error),
    #[error("mkfs.ext4 {path}: {stderr}")]
    Mkfs { path: PathBuf, stderr: String },
    #[error("cannot start {qemu}: {source}")]
    QemuSpawn {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU did not connect to the control socket")]
    NoControlConnection,
    #[error("control socket: {0}")]
    ControlSocket(#[source] std::io::Error),
    /// Waiting for QEMU or switching a socket's mode failed.
    #[error("{0}")]
    Process(#[source] std::io::Error),
    #[error("daemon: {0}")]
    DaemonStart(#[source] daemon::Error),
    #[error("{0}")]
    Daemon(#[source] daemon::Error),
    #[error("QMP {socket}: {why}")]
    Qmp { socket: PathBuf, why: String },
    #[error("migration: {0}")]
    Migration(String),
    #[error("no client {0} in the daemon's statistics")]
    NoClient(String),
    #[error("bad device: {0}")]
    BadDevice(String),
    #[error("unknown scenario (known: {0})")]
    UnknownScenario(String),

    // What the guests reported.
    #[error("at barrier {name}: {source}")]
    Barrier {
        name: String,
        #[source]
        source: Box<Error>,
    },
    #[error("{who} did not finish within {secs} s; console tail:\n{tail}")]
    GuestTimeout {
        who: String,
        secs: u64,
        tail: String,
    },
    #[error("{who}: {why}")]
    GuestFailed { who: String, why: String },
    /// The guest's script failed a check: the console is the only record CI keeps, so the
    /// verdict carries the kernel's last messages and the console's end.
    #[error("{who}: {why}\nkernel log tail:\n{kernel}\nconsole tail:\n{tail}")]
    GuestCheck {
        who: String,
        why: String,
        kernel: String,
        tail: String,
    },
    #[error("{who}: the kernel reported a problem:\n{report}")]
    KernelProblem { who: String, report: String },
    #[error("{who} printed no verdict (QEMU {status}); console tail:\n{tail}")]
    NoVerdict {
        who: String,
        status: String,
        tail: String,
    },
    #[error("no guest ran")]
    NoGuestRan,
    #[error("{0}")]
    DemoFailed(String),
    #[error("the guest printed no verdict; console tail:\n{0}")]
    DemoNoVerdict(String),

    // What the daemon's statistics show.
    #[error("{who}: {key}={both} (swap {swap} + page cache {cache}) but daemon {host_key}={host}")]
    CountMismatch {
        who: String,
        key: &'static str,
        both: u64,
        swap: u64,
        cache: u64,
        host_key: &'static str,
        host: u64,
    },
    #[error("daemon saw only {puts} puts and {gets} gets")]
    TooFewRequests { puts: u64, gets: u64 },
    #[error("the daemon refused no put")]
    NothingRefused,
    #[error("the daemon served only {0} hits")]
    TooFewHits(u64),
    #[error("the daemon used {peak} bytes, over its limit of {limit}")]
    PeakOverLimit { peak: u64, limit: u64 },
    #[error("the daemon has no shared pool")]
    NoSharedPool,
    #[error("shared pool: {0}")]
    SharedPool(serde_json::Value),
    #[error("memory used {used} is over the limit {limit}")]
    OverLimit { used: u64, limit: u64 },
    #[error("after rmmod the daemon still holds {pools} pools ({pages} pages) of the guest")]
    PoolsLeft { pools: usize, pages: u64 },
    #[error("nothing was evicted")]
    NothingEvicted,
    #[error("b (weight 300) holds {b} bytes, a (weight 100) {a}")]
    WeightShare { a: u64, b: u64 },
}

/// Result of the VM runner.
pub type Result<T> = std::result::Result<T, Error>;
