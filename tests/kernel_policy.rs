//! The policy primitives of issue 13 through the real program (BPF_PROG_TEST_RUN on a private,
//! unattached copy): neighbour discovery under the rules or not. Needs root.

mod kernel_support;

use xdpfw_common::action;
use xdpfw_rules::matcher::decide;
use xdpfw_testkit as harness;

use kernel_support::*;

/// Crafted ICMPv6 neighbour discovery and router messages (133-137), with and without VLAN tags
/// and extension headers, under `icmpv6_nd = "always-pass"` (the default: they pass before any
/// rule, counted as `neighbor_discovery`) and `"rules"` (classified like any ICMPv6: rogue
/// router advertisements and redirects dropped, solicitations passed by a rule).
#[test]
fn neighbour_discovery_always_passes_or_is_classified() {
    if !harness::root_or_skip() {
        return;
    }
    let rules = |nd: &str| {
        parse_rules(&format!(
            "default = \"drop\"\n[options]\nicmpv6_nd = \"{nd}\"\n\
             [[rule]]\nname = \"no-rogue-ra\"\naction = \"drop\"\nproto = \"icmpv6\"\nicmp_type = [\"router-advertisement\", \"redirect\"]\n\
             [[rule]]\nname = \"nd\"\naction = \"pass\"\nproto = \"icmpv6\"\nicmp_type = [\"router-solicitation\", \"neighbor-solicitation\", \"neighbor-advertisement\"]\n"
        ))
    };
    let mut prog = load();
    for (nd, rule_classified) in [("always-pass", false), ("rules", true)] {
        let rs = rules(nd);
        let buffer = activate(&mut prog, &rs);
        for t in 133..=137u8 {
            let p = spec(&format!("icmpv6 fe80::1 -> ff02::1 type {t}"));
            let frames = [
                p.to_frame(),
                with_vlan(&p.to_frame(), &[0x8100]),
                v6_with_ext(&p, &[Ext::HopByHop(8), Ext::DstOpts(16)]),
            ];
            for frame in frames {
                let before = prog.maps.global_stats().unwrap();
                let counters = prog.maps.rule_stats(buffer, 2).unwrap();
                let verdict = prog.run(&frame).unwrap();
                let g = prog.maps.global_stats().unwrap().since(&before);
                let after = prog.maps.rule_stats(buffer, 2).unwrap();
                let want = match (rule_classified, t) {
                    (false, _) => action::PASS,
                    (true, 134 | 137) => action::DROP,
                    (true, _) => action::PASS,
                };
                assert_eq!(verdict, want, "type {t} under icmpv6_nd = {nd}");
                assert_eq!(decide(&rs, &p).action.kernel(), want, "the matcher agrees (type {t}, {nd})");
                assert_eq!(g.neighbor_discovery, u64::from(!rule_classified), "type {t} under {nd}");
                assert_eq!(g.rule_hits, u64::from(rule_classified), "type {t} under {nd}");
                let rule = usize::from(!matches!(t, 134 | 137));
                assert_eq!(after[rule].packets - counters[rule].packets, u64::from(rule_classified), "type {t} counted on its rule under {nd}");
            }
        }
        // ICMPv6 that is not neighbour discovery, and protocol 58 type 134 inside IPv4, are
        // classified either way (here: the default drops them).
        for p in ["icmpv6 fe80::1 -> ff02::1 type 128", "icmpv6 fe80::1 -> ff02::1 type 138"] {
            assert_eq!(prog.run(&spec(p).to_frame()).unwrap(), action::DROP, "{p} under {nd}");
        }
    }
}

