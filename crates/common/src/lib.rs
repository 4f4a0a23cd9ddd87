//! Types and constants shared by the XDP program (`xdp-ebpf`) and userspace (`loader`).
//!
//! Everything that crosses the kernel/userspace boundary is defined here once. All structs are
//! `#[repr(C)]` with explicit padding, and their sizes are checked at compile time, so the two
//! sides cannot drift apart. Multi-byte fields are host byte order unless a field says otherwise.
#![no_std]

/// Map names, used by the program's map definitions and by the loader to find them.
pub mod map_names {
    pub const ACTIVE: &str = "ACTIVE";
    pub const HEADERS: &str = "HEADERS";
    pub const RULES: &str = "RULES";
    pub const FIELDS: &str = "FIELDS";
    pub const BITMAPS: &str = "BITMAPS";
    /// IPv6 tables (see `dir6`): the top level (fixed arrays, both buffers).
    pub const SRC_V6_TOP: &str = "SRC_V6_TOP";
    pub const DST_V6_TOP: &str = "DST_V6_TOP";
    /// IPv6 tables: the node lines, in an inner map of one of the sizes `dir6::LINE_SIZES` (one
    /// array-of-maps per size, one slot per buffer).
    pub const SRC_V6_LINES: [&str; 6] =
        ["SRC_V6_LINES_4K", "SRC_V6_LINES_64K", "SRC_V6_LINES_512K", "SRC_V6_LINES_2M", "SRC_V6_LINES_4M", "SRC_V6_LINES_16M"];
    pub const DST_V6_LINES: [&str; 6] =
        ["DST_V6_LINES_4K", "DST_V6_LINES_64K", "DST_V6_LINES_512K", "DST_V6_LINES_2M", "DST_V6_LINES_4M", "DST_V6_LINES_16M"];
    /// Direct IPv4 tables: top level and first chunks (fixed arrays, both buffers).
    pub const SRC_V4_FIXED: &str = "SRC_V4_FIXED";
    pub const DST_V4_FIXED: &str = "DST_V4_FIXED";
    /// Direct IPv4 tables: the chunks beyond the fixed ones, in an inner map of one of the sizes
    /// `dir::MORE_SIZES` (one array-of-maps per size, one slot per buffer).
    pub const SRC_V4_MORE: [&str; 3] = ["SRC_V4_MORE_4K", "SRC_V4_MORE_16K", "SRC_V4_MORE_64K"];
    pub const DST_V4_MORE: [&str; 3] = ["DST_V4_MORE_4K", "DST_V4_MORE_16K", "DST_V4_MORE_64K"];
    /// Direct IPv4 tables: the compressed leaves (the /24s that hold longer prefixes), in an inner
    /// map of one of the sizes `dir::LEAF_SIZES` (one array-of-maps per size, one slot per buffer).
    pub const SRC_V4_LEAVES: [&str; 4] = ["SRC_V4_LEAVES_4K", "SRC_V4_LEAVES_64K", "SRC_V4_LEAVES_512K", "SRC_V4_LEAVES_2M"];
    pub const DST_V4_LEAVES: [&str; 4] = ["DST_V4_LEAVES_4K", "DST_V4_LEAVES_64K", "DST_V4_LEAVES_512K", "DST_V4_LEAVES_2M"];
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const PENDING: &str = "PENDING";
    pub const ESCALATIONS: &str = "ESCALATIONS";
    /// Rate limits of rules (`limit`): each rule's parameters and token bucket, both buffers.
    pub const LIMITS: &str = "LIMITS";
    /// Per-source token buckets of rules with `limit.per` (LRU).
    pub const LIMIT_SOURCES: &str = "LIMIT_SOURCES";
    /// The flows this host opened (`state` on a rule): written by the egress program, read by
    /// the XDP program. One table for every generation: it survives reloads.
    pub const FLOWS: &str = "FLOWS";
    /// `loader trace`: the filter, sampling and rate limit of the tracer (one entry; its lease is
    /// slot `trace::LEASE_SLOT` of ACTIVE).
    pub const TRACE: &str = "TRACE";
    /// Decisions of real packets for `loader trace` ([`super::DecisionEvent`]).
    pub const TRACE_RING: &str = "TRACE_RING";
    /// Rules with `log`: their rate limits and buckets, both buffers.
    pub const LOG_LIMITS: &str = "LOG_LIMITS";
    /// Packets matched by rules with `log`, for the daemon's log ([`super::DecisionEvent`]).
    pub const LOG_RING: &str = "LOG_RING";
    /// Every map the program owns, in a stable order (pinning, stats, leak checks).
    pub const ALL: [&str; 47] = [
        ACTIVE,
        HEADERS,
        RULES,
        FIELDS,
        BITMAPS,
        SRC_V6_TOP,
        DST_V6_TOP,
        SRC_V6_LINES[0],
        SRC_V6_LINES[1],
        SRC_V6_LINES[2],
        SRC_V6_LINES[3],
        SRC_V6_LINES[4],
        SRC_V6_LINES[5],
        DST_V6_LINES[0],
        DST_V6_LINES[1],
        DST_V6_LINES[2],
        DST_V6_LINES[3],
        DST_V6_LINES[4],
        DST_V6_LINES[5],
        SRC_V4_FIXED,
        DST_V4_FIXED,
        SRC_V4_MORE[0],
        SRC_V4_MORE[1],
        SRC_V4_MORE[2],
        DST_V4_MORE[0],
        DST_V4_MORE[1],
        DST_V4_MORE[2],
        SRC_V4_LEAVES[0],
        SRC_V4_LEAVES[1],
        SRC_V4_LEAVES[2],
        SRC_V4_LEAVES[3],
        DST_V4_LEAVES[0],
        DST_V4_LEAVES[1],
        DST_V4_LEAVES[2],
        DST_V4_LEAVES[3],
        GLOBAL_STATS,
        RULE_STATS,
        VERDICTS,
        PENDING,
        ESCALATIONS,
        LIMITS,
        LIMIT_SOURCES,
        FLOWS,
        TRACE,
        TRACE_RING,
        LOG_LIMITS,
        LOG_RING,
    ];
}

