//! The rules language (TOML): parsing, validation and diagnostics with file:line:column.
//!
//! ```toml
//! version = "2026-11-23.1"      # a label, shown by stats and kept in history
//! default = "drop"              # action when no rule matches
//! [options]
//! fragments = "l3-only"         # non-first fragments: l3-only | drop | pass
//! icmpv6_nd = "always-pass"     # ICMPv6 133-137 (ND, RA, redirect): always-pass | rules
//! [sets.blocklist]
//! prefixes = ["192.0.2.0/24"]   # and/or
//! file = "blocklist.txt"        # one CIDR a line, '#' comments; relative to this file
//! [[rule]]                      # in priority order: the first match wins
//! name = "ssh"
//! action = "pass"
//! src = ["198.51.100.0/24", "@blocklist"]
//! proto = "tcp"                 # tcp, udp, icmp, icmpv6, a number, "any", or a list
//! dport = [22, "8000-8100"]
//! tcp_flags = "syn !ack"
//! [[rule]]                      # decided in userspace by who owns the local socket
//! name = "https-only-nginx"
//! action = "pass"
//! proto = "tcp"
//! dport = 443
//! owner = { process = "nginx", user = "www-data" }   # process exe uid user unit cgroup
//! [escalation]
//! pending = "drop"              # while the owner is looked up: drop (TCP retries) | pass
//! verdict_ttl = "60s"           # how long a flow keeps its owner verdict
//! retry = "1s"                  # re-escalate a flow still undecided after this
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    ops::{Range, RangeInclusive},
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::{
    owner::{OwnerMatch, OwnerSpec, SYSTEM_SLICE, parse_uid_range},
    packet::PacketSpec,
};

pub use xdpfw_common::proto::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

/// A position in a source file, 1-based.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A rules file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
#[error("{location}: error: {message}")]
pub struct RulesError {
    pub location: Location,
    pub message: String,
}

/// Something legal but probably not what the author meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub location: Location,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.location, self.message)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pass,
    Drop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Drop => "drop",
        }
    }
    pub fn kernel(self) -> u32 {
        match self {
            Action::Pass => xdpfw_common::action::PASS,
            Action::Drop => xdpfw_common::action::DROP,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FragmentPolicy {
    /// Non-first fragments are classified on addresses and protocol only.
    L3Only,
    Drop,
    Pass,
}

/// What happens to ICMPv6 neighbour discovery and router messages (types 133-137).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NdPolicy {
    /// They pass before any rule is looked at, so no ruleset can cut a host off its link.
    #[default]
    AlwaysPass,
    /// They are classified by the rules like any ICMPv6 (rogue router advertisements and
    /// redirects can be dropped; so can the host's own neighbour discovery).
    Rules,
}

/// Prefixes of one rule field: inline CIDRs plus named sets (shared, not copied), and the
/// prefixes written with `!`, which the field excludes.
///
/// An address satisfies the field when it is in one of the positive prefixes (or none was
/// written: `src = ["!@office"]` is "any address but the office's") and in none of the excluded
/// ones, whichever is longer: `["10.0.0.0/8", "!10.1.0.0/16"]` is 10/8 but 10.1/16.
#[derive(Clone, Debug, Default)]
pub struct AddrList {
    pub inline: Vec<IpNet>,
    pub sets: Vec<(String, Arc<Vec<IpNet>>)>,
    /// The excluded prefixes (`!` items); its own `except` is always `None`.
    pub except: Option<Box<AddrList>>,
}

impl AddrList {
    /// Whether any positive item was written (else the field is "any address but `except`").
    pub fn has_positive(&self) -> bool {
        !self.inline.is_empty() || !self.sets.is_empty()
    }
    /// `Ok(reason)` when `addr` satisfies the field, `Err(reason)` when it does not.
    pub fn check(&self, addr: IpAddr, field: &str) -> Result<String, String> {
        let describe = |net: IpNet, set: Option<&str>| match set {
            Some(set) => format!("{net} of set @{set}"),
            None => net.to_string(),
        };
        if let Some((net, set)) = self.except.as_ref().and_then(|e| e.find(addr)) {
            return Err(format!("{field} {addr} is in the excluded !{}", describe(net, set)));
        }
        let excluded = || match &self.except {
            Some(_) => " and in no excluded prefix",
            None => "",
        };
        if !self.has_positive() {
            return Ok(format!("{field} {addr} is in no excluded prefix"));
        }
        match self.find(addr) {
            Some((net, set)) => Ok(format!("{field} {addr} is in {}{}", describe(net, set), excluded())),
            None => Err(format!("{field} {addr} is in none of the prefixes")),
        }
    }
    /// The positive prefixes (the excluded ones are `except`'s).
    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.inline.iter().chain(self.sets.iter().flat_map(|(_, s)| s.iter()))
    }
    /// The first prefix that contains `addr`, and the set it came from.
    pub fn find(&self, addr: IpAddr) -> Option<(IpNet, Option<&str>)> {
        if let Some(n) = self.inline.iter().find(|n| n.contains(&addr)) {
            return Some((*n, None));
        }
        self.sets.iter().find_map(|(name, set)| {
            set.iter().find(|n| n.contains(&addr)).map(|n| (*n, Some(name.as_str())))
        })
    }
    /// Positive prefixes.
    pub fn len(&self) -> usize {
        self.inline.len() + self.sets.iter().map(|(_, s)| s.len()).sum::<usize>()
    }
    /// Positive and excluded prefixes.
    pub fn total_len(&self) -> usize {
        self.len() + self.except.as_ref().map_or(0, |e| e.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// TCP flag bits as they appear in the header's flags byte.
pub const TCP_FLAG_NAMES: [(&str, char, u8); 8] = [
    ("fin", 'F', 0x01),
    ("syn", 'S', 0x02),
    ("rst", 'R', 0x04),
    ("psh", 'P', 0x08),
    ("ack", 'A', 0x10),
    ("urg", 'U', 0x20),
    ("ece", 'E', 0x40),
    ("cwr", 'C', 0x80),
];

/// The bit of a TCP flag by its letter (`S`, case-insensitive).
pub fn tcp_flag_by_letter(c: char) -> Option<u8> {
    TCP_FLAG_NAMES.iter().find(|(_, l, _)| *l == c.to_ascii_uppercase()).map(|(_, _, b)| *b)
}

/// The bit of a TCP flag by its name (`syn`, case-insensitive).
pub fn tcp_flag_by_name(name: &str) -> Option<u8> {
    TCP_FLAG_NAMES.iter().find(|(n, _, _)| n.eq_ignore_ascii_case(name)).map(|(_, _, b)| *b)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFlagsMatch {
    /// Bits that must be set.
    pub set: u8,
    /// Bits that must be clear.
    pub clear: u8,
}

impl TcpFlagsMatch {
    pub fn matches(&self, flags: u8) -> bool {
        flags & self.set == self.set && flags & self.clear == 0
    }
}

/// ICMP or ICMPv6 types (any of) and optionally codes (any of).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpMatch {
    pub types: Vec<u8>,
    pub codes: Option<Vec<u8>>,
}

impl IcmpMatch {
    pub fn matches(&self, icmp_type: u8, code: u8) -> bool {
        self.types.contains(&icmp_type) && self.codes.as_ref().is_none_or(|c| c.contains(&code))
    }
}

/// Ports and ranges (any of) and the excluded ones (`!`): a port satisfies the condition when it
/// is in a range (or no range was written: `dport = "!22"` is "any port but 22") and in no
/// excluded range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMatch {
    /// `None` when only exclusions were written.
    pub ranges: Option<Vec<RangeInclusive<u16>>>,
    pub except: Vec<RangeInclusive<u16>>,
}

impl PortMatch {
    pub fn matches(&self, port: u16) -> bool {
        self.ranges.as_ref().is_none_or(|r| r.iter().any(|r| r.contains(&port))) && !self.except.iter().any(|r| r.contains(&port))
    }
    /// `Ok(reason)` or `Err(reason)` for `port`.
    pub fn check(&self, port: u16, field: &str) -> Result<String, String> {
        let show = |r: &RangeInclusive<u16>| if r.start() == r.end() { r.start().to_string() } else { format!("{}-{}", r.start(), r.end()) };
        if let Some(r) = self.except.iter().find(|r| r.contains(&port)) {
            return Err(format!("{field} {port} is in the excluded !{}", show(r)));
        }
        let but = if self.except.is_empty() { String::new() } else { format!(" and not in {}", self.except.iter().map(|r| format!("!{}", show(r))).collect::<Vec<_>>().join(", ")) };
        match &self.ranges {
            None => Ok(format!("{field} {port} is any port{but}")),
            Some(ranges) => match ranges.iter().find(|r| r.contains(&port)) {
                Some(r) => Ok(format!("{field} {port} is in {}{but}", show(r))),
                None => Err(format!("{field} {port} is in none of the ranges")),
            },
        }
    }
    /// The ports that satisfy the condition, as sorted disjoint ranges (for the compiler and the
    /// lints).
    pub fn effective(&self) -> Vec<RangeInclusive<u32>> {
        /// Sorted, merged, non-empty ranges.
        fn normalize(ranges: &[RangeInclusive<u16>]) -> Vec<(u32, u32)> {
            let mut v: Vec<(u32, u32)> = ranges.iter().filter(|r| !r.is_empty()).map(|r| (*r.start() as u32, *r.end() as u32)).collect();
            v.sort_unstable();
            let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
            for (lo, hi) in v {
                match out.last_mut() {
                    Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
                    _ => out.push((lo, hi)),
                }
            }
            out
        }
        let pos = match &self.ranges {
            None => vec![(0, 65535)],
            Some(r) => normalize(r),
        };
        let except = normalize(&self.except);
        let mut out = Vec::new();
        for (mut lo, hi) in pos {
            for &(elo, ehi) in &except {
                if ehi < lo || elo > hi {
                    continue;
                }
                if elo > lo {
                    out.push(lo..=elo - 1);
                }
                lo = ehi + 1;
            }
            if lo <= hi {
                out.push(lo..=hi);
            }
        }
        out
    }
}

/// A rule's rate limit (`limit = { rate = "100/s", burst = 200, per = "source/24" }`): the rule
/// matches packets within it; beyond it the rule does not match and a later rule decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Packets (or bytes) a period.
    pub rate: u64,
    /// The period in seconds (1, 60, 3600).
    pub period_s: u64,
    /// The rate counts bytes (of the frame), not packets.
    pub bytes: bool,
    /// Packets (or bytes) that may come at once after a quiet time.
    pub burst: u64,
    /// One bucket per source prefix of these lengths (IPv4, IPv6), not one for the rule.
    pub per_source: Option<(u8, u8)>,
}

impl RateLimit {
    /// The kernel's form: the cost of a packet in nanoseconds of the bucket, and the burst.
    pub fn kernel(&self) -> xdpfw_common::LimitState {
        let period_ns = self.period_s as u128 * 1_000_000_000;
        let per_unit_ns = |shift: u32| ((period_ns << shift) / self.rate.max(1) as u128).max(1) as u64;
        let (interval_ns, ns_per_byte) = if self.bytes { (0, per_unit_ns(xdpfw_common::limit::BYTE_SHIFT)) } else { (per_unit_ns(0), 0) };
        let burst_ns = ((self.burst as u128 * period_ns) / self.rate.max(1) as u128).min(u64::MAX as u128 / 2) as u64;
        let (v4, v6) = self.per_source.unwrap_or((32, 128));
        xdpfw_common::LimitState {
            interval_ns,
            ns_per_byte,
            burst_ns,
            per_source: self.per_source.is_some() as u8,
            v4_prefix: v4,
            v6_prefix: v6,
            ..Default::default()
        }
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period_s {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        let what = if self.bytes { " bytes" } else { "" };
        write!(f, "{}{what}/{unit} burst {}", self.rate, self.burst)?;
        if let Some((v4, v6)) = self.per_source {
            write!(f, " per source (/{v4}, /{v6})")?;
        }
        Ok(())
    }
}

/// A rule's `log` (`log = true`, or `log = { prefix = "ssh: ", rate = "10/s", burst = 20 }`):
/// packets the rule decides are reported to the daemon's log and to `loader trace`, at most
/// `rate` a period per rule, counted in the kernel. It never changes a verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSpec {
    /// Put before each logged line (printable text, at most `MAX_LOG_PREFIX` bytes).
    pub prefix: Option<String>,
    /// Packets a period.
    pub rate: u64,
    /// The period in seconds (1, 60, 3600).
    pub period_s: u64,
    /// Packets logged at once after a quiet time.
    pub burst: u64,
}

/// The longest `log.prefix`.
pub const MAX_LOG_PREFIX: usize = 64;

impl LogSpec {
    /// `log = true`: ten packets a second per rule, bursts of ten.
    pub const DEFAULT: LogSpec = LogSpec { prefix: None, rate: 10, period_s: 1, burst: 10 };

    /// The kernel's form: the cost of one logged packet and the burst, in ns of the bucket.
    pub fn kernel(&self) -> xdpfw_common::LogLimit {
        let period_ns = self.period_s as u128 * 1_000_000_000;
        let interval_ns = (period_ns / self.rate.max(1) as u128).max(1) as u64;
        let burst_ns = ((self.burst as u128 * period_ns) / self.rate.max(1) as u128).min(u64::MAX as u128 / 2) as u64;
        xdpfw_common::LogLimit { interval_ns, burst_ns, ..Default::default() }
    }
}

impl fmt::Display for LogSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period_s {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "at most {}/{unit} burst {}", self.rate, self.burst)?;
        if let Some(p) = &self.prefix {
            write!(f, ", prefix {p:?}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub src: Option<AddrList>,
    pub dst: Option<AddrList>,
    /// Protocol numbers, any of which matches (exclusions, `!tcp`, are already taken out: the
    /// list is what the rule accepts).
    pub proto: Option<Vec<u8>>,
    pub sport: Option<PortMatch>,
    pub dport: Option<PortMatch>,
    pub icmp: Option<IcmpMatch>,
    pub tcp_flags: Option<TcpFlagsMatch>,
    /// Conditions on the local socket's owner: the kernel escalates the flows this rule would
    /// decide, and userspace evaluates them.
    pub owner: Option<OwnerMatch>,
    /// A rate limit: beyond it the rule does not match.
    pub limit: Option<RateLimit>,
    /// Connection states, any of which matches (`state = "established"`), sorted.
    pub state: Option<Vec<crate::packet::FlowState>>,
    /// VLAN ids (of the outermost tag), any of which matches; untagged packets never do. Sorted.
    pub vlan: Option<Vec<u16>>,
    /// Packets the rule decides are logged (rate-limited in the kernel).
    pub log: Option<LogSpec>,
    pub comment: Option<String>,
    pub location: Location,
}

/// A `[[test]]` of the rules file: a packet and the verdict the ruleset must give it.
#[derive(Clone, Debug)]
pub struct SelfTest {
    pub packet: PacketSpec,
    pub text: String,
    pub expect: Action,
    pub rule: Option<String>,
    /// The socket owner to decide with, for packets that owner rules decide (`None`: not given).
    pub owner: Option<OwnerSpec>,
    pub location: Location,
}

/// How flows that owner rules decide are handled (`[escalation]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EscalationOptions {
    /// The action for a flow's packets until userspace has decided it.
    pub pending: Action,
    /// How long a decided flow keeps its verdict before it is looked up again.
    pub verdict_ttl: std::time::Duration,
    /// A flow still undecided after this is escalated again.
    pub retry: std::time::Duration,
}

impl Default for EscalationOptions {
    fn default() -> Self {
        Self {
            pending: Action::Drop,
            verdict_ttl: std::time::Duration::from_secs(60),
            retry: std::time::Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Ruleset {
    pub path: PathBuf,
    pub version: Option<String>,
    pub default: Action,
    pub fragments: FragmentPolicy,
    /// `[options] icmpv6_nd`.
    pub icmpv6_nd: NdPolicy,
    pub escalation: EscalationOptions,
    pub rules: Vec<Rule>,
    pub sets: BTreeMap<String, Arc<Vec<IpNet>>>,
    /// Each set's content id: the SHA-256 of its inline prefixes (as parsed) and of its file's
    /// own SHA-256. Equal ids mean equal prefix lists (parsing a set file is a pure function of
    /// its text), so a reload can tell an unchanged set without looking at its prefixes.
    pub set_ids: BTreeMap<String, [u8; 32]>,
    /// `[portsets.NAME]`, referenced as `@NAME` in sport and dport.
    pub portsets: BTreeMap<String, Vec<RangeInclusive<u16>>>,
    /// `[protosets.NAME]`, referenced as `@NAME` in proto.
    pub protosets: BTreeMap<String, Vec<u8>>,
    pub tests: Vec<SelfTest>,
    pub warnings: Vec<Warning>,
    /// SHA-256 of the rules file, the files it includes and the SHA-256 of every set file they
    /// read, hex (each part with its name and length; see `Sha256Hasher`).
    pub hash: String,
    /// The files besides the rules file: included files and set files, as written relative to
    /// the rules file's folder, and where they were read from.
    pub set_files: Vec<(String, PathBuf)>,
    /// Exactly the bytes that were parsed (and hashed): what a snapshot keeps.
    pub sources: Sources,
}

/// The texts a ruleset was parsed from: the rules text, and each set file's and included
/// file's text by its path relative to the rules file's folder. [`parse_with_sets`] parses them
/// again to the same ruleset (and hash) without reading any file.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub rules: Arc<str>,
    pub sets: Vec<(String, Arc<str>)>,
    /// The SHA-256 of each set file's text (by the same names as `sets`; included files have
    /// none): a snapshot stores a large set file once by its digest.
    pub set_digests: Vec<(String, [u8; 32])>,
    /// The set journal applied on top of the texts (`loader set`; see [`crate::setedit`]),
    /// when it changed any set of the ruleset.
    pub journal: Option<Arc<crate::setedit::SetJournal>>,
}

impl Ruleset {
    pub fn prefix_count(&self) -> usize {
        self.rules
            .iter()
            .map(|r| r.src.as_ref().map_or(0, AddrList::total_len) + r.dst.as_ref().map_or(0, AddrList::total_len))
            .sum()
    }

    /// Whether any rule needs the socket owner (and so the escalation service).
    pub fn needs_owner(&self) -> bool {
        self.rules.iter().any(|r| r.owner.is_some())
    }
}

// ---- raw TOML shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    include: Option<Vec<Spanned<String>>>,
    version: Option<Spanned<String>>,
    default: Option<Spanned<String>>,
    options: Option<Spanned<RawOptions>>,
    escalation: Option<Spanned<RawEscalation>>,
    #[serde(default)]
    sets: BTreeMap<Spanned<String>, Spanned<RawSet>>,
    #[serde(default)]
    portsets: BTreeMap<Spanned<String>, Spanned<RawPortSet>>,
    #[serde(default)]
    protosets: BTreeMap<Spanned<String>, Spanned<RawProtoSet>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    fragments: Option<Spanned<String>>,
    icmpv6_nd: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEscalation {
    pending: Option<Spanned<String>>,
    verdict_ttl: Option<Spanned<String>>,
    retry: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSet {
    prefixes: Option<Vec<Spanned<String>>>,
    file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortSet {
    ports: Spanned<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtoSet {
    protos: Spanned<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    action: Spanned<String>,
    src: Option<Spanned<toml::Value>>,
    dst: Option<Spanned<toml::Value>>,
    proto: Option<Spanned<toml::Value>>,
    sport: Option<Spanned<toml::Value>>,
    dport: Option<Spanned<toml::Value>>,
    icmp_type: Option<Spanned<toml::Value>>,
    icmp_code: Option<Spanned<toml::Value>>,
    tcp_flags: Option<Spanned<String>>,
    owner: Option<Spanned<toml::Value>>,
    limit: Option<Spanned<toml::Value>>,
    state: Option<Spanned<toml::Value>>,
    vlan: Option<Spanned<toml::Value>>,
    log: Option<Spanned<toml::Value>>,
    comment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    packet: Spanned<String>,
    expect: Spanned<String>,
    rule: Option<String>,
    owner: Option<Spanned<String>>,
}

/// Maps byte offsets of one file to line:column. The offsets of the line starts are indexed
/// once, so each lookup is a binary search: locating every rule stays linear in the file.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Self { path, text, line_starts }
    }
    fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        let column = self.text.get(start..offset).map_or(0, |l| l.chars().count()) + 1;
        Location { file: self.path.to_path_buf(), line, column }
    }
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> RulesError {
        RulesError { location: self.location(span.start), message: cap_text(message.into(), MAX_MESSAGE) }
    }
}

/// The longest rules file (or body from a rules server) read: 1M inline prefixes are ~25 MB.
pub const MAX_RULES_TEXT: u64 = 64 << 20;
/// The longest set file read (2M prefixes, one a line with a comment, fit easily).
pub const MAX_SET_FILE: u64 = 128 << 20;
/// The most lines a set file may have.
pub const MAX_SET_LINES: usize = 4 * xdpfw_common::MAX_PREFIXES as usize;
/// The most `[[test]]` entries in a ruleset (each is run in the kernel on every reload).
pub const MAX_TESTS: usize = 4096;
/// The longest diagnostic message: a hostile file can put megabytes in one string.
pub const MAX_MESSAGE: usize = 1024;

/// `text` cut to at most `max` bytes at a character boundary, saying it was cut.
pub fn cap_text(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = text.len() - cut;
    text.truncate(cut);
    text.push_str(&format!("… ({dropped} more bytes)"));
    text
}

/// What a ruleset may refer to outside its own text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Origin {
    /// A local rules file: set files are read relative to it.
    #[default]
    Local,
    /// A body from a rules server: it must be self-contained, a `file =` is an error and no
    /// local file is ever read on its behalf.
    Remote,
}

/// Reads a regular file of at most `max` bytes, once: FIFOs, devices and directories are
/// refused before any read (opened non-blocking, so a FIFO without a writer cannot hang us).
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<String> {
    read_bounded_stamped(path, max).map(|(text, _, _)| text)
}

/// [`read_bounded`], with the open file's stamps before and after the read (see `setcache`).
fn read_bounded_stamped(path: &Path, max: u64) -> std::io::Result<(String, Option<crate::setcache::Stamp>, Option<crate::setcache::Stamp>)> {
    let (bytes, before, after) = read_bytes_stamped(path, max)?;
    let text = String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, NotUtf8::at(e.as_bytes(), e.utf8_error().valid_up_to())))?;
    Ok((text, before, after))
}

