//! The rules language (TOML): parsing, validation and diagnostics with file:line:column.
//!
//! ```toml
//! version = "2026-11-23.1"      # a label, shown by stats and kept in history
//! default = "drop"              # action when no rule matches
//! [options]
//! fragments = "l3-only"         # non-first fragments: l3-only | drop | pass
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
    owner::{OwnerMatch, OwnerSpec, parse_uid_range},
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

/// Prefixes of one rule field: inline CIDRs plus named sets (shared, not copied).
#[derive(Clone, Debug, Default)]
pub struct AddrList {
    pub inline: Vec<IpNet>,
    pub sets: Vec<(String, Arc<Vec<IpNet>>)>,
}

impl AddrList {
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
    pub fn len(&self) -> usize {
        self.inline.len() + self.sets.iter().map(|(_, s)| s.len()).sum::<usize>()
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpMatch {
    pub icmp_type: u8,
    pub code: Option<u8>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub src: Option<AddrList>,
    pub dst: Option<AddrList>,
    /// Protocol numbers, any of which matches.
    pub proto: Option<Vec<u8>>,
    pub sport: Option<Vec<RangeInclusive<u16>>>,
    pub dport: Option<Vec<RangeInclusive<u16>>>,
    pub icmp: Option<IcmpMatch>,
    pub tcp_flags: Option<TcpFlagsMatch>,
    /// Conditions on the local socket's owner: the kernel escalates the flows this rule would
    /// decide, and userspace evaluates them.
    pub owner: Option<OwnerMatch>,
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
    pub escalation: EscalationOptions,
    pub rules: Vec<Rule>,
    pub sets: BTreeMap<String, Arc<Vec<IpNet>>>,
    pub tests: Vec<SelfTest>,
    pub warnings: Vec<Warning>,
    /// SHA-256 of the rules file and every set file it reads, hex.
    pub hash: String,
    /// Set files as written in the rules file, and where they were read from.
    pub set_files: Vec<(String, PathBuf)>,
    /// Exactly the bytes that were parsed (and hashed): what a snapshot keeps.
    pub sources: Sources,
}

/// The texts a ruleset was parsed from: the rules text and each set file's text, by the name
/// the rules file gives it. [`parse_with_sets`] parses them again to the same ruleset (and hash)
/// without reading any file.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub rules: Arc<str>,
    pub sets: Vec<(String, Arc<str>)>,
}

impl Ruleset {
    pub fn prefix_count(&self) -> usize {
        self.rules
            .iter()
            .map(|r| r.src.as_ref().map_or(0, AddrList::len) + r.dst.as_ref().map_or(0, AddrList::len))
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
    version: Option<Spanned<String>>,
    default: Spanned<String>,
    #[serde(default)]
    options: RawOptions,
    escalation: Option<Spanned<RawEscalation>>,
    #[serde(default)]
    sets: BTreeMap<Spanned<String>, Spanned<RawSet>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    fragments: Option<Spanned<String>>,
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
struct RawRule {
    name: Option<Spanned<String>>,
    action: Spanned<String>,
    src: Option<Spanned<toml::Value>>,
    dst: Option<Spanned<toml::Value>>,
    proto: Option<Spanned<toml::Value>>,
    sport: Option<Spanned<toml::Value>>,
    dport: Option<Spanned<toml::Value>>,
    icmp_type: Option<Spanned<i64>>,
    icmp_code: Option<Spanned<i64>>,
    tcp_flags: Option<Spanned<String>>,
    owner: Option<Spanned<toml::Value>>,
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
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("grew beyond the limit of {max} bytes while read")));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 (byte {at})"))
    })
}

/// Reads and validates a rules file (and the set files it names).
pub fn load(path: &Path) -> Result<Ruleset, RulesError> {
    load_from(path, Origin::Local)
}

