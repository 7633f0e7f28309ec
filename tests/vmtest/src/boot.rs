// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Boots the guests of one scenario at once: a QEMU process each, its console logged (and
//! scanned for barriers), until every guest is done, timed out or stuck.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tmem_testguest::daemon::Daemon;

use crate::barrier::{self, Barriers, Event, Port};
use crate::disks::{self, SWAP_MIB};
use crate::error::{Error, Result};
use crate::migrate::{Kind, MigrateTo, Qmp};
use crate::qemu::{qemu_args, QemuArgs, CONFIG_SIZE, GUEST_MIB};
use crate::Runner;

/// Scenarios whose QEMU connects again after the daemon ends its connection (`reconnect-ms`).
const RECONNECTING: &[&str] = &["daemon-upgrade", "qemu-reconnect", "device-return"];

/// One guest of a scenario.
#[derive(Debug)]
pub struct GuestSpec {
    /// The daemon client it is ("guest" in single-guest scenarios, else its role).
    pub client: &'static str,
    /// `a` or `b` in two-guest scenarios (passed as `tmem.role=`), empty otherwise.
    pub role: &'static str,
    /// The disks after the swap disk: /dev/vdb and /dev/vdc (image, read-only).
    pub disks: Vec<(PathBuf, bool)>,
    /// Virtual CPUs (the runner's `--smp` overrides it).
    pub cpus: u32,
    /// The device's request queues: the daemon's `--queues`, which QEMU must match.
    pub request_queues: u16,
}

/// How guests boot: accelerator, time limit, whether the first console is shown live, and
/// where the guest moves at a barrier named `migrate` (single-guest scenarios).
#[derive(Debug)]
pub struct How<'a> {
    pub accel: &'static str,
    pub timeout: Duration,
    pub live: bool,
    pub migrate: Option<&'a MigrateTo<'a>>,
}

/// One QEMU process of a guest, started.
struct Launched {
    child: Child,
    port: UnixStream,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// What differs between the QEMU processes of one guest (the source and the target of a
/// migration).
struct Launch<'a> {
    /// The daemon's socket.
    socket: PathBuf,
    /// The barrier port's socket.
    control: PathBuf,
    qmp: Option<PathBuf>,
    incoming: Option<String>,
    log: Arc<Mutex<File>>,
    show: bool,
    events: (usize, Sender<Event>),
    accel: &'static str,
    scenario: &'a str,
    swap: &'a std::path::Path,
}

/// What a guest run left behind.
#[derive(Debug)]
pub struct Run {
    pub console: String,
    pub timed_out: bool,
    pub status: String,
}

