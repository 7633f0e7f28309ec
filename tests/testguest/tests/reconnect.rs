// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests of sessions (docs/virtio-tmem.md, "Sessions"): a driver with
//! VIRTIO_TMEM_F_SESSION keeps its pools over a reconnect and drops them with RESET; orphaned
//! pools are freed after `--orphan-timeout`; a driver without the feature loses its pools at
//! every disconnect; and a frontend that loops on either cannot make the daemon grow.

mod common;

use std::time::{Duration, Instant};

use shared_proto::{Status, PAGE_SIZE};
use tmem_testguest::daemon::Daemon;
use tmem_testguest::{pages, Error, Guest, GuestOptions, Req};

use common::*;

fn session() -> GuestOptions {
    GuestOptions {
        session: true,
        ..GuestOptions::default()
    }
}

fn guest(d: &Daemon, opts: GuestOptions) -> Guest {
    Guest::connect(d.path("a.sock"), opts).unwrap_or_else(|e| panic!("connect: {e}\n{}", d.log()))
}

/// Puts pages `base..base + count` at indexes `0..count` of `oid`; every put must succeed
/// (persistent pools store incompressible pages raw).
fn put_pages(g: &mut Guest, pool: u32, oid: [u64; 3], base: u64, count: u64) {
    put_pages_to(g, pool, oid, base, count, true)
}

/// [`put_pages`]; with `must_store` false, puts may be refused (an ephemeral pool refuses
/// incompressible pages).
fn put_pages_to(g: &mut Guest, pool: u32, oid: [u64; 3], base: u64, count: u64, must_store: bool) {
    let store: Vec<Vec<u8>> = (0..count).map(|i| pages::page(base + i)).collect();
    let reqs = (0..count as usize).map(|i| {
        (
            i,
            Req::Put {
                pool,
                oid,
                index: i as u64,
                page: &store[i],
            },
        )
    });
    g.pipeline(0, 32, reqs, |d| match d.status {
        Status::Ok => {}
        Status::Refused if !must_store => {}
        s => panic!("put {} answered {s:?}", d.tag),
    })
    .unwrap();
}

/// Gets the pages [`put_pages`] put and checks each byte for byte; returns how many hit.
fn verify_pages(g: &mut Guest, pool: u32, oid: [u64; 3], base: u64, count: u64) -> u64 {
    let reqs = (0..count as usize).map(|i| {
        (
            i,
            Req::Get {
                pool,
                oid,
                index: i as u64,
                exclusive: false,
            },
        )
    });
    let mut hits = 0;
    g.pipeline(0, 32, reqs, |d| match d.status {
        Status::Ok => {
            assert!(
                d.page() == pages::page(base + d.tag as u64).as_slice(),
                "page {} differs",
                d.tag
            );
            hits += 1;
        }
        s => panic!("get {} answered {s:?}", d.tag),
    })
    .unwrap();
    hits
}

fn get_status(g: &mut Guest, pool: u32, oid: [u64; 3], index: u64) -> Status {
    let mut out = vec![0u8; PAGE_SIZE];
    match g.get(pool, oid, index, false, &mut out) {
        Ok(_) => Status::Ok,
        Err(Error::Status(s)) => s,
        Err(e) => panic!("transport error: {e}"),
    }
}

