// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile frontends against the real daemon: notification file descriptors that are not
//! eventfds, and every attack of the isolation tests at once while a well-behaved guest stores
//! and verifies a million pages.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared_proto::{Op, ReqHeader, Status, PAGE_SIZE};
use tmem_testguest::daemon::Daemon;
use tmem_testguest::{pages, Error, Guest, GuestOptions, NotifyFd, RamBacking, Req, Seg};

mod common;
use common::*;

/// A hostile frontend's connection to `a.sock` with the given request-queue call and kick file
/// descriptors, and short waits: a request the device does not answer fails in 2 s.
fn hostile(d: &Daemon, call_fd: NotifyFd, kick_fd: NotifyFd) -> Guest {
    Guest::connect(
        d.path("a.sock"),
        GuestOptions {
            call_fd,
            kick_fd,
            timeout: Duration::from_secs(2),
            ..GuestOptions::default()
        },
    )
    .unwrap()
}

/// After an attack on request queue 1 of client `a`: the control queue (served by the same
/// worker thread) still answers, the disconnect completes, `a` can connect again and work, and
/// `b` was never touched.
fn only_that_queue_lost(d: &Daemon, mut g: Guest, b: &mut Guest, b_pool: u32, attack: &str) {
    g.create_pool(false, None).unwrap_or_else(|e| {
        panic!(
            "{attack}: the control queue stopped answering: {e}\n{}",
            d.log()
        )
    });
    drop(g);
    assert!(
        await_disconnect(d, "a"),
        "{attack}: the disconnect did not complete\n{}",
        d.log()
    );
    still_serving(d, "a.sock", 7);
    let (hits, _) = put_get_verify(b, 0, b_pool, [9, 0, 0], 90_000, 100, true);
    assert_eq!(hits, 100, "{attack}: the other client lost pages");
}

/// A blocking pipe as a request queue's call file descriptor, which the guest never drains:
/// the device's 8-byte notifications fill it after 8192, and a worker that writes the next
/// one blocks for good (with it the control queue on the same thread and the connection's
/// teardown). The device refuses the pipe when it arrives; the queue is not served.
#[test]
fn a_call_fd_that_is_not_an_eventfd_hangs_nothing() {
    let d = two_clients();
    let mut b = connect(&d, "b.sock");
    let b_pool = b.create_pool(true, None).unwrap();
    let mut g = hostile(&d, NotifyFd::Pipe, NotifyFd::EventFd);
    let pool = g.create_pool(true, None).unwrap();
    let mut served = 0;
    for i in 0..10_000u64 {
        match g.put(pool, [1, 0, 0], i, &pages::page(i)) {
            Ok(()) => served += 1,
            Err(e) => {
                eprintln!("put {i} failed: {e}");
                break;
            }
        }
    }
    eprintln!("{served} puts answered through a call pipe");
    only_that_queue_lost(&d, g, &mut b, b_pool, "call pipe");
    assert!(d.log().contains("not an eventfd"), "{}", d.log());
}

/// A blocking pipe as a request queue's kick file descriptor, then half a kick (1 of the 8
/// bytes a kick counter has) or the pipe's write end closed: the worker reading the kick waits
/// for the other 7 bytes for good, or reads end-of-file and its thread ends (silently, taking
/// the control queue with it). The device refuses the pipe when it arrives.
#[test]
fn a_kick_fd_that_is_not_an_eventfd_ends_nothing() {
    let d = two_clients();
    let mut b = connect(&d, "b.sock");
    let b_pool = b.create_pool(true, None).unwrap();
    for attack in ["half a kick", "kick pipe closed"] {
        let mut g = hostile(&d, NotifyFd::EventFd, NotifyFd::Pipe);
        let pool = g.create_pool(true, None).unwrap();
        // Served or refused: either way the answer is bounded (2 s).
        let r = g.put(pool, [1, 0, 0], 0, &pages::page(1));
        eprintln!("{attack}: a put through a kick pipe: {r:?}");
        if attack == "half a kick" {
            g.hostile_kick_bytes(1, &[1]).unwrap();
        } else {
            g.hostile_close_kick(1).unwrap();
        }
        // Let the worker reach the read.
        std::thread::sleep(Duration::from_millis(100));
        only_that_queue_lost(&d, g, &mut b, b_pool, attack);
    }
    assert!(d.log().contains("not an eventfd"), "{}", d.log());
}

