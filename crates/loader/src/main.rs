//! `loader`: the command line of the XDP firewall.
//!
//! `flags` turns the arguments into typed configs, `commands` runs one small function per
//! subcommand, `render` holds everything printed for people, and `exit` maps every error to its
//! exit code in one place: 0 success, 1 runtime error, 2 usage error, 3 invalid ruleset (parse,
//! validation, compile limits, failing self-tests), 4 warnings under `check --strict`.

mod commands;
mod exit;
mod fleet;
mod flags;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flags::Cli::parse();
    // A daemon's log is its record of what it did: info unless RUST_LOG says otherwise. A
    // command shows warnings (a skipped history line, a failed record) and errors.
    let default = if matches!(cli.command, flags::Command::Run(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    let mutates = commands::mutates(&cli.command);
    match commands::run(cli) {
        Ok(out) => exit::print(&out),
        Err(e) => exit::report(&e, mutates),
    }
}
