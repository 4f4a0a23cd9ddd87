//! One function per subcommand: call the library, hand the result to `render` (or serialize
//! it for `--json`), return the output and its exit code.

use std::{fs::File, path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use xdpfw_control::{self as control, Instance, ReloadOptions, escalation};
use xdpfw_kernel::{AttachMode, testrun::PrivateProgram};
use xdpfw_rules::{
    self as rules,
    compile::compile,
    matcher,
    owner::OwnerSpec,
    packet::PacketSpec,
    selftest,
};

use crate::{
    exit::{INVALID_RULESET, Output, UsageError, WARNINGS},
    flags::{Cli, Command, ExplainTarget, TopArgs},
    render,
};

/// Whether a command changes an instance (an invalid ruleset then says "nothing was changed").
pub(crate) fn mutates(c: &Command) -> bool {
    matches!(c, Command::Attach { .. } | Command::Reload { .. } | Command::Rollback { .. } | Command::Run(_) | Command::Set(_))
}

pub(crate) fn run(cli: Cli) -> Result<Output> {
    if let Some(ns) = &cli.netns {
        enter_netns(ns)?;
    }
    match cli.command {
        Command::Attach { iface, rules, last_good, mode } => attach(&iface, rules, last_good, mode.into()),
        Command::Detach { iface } => {
            control::detach(&iface)?;
            Ok(Output::ok(format!("detached from {iface}; pins removed\n")))
        }
        Command::Reload { file, iface, lock_wait, min_grace_ms, json } => {
            let opts = ReloadOptions { lock_wait: Duration::from_secs(lock_wait), min_grace: Duration::from_millis(min_grace_ms) };
            reload(&file, iface.as_deref(), &opts, json)
        }
        Command::Status { iface, history, json } => status(iface.as_deref(), history, json),
        Command::Rollback { n, to, iface, json } => {
            let inst = Instance::find(iface.as_deref())?;
            let r = match to {
                Some(target) => control::rollback_to(&inst, &target, &ReloadOptions::default())?,
                None => control::rollback(&inst, n, &ReloadOptions::default())?,
            };
            Ok(Output::ok(if json { json_text(&r)? } else { render::rollback(&r) }))
        }
        Command::Stats { iface, json } => {
            let inst = Instance::find(iface.as_deref())?;
            let s = control::stats(&inst)?;
            let mode = mode_in_effect(&inst.iface, s.mode);
            Ok(Output::ok(if json { json_text_with(&s, &[("mode_in_effect", serde_json::json!(mode))])? } else { render::stats(&s, &mode) }))
        }
        Command::Run(args) if args.check => check_run_source(&args),
        Command::Run(args) => {
            xdpfw_daemon::main(args.into_config())?;
            Ok(Output::ok(String::new()))
        }
        Command::List { json } => list(json),
        Command::Prune { dry_run, json } => prune(dry_run, json),
        Command::Check { file, strict, json } => check(&file, strict, json),
        Command::Explain { args, iface, kernel, owner, json, state } => {
            let (target, packet) = crate::flags::explain_target(args, iface).map_err(UsageError)?;
            let packet = match state {
                Some(s) => format!("{packet} state {s}"),
                None => packet,
            };
            let rs = match target {
                ExplainTarget::File(file) => rules::load(&file)?,
                ExplainTarget::Live(iface) => live_ruleset(iface.as_deref())?.2,
            };
            explain(&rs, &packet, kernel, owner, json)
        }
        Command::Show { iface, sets, json } => show(iface.as_deref(), sets, json),
        Command::Diff { file, iface, json } => diff(&file, iface.as_deref(), json),
        Command::Top(args) => top(&args),
        Command::Trace(args) => trace(&args),
        Command::Man { dir } => man(&dir),
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut crate::flags::definition(), "loader", &mut buf);
            Ok(Output::ok(String::from_utf8(buf)?))
        }
        Command::Fleet(cmd) => crate::fleet::run(cmd),
        Command::Set(cmd) => set(cmd),
    }
}

