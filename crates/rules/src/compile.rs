//! The compiler: a pure function from a validated ruleset to the image of one map buffer.
//!
//! Every field a ruleset constrains becomes a lookup that returns a bitmap of the rules whose
//! condition on that field the packet satisfies (rules that don't constrain the field are in
//! every bitmap of it). Bitmaps are deduplicated; the kernel ANDs one bitmap per field and takes
//! the lowest set bit as the first matching rule.

use std::{collections::HashMap, net::IpAddr, ops::RangeInclusive, path::PathBuf};

use crate::error::CompileError;

type Result<T> = std::result::Result<T, CompileError>;
use xdpfw_common::{
    BITMAP_ALL, BITMAP_EMPTY, Bitmap, DirBlock, DirLine, FieldEntry, LimitState, LogLimit, MAX_BITMAPS, MAX_PREFIXES, RuleMeta,
    RulesetHeader, absent, dir, dir6, field, fields_layout::*, fragment_policy, header_flags, rule_flags,
};

use crate::{AddrList, FragmentPolicy, IcmpMatch, NdPolicy, PortMatch, Rule, Ruleset};

/// Everything one buffer holds, ready to be written.
pub struct Image {
    pub header: RulesetHeader,
    pub rules: Vec<RuleMeta>,
    pub bitmaps: Vec<Bitmap>,
    /// The whole FIELDS table of one buffer (`FIELDS_PER_BUFFER` entries).
    pub fields: Vec<FieldEntry>,
    /// IPv4 prefixes, as direct tables (see `xdpfw_common::dir`).
    pub src_v4: Option<DirectTable>,
    pub dst_v4: Option<DirectTable>,
    /// IPv6 prefixes, as multibit tries (see `xdpfw_common::dir6`).
    pub src_v6: Option<V6Table>,
    pub dst_v6: Option<V6Table>,
    /// Each rule's rate limit (all zero for rules without one), with full buckets.
    pub limits: Vec<LimitState>,
    /// The address tables are not in this image: installing it shares the live buffer's
    /// (compiled with [`compile_with`] and a [`Reuse`]).
    pub tables_reused: bool,
    /// What the address stage produced (also when its tables were reused).
    pub addr: AddrSummary,
    /// Each rule's log rate (all zero for rules without `log`), with full buckets.
    pub log_limits: Vec<LogLimit>,
}

/// A direct IPv4 table (see `xdpfw_common::dir`): the u32 entries of the top level and the
/// chunks, the leaf lines, and how many longest-prefix-match entries it was built from.
pub struct DirectTable {
    pub entries: Vec<u32>,
    pub lines: Vec<DirLine>,
    pub prefixes: usize,
    pub chunks: u32,
    /// Compressed leaves (the /24s that hold longer prefixes).
    pub leaves: u32,
}

impl DirectTable {
    /// The entries as blocks of 256: the top level's `dir::TOP_BLOCKS`, then one per chunk.
    pub fn blocks(&self) -> &[DirBlock] {
        as_blocks(&self.entries)
    }

    /// Bytes the kernel holds for this table in one buffer (fixed part and inner maps).
    pub fn bytes_per_buffer(&self) -> u64 {
        dir::table_bytes(self.chunks, self.lines.len() as u32)
    }

    /// The entry of `a`, as the kernel looks it up (the top level, a chunk, a leaf).
    pub fn lookup(&self, a: u32) -> u32 {
        let chunk = |e: u32, byte: u32| (dir::TOP_ENTRIES + (e & !dir::CHUNK) * dir::CHUNK_ENTRIES + (byte & 0xff)) as usize;
        let mut e = self.entries[(a >> 16) as usize];
        if e & dir::CHUNK != 0 {
            e = self.entries[chunk(e, a >> 8)];
            if e & dir::CHUNK != 0 {
                e = leaf_entry(&self.lines, e & !dir::CHUNK, a & 0xff);
            }
        }
        e
    }
}

/// `entries` (a whole number of blocks) as blocks of 256, the kernel's fixed arrays' elements.
fn as_blocks(entries: &[u32]) -> &[DirBlock] {
    let (blocks, rest) = entries.as_chunks::<{ dir::CHUNK_ENTRIES as usize }>();
    debug_assert!(rest.is_empty());
    // SAFETY: DirBlock is repr(C) around exactly such an array.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<DirBlock>(), blocks.len()) }
}

/// An IPv6 table (see `xdpfw_common::dir6`): the top level's u32 entries, the node lines, and
/// how many longest-prefix-match entries it was built from.
#[derive(Debug, PartialEq, Eq)]
pub struct V6Table {
    pub top: Vec<u32>,
    pub lines: Vec<DirLine>,
    pub prefixes: usize,
    /// Nodes over one byte (run nodes and, of those, direct ones), and path nodes.
    pub nodes: u32,
    pub directs: u32,
    pub paths: u32,
}

impl V6Table {
    /// The top level as blocks of 256 (`dir6::TOP_BLOCKS`).
    pub fn blocks(&self) -> &[DirBlock] {
        as_blocks(&self.top)
    }

    /// Bytes the kernel holds for this table in one buffer (top level and line map).
    pub fn bytes_per_buffer(&self) -> u64 {
        dir6::table_bytes(self.lines.len() as u32)
    }

    /// The entry of `a`, as the kernel looks it up (the top level, then node by node).
    pub fn lookup(&self, a: u128) -> u32 {
        v6_walk(self.top[(a >> 112) as usize], a, |i| self.lines.get(i as usize).copied()).expect("a walk within the table and dir6::MAX_STEPS")
    }
}

impl Image {
    /// Prefixes the kernel holds after merging (IPv4 and IPv6 table prefixes).
    pub fn prefix_count(&self) -> usize {
        self.addr.prefixes
    }
}

/// Entry `b` of the leaf whose first line is `n` (the kernel's `leaf_entry`, in Rust).
pub fn leaf_entry(lines: &[DirLine], n: u32, b: u32) -> u32 {
    run_entry(&lines[n as usize], b, |k| lines.get((n + 1 + k) as usize).copied()).expect("a leaf within the table")
}

/// Entry `b` of the leaf (or IPv6 run node, the same format) whose first line is `head`, the
/// further lines read by `further` (0: the line after the head); `None` when one is missing.
fn run_entry(head: &DirLine, b: u32, further: impl Fn(u32) -> Option<DirLine>) -> Option<u32> {
    let k = ((b >> 6) & 3) as usize;
    let bits = head.words[2 * k] as u64 | (head.words[2 * k + 1] as u64) << 32;
    // Bit 0 is set in every leaf, so the rank is at least 1 (a line that is no leaf: None).
    let rank = (((head.words[dir::RANKS_WORD] >> (8 * k)) & 0xff) + (bits & (u64::MAX >> (63 - (b & 63)))).count_ones()).checked_sub(1)?;
    if rank < dir::LEAF_INLINE {
        return Some(head.words[dir::RANKS_WORD + 1 + rank as usize]);
    }
    let r = rank - dir::LEAF_INLINE;
    Some(further(r / dir::LINE_VALUES)?.words[(r % dir::LINE_VALUES) as usize])
}

/// The entry of IPv6 address `a` in a table whose top-level entry for it is `e`, walked as the
/// kernel walks it (see `xdpfw_common::dir6`), line `i` read by `line`: the compiler's tables
/// ([`V6Table::lookup`]) and the live ones read back from the kernel. `None` when a line is
/// missing or the walk is longer than `dir6::MAX_STEPS`.
pub fn v6_walk(mut e: u32, a: u128, line: impl Fn(u32) -> Option<DirLine>) -> Option<u32> {
    for _ in 0..dir6::MAX_STEPS {
        if e & dir6::NODE == 0 {
            return Some(e);
        }
        let n = e & dir6::LINE_MASK;
        if e & dir6::PATH == 0 {
            let depth = (e >> dir6::DEPTH_SHIFT) & 15;
            let b = (a >> (120 - 8 * depth)) as u32 & 0xff;
            e = match e & dir6::DIRECT {
                0 => run_entry(&line(n)?, b, |k| line(n.checked_add(1 + k)?))?,
                _ => line(n.checked_add(b / 16)?)?.words[(b % 16) as usize],
            };
        } else {
            let head = line(n)?;
            let w = |i: usize| -> u128 { (0..4).fold(0u128, |acc, k| acc << 32 | head.words[i + k] as u128) };
            if (a ^ w(dir6::PATH_PATTERN)) & w(dir6::PATH_MASK) != 0 {
                return Some(head.words[dir6::PATH_MISS]);
            }
            e = head.words[dir6::PATH_CHILD];
        }
    }
    (e & dir6::NODE == 0).then_some(e)
}

/// Appends the leaf of `values` (the 256 entries of a /24) to `lines`; returns its first line.
pub fn push_leaf(values: &[u32; 256], lines: &mut Vec<DirLine>) -> u32 {
    let first = lines.len() as u32;
    let mut head = DirLine::default();
    let mut runs = Vec::with_capacity(8);
    for (b, &v) in values.iter().enumerate() {
        if b == 0 || v != values[b - 1] {
            head.words[b / 32] |= 1 << (b % 32);
            runs.push(v);
        }
    }
    let mut ranks = 0u32;
    let mut below = 0u32;
    for k in 0..4 {
        ranks |= below << (8 * k);
        below += head.words[2 * k].count_ones() + head.words[2 * k + 1].count_ones();
    }
    head.words[dir::RANKS_WORD] = ranks;
    let inline = runs.len().min(dir::LEAF_INLINE as usize);
    head.words[dir::RANKS_WORD + 1..dir::RANKS_WORD + 1 + inline].copy_from_slice(&runs[..inline]);
    lines.push(head);
    for rest in runs[inline..].chunks(dir::LINE_VALUES as usize) {
        let mut line = DirLine::default();
        line.words[..rest.len()].copy_from_slice(rest);
        lines.push(line);
    }
    first
}

