//! Connection state for rules with `state = …`: the flow table the egress program fills
//! (see `egress.rs` and `xdpfw_common::flow`), and the XDP side's lookup of a packet's state.
//!
//! The lookup is made only for a packet whose first matching rule has a `state` condition
//! (`rule_flags::STATEFUL`), so rulesets without `state`, and packets decided before such a
//! rule, never touch the table.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use core::mem::size_of;
use xdpfw_common::{
    fields_layout::STATE_BASE,
    flow, rule_flags,
    proto::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
    FlowEntry, FlowKey, GlobalStats, MAX_BITMAPS,
};

use crate::parse::Packet;

/// The flows this host opened, under the key of their replies. Not double-buffered: a reload
/// leaves it alone, so flows opened before a reload keep working after it.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(flow::ENTRIES, 0);

/// Packets whose headers end beyond this offset are not looked at (as in `parse`).
const MAX_OFFSET: usize = 2048;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// `N` bytes of the packet at `off`, through one bounds check (the verifier needs the offset
/// bounded before it is added to the packet pointer).
#[inline(always)]
fn bytes_at<const N: usize>(start: usize, end: usize, off: usize) -> Option<[u8; N]> {
    if off > MAX_OFFSET || start + off + N > end {
        return None;
    }
    // SAFETY: the N bytes at `start + off` are inside the packet (checked above); [u8; N] has
    // alignment 1 and no invalid values.
    Some(unsafe { *((start + off) as *const [u8; N]) })
}

/// A pointer to `len` bytes of the packet at `off` (bounds checked as [`bytes_at`]): read through
/// it, nothing is copied to the stack.
#[inline(always)]
fn ptr_at(start: usize, end: usize, off: usize, len: usize) -> Option<*const u8> {
    if off > MAX_OFFSET || start + off + len > end {
        return None;
    }
    Some((start + off) as *const u8)
}

/// Copies 16 bytes from the packet to `to` as two 8-byte loads and stores.
///
/// # Safety
/// `from` must point to 16 readable bytes.
#[inline(always)]
unsafe fn copy16(from: *const u8, to: &mut [u8; 16]) {
    // SAFETY: the caller's promise; unaligned reads, to an array of the same size.
    unsafe {
        let a = core::ptr::read_unaligned(from as *const u64);
        let b = core::ptr::read_unaligned(from.add(8) as *const u64);
        core::ptr::write_unaligned(to.as_mut_ptr() as *mut u64, a);
        core::ptr::write_unaligned(to.as_mut_ptr().add(8) as *mut u64, b);
    }
}

/// ICMP types: echo reply, and the errors that quote the packet that caused them.
#[inline(always)]
fn is_echo_reply(v6: bool, t: u8) -> bool {
    if v6 { t == 129 } else { t == 0 }
}

#[inline(always)]
fn is_echo_request(v6: bool, t: u8) -> bool {
    if v6 { t == 128 } else { t == 8 }
}

#[inline(always)]
fn is_error(v6: bool, t: u8) -> bool {
    // ICMPv6: destination unreachable, packet too big, time exceeded, parameter problem.
    // ICMP: destination unreachable, source quench, redirect, time exceeded, parameter problem.
    if v6 { (1..=4).contains(&t) } else { matches!(t, 3 | 4 | 5 | 11 | 12) }
}

/// An address of 4 (IPv4) or 16 bytes as a key's 16.
#[inline(always)]
fn v4_key_addr(a: [u8; 4]) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0] = a[0];
    k[1] = a[1];
    k[2] = a[2];
    k[3] = a[3];
    k
}

/// Scratch space for the key of a lookup, one per CPU: keys on the stack would not fit beside
/// the classifier's (BPF allows 512 bytes over a chain of calls). The XDP program and the
/// egress program never run at once on one CPU (TC egress runs with bottom halves disabled).
#[map]
static FLOW_SCRATCH: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);

