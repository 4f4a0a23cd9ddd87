//! Operations on an attached firewall instance: attach, reload, stats, detach.
//!
//! An instance is the program attached to one interface. Its kernel objects are pinned under
//! `/sys/fs/bpf/xdpfw/<iface>/`; its userspace state (what ruleset is active, the last reload)
//! lives in `/run/xdpfw/<iface>/state.json`, written atomically. Every mutating operation holds
//! the instance's lock file, so reloads are serialized.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use fs2::FileExt;
use serde::{Deserialize, Serialize};
use xdpfw_common::{BUFFERS, GlobalStats};

use crate::{
    compile::{Image, compile},
    grace::{self, GraceMethod},
    kernel::{self, AttachMode, Maps},
    history::{self, History},
    rules::{self, Ruleset},
    testrun,
};

pub fn state_root() -> PathBuf {
    std::env::var_os("XDPFW_STATE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/xdpfw"))
}

/// What a person needs to recognise a ruleset.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RulesetSummary {
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    pub hash: String,
    pub default: String,
    pub rules: Vec<String>,
    pub actions: Vec<String>,
    pub prefixes: usize,
    pub trie_entries: usize,
    /// Rules with owner conditions, which need the escalation service.
    #[serde(default)]
    pub owner_rules: Vec<String>,
}

impl RulesetSummary {
    fn new(rs: &Ruleset, image: &Image, from_file: bool) -> Self {
        Self {
            path: from_file.then(|| rs.path.clone()),
            version: rs.version.clone(),
            hash: rs.hash.clone(),
            default: rs.default.to_string(),
            rules: rs.rules.iter().map(|r| r.name.clone()).collect(),
            actions: rs.rules.iter().map(|r| r.action.to_string()).collect(),
            prefixes: rs.prefix_count(),
            trie_entries: image.prefix_count(),
            owner_rules: rs.rules.iter().filter(|r| r.owner.is_some()).map(|r| r.name.clone()).collect(),
        }
    }
}