impl Run {
    /// The `guest-result NAME: ...` verdict.
    pub fn verdict(&self, name: &str) -> Option<std::result::Result<(), String>> {
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
    pub fn guest_stats(&self) -> BTreeMap<String, u64> {
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

    /// The first kernel report on the console (BUG, WARNING, lockdep, sleeping in atomic
    /// context, Oops, lockup), with the lines that follow it.
    pub fn kernel_problem(&self) -> Option<String> {
        kernel_problem(&self.console)
    }

    /// The end of the console, for failure messages.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// The kernel's last messages on the console (lines with a `[ seconds]` stamp), which the
    /// workload's own output may have pushed out of [`Self::tail`].
    pub fn kernel_tail(&self) -> String {
        let lines: Vec<&str> = self
            .console
            .lines()
            .filter(|l| l.trim_start().starts_with('['))
            .collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// What a kernel prints when something is wrong. Lockdep and the atomic-sleep check report as
/// "WARNING:" and "BUG:" lines; the rest are the headers of Oopses, lockups and hung tasks.
const KERNEL_PROBLEMS: &[&str] = &[
    "BUG:",
    "WARNING:",
    "kernel BUG at",
    "Oops:",
    "general protection fault",
    "Kernel panic",
    "Call Trace:",
    "soft lockup",
    "hard LOCKUP",
    "blocked for more than",
    "list_add corruption",
    "list_del corruption",
];

/// The first kernel log line (`[ seconds] text`, PRINTK_TIME is on) that reports a problem,
/// and up to 30 lines after it. Lines of our own scripts and programs are not kernel lines.
fn kernel_problem(console: &str) -> Option<String> {
    let lines: Vec<&str> = console.lines().collect();
    let is_kernel = |l: &str| {
        l.trim_start()
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .is_some_and(|(t, _)| {
                let t = t.trim();
                !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.')
            })
    };
    let first = lines
        .iter()
        .position(|l| is_kernel(l) && KERNEL_PROBLEMS.iter().any(|p| l.contains(p)))?;
    Some(lines[first..lines.len().min(first + 30)].join("\n"))
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Copies a QEMU output stream to the console log (and stdout if `show`); with `events`,
/// reports barriers and the end of the stream as guest `i`'s.
fn read_console(
    stream: Box<dyn std::io::Read + Send>,
    log: Arc<Mutex<File>>,
    show: bool,
    events: Option<(usize, Sender<Event>)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if show {
                println!("  | {line}");
            }
            let _ = writeln!(log.lock().expect("console log"), "{line}");
            if let Some(name) = line.trim_end().strip_prefix("guest-sync ") {
                if let Some((i, tx)) = &events {
                    let _ = tx.send(Event::Sync(*i, name.to_string()));
                }
            }
        }
        if let Some((i, tx)) = events {
            let _ = tx.send(Event::Closed(i));
        }
    })
}

impl Runner {
    /// Starts one QEMU process of guest `g`, connected to its barrier port, its console
    /// copied to the log.
    fn launch(&self, g: &GuestSpec, l: Launch) -> Result<Launched> {
        let Launch {
            socket,
            control,
            qmp,
            incoming,
            log,
            show,
            events,
            accel,
            scenario,
            swap,
        } = l;
        let port = Port::bind(&control)?;
        let mut cmdline = format!("tmem.scenario={scenario}");
        if scenario == "suspend-resume" {
            // What the driver logs while the console would be suspended is what matters.
            cmdline.push_str(" no_console_suspend");
        }
        if !g.role.is_empty() {
            cmdline.push_str(&format!(" tmem.role={}", g.role));
        }
        let mut cmd = Command::new(&self.images.qemu);
        for fw in &self.images.firmware {
            cmd.arg("-L").arg(fw);
        }
        cmd.args(qemu_args(&QemuArgs {
            accel,
            smp: self.smp.unwrap_or(g.cpus),
            mem_mib: GUEST_MIB + self.images.guest_extra_mib,
            request_queues: g.request_queues,
            kernel: &self.images.kernel,
            initramfs: &self.images.initramfs,
            socket: &socket,
            swap,
            disks: &g.disks,
            control: Some(&control),
            cmdline: &cmdline,
            // The daemon restarts under the guest: QEMU must come back to it.
            reconnect: RECONNECTING.contains(&scenario),
            migratable: qmp.is_some(),
            // `short-config`: the attach line without `config_size`, a user's likely slip.
            config_size: if scenario == "short-config" {
                0
            } else {
                CONFIG_SIZE
            },
            qmp: qmp.as_deref(),
            incoming: incoming.as_deref(),
        }));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::QemuSpawn {
                qemu: self.images.qemu.clone(),
                source,
            })?;
        let port = match port.accept(&mut child) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().expect("piped"));
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().expect("piped"));
        let readers = vec![
            read_console(out, log.clone(), show, Some(events)),
            read_console(err, log, true, None),
        ];
        Ok(Launched {
            child,
            port,
            readers,
        })
    }

    /// Moves the guest of `source` (started with a QMP socket) as `m` says, to a QEMU
    /// launched as `target` says. Returns the target once the guest runs there; `None` if the
    /// migration was to fail and did, the guest running on at the source.
    fn migrate(
        &self,
        d: &Daemon,
        m: &MigrateTo,
        tag: &str,
        source: &mut Child,
        g: &GuestSpec,
        mut target: Launch,
    ) -> Result<Option<Launched>> {
        let mut qa = Qmp::connect(&d.path(&format!("qmp-{tag}.sock")))?;
        let qmp_b = target.qmp.clone().expect("a QMP socket");
        let t0 = Instant::now();
        let (outcome, mut launched): (_, std::result::Result<Launched, Launch>) = match m.kind {
            Kind::Live => {
                let uri = format!("unix:{}", d.path(&format!("migrate-{tag}.sock")).display());
                target.incoming = Some(uri.clone());
                let b = self.launch(g, target)?;
                // The target listens for the stream once its QMP socket is up.
                let _qb = Qmp::connect(&qmp_b)?;
                (qa.migrate(&uri)?, Ok(b))
            }
            Kind::Snapshot => {
                let file = d.path(&format!("snapshot-{tag}.img"));
                let _ = std::fs::remove_file(&file);
                let uri = format!("file:{}", file.display());
                target.incoming = Some(uri.clone());
                (qa.migrate(&uri)?, Err(target))
            }
        };
        let took = t0.elapsed();
        if !outcome.completed {
            if let Ok(b) = &mut launched {
                let _ = b.child.kill();
                let _ = b.child.wait();
            }
            if !m.refused {
                return Err(Error::Migration(format!(
                    "QEMU says it failed: {}",
                    outcome.info
                )));
            }
            let state = qa.status()?;
            if state != "running" {
                return Err(Error::Migration(format!(
                    "after the refused migration the source guest is {state}, not running"
                )));
            }
            eprintln!(
                "  {tag}: the target refused the guest ({}); it runs on at the source",
                outcome.info["error-desc"]
                    .as_str()
                    .unwrap_or("no reason given")
            );
            return Ok(None);
        }
        if m.refused {
            return Err(Error::Migration(
                "the migration completed although the target daemon has no room for the pages"
                    .into(),
            ));
        }
        // The source is done with the guest.
        qa.quit();
        let _ = source.wait();
        // A snapshot is restored by a QEMU started now, against the fresh daemon.
        let mut b = match launched {
            Ok(b) => b,
            Err(target) => self.launch(g, target)?,
        };
        let mut qb = Qmp::connect(&qmp_b)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let state = qb.status()?;
            if state == "running" {
                break;
            }
            if Instant::now() > deadline {
                let _ = b.child.kill();
                return Err(Error::Migration(format!(
                    "the target guest is {state} 120 s after the migration"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.report_migration(d, m, tag, &outcome, took)?;
        Ok(Some(b))
    }

    /// Checks both daemons after a migration (the source holds nothing of the guest any
    /// more, the target holds its pages) and prints the figures.
    fn report_migration(
        &self,
        d: &Daemon,
        m: &MigrateTo,
        tag: &str,
        outcome: &crate::migrate::Outcome,
        took: Duration,
    ) -> Result<()> {
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        // The source's pools go when its QEMU disconnects.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let a = d.client_stats("guest").map_err(Error::Daemon)?;
            let pools = a["pools"].as_array().map_or(0, Vec::len);
            if pools == 0 && n(&a, "stored_pages") == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Migration(format!(
                    "the source daemon still holds {pools} pools ({} pages) of the guest",
                    n(&a, "stored_pages")
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let b = m.daemon.client_stats("guest").map_err(Error::Daemon)?;
        let pools = b["pools"].as_array().cloned().unwrap_or_default();
        let held = |persistent: bool| -> u64 {
            pools
                .iter()
                .filter(|p| (p["kind"] == "persistent") == persistent)
                .map(|p| n(p, "stored_pages"))
                .sum()
        };
        let (persistent, ephemeral) = (held(true), held(false));
        if persistent == 0 {
            return Err(Error::Migration(format!(
                "the target daemon holds no persistent page of the guest: {b}"
            )));
        }
        let (pages, stored, sent) = crate::migrate::saved_state(&d.log()).unwrap_or_default();
        eprintln!(
            "  {tag}: migrated in {:.1} s, downtime {} ms, RAM {} MiB sent; device state: {pages} \
             pages, {stored} bytes stored, {sent} bytes sent ({:.0} bytes per page, {:.3}x the \
             stored size); the target holds {persistent} persistent and {ephemeral} ephemeral pages",
            took.as_secs_f64(),
            outcome.n("downtime"),
            outcome.n("ram.transferred") >> 20,
            sent as f64 / pages.max(1) as f64,
            sent as f64 / stored.max(1) as f64,
        );
        Ok(())
    }

    /// Boots `guests` at once for `scenario`, each against `{dir}/CLIENT.sock` (or
    /// `tmem.sock` for the single client `guest`). Guests meet at barriers: once every guest
    /// printed `guest-sync NAME`, `at_barrier(NAME)` runs and NAME is written back to each
    /// guest's second serial port. A failed `at_barrier` stops the guests. With `live`, the
    /// first guest's console is copied to stdout as it comes.
    pub fn boot(
        &self,
        d: &Daemon,
        scenario: &str,
        guests: &[GuestSpec],
        how: How,
        at_barrier: &dyn Fn(&str) -> Result<()>,
    ) -> Result<Vec<Run>> {
        let How {
            accel,
            timeout,
            live,
            migrate,
        } = how;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut children = Vec::new();
        let mut ports = Vec::new();
        let mut readers = Vec::new();
        let mut consoles = Vec::new();
        let mut logs = Vec::new();
        if migrate.is_some() && guests.len() != 1 {
            return Err(Error::Migration(
                "only single-guest scenarios migrate".into(),
            ));
        }
        for (i, g) in guests.iter().enumerate() {
            let tag = if g.role.is_empty() {
                scenario.to_string()
            } else {
                format!("{scenario}-{}", g.role)
            };
            let swap = d.path(&format!("swap-{tag}.img"));
            disks::sparse(&swap, SWAP_MIB)?;
            let socket = if g.client == "guest" {
                d.path("tmem.sock")
            } else {
                d.path(&format!("{}.sock", g.client))
            };
            let console_path = d.path(&format!("console-{tag}.log"));
            let log = Arc::new(Mutex::new(File::create(&console_path).map_err(
                |source| Error::Path {
                    path: console_path.clone(),
                    source,
                },
            )?));
            consoles.push(console_path);
            logs.push(log.clone());
            let launched = self.launch(
                g,
                Launch {
                    socket,
                    control: d.path(&format!("control-{tag}.sock")),
                    qmp: migrate.map(|_| d.path(&format!("qmp-{tag}.sock"))),
                    incoming: None,
                    log,
                    show: live && i == 0,
                    events: (i, tx.clone()),
                    accel,
                    scenario,
                    swap: &swap,
                },
            );
            match launched {
                Ok(l) => {
                    children.push(l.child);
                    ports.push(l.port);
                    readers.extend(l.readers);
                }
                Err(e) => {
                    kill_all(&mut children);
                    return Err(e);
                }
            }
        }
        // The target of a migration reports as the guest it continues.
        let target_events = tx.clone();
        drop(tx);

        let start = Instant::now();
        let n = guests.len();
        let mut barriers = Barriers::new(n);
        let mut closed = vec![false; n];
        let mut status = vec![None; n];
        let mut timed_out = false;
        let mut barrier_error = None;
        // Past a barrier named `suspend` the guests go to sleep (suspend-to-idle) with their
        // second serial port as a wakeup source: a byte on it wakes them. One a second, until
        // the next barrier, as a byte sent before a guest is asleep wakes nothing. (QEMU's RTC
        // alarm cannot wake a guest from suspend-to-idle: it raises no ACPI RTC event unless the
        // whole machine is suspended.)
        let mut waking: Option<Instant> = None;
        while status.iter().any(Option::is_none) {
            if waking.is_some_and(|t| t.elapsed() >= Duration::from_secs(1)) {
                for p in ports.iter_mut() {
                    let _ = p.write_all(b"\n");
                }
                waking = Some(Instant::now());
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Event::Sync(i, name)) => {
                    waking = None;
                    if barriers.arrive(i, &name) {
                        let mut checked = at_barrier(&name);
                        if let (Ok(()), Some(m), "migrate") = (&checked, migrate, name.as_str()) {
                            let g = &guests[0];
                            let tag = scenario.to_string();
                            let target = Launch {
                                socket: m.daemon.path("tmem.sock"),
                                control: d.path(&format!("control-{tag}-target.sock")),
                                qmp: Some(d.path(&format!("qmp-{tag}-target.sock"))),
                                incoming: None,
                                log: logs[0].clone(),
                                show: live,
                                events: (0, target_events.clone()),
                                accel,
                                scenario,
                                swap: &d.path(&format!("swap-{tag}.img")),
                            };
                            match self.migrate(d, m, &tag, &mut children[0], g, target) {
                                Ok(Some(moved)) => {
                                    let source = std::mem::replace(&mut children[0], moved.child);
                                    drop(source);
                                    ports[0] = moved.port;
                                    readers.extend(moved.readers);
                                }
                                Ok(None) => {}
                                Err(e) => checked = Err(e),
                            }
                        }
                        if let Err(e) = checked {
                            barrier_error = Some(Error::Barrier {
                                name: name.clone(),
                                source: Box::new(e),
                            });
                            kill_all(&mut children);
                        }
                        barrier::release(&mut ports, &name);
                        if name == "suspend" {
                            waking = Some(Instant::now());
                        }
                    }
                }
                Ok(Event::Closed(i)) => closed[i] = true,
                Err(_) => {}
            }
            for (i, c) in children.iter_mut().enumerate() {
                if status[i].is_none() {
                    if let Some(st) = c.try_wait().map_err(Error::Process)? {
                        status[i] = Some(st.to_string());
                    }
                }
            }
            // A guest that is gone can never reach the barrier the others wait at.
            let stuck =
                barriers.pending() && status.iter().zip(&closed).any(|(s, c)| s.is_some() && *c);
            if start.elapsed() > timeout || stuck {
                timed_out = start.elapsed() > timeout;
                for (i, c) in children.iter_mut().enumerate() {
                    if status[i].is_none() {
                        let _ = c.kill();
                        status[i] = Some(c.wait().map_err(Error::Process)?.to_string());
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(console: &str) -> Run {
        Run {
            console: console.into(),
            timed_out: false,
            status: "exit status: 0".into(),
        }
    }

    #[test]
    fn kernel_reports_are_found_and_our_lines_are_not() {
        let clean = "[    0.000000] Linux version 6.12\n\
                     [    0.100000] ... MAX_LOCKDEP_SUBCLASSES:  8\n\
                     device-loss: heartbeat 3.1\n\
                     guest-result swap-integrity: FAIL (kernel BUG, WARNING or lockup)\n";
        assert_eq!(run(clean).kernel_problem(), None);
        let splat = format!(
            "{clean}[   12.345678] ======================================================\n\
             [   12.345679] WARNING: possible circular locking dependency detected\n\
             [   12.345680] 6.12.0 #1 Not tainted\n"
        );
        let p = run(&splat).kernel_problem().expect("lockdep splat");
        assert!(p.starts_with("[   12.345679] WARNING: possible circular locking"));
        assert!(p.ends_with("Not tainted"));
        let sleep = "[ 3.2] BUG: sleeping function called from invalid context at mm/x.c:1\n";
        assert!(run(sleep).kernel_problem().is_some());
        // What `make vm-test-kasan` looks for.
        let kasan = "[ 7.1] BUG: KASAN: slab-use-after-free in tmem_x+0x1/0x2\n";
        assert!(run(kasan).kernel_problem().is_some());
        assert!(
            run("[ 99.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!\n")
                .kernel_problem()
                .is_some()
        );
    }

    #[test]
    fn verdicts() {
        let r = run("boot\nguest-result swap-integrity: pass\n");
        assert_eq!(r.verdict("swap-integrity"), Some(Ok(())));
        assert_eq!(r.verdict("two-guests"), None);
        let r = run("guest-result swap-unload: FAIL (rmmod tmem)  \n");
        assert_eq!(r.verdict("swap-unload"), Some(Err("rmmod tmem".into())));
    }

    #[test]
    fn the_kernel_tail_skips_the_workload_lines() {
        let mut console = String::from("[    6.7] tmem: device broken\n");
        for i in 0..40 {
            console.push_str(&format!("device-loss: heartbeat {i}\n"));
        }
        let r = run(&console);
        assert_eq!(r.kernel_tail(), "[    6.7] tmem: device broken");
        assert!(!r.tail().contains("tmem"));
    }

    #[test]
    fn the_last_stats_line_counts() {
        let r = run("guest-stats puts=1 gets=2\nguest-stats puts=10 gets=20 module=absent\n");
        let s = r.guest_stats();
        assert_eq!((s["puts"], s["gets"]), (10, 20));
        assert!(!s.contains_key("module"));
        assert!(run("nothing").guest_stats().is_empty());
    }
}
