// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `tmem-bench`: the store, its physical limits and the vhost-user path, measured side by side
//! in one run. See the README's "Benchmarks" section.

mod alloc;
mod corpus;
mod e2e;
mod footprint;
mod instr;
mod probe;
mod report;
mod stats;
mod store;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vhost_tmem::store::codec::Compressor;

use crate::report::{
    CompressionRow, CorpusRow, E2eRow, EngineRow, FootprintRow, LimitRow, Machine, PairedRatio,
    Report,
};
use crate::store::{COMPRESS, DECOMPRESS, GET, MEMCPY, PUT};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// Benchmarks vhost-tmem: in-process store, limits (memcpy, bare codec), vhost-user end to end.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A few seconds, tiny corpora: a smoke run that keeps the suite working (CI).
    #[arg(long)]
    quick: bool,
    /// Directory for report.json, report.md and report.svg.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    /// Replace the generated results section of this README.
    #[arg(long, value_name = "FILE")]
    readme: Option<PathBuf>,
    /// Pages per corpus (the mixed corpus has twice as many) [default: 4096, quick: 128,
    /// instructions: 256].
    #[arg(long, value_name = "N")]
    pages: Option<usize>,
    /// Count instructions per page under callgrind instead of timing (lz4, every corpus):
    /// writes DIR/instructions.json and the `instructions` key of DIR/report.json if present.
    #[arg(long, conflicts_with_all = ["quick", "readme"])]
    instructions: bool,
    /// Compressor of the instruction counts.
    #[arg(long, value_name = "NAME", default_value = "lz4")]
    compressor: Compressor,
    /// Run one corpus's counted workload (what --instructions runs under callgrind).
    #[arg(long, value_name = "CORPUS", hide = true)]
    instructions_workload: Option<String>,
}

/// Errors of the benchmark run.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Corpus(#[from] corpus::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("end to end ({compressor}): {source}")]
    E2e {
        compressor: String,
        #[source]
        source: e2e::Error,
    },
    #[error(transparent)]
    Report(#[from] report::Error),
    #[error("instruction counts: {0}")]
    Instr(#[from] instr::Error),
    #[error("--pages must be at least 16")]
    TooFewPages,
}

const COMPRESSORS: [Compressor; 4] = [
    Compressor::None,
    Compressor::Lz4,
    Compressor::Zstd(-1),
    Compressor::Zstd(1),
];

/// The probe's figure of each pair, or none if any pair lacks it (one CPU).
fn round_trips_of(pairs: &[e2e::Pair]) -> Vec<u64> {
    pairs
        .iter()
        .map(|p| p.round_trip_ns)
        .collect::<Option<Vec<u64>>>()
        .unwrap_or_default()
}

/// The machine's description; `round_trips`: see [`Machine::cross_cpu_round_trip_ns`].
fn machine(cores: usize, round_trips: Vec<u64>) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown".to_string(), |(_, m)| m.trim().to_string());
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    // Two clock reads per timed operation: what that costs here.
    let mut h = store::histogram();
    for _ in 0..100_000 {
        let t = Instant::now();
        h.saturating_record(t.elapsed().as_nanos() as u64);
    }
    Machine {
        cpu_model: model,
        cores,
        memory_gib: (mem_kib / 1048576.0 * 10.0).round() / 10.0,
        kernel,
        timer_overhead_ns: h.value_at_quantile(0.5),
        cross_cpu_round_trip_ns: round_trips,
    }
}

fn row_stats(s: &store::OpStats) -> (u64, u64, f64) {
    (
        s.hist.value_at_quantile(0.5),
        s.hist.value_at_quantile(0.99),
        s.ops_per_s().round(),
    )
}