/// `loader set add|del|replace IFACE SET (CIDR... | --file F)`.
fn set(cmd: crate::flags::SetCommand) -> Result<Output> {
    use crate::flags::SetCommand;
    use rules::setedit::SetOp;
    let (op, args) = match cmd {
        SetCommand::Add(a) => (SetOp::Add, a),
        SetCommand::Del(a) => (SetOp::Del, a),
        SetCommand::Replace(a) => (SetOp::Replace, a),
        SetCommand::Reset(a) => {
            let inst = Instance::find(Some(&a.iface))?;
            let opts = ReloadOptions { lock_wait: Duration::from_secs(a.lock_wait), ..Default::default() };
            let r = control::set_reset(&inst, a.set.as_deref(), &opts)?;
            return Ok(Output::ok(if a.json { json_text(&r)? } else { render::set(&r) }));
        }
    };
    let mut prefixes = Vec::with_capacity(args.prefixes.len());
    for p in &args.prefixes {
        prefixes.push(rules::parse_cidr(p).map_err(UsageError)?);
    }
    if let Some(f) = &args.file {
        let text = if f.as_os_str() == "-" {
            let mut t = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(std::io::stdin(), rules::MAX_SET_FILE), &mut t).context("reading prefixes from stdin")?;
            t
        } else {
            rules::read_bounded(f, rules::MAX_SET_FILE).with_context(|| format!("reading {}", f.display()))?
        };
        let more = rules::setedit::parse_prefix_lines(&text).map_err(|e| UsageError(format!("{}: {e}", f.display())))?;
        prefixes.extend(more);
    }
    if prefixes.is_empty() && op != SetOp::Replace {
        return Err(UsageError(format!("set {op} needs at least one CIDR or --file")).into());
    }
    let inst = Instance::find(Some(&args.iface))?;
    let opts = ReloadOptions { lock_wait: Duration::from_secs(args.lock_wait), ..Default::default() };
    let r = control::set_update(&inst, &args.set, op, &prefixes, &opts)?;
    if let Some(reload) = &r.reload {
        for w in &reload.warnings {
            crate::journal::eprint(crate::journal::WARNING, w);
        }
    }
    Ok(Output::ok(if args.json { json_text(&r)? } else { render::set(&r) }))
}

/// Man pages from the clap definition: `loader.1` and one page per visible subcommand.
fn man(dir: &std::path::Path) -> Result<Output> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(crate::flags::definition(), dir).with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut pages: Vec<String> = std::fs::read_dir(dir)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    pages.sort();
    Ok(Output::ok(pages.iter().map(|p| format!("{}\n", dir.join(p).display())).collect()))
}

/// The version of every JSON document the CLI prints (the `schema` field; docs/json.md). It
/// goes up when a field changes meaning or disappears, not when one is added.
pub(crate) const JSON_SCHEMA: u32 = 1;

fn json_text(v: &impl serde::Serialize) -> Result<String> {
    json_text_with(v, &[])
}

/// `v` as pretty JSON with `"schema"` and the `extra` fields added to its top-level object.
fn json_text_with(v: &impl serde::Serialize, extra: &[(&str, serde_json::Value)]) -> Result<String> {
    let mut value = serde_json::to_value(v)?;
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("schema".into(), JSON_SCHEMA.into());
        for (k, v) in extra {
            map.insert((*k).into(), v.clone());
        }
    }
    Ok(serde_json::to_string_pretty(&value)? + "\n")
}

/// The XDP mode the kernel attached in ("native" or "skb"), asked of rtnetlink; what was
/// requested when the kernel cannot say (another namespace, the link going away).
fn mode_in_effect(iface: &str, requested: AttachMode) -> String {
    let mode = match xdpfw_kernel::netlink::attached_mode(iface) {
        Ok(Some(m)) => m,
        _ => requested,
    };
    mode_name(mode)
}

fn mode_name(mode: AttachMode) -> String {
    match mode {
        AttachMode::Auto => "auto".into(),
        AttachMode::Native => "native".into(),
        AttachMode::Skb => "skb".into(),
    }
}

