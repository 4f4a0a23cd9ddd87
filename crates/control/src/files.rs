//! The one way this crate writes and locks files: atomic replacement, lock files that are never
//! unlinked while they may be held, and the wall clock in seconds.

use std::{
    fs::{self, File},
    io::Write,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::error::{ControlContext, Result, refuse};

/// Seconds since the epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Replaces `path` with `bytes` atomically: a reader sees the old content or the new, never a
/// part. The temporary file is synced before the rename, so a crash cannot leave an empty file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = File::options().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).ctx(|| format!("writing {}", path.display()));
    }
    fs::rename(&tmp, path).ctx(|| format!("replacing {}", path.display()))
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting up to `wait`. The lock
/// goes with the returned file. Lock files are never unlinked: a process that removed one while
/// another waited on it would let a third lock a new file of the same name at the same time.
pub fn lock_file(path: &Path, wait: Duration, what: &str) -> Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("opening {}", path.display()))?;
    // A deadline beyond what Instant can hold means "wait as long as it takes".
    let deadline = Instant::now().checked_add(wait);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(_) if deadline.is_none_or(|d| Instant::now() < d) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => refuse!("{what} (lock {} held for more than {wait:?})", path.display()),
        }
    }
}
