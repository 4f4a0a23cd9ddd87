//! `loader run`: a long-running daemon that keeps an attached firewall in line with a rules
//! source (a watched file or an HTTP(S) URL) and serves Prometheus metrics.
//!
//! The daemon is a set of tokio tasks ([`Services`]) sharing one [`Context`]: the instance, a
//! shutdown signal, a SIGHUP counter and the metrics [`Registry`]. Every reload goes through
//! [`control::reload`], whose lock also serializes it with a `loader reload` from the command
//! line, so the CLI keeps working beside the daemon. Adding a service is a few lines in `run`:
//! `services.spawn("name", my_service(ctx.clone()))` (or [`Services::spawn_blocking`] for a
//! blocking loop with a stop flag), and `ctx.metrics.register(..)` for its counters.

pub mod escalation;
pub mod log;
pub mod metrics;
mod notify;
mod source_file;
mod source_http;
mod source_nats;

pub use source_nats::NatsConfig;
pub use xdpfw_fleet::bus::BusConfig;

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use tokio::{sync::watch, task::JoinSet};
use xdpfw_control::{self as control, ControlError, Instance, ReloadOptions, ReloadReport, instance};
use xdpfw_kernel::AttachMode;
use xdpfw_rules::{self as rules, short_hash};

pub use metrics::{MetricsSource, Registry};

/// What `loader run` was asked to do, validated by the command line.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The interface: attached if it is not yet, else the existing attachment is adopted.
    pub iface: String,
    pub source: SourceConfig,
    pub mode: AttachMode,
    /// When the daemon attaches: drop everything (but replies from the rules server) until the
    /// first valid ruleset is live. Without it the interface passes everything until then.
    pub fail_closed: bool,
    /// Shortest time between two reloads; changes in between are coalesced into one.
    pub min_interval: Duration,
    /// How often the URL is polled; for a file, a check that catches missed notifications.
    pub poll_interval: Duration,
    /// First backoff after a failed fetch; it doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Timeout of one HTTP request.
    pub fetch_timeout: Duration,
    /// Extra CA certificates (PEM) trusted for an https:// URL.
    pub ca_cert: Option<PathBuf>,
    /// Where to serve Prometheus metrics: a loopback address unless `metrics_public`.
    pub metrics: Option<SocketAddr>,
    /// Allow `metrics` on an address other hosts can reach (the metrics name rules, counts and
    /// the rules server).
    pub metrics_public: bool,
    /// Follow an HTTP redirect of the rules URL to another host (by default only redirects to
    /// the same host and port are followed).
    pub allow_redirect_host: bool,
    /// Detach the firewall when the daemon stops (by default it keeps filtering).
    pub detach_on_exit: bool,
    pub escalation: escalation::Config,
}

/// Where the daemon's rules come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A watched rules file (reloaded when it or a set file it names changes, and on SIGHUP).
    File(PathBuf),
    /// An http:// or https:// URL polled with ETag / If-None-Match; the ruleset must be
    /// self-contained (inline set prefixes).
    Url(String),
    /// A key in a NATS JetStream key-value bucket (fleet distribution, signed rulesets).
    Nats(Box<NatsConfig>),
}

impl RunConfig {
    fn rules_file(&self) -> Option<&Path> {
        match &self.source {
            SourceConfig::File(p) => Some(p),
            SourceConfig::Url(_) | SourceConfig::Nats(_) => None,
        }
    }

    fn url(&self) -> Option<&str> {
        match &self.source {
            SourceConfig::Url(u) => Some(u),
            SourceConfig::File(_) | SourceConfig::Nats(_) => None,
        }
    }
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Starting failed on the instance (attach, lock, bad interface, …).
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A service failed, or the runtime could not start.
    #[error("{0}")]
    Failed(String),
}

impl From<anyhow::Error> for DaemonError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<ControlError>() {
            Ok(c) => Self::Control(c),
            Err(e) => Self::Failed(format!("{e:#}")),
        }
    }
}

/// Set once, seen by every task; cloning is cheap.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves when the daemon is stopping.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        // An error means the sender is gone, which only happens when the daemon is ending.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

