// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The measurements: 1 s samples from every guest (its sampler's counters, joined with the
//! daemon's statistics of its client at the time the sample arrived), written as
//! `data.csv`, and the headline counts per guest and mode, written as `result.json`.
//!
//! Under TCG times are inflated, so the headline figures are counts: pages brought back from
//! memory (zswap, zram, tmem) or from disk (swap and file reads), what each mode saved against
//! `disk`, and what the memory holding evicted pages cost per page it served.

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::experiment::Mode;

/// What a guest's sampler reports (labload.c `sample()`): cumulative counters and gauges.
pub const GUEST_KEYS: &[&str] = &[
    "ops",
    "phase",
    "active",
    "bad",
    "pswpin",
    "pswpout",
    "pgmajfault",
    "zswpin",
    "zswpout",
    "zswpwb",
    "MemFree",
    "Cached",
    "AnonPages",
    "SwapTotal",
    "SwapFree",
    "zswap_pool",
    "zswap_pages",
    "zram_orig",
    "zram_compr",
    "zram_mem",
    "zram_rd_sectors",
    "vda_rd_ios",
    "vda_rd_sectors",
    "vdb_rd_ios",
    "vdb_rd_sectors",
    "tmem_puts",
    "tmem_puts_refused",
    "tmem_gets",
    "tmem_hits",
    "tmem_cache_puts",
    "tmem_cache_gets",
    "tmem_cache_hits",
    "tmem_failures",
];

/// The daemon's statistics of the guest's client (`vhost-tmem ctl stats`), and the JSON key
/// each comes from.
pub const DAEMON_KEYS: &[(&str, &str)] = &[
    ("daemon_memory_used", "memory_used"),
    ("daemon_stored_pages", "stored_pages"),
    ("daemon_puts", "puts"),
    ("daemon_get_hits", "get_hits"),
    ("daemon_evictions", "evictions"),
];

/// Columns computed from the others (see [`Sample::served_from_memory`] and friends).
pub const DERIVED_KEYS: &[&str] = &[
    "held_bytes",
    "held_pages",
    "served_from_memory",
    "disk_read_pages",
];

/// One sample of one guest.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub mode: Mode,
    pub guest: String,
    /// Seconds since the mode's guests started, when the sample reached the host.
    pub t: f64,
    pub values: BTreeMap<String, u64>,
}

impl Sample {
    fn v(&self, k: &str) -> u64 {
        self.values.get(k).copied().unwrap_or(0)
    }

    /// Pages brought back from memory: zswap loads, zram reads, tmem swap and page-cache hits.
    pub fn served_from_memory(&self) -> u64 {
        self.v("zswpin") + self.v("zram_rd_sectors") / 8 + self.swap_tmem() + self.cache_tmem()
    }

    fn swap_tmem(&self) -> u64 {
        self.v("tmem_hits")
    }

    fn cache_tmem(&self) -> u64 {
        self.v("tmem_cache_hits")
    }

    /// Pages read from the swap disk (vda) and the data disk (vdb).
    pub fn disk_read_pages(&self) -> u64 {
        (self.v("vda_rd_sectors") + self.v("vdb_rd_sectors")) / 8
    }

    /// Memory holding this guest's evicted pages: the daemon's charge for its client, the
    /// zswap pool, or zram's memory (in-guest, within the guest's share).
    pub fn held_bytes(&self) -> u64 {
        match self.mode {
            Mode::Disk => 0,
            Mode::Zswap => self.v("zswap_pool"),
            Mode::Zram => self.v("zram_mem"),
            Mode::Tmem => self.v("daemon_memory_used"),
        }
    }

    /// Pages held there.
    pub fn held_pages(&self) -> u64 {
        match self.mode {
            Mode::Disk => 0,
            Mode::Zswap => self.v("zswap_pages"),
            Mode::Zram => self.v("zram_orig") / 4096,
            Mode::Tmem => self.v("daemon_stored_pages"),
        }
    }

    fn derived(&self, k: &str) -> u64 {
        match k {
            "held_bytes" => self.held_bytes(),
            "held_pages" => self.held_pages(),
            "served_from_memory" => self.served_from_memory(),
            "disk_read_pages" => self.disk_read_pages(),
            _ => 0,
        }
    }
}

