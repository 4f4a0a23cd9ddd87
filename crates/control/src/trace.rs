//! `loader trace`: decisions of real packets, as the kernel samples, filters and rate-limits
//! them (see `xdpfw_common::trace`), with their rules named.
//!
//! One tracer per instance (a lock beside the instance's): the kernel holds one filter. The
//! tracer takes a lease the program checks on every traced packet and renews it every
//! [`RENEW_EVERY`]; stopping clears it, and a tracer killed outright stops tracing when its
//! lease runs out (`trace::LEASE_NS`), with nobody's help.

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::Serialize;
use xdpfw_common::{DEFAULT_RULE_SLOT, DecisionEvent, TraceConfig, action, map_names, trace};
use xdpfw_kernel::{
    Maps,
    trace::{DecisionRing, monotonic_ns},
};
use xdpfw_rules::packet::PacketSpec;

use crate::{
    error::{ControlError, Result},
    files,
    instance::{DEFAULT_RULE_NAME, Instance, state_root},
};

/// How often the tracer renews its lease (a third of its length).
pub const RENEW_EVERY: Duration = Duration::from_secs(1);

/// What `loader trace` selects, all conditions together (see [`TraceFilter::parse`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceFilter {
    /// Source or destination within this prefix.
    pub host: Option<IpNet>,
    /// Source or destination port.
    pub port: Option<u16>,
    pub proto: Option<u8>,
    /// The deciding rule's name (`(default)`: the default action).
    pub rule: Option<String>,
    /// `action::*`.
    pub verdict: Option<u32>,
}

/// Names of the words a filter knows, for error messages.
const FILTER_WORDS: &str = "host ADDR[/LEN], port N, proto tcp|udp|icmp|icmpv6|N, rule NAME, verdict pass|drop (or tcp, udp, icmp, icmpv6, pass, drop alone)";

impl TraceFilter {
    /// Parses `host 192.0.2.0/24 port 53 proto udp rule NAME verdict drop` (any order, each at
    /// most once; `and` between conditions is allowed; `tcp`, `udp`, `icmp`, `icmpv6`, `pass`
    /// and `drop` alone stand for `proto …` and `verdict …`). The words may come as separate
    /// arguments or in one.
    pub fn parse(args: &[String]) -> std::result::Result<Self, String> {
        let words: Vec<&str> = args.iter().flat_map(|a| a.split_whitespace()).collect();
        let mut f = TraceFilter::default();
        let mut i = 0;
        let twice = |what: &str| format!("filter: {what} given twice (conditions are ANDed; trace one value at a time)");
        while i < words.len() {
            let word = words[i];
            let mut value = |what: &str| -> std::result::Result<&str, String> {
                i += 1;
                words.get(i).copied().ok_or_else(|| format!("filter: \"{word}\" needs {what}"))
            };
            match word {
                "and" => {}
                "host" | "addr" => {
                    let v = value("an address or prefix, e.g. host 192.0.2.0/24")?;
                    let net = v
                        .parse::<IpNet>()
                        .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                        .map_err(|_| format!("filter: invalid address or prefix \"{v}\" after {word}"))?;
                    if f.host.replace(net.trunc()).is_some() {
                        return Err(twice("host"));
                    }
                }
                "port" => {
                    let v = value("a port number, e.g. port 53")?;
                    let p = v.parse::<u16>().map_err(|_| format!("filter: invalid port \"{v}\" (0 to 65535)"))?;
                    if f.port.replace(p).is_some() {
                        return Err(twice("port"));
                    }
                }
                "proto" => {
                    let v = value("a protocol, e.g. proto udp")?;
                    let p = proto_of(v).ok_or_else(|| format!("filter: unknown protocol \"{v}\" (tcp, udp, icmp, icmpv6 or 0 to 255)"))?;
                    if f.proto.replace(p).is_some() {
                        return Err(twice("proto"));
                    }
                }
                "tcp" | "udp" | "icmp" | "icmpv6" => {
                    if f.proto.replace(proto_of(word).unwrap_or_default()).is_some() {
                        return Err(twice("proto"));
                    }
                }
                "rule" => {
                    let v = value("a rule name, e.g. rule block-ssh")?;
                    if f.rule.replace(v.to_string()).is_some() {
                        return Err(twice("rule"));
                    }
                }
                "verdict" => {
                    let v = value("pass or drop")?;
                    let a = verdict_of(v).ok_or_else(|| format!("filter: invalid verdict \"{v}\" (pass or drop)"))?;
                    if f.verdict.replace(a).is_some() {
                        return Err(twice("verdict"));
                    }
                }
                "pass" | "drop" => {
                    if f.verdict.replace(verdict_of(word).unwrap_or_default()).is_some() {
                        return Err(twice("verdict"));
                    }
                }
                other => return Err(format!("filter: unknown word \"{other}\" (expected {FILTER_WORDS})")),
            }
            i += 1;
        }
        Ok(f)
    }

