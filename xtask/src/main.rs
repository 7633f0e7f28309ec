// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `xtask`: writes the man pages and shell completions of `vhost-tmem` from the same clap
//! definitions the daemon parses its command line with, so they cannot drift from it.
//!
//! A separate program rather than a subcommand of the daemon: the daemon runs sandboxed with
//! guests' memory mapped, and carries no code it does not need to serve them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// Man pages and shell completions of vhost-tmem.
#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Write vhost-tmem.1 and a page per subcommand (vhost-tmem-ctl.1, ...) into DIR.
    Man { dir: PathBuf },
    /// Write the completion script for SHELL to FILE.
    Completion { shell: Shell, file: PathBuf },
}

/// The shells completions are made for.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The `vhost-tmem` command as clap defines it, named as installed.
fn command() -> clap::Command {
    vhost_tmem::config::Cli::command().name("vhost-tmem")
}

/// Writes the man pages (`vhost-tmem.1`, `vhost-tmem-ctl.1`, `vhost-tmem-ctl-quota.1`, ...);
/// returns their paths.
fn man(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let before: Vec<PathBuf> = pages(dir)?;
    clap_mangen::generate_to(command(), dir)?;
    Ok(pages(dir)?
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect())
}

/// The `vhost-tmem*.1` files in `dir`.
fn pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("vhost-tmem") && name.ends_with(".1") {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}

fn completion(shell: Shell, file: &Path) -> std::io::Result<()> {
    if let Some(d) = file.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = std::fs::File::create(file)?;
    let mut cmd = command();
    let name = "vhost-tmem";
    match shell {
        Shell::Bash => clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, name, &mut f),
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, name, &mut f),
        Shell::Fish => clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, name, &mut f),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match &args.task {
        Task::Man { dir } => man(dir).map(|_| ()),
        Task::Completion { shell, file } => completion(*shell, file),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and each of its options, recursively: (page name, command).
    fn commands(cmd: &clap::Command, name: &str, out: &mut Vec<(String, clap::Command)>) {
        out.push((name.to_string(), cmd.clone()));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() != "help" {
                commands(sub, &format!("{name}-{}", sub.get_name()), out);
            }
        }
    }

    /// roff writes `-` as `\-`.
    fn roff(s: &str) -> String {
        s.replace('-', "\\-")
    }

    /// Every option of every command is on that command's page, every subcommand on its
    /// parent's: a new option or command cannot be missing from the manual.
    #[test]
    fn the_man_pages_mention_every_option_and_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let written = man(dir.path()).unwrap();
        let mut all = Vec::new();
        let mut cmd = command();
        cmd.build();
        commands(&cmd, "vhost-tmem", &mut all);
        assert_eq!(written.len(), all.len());
        let mut checked = 0;
        for (name, c) in &all {
            let text = std::fs::read_to_string(dir.path().join(format!("{name}.1")))
                .unwrap_or_else(|e| panic!("{name}.1: {e}"));
            for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = a.get_long() {
                    assert!(
                        text.contains(&roff(&format!("--{long}"))),
                        "{name}.1 does not mention --{long}"
                    );
                    checked += 1;
                }
            }
            for s in c.get_subcommands().filter(|s| !s.is_hide_set()) {
                assert!(
                    text.contains(&roff(s.get_name())),
                    "{name}.1 does not mention {}",
                    s.get_name()
                );
            }
        }
        // The daemon's own options and the control actions' are all there.
        assert!(checked > 25, "{checked}");
        let ctl =
            std::fs::read_to_string(dir.path().join("vhost-tmem-ctl-remove-client.1")).unwrap();
        assert!(ctl.contains("\\-\\-force"), "{ctl}");
    }

    #[test]
    fn completions_know_the_subcommands_and_options() {
        let dir = tempfile::tempdir().unwrap();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let f = dir.path().join(format!("{shell:?}"));
            completion(shell, &f).unwrap();
            let text = std::fs::read_to_string(&f).unwrap();
            for word in [
                "add-client",
                "remove-client",
                "socket-path",
                "control-socket",
            ] {
                assert!(text.contains(word), "{shell:?} completion lacks {word}");
            }
        }
    }
}
