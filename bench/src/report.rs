// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The report: its JSON document as typed rows, targets evaluated from the figures, a table for
//! the terminal, Markdown, an SVG plot and the README section. Everything reads the one
//! [`Report`], so every output shows the same numbers.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats;

/// Errors while writing the report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no `{begin}` ... `{end}` section to replace")]
    NoMarkers {
        path: String,
        begin: &'static str,
        end: &'static str,
    },
    #[error("report.json lacks a key or has a value of the wrong type: {0}")]
    Layout(#[source] serde_json::Error),
    #[error("report.json lacks {0}")]
    Incomplete(String),
}

// report.json. Every field is required, so reading the file back into a [`Report`] checks that
// no key went missing. Fields are in alphabetical order: that is the key order report.json has
// always had (it was a sorted JSON map), and the README and other readers rely on its layout.

/// The whole benchmark run: report.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub compression_ratio: Vec<CompressionRow>,
    pub corpora: Vec<CorpusRow>,
    pub e2e: Vec<E2eRow>,
    pub engine: Vec<EngineRow>,
    pub footprint: Vec<FootprintRow>,
    /// Instructions per page under callgrind (`make bench-instructions`; empty until it runs).
    pub instructions: Vec<InstructionRow>,
    pub limits: Vec<LimitRow>,
    pub machine: Machine,
    /// Allocator-counted metadata per stored page with dense keys, the worse pool kind.
    pub metadata_bytes_per_page: f64,
    /// `quick` or `full`.
    pub mode: String,
    /// Every ratio measured by interleaved rounds, with its per-pair values.
    pub paired: Vec<PairedRatio>,
    pub rss_bytes_per_stored_page: f64,
    pub seconds: u64,
    pub targets: Vec<Target>,
}

/// The machine the figures come from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    /// A cache line's round trip between two CPUs, before and after the end-to-end rows
    /// (empty with one CPU): what every end-to-end request pays several times over.
    pub cross_cpu_round_trip_ns: Vec<u64>,
    pub kernel: String,
    pub memory_gib: f64,
    /// Two clock reads, as every timed operation has.
    pub timer_overhead_ns: u64,
}

/// Store and bare-codec sizes of one compressor on the mixed corpus.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompressionRow {
    pub allocator_slack_bytes_per_page: f64,
    pub bare: f64,
    pub bare_bytes_per_page: f64,
    pub compressor: String,
    pub corpus: String,
    pub store: f64,
    pub stored_bytes_per_page: f64,
}

/// One corpus.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CorpusRow {
    pub name: String,
    pub pages: usize,
    pub source: String,
}

/// One operation over vhost-user at one queue count and depth.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct E2eRow {
    pub compressor: String,
    pub corpus: String,
    pub op: String,
    pub ops_per_s: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub queue_depth: usize,
    pub queues: usize,
    pub ratio_to_engine: f64,
}

/// One operation of the in-process store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineRow {
    pub compressor: String,
    pub corpus: String,
    pub op: String,
    pub ops_per_s: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub threads: usize,
}

/// Memory per stored page for one pool kind and key pattern (or the churn workload), and
/// resident memory beside what the store charged against its limit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FootprintRow {
    pub allocator_slack_bytes_per_page: f64,
    /// Most bytes the store charged against its limit.
    pub charged_bytes: u64,
    pub charged_metadata_bytes_per_page: f64,
    pub compressor: String,
    pub keys: String,
    /// The store's memory limit (0: none, the fill stops at `pages`).
    pub limit_bytes: u64,
    pub metadata_bytes_per_page: f64,
    pub pages: u64,
    pub payload_bytes_per_page: f64,
    pub pool: String,
    /// Growth of the resident set left after every page was freed.
    pub rss_after_free_bytes: u64,
    /// Peak growth of the resident set.
    pub rss_bytes: u64,
    pub rss_bytes_per_page: f64,
}

/// Instructions per page of the store and the bare codec on one corpus, counted by callgrind.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstructionRow {
    pub compress_per_page: f64,
    pub compressor: String,
    pub corpus: String,
    pub decompress_per_page: f64,
    pub flush_per_page: f64,
    pub get_per_page: f64,
    /// get over bare decompress.
    pub get_to_decompress: f64,
    pub pages: u64,
    pub put_per_page: f64,
    /// put over bare compress (a page that does not compress is copied, as the store keeps it).
    pub put_to_compress: f64,
}

impl InstructionRow {
    /// A row from instructions per page of put, get, flush, compress and decompress.
    pub fn new(compressor: &str, corpus: &str, pages: u64, v: [f64; 5]) -> Self {
        let [put, get, flush, comp, decomp] = v.map(|x| (x * 10.0).round() / 10.0);
        let ratio = |a: f64, b: f64| if b > 0.0 { stats::round3(a / b) } else { 0.0 };
        InstructionRow {
            compress_per_page: comp,
            compressor: compressor.into(),
            corpus: corpus.into(),
            decompress_per_page: decomp,
            flush_per_page: flush,
            get_per_page: get,
            get_to_decompress: ratio(get, decomp),
            pages,
            put_per_page: put,
            put_to_compress: ratio(put, comp),
        }
    }
}

/// A physical limit: memcpy or the bare codec.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LimitRow {
    pub compressor: String,
    pub corpus: String,
    pub ops_per_s: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub what: String,
}

