// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The scenarios: how each one sets up the daemon and its guests, what the runner checks at
//! their barriers, and how the guests' verdicts and counters are checked against the daemon's
//! statistics.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tmem_testguest::daemon::Daemon;

use crate::baddev::BadDevice;
use crate::boot::{GuestSpec, How, Run};
use crate::disks::{make_ext4, DATA_MIB, DATA_UUID, DISK2_MIB, DISK2_UUID, SHARED_UUID};
use crate::error::{Error, Result};
use crate::migrate::{Kind, MigrateTo};
use crate::Runner;

/// The daemon's memory limit in `swap-host-full`: far below the workload.
const TINY_LIMIT: &str = "6M";
/// The daemon's memory limit in `overcommit`: a fraction of what the two guests put.
const OVERCOMMIT_LIMIT: &str = "32M";

/// The client name (and socket) of the `bad-device` guest.
const BAD_CLIENT: &str = "bad";

/// Every scenario, in the order they run by default.
pub const SCENARIOS: &[&str] = &[
    "swap-integrity",
    "swap-lazy-register",
    "swap-unload",
    "swap-host-full",
    "swap-mq-stress",
    "swap-shrink",
    "zswap-coexist",
    "thp-swap",
    "suspend-resume",
    "daemon-upgrade",
    "qemu-reconnect",
    "add-remove-client",
    "pagecache-hits",
    "pagecache-coherency",
    "pagecache-lazy-register",
    "two-guests",
    "overcommit",
    "device-loss",
    "device-return",
    "writethrough-crash",
    "migrate",
    "snapshot",
    "migrate-refused",
    "bad-device",
    "short-config",
];

/// Scenarios whose guests swap: they run on 2 vCPUs against 2 request queues, so that the
/// swap hooks and the driver's queues race for real.
const SMP_SCENARIOS: &[&str] = &[
    "swap-integrity",
    "swap-lazy-register",
    "swap-unload",
    "swap-host-full",
    "swap-mq-stress",
    "swap-shrink",
    "zswap-coexist",
    "thp-swap",
    "suspend-resume",
    "qemu-reconnect",
    "device-loss",
    "device-return",
    "writethrough-crash",
    "migrate",
    "snapshot",
    "migrate-refused",
];

/// Scenarios whose daemon the runner kills at the barrier `kill`: the guest's console shows
/// what happened afterwards, the daemon's statistics are gone.
const DAEMON_KILLED: &[&str] = &["device-loss", "writethrough-crash"];

/// Scenarios whose daemon the runner kills at the barrier `crash` and starts again, empty, at
/// the barrier `return`, then kills and starts again at once at `again`: the last one counts
/// only what the guest sent after it came back.
const DAEMON_RESPAWNED: &[&str] = &["device-return"];

/// The target daemon's memory limit in `migrate-refused`: less than the guest stores.
const REFUSING_LIMIT: &str = "2M";

/// How the guests of a scenario are set up.
#[derive(Debug)]
pub struct Plan {
    pub daemon_args: Vec<String>,
    pub guests: Vec<GuestSpec>,
    /// Migration scenarios: how the guest moves, the target daemon's arguments, and whether
    /// the target is to refuse it.
    pub migrate: Option<(Kind, Vec<String>, bool)>,
    /// `add-remove-client`: the guest booted at the barrier `added`, once its client is added.
    pub later: Option<GuestSpec>,
}

