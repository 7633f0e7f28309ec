// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Boots the guests of one scenario at once: a QEMU process each, its console logged (and
//! scanned for barriers), until every guest is done, timed out or stuck.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tmem_testguest::daemon::Daemon;

use crate::barrier::{self, Barriers, Event, Port};
use crate::disks::{self, SWAP_MIB};
use crate::error::{Error, Result};
use crate::qemu::{qemu_args, QemuArgs, GUEST_MIB};
use crate::Runner;

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

/// How guests boot: accelerator, time limit, and whether the first console is shown live.
#[derive(Debug)]
pub struct How {
    pub accel: &'static str,
    pub timeout: Duration,
    pub live: bool,
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
        } = how;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut children = Vec::new();
        let mut ports = Vec::new();
        let mut readers = Vec::new();
        let mut consoles = Vec::new();
        for (i, g) in guests.iter().enumerate() {
            let tag = if g.role.is_empty() {
                scenario.to_string()
            } else {
                format!("{scenario}-{}", g.role)
            };
            let swap = d.path(&format!("swap-{tag}.img"));
            disks::sparse(&swap, SWAP_MIB)?;
            let control = d.path(&format!("control-{tag}.sock"));
            let port = Port::bind(&control)?;
            let socket = if g.client == "guest" {
                d.path("tmem.sock")
            } else {
                d.path(&format!("{}.sock", g.client))
            };
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
                mem_mib: GUEST_MIB,
                request_queues: g.request_queues,
                kernel: &self.images.kernel,
                initramfs: &self.images.initramfs,
                socket: &socket,
                swap: &swap,
                disks: &g.disks,
                control: Some(&control),
                cmdline: &cmdline,
                // The daemon restarts under the guest: QEMU must come back to it.
                reconnect: scenario == "daemon-upgrade",
            }));
            let mut child = match cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
            {
                Ok(c) => c,
                Err(source) => {
                    kill_all(&mut children);
                    return Err(Error::QemuSpawn {
                        qemu: self.images.qemu.clone(),
                        source,
                    });
                }
            };
            let stream = match port.accept(&mut child) {
                Ok(s) => s,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    kill_all(&mut children);
                    return Err(e);
                }
            };
            ports.push(stream);
            let console_path = d.path(&format!("console-{tag}.log"));
            let log = Arc::new(Mutex::new(File::create(&console_path).map_err(
                |source| Error::Path {
                    path: console_path.clone(),
                    source,
                },
            )?));
            consoles.push(console_path);
            let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().expect("piped"));
            let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().expect("piped"));
            readers.push(read_console(
                out,
                log.clone(),
                live && i == 0,
                Some((i, tx.clone())),
            ));
            readers.push(read_console(err, log, true, None));
            children.push(child);
        }
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
                        if let Err(e) = at_barrier(&name) {
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
