//! Reload history on disk: every attach and reload attempt, and a snapshot of every ruleset that
//! went live, so `rollback` can re-apply an earlier one and the last good ruleset outlives the
//! loader (and a reboot: `/var/lib/xdpfw`, unlike bpffs and /run, is persistent).

use std::{
    fs,
    io::Write,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{instance::ReloadTimes, rules::Ruleset};

pub fn history_root() -> PathBuf {
    std::env::var_os("XDPFW_HISTORY_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/xdpfw"))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// Seconds since the epoch.
    pub time: u64,
    /// "applied" or "failed".
    pub result: String,
    /// "attach", "reload" or "rollback".
    pub action: String,
    pub generation: Option<u64>,
    pub version: Option<String>,
    pub hash: Option<String>,
    pub source: PathBuf,
    /// Where the applied ruleset was copied, when it could be (see `snapshot`).
    pub snapshot: Option<PathBuf>,
    pub error: Option<String>,
    pub times: Option<ReloadTimes>,
}

impl Entry {
    /// A ruleset that went live as `generation`, with its snapshot (or why there is none).
    pub fn applied(
        action: &str,
        generation: u64,
        version: Option<String>,
        hash: &str,
        source: &Path,
        snapshot: std::result::Result<PathBuf, String>,
        times: Option<ReloadTimes>,
    ) -> Self {
        Self {
            time: crate::instance::now_secs(),
            result: "applied".into(),
            action: action.into(),
            generation: Some(generation),
            version,
            hash: Some(hash.to_string()),
            source: source.to_path_buf(),
            error: snapshot.as_ref().err().map(|why| format!("no snapshot: {why}")),
            snapshot: snapshot.ok(),
            times,
        }
    }
}

pub struct History {
    dir: PathBuf,
}

impl History {
    pub fn new(iface: &str) -> Self {
        Self { dir: history_root().join(iface) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn append(&self, entry: &Entry) -> Result<()> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let mut line = serde_json::to_vec(entry)?;
        line.push(b'\n');
        // One write of one line with O_APPEND: concurrent writers never interleave within it.
        let mut f = fs::OpenOptions::new().create(true).append(true).open(self.dir.join("history.jsonl"))?;
        f.write_all(&line)?;
        Ok(())
    }

    pub fn entries(&self) -> Result<Vec<Entry>> {
        let path = self.dir.join("history.jsonl");
        let Ok(text) = fs::read_to_string(&path) else { return Ok(Vec::new()) };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("corrupt line in {}", path.display())))
            .collect()
    }

    /// Copies the rules file and its set files under `snapshots/<hash>/`, keeping their relative
    /// layout so the copy loads the same. `None` (with the reason) when a set file lies outside
    /// the rules file's folder, where a copy could not keep the relative path.
    pub fn snapshot(&self, rs: &Ruleset) -> Result<std::result::Result<PathBuf, String>> {
        let dir = self.dir.join("snapshots").join(&rs.hash);
        let rules = dir.join("rules.toml");
        if rules.exists() {
            return Ok(Ok(rules));
        }
        for (written, _) in &rs.set_files {
            let p = Path::new(written);
            if p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
                return Ok(Err(format!("set file \"{written}\" is not inside the rules file's folder")));
            }
        }
        let tmp = self.dir.join("snapshots").join(format!(".{}.tmp", rs.hash));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp)?;
        fs::copy(&rs.path, tmp.join("rules.toml")).with_context(|| format!("copying {}", rs.path.display()))?;
        for (written, from) in &rs.set_files {
            let to = tmp.join(written);
            fs::create_dir_all(to.parent().expect("joined path has a parent"))?;
            fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
        }
        fs::rename(&tmp, &dir)?;
        Ok(Ok(rules))
    }

    /// The applied entries with a snapshot, newest first.
    pub fn applied(&self) -> Result<Vec<Entry>> {
        let mut v: Vec<Entry> = self.entries()?.into_iter().filter(|e| e.result == "applied" && e.snapshot.is_some()).collect();
        v.reverse();
        Ok(v)
    }

    /// The snapshot `back` applied rulesets before the newest one (1 = the previous one).
    pub fn rollback_target(&self, back: usize) -> Result<Entry> {
        let applied = self.applied()?;
        if back == 0 {
            bail!("rollback needs N >= 1");
        }
        match applied.get(back) {
            Some(e) => Ok(e.clone()),
            None => bail!(
                "there are only {} earlier applied rulesets in {} (asked for {back} back)",
                applied.len().saturating_sub(1),
                self.dir.display()
            ),
        }
    }
}