/// [`read_bounded`] of any bytes.
pub(crate) fn read_bytes_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    read_bytes_stamped(path, max).map(|(bytes, _, _)| bytes)
}

fn read_bytes_stamped(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, Option<crate::setcache::Stamp>, Option<crate::setcache::Stamp>)> {
    use std::io::Read;
    let mut opts = std::fs::File::options();
    opts.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        const O_NONBLOCK: i32 = 0o4000;
        opts.custom_flags(O_NONBLOCK);
    }
    let file = opts.open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        let kind = if meta.is_dir() { "a directory" } else { "not a regular file (a FIFO, socket or device)" };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, kind));
    }
    if meta.len() > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} bytes, more than the limit of {max}", meta.len())));
    }
    let before = crate::setcache::Stamp::of(&meta);
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&file).take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("grew beyond the limit of {max} bytes while read")));
    }
    let after = file.metadata().ok().and_then(|m| crate::setcache::Stamp::of(&m));
    Ok((bytes, before, after))
}

/// A file that is not UTF-8, with where its first invalid byte is (1-based line and column,
/// columns in characters as in every other diagnostic). Carried inside the `io::Error` of
/// [`read_bounded`], so callers can report the file's own line:column.
#[derive(Debug)]
pub struct NotUtf8 {
    pub line: usize,
    pub column: usize,
    pub byte: u8,
}

impl NotUtf8 {
    fn at(bytes: &[u8], offset: usize) -> Self {
        let valid = &bytes[..offset];
        let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Everything before `offset` is valid UTF-8.
        let column = std::str::from_utf8(&valid[line_start..]).map_or(0, |l| l.chars().count()) + 1;
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        NotUtf8 { line, column, byte: bytes[offset] }
    }

    /// The `NotUtf8` inside `e`, if that is why reading failed.
    pub fn of(e: &std::io::Error) -> Option<&NotUtf8> {
        e.get_ref().and_then(|i| i.downcast_ref::<NotUtf8>())
    }

    fn error(&self, file: &Path) -> RulesError {
        RulesError { location: Location { file: file.to_path_buf(), line: self.line, column: self.column }, message: self.to_string() }
    }
}

impl fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not UTF-8: byte 0x{:02x} at line {}, column {}", self.byte, self.line, self.column)
    }
}

impl std::error::Error for NotUtf8 {}

/// Reads and validates a rules file (and the set files it names).
pub fn load(path: &Path) -> Result<Ruleset, RulesError> {
    load_from(path, Origin::Local)
}

/// Reads and validates a rules file that came from `origin` (a remote one names no set file).
pub fn load_from(path: &Path, origin: Origin) -> Result<Ruleset, RulesError> {
    let text = read_bounded(path, MAX_RULES_TEXT).map_err(|e| match NotUtf8::of(&e) {
        Some(n) => n.error(path),
        None => RulesError {
            location: Location { file: path.to_path_buf(), line: 0, column: 0 },
            message: cap_text(format!("cannot read: {e}"), MAX_MESSAGE),
        },
    })?;
    parse_from(path, &text, origin)
}

/// Parses rules text as if read from `path` (set files resolve relative to its directory).
pub fn parse(path: &Path, text: &str) -> Result<Ruleset, RulesError> {
    parse_from(path, text, Origin::Local)
}

/// The `[[rule]]` and `[[test]]` headers of a text, counted in one pass before the TOML parse, so
/// a file with far too many is refused before any work that grows with them.
fn count_headers(text: &str) -> (usize, usize, Option<usize>, Option<usize>) {
    let (mut rules, mut tests, mut over_rule, mut over_test) = (0, 0, None, None);
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        match line.trim() {
            "[[rule]]" => {
                rules += 1;
                if rules == xdpfw_common::MAX_RULES + 1 {
                    over_rule = Some(offset + line.find('[').unwrap_or(0));
                }
            }
            "[[test]]" => {
                tests += 1;
                if tests == MAX_TESTS + 1 {
                    over_test = Some(offset + line.find('[').unwrap_or(0));
                }
            }
            _ => {}
        }
        offset += line.len();
    }
    (rules, tests, over_rule, over_test)
}

/// The deepest chain of `include`s (a file including one that includes … ) accepted.
pub const MAX_INCLUDE_DEPTH: usize = 8;
/// The most files one ruleset may include, at every depth together.
pub const MAX_INCLUDED_FILES: usize = 64;

/// One file of a ruleset: the rules file itself or a file it includes.
struct Part<'t> {
    path: PathBuf,
    /// The path relative to the rules file's folder (`None` for the rules file).
    written: Option<String>,
    text: std::borrow::Cow<'t, str>,
    raw: RawFile,
    /// Where it is included from, nearest first (empty for the rules file).
    from: Vec<Location>,
}

/// `e` with the place its file was included from, so an error deep in an include says how it
/// was reached.
fn included_from(mut e: RulesError, from: &[Location]) -> RulesError {
    for at in from {
        e.message.push_str(&format!(" (in a file included from {at})"));
    }
    e
}

/// The checks before the TOML parse, and the parse, of one file.
fn parse_raw(src: &Source, origin: Origin) -> Result<RawFile, RulesError> {
    let text = src.text;
    if text.len() as u64 > MAX_RULES_TEXT {
        return Err(src.error(0..0, format!("the ruleset is {} bytes (the limit is {MAX_RULES_TEXT})", text.len())));
    }
    let (rule_headers, test_headers, over_rule, over_test) = count_headers(text);
    if let Some(at) = over_rule {
        return Err(src.error(at..at, format!("too many rules: {rule_headers} (the limit is {})", xdpfw_common::MAX_RULES)));
    }
    if let Some(at) = over_test {
        return Err(src.error(at..at, format!("too many tests: {test_headers} (the limit is {MAX_TESTS})")));
    }
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start);
        src.error(start..start, e.message().trim().to_string())
    })?;
    if origin == Origin::Remote {
        if let Some((name, set)) = raw.sets.iter().find(|(_, s)| s.get_ref().file.is_some()) {
            let span = set.get_ref().file.as_ref().map_or(set.span(), Spanned::span);
            return Err(src.error(span, format!(
                "set \"{}\" names a file, but a ruleset from a URL must be self-contained (inline `prefixes` only); no local file is read for it",
                name.get_ref()
            )));
        }
        if let Some(inc) = raw.include.as_ref().and_then(|i| i.first()) {
            return Err(src.error(inc.span(), "include names a file, but a ruleset from a URL must be self-contained; no local file is read for it"));
        }
    }
    Ok(raw)
}

