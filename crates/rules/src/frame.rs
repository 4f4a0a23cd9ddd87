//! Ethernet frames read as the XDP program's parser reads them (`xdp-ebpf/src/parse.rs`), for
//! the raw-frame fuzz target and tests: a frame is a packet the matcher can decide, not IP, or
//! malformed. The two parsers must agree on every frame; the fuzz target checks that they do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xdpfw_common::proto::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP,
};

use crate::packet::PacketSpec;

/// VLAN tags walked; a third is malformed.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked; a longer chain is malformed.
pub const MAX_IPV6_EXT: usize = 8;
/// No header may start beyond this offset (the verifier's bound in the kernel).
pub const MAX_HEADER_OFFSET: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameClass {
    /// An IP packet: the matcher decides it.
    Packet(PacketSpec),
    /// Not IPv4 or IPv6: passes unclassified.
    NonIp,
    /// Truncated or inconsistent headers: dropped.
    Malformed,
}

/// The bytes `off..off + len` of `f`, as the kernel's `ptr_at` allows them.
fn at(f: &[u8], off: usize, len: usize) -> Option<&[u8]> {
    if off > MAX_HEADER_OFFSET {
        return None;
    }
    f.get(off..off.checked_add(len)?)
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// `::ffff:a.b.c.d`, malformed on the wire.
pub fn is_v4_mapped(a: &Ipv6Addr) -> bool {
    a.to_ipv4_mapped().is_some()
}

/// Reads `frame` as the XDP program does.
pub fn classify(frame: &[u8]) -> FrameClass {
    let Some(eth) = at(frame, 0, 14) else { return FrameClass::Malformed };
    let mut ethertype = be16(eth, 12);
    let mut pos = 14;
    let mut vlan = None;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = at(frame, pos, 4) else { return FrameClass::Malformed };
        // `vlan` rules see the outermost tag's id.
        vlan = vlan.or(Some(be16(tag, 0) & 0x0fff));
        ethertype = be16(tag, 2);
        pos += 4;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return FrameClass::Malformed;
    }
    let parsed = match ethertype {
        ETH_P_IP => ipv4(frame, pos),
        ETH_P_IPV6 => ipv6(frame, pos),
        _ => return FrameClass::NonIp,
    };
    parsed.map_or(FrameClass::Malformed, |p| FrameClass::Packet(PacketSpec { vlan, ..p }))
}

fn blank(src: IpAddr, dst: IpAddr, proto: u8) -> PacketSpec {
    PacketSpec { proto, src, dst, sport: 0, dport: 0, tcp_flags: 0, icmp_type: 0, icmp_code: 0, fragment: false, state: Default::default(), vlan: None }
}

fn ipv4(f: &[u8], pos: usize) -> Option<PacketSpec> {
    let h = at(f, pos, 20)?;
    let ihl = (h[0] & 0x0f) as usize * 4;
    let tot_len = be16(h, 2) as usize;
    if h[0] >> 4 != 4 || ihl < 20 || tot_len < ihl {
        return None;
    }
    at(f, pos, tot_len)?;
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    let mut p = blank(src.into(), dst.into(), h[9]);
    p.fragment = be16(h, 6) & 0x1fff != 0;
    if !p.fragment {
        l4(f, pos + ihl, &mut p)?;
    }
    Some(p)
}

