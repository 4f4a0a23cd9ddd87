//! The command line as clap sees it, and its conversion into the typed configs of the library
//! crates. Every value is validated here (durations bounded, numbers in range), so nothing
//! beyond this module can be handed something that panics.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use xdpfw_daemon::{RunConfig, SourceConfig, escalation};
use xdpfw_kernel::AttachMode;
use xdpfw_rules::{duration::parse_duration, owner::OwnerSpec};

#[derive(Parser)]
#[command(name = "loader", version, about = "An XDP fast-path firewall with atomic rule reloads")]
pub(crate) struct Cli {
    /// Run in the network namespace /run/netns/NAME (as `ip -n NAME`); pins stay in the host's bpffs.
    #[arg(long, global = true, value_name = "NAME")]
    pub netns: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Mode {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode.
    Skb,
}

impl From<Mode> for AttachMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => AttachMode::Auto,
            Mode::Native => AttachMode::Native,
            Mode::Skb => AttachMode::Skb,
        }
    }
}

/// Seconds, at most 30 days.
fn bounded_secs(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|_| format!("\"{s}\" is not a number of seconds"))?;
    if n > 30 * 86400 {
        return Err(format!("{n} seconds is longer than the limit of 30 days"));
    }
    Ok(n)
}

/// A duration of at least 100 ms: an interval of zero would make a polling loop spin.
fn at_least_100ms(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err(format!("\"{s}\" is shorter than the minimum of 100ms"));
    }
    Ok(d)
}

/// Milliseconds, at most a minute.
fn bounded_ms(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|_| format!("\"{s}\" is not a number of milliseconds"))?;
    if n > 60_000 {
        return Err(format!("{n} ms is longer than the limit of 60000 ms"));
    }
    Ok(n)
}

