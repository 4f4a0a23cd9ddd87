//! The userspace half of escalation: flows whose first matching rule needs the owner of the
//! local socket arrive here as ring-buffer events (one per flow); we find the owner, evaluate the
//! ruleset with it from the escalating rule on, and write the verdict, with a TTL, into the
//! kernel's verdict cache. Every other flow is decided in the kernel and never comes here.
//!
//! Bounded under floods: the ring buffer is fixed-size (the kernel counts what it cannot send),
//! a batch is at most `Config::batch` events, each source address has a token bucket (and the
//! table of buckets a fixed size), owner lookups share snapshots with a deadline, and the
//! latency window is fixed. A flow we decline stays pending in the kernel and is retried.

pub mod owners;

use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use xdpfw_common::{DEFAULT_RULE_SLOT, EscalationEvent, FlowKey, Verdict, map_names};
use xdpfw_control::{
    Instance,
    escalation::{self as report, Counters, Report},
    files::now_secs,
};
use xdpfw_kernel::{Maps, pinned_map};
use xdpfw_rules::{
    self as rules, Action, Ruleset,
    matcher::{self, OwnerView},
    packet::PacketSpec,
    short_hash,
};
use owners::{Lookup, OwnerCache};

/// Tuning of the service (command-line flags of `loader run`).
#[derive(Clone, Debug)]
pub struct Config {
    /// The longest one /proc walk may take before the decision is abandoned.
    pub lookup_deadline: Duration,
    /// Escalations decided per second per source address (token bucket rate and burst).
    pub per_source_rate: f64,
    pub per_source_burst: f64,
    /// Source addresses tracked at once; new sources beyond it are declined (and counted).
    pub max_sources: usize,
    /// Events taken from the ring buffer before deciding them.
    pub batch: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lookup_deadline: Duration::from_millis(200),
            per_source_rate: 200.0,
            per_source_burst: 400.0,
            max_sources: 4096,
            batch: 256,
        }
    }
}

/// Shared between the service thread and readers (the metrics endpoint).
#[derive(Default)]
pub struct Shared {
    pub report: Mutex<Report>,
    latencies: Mutex<Latencies>,
}

/// The most recent decision latencies, in nanoseconds (a fixed window), and the sum and count of
/// every one since the start (a Prometheus summary's `_sum` and `_count`).
#[derive(Default)]
struct Latencies {
    samples: Vec<u64>,
    next: usize,
    sum_ns: u128,
    count: u64,
}

const LATENCY_WINDOW: usize = 4096;

impl Latencies {
    fn push(&mut self, ns: u64) {
        self.sum_ns += u128::from(ns);
        self.count += 1;
        if self.samples.len() < LATENCY_WINDOW {
            self.samples.push(ns);
        } else {
            self.samples[self.next] = ns;
        }
        self.next = (self.next + 1) % LATENCY_WINDOW;
    }
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v = self.samples.clone();
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        Some(v[i] as f64 / 1000.0)
    }
}

/// Token buckets per source address, in a table of bounded size.
struct SourceLimiter {
    buckets: HashMap<IpAddr, (f64, Instant)>,
    rate: f64,
    burst: f64,
    max: usize,
}

impl SourceLimiter {
    fn allow(&mut self, src: IpAddr) -> bool {
        let now = Instant::now();
        if !self.buckets.contains_key(&src) && self.buckets.len() >= self.max {
            // Forget sources whose bucket has refilled: they are indistinguishable from new ones.
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| *tokens + at.elapsed().as_secs_f64() * rate < burst);
            if self.buckets.len() >= self.max {
                return false;
            }
        }
        let (tokens, at) = self.buckets.entry(src).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The service's counters and decision latency for the daemon's metrics endpoint.
pub struct Metrics(pub Arc<Shared>);

impl crate::MetricsSource for Metrics {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;