/// The packet's state, `flow::NEW`, `ESTABLISHED` or `RELATED`, for the packet in
/// PACKET_SCRATCH. For the probe copy (self-tests), the state the test gives, in the frame's
/// metadata. A function of its own (a BPF subprogram).
#[inline(never)]
fn packet_state(ctx: &XdpContext, stats: &mut GlobalStats) -> u32 {
    if crate::probe() != 0 {
        // Self-tests decide the state: one byte of metadata before the frame (none: new).
        return match bytes_at::<4>(ctx.metadata(), ctx.metadata_end(), 0) {
            Some(m) if (m[0] as u32) < flow::STATES => m[0] as u32,
            _ => flow::NEW,
        };
    }
    stats.state_lookups += 1;
    let Some(pkt) = crate::PACKET_SCRATCH.get_ptr(0) else { return flow::NEW };
    // SAFETY: this CPU's slot, written by `classify_policy` before the call.
    let pkt = unsafe { &*pkt };
    if pkt.non_first_fragment {
        return flow::NEW;
    }
    let Some(key) = FLOW_SCRATCH.get_ptr_mut(0) else { return flow::NEW };
    // SAFETY: this CPU's scratch entry (see FLOW_SCRATCH).
    let key = unsafe { &mut *key };
    let state = fill_key(ctx, pkt, key);
    if state == flow::NEW {
        return flow::NEW;
    }
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(entry) = FLOWS.get_ptr_mut(key) else { return flow::NEW };
    // SAFETY: a valid map value pointer; LRU elements can be recycled under a reader, which at
    // worst mixes two flows' fields for this one packet.
    let e = unsafe { &mut *entry };
    if e.expires_ns <= now {
        return flow::NEW;
    }
    if state == flow::ESTABLISHED && pkt.proto == IPPROTO_TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            if FLOWS.remove(key).is_ok() {
                stats.flows_closed += 1;
            }
        } else if pkt.tcp_flags & TCP_FIN != 0 && e.flags & flow::CLOSING == 0 {
            e.flags |= flow::CLOSING;
            e.expires_ns = now + flow::TCP_CLOSING_NS;
        }
    }
    if state == flow::ESTABLISHED {
        stats.state_established += 1;
    } else {
        stats.state_related += 1;
    }
    state
}

/// Writes the key the flow table would hold the packet's flow under into `key`; returns the
/// state the packet has if it is found (`ESTABLISHED`, or `RELATED` for an ICMP error), or
/// `NEW` when there is nothing to look up.
#[inline(always)]
fn fill_key(ctx: &XdpContext, pkt: &Packet, key: &mut FlowKey) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let v6 = pkt.is_v6;
    key.proto = pkt.proto;
    key.is_v6 = v6 as u8;
    key._pad = [0; 2];
    key.sport = 0;
    key.dport = 0;
    if v6 {
        let Some(a) = ptr_at(start, end, pkt.l3_off + 8, 32) else { return flow::NEW };
        // SAFETY: 32 bytes at `a` are in the packet: the source, then the destination.
        unsafe {
            copy16(a, &mut key.src);
            copy16(a.add(16), &mut key.dst);
        }
    } else {
        key.src = v4_key_addr(pkt.src4.to_be_bytes());
        key.dst = v4_key_addr(pkt.dst4.to_be_bytes());
    }
    let icmp = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    if (pkt.proto == IPPROTO_TCP || pkt.proto == IPPROTO_UDP) && pkt.has_ports {
        key.sport = pkt.sport;
        key.dport = pkt.dport;
        return flow::ESTABLISHED;
    }
    if pkt.proto != icmp || !pkt.has_icmp {
        return flow::NEW;
    }
    let t = (pkt.icmp >> 8) as u8;
    if is_echo_reply(v6, t) {
        // The identifier, after type, code and checksum.
        let Some(id) = bytes_at::<2>(start, end, pkt.l4_off + 4) else { return flow::NEW };
        key.dport = u16::from_be_bytes(id);
        return flow::ESTABLISHED;
    }
    if is_error(v6, t) && quoted_flow(start, end, pkt.l4_off + 8, v6, key) {
        return flow::RELATED;
    }
    flow::NEW
}