/// Polls client `a`'s statistics (every 10 ms, at most 10 s) until `done` holds; returns them.
fn await_stats(
    d: &Daemon,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = d.client_stats("a").unwrap();
        if done(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{what}: {c}\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Text without its terminal colour sequences (`ESC [ ... m`).
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for c in it.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn list_entry(d: &Daemon) -> serde_json::Value {
    let l = d
        .control(&serde_json::json!({"cmd": "list-clients"}))
        .unwrap();
    l["clients"][0].clone()
}

const N: u64 = 3_000;

#[test]
fn a_reconnect_keeps_every_page() {
    let d = Daemon::start(&["--client", "name=a,socket={dir}/a.sock"]).unwrap();
    let mut g = guest(&d, session());
    let swap = g.create_pool(true, None).unwrap();
    let cache = g.create_pool(false, None).unwrap();
    put_pages(&mut g, swap, [1, 0, 0], 0, N);
    let cached = b"a page-cache page, compressible ".repeat(PAGE_SIZE / 32);
    g.put(cache, [2, 0, 0], 0, &cached).unwrap();
    let before = d.client_stats("a").unwrap();
    drop(g);
    // Disconnected, pools kept and orphaned (the default timeout is 10 minutes).
    let c = await_stats(&d, "orphaned after the disconnect", |c| {
        c["connected"] == false && !c["orphaned_since"].is_null()
    });
    assert_eq!(c["pools"].as_array().unwrap().len(), 2);
    assert_eq!(c["stored_pages"], before["stored_pages"]);
    assert_eq!(c["charged_bytes"], before["charged_bytes"]);
    let l = list_entry(&d);
    assert_eq!(l["orphaned_since"], c["orphaned_since"]);
    let text = std::process::Command::new(tmem_testguest::daemon::binary().unwrap())
        .args(["ctl", "--control"])
        .arg(d.path("control.sock"))
        .arg("list-clients")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(" orphaned "), "{text}");
    assert!(
        await_log(&d, "pools kept for the driver's session"),
        "{}",
        d.log()
    );

    // The same guest comes back (its driver's features replayed): everything is served.
    let mut g = guest(&d, session());
    assert_eq!(verify_pages(&mut g, swap, [1, 0, 0], 0, N), N);
    let mut out = vec![0u8; PAGE_SIZE];
    g.get(cache, [2, 0, 0], 0, false, &mut out).unwrap();
    assert_eq!(out, cached);
    let c = d.client_stats("a").unwrap();
    assert!(
        c["connected"] == true && c["orphaned_since"].is_null(),
        "{c}"
    );
    // A new pool never takes a kept pool's id.
    let third = g.create_pool(true, None).unwrap();
    assert!(third != swap && third != cache, "{third}");
    // And again, several times: still every page.
    for _ in 0..3 {
        drop(g);
        await_stats(&d, "orphaned again", |c| c["connected"] == false);
        g = guest(&d, session());
    }
    assert_eq!(verify_pages(&mut g, swap, [1, 0, 0], 0, N), N);
}

#[test]
fn reset_drops_every_pool() {
    let d = Daemon::start(&["--client", "name=a,socket={dir}/a.sock"]).unwrap();
    let mut g = guest(&d, session());
    // A fresh device: nothing to drop.
    assert_eq!(g.reset().unwrap(), 0);
    let p = g.create_pool(true, None).unwrap();
    let e = g.create_pool(false, None).unwrap();
    put_pages(&mut g, p, [1, 0, 0], 0, 500);
    g.put(e, [1, 0, 0], 0, &[5u8; PAGE_SIZE]).unwrap();
    drop(g);
    await_stats(&d, "orphaned", |c| !c["orphaned_since"].is_null());
    // The guest rebooted: its new driver resets before it creates a pool.
    let mut g = guest(&d, session());
    assert_eq!(g.reset().unwrap(), 2);
    let c = d.client_stats("a").unwrap();
    assert_eq!(c["pools"].as_array().unwrap().len(), 0, "{c}");
    assert_eq!(n(&c["stored_pages"]), 0);
    assert_eq!(n(&c["charged_bytes"]), 0);
    assert!(c["orphaned_since"].is_null());
    assert_eq!(n(&d.stats().unwrap()["memory_used_bytes"]), 0);
    assert_eq!(get_status(&mut g, p, [1, 0, 0], 0), Status::BadPool);
    // Ids start again at 0, and a new pool holds none of the old pages.
    let again = g.create_pool(true, None).unwrap();
    assert_eq!(again, 0);
    assert_eq!(get_status(&mut g, again, [1, 0, 0], 0), Status::Miss);
    // A reset within a connection (the driver reloaded) drops what it made since.
    put_pages(&mut g, again, [1, 0, 0], 0, 10);
    assert_eq!(g.reset().unwrap(), 1);
    assert_eq!(get_status(&mut g, again, [1, 0, 0], 0), Status::BadPool);
    assert!(d
        .log()
        .contains("driver reset: a driver started, the pools of the one before are dropped"));
}

#[test]
fn orphaned_pools_are_freed_after_the_timeout() {
    let d = Daemon::start(&[
        "--client",
        "name=a,socket={dir}/a.sock",
        "--orphan-timeout",
        "1s",
    ])
    .unwrap();
    let mut g = guest(&d, session());
    let p = g.create_pool(true, None).unwrap();
    put_pages(&mut g, p, [1, 0, 0], 0, 1_000);
    drop(g);
    let t = Instant::now();
    let c = await_stats(&d, "orphaned pools freed", |c| {
        c["connected"] == false && c["pools"].as_array().unwrap().is_empty()
    });
    eprintln!("freed {:?} after the disconnect was seen", t.elapsed());
    assert_eq!(n(&c["charged_bytes"]), 0);
    assert!(c["orphaned_since"].is_null());
    assert_eq!(n(&d.stats().unwrap()["memory_used_bytes"]), 0);
    let log = plain(&d.log());
    let line = log
        .lines()
        .find(|l| l.contains("orphaned pools freed"))
        .unwrap_or_else(|| panic!("no log line:\n{log}"));
    assert!(
        line.contains("client=a") && line.contains("persistent_pages=1000"),
        "{line}"
    );
    // The driver that comes back too late finds no pool (its swap pages are lost: it sees
    // errors, never other data).
    let mut g = guest(&d, session());
    assert_eq!(get_status(&mut g, p, [1, 0, 0], 0), Status::BadPool);
}

#[test]
fn a_driver_without_session_loses_its_pools_at_disconnect() {
    let d = Daemon::start(&["--client", "name=a,socket={dir}/a.sock"]).unwrap();
    // An old driver: the pools go with the connection, as before sessions existed.
    let mut g = guest(&d, GuestOptions::default());
    let p = g.create_pool(true, None).unwrap();
    put_pages(&mut g, p, [1, 0, 0], 0, 200);
    drop(g);
    let c = await_stats(&d, "freed at the disconnect", |c| {
        c["connected"] == false && c["pools"].as_array().unwrap().is_empty()
    });
    assert!(c["orphaned_since"].is_null(), "{c}");
    assert_eq!(n(&c["charged_bytes"]), 0);
    let mut g = guest(&d, GuestOptions::default());
    assert_eq!(get_status(&mut g, p, [1, 0, 0], 0), Status::BadPool);
    assert_eq!(g.create_pool(true, None).unwrap(), 0);
    drop(g);
    await_stats(&d, "freed again", |c| {
        c["pools"].as_array().unwrap().is_empty()
    });

    // Pools kept for a session, then the guest comes back with an old driver (rebooted into
    // an older kernel): they are dropped when its features are set, never served to it.
    let mut g = guest(&d, session());
    let p = g.create_pool(true, None).unwrap();
    put_pages(&mut g, p, [1, 0, 0], 0, 200);
    drop(g);
    await_stats(&d, "orphaned", |c| !c["orphaned_since"].is_null());
    let mut g = guest(&d, GuestOptions::default());
    let c = d.client_stats("a").unwrap();
    assert!(c["pools"].as_array().unwrap().is_empty(), "{c}");
    assert_eq!(n(&c["charged_bytes"]), 0);
    assert_eq!(get_status(&mut g, p, [1, 0, 0], 0), Status::BadPool);
    assert!(d
        .log()
        .contains("driver without SESSION: dropped the pools kept"));
}

#[test]
fn remove_client_frees_orphaned_pools() {
    let d = Daemon::start(&["--client", "name=a,socket={dir}/a.sock"]).unwrap();
    let mut g = guest(&d, session());
    let p = g.create_pool(true, None).unwrap();
    put_pages(&mut g, p, [1, 0, 0], 0, 400);
    drop(g);
    await_stats(&d, "orphaned", |c| !c["orphaned_since"].is_null());
    // Not connected: no --force needed; what was kept goes, and says so.
    let r = d
        .control(&serde_json::json!({"cmd": "remove-client", "client": "a"}))
        .unwrap();
    let r = &r["removed"];
    assert_eq!((n(&r["pools"]), n(&r["persistent_pages"])), (1, 400), "{r}");
    assert_eq!(r["disconnected"], false);
    assert_eq!(n(&d.stats().unwrap()["memory_used_bytes"]), 0);
}

#[test]
fn resets_and_reconnect_loops_do_not_grow_the_daemon() {
    let d = Daemon::start(&[
        "--client",
        "name=a,socket={dir}/a.sock,quota=8M",
        "--max-pools",
        "8",
    ])
    .unwrap();
    let pid = d.pid();
    // A driver that resets in a loop, filling every pool it may have in between.
    let mut g = guest(&d, session());
    let mut early = (0, 0);
    for round in 0..150u64 {
        for k in 0..8 {
            let p = g.create_pool(k % 2 == 0, None).unwrap();
            put_pages_to(&mut g, p, [round, 0, 0], round * 100 + k, 16, k % 2 == 0);
        }
        assert!(matches!(
            g.create_pool(true, None),
            Err(Error::Status(Status::TooManyPools))
        ));
        assert_eq!(g.reset().unwrap(), 8);
        if round == 20 {
            early = (settled_fd_count(pid), rss(pid));
        }
    }
    let late = (settled_fd_count(pid), rss(pid));
    eprintln!(
        "reset loop: fds {} -> {}, rss {} -> {} KiB",
        early.0,
        late.0,
        early.1 >> 10,
        late.1 >> 10
    );
    assert_eq!(late.0, early.0, "file descriptors grew over resets");
    assert!(
        late.1 <= early.1 + (16 << 20),
        "RSS grew over resets: {early:?} -> {late:?}"
    );
    assert_eq!(n(&d.stats().unwrap()["memory_used_bytes"]), 0);
    drop(g);

    // A frontend that reconnects in a loop, creating a pool and storing pages each time:
    // the pools it keeps are bounded by --max-pools, the pages by its quota.
    for round in 0..150u64 {
        let mut g = guest(&d, session());
        if let Ok(p) = g.create_pool(true, None) {
            for i in 0..64 {
                let _ = g.put(p, [round, 0, 0], i, &pages::page(round * 64 + i));
            }
        }
        drop(g);
        if round == 20 {
            await_stats(&d, "disconnected", |c| c["connected"] == false);
            early = (settled_fd_count(pid), rss(pid));
        }
    }
    await_stats(&d, "disconnected", |c| c["connected"] == false);
    let late = (settled_fd_count(pid), rss(pid));
    eprintln!(
        "reconnect loop: fds {} -> {}, rss {} -> {} KiB",
        early.0,
        late.0,
        early.1 >> 10,
        late.1 >> 10
    );
    assert_eq!(late.0, early.0, "file descriptors grew over reconnects");
    assert!(
        late.1 <= early.1 + (16 << 20),
        "RSS grew over reconnects: {early:?} -> {late:?}"
    );
    let c = d.client_stats("a").unwrap();
    assert_eq!(c["pools"].as_array().unwrap().len(), 8, "{c}");
    assert!(n(&c["charged_bytes"]) <= 8 << 20, "{c}");
    // Its driver's next start drops all of it.
    let mut g = guest(&d, session());
    assert_eq!(g.reset().unwrap(), 8);
    assert_eq!(n(&d.stats().unwrap()["memory_used_bytes"]), 0);
}

#[test]
fn reload_changes_the_orphan_timeout_of_orphans_already_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("tmem.toml");
    let write = |timeout: &str| {
        let tmp = conf.with_extension("tmp");
        let sock = dir.path().join("a.sock");
        let body = format!(
            "orphan_timeout = {timeout}\n[[client]]\nname = \"a\"\nsocket = \"{}\"\n",
            sock.display()
        );
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, &conf).unwrap();
    };
    write("\"off\"");
    let d = Daemon::start(&["--config", conf.to_str().unwrap()]).unwrap();
    let mut g = Guest::connect(dir.path().join("a.sock"), session()).unwrap();
    let p = g.create_pool(true, None).unwrap();
    put_pages(&mut g, p, [1, 0, 0], 0, 100);
    drop(g);
    await_stats(&d, "orphaned", |c| !c["orphaned_since"].is_null());
    assert!(
        await_log(&d, "kept until it does (no orphan timeout)"),
        "{}",
        d.log()
    );
    write("1");
    let r = d.control(&serde_json::json!({"cmd": "reload"})).unwrap();
    let changed = r["reload"]["changed"].to_string();
    assert!(changed.contains("orphan timeout off -> 1s"), "{changed}");
    await_stats(&d, "freed under the new timeout", |c| {
        c["pools"].as_array().unwrap().is_empty()
    });
    assert!(await_log(&d, "orphaned pools freed"), "{}", d.log());
}