/// A ratio of the store to a limit (or end to end to in-process) from interleaved rounds:
/// each pair is a round of one and then a round of the other on the same pages.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairedRatio {
    pub compressor: String,
    pub corpus: String,
    /// The largest per-pair ratio.
    pub max: f64,
    /// The median of the per-pair ratios: the figure.
    pub median: f64,
    /// The smallest per-pair ratio.
    pub min: f64,
    /// One ratio per pair, in the order measured.
    pub per_pair: Vec<f64>,
    /// End to end only: per pair, a cache line's round trip between the two CPUs measured
    /// just before its end-to-end round (see probe.rs), so that a pair's value can be read
    /// with where the host ran the vCPUs at the time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub round_trip_ns: Vec<u64>,
    /// What over what, e.g. `put p50 / compress p50`.
    pub what: String,
}

impl PairedRatio {
    /// The ratio `a[i] / b[i]` of each pair, summarized.
    pub fn new(compressor: &str, corpus: &str, what: &str, a: &[f64], b: &[f64]) -> Self {
        Self::summarize(compressor, corpus, what, stats::per_pair(a, b))
    }

    /// The difference `a[i] - b[i]` of each pair, summarized.
    pub fn difference(compressor: &str, corpus: &str, what: &str, a: &[f64], b: &[f64]) -> Self {
        let v = a.iter().zip(b).map(|(a, b)| a - b).collect();
        Self::summarize(compressor, corpus, what, v)
    }

    /// Per-pair values as a figure: their median and spread.
    fn summarize(compressor: &str, corpus: &str, what: &str, v: Vec<f64>) -> Self {
        let (min, max) = stats::spread(&v);
        PairedRatio {
            compressor: compressor.into(),
            corpus: corpus.into(),
            max: stats::round3(max),
            median: stats::round3(stats::median(&v)),
            min: stats::round3(min),
            per_pair: v.into_iter().map(stats::round3).collect(),
            round_trip_ns: Vec::new(),
            what: what.into(),
        }
    }

    /// With the round trip measured before each pair's end-to-end round.
    pub fn with_round_trips(mut self, round_trip_ns: Vec<u64>) -> Self {
        self.round_trip_ns = round_trip_ns;
        self
    }
}

/// One of the issue's targets, evaluated.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub bound: f64,
    /// `at most` or `at least`.
    pub kind: String,
    /// The spread: the largest per-pair value (the measured value when there are no pairs).
    pub max: f64,
    /// The median of the per-pair values (timed figures), or the value (counted figures).
    pub measured: f64,
    /// Judged on `measured`.
    pub met: bool,
    /// The spread: the smallest per-pair value (the measured value when there are no pairs).
    pub min: f64,
    /// The per-pair values; empty for a counted figure (memory, sizes).
    pub per_pair: Vec<f64>,
    /// End to end only: see [`PairedRatio::round_trip_ns`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub round_trip_ns: Vec<u64>,
    pub target: String,
}

/// Where the README's generated section starts and ends.
pub const BEGIN: &str = "<!-- bench-results:begin (written by make bench) -->";
/// See [`BEGIN`].
pub const END: &str = "<!-- bench-results:end -->";

impl Report {
    fn engine(&self, comp: &str, corpus: &str, op: &str, threads: usize) -> Option<&EngineRow> {
        self.engine.iter().find(|e| {
            e.compressor == comp && e.corpus == corpus && e.op == op && e.threads == threads
        })
    }

    fn limit(&self, what: &str, comp: &str, corpus: &str) -> Option<&LimitRow> {
        self.limits
            .iter()
            .find(|e| e.what == what && e.compressor == comp && e.corpus == corpus)
    }

    /// The vhost-user row at queue depth 64 on one queue.
    fn e2e_qd64(&self, comp: &str, op: &str) -> Option<&E2eRow> {
        self.e2e
            .iter()
            .find(|e| e.compressor == comp && e.queue_depth == 64 && e.queues == 1 && e.op == op)
    }

    fn paired(&self, comp: &str, corpus: &str, what: &str) -> Option<&PairedRatio> {
        self.paired
            .iter()
            .find(|p| p.compressor == comp && p.corpus == corpus && p.what == what)
    }

    fn compression(&self, comp: &str) -> Option<&CompressionRow> {
        self.compression_ratio.iter().find(|c| c.compressor == comp)
    }

    /// Compressors in the order they were measured.
    fn compressors(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for e in &self.engine {
            if !v.contains(&e.compressor) {
                v.push(e.compressor.clone());
            }
        }
        v
    }
}

/// The store's put and get against the bare codec on the same pages, at most.
const STORE_TO_CODEC: f64 = 1.1;

