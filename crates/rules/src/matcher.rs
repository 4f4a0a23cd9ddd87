//! The reference matcher: the rules evaluated directly, in plain Rust, with no compilation.
//!
//! It is the oracle of the differential tests (the kernel must agree with it on every packet),
//! the engine of `loader explain`, and it decides what the kernel does before classification
//! (neighbour discovery, the fragment policy) exactly as the XDP program does.

use std::net::IpAddr;

use serde::Serialize;

use crate::{
    owner::Owner,
    packet::PacketSpec,
    Action, AddrList, FragmentPolicy, IPPROTO_ICMPV6, NdPolicy, PortMatch, Rule, Ruleset,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub action: Action,
    /// Index of the deciding rule; `None` for the default action and the fixed policies.
    pub rule: Option<usize>,
    pub rule_name: Option<String>,
    /// Why, one line per field that mattered.
    pub reasons: Vec<String>,
    /// The deciding rule needs the socket owner, which was not given: `action` is the pending
    /// action the kernel applies while userspace looks the owner up.
    pub escalated: bool,
}

/// What is known of the owner of the packet's local socket.
#[derive(Clone, Copy, Debug)]
pub enum OwnerView<'a> {
    /// Not known, as in the kernel: a rule with owner conditions escalates.
    Unknown,
    /// Known: `None` when no socket is there to own the flow.
    Known(Option<&'a Owner>),
}

/// Decides `pkt` as the XDP program does (escalating where a rule needs the socket owner).
pub fn decide(rs: &Ruleset, pkt: &PacketSpec) -> Decision {
    evaluate(rs, pkt, OwnerView::Unknown, 0)
}

/// Decides `pkt` as the XDP program and the escalation service together do, with `owner`.
pub fn decide_with_owner(rs: &Ruleset, pkt: &PacketSpec, owner: Option<&Owner>) -> Decision {
    evaluate(rs, pkt, OwnerView::Known(owner), 0)
}

/// Decides `pkt` with rules `first..` only: the escalation service starts at the rule the
/// kernel escalated on, since the kernel has already seen every earlier rule fail.
pub fn evaluate(rs: &Ruleset, pkt: &PacketSpec, owner: OwnerView, first: usize) -> Decision {
    evaluate_with_limits(rs, pkt, owner, first, &mut |_| true)
}

/// Decides `pkt` as the XDP program does, with `within(rule)` saying whether the packet is
/// within the rate limit of rule `rule` (asked only of rules with a `limit` that match, in
/// order, as the kernel takes tokens). Without it ([`decide`]) every packet is within.
pub fn decide_with_limits(rs: &Ruleset, pkt: &PacketSpec, within: &mut dyn FnMut(usize) -> bool) -> Decision {
    evaluate_with_limits(rs, pkt, OwnerView::Unknown, 0, within)
}