    /// The kernel's form, without the rule (resolved against the live ruleset).
    fn kernel(&self) -> TraceConfig {
        let mut c = TraceConfig::default();
        if let Some(p) = self.proto {
            c.filter |= trace::filter::PROTO;
            c.proto = p;
        }
        if let Some(p) = self.port {
            c.filter |= trace::filter::PORT;
            c.port = p;
        }
        if let Some(v) = self.verdict {
            c.filter |= trace::filter::VERDICT;
            c.verdict = v;
        }
        match self.host {
            Some(IpNet::V4(n)) => {
                c.filter |= trace::filter::ADDR_V4;
                c.addr[..4].copy_from_slice(&n.addr().octets());
                c.prefix_len = n.prefix_len().into();
            }
            Some(IpNet::V6(n)) => {
                c.filter |= trace::filter::ADDR_V6;
                c.addr = n.addr().octets();
                c.prefix_len = n.prefix_len().into();
            }
            None => {}
        }
        if self.rule.is_some() {
            c.filter |= trace::filter::RULE;
            c.rule = u32::MAX;
        }
        c
    }
}

fn proto_of(s: &str) -> Option<u8> {
    xdpfw_rules::proto_by_name(s).or_else(|| s.parse().ok())
}

fn verdict_of(s: &str) -> Option<u32> {
    match s {
        "pass" => Some(action::PASS),
        "drop" => Some(action::DROP),
        _ => None,
    }
}

/// How many decisions the kernel may send: one in `sample` at random, at most `rate` a second
/// (bursts of `burst`).
#[derive(Clone, Copy, Debug)]
pub struct TraceRate {
    pub sample: u32,
    pub rate: u32,
    pub burst: u32,
}

/// One traced decision, with its rule named. The JSON shape of `loader trace --json`.
#[derive(Clone, Debug, Serialize)]
pub struct TraceEvent {
    /// Wall-clock time, ns since the epoch (from the kernel's monotonic time).
    #[serde(skip)]
    pub time_unix_ns: u128,
    /// `trace` (sampled) or `log` (a rule with `log`).
    pub kind: &'static str,
    pub verdict: &'static str,
    /// The deciding rule's name (`(default)`: no rule matched), or `#N` when the ruleset of
    /// its generation is no longer known.
    pub rule: String,
    /// Its position in its ruleset (none for the default action).
    pub rule_index: Option<u32>,
    pub generation: u64,
    /// The packet in `loader explain`'s syntax.
    pub packet: String,
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub tcp_flags: Option<u8>,
    pub len: u32,
}

