//! Connection state (`state = "established" | "related"`) through the real programs
//! (BPF_PROG_TEST_RUN on a private, unattached copy): the XDP side's lookups against flows put
//! in the table, the egress program's recording of flows, and their agreement with the
//! reference matcher. Needs root.

mod kernel_support;

use xdpfw_common::{FlowEntry, action, flow};
use xdpfw_rules::{matcher::decide, packet::FlowState};
use xdpfw_testkit as harness;

use kernel_support::*;

const POLICY: &str = "default = \"drop\"\n\
    [[rule]]\nname = \"ssh\"\naction = \"pass\"\nproto = \"tcp\"\ndport = 22\n\
    [[rule]]\nname = \"replies\"\naction = \"pass\"\nstate = \"established\"\n\
    [[rule]]\nname = \"errors\"\naction = \"pass\"\nproto = [\"icmp\", \"icmpv6\"]\nstate = \"related\"\n";

/// Replies pass only while their flow is in the table (and not expired), in every
/// encapsulation; ICMP errors pass when they quote such a flow; the matcher agrees on each.
#[test]
fn replies_pass_only_with_their_flow_in_the_table() {
    if !harness::root_or_skip() {
        return;
    }
    let rs = parse_rules(POLICY);
    let mut prog = load();
    activate(&mut prog, &rs);
    for text in [
        "tcp 203.0.113.5:443 -> 192.0.2.2:40000 flags A",
        "tcp [2001:db8::5]:443 -> [2001:db8::2]:40000 flags PA",
        "udp 203.0.113.5:53 -> 192.0.2.2:40001",
        "udp [2001:db8::5]:53 -> [2001:db8::2]:40001",
        "icmp 203.0.113.5 -> 192.0.2.2 type 0",
        "icmpv6 2001:db8::5 -> 2001:db8::2 type 129",
    ] {
        let new = spec(text);
        let established = spec(&format!("{text} state established"));
        assert_eq!(decide(&rs, &new).action.kernel(), action::DROP, "{text}");
        assert_eq!(decide(&rs, &established).action.kernel(), action::PASS, "{text}");
        // No flow: dropped, in every encapsulation.
        for frame in [new.to_frame(), with_vlan(&new.to_frame(), &[0x8100]), with_vlan(&new.to_frame(), &[0x88a8, 0x8100])] {
            assert_eq!(prog.run(&frame).unwrap(), action::DROP, "{text} without its flow");
        }
        // With its flow: passed, tagged or not, with IPv4 options or IPv6 extension headers.
        let key = established.flow_key();
        prog.maps.insert_flow(key, FlowEntry { expires_ns: u64::MAX, flags: 0, _pad: 0 }).unwrap();
        let before = prog.maps.global_stats().unwrap();
        let mut frames = vec![established.to_frame(), with_vlan(&established.to_frame(), &[0x8100])];
        frames.push(if established.src.is_ipv4() { v4_with_options(&established, 3) } else { v6_with_ext(&established, &[Ext::HopByHop(8)]) });
        for frame in &frames {
            assert_eq!(prog.run(frame).unwrap(), action::PASS, "{text} with its flow");
        }
        let g = prog.maps.global_stats().unwrap().since(&before);
        assert_eq!((g.state_lookups, g.state_established), (3, 3), "{text}");
        // Expired: new again.
        prog.maps.insert_flow(key, FlowEntry { expires_ns: 1, flags: 0, _pad: 0 }).unwrap();
        assert_eq!(prog.run(&established.to_frame()).unwrap(), action::DROP, "{text} with an expired flow");
        prog.maps.remove_flow(&key).unwrap();
    }

    // A packet decided before the state rule (ssh) never looks the table up.
    let before = prog.maps.global_stats().unwrap();
    assert_eq!(prog.run(&spec("tcp 198.51.100.7:5555 -> 192.0.2.2:22").to_frame()).unwrap(), action::PASS);
    assert_eq!(prog.maps.global_stats().unwrap().since(&before).state_lookups, 0);

    // ICMP errors about a flow this host opened are related; about another flow, new.
    for text in ["icmp 198.51.100.1 -> 192.0.2.2 type 3 code 3", "icmpv6 2001:db8:1::1 -> 2001:db8::2 type 1 code 4", "icmp 198.51.100.1 -> 192.0.2.2 type 11"] {
        let related = spec(&format!("{text} state related"));
        assert_eq!(decide(&rs, &related).rule_name.as_deref(), Some("errors"), "{text}");
        assert_eq!(prog.run(&related.to_frame()).unwrap(), action::DROP, "{text} about no flow");
        assert_eq!(prog.run_spec(&related).unwrap(), action::PASS, "{text} about a flow of this host");
    }
}