/// What every service of the daemon gets.
#[derive(Clone)]
pub struct Context {
    pub inst: Arc<Instance>,
    pub shutdown: Shutdown,
    /// Counts SIGHUPs; each task can watch it independently (`changed()`).
    pub hup: watch::Receiver<u64>,
    pub metrics: Arc<Registry>,
}

/// The daemon's long-running tasks. Each returns when the shutdown signal is set; one that
/// ends early (an error, or no reason to run on) stops the whole daemon.
#[derive(Default)]
pub struct Services {
    set: JoinSet<(&'static str, Result<()>)>,
}

impl Services {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = Result<()>> + Send + 'static) {
        self.set.spawn(async move { (name, task.await) });
    }

    /// Runs a blocking service on its own thread. It gets a flag that is set at shutdown, and
    /// must return soon after (the shape of a poll loop: `while !stop.load(..) { .. }`).
    pub fn spawn_blocking(&mut self, name: &'static str, shutdown: Shutdown, task: impl FnOnce(&AtomicBool) -> Result<()> + Send + 'static) {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = tokio::task::spawn_blocking(move || task(&flag));
        self.spawn(name, async move {
            tokio::pin!(thread);
            tokio::select! {
                done = &mut thread => return done?,
                _ = shutdown.wait() => {}
            }
            stop.store(true, Ordering::Relaxed);
            thread.await?
        });
    }
}

/// Counters of the daemon's reload attempts, shared by the source and the metrics endpoint.
#[derive(Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Content that matched what was already live: nothing to do.
    pub unchanged: AtomicU64,
    pub last_attempt_unix: AtomicU64,
    pub last_success_unix: AtomicU64,
    /// Whether the last attempt succeeded (true before any).
    pub last_ok: AtomicBool,
    /// The built-in default-drop ruleset is live (fail-closed, no valid ruleset yet).
    pub fail_closed: AtomicBool,
    /// Times the guard found the instance no longer filtering and attached it again.
    pub repairs: AtomicU64,
    pub last_report: std::sync::Mutex<Option<ReloadReport>>,
}

fn unix_now_f64() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl ReloadStats {
    fn new() -> Self {
        // Nothing has failed before the first attempt.
        Self { last_ok: AtomicBool::new(true), ..Default::default() }
    }

    fn record(&self, result: &Result<ReloadReport, ControlError>) {
        let now = unix_now_f64().to_bits();
        self.last_attempt_unix.store(now, Ordering::Relaxed);
        match result {
            Ok(report) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.last_success_unix.store(now, Ordering::Relaxed);
                self.last_ok.store(true, Ordering::Relaxed);
                self.fail_closed.store(false, Ordering::Relaxed);
                *self.last_report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.last_ok.store(false, Ordering::Relaxed);
            }
        }
    }
}

/// What an attempt to apply a rules file did.
pub enum Outcome {
    Applied(Box<ReloadReport>),
    /// The file's ruleset is the one already live.
    Unchanged,
    /// Rejected (invalid, a failed self-test, or a kernel error); the live ruleset keeps serving.
    Failed(String),
    /// The daemon is stopping; the file was not applied.
    Stopped,
}

/// Applies rules files through the reload pipeline, no more often than `min_interval`.
pub struct Applier {
    inst: Arc<Instance>,
    /// Where the rules come from: a remote ruleset must be self-contained.
    origin: rules::Origin,
    min_interval: Duration,
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
    pub stats: Arc<ReloadStats>,
}

impl Applier {
    /// Applies `path` unless its content is what is live. Returns the outcome and, when the
    /// file parsed, the set files it names (so a watcher can follow them too).
    pub async fn apply(&self, path: &Path, shutdown: &Shutdown) -> (Outcome, Option<Vec<PathBuf>>) {
        self.apply_since(path, shutdown, Instant::now()).await
    }

