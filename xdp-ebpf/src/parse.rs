//! Header parsing with bounds-checked accessors and bounded loops.

use aya_ebpf::programs::XdpContext;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers we walk before giving up (and calling the packet malformed).
const MAX_IPV6_EXT: usize = 8;
/// Packets whose headers end beyond this offset are not classified (and called malformed).
const MAX_HEADER_OFFSET: usize = 2048;

pub struct Packet {
    pub is_v6: bool,
    /// IPv4 addresses, host byte order (0 for IPv6).
    pub src4: u32,
    pub dst4: u32,
    /// Offset of the IP header. IPv6 addresses are read from the packet where they are looked up
    /// (see [`v6_addr`]): copies would be eight more values carried, and spilled, through every
    /// path of the program, IPv4 ones included.
    pub l3_off: usize,
    /// The transport protocol (for IPv6, the last next-header of the chain).
    pub proto: u8,
    /// Plain integers with presence flags rather than `Option`s: LLVM otherwise merges enum
    /// payloads with packet pointers in ways the verifier rejects.
    pub has_ports: bool,
    pub sport: u16,
    pub dport: u16,
    pub has_icmp: bool,
    /// `type << 8 | code` for ICMP and ICMPv6.
    pub icmp: u16,
    pub has_tcp_flags: bool,
    pub tcp_flags: u8,
    pub non_first_fragment: bool,
    pub neighbor_discovery: bool,
}

pub enum ParseOutcome {
    Packet(Packet),
    NonIp,
    Malformed,
}

/// A pointer to `len` bytes at `off`, or `None` when the packet is shorter.
#[inline(always)]
fn bytes_at(ctx: &XdpContext, off: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    if off > MAX_HEADER_OFFSET || start + off + len > end {
        return None;
    }
    Some((start + off) as *const u8)
}

/// The big-endian u32 at `p`.
///
/// # Safety
/// `p` must point at 4 readable bytes (a pointer `bytes_at` checked).
#[inline(always)]
unsafe fn be32(p: *const u8) -> u32 {
    // SAFETY: per the contract; unaligned because headers sit at any even offset.
    u32::from_be(unsafe { (p as *const u32).read_unaligned() })
}

/// The source (or destination) address of the IPv6 packet whose header is at `l3_off`, in
/// network byte order (the LPM key's order).
#[inline(always)]
pub fn v6_addr(ctx: &XdpContext, l3_off: usize, source: bool) -> Option<[u8; 16]> {
    let p = bytes_at(ctx, l3_off + if source { 8 } else { 24 }, 16)?;
    // SAFETY: 16 bytes checked above.
    Some(unsafe { (p as *const [u8; 16]).read_unaligned() })
}

