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

/// The revision `key` holds now (any operation), 0 if it never held anything.
async fn current_revision(store: &kv::Store, key: &str) -> Result<u64> {
    Ok(store.entry(key).await.with_context(|| format!("reading {key}"))?.map_or(0, |e| e.revision))
}

/// Writes `value` as the next revision of `key`, failing if someone else wrote in between.
pub async fn put_next(store: &kv::Store, key: &str, value: Vec<u8>, after: u64) -> Result<u64> {
    let r = if after == 0 { store.create(key, value.into()).await.map_err(anyhow::Error::from) } else { store.update(key, value.into(), after).await.map_err(anyhow::Error::from) };
    r.with_context(|| format!("writing {key} (another publisher may have written it since revision {after})"))
}

/// Seals `body` and publishes it to `key`: the new revision.
pub async fn publish(store: &kv::Store, key: &str, body: &[u8], version: Option<String>, signing: &SigningKey) -> Result<u64> {
    let after = current_revision(store, key).await?;
    let meta = Meta { version, key: key.to_string(), supersedes: after, signed_at: bus::unix_now() as u64, ..Default::default() };
    put_next(store, key, envelope::seal(body, meta, signing), after).await
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
        let all = bus::read_statuses(status).await?;
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
pub async fn promote(store: &kv::Store, status: &kv::Store, key: &str, group: &str, soak: Duration) -> Result<u64> {
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
    let after = current_revision(store, key).await?;
    let rev = put_next(store, key, entry.value.to_vec(), after).await?;
    store.delete(&gkey).await.with_context(|| format!("removing the {group} override {gkey}"))?;
    Ok(rev)
}

/// Republishes an earlier revision of `key` (by default the one before the latest value) as
/// its newest. Returns (the revision republished, the new revision).
pub async fn rollback(store: &kv::Store, key: &str, to: Option<u64>) -> Result<(u64, u64)> {
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
        None => puts.iter().rev().find(|e| e.value != last.value).with_context(|| format!("{key} has no earlier, different revision"))?,
    };
    let after = current_revision(store, key).await?;
    let rev = put_next(store, key, target.value.to_vec(), after).await?;
    Ok((target.revision, rev))
}

pub use jetstream::Context as Jetstream;