fn evaluate_with_limits(rs: &Ruleset, pkt: &PacketSpec, owner: OwnerView, first: usize, within: &mut dyn FnMut(usize) -> bool) -> Decision {
    let fixed = |action, why: &str| Decision {
        action,
        rule: None,
        rule_name: None,
        reasons: vec![why.to_string()],
        escalated: false,
    };
    if let (IpAddr::V6(src), IpAddr::V6(dst)) = (pkt.src, pkt.dst)
        && (crate::frame::is_v4_mapped(&src) || crate::frame::is_v4_mapped(&dst))
    {
        return fixed(Action::Drop, "an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is never valid on the wire: malformed, dropped before the rules");
    }
    // Only over IPv6, as in the XDP program: protocol 58 inside IPv4 is not neighbour discovery.
    if rs.icmpv6_nd == NdPolicy::AlwaysPass && is_neighbour_discovery(pkt) {
        return fixed(Action::Pass, "IPv6 neighbour discovery and router messages always pass (options.icmpv6_nd = \"always-pass\")");
    }
    if pkt.fragment {
        match rs.fragments {
            FragmentPolicy::Drop => return fixed(Action::Drop, "non-first fragment: options.fragments = \"drop\""),
            FragmentPolicy::Pass => return fixed(Action::Pass, "non-first fragment: options.fragments = \"pass\""),
            FragmentPolicy::L3Only => {}
        }
    }
    let mut skipped = Vec::new();
    for (i, rule) in rs.rules.iter().enumerate().skip(first) {
        let Some(mut reasons) = rule_matches(rule, pkt) else { continue };
        if let Some(limit) = &rule.limit {
            // As the kernel: a rule beyond its limit does not match (up to MAX_SKIPPED of them
            // for one packet; past that the rule found decides).
            if skipped.len() < xdpfw_common::limit::MAX_SKIPPED as usize && !within(i) {
                skipped.push(format!("rule \"{}\" matched but the packet is beyond its limit ({limit})", rule.name));
                continue;
            }
            // What the kernel does beyond the limit: the next match decides (its own limit not
            // consulted, as in the kernel).
            let beyond = if skipped.is_empty() { Some(evaluate_with_limits(rs, pkt, owner, i + 1, &mut |_| true)) } else { None };
            let then = beyond.map_or(String::new(), |d| {
                format!(": {} by {}", d.action, d.rule_name.map_or("the default action".to_string(), |n| format!("rule \"{n}\"")))
            });
            reasons.push(format!("within the rule's limit ({limit}); beyond it, later rules decide{then}"));
        }
        if let Some(log) = &rule.log {
            // Logging never changes the verdict; the explanation says the packet would be logged.
            reasons.push(format!("logged ({log}): to the daemon's log and to `loader trace`"));
        }
        reasons.splice(0..0, skipped.iter().cloned());
        let decision = |action, reasons, escalated| Decision {
            action,
            rule: Some(i),
            rule_name: Some(rule.name.clone()),
            reasons,
            escalated,
        };
        match (&rule.owner, owner) {
            (None, _) => return decision(rule.action, reasons, false),
            (Some(cond), OwnerView::Unknown) => {
                reasons.push(format!(
                    "the rule needs the socket owner ({cond}): the kernel escalates the flow and gives it the pending action ({}) until userspace decides",
                    rs.escalation.pending
                ));
                return decision(rs.escalation.pending, reasons, true);
            }
            (Some(cond), OwnerView::Known(o)) => {
                if let Some(why) = cond.matches(o) {
                    reasons.push(why);
                    return decision(rule.action, reasons, false);
                }
            }
        }
    }
    let mut d = fixed(rs.default, "no rule matched: the default action");
    d.reasons.splice(0..0, skipped);
    d
}

/// An ICMPv6 neighbour discovery or router message (types 133-137), as the XDP program sees
/// one: only over IPv6 (protocol 58 inside IPv4 is not neighbour discovery), never a fragment.
pub fn is_neighbour_discovery(pkt: &PacketSpec) -> bool {
    pkt.src.is_ipv6() && pkt.is_icmp() && pkt.proto == IPPROTO_ICMPV6 && (133..=137).contains(&pkt.icmp_type)
}

/// `Some(reasons)` when every condition of `rule` holds for `pkt`.
pub fn rule_matches(rule: &Rule, pkt: &PacketSpec) -> Option<Vec<String>> {
    explain_rule(rule, pkt).ok()
}

