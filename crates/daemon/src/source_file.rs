//! The file source: the rules file (and the set files it names) watched with inotify.
//!
//! Directories are watched, not files: an editor's save or an atomic `rename(2)` puts a new
//! inode at the path, and a watch on the old inode would go quiet. Events are debounced (a
//! save is several events, and an in-place write can be seen half done), then the content's
//! fingerprint decides whether anything changed; the applier then compares the ruleset's hash
//! with the live one. A periodic check catches what notification misses (a replaced directory,
//! a network filesystem).

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{
    Applier, Context,
    metrics::{MetricsSource, escape_label, family},
};

/// Quiet time that ends a burst of events, and the longest a burst may delay a check.
const DEBOUNCE: Duration = Duration::from_millis(150);
const DEBOUNCE_MAX: Duration = Duration::from_secs(2);

/// Hash of the rules file and its set files as bytes on disk (each file by its own SHA-256):
/// cheap enough to run on every burst of events, unlike a parse of a million-prefix set. With
/// `trust_metadata`, a large set file whose stamps vouch for a text this process parsed (see
/// `xdpfw_rules::TRUST_AGE`) enters by that text's digest without being read; without it (the
/// periodic check), every file is read, and a recorded digest the content contradicts is
/// dropped, so a change the stamps missed (a write through a shared mapping) is still seen.
fn fingerprint(rules: &Path, sets: &[PathBuf], trust_metadata: bool) -> [u8; 32] {
    let mut h = Sha256::new();
    for (i, p) in std::iter::once(rules).chain(sets.iter().map(PathBuf::as_path)).enumerate() {
        h.update(p.as_os_str().as_encoded_bytes());
        let trusted = if i > 0 { xdpfw_rules::trusted_digest(p) } else { None };
        if let Some(digest) = trusted.filter(|_| trust_metadata) {
            h.update(digest);
            continue;
        }
        // Bounded like the parser's reads: a FIFO or a device in place of a file must neither
        // hang the watcher nor fill the memory.
        match xdpfw_rules::read_bounded(p, xdpfw_rules::MAX_SET_FILE) {
            Ok(text) => {
                let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
                if trusted.is_some_and(|t| t != digest) {
                    tracing::warn!("{} changed without its timestamps changing (written through a mapping?): reading it again", p.display());
                    xdpfw_rules::forget_file(p);
                }
                h.update(digest);
            }
            Err(e) => h.update(format!("unreadable: {e}").as_bytes()),
        }
    }
    h.finalize().into()
}

/// The fingerprint of the rules file alone, before its set files are known.
pub(crate) fn fingerprint_rules(rules: &Path) -> [u8; 32] {
    fingerprint(&std::path::absolute(rules).unwrap_or_else(|_| rules.to_path_buf()), &[], true)
}

/// How often the file was looked at: a check reads and hashes it, a change is a check that
/// found new bytes (and went to the applier).
struct FileMetrics {
    path: String,
    checks: AtomicU64,
    changes: AtomicU64,
}

impl MetricsSource for FileMetrics {
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let path = escape_label(&self.path);
        family(out, "xdpfw_source_file_checks_total", "counter", "Times the rules file (and its set files) were read and hashed after an event, SIGHUP or the periodic check.");
        let _ = writeln!(out, "xdpfw_source_file_checks_total{{path=\"{path}\"}} {}", self.checks.load(Ordering::Relaxed));
        family(out, "xdpfw_source_file_changes_total", "counter", "Checks that found different content and handed it to the reload pipeline.");
        let _ = writeln!(out, "xdpfw_source_file_changes_total{{path=\"{path}\"}} {}", self.changes.load(Ordering::Relaxed));
    }
}

struct Watched {
    watcher: notify::RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    /// The rules file and its set files: events on anything else in the directories are noise.
    files: HashSet<PathBuf>,
    sets: Vec<PathBuf>,
}

impl Watched {
    fn follow(&mut self, rules: &Path, sets: Vec<PathBuf>) {
        self.files = std::iter::once(rules.to_path_buf()).chain(sets.iter().cloned()).collect();
        for f in &self.files {
            let Some(dir) = f.parent() else { continue };
            if self.dirs.contains(dir) {
                continue;
            }
            match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.dirs.insert(dir.to_path_buf());
                }
                Err(e) => tracing::warn!("cannot watch {}: {e}; relying on the periodic check", dir.display()),
            }
        }
        self.sets = sets;
    }

    fn relevant(&self, ev: &notify::Result<notify::Event>) -> bool {
        match ev {
            // Reads (ours included: every check opens the file) change nothing; without this
            // filter each check would trigger the next.
            Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => false,
            // Overflowed queues and rescans carry no paths: anything may have changed.
            Ok(ev) => ev.paths.is_empty() || ev.need_rescan() || ev.paths.iter().any(|p| self.files.contains(p)),
            Err(_) => true,
        }
    }
}