/// Evaluates the issue's targets (lz4, one thread): timed ones on the median of the per-pair
/// ratios of interleaved rounds in the same run.
pub fn targets(r: &Report) -> Vec<Target> {
    let mut out = Vec::new();
    let mut add = |name: String, p: Option<PairedRatio>, bound: f64, at_most: bool| {
        if let Some(p) = p {
            let m = p.median;
            let met = if at_most { m <= bound } else { m >= bound };
            out.push(Target {
                target: name,
                measured: stats::round3(m),
                min: p.min,
                max: p.max,
                per_pair: p.per_pair,
                round_trip_ns: p.round_trip_ns,
                bound,
                kind: if at_most { "at most" } else { "at least" }.to_string(),
                met,
            });
        }
    };
    let paired = |corpus: &str, what: &str| r.paired("lz4", corpus, what).cloned();
    // A counted figure: no pairs, no spread.
    let counted = |v: f64| {
        let v = stats::round3(v);
        Some(PairedRatio {
            compressor: "lz4".into(),
            corpus: String::new(),
            max: v,
            median: v,
            min: v,
            per_pair: Vec::new(),
            round_trip_ns: Vec::new(),
            what: String::new(),
        })
    };
    for corpus in ["mixed", "binary", "text"] {
        add(
            format!("put p50 / bare compress p50 ({corpus})"),
            paired(corpus, "put p50 / compress p50"),
            STORE_TO_CODEC,
            true,
        );
        add(
            format!("get p50 / bare decompress p50 ({corpus})"),
            paired(corpus, "get p50 / decompress p50"),
            STORE_TO_CODEC,
            true,
        );
    }
    for corpus in ["zero", "same"] {
        for op in ["put", "get"] {
            add(
                format!("{op} p50 / 4 KiB memcpy p50 ({corpus})"),
                paired(corpus, &format!("{op} p50 / memcpy p50")),
                3.0,
                true,
            );
        }
    }
    for (op, what) in [("put", "compress"), ("get", "decompress")] {
        add(
            format!("{op} pages/s / bare {what} pages/s (mixed, one core)"),
            paired("mixed", &format!("{op} pages/s / {what} pages/s")),
            0.8,
            false,
        );
    }
    for op in ["put", "get"] {
        add(
            format!("end-to-end {op} pages/s at QD 64 / in-process (mixed, one queue)"),
            paired("mixed", &e2e_what(op)),
            0.9,
            false,
        );
    }
    // The QD1 round trip: what a request costs beyond the store's own work, in microseconds:
    // the median of per-pair differences, each e2e round against the in-process round after it.
    for op in ["put", "get"] {
        add(
            format!("end-to-end {op} p50 at QD 1 - in-process {op} p50, us (mixed)"),
            paired("mixed", &qd1_what(op)),
            1.5,
            true,
        );
    }
    // Metadata per page with sparse keys, the worse pool kind of each layout.
    let worst = |keys: &str, f: &dyn Fn(&FootprintRow) -> f64| {
        r.footprint
            .iter()
            .filter(|e| e.keys == keys && e.compressor == "lz4")
            .map(f)
            .reduce(f64::max)
    };
    for (keys, what, bound) in [
        ("object per page", "one page per object", 64.0),
        ("scattered", "one page per run", 48.0),
    ] {
        add(
            format!("metadata bytes per stored page ({what})"),
            worst(keys, &|e| e.metadata_bytes_per_page).and_then(counted),
            bound,
            true,
        );
    }
    // Resident memory against what the store accounts for (payload and charged metadata).
    for keys in ["dense", "object per page", "scattered", "churn"] {
        add(
            format!("resident bytes / (payload + charged metadata) per page ({keys})"),
            worst(keys, &|e| {
                // Churn has no per-page split: its peak resident growth against the most it
                // charged. A row with nothing accounted (nothing stored) says nothing.
                let accounted = e.payload_bytes_per_page + e.charged_metadata_bytes_per_page;
                if accounted > 0.0 {
                    e.rss_bytes_per_page / accounted
                } else if e.charged_bytes > 0 {
                    e.rss_bytes as f64 / e.charged_bytes as f64
                } else {
                    0.0
                }
            })
            .filter(|v| v.is_finite() && *v > 0.0)
            .and_then(counted),
            1.1,
            true,
        );
    }
    // Instructions under callgrind (`make bench-instructions`), when they were counted.
    for row in r.instructions.iter().filter(|i| i.compressor == "lz4") {
        add(
            format!("put instructions / bare compress ({})", row.corpus),
            counted(row.put_to_compress),
            STORE_TO_CODEC,
            true,
        );
        add(
            format!("get instructions / bare decompress ({})", row.corpus),
            counted(row.get_to_decompress),
            STORE_TO_CODEC,
            true,
        );
    }
    add(
        "metadata bytes per stored page (dense keys)".into(),
        counted(r.metadata_bytes_per_page),
        32.0,
        true,
    );
    if let Some(c) = r.compression("lz4") {
        let stored = c.stored_bytes_per_page + c.allocator_slack_bytes_per_page;
        let bare = c.bare_bytes_per_page;
        add(
            "stored bytes (with slack) / bare lz4 output (mixed)".into(),
            (bare > 0.0).then(|| stored / bare).and_then(counted),
            1.1,
            true,
        );
    }
    out
}

/// The paired difference of the end-to-end p50 at QD 1 on one queue and the in-process p50.
pub fn qd1_what(op: &str) -> String {
    format!("e2e {op} p50 at QD 1, one queue - in-process {op} p50, us")
}

/// The paired ratio of end-to-end pages/s at QD 64 on one queue to in-process pages/s.
pub fn e2e_what(op: &str) -> String {
    format!("e2e {op} pages/s at QD 64, one queue / in-process {op} pages/s")
}

