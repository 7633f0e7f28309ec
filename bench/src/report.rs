// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The report: targets evaluated from the figures, a table for the terminal, Markdown, an SVG
//! plot and the README section. Everything reads the JSON document, so every output shows the
//! same numbers.

use std::fmt::Write as _;

use serde_json::{json, Value};

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
    #[error("report.json lacks {0}")]
    Incomplete(String),
}

/// Where the README's generated section starts and ends.
pub const BEGIN: &str = "<!-- bench-results:begin (written by make bench) -->";
/// See [`BEGIN`].
pub const END: &str = "<!-- bench-results:end -->";

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn find<'a>(list: &'a Value, pred: &dyn Fn(&Value) -> bool) -> Option<&'a Value> {
    list.as_array()?.iter().find(|r| pred(r))
}

fn engine<'a>(r: &'a Value, comp: &str, corpus: &str, op: &str, threads: u64) -> Option<&'a Value> {
    find(&r["engine"], &|e| {
        e["compressor"] == comp && e["corpus"] == corpus && e["op"] == op && e["threads"] == threads
    })
}

fn limit<'a>(r: &'a Value, what: &str, comp: &str, corpus: &str) -> Option<&'a Value> {
    find(&r["limits"], &|e| {
        e["what"] == what && e["compressor"] == comp && e["corpus"] == corpus
    })
}

/// Evaluates the issue's targets (lz4, one thread) as ratios to the limits in the same run.
pub fn targets(r: &Value) -> Value {
    let mut out = Vec::new();
    let mut add = |name: String, measured: Option<f64>, bound: f64, at_most: bool| {
        if let Some(m) = measured {
            let met = if at_most { m <= bound } else { m >= bound };
            out.push(json!({
                "target": name,
                "measured": (m * 1000.0).round() / 1000.0,
                "bound": bound,
                "kind": if at_most { "at most" } else { "at least" },
                "met": met,
            }));
        }
    };
    let ratio = |a: Option<&Value>, b: Option<&Value>, key: &str| -> Option<f64> {
        let (a, b) = (f(&a?[key]), f(&b?[key]));
        (b > 0.0).then(|| a / b)
    };
    for corpus in ["mixed", "binary", "text"] {
        add(
            format!("put p50 / bare compress p50 ({corpus})"),
            ratio(
                engine(r, "lz4", corpus, "put", 1),
                limit(r, "compress", "lz4", corpus),
                "p50_ns",
            ),
            1.2,
            true,
        );
        add(
            format!("get p50 / bare decompress p50 ({corpus})"),
            ratio(
                engine(r, "lz4", corpus, "get", 1),
                limit(r, "decompress", "lz4", corpus),
                "p50_ns",
            ),
            1.2,
            true,
        );
    }
    for corpus in ["zero", "same"] {
        for op in ["put", "get"] {
            add(
                format!("{op} p50 / 4 KiB memcpy p50 ({corpus})"),
                ratio(
                    engine(r, "lz4", corpus, op, 1),
                    limit(r, "memcpy", "none", corpus),
                    "p50_ns",
                ),
                3.0,
                true,
            );
        }
    }
    for (op, what) in [("put", "compress"), ("get", "decompress")] {
        add(
            format!("{op} pages/s / bare {what} pages/s (mixed, one core)"),
            ratio(
                engine(r, "lz4", "mixed", op, 1),
                limit(r, what, "lz4", "mixed"),
                "ops_per_s",
            ),
            0.8,
            false,
        );
    }
    for op in ["put", "get"] {
        let e2e = find(&r["e2e"], &|e| {
            e["compressor"] == "lz4" && e["queue_depth"] == 64 && e["queues"] == 1 && e["op"] == op
        });
        add(
            format!("end-to-end {op} pages/s at QD 64 / in-process (mixed, one queue)"),
            e2e.map(|e| f(&e["ratio_to_engine"])),
            0.8,
            false,
        );
    }
    add(
        "metadata bytes per stored page (dense keys)".into(),
        r["metadata_bytes_per_page"].as_f64(),
        32.0,
        true,
    );
    if let Some(c) = find(&r["compression_ratio"], &|c| c["compressor"] == "lz4") {
        let stored = f(&c["stored_bytes_per_page"]) + f(&c["allocator_slack_bytes_per_page"]);
        let bare = f(&c["bare_bytes_per_page"]);
        add(
            "stored bytes (with slack) / bare lz4 output (mixed)".into(),
            (bare > 0.0).then(|| stored / bare),
            1.1,
            true,
        );
    }
    Value::Array(out)
}

