// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `--state-file`: a daemon hands its pools to the next one (restart, upgrade). The real
//! binary twice over the same file: pages come back byte for byte under the pool ids the guest
//! knows, bad files are refused with what is wrong, and SIGTERM in the middle of traffic loses
//! no acknowledged persistent put. The round trip prints the handover figures (run it with
//! `--nocapture`, release build: see the README).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use shared_proto::{Status, PAGE_SIZE};
use tmem_testguest::daemon::{self, Daemon};
use tmem_testguest::{Guest, GuestOptions, Req};

mod common;
use common::*;

const UUID: &str = "5eed5eed-0000-4000-8000-00000000ab1e";
const UUID_BYTES: [u8; 16] = [
    0x5e, 0xed, 0x5e, 0xed, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0xab, 0x1e,
];

/// A million pages in release builds (`make e2e-test`), a tenth in debug builds.
const PAGES: u64 = if cfg!(debug_assertions) {
    100_000
} else {
    1_000_000
};

/// How long a handover may take before the test kills the daemon: writing a million pages
/// takes seconds, more on a loaded machine.
const HANDOVER_BOUND: Duration = Duration::from_secs(120);

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Page `seed`, cheap enough for millions: zero (1 in 8), same-filled (1 in 8), compressible
/// records (4 in 8), half random (1 in 8) or random (1 in 8).
fn content(seed: u64, out: &mut [u8]) {
    let h = mix(seed);
    let kind = h % 8;
    if kind == 0 {
        return out.fill(0);
    }
    for (i, c) in out.chunks_exact_mut(8).enumerate() {
        let i = i as u64;
        let w = match kind {
            1 => h | 1,
            2..=5 => seed << 20 | (i / 4) | (h & 0xff) << 12,
            6 if i % 2 == 1 => 0,
            _ => mix(h ^ i),
        };
        c.copy_from_slice(&w.to_le_bytes());
    }
}

fn page(seed: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    content(seed, &mut p);
    p
}

/// One range of keys in one pool: object `oid`, indexes `0..count`, content seeds `base..`.
#[derive(Clone, Copy, Debug)]
struct Range {
    pool: u32,
    oid: [u64; 3],
    base: u64,
    count: u64,
}

/// Puts a range (several objects of up to 100k pages each, so maps and runs of every shape
/// occur); returns the indexes the daemon accepted.
fn put_range(g: &mut Guest, r: Range) -> Vec<bool> {
    let mut ok = vec![false; r.count as usize];
    let mut buf: Vec<Vec<u8>> = Vec::new();
    let chunk = 65_536u64;
    let mut start = 0;
    while start < r.count {
        let n = chunk.min(r.count - start);
        buf.clear();
        buf.extend((start..start + n).map(|i| page(r.base + i)));
        let reqs = (0..n as usize).map(|i| {
            let idx = start + i as u64;
            (
                idx as usize,
                Req::Put {
                    pool: r.pool,
                    oid: [r.oid[0] + idx / 100_000, r.oid[1], r.oid[2]],
                    index: idx % 100_000,
                    page: &buf[i],
                },
            )
        });
        g.pipeline(0, 32, reqs, |d| match d.status {
            Status::Ok => ok[d.tag] = true,
            // Random pages of ephemeral pools are refused (the default policy).
            Status::Refused => {}
            s => panic!("put {} of {r:?}: {s:?}", d.tag),
        })
        .unwrap();
        start += n;
    }
    ok
}

/// Gets a range back: every accepted page must come back byte for byte, every refused one
/// must miss.
fn verify_range(g: &mut Guest, r: Range, ok: &[bool]) {
    let reqs = (0..r.count).map(|idx| {
        (
            idx as usize,
            Req::Get {
                pool: r.pool,
                oid: [r.oid[0] + idx / 100_000, r.oid[1], r.oid[2]],
                index: idx % 100_000,
                exclusive: false,
            },
        )
    });
    let mut want = vec![0u8; PAGE_SIZE];
    let mut bad = 0u64;
    g.pipeline(0, 32, reqs, |d| {
        let i = d.tag;
        match (d.status, ok[i]) {
            (Status::Ok, true) => {
                content(r.base + i as u64, &mut want);
                if d.page() != want.as_slice() {
                    bad += 1;
                }
            }
            (Status::Miss, false) => {}
            (s, accepted) => panic!("get {i} of {r:?}: {s:?}, put accepted: {accepted}"),
        }
    })
    .unwrap();
    assert_eq!(bad, 0, "{bad} pages of {r:?} differ");
}

