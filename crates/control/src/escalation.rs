//! What the escalation service (in `loader run`) publishes about itself: a report in the
//! instance's runtime folder, rewritten every second, so `loader status` and `loader stats` can
//! tell whether escalation is served and how it is doing.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Instance, files};

/// What the service has done, for `loader stats`, `loader status` and the metrics.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Events read from the ring buffer.
    pub events: u64,
    pub decided_pass: u64,
    pub decided_drop: u64,
    /// Decided without an owner: no socket receives the flow.
    pub no_socket: u64,
    /// Decided with the socket's uid only: its process had exited.
    pub process_gone: u64,
    /// Not decided: the owner lookup ran out of time.
    pub lookup_timeouts: u64,
    /// Not decided: the source address was over its rate.
    pub source_limited: u64,
    /// Not decided: the event was for a generation no longer active.
    pub stale: u64,
    /// Not decided: an error (logged).
    pub errors: u64,
}

/// The service's published state: written to `escalation.json` in the instance's state folder
/// every second, so `loader status` and `loader stats` can tell whether escalation is served.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub pid: u32,
    pub started_at: u64,
    pub updated_at: u64,
    pub counters: Counters,
    /// Decision latency (from the kernel's event to the verdict in place), recent decisions.
    pub latency_p50_us: Option<f64>,
    pub latency_p99_us: Option<f64>,
    pub latency_samples: usize,
    pub sources_tracked: usize,
}

/// Whether escalation is served on `inst`, as `loader status` reports it.
pub fn served(inst: &Instance) -> Option<Report> {
    let r: Report = serde_json::from_str(&std::fs::read_to_string(report_path(inst)).ok()?).ok()?;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid as i32), None).is_ok();
    (alive && files::now_secs().saturating_sub(r.updated_at) <= 5).then_some(r)
}

pub fn report_path(inst: &Instance) -> PathBuf {
    inst.state_dir.join("escalation.json")
}


/// Publishes `report` for readers (atomically; a failure only costs readers a fresher report).
pub fn publish(inst: &Instance, report: &Report) {
    if let Ok(bytes) = serde_json::to_vec_pretty(report) {
        let _ = files::atomic_write(&report_path(inst), &bytes);
    }
}