    /// [`Self::apply`] of a change noticed at `trigger` (a SIGHUP, the end of a burst of file
    /// events): the log line of an applied ruleset says how long after it the flip came.
    pub async fn apply_since(&self, path: &Path, shutdown: &Shutdown, trigger: Instant) -> (Outcome, Option<Vec<PathBuf>>) {
        let (inst, p, origin) = (self.inst.clone(), path.to_path_buf(), self.origin);
        let pre = tokio::task::spawn_blocking(move || {
            let parsed = rules::load_from(&p, origin);
            let live = inst.state().map(|s| s.ruleset.hash).ok();
            (parsed.map(|rs| (rs.hash, rs.set_files.into_iter().map(|(_, f)| f).collect::<Vec<_>>())), live)
        })
        .await;
        let (parsed, live) = match pre {
            Ok(v) => v,
            Err(e) => return (Outcome::Failed(format!("internal error: {e}")), None),
        };
        let set_files = parsed.as_ref().ok().map(|(_, f)| f.clone());
        if let (Ok((hash, _)), Some(live)) = (&parsed, &live)
            && hash == live
        {
            self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{}: same content as the live ruleset, nothing to do", path.display());
            return (Outcome::Unchanged, set_files);
        }

        // Spacing: changes that arrive within min_interval of the last attempt wait, and the
        // pipeline then reads the file as it is by then, so a burst becomes one reload.
        let mut last = self.last_attempt.lock().await;
        if let Some(t) = *last {
            // An interval beyond what Instant can hold means no second reload at all.
            let due = t.checked_add(self.min_interval);
            if due.is_none_or(|due| due > Instant::now()) {
                let due = due.map_or_else(|| tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86400), tokio::time::Instant::from_std);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = shutdown.wait() => return (Outcome::Stopped, set_files),
                }
            }
        }
        *last = Some(Instant::now());
        let (inst, p, origin) = (self.inst.clone(), path.to_path_buf(), self.origin);
        let result = tokio::task::spawn_blocking(move || {
            let started = trigger.elapsed();
            let r = match origin {
                rules::Origin::Local => control::reload(&inst, &p, &ReloadOptions::default()),
                rules::Origin::Remote => control::reload_remote(&inst, &p, &ReloadOptions::default()),
            };
            (r, started)
        })
            .await
            .unwrap_or_else(|e| (Err(ControlError::Refused(format!("reload task failed: {e}"))), Duration::ZERO));
        let (result, before_pipeline) = result;
        drop(last);
        // A ruleset that went live is applied, even if recording it failed (said loudly).
        let result = match result {
            Err(ControlError::LiveButUnrecorded { report, source }) => {
                tracing::error!("{} went live as generation {}, but recording it failed: {source}", path.display(), report.generation);
                Ok(*report)
            }
            other => other,
        };
        self.stats.record(&result);
        match result {
            Ok(r) => {
                notify::status(&self.inst, None);
                tracing::info!(
                    "applied {} ({}, {}): generation {} -> {} in {} us; flip {} us after the trigger ({} us in the pipeline; tables reused: {}; large set files read {}, parsed {}, unread {})",
                    path.display(),
                    r.ruleset.version.as_deref().unwrap_or("no version"),
                    short_hash(&r.ruleset.hash),
                    r.previous_generation,
                    r.generation,
                    r.times.total_us,
                    before_pipeline.as_micros() as u64 + r.times.to_flip_us,
                    r.times.to_flip_us,
                    r.times.tables_reused,
                    r.times.set_files_read,
                    r.times.set_files_parsed,
                    r.times.set_files_unread
                );
                for w in &r.warnings {
                    tracing::warn!("{w}");
                }
                (Outcome::Applied(Box::new(r)), set_files)
            }
            Err(e) => {
                // Capped: a hostile rules server must not fill the log.
                let msg = rules::cap_text(e.to_string(), MAX_LOG_ERROR);
                tracing::error!("rejected {}; the live ruleset keeps serving: {msg}", path.display());
                notify::status(&self.inst, Some(&msg));
                (Outcome::Failed(msg), set_files)
            }
        }
    }
}

/// The longest error text the daemon logs for one rejected ruleset.
const MAX_LOG_ERROR: usize = 4096;