impl TraceEvent {
    /// The event as the kernel sent it, named with `names` (the rules of its generation).
    pub fn new(e: &DecisionEvent, names: Option<&[String]>, clock_offset_ns: i128) -> Self {
        let (src, dst) = if e.is_v6 != 0 {
            (IpAddr::V6(Ipv6Addr::from(e.src)), IpAddr::V6(Ipv6Addr::from(e.dst)))
        } else {
            let v4 = |a: &[u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
            (v4(&e.src), v4(&e.dst))
        };
        let (has_ports, has_icmp, has_flags) = (e.has & 1 != 0, e.has & 2 != 0, e.has & 4 != 0);
        let spec = PacketSpec {
            proto: e.proto,
            src,
            dst,
            sport: if has_ports { e.sport } else { 0 },
            dport: if has_ports { e.dport } else { 0 },
            tcp_flags: if has_flags { e.tcp_flags } else { 0 },
            icmp_type: if has_icmp { (e.icmp >> 8) as u8 } else { 0 },
            icmp_code: if has_icmp { e.icmp as u8 } else { 0 },
            // A TCP or UDP packet without ports is a non-first fragment.
            fragment: !has_ports && matches!(e.proto, 6 | 17),
            // Not in the event: a packet a `state` rule decided shows as new.
            state: Default::default(),
            vlan: None,
        };
        let (rule, rule_index) = if e.rule == DEFAULT_RULE_SLOT {
            (DEFAULT_RULE_NAME.to_string(), None)
        } else {
            let name = names.and_then(|n| n.get(e.rule as usize)).cloned().unwrap_or_else(|| format!("#{}", e.rule));
            (name, Some(e.rule))
        };
        TraceEvent {
            time_unix_ns: (e.time_ns as i128 + clock_offset_ns).max(0) as u128,
            kind: if e.kind == trace::kind::LOG { "log" } else { "trace" },
            verdict: if u32::from(e.verdict) == action::DROP { "drop" } else { "pass" },
            rule,
            rule_index,
            generation: e.generation,
            packet: spec.to_string(),
            proto: e.proto,
            src,
            dst,
            sport: has_ports.then_some(e.sport),
            dport: has_ports.then_some(e.dport),
            icmp_type: has_icmp.then_some((e.icmp >> 8) as u8),
            icmp_code: has_icmp.then_some(e.icmp as u8),
            tcp_flags: has_flags.then_some(e.tcp_flags),
            len: e.len,
        }
    }
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns: what turns the kernel's times into wall time.
pub fn clock_offset_ns() -> i128 {
    let mono = monotonic_ns() as i128;
    let real = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    real - mono
}

/// Rule names by generation, read from the instance's state (the ruleset of a generation is
/// known while it is live or being replaced).
pub struct RuleNames {
    by_generation: HashMap<u64, Option<Vec<String>>>,
}

impl RuleNames {
    pub fn new() -> Self {
        Self { by_generation: HashMap::new() }
    }

    pub fn of(&mut self, inst: &Instance, generation: u64) -> Option<&[String]> {
        if self.by_generation.len() > 64 {
            self.by_generation.clear();
        }
        self.by_generation
            .entry(generation)
            .or_insert_with(|| inst.state_for(generation).ok().map(|s| s.ruleset.rules))
            .as_deref()
    }
}

impl Default for RuleNames {
    fn default() -> Self {
        Self::new()
    }
}

/// A running trace of one instance: the lock, the lease, the ring.
pub struct Tracer {
    inst: Instance,
    maps: Maps,
    ring: DecisionRing,
    filter: TraceFilter,
    names: RuleNames,
    generation: u64,
    renewed: Instant,
    clock_offset_ns: i128,
    /// Held while tracing: one tracer per instance.
    _lock: File,
}

/// The tracer's counters at the end (or now).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct TraceCounters {
    /// Decisions that passed the filter and the draw but were beyond the rate.
    pub limited: u64,
    /// Decisions lost to a full ring (the tracer read too slowly).
    pub lost: u64,
}

impl Tracer {
    /// Starts tracing `inst`: takes the tracer lock, resolves the rule named in the filter
    /// against the live ruleset, writes the kernel's filter and takes the lease.
    pub fn start(inst: Instance, filter: TraceFilter, rate: TraceRate) -> Result<Self> {
        if !inst.is_attached() {
            return Err(ControlError::Refused(format!("no firewall is attached to {} in this network namespace", inst.iface)));
        }
        let lock = files::lock_file(
            &state_root().join(format!("{}.trace.lock", inst.key)),
            Duration::ZERO,
            &format!("another `loader trace` is tracing {} (one tracer per interface)", inst.iface),
        )?;
        let mut maps = Maps::open(&inst.pin_dir)?;
        if !maps.can_trace() {
            return Err(ControlError::Refused(format!(
                "the firewall on {} was attached by a version of loader without `trace`: detach and attach it again to trace it",
                inst.iface
            )));
        }
        let mut ring = DecisionRing::open(&inst.pin_dir, map_names::TRACE_RING)?;
        // What an earlier tracer left unread is not this trace's.
        maps.trace_stop();
        ring.drain();
        let generation = maps.generation();
        let mut names = RuleNames::new();
        let mut config = filter.kernel();
        if let Some(name) = &filter.rule {
            let rules = names.of(&inst, generation).ok_or_else(|| {
                ControlError::Refused(format!("a reload of {} is in progress; try again", inst.iface))
            })?;
            config.rule = resolve(rules, name).ok_or_else(|| {
                let known: Vec<&str> = rules.iter().map(String::as_str).take(20).collect();
                ControlError::Refused(format!(
                    "filter: no rule named \"{name}\" in the live ruleset of {} (its rules: {}{}, or {DEFAULT_RULE_NAME} for the default action)",
                    inst.iface,
                    known.join(", "),
                    if rules.len() > known.len() { ", …" } else { "" }
                ))
            })?;
            config.rule_generation = generation;
        }
        config.sample = rate.sample.max(1);
        let rate_per_s = u64::from(rate.rate.max(1));
        config.interval_ns = 1_000_000_000 / rate_per_s;
        // A burst of `burst` events: the bucket may run that many intervals ahead.
        config.burst_ns = config.interval_ns * u64::from(rate.burst.max(1));
        maps.trace_start(&config, monotonic_ns() + trace::LEASE_NS)?;
        Ok(Self { inst, maps, ring, filter, names, generation, renewed: Instant::now(), clock_offset_ns: clock_offset_ns(), _lock: lock })
    }

