// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests: the real `vhost-tmem` binary, real Unix sockets, the vhost-user protocol
//! and split virtqueues in shared memfd memory, driven by the userspace guest.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shared_proto::{resp_flags, BatchEntry, Op, ReqHeader, RespHeader, Status, PAGE_SIZE};
use tmem_testguest::daemon::{self, Daemon};
use tmem_testguest::{pages, Error, Guest, GuestOptions, RamBacking, Seg};

mod common;
use common::*;

#[test]
fn four_clients_in_parallel_120k_pages() {
    let names = ["c0", "c1", "c2", "c3"];
    let specs: Vec<String> = names
        .iter()
        .map(|n| format!("name={n},socket={{dir}}/{n}.sock"))
        .collect();
    let mut args: Vec<&str> = vec!["--memory-limit", "2G", "--queues", "2"];
    for s in &specs {
        args.extend(["--client", s]);
    }
    let d = Arc::new(Daemon::start(&args).unwrap());
    let per_client = 30_000u64;
    let threads: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(t, name)| {
            let d = d.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                let mut g = Guest::connect(
                    d.path(&format!("{name}.sock")),
                    GuestOptions {
                        request_queues: 2,
                        ..GuestOptions::default()
                    },
                )
                .unwrap();
                let pers = g.create_pool(true, None).unwrap();
                let eph = g.create_pool(false, None).unwrap();
                let base = t as u64 * 1_000_000;
                // Persistent on queue 0, ephemeral on queue 1, two objects each.
                let half = per_client / 2;
                for (k, oid) in [[t as u64, 1, 0], [t as u64, 2, 0]].into_iter().enumerate() {
                    let (hits, _) =
                        put_get_verify(&mut g, 0, pers, oid, base + k as u64 * half, half, true);
                    assert_eq!(hits, half);
                }
                let (hits, _) = put_get_verify(
                    &mut g,
                    1,
                    eph,
                    [t as u64, 3, 0],
                    base + 500_000,
                    5_000,
                    false,
                );
                // Nothing evicts under a 2G limit: every compressible ephemeral page is there.
                assert!(hits > 4_000, "{hits}");
                // Private ephemeral gets were exclusive: the pool is now empty of those pages.
                let mut out = vec![0u8; PAGE_SIZE];
                assert!(matches!(
                    g.get(eph, [t as u64, 3, 0], 0, false, &mut out),
                    Err(Error::Status(Status::Miss))
                ));
                // Flushes: one page, then a whole object.
                g.flush_page(pers, [t as u64, 1, 0], 7).unwrap();
                assert!(matches!(
                    g.get(pers, [t as u64, 1, 0], 7, false, &mut out),
                    Err(Error::Status(Status::Miss))
                ));
                g.flush_object(pers, [t as u64, 2, 0]).unwrap();
                assert!(matches!(
                    g.get(pers, [t as u64, 2, 0], 9, false, &mut out),
                    Err(Error::Status(Status::Miss))
                ));
                g.get(pers, [t as u64, 1, 0], 8, false, &mut out).unwrap();
                assert_eq!(out, pages::page(base + 8));
                // Hand the connection back: dropping it would reset the client.
                (g, half - 1)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let s = d.stats().unwrap();
    for (i, name) in names.iter().enumerate() {
        let c = s["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == *name)
            .unwrap();
        assert_eq!(n(&c["puts"]), per_client + 5_000, "{name}");
        assert_eq!(n(&c["get_errors"]), 0);
        // What is left: the first object minus one flushed page.
        assert_eq!(n(&c["stored_pages"]), results[i].1, "{name}");
        assert!(n(&c["same_filled_pages"]) > 0 && n(&c["compressed_bytes"]) > 0);
    }
    let total: u64 = s["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| n(&c["puts"]))
        .sum();
    assert!(total >= 100_000);
}

#[test]
fn ephemeral_eviction_under_a_small_limit() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock", "--memory-limit", "4M"]).unwrap();
    let mut g = connect(&d, "vm.sock");
    let eph = g.create_pool(false, None).unwrap();
    let (hits, misses) = put_get_verify(&mut g, 0, eph, [1, 0, 0], 0, 10_000, false);
    let c = d.client_stats("guest").unwrap();
    let s = d.stats().unwrap();
    assert!(n(&c["evictions"]) > 1_000, "{c}");
    assert!(misses > 1_000 && hits > 500, "hits {hits} misses {misses}");
    assert!(n(&s["memory_used_bytes"]) <= 4 << 20);
}

#[test]
fn persistent_puts_refused_at_quota_and_never_lost() {
    let d = Daemon::start(&["--client", "name=vm,socket={dir}/vm.sock,quota=2M"]).unwrap();
    let mut g = connect(&d, "vm.sock");
    let pool = g.create_pool(true, None).unwrap();
    let mut stored = Vec::new();
    let mut refused = 0;
    for i in 0..5_000u64 {
        match status_of(g.put(pool, [2, 0, 0], i, &pages::page(i))) {
            Some(Status::Ok) => stored.push(i),
            Some(Status::NoSpace) => refused += 1,
            s => panic!("{s:?}"),
        }
    }
    assert!(
        refused > 0 && stored.len() > 500,
        "stored {} refused {refused}",
        stored.len()
    );
    // Every accepted page comes back, byte for byte, and again (gets are not exclusive).
    let mut out = vec![0u8; PAGE_SIZE];
    for _ in 0..2 {
        for &i in &stored {
            g.get(pool, [2, 0, 0], i, false, &mut out).unwrap();
            assert_eq!(out, pages::page(i), "page {i}");
        }
    }
    // A refused put over an existing key leaves no stale copy behind.
    let victim = *stored
        .iter()
        .find(|&&i| pages::page(i) != vec![0u8; PAGE_SIZE])
        .unwrap();
    let big: Vec<u8> = (0..PAGE_SIZE)
        .map(|i| (i * 7919 % 251) as u8 ^ (i >> 3) as u8)
        .collect();
    let mut tries = 0;
    loop {
        // Fill to the brim with incompressible pages, then overwrite the victim.
        let r = status_of(g.put(
            pool,
            [2, 0, 0],
            1_000_000 + tries,
            &pages::page(9 + 10 * tries),
        ));
        tries += 1;
        if r == Some(Status::NoSpace) || tries > 10_000 {
            break;
        }
    }
    let r = status_of(g.put(pool, [2, 0, 0], victim, &big));
    if r == Some(Status::NoSpace) {
        assert!(matches!(
            g.get(pool, [2, 0, 0], victim, false, &mut out),
            Err(Error::Status(Status::Miss))
        ));
    } else {
        g.get(pool, [2, 0, 0], victim, false, &mut out).unwrap();
        assert_eq!(out, big);
    }
    let c = d.client_stats("vm").unwrap();
    assert!(n(&c["memory_used"]) <= 2 << 20);
    assert_eq!(n(&c["evictions"]), 0);
}

#[test]
fn exclusive_gets() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    let mut g = connect(&d, "vm.sock");
    let eph = g.create_pool(false, None).unwrap();
    let pers = g.create_pool(true, None).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    let p = pages::page(3);
    g.put(eph, [1, 1, 1], 5, &p).unwrap();
    g.put(pers, [1, 1, 1], 5, &p).unwrap();
    // Private ephemeral: always exclusive.
    let flags = g.get(eph, [1, 1, 1], 5, false, &mut out).unwrap();
    assert_eq!(
        (flags & resp_flags::DROPPED, &out),
        (resp_flags::DROPPED, &p)
    );
    assert!(matches!(
        g.get(eph, [1, 1, 1], 5, false, &mut out),
        Err(Error::Status(Status::Miss))
    ));
    // Persistent: kept unless asked.
    assert_eq!(
        g.get(pers, [1, 1, 1], 5, false, &mut out).unwrap() & resp_flags::DROPPED,
        0
    );
    assert_eq!(
        g.get(pers, [1, 1, 1], 5, true, &mut out).unwrap() & resp_flags::DROPPED,
        resp_flags::DROPPED
    );
    assert_eq!(out, p);
    assert!(matches!(
        g.get(pers, [1, 1, 1], 5, false, &mut out),
        Err(Error::Status(Status::Miss))
    ));
}

/// Live migration's dirty-page log: once the frontend sets a log and turns logging on, every
/// page the device writes is marked (the GET's page, written through a raw pointer; its
/// response and the used ring, written through vm-memory), and a page it only read is not.
#[test]
fn a_dirty_log_marks_every_page_the_device_writes() {
    let d = Daemon::start(&[
        "--socket-path",
        "{dir}/vm.sock",
        "--migration",
        "persistent",
    ])
    .unwrap();
    let opts = GuestOptions {
        dirty_log: true,
        ..Default::default()
    };
    let mut g = Guest::connect(d.path("vm.sock"), opts).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    let p = pages::page(11);
    g.put(pool, [2, 0, 0], 1, &p).unwrap();
    g.start_dirty_log().unwrap();
    let (header, page, response) = g.slot_addrs(1, 0);
    let used = g.used_ring(1) & !4095;
    // Nothing the GET will write is marked yet. The used ring may be: after the guest saw the
    // PUT's answer, the device can still write its avail event there (EVENT_IDX).
    let before = g.dirty_pages().unwrap();
    assert!(
        before.iter().all(|&a| a == used),
        "marked before any write: {before:x?}"
    );
    let mut out = vec![0u8; PAGE_SIZE];
    g.get(pool, [2, 0, 0], 1, false, &mut out).unwrap();
    assert_eq!(out, p);
    let dirty = g.dirty_pages().unwrap();
    for (what, addr) in [("page", page), ("response", response), ("used ring", used)] {
        assert!(
            dirty.contains(&addr),
            "{what} at {addr:#x} not marked: {dirty:x?}"
        );
    }
    assert!(
        !dirty.contains(&header),
        "the request header was only read: {dirty:x?}"
    );
}

/// The pipeline takes a request from its caller only when it can send it at once: a caller that
/// times requests from when it yields them (the benchmark) must not count the wait for the
/// request before (at depth 1 that doubled every latency).
#[test]
fn the_pipeline_takes_a_request_only_when_it_can_send_it() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    let mut g = connect(&d, "vm.sock");
    let pool = g.create_pool(true, None).unwrap();
    let page = pages::page(1);
    for depth in [1usize, 4] {
        let done = std::cell::Cell::new(0usize);
        let early = std::cell::RefCell::new(Vec::new());
        let reqs = (0..40usize).map(|i| {
            // Request i can be sent once all but depth - 1 of those before it are done.
            if i >= depth && done.get() < i + 1 - depth {
                early.borrow_mut().push(i);
            }
            let req = tmem_testguest::Req::Put {
                pool,
                oid: [3, 0, 0],
                index: i as u64,
                page: &page,
            };
            (i, req)
        });
        g.pipeline(0, depth, reqs, |_| done.set(done.get() + 1))
            .unwrap();
        assert_eq!(done.get(), 40);
        assert_eq!(
            *early.borrow(),
            Vec::<usize>::new(),
            "taken before a slot was free"
        );
    }
}