/// Parses a sampler line's `k=v` words (after the `S`); words that are not that are skipped.
pub fn parse_kv(line: &str) -> BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// Writes `data.csv`: one row per sample, every column of every mode (0 where a mode has no
/// such counter).
pub fn write_csv(out: &mut impl Write, samples: &[Sample]) -> std::io::Result<()> {
    write!(out, "mode,guest,t_s")?;
    for k in GUEST_KEYS
        .iter()
        .chain(DAEMON_KEYS.iter().map(|(k, _)| k))
        .chain(DERIVED_KEYS)
    {
        write!(out, ",{k}")?;
    }
    writeln!(out)?;
    for s in samples {
        write!(out, "{},{},{:.1}", s.mode, s.guest, s.t)?;
        for k in GUEST_KEYS.iter().chain(DAEMON_KEYS.iter().map(|(k, _)| k)) {
            write!(out, ",{}", s.v(k))?;
        }
        for k in DERIVED_KEYS {
            write!(out, ",{}", s.derived(k))?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// How one guest's run ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub name: String,
    /// Operations its workload did (its result line, else its last sample).
    pub ops: u64,
    /// Pages that did not verify.
    pub bad: u64,
    /// `pass`, or why not (FAIL text, no result, a kernel report, stopped).
    pub verdict: String,
}

/// The headline counts of one guest, or of all of a mode's guests (`name` = `total`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub name: String,
    pub ops: u64,
    pub verified: bool,
    /// Swapped-out pages brought back from memory (zswap, zram, tmem).
    pub swap_in_memory: u64,
    /// Clean file pages brought back from memory (tmem's page cache).
    pub cache_in_memory: u64,
    pub served_from_memory: u64,
    /// Pages read from the swap disk.
    pub swap_in_disk: u64,
    /// Pages read from the data disk (the file set).
    pub file_in_disk: u64,
    pub served_from_disk: u64,
    /// `disk`'s disk reads minus this mode's (when the experiment ran `disk`).
    pub disk_reads_avoided: Option<i64>,
    /// Most memory holding evicted pages at once (daemon, zswap pool, zram).
    pub peak_held_bytes: u64,
    /// Pages held at that moment.
    pub pages_held_at_peak: u64,
    /// `peak_held_bytes / pages_held_at_peak`: what a page kept in memory cost.
    pub host_bytes_per_page_held: Option<f64>,
    /// `peak_held_bytes / served_from_memory`: memory spent per page it served.
    pub host_bytes_per_page_served: Option<f64>,
}

/// One mode's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModeResult {
    pub mode: Mode,
    /// Every guest finished and verified within the time limit.
    pub complete: bool,
    pub seconds: f64,
    pub outcomes: Vec<Outcome>,
    pub guests: Vec<Counts>,
    pub total: Counts,
}

/// The targets, computed when the modes they compare ran.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    /// tmem's pages served from memory over zswap's (target: at least 1.5).
    pub tmem_over_zswap_served: Option<f64>,
    /// tmem's disk reads over disk's (target: at most 0.5).
    pub tmem_over_disk_reads: Option<f64>,
}

/// `result.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub experiment: String,
    pub description: String,
    pub accel: String,
    /// Every mode ran to the end (false after Ctrl-C or a timeout).
    pub complete: bool,
    pub budget_bytes: u64,
    pub modes: Vec<ModeResult>,
    pub targets: Targets,
}

fn div(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| (a as f64 / b as f64 * 10.0).round() / 10.0)
}

/// The sum over `guests` at each whole second of `f` of each guest's latest sample.
pub fn total_over_time(
    samples: &[Sample],
    mode: Mode,
    guests: &[String],
    f: impl Fn(&Sample) -> u64,
) -> Vec<(f64, u64)> {
    let mine: Vec<&Sample> = samples.iter().filter(|s| s.mode == mode).collect();
    let end = mine.iter().map(|s| s.t).fold(0.0, f64::max).ceil() as u64;
    let mut latest = vec![0u64; guests.len()];
    let mut i = 0;
    let mut out = Vec::new();
    for sec in 0..=end {
        while i < mine.len() && mine[i].t <= sec as f64 {
            if let Some(g) = guests.iter().position(|g| *g == mine[i].guest) {
                latest[g] = f(mine[i]);
            }
            i += 1;
        }
        out.push((sec as f64, latest.iter().sum()));
    }
    out
}

