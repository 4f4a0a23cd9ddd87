//! The XDP fast path: parse, snapshot the active ruleset, classify, count, decide.
//!
//! Verdicts for what is not classified:
//! - not IPv4/IPv6 (ARP, LLDP, …): pass (`non_ip`)
//! - IPv6 neighbour discovery and router messages: pass (`neighbor_discovery`), so no policy can cut
//!   a host off its link, unless the ruleset puts them under the rules (`header_flags::ND_RULES`)
//! - truncated or inconsistent headers (IP lengths beyond the frame end included), more than two
//!   VLAN tags, IPv4-mapped IPv6 addresses, or an IPv6 extension chain longer than we walk: drop
//!   (`malformed`)
//! - a non-first fragment: per the ruleset's fragment policy (`fragments`)
//!
//! A packet whose first matching rule needs the owner of the local socket (a process or user
//! condition) is escalated: see [`escalate`].
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "atomic_cxchg: core's atomic types have no compare-and-swap on BPF")]

mod egress;
mod flows;
mod parse;

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MMAPABLE},
    btf_maps::{Array as BtfArray, ArrayOfMaps, PerCpuArray as BtfPerCpuArray},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{btf_map, map, xdp},
    maps::{Array, LruHashMap, RingBuf},
    programs::XdpContext,
};
use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};
use parse::{Packet, ParseOutcome};
use xdpfw_common::{
    absent, buffer_of, action, dir, dir6, escalation, field, fields_layout::*, fragment_policy, header_flags, limit, rule_flags, trace, Bitmap,
    DecisionEvent, DirBlock, DirLine, EscalationEvent, FieldEntry, FlowKey, GlobalStats, LogLimit, Pending, TraceConfig,
    LimitKey, LimitState, RuleMeta, RuleStats, RulesetHeader, Verdict, BITMAP_ALL, BITMAP_WORDS, BUFFERS,
    DEFAULT_RULE_SLOT, MAX_BITMAPS, variant, MAX_RULES, RULE_SLOTS,
};

/// Slot 0: the current generation; `buffer_of(generation)` is the active buffer. Written by
/// userspace with one atomic 8-byte store through its mapping, read exactly once per packet.
/// Slot 1 (`trace::LEASE_SLOT`): the tracer's lease, 0 when nobody traces (see `trace`).
#[map(name = "ACTIVE")]
static ACTIVE: Array<u64> = Array::with_max_entries(trace::ACTIVE_ENTRIES, BPF_F_MMAPABLE);

// The maps an operator reads carry BTF (`#[btf_map]`): `bpftool map dump` shows their fields
// by name. The big tables and the generation stay plain maps: nothing to read there by hand.
const MMAPABLE: usize = BPF_F_MMAPABLE as usize;
const RULE_ENTRIES: usize = BUFFERS as usize * MAX_RULES;

#[btf_map]
static HEADERS: BtfArray<RulesetHeader, { BUFFERS as usize }, MMAPABLE> = BtfArray::new();

#[btf_map]
static RULES: BtfArray<RuleMeta, RULE_ENTRIES, MMAPABLE> = BtfArray::new();

#[map(name = "FIELDS")]
static FIELDS: Array<FieldEntry> =
    Array::with_max_entries(BUFFERS * FIELDS_PER_BUFFER, BPF_F_MMAPABLE);

#[map(name = "BITMAPS")]
static BITMAPS: Array<Bitmap> = Array::with_max_entries(BUFFERS * MAX_BITMAPS, BPF_F_MMAPABLE);

// The IPv6 tables (see xdpfw_common::dir6): the top levels in fixed arrays holding both
// buffers, the node lines in inner maps, one slot per buffer, in the array-of-maps of their
// size. A reload fills brand-new line maps and swaps them into the inactive slots, so lines are
// never modified while packets can read them.
#[map(name = "SRC_V6_TOP")]
static SRC_V6_TOP: Array<DirBlock> = Array::with_max_entries(BUFFERS * dir6::TOP_BLOCKS, BPF_F_MMAPABLE);
#[map(name = "DST_V6_TOP")]
static DST_V6_TOP: Array<DirBlock> = Array::with_max_entries(BUFFERS * dir6::TOP_BLOCKS, BPF_F_MMAPABLE);
const V0: usize = dir6::LINE_SIZES[0] as usize;
const V1: usize = dir6::LINE_SIZES[1] as usize;
const V2: usize = dir6::LINE_SIZES[2] as usize;
const V3: usize = dir6::LINE_SIZES[3] as usize;
const V4: usize = dir6::LINE_SIZES[4] as usize;
const V5: usize = dir6::LINE_SIZES[5] as usize;
#[btf_map]
static SRC_V6_LINES_4K: Leaves<V0> = ArrayOfMaps::new();
#[btf_map]
static SRC_V6_LINES_64K: Leaves<V1> = ArrayOfMaps::new();
#[btf_map]
static SRC_V6_LINES_512K: Leaves<V2> = ArrayOfMaps::new();
#[btf_map]
static SRC_V6_LINES_2M: Leaves<V3> = ArrayOfMaps::new();
#[btf_map]
static SRC_V6_LINES_4M: Leaves<V4> = ArrayOfMaps::new();
#[btf_map]
static SRC_V6_LINES_16M: Leaves<V5> = ArrayOfMaps::new();
#[btf_map]
static DST_V6_LINES_4K: Leaves<V0> = ArrayOfMaps::new();
#[btf_map]
static DST_V6_LINES_64K: Leaves<V1> = ArrayOfMaps::new();
#[btf_map]
static DST_V6_LINES_512K: Leaves<V2> = ArrayOfMaps::new();
#[btf_map]
static DST_V6_LINES_2M: Leaves<V3> = ArrayOfMaps::new();
#[btf_map]
static DST_V6_LINES_4M: Leaves<V4> = ArrayOfMaps::new();
#[btf_map]
static DST_V6_LINES_16M: Leaves<V5> = ArrayOfMaps::new();

// The direct IPv4 tables (see xdpfw_common::dir). The top levels and first chunks are fixed
// arrays holding both buffers; further chunks are inner maps, one slot per buffer, swapped like
// the tries, in the array-of-maps of their size. Every inner map of one array-of-maps has the
// same size (no BPF_F_INNER_MAP), so the verifier inlines all these lookups: no helper call.
#[map(name = "SRC_V4_FIXED")]
static SRC_V4_FIXED: Array<DirBlock> = Array::with_max_entries(BUFFERS * dir::BUFFER_BLOCKS, BPF_F_MMAPABLE);
#[map(name = "DST_V4_FIXED")]
static DST_V4_FIXED: Array<DirBlock> = Array::with_max_entries(BUFFERS * dir::BUFFER_BLOCKS, BPF_F_MMAPABLE);
type More<const N: usize> = ArrayOfMaps<BtfArray<DirBlock, N, { BPF_F_MMAPABLE as usize }>, { BUFFERS as usize }>;
const M0: usize = dir::MORE_SIZES[0] as usize;
const M1: usize = dir::MORE_SIZES[1] as usize;
const M2: usize = dir::MORE_SIZES[2] as usize;
#[btf_map]
static SRC_V4_MORE_4K: More<M0> = ArrayOfMaps::new();
#[btf_map]
static SRC_V4_MORE_16K: More<M1> = ArrayOfMaps::new();
#[btf_map]
static SRC_V4_MORE_64K: More<M2> = ArrayOfMaps::new();
#[btf_map]
static DST_V4_MORE_4K: More<M0> = ArrayOfMaps::new();
#[btf_map]
static DST_V4_MORE_16K: More<M1> = ArrayOfMaps::new();
#[btf_map]
static DST_V4_MORE_64K: More<M2> = ArrayOfMaps::new();
// The compressed leaves, in inner maps of 64-byte lines, one fixed size per array-of-maps.
type Leaves<const N: usize> = ArrayOfMaps<BtfArray<DirLine, N, { BPF_F_MMAPABLE as usize }>, { BUFFERS as usize }>;
const L0: usize = dir::LEAF_SIZES[0] as usize;
const L1: usize = dir::LEAF_SIZES[1] as usize;
const L2: usize = dir::LEAF_SIZES[2] as usize;
const L3: usize = dir::LEAF_SIZES[3] as usize;
#[btf_map]
static SRC_V4_LEAVES_4K: Leaves<L0> = ArrayOfMaps::new();
#[btf_map]
static SRC_V4_LEAVES_64K: Leaves<L1> = ArrayOfMaps::new();
#[btf_map]
static SRC_V4_LEAVES_512K: Leaves<L2> = ArrayOfMaps::new();
#[btf_map]
static SRC_V4_LEAVES_2M: Leaves<L3> = ArrayOfMaps::new();
#[btf_map]
static DST_V4_LEAVES_4K: Leaves<L0> = ArrayOfMaps::new();
#[btf_map]
static DST_V4_LEAVES_64K: Leaves<L1> = ArrayOfMaps::new();
#[btf_map]
static DST_V4_LEAVES_512K: Leaves<L2> = ArrayOfMaps::new();
#[btf_map]
static DST_V4_LEAVES_2M: Leaves<L3> = ArrayOfMaps::new();