fn run(args: &Args) -> Result<Report, Error> {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = args.pages.unwrap_or(if args.quick { 128 } else { 4096 });
    if n < 16 {
        return Err(Error::TooFewPages);
    }
    // Rounds of the multi-thread store runs; store/limit pairs of the one-thread figures.
    let rounds = if args.quick { 1 } else { 3 };
    let pairs = if args.quick { 2 } else { 9 };
    // Pages stored for the memory figures: a multiple of every corpus's length (n, the mixed
    // one 2 n), so a corpus repeats whole.
    let fp_pages = (if args.quick { 4096usize } else { 131_072 }).div_ceil(2 * n) * 2 * n;
    let mut threads = vec![1];
    if cores > 1 {
        threads.push(cores);
    }
    eprintln!("== corpora: {n} pages each (mixed: {})", 2 * n);
    let corpora = corpus::build(n)?;
    let mixed = corpora.iter().find(|c| c.name == "mixed").expect("built");

    let mut engine_rows = Vec::new();
    let mut limit_rows = Vec::new();
    let mut paired_rows = Vec::new();
    let mut ratios = Vec::new();
    let mut footprints = Vec::new();
    let engine_row = |c: Compressor, corpus: &str, op: &str, t: usize, s: &store::OpStats| {
        let (p50, p99, ops) = row_stats(s);
        EngineRow {
            compressor: c.to_string(),
            corpus: corpus.to_string(),
            op: op.to_string(),
            threads: t,
            p50_ns: p50,
            p99_ns: p99,
            ops_per_s: ops,
        }
    };
    let limit_row = |what: &str, c: &str, corpus: &str, s: &store::OpStats| {
        let (p50, p99, ops) = row_stats(s);
        LimitRow {
            what: what.into(),
            compressor: c.into(),
            corpus: corpus.to_string(),
            p50_ns: p50,
            p99_ns: p99,
            ops_per_s: ops,
        }
    };
    for c in COMPRESSORS {
        eprintln!("== in-process store and limits, interleaved ({pairs} pairs): {c}");
        for corpus in &corpora {
            // One thread: store and limit rounds alternate on the same pages.
            let p = store::paired(corpus, c, pairs)?;
            for (op, i) in [("put", PUT), ("get", GET), ("flush", 2)] {
                engine_rows.push(engine_row(c, corpus.name, op, 1, &p.store_total(i)));
            }
            for &t in threads.iter().filter(|&&t| t > 1) {
                let r = store::run(corpus, c, t, rounds)?;
                for (op, s) in [("put", &r.put), ("get", &r.get), ("flush", &r.flush)] {
                    engine_rows.push(engine_row(c, corpus.name, op, t, s));
                }
            }
            if c == Compressor::None {
                limit_rows.push(limit_row(
                    "memcpy",
                    "none",
                    corpus.name,
                    &p.limit_total(MEMCPY),
                ));
            }
            for (what, i) in [("compress", COMPRESS), ("decompress", DECOMPRESS)] {
                limit_rows.push(limit_row(
                    what,
                    &c.to_string(),
                    corpus.name,
                    &p.limit_total(i),
                ));
            }
            // Per pair: the store round's figure over the limit round's right after it.
            let p50 = |v: &[[store::OpStats; 3]], i: usize| -> Vec<f64> {
                v.iter()
                    .map(|r| r[i].hist.value_at_quantile(0.5) as f64)
                    .collect()
            };
            let ops = |v: &[[store::OpStats; 3]], i: usize| -> Vec<f64> {
                v.iter().map(|r| r[i].ops_per_s()).collect()
            };
            let (cs, cn) = (c.to_string(), corpus.name);
            for (what, a, b) in [
                (
                    "put p50 / compress p50",
                    p50(&p.store, PUT),
                    p50(&p.limits, COMPRESS),
                ),
                (
                    "get p50 / decompress p50",
                    p50(&p.store, GET),
                    p50(&p.limits, DECOMPRESS),
                ),
                (
                    "put p50 / memcpy p50",
                    p50(&p.store, PUT),
                    p50(&p.limits, MEMCPY),
                ),
                (
                    "get p50 / memcpy p50",
                    p50(&p.store, GET),
                    p50(&p.limits, MEMCPY),
                ),
                (
                    "put pages/s / compress pages/s",
                    ops(&p.store, PUT),
                    ops(&p.limits, COMPRESS),
                ),
                (
                    "get pages/s / decompress pages/s",
                    ops(&p.store, GET),
                    ops(&p.limits, DECOMPRESS),
                ),
            ] {
                paired_rows.push(PairedRatio::new(&cs, cn, what, &a, &b));
            }
            if corpus.name == "mixed" {
                // At the footprint's scale (the corpus repeated): the arena's partly used chunks
                // are a constant per size class (`SLACK` bounds them), not a cost per page, and
                // over the corpus alone they would be most of the slack.
                let fp = footprint::measure(mixed, c, true, footprint::Keys::Dense, fp_pages)?;
                let bare = p.bytes as f64 / corpus.len() as f64;
                ratios.push(CompressionRow {
                    compressor: c.to_string(),
                    corpus: "mixed".into(),
                    store: footprint::ratio(&fp),
                    bare: 4096.0 / bare,
                    stored_bytes_per_page: fp.payload_bytes_per_page,
                    allocator_slack_bytes_per_page: fp.slack_bytes_per_page,
                    bare_bytes_per_page: bare,
                });
            }
        }
    }

    // Memory per page at a size where fixed costs vanish: lz4, both pool kinds.
    eprintln!("== memory per stored page: {fp_pages} pages");
    for keys in footprint::Keys::ALL {
        for persistent in [true, false] {
            let fp = footprint::measure(mixed, Compressor::Lz4, persistent, keys, fp_pages)?;
            footprints.push(FootprintRow {
                compressor: "lz4".into(),
                pool: if persistent {
                    "persistent"
                } else {
                    "ephemeral"
                }
                .into(),
                keys: keys.name().into(),
                pages: fp.pages,
                payload_bytes_per_page: fp.payload_bytes_per_page,
                metadata_bytes_per_page: fp.metadata_bytes_per_page,
                charged_metadata_bytes_per_page: fp.charged_metadata_bytes_per_page,
                allocator_slack_bytes_per_page: fp.slack_bytes_per_page,
                rss_bytes_per_page: fp.rss_bytes_per_page,
                charged_bytes: fp.charged_bytes,
                limit_bytes: 0,
                rss_bytes: fp.rss_bytes,
                rss_after_free_bytes: fp.rss_after_free_bytes,
            });
        }
    }
    // Resident memory against the limit under churn (docs/operations.md states the bound).
    let (limit, churn_rounds) = if args.quick {
        (16 << 20, 3)
    } else {
        (64 << 20, 6)
    };
    eprintln!("== churn at a {} MiB limit", limit >> 20);
    let payload_corpora: Vec<&corpus::Corpus> = ["text", "random", "binary", "process", "mixed"]
        .iter()
        .filter_map(|n| corpora.iter().find(|c| c.name == *n))
        .collect();
    let ch = footprint::churn(&payload_corpora, limit, churn_rounds)?;
    footprints.push(FootprintRow {
        compressor: "lz4".into(),
        pool: "persistent".into(),
        keys: "churn".into(),
        pages: ch.pages,
        payload_bytes_per_page: 0.0,
        metadata_bytes_per_page: 0.0,
        charged_metadata_bytes_per_page: 0.0,
        allocator_slack_bytes_per_page: 0.0,
        rss_bytes_per_page: ch.rss_bytes as f64 / ch.pages.max(1) as f64,
        charged_bytes: ch.charged_bytes,
        limit_bytes: limit,
        rss_bytes: ch.rss_bytes,
        rss_after_free_bytes: ch.rss_after_free_bytes,
    });
    let metadata = footprints
        .iter()
        .filter(|f| f.keys == "dense")
        .map(|f| f.metadata_bytes_per_page)
        .fold(0.0, f64::max);
    let rss = footprints[0].rss_bytes_per_page;

    let mut e2e_rows = Vec::new();
    // What moving a cache line between CPUs costs around the end-to-end rows (see probe.rs).
    let mut round_trips = vec![probe::line_round_trip_ns(probe::ROUND_TRIPS)];
    let depths = [1, 16, 64];
    let queue_counts: Vec<usize> = (1..=e2e::MAX_QUEUES).collect();
    let e2e_rounds = if args.quick { 1 } else { 2 };
    for c in COMPRESSORS {
        eprintln!(
            "== end to end over vhost-user: {c} (QD 1 and 64, one queue: {pairs} pairs with in-process rounds)"
        );
        // The figures the targets judge alternate with in-process rounds on the same pages.
        let mut ip = store::InProcess::new(mixed, c)?;
        let mut in_process = || -> Result<[e2e::RoundFigures; 2], store::Error> {
            let r = ip.round()?;
            Ok([PUT, GET].map(|i| e2e::RoundFigures {
                ops_per_s: r[i].ops_per_s(),
                p50_ns: r[i].hist.value_at_quantile(0.5) as f64,
            }))
        };
        let pairing = e2e::Pairing {
            queues: 1,
            depths: &[1, 64],
            rounds: pairs,
            in_process: &mut in_process,
        };
        let rows = e2e::run(mixed, c, &queue_counts, &depths, e2e_rounds, Some(pairing)).map_err(
            |source| Error::E2e {
                compressor: c.to_string(),
                source,
            },
        )?;
        for r in rows {
            let (p50, p99, ops) = row_stats(&r.stats);
            if r.depth == 1 && !r.pairs.is_empty() {
                // The round trip: e2e p50 minus the in-process p50 right after it, in us.
                let (a, b): (Vec<f64>, Vec<f64>) = r
                    .pairs
                    .iter()
                    .map(|p| (p.e2e.p50_ns / 1000.0, p.in_process.p50_ns / 1000.0))
                    .unzip();
                paired_rows.push(
                    PairedRatio::difference(
                        &c.to_string(),
                        "mixed",
                        &report::qd1_what(r.op),
                        &a,
                        &b,
                    )
                    .with_round_trips(round_trips_of(&r.pairs)),
                );
            }
            let mut ratio = if r.pairs.is_empty() || r.depth == 1 {
                let base = engine_rows.iter().find(|e| {
                    e.compressor == c.to_string()
                        && e.corpus == "mixed"
                        && e.op == r.op
                        && e.threads == r.queues.min(cores)
                });
                base.map(|b| b.ops_per_s)
                    .filter(|b| *b > 0.0)
                    .map_or(0.0, |b| ops / b)
            } else {
                let (a, b): (Vec<f64>, Vec<f64>) = r
                    .pairs
                    .iter()
                    .map(|p| (p.e2e.ops_per_s, p.in_process.ops_per_s))
                    .unzip();
                let p = PairedRatio::new(&c.to_string(), "mixed", &report::e2e_what(r.op), &a, &b)
                    .with_round_trips(round_trips_of(&r.pairs));
                let m = p.median;
                paired_rows.push(p);
                m
            };
            ratio = stats::round3(ratio);
            e2e_rows.push(E2eRow {
                compressor: c.to_string(),
                corpus: "mixed".into(),
                queue_depth: r.depth,
                queues: r.queues,
                op: r.op.into(),
                p50_ns: p50,
                p99_ns: p99,
                ops_per_s: ops,
                ratio_to_engine: ratio,
            });
        }
    }
    round_trips.push(probe::line_round_trip_ns(probe::ROUND_TRIPS));

    let mut r = Report {
        mode: if args.quick { "quick" } else { "full" }.into(),
        paired: paired_rows,
        machine: machine(cores, round_trips.into_iter().flatten().collect()),
        corpora: corpora
            .iter()
            .map(|c| CorpusRow {
                name: c.name.into(),
                pages: c.len(),
                source: c.source.clone(),
            })
            .collect(),
        engine: engine_rows,
        limits: limit_rows,
        e2e: e2e_rows,
        compression_ratio: ratios,
        metadata_bytes_per_page: (metadata * 10.0).round() / 10.0,
        rss_bytes_per_stored_page: rss,
        footprint: footprints,
        instructions: Vec::new(),
        seconds: started.elapsed().as_secs(),
        targets: Vec::new(),
    };
    r.targets = report::targets(&r);
    Ok(r)
}

