// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! QEMU's command line for a test guest, and the choice of accelerator.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;

use crate::boot::How;
use crate::error::{Error, Result};
use crate::Runner;

/// Guest RAM for every scenario; the workloads touch about twice as much.
pub const GUEST_MIB: u64 = 128;

/// The accelerator asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM if a guest boots with it here, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// The device's config space (`struct virtio_tmem_config`, docs/virtio-tmem.md).
pub const CONFIG_SIZE: u16 = shared_proto::Config::SIZE as u16;

/// What differs between guests' command lines.
#[derive(Debug)]
pub struct QemuArgs<'a> {
    pub accel: &'a str,
    pub smp: u32,
    /// Guest RAM in MiB ([`GUEST_MIB`] in the scenarios).
    pub mem_mib: u64,
    /// Request queues of the tmem device (QEMU's `num_vqs` is one more: the control queue).
    pub request_queues: u16,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub socket: &'a Path,
    pub swap: &'a Path,
    pub disks: &'a [(PathBuf, bool)],
    /// The barrier port (the guest's ttyS1), a Unix socket the runner listens on.
    pub control: Option<&'a Path>,
    pub cmdline: &'a str,
    /// QEMU waits for the daemon at start and connects again after a disconnect
    /// (`reconnect-ms`, patch 0002), as an operator's attach line does.
    pub reconnect: bool,
    /// The device migrates with the daemon's state (`migratable=on`, patch 0003).
    pub migratable: bool,
    /// The device's config space in bytes ([`CONFIG_SIZE`]; 0 leaves `config_size` out, as an
    /// attach line that forgets it does).
    pub config_size: u16,
    /// A QMP socket QEMU listens on.
    pub qmp: Option<&'a Path>,
    /// `-incoming` (the target of a migration, or a snapshot to restore).
    pub incoming: Option<&'a str>,
}

/// QEMU's arguments (after any `-L` firmware directories).
pub fn qemu_args(q: &QemuArgs) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    // One host thread per vCPU: SMP races (the driver's queues, the swap hooks on two CPUs)
    // happen for real only with multi-threaded TCG.
    let accel = if q.accel == "tcg" && q.smp > 1 {
        "tcg,thread=multi"
    } else {
        q.accel
    };
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
        accel,
        "-smp",
        &q.smp.to_string(),
        "-m",
        &format!("{}M", q.mem_mib),
        // vhost-user needs guest RAM the daemon can map: a shared memfd.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={}M,share=on", q.mem_mib),
        "-machine",
        "pc,memory-backend=mem",
        "-kernel",
        &s(q.kernel),
        "-initrd",
        &s(q.initramfs),
        // no_timer_check: under TCG on a loaded host the IO-APIC timer check can time out and
        // panic the guest at early boot ("IO-APIC + timer doesn't work!").
        "-append",
        &format!(
            "console=ttyS0 panic=-1 no_timer_check {}{}",
            tsc_arg(q.accel),
            q.cmdline
        ),
        "-chardev",
        &format!(
            "socket,id=tmem,path={}{}",
            s(q.socket),
            if q.reconnect { ",reconnect-ms=200" } else { "" }
        ),
        // The control queue + the request queues, and the config space.
        "-device",
        &format!(
            "vhost-user-test-device-pci,chardev=tmem,virtio-id=63,num_vqs={}{}{}",
            1 + q.request_queues,
            if q.config_size > 0 {
                format!(",config_size={}", q.config_size)
            } else {
                String::new()
            },
            if q.migratable { ",migratable=on" } else { "" }
        ),
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
    if let Some(qmp) = q.qmp {
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", s(qmp)));
    }
    if let Some(from) = q.incoming {
        args.push("-incoming".into());
        args.push(from.into());
    }
    if let Some(c) = q.control {
        args.push("-chardev".into());
        args.push(format!("socket,id=barrier,path={}", s(c)));
        args.push("-serial".into());
        args.push("chardev:barrier".into());
    }
    args
}

/// `tsc_early_khz=N ` for TCG guests, whose TSC is the host's: the kernel's own calibration
/// against the emulated PIT goes wrong when the host is loaded (a guest once measured 56 MHz
/// instead of 2.6 GHz, its clock ran 46 times fast and the driver's 5 s timeout fired after
/// 0.1 s), so the runner measures the rate and hands it over.
fn tsc_arg(accel: &str) -> String {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    if accel != "tcg" {
        return String::new();
    }
    KHZ.get_or_init(host_tsc_khz)
        .map_or(String::new(), |khz| format!("tsc_early_khz={khz} "))
}

/// The host's TSC rate: the median of three 100 ms measurements against the monotonic clock.
#[cfg(target_arch = "x86_64")]
fn host_tsc_khz() -> Option<u64> {
    // SAFETY: RDTSC reads a counter; it touches no memory (x86_64 always has it).
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let mut rates: Vec<u64> = (0..3)
        .filter_map(|_| {
            let (t0, c0) = (std::time::Instant::now(), rdtsc());
            std::thread::sleep(std::time::Duration::from_millis(100));
            let (c1, t1) = (rdtsc(), std::time::Instant::now());
            let us = t1.duration_since(t0).as_micros() as u64;
            (us > 0).then(|| c1.wrapping_sub(c0) / us * 1000)
        })
        .collect();
    rates.sort_unstable();
    rates.get(1).copied().filter(|&khz| khz > 0)
}

#[cfg(not(target_arch = "x86_64"))]
fn host_tsc_khz() -> Option<u64> {
    None
}

/// Picks the accelerator: KVM only if a guest really boots with it (PVM's KVM here does not).
pub fn pick_accel(runner: &Runner, want: Accel) -> Result<&'static str> {
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
    std::fs::create_dir_all(&tmp).map_err(|source| Error::Path {
        path: tmp.clone(),
        source,
    })?;
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
                migrate: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_host_tsc_rate_is_plausible() {
        let khz = host_tsc_khz().expect("a rate");
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
        assert!(tsc_arg("tcg").starts_with("tsc_early_khz="));
        assert_eq!(tsc_arg("kvm"), "");
    }
}
