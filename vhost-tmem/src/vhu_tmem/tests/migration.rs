// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device state transfer (live migration): SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE as QEMU
//! sends them, through real pipes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

use super::*;
use crate::store::Ended;

const SAVE: VhostTransferStateDirection = VhostTransferStateDirection::SAVE;
const LOAD: VhostTransferStateDirection = VhostTransferStateDirection::LOAD;
const STOPPED: VhostTransferStatePhase = VhostTransferStatePhase::STOPPED;

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0);
    // SAFETY: both descriptors were just created and are owned by nothing else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Saves the device's state as QEMU does: the pipe's write end to the device, read to its end,
/// then the check.
fn save(e: &Env) -> io::Result<Vec<u8>> {
    let (mut r, w) = pipe();
    assert!(e.dev.set_device_state_fd(SAVE, STOPPED, w)?.is_none());
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes).unwrap();
    e.dev.check_device_state()?;
    Ok(bytes)
}

/// Loads `bytes` into the device as QEMU does: written into the pipe by another thread, then
/// the check.
fn load(e: &Env, bytes: &[u8]) -> io::Result<()> {
    let (r, mut w) = pipe();
    e.dev.set_device_state_fd(LOAD, STOPPED, r)?;
    let bytes = bytes.to_vec();
    // The device may stop reading at an error: the rest of the write fails, as QEMU's would.
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&bytes);
    });
    let checked = e.dev.check_device_state();
    writer.join().unwrap();
    checked
}

fn engine() -> Arc<Engine> {
    Arc::new(Engine::new(EngineConfig::default()))
}

/// Persistent page `i`: incompressible, so that the state is larger than a pipe holds.
fn data(i: u8) -> Vec<u8> {
    crate::store::testutil::random_page(u64::from(i) + 1)
}

/// A source with a persistent pool of 40 pages and an ephemeral one of 5.
fn source(mode: Migration) -> (Env, u32, u32) {
    let a = env_cfg(engine(), "guest", mode);
    a.dev.acked_features(1 << feature::SESSION);
    let p = a.create_pool(req_flags::POOL_PERSISTENT, [0; 16]).value as u32;
    let eph = a.create_pool(0, [0; 16]).value as u32;
    for i in 0..40u8 {
        assert_eq!(a.put(p, i.into(), &data(i)), Some(Status::Ok));
    }
    for i in 0..5u8 {
        assert_eq!(a.put(eph, i.into(), &page(100 + i)), Some(Status::Ok));
    }
    (a, p, eph)
}

#[test]
fn a_clients_pages_move_to_another_daemon_and_leave_the_first() {
    let (a, p, eph) = source(Migration::Persistent);
    let bytes = save(&a).unwrap();
    // The source keeps everything until its frontend goes: the migration may still fail.
    assert_eq!(a.get(p, 3, 0).1, data(3));
    let b = env_cfg(engine(), "guest", Migration::Persistent);
    load(&b, &bytes).unwrap();
    b.dev.acked_features(1 << feature::SESSION);
    for i in 0..40u8 {
        assert_eq!(b.get(p, i.into(), 0).1, data(i), "page {i}");
    }
    // Ephemeral pools arrive empty by default, but they arrive: the driver still uses them.
    assert_eq!(
        Status::from_u32(b.get(eph, 1, 0).0.status),
        Some(Status::Miss)
    );
    assert_eq!(b.put(eph, 1, &page(7)), Some(Status::Ok));
    // The source's frontend quits: nothing waits for a reconnect there.
    let client = a.engine.client("guest").unwrap();
    match a.engine.connection_ended(&client) {
        Ended::MigratedOut(r) => assert_eq!((r.pools, r.persistent_pages), (2, 40)),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.engine.memory_used(), 0);
}

#[test]
fn migration_all_takes_ephemeral_pages_too() {
    let (a, _, eph) = source(Migration::All);
    let b = env_cfg(engine(), "guest", Migration::All);
    load(&b, &save(&a).unwrap()).unwrap();
    for i in 0..5u8 {
        assert_eq!(b.get(eph, i.into(), 0).1, page(100 + i), "page {i}");
    }
}

