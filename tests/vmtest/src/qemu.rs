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

/// What differs between guests' command lines.
pub struct QemuArgs<'a> {
    pub accel: &'a str,
    pub smp: u32,
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
        // no_timer_check: under TCG on a loaded host the IO-APIC timer check can time out and
        // panic the guest at early boot ("IO-APIC + timer doesn't work!").
        "-append",
        &format!("console=ttyS0 panic=-1 no_timer_check {}", q.cmdline),
        "-chardev",
        &format!("socket,id=tmem,path={}", s(q.socket)),
        // The control queue + the request queues; the config space is 24 bytes.
        "-device",
        &format!(
            "vhost-user-test-device-pci,chardev=tmem,virtio-id=63,num_vqs={},config_size=24",
            1 + q.request_queues
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
    if let Some(c) = q.control {
        args.push("-chardev".into());
        args.push(format!("socket,id=barrier,path={}", s(c)));
        args.push("-serial".into());
        args.push("chardev:barrier".into());
    }
    args
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