/// Name of the attached XDP program (and of private copies).
pub const PROGRAM_NAME: &str = "xdpfw";
/// Name of the egress (TC) program in the object file: it records the flows this host opens
/// (see [`flow`]).
pub const EGRESS_PROGRAM_NAME: &str = "xdpfw_egress";
/// Name of the probe copy, and of the program in the object file (the loader cuts it to
/// `PROGRAM_NAME` for the attached program): `bpftool prog show` tells the two apart.
pub const PROBE_PROGRAM_NAME: &str = "xdpfw_probe";

/// Two complete rulesets exist at once: the active one, read by packets, and the inactive one,
/// written by a reload. `buffer = generation % BUFFERS`.
pub const BUFFERS: u32 = 2;

/// The buffer a generation selects: every lookup of a packet, and every write of a reload,
/// goes to `buffer_of(generation)`.
#[inline(always)]
pub const fn buffer_of(generation: u64) -> u32 {
    (generation % BUFFERS as u64) as u32
}

/// Protocol numbers both sides need: the program parses with them, the rules language names
/// them, the test frames are built from them.
pub mod proto {
    /// Ethertypes (host byte order).
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86DD;
    pub const ETH_P_8021Q: u16 = 0x8100;
    pub const ETH_P_8021AD: u16 = 0x88A8;

    /// IP protocol numbers (IPv4 protocol / IPv6 next header).
    pub const IPPROTO_HOPOPTS: u8 = 0;
    pub const IPPROTO_ICMP: u8 = 1;
    pub const IPPROTO_TCP: u8 = 6;
    pub const IPPROTO_UDP: u8 = 17;
    pub const IPPROTO_ROUTING: u8 = 43;
    pub const IPPROTO_FRAGMENT: u8 = 44;
    pub const IPPROTO_AH: u8 = 51;
    pub const IPPROTO_ICMPV6: u8 = 58;
    pub const IPPROTO_DSTOPTS: u8 = 60;

    /// ICMPv6 types of neighbour discovery (RFC 4861): router solicitation (133), router
    /// advertisement, neighbour solicitation, neighbour advertisement and redirect (137).
    pub const ND_FIRST: u8 = 133;
    pub const ND_LAST: u8 = 137;
}

/// Highest number of ordered rules in one ruleset. One bit per rule in every bitmap.
pub const MAX_RULES: usize = 1024;
pub const BITMAP_WORDS: usize = MAX_RULES / 64;
/// Distinct rule bitmaps per buffer (deduplicated, so a 1M-prefix set usually needs a handful).
pub const MAX_BITMAPS: u32 = 32768;
/// Bitmap ids every buffer reserves: the empty set and the set of all rules.
pub const BITMAP_EMPTY: u32 = 0;
pub const BITMAP_ALL: u32 = 1;
/// Prefixes per address table (IPv4 or IPv6, source or destination, per buffer) after merging:
/// it bounds their lines (see [`dir`] and [`dir6`]).
pub const MAX_PREFIXES: u32 = 2 * 1024 * 1024;

/// Index of the per-rule counter slot that counts packets decided by the default action.
pub const DEFAULT_RULE_SLOT: u32 = MAX_RULES as u32;
/// Per-rule counter slots per buffer: one per rule plus the default action.
pub const RULE_SLOTS: u32 = MAX_RULES as u32 + 1;

/// Verdicts, numerically equal to the XDP actions they become.
pub mod action {
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
}

/// Bits of [`RuleMeta::flags`].
pub mod rule_flags {
    /// The rule has conditions on the owner of the local socket (process, user, …), which only
    /// userspace can evaluate: the kernel escalates flows whose first matching rule has this.
    pub const NEEDS_OWNER: u32 = 1 << 0;
    /// The rule has a rate limit (`LIMITS`): beyond it the rule does not match.
    pub const LIMITED: u32 = 1 << 1;
    /// The rule has `log`: packets it decides are reported through LOG_RING, within the rule's
    /// log rate (`LOG_LIMITS`).
    pub const LOG: u32 = 1 << 2;
    /// The rule has a `state` condition: the packet's state is looked up (`FLOWS`) when this
    /// rule is the first match, and the rules are matched again with it.
    pub const STATEFUL: u32 = 1 << 4;
}

