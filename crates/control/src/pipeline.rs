//! The operations that change an instance: attach, detach, reload, rollback. Each holds the
//! instance's lock; a reload is parse → compile → lock → write the inactive buffer → prove →
//! flip → grace → clear → record.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xdpfw_common::{buffer_of, variant};
use xdpfw_kernel::{self as kernel, AttachMode, Maps, grace, testrun};
use xdpfw_rules::{self as rules, Ruleset, compile::compile, selftest::{self, SelfTestFailures}};

use crate::{
    error::{ControlContext, ControlError, Result, refuse},
    files::{self, now_secs},
    history,
    instance::{Instance, ReloadReport, ReloadTimes, RulesetSummary, State},
    tables_cache,
};

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// A ruleset that passes everything: what `attach` installs without `--rules`.
pub fn empty_ruleset() -> Ruleset {
    // A constant known to parse (tested below); the fallback is unreachable.
    rules::parse(Path::new("<built-in: pass all>"), "default = \"pass\"\n").unwrap_or_else(|e| unreachable!("{e}"))
}

pub struct AttachReport {
    pub generation: u64,
    pub ruleset: RulesetSummary,
}

/// Loads the program, pins it, installs `rules` (or pass-all), then attaches. The first packet
/// the program sees is classified against the complete ruleset.
pub fn attach(iface: &str, rules_path: Option<&Path>, mode: AttachMode) -> Result<AttachReport> {
    let (ruleset, from_file) = match rules_path {
        Some(p) => (history::load_rules_with(p, rules::Origin::Local, &Instance::new(iface)?.history().journal()?)?, true),
        None => (empty_ruleset(), false),
    };
    attach_ruleset(iface, &ruleset, from_file, mode)
}

/// Attaches with a ruleset already parsed: `from_file` says whether it came from a file (whose
/// snapshot goes into the history) or was built in (pass-all, the daemon's fail-closed set).
pub fn attach_ruleset(iface: &str, ruleset: &Ruleset, from_file: bool, mode: AttachMode) -> Result<AttachReport> {
    let inst = Instance::new(iface)?;
    let image = compile(ruleset)?;
    crate::instance::refuse_private_bpffs()?;
    kernel::ensure_bpffs()?;
    let _lock = inst.lock(Duration::from_secs(30))?;
    if inst.is_attached() {
        refuse!(
            "a firewall is already attached to {iface} in this network namespace ({}; pinned at {}); use `loader reload` to change its rules or `loader detach {iface}` first",
            inst.netns,
            inst.pin_dir.display()
        );
    }
    attach_locked(&inst, ruleset, &image, from_file, mode)
}

/// Re-attaches `ruleset` to an instance that stopped filtering under a daemon (see
/// [`Instance::is_filtering`]): its link detached, its pins removed, bpffs unmounted. Under the
/// instance's lock, what is left of it is removed (bpffs mounted again) and the ruleset
/// attached. `None` when the instance turned out to be whole once the lock was held (a
/// concurrent attach or reload was mid-way).
pub fn repair(inst: &Instance, ruleset: &Ruleset, from_file: bool, mode: AttachMode) -> Result<Option<AttachReport>> {
    let image = compile(ruleset)?;
    crate::instance::refuse_private_bpffs()?;
    kernel::ensure_bpffs()?;
    let _lock = inst.lock(Duration::from_secs(30))?;
    if inst.is_filtering() {
        return Ok(None);
    }
    if fs::symlink_metadata(&inst.pin_dir).is_ok() {
        // A defunct link (detached under its pin) is unpinned with the rest.
        if kernel::detach_and_unpin(&inst.pin_dir).is_err() {
            fs::remove_dir_all(&inst.pin_dir).ctx(|| format!("removing {}", inst.pin_dir.display()))?;
        }
    }
    attach_locked(inst, ruleset, &image, from_file, mode).map(Some)
}

