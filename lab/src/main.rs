// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-tmem-lab`: memory-overcommit experiments in one command. An experiment file names
//! the guests, the host budget, the workload and the modes to compare (disk swap, in-guest
//! zswap, in-guest zram, tmem); the lab boots the guests of each mode under QEMU with the
//! images of `vm-images/build.sh`, samples every guest and the daemon once a second, and
//! writes `data.csv`, `result.json`, `report.md` and plots into the output directory.
//!
//! The parts: `experiment` (the file, its checks, what it means per mode), `run` (guests,
//! daemon, samples, progress, Ctrl-C), `series` (samples, CSV, the headline counts),
//! `report` (Markdown and plots), `error`.

mod error;
mod experiment;
#[cfg(test)]
mod labload_tests;
mod report;
mod run;
mod series;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tmem_vmtest::images::Images;
use tmem_vmtest::qemu::{self, Accel};
use tmem_vmtest::Runner;

use crate::error::{Error, Result};
use crate::experiment::{Experiment, Host, Mode};

/// Memory-overcommit experiments: the same guests and workload with disk swap, zswap, zram
/// and tmem, measured side by side.
#[derive(Debug, Parser)]
#[command(name = "vhost-tmem-lab")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs an experiment; writes data.csv, result.json, report.md and plots into DIR.
    Run {
        /// The experiment file (TOML; see experiments/default.toml).
        experiment: PathBuf,
        /// Where the results go (created if missing; earlier results there are replaced).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Only these modes (of the experiment's), in this order.
        #[arg(long = "mode", value_name = "MODE", value_parser = parse_mode)]
        modes: Vec<Mode>,
        /// Accelerator.
        #[arg(long, value_enum, default_value = "auto")]
        accel: Accel,
        /// The images file written by vm-images/build.sh.
        #[arg(long, default_value = "target/vm/images.env")]
        images: PathBuf,
    },
    /// Checks an experiment file and whether it fits on this machine; prints what each mode
    /// boots.
    Check { experiment: PathBuf },
}

fn parse_mode(s: &str) -> std::result::Result<Mode, String> {
    [Mode::Disk, Mode::Zswap, Mode::Zram, Mode::Tmem]
        .into_iter()
        .find(|m| m.name() == s)
        .ok_or_else(|| format!("unknown mode \"{s}\" (disk, zswap, zram, tmem)"))
}

/// Loads the experiment and refuses it if it cannot fit here.
fn load(path: &std::path::Path) -> Result<Experiment> {
    let e = Experiment::load(path)?;
    e.check_fits(Host::this())?;
    Ok(e)
}

fn check(path: &std::path::Path) -> Result<()> {
    let e = load(path)?;
    println!(
        "{}: {} guests, budget {}, workload {}, modes {}",
        e.name,
        e.guests.len(),
        e.budget,
        e.workload.kind.name(),
        e.modes
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for &m in &e.modes {
        for (i, g) in e.guests.iter().enumerate() {
            println!(
                "  {m:5} {}: {} MiB RAM, {} vCPU, kernel: {}",
                g.name,
                e.ram(g, m) >> 20,
                g.vcpus,
                e.cmdline(i, m)
            );
        }
    }
    println!("  daemon: {}", e.daemon_args().join(" "));
    Ok(())
}

fn run_cmd(
    path: &std::path::Path,
    out: &std::path::Path,
    modes: Vec<Mode>,
    accel: Accel,
    images: &std::path::Path,
) -> Result<bool> {
    let e = load(path)?;
    let modes = if modes.is_empty() {
        e.modes.clone()
    } else {
        if let Some(m) = modes.iter().find(|m| !e.modes.contains(m)) {
            return Err(Error::Invalid {
                key: "--mode".into(),
                why: format!("{m} is not among the experiment's modes"),
            });
        }
        modes
    };
    let images = Images::load(&run::images_path(images))?;
    let mut runner = Runner {
        images,
        accel: "tcg",
        timeout: Duration::from_secs(e.timeout_s),
        smp: None,
        root: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
    };
    runner.accel = qemu::pick_accel(&runner, accel)?;
    run::catch_interrupts()?;
    let r = run::run(&runner, &e, &modes, out)?;
    println!();
    print!("{}", report::summary_table(&r));
    println!(
        "\n{}: {} (report.md, data.csv, result.json, plots)",
        out.display(),
        if r.complete { "complete" } else { "INCOMPLETE" }
    );
    Ok(r.complete)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Check { experiment } => check(&experiment).map(|()| true),
        Cmd::Run {
            experiment,
            out,
            modes,
            accel,
            images,
        } => run_cmd(&experiment, &out, modes, accel, &images),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vhost-tmem-lab: {e}");
            ExitCode::FAILURE
        }
    }
}