/// Connection state (`state = "established"` on a rule). An egress program on the interface
/// records each flow this host sends (TCP, UDP, ICMP/ICMPv6 echo requests) in `FLOWS` under the
/// key its *replies* carry (a [`FlowKey`] with source and destination swapped; for ICMP echo,
/// ports 0 and the echo identifier), so the XDP program finds a reply with one lookup of its
/// own 5-tuple. ICMP errors quoting such a flow are *related* (the quoted header, reversed, is
/// the key). Entries expire (timestamps of `bpf_ktime_get_ns`, refreshed by every packet this
/// host sends); a TCP entry turns to closing on a FIN and goes on an RST. The table is an LRU:
/// a flood of new flows evicts the least recently used.
pub mod flow {
    /// Flows in the table (LRU).
    pub const ENTRIES: u32 = 65536;
    /// States of a packet, which index the `STATE_BASE` entries of FIELDS.
    pub const NEW: u32 = 0;
    pub const ESTABLISHED: u32 = 1;
    pub const RELATED: u32 = 2;
    /// Entries of FIELDS per buffer for the states (3 used).
    pub const STATES: u32 = 4;
    /// Lifetimes after the last packet this host sent on a flow, as nf_conntrack's defaults.
    pub const TCP_OPEN_NS: u64 = 5 * 24 * 3600 * 1_000_000_000;
    /// After a FIN (either way): long enough for the rest of the close and its retransmissions.
    pub const TCP_CLOSING_NS: u64 = 120 * 1_000_000_000;
    pub const UDP_NS: u64 = 120 * 1_000_000_000;
    pub const ICMP_NS: u64 = 30 * 1_000_000_000;
    /// Bits of [`FlowEntry::flags`](crate::FlowEntry): a FIN was seen, the entry keeps its
    /// (short) expiry whatever else this host sends but a new SYN.
    pub const CLOSING: u32 = 1 << 0;
}

/// `loader trace`: decisions of real packets, sampled, filtered and rate-limited in the kernel.
///
/// Off costs one load: slot `LEASE_SLOT` of ACTIVE, beside the generation every packet reads
/// already (same map value array, same cache line). It holds 0 (off) or the CLOCK_MONOTONIC
/// time until which the tracer's lease runs: the tracer renews it every second, so a tracer
/// that dies, even by SIGKILL, stops the tracing within `LEASE_NS` with nobody's help.
pub mod trace {
    /// Slot of ACTIVE that holds the lease.
    pub const LEASE_SLOT: u32 = 1;
    /// Entries of ACTIVE: the generation, then the lease.
    pub const ACTIVE_ENTRIES: u32 = 2;
    /// How long a lease lasts without renewal.
    pub const LEASE_NS: u64 = 3_000_000_000;
    /// TRACE_RING's size: at 72 bytes a record, about 3,600 events between two reads.
    pub const RING_BYTES: u32 = 256 * 1024;
    /// LOG_RING's size.
    pub const LOG_RING_BYTES: u32 = 256 * 1024;

    /// Bits of [`super::TraceConfig::filter`]: which conditions a packet must meet.
    pub mod filter {
        pub const PROTO: u32 = 1 << 0;
        /// Source or destination port.
        pub const PORT: u32 = 1 << 1;
        /// The deciding rule (slot and generation).
        pub const RULE: u32 = 1 << 2;
        pub const VERDICT: u32 = 1 << 3;
        /// Source or destination address within an IPv4 prefix.
        pub const ADDR_V4: u32 = 1 << 4;
        /// Source or destination address within an IPv6 prefix.
        pub const ADDR_V6: u32 = 1 << 5;
    }

    /// [`super::DecisionEvent::kind`].
    pub mod kind {
        /// A decision sampled by `loader trace`.
        pub const TRACE: u8 = 1;
        /// A packet of a rule with `log` (in LOG_RING; in TRACE_RING when traced too).
        pub const LOG: u8 = 2;
    }
}

/// Rate limits (`limit = { rate, burst, per }` on a rule): a token bucket, kept as the
/// theoretical arrival time of GCRA (one u64 a bucket, updated with compare-and-swap), per rule
/// or per source address (prefix) of a rule.
pub mod limit {
    /// Per-source buckets, all rules together (LRU: a flood of new sources evicts the least
    /// recently seen).
    pub const SOURCE_ENTRIES: u32 = 65536;
    /// Rules over their limit skipped for one packet: the next match after a skipped rule
    /// decides without its own limit being consulted.
    pub const MAX_SKIPPED: u32 = 1;
    /// `LimitState::ns_per_byte` is fixed point with this many fraction bits.
    pub const BYTE_SHIFT: u32 = 16;
}

/// Escalation: flows whose first matching rule needs the socket owner are decided in userspace.
pub mod escalation {
    /// Flows with a userspace verdict (LRU: a flood of new flows evicts the least recent).
    pub const VERDICT_ENTRIES: u32 = 65536;
    /// Flows waiting for a verdict.
    pub const PENDING_ENTRIES: u32 = 65536;
    /// The event ring buffer; at 72 bytes a record, room for about 3,600 waiting events.
    pub const RING_BYTES: u32 = 256 * 1024;
}

/// What happens to a non-first IP fragment, which carries no transport header.
pub mod fragment_policy {
    /// Classify on L3 fields only: rules that name ports, TCP flags or ICMP types cannot match.
    pub const L3_ONLY: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
}

/// Bits of [`RulesetHeader::flags`]: policies of the ruleset that are not field lookups.
pub mod header_flags {
    /// ICMPv6 neighbour discovery and router messages (types 133-137) are classified by the
    /// rules like any packet (`[options] icmpv6_nd = "rules"`); without it they always pass.
    pub const ND_RULES: u32 = 1 << 0;
    /// Some rule has a rate limit: only then are rules' `LIMITED` flags looked at.
    pub const LIMITS: u32 = 1 << 1;
    /// Some rule has a `state` condition: only then are rules' `STATEFUL` flags looked at, and
    /// only then does the egress program record flows.
    pub const STATE: u32 = 1 << 4;
    /// Some rule has `log`. Not read by the kernel (each rule's `rule_flags::LOG` is): it says
    /// which build of the program the ruleset needs (see [`super::variant`]).
    pub const LOGS: u32 = 1 << 5;
}

