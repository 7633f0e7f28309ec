// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The experiment file: what people write (TOML, every key checked), what it means for each
//! mode (guest RAM, the guest's share of the budget, the daemon's arguments, the workload's
//! arguments), and whether it fits on this machine at all.
//!
//! Every mode gets the same host memory: the guests' RAM plus the budget. With tmem the
//! budget is the daemon's memory limit, shared by weight; in the other modes each guest gets
//! an even share of it as extra RAM, which its zswap pool or zram device may fill (`disk`:
//! plain RAM).

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;
/// Guest RAM below this does not boot the test kernel with room for a workload.
pub const MIN_GUEST_RAM: u64 = 96 * MIB;
/// The smallest budget: a daemon limit or zswap pool smaller than this measures nothing.
pub const MIN_BUDGET: u64 = 4 * MIB;
pub const MAX_GUESTS: usize = 8;
pub const MAX_VCPUS: u32 = 8;

/// A size written `128M`, `1G` or as a number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bytes(u64),
            Text(String),
        }
        match Repr::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a size: \"128M\", \"1G\" or a number of bytes")
        })? {
            Repr::Bytes(b) => Ok(Size(b)),
            Repr::Text(t) => vhost_tmem::size::parse_size(&t)
                .map(Size)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&vhost_tmem::size::format_size(self.0))
    }
}

/// What the guests swap to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Their own swap disk only.
    Disk,
    /// In-guest zswap (lz4) in front of the disk, pool limited to the guest's share.
    Zswap,
    /// In-guest zram swap (lz4) of the guest's share, then the disk.
    Zram,
    /// tmem.ko into the daemon, which holds the whole budget, shared by weight.
    Tmem,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Disk => "disk",
            Mode::Zswap => "zswap",
            Mode::Zram => "zram",
            Mode::Tmem => "tmem",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The built-in workloads (tests/vmtest/guest/labload.c).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An anonymous working set with zipf-distributed accesses.
    Anon,
    /// A file set re-read with zipf-distributed single-page reads (page cache).
    File,
    /// The guests take turns: one grows its working set while the others idle.
    Phase,
    /// The anonymous working set and the file set at once.
    Mixed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Anon => "anon",
            Kind::File => "file",
            Kind::Phase => "phase",
            Kind::Mixed => "mixed",
        }
    }

    /// The workload reads a file set on the guest's ext4 disk.
    pub fn uses_file(self) -> bool {
        matches!(self, Kind::File | Kind::Mixed)
    }
}

/// One guest.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    pub name: String,
    pub ram: Size,
    #[serde(default = "one")]
    pub vcpus: u32,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The daemon's quota for this guest (tmem mode); none if absent or 0.
    #[serde(default)]
    pub quota: Option<Size>,
}

fn one() -> u32 {
    1
}

fn default_weight() -> u32 {
    vhost_tmem::store::DEFAULT_WEIGHT
}

/// The workload every guest runs (each from its own stream of the seed).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub kind: Kind,
    /// The anonymous working set (anon, phase, mixed).
    #[serde(default = "default_ws")]
    pub working_set: Size,
    /// What a guest holds while another grows (phase).
    #[serde(default = "default_idle")]
    pub idle_set: Size,
    /// The file set (file, mixed).
    #[serde(default = "default_file")]
    pub file_set: Size,
    /// Accesses per working set (and per file set).
    #[serde(default = "default_ops")]
    pub ops: u64,
    /// The zipf exponent of the accesses: 0 is uniform, larger is more skewed.
    #[serde(default = "default_zipf")]
    pub zipf: f64,
    /// Accesses that rewrite the page they checked, in percent.
    #[serde(default = "default_write")]
    pub write_percent: u32,
}

fn default_ws() -> Size {
    Size(192 * MIB)
}
fn default_idle() -> Size {
    Size(16 * MIB)
}
fn default_file() -> Size {
    Size(64 * MIB)
}
fn default_ops() -> u64 {
    100_000
}
fn default_zipf() -> f64 {
    0.9
}
fn default_write() -> u32 {
    20
}
fn default_timeout() -> u64 {
    900
}
fn all_modes() -> Vec<Mode> {
    vec![Mode::Disk, Mode::Zswap, Mode::Zram, Mode::Tmem]
}