    /// Waits up to `timeout` for decisions and returns those that came (renewing the lease
    /// and following reloads meanwhile).
    pub fn poll(&mut self, timeout: Duration) -> Vec<TraceEvent> {
        self.keep_alive();
        let mut out = Vec::new();
        if self.ring.wait(timeout.min(RENEW_EVERY / 2)) {
            while let Some(e) = self.ring.next_event() {
                let names = self.names.of(&self.inst, e.generation);
                out.push(TraceEvent::new(&e, names, self.clock_offset_ns));
                if out.len() >= 4096 {
                    break;
                }
            }
        }
        self.keep_alive();
        out
    }

    /// Renews the lease when due, and points a rule filter at the rule's slot in a new
    /// generation.
    fn keep_alive(&mut self) {
        if self.renewed.elapsed() >= RENEW_EVERY {
            self.maps.trace_renew(monotonic_ns() + trace::LEASE_NS);
            self.renewed = Instant::now();
        }
        let generation = self.maps.generation();
        if generation != self.generation
            && let Some(name) = self.filter.rule.clone()
        {
            // Until the new generation's names are known, the old slot matches nothing new.
            if let Some(rules) = self.names.of(&self.inst, generation) {
                let slot = resolve(rules, &name).unwrap_or(u32::MAX);
                if slot == u32::MAX {
                    tracing::warn!("rule \"{name}\" is not in the ruleset of generation {generation}: nothing matches the filter until it returns");
                }
                self.maps.trace_set_rule(generation, slot);
                self.generation = generation;
            }
        } else {
            self.generation = generation;
        }
    }