/// Durations of each phase of a reload, in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReloadTimes {
    pub parse_us: u64,
    pub compile_us: u64,
    pub lock_wait_us: u64,
    pub install_arrays_us: u64,
    pub install_tries_us: u64,
    /// Self-tests run in the kernel against the inactive buffer before the flip.
    pub self_tests: usize,
    pub prove_us: u64,
    pub flip_us: u64,
    pub grace_us: u64,
    pub clear_us: u64,
    pub total_us: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadReport {
    pub iface: String,
    pub previous_generation: u64,
    pub generation: u64,
    pub buffer: u32,
    pub ruleset: RulesetSummary,
    pub grace_method: GraceMethod,
    pub times: ReloadTimes,
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub iface: String,
    pub mode: AttachMode,
    pub attached_at: u64,
    pub generation: u64,
    pub ruleset: RulesetSummary,
    pub last_reload: Option<ReloadReport>,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// Paths of one instance.
pub struct Instance {
    pub iface: String,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Instance {
    pub fn new(iface: &str) -> Result<Self> {
        if iface.is_empty() || iface.len() > 15 || iface.contains(['/', '.', ' ']) || iface == ".." {
            bail!("invalid interface name \"{iface}\"");
        }
        Ok(Self {
            iface: iface.to_string(),
            pin_dir: kernel::pin_dir(iface),
            state_dir: state_root().join(iface),
        })
    }

    /// The single attached instance, or the one named.
    pub fn find(iface: Option<&str>) -> Result<Self> {
        if let Some(i) = iface {
            let inst = Self::new(i)?;
            if !inst.pin_dir.exists() {
                bail!("no firewall is attached to {i} (nothing pinned at {})", inst.pin_dir.display());
            }
            return Ok(inst);
        }
        let all = list()?;
        match all.as_slice() {
            [one] => Self::new(one),
            [] => bail!("no firewall is attached (nothing pinned under {})", kernel::pin_root().display()),
            many => bail!("several firewalls are attached ({}); choose one with --iface", many.join(", ")),
        }
    }

    pub fn is_attached(&self) -> bool {
        self.pin_dir.exists()
    }

    fn lock(&self, wait: Duration) -> Result<File> {
        fs::create_dir_all(state_root())?;
        let path = state_root().join(format!("{}.lock", self.iface));
        let file = File::options().create(true).truncate(false).write(true).open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock_exclusive() {
                Ok(()) => return Ok(file),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => bail!(
                    "another reload of {} is in progress (lock {} held for more than {:?})",
                    self.iface,
                    path.display(),
                    wait
                ),
            }
        }
    }

    pub fn state(&self) -> Result<State> {
        let path = self.state_dir.join("state.json");
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn write_state(&self, state: &State) -> Result<()> {
        self.write_state_file("state.json", state)
    }

    /// Writes atomically (temporary file, then rename).
    fn write_state_file(&self, name: &str, state: &State) -> Result<()> {
        fs::create_dir_all(&self.state_dir)?;
        let tmp = self.state_dir.join(format!("{name}.tmp"));
        fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        fs::rename(&tmp, self.state_dir.join(name))?;
        Ok(())
    }

    /// The state of the generation the kernel serves: `state.json`, or `next-<generation>.json`
    /// when a reload died between its flip and its final record.
    pub fn state_for(&self, generation: u64) -> Result<State> {
        let state = self.state()?;
        if state.generation == generation {
            return Ok(state);
        }
        let next: Option<State> = fs::read_to_string(self.state_dir.join(format!("next-{generation}.json")))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        match next {
            Some(n) if n.generation == generation => Ok(n),
            _ => bail!(
                "a reload of {} is in progress (kernel generation {generation}, recorded {}); try again",
                self.iface,
                state.generation
            ),
        }
    }
}

/// Names of the interfaces with an attached instance.
pub fn list() -> Result<Vec<String>> {
    let root = kernel::pin_root();
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = fs::read_dir(&root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("link").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// A ruleset that passes everything: what `attach` installs without `--rules`.
pub fn empty_ruleset() -> Ruleset {
    rules::parse(Path::new("<built-in: pass all>"), "default = \"pass\"\n").expect("built-in ruleset parses")
}

pub struct AttachReport {
    pub generation: u64,
    pub ruleset: RulesetSummary,
}

/// Loads the program, pins it, installs `rules` (or pass-all), then attaches. The first packet
/// the program sees is classified against the complete ruleset.
pub fn attach(iface: &str, rules_path: Option<&Path>, mode: AttachMode) -> Result<AttachReport> {
    let inst = Instance::new(iface)?;
    let (ruleset, from_file) = match rules_path {
        Some(p) => (rules::load(p)?, true),
        None => (empty_ruleset(), false),
    };
    let image = compile(&ruleset)?;
    kernel::ensure_bpffs()?;
    let _lock = inst.lock(Duration::from_secs(30))?;
    if inst.is_attached() {
        bail!(
            "a firewall is already attached to {iface} (pinned at {}); use `loader reload` to change its rules or `loader detach {iface}` first",
            inst.pin_dir.display()
        );
    }
    fs::create_dir_all(&inst.pin_dir).with_context(|| format!("creating {}", inst.pin_dir.display()))?;
    let result = (|| -> Result<AttachReport> {
        let mut ebpf = kernel::load_program(&inst.pin_dir)?;
        let mut maps = Maps::open(&inst.pin_dir)?;
        let generation = 1;
        maps.install((generation % BUFFERS as u64) as u32, generation, &image)?;
        maps.flip(generation)?;
        kernel::pin_probe(&inst.pin_dir)?;
        kernel::attach_and_pin(&mut ebpf, iface, mode, &inst.pin_dir)?;
        let summary = RulesetSummary::new(&ruleset, &image, from_file);
        if from_file {
            let history = History::new(iface);
            let snapshot = history.snapshot(&ruleset)?;
            let entry = history::Entry::applied("attach", generation, ruleset.version.clone(), &ruleset.hash, &ruleset.path, snapshot, None);
            if let Err(e) = history.append(&entry) {
                tracing::warn!("could not record the attach in {}: {e:#}", history.dir().display());
            }
        }
        inst.write_state(&State {
            iface: iface.to_string(),
            mode,
            attached_at: now_secs(),
            generation,
            ruleset: summary.clone(),
            last_reload: None,
        })?;
        Ok(AttachReport { generation, ruleset: summary })
    })();
    if result.is_err() {
        // Leave nothing half-made behind: no pins, no state.
        let _ = kernel::detach_and_unpin(&inst.pin_dir);
        let _ = fs::remove_dir_all(&inst.state_dir);
    }
    result
}

/// Detaches the program and removes every pin and the state of the instance.
pub fn detach(iface: &str) -> Result<()> {
    let inst = Instance::new(iface)?;
    // Checked before taking the lock too, so a detach of nothing leaves no lock file behind.
    if !inst.pin_dir.exists() {
        bail!("no firewall is attached to {iface}");
    }
    let lock = inst.lock(Duration::from_secs(30))?;
    if !inst.pin_dir.exists() {
        bail!("no firewall is attached to {iface}");
    }
    kernel::detach_and_unpin(&inst.pin_dir)?;
    if inst.state_dir.exists() {
        fs::remove_dir_all(&inst.state_dir)?;
    }
    let _ = fs::remove_file(state_root().join(format!("{iface}.lock")));
    drop(lock);
    Ok(())
}

pub struct ReloadOptions {
    /// How long to wait for a concurrent reload to finish.
    pub lock_wait: Duration,
    /// The shortest grace period, whatever membarrier says.
    pub min_grace: Duration,
}

impl Default for ReloadOptions {
    fn default() -> Self {
        Self { lock_wait: Duration::from_secs(30), min_grace: Duration::ZERO }
    }
}

/// The reload pipeline: parse → compile → lock → write the inactive buffer → prove → flip →
/// grace → clear the retired buffer → record. Any failure before the flip leaves the active
/// ruleset untouched; the flip is one atomic store. Every attempt goes into the history.
pub fn reload(inst: &Instance, path: &Path, opts: &ReloadOptions) -> Result<ReloadReport> {
    reload_as(inst, path, opts, "reload")
}

/// Re-applies the ruleset applied `back` times before the current one, through the same pipeline.
pub fn rollback(inst: &Instance, back: usize, opts: &ReloadOptions) -> Result<ReloadReport> {
    let target = History::new(&inst.iface).rollback_target(back)?;
    let snapshot = target.snapshot.expect("applied() keeps entries with snapshots");
    reload_as(inst, &snapshot, opts, "rollback")
}

fn reload_as(inst: &Instance, path: &Path, opts: &ReloadOptions, action: &str) -> Result<ReloadReport> {
    let history = History::new(&inst.iface);
    let result = reload_pipeline(inst, path, opts);
    let entry = match &result {
        Ok((report, snapshot)) => history::Entry::applied(
            action,
            report.generation,
            report.ruleset.version.clone(),
            &report.ruleset.hash,
            path,
            snapshot.clone(),
            Some(report.times.clone()),
        ),
        Err(e) => history::Entry {
            time: now_secs(),
            result: "failed".into(),
            action: action.into(),
            generation: None,
            version: None,
            hash: None,
            source: path.to_path_buf(),
            snapshot: None,
            error: Some(format!("{e:#}")),
            times: None,
        },
    };
    if let Err(e) = history.append(&entry) {
        tracing::warn!("could not record the reload in {}: {e:#}", history.dir().display());
    }
    result.map(|(report, _)| report)
}

type Snapshot = std::result::Result<PathBuf, String>;

fn reload_pipeline(inst: &Instance, path: &Path, opts: &ReloadOptions) -> Result<(ReloadReport, Snapshot)> {
    let total = Instant::now();
    let mut times = ReloadTimes::default();
    let t = Instant::now();
    let ruleset = rules::load(path)?;
    times.parse_us = us(t.elapsed());
    let t = Instant::now();
    let image = compile(&ruleset)?;
    times.compile_us = us(t.elapsed());

    let t = Instant::now();
    let _lock = inst.lock(opts.lock_wait)?;
    times.lock_wait_us = us(t.elapsed());
    if !inst.is_attached() {
        bail!("no firewall is attached to {}", inst.iface);
    }
    let mut maps = Maps::open(&inst.pin_dir)?;
    let previous = maps.generation();
    let generation = previous + 1;
    let buffer = (generation % BUFFERS as u64) as u32;

    // A reload that died after its flip left this buffer uncleared, possibly moments ago: wait
    // out a grace period before overwriting it, so no packet can still be reading it.
    if maps.header(buffer).generation != 0 {
        grace::wait(opts.min_grace);
        maps.clear(buffer)?;
    }
    let installed = maps.install(buffer, generation, &image)?;
    times.install_arrays_us = installed.arrays_us;
    times.install_tries_us = installed.tries_us;

    // Prove the new ruleset where it will run: its own [[test]] packets through a copy of the
    // program that reads the inactive buffer. A failure leaves the active ruleset untouched.
    if !ruleset.tests.is_empty() {
        let t = Instant::now();
        let mut probe = kernel::open_probe(&inst.pin_dir)?;
        let mut run = |frame: &[u8]| Ok(testrun::run_frame(&mut probe, frame, 1)?.0);
        let failures = testrun::self_test_failures(&ruleset, Some(&mut run))?;
        if let Some(first) = ruleset.tests.first()
            && !failures.is_empty()
        {
            return Err(rules::RulesError {
                location: first.location.clone(),
                message: format!("{} of {} self-tests failed; the rules were not applied:\n  {}", failures.len(), ruleset.tests.len(), failures.join("\n  ")),
            }
            .into());
        }
        times.prove_us = us(t.elapsed());
        times.self_tests = ruleset.tests.len();
    }

    // Recorded before the flip, so `stats` can name the rules even if this process dies between
    // the flip and the final record (the next reload replaces both files).
    let summary = RulesetSummary::new(&ruleset, &image, true);
    let mut next = inst.state()?;
    next.generation = generation;
    next.ruleset = summary.clone();
    inst.write_state_file(&format!("next-{generation}.json"), &next)?;

    let t = Instant::now();
    maps.flip(generation)?;
    times.flip_us = us(t.elapsed());

    let (grace_time, grace_method) = grace::wait(opts.min_grace);
    times.grace_us = us(grace_time);

    let t = Instant::now();
    maps.clear((previous % BUFFERS as u64) as u32)?;
    times.clear_us = us(t.elapsed());
    times.total_us = us(total.elapsed());

    let report = ReloadReport {
        iface: inst.iface.clone(),
        previous_generation: previous,
        generation,
        buffer,
        ruleset: summary.clone(),
        grace_method,
        times,
        warnings: ruleset.warnings.iter().map(|w| w.to_string()).collect(),
    };
    let snapshot = History::new(&inst.iface).snapshot(&ruleset)?;
    next.last_reload = Some(report.clone());
    inst.write_state(&next)?;
    // What any earlier, interrupted reload left is superseded now.
    for entry in fs::read_dir(&inst.state_dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("next-") {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok((report, snapshot))
}

#[derive(Clone, Debug, Serialize)]
pub struct RuleCounters {
    pub index: Option<usize>,
    pub name: String,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub iface: String,
    pub mode: AttachMode,
    pub generation: u64,
    pub buffer: u32,
    pub ruleset: RulesetSummary,
    pub global: GlobalStats,
    pub rules: Vec<RuleCounters>,
    /// The escalation service's report, when one serves this instance.
    pub escalation: Option<crate::escalation::Report>,
}

pub fn stats(inst: &Instance) -> Result<Stats> {
    let maps = Maps::open(&inst.pin_dir)?;
    let generation = maps.generation();
    // Never pair one ruleset's names with another's counters.
    let state = inst.state_for(generation)?;
    let buffer = (generation % BUFFERS as u64) as u32;
    let header = maps.header(buffer);
    let counters = maps.rule_stats(buffer, header.rule_count)?;
    let mut rules = Vec::new();
    for (i, c) in counters.iter().enumerate() {
        let (index, name, action) = if i < header.rule_count as usize {
            (Some(i), state.ruleset.rules.get(i).cloned().unwrap_or_default(), state.ruleset.actions.get(i).cloned().unwrap_or_default())
        } else {
            (None, "(default)".to_string(), state.ruleset.default.clone())
        };
        rules.push(RuleCounters { index, name, action, packets: c.packets, bytes: c.bytes });
    }
    Ok(Stats {
        iface: inst.iface.clone(),
        mode: state.mode,
        generation,
        buffer,
        ruleset: state.ruleset,
        global: maps.global_stats()?,
        rules,
        escalation: crate::escalation::served(inst),
    })
}

impl Stats {
    /// The table `loader stats` prints.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let r = &self.ruleset;
        let _ = writeln!(s, "xdpfw on {} ({:?} mode)", self.iface, self.mode);
        let _ = writeln!(
            s,
            "  ruleset    {} {}  generation {} (buffer {})",
            r.version.as_deref().unwrap_or("(no version)"),
            &r.hash[..12.min(r.hash.len())],
            self.generation,
            self.buffer
        );
        let _ = writeln!(
            s,
            "             {} rules, {} prefixes ({} trie entries), default {}{}",
            r.rules.len(),
            r.prefixes,
            r.trie_entries,
            r.default,
            r.path.as_ref().map(|p| format!(", from {}", p.display())).unwrap_or_default()
        );
        let g = &self.global;
        let _ = writeln!(s, "  packets    seen {}  passed {}  dropped {}  ({} bytes)", g.seen, g.passed, g.dropped, g.bytes);
        let _ = writeln!(s, "  kinds      ipv4 {}  ipv6 {}  non-ip {}  malformed {}  fragments {}  neighbor-discovery {}", g.ipv4, g.ipv6, g.non_ip, g.malformed, g.fragments, g.neighbor_discovery);
        let _ = writeln!(s, "  decided by rules {}  default {}", g.rule_hits, g.default_hits);
        if !r.owner_rules.is_empty() || g.escalations + g.pending + g.cache_hits > 0 {
            let _ = writeln!(
                s,
                "  escalation escalated {}  cache-hits {}  pending {}  ring-overflows {}",
                g.escalations, g.cache_hits, g.pending, g.ring_overflows
            );
            let _ = writeln!(s, "             {}", escalation_line(&r.owner_rules, self.escalation.as_ref()));
        }
        let width = self.rules.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        let _ = writeln!(s, "  {:>4}  {:<width$}  {:<6}  {:>12}  {:>14}", "#", "rule", "action", "packets", "bytes");
        for c in &self.rules {
            let idx = c.index.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(s, "  {:>4}  {:<width$}  {:<6}  {:>12}  {:>14}", idx, c.name, c.action, c.packets, c.bytes);
        }
        s
    }
}

/// One line on who serves the escalations of an instance.
pub fn escalation_line(owner_rules: &[String], report: Option<&crate::escalation::Report>) -> String {
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
