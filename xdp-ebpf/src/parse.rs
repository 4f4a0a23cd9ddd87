//! Header parsing: a cursor over typed `#[repr(C)]` headers, in the style of xdp-tools'
//! `parsing_helpers.h` (a `hdr_cursor` and one `parse_*hdr` function per header, each returning
//! the next protocol) and aya's `ptr_at` (one bounds check per header).
//!
//! What the verifier relies on:
//! - every header is read through one bounds-checked pointer: the verifier cannot relate two
//!   separately checked pointers at a variable offset;
//! - every check first bounds the offset by [`MAX_HEADER_OFFSET`], so after the variable-length
//!   IPv4 options and IPv6 extension headers the offset stays in a range the verifier can add to
//!   a packet pointer;
//! - the VLAN and extension-header walks are bounded loops ([`MAX_VLAN_TAGS`], [`MAX_IPV6_EXT`]).

use aya_ebpf::programs::XdpContext;
use core::mem::{align_of, offset_of, size_of};
use xdpfw_common::proto::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_ROUTING, IPPROTO_TCP, IPPROTO_UDP,
    ND_FIRST, ND_LAST,
};

/// VLAN tags we walk; the ethertype after the last of them is the one classified.
const MAX_VLAN_TAGS: usize = 2;
/// Extension headers we walk before giving up (and calling the packet malformed).
const MAX_IPV6_EXT: usize = 8;
/// Packets whose headers end beyond this offset are not classified (and called malformed).
const MAX_HEADER_OFFSET: usize = 2048;

// ---------------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------------

/// A header as it lies in the packet: `#[repr(C)]`, byte-aligned (multi-byte fields are byte
/// arrays in network order: headers sit at any even offset) and valid for any bit pattern.
///
/// # Safety
/// Implementors must have alignment 1 and no invalid bit patterns, so that a reference to one
/// can be made from any pointer to `size_of::<Self>()` readable bytes.
pub unsafe trait Header {}

/// Ethernet (`struct ethhdr`).
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

/// An 802.1Q / 802.1ad tag (`struct vlan_hdr` of parsing_helpers.h): the tag control field and
/// the ethertype it encapsulates.
#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub encapsulated_proto: [u8; 2],
}

/// IPv4 (`struct iphdr`) without options.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// IPv6 (`struct ipv6hdr`).
#[repr(C)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// The start every IPv6 extension header but the fragment header shares (`struct ipv6_opt_hdr`):
/// hop-by-hop and destination options, routing (length in 8-byte units, not counting the first
/// 8) and AH (length in 4-byte units, not counting the first 8).
#[repr(C)]
pub struct Ipv6ExtHdr {
    pub nexthdr: u8,
    pub hdrlen: u8,
}

/// The first four bytes of the IPv6 fragment header (`struct frag_hdr`): the 4-byte
/// identification that completes its 8 bytes is not read, so it is not required in the packet.
#[repr(C)]
pub struct Ipv6FragHdr {
    pub nexthdr: u8,
    pub reserved: u8,
    /// Offset (13 bits, in 8-byte units), two reserved bits, more-fragments flag.
    pub frag_off: [u8; 2],
}

/// TCP (`struct tcphdr`) without options.
#[repr(C)]
pub struct TcpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub seq: [u8; 4],
    pub ack_seq: [u8; 4],
    /// Data offset (high nibble, in 4-byte words) and reserved bits.
    pub doff_res: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg_ptr: [u8; 2],
}

/// UDP (`struct udphdr`).
#[repr(C)]
pub struct UdpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// The part every ICMP and ICMPv6 message starts with: type, code and checksum.
#[repr(C)]
pub struct IcmpHdr {
    pub type_: u8,
    pub code: u8,
    pub checksum: [u8; 2],
}