fn write(path: PathBuf, text: &str) -> Result<(), Error> {
    std::fs::write(&path, text).map_err(|source| {
        Error::Report(report::Error::Write {
            path: path.display().to_string(),
            source,
        })
    })
}

fn main() {
    let args = Args::parse();
    // The daemon next to this binary, unless told otherwise: never a build in the middle of
    // a measurement.
    if std::env::var_os("VHOST_TMEM_BIN").is_none() {
        if let Some(d) = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("vhost-tmem")))
            .filter(|d| d.exists())
        {
            std::env::set_var("VHOST_TMEM_BIN", d);
        }
    }
    if let Some(name) = &args.instructions_workload {
        let result = (|| -> Result<(), Error> {
            let corpora = corpus::build(args.pages.unwrap_or(256))?;
            instr::workload(instr::find(&corpora, name)?, args.compressor)?;
            Ok(())
        })();
        return exit(result);
    }
    if args.instructions {
        return exit(instructions(&args));
    }
    let result = (|| -> Result<(), Error> {
        let r = run(&args)?;
        std::fs::create_dir_all(&args.out).map_err(|source| report::Error::Write {
            path: args.out.display().to_string(),
            source,
        })?;
        let json = serde_json::to_string_pretty(&r).expect("the report serializes");
        write(args.out.join("report.json"), &json)?;
        write(args.out.join("report.md"), &report::markdown(&r))?;
        write(args.out.join("report.svg"), &report::svg(&r))?;
        // Read back what was written: the smoke run fails if a key went missing.
        report::check(&json)?;
        if let Some(readme) = &args.readme {
            report::update_readme(readme, &r)?;
            eprintln!("== updated the results section of {}", readme.display());
        }
        println!("{}", report::terminal(&r));
        println!(
            "report: {0}/report.md, {0}/report.json, {0}/report.svg ({1} s)\n",
            args.out.display(),
            r.seconds
        );
        // Last, so it is what the screen shows when the run ends.
        println!("{}", report::closing(&r));
        Ok(())
    })();
    exit(result)
}

