//! Set files parsed earlier in this process (issue 11): a long-lived process (the daemon, a
//! bench) that reloads a ruleset beside an unchanged 1M-line set file neither parses nor hashes
//! it again, and, when the file's metadata vouches for it, does not even read it.
//!
//! Two ways to recognise a set file seen before:
//! - *By text*: the file is read and compared byte for byte with the texts kept. Parsing is a
//!   pure function of the text, so an equal text gives the same prefixes (only texts that parsed
//!   without error are kept).
//! - *By metadata*, without reading it: after a read, the file's identity and change stamps
//!   (device, inode, size, mtime and ctime, from the open file before and after the read) are
//!   recorded with the text's digest, but only when the file's last change (ctime) is at least
//!   [`TRUST_AGE`] older than the moment the read began, and the stamps did not move during the
//!   read. A later load whose `stat` gives exactly the same stamps takes the kept text without
//!   reading it. Why this cannot serve stale content: any write(2), truncate or rename into place
//!   sets the inode's ctime to the current time (no system call sets ctime to a chosen value), and
//!   a file replaced by another one has another inode or another ctime. The age rule covers the
//!   clock's and the file system's timestamp granularity (a jiffy on ext4, xfs, btrfs, tmpfs;
//!   a second on older formats; two seconds for a FAT mtime): a change made right after our read
//!   within the same timestamp tick as the change before it would otherwise keep the stamps, so a
//!   file changed less than [`TRUST_AGE`] before a read is read again the next time. What it does
//!   not see: a file changed through a shared writable mmap (the kernel updates the timestamps at
//!   the first write fault after a writeback, not at every store), a file system that does not
//!   keep ctime (some network and FUSE ones), and the system clock set back by hand to exactly a
//!   file's earlier ctime. The daemon's periodic check reads the set files' content and drops a
//!   record the content contradicts ([`forget_file`]), so such a change is still seen within
//!   the check's interval.
//!
//! A short-lived `loader` command gains nothing from those two, but from a third, across
//! processes: what a large text parsed to, kept on disk by the text's digest
//! ([`keep_parsed_on_disk`]); such a command still reads and hashes the file.

use std::{
    fs::Metadata,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use ipnet::IpNet;

/// Texts below this size parse in well under a millisecond: not worth keeping.
pub(crate) const MIN_TEXT: usize = 64 * 1024;
/// Set files kept (the most recently stored last): a ruleset rarely has more large ones.
const ENTRIES: usize = 4;
/// How much older than a read a file's last change must be for its metadata to vouch for its
/// content afterwards (see the module's comment).
pub const TRUST_AGE: Duration = Duration::from_secs(2);

/// A set file's text, the prefixes it parsed to, and its SHA-256 (its part of the ruleset hash).
#[derive(Clone)]
pub(crate) struct Entry {
    pub text: Arc<str>,
    /// Shared with every ruleset whose set is this file alone (no inline prefixes).
    pub prefixes: Arc<Vec<IpNet>>,
    pub digest: [u8; 32],
}

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// A file's identity and change stamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub(crate) fn of(meta: &Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        meta.is_file().then(|| Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Whether the last change is at least [`TRUST_AGE`] before `read_start`.
    fn settled_before(&self, read_start: SystemTime) -> bool {
        let Ok(since_epoch) = read_start.duration_since(SystemTime::UNIX_EPOCH) else { return false };
        let Some(limit) = since_epoch.checked_sub(TRUST_AGE) else { return false };
        let (secs, nanos) = self.ctime;
        secs >= 0 && (Duration::new(secs as u64, nanos.clamp(0, 999_999_999) as u32) < limit)
    }
}

/// Stamps of files whose content is the text of the given digest.
static FILES: Mutex<Vec<(Stamp, [u8; 32])>> = Mutex::new(Vec::new());

static READ: AtomicU64 = AtomicU64::new(0);
static PARSED: AtomicU64 = AtomicU64::new(0);
static UNREAD: AtomicU64 = AtomicU64::new(0);

/// What this process did with large set files (at least 64 KiB) since it started: read from
/// disk, parsed (not found among the texts kept), taken from the cache by their metadata without
/// a read. A reload's share is the difference around its parse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetFileCounts {
    pub read: u64,
    pub parsed: u64,
    pub unread: u64,
}

