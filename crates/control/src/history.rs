//! Reload history on disk: every attach and reload attempt, and a snapshot of every ruleset that
//! went live, so `rollback` can re-apply an earlier one and the last good ruleset outlives the
//! loader (and a reboot: `/var/lib/xdpfw`, unlike bpffs and /run, is persistent).

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use xdpfw_rules::{Ruleset, setedit::SetJournal};

use crate::{
    error::{ControlContext, Result, refuse},
    files::{self, now_secs},
    instance::ReloadTimes,
};

/// The longest error text kept in one history entry.
pub const MAX_ERROR: usize = 4096;
/// The size past which `history.jsonl` is rotated.
pub const MAX_BYTES: u64 = 4 << 20;
/// How many entries a rotation keeps.
pub const KEEP_ENTRIES: usize = 1000;

/// The file beside a snapshot's `rules.toml` holding its set files' texts.
pub const SNAPSHOT_SETS: &str = "sets.json";
/// The file beside a snapshot's `rules.toml` holding the set journal applied to its texts (only
/// when it changed a set).
pub const SNAPSHOT_JOURNAL: &str = "journal.json";
/// The instance's set journal, in its history folder (durable: it outlives a detach and a
/// reboot, like the history).
pub const JOURNAL: &str = "set-journal.json";
/// The largest set journal read (about 40 bytes a prefix as JSON: `MAX_JOURNAL_PREFIXES`).
pub const MAX_JOURNAL_BYTES: u64 = 64 << 20;
/// Snapshots of `set` batches kept, the newest ones (see [`History::collect_snapshots`]).
pub const KEEP_SET_SNAPSHOTS: usize = 16;

#[derive(Serialize, Deserialize)]
struct SnapshotSet {
    /// The name the rules text gives the set file.
    file: String,
    /// The text, unless it is in `blob`.
    #[serde(default)]
    text: String,
    /// A large set file's text is stored once, in `snapshots/blobs/<its SHA-256>`, and shared by
    /// every snapshot that holds it: a reload that changes a port rule beside a 1M-line set
    /// then writes a few hundred bytes before its flip, not the set again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blob: Option<String>,
}

/// Set files at least this large go into a blob (see [`SnapshotSet::blob`]).
const BLOB_MIN: usize = 64 * 1024;

fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where parsed large set files are kept for later processes (see
/// `xdpfw_rules::keep_parsed_on_disk`): a private folder under the history root, so a `loader
/// reload` from the command line beside an unchanged 1M-line set file does not parse it again.
pub const PARSED_SETS: &str = "parsed-sets";

/// Turns on the keeping of parsed set files in [`PARSED_SETS`], once per process, when its
/// folder can be made private to this user (not for a user who cannot write the history root:
/// such a process parses as before).
fn keep_parsed_sets() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let root = history_root();
        let dir = root.join(PARSED_SETS);
        match files::private_dir(&root).and_then(|()| files::private_dir(&dir)) {
            Ok(()) => xdpfw_rules::keep_parsed_on_disk(dir),
            Err(e) => tracing::debug!("parsed set files are not kept on disk: {e}"),
        }
    });
}

/// Loads a rules file; a snapshot in the history (a `rules.toml` with a `sets.json` beside it)
/// is loaded from the texts it holds, exactly the bytes that went live, whatever has become of
/// the set files it was made from, with the set journal that was applied to them (its
/// `journal.json`): exactly the ruleset that went live, hash included.
pub fn load_rules(path: &Path, origin: xdpfw_rules::Origin) -> std::result::Result<Ruleset, xdpfw_rules::RulesError> {
    let mut rs = load_texts(path, origin)?;
    if let Some(j) = snapshot_journal(path)? {
        j.apply(&mut rs);
    }
    Ok(rs)
}