/// Which copy of the XDP program serves a ruleset. The program is one object loaded with its
/// global `VARIANT` set: `FULL` keeps every path; `PLAIN` has the paths of rate limits,
/// connection state, VLAN conditions, `log` and neighbour discovery under the rules pruned by
/// the verifier (the global is a constant it knows), so a ruleset that uses none of them pays
/// nothing for them. The loader attaches `PLAIN` only while the live ruleset needs none of them
/// ([`RulesetHeader::needs_full_program`]), and switches to `FULL` a grace period *before* the
/// flip to a ruleset that does: no packet runs a copy without a path its generation needs.
pub mod variant {
    /// The global of the XDP program the loader sets (a `u32`).
    pub const GLOBAL: &str = "VARIANT";
    pub const FULL: u32 = 1;
    pub const PLAIN: u32 = 0;
}

/// The per-packet fields a ruleset can constrain. A field whose bit is clear in
/// [`RulesetHeader::fields`] is not looked up at all.
pub mod field {
    pub const SRC: u32 = 1 << 0;
    pub const DST: u32 = 1 << 1;
    pub const PROTO: u32 = 1 << 2;
    pub const SPORT: u32 = 1 << 3;
    pub const DPORT: u32 = 1 << 4;
    pub const ICMP: u32 = 1 << 5;
    pub const TCP_FLAGS: u32 = 1 << 6;
    /// The packet's connection state (`flow::*`), looked up only when the first match needs it.
    pub const STATE: u32 = 1 << 8;    /// The id of the packet's outermost VLAN tag (`vlan = N`).
    pub const VLAN: u32 = 1 << 9;
}

/// The direct IPv4 table (DIR-16-8-8 with compressed leaves), which IPv4 prefixes use instead
/// of an LPM trie: one entry per /16, then 256-entry chunks for the /16s that hold longer
/// prefixes (indexed by the third octet), then, for the /24s that hold prefixes longer than /24,
/// a compressed *leaf* indexed by the fourth octet. Each entry of the top level and of a chunk is
/// a bitmap id, or `CHUNK | n`: in the top level, chunk `n`; in a chunk, the leaf whose first
/// line is `n`. A lookup is one to three map reads, whatever the number of prefixes.
///
/// Leaves are Poptrie-style (Asai & Ohara, SIGCOMM 2015): a 256-bit bitmap with bit `b` set
/// where the entry of byte `b` differs from that of byte `b - 1` (bit 0 always set), and the
/// dense array of those runs' values; the entry of byte `b` is the value of run
/// `popcount(bits[0..=b]) - 1`. A leaf is stored in 64-byte [`DirLine`]s: the first holds the
/// bitmap, the ranks (bits set before each 64-bit word, one byte each) and the first
/// `LEAF_INLINE` values; each further line 16 values. So a /24 with up to three host routes
/// costs one 64-byte line (one cache line, one map read) instead of a 1 KiB chunk, and a leaf
/// with `p` prefixes never takes more than `p` lines: a table of `P` prefixes needs at most `P`
/// lines.
///
/// Every level is read by map lookups the verifier inlines: a helper call, which a map of
/// variable size (`BPF_F_INNER_MAP`) would cost, takes longer than the rest of a lookup. The
/// top level (`TOP_BLOCKS` blocks) and the first `FIXED_CHUNKS` chunks live in a fixed array
/// (`SRC_V4_FIXED`/`DST_V4_FIXED`, `BUFFER_BLOCKS` blocks per buffer: top level first, then chunk
/// `n` at block `TOP_BLOCKS + n`). The chunks beyond those go to a new inner map at each reload,
/// of the smallest size in `MORE_SIZES` that holds them, in the slot of the buffer in that size's
/// array-of-maps (`SRC_V4_MORE`/`DST_V4_MORE`; chunk `n` at `n - FIXED_CHUNKS`); the leaf lines
/// likewise in one of `LEAF_SIZES` (`SRC_V4_LEAVES`/`DST_V4_LEAVES`). The other sizes' slots of
/// the buffer are empty.
///
/// Memory per table and buffer is bounded: the fixed part (2.25 MiB), at most `MAX_CHUNKS`
/// chunks (64 MiB: there is one /16 per chunk) and at most `MAX_LINES` lines (128 MiB), about
/// 194 MiB for any set of up to `MAX_LINES` (2M) prefixes; a size class is at most 4× (chunks)
/// or 8× (leaves) what it holds.
pub mod dir {
    /// Entries indexed by the top 16 bits of the address.
    pub const TOP_ENTRIES: u32 = 1 << 16;
    pub const CHUNK_ENTRIES: u32 = 256;
    /// Blocks of the top level in each buffer.
    pub const TOP_BLOCKS: u32 = TOP_ENTRIES / CHUNK_ENTRIES;
    /// Chunks stored in the fixed array (1 KiB each, per buffer and table).
    pub const FIXED_CHUNKS: u32 = 2048;
    /// Blocks per buffer in the fixed array: the top level, then the fixed chunks.
    pub const BUFFER_BLOCKS: u32 = TOP_BLOCKS + FIXED_CHUNKS;
    pub const CHUNK: u32 = 1 << 31;
    /// Chunks per table: one per /16 at most.
    pub const MAX_CHUNKS: u32 = TOP_ENTRIES;
    /// Sizes (in chunks) of the inner maps that hold the chunks beyond the fixed ones: a table
    /// takes at most four times the memory its chunks need.
    pub const MORE_SIZES: [u32; 3] = [1 << 12, 1 << 14, 1 << 16];
    /// Values in the first line of a leaf (after the bitmap and the ranks).
    pub const LEAF_INLINE: u32 = 7;
    /// Values in each further line of a leaf.
    pub const LINE_VALUES: u32 = 16;
    /// Word of a leaf's first line that holds the ranks; its values follow.
    pub const RANKS_WORD: usize = 8;
    /// Leaf lines per table (enough for any set of as many IPv4 prefixes after merging).
    pub const MAX_LINES: u32 = 1 << 21;
    /// Sizes (in 64-byte lines) of the inner maps that hold the leaves: 256 KiB, 4, 32, 128 MiB.
    pub const LEAF_SIZES: [u32; 4] = [1 << 12, 1 << 16, 1 << 19, 1 << 21];

