// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What people look at: `report.md` (a summary table across modes, a table per mode with each
//! guest and the total, the targets) and the plots, each as SVG and PNG: memory holding each
//! guest's evicted pages over time, pages served from memory and pages read from disk.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::experiment::{Experiment, Mode};
use crate::series::{total_over_time, Counts, Results, Sample};

const MIB: f64 = 1048576.0;

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

/// One row of a counts table.
fn counts_row(out: &mut String, first: &str, c: &Counts) {
    let _ = writeln!(
        out,
        "| {first} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        c.swap_in_memory,
        c.cache_in_memory,
        c.served_from_memory,
        c.swap_in_disk,
        c.file_in_disk,
        c.served_from_disk,
        opt(c.disk_reads_avoided),
        mib(c.peak_held_bytes),
        opt(c.host_bytes_per_page_held),
        c.ops,
        if c.verified { "yes" } else { "no" },
    );
}

/// The table of every mode's totals: what the README shows.
pub fn summary_table(r: &Results) -> String {
    let mut out = String::from(
        "| mode | pages served from memory | pages read from disk | disk reads avoided (vs disk) \
         | peak memory holding evicted pages | host bytes per page served | operations | verified \
         | time (TCG) |\n|---|---:|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for m in &r.modes {
        let c = &m.total;
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            m.mode,
            if m.complete { "" } else { " (incomplete)" },
            c.served_from_memory,
            c.served_from_disk,
            opt(c.disk_reads_avoided),
            mib(c.peak_held_bytes),
            opt(c.host_bytes_per_page_served),
            c.ops,
            if c.verified { "yes" } else { "no" },
            m.seconds
        );
    }
    out
}

/// The targets' lines.
fn targets(r: &Results) -> String {
    let t = &r.targets;
    let mut out = String::new();
    match t.tmem_over_zswap_served {
        Some(x) => {
            let _ = writeln!(
                out,
                "- tmem served {x:.2}x as many pages from memory as zswap (target: at least 1.5x, {}).",
                if x >= 1.5 { "met" } else { "not met" }
            );
        }
        None => out.push_str("- tmem vs zswap: not measured (both modes must run).\n"),
    }
    match t.tmem_over_disk_reads {
        Some(x) => {
            let _ = writeln!(
                out,
                "- tmem read {:.0} % of the pages `disk` read from disk (target: at most 50 %, {}).",
                x * 100.0,
                if x <= 0.5 { "met" } else { "not met" }
            );
        }
        None => out.push_str("- tmem vs disk: not measured (both modes must run).\n"),
    }
    out
}

