//! Packets described in text (`explain`, `[[test]]`) and built as Ethernet frames for
//! BPF_PROG_TEST_RUN.
//!
//! Syntax: `PROTO SRC[:PORT] -> DST[:PORT] [flags FLAGS] [type T [code C]] [fragment]`, for
//! example `tcp 198.51.100.7:5555 -> 203.0.113.1:22 flags S`, `udp [2001:db8::1]:53 -> [2001:db8::2]:53`,
//! `icmp 192.0.2.1 -> 192.0.2.2 type 8`. PROTO is tcp, udp, icmp, icmpv6 or a number; FLAGS are
//! letters (`SA`) or names (`syn,ack`); `fragment` makes it a non-first fragment; `state
//! established` (a reply of a flow this host opened: tcp, udp, an echo reply) or `state related`
//! (an ICMP error about one) gives the packet's connection state, `new` by default.

use std::{fmt, net::IpAddr, str::FromStr};

use crate::error::{SpecContext, SpecError, spec_bail, spec_ensure};

type Result<T> = std::result::Result<T, SpecError>;

use crate::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, TCP_FLAG_NAMES, tcp_flag_by_letter, tcp_flag_by_name};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// A non-first fragment: no transport header.
    pub fragment: bool,
    /// Its connection state: whether the flow table holds its flow (see [`FlowState`]).
    pub state: FlowState,
    /// The id of its outermost VLAN tag (802.1Q, or the service tag of 802.1ad), if tagged.
    pub vlan: Option<u16>,
}

/// The connection state of a packet (`state` conditions of rules): what the flow table the
/// egress program fills says about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowState {
    /// Not a reply of a flow this host opened (or one whose entry expired or was evicted).
    #[default]
    New,
    /// A reply of a flow this host opened from this interface: TCP, UDP, an ICMP echo reply.
    Established,
    /// An ICMP error quoting a packet of such a flow.
    Related,
}

impl FlowState {
    pub const ALL: [FlowState; 3] = [FlowState::New, FlowState::Established, FlowState::Related];

    pub fn name(self) -> &'static str {
        match self {
            FlowState::New => "new",
            FlowState::Established => "established",
            FlowState::Related => "related",
        }
    }

    /// The kernel's number for it (`xdpfw_common::flow::*`).
    pub fn kernel(self) -> u32 {
        match self {
            FlowState::New => xdpfw_common::flow::NEW,
            FlowState::Established => xdpfw_common::flow::ESTABLISHED,
            FlowState::Related => xdpfw_common::flow::RELATED,
        }
    }
}

impl fmt::Display for FlowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FlowState {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        FlowState::ALL.into_iter().find(|st| st.name() == s).ok_or_else(|| format!("unknown state \"{s}\" (expected new, established or related)"))
    }
}

/// ICMP (`v6` false) or ICMPv6 types the kernel takes for echo replies and for errors that quote
/// the packet they are about.
pub fn is_icmp_echo_reply(v6: bool, t: u8) -> bool {
    if v6 { t == 129 } else { t == 0 }
}

pub fn is_icmp_error(v6: bool, t: u8) -> bool {
    if v6 { (1..=4).contains(&t) } else { matches!(t, 3 | 4 | 5 | 11 | 12) }
}

impl PacketSpec {
    pub fn has_ports(&self) -> bool {
        !self.fragment && (self.proto == IPPROTO_TCP || self.proto == IPPROTO_UDP)
    }
    pub fn is_icmp(&self) -> bool {
        !self.fragment && (self.proto == IPPROTO_ICMP || self.proto == IPPROTO_ICMPV6)
    }
    pub fn is_tcp(&self) -> bool {
        !self.fragment && self.proto == IPPROTO_TCP
    }

    /// ICMP over IPv4 or ICMPv6 over IPv6 (the kernel reads echo identifiers and quoted headers
    /// of these only).
    fn is_own_icmp(&self) -> bool {
        self.is_icmp() && (self.proto == IPPROTO_ICMPV6) == self.src.is_ipv6()
    }

    /// Whether the packet can have `state` (a flow the kernel can look up): established for
    /// tcp, udp and echo replies, related for ICMP errors. `Err` says why not.
    pub fn check_state(&self) -> std::result::Result<(), String> {
        let v6 = self.src.is_ipv6();
        match self.state {
            FlowState::New => Ok(()),
            FlowState::Established if self.has_ports() => Ok(()),
            FlowState::Established if self.is_own_icmp() && is_icmp_echo_reply(v6, self.icmp_type) => Ok(()),
            FlowState::Established => Err("only tcp, udp and ICMP echo replies (not fragments) can be established".into()),
            FlowState::Related if self.is_own_icmp() && is_icmp_error(v6, self.icmp_type) => Ok(()),
            FlowState::Related => Err("only ICMP errors (icmp types 3, 4, 5, 11, 12; icmpv6 types 1-4) can be related".into()),
        }
    }