/// Builds a direct table from longest-prefix-match entries `(address, length, bitmap id)`
/// (address in the top 32 bits of a u128). Prefixes up to /24 are written shortest first, so
/// longer ones overwrite them; one longer than /16 goes into the chunk of its /16, made from the
/// entry it refines. Then the prefixes longer than /24 are grouped by /24: each group is written
/// over the /24's final entry into 256 scratch entries, which become a compressed leaf.
fn direct_table(entries: &[(u128, u8, u32)], miss_id: u32) -> Result<DirectTable> {
    let mut sorted: Vec<(u8, u32, u32)> = entries.iter().map(|&(a, l, id)| (l, (a >> 96) as u32, id)).collect();
    sorted.sort_unstable();
    let mut t = vec![miss_id; dir::TOP_ENTRIES as usize];
    let mut chunks = 0u32;
    // The chunk under top-level entry `slot`, made on first use from the value it refines.
    let mut chunk_at = |t: &mut Vec<u32>, slot: usize| -> usize {
        if t[slot] & dir::CHUNK == 0 {
            let inherited = t[slot];
            t.extend(std::iter::repeat_n(inherited, dir::CHUNK_ENTRIES as usize));
            t[slot] = dir::CHUNK | chunks;
            chunks += 1;
        }
        (dir::TOP_ENTRIES + (t[slot] & !dir::CHUNK) * dir::CHUNK_ENTRIES) as usize
    };
    // Chunks are made once every prefix up to /16 is written, which is what they inherit.
    let first_long = sorted.partition_point(|&(len, _, _)| len <= 16);
    let first_leaf = sorted.partition_point(|&(len, _, _)| len <= 24);
    for &(len, addr, id) in &sorted[..first_long] {
        let top = (addr >> 16) as usize;
        t[top..top + (1usize << (16 - len))].fill(id);
    }
    for &(_, addr, _) in &sorted[first_long..] {
        chunk_at(&mut t, (addr >> 16) as usize);
    }
    for &(len, addr, id) in &sorted[first_long..first_leaf] {
        let start = chunk_at(&mut t, (addr >> 16) as usize) + ((addr >> 8) & 0xff) as usize;
        t[start..start + (1usize << (24 - len))].fill(id);
    }
    // The leaves, /24 by /24 (each group shortest first).
    let mut long: Vec<(u32, u8, u32, u32)> = sorted[first_leaf..].iter().map(|&(l, a, id)| (a >> 8, l, a, id)).collect();
    long.sort_unstable();
    let mut lines = Vec::new();
    let mut leaves = 0u32;
    let mut scratch = [0u32; 256];
    for group in long.chunk_by(|a, b| a.0 == b.0) {
        let slot = chunk_at(&mut t, (group[0].2 >> 16) as usize) + (group[0].0 & 0xff) as usize;
        scratch.fill(t[slot]);
        for &(_, len, addr, id) in group {
            let start = (addr & 0xff) as usize;
            scratch[start..start + (1usize << (32 - len))].fill(id);
        }
        t[slot] = dir::CHUNK | push_leaf(&scratch, &mut lines);
        leaves += 1;
    }
    // A leaf of `p` prefixes takes at most `p` lines, so this holds for up to MAX_LINES prefixes.
    if lines.len() > dir::MAX_LINES as usize {
        return Err(CompileError::TooManyLines { file: PathBuf::new(), which: "IPv4", max: dir::MAX_LINES });
    }
    Ok(DirectTable { entries: t, lines, prefixes: entries.len(), chunks, leaves })
}

/// Builds an IPv6 table from longest-prefix-match entries `(address, length, bitmap id)`.
/// Prefixes up to /16 are written into the top level, shortest first; the longer ones, grouped
/// by their first 16 bits, become a subtree under the entry they refine (see [`V6Builder`]).
fn v6_table(entries: &[(u128, u8, u32)], miss_id: u32) -> Result<V6Table> {
    v6_table_from(entries, miss_id, 0)
}

/// [`v6_table`] with its lines numbered from `base`.
fn v6_table_from(entries: &[(u128, u8, u32)], miss_id: u32, base: u32) -> Result<V6Table> {
    let mut sorted = entries.to_vec();
    sorted.sort_unstable_by_key(|&(a, l, _)| (a, l));
    let mut top = vec![miss_id; dir::TOP_ENTRIES as usize];
    let mut short: Vec<(u8, u128, u32)> = sorted.iter().filter(|e| e.1 <= 16).map(|&(a, l, id)| (l, a, id)).collect();
    short.sort_unstable();
    for (len, a, id) in short {
        let first = (a >> 112) as usize;
        top[first..first + (1usize << (16 - len))].fill(id);
    }
    let long: Vec<(u128, u8, u32)> = sorted.into_iter().filter(|e| e.1 > 16).collect();
    let mut b = V6Builder { lines: Vec::new(), nodes: 0, directs: 0, paths: 0, base };
    for group in long.chunk_by(|x, y| x.0 >> 112 == y.0 >> 112) {
        let slot = (group[0].0 >> 112) as usize;
        top[slot] = b.subtree(group, 2, top[slot]);
        // Checked as it grows: an entry holds a line index of `dir6::LINE_MASK` at most.
        if b.base as usize + b.lines.len() > dir6::MAX_LINES as usize {
            break;
        }
    }
    if b.base as usize + b.lines.len() > dir6::MAX_LINES as usize {
        return Err(CompileError::TooManyLines { file: PathBuf::new(), which: "IPv6", max: dir6::MAX_LINES });
    }
    Ok(V6Table { top, lines: b.lines, prefixes: entries.len(), nodes: b.nodes, directs: b.directs, paths: b.paths })
}

/// Writes the nodes of an IPv6 table, children before their parents.
struct V6Builder {
    lines: Vec<DirLine>,
    nodes: u32,
    directs: u32,
    paths: u32,
    /// The index the first of `lines` will have in the line map: 0 for a whole table, the end
    /// of the live lines for the delta path's subtrees ([`V6Regions::subtrees`]).
    base: u32,
}

impl V6Builder {
    /// The entry for `group` (prefixes sorted by address, all longer than `8 depth` bits and
    /// sharing their first `depth` bytes) under an entry whose value was `inherited`: a path
    /// node for one prefix, or a path node down to the byte where the prefixes part (or the
    /// shortest ends) when that is deeper, then a run node there.
    fn subtree(&mut self, group: &[(u128, u8, u32)], depth: u32, inherited: u32) -> u32 {
        if let [(a, len, id)] = *group {
            return self.path(a, len as u32, id, inherited);
        }
        let shortest = group.iter().map(|e| e.1 as u32).min().unwrap_or(128);
        let common = (group[0].0 ^ group[group.len() - 1].0).leading_zeros();
        let split = common.min(shortest - 1) / 8;
        if split > depth {
            let child = self.node(group, split, inherited);
            return self.path(group[0].0, 8 * split, child, inherited);
        }
        self.node(group, depth, inherited)
    }

    /// A run node over byte `depth` of `group` (see [`V6Builder::subtree`]).
    fn node(&mut self, group: &[(u128, u8, u32)], depth: u32, inherited: u32) -> u32 {
        let end = 8 * (depth + 1);
        let byte = |a: u128| ((a >> (120 - 8 * depth)) & 0xff) as usize;
        let mut values = [inherited; 256];
        let mut ending: Vec<(u8, u128, u32)> = group.iter().filter(|e| e.1 as u32 <= end).map(|&(a, l, id)| (l, a, id)).collect();
        ending.sort_unstable();
        for (len, a, id) in ending {
            let first = byte(a);
            values[first..first + (1usize << (end - len as u32))].fill(id);
        }
        let longer: Vec<(u128, u8, u32)> = group.iter().filter(|e| e.1 as u32 > end).copied().collect();
        for sub in longer.chunk_by(|x, y| byte(x.0) == byte(y.0)) {
            let b = byte(sub[0].0);
            values[b] = self.subtree(sub, depth + 1, values[b]);
        }
        self.nodes += 1;
        let runs = 1 + values.windows(2).filter(|w| w[0] != w[1]).count();
        if runs >= dir6::DIRECT_RUNS {
            let first = self.base + self.lines.len() as u32;
            self.lines.extend(values.chunks(16).map(|v| DirLine { words: v.try_into().unwrap_or_default() }));
            self.directs += 1;
            return dir6::NODE | dir6::DIRECT | depth << dir6::DEPTH_SHIFT | first;
        }
        dir6::NODE | depth << dir6::DEPTH_SHIFT | (self.base + push_leaf(&values, &mut self.lines))
    }

    /// A path node: addresses whose first `bits` bits are those of `a` go on to `child`, the
    /// others get `miss`.
    fn path(&mut self, a: u128, bits: u32, child: u32, miss: u32) -> u32 {
        let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
        let mut line = DirLine::default();
        line.words[dir6::PATH_MISS] = miss;
        line.words[dir6::PATH_CHILD] = child;
        for k in 0..4 {
            line.words[dir6::PATH_PATTERN + k] = ((a & mask) >> (96 - 32 * k)) as u32;
            line.words[dir6::PATH_MASK + k] = (mask >> (96 - 32 * k)) as u32;
        }
        self.lines.push(line);
        self.paths += 1;
        dir6::NODE | dir6::PATH | (self.base + self.lines.len() as u32 - 1)
    }
}

/// Interns bitmaps so each distinct rule set is stored once. The reserved ids come first:
/// BITMAP_EMPTY, then BITMAP_ALL (every rule; the kernel ANDs it for unconstrained fields).
struct Bitmaps {
    ids: HashMap<Bitmap, u32>,
    list: Vec<Bitmap>,
}