/// The maps of one direct IPv4 table.
struct DirMaps {
    fixed: &'static Array<DirBlock>,
    more: (&'static More<M0>, &'static More<M1>, &'static More<M2>),
    leaves: (&'static Leaves<L0>, &'static Leaves<L1>, &'static Leaves<L2>, &'static Leaves<L3>),
}

static SRC_V4: DirMaps = DirMaps {
    fixed: &SRC_V4_FIXED,
    more: (&SRC_V4_MORE_4K, &SRC_V4_MORE_16K, &SRC_V4_MORE_64K),
    leaves: (&SRC_V4_LEAVES_4K, &SRC_V4_LEAVES_64K, &SRC_V4_LEAVES_512K, &SRC_V4_LEAVES_2M),
};
static DST_V4: DirMaps = DirMaps {
    fixed: &DST_V4_FIXED,
    more: (&DST_V4_MORE_4K, &DST_V4_MORE_16K, &DST_V4_MORE_64K),
    leaves: (&DST_V4_LEAVES_4K, &DST_V4_LEAVES_64K, &DST_V4_LEAVES_512K, &DST_V4_LEAVES_2M),
};

/// Slot 0 counts traffic; slot 1 is scratch for the probe copy, never reported.
#[btf_map]
static GLOBAL_STATS: BtfPerCpuArray<GlobalStats, 2> = BtfPerCpuArray::new();

/// 1 in the copy of the program a reload loads to prove a new ruleset before its flip: that copy
/// shares every map with the attached program but reads the *inactive* buffer and counts nothing
/// that is reported. The attached program has 0, so the verifier removes these branches from it.
#[unsafe(no_mangle)]
static PROBE: u32 = 0;

#[inline(always)]
pub(crate) fn probe() -> u32 {
    // SAFETY: a read of a constant global; volatile so the compiler keeps the load aya patches.
    unsafe { core::ptr::read_volatile(&PROBE) }
}

/// Which copy this is (`variant::*`, set by the loader): `PLAIN` for rulesets without rate
/// limits, `state`, VLAN conditions, `log` and neighbour discovery under the rules. A constant
/// the verifier knows, so in the `PLAIN` copy it removes those paths and their tests: a ruleset
/// that uses none of them costs what it cost before they existed (the classifier bench measured
/// the tests alone at 2-4% per packet). The default, `FULL`, serves every ruleset.
#[unsafe(no_mangle)]
static VARIANT: u32 = variant::FULL;

/// Whether this copy keeps the paths `variant::PLAIN` prunes.
#[inline(always)]
fn full() -> bool {
    // SAFETY: a read of a constant global; volatile so the compiler keeps the load aya patches.
    unsafe { core::ptr::read_volatile(&VARIANT) != variant::PLAIN }
}

#[btf_map]
static RULE_STATS: BtfPerCpuArray<RuleStats, { (BUFFERS * RULE_SLOTS) as usize }> = BtfPerCpuArray::new();

/// Userspace verdicts for escalated flows, tagged with the generation they were decided for.
#[map(name = "VERDICTS")]
static VERDICTS: LruHashMap<FlowKey, Verdict> =
    LruHashMap::with_max_entries(escalation::VERDICT_ENTRIES, 0);

/// Flows escalated and not decided yet: one event per flow, not one per packet. A separate map
/// from VERDICTS so a flood of new flows evicts other pending flows, never decided ones.
#[map(name = "PENDING")]
static PENDING: LruHashMap<FlowKey, Pending> =
    LruHashMap::with_max_entries(escalation::PENDING_ENTRIES, 0);

#[map(name = "ESCALATIONS")]
static ESCALATIONS: RingBuf = RingBuf::with_byte_size(escalation::RING_BYTES, 0);

/// Rate limits and per-rule buckets (see `LimitState`), both buffers.
#[btf_map]
static LIMITS: BtfArray<LimitState, RULE_ENTRIES, MMAPABLE> = BtfArray::new();

/// Per-source buckets: the theoretical arrival time of each (rule, source prefix).
#[map(name = "LIMIT_SOURCES")]
static LIMIT_SOURCES: LruHashMap<LimitKey, u64> = LruHashMap::with_max_entries(limit::SOURCE_ENTRIES, 0);

/// `loader trace`'s filter, sampling and bucket (see `TraceConfig`).
#[btf_map]
static TRACE: BtfArray<TraceConfig, 1, MMAPABLE> = BtfArray::new();

#[map(name = "TRACE_RING")]
static TRACE_RING: RingBuf = RingBuf::with_byte_size(trace::RING_BYTES, 0);

/// The log rate of each rule with `log`, both buffers.
#[btf_map]
static LOG_LIMITS: BtfArray<LogLimit, RULE_ENTRIES, MMAPABLE> = BtfArray::new();

#[map(name = "LOG_RING")]
static LOG_RING: RingBuf = RingBuf::with_byte_size(trace::LOG_RING_BYTES, 0);

/// Per-CPU scratch: the decision `decide` hands to `after_decision` (not pinned: each copy of
/// the program has its own).
#[map(name = "NOTE")]
static NOTE: aya_ebpf::maps::PerCpuArray<DecisionEvent> = aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);

/// The one entry point. The object names it `xdpfw_probe`, and the loader cuts that name to
/// `xdpfw` for the attached program (see `xdpfw_kernel`'s object.rs), so `bpftool prog show`
/// tells the probe copy from the live program. A second entry point for the probe would be
/// simpler, but measured 4% slower per packet (the classifier bench): one entry it is.
#[xdp]
pub fn xdpfw_probe(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Some(stats) = GLOBAL_STATS.get_ptr_mut(probe() & 1) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a per-CPU slot, only touched by this CPU with preemption disabled.
    let stats = unsafe { &mut *stats };
    stats.seen += 1;
    stats.bytes += len;
    let verdict = decide(&ctx, stats, len);
    if verdict & NOTED != 0 {
        after_decision(&ctx);
    }
    let verdict = verdict & !NOTED;
    if verdict == action::DROP {
        stats.dropped += 1;
        xdp_action::XDP_DROP
    } else {
        stats.passed += 1;
        xdp_action::XDP_PASS
    }
}