/// Checks that the keys the issue names are present (the quick run's smoke check).
pub fn check(r: &Value) -> Result<(), Error> {
    let need = |cond: bool, what: &str| {
        if cond {
            Ok(())
        } else {
            Err(Error::Incomplete(what.to_string()))
        }
    };
    need(r["machine"]["cpu_model"].is_string(), "machine.cpu_model")?;
    need(r["machine"]["cores"].is_u64(), "machine.cores")?;
    for (list, keys) in [
        (
            "engine",
            &[
                "compressor",
                "corpus",
                "op",
                "threads",
                "p50_ns",
                "p99_ns",
                "ops_per_s",
            ][..],
        ),
        (
            "limits",
            &["what", "compressor", "corpus", "p50_ns", "ops_per_s"][..],
        ),
        (
            "e2e",
            &[
                "compressor",
                "queue_depth",
                "queues",
                "op",
                "p50_ns",
                "p99_ns",
                "ops_per_s",
                "ratio_to_engine",
            ][..],
        ),
    ] {
        let rows = r[list].as_array().filter(|a| !a.is_empty());
        need(rows.is_some(), list)?;
        for row in rows.into_iter().flatten() {
            for k in keys {
                need(!row[*k].is_null(), &format!("{list}[].{k}"))?;
            }
        }
    }
    for corpus in ["zero", "same", "mixed"] {
        need(
            find(&r["engine"], &|e| e["corpus"] == corpus).is_some(),
            &format!("engine rows for the {corpus} corpus"),
        )?;
    }
    for what in ["memcpy", "compress", "decompress"] {
        need(
            find(&r["limits"], &|e| e["what"] == what).is_some(),
            &format!("limits rows for {what}"),
        )?;
    }
    for keys in ["dense", "object per page", "scattered"] {
        need(
            find(&r["footprint"], &|e| e["keys"] == keys).is_some(),
            &format!("footprint rows for {keys} keys"),
        )?;
    }
    need(r["compression_ratio"].is_array(), "compression_ratio")?;
    need(
        r["metadata_bytes_per_page"].is_number(),
        "metadata_bytes_per_page",
    )?;
    need(
        r["rss_bytes_per_stored_page"].is_number(),
        "rss_bytes_per_stored_page",
    )?;
    Ok(())
}

fn us(ns: &Value) -> String {
    format!("{:.2}", f(ns) / 1000.0)
}

fn kops(v: &Value) -> String {
    format!("{:.1}", f(v) / 1000.0)
}

fn machine_line(r: &Value) -> String {
    let m = &r["machine"];
    format!(
        "{} ({} cores, {:.0} GiB), Linux {}, timer overhead {} ns; {} run",
        m["cpu_model"].as_str().unwrap_or("?"),
        m["cores"],
        f(&m["memory_gib"]),
        m["kernel"].as_str().unwrap_or("?"),
        m["timer_overhead_ns"],
        r["mode"].as_str().unwrap_or("?")
    )
}

fn targets_table(r: &Value, s: &mut String) {
    s.push_str("| target (lz4, one core) | measured | bound | met |\n|---|---|---|---|\n");
    for t in r["targets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} {} | {} |",
            t["target"].as_str().unwrap_or(""),
            f(&t["measured"]),
            t["kind"].as_str().unwrap_or(""),
            t["bound"],
            if t["met"] == true { "yes" } else { "**no**" }
        );
    }
}

fn compressors(r: &Value) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for e in r["engine"].as_array().into_iter().flatten() {
        let c = e["compressor"].as_str().unwrap_or("").to_string();
        if !v.contains(&c) {
            v.push(c);
        }
    }
    v
}