/// `loader list`: every attached instance with its mode, generation and live ruleset.
fn list(json: bool) -> Result<Output> {
    let mut rows = Vec::new();
    for inst in control::instance::list()? {
        let mut row = render::ListRow {
            iface: inst.iface.clone(),
            netns: inst.netns.to_string(),
            netns_inode: inst.netns.inode,
            ifindex: inst.ifindex,
            mode: "-".into(),
            generation: None,
            version: None,
            hash: None,
            rules: None,
            error: None,
        };
        match inst.state() {
            Ok(st) => {
                // The kernel is asked in this namespace only: elsewhere the name means another link.
                row.mode = if inst.is_here() { mode_in_effect(&inst.iface, st.mode) } else { mode_name(st.mode) };
                row.generation = Some(st.generation);
                row.version = st.ruleset.version.clone();
                row.hash = Some(st.ruleset.hash.clone());
                row.rules = Some(st.ruleset.rules.len());
            }
            Err(e) => row.error = Some(e.to_string()),
        }
        rows.push(row);
    }
    let stale: Vec<render::StaleRow> = control::prune::stale()?.iter().map(render::StaleRow::from).collect();
    Ok(Output::ok(if json { json_text(&serde_json::json!({ "instances": rows, "stale": stale }))? } else { render::list(&rows, &stale) }))
}

/// `loader prune`: removes the instances of namespaces that are gone.
fn prune(dry_run: bool, json: bool) -> Result<Output> {
    let stale = control::prune::stale()?;
    if !dry_run {
        for s in &stale {
            control::prune::remove(s)?;
        }
    }
    let rows: Vec<render::StaleRow> = stale.iter().map(render::StaleRow::from).collect();
    Ok(Output::ok(if json { json_text(&serde_json::json!({ "removed": !dry_run, "stale": rows }))? } else { render::prune(&rows, dry_run) }))
}

fn enter_netns(name: &str) -> Result<()> {
    let path = PathBuf::from("/run/netns").join(name);
    let f = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {}", path.display()))
}

fn attach(iface: &str, rules: Option<PathBuf>, last_good: bool, mode: AttachMode) -> Result<Output> {
    let rules = if last_good {
        let history = Instance::new(iface)?.history();
        let last = history.applied()?.into_iter().next();
        Some(last.and_then(|e| e.snapshot).ok_or_else(|| anyhow!("no ruleset has gone live on {iface} yet (history in {})", history.dir().display()))?)
    } else {
        rules
    };
    let report = control::attach(iface, rules.as_deref(), mode)?;
    let mode = mode_in_effect(iface, mode);
    Ok(Output::ok(format!(
        "attached to {iface} ({mode} mode): generation {}, {} rules, default {}, pinned at {}\n",
        report.generation,
        report.ruleset.rules.len(),
        report.ruleset.default,
        Instance::new(iface)?.pin_dir.display()
    )))
}

fn reload(file: &std::path::Path, iface: Option<&str>, opts: &ReloadOptions, json: bool) -> Result<Output> {
    let inst = Instance::find(iface)?;
    let r = control::reload(&inst, file, opts)?;
    for w in &r.warnings {
        crate::journal::eprint(crate::journal::WARNING, &w.to_string());
    }
    Ok(Output::ok(if json { json_text(&r)? } else { render::reload(&r) }))
}

fn status(iface: Option<&str>, history: bool, json: bool) -> Result<Output> {
    let inst = Instance::find(iface)?;
    let state = inst.state()?;
    let entries = if history { inst.history().entries()? } else { Vec::new() };
    let served = escalation::served(&inst);
    let mode = mode_in_effect(&inst.iface, state.mode);
    let text = if json {
        json_text(&serde_json::json!({ "state": state, "mode_in_effect": mode, "escalation": served, "history": history.then_some(&entries) }))?
    } else {
        render::status(&state, &mode, served.as_ref(), &entries)
    };
    Ok(Output::ok(text))
}

