//! The egress program (TCX egress, attached with the XDP program to the same interface): it
//! records the flows this host sends on the interface in `FLOWS` (see `flows.rs`), so rules with
//! `state = "established"` can let their replies in.
//!
//! It records only while a ruleset in either buffer uses `state` (`header_flags::STATE`, set by
//! a reload before its flip), so it costs two array reads a packet otherwise. It never changes
//! or drops a packet: it returns TCX_NEXT, leaving the verdict to whatever else is attached.
//!
//! What it reads: Ethernet, up to two VLAN tags, IPv4 (options skipped) or IPv6 (extension
//! headers not walked: such packets are not recorded), then TCP, UDP or an ICMP/ICMPv6 echo
//! request. Headers outside the linear part of the skb are pulled in first.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext};
use xdpfw_common::{
    header_flags,
    proto::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    FlowKey,
};

use crate::flows::{self, Outgoing};

/// TCX_NEXT: no verdict of ours, the next program (or the stack) decides.
const TCX_NEXT: i32 = -1;
/// Bytes of headers worth making linear: Ethernet, two tags, IPv6 (or IPv4 with 40 bytes of
/// options), eight bytes of transport.
const HEADROOM: u32 = 14 + 8 + 60 + 8;
const MAX_OFFSET: usize = 128;

#[classifier]
pub fn xdpfw_egress(ctx: TcContext) -> i32 {
    if tracking() {
        track(&ctx);
    }
    TCX_NEXT
}

/// Whether a ruleset in either buffer has a `state` rule: the active one, or one a reload is
/// about to make active (so its replies find the flows opened in between).
#[inline(always)]
fn tracking() -> bool {
    let flags = |b: u32| crate::HEADERS.get(b).map_or(0, |h| h.flags);
    (flags(0) | flags(1)) & header_flags::STATE != 0
}

#[inline(always)]
fn bytes_at<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if off > MAX_OFFSET || start + off + N > end {
        return None;
    }
    // SAFETY: the N bytes at `start + off` are inside the skb's linear data (checked above);
    // [u8; N] has alignment 1 and no invalid values.
    Some(unsafe { *((start + off) as *const [u8; N]) })
}

#[inline(always)]
fn v4_key_addr(a: &[u8]) -> [u8; 16] {
    let mut k = [0u8; 16];
    let mut i = 0;
    while i < 4 && i < a.len() {
        k[i] = a[i];
        i += 1;
    }
    k
}

fn track(ctx: &TcContext) {
    let want = if ctx.len() < HEADROOM { ctx.len() } else { HEADROOM };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // GSO and some drivers leave headers in fragments; pulled, they are linear for the
        // stack too, which reads them next anyway.
        let _ = ctx.pull_data(want);
    }
    let Some(out) = outgoing(ctx) else { return };
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let made = flows::record(&out, now);
    if made != 0
        && let Some(stats) = crate::GLOBAL_STATS.get_ptr_mut(0)
    {
        // SAFETY: this CPU's slot; TC egress runs with bottom halves disabled, so the XDP program
        // cannot run on this CPU in between.
        let stats = unsafe { &mut *stats };
        if made == 1 {
            stats.flows_new += 1;
        } else {
            stats.flows_closed += 1;
        }
    }
}

/// The flow (as its replies will carry it) of the packet being sent, if it is one we record.
#[inline(always)]
fn outgoing(ctx: &TcContext) -> Option<Outgoing> {
    let eth = bytes_at::<14>(ctx, 0)?;
    let mut ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let mut off = 14;
    let mut tags = 0;
    while tags < 2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let tag = bytes_at::<4>(ctx, off)?;
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        off += 4;
        tags += 1;
    }
    let (src, dst, proto, v6, l4) = match ethertype {
        ETH_P_IP => {
            let h = bytes_at::<20>(ctx, off)?;
            let ihl = (h[0] & 0x0f) as usize * 4;
            // Not a later fragment: those carry no transport header.
            if h[0] >> 4 != 4 || ihl < 20 || u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                return None;
            }
            (v4_key_addr(&h[12..16]), v4_key_addr(&h[16..20]), h[9], false, off + (ihl & 0x3c))
        }
        ETH_P_IPV6 => {
            let h = bytes_at::<8>(ctx, off)?;
            let s = bytes_at::<16>(ctx, off + 8)?;
            let d = bytes_at::<16>(ctx, off + 24)?;
            (s, d, h[6], true, off + 40)
        }
        _ => return None,
    };
    // The key of the replies: addresses (and ports) swapped.
    let mut key = FlowKey { src: dst, dst: src, sport: 0, dport: 0, proto, is_v6: v6 as u8, _pad: [0; 2] };
    let mut tcp_flags = 0;
    match proto {
        IPPROTO_TCP => {
            let t = bytes_at::<14>(ctx, l4)?;
            key.sport = u16::from_be_bytes([t[2], t[3]]);
            key.dport = u16::from_be_bytes([t[0], t[1]]);
            tcp_flags = t[13];
        }
        IPPROTO_UDP => {
            let t = bytes_at::<4>(ctx, l4)?;
            key.sport = u16::from_be_bytes([t[2], t[3]]);
            key.dport = u16::from_be_bytes([t[0], t[1]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let t = bytes_at::<8>(ctx, l4)?;
            let request = if v6 { proto == IPPROTO_ICMPV6 && t[0] == 128 } else { proto == IPPROTO_ICMP && t[0] == 8 };
            if !request {
                return None;
            }
            // The reply carries the same identifier (ports 0 and the identifier, as the XDP
            // side builds its key).
            key.dport = u16::from_be_bytes([t[4], t[5]]);
        }
        _ => return None,
    }
    Some(Outgoing { key, tcp_flags })
}