/// Reads `text` (the file at `path`) and, depth first, the files it includes, into `out`: each
/// included file before the file that includes it, so their rules come first, as if the
/// `include` (which TOML puts before any table) were replaced by the files' text.
#[expect(clippy::too_many_arguments, reason = "the walk's state, threaded through the recursion")]
fn gather<'t>(
    path: &Path,
    written: Option<String>,
    text: std::borrow::Cow<'t, str>,
    from: Vec<Location>,
    origin: Origin,
    chain: &mut Vec<PathBuf>,
    seen: &mut HashSet<PathBuf>,
    out: &mut Vec<Part<'t>>,
    provided: Option<&[(String, String)]>,
    texts: &mut Vec<(String, Arc<str>)>,
) -> Result<(), RulesError> {
    let raw = {
        let src = Source::new(path, &text);
        let raw = parse_raw(&src, origin)?;
        for item in raw.include.iter().flatten() {
            let name = item.get_ref();
            if chain.len() >= MAX_INCLUDE_DEPTH {
                return Err(src.error(item.span(), format!("includes nest more than {MAX_INCLUDE_DEPTH} deep")));
            }
            let child = path.parent().unwrap_or(Path::new(".")).join(name);
            let child_written = match &written {
                None => name.clone(),
                Some(w) => Path::new(w).parent().unwrap_or(Path::new("")).join(name).display().to_string(),
            };
            // From given texts (a snapshot), files are known by their written path alone.
            let canonical = match provided {
                Some(_) => PathBuf::from(&child_written),
                None => child
                    .canonicalize()
                    .map_err(|e| src.error(item.span(), format!("cannot read included file {}: {e}", child.display())))?,
            };
            if let Some(at) = chain.iter().position(|p| *p == canonical) {
                let cycle: Vec<String> = chain[at..].iter().chain([&canonical]).map(|p| p.display().to_string()).collect();
                return Err(src.error(item.span(), format!("include cycle: {}", cycle.join(" includes "))));
            }
            if !seen.insert(canonical.clone()) {
                return Err(src.error(item.span(), format!("{} is included twice (its rules and sets would be defined twice)", child.display())));
            }
            if seen.len() > MAX_INCLUDED_FILES {
                return Err(src.error(item.span(), format!("more than {MAX_INCLUDED_FILES} included files")));
            }
            let child_text = match provided {
                None => read_bounded(&child, MAX_RULES_TEXT).map_err(|e| match NotUtf8::of(&e) {
                    Some(n) => n.error(&child),
                    None => src.error(item.span(), format!("cannot read included file {}: {e}", child.display())),
                })?,
                Some(given) => match given.iter().find(|(w, _)| *w == child_written) {
                    Some((_, t)) if t.len() as u64 <= MAX_RULES_TEXT => t.clone(),
                    Some(_) => return Err(src.error(item.span(), format!("included file {child_written} is over the limit of {MAX_RULES_TEXT} bytes"))),
                    None => return Err(src.error(item.span(), format!("included file {child_written} is not among the texts given"))),
                },
            };
            texts.push((child_written.clone(), Arc::from(child_text.as_str())));
            let at = src.location(item.span().start);
            let child_from = std::iter::once(at.clone()).chain(from.iter().cloned()).collect();
            chain.push(canonical);
            gather(&child, Some(child_written), child_text.into(), child_from, origin, chain, seen, out, provided, texts)
                .map_err(|e| included_from(e, std::slice::from_ref(&at)))?;
            chain.pop();
        }
        raw
    };
    out.push(Part { path: path.to_path_buf(), written, text, raw, from });
    Ok(())
}

/// The named sets a rule may refer to with `@NAME`.
struct Names<'a> {
    sets: &'a BTreeMap<String, Arc<Vec<IpNet>>>,
    portsets: &'a BTreeMap<String, Vec<RangeInclusive<u16>>>,
    protosets: &'a BTreeMap<String, Vec<u8>>,
}

/// Parses rules text from `origin`: a [`Origin::Remote`] text may not name set files.
pub fn parse_from(path: &Path, text: &str, origin: Origin) -> Result<Ruleset, RulesError> {
    parse_inner(path, text, origin, None)
}

/// Parses rules text whose set files and included files are given (by their path relative to
/// the rules file's folder) instead of read: a snapshot of the [`Sources`] of a ruleset parses
/// to that ruleset, hash included, with no file read. A file the text names but `sets` lacks is
/// an error.
pub fn parse_with_sets(path: &Path, text: &str, sets: &[(String, String)]) -> Result<Ruleset, RulesError> {
    parse_inner(path, text, Origin::Local, Some(sets))
}

fn parse_inner(path: &Path, text: &str, origin: Origin, provided: Option<&[(String, String)]>) -> Result<Ruleset, RulesError> {
    let mut parts = Vec::new();
    let mut set_texts = Vec::new();
    let mut set_digests = Vec::new();
    let root_id = match provided {
        Some(_) => PathBuf::new(),
        None => path.canonicalize().unwrap_or_else(|_| path.to_path_buf()),
    };
    let mut seen = HashSet::from([root_id.clone()]);
    gather(path, None, text.into(), Vec::new(), origin, &mut vec![root_id], &mut seen, &mut parts, provided, &mut set_texts)?;
    let sources: Vec<Source> = parts.iter().map(|p| Source::new(&p.path, &p.text)).collect();
    let root_index = parts.len() - 1;
    let (src, root) = (&sources[root_index], &parts[root_index].raw);

    // Counted again on the parsed files (inline-table arrays escape the header count, and
    // included files add up), still before any per-rule work.
    let mut counted = (0, 0);
    for (part, s) in parts.iter().zip(&sources) {
        if counted.0 + part.raw.rule.len() > xdpfw_common::MAX_RULES {
            let at = part.raw.rule[xdpfw_common::MAX_RULES - counted.0].span();
            return Err(included_from(
                s.error(at, format!("too many rules: {} (the limit is {})", counted.0 + part.raw.rule.len(), xdpfw_common::MAX_RULES)),
                &part.from,
            ));
        }
        if counted.1 + part.raw.test.len() > MAX_TESTS {
            let at = part.raw.test[MAX_TESTS - counted.1].span();
            return Err(included_from(
                s.error(at, format!("too many tests: {} (the limit is {MAX_TESTS})", counted.1 + part.raw.test.len())),
                &part.from,
            ));
        }
        counted.0 += part.raw.rule.len();
        counted.1 += part.raw.test.len();
    }
    // What only the rules file may say.
    for (part, s) in parts.iter().zip(&sources).take(root_index) {
        let raw = &part.raw;
        let span = raw
            .default
            .as_ref()
            .map(|d| ("default", d.span()))
            .or(raw.version.as_ref().map(|v| ("version", v.span())))
            .or(raw.options.as_ref().map(|o| ("[options]", o.span())))
            .or(raw.escalation.as_ref().map(|e| ("[escalation]", e.span())));
        if let Some((what, span)) = span {
            return Err(included_from(s.error(span, format!("{what} may only be set in the rules file, not in an included file")), &part.from));
        }
    }

    let mut hasher = Sha256Hasher::new();
    hasher.part(b"rules", text.as_bytes());
    let mut set_files = Vec::new();
    for part in &parts[..root_index] {
        let written = part.written.clone().unwrap_or_default();
        hasher.part(written.as_bytes(), part.text.as_bytes());
        set_files.push((written, part.path.clone()));
    }

    let Some(default) = &root.default else {
        return Err(src.error(0..0, "missing field `default`"));
    };
    let default = parse_action(src, default)?;
    let options = root.options.as_ref().map(|o| o.get_ref());
    let fragments = match options.and_then(|o| o.fragments.as_ref()) {
        None => FragmentPolicy::L3Only,
        Some(f) => match f.get_ref().as_str() {
            "l3-only" => FragmentPolicy::L3Only,
            "drop" => FragmentPolicy::Drop,
            "pass" => FragmentPolicy::Pass,
            other => {
                return Err(src.error(f.span(), format!(
                    "unknown fragment policy \"{other}\" (expected l3-only, drop or pass)"
                )));
            }
        },
    };

    let icmpv6_nd = match options.and_then(|o| o.icmpv6_nd.as_ref()) {
        None => NdPolicy::AlwaysPass,
        Some(f) => match f.get_ref().as_str() {
            "always-pass" => NdPolicy::AlwaysPass,
            "rules" => NdPolicy::Rules,
            other => {
                return Err(src.error(f.span(), format!("unknown icmpv6_nd policy \"{other}\" (expected always-pass or rules)")));
            }
        },
    };

    let escalation = match &root.escalation {
        None => EscalationOptions::default(),
        Some(e) => parse_escalation(src, e.get_ref())?,
    };

    let mut sets = BTreeMap::new();
    let mut set_ids = BTreeMap::new();
    let mut portsets = BTreeMap::new();
    let mut protosets = BTreeMap::new();
    for (part, s) in parts.iter().zip(&sources) {
        let mut named = || -> Result<(), RulesError> {
            for (name, set) in &part.raw.sets {
                check_set_name(s, name, "set", sets.contains_key(name.get_ref()))?;
                if let Some(f) = &set.get_ref().file {
                    let written = match &part.written {
                        None => f.get_ref().clone(),
                        Some(w) => Path::new(w).parent().unwrap_or(Path::new("")).join(f.get_ref()).display().to_string(),
                    };
                    set_files.push((written, part.path.parent().unwrap_or(Path::new(".")).join(f.get_ref())));
                }
                let key = set.get_ref().file.as_ref().map(|f| match &part.written {
                    None => f.get_ref().clone(),
                    Some(w) => Path::new(w).parent().unwrap_or(Path::new("")).join(f.get_ref()).display().to_string(),
                });
                let (prefixes, id) = load_set(s, name, set, &mut hasher, key.as_deref(), provided, &mut set_texts, &mut set_digests)?;
                sets.insert(name.get_ref().clone(), prefixes);
                set_ids.insert(name.get_ref().clone(), id);
            }
            for (name, set) in &part.raw.portsets {
                check_set_name(s, name, "portset", portsets.contains_key(name.get_ref()))?;
                let v = &set.get_ref().ports;
                let mut ranges = Vec::new();
                for item in items(v) {
                    match port_item(&item) {
                        Ok((false, PortItem::Range(r))) => ranges.push(r),
                        Ok(_) => return Err(s.error(v.span(), format!("portset \"{}\": items are ports and \"lo-hi\" ranges (no \"!\" or \"@\")", name.get_ref()))),
                        Err(m) => return Err(s.error(v.span(), format!("portset \"{}\": {m}", name.get_ref()))),
                    }
                }
                if ranges.is_empty() || ranges.iter().any(|r| r.is_empty()) {
                    return Err(s.error(v.span(), format!("portset \"{}\" is empty or has an inverted range", name.get_ref())));
                }
                portsets.insert(name.get_ref().clone(), ranges);
            }
            for (name, set) in &part.raw.protosets {
                check_set_name(s, name, "protoset", protosets.contains_key(name.get_ref()))?;
                let v = &set.get_ref().protos;
                let mut protos = Vec::new();
                for item in items(v) {
                    match proto_item(&item) {
                        Ok((false, ProtoItem::Number(p))) => protos.push(p),
                        Ok(_) => return Err(s.error(v.span(), format!("protoset \"{}\": items are protocol names and numbers (no \"any\", \"!\" or \"@\")", name.get_ref()))),
                        Err(m) => return Err(s.error(v.span(), format!("protoset \"{}\": {m}", name.get_ref()))),
                    }
                }
                if protos.is_empty() {
                    return Err(s.error(v.span(), format!("protoset \"{}\" is empty", name.get_ref())));
                }
                protos.sort_unstable();
                protos.dedup();
                protosets.insert(name.get_ref().clone(), protos);
            }
            Ok(())
        };
        named().map_err(|e| included_from(e, &part.from))?;
    }

    let names = Names { sets: &sets, portsets: &portsets, protosets: &protosets };
    let mut warnings = Vec::new();
    let mut rules = Vec::with_capacity(counted.0);
    let mut rule_names = HashSet::new();
    for (part, s) in parts.iter().zip(&sources) {
        for raw_rule in &part.raw.rule {
            let rule = parse_rule(s, rules.len(), raw_rule, &names, &mut warnings).map_err(|e| included_from(e, &part.from))?;
            if !rule_names.insert(rule.name.clone()) {
                warnings.push(Warning {
                    location: rule.location.clone(),
                    message: format!("duplicate rule name \"{}\"", rule.name),
                });
            }
            rules.push(rule);
        }
    }
    let mut tests = Vec::new();
    for (part, s) in parts.iter().zip(&sources) {
        for t in &part.raw.test {
            let test = parse_test(s, t.get_ref(), &rule_names).map_err(|e| included_from(e, &part.from))?;
            tests.push(test);
        }
    }

    let mut ruleset = Ruleset {
        path: path.to_path_buf(),
        version: root.version.as_ref().map(|v| v.get_ref().clone()),
        default,
        fragments,
        icmpv6_nd,
        escalation,
        rules,
        sets,
        set_ids,
        portsets,
        protosets,
        tests,
        warnings,
        hash: hasher.finish(),
        set_files,
        sources: Sources { rules: Arc::from(text), sets: set_texts, set_digests, journal: None },
    };
    nd_warnings(&mut ruleset);
    let shadowed = crate::matcher::shadowed_rules(&ruleset);
    for (rule, by) in shadowed {
        let r = &ruleset.rules[rule];
        ruleset.warnings.push(Warning {
            location: r.location.clone(),
            message: format!(
                "rule \"{}\" can never match: rule \"{}\" before it matches everything it would",
                r.name, ruleset.rules[by].name
            ),
        });
    }
    Ok(ruleset)
}

/// Rules naming ICMPv6 neighbour discovery types (133-137), which always pass before any rule
/// is looked at: those types never reach the rule.
fn nd_warnings(rs: &mut Ruleset) {
    let nd = xdpfw_common::proto::ND_FIRST..=xdpfw_common::proto::ND_LAST;
    if rs.icmpv6_nd == NdPolicy::Rules {
        // The host's own neighbour discovery must get through, or it loses IPv6 on the link.
        let solicitation: PacketSpec = "icmpv6 fe80::1 -> ff02::1:ff00:1 type 135".parse().expect("a valid packet");
        let advertisement: PacketSpec = "icmpv6 fe80::1 -> fe80::2 type 136".parse().expect("a valid packet");
        for p in [solicitation, advertisement] {
            let d = crate::matcher::decide(rs, &p);
            if d.action == Action::Drop {
                let by = d.rule_name.map_or("the default action".to_string(), |n| format!("rule \"{n}\""));
                rs.warnings.push(Warning {
                    location: Location { file: rs.path.clone(), line: 1, column: 1 },
                    message: format!(
                        "icmpv6_nd = \"rules\" and {by} drops neighbour {} (\"{p}\"): IPv6 on the link stops working; pass ICMPv6 types 135 and 136 (neighbor-solicitation, neighbor-advertisement)",
                        if p.icmp_type == 135 { "solicitations" } else { "advertisements" }
                    ),
                });
                break;
            }
        }
        return;
    }
    for r in &rs.rules {
        let (Some(icmp), Some(protos)) = (&r.icmp, &r.proto) else { continue };
        if !protos.contains(&IPPROTO_ICMPV6) {
            continue;
        }
        let named: Vec<String> = icmp
            .types
            .iter()
            .filter(|t| nd.contains(t))
            .map(|t| format!("{t} ({})", icmp_type_name(*t, true).unwrap_or("?")))
            .collect();
        if named.is_empty() {
            continue;
        }
        let never = icmp.types.iter().all(|t| nd.contains(t)) && !protos.contains(&IPPROTO_ICMP);
        rs.warnings.push(Warning {
            location: r.location.clone(),
            message: format!(
                "rule \"{}\"{}: ICMPv6 type {} always passes before any rule (neighbour discovery and router messages)",
                r.name,
                if never { " can never match" } else { "" },
                named.join(", ")
            ),
        });
    }
}