/// Every condition of `rule` held for `pkt` (`Ok`, with why, one line per condition), or the
/// first that failed (`Err`, with why).
pub fn explain_rule(rule: &Rule, pkt: &PacketSpec) -> Result<Vec<String>, String> {
    let mut why = Vec::new();
    let addr = |list: &Option<AddrList>, a: IpAddr, field: &str, why: &mut Vec<String>| -> Result<(), String> {
        if let Some(list) = list {
            why.push(list.check(a, field)?);
        }
        Ok(())
    };
    addr(&rule.src, pkt.src, "src", &mut why)?;
    addr(&rule.dst, pkt.dst, "dst", &mut why)?;
    if let Some(protos) = &rule.proto {
        if !protos.contains(&pkt.proto) {
            return Err(format!("protocol {} is not {}", pkt.proto, describe_protos(protos)));
        }
        why.push(format!("protocol {} is {}", pkt.proto, describe_protos(protos)));
    }
    let port = |cond: &Option<PortMatch>, p: u16, field: &str, why: &mut Vec<String>| -> Result<(), String> {
        let Some(cond) = cond else { return Ok(()) };
        if !pkt.has_ports() {
            return Err(format!("the packet has no {field} (not TCP or UDP, or a non-first fragment)"));
        }
        why.push(cond.check(p, field)?);
        Ok(())
    };
    port(&rule.sport, pkt.sport, "sport", &mut why)?;
    port(&rule.dport, pkt.dport, "dport", &mut why)?;
    if let Some(icmp) = &rule.icmp {
        if !pkt.is_icmp() {
            return Err("the packet has no ICMP header".into());
        }
        let v6 = pkt.proto == IPPROTO_ICMPV6;
        let named = crate::icmp_type_name(pkt.icmp_type, v6).map_or(String::new(), |n| format!(" ({n})"));
        if !icmp.matches(pkt.icmp_type, pkt.icmp_code) {
            return Err(format!(
                "icmp type {}{named} code {} is not type {:?}{}",
                pkt.icmp_type,
                pkt.icmp_code,
                icmp.types,
                icmp.codes.as_ref().map_or(String::new(), |c| format!(" code {c:?}"))
            ));
        }
        why.push(format!("icmp type {}{named} code {}", pkt.icmp_type, pkt.icmp_code));
    }
    if let Some(flags) = &rule.tcp_flags {
        if !pkt.is_tcp() || !flags.matches(pkt.tcp_flags) {
            return Err(format!("tcp flags {:#04x} do not have {:#04x} set and {:#04x} clear", pkt.tcp_flags, flags.set, flags.clear));
        }
        why.push(format!("tcp flags {:#04x} have {:#04x} set and {:#04x} clear", pkt.tcp_flags, flags.set, flags.clear));
    }
    if let Some(ids) = &rule.vlan {
        match pkt.vlan {
            Some(id) if ids.contains(&id) => why.push(format!("vlan {id} is one of {ids:?}")),
            Some(id) => return Err(format!("vlan {id} is not one of {ids:?}")),
            None => return Err(format!("the packet has no VLAN tag (the rule wants vlan {ids:?})")),
        }
    }
    if let Some(states) = &rule.state {
        let names: Vec<&str> = states.iter().map(|s| s.name()).collect();
        if !states.contains(&pkt.state) {
            return Err(format!("the packet is {} (state {}), not {}", pkt.state, describe_state(pkt.state), names.join(" or ")));
        }
        why.push(format!("the packet is {} ({})", pkt.state, describe_state(pkt.state)));
    }
    if why.is_empty() {
        why.push("the rule has no conditions".into());
    }
    Ok(why)
}

/// What a connection state means, for `explain`.
fn describe_state(s: crate::packet::FlowState) -> &'static str {
    match s {
        crate::packet::FlowState::New => "no flow this host opened from this interface",
        crate::packet::FlowState::Established => "a reply of a flow this host opened from this interface",
        crate::packet::FlowState::Related => "an ICMP error about a flow this host opened from this interface",
    }
}

/// A protocol list for people: "one of [6, 17]", or for a long one (written with `!`) "any
/// protocol but [6]".
fn describe_protos(protos: &[u8]) -> String {
    if protos.len() > 128 {
        let missing: Vec<u8> = (0..=255u8).filter(|p| !protos.contains(p)).collect();
        format!("any protocol but {missing:?}")
    } else {
        format!("one of {protos:?}")
    }
}

