//! Errors of the rules crate that are not located in a rules file: a packet or owner written on
//! a command line ([`SpecError`]), and a ruleset that exceeds a limit of the kernel's tables
//! ([`CompileError`]). Located errors are [`crate::RulesError`].

use std::path::PathBuf;

/// A packet or owner description that does not parse (`"tcp 192.0.2.1:1 -> 192.0.2.2:22"`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

/// A valid ruleset that the kernel's tables cannot hold. Like a parse error, it means the ruleset
/// is unusable (exit code 3), and nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{file}: the {which} prefixes need more than {max} table lines")]
    TooManyLines { file: PathBuf, which: &'static str, max: u32 },
    #[error("{file}: the ruleset needs {needed} distinct rule combinations; the limit is {max}")]
    TooManyBitmaps { file: PathBuf, needed: usize, max: u32 },
    #[error("{file}: {count} {which} prefixes after merging; the limit is {max}")]
    TooManyPrefixes { file: PathBuf, which: &'static str, count: usize, max: u32 },
}

/// `?`-friendly context for spec parsing, in the manner of anyhow's, without the dependency.
pub(crate) trait SpecContext<T> {
    fn spec_err(self, message: impl FnOnce() -> String) -> Result<T, SpecError>;
}

impl<T, E: std::fmt::Display> SpecContext<T> for Result<T, E> {
    fn spec_err(self, message: impl FnOnce() -> String) -> Result<T, SpecError> {
        self.map_err(|e| SpecError(format!("{}: {e}", message())))
    }
}

impl<T> SpecContext<T> for Option<T> {
    fn spec_err(self, message: impl FnOnce() -> String) -> Result<T, SpecError> {
        self.ok_or_else(|| SpecError(message()))
    }
}

/// Returns a [`SpecError`] from the enclosing function.
macro_rules! spec_bail {
    ($($t:tt)*) => { return Err($crate::error::SpecError(format!($($t)*))) };
}

/// Returns a [`SpecError`] when the condition does not hold.
macro_rules! spec_ensure {
    ($cond:expr, $($t:tt)*) => { if !$cond { spec_bail!($($t)*); } };
}

pub(crate) use {spec_bail, spec_ensure};