/// The flow key of the replies to the packet an ICMP error quotes at `off` (IPv4 or IPv6 as the
/// error), into `key`: the quoted packet was sent by this host, so its addresses and ports are
/// swapped. False when it quotes nothing we record.
#[inline(always)]
fn quoted_flow(start: usize, end: usize, off: usize, v6: bool, key: &mut FlowKey) -> bool {
    let (proto, l4) = if v6 {
        let Some(h) = ptr_at(start, end, off, 40) else { return false };
        // SAFETY: the 40 bytes of an IPv6 header at `h` are in the packet.
        unsafe {
            if *h >> 4 != 6 {
                return false;
            }
            // Swapped: the quoted packet's destination is the replies' source.
            copy16(h.add(24), &mut key.src);
            copy16(h.add(8), &mut key.dst);
            // Only a transport header right after the IPv6 header: quoted extension headers
            // are not walked.
            (*h.add(6), off + 40)
        }
    } else {
        let Some(h) = ptr_at(start, end, off, 20) else { return false };
        // SAFETY: the 20 bytes of an IPv4 header at `h` are in the packet.
        unsafe {
            let ihl = (*h & 0x0f) as usize * 4;
            if *h >> 4 != 4 || ihl < 20 || (*h.add(6) & 0x1f) != 0 || *h.add(7) != 0 {
                return false;
            }
            key.src = [0; 16];
            key.dst = [0; 16];
            core::ptr::copy_nonoverlapping(h.add(16), key.src.as_mut_ptr(), 4);
            core::ptr::copy_nonoverlapping(h.add(12), key.dst.as_mut_ptr(), 4);
            (*h.add(9), off + (ihl & 0x3c))
        }
    };
    key.proto = proto;
    let Some(t) = ptr_at(start, end, l4, 8) else { return false };
    // SAFETY: the first 8 bytes of the quoted transport header at `t` are in the packet.
    unsafe {
        let be16 = |i: usize| u16::from_be_bytes([*t.add(i), *t.add(i + 1)]);
        if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
            key.sport = be16(2);
            key.dport = be16(0);
            true
        } else if proto == (if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP }) && is_echo_request(v6, *t) {
            key.dport = be16(4);
            true
        } else {
            false
        }
    }
}

/// What the egress program records for one packet this host sends: the key its replies carry,
/// and whether it is TCP (with its flags).
pub struct Outgoing {
    pub key: FlowKey,
    pub tcp_flags: u8,
}

/// Records (or refreshes, or closes) the flow of a packet this host sends; returns whether a new
/// entry was made (1), one was removed (2), or neither (0).
#[inline(always)]
pub fn record(out: &Outgoing, now: u64) -> u32 {
    let key = &out.key;
    let (lifetime, closing) = match key.proto {
        IPPROTO_TCP => {
            if out.tcp_flags & TCP_RST != 0 {
                return if FLOWS.remove(key).is_ok() { 2 } else { 0 };
            }
            if out.tcp_flags & TCP_FIN != 0 { (flow::TCP_CLOSING_NS, true) } else { (flow::TCP_OPEN_NS, false) }
        }
        IPPROTO_UDP => (flow::UDP_NS, false),
        _ => (flow::ICMP_NS, false),
    };
    if let Some(entry) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer (see `packet_state`).
        let e = unsafe { &mut *entry };
        if e.flags & flow::CLOSING != 0 {
            // A closing flow keeps its short life, unless a new SYN opens the 4-tuple again.
            if out.tcp_flags & TCP_SYN != 0 && !closing {
                e.flags = 0;
                e.expires_ns = now + lifetime;
            }
        } else if closing {
            e.flags = flow::CLOSING;
            e.expires_ns = now + lifetime;
        } else {
            e.expires_ns = now + lifetime;
        }
        return 0;
    }
    let entry = FlowEntry { expires_ns: now + lifetime, flags: if closing { flow::CLOSING } else { 0 }, _pad: 0 };
    if FLOWS.insert(key, &entry, 0).is_ok() { 1 } else { 0 }
}

const _: () = assert!(size_of::<FlowKey>() == 40);

/// Where a ruleset has `state` rules: when the first match has a `state` condition, looks the
/// packet's state up and matches again with it (the rules whose condition the state fails
/// drop out of the AND). When the first match has a rate limit instead, the state is looked up
/// too, so that a later match found beyond the limit (`match_after`) has it. Other packets
/// never touch the flow table.
#[inline(always)]
pub fn apply_state(
    ctx: &XdpContext,
    buffer: u32,
    f: &mut crate::Fields,
    first: Option<u32>,
    limits: bool,
    stats: &mut GlobalStats,
) -> Option<u32> {
    let rule = first?;
    let flags = crate::rule_flags_of(buffer, rule);
    let stateful = flags & rule_flags::STATEFUL != 0;
    if !stateful && !(limits && flags & rule_flags::LIMITED != 0) {
        return first;
    }
    let state = packet_state(ctx, stats);
    let id = crate::field_bitmap(buffer, STATE_BASE + (state % flow::STATES));
    let Some(bitmap) = crate::BITMAPS.get(buffer * MAX_BITMAPS + (id % MAX_BITMAPS)) else { return first };
    f.state = bitmap;
    if stateful { crate::first_match::<true, true>(f) } else { first }
}