impl Runner {
    /// The daemon's arguments and the guests (with their disks, made in `dir`) of a scenario.
    pub fn plan(&self, name: &str, dir: &Path) -> Result<Plan> {
        let (cpus, request_queues) = if SMP_SCENARIOS.contains(&name) {
            (2, 2)
        } else {
            (1, 1)
        };
        let single = |extra: &[&str]| -> Result<Plan> {
            let data = dir.join("data.img");
            let disk2 = dir.join("disk2.img");
            make_ext4(&data, DATA_MIB, DATA_UUID)?;
            make_ext4(&disk2, DISK2_MIB, DISK2_UUID)?;
            let mut daemon_args = vec![
                "--socket-path".to_string(),
                "{dir}/tmem.sock".into(),
                "--name".into(),
                "guest".into(),
                "--queues".into(),
                request_queues.to_string(),
            ];
            daemon_args.extend(extra.iter().map(|s| s.to_string()));
            Ok(Plan {
                migrate: None,
                later: None,
                daemon_args,
                guests: vec![GuestSpec {
                    client: "guest",
                    role: "",
                    disks: vec![(data, false), (disk2, false)],
                    cpus,
                    request_queues,
                }],
            })
        };
        let pair = |client_opts: [&str; 2], extra: &[&str], shared: bool| -> Result<Plan> {
            let mut guests = Vec::new();
            let mut daemon_args = Vec::new();
            let common = dir.join("shared.img");
            if shared {
                make_ext4(&common, DISK2_MIB, SHARED_UUID)?;
            }
            for (role, opts) in ["a", "b"].into_iter().zip(client_opts) {
                let data = dir.join(format!("data-{role}.img"));
                make_ext4(&data, DATA_MIB, DATA_UUID)?;
                let disk2 = if shared {
                    // Guest a writes the file first; b only ever reads.
                    (common.clone(), role == "b")
                } else {
                    let p = dir.join(format!("disk2-{role}.img"));
                    make_ext4(&p, DISK2_MIB, DISK2_UUID)?;
                    (p, false)
                };
                guests.push(GuestSpec {
                    client: role,
                    role,
                    disks: vec![(data, false), disk2],
                    cpus,
                    request_queues,
                });
                daemon_args.push("--client".to_string());
                daemon_args.push(format!("name={role},socket={{dir}}/{role}.sock{opts}"));
            }
            daemon_args.push("--queues".into());
            daemon_args.push(request_queues.to_string());
            daemon_args.extend(extra.iter().map(|s| s.to_string()));
            Ok(Plan {
                daemon_args,
                guests,
                migrate: None,
                later: None,
            })
        };
        match name {
            "swap-host-full" | "zswap-coexist" => single(&["--memory-limit", TINY_LIMIT]),
            "daemon-upgrade" => single(&["--state-file", "{dir}/state"]),
            "add-remove-client" => {
                // Guest b's client exists only from the barrier `added` on.
                let mut plan = pair(["", ""], &[], false)?;
                let at = plan
                    .daemon_args
                    .iter()
                    .position(|a| a.starts_with("name=b,"))
                    .expect("b's --client");
                plan.daemon_args.drain(at - 1..=at);
                plan.later = plan.guests.pop();
                Ok(plan)
            }
            "migrate" | "snapshot" | "migrate-refused" => {
                // migrate takes the page cache's pages along, the others drop them.
                let what = if name == "migrate" {
                    "all"
                } else {
                    "persistent"
                };
                let mut plan = single(&["--migration", what])?;
                let mut target = plan.daemon_args.clone();
                let refused = name == "migrate-refused";
                if refused {
                    target.extend(["--memory-limit".to_string(), REFUSING_LIMIT.to_string()]);
                }
                let kind = if name == "snapshot" {
                    Kind::Snapshot
                } else {
                    Kind::Live
                };
                plan.migrate = Some((kind, target, refused));
                Ok(plan)
            }
            "two-guests" => pair(
                [
                    &format!(",shared={SHARED_UUID}"),
                    &format!(",shared={SHARED_UUID}"),
                ],
                &[],
                true,
            ),
            "overcommit" => pair(
                [",weight=100", ",weight=300"],
                &["--memory-limit", OVERCOMMIT_LIMIT],
                false,
            ),
            "bad-device" => {
                // The guest's device is the runner's misbehaving one (`baddev.rs`), on its own
                // socket; the daemon only provides the scenario's directory.
                let mut plan = single(&[])?;
                plan.guests[0].client = BAD_CLIENT;
                Ok(plan)
            }
            _ => single(&[]),
        }
    }