/// The attach proper, with the instance's lock held and nothing attached.
fn attach_locked(inst: &Instance, ruleset: &Ruleset, image: &xdpfw_rules::compile::Image, from_file: bool, mode: AttachMode) -> Result<AttachReport> {
    let (ruleset, iface) = (ruleset.clone(), inst.iface.as_str());
    prepare_pin_dir(inst)?;
    // New maps start at generation 1 again: a description of the old ones must not match them.
    tables_cache::forget(inst);
    crate::delta::forget_twin(inst);
    let result = (|| -> Result<AttachReport> {
        let mut ebpf = kernel::load_program(&inst.pin_dir)?;
        let mut maps = Maps::open(&inst.pin_dir)?;
        let generation = 1;
        maps.install(buffer_of(generation), generation, image)?;
        maps.flip(generation)?;
        crate::delta::record_installed(inst, &maps, image);
        if let Err(e) = tables_cache::record(inst, generation, &image.addr, &tables_cache::address_key(&ruleset), false) {
            tracing::warn!("the address tables could not be described for reuse: {e}");
        }
        kernel::pin_probe(&inst.pin_dir)?;
        kernel::attach_and_pin(&mut ebpf, iface, inst.ifindex, mode, &inst.pin_dir)?;
        // Attached as the full copy (it serves anything); the only generation is live, so a
        // ruleset that does not need it goes to the plain copy at once.
        if !image.header.needs_full_program() {
            narrow(inst);
        }
        let summary = RulesetSummary::new(&ruleset, image, from_file);
        if from_file {
            let history = inst.history();
            // A snapshot that cannot be written (a full disk) is said in the history, but the
            // attach stands: the ruleset is live.
            let snapshot = history.snapshot(&ruleset).unwrap_or_else(|e| Err(e.to_string()));
            let entry = history::Entry::applied(history::Operation::Attach, generation, ruleset.version.clone(), &ruleset.hash, &ruleset.path, snapshot, None);
            if let Err(e) = history.append(&entry) {
                tracing::warn!("could not record the attach in {}: {e}", history.dir().display());
            }
        }
        // From the pinned link on, the interface is filtered by the complete ruleset: a failure
        // to record it (a full disk) must not take the firewall down again. `state()` then says
        // the record is missing, and the next reload writes it.
        if let Err(e) = inst.write_state(&State {
            iface: iface.to_string(),
            netns: Some(inst.netns.clone()),
            ifindex: inst.ifindex,
            mode,
            attached_at: now_secs(),
            generation,
            ruleset: summary.clone(),
            last_reload: None,
            carried: Default::default(),
            retiring: None,
        }) {
            tracing::error!("{iface} is attached and filtering as generation {generation}, but recording it failed: {e}");
        }
        Ok(AttachReport { generation, ruleset: summary })
    })();
    if result.is_err() {
        // Leave nothing half-made behind: no pins, no state.
        let _ = kernel::detach_and_unpin(&inst.pin_dir);
        let _ = fs::remove_dir_all(&inst.state_dir);
    }
    result
}

/// Switches the instance to the plain copy of the program, with the live generation one that
/// does not need the full copy. A failure leaves the full copy serving, which serves any
/// ruleset: said, not an error.
fn narrow(inst: &Instance) {
    if let Err(e) = kernel::serve(&inst.pin_dir, variant::PLAIN) {
        tracing::warn!("{}: the full copy of the program keeps serving (switching to the plain copy failed: {e})", inst.iface);
    }
}

/// "full" or "plain": the copy of the program the instance's link runs ("unknown" when it
/// cannot be told).
pub(crate) fn served_name(inst: &Instance) -> String {
    match kernel::served_variant(&inst.pin_dir) {
        Ok(Some(variant::PLAIN)) => "plain",
        Ok(Some(_)) => "full",
        _ => "unknown",
    }
    .to_string()
}

/// What may be pinned in an instance's folder: the link, the program (and its full and plain
/// copies, and the temporary pin of a switch between them), its probe copy, the egress program
/// and its link, the maps.
fn known_pin(name: &str) -> bool {
    matches!(name, "link" | "probe" | kernel::EGRESS_PIN | kernel::EGRESS_LINK_PIN)
        || [kernel::PROG_PIN, kernel::FULL_PIN, kernel::PLAIN_PIN, kernel::NEXT_PROG_PIN].contains(&name)
        || xdpfw_common::map_names::ALL.contains(&name)
}

/// Makes a fresh, private pin folder for an attach (the lock is held, nothing is attached).
/// The root of the pins must be root's own; a pin folder without a link is what an attach
/// killed midway (or another user, on a bpffs open to all) left: it is removed first, so the
/// attach proceeds instead of being refused for ever.
fn prepare_pin_dir(inst: &Instance) -> Result<()> {
    files::private_dir(&kernel::pin_root())?;
    match fs::symlink_metadata(&inst.pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).ctx(|| format!("inspecting {}", inst.pin_dir.display())),
        Ok(meta) => {
            tracing::warn!(
                "removing {} ({}), left without a link by an interrupted attach",
                inst.pin_dir.display(),
                if meta.is_dir() { "a partial pin folder" } else { "not a folder" }
            );
            let removed = if meta.is_dir() { fs::remove_dir_all(&inst.pin_dir) } else { fs::remove_file(&inst.pin_dir) };
            removed.ctx(|| format!("removing the partial pin folder {}", inst.pin_dir.display()))?;
        }
    }
    files::private_dir(&inst.pin_dir)
}