#[test]
fn puts_from_page_frames_store_the_frames_in_place() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    let opts = GuestOptions {
        page_frames: 8,
        ..GuestOptions::default()
    };
    let mut g = Guest::connect(d.path("vm.sock"), opts).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    for i in 0..8 {
        g.write_frame(i, &pages::page(100 + i as u64)).unwrap();
    }
    // The frames lie inside guest RAM, past everything else the guest uses.
    let last = g.frame_addr(7).unwrap();
    assert!(last + PAGE_SIZE as u64 <= g.ram_size());
    assert!(g.frame_addr(0).unwrap() > g.used_ring(1));
    assert_eq!(g.frame_addr(8), None);
    let reqs = (0..8usize).map(|i| {
        let req = tmem_testguest::Req::PutFrame {
            pool,
            oid: [4, 0, 0],
            index: i as u64,
            frame: i,
        };
        (i, req)
    });
    let mut ok = 0;
    g.pipeline(0, 4, reqs, |d| {
        assert_eq!(d.status, Status::Ok);
        ok += 1;
    })
    .unwrap();
    assert_eq!(ok, 8);
    let mut out = vec![0u8; PAGE_SIZE];
    for i in 0..8u64 {
        g.get(pool, [4, 0, 0], i, false, &mut out).unwrap();
        assert_eq!(out, pages::page(100 + i), "page {i}");
    }
    let bad = tmem_testguest::Req::PutFrame {
        pool,
        oid: [4, 0, 0],
        index: 9,
        frame: 8,
    };
    assert!(matches!(
        g.pipeline(0, 1, [(0, bad)], |_| {}),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        g.write_frame(8, &pages::page(1)),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn flush_object_and_batched_flushes() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    let mut g = connect(&d, "vm.sock");
    let pool = g.create_pool(true, None).unwrap();
    for obj in 0..3u64 {
        for i in 0..40u64 {
            g.put(pool, [obj, 9, 9], i, &pages::page(obj * 100 + i))
                .unwrap();
        }
    }
    g.flush_object(pool, [1, 9, 9]).unwrap();
    let mut entries: Vec<BatchEntry> = (0..20u64)
        .map(|i| BatchEntry {
            op: Op::FlushPage as u32,
            pool_id: pool,
            oid: [0, 9, 9],
            index: i,
        })
        .collect();
    entries.push(BatchEntry {
        op: Op::FlushObject as u32,
        pool_id: pool,
        oid: [2, 9, 9],
        index: 0,
    });
    entries.push(BatchEntry {
        op: Op::FlushPage as u32,
        pool_id: pool,
        oid: [1, 9, 9],
        index: 0,
    });
    entries.push(BatchEntry {
        op: Op::FlushPage as u32,
        pool_id: 99,
        oid: [0, 9, 9],
        index: 30,
    });
    let st = g.batch(&entries).unwrap();
    assert!(st[..21].iter().all(|s| *s == Status::Ok), "{st:?}");
    assert_eq!(st[21], Status::Miss);
    assert_eq!(st[22], Status::BadPool);
    let mut out = vec![0u8; PAGE_SIZE];
    for obj in 0..3u64 {
        for i in 0..40u64 {
            let r = g.get(pool, [obj, 9, 9], i, false, &mut out);
            if obj == 0 && i >= 20 {
                r.unwrap();
                assert_eq!(out, pages::page(i));
            } else {
                assert!(matches!(r, Err(Error::Status(Status::Miss))), "{obj} {i}");
            }
        }
    }
    assert_eq!(n(&d.client_stats("guest").unwrap()["stored_pages"]), 20);
}

#[test]
fn shared_pool_authorization() {
    let u = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let uuid: [u8; 16] = [
        0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1,
        0xf0,
    ];
    let a = format!("name=a,socket={{dir}}/a.sock,shared={u}");
    let b = format!("name=b,socket={{dir}}/b.sock,shared={u}");
    let d = Daemon::start(&[
        "--client",
        &a,
        "--client",
        &b,
        "--client",
        "name=c,socket={dir}/c.sock",
    ])
    .unwrap();
    let (mut ga, mut gb, mut gc) = (
        connect(&d, "a.sock"),
        connect(&d, "b.sock"),
        connect(&d, "c.sock"),
    );
    let pa = ga.create_pool(false, Some(uuid)).unwrap();
    let pb = gb.create_pool(false, Some(uuid)).unwrap();
    // Knowing the UUID is not enough.
    assert!(matches!(
        gc.create_pool(false, Some(uuid)),
        Err(Error::Status(Status::Denied))
    ));
    // Shared pools must be ephemeral.
    assert!(matches!(
        ga.create_pool(true, Some(uuid)),
        Err(Error::Status(Status::Invalid))
    ));
    let p = pages::page(42);
    ga.put(pa, [7, 7, 7], 1, &p).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    gb.get(pb, [7, 7, 7], 1, false, &mut out).unwrap();
    assert_eq!(out, p);
    // c's own pools never see it.
    let pc = gc.create_pool(false, None).unwrap();
    assert!(matches!(
        gc.get(pc, [7, 7, 7], 1, false, &mut out),
        Err(Error::Status(Status::Miss))
    ));
    // Authorization granted at run time through the control socket.
    d.control(&json!({"cmd": "authorize", "client": "c", "uuid": u}))
        .unwrap();
    let pc2 = gc.create_pool(false, Some(uuid)).unwrap();
    gc.get(pc2, [7, 7, 7], 1, false, &mut out).unwrap();
    assert_eq!(out, p);
    let s = d.stats().unwrap();
    assert_eq!(n(&s["shared_pools"][0]["members"]), 3);
}

#[test]
fn disconnect_and_reconnect_while_others_work() {
    let d = Arc::new(two_clients());
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut g = connect(&d, "b.sock");
            let pool = g.create_pool(true, None).unwrap();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) || round < 3 {
                let (hits, _) =
                    put_get_verify(&mut g, 0, pool, [round, 0, 0], round * 10_000, 1_000, true);
                assert_eq!(hits, 1_000);
                round += 1;
            }
            round
        })
    };
    for cycle in 0..5u64 {
        let mut g = connect(&d, "a.sock");
        let pool = g.create_pool(true, None).unwrap();
        // A new connection starts clean: earlier pools are gone.
        assert_eq!(pool, 0, "cycle {cycle}");
        for i in 0..300 {
            g.put(pool, [cycle, 0, 0], i, &pages::page(i + cycle))
                .unwrap();
        }
        let mut out = vec![0u8; PAGE_SIZE];
        g.get(pool, [cycle, 0, 0], 17, false, &mut out).unwrap();
        assert_eq!(out, pages::page(17 + cycle));
        drop(g);
        // The daemon notices the disconnect and frees a's pages.
        let mut freed = false;
        for _ in 0..200 {
            let c = d.client_stats("a").unwrap();
            if c["connected"] == false && n(&c["stored_pages"]) == 0 {
                freed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(freed, "client a not reset after disconnect");
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = worker.join().unwrap();
    assert!(rounds >= 3);
    let log = d.log();
    assert!(log.contains("frontend disconnected client=a"), "{log}");
    // A log file (or the journal) gets plain text, no terminal colour codes.
    assert!(!log.contains('\x1b'), "{log}");
}

#[test]
fn malformed_requests_over_the_socket() {
    let d = Daemon::start(&[
        "--client",
        "name=bad,socket={dir}/bad.sock",
        "--client",
        "name=good,socket={dir}/good.sock",
    ])
    .unwrap();
    let mut good = connect(&d, "good.sock");
    let gp = good.create_pool(true, None).unwrap();
    good.put(gp, [1, 0, 0], 0, &pages::page(1)).unwrap();

    let mut g = connect(&d, "bad.sock");
    let pool = g.create_pool(true, None).unwrap();
    let hdr = |op: u32, pool: u32, count: u32| {
        ReqHeader {
            op,
            pool_id: pool,
            count,
            ..ReqHeader::default()
        }
        .encode()
        .to_vec()
    };
    let status =
        |w: &[u8]| Status::from_u32(RespHeader::decode(w[..16].try_into().unwrap()).status);
    let put = Op::Put as u32;
    let cases: Vec<(usize, Vec<Seg>, Option<Status>)> = vec![
        // Too short for a header.
        (
            1,
            vec![Seg::Read(vec![1, 2, 3]), Seg::Write(16)],
            Some(Status::Invalid),
        ),
        // Unknown operation.
        (
            1,
            vec![Seg::Read(hdr(77, pool, 0)), Seg::Write(16)],
            Some(Status::Unsupported),
        ),
        // Wrong queue.
        (
            1,
            vec![
                Seg::Read(hdr(Op::DestroyPool as u32, pool, 0)),
                Seg::Write(16),
            ],
            Some(Status::Unsupported),
        ),
        (
            0,
            vec![Seg::Read(hdr(put, pool, 0)), Seg::Write(16)],
            Some(Status::Unsupported),
        ),
        // PUT without a page, with half a page, with the page device-writable.
        (
            1,
            vec![Seg::Read(hdr(put, pool, 0)), Seg::Write(16)],
            Some(Status::Invalid),
        ),
        (
            1,
            vec![
                Seg::Read(hdr(put, pool, 0)),
                Seg::Read(vec![0; 2048]),
                Seg::Write(16),
            ],
            Some(Status::Invalid),
        ),
        (
            1,
            vec![Seg::Read(hdr(put, pool, 0)), Seg::Write(4096 + 16)],
            Some(Status::Invalid),
        ),
        // Unknown pool ids.
        (
            1,
            vec![
                Seg::Read(hdr(put, 12345, 0)),
                Seg::Read(vec![1; 4096]),
                Seg::Write(16),
            ],
            Some(Status::BadPool),
        ),
        (
            1,
            vec![
                Seg::Read(hdr(Op::Get as u32, u32::MAX, 0)),
                Seg::Write(4096 + 16),
            ],
            Some(Status::BadPool),
        ),
        // A batch claiming more entries than it carries.
        (
            1,
            vec![
                Seg::Read(hdr(Op::Batch as u32, pool, 10)),
                Seg::Write(16 + 10),
            ],
            Some(Status::Invalid),
        ),
        // Page address outside guest memory.
        (
            1,
            vec![
                Seg::Read(hdr(put, pool, 0)),
                Seg::Raw {
                    addr: g.ram_size() + 4096,
                    len: 4096,
                    write: false,
                },
                Seg::Write(16),
            ],
            Some(Status::Invalid),
        ),
        (
            1,
            vec![
                Seg::Read(hdr(put, pool, 0)),
                Seg::Raw {
                    addr: u64::MAX - 100,
                    len: 4096,
                    write: false,
                },
                Seg::Write(16),
            ],
            Some(Status::Invalid),
        ),
        // No room for a status at all: returned unused.
        (1, vec![Seg::Read(hdr(Op::FlushPage as u32, pool, 0))], None),
        // Readable after writable.
        (
            1,
            vec![
                Seg::Read(hdr(Op::FlushPage as u32, pool, 0)),
                Seg::Write(16),
                Seg::Read(vec![0; 8]),
            ],
            None,
        ),
    ];
    for (i, (q, segs, want)) in cases.iter().enumerate() {
        let (used, written) = g
            .raw_chain(*q, segs)
            .unwrap_or_else(|e| panic!("case {i}: {e}"));
        match want {
            Some(s) => {
                // The response sits after the page for GET, at the start otherwise.
                let w = written.last().unwrap();
                let is_get =
                    matches!(&segs[0], Seg::Read(b) if b.len() >= 4 && b[0] == Op::Get as u8);
                let at = if is_get { 4096 } else { 0 };
                assert_eq!(used as usize, at + 16, "case {i}");
                assert_eq!(status(&w[at..]), Some(*s), "case {i}");
            }
            None => assert_eq!(used, 0, "case {i}"),
        }
    }
    // A flood of garbage: bounded log lines, and the device keeps serving.
    for _ in 0..2_000 {
        g.raw_chain(1, &[Seg::Read(vec![0xff; 48]), Seg::Write(16)])
            .unwrap();
    }
    g.put(pool, [5, 0, 0], 1, &pages::page(5)).unwrap();
    let mut out = vec![0u8; PAGE_SIZE];
    g.get(pool, [5, 0, 0], 1, false, &mut out).unwrap();
    assert_eq!(out, pages::page(5));
    // The other client is untouched.
    good.get(gp, [1, 0, 0], 0, false, &mut out).unwrap();
    assert_eq!(out, pages::page(1));
    let warnings = d.log().matches("malformed request").count();
    assert!(warnings > 0 && warnings < 200, "{warnings} warning lines");
    assert_eq!(n(&d.client_stats("good").unwrap()["stored_pages"]), 1);
}

#[test]
fn multiqueue_without_event_idx() {
    let d = Daemon::start(&[
        "--socket-path",
        "{dir}/vm.sock",
        "--queues",
        "4",
        "--compressor",
        "zstd:3",
    ])
    .unwrap();
    let mut g = Guest::connect(
        d.path("vm.sock"),
        GuestOptions {
            request_queues: 4,
            event_idx: false,
            queue_size: 128,
            ..GuestOptions::default()
        },
    )
    .unwrap();
    assert_eq!(g.config().num_request_queues, 4);
    let pool = g.create_pool(true, None).unwrap();
    for q in 0..4 {
        let (hits, _) = put_get_verify(
            &mut g,
            q,
            pool,
            [q as u64, 0, 0],
            q as u64 * 1000,
            500,
            true,
        );
        assert_eq!(hits, 500);
    }
    let c = d.client_stats("guest").unwrap();
    assert_eq!(c["compressor"], "zstd:3");
    assert_eq!(n(&c["stored_pages"]), 2000);
}

#[test]
fn stats_cli_prometheus_and_control() {
    // A free loopback port for the metrics endpoint.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let port_s = port.to_string();
    let d = Daemon::start(&[
        "--socket-path",
        "{dir}/vm.sock",
        "--metrics-listen",
        &port_s,
    ])
    .unwrap();
    let mut g = connect(&d, "vm.sock");
    let pool = g.create_pool(true, None).unwrap();
    for i in 0..50 {
        g.put(pool, [1, 0, 0], i, &pages::page(i)).unwrap();
    }
    let bin = daemon::binary().unwrap();
    let out = Command::new(&bin)
        .args(["stats", "--control"])
        .arg(d.path("control.sock"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&v["clients"][0]["puts"]), 50);
    assert_eq!(v["clients"][0]["pools"][0]["kind"], "persistent");
    let out = Command::new(&bin)
        .args(["stats", "--prometheus", "--control"])
        .arg(d.path("control.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("vhost_tmem_client_puts_total{client=\"guest\"} 50"),
        "{text}"
    );
    // The HTTP endpoint serves the same.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(body.contains(
        "vhost_tmem_pool_stored_pages{client=\"guest\",pool=\"0\",kind=\"persistent\"} 50"
    ));
    // ctl: freeze refuses puts (and drops the old copy), thaw accepts again.
    let ctl = |args: &[&str]| {
        Command::new(&bin)
            .arg("ctl")
            .arg("--control")
            .arg(d.path("control.sock"))
            .args(args)
            .output()
            .unwrap()
    };
    assert!(ctl(&["freeze", "guest"]).status.success());
    assert!(matches!(
        g.put(pool, [1, 0, 0], 3, &pages::page(3)),
        Err(Error::Status(Status::Refused))
    ));
    assert!(ctl(&["thaw", "guest"]).status.success());
    g.put(pool, [1, 0, 0], 3, &pages::page(3)).unwrap();
    let bad = ctl(&["weight", "nobody", "5"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no client named \"nobody\""));
    // Shrink request shows in config space.
    assert!(ctl(&["shrink", "guest", "1234"]).status.success());
    assert_eq!(g.read_config().unwrap().shrink_target_pages, 1234);
}

#[test]
fn command_line_errors_exit_1_with_a_message() {
    let bin = daemon::binary().unwrap();
    let cases: HashMap<&[&str], &str> = HashMap::from([
        (&[][..], "no client to serve"),
        (
            &["--socket-path", "/tmp/x.sock", "--compressor", "lzma"][..],
            "unknown compressor \"lzma\"",
        ),
        (
            &["--socket-path", "/tmp/x.sock", "--memory-limit", "ten"][..],
            "invalid size \"ten\"",
        ),
        (
            &["--client", "name=a"][..],
            "exactly one of socket=, fd= or listen=",
        ),
        (&["--fd", "987"][..], "fd 987 is not an open socket"),
        (
            &["--socket-path", "/nonexistent-dir/x.sock"][..],
            "cannot listen on /nonexistent-dir/x.sock",
        ),
        (&["--no-such-option"][..], "unexpected argument"),
        (
            &["--socket-path", "/tmp/x.sock", "--sandbox", "jail"][..],
            "invalid value 'jail' for '--sandbox",
        ),
        (
            &["--socket-path", "/tmp/x.sock", "--seccomp-action", "ignore"][..],
            "invalid value 'ignore' for '--seccomp-action",
        ),
    ]);
    for (args, want) in cases {
        let out = Command::new(&bin).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // --user: only root may change users (as root, the check runs as nobody), and the user
    // must exist.
    let user_cases = [
        (
            "root",
            "--user root: only root can change to another user",
            true,
        ),
        (
            "no-such-user-here",
            "unknown user \"no-such-user-here\" for --user",
            false,
        ),
    ];
    for (user, want, as_nobody) in user_cases {
        if !as_nobody && !root() {
            continue;
        }
        let mut cmd = Command::new(&bin);
        cmd.args(["--socket-path", "/tmp/x.sock", "--user", user]);
        if as_nobody && root() {
            use std::os::unix::process::CommandExt;
            cmd.uid(65534).gid(65534);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "--user {user}: {err}");
        assert!(err.contains(want), "--user {user}: {err}");
    }
    let out = Command::new(&bin)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "tmem");
}

/// Runs the daemon binary with `args` and waits (bounded) for it to exit; a daemon still running
/// after the bound is killed and the test fails, naming what it printed.
fn run_to_exit(args: &[std::ffi::OsString], bound: Duration) -> std::process::Output {
    let bin = daemon::binary().unwrap();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + bound;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} still running after {bound:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_second_daemon_does_not_steal_live_sockets() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    let mut g = connect(&d, "vm.sock");
    let pool = g.create_pool(true, None).unwrap();
    g.put(pool, [1, 0, 0], 0, &pages::page(7)).unwrap();
    let sock = d.path("vm.sock");
    let ctl = d.path("control.sock");
    let other = d.path("other.sock");
    // Same client and control socket; then only the control socket is shared.
    let cases = [
        (vec![sock.clone(), ctl.clone()], &sock),
        (vec![other.clone(), ctl.clone()], &ctl),
    ];
    for (paths, busy) in cases {
        let args = vec![
            "--socket-path".into(),
            paths[0].clone().into_os_string(),
            "--control-socket".into(),
            paths[1].clone().into_os_string(),
        ];
        let out = run_to_exit(&args, Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let want = format!("socket {} is in use by another process", busy.display());
        assert!(err.contains(&want), "{err}");
    }
    // The first daemon still serves the guest and the control socket, and a new frontend
    // reaches it, not a stranger.
    let mut page = vec![0; PAGE_SIZE];
    g.get(pool, [1, 0, 0], 0, false, &mut page).unwrap();
    assert_eq!(page, pages::page(7));
    assert_eq!(n(&d.client_stats("guest").unwrap()["puts"]), 1);
    drop(g);
    let mut g = connect(&d, "vm.sock");
    let pool = g.create_pool(true, None).unwrap();
    g.put(pool, [1, 0, 0], 0, &pages::page(8)).unwrap();
    assert_eq!(n(&d.client_stats("guest").unwrap()["puts"]), 2);
}

/// `vhost-tmem stats` against the daemon's control socket, bounded in time.
fn stats_cli(d: &Daemon, bound: Duration) -> std::process::Output {
    run_to_exit(
        &[
            "stats".into(),
            "--control".into(),
            d.path("control.sock").into_os_string(),
        ],
        bound,
    )
}

#[test]
fn a_peer_that_does_not_read_does_not_stall_the_control_socket() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    // Pipelines requests and never reads: the answers fill the socket and the daemon's write
    // blocks on this connection.
    let mut hog = std::os::unix::net::UnixStream::connect(d.path("control.sock")).unwrap();
    let reqs = "{\"cmd\":\"stats\"}\n".repeat(60 * 1024 / 16);
    hog.write_all(reqs.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Liveness, not speed: another client is answered well within 5 s (it waited 31 s when
    // one connection was served at a time).
    for _ in 0..3 {
        let out = stats_cli(&d, Duration::from_secs(5));
        assert!(out.status.success(), "{out:?}");
    }
    let out = run_to_exit(
        &[
            "ctl".into(),
            "--control".into(),
            d.path("control.sock").into_os_string(),
            "freeze".into(),
            "guest".into(),
        ],
        Duration::from_secs(5),
    );
    assert!(out.status.success(), "{out:?}");
    drop(hog);
}

#[test]
fn idle_metrics_connections_do_not_delay_a_scrape() {
    let port = free_port();
    let port_s = port.to_string();
    let d = Daemon::start(&[
        "--socket-path",
        "{dir}/vm.sock",
        "--metrics-listen",
        &port_s,
    ])
    .unwrap();
    // The metrics listener opens just after the sockets the daemon helper waits for.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Connections that never send a request (they delayed a scrape by 5 s each).
    let idle: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Liveness, not speed: the scrape is answered within 5 s, not after 8 x 5 s.
    let body = scrape(port, Duration::from_secs(5));
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(
        body.contains("vhost_tmem_client_connected{client=\"guest\"} 0"),
        "{body}"
    );
    // A request that is not GET /metrics gets a 404, not the statistics.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    drop(idle);
}

fn mode_of(p: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.mode() & 0o777, m.gid())
}

#[test]
fn sockets_are_private_or_for_one_group() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    assert_eq!(mode_of(&d.path("vm.sock")).0, 0o600);
    assert_eq!(mode_of(&d.path("control.sock")).0, 0o600);
    // With groups: 0660 and the group (65534 is nogroup on Debian).
    let d = Daemon::start(&[
        "--socket-path",
        "{dir}/vm.sock",
        "--socket-group",
        "65534",
        "--control-group",
        "nogroup",
    ])
    .unwrap();
    assert_eq!(mode_of(&d.path("vm.sock")), (0o660, 65534));
    assert_eq!(mode_of(&d.path("control.sock")), (0o660, 65534));
    // A frontend still connects and works through the group socket.
    let mut g = connect(&d, "vm.sock");
    let pool = g.create_pool(true, None).unwrap();
    g.put(pool, [1, 0, 0], 0, &pages::page(1)).unwrap();
}

/// `vhost-tmem stats` run as uid/gid 65534 (nobody/nogroup).
fn stats_as_nobody(d: &Daemon) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    Command::new(daemon::binary().unwrap())
        .args(["stats", "--control"])
        .arg(d.path("control.sock"))
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

#[test]
fn the_control_socket_refuses_peers_of_other_users() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        // The credential check itself is unit-tested with synthetic credentials
        // (control::server tests); this end-to-end check needs root to act as another user.
        eprintln!("skipped: needs root to run a peer as another user");
        return;
    }
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    // Open the file mode so that only the credential check stands in the way.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        d.path("control.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let out = stats_as_nobody(&d);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not allowed"), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !d.log().contains("control connection refused") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Root and the daemon's own uid still get through.
    assert!(stats_cli(&d, Duration::from_secs(5)).status.success());
    // Members of --control-group are allowed.
    let d = Daemon::start(&[
        "--socket-path",
        "{dir}/vm.sock",
        "--control-group",
        "nogroup",
    ])
    .unwrap();
    let out = stats_as_nobody(&d);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_non_loopback_metrics_address_logs_a_warning() {
    let port = free_port().to_string();
    let addr = format!("0.0.0.0:{port}");
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock", "--metrics-listen", &addr]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !d.log().contains("not a loopback address") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.log().contains("WARN"), "{}", d.log());
}

