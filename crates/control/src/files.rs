//! The one way this crate writes and locks files: atomic replacement, lock files that are never
//! unlinked while they may be held, and the wall clock in seconds.

use std::{
    fs::{self, File},
    io::Write,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::error::{ControlContext, Result, refuse};

/// Seconds since the epoch (0 if the clock is before it).
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Creates `dir` (and missing parents) as a private directory: owned by this user, mode 0700,
/// not a symlink. An existing one is checked: a symlink or a directory owned by someone else is
/// refused (a local user may have planted it), a wider mode is narrowed.
pub fn private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).ctx(|| format!("creating {}", dir.display())),
    }
    let meta = fs::symlink_metadata(dir).ctx(|| format!("inspecting {}", dir.display()))?;
    if !meta.file_type().is_dir() {
        refuse!("{} is not a directory (a symlink or a file is there); remove it", dir.display());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        refuse!("{} is owned by uid {}, not by uid {me}: refusing to keep state in it; remove it", dir.display(), meta.uid());
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).ctx(|| format!("making {} private (0700)", dir.display()))?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` atomically: a reader sees the old content or the new, never a
/// part. The temporary file is synced before the rename, so a crash cannot leave an empty file.
/// It is created exclusively (`O_EXCL`, never through a symlink) beside `path`, whose folder
/// should be private ([`private_dir`]).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    // A leftover of a killed process of the same pid: ours to remove (never followed).
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = File::options().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).ctx(|| format!("writing {}", path.display()));
    }
    fs::rename(&tmp, path).ctx(|| format!("replacing {}", path.display()))
}

/// [`atomic_write`] without the fsync: a reader sees the old content or the new, and a crash of
/// this process leaves one or the other (the page cache outlives it), but a crash of the
/// machine may leave an empty or partial file. For what a machine crash takes away anyway (the
/// runtime state beside the bpffs maps), or what is synced later ([`sync_path`]).
pub fn write_unsynced(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    private_dir(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let written = (|| {
        let mut f = File::options().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        f.write_all(bytes)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).ctx(|| format!("writing {}", path.display()));
    }
    fs::rename(&tmp, path).ctx(|| format!("replacing {}", path.display()))
}

/// fsync of a file or a folder already written (a folder: its entries, renames included).
pub fn sync_path(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).ctx(|| format!("syncing {}", path.display()))
}

/// Takes an exclusive `flock` on `path` (created if missing), waiting up to `wait`. The lock
/// goes with the returned file. Lock files are never unlinked: a process that removed one while
/// another waited on it would let a third lock a new file of the same name at the same time.
/// They live in a private folder (made so here) and are mode 0600, so no other user can open,
/// and so hold, them.
pub fn lock_file(path: &Path, wait: Duration, what: &str) -> Result<File> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ctx(|| format!("opening {}", path.display()))?;
    let meta = file.metadata().ctx(|| format!("inspecting {}", path.display()))?;
    if !meta.file_type().is_file() {
        refuse!("{} is not a regular file; remove it", path.display());
    }
    // Lock files made by earlier versions were 0644.
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(fs::Permissions::from_mode(0o600)).ctx(|| format!("making {} private", path.display()))?;
    }
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