    /// The key under which the flow table holds this packet's flow when it is established or
    /// related: its own 5-tuple (an echo reply: ports 0 and its identifier, 1 in frames made
    /// here), or for an ICMP error the reverse of the packet it quotes (see [`Self::to_frame`]).
    pub fn flow_key(&self) -> xdpfw_common::FlowKey {
        let addr = |a: IpAddr| -> [u8; 16] {
            match a {
                IpAddr::V4(a) => {
                    let mut k = [0u8; 16];
                    k[..4].copy_from_slice(&a.octets());
                    k
                }
                IpAddr::V6(a) => a.octets(),
            }
        };
        let mut key = xdpfw_common::FlowKey {
            src: addr(self.src),
            dst: addr(self.dst),
            sport: 0,
            dport: 0,
            proto: self.proto,
            is_v6: self.src.is_ipv6() as u8,
            _pad: [0; 2],
        };
        if self.has_ports() {
            (key.sport, key.dport) = (self.sport, self.dport);
        } else if self.is_own_icmp() && is_icmp_error(self.src.is_ipv6(), self.icmp_type) {
            // The quoted packet: UDP from QUOTED_SPORT (the local end, our dst) to QUOTED_DPORT.
            (key.proto, key.sport, key.dport) = (IPPROTO_UDP, QUOTED_DPORT, QUOTED_SPORT);
        } else if self.is_own_icmp() {
            key.dport = ECHO_ID;
        }
        key
    }

    /// An Ethernet frame carrying this packet (checksums zero: XDP does not verify them).
    pub fn to_frame(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01]);
        if let Some(id) = self.vlan {
            // An 802.1Q tag: TPID, then priority 0 and the id.
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
        }
        let l4 = self.l4_header();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let total = (20 + l4.len()) as u16;
                let frag: u16 = if self.fragment { 185 } else { 0 };
                f.extend_from_slice(&[0x45, 0]);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&[0, 1]);
                f.extend_from_slice(&frag.to_be_bytes());
                f.extend_from_slice(&[64, self.proto, 0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86DDu16.to_be_bytes());
                let mut payload = l4.len() as u16;
                let next = if self.fragment { 44 } else { self.proto };
                if self.fragment {
                    payload += 8;
                }
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&payload.to_be_bytes());
                f.extend_from_slice(&[next, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                if self.fragment {
                    // Fragment header, offset 185 * 8.
                    f.extend_from_slice(&[self.proto, 0]);
                    f.extend_from_slice(&(185u16 << 3).to_be_bytes());
                    f.extend_from_slice(&[0, 0, 0, 1]);
                }
            }
            _ => unreachable!("validated at parse"),
        }
        f.extend_from_slice(&l4);
        f
    }

    fn l4_header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        if self.fragment {
            h.extend_from_slice(&[0xab; 16]);
            return h;
        }
        match self.proto {
            IPPROTO_TCP => {
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&self.dport.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
            }
            IPPROTO_UDP => {
                h.extend_from_slice(&self.sport.to_be_bytes());
                h.extend_from_slice(&self.dport.to_be_bytes());
                h.extend_from_slice(&[0, 16, 0, 0]);
                h.extend_from_slice(&[0xab; 8]);
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                h.extend_from_slice(&[self.icmp_type, self.icmp_code, 0, 0]);
                h.extend_from_slice(&ECHO_ID.to_be_bytes());
                h.extend_from_slice(&[0, 1]);
                if self.is_own_icmp() && is_icmp_error(self.src.is_ipv6(), self.icmp_type) {
                    // An error quotes the packet it is about: here one the destination (the
                    // local host) sent to the source, UDP, as [`Self::flow_key`] expects.
                    let quoted = PacketSpec {
                        proto: IPPROTO_UDP,
                        src: self.dst,
                        dst: self.src,
                        sport: QUOTED_SPORT,
                        dport: QUOTED_DPORT,
                        ..PacketSpec::default()
                    };
                    // Its IP header and the first 8 bytes of its payload (RFC 792).
                    let frame = quoted.to_frame();
                    let ip = if self.src.is_ipv6() { 40 } else { 20 };
                    h.extend_from_slice(&frame[14..14 + ip + 8]);
                }
            }
            _ => h.extend_from_slice(&[0xab; 16]),
        }
        h
    }
}

/// The identifier of the echo messages frames are made with.
const ECHO_ID: u16 = 1;
/// Ports of the packet an ICMP error made here quotes.
const QUOTED_SPORT: u16 = 40000;
const QUOTED_DPORT: u16 = 53;