#[inline(always)]
fn decide(ctx: &XdpContext, stats: &mut GlobalStats, len: u64) -> u32 {
    let pkt = match parse::parse(ctx) {
        ParseOutcome::Packet(p) => p,
        ParseOutcome::NonIp => {
            stats.non_ip += 1;
            return action::PASS;
        }
        ParseOutcome::Malformed => {
            stats.malformed += 1;
            return action::DROP;
        }
    };
    if pkt.is_v6 {
        stats.ipv6 += 1;
    } else {
        stats.ipv4 += 1;
    }
    // The snapshot: one load of the generation picks the buffer for every lookup below. A reload
    // only rewrites a buffer after a grace period in which every packet that could have read the
    // old generation has finished.
    let Some(generation) = ACTIVE.get_ptr(0) else {
        return action::PASS;
    };
    // SAFETY: a valid map value pointer; a volatile 8-byte load is one atomic read.
    let generation = unsafe { core::ptr::read_volatile(generation) };
    let buffer = buffer_of(generation + probe() as u64);
    let Some(header) = HEADERS.get(buffer) else {
        return action::PASS;
    };
    // From here on the generation is the header's: the one the live program read (the active
    // buffer's header holds it), or for the probe copy the one being proved. Read where needed,
    // it need not be kept in a register across the classifier (that measured 5-8% per packet
    // together with the rest of what the classifier kept live).
    if pkt.neighbor_discovery && (!full() || header.flags & header_flags::ND_RULES == 0) {
        stats.neighbor_discovery += 1;
        return action::PASS;
    }

    if pkt.non_first_fragment {
        stats.fragments += 1;
        match header.fragment_policy {
            fragment_policy::DROP => return action::DROP,
            fragment_policy::PASS => return action::PASS,
            _ => {}
        }
    }

    let (slot, verdict, flags) = match classify(ctx, buffer, header, &pkt, stats) {
        Some(rule) => {
            stats.rule_hits += 1;
            match RULES.get(buffer * MAX_RULES as u32 + rule) {
                Some(meta) if meta.flags & rule_flags::NEEDS_OWNER != 0 => {
                    let answer = escalate(ctx, header, rule);
                    let (slot, verdict) = ((answer >> 32) as u32, answer as u32);
                    // Userspace may have decided by a later rule (or the default): its flags.
                    let flags = if slot == rule {
                        meta.flags
                    } else if slot < MAX_RULES as u32 {
                        RULES.get(buffer * MAX_RULES as u32 + slot).map_or(0, |m| m.flags)
                    } else {
                        0
                    };
                    (slot, verdict, flags)
                }
                Some(meta) => (rule, meta.action, meta.flags),
                None => (rule, header.default_action, 0),
            }
        }
        None => {
            stats.default_hits += 1;
            (DEFAULT_RULE_SLOT, header.default_action, 0)
        }
    };
    if probe() != 0 {
        // The probe copy must not touch the counters of the live ruleset, nor log or trace.
        return verdict;
    }
    if let Some(counter) = RULE_STATS.get_ptr_mut(buffer * RULE_SLOTS + (slot % RULE_SLOTS)) {
        // SAFETY: per-CPU slot, as above.
        let counter = unsafe { &mut *counter };
        counter.packets += 1;
        counter.bytes += len;
    }
    // Tracing off costs this load, from the array whose slot 0 (the generation) this packet
    // has just read; rulesets without `log` pay one bit test of flags loaded already.
    let lease = match ACTIVE.get_ptr(trace::LEASE_SLOT) {
        // SAFETY: a valid map value pointer; a volatile 8-byte load is one atomic read.
        Some(l) => unsafe { core::ptr::read_volatile(l) },
        None => 0,
    };
    let logged = full() && flags & rule_flags::LOG != 0;
    if logged || lease != 0 {
        if let Some(n) = NOTE.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot, as above.
            note(unsafe { &mut *n }, header.generation, slot, verdict, logged, len);
            return verdict | NOTED;
        }
    }
    verdict
}

/// Set in `decide`'s result when it noted the decision in NOTE for `after_decision`.
const NOTED: u32 = 1 << 8;

/// Writes the decision into the per-CPU NOTE, for `after_decision` to log or trace: only the
/// decision's scalars. The packet's fields are read again there (see `describe`), so nothing of
/// the parsed packet has to stay live across the classifier for a path taken only while
/// tracing or for rules with `log` (kept live, they compete for registers and stack on every
/// path of the classifier; the bench could not tell the two versions apart, so this is about
/// keeping that path's state small, not a measured gain).
#[inline(always)]
fn note(n: &mut DecisionEvent, generation: u64, slot: u32, verdict: u32, logged: bool, len: u64) {
    n.generation = generation;
    n.time_ns = 0;
    n.len = len as u32;
    n.rule = slot;
    n.kind = if logged { trace::kind::LOG } else { trace::kind::TRACE };
    n.verdict = verdict as u8;
}

/// Fills the packet's side of a noted decision: the frame parsed again (it is the same frame,
/// unchanged since `decide`). False for a frame that no longer parses (never expected).
#[inline(always)]
fn describe(ctx: &XdpContext, n: &mut DecisionEvent) -> bool {
    let ParseOutcome::Packet(pkt) = parse::parse(ctx) else { return false };
    n.src = [0; 16];
    n.dst = [0; 16];
    if pkt.is_v6 {
        if let Some(a) = parse::v6_addr_ref(ctx, pkt.l3_off, true) {
            n.src = *a;
        }
        if let Some(a) = parse::v6_addr_ref(ctx, pkt.l3_off, false) {
            n.dst = *a;
        }
    } else {
        let (s, d) = (pkt.src4.to_be_bytes(), pkt.dst4.to_be_bytes());
        n.src[0] = s[0];
        n.src[1] = s[1];
        n.src[2] = s[2];
        n.src[3] = s[3];
        n.dst[0] = d[0];
        n.dst[1] = d[1];
        n.dst[2] = d[2];
        n.dst[3] = d[3];
    }
    n.sport = pkt.sport;
    n.dport = pkt.dport;
    n.proto = pkt.proto;
    n.is_v6 = pkt.is_v6 as u8;
    n.icmp = pkt.icmp;
    n.tcp_flags = pkt.tcp_flags;
    n.has = pkt.has_ports as u8 | (pkt.has_icmp as u8) << 1 | (pkt.has_tcp_flags as u8) << 2;
    n._pad = [0; 4];
    true
}

/// Logs and traces the decision `decide` noted. A BPF subprogram called once, after the
/// classifier's paths have come together, reading everything from NOTE (map memory the
/// verifier does not follow): so it is verified a few times, not once per path of the
/// classifier (inlined there, or called from there, it multiplied the verifier's work by 7).
#[inline(never)]
fn after_decision(ctx: &XdpContext) {
    let Some(n) = NOTE.get_ptr_mut(0) else { return };
    // SAFETY: a per-CPU slot written by `decide` for this packet.
    let n = unsafe { &mut *n };
    if !describe(ctx, n) {
        return;
    }
    if n.kind == trace::kind::LOG {
        // SAFETY: a helper with no arguments.
        n.time_ns = unsafe { bpf_ktime_get_ns() };
        log_decision(n);
    }
    trace_decision(n);
}

/// Takes one token of a GCRA bucket (`tat`, the theoretical arrival time): true when the event
/// is within the rate. One compare-and-swap, no retry (see [`within_limit`]).
#[inline(always)]
fn take_token(tat: *mut u64, interval_ns: u64, burst_ns: u64, now: u64) -> bool {
    // SAFETY: `tat` points into a map value, 8-byte aligned; other CPUs update it only through
    // the compare-and-swap below.
    let old = unsafe { core::ptr::read_volatile(tat) };
    let next = if old > now { old } else { now } + interval_ns;
    if next - now > burst_ns {
        return false;
    }
    // SAFETY: as above.
    unsafe { atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(tat, old, next) };
    true
}

/// Adds one to a counter shared by every CPU (BPF_XADD).
#[inline(always)]
fn count_shared(counter: *mut u64) {
    // SAFETY: the field of a valid map value, 8-byte aligned.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
}