/// Checks an attached instance's pin folder before it is adopted: a folder owned by root (by
/// us), not writable by others, holding nothing but the firewall's own pins.
pub fn validate_pins(inst: &Instance) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(&inst.pin_dir).ctx(|| format!("inspecting {}", inst.pin_dir.display()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        refuse!(
            "{} is not a private folder of uid {me} (uid {}, mode {:o}): it was not made by `loader attach`; remove it (`loader detach {}`) and attach again",
            inst.pin_dir.display(),
            meta.uid(),
            meta.mode() & 0o7777,
            inst.iface
        );
    }
    for entry in fs::read_dir(&inst.pin_dir).ctx(|| format!("reading {}", inst.pin_dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = entry.metadata().map(|m| m.uid()).unwrap_or(u32::MAX);
        if !known_pin(&name) || owner != me {
            refuse!(
                "{} holds \"{name}\" (uid {owner}), which `loader attach` never pins: refusing to adopt it; remove it (`loader detach {}`) and attach again",
                inst.pin_dir.display(),
                inst.iface
            );
        }
    }
    Ok(())
}

/// Detaches the program and removes every pin and the state of the instance.
pub fn detach(iface: &str) -> Result<()> {
    let inst = Instance::new(iface)?;
    crate::instance::refuse_private_bpffs()?;
    // Checked before taking the lock too, so a detach of nothing leaves no lock file behind.
    if !inst.pin_dir.exists() {
        refuse!("no firewall is attached to {iface} in this network namespace ({})", inst.netns);
    }
    let lock = inst.lock(Duration::from_secs(30))?;
    if !inst.pin_dir.exists() {
        refuse!("no firewall is attached to {iface}");
    }
    if let Err(e) = kernel::detach_and_unpin(&inst.pin_dir) {
        // Once the link is gone nothing is attached; what else is in the folder (a partial
        // attach, entries another user planted, a folder) goes with it.
        if inst.pin_dir.join("link").exists() {
            return Err(e.into());
        }
        fs::remove_dir_all(&inst.pin_dir).ctx(|| format!("removing {}", inst.pin_dir.display()))?;
    }
    if inst.state_dir.exists() {
        fs::remove_dir_all(&inst.state_dir).ctx(|| format!("removing {}", inst.state_dir.display()))?;
    }
    // The lock file stays: unlinking it while another process waits on it would let a third
    // lock a new file of the same name at the same time.
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
    reload_as(inst, path, opts, history::Operation::Reload, rules::Origin::Local)
}

/// [`reload`] of a ruleset that came from a rules server (stored at `path`): it must be
/// self-contained, so a `file =` in it is an error and no local file is read on its behalf.
pub fn reload_remote(inst: &Instance, path: &Path, opts: &ReloadOptions) -> Result<ReloadReport> {
    reload_as(inst, path, opts, history::Operation::Reload, rules::Origin::Remote)
}

/// Re-applies the ruleset applied `back` times before the current one, through the same pipeline.
pub fn rollback(inst: &Instance, back: usize, opts: &ReloadOptions) -> Result<ReloadReport> {
    let target = inst.history().rollback_target(back)?;
    let Some(snapshot) = target.snapshot else { refuse!("the history entry to roll back to has no snapshot") };
    reload_as(inst, &snapshot, opts, history::Operation::Rollback, rules::Origin::Local)
}

/// Re-applies the newest applied ruleset whose version label is `target` or whose hash starts
/// with it (see [`history::History::find`]), through the same pipeline.
pub fn rollback_to(inst: &Instance, target: &str, opts: &ReloadOptions) -> Result<ReloadReport> {
    let entry = inst.history().find(target)?;
    let Some(snapshot) = entry.snapshot else { refuse!("the history entry to roll back to has no snapshot") };
    reload_as(inst, &snapshot, opts, history::Operation::Rollback, rules::Origin::Local)
}

fn reload_as(inst: &Instance, path: &Path, opts: &ReloadOptions, action: history::Operation, origin: rules::Origin) -> Result<ReloadReport> {
    let result = reload_pipeline(inst, path, opts, origin);
    record(inst, path, action, result)
}

/// Records one attempt in the history: the ruleset applied and its snapshot, or the error.
fn record(inst: &Instance, path: &Path, action: history::Operation, result: Result<(ReloadReport, Snapshot)>) -> Result<ReloadReport> {
    let history = inst.history();
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
            result: history::Outcome::Failed,
            action,
            generation: None,
            version: None,
            hash: None,
            source: path.to_path_buf(),
            snapshot: None,
            error: Some(e.to_string()),
            times: None,
        },
    };
    if let Err(e) = history.append(&entry) {
        tracing::warn!("could not record the reload in {}: {e}", history.dir().display());
    }
    result.map(|(report, _)| report)
}