impl Default for PacketSpec {
    /// A UDP packet between unspecified addresses, port 0 to 0: a base for `..Default::default()`.
    fn default() -> Self {
        PacketSpec {
            proto: IPPROTO_UDP,
            src: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
            fragment: false,
            state: FlowState::New,
            vlan: None,
        }
    }
}

fn parse_endpoint(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, port) = rest.split_once(']').spec_err(|| format!("missing ']' in \"{s}\""))?;
        let addr = addr.parse().spec_err(|| format!("invalid address \"{addr}\""))?;
        let port = match port.strip_prefix(':') {
            Some(p) => Some(p.parse().spec_err(|| format!("invalid port \"{p}\""))?),
            None if port.is_empty() => None,
            None => spec_bail!("unexpected \"{port}\" after ']'"),
        };
        return Ok((addr, port));
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok((addr, None));
    }
    let (addr, port) = s.rsplit_once(':').spec_err(|| format!("invalid address \"{s}\""))?;
    let addr: IpAddr = addr.parse().spec_err(|| format!("invalid address \"{addr}\""))?;
    spec_ensure!(addr.is_ipv4(), "write IPv6 with a port as [addr]:port");
    Ok((addr, Some(port.parse().spec_err(|| format!("invalid port \"{port}\""))?)))
}

/// Flags of a packet: letters (`SA`), comma-separated names (`syn,ack`), or `none`.
pub fn parse_flag_letters_or_names(s: &str) -> Result<u8> {
    if s == "none" {
        return Ok(0);
    }
    if s.contains(',') || tcp_flag_by_name(s).is_some() {
        return s.split(',').try_fold(0u8, |acc, name| {
            tcp_flag_by_name(name.trim()).map(|b| acc | b).spec_err(|| format!("unknown TCP flag \"{name}\""))
        });
    }
    s.chars().try_fold(0u8, |acc, c| {
        tcp_flag_by_letter(c).map(|b| acc | b).spec_err(|| format!("unknown TCP flag letter '{c}'"))
    })
}

impl FromStr for PacketSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self> {
        let words: Vec<&str> = s.split_whitespace().collect();
        spec_ensure!(words.len() >= 4 && words[2] == "->", "expected \"PROTO SRC -> DST ...\"");
        let proto = match words[0] {
            "tcp" => IPPROTO_TCP,
            "udp" => IPPROTO_UDP,
            "icmp" => IPPROTO_ICMP,
            "icmpv6" => IPPROTO_ICMPV6,
            n => n.parse().spec_err(|| format!("unknown protocol \"{n}\""))?,
        };
        let (src, sport) = parse_endpoint(words[1])?;
        let (dst, dport) = parse_endpoint(words[3])?;
        spec_ensure!(src.is_ipv4() == dst.is_ipv4(), "source and destination must both be IPv4 or both IPv6");
        let ported = proto == IPPROTO_TCP || proto == IPPROTO_UDP;
        spec_ensure!(ported || (sport.is_none() && dport.is_none()), "only tcp and udp packets have ports");
        let mut p = PacketSpec {
            proto,
            src,
            dst,
            sport: sport.unwrap_or(if ported { 40000 } else { 0 }),
            dport: dport.unwrap_or(0),
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
            fragment: false,
            state: FlowState::New,
            vlan: None,
        };
        if proto == IPPROTO_TCP {
            p.tcp_flags = 0x02;
        }
        let mut rest = words[4..].iter();
        while let Some(w) = rest.next() {
            let mut value = || rest.next().copied().spec_err(|| format!("\"{w}\" needs a value"));
            match *w {
                "flags" => {
                    spec_ensure!(proto == IPPROTO_TCP, "only tcp packets have flags");
                    p.tcp_flags = parse_flag_letters_or_names(value()?)?;
                }
                "type" => {
                    spec_ensure!(p.is_icmp(), "only icmp packets have a type");
                    p.icmp_type = value()?.parse().spec_err(|| "icmp type".into())?;
                }
                "code" => {
                    spec_ensure!(p.is_icmp(), "only icmp packets have a code");
                    p.icmp_code = value()?.parse().spec_err(|| "icmp code".into())?;
                }
                "fragment" => p.fragment = true,
                "state" => p.state = value()?.parse().map_err(SpecError)?,
                "vlan" => {
                    let v = value()?;
                    p.vlan = Some(v.parse::<u16>().ok().filter(|id| *id <= 4095).spec_err(|| format!("invalid vlan id \"{v}\" (0-4095)"))?);
                }
                other => spec_bail!("unexpected \"{other}\""),
            }
        }
        if let Err(m) = p.check_state() {
            spec_bail!("state {}: {m}", p.state);
        }
        Ok(p)
    }
}