fn check_set_name(src: &Source, name: &Spanned<String>, kind: &str, taken: bool) -> Result<(), RulesError> {
    let n = name.get_ref();
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(src.error(name.span(), format!("{kind} name \"{n}\" may use only letters, digits, '_' and '-'")));
    }
    if taken {
        return Err(src.error(name.span(), format!("{kind} \"{n}\" is defined twice (in this file and an included one)")));
    }
    Ok(())
}

fn parse_test(src: &Source, t: &RawTest, rule_names: &HashSet<String>) -> Result<SelfTest, RulesError> {
    let packet: PacketSpec = t
        .packet
        .get_ref()
        .parse()
        .map_err(|e: crate::SpecError| src.error(t.packet.span(), format!("bad test packet: {e}")))?;
    if let Some(name) = &t.rule
        && !rule_names.contains(name)
    {
        return Err(src.error(t.packet.span(), format!("test names unknown rule \"{name}\"")));
    }
    Ok(SelfTest {
        packet,
        text: t.packet.get_ref().clone(),
        expect: parse_action(src, &t.expect)?,
        rule: t.rule.clone(),
        owner: t
            .owner
            .as_ref()
            .map(|o| o.get_ref().parse::<OwnerSpec>().map_err(|e| src.error(o.span(), format!("bad test owner: {e}"))))
            .transpose()?,
        location: src.location(t.packet.span().start),
    })
}

fn parse_escalation(src: &Source, raw: &RawEscalation) -> Result<EscalationOptions, RulesError> {
    let mut out = EscalationOptions::default();
    if let Some(p) = &raw.pending {
        out.pending = parse_action(src, p)?;
    }
    let duration = |d: &Spanned<String>, what: &str, min_ms: u64, max: std::time::Duration| -> Result<std::time::Duration, RulesError> {
        let v = crate::duration::parse_duration(d.get_ref()).map_err(|e| src.error(d.span(), format!("{what}: {e}")))?;
        if v.as_millis() < min_ms as u128 || v > max {
            return Err(src.error(d.span(), format!("{what} must be between {min_ms}ms and {}s", max.as_secs())));
        }
        Ok(v)
    };
    if let Some(d) = &raw.verdict_ttl {
        out.verdict_ttl = duration(d, "verdict_ttl", 100, std::time::Duration::from_secs(7 * 24 * 3600))?;
    }
    if let Some(d) = &raw.retry {
        out.retry = duration(d, "retry", 10, std::time::Duration::from_secs(3600))?;
    }
    Ok(out)
}

/// A rule's `owner` table.
fn parse_owner(src: &Source, v: &Spanned<toml::Value>) -> Result<OwnerMatch, RulesError> {
    let toml::Value::Table(table) = v.get_ref() else {
        return Err(src.error(v.span(), "owner must be a table, e.g. owner = { process = \"nginx\" }"));
    };
    let mut m = OwnerMatch::default();
    for (key, value) in table {
        if key == "any_slice" {
            m.any_slice = value.as_bool().ok_or_else(|| src.error(v.span(), format!("owner.any_slice: expected true or false, found {value}")))?;
            continue;
        }
        let items: Vec<toml::Value> = match value {
            toml::Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        let texts = || -> Result<Vec<String>, RulesError> {
            items
                .iter()
                .map(|i| match i {
                    toml::Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    other => Err(src.error(v.span(), format!("owner.{key}: expected a non-empty string, found {other}"))),
                })
                .collect()
        };
        match key.as_str() {
            "process" => m.process = texts()?,
            "exe" => {
                m.exe = texts()?;
                if let Some(e) = m.exe.iter().find(|e| !e.starts_with('/')) {
                    return Err(src.error(v.span(), format!("owner.exe \"{e}\" must be an absolute path")));
                }
            }
            "user" => m.user = texts()?,
            "unit" => m.unit = texts()?,
            "cgroup" => m.cgroup = texts()?,
            "uid" => {
                for i in &items {
                    m.uid.push(match i {
                        toml::Value::Integer(n) if (0..=u32::MAX as i64).contains(n) => (*n as u32)..=(*n as u32),
                        toml::Value::String(s) => parse_uid_range(s).map_err(|e| src.error(v.span(), format!("owner.uid: {e}")))?,
                        other => return Err(src.error(v.span(), format!("owner.uid: expected a uid or \"lo-hi\", found {other}"))),
                    });
                }
            }
            other => {
                return Err(src.error(v.span(), format!(
                    "unknown owner condition \"{other}\" (expected process, exe, uid, user, unit, cgroup or any_slice)"
                )));
            }
        }
    }
    if m.is_empty() {
        return Err(src.error(v.span(), "an empty owner table matches every socket; remove it or name a process, exe, uid, user, unit or cgroup"));
    }
    for c in &m.cgroup {
        if !c.starts_with('/') {
            return Err(src.error(v.span(), format!("owner.cgroup \"{c}\" must be a path from the cgroup root, e.g. \"/system.slice/nginx.service\"")));
        }
        let under_system = c.trim_end_matches('/') == SYSTEM_SLICE || c.starts_with(&format!("{SYSTEM_SLICE}/"));
        if !under_system && !m.any_slice {
            return Err(src.error(v.span(), format!(
                "owner.cgroup \"{c}\" is outside {SYSTEM_SLICE}, where unprivileged users can create cgroups of any name (delegation): add any_slice = true to the owner table to match there anyway"
            )));
        }
    }
    Ok(m)
}

fn parse_action(src: &Source, s: &Spanned<String>) -> Result<Action, RulesError> {
    match s.get_ref().as_str() {
        "pass" | "accept" => Ok(Action::Pass),
        "drop" => Ok(Action::Drop),
        other => Err(src.error(s.span(), format!("unknown action \"{other}\" (expected pass or drop)"))),
    }
}

#[expect(clippy::too_many_arguments, reason = "the parse state a set adds to: hash, texts and digests")]
fn load_set(
    src: &Source,
    name: &Spanned<String>,
    set: &Spanned<RawSet>,
    hasher: &mut Sha256Hasher,
    written: Option<&str>,
    provided: Option<&[(String, String)]>,
    texts: &mut Vec<(String, Arc<str>)>,
    digests: &mut Vec<(String, [u8; 32])>,
) -> Result<(Arc<Vec<IpNet>>, [u8; 32]), RulesError> {
    let n = name.get_ref();
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(src.error(name.span(), format!("set name \"{n}\" may use only letters, digits, '_' and '-'")));
    }
    let raw = set.get_ref();
    let mut out = Vec::new();
    for p in raw.prefixes.iter().flatten() {
        out.push(parse_cidr(p.get_ref()).map_err(|m| src.error(p.span(), m))?);
    }
    // The set's content id: its inline prefixes, then its file's digest.
    let mut id = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut id, b"xdpfw-set-1\0");
    sha2::Digest::update(&mut id, (out.len() as u64).to_le_bytes());
    for net in &out {
        match net {
            IpNet::V4(n) => sha2::Digest::update(&mut id, [&[4, n.prefix_len()][..], &n.network().octets()].concat()),
            IpNet::V6(n) => sha2::Digest::update(&mut id, [&[6, n.prefix_len()][..], &n.network().octets()].concat()),
        }
    }
    let mut shared = None;
    if let Some(file) = &raw.file {
        let base = src.path.parent().unwrap_or(Path::new("."));
        let path = base.join(file.get_ref());
        let key = written.unwrap_or(file.get_ref());
        // A large set file whose metadata vouches for a text kept by this process (see
        // `setcache`) is not even read.
        let kept = if provided.is_none() { crate::setcache::by_metadata(&path) } else { None };
        let (kept, read) = match kept {
            Some(kept) => (Some(kept), None),
            None => {
                let read_start = std::time::SystemTime::now();
                let (text, before, after) = match provided {
                    None => read_bounded_stamped(&path, MAX_SET_FILE).map_err(|e| match NotUtf8::of(&e) {
                        Some(n) => n.error(&path),
                        None => src.error(file.span(), format!("cannot read set file {}: {e}", path.display())),
                    })?,
                    Some(given) => match given.iter().find(|(w, _)| w == key) {
                        Some((_, t)) if t.len() as u64 <= MAX_SET_FILE => (t.clone(), None, None),
                        Some(_) => return Err(src.error(file.span(), format!("set file {key} is over the limit of {MAX_SET_FILE} bytes"))),
                        None => return Err(src.error(file.span(), format!("set file {key} is not among the texts given"))),
                    },
                };
                // A set file enters the ruleset's hash by its own digest, so a set file seen
                // before in this process is neither parsed nor hashed again.
                (crate::setcache::lookup(&text), Some((text, before, after, read_start)))
            }
        };
        let digest = if let Some(kept) = kept {
            if let Some((text, before, after, read_start)) = &read
                && provided.is_none()
            {
                crate::setcache::note_read(*before, *after, *read_start, text.len(), kept.digest, false);
            }
            hasher.part(file.get_ref().as_bytes(), &kept.digest);
            digests.push((key.to_string(), kept.digest));
            texts.push((key.to_string(), kept.text));
            // A set that is the file alone shares the kept prefixes (no copy of a 1M list).
            if out.is_empty() {
                shared = Some(kept.prefixes);
            } else {
                out.extend_from_slice(&kept.prefixes);
            }
            kept.digest
        } else {
            let Some((text, before, after, read_start)) = read else { unreachable!("read when not kept") };
            let digest = sha256(text.as_bytes());
            hasher.part(file.get_ref().as_bytes(), &digest);
            let start = out.len();
            // Parsed by an earlier process (see `setcache::keep_parsed_on_disk`), or parsed now.
            let large = text.len() >= crate::setcache::MIN_TEXT;
            let parsed = match large.then(|| crate::setcache::from_disk(&digest)).flatten() {
                Some(prefixes) => {
                    out.extend(prefixes);
                    false
                }
                None => {
                    parse_set_lines(&text, &path, &mut out)?;
                    if large {
                        crate::setcache::to_disk(&digest, &out[start..]);
                    }
                    true
                }
            };
            let text: Arc<str> = Arc::from(text.as_str());
            if text.len() >= crate::setcache::MIN_TEXT {
                if start == 0 {
                    let prefixes = Arc::new(std::mem::take(&mut out));
                    crate::setcache::store(&text, prefixes.clone(), digest);
                    shared = Some(prefixes);
                } else {
                    crate::setcache::store(&text, Arc::new(out[start..].to_vec()), digest);
                }
            }
            if provided.is_none() {
                crate::setcache::note_read(before, after, read_start, text.len(), digest, parsed);
            }
            digests.push((key.to_string(), digest));
            texts.push((key.to_string(), text));
            digest
        };
        sha2::Digest::update(&mut id, [1]);
        sha2::Digest::update(&mut id, digest);
    } else {
        sha2::Digest::update(&mut id, [0]);
    }
    if raw.prefixes.is_none() && raw.file.is_none() {
        return Err(src.error(set.span(), format!("set \"{n}\" needs `prefixes` or `file`")));
    }
    let out = shared.unwrap_or_else(|| Arc::new(out));
    let limit = xdpfw_common::MAX_PREFIXES as usize;
    if out.len() > limit {
        return Err(src.error(set.span(), format!("set \"{n}\" has {} prefixes (the limit is {limit})", out.len())));
    }
    Ok((out, sha2::Digest::finalize(id).into()))
}

/// The prefixes of a set file's lines (comments and blank lines skipped), appended to `out`.
fn parse_set_lines(text: &str, path: &Path, out: &mut Vec<IpNet>) -> Result<(), RulesError> {
    {
        let path = path.to_path_buf();
        out.reserve(text.len() / 16);
        for (i, line) in text.lines().enumerate() {
            if i >= MAX_SET_LINES {
                return Err(RulesError {
                    location: Location { file: path.clone(), line: i + 1, column: 1 },
                    message: format!("set file has more than {MAX_SET_LINES} lines"),
                });
            }
            let body = line.split('#').next().unwrap_or("").trim();
            if body.is_empty() {
                continue;
            }
            let column = line.find(body).unwrap_or(0) + 1;
            out.push(parse_cidr(body).map_err(|message| RulesError {
                location: Location { file: path.clone(), line: i + 1, column },
                message: cap_text(message, MAX_MESSAGE),
            })?);
        }
    }
    Ok(())
}

/// A CIDR or a bare address (a host prefix). Host bits must be zero, as in nftables.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        s.parse::<IpNet>().map_err(|_| format!("invalid CIDR \"{s}\""))?
    } else {
        IpNet::from(s.parse::<IpAddr>().map_err(|_| format!("invalid address \"{s}\""))?)
    };
    if net.network() != net.addr() {
        return Err(format!("\"{s}\" has host bits set (did you mean {}?)", net.trunc()));
    }
    Ok(net)
}

/// The items of a value that may be one item or a list.
fn items(v: &Spanned<toml::Value>) -> Vec<toml::Value> {
    match v.get_ref() {
        toml::Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    }
}

enum PortItem {
    Range(RangeInclusive<u16>),
    Set(String),
}

/// A port item: `22`, `"22"`, `"lo-hi"`, `"@portset"`, each optionally after `!`; with whether
/// it was negated.
fn port_item(v: &toml::Value) -> Result<(bool, PortItem), String> {
    match v {
        toml::Value::Integer(n) if (0..=65535).contains(n) => Ok((false, PortItem::Range((*n as u16)..=(*n as u16)))),
        toml::Value::String(s) => {
            let (neg, body) = match s.strip_prefix('!') {
                Some(b) => (true, b.trim_start()),
                None => (false, s.as_str()),
            };
            match body.strip_prefix('@') {
                Some(set) => Ok((neg, PortItem::Set(set.to_string()))),
                None => Ok((neg, PortItem::Range(parse_port_range(body)?))),
            }
        }
        other => Err(format!("invalid port {other} (expected a port 0-65535, \"lo-hi\" or \"@portset\", each optionally after \"!\")")),
    }
}

enum ProtoItem {
    Number(u8),
    Any,
    Set(String),
}

/// The number of a protocol name.
pub fn proto_by_name(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(IPPROTO_TCP),
        "udp" => Some(IPPROTO_UDP),
        "icmp" => Some(IPPROTO_ICMP),
        "icmpv6" => Some(IPPROTO_ICMPV6),
        _ => None,
    }
}

