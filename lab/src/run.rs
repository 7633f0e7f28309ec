// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Runs an experiment: mode after mode, every guest of a mode at once against a fresh daemon,
//! each guest's samples and barrier requests read from its second serial port, the daemon's
//! statistics polled once a second, a progress line per guest. Ctrl-C (or SIGTERM) stops the
//! guests; what was measured so far is written out, marked incomplete. The outputs are
//! rewritten after every mode, so a run cut short still leaves its data.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tmem_testguest::daemon::Daemon;
use tmem_vmtest::barrier::{self, Barriers, Port};
use tmem_vmtest::boot::Run;
use tmem_vmtest::disks::{make_ext4, sparse, DATA_UUID};
use tmem_vmtest::qemu::{qemu_args, QemuArgs, CONFIG_SIZE};
use tmem_vmtest::Runner;

use crate::error::{Error, Result};
use crate::experiment::{Experiment, Mode};
use crate::report;
use crate::series::{self, compare, mode_result, parse_kv, Outcome, Results, Sample, DAEMON_KEYS};

const MIB: u64 = 1 << 20;

/// Set by SIGINT and SIGTERM.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM stop the guests instead of the lab.
pub fn catch_interrupts() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler only stores
        // to an atomic, which is async-signal-safe.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error::Signal(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// What the reader threads pass on.
enum Event {
    Sample(usize, BTreeMap<String, u64>),
    Barrier(usize, String),
    Result(usize, BTreeMap<String, u64>),
    Verdict(usize, String),
}

/// Everything measured so far, and where it goes.
struct Outputs<'a> {
    dir: &'a Path,
    e: &'a Experiment,
    accel: &'a str,
    samples: Vec<Sample>,
    modes: Vec<series::ModeResult>,
}

impl Outputs<'_> {
    /// Writes data.csv, result.json, report.md and the plots.
    fn write(&mut self, complete: bool) -> Result<Results> {
        let path = self.dir.join("data.csv");
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Write { path, source }
        };
        let mut f = std::io::BufWriter::new(File::create(&path).map_err(werr(&path))?);
        series::write_csv(&mut f, &self.samples)
            .and_then(|()| f.flush())
            .map_err(werr(&path))?;
        let mut modes = self.modes.clone();
        let targets = compare(&mut modes);
        let r = Results {
            experiment: self.e.name.clone(),
            description: self.e.description.clone(),
            accel: self.accel.to_string(),
            complete: complete && modes.iter().all(|m| m.complete),
            budget_bytes: self.e.budget.0,
            modes,
            targets,
        };
        let path = self.dir.join("result.json");
        let json = serde_json::to_string_pretty(&r).expect("results serialize");
        std::fs::write(&path, json + "\n").map_err(werr(&path))?;
        report::write(self.dir, self.e, &r, &self.samples)?;
        Ok(r)
    }
}

/// Runs every mode of `e` with `runner`'s images and accelerator; writes into `out`.
pub fn run(runner: &Runner, e: &Experiment, modes: &[Mode], out: &Path) -> Result<Results> {
    let mk = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| Error::Write {
            path: p.to_path_buf(),
            source,
        })
    };
    mk(out)?;
    mk(&out.join("logs"))?;
    let mut outputs = Outputs {
        dir: out,
        e,
        accel: runner.accel,
        samples: Vec::new(),
        modes: Vec::new(),
    };
    let names: Vec<String> = e.guests.iter().map(|g| g.name.clone()).collect();
    for &mode in modes {
        if interrupted() {
            break;
        }
        eprintln!("== mode {mode}");
        let m = run_mode(runner, e, mode, out)?;
        eprintln!(
            "== mode {mode}: {:.0} s, {}",
            m.seconds,
            if m.complete { "complete" } else { "incomplete" }
        );
        outputs.samples.extend(m.samples);
        let r = mode_result(
            mode,
            &names,
            &outputs.samples,
            m.outcomes,
            m.complete,
            m.seconds,
        );
        outputs.modes.push(r);
        outputs.write(false)?;
    }
    let all = !interrupted() && outputs.modes.len() == modes.len();
    outputs.write(all)
}

