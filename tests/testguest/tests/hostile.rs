// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile frontends against the real daemon: notification file descriptors that are not
//! eventfds, and every attack of the isolation tests at once while a well-behaved guest stores
//! and verifies a million pages.

use std::time::Duration;

use tmem_testguest::daemon::Daemon;
use tmem_testguest::{pages, Guest, GuestOptions, NotifyFd};

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
