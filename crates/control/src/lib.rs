//! Attached firewall instances and the state the firewall keeps about them: where each lives
//! (pins, runtime state, history), what ruleset it serves, the reload pipeline that changes it
//! and the report of each reload, the history with its snapshots, and the escalation service's
//! published report. Every fallible operation returns a [`ControlError`].

mod delta;
pub mod error;
pub mod escalation;
pub mod files;
pub mod history;
pub mod instance;
pub mod pipeline;
pub mod prune;
pub mod stats;
mod tables_cache;
pub mod trace;

pub use error::{ControlError, Result};
pub use instance::{CarriedCounts, Instance, ReloadReport, ReloadTimes, Retiring, RulesetSummary, State};
pub use pipeline::{
    AttachReport, ReloadOptions, attach, attach_ruleset, detach, empty_ruleset, reload, reload_remote, repair, rollback, rollback_to, set_reset, set_update, validate_pins, SetReport,
};
pub use stats::{RuleCounters, Stats, stats};
