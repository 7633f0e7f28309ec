// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `make vm-test` and `make demo`: real Linux guests under QEMU, swapping and caching file
//! pages through the `tmem.ko` driver into the vhost-tmem daemon.
//!
//! Each scenario boots fresh guests (kernel, initramfs and QEMU from `vm-images/build.sh`;
//! one, or two at once) against a fresh daemon, with a swap disk and two ext4 disks made here
//! by `mkfs.ext4`. Each guest runs the scenario's script and prints its verdict and its driver
//! counters; this runner then checks the daemon's statistics against them and prints
//! `scenario NAME: pass` or `scenario NAME: FAIL (why)`. Two guests meet at barriers over a
//! second serial port, where the runner also inspects the daemon. On failure the guest
//! consoles and the daemon log are kept under `target/vm/logs/NAME/` (always with
//! `TMEM_VMTEST_KEEP=1`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tmem_testguest::daemon::Daemon;

/// Guest RAM for every scenario; the workloads touch about twice as much.
const GUEST_MIB: u64 = 128;
/// The guest's swap device: a sparse file on the host.
const SWAP_MIB: u64 = 512;
/// The daemon's memory limit in `swap-host-full`: far below the workload.
const TINY_LIMIT: &str = "6M";
/// The daemon's memory limit in `overcommit`: a fraction of what the two guests put.
const OVERCOMMIT_LIMIT: &str = "32M";
/// The ext4 disks (sparse files): /dev/vdb and /dev/vdc.
const DATA_MIB: u64 = 1024;
const DISK2_MIB: u64 = 256;
const DATA_UUID: &str = "5d7c0a4e-1b9f-4d3a-9c61-0f6f3a8e2b10";
const DISK2_UUID: &str = "9a1e55c2-7d04-4c8b-a3f0-61b2d9e4c7a5";
/// The read-only disk both guests of `two-guests` mount; the daemon authorizes it for sharing.
const SHARED_UUID: &str = "c0ffee00-7e3a-4b5c-8d9e-0a1b2c3d4e5f";