/// The summary shared by the README section and the top of report.md.
fn summary(r: &Value, s: &mut String) {
    let _ = writeln!(s, "Machine: {}.\n", machine_line(r));
    targets_table(r, s);
    s.push('\n');
    s.push_str(
        "Mixed corpus, one thread (latency p50 / p99 in µs, throughput in thousands of pages/s):\n\n\
         | compressor | put | bare compress | get | bare decompress | put kpages/s | get kpages/s | e2e QD64 put / get kpages/s | ratio |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for c in compressors(r) {
        let (Some(p), Some(g)) = (
            engine(r, &c, "mixed", "put", 1),
            engine(r, &c, "mixed", "get", 1),
        ) else {
            continue;
        };
        let lc = limit(r, "compress", &c, "mixed");
        let ld = limit(r, "decompress", &c, "mixed");
        let e2e = |op: &str| {
            find(&r["e2e"], &|e| {
                e["compressor"] == c.as_str()
                    && e["queue_depth"] == 64
                    && e["queues"] == 1
                    && e["op"] == op
            })
        };
        let ratio = find(&r["compression_ratio"], &|x| x["compressor"] == c.as_str());
        let _ = writeln!(
            s,
            "| {c} | {} / {} | {} | {} / {} | {} | {} | {} | {} / {} | {} |",
            us(&p["p50_ns"]),
            us(&p["p99_ns"]),
            lc.map_or("-".into(), |l| us(&l["p50_ns"])),
            us(&g["p50_ns"]),
            us(&g["p99_ns"]),
            ld.map_or("-".into(), |l| us(&l["p50_ns"])),
            kops(&p["ops_per_s"]),
            kops(&g["ops_per_s"]),
            e2e("put").map_or("-".into(), |e| kops(&e["ops_per_s"])),
            e2e("get").map_or("-".into(), |e| kops(&e["ops_per_s"])),
            ratio.map_or("-".into(), |x| format!("{:.2}", f(&x["store"]))),
        );
    }
    let worst = |keys: &str| {
        r["footprint"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["keys"] == keys)
            .map(|e| f(&e["metadata_bytes_per_page"]))
            .fold(0.0, f64::max)
    };
    let _ = writeln!(
        s,
        "\nMetadata per stored page (allocator-counted, worst pool kind): {:.1} B with dense keys, \
         {:.1} B with one page per object, {:.1} B with one page per run. Resident memory {:.0} B \
         per stored page (lz4, mixed, dense).",
        f(&r["metadata_bytes_per_page"]),
        worst("object per page"),
        worst("scattered"),
        f(&r["rss_bytes_per_stored_page"])
    );
}