/// The ruleset installed with --fail-closed until the first valid one: default drop, but
/// replies from the rules server pass, or the daemon could never fetch its way out of it.
const FAIL_CLOSED_VERSION: &str = "fail-closed";

fn fail_closed_ruleset(server: &[SocketAddr]) -> String {
    let mut s = format!("version = \"{FAIL_CLOSED_VERSION}\"\ndefault = \"drop\"\n");
    for (i, a) in server.iter().enumerate() {
        s.push_str(&format!(
            "\n[[rule]]\nname = \"rules-server-{i}\"\naction = \"pass\"\nproto = \"tcp\"\nsrc = [\"{}\"]\nsport = {}\n",
            a.ip(),
            a.port()
        ));
    }
    s
}

/// Attaches to the interface unless a firewall is attached already (then it is adopted as is).
/// With a rules file that is valid, attaches with it directly, so no placeholder ever serves.
/// Returns whether the rules file was tried (applied or rejected), so the source need not try
/// the same content again.
fn attach_or_adopt(cfg: &RunConfig, inst: &Instance, stats: &ReloadStats, server: &[SocketAddr]) -> Result<bool, ControlError> {
    if inst.is_attached() {
        // Only what `loader attach` made: a pin folder another user could have planted or
        // filled is refused, not served from.
        control::validate_pins(inst)?;
        tracing::info!("adopting the firewall already attached to {}", inst.iface);
        // A daemon restarted before its first valid ruleset finds its own placeholder.
        if inst.state().is_ok_and(|s| s.ruleset.version.as_deref() == Some(FAIL_CLOSED_VERSION)) {
            stats.fail_closed.store(true, Ordering::Relaxed);
        }
        return Ok(false);
    }
    let mut tried = false;
    if let Some(path) = cfg.rules_file() {
        match control::attach(&inst.iface, Some(path), cfg.mode) {
            Ok(r) => {
                tracing::info!("attached to {} with {} (generation {})", inst.iface, path.display(), r.generation);
                return Ok(true);
            }
            // Whatever makes the ruleset unusable (syntax, limits, self-tests), the daemon stays
            // up: fail-closed or pass-all below, and the source retries when the file changes.
            Err(e) if e.is_invalid_ruleset() => {
                tracing::error!("{} is not a valid ruleset: {e}", path.display());
                stats.record(&Err(e));
                tried = true;
            }
            Err(e) => return Err(e),
        }
    }
    if cfg.fail_closed {
        // Built in memory: no file a local user could plant, read or swap.
        let text = fail_closed_ruleset(server);
        let ruleset = rules::parse(Path::new("<built-in: fail-closed>"), &text)?;
        control::attach_ruleset(&inst.iface, &ruleset, false, cfg.mode)?;
        stats.fail_closed.store(true, Ordering::Relaxed);
        tracing::warn!("attached to {} fail-closed: dropping everything until a valid ruleset is live", inst.iface);
    } else {
        control::attach(&inst.iface, None, cfg.mode)?;
        tracing::warn!("attached to {} passing everything until a valid ruleset is live", inst.iface);
    }
    Ok(tried)
}

/// How often the guard checks that the instance is whole and filtering.
const GUARD_INTERVAL: Duration = Duration::from_secs(1);