    /// The index of the smallest of `sizes` that holds `n` items, if any does.
    pub const fn size_class(n: u32, sizes: &[u32]) -> Option<usize> {
        let mut i = 0;
        while i < sizes.len() {
            if n <= sizes[i] {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// Bytes one table takes per buffer with `chunks` chunks and `lines` leaf lines: the fixed
    /// part, and the inner maps of the size classes that hold the rest.
    pub const fn table_bytes(chunks: u32, lines: u32) -> u64 {
        let block = 4 * CHUNK_ENTRIES as u64;
        let mut bytes = BUFFER_BLOCKS as u64 * block;
        if chunks > FIXED_CHUNKS
            && let Some(c) = size_class(chunks - FIXED_CHUNKS, &MORE_SIZES)
        {
            bytes += MORE_SIZES[c] as u64 * block;
        }
        if lines > 0
            && let Some(c) = size_class(lines, &LEAF_SIZES)
        {
            bytes += LEAF_SIZES[c] as u64 * 64;
        }
        bytes
    }
}

/// The IPv6 tables: a multibit trie of 8-bit strides under a direct top level, with Poptrie's
/// compression (Asai & Ohara, SIGCOMM 2015: a node's 256 entries stored as runs, indexed by a
/// population count) and path compression for the long single-child chains that sparse IPv6
/// prefixes make. Every lookup is array reads the verifier inlines: no helper call.
///
/// - The top level: 65536 u32 entries indexed by the address's first 16 bits, in
///   `TOP_BLOCKS` blocks per buffer of a fixed array (as IPv4's top level).
/// - An entry is a bitmap id, or `NODE | kind | depth << DEPTH_SHIFT | line`: a node in the
///   table's line map (64-byte [`DirLine`]s, in an inner map of one of `LINE_SIZES`), and for a
///   run node the byte of the address it splits. The walk takes everything it needs from the
///   entry, so the verifier sees one state per step whatever path led there.
/// - A *run node* splits one byte of the address: it is exactly a compressed leaf of the IPv4
///   tables (see [`dir`]) whose values may name further nodes.
/// - A *path node* (`PATH`) stands for a chain of nodes with one way down: if the address's bits
///   under its mask equal its pattern, the walk goes on with its child; otherwise the answer is
///   its miss value. A lone prefix under a node is one path node whose child is its bitmap id,
///   so a host route costs one line.
///
/// Memory per table and buffer: the top level (256 KiB) plus the smallest of `LINE_SIZES` that
/// holds the lines, at most `MAX_LINES` (1 GiB). Sets of mostly host routes take one to two
/// lines per prefix; the compiler's unit tests bound the worst shapes (see `v6_table`).
pub mod dir6 {
    /// Blocks of 256 entries of the top level, per buffer.
    pub const TOP_BLOCKS: u32 = 256;
    /// Flag of an entry that names a node.
    pub const NODE: u32 = 1 << 31;
    /// Flag of an entry that names a path node (with `NODE`).
    pub const PATH: u32 = 1 << 28;
    /// Flag of an entry that names a direct node (with `NODE`): the 256 entries of its byte in
    /// 16 lines, one line read where a run node with that many runs would read two (its head,
    /// then the line of the run's value).
    pub const DIRECT: u32 = 1 << 29;
    /// Runs from which a node is stored direct: at 64, a direct node takes at most 3.2 times the
    /// lines of the run node it replaces, and fewer than one line per 4 runs.
    pub const DIRECT_RUNS: usize = 64;
    /// Where a run node's entry holds the byte it splits (2 to 15).
    pub const DEPTH_SHIFT: u32 = 24;
    /// The bits of an entry that hold the node's (first) line.
    pub const LINE_MASK: u32 = (1 << DEPTH_SHIFT) - 1;
    /// Words of a path node: the pattern (the address's bits 0-31, 32-63, 64-95, 96-127), the
    /// mask (as the pattern), the miss value, the child entry.
    pub const PATH_PATTERN: usize = 0;
    pub const PATH_MASK: usize = 4;
    pub const PATH_MISS: usize = 8;
    pub const PATH_CHILD: usize = 9;
    /// Nodes a walk may pass after the top level (bytes 2 to 15, one node each at most).
    pub const MAX_STEPS: u32 = 14;
    /// Sizes (in 64-byte lines) of the inner maps that hold the lines: 256 KiB, 4, 32, 128,
    /// 256 MiB and 1 GiB.
    pub const LINE_SIZES: [u32; 6] = [1 << 12, 1 << 16, 1 << 19, 1 << 21, 1 << 22, 1 << 24];
    pub const MAX_LINES: u32 = 1 << 24;

    /// Bytes one table takes per buffer with `lines` lines.
    pub const fn table_bytes(lines: u32) -> u64 {
        let mut bytes = TOP_BLOCKS as u64 * 1024;
        if lines > 0
            && let Some(c) = super::dir::size_class(lines, &LINE_SIZES)
        {
            bytes += LINE_SIZES[c] as u64 * 64;
        }
        bytes
    }
}

/// 256 entries of a direct IPv4 table (see [`dir`]): a slice of the top level, or one chunk.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirBlock {
    pub entries: [u32; dir::CHUNK_ENTRIES as usize],
}

/// 64 bytes of a compressed leaf of a direct IPv4 table (see [`dir`]). The first line of a leaf:
/// `words[0..8]` the bitmap (bit `b` in word `b / 32`, bit `b % 32`), `words[8]` the ranks (byte
/// `k`: the bits set below bit `64 k`), `words[9..16]` the values of runs 0 to 6. A further line:
/// 16 values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirLine {
    pub words: [u32; 16],
}

/// Slots of [`RulesetHeader::absent`]: the bitmap used when the packet does not carry a field.
pub mod absent {
    pub const SRC: usize = 0;
    pub const DST: usize = 1;
    pub const SPORT: usize = 2;
    pub const DPORT: usize = 3;
    pub const ICMP: usize = 4;
    pub const TCP_FLAGS: usize = 5;
    pub const COUNT: usize = 6;
}

/// Layout of the FIELDS array: each buffer holds these tables back to back, each entry naming a
/// bitmap. Indexes are `buffer * FIELDS_PER_BUFFER + BASE + value`.
pub mod fields_layout {
    pub const PROTO_BASE: u32 = 0;
    pub const SPORT_BASE: u32 = PROTO_BASE + 256;
    pub const DPORT_BASE: u32 = SPORT_BASE + 65536;
    /// Indexed by `type << 8 | code`.
    pub const ICMP_BASE: u32 = DPORT_BASE + 65536;
    /// Indexed by the TCP flags byte (FIN=0x01 … CWR=0x80).
    pub const TCP_FLAGS_BASE: u32 = ICMP_BASE + 65536;
    /// Indexed by the packet's state (`flow::NEW`, `ESTABLISHED`, `RELATED`).
    pub const STATE_BASE: u32 = TCP_FLAGS_BASE + 256;
    /// Indexed by the outermost VLAN tag's id (0-4095), or `VLAN_UNTAGGED` without a tag.
    pub const VLAN_BASE: u32 = STATE_BASE + crate::flow::STATES;
    pub const VLAN_UNTAGGED: u32 = 4096;
    pub const FIELDS_PER_BUFFER: u32 = VLAN_BASE + VLAN_UNTAGGED + 1;
}

/// One ruleset's header, one per buffer in the HEADERS array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RulesetHeader {
    /// The generation this buffer was written for (its `generation % 2` is this buffer).
    pub generation: u64,
    pub rule_count: u32,
    /// `action::*` for packets of a flow whose owner verdict is not known yet.
    pub pending_action: u32,
    /// `field::*` bits: which lookups this ruleset needs.
    pub fields: u32,
    /// `action::*` for packets no rule matches.
    pub default_action: u32,
    /// `fragment_policy::*`.
    pub fragment_policy: u32,
    /// A flow still pending after this many milliseconds is escalated again (its event may have
    /// been lost to an overflow, or userspace may have declined it).
    pub escalation_retry_ms: u32,
    /// Bitmap ids for packets that do not carry a field (see `absent::*`).
    pub absent: [u32; absent::COUNT],
    /// `header_flags::*`.
    pub flags: u32,
    pub _pad: u32,
}

