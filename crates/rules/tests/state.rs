//! `state` conditions in the language: parsing, errors with file:line:column, the reference
//! matcher, the shadowing lint and the compiled tables.

use std::path::Path;

use xdpfw_common::{field, fields_layout::STATE_BASE, flow, header_flags, rule_flags};
use xdpfw_rules::{Action, compile::compile, matcher::decide, packet::{FlowState, PacketSpec}, parse};

fn err(text: &str) -> String {
    parse(Path::new("r.toml"), text).unwrap_err().to_string()
}

fn pkt(s: &str) -> PacketSpec {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

const RULE: &str = "default = \"drop\"\n[[rule]]\naction = \"pass\"\n";

#[test]
fn state_errors_say_where() {
    for (state, message) in [
        ("\"open\"", "r.toml:4:9: error: unknown state \"open\" (expected new, established or related)"),
        ("[]", "r.toml:4:9: error: an empty state list matches nothing"),
        ("1", "r.toml:4:9: error: state must be \"new\", \"established\", \"related\" or a list of them, not 1"),
        ("[\"established\", 2]", "r.toml:4:9: error: state must be"),
    ] {
        let e = err(&format!("{RULE}state = {state}\n"));
        assert!(e.starts_with(message), "{state}: {e}");
    }
    let e = err(&format!("{RULE}proto = \"tcp\"\nstate = \"related\"\n"));
    assert!(e.starts_with("r.toml:5:9: error: state \"related\" matches ICMP errors only"), "{e}");
}

#[test]
fn state_is_matched_explained_and_compiled() {
    let rs = parse(
        Path::new("r.toml"),
        "default = \"drop\"\n\
         [[rule]]\nname = \"replies\"\naction = \"pass\"\nstate = [\"established\", \"related\"]\n\
         [[rule]]\nname = \"ssh\"\naction = \"pass\"\nproto = \"tcp\"\ndport = 22\n\
         [[rule]]\nname = \"later-replies\"\naction = \"drop\"\nstate = \"established\"\nproto = \"udp\"\n\
         [[test]]\npacket = \"tcp 203.0.113.5:443 -> 192.0.2.2:40000 flags A state established\"\nexpect = \"pass\"\nrule = \"replies\"\n\
         [[test]]\npacket = \"tcp 203.0.113.5:443 -> 192.0.2.2:40000 flags A\"\nexpect = \"drop\"\n",
    )
    .unwrap();
    assert_eq!(rs.rules[0].state, Some(vec![FlowState::Established, FlowState::Related]));
    xdpfw_rules::selftest::check_self_tests(&rs).unwrap();
    let d = decide(&rs, &pkt("udp 203.0.113.5:53 -> 192.0.2.2:40000 state established"));
    assert_eq!((d.action, d.rule_name.as_deref()), (Action::Pass, Some("replies")));
    assert!(d.reasons.iter().any(|r| r.contains("the packet is established (a reply of a flow this host opened")), "{d:?}");
    let d = decide(&rs, &pkt("icmp 198.51.100.1 -> 192.0.2.2 type 3 state related"));
    assert_eq!(d.rule_name.as_deref(), Some("replies"));
    let d = decide(&rs, &pkt("udp 203.0.113.5:53 -> 192.0.2.2:40000"));
    assert_eq!((d.action, d.rule), (Action::Drop, None));
    // The third rule is shadowed by the first (a narrower state, any protocol); the second is not.
    assert_eq!(xdpfw_rules::matcher::shadowed_rules(&rs), vec![(2, 0)]);

    let img = compile(&rs).unwrap();
    assert_eq!(img.header.fields & field::STATE, field::STATE);
    assert_eq!(img.header.flags & header_flags::STATE, header_flags::STATE);
    assert_eq!(img.rules.iter().map(|r| r.flags & rule_flags::STATEFUL).collect::<Vec<_>>(), [rule_flags::STATEFUL, 0, rule_flags::STATEFUL]);
    let bits = |st: u32| img.bitmaps[img.fields[(STATE_BASE + st) as usize].bitmap as usize].words[0];
    assert_eq!(bits(flow::NEW), 0b010, "new: only the rule without a state condition");
    assert_eq!(bits(flow::ESTABLISHED), 0b111);
    assert_eq!(bits(flow::RELATED), 0b011);

    // Without `state`, nothing of it is compiled (the kernel never looks the table up).
    let plain = parse(Path::new("r.toml"), "default = \"pass\"\n[[rule]]\naction = \"drop\"\nproto = \"udp\"\n").unwrap();
    let img = compile(&plain).unwrap();
    assert_eq!((img.header.fields & field::STATE, img.header.flags & header_flags::STATE), (0, 0));
}

#[test]
fn vlan_errors_say_where_and_vlans_are_matched() {
    for (vlan, message) in [
        ("5000", "r.toml:4:8: error: vlan id 5000 is out of range (1-4094)"),
        ("0", "r.toml:4:8: error: vlan id 0 is out of range (1-4094)"),
        ("[100, 4095]", "r.toml:4:8: error: vlan id 4095 is out of range (1-4094)"),
        ("\"100\"", "r.toml:4:8: error: vlan must be an id 1-4094 or a list of them"),
        ("[]", "r.toml:4:8: error: an empty vlan list matches nothing"),
    ] {
        let e = err(&format!("{RULE}vlan = {vlan}\n"));
        assert!(e.starts_with(message), "{vlan}: {e}");
    }
    let rs = parse(Path::new("r.toml"), &format!("{RULE}name = \"v\"\nvlan = [200, 100, 100]\n")).unwrap();
    assert_eq!(rs.rules[0].vlan, Some(vec![100, 200]));
    assert_eq!(decide(&rs, &pkt("udp 192.0.2.1:1 -> 192.0.2.2:2 vlan 200")).rule_name.as_deref(), Some("v"));
    let d = decide(&rs, &pkt("udp 192.0.2.1:1 -> 192.0.2.2:2"));
    assert_eq!(d.rule, None);
    let why = xdpfw_rules::matcher::explain_rule(&rs.rules[0], &pkt("udp 192.0.2.1:1 -> 192.0.2.2:2")).unwrap_err();
    assert!(why.contains("no VLAN tag"), "{why}");
    let img = compile(&rs).unwrap();
    assert_eq!(img.header.fields & field::VLAN, field::VLAN);
    let bits = |i: u32| img.bitmaps[img.fields[(xdpfw_common::fields_layout::VLAN_BASE + i) as usize].bitmap as usize].words[0];
    assert_eq!((bits(100), bits(200), bits(101), bits(xdpfw_common::fields_layout::VLAN_UNTAGGED)), (1, 1, 0, 0));
}

/// Owner rules are decided in userspace without the packet's state: the two on one rule would
/// be decided wrongly, so they are refused.
#[test]
fn state_and_owner_on_one_rule_are_refused() {
    let e = err(&format!("{RULE}proto = \"tcp\"\nowner = {{ uid = 0 }}\nstate = \"established\"\n"));
    assert!(e.starts_with("r.toml:6:9: error: state and owner conditions cannot be on one rule"), "{e}");
}