#[test]
fn a_source_whose_guest_runs_on_keeps_its_pools() {
    let (a, p, _) = source(Migration::Persistent);
    save(&a).unwrap();
    // The migration failed after the save: QEMU starts the device again, which sets the
    // driver's features again.
    a.dev.acked_features(1 << feature::SESSION);
    assert_eq!(a.get(p, 5, 0).1, data(5));
    let client = a.engine.client("guest").unwrap();
    assert!(matches!(
        a.engine.connection_ended(&client),
        Ended::Kept { pools: 2, .. }
    ));
}

#[test]
fn bad_streams_are_refused_whole() {
    let (a, p, _) = source(Migration::Persistent);
    let bytes = save(&a).unwrap();
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let mut version = bytes.clone();
    version[8] = 99;
    let cases: [(&str, &[u8], &str); 4] = [
        ("truncated", &bytes[..bytes.len() - 10], "truncated"),
        ("corrupted", &corrupt, "checksum"),
        ("wrong version", &version, "version 99"),
        ("empty", &[], "truncated"),
    ];
    for (what, stream, says) in cases {
        let b = env_cfg(engine(), "guest", Migration::Persistent);
        let err = load(&b, stream).unwrap_err().to_string();
        assert!(err.contains(says), "{what}: {err}");
        assert_eq!(b.engine.memory_used(), 0, "{what}");
        assert_eq!(
            Status::from_u32(b.get(p, 1, 0).0.status),
            Some(Status::BadPool),
            "{what}"
        );
    }
    // The source was not touched by any of it.
    assert_eq!(a.get(p, 39, 0).1, data(39));
}

#[test]
fn a_target_without_room_refuses_the_client() {
    let (a, p, _) = source(Migration::Persistent);
    let bytes = save(&a).unwrap();
    let small = Arc::new(Engine::new(EngineConfig {
        memory_limit: 64 << 10,
        ..EngineConfig::default()
    }));
    let b = env_cfg(small, "guest", Migration::Persistent);
    let err = load(&b, &bytes).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
    assert_eq!(b.engine.memory_used(), 0);
    assert_eq!(
        Status::from_u32(b.get(p, 1, 0).0.status),
        Some(Status::BadPool)
    );
}