        use crate::metrics::family;
        let r = self.0.report.lock().expect("not poisoned").clone();
        family(out, "xdpfw_escalation_events_total", "counter", "Escalation events read from the ring buffer, by outcome.");
        let c = &r.counters;
        for (outcome, v) in [
            ("decided_pass", c.decided_pass),
            ("decided_drop", c.decided_drop),
            ("lookup_timeout", c.lookup_timeouts),
            ("source_limited", c.source_limited),
            ("stale", c.stale),
            ("error", c.errors),
        ] {
            let _ = writeln!(out, "xdpfw_escalation_events_total{{outcome=\"{outcome}\"}} {v}");
        }
        family(out, "xdpfw_escalation_no_socket_total", "counter", "Flows decided without an owner: no socket receives them.");
        let _ = writeln!(out, "xdpfw_escalation_no_socket_total {}", c.no_socket);
        family(out, "xdpfw_escalation_process_gone_total", "counter", "Flows decided on the socket's uid only: its process had exited.");
        let _ = writeln!(out, "xdpfw_escalation_process_gone_total {}", c.process_gone);
        family(out, "xdpfw_escalation_sources_tracked", "gauge", "Source addresses in the per-source limiter.");
        let _ = writeln!(out, "xdpfw_escalation_sources_tracked {}", r.sources_tracked);
        // A summary: quantiles over the most recent decisions (NaN before the first, as client
        // libraries write them), and the cumulative sum and count, so `rate(_sum) / rate(_count)`
        // is the mean latency over any range.
        let (sum_ns, count) = {
            let l = self.0.latencies.lock().expect("not poisoned");
            (l.sum_ns, l.count)
        };
        family(
            out,
            "xdpfw_escalation_decision_latency_seconds",
            "summary",
            "Kernel event to verdict in place: quantiles over the most recent 4096 decisions; sum and count over every decision.",
        );
        for (q, v) in [("0.5", r.latency_p50_us), ("0.99", r.latency_p99_us)] {
            let v = v.map_or_else(|| "NaN".to_string(), |us| (us / 1e6).to_string());
            let _ = writeln!(out, "xdpfw_escalation_decision_latency_seconds{{quantile=\"{q}\"}} {v}");
        }
        let _ = writeln!(out, "xdpfw_escalation_decision_latency_seconds_sum {}", sum_ns as f64 / 1e9);
        let _ = writeln!(out, "xdpfw_escalation_decision_latency_seconds_count {count}");
        family(out, "xdpfw_escalation_decision_latency_samples", "gauge", "Decisions the latency quantiles are taken over.");
        let _ = writeln!(out, "xdpfw_escalation_decision_latency_samples {}", r.latency_samples);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn flow_packet(ev: &EscalationEvent) -> PacketSpec {
    let f = &ev.flow;
    let addr = |b: &[u8; 16]| -> IpAddr {
        if f.is_v6 != 0 {
            IpAddr::V6(Ipv6Addr::from(*b))
        } else {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        }
    };
    PacketSpec {
        proto: f.proto,
        src: addr(&f.src),
        dst: addr(&f.dst),
        sport: f.sport,
        dport: f.dport,
        tcp_flags: ev.tcp_flags as u8,
        icmp_type: 0,
        icmp_code: 0,
        fragment: false,
        // The event does not carry the connection state: rules after the escalated one with a
        // `state` condition are evaluated as for a new flow (a limit stated in the README).
        state: xdpfw_rules::packet::FlowState::New,
        vlan: None,
    }
}

/// The ruleset a generation was compiled from: its snapshot in the history (by content hash),
/// or the file it was read from if that still has the same content.
pub(crate) fn ruleset_for(inst: &Instance, generation: u64) -> Result<Ruleset> {
    let state = inst.state_for(generation)?;
    let hash = &state.ruleset.hash;
    let snapshot = inst.history().dir().join("snapshots").join(hash).join("rules.toml");
    for path in [Some(snapshot), state.ruleset.path.clone()].into_iter().flatten() {
        if let Ok(rs) = xdpfw_control::history::load_rules(&path, rules::Origin::Local)
            && &rs.hash == hash
        {
            return Ok(rs);
        }
    }
    anyhow::bail!("the ruleset of generation {generation} (hash {}) is neither in the history nor at its path", short_hash(hash))
}

/// Which pinned ring buffer the instance has (device and inode of its pin): it changes when the
/// instance is attached again.
fn pin_identity(inst: &Instance) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(inst.pin_dir.join(map_names::ESCALATIONS)).ok().map(|m| (m.dev(), m.ino()))
}

/// Serves escalations for `inst` until `stop` is set. Blocking: run it on its own thread.
pub fn serve(inst: &Instance, cfg: &Config, stop: &AtomicBool, shared: &Arc<Shared>) -> Result<()> {
    let open = || -> Result<_> {
        let ring = RingBuf::try_from(pinned_map(&inst.pin_dir, map_names::ESCALATIONS)?)?;
        let verdicts: BpfHashMap<MapData, FlowKey, Verdict> = BpfHashMap::try_from(pinned_map(&inst.pin_dir, map_names::VERDICTS)?)?;
        Ok((ring, verdicts, Maps::open(&inst.pin_dir)?, pin_identity(inst)))
    };
    let (mut ring, mut verdicts, mut maps, mut opened) = open()?;
    let mut checked = Instant::now();
    let mut owners = OwnerCache::new(cfg.lookup_deadline);
    let mut limiter = SourceLimiter {
        buckets: HashMap::new(),
        rate: cfg.per_source_rate,
        burst: cfg.per_source_burst,
        max: cfg.max_sources,
    };
    let mut ruleset: Option<(u64, Ruleset)> = None;
    let started_at = now_secs();
    let mut counters = Counters::default();
    let mut batch: Vec<EscalationEvent> = Vec::with_capacity(cfg.batch);
    // Published soon after the counters change, and every second regardless, so readers can
    // tell a live service (see `served`) without an idle one rewriting its file constantly.
    let mut published = Instant::now() - Duration::from_secs(10);
    let mut published_counters: Option<Counters> = None;
    tracing::info!(iface = %inst.iface, "serving escalations");

    while !stop.load(Ordering::Relaxed) {
        // An instance the daemon's guard attached again has new maps: follow them.
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            let now = pin_identity(inst);
            if now.is_some() && now != opened {
                match open() {
                    Ok(fresh) => {
                        (ring, verdicts, maps, opened) = fresh;
                        ruleset = None;
                        tracing::info!(iface = %inst.iface, "escalation: serving the re-attached instance");
                    }
                    Err(e) => tracing::warn!("escalation: reopening the re-attached instance: {e:#}"),
                }
            }
        }
        let mut pfd = libc::pollfd { fd: ring.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd. A short timeout so `stop` and publishing are timely.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        batch.clear();
        while batch.len() < cfg.batch {
            let Some(item) = ring.next() else { break };
            if item.len() >= size_of::<EscalationEvent>() {
                // SAFETY: the kernel wrote an EscalationEvent; read_unaligned copes with any alignment.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const EscalationEvent) });
            }
        }
        for ev in &batch {
            counters.events += 1;
            let generation = maps.generation();
            if ev.generation != generation {
                counters.stale += 1;
                continue;
            }
            if ruleset.as_ref().is_none_or(|(g, _)| *g != generation) {
                match ruleset_for(inst, generation) {
                    Ok(rs) => ruleset = Some((generation, rs)),
                    Err(e) => {
                        counters.errors += 1;
                        tracing::warn!("escalation: {e:#}");
                        continue;
                    }
                }
            }
            let rs = &ruleset.as_ref().expect("set above").1;
            let pkt = flow_packet(ev);
            if !limiter.allow(pkt.src) {
                counters.source_limited += 1;
                continue;
            }
            let owner = match owners.lookup(pkt.proto, pkt.dst, pkt.dport, ev.sent_ns) {
                Ok(Lookup::Owner(o)) => Some(o),
                Ok(Lookup::ProcessGone(o)) => {
                    counters.process_gone += 1;
                    Some(o)
                }
                Ok(Lookup::NoSocket) => {
                    counters.no_socket += 1;
                    None
                }
                Ok(Lookup::TimedOut) => {
                    counters.lookup_timeouts += 1;
                    continue;
                }
                Err(e) => {
                    counters.errors += 1;
                    tracing::warn!("escalation: owner lookup: {e:#}");
                    continue;
                }
            };
            let d = matcher::evaluate(rs, &pkt, OwnerView::Known(owner.as_ref()), ev.rule as usize);
            let now = monotonic_ns();
            let verdict = Verdict {
                generation,
                expires_ns: now + rs.escalation.verdict_ttl.as_nanos() as u64,
                action: d.action.kernel(),
                rule: d.rule.map_or(DEFAULT_RULE_SLOT, |r| r as u32),
            };
            if let Err(e) = verdicts.insert(&ev.flow, &verdict, 0) {
                counters.errors += 1;
                tracing::warn!("escalation: writing a verdict: {e}");
                continue;
            }
            match d.action {
                Action::Pass => counters.decided_pass += 1,
                Action::Drop => counters.decided_drop += 1,
            }
            shared.latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(monotonic_ns().saturating_sub(ev.sent_ns));
            tracing::debug!(
                "{} {}:{} -> {}:{}: {} by {}",
                pkt.proto,
                pkt.src,
                pkt.sport,
                pkt.dst,
                pkt.dport,
                d.action,
                d.rule_name.as_deref().unwrap_or("the default")
            );
        }
        let changed = published_counters.as_ref() != Some(&counters);
        if published.elapsed() >= Duration::from_secs(1) || changed && published.elapsed() >= Duration::from_millis(200) {
            publish(inst, shared, &counters, started_at, limiter.buckets.len());
            published = Instant::now();
            published_counters = Some(counters.clone());
        }
    }
    publish(inst, shared, &counters, started_at, limiter.buckets.len());
    let _ = fs::remove_file(report::report_path(inst));
    Ok(())
}

fn publish(inst: &Instance, shared: &Shared, counters: &Counters, started_at: u64, sources: usize) {
    let lat = shared.latencies.lock().expect("not poisoned");
    let report = Report {
        pid: std::process::id(),
        started_at,
        updated_at: now_secs(),
        counters: counters.clone(),
        latency_p50_us: lat.quantile(0.5),
        latency_p99_us: lat.quantile(0.99),
        latency_samples: lat.samples.len(),
        sources_tracked: sources,
    };
    drop(lat);
    report::publish(inst, &report);
    *shared.report.lock().expect("not poisoned") = report;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_limiter_is_bounded() {
        let mut l = SourceLimiter { buckets: HashMap::new(), rate: 0.0, burst: 2.0, max: 3 };
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.allow(a) && l.allow(a));
        assert!(!l.allow(a), "a source over its burst is declined");
        for i in 2..4u8 {
            assert!(l.allow(IpAddr::V4(Ipv4Addr::new(192, 0, 2, i))));
        }
        assert!(!l.allow("192.0.2.9".parse().unwrap()), "a full table declines new sources");
        assert_eq!(l.buckets.len(), 3);
    }