/// `report.md`.
pub fn markdown(e: &Experiment, r: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Overcommit experiment `{}`\n", e.name);
    if !e.description.is_empty() {
        let _ = writeln!(out, "{}\n", e.description.trim());
    }
    if !r.complete {
        out.push_str(
            "**Incomplete**: stopped before every mode finished; the data so far is below.\n\n",
        );
    }
    let guests: Vec<String> = e
        .guests
        .iter()
        .map(|g| {
            format!(
                "{} ({} RAM, {} vCPU, weight {}{})",
                g.name,
                g.ram,
                g.vcpus,
                g.weight,
                g.quota.map_or(String::new(), |q| format!(", quota {q}"))
            )
        })
        .collect();
    let w = &e.workload;
    let _ = writeln!(
        out,
        "Guests: {}. Host budget {}: with tmem, the daemon's memory limit, shared by weight \
         (incompressible swap pages {}); in the other modes each guest gets an even share ({}) as extra RAM, which its zswap pool \
         (max_pool_percent) or zram device (disksize) may fill, so every mode has the same host \
         memory. Workload `{}`: working set {}, idle set {}, file set {}, {} accesses per set, \
         zipf {}, {} % writes, seed {}. Accelerator: {} (times under TCG are not performance \
         figures: the counts are the result).\n",
        guests.join(", "),
        e.budget,
        match e.tmem.incompressible {
            crate::experiment::Incompressible::Store => "stored raw",
            crate::experiment::Incompressible::Refuse => "refused, to the swap disk",
        },
        crate::experiment::Size(e.share()),
        w.kind.name(),
        w.working_set,
        w.idle_set,
        w.file_set,
        w.ops,
        w.zipf,
        w.write_percent,
        e.seed,
        r.accel
    );
    out.push_str("## All guests\n\n");
    out.push_str(&summary_table(r));
    out.push('\n');
    out.push_str(&targets(r));
    out.push_str(
        "\nPages served from memory: swap-ins from zswap, zram or tmem, and page-cache hits in \
         tmem. Pages read from disk: the swap disk and the data disk, in pages (sectors / 8; swap \
         readahead included). Host bytes per page served: the peak memory holding evicted pages \
         over the pages it served.\n",
    );
    for m in &r.modes {
        let _ = writeln!(
            out,
            "\n## {}{}\n",
            m.mode,
            if m.complete { "" } else { " (incomplete)" }
        );
        out.push_str(
            "| guest | swap-ins from memory | page-cache hits | served from memory | swap-ins from disk \
             | file pages from disk | read from disk | disk reads avoided | peak memory held \
             | bytes per page held | operations | verified |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for c in &m.guests {
            counts_row(&mut out, &c.name, c);
        }
        counts_row(&mut out, "**total**", &m.total);
        for o in m.outcomes.iter().filter(|o| o.verdict != "pass") {
            let _ = writeln!(out, "\n{}: {}", o.name, o.verdict);
        }
    }
    out.push_str("\n## Plots\n\n");
    for (file, title) in PLOTS {
        let _ = writeln!(out, "![{title}]({file}.svg)\n");
    }
    out.push_str(
        "Each plot is also a PNG beside its SVG. The samples are in data.csv (1 s, every guest), \
         the counts in result.json.\n",
    );
    out
}

/// The plots: file stem and title.
pub const PLOTS: &[(&str, &str)] = &[
    ("memory", "Memory holding evicted pages, per guest"),
    ("served", "Pages served from memory, all guests"),
    ("disk_reads", "Pages read from disk, all guests"),
];