// SAFETY (for each impl below): a `#[repr(C)]` struct of `u8`s and byte arrays, or a byte array:
// alignment 1 (checked below) and every bit pattern valid.
unsafe impl Header for EthHdr {}
// SAFETY: as above.
unsafe impl Header for VlanHdr {}
// SAFETY: as above.
unsafe impl Header for Ipv4Hdr {}
// SAFETY: as above.
unsafe impl Header for Ipv6Hdr {}
// SAFETY: as above.
unsafe impl Header for Ipv6ExtHdr {}
// SAFETY: as above.
unsafe impl Header for Ipv6FragHdr {}
// SAFETY: as above.
unsafe impl Header for TcpHdr {}
// SAFETY: as above.
unsafe impl Header for UdpHdr {}
// SAFETY: as above.
unsafe impl Header for IcmpHdr {}
// SAFETY: as above.
unsafe impl<const N: usize> Header for [u8; N] {}

const _: () = {
    assert!(size_of::<EthHdr>() == 14 && align_of::<EthHdr>() == 1);
    assert!(size_of::<VlanHdr>() == 4 && align_of::<VlanHdr>() == 1);
    assert!(size_of::<Ipv4Hdr>() == 20 && align_of::<Ipv4Hdr>() == 1);
    assert!(size_of::<Ipv6Hdr>() == 40 && align_of::<Ipv6Hdr>() == 1);
    assert!(size_of::<Ipv6ExtHdr>() == 2 && align_of::<Ipv6ExtHdr>() == 1);
    assert!(size_of::<Ipv6FragHdr>() == 4 && align_of::<Ipv6FragHdr>() == 1);
    assert!(size_of::<TcpHdr>() == 20 && align_of::<TcpHdr>() == 1);
    assert!(size_of::<UdpHdr>() == 8 && align_of::<UdpHdr>() == 1);
    assert!(size_of::<IcmpHdr>() == 4 && align_of::<IcmpHdr>() == 1);
};

/// Bytes the IPv6 fragment header occupies (of which [`Ipv6FragHdr`] is read).
const IPV6_FRAG_HLEN: usize = 8;

// ---------------------------------------------------------------------------------------------
// The cursor
// ---------------------------------------------------------------------------------------------

/// A pointer to `len` bytes at `off`, or `None` when the packet is shorter or `off` is beyond
/// [`MAX_HEADER_OFFSET`] (aya's `ptr_at`, with that bound for the verifier).
#[inline(always)]
fn ptr_at(ctx: &XdpContext, off: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    if off > MAX_HEADER_OFFSET || start + off + len > end {
        return None;
    }
    Some((start + off) as *const u8)
}

/// The header `T` at `off`, through one bounds-checked pointer.
#[inline(always)]
fn header_at<'a, T: Header>(ctx: &'a XdpContext, off: usize) -> Option<&'a T> {
    let p = ptr_at(ctx, off, size_of::<T>())?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are in the packet, which
    // nothing else writes while the program runs; `T: Header` has alignment 1 and no invalid
    // values.
    Some(unsafe { &*(p as *const T) })
}

/// The parse position (`struct hdr_cursor`): an offset from the start of the packet.
pub struct Cursor<'a> {
    ctx: &'a XdpContext,
    pos: usize,
}

impl<'a> Cursor<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a XdpContext) -> Self {
        Self { ctx, pos: 0 }
    }

    #[inline(always)]
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// The header `T` at the cursor, which stays in place (for variable-length headers).
    #[inline(always)]
    fn peek<T: Header>(&self) -> Option<&'a T> {
        header_at(self.ctx, self.pos)
    }

    /// The header `T` at the cursor, which moves past it.
    #[inline(always)]
    fn next<T: Header>(&mut self) -> Option<&'a T> {
        let h = header_at(self.ctx, self.pos)?;
        self.pos += size_of::<T>();
        Some(h)
    }

    /// `Some` when `len` bytes from the cursor are in the packet.
    #[inline(always)]
    fn ensure(&self, len: usize) -> Option<()> {
        ptr_at(self.ctx, self.pos, len).map(|_| ())
    }

    #[inline(always)]
    fn skip(&mut self, len: usize) {
        self.pos += len;
    }
}