/// An experiment file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Every workload's random choices and page contents derive from it.
    #[serde(default = "one_u64")]
    pub seed: u64,
    /// Host memory on top of the guests' RAM, the same in every mode.
    pub budget: Size,
    #[serde(default = "all_modes")]
    pub modes: Vec<Mode>,
    /// Seconds a mode may run before its guests are stopped (its data is kept, marked
    /// incomplete).
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    #[serde(rename = "guest")]
    pub guests: Vec<Guest>,
    pub workload: Workload,
    /// The daemon's policies (tmem mode).
    #[serde(default)]
    pub tmem: TmemPolicy,
}

/// What an incompressible swap page does in tmem mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Incompressible {
    /// Stored raw (the daemon's default).
    #[default]
    Store,
    /// Refused: the guest writes it to its swap disk, as zswap does.
    Refuse,
}

/// The `[tmem]` table: the daemon's options that are a policy choice, not a size.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TmemPolicy {
    /// `--persistent-incompressible`.
    #[serde(default)]
    pub incompressible: Incompressible,
}

fn one_u64() -> u64 {
    1
}

/// What this machine offers: checked before anything boots.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    pub memory: u64,
    pub cores: u32,
}

impl Host {
    /// This machine: MemTotal and the CPUs this process may run on.
    pub fn this() -> Host {
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Host { memory, cores }
    }
}

fn invalid(key: impl Into<String>, why: impl Into<String>) -> Error {
    Error::Invalid {
        key: key.into(),
        why: why.into(),
    }
}

/// Names become file names, daemon client names and kernel arguments.
fn check_name(key: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 32
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            key,
            format!("\"{name}\": use 1 to 32 letters, digits, '-' or '_'"),
        ));
    }
    Ok(())
}

fn check_mib(key: &str, s: Size, min: u64) -> Result<()> {
    if !s.0.is_multiple_of(MIB) {
        return Err(invalid(key, format!("{s} is not a whole number of MiB")));
    }
    if s.0 < min {
        return Err(invalid(
            key,
            format!("{s} is below the minimum of {}", Size(min)),
        ));
    }
    Ok(())
}

