//! One function per subcommand: call the library, hand the result to `render` (or serialize
//! it for `--json`), return the output and its exit code.

use std::{fs::File, path::PathBuf, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use xdpfw_control::{self as control, Instance, ReloadOptions, escalation, history::History};
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
    flags::{Cli, Command},
    render,
};

/// Whether a command changes an instance (an invalid ruleset then says "nothing was changed").
pub(crate) fn mutates(c: &Command) -> bool {
    matches!(c, Command::Attach { .. } | Command::Reload { .. } | Command::Rollback { .. } | Command::Run(_))
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
        Command::Rollback { n, iface, json } => {
            let inst = Instance::find(iface.as_deref())?;
            let r = control::rollback(&inst, n, &ReloadOptions::default())?;
            Ok(Output::ok(if json { json_text(&r)? } else { render::rollback(&r) }))
        }
        Command::Stats { iface, json } => {
            let inst = Instance::find(iface.as_deref())?;
            let s = control::stats(&inst)?;
            Ok(Output::ok(if json { json_text(&s)? } else { render::stats(&s) }))
        }
        Command::Run(args) => {
            xdpfw_daemon::main(args.into_config())?;
            Ok(Output::ok(String::new()))
        }
        Command::List => Ok(Output::ok(control::instance::list()?.iter().map(|n| format!("{n}\n")).collect())),
        Command::Check { file, strict } => check(&file, strict),
        Command::Explain { file, packet, kernel, owner, json } => explain(&file, &packet, kernel, owner, json),
        Command::Fleet(cmd) => crate::fleet::run(cmd),
    }
}

fn json_text(v: &impl serde::Serialize) -> Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

fn enter_netns(name: &str) -> Result<()> {
    let path = PathBuf::from("/run/netns").join(name);
    let f = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {}", path.display()))
}

fn attach(iface: &str, rules: Option<PathBuf>, last_good: bool, mode: AttachMode) -> Result<Output> {
    let rules = if last_good {
        let last = History::new(iface).applied()?.into_iter().next();
        Some(last.and_then(|e| e.snapshot).ok_or_else(|| {
            anyhow!("no ruleset has gone live on {iface} yet (history in {})", control::history::history_root().display())
        })?)
    } else {
        rules
    };
    let report = control::attach(iface, rules.as_deref(), mode)?;
    Ok(Output::ok(format!(
        "attached to {iface} ({mode:?} mode): generation {}, {} rules, default {}, pinned at {}\n",
        report.generation,
        report.ruleset.rules.len(),
        report.ruleset.default,
        xdpfw_kernel::pin_dir(iface).display()
    )))
}

fn reload(file: &std::path::Path, iface: Option<&str>, opts: &ReloadOptions, json: bool) -> Result<Output> {
    let inst = Instance::find(iface)?;
    let r = control::reload(&inst, file, opts)?;
    for w in &r.warnings {
        eprintln!("{w}");
    }
    Ok(Output::ok(if json { json_text(&r)? } else { render::reload(&r) }))
}

fn status(iface: Option<&str>, history: bool, json: bool) -> Result<Output> {
    let inst = Instance::find(iface)?;
    let state = inst.state()?;
    let entries = if history { History::new(&inst.iface).entries()? } else { Vec::new() };
    let served = escalation::served(&inst);
    let text = if json {
        json_text(&serde_json::json!({ "state": state, "escalation": served, "history": history.then_some(&entries) }))?
    } else {
        render::status(&state, served.as_ref(), &entries)
    };
    Ok(Output::ok(text))
}

fn check(file: &std::path::Path, strict: bool) -> Result<Output> {
    let rs = rules::load(file)?;
    let image = compile(&rs)?;
    for w in &rs.warnings {
        eprintln!("{w}");
    }
    if let Err(failures) = selftest::check_self_tests(&rs) {
        for f in &failures.failures {
            eprintln!("{f}");
        }
        eprintln!("{}: {} of {} self-tests failed", file.display(), failures.failures.len(), failures.total);
        return Ok(Output { text: String::new(), code: INVALID_RULESET });
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
    let code = if strict && !rs.warnings.is_empty() { WARNINGS } else { 0 };
    Ok(Output { text, code })
}

fn explain(file: &std::path::Path, packet: &str, kernel: bool, owner: Option<OwnerSpec>, json: bool) -> Result<Output> {
    let rs = rules::load(file)?;
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
        Some(prog.verdict(&pkt.to_frame())?)
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