type Snapshot = std::result::Result<PathBuf, String>;

fn reload_pipeline(inst: &Instance, path: &Path, opts: &ReloadOptions, origin: rules::Origin) -> Result<(ReloadReport, Snapshot)> {
    let total = Instant::now();
    let mut times = ReloadTimes::default();
    let t = Instant::now();
    let counts = rules::set_file_counts();
    let ruleset = history::load_rules_with(path, origin, &inst.history().journal()?)?;
    times.parse_us = us(t.elapsed());
    times.count_set_files(counts);
    // The address tables are compiled outside the lock, unless the live buffer's can be reused
    // (checked again once the lock is held: the live generation may have moved on meanwhile).
    let t = Instant::now();
    let key = tables_cache::address_key(&ruleset);
    let offered = Maps::open(&inst.pin_dir).ok().and_then(|maps| tables_cache::reuse_for(inst, &maps, &key));
    let mut image = match offered {
        Some(_) => None,
        None => Some(compile(&ruleset)?),
    };
    times.compile_us = us(t.elapsed());

    let t = Instant::now();
    let _lock = inst.lock(opts.lock_wait)?;
    times.lock_wait_us = us(t.elapsed());
    if image.is_none() {
        let t = Instant::now();
        image = Some(compile_locked(inst, &ruleset, &key)?);
        times.compile_us += us(t.elapsed());
    }
    let image = image.unwrap_or_else(|| unreachable!("compiled above"));
    install_locked(inst, &ruleset, &image, &key, opts, times, total)
}

/// Compiles `ruleset` with the instance's lock held, reusing the live buffer's address tables
/// when they were compiled from the same address `key` (see [`tables_cache`]).
fn compile_locked(inst: &Instance, ruleset: &Ruleset, key: &[u8]) -> Result<rules::compile::Image> {
    let reuse = match Maps::open(&inst.pin_dir) {
        Ok(maps) => tables_cache::reuse_for(inst, &maps, key),
        Err(_) => None,
    };
    Ok(rules::compile::compile_with(ruleset, reuse.as_ref())?)
}