/// `loader run … --check` (the unit's ExecStartPre=): the rules file `run` would watch, checked
/// as `loader check` checks it; a remote source is checked at every fetch instead.
fn check_run_source(args: &crate::flags::RunArgs) -> Result<Output> {
    match &args.rules {
        Some(file) => check(file, false, false),
        None => Ok(Output::ok(format!("{}: the source is remote; every ruleset fetched is checked before it goes live\n", args.iface))),
    }
}

fn check(file: &std::path::Path, strict: bool, json: bool) -> Result<Output> {
    let rs = rules::load(file)?;
    let image = compile(&rs)?;
    let failures = selftest::check_self_tests(&rs).err();
    let code = if failures.is_some() {
        INVALID_RULESET
    } else if strict && !rs.warnings.is_empty() {
        WARNINGS
    } else {
        0
    };
    if json {
        let doc = serde_json::json!({
            "file": file,
            "ok": failures.is_none(),
            "version": rs.version,
            "hash": rs.hash,
            "rules": rs.rules.len(),
            "prefixes": rs.prefix_count(),
            "table_entries": image.prefix_count(),
            "bitmaps": image.bitmaps.len(),
            "tests": rs.tests.len(),
            "warnings": rs.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "self_test_failures": failures.as_ref().map(|f| f.failures.iter().map(ToString::to_string).collect::<Vec<_>>()).unwrap_or_default(),
        });
        return Ok(Output { text: json_text(&doc)?, code });
    }
    for w in &rs.warnings {
        crate::journal::eprint(crate::journal::WARNING, &w.to_string());
    }
    if let Some(failures) = failures {
        for f in &failures.failures {
            crate::journal::eprint(crate::journal::ERR, &f.to_string());
        }
        crate::journal::eprint(crate::journal::ERR, &format!("{}: {} of {} self-tests failed", file.display(), failures.failures.len(), failures.total));
        return Ok(Output { text: String::new(), code });
    }
    let text = format!(
        "{}: ok: {} rules, {} prefixes ({} table entries after merging), {} bitmaps, {} tests\n",
        file.display(),
        rs.rules.len(),
        rs.prefix_count(),
        image.prefix_count(),
        image.bitmaps.len(),
        rs.tests.len()
    );
    Ok(Output { text, code })
}

fn explain(rs: &rules::Ruleset, packet: &str, kernel: bool, owner: Option<OwnerSpec>, json: bool) -> Result<Output> {
    let rs = rs.clone();
    let pkt: PacketSpec = packet.parse().map_err(|e| UsageError(format!("parsing the packet \"{packet}\": {e}")))?;
    // What the kernel decides alone (escalating where a rule needs the owner), and with the
    // owner given, what the escalation service then decides.
    let in_kernel = matcher::decide(&rs, &pkt);
    let d = match &owner {
        Some(OwnerSpec(o)) if in_kernel.escalated => matcher::decide_with_owner(&rs, &pkt, o.as_ref()),
        _ => in_kernel.clone(),
    };
    let kernel_verdict = if kernel {
        let mut prog = PrivateProgram::load()?;
        prog.activate(&compile(&rs)?)?;
        // An established or related packet's flow is in the program's table for the run.
        let xdp = prog.run_spec(&pkt)?;
        Some(if xdp == xdpfw_common::action::DROP { rules::Action::Drop } else { rules::Action::Pass })
    } else {
        None
    };
    let text = if json {
        json_text(&serde_json::json!({ "packet": pkt.to_string(), "decision": d, "in_kernel": in_kernel, "kernel": kernel_verdict }))?
    } else {
        render::explain(&pkt, &d, &in_kernel, kernel_verdict)
    };
    if let Some(k) = kernel_verdict
        && k != in_kernel.action
    {
        bail!("{text}the kernel says {k} but the reference matcher says {}", in_kernel.action);
    }
    Ok(Output::ok(text))
}

