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
    /// The flow table of `state` rules, once the egress program has recorded a flow.
    pub flows: Option<FlowTable>,
}

/// The flow table (`state` rules) as an operator sees it.
#[derive(Clone, Debug, Serialize)]
pub struct FlowTable {
    /// Entries now (expired ones included, until evicted or refreshed).
    pub entries: u64,
    pub capacity: u32,
    /// Flows pushed out of the full table by newer ones: every flow recorded and not closed
    /// by an RST is in the table or was evicted.
    pub evicted: u64,
}

/// The flow table's figures: a walk of its keys (tens of milliseconds when full), so only once
/// a flow was ever recorded.
pub fn flow_table(maps: &Maps, global: &GlobalStats) -> Option<FlowTable> {
    if global.flows_new == 0 {
        return None;
    }
    let entries = maps.flow_entries() as u64;
    Some(FlowTable {
        entries,
        capacity: xdpfw_common::flow::ENTRIES,
        evicted: global.flows_new.saturating_sub(global.flows_closed).saturating_sub(entries),
    })
}

/// Reads of the counters that a reload made inconsistent are retried this many times.
const CONSISTENT_READS: usize = 100;

pub fn stats(inst: &Instance) -> Result<Stats> {
    let maps = Maps::open(&inst.pin_dir)?;
    // A consistent read: the generation, its record, its counters (and those of a generation
    // being retired), and the generation again; retried when a reload moved in between, so a
    // counter never seems to go down (which Prometheus would take for a reset).
    let mut attempt = 0;
    let (generation, state, header, counters) = loop {
        attempt += 1;
        let generation = maps.generation();
        // Never pair one ruleset's names with another's counters.
        let mut state = inst.state_for(generation)?;
        let buffer = buffer_of(generation);
        let header = maps.header(buffer);
        let counters = maps.rule_stats(buffer, header.rule_count)?;
        let retiring = match &state.retiring {
            Some(r) => Some((r, maps.rule_stats(buffer_of(r.generation), r.rules.len() as u32)?)),
            None => None,
        };
        let moved = maps.generation() != generation
            // The reload recorded its end (and may have cleared the retired buffer) meanwhile.
            || (retiring.is_some() && inst.state().is_ok_and(|s| s.generation == generation && s.retiring.is_none()));
        if moved && attempt < CONSISTENT_READS {
            continue;
        }
        if let Some((r, retired)) = retiring {
            state.carried = crate::instance::carry(&state.carried, &r.rules, &retired, &state.ruleset.rules);
        }
        break (generation, state, header, counters);
    };
    let buffer = buffer_of(generation);
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
    let global = maps.global_stats()?;
    Ok(Stats {
        iface: inst.iface.clone(),
        mode: state.mode,
        generation,
        buffer,
        ruleset: state.ruleset,
        global,
        rules,
        escalation: escalation::served(inst),
        flows: flow_table(&maps, &global),
    })
}