/// The pipeline from the write of the inactive buffer on, with the instance's lock held:
/// write → prove → flip → grace → clear the retired buffer → record the state.
fn install_locked(
    inst: &Instance,
    ruleset: &Ruleset,
    image: &rules::compile::Image,
    key: &[u8],
    opts: &ReloadOptions,
    mut times: ReloadTimes,
    total: Instant,
) -> Result<(ReloadReport, Snapshot)> {
    if !inst.is_attached() {
        refuse!("no firewall is attached to {}", inst.iface);
    }
    let mut maps = Maps::open(&inst.pin_dir)?;
    let previous = maps.generation();
    let generation = previous + 1;
    let buffer = buffer_of(generation);

    // A reload that died after its flip left this buffer uncleared, possibly moments ago: wait
    // out a grace period before overwriting it, so no packet can still be reading it.
    if maps.header(buffer).generation != 0 {
        grace::wait(opts.min_grace);
        maps.clear(buffer)?;
    }
    // A ruleset that brings `state` back after rulesets without it starts from an empty flow
    // table: what it held was neither refreshed nor closed meanwhile (connections still open
    // are recorded again at the host's next segment). Nothing records now: no buffer has
    // `state` until the install below.
    let state = xdpfw_common::header_flags::STATE;
    if image.header.flags & state != 0 && maps.header(buffer_of(previous)).flags & state == 0 {
        let cleared = maps.clear_flows()?;
        if cleared > 0 {
            tracing::info!("{}: {cleared} stale flows cleared for a ruleset with state", inst.iface);
        }
    }
    // The inactive buffer stops being the twin the delta path of `loader set` may take it for.
    crate::delta::forget_twin(inst);
    let installed = maps.install(buffer, generation, image)?;
    times.tables_reused = image.tables_reused;
    times.install_arrays_us = installed.arrays_us;
    times.install_tables_us = installed.tables_us;
    times.slot_changes = installed.slot_changes;

    // Prove the new ruleset where it will run: its own [[test]] packets through a copy of the
    // program that reads the inactive buffer. A failure leaves the active ruleset untouched.
    if !ruleset.tests.is_empty() {
        let t = Instant::now();
        let mut probe = kernel::open_probe(&inst.pin_dir)?;
        let mut run = |pkt: &rules::packet::PacketSpec| testrun::run_probe(&mut probe, pkt);
        let failures = selftest::self_test_failures(ruleset, Some(&mut run))?;
        if !failures.is_empty() {
            return Err(ControlError::SelfTests {
                file: ruleset.path.clone(),
                failures: SelfTestFailures { total: ruleset.tests.len(), failures },
            });
        }
        times.prove_us = us(t.elapsed());
        times.self_tests = ruleset.tests.len();
    }

    // Recorded before the flip, so `stats` can name the rules even if this process dies between
    // the flip and the final record (the next reload replaces both files).
    let summary = RulesetSummary::new(ruleset, image, true);
    // A deleted state.json (by hand, or lost to a full disk) is rebuilt from what is known, so
    // one lost file does not block every reload until a detach.
    let mut next = match inst.state() {
        Ok(s) => s,
        Err(e) if !inst.state_dir.join("state.json").exists() => {
            tracing::warn!("{e}; rebuilding it with this reload");
            State {
                iface: inst.iface.clone(),
                netns: Some(inst.netns.clone()),
                ifindex: inst.ifindex,
                mode: AttachMode::Auto,
                attached_at: now_secs(),
                generation: previous,
                ruleset: summary.clone(),
                last_reload: None,
                carried: Default::default(),
                retiring: None,
            }
        }
        Err(e) => return Err(e),
    };
    let (old_rules, old_carried) = (next.ruleset.rules.clone(), std::mem::take(&mut next.carried));
    // Until the retired buffer's final counts are in (after the grace period), the names kept
    // carry what they carried before.
    next.carried = crate::instance::carry(&old_carried, &[], &[], &summary.rules);
    // ... and `stats` adds the retiring generation's counters live (see State::retiring).
    next.retiring = Some(crate::instance::Retiring { generation: previous, rules: old_rules.clone() });
    next.generation = generation;
    next.ruleset = summary.clone();
    // The interface may have been renamed, the namespace named since: recorded as they are now.
    (next.iface, next.netns, next.ifindex) = (inst.iface.clone(), Some(inst.netns.clone()), inst.ifindex);
    // Not synced: it is read only while the bpffs maps it describes exist, and a crash of the
    // machine takes those away with it (a crash of this process leaves the page cache).
    inst.write_state_file_unsynced(&format!("next-{generation}.json"), &next)?;

    // The snapshot (exactly the bytes parsed) is written before the ruleset goes live, so a
    // rollback to it is possible from the moment it serves, but synced (and an existing one
    // checked) after the flip: what must be durable is durable before the history names it,
    // and a crash of the machine before that takes the live ruleset with it. One that cannot
    // be written (a full disk) is said in the history, and the reload goes on.
    let history = inst.history();
    let staged = history.stage_snapshot(ruleset);

    // The full copy of the program must run before the flip to a ruleset that needs it: the
    // plain copy does not have its paths. A grace period after the switch, so no packet that
    // started on the plain copy reads the new generation.
    let needs_full = image.header.needs_full_program();
    if needs_full {
        let t = Instant::now();
        if kernel::serve(&inst.pin_dir, variant::FULL)? {
            grace::wait(opts.min_grace);
        }
        times.widen_us = us(t.elapsed());
    }

    let t = Instant::now();
    maps.flip(generation)?;
    times.flip_us = us(t.elapsed());
    times.to_flip_us = us(total.elapsed());
    crate::delta::record_installed(inst, &maps, image);
    // The live tables are described for the next reload to reuse (the description of the
    // previous generation went stale with the flip).
    if let Err(e) = tables_cache::record(inst, generation, &image.addr, key, image.tables_reused) {
        tracing::warn!("the address tables of generation {generation} could not be described for reuse: {e}");
    }
    let snapshot = staged.finish();

    let widened = !needs_full;
    let warnings = ruleset.warnings.iter().map(|w| w.to_string()).collect();
    let report = retire(inst, &mut maps, Flipped { next, old_carried, old_rules, previous, generation }, opts, times, total, warnings, |times| {
        // No packet reads the previous generation now: a ruleset that needs none of the full
        // copy's paths goes to the plain copy.
        if widened {
            let t = Instant::now();
            narrow(inst);
            times.narrow_us = us(t.elapsed());
        }
    })?;
    Ok((report, snapshot))
}