/// Reads report.json back and checks it is complete: every key of every row (the typed
/// [`Report`] requires them all), and the rows the targets and the summary need (the quick
/// run's smoke check).
pub fn check(json: &str) -> Result<Report, Error> {
    let r: Report = serde_json::from_str(json).map_err(Error::Layout)?;
    let need = |cond: bool, what: &str| {
        if cond {
            Ok(())
        } else {
            Err(Error::Incomplete(what.to_string()))
        }
    };
    need(!r.engine.is_empty(), "engine")?;
    need(!r.limits.is_empty(), "limits")?;
    need(!r.e2e.is_empty(), "e2e")?;
    need(!r.paired.is_empty(), "paired")?;
    need(
        r.paired.iter().all(|p| !p.per_pair.is_empty()),
        "per-pair ratios in every paired row",
    )?;
    for corpus in ["zero", "same", "mixed"] {
        need(
            r.engine.iter().any(|e| e.corpus == corpus),
            &format!("engine rows for the {corpus} corpus"),
        )?;
    }
    for what in ["memcpy", "compress", "decompress"] {
        need(
            r.limits.iter().any(|e| e.what == what),
            &format!("limits rows for {what}"),
        )?;
    }
    for keys in ["dense", "object per page", "scattered", "churn"] {
        need(
            r.footprint.iter().any(|e| e.keys == keys),
            &format!("footprint rows for {keys} keys"),
        )?;
    }
    Ok(r)
}

fn us(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1000.0)
}

fn kops(v: f64) -> String {
    format!("{:.1}", v / 1000.0)
}

fn machine_line(r: &Report) -> String {
    let m = &r.machine;
    let trips = match m.cross_cpu_round_trip_ns.as_slice() {
        [] => String::new(),
        [a, b] => format!(
            ", a cache line between two CPUs and back {a} ns before the end-to-end rows and \
             {b} ns after"
        ),
        v => format!(", a cache line between two CPUs and back {v:?} ns"),
    };
    // The host may move the vCPUs during the run: the range over the end-to-end pairs of the
    // targets shows whether it did while they were measured.
    let paired: Vec<u64> = r
        .targets
        .iter()
        .flat_map(|t| t.round_trip_ns.iter().copied())
        .collect();
    let trips = match (paired.iter().min(), paired.iter().max()) {
        (Some(lo), Some(hi)) => format!("{trips} ({lo}-{hi} ns before the paired rounds)"),
        _ => trips,
    };
    format!(
        "{} ({} cores, {:.0} GiB), Linux {}, timer overhead {} ns{trips}; {} run",
        m.cpu_model, m.cores, m.memory_gib, m.kernel, m.timer_overhead_ns, r.mode
    )
}

/// A target's spread as shown: `min-max` of the per-pair values, `-` for a counted figure.
fn spread(t: &Target) -> String {
    if t.per_pair.is_empty() {
        "-".into()
    } else {
        format!("{:.2}-{:.2}", t.min, t.max)
    }
}

fn targets_table(r: &Report, s: &mut String) {
    s.push_str(
        "| target (lz4, one core) | measured (median) | spread (min-max of pairs) | bound | met |\n\
         |---|---|---|---|---|\n",
    );
    for t in &r.targets {
        // The bound as report.json writes it (3.0, not 3).
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | {} {:?} | {} |",
            t.target,
            t.measured,
            spread(t),
            t.kind,
            t.bound,
            if t.met { "yes" } else { "**no**" }
        );
    }
    let pairs = r
        .targets
        .iter()
        .map(|t| t.per_pair.len())
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        s,
        "\nTimed targets are the median of {pairs} per-pair values (ratios; differences for the \
         QD 1 round trip): each pair is a round of the store and then a round of its limit (or \
         end to end and then in process) on the same pages, so a slow window moves a pair, not \
         the figure."
    );
}

/// The summary shared by the README section and the top of report.md.
fn summary(r: &Report, s: &mut String) {
    let _ = writeln!(s, "Machine: {}.\n", machine_line(r));
    targets_table(r, s);
    s.push('\n');
    s.push_str(
        "Mixed corpus, one thread (latency p50 / p99 in µs, throughput in thousands of pages/s):\n\n\
         | compressor | put | bare compress | get | bare decompress | put kpages/s | get kpages/s | e2e QD64 put / get kpages/s | ratio |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for c in r.compressors() {
        let (Some(p), Some(g)) = (
            r.engine(&c, "mixed", "put", 1),
            r.engine(&c, "mixed", "get", 1),
        ) else {
            continue;
        };
        let lc = r.limit("compress", &c, "mixed");
        let ld = r.limit("decompress", &c, "mixed");
        let e2e = |op: &str| r.e2e_qd64(&c, op);
        let _ = writeln!(
            s,
            "| {c} | {} / {} | {} | {} / {} | {} | {} | {} | {} / {} | {} |",
            us(p.p50_ns),
            us(p.p99_ns),
            lc.map_or("-".into(), |l| us(l.p50_ns)),
            us(g.p50_ns),
            us(g.p99_ns),
            ld.map_or("-".into(), |l| us(l.p50_ns)),
            kops(p.ops_per_s),
            kops(g.ops_per_s),
            e2e("put").map_or("-".into(), |e| kops(e.ops_per_s)),
            e2e("get").map_or("-".into(), |e| kops(e.ops_per_s)),
            r.compression(&c)
                .map_or("-".into(), |x| format!("{:.2}", x.store)),
        );
    }
    let worst = |keys: &str| {
        r.footprint
            .iter()
            .filter(|e| e.keys == keys)
            .map(|e| e.metadata_bytes_per_page)
            .fold(0.0, f64::max)
    };
    let _ = writeln!(
        s,
        "\nMetadata per stored page (allocator-counted, worst pool kind): {:.1} B with dense keys, \
         {:.1} B with one page per object, {:.1} B with one page per run. Resident memory {:.0} B \
         per stored page (lz4, mixed, dense).",
        r.metadata_bytes_per_page,
        worst("object per page"),
        worst("scattered"),
        r.rss_bytes_per_stored_page
    );
}