impl Bitmaps {
    fn new(rule_count: usize) -> Self {
        let mut b = Self { ids: HashMap::new(), list: Vec::new() };
        let empty = b.intern(Bitmap::EMPTY);
        let mut all = Bitmap::EMPTY;
        for i in 0..rule_count {
            set_bit(&mut all, i);
        }
        // With no rules, "all" is the empty set again: store it anyway so its id is fixed.
        b.list.push(all);
        b.ids.entry(all).or_insert(BITMAP_ALL);
        debug_assert_eq!((empty, b.list.len() as u32 - 1), (BITMAP_EMPTY, BITMAP_ALL));
        b
    }
    fn intern(&mut self, bm: Bitmap) -> u32 {
        *self.ids.entry(bm).or_insert_with(|| {
            self.list.push(bm);
            (self.list.len() - 1) as u32
        })
    }
}

fn set_bit(bm: &mut Bitmap, rule: usize) {
    bm.set(rule);
}

fn union(a: &Bitmap, b: &Bitmap) -> Bitmap {
    let mut out = *a;
    for (o, w) in out.words.iter_mut().zip(b.words.iter()) {
        *o |= w;
    }
    out.summary |= b.summary;
    out
}

/// Rules that do not constrain a field: they are in every bitmap of that field.
fn unconstrained(rules: &[Rule], constrained: impl Fn(&Rule) -> bool) -> Bitmap {
    let mut bm = Bitmap::EMPTY;
    for (i, r) in rules.iter().enumerate() {
        if !constrained(r) {
            set_bit(&mut bm, i);
        }
    }
    bm
}

pub fn compile(rs: &Ruleset) -> Result<Image> {
    compile_with(rs, None)
}

/// What the address stage of a compile produced, besides the tables themselves: enough to
/// compile the rest of a ruleset around tables already installed (see [`Reuse`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AddrSummary {
    /// Bitmap ids `0..bitmaps` are the address stage's (it interns first, so they come first).
    pub bitmaps: u32,
    /// `field::SRC` and `field::DST`, as the ruleset uses them.
    pub fields: u32,
    pub absent_src: u32,
    pub absent_dst: u32,
    /// Longest-prefix-match entries after merging (IPv4 and IPv6 table prefixes).
    pub prefixes: usize,
}

/// Address tables compiled earlier from the same [`address_key`], installed in the live buffer:
/// the summary of that compile and its first `summary.bitmaps` bitmaps (read back from the
/// buffer). [`compile_with`] then builds everything but the address tables, with the same
/// bitmap ids, so the installed tables can be shared instead of rebuilt.
pub struct Reuse {
    pub summary: AddrSummary,
    pub bitmaps: Vec<Bitmap>,
}

/// The exact inputs of the address stage of `rs`: the rule count and, for the source and the
/// destination field, each rule's prefixes, excluded prefixes and sets (each set's contents
/// once, by name). Two rulesets with equal keys compile to identical address tables and
/// address bitmaps, whatever else differs (ports, protocols, actions, limits, tests). A byte
/// string rather than a digest: comparing 17 MB is cheaper than hashing it, and cannot collide.
pub fn address_key(rs: &Ruleset) -> Vec<u8> {
    let src: Vec<Option<&AddrList>> = rs.rules.iter().map(|r| r.src.as_ref()).collect();
    let dst: Vec<Option<&AddrList>> = rs.rules.iter().map(|r| r.dst.as_ref()).collect();
    address_key_of(&src, &dst, rs.prefix_count())
}

/// [`address_key`] of the rules whose source and destination conditions are `src[i]` and
/// `dst[i]` (`prefixes`: a hint of the key's size).
pub fn address_key_of(src: &[Option<&AddrList>], dst: &[Option<&AddrList>], prefixes: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(64 + 6 * prefixes);
    key.extend_from_slice(b"xdpfw-addr-1\0");
    key.extend_from_slice(&(src.len() as u64).to_le_bytes());
    let put_net = |key: &mut Vec<u8>, n: &ipnet::IpNet| match n {
        ipnet::IpNet::V4(n) => {
            key.push(4);
            key.push(n.prefix_len());
            key.extend_from_slice(&n.network().octets());
        }
        ipnet::IpNet::V6(n) => {
            key.push(6);
            key.push(n.prefix_len());
            key.extend_from_slice(&n.network().octets());
        }
    };
    let put_list = |key: &mut Vec<u8>, list: &AddrList, sets: &mut Vec<(String, std::sync::Arc<Vec<ipnet::IpNet>>)>| {
        key.extend_from_slice(&(list.inline.len() as u64).to_le_bytes());
        for n in &list.inline {
            put_net(key, n);
        }
        key.extend_from_slice(&(list.sets.len() as u64).to_le_bytes());
        for (name, set) in &list.sets {
            key.extend_from_slice(&(name.len() as u64).to_le_bytes());
            key.extend_from_slice(name.as_bytes());
            if !sets.iter().any(|(n, _)| n == name) {
                sets.push((name.clone(), set.clone()));
            }
        }
    };
    let mut sets = Vec::new();
    for lists in [src, dst] {
        for l in lists {
            match l {
                None => key.push(0),
                Some(list) => {
                    key.push(1);
                    put_list(&mut key, list, &mut sets);
                    match &list.except {
                        None => key.push(0),
                        Some(e) => {
                            key.push(1);
                            put_list(&mut key, e, &mut sets);
                        }
                    }
                }
            }
        }
    }
    // A set name means the same prefixes in every rule of a ruleset, so its contents go in once.
    for (name, set) in sets {
        key.extend_from_slice(&(name.len() as u64).to_le_bytes());
        key.extend_from_slice(name.as_bytes());
        key.extend_from_slice(&(set.len() as u64).to_le_bytes());
        for n in set.iter() {
            put_net(&mut key, n);
        }
    }
    key
}

/// [`compile`], or with `reuse`, everything but the address tables: the image then has no
/// tables (`tables_reused`), and installing it shares the live buffer's (see [`Reuse`]). The
/// caller vouches that the live tables were compiled from the same [`address_key`].
pub fn compile_with(rs: &Ruleset, reuse: Option<&Reuse>) -> Result<Image> {
    let rules = &rs.rules;
    let mut fields_used = 0u32;
    let mut absent_ids = [0u32; absent::COUNT];
    let mut table = vec![FieldEntry::default(); FIELDS_PER_BUFFER as usize];

    let (mut bitmaps, v4_tables, v6_prefixes, addr) = match reuse {
        Some(r) => {
            let mut b = Bitmaps { ids: HashMap::with_capacity(r.bitmaps.len()), list: Vec::with_capacity(r.bitmaps.len()) };
            for bm in &r.bitmaps {
                b.list.push(*bm);
                b.ids.entry(*bm).or_insert(b.list.len() as u32 - 1);
            }
            (b, [None, None], [None, None], r.summary.clone())
        }
        None => {
            let mut b = Bitmaps::new(rules.len());
            let (v4, v6, summary) = address_stage(rs, &mut b)?;
            (b, v4, v6, summary)
        }
    };
    fields_used |= addr.fields;
    absent_ids[absent::SRC] = addr.absent_src;
    absent_ids[absent::DST] = addr.absent_dst;

    // Protocol: a 256-entry table.
    if rules.iter().any(|r| r.proto.is_some()) {
        fields_used |= field::PROTO;
        let base = unconstrained(rules, |r| r.proto.is_some());
        for p in 0..=255u8 {
            let mut bm = base;
            for (i, r) in rules.iter().enumerate() {
                if r.proto.as_ref().is_some_and(|ps| ps.contains(&p)) {
                    set_bit(&mut bm, i);
                }
            }
            table[(PROTO_BASE + p as u32) as usize].bitmap = bitmaps.intern(bm);
        }
    }

    // Ports and ICMP type/code: 65536-entry tables filled segment by segment.
    type Ranges = fn(&Rule) -> Option<Vec<RangeInclusive<u32>>>;
    let port_fields: [(u32, usize, u32, Ranges); 3] = [
        (field::SPORT, absent::SPORT, SPORT_BASE, |r| r.sport.as_ref().map(PortMatch::effective)),
        (field::DPORT, absent::DPORT, DPORT_BASE, |r| r.dport.as_ref().map(PortMatch::effective)),
        (field::ICMP, absent::ICMP, ICMP_BASE, |r| r.icmp.as_ref().map(icmp_ranges)),
    ];
    for (bit, absent_slot, base_index, get) in port_fields {
        let ranges: Vec<Option<Vec<RangeInclusive<u32>>>> = rules.iter().map(get).collect();
        if ranges.iter().all(Option::is_none) {
            continue;
        }
        fields_used |= bit;
        let base = unconstrained(rules, |r| get(r).is_some());
        absent_ids[absent_slot] = bitmaps.intern(base);
        fill_ranges(&ranges, &base, &mut bitmaps, &mut table[base_index as usize..(base_index + 65536) as usize]);
    }

    // TCP flags: 256 values.
    if rules.iter().any(|r| r.tcp_flags.is_some()) {
        fields_used |= field::TCP_FLAGS;
        let base = unconstrained(rules, |r| r.tcp_flags.is_some());
        absent_ids[absent::TCP_FLAGS] = bitmaps.intern(base);
        for v in 0..=255u8 {
            let mut bm = base;
            for (i, r) in rules.iter().enumerate() {
                if r.tcp_flags.is_some_and(|f| f.matches(v)) {
                    set_bit(&mut bm, i);
                }
            }
            table[(TCP_FLAGS_BASE + v as u32) as usize].bitmap = bitmaps.intern(bm);
        }
    }

    // VLAN: one entry per id of the outermost tag, and one for untagged packets (no rule with a
    // vlan condition takes those).
    if rules.iter().any(|r| r.vlan.is_some()) {
        fields_used |= field::VLAN;
        let base = unconstrained(rules, |r| r.vlan.is_some());
        for id in 0..VLAN_UNTAGGED {
            let mut bm = base;
            for (i, r) in rules.iter().enumerate() {
                if r.vlan.as_ref().is_some_and(|v| v.contains(&(id as u16))) {
                    set_bit(&mut bm, i);
                }
            }
            table[(VLAN_BASE + id) as usize].bitmap = bitmaps.intern(bm);
        }
        table[(VLAN_BASE + VLAN_UNTAGGED) as usize].bitmap = bitmaps.intern(base);
    }

    // Connection state: one entry per state, looked up only when a `state` rule matches first.
    if rules.iter().any(|r| r.state.is_some()) {
        fields_used |= field::STATE;
        for st in crate::packet::FlowState::ALL {
            let mut bm = Bitmap::EMPTY;
            for (i, r) in rules.iter().enumerate() {
                if r.state.as_ref().is_none_or(|s| s.contains(&st)) {
                    set_bit(&mut bm, i);
                }
            }
            table[(STATE_BASE + st.kernel()) as usize].bitmap = bitmaps.intern(bm);
        }
    }

    if bitmaps.list.len() > MAX_BITMAPS as usize {
        return Err(CompileError::TooManyBitmaps { file: rs.path.clone(), needed: bitmaps.list.len(), max: MAX_BITMAPS });
    }
    let [src_v4, dst_v4] = v4_tables;
    let [src_v6, dst_v6] = v6_prefixes;

    let header = RulesetHeader {
        generation: 0,
        rule_count: rules.len() as u32,
        pending_action: rs.escalation.pending.kernel(),
        fields: fields_used,
        default_action: rs.default.kernel(),
        fragment_policy: match rs.fragments {
            FragmentPolicy::L3Only => fragment_policy::L3_ONLY,
            FragmentPolicy::Drop => fragment_policy::DROP,
            FragmentPolicy::Pass => fragment_policy::PASS,
        },
        escalation_retry_ms: rs.escalation.retry.as_millis() as u32,
        absent: absent_ids,
        flags: if rs.icmpv6_nd == NdPolicy::Rules { header_flags::ND_RULES } else { 0 }
            | if rules.iter().any(|r| r.limit.is_some()) { header_flags::LIMITS } else { 0 }
            | if rules.iter().any(|r| r.state.is_some()) { header_flags::STATE } else { 0 }
            | if rules.iter().any(|r| r.log.is_some()) { header_flags::LOGS } else { 0 },
        _pad: 0,
    };
    Ok(Image {
        header,
        rules: rules
            .iter()
            .map(|r| RuleMeta {
                action: r.action.kernel(),
                flags: if r.owner.is_some() { rule_flags::NEEDS_OWNER } else { 0 }
                    | if r.limit.is_some() { rule_flags::LIMITED } else { 0 }
                    | if r.state.is_some() { rule_flags::STATEFUL } else { 0 }
                    | if r.log.is_some() { rule_flags::LOG } else { 0 },
            })
            .collect(),
        bitmaps: bitmaps.list,
        fields: table,
        src_v4,
        dst_v4,
        src_v6,
        dst_v6,
        limits: rules.iter().map(|r| r.limit.as_ref().map(|l| l.kernel()).unwrap_or_default()).collect(),
        tables_reused: reuse.is_some(),
        addr,
        log_limits: rules.iter().map(|r| r.log.as_ref().map(|l| l.kernel()).unwrap_or_default()).collect(),
    })
}

