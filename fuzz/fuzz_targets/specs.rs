//! Command-line specs: packets (`explain`), owners (`--owner`, `[[test]] owner`), durations,
//! CIDRs, port ranges and TCP flags. Each parses or returns an error; a packet that parses
//! prints as text that parses to the same packet, and builds a frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdpfw_rules::{duration::parse_duration, owner::OwnerSpec, packet::PacketSpec, parse_cidr, parse_port_range, parse_tcp_flags};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = s.parse::<PacketSpec>() {
        let again: PacketSpec = p.to_string().parse().expect("a printed packet parses");
        assert_eq!(again, p, "a packet survives printing");
        let _ = p.to_frame();
    }
    let _ = s.parse::<OwnerSpec>();
    let _ = parse_duration(s);
    let _ = parse_cidr(s);
    let _ = parse_port_range(s);
    let _ = parse_tcp_flags(s);
});