/// The full Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut s = String::from("# vhost-tmem benchmark report\n\n");
    summary(r, &mut s);
    s.push_str("\n## Corpora\n\n| corpus | pages | source |\n|---|---|---|\n");
    for c in &r.corpora {
        let _ = writeln!(s, "| {} | {} | {} |", c.name, c.pages, c.source);
    }
    s.push_str(
        "\n## In-process store\n\nPersistent pool; each round puts, gets (checked) and flushes \
         every page. Latency in µs.\n\n| compressor | corpus | op | threads | p50 | p99 | kpages/s |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for e in &r.engine {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            e.compressor,
            e.corpus,
            e.op,
            e.threads,
            us(e.p50_ns),
            us(e.p99_ns),
            kops(e.ops_per_s)
        );
    }
    s.push_str(
        "\n## Limits (one thread)\n\n| what | compressor | corpus | p50 | p99 | kpages/s |\n\
         |---|---|---|---|---|---|\n",
    );
    for e in &r.limits {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            e.what,
            e.compressor,
            e.corpus,
            us(e.p50_ns),
            us(e.p99_ns),
            kops(e.ops_per_s)
        );
    }
    s.push_str(
        "\n## End to end (vhost-user, userspace guest, mixed corpus)\n\nLatency is from \
         submission to completion, queueing included. The ratio is to the in-process store with \
         as many threads as request queues. An untimed first round checks every page; timed \
         rounds leave returned pages unread, as a driver hands the device's page to its user. \
         The guest and each queue's daemon thread all poll: with as many queues as cores or \
         more, they share cores and those rows measure time slicing.\n\n\
         | compressor | queues | QD | op | p50 | p99 | kpages/s | ratio to in-process |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for e in &r.e2e {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            e.compressor,
            e.queues,
            e.queue_depth,
            e.op,
            us(e.p50_ns),
            us(e.p99_ns),
            kops(e.ops_per_s),
            e.ratio_to_engine
        );
    }
    s.push_str(
        "\n## Memory per stored page (mixed corpus)\n\nKeys: dense (consecutive indexes, as swap and \
         large files), object per page (small files), scattered (every 16th index: one page per \
         run); churn: a store at a memory limit filled to it by 4 threads, a random half freed and \
         refilled with pages of other sizes, repeatedly, then everything freed. Charged is what \
         the store counts against memory limits; RSS is the process's resident-set growth (peak, \
         and what is left after every page is freed).\n\n\
         | compressor | pool | keys | pages | payload B | metadata B | charged metadata B | allocator slack B | RSS B | limit MiB | charged MiB | RSS MiB | RSS after free MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for e in &r.footprint {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} | {} | {:.1} | {:.1} | {:.1} |",
            e.compressor,
            e.pool,
            e.keys,
            e.pages,
            e.payload_bytes_per_page,
            e.metadata_bytes_per_page,
            e.charged_metadata_bytes_per_page,
            e.allocator_slack_bytes_per_page,
            e.rss_bytes_per_page,
            if e.limit_bytes == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", mib(e.limit_bytes))
            },
            mib(e.charged_bytes),
            mib(e.rss_bytes),
            mib(e.rss_after_free_bytes),
        );
    }
    s.push_str(
        "\n## Compression (mixed corpus)\n\n| compressor | store ratio | bare ratio | stored B/page | \
         slack B/page | bare B/page |\n|---|---|---|---|---|---|\n",
    );
    for e in &r.compression_ratio {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.0} | {:.1} | {:.0} |",
            e.compressor,
            e.store,
            e.bare,
            e.stored_bytes_per_page,
            e.allocator_slack_bytes_per_page,
            e.bare_bytes_per_page
        );
    }
    if !r.instructions.is_empty() {
        s.push_str(
            "\n## Instructions per page (callgrind, `make bench-instructions`)\n\n\
             | compressor | corpus | pages | put | bare compress | put/compress | get | bare decompress | get/decompress | flush |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        for e in &r.instructions {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {:.0} | {:.3} | {:.0} | {:.0} | {:.3} | {:.0} |",
                e.compressor,
                e.corpus,
                e.pages,
                e.put_per_page,
                e.compress_per_page,
                e.put_to_compress,
                e.get_per_page,
                e.decompress_per_page,
                e.get_to_decompress,
                e.flush_per_page
            );
        }
    }
    s.push_str("\n![latency and throughput per compressor](report.svg)\n");
    s
}