/// The set journal a snapshot was taken with (`None` for a rules file, or a snapshot of texts
/// alone).
pub fn snapshot_journal(path: &Path) -> std::result::Result<Option<SetJournal>, xdpfw_rules::RulesError> {
    let journal = path.with_file_name(SNAPSHOT_JOURNAL);
    if !(is_snapshot(path) && journal.exists()) {
        return Ok(None);
    }
    let error = |what: String| xdpfw_rules::RulesError {
        location: xdpfw_rules::Location { file: journal.clone(), line: 0, column: 0 },
        message: xdpfw_rules::cap_text(what, 4096),
    };
    let text = xdpfw_rules::read_bounded(&journal, MAX_JOURNAL_BYTES).map_err(|e| error(format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map(Some).map_err(|e| error(format!("not a set journal: {e}")))
}

/// Loads a rules file (or a snapshot's texts) with `journal` applied: what an operation of an
/// instance goes live with (the instance's own journal, see [`History::journal`]), whatever
/// journal a snapshot was taken with.
pub fn load_rules_with(path: &Path, origin: xdpfw_rules::Origin, journal: &SetJournal) -> std::result::Result<Ruleset, xdpfw_rules::RulesError> {
    let mut rs = load_texts(path, origin)?;
    for set in journal.apply(&mut rs) {
        tracing::warn!("{}: the set journal changes set \"{set}\", which this ruleset does not have: kept for a ruleset that has it", path.display());
    }
    Ok(rs)
}

/// A rules text and the texts of the files it names, by the names it gives them.
pub type RulesTexts = (String, Vec<(String, String)>);

/// The texts of the snapshot at `path` (its `rules.toml`), with each file `stands_in` names
/// replaced by an empty text, unread (a 1M-line set file's blob is not read): for a parse of
/// the rules alone. `None` when `path` is not a snapshot.
pub fn snapshot_texts_without(path: &Path, stands_in: &dyn Fn(&str) -> bool) -> Result<Option<RulesTexts>> {
    if !is_snapshot(path) {
        return Ok(None);
    }
    let text = xdpfw_rules::read_bounded(path, xdpfw_rules::MAX_RULES_TEXT).ctx(|| format!("reading {}", path.display()))?;
    let sets = path.with_file_name(SNAPSHOT_SETS);
    let json = fs::read(&sets).ctx(|| format!("reading {}", sets.display()))?;
    let given: Vec<SnapshotSet> = serde_json::from_slice(&json).map_err(|e| crate::error::ControlError::Refused(format!("{}: not a snapshot's set files: {e}", sets.display())))?;
    let blobs = sets.parent().and_then(Path::parent).map(|d| d.join("blobs")).unwrap_or_default();
    let mut out = Vec::new();
    for s in given {
        let text = match s.blob {
            _ if stands_in(&s.file) => String::new(),
            None => s.text,
            Some(b) if b.len() == 64 && b.bytes().all(|c| c.is_ascii_hexdigit()) => {
                xdpfw_rules::read_bounded(&blobs.join(&b), xdpfw_rules::MAX_SET_FILE).ctx(|| format!("reading the text of {}", s.file))?
            }
            Some(_) => return Err(crate::error::ControlError::Refused(format!("{}: a blob that is not a SHA-256", sets.display()))),
        };
        out.push((s.file, text));
    }
    Ok(Some((text, out)))
}

fn is_snapshot(path: &Path) -> bool {
    path.starts_with(history_root()) && path.file_name().is_some_and(|n| n == "rules.toml") && path.with_file_name(SNAPSHOT_SETS).exists()
}

/// The texts of a rules file or a snapshot, parsed (no journal applied).
fn load_texts(path: &Path, origin: xdpfw_rules::Origin) -> std::result::Result<Ruleset, xdpfw_rules::RulesError> {
    keep_parsed_sets();
    let sets = path.with_file_name(SNAPSHOT_SETS);
    if !is_snapshot(path) {
        return xdpfw_rules::load_from(path, origin);
    }
    let error = |what: String| xdpfw_rules::RulesError {
        location: xdpfw_rules::Location { file: sets.clone(), line: 0, column: 0 },
        message: xdpfw_rules::cap_text(what, 4096),
    };
    let text = xdpfw_rules::read_bounded(path, xdpfw_rules::MAX_RULES_TEXT).map_err(|e| error(format!("cannot read {}: {e}", path.display())))?;
    let json = fs::read(&sets).map_err(|e| error(format!("cannot read: {e}")))?;
    let given: Vec<SnapshotSet> = serde_json::from_slice(&json).map_err(|e| error(format!("not a snapshot's set files: {e}")))?;
    let blobs = sets.parent().and_then(Path::parent).map(|d| d.join("blobs")).unwrap_or_default();
    let given = given
        .into_iter()
        .map(|s| match s.blob {
            None => Ok((s.file, s.text)),
            // Only a digest names a blob: never a path out of the blobs folder.
            Some(b) if b.len() == 64 && b.bytes().all(|c| c.is_ascii_hexdigit()) => {
                let blob = blobs.join(&b);
                let text = xdpfw_rules::read_bounded(&blob, xdpfw_rules::MAX_SET_FILE).map_err(|e| error(format!("cannot read the text of {} at {}: {e}", s.file, blob.display())))?;
                Ok((s.file, text))
            }
            Some(b) => Err(error(format!("\"{}\" is not the SHA-256 of a set file", xdpfw_rules::cap_text(b, 80)))),
        })
        .collect::<std::result::Result<Vec<(String, String)>, _>>()?;
    xdpfw_rules::parse_with_sets(path, &text, &given)
}

pub fn history_root() -> PathBuf {
    std::env::var_os("XDPFW_HISTORY_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/xdpfw"))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    /// Seconds since the epoch.
    pub time: u64,
    pub result: Outcome,
    pub action: Operation,
    pub generation: Option<u64>,
    pub version: Option<String>,
    pub hash: Option<String>,
    pub source: PathBuf,
    /// Where the applied ruleset was copied, when it could be (see `snapshot`).
    pub snapshot: Option<PathBuf>,
    pub error: Option<String>,
    pub times: Option<ReloadTimes>,
}

/// Whether an attempt went live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Applied,
    Failed,
}