impl RulesetHeader {
    /// Whether this ruleset needs the program's `variant::FULL` copy: it has rate limits,
    /// `state`, VLAN conditions, `log`, or neighbour discovery under the rules.
    pub fn needs_full_program(&self) -> bool {
        self.flags & (header_flags::ND_RULES | header_flags::LIMITS | header_flags::STATE | header_flags::LOGS) != 0
            || self.fields & field::VLAN != 0
    }
}

/// One rule's outcome, in the RULES array at `buffer * MAX_RULES + rule`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleMeta {
    /// `action::*`.
    pub action: u32,
    pub flags: u32,
}

/// A set of rules, one bit per rule, rule 0 = bit 0 of word 0 (the highest priority).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bitmap {
    pub words: [u64; BITMAP_WORDS],
    /// Bit `w` is set when `words[w]` is not zero. The kernel ANDs the summaries first and
    /// reads only the words that can hold a match (usually none, or one).
    pub summary: u64,
}

impl Bitmap {
    pub const EMPTY: Bitmap = Bitmap { words: [0; BITMAP_WORDS], summary: 0 };

    pub fn set(&mut self, rule: usize) {
        self.words[rule / 64] |= 1 << (rule % 64);
        self.summary |= 1 << (rule / 64);
    }
}

/// An entry of the FIELDS array. Padded to 8 bytes because mmapable arrays store every element
/// at an 8-byte stride, and userspace writes these through the mapping.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldEntry {
    pub bitmap: u32,
    pub _pad: u32,
}