/// Reads and validates a rules file that came from `origin` (a remote one names no set file).
pub fn load_from(path: &Path, origin: Origin) -> Result<Ruleset, RulesError> {
    let text = read_bounded(path, MAX_RULES_TEXT).map_err(|e| RulesError {
        location: Location { file: path.to_path_buf(), line: 0, column: 0 },
        message: cap_text(format!("cannot read: {e}"), MAX_MESSAGE),
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

/// Parses rules text from `origin`: a [`Origin::Remote`] text may not name set files.
pub fn parse_from(path: &Path, text: &str, origin: Origin) -> Result<Ruleset, RulesError> {
    parse_inner(path, text, origin, None)
}

/// Parses rules text whose set files are given (by the name the text uses for each) instead of
/// read: a snapshot of the [`Sources`] of a ruleset parses to that ruleset, hash included, with
/// no file read. A set file the text names but `sets` lacks is an error.
pub fn parse_with_sets(path: &Path, text: &str, sets: &[(String, String)]) -> Result<Ruleset, RulesError> {
    parse_inner(path, text, Origin::Local, Some(sets))
}

fn parse_inner(path: &Path, text: &str, origin: Origin, provided: Option<&[(String, String)]>) -> Result<Ruleset, RulesError> {
    let src = Source::new(path, text);
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
    // Counted again on the parsed file (inline-table arrays escape the header count), still
    // before any per-rule work.
    if raw.rule.len() > xdpfw_common::MAX_RULES {
        return Err(src.error(
            raw.rule[xdpfw_common::MAX_RULES].span(),
            format!("too many rules: {} (the limit is {})", raw.rule.len(), xdpfw_common::MAX_RULES),
        ));
    }
    if raw.test.len() > MAX_TESTS {
        return Err(src.error(raw.test[MAX_TESTS].span(), format!("too many tests: {} (the limit is {MAX_TESTS})", raw.test.len())));
    }
    if origin == Origin::Remote
        && let Some((name, set)) = raw.sets.iter().find(|(_, s)| s.get_ref().file.is_some())
    {
        let span = set.get_ref().file.as_ref().map_or(set.span(), Spanned::span);
        return Err(src.error(span, format!(
            "set \"{}\" names a file, but a ruleset from a URL must be self-contained (inline `prefixes` only); no local file is read for it",
            name.get_ref()
        )));
    }
    let mut hasher = Sha256Hasher::new();
    hasher.part(b"rules", text.as_bytes());

    let default = parse_action(&src, &raw.default)?;
    let fragments = match &raw.options.fragments {
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

    let escalation = match &raw.escalation {
        None => EscalationOptions::default(),
        Some(e) => parse_escalation(&src, e.get_ref())?,
    };

    let mut sets = BTreeMap::new();
    let mut set_files = Vec::new();
    let mut set_texts = Vec::new();
    for (name, set) in &raw.sets {
        if let Some(f) = &set.get_ref().file {
            set_files.push((f.get_ref().clone(), path.parent().unwrap_or(Path::new(".")).join(f.get_ref())));
        }
        let prefixes = load_set(&src, name, set, &mut hasher, provided, &mut set_texts)?;
        sets.insert(name.get_ref().clone(), Arc::new(prefixes));
    }

    let mut warnings = Vec::new();
    let mut rules = Vec::with_capacity(raw.rule.len());
    let mut names = HashSet::new();
    for (i, raw_rule) in raw.rule.iter().enumerate() {
        let rule = parse_rule(&src, i, raw_rule, &sets, &mut warnings)?;
        if !names.insert(rule.name.clone()) {
            warnings.push(Warning {
                location: rule.location.clone(),
                message: format!("duplicate rule name \"{}\"", rule.name),
            });
        }
        rules.push(rule);
    }
    let mut tests = Vec::new();
    for t in &raw.test {
        let t = t.get_ref();
        let packet: PacketSpec = t
            .packet
            .get_ref()
            .parse()
            .map_err(|e: crate::SpecError| src.error(t.packet.span(), format!("bad test packet: {e}")))?;
        if let Some(name) = &t.rule
            && !names.contains(name)
        {
            return Err(src.error(t.packet.span(), format!("test names unknown rule \"{name}\"")));
        }
        tests.push(SelfTest {
            packet,
            text: t.packet.get_ref().clone(),
            expect: parse_action(&src, &t.expect)?,
            rule: t.rule.clone(),
            owner: t
                .owner
                .as_ref()
                .map(|o| o.get_ref().parse::<OwnerSpec>().map_err(|e| src.error(o.span(), format!("bad test owner: {e}"))))
                .transpose()?,
            location: src.location(t.packet.span().start),
        });
    }

    let mut ruleset = Ruleset {
        path: path.to_path_buf(),
        version: raw.version.map(|v| v.into_inner()),
        default,
        fragments,
        escalation,
        rules,
        sets,
        tests,
        warnings,
        hash: hasher.finish(),
        set_files,
        sources: Sources { rules: Arc::from(text), sets: set_texts },
    };
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
                    "unknown owner condition \"{other}\" (expected process, exe, uid, user, unit or cgroup)"
                )));
            }
        }
    }
    if m.is_empty() {
        return Err(src.error(v.span(), "an empty owner table matches every socket; remove it or name a process, exe, uid, user, unit or cgroup"));
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

fn load_set(
    src: &Source,
    name: &Spanned<String>,
    set: &Spanned<RawSet>,
    hasher: &mut Sha256Hasher,
    provided: Option<&[(String, String)]>,
    texts: &mut Vec<(String, Arc<str>)>,
) -> Result<Vec<IpNet>, RulesError> {
    let n = name.get_ref();
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return Err(src.error(name.span(), format!("set name \"{n}\" may use only letters, digits, '_' and '-'")));
    }
    let raw = set.get_ref();
    let mut out = Vec::new();
    for p in raw.prefixes.iter().flatten() {
        out.push(parse_cidr(p.get_ref()).map_err(|m| src.error(p.span(), m))?);
    }
    if let Some(file) = &raw.file {
        let base = src.path.parent().unwrap_or(Path::new("."));
        let path = base.join(file.get_ref());
        let text = match provided {
            None => read_bounded(&path, MAX_SET_FILE)
                .map_err(|e| src.error(file.span(), format!("cannot read set file {}: {e}", path.display())))?,
            Some(given) => match given.iter().find(|(written, _)| written == file.get_ref()) {
                Some((_, t)) if t.len() as u64 <= MAX_SET_FILE => t.clone(),
                Some(_) => return Err(src.error(file.span(), format!("set file {} is over the limit of {MAX_SET_FILE} bytes", file.get_ref()))),
                None => return Err(src.error(file.span(), format!("set file {} is not among the texts given", file.get_ref()))),
            },
        };
        hasher.part(file.get_ref().as_bytes(), text.as_bytes());
        texts.push((file.get_ref().clone(), Arc::from(text.as_str())));
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
    if raw.prefixes.is_none() && raw.file.is_none() {
        return Err(src.error(set.span(), format!("set \"{n}\" needs `prefixes` or `file`")));
    }
    let limit = xdpfw_common::MAX_PREFIXES as usize;
    if out.len() > limit {
        return Err(src.error(set.span(), format!("set \"{n}\" has {} prefixes (the limit is {limit})", out.len())));
    }
    Ok(out)
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

fn parse_rule(
    src: &Source,
    index: usize,
    raw: &Spanned<RawRule>,
    sets: &BTreeMap<String, Arc<Vec<IpNet>>>,
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
        for item in strings(src, v)? {
            if let Some(set) = item.strip_prefix('@') {
                let prefixes = sets
                    .get(set)
                    .ok_or_else(|| src.error(v.span(), format!("unknown set \"@{set}\"")))?;
                list.sets.push((set.to_string(), prefixes.clone()));
            } else {
                list.inline.push(parse_cidr(&item).map_err(|m| src.error(v.span(), m))?);
            }
        }
        if list.inline.is_empty() && list.sets.is_empty() {
            return Err(src.error(v.span(), "an empty address list matches nothing; remove the field to match any address"));
        }
        Ok(Some(list))
    };
    let proto = match &r.proto {
        None => None,
        Some(v) => {
            let mut protos = Vec::new();
            let items: Vec<toml::Value> = match v.get_ref() {
                toml::Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            let mut any = false;
            for item in items {
                match &item {
                    toml::Value::String(s) => match s.as_str() {
                        "tcp" => protos.push(IPPROTO_TCP),
                        "udp" => protos.push(IPPROTO_UDP),
                        "icmp" => protos.push(IPPROTO_ICMP),
                        "icmpv6" => protos.push(IPPROTO_ICMPV6),
                        "any" => any = true,
                        other => return Err(src.error(v.span(), format!("unknown protocol \"{other}\" (expected tcp, udp, icmp, icmpv6, any or a number)"))),
                    },
                    toml::Value::Integer(n) if (0..=255).contains(n) => protos.push(*n as u8),
                    other => return Err(src.error(v.span(), format!("invalid protocol {other}"))),
                }
            }
            if any { None } else { protos.sort_unstable(); protos.dedup(); Some(protos) }
        }
    };
    let mut ports = |v: &Option<Spanned<toml::Value>>, field: &str| -> Result<Option<Vec<RangeInclusive<u16>>>, RulesError> {
        let Some(v) = v else { return Ok(None) };
        let items: Vec<toml::Value> = match v.get_ref() {
            toml::Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        let mut out = Vec::new();
        for item in items {
            let range = match &item {
                toml::Value::Integer(n) if (0..=65535).contains(n) => (*n as u16)..=(*n as u16),
                toml::Value::String(s) => parse_port_range(s).map_err(|m| src.error(v.span(), m))?,
                other => return Err(src.error(v.span(), format!("invalid {field} {other} (expected a port 0-65535 or \"lo-hi\")"))),
            };
            if range.is_empty() {
                warnings.push(Warning {
                    location: src.location(v.span().start),
                    message: format!("rule \"{name}\": {field} range {}-{} is inverted and matches nothing", range.start(), range.end()),
                });
            }
            out.push(range);
        }
        if out.is_empty() {
            return Err(src.error(v.span(), format!("an empty {field} list matches nothing; remove the field to match any port")));
        }
        Ok(Some(out))
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
            let byte = |v: &Spanned<i64>, what: &str| -> Result<u8, RulesError> {
                u8::try_from(*v.get_ref()).map_err(|_| src.error(v.span(), format!("{what} must be 0-255")))
            };
            if !only(&[IPPROTO_ICMP, IPPROTO_ICMPV6]) {
                return Err(src.error(t.span(), "icmp_type needs proto = \"icmp\" or \"icmpv6\""));
            }
            Some(IcmpMatch { icmp_type: byte(t, "icmp_type")?, code: code.as_ref().map(|c| byte(c, "icmp_code")).transpose()? })
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
            Some(parse_owner(src, o)?)
        }
    };
    Ok(Rule {
        name,
        action: parse_action(src, &r.action)?,
        owner,
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
struct Sha256Hasher(sha2::Sha256);

impl Sha256Hasher {
    fn new() -> Self {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"xdpfw-ruleset-v2\0");
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
