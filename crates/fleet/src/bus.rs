//! The NATS side: connecting, the two buckets (rulesets, node status) and the status record.
//!
//! Layout: the rules bucket holds one key per ruleset target: `KEY` for every node, and
//! `KEY.GROUP` for a group's override (the canary). A node with a group follows `KEY.GROUP`
//! while it holds a value, else `KEY`. The status bucket holds one key per node (its node id),
//! rewritten at every change and every heartbeat; the bucket's max age removes vanished nodes.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

pub const DEFAULT_STATUS_BUCKET: &str = "xdpfw-status";
/// How many revisions of each key the rules bucket keeps (what `fleet rollback` can reach).
pub const RULES_HISTORY: i64 = 64;
/// Status records older than this vanish from the bucket.
pub const STATUS_MAX_AGE: Duration = Duration::from_secs(120);

/// How to reach the NATS servers. Secrets come from files only and are never logged.
#[derive(Clone, Debug, Default)]
pub struct BusConfig {
    /// One or more server URLs, comma-separated (nats://host:port, tls://host:port).
    pub url: String,
    /// A NATS credentials file (JWT + nkey seed).
    pub creds: Option<PathBuf>,
    /// A file holding an nkey seed (SU…).
    pub nkey: Option<PathBuf>,
    /// Extra CA certificates (PEM) for TLS to the servers.
    pub ca: Option<PathBuf>,
    pub connect_timeout: Duration,
}

impl BusConfig {
    pub fn urls(&self) -> Vec<String> {
        self.url.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
    }

    /// host:port of each server (default port 4222), for the fail-closed ruleset.
    pub fn host_ports(&self) -> Vec<(String, u16)> {
        self.urls()
            .iter()
            .filter_map(|u| {
                let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
                let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r).trim_end_matches('/');
                let (host, port) = match rest.rsplit_once(':') {
                    Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => (h, p.parse().ok()?),
                    _ => (rest, 4222),
                };
                Some((host.trim_matches(['[', ']']).to_string(), port))
            })
            .collect()
    }

    /// Client options; `events` receives the connection events (for a full refresh after a
    /// reconnect). The client reconnects on its own, forever.
    pub async fn options(&self, name: &str, events: Option<tokio::sync::mpsc::UnboundedSender<async_nats::Event>>) -> Result<async_nats::ConnectOptions> {
        let mut o = match &self.creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path).await.with_context(|| format!("reading the credentials {}", path.display()))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(path) = &self.nkey {
            let seed = std::fs::read_to_string(path).with_context(|| format!("reading the nkey seed {}", path.display()))?;
            o = o.nkey(seed.trim().to_string());
        }
        if let Some(ca) = &self.ca {
            o = o.add_root_certificates(ca.clone());
        }
        o = o.name(name).connection_timeout(self.connect_timeout).max_reconnects(None::<usize>).reconnect_delay_callback(|attempts| {
            // Full jitter under a cap that doubles up to 5 s: a fleet coming back is not in step.
            let cap = 100u64.saturating_mul(1 << attempts.min(6)).min(5000);
            Duration::from_millis(rand::random_range(cap / 4..=cap))
        });
        if let Some(tx) = events {
            o = o.event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(e);
                }
            });
        }
        Ok(o)
    }

    /// Connects once (a failure is an error: for the command line).
    pub async fn connect(&self, name: &str) -> Result<jetstream::Context> {
        let urls = self.urls();
        if urls.is_empty() {
            bail!("no NATS server URL");
        }
        let client = tokio::time::timeout(self.connect_timeout + Duration::from_secs(1), self.options(name, None).await?.connect(urls))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {} timed out", self.url))?
            .with_context(|| format!("connecting to {}", self.url))?;
        Ok(jetstream::new(client))
    }
}

/// The key a group's nodes follow before the common key.
pub fn group_key(key: &str, group: &str) -> String {
    format!("{key}.{group}")
}

/// A valid KV key / node id: letters, digits and `-_/=.`, not starting or ending with a dot.
pub fn valid_key(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && !s.ends_with('.') && !s.contains("..") && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_/=.".contains(c))
}

