//! The NATS source: follows a key of a JetStream key-value bucket (see `xdpfw_fleet::bus` for
//! the layout). Every trigger — a watch event, a reconnect (a full refresh: events may have
//! been missed), the periodic poll (a safety net for a silent watch), SIGHUP — leads to the
//! same check: read the latest revision of the key the node follows, and if it is new, open
//! it (signature against the trusted keys), store it privately under the instance's state
//! directory and apply it through the usual pipeline. Any failure keeps the last good ruleset.
//! A signed value must have been signed for the key it is found at, and must not be older than
//! the live one (a replay: `envelope::check_order`); what the node runs from the bus is
//! remembered in the state directory (`nats-live.json`), so a restart does not forget it.
//! The node's status (live revision, hash, generation, last result) goes to the status bucket
//! after every attempt and on every heartbeat.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt;
use xdpfw_fleet::{
    async_nats::{self, jetstream::kv},
    bus::{self, BusConfig, NodeStatus},
    ed25519_dalek::VerifyingKey,
    envelope::{self, EnvelopeError, Watermark},
};

use super::{
    Applier, Context, Outcome,
    metrics::{MetricsSource, escape_label, family},
};

/// `loader run --nats`.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    pub bus: BusConfig,
    pub bucket: String,
    pub key: String,
    /// The node's group (e.g. canary): it follows KEY.GROUP while that holds a value.
    pub group: Option<String>,
    /// Public key files; with any, unsigned or otherwise signed values are refused.
    pub trusted_keys: Vec<PathBuf>,
    /// The node's name in the status bucket (default: hostname-iface).
    pub node_id: Option<String>,
    pub status_bucket: String,
    pub heartbeat: Duration,
}

/// Bus operations are bounded, so a dead server never holds the loop (or the shutdown).
const OP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct NatsStats {
    live_revision: AtomicU64,
    connected: AtomicBool,
    reconnects: AtomicU64,
    watch_events: AtomicU64,
    polls: AtomicU64,
    refused: [AtomicU64; 6],
    status_failures: AtomicU64,
}

const REFUSALS: [&str; 6] = ["unsigned", "untrusted_key", "bad_signature", "malformed", "wrong_key", "replayed"];

struct NatsMetrics(Arc<NatsStats>, String);

impl MetricsSource for NatsMetrics {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let (s, key) = (&self.0, escape_label(&self.1));
        family(out, "xdpfw_fleet_live_revision", "gauge", "The bus revision of the live ruleset (0: none from the bus yet).");
        let _ = writeln!(out, "xdpfw_fleet_live_revision{{key=\"{key}\"}} {}", s.live_revision.load(Ordering::Relaxed));
        family(out, "xdpfw_fleet_connected", "gauge", "Whether the node is connected to a NATS server.");
        let _ = writeln!(out, "xdpfw_fleet_connected {}", u8::from(s.connected.load(Ordering::Relaxed)));
        family(out, "xdpfw_fleet_reconnects_total", "counter", "Connections to NATS after the first (each followed by a full refresh).");
        let _ = writeln!(out, "xdpfw_fleet_reconnects_total {}", s.reconnects.load(Ordering::Relaxed));
        family(out, "xdpfw_fleet_watch_events_total", "counter", "Changes seen through the watch.");
        let _ = writeln!(out, "xdpfw_fleet_watch_events_total {}", s.watch_events.load(Ordering::Relaxed));
        family(out, "xdpfw_fleet_polls_total", "counter", "Periodic checks of the latest revision (the safety net).");
        let _ = writeln!(out, "xdpfw_fleet_polls_total {}", s.polls.load(Ordering::Relaxed));
        family(out, "xdpfw_fleet_refused_total", "counter", "Values refused before the pipeline, by reason (signature, key and replay checks).");
        for (reason, n) in REFUSALS.iter().zip(&s.refused) {
            let _ = writeln!(out, "xdpfw_fleet_refused_total{{reason=\"{reason}\"}} {}", n.load(Ordering::Relaxed));
        }
        family(out, "xdpfw_fleet_status_write_failures_total", "counter", "Status records that could not be written to the bus.");
        let _ = writeln!(out, "xdpfw_fleet_status_write_failures_total {}", s.status_failures.load(Ordering::Relaxed));
    }
}

