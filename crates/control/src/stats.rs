//! Counters of an attached instance, paired with the names of the ruleset they count.

use serde::Serialize;
use xdpfw_common::{GlobalStats, buffer_of};
use xdpfw_kernel::{AttachMode, Maps};

use crate::{
    error::Result,
    escalation,
    instance::{Instance, RulesetSummary},
};

#[derive(Clone, Debug, Serialize)]
pub struct RuleCounters {
    pub index: Option<usize>,
    pub name: String,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub iface: String,
    pub mode: AttachMode,
    pub generation: u64,
    pub buffer: u32,
    pub ruleset: RulesetSummary,
    pub global: GlobalStats,
    pub rules: Vec<RuleCounters>,
    /// The escalation service's report, when one serves this instance.
    pub escalation: Option<escalation::Report>,
}

pub fn stats(inst: &Instance) -> Result<Stats> {
    let maps = Maps::open(&inst.pin_dir)?;
    let generation = maps.generation();
    // Never pair one ruleset's names with another's counters.
    let state = inst.state_for(generation)?;
    let buffer = buffer_of(generation);
    let header = maps.header(buffer);
    let counters = maps.rule_stats(buffer, header.rule_count)?;
    let mut rules = Vec::new();
    for (i, c) in counters.iter().enumerate() {
        let (index, name, action) = if i < header.rule_count as usize {
            (Some(i), state.ruleset.rules.get(i).cloned().unwrap_or_default(), state.ruleset.actions.get(i).cloned().unwrap_or_default())
        } else {
            (None, crate::instance::DEFAULT_RULE_NAME.to_string(), state.ruleset.default.clone())
        };
        // Counts of earlier generations under the same rule name (State::carried).
        let carried = state.carried.get(&name).copied().unwrap_or_default();
        rules.push(RuleCounters { index, name, action, packets: c.packets + carried.packets, bytes: c.bytes + carried.bytes });
    }
    Ok(Stats {
        iface: inst.iface.clone(),
        mode: state.mode,
        generation,
        buffer,
        ruleset: state.ruleset,
        global: maps.global_stats()?,
        rules,
        escalation: escalation::served(inst),
    })
}