/// Rules that can never match because one earlier rule matches a superset of their packets:
/// `(shadowed, by)`. Conservative: it reports only what it can prove field by field.
pub fn shadowed_rules(rs: &Ruleset) -> Vec<(usize, usize)> {
    // One budget of prefix containment checks for the whole lint: every pair of rules is
    // looked at, so a per-pair bound alone would still let 1,024 rules with large address
    // lists cost hundreds of billions of checks. Past the budget, address lists are no longer
    // compared (the lint may then miss a shadowed rule; it never reports a wrong one).
    let mut budget: usize = 20_000_000;
    let mut out = Vec::new();
    for j in 0..rs.rules.len() {
        if let Some(i) = (0..j).find(|&i| covers(&rs.rules[i], &rs.rules[j], &mut budget)) {
            out.push((j, i));
        }
    }
    out
}

fn covers(a: &Rule, b: &Rule, budget: &mut usize) -> bool {
    fn field<T>(a: &Option<T>, b: &Option<T>, mut f: impl FnMut(&T, &T) -> bool) -> bool {
        match (a, b) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => f(a, b),
        }
    }
    let mut addrs = |a: &AddrList, b: &AddrList| {
        // Bounded so that huge sets cost no more than a million containment checks, and all
        // pairs together no more than the budget.
        let cost = a.len().saturating_mul(b.len());
        if cost > 1_000_000 || cost > *budget {
            return false;
        }
        *budget -= cost;
        b.iter().all(|nb| a.iter().any(|na| na.contains(nb)))
    };
    // Exact: the ports each condition accepts, as disjoint ranges.
    let ports = |a: &PortMatch, b: &PortMatch| {
        if a.except.is_empty() && b.except.is_empty() {
            let (Some(a), Some(b)) = (&a.ranges, &b.ranges) else { return false };
            return b.iter().all(|rb| rb.is_empty() || a.iter().any(|ra| ra.start() <= rb.start() && rb.end() <= ra.end()));
        }
        let a = a.effective();
        b.effective().iter().all(|rb| a.iter().any(|ra| ra.start() <= rb.start() && rb.end() <= ra.end()))
    };
    // Exclusions: conservative. An earlier field with exclusions is not taken to cover anything;
    // a later one with exclusions is covered when its positive prefixes are.
    let mut addrs = |a: &AddrList, b: &AddrList| a.except.is_none() && b.has_positive() && addrs(a, b);
    // An owner condition may fail where the later rule's holds, unless the later one demands
    // the very same owner.
    if a.owner.is_some() && a.owner != b.owner {
        return false;
    }
    // A rule with a limit does not match beyond it.
    if a.limit.is_some() {
        return false;
    }
    if let Some(va) = &a.vlan
        && !b.vlan.as_ref().is_some_and(|vb| vb.iter().all(|v| va.contains(v)))
    {
        return false;
    }
    // A state condition covers the later rule's packets only if theirs is narrower.
    if let Some(sa) = &a.state
        && !b.state.as_ref().is_some_and(|sb| sb.iter().all(|s| sa.contains(s)))
    {
        return false;
    }
    field(&a.src, &b.src, &mut addrs)
        && field(&a.dst, &b.dst, &mut addrs)
        && field(&a.proto, &b.proto, |a, b| b.iter().all(|p| a.contains(p)))
        && field(&a.sport, &b.sport, ports)
        && field(&a.dport, &b.dport, ports)
        && field(&a.icmp, &b.icmp, |a, b| {
            b.types.iter().all(|t| a.types.contains(t))
                && match (&a.codes, &b.codes) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(ac), Some(bc)) => bc.iter().all(|c| ac.contains(c)),
                }
        })
        && field(&a.tcp_flags, &b.tcp_flags, |a, b| a.set & b.set == a.set && a.clear & b.clear == a.clear)
}