/// Sends the noted decision to `ring`. False when the ring is full.
#[inline(always)]
fn send_decision(ring: &RingBuf, n: &DecisionEvent) -> bool {
    match ring.output(n, 0) {
        Ok(()) => true,
        Err(_) => false,
    }
}

/// A packet decided by a rule with `log`: sent to LOG_RING within the rule's log rate.
#[inline(always)]
fn log_decision(n: &DecisionEvent) {
    let now = n.time_ns;
    let rule = n.rule % MAX_RULES as u32;
    let Some(l) = LOG_LIMITS.get_ptr_mut(buffer_of(n.generation) * MAX_RULES as u32 + rule) else {
        return;
    };
    // SAFETY: a valid map value pointer; the parameters are written only by a reload, into the
    // inactive buffer.
    let (interval_ns, burst_ns) = unsafe { ((*l).interval_ns, (*l).burst_ns) };
    if interval_ns == 0 {
        // No log rate: not a rule with `log` (a bucket of zeros would admit everything).
        return;
    }
    // SAFETY: fields of a valid map value.
    let (tat, suppressed) = unsafe { (core::ptr::addr_of_mut!((*l).tat), core::ptr::addr_of_mut!((*l).suppressed)) };
    if !take_token(tat, interval_ns, burst_ns, now) || !send_decision(&LOG_RING, n) {
        count_shared(suppressed);
    }
}

/// A decision while a tracer holds the lease: sent to TRACE_RING when it passes the tracer's
/// filter, its 1-in-N draw (not for rules with `log`, which are always candidates) and its
/// rate.
#[inline(always)]
fn trace_decision(n: &mut DecisionEvent) {
    let Some(lease) = ACTIVE.get_ptr(trace::LEASE_SLOT) else { return };
    // SAFETY: as in `decide`.
    if unsafe { core::ptr::read_volatile(lease) } == 0 {
        return;
    }
    let Some(c) = TRACE.get_ptr_mut(0) else { return };
    // SAFETY: a valid map value pointer, written by the tracer before it took the lease.
    let cfg = unsafe { &*c };
    let f = cfg.filter;
    let has_ports = n.has & 1 != 0;
    if (f & trace::filter::PROTO != 0 && n.proto != cfg.proto)
        || (f & trace::filter::PORT != 0 && !(has_ports && (n.sport == cfg.port || n.dport == cfg.port)))
        || (f & trace::filter::RULE != 0 && (n.rule != cfg.rule || n.generation != cfg.rule_generation))
        || (f & trace::filter::VERDICT != 0 && n.verdict as u32 != cfg.verdict)
    {
        return;
    }
    if f & (trace::filter::ADDR_V4 | trace::filter::ADDR_V6) != 0 {
        let want_v6 = f & trace::filter::ADDR_V6 != 0;
        if (n.is_v6 != 0) != want_v6 || !(within(&n.src, cfg) || within(&n.dst, cfg)) {
            return;
        }
    }
    let logged = n.kind == trace::kind::LOG;
    // The clock only for what passed the filter (a helper call costs more than the filter).
    let now = if logged {
        n.time_ns
    } else {
        // SAFETY: a helper with no arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        n.time_ns = now;
        now
    };
    // SAFETY: as in `decide`. An expired lease is a tracer that died without saying so.
    if unsafe { core::ptr::read_volatile(lease) } <= now {
        return;
    }
    // SAFETY: a helper with no arguments.
    if !logged && cfg.sample > 1 && unsafe { bpf_get_prandom_u32() }.checked_rem(cfg.sample).unwrap_or(0) != 0 {
        return;
    }
    // SAFETY: fields of a valid map value.
    let (tat, limited, lost) =
        unsafe { (core::ptr::addr_of_mut!((*c).tat), core::ptr::addr_of_mut!((*c).limited), core::ptr::addr_of_mut!((*c).lost)) };
    if !take_token(tat, cfg.interval_ns, cfg.burst_ns, now) {
        count_shared(limited);
        return;
    }
    if !send_decision(&TRACE_RING, n) {
        count_shared(lost);
    }
}

/// Whether `a` (network order; IPv4 in the first 4 bytes) is within the tracer's prefix: two
/// 64-bit halves under their masks.
#[inline(always)]
fn within(a: &[u8; 16], cfg: &TraceConfig) -> bool {
    let half = |b: &[u8; 16], i: usize| {
        u64::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3], b[i + 4], b[i + 5], b[i + 6], b[i + 7]])
    };
    let bits = cfg.prefix_len;
    (half(a, 0) ^ half(&cfg.addr, 0)) & half_mask(bits, 0) == 0 && (half(a, 8) ^ half(&cfg.addr, 8)) & half_mask(bits, 64) == 0
}

/// The mask of a `bits`-long IPv6 prefix over the 64-bit half that starts at bit `skip` (0 or
/// 64) of the address.
#[inline(always)]
fn half_mask(bits: u32, skip: u32) -> u64 {
    if bits <= skip {
        0
    } else if bits >= skip + 64 {
        u64::MAX
    } else {
        u64::MAX << (64 - (bits - skip))
    }
}


/// Rules with a rate limit match only within it: when the first matching rule is beyond its
/// limit, the next matching rule decides (its own limit, if it has one, is not consulted: one
/// limit a packet, which keeps the verifier's work to one more scan of the bitmaps). Only
/// rulesets with limits get here, and only a packet whose first match has a limit pays more
/// than one flag test.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply_limits(
    ctx: &XdpContext,
    generation: u64,
    buffer: u32,
    header: &RulesetHeader,
    pkt: &Packet,
    len: u64,
    fields: Option<&Fields>,
    first: Option<u32>,
    stats: &mut GlobalStats,
) -> Option<u32> {
    let rule = first?;
    // The probe copy (self-tests) must not spend the tokens of the ruleset it proves: its
    // rules are taken to be within their limits, as the reference matcher takes them.
    if probe() != 0 || !is_limited(buffer, rule) {
        return Some(rule);
    }
    let index = buffer * MAX_RULES as u32 + (rule % MAX_RULES as u32);
    // The source as scalars, not the packet by pointer (see PACKET_SCRATCH for why).
    let source = pkt.src4 as u64 | (pkt.l3_off as u64 & 0xffff) << 32 | (pkt.is_v6 as u64) << 63;
    match within_limit(ctx, source, index, (generation << 32) | rule as u64, len) {
        LIMIT_WITHIN => return Some(rule),
        LIMIT_WITHIN_NEW_SOURCE => {
            stats.limit_sources += 1;
            return Some(rule);
        }
        _ => {
            stats.limited += 1;
            if let Some(spec) = LIMITS.get_ptr_mut(index) {
                // SAFETY: the field of a valid map value, 8-byte aligned; an atomic add (BPF_XADD).
                unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(core::ptr::addr_of_mut!((*spec).limited), 1) };
            }
        }
    }
    match fields {
        Some(f) => match_after(f, rule),
        // No rule has any condition: every rule matches, so the next one is the next match.
        None => (rule + 1 < header.rule_count).then_some(rule + 1),
    }
}

/// The lowest rule above `rule` in the AND of the fields' bitmaps.
#[inline(always)]
fn match_after(f: &Fields, rule: u32) -> Option<u32> {
    let first_word = (rule / 64) as usize & (BITMAP_WORDS - 1);
    let bit = rule % 64;
    let mut candidates = (f.src.summary & f.dst.summary & f.proto.summary & f.sport.summary & f.dport.summary & f.icmp.summary & f.flags.summary & f.state.summary & f.vlan.summary)
        & (u64::MAX << first_word);
    // In the rule's own word, only the bits above it.
    let above = if bit >= 63 { 0 } else { u64::MAX << (bit + 1) };
    let mut i = 0;
    while i < BITMAP_WORDS {
        if candidates == 0 {
            break;
        }
        let w = (candidates.trailing_zeros() as usize) & (BITMAP_WORDS - 1);
        let acc = f.src.words[w]
            & f.dst.words[w]
            & f.proto.words[w]
            & f.sport.words[w]
            & f.dport.words[w]
            & f.icmp.words[w]
            & f.flags.words[w]
            & f.state.words[w]
            & f.vlan.words[w]
            & if w == first_word { above } else { u64::MAX };
        if acc != 0 {
            return Some((w as u32) * 64 + acc.trailing_zeros());
        }
        candidates &= candidates - 1;
        i += 1;
    }
    None
}