/// TCP: a FIN from the remote end shortens the flow's life to the closing timeout; an RST
/// removes it (counted), after which the flow's packets are new.
#[test]
fn tcp_flows_close_on_fin_and_rst() {
    if !harness::root_or_skip() {
        return;
    }
    let rs = parse_rules(POLICY);
    let mut prog = load();
    activate(&mut prog, &rs);
    let reply = |flags: &str| spec(&format!("tcp 203.0.113.5:443 -> 192.0.2.2:40000 flags {flags} state established"));
    let key = reply("A").flow_key();
    prog.maps.insert_flow(key, FlowEntry { expires_ns: u64::MAX, flags: 0, _pad: 0 }).unwrap();
    assert_eq!(prog.run(&reply("FA").to_frame()).unwrap(), action::PASS, "the FIN itself belongs to the flow");
    let e = prog.maps.flow(&key).expect("a FIN keeps the flow");
    assert_eq!(e.flags & flow::CLOSING, flow::CLOSING);
    assert!(e.expires_ns < u64::MAX && e.expires_ns > flow::TCP_CLOSING_NS, "closing timeout set: {e:?}");
    assert_eq!(prog.run(&reply("A").to_frame()).unwrap(), action::PASS, "the last ACK of the close");
    let before = prog.maps.global_stats().unwrap();
    assert_eq!(prog.run(&reply("R").to_frame()).unwrap(), action::PASS, "the RST belongs to the flow");
    assert_eq!(prog.maps.global_stats().unwrap().since(&before).flows_closed, 1);
    assert!(prog.maps.flow(&key).is_none(), "an RST removes the flow");
    assert_eq!(prog.run(&reply("A").to_frame()).unwrap(), action::DROP, "after the RST the flow is gone");
}

/// The egress program: what this host sends is recorded under the key of its replies (TCP,
/// UDP, echo requests; IPv4 and IPv6; tagged or not), only while a ruleset uses `state`; an
/// RST removes the flow, a FIN makes it closing, and a later ACK does not reopen it.
#[test]
fn egress_program_records_the_flows_this_host_sends() {
    if !harness::root_or_skip() {
        return;
    }
    let mut prog = load();
    prog.load_egress().expect("loading the egress program (TCX, Linux 6.6+)");
    // Without a state rule nothing is recorded.
    activate(&mut prog, &parse_rules("default = \"pass\"\n"));
    let out = spec("tcp 192.0.2.2:40000 -> 203.0.113.5:443 flags S");
    let reply = spec("tcp 203.0.113.5:443 -> 192.0.2.2:40000 flags SA state established");
    let (verdict, _) = prog.run_egress(&out.to_frame(), 1).unwrap();
    assert_eq!(verdict, -1, "TCX_NEXT: the egress program never decides");
    assert!(prog.maps.flow(&reply.flow_key()).is_none(), "no ruleset uses state: nothing recorded");

    let rs = parse_rules(POLICY);
    activate(&mut prog, &rs);
    for (sent, answer) in [
        ("tcp 192.0.2.2:40000 -> 203.0.113.5:443 flags S", "tcp 203.0.113.5:443 -> 192.0.2.2:40000 flags SA state established"),
        ("tcp [2001:db8::2]:40000 -> [2001:db8::5]:443 flags PA", "tcp [2001:db8::5]:443 -> [2001:db8::2]:40000 flags A state established"),
        ("udp 192.0.2.2:40001 -> 203.0.113.5:53", "udp 203.0.113.5:53 -> 192.0.2.2:40001 state established"),
        ("udp [2001:db8::2]:40001 -> [2001:db8::5]:53", "udp [2001:db8::5]:53 -> [2001:db8::2]:40001 state established"),
        ("icmp 192.0.2.2 -> 203.0.113.5 type 8", "icmp 203.0.113.5 -> 192.0.2.2 type 0 state established"),
        ("icmpv6 2001:db8::2 -> 2001:db8::5 type 128", "icmpv6 2001:db8::5 -> 2001:db8::2 type 129 state established"),
    ] {
        let (sent, answer) = (spec(sent), spec(answer));
        assert_eq!(prog.run(&answer.to_frame()).unwrap(), action::DROP, "{answer} before {sent}");
        let before = prog.maps.global_stats().unwrap();
        prog.run_egress(&with_vlan(&sent.to_frame(), &[0x8100]), 1).unwrap();
        prog.run_egress(&sent.to_frame(), 1).unwrap();
        assert_eq!(prog.maps.global_stats().unwrap().since(&before).flows_new, 1, "{sent}: one new flow, then a refresh");
        let e = prog.maps.flow(&answer.flow_key()).unwrap_or_else(|| panic!("{sent} recorded under its reply's key"));
        assert_eq!(e.flags, 0);
        assert_eq!(prog.run(&answer.to_frame()).unwrap(), action::PASS, "{answer} after {sent}");
        // An ICMP error about what was sent is related (quoting a UDP packet: see to_frame).
        assert_eq!(decide(&rs, &answer).action.kernel(), action::PASS);
    }
    // An echo reply sent (this host answering a ping) is not a flow it opened.
    let answer = spec("icmp 192.0.2.2 -> 203.0.113.9 type 0");
    prog.run_egress(&answer.to_frame(), 1).unwrap();
    assert!(prog.maps.flow(&spec("icmp 203.0.113.9 -> 192.0.2.2 type 8").flow_key()).is_none());

    // FIN: closing, and an ACK after it does not reopen the flow; a new SYN does.
    let key = reply.flow_key();
    prog.run_egress(&spec("tcp 192.0.2.2:40000 -> 203.0.113.5:443 flags FA").to_frame(), 1).unwrap();
    let closing = prog.maps.flow(&key).unwrap();
    assert_eq!(closing.flags, flow::CLOSING);
    prog.run_egress(&spec("tcp 192.0.2.2:40000 -> 203.0.113.5:443 flags A").to_frame(), 1).unwrap();
    assert_eq!(prog.maps.flow(&key).unwrap(), closing, "an ACK after the FIN keeps the short life");
    prog.run_egress(&spec("tcp 192.0.2.2:40000 -> 203.0.113.5:443 flags S").to_frame(), 1).unwrap();
    assert_eq!(prog.maps.flow(&key).unwrap().flags, 0, "a new SYN opens the 4-tuple again");
    // RST: removed and counted.
    let before = prog.maps.global_stats().unwrap();
    prog.run_egress(&spec("tcp 192.0.2.2:40000 -> 203.0.113.5:443 flags R").to_frame(), 1).unwrap();
    assert!(prog.maps.flow(&key).is_none());
    assert_eq!(prog.maps.global_stats().unwrap().since(&before).flows_closed, 1);
    assert_eq!(reply.state, FlowState::Established);
}