/// The live ruleset of an instance, loaded from its snapshot in the history (exactly the bytes
/// that went live: the rules file and its set files), checked against the live hash.
fn live_ruleset(iface: Option<&str>) -> Result<(Instance, control::State, rules::Ruleset, PathBuf)> {
    let inst = Instance::find(iface)?;
    let state = inst.state()?;
    let hash = &state.ruleset.hash;
    if state.ruleset.path.is_none() {
        bail!(
            "the live ruleset of {} is built in ({}, {} rules, default {}), not from a rules file",
            inst.iface,
            short_hash_of(hash),
            state.ruleset.rules.len(),
            state.ruleset.default
        );
    }
    let snapshot = inst.history().dir().join("snapshots").join(hash).join("rules.toml");
    if !snapshot.exists() {
        bail!("no snapshot of the live ruleset {} of {} at {}", short_hash_of(hash), inst.iface, snapshot.display());
    }
    let rs = control::history::load_rules(&snapshot, rules::Origin::Local)?;
    if &rs.hash != hash {
        bail!("the snapshot {} does not hash to the live ruleset's {} (edited by hand?)", snapshot.display(), short_hash_of(hash));
    }
    Ok((inst, state, rs, snapshot))
}

fn short_hash_of(h: &str) -> &str {
    rules::short_hash(h)
}

/// `loader show`: the live ruleset's text as it went live, set sizes, and set files on request.
fn show(iface: Option<&str>, with_sets: bool, json: bool) -> Result<Output> {
    let (inst, state, rs, snapshot) = live_ruleset(iface)?;
    // Exactly the bytes that went live, as parsed from the snapshot.
    let text = rs.sources.rules.to_string();
    let sets: Vec<render::SetSize> = rs.sets.iter().map(|(name, p)| render::SetSize { name: name.clone(), prefixes: p.len() }).collect();
    let mut files = Vec::new();
    if with_sets {
        for (written, text) in &rs.sources.sets {
            files.push((written.clone(), text.to_string()));
        }
    }
    let out = if json {
        json_text(&serde_json::json!({
            "iface": inst.iface,
            "generation": state.generation,
            "version": rs.version,
            "hash": rs.hash,
            "snapshot": snapshot,
            "source": state.ruleset.path,
            "text": text,
            "sets": sets,
            "set_changes": rs.sources.journal.as_deref().map(|j| j.sets.iter().map(|(name, c)| serde_json::json!({
                "set": name,
                "added": c.added.len(),
                "deleted": c.deleted.len(),
                "replaced_with": c.replace.as_ref().map(|r| r.len()),
            })).collect::<Vec<_>>()),
            "set_files": with_sets.then(|| files.iter().map(|(n, c)| serde_json::json!({ "file": n, "text": c })).collect::<Vec<_>>()),
        }))?
    } else {
        render::show(&inst.iface, &state, &snapshot, &text, &sets, &files)
    };
    Ok(Output::ok(out))
}

/// `loader diff FILE`: what reloading FILE would change against the live ruleset.
fn diff(file: &std::path::Path, iface: Option<&str>, json: bool) -> Result<Output> {
    let (inst, _, live, _) = live_ruleset(iface)?;
    // What a reload would apply: the file with the instance's set journal on top.
    let new = control::history::load_rules_with(file, rules::Origin::Local, &inst.history().journal()?)?;
    compile(&new)?;
    let d = render::RulesetDiff::new(&live, &new);
    Ok(Output::ok(if json { json_text(&d)? } else { render::diff(&d) }))
}