/// Per-CPU global counters (one entry in GLOBAL_STATS). Every packet increments `seen` and
/// exactly one of `passed` / `dropped`; the rest explain why.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct GlobalStats {
    pub seen: u64,
    pub passed: u64,
    pub dropped: u64,
    pub bytes: u64,
    /// Not IPv4/IPv6 (ARP, LLDP, …): always passed.
    pub non_ip: u64,
    /// Truncated or inconsistent headers: dropped.
    pub malformed: u64,
    pub ipv4: u64,
    pub ipv6: u64,
    /// Non-first fragments (no transport header), handled by the fragment policy.
    pub fragments: u64,
    /// IPv6 neighbour discovery and router messages passed before the rules (all of them,
    /// unless the ruleset puts them under the rules: `header_flags::ND_RULES`).
    pub neighbor_discovery: u64,
    /// Packets decided by a rule (the rest got the default action).
    pub rule_hits: u64,
    pub default_hits: u64,
    /// Escalation events sent to userspace (one per new flow whose rule needs the socket owner).
    pub escalations: u64,
    /// Packets decided by a cached userspace verdict.
    pub cache_hits: u64,
    /// Packets given the pending action while their flow waited for a verdict.
    pub pending: u64,
    /// Escalations lost because the ring buffer was full (the flow retries later).
    pub ring_overflows: u64,
    /// Packets a rule with a `limit` did not take because they were beyond it (a later rule or
    /// the default decided them).
    pub limited: u64,
    /// Per-source buckets created (`LIMIT_SOURCES`); those beyond the map's size evicted others.
    pub limit_sources: u64,
    /// Packets whose state was looked up in `FLOWS` (their first match had a `state` condition).
    pub state_lookups: u64,
    /// Of those: replies of a flow this host opened, and ICMP errors about one.
    pub state_established: u64,
    pub state_related: u64,
    /// Flows the egress program recorded (new entries of `FLOWS`); beyond its size each one
    /// evicted the least recently used (see `flows_evicted` in stats).
    pub flows_new: u64,
    /// Flows removed on a TCP RST (either way).
    pub flows_closed: u64,
}

const GLOBAL_COUNTERS: usize = core::mem::size_of::<GlobalStats>() / 8;

impl GlobalStats {
    /// The counters as one array: the struct is `repr(C)` and made of u64s only.
    fn counters(&mut self) -> &mut [u64; GLOBAL_COUNTERS] {
        // SAFETY: same size and alignment, every bit pattern valid (checked below).
        unsafe { &mut *(self as *mut GlobalStats as *mut [u64; GLOBAL_COUNTERS]) }
    }

    /// Adds another CPU's counters.
    pub fn add(&mut self, o: &GlobalStats) {
        let mut o = *o;
        for (a, b) in self.counters().iter_mut().zip(o.counters().iter()) {
            *a += *b;
        }
    }

    /// What was counted since `before`.
    pub fn since(&self, before: &GlobalStats) -> GlobalStats {
        let mut out = *self;
        let mut before = *before;
        for (a, b) in out.counters().iter_mut().zip(before.counters().iter()) {
            *a = a.wrapping_sub(*b);
        }
        out
    }
}

/// One rule's rate limit and its bucket, LIMITS at `buffer * MAX_RULES + rule`: written whole by
/// a reload into the inactive buffer (so each ruleset starts with full buckets), then updated by
/// the program. A packet costs `interval_ns + (len * ns_per_byte) >> limit::BYTE_SHIFT`; it is
/// within the limit when the bucket's theoretical arrival time, advanced by that cost, is at
/// most `burst_ns` ahead of now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitState {
    pub interval_ns: u64,
    pub ns_per_byte: u64,
    pub burst_ns: u64,
    /// The rule's bucket (rules without `per`): theoretical arrival time, CLOCK_MONOTONIC ns.
    pub tat: u64,
    /// Packets beyond the limit (atomic adds, all CPUs).
    pub limited: u64,
    /// 1: one bucket per source prefix (`LIMIT_SOURCES`), of these lengths.
    pub per_source: u8,
    pub v4_prefix: u8,
    pub v6_prefix: u8,
    pub _pad: [u8; 5],
}

/// The key of a per-source bucket: the source address cut to the rule's prefix length (IPv4 in
/// the first 4 bytes, the rest zero), the rule, and the generation it counts for (a reload
/// starts every source afresh). Every byte is set, padding included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LimitKey {
    pub addr: [u8; 16],
    pub rule: u32,
    pub generation: u32,
    pub is_v6: u8,
    pub _pad: [u8; 3],
}

/// The tracer's settings and counters (TRACE, one entry, written by `loader trace` through the
/// mapping before it takes the lease). A decision is sent when it passes the filter, the
/// 1-in-`sample` draw and the token bucket (GCRA, as [`LimitState`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceConfig {
    /// `trace::filter::*` bits.
    pub filter: u32,
    /// Send one decision in `sample` (0 and 1: every one), drawn at random.
    pub sample: u32,
    /// The token bucket: one event costs `interval_ns`, at most `burst_ns` ahead of now.
    pub interval_ns: u64,
    pub burst_ns: u64,
    pub tat: u64,
    /// Decisions that passed the filter and the draw but not the bucket (atomic adds).
    pub limited: u64,
    /// Decisions lost because the ring was full (atomic adds).
    pub lost: u64,
    /// `filter::RULE`: the rule slot of this generation (`DEFAULT_RULE_SLOT`: the default).
    pub rule_generation: u64,
    pub rule: u32,
    /// `filter::VERDICT`: `action::*`.
    pub verdict: u32,
    /// `filter::ADDR_*`: the prefix, network byte order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    pub prefix_len: u32,
    /// `filter::PORT`.
    pub port: u16,
    /// `filter::PROTO`.
    pub proto: u8,
    pub _pad: u8,
}

