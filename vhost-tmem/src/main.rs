// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vhost-tmem` command.

use std::process::ExitCode;

use clap::Parser;
use vhost_tmem::config::{Cli, Command, DaemonConfig};
use vhost_tmem::control::{self, Request};

/// Prints an error with its chain of causes.
fn report(e: &dyn std::error::Error) -> ExitCode {
    let mut msg = format!("vhost-tmem: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // Help and version are not errors; every bad option exits 1.
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a log file or the journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match cli.command {
        Some(Command::Stats {
            control,
            prometheus,
        }) => match control::request(&control, &Request::Stats) {
            Ok(r) => {
                let stats = r
                    .stats
                    .unwrap_or_else(|| unreachable!("stats answer carries stats"));
                if prometheus {
                    print!("{}", control::prometheus(&stats));
                } else {
                    match serde_json::to_string_pretty(&stats) {
                        Ok(s) => println!("{s}"),
                        Err(e) => return report(&e),
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => report(&e),
        },
        Some(Command::Ctl { control, action }) => match control::request(&control, &action) {
            Ok(r) => {
                if let Some(v) = r.value {
                    println!("{v}");
                }
                print!("{}", control::describe(&r));
                ExitCode::SUCCESS
            }
            Err(e) => report(&e),
        },
        None => {
            if cli.serve.print_capabilities {
                println!("{{\n  \"type\": \"tmem\"\n}}");
                return ExitCode::SUCCESS;
            }
            let args = cli.serve.clone();
            let cfg = match DaemonConfig::try_from(cli.serve) {
                Ok(c) => c,
                Err(e) => return report(&e),
            };
            match vhost_tmem::daemon::run(cfg, Some(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(&e),
            }
        }
    }
}