pub(crate) struct NatsSource {
    cfg: NatsConfig,
    poll: Duration,
    trusted: Vec<VerifyingKey>,
    node: String,
    stats: Arc<NatsStats>,
}

fn default_node_id(iface: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = format!("{}-{iface}", host.trim()).chars().map(|c| if c.is_ascii_alphanumeric() || "-_".contains(c) { c } else { '_' }).collect();
    id.trim_start_matches(['-', '_']).to_string()
}

async fn bounded<T, E: Into<anyhow::Error>>(what: &str, f: impl std::future::Future<Output = Result<T, E>>) -> Result<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(r) => r.map_err(Into::into).with_context(|| what.to_string()),
        Err(_) => anyhow::bail!("{what}: timed out after {OP_TIMEOUT:?}"),
    }
}

/// Where a value was last handled: (key, revision).
type Seen = Option<(String, u64)>;

impl NatsSource {
    pub(crate) fn new(cfg: &NatsConfig, iface: &str, poll: Duration) -> Result<Self> {
        let trusted = cfg.trusted_keys.iter().map(|p| envelope::load_trusted_key(p)).collect::<Result<Vec<_>>>()?;
        let node = cfg.node_id.clone().unwrap_or_else(|| default_node_id(iface));
        for (what, k) in [("node id", node.as_str()), ("key", cfg.key.as_str())] {
            anyhow::ensure!(bus::valid_key(k), "invalid {what} \"{k}\" (letters, digits, - _ / = and inner dots)");
        }
        if let Some(g) = &cfg.group {
            anyhow::ensure!(bus::valid_key(g) && !g.contains('.'), "invalid group \"{g}\" (letters, digits, - _ /)");
        }
        Ok(Self { cfg: cfg.clone(), poll, trusted, node, stats: Arc::default() })
    }