/// What put a ruleset in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Attach,
    Reload,
    Rollback,
    /// An incremental change of a set (`loader set add|del|replace`).
    Set,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Applied => "applied",
            Self::Failed => "failed",
        })
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Attach => "attach",
            Self::Reload => "reload",
            Self::Rollback => "rollback",
            Self::Set => "set",
        })
    }
}

impl Entry {
    /// A ruleset that went live as `generation`, with its snapshot (or why there is none).
    pub fn applied(
        action: Operation,
        generation: u64,
        version: Option<String>,
        hash: &str,
        source: &Path,
        snapshot: std::result::Result<PathBuf, String>,
        times: Option<ReloadTimes>,
    ) -> Self {
        Self {
            time: now_secs(),
            result: Outcome::Applied,
            action,
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

/// A snapshot written before a flip and made durable after it (see [`History::stage_snapshot`]).
pub struct StagedSnapshot<'a> {
    history: &'a History,
    rs: &'a Ruleset,
    rules: PathBuf,
    state: Staged,
}

enum Staged {
    /// There was one already: checked by `finish`.
    Existing,
    /// Written unsynced: these paths are synced by `finish`.
    Written(Vec<PathBuf>),
    Failed(String),
}

impl StagedSnapshot<'_> {
    /// Makes the snapshot durable: syncs what was written, or checks that an existing snapshot
    /// loads to the ruleset's hash (replacing it, synced, if not). The snapshot's path, or why
    /// there is none.
    pub fn finish(self) -> std::result::Result<PathBuf, String> {
        let rules = self.rules;
        match self.state {
            Staged::Failed(e) => Err(e),
            Staged::Written(paths) => {
                for p in &paths {
                    files::sync_path(p).map_err(|e| e.to_string())?;
                }
                Ok(rules)
            }
            Staged::Existing => {
                if load_rules(&rules, xdpfw_rules::Origin::Local).is_ok_and(|old| old.hash == self.rs.hash) {
                    return Ok(rules);
                }
                self.history.write_snapshot(self.rs, true).map(|_| rules).map_err(|e| e.to_string())
            }
        }
    }
}

impl History {
    /// The history of `inst`: `<root>/<namespace's stable name>/<interface name>` (see
    /// [`crate::instance::Netns::stable_name`]): the namespace inode and the ifindex that key
    /// the instance's runtime state change with every reboot, the names do not.
    pub fn new(inst: &crate::Instance) -> Self {
        Self { dir: history_root().join(inst.netns.stable_name()).join(&inst.iface) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The instance's set journal (empty when it has none): the changes of `loader set`, which
    /// every ruleset this instance loads gets on top of its texts.
    pub fn journal(&self) -> Result<SetJournal> {
        let path = self.dir.join(JOURNAL);
        let text = match xdpfw_rules::read_bounded(&path, MAX_JOURNAL_BYTES) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SetJournal::default()),
            Err(e) => return Err(e).ctx(|| format!("reading the set journal {}", path.display())),
        };
        serde_json::from_str(&text).map_err(|e| crate::error::ControlError::Refused(format!("{}: not a set journal ({e}); move it away to drop the set changes it holds", path.display())))
    }