/// A change that has just flipped to `generation`: the state to record (`next`, the live one
/// with the new ruleset), and what the retired generation's counters are carried onto.
pub(crate) struct Flipped {
    pub next: State,
    pub old_carried: std::collections::BTreeMap<String, crate::instance::CarriedCounts>,
    pub old_rules: Vec<String>,
    pub previous: u64,
    pub generation: u64,
}

/// The end of every change after its flip (a reload, a `set` batch on the delta path): a grace
/// period (then `after_grace`, with no packet reading the previous generation), the retired
/// buffer's counters carried by rule name, the state recorded, the retired buffer cleared, the
/// state recorded again, and what earlier interrupted changes left removed.
#[expect(clippy::too_many_arguments, reason = "the pipeline's state, handed on")]
pub(crate) fn retire(
    inst: &Instance,
    maps: &mut Maps,
    flipped: Flipped,
    opts: &ReloadOptions,
    mut times: ReloadTimes,
    total: Instant,
    warnings: Vec<String>,
    after_grace: impl FnOnce(&mut ReloadTimes),
) -> Result<ReloadReport> {
    let Flipped { mut next, old_carried, old_rules, previous, generation } = flipped;
    let (grace_time, grace_method) = grace::wait(opts.min_grace);
    times.grace_us = us(grace_time);
    after_grace(&mut times);

    // The retired buffer's counters are final now: carry them by rule name (see State::carried).
    let retired = buffer_of(previous);
    match maps.rule_stats(retired, maps.header(retired).rule_count) {
        Ok(counts) => next.carried = crate::instance::carry(&old_carried, &old_rules, &counts, &next.ruleset.rules),
        Err(e) => tracing::warn!("per-rule counters of generation {previous} could not be read; they are not carried over: {e}"),
    }

    next.retiring = None;

    let mut report = ReloadReport {
        iface: inst.iface.clone(),
        previous_generation: previous,
        generation,
        buffer: buffer_of(generation),
        ruleset: next.ruleset.clone(),
        grace_method,
        times,
        warnings,
        program: served_name(inst),
    };
    // The new ruleset is live from the flip on: a failure to record it (a full disk) must say
    // so, not claim the change failed. Recorded with the retired counts carried *before* the
    // retired buffer is cleared: a reader sees either the record in progress plus that
    // buffer's live counters, or this one, never the buffer cleared and its counts missing.
    next.last_reload = Some(report.clone());
    if let Err(e) = inst.write_state(&next) {
        return Err(ControlError::LiveButUnrecorded { report: Box::new(report), source: Box::new(e) });
    }

    let t = Instant::now();
    maps.clear(retired)?;
    report.times.clear_us = us(t.elapsed());
    report.times.total_us = us(total.elapsed());
    next.last_reload = Some(report.clone());
    if let Err(e) = inst.write_state(&next) {
        return Err(ControlError::LiveButUnrecorded { report: Box::new(report), source: Box::new(e) });
    }
    // What any earlier, interrupted change left is superseded now.
    for entry in fs::read_dir(&inst.state_dir).ctx(|| format!("reading {}", inst.state_dir.display()))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("next-") {
            let _ = fs::remove_file(entry.path());
        }
    }
    // And the snapshots no one needs (every `set` batch writes one): the lock is held.
    if let Err(e) = inst.history().collect_snapshots(&next.ruleset.hash) {
        tracing::warn!("old snapshots in {} could not be removed: {e}", inst.history().dir().display());
    }
    Ok(report)
}