const SCENARIOS: &[&str] = &[
    "swap-integrity",
    "swap-lazy-register",
    "swap-unload",
    "swap-host-full",
    "pagecache-hits",
    "pagecache-coherency",
    "pagecache-lazy-register",
    "two-guests",
    "overcommit",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Accel {
    /// KVM if a guest boots with it here, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// Boots real guests that swap into vhost-tmem and checks what both sides report.
#[derive(Debug, Parser)]
#[command(name = "tmem-vmtest")]
struct Cli {
    /// Scenarios to run [default: all]: swap-integrity swap-lazy-register swap-unload
    /// swap-host-full pagecache-hits pagecache-coherency pagecache-lazy-register two-guests
    /// overcommit.
    scenarios: Vec<String>,
    /// Run the demo instead: one guest under memory pressure (swap, then page cache), console
    /// shown live, then the daemon's and the guest's statistics side by side.
    #[arg(long)]
    demo: bool,
    /// Accelerator.
    #[arg(long, value_enum, default_value = "auto")]
    accel: Accel,
    /// Seconds a guest may run before it is killed and its scenario fails.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
    /// Virtual CPUs per guest.
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// The images file written by vm-images/build.sh.
    #[arg(long, default_value = "target/vm/images.env")]
    images: PathBuf,
}

/// Paths from `target/vm/images.env`.
struct Images {
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    firmware: Vec<PathBuf>,
}

impl Images {
    fn load(path: &Path) -> Result<Images, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e} (run `make vm-images`)", path.display()))?;
        let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| {
            vars.get(k)
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .ok_or_else(|| format!("{}: {k} is missing or does not exist", path.display()))
        };
        Ok(Images {
            qemu: get("QEMU")?,
            kernel: get("KERNEL")?,
            initramfs: get("INITRAMFS")?,
            firmware: vars
                .get("FIRMWARE")
                .map(|f| {
                    f.split(':')
                        .map(PathBuf::from)
                        .filter(|p| p.exists())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// What a guest run left behind.
struct Run {
    console: String,
    timed_out: bool,
    status: String,
}

impl Run {
    /// The `guest-result NAME: ...` verdict.
    fn verdict(&self, name: &str) -> Option<Result<(), String>> {
        let prefix = format!("guest-result {name}: ");
        let line = self
            .console
            .lines()
            .find_map(|l| l.trim_end().strip_prefix(&prefix))?;
        Some(if line == "pass" {
            Ok(())
        } else {
            Err(line
                .strip_prefix("FAIL (")
                .and_then(|s| s.strip_suffix(')'))
                .unwrap_or(line)
                .to_string())
        })
    }

    /// The last `guest-stats` line as a map.
    fn guest_stats(&self) -> BTreeMap<String, u64> {
        self.console
            .lines()
            .rev()
            .find_map(|l| l.trim_end().strip_prefix("guest-stats "))
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The end of the console, for failure messages.
    fn tail(&self) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

/// One guest of a scenario.
struct GuestSpec {
    /// The daemon client it is ("guest" in single-guest scenarios, else its role).
    client: &'static str,
    /// `a` or `b` in two-guest scenarios (passed as `tmem.role=`), empty otherwise.
    role: &'static str,
    /// The disks after the swap disk: /dev/vdb and /dev/vdc (image, read-only).
    disks: Vec<(PathBuf, bool)>,
}

/// How the guests of a scenario are set up.
struct Plan {
    daemon_args: Vec<String>,
    guests: Vec<GuestSpec>,
}

/// Creates a sparse ext4 image with the given UUID.
fn make_ext4(path: &Path, mib: u64, uuid: &str) -> Result<(), String> {
    File::create(path)
        .and_then(|f| f.set_len(mib << 20))
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-U",
            uuid,
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(path)
        .output()
        .map_err(|e| format!("mkfs.ext4 (e2fsprogs): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.ext4 {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// How guests boot: accelerator, time limit, and whether the first console is shown live.
struct How {
    accel: &'static str,
    timeout: Duration,
    live: bool,
}

/// Lines the console readers pass on: a guest reached a barrier, or its console closed.
enum Event {
    Sync(usize, String),
    Closed(usize),
}

struct Runner {
    images: Images,
    accel: &'static str,
    timeout: Duration,
    smp: u32,
    root: PathBuf,
}

impl Runner {
    /// Boots `guests` at once for `scenario`, each against `{dir}/CLIENT.sock` (or
    /// `tmem.sock` for the single client `guest`). Guests meet at barriers: once every guest
    /// printed `guest-sync NAME`, `at_barrier(NAME)` runs and NAME is written back to each
    /// guest's second serial port. A failed `at_barrier` stops the guests. With `live`, the
    /// first guest's console is copied to stdout as it comes.
    fn boot(
        &self,
        d: &Daemon,
        scenario: &str,
        guests: &[GuestSpec],
        how: How,
        at_barrier: &dyn Fn(&str) -> Result<(), String>,
    ) -> Result<Vec<Run>, String> {
        let How {
            accel,
            timeout,
            live,
        } = how;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut children = Vec::new();
        let mut controls = Vec::new();
        let mut readers = Vec::new();
        let mut consoles = Vec::new();
        let kill_all = |children: &mut Vec<std::process::Child>| {
            for c in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        };
        for (i, g) in guests.iter().enumerate() {
            let tag = if g.role.is_empty() {
                scenario.to_string()
            } else {
                format!("{scenario}-{}", g.role)
            };
            let swap = d.path(&format!("swap-{tag}.img"));
            File::create(&swap)
                .and_then(|f| f.set_len(SWAP_MIB << 20))
                .map_err(|e| format!("cannot create {}: {e}", swap.display()))?;
            let control = d.path(&format!("control-{tag}.sock"));
            let _ = std::fs::remove_file(&control);
            let listener = std::os::unix::net::UnixListener::bind(&control)
                .map_err(|e| format!("{}: {e}", control.display()))?;
            let socket = if g.client == "guest" {
                d.path("tmem.sock")
            } else {
                d.path(&format!("{}.sock", g.client))
            };
            let mut cmdline = format!("tmem.scenario={scenario}");
            if !g.role.is_empty() {
                cmdline.push_str(&format!(" tmem.role={}", g.role));
            }
            let mut cmd = Command::new(&self.images.qemu);
            for fw in &self.images.firmware {
                cmd.arg("-L").arg(fw);
            }
            cmd.args(qemu_args(&QemuArgs {
                accel,
                smp: self.smp,
                kernel: &self.images.kernel,
                initramfs: &self.images.initramfs,
                socket: &socket,
                swap: &swap,
                disks: &g.disks,
                control: Some(&control),
                cmdline: &cmdline,
            }));
            let mut child = match cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
            {
                Ok(c) => c,
                Err(e) => {
                    kill_all(&mut children);
                    return Err(format!("cannot start {}: {e}", self.images.qemu.display()));
                }
            };
            // QEMU connects to the control socket while it starts.
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let t0 = Instant::now();
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if t0.elapsed() > Duration::from_secs(30)
                            || child.try_wait().ok().flatten().is_some()
                        {
                            let _ = child.kill();
                            let _ = child.wait();
                            kill_all(&mut children);
                            return Err("QEMU did not connect to the control socket".into());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        kill_all(&mut children);
                        return Err(format!("control socket: {e}"));
                    }
                }
            };
            stream.set_nonblocking(false).map_err(|e| e.to_string())?;
            controls.push(stream);
            let console_path = d.path(&format!("console-{tag}.log"));
            let log = std::sync::Arc::new(std::sync::Mutex::new(
                File::create(&console_path)
                    .map_err(|e| format!("{}: {e}", console_path.display()))?,
            ));
            consoles.push(console_path);
            let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().expect("piped"));
            let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().expect("piped"));
            for (stream, show, events) in [(out, live && i == 0, true), (err, true, false)] {
                let log = log.clone();
                let tx = tx.clone();
                readers.push(std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        if show {
                            println!("  | {line}");
                        }
                        let _ = writeln!(log.lock().expect("console log"), "{line}");
                        if let Some(name) = line.trim_end().strip_prefix("guest-sync ") {
                            if events {
                                let _ = tx.send(Event::Sync(i, name.to_string()));
                            }
                        }
                    }
                    if events {
                        let _ = tx.send(Event::Closed(i));
                    }
                }));
            }
            children.push(child);
        }
        drop(tx);

        let start = Instant::now();
        let n = guests.len();
        let mut waiting: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut closed = vec![false; n];
        let mut status = vec![None; n];
        let mut timed_out = false;
        let mut barrier_error = None;
        while status.iter().any(Option::is_none) {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Event::Sync(i, name)) => {
                    let at = waiting.entry(name.clone()).or_default();
                    at.push(i);
                    if at.len() == n {
                        waiting.remove(&name);
                        if let Err(e) = at_barrier(&name) {
                            barrier_error = Some(format!("at barrier {name}: {e}"));
                            kill_all(&mut children);
                        }
                        for c in controls.iter_mut() {
                            let _ = writeln!(c, "{name}");
                        }
                    }
                }
                Ok(Event::Closed(i)) => closed[i] = true,
                Err(_) => {}
            }
            for (i, c) in children.iter_mut().enumerate() {
                if status[i].is_none() {
                    if let Some(st) = c.try_wait().map_err(|e| e.to_string())? {
                        status[i] = Some(st.to_string());
                    }
                }
            }
            // A guest that is gone can never reach the barrier the others wait at.
            let stuck =
                !waiting.is_empty() && status.iter().zip(&closed).any(|(s, c)| s.is_some() && *c);
            if start.elapsed() > timeout || stuck {
                timed_out = start.elapsed() > timeout;
                for (i, c) in children.iter_mut().enumerate() {
                    if status[i].is_none() {
                        let _ = c.kill();
                        status[i] = Some(c.wait().map_err(|e| e.to_string())?.to_string());
                    }
                }
            }
        }
        for r in readers {
            let _ = r.join();
        }
        if let Some(e) = barrier_error {
            return Err(e);
        }
        Ok(consoles
            .iter()
            .zip(status)
            .map(|(p, st)| Run {
                console: std::fs::read_to_string(p).unwrap_or_default(),
                timed_out,
                status: st.unwrap_or_default(),
            })
            .collect())
    }

    fn plan(&self, name: &str, dir: &Path) -> Result<Plan, String> {
        let single = |extra: &[&str]| -> Result<Plan, String> {
            let data = dir.join("data.img");
            let disk2 = dir.join("disk2.img");
            make_ext4(&data, DATA_MIB, DATA_UUID)?;
            make_ext4(&disk2, DISK2_MIB, DISK2_UUID)?;
            let mut daemon_args = vec![
                "--socket-path".to_string(),
                "{dir}/tmem.sock".into(),
                "--name".into(),
                "guest".into(),
            ];
            daemon_args.extend(extra.iter().map(|s| s.to_string()));
            Ok(Plan {
                daemon_args,
                guests: vec![GuestSpec {
                    client: "guest",
                    role: "",
                    disks: vec![(data, false), (disk2, false)],
                }],
            })
        };
        let pair = |client_opts: [&str; 2], extra: &[&str], shared: bool| -> Result<Plan, String> {
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
                });
                daemon_args.push("--client".to_string());
                daemon_args.push(format!("name={role},socket={{dir}}/{role}.sock{opts}"));
            }
            daemon_args.extend(extra.iter().map(|s| s.to_string()));
            Ok(Plan {
                daemon_args,
                guests,
            })
        };
        match name {
            "swap-host-full" => single(&["--memory-limit", TINY_LIMIT]),
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
            _ => single(&[]),
        }
    }

    fn daemon(&self, args: &[String]) -> Result<Daemon, String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(&args).map_err(|e| format!("daemon: {e}"))
    }

    /// Runs one scenario; returns its verdict.
    fn scenario(&self, name: &str) -> Result<(), String> {
        // The disk images live next to the daemon's files, in a directory of their own first.
        let tmp = std::env::temp_dir().join(format!("tmem-vmtest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let result = self.plan(name, &tmp).and_then(|plan| {
            let d = self.daemon(&plan.daemon_args)?;
            let result = self.check(&d, name, &plan);
            if result.is_err() || std::env::var_os("TMEM_VMTEST_KEEP").is_some() {
                self.keep(&d, name);
            }
            result
        });
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }

    /// Checks taken while every guest waits at a barrier.
    fn at_barrier(d: &Daemon, scenario: &str, barrier: &str) -> Result<(), String> {
        let stats = d.stats().map_err(|e| e.to_string())?;
        let client = |name: &str| -> Result<serde_json::Value, String> {
            stats["clients"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == name))
                .cloned()
                .ok_or_else(|| format!("no client {name} in the daemon's statistics"))
        };
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        match (scenario, barrier) {
            ("two-guests", "verified") => {
                let pools = stats["shared_pools"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let Some(pool) = pools.first() else {
                    return Err("the daemon has no shared pool".into());
                };
                if n(pool, "members") != 2 || n(pool, "get_hits") == 0 {
                    return Err(format!("shared pool: {pool}"));
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
                    return Err(format!("memory used {used} is over the limit {limit}"));
                }
                if n(&a, "evictions") + n(&b, "evictions") == 0 {
                    return Err("nothing was evicted".into());
                }
                // Eviction takes from the largest user relative to its weight, so b ends up
                // with about three times a's share.
                if n(&b, "memory_used") < 2 * n(&a, "memory_used") {
                    return Err(format!(
                        "b (weight 300) holds {} bytes, a (weight 100) {}",
                        n(&b, "memory_used"),
                        n(&a, "memory_used")
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn check(&self, d: &Daemon, name: &str, plan: &Plan) -> Result<(), String> {
        let t0 = Instant::now();
        let peak = std::sync::atomic::AtomicU64::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        let runs = std::thread::scope(|s| {
            // The daemon's memory use, sampled while the guests run.
            s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(st) = d.stats() {
                        let used = st["memory_used_bytes"].as_u64().unwrap_or(0);
                        peak.fetch_max(used, std::sync::atomic::Ordering::Relaxed);
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
                },
                &|b| Self::at_barrier(d, name, b),
            );
            done.store(true, std::sync::atomic::Ordering::Relaxed);
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
            if run.timed_out {
                return Err(format!(
                    "{who} did not finish within {} s; console tail:\n{}",
                    self.timeout.as_secs(),
                    run.tail()
                ));
            }
            match run.verdict(name) {
                Some(Ok(())) => {}
                Some(Err(why)) => return Err(format!("{who}: {why}")),
                None => {
                    return Err(format!(
                        "{who} printed no verdict (QEMU {}); console tail:\n{}",
                        run.status,
                        run.tail()
                    ))
                }
            }
            let guest = run.guest_stats();
            // Counters are flattened into the client object.
            let host = d.client_stats(g.client).map_err(|e| e.to_string())?;
            let h = |k: &str| host[k].as_u64().unwrap_or(0);
            let g = |k: &str| guest.get(k).copied().unwrap_or(0);
            // The two sides count the same requests: any difference is a lost or phantom
            // request. The daemon counts swap and page-cache requests together.
            for (gk, hk) in [
                ("puts", "puts"),
                ("puts_refused", "puts_refused"),
                ("gets", "gets"),
                ("hits", "get_hits"),
                ("misses", "get_misses"),
            ] {
                let both = g(gk) + g(&format!("cache_{gk}"));
                if both != h(hk) {
                    return Err(format!(
                        "{who}: {gk}={} (swap {} + page cache {}) but daemon {hk}={}",
                        both,
                        g(gk),
                        g(&format!("cache_{gk}")),
                        h(hk)
                    ));
                }
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
                    return Err(format!(
                        "daemon saw only {} puts and {} gets",
                        h("puts"),
                        h("gets")
                    ))
                }
                "swap-host-full" if h("puts_refused") == 0 => {
                    return Err("the daemon refused no put".into())
                }
                "pagecache-hits" | "pagecache-lazy-register" if h("get_hits") < 10_000 => {
                    return Err(format!("the daemon served only {} hits", h("get_hits")))
                }
                _ => {}
            }
        }
        let stats = d.stats().map_err(|e| e.to_string())?;
        let limit = stats["memory_limit_bytes"].as_u64().unwrap_or(0);
        let peak = peak.into_inner();
        if peak > limit {
            return Err(format!(
                "the daemon used {peak} bytes, over its limit of {limit}"
            ));
        }
        Ok(())
    }

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

    fn demo(&self) -> Result<(), String> {
        let tmp = std::env::temp_dir().join(format!("tmem-vmtest-{}-demo", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let result = self.demo_in(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }

    fn demo_in(&self, tmp: &Path) -> Result<(), String> {
        let plan = self.plan("demo", tmp)?;
        let d = self.daemon(&plan.daemon_args)?;
        println!(
            "== vhost-tmem demo: a {GUEST_MIB} MiB guest swapping a 256 MiB workload into the \
             daemon, then reading a 192 MiB file twice through the page cache"
        );
        println!("   QEMU command line:");
        println!(
            "   {} {}",
            self.images.qemu.display(),
            qemu_args(&QemuArgs {
                accel: self.accel,
                smp: self.smp,
                kernel: &self.images.kernel,
                initramfs: &self.images.initramfs,
                socket: &d.path("tmem.sock"),
                swap: &d.path("swap-demo.img"),
                disks: &plan.guests[0].disks,
                control: None,
                cmdline: "tmem.scenario=demo",
            })
            .join(" ")
        );
        // The guest's swapoff and umount empty the pools at the end: sample the daemon while
        // it runs.
        let done = std::sync::atomic::AtomicBool::new(false);
        let (runs, peak) = std::thread::scope(|s| {
            let sampler = s.spawn(|| peak_usage(&d, &done));
            let runs = self.boot(
                &d,
                "demo",
                &plan.guests,
                How {
                    accel: self.accel,
                    timeout: self.timeout,
                    live: true,
                },
                &|_| Ok(()),
            );
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (runs, sampler.join().unwrap_or_default())
        });
        let run = runs?.pop().ok_or("no guest ran")?;
        let guest = run.guest_stats();
        let stats = d.stats().map_err(|e| e.to_string())?;
        let client = d.client_stats("guest").map_err(|e| e.to_string())?;
        let h = |k: &str| client[k].as_u64().unwrap_or(0);
        let g = |k: &str| guest.get(k).map_or("-".to_string(), u64::to_string);
        println!("\n== statistics, side by side");
        println!(
            "   {:<14} {:>12} {:>12} {:>12}",
            "", "guest swap", "guest cache", "daemon"
        );
        for (label, gk, hk) in [
            ("puts", "puts", "puts"),
            ("puts refused", "puts_refused", "puts_refused"),
            ("gets", "gets", "gets"),
            ("hits", "hits", "get_hits"),
            ("misses", "misses", "get_misses"),
        ] {
            println!(
                "   {label:<14} {:>12} {:>12} {:>12}",
                g(gk),
                g(&format!("cache_{gk}")),
                h(hk)
            );
        }
        println!(
            "   {:<14} {:>25} {:>12}",
            "flushed pages",
            format!("{} flushes, {} batches", g("flushes"), g("batches")),
            h("flushed_pages")
        );
        println!(
            "   {:<14} {:>25} {:>12}",
            "failures",
            g("failures"),
            h("get_errors")
        );
        if peak.stored_pages > 0 {
            println!(
                "   daemon at its peak: {} pages stored ({} MiB of guest memory) in {:.1} MiB \
                 ({} same-filled, {} raw, {:.1} MiB compressed)",
                peak.stored_pages,
                (peak.stored_pages * 4096) >> 20,
                peak.memory_used as f64 / f64::from(1 << 20),
                peak.same_filled_pages,
                peak.raw_pages,
                peak.compressed_bytes as f64 / f64::from(1 << 20)
            );
        }
        if std::env::var_os("TMEM_VMTEST_DEBUG").is_some() {
            println!("{stats:#}");
        }
        match run.verdict("demo") {
            Some(Ok(())) => Ok(()),
            Some(Err(why)) => Err(why),
            None => Err(format!(
                "the guest printed no verdict; console tail:\n{}",
                run.tail()
            )),
        }
    }
}

/// The daemon's client figures when it held the most pages.
#[derive(Default)]
struct Peak {
    stored_pages: u64,
    memory_used: u64,
    compressed_bytes: u64,
    same_filled_pages: u64,
    raw_pages: u64,
}

/// Samples the daemon twice a second until `done`; returns the largest sample.
fn peak_usage(d: &Daemon, done: &std::sync::atomic::AtomicBool) -> Peak {
    let mut peak = Peak::default();
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(c) = d.client_stats("guest") {
            let v = |k: &str| c[k].as_u64().unwrap_or(0);
            if v("stored_pages") > peak.stored_pages {
                peak = Peak {
                    stored_pages: v("stored_pages"),
                    memory_used: v("memory_used"),
                    compressed_bytes: v("compressed_bytes"),
                    same_filled_pages: v("same_filled_pages"),
                    raw_pages: v("raw_pages"),
                };
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    peak
}

struct QemuArgs<'a> {
    accel: &'a str,
    smp: u32,
    kernel: &'a Path,
    initramfs: &'a Path,
    socket: &'a Path,
    swap: &'a Path,
    disks: &'a [(PathBuf, bool)],
    /// The barrier port (the guest's ttyS1), a Unix socket the runner listens on.
    control: Option<&'a Path>,
    cmdline: &'a str,
}

fn qemu_args(q: &QemuArgs) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-serial",
        "stdio",
        "-accel",
        q.accel,
        "-smp",
        &q.smp.to_string(),
        "-m",
        &format!("{GUEST_MIB}M"),
        // vhost-user needs guest RAM the daemon can map: a shared memfd.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on"),
        "-machine",
        "pc,memory-backend=mem",
        "-kernel",
        &s(q.kernel),
        "-initrd",
        &s(q.initramfs),
        "-append",
        &format!("console=ttyS0 panic=-1 {}", q.cmdline),
        "-chardev",
        &format!("socket,id=tmem,path={}", s(q.socket)),
        // One control queue + one request queue; the config space is 24 bytes.
        "-device",
        "vhost-user-test-device-pci,chardev=tmem,virtio-id=63,num_vqs=2,config_size=24",
        "-drive",
        &format!("file={},format=raw,if=none,id=swap", s(q.swap)),
        "-device",
        "virtio-blk-pci,drive=swap",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for (i, (path, readonly)) in q.disks.iter().enumerate() {
        // A disk two guests use is not locked: one writes it, then both mount it read-only.
        args.push("-drive".into());
        args.push(format!(
            "file={},format=raw,if=none,id=disk{i},file.locking=off{}",
            s(path),
            if *readonly { ",readonly=on" } else { "" }
        ));
        args.push("-device".into());
        args.push(format!("virtio-blk-pci,drive=disk{i}"));
    }
    if let Some(c) = q.control {
        args.push("-chardev".into());
        args.push(format!("socket,id=barrier,path={}", s(c)));
        args.push("-serial".into());
        args.push("chardev:barrier".into());
    }
    args
}

/// Picks the accelerator: KVM only if a guest really boots with it (PVM's KVM here does not).
fn pick_accel(runner: &Runner, want: Accel) -> Result<&'static str, String> {
    match want {
        Accel::Kvm => return Ok("kvm"),
        Accel::Tcg => return Ok("tcg"),
        Accel::Auto => {}
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("accelerator: tcg (/dev/kvm is PVM, which cannot boot standard kernels)");
        return Ok("tcg");
    }
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        eprintln!("accelerator: tcg (no usable /dev/kvm)");
        return Ok("tcg");
    }
    let tmp = std::env::temp_dir().join(format!("tmem-vmtest-{}-probe", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let plan = runner.plan("boot-probe", &tmp);
    let booted = plan.and_then(|plan| {
        let d = runner.daemon(&plan.daemon_args)?;
        let runs = runner.boot(
            &d,
            "boot-probe",
            &plan.guests,
            How {
                accel: "kvm",
                timeout: Duration::from_secs(60),
                live: false,
            },
            &|_| Ok(()),
        )?;
        Ok(runs.iter().all(|r| r.verdict("boot-probe") == Some(Ok(()))))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    if booted? {
        eprintln!("accelerator: kvm (a probe guest booted)");
        Ok("kvm")
    } else {
        eprintln!("accelerator: tcg (a probe guest did not boot under KVM)");
        Ok("tcg")
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let images = match Images::load(&root.join(&cli.images)).or_else(|_| Images::load(&cli.images))
    {
        Ok(i) => i,
        Err(e) => {
            eprintln!("tmem-vmtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut runner = Runner {
        images,
        accel: "tcg",
        timeout: Duration::from_secs(cli.timeout),
        smp: cli.smp,
        root,
    };
    runner.accel = match pick_accel(&runner, cli.accel) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tmem-vmtest: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.demo {
        return match runner.demo() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let names: Vec<String> = if cli.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        cli.scenarios.clone()
    };
    let mut failed = 0;
    for name in &names {
        let result = if SCENARIOS.contains(&name.as_str()) {
            runner.scenario(name)
        } else {
            Err(format!("unknown scenario (known: {})", SCENARIOS.join(" ")))
        };
        match result {
            Ok(()) => println!("scenario {name}: pass"),
            Err(why) => {
                failed += 1;
                // The verdict stays on one line; details follow it.
                let mut lines = why.lines();
                println!(
                    "scenario {name}: FAIL ({})",
                    lines.next().unwrap_or_default()
                );
                for l in lines {
                    println!("    {l}");
                }
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