/// The full Markdown report.
pub fn markdown(r: &Value) -> String {
    let mut s = String::from("# vhost-tmem benchmark report\n\n");
    summary(r, &mut s);
    s.push_str("\n## Corpora\n\n| corpus | pages | source |\n|---|---|---|\n");
    for c in r["corpora"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            c["name"].as_str().unwrap_or(""),
            c["pages"],
            c["source"].as_str().unwrap_or("")
        );
    }
    s.push_str(
        "\n## In-process store\n\nPersistent pool; each round puts, gets (checked) and flushes \
         every page. Latency in µs.\n\n| compressor | corpus | op | threads | p50 | p99 | kpages/s |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for e in r["engine"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            e["compressor"].as_str().unwrap_or(""),
            e["corpus"].as_str().unwrap_or(""),
            e["op"].as_str().unwrap_or(""),
            e["threads"],
            us(&e["p50_ns"]),
            us(&e["p99_ns"]),
            kops(&e["ops_per_s"])
        );
    }
    s.push_str(
        "\n## Limits (one thread)\n\n| what | compressor | corpus | p50 | p99 | kpages/s |\n\
         |---|---|---|---|---|---|\n",
    );
    for e in r["limits"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            e["what"].as_str().unwrap_or(""),
            e["compressor"].as_str().unwrap_or(""),
            e["corpus"].as_str().unwrap_or(""),
            us(&e["p50_ns"]),
            us(&e["p99_ns"]),
            kops(&e["ops_per_s"])
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
    for e in r["e2e"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} |",
            e["compressor"].as_str().unwrap_or(""),
            e["queues"],
            e["queue_depth"],
            e["op"].as_str().unwrap_or(""),
            us(&e["p50_ns"]),
            us(&e["p99_ns"]),
            kops(&e["ops_per_s"]),
            f(&e["ratio_to_engine"])
        );
    }
    s.push_str(
        "\n## Memory per stored page (mixed corpus)\n\nKeys: dense (consecutive indexes, as swap and \
         large files), object per page (small files), scattered (every 16th index: one page per \
         run). Charged metadata is what the store counts against memory limits.\n\n\
         | compressor | pool | keys | pages | payload B | metadata B | charged metadata B | allocator slack B | RSS B |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for e in r["footprint"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} |",
            e["compressor"].as_str().unwrap_or(""),
            e["pool"].as_str().unwrap_or(""),
            e["keys"].as_str().unwrap_or(""),
            e["pages"],
            f(&e["payload_bytes_per_page"]),
            f(&e["metadata_bytes_per_page"]),
            f(&e["charged_metadata_bytes_per_page"]),
            f(&e["allocator_slack_bytes_per_page"]),
            f(&e["rss_bytes_per_page"])
        );
    }
    s.push_str(
        "\n## Compression (mixed corpus)\n\n| compressor | store ratio | bare ratio | stored B/page | \
         slack B/page | bare B/page |\n|---|---|---|---|---|---|\n",
    );
    for e in r["compression_ratio"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.0} | {:.1} | {:.0} |",
            e["compressor"].as_str().unwrap_or(""),
            f(&e["store"]),
            f(&e["bare"]),
            f(&e["stored_bytes_per_page"]),
            f(&e["allocator_slack_bytes_per_page"]),
            f(&e["bare_bytes_per_page"])
        );
    }
    s.push_str("\n![latency and throughput per compressor](report.svg)\n");
    s
}

/// The README section (between [`BEGIN`] and [`END`]).
pub fn readme_section(r: &Value) -> String {
    let mut s = String::new();
    s.push_str(
        "Written by `make bench` (`target/bench/report.md` has every figure, \
         `target/bench/report.svg` the plot).\n\n",
    );
    summary(r, &mut s);
    s
}

/// Replaces the README's generated section.
pub fn update_readme(path: &std::path::Path, r: &Value) -> Result<(), Error> {
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

/// The terminal table: targets and the mixed-corpus summary.
pub fn terminal(r: &Value) -> String {
    let mut s = String::new();
    summary(r, &mut s);
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
pub fn svg(r: &Value) -> String {
    let comps = compressors(r);
    let cores = r["machine"]["cores"].as_u64().unwrap_or(1);
    let pick = |v: Option<&Value>, k: &str, scale: f64| v.map_or(0.0, |v| f(&v[k]) / scale);
    let series_lat = vec![
        (
            "put p50",
            "#1f77b4",
            comps
                .iter()
                .map(|c| pick(engine(r, c, "mixed", "put", 1), "p50_ns", 1000.0))
                .collect(),
        ),
        (
            "bare compress p50",
            "#aec7e8",
            comps
                .iter()
                .map(|c| pick(limit(r, "compress", c, "mixed"), "p50_ns", 1000.0))
                .collect(),
        ),
        (
            "get p50",
            "#d62728",
            comps
                .iter()
                .map(|c| pick(engine(r, c, "mixed", "get", 1), "p50_ns", 1000.0))
                .collect(),
        ),
        (
            "bare decompress p50",
            "#ff9896",
            comps
                .iter()
                .map(|c| pick(limit(r, "decompress", c, "mixed"), "p50_ns", 1000.0))
                .collect(),
        ),
    ];
    let e2e = |c: &str, op: &str| {
        find(&r["e2e"], &|e| {
            e["compressor"] == c && e["queue_depth"] == 64 && e["queues"] == 1 && e["op"] == op
        })
    };
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
                .map(|c| pick(engine(r, c, "mixed", op, 1), "ops_per_s", 1000.0))
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
                .map(|c| pick(engine(r, c, "mixed", op, cores), "ops_per_s", 1000.0))
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
                .map(|c| pick(e2e(c, op), "ops_per_s", 1000.0))
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