/// The address fields' tables (IPv4 direct tables, IPv6 tables) and the summary of what
/// they need; interns the address bitmaps into `bitmaps`, first.
#[expect(clippy::type_complexity, reason = "the two fields' tables of both families")]
fn address_stage(rs: &Ruleset, bitmaps: &mut Bitmaps) -> Result<([Option<DirectTable>; 2], [Option<V6Table>; 2], AddrSummary)> {
    let rules = &rs.rules;
    let mut summary = AddrSummary::default();
    let mut v4_tables = [None, None];
    let mut v6_tables = [None, None];
    for (slot, (bit, get)) in [
        (field::SRC, (|r: &Rule| r.src.as_ref()) as fn(&Rule) -> Option<&AddrList>),
        (field::DST, |r: &Rule| r.dst.as_ref()),
    ]
    .into_iter()
    .enumerate()
    {
        if rules.iter().all(|r| get(r).is_none()) {
            continue;
        }
        summary.fields |= bit;
        let lists: Vec<Option<&AddrList>> = rules.iter().map(get).collect();
        let base = field_base(&lists);
        *(if slot == 0 { &mut summary.absent_src } else { &mut summary.absent_dst }) = bitmaps.intern(base);
        let (v4, v6) = field_tables(&lists, &base, bitmaps);
        let miss = bitmaps.intern(base);
        if v4.len() > MAX_PREFIXES as usize {
            let which = if slot == 0 { "source IPv4" } else { "destination IPv4" };
            return Err(CompileError::TooManyPrefixes { file: rs.path.clone(), which, count: v4.len(), max: MAX_PREFIXES });
        }
        if v6.len() > MAX_PREFIXES as usize {
            let which = if slot == 0 { "source IPv6" } else { "destination IPv6" };
            return Err(CompileError::TooManyPrefixes { file: rs.path.clone(), which, count: v6.len(), max: MAX_PREFIXES });
        }
        let with_file = |e: CompileError| match e {
            CompileError::TooManyLines { which, max, .. } => CompileError::TooManyLines { file: rs.path.clone(), which, max },
            other => other,
        };
        let (t, t6) = both(&v4, &v6, |v4| direct_table(v4, miss), |v6| v6_table(v6, miss));
        let (t, t6) = (t.map_err(with_file)?, t6.map_err(with_file)?);
        summary.prefixes += t.prefixes + t6.prefixes;
        v4_tables[slot] = Some(t);
        v6_tables[slot] = Some(t6);
    }
    summary.bitmaps = bitmaps.list.len() as u32;
    Ok((v4_tables, v6_tables, summary))
}

/// The `type << 8 | code` values an ICMP condition accepts.
fn icmp_ranges(m: &IcmpMatch) -> Vec<RangeInclusive<u32>> {
    let mut out = Vec::new();
    for &t in &m.types {
        let t = (t as u32) << 8;
        match &m.codes {
            Some(codes) => out.extend(codes.iter().map(|&c| (t | c as u32)..=(t | c as u32))),
            None => out.push(t..=(t | 0xff)),
        }
    }
    out
}

/// Fills a table indexed by value with bitmaps, one segment between range boundaries at a time.
fn fill_ranges(ranges: &[Option<Vec<RangeInclusive<u32>>>], base: &Bitmap, bitmaps: &mut Bitmaps, table: &mut [FieldEntry]) {
    let mut cuts: Vec<u32> = vec![0, table.len() as u32];
    for r in ranges.iter().flatten().flatten() {
        if !r.is_empty() {
            cuts.push(*r.start());
            cuts.push(r.end() + 1);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    for seg in cuts.windows(2) {
        let (lo, hi) = (seg[0], seg[1]);
        let mut bm = *base;
        for (i, rs) in ranges.iter().enumerate() {
            if rs.as_ref().is_some_and(|rs| rs.iter().any(|r| r.contains(&lo))) {
                set_bit(&mut bm, i);
            }
        }
        let id = bitmaps.intern(bm);
        for e in &mut table[lo as usize..hi as usize] {
            e.bitmap = id;
        }
    }
}

/// The bitmap of an address no prefix of a field matches: the rules that do not constrain the
/// field, and those with only excluded prefixes (`!`), which hold for every address outside them.
fn field_base(lists: &[Option<&AddrList>]) -> Bitmap {
    let mut bm = Bitmap::EMPTY;
    for (i, l) in lists.iter().enumerate() {
        if !l.is_some_and(AddrList::has_positive) {
            set_bit(&mut bm, i);
        }
    }
    bm
}

/// The longest-prefix-match entries of one field (rule `i` constrained by `lists[i]`), IPv4 and
/// IPv6.
fn field_tables(lists: &[Option<&AddrList>], base: &Bitmap, bitmaps: &mut Bitmaps) -> FieldEntries {
    if lists.iter().any(|l| l.is_some_and(|l| l.except.is_some())) {
        prefix_tables_except(lists, base, bitmaps)
    } else {
        prefix_tables(lists, base, bitmaps)
    }
}

/// IPv4 and IPv6 table entries `(address in the top bits, length, bitmap id)` of a
/// field, as the compiler's stages pass them on.
type FieldEntries = (Vec<(u128, u8, u32)>, Vec<(u128, u8, u32)>);

/// The bitmaps a [`v4_regions`] result names by id, and each /16 asked for.
pub type Regions = (Vec<Bitmap>, Vec<(u16, Region)>);

/// What one /16 of a field's direct IPv4 table holds (see [`v4_regions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Region {
    /// One bitmap id for the whole /16.
    Uniform(u32),
    /// One slot per /24.
    Chunk(Box<[Slot; 256]>),
}

/// What one /24 of a [`Region::Chunk`] holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    Value(u32),
    /// The bitmap id of each address (by its last byte).
    Leaf(Box<[u32; 256]>),
}