/// Opens a bucket, creating it (when `create`) if it is missing. A failed read is not proof
/// that it is missing (a server may have died, the stream be electing a leader), so a failed
/// creation is followed by reads again, for up to `patience`.
async fn open_bucket(js: &jetstream::Context, cfg: kv::Config, create: bool, patience: Duration) -> Result<kv::Store> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let err = match js.get_key_value(&cfg.bucket).await {
            Ok(s) => return Ok(s),
            Err(e) if !create => anyhow::anyhow!("opening the bucket {}: {e}", cfg.bucket),
            Err(e) => {
                tracing::debug!("bucket {}: {e}; creating it", cfg.bucket);
                match js.create_key_value(cfg.clone()).await {
                    Ok(s) => return Ok(s),
                    Err(e) => anyhow::Error::from(e).context(format!("creating the bucket {}", cfg.bucket)),
                }
            }
        };
        if std::time::Instant::now() >= deadline {
            return Err(err);
        }
        tracing::warn!("{err:#}; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The rules bucket, created when missing (by publishers, with one replica: `fleet init`
/// makes more).
pub async fn rules_bucket(js: &jetstream::Context, bucket: &str, create: bool) -> Result<kv::Store> {
    open_bucket(js, rules_config(bucket, 1), create, if create { Duration::from_secs(15) } else { Duration::ZERO }).await
}

/// The status bucket, created when missing (by anyone).
pub async fn status_bucket(js: &jetstream::Context, bucket: &str) -> Result<kv::Store> {
    open_bucket(js, status_config(bucket, 1), true, Duration::from_secs(15)).await
}

fn rules_config(bucket: &str, replicas: usize) -> kv::Config {
    kv::Config { bucket: bucket.to_string(), history: RULES_HISTORY, max_value_size: -1, num_replicas: replicas, ..Default::default() }
}

fn status_config(bucket: &str, replicas: usize) -> kv::Config {
    kv::Config { bucket: bucket.to_string(), history: 1, max_age: STATUS_MAX_AGE, num_replicas: replicas, ..Default::default() }
}

/// `fleet init`: creates both buckets with `replicas` copies (3 on a 3-server cluster, so
/// they survive a server), or sets the replicas of existing ones. Returns one line per bucket.
pub async fn init_buckets(js: &jetstream::Context, rules: &str, status: &str, replicas: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, cfg) in [(rules, rules_config(rules, replicas)), (status, status_config(status, replicas))] {
        let existing = match js.get_stream(format!("KV_{name}")).await {
            Ok(mut s) => Some(s.info().await.with_context(|| format!("reading the bucket {name}"))?.config.num_replicas),
            Err(_) => None,
        };
        match existing {
            None => {
                js.create_key_value(cfg).await.with_context(|| format!("creating the bucket {name}"))?;
                out.push(format!("created {name} with {replicas} replica(s)"));
            }
            Some(r) if r == replicas => out.push(format!("{name} has {r} replica(s) already")),
            Some(r) => {
                js.update_key_value(cfg).await.with_context(|| format!("setting the replicas of {name}"))?;
                out.push(format!("{name}: {r} → {replicas} replica(s)"));
            }
        }
    }
    Ok(out)
}

/// The latest value of a key, if it holds one (not deleted or purged).
pub async fn latest(store: &kv::Store, key: &str) -> Result<Option<kv::Entry>> {
    let e = store.entry(key).await.with_context(|| format!("reading {key}"))?;
    Ok(e.filter(|e| e.operation == kv::Operation::Put))
}

/// What a node last reported.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub node: String,
    pub iface: String,
    pub group: Option<String>,
    /// The key whose value is live (KEY or KEY.GROUP).
    pub key: String,
    /// The bus revision of the live ruleset (0: none from the bus yet).
    pub revision: u64,
    pub version: Option<String>,
    pub hash: String,
    pub generation: u64,
    /// "ok", "failed" (the pipeline rejected it), "refused" (signature), or "pending".
    pub result: String,
    pub error: Option<String>,
    /// The last revision the node tried (equal to `revision` unless it failed).
    pub attempted_revision: u64,
    pub signer: Option<String>,
    /// Reload phase times of the last reload, in microseconds (total, prove, flip, grace).
    pub reload_us: Option<[u64; 4]>,
    pub connected: bool,
    /// Unix seconds of this record; `heartbeat_interval` tells when it is stale.
    pub heartbeat: f64,
    pub heartbeat_interval: f64,
    pub daemon_version: String,
}

impl NodeStatus {
    /// converged / lagging / failed / refused / stale, against the latest revision of the key
    /// the node should follow.
    pub fn state(&self, latest_revision: Option<u64>, now: f64) -> &'static str {
        if now - self.heartbeat > 3.0 * self.heartbeat_interval.max(1.0) {
            "stale"
        } else if self.result == "refused" && latest_revision.is_some_and(|r| r == self.attempted_revision) {
            "refused"
        } else if self.result == "failed" && latest_revision.is_some_and(|r| r == self.attempted_revision) {
            "failed"
        } else if latest_revision.is_some_and(|r| r == self.revision) {
            "converged"
        } else {
            "lagging"
        }
    }
}

/// Every node's last record.
pub async fn read_statuses(store: &kv::Store) -> Result<Vec<NodeStatus>> {
    use futures_util::TryStreamExt;
    let keys: Vec<String> = store.keys().await?.try_collect().await?;
    let mut out = Vec::new();
    for k in keys {
        if let Some(e) = latest(store, &k).await?
            && let Ok(s) = serde_json::from_slice::<NodeStatus>(&e.value)
        {
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

/// Unix time in milliseconds (an envelope's `signed_at`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_and_keys() {
        let c = BusConfig { url: "nats://10.0.0.1:4333, tls://user@nats.example:4222,nats.local".into(), ..Default::default() };
        assert_eq!(c.host_ports(), [("10.0.0.1".to_string(), 4333), ("nats.example".to_string(), 4222), ("nats.local".to_string(), 4222)]);
        assert!(valid_key("rules.canary") && valid_key("node-1") && !valid_key("a b") && !valid_key("a..b") && !valid_key(""));
    }

    #[test]
    fn states() {
        let s = NodeStatus { revision: 5, attempted_revision: 5, result: "ok".into(), heartbeat: 100.0, heartbeat_interval: 5.0, ..Default::default() };
        assert_eq!(s.state(Some(5), 101.0), "converged");
        assert_eq!(s.state(Some(6), 101.0), "lagging");
        assert_eq!(s.state(Some(5), 200.0), "stale");
        let f = NodeStatus { result: "failed".into(), attempted_revision: 6, ..s };
        assert_eq!(f.state(Some(6), 101.0), "failed");
    }
}