/// Counts instructions per page on every corpus under callgrind, one valgrind run each.
fn instructions(args: &Args) -> Result<(), Error> {
    let pages = args.pages.unwrap_or(256);
    if pages < 16 {
        return Err(Error::TooFewPages);
    }
    let exe = std::env::current_exe().map_err(|source| report::Error::Write {
        path: "the running binary".into(),
        source,
    })?;
    std::fs::create_dir_all(&args.out).map_err(|source| report::Error::Write {
        path: args.out.display().to_string(),
        source,
    })?;
    let mut rows = Vec::new();
    for name in [
        "zero", "same", "text", "binary", "random", "process", "mixed",
    ] {
        eprintln!(
            "== instructions under callgrind: {} on {name}",
            args.compressor
        );
        rows.push(instr::measure(
            &exe,
            &args.out,
            name,
            pages,
            args.compressor,
        )?);
    }
    let json = serde_json::to_string_pretty(&rows).expect("the rows serialize");
    write(args.out.join("instructions.json"), &json)?;
    let path = args.out.join("report.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let mut r = report::check(&text)?;
        r.instructions = rows.clone();
        let json = serde_json::to_string_pretty(&r).expect("the report serializes");
        write(path.clone(), &json)?;
        write(args.out.join("report.md"), &report::markdown(&r))?;
        eprintln!("== updated `instructions` in {}", path.display());
    } else {
        eprintln!("== no {} yet: `make bench` writes it", path.display());
    }
    println!(
        "instructions per page ({}, {pages} pages per corpus, mixed twice as many):",
        args.compressor
    );
    println!(
        "{:<8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>7}",
        "corpus", "put", "compress", "put/c", "get", "decomp", "get/d", "flush"
    );
    for e in &rows {
        println!(
            "{:<8} {:>9.0} {:>9.0} {:>8.3} {:>9.0} {:>9.0} {:>8.3} {:>7.0}",
            e.corpus,
            e.put_per_page,
            e.compress_per_page,
            e.put_to_compress,
            e.get_per_page,
            e.decompress_per_page,
            e.get_to_decompress,
            e.flush_per_page
        );
    }
    Ok(())
}

fn exit(result: Result<(), Error>) {
    if let Err(e) = result {
        eprintln!("tmem-bench: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}