    #[test]
    fn latency_quantiles_use_a_fixed_window() {
        let mut l = Latencies::default();
        for i in 1..=10_000u64 {
            l.push(i * 1000);
        }
        assert_eq!(l.samples.len(), LATENCY_WINDOW);
        assert!(l.quantile(0.5).unwrap() > 5000.0, "old samples left the window");
        assert!(l.quantile(0.99).unwrap() <= 10_000.0);
        assert_eq!((l.count, l.sum_ns), (10_000, 1000 * 10_000 * 10_001 / 2), "the summary's count and sum cover every decision");
    }

    #[test]
    fn decision_latency_is_a_summary() {
        let shared = Arc::new(Shared::default());
        let mut out = String::new();
        crate::MetricsSource::render(&Metrics(shared.clone()), &mut out);
        assert!(out.contains("# TYPE xdpfw_escalation_decision_latency_seconds summary\n"), "{out}");
        assert!(out.contains("xdpfw_escalation_decision_latency_seconds{quantile=\"0.99\"} NaN\n"), "{out}");
        assert!(out.contains("xdpfw_escalation_decision_latency_seconds_count 0\n"), "{out}");
        shared.latencies.lock().unwrap().push(2_000_000);
        shared.latencies.lock().unwrap().push(4_000_000);
        let mut out = String::new();
        crate::MetricsSource::render(&Metrics(shared), &mut out);
        assert!(out.contains("xdpfw_escalation_decision_latency_seconds_sum 0.006\n"), "{out}");
        assert!(out.contains("xdpfw_escalation_decision_latency_seconds_count 2\n"), "{out}");
    }
}
