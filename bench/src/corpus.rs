// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Corpora of 4 KiB pages that look like what guests swap and evict.
//!
//! Text, binary and process pages come from this machine (perl and python sources, ELF files,
//! a python process's anonymous memory), so the figures follow real data rather than a
//! generator's. Same-filled pages are kept out of those three (they would never reach a
//! codec) and counted, and the mixed corpus adds them in stated proportions.

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use shared_proto::PAGE_SIZE;
use vhost_tmem::store::codec::same_filled;

/// Errors while building corpora.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not enough pages of one kind on this machine.
    #[error("found only {found} of {wanted} {what} pages on this machine ({hint})")]
    TooFew {
        what: &'static str,
        found: usize,
        wanted: usize,
        hint: &'static str,
    },
    /// The process whose memory is sampled could not be run or read.
    #[error("cannot snapshot a process's memory: {0}")]
    Process(String),
}

/// Pages of one kind.
#[derive(Debug)]
pub struct Corpus {
    /// Short name (`zero`, `same`, `text`, `binary`, `random`, `process`, `mixed`).
    pub name: &'static str,
    /// Where the pages come from.
    pub source: String,
    data: Vec<u8>,
}

impl Corpus {
    /// Page `i`.
    pub fn page(&self, i: usize) -> &[u8] {
        &self.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.data.len() / PAGE_SIZE
    }
}

/// The mixed corpus's proportions, in percent; they sum to 100.
pub const MIX: [(&str, u32); 6] = [
    ("zero", 10),
    ("same", 5),
    ("text", 20),
    ("binary", 25),
    ("process", 30),
    ("random", 10),
];

/// A small deterministic generator (xorshift64*), so every run uses the same pages.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (the seed must not be 0).
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Collects whole pages from the start of files, at most `per_file` per file and `want` in all,
/// skipping same-filled pages; returns the pages and how many files they came from.
fn pages_from_files(files: &[PathBuf], per_file: usize, want: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(want * PAGE_SIZE);
    let mut used = 0;
    let mut buf = vec![0u8; PAGE_SIZE];
    for f in files {
        if out.len() >= want * PAGE_SIZE {
            break;
        }
        let Ok(mut file) = fs::File::open(f) else {
            continue;
        };
        let mut took = 0;
        while took < per_file && out.len() < want * PAGE_SIZE {
            if file.read_exact(&mut buf).is_err() {
                // A file's partial last page is zero-padded in a page cache; skip it here.
                break;
            }
            if same_filled(&buf).is_none() {
                out.extend_from_slice(&buf);
                took += 1;
            }
        }
        used += (took > 0) as usize;
    }
    (out, used)
}

