//! What `loader fleet` does on the bus: validate and publish, wait for convergence, promote a
//! canary, roll back to an earlier revision.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use async_nats::jetstream::{self, kv};
use ed25519_dalek::SigningKey;
use serde::Serialize;
use xdpfw_rules::{self as rules, Ruleset};

use crate::{
    bus::{self, NodeStatus},
    envelope::{self, Meta},
};

/// Why a ruleset may not be published (the command exits 3).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// The checks of `loader check`, done before anything reaches the bus: parse, compile, the
/// self-tests with the reference matcher, and self-containment (no set files: nodes cannot
/// fetch files beside the value).
pub fn validate(path: &Path, body: &[u8]) -> Result<Ruleset, Invalid> {
    let text = std::str::from_utf8(body).map_err(|_| Invalid(format!("{}: not UTF-8 text", path.display())))?;
    let rs = rules::parse(path, text).map_err(|e| Invalid(e.to_string()))?;
    if let Some((name, file)) = rs.set_files.first() {
        return Err(Invalid(format!(
            "{}: set \"{name}\" reads {}: rulesets on the bus must be self-contained (inline the prefixes)",
            path.display(),
            file.display()
        )));
    }
    rules::compile::compile(&rs).map_err(|e| Invalid(format!("{}: {e}", path.display())))?;
    if let Err(f) = rules::selftest::check_self_tests(&rs) {
        let detail: Vec<String> = f.failures.iter().map(ToString::to_string).collect();
        return Err(Invalid(format!("{}: {} of {} self-tests failed\n{}", path.display(), f.failures.len(), f.total, detail.join("\n"))));
    }
    Ok(rs)
}

/// Writes `value` as the next revision of `key`, failing if someone else wrote in between.
pub async fn put_next(store: &kv::Store, key: &str, value: Vec<u8>, after: u64) -> Result<u64> {
    put_once(store, key, value, after).await.map_err(|(e, _)| e)
}

/// One compare-and-set write; the flag tells a conflict (someone else wrote since `after`).
async fn put_once(store: &kv::Store, key: &str, value: Vec<u8>, after: u64) -> Result<u64, (anyhow::Error, bool)> {
    let r = if after == 0 {
        store.create(key, value.into()).await.map_err(|e| {
            let conflict = e.kind() == kv::CreateErrorKind::AlreadyExists;
            (anyhow::Error::from(e), conflict)
        })
    } else {
        store.update(key, value.into(), after).await.map_err(|e| {
            let conflict = e.kind() == kv::UpdateErrorKind::WrongLastRevision;
            (anyhow::Error::from(e), conflict)
        })
    };
    r.map_err(|(e, c)| (e.context(format!("writing {key} (another publisher may have written it since revision {after})")), c))
}

/// How long a publication keeps trying through a server failure (a cluster electing a new
/// stream leader takes a few seconds).
pub const PUBLISH_RETRY: Duration = Duration::from_secs(20);

