//! Crafted frames through the real XDP program (BPF_PROG_TEST_RUN on a private, unattached
//! copy): known verdicts and counters for every kind of frame the parser meets, malformed ones
//! included. Needs root (or CAP_BPF + CAP_NET_ADMIN) to load the program.

mod kernel_support;


use xdpfw_rules::{
    Action, Ruleset,
    frame::FrameClass,
    matcher::decide,
    packet::PacketSpec,
};
use xdpfw_common::{GlobalStats, action};
use xdpfw_testkit as harness;

use kernel_support::*;

/// Which counter explains a verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Truncated or inconsistent headers (`malformed`).
    Malformed,
    /// Not IPv4/IPv6 (`non_ip`).
    NonIp,
    /// ICMPv6 types 133-137 (`neighbor_discovery`).
    NeighborDiscovery,
    /// A non-first fragment decided by options.fragments = "drop" | "pass".
    FragmentPolicy,
    /// Decided by the named rule (`rule_hits`).
    Rule(&'static str),
    /// Decided by the default action (`default_hits`).
    Default,
}

struct Case {
    name: String,
    rules: String,
    frame: Vec<u8>,
    /// What the frame carries, for well-formed frames: the reference matcher must agree.
    spec: Option<PacketSpec>,
    expect: Action,
    class: Class,
}

fn expected_delta(case: &Case) -> GlobalStats {
    let mut d = GlobalStats { seen: 1, bytes: case.frame.len() as u64, ..Default::default() };
    match case.expect {
        Action::Pass => d.passed = 1,
        Action::Drop => d.dropped = 1,
    }
    match case.class {
        Class::Malformed => d.malformed = 1,
        Class::NonIp => d.non_ip = 1,
        _ => {
            let p = case.spec.as_ref().expect("a classified case needs a spec");
            if p.src.is_ipv6() {
                d.ipv6 = 1;
            } else {
                d.ipv4 = 1;
            }
            d.fragments = p.fragment as u64;
            match case.class {
                Class::NeighborDiscovery => d.neighbor_discovery = 1,
                Class::Rule(_) => d.rule_hits = 1,
                Class::Default => d.default_hits = 1,
                _ => {}
            }
        }
    }
    d
}

const BASIC: &str = r#"
default = "drop"

[[rule]]
name = "ssh"
action = "pass"
proto = "tcp"
dport = 22

[[rule]]
name = "dns"
action = "pass"
proto = "udp"
dport = 53

[[rule]]
name = "v6-web"
action = "pass"
dst = ["2001:db8::/32"]
proto = "tcp"
dport = 443

[[rule]]
name = "no-icmpv6"
action = "drop"
proto = "icmpv6"

[[rule]]
name = "echo"
action = "pass"
proto = "icmp"
icmp_type = 8
icmp_code = 0

[[rule]]
name = "unreachable"
action = "pass"
proto = "icmp"
icmp_type = 3

[[rule]]
name = "web-syn"
action = "pass"
proto = "tcp"
dport = 80
tcp_flags = "syn !ack"
"#;

const FLAGS: &str = r#"
default = "pass"

[[rule]]
name = "no-new-8080"
action = "drop"
proto = "tcp"
dport = 8080
tcp_flags = "syn !ack"

[[rule]]
name = "no-new-8081"
action = "drop"
proto = "tcp"
dport = 8081
tcp_flags = "S/SA"

[[rule]]
name = "no-xmas"
action = "drop"
proto = "tcp"
tcp_flags = "fin psh urg"
"#;

fn frag_rules(policy: &str) -> String {
    format!(
        r#"
default = "drop"
[options]
fragments = "{policy}"

[[rule]]
name = "ssh"
action = "pass"
proto = "tcp"
dport = 22

[[rule]]
name = "trusted"
action = "pass"
src = ["203.0.113.0/24", "2001:db8:7::/48"]
"#
    )
}