/// The counts of one guest from its samples (in arrival order).
fn guest_counts(name: &str, samples: &[&Sample], outcome: Option<&Outcome>) -> Counts {
    let last = samples.last();
    let v = |k: &str| last.map_or(0, |s| s.v(k));
    let peak = samples.iter().max_by_key(|s| s.held_bytes());
    let peak_held_bytes = peak.map_or(0, |s| s.held_bytes());
    let pages_held_at_peak = peak.map_or(0, |s| s.held_pages());
    let served_from_memory = last.map_or(0, |s| s.served_from_memory());
    let swap_in_disk = v("vda_rd_sectors") / 8;
    let file_in_disk = v("vdb_rd_sectors") / 8;
    Counts {
        name: name.to_string(),
        ops: outcome.map_or(v("ops"), |o| o.ops.max(v("ops"))),
        verified: outcome.is_some_and(|o| o.verdict == "pass" && o.bad == 0),
        swap_in_memory: v("zswpin") + v("zram_rd_sectors") / 8 + v("tmem_hits"),
        cache_in_memory: v("tmem_cache_hits"),
        served_from_memory,
        swap_in_disk,
        file_in_disk,
        served_from_disk: swap_in_disk + file_in_disk,
        disk_reads_avoided: None,
        peak_held_bytes,
        pages_held_at_peak,
        host_bytes_per_page_held: div(peak_held_bytes, pages_held_at_peak),
        host_bytes_per_page_served: div(peak_held_bytes, served_from_memory),
    }
}

/// A mode's counts per guest and in total.
pub fn mode_result(
    mode: Mode,
    guests: &[String],
    samples: &[Sample],
    outcomes: Vec<Outcome>,
    complete: bool,
    seconds: f64,
) -> ModeResult {
    let counts: Vec<Counts> = guests
        .iter()
        .map(|g| {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.mode == mode && s.guest == *g)
                .collect();
            guest_counts(g, &mine, outcomes.iter().find(|o| o.name == *g))
        })
        .collect();
    let sum = |f: fn(&Counts) -> u64| counts.iter().map(f).sum::<u64>();
    let held = total_over_time(samples, mode, guests, Sample::held_bytes);
    let pages = total_over_time(samples, mode, guests, Sample::held_pages);
    let (peak_at, peak_held_bytes) = held
        .iter()
        .enumerate()
        .max_by_key(|(_, (_, b))| *b)
        .map_or((0, 0), |(i, (_, b))| (i, *b));
    let pages_held_at_peak = pages.get(peak_at).map_or(0, |p| p.1);
    let served_from_memory = sum(|c| c.served_from_memory);
    let total = Counts {
        name: "total".into(),
        ops: sum(|c| c.ops),
        verified: !counts.is_empty() && counts.iter().all(|c| c.verified),
        swap_in_memory: sum(|c| c.swap_in_memory),
        cache_in_memory: sum(|c| c.cache_in_memory),
        served_from_memory,
        swap_in_disk: sum(|c| c.swap_in_disk),
        file_in_disk: sum(|c| c.file_in_disk),
        served_from_disk: sum(|c| c.served_from_disk),
        disk_reads_avoided: None,
        peak_held_bytes,
        pages_held_at_peak,
        host_bytes_per_page_held: div(peak_held_bytes, pages_held_at_peak),
        host_bytes_per_page_served: div(peak_held_bytes, served_from_memory),
    };
    ModeResult {
        mode,
        complete,
        seconds: (seconds * 10.0).round() / 10.0,
        outcomes,
        guests: counts,
        total,
    }
}