fn ipv6(f: &[u8], pos: usize) -> Option<PacketSpec> {
    let h = at(f, pos, 40)?;
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&h[o..o + 16]).expect("16 bytes"));
    let (src, dst) = (addr(8), addr(24));
    if h[0] >> 4 != 6 || is_v4_mapped(&src) || is_v4_mapped(&dst) {
        return None;
    }
    let mut pos = pos + 40;
    at(f, pos, be16(h, 4) as usize)?;
    let mut next = h[6];
    let mut p = blank(src.into(), dst.into(), 0);
    let is_ext = |n| matches!(n, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT);
    let mut walked = 0;
    loop {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e = at(f, pos, 2)?;
                next = e[0];
                pos += (e[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let e = at(f, pos, 2)?;
                next = e[0];
                pos += (e[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let e = at(f, pos, 4)?;
                next = e[0];
                pos += 8;
                if be16(e, 2) & 0xfff8 != 0 {
                    p.fragment = true;
                    break;
                }
            }
            _ => break,
        }
        walked += 1;
        if walked >= MAX_IPV6_EXT {
            if is_ext(next) {
                return None;
            }
            break;
        }
    }
    p.proto = next;
    if !p.fragment {
        l4(f, pos, &mut p)?;
    }
    Some(p)
}

fn l4(f: &[u8], pos: usize, p: &mut PacketSpec) -> Option<()> {
    match p.proto {
        IPPROTO_TCP => {
            let t = at(f, pos, 20)?;
            if t[12] >> 4 < 5 {
                return None;
            }
            (p.sport, p.dport, p.tcp_flags) = (be16(t, 0), be16(t, 2), t[13]);
        }
        IPPROTO_UDP => {
            let u = at(f, pos, 8)?;
            (p.sport, p.dport) = (be16(u, 0), be16(u, 2));
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i = at(f, pos, 4)?;
            (p.icmp_type, p.icmp_code) = (i[0], i[1]);
        }
        _ => {}
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PacketSpec {
        s.parse().unwrap()
    }

    #[test]
    fn built_frames_read_back_as_their_packets() {
        for s in [
            "tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags SA",
            "udp [2001:db8::1]:53 -> [2001:db8::2]:5353",
            "icmp 192.0.2.1 -> 192.0.2.2 type 3 code 1",
            "icmpv6 fe80::1 -> ff02::1 type 135",
            "47 192.0.2.1 -> 192.0.2.2",
            "tcp 192.0.2.1 -> 192.0.2.2 fragment",
            "udp 2001:db8::1 -> 2001:db8::2 fragment",
        ] {
            let mut p = spec(s);
            if p.fragment {
                // A fragment's frame carries no transport header: nothing of it is read back.
                (p.sport, p.dport, p.tcp_flags) = (0, 0, 0);
            }
            assert_eq!(classify(&p.to_frame()), FrameClass::Packet(p), "{s}");
        }
    }

    #[test]
    fn what_the_kernel_calls_malformed() {
        let v4 = spec("udp 192.0.2.1:1 -> 192.0.2.2:53").to_frame();
        let v6 = spec("udp [2001:db8::1]:1 -> [2001:db8::2]:53").to_frame();
        let tag = |f: &[u8], n: usize| {
            let mut t = f[..12].to_vec();
            for _ in 0..n {
                t.extend_from_slice(&[0x81, 0, 0, 1]);
            }
            t.extend_from_slice(&f[12..]);
            t
        };
        assert!(matches!(classify(&tag(&v4, 2)), FrameClass::Packet(_)));
        assert_eq!(classify(&tag(&v4, 3)), FrameClass::Malformed, "three VLAN tags");
        // Lengths beyond the frame end; padding after the datagram is fine.
        let mut long = v4.clone();
        long[17] += 1;
        assert_eq!(classify(&long), FrameClass::Malformed, "IPv4 total length beyond the frame");
        let mut padded = v4.clone();
        padded.extend_from_slice(&[0; 8]);
        assert!(matches!(classify(&padded), FrameClass::Packet(_)));
        let mut long = v6.clone();
        long[19] += 1;
        assert_eq!(classify(&long), FrameClass::Malformed, "IPv6 payload length beyond the frame");
        let mapped = spec("udp [::ffff:192.0.2.1]:1 -> [2001:db8::2]:53").to_frame();
        assert_eq!(classify(&mapped), FrameClass::Malformed, "IPv4-mapped source");
        assert_eq!(classify(&[0; 13]), FrameClass::Malformed);
        assert_eq!(classify(&[0; 14]), FrameClass::NonIp);
    }
}
