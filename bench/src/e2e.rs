// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End to end: the daemon as a separate process, driven over vhost-user by the userspace
//! guest (`tmem-testguest`), at several queue depths and request-queue counts.

use std::cell::Cell;
use std::time::{Duration, Instant};

use shared_proto::Status;
use tmem_testguest::daemon::Daemon;
use tmem_testguest::{Guest, GuestOptions, Req};
use vhost_tmem::store::codec::Compressor;

use crate::corpus::Corpus;
use crate::store::{histogram, Histogram, OpStats};

/// Errors of the end-to-end runs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the daemon: {0}")]
    Daemon(#[from] tmem_testguest::daemon::Error),
    #[error("guest: {0}")]
    Guest(#[from] tmem_testguest::Error),
    #[error("{op} at queue depth {depth}: page {index} got status {status:?}")]
    Status {
        op: &'static str,
        depth: usize,
        index: usize,
        status: Status,
    },
    #[error("get at queue depth {depth}: page {index} came back different")]
    Corrupt { depth: usize, index: usize },
    #[error("the in-process round paired with it: {0}")]
    InProcess(#[from] crate::store::Error),
}

/// One (queues, depth, op) figure.
#[derive(Debug)]
pub struct Row {
    pub queues: usize,
    pub depth: usize,
    pub op: &'static str,
    pub stats: OpStats,
    /// Interleaved rounds (at the paired queue count and depths only): per pair, this round
    /// end to end and the in-process round right after it.
    pub pairs: Vec<Pair>,
}

/// One op's figures of one round: pages/s and the latency p50.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundFigures {
    pub ops_per_s: f64,
    pub p50_ns: f64,
}

/// An end-to-end round and the in-process round run right after it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pair {
    pub e2e: RoundFigures,
    pub in_process: RoundFigures,
    /// A cache line's round trip between the two CPUs just before the end-to-end round.
    pub round_trip_ns: Option<u64>,
}

/// Which figures alternate with in-process rounds, and how: after each of their `rounds` timed
/// rounds, `in_process` runs one in-process round and returns its put and get figures.
pub struct Pairing<'a> {
    pub queues: usize,
    pub depths: &'a [usize],
    pub rounds: usize,
    pub in_process: &'a mut dyn FnMut() -> Result<[RoundFigures; 2], crate::store::Error>,
}

/// Round trips of the line probed before each paired round: a few milliseconds.
const PAIR_ROUND_TRIPS: u32 = 20_000;

/// Most request queues the daemon offers in these runs.
pub const MAX_QUEUES: usize = 2;