    pub(crate) fn metrics(&self) -> Arc<dyn MetricsSource> {
        Arc::new(NatsMetrics(self.stats.clone(), self.cfg.key.clone()))
    }

    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.cfg.group.iter().map(|g| bus::group_key(&self.cfg.key, g)).collect();
        k.push(self.cfg.key.clone());
        k
    }

    pub(crate) async fn run(self, ctx: Context, applier: Arc<Applier>) -> Result<()> {
        let body_path = ctx.inst.state_dir.join("nats-ruleset.toml");
        let mark_path = ctx.inst.state_dir.join("nats-live.json");
        let mut mark: Option<Watermark> = std::fs::read(&mark_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(m) = &mark {
            tracing::info!("the last value from the bus was revision {} of {} (older signed values are refused)", m.revision, m.key);
        }
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let opts = self.cfg.bus.options(&format!("xdpfw {}", self.node), Some(tx)).await?.retry_on_initial_connect();
        let client = opts.connect(self.cfg.bus.urls()).await.with_context(|| format!("connecting to {}", self.cfg.bus.url))?;
        let js = async_nats::jetstream::new(client);
        tracing::info!(
            "node {} following {}/{} on {} ({}; poll every {:?})",
            self.node,
            self.cfg.bucket,
            self.keys().join(" then "),
            self.cfg.bus.url,
            if self.trusted.is_empty() { "no trusted keys: unsigned rulesets accepted".to_string() } else { format!("{} trusted key(s)", self.trusted.len()) },
            self.poll
        );
        let mut status = NodeStatus {
            node: self.node.clone(),
            iface: ctx.inst.iface.clone(),
            group: self.cfg.group.clone(),
            key: self.cfg.key.clone(),
            result: "pending".into(),
            heartbeat_interval: self.cfg.heartbeat.as_secs_f64(),
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let mut stores: Option<(kv::Store, kv::Store)> = None;
        let mut watch: Option<kv::Watch> = None;
        let mut seen: Seen = None;
        let mut hup = ctx.hup.clone();
        let mut poll = tokio::time::interval(self.poll);
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut check, mut force, mut ever_connected) = (true, false, false);
        loop {
            if stores.is_none() {
                let opened = async {
                    let rules = bounded("opening the rules bucket", bus::rules_bucket(&js, &self.cfg.bucket, false)).await?;
                    let st = bounded("opening the status bucket", bus::status_bucket(&js, &self.cfg.status_bucket)).await?;
                    anyhow::Ok((rules, st))
                };
                match opened.await {
                    Ok(s) => stores = Some(s),
                    Err(e) => tracing::warn!("NATS: {e:#}; the live ruleset keeps serving, retrying"),
                }
            }
            if let (Some((rules, _)), None) = (&stores, &watch) {
                match bounded("watching", rules.watch_many(self.keys())).await {
                    Ok(w) => watch = Some(w),
                    Err(e) => tracing::warn!("NATS: {e:#}; polling until the watch is back"),
                }
            }
            if check && let Some((rules, st)) = &stores {
                if force {
                    seen = None;
                }
                self.check(&ctx, &applier, rules, (&body_path, &mark_path), (&mut seen, &mut mark), &mut status).await;
                self.put_status(st, &ctx, &mut status).await;
                (check, force) = (false, false);
            }
            let degraded = stores.is_none() || watch.is_none();
            tokio::select! {
                _ = ctx.shutdown.wait() => return Ok(()),
                Some(ev) = events.recv() => match ev {
                    async_nats::Event::Connected => {
                        self.stats.connected.store(true, Ordering::Relaxed);
                        status.connected = true;
                        if ever_connected {
                            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!("NATS: reconnected; full refresh of the latest revision");
                        } else {
                            tracing::info!("NATS: connected");
                        }
                        ever_connected = true;
                        // Events may have been missed, and the watch may be gone with the old
                        // connection: a new watch, and a check of the latest revision.
                        watch = None;
                        check = true;
                    }
                    async_nats::Event::Disconnected => {
                        self.stats.connected.store(false, Ordering::Relaxed);
                        status.connected = false;
                        tracing::warn!("NATS: disconnected; the live ruleset keeps serving");
                    }
                    other => tracing::info!("NATS: {other}"),
                },
                item = next_change(&mut watch) => match item {
                    Some(Ok(entry)) => {
                        self.stats.watch_events.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("watch: {} revision {} ({:?})", entry.key, entry.revision, entry.operation);
                        check = true;
                    }
                    other => {
                        tracing::warn!("NATS: the watch ended ({}); polling until it is back", other.map_or("closed".to_string(), |e| e.err().map(|e| e.to_string()).unwrap_or_default()));
                        watch = None;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
                _ = poll.tick() => {
                    self.stats.polls.fetch_add(1, Ordering::Relaxed);
                    check = true;
                }
                _ = heartbeat.tick() => {
                    if let Some((_, st)) = &stores {
                        self.put_status(st, &ctx, &mut status).await;
                    }
                }
                _ = hup.changed() => { check = true; force = true; }
                _ = tokio::time::sleep(Duration::from_secs(1)), if degraded => { check = true; }
            }
        }
    }

    /// Applies the latest value of the key the node follows, unless it was handled already.
    async fn check(&self, ctx: &Context, applier: &Applier, rules: &kv::Store, (body_path, mark_path): (&Path, &Path), (seen, mark): (&mut Seen, &mut Option<Watermark>), status: &mut NodeStatus) {
        let mut found = None;
        for k in self.keys() {
            match bounded("reading the latest revision", bus::latest(rules, &k)).await {
                Ok(Some(e)) => {
                    found = Some(e);
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("NATS: {k}: {e:#}; the live ruleset keeps serving");
                    return;
                }
            }
        }
        let Some(entry) = found else {
            tracing::debug!("nothing published under {} yet", self.keys().join(" or "));
            return;
        };
        let here = Some((entry.key.clone(), entry.revision));
        if *seen == here {
            return;
        }
        *seen = here;
        status.attempted_revision = entry.revision;
        let what = format!("revision {} of {}", entry.revision, entry.key);
        let opened = envelope::open(&entry.value, &self.trusted).and_then(|o| match &o.meta {
            Some(m) => envelope::check_order(m, &entry.key, mark.as_ref()).map(|()| o),
            None => Ok(o),
        });
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                let i = REFUSALS.iter().position(|r| *r == e.reason()).unwrap_or(3);
                self.stats.refused[i].fetch_add(1, Ordering::Relaxed);
                tracing::error!("refused {what}: {e}; the live ruleset keeps serving");
                status.result = "refused".into();
                status.error = Some(refusal_text(&e));
                return;
            }
        };
        if let Err(e) = store_private(body_path, opened.body).await {
            tracing::error!("cannot store {what}: {e:#}");
            status.result = "failed".into();
            status.error = Some(format!("storing the ruleset: {e}"));
            *seen = None;
            return;
        }
        let new_mark = Watermark { key: entry.key.clone(), revision: entry.revision, signed_at: opened.meta.as_ref().map_or(0, |m| m.signed_at) };
        match applier.apply(body_path, &ctx.shutdown).await.0 {
            Outcome::Applied(r) => {
                status.reload_us = Some([r.times.total_us, r.times.prove_us, r.times.flip_us, r.times.grace_us]);
                self.live(status, &entry, opened.signer);
                remember(mark_path, mark, new_mark).await;
                tracing::info!("{what} is live");
            }
            Outcome::Unchanged => {
                self.live(status, &entry, opened.signer);
                remember(mark_path, mark, new_mark).await;
                tracing::info!("{what} is the live ruleset already");
            }
            Outcome::Failed(why) => {
                tracing::error!("{what} was rejected; the live ruleset keeps serving");
                status.result = "failed".into();
                status.error = Some(why);
            }
            Outcome::Stopped => *seen = None,
        }
    }

    fn live(&self, status: &mut NodeStatus, entry: &kv::Entry, signer: Option<String>) {
        self.stats.live_revision.store(entry.revision, Ordering::Relaxed);
        status.key = entry.key.clone();
        status.revision = entry.revision;
        status.result = "ok".into();
        status.error = None;
        status.signer = signer;
    }

    async fn put_status(&self, st: &kv::Store, ctx: &Context, status: &mut NodeStatus) {
        let inst = ctx.inst.clone();
        if let Ok(Ok(s)) = tokio::task::spawn_blocking(move || inst.state()).await {
            status.generation = s.generation;
            status.version = s.ruleset.version;
            status.hash = s.ruleset.hash;
        }
        status.heartbeat = bus::unix_now();
        let body = serde_json::to_vec(status).unwrap_or_default();
        if let Err(e) = bounded("writing the node status", st.put(&self.node, body.into())).await {
            self.stats.status_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("NATS: {e:#}");
        }
    }
}