/// The /16s `tops` of a field's direct IPv4 table, as [`compile`] would answer them, with the
/// bitmaps their ids name. Rule `i`'s condition on the field is `lists[i]`; the lists' sets may
/// hold only the prefixes that overlap those /16s (the answer for an address depends only on
/// the prefixes that contain it; inline prefixes must stay, since a list cut to nothing would
/// mean "any address"), which is what makes this cheap beside a 1M-prefix set: the delta path
/// of `loader set` recomputes the /16s a batch touches this way.
pub fn v4_regions(lists: &[Option<&AddrList>], tops: &[u16]) -> Result<Regions> {
    let mut bitmaps = Bitmaps::new(lists.len());
    let base = field_base(lists);
    let (v4, _) = field_tables(lists, &base, &mut bitmaps);
    let miss = bitmaps.intern(base);
    let t = direct_table(&v4, miss)?;
    let regions = tops
        .iter()
        .map(|&top| {
            let e = t.entries[top as usize];
            if e & dir::CHUNK == 0 {
                return (top, Region::Uniform(e));
            }
            let first = (dir::TOP_ENTRIES + (e & !dir::CHUNK) * dir::CHUNK_ENTRIES) as usize;
            let slots: Vec<Slot> = t.entries[first..first + 256]
                .iter()
                .map(|&c| match c & dir::CHUNK {
                    0 => Slot::Value(c),
                    _ => Slot::Leaf(Box::new(std::array::from_fn(|b| leaf_entry(&t.lines, c & !dir::CHUNK, b as u32)))),
                })
                .collect();
            (top, Region::Chunk(Box::new(slots.try_into().unwrap_or_else(|_| unreachable!("256 slots")))))
        })
        .collect();
    Ok((bitmaps.list, regions))
}

/// The IPv6 counterpart of [`v4_regions`]: what the top-level entries `tops` (the first 16
/// bits) of a field's IPv6 table hold and the nodes under them, as [`compile`] would answer
/// them, from lists that may hold only the prefixes overlapping those /16s.
pub struct V6Regions {
    /// The bitmaps the entries' ids name.
    pub bitmaps: Vec<Bitmap>,
    /// The field's merged longest-prefix-match entries that decide the /16s asked for.
    entries: Vec<(u128, u8, u32)>,
    miss: u32,
    tops: Vec<u16>,
}

/// The top-level entries of some /16s of an IPv6 table and the lines of the nodes under them
/// ([`V6Regions::subtrees`]).
pub type Subtrees = (Vec<(u16, u32)>, Vec<DirLine>);

/// See [`V6Regions`]; `tops` sorted.
pub fn v6_regions(lists: &[Option<&AddrList>], tops: &[u16]) -> V6Regions {
    let mut bitmaps = Bitmaps::new(lists.len());
    let base = field_base(lists);
    let (_, v6) = field_tables(lists, &base, &mut bitmaps);
    let miss = bitmaps.intern(base);
    // Prefixes up to /16 can cover an asked /16; longer ones only the /16 they lie in.
    let entries = v6.into_iter().filter(|&(a, l, _)| l <= 16 || tops.binary_search(&((a >> 112) as u16)).is_ok()).collect();
    V6Regions { bitmaps: bitmaps.list, entries, miss, tops: tops.to_vec() }
}

impl V6Regions {
    /// The top-level entry of each /16 asked for and the lines of the nodes under them, with
    /// every bitmap id `i` written as `remap[i]` (the live buffer's id of the same bitmap) and
    /// the lines numbered from `base` (where they will be written in the line map). `remap`
    /// has an id for each of [`V6Regions::bitmaps`].
    pub fn subtrees(&self, remap: &[u32], base: u32) -> Result<Subtrees> {
        let entries: Vec<(u128, u8, u32)> = self.entries.iter().map(|&(a, l, id)| (a, l, remap[id as usize])).collect();
        let t = v6_table_from(&entries, remap[self.miss as usize], base)?;
        Ok((self.tops.iter().map(|&top| (top, t.top[top as usize])).collect(), t.lines))
    }
}

/// Builds the longest-prefix-match entries of one address field, for IPv4 and IPv6. Each prefix's bitmap is the rules that
/// name it or any prefix containing it, plus the unconstrained rules, so the longest match alone
/// is the answer. A prefix whose bitmap equals its parent's adds nothing and is left out.
fn prefix_tables(lists: &[Option<&AddrList>], base: &Bitmap, bitmaps: &mut Bitmaps) -> FieldEntries {
    // (address as u128 in the family's top bits, prefix length, is_v6, rule)
    let mut entries: Vec<(bool, u128, u8, u32)> = Vec::new();
    for (i, l) in lists.iter().enumerate() {
        if let Some(list) = l {
            entries.extend(list.iter().map(|n| {
                let (v6, bits) = match n.network() {
                    IpAddr::V4(a) => (false, (u32::from(a) as u128) << 96),
                    IpAddr::V6(a) => (true, u128::from(a)),
                };
                (v6, bits, n.prefix_len(), i as u32)
            }));
        }
    }
    // Sorted by family, address, then length: every prefix comes after the prefixes containing it.
    entries.sort_unstable();

    let base_id = bitmaps.intern(*base);
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    // Ancestors of the current prefix: (family, address, length, bitmap, id).
    let mut stack: Vec<(bool, u128, u8, Bitmap, u32)> = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let (is_v6, addr, len, _) = entries[i];
        let mut own = Bitmap::EMPTY;
        while i < entries.len() && entries[i].0 == is_v6 && entries[i].1 == addr && entries[i].2 == len {
            set_bit(&mut own, entries[i].3 as usize);
            i += 1;
        }
        while let Some(&(f, a, l, _, _)) = stack.last() {
            let contains = f == is_v6 && (l == 0 || (a ^ addr) >> (128 - l as u32) == 0);
            if contains {
                break;
            }
            stack.pop();
        }
        let (parent, parent_id) = stack.last().map(|&(_, _, _, bm, id)| (bm, Some(id))).unwrap_or((*base, None));
        let bm = union(&parent, &own);
        let id = bitmaps.intern(bm);
        stack.push((is_v6, addr, len, bm, id));
        // Without a stored parent, a miss yields `base`, so a prefix equal to base is redundant too.
        let redundant = match parent_id {
            Some(pid) => pid == id,
            None => bm == *base,
        };
        if redundant {
            continue;
        }
        if is_v6 {
            v6.push((addr, len, id));
        } else {
            v4.push((addr, len, id));
        }
    }
    merged_tables(v4, v6, base_id)
}

/// [`prefix_tables`] for fields where some rule excludes prefixes (`!`): an address is in a
/// rule's bitmap when it is in one of the rule's positive prefixes (or the rule has none: then
/// it is in `base`) and in none of its excluded ones, however the two nest. Each prefix's
/// bitmap is `(base ∪ positives of it and its ancestors) − exclusions of it and its ancestors`,
/// so the longest match alone is still the answer.
fn prefix_tables_except(lists: &[Option<&AddrList>], base: &Bitmap, bitmaps: &mut Bitmaps) -> FieldEntries {
    // (is_v6, address as u128 in the family's top bits, prefix length, excluded, rule)
    let mut entries: Vec<(bool, u128, u8, bool, u32)> = Vec::new();
    let key = |n: &ipnet::IpNet| match n.network() {
        IpAddr::V4(a) => (false, (u32::from(a) as u128) << 96),
        IpAddr::V6(a) => (true, u128::from(a)),
    };
    for (i, l) in lists.iter().enumerate() {
        let Some(list) = l else { continue };
        for (excluded, n) in list.iter().map(|n| (false, n)).chain(list.except.iter().flat_map(|e| e.iter()).map(|n| (true, n))) {
            let (v6, bits) = key(n);
            entries.push((v6, bits, n.prefix_len(), excluded, i as u32));
        }
    }
    entries.sort_unstable();

    let minus = |a: &Bitmap, b: &Bitmap| {
        let mut out = Bitmap::EMPTY;
        for (w, (x, y)) in a.words.iter().zip(b.words.iter()).enumerate() {
            out.words[w] = x & !y;
            if out.words[w] != 0 {
                out.summary |= 1 << w;
            }
        }
        out
    };
    let base_id = bitmaps.intern(*base);
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    // Ancestors of the current prefix: (family, address, length, positives, exclusions, id).
    let mut stack: Vec<(bool, u128, u8, Bitmap, Bitmap, u32)> = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let (is_v6, addr, len, _, _) = entries[i];
        let (mut pos, mut neg) = (Bitmap::EMPTY, Bitmap::EMPTY);
        while i < entries.len() && entries[i].0 == is_v6 && entries[i].1 == addr && entries[i].2 == len {
            set_bit(if entries[i].3 { &mut neg } else { &mut pos }, entries[i].4 as usize);
            i += 1;
        }
        while let Some(&(f, a, l, ..)) = stack.last() {
            if f == is_v6 && (l == 0 || (a ^ addr) >> (128 - l as u32) == 0) {
                break;
            }
            stack.pop();
        }
        let parent_id = stack.last().map(|e| e.5);
        if let Some(&(_, _, _, ppos, pneg, _)) = stack.last() {
            pos = union(&ppos, &pos);
            neg = union(&pneg, &neg);
        }
        let bm = minus(&union(base, &pos), &neg);
        let id = bitmaps.intern(bm);
        stack.push((is_v6, addr, len, pos, neg, id));
        if parent_id.unwrap_or(base_id) == id {
            continue;
        }
        if is_v6 {
            v6.push((addr, len, id));
        } else {
            v4.push((addr, len, id));
        }
    }
    merged_tables(v4, v6, base_id)
}

/// The end of [`prefix_tables`] and [`prefix_tables_except`]: both families of entries merged
/// (see [`merge_siblings`]).
fn merged_tables(v4: Vec<(u128, u8, u32)>, v6: Vec<(u128, u8, u32)>, base_id: u32) -> FieldEntries {
    both(v4, v6, |v4| merge_siblings(v4, base_id), |v6| merge_siblings(v6, base_id))
}

/// Prefixes of each family beyond which [`both`] uses a second thread: below it, starting one
/// costs more than the work it shares.
const PARALLEL_PREFIXES: usize = 20_000;