/// The flow table is an LRU of `flow::ENTRIES`: 100,000 flows sent leave at most that many
/// entries, the rest evicted (new - closed - entries), and the newest flows work.
#[test]
fn flow_table_stays_bounded() {
    if !harness::root_or_skip() {
        return;
    }
    let mut prog = load();
    prog.load_egress().unwrap();
    activate(&mut prog, &parse_rules(POLICY));
    let before = prog.maps.global_stats().unwrap();
    let n = 100_000u32;
    for i in 0..n {
        let (a, port) = (i / 50_000, 10_000 + (i % 50_000) as u16);
        prog.run_egress(&spec(&format!("udp 192.0.2.2:{port} -> 203.0.113.{}:53", 5 + a)).to_frame(), 1).unwrap();
    }
    let g = prog.maps.global_stats().unwrap().since(&before);
    let entries = prog.maps.flow_entries() as u64;
    assert_eq!(g.flows_new, u64::from(n));
    assert!(entries <= u64::from(flow::ENTRIES), "{entries} entries");
    let evicted = g.flows_new - g.flows_closed - entries;
    assert!(evicted >= u64::from(n - flow::ENTRIES), "{evicted} evicted");
    let newest = spec("udp 203.0.113.6:53 -> 192.0.2.2:59999 state established");
    assert_eq!(prog.run(&newest.to_frame()).unwrap(), action::PASS, "the newest flow is in the table");
}

/// `loader explain --state` (or `state …` in the packet) on `rules/host.toml`: the reference
/// matcher and, with `--kernel`, the real program with the flow in its table agree.
#[test]
fn explain_takes_the_packet_state() {
    if !harness::root_or_skip() {
        return;
    }
    let rules = harness::rules_dir().join("host.toml");
    let explain = |args: &[&str]| {
        let out = std::process::Command::new(harness::loader_bin()).arg("explain").arg(&rules).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let reply = "tcp 203.0.113.80:443 -> 192.0.2.2:41000 flags A";
    let text = explain(&[reply, "--state", "established", "--kernel"]);
    assert!(text.contains("pass by rule #0 \"replies\"") && text.contains("kernel (BPF_PROG_TEST_RUN): pass"), "{text}");
    let text = explain(&[reply, "--kernel"]);
    assert!(text.contains("no rule matched") && text.contains("kernel (BPF_PROG_TEST_RUN): drop"), "{text}");
    let text = explain(&["icmp 203.0.113.1 -> 192.0.2.2 type 3 code 4 state related", "--kernel"]);
    assert!(text.contains("the packet is related") && text.contains("kernel (BPF_PROG_TEST_RUN): pass"), "{text}");
    let out = std::process::Command::new(harness::loader_bin()).arg("explain").arg(&rules).args(["udp 192.0.2.9:1 -> 192.0.2.2:2", "--state", "related"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a state the packet cannot have is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("only ICMP errors"), "{}", String::from_utf8_lossy(&out.stderr));
}