// ---------------------------------------------------------------------------------------------
// The packet
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
pub struct Packet {
    pub is_v6: bool,
    /// IPv4 addresses, host byte order (0 for IPv6).
    pub src4: u32,
    pub dst4: u32,
    /// Offset of the IP header. IPv6 addresses are read from the packet where they are looked up
    /// (see [`v6_addr`]): copies would be eight more values carried, and spilled, through every
    /// path of the program, IPv4 ones included.
    pub l3_off: usize,
    /// Offset of the transport header (the connection-state lookup reads ICMP echo identifiers
    /// and the headers ICMP errors quote from there).
    pub l4_off: usize,
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

impl Packet {
    #[inline(always)]
    fn new(is_v6: bool, l3_off: usize) -> Self {
        Packet {
            is_v6,
            src4: 0,
            dst4: 0,
            l3_off,
            l4_off: 0,
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
        }
    }
}

pub enum ParseOutcome {
    Packet(Packet),
    NonIp,
    Malformed,
}

/// The source (or destination) address of the IPv6 packet whose header is at `l3_off`, in
/// network byte order (the LPM key's order).
#[inline(always)]
pub fn v6_addr(ctx: &XdpContext, l3_off: usize, source: bool) -> Option<[u8; 16]> {
    let field = if source {
        offset_of!(Ipv6Hdr, saddr)
    } else {
        offset_of!(Ipv6Hdr, daddr)
    };
    header_at::<[u8; 16]>(ctx, l3_off + field).copied()
}

/// The IPv6 source (or destination) address in the packet itself, for copying it elsewhere
/// without a stack copy.
#[inline(always)]
pub fn v6_addr_ref(ctx: &XdpContext, l3_off: usize, source: bool) -> Option<&[u8; 16]> {
    let field = if source { offset_of!(Ipv6Hdr, saddr) } else { offset_of!(Ipv6Hdr, daddr) };
    header_at::<[u8; 16]>(ctx, l3_off + field)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> ParseOutcome {
    let mut c = Cursor::new(ctx);
    let Some(ethertype) = parse_ethhdr(&mut c) else {
        return ParseOutcome::Malformed;
    };
    let parsed = match ethertype {
        ETH_P_IP => parse_ipv4(&mut c),
        ETH_P_IPV6 => parse_ipv6(&mut c),
        _ => return ParseOutcome::NonIp,
    };
    match parsed {
        Some(p) => ParseOutcome::Packet(p),
        None => ParseOutcome::Malformed,
    }
}

/// The Ethernet header and up to [`MAX_VLAN_TAGS`] VLAN tags; returns the ethertype after them
/// (host order).
#[inline(always)]
fn parse_ethhdr(c: &mut Cursor) -> Option<u16> {
    let eth = c.next::<EthHdr>()?;
    let mut ethertype = u16::from_be_bytes(eth.proto);
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let vlan = c.next::<VlanHdr>()?;
        ethertype = u16::from_be_bytes(vlan.encapsulated_proto);
        tags += 1;
    }
    // A third tag: malformed (dropped, counted) rather than passed unclassified as non-IP.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return None;
    }
    Some(ethertype)
}

/// The IPv4 header, options included (checked, not read); the cursor moves past them.
#[inline(always)]
fn parse_iphdr<'a>(c: &mut Cursor<'a>) -> Option<&'a Ipv4Hdr> {
    // The fixed header through one checked pointer, then the options as a separate check.
    let iph = c.peek::<Ipv4Hdr>()?;
    let ihl = (iph.version_ihl & 0x0f) as usize * 4;
    let tot_len = u16::from_be_bytes(iph.tot_len) as usize;
    if iph.version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || tot_len < ihl {
        return None;
    }
    // The whole datagram, options included, must be in the frame: a total length beyond the
    // frame end is a truncated packet (Ethernet padding after it is fine).
    c.ensure(tot_len)?;
    c.skip(ihl);
    Some(iph)
}

#[inline(always)]
fn parse_ipv4(c: &mut Cursor) -> Option<Packet> {
    let mut pkt = Packet::new(false, c.pos());
    let iph = parse_iphdr(c)?;
    pkt.src4 = u32::from_be_bytes(iph.saddr);
    pkt.dst4 = u32::from_be_bytes(iph.daddr);
    pkt.proto = iph.protocol;
    pkt.non_first_fragment = u16::from_be_bytes(iph.frag_off) & 0x1fff != 0;
    if !pkt.non_first_fragment {
        parse_l4(c, &mut pkt)?;
    }
    Some(pkt)
}