/// What the guard re-attaches when the instance stopped filtering: the ruleset that was live
/// (from its snapshot, checked against its hash), else with --fail-closed the fail-closed
/// ruleset, else the rules file if it is valid, else pass-all. Returns it, whether it came from
/// a file, and what it is (for the log).
fn last_good(cfg: &RunConfig, inst: &Instance, live: Option<&control::RulesetSummary>, server: &[SocketAddr]) -> Result<(rules::Ruleset, bool, String)> {
    if let Some(l) = live.filter(|l| l.path.is_some()) {
        let snapshot = inst.history().dir().join("snapshots").join(&l.hash).join("rules.toml");
        match control::history::load_rules(&snapshot, rules::Origin::Local) {
            Ok(rs) if rs.hash == l.hash => return Ok((rs, true, format!("its last live ruleset {}", short_hash(&l.hash)))),
            Ok(_) => tracing::warn!("{} does not hash to the live ruleset {}", snapshot.display(), short_hash(&l.hash)),
            Err(e) => tracing::warn!("the snapshot of the live ruleset {} cannot be loaded: {e}", short_hash(&l.hash)),
        }
    }
    if cfg.fail_closed || live.is_some_and(|l| l.version.as_deref() == Some(FAIL_CLOSED_VERSION)) {
        let ruleset = rules::parse(Path::new("<built-in: fail-closed>"), &fail_closed_ruleset(server))?;
        return Ok((ruleset, false, "the fail-closed ruleset".into()));
    }
    if let Some(path) = cfg.rules_file()
        && let Ok(rs) = control::history::load_rules_with(path, rules::Origin::Local, &inst.history().journal().unwrap_or_default())
    {
        return Ok((rs, true, format!("the rules file {}", path.display())));
    }
    Ok((control::empty_ruleset(), false, "pass-all (no valid ruleset is known)".into()))
}

/// The filtering invariant under a running daemon: every [`GUARD_INTERVAL`] the instance is
/// checked ([`Instance::is_filtering`]); when it stopped filtering (a `loader detach`, pins
/// removed, bpffs unmounted, the link detached), what was live is attached again, logged and
/// counted (`xdpfw_repairs_total`). A repair that fails is retried at the next check.
fn guard(cfg: &RunConfig, inst: &Instance, stats: &ReloadStats, server: &[SocketAddr], stop: &AtomicBool) -> Result<()> {
    let mut live = inst.state().ok().map(|s| s.ruleset);
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let next = Instant::now() + GUARD_INTERVAL;
        while !stop.load(Ordering::Relaxed) && Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if inst.is_filtering() {
            if let Ok(st) = inst.state() {
                live = Some(st.ruleset);
            }
            failing = false;
            continue;
        }
        let repaired = last_good(cfg, inst, live.as_ref(), server).and_then(|(ruleset, from_file, what)| {
            Ok(control::repair(inst, &ruleset, from_file, cfg.mode)?.map(|r| (r, ruleset, what)))
        });
        match repaired {
            Ok(Some((report, ruleset, what))) => {
                stats.repairs.fetch_add(1, Ordering::Relaxed);
                let fail_closed = report.ruleset.path.is_none() && ruleset.version.as_deref() == Some(FAIL_CLOSED_VERSION);
                stats.fail_closed.store(fail_closed, Ordering::Relaxed);
                tracing::error!(
                    "the firewall on {} had stopped filtering (detached, its pins removed or bpffs unmounted): attached again with {what} (generation {})",
                    inst.iface,
                    report.generation
                );
                live = Some(report.ruleset);
                failing = false;
            }
            Ok(None) => {}
            Err(e) => {
                if !failing {
                    tracing::error!("the firewall on {} has stopped filtering and could not be attached again (retrying every {GUARD_INTERVAL:?}): {e:#}", inst.iface);
                }
                failing = true;
            }
        }
    }
    Ok(())
}

/// Holds `<runtime>/<key>.daemon.lock` for the daemon's lifetime: two daemons feeding one
/// interface from different sources would undo each other's reloads.
fn daemon_lock(inst: &Instance) -> Result<std::fs::File, ControlError> {
    control::files::private_dir(&instance::state_root())?;
    control::files::lock_file(&inst.daemon_lock_path(), Duration::ZERO, &format!("another `loader run` is already managing {} in this network namespace", inst.iface))
}

/// `loader run`. Call it after entering the network namespace: the runtime's threads inherit it.
pub fn main(cfg: RunConfig) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .map_err(|e| DaemonError::Failed(format!("starting the runtime: {e}")))?;
    rt.block_on(run(cfg)).map_err(DaemonError::from)
}

