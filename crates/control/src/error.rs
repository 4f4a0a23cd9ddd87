//! The control crate's error. One type for every operation on an instance, so the command line
//! can map each kind to its exit code in one place and the daemon can tell an invalid ruleset
//! (keep serving, report it) from a broken host (stop).

use std::path::PathBuf;

use xdpfw_kernel::KernelError;
use xdpfw_rules::{CompileError, RulesError, selftest::SelfTestFailures};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The rules file does not parse or validate (located at file:line:column).
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// The ruleset is valid but the kernel's tables cannot hold it.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The ruleset's own `[[test]]` packets fail (in the kernel, against the inactive buffer).
    #[error("{}: {failures}", file.display())]
    SelfTests { file: PathBuf, failures: SelfTestFailures },
    /// The kernel refused an operation.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The operation does not apply now: nothing attached, already attached, a reload in
    /// progress, a lock held too long, a bad interface name, no such history entry.
    #[error("{0}")]
    Refused(String),
    /// The daemon is stopping; the ruleset was not looked at.
    #[error("stopped before the ruleset was applied")]
    Stopped,
    /// Reading or writing the instance's files.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A state file that does not parse.
    #[error("{what}: {message}")]
    Corrupt { what: String, message: String },
    /// The new ruleset went live, but recording it failed (disk full, …): the kernel serves it.
    #[error("the ruleset went live as generation {}, but recording it failed: {source}", report.generation)]
    LiveButUnrecorded { report: Box<crate::ReloadReport>, source: Box<ControlError> },
}

impl ControlError {
    /// Whether the ruleset itself is unusable (parse, validation, compile limits, failing
    /// self-tests): exit code 3, and nothing was changed.
    pub fn is_invalid_ruleset(&self) -> bool {
        matches!(self, Self::Rules(_) | Self::Compile(_) | Self::SelfTests { .. })
    }

    /// Whether the kernel refused for lack of privileges.
    pub fn is_permission_denied(&self) -> bool {
        match self {
            Self::Kernel(k) => k.is_permission_denied(),
            Self::Io { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
            _ => false,
        }
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

/// `.ctx(|| "what")` on io and JSON results: this crate's `anyhow::Context`.
pub(crate) trait ControlContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> ControlContext<T> for std::result::Result<T, std::io::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| ControlError::Io { what: what(), source })
    }
}

impl<T> ControlContext<T> for std::result::Result<T, serde_json::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| ControlError::Corrupt { what: what(), message: e.to_string() })
    }
}

/// Returns a [`ControlError::Refused`] from the enclosing function.
macro_rules! refuse {
    ($($t:tt)*) => { return Err($crate::error::ControlError::Refused(format!($($t)*))) };
}
pub(crate) use refuse;