/// Follows `rules` until shutdown. `seen`: the fingerprint of content the attach already
/// applied or rejected, which needs no second attempt.
fn set_paths(sets: Vec<(String, PathBuf)>) -> Vec<PathBuf> {
    sets.into_iter().map(|(_, p)| std::path::absolute(&p).unwrap_or(p)).collect()
}

pub(crate) async fn run(ctx: Context, applier: Arc<Applier>, rules: PathBuf, poll: Duration, seen: Option<[u8; 32]>) -> Result<()> {
    let rules = std::path::absolute(&rules).with_context(|| format!("resolving {}", rules.display()))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .context("starting the file watcher (inotify)")?;
    let mut w = Watched { watcher, dirs: HashSet::new(), files: HashSet::new(), sets: Vec::new() };
    w.follow(&rules, Vec::new());
    tracing::info!("watching {}", rules.display());

    let stats = Arc::new(FileMetrics { path: rules.display().to_string(), checks: AtomicU64::new(0), changes: AtomicU64::new(0) });
    ctx.metrics.register(stats.clone());
    let mut hup = ctx.hup.clone();
    let mut last = seen;
    if seen.is_some() {
        // Only the set files are new to us. The fingerprint taken before the attach did not
        // cover them, so the first check runs anyway (and finds the ruleset live, if it is).
        let r = rules.clone();
        if let Some(sets) = tokio::task::spawn_blocking(move || xdpfw_rules::load(&r).ok()).await?.map(|rs| set_paths(rs.set_files))
            && !sets.is_empty()
        {
            w.follow(&rules, sets);
            last = None;
        }
    }
    // On adoption the first check runs at once and applies the file if it differs from what is
    // live.
    let mut force = seen.is_none();
    // When the change was noticed (a SIGHUP, the end of a burst of events), and whether the
    // wake-up was the periodic check (which reads every file).
    let (mut trigger, mut periodic) = (Instant::now(), false);
    loop {
        let print = {
            let (r, s) = (rules.clone(), w.sets.clone());
            tokio::task::spawn_blocking(move || fingerprint(&r, &s, !periodic)).await?
        };
        stats.checks.fetch_add(1, Ordering::Relaxed);
        if force || last != Some(print) {
            stats.changes.fetch_add(1, Ordering::Relaxed);
            last = Some(print);
            let (_, sets) = applier.apply_since(&rules, &ctx.shutdown, trigger).await;
            if let Some(sets) = sets {
                let sets: Vec<PathBuf> = sets.into_iter().map(|p| std::path::absolute(&p).unwrap_or(p)).collect();
                if sets != w.sets {
                    w.follow(&rules, sets);
                    // The fingerprint did not cover these set files: the next wake-up re-checks
                    // (the applier finds the ruleset live and does nothing if it is).
                    last = None;
                }
            }
        }
        force = false;

        let deadline = tokio::time::sleep(poll);
        tokio::pin!(deadline);
        periodic = false;
        loop {
            tokio::select! {
                _ = ctx.shutdown.wait() => return Ok(()),
                _ = hup.changed() => { force = true; break; }
                _ = &mut deadline => { periodic = true; break; }
                ev = rx.recv() => {
                    let Some(ev) = ev else { anyhow::bail!("the file watcher stopped") };
                    if !w.relevant(&ev) {
                        continue;
                    }
                    if let Err(e) = &ev {
                        tracing::warn!("file watcher: {e}");
                    }
                    let start = Instant::now();
                    while start.elapsed() < DEBOUNCE_MAX {
                        tokio::select! {
                            _ = ctx.shutdown.wait() => return Ok(()),
                            more = tokio::time::timeout(DEBOUNCE, rx.recv()) => match more {
                                Ok(Some(_)) => continue,
                                _ => break,
                            },
                        }
                    }
                    break;
                }
            }
        }
        trigger = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_content_and_set_files() {
        let dir = std::env::temp_dir().join(format!("xdpfw-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (rules, set) = (dir.join("r.toml"), dir.join("s.txt"));
        std::fs::write(&rules, "default = \"pass\"\n").unwrap();
        std::fs::write(&set, "192.0.2.0/24\n").unwrap();
        let a = fingerprint(&rules, std::slice::from_ref(&set), true);
        assert_eq!(a, fingerprint(&rules, std::slice::from_ref(&set), false), "stable");
        std::fs::write(&set, "198.51.100.0/24\n").unwrap();
        assert_ne!(a, fingerprint(&rules, std::slice::from_ref(&set), true), "a set file change is a change");
        std::fs::remove_file(&rules).unwrap();
        let gone = fingerprint(&rules, std::slice::from_ref(&set), true);
        assert_ne!(a, gone, "a missing file is a change");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
