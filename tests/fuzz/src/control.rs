// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz target `control`: control socket request lines against a real store.
//!
//! The input is what a peer writes to the control socket. It is cut into lines as the
//! socket's session does (bounded, ending at the first byte that is not UTF-8) and each line
//! goes through `Controls::answer`, the session's own per-line function, against an engine
//! with two clients holding ephemeral and persistent pages. Oracles: no panic; every answer
//! serializes and parses back; `ok` exactly when the request parses, names an existing client
//! and carries a value in range (the store's own range checks); a request that succeeded is in
//! effect afterwards (weight, quota, limit, frozen, shrink target, flushed pages); and the
//! statistics still render as Prometheus text at the end.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

use shared_proto::PAGE_SIZE;
use vhost_tmem::control::{prometheus, Controls, Request, Response};
use vhost_tmem::store::{
    check_memory_limit, check_weight, parse_uuid, ClientConfig, Engine, EngineConfig, PageKey,
    PoolSpec, Tmem,
};

/// What the session reads of one connection at most.
const MAX_BYTES: u64 = 64 * 1024;
const CLIENTS: [&str; 2] = ["vm1", "vm2"];

/// An engine with two clients, each with a few ephemeral and persistent pages.
fn engine() -> Arc<Engine> {
    let engine = Arc::new(Engine::new(EngineConfig {
        memory_limit: 8 << 20,
        ..EngineConfig::default()
    }));
    let mut w = engine.new_worker().expect("worker state");
    for name in CLIENTS {
        let c = engine.add_client(ClientConfig::named(name));
        for persistent in [false, true] {
            let pool = engine
                .create_pool(
                    &c,
                    PoolSpec {
                        persistent,
                        shared: None,
                    },
                )
                .expect("a pool");
            for index in 0..3u64 {
                let key = PageKey {
                    pool,
                    oid: [1, 2, 3],
                    index,
                };
                let page = vec![index as u8 + 1; PAGE_SIZE];
                engine
                    .put(&mut w, &c, &key, &page)
                    .expect("room for a page");
            }
        }
    }
    engine
}

/// Runs one input; panics on a finding.
pub fn run(data: &[u8]) {
    let controls = Controls {
        engine: engine(),
        admin: None,
    };
    let e = &controls.engine;
    let mut reader = BufReader::new(data.take(MAX_BYTES));
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let resp = controls.answer(&line);
        let text = serde_json::to_string(&resp).expect("a response serializes");
        let back: Response = serde_json::from_str(&text).expect("a response parses back");
        assert_eq!(back.ok, resp.ok, "{text}");
        assert_eq!(
            resp.ok,
            resp.error.is_none(),
            "ok and error disagree: {text}"
        );
        let Ok(req) = serde_json::from_str::<Request>(&line) else {
            assert!(
                !resp.ok
                    && resp
                        .error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("bad request")),
                "a line that is no request was accepted: {line:?} -> {text}"
            );
            continue;
        };
        let client = |name: &str| e.client(name);
        let stats = e.stats();
        let cstats = |name: &str| stats.clients.iter().find(|c| c.name == name).cloned();
        let expect_ok = match &req {
            Request::Stats | Request::Limit { .. } => true,
            // Run-time administration needs the daemon's client list: none here.
            Request::AddClient { .. }
            | Request::Disconnect { .. }
            | Request::RemoveClient { .. }
            | Request::ListClients
            | Request::Reload
            | Request::Handover => false,
            Request::Freeze { client: c }
            | Request::Thaw { client: c }
            | Request::Flush { client: c }
            | Request::Quota { client: c, .. }
            | Request::Shrink { client: c, .. }
            | Request::Weight { client: c, .. }
            | Request::Authorize { client: c, .. }
            | Request::Revoke { client: c, .. } => client(c).is_some(),
        } && match &req {
            Request::Weight { weight, .. } => check_weight(*weight).is_ok(),
            Request::Limit { bytes } => check_memory_limit(*bytes).is_ok(),
            Request::Authorize { uuid, .. } | Request::Revoke { uuid, .. } => {
                parse_uuid(uuid).is_some()
            }
            _ => true,
        };
        assert_eq!(resp.ok, expect_ok, "{req:?} -> {text}");
        if !resp.ok {
            continue;
        }
        match req {
            Request::Stats => {
                let s = resp.stats.expect("a stats answer carries statistics");
                assert_eq!(s.clients.len(), CLIENTS.len(), "{text}");
            }
            Request::Freeze { client: c } => assert!(cstats(&c).expect("client").frozen),
            Request::Thaw { client: c } => assert!(!cstats(&c).expect("client").frozen),
            Request::Weight { client: c, weight } => {
                assert_eq!(cstats(&c).expect("client").weight, weight)
            }
            Request::Quota { client: c, bytes } => {
                assert_eq!(cstats(&c).expect("client").quota_bytes, bytes)
            }
            Request::Limit { bytes } => assert_eq!(stats.memory_limit_bytes, bytes),
            Request::Shrink { client: c, pages } => assert_eq!(
                client(&c).expect("client").shrink_target(),
                pages.unwrap_or(u64::MAX)
            ),
            Request::Flush { client: c } => {
                assert!(resp.value.is_some_and(|n| n <= 3), "{text}");
                let c = client(&c).expect("client");
                assert_eq!(
                    e.flush_client_ephemeral(&c),
                    0,
                    "ephemeral pages left after a flush"
                );
            }
            Request::Authorize { .. } | Request::Revoke { .. } => {}
            Request::AddClient { .. }
            | Request::Disconnect { .. }
            | Request::RemoveClient { .. }
            | Request::ListClients
            | Request::Reload
            | Request::Handover => unreachable!("refused above: no client administration here"),
        }
    }
    let text = prometheus(&e.stats());
    assert!(text.contains("vhost_tmem_"), "{text}");
}
