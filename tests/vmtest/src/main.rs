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

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use tmem_vmtest::images::Images;
use tmem_vmtest::qemu::{self, Accel};
use tmem_vmtest::{Runner, SCENARIOS};

/// Lines of a failed scenario's details repeated in the closing summary.
const SUMMARY_DETAIL_LINES: usize = 25;

/// Boots real guests that swap into vhost-tmem and checks what both sides report.
#[derive(Debug, Parser)]
#[command(name = "tmem-vmtest")]
struct Cli {
    /// Scenarios to run [default: all; `--list` names them].
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
    /// Virtual CPUs per guest [default: 2 in the swap scenarios, else 1].
    #[arg(long)]
    smp: Option<u32>,
    /// The images file written by vm-images/build.sh.
    #[arg(long, default_value = "target/vm/images.env")]
    images: PathBuf,
    /// Print the scenarios, in the order they run by default, and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.list {
        for s in SCENARIOS {
            println!("{s}");
        }
        return ExitCode::SUCCESS;
    }
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
    runner.accel = match qemu::pick_accel(&runner, cli.accel) {
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
    let mut failed: Vec<(&str, String)> = Vec::new();
    for name in &names {
        match runner.scenario(name) {
            Ok(()) => println!("scenario {name}: pass"),
            Err(why) => {
                // The verdict stays on one line; details follow it.
                let why = why.to_string();
                let mut lines = why.lines();
                println!(
                    "scenario {name}: FAIL ({})",
                    lines.next().unwrap_or_default()
                );
                for l in lines {
                    println!("    {l}");
                }
                failed.push((name, why));
            }
        }
    }
    if failed.is_empty() {
        return ExitCode::SUCCESS;
    }
    // CI keeps only the end of the output: name the failures again there, each with the
    // last lines of its details.
    println!("== {} of {} scenarios failed", failed.len(), names.len());
    for (name, why) in &failed {
        let lines: Vec<&str> = why.lines().collect();
        println!("scenario {name}: FAIL ({})", lines.first().unwrap_or(&""));
        let tail = lines.len().saturating_sub(1).min(SUMMARY_DETAIL_LINES);
        for l in &lines[lines.len() - tail..] {
            println!("    {l}");
        }
    }
    ExitCode::FAILURE
}