/// Puts then gets every page of `corpus`, `rounds` times, for each queue count and depth; the
/// figure `pair` names alternates with in-process rounds instead.
pub fn run(
    corpus: &Corpus,
    c: Compressor,
    queue_counts: &[usize],
    depths: &[usize],
    rounds: usize,
    mut pair: Option<Pairing<'_>>,
) -> Result<Vec<Row>, Error> {
    let comp = c.to_string();
    let queues = MAX_QUEUES.to_string();
    let d = Daemon::start(&[
        "--client",
        "name=bench,socket={dir}/bench.sock",
        "--queues",
        &queues,
        "--memory-limit",
        "16G",
        "--compressor",
        &comp,
    ])?;
    let mut rows = Vec::new();
    for &q in queue_counts {
        let mut g = Guest::connect(
            d.path("bench.sock"),
            GuestOptions {
                request_queues: q,
                queue_size: 256,
                event_idx: true,
                timeout: Duration::from_secs(60),
                page_frames: corpus.len(),
                ..GuestOptions::default()
            },
        )?;
        // The pages live in guest RAM, and puts point the device at them: a kernel driver
        // hands over the page it swaps out without copying it (nor writing it just before).
        for i in 0..corpus.len() {
            g.write_frame(i, corpus.page(i))?;
        }
        let pool = g.create_pool(true, None)?;
        let qs: Vec<usize> = (0..q).collect();
        let oid = [1, 0, 0];
        for &depth in depths {
            let mut put = OpStats::new();
            let mut get = OpStats::new();
            let (mut put_pairs, mut get_pairs) = (Vec::new(), Vec::new());
            let mut paired = pair
                .as_mut()
                .filter(|p| p.queues == q && p.depths.contains(&depth));
            let rounds = paired.as_ref().map_or(rounds, |p| p.rounds);
            // Round 0 checks every page and is not recorded; the timed rounds leave the pages
            // unread, as a guest's driver does (the device writes into the guest's page).
            for round in 0..=rounds {
                let check = round == 0;
                // Where the host runs the two vCPUs can change within a run, and it moves the
                // end-to-end figures (see probe.rs): each pair carries it.
                let round_trip_ns = if paired.is_some() && !check {
                    crate::probe::line_round_trip_ns(PAIR_ROUND_TRIPS)
                } else {
                    None
                };
                let n = corpus.len() as u64;
                let (h, secs, bad) = phase(&mut g, &qs, depth, corpus, false, |i| Req::PutFrame {
                    pool,
                    oid,
                    index: i as u64,
                    frame: i,
                })?;
                if !check {
                    put.add(&h, n, secs);
                }
                let put_round = figures(&h, n, secs);
                failure("put", depth, bad)?;
                let (h, secs, bad) = phase(&mut g, &qs, depth, corpus, check, |i| Req::Get {
                    pool,
                    oid,
                    index: i as u64,
                    exclusive: false,
                })?;
                if !check {
                    get.add(&h, n, secs);
                }
                let get_round = figures(&h, n, secs);
                failure("get", depth, bad)?;
                g.flush_object(pool, oid)?;
                if let Some(p) = paired.as_mut() {
                    // The warm-up round has its in-process partner too (also unrecorded), so
                    // every recorded pair has the same neighbours.
                    let [ip_put, ip_get] = (p.in_process)()?;
                    if !check {
                        put_pairs.push(Pair {
                            e2e: put_round,
                            in_process: ip_put,
                            round_trip_ns,
                        });
                        get_pairs.push(Pair {
                            e2e: get_round,
                            in_process: ip_get,
                            round_trip_ns,
                        });
                    }
                }
            }
            rows.push(Row {
                queues: q,
                depth,
                op: "put",
                stats: put,
                pairs: put_pairs,
            });
            rows.push(Row {
                queues: q,
                depth,
                op: "get",
                stats: get,
                pairs: get_pairs,
            });
        }
    }
    Ok(rows)
}

/// A phase's pages/s and p50.
fn figures(h: &Histogram, n: u64, secs: f64) -> RoundFigures {
    RoundFigures {
        ops_per_s: n as f64 / secs.max(1e-12),
        p50_ns: h.value_at_quantile(0.5) as f64,
    }
}

fn since(c: &Cell<Option<Instant>>) -> u64 {
    c.get().map_or(0, |t| t.elapsed().as_nanos() as u64)
}

/// The first failed request of a phase: its page, and its status (`None`: a get that returned
/// other bytes than were put).
type Failure = Option<(usize, Option<Status>)>;

/// Sends one request per page of `corpus` (`req(i)` for page i) through the pipeline, timing
/// each from submission to completion; with `check`, returned pages are compared with the
/// corpus. Returns the latencies, the wall time and the first failure.
fn phase<'c>(
    g: &mut Guest,
    qs: &[usize],
    depth: usize,
    corpus: &Corpus,
    check: bool,
    req: impl Fn(usize) -> Req<'c>,
) -> Result<(Histogram, f64, Failure), Error> {
    let sent: Vec<Cell<Option<Instant>>> = vec![Cell::new(None); corpus.len()];
    let mut h = histogram();
    let mut bad = None;
    let t = Instant::now();
    g.pipeline_queues(
        qs,
        depth,
        (0..corpus.len()).map(|i| {
            sent[i].set(Some(Instant::now()));
            (i, req(i))
        }),
        |done| {
            h.saturating_record(since(&sent[done.tag]));
            if bad.is_none() {
                if done.status != Status::Ok {
                    bad = Some((done.tag, Some(done.status)));
                } else if check && done.page() != corpus.page(done.tag) {
                    bad = Some((done.tag, None));
                }
            }
        },
    )?;
    Ok((h, t.elapsed().as_secs_f64(), bad))
}

/// Turns a phase's failure into the error that names it.
fn failure(op: &'static str, depth: usize, bad: Failure) -> Result<(), Error> {
    match bad {
        None => Ok(()),
        Some((index, Some(status))) => Err(Error::Status {
            op,
            depth,
            index,
            status,
        }),
        Some((index, None)) => Err(Error::Corrupt { depth, index }),
    }
}