/// The README section (between [`BEGIN`] and [`END`]).
pub fn readme_section(r: &Report) -> String {
    let mut s = String::new();
    s.push_str(
        "Written by `make bench` (`target/bench/report.md` has every figure, \
         `target/bench/report.svg` the plot).\n\n",
    );
    summary(r, &mut s);
    s
}

/// Replaces the README's generated section.
pub fn update_readme(path: &std::path::Path, r: &Report) -> Result<(), Error> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Write {
        path: p.clone(),
        source,
    })?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        return Err(Error::NoMarkers {
            path: p,
            begin: BEGIN,
            end: END,
        });
    };
    if b < a {
        return Err(Error::NoMarkers {
            path: p,
            begin: BEGIN,
            end: END,
        });
    }
    let new = format!("{}{BEGIN}\n{}{}", &text[..a], readme_section(r), &text[b..]);
    std::fs::write(path, new).map_err(|source| Error::Write { path: p, source })
}

/// What the terminal shows before the closing summary: the mixed-corpus figures.
pub fn terminal(r: &Report) -> String {
    let mut s = String::new();
    let mut full = String::new();
    summary(r, &mut full);
    // The summary without its targets table: that closes the run (see [`closing`]).
    if let Some(i) = full.find("Mixed corpus, one thread") {
        s.push_str(&full[i..]);
    }
    s
}

/// The one-screen summary `make bench` ends with: each target, its median, its spread, the
/// bound and whether it was met.
pub fn closing(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "== targets ({})", machine_line(r));
    let _ = writeln!(
        s,
        "{:<4} {:>8} {:>13} {:>10}  target (lz4, one core)",
        "met", "median", "spread", "bound"
    );
    for t in &r.targets {
        let bound = format!(
            "{} {}",
            if t.kind == "at most" { "<=" } else { ">=" },
            t.bound
        );
        let _ = writeln!(
            s,
            "{:<4} {:>8.3} {:>13} {:>10}  {}",
            if t.met { "yes" } else { "NO" },
            t.measured,
            spread(t),
            bound,
            t.target
        );
    }
    let met = r.targets.iter().filter(|t| t.met).count();
    let pairs = r
        .targets
        .iter()
        .map(|t| t.per_pair.len())
        .max()
        .unwrap_or(0);
    let _ = write!(
        s,
        "{met} of {} targets met (timed: median of {pairs} interleaved pairs, spread min-max; \
         a {} run)",
        r.targets.len(),
        r.mode
    );
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;")
}

/// A grouped bar chart at (x, y) of size w x h.
#[allow(clippy::too_many_arguments)]
fn bars(
    s: &mut String,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[(&str, &str, Vec<f64>)],
) {
    let max = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (left, top, bottom) = (60.0, 30.0, 60.0);
    let (pw, ph) = (w - left - 10.0, h - top - bottom);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        x + left,
        y + 18.0,
        esc(title)
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let yy = y + top + ph - ph * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{yy}" x2="{}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" font-size="10" text-anchor="end">{:.1}</text>"##,
            x + left,
            x + left + pw,
            x + left - 4.0,
            yy + 3.0,
            v
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="10" transform="rotate(-90 {} {})">{}</text>"#,
        x + 12.0,
        y + top + ph / 2.0,
        x + 12.0,
        y + top + ph / 2.0,
        esc(unit)
    );
    let gw = pw / groups.len().max(1) as f64;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    for (gi, g) in groups.iter().enumerate() {
        let gx = x + left + gi as f64 * gw + gw * 0.1;
        for (si, (_, color, vals)) in series.iter().enumerate() {
            let v = vals.get(gi).copied().unwrap_or(0.0);
            let bh = ph * v / max;
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{:.2}</title></rect>"#,
                gx + si as f64 * bw,
                y + top + ph - bh,
                bw * 0.9,
                bh,
                v
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
            gx + gw * 0.4,
            y + top + ph + 14.0,
            esc(g)
        );
    }
    for (si, (name, color, _)) in series.iter().enumerate() {
        let lx = x + left + (si % 3) as f64 * (pw / 3.0);
        let ly = y + top + ph + 30.0 + (si / 3) as f64 * 14.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}" font-size="10">{}</text>"#,
            ly - 9.0,
            lx + 14.0,
            ly,
            esc(name)
        );
    }
}

