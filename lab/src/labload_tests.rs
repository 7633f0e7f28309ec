// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Tests of the guest workload program (tests/vmtest/guest/labload.c), built here with the
//! host's gcc and run natively: its access sequences are a function of the seed, skewed as
//! asked, its workloads verify their data, and its sampler reports every key the lab reads.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::series::{parse_kv, GUEST_KEYS};

/// labload, built once per test process.
fn labload() -> &'static Path {
    static BIN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &BIN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("labload");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vmtest/guest/labload.c");
        let out = Command::new("gcc")
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&bin)
            .arg(&src)
            .arg("-lm")
            .output()
            .expect("gcc");
        assert!(
            out.status.success(),
            "gcc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, bin)
    })
    .1
}

fn labload_out(args: &[&str]) -> (bool, String) {
    let out = Command::new(labload()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The pages and write flags of a trace, and its checksum line.
fn trace(args: &[&str]) -> (Vec<(u64, bool)>, String) {
    let mut all = vec!["trace"];
    all.extend_from_slice(args);
    let (ok, out) = labload_out(&all);
    assert!(ok, "{out}");
    let mut pages = Vec::new();
    let mut sum = String::new();
    for l in out.lines() {
        if let Some(s) = l.strip_prefix("sum ") {
            sum = s.to_string();
        } else {
            let mut w = l.split_whitespace();
            pages.push((w.next().unwrap().parse().unwrap(), w.next() == Some("w")));
        }
    }
    (pages, sum)
}

#[test]
fn the_same_seed_gives_the_same_accesses() {
    let base = ["ws_mib=16", "ops=5000", "seed=7", "index=0", "guests=2"];
    let (a, sa) = trace(&base);
    let (b, sb) = trace(&base);
    assert_eq!(a.len(), 5000);
    assert_eq!((a.clone(), sa.clone()), (b, sb));
    let (c, sc) = trace(&["ws_mib=16", "ops=5000", "seed=8", "index=0", "guests=2"]);
    assert_ne!(sa, sc);
    assert_ne!(a, c);
    // Another guest of the same experiment gets a stream of its own.
    let (d, _) = trace(&["ws_mib=16", "ops=5000", "seed=7", "index=1", "guests=2"]);
    assert_ne!(a, d);
    assert!(a.iter().all(|(p, _)| *p < 16 * 256));
}

#[test]
fn accesses_are_skewed_as_asked() {
    // Share of the accesses that go to the busiest tenth of the pages.
    let top_tenth = |zipf: &str| {
        let (t, _) = trace(&["ws_mib=16", "ops=40000", zipf]);
        let mut count = vec![0u64; 16 * 256];
        for (p, _) in &t {
            count[*p as usize] += 1;
        }
        count.sort_unstable_by(|a, b| b.cmp(a));
        count[..count.len() / 10].iter().sum::<u64>() as f64 / t.len() as f64
    };
    let uniform = top_tenth("zipf=0");
    let skewed = top_tenth("zipf=90");
    let steep = top_tenth("zipf=120");
    assert!(uniform < 0.2, "uniform: the top tenth got {uniform}");
    assert!(skewed > 0.5, "zipf 0.9: the top tenth got {skewed}");
    assert!(
        steep > skewed,
        "zipf 1.2 ({steep}) is steeper than 0.9 ({skewed})"
    );
    // The hot pages are spread over the set, not its first pages.
    let (t, _) = trace(&["ws_mib=16", "ops=2000", "zipf=120"]);
    assert!(t.iter().filter(|(p, _)| *p >= 8 * 256).count() > 200);
}

#[test]
fn writes_come_at_the_asked_rate() {
    let writes = |pct: &str| {
        let (t, _) = trace(&["ws_mib=4", "ops=20000", pct]);
        t.iter().filter(|(_, w)| *w).count()
    };
    assert_eq!(writes("write_pct=0"), 0);
    let w = writes("write_pct=25");
    assert!((4500..5500).contains(&w), "{w} writes of 20000 at 25 %");
    assert_eq!(writes("write_pct=100"), 20000);
}

fn result_line(port: &Path) -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string(port).unwrap();
    let r = text
        .lines()
        .find_map(|l| l.strip_prefix("R "))
        .unwrap_or_else(|| panic!("no result line in {text}"));
    parse_kv(r)
}

#[test]
fn the_anonymous_workload_verifies_and_samples_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("port");
    let p = format!("port={}", port.display());
    let (ok, out) = labload_out(&["run", "workload=anon", "ws_mib=4", "ops=30000", &p]);
    assert!(ok, "{out}");
    assert!(
        out.contains("labload: anon: 30000 operations, 0 bad pages"),
        "{out}"
    );
    let r = result_line(&port);
    assert_eq!((r["ops"], r["bad"], r["ok"]), (30000, 0, 1));
    let text = std::fs::read_to_string(&port).unwrap();
    let samples: Vec<_> = text.lines().filter_map(|l| l.strip_prefix("S ")).collect();
    assert!(!samples.is_empty(), "the sampler's first and last samples");
    let last = parse_kv(samples.last().unwrap());
    for k in GUEST_KEYS {
        // Counters of subsystems this host lacks read as 0, but every key is there.
        if !["zswpin", "zswpout", "zswpwb"].contains(k) {
            assert!(
                last.contains_key(*k),
                "the sampler reports no {k}: {}",
                samples.last().unwrap()
            );
        }
    }
    assert_eq!(last["ops"], 30000);
}

#[test]
fn the_file_workload_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("port");
    let (p, f) = (
        format!("port={}", port.display()),
        format!("file={}", dir.path().join("set").display()),
    );
    let (ok, out) = labload_out(&["run", "workload=file", "file_mib=2", "ops=5000", &p, &f]);
    assert!(ok, "{out}");
    let r = result_line(&port);
    assert_eq!((r["ops"], r["bad"], r["ok"]), (5000, 0, 1));
    assert_eq!(
        std::fs::metadata(dir.path().join("set")).unwrap().len(),
        2 << 20
    );
}

#[test]
fn bad_arguments_are_refused() {
    for args in [
        // A port in every case: one that parsed would otherwise write to this host's ttyS1.
        &["run", "workload=anon", "wsmib=4", "port=/dev/null"][..],
        &["run", "ops=x", "port=/dev/null"],
        &["run", "index=2", "guests=2", "port=/dev/null"],
        &["run", "zipf=900", "port=/dev/null"],
        &["fly", "port=/dev/null"],
    ] {
        let (ok, out) = labload_out(args);
        assert!(!ok, "{args:?}: {out}");
    }
    let (ok, out) = labload_out(&["run", "workload=anon", "wsmib=4", "port=/dev/null"]);
    assert!(!ok && out.contains("unknown key 'wsmib'"), "{out}");
}