    pub fn counters(&self) -> TraceCounters {
        self.maps.trace_config().map(|c| TraceCounters { limited: c.limited, lost: c.lost }).unwrap_or_default()
    }

    pub fn iface(&self) -> &str {
        &self.inst.iface
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.maps.trace_stop();
    }
}

/// The slot of the rule `name` among `rules` (the default action's for `(default)`).
fn resolve(rules: &[String], name: &str) -> Option<u32> {
    if name == DEFAULT_RULE_NAME {
        return Some(DEFAULT_RULE_SLOT);
    }
    rules.iter().position(|r| r == name).map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<TraceFilter, String> {
        TraceFilter::parse(&[s.to_string()])
    }

    #[test]
    fn filters_parse() {
        let f = parse("host 192.0.2.7/24 and port 53 udp rule block-dns drop").unwrap();
        assert_eq!(f.host, Some("192.0.2.0/24".parse().unwrap()));
        assert_eq!((f.port, f.proto, f.rule.as_deref(), f.verdict), (Some(53), Some(17), Some("block-dns"), Some(action::DROP)));
        let f = TraceFilter::parse(&["proto".into(), "47".into(), "host".into(), "2001:db8::1".into(), "verdict".into(), "pass".into()]).unwrap();
        assert_eq!((f.proto, f.verdict), (Some(47), Some(action::PASS)));
        assert_eq!(f.host, Some("2001:db8::1/128".parse().unwrap()));
        let k = f.kernel();
        assert_eq!(k.filter, trace::filter::PROTO | trace::filter::VERDICT | trace::filter::ADDR_V6);
        assert_eq!((k.prefix_len, k.addr[0], k.addr[15]), (128, 0x20, 1));
        assert_eq!(parse("").unwrap(), TraceFilter::default());
        assert_eq!(parse("").unwrap().kernel().filter, 0);
    }

    #[test]
    fn filter_errors_say_what_is_wrong() {
        for (text, message) in [
            ("port", "filter: \"port\" needs a port number"),
            ("port 70000", "filter: invalid port \"70000\""),
            ("host 192.0.2.300", "filter: invalid address or prefix \"192.0.2.300\" after host"),
            ("proto gre", "filter: unknown protocol \"gre\""),
            ("verdict maybe", "filter: invalid verdict \"maybe\" (pass or drop)"),
            ("tcp udp", "filter: proto given twice"),
            ("drop verdict pass", "filter: verdict given twice"),
            ("dport 22", "filter: unknown word \"dport\" (expected host"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.starts_with(message), "{text}: {e}");
        }
    }

    #[test]
    fn events_are_named_and_printed_as_explain_packets() {
        let mut e = DecisionEvent {
            generation: 3,
            rule: 1,
            proto: 17,
            sport: 5000,
            dport: 53,
            has: 1,
            verdict: action::DROP as u8,
            kind: trace::kind::TRACE,
            len: 60,
            ..Default::default()
        };
        e.src[..4].copy_from_slice(&[192, 0, 2, 1]);
        e.dst[..4].copy_from_slice(&[192, 0, 2, 2]);
        let names = vec!["a".to_string(), "block-dns".to_string()];
        let t = TraceEvent::new(&e, Some(&names), 0);
        assert_eq!((t.rule.as_str(), t.rule_index, t.verdict, t.kind), ("block-dns", Some(1), "drop", "trace"));
        assert_eq!(t.packet, "udp 192.0.2.1:5000 -> 192.0.2.2:53");
        assert!(t.packet.parse::<PacketSpec>().is_ok());
        e.rule = DEFAULT_RULE_SLOT;
        assert_eq!(TraceEvent::new(&e, None, 0).rule, DEFAULT_RULE_NAME);
        e.rule = 7;
        assert_eq!(TraceEvent::new(&e, None, 0).rule, "#7");
    }
}