/// CPU time (seconds) all threads of process `pid` have used so far, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A thread may end between listing and reading: it then counts nothing.
        let Ok(stat) = std::fs::read_to_string(t.unwrap().path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    ticks as f64 / hz
}

/// A hostile guest puts a request queue in a state no driver can be in (an available index
/// more than a queue ahead, then a head index past the queue): that queue breaks, the control
/// queue served by the same worker thread still answers, the daemon does not spin, the
/// disconnect completes and the guest can connect again and work; a second guest verifies its
/// pages all along.
#[test]
fn hostile_ring_states_break_only_their_queue() {
    let d = Arc::new(two_clients());
    let stop = Arc::new(AtomicBool::new(false));
    // b pauses while the daemon's CPU time is measured, so that only a's effect is seen.
    let pause = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let worker = {
        let (d, stop, pause, paused) = (d.clone(), stop.clone(), pause.clone(), paused.clone());
        std::thread::spawn(move || {
            let mut g = connect(&d, "b.sock");
            let pool = g.create_pool(true, None).unwrap();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) || round < 2 {
                if pause.load(Ordering::Relaxed) {
                    paused.store(true, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                paused.store(false, Ordering::Relaxed);
                let (hits, _) =
                    put_get_verify(&mut g, 0, pool, [round, 0, 0], round * 1_000, 100, true);
                assert_eq!(hits, 100);
                round += 1;
            }
            round
        })
    };
    let opts = GuestOptions {
        timeout: Duration::from_secs(5),
        ..GuestOptions::default()
    };
    for attack in ["avail index far ahead", "head index past the queue"] {
        let mut g = Guest::connect(d.path("a.sock"), opts.clone()).unwrap();
        let pool = g.create_pool(true, None).unwrap();
        g.put(pool, [1, 0, 0], 0, &pages::page(1)).unwrap();
        let size = g.queue_size(1).unwrap();
        if attack.starts_with("avail") {
            let idx = g.avail_idx(1).unwrap().wrapping_add(size + 7);
            g.hostile_set_avail_idx(1, idx).unwrap();
        } else {
            g.hostile_publish_heads(1, &[size + 5]).unwrap();
        }
        // The control queue shares the worker thread with the broken queue.
        g.create_pool(false, None)
            .unwrap_or_else(|e| panic!("{attack}: the control queue stopped answering: {e}"));
        pause.store(true, Ordering::Relaxed);
        while !paused.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        let before = cpu_seconds(d.pid());
        std::thread::sleep(Duration::from_millis(500));
        let busy = cpu_seconds(d.pid()) - before;
        pause.store(false, Ordering::Relaxed);
        eprintln!("{attack}: daemon CPU {busy:.3} s in 0.5 s after the attack");
        // A spinning worker takes nearly all of the 0.5 s; an idle daemon next to nothing.
        assert!(
            busy < 0.05,
            "{attack}: the daemon used {busy:.2} s of CPU in 0.5 s idle"
        );
        drop(g);
        let t = std::time::Instant::now();
        assert!(
            await_disconnect(&d, "a"),
            "{attack}: the disconnect did not complete"
        );
        eprintln!("{attack}: disconnect seen after {:?}", t.elapsed());
        let mut g = connect(&d, "a.sock");
        let pool = g.create_pool(true, None).unwrap();
        let (hits, _) = put_get_verify(&mut g, 0, pool, [2, 0, 0], 500, 100, true);
        assert_eq!(hits, 100, "{attack}: the reconnected guest does not work");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(worker.join().unwrap() >= 2);
    // Logged once per attack.
    let log = d.log();
    assert_eq!(log.matches("queue needs reset").count(), 2, "{log}");
}

/// Every connection's resources go with it: 10,000 connect/handshake/disconnect cycles (on 4
/// clients at once, 2,500 each, to keep the test short) leave the daemon's open file
/// descriptors exactly as they were after the first few (a leak of even one descriptor per
/// connection shows as thousands).
#[test]
fn reconnects_leak_no_file_descriptors() {
    const CLIENTS: usize = 4;
    const CYCLES: usize = 2_500;
    let args: Vec<String> = (0..CLIENTS)
        .flat_map(|i| {
            [
                "--client".into(),
                format!("name=c{i},socket={{dir}}/c{i}.sock"),
            ]
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Arc::new(Daemon::start(&args).unwrap());
    // Both counts are taken while every client has a connection up, so they see one state.
    let barrier = Arc::new(std::sync::Barrier::new(CLIENTS + 1));
    let t = std::time::Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (d, barrier) = (d.clone(), barrier.clone());
            std::thread::spawn(move || {
                let sock = format!("c{i}.sock");
                for cycle in 0..CYCLES {
                    let f = handshake(&d, &sock);
                    if cycle == 10 || cycle == CYCLES - 1 {
                        barrier.wait();
                        barrier.wait();
                    }
                    drop(f);
                }
            })
        })
        .collect();
    barrier.wait();
    let early = fd_count(d.pid());
    barrier.wait();
    barrier.wait();
    let late = fd_count(d.pid());
    barrier.wait();
    for t in threads {
        t.join().unwrap();
    }
    let n = CLIENTS * CYCLES;
    eprintln!("{n} reconnects in {:?}: {early} -> {late} fds", t.elapsed());
    assert_eq!(late, early, "file descriptors leaked over {n} reconnects");
}

/// Sets the soft RLIMIT_NOFILE of process `pid`; returns the previous soft limit.
fn set_fd_limit(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a valid rlimit to write into; no new limit is passed.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    // SAFETY: `new` is a valid rlimit to read; no old limit is asked for.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// One client's serving thread fails (its accept, or the device it builds, finds no free file
/// descriptor: the test lowers the daemon's RLIMIT_NOFILE to the lowest free descriptor, as a
/// leak would). The failure is logged and the thread restarted with a backoff; another client
/// keeps putting and getting meanwhile, and the failed client connects once descriptors are
/// free again, and again after a disconnect.
#[test]
fn a_failing_client_thread_is_restarted() {
    let d = two_clients();
    let mut a = connect(&d, "a.sock");
    let pool = a.create_pool(true, None).unwrap();
    put_get_verify(&mut a, 0, pool, [1, 0, 0], 0, 100, true);
    let pid = d.pid();
    let open: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    let old = set_fd_limit(pid, lowest_free);
    // b's connection waits in the listen backlog while the daemon cannot accept it.
    let b = {
        let path = d.path("b.sock");
        std::thread::spawn(move || Guest::connect(path, GuestOptions::default()))
    };
    let mut failed = false;
    for _ in 0..1000 {
        if d.log().contains("serving thread failed") {
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // a is untouched by b's failure.
    let (hits, _) = put_get_verify(&mut a, 0, pool, [2, 0, 0], 1_000, 100, true);
    assert_eq!(hits, 100);
    set_fd_limit(pid, old);
    assert!(failed, "b's serving thread did not fail:\n{}", d.log());
    // b's waiting connection was either accepted by the failing thread and closed (then b
    // connects again) or is accepted by the restarted one.
    let mut b = match b.join().unwrap() {
        Ok(b) => b,
        Err(_) => connect(&d, "b.sock"),
    };
    let bp = b.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut b, 0, bp, [3, 0, 0], 2_000, 100, true);
    assert_eq!(hits, 100);
    drop(b);
    assert!(await_disconnect(&d, "b"));
    let mut b = connect(&d, "b.sock");
    let bp = b.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut b, 0, bp, [4, 0, 0], 3_000, 100, true);
    assert_eq!(hits, 100);
    let (hits, _) = put_get_verify(&mut a, 0, pool, [5, 0, 0], 4_000, 100, true);
    assert_eq!(hits, 100);
}

#[test]
fn guest_ram_past_the_end_of_its_file_is_refused() {
    let d = Daemon::start(&[
        "--client",
        "name=bad,socket={dir}/bad.sock",
        "--client",
        "name=good,socket={dir}/good.sock",
    ])
    .unwrap();
    let mut good = connect(&d, "good.sock");
    let gp = good.create_pool(true, None).unwrap();
    good.put(gp, [1, 0, 0], 0, &pages::page(1)).unwrap();

    // The region declared to the device is 1 MiB longer than the memfd behind it.
    let extra = 1 << 20;
    let hostile = Guest::connect(
        d.path("bad.sock"),
        GuestOptions {
            ram: RamBacking::Oversized { extra },
            timeout: Duration::from_secs(5),
            ..GuestOptions::default()
        },
    );
    let accepted = hostile.is_ok();
    if let Ok(mut g) = hostile {
        // A PUT whose page lies past the file's end, inside the declared region: touching it
        // faults (SIGBUS) in the daemon.
        let past_eof = g.ram_size() + 0x1000;
        let pool = g.create_pool(true, None).unwrap();
        let hdr = ReqHeader {
            op: Op::Put as u32,
            pool_id: pool,
            ..ReqHeader::default()
        }
        .encode()
        .to_vec();
        let r = g.raw_chain(
            1,
            &[
                Seg::Read(hdr),
                Seg::Raw {
                    addr: past_eof,
                    len: PAGE_SIZE as u32,
                    write: false,
                },
                Seg::Write(16),
            ],
        );
        eprintln!("PUT past the end of the file: {r:?}");
    }
    // The daemon survives, and the other client's pages are intact.
    let mut out = vec![0u8; PAGE_SIZE];
    good.get(gp, [1, 0, 0], 0, false, &mut out)
        .unwrap_or_else(|e| panic!("good client lost its daemon: {e}\n{}", d.log()));
    assert_eq!(out, pages::page(1));
    assert!(!accepted, "SET_MEM_TABLE with a region past EOF accepted");
    assert!(
        d.log().contains("extends past the end of its file"),
        "{}",
        d.log()
    );
    // Both clients can connect again (one connection per socket at a time: drop `good` first),
    // the refused one with proper memory.
    drop(good);
    still_serving(&d, "good.sock", 10);
    still_serving(&d, "bad.sock", 20);
}

#[test]
fn unsealed_guest_ram_is_refused_unless_allowed() {
    let unsealed = GuestOptions {
        ram: RamBacking::UnsealedMemfd,
        timeout: Duration::from_secs(5),
        ..GuestOptions::default()
    };
    let d = Daemon::start(&["--client", "name=vm,socket={dir}/vm.sock"]).unwrap();
    let r = Guest::connect(d.path("vm.sock"), unsealed.clone());
    assert!(r.is_err(), "memfd without F_SEAL_SHRINK accepted");
    assert!(
        d.log().contains("not sealed against shrinking"),
        "{}",
        d.log()
    );
    still_serving(&d, "vm.sock", 1);

    // The operator can accept unsealable memory knowingly.
    let d = Daemon::start(&[
        "--client",
        "name=vm,socket={dir}/vm.sock",
        "--allow-unsealed-memory",
    ])
    .unwrap();
    let mut g = Guest::connect(d.path("vm.sock"), unsealed).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut g, 0, pool, [1, 0, 0], 0, 100, true);
    assert_eq!(hits, 100);
    assert!(d.log().contains("--allow-unsealed-memory"), "{}", d.log());
}

#[test]
fn sealed_guest_ram_cannot_be_truncated() {
    let d = Daemon::start(&["--client", "name=vm,socket={dir}/vm.sock"]).unwrap();
    let mut g = connect(&d, "vm.sock");
    let pool = g.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut g, 0, pool, [1, 0, 0], 0, 100, true);
    assert_eq!(hits, 100);
    // The attack of a truncating VMM is impossible on the memory the daemon accepts.
    for len in [0, g.ram_size() / 2, g.ram_size() * 2] {
        let e = g.truncate_ram(len).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "truncate to {len}: {e}"
        );
    }
    let (hits, _) = put_get_verify(&mut g, 0, pool, [2, 0, 0], 1000, 100, true);
    assert_eq!(hits, 100);
}

