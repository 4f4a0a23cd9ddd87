//! Everything the command line prints for people, in one place. Commands hand data here and
//! print what comes back; `--json` output is serialized by the commands themselves.

use std::fmt::Write;

use xdpfw_control::{
    ReloadReport, State, Stats,
    escalation::Report,
    history::Entry,
};
use xdpfw_rules::{matcher::Decision, packet::PacketSpec, short_hash};

/// `s` with control characters (terminal escapes, newlines, NULs) shown as escapes, for text
/// that comes from a rules file or the history and goes to a terminal.
pub(crate) fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

fn version(v: Option<&str>) -> String {
    v.map_or_else(|| "(no version)".to_string(), clean)
}

/// Seconds since the epoch as RFC 3339 UTC (`2026-11-23T14:05:09Z`).
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Nanoseconds since the epoch as RFC 3339 UTC with microseconds (`2026-11-23T14:05:09.123456Z`).
pub(crate) fn rfc3339_ns(ns: u128) -> String {
    let secs = (ns / 1_000_000_000) as u64;
    let micros = (ns % 1_000_000_000) / 1000;
    let whole = rfc3339(secs);
    format!("{}.{micros:06}Z", whole.trim_end_matches('Z'))
}

/// One traced decision: time, verdict, the deciding rule, the packet (in `explain`'s syntax).
pub(crate) fn trace_line(e: &xdpfw_control::trace::TraceEvent) -> String {
    let time = rfc3339_ns(e.time_unix_ns);
    // The time of day is enough on a terminal; the date is in --json.
    let time = time.split_once('T').map_or(time.as_str(), |(_, t)| t).trim_end_matches('Z');
    let log = if e.kind == "log" { " [log]" } else { "" };
    format!("{time} {:<4} {:<24} {} len {}{log}", e.verdict, clean(&e.rule), e.packet, e.len)
}

/// A named set and how many prefixes it holds.
#[derive(serde::Serialize)]
pub(crate) struct SetSize {
    pub name: String,
    pub prefixes: usize,
}

/// `loader show`: a header of comments (so the output is itself a valid rules file), the text.
pub(crate) fn show(iface: &str, state: &State, snapshot: &std::path::Path, text: &str, sets: &[SetSize], files: &[(String, String)]) -> String {
    let r = &state.ruleset;
    let mut s = String::new();
    let _ = writeln!(s, "# live on {iface}: generation {}, version {}, hash {}", state.generation, version(r.version.as_deref()), r.hash);
    if let Some(p) = &r.path {
        let _ = writeln!(s, "# applied from {} (the file may have changed since); snapshot {}", clean(&p.to_string_lossy()), snapshot.display());
    }
    for set in sets {
        let _ = writeln!(s, "# set @{}: {} prefixes", clean(&set.name), set.prefixes);
    }
    s.push_str(text);
    if !text.ends_with('\n') {
        s.push('\n');
    }
    for (name, content) in files {
        let _ = writeln!(s, "# ---- set file {} ----", clean(name));
        s.push_str(content);
    }
    s
}

/// What a reload from the live ruleset to a new one would change.
#[derive(serde::Serialize)]
pub(crate) struct RulesetDiff {
    pub from: DiffSide,
    pub to: DiffSide,
    /// Rules of the new ruleset whose name the live one lacks, with their new index.
    pub added: Vec<DiffRule>,
    /// Rules of the live ruleset whose name the new one lacks, with their live index.
    pub removed: Vec<DiffRule>,
    /// Rules in both whose conditions or action differ.
    pub changed: Vec<String>,
    /// Rules in both whose order relative to the other kept rules changed (the fewest such).
    pub moved: Vec<DiffMove>,
    pub sets: Vec<SetDelta>,
    pub default: Option<(String, String)>,
}

#[derive(serde::Serialize)]
pub(crate) struct DiffSide {
    pub version: Option<String>,
    pub hash: String,
    pub rules: usize,
}

#[derive(serde::Serialize)]
pub(crate) struct DiffRule {
    pub index: usize,
    pub name: String,
    pub action: String,
}

#[derive(serde::Serialize)]
pub(crate) struct DiffMove {
    pub name: String,
    pub from: usize,
    pub to: usize,
}