#[inline(always)]
fn be16_at(ctx: &XdpContext, off: usize) -> Option<u16> {
    // SAFETY: bounds checked by bytes_at.
    bytes_at(ctx, off, 2).map(|p| unsafe { u16::from_be_bytes([*p, *p.add(1)]) })
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> ParseOutcome {
    let Some(mut ethertype) = be16_at(ctx, 12) else {
        return ParseOutcome::Malformed;
    };
    let mut off = ETH_HLEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16_at(ctx, off + 2) else {
            return ParseOutcome::Malformed;
        };
        ethertype = inner;
        off += 4;
        tags += 1;
    }
    let parsed = match ethertype {
        ETH_P_IP => parse_ipv4(ctx, off),
        ETH_P_IPV6 => parse_ipv6(ctx, off),
        _ => return ParseOutcome::NonIp,
    };
    match parsed {
        Some(p) => ParseOutcome::Packet(p),
        None => ParseOutcome::Malformed,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, off: usize) -> Option<Packet> {
    // The fixed header through one checked pointer, then the options as a separate check.
    let h = bytes_at(ctx, off, 20)?;
    // SAFETY: 20 bytes checked above.
    let (ver_ihl, total_len, frag, proto) = unsafe {
        (
            *h,
            u16::from_be_bytes([*h.add(2), *h.add(3)]) as usize,
            u16::from_be_bytes([*h.add(6), *h.add(7)]),
            *h.add(9),
        )
    };
    let ihl = (ver_ihl & 0x0f) as usize * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 || total_len < ihl {
        return None;
    }
    bytes_at(ctx, off, ihl)?;
    // SAFETY: within the 20 checked bytes.
    let (src4, dst4) = unsafe { (be32(h.add(12)), be32(h.add(16))) };
    let mut pkt = Packet {
        is_v6: false,
        src4,
        dst4,
        l3_off: off,
        proto,
        has_ports: false,
        sport: 0,
        dport: 0,
        has_icmp: false,
        icmp: 0,
        has_tcp_flags: false,
        tcp_flags: 0,
        non_first_fragment: frag & 0x1fff != 0,
        neighbor_discovery: false,
    };
    if !pkt.non_first_fragment {
        parse_l4(ctx, off + ihl, &mut pkt)?;
    }
    Some(pkt)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, off: usize) -> Option<Packet> {
    let h = bytes_at(ctx, off, 40)?;
    // SAFETY: 40 bytes checked above.
    let (version, mut next) = unsafe { (*h >> 4, *h.add(6)) };
    if version != 6 {
        return None;
    }
    let mut pkt = Packet {
        is_v6: true,
        src4: 0,
        dst4: 0,
        l3_off: off,
        proto: 0,
        has_ports: false,
        sport: 0,
        dport: 0,
        has_icmp: false,
        icmp: 0,
        has_tcp_flags: false,
        tcp_flags: 0,
        non_first_fragment: false,
        neighbor_discovery: false,
    };
    let mut off = off + 40;
    let mut walked = 0;
    loop {
        // Each header is read through one bounds-checked pointer: the verifier cannot relate two
        // separately checked pointers at a variable offset.
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let p = bytes_at(ctx, off, 2)?;
                // SAFETY: 2 bytes checked above.
                let (n, len) = unsafe { (*p, *p.add(1)) };
                next = n;
                off += (len as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let p = bytes_at(ctx, off, 2)?;
                // SAFETY: 2 bytes checked above.
                let (n, len) = unsafe { (*p, *p.add(1)) };
                next = n;
                off += (len as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let p = bytes_at(ctx, off, 4)?;
                // SAFETY: 4 bytes checked above.
                let (n, frag) = unsafe { (*p, u16::from_be_bytes([*p.add(2), *p.add(3)])) };
                next = n;
                off += 8;
                if frag & 0xfff8 != 0 {
                    pkt.non_first_fragment = true;
                    break;
                }
            }
            _ => break,
        }
        walked += 1;
        if walked >= MAX_IPV6_EXT {
            if matches!(
                next,
                IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
            ) {
                // Too long a chain to find the transport header: refuse rather than pass unfiltered.
                return None;
            }
            // Exactly MAX_IPV6_EXT headers: `next` is the transport protocol.
            break;
        }
    }
    pkt.proto = next;
    if !pkt.non_first_fragment {
        parse_l4(ctx, off, &mut pkt)?;
        if pkt.has_icmp && next == IPPROTO_ICMPV6 {
            // Router solicitation/advertisement, neighbour solicitation/advertisement, redirect.
            let t = (pkt.icmp >> 8) as u8;
            pkt.neighbor_discovery = (133..=137).contains(&t);
        }
    }
    Some(pkt)
}

/// Fills the transport fields. A protocol we don't dissect is fine (rules can still match its
/// number); a truncated TCP/UDP/ICMP header is not.
#[inline(always)]
fn parse_l4(ctx: &XdpContext, off: usize, pkt: &mut Packet) -> Option<()> {
    match pkt.proto {
        IPPROTO_TCP => {
            let p = bytes_at(ctx, off, 20)?;
            // SAFETY: 20 bytes checked above.
            let (sport, dport, doff, flags) = unsafe {
                (
                    u16::from_be_bytes([*p, *p.add(1)]),
                    u16::from_be_bytes([*p.add(2), *p.add(3)]),
                    *p.add(12) >> 4,
                    *p.add(13),
                )
            };
            if doff < 5 {
                return None;
            }
            pkt.has_ports = true;
            pkt.sport = sport;
            pkt.dport = dport;
            pkt.has_tcp_flags = true;
            pkt.tcp_flags = flags;
        }
        IPPROTO_UDP => {
            let p = bytes_at(ctx, off, 8)?;
            // SAFETY: 8 bytes checked above.
            // SAFETY: as above.
            unsafe {
                pkt.sport = u16::from_be_bytes([*p, *p.add(1)]);
                pkt.dport = u16::from_be_bytes([*p.add(2), *p.add(3)]);
            }
            pkt.has_ports = true;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let p = bytes_at(ctx, off, 4)?;
            // SAFETY: 4 bytes checked above.
            pkt.icmp = unsafe { u16::from_be_bytes([*p, *p.add(1)]) };
            pkt.has_icmp = true;
        }
        _ => {}
    }
    Some(())
}