impl Experiment {
    /// Reads and checks an experiment file.
    pub fn load(path: &Path) -> Result<Experiment> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Experiment::parse(&text).map_err(|e| match e {
            Error::Toml(msg) => Error::File {
                path: path.to_path_buf(),
                msg,
            },
            e => e,
        })
    }

    /// Parses and checks an experiment (the text of a file).
    pub fn parse(text: &str) -> Result<Experiment> {
        let e: Experiment = toml::from_str(text).map_err(|e| Error::Toml(e.to_string()))?;
        e.validate()?;
        Ok(e)
    }

    /// Checks what serde cannot: ranges, names, combinations.
    pub fn validate(&self) -> Result<()> {
        check_name("name", &self.name)?;
        check_mib("budget", self.budget, MIN_BUDGET)?;
        if self.modes.is_empty() {
            return Err(invalid("modes", "names no mode"));
        }
        for (i, m) in self.modes.iter().enumerate() {
            if self.modes[..i].contains(m) {
                return Err(invalid(
                    format!("modes[{i}]"),
                    format!("{m} is listed twice"),
                ));
            }
        }
        if self.timeout_s < 10 {
            return Err(invalid("timeout_s", "must be at least 10"));
        }
        if self.guests.is_empty() || self.guests.len() > MAX_GUESTS {
            return Err(invalid(
                "guest",
                format!(
                    "{} guests: an experiment has 1 to {MAX_GUESTS} [[guest]] tables",
                    self.guests.len()
                ),
            ));
        }
        let share = self.share();
        if !share.is_multiple_of(MIB) || share == 0 {
            return Err(invalid(
                "budget",
                format!(
                    "{} split over {} guests is not a whole number of MiB each",
                    self.budget,
                    self.guests.len()
                ),
            ));
        }
        for (i, g) in self.guests.iter().enumerate() {
            let key = |k: &str| format!("guest[{i}].{k}");
            check_name(&key("name"), &g.name)?;
            if self.guests[..i].iter().any(|o| o.name == g.name) {
                return Err(invalid(
                    key("name"),
                    format!("\"{}\" is used twice", g.name),
                ));
            }
            check_mib(&key("ram"), g.ram, MIN_GUEST_RAM)?;
            if g.vcpus == 0 || g.vcpus > MAX_VCPUS {
                return Err(invalid(
                    key("vcpus"),
                    format!("{} is not in 1..={MAX_VCPUS}", g.vcpus),
                ));
            }
            vhost_tmem::store::check_weight(g.weight)
                .map_err(|e| invalid(key("weight"), e.to_string()))?;
            if let Some(q) = g.quota {
                if q.0 > self.budget.0 {
                    return Err(invalid(
                        key("quota"),
                        format!("{q} is over the budget of {}", self.budget),
                    ));
                }
            }
        }
        let w = &self.workload;
        check_mib("workload.working_set", w.working_set, MIB)?;
        check_mib("workload.idle_set", w.idle_set, MIB)?;
        check_mib("workload.file_set", w.file_set, MIB)?;
        if w.ops == 0 {
            return Err(invalid("workload.ops", "must be at least 1"));
        }
        if !(0.0..=5.0).contains(&w.zipf) {
            return Err(invalid(
                "workload.zipf",
                format!("{} is not in 0.0..=5.0", w.zipf),
            ));
        }
        if w.write_percent > 100 {
            return Err(invalid(
                "workload.write_percent",
                format!("{} is over 100", w.write_percent),
            ));
        }
        if w.kind == Kind::Phase && self.guests.len() < 2 {
            return Err(invalid(
                "workload.kind",
                "phase needs at least two guests (they take turns)",
            ));
        }
        Ok(())
    }

    /// Each guest's even share of the budget (zswap's pool, zram's size, extra RAM).
    pub fn share(&self) -> u64 {
        self.budget.0 / self.guests.len().max(1) as u64
    }

    /// Guest `g`'s RAM in `mode`: the tmem guest keeps its RAM (the budget is the daemon's),
    /// the others get their share of the budget on top.
    pub fn ram(&self, g: &Guest, mode: Mode) -> u64 {
        match mode {
            Mode::Tmem => g.ram.0,
            _ => g.ram.0 + self.share(),
        }
    }

    /// Refuses an experiment this machine cannot hold: every guest's RAM at once plus the
    /// budget over the host's memory, or more vCPUs than 4 per core.
    pub fn check_fits(&self, host: Host) -> Result<()> {
        let need = self
            .modes
            .iter()
            .map(|&m| self.guests.iter().map(|g| self.ram(g, m)).sum::<u64>())
            .max()
            .unwrap_or(0)
            + self.budget.0;
        if need > host.memory {
            return Err(Error::DoesNotFit(format!(
                "the guests' RAM and the budget need {} MiB at once, this machine has {} MiB",
                need / MIB,
                host.memory / MIB
            )));
        }
        let vcpus: u32 = self.guests.iter().map(|g| g.vcpus).sum();
        if vcpus > host.cores * 4 {
            return Err(Error::DoesNotFit(format!(
                "{vcpus} vCPUs at once on {} cores (at most 4 per core)",
                host.cores
            )));
        }
        Ok(())
    }

    /// The daemon's arguments: one client per guest (socket `{dir}/NAME.sock`), the budget as
    /// the memory limit. Other modes start it too (QEMU's device needs a backend), but their
    /// guests never load the driver.
    pub fn daemon_args(&self) -> Vec<String> {
        let mut args = vec!["--memory-limit".to_string(), self.budget.0.to_string()];
        if self.tmem.incompressible == Incompressible::Refuse {
            args.extend(["--persistent-incompressible".into(), "refuse".into()]);
        }
        for g in &self.guests {
            let mut c = format!(
                "name={},socket={{dir}}/{}.sock,weight={}",
                g.name, g.name, g.weight
            );
            if let Some(q) = g.quota.filter(|q| q.0 > 0) {
                c.push_str(&format!(",quota={}", q.0));
            }
            args.push("--client".into());
            args.push(c);
        }
        args
    }

    /// labload's arguments for guest `index`, comma-separated (a kernel argument).
    pub fn workload_args(&self, index: usize) -> String {
        let w = &self.workload;
        format!(
            "workload={},seed={},index={index},guests={},ws_mib={},idle_mib={},file_mib={},ops={},zipf={},write_pct={}",
            w.kind.name(),
            self.seed,
            self.guests.len(),
            w.working_set.0 / MIB,
            w.idle_set.0 / MIB,
            w.file_set.0 / MIB,
            w.ops,
            (w.zipf * 100.0).round() as u64,
            w.write_percent
        )
    }

    /// The lab's kernel arguments for guest `index` in `mode`.
    pub fn cmdline(&self, index: usize, mode: Mode) -> String {
        format!(
            "tmem.scenario=lab lab.mode={mode} lab.share_mib={} lab.args={}",
            self.share() / MIB,
            self.workload_args(index)
        )
    }

    /// Operations a guest does in all: one working set (two in mixed).
    pub fn ops_per_guest(&self) -> u64 {
        match self.workload.kind {
            Kind::Mixed => 2 * self.workload.ops,
            _ => self.workload.ops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
budget = "64M"
[[guest]]
name = "a"
ram = "128M"
weight = 100
quota = "48M"
[[guest]]
name = "b"
ram = "128M"
vcpus = 2
[workload]
kind = "phase"
working_set = "192M"
"#;

    fn err(text: &str) -> String {
        Experiment::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_file_parses_with_defaults() {
        let e = Experiment::parse(GOOD).unwrap();
        assert_eq!(e.modes, all_modes());
        assert_eq!(e.guests[0].quota, Some(Size(48 * MIB)));
        assert_eq!((e.guests[1].vcpus, e.guests[1].weight), (2, 100));
        assert_eq!(e.share(), 32 * MIB);
        assert_eq!(e.ram(&e.guests[0], Mode::Zswap), 160 * MIB);
        assert_eq!(e.ram(&e.guests[0], Mode::Tmem), 128 * MIB);
        assert_eq!(e.workload.ops, 100_000);
        assert_eq!(
            e.daemon_args(),
            [
                "--memory-limit",
                "67108864",
                "--client",
                "name=a,socket={dir}/a.sock,weight=100,quota=50331648",
                "--client",
                "name=b,socket={dir}/b.sock,weight=100"
            ]
        );
        assert_eq!(
            e.cmdline(1, Mode::Zram),
            "tmem.scenario=lab lab.mode=zram lab.share_mib=32 lab.args=workload=phase,seed=1,\
             index=1,guests=2,ws_mib=192,idle_mib=16,file_mib=64,ops=100000,zipf=90,write_pct=20"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err(&GOOD.replace("weight = 100", "wieght = 100"));
        assert!(e.contains("unknown field `wieght`"), "{e}");
        let e = err(&format!("{GOOD}\nbudjet = 1\n"));
        assert!(e.contains("budjet"), "{e}");
        let e = err(&GOOD.replace("kind = \"phase\"", "kind = \"phase\"\nops_ = 3"));
        assert!(e.contains("ops_"), "{e}");
        let e = err(&format!("{GOOD}\n[tmem]\nincompressable = \"refuse\"\n"));
        assert!(e.contains("incompressable"), "{e}");
        let e = err(&format!("{GOOD}\n[tmem]\nincompressible = \"drop\"\n"));
        assert!(e.contains("drop") && e.contains("refuse"), "{e}");
    }

    #[test]
    fn the_tmem_table_sets_the_daemons_policy() {
        let e =
            Experiment::parse(&format!("{GOOD}\n[tmem]\nincompressible = \"refuse\"\n")).unwrap();
        let a = e.daemon_args();
        assert_eq!(a[2..4], ["--persistent-incompressible", "refuse"]);
        // By default the daemon keeps its own default.
        let a = Experiment::parse(GOOD).unwrap().daemon_args();
        assert!(!a.iter().any(|a| a.contains("incompressible")), "{a:?}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (from, to, want) in [
            ("budget = \"64M\"", "budget = \"64X\"", "budget"),
            ("budget = \"64M\"", "budget = \"2M\"", "budget: 2M is below"),
            (
                "budget = \"64M\"",
                "budget = \"63M\"",
                "budget: 63M split over 2",
            ),
            (
                "ram = \"128M\"\nweight",
                "ram = \"64M\"\nweight",
                "guest[0].ram: 64M",
            ),
            ("vcpus = 2", "vcpus = 0", "guest[1].vcpus: 0 is not in"),
            ("weight = 100", "weight = 0", "guest[0].weight"),
            (
                "quota = \"48M\"",
                "quota = \"1G\"",
                "guest[0].quota: 1G is over",
            ),
            (
                "name = \"b\"",
                "name = \"a\"",
                "guest[1].name: \"a\" is used twice",
            ),
            ("name = \"b\"", "name = \"b c\"", "guest[1].name"),
            ("kind = \"phase\"", "kind = \"phaze\"", "phaze"),
            (
                "working_set = \"192M\"",
                "working_set = \"1500K\"",
                "workload.working_set",
            ),
            (
                "kind = \"phase\"",
                "kind = \"anon\"\nzipf = 9.0",
                "workload.zipf",
            ),
            (
                "kind = \"phase\"",
                "kind = \"anon\"\nwrite_percent = 101",
                "workload.write_percent",
            ),
            (
                "budget = \"64M\"",
                "budget = \"64M\"\nmodes = [\"tmem\", \"tmem\"]",
                "modes[1]",
            ),
            (
                "budget = \"64M\"",
                "budget = \"64M\"\nmodes = [\"zsawp\"]",
                "zsawp",
            ),
            (
                "budget = \"64M\"",
                "budget = \"64M\"\ntimeout_s = 1",
                "timeout_s",
            ),
        ] {
            assert!(GOOD.contains(from), "{from}");
            let e = err(&GOOD.replacen(from, to, 1));
            assert!(e.contains(want), "{to}: {e}");
        }
        let e = err("name = \"t\"\nbudget = \"64M\"\n[workload]\nkind = \"anon\"\n");
        assert!(e.contains("guest"), "{e}");
        let one = GOOD
            .split("[[guest]]\nname = \"b\"")
            .next()
            .unwrap()
            .to_string()
            + "[workload]\nkind = \"phase\"\n";
        assert!(err(&one).contains("workload.kind: phase needs"));
    }

    #[test]
    fn experiments_that_cannot_fit_are_refused() {
        let e = Experiment::parse(GOOD).unwrap();
        let big = Host {
            memory: 24 << 30,
            cores: 2,
        };
        e.check_fits(big).unwrap();
        // 2 x (128 + 32) MiB + 64 MiB = 384 MiB.
        let e2 = e.check_fits(Host {
            memory: 383 * MIB,
            ..big
        });
        assert!(
            e2.unwrap_err().to_string().contains("need 384 MiB"),
            "the largest mode's RAM plus the budget"
        );
        e.check_fits(Host {
            memory: 384 * MIB,
            ..big
        })
        .unwrap();
        let mut many = e.clone();
        many.guests[1].vcpus = 8;
        let msg = many
            .check_fits(Host { cores: 2, ..big })
            .unwrap_err()
            .to_string();
        assert!(msg.contains("9 vCPUs at once on 2 cores"), "{msg}");
        many.check_fits(Host { cores: 3, ..big }).unwrap();
    }

    #[test]
    fn the_shipped_experiments_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
        let mut n = 0;
        for f in std::fs::read_dir(&dir).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                Experiment::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(
            n >= 2,
            "experiments/ has the default and the smoke experiment"
        );
    }
}
