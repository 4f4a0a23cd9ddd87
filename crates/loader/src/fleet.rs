//! `loader fleet …` (keygen, publish, status, promote, rollback) and the `loader run --nats …`
//! flags: a fleet of nodes following one signed ruleset through NATS JetStream key-value.

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use xdpfw_daemon::{BusConfig, NatsConfig};
use xdpfw_fleet::{
    bus::{self, DEFAULT_STATUS_BUCKET},
    envelope,
    ops::{self, Convergence},
};
use xdpfw_rules::{duration::parse_duration, short_hash};

use crate::exit::{INVALID_RULESET, Output, UsageError};

const DEFAULT_BUCKET: &str = "xdpfw-rules";
const DEFAULT_KEY: &str = "rules";

/// The NATS connection: servers and secrets (from files only).
#[derive(Args, Clone, Debug)]
pub(crate) struct Conn {
    /// NATS credentials file (JWT and nkey seed).
    #[arg(long, value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// A file holding an nkey seed.
    #[arg(long, value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for TLS to the NATS servers.
    #[arg(long, value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
    /// Timeout of one connection attempt.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    pub nats_connect_timeout: Duration,
}

impl Conn {
    fn bus(&self, url: &str) -> BusConfig {
        BusConfig { url: url.to_string(), creds: self.nats_creds.clone(), nkey: self.nats_nkey.clone(), ca: self.nats_ca.clone(), connect_timeout: self.nats_connect_timeout }
    }
}

/// `loader run --nats URL …`.
#[derive(Args, Clone, Debug)]
pub(crate) struct RunNats {
    /// Follow a key of a NATS JetStream key-value bucket (server URLs, comma-separated); the
    /// rulesets must be self-contained (inline set prefixes).
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// The rules bucket.
    #[arg(long, default_value = DEFAULT_BUCKET, requires = "nats")]
    pub bucket: String,
    /// The key this node follows (KEY.GROUP first when --group is given and it holds a value).
    #[arg(long, default_value = DEFAULT_KEY, requires = "nats")]
    pub key: String,
    /// The node's group, e.g. canary (`fleet publish --to canary` reaches it alone).
    #[arg(long, requires = "nats")]
    pub group: Option<String>,
    /// Accept only rulesets signed by this public key (repeatable; `fleet keygen` writes one).
    #[arg(long, value_name = "FILE", requires = "nats")]
    pub trusted_key: Vec<PathBuf>,
    /// The node's name in the status bucket (default: HOSTNAME-IFACE).
    #[arg(long, requires = "nats")]
    pub node_id: Option<String>,
    /// The bucket the node reports its status to.
    #[arg(long, default_value = DEFAULT_STATUS_BUCKET, requires = "nats")]
    pub status_bucket: String,
    /// How often the node rewrites its status (nodes silent for 3 heartbeats show as stale).
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration, requires = "nats")]
    pub heartbeat: Duration,
    #[command(flatten)]
    pub conn: Conn,
}

impl RunNats {
    pub(crate) fn into_source(self) -> Option<xdpfw_daemon::SourceConfig> {
        let url = self.nats?;
        Some(xdpfw_daemon::SourceConfig::Nats(Box::new(NatsConfig {
            bus: self.conn.bus(&url),
            bucket: self.bucket,
            key: self.key,
            group: self.group,
            trusted_keys: self.trusted_key,
            node_id: self.node_id,
            status_bucket: self.status_bucket,
            heartbeat: self.heartbeat.max(Duration::from_millis(100)),
        })))
    }
}

/// The key that signs what a command publishes.
#[derive(Args, Clone, Debug)]
pub(crate) struct Signer {
    /// The signing key (from `fleet keygen`).
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
}

impl Signer {
    fn load(&self) -> Result<xdpfw_fleet::ed25519_dalek::SigningKey> {
        envelope::load_signing_key(&self.key_file)
    }
}