/// What `loader set add|del|replace|reset` did: the change to the set, and the reload that
/// applied it (`None` when the batch changed nothing: every prefix already present, or absent).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SetReport {
    pub iface: String,
    pub op: String,
    pub edit: rules::setedit::SetEdit,
    pub reload: Option<ReloadReport>,
    /// Reading the live ruleset and recording the change, in microseconds.
    pub edit_us: u64,
    /// How it went live: "delta" (only the changed entries written, see [`crate::delta`]) or
    /// "reload" (the changed ruleset compiled whole).
    pub path: String,
    /// Why a batch took the reload path (`None` for the delta path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_reload: Option<String>,
}

/// The live ruleset's texts (from its snapshot, with no journal) and the instance's journal,
/// with the lock held. Refused for a built-in ruleset and a ruleset without a snapshot.
fn live_texts(inst: &Instance) -> Result<(State, Ruleset, rules::setedit::SetJournal)> {
    let state = inst.state()?;
    if state.ruleset.path.is_none() {
        refuse!("the live ruleset of {} is built in, not from a rules file: it has no sets to change", inst.iface);
    }
    let history = inst.history();
    let snapshot = history.dir().join("snapshots").join(&state.ruleset.hash).join("rules.toml");
    if !snapshot.exists() {
        refuse!("no snapshot of the live ruleset {} at {}: reload its rules file first", rules::short_hash(&state.ruleset.hash), snapshot.display());
    }
    let mut texts = history::load_rules_with(&snapshot, rules::Origin::Local, &Default::default())?;
    // The snapshot must be what went live: its texts with the journal it was taken with hash to
    // the live ruleset's (the instance's journal may be a batch ahead, if a `set` died between
    // writing it and its flip: the batch then goes live with this one).
    let taken_with = history::snapshot_journal(&snapshot)?.unwrap_or_default();
    let sets = texts.sets.clone();
    if rules::setedit::journaled_hash(&texts.hash, &taken_with, |n| sets.contains_key(n)) != state.ruleset.hash {
        refuse!("the snapshot {} does not hash to the live ruleset's {} (edited by hand?)", snapshot.display(), rules::short_hash(&state.ruleset.hash));
    }
    // The changed ruleset keeps the source the live one was loaded from (the operator's file).
    if let Some(p) = &state.ruleset.path {
        texts.path = p.clone();
    }
    Ok((state, texts, history.journal()?))
}

/// The names of `rs`'s sets, for a refusal.
fn set_names(rs: &Ruleset) -> String {
    let known: Vec<&str> = rs.sets.keys().map(String::as_str).collect();
    if known.is_empty() { "none".to_string() } else { known.join(", ") }
}

/// Changes the set `name` of the live ruleset by one batch, recorded in the instance's set
/// journal (see [`rules::setedit`]), so it stands through reloads, rollbacks and restarts until
/// changed again or reset. The journal is written (synced) before the change goes live and put
/// back if it does not. A batch of IPv4 prefixes goes live as a delta when it can ([`crate::delta`]:
/// only the table entries it changes are written, into the inactive buffer, then the flip);
/// any other through the reload pipeline with the whole changed ruleset. Either way a packet
/// sees the set before the batch or after it, never a part of it, and every counter is kept.
/// The lock is held from the read of the journal to the flip, so concurrent changes never lose
/// one another.
pub fn set_update(inst: &Instance, name: &str, op: rules::setedit::SetOp, prefixes: &[ipnet::IpNet], opts: &ReloadOptions) -> Result<SetReport> {
    use rules::setedit::SetOp;
    let total = Instant::now();
    let mut times = ReloadTimes::default();
    let t = Instant::now();
    let _lock = inst.lock(opts.lock_wait)?;
    times.lock_wait_us = us(t.elapsed());
    let t = Instant::now();
    let why_reload = match crate::delta::try_set_update(inst, name, op, prefixes, opts, total, times.clone()) {
        Ok(crate::delta::Outcome::Done(mut report)) => {
            if let Some(r) = report.reload.as_mut() {
                r.times.lock_wait_us = times.lock_wait_us;
            }
            return Ok(*report);
        }
        Ok(crate::delta::Outcome::NotApplicable(why)) => why,
        Err(e) => return Err(e),
    };
    let (state, texts, mut journal) = live_texts(inst)?;
    times.parse_us = us(t.elapsed());
    let Some(base) = texts.sets.get(name) else {
        refuse!("the live ruleset has no set \"{}\" (its sets: {})", name.escape_debug(), set_names(&texts));
    };
    let before = journal.clone();
    let changes = journal.sets.entry(name.to_string()).or_default();
    let mut edit = match op {
        SetOp::Add | SetOp::Del => {
            let base: std::collections::HashSet<ipnet::IpNet> = base.iter().copied().collect();
            changes.record(name, op == SetOp::Add, prefixes, |p| base.contains(p))
        }
        SetOp::Replace => {
            let current = changes.apply(base);
            changes.replace_with(name, prefixes, &current)
        }
    };
    journal.prune();
    let edit_us = us(t.elapsed());
    let report = |edit, reload| SetReport { iface: inst.iface.clone(), op: op.to_string(), edit, reload, edit_us, path: "reload".into(), why_reload: Some(why_reload.clone()) };
    if !edit.changed() {
        edit.size = Some(journal.sets.get(name).map_or(base.len(), |c| c.apply(base).len()));
        return Ok(report(edit, None));
    }
    if journal.len() > rules::setedit::MAX_JOURNAL_PREFIXES {
        refuse!(
            "the set journal of {} would name {} prefixes, more than {}: write the changes into the set files and `loader set reset {}`",
            inst.iface,
            journal.len(),
            rules::setedit::MAX_JOURNAL_PREFIXES,
            inst.iface
        );
    }
    let mut ruleset = texts;
    journal.apply(&mut ruleset);
    edit.size = Some(ruleset.sets[name].len());
    let reload = apply_journal_locked(inst, &state, ruleset, &journal, &before, opts, times, total)?;
    Ok(report(edit, Some(reload)))
}