// ---------------------------------------------------------------------------------------------
// Every attack at once: a hostile client while a well-behaved one stores a million pages.

/// Pages the well-behaved client puts (each a distinct key), verified as it goes and again at
/// the end: a million in release builds (`make e2e-test`), a tenth in debug builds, where every
/// page costs ten times as much.
const PAGES: u64 = if cfg!(debug_assertions) {
    100_000
} else {
    1_000_000
};
/// Pages put and verified per round of the well-behaved client.
const CHUNK: usize = 8192;
/// Quotas and the limit: the good client's quota holds about a fifth of its pages, so its puts
/// meet NO_SPACE at its own quota; the limit leaves room for both quotas and the arena's
/// uncharged allowance, so no put fails at the global limit.
const GOOD_QUOTA: u64 = (PAGES * 512 / 1_000_000) << 20;
const BAD_QUOTA: u64 = 32 << 20;
const LIMIT: u64 = GOOD_QUOTA + BAD_QUOTA + (32 << 20);
/// The shared pool both clients are authorized for.
const UUID: &str = "5a3c1f00-7d2e-4b6a-9c81-0e4f2a6b8d10";
const UUID_BYTES: [u8; 16] = [
    0x5a, 0x3c, 0x1f, 0x00, 0x7d, 0x2e, 0x4b, 0x6a, 0x9c, 0x81, 0x0e, 0x4f, 0x2a, 0x6b, 0x8d, 0x10,
];
/// Pages the good client keeps in the shared pool (indexes 0.. of one object).
const SHARED_PAGES: u64 = 2_000;
const SHARED_OID: [u64; 3] = [7, 7, 7];

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The kind of page `seed` is: 0 same-filled, 1..=5 compressible, 6..=7 random.
fn kind(seed: u64) -> u64 {
    mix(seed) % 8
}