fn refusal_text(e: &EnvelopeError) -> String {
    e.to_string()
}

async fn next_change(watch: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Keeps the live value's watermark, in memory and in the state directory (a failure to write
/// it is logged: the node would only forget it on a restart).
async fn remember(path: &Path, mark: &mut Option<Watermark>, new: Watermark) {
    if let Err(e) = store_private(path, &serde_json::to_vec(&new).unwrap_or_default()).await {
        tracing::warn!("cannot keep {}: {e:#}", path.display());
    }
    *mark = Some(new);
}

/// Writes atomically and privately (0600): a ruleset from the bus is nobody else's to read.
async fn store_private(path: &Path, body: &[u8]) -> Result<()> {
    // The one atomic write of the project: a private (0600, O_EXCL|O_NOFOLLOW) temporary file,
    // synced, then renamed over `path`.
    let (path, body) = (path.to_path_buf(), body.to_vec());
    tokio::task::spawn_blocking(move || xdpfw_control::files::atomic_write(&path, &body)).await??;
    Ok(())
}

/// The servers' addresses, for the fail-closed ruleset (names that do not resolve are left out).
pub(crate) async fn server_addrs(bus: &BusConfig) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for (host, port) in bus.host_ports() {
        match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(a) => out.extend(a),
            Err(e) => tracing::warn!("cannot resolve {host} now ({e}); a fail-closed ruleset would not let its replies through"),
        }
    }
    out
}