/// `key:` of a /proc status file, whitespace-separated fields joined by one space.
fn proc_status(path: &std::path::Path, key: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in {}", path.display()))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every thread of the daemon is under its seccomp filters with no_new_privs: the process
/// tier's two (clone3, the allow-list with administration) everywhere, and a client's thread
/// and its queue workers the serving tier's three (clone3, openat, the allow-list) on top;
/// returns the threads' names.
fn assert_all_threads_sandboxed(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let Ok(name) = std::fs::read_to_string(t.join("comm")) else {
            continue; // ended meanwhile
        };
        let name = name.trim().to_string();
        let status = t.join("status");
        // The main thread, control and metrics (and their connections), client removals:
        // the rest serve a client (its thread, the crate's handler and queue workers).
        let admin = [
            "vhost-tmem",
            "control",
            "control-conn",
            "metrics",
            "metrics-conn",
        ];
        let serving = !admin.contains(&name.as_str()) && !name.starts_with("remove-");
        let filters = if serving { "5" } else { "2" };
        for (key, want) in [
            ("Seccomp", "2"),
            ("NoNewPrivs", "1"),
            ("Seccomp_filters", filters),
        ] {
            assert_eq!(proc_status(&status, key), want, "thread {name}: {key}");
        }
        names.push(name);
    }
    names
}