/// `loader top`: samples the counters every interval and prints the rates between the last two
/// samples, as a screen redrawn in place on a terminal, else as snapshots one after another
/// (or JSON Lines), until interrupted or `--count` refreshes.
fn top(args: &TopArgs) -> Result<Output> {
    use std::io::IsTerminal;
    let inst = Instance::find(args.iface())?;
    let screen = !args.plain && !args.json && std::io::stdout().is_terminal();
    let mut prev = control::stats(&inst)?;
    let mode = mode_in_effect(&inst.iface, prev.mode);
    let mut at = std::time::Instant::now();
    let (mut shown, mut misses) = (0u64, 0u32);
    while args.count.is_none_or(|n| shown < n) {
        std::thread::sleep(args.interval);
        let cur = match control::stats(&inst) {
            Ok(s) => s,
            // A reload writing the state between our two reads: the next refresh will see it.
            Err(_) if inst.is_attached() && misses < 5 => {
                misses += 1;
                continue;
            }
            Err(e) => return Err(anyhow::Error::from(e).context(format!("reading the counters of {}", inst.iface))),
        };
        misses = 0;
        let now = std::time::Instant::now();
        let frame = render::TopFrame::new(&prev, &cur, now.duration_since(at).as_secs_f64(), &mode, control::files::now_secs());
        let text = if args.json {
            let mut v = serde_json::to_value(&frame)?;
            if let serde_json::Value::Object(m) = &mut v {
                m.insert("schema".into(), JSON_SCHEMA.into());
            }
            serde_json::to_string(&v)? + "\n"
        } else if screen {
            render::top_screen(&frame, terminal_size())
        } else {
            render::top(&frame, usize::MAX) + "\n"
        };
        if !crate::exit::print_now(&text)? {
            break;
        }
        (prev, at) = (cur, now);
        shown += 1;
    }
    Ok(Output::ok(String::new()))
}

/// Set by SIGINT and SIGTERM while `trace` runs: it stops, and clears its lease on the way out.
static STOP_TRACE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn stop_trace(_: nix::libc::c_int) {
    STOP_TRACE.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn trace(args: &crate::flags::TraceArgs) -> Result<Output> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    use std::sync::atomic::Ordering;
    use xdpfw_control::trace::{TraceFilter, TraceRate, Tracer};
    let filter = TraceFilter::parse(&args.filter).map_err(UsageError)?;
    let inst = Instance::find(Some(&args.iface))?;
    let rate = TraceRate { sample: args.sample, rate: args.rate, burst: args.burst.unwrap_or(args.rate) };
    // Installed before the lease is taken: an interrupt from then on ends the loop below, and the
    // tracer's Drop clears the lease.
    let handler = SigAction::new(SigHandler::Handler(stop_trace), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &handler) }.context("installing a signal handler")?;
    }
    let mut tracer = Tracer::start(inst, filter, rate)?;
    let started = std::time::Instant::now();
    let mut shown = 0u64;
    // On stderr even with --json: it tells a reader the trace has begun.
    eprintln!(
        "tracing {} (at most {} decisions/s{}); Ctrl-C to stop",
        tracer.iface(),
        args.rate,
        if args.sample > 1 { format!(", one in {} sampled", args.sample) } else { String::new() }
    );
    'outer: while !STOP_TRACE.load(Ordering::Relaxed) {
        let left = args.duration.map(|d| d.saturating_sub(started.elapsed()));
        if left.is_some_and(|l| l.is_zero()) {
            break;
        }
        let events = tracer.poll(left.unwrap_or(Duration::from_millis(500)).min(Duration::from_millis(500)));
        for e in events {
            if args.count.is_some_and(|n| shown >= n) {
                break 'outer;
            }
            let text = if args.json {
                let mut v = serde_json::to_value(&e)?;
                if let serde_json::Value::Object(m) = &mut v {
                    m.insert("schema".into(), JSON_SCHEMA.into());
                    m.insert("time".into(), render::rfc3339_ns(e.time_unix_ns).into());
                }
                serde_json::to_string(&v)? + "\n"
            } else {
                render::trace_line(&e) + "\n"
            };
            // A reader that went away (`loader trace eth0 | head`) ends the trace, successfully.
            if !crate::exit::print_now(&text)? {
                break 'outer;
            }
            shown += 1;
        }
        if args.count.is_some_and(|n| shown >= n) {
            break;
        }
    }
    let counters = tracer.counters();
    drop(tracer);
    eprintln!("{shown} decisions shown; {} beyond the rate, {} lost to a full ring (in the kernel)", counters.limited, counters.lost);
    Ok(Output::ok(String::new()))
}

/// Rows and columns of the terminal on stdout (24x80 when it cannot say).
fn terminal_size() -> (usize, usize) {
    let mut ws = nix::libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass; fd 1 is ours to query.
    let ok = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 { (usize::from(ws.ws_row), usize::from(ws.ws_col)) } else { (24, 80) }
}