/// What one mode left.
struct ModeRun {
    samples: Vec<Sample>,
    outcomes: Vec<Outcome>,
    complete: bool,
    seconds: f64,
}

/// A guest's QEMU and its serial port.
struct Guest {
    child: Child,
    port: UnixStream,
    status: Option<String>,
}

fn kill(guests: &mut [Guest]) {
    for g in guests.iter_mut() {
        if g.status.is_none() {
            let _ = g.child.kill();
            g.status = g.child.wait().ok().map(|s| s.to_string());
        }
    }
}

/// Copies a QEMU output stream into its log; passes the guest's verdict on.
fn read_console(
    stream: Box<dyn std::io::Read + Send>,
    log: Arc<Mutex<File>>,
    i: usize,
    tx: Sender<Event>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let _ = writeln!(log.lock().expect("console log"), "{line}");
            if let Some(v) = line.trim_end().strip_prefix("guest-result lab: ") {
                let _ = tx.send(Event::Verdict(i, v.to_string()));
            }
        }
    })
}

/// Reads guest `i`'s serial port: samples, barriers, the result.
fn read_port(stream: UnixStream, i: usize, tx: Sender<Event>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let line = line.trim_end_matches('\r');
            let ev = if let Some(rest) = line.strip_prefix("S ") {
                Event::Sample(i, parse_kv(rest))
            } else if let Some(name) = line.strip_prefix("B ") {
                Event::Barrier(i, name.trim().to_string())
            } else if let Some(rest) = line.strip_prefix("R ") {
                Event::Result(i, parse_kv(rest))
            } else {
                continue;
            };
            if tx.send(ev).is_err() {
                break;
            }
        }
    })
}

/// The progress line of one guest.
fn progress(e: &Experiment, mode: Mode, name: &str, t: f64, last: Option<&Sample>) -> String {
    let Some(s) = last else {
        return format!("  [{mode}] {name}: {t:4.0} s, booting");
    };
    let v = |k: &str| s.values.get(k).copied().unwrap_or(0);
    let total = e.ops_per_guest();
    let phase = if e.workload.kind == crate::experiment::Kind::Phase {
        format!(
            "phase {}/{} {}, ",
            v("phase") + 1,
            e.guests.len(),
            if v("active") == 1 { "growing" } else { "idle" }
        )
    } else {
        String::new()
    };
    format!(
        "  [{mode}] {name}: {t:4.0} s, {phase}{:3.0} % of {total} ops, from memory {}, from disk {}, held {:.1} MiB",
        v("ops") as f64 * 100.0 / total.max(1) as f64,
        s.served_from_memory(),
        s.disk_read_pages(),
        s.held_bytes() as f64 / MIB as f64
    )
}