#[inline(always)]
fn is_limited(buffer: u32, rule: u32) -> bool {
    rule_flags_of(buffer, rule) & rule_flags::LIMITED != 0
}

/// `rule_flags::*` of a rule of `buffer`.
#[inline(always)]
pub(crate) fn rule_flags_of(buffer: u32, rule: u32) -> u32 {
    match RULES.get(buffer * MAX_RULES as u32 + (rule % MAX_RULES as u32)) {
        Some(meta) => meta.flags,
        None => 0,
    }
}

const LIMIT_BEYOND: u32 = 0;
const LIMIT_WITHIN: u32 = 1;
/// Within, in a bucket made for a source just now.
const LIMIT_WITHIN_NEW_SOURCE: u32 = 2;

/// Takes a packet's cost from the bucket of the rule at `index` of LIMITS (its own, or its
/// source's; `generation_rule` is the generation's low 32 bits above the rule number): one of
/// `LIMIT_*`. A function of its own (a BPF subprogram, at most five arguments): inlined, its
/// keys would push the program's stack beyond 512 bytes.
#[inline(never)]
fn within_limit(ctx: &XdpContext, source: u64, index: u32, generation_rule: u64, len: u64) -> u32 {
    // `source`: the IPv4 source (host order) in the low 32 bits, the IPv6 header's offset in
    // the next 16, "is IPv6" in the top bit.
    let (is_v6, l3_off, src4) = (source >> 63 != 0, ((source >> 32) & 0xffff) as usize, source as u32);
    let Some(spec) = LIMITS.get_ptr_mut(index) else {
        return LIMIT_WITHIN;
    };
    // SAFETY: a valid map value pointer; the parameters are written only by a reload, into the
    // inactive buffer. They are read where used, to keep this function's stack small (its frame
    // and the program's together must fit in 512 bytes).
    let s = unsafe { &*spec };
    let mut created = false;
    let tat: *mut u64 = if s.per_source == 0 {
        // SAFETY: the field of a valid map value.
        unsafe { core::ptr::addr_of_mut!((*spec).tat) }
    } else {
        let mut key = LimitKey {
            addr: [0; 16],
            rule: generation_rule as u32,
            generation: (generation_rule >> 32) as u32,
            is_v6: is_v6 as u8,
            _pad: [0; 3],
        };
        if is_v6 {
            let Some(a) = parse::v6_addr(ctx, l3_off, true) else { return LIMIT_WITHIN };
            // The address as two big-endian halves, each cut to its part of the prefix.
            let bits = s.v6_prefix as u32;
            let hi = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]) & half_mask(bits, 0);
            let lo = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]) & half_mask(bits, 64);
            let (hi, lo) = (hi.to_be_bytes(), lo.to_be_bytes());
            let mut i = 0;
            while i < 8 {
                key.addr[i] = hi[i];
                key.addr[8 + i] = lo[i];
                i += 1;
            }
        } else {
            let len = s.v4_prefix as u32;
            let mask = if len == 0 { 0 } else if len >= 32 { u32::MAX } else { u32::MAX << (32 - len) };
            let a = (src4 & mask).to_be_bytes();
            key.addr[0] = a[0];
            key.addr[1] = a[1];
            key.addr[2] = a[2];
            key.addr[3] = a[3];
        }
        match LIMIT_SOURCES.get_ptr_mut(&key) {
            Some(p) => p,
            None => {
                // A new source starts with a full bucket (a zero arrival time).
                let _ = LIMIT_SOURCES.insert(&key, &0, 0);
                created = true;
                match LIMIT_SOURCES.get_ptr_mut(&key) {
                    Some(p) => p,
                    None => return LIMIT_WITHIN_NEW_SOURCE,
                }
            }
        }
    };
    let cost = s.interval_ns + ((len * s.ns_per_byte) >> limit::BYTE_SHIFT);
    let burst = s.burst_ns;
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // GCRA: admit when the arrival time, pushed by this packet's cost, is within the burst.
    // Compare-and-swap (BPF_CMPXCHG; Rust's core has no atomic methods on BPF, hence the
    // intrinsic). One attempt: when another CPU took a token at the same moment, this packet is
    // let through without paying (a retry loop multiplies the verifier's work), so a limit is
    // exceeded by at most one packet per collision.
    if !take_token(tat, cost, burst, now) {
        return LIMIT_BEYOND;
    }
    if created { LIMIT_WITHIN_NEW_SOURCE } else { LIMIT_WITHIN }
}

/// A packet whose first matching rule needs the socket owner: the flow's cached userspace
/// verdict if there is one for this generation, else the ruleset's pending action, sending one
/// event per flow (per retry interval) to userspace. Returns the counted rule slot and the action.
///
/// Nothing here can wait: the first packets of a new flow get the pending action (with "drop",
/// TCP retransmits its SYN and finds the verdict in place).
///
/// A subprogram (called only for rules that need the owner): its flow key and event stay off
/// the stack of the program's main path. Returns `slot << 32 | action`.
#[inline(never)]
fn escalate(ctx: &XdpContext, header: &RulesetHeader, rule: u32) -> u64 {
    let generation = header.generation;
    // The frame parsed again (see `classify_policy`).
    let (slot, action) = match (parse::parse(ctx), GLOBAL_STATS.get_ptr_mut(probe() & 1)) {
        // SAFETY: the per-CPU counters, only touched by this CPU with preemption disabled.
        (ParseOutcome::Packet(pkt), Some(stats)) => escalate_answer(ctx, generation, header, rule, &pkt, unsafe { &mut *stats }),
        _ => (rule, header.pending_action),
    };
    ((slot as u64) << 32) | action as u64
}

#[inline(always)]
fn escalate_answer(
    ctx: &XdpContext,
    generation: u64,
    header: &RulesetHeader,
    rule: u32,
    pkt: &Packet,
    stats: &mut GlobalStats,
) -> (u32, u32) {
    if probe() != 0 {
        // Self-tests prove the kernel escalates; they must not touch the live flows' state.
        return (rule, header.pending_action);
    }
    let (src, dst) = if pkt.is_v6 {
        match (parse::v6_addr(ctx, pkt.l3_off, true), parse::v6_addr(ctx, pkt.l3_off, false)) {
            (Some(s), Some(d)) => (s, d),
            _ => return (rule, header.pending_action),
        }
    } else {
        let (s, d) = (pkt.src4.to_be_bytes(), pkt.dst4.to_be_bytes());
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[0] = s[0];
        src[1] = s[1];
        src[2] = s[2];
        src[3] = s[3];
        dst[0] = d[0];
        dst[1] = d[1];
        dst[2] = d[2];
        dst[3] = d[3];
        (src, dst)
    };
    let key = FlowKey {
        src,
        dst,
        sport: if pkt.has_ports { pkt.sport } else { 0 },
        dport: if pkt.has_ports { pkt.dport } else { 0 },
        proto: pkt.proto,
        is_v6: pkt.is_v6 as u8,
        _pad: [0; 2],
    };
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a valid value pointer, read at once. LRU maps recycle elements without waiting
    // for readers, so a rare race with an update can mix two verdicts' fields: that affects
    // this one packet, and the generation check still keeps other rulesets' verdicts out.
    let answer = match unsafe { VERDICTS.get(&key) } {
        Some(v) if v.generation == generation => {
            stats.cache_hits += 1;
            if v.expires_ns > now {
                return (v.rule, v.action);
            }
            // Expired: the flow keeps its verdict while userspace decides it again, so a
            // long-lived flow sees no pending-action blip at each TTL.
            (v.rule, v.action)
        }
        _ => {
            stats.pending += 1;
            (rule, header.pending_action)
        }
    };
    let retry_ns = header.escalation_retry_ms as u64 * 1_000_000;
    // SAFETY: as above.
    if let Some(p) = unsafe { PENDING.get(&key) } {
        if p.generation == generation && now.wrapping_sub(p.since_ns) < retry_ns {
            return answer;
        }
    }
    let _ = PENDING.insert(&key, &Pending { generation, since_ns: now }, 0);
    match ESCALATIONS.reserve::<EscalationEvent>(0) {
        Some(mut event) => {
            event.write(EscalationEvent { flow: key, generation, sent_ns: now, rule, tcp_flags: pkt.tcp_flags as u32 });
            event.submit(0);
            stats.escalations += 1;
        }
        None => stats.ring_overflows += 1,
    }
    answer
}