    /// Replaces the set journal, synced: a `set` change is durable before it goes live.
    pub fn store_journal(&self, journal: &SetJournal) -> Result<()> {
        self.ensure_dir()?;
        let path = self.dir.join(JOURNAL);
        if journal.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).ctx(|| format!("removing {}", path.display())),
                _ => Ok(()),
            };
        }
        let json = serde_json::to_vec(journal).ctx(|| "serializing the set journal".into())?;
        files::atomic_write(&path, &json)
    }

    /// The history folder, created (or checked) root-only, like the root it is in: error texts
    /// and snapshots are the operator's business alone.
    fn ensure_dir(&self) -> Result<()> {
        let root = history_root();
        let Ok(below) = self.dir.strip_prefix(&root) else {
            // Not under the root (a test's folder): its parent and itself.
            if let Some(parent) = self.dir.parent() {
                files::private_dir(parent)?;
            }
            return files::private_dir(&self.dir);
        };
        files::private_dir(&root)?;
        // Every folder from the root down to ours.
        let mut dir = root.clone();
        for c in below.components() {
            dir.push(c);
            files::private_dir(&dir)?;
        }
        Ok(())
    }

    /// Appends one entry (its error text capped to [`MAX_ERROR`]), then keeps the file bounded:
    /// past [`MAX_BYTES`] it is rewritten with the newest [`KEEP_ENTRIES`] entries.
    pub fn append(&self, entry: &Entry) -> Result<()> {
        self.ensure_dir()?;
        let mut entry = entry.clone();
        entry.error = entry.error.map(|e| xdpfw_rules::cap_text(e, MAX_ERROR));
        let mut line = serde_json::to_vec(&entry).ctx(|| "serializing a history entry".into())?;
        line.push(b'\n');
        let path = self.dir.join("history.jsonl");
        // Appends and the rotation hold this lock, so a rotation never drops a concurrent line.
        let _lock = files::lock_file(&self.dir.join("history.lock"), Duration::from_secs(10), "the history is being rotated")?;
        // One write of one line with O_APPEND: concurrent writers never interleave within it.
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        f.write_all(&line).ctx(|| format!("appending to {}", path.display()))?;
        let len = f.metadata().map_or(0, |m| m.len());
        drop(f);
        if len > MAX_BYTES {
            self.rotate(&path)?;
        }
        Ok(())
    }

    /// Keeps the newest [`KEEP_ENTRIES`] lines (at most half of [`MAX_BYTES`]).
    fn rotate(&self, path: &Path) -> Result<()> {
        let bytes = fs::read(path).ctx(|| format!("reading {}", path.display()))?;
        let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        let mut keep = Vec::new();
        let mut size = 0u64;
        for line in lines.iter().rev().take(KEEP_ENTRIES) {
            size += line.len() as u64 + 1;
            if size > MAX_BYTES / 2 {
                break;
            }
            keep.push(*line);
        }
        keep.reverse();
        let mut out = Vec::with_capacity(size as usize);
        for line in keep {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        files::atomic_write(path, &out)
    }

    /// Every entry, oldest first. A line that does not parse (a write cut short by a full disk
    /// or a crash, an edit by hand) is skipped with a warning: one bad line must not take the
    /// history, rollback and `attach --last-good` with it.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let path = self.dir.join("history.jsonl");
        let Ok(bytes) = fs::read(&path) else { return Ok(Vec::new()) };
        let mut entries = Vec::new();
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice(line) {
                Ok(e) => entries.push(e),
                Err(e) => tracing::warn!("{}:{}: skipping a corrupt history line: {e}", path.display(), n + 1),
            }
        }
        Ok(entries)
    }

    /// Stores exactly the bytes `rs` was parsed from (its [`xdpfw_rules::Sources`]) under
    /// `snapshots/<hash>/`: `rules.toml` and `sets.json` (each set file's text by the name the
    /// rules use for it), wherever the set files lived. [`load_rules`] parses it back to the same
    /// ruleset and hash without reading any other file. An existing snapshot is kept only if it
    /// loads to the same hash (one copied from files by earlier versions may not).
    pub fn snapshot(&self, rs: &Ruleset) -> Result<std::result::Result<PathBuf, String>> {
        let staged = self.stage_snapshot(rs);
        Ok(staged.finish())
    }

    /// The first half of [`Self::snapshot`], for the moment before a flip: writes the snapshot
    /// if there is none (its blobs, `rules.toml` and `sets.json`, without fsync), and leaves the
    /// rest to [`StagedSnapshot::finish`] after the flip: the fsyncs, and the check that an
    /// existing snapshot loads to the same hash (which reads its blobs). A reload then writes a
    /// few kilobytes before its flip, and syncs them before the history names them.
    pub fn stage_snapshot<'a>(&'a self, rs: &'a Ruleset) -> StagedSnapshot<'a> {
        let dir = self.dir.join("snapshots").join(&rs.hash);
        let rules = dir.join("rules.toml");
        let state = if rules.exists() && dir.join(SNAPSHOT_SETS).exists() {
            Staged::Existing
        } else {
            match self.write_snapshot(rs, false) {
                Ok(written) => Staged::Written(written),
                Err(e) => Staged::Failed(e.to_string()),
            }
        };
        StagedSnapshot { history: self, rs, rules, state }
    }

    /// Writes the snapshot of `rs` (replacing a partial one), synced or not (see
    /// [`Self::stage_snapshot`]). Returns what is to be synced.
    fn write_snapshot(&self, rs: &Ruleset, sync: bool) -> Result<Vec<PathBuf>> {
        let dir = self.dir.join("snapshots").join(&rs.hash);
        if fs::symlink_metadata(&dir).is_ok() {
            fs::remove_dir_all(&dir).ctx(|| format!("removing the stale snapshot {}", dir.display()))?;
        }
        self.ensure_dir()?;
        let snapshots = self.dir.join("snapshots");
        files::private_dir(&snapshots)?;
        let tmp = snapshots.join(format!(".{}.{}.tmp", rs.hash, std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let mut blobs = Vec::new();
        let sets: Vec<SnapshotSet> = rs
            .sources
            .sets
            .iter()
            .map(|(file, text)| match rs.sources.set_digests.iter().find(|(f, _)| f == file) {
                Some((_, digest)) if text.len() >= BLOB_MIN => {
                    blobs.push((hex(digest), text.clone()));
                    SnapshotSet { file: file.clone(), text: String::new(), blob: Some(hex(digest)) }
                }
                _ => SnapshotSet { file: file.clone(), text: text.to_string(), blob: None },
            })
            .collect();
        let write = |path: &Path, bytes: &[u8]| if sync { files::atomic_write(path, bytes) } else { files::write_unsynced(path, bytes) };
        let mut to_sync = Vec::new();
        let written = (|| -> Result<()> {
            // Each blob is written once, before any snapshot names it.
            let blob_dir = snapshots.join("blobs");
            for (name, text) in &blobs {
                let path = blob_dir.join(name);
                to_sync.push(path.clone());
                if fs::metadata(&path).is_ok_and(|m| m.len() == text.len() as u64) {
                    continue;
                }
                files::private_dir(&blob_dir)?;
                write(&path, text.as_bytes())?;
            }
            if !blobs.is_empty() {
                to_sync.push(blob_dir);
            }
            files::private_dir(&tmp)?;
            write(&tmp.join("rules.toml"), rs.sources.rules.as_bytes())?;
            let json = serde_json::to_vec(&sets).ctx(|| "serializing the set files".into())?;
            write(&tmp.join(SNAPSHOT_SETS), &json)?;
            if let Some(journal) = &rs.sources.journal {
                let json = serde_json::to_vec(&**journal).ctx(|| "serializing the set journal".into())?;
                write(&tmp.join(SNAPSHOT_JOURNAL), &json)?;
                to_sync.push(dir.join(SNAPSHOT_JOURNAL));
            }
            fs::rename(&tmp, &dir).ctx(|| format!("renaming {}", tmp.display()))?;
            to_sync.extend([dir.join("rules.toml"), dir.join(SNAPSHOT_SETS), dir.clone(), snapshots.clone()]);
            Ok(())
        })();
        match written {
            Ok(()) => Ok(to_sync),
            Err(e) => {
                // No half copy left behind to take a full disk's last bytes.
                let _ = fs::remove_dir_all(&tmp);
                if dir.join(SNAPSHOT_SETS).exists() {
                    // Another process stored the same snapshot meanwhile.
                    return Ok(Vec::new());
                }
                Err(e)
            }
        }
    }
    /// The snapshot of the texts of snapshot `from` with `journal` applied, named `to` (their
    /// hash): what a `set` batch on the delta path goes live with. The texts' files are copied
    /// (a set file's text is in a blob both share) and the journal written beside them, before
    /// the flip and unsynced; [`Self::sync_snapshot`] makes it durable after the flip. A
    /// snapshot of that name with the same journal is taken as it is (its name is its hash).
    pub fn derive_snapshot(&self, from: &str, to: &str, journal: &SetJournal) -> Result<PathBuf> {
        let snapshots = self.dir.join("snapshots");
        let (src, dir) = (snapshots.join(from), snapshots.join(to));
        let json = serde_json::to_vec(journal).ctx(|| "serializing the set journal".into())?;
        let rules = dir.join("rules.toml");
        if rules.exists() && dir.join(SNAPSHOT_SETS).exists() && fs::read(dir.join(SNAPSHOT_JOURNAL)).is_ok_and(|j| j == json) {
            return Ok(rules);
        }
        let tmp = snapshots.join(format!(".{to}.{}.tmp", std::process::id()));
        let written = (|| -> Result<()> {
            let _ = fs::remove_dir_all(&tmp);
            files::private_dir(&tmp)?;
            for name in ["rules.toml", SNAPSHOT_SETS] {
                let bytes = fs::read(src.join(name)).ctx(|| format!("reading {}", src.join(name).display()))?;
                files::write_unsynced(&tmp.join(name), &bytes)?;
            }
            files::write_unsynced(&tmp.join(SNAPSHOT_JOURNAL), &json)?;
            if fs::symlink_metadata(&dir).is_ok() {
                fs::remove_dir_all(&dir).ctx(|| format!("removing the stale snapshot {}", dir.display()))?;
            }
            fs::rename(&tmp, &dir).ctx(|| format!("renaming {}", tmp.display()))
        })();
        if written.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        written.map(|()| rules)
    }

    /// Removes the snapshots nothing needs any more, and the blobs no snapshot names: those of
    /// rulesets that are neither `live` nor named by an applied entry of the history, except
    /// that of `set` entries only the newest [`KEEP_SET_SNAPSHOTS`] count. Every `set` batch
    /// writes a snapshot with the whole set journal in it, so without this a stream of bans
    /// (fail2ban, CrowdSec) would fill the disk with copies of a growing journal; a rollback
    /// targets reloads, not set batches, and keeps them all (as far as the rotated history
    /// goes). Call with the instance's lock held: every writer of snapshots holds it, so none is
    /// half-written. Returns how many snapshots went.
    pub fn collect_snapshots(&self, live: &str) -> Result<usize> {
        let snapshots = self.dir.join("snapshots");
        let Ok(dir) = fs::read_dir(&snapshots) else { return Ok(0) };
        let (names, partial): (Vec<String>, Vec<String>) = dir.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| n != "blobs").partition(|n| !n.starts_with('.'));
        // Half-written snapshots of a process that died (no writer runs: the lock is held).
        for name in partial.iter().filter(|n| n.ends_with(".tmp")) {
            let _ = fs::remove_dir_all(snapshots.join(name));
        }
        if names.len() <= KEEP_SET_SNAPSHOTS {
            return Ok(0);
        }
        let mut keep = std::collections::HashSet::from([live.to_string()]);
        let mut sets = 0;
        for e in self.entries()?.iter().rev().filter(|e| e.result == Outcome::Applied) {
            let Some(hash) = &e.hash else { continue };
            if e.action == Operation::Set {
                if sets == KEEP_SET_SNAPSHOTS {
                    continue;
                }
                sets += 1;
            }
            keep.insert(hash.clone());
        }
        let mut removed = 0;
        for name in names.iter().filter(|n| !keep.contains(*n)) {
            fs::remove_dir_all(snapshots.join(name)).ctx(|| format!("removing the snapshot {name}"))?;
            removed += 1;
        }
        if removed > 0 {
            let mut named = std::collections::HashSet::new();
            for name in names.iter().filter(|n| keep.contains(*n)) {
                let Ok(bytes) = fs::read(snapshots.join(name).join(SNAPSHOT_SETS)) else { continue };
                // A snapshot whose sets cannot be read keeps every blob.
                let Ok(sets) = serde_json::from_slice::<Vec<SnapshotSet>>(&bytes) else { return Ok(removed) };
                named.extend(sets.into_iter().filter_map(|s| s.blob));
            }
            if let Ok(blobs) = fs::read_dir(snapshots.join("blobs")) {
                for b in blobs.flatten().filter(|b| !named.contains(&*b.file_name().to_string_lossy())) {
                    fs::remove_file(b.path()).ctx(|| format!("removing the blob {}", b.path().display()))?;
                }
            }
        }
        Ok(removed)
    }

    /// Makes a snapshot [`Self::derive_snapshot`] wrote durable.
    pub fn sync_snapshot(&self, hash: &str) -> Result<()> {
        let snapshots = self.dir.join("snapshots");
        let dir = snapshots.join(hash);
        for name in ["rules.toml", SNAPSHOT_SETS, SNAPSHOT_JOURNAL] {
            files::sync_path(&dir.join(name))?;
        }
        files::sync_path(&dir)?;
        files::sync_path(&snapshots)
    }

    /// The applied entries with a snapshot (still there: see [`Self::collect_snapshots`]),
    /// newest first.
    pub fn applied(&self) -> Result<Vec<Entry>> {
        let mut v: Vec<Entry> = self.entries()?.into_iter().filter(|e| e.result == Outcome::Applied && e.snapshot.as_ref().is_some_and(|s| s.exists())).collect();
        v.reverse();
        Ok(v)
    }

    /// The snapshot `back` applied rulesets before the newest one (1 = the previous one).
    pub fn rollback_target(&self, back: usize) -> Result<Entry> {
        // A rollback changes the rules, not the sets: a `set` entry is the rules before it with
        // the journal as it was, and every operation applies the journal as it is now.
        let applied: Vec<Entry> = self.applied()?.into_iter().filter(|e| e.action != Operation::Set).collect();
        if back == 0 {
            refuse!("rollback needs N >= 1");
        }
        match applied.get(back) {
            Some(e) => Ok(e.clone()),
            None => refuse!(
                "there are only {} earlier applied rulesets in {} (asked for {back} back)",
                applied.len().saturating_sub(1),
                self.dir.display()
            ),
        }
    }

    /// The newest applied ruleset (with a snapshot) whose version label is `target`, or whose
    /// hash starts with `target` (at least 6 characters). Refused when nothing matches or a hash
    /// prefix names several rulesets.
    pub fn find(&self, target: &str) -> Result<Entry> {
        let applied = self.applied()?;
        if let Some(e) = applied.iter().find(|e| e.version.as_deref() == Some(target)) {
            return Ok(e.clone());
        }
        if target.len() >= 6 && target.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut hashes: Vec<&str> = applied.iter().filter_map(|e| e.hash.as_deref()).filter(|h| h.starts_with(target)).collect();
            hashes.sort_unstable();
            hashes.dedup();
            match hashes.as_slice() {
                [one] => return Ok(applied.iter().find(|e| e.hash.as_deref() == Some(*one)).cloned().unwrap_or_else(|| unreachable!())),
                [] => {}
                many => refuse!("\"{target}\" is the start of {} ruleset hashes in {}; give more of it", many.len(), self.dir.display()),
            }
        }
        refuse!(
            "no applied ruleset with version \"{}\" or a hash starting with it in {} (`loader status --history` lists them)",
            target.escape_debug(),
            self.dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The history root of this binary's tests (snapshots load their set files from under it),
    /// set once for all of them.
    fn test_root() -> PathBuf {
        static ONCE: std::sync::Once = std::sync::Once::new();
        let root = std::env::temp_dir().join(format!("xdpfw-history-tests-{}", std::process::id()));
        // SAFETY: set once, before any test of this binary reads the environment.
        ONCE.call_once(|| unsafe { std::env::set_var("XDPFW_HISTORY_ROOT", &root) });
        root
    }

    /// A large set file goes into one blob shared by every snapshot holding it; snapshots load
    /// back to their hash; a blob name that is not a digest is refused.
    #[test]
    fn large_set_files_are_stored_once_by_digest() {
        let root = test_root().join("blobs");
        let history = History { dir: root.join("eth9") };
        let src = root.join("src");
        fs::create_dir_all(&src).unwrap();
        let lines: String = (0..10_000u32).map(|i| format!("10.{}.{}.0/24\n", i >> 8 & 0xff, i & 0xff)).collect();
        fs::write(src.join("big.txt"), &lines).unwrap();
        fs::write(src.join("small.txt"), "192.0.2.1\n").unwrap();
        let rules = |port: u16| {
            fs::write(
                src.join("rules.toml"),
                format!("default = \"pass\"\n[sets.big]\nfile = \"big.txt\"\n[sets.small]\nfile = \"small.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@big\", \"@small\"]\n[[rule]]\naction = \"drop\"\nproto = \"tcp\"\ndport = {port}\n"),
            )
            .unwrap();
            xdpfw_rules::load(&src.join("rules.toml")).unwrap()
        };
        let (a, b) = (rules(22), rules(23));
        let (snap_a, snap_b) = (history.snapshot(&a).unwrap().unwrap(), history.snapshot(&b).unwrap().unwrap());
        assert_ne!(snap_a, snap_b);
        let blobs: Vec<_> = fs::read_dir(history.dir().join("snapshots/blobs")).unwrap().flatten().collect();
        assert_eq!(blobs.len(), 1, "one blob for the big set, shared");
        let json = fs::read_to_string(snap_a.with_file_name(SNAPSHOT_SETS)).unwrap();
        assert!(json.len() < 1000 && json.contains("192.0.2.1"), "the small set inline, the big one by digest: {json}");
        fs::remove_dir_all(&src).unwrap();
        for (snap, rs) in [(&snap_a, &a), (&snap_b, &b)] {
            let back = load_rules(snap, xdpfw_rules::Origin::Local).unwrap();
            assert_eq!((back.hash.as_str(), back.sets["big"].len()), (rs.hash.as_str(), 10_000));
        }
        let bad = json.replacen("\"blob\":\"", "\"blob\":\"../", 1);
        fs::write(snap_a.with_file_name(SNAPSHOT_SETS), bad).unwrap();
        let e = load_rules(&snap_a, xdpfw_rules::Origin::Local).unwrap_err();
        assert!(e.message.contains("not the SHA-256"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    /// Old `set` snapshots go (all but the newest `KEEP_SET_SNAPSHOTS`), with the blobs only
    /// they named and half-written snapshots; the live one, every reload's and the blobs still
    /// named stay; entries whose snapshot went are no longer offered.
    #[test]
    fn old_set_snapshots_and_their_blobs_are_collected() {
        let root = test_root().join("gc");
        let history = History { dir: root.join("eth8") };
        let src = root.join("src");
        fs::create_dir_all(&src).unwrap();
        // Rulesets over a big set file (a blob): `n` selects the set's content and a port.
        let ruleset = |n: u32| {
            let lines: String = (0..8_000u32).map(|i| format!("10.{}.{}.{}\n", n & 0xff, i >> 8, i & 0xff)).collect();
            fs::write(src.join("big.txt"), &lines).unwrap();
            fs::write(src.join("rules.toml"), format!("default = \"pass\"\n[sets.big]\nfile = \"big.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@big\"]\nproto = \"tcp\"\ndport = {}\n", 1000 + n)).unwrap();
            xdpfw_rules::load(&src.join("rules.toml")).unwrap()
        };
        let mut hashes = Vec::new();
        for n in 0..40u32 {
            let rs = ruleset(n);
            let snap = history.snapshot(&rs).unwrap().unwrap();
            // Two reloads, the rest set batches (the last one live).
            let op = if n % 20 == 0 { Operation::Reload } else { Operation::Set };
            history.append(&Entry::applied(op, u64::from(n) + 1, None, &rs.hash, &src.join("rules.toml"), Ok(snap), None)).unwrap();
            hashes.push((op, rs.hash.clone()));
        }
        let snapshots = history.dir().join("snapshots");
        fs::create_dir_all(snapshots.join(".dead.123.tmp")).unwrap();
        let live = &hashes.last().unwrap().1;
        let removed = history.collect_snapshots(live).unwrap();
        let left: std::collections::BTreeSet<String> = fs::read_dir(&snapshots).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).filter(|n| n != "blobs").collect();
        let sets: Vec<&String> = hashes.iter().filter(|(op, _)| *op == Operation::Set).map(|(_, h)| h).collect();
        let want: std::collections::BTreeSet<String> =
            hashes.iter().filter(|(op, _)| *op == Operation::Reload).map(|(_, h)| h.clone()).chain(sets[sets.len() - KEEP_SET_SNAPSHOTS..].iter().map(|h| (*h).clone())).collect();
        assert_eq!(left, want, "the reloads' and the newest set batches' snapshots, nothing half-written");
        assert_eq!(removed, 40 - want.len());
        let blobs = fs::read_dir(snapshots.join("blobs")).unwrap().count();
        assert_eq!(blobs, want.len(), "one blob per snapshot left (each set's content differs)");
        for h in &want {
            let back = load_rules(&snapshots.join(h).join("rules.toml"), xdpfw_rules::Origin::Local).unwrap();
            assert_eq!(&back.hash, h, "a kept snapshot still loads");
        }
        assert_eq!(history.applied().unwrap().len(), want.len(), "entries whose snapshot went are not offered");
        // Nothing more to collect the second time.
        assert_eq!(history.collect_snapshots(live).unwrap(), 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn entries_are_capped_and_the_file_is_rotated() {
        let root = std::env::temp_dir().join(format!("xdpfw-history-test-{}", std::process::id()));
        let history = History { dir: root.join("eth9") };
        let entry = |i: usize| Entry {
            time: i as u64,
            result: Outcome::Failed,
            action: Operation::Reload,
            generation: None,
            version: None,
            hash: None,
            source: PathBuf::from("fetched.toml"),
            snapshot: None,
            error: Some(format!("{i}: {}", "é".repeat(1 << 20))),
            times: None,
        };
        for i in 0..2000 {
            history.append(&entry(i)).unwrap();
        }
        let path = history.dir().join("history.jsonl");
        let len = fs::metadata(&path).unwrap().len();
        assert!(len <= MAX_BYTES + 2 * MAX_ERROR as u64, "{len} bytes");
        let entries = history.entries().unwrap();
        assert!(!entries.is_empty() && entries.len() <= KEEP_ENTRIES, "{}", entries.len());
        assert_eq!(entries.last().unwrap().time, 1999, "the newest entries are kept");
        assert!(entries.iter().all(|e| e.error.as_ref().unwrap().len() <= MAX_ERROR + 40));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
        fs::remove_dir_all(&root).unwrap();
    }
}