/// The plot: p50 latency and throughput per compressor on the mixed corpus, with the limits.
pub fn svg(r: &Report) -> String {
    let comps = r.compressors();
    let cores = r.machine.cores;
    // Microseconds and thousands of pages/s; a missing row plots as 0.
    let lat = |ns: Option<u64>| ns.map_or(0.0, |ns| ns as f64 / 1000.0);
    let kops = |ops: Option<f64>| ops.map_or(0.0, |ops| ops / 1000.0);
    let series_lat = vec![
        (
            "put p50",
            "#1f77b4",
            comps
                .iter()
                .map(|c| lat(r.engine(c, "mixed", "put", 1).map(|e| e.p50_ns)))
                .collect(),
        ),
        (
            "bare compress p50",
            "#aec7e8",
            comps
                .iter()
                .map(|c| lat(r.limit("compress", c, "mixed").map(|l| l.p50_ns)))
                .collect(),
        ),
        (
            "get p50",
            "#d62728",
            comps
                .iter()
                .map(|c| lat(r.engine(c, "mixed", "get", 1).map(|e| e.p50_ns)))
                .collect(),
        ),
        (
            "bare decompress p50",
            "#ff9896",
            comps
                .iter()
                .map(|c| lat(r.limit("decompress", c, "mixed").map(|l| l.p50_ns)))
                .collect(),
        ),
    ];
    let mut series_tp = Vec::new();
    for (op, c1, c2, c3) in [
        ("put", "#1f77b4", "#6baed6", "#9467bd"),
        ("get", "#d62728", "#fc9272", "#e377c2"),
    ] {
        series_tp.push((
            if op == "put" {
                "put, 1 thread"
            } else {
                "get, 1 thread"
            },
            c1,
            comps
                .iter()
                .map(|c| kops(r.engine(c, "mixed", op, 1).map(|e| e.ops_per_s)))
                .collect::<Vec<f64>>(),
        ));
        series_tp.push((
            if op == "put" {
                "put, thread per core"
            } else {
                "get, thread per core"
            },
            c2,
            comps
                .iter()
                .map(|c| kops(r.engine(c, "mixed", op, cores).map(|e| e.ops_per_s)))
                .collect(),
        ));
        series_tp.push((
            if op == "put" {
                "put, vhost-user QD64"
            } else {
                "get, vhost-user QD64"
            },
            c3,
            comps
                .iter()
                .map(|c| kops(r.e2e_qd64(c, op).map(|e| e.ops_per_s)))
                .collect(),
        ));
    }
    let mut s = String::from(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="1000" height="420" font-family="sans-serif">
<rect width="1000" height="420" fill="white"/>
"#,
    );
    bars(
        &mut s,
        0.0,
        0.0,
        500.0,
        380.0,
        "p50 latency per page, mixed corpus",
        "µs",
        &comps,
        &series_lat,
    );
    bars(
        &mut s,
        500.0,
        0.0,
        500.0,
        380.0,
        "throughput, mixed corpus",
        "thousand pages/s",
        &comps,
        &series_tp,
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="410" font-size="10">{}</text>"#,
        esc(&machine_line(r))
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report with one row of each kind the check asks for.
    fn sample() -> Report {
        let engine = |corpus: &str| EngineRow {
            compressor: "lz4".into(),
            corpus: corpus.into(),
            op: "put".into(),
            ops_per_s: 1000.0,
            p50_ns: 900,
            p99_ns: 2000,
            threads: 1,
        };
        let limit = |what: &str| LimitRow {
            compressor: "lz4".into(),
            corpus: "mixed".into(),
            ops_per_s: 1000.0,
            p50_ns: 800,
            p99_ns: 1500,
            what: what.into(),
        };
        let footprint = |keys: &str| FootprintRow {
            allocator_slack_bytes_per_page: 7.5,
            charged_bytes: 7 << 20,
            charged_metadata_bytes_per_page: 40.0,
            compressor: "lz4".into(),
            keys: keys.into(),
            limit_bytes: 0,
            metadata_bytes_per_page: 29.5,
            pages: 4096,
            payload_bytes_per_page: 1700.0,
            pool: "persistent".into(),
            rss_after_free_bytes: 1 << 20,
            rss_bytes: 8 << 20,
            rss_bytes_per_page: 1800.0,
        };
        let mut r = Report {
            compression_ratio: vec![CompressionRow {
                allocator_slack_bytes_per_page: 7.3,
                bare: 2.4,
                bare_bytes_per_page: 1700.0,
                compressor: "lz4".into(),
                corpus: "mixed".into(),
                store: 2.4,
                stored_bytes_per_page: 1690.0,
            }],
            corpora: vec![CorpusRow {
                name: "mixed".into(),
                pages: 256,
                source: "test".into(),
            }],
            e2e: vec![E2eRow {
                compressor: "lz4".into(),
                corpus: "mixed".into(),
                op: "put".into(),
                ops_per_s: 900.0,
                p50_ns: 5000,
                p99_ns: 9000,
                queue_depth: 64,
                queues: 1,
                ratio_to_engine: 0.9,
            }],
            engine: ["zero", "same", "mixed"].into_iter().map(engine).collect(),
            footprint: ["dense", "object per page", "scattered", "churn"]
                .into_iter()
                .map(footprint)
                .collect(),
            instructions: vec![InstructionRow::new(
                "lz4",
                "mixed",
                512,
                [11000.0, 3000.0, 500.0, 10000.0, 2500.0],
            )],
            limits: ["memcpy", "compress", "decompress"]
                .into_iter()
                .map(limit)
                .collect(),
            machine: Machine {
                cores: 2,
                cpu_model: "test".into(),
                cross_cpu_round_trip_ns: vec![90, 360],
                kernel: "6.12".into(),
                memory_gib: 4.0,
                timer_overhead_ns: 20,
            },
            metadata_bytes_per_page: 29.5,
            mode: "quick".into(),
            paired: vec![
                PairedRatio::new(
                    "lz4",
                    "mixed",
                    "put p50 / compress p50",
                    &[1100.0, 990.0, 2000.0],
                    &[1000.0, 900.0, 1000.0],
                ),
                PairedRatio::difference(
                    "lz4",
                    "mixed",
                    &qd1_what("get"),
                    &[3.0, 3.1, 5.0],
                    &[2.0, 2.0, 2.0],
                )
                .with_round_trips(vec![88, 340, 90]),
            ],
            rss_bytes_per_stored_page: 1800.0,
            seconds: 5,
            targets: Vec::new(),
        };
        r.targets = targets(&r);
        r
    }

    fn json(r: &Report) -> String {
        serde_json::to_string_pretty(r).unwrap()
    }

    #[test]
    fn a_complete_report_passes_the_check() {
        let r = sample();
        assert!(!r.targets.is_empty());
        let back = check(&json(&r)).unwrap();
        assert_eq!(json(&back), json(&r));
    }

    #[test]
    fn a_missing_key_fails_the_check() {
        let mut v: serde_json::Value = serde_json::from_str(&json(&sample())).unwrap();
        v["e2e"][0].as_object_mut().unwrap().remove("p99_ns");
        let e = check(&v.to_string()).unwrap_err();
        assert!(matches!(e, Error::Layout(_)), "{e}");
        assert!(e.to_string().contains("p99_ns"), "{e}");

        let mut v: serde_json::Value = serde_json::from_str(&json(&sample())).unwrap();
        v["machine"].as_object_mut().unwrap().remove("cpu_model");
        assert!(matches!(check(&v.to_string()), Err(Error::Layout(_))));

        let mut v: serde_json::Value = serde_json::from_str(&json(&sample())).unwrap();
        v["engine"][0]["p50_ns"] = serde_json::Value::Null;
        assert!(matches!(check(&v.to_string()), Err(Error::Layout(_))));
    }

    #[test]
    fn missing_rows_fail_the_check() {
        let mut r = sample();
        r.e2e.clear();
        assert!(matches!(check(&json(&r)), Err(Error::Incomplete(w)) if w == "e2e"));
        let mut r = sample();
        r.engine.retain(|e| e.corpus != "same");
        assert!(matches!(check(&json(&r)), Err(Error::Incomplete(_))));
        let mut r = sample();
        r.limits.retain(|e| e.what != "memcpy");
        assert!(matches!(check(&json(&r)), Err(Error::Incomplete(_))));
        let mut r = sample();
        r.footprint.retain(|e| e.keys != "scattered");
        assert!(matches!(check(&json(&r)), Err(Error::Incomplete(_))));
    }

    #[test]
    fn a_round_trip_is_the_median_of_per_pair_differences() {
        // The third pair's e2e round met a slow window: it moves its pair only.
        let d = PairedRatio::difference("lz4", "mixed", "x", &[3.0, 3.2, 9.0], &[1.0, 1.1, 1.2]);
        assert_eq!(d.per_pair, [2.0, 2.1, 7.8]);
        assert_eq!(d.median, 2.1);
        assert_eq!((d.min, d.max), (2.0, 7.8));
    }

    #[test]
    fn instruction_ratios() {
        let i = InstructionRow::new("lz4", "text", 256, [1100.0, 330.0, 50.04, 1000.0, 300.0]);
        assert_eq!(i.put_to_compress, 1.1);
        assert_eq!(i.get_to_decompress, 1.1);
        assert_eq!(i.flush_per_page, 50.0);
        // Nothing counted for the codec: no ratio rather than infinity.
        let i = InstructionRow::new("lz4", "zero", 256, [10.0, 10.0, 1.0, 0.0, 0.0]);
        assert_eq!(i.put_to_compress, 0.0);
    }

    #[test]
    fn the_closing_summary_shows_every_target() {
        let r = sample();
        let c = closing(&r);
        for t in &r.targets {
            assert!(c.contains(&t.target), "{c}");
        }
        // The sample's one timed target: median 1.1 of pairs 1.1, 1.1, 2.0.
        let line = c
            .lines()
            .find(|l| l.contains("put p50 / bare compress p50 (mixed)"))
            .unwrap();
        assert!(line.starts_with("yes"), "{line}");
        assert!(
            line.contains("1.100") && line.contains("1.10-2.00"),
            "{line}"
        );
        assert!(line.contains("<= 1.1"), "{line}");
        let met = r.targets.iter().filter(|t| t.met).count();
        assert!(
            c.contains(&format!("{met} of {} targets met", r.targets.len())),
            "{c}"
        );
        // Counted figures have no spread.
        let line = c.lines().find(|l| l.contains("metadata bytes")).unwrap();
        assert!(line.contains(" - "), "{line}");
        assert!(c.lines().count() <= 24, "one screen: {c}");
        // The header says what a cache line between CPUs cost around the end-to-end rows.
        assert!(
            c.contains("90 ns before the end-to-end rows and 360 ns after"),
            "{c}"
        );
        // And what it cost just before the end-to-end rounds that the targets judge.
        let qd1 = r
            .targets
            .iter()
            .find(|t| t.target.contains("QD 1"))
            .unwrap();
        assert_eq!(qd1.round_trip_ns, [88, 340, 90]);
        assert!(c.contains("(88-340 ns before the paired rounds)"), "{c}");
    }

    /// report.json keeps its layout: keys in sorted order at every level, as it had when it
    /// was written from a sorted JSON map.
    #[test]
    fn keys_stay_in_sorted_order() {
        let text = json(&sample());
        let sorted: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(text, serde_json::to_string_pretty(&sorted).unwrap());
    }
}