/// Drops the set changes of `name` (every set's with `None`) from the journal and applies the
/// live rules without them.
pub fn set_reset(inst: &Instance, name: Option<&str>, opts: &ReloadOptions) -> Result<SetReport> {
    let total = Instant::now();
    let mut times = ReloadTimes::default();
    let t = Instant::now();
    let _lock = inst.lock(opts.lock_wait)?;
    times.lock_wait_us = us(t.elapsed());
    let t = Instant::now();
    let (state, texts, mut journal) = live_texts(inst)?;
    times.parse_us = us(t.elapsed());
    let before = journal.clone();
    let mut edit = rules::setedit::SetEdit { set: name.unwrap_or("*").to_string(), ..Default::default() };
    let dropped: Vec<rules::setedit::SetChanges> = match name {
        Some(n) => journal.sets.remove(n).into_iter().collect(),
        None => std::mem::take(&mut journal.sets).into_values().collect(),
    };
    for c in &dropped {
        // What the reset undoes: the prefixes the changes added or removed.
        edit.removed += c.added.len() + c.replace.as_ref().map_or(0, |r| r.len());
        edit.added += c.deleted.len();
    }
    let edit_us = us(t.elapsed());
    let report = |edit, reload| SetReport { iface: inst.iface.clone(), op: "reset".into(), edit, reload, edit_us, path: "reload".into(), why_reload: None };
    if dropped.iter().all(rules::setedit::SetChanges::is_empty) {
        return Ok(report(edit, None));
    }
    let mut ruleset = texts;
    journal.apply(&mut ruleset);
    let reload = apply_journal_locked(inst, &state, ruleset, &journal, &before, opts, times, total)?;
    Ok(report(edit, Some(reload)))
}

/// The end of [`set_update`] and [`set_reset`] on the reload path: the journal stored, the
/// changed ruleset compiled and installed, the attempt recorded (action "set"); the journal as
/// it was put back when the ruleset did not go live.
#[expect(clippy::too_many_arguments, reason = "the pipeline's state, handed on")]
fn apply_journal_locked(
    inst: &Instance,
    _state: &State,
    ruleset: Ruleset,
    journal: &rules::setedit::SetJournal,
    before: &rules::setedit::SetJournal,
    opts: &ReloadOptions,
    mut times: ReloadTimes,
    total: Instant,
) -> Result<ReloadReport> {
    let history = inst.history();
    history.store_journal(journal)?;
    let t = Instant::now();
    let key = tables_cache::address_key(&ruleset);
    let result = compile_locked(inst, &ruleset, &key).and_then(|image| {
        times.compile_us = us(t.elapsed());
        install_locked(inst, &ruleset, &image, &key, opts, times, total)
    });
    if result.is_err()
        && inst.state().is_ok_and(|s| s.ruleset.hash != ruleset.hash)
        && let Err(e) = history.store_journal(before)
    {
        tracing::error!("the set change did not go live, and the set journal could not be put back: {e}");
    }
    record(inst, &ruleset.path, history::Operation::Set, result)
}