#[test]
fn ctl_disconnect_ends_the_connection_and_the_guest_comes_back_to_its_pages() {
    let d = Daemon::start(&["--client", "name=a,socket={dir}/a.sock"]).unwrap();
    let ctl = |client: &str| d.control(&serde_json::json!({"cmd": "disconnect", "client": client}));
    // Nothing to end yet, and no such client.
    let e = ctl("a").unwrap_err().to_string();
    assert!(e.contains("no frontend connected"), "{e}");
    let e = ctl("zz").unwrap_err().to_string();
    assert!(e.contains("no client named"), "{e}");

    let mut g = guest(&d, session());
    let swap = g.create_pool(true, None).unwrap();
    put_pages(&mut g, swap, [1, 0, 0], 0, N);
    await_stats(&d, "connected", |c| c["connected"] == true);
    ctl("a").unwrap();
    // The daemon ended it (and kept the pools for the driver's session).
    await_stats(&d, "disconnected by ctl", |c| {
        c["connected"] == false && !c["orphaned_since"].is_null()
    });
    drop(g);
    assert!(await_log(&d, "disconnect asked for (ctl)"), "{}", d.log());
    // The frontend connects again: its pages are all there.
    let mut g = guest(&d, session());
    assert_eq!(verify_pages(&mut g, swap, [1, 0, 0], 0, N), N);
}
