// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the end-to-end test files (each file is its own crate and uses only some
//! of them, hence the `dead_code` allowance).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::time::Duration;

use shared_proto::Status;
use tmem_testguest::daemon::Daemon;
use tmem_testguest::{pages, Error, Guest, GuestOptions, Req};

pub fn connect(d: &Daemon, sock: &str) -> Guest {
    Guest::connect(d.path(sock), GuestOptions::default()).unwrap()
}

pub fn status_of(r: Result<(), Error>) -> Option<Status> {
    match r {
        Ok(()) => Some(Status::Ok),
        Err(Error::Status(s)) => Some(s),
        Err(e) => panic!("transport error: {e}"),
    }
}

pub fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Puts `count` pages (seeds `base..`) into `pool` at depth 32, then gets each back and checks
/// it byte for byte. Persistent pools must hit every time; ephemeral misses are legal.
pub fn put_get_verify(
    g: &mut Guest,
    queue: usize,
    pool: u32,
    oid: [u64; 3],
    base: u64,
    count: u64,
    persistent: bool,
) -> (u64, u64) {
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
    g.pipeline(queue, 32, reqs, |d| match d.status {
        // Ephemeral puts may be refused (incompressible page, no room); persistent ones here never.
        Status::Ok => {}
        Status::Refused | Status::NoSpace if !persistent => {}
        s => panic!("put {} failed: {s:?}", d.tag),
    })
    .unwrap();
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
    let (mut hits, mut misses) = (0, 0);
    g.pipeline(queue, 32, reqs, |d| match d.status {
        Status::Ok => {
            assert!(
                d.page() == store[d.tag].as_slice(),
                "page {} differs",
                d.tag
            );
            hits += 1;
        }
        Status::Miss if !persistent => misses += 1,
        s => panic!("get {} failed: {s:?}", d.tag),
    })
    .unwrap();
    assert_eq!(hits + misses, count);
    (hits, misses)
}

/// Waits (at most 5 s) until the daemon reports client `name` disconnected.
pub fn await_disconnect(d: &Daemon, name: &str) -> bool {
    for _ in 0..500 {
        if d.client_stats(name).unwrap()["connected"] == false {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Waits (at most 5 s) until the daemon's log contains `text`: the daemon logs what it did
/// after doing it, so a test that saw the effect (in its stats) may not see the line yet.
pub fn await_log(d: &Daemon, text: &str) -> bool {
    for _ in 0..500 {
        if d.log().contains(text) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The open file descriptors of `pid` once the count stays the same for 300 ms (at most 5 s).
pub fn settled_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    for _ in 0..16 {
        std::thread::sleep(Duration::from_millis(300));
        let now = fd_count(pid);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// `/proc/PID/status` VmRSS, in bytes.
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A frontend that connects and completes one request/reply exchange (SET_OWNER, then
/// GET_FEATURES): when it returns, the daemon has accepted it and built its device.
pub fn handshake(d: &Daemon, sock: &str) -> vhost::vhost_user::Frontend {
    use vhost::VhostBackend;
    let f = vhost::vhost_user::Frontend::connect(d.path(sock), 2).unwrap();
    f.set_owner().unwrap();
    f.get_features().unwrap();
    f
}

/// A daemon serving clients `a` and `b` on `a.sock` and `b.sock`.
pub fn two_clients() -> Daemon {
    Daemon::start(&[
        "--client",
        "name=a,socket={dir}/a.sock",
        "--client",
        "name=b,socket={dir}/b.sock",
    ])
    .unwrap()
}

/// Puts and gets a few pages on a fresh connection to `sock`: the daemon is alive and serving.
pub fn still_serving(d: &Daemon, sock: &str, seed: u64) {
    let mut g = Guest::connect(
        d.path(sock),
        GuestOptions {
            timeout: Duration::from_secs(5),
            ..GuestOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("daemon not serving {sock}: {e}\n{}", d.log()));
    let pool = g.create_pool(true, None).unwrap();
    let (hits, _) = put_get_verify(&mut g, 0, pool, [seed, 0, 0], seed, 100, true);
    assert_eq!(hits, 100);
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn scrape(port: u16, bound: Duration) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(bound)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body)
        .unwrap_or_else(|e| panic!("scrape not answered within {bound:?}: {e}"));
    body
}
