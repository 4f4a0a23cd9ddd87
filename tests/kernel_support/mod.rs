//! What the kernel tests share: loading the private program, activating a ruleset, and frame
//! builders for what `PacketSpec::to_frame` does not make (VLAN tags, IPv4 options, IPv6
//! extension headers, truncations).
#![allow(dead_code, reason = "each kernel test file uses a part of these helpers")]
#![allow(unreachable_pub, reason = "a module of the test crates, not an API")]

use std::path::Path;

use xdpfw_kernel::testrun::PrivateProgram;
use xdpfw_rules::{
    self as rules, Ruleset,
    compile::compile,
    packet::PacketSpec,
};
use xdpfw_common::action;

pub(crate) const ETH: usize = 14;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

pub(crate) fn parse_rules(text: &str) -> Ruleset {
    rules::parse(Path::new("test.toml"), text).unwrap_or_else(|e| panic!("ruleset does not parse: {e}\n{text}"))
}

pub(crate) fn spec(s: &str) -> PacketSpec {
    s.parse().unwrap_or_else(|e| panic!("bad packet spec {s:?}: {e}"))
}

pub(crate) fn load() -> PrivateProgram {
    PrivateProgram::load().expect("loading the XDP program (are you root?)")
}

/// Activates `rs` and returns the buffer it went into (for the per-rule counters).
pub(crate) fn activate(prog: &mut PrivateProgram, rs: &Ruleset) -> u32 {
    let image = compile(rs).unwrap_or_else(|e| panic!("compile failed: {e:#}"));
    let generation = prog.activate(&image).expect("activate");
    xdpfw_common::buffer_of(generation)
}

pub(crate) fn action_name(xdp: u32) -> &'static str {
    match xdp {
        action::DROP => "drop",
        action::PASS => "pass",
        _ => "other",
    }
}

pub(crate) fn set_be16(f: &mut [u8], off: usize, v: u16) {
    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

pub(crate) fn get_be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

/// An Ethernet header with `ethertype`.
pub(crate) fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A 42-byte ARP request.
pub(crate) fn arp_frame() -> Vec<u8> {
    let mut f = eth(0x0806);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 192, 0, 2, 1]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 192, 0, 2, 2]);
    f
}

/// `frame` with VLAN tags inserted after the MAC addresses; `tpids[0]` is the outermost.
pub(crate) fn with_vlan(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    for (i, tpid) in tpids.iter().enumerate() {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(100 + i as u16).to_be_bytes()); // TCI: VLAN id
    }
    f.extend_from_slice(&frame[12..]);
    f
}

/// The IPv4 frame of `p` with `words` 32-bit words of options (NOPs), IHL and total length fixed.
pub(crate) fn v4_with_options(p: &PacketSpec, words: usize) -> Vec<u8> {
    let mut f = p.to_frame();
    assert_eq!(get_be16(&f, 12), 0x0800);
    let at = ETH + 20;
    f.splice(at..at, std::iter::repeat_n(0x01u8, words * 4));
    f[ETH] = 0x40 | (5 + words) as u8;
    let total = get_be16(&f, ETH + 2) + (words * 4) as u16;
    set_be16(&mut f, ETH + 2, total);
    f
}

/// An IPv6 extension header.
#[derive(Clone, Copy)]
pub(crate) enum Ext {
    HopByHop(usize),
    Routing(usize),
    DstOpts(usize),
    /// Authentication header (length in 4-byte units).
    Ah(usize),
    Fragment { offset: u16, more: bool },
}

impl Ext {
    pub(crate) fn kind(self) -> u8 {
        match self {
            Ext::HopByHop(_) => 0,
            Ext::Routing(_) => 43,
            Ext::DstOpts(_) => 60,
            Ext::Ah(_) => 51,
            Ext::Fragment { .. } => 44,
        }
    }
    pub(crate) fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(n) | Ext::DstOpts(n) => {
                assert!(n >= 8 && n % 8 == 0);
                // PadN covering the rest of the header.
                let mut h = vec![next, (n / 8 - 1) as u8, 1, (n - 4) as u8];
                h.resize(n, 0);
                h
            }
            Ext::Routing(n) => {
                assert!(n >= 8 && n % 8 == 0);
                // Routing type 253 (experimental), segments left 0: nothing to process.
                let mut h = vec![next, (n / 8 - 1) as u8, 253, 0];
                h.resize(n, 0);
                h
            }
            Ext::Ah(n) => {
                assert!(n >= 12 && n % 4 == 0);
                let mut h = vec![next, (n / 4 - 2) as u8, 0, 0, 0, 0, 0x10, 0x01, 0, 0, 0, 1];
                h.resize(n, 0xcc);
                h
            }
            Ext::Fragment { offset, more } => {
                let field = (offset << 3) | more as u16;
                let mut h = vec![next, 0];
                h.extend_from_slice(&field.to_be_bytes());
                h.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
                h
            }
        }
    }
}

/// The IPv6 frame of `p` (which must not be a fragment) with `exts` between the fixed header
/// and the transport header; next-header values and the payload length are fixed up.
pub(crate) fn v6_with_ext(p: &PacketSpec, exts: &[Ext]) -> Vec<u8> {
    assert!(!p.fragment);
    let base = p.to_frame();
    assert_eq!(get_be16(&base, 12), 0x86DD);
    let mut f = base[..ETH + 40].to_vec();
    let l4 = &base[ETH + 40..];
    f[ETH + 6] = exts.first().map_or(p.proto, |e| e.kind());
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(p.proto, |n| n.kind());
        f.extend_from_slice(&e.bytes(next));
    }
    f.extend_from_slice(l4);
    let payload = (f.len() - ETH - 40) as u16;
    set_be16(&mut f, ETH + 4, payload);
    f
}

// ---------------------------------------------------------------------------------------------
// 1. Crafted frames
// ---------------------------------------------------------------------------------------------