/// Fonts tried for the plots' text (the bitmap backend draws glyphs itself).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a sans-serif font once: `LAB_FONT` or the first of [`FONTS`] that exists.
fn font() -> std::result::Result<(), String> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("LAB_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONTS.iter().map(PathBuf::from))
            .collect();
        let path = candidates.iter().find(|p| p.exists()).ok_or_else(|| {
            format!(
                "no font for the plots' text: install fonts-dejavu-core or set LAB_FONT \
                 (tried {})",
                FONTS.join(", ")
            )
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // The font lives as long as the process: plotters keeps a reference.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a usable font", path.display()))
    })
    .clone()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line of a chart.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

/// A chart of `lines` with a title and axis labels into `area`.
fn chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    lines: &[Line],
) -> std::result::Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let x_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.05;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(err)?;
    // Whole seconds and pages; MiB to one decimal.
    let y_fmt = |v: &f64| {
        if y_max < 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        }
    };
    c.configure_mesh()
        .x_desc("seconds")
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&y_fmt)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    for (i, l) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        c.draw_series(LineSeries::new(
            l.points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(err)?
        .label(l.label.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    if !lines.is_empty() {
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// The modes that have samples, in the experiment's order.
fn modes_with_samples(e: &Experiment, samples: &[Sample]) -> Vec<Mode> {
    e.modes
        .iter()
        .copied()
        .filter(|m| samples.iter().any(|s| s.mode == *m))
        .collect()
}

/// Draws plot `which` (a [`PLOTS`] stem) into `root`.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    which: &str,
    e: &Experiment,
    samples: &[Sample],
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let modes = modes_with_samples(e, samples);
    let names: Vec<String> = e.guests.iter().map(|g| g.name.clone()).collect();
    match which {
        "memory" => {
            let panels = root.split_evenly((modes.len().max(1), 1));
            for (m, area) in modes.iter().zip(panels.iter()) {
                let lines: Vec<Line> = names
                    .iter()
                    .map(|g| Line {
                        label: g.clone(),
                        points: samples
                            .iter()
                            .filter(|s| s.mode == *m && s.guest == *g)
                            .map(|s| (s.t, s.held_bytes() as f64 / MIB))
                            .collect(),
                    })
                    .collect();
                chart(
                    area,
                    &format!("{m}: memory holding evicted pages"),
                    "MiB",
                    &lines,
                )?;
            }
        }
        "served" | "disk_reads" => {
            let f: fn(&Sample) -> u64 = if which == "served" {
                Sample::served_from_memory
            } else {
                Sample::disk_read_pages
            };
            let lines: Vec<Line> = modes
                .iter()
                .map(|&m| Line {
                    label: m.to_string(),
                    points: total_over_time(samples, m, &names, f)
                        .into_iter()
                        .map(|(t, v)| (t, v as f64))
                        .collect(),
                })
                .collect();
            let title = if which == "served" {
                "Pages served from memory (all guests, cumulative)"
            } else {
                "Pages read from disk (all guests, cumulative)"
            };
            chart(&root, title, "pages", &lines)?;
        }
        _ => return Err(format!("no plot {which}")),
    }
    root.present().map_err(|e| e.to_string())
}

/// Writes every plot as `DIR/STEM.svg` and `DIR/STEM.png`.
pub fn plots(dir: &Path, e: &Experiment, samples: &[Sample]) -> Result<()> {
    let modes = modes_with_samples(e, samples).len().max(1) as u32;
    for (stem, _) in PLOTS {
        let size = if *stem == "memory" {
            (900, 220 * modes + 20)
        } else {
            (900, 420)
        };
        for ext in ["svg", "png"] {
            let path = dir.join(format!("{stem}.{ext}"));
            let fail = |msg: String| Error::Plot {
                path: path.clone(),
                msg,
            };
            font().map_err(fail)?;
            let drawn = if ext == "svg" {
                draw(
                    SVGBackend::new(&path, size).into_drawing_area(),
                    stem,
                    e,
                    samples,
                )
            } else {
                draw(
                    BitMapBackend::new(&path, size).into_drawing_area(),
                    stem,
                    e,
                    samples,
                )
            };
            drawn.map_err(fail)?;
        }
    }
    Ok(())
}

/// Writes `report.md` and the plots into `dir`.
pub fn write(dir: &Path, e: &Experiment, r: &Results, samples: &[Sample]) -> Result<()> {
    let path = dir.join("report.md");
    std::fs::write(&path, markdown(e, r)).map_err(|source| Error::Write { path, source })?;
    plots(dir, e, samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::tests::sample;
    use crate::series::{compare, mode_result, Outcome};

    fn experiment() -> Experiment {
        Experiment::parse(
            r#"
name = "t"
description = "Two guests take turns."
budget = "64M"
modes = ["disk", "zswap", "tmem"]
[[guest]]
name = "a"
ram = "128M"
quota = "48M"
[[guest]]
name = "b"
ram = "128M"
[workload]
kind = "phase"
"#,
        )
        .unwrap()
    }

    fn data() -> (Results, Vec<Sample>) {
        let g = vec!["a".to_string(), "b".to_string()];
        let mut samples = Vec::new();
        for t in 0..5 {
            let t = t as u64;
            samples.push(sample(
                Mode::Disk,
                "a",
                t as f64,
                &[("vda_rd_sectors", 800 * t)],
            ));
            samples.push(sample(
                Mode::Disk,
                "b",
                t as f64 + 0.5,
                &[("vda_rd_sectors", 400 * t)],
            ));
            samples.push(sample(
                Mode::Zswap,
                "a",
                t as f64,
                &[
                    ("zswpin", 50 * t),
                    ("zswap_pool", t << 20),
                    ("vda_rd_sectors", 400 * t),
                ],
            ));
            samples.push(sample(
                Mode::Zswap,
                "b",
                t as f64,
                &[("zswpin", 10 * t), ("zswap_pool", t << 19)],
            ));
            samples.push(sample(
                Mode::Tmem,
                "a",
                t as f64,
                &[
                    ("tmem_hits", 90 * t),
                    ("daemon_memory_used", t << 21),
                    ("daemon_stored_pages", 100 * t),
                ],
            ));
            samples.push(sample(
                Mode::Tmem,
                "b",
                t as f64,
                &[("tmem_cache_hits", 40 * t), ("daemon_memory_used", t << 20)],
            ));
        }
        let pass = |n: &str| Outcome {
            name: n.into(),
            ops: 10,
            bad: 0,
            verdict: "pass".into(),
        };
        let mut modes: Vec<_> = [Mode::Disk, Mode::Zswap, Mode::Tmem]
            .into_iter()
            .map(|m| mode_result(m, &g, &samples, vec![pass("a"), pass("b")], true, 40.0))
            .collect();
        modes[1].complete = false;
        modes[1].outcomes[1].verdict = "stopped (Ctrl-C)".into();
        let targets = compare(&mut modes);
        (
            Results {
                experiment: "t".into(),
                description: String::new(),
                accel: "tcg".into(),
                complete: false,
                budget_bytes: 64 << 20,
                modes,
                targets,
            },
            samples,
        )
    }

    #[test]
    fn the_report_has_a_table_per_mode_and_the_targets() {
        let (r, _) = data();
        let md = markdown(&experiment(), &r);
        assert!(md.starts_with("# Overcommit experiment `t`\n\nTwo guests take turns."));
        assert!(md.contains("**Incomplete**"));
        for h in [
            "## disk\n",
            "## zswap (incomplete)\n",
            "## tmem\n",
            "## All guests",
        ] {
            assert!(md.contains(h), "{h}");
        }
        // tmem: 360 + 160 pages from memory, none from disk; zswap 200 + 40, and 200 from disk;
        // disk read 400 + 200.
        assert!(md.contains("| tmem | 520 | 0 | 600 |"), "{md}");
        assert!(
            md.contains("| zswap (incomplete) | 240 | 200 | 400 |"),
            "{md}"
        );
        assert!(md.contains(
            "tmem served 2.17x as many pages from memory as zswap (target: at least 1.5x, met)"
        ));
        assert!(md.contains(
            "tmem read 0 % of the pages `disk` read from disk (target: at most 50 %, met)"
        ));
        assert!(md.contains("b: stopped (Ctrl-C)"));
        assert!(
            md.contains("| a | 360 | 0 | 360 | 0 | 0 | 0 | 400 | 8.0 MiB | 20971.5 | 10 | yes |"),
            "{md}"
        );
        assert!(md.contains("![Memory holding evicted pages, per guest](memory.svg)"));
        // Every table row has as many cells as its header.
        for table in md.split("\n\n").filter(|b| b.starts_with('|')) {
            let cells: Vec<usize> = table.lines().map(|l| l.matches('|').count()).collect();
            assert!(cells.iter().all(|c| *c == cells[0]), "{table}");
        }
    }

    #[test]
    fn plots_are_written_as_svg_and_png() {
        let (_, samples) = data();
        let dir = tempfile::tempdir().unwrap();
        plots(dir.path(), &experiment(), &samples).unwrap();
        for (stem, _) in PLOTS {
            let svg = std::fs::read_to_string(dir.path().join(format!("{stem}.svg"))).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.contains("<polyline"),
                "{stem}.svg"
            );
            let png = std::fs::read(dir.path().join(format!("{stem}.png"))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png");
        }
        let memory = std::fs::read_to_string(dir.path().join("memory.svg")).unwrap();
        for m in ["disk: memory", "zswap: memory", "tmem: memory"] {
            assert!(memory.contains(m), "a panel per mode: {m}");
        }
        let served = std::fs::read_to_string(dir.path().join("served.svg")).unwrap();
        for m in ["disk", "zswap", "tmem"] {
            assert!(
                served.contains(&format!("\n{m}\n</text>")),
                "a line per mode: {m}"
            );
        }
    }

    #[test]
    fn a_report_with_no_samples_still_renders() {
        let e = experiment();
        let dir = tempfile::tempdir().unwrap();
        plots(dir.path(), &e, &[]).unwrap();
        let r = Results {
            experiment: "t".into(),
            description: String::new(),
            accel: "tcg".into(),
            complete: false,
            budget_bytes: 1,
            modes: vec![],
            targets: Default::default(),
        };
        let md = markdown(&e, &r);
        assert!(md.contains("tmem vs zswap: not measured"));
    }
}