#[test]
fn migration_off_offers_nothing_and_refuses_transfers() {
    let e = env();
    assert_eq!(e.dev.features() & (1 << VHOST_F_LOG_ALL), 0);
    let pf = e.dev.protocol_features();
    assert!(!pf.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    assert!(!pf.contains(VhostUserProtocolFeatures::DEVICE_STATE));
    let err = save(&e).unwrap_err().to_string();
    assert!(err.contains("--migration off"), "{err}");
    let on = env_cfg(engine(), "g", Migration::Persistent);
    assert_ne!(on.dev.features() & (1 << VHOST_F_LOG_ALL), 0);
    let pf = on.dev.protocol_features();
    assert!(
        pf.contains(VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::DEVICE_STATE)
    );
    // No transfer to check, and one at a time.
    assert!(on.dev.check_device_state().is_err());
    let (_r, w) = pipe();
    on.dev.set_device_state_fd(SAVE, STOPPED, w).unwrap();
    let (_r2, w2) = pipe();
    let err = on
        .dev
        .set_device_state_fd(SAVE, STOPPED, w2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already under way"), "{err}");
    drop(_r);
    let _ = on.dev.check_device_state();
}

#[test]
fn a_frontend_that_stops_moving_the_stream_fails_the_transfer() {
    let (mut a, p, _) = source(Migration::Persistent);
    a.dev.transfers = Transfers::with_stall(Migration::Persistent, Duration::from_millis(300));
    // Save: the frontend reads nothing and keeps its end open. The state is bigger than
    // the pipe, so the saving thread waits, gives up, and lets go of the shard it holds.
    let (r, w) = pipe();
    a.dev.set_device_state_fd(SAVE, STOPPED, w).unwrap();
    let err = a.dev.check_device_state().unwrap_err().to_string();
    assert!(err.contains("moved no state through the pipe"), "{err}");
    assert_eq!(a.put(p, 77, &page(77)), Some(Status::Ok));
    drop(r);
    // Load: the frontend writes half and stops.
    let bytes = save(&a).unwrap();
    let mut b = env_cfg(engine(), "guest", Migration::Persistent);
    b.dev.transfers = Transfers::with_stall(Migration::Persistent, Duration::from_millis(300));
    let (r, mut w) = pipe();
    b.dev.set_device_state_fd(LOAD, STOPPED, r).unwrap();
    w.write_all(&bytes[..1000]).unwrap();
    let err = b.dev.check_device_state().unwrap_err().to_string();
    assert!(err.contains("moved no state through the pipe"), "{err}");
    assert_eq!(b.engine.memory_used(), 0);
    drop(w);
}

#[test]
fn a_load_nobody_checks_is_over_before_the_connection_is_settled() {
    let (a, _, _) = source(Migration::Persistent);
    let bytes = save(&a).unwrap();
    let b = env_cfg(engine(), "guest", Migration::Persistent);
    let engine = b.engine.clone();
    let (r, mut w) = pipe();
    b.dev.set_device_state_fd(LOAD, STOPPED, r).unwrap();
    // The frontend sends the stream, the end of it late, and goes away without checking.
    let (head, tail) = bytes.split_at(bytes.len() - 100);
    w.write_all(head).unwrap();
    let tail = tail.to_vec();
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        w.write_all(&tail).unwrap();
    });
    // The connection ends: the device goes, then what the client holds is settled.
    drop(b);
    let client = engine.client("guest").unwrap();
    assert!(matches!(
        engine.connection_ended(&client),
        Ended::Dropped(_)
    ));
    late.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(engine.memory_used(), 0, "a late load left pages behind");
}

#[test]
fn a_stalled_save_does_not_hold_the_store() {
    let (mut a, p, _) = source(Migration::Persistent);
    a.dev.transfers = Transfers::with_stall(Migration::Persistent, Duration::from_secs(20));
    // About 1 MiB in one object (one shard): more than the pipe and the saver's buffer hold.
    for i in 40..250u8 {
        assert_eq!(a.put(p, i.into(), &data(i)), Some(Status::Ok));
    }
    // The frontend takes the pipe and reads nothing: the saver blocks on it.
    let (r, w) = pipe();
    a.dev.set_device_state_fd(SAVE, STOPPED, w).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile the store serves the pool being saved (as it serves other clients' shared
    // pools and eviction): no shard lock is held across the blocked write.
    let t0 = std::time::Instant::now();
    for i in 0..40u8 {
        assert_eq!(a.put(p, 100 + u64::from(i), &data(i)), Some(Status::Ok));
    }
    let took = t0.elapsed();
    drop(r);
    assert!(a.dev.check_device_state().is_err());
    assert!(
        took < Duration::from_secs(10),
        "puts waited {took:?} for the stalled save"
    );
}

#[test]
fn loaded_pools_wait_for_their_driver_whatever_its_features() {
    let (a, p, _) = source(Migration::Persistent);
    let bytes = save(&a).unwrap();
    // A driver without SESSION: the target's pools are its own, moved, and must stay.
    let b = env_cfg(engine(), "guest", Migration::Persistent);
    load(&b, &bytes).unwrap();
    // The target's connection drops before the guest resumes: the pools wait.
    let client = b.engine.client("guest").unwrap();
    assert!(matches!(
        b.engine.connection_ended(&client),
        Ended::Kept { pools: 2, .. }
    ));
    b.dev.acked_features(0);
    assert_eq!(b.get(p, 7, 0).1, data(7));
}
