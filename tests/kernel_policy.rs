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