/// The log rate of a rule with `log` (LOG_LIMITS at `buffer * MAX_RULES + rule`): a token
/// bucket like [`LimitState`]'s, written whole by a reload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLimit {
    pub interval_ns: u64,
    pub burst_ns: u64,
    pub tat: u64,
    /// Packets of the rule not logged because they were beyond the rate (atomic adds).
    pub suppressed: u64,
}

/// One decision of a real packet, in TRACE_RING (`loader trace`) or LOG_RING (`log` rules).
/// Every byte is set, padding included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionEvent {
    /// Addresses, network byte order (IPv4 in the first 4 bytes, the rest zero).
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The generation whose ruleset decided.
    pub generation: u64,
    /// CLOCK_MONOTONIC ns.
    pub time_ns: u64,
    /// The frame's length in bytes.
    pub len: u32,
    /// The deciding rule, or `DEFAULT_RULE_SLOT`.
    pub rule: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub is_v6: u8,
    /// `trace::kind::*`.
    pub kind: u8,
    /// `action::*`.
    pub verdict: u8,
    /// `type << 8 | code`, when `has & 2`.
    pub icmp: u16,
    pub tcp_flags: u8,
    /// 1: the packet has ports; 2: an ICMP type; 4: TCP flags.
    pub has: u8,
    pub _pad: [u8; 4],
}

/// Per-CPU per-rule counters, RULE_STATS at `buffer * RULE_SLOTS + rule`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}

/// A flow as the verdict cache knows it: the packet's addresses (IPv4 in the first 4 bytes, the
/// rest zero), ports (0 when the protocol has none) and protocol. Every byte is set, padding
/// included, because the kernel hashes the raw bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub is_v6: u8,
    pub _pad: [u8; 2],
}

/// A flow this host opened (FLOWS, under the key of its replies): alive until `expires_ns`
/// (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub expires_ns: u64,
    /// `flow::CLOSING`.
    pub flags: u32,
    pub _pad: u32,
}

/// A userspace verdict for one flow (VERDICTS), valid for one generation until `expires_ns`
/// (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub generation: u64,
    pub expires_ns: u64,
    /// `action::*`.
    pub action: u32,
    /// The deciding rule, or `DEFAULT_RULE_SLOT`: its counters count the flow's packets.
    pub rule: u32,
}

/// A flow waiting for a verdict (PENDING): escalated at `since_ns` for `generation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub generation: u64,
    pub since_ns: u64,
}

/// One escalation, sent through the ESCALATIONS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EscalationEvent {
    pub flow: FlowKey,
    pub generation: u64,
    /// When the kernel sent it (CLOCK_MONOTONIC): the start of the decision latency.
    pub sent_ns: u64,
    /// The rule that needs the owner (the kernel's first match).
    pub rule: u32,
    /// The TCP flags of the packet that escalated (later rules may test them).
    pub tcp_flags: u32,
}

const _: () = {
    assert!(core::mem::size_of::<RulesetHeader>() == 64);
    assert!(core::mem::size_of::<RuleMeta>() == 8);
    assert!(core::mem::size_of::<Bitmap>() == 8 * BITMAP_WORDS + 8);
    assert!(BITMAP_WORDS <= 64);
    assert!(core::mem::size_of::<FieldEntry>() == 8);
    assert!(core::mem::size_of::<GlobalStats>() == 184);
    assert!(core::mem::size_of::<FlowEntry>() == 16);
    assert!(core::mem::size_of::<LimitState>() == 48);
    assert!(core::mem::size_of::<LimitKey>() == 28);
    assert!(core::mem::size_of::<GlobalStats>() == GLOBAL_COUNTERS * 8);
    assert!(core::mem::align_of::<GlobalStats>() == core::mem::align_of::<u64>());
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<Verdict>() == 24);
    assert!(core::mem::size_of::<Pending>() == 16);
    assert!(core::mem::size_of::<EscalationEvent>() == 64);
    assert!(core::mem::size_of::<RuleStats>() == 16);
    assert!(core::mem::size_of::<TraceConfig>() == 88);
    assert!(core::mem::size_of::<LogLimit>() == 32);
    assert!(core::mem::size_of::<DecisionEvent>() == 72);
    assert!(core::mem::size_of::<DirBlock>() == 4 * dir::CHUNK_ENTRIES as usize);
    assert!(core::mem::size_of::<DirLine>() == 64);
    assert!(dir::MAX_CHUNKS - dir::FIXED_CHUNKS <= dir::MORE_SIZES[2]);
    assert!(dir::MAX_LINES <= dir::LEAF_SIZES[3]);
    assert!(dir::RANKS_WORD + 1 + dir::LEAF_INLINE as usize == 16);
    assert!(dir6::PATH_CHILD < 16);
    assert!(dir6::MAX_LINES == dir6::LINE_SIZES[5] && dir6::MAX_LINES - 1 == dir6::LINE_MASK);
    assert!(dir6::PATH < dir6::NODE && dir6::PATH >> dir6::DEPTH_SHIFT >= 16);
    assert!(dir6::NODE == dir::CHUNK);
    assert!(MAX_RULES.is_multiple_of(64));
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    /// Marks types aya may copy to and from maps as bytes.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: every type listed is repr(C) and Copy, holds only integers (and arrays of
            // them), and has no implicit padding (the size asserts above prove the layout).
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        RulesetHeader,
        RuleMeta,
        Bitmap,
        FieldEntry,
        GlobalStats,
        RuleStats,
        FlowKey,
        Verdict,
        Pending,
        EscalationEvent,
        DirBlock,
        DirLine,
        LimitState,
        LimitKey,
        FlowEntry,
        TraceConfig,
        LogLimit,
        DecisionEvent,
    );
}