/// What must keep working under every sandbox mode, then a SIGTERM: put/get/verify on new
/// connections (threads started after the sandbox point), a reconnect, a supervised restart
/// of the client thread (`restart`: the test lowers the daemon's fd limit, which needs
/// CAP_SYS_RESOURCE for another user's process), `stats` and `ctl` from outside, a metrics
/// scrape. The daemon exits 0 (a syscall killed by the filter would show as SIGSYS).
fn sandboxed_daemon_works(d: &mut Daemon, sock: &std::path::Path, port: u16, restart: bool) {
    let opts = GuestOptions {
        timeout: Duration::from_secs(5),
        ..GuestOptions::default()
    };
    let mut g = Guest::connect(sock, opts.clone()).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut g, 0, pool, [1, 0, 0], 0, 1_000, true);
    assert_eq!(hits, 1_000);
    let names = assert_all_threads_sandboxed(d.pid());
    for want in ["control", "client-guest", "vring_worker"] {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} thread: {names:?}"
        );
    }
    drop(g);
    assert!(await_disconnect(d, "guest"), "{}", d.log());
    let mut g = Guest::connect(sock, opts.clone()).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut g, 0, pool, [2, 0, 0], 5_000, 1_000, true);
    assert_eq!(hits, 1_000);
    drop(g);
    assert!(await_disconnect(d, "guest"), "{}", d.log());
    let mut g = if restart {
        restart_client_thread(d, sock, &opts)
    } else {
        Guest::connect(sock, opts.clone()).unwrap()
    };
    let pool = g.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut g, 0, pool, [3, 0, 0], 9_000, 100, true);
    assert_eq!(hits, 100);
    let out = stats_cli(d, Duration::from_secs(10));
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(n(&v["clients"][0]["puts"]), 2_100);
    let ctl = |action: &str| {
        run_to_exit(
            &[
                "ctl".into(),
                "--control".into(),
                d.path("control.sock").into_os_string(),
                action.into(),
                "guest".into(),
            ],
            Duration::from_secs(10),
        )
    };
    assert!(ctl("freeze").status.success());
    assert!(matches!(
        g.put(pool, [4, 0, 0], 0, &pages::page(1)),
        Err(Error::Status(Status::Refused))
    ));
    assert!(ctl("thaw").status.success());
    g.put(pool, [4, 0, 0], 0, &pages::page(1)).unwrap();
    let body = scrape(port, Duration::from_secs(10));
    // 2,100 verified, one refused while frozen, one after the thaw.
    assert!(
        body.contains("vhost_tmem_client_puts_total{client=\"guest\"} 2102"),
        "{body}"
    );
    drop(g);
    let st = d.terminate();
    assert_eq!(st.code(), Some(0), "{st}: {}", d.log());
    assert!(d.log().contains("exiting"), "{}", d.log());
    assert_all_gone(d, &[sock]);
}