/// The process's [`SetFileCounts`] so far.
pub fn set_file_counts() -> SetFileCounts {
    SetFileCounts { read: READ.load(Ordering::Relaxed), parsed: PARSED.load(Ordering::Relaxed), unread: UNREAD.load(Ordering::Relaxed) }
}

fn lock<T>(m: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The kept text equal to `text` (to share its allocation) and its prefixes.
pub(crate) fn lookup(text: &str) -> Option<Entry> {
    if text.len() < MIN_TEXT {
        return None;
    }
    let cache = lock(&CACHE);
    cache.iter().find(|e| e.text.len() == text.len() && *e.text == *text).cloned()
}

/// Keeps `text` and the prefixes it parsed to, dropping the oldest entry beyond [`ENTRIES`].
pub(crate) fn store(text: &Arc<str>, prefixes: Arc<Vec<IpNet>>, digest: [u8; 32]) {
    if text.len() < MIN_TEXT {
        return;
    }
    let mut cache = lock(&CACHE);
    cache.retain(|e| *e.text != **text);
    if cache.len() >= ENTRIES {
        cache.remove(0);
    }
    cache.push(Entry { text: text.clone(), prefixes, digest });
}

/// The folder where parsed large set files are kept for later processes (`None`: not kept);
/// see [`keep_parsed_on_disk`].
static DISK: Mutex<Option<PathBuf>> = Mutex::new(None);
/// Parsed set files kept on disk, the most recently used ones.
const DISK_ENTRIES: usize = 8;
/// The first bytes of a parsed set file on disk: the format, and the version of the parser
/// that wrote it (another version parses the text again).
const DISK_MAGIC: &[u8] = concat!("xdpfw-parsed-set-2 ", env!("CARGO_PKG_VERSION"), "\n").as_bytes();

/// Keeps the prefixes of large set files, once parsed, in `dir` (one file per text, named by
/// its SHA-256; the 8 most recently used), so that a later process given the same text (a
/// `loader reload` from the command line beside an unchanged 1M-line set file, a daemon's
/// start, a snapshot's blob) reads and hashes it but does not parse it again: parsing is a pure
/// function of the text. `dir` must be a folder only this user can write (the caller creates
/// it so, see `xdpfw_control`); what is read back is checked record by record, and a file that
/// does not check out is removed and the text parsed.
pub fn keep_parsed_on_disk(dir: PathBuf) {
    *lock(&DISK) = Some(dir);
}

fn disk_file(digest: &[u8; 32]) -> Option<PathBuf> {
    let dir = lock(&DISK).clone()?;
    Some(dir.join(digest.iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

/// The prefixes parsed from the text of `digest` by an earlier process, if kept on disk.
pub(crate) fn from_disk(digest: &[u8; 32]) -> Option<Vec<IpNet>> {
    let path = disk_file(digest)?;
    let limit = (DISK_MAGIC.len() + 40 + 18 * xdpfw_common::MAX_PREFIXES as usize) as u64;
    let bytes = crate::lang::read_bytes_bounded(&path, limit).ok()?;
    let parsed = decode(&bytes, digest);
    match &parsed {
        // Used now: the last to go.
        Some(_) => _ = std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(SystemTime::now())),
        None => _ = std::fs::remove_file(&path),
    }
    parsed
}

/// Keeps `prefixes`, parsed from the text of `digest`, on disk (if a folder is set), dropping
/// the least recently used files beyond [`DISK_ENTRIES`]. A failure keeps nothing, silently:
/// this is a cache.
pub(crate) fn to_disk(digest: &[u8; 32], prefixes: &[IpNet]) {
    let Some(path) = disk_file(digest) else { return };
    let Some(dir) = path.parent() else { return };
    let mut records = Vec::with_capacity(6 * prefixes.len());
    for p in prefixes {
        match p {
            IpNet::V4(n) => records.extend([4, n.prefix_len()].iter().chain(&n.network().octets())),
            IpNet::V6(n) => records.extend([6, n.prefix_len()].iter().chain(&n.network().octets())),
        }
    }
    let mut bytes = Vec::with_capacity(DISK_MAGIC.len() + 40 + records.len());
    bytes.extend_from_slice(DISK_MAGIC);
    bytes.extend_from_slice(digest);
    bytes.extend_from_slice(&checksum(&records).to_le_bytes());
    bytes.extend_from_slice(&records);
    // Written aside and renamed into place: a reader sees a whole file or none.
    let tmp = dir.join(format!(".{}.{}.tmp", std::process::id(), READ.load(Ordering::Relaxed)));
    let written = (|| -> std::io::Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::File::options().write(true).create_new(true).open(&tmp)?;
        f.write_all(&bytes)?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut files: Vec<(SystemTime, PathBuf)> = entries.flatten().filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
    if files.len() > DISK_ENTRIES {
        files.sort();
        for (_, old) in &files[..files.len() - DISK_ENTRIES] {
            let _ = std::fs::remove_file(old);
        }
    }
}

/// A checksum of a parsed set file's records, against damage (a torn write, a bad sector): the
/// folder is this user's alone, so no one picks its contents, and a SHA-256 of them would cost
/// as much as a quarter of the parse it saves on this machine.
fn checksum(records: &[u8]) -> u64 {
    let (words, rest) = records.as_chunks::<8>();
    let mut h = records.len() as u64;
    for w in words {
        h = (h ^ u64::from_le_bytes(*w)).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    for &b in rest {
        h = (h ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    h
}

/// The prefixes of a parsed set file's bytes: the magic, the text's digest (`digest`), the
/// records' checksum, the records. `None` unless all of it checks out and every record is a
/// prefix as the parser gives it.
fn decode(bytes: &[u8], digest: &[u8; 32]) -> Option<Vec<IpNet>> {
    let rest = bytes.strip_prefix(DISK_MAGIC)?.strip_prefix(&digest[..])?;
    let (sum, mut rest) = rest.split_first_chunk::<8>()?;
    if checksum(rest) != u64::from_le_bytes(*sum) {
        return None;
    }
    let mut out = Vec::with_capacity(rest.len() / 6);
    while let [family, len, tail @ ..] = rest {
        let (net, tail) = match family {
            4 => {
                let (a, tail) = tail.split_first_chunk::<4>()?;
                (IpNet::V4(ipnet::Ipv4Net::new((*a).into(), *len).ok()?), tail)
            }
            6 => {
                let (a, tail) = tail.split_first_chunk::<16>()?;
                (IpNet::V6(ipnet::Ipv6Net::new((*a).into(), *len).ok()?), tail)
            }
            _ => return None,
        };
        // As the parser gives them: no host bits.
        if net.addr() != net.network() {
            return None;
        }
        out.push(net);
        rest = tail;
    }
    rest.is_empty().then_some(out)
}

/// The stamps of the file at `path` now (following symlinks, as an open does).
fn stamp_at(path: &Path) -> Option<Stamp> {
    Stamp::of(&std::fs::metadata(path).ok()?)
}

/// The digest recorded for the file at `path`, if its stamps are exactly the recorded ones.
pub fn trusted_digest(path: &Path) -> Option<[u8; 32]> {
    let stamp = stamp_at(path)?;
    if stamp.size < MIN_TEXT as u64 {
        return None;
    }
    lock(&FILES).iter().find(|(s, _)| *s == stamp).map(|(_, d)| *d)
}

/// Before a read of the set file at `path`: the kept entry its metadata vouches for (see the
/// module's comment), if any. Counted as unread.
pub(crate) fn by_metadata(path: &Path) -> Option<Entry> {
    let digest = trusted_digest(path)?;
    let entry = lock(&CACHE).iter().find(|e| e.digest == digest).cloned()?;
    UNREAD.fetch_add(1, Ordering::Relaxed);
    Some(entry)
}

/// After a read of a set file that began at `read_start`, with the open file's stamps before
/// (`before`) and after (`after`) it, of a text of digest `digest`: records the stamps when they
/// may vouch for the text later (settled, unmoved, large), else forgets any record of the file.
pub(crate) fn note_read(before: Option<Stamp>, after: Option<Stamp>, read_start: SystemTime, len: usize, digest: [u8; 32], parsed: bool) {
    if len < MIN_TEXT {
        return;
    }
    READ.fetch_add(1, Ordering::Relaxed);
    if parsed {
        PARSED.fetch_add(1, Ordering::Relaxed);
    }
    let Some(stamp) = before else { return };
    let mut files = lock(&FILES);
    files.retain(|(s, _)| (s.dev, s.ino) != (stamp.dev, stamp.ino));
    if after == Some(stamp) && stamp.size == len as u64 && stamp.settled_before(read_start) {
        if files.len() >= 4 * ENTRIES {
            files.remove(0);
        }
        files.push((stamp, digest));
    }
}

/// Drops what is recorded for the file at `path`: its content was found to differ from the
/// recorded digest, so its metadata no longer vouches for it (the next load reads it).
pub fn forget_file(path: &Path) {
    if let Some(stamp) = stamp_at(path) {
        lock(&FILES).retain(|(s, _)| (s.dev, s.ino) != (stamp.dev, stamp.ino));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a file whose last change is at least TRUST_AGE before the read may be vouched for
    /// by its stamps later; a read that saw the stamps move records nothing.
    #[test]
    fn stamps_vouch_only_for_files_settled_before_the_read() {
        let now = SystemTime::now();
        let at = |t: SystemTime| {
            let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
            Stamp { dev: 1, ino: 2, size: MIN_TEXT as u64, mtime: (0, 0), ctime: (d.as_secs() as i64, d.subsec_nanos() as i64) }
        };
        assert!(at(now - TRUST_AGE - Duration::from_millis(10)).settled_before(now));
        assert!(!at(now - TRUST_AGE + Duration::from_millis(10)).settled_before(now));
        assert!(!at(now + Duration::from_secs(1)).settled_before(now), "a ctime in the future");
        let digest = [7; 32];
        let old = at(now - TRUST_AGE * 2);
        note_read(Some(old), Some(Stamp { ctime: (old.ctime.0, old.ctime.1 + 1), ..old }), now, MIN_TEXT, digest, true);
        assert!(!lock(&FILES).iter().any(|(s, _)| *s == old), "the stamps moved during the read");
        note_read(Some(old), Some(old), now, MIN_TEXT, digest, true);
        assert!(lock(&FILES).iter().any(|(s, d)| *s == old && *d == digest));
        let fresh = at(now);
        note_read(Some(fresh), Some(fresh), now, MIN_TEXT, digest, false);
        assert!(!lock(&FILES).iter().any(|(s, _)| (s.dev, s.ino) == (1, 2)), "a fresh change replaces the record with nothing");
    }

    /// A set file parsed again from the cache gives what a first parse gives, and a changed
    /// text (one line more, same length class) is parsed afresh.
    #[test]
    fn a_cached_set_file_parses_to_the_same_prefixes() {
        let dir = std::env::temp_dir().join(format!("xdpfw-setcache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines: String = (0..20_000u32).map(|i| format!("10.{}.{}.0/24\n", i >> 8 & 0xff, i & 0xff)).collect();
        std::fs::write(dir.join("rules.toml"), "default = \"pass\"\n[sets.s]\nfile = \"s.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@s\"]\n").unwrap();
        let load = |text: &str| {
            std::fs::write(dir.join("s.txt"), text).unwrap();
            crate::load(&dir.join("rules.toml")).unwrap()
        };
        let first = load(&lines);
        let again = load(&lines);
        assert_eq!(first.sets["s"], again.sets["s"]);
        assert_eq!(first.hash, again.hash);
        assert_eq!(first.sets["s"].len(), 20_000);
        let changed = load(&format!("{lines}192.0.2.1\n"));
        assert_eq!(changed.sets["s"].len(), 20_001);
        assert_eq!(changed.sets["s"][20_000], "192.0.2.1/32".parse().unwrap());
        // An error in a text never comes from (or goes into) the cache.
        std::fs::write(dir.join("s.txt"), format!("{lines}not-an-address\n")).unwrap();
        let e = crate::load(&dir.join("rules.toml")).unwrap_err();
        assert_eq!(e.location.line, 20_001, "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
