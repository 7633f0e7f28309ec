// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Instruction counts: the store's put/get/flush and the bare codec on the same pages, run
//! under `valgrind --tool=callgrind`. Unlike time, the counts repeat from run to run, so their
//! ratios can find and keep out regressions on a loaded machine.

use std::path::Path;
use std::process::Command;

use vhost_tmem::store::codec::Compressor;

use crate::corpus::Corpus;
use crate::report::InstructionRow;
use crate::store::{self, InProcess, Limits};

/// Errors of the instruction counts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {what}: {source} (is valgrind installed? `make bench-instructions` installs it)")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("callgrind_annotate shows no count for {0}")]
    Missing(&'static str),
    #[error("no corpus named {0}")]
    NoCorpus(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// The counted workloads: (label, the function callgrind charges it to).
const WORKLOADS: [(&str, &str); 5] = [
    ("put", "InProcess::put_all"),
    ("get", "InProcess::get_all"),
    ("flush", "InProcess::flush_all"),
    ("compress", "Limits::compress_all"),
    ("decompress", "Limits::decompress_all"),
];

/// The workload callgrind watches (`--instructions-workload`): one checked, untimed round of
/// the store and of the limits (warm-up), then each counted function once.
pub fn workload(corpus: &Corpus, c: Compressor) -> Result<(), Error> {
    let mut s = InProcess::new(corpus, c)?;
    let mut l = Limits::new(corpus, c)?;
    s.round()?;
    l.round()?;
    s.put_all()?;
    s.get_all()?;
    s.flush_all()?;
    l.compress_all()?;
    l.decompress_all()?;
    Ok(())
}

/// The inclusive instruction count of each function of [`WORKLOADS`] in
/// `callgrind_annotate --inclusive=yes` output, in that order.
pub fn parse(annotate: &str) -> Result<[u64; 5], Error> {
    let mut out = [0; 5];
    for (o, (label, func)) in out.iter_mut().zip(WORKLOADS) {
        // A line: "  1,234,567 (12.34%)  file:tmem_bench::store::InProcess::put_all [binary]".
        let line = annotate
            .lines()
            .find(|l| {
                l.split_whitespace().any(|w| {
                    w.ends_with(&format!("::{func}")) || w.contains(&format!("::{func}::"))
                })
            })
            .ok_or(Error::Missing(label))?;
        let first = line.split_whitespace().next().unwrap_or("");
        *o = first
            .replace(',', "")
            .parse()
            .map_err(|_| Error::Missing(label))?;
    }
    Ok(out)
}

fn run(what: &'static str, cmd: &mut Command) -> Result<String, Error> {
    let o = cmd
        .output()
        .map_err(|source| Error::Spawn { what, source })?;
    if !o.status.success() {
        return Err(Error::Failed {
            what,
            status: o.status,
            stderr: String::from_utf8_lossy(&o.stderr)
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Runs this binary's workload on `corpus` under callgrind (output kept in `dir`) and counts
/// instructions per page.
pub fn measure(
    exe: &Path,
    dir: &Path,
    corpus: &str,
    pages: usize,
    c: Compressor,
) -> Result<InstructionRow, Error> {
    let file = dir.join(format!("callgrind.{corpus}.out"));
    run(
        "valgrind",
        Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", file.display()))
            .arg(exe)
            .arg("--instructions-workload")
            .arg(corpus)
            .arg("--pages")
            .arg(pages.to_string())
            .arg("--compressor")
            .arg(c.to_string()),
    )?;
    let text = run(
        "callgrind_annotate",
        Command::new("callgrind_annotate")
            .arg("--inclusive=yes")
            .arg("--threshold=100")
            .arg(&file),
    )?;
    let [put, get, flush, comp, decomp] = parse(&text)?;
    // The mixed corpus has twice the pages of the others.
    let n = if corpus == "mixed" { 2 * pages } else { pages } as f64;
    Ok(InstructionRow::new(
        &c.to_string(),
        corpus,
        n as u64,
        [put, get, flush, comp, decomp].map(|v| v as f64 / n),
    ))
}

/// The corpus named `name`.
pub fn find<'a>(corpora: &'a [Corpus], name: &str) -> Result<&'a Corpus, Error> {
    corpora
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Error::NoCorpus(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_inclusive_counts() {
        let text = "\
--------------------------------------------------------------------------------
Ir                   file:function
--------------------------------------------------------------------------------
90,000,000 (100.0%)  ???:main [/t/tmem-bench]
 4,000,000 ( 4.44%)  ???:tmem_bench::store::InProcess::put_all [/t/tmem-bench]
 3,100,000 ( 3.44%)  ???:tmem_bench::store::Limits::compress_all [/t/tmem-bench]
 1,000,000 ( 1.11%)  ???:tmem_bench::store::InProcess::get_all [/t/tmem-bench]
   900,000 ( 1.00%)  ???:tmem_bench::store::Limits::decompress_all [/t/tmem-bench]
   200,000 ( 0.22%)  ???:tmem_bench::store::InProcess::flush_all [/t/tmem-bench]
";
        assert_eq!(
            parse(text).unwrap(),
            [4_000_000, 1_000_000, 200_000, 3_100_000, 900_000]
        );
        let cut = text.replace("flush_all", "other");
        assert!(matches!(parse(&cut), Err(Error::Missing("flush"))));
    }
}