/// Fills in what needs more than one mode: disk reads avoided against `disk`, the targets.
pub fn compare(modes: &mut [ModeResult]) -> Targets {
    let find = |modes: &[ModeResult], m: Mode| modes.iter().find(|r| r.mode == m).cloned();
    if let Some(disk) = find(modes, Mode::Disk) {
        for r in modes.iter_mut() {
            for c in r.guests.iter_mut() {
                if let Some(d) = disk.guests.iter().find(|d| d.name == c.name) {
                    c.disk_reads_avoided =
                        Some(d.served_from_disk as i64 - c.served_from_disk as i64);
                }
            }
            r.total.disk_reads_avoided =
                Some(disk.total.served_from_disk as i64 - r.total.served_from_disk as i64);
        }
    }
    let ratio = |a: u64, b: u64| (b > 0).then(|| (a as f64 / b as f64 * 100.0).round() / 100.0);
    let tmem = find(modes, Mode::Tmem);
    Targets {
        tmem_over_zswap_served: tmem
            .as_ref()
            .zip(find(modes, Mode::Zswap))
            .and_then(|(t, z)| ratio(t.total.served_from_memory, z.total.served_from_memory)),
        tmem_over_disk_reads: tmem
            .as_ref()
            .zip(find(modes, Mode::Disk))
            .and_then(|(t, d)| ratio(t.total.served_from_disk, d.total.served_from_disk)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(mode: Mode, guest: &str, t: f64, kv: &[(&str, u64)]) -> Sample {
        Sample {
            mode,
            guest: guest.into(),
            t,
            values: kv.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn sampler_lines_parse() {
        let m = parse_kv("t_ms=12 ops=300 pswpin=4 junk zswap_pool=x MemFree=10");
        assert_eq!(m.len(), 4);
        assert_eq!((m["ops"], m["pswpin"], m["MemFree"]), (300, 4, 10));
    }

    #[test]
    fn csv_has_every_column_and_a_row_per_sample() {
        let s = vec![
            sample(
                Mode::Zram,
                "a",
                1.04,
                &[
                    ("ops", 5),
                    ("zram_rd_sectors", 80),
                    ("zram_mem", 4096),
                    ("zram_orig", 8192),
                ],
            ),
            sample(
                Mode::Tmem,
                "b",
                2.0,
                &[
                    ("tmem_hits", 3),
                    ("tmem_cache_hits", 4),
                    ("daemon_memory_used", 77),
                    ("vda_rd_sectors", 16),
                    ("vdb_rd_sectors", 8),
                ],
            ),
        ];
        let mut out = Vec::new();
        write_csv(&mut out, &s).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let header: Vec<&str> = lines[0].split(',').collect();
        assert_eq!(
            header.len(),
            3 + GUEST_KEYS.len() + DAEMON_KEYS.len() + DERIVED_KEYS.len()
        );
        let col = |row: usize, name: &str| -> String {
            let i = header.iter().position(|h| *h == name).unwrap();
            lines[row].split(',').nth(i).unwrap().to_string()
        };
        assert_eq!(
            (col(1, "mode"), col(1, "guest"), col(1, "t_s")),
            ("zram".into(), "a".into(), "1.0".into())
        );
        assert_eq!(col(1, "ops"), "5");
        assert_eq!(col(1, "served_from_memory"), "10");
        assert_eq!(
            (col(1, "held_bytes"), col(1, "held_pages")),
            ("4096".into(), "2".into())
        );
        assert_eq!(col(2, "served_from_memory"), "7");
        assert_eq!(col(2, "disk_read_pages"), "3");
        assert_eq!(col(2, "held_bytes"), "77");
        assert_eq!(col(2, "pswpin"), "0", "a counter the guest did not report");
        for l in &lines {
            assert_eq!(l.split(',').count(), header.len());
        }
    }

    fn two_modes() -> Vec<ModeResult> {
        let g = vec!["a".to_string(), "b".to_string()];
        let pass = |n: &str, ops| Outcome {
            name: n.into(),
            ops,
            bad: 0,
            verdict: "pass".into(),
        };
        let disk = vec![
            sample(
                Mode::Disk,
                "a",
                1.0,
                &[("ops", 10), ("vda_rd_sectors", 800)],
            ),
            sample(
                Mode::Disk,
                "b",
                1.5,
                &[("ops", 10), ("vda_rd_sectors", 400)],
            ),
        ];
        let tmem = vec![
            sample(
                Mode::Tmem,
                "a",
                0.5,
                &[("daemon_memory_used", 1000), ("daemon_stored_pages", 10)],
            ),
            sample(
                Mode::Tmem,
                "b",
                0.7,
                &[("daemon_memory_used", 3000), ("daemon_stored_pages", 20)],
            ),
            sample(
                Mode::Tmem,
                "a",
                1.2,
                &[
                    ("ops", 10),
                    ("tmem_hits", 90),
                    ("vda_rd_sectors", 80),
                    ("daemon_memory_used", 500),
                    ("daemon_stored_pages", 5),
                ],
            ),
            sample(
                Mode::Tmem,
                "b",
                1.9,
                &[
                    ("ops", 10),
                    ("tmem_hits", 40),
                    ("tmem_cache_hits", 10),
                    ("vda_rd_sectors", 40),
                ],
            ),
        ];
        let mut modes = vec![
            mode_result(
                Mode::Disk,
                &g,
                &disk,
                vec![pass("a", 10), pass("b", 10)],
                true,
                10.04,
            ),
            mode_result(
                Mode::Tmem,
                &g,
                &tmem,
                vec![pass("a", 10), pass("b", 7)],
                true,
                12.0,
            ),
        ];
        let t = compare(&mut modes);
        assert_eq!(t.tmem_over_zswap_served, None, "no zswap mode");
        assert_eq!(t.tmem_over_disk_reads, Some(0.1), "15 of 150 pages");
        modes
    }

    #[test]
    fn headline_counts() {
        let modes = two_modes();
        let (disk, tmem) = (&modes[0], &modes[1]);
        assert_eq!(disk.seconds, 10.0);
        assert_eq!(disk.total.served_from_disk, 150);
        assert_eq!(disk.total.served_from_memory, 0);
        assert_eq!(disk.total.host_bytes_per_page_served, None);
        let a = &tmem.guests[0];
        assert_eq!(
            (a.swap_in_memory, a.served_from_memory, a.served_from_disk),
            (90, 90, 10)
        );
        assert_eq!(a.disk_reads_avoided, Some(90));
        assert_eq!((a.peak_held_bytes, a.pages_held_at_peak), (1000, 10));
        assert_eq!(a.host_bytes_per_page_held, Some(100.0));
        let b = &tmem.guests[1];
        assert_eq!((b.cache_in_memory, b.served_from_memory), (10, 50));
        assert_eq!(
            b.ops, 10,
            "the larger of the result line and the last sample"
        );
        assert!(a.verified && b.verified && tmem.total.verified);
        // At second 1 both guests' latest samples hold 1000 + 3000 bytes: the peak together.
        assert_eq!(tmem.total.peak_held_bytes, 4000);
        assert_eq!(tmem.total.pages_held_at_peak, 30);
        assert_eq!(tmem.total.served_from_memory, 140);
        assert_eq!(tmem.total.disk_reads_avoided, Some(135));
        assert_eq!(tmem.total.host_bytes_per_page_served, Some(28.6));
    }

    #[test]
    fn results_json_round_trips() {
        let r = Results {
            experiment: "t".into(),
            description: String::new(),
            accel: "tcg".into(),
            complete: false,
            budget_bytes: 1 << 26,
            targets: Targets::default(),
            modes: two_modes(),
        };
        let text = serde_json::to_string_pretty(&r).unwrap();
        assert!(text.contains("\"mode\": \"tmem\""));
        assert!(text.contains("\"served_from_memory\": 140"));
        let back: Results = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_failed_or_missing_guest_is_not_verified() {
        let g = vec!["a".to_string()];
        let s = vec![sample(Mode::Zswap, "a", 1.0, &[("ops", 3)])];
        let r = mode_result(Mode::Zswap, &g, &s, vec![], false, 1.0);
        assert!(!r.guests[0].verified && !r.total.verified);
        assert_eq!(r.guests[0].ops, 3);
        let bad = Outcome {
            name: "a".into(),
            ops: 3,
            bad: 1,
            verdict: "pass".into(),
        };
        let r = mode_result(Mode::Zswap, &g, &s, vec![bad], true, 1.0);
        assert!(!r.guests[0].verified);
    }
}