/// A protocol item: a name, a number, `"any"`, `"@protoset"`, each optionally after `!`.
fn proto_item(v: &toml::Value) -> Result<(bool, ProtoItem), String> {
    match v {
        toml::Value::Integer(n) if (0..=255).contains(n) => Ok((false, ProtoItem::Number(*n as u8))),
        toml::Value::String(s) => {
            let (neg, body) = match s.strip_prefix('!') {
                Some(b) => (true, b.trim_start()),
                None => (false, s.as_str()),
            };
            if let Some(set) = body.strip_prefix('@') {
                return Ok((neg, ProtoItem::Set(set.to_string())));
            }
            if body == "any" {
                return if neg { Err("\"!any\" matches nothing".into()) } else { Ok((false, ProtoItem::Any)) };
            }
            match proto_by_name(body).or_else(|| body.parse::<u8>().ok()) {
                Some(p) => Ok((neg, ProtoItem::Number(p))),
                None => Err(format!("unknown protocol \"{body}\" (expected tcp, udp, icmp, icmpv6, any, a number 0-255 or \"@protoset\", each optionally after \"!\")")),
            }
        }
        other => Err(format!("invalid protocol {other}")),
    }
}

/// ICMP (RFC 792 and successors) message types by name.
pub const ICMP_TYPE_NAMES: [(&str, u8); 12] = [
    ("echo-reply", 0),
    ("destination-unreachable", 3),
    ("source-quench", 4),
    ("redirect", 5),
    ("echo-request", 8),
    ("router-advertisement", 9),
    ("router-solicitation", 10),
    ("time-exceeded", 11),
    ("parameter-problem", 12),
    ("timestamp-request", 13),
    ("timestamp-reply", 14),
    ("address-mask-request", 17),
];

/// ICMPv6 (RFC 4443, 4861, 2710, 3810) message types by name; both spellings of neighbour.
pub const ICMPV6_TYPE_NAMES: [(&str, u8); 18] = [
    ("destination-unreachable", 1),
    ("packet-too-big", 2),
    ("time-exceeded", 3),
    ("parameter-problem", 4),
    ("echo-request", 128),
    ("echo-reply", 129),
    ("mld-listener-query", 130),
    ("mld-listener-report", 131),
    ("mld-listener-done", 132),
    ("router-solicitation", 133),
    ("router-advertisement", 134),
    ("neighbor-solicitation", 135),
    ("neighbour-solicitation", 135),
    ("neighbor-advertisement", 136),
    ("neighbour-advertisement", 136),
    ("redirect", 137),
    ("mld2-listener-report", 143),
    ("nd-redirect", 137),
];

/// The number of an ICMP (`v6` false) or ICMPv6 type name.
pub fn icmp_type_by_name(name: &str, v6: bool) -> Option<u8> {
    let table: &[(&str, u8)] = if v6 { &ICMPV6_TYPE_NAMES } else { &ICMP_TYPE_NAMES };
    table.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, t)| *t)
}

/// The name of an ICMP or ICMPv6 type, for messages.
pub fn icmp_type_name(t: u8, v6: bool) -> Option<&'static str> {
    let table: &[(&str, u8)] = if v6 { &ICMPV6_TYPE_NAMES } else { &ICMP_TYPE_NAMES };
    table.iter().find(|(_, n)| *n == t).map(|(name, _)| *name)
}

/// IPv6 extension headers' protocol numbers: the parser walks past them, so an IPv6 packet's
/// protocol is never one of them.
pub const IPV6_EXTENSION_PROTOS: [(u8, &str); 5] =
    [(0, "hop-by-hop options"), (43, "routing"), (44, "fragment"), (51, "AH"), (60, "destination options")];

fn parse_rule(
    src: &Source,
    index: usize,
    raw: &Spanned<RawRule>,
    names: &Names,
    warnings: &mut Vec<Warning>,
) -> Result<Rule, RulesError> {
    let location = src.location(raw.span().start);
    let r = raw.get_ref();
    let name = match &r.name {
        Some(n) => n.get_ref().clone(),
        None => format!("rule-{}", index + 1),
    };
    let addr = |v: &Option<Spanned<toml::Value>>| -> Result<Option<AddrList>, RulesError> {
        let Some(v) = v else { return Ok(None) };
        let mut list = AddrList::default();
        let mut except = AddrList::default();
        for item in strings(src, v)? {
            let (neg, body) = match item.strip_prefix('!') {
                Some(b) => (true, b.trim_start()),
                None => (false, item.as_str()),
            };
            let into = if neg { &mut except } else { &mut list };
            if let Some(set) = body.strip_prefix('@') {
                let prefixes = names
                    .sets
                    .get(set)
                    .ok_or_else(|| src.error(v.span(), format!("unknown set \"@{set}\"")))?;
                into.sets.push((set.to_string(), prefixes.clone()));
            } else {
                into.inline.push(parse_cidr(body).map_err(|m| src.error(v.span(), m))?);
            }
        }
        if except.has_positive() {
            list.except = Some(Box::new(except));
        }
        if !list.has_positive() && list.except.is_none() {
            return Err(src.error(v.span(), "an empty address list matches nothing; remove the field to match any address"));
        }
        Ok(Some(list))
    };
    let proto = match &r.proto {
        None => None,
        Some(v) => {
            let (mut pos, mut neg, mut any) = (Vec::new(), Vec::new(), false);
            for item in items(v) {
                let (negated, item) = proto_item(&item).map_err(|m| src.error(v.span(), m))?;
                let into = if negated { &mut neg } else { &mut pos };
                match item {
                    ProtoItem::Number(p) => into.push(p),
                    ProtoItem::Any => any = true,
                    ProtoItem::Set(set) => into.extend(
                        names.protosets.get(&set).ok_or_else(|| src.error(v.span(), format!("unknown protoset \"@{set}\"")))?,
                    ),
                }
            }
            let named = pos.clone();
            if any && neg.is_empty() {
                None
            } else {
                let mut protos: Vec<u8> = if any || pos.is_empty() { (0..=255).collect() } else { pos };
                protos.retain(|p| !neg.contains(p));
                protos.sort_unstable();
                protos.dedup();
                if protos.is_empty() {
                    warnings.push(Warning {
                        location: src.location(v.span().start),
                        message: format!("rule \"{name}\" can never match: its proto excludes every protocol it names"),
                    });
                }
                // Named outright (not by exclusion): IPv6 extension headers never are an IPv6
                // packet's protocol.
                for (p, what) in IPV6_EXTENSION_PROTOS.iter().filter(|(p, _)| named.contains(p) && protos.contains(p)) {
                    warnings.push(Warning {
                        location: src.location(v.span().start),
                        message: format!(
                            "rule \"{name}\": protocol {p} is the IPv6 {what} extension header, which the parser walks past to the transport header: no IPv6 packet has it as its protocol, so this matches IPv4 packets only"
                        ),
                    });
                }
                Some(protos)
            }
        }
    };
    let mut ports = |v: &Option<Spanned<toml::Value>>, field: &str| -> Result<Option<PortMatch>, RulesError> {
        let Some(v) = v else { return Ok(None) };
        let (mut pos, mut except) = (Vec::new(), Vec::new());
        for item in items(v) {
            let (negated, item) = port_item(&item).map_err(|m| src.error(v.span(), format!("{field}: {m}")))?;
            let into = if negated { &mut except } else { &mut pos };
            match item {
                PortItem::Range(range) => {
                    if range.is_empty() {
                        warnings.push(Warning {
                            location: src.location(v.span().start),
                            message: format!("rule \"{name}\": {field} range {}-{} is inverted and matches nothing", range.start(), range.end()),
                        });
                    }
                    into.push(range);
                }
                PortItem::Set(set) => into.extend(
                    names.portsets.get(&set).ok_or_else(|| src.error(v.span(), format!("unknown portset \"@{set}\"")))?.iter().cloned(),
                ),
            }
        }
        if pos.is_empty() && except.is_empty() {
            return Err(src.error(v.span(), format!("an empty {field} list matches nothing; remove the field to match any port")));
        }
        Ok(Some(PortMatch { ranges: (!pos.is_empty()).then_some(pos), except }))
    };
    let sport = ports(&r.sport, "sport")?;
    let dport = ports(&r.dport, "dport")?;

    let only = |allowed: &[u8]| proto.as_ref().is_some_and(|p| p.iter().all(|x| allowed.contains(x)));
    if (sport.is_some() || dport.is_some()) && !only(&[IPPROTO_TCP, IPPROTO_UDP]) {
        let span = r.sport.as_ref().or(r.dport.as_ref()).map(Spanned::span).unwrap_or(raw.span());
        return Err(src.error(span, "ports need proto = \"tcp\", \"udp\" or [\"tcp\", \"udp\"]"));
    }
    let icmp = match (&r.icmp_type, &r.icmp_code) {
        (None, None) => None,
        (None, Some(c)) => return Err(src.error(c.span(), "icmp_code needs icmp_type")),
        (Some(t), code) => {
            if !only(&[IPPROTO_ICMP, IPPROTO_ICMPV6]) {
                return Err(src.error(t.span(), "icmp_type needs proto = \"icmp\" or \"icmpv6\""));
            }
            let families = proto.as_ref().map_or((false, false), |p| (p.contains(&IPPROTO_ICMP), p.contains(&IPPROTO_ICMPV6)));
            let byte = |v: &toml::Value, span: Range<usize>, what: &str| -> Result<u8, RulesError> {
                match v {
                    toml::Value::Integer(n) => u8::try_from(*n).map_err(|_| src.error(span, format!("{what} must be 0-255"))),
                    toml::Value::String(s) if what == "icmp_type" => {
                        let (v4, v6) = (icmp_type_by_name(s, false), icmp_type_by_name(s, true));
                        match families {
                            (true, false) => v4.ok_or(()),
                            (false, true) => v6.ok_or(()),
                            _ if v4.is_some() && v4 == v6 => v4.ok_or(()),
                            _ if v4.is_some() || v6.is_some() => {
                                return Err(src.error(span, format!(
                                    "icmp_type \"{s}\" is {} in ICMP and {} in ICMPv6: with proto = [\"icmp\", \"icmpv6\"] use numbers or one rule per protocol",
                                    v4.map_or("no type".into(), |t| format!("type {t}")),
                                    v6.map_or("no type".into(), |t| format!("type {t}"))
                                )));
                            }
                            _ => Err(()),
                        }
                        .map_err(|()| {
                            let family = if families == (true, false) { "ICMP" } else { "ICMPv6" };
                            let table: &[(&str, u8)] = if families == (true, false) { &ICMP_TYPE_NAMES } else { &ICMPV6_TYPE_NAMES };
                            let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
                            src.error(span, format!("unknown {family} type \"{s}\" (expected a number 0-255 or one of {})", known.join(", ")))
                        })
                    }
                    other => Err(src.error(span, format!("invalid {what} {other} (expected a number 0-255{})", if what == "icmp_type" { " or a type name" } else { "" }))),
                }
            };
            let list = |v: &Spanned<toml::Value>, what: &str| -> Result<Vec<u8>, RulesError> {
                let mut out = Vec::new();
                for item in items(v) {
                    out.push(byte(&item, v.span(), what)?);
                }
                if out.is_empty() {
                    return Err(src.error(v.span(), format!("an empty {what} list matches nothing; remove the field")));
                }
                out.sort_unstable();
                out.dedup();
                Ok(out)
            };
            Some(IcmpMatch { types: list(t, "icmp_type")?, codes: code.as_ref().map(|c| list(c, "icmp_code")).transpose()? })
        }
    };
    let tcp_flags = match &r.tcp_flags {
        None => None,
        Some(f) => {
            if !only(&[IPPROTO_TCP]) {
                return Err(src.error(f.span(), "tcp_flags needs proto = \"tcp\""));
            }
            Some(parse_tcp_flags(f.get_ref()).map_err(|m| src.error(f.span(), m))?)
        }
    };
    let owner = match &r.owner {
        None => None,
        Some(o) => {
            // Only TCP and UDP packets are addressed to a socket whose owner can be looked up.
            if !only(&[IPPROTO_TCP, IPPROTO_UDP]) {
                return Err(src.error(o.span(), "owner conditions need proto = \"tcp\", \"udp\" or [\"tcp\", \"udp\"]"));
            }
            let m = parse_owner(src, o)?;
            if !m.process.is_empty() && m.uid.is_empty() && m.user.is_empty() && m.exe.is_empty() {
                warnings.push(Warning {
                    location: src.location(o.span().start),
                    message: format!(
                        "rule \"{name}\": owner.process alone proves nothing (any user can name a process anything, or copy a binary to that name): add uid, user or exe"
                    ),
                });
            }
            Some(m)
        }
    };
    let limit = r.limit.as_ref().map(|l| parse_limit(src, l)).transpose()?;
    let state = r.state.as_ref().map(|v| parse_state(src, v, proto.as_deref())).transpose()?;
    if let (Some(v), Some(_)) = (&r.state, &owner) {
        // Userspace decides owner rules from the escalated rule on, without the packet's state.
        return Err(src.error(v.span(), "state and owner conditions cannot be on one rule (the escalation service decides owner rules without the packet's state)"));
    }
    let vlan = r.vlan.as_ref().map(|v| parse_vlan(src, v)).transpose()?;
    let log = match &r.log {
        None => None,
        Some(l) => parse_log(src, l)?,
    };
    Ok(Rule {
        name,
        action: parse_action(src, &r.action)?,
        owner,
        limit,
        state,
        vlan,
        log,
        src: addr(&r.src)?,
        dst: addr(&r.dst)?,
        proto,
        sport,
        dport,
        icmp,
        tcp_flags,
        comment: r.comment.clone(),
        location,
    })
}

/// `"100/s"`, `"6000/minute"`, `"10 mbytes/s"`: (rate, period in seconds, counts bytes).
pub fn parse_rate(s: &str) -> Result<(u64, u64, bool), String> {
    let (amount, period) = s.split_once('/').ok_or_else(|| format!("invalid rate \"{s}\" (expected e.g. \"100/s\" or \"10 mbytes/s\")"))?;
    let period_s = match period.trim() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        other => return Err(format!("invalid rate period \"{other}\" in \"{s}\" (expected s, minute or hour)")),
    };
    let amount = amount.trim();
    let digits = amount.find(|c: char| !c.is_ascii_digit()).unwrap_or(amount.len());
    let (number, unit) = amount.split_at(digits);
    let number: u64 = number.parse().map_err(|_| format!("invalid rate \"{s}\": it must start with a whole number"))?;
    let (scale, bytes) = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "packets" | "pkts" => (1, false),
        "b" | "bytes" => (1, true),
        "kb" | "kbytes" => (1 << 10, true),
        "mb" | "mbytes" => (1 << 20, true),
        "gb" | "gbytes" => (1 << 30, true),
        other => return Err(format!("invalid rate unit \"{other}\" in \"{s}\" (expected packets, bytes, kbytes, mbytes or gbytes)")),
    };
    let rate = number.checked_mul(scale).filter(|r| (1..=1 << 40).contains(r)).ok_or_else(|| format!("rate \"{s}\" must be between 1 and 2^40 a period"))?;
    Ok((rate, period_s, bytes))
}