/// First-match classification by bit vectors: each constrained field yields the bitmap of rules
/// that field allows; the lowest bit set in their AND is the first matching rule.
///
/// A ruleset without `limit`, `state` and `vlan` is classified right here: the fields' lookups
/// and one scan. The others go to [`classify_policy`], a subprogram that parses the frame
/// again: inlined on the same path, that code cost every ruleset 5-9% per packet (the
/// registers and stack the plain path then shares with it), though each part alone measured
/// within 1.5%.
#[inline(always)]
fn classify(ctx: &XdpContext, buffer: u32, header: &RulesetHeader, pkt: &Packet, stats: &mut GlobalStats) -> Option<u32> {
    const POLICY: u32 = header_flags::LIMITS | header_flags::STATE;
    if full() && (header.flags & POLICY != 0 || header.fields & field::VLAN != 0) {
        let rule = classify_policy(ctx, header, stats);
        return if rule == NO_RULE { None } else { Some(rule) };
    }
    if header.fields == 0 {
        // No rule has any condition: the first rule, if any, matches everything.
        return if header.rule_count > 0 { Some(0) } else { None };
    }
    let f = lookup_fields::<false>(ctx, buffer, header, pkt)?;
    first_match::<false, false>(&f)
}

/// The parsed packet of [`classify_policy`], for `flows::packet_state`: a per-CPU slot rather
/// than a pointer to the caller's stack, which is short (512 bytes over the chain of calls).
/// (The plain path hands the packet to no subprogram: a pointer to it passed to one makes the
/// packet live in memory on every path of the program, which alone measured 3-4% per packet.)
#[map]
pub(crate) static PACKET_SCRATCH: aya_ebpf::maps::PerCpuArray<Packet> = aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);

/// `classify_policy`'s "no rule matched".
const NO_RULE: u32 = u32::MAX;

/// [`classify`] for rulesets with rate limits, connection state or VLAN conditions: a rule
/// beyond its limit gives way to the next match in the same bitmaps (see [`apply_limits`]); a
/// first match that needs the connection state looks it up (`flows::apply_state`). Returns the
/// rule, or `NO_RULE`. (A subprogram: at most five arguments, so the buffer and the frame's
/// length are derived again.)
#[inline(never)]
fn classify_policy(ctx: &XdpContext, header: &RulesetHeader, stats: &mut GlobalStats) -> u32 {
    // The frame parsed again (it is unchanged): handing over the parsed packet would make the
    // plain path keep it in memory. Kept in PACKET_SCRATCH for `flows::packet_state`.
    let ParseOutcome::Packet(parsed) = parse::parse(ctx) else { return NO_RULE };
    let Some(pkt) = PACKET_SCRATCH.get_ptr_mut(0) else { return NO_RULE };
    // SAFETY: this CPU's slot; nothing else runs on this CPU until the program returns.
    let pkt = unsafe { &mut *pkt };
    *pkt = parsed;
    let pkt = &*pkt;
    // The header's own generation: the live one, or for the probe copy the one it proves (whose
    // buffer it reads).
    let generation = header.generation;
    let buffer = buffer_of(generation);
    let len = (ctx.data_end() - ctx.data()) as u64;
    let limits = header.flags & header_flags::LIMITS != 0;
    let found = if header.fields == 0 {
        // No rule has any condition: the first rule, if any, matches everything.
        let first = if header.rule_count > 0 { Some(0) } else { None };
        if limits { apply_limits(ctx, generation, buffer, header, pkt, len, None, first, stats) } else { first }
    } else {
        match lookup_fields::<true>(ctx, buffer, header, pkt) {
            None => None,
            Some(mut f) => {
                let mut first = first_match::<false, true>(&f);
                if header.flags & header_flags::STATE != 0 {
                    first = flows::apply_state(ctx, buffer, &mut f, first, limits, stats);
                }
                if limits { apply_limits(ctx, generation, buffer, header, pkt, len, Some(&f), first, stats) } else { first }
            }
        }
    };
    found.unwrap_or(NO_RULE)
}

/// The bitmap of each field for one packet.
pub(crate) struct Fields {
    src: &'static Bitmap,
    dst: &'static Bitmap,
    proto: &'static Bitmap,
    sport: &'static Bitmap,
    dport: &'static Bitmap,
    icmp: &'static Bitmap,
    flags: &'static Bitmap,
    /// The rules the packet's connection state allows: all of them until a `state` rule is the
    /// first match (see `flows::apply_state`).
    pub(crate) state: &'static Bitmap,
    vlan: &'static Bitmap,
}

/// Looks up the bitmap of every field the ruleset constrains.
///
/// A field the ruleset does not constrain is not looked up; its place in the AND is taken by
/// the all-rules bitmap, so the AND loop has no branches (and the verifier no path explosion).
/// Fields are separate locals, not an array: zero-initialised arrays become byte-by-byte memset
/// loops on BPF, which cost more than the lookups themselves.
#[inline(always)]
fn lookup_fields<const VLAN: bool>(ctx: &XdpContext, buffer: u32, header: &RulesetHeader, pkt: &Packet) -> Option<Fields> {
    let fields = header.fields;
    let base = buffer * MAX_BITMAPS;
    let bitmap = |id: u32| BITMAPS.get(base + (id % MAX_BITMAPS));
    let all = bitmap(BITMAP_ALL)?;
    let src = if fields & field::SRC != 0 {
        bitmap(prefix_bitmap(ctx, buffer, header, pkt, true))?
    } else {
        all
    };
    let dst = if fields & field::DST != 0 {
        bitmap(prefix_bitmap(ctx, buffer, header, pkt, false))?
    } else {
        all
    };
    let proto = if fields & field::PROTO != 0 {
        bitmap(field_bitmap(buffer, PROTO_BASE + pkt.proto as u32))?
    } else {
        all
    };
    let sport = if fields & field::SPORT != 0 {
        bitmap(if pkt.has_ports {
            field_bitmap(buffer, SPORT_BASE + pkt.sport as u32)
        } else {
            header.absent[absent::SPORT]
        })?
    } else {
        all
    };
    let dport = if fields & field::DPORT != 0 {
        bitmap(if pkt.has_ports {
            field_bitmap(buffer, DPORT_BASE + pkt.dport as u32)
        } else {
            header.absent[absent::DPORT]
        })?
    } else {
        all
    };
    let icmp = if fields & field::ICMP != 0 {
        bitmap(if pkt.has_icmp {
            field_bitmap(buffer, ICMP_BASE + pkt.icmp as u32)
        } else {
            header.absent[absent::ICMP]
        })?
    } else {
        all
    };
    let flags = if fields & field::TCP_FLAGS != 0 {
        bitmap(if pkt.has_tcp_flags {
            field_bitmap(buffer, TCP_FLAGS_BASE + pkt.tcp_flags as u32)
        } else {
            header.absent[absent::TCP_FLAGS]
        })?
    } else {
        all
    };
    let vlan = if VLAN && fields & field::VLAN != 0 { bitmap(field_bitmap(buffer, VLAN_BASE + outer_vlan(ctx)))? } else { all };
    Some(Fields { src, dst, proto, sport, dport, icmp, flags, state: all, vlan })
}