/// Page `seed`, cheap enough to make two million of: a same-filled page (1 in 8), structured
/// records or text from a small vocabulary (5 in 8, compressing 2-4x), or random bytes.
fn content(seed: u64, out: &mut [u8]) {
    let h = mix(seed);
    match kind(seed) {
        0 => {
            let w = (h >> 8).to_le_bytes();
            for c in out.chunks_exact_mut(8) {
                c.copy_from_slice(&w);
            }
        }
        1..=3 => {
            for (i, c) in out.chunks_exact_mut(16).enumerate() {
                c[..8].copy_from_slice(&(seed.wrapping_mul(4096) + i as u64).to_le_bytes());
                let r = mix(h ^ i as u64);
                c[8..16].copy_from_slice(&(r & 0x00ff_0000_0000_00ff).to_le_bytes());
            }
        }
        4..=5 => {
            const WORDS: [&[u8]; 16] = [
                b"memory ", b"page ", b"guest ", b"host ", b"swap ", b"cache ", b"the ", b"of ",
                b"pool ", b"object ", b"index ", b"tmem ", b"and ", b"a ", b"to ", b"\n",
            ];
            let (mut at, mut x) = (0, h);
            while at < out.len() {
                x = mix(x);
                for nib in 0..16 {
                    let w = WORDS[((x >> (4 * nib)) & 15) as usize];
                    let n = w.len().min(out.len() - at);
                    out[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                }
            }
        }
        _ => {
            let mut x = h;
            for c in out.chunks_exact_mut(8) {
                x = mix(x);
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Page `i` of a series of compressible pages (ephemeral pools refuse incompressible ones).
fn compressible_page(base: u64, i: u64) -> Vec<u8> {
    let seed = (base + 64 * i..)
        .find(|s| (1..=5).contains(&kind(*s)))
        .unwrap();
    let mut p = vec![0u8; PAGE_SIZE];
    content(seed, &mut p);
    p
}

fn oid(key: u64) -> [u64; 3] {
    [key >> 12, 0xa, 0]
}

fn index(key: u64) -> u64 {
    key & 0xfff
}

/// Every 8th key also goes to the ephemeral pool when its page compresses.
fn ephemeral(key: u64) -> bool {
    key % 8 == 3 && (1..=5).contains(&kind(key))
}

/// What the good client saw.
#[derive(Debug, Default)]
struct GoodReport {
    stored: u64,
    no_space: u64,
    /// Pages stored before the first NO_SPACE.
    before_no_space: Option<u64>,
    /// The client's charged bytes (daemon statistics) right after the first NO_SPACE.
    charged_at_no_space: u64,
    eph_put: u64,
    eph_hits: u64,
    shared_hits: u64,
    wrong: u64,
    errors: Vec<String>,
    seconds: f64,
}

impl GoodReport {
    fn error(&mut self, e: String) {
        if self.errors.len() < 20 {
            self.errors.push(e);
        } else if self.errors.len() == 20 {
            self.errors.push("...".into());
        }
    }
}

const NOT_PUT: u8 = 0;
const STORED: u8 = 1;
const REFUSED: u8 = 2;

/// Gets every key of `keys` from the persistent pool `pers` and checks each against `buf`
/// (page `i` for `keys[i]`) and what its put answered.
fn verify(g: &mut Guest, pers: u32, keys: &[u64], buf: &[u8], state: &[u8], r: &mut GoodReport) {
    verify_with(g, (pers, None), keys, buf, state, r)
}

/// [`verify`], plus the ephemeral copies in `eph_pool` if given.
fn verify_with(
    g: &mut Guest,
    (pers, eph_pool): (u32, Option<u32>),
    keys: &[u64],
    buf: &[u8],
    state: &[u8],
    r: &mut GoodReport,
) {
    let reqs = keys.iter().enumerate().flat_map(|(i, &key)| {
        let p = Req::Get {
            pool: pers,
            oid: oid(key),
            index: index(key),
            exclusive: false,
        };
        let e = eph_pool.filter(|_| ephemeral(key)).map(|pool| {
            (
                2 * i + 1,
                Req::Get {
                    pool,
                    oid: oid(key),
                    index: index(key),
                    exclusive: false,
                },
            )
        });
        std::iter::once((2 * i, p)).chain(e)
    });
    let res = g.pipeline_queues(&[0, 1], 32, reqs, |d| {
        let i = d.tag / 2;
        let key = keys[i];
        let want = &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        match (d.tag & 1, d.status) {
            (_, Status::Ok) if d.page() != want => {
                r.wrong += 1;
                r.error(format!("key {key} (tag {}): wrong page", d.tag));
            }
            (0, Status::Ok) if state[key as usize] != STORED => {
                r.wrong += 1;
                r.error(format!("key {key}: a page for a key never stored"));
            }
            (0, Status::Ok) => {}
            (1, Status::Ok) => r.eph_hits += 1,
            (0, Status::Miss) if state[key as usize] == STORED => {
                r.wrong += 1;
                r.error(format!("key {key}: persistent page lost"));
            }
            (_, Status::Miss) => {}
            (_, s) => r.error(format!("get of key {key} (tag {}): {s:?}", d.tag)),
        }
    });
    if let Err(e) = res {
        r.error(format!("get pipeline: {e}"));
    }
}

/// The well-behaved client: puts `PAGES` distinct pages (and an ephemeral copy of every
/// 8th compressible one) in rounds of `CHUNK`, verifies each round at once and everything
/// again at the end; first it puts `SHARED_PAGES` pages in the shared pool, checked after the
/// hostile client's shared-pool attacks (`shared_done`). Returns its connection
/// too: the test checks the daemon's file descriptors with it still up.
fn good_client(
    d: &Daemon,
    shared_ready: std::sync::mpsc::Sender<()>,
    shared_done: std::sync::mpsc::Receiver<()>,
) -> (GoodReport, Guest) {
    let t0 = Instant::now();
    let mut r = GoodReport::default();
    let mut g = Guest::connect(
        d.path("good.sock"),
        GuestOptions {
            request_queues: 2,
            ..GuestOptions::default()
        },
    )
    .unwrap();
    let pers = g.create_pool(true, None).unwrap();
    let eph = g.create_pool(false, None).unwrap();
    let shared = g.create_pool(false, Some(UUID_BYTES)).unwrap();
    let shared_page = |i: u64| compressible_page(0x5ea7_0000, i);
    for i in 0..SHARED_PAGES {
        g.put(shared, SHARED_OID, i, &shared_page(i)).unwrap();
    }
    let check_shared = |g: &mut Guest, r: &mut GoodReport| {
        let mut out = vec![0u8; PAGE_SIZE];
        let mut hits = 0;
        for i in 0..SHARED_PAGES {
            match g.get(shared, SHARED_OID, i, false, &mut out) {
                Ok(_) if out == shared_page(i) => hits += 1,
                Ok(_) => {
                    r.wrong += 1;
                    r.error(format!("shared page {i}: wrong page"));
                }
                Err(e) => r.error(format!("shared get {i}: {e}")),
            }
        }
        hits
    };
    // The hostile client fills and poisons the shared pool now; this client is far from its
    // quota, so nothing of its own is evicted meanwhile and every shared page must be there.
    shared_ready.send(()).unwrap();
    shared_done.recv().unwrap();
    r.shared_hits = check_shared(&mut g, &mut r);
    // It stays a member for the whole run, next to the hostile client's pages there: its
    // puts at the quota below evict its own pages (these first) and must not pay for those.

    let mut state = vec![NOT_PUT; PAGES as usize];
    let mut buf = vec![0u8; CHUNK * PAGE_SIZE];
    let mut start = 0u64;
    while start < PAGES {
        let n = CHUNK.min((PAGES - start) as usize);
        for i in 0..n {
            content(
                start + i as u64,
                &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            );
        }
        let reqs = (0..n).flat_map(|i| {
            let key = start + i as u64;
            let page = &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            let p = Req::Put {
                pool: pers,
                oid: oid(key),
                index: index(key),
                page,
            };
            let e = ephemeral(key).then_some((
                2 * i + 1,
                Req::Put {
                    pool: eph,
                    oid: oid(key),
                    index: index(key),
                    page,
                },
            ));
            std::iter::once((2 * i, p)).chain(e)
        });
        let stored_so_far = r.stored;
        let mut first_no_space = false;
        let res = g.pipeline_queues(&[0, 1], 32, reqs, |dn| {
            let key = start + (dn.tag / 2) as u64;
            match (dn.tag & 1, dn.status) {
                (0, Status::Ok) => {
                    state[key as usize] = STORED;
                    r.stored += 1;
                }
                (0, Status::NoSpace) => {
                    state[key as usize] = REFUSED;
                    r.no_space += 1;
                    if r.before_no_space.is_none() {
                        r.before_no_space = Some(r.stored);
                        first_no_space = true;
                    }
                }
                (1, Status::Ok) => r.eph_put += 1,
                (1, Status::NoSpace) => {}
                (_, s) => r.error(format!("put of key {key} (tag {}): {s:?}", dn.tag)),
            }
        });
        if let Err(e) = res {
            r.error(format!("put pipeline at {start}: {e}"));
            break;
        }
        if first_no_space {
            // Right after the first NO_SPACE: is the client at its own quota?
            r.charged_at_no_space = common::n(&d.client_stats("good").unwrap()["charged_bytes"]);
            eprintln!(
                "first NO_SPACE after {} pages stored ({} in earlier rounds), {:.1} s in",
                r.before_no_space.unwrap_or(0),
                stored_so_far,
                t0.elapsed().as_secs_f64()
            );
        }
        let keys: Vec<u64> = (start..start + n as u64).collect();
        verify_with(&mut g, (pers, Some(eph)), &keys, &buf, &state, &mut r);
        start += n as u64;
    }
    eprintln!(
        "good: {PAGES} puts and their gets in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // Every stored page again, after all the attacks (refused ones were found absent above).
    let stored: Vec<u64> = (0..PAGES)
        .filter(|&k| state[k as usize] == STORED)
        .collect();
    for keys in stored.chunks(CHUNK) {
        for (i, &key) in keys.iter().enumerate() {
            content(key, &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        }
        verify(&mut g, pers, keys, &buf, &state, &mut r);
    }
    r.seconds = t0.elapsed().as_secs_f64();
    (r, g)
}

/// The hostile client's connection options: answers it waits for come within `timeout`.
fn bad_opts(timeout: Duration) -> GuestOptions {
    GuestOptions {
        timeout,
        ..GuestOptions::default()
    }
}

fn bad(d: &Daemon) -> Guest {
    Guest::connect(d.path("bad.sock"), bad_opts(Duration::from_secs(30))).unwrap()
}

/// `count` compressible pages (seeds from `base`) into `pool` of `g`, pipelined; returns how
/// many were stored.
fn put_many(g: &mut Guest, pool: u32, obj: u64, base: u64, count: usize) -> u64 {
    let seeds: Vec<u64> = (base..)
        .filter(|s| (1..=5).contains(&kind(*s)))
        .take(count)
        .collect();
    let mut buf = vec![0u8; count * PAGE_SIZE];
    for (i, &s) in seeds.iter().enumerate() {
        content(s, &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
    }
    let reqs = (0..count).map(|i| {
        (
            i,
            Req::Put {
                pool,
                oid: [9, 9, obj],
                index: i as u64,
                page: &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            },
        )
    });
    let mut stored = 0;
    g.pipeline(0, 32, reqs, |d| match d.status {
        Status::Ok => stored += 1,
        Status::NoSpace => {}
        s => panic!("put {}: {s:?}", d.tag),
    })
    .unwrap();
    stored
}

/// Joins the shared pool and puts far more than its quota holds: its own pages are evicted,
/// nothing more is charged to it, and nobody else's pages go.
fn attack_shared_fill(d: &Daemon) -> String {
    let mut g = bad(d);
    let pool = g.create_pool(false, Some(UUID_BYTES)).unwrap();
    let stored = put_many(&mut g, pool, 1, 1 << 40, 40_000);
    let c = d.client_stats("bad").unwrap();
    assert!(n(&c["charged_bytes"]) <= BAD_QUOTA, "{c}");
    assert!(
        n(&c["evictions"]) > 0,
        "the shared pool was not filled past the quota: {c}"
    );
    format!(
        "{stored} of 40000 puts stored, {} evictions",
        c["evictions"]
    )
}

/// Puts other content under every key the good client put in the shared pool, then tries to
/// drop them (flushes, exclusive gets): each put is refused and nothing changes.
fn attack_poison(d: &Daemon) -> String {
    let mut g = bad(d);
    let pool = g.create_pool(false, Some(UUID_BYTES)).unwrap();
    let mut refused = 0;
    for i in 0..SHARED_PAGES {
        match status_of(g.put(pool, SHARED_OID, i, &compressible_page(0xbad0_0000, i))) {
            Some(Status::Refused) => refused += 1,
            s => panic!("poisoning put {i}: {s:?}"),
        }
    }
    let mut out = vec![0u8; PAGE_SIZE];
    for i in 0..100 {
        assert!(matches!(
            g.flush_page(pool, SHARED_OID, i),
            Err(Error::Status(Status::Miss))
        ));
        let flags = g.get(pool, SHARED_OID, 100 + i, true, &mut out).unwrap();
        assert_eq!(flags & shared_proto::resp_flags::DROPPED, 0);
    }
    g.flush_object(pool, SHARED_OID).unwrap();
    let c = d.client_stats("bad").unwrap();
    assert_eq!(n(&c["shared_put_conflicts"]), SHARED_PAGES, "{c}");
    format!("{refused} poisoning puts refused")
}

fn attack_ram_past_eof(d: &Daemon) -> String {
    let r = Guest::connect(
        d.path("bad.sock"),
        GuestOptions {
            ram: RamBacking::Oversized { extra: 1 << 20 },
            ..bad_opts(Duration::from_secs(5))
        },
    );
    assert!(r.is_err(), "a region past the end of its file was accepted");
    "refused at SET_MEM_TABLE".into()
}

fn attack_unsealed_ram(d: &Daemon) -> String {
    let r = Guest::connect(
        d.path("bad.sock"),
        GuestOptions {
            ram: RamBacking::UnsealedMemfd,
            ..bad_opts(Duration::from_secs(5))
        },
    );
    assert!(r.is_err(), "unsealed guest memory was accepted");
    "refused at SET_MEM_TABLE".into()
}

/// The daemon accepts only memory sealed against shrinking (by default), so the truncation a
/// hostile VMM would do after SET_MEM_TABLE is refused by the kernel.
fn attack_truncate_ram(d: &Daemon) -> String {
    let mut g = bad(d);
    let pool = g.create_pool(true, None).unwrap();
    g.put(pool, [1, 0, 0], 0, &pages::page(1)).unwrap();
    for len in [0, g.ram_size() / 2] {
        let e = g.truncate_ram(len).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "truncate to {len}: {e}"
        );
    }
    let mut out = vec![0u8; PAGE_SIZE];
    g.get(pool, [1, 0, 0], 0, false, &mut out).unwrap();
    assert_eq!(out, pages::page(1));
    "truncation refused (EPERM)".into()
}

/// A ring state no driver can be in: the queue breaks, the control queue (same worker thread)
/// answers.
fn attack_ring(d: &Daemon, head_past_queue: bool) -> String {
    let mut g = Guest::connect(d.path("bad.sock"), bad_opts(Duration::from_secs(5))).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    g.put(pool, [1, 0, 0], 0, &pages::page(1)).unwrap();
    let size = g.queue_size(1).unwrap();
    if head_past_queue {
        g.hostile_publish_heads(1, &[size + 5]).unwrap();
    } else {
        let idx = g.avail_idx(1).unwrap().wrapping_add(size + 7);
        g.hostile_set_avail_idx(1, idx).unwrap();
    }
    g.create_pool(false, None)
        .unwrap_or_else(|e| panic!("the control queue stopped answering: {e}"));
    "queue broken, control queue answers".into()
}

fn attack_call_pipe(d: &Daemon) -> String {
    let mut g = Guest::connect(
        d.path("bad.sock"),
        GuestOptions {
            call_fd: NotifyFd::Pipe,
            ..bad_opts(Duration::from_secs(1))
        },
    )
    .unwrap();
    let pool = g.create_pool(true, None).unwrap();
    let mut answered = 0;
    while answered < 10_000 && g.put(pool, [1, 0, 0], answered, &pages::page(1)).is_ok() {
        answered += 1;
    }
    g.create_pool(false, None)
        .unwrap_or_else(|e| panic!("the control queue stopped answering: {e}"));
    format!("{answered} puts answered")
}

fn attack_kick_pipe(d: &Daemon, close: bool) -> String {
    let mut g = Guest::connect(
        d.path("bad.sock"),
        GuestOptions {
            kick_fd: NotifyFd::Pipe,
            ..bad_opts(Duration::from_secs(1))
        },
    )
    .unwrap();
    if close {
        g.hostile_close_kick(1).unwrap();
    } else {
        g.hostile_kick_bytes(1, &[1]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    g.create_pool(false, None)
        .unwrap_or_else(|e| panic!("the control queue stopped answering: {e}"));
    "control queue answers".into()
}

/// A new blocking kick eventfd for the running queue, then a kick on the old one.
fn attack_kick_replaced(d: &Daemon) -> String {
    let mut g = Guest::connect(d.path("bad.sock"), bad_opts(Duration::from_secs(5))).unwrap();
    let pool = g.create_pool(true, None).unwrap();
    g.put(pool, [1, 0, 0], 0, &pages::page(1)).unwrap();
    let old = g.hostile_replace_kick(1, true).unwrap();
    old.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    g.create_pool(false, None)
        .unwrap_or_else(|e| panic!("the control queue stopped answering: {e}"));
    "control queue answers".into()
}

/// Malformed chains (short and unknown headers, pages outside guest memory, no room for a
/// status) and a flood of garbage: each gets an error status or is returned unused.
fn attack_malformed(d: &Daemon) -> String {
    let mut g = bad(d);
    let pool = g.create_pool(true, None).unwrap();
    let put = |pool| {
        ReqHeader {
            op: Op::Put as u32,
            pool_id: pool,
            ..ReqHeader::default()
        }
        .encode()
        .to_vec()
    };
    let cases = [
        vec![Seg::Read(vec![1, 2, 3]), Seg::Write(16)],
        vec![Seg::Read(put(pool)), Seg::Write(16)],
        vec![
            Seg::Read(put(pool)),
            Seg::Raw {
                addr: g.ram_size() + 4096,
                len: 4096,
                write: false,
            },
            Seg::Write(16),
        ],
        vec![
            Seg::Read(put(pool)),
            Seg::Raw {
                addr: u64::MAX - 100,
                len: 4096,
                write: false,
            },
            Seg::Write(16),
        ],
        vec![
            Seg::Read(put(12345)),
            Seg::Read(vec![1; 4096]),
            Seg::Write(16),
        ],
        vec![Seg::Read(put(pool))],
    ];
    for (i, segs) in cases.iter().enumerate() {
        let (used, w) = g
            .raw_chain(1, segs)
            .unwrap_or_else(|e| panic!("case {i}: {e}"));
        if let Some(w) = w.last() {
            assert_eq!(used, 16, "case {i}");
            assert_ne!(w[..4], [0, 0, 0, 0], "case {i}: answered OK");
        } else {
            assert_eq!(used, 0, "case {i}");
        }
    }
    for _ in 0..2_000 {
        g.raw_chain(1, &[Seg::Read(vec![0xff; 48]), Seg::Write(16)])
            .unwrap();
    }
    g.put(pool, [5, 0, 0], 1, &pages::page(5)).unwrap();
    "all answered with an error or returned unused".into()
}

/// CREATE_POOL/DESTROY_POOL churn: nothing stays charged or allocated.
fn attack_pool_churn(d: &Daemon) -> String {
    const CYCLES: u32 = 20_000;
    let mut g = bad(d);
    // What it still owns in the shared pool stays charged to it.
    let before = n(&d.client_stats("bad").unwrap()["charged_bytes"]);
    for i in 0..CYCLES {
        let p = g.create_pool(i % 2 == 0, None).unwrap();
        g.destroy_pool(p).unwrap();
    }
    let c = d.client_stats("bad").unwrap();
    assert_eq!(n(&c["charged_bytes"]), before, "{c}");
    assert_eq!(n(&c["memory_used"]), 0, "{c}");
    format!("{CYCLES} create/destroy cycles")
}

fn attack_reconnect_churn(d: &Daemon) -> String {
    const CYCLES: u32 = 3_000;
    for _ in 0..CYCLES {
        drop(handshake(d, "bad.sock"));
    }
    format!("{CYCLES} connections")
}

/// A control-socket peer that pipelines requests and never reads, and idle metrics
/// connections: statistics and scrapes are still answered meanwhile.
fn attack_control(d: &Daemon, port: u16) -> String {
    let mut hog = std::os::unix::net::UnixStream::connect(d.path("control.sock")).unwrap();
    hog.write_all("{\"cmd\":\"stats\"}\n".repeat(60 * 1024 / 16).as_bytes())
        .unwrap();
    let idle: Vec<_> = (0..8)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        d.stats().unwrap();
        let body = scrape(port, Duration::from_secs(5));
        assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    }
    drop((hog, idle));
    "stats and scrapes answered".into()
}

/// The daemon is the process it was and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        .unwrap_or(false)
}

/// One daemon with a memory limit; a well-behaved client puts and verifies a million pages
/// (persistent, ephemeral and shared) while a hostile client runs every attack of the
/// isolation tests in turn, each on a fresh connection. The good client sees no wrong page and
/// no error but NO_SPACE at its own quota; after each attack the hostile connection ends and
/// the client can connect again; the daemon stays up, its RSS (sampled every 100 ms) within the
/// documented bound, and its file descriptors are what they were.
#[test]
fn a_hostile_client_next_to_a_million_verified_pages() {
    let t0 = Instant::now();
    let port = free_port();
    let good = format!("name=good,socket={{dir}}/good.sock,quota={GOOD_QUOTA},shared={UUID}");
    let badc = format!("name=bad,socket={{dir}}/bad.sock,quota={BAD_QUOTA},shared={UUID}");
    let (limit, port_s) = (LIMIT.to_string(), port.to_string());
    let d = Arc::new(
        Daemon::start(&[
            "--memory-limit",
            &limit,
            "--queues",
            "2",
            "--client",
            &good,
            "--client",
            &badc,
            "--metrics-listen",
            &port_s,
        ])
        .unwrap(),
    );
    let pid = d.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (fds_tx, fds_rx) = std::sync::mpsc::channel();
    let good = {
        let d = d.clone();
        std::thread::spawn(move || good_client(&d, ready_tx, done_rx))
    };
    ready_rx.recv().unwrap();
    // The good client is connected and the hostile one not yet; the count has settled (the
    // probe of the metrics port above may still be closing).
    let fds_before = settled_fd_count(pid);
    let hostile = {
        let d = d.clone();
        std::thread::spawn(move || {
            type Attack = (&'static str, Box<dyn Fn(&Daemon) -> String>);
            let attacks: Vec<Attack> = vec![
                (
                    "shared pool filled past the quota",
                    Box::new(attack_shared_fill),
                ),
                ("shared pool poisoned", Box::new(attack_poison)),
                (
                    "guest RAM past the end of its file",
                    Box::new(attack_ram_past_eof),
                ),
                ("unsealed guest RAM", Box::new(attack_unsealed_ram)),
                ("guest RAM truncated", Box::new(attack_truncate_ram)),
                (
                    "available index far ahead",
                    Box::new(|d| attack_ring(d, false)),
                ),
                (
                    "head index past the queue",
                    Box::new(|d| attack_ring(d, true)),
                ),
                ("call pipe", Box::new(attack_call_pipe)),
                (
                    "half a kick on a kick pipe",
                    Box::new(|d| attack_kick_pipe(d, false)),
                ),
                ("kick pipe closed", Box::new(|d| attack_kick_pipe(d, true))),
                (
                    "kick replaced while the queue runs",
                    Box::new(attack_kick_replaced),
                ),
                ("malformed requests", Box::new(attack_malformed)),
                ("pool churn", Box::new(attack_pool_churn)),
                ("reconnect churn", Box::new(attack_reconnect_churn)),
                (
                    "control socket abuse",
                    Box::new(move |d| attack_control(d, port)),
                ),
            ];
            for (i, (name, attack)) in attacks.iter().enumerate() {
                let t = Instant::now();
                let what = attack(&d);
                assert!(alive(pid), "{name}: the daemon died\n{}", d.log());
                assert!(
                    await_disconnect(&d, "bad"),
                    "{name}: the hostile connection did not end\n{}",
                    d.log()
                );
                // The hostile client can connect again and work.
                still_serving(&d, "bad.sock", 100 + i as u64);
                assert!(await_disconnect(&d, "bad"), "{name}: after the check");
                eprintln!("attack {name}: {what} ({:?})", t.elapsed());
                if i == 1 {
                    done_tx.send(()).unwrap();
                }
            }
            // The client is disconnected: what it opened is closed (control and metrics
            // connections end on the daemon's side within their 5 s bound).
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut after = fd_count(pid);
            while after != fds_before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                after = fd_count(pid);
            }
            fds_tx.send(after).unwrap();
        })
    };
    let hostile_result = hostile.join();
    let fds_after = fds_rx.recv().ok();
    let (r, g) = good.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let bound = LIMIT + LIMIT / 10 + (32 << 20);
    let s = d.stats().unwrap();
    eprintln!(
        "good: {} stored ({} before the first NO_SPACE, charged {} of its {GOOD_QUOTA} quota \
         then), {} NO_SPACE, {} ephemeral stored / {} got back, {} of {SHARED_PAGES} shared \
         pages intact after the attacks, {} wrong, {} errors, {:.1} s; daemon RSS peak {} MiB (bound {} MiB), \
         memory used {} MiB; fds {fds_before} -> {fds_after:?}; test {:.1} s",
        r.stored,
        r.before_no_space.unwrap_or(0),
        r.charged_at_no_space,
        r.no_space,
        r.eph_put,
        r.eph_hits,
        r.shared_hits,
        r.wrong,
        r.errors.len(),
        r.seconds,
        peak >> 20,
        bound >> 20,
        n(&s["memory_used_bytes"]) >> 20,
        t0.elapsed().as_secs_f64(),
    );
    if let Err(e) = hostile_result {
        std::panic::resume_unwind(e);
    }
    assert_eq!(r.wrong, 0, "wrong pages: {:?}", r.errors);
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert!(r.no_space > 0, "the quota was never reached");
    // NO_SPACE came at the client's own quota: within a page and its structure of it.
    assert!(
        r.charged_at_no_space + (1 << 20) >= GOOD_QUOTA,
        "NO_SPACE at {} charged bytes, quota {GOOD_QUOTA}",
        r.charged_at_no_space
    );
    assert!(r.stored > 10_000, "{}", r.stored);
    assert!(alive(pid) && d.pid() == pid);
    let log = d.log();
    assert!(!log.contains("serving thread failed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(peak <= bound, "RSS peaked at {peak} bytes, bound {bound}");
    assert_eq!(
        fds_after,
        Some(fds_before),
        "daemon file descriptors before and after"
    );
    drop(g);
}

/// A new kick eventfd for a running queue (a VMM stops the ring first), then a kick on the
/// old one: the device is still woken by the old one, and the worker read the new one, which
/// holds nothing: a blocking eventfd waits for good, a non-blocking one fails and ends the
/// thread.
#[test]
fn a_kick_fd_replaced_while_the_queue_runs_ends_nothing() {
    let d = two_clients();
    let mut b = connect(&d, "b.sock");
    let b_pool = b.create_pool(true, None).unwrap();
    for blocking in [true, false] {
        let attack = if blocking {
            "blocking kick swapped in"
        } else {
            "non-blocking kick swapped in"
        };
        let mut g = hostile(&d, NotifyFd::EventFd, NotifyFd::EventFd);
        let pool = g.create_pool(true, None).unwrap();
        g.put(pool, [1, 0, 0], 0, &pages::page(1)).unwrap();
        let old = g.hostile_replace_kick(1, blocking).unwrap();
        old.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        only_that_queue_lost(&d, g, &mut b, b_pool, attack);
    }
}
