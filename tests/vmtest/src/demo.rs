// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `make demo`: one guest under memory pressure (swap, then page cache) with its console
//! shown live, then the daemon's and the guest's statistics side by side.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tmem_testguest::daemon::Daemon;

use crate::boot::How;
use crate::error::{Error, Result};
use crate::qemu::{qemu_args, QemuArgs, CONFIG_SIZE, GUEST_MIB};
use crate::Runner;

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
fn peak_usage(d: &Daemon, done: &AtomicBool) -> Peak {
    let mut peak = Peak::default();
    while !done.load(Ordering::Relaxed) {
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

impl Runner {
    /// Runs the demo in a temporary directory.
    pub fn demo(&self) -> Result<()> {
        let tmp = std::env::temp_dir().join(format!("tmem-vmtest-{}-demo", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|source| Error::Path {
            path: tmp.clone(),
            source,
        })?;
        let result = self.demo_in(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }

    fn demo_in(&self, tmp: &Path) -> Result<()> {
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
                smp: self.smp.unwrap_or(plan.guests[0].cpus),
                mem_mib: GUEST_MIB + self.images.guest_extra_mib,
                request_queues: plan.guests[0].request_queues,
                kernel: &self.images.kernel,
                initramfs: &self.images.initramfs,
                socket: &d.path("tmem.sock"),
                swap: &d.path("swap-demo.img"),
                disks: &plan.guests[0].disks,
                control: None,
                cmdline: "tmem.scenario=demo",
                reconnect: false,
                migratable: false,
                config_size: CONFIG_SIZE,
                qmp: None,
                incoming: None,
            })
            .join(" ")
        );
        // The guest's swapoff and umount empty the pools at the end: sample the daemon while
        // it runs.
        let done = AtomicBool::new(false);
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
                    migrate: None,
                },
                &|_| Ok(()),
            );
            done.store(true, Ordering::Relaxed);
            (runs, sampler.join().unwrap_or_default())
        });
        let run = runs?.pop().ok_or(Error::NoGuestRan)?;
        let guest = run.guest_stats();
        let stats = d.stats().map_err(Error::Daemon)?;
        let client = d.client_stats("guest").map_err(Error::Daemon)?;
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
            Some(Err(why)) => Err(Error::DemoFailed(why)),
            None => Err(Error::DemoNoVerdict(run.tail())),
        }
    }
}