/// `(f4(v4), f6(v6))`, the two on separate threads when both families are large (a set of real
/// geolocation data is half IPv6): the compile uses both cores where it helps.
fn both<A: Send + AsRef<[(u128, u8, u32)]>, B: Send + AsRef<[(u128, u8, u32)]>, R4: Send, R6: Send>(
    v4: A,
    v6: B,
    f4: impl FnOnce(A) -> R4 + Send,
    f6: impl FnOnce(B) -> R6 + Send,
) -> (R4, R6) {
    if v4.as_ref().len() < PARALLEL_PREFIXES || v6.as_ref().len() < PARALLEL_PREFIXES {
        return (f4(v4), f6(v6));
    }
    std::thread::scope(|s| {
        let h6 = s.spawn(move || f6(v6));
        let r4 = f4(v4);
        (r4, h6.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    })
}

/// Replaces two sibling prefixes that select the same bitmap by their parent, and drops any
/// prefix that selects the same bitmap as its nearest enclosing one (or, without one, as a miss:
/// `miss_id`), repeatedly. Each step leaves the longest-prefix-match answer for every address
/// unchanged, so a blocklist of adjacent networks shrinks to the few prefixes that cover it.
/// Addresses are left-aligned in a u128 (IPv4 in the top 32 bits).
fn merge_siblings(entries: Vec<(u128, u8, u32)>, miss_id: u32) -> Vec<(u128, u8, u32)> {
    let mut by_prefix: HashMap<(u128, u8), u32> = entries.iter().map(|&(a, l, id)| ((a, l), id)).collect();
    let bit = |len: u8| -> u128 { 1u128 << (128 - len as u32) };
    let parent = |a: u128, len: u8| -> u128 { if len <= 1 { 0 } else { a & (u128::MAX << (129 - len as u32)) } };
    let max_len = entries.iter().map(|e| e.1).max().unwrap_or(0);
    // Longest first, so merged parents are examined at their own length.
    let mut by_len: Vec<Vec<u128>> = vec![Vec::new(); max_len as usize + 1];
    for &(a, l, _) in &entries {
        by_len[l as usize].push(a);
    }
    for len in (1..=max_len).rev() {
        let level = std::mem::take(&mut by_len[len as usize]);
        for a in level {
            let Some(&id) = by_prefix.get(&(a, len)) else { continue };
            let sibling = a ^ bit(len);
            let p = parent(a, len);
            if by_prefix.get(&(sibling, len)) != Some(&id) || by_prefix.contains_key(&(p, len - 1)) {
                continue;
            }
            by_prefix.remove(&(a, len));
            by_prefix.remove(&(sibling, len));
            // The nearest enclosing prefix decides whether the merged parent is needed at all.
            let enclosing = (0..len - 1)
                .rev()
                .find_map(|l| by_prefix.get(&(parent(p, l + 1), l)).copied())
                .unwrap_or(miss_id);
            if enclosing != id {
                by_prefix.insert((p, len - 1), id);
                by_len[len as usize - 1].push(p);
            }
        }
    }
    let mut out: Vec<(u128, u8, u32)> = by_prefix.into_iter().map(|((a, l), id)| (a, l, id)).collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded generator (splitmix64) for the randomized tables below: the rules crate keeps
    /// its dependency tree free of libc, which `rand` would bring even as a dev-dependency.
    struct TestRng(u64);

    impl TestRng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn u32(&mut self) -> u32 {
            self.next() as u32
        }
        fn u128(&mut self) -> u128 {
            (u128::from(self.next()) << 64) | u128::from(self.next())
        }
    }
    use crate::parse;
    use std::path::Path;

    fn compile_str(s: &str) -> Image {
        compile(&parse(Path::new("t.toml"), s).unwrap()).unwrap()
    }

    #[test]
    fn nested_prefixes_inherit_and_redundant_ones_drop() {
        let img = compile_str(
            r#"default = "pass"
            [[rule]]
            action = "drop"
            src = ["10.0.0.0/8", "10.1.0.0/16"]
            [[rule]]
            action = "pass"
            src = ["10.1.2.0/24"]
            "#,
        );
        // 10.1.0.0/16 selects the same rules as 10.0.0.0/8, so only /8 and /24 remain.
        let t = img.src_v4.as_ref().unwrap();
        assert_eq!(t.prefixes, 2);
        let at = |a: [u8; 4]| lookup_direct(t, u32::from_be_bytes(a));
        assert_eq!(img.bitmaps[at([10, 9, 9, 9]) as usize].words[0], 0b01);
        assert_eq!(img.bitmaps[at([10, 1, 2, 3]) as usize].words[0], 0b11);
        assert_eq!(img.bitmaps[at([11, 0, 0, 1]) as usize].words[0], 0b00);
    }

    /// The longest-prefix-match answer of a table, by brute force.
    fn lpm(table: &[(u128, u8, u32)], addr: u128, miss: u32) -> u32 {
        table
            .iter()
            .filter(|(a, l, _)| *l == 0 || (a ^ addr) >> (128 - *l as u32) == 0)
            .max_by_key(|(_, l, _)| *l)
            .map_or(miss, |e| e.2)
    }

    fn lookup_direct(t: &DirectTable, a: u32) -> u32 {
        t.lookup(a)
    }

    #[test]
    fn direct_table_answers_like_longest_prefix_match() {
        let mut rng = TestRng(5);
        for _ in 0..50 {
            let mut table: Vec<(u128, u8, u32)> = Vec::new();
            for _ in 0..1 + rng.below(59) {
                let len = rng.below(33) as u8;
                // Few distinct top bits so prefixes nest.
                let a: u32 = (rng.u32() & 0x0301_0f0f) | 0x0a00_0000;
                let a = if len == 0 { 0 } else { a & (u32::MAX << (32 - len)) };
                let addr = (a as u128) << 96;
                if !table.iter().any(|e| e.0 == addr && e.1 == len) {
                    table.push((addr, len, 2 + rng.below(7) as u32));
                }
            }
            let t = direct_table(&table, 1).unwrap();
            // One chunk per /16 holding longer prefixes, one leaf per /24 holding longer ones.
            let distinct = |min: u8, shift: u32| {
                table.iter().filter(|e| e.1 > min).map(|e| (e.0 >> 96) as u32 >> shift).collect::<std::collections::HashSet<_>>().len() as u32
            };
            assert_eq!((t.chunks, t.leaves), (distinct(16, 16), distinct(24, 8)), "{table:?}");
            for _ in 0..2000 {
                let a: u32 = (rng.u32() & 0x0301_0f0f) | 0x0a00_0000;
                let a = if rng.below(10) == 0 { rng.u32() } else { a };
                assert_eq!(lookup_direct(&t, a), lpm(&table, (a as u128) << 96, 1), "{table:?} {a:#x}");
            }
        }
    }

    /// IPv6 tables answer exactly as a longest-prefix match over their entries, for sets of
    /// every shape: host routes spread over the space or packed in one /64, nested chains,
    /// prefixes ending inside a byte, short ones (/1 to /16), and mixes. Addresses are drawn
    /// inside, beside (one bit off) and outside the prefixes.
    #[test]
    fn v6_table_answers_like_longest_prefix_match() {
        let mut rng = TestRng(6);
        let mut directs = 0;
        for round in 0..60 {
            let n = 1 + rng.below(if round % 3 == 0 { 3000 } else { 60 }) as usize;
            let shape = round % 5;
            let mut table: Vec<(u128, u8, u32)> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            while table.len() < n {
                let (a, len) = match shape {
                    0 => (rng.u128(), 128),
                    1 => (0x2001_0db8_u128 << 96 | rng.u128() & 0xffff, 120 + rng.below(9) as u8),
                    2 => {
                        let len = 17 + rng.below(112) as u8;
                        (0x2001_0db8_u128 << 96 | (rng.u128() & 0x0f0f_000f_0000_00ff_0000_0000), len)
                    }
                    3 => (rng.u128(), 1 + rng.below(20) as u8),
                    _ => (rng.u128() & !(0xffff_u128 << 100), rng.below(129) as u8),
                };
                let a = if len == 0 { 0 } else { a & (u128::MAX << (128 - len as u32)) };
                if seen.insert((a, len)) {
                    table.push((a, len, 2 + rng.below(40) as u32));
                }
            }
            let t = v6_table(&table, 1).unwrap();
            for _ in 0..4000 {
                let (a, len, _) = table[rng.below(table.len() as u64) as usize];
                let inside = a | (rng.u128() >> len.clamp(1, 127));
                let addr = match rng.below(4) {
                    0 => rng.u128(),
                    1 => inside ^ (1u128 << rng.below(128)),
                    _ => inside,
                };
                assert_eq!(t.lookup(addr), lpm(&table, addr, 1), "round {round} address {addr:#x}");
            }
            // The walk: two lines per prefix at most on these shapes (host routes take one).
            assert!(t.lines.len() <= 2 * table.len() + 2, "round {round}: {} lines for {} prefixes", t.lines.len(), table.len());
            directs += t.directs;
        }
        // Dense nodes (host routes packed in one /64, many short prefixes) are stored direct.
        assert!(directs > 0, "{directs} direct nodes");
    }

    #[test]
    fn leaves_are_compact_and_answer_every_byte() {
        // Three host routes in one /24: one leaf of one line (7 runs at most inline).
        let a = |o: [u8; 4]| (u32::from_be_bytes(o) as u128) << 96;
        let table = vec![(a([10, 0, 0, 0]), 16, 2), (a([10, 0, 1, 3]), 32, 3), (a([10, 0, 1, 9]), 32, 4), (a([10, 0, 1, 255]), 32, 3)];
        let t = direct_table(&table, 1).unwrap();
        assert_eq!((t.chunks, t.leaves, t.lines.len()), (1, 1, 1));
        for b in 0..=255u8 {
            assert_eq!(t.lookup(u32::from_be_bytes([10, 0, 1, b])), lpm(&table, a([10, 0, 1, b]), 1), "byte {b}");
        }
        // Every byte its own value: 256 runs, 7 inline and 249 in 16 further lines.
        let table: Vec<(u128, u8, u32)> = (0..=255u8).map(|b| (a([10, 0, 2, b]), 32, 2 + b as u32 % 5 + (b as u32 / 5) % 2 * 5)).collect();
        let t = direct_table(&table, 1).unwrap();
        assert_eq!((t.leaves, t.lines.len()), (1, 17));
        for b in 0..=255u8 {
            assert_eq!(t.lookup(u32::from_be_bytes([10, 0, 2, b])), lpm(&table, a([10, 0, 2, b]), 1), "byte {b}");
        }
        assert_eq!(t.lookup(u32::from_be_bytes([10, 0, 3, 0])), 1);
    }

    #[test]
    fn leaf_lines_never_exceed_prefixes() {
        // The memory bound of `dir`: a table of P prefixes needs at most P leaf lines.
        let mut rng = TestRng(11);
        for _ in 0..200 {
            let mut table: Vec<(u128, u8, u32)> = Vec::new();
            let block = rng.u32() & 0xffff_f000;
            for _ in 0..1 + rng.below(300) {
                let len = 25 + rng.below(8) as u8;
                let addr = (block | (rng.u32() & 0xfff)) & (u32::MAX << (32 - len));
                let addr = (addr as u128) << 96;
                if !table.iter().any(|e| e.0 == addr && e.1 == len) {
                    table.push((addr, len, 2 + rng.below(4) as u32));
                }
            }
            let t = direct_table(&table, 1).unwrap();
            assert!(t.lines.len() <= table.len(), "{} lines for {} prefixes", t.lines.len(), table.len());
            for _ in 0..500 {
                let x = block | (rng.u32() & 0xfff);
                assert_eq!(t.lookup(x), lpm(&table, (x as u128) << 96, 1));
            }
        }
    }

    #[test]
    fn sibling_merge_keeps_every_answer() {
        let mut rng = TestRng(3);
        for _ in 0..300 {
            let mut table: Vec<(u128, u8, u32)> = Vec::new();
            for _ in 0..1 + rng.below(39) {
                let len = rng.below(9) as u8;
                let addr = if len == 0 { 0 } else { (rng.u128() >> 120 << 120) & (u128::MAX << (128 - len as u32)) };
                if !table.iter().any(|e| e.0 == addr && e.1 == len) {
                    table.push((addr, len, rng.below(3) as u32));
                }
            }
            let merged = merge_siblings(table.clone(), 0);
            for top in 0..=255u128 {
                let addr = top << 120;
                assert_eq!(lpm(&table, addr, 0), lpm(&merged, addr, 0), "table {table:?} merged {merged:?} addr {top}");
            }
            assert!(merged.len() <= table.len());
        }
    }

    /// Excluded prefixes (`!`), nested every way with positive ones and with other rules',
    /// compile to tables whose longest match gives exactly the rules the matcher accepts.
    #[test]
    fn excluded_prefixes_answer_like_the_matcher() {
        let mut rng = TestRng(11);
        let v4 = |rng: &mut TestRng| {
            let len = rng.below(33) as u32;
            let a = (rng.u32() & 0x0301_0f0f) | 0x0a00_0000;
            let a = if len == 0 { 0 } else { a & (u32::MAX << (32 - len)) };
            format!("{}/{len}", std::net::Ipv4Addr::from(a))
        };
        let v6 = |rng: &mut TestRng| {
            let len = rng.below(129) as u32;
            let a = (rng.u128() & (0xff0f_u128 << 100 | 0xffff)) | (0x2001_0db8_u128 << 96);
            let a = if len == 0 { 0 } else { a & (u128::MAX << (128 - len)) };
            format!("{}/{len}", std::net::Ipv6Addr::from(a))
        };
        for _ in 0..40 {
            let mut text = String::from("default = \"pass\"\n");
            for _ in 0..1 + rng.below(8) {
                text.push_str("[[rule]]\naction = \"drop\"\n");
                if rng.below(5) == 0 {
                    continue;
                }
                let items: Vec<String> = (0..1 + rng.below(4))
                    .map(|_| {
                        let net = if rng.below(2) == 0 { v4(&mut rng) } else { v6(&mut rng) };
                        if rng.below(2) == 0 { format!("\"!{net}\"") } else { format!("\"{net}\"") }
                    })
                    .collect();
                text.push_str(&format!("src = [{}]\n", items.join(", ")));
            }
            let rs = parse(Path::new("t.toml"), &text).unwrap();
            let img = compile(&rs).unwrap();
            if img.header.fields & field::SRC == 0 {
                continue; // no rule constrains the source: nothing is looked up
            }
            let miss = img.header.absent[absent::SRC];
            for _ in 0..3000 {
                let addr: IpAddr = if rng.below(2) == 0 {
                    let a = if rng.below(8) == 0 { rng.u32() } else { (rng.u32() & 0x0301_0f0f) | 0x0a00_0000 };
                    IpAddr::V4(a.into())
                } else {
                    let a = if rng.below(8) == 0 { rng.u128() } else { (rng.u128() & (0xff0f_u128 << 100 | 0xffff)) | (0x2001_0db8_u128 << 96) };
                    IpAddr::V6(a.into())
                };
                let id = match (addr, &img.src_v4) {
                    (IpAddr::V4(a), Some(t)) => lookup_direct(t, u32::from(a)),
                    (IpAddr::V4(_), None) => miss,
                    (IpAddr::V6(a), _) => img.src_v6.as_ref().map_or(miss, |t| t.lookup(u128::from(a))),
                };
                let got = img.bitmaps[id as usize];
                for (i, r) in rs.rules.iter().enumerate() {
                    let want = r.src.as_ref().is_none_or(|l| l.check(addr, "src").is_ok());
                    assert_eq!(got.words[0] >> i & 1 == 1, want, "rule {i} address {addr}\n{text}");
                }
            }
        }
    }

    /// The lists of `rs`'s rules for the source, their sets keeping only the IPv4 prefixes that
    /// overlap the /16s `tops` (what the delta path of `loader set` gives [`v4_regions`]; inline
    /// prefixes stay whole: a list cut to nothing would mean "any address").
    fn restricted(rs: &Ruleset, tops: &[u16]) -> Vec<Option<AddrList>> {
        let overlaps = |n: &ipnet::IpNet| match n {
            ipnet::IpNet::V4(n) => {
                let (a, l) = (u32::from(n.network()), n.prefix_len());
                tops.iter().any(|&t| if l <= 16 { (u32::from(t) << 16) & (u32::MAX.checked_shl(32 - l as u32).unwrap_or(0)) == a } else { a >> 16 == u32::from(t) })
            }
            ipnet::IpNet::V6(_) => true,
        };
        let cut = |l: &AddrList| AddrList {
            inline: l.inline.clone(),
            sets: l.sets.iter().map(|(n, s)| (n.clone(), std::sync::Arc::new(s.iter().copied().filter(overlaps).collect()))).collect(),
            except: None,
        };
        rs.rules
            .iter()
            .map(|r| r.src.as_ref().map(|l| AddrList { except: l.except.as_deref().map(|e| Box::new(cut(e))), ..cut(l) }))
            .collect()
    }

    #[test]
    fn regions_from_restricted_lists_answer_like_the_whole_table() {
        let mut rng = TestRng(23);
        for round in 0..30 {
            // Prefixes within a few /16s of 10.0.0.0/8, nested and excluded, in sets and inline.
            let v4 = |rng: &mut TestRng| {
                let len = [8, 12, 16, 20, 24, 24, 28, 32, 32, 32][rng.below(10) as usize];
                let a = (rng.u32() & 0x0003_ffff) | 0x0a00_0000;
                format!("{}/{len}", std::net::Ipv4Addr::from(a & (u32::MAX << (32 - len))))
            };
            let set: Vec<String> = (0..40 + rng.below(200)).map(|_| format!("\"{}\"", v4(&mut rng))).collect();
            let mut text = format!("default = \"pass\"\n[sets.feed]\nprefixes = [{}]\n", set.join(", "));
            for i in 0..1 + rng.below(5) {
                text.push_str("[[rule]]\naction = \"drop\"\n");
                let mut items = vec![if i % 2 == 0 { "\"@feed\"".to_string() } else { format!("\"{}\"", v4(&mut rng)) }];
                if rng.below(3) == 0 {
                    items.push(format!("\"!{}\"", v4(&mut rng)));
                }
                if round % 3 == 0 && i == 0 {
                    items.push("\"2001:db8::/32\"".into());
                }
                text.push_str(&format!("src = [{}]\n", items.join(", ")));
            }
            let rs = parse(Path::new("t.toml"), &text).unwrap();
            let img = compile(&rs).unwrap();
            let t = img.src_v4.as_ref().unwrap();
            let tops: Vec<u16> = (0..3).map(|_| 0x0a00 | rng.below(4) as u16).chain([0x0b00]).collect();
            let lists = restricted(&rs, &tops);
            let (bitmaps, regions) = v4_regions(&lists.iter().map(Option::as_ref).collect::<Vec<_>>(), &tops).unwrap();
            for (top, region) in &regions {
                for low in 0..=0xffffu32 {
                    let a = u32::from(*top) << 16 | low;
                    let id = match region {
                        Region::Uniform(id) => *id,
                        Region::Chunk(slots) => match &slots[(low >> 8) as usize] {
                            Slot::Value(id) => *id,
                            Slot::Leaf(values) => values[(low & 0xff) as usize],
                        },
                    };
                    assert_eq!(bitmaps[id as usize], img.bitmaps[t.lookup(a) as usize], "{}\n{text}", std::net::Ipv4Addr::from(a));
                }
            }
        }
    }

    #[test]
    fn v6_regions_from_restricted_lists_answer_like_the_whole_table() {
        let mut rng = TestRng(29);
        for round in 0..30 {
            // Prefixes within a few /16s of 2001::/14, nested and excluded, in sets and inline.
            let v6 = |rng: &mut TestRng| {
                let len = [12, 16, 20, 32, 48, 48, 56, 64, 64, 128, 128, 128][rng.below(12) as usize];
                let a = (0x2001u128 + rng.below(4) as u128) << 112 | (rng.u128() >> 16 & ((1 << 112) - 1));
                format!("{}/{len}", std::net::Ipv6Addr::from(a & (u128::MAX << (128 - len))))
            };
            let set: Vec<String> = (0..40 + rng.below(200)).map(|_| format!("\"{}\"", v6(&mut rng))).collect();
            let mut text = format!("default = \"pass\"\n[sets.feed]\nprefixes = [{}]\n", set.join(", "));
            for i in 0..1 + rng.below(5) {
                text.push_str("[[rule]]\naction = \"drop\"\n");
                let mut items = vec![if i % 2 == 0 { "\"@feed\"".to_string() } else { format!("\"{}\"", v6(&mut rng)) }];
                if rng.below(3) == 0 {
                    items.push(format!("\"!{}\"", v6(&mut rng)));
                }
                if round % 3 == 0 && i == 0 {
                    items.push("\"10.0.0.0/8\"".into());
                }
                text.push_str(&format!("src = [{}]\n", items.join(", ")));
            }
            let rs = parse(Path::new("t.toml"), &text).unwrap();
            let img = compile(&rs).unwrap();
            let whole = img.src_v6.as_ref().unwrap();
            let mut tops: Vec<u16> = (0..3).map(|_| 0x2001 + rng.below(4) as u16).chain([0x2100]).collect();
            tops.sort_unstable();
            tops.dedup();
            let overlaps = |n: &ipnet::IpNet| match n {
                ipnet::IpNet::V4(_) => true,
                ipnet::IpNet::V6(n) => {
                    let (a, l) = (u128::from(n.network()), n.prefix_len() as u32);
                    tops.iter().any(|&t| if l <= 16 { (u128::from(t) << 112) & (u128::MAX.checked_shl(128 - l).unwrap_or(0)) == a } else { (a >> 112) as u16 == t })
                }
            };
            let cut = |l: &AddrList| AddrList {
                inline: l.inline.clone(),
                sets: l.sets.iter().map(|(n, s)| (n.clone(), std::sync::Arc::new(s.iter().copied().filter(overlaps).collect()))).collect(),
                except: None,
            };
            let lists: Vec<Option<AddrList>> = rs.rules.iter().map(|r| r.src.as_ref().map(|l| AddrList { except: l.except.as_deref().map(|e| Box::new(cut(e))), ..cut(l) })).collect();
            let regions = v6_regions(&lists.iter().map(Option::as_ref).collect::<Vec<_>>(), &tops);
            // Ids as they are (a remap that is the identity), lines written after 1000 others.
            let remap: Vec<u32> = (0..regions.bitmaps.len() as u32).collect();
            let base = 1000;
            let (entries, lines) = regions.subtrees(&remap, base).unwrap();
            let mut part = V6Table { top: vec![u32::MAX; dir::TOP_ENTRIES as usize], lines: vec![DirLine::default(); base as usize], prefixes: 0, nodes: 0, directs: 0, paths: 0 };
            part.lines.extend(lines);
            for (top, e) in entries {
                part.top[top as usize] = e;
            }
            for &top in &tops {
                for k in 0..2000 {
                    // Inside the set's prefixes (one bit beside them too), and anywhere in the /16.
                    let a = match (k % 3, &rs.sets["feed"][..]) {
                        (0, [..]) => u128::from(top) << 112 | rng.u128() >> 16,
                        (_, set) => match set[rng.below(set.len() as u64) as usize] {
                            ipnet::IpNet::V6(n) => (u128::from(top) << 112 | (u128::from(n.network()) & ((1 << 112) - 1))) ^ (rng.below(2) as u128) << (128 - n.prefix_len().max(17) as u32),
                            ipnet::IpNet::V4(_) => u128::from(top) << 112,
                        },
                    };
                    assert_eq!(regions.bitmaps[part.lookup(a) as usize], img.bitmaps[whole.lookup(a) as usize], "{}\n{text}", std::net::Ipv6Addr::from(a));
                }
            }
        }
    }

    #[test]
    fn excluded_ports_and_protocols_fill_complements() {
        let img = compile_str(
            r#"default = "drop"
            [[rule]]
            action = "pass"
            proto = "!udp"
            [[rule]]
            action = "pass"
            proto = "tcp"
            dport = ["1000-2000", "!1500"]
            [[rule]]
            action = "pass"
            proto = "icmp"
            icmp_type = ["echo-request", "echo-reply"]
            icmp_code = [0, 1]
            "#,
        );
        let bm = |i: u32| img.bitmaps[img.fields[i as usize].bitmap as usize].words[0];
        assert_eq!(bm(PROTO_BASE + 17) & 1, 0);
        assert_eq!(bm(PROTO_BASE + 6) & 1, 1);
        assert_eq!(bm(PROTO_BASE) & 1, 1, "protocol 0 is not udp");
        assert_eq!([bm(DPORT_BASE + 999), bm(DPORT_BASE + 1000), bm(DPORT_BASE + 1500), bm(DPORT_BASE + 2000)].map(|b| b >> 1 & 1), [0, 1, 0, 1]);
        let icmp = |t: u32, c: u32| bm(ICMP_BASE + (t << 8 | c)) >> 2 & 1;
        assert_eq!([icmp(8, 0), icmp(0, 1), icmp(8, 2), icmp(3, 0)], [1, 1, 0, 0]);
    }

    #[test]
    fn adjacent_networks_merge() {
        let img = compile_str(
            r#"default = "pass"
            [[rule]]
            action = "drop"
            src = ["192.0.2.0/25", "192.0.2.128/25", "198.51.100.0/24", "198.51.101.0/24"]
            "#,
        );
        // Two prefixes remain: 192.0.2.0/24 and 198.51.100.0/23.
        assert_eq!(img.src_v4.as_ref().unwrap().prefixes, 2);
    }

    #[test]
    fn unused_fields_are_not_looked_up() {
        let img = compile_str(
            r#"default = "drop"
            [[rule]]
            action = "pass"
            dst = ["2001:db8::/32"]
            "#,
        );
        assert_eq!(img.header.fields, field::DST);
        assert_eq!(img.dst_v6.as_ref().unwrap().prefixes, 1);
        assert!(img.src_v4.is_none());
    }

    /// A ruleset that changes only a port rule has the address key of the one before, and
    /// compiled around the earlier compile's address stage it is the image a full compile gives
    /// (same bitmap ids, fields, header), without tables of its own.
    #[test]
    fn reused_address_tables_give_the_full_compile() {
        let text = |port: u16, extra: &str| {
            format!(
                "default = \"pass\"\n[sets.block]\nprefixes = [\"192.0.2.0/24\", \"198.51.100.7\", \"2001:db8::/48\"{extra}]\n\
                 [[rule]]\naction = \"pass\"\nproto = \"tcp\"\ndport = [{port}]\n\
                 [[rule]]\naction = \"drop\"\nsrc = [\"@block\", \"!192.0.2.128/25\"]\n\
                 [[rule]]\naction = \"drop\"\ndst = [\"@block\"]\nproto = \"udp\"\n"
            )
        };
        let before = parse(Path::new("t.toml"), &text(22, "")).unwrap();
        let after = parse(Path::new("t.toml"), &text(2222, "")).unwrap();
        let other_set = parse(Path::new("t.toml"), &text(22, ", \"203.0.113.9\"")).unwrap();
        assert_eq!(address_key(&before), address_key(&after));
        assert_ne!(address_key(&before), address_key(&other_set));

        let first = compile(&before).unwrap();
        let reuse = Reuse { summary: first.addr.clone(), bitmaps: first.bitmaps[..first.addr.bitmaps as usize].to_vec() };
        let reused = compile_with(&after, Some(&reuse)).unwrap();
        let full = compile(&after).unwrap();
        assert!(reused.tables_reused && !full.tables_reused);
        assert!(reused.src_v4.is_none() && reused.src_v6.is_none() && reused.dst_v4.is_none());
        assert_eq!(reused.bitmaps, full.bitmaps);
        assert_eq!(reused.fields, full.fields);
        assert_eq!(reused.header, full.header);
        assert_eq!(reused.addr, full.addr);
        assert_eq!(reused.prefix_count(), full.prefix_count());
        // The tables the reused image shares are the ones its ids were made for.
        let (a, b) = (first.src_v4.as_ref().unwrap(), full.src_v4.as_ref().unwrap());
        assert_eq!((&a.entries, a.lines.len()), (&b.entries, b.lines.len()));
        assert_eq!(first.src_v6, full.src_v6);
        assert_eq!(first.dst_v6, full.dst_v6);
    }

    #[test]
    fn port_ranges_fill_segments() {
        let img = compile_str(
            r#"default = "drop"
            [[rule]]
            action = "pass"
            proto = "tcp"
            dport = [22, "8000-8100"]
            "#,
        );
        let at = |p: u32| img.bitmaps[img.fields[(DPORT_BASE + p) as usize].bitmap as usize].words[0];
        assert_eq!(at(22), 1);
        assert_eq!(at(23), 0);
        assert_eq!(at(8000), 1);
        assert_eq!(at(8100), 1);
        assert_eq!(at(8101), 0);
        assert_eq!(img.bitmaps[img.header.absent[absent::DPORT] as usize].words[0], 0);
    }
}