    /// Starts a daemon with `args`.
    pub fn daemon(&self, args: &[String]) -> Result<Daemon> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&args).map_err(Error::DaemonStart)
    }

    /// Runs one scenario; returns its verdict.
    pub fn scenario(&self, name: &str) -> Result<()> {
        if !SCENARIOS.contains(&name) {
            return Err(Error::UnknownScenario(SCENARIOS.join(" ")));
        }
        // The disk images live next to the daemon's files, in a directory of their own first.
        let tmp = std::env::temp_dir().join(format!("tmem-vmtest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|source| Error::Path {
            path: tmp.clone(),
            source,
        })?;
        let result = self.plan(name, &tmp).and_then(|plan| {
            let d = self.daemon(&plan.daemon_args)?;
            let target = match &plan.migrate {
                Some((_, args, _)) => Some(self.daemon(args)?),
                None => None,
            };
            let result = self.check(&d, target.as_ref(), name, &plan);
            if result.is_err() || std::env::var_os("TMEM_VMTEST_KEEP").is_some() {
                self.keep(&d, name);
                if let Some(t) = &target {
                    self.keep(t, &format!("{name}/target"));
                }
            }
            result
        });
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }

    /// Checks taken while every guest waits at a barrier.
    fn at_barrier(&self, d: &Daemon, scenario: &str, barrier: &str, plan: &Plan) -> Result<()> {
        if barrier == "return" && DAEMON_RESPAWNED.contains(&scenario) {
            // The daemon is dead until this starts it again.
            d.respawn().map_err(Error::Daemon)?;
            let c = await_client(d, "QEMU did not reconnect", |c| c["connected"] == true)?;
            eprintln!(
                "  {scenario}: daemon started again, QEMU reconnected, {} pools",
                c["pools"].as_array().map_or(0, Vec::len)
            );
            return Ok(());
        }
        let stats = d.stats().map_err(Error::Daemon)?;
        let client = |name: &str| -> Result<serde_json::Value> {
            stats["clients"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == name))
                .cloned()
                .ok_or_else(|| Error::NoClient(name.to_string()))
        };
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        match (scenario, barrier) {
            ("two-guests", "verified") => {
                let pools = stats["shared_pools"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let Some(pool) = pools.first() else {
                    return Err(Error::NoSharedPool);
                };
                if n(pool, "members") != 2 || n(pool, "get_hits") == 0 {
                    return Err(Error::SharedPool(pool.clone()));
                }
                eprintln!(
                    "  two-guests: shared pool {}: {} members, {} puts, {} hits",
                    pool["uuid"].as_str().unwrap_or("?"),
                    n(pool, "members"),
                    n(pool, "puts"),
                    n(pool, "get_hits")
                );
                Ok(())
            }
            (_, "kill") if DAEMON_KILLED.contains(&scenario) => kill_daemon(d, scenario),
            (_, "crash") if DAEMON_RESPAWNED.contains(&scenario) => kill_daemon(d, scenario),
            (_, "again") if DAEMON_RESPAWNED.contains(&scenario) => {
                // Killed and started again before the guest sends anything.
                kill_daemon(d, scenario)?;
                d.respawn().map_err(Error::Daemon)?;
                await_client(d, "QEMU did not reconnect", |c| c["connected"] == true)?;
                eprintln!("  {scenario}: daemon killed and started again, QEMU reconnected");
                Ok(())
            }
            ("daemon-upgrade", "restart") => {
                for round in 1..=2 {
                    d.restart(Duration::from_secs(120)).map_err(Error::Daemon)?;
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let c = loop {
                        let c = d.client_stats("guest").map_err(Error::Daemon)?;
                        if c["connected"].as_bool() == Some(true) {
                            break c;
                        }
                        if Instant::now() > deadline {
                            return Err(Error::GuestFailed {
                                who: "runner".into(),
                                why: format!("QEMU did not reconnect after restart {round}"),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    };
                    let pages = n(&c, "stored_pages");
                    if pages == 0 {
                        return Err(Error::GuestFailed {
                            who: "runner".into(),
                            why: format!(
                                "the daemon holds no page of the guest after restart {round}"
                            ),
                        });
                    }
                    eprintln!(
                        "  daemon-upgrade: restart {round}: state handed over, QEMU reconnected, {pages} pages held"
                    );
                }
                Ok(())
            }
            ("add-remove-client", "added") => {
                let Some(b) = &plan.later else {
                    return Ok(());
                };
                self.add_run_remove(d, scenario, b, n(&client("a")?, "stored_pages"))
            }
            ("qemu-reconnect", "cut") => {
                let c = client("guest")?;
                let (before, pools) = (n(&c, "stored_pages"), c["pools"].clone());
                d.control(&serde_json::json!({"cmd": "disconnect", "client": "guest"}))
                    .map_err(Error::Daemon)?;
                // Ended (the daemon's thread saw it), then back (QEMU reconnected).
                let c = await_client(d, "the daemon did not end the connection", |c| {
                    c["connected"] == false
                })?;
                // The same pools, and the pages, but for the odd one the idle guest's kernel
                // swapped in (and the host dropped: exclusive loads) meanwhile.
                let kept = n(&c, "stored_pages");
                let same_pools = |a: &serde_json::Value, b: &serde_json::Value| {
                    let ids = |v: &serde_json::Value| -> Vec<u64> {
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|p| p["id"].as_u64())
                            .collect()
                    };
                    ids(a) == ids(b)
                };
                if !same_pools(&pools, &c["pools"]) || kept < before * 95 / 100 {
                    return Err(Error::GuestFailed {
                        who: "runner".into(),
                        why: format!(
                            "the daemon holds {kept} pages in pools {} after the disconnect, \
                             {before} in pools {pools} before",
                            c["pools"]
                        ),
                    });
                }
                await_client(d, "QEMU did not reconnect", |c| c["connected"] == true)?;
                eprintln!(
                    "  qemu-reconnect: connection ended by the daemon, QEMU reconnected, {before} pages kept"
                );
                Ok(())
            }
            ("swap-shrink", "stored") => {
                let held = n(&client("guest")?, "stored_pages");
                d.control(&serde_json::json!({"cmd": "shrink", "client": "guest", "pages": 2000}))
                    .map_err(Error::Daemon)?;
                eprintln!("  swap-shrink: {held} pages held, shrink target 2000 set");
                Ok(())
            }
            ("swap-shrink", "shrunk") => {
                let held = n(&client("guest")?, "stored_pages");
                if held > 2000 {
                    return Err(Error::GuestFailed {
                        who: "runner".into(),
                        why: format!("the daemon holds {held} pages after the shrink to 2000"),
                    });
                }
                eprintln!("  swap-shrink: the daemon holds {held} pages");
                Ok(())
            }
            ("swap-integrity", "held") => {
                // What the host keeps of the guest's swap once the workload is done: with
                // exclusive loads, only pages that are not in the guest's memory as well.
                eprintln!(
                    "  swap-integrity: the host holds {} pages of the guest before swapoff",
                    n(&client("guest")?, "stored_pages")
                );
                Ok(())
            }
            ("swap-unload", "unloaded") => {
                // The module is gone: none of its pools may stay on the host.
                let c = client("guest")?;
                let pools = c["pools"].as_array().map_or(0, Vec::len);
                if pools != 0 || n(&c, "stored_pages") != 0 {
                    return Err(Error::PoolsLeft {
                        pools,
                        pages: n(&c, "stored_pages"),
                    });
                }
                eprintln!("  swap-unload: after rmmod the daemon holds no pool of the guest");
                Ok(())
            }
            ("overcommit", "measured") => {
                let (a, b) = (client("a")?, client("b")?);
                let used = n(&stats, "memory_used_bytes");
                let limit = n(&stats, "memory_limit_bytes");
                eprintln!(
                    "  overcommit: daemon uses {:.1} of {:.1} MiB: a (weight 100) {:.1} MiB, \
                     {} evicted; b (weight 300) {:.1} MiB, {} evicted",
                    used as f64 / 1048576.0,
                    limit as f64 / 1048576.0,
                    n(&a, "memory_used") as f64 / 1048576.0,
                    n(&a, "evictions"),
                    n(&b, "memory_used") as f64 / 1048576.0,
                    n(&b, "evictions")
                );
                if used > limit {
                    return Err(Error::OverLimit { used, limit });
                }
                if n(&a, "evictions") + n(&b, "evictions") == 0 {
                    return Err(Error::NothingEvicted);
                }
                // Eviction takes from the largest user relative to its weight, so b ends up
                // with about three times a's share.
                if n(&b, "memory_used") < 2 * n(&a, "memory_used") {
                    return Err(Error::WeightShare {
                        a: n(&a, "memory_used"),
                        b: n(&b, "memory_used"),
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A guest's run passed: it did not time out, its kernel reported no problem, and its
    /// script printed `pass` for `scenario`.
    fn passed(&self, run: &Run, who: &str, scenario: &str) -> Result<()> {
        let who = who.to_string();
        if run.timed_out {
            return Err(Error::GuestTimeout {
                who,
                secs: self.timeout.as_secs(),
                tail: run.tail(),
            });
        }
        // A lockdep splat, a sleep in atomic context or a WARNING fails the scenario even if
        // the workload verified: the next run might not be so lucky.
        if let Some(report) = run.kernel_problem() {
            return Err(Error::KernelProblem { who, report });
        }
        match run.verdict(scenario) {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err(Error::GuestCheck {
                who,
                why,
                kernel: run.kernel_tail(),
                tail: run.tail(),
            }),
            None => Err(Error::NoVerdict {
                who,
                status: run.status.clone(),
                tail: run.tail(),
            }),
        }
    }

    /// `add-remove-client` while guest a waits at `added`: adds client b, boots guest b
    /// against it to the end, removes b, and checks that a still holds the `a_pages` pages it
    /// held before (give or take the few its idle kernel swaps in meanwhile).
    fn add_run_remove(
        &self,
        d: &Daemon,
        scenario: &str,
        b: &GuestSpec,
        a_pages: u64,
    ) -> Result<()> {
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        let socket = d.path("b.sock");
        d.control(&serde_json::json!({
            "cmd": "add-client",
            "spec": format!("name=b,socket={}", socket.display()),
        }))
        .map_err(Error::Daemon)?;
        let runs = self.boot(
            d,
            scenario,
            std::slice::from_ref(b),
            How {
                accel: self.accel,
                timeout: self.timeout,
                live: false,
                migrate: None,
            },
            &|_| Ok(()),
        )?;
        let run = runs.first().ok_or(Error::NoGuestRan)?;
        let who = "guest b".to_string();
        self.passed(run, &who, scenario)?;
        let host = d.client_stats("b").map_err(Error::Daemon)?;
        same_counts(&who, &run.guest_stats(), &host)?;
        // b's QEMU has exited: the removal needs no --force, and frees what b left.
        let r = d
            .control(&serde_json::json!({"cmd": "remove-client", "client": "b"}))
            .map_err(Error::Daemon)?;
        let stats = d.stats().map_err(Error::Daemon)?;
        let names: Vec<&str> = stats["clients"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        let a = d.client_stats("a").map_err(Error::Daemon)?;
        // Guest a idles at the barrier, but its kernel still swaps the odd page in (which
        // the host then drops: exclusive loads); its pages verify after the barrier.
        if names != ["a"] || socket.exists() || n(&a, "stored_pages") < a_pages * 95 / 100 {
            return Err(Error::GuestFailed {
                who: "runner".into(),
                why: format!(
                    "after remove-client b: clients {names:?}, b's socket {}, a holds {} pages \
                     ({a_pages} before b was added)",
                    if socket.exists() {
                        "still there"
                    } else {
                        "gone"
                    },
                    n(&a, "stored_pages")
                ),
            });
        }
        eprintln!(
            "  {scenario}: client b added, its guest ran (daemon puts {}, gets {}) and was \
             removed ({}); a untouched ({a_pages} pages)",
            n(&host, "puts"),
            n(&host, "gets"),
            r["removed"]
        );
        Ok(())
    }

    /// Boots the scenario's guests against `d` (and migrates them to `target`) and checks what
    /// both sides report.
    fn check(&self, d: &Daemon, target: Option<&Daemon>, name: &str, plan: &Plan) -> Result<()> {
        let migrate = match (&plan.migrate, target) {
            (Some((kind, _, refused)), Some(daemon)) => Some(MigrateTo {
                kind: *kind,
                daemon,
                refused: *refused,
            }),
            _ => None,
        };
        let bad = if name == "bad-device" {
            Some(BadDevice::serve(&d.path(&format!("{BAD_CLIENT}.sock")))?)
        } else {
            None
        };
        let t0 = Instant::now();
        let peak = AtomicU64::new(0);
        let done = AtomicBool::new(false);
        let runs = std::thread::scope(|s| {
            // The daemon's memory use, sampled while the guests run.
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    if let Ok(st) = d.stats() {
                        let used = st["memory_used_bytes"].as_u64().unwrap_or(0);
                        peak.fetch_max(used, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
            let runs = self.boot(
                d,
                name,
                &plan.guests,
                How {
                    accel: self.accel,
                    timeout: self.timeout,
                    live: false,
                    migrate: migrate.as_ref(),
                },
                &|b| match &bad {
                    // Each barrier names the fault the device shows from then on.
                    Some(dev) => dev.set_fault(b),
                    None => self.at_barrier(d, name, b, plan),
                },
            );
            done.store(true, Ordering::Relaxed);
            runs
        })?;
        eprintln!(
            "  {name}: guests ran {:.0} s ({})",
            t0.elapsed().as_secs_f64(),
            self.accel
        );
        for (g, run) in plan.guests.iter().zip(&runs) {
            let who = if g.role.is_empty() {
                "guest".to_string()
            } else {
                format!("guest {}", g.role)
            };
            self.passed(run, &who, name)?;
            if name == "bad-device" || name == "short-config" {
                // No daemon behind this guest, or no driver bound: its script checked what
                // the driver did.
                continue;
            }
            if DAEMON_KILLED.contains(&name) {
                // The daemon is gone: the console shows what happened instead.
                check_device_loss(&run.console, name).map_err(|why| Error::GuestCheck {
                    who: who.clone(),
                    why,
                    kernel: run.kernel_tail(),
                    tail: run.tail(),
                })?;
                eprintln!(
                    "  {name}: {who}: device broken, heartbeat went on, swap fell back to the disk"
                );
                continue;
            }
            let guest = run.guest_stats();
            // Counters are flattened into the client object. A migrated guest's counters went
            // along with its state: the target daemon counts everything.
            let serving = match &migrate {
                Some(m) if !m.refused => m.daemon,
                _ => d,
            };
            let host = serving.client_stats(g.client).map_err(Error::Daemon)?;
            let h = |k: &str| host[k].as_u64().unwrap_or(0);
            if DAEMON_RESPAWNED.contains(&name) {
                // The guest counted the requests before the crash too, the new daemon only
                // those after the driver came back: it must have served some.
                if h("puts") == 0 {
                    return Err(Error::GuestFailed {
                        who: "runner".into(),
                        why: format!("the restarted daemon served no put: {host}"),
                    });
                }
            } else {
                same_counts(&who, &guest, &host)?;
            }
            eprintln!(
                "  {name}: {who}: daemon puts {} (refused {}), gets {} (hits {}), flushed pages {}, evictions {}",
                h("puts"),
                h("puts_refused"),
                h("gets"),
                h("get_hits"),
                h("flushed_pages"),
                h("evictions")
            );
            match name {
                "swap-integrity" | "swap-lazy-register" if h("puts") < 1000 || h("gets") < 1000 => {
                    return Err(Error::TooFewRequests {
                        puts: h("puts"),
                        gets: h("gets"),
                    })
                }
                "swap-host-full" | "zswap-coexist" if h("puts_refused") == 0 => {
                    return Err(Error::NothingRefused)
                }
                "pagecache-hits" | "pagecache-lazy-register" if h("get_hits") < 10_000 => {
                    return Err(Error::TooFewHits(h("get_hits")))
                }
                _ => {}
            }
        }
        if DAEMON_KILLED.contains(&name) || name == "bad-device" || name == "short-config" {
            return Ok(());
        }
        let stats = d.stats().map_err(Error::Daemon)?;
        let limit = stats["memory_limit_bytes"].as_u64().unwrap_or(0);
        let peak = peak.into_inner();
        if peak > limit {
            return Err(Error::PeakOverLimit { peak, limit });
        }
        Ok(())
    }

    /// Copies the guest consoles and the daemon log to `target/vm/logs/NAME/`.
    fn keep(&self, d: &Daemon, name: &str) {
        let dest = self.root.join("target/vm/logs").join(name);
        let _ = std::fs::remove_dir_all(&dest);
        if std::fs::create_dir_all(&dest).is_ok() {
            for entry in std::fs::read_dir(d.dir()).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "log") {
                    let _ = std::fs::copy(&p, dest.join(entry.file_name()));
                }
            }
            eprintln!(
                "  {name}: guest consoles and daemon log kept in {}",
                dest.display()
            );
        }
    }
}

/// The guest's and the daemon's counters of one client agree: they count the same requests,
/// so any difference is a lost or phantom request. The daemon counts swap and page-cache
/// requests together; its counters are flattened into the client object.
fn same_counts(
    who: &str,
    guest: &std::collections::BTreeMap<String, u64>,
    host: &serde_json::Value,
) -> Result<()> {
    let h = |k: &str| host[k].as_u64().unwrap_or(0);
    let g = |k: &str| guest.get(k).copied().unwrap_or(0);
    for (gk, hk) in [
        ("puts", "puts"),
        ("puts_refused", "puts_refused"),
        ("gets", "gets"),
        ("hits", "get_hits"),
        ("misses", "get_misses"),
    ] {
        let (swap, cache) = (g(gk), g(&format!("cache_{gk}")));
        if swap + cache != h(hk) {
            return Err(Error::CountMismatch {
                who: who.to_string(),
                key: gk,
                both: swap + cache,
                swap,
                cache,
                host_key: hk,
                host: h(hk),
            });
        }
    }
    Ok(())
}

/// Polls the guest client's statistics (every 20 ms, at most 60 s) until `done` holds.
fn await_client(
    d: &Daemon,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = d.client_stats("guest").map_err(Error::Daemon)?;
        if done(&c) {
            return Ok(c);
        }
        if Instant::now() > deadline {
            return Err(Error::GuestFailed {
                who: "runner".into(),
                why: format!("{what} within 60 s: {c}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the daemon `d` of `scenario` with SIGKILL, as a crash would, and waits until it is
/// gone. `Daemon` keeps its child process private: the process is the one whose arguments name
/// `d`'s control socket (its directory is unique to it).
fn kill_daemon(d: &Daemon, scenario: &str) -> Result<()> {
    let control = d.path("control.sock");
    let control = control.to_string_lossy();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_daemon = args.first().is_some_and(|a| a.ends_with(b"vhost-tmem"));
        if is_daemon && args.iter().any(|a| *a == control.as_bytes()) {
            pids.push(pid);
        }
    }
    let [pid] = pids[..] else {
        return Err(Error::GuestFailed {
            who: "runner".into(),
            why: format!("{} daemon processes found for {control}", pids.len()),
        });
    };
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .map_err(Error::Process)?;
    if !status.success() {
        return Err(Error::GuestFailed {
            who: "runner".into(),
            why: format!("kill -KILL {pid}: {status}"),
        });
    }
    // A killed child stays a zombie until `Daemon` reaps it; its sockets close at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    }) {
        if Instant::now() > deadline {
            return Err(Error::GuestFailed {
                who: "runner".into(),
                why: format!("daemon {pid} still alive 10 s after SIGKILL"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("  {scenario}: daemon {pid} killed");
    Ok(())
}

/// What the console of a scenario whose daemon was killed must show: the driver broke the
/// device once, and the guest kept running after it (`NAME: heartbeat` lines follow the break).
fn check_device_loss(console: &str, name: &str) -> std::result::Result<(), String> {
    let heartbeat = format!("{name}: heartbeat");
    let lines: Vec<&str> = console.lines().collect();
    let broken: Vec<usize> = (0..lines.len())
        .filter(|i| lines[*i].contains("tmem: device broken"))
        .collect();
    let [at] = broken[..] else {
        return Err(format!(
            "the console shows {} \"tmem: device broken\" lines, expected 1",
            broken.len()
        ));
    };
    let beats = lines[at..]
        .iter()
        .filter(|l| l.contains(&heartbeat))
        .count();
    if beats < 3 {
        return Err(format!(
            "{beats} heartbeat lines after the device broke, expected 3 or more"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_device_loss;

    #[test]
    fn device_loss_needs_one_break_then_heartbeats() {
        let check = |console: String| check_device_loss(&console, "device-loss");
        let beat = "device-loss: heartbeat 1.0\n";
        let broken = "[ 9.1] tmem: device broken: Some(Put) not answered in 2000 ms\n";
        assert!(check(format!("{beat}{broken}{beat}{beat}{beat}")).is_ok());
        assert!(check(format!("{beat}{beat}{beat}{broken}{beat}")).is_err());
        assert!(check(format!("{beat}{beat}{beat}")).is_err());
        assert!(check(format!("{broken}{broken}{beat}{beat}{beat}")).is_err());
        // Another scenario's heartbeat does not count.
        let other = "writethrough-crash: heartbeat 1.0\n";
        assert!(check(format!("{broken}{other}{other}{other}")).is_err());
        assert!(check_device_loss(
            &format!("{broken}{other}{other}{other}"),
            "writethrough-crash"
        )
        .is_ok());
    }
}