/// A positive, finite rate.
fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e9 => Ok(v),
        _ => Err(format!("\"{s}\" is not a positive number up to 1e9")),
    }
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process; boxing would only obscure the matches")]
pub(crate) enum Command {
    /// Load the program, pin it and its maps, install the rules, attach to IFACE.
    Attach {
        /// The network interface (in the current or --netns namespace).
        iface: String,
        /// Rules file; without it every packet passes (counters only).
        #[arg(long, conflicts_with = "last_good", value_name = "FILE")]
        rules: Option<PathBuf>,
        /// Install the last ruleset that went live on IFACE (from the history in /var/lib/xdpfw).
        #[arg(long)]
        last_good: bool,
        /// How the program is attached.
        #[arg(long, value_enum, default_value = "auto")]
        mode: Mode,
    },
    /// Detach from IFACE and remove every pin.
    Detach {
        /// The network interface.
        iface: String,
    },
    /// Atomically replace the active rules with FILE.
    Reload {
        /// The rules file.
        file: PathBuf,
        /// The interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        /// Seconds to wait for a concurrent reload before giving up (at most 30 days).
        #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = bounded_secs)]
        lock_wait: u64,
        /// Minimum grace period in milliseconds (membarrier's proof is used in any case).
        #[arg(long, default_value = "0", value_name = "MS", value_parser = bounded_ms)]
        min_grace_ms: u64,
        /// Print the reload report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The active ruleset and generation, the last reload, and with --history every attempt.
    Status {
        /// The interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        /// Also list every attach, reload and rollback attempt.
        #[arg(long)]
        history: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-apply the ruleset that was live N applied rulesets ago (default 1: the previous one),
    /// or with --to the one with that version label or hash.
    Rollback {
        /// How many applied rulesets back.
        #[arg(default_value = "1")]
        n: usize,
        /// The version label of an applied ruleset, or the start of its hash (at least 6 hex
        /// digits), as `loader status --history` shows them.
        #[arg(long, value_name = "VERSION|HASH", conflicts_with = "n")]
        to: Option<String>,
        /// The interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        /// Print the reload report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Counters, the active generation and the ruleset.
    Stats {
        /// The interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The interfaces with an attached firewall: mode in effect, generation, live ruleset.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the pins and state of instances whose network namespace is gone (their program
    /// and maps stay in kernel memory until then). Their history is kept.
    Prune {
        /// Only say what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Keep IFACE's rules in line with a watched file or an HTTP(S) URL, with Prometheus metrics
    /// (a daemon for systemd: SIGHUP re-reads, SIGTERM stops and leaves the firewall attached).
    Run(RunArgs),
    /// Validate a rules file without touching the kernel.
    Check {
        /// The rules file.
        file: PathBuf,
        /// Exit with 4 when there are warnings.
        #[arg(long)]
        strict: bool,
        /// Print the summary, warnings and self-test failures as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Which rule decides PACKET, and why, e.g. "tcp 198.51.100.7:5555 -> 203.0.113.1:22 flags S",
    /// against a rules file (`explain FILE PACKET`) or the live ruleset (`explain --iface IFACE PACKET`).
    Explain {
        /// The rules file, then the packet; with --iface only the packet.
        /// The packet: "PROTO SRC[:PORT] -> DST[:PORT] [flags F] [type T code C] [fragment]
        /// [state new|established|related]".
        #[arg(num_args = 1..=2, required = true, value_names = ["FILE", "PACKET"])]
        args: Vec<String>,
        /// The packet's connection state (as `state S` in the packet): established (a reply of
        /// a flow this host opened), related (an ICMP error about one) or new.
        #[arg(long, value_name = "STATE", value_parser = ["new", "established", "related"])]
        state: Option<String>,
        /// Explain against the ruleset live on IFACE (as `loader show` prints it) instead of a file.
        #[arg(long, value_name = "IFACE")]
        iface: Option<String>,
        /// Also run the packet through the real program (BPF_PROG_TEST_RUN); the two must agree.
        #[arg(long)]
        kernel: bool,
        /// The owner of the local socket, for rules with owner conditions:
        /// "process=nginx uid=33 user=www-data exe=/usr/sbin/nginx unit=nginx.service", or "none".
        #[arg(long, value_name = "SPEC")]
        owner: Option<OwnerSpec>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The live ruleset exactly as it went live (its snapshot in the history), with set sizes.
    Show {
        /// The interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        /// Also print the contents of the set files.
        #[arg(long)]
        sets: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A live view of the traffic on IFACE: packets/s, bits/s and drops/s per rule (the change of
    /// its counters between refreshes, busiest first), the totals, the generation and ruleset.
    Top(TopArgs),
    /// Decisions of real packets on IFACE as they happen (addresses, ports, the deciding rule,
    /// the verdict), sampled and rate-limited in the kernel. FILTER: `host ADDR[/LEN]`, `port N`,
    /// `proto tcp|udp|icmp|icmpv6|N`, `rule NAME`, `verdict pass|drop` (`tcp`, `drop`, … alone
    /// too), all ANDed. Tracing stops when this command does (even killed: within 3 s).
    Trace(TraceArgs),
    /// What reloading FILE would change: rules added, removed, changed and moved, set sizes.
    Diff {
        /// The rules file a reload would apply.
        file: PathBuf,
        /// The interface (needed when several are attached).
        #[arg(long)]
        iface: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a set of the live ruleset by one batch, atomically (a packet sees the whole batch
    /// or none of it), counters kept: `set add IFACE SET CIDR...`, `set del ...`, `set replace
    /// ... --file F`, `set reset IFACE SET|--all`. Changes are kept in the instance's set
    /// journal and applied on top of every ruleset it loads (reloads, rollbacks, restarts) until
    /// deleted or reset; IPv4 batches go live in milliseconds (only the changed entries written).
    #[command(subcommand)]
    Set(SetCommand),
    /// Write the man pages (loader.1 and loader-COMMAND.1) into DIR; used by `./run install`.
    #[command(hide = true)]
    Man {
        /// The folder to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print the completion script for SHELL; used by `./run install`.
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// A fleet following one signed ruleset through NATS JetStream: keys, publish, status,
    /// promote, rollback.
    #[command(subcommand)]
    Fleet(crate::fleet::FleetCommand),
}

#[derive(Subcommand)]
pub(crate) enum SetCommand {
    /// Add prefixes to the set (those already in it are counted, not added twice).
    Add(SetArgs),
    /// Remove prefixes from the set (those not in it are counted).
    Del(SetArgs),
    /// Make the set hold exactly these prefixes.
    Replace(SetArgs),
    /// Drop the changes `set` made to SET (to every set with --all): the set is its rules
    /// file's again.
    Reset(ResetArgs),
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct ResetArgs {
    /// The interface whose live ruleset is changed.
    pub iface: String,
    /// The set, as the rules file names it.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub set: Option<String>,
    /// Every set's changes.
    #[arg(long)]
    pub all: bool,
    /// Seconds to wait for a concurrent reload before giving up (at most 30 days).
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = bounded_secs)]
    pub lock_wait: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct SetArgs {
    /// The interface whose live ruleset is changed.
    pub iface: String,
    /// The set, as the rules file names it (`[sets.NAME]`).
    pub set: String,
    /// Addresses or CIDRs (host bits zero).
    #[arg(value_name = "CIDR")]
    pub prefixes: Vec<String>,
    /// Also read prefixes from FILE, one a line ('#' comments), or from stdin with "-".
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Seconds to wait for a concurrent reload before giving up (at most 30 days).
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = bounded_secs)]
    pub lock_wait: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `explain` explains against.
pub(crate) enum ExplainTarget {
    File(PathBuf),
    Live(Option<String>),
}

/// `explain`'s positionals: FILE PACKET, or PACKET alone with --iface.
pub(crate) fn explain_target(args: Vec<String>, iface: Option<String>) -> Result<(ExplainTarget, String), String> {
    let mut args = args.into_iter();
    match (args.next(), args.next(), iface) {
        (Some(file), Some(packet), None) => Ok((ExplainTarget::File(file.into()), packet)),
        (Some(packet), None, Some(iface)) => Ok((ExplainTarget::Live(Some(iface)), packet)),
        (Some(_), None, None) => Err("explain needs a rules file and a packet, or --iface IFACE and a packet".into()),
        (Some(_), Some(_), Some(_)) => Err("with --iface, explain takes the packet only (the rules are the live ones)".into()),
        (None, _, _) => Err("explain needs a packet".into()),
    }
}

/// At least 100 ms (rates over shorter intervals are noise), at most a day.
fn refresh_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) || d > Duration::from_secs(86400) {
        return Err(format!("{s}: the interval must be between 100ms and 24h"));
    }
    Ok(d)
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct TopArgs {
    /// The interface (needed when several are attached); the same as --iface.
    #[arg(value_name = "IFACE", conflicts_with = "iface")]
    pub iface_arg: Option<String>,
    /// The interface (needed when several are attached).
    #[arg(long)]
    pub iface: Option<String>,
    /// Time between refreshes; rates are over this interval (durations: 500ms, 2s; at least 100ms).
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = refresh_interval)]
    pub interval: Duration,
    /// Stop after N refreshes (by default: until interrupted).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Print each refresh below the previous one, without clearing the screen (what `top` does
    /// anyway when its output is not a terminal).
    #[arg(long)]
    pub plain: bool,
    /// One JSON document per refresh, one per line (JSON Lines).
    #[arg(long, conflicts_with = "plain")]
    pub json: bool,
}

impl TopArgs {
    pub(crate) fn iface(&self) -> Option<&str> {
        self.iface_arg.as_deref().or(self.iface.as_deref())
    }
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct TraceArgs {
    /// The interface to trace.
    pub iface: String,
    /// Conditions a decision must meet, e.g. `host 192.0.2.0/24 port 53 drop`.
    #[arg(value_name = "FILTER", trailing_var_arg = true, allow_hyphen_values = false)]
    pub filter: Vec<String>,
    /// Stop after N decisions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop after this long (durations: 10s, 5m; at most 30 days).
    #[arg(long, value_name = "DURATION", value_parser = trace_duration)]
    pub duration: Option<Duration>,
    /// At most N decisions a second, counted in the kernel (1 to 100000).
    #[arg(long, default_value = "100", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// Bursts of up to N decisions above the rate (default: the rate).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub burst: Option<u32>,
    /// Sample one decision in N, at random, before the rate (1: every one).
    #[arg(long, default_value = "1", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub sample: u32,
    /// One JSON document per decision, one per line (JSON Lines).
    #[arg(long)]
    pub json: bool,
}

/// A trace's length: positive, at most 30 days.
fn trace_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(30 * 86400) {
        return Err(format!("{s}: the duration must be more than zero and at most 30 days"));
    }
    Ok(d)
}

/// The command line's definition, for the man pages and completions generated from it.
pub(crate) fn definition() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(clap::Args, Clone, Debug)]
pub(crate) struct RunArgs {
    /// The interface: attached if it is not yet, else the existing attachment is adopted.
    pub iface: String,
    /// A rules file to watch (reloaded when it or a set file it names changes, and on SIGHUP).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["url", "nats"], conflicts_with_all = ["url", "nats"])]
    pub rules: Option<PathBuf>,
    /// An http:// or https:// URL to poll (ETag / If-None-Match); the ruleset must be
    /// self-contained (inline set prefixes), since set files could not be fetched beside it.
    #[arg(long, value_name = "URL", conflicts_with = "nats")]
    pub url: Option<String>,
    #[command(flatten)]
    pub nats: crate::fleet::RunNats,
    /// How the program is attached.
    #[arg(long, value_enum, default_value = "auto")]
    pub mode: Mode,
    /// When the daemon attaches: drop everything (but replies from the rules server) until the
    /// first valid ruleset is live. Without it the interface passes everything until then.
    #[arg(long)]
    pub fail_closed: bool,
    /// Shortest time between two reloads; changes in between are coalesced into one.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_duration)]
    pub min_interval: Duration,
    /// How often the URL is polled; for a file, a check that catches missed notifications
    /// (at least 100ms).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = at_least_100ms)]
    pub poll_interval: Duration,
    /// First backoff after a failed fetch; it doubles per failure up to --backoff-max.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = at_least_100ms)]
    pub backoff_initial: Duration,
    /// The longest backoff (durations: 500ms, 1.5s, 2m, 1h; at most 30 days).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = at_least_100ms)]
    pub backoff_max: Duration,
    /// Timeout of one HTTP request.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = at_least_100ms)]
    pub fetch_timeout: Duration,
    /// Also trust the CA certificates in FILE (PEM) for an https:// URL, e.g. a private CA.
    #[arg(long, value_name = "FILE", requires = "url")]
    pub ca_cert: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (a loopback address unless
    /// --metrics-public).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<SocketAddr>,
    /// Allow --metrics on an address other hosts can reach.
    #[arg(long, requires = "metrics")]
    pub metrics_public: bool,
    /// Follow a redirect of the rules URL to another host (by default: same host and port only).
    #[arg(long, requires = "url")]
    pub allow_redirect_host: bool,
    /// Detach the firewall when the daemon stops (by default it keeps filtering).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Escalations decided per second per source address (beyond it flows stay pending).
    #[arg(long, default_value = "200", value_parser = positive)]
    pub escalation_rate: f64,
    /// Burst of escalations a source address may have decided at once.
    #[arg(long, default_value = "400", value_parser = positive)]
    pub escalation_burst: f64,
    /// Source addresses tracked by the escalation limiter at once.
    #[arg(long, default_value = "4096", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub escalation_max_sources: u32,
    /// The longest one owner lookup (the /proc walk) may take; the flow is retried after it.
    #[arg(long, default_value = "200ms", value_name = "DURATION", value_parser = parse_duration)]
    pub owner_lookup_deadline: Duration,
    /// Check the source and exit without starting (the unit's ExecStartPre=): a rules file as
    /// `loader check` does (exit 3 when invalid); a URL or NATS source has nothing to check
    /// before it is fetched (every fetched ruleset is checked before it goes live).
    #[arg(long)]
    pub check: bool,
}

impl RunArgs {
    /// The daemon's config. clap guarantees one of --rules and --url.
    pub(crate) fn into_config(self) -> RunConfig {
        let source = match (self.rules, self.url) {
            (Some(path), _) => SourceConfig::File(path),
            (None, Some(url)) => SourceConfig::Url(url),
            (None, None) => self.nats.into_source().expect("clap requires --rules, --url or --nats"),
        };
        RunConfig {
            iface: self.iface,
            source,
            mode: self.mode.into(),
            fail_closed: self.fail_closed,
            min_interval: self.min_interval,
            poll_interval: self.poll_interval,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            fetch_timeout: self.fetch_timeout,
            ca_cert: self.ca_cert,
            metrics: self.metrics,
            metrics_public: self.metrics_public,
            allow_redirect_host: self.allow_redirect_host,
            detach_on_exit: self.detach_on_exit,
            escalation: escalation::Config {
                lookup_deadline: self.owner_lookup_deadline,
                per_source_rate: self.escalation_rate,
                per_source_burst: self.escalation_burst,
                max_sources: self.escalation_max_sources as usize,
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if a.get_help().is_none() && !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version") {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::definition(), "loader", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