/// The id of the frame's outermost VLAN tag (802.1Q or 802.1ad), or `VLAN_UNTAGGED`: read
/// at its fixed place after the MAC addresses (the parser has already checked the tags).
#[inline(always)]
fn outer_vlan(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 16 > end {
        return VLAN_UNTAGGED;
    }
    // SAFETY: the 4 bytes at 12..16 are in the frame (checked above).
    let tag = unsafe { *((start + 12) as *const [u8; 4]) };
    let tpid = u16::from_be_bytes([tag[0], tag[1]]);
    if tpid == xdpfw_common::proto::ETH_P_8021Q || tpid == xdpfw_common::proto::ETH_P_8021AD {
        (u16::from_be_bytes([tag[2], tag[3]]) & 0x0fff) as u32
    } else {
        VLAN_UNTAGGED
    }
}

/// The lowest rule in the AND of the fields' bitmaps; with `STATE`, the connection state's
/// bitmap too. Without, `f.state` is not read: before `flows::apply_state` has looked the
/// state up it allows every rule. With `VLAN`, the VLAN bitmap too (the plain path of
/// [`classify`], taken only by rulesets without `vlan`, leaves it out).
#[inline(always)]
pub(crate) fn first_match<const STATE: bool, const VLAN: bool>(f: &Fields) -> Option<u32> {
    // Only words set in every summary can hold a match; visit them lowest (highest priority)
    // first. The summaries have at most BITMAP_WORDS bits, so this loop runs at most that often.
    let mut candidates = f.src.summary
        & f.dst.summary
        & f.proto.summary
        & f.sport.summary
        & f.dport.summary
        & f.icmp.summary
        & f.flags.summary
        & if STATE { f.state.summary } else { u64::MAX }
        & if VLAN { f.vlan.summary } else { u64::MAX };
    let mut i = 0;
    while i < BITMAP_WORDS {
        if candidates == 0 {
            break;
        }
        let w = (candidates.trailing_zeros() as usize) & (BITMAP_WORDS - 1);
        let acc = f.src.words[w]
            & f.dst.words[w]
            & f.proto.words[w]
            & f.sport.words[w]
            & f.dport.words[w]
            & f.icmp.words[w]
            & f.flags.words[w]
            & if STATE { f.state.words[w] } else { u64::MAX }
            & if VLAN { f.vlan.words[w] } else { u64::MAX };
        if acc != 0 {
            return Some((w as u32) * 64 + acc.trailing_zeros());
        }
        candidates &= candidates - 1;
        i += 1;
    }
    None
}

#[inline(always)]
pub(crate) fn field_bitmap(buffer: u32, index: u32) -> u32 {
    match FIELDS.get(buffer * FIELDS_PER_BUFFER + index) {
        Some(entry) => entry.bitmap,
        None => 0,
    }
}

#[inline(always)]
fn prefix_bitmap(ctx: &XdpContext, buffer: u32, header: &RulesetHeader, pkt: &Packet, source: bool) -> u32 {
    let found = if pkt.is_v6 {
        match parse::v6_addr_ref(ctx, pkt.l3_off, source) {
            Some(a) if source => v6_lookup::<true>(buffer, a),
            Some(a) => v6_lookup::<false>(buffer, a),
            None => None,
        }
    } else {
        let (table, addr) = if source { (&SRC_V4, pkt.src4) } else { (&DST_V4, pkt.dst4) };
        dir_lookup(table, buffer, addr)
    };
    let slot = if source { absent::SRC } else { absent::DST };
    found.unwrap_or(header.absent[slot])
}

/// The entry of `a` (host order) in the direct IPv4 table of `buffer`: the top level, then a
/// chunk, then a compressed leaf.
#[inline(always)]
fn dir_lookup(t: &DirMaps, buffer: u32, a: u32) -> Option<u32> {
    let mut e = t.fixed.get(buffer * dir::BUFFER_BLOCKS + (a >> 24))?.entries[((a >> 16) & 0xff) as usize];
    if e & dir::CHUNK != 0 {
        e = chunk_entry(t, buffer, e, a >> 8)?;
        if e & dir::CHUNK != 0 {
            e = leaf_entry(t, buffer, e & !dir::CHUNK, a & 0xff)?;
        }
    }
    Some(e)
}

/// Entry `byte & 0xff` of the chunk that entry `e` names: in the fixed array, or in the one
/// inner map (of whichever size) the buffer has.
#[inline(always)]
fn chunk_entry(t: &DirMaps, buffer: u32, e: u32, byte: u32) -> Option<u32> {
    let n = e & !dir::CHUNK;
    let block = if n < dir::FIXED_CHUNKS {
        t.fixed.get(buffer * dir::BUFFER_BLOCKS + dir::TOP_BLOCKS + n)?
    } else {
        let i = n - dir::FIXED_CHUNKS;
        let (m0, m1, m2) = t.more;
        if let Some(m) = m0.get(buffer) {
            m.get(i)?
        } else if let Some(m) = m1.get(buffer) {
            m.get(i)?
        } else {
            m2.get(buffer)?.get(i)?
        }
    };
    Some(block.entries[(byte & 0xff) as usize])
}

/// Line `i` of the buffer's leaves, in the one inner map (of whichever size) the buffer has.
#[inline(always)]
fn leaf_line(t: &DirMaps, buffer: u32, i: u32) -> Option<&'static DirLine> {
    let (l0, l1, l2, l3) = t.leaves;
    if let Some(m) = l0.get(buffer) {
        m.get(i)
    } else if let Some(m) = l1.get(buffer) {
        m.get(i)
    } else if let Some(m) = l2.get(buffer) {
        m.get(i)
    } else {
        l3.get(buffer)?.get(i)
    }
}

/// Entry `b` (0..=255) of the leaf whose first line is `n`.
#[inline(always)]
fn leaf_entry(t: &DirMaps, buffer: u32, n: u32, b: u32) -> Option<u32> {
    run_value(leaf_line(t, buffer, n)?, n, b, |i| leaf_line(t, buffer, i))
}

/// Entry `b` (0..=255) of the compressed leaf (or IPv6 run node) `head`, whose first line is
/// `n`, further lines read with `line`: the value of run `popcount(bitmap[0..=b]) - 1`, in the
/// first line (runs below `LEAF_INLINE`) or a further one. One popcount of one 64-bit word: the
/// ranks give the bits set below it.
#[inline(always)]
fn run_value(head: &DirLine, n: u32, b: u32, line: impl Fn(u32) -> Option<&'static DirLine>) -> Option<u32> {
    let k = ((b >> 6) & 3) as usize;
    let bits = head.words[2 * k] as u64 | (head.words[2 * k + 1] as u64) << 32;
    let below = (head.words[dir::RANKS_WORD] >> (8 * k as u32)) & 0xff;
    let rank = below + (bits & (u64::MAX >> (63 - (b & 63)))).count_ones();
    // Bit 0 is always set, so rank >= 1.
    let rank = rank.wrapping_sub(1);
    if rank < dir::LEAF_INLINE {
        return Some(head.words[(dir::RANKS_WORD as u32 + 1 + rank) as usize & 15]);
    }
    let r = (rank - dir::LEAF_INLINE) & 0xff;
    let line = line(n + 1 + r / dir::LINE_VALUES)?;
    Some(line.words[(r % dir::LINE_VALUES) as usize])
}

