// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seeded run: every target over its committed corpus (`fuzz/corpus/<target>/`) plus
//! deterministic pseudo-random inputs and mutations of the corpus, on stable Rust, as part of
//! `cargo test`. It is no fuzzing campaign (no coverage feedback); it keeps the targets
//! building and their oracles passing, and replays every crash ever added to the corpus.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Longest one input may take before it counts as hung.
const WATCHDOG: Duration = Duration::from_secs(60);

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (format!("{}", p.display()), data)
        })
        .collect()
}

/// xorshift64*: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A random input, or a mutation of one or two corpus entries.
fn generate(rng: &mut Rng, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    if seeds.is_empty() || rng.below(3) == 0 {
        let max = if rng.below(4) == 0 { 4096 } else { 512 };
        let len = rng.below(max);
        return (0..len).map(|_| rng.next() as u8).collect();
    }
    let mut d = seeds[rng.below(seeds.len())].1.clone();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(d.len() + 1);
        match rng.below(5) {
            0 if at < d.len() => d[at] ^= 1 << rng.below(8),
            1 if at < d.len() => d[at] = rng.next() as u8,
            2 => d.insert(at, rng.next() as u8),
            3 if at < d.len() => {
                d.remove(at);
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())].1;
                let from = rng.below(other.len() + 1);
                let n = rng.below(other.len() - from + 1);
                d.splice(at..at, other[from..from + n].iter().copied());
            }
        }
    }
    d
}

/// Runs `target` over its corpus and `generated` more inputs; a failure names its input (as
/// hex, to be saved into the corpus and reproduced with `cargo fuzz run`).
fn seeded(target: &'static str, run: fn(&[u8]), generated: usize) {
    // `make test` runs these in release; an unoptimized build gets a tenth of the inputs.
    let generated = if cfg!(debug_assertions) {
        generated / 10
    } else {
        generated
    };
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "fuzz/corpus/{target} holds no seeds");
    let current = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let cur = current.clone();
    std::thread::Builder::new()
        .name(format!("seeded-{target}"))
        .spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
            let inputs = seeds.iter().cloned().chain(
                (0..generated).map(|i| (format!("generated #{i}"), generate(&mut rng, &seeds))),
            );
            for (i, (name, data)) in inputs.enumerate() {
                cur.store(i, Ordering::SeqCst);
                if std::env::var_os("TMEM_FUZZ_TRACE").is_some() {
                    eprintln!("{target} #{i} {name}: {}", hex(&data));
                }
                let r = std::panic::catch_unwind(AssertUnwindSafe(|| run(&data)));
                if r.is_err() {
                    let _ = tx.send(Err(format!("{name}: {}", hex(&data))));
                    return;
                }
            }
            let _ = tx.send(Ok(()));
        })
        .expect("a thread");
    // A watchdog per input: the run as a whole may take long in a debug build.
    let (mut last, mut since) = (usize::MAX, std::time::Instant::now());
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(())) => return,
            Ok(Err(input)) => panic!("target {target} failed on {input}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("target {target}: runner died"),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = current.load(Ordering::SeqCst);
                if now != last {
                    (last, since) = (now, std::time::Instant::now());
                } else if since.elapsed() > WATCHDOG {
                    panic!("target {target} hung on input #{now} (corpus files first)");
                }
            }
        }
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn device_seeded() {
    seeded("device", crate::device::run, 3000);
}

#[test]
fn vhost_user_seeded() {
    // Other tests run in this process meanwhile: their descriptors would upset the count.
    fn run(data: &[u8]) {
        crate::vhost_user::run_with(data, crate::vhost_user::Checks { fds: false });
    }
    seeded("vhost_user", run, 1500);
}

#[test]
fn control_seeded() {
    seeded("control", crate::control::run, 4000);
}

#[test]
fn config_seeded() {
    seeded("config", crate::config::run, 4000);
}

#[test]
fn every_target_has_a_wrapper_and_a_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    for name in crate::TARGETS {
        let wrapper = root.join("fuzz_targets").join(format!("{name}.rs"));
        let text = std::fs::read_to_string(&wrapper)
            .unwrap_or_else(|e| panic!("{}: {e}", wrapper.display()));
        assert!(
            text.contains(&format!("tmem_fuzz::{name}::run")),
            "{} does not run tmem_fuzz::{name}::run",
            wrapper.display()
        );
        assert!(!corpus(name).is_empty(), "no seeds for {name}");
    }
}
