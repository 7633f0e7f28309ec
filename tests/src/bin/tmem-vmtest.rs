// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `make vm-test` and `make demo`: real Linux guests under QEMU, swapping through the `tmem.ko`
//! driver into the vhost-tmem daemon.
//!
//! Each scenario boots a fresh guest (kernel, initramfs and QEMU from `vm-images/build.sh`)
//! against a fresh daemon. The guest runs the scenario's script and prints its verdict and its
//! driver counters; this runner then checks the daemon's statistics against them and prints
//! `scenario NAME: pass` or `scenario NAME: FAIL (why)`. On failure the guest console and the
//! daemon log are kept under `target/vm/logs/NAME/` (always with `TMEM_VMTEST_KEEP=1`).

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

const SCENARIOS: &[&str] = &[
    "swap-integrity",
    "swap-lazy-register",
    "swap-unload",
    "swap-host-full",
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
    /// swap-host-full.
    scenarios: Vec<String>,
    /// Run the demo instead: one guest under memory pressure, console shown live, then the
    /// daemon's and the guest's statistics side by side.
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

struct Runner {
    images: Images,
    accel: &'static str,
    timeout: Duration,
    smp: u32,
    root: PathBuf,
}

impl Runner {
    /// Boots one guest for `scenario` against the daemon's `tmem.sock`. With `live`, the
    /// console is copied to stdout as it comes.
    fn boot(
        &self,
        d: &Daemon,
        scenario: &str,
        accel: &str,
        timeout: Duration,
        live: bool,
    ) -> Result<Run, String> {
        let swap = d.path("swap.img");
        File::create(&swap)
            .and_then(|f| f.set_len(SWAP_MIB << 20))
            .map_err(|e| format!("cannot create {}: {e}", swap.display()))?;
        let console_path = d.path(&format!("console-{scenario}.log"));
        let mut cmd = Command::new(&self.images.qemu);
        for fw in &self.images.firmware {
            cmd.arg("-L").arg(fw);
        }
        cmd.args(qemu_args(
            accel,
            self.smp,
            &self.images.kernel,
            &self.images.initramfs,
            &d.path("tmem.sock"),
            &swap,
            &format!("tmem.scenario={scenario}"),
        ));
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.images.qemu.display()))?;
        // Copy stdout and stderr into the console log (and to our stdout when live).
        let mut readers = Vec::new();
        let log = std::sync::Arc::new(std::sync::Mutex::new(
            File::create(&console_path).map_err(|e| format!("{}: {e}", console_path.display()))?,
        ));
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().expect("piped"));
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().expect("piped"));
        for (stream, show) in [(out, live), (err, true)] {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if show {
                        println!("  | {line}");
                    }
                    let _ = writeln!(log.lock().expect("console log"), "{line}");
                }
            }));
        }
        let start = Instant::now();
        let (status, timed_out) = loop {
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                break (st.to_string(), false);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let st = child.wait().map_err(|e| e.to_string())?;
                break (st.to_string(), true);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        for r in readers {
            let _ = r.join();
        }
        let console = std::fs::read_to_string(&console_path).unwrap_or_default();
        Ok(Run {
            console,
            timed_out,
            status,
        })
    }

    fn daemon(&self, extra: &[&str]) -> Result<Daemon, String> {
        let mut args = vec!["--socket-path", "{dir}/tmem.sock", "--name", "guest"];
        args.extend_from_slice(extra);
        Daemon::start(&args).map_err(|e| format!("daemon: {e}"))
    }

    /// Runs one scenario; returns its verdict.
    fn scenario(&self, name: &str) -> Result<(), String> {
        let extra: &[&str] = match name {
            "swap-host-full" => &["--memory-limit", TINY_LIMIT],
            _ => &[],
        };
        let d = self.daemon(extra)?;
        let result = self.check(&d, name);
        if result.is_err() || std::env::var_os("TMEM_VMTEST_KEEP").is_some() {
            self.keep(&d, name);
        }
        result
    }

    fn check(&self, d: &Daemon, name: &str) -> Result<(), String> {
        let t0 = Instant::now();
        let run = self.boot(d, name, self.accel, self.timeout, false)?;
        eprintln!(
            "  {name}: guest ran {:.0} s ({})",
            t0.elapsed().as_secs_f64(),
            self.accel
        );
        if run.timed_out {
            return Err(format!(
                "guest did not finish within {} s; console tail:\n{}",
                self.timeout.as_secs(),
                run.tail()
            ));
        }
        match run.verdict(name) {
            Some(Ok(())) => {}
            Some(Err(why)) => return Err(format!("guest: {why}")),
            None => {
                return Err(format!(
                    "guest printed no verdict (QEMU {}); console tail:\n{}",
                    run.status,
                    run.tail()
                ))
            }
        }
        let guest = run.guest_stats();
        // Counters are flattened into the client object.
        let host = d.client_stats("guest").map_err(|e| e.to_string())?;
        let h = |k: &str| host[k].as_u64().unwrap_or(0);
        let g = |k: &str| guest.get(k).copied().unwrap_or(0);
        // The two sides count the same requests: any difference is a lost or phantom request.
        for (gk, hk) in [
            ("puts", "puts"),
            ("puts_refused", "puts_refused"),
            ("gets", "gets"),
            ("hits", "get_hits"),
            ("misses", "get_misses"),
        ] {
            if g(gk) != h(hk) {
                return Err(format!("guest {gk}={} but daemon {hk}={}", g(gk), h(hk)));
            }
        }
        match name {
            "swap-integrity" | "swap-lazy-register" if h("puts") < 1000 || h("gets") < 1000 => Err(
                format!("daemon saw only {} puts and {} gets", h("puts"), h("gets")),
            ),
            "swap-host-full" if h("puts_refused") == 0 => Err("the daemon refused no put".into()),
            _ => {
                eprintln!(
                    "  {name}: daemon puts {} (refused {}), gets {} (hits {}), flushed pages {}",
                    h("puts"),
                    h("puts_refused"),
                    h("gets"),
                    h("get_hits"),
                    h("flushed_pages")
                );
                Ok(())
            }
        }
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
                "  {name}: guest console and daemon log kept in {}",
                dest.display()
            );
        }
    }

    fn demo(&self) -> Result<(), String> {
        let d = self.daemon(&[])?;
        println!("== vhost-tmem demo: a {GUEST_MIB} MiB guest swapping a 256 MiB workload into the daemon");
        println!("   QEMU command line:");
        println!(
            "   {} {}",
            self.images.qemu.display(),
            qemu_args(
                self.accel,
                self.smp,
                &self.images.kernel,
                &self.images.initramfs,
                &d.path("tmem.sock"),
                &d.path("swap.img"),
                "tmem.scenario=demo"
            )
            .join(" ")
        );
        // The guest's swapoff empties the pool at the end: sample the daemon while it runs.
        let done = std::sync::atomic::AtomicBool::new(false);
        let (run, peak) = std::thread::scope(|s| {
            let sampler = s.spawn(|| peak_usage(&d, &done));
            let run = self.boot(&d, "demo", self.accel, self.timeout, true);
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (run, sampler.join().unwrap_or_default())
        });
        let run = run?;
        let guest = run.guest_stats();
        let stats = d.stats().map_err(|e| e.to_string())?;
        let client = d.client_stats("guest").map_err(|e| e.to_string())?;
        let h = |k: &str| client[k].as_u64().unwrap_or(0);
        let g = |k: &str| guest.get(k).map_or("-".to_string(), u64::to_string);
        println!("\n== statistics, side by side");
        println!("   {:<14} {:>12} {:>12}", "", "guest", "daemon");
        for (label, gk, hk) in [
            ("puts", "puts", "puts"),
            ("puts refused", "puts_refused", "puts_refused"),
            ("gets", "gets", "gets"),
            ("hits", "hits", "get_hits"),
            ("misses", "misses", "get_misses"),
            ("flushed pages", "flushes", "flushed_pages"),
            ("failures", "failures", "get_errors"),
        ] {
            println!("   {label:<14} {:>12} {:>12}", g(gk), h(hk));
        }
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

fn qemu_args(
    accel: &str,
    smp: u32,
    kernel: &Path,
    initramfs: &Path,
    socket: &Path,
    swap: &Path,
    cmdline: &str,
) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    [
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
        accel,
        "-smp",
        &smp.to_string(),
        "-m",
        &format!("{GUEST_MIB}M"),
        // vhost-user needs guest RAM the daemon can map: a shared memfd.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={GUEST_MIB}M,share=on"),
        "-machine",
        "pc,memory-backend=mem",
        "-kernel",
        &s(kernel),
        "-initrd",
        &s(initramfs),
        "-append",
        &format!("console=ttyS0 panic=-1 {cmdline}"),
        "-chardev",
        &format!("socket,id=tmem,path={}", s(socket)),
        // One control queue + one request queue; the config space is 24 bytes.
        "-device",
        "vhost-user-test-device-pci,chardev=tmem,virtio-id=63,num_vqs=2,config_size=24",
        "-drive",
        &format!("file={},format=raw,if=none,id=swap", s(swap)),
        "-device",
        "virtio-blk-pci,drive=swap",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
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
    let d = runner.daemon(&[])?;
    let run = runner.boot(&d, "boot-probe", "kvm", Duration::from_secs(60), false)?;
    if run.verdict("boot-probe") == Some(Ok(())) {
        eprintln!("accelerator: kvm (a probe guest booted)");
        Ok("kvm")
    } else {
        eprintln!("accelerator: tcg (a probe guest did not boot under KVM)");
        Ok("tcg")
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
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