/// The entry of IPv6 address `a` (network order, in the packet) in the IPv6 table (the
/// source's, or the destination's) of `buffer`: the top level, then the walk through the one
/// line map (of whichever size) the buffer has, found once, before the walk.
///
/// The walk is a `bpf_loop` of at most `dir6::MAX_STEPS` calls of [`v6_step`], which the
/// verifier turns into a plain loop calling it (no helper call remains) and verifies once, as
/// a loop body run any number of times: written as a bounded loop, its 14 steps were verified
/// one by one for every state the classifier reaches them with, which tripled the verifier's
/// work for the whole program (574k instructions instead of 158k) and the time of every attach.
#[inline(always)]
fn v6_lookup<const SRC: bool>(buffer: u32, a: &[u8; 16]) -> Option<u32> {
    let hi = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let top = (hi >> 48) as u32;
    let table_top = if SRC { &SRC_V6_TOP } else { &DST_V6_TOP };
    let e = table_top.get(buffer * dir6::TOP_BLOCKS + ((top >> 8) & 0xff))?.entries[(top & 0xff) as usize];
    if e & dir6::NODE == 0 {
        return Some(e);
    }
    let class = if SRC {
        v6_class(&SRC_V6_LINES_4K, &SRC_V6_LINES_64K, &SRC_V6_LINES_512K, &SRC_V6_LINES_2M, &SRC_V6_LINES_4M, buffer)
    } else {
        v6_class(&DST_V6_LINES_4K, &DST_V6_LINES_64K, &DST_V6_LINES_512K, &DST_V6_LINES_2M, &DST_V6_LINES_4M, buffer)
    };
    let mut walk = V6Walk { e, buffer, hi, lo };
    match class {
        0 => v6_walk::<SRC, 0>(&mut walk),
        1 => v6_walk::<SRC, 1>(&mut walk),
        2 => v6_walk::<SRC, 2>(&mut walk),
        3 => v6_walk::<SRC, 3>(&mut walk),
        4 => v6_walk::<SRC, 4>(&mut walk),
        _ => v6_walk::<SRC, 5>(&mut walk),
    }
    if walk.e & dir6::NODE != 0 { None } else { Some(walk.e) }
}

/// The walk through line map `CLASS`: a `bpf_loop` of at most `dir6::MAX_STEPS` calls of its
/// own step. A function of its own per map, and a step per map: the verifier inlines a
/// `bpf_loop` only where its callback is always the same, and a map lookup only where its map
/// is, and the compiler merges calls that differ only in such an argument (into one
/// `bpf_loop`, or one lookup of six maps: both then real helper calls), but never calls of
/// different functions.
#[inline(never)]
fn v6_walk<const SRC: bool, const CLASS: u32>(walk: &mut V6Walk) {
    let step = v6_step::<SRC, CLASS> as *mut core::ffi::c_void;
    // SAFETY: the callback and its context (the caller's walk) live through the call.
    unsafe { aya_ebpf::helpers::generated::bpf_loop(dir6::MAX_STEPS, step, walk as *mut V6Walk as *mut core::ffi::c_void, 0) };
}

/// The size class of the line map `buffer` has (the last when none of the smaller ones).
#[inline(always)]
fn v6_class(l0: &Leaves<V0>, l1: &Leaves<V1>, l2: &Leaves<V2>, l3: &Leaves<V3>, l4: &Leaves<V4>, buffer: u32) -> u32 {
    if l0.get(buffer).is_some() {
        0
    } else if l1.get(buffer).is_some() {
        1
    } else if l2.get(buffer).is_some() {
        2
    } else if l3.get(buffer).is_some() {
        3
    } else if l4.get(buffer).is_some() {
        4
    } else {
        5
    }
}

/// An IPv6 walk between two steps: the entry reached, and what each step needs.
#[repr(C)]
struct V6Walk {
    e: u32,
    buffer: u32,
    hi: u64,
    lo: u64,
}

/// Line `i` of the buffer's IPv6 line map of size class `class` (of the source's table, or
/// the destination's; both constants in each step). The maps are named here, not passed in:
/// the step is a separate subprogram and must name its map directly.
#[inline(always)]
fn v6_line<const SRC: bool>(class: u32, buffer: u32, i: u32) -> Option<&'static DirLine> {
    match (SRC, class) {
        (true, 0) => SRC_V6_LINES_4K.get(buffer)?.get(i),
        (true, 1) => SRC_V6_LINES_64K.get(buffer)?.get(i),
        (true, 2) => SRC_V6_LINES_512K.get(buffer)?.get(i),
        (true, 3) => SRC_V6_LINES_2M.get(buffer)?.get(i),
        (true, 4) => SRC_V6_LINES_4M.get(buffer)?.get(i),
        (true, _) => SRC_V6_LINES_16M.get(buffer)?.get(i),
        (false, 0) => DST_V6_LINES_4K.get(buffer)?.get(i),
        (false, 1) => DST_V6_LINES_64K.get(buffer)?.get(i),
        (false, 2) => DST_V6_LINES_512K.get(buffer)?.get(i),
        (false, 3) => DST_V6_LINES_2M.get(buffer)?.get(i),
        (false, 4) => DST_V6_LINES_4M.get(buffer)?.get(i),
        (false, _) => DST_V6_LINES_16M.get(buffer)?.get(i),
    }
}

/// One step of an IPv6 walk (see [`xdpfw_common::dir6`]): the node that entry `e` names, a
/// run node (one byte of the address, `hi` then `lo`) or a path node (a masked compare of the
/// whole address). Returns 1 (stop) once `e` is a value, or a line is missing (`e` keeps its
/// node flag: no answer), else 0.
#[inline(never)]
extern "C" fn v6_step<const SRC: bool, const CLASS: u32>(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `v6_lookup`'s context, on its stack frame, for the duration of the loop.
    let walk = unsafe { &mut *(ctx as *mut V6Walk) };
    let e = walk.e;
    if e & dir6::NODE == 0 {
        return 1;
    }
    let (buffer, hi, lo) = (walk.buffer, walk.hi, walk.lo);
    let n = e & dir6::LINE_MASK;
    if e & dir6::PATH == 0 {
        let d = (e >> dir6::DEPTH_SHIFT) & 15;
        let byte = if d < 8 { hi >> ((56 - 8 * d) & 63) } else { lo >> ((120 - 8 * d) & 63) } as u32 & 0xff;
        let next = if e & dir6::DIRECT != 0 {
            // A direct node: the byte's entry, in the one line that holds it.
            v6_line::<SRC>(CLASS, buffer, n + (byte >> 4)).map(|l| l.words[(byte & 15) as usize])
        } else {
            v6_line::<SRC>(CLASS, buffer, n).and_then(|head| run_value(head, n, byte, |i| v6_line::<SRC>(CLASS, buffer, i)))
        };
        match next {
            Some(next) => walk.e = next,
            None => return 1,
        }
    } else {
        let Some(head) = v6_line::<SRC>(CLASS, buffer, n) else { return 1 };
        let w = &head.words;
        let pattern_hi = (w[dir6::PATH_PATTERN] as u64) << 32 | w[dir6::PATH_PATTERN + 1] as u64;
        let pattern_lo = (w[dir6::PATH_PATTERN + 2] as u64) << 32 | w[dir6::PATH_PATTERN + 3] as u64;
        let mask_hi = (w[dir6::PATH_MASK] as u64) << 32 | w[dir6::PATH_MASK + 1] as u64;
        let mask_lo = (w[dir6::PATH_MASK + 2] as u64) << 32 | w[dir6::PATH_MASK + 3] as u64;
        walk.e = if ((hi ^ pattern_hi) & mask_hi) | ((lo ^ pattern_lo) & mask_lo) != 0 { w[dir6::PATH_MISS] } else { w[dir6::PATH_CHILD] };
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