/// Two clients sharing a pool, the state file in `dir` (which outlives each daemon).
fn state_args(dir: &Path, limit: &str) -> Vec<String> {
    vec![
        "--memory-limit".into(),
        limit.into(),
        "--client".into(),
        format!("name=vm1,socket={{dir}}/vm1.sock,shared={UUID}"),
        "--client".into(),
        format!("name=vm2,socket={{dir}}/vm2.sock,shared={UUID}"),
        "--state-file".into(),
        format!("{}/state", dir.display()),
    ]
}

fn start(args: &[String]) -> Result<Daemon, daemon::Error> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(&a)
}

/// The gauges and request counters that must be the same after a handover.
fn figures(d: &Daemon, name: &str) -> Vec<u64> {
    let c = d.client_stats(name).unwrap();
    [
        "stored_pages",
        "same_filled_pages",
        "raw_pages",
        "compressed_bytes",
        "puts",
        "puts_refused",
    ]
    .iter()
    .map(|k| n(&c[*k]))
    .collect()
}

/// A guest whose driver negotiates SESSION, as tmem.ko does: its pools outlive the
/// connection, so the next daemon's restored pools are claimed by its reconnect (a driver
/// without SESSION would drop them, as after any disconnect).
fn session(d: &Daemon, sock: &str) -> Guest {
    Guest::connect(
        d.path(sock),
        GuestOptions {
            session: true,
            ..GuestOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn a_million_mixed_pages_survive_a_restart_byte_exact() {
    // TMEM_STATE_DIR=/dev/shm takes the disk out of the figures (the write is made durable).
    let tmp = match std::env::var_os("TMEM_STATE_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let dir = tmp.path();
    let args = state_args(dir, "3G");
    let mut d = start(&args).unwrap();
    let mut g1 = session(&d, "vm1.sock");
    let mut g2 = session(&d, "vm2.sock");
    let pers = g1.create_pool(true, None).unwrap();
    let eph = g1.create_pool(false, None).unwrap();
    let sh1 = g1.create_pool(false, Some(UUID_BYTES)).unwrap();
    let sh2 = g2.create_pool(false, Some(UUID_BYTES)).unwrap();
    let ranges = [
        (
            1,
            Range {
                pool: pers,
                oid: [1, 0, 0],
                base: 0,
                count: PAGES * 6 / 10,
            },
        ),
        (
            1,
            Range {
                pool: eph,
                oid: [100, 0, 0],
                base: 10_000_000,
                count: PAGES * 2 / 10,
            },
        ),
        (
            1,
            Range {
                pool: sh1,
                oid: [200, 0, 0],
                base: 20_000_000,
                count: PAGES / 10,
            },
        ),
        (
            2,
            Range {
                pool: sh2,
                oid: [300, 0, 0],
                base: 30_000_000,
                count: PAGES / 10,
            },
        ),
    ];
    let mut accepted = Vec::new();
    for (who, r) in ranges {
        let g = if who == 1 { &mut g1 } else { &mut g2 };
        accepted.push(put_range(g, r));
    }
    let stored: u64 = accepted.iter().flatten().filter(|x| **x).count() as u64;
    let before = (figures(&d, "vm1"), figures(&d, "vm2"));
    let used = n(&d.stats().unwrap()["memory_used_bytes"]);
    // The guests stay connected: the handover ends their connections, not them.
    let (cpu_before, children_before) = (cpu_ms(d.pid()), children_cpu_ms());
    let t = Instant::now();
    let st = d.terminate_within(HANDOVER_BOUND);
    let stop_ms = t.elapsed().as_millis();
    // The daemon's CPU time from SIGTERM to exit (its whole life's, less what it had used),
    // which a loaded machine does not stretch as it does wall time.
    let stop_cpu = (children_cpu_ms() - children_before).saturating_sub(cpu_before);
    assert!(st.success(), "{st}\n{}", d.log());
    let log = d.log();
    assert!(log.contains("state written for the next daemon"), "{log}");
    let phases = |log: &str, what: &[&str]| -> String {
        log.lines()
            .filter(|l| what.iter().any(|w| l.contains(w)))
            .map(|l| l.split_once(']').map_or(l, |x| x.1).trim().to_string() + "\n")
            .collect()
    };
    print!(
        "{}",
        phases(&log, &["handover: stopped serving", "state written"])
    );
    let state = dir.join("state");
    let size = std::fs::metadata(&state).unwrap().len();
    drop((g1, g2, d));

    let t = Instant::now();
    let d = start(&args).unwrap();
    let start_ms = t.elapsed().as_millis();
    let start_cpu = cpu_ms(d.pid());
    assert!(!state.exists(), "a loaded state file is removed");
    assert!(d.log().contains("state loaded"), "{}", d.log());
    print!("{}", phases(&d.log(), &["state loaded"]));
    assert_eq!((figures(&d, "vm1"), figures(&d, "vm2")), before);
    let mut g1 = session(&d, "vm1.sock");
    let mut g2 = session(&d, "vm2.sock");
    for ((who, r), ok) in ranges.into_iter().zip(&accepted) {
        let g = if who == 1 { &mut g1 } else { &mut g2 };
        verify_range(g, r, ok);
    }
    // The restored pools are the guest's: it keeps using them, and its next pool id is new.
    assert_eq!(g1.create_pool(true, None).unwrap(), 3);
    g1.put(pers, [9, 9, 9], 0, &page(1)).unwrap();
    println!(
        "handover: {stored} pages stored ({} MiB charged), state file {} MiB ({:.0} MiB per \
         million pages); SIGTERM to exit {stop_ms} ms ({stop_cpu} ms CPU), start to serving \
         {start_ms} ms ({start_cpu} ms CPU)",
        used >> 20,
        size >> 20,
        size as f64 / (1 << 20) as f64 * 1e6 / stored as f64,
    );
}

/// CPU time (user and system) process `pid` has used, in ms.
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is the first.
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) * 1000 / hz
}

/// CPU time of this process's reaped children, in ms.
fn children_cpu_ms() -> u64 {
    // SAFETY: rusage is plain data that getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(ru.ru_utime) + ms(ru.ru_stime)
}

/// A small state file written by `ctl handover`: returns its bytes.
fn small_state(dir: &Path) -> Vec<u8> {
    let args = state_args(dir, "64M");
    let mut d = start(&args).unwrap();
    let mut g = session(&d, "vm1.sock");
    let p = g.create_pool(true, None).unwrap();
    for i in 0..2000 {
        g.put(p, [1, 2, 3], i, &page(i)).unwrap();
    }
    // The handover answers, then the daemon ends by itself (a SIGTERM more changes nothing).
    d.control(&json!({"cmd": "handover"})).unwrap();
    assert!(d.terminate_within(HANDOVER_BOUND).success());
    assert!(d.log().contains("state written"), "{}", d.log());
    std::fs::read(dir.join("state")).unwrap()
}

/// Starts with `state` as the state file and `extra` options; returns the error log of a
/// refused start (and checks the file was left alone), or the daemon.
fn start_with(dir: &Path, state: &[u8], limit: &str, extra: &[&str]) -> Result<Daemon, String> {
    std::fs::write(dir.join("state"), state).unwrap();
    let mut args = state_args(dir, limit);
    args.extend(extra.iter().map(|s| s.to_string()));
    match start(&args) {
        Ok(d) => Ok(d),
        Err(daemon::Error::Exited { status, log }) => {
            assert!(status.contains("exit status: 1"), "{status}: {log}");
            assert_eq!(
                std::fs::read(dir.join("state")).unwrap(),
                state,
                "left alone"
            );
            Err(log)
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn bad_state_files_are_refused_with_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let good = small_state(dir);
    let mid = good.len() / 2;
    let mut flipped = good.clone();
    flipped[mid] ^= 0x10;
    let mut version = good.clone();
    version[8] = 9;
    let cases: [(&[u8], &str, &str); 4] = [
        (&flipped, "64M", "checksum mismatch in the record at byte"),
        (
            &good[..mid],
            "64M",
            &format!("truncated: the stream ends at byte {mid}"),
        ),
        (
            &version,
            "64M",
            "format version 9 (at byte 8) cannot be read by this daemon",
        ),
        (&good, "1M", "client \"vm1\" does not fit"),
    ];
    for (bytes, limit, want) in cases {
        let log = start_with(dir, bytes, limit, &[]).map(|_| ()).unwrap_err();
        assert!(
            log.contains("is refused, the daemon does not start"),
            "{log}"
        );
        assert!(log.contains(want), "want \"{want}\" in:\n{log}");
    }
    // A client the file holds but the configuration no longer names.
    std::fs::write(dir.join("state"), &good).unwrap();
    let e = Daemon::start(&[
        "--client",
        &format!("name=vm2,socket={{dir}}/vm2.sock,shared={UUID}"),
        "--state-file",
        &format!("{}/state", dir.display()),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("it holds client \"vm1\", which is not configured"),
        "{e}"
    );
    // Told to, the daemon starts empty and keeps the file aside.
    let d = start_with(
        dir,
        &flipped,
        "64M",
        &["--state-file-invalid", "start-empty"],
    )
    .unwrap();
    assert_eq!(n(&d.client_stats("vm1").unwrap()["stored_pages"]), 0);
    assert!(d
        .log()
        .contains("starting empty as --state-file-invalid=start-empty says"));
    assert!(!dir.join("state").exists());
    assert_eq!(std::fs::read(dir.join("state.rejected")).unwrap(), flipped);
    drop(d);
    // And the good file loads.
    let d = start_with(dir, &good, "64M", &[]).unwrap();
    assert_eq!(n(&d.client_stats("vm1").unwrap()["stored_pages"]), 2000);
    // Without --state-file there is nothing to hand over through.
    let e = Daemon::start(&["--socket-path", "{dir}/x.sock"])
        .unwrap()
        .control(&json!({"cmd": "handover"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("runs without --state-file"), "{e}");
}

#[test]
fn sigterm_mid_traffic_loses_no_acknowledged_persistent_put() {
    let tmp = tempfile::tempdir().unwrap();
    let args = state_args(tmp.path(), "1G");
    let mut d = start(&args).unwrap();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let going = Arc::new(AtomicBool::new(false));
    let (a, gflag, sock) = (acked.clone(), going.clone(), d.path("vm1.sock"));
    let guest = std::thread::spawn(move || {
        let mut g = Guest::connect(
            sock,
            GuestOptions {
                timeout: Duration::from_secs(2),
                session: true,
                ..GuestOptions::default()
            },
        )
        .unwrap();
        let p = g.create_pool(true, None).unwrap();
        let pages: Vec<Vec<u8>> = (0..4096).map(page).collect();
        gflag.store(true, Ordering::Relaxed);
        // Puts until the daemon goes away: the pipeline then fails.
        let reqs = (0..10_000_000usize).map(|i| {
            (
                i,
                Req::Put {
                    pool: p,
                    oid: [5, 0, 0],
                    index: i as u64,
                    page: &pages[i % 4096],
                },
            )
        });
        let r = g.pipeline(0, 64, reqs, |done| {
            assert_eq!(done.status, Status::Ok, "put {}", done.tag);
            a.lock().unwrap().insert(done.tag as u64);
        });
        assert!(r.is_err(), "the daemon went away");
        p
    });
    while !going.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.terminate_within(HANDOVER_BOUND).success(), "{}", d.log());
    let pool = guest.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 1000, "{} puts acknowledged", acked.len());
    let log = d.log();
    drop(d);
    let d = start(&args).unwrap();
    let stored = n(&d.client_stats("vm1").unwrap()["stored_pages"]);
    assert!(
        stored >= acked.len() as u64,
        "{stored} pages loaded, {} acknowledged\n{}\n{}",
        acked.len(),
        log,
        d.log()
    );
    let mut g = session(&d, "vm1.sock");
    let reqs = acked.iter().map(|&i| {
        (
            i as usize,
            Req::Get {
                pool,
                oid: [5, 0, 0],
                index: i,
                exclusive: false,
            },
        )
    });
    let mut lost = Vec::new();
    g.pipeline(0, 32, reqs, |done| {
        if done.status != Status::Ok || done.page() != page(done.tag as u64 % 4096).as_slice() {
            lost.push(done.tag);
        }
    })
    .unwrap();
    assert!(
        lost.is_empty(),
        "{} acknowledged puts lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}