/// Files under `dirs` (recursively, sorted) accepted by `keep`.
fn walk(dirs: &[&str], keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(PathBuf::from).collect();
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries.into_iter().rev() {
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && md.len() >= PAGE_SIZE as u64 && keep(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// Spreads `files` so that a prefix samples the whole list (every k-th file first).
fn spread(files: Vec<PathBuf>, want_files: usize) -> Vec<PathBuf> {
    let k = (files.len() / want_files.max(1)).max(1);
    let mut out = Vec::with_capacity(files.len());
    for start in 0..k {
        out.extend(files.iter().skip(start).step_by(k).cloned());
    }
    out
}

fn text(n: usize) -> Result<Corpus, Error> {
    let files = walk(
        &["/usr/share/perl", "/usr/lib/python3", "/usr/include"],
        &|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("pm" | "pl" | "pod" | "py" | "h")
            )
        },
    );
    let (data, nfiles) = pages_from_files(&spread(files, n / 8), 8, n);
    if data.len() < n * PAGE_SIZE {
        return Err(Error::TooFew {
            what: "text",
            found: data.len() / PAGE_SIZE,
            wanted: n,
            hint: "perl, python and C header sources under /usr/share/perl, /usr/lib/python3, /usr/include",
        });
    }
    Ok(Corpus {
        name: "text",
        source: format!("perl, python and C header sources ({nfiles} files, up to 8 pages each)"),
        data,
    })
}

fn is_elf(p: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn binary(n: usize) -> Result<Corpus, Error> {
    let files = walk(&["/usr/bin", "/usr/lib/x86_64-linux-gnu"], &is_elf);
    let (data, nfiles) = pages_from_files(&spread(files, n / 16), 16, n);
    if data.len() < n * PAGE_SIZE {
        return Err(Error::TooFew {
            what: "binary",
            found: data.len() / PAGE_SIZE,
            wanted: n,
            hint: "ELF files under /usr/bin and /usr/lib/x86_64-linux-gnu",
        });
    }
    Ok(Corpus {
        name: "binary",
        source: format!("ELF executables and libraries ({nfiles} files, up to 16 pages each)"),
        data,
    })
}

/// A python program that builds a heap like a real service's: parsed JSON, dicts, strings,
/// numbers, lists, bytecode of imported modules.
const PY_WORKLOAD: &str = r#"
import json, email.parser, decimal, collections, http.client, xml.dom.minidom, sys
recs = []
for i in range(120000):
    recs.append({"id": i, "name": "user%06d" % i, "score": i * 0.37, "tags": ["t%d" % (i % 17), "g%d" % (i % 5)],
                 "addr": {"city": ["Paris", "Lima", "Oslo", "Pune"][i % 4], "zip": str(10000 + i % 9000)}})
blob = json.dumps(recs[:20000])
back = json.loads(blob)
counts = collections.Counter(r["tags"][0] for r in recs)
nums = [decimal.Decimal(i) / 7 for i in range(20000)]
print("ready", flush=True)
sys.stdin.read()
"#;

fn process(n: usize) -> Result<Corpus, Error> {
    let mut child = Command::new("python3")
        .args(["-c", PY_WORKLOAD])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Process(format!("cannot run python3: {e}")))?;
    let result = (|| {
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| Error::Process(e.to_string()))?;
        if line.trim() != "ready" {
            return Err(Error::Process("python3 did not start its workload".into()));
        }
        snapshot(child.id(), n)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Reads the anonymous writable mappings of `pid` through /proc; keeps `n` pages spread evenly
/// over those that are not same-filled.
fn snapshot(pid: u32, n: usize) -> Result<Corpus, Error> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| Error::Process(format!("/proc/{pid}/maps: {e}")))?;
    let mut mem = fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| Error::Process(format!("/proc/{pid}/mem: {e}")))?;
    let mut pages = Vec::new();
    let mut same = 0usize;
    let mut buf = vec![0u8; PAGE_SIZE];
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let anon = f.len() < 6 || f[5] == "[heap]";
        if f.len() < 5 || !f[1].starts_with("rw") || !anon {
            continue;
        }
        let Some((a, b)) = f[0].split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let mut at = a;
        while at < b {
            if mem.seek(SeekFrom::Start(at)).is_ok() && mem.read_exact(&mut buf).is_ok() {
                if same_filled(&buf).is_some() {
                    same += 1;
                } else {
                    pages.extend_from_slice(&buf);
                }
            }
            at += PAGE_SIZE as u64;
        }
    }
    let total = pages.len() / PAGE_SIZE;
    if total < n {
        return Err(Error::TooFew {
            what: "process",
            found: total,
            wanted: n,
            hint: "anonymous memory of a python3 process",
        });
    }
    let mut data = Vec::with_capacity(n * PAGE_SIZE);
    for i in 0..n {
        let j = i * total / n;
        data.extend_from_slice(&pages[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]);
    }
    Ok(Corpus {
        name: "process",
        source: format!(
            "anonymous memory of a python3 process holding parsed JSON records: {} MiB read, \
             {:.1} % of its pages same-filled (left out), {n} of the other {total} pages kept",
            ((total + same) * PAGE_SIZE) >> 20,
            same as f64 * 100.0 / (total + same).max(1) as f64
        ),
        data,
    })
}

/// Builds every corpus with `n` pages each (the mixed one with `2 n`).
pub fn build(n: usize) -> Result<Vec<Corpus>, Error> {
    let mut out = vec![Corpus {
        name: "zero",
        source: "zero-filled pages".into(),
        data: vec![0u8; n * PAGE_SIZE],
    }];
    let mut rng = Rng::new(0x5eed);
    let mut same = Vec::with_capacity(n * PAGE_SIZE);
    for _ in 0..n {
        // Patterns seen in real memory: a repeated byte, or a repeated word (e.g. poison).
        let w = match rng.below(3) {
            0 => 0x0101_0101_0101_0101u64 * (rng.below(255) as u64 + 1),
            1 => u64::MAX,
            _ => rng.next_u64(),
        };
        same.extend(std::iter::repeat_n(w.to_ne_bytes(), PAGE_SIZE / 8).flatten());
    }
    out.push(Corpus {
        name: "same",
        source: "same-filled pages (a repeated byte or 8-byte word, not zero)".into(),
        data: same,
    });
    out.push(text(n)?);
    out.push(binary(n)?);
    let mut random = Vec::with_capacity(n * PAGE_SIZE);
    for _ in 0..n * PAGE_SIZE / 8 {
        random.extend_from_slice(&rng.next_u64().to_ne_bytes());
    }
    out.push(Corpus {
        name: "random",
        source: "pseudo-random bytes (incompressible)".into(),
        data: random,
    });
    out.push(process(n)?);
    out.push(mixed(&out, 2 * n, &mut rng));
    Ok(out)
}

fn mixed(parts: &[Corpus], n: usize, rng: &mut Rng) -> Corpus {
    let mut picks = Vec::with_capacity(n);
    for (name, pct) in MIX {
        let c = parts
            .iter()
            .find(|c| c.name == name)
            .expect("every part is built");
        let k = n * pct as usize / 100;
        picks.extend((0..k).map(|i| c.page(i % c.len())));
    }
    // Fisher-Yates, so kinds interleave as they would in a guest's swap stream.
    for i in (1..picks.len()).rev() {
        let j = rng.below(i + 1);
        picks.swap(i, j);
    }
    let desc: Vec<String> = MIX.iter().map(|(k, p)| format!("{p} % {k}")).collect();
    Corpus {
        name: "mixed",
        source: format!("shuffled mix: {}", desc.join(", ")),
        data: picks.concat(),
    }
}