/// Boots the guests of `mode`, collects their samples until they finish (or time out, or
/// Ctrl-C), and says how each ended.
fn run_mode(runner: &Runner, e: &Experiment, mode: Mode, out: &Path) -> Result<ModeRun> {
    let args = e.daemon_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(&args).map_err(Error::Daemon)?;
    let logs = out.join("logs");
    let (tx, rx) = channel();
    let mut guests: Vec<Guest> = Vec::new();
    let mut readers = Vec::new();
    let w = &e.workload;
    let booted = (|| -> Result<()> {
        for (i, g) in e.guests.iter().enumerate() {
            // Room for the whole working set: the swap disk never fills.
            let swap = d.path(&format!("swap-{}.img", g.name));
            sparse(&swap, 512.max(2 * w.working_set.0 / MIB + 64))?;
            let mut disks = Vec::new();
            if w.kind.uses_file() {
                let data = d.path(&format!("data-{}.img", g.name));
                make_ext4(&data, 256.max(2 * w.file_set.0 / MIB + 128), DATA_UUID)?;
                disks.push((data, false));
            }
            let port_path = d.path(&format!("port-{}.sock", g.name));
            let port = Port::bind(&port_path)?;
            let mut cmd = Command::new(&runner.images.qemu);
            for fw in &runner.images.firmware {
                cmd.arg("-L").arg(fw);
            }
            cmd.args(qemu_args(&QemuArgs {
                accel: runner.accel,
                smp: g.vcpus,
                mem_mib: e.ram(g, mode) / MIB,
                request_queues: 1,
                kernel: &runner.images.kernel,
                initramfs: &runner.images.initramfs,
                socket: &d.path(&format!("{}.sock", g.name)),
                swap: &swap,
                disks: &disks,
                control: Some(&port_path),
                cmdline: &e.cmdline(i, mode),
                reconnect: false,
                migratable: false,
                config_size: CONFIG_SIZE,
                qmp: None,
                incoming: None,
            }));
            // Its own process group: Ctrl-C reaches the lab, which stops the guests itself.
            let mut child = cmd
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|source| tmem_vmtest::error::Error::QemuSpawn {
                    qemu: runner.images.qemu.clone(),
                    source,
                })?;
            let stream = match port.accept(&mut child) {
                Ok(s) => s,
                Err(err) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(err.into());
                }
            };
            let log_path = logs.join(format!("{mode}-{}.log", g.name));
            let log = Arc::new(Mutex::new(File::create(&log_path).map_err(|source| {
                Error::Write {
                    path: log_path.clone(),
                    source,
                }
            })?));
            readers.push(read_console(
                Box::new(child.stdout.take().expect("piped")),
                log.clone(),
                i,
                tx.clone(),
            ));
            readers.push(read_console(
                Box::new(child.stderr.take().expect("piped")),
                log,
                i,
                tx.clone(),
            ));
            readers.push(read_port(
                stream
                    .try_clone()
                    .map_err(tmem_vmtest::error::Error::ControlSocket)?,
                i,
                tx.clone(),
            ));
            guests.push(Guest {
                child,
                port: stream,
                status: None,
            });
        }
        Ok(())
    })();
    drop(tx);
    if let Err(err) = booted {
        kill(&mut guests);
        return Err(err);
    }

    let names: Vec<String> = e.guests.iter().map(|g| g.name.clone()).collect();
    let n = guests.len();
    let daemon_now: Mutex<BTreeMap<String, BTreeMap<String, u64>>> = Mutex::new(BTreeMap::new());
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let timeout = Duration::from_secs(e.timeout_s);
    let tty = std::io::stderr().is_terminal();
    let mut samples: Vec<Sample> = Vec::new();
    let mut last: Vec<Option<Sample>> = vec![None; n];
    let mut results: Vec<Option<BTreeMap<String, u64>>> = vec![None; n];
    let mut verdicts: Vec<Option<String>> = vec![None; n];
    let mut barriers = Barriers::new(n);
    let mut waiting = false;
    let (mut timed_out, mut stopped, mut stuck) = (false, false, false);
    let mut shown = 0usize;
    let mut next_progress = start + Duration::from_secs(if tty { 1 } else { 10 });

    std::thread::scope(|s| {
        // The daemon's view of each client, polled once a second and attached to the guest's
        // next sample.
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Ok(st) = d.stats() {
                    let mut now = BTreeMap::new();
                    for c in st["clients"].as_array().into_iter().flatten() {
                        let name = c["name"].as_str().unwrap_or_default().to_string();
                        let vals = DAEMON_KEYS
                            .iter()
                            .map(|(k, json)| (k.to_string(), c[*json].as_u64().unwrap_or(0)))
                            .collect();
                        now.insert(name, vals);
                    }
                    *daemon_now.lock().expect("daemon stats") = now;
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::Sample(i, mut values)) => {
                    if let Some(dv) = daemon_now.lock().expect("daemon stats").get(&names[i]) {
                        values.extend(dv.iter().map(|(k, v)| (k.clone(), *v)));
                    }
                    let sample = Sample {
                        mode,
                        guest: names[i].clone(),
                        t: start.elapsed().as_secs_f64(),
                        values,
                    };
                    last[i] = Some(sample.clone());
                    samples.push(sample);
                }
                Ok(Event::Barrier(i, name)) => {
                    waiting = true;
                    if barriers.arrive(i, &name) {
                        let mut ports: Vec<UnixStream> = guests
                            .iter()
                            .filter_map(|g| g.port.try_clone().ok())
                            .collect();
                        barrier::release(&mut ports, &name);
                        waiting = barriers.pending();
                    }
                }
                Ok(Event::Result(i, kv)) => results[i] = Some(kv),
                Ok(Event::Verdict(i, v)) => verdicts[i] = Some(v),
                Err(_) => {}
            }
            for g in guests.iter_mut() {
                if g.status.is_none() {
                    if let Ok(Some(st)) = g.child.try_wait() {
                        g.status = Some(st.to_string());
                    }
                }
            }
            if guests.iter().all(|g| g.status.is_some()) {
                break;
            }
            // A guest that is gone can never reach the barrier the others wait at.
            if waiting && guests.iter().any(|g| g.status.is_some()) {
                stuck = true;
            }
            timed_out = start.elapsed() > timeout;
            stopped = interrupted();
            if timed_out || stopped || stuck {
                kill(&mut guests);
                break;
            }
            if Instant::now() >= next_progress {
                let t = start.elapsed().as_secs_f64();
                let lines: Vec<String> = names
                    .iter()
                    .zip(&last)
                    .map(|(g, l)| progress(e, mode, g, t, l.as_ref()))
                    .collect();
                let mut err = std::io::stderr().lock();
                if tty && shown > 0 {
                    // Back to the first progress line, to redraw them in place.
                    let _ = write!(err, "\x1b[{shown}F");
                }
                for l in &lines {
                    let _ = writeln!(err, "{}{l}", if tty { "\x1b[2K" } else { "" });
                }
                shown = lines.len();
                next_progress += Duration::from_secs(if tty { 1 } else { 10 });
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    let seconds = start.elapsed().as_secs_f64();
    // The readers end with QEMU's streams and ports; the last events may still be queued.
    for r in readers {
        let _ = r.join();
    }
    for ev in rx.try_iter() {
        match ev {
            Event::Result(i, kv) => results[i] = Some(kv),
            Event::Verdict(i, v) => verdicts[i] = Some(v),
            Event::Sample(i, values) => samples.push(Sample {
                mode,
                guest: names[i].clone(),
                t: seconds,
                values,
            }),
            Event::Barrier(..) => {}
        }
    }
    let _ = std::fs::copy(
        d.path("daemon.log"),
        logs.join(format!("{mode}-daemon.log")),
    );

    let mut outcomes = Vec::new();
    for (i, g) in guests.iter().enumerate() {
        let r = results[i].clone().unwrap_or_default();
        let console = std::fs::read_to_string(logs.join(format!("{mode}-{}.log", names[i])))
            .unwrap_or_default();
        // The operations of the last sample: the count when there is no result line.
        let sampled = samples
            .iter()
            .rev()
            .find(|s| s.guest == names[i])
            .and_then(|s| s.values.get("ops").copied());
        let run = Run {
            console,
            timed_out,
            status: g.status.clone().unwrap_or_default(),
        };
        let verdict = if stopped {
            "stopped (Ctrl-C)".to_string()
        } else if timed_out {
            format!("stopped: timed out after {} s", e.timeout_s)
        } else if let Some(p) = run.kernel_problem() {
            format!("kernel: {}", p.lines().next().unwrap_or_default().trim())
        } else {
            match &verdicts[i] {
                Some(v) if v == "pass" && sampled.is_none() => {
                    "no sample reached the host (second serial port)".to_string()
                }
                Some(v) if v == "pass" && r.get("ok") == Some(&1) => "pass".to_string(),
                Some(v) => v.clone(),
                None if stuck => "stopped: another guest ended while this one waited".into(),
                None => format!("no verdict (QEMU {})", run.status),
            }
        };
        outcomes.push(Outcome {
            name: names[i].clone(),
            ops: r.get("ops").copied().or(sampled).unwrap_or(0),
            bad: r.get("bad").copied().unwrap_or(0),
            verdict,
        });
    }
    let complete = outcomes.iter().all(|o| o.verdict == "pass");
    for o in &outcomes {
        eprintln!("  [{mode}] {}: {} ops, {}", o.name, o.ops, o.verdict);
    }
    Ok(ModeRun {
        samples,
        outcomes,
        complete,
        seconds,
    })
}

/// The images file: `PATH` as given, else relative to the workspace root.
pub fn images_path(given: &Path) -> PathBuf {
    if given.exists() {
        return given.to_path_buf();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(given)
}