/// Where the fleet's rulesets live.
#[derive(Args, Clone, Debug)]
pub(crate) struct Target {
    /// NATS server URLs, comma-separated.
    #[arg(long, value_name = "URL")]
    pub nats: String,
    /// The rules bucket.
    #[arg(long, default_value = DEFAULT_BUCKET)]
    pub bucket: String,
    /// The key every node follows (a group's is KEY.GROUP).
    #[arg(long, default_value = DEFAULT_KEY)]
    pub key: String,
    /// The bucket the nodes report their status to.
    #[arg(long, default_value = DEFAULT_STATUS_BUCKET)]
    pub status_bucket: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// Following the nodes after a change.
#[derive(Args, Clone, Debug)]
pub(crate) struct Wait {
    /// Wait until N nodes run the new revision; exit 1 if any refuses or rejects it, or on timeout.
    #[arg(long, value_name = "N")]
    pub wait: Option<usize>,
    /// How long --wait waits.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Clone, Debug)]
pub(crate) enum FleetCommand {
    /// Write a new ed25519 key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub.
    Keygen {
        /// Where to write the pair: PREFIX.key and PREFIX.pub.
        prefix: PathBuf,
    },
    /// Create the rules and status buckets with N replicas (3 on a 3-server cluster), or set
    /// the replicas of existing ones. Without it, `publish` creates them with one replica.
    Init {
        /// Copies of each bucket (at most the number of servers in the cluster).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Validate FILE (parse, compile, self-tests), sign it and publish it as a new revision.
    Publish {
        /// The rules file (self-contained: inline set prefixes).
        file: PathBuf,
        #[command(flatten)]
        signer: Signer,
        /// Publish to one group only (KEY.GROUP), e.g. canary; by default to every node.
        #[arg(long, value_name = "GROUP")]
        to: Option<String>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: Wait,
    },
    /// Every node's live revision, result and heartbeat: converged, lagging, failed, refused, stale.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publish the group's ruleset to every node once every node of the group runs it healthy
    /// (signed anew for the common key).
    Promote {
        #[command(flatten)]
        signer: Signer,
        /// The group whose ruleset goes to every node.
        #[arg(long, default_value = "canary")]
        group: String,
        /// How long the group must have run it first.
        #[arg(long, default_value = "0s", value_name = "DURATION", value_parser = parse_duration)]
        soak: Duration,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: Wait,
    },
    /// Republish the ruleset of an earlier revision from the bucket's history (default: the
    /// previous ruleset), signed anew: nodes refuse an old value put back as it was.
    Rollback {
        #[command(flatten)]
        signer: Signer,
        /// The bucket revision to republish (default: the one before the current ruleset).
        revision: Option<u64>,
        /// Roll back a group's key (KEY.GROUP) instead of the common one.
        #[arg(long, value_name = "GROUP")]
        to: Option<String>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: Wait,
    },
}

fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

pub(crate) fn run(cmd: FleetCommand) -> Result<Output> {
    match cmd {
        FleetCommand::Keygen { prefix } => {
            let (s, p) = envelope::keygen(&prefix).with_context(|| format!("writing {}.key and .pub", prefix.display()))?;
            Ok(Output::ok(format!("secret key: {} (keep it off the nodes)\npublic key: {} (give it to the nodes: --trusted-key)\n", s.display(), p.display())))
        }
        FleetCommand::Publish { file, signer, to, target, wait } => publish(&file, &signer, to.as_deref(), &target, &wait),
        FleetCommand::Status { target, json } => block_on(status(&target, json)),
        FleetCommand::Init { replicas, target } => block_on(async {
            if replicas == 0 {
                return Err(UsageError("--replicas must be at least 1".into()).into());
            }
            let js = target.conn.bus(&target.nats).connect("xdpfw fleet").await?;
            let lines = bus::init_buckets(&js, &target.bucket, &target.status_bucket, replicas).await?;
            Ok(Output::ok(lines.join("\n") + "\n"))
        }),
        FleetCommand::Promote { signer, group, soak, target, wait } => block_on(async {
            let signing = signer.load()?;
            let js = target.conn.bus(&target.nats).connect("xdpfw fleet").await?;
            let store = bus::rules_bucket(&js, &target.bucket, false).await?;
            let st = bus::status_bucket(&js, &target.status_bucket).await?;
            let rev = ops::promote(&store, &st, &target.key, &group, soak, &signing).await?;
            let text = format!("promoted the {group} ruleset to {}: revision {rev}\n", target.key);
            follow(&st, &target.key, rev, &wait, text).await
        }),
        FleetCommand::Rollback { signer, revision, to, target, wait } => block_on(async {
            let signing = signer.load()?;
            let key = match &to {
                Some(g) => bus::group_key(&target.key, g),
                None => target.key.clone(),
            };
            let js = target.conn.bus(&target.nats).connect("xdpfw fleet").await?;
            let store = bus::rules_bucket(&js, &target.bucket, false).await?;
            let (from, rev) = ops::rollback(&store, &key, revision, &signing).await?;
            let st = bus::status_bucket(&js, &target.status_bucket).await?;
            follow(&st, &key, rev, &wait, format!("republished the ruleset of revision {from} of {key}, signed anew, as revision {rev}\n")).await
        }),
    }
}

fn publish(file: &std::path::Path, signer: &Signer, to: Option<&str>, target: &Target, wait: &Wait) -> Result<Output> {
    let body = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let rs = match ops::validate(file, &body) {
        Ok(rs) => rs,
        Err(e) => {
            eprintln!("{e}\nnothing was published");
            return Ok(Output { text: String::new(), code: INVALID_RULESET });
        }
    };
    let signing = signer.load()?;
    if let Some(g) = to
        && (!bus::valid_key(g) || g.contains('.'))
    {
        return Err(UsageError(format!("invalid group \"{g}\"")).into());
    }
    let key = to.map_or_else(|| target.key.clone(), |g| bus::group_key(&target.key, g));
    block_on(async {
        let js = target.conn.bus(&target.nats).connect("xdpfw fleet").await?;
        let store = bus::rules_bucket(&js, &target.bucket, true).await?;
        let rev = ops::publish(&store, &key, &body, rs.version.clone(), &signing).await?;
        let text = format!(
            "published {} ({}, {}) to {}/{key}: revision {rev}\n",
            file.display(),
            rs.version.as_deref().unwrap_or("no version"),
            short_hash(&rs.hash),
            target.bucket
        );
        let st = bus::status_bucket(&js, &target.status_bucket).await?;
        follow(&st, &key, rev, wait, text).await
    })
}

async fn follow(st: &xdpfw_fleet::async_nats::jetstream::kv::Store, key: &str, rev: u64, wait: &Wait, mut text: String) -> Result<Output> {
    let Some(n) = wait.wait else {
        return Ok(Output::ok(if wait.json { serde_json::to_string(&serde_json::json!({ "key": key, "revision": rev }))? + "\n" } else { text }));
    };
    let c: Convergence = ops::wait(st, key, rev, n, wait.timeout).await?;
    let code = if c.complete { 0 } else { 1 };
    if wait.json {
        return Ok(Output { text: serde_json::to_string_pretty(&c)? + "\n", code });
    }
    let _ = writeln!(text, "{} of {n} nodes live with revision {rev} after {:.3}s", c.converged.len(), c.elapsed_s);
    for (node, err) in &c.failed {
        let _ = writeln!(text, "  {node} did not apply it: {err}");
    }
    if !c.complete && c.failed.is_empty() {
        let _ = writeln!(text, "timed out after {:?}", wait.timeout);
    }
    Ok(Output { text, code })
}

async fn status(target: &Target, json: bool) -> Result<Output> {
    let js = target.conn.bus(&target.nats).connect("xdpfw fleet").await?;
    let store = bus::rules_bucket(&js, &target.bucket, false).await?;
    let st = bus::status_bucket(&js, &target.status_bucket).await?;
    let rows = ops::status_rows(&store, &st, &target.key).await?;
    if json {
        return Ok(Output::ok(serde_json::to_string_pretty(&rows)? + "\n"));
    }
    let now = bus::unix_now();
    let mut out = format!("{:<24} {:<8} {:<15} {:<10} {:>8} {:>8} {:<16} {:<10} {:>4} {:>6}  {}\n", "NODE", "GROUP", "IFACE", "STATE", "REVISION", "LATEST", "VERSION", "HASH", "GEN", "AGE", "RESULT");
    for r in &rows {
        let s = &r.status;
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<15} {:<10} {:>8} {:>8} {:<16} {:<10} {:>4} {:>5.0}s  {}{}",
            s.node,
            s.group.as_deref().unwrap_or("-"),
            s.iface,
            r.state,
            s.revision,
            r.latest.map_or("-".to_string(), |l| l.to_string()),
            s.version.as_deref().unwrap_or("-"),
            short_hash(&s.hash),
            s.generation,
            now - s.heartbeat,
            s.result,
            s.error.as_deref().map(|e| format!(" (revision {}: {})", s.attempted_revision, e.lines().next().unwrap_or(""))).unwrap_or_default()
        );
    }
    if rows.is_empty() {
        out.push_str("(no node has reported)\n");
    }
    Ok(Output::ok(out))
}
