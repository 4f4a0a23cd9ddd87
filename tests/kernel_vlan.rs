//! `vlan = N` through the real program (BPF_PROG_TEST_RUN on a private copy): tagged frames
//! (802.1Q, 802.1ad with an inner tag), untagged ones, and the reference matcher on each, also
//! as the kernel-mirroring frame reader sees them. Needs root.

mod kernel_support;

use xdpfw_common::action;
use xdpfw_rules::{frame::{FrameClass, classify}, matcher::decide};
use xdpfw_testkit as harness;

use kernel_support::*;

/// `frame` (untagged) with tags of these (TPID, id), outermost first.
fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for (tpid, id) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        // Priority 5 in the top bits: only the 12 low bits are the id.
        f.extend_from_slice(&((5 << 13) | id).to_be_bytes());
    }
    f.extend_from_slice(&frame[12..]);
    f
}

#[test]
fn vlan_rules_match_the_outermost_tag() {
    if !harness::root_or_skip() {
        return;
    }
    let rs = parse_rules(
        "default = \"pass\"\n\
         [[rule]]\nname = \"mgmt-vlan-ssh\"\naction = \"pass\"\nvlan = 100\nproto = \"tcp\"\ndport = 22\n\
         [[rule]]\nname = \"no-ssh-elsewhere\"\naction = \"drop\"\nproto = \"tcp\"\ndport = 22\n\
         [[rule]]\nname = \"guest-vlans\"\naction = \"drop\"\nvlan = [200, 201, 4094]\n",
    );
    let mut prog = load();
    activate(&mut prog, &rs);
    let ssh = spec("tcp 198.51.100.7:5555 -> 192.0.2.2:22 flags S");
    let web = spec("tcp 198.51.100.7:5555 -> 192.0.2.2:443 flags S");
    type Case<'a> = (&'a xdpfw_rules::packet::PacketSpec, &'a [(u16, u16)], u32, &'a str);
    let cases: [Case; 9] = [
        (&ssh, &[], action::DROP, "untagged ssh"),
        (&ssh, &[(0x8100, 100)], action::PASS, "ssh on vlan 100"),
        (&ssh, &[(0x8100, 101)], action::DROP, "ssh on vlan 101"),
        (&ssh, &[(0x88a8, 100), (0x8100, 7)], action::PASS, "QinQ: the outer tag counts"),
        (&ssh, &[(0x88a8, 7), (0x8100, 100)], action::DROP, "QinQ: not the inner one"),
        (&web, &[(0x8100, 200)], action::DROP, "guest vlan 200"),
        (&web, &[(0x8100, 4094)], action::DROP, "guest vlan 4094"),
        (&web, &[(0x8100, 202)], action::PASS, "vlan 202"),
        (&web, &[], action::PASS, "untagged web"),
    ];
    for (p, tags, want, what) in cases {
        let frame = tagged(&p.to_frame(), tags);
        assert_eq!(prog.run(&frame).unwrap(), want, "kernel: {what}");
        // The frame as the kernel reads it, decided by the reference matcher.
        let FrameClass::Packet(read) = classify(&frame) else { panic!("{what}: not a packet") };
        assert_eq!(read.vlan, tags.first().map(|t| t.1), "{what}");
        assert_eq!(decide(&rs, &read).action.kernel(), want, "matcher: {what}");
    }
    // PacketSpec's own tag (`vlan N` in a packet text) is the same thing.
    let p = spec("tcp 198.51.100.7:5555 -> 192.0.2.2:22 flags S vlan 100");
    assert_eq!(prog.run(&p.to_frame()).unwrap(), action::PASS);
    assert_eq!(decide(&rs, &p).rule_name.as_deref(), Some("mgmt-vlan-ssh"));
}