async fn run(args: RunConfig) -> Result<()> {
    // First of all: from here on SIGTERM and SIGHUP (whose default is to kill) are ours, so a
    // signal during the attach cannot cut it short.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int, mut hup) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?);
    let inst = Arc::new(Instance::new(&args.iface)?);
    let _lock = daemon_lock(&inst)?;
    let stats = Arc::new(ReloadStats::new());
    // Bound before the attach, so a taken port fails the start without touching the interface.
    if let Some(addr) = args.metrics
        && !addr.ip().is_loopback()
        && !args.metrics_public
    {
        anyhow::bail!(
            "refusing to serve metrics on {addr}, which other hosts can reach (they name the rules, their counts and the rules server): use a loopback address such as 127.0.0.1:{}, or pass --metrics-public",
            addr.port()
        );
    }
    let metrics_listener = match args.metrics {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics endpoint to {addr}"))?),
        None => None,
    };

    let server = match (&args.source, args.url()) {
        (_, Some(url)) => source_http::server_addrs(url).await?,
        (SourceConfig::Nats(n), _) => source_nats::server_addrs(&n.bus).await,
        _ => Vec::new(),
    };
    // Taken before the attach reads the file, so a change during the attach is not missed.
    let print = args.rules_file().map(source_file::fingerprint_rules);
    let tried = {
        let (a, i, s, srv) = (args.clone(), inst.clone(), stats.clone(), server.clone());
        tokio::task::spawn_blocking(move || attach_or_adopt(&a, &i, &s, &srv)).await??
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let (hup_tx, hup_rx) = watch::channel(0u64);
    let registry = Arc::new(Registry::default());
    registry.register(Arc::new(metrics::BuildInfo));
    registry.register(Arc::new(metrics::ReloadMetrics(stats.clone())));
    registry.register(Arc::new(metrics::KernelMetrics(inst.clone())));
    let ctx = Context { inst: inst.clone(), shutdown: Shutdown(stop_rx), hup: hup_rx, metrics: registry.clone() };
    let applier = Arc::new(Applier {
        inst: inst.clone(),
        origin: if args.url().is_some() { rules::Origin::Remote } else { rules::Origin::Local },
        min_interval: args.min_interval,
        last_attempt: tokio::sync::Mutex::new(None),
        stats: stats.clone(),
    });

    let mut services = Services::default();
    match &args.source {
        SourceConfig::File(path) => {
            let seen = print.filter(|_| tried);
            services.spawn("file source", source_file::run(ctx.clone(), applier, path.clone(), args.poll_interval, seen));
        }
        SourceConfig::Url(url) => {
            let http = source_http::HttpSource::new(url, &args, &server, stats.clone())?;
            registry.register(http.metrics());
            services.spawn("http source", http.run(ctx.clone(), applier));
        }
        SourceConfig::Nats(cfg) => {
            let nats = source_nats::NatsSource::new(cfg, &inst.iface, args.poll_interval)?;
            registry.register(nats.metrics());
            services.spawn("nats source", nats.run(ctx.clone(), applier));
        }
    }
    // Escalations: flows whose first matching rule needs the owner of the local socket.
    // Served whatever the ruleset, so a reload that adds owner rules needs no restart.
    let shared = Arc::new(escalation::Shared::default());
    registry.register(Arc::new(escalation::Metrics(shared.clone())));
    let config = args.escalation.clone();
    let esc_inst = inst.clone();
    services.spawn_blocking("escalation", ctx.shutdown.clone(), move |stop| escalation::serve(&esc_inst, &config, stop, &shared));
    // Packets of rules with `log`, to the daemon's log (served whatever the ruleset, as above).
    let log_inst = inst.clone();
    services.spawn_blocking("log", ctx.shutdown.clone(), move |stop| log::serve(&log_inst, stop));
    // The filtering invariant: what vanishes under the daemon is attached again.
    let (guard_cfg, guard_inst, guard_stats, guard_server) = (args.clone(), inst.clone(), stats.clone(), server.clone());
    services.spawn_blocking("guard", ctx.shutdown.clone(), move |stop| guard(&guard_cfg, &guard_inst, &guard_stats, &guard_server, stop));
    // Further services go here: `services.spawn("name", service(ctx.clone()))`, or
    // `services.spawn_blocking(..)` for a blocking loop, with `registry.register(..)` for their
    // metrics. Each returns Ok(()) once the shutdown fires.
    if let Some(listener) = metrics_listener {
        tracing::info!("metrics at http://{}/metrics", listener.local_addr()?);
        services.spawn("metrics", metrics::serve(listener, registry.clone(), ctx.shutdown.clone()));
    }

    // systemd's watchdog (WatchdogSec=): pinged from this runtime at half the interval.
    if let Some(every) = notify::watchdog_interval() {
        tracing::info!("systemd watchdog: WATCHDOG=1 every {:?}", every / 2);
        services.spawn("watchdog", notify::watchdog(every, ctx.shutdown.clone()));
    }

    notify::notify("READY=1");
    notify::status(&inst, (!stats.last_ok.load(Ordering::Relaxed)).then_some("see the log"));
    let mut failure = None;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: re-reading the rules source");
                hup_tx.send_modify(|n| *n += 1);
            }
            Some(done) = services.set.join_next() => {
                let (name, result) = done.unwrap_or(("a service", Err(anyhow::anyhow!("panicked"))));
                failure = Some(result.err().unwrap_or_else(|| anyhow::anyhow!("stopped unexpectedly")).context(name));
                break;
            }
        }
    }
    notify::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    let drain = async {
        while let Some(done) = services.set.join_next().await {
            match done {
                Ok((name, Ok(()))) => tracing::debug!("{name} stopped"),
                Ok((name, Err(e))) => tracing::warn!("{name} stopped with an error: {e:#}"),
                Err(e) => tracing::warn!("a service panicked: {e}"),
            }
        }
    };
    // Bounded: a scraper holding a keep-alive connection must not hold up the exit.
    if tokio::time::timeout(Duration::from_secs(5), drain).await.is_err() {
        tracing::warn!("services did not stop within 5 s; leaving them");
    }
    if args.detach_on_exit {
        let iface = inst.iface.clone();
        tokio::task::spawn_blocking(move || control::detach(&iface)).await??;
        tracing::info!("detached from {}", inst.iface);
    } else {
        tracing::info!("the firewall stays attached to {} (generation keeps serving)", inst.iface);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_services_stop_with_the_daemon() {
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(1).build().unwrap();
        rt.block_on(async {
            let (tx, rx) = watch::channel(false);
            let mut services = Services::default();
            let rounds = Arc::new(AtomicU64::new(0));
            let r = rounds.clone();
            services.spawn_blocking("poll loop", Shutdown(rx.clone()), move |stop| {
                while !stop.load(Ordering::Relaxed) {
                    r.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            });
            services.spawn_blocking("fails", Shutdown(rx), |_| anyhow::bail!("no kernel support"));
            let (name, first) = services.set.join_next().await.unwrap().unwrap();
            assert_eq!((name, first.unwrap_err().to_string()), ("fails", "no kernel support".to_string()), "an early failure is seen at once");
            tx.send(true).unwrap();
            let (name, second) = tokio::time::timeout(Duration::from_secs(5), services.set.join_next()).await.unwrap().unwrap().unwrap();
            assert_eq!(name, "poll loop");
            second.unwrap();
            assert!(rounds.load(Ordering::Relaxed) > 0);
        });
    }

    #[test]
    fn fail_closed_ruleset_drops_all_but_the_rules_server() {
        let text = fail_closed_ruleset(&["192.0.2.1:8080".parse().unwrap(), "[2001:db8::1]:443".parse().unwrap()]);
        let rs = rules::parse(Path::new("fail-closed.toml"), &text).expect("parses");
        assert_eq!(rs.default.to_string(), "drop");
        assert_eq!(rs.rules.len(), 2);
        let pass = xdpfw_rules::matcher::decide(&rs, &"tcp 192.0.2.1:8080 -> 192.0.2.2:40000 flags SA".parse().unwrap());
        assert_eq!(pass.action.to_string(), "pass");
        let drop = xdpfw_rules::matcher::decide(&rs, &"udp 192.0.2.1:8080 -> 192.0.2.2:40000".parse().unwrap());
        assert_eq!(drop.action.to_string(), "drop");
    }
}
