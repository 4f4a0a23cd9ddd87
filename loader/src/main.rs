//! `loader`: the command line of the XDP firewall.
//!
//! Exit codes: 0 success, 1 runtime error, 2 usage error, 3 invalid rules file, 4 warnings
//! under `check --strict`.

use std::{fs::File, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xdpfw::{
    compile::compile,
    instance::{self, Instance, ReloadOptions},
    kernel::AttachMode,
    matcher,
    owner::OwnerSpec,
    packet::PacketSpec,
    rules::{self, RulesError},
    testrun::PrivateProgram,
};

const EXIT_INVALID_RULES: u8 = 3;
const EXIT_WARNINGS: u8 = 4;

#[derive(Parser)]
#[command(name = "loader", version, about = "An XDP fast-path firewall with atomic rule reloads")]
struct Cli {
    /// Run in the network namespace /run/netns/NAME (as `ip -n NAME`); pins stay in the host's bpffs.
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the program, pin it and its maps, install the rules, attach to IFACE.
    Attach {
        iface: String,
        /// Rules file; without it every packet passes (counters only).
        #[arg(long, conflicts_with = "last_good")]
        rules: Option<PathBuf>,
        /// Install the last ruleset that went live on IFACE (from the history in /var/lib/xdpfw).
        #[arg(long)]
        last_good: bool,
        #[arg(long, value_enum, default_value = "auto")]
        mode: AttachMode,
    },
    /// Detach from IFACE and remove every pin.
    Detach { iface: String },
    /// Atomically replace the active rules with FILE.
    Reload {
        file: PathBuf,
        /// The interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        /// Seconds to wait for a concurrent reload before giving up.
        #[arg(long, default_value = "30")]
        lock_wait: u64,
        /// Minimum grace period in milliseconds (membarrier's proof is used in any case).
        #[arg(long, default_value = "0")]
        min_grace_ms: u64,
        #[arg(long)]
        json: bool,
    },
    /// The active ruleset and generation, the last reload, and with --history every attempt.
    Status {
        #[arg(long)]
        iface: Option<String>,
        #[arg(long)]
        history: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-apply the ruleset that was live N applied rulesets ago (default 1: the previous one).
    Rollback {
        #[arg(default_value = "1")]
        n: usize,
        #[arg(long)]
        iface: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Counters, the active generation and the ruleset.
    Stats {
        #[arg(long)]
        iface: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the interfaces with an attached firewall.
    List,
    /// Keep IFACE's rules in line with a watched file or an HTTP(S) URL, with Prometheus metrics
    /// (a daemon for systemd: SIGHUP re-reads, SIGTERM stops and leaves the firewall attached).
    Run(xdpfw::daemon::RunArgs),
    /// Validate a rules file without touching the kernel.
    Check {
        file: PathBuf,
        /// Exit with 4 when there are warnings.
        #[arg(long)]
        strict: bool,
    },
    /// Which rule decides PACKET, and why, e.g. "tcp 198.51.100.7:5555 -> 203.0.113.1:22 flags S".
    Explain {
        file: PathBuf,
        packet: String,
        /// Also run the packet through the real program (BPF_PROG_TEST_RUN); the two must agree.
        #[arg(long)]
        kernel: bool,
        /// The owner of the local socket, for rules with owner conditions:
        /// "process=nginx uid=33 user=www-data exe=/usr/sbin/nginx unit=nginx.service", or "none".
        #[arg(long, value_name = "SPEC")]
        owner: Option<OwnerSpec>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A daemon's log is its record of what it did: info unless RUST_LOG says otherwise.
    let filter = match cli.command {
        Command::Run(_) => tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        _ => tracing_subscriber::EnvFilter::from_default_env(),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(r) = e.downcast_ref::<RulesError>() {
                eprintln!("{r}");
                eprintln!("nothing was changed");
                return ExitCode::from(EXIT_INVALID_RULES);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn enter_netns(name: &str) -> Result<()> {
    let path = PathBuf::from("/run/netns").join(name);
    let f = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {}", path.display()))
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(ns) = &cli.netns {
        enter_netns(ns)?;
    }
    match cli.command {
        Command::Attach { iface, rules, last_good, mode } => {
            let rules = if last_good {
                let last = xdpfw::history::History::new(&iface).applied()?.into_iter().next();
                Some(last.and_then(|e| e.snapshot).ok_or_else(|| anyhow::anyhow!("no ruleset has gone live on {iface} yet (history in {})", xdpfw::history::history_root().display()))?)
            } else {
                rules
            };
            let report = instance::attach(&iface, rules.as_deref(), mode)?;
            println!(
                "attached to {iface} ({mode:?} mode): generation {}, {} rules, default {}, pinned at {}",
                report.generation,
                report.ruleset.rules.len(),
                report.ruleset.default,
                xdpfw::kernel::pin_dir(&iface).display()
            );
        }
        Command::Detach { iface } => {
            instance::detach(&iface)?;
            println!("detached from {iface}; pins removed");
        }
        Command::Status { iface, history, json } => {
            let inst = Instance::find(iface.as_deref())?;
            let state = inst.state()?;
            let entries = if history { xdpfw::history::History::new(&inst.iface).entries()? } else { Vec::new() };
            let escalation = xdpfw::escalation::served(&inst);
            if json {
                let v = serde_json::json!({ "state": state, "escalation": escalation, "history": history.then_some(&entries) });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let r = &state.ruleset;
                println!("xdpfw on {} ({:?} mode), attached at {} (unix time)", state.iface, state.mode, state.attached_at);
                println!("  generation {}: {} {} ({} rules, default {}){}", state.generation, r.version.as_deref().unwrap_or("(no version)"), &r.hash[..12.min(r.hash.len())], r.rules.len(), r.default, r.path.as_ref().map(|p| format!(", from {}", p.display())).unwrap_or_default());
                if !r.owner_rules.is_empty() || escalation.is_some() {
                    println!("  escalation: {}", instance::escalation_line(&r.owner_rules, escalation.as_ref()));
                }
                if let Some(l) = &state.last_reload {
                    println!("  last reload: generation {} -> {}, {} us (grace {} us, {:?})", l.previous_generation, l.generation, l.times.total_us, l.times.grace_us, l.grace_method);
                }
                for e in &entries {
                    println!(
                        "  {}  {:<8} {:<7} gen {:<6} {:<14} {}  {}",
                        e.time,
                        e.action,
                        e.result,
                        e.generation.map_or("-".into(), |g| g.to_string()),
                        e.version.as_deref().unwrap_or("-"),
                        e.hash.as_deref().map_or("-", |h| &h[..12.min(h.len())]),
                        e.error.as_deref().map(|m| m.lines().next().unwrap_or("")).unwrap_or(&e.source.to_string_lossy())
                    );
                }
            }
        }
        Command::Rollback { n, iface, json } => {
            let inst = Instance::find(iface.as_deref())?;
            let r = instance::rollback(&inst, n, &ReloadOptions::default())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("rolled back {}: generation {} -> {} ({})", r.iface, r.previous_generation, r.generation, r.ruleset.version.as_deref().unwrap_or("no version"));
            }
        }
        Command::Reload { file, iface, lock_wait, min_grace_ms, json } => {
            let inst = Instance::find(iface.as_deref())?;
            let opts = ReloadOptions {
                lock_wait: Duration::from_secs(lock_wait),
                min_grace: Duration::from_millis(min_grace_ms),
            };
            let r = instance::reload(&inst, &file, &opts)?;
            for w in &r.warnings {
                eprintln!("{w}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let t = &r.times;
                println!(
                    "reloaded {}: generation {} -> {} ({} rules, {} prefixes)",
                    r.iface,
                    r.previous_generation,
                    r.generation,
                    r.ruleset.rules.len(),
                    r.ruleset.prefixes
                );
                println!(
                    "  parse {}us  compile {}us  install {}us  prove {}us ({} self-tests)  flip {}us  grace {}us ({:?})  clear {}us  total {}us",
                    t.parse_us,
                    t.compile_us,
                    t.install_arrays_us + t.install_tries_us,
                    t.prove_us,
                    t.self_tests,
                    t.flip_us,
                    t.grace_us,
                    r.grace_method,
                    t.clear_us,
                    t.total_us
                );
            }
        }
        Command::Stats { iface, json } => {
            let inst = Instance::find(iface.as_deref())?;
            let s = instance::stats(&inst)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", s.render());
            }
        }
        Command::Run(args) => xdpfw::daemon::main(args)?,
        Command::List => {
            for name in instance::list()? {
                println!("{name}");
            }
        }
        Command::Check { file, strict } => {
            let rs = rules::load(&file)?;
            let image = compile(&rs)?;
            for w in &rs.warnings {
                eprintln!("{w}");
            }
            let failures = xdpfw::testrun::self_test_failures(&rs, None)?;
            if !failures.is_empty() {
                for f in &failures {
                    eprintln!("{f}");
                }
                eprintln!("{}: {} of {} self-tests failed", file.display(), failures.len(), rs.tests.len());
                return Ok(ExitCode::from(EXIT_INVALID_RULES));
            }
            println!(
                "{}: ok: {} rules, {} prefixes ({} trie entries after merging), {} bitmaps, {} tests",
                file.display(),
                rs.rules.len(),
                rs.prefix_count(),
                image.prefix_count(),
                image.bitmaps.len(),
                rs.tests.len()
            );
            if strict && !rs.warnings.is_empty() {
                return Ok(ExitCode::from(EXIT_WARNINGS));
            }
        }
        Command::Explain { file, packet, kernel, owner, json } => {
            let rs = rules::load(&file)?;
            let pkt: PacketSpec = packet.parse().context("parsing the packet")?;
            // What the kernel decides alone (escalating where a rule needs the owner), and with
            // the owner given, what the escalation service then decides.
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
            if json {
                let v = serde_json::json!({ "packet": pkt.to_string(), "decision": d, "in_kernel": in_kernel, "kernel": kernel_verdict });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                match (&d.rule, &d.rule_name) {
                    (Some(i), Some(name)) if d.escalated => {
                        println!("{pkt}\n  escalated by rule #{i} \"{name}\": {} (the pending action) until userspace decides", d.action)
                    }
                    (Some(i), Some(name)) => println!("{pkt}\n  {} by rule #{i} \"{name}\"", d.action),
                    _ => println!("{pkt}\n  {}", d.action),
                }
                for r in &d.reasons {
                    println!("    {r}");
                }
                if in_kernel.escalated && !d.escalated {
                    println!("  (the kernel escalates this flow and gives it {} until the owner verdict is in place)", in_kernel.action);
                } else if in_kernel.escalated {
                    println!("  (give --owner to see what the escalation service decides)");
                }
                if let Some(k) = kernel_verdict {
                    println!("  kernel (BPF_PROG_TEST_RUN): {k}");
                }
            }
            if let Some(k) = kernel_verdict
                && k != in_kernel.action
            {
                anyhow::bail!("the kernel says {k} but the reference matcher says {}", in_kernel.action);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