/// A rule's limit through the real program, against the reference matcher given a simulated
/// bucket: with `rate = "1/h"` no token comes back during the test, so each bucket lets exactly
/// `burst` packets through and the next rule decides the rest. Per rule, per source (/32 and
/// /24, IPv4 and IPv6 /64), and in bytes.
#[test]
fn limits_let_the_burst_through_then_the_next_rule_decides() {
    if !harness::root_or_skip() {
        return;
    }
    let rs = parse_rules(
        "default = \"pass\"\n\
         [[rule]]\nname = \"ping-limit\"\naction = \"pass\"\nproto = \"icmp\"\nlimit = { rate = \"1/h\", burst = 5 }\n\
         [[rule]]\nname = \"ping-excess\"\naction = \"drop\"\nproto = \"icmp\"\n\
         [[rule]]\nname = \"per-24\"\naction = \"pass\"\nproto = \"udp\"\ndport = 53\nlimit = { rate = \"1/h\", burst = 3, per = \"source/24/64\" }\n\
         [[rule]]\nname = \"dns-excess\"\naction = \"drop\"\nproto = \"udp\"\ndport = 53\n\
         [[rule]]\nname = \"bytes\"\naction = \"drop\"\nproto = \"tcp\"\nlimit = { rate = \"2000 bytes/h\", burst = 200 }\n",
    );
    assert!(rs.rules[4].limit.as_ref().unwrap().bytes);
    let mut prog = load();
    let buffer = activate(&mut prog, &rs);
    let before = prog.maps.global_stats().unwrap();
    // The simulated buckets: tokens left per (rule, source prefix).
    let mut tokens: std::collections::HashMap<(usize, String), i64> = Default::default();
    let packets = [
        "icmp 192.0.2.1 -> 192.0.2.2 type 8",
        "icmp 198.51.100.9 -> 192.0.2.2 type 8",
        "udp 203.0.113.1:5000 -> 192.0.2.2:53",
        "udp 203.0.113.200:5000 -> 192.0.2.2:53",
        "udp 203.0.114.1:5000 -> 192.0.2.2:53",
        "udp [2001:db8:1::1]:5000 -> [2001:db8::2]:53",
        "udp [2001:db8:1::2]:5000 -> [2001:db8::2]:53",
        "udp [2001:db8:2::1]:5000 -> [2001:db8::2]:53",
        "tcp 192.0.2.1:5000 -> 192.0.2.2:80 flags S",
    ];
    let (mut passed_limit, mut beyond) = (std::collections::HashMap::<String, u64>::new(), 0u64);
    for round in 0..8 {
        for text in packets {
            let p = spec(text);
            let frame = p.to_frame();
            let d = xdpfw_rules::matcher::decide_with_limits(&rs, &p, &mut |rule| {
                let limit = rs.rules[rule].limit.as_ref().unwrap();
                let key = match (limit.per_source, p.src) {
                    (None, _) => String::new(),
                    (Some((v4, _)), std::net::IpAddr::V4(a)) => ipnet::Ipv4Net::new(a, v4).unwrap().trunc().to_string(),
                    (Some((_, v6)), std::net::IpAddr::V6(a)) => ipnet::Ipv6Net::new(a, v6).unwrap().trunc().to_string(),
                };
                let cost = if limit.bytes { frame.len() as i64 } else { 1 };
                let left = tokens.entry((rule, key)).or_insert(limit.burst as i64);
                if *left >= cost {
                    *left -= cost;
                    true
                } else {
                    false
                }
            });
            beyond += d.reasons.iter().any(|r| r.contains("beyond its limit")) as u64;
            let verdict = prog.run(&frame).unwrap();
            assert_eq!(action_name(verdict), action_name(d.action.kernel()), "round {round}: {text} ({:?}: {:?})", d.rule_name, d.reasons);
            *passed_limit.entry(d.rule_name.unwrap_or_default()).or_default() += 1;
        }
    }
    // 2 pings × 8 rounds: 5 within the rule's one bucket.
    assert_eq!(passed_limit["ping-limit"], 5);
    assert_eq!(passed_limit["ping-excess"], 11);
    // DNS: 203.0.113.0/24 shares 3, 203.0.114.0/24 has 3, 2001:db8:1::/64 shares 3, 2001:db8:2::/64 has 3.
    assert_eq!(passed_limit["per-24"], 12);
    assert_eq!(passed_limit["dns-excess"], 6 * 8 - 12);
    // 200 bytes hold three 54-byte frames (Ethernet, IPv4 and TCP headers).
    assert_eq!(spec(packets[8]).to_frame().len(), 54);
    assert_eq!(passed_limit["bytes"], 3);
    let g = prog.maps.global_stats().unwrap().since(&before);
    assert_eq!(g.limited, beyond, "packets beyond a limit, counted: {g:?}");
    assert_eq!(g.limit_sources, 4, "one bucket per source prefix");
    let limited = prog.maps.limited(buffer, rs.rules.len() as u32);
    assert_eq!(limited[0] + limited[2] + limited[4], beyond);
    assert_eq!(limited[0], 11);
}

/// The per-source table stays bounded under 100,000 sources: the LRU holds at most
/// `limit::SOURCE_ENTRIES`, every new source is counted, and the difference is the evictions.
#[test]
fn the_per_source_table_stays_bounded() {
    if !harness::root_or_skip() {
        return;
    }
    let rs = parse_rules(
        "default = \"drop\"\n[[rule]]\nname = \"per-source\"\naction = \"pass\"\nproto = \"udp\"\nlimit = { rate = \"10/s\", burst = 2, per = \"source\" }\n",
    );
    let mut prog = load();
    activate(&mut prog, &rs);
    let before = prog.maps.global_stats().unwrap();
    let mut frame = spec("udp 10.0.0.0:5000 -> 192.0.2.2:53").to_frame();
    const SOURCES: u32 = 100_000;
    for i in 0..SOURCES {
        // The IPv4 source address (checksums are not checked).
        frame[ETH + 12..ETH + 16].copy_from_slice(&(0x0a00_0000u32 + i).to_be_bytes());
        assert_eq!(prog.run(&frame).unwrap(), action::PASS, "the first packet of a source is within its burst");
    }
    let g = prog.maps.global_stats().unwrap().since(&before);
    let live = prog.maps.limit_sources() as u64;
    let cap = u64::from(xdpfw_common::limit::SOURCE_ENTRIES);
    assert_eq!(g.limit_sources, u64::from(SOURCES), "every new source counted");
    assert!(live <= cap, "{live} buckets in a table of {cap}");
    assert!(live > cap / 2, "the table is used: {live}");
    eprintln!("100,000 sources: {live} buckets live (of {cap}), {} evicted", g.limit_sources - live);
}
