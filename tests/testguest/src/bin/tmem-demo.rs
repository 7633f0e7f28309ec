// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `make demo-userspace`: the vhost-tmem daemon serving two userspace guests over vhost-user.
//!
//! Each guest swaps a working set into a persistent pool and streams "file" pages through an
//! ephemeral pool under a host limit small enough to force eviction, then reads everything
//! back and checks every byte. The daemon's statistics are printed at the end, as
//! `vhost-tmem stats` reports them.

use std::process::ExitCode;

use shared_proto::{Status, PAGE_SIZE};
use tmem_testguest::daemon::Daemon;
use tmem_testguest::{pages, Guest, GuestOptions, Req};

const SWAP_PAGES: u64 = 20_000;
const CACHE_PAGES: u64 = 40_000;

fn run_guest(d: &Daemon, name: &str, seed: u64) -> Result<(Guest, u64, u64, u64), String> {
    let mut g = Guest::connect(
        d.path(&format!("{name}.sock")),
        GuestOptions {
            request_queues: 2,
            ..Default::default()
        },
    )
    .map_err(|e| format!("{name}: connect: {e}"))?;
    let swap = g.create_pool(true, None).map_err(|e| e.to_string())?;
    let cache = g.create_pool(false, None).map_err(|e| e.to_string())?;
    let err = |e: tmem_testguest::Error| format!("{name}: {e}");

    // Swap-out: persistent pages; every accepted one must come back.
    let data: Vec<Vec<u8>> = (0..SWAP_PAGES).map(|i| pages::page(seed + i)).collect();
    let mut refused = vec![false; data.len()];
    let reqs = (0..data.len()).map(|i| {
        (
            i,
            Req::Put {
                pool: swap,
                oid: [0, 0, 0],
                index: i as u64,
                page: &data[i],
            },
        )
    });
    g.pipeline(0, 32, reqs, |c| refused[c.tag] = c.status != Status::Ok)
        .map_err(err)?;
    // Page cache: clean pages the guest can always reread; the host may drop them.
    let files: Vec<Vec<u8>> = (0..CACHE_PAGES)
        .map(|i| pages::page(seed + 1_000_000 + i))
        .collect();
    let reqs = (0..files.len()).map(|i| {
        (
            i,
            Req::Put {
                pool: cache,
                oid: [1 + i as u64 / 1000, 0, 0],
                index: i as u64 % 1000,
                page: &files[i],
            },
        )
    });
    g.pipeline(1, 32, reqs, |_| {}).map_err(err)?;

    // Swap-in and cache reads, verified byte for byte.
    let mut bad = 0u64;
    let reqs = (0..data.len()).map(|i| {
        (
            i,
            Req::Get {
                pool: swap,
                oid: [0, 0, 0],
                index: i as u64,
                exclusive: false,
            },
        )
    });
    g.pipeline(0, 32, reqs, |c| {
        let ok = match c.status {
            Status::Ok => c.page() == data[c.tag].as_slice(),
            _ => refused[c.tag],
        };
        bad += (!ok) as u64;
    })
    .map_err(err)?;
    let (mut hits, mut misses) = (0u64, 0u64);
    let reqs = (0..files.len()).map(|i| {
        (
            i,
            Req::Get {
                pool: cache,
                oid: [1 + i as u64 / 1000, 0, 0],
                index: i as u64 % 1000,
                exclusive: false,
            },
        )
    });
    g.pipeline(1, 32, reqs, |c| match c.status {
        Status::Ok => {
            hits += 1;
            bad += (c.page() != files[c.tag].as_slice()) as u64;
        }
        _ => misses += 1,
    })
    .map_err(err)?;
    // The connection stays open until the statistics are read: a disconnect frees the pools.
    Ok((g, hits, misses, bad))
}

fn main() -> ExitCode {
    let d = match Daemon::start(&[
        "--memory-limit",
        "96M",
        "--queues",
        "2",
        "--client",
        "name=vm1,socket={dir}/vm1.sock,weight=100",
        "--client",
        "name=vm2,socket={dir}/vm2.sock,weight=300,compressor=zstd:1",
    ]) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo: cannot start vhost-tmem: {e}");
            return ExitCode::from(1);
        }
    };
    println!(
        "vhost-tmem demo: one daemon (96 MiB limit, 2 request queues), two guests over vhost-user"
    );
    println!("  vm1: weight 100, lz4     vm2: weight 300, zstd:1");
    println!(
        "  each: {SWAP_PAGES} swap pages (persistent) + {CACHE_PAGES} page-cache pages (ephemeral), a mix of zero, same-filled, text, binary and random pages\n"
    );
    let t = std::time::Instant::now();
    let results: Vec<_> = std::thread::scope(|s| {
        let h: Vec<_> = [("vm1", 0u64), ("vm2", 50_000_000)]
            .into_iter()
            .map(|(n, seed)| {
                let d = &d;
                s.spawn(move || (n, run_guest(d, n, seed)))
            })
            .collect();
        h.into_iter()
            .map(|h| h.join().expect("guest thread"))
            .collect()
    });
    let secs = t.elapsed().as_secs_f64();
    let stats = match d.stats() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::from(1);
        }
    };
    let mut failed = false;
    println!(
        "{:<5} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>10} {:>7}",
        "guest", "puts", "gets", "hits", "misses", "evictions", "stored", "same", "memory", "ratio"
    );
    for c in stats["clients"].as_array().into_iter().flatten() {
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        let ratio = if n("memory_used") > 0 {
            (n("stored_pages") * PAGE_SIZE as u64) as f64 / n("memory_used") as f64
        } else {
            0.0
        };
        println!(
            "{:<5} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>9.1}M {:>6.2}x",
            c["name"].as_str().unwrap_or("?"),
            n("puts"),
            n("gets"),
            n("get_hits"),
            n("get_misses"),
            n("evictions"),
            n("stored_pages"),
            n("same_filled_pages"),
            n("memory_used") as f64 / (1 << 20) as f64,
            ratio
        );
    }
    println!();
    for (name, r) in results {
        match r {
            Ok((_guest, hits, misses, bad)) => {
                println!("{name}: page cache {hits} hits / {misses} misses (evicted or refused), {bad} mismatches");
                failed |= bad > 0;
            }
            Err(e) => {
                println!("{name}: FAILED: {e}");
                failed = true;
            }
        }
    }
    println!(
        "\ndaemon memory: {:.1} MiB used of {:.0} MiB; {:.1} s for the whole run (not a benchmark: see make bench)",
        stats["memory_used_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        stats["memory_limit_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
        secs
    );
    if failed {
        println!("demo FAILED");
        ExitCode::from(1)
    } else {
        println!("demo ok: every page that came back was byte-for-byte what was put");
        ExitCode::SUCCESS
    }
}