fn cases() -> Vec<Case> {
    use Action::{Drop, Pass};
    let mut v = Vec::new();
    let mut well = |name: &str, rules: &str, frame: Vec<u8>, spec: PacketSpec, expect, class| {
        v.push(Case { name: name.into(), rules: rules.into(), frame, spec: Some(spec), expect, class });
    };
    // Well-formed frames straight from their spec.
    let plain: &[(&str, &str, &str, Action, Class)] = &[
        ("tcp ssh", BASIC, "tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S", Pass, Class::Rule("ssh")),
        ("tcp default", BASIC, "tcp 192.0.2.1:1000 -> 192.0.2.2:23 flags S", Drop, Class::Default),
        ("udp dns", BASIC, "udp 192.0.2.1:1000 -> 192.0.2.2:53", Pass, Class::Rule("dns")),
        ("udp v6 dns", BASIC, "udp [2001:db8::1]:1000 -> [2001:db8::2]:53", Pass, Class::Rule("dns")),
        ("v6 web", BASIC, "tcp [2001:db8::1]:1000 -> [2001:db8::2]:443 flags S", Pass, Class::Rule("v6-web")),
        ("v6 web outside 2001:db8::/32", BASIC, "tcp [2001:db9::1]:1000 -> [2001:db9::2]:443 flags S", Drop, Class::Default),
        ("v4 443 is not v6-web", BASIC, "tcp 192.0.2.1:1000 -> 192.0.2.2:443 flags S", Drop, Class::Default),
        ("gre not dissected", BASIC, "47 192.0.2.1 -> 192.0.2.2", Drop, Class::Default),
        // ICMP type/code.
        ("icmp echo code 0", BASIC, "icmp 192.0.2.1 -> 192.0.2.2 type 8 code 0", Pass, Class::Rule("echo")),
        ("icmp echo code 1", BASIC, "icmp 192.0.2.1 -> 192.0.2.2 type 8 code 1", Drop, Class::Default),
        ("icmp echo reply", BASIC, "icmp 192.0.2.1 -> 192.0.2.2 type 0", Drop, Class::Default),
        ("icmp unreachable any code", BASIC, "icmp 192.0.2.1 -> 192.0.2.2 type 3 code 13", Pass, Class::Rule("unreachable")),
        ("icmp unreachable code 0", BASIC, "icmp 192.0.2.1 -> 192.0.2.2 type 3 code 0", Pass, Class::Rule("unreachable")),
        // Protocol 1 over IPv6 is still "icmp" to the rules (by number).
        ("icmp (proto 1) over ipv6", BASIC, "icmp 2001:db8::1 -> 2001:db8::2 type 8", Pass, Class::Rule("echo")),
        // ICMPv6: neighbour discovery and router messages pass despite default drop and a rule
        // dropping every ICMPv6 packet; the rest of ICMPv6 hits that rule.
        ("icmpv6 echo", BASIC, "icmpv6 2001:db8::1 -> 2001:db8::2 type 128", Drop, Class::Rule("no-icmpv6")),
        ("icmpv6 type 132", BASIC, "icmpv6 fe80::1 -> ff02::1 type 132", Drop, Class::Rule("no-icmpv6")),
        ("icmpv6 router solicitation", BASIC, "icmpv6 fe80::1 -> ff02::2 type 133", Pass, Class::NeighborDiscovery),
        ("icmpv6 router advertisement", BASIC, "icmpv6 fe80::1 -> ff02::1 type 134", Pass, Class::NeighborDiscovery),
        ("icmpv6 neighbour solicitation", BASIC, "icmpv6 fe80::1 -> ff02::1:ff00:2 type 135", Pass, Class::NeighborDiscovery),
        ("icmpv6 neighbour advertisement", BASIC, "icmpv6 fe80::2 -> fe80::1 type 136", Pass, Class::NeighborDiscovery),
        ("icmpv6 redirect", BASIC, "icmpv6 fe80::2 -> fe80::1 type 137 code 0", Pass, Class::NeighborDiscovery),
        ("icmpv6 type 138", BASIC, "icmpv6 fe80::2 -> fe80::1 type 138", Drop, Class::Rule("no-icmpv6")),
        // Neighbour discovery is an IPv6 thing: protocol 58 over IPv4 is just a packet.
        ("icmpv6 type 135 over ipv4", BASIC, "icmpv6 192.0.2.1 -> 192.0.2.2 type 135", Drop, Class::Rule("no-icmpv6")),
        // TCP flags.
        ("syn !ack: SYN", BASIC, "tcp 192.0.2.1:1000 -> 192.0.2.2:80 flags S", Pass, Class::Rule("web-syn")),
        ("syn !ack: SYN+ECE+CWR", BASIC, "tcp 192.0.2.1:1000 -> 192.0.2.2:80 flags SEC", Pass, Class::Rule("web-syn")),
        ("syn !ack: SYN-ACK", BASIC, "tcp 192.0.2.1:1000 -> 192.0.2.2:80 flags SA", Drop, Class::Default),
        ("syn !ack: ACK", BASIC, "tcp 192.0.2.1:1000 -> 192.0.2.2:80 flags A", Drop, Class::Default),
        ("syn !ack: none", BASIC, "tcp 192.0.2.1:1000 -> 192.0.2.2:80 flags none", Drop, Class::Default),
        ("flags drop SYN", FLAGS, "tcp 192.0.2.1:1000 -> 192.0.2.2:8080 flags S", Drop, Class::Rule("no-new-8080")),
        ("flags SYN-ACK passes", FLAGS, "tcp 192.0.2.1:1000 -> 192.0.2.2:8080 flags SA", Pass, Class::Default),
        ("flags S/SA drops SYN+PSH", FLAGS, "tcp 192.0.2.1:1000 -> 192.0.2.2:8081 flags SP", Drop, Class::Rule("no-new-8081")),
        ("flags S/SA passes SYN-ACK", FLAGS, "tcp [2001:db8::1]:1000 -> [2001:db8::2]:8081 flags SA", Pass, Class::Default),
        ("flags xmas", FLAGS, "tcp 192.0.2.1:1000 -> 192.0.2.2:9 flags FPU", Drop, Class::Rule("no-xmas")),
        ("flags xmas with ack", FLAGS, "tcp 192.0.2.1:1000 -> 192.0.2.2:9 flags FPUA", Drop, Class::Rule("no-xmas")),
        ("flags not quite xmas", FLAGS, "tcp 192.0.2.1:1000 -> 192.0.2.2:9 flags FP", Pass, Class::Default),
    ];
    for (name, rules, s, expect, class) in plain {
        let p = if s.ends_with("flags none") {
            let mut p = spec(&s.replace(" flags none", ""));
            p.tcp_flags = 0;
            p
        } else {
            spec(s)
        };
        well(name, rules, p.to_frame(), p, *expect, *class);
    }

    // VLAN tags: one (802.1Q) and two (802.1ad then 802.1Q) are walked. A default-drop packet
    // shows the frame really was classified rather than passed as non-IP.
    for tags in [&[0x8100u16][..], &[0x88a8], &[0x88a8, 0x8100], &[0x8100, 0x8100]] {
        for (s, expect, class) in [
            ("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S", Pass, Class::Rule("ssh")),
            ("tcp 192.0.2.1:1000 -> 192.0.2.2:23 flags S", Drop, Class::Default),
            ("tcp [2001:db8::1]:1000 -> [2001:db8::2]:443 flags S", Pass, Class::Rule("v6-web")),
            ("icmpv6 fe80::1 -> ff02::1:ff00:2 type 135", Pass, Class::NeighborDiscovery),
        ] {
            let p = spec(s);
            well(&format!("vlan {tags:x?} {s}"), BASIC, with_vlan(&p.to_frame(), tags), p, expect, class);
        }
    }

    // IPv4 with options: IHL 6..=15, still classified by its ports.
    for words in 1..=10 {
        let p = spec("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S");
        well(&format!("ipv4 ihl {}", 5 + words), BASIC, v4_with_options(&p, words), p, Pass, Class::Rule("ssh"));
        let p = spec("udp 192.0.2.1:1000 -> 192.0.2.2:54");
        well(&format!("ipv4 ihl {} udp", 5 + words), BASIC, v4_with_options(&p, words), p, Drop, Class::Default);
    }
    // DF set is not a fragment.
    {
        let p = spec("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S");
        let mut f = p.to_frame();
        set_be16(&mut f, ETH + 6, 0x4000);
        well("ipv4 DF", BASIC, f, p, Pass, Class::Rule("ssh"));
    }

    // IPv6 extension chains.
    let web = spec("tcp [2001:db8::1]:1000 -> [2001:db8::2]:443 flags S");
    let web_miss = spec("tcp [2001:db8::1]:1000 -> [2001:db8::2]:444 flags S");
    let chain = [Ext::HopByHop(8), Ext::Routing(24), Ext::DstOpts(16)];
    well("ipv6 hop+routing+dstopts", BASIC, v6_with_ext(&web, &chain), web.clone(), Pass, Class::Rule("v6-web"));
    well("ipv6 hop+routing+dstopts miss", BASIC, v6_with_ext(&web_miss, &chain), web_miss.clone(), Drop, Class::Default);
    let ah = [Ext::HopByHop(8), Ext::Ah(24), Ext::DstOpts(8)];
    well("ipv6 hop+ah+dstopts", BASIC, v6_with_ext(&web, &ah), web.clone(), Pass, Class::Rule("v6-web"));
    let nd = spec("icmpv6 fe80::1 -> ff02::1:ff00:2 type 135");
    well("ipv6 hop + neighbour solicitation", BASIC, v6_with_ext(&nd, &[Ext::HopByHop(8)]), nd, Pass, Class::NeighborDiscovery);
    let echo6 = spec("icmpv6 2001:db8::1 -> 2001:db8::2 type 128");
    well("ipv6 dstopts + echo", BASIC, v6_with_ext(&echo6, &[Ext::DstOpts(8)]), echo6, Drop, Class::Rule("no-icmpv6"));
    // Up to MAX_IPV6_EXT (8) extension headers are walked.
    for n in 1..=8 {
        let exts = vec![Ext::DstOpts(8); n];
        well(&format!("ipv6 {n} extension headers"), BASIC, v6_with_ext(&web, &exts), web.clone(), Pass, Class::Rule("v6-web"));
    }

    // Fragments under each policy.
    for policy in ["l3-only", "drop", "pass"] {
        let rules = frag_rules(policy);
        let fixed = |l3: (Action, Class)| match policy {
            "drop" => (Drop, Class::FragmentPolicy),
            "pass" => (Pass, Class::FragmentPolicy),
            _ => l3,
        };
        // Non-first fragments: the dport rule cannot match (no transport header), the src rule can.
        for (s, l3) in [
            ("tcp 192.0.2.1:1000 -> 192.0.2.2:22 fragment", (Drop, Class::Default)),
            ("tcp 203.0.113.9:1000 -> 192.0.2.2:22 fragment", (Pass, Class::Rule("trusted"))),
            ("udp 203.0.113.9:1000 -> 192.0.2.2:22 fragment", (Pass, Class::Rule("trusted"))),
            ("tcp [2001:db8::1]:1000 -> [2001:db8::2]:22 fragment", (Drop, Class::Default)),
            ("tcp [2001:db8:7::1]:1000 -> [2001:db8::2]:22 fragment", (Pass, Class::Rule("trusted"))),
            // A non-first fragment that happens to carry ICMPv6: no type to look at, not ND.
            ("icmpv6 fe80::1 -> ff02::1 fragment", (Drop, Class::Default)),
        ] {
            let p = spec(s);
            let (expect, class) = fixed(l3);
            well(&format!("{policy}: {s}"), &rules, p.to_frame(), p, expect, class);
        }
        // IPv4 middle fragment (MF set and an offset).
        let p = spec("tcp 192.0.2.1:1000 -> 192.0.2.2:22 fragment");
        let mut f = p.to_frame();
        set_be16(&mut f, ETH + 6, 0x2000 | 7);
        let (expect, class) = fixed((Drop, Class::Default));
        well(&format!("{policy}: ipv4 middle fragment"), &rules, f, p, expect, class);
        // IPv6 last fragment (offset, no M) behind a hop-by-hop header, from a trusted source.
        let whole = spec("tcp [2001:db8:7::1]:1000 -> [2001:db8::2]:23 flags S");
        let mut p = whole.clone();
        p.fragment = true;
        let f = v6_with_ext(&whole, &[Ext::HopByHop(8), Ext::Fragment { offset: 64, more: false }]);
        let (expect, class) = fixed((Pass, Class::Rule("trusted")));
        well(&format!("{policy}: ipv6 hop + last fragment"), &rules, f, p, expect, class);
        // First fragments (offset 0, more fragments) carry the transport header: classified as
        // whole packets whatever the policy.
        for (s, expect, class) in [
            ("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S", Pass, Class::Rule("ssh")),
            ("tcp 192.0.2.1:1000 -> 192.0.2.2:23 flags S", Drop, Class::Default),
        ] {
            let p = spec(s);
            let mut f = p.to_frame();
            set_be16(&mut f, ETH + 6, 0x2000);
            well(&format!("{policy}: ipv4 first fragment {s}"), &rules, f, p, expect, class);
        }
        for (s, expect, class) in [
            ("tcp [2001:db8::1]:1000 -> [2001:db8::2]:22 flags S", Pass, Class::Rule("ssh")),
            ("tcp [2001:db8::1]:1000 -> [2001:db8::2]:23 flags S", Drop, Class::Default),
        ] {
            let p = spec(s);
            let f = v6_with_ext(&p, &[Ext::Fragment { offset: 0, more: true }]);
            well(&format!("{policy}: ipv6 first fragment {s}"), &rules, f, p, expect, class);
        }
    }

    // Malformed and non-IP frames: no spec, the matcher has nothing to say about them.
    let mut raw = |name: &str, rules: &str, frame: Vec<u8>, expect, class| {
        v.push(Case { name: name.into(), rules: rules.into(), frame, spec: None, expect, class });
    };
    // Non-IP passes even with default = "drop".
    raw("arp", BASIC, arp_frame(), Pass, Class::NonIp);
    raw("lldp", BASIC, [eth(0x88cc), vec![0; 32]].concat(), Pass, Class::NonIp);
    raw("ethertype 0, header only", BASIC, eth(0), Pass, Class::NonIp);
    raw("vlan then arp", BASIC, with_vlan(&arp_frame(), &[0x8100]), Pass, Class::NonIp);
    // Three tags or more: only MAX_VLAN_TAGS = 2 are walked, and a third is malformed (it used
    // to pass as non-IP, unclassified, whatever the rules: issue 10). The packet would pass.
    let p = spec("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S");
    raw("three vlan tags: malformed", BASIC, with_vlan(&p.to_frame(), &[0x88a8, 0x8100, 0x8100]), Drop, Class::Malformed);
    raw("four vlan tags: malformed", BASIC, with_vlan(&p.to_frame(), &[0x8100; 4]), Drop, Class::Malformed);
    raw("three vlan tags then arp: malformed", BASIC, with_vlan(&arp_frame(), &[0x8100; 3]), Drop, Class::Malformed);
    let p = spec("tcp 192.0.2.1:1000 -> 192.0.2.2:23 flags S");

    // Truncated Ethernet/VLAN headers. (Frames shorter than the 14-byte Ethernet header cannot
    // be run at all: see `kernel_refuses_frames_shorter_than_ethernet`.)
    let tagged = with_vlan(&p.to_frame(), &[0x8100]);
    for len in 14..18 {
        raw(&format!("vlan tag truncated to {len} bytes"), BASIC, tagged[..len].to_vec(), Drop, Class::Malformed);
    }
    let qinq = with_vlan(&p.to_frame(), &[0x88a8, 0x8100]);
    raw("second vlan tag truncated", BASIC, qinq[..20].to_vec(), Drop, Class::Malformed);
    raw("ipv4 ethertype, no ip header", BASIC, eth(0x0800), Drop, Class::Malformed);
    raw("ipv6 ethertype, no ip header", BASIC, eth(0x86DD), Drop, Class::Malformed);

    // IPv4 header problems. The base packet would pass (rule ssh).
    let ssh = spec("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S").to_frame();
    raw("ipv4 header truncated", BASIC, ssh[..ETH + 19].to_vec(), Drop, Class::Malformed);
    for ihl in 0..5u8 {
        let mut f = ssh.clone();
        f[ETH] = 0x40 | ihl;
        raw(&format!("ipv4 ihl {ihl}"), BASIC, f, Drop, Class::Malformed);
    }
    for ihl in 11..=15u8 {
        // Options claimed beyond the end of the frame (IP + TCP is only 40 bytes), with a total
        // length consistent with the IHL so only the frame end is wrong.
        let mut f = ssh.clone();
        f[ETH] = 0x40 | ihl;
        set_be16(&mut f, ETH + 2, ihl as u16 * 4 + 20);
        raw(&format!("ipv4 ihl {ihl} beyond frame end"), BASIC, f, Drop, Class::Malformed);
    }
    {
        let mut f = ssh.clone();
        f[ETH] = 0x65;
        raw("ipv4 ethertype, version 6", BASIC, f, Drop, Class::Malformed);
        let mut f = ssh.clone();
        set_be16(&mut f, ETH + 2, 19);
        raw("ipv4 total length < ihl", BASIC, f, Drop, Class::Malformed);
    }
    // IPv4 options present, then the transport header truncated.
    let opt = v4_with_options(&spec("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S"), 3);
    raw("ipv4 options, tcp truncated", BASIC, opt[..opt.len() - 1].to_vec(), Drop, Class::Malformed);

    // Transport header problems.
    for (s, keep) in [
        ("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S", 19),
        ("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S", 0),
        ("tcp [2001:db8::1]:1000 -> [2001:db8::2]:443 flags S", 19),
        ("udp 192.0.2.1:1000 -> 192.0.2.2:53", 7),
        ("udp 192.0.2.1:1000 -> 192.0.2.2:53", 0),
        ("udp [2001:db8::1]:1000 -> [2001:db8::2]:53", 7),
        ("icmp 192.0.2.1 -> 192.0.2.2 type 8", 3),
        ("icmpv6 fe80::1 -> ff02::1:ff00:2 type 135", 3),
    ] {
        let p = spec(s);
        let f = p.to_frame();
        let l3 = if p.src.is_ipv6() { 40 } else { 20 };
        raw(&format!("{s}: transport truncated to {keep}"), BASIC, f[..ETH + l3 + keep].to_vec(), Drop, Class::Malformed);
    }
    for doff in [0u8, 1, 4] {
        let p = spec("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S");
        let mut f = p.to_frame();
        f[ETH + 20 + 12] = doff << 4;
        raw(&format!("tcp data offset {doff}"), BASIC, f, Drop, Class::Malformed);
        let p = spec("tcp [2001:db8::1]:1000 -> [2001:db8::2]:443 flags S");
        let mut f = p.to_frame();
        f[ETH + 40 + 12] = doff << 4;
        raw(&format!("ipv6 tcp data offset {doff}"), BASIC, f, Drop, Class::Malformed);
    }

    // IPv6 header and extension chain problems.
    let web_frame = web.to_frame();
    raw("ipv6 header truncated", BASIC, web_frame[..ETH + 39].to_vec(), Drop, Class::Malformed);
    {
        let mut f = web_frame.clone();
        f[ETH] = 0x40;
        raw("ipv6 ethertype, version 4", BASIC, f, Drop, Class::Malformed);
    }
    for n in [9, 10, 16] {
        let exts = vec![Ext::DstOpts(8); n];
        raw(&format!("ipv6 {n} extension headers"), BASIC, v6_with_ext(&web, &exts), Drop, Class::Malformed);
    }
    {
        // Eight walked headers followed by a fragment header: that is a ninth.
        let mut exts = vec![Ext::DstOpts(8); 8];
        exts.push(Ext::Fragment { offset: 0, more: true });
        raw("ipv6 8 extension headers + fragment header", BASIC, v6_with_ext(&web, &exts), Drop, Class::Malformed);
    }
    let f = v6_with_ext(&web, &[Ext::HopByHop(8)]);
    raw("ipv6 hop-by-hop truncated", BASIC, f[..ETH + 40 + 1].to_vec(), Drop, Class::Malformed);
    let f = v6_with_ext(&web, &[Ext::HopByHop(8), Ext::Fragment { offset: 0, more: true }]);
    raw("ipv6 fragment header truncated", BASIC, f[..ETH + 40 + 8 + 3].to_vec(), Drop, Class::Malformed);
    {
        // A hop-by-hop header claiming 2048 bytes: the TCP header would be past the frame end.
        let mut f = v6_with_ext(&web, &[Ext::HopByHop(16)]);
        f[ETH + 40 + 1] = 255;
        raw("ipv6 hop-by-hop longer than the frame", BASIC, f, Drop, Class::Malformed);
    }
    {
        let f = v6_with_ext(&web, &[Ext::Ah(24)]);
        raw("ipv6 ah, tcp truncated", BASIC, f[..f.len() - 2].to_vec(), Drop, Class::Malformed);
    }

    // IP lengths beyond the frame end: truncated packets, malformed (they used to be classified:
    // issue 10). Each packet would pass; its length is one byte (or all) beyond the frame.
    let ssh_v6 = spec("tcp [2001:db8::1]:1000 -> [2001:db8::2]:22 flags S").to_frame();
    for extra in [1u16, 1000] {
        let mut f = ssh.clone();
        let len = get_be16(&f, ETH + 2) + extra;
        set_be16(&mut f, ETH + 2, len);
        raw(&format!("ipv4 total length {extra} beyond the frame"), BASIC, f, Drop, Class::Malformed);
        let mut f = ssh_v6.clone();
        let len = get_be16(&f, ETH + 4) + extra;
        set_be16(&mut f, ETH + 4, len);
        raw(&format!("ipv6 payload length {extra} beyond the frame"), BASIC, f, Drop, Class::Malformed);
    }
    let mut f = ssh.clone();
    set_be16(&mut f, ETH + 2, 0xffff);
    raw("ipv4 total length 65535", BASIC, f, Drop, Class::Malformed);
    let mut f = opt.clone();
    let len = get_be16(&f, ETH + 2) + 1;
    set_be16(&mut f, ETH + 2, len);
    raw("ipv4 options, total length beyond the frame", BASIC, f, Drop, Class::Malformed);
    drop(raw);
    // Shorter than the frame (Ethernet padding, or a jumbogram's 0) is fine.
    let p = spec("tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S");
    let padded = [p.to_frame(), vec![0; 20]].concat();
    v.push(Case { name: "ipv4 with padding after the datagram".into(), rules: BASIC.into(), frame: padded, spec: Some(p), expect: Pass, class: Class::Rule("ssh") });
    let p = spec("tcp [2001:db8::1]:1000 -> [2001:db8::2]:22 flags S");
    let mut f = p.to_frame();
    set_be16(&mut f, ETH + 4, 0);
    v.push(Case { name: "ipv6 payload length 0".into(), rules: BASIC.into(), frame: f, spec: Some(p), expect: Pass, class: Class::Rule("ssh") });

    // IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are never valid on the wire and would reach
    // a dual-stack socket as IPv4 around the IPv4 rules: malformed, for the matcher too.
    for s in [
        "tcp [::ffff:192.0.2.1]:1000 -> [2001:db8::2]:443 flags S",
        "tcp [2001:db8::1]:1000 -> [::ffff:192.0.2.2]:22 flags S",
        "udp [::ffff:203.0.113.9]:1000 -> [2001:db8::2]:53",
    ] {
        let p = spec(s);
        v.push(Case { name: format!("ipv4-mapped {s}"), rules: BASIC.into(), frame: p.to_frame(), spec: Some(p), expect: Drop, class: Class::Malformed });
    }
    // Not mapped: ::ffff:0:0:0/96 (IPv4-translated) and ::ffff alone are ordinary addresses.
    let p = spec("tcp [::ffff:0:c000:201]:1000 -> [2001:db8::2]:443 flags S");
    v.push(Case { name: "ipv4-translated source".into(), rules: BASIC.into(), frame: p.to_frame(), spec: Some(p), expect: Pass, class: Class::Rule("v6-web") });
    v
}