/// The client thread fails (no descriptor free to accept with) and is started again; returns
/// the guest that connected meanwhile.
fn restart_client_thread(d: &Daemon, sock: &std::path::Path, opts: &GuestOptions) -> Guest {
    let pid = d.pid();
    let fds = || -> std::collections::HashSet<u64> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
            .collect()
    };
    // The last connection's descriptors close as its threads end: wait until none changes for
    // 300 ms, or a descriptor freed after the count would take the accept below the limit.
    let mut open = fds();
    let settle = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = fds();
        if now == open || std::time::Instant::now() > settle {
            break;
        }
        open = now;
    }
    let old = set_fd_limit(pid, (0..).find(|n| !open.contains(n)).unwrap());
    let waiting = {
        let (sock, opts) = (sock.to_owned(), opts.clone());
        std::thread::spawn(move || Guest::connect(sock, opts))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !d.log().contains("serving thread failed") {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    set_fd_limit(pid, old);
    match waiting.join().unwrap() {
        Ok(g) => g,
        Err(_) => Guest::connect(sock, opts.clone()).unwrap(),
    }
}

/// The socket files are gone; their lock files stay (see sock::Claim).
fn assert_all_gone(d: &Daemon, socks: &[&std::path::Path]) {
    for s in socks {
        assert!(!s.exists(), "{} left behind: {}", s.display(), d.log());
        let mut lock = s.as_os_str().to_owned();
        lock.push(".lock");
        assert!(std::path::Path::new(&lock).exists());
    }
}

/// The sandbox does not get in the way of anything the daemon does (the kill action: a
/// syscall missing from the allow-list ends the daemon and fails this test), and covers
/// every thread, including those started for each connection.
#[test]
fn seccomp_sandbox_covers_every_thread_and_keeps_everything_working() {
    let port = free_port();
    let mut d = Daemon::start(&[
        "--socket-path",
        "{dir}/vm.sock",
        "--metrics-listen",
        &port.to_string(),
        "--sandbox",
        "seccomp",
        "--seccomp-action",
        "kill",
    ])
    .unwrap();
    let status = std::path::PathBuf::from(format!("/proc/{}/status", d.pid()));
    assert_eq!(proc_status(&status, "Seccomp"), "2");
    assert_eq!(proc_status(&status, "NoNewPrivs"), "1");
    let sock = d.path("vm.sock");
    sandboxed_daemon_works(&mut d, &sock, port, true);
    assert_all_gone(&d, &[&d.path("control.sock")]);
}

/// The default is the seccomp sandbox (every other test here runs under it).
#[test]
fn the_default_sandbox_is_seccomp() {
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock"]).unwrap();
    let status = std::path::PathBuf::from(format!("/proc/{}/status", d.pid()));
    assert_eq!(proc_status(&status, "Seccomp"), "2");
    let d = Daemon::start(&["--socket-path", "{dir}/vm.sock", "--sandbox", "none"]).unwrap();
    let status = std::path::PathBuf::from(format!("/proc/{}/status", d.pid()));
    assert_eq!(proc_status(&status, "Seccomp"), "0");
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn namespace_sandbox_has_its_own_namespaces_and_an_empty_root() {
    if !root() {
        eprintln!("skipped: the test compares namespaces as root (non-root uses a user namespace)");
        return;
    }
    let port = free_port();
    let mut d = Daemon::start(&[
        "--socket-path",
        "{dir}/vm.sock",
        "--metrics-listen",
        &port.to_string(),
        "--sandbox",
        "namespace",
        "--seccomp-action",
        "kill",
    ])
    .unwrap();
    let pid = d.pid();
    let ns = |p: String| std::fs::read_link(p).unwrap();
    for kind in ["mnt", "net", "ipc", "uts", "cgroup"] {
        assert_ne!(
            ns(format!("/proc/self/ns/{kind}")),
            ns(format!("/proc/{pid}/ns/{kind}")),
            "{kind} namespace shared"
        );
    }
    // Root needs no user namespace.
    assert_eq!(
        ns("/proc/self/ns/user".into()),
        ns(format!("/proc/{pid}/ns/user"))
    );
    // Its / is empty (and its threads see the same).
    let root_dir = format!("/proc/{pid}/root");
    assert_eq!(std::fs::read_dir(&root_dir).unwrap().count(), 0);
    // Administration that needs the filesystem is refused, saying why, and changes nothing.
    let ctl = |args: &[&str]| {
        std::process::Command::new(tmem_testguest::daemon::binary().unwrap())
            .arg("ctl")
            .arg("--control")
            .arg(d.path("control.sock"))
            .args(args)
            .output()
            .unwrap()
    };
    let extra = d.path("extra.sock");
    for args in [
        vec![
            "add-client".to_string(),
            format!("name=x,socket={}", extra.display()),
        ],
        vec!["reload".to_string()],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ctl(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?} was not refused");
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(why.contains("--sandbox namespace"), "{args:?}: {why}");
    }
    assert!(!extra.exists());
    let sock = d.path("vm.sock");
    sandboxed_daemon_works(&mut d, &sock, port, true);
    assert_all_gone(&d, &[&d.path("control.sock")]);
}

/// `--user`: the daemon binds as root, then runs as nobody; its socket and lock files are
/// nobody's (0600: the daemon's user and root may connect), it serves, its control socket
/// takes nobody's requests, and at exit it removes the sockets it can: the one in a directory
/// nobody may write to stays behind, with a warning.
#[test]
fn user_drop_serves_and_hands_the_sockets_over() {
    use std::os::unix::fs::MetadataExt;
    if !root() {
        eprintln!("skipped: --user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let sock = dir.path().join("vm.sock");
    let port = free_port();
    let mut d = Daemon::start(&[
        "--socket-path",
        sock.to_str().unwrap(),
        "--metrics-listen",
        &port.to_string(),
        "--user",
        "nobody",
    ])
    .unwrap();
    let status = std::path::PathBuf::from(format!("/proc/{}/status", d.pid()));
    assert_eq!(proc_status(&status, "Uid"), "65534 65534 65534 65534");
    assert_eq!(proc_status(&status, "Gid"), "65534 65534 65534 65534");
    assert_eq!(proc_status(&status, "Groups"), "65534");
    assert_eq!(proc_status(&status, "CapEff"), "0000000000000000");
    for p in [sock.clone(), d.path("control.sock")] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o777),
            (65534, 0o600),
            "{}",
            p.display()
        );
        let mut lock = p.into_os_string();
        lock.push(".lock");
        assert_eq!(std::fs::metadata(&lock).unwrap().uid(), 65534);
    }
    // The daemon's user is the control socket's owner now.
    let out = stats_as_nobody(&d);
    assert!(out.status.success(), "{out:?}");
    sandboxed_daemon_works(&mut d, &sock, port, false);
    assert!(d.path("control.sock").exists());
    assert!(
        d.log().contains("cannot remove the socket file"),
        "{}",
        d.log()
    );
}

/// A daemon process the test started itself; killed on drop.
struct Spawned(std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Without root, `--sandbox namespace` first enters a user namespace that maps only the
/// daemon's own uid (the test, as root, runs the daemon as nobody).
#[test]
fn namespace_sandbox_without_root_enters_a_user_namespace() {
    use std::os::unix::process::CommandExt;
    if !root() {
        eprintln!("skipped: needs root to run the daemon as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let (sock, ctl) = (dir.path().join("vm.sock"), dir.path().join("control.sock"));
    let log = dir.path().join("daemon.log");
    let mut d = Spawned(
        Command::new(daemon::binary().unwrap())
            .arg("--socket-path")
            .arg(&sock)
            .arg("--control-socket")
            .arg(&ctl)
            .args(["--sandbox", "namespace", "--seccomp-action", "kill"])
            .uid(65534)
            .gid(65534)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Serving (and so confined) once the control socket answers.
    let stats = || {
        run_to_exit(
            &[
                "stats".into(),
                "--control".into(),
                ctl.clone().into_os_string(),
            ],
            Duration::from_secs(10),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stats().status.success() {
        assert!(
            d.0.try_wait().unwrap().is_none(),
            "daemon exited: {}",
            log()
        );
        assert!(std::time::Instant::now() < deadline, "{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = d.0.id();
    let ns = |p: String| std::fs::read_link(p).unwrap();
    for kind in ["user", "mnt", "net"] {
        assert_ne!(
            ns(format!("/proc/self/ns/{kind}")),
            ns(format!("/proc/{pid}/ns/{kind}")),
            "{kind} namespace shared"
        );
    }
    assert_eq!(
        std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        proc_status(std::path::Path::new(&format!("/proc/{pid}/status")), "Uid"),
        "65534 65534 65534 65534"
    );
    let mut g = Guest::connect(&sock, GuestOptions::default()).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut g, 0, pool, [1, 0, 0], 0, 500, true);
    assert_eq!(hits, 500);
    drop(g);
    // SAFETY: kill takes no pointers; the pid is our child's, not yet reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = d.0.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "no exit: {}", log());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(st.code(), Some(0), "{st}: {}", log());
    assert!(!sock.exists() && !ctl.exists(), "{}", log());
}
