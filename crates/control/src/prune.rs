//! Instances whose network namespace is gone.
//!
//! Deleting a namespace (`ip netns del`, a container stopping) destroys its veth ends and with
//! them the XDP attachment, but not the pins: the program and its maps (up to hundreds of MiB
//! for a large set) stay in kernel memory for as long as `/sys/fs/bpf/xdpfw/<key>` exists, and
//! nothing else will ever remove them, since no command can name an interface of a namespace
//! that no longer exists. `loader list` reports them and `loader prune` removes them.
//!
//! A namespace is alive while anything can still reach it: a task (any thread: a thread may
//! have entered another namespace than its process), a bind mount (`ip netns add`, container
//! runtimes; in any mount namespace) or an open file descriptor. Only an instance of a namespace
//! with none of these is stale; where in doubt (an unreadable /proc), it is kept.

use std::{collections::HashSet, fs, os::unix::fs::MetadataExt, path::PathBuf};

use xdpfw_kernel as kernel;

use crate::{
    error::{ControlContext, Result},
    instance::{parse_key, state_root},
};

/// The pins (and runtime state) of an instance whose namespace is gone.
#[derive(Clone, Debug)]
pub struct Stale {
    pub key: String,
    pub netns_inode: u64,
    pub ifindex: u32,
    pub pin_dir: PathBuf,
    /// The interface's name as recorded at attach, when the record is there.
    pub iface: Option<String>,
    /// Whether its link was pinned (an attach that completed) or not (one killed midway).
    pub attached: bool,
}

/// Every network namespace reachable on this host, by inode; `None` when /proc cannot be read
/// (then nothing may be called stale).
fn live_namespaces() -> Option<HashSet<u64>> {
    let mut live = HashSet::new();
    let mut seen_mount_ns = HashSet::new();
    let ns_of_link = |target: &std::path::Path| -> Option<u64> {
        target.to_str()?.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
    };
    for proc in fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc.path();
        if !proc.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Every thread's namespace (a process that exited meanwhile is simply skipped).
        if let Ok(tasks) = fs::read_dir(pid.join("task")) {
            for task in tasks.flatten() {
                if let Ok(m) = fs::metadata(task.path().join("ns/net")) {
                    live.insert(m.ino());
                }
            }
        }
        if let Ok(fds) = fs::read_dir(pid.join("fd")) {
            for fd in fds.flatten() {
                if let Some(ino) = fs::read_link(fd.path()).ok().as_deref().and_then(ns_of_link) {
                    live.insert(ino);
                }
            }
        }
        // Bind mounts of namespaces, once per mount namespace.
        let mount_ns = fs::metadata(pid.join("ns/mnt")).map(|m| m.ino()).ok();
        if mount_ns.is_some_and(|m| seen_mount_ns.insert(m))
            && let Ok(info) = fs::read_to_string(pid.join("mountinfo"))
        {
            live.extend(nsfs_mounts(&info));
        }
    }
    Some(live)
}

/// The network namespaces bind-mounted in one mountinfo text: nsfs mounts whose root is
/// `net:[inode]`.
fn nsfs_mounts(mountinfo: &str) -> impl Iterator<Item = u64> + '_ {
    mountinfo.lines().filter_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        (rest.split(' ').next()? == "nsfs").then_some(())?;
        let root = fields.split(' ').nth(3)?;
        root.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
    })
}

/// The instances pinned under the pin root whose namespace is gone.
pub fn stale() -> Result<Vec<Stale>> {
    let root = kernel::pin_root();
    let entries = match fs::read_dir(&root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        read => read.ctx(|| format!("reading {}", root.display()))?,
    };
    let Some(live) = live_namespaces() else { return Ok(Vec::new()) };
    let mut found: Vec<Stale> = entries
        .flatten()
        .filter_map(|e| {
            let key = e.file_name().to_string_lossy().into_owned();
            let (netns_inode, ifindex) = parse_key(&key)?;
            if live.contains(&netns_inode) {
                return None;
            }
            let state = fs::read_to_string(state_root().join(&key).join("state.json")).ok();
            let iface = state.and_then(|t| serde_json::from_str::<crate::State>(&t).ok()).map(|s| s.iface);
            Some(Stale { attached: e.path().join("link").exists(), pin_dir: e.path(), key, netns_inode, ifindex, iface })
        })
        .collect();
    found.sort_by_key(|s| (s.netns_inode, s.ifindex));
    Ok(found)
}

/// Removes one stale instance: its pins (which frees the program and its maps), its runtime
/// state and its lock files. Its durable history stays, like a detached instance's.
pub fn remove(s: &Stale) -> Result<()> {
    // A defunct link (its device went with the namespace) is unpinned with the rest.
    if kernel::detach_and_unpin(&s.pin_dir).is_err() {
        fs::remove_dir_all(&s.pin_dir).ctx(|| format!("removing {}", s.pin_dir.display()))?;
    }
    let _ = fs::remove_dir_all(state_root().join(&s.key));
    // No one can hold these: the instance's namespace, where any holder would run, is gone.
    for lock in [format!("{}.lock", s.key), format!("{}.daemon.lock", s.key), format!("{}.trace.lock", s.key)] {
        let _ = fs::remove_file(state_root().join(lock));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsfs_bind_mounts_are_read_from_mountinfo() {
        let info = "\
612 28 0:4 net:[4026532955] /run/netns/a rw shared:300 - nsfs nsfs rw
613 28 0:4 mnt:[4026532999] /run/m rw - nsfs nsfs rw
30 1 0:26 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700
614 28 0:4 net:[12] /x\\040y rw - nsfs nsfs rw";
        assert_eq!(nsfs_mounts(info).collect::<Vec<_>>(), [4026532955, 12]);
    }

    #[test]
    fn this_process_namespace_is_alive() {
        let me = fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(live_namespaces().unwrap().contains(&me));
    }
}