#[test]
fn kernel_refuses_frames_shorter_than_ethernet() {
    if !harness::root_or_skip() {
        return;
    }
    // BPF_PROG_TEST_RUN rejects XDP input shorter than ETH_HLEN (EINVAL), so the program can
    // never be handed a frame with a truncated Ethernet header; neither can a NIC deliver one.
    // The parser's own check for it is covered by the truncated-VLAN cases.
    let mut prog = load();
    activate(&mut prog, &parse_rules(BASIC));
    for len in [0, 1, 6, 12, 13] {
        assert!(prog.run(&eth(0x0800)[..len]).is_err(), "a {len}-byte frame was accepted by BPF_PROG_TEST_RUN");
    }
    assert_eq!(prog.run(&eth(0x0800)).unwrap(), action::DROP, "14-byte IPv4 frame: malformed");
}

#[test]
fn crafted_frames() {
    if !harness::root_or_skip() {
        return;
    }
    let mut prog = load();
    let cases = cases();
    assert!(cases.len() > 150, "only {} cases", cases.len());
    let mut current: Option<(String, Ruleset, u32)> = None;
    let mut failures = Vec::new();
    for case in &cases {
        if current.as_ref().is_none_or(|(text, _, _)| *text != case.rules) {
            let rs = parse_rules(&case.rules);
            let buffer = activate(&mut prog, &rs);
            current = Some((case.rules.clone(), rs, buffer));
        }
        let (_, rs, buffer) = current.as_ref().unwrap();
        let n = rs.rules.len() as u32;
        let mut errors = Vec::new();

        // The reference reading of the frame (what the fuzz target compares on random frames):
        // the same class, and for packets the same decision.
        match (xdpfw_rules::frame::classify(&case.frame), case.class) {
            (FrameClass::Malformed, Class::Malformed) | (FrameClass::NonIp, Class::NonIp) => {}
            (FrameClass::Packet(p), class) if !matches!(class, Class::Malformed | Class::NonIp) => {
                let d = decide(rs, &p);
                if d.action != case.expect {
                    errors.push(format!("the frame as the reference reads it ({p}) is decided {}", d.action));
                }
            }
            (other, _) => errors.push(format!("the reference reads the frame as {other:?}")),
        }

        // The reference matcher, for frames it can describe.
        if let Some(p) = &case.spec {
            let d = decide(rs, p);
            if d.action != case.expect {
                errors.push(format!("matcher says {} ({:?}: {:?})", d.action, d.rule_name, d.reasons));
            }
            let rule = match case.class {
                Class::Rule(r) => Some(r.to_string()),
                _ => None,
            };
            if d.rule_name != rule {
                errors.push(format!("matcher decided by rule {:?}, expected {rule:?}", d.rule_name));
            }
        }

        let stats_before = prog.maps.global_stats().unwrap();
        let rules_before = prog.maps.rule_stats(*buffer, n).unwrap();
        let verdict = prog.run(&case.frame).unwrap_or_else(|e| panic!("{}: test run failed: {e:#}", case.name));
        let stats = prog.maps.global_stats().unwrap().since(&stats_before);
        let rules_after = prog.maps.rule_stats(*buffer, n).unwrap();

        if verdict != case.expect.kernel() {
            errors.push(format!("kernel says {} ({verdict})", action_name(verdict)));
        }
        let want = expected_delta(case);
        if stats != want {
            errors.push(format!("global counters moved by\n    {stats:?}\n  expected\n    {want:?}"));
        }
        // Exactly the deciding rule's counter (or the default slot) moves, by one packet.
        let slot = match case.class {
            Class::Rule(name) => Some(rs.rules.iter().position(|r| r.name == name).expect("rule name")),
            Class::Default => Some(n as usize),
            _ => None,
        };
        for (i, (a, b)) in rules_after.iter().zip(&rules_before).enumerate() {
            let want = if Some(i) == slot { 1 } else { 0 };
            if a.packets - b.packets != want || a.bytes - b.bytes != want * case.frame.len() as u64 {
                errors.push(format!("rule slot {i} moved by {} packets, expected {want}", a.packets - b.packets));
            }
        }
        if !errors.is_empty() {
            failures.push(format!(
                "case \"{}\" (expect {} by {:?}, frame {} bytes {:02x?}):\n  {}",
                case.name,
                case.expect,
                case.class,
                case.frame.len(),
                case.frame,
                errors.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