/// Signs (through `seal`, given the revision it supersedes) and writes the next revision of
/// `key`, retrying through transient failures (a server dying, a leader election) for
/// [`PUBLISH_RETRY`]. A write whose acknowledgement was lost is recognized on the next read
/// (the key holds one of the values this call wrote) and not repeated; a conflict with
/// another publisher is an error, never overwritten.
pub async fn put_signed(store: &kv::Store, key: &str, seal: impl Fn(u64) -> Vec<u8>) -> Result<u64> {
    let deadline = std::time::Instant::now() + PUBLISH_RETRY;
    let mut written: Vec<Vec<u8>> = Vec::new();
    loop {
        let err = match tokio::time::timeout(Duration::from_secs(5), store.entry(key)).await {
            Ok(Ok(entry)) => {
                if let Some(e) = &entry
                    && written.iter().any(|w| w.as_slice() == &e.value[..])
                {
                    return Ok(e.revision);
                }
                let after = entry.map_or(0, |e| e.revision);
                let value = seal(after);
                written.push(value.clone());
                match tokio::time::timeout(Duration::from_secs(10), put_once(store, key, value, after)).await {
                    Ok(Ok(rev)) => return Ok(rev),
                    // A conflict on the first try is another publisher's write; later, it may
                    // be ours whose acknowledgement was lost: the next read tells.
                    Ok(Err((e, true))) if written.len() == 1 => return Err(e),
                    Ok(Err((e, _))) => e,
                    Err(_) => anyhow::anyhow!("writing {key} timed out"),
                }
            }
            Ok(Err(e)) => anyhow::Error::from(e).context(format!("reading {key}")),
            Err(_) => anyhow::anyhow!("reading {key} timed out"),
        };
        if std::time::Instant::now() >= deadline {
            return Err(err.context(format!("gave up after {PUBLISH_RETRY:?}")));
        }
        tracing::warn!("{err:#}; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Seals `body` and publishes it to `key`: the new revision.
pub async fn publish(store: &kv::Store, key: &str, body: &[u8], version: Option<String>, signing: &SigningKey) -> Result<u64> {
    put_signed(store, key, |after| {
        let meta = Meta { version: version.clone(), key: key.to_string(), supersedes: after, signed_at: bus::unix_ms(), ..Default::default() };
        envelope::seal(body, meta, signing)
    })
    .await
}

/// The body and metadata of a value from the history (integrity checked: a value whose
/// signature does not hold is not republished).
fn reopen(value: &[u8], what: &str) -> Result<(Vec<u8>, Option<Meta>)> {
    let o = envelope::open(value, &[]).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok((o.body.to_vec(), o.meta))
}

/// How a wait for convergence ended.
#[derive(Debug, Serialize)]
pub struct Convergence {
    pub revision: u64,
    pub converged: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub elapsed_s: f64,
    pub complete: bool,
}

/// Waits until `want` nodes report `revision` live from `key` (or any node fails it, or the
/// timeout passes).
pub async fn wait(status: &kv::Store, key: &str, revision: u64, want: usize, timeout: Duration) -> Result<Convergence> {
    let start = std::time::Instant::now();
    loop {
        // A failed read (a server dying, the status stream electing a leader) is retried
        // until the timeout.
        let all = match tokio::time::timeout(Duration::from_secs(5), bus::read_statuses(status)).await {
            Ok(Ok(all)) => all,
            failed => {
                let err = failed.map_or_else(|_| anyhow::anyhow!("reading the node statuses timed out"), |r| r.err().unwrap_or_else(|| anyhow::anyhow!("?")));
                if start.elapsed() >= timeout {
                    return Err(err);
                }
                tracing::warn!("{err:#}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let converged: Vec<String> = all.iter().filter(|s| s.key == key && s.revision == revision && s.result == "ok").map(|s| s.node.clone()).collect();
        let failed: Vec<(String, String)> = all
            .iter()
            .filter(|s| s.attempted_revision == revision && (s.result == "failed" || s.result == "refused"))
            .map(|s| (s.node.clone(), s.error.clone().unwrap_or_default()))
            .collect();
        let elapsed = start.elapsed();
        if converged.len() >= want || !failed.is_empty() || elapsed >= timeout {
            let complete = converged.len() >= want && failed.is_empty();
            return Ok(Convergence { revision, converged, failed, elapsed_s: elapsed.as_secs_f64(), complete });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One row of `fleet status`.
#[derive(Debug, Serialize)]
pub struct Row {
    pub state: &'static str,
    /// The revision the node should run (the latest of its key).
    pub latest: Option<u64>,
    #[serde(flatten)]
    pub status: NodeStatus,
}

pub async fn status_rows(rules_store: &kv::Store, status: &kv::Store, key: &str) -> Result<Vec<Row>> {
    let all = bus::read_statuses(status).await?;
    let main = bus::latest(rules_store, key).await?.map(|e| e.revision);
    let now = bus::unix_now();
    let mut rows = Vec::new();
    for s in all {
        let latest = match &s.group {
            Some(g) => match bus::latest(rules_store, &bus::group_key(key, g)).await? {
                Some(e) => Some(e.revision),
                None => main,
            },
            None => main,
        };
        rows.push(Row { state: s.state(latest, now), latest, status: s });
    }
    Ok(rows)
}

/// Publishes the group's ruleset to every node, once every node of the group runs it healthy
/// (and has for `soak`), then removes the group's override. Returns the new revision of `key`.
pub async fn promote(store: &kv::Store, status: &kv::Store, key: &str, group: &str, soak: Duration, signing: &SigningKey) -> Result<u64> {
    let gkey = bus::group_key(key, group);
    let Some(entry) = bus::latest(store, &gkey).await? else {
        bail!("nothing to promote: {gkey} holds no ruleset (publish with --to {group} first)");
    };
    let nodes: Vec<NodeStatus> = bus::read_statuses(status).await?.into_iter().filter(|s| s.group.as_deref() == Some(group)).collect();
    if nodes.is_empty() {
        bail!("no node of group {group} reports its status: nothing shows revision {} is healthy", entry.revision);
    }
    let now = bus::unix_now();
    let bad: Vec<String> = nodes
        .iter()
        .filter(|s| s.revision != entry.revision || s.result != "ok" || s.state(Some(entry.revision), now) != "converged")
        .map(|s| format!("{} (revision {}, {}{})", s.node, s.revision, s.result, s.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()))
        .collect();
    if !bad.is_empty() {
        bail!("not promoting revision {} of {gkey}: these {group} nodes do not run it healthy: {}", entry.revision, bad.join(", "));
    }
    let soaked = now - entry.created.unix_timestamp() as f64;
    if soaked < soak.as_secs_f64() {
        bail!("not promoting yet: revision {} has been out {soaked:.0}s of the {}s soak time", entry.revision, soak.as_secs());
    }
    // Signed anew for the common key: nodes refuse a value moved from another key.
    let (body, meta) = reopen(&entry.value, &format!("revision {} of {gkey}", entry.revision))?;
    let version = meta.and_then(|m| m.version);
    let rev = put_signed(store, key, |after| {
        let meta = Meta { version: version.clone(), key: key.to_string(), supersedes: after, signed_at: bus::unix_ms(), promotes: Some(entry.revision), ..Default::default() };
        envelope::seal(&body, meta, signing)
    })
    .await?;
    store.delete(&gkey).await.with_context(|| format!("removing the {group} override {gkey}"))?;
    Ok(rev)
}

/// Republishes the ruleset of an earlier revision of `key` (by default the one before the
/// latest value) as its newest, in a fresh envelope naming the revision it restores (nodes
/// refuse an old envelope put back as it was: a replay). Returns (the revision restored, the
/// new revision).
pub async fn rollback(store: &kv::Store, key: &str, to: Option<u64>, signing: &SigningKey) -> Result<(u64, u64)> {
    use futures_util::StreamExt;
    let mut history = store.history(key).await.with_context(|| format!("reading the history of {key}"))?;
    let mut puts: Vec<kv::Entry> = Vec::new();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(10), history.next()).await.context("reading the history timed out")? {
        let e = e?;
        if e.operation == kv::Operation::Put {
            puts.push(e);
        }
    }
    let Some(last) = puts.last() else { bail!("{key} has no history") };
    let target = match to {
        Some(r) => puts.iter().find(|e| e.revision == r).with_context(|| {
            format!("revision {r} is not in the history of {key} (kept: {})", puts.iter().map(|e| e.revision.to_string()).collect::<Vec<_>>().join(", "))
        })?,
        None => {
            // The previous ruleset: the same body in a fresh envelope is the same ruleset.
            let body = |v: &[u8]| reopen(v, "").map(|(b, _)| b).ok();
            let live = body(&last.value);
            puts.iter().rev().find(|e| body(&e.value) != live).with_context(|| format!("{key} has no earlier, different revision"))?
        }
    };
    let (body, meta) = reopen(&target.value, &format!("revision {} of {key}", target.revision))?;
    let version = meta.and_then(|m| m.version);
    let rev = put_signed(store, key, |after| {
        let meta = Meta { version: version.clone(), key: key.to_string(), supersedes: after, signed_at: bus::unix_ms(), restores: Some(target.revision), ..Default::default() };
        envelope::seal(&body, meta, signing)
    })
    .await?;
    Ok((target.revision, rev))
}

pub use jetstream::Context as Jetstream;
