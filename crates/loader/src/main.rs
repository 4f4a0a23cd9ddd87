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
mod journal;
mod render;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = flags::Cli::parse();
    // A daemon's log is its record of what it did: info unless RUST_LOG says otherwise. A
    // command shows warnings (a skipped history line, a failed record) and errors.
    let default = if matches!(cli.command, flags::Command::Run(_)) { "info" } else { "warn" };
    // Under systemd (stderr is journald's stream): syslog priorities, no timestamps.
    journal::init(default);
    let mutates = commands::mutates(&cli.command);
    match commands::run(cli) {
        Ok(out) => exit::print(&out),
        Err(e) => exit::report(&e, mutates),
    }
}