/// `per = "source"`, `"source/24"` (IPv4 /24, IPv6 /128), `"source/64"` (IPv4 /32, IPv6 /64) or
/// `"source/24/64"`: the prefix lengths a source is counted by.
pub fn parse_per(s: &str) -> Result<(u8, u8), String> {
    let bad = || format!("invalid per \"{s}\" (expected \"source\", \"source/N\" (N up to 32: IPv4, above: IPv6) or \"source/V4/V6\")");
    let rest = s.strip_prefix("source").ok_or_else(bad)?;
    let lens: Vec<&str> = if rest.is_empty() { vec![] } else { rest.strip_prefix('/').ok_or_else(bad)?.split('/').collect() };
    let len = |t: &str, max: u8| t.parse::<u8>().ok().filter(|l| (1..=max).contains(l)).ok_or_else(bad);
    match lens.as_slice() {
        [] => Ok((32, 128)),
        [n] => {
            let n = len(n, 128)?;
            Ok(if n <= 32 { (n, 128) } else { (32, n) })
        }
        [v4, v6] => Ok((len(v4, 32)?, len(v6, 128)?)),
        _ => Err(bad()),
    }
}

/// A rule's `state`: `"established"`, `"related"`, `"new"` or a list of them. Only ICMP errors
/// are related, so a rule whose protocols leave none out has no use for `"related"` alone.
fn parse_state(src: &Source, v: &Spanned<toml::Value>, proto: Option<&[u8]>) -> Result<Vec<crate::packet::FlowState>, RulesError> {
    use crate::packet::FlowState;
    let mut out = Vec::new();
    for item in items(v) {
        let toml::Value::String(s) = item else {
            return Err(src.error(v.span(), format!("state must be \"new\", \"established\", \"related\" or a list of them, not {item}")));
        };
        out.push(s.parse::<FlowState>().map_err(|m| src.error(v.span(), m))?);
    }
    if out.is_empty() {
        return Err(src.error(v.span(), "an empty state list matches nothing; remove the field"));
    }
    out.sort_unstable();
    out.dedup();
    if out == [FlowState::Related] && proto.is_some_and(|p| !p.contains(&IPPROTO_ICMP) && !p.contains(&IPPROTO_ICMPV6)) {
        return Err(src.error(v.span(), "state \"related\" matches ICMP errors only: this rule's protocols have none"));
    }
    Ok(out)
}

/// A rule's `vlan`: an id (1-4094: 0 is a priority tag without a VLAN, 4095 is reserved) or a
/// list of them.
fn parse_vlan(src: &Source, v: &Spanned<toml::Value>) -> Result<Vec<u16>, RulesError> {
    let mut out = Vec::new();
    for item in items(v) {
        match item {
            toml::Value::Integer(id) if (1..=4094).contains(&id) => out.push(id as u16),
            toml::Value::Integer(id) => return Err(src.error(v.span(), format!("vlan id {id} is out of range (1-4094)"))),
            other => return Err(src.error(v.span(), format!("vlan must be an id 1-4094 or a list of them, not {other}"))),
        }
    }
    if out.is_empty() {
        return Err(src.error(v.span(), "an empty vlan list matches nothing; remove the field"));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A rule's `limit` table.
fn parse_limit(src: &Source, v: &Spanned<toml::Value>) -> Result<RateLimit, RulesError> {
    let toml::Value::Table(table) = v.get_ref() else {
        return Err(src.error(v.span(), "limit must be a table, e.g. limit = { rate = \"100/s\", burst = 200 }"));
    };
    let mut rate = None;
    let mut burst = None;
    let mut per = None;
    for (key, value) in table {
        match (key.as_str(), value) {
            ("rate", toml::Value::String(r)) => rate = Some(parse_rate(r).map_err(|m| src.error(v.span(), format!("limit.rate: {m}")))?),
            ("burst", toml::Value::Integer(b)) if (1..=1 << 40).contains(b) => burst = Some(*b as u64),
            ("burst", other) => return Err(src.error(v.span(), format!("limit.burst must be a whole number 1 to 2^40, not {other}"))),
            ("per", toml::Value::String(p)) => per = Some(parse_per(p).map_err(|m| src.error(v.span(), format!("limit.per: {m}")))?),
            ("rate" | "per", other) => return Err(src.error(v.span(), format!("limit.{key} must be a string, not {other}"))),
            (other, _) => return Err(src.error(v.span(), format!("unknown limit key \"{other}\" (expected rate, burst, per)"))),
        }
    }
    let Some((rate, period_s, bytes)) = rate else {
        return Err(src.error(v.span(), "limit needs a rate, e.g. rate = \"100/s\""));
    };
    // The kernel multiplies a frame's length by the nanoseconds of a byte (fixed point): keep
    // that product inside 64 bits for frames up to 128 KiB.
    if bytes && rate * 2 < period_s {
        return Err(src.error(v.span(), "limit.rate: a bytes rate must be at least one byte every two seconds"));
    }
    // Without a burst: one second's worth (at least one packet, or a full-size frame).
    let per_second = (rate / period_s).max(1);
    let burst = burst.unwrap_or(if bytes { per_second.max(1514) } else { per_second });
    Ok(RateLimit { rate, period_s, bytes, burst, per_source: per })
}

/// A rule's `log`: `true`, `false`, or a table of `prefix`, `rate` (packets) and `burst`.
fn parse_log(src: &Source, v: &Spanned<toml::Value>) -> Result<Option<LogSpec>, RulesError> {
    let table = match v.get_ref() {
        toml::Value::Boolean(true) => return Ok(Some(LogSpec::DEFAULT)),
        toml::Value::Boolean(false) => return Ok(None),
        toml::Value::Table(t) => t,
        other => {
            return Err(src.error(v.span(), format!("log must be true, false or a table, e.g. log = {{ prefix = \"ssh: \", rate = \"10/s\" }}, not {other}")));
        }
    };
    let mut spec = LogSpec::DEFAULT;
    let mut burst = None;
    for (key, value) in table {
        match (key.as_str(), value) {
            ("prefix", toml::Value::String(p)) => {
                if p.len() > MAX_LOG_PREFIX || p.chars().any(char::is_control) {
                    return Err(src.error(v.span(), format!("log.prefix must be at most {MAX_LOG_PREFIX} bytes of printable text")));
                }
                spec.prefix = Some(p.clone());
            }
            ("rate", toml::Value::String(r)) => {
                let (rate, period_s, bytes) = parse_rate(r).map_err(|m| src.error(v.span(), format!("log.rate: {m}")))?;
                if bytes {
                    return Err(src.error(v.span(), format!("log.rate counts packets, not bytes: \"{r}\"")));
                }
                (spec.rate, spec.period_s) = (rate, period_s);
            }
            ("burst", toml::Value::Integer(b)) if (1..=1 << 40).contains(b) => burst = Some(*b as u64),
            ("burst", other) => return Err(src.error(v.span(), format!("log.burst must be a whole number 1 to 2^40, not {other}"))),
            ("prefix" | "rate", other) => return Err(src.error(v.span(), format!("log.{key} must be a string, not {other}"))),
            (other, _) => return Err(src.error(v.span(), format!("unknown log key \"{other}\" (expected prefix, rate, burst)"))),
        }
    }
    // Without a burst: one second's worth, at least one packet.
    spec.burst = burst.unwrap_or((spec.rate / spec.period_s).max(1));
    Ok(Some(spec))
}

fn strings(src: &Source, v: &Spanned<toml::Value>) -> Result<Vec<String>, RulesError> {
    match v.get_ref() {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                toml::Value::String(s) => Ok(s.clone()),
                other => Err(src.error(v.span(), format!("expected a string, found {other}"))),
            })
            .collect(),
        other => Err(src.error(v.span(), format!("expected a string or a list of strings, found {other}"))),
    }
}

pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| p.trim().parse::<u16>().map_err(|_| format!("invalid port \"{p}\" in \"{s}\""));
    match s.split_once('-') {
        Some((lo, hi)) => Ok(port(lo)?..=port(hi)?),
        None => {
            let p = port(s)?;
            Ok(p..=p)
        }
    }
}

/// `"syn !ack"` (names, `!` for must-be-clear) or the iptables-like `"S/SA"` (set / examined).
pub fn parse_tcp_flags(s: &str) -> Result<TcpFlagsMatch, String> {
    let letters = |part: &str| -> Result<u8, String> {
        part.chars().try_fold(0u8, |acc, c| {
            tcp_flag_by_letter(c)
                .map(|bit| acc | bit)
                .ok_or_else(|| format!("unknown TCP flag letter '{c}' in \"{s}\" (use F S R P A U E C)"))
        })
    };
    if let Some((set, mask)) = s.split_once('/') {
        let set = letters(set.trim())?;
        let mask = letters(mask.trim())?;
        if mask == 0 {
            return Err(format!("\"{s}\" names no flag after '/': it would match every TCP packet (e.g. \"S/SA\": SYN set, ACK clear)"));
        }
        if set & !mask != 0 {
            return Err(format!("in \"{s}\" the flags before '/' must also appear after it"));
        }
        return Ok(TcpFlagsMatch { set, clear: mask & !set });
    }
    let mut m = TcpFlagsMatch { set: 0, clear: 0 };
    for word in s.split([' ', ',']).filter(|w| !w.is_empty()) {
        let (neg, name) = match word.strip_prefix('!') {
            Some(n) => (true, n),
            None => (false, word),
        };
        let bit = tcp_flag_by_name(name).ok_or_else(|| format!("unknown TCP flag \"{name}\" (use fin syn rst psh ack urg ece cwr, ! to negate)"))?;
        if neg { m.clear |= bit } else { m.set |= bit }
    }
    if m.set & m.clear != 0 {
        return Err(format!("\"{s}\" asks for a flag to be both set and clear"));
    }
    if m.set == 0 && m.clear == 0 {
        return Err("empty tcp_flags".into());
    }
    Ok(m)
}

/// Content hash of a ruleset and its set files. Unambiguous: each part is hashed with its name
/// (the set file as written) and both lengths, so no two different rulesets (say, a line moved
/// from one set file to the next) hash the same input.
/// The SHA-256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// The ruleset hash (version 3): parts of (name, content) in order, where a set file's content
/// is its own SHA-256, so an unchanged set file need not be hashed again (version 2 hashed the
/// set files' bytes themselves).
struct Sha256Hasher(sha2::Sha256);

