//! The log of rules with `log`: packets they decide, sent by the kernel through LOG_RING at most
//! at each rule's log rate, written to the daemon's log (info: syslog priority 6 under
//! journald) with the rule's name and its `log.prefix`; and, every ten seconds, how many packets
//! of each rule were beyond its log rate.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use xdpfw_common::{buffer_of, map_names};
use xdpfw_control::{Instance, trace::TraceEvent};
use xdpfw_kernel::{Maps, trace::DecisionRing};

/// How often suppressed packets are reported.
const SUPPRESSED_EVERY: Duration = Duration::from_secs(10);

/// A generation's rule names and log prefixes.
struct Named {
    names: Vec<String>,
    prefixes: Vec<Option<String>>,
}

fn named(inst: &Instance, generation: u64) -> Option<Named> {
    match crate::escalation::ruleset_for(inst, generation) {
        Ok(rs) => Some(Named {
            names: rs.rules.iter().map(|r| r.name.clone()).collect(),
            prefixes: rs.rules.iter().map(|r| r.log.as_ref().and_then(|l| l.prefix.clone())).collect(),
        }),
        // Its state only (a ruleset no longer readable): names without prefixes.
        Err(_) => inst.state_for(generation).ok().map(|s| Named { prefixes: vec![None; s.ruleset.rules.len()], names: s.ruleset.rules }),
    }
}

/// Which pinned log ring the instance has: it changes when the instance is attached again.
fn pin_identity(inst: &Instance) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(inst.pin_dir.join(map_names::LOG_RING)).ok().map(|m| (m.dev(), m.ino()))
}

/// Writes the packets of `log` rules to the log until `stop` is set. Blocking: run it on its
/// own thread.
pub fn serve(inst: &Instance, stop: &AtomicBool) -> Result<()> {
    let open = || -> Result<(DecisionRing, Maps)> { Ok((DecisionRing::open(&inst.pin_dir, map_names::LOG_RING)?, Maps::open(&inst.pin_dir)?)) };
    let mut opened = pin_identity(inst);
    let mut current = match open() {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!("rules with `log` are not logged: {e:#} (an instance attached by an earlier version: detach and attach it again)");
            None
        }
    };
    let mut cache: HashMap<u64, Option<Named>> = HashMap::new();
    let (mut checked, mut reported) = (Instant::now(), Instant::now());
    // Per generation and rule, the suppressed count last reported.
    let mut suppressed_seen: (u64, Vec<u64>) = (0, Vec::new());
    let offset = xdpfw_control::trace::clock_offset_ns();
    while !stop.load(Ordering::Relaxed) {
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            let now = pin_identity(inst);
            if now.is_some() && now != opened {
                opened = now;
                match open() {
                    Ok(o) => current = Some(o),
                    Err(e) => tracing::warn!("log: reopening the re-attached instance: {e:#}"),
                }
            }
        }
        let Some((ring, maps)) = current.as_mut() else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        // A short timeout so `stop` is seen promptly.
        if ring.wait(Duration::from_millis(100)) {
            let mut n = 0;
            while let Some(e) = ring.next_event() {
                if cache.len() > 16 {
                    cache.clear();
                }
                let named = cache.entry(e.generation).or_insert_with(|| named(inst, e.generation));
                let names = named.as_ref().map(|n| n.names.as_slice());
                let prefix = named.as_ref().and_then(|n| n.prefixes.get(e.rule as usize).cloned().flatten()).unwrap_or_default();
                let t = TraceEvent::new(&e, names, offset);
                tracing::info!(target: "xdpfw::log", "{prefix}{} {} len {} rule \"{}\" (generation {})", t.verdict, t.packet, t.len, t.rule.escape_debug(), t.generation);
                n += 1;
                if n >= 10_000 {
                    break;
                }
            }
        }
        if reported.elapsed() >= SUPPRESSED_EVERY {
            reported = Instant::now();
            let generation = maps.generation();
            let header = maps.header(buffer_of(generation));
            let now = maps.log_suppressed(buffer_of(generation), header.rule_count);
            if suppressed_seen.0 != generation {
                suppressed_seen = (generation, vec![0; now.len()]);
            }
            let names = cache.entry(generation).or_insert_with(|| named(inst, generation)).as_ref().map(|n| n.names.clone()).unwrap_or_default();
            for (i, (&n, seen)) in now.iter().zip(suppressed_seen.1.iter_mut()).enumerate() {
                if n > *seen {
                    let name = names.get(i).cloned().unwrap_or_else(|| format!("#{i}"));
                    tracing::info!(target: "xdpfw::log", "{} packets of rule \"{}\" not logged in the last {}s (beyond its log rate)", n - *seen, name.escape_debug(), SUPPRESSED_EVERY.as_secs());
                    *seen = n;
                }
            }
        }
    }
    Ok(())
}