/// The IPv6 header; returns its next header. The addresses are not read here (see [`v6_addr`]).
#[inline(always)]
fn parse_ip6hdr(c: &mut Cursor) -> Option<u8> {
    let ip6h = c.next::<Ipv6Hdr>()?;
    if ip6h.version_class_flow[0] >> 4 != 6 || v4_mapped(&ip6h.saddr) || v4_mapped(&ip6h.daddr) {
        return None;
    }
    // A payload length beyond the frame end is a truncated packet (0 is a jumbogram's).
    c.ensure(u16::from_be_bytes(ip6h.payload_len) as usize)?;
    Some(ip6h.nexthdr)
}

/// `::ffff:a.b.c.d`: never valid on the wire (RFC 4291 2.5.5.2; Linux drops such sources), and
/// a way around IPv4 rules to a dual-stack socket: such packets are malformed.
#[inline(always)]
fn v4_mapped(a: &[u8; 16]) -> bool {
    a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0 && a[10] == 0xff && a[11] == 0xff
}

#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    )
}

#[inline(always)]
fn parse_ipv6(c: &mut Cursor) -> Option<Packet> {
    let mut pkt = Packet::new(true, c.pos());
    let mut next = parse_ip6hdr(c)?;
    // The extension headers (`skip_ip6hdrext`), at most MAX_IPV6_EXT of them. Each is read
    // through one bounds-checked pointer at the cursor before the cursor moves past it.
    let mut walked = 0;
    loop {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h = c.peek::<Ipv6ExtHdr>()?;
                next = h.nexthdr;
                c.skip((h.hdrlen as usize + 1) * 8);
            }
            IPPROTO_AH => {
                let h = c.peek::<Ipv6ExtHdr>()?;
                next = h.nexthdr;
                c.skip((h.hdrlen as usize + 2) * 4);
            }
            IPPROTO_FRAGMENT => {
                let h = c.peek::<Ipv6FragHdr>()?;
                next = h.nexthdr;
                c.skip(IPV6_FRAG_HLEN);
                if u16::from_be_bytes(h.frag_off) & 0xfff8 != 0 {
                    pkt.non_first_fragment = true;
                    break;
                }
            }
            _ => break,
        }
        walked += 1;
        if walked >= MAX_IPV6_EXT {
            if is_ipv6_ext(next) {
                // Too long a chain to find the transport header: refuse rather than pass unfiltered.
                return None;
            }
            // Exactly MAX_IPV6_EXT headers: `next` is the transport protocol.
            break;
        }
    }
    pkt.proto = next;
    if !pkt.non_first_fragment {
        parse_l4(c, &mut pkt)?;
        if pkt.has_icmp && next == IPPROTO_ICMPV6 {
            // Router solicitation/advertisement, neighbour solicitation/advertisement, redirect.
            let t = (pkt.icmp >> 8) as u8;
            pkt.neighbor_discovery = (ND_FIRST..=ND_LAST).contains(&t);
        }
    }
    Some(pkt)
}

/// Fills the transport fields. A protocol we don't dissect is fine (rules can still match its
/// number); a truncated TCP/UDP/ICMP header is not.
#[inline(always)]
fn parse_l4(c: &mut Cursor, pkt: &mut Packet) -> Option<()> {
    pkt.l4_off = c.pos();
    match pkt.proto {
        IPPROTO_TCP => {
            let th = c.next::<TcpHdr>()?;
            if th.doff_res >> 4 < 5 {
                return None;
            }
            pkt.has_ports = true;
            pkt.sport = u16::from_be_bytes(th.source);
            pkt.dport = u16::from_be_bytes(th.dest);
            pkt.has_tcp_flags = true;
            pkt.tcp_flags = th.flags;
        }
        IPPROTO_UDP => {
            let uh = c.next::<UdpHdr>()?;
            pkt.has_ports = true;
            pkt.sport = u16::from_be_bytes(uh.source);
            pkt.dport = u16::from_be_bytes(uh.dest);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let ih = c.next::<IcmpHdr>()?;
            pkt.has_icmp = true;
            pkt.icmp = u16::from_be_bytes([ih.type_, ih.code]);
        }
        _ => {}
    }
    Some(())
}