impl Sha256Hasher {
    fn new() -> Self {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"xdpfw-ruleset-v3\0");
        Self(h)
    }
    fn part(&mut self, name: &[u8], data: &[u8]) {
        use sha2::Digest;
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name);
        self.0.update((data.len() as u64).to_le_bytes());
        self.0.update(data);
    }
    fn finish(self) -> String {
        use sha2::Digest;
        self.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("r.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_column() {
        assert!(err("default = \"pass\"\n[[rule]\n").starts_with("r.toml:2:"), "{}", err("default = \"pass\"\n[[rule]\n"));
        assert_eq!(
            err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"10.0.0.1/8\"]\n"),
            "r.toml:4:7: error: \"10.0.0.1/8\" has host bits set (did you mean 10.0.0.0/8?)"
        );
        assert!(err("default = \"pass\"\n[[rule]]\naction = \"reject\"\n").contains("r.toml:3:10: error: unknown action \"reject\""));
        assert!(err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@nope\"]\n").contains("unknown set \"@nope\""));
        assert!(err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nproto = \"udp\"\ntcp_flags = \"syn\"\n").contains("tcp_flags needs proto = \"tcp\""));
        assert!(err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nbogus = 1\n").contains("unknown field `bogus`"));
        assert!(err("[[rule]]\naction = \"drop\"\n").contains("missing field `default`"));
    }

    fn rules(text: &str) -> Ruleset {
        parse(Path::new("r.toml"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn icmp_types_are_lists_and_names() {
        let rs = rules(
            "default = \"pass\"\n[[rule]]\naction = \"drop\"\nproto = \"icmpv6\"\nicmp_type = [\"echo-request\", 1, \"Neighbour-Solicitation\"]\n\
             [[rule]]\naction = \"drop\"\nproto = \"icmp\"\nicmp_type = \"echo-request\"\nicmp_code = [0, 3]\n\
             [[rule]]\naction = \"drop\"\nproto = [\"icmp\", \"icmpv6\"]\nicmp_type = [3, 128]\n",
        );
        assert_eq!(rs.rules[0].icmp, Some(IcmpMatch { types: vec![1, 128, 135], codes: None }));
        assert_eq!(rs.rules[1].icmp, Some(IcmpMatch { types: vec![8], codes: Some(vec![0, 3]) }));
        assert_eq!(rs.rules[2].icmp.as_ref().unwrap().types, vec![3, 128]);
        let rule = "default = \"pass\"\n[[rule]]\naction = \"drop\"\n";
        assert_eq!(
            err(&format!("{rule}proto = \"icmp\"\nicmp_type = [8, \"echo-requets\"]\n")).lines().next().unwrap().split(" (expected").next().unwrap(),
            "r.toml:5:13: error: unknown ICMP type \"echo-requets\""
        );
        assert!(err(&format!("{rule}proto = [\"icmp\", \"icmpv6\"]\nicmp_type = \"echo-request\"\n"))
            .starts_with("r.toml:5:13: error: icmp_type \"echo-request\" is type 8 in ICMP and type 128 in ICMPv6"));
        assert!(err(&format!("{rule}proto = \"icmp\"\nicmp_type = 300\n")).starts_with("r.toml:5:13: error: icmp_type must be 0-255"));
        assert!(err(&format!("{rule}proto = \"icmp\"\nicmp_type = 8\nicmp_code = [\"x\"]\n")).starts_with("r.toml:6:13: error: invalid icmp_code"));
        assert!(err(&format!("{rule}proto = \"icmp\"\nicmp_type = []\n")).starts_with("r.toml:5:13: error: an empty icmp_type list"));
    }

    #[test]
    fn port_and_protocol_sets() {
        let rs = rules(
            "default = \"drop\"\n[portsets.web]\nports = [80, 443, \"8000-8100\"]\n[protosets.l4]\nprotos = [\"tcp\", 17]\n\
             [[rule]]\naction = \"pass\"\nproto = \"@l4\"\ndport = [\"@web\", 22]\n\
             [[rule]]\naction = \"pass\"\nproto = \"tcp\"\nsport = \"!@web\"\n",
        );
        assert_eq!(rs.rules[0].proto, Some(vec![6, 17]));
        assert_eq!(rs.rules[0].dport, Some(PortMatch { ranges: Some(vec![80..=80, 443..=443, 8000..=8100, 22..=22]), except: vec![] }));
        assert_eq!(rs.rules[1].sport, Some(PortMatch { ranges: None, except: vec![80..=80, 443..=443, 8000..=8100] }));
        let head = "default = \"pass\"\n[portsets.web]\nports = [80]\n[[rule]]\naction = \"drop\"\n";
        assert_eq!(err(&format!("{head}proto = \"tcp\"\ndport = \"@webb\"\n")), "r.toml:7:9: error: unknown portset \"@webb\"");
        assert_eq!(err(&format!("{head}proto = \"@nope\"\n")), "r.toml:6:9: error: unknown protoset \"@nope\"");
        assert!(err("default = \"pass\"\n[portsets.a]\nports = [\"!80\"]\n").starts_with("r.toml:3:9: error: portset \"a\": items are ports"));
        assert!(err("default = \"pass\"\n[portsets.a]\nports = []\n").starts_with("r.toml:3:9: error: portset \"a\" is empty"));
        assert!(err("default = \"pass\"\n[protosets.p]\nprotos = [\"any\"]\n").starts_with("r.toml:3:10: error: protoset \"p\": items are protocol"));
        assert!(err("default = \"pass\"\n[protosets.p]\nprotos = [\"sctp\"]\n").starts_with("r.toml:3:10: error: protoset \"p\": unknown protocol \"sctp\""));
        assert!(err("default = \"pass\"\n[portsets.\"a b\"]\nports = [1]\n").starts_with("r.toml:2:11: error: portset name \"a b\""));
    }

    #[test]
    fn negated_addresses_ports_and_protocols() {
        let rs = rules(
            "default = \"pass\"\n[sets.office]\nprefixes = [\"198.51.100.0/24\"]\n\
             [[rule]]\naction = \"drop\"\nsrc = [\"!@office\"]\n\
             [[rule]]\naction = \"drop\"\nsrc = [\"10.0.0.0/8\", \"!10.1.0.0/16\"]\nproto = \"tcp\"\ndport = [\"!22\", \"!8000-8100\"]\n\
             [[rule]]\naction = \"drop\"\nproto = \"!tcp\"\n\
             [[rule]]\naction = \"drop\"\nproto = [\"any\", \"!udp\", \"!icmp\"]\n",
        );
        let src = rs.rules[0].src.as_ref().unwrap();
        assert!(!src.has_positive() && src.except.as_ref().unwrap().sets[0].0 == "office");
        assert!(src.check("198.51.100.7".parse().unwrap(), "src").unwrap_err().contains("excluded !198.51.100.0/24 of set @office"));
        assert!(src.check("192.0.2.1".parse().unwrap(), "src").is_ok());
        let src = rs.rules[1].src.as_ref().unwrap();
        assert!(src.check("10.2.0.1".parse().unwrap(), "src").is_ok());
        assert!(src.check("10.1.0.1".parse().unwrap(), "src").is_err());
        assert!(src.check("11.0.0.1".parse().unwrap(), "src").is_err());
        let dport = rs.rules[1].dport.as_ref().unwrap();
        assert_eq!(dport.effective(), vec![0..=21, 23..=7999, 8101..=65535]);
        assert!(dport.matches(23) && !dport.matches(22) && !dport.matches(8050));
        assert_eq!(rs.rules[2].proto.as_ref().unwrap().len(), 255);
        assert!(!rs.rules[2].proto.as_ref().unwrap().contains(&6));
        assert!(!rs.rules[3].proto.as_ref().unwrap().contains(&17) && rs.rules[3].proto.as_ref().unwrap().len() == 254);
        // Ports need the protocol to be tcp and/or udp, also when negated.
        assert_eq!(
            err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nproto = \"!tcp\"\ndport = \"!22\"\n"),
            "r.toml:5:9: error: ports need proto = \"tcp\", \"udp\" or [\"tcp\", \"udp\"]"
        );
        assert_eq!(err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nproto = \"!any\"\n"), "r.toml:4:9: error: \"!any\" matches nothing");
        assert_eq!(err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = \"!10.0.0.1/8\"\n"), "r.toml:4:7: error: \"10.0.0.1/8\" has host bits set (did you mean 10.0.0.0/8?)");
        assert!(err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nproto = \"tcp\"\ndport = \"!x\"\n").starts_with("r.toml:5:9: error: dport: invalid port \"x\""));
        let w = rules("default = \"pass\"\n[[rule]]\naction = \"drop\"\nproto = [\"tcp\", \"!tcp\"]\n").warnings;
        assert!(w.iter().any(|w| w.to_string() == "r.toml:4:9: warning: rule \"rule-1\" can never match: its proto excludes every protocol it names"), "{w:?}");
    }

    #[test]
    fn log_parses_and_says_where_it_is_wrong() {
        let rs = rules(
            "default = \"pass\"\n[[rule]]\nname = \"a\"\naction = \"drop\"\nlog = true\n\
             [[rule]]\nname = \"b\"\naction = \"pass\"\nlog = { prefix = \"ssh: \", rate = \"2/minute\", burst = 5 }\n\
             [[rule]]\nname = \"c\"\naction = \"pass\"\nlog = false\n\
             [[test]]\npacket = \"udp 192.0.2.1:1 -> 192.0.2.2:2\"\nexpect = \"drop\"\n",
        );
        assert_eq!(rs.rules[0].log, Some(LogSpec::DEFAULT));
        assert_eq!(rs.rules[1].log, Some(LogSpec { prefix: Some("ssh: ".into()), rate: 2, period_s: 60, burst: 5 }));
        assert_eq!(rs.rules[2].log, None);
        let k = rs.rules[1].log.as_ref().unwrap().kernel();
        assert_eq!((k.interval_ns, k.burst_ns), (30_000_000_000, 150_000_000_000));
        // Logging changes no verdict, and explain says it logs.
        let d = crate::matcher::decide(&rs, &"udp 192.0.2.1:1 -> 192.0.2.2:2".parse().unwrap());
        assert_eq!((d.action, d.rule), (Action::Drop, Some(0)));
        assert!(d.reasons.iter().any(|r| r.contains("logged (at most 10/s burst 10)")), "{d:?}");
        assert!(crate::selftest::self_test_failures::<()>(&rs, None).unwrap().is_empty());
        let rule = "default = \"pass\"\n[[rule]]\naction = \"drop\"\n";
        for (log, message) in [
            ("\"yes\"", "r.toml:4:7: error: log must be true, false or a table"),
            ("{ rate = \"10 mbytes/s\" }", "r.toml:4:7: error: log.rate counts packets, not bytes"),
            ("{ rate = \"10/fortnight\" }", "r.toml:4:7: error: log.rate: invalid rate period \"fortnight\""),
            ("{ burst = 0 }", "r.toml:4:7: error: log.burst must be a whole number"),
            ("{ prefix = \"a\\nb\" }", "r.toml:4:7: error: log.prefix must be at most 64 bytes of printable text"),
            ("{ prefix = 1 }", "r.toml:4:7: error: log.prefix must be a string"),
            ("{ level = \"warn\" }", "r.toml:4:7: error: unknown log key \"level\" (expected prefix, rate, burst)"),
        ] {
            let e = err(&format!("{rule}log = {log}\n"));
            assert!(e.starts_with(message), "{log}: {e}");
        }
    }

    #[test]
    fn neighbour_discovery_types_warn() {
        let rs = rules(
            "default = \"pass\"\n[[rule]]\nname = \"rogue-ra\"\naction = \"drop\"\nproto = \"icmpv6\"\nicmp_type = [\"router-advertisement\", 137]\n\
             [[rule]]\nname = \"mixed\"\naction = \"drop\"\nproto = \"icmpv6\"\nicmp_type = [128, 135]\n\
             [[rule]]\nname = \"v4\"\naction = \"drop\"\nproto = \"icmp\"\nicmp_type = 134\n",
        );
        let w: Vec<String> = rs.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w, [
            "r.toml:2:1: warning: rule \"rogue-ra\" can never match: ICMPv6 type 134 (router-advertisement), 137 (redirect) always passes before any rule (neighbour discovery and router messages)",
            "r.toml:7:1: warning: rule \"mixed\": ICMPv6 type 135 (neighbor-solicitation) always passes before any rule (neighbour discovery and router messages)",
        ]);
    }

    #[test]
    fn neighbour_discovery_under_the_rules() {
        let text = |nd: &str, rules: &str| format!("default = \"drop\"\n[options]\nicmpv6_nd = \"{nd}\"\n{rules}");
        let ra = "[[rule]]\nname = \"no-rogue-ra\"\naction = \"drop\"\nproto = \"icmpv6\"\nicmp_type = [\"router-advertisement\", \"redirect\"]\n\
                  [[rule]]\nname = \"nd\"\naction = \"pass\"\nproto = \"icmpv6\"\nicmp_type = [133, 135, 136]\n";
        let rs = rules(&text("rules", ra));
        assert_eq!(rs.icmpv6_nd, NdPolicy::Rules);
        assert!(rs.warnings.is_empty(), "{:?}", rs.warnings);
        let decide = |rs: &Ruleset, p: &str| crate::matcher::decide(rs, &p.parse().unwrap());
        assert_eq!(decide(&rs, "icmpv6 fe80::1 -> ff02::1 type 134").rule_name.as_deref(), Some("no-rogue-ra"));
        assert_eq!(decide(&rs, "icmpv6 fe80::1 -> ff02::1 type 135").action, Action::Pass);
        let always = rules(&text("always-pass", ra));
        assert_eq!(decide(&always, "icmpv6 fe80::1 -> ff02::1 type 134").action, Action::Pass);
        assert!(always.warnings.iter().any(|w| w.message.contains("\"no-rogue-ra\" can never match")));
        // Under the rules, a ruleset that drops the host's own neighbour discovery is told so.
        let w = rules(&text("rules", "")).warnings;
        assert!(w.iter().any(|w| w.message.starts_with("icmpv6_nd = \"rules\" and the default action drops neighbour solicitations")), "{w:?}");
        assert_eq!(err(&text("sometimes", "")), "r.toml:3:13: error: unknown icmpv6_nd policy \"sometimes\" (expected always-pass or rules)");
    }

    #[test]
    fn limits_parse_and_say_where_they_are_wrong() {
        let rs = rules(
            "default = \"pass\"\n[[rule]]\naction = \"pass\"\nlimit = { rate = \"100/s\", burst = 200, per = \"source/24\" }\n\
             [[rule]]\naction = \"pass\"\nlimit = { rate = \"10 mbytes/s\" }\n\
             [[rule]]\naction = \"pass\"\nlimit = { rate = \"6000/minute\", per = \"source/64\" }\n",
        );
        assert_eq!(rs.rules[0].limit, Some(RateLimit { rate: 100, period_s: 1, bytes: false, burst: 200, per_source: Some((24, 128)) }));
        assert_eq!(rs.rules[1].limit, Some(RateLimit { rate: 10 << 20, period_s: 1, bytes: true, burst: 10 << 20, per_source: None }));
        assert_eq!(rs.rules[2].limit.as_ref().map(|l| (l.burst, l.per_source)), Some((100, Some((32, 64)))));
        let k = rs.rules[0].limit.as_ref().unwrap().kernel();
        assert_eq!((k.interval_ns, k.burst_ns, k.per_source, k.v4_prefix, k.v6_prefix), (10_000_000, 2_000_000_000, 1, 24, 128));
        assert_eq!(parse_per("source/24/64"), Ok((24, 64)));
        assert!(parse_per("dest").is_err() && parse_per("source/0").is_err() && parse_per("source/33/129").is_err());
        let rule = "default = \"pass\"\n[[rule]]\naction = \"pass\"\n";
        for (limit, message) in [
            ("{ rate = \"100/fortnight\" }", "r.toml:4:9: error: limit.rate: invalid rate period \"fortnight\""),
            ("{ rate = \"many/s\" }", "r.toml:4:9: error: limit.rate: invalid rate \"many/s\": it must start with a whole number"),
            ("{ rate = \"5 parsecs/s\" }", "r.toml:4:9: error: limit.rate: invalid rate unit \"parsecs\""),
            ("{ rate = \"0/s\" }", "r.toml:4:9: error: limit.rate: rate \"0/s\" must be between 1 and 2^40"),
            ("{ rate = \"1 bytes/h\" }", "r.toml:4:9: error: limit.rate: a bytes rate must be at least one byte every two seconds"),
            ("{ burst = 5 }", "r.toml:4:9: error: limit needs a rate"),
            ("{ rate = \"1/s\", burst = 0 }", "r.toml:4:9: error: limit.burst must be a whole number"),
            ("{ rate = \"1/s\", per = \"destination\" }", "r.toml:4:9: error: limit.per: invalid per \"destination\""),
            ("{ rate = \"1/s\", colour = 1 }", "r.toml:4:9: error: unknown limit key \"colour\""),
            ("\"1/s\"", "r.toml:4:9: error: limit must be a table"),
        ] {
            let e = err(&format!("{rule}limit = {limit}\n"));
            assert!(e.starts_with(message), "{limit}: {e}");
        }
        // A limited rule does not shadow the rules after it.
        let rs = rules("default = \"pass\"\n[[rule]]\naction = \"pass\"\nproto = \"icmp\"\nlimit = { rate = \"1/s\" }\n[[rule]]\naction = \"drop\"\nproto = \"icmp\"\n");
        assert!(rs.warnings.is_empty(), "{:?}", rs.warnings);
        let d = crate::matcher::decide(&rs, &"icmp 192.0.2.1 -> 192.0.2.2 type 8".parse().unwrap());
        assert!(d.reasons.iter().any(|r| r.contains("within the rule's limit (1/s burst 1); beyond it, later rules decide")), "{d:?}");
        let d = crate::matcher::decide_with_limits(&rs, &"icmp 192.0.2.1 -> 192.0.2.2 type 8".parse().unwrap(), &mut |_| false);
        assert_eq!((d.action, d.rule), (Action::Drop, Some(1)));
        assert!(d.reasons[0].contains("matched but the packet is beyond its limit"), "{d:?}");
    }

    #[test]
    fn extension_header_protocols_warn() {
        let rs = rules("default = \"pass\"\n[[rule]]\nname = \"ah\"\naction = \"drop\"\nproto = [51, \"tcp\"]\n[[rule]]\naction = \"drop\"\nproto = \"!tcp\"\n");
        let w: Vec<String> = rs.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("r.toml:5:9: warning: rule \"ah\": protocol 51 is the IPv6 AH extension header"), "{w:?}");
    }

    #[test]
    fn includes_read_relative_files_in_order() {
        let dir = std::env::temp_dir().join(format!("xdpfw-rules-include-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
        write("sub/a.toml", "include = [\"b.toml\"]\n[portsets.web]\nports = [80, 443]\n[[rule]]\nname = \"a\"\naction = \"pass\"\nproto = \"tcp\"\ndport = \"@web\"\n");
        write("sub/b.toml", "[sets.office]\nfile = \"office.txt\"\n[[rule]]\nname = \"b\"\naction = \"drop\"\nsrc = \"!@office\"\n");
        write("sub/office.txt", "198.51.100.0/24\n");
        let root = "include = [\"sub/a.toml\"]\ndefault = \"drop\"\n[[rule]]\nname = \"own\"\naction = \"pass\"\nsrc = \"@office\"\n";
        let path = dir.join("r.toml");
        let rs = parse(&path, root).unwrap();
        let names: Vec<&str> = rs.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "own"], "included rules come first, depth first");
        let files: Vec<&str> = rs.set_files.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(files, ["sub/b.toml", "sub/a.toml", "sub/office.txt"]);
        // The hash covers included files.
        let before = rs.hash.clone();
        write("sub/b.toml", "[sets.office]\nfile = \"office.txt\"\n[[rule]]\nname = \"b\"\naction = \"pass\"\nsrc = \"!@office\"\n");
        assert_ne!(parse(&path, root).unwrap().hash, before);
        // Errors name the included file, line and column, and how it was reached.
        write("sub/b.toml", "[[rule]]\naction = \"drop\"\nsrc = \"10.0.0.1/8\"\n");
        let e = parse(&path, root).unwrap_err().to_string();
        let b = dir.join("sub/b.toml");
        assert!(e.starts_with(&format!("{}:3:7: error: \"10.0.0.1/8\" has host bits set", b.display())), "{e}");
        assert!(e.contains(&format!("(in a file included from {}:1:12) (in a file included from {}:1:12)", dir.join("sub/a.toml").display(), path.display())), "{e}");
        write("sub/b.toml", "[[rule]\n");
        assert!(parse(&path, root).unwrap_err().to_string().starts_with(&format!("{}:1:", b.display())));
        // Only the rules file sets the policy.
        write("sub/b.toml", "default = \"pass\"\n");
        assert!(parse(&path, root).unwrap_err().to_string().starts_with(&format!("{}:1:11: error: default may only be set in the rules file", b.display())));
        // Cycles, files included twice, missing files, remote rulesets.
        write("sub/b.toml", "include = [\"a.toml\"]\n");
        let e = parse(&path, root).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:1:12: error: include cycle: ", b.display())) && e.contains("a.toml includes"), "{e}");
        write("sub/b.toml", "include = [\"../r.toml\"]\n");
        write("r.toml", root);
        assert!(parse(&path, root).unwrap_err().to_string().contains("include cycle"));
        write("sub/b.toml", "");
        let e = parse(&path, "include = [\"sub/b.toml\", \"sub/b.toml\"]\ndefault = \"drop\"\n").unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:1:26: error: ", path.display())) && e.contains("is included twice"), "{e}");
        let e = parse(&path, "include = [\"nope.toml\"]\ndefault = \"drop\"\n").unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:1:12: error: cannot read included file", path.display())), "{e}");
        let e = parse_from(&path, root, Origin::Remote).unwrap_err().to_string();
        assert!(e.contains("1:12: error: include names a file, but a ruleset from a URL must be self-contained"), "{e}");
        // Depth is bounded: a chain of files, each including the next.
        for i in 0..12 {
            write(&format!("d{i}.toml"), &format!("include = [\"d{}.toml\"]\n", i + 1));
        }
        write("d12.toml", "");
        let e = parse(&path, "include = [\"d0.toml\"]\ndefault = \"drop\"\n").unwrap_err().to_string();
        assert!(e.contains(&format!("includes nest more than {MAX_INCLUDE_DEPTH} deep")), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn owner_and_escalation_errors_say_where() {
        let rule = "default = \"pass\"\n[[rule]]\naction = \"pass\"\n";
        assert_eq!(
            err(&format!("{rule}owner = {{ process = \"nginx\" }}\n")),
            "r.toml:4:9: error: owner conditions need proto = \"tcp\", \"udp\" or [\"tcp\", \"udp\"]"
        );
        assert!(err(&format!("{rule}proto = \"tcp\"\nowner = {{ colour = \"red\" }}\n")).contains("r.toml:5:9: error: unknown owner condition \"colour\""));
        assert!(err(&format!("{rule}proto = \"tcp\"\nowner = {{}}\n")).contains("an empty owner table"));
        assert!(err(&format!("{rule}proto = \"tcp\"\nowner = {{ exe = \"nginx\" }}\n")).contains("must be an absolute path"));
        assert!(err(&format!("{rule}proto = \"tcp\"\nowner = {{ uid = \"9-1\" }}\n")).contains("inverted"));
        assert!(err(&format!("{rule}proto = \"tcp\"\nowner = {{ cgroup = \"/user.slice\" }}\n")).contains("r.toml:5:9: error: owner.cgroup \"/user.slice\" is outside /system.slice"));
        assert!(err(&format!("{rule}proto = \"tcp\"\nowner = {{ cgroup = \"system.slice\" }}\n")).contains("must be a path from the cgroup root"));
        assert!(err(&format!("{rule}proto = \"tcp\"\nowner = {{ unit = \"a.service\", any_slice = 1 }}\n")).contains("any_slice: expected true or false"));
        let any = parse(Path::new("r.toml"), &format!("{rule}proto = \"tcp\"\nowner = {{ cgroup = \"/user.slice\", any_slice = true, uid = 0 }}\n")).unwrap();
        assert!(any.rules[0].owner.as_ref().unwrap().any_slice);
        assert!(any.warnings.is_empty(), "{:?}", any.warnings);
        // `process` alone: a warning where the owner table is (check --strict fails on it).
        let w = parse(Path::new("r.toml"), &format!("{rule}proto = \"tcp\"\nowner = {{ process = \"nginx\" }}\n")).unwrap().warnings;
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].to_string().starts_with("r.toml:5:9: warning: rule \"rule-1\": owner.process alone proves nothing"), "{}", w[0]);
        for with in ["uid = 33", "user = \"www-data\"", "exe = \"/usr/sbin/nginx\""] {
            let rs = parse(Path::new("r.toml"), &format!("{rule}proto = \"tcp\"\nowner = {{ process = \"nginx\", {with} }}\n")).unwrap();
            assert!(rs.warnings.is_empty(), "{with}: {:?}", rs.warnings);
        }
        assert!(err("default = \"pass\"\n[escalation]\nverdict_ttl = \"soon\"\n").contains("r.toml:3:15: error: verdict_ttl: invalid duration"));
        assert!(err("default = \"pass\"\n[escalation]\nretry = \"1ms\"\n").contains("retry must be between"));
        assert!(err("default = \"pass\"\n[escalation]\npending = \"maybe\"\n").contains("r.toml:3:11: error: unknown action"));
        let rs = parse(
            Path::new("r.toml"),
            "default = \"pass\"\n[escalation]\npending = \"pass\"\nverdict_ttl = \"5m\"\n[[rule]]\naction = \"pass\"\nproto = \"udp\"\nowner = { uid = [0, \"1000-1999\"], user = \"www\" }\n",
        )
        .unwrap();
        assert_eq!(rs.escalation.pending, Action::Pass);
        assert_eq!(rs.escalation.verdict_ttl, std::time::Duration::from_secs(300));
        let owner = rs.rules[0].owner.as_ref().unwrap();
        assert_eq!(owner.uid, vec![0..=0, 1000..=1999]);
        assert_eq!(owner.user, vec!["www".to_string()]);
        assert!(rs.needs_owner());
    }

    #[test]
    fn warnings_for_shadowed_rules_duplicates_and_inverted_ranges() {
        let rs = parse(
            Path::new("r.toml"),
            r#"default = "pass"
[[rule]]
name = "all-tcp"
action = "drop"
proto = "tcp"
[[rule]]
name = "ssh"
action = "pass"
proto = "tcp"
dport = 22
[[rule]]
name = "ssh"
action = "pass"
proto = "udp"
dport = "200-100"
"#,
        )
        .unwrap();
        let w: Vec<String> = rs.warnings.iter().map(ToString::to_string).collect();
        assert!(w.iter().any(|w| w.contains("r.toml:6:1") && w.contains("\"ssh\" can never match") && w.contains("\"all-tcp\"")), "{w:?}");
        assert!(w.iter().any(|w| w.contains("duplicate rule name \"ssh\"")), "{w:?}");
        assert!(w.iter().any(|w| w.contains("200-100 is inverted")), "{w:?}");
    }

    #[test]
    fn tcp_flags_in_both_notations() {
        assert_eq!(parse_tcp_flags("syn !ack").unwrap(), TcpFlagsMatch { set: 0x02, clear: 0x10 });
        assert_eq!(parse_tcp_flags("S/SA").unwrap(), TcpFlagsMatch { set: 0x02, clear: 0x10 });
        assert!(parse_tcp_flags("syn !syn").is_err());
        assert!(parse_tcp_flags("S/A").is_err());
        // No flag after '/' used to match every TCP packet silently.
        for s in ["/", " / ", "/ "] {
            assert!(parse_tcp_flags(s).unwrap_err().contains("names no flag after '/'"), "{s:?}");
        }
        assert_eq!(parse_tcp_flags("/S").unwrap(), TcpFlagsMatch { set: 0, clear: 0x02 });
        let e = err("default = \"pass\"\n[[rule]]\naction = \"drop\"\nproto = \"tcp\"\ntcp_flags = \"/\"\n");
        assert!(e.starts_with("r.toml:5:13: error: \"/\" names no flag"), "{e}");
    }

    #[test]
    fn non_utf8_files_are_reported_at_their_first_invalid_byte() {
        let dir = std::env::temp_dir().join(format!("xdpfw-rules-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Line 3, after "é" (two bytes, one character) and "x": column 3.
        std::fs::write(dir.join("r.toml"), b"default = \"pass\"\n# ok\n\xc3\xa9x\xff\n").unwrap();
        let e = load(&dir.join("r.toml")).unwrap_err().to_string();
        assert_eq!(e, format!("{}:3:3: error: not UTF-8: byte 0xff at line 3, column 3", dir.join("r.toml").display()));
        std::fs::write(dir.join("set.txt"), b"192.0.2.0/24\n198.51.100.0/24 \x80\n").unwrap();
        std::fs::write(dir.join("r.toml"), "default = \"pass\"\n[sets.b]\nfile = \"set.txt\"\n").unwrap();
        let e = load(&dir.join("r.toml")).unwrap_err().to_string();
        assert!(e.ends_with(&format!("{}:2:17: error: not UTF-8: byte 0x80 at line 2, column 17", dir.join("set.txt").display())), "{e}");
        std::fs::write(dir.join("inc.toml"), b"\xfe").unwrap();
        std::fs::write(dir.join("r.toml"), "include = [\"inc.toml\"]\ndefault = \"pass\"\n").unwrap();
        let e = load(&dir.join("r.toml")).unwrap_err().to_string();
        assert!(e.ends_with(&format!("{}:1:1: error: not UTF-8: byte 0xfe at line 1, column 1", dir.join("inc.toml").display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn set_files_report_their_own_line() {
        let dir = std::env::temp_dir().join(format!("xdpfw-rules-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("set.txt"), "# blocklist\n192.0.2.0/24\n\n  2001:db8::/33 # v6\n  10.0.0.300\n").unwrap();
        let text = "default = \"pass\"\n[sets.b]\nfile = \"set.txt\"\n";
        let e = parse(&dir.join("r.toml"), text).unwrap_err().to_string();
        assert!(e.ends_with("set.txt:5:3: error: invalid address \"10.0.0.300\""), "{e}");
        std::fs::write(dir.join("set.txt"), "192.0.2.0/24\n2001:db8::/33 # v6\n").unwrap();
        let rs = parse(&dir.join("r.toml"), text).unwrap();
        assert_eq!(rs.sets["b"].len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_hash_names_and_lengths_each_set_file() {
        let dir = std::env::temp_dir().join(format!("xdpfw-rules-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = "default = \"pass\"\n[sets.a]\nfile = \"a.txt\"\n[sets.b]\nfile = \"b.txt\"\n";
        let hash = |a: &str, b: &str| {
            std::fs::write(dir.join("a.txt"), a).unwrap();
            std::fs::write(dir.join("b.txt"), b).unwrap();
            parse(&dir.join("r.toml"), text).unwrap().hash
        };
        // The same bytes in sequence, split differently between the two files.
        let before = hash("192.0.2.0/24\n198.51.100.0/24\n", "203.0.113.0/24\n");
        let after = hash("192.0.2.0/24\n", "198.51.100.0/24\n203.0.113.0/24\n");
        assert_ne!(before, after);
        assert_eq!(after, hash("192.0.2.0/24\n", "198.51.100.0/24\n203.0.113.0/24\n"), "stable");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_remote_ruleset_names_no_file() {
        let text = "default = \"pass\"\n[sets.s]\nfile = \"/etc/shadow\"\n";
        let e = parse_from(Path::new("fetched.toml"), text, Origin::Remote).unwrap_err().to_string();
        assert!(e.starts_with("fetched.toml:3:8: error: set \"s\" names a file") && e.contains("self-contained"), "{e}");
        assert!(parse_from(Path::new("f.toml"), "default = \"pass\"\n[sets.s]\nprefixes = [\"192.0.2.0/24\"]\n", Origin::Remote).is_ok());
    }

    #[test]
    fn counts_are_refused_before_any_work_and_messages_are_capped() {
        let mut text = String::from("default = \"pass\"\n");
        for i in 0..50_000 {
            text.push_str(&format!("[[rule]]\nname = \"r{i}\"\naction = \"drop\"\nsrc = [\"192.0.2.{}/32\"]\n", i % 256));
        }
        let t = std::time::Instant::now();
        let e = err(&text);
        assert!(e.contains("too many rules: 50000 (the limit is 1024)") && e.starts_with("r.toml:4098:1:"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "{:?}", t.elapsed());
        let mut tests = String::from("default = \"pass\"\n");
        for _ in 0..=MAX_TESTS {
            tests.push_str("[[test]]\npacket = \"udp 192.0.2.1:1 -> 192.0.2.2:2\"\nexpect = \"pass\"\n");
        }
        assert!(err(&tests).contains("too many tests"), "{}", err(&tests));
        let long = format!("default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"{}\"]\n", "é".repeat(1 << 20));
        let e = err(&long);
        assert!(e.len() < 2 * MAX_MESSAGE && e.contains("more bytes)"), "{}", e.len());
    }

    #[test]
    fn set_files_must_be_regular_files() {
        let text = |f: &str| format!("default = \"pass\"\n[sets.s]\nfile = \"{f}\"\n");
        let e = parse(Path::new("/r.toml"), &text("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("cannot read set file /dev/zero: not a regular file"), "{e}");
        let e = parse(Path::new("/r.toml"), &text("/tmp")).unwrap_err().to_string();
        assert!(e.contains("cannot read set file /tmp: a directory"), "{e}");
    }
}
