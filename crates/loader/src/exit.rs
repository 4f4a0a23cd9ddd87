//! Errors to exit codes, and output to stdout, in one place.

use std::{
    io::{ErrorKind, Write},
    process::ExitCode,
};

use xdpfw_control::ControlError;
use xdpfw_daemon::DaemonError;
use xdpfw_rules::{CompileError, RulesError, SpecError, selftest::SelfTestFailures};

pub(crate) const INVALID_RULESET: u8 = 3;
pub(crate) const WARNINGS: u8 = 4;
const USAGE: u8 = 2;

/// What a command produced: text for stdout and the exit code.
pub(crate) struct Output {
    pub text: String,
    pub code: u8,
}

impl Output {
    pub(crate) fn ok(text: String) -> Self {
        Self { text, code: 0 }
    }
}

/// A usage error found after clap's parsing (a packet or owner that does not parse, …).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub String);

/// Writes the output. A reader that went away (`loader status --history | head -1`) is not an
/// error: the command has done its work, and the exit code stays the command's.
pub(crate) fn print(out: &Output) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(out.text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::from(out.code),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => ExitCode::from(out.code),
        Err(e) => {
            eprintln!("error: writing the output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` now, for commands that print as they go (`top`). Returns false when the reader
/// went away (`loader top | head`): the command should stop, and that is not an error.
pub(crate) fn print_now(text: &str) -> std::io::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

/// Prints an error and returns its exit code.
pub(crate) fn report(e: &anyhow::Error, mutates: bool) -> ExitCode {
    let code = code_of(e);
    let mut text = String::new();
    if code == INVALID_RULESET {
        // These errors carry their own location (file:line:column or the file).
        text.push_str(&format!("{e}\n"));
        if mutates {
            text.push_str("nothing was changed\n");
        }
    } else {
        text.push_str(&format!("error: {e:#}\n"));
        if permission_denied(e) {
            text.push_str("hint: the firewall's pins and maps need root (CAP_BPF and CAP_NET_ADMIN); try sudo\n");
        }
    }
    // Under journald at priority err, so `journalctl -p err` finds it.
    crate::journal::eprint(crate::journal::ERR, &text);
    ExitCode::from(code)
}

fn code_of(e: &anyhow::Error) -> u8 {
    let invalid = e.downcast_ref::<RulesError>().is_some()
        || e.downcast_ref::<CompileError>().is_some()
        || e.downcast_ref::<SelfTestFailures>().is_some()
        || e.downcast_ref::<ControlError>().is_some_and(ControlError::is_invalid_ruleset)
        || matches!(e.downcast_ref::<DaemonError>(), Some(DaemonError::Control(c)) if c.is_invalid_ruleset());
    if invalid {
        INVALID_RULESET
    } else if e.downcast_ref::<UsageError>().is_some() || e.downcast_ref::<SpecError>().is_some() {
        USAGE
    } else {
        1
    }
}

fn permission_denied(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ControlError>().is_some_and(ControlError::is_permission_denied)
        || e.downcast_ref::<xdpfw_kernel::KernelError>().is_some_and(xdpfw_kernel::KernelError::is_permission_denied)
        || e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == ErrorKind::PermissionDenied))
}