impl fmt::Display for PacketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            IPPROTO_TCP => "tcp".to_string(),
            IPPROTO_UDP => "udp".to_string(),
            IPPROTO_ICMP => "icmp".to_string(),
            IPPROTO_ICMPV6 => "icmpv6".to_string(),
            n => n.to_string(),
        };
        let ep = |a: IpAddr, port: u16| match (a, self.proto == IPPROTO_TCP || self.proto == IPPROTO_UDP) {
            (IpAddr::V6(a), true) => format!("[{a}]:{port}"),
            (a, true) => format!("{a}:{port}"),
            (a, false) => a.to_string(),
        };
        write!(f, "{proto} {} -> {}", ep(self.src, self.sport), ep(self.dst, self.dport))?;
        if self.proto == IPPROTO_TCP {
            let letters: String = TCP_FLAG_NAMES.iter().filter(|(_, _, b)| self.tcp_flags & b != 0).map(|(_, l, _)| *l).collect();
            write!(f, " flags {}", if letters.is_empty() { "none".into() } else { letters })?;
        }
        if self.proto == IPPROTO_ICMP || self.proto == IPPROTO_ICMPV6 {
            write!(f, " type {} code {}", self.icmp_type, self.icmp_code)?;
        }
        if self.fragment {
            write!(f, " fragment")?;
        }
        if self.state != FlowState::New {
            write!(f, " state {}", self.state)?;
        }
        if let Some(id) = self.vlan {
            write!(f, " vlan {id}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parses_back() {
        for text in [
            "tcp 198.51.100.7:5555 -> 203.0.113.1:22 flags S",
            "tcp [2001:db8::1]:1 -> [2001:db8::2]:2 flags none",
            "tcp 192.0.2.1:1 -> 192.0.2.2:2 flags syn,ack fragment",
            "udp 192.0.2.1:53 -> 192.0.2.2:53",
            "icmpv6 2001:db8::1 -> 2001:db8::2 type 135",
            "47 192.0.2.1 -> 192.0.2.2",
            "tcp 192.0.2.1:80 -> 192.0.2.2:40000 flags A state established",
            "icmp 192.0.2.1 -> 192.0.2.2 type 0 state established",
            "icmpv6 2001:db8::1 -> 2001:db8::2 type 1 code 4 state related",
            "udp 192.0.2.1:53 -> 192.0.2.2:53 vlan 100",
            "tcp 192.0.2.1:80 -> 192.0.2.2:40000 flags A state established vlan 4095",
        ] {
            let p: PacketSpec = text.parse().unwrap();
            let again: PacketSpec = p.to_string().parse().unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(p, again, "{text}");
        }
    }

    #[test]
    fn states_only_where_the_kernel_can_look_them_up() {
        for (text, message) in [
            ("udp 192.0.2.1:53 -> 192.0.2.2:4000 state related", "only ICMP errors"),
            ("icmp 192.0.2.1 -> 192.0.2.2 type 8 state established", "only tcp, udp and ICMP echo replies"),
            ("icmpv6 2001:db8::1 -> 2001:db8::2 type 0 state established", "only tcp, udp and ICMP echo replies"),
            ("tcp 192.0.2.1:1 -> 192.0.2.2:2 fragment state established", "only tcp, udp"),
            ("tcp 192.0.2.1:1 -> 192.0.2.2:2 state open", "unknown state \"open\""),
            ("tcp 192.0.2.1:1 -> 192.0.2.2:2 vlan 4096", "invalid vlan id \"4096\" (0-4095)"),
        ] {
            let e = text.parse::<PacketSpec>().unwrap_err().to_string();
            assert!(e.contains(message), "{text}: {e}");
        }
    }

    #[test]
    fn icmp_errors_quote_the_flow_of_their_key() {
        let p: PacketSpec = "icmp 198.51.100.1 -> 192.0.2.2 type 3 code 3 state related".parse().unwrap();
        let f = p.to_frame();
        // Outer IPv4 (20) + ICMP header (8) + quoted IPv4 (20) + 8 bytes of UDP.
        assert_eq!(f.len(), 14 + 20 + 8 + 20 + 8);
        let quoted = &f[14 + 28..];
        assert_eq!(&quoted[12..16], &[192, 0, 2, 2], "the quoted packet was sent by the destination");
        let k = p.flow_key();
        assert_eq!((k.proto, k.sport, k.dport), (IPPROTO_UDP, 53, 40000));
        assert_eq!(&k.src[..4], &[198, 51, 100, 1]);
    }
}