#[derive(serde::Serialize)]
pub(crate) struct SetDelta {
    pub name: String,
    pub from: Option<usize>,
    pub to: Option<usize>,
}

/// A rule's meaning without its place in the file (location, comment), naming its sets rather
/// than their contents (set changes are reported per set).
fn meaning(r: &xdpfw_rules::Rule) -> String {
    let names = |a: &xdpfw_rules::AddrList| (a.inline.clone(), a.sets.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
    let addrs = |a: &Option<xdpfw_rules::AddrList>| a.as_ref().map(|a| (names(a), a.except.as_deref().map(names)));
    format!("{:?}", (&r.action, addrs(&r.src), addrs(&r.dst), &r.proto, &r.sport, &r.dport, &r.icmp, &r.tcp_flags, &r.owner, &r.limit, &r.log))
}

impl RulesetDiff {
    pub(crate) fn new(old: &xdpfw_rules::Ruleset, new: &xdpfw_rules::Ruleset) -> Self {
        use std::collections::HashMap;
        let side = |rs: &xdpfw_rules::Ruleset| DiffSide { version: rs.version.clone(), hash: rs.hash.clone(), rules: rs.rules.len() };
        let old_at: HashMap<&str, usize> = old.rules.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
        let new_at: HashMap<&str, usize> = new.rules.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
        let rule = |i: usize, r: &xdpfw_rules::Rule| DiffRule { index: i, name: r.name.clone(), action: r.action.to_string() };
        let added = new.rules.iter().enumerate().filter(|(_, r)| !old_at.contains_key(r.name.as_str())).map(|(i, r)| rule(i, r)).collect();
        let removed = old.rules.iter().enumerate().filter(|(_, r)| !new_at.contains_key(r.name.as_str())).map(|(i, r)| rule(i, r)).collect();
        let changed = old
            .rules
            .iter()
            .filter_map(|r| new_at.get(r.name.as_str()).map(|&j| (r, &new.rules[j])))
            .filter(|(a, b)| meaning(a) != meaning(b))
            .map(|(a, _)| a.name.clone())
            .collect();
        // Kept rules in live order, with their new index: those outside a longest increasing
        // run of new indices are the ones that moved.
        let kept: Vec<(&str, usize, usize)> = old.rules.iter().enumerate().filter_map(|(i, r)| new_at.get(r.name.as_str()).map(|&j| (r.name.as_str(), i, j))).collect();
        let in_order = longest_increasing(&kept.iter().map(|k| k.2).collect::<Vec<_>>());
        let moved = kept
            .iter()
            .enumerate()
            .filter(|(k, _)| !in_order.contains(k))
            .map(|(_, (name, from, to))| DiffMove { name: (*name).to_string(), from: *from, to: *to })
            .collect();
        let mut names: Vec<&String> = old.sets.keys().chain(new.sets.keys()).collect();
        names.sort();
        names.dedup();
        let sets = names
            .into_iter()
            .map(|n| SetDelta { name: n.clone(), from: old.sets.get(n).map(|s| s.len()), to: new.sets.get(n).map(|s| s.len()) })
            .filter(|d| d.from != d.to)
            .collect();
        let default = (old.default != new.default).then(|| (old.default.to_string(), new.default.to_string()));
        Self { from: side(old), to: side(new), added, removed, changed, moved, sets, default }
    }
}

/// Indices (into `v`) of one longest strictly increasing subsequence.
fn longest_increasing(v: &[usize]) -> std::collections::BTreeSet<usize> {
    let n = v.len();
    let (mut len, mut prev) = (vec![1usize; n], vec![usize::MAX; n]);
    for i in 0..n {
        for j in 0..i {
            if v[j] < v[i] && len[j] + 1 > len[i] {
                len[i] = len[j] + 1;
                prev[i] = j;
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    let mut at = (0..n).max_by_key(|&i| (len[i], std::cmp::Reverse(i)));
    while let Some(i) = at {
        out.insert(i);
        at = (prev[i] != usize::MAX).then(|| prev[i]);
    }
    out
}

/// `loader diff`.
pub(crate) fn diff(d: &RulesetDiff) -> String {
    let mut s = String::new();
    let side = |x: &DiffSide| format!("{} {} ({} rules)", version(x.version.as_deref()), short_hash(&x.hash), x.rules);
    let _ = writeln!(s, "live {} -> {}", side(&d.from), side(&d.to));
    if d.from.hash == d.to.hash {
        let _ = writeln!(s, "  identical: a reload would change nothing");
        return s;
    }
    for r in &d.added {
        let _ = writeln!(s, "  + rule #{} \"{}\" ({})", r.index, clean(&r.name), r.action);
    }
    for r in &d.removed {
        let _ = writeln!(s, "  - rule #{} \"{}\" ({})", r.index, clean(&r.name), r.action);
    }
    for n in &d.changed {
        let _ = writeln!(s, "  ~ rule \"{}\" changed", clean(n));
    }
    for m in &d.moved {
        let _ = writeln!(s, "  > rule \"{}\" moved #{} -> #{}", clean(&m.name), m.from, m.to);
    }
    for set in &d.sets {
        let (a, b) = (set.from.unwrap_or(0), set.to.unwrap_or(0));
        let what = match (set.from, set.to) {
            (None, _) => "new".to_string(),
            (_, None) => "removed".to_string(),
            _ => format!("{:+}", b as i64 - a as i64),
        };
        let _ = writeln!(s, "  set @{}: {a} -> {b} prefixes ({what})", clean(&set.name));
    }
    if let Some((a, b)) = &d.default {
        let _ = writeln!(s, "  default: {a} -> {b}");
    }
    if d.added.is_empty() && d.removed.is_empty() && d.changed.is_empty() && d.moved.is_empty() && d.sets.is_empty() && d.default.is_none() {
        let _ = writeln!(s, "  same rules and sets (the files differ in labels, comments, tests or options)");
    }
    s
}

/// One attached instance, as `loader list` shows it.
#[derive(serde::Serialize)]
pub(crate) struct ListRow {
    pub iface: String,
    /// The network namespace: "host", its /run/netns name, or net:[inode] when unnamed.
    pub netns: String,
    pub netns_inode: u64,
    pub ifindex: u32,
    pub mode: String,
    pub generation: Option<u64>,
    pub version: Option<String>,
    pub hash: Option<String>,
    pub rules: Option<usize>,
    /// Why the state could not be read (a reload in progress, a damaged state file).
    pub error: Option<String>,
}

/// An instance whose network namespace is gone (see `loader prune`).
#[derive(serde::Serialize)]
pub(crate) struct StaleRow {
    pub key: String,
    pub netns_inode: u64,
    pub ifindex: u32,
    /// The interface's name when it was attached, if recorded.
    pub iface: Option<String>,
    /// Whether the attach had completed (its link was pinned).
    pub attached: bool,
    pub pin_dir: String,
}

impl From<&xdpfw_control::prune::Stale> for StaleRow {
    fn from(s: &xdpfw_control::prune::Stale) -> Self {
        Self { key: s.key.clone(), netns_inode: s.netns_inode, ifindex: s.ifindex, iface: s.iface.clone(), attached: s.attached, pin_dir: s.pin_dir.display().to_string() }
    }
}

fn stale_line(r: &StaleRow) -> String {
    format!(
        "{} (ifindex {} of the deleted namespace net:[{}]{}): {}",
        r.pin_dir,
        r.ifindex,
        r.netns_inode,
        r.iface.as_deref().map(|i| format!(", {}", clean(i))).unwrap_or_default(),
        if r.attached { "its program and maps are still in kernel memory" } else { "left by an attach that did not complete" }
    )
}

/// `loader prune`.
pub(crate) fn prune(rows: &[StaleRow], dry_run: bool) -> String {
    if rows.is_empty() {
        return "no instance of a deleted network namespace\n".into();
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    rows.iter().map(|r| format!("{verb} {}\n", stale_line(r))).collect()
}

/// `loader list`.
pub(crate) fn list(rows: &[ListRow], stale: &[StaleRow]) -> String {
    let mut s = String::new();
    for r in stale {
        let _ = writeln!(s, "stale: {}; `loader prune` removes it", stale_line(r));
    }
    if rows.is_empty() {
        return s;
    }
    let w = rows.iter().map(|r| r.iface.len()).max().unwrap_or(5).max(5);
    let n = rows.iter().map(|r| clean(&r.netns).len()).max().unwrap_or(5).max(5);
    let _ = writeln!(s, "{:<w$}  {:<n$}  {:<6}  {:>10}  {:>5}  {:<12}  version", "iface", "netns", "mode", "generation", "rules", "hash");
    for r in rows {
        match &r.error {
            Some(e) => {
                let _ = writeln!(s, "{:<w$}  {:<n$}  {}", clean(&r.iface), clean(&r.netns), clean(e));
            }
            None => {
                let _ = writeln!(
                    s,
                    "{:<w$}  {:<n$}  {:<6}  {:>10}  {:>5}  {:<12}  {}",
                    clean(&r.iface),
                    clean(&r.netns),
                    r.mode,
                    r.generation.unwrap_or(0),
                    r.rules.unwrap_or(0),
                    r.hash.as_deref().map_or("-", short_hash),
                    version(r.version.as_deref())
                );
            }
        }
    }
    s
}

/// The table `loader stats` prints; `mode` is the mode in effect.
pub(crate) fn stats(st: &Stats, mode: &str) -> String {
    {
        use std::fmt::Write;
        let mut s = String::new();
        let r = &st.ruleset;
        let _ = writeln!(s, "xdpfw on {} ({mode} mode)", st.iface);
        let _ = writeln!(
            s,
            "  ruleset    {} {}  generation {} (buffer {})",
            version(r.version.as_deref()),
            short_hash(&r.hash),
            st.generation,
            st.buffer
        );
        let _ = writeln!(
            s,
            "             {} rules, {} prefixes ({} table entries), default {}{}",
            r.rules.len(),
            r.prefixes,
            r.table_entries,
            r.default,
            r.path.as_ref().map(|p| format!(", from {}", p.display())).unwrap_or_default()
        );
        let g = &st.global;
        let _ = writeln!(s, "  packets    seen {}  passed {}  dropped {}  ({} bytes)", g.seen, g.passed, g.dropped, g.bytes);
        let _ = writeln!(s, "  kinds      ipv4 {}  ipv6 {}  non-ip {}  malformed {}  fragments {}  neighbor-discovery {}", g.ipv4, g.ipv6, g.non_ip, g.malformed, g.fragments, g.neighbor_discovery);
        let _ = writeln!(s, "  decided by rules {}  default {}", g.rule_hits, g.default_hits);
        if g.limited + g.limit_sources > 0 {
            let _ = writeln!(s, "  limits     beyond a limit {}  source buckets made {}", g.limited, g.limit_sources);
        }
        if let Some(f) = &st.flows {
            let _ = writeln!(
                s,
                "  flows      recorded {}  closed {}  in the table {} of {}  evicted {}",
                g.flows_new, g.flows_closed, f.entries, f.capacity, f.evicted
            );
        }
        if g.state_lookups > 0 {
            let _ = writeln!(s, "  state      looked up {}  established {}  related {}", g.state_lookups, g.state_established, g.state_related);
        }
        if !r.owner_rules.is_empty() || g.escalations + g.pending + g.cache_hits > 0 {
            let _ = writeln!(
                s,
                "  escalation escalated {}  cache-hits {}  pending {}  ring-overflows {}",
                g.escalations, g.cache_hits, g.pending, g.ring_overflows
            );
            let _ = writeln!(s, "             {}", escalation_line(&r.owner_rules, st.escalation.as_ref()));
        }
        let width = st.rules.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        let _ = writeln!(s, "  {:>4}  {:<width$}  {:<6}  {:>12}  {:>14}", "#", "rule", "action", "packets", "bytes");
        for c in &st.rules {
            let idx = c.index.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(s, "  {:>4}  {:<width$}  {:<6}  {:>12}  {:>14}", idx, clean(&c.name), c.action, c.packets, c.bytes);
        }
        s
    }
}

/// One line on who serves the escalations of an instance.
pub(crate) fn escalation_line(owner_rules: &[String], report: Option<&Report>) -> String {
    match report {
        Some(r) => {
            let c = &r.counters;
            let lat = match (r.latency_p50_us, r.latency_p99_us) {
                (Some(p50), Some(p99)) => format!(", decision latency p50 {p50:.0} us p99 {p99:.0} us"),
                _ => String::new(),
            };
            format!(
                "served by pid {}: {} events, {} passed, {} dropped, {} no socket, {} process gone, {} timeouts, {} source-limited, {} stale, {} errors{lat}",
                r.pid, c.events, c.decided_pass, c.decided_drop, c.no_socket, c.process_gone, c.lookup_timeouts, c.source_limited, c.stale, c.errors
            )
        }
        None if owner_rules.is_empty() => "not served (no rule of the active ruleset needs it)".to_string(),
        None => format!(
            "NOT SERVED: flows that {} decide{} get the pending action until `loader run` serves escalations",
            owner_rules.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>().join(", "),
            if owner_rules.len() == 1 { "s" } else { "" }
        ),
    }
}

/// `loader status`: the live ruleset, the last reload and, with --history, every attempt;
/// `mode` is the mode in effect.
pub(crate) fn status(state: &State, mode: &str, escalation: Option<&Report>, entries: &[Entry]) -> String {
    let mut s = String::new();
    let r = &state.ruleset;
    let _ = writeln!(s, "xdpfw on {} ({mode} mode), attached at {}", state.iface, rfc3339(state.attached_at));
    let _ = writeln!(
        s,
        "  generation {}: {} {} ({} rules, default {}){}",
        state.generation,
        version(r.version.as_deref()),
        short_hash(&r.hash),
        r.rules.len(),
        r.default,
        r.path.as_ref().map(|p| format!(", from {}", p.display())).unwrap_or_default()
    );
    if !r.owner_rules.is_empty() || escalation.is_some() {
        let _ = writeln!(s, "  escalation: {}", escalation_line(&r.owner_rules, escalation));
    }
    if let Some(l) = &state.last_reload {
        let _ = writeln!(
            s,
            "  last reload: generation {} -> {}, {} us (grace {} us, {:?})",
            l.previous_generation, l.generation, l.times.total_us, l.times.grace_us, l.grace_method
        );
    }
    for e in entries {
        let _ = writeln!(
            s,
            "  {}  {:<8} {:<7} gen {:<6} {:<14} {}  {}",
            rfc3339(e.time),
            e.action.to_string(),
            e.result.to_string(),
            e.generation.map_or("-".into(), |g| g.to_string()),
            e.version.as_deref().map_or_else(|| "-".to_string(), clean),
            e.hash.as_deref().map_or("-", short_hash),
            clean(e.error.as_deref().map(|m| m.lines().next().unwrap_or("")).unwrap_or(&e.source.to_string_lossy()))
        );
    }
    s
}

/// `loader reload`: what changed and what each phase took.
pub(crate) fn reload(r: &ReloadReport) -> String {
    let t = &r.times;
    format!(
        "reloaded {}: generation {} -> {} ({} rules, {} prefixes)\n  parse {}us  compile {}us{}  install {}us  prove {}us ({} self-tests)  flip {}us  grace {}us ({:?})  clear {}us  total {}us\n",
        r.iface,
        r.previous_generation,
        r.generation,
        r.ruleset.rules.len(),
        r.ruleset.prefixes,
        t.parse_us,
        t.compile_us,
        if t.tables_reused { " (address tables reused)" } else { "" },
        t.install_arrays_us + t.install_tables_us,
        t.prove_us,
        t.self_tests,
        t.flip_us,
        t.grace_us,
        r.grace_method,
        t.clear_us,
        t.total_us
    )
}

/// `loader set add|del|replace`.
pub(crate) fn set(r: &xdpfw_control::SetReport) -> String {
    let e = &r.edit;
    let size = e.size.map(|n| format!("; {n} prefixes now")).unwrap_or_default();
    let mut out = format!(
        "set {} {} on {}: {} added, {} removed ({} already present, {} not in the set){size}\n",
        r.op, e.set, r.iface, e.added, e.removed, e.present, e.absent
    );
    match &r.reload {
        None => out.push_str("  nothing changed: the live ruleset stands\n"),
        Some(rel) => {
            let t = &rel.times;
            if let Some(why) = &r.why_reload {
                out.push_str(&format!("  applied by a reload of the whole ruleset: {why}\n"));
            }
            out.push_str(&format!(
                "  {} generation {} -> {}  read+record {}us  compile {}us  install {}us  flip {}us  grace {}us  clear {}us  total {}us\n",
                r.path,
                rel.previous_generation,
                rel.generation,
                r.edit_us,
                t.compile_us,
                t.install_arrays_us + t.install_tables_us,
                t.flip_us,
                t.grace_us,
                t.clear_us,
                t.total_us
            ));
        }
    }
    out
}

/// `loader rollback`.
pub(crate) fn rollback(r: &ReloadReport) -> String {
    format!(
        "rolled back {}: generation {} -> {} ({})\n",
        r.iface,
        r.previous_generation,
        r.generation,
        version(r.ruleset.version.as_deref())
    )
}

/// `loader explain`: the decision with its reasons, what the kernel does alone, and the
/// kernel's own verdict when it was asked.
pub(crate) fn explain(pkt: &PacketSpec, d: &Decision, in_kernel: &Decision, kernel: Option<xdpfw_rules::Action>) -> String {
    let mut s = String::new();
    match (&d.rule, &d.rule_name) {
        (Some(i), Some(name)) if d.escalated => {
            let _ = writeln!(s, "{pkt}\n  escalated by rule #{i} \"{name}\": {} (the pending action) until userspace decides", d.action);
        }
        (Some(i), Some(name)) => {
            let _ = writeln!(s, "{pkt}\n  {} by rule #{i} \"{name}\"", d.action);
        }
        _ => {
            let _ = writeln!(s, "{pkt}\n  {}", d.action);
        }
    }
    for r in &d.reasons {
        let _ = writeln!(s, "    {r}");
    }
    if in_kernel.escalated && !d.escalated {
        let _ = writeln!(s, "  (the kernel escalates this flow and gives it {} until the owner verdict is in place)", in_kernel.action);
    } else if in_kernel.escalated {
        let _ = writeln!(s, "  (give --owner to see what the escalation service decides)");
    }
    if let Some(k) = kernel {
        let _ = writeln!(s, "  kernel (BPF_PROG_TEST_RUN): {k}");
    }
    s
}

/// One refresh of `loader top`: rates between two samples of the counters.
#[derive(serde::Serialize)]
pub(crate) struct TopFrame {
    pub iface: String,
    pub mode: String,
    /// When the second sample was taken (RFC 3339 UTC).
    pub time: String,
    /// Seconds between the two samples.
    pub interval: f64,
    pub generation: u64,
    /// The generation at the first sample (another one: a reload in between).
    pub previous_generation: u64,
    pub version: Option<String>,
    pub hash: String,
    /// Every packet the program saw, per second, and the bits of their frames per second.
    pub pps: f64,
    pub bps: f64,
    pub passed_pps: f64,
    pub dropped_pps: f64,
    /// Busiest first: packets/s, then bits/s, then rule order (the default action last).
    pub rules: Vec<TopRule>,
}

#[derive(serde::Serialize)]
pub(crate) struct TopRule {
    pub index: Option<usize>,
    pub name: String,
    pub action: String,
    pub pps: f64,
    pub bps: f64,
    /// Packets/s the rule dropped (its packets/s for a drop rule).
    pub dropped_pps: f64,
    /// Packets and bytes since the rule's name went live (carried across reloads).
    pub packets: u64,
    pub bytes: u64,
}

impl TopFrame {
    /// Rates from `prev` to `cur`, `secs` apart. Per-rule counters are matched by rule name (they
    /// are carried across reloads by name); a counter that went down (a name that left and came
    /// back) counts from zero.
    pub(crate) fn new(prev: &Stats, cur: &Stats, secs: f64, mode: &str, now: u64) -> Self {
        let secs = secs.max(1e-3);
        let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        let before: std::collections::HashMap<&str, (u64, u64)> = prev.rules.iter().map(|r| (r.name.as_str(), (r.packets, r.bytes))).collect();
        let mut rules: Vec<TopRule> = cur
            .rules
            .iter()
            .map(|r| {
                let (p0, b0) = before.get(r.name.as_str()).copied().filter(|&(p, _)| p <= r.packets).unwrap_or((0, 0));
                let pps = per_sec(p0, r.packets);
                TopRule {
                    index: r.index,
                    name: r.name.clone(),
                    action: r.action.clone(),
                    pps,
                    bps: per_sec(b0, r.bytes) * 8.0,
                    dropped_pps: if r.action == "drop" { pps } else { 0.0 },
                    packets: r.packets,
                    bytes: r.bytes,
                }
            })
            .collect();
        rules.sort_by(|a, b| {
            b.pps.total_cmp(&a.pps).then(b.bps.total_cmp(&a.bps)).then(a.index.unwrap_or(usize::MAX).cmp(&b.index.unwrap_or(usize::MAX)))
        });
        let (g0, g1) = (&prev.global, &cur.global);
        Self {
            iface: cur.iface.clone(),
            mode: mode.to_string(),
            time: rfc3339(now),
            interval: secs,
            generation: cur.generation,
            previous_generation: prev.generation,
            version: cur.ruleset.version.clone(),
            hash: cur.ruleset.hash.clone(),
            pps: per_sec(g0.seen, g1.seen),
            bps: per_sec(g0.bytes, g1.bytes) * 8.0,
            passed_pps: per_sec(g0.passed, g1.passed),
            dropped_pps: per_sec(g0.dropped, g1.dropped),
            rules,
        }
    }
}

/// A rate with an SI suffix: `0`, `950`, `12.3k`, `1.50M`, `2.10G`.
pub(crate) fn si(v: f64) -> String {
    let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
    match v {
        v if v < 0.5 => "0".to_string(),
        v if v < 1e3 => format!("{v:.0}"),
        v if v < 1e4 => format!("{:.2}k", v / 1e3),
        v if v < 1e6 => format!("{:.1}k", v / 1e3),
        v if v < 1e7 => format!("{:.2}M", v / 1e6),
        v if v < 1e9 => format!("{:.1}M", v / 1e6),
        v => format!("{:.2}G", v / 1e9),
    }
}

/// `loader top`, one refresh: a header and at most `max_rules` rules (the busiest).
pub(crate) fn top(f: &TopFrame, max_rules: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "xdpfw top on {} ({} mode), every {:.1}s, {}", f.iface, f.mode, f.interval, f.time);
    let reloaded = if f.generation != f.previous_generation { format!(" (reloaded from {})", f.previous_generation) } else { String::new() };
    let _ = writeln!(s, "ruleset {} {}, generation {}{reloaded}", version(f.version.as_deref()), short_hash(&f.hash), f.generation);
    let _ = writeln!(
        s,
        "total {} pkt/s  {} bit/s  passed {} pkt/s  dropped {} pkt/s",
        si(f.pps),
        si(f.bps),
        si(f.passed_pps),
        si(f.dropped_pps)
    );
    let width = f.rules.iter().map(|r| clean(&r.name).len()).max().unwrap_or(4).max(4);
    let _ = writeln!(s, "{:>4}  {:<width$}  {:<6}  {:>8}  {:>8}  {:>8}  {:>12}", "#", "rule", "action", "pkt/s", "bit/s", "drop/s", "packets");
    for r in f.rules.iter().take(max_rules) {
        let idx = r.index.map_or_else(|| "-".to_string(), |i| i.to_string());
        let _ = writeln!(
            s,
            "{idx:>4}  {:<width$}  {:<6}  {:>8}  {:>8}  {:>8}  {:>12}",
            clean(&r.name),
            r.action,
            si(r.pps),
            si(r.bps),
            si(r.dropped_pps),
            r.packets
        );
    }
    if f.rules.len() > max_rules {
        let _ = writeln!(s, "      ({} more rules, quieter)", f.rules.len() - max_rules);
    }
    s
}

/// `loader top` on a terminal: the screen cleared and redrawn, fitted to `(rows, columns)`.
pub(crate) fn top_screen(f: &TopFrame, (rows, cols): (usize, usize)) -> String {
    // Four header lines, one for "more rules", one spare so the terminal does not scroll.
    let text = top(f, rows.saturating_sub(6).max(1));
    let mut s = String::from("\x1b[H\x1b[2J");
    for line in text.lines() {
        s.extend(line.chars().take(cols));
        s.push_str("\r\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_442_709), "2026-11-23T14:05:09Z");
    }

    #[test]
    fn si_rates() {
        assert_eq!(si(0.2), "0");
        assert_eq!(si(950.0), "950");
        assert_eq!(si(1234.0), "1.23k");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(si(1_500_000.0), "1.50M");
        assert_eq!(si(f64::NAN), "0");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("v1\u{1b}[31mred"), "v1\\u{1b}[31mred");
        assert_eq!(clean("a\nb"), "a\\nb");
        assert_eq!(clean("plain-1.2"), "plain-1.2");
    }
}
