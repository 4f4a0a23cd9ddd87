//! Operations on an attached firewall instance: attach, reload, stats, detach.
//!
//! An instance is the program attached to one interface of one network namespace: its identity
//! is (namespace, ifindex), never a bare name, since `eth1` may exist in several namespaces. Its
//! key `ns<netns inode>-if<ifindex>` names everything that lives as long as the namespace: the
//! pins (`/sys/fs/bpf/xdpfw/<key>/`), the runtime state (`/run/xdpfw/<key>/state.json`, written
//! atomically) and the locks (`/run/xdpfw/<key>.lock`, `<key>.daemon.lock`, `<key>.trace.lock`). The durable
//! history must survive a reboot, where namespace inodes and ifindexes change: it is keyed by
//! the namespace's stable name and the interface name instead (see [`Netns::stable_name`]).
//! Every mutating operation holds the instance's lock file, so reloads are serialized.

use std::{
    fs::{self, File},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use xdpfw_kernel::{self as kernel, AttachMode, grace::GraceMethod};
use xdpfw_rules::{Ruleset, compile::Image};

use crate::{
    error::{ControlContext, Result, refuse},
    files,
};

pub fn state_root() -> PathBuf {
    std::env::var_os("XDPFW_STATE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/xdpfw"))
}

/// What a person needs to recognise a ruleset.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RulesetSummary {
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    pub hash: String,
    pub default: String,
    pub rules: Vec<String>,
    pub actions: Vec<String>,
    pub prefixes: usize,
    /// Prefix entries after merging, in the IPv4 and IPv6 tables.
    #[serde(alias = "trie_entries")]
    pub table_entries: usize,
    /// Rules with owner conditions, which need the escalation service.
    #[serde(default)]
    pub owner_rules: Vec<String>,
    /// Bitmaps the live buffer holds (0: not recorded, by an earlier version): where the delta
    /// path of `loader set` appends new ones.
    #[serde(default)]
    pub bitmaps: u32,
}

impl RulesetSummary {
    pub(crate) fn new(rs: &Ruleset, image: &Image, from_file: bool) -> Self {
        Self {
            path: from_file.then(|| rs.path.clone()),
            version: rs.version.clone(),
            hash: rs.hash.clone(),
            default: rs.default.to_string(),
            rules: rs.rules.iter().map(|r| r.name.clone()).collect(),
            actions: rs.rules.iter().map(|r| r.action.to_string()).collect(),
            prefixes: rs.prefix_count(),
            table_entries: image.prefix_count(),
            owner_rules: rs.rules.iter().filter(|r| r.owner.is_some()).map(|r| r.name.clone()).collect(),
            bitmaps: image.bitmaps.len() as u32,
        }
    }
}

/// Durations of each phase of a reload, in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReloadTimes {
    pub parse_us: u64,
    pub compile_us: u64,
    pub lock_wait_us: u64,
    pub install_arrays_us: u64,
    /// Writing the prefix tables (the IPv4 and IPv6 tables: top levels, chunks, leaves, lines).
    #[serde(alias = "install_tries_us")]
    pub install_tables_us: u64,
    /// Self-tests run in the kernel against the inactive buffer before the flip.
    pub self_tests: usize,
    pub prove_us: u64,
    pub flip_us: u64,
    pub grace_us: u64,
    pub clear_us: u64,
    pub total_us: u64,
    /// The address tables were the live buffer's, shared instead of compiled and installed
    /// again: the reload changed no prefix (issue 11's compiled-set cache).
    #[serde(default)]
    pub tables_reused: bool,
    /// Array-of-maps slots the install changed (each waits for an RCU grace period in the
    /// kernel before the flip): none for a reload that changes no prefix.
    #[serde(default)]
    pub slot_changes: u32,
    /// From the start of the reload to the flip, everything included (the parse, the lock, the
    /// records written before the flip): the reload's command-to-flip time.
    #[serde(default)]
    pub to_flip_us: u64,
    /// Large set files (64 KiB or more) this reload's parse read from disk, parsed (not found
    /// among the texts the process kept), and took from the process's cache by their metadata
    /// without reading them (see `xdpfw_rules::TRUST_AGE`). Counted process-wide around the
    /// parse: a concurrent parse in the same process adds to them.
    #[serde(default)]
    pub set_files_read: u64,
    #[serde(default)]
    pub set_files_parsed: u64,
    #[serde(default)]
    pub set_files_unread: u64,
    /// Switching the attached program to its full copy before the flip, with the grace period
    /// that follows (a ruleset that needs it after one that did not; see
    /// `xdpfw_common::variant`), and to its plain copy after the flip's grace period.
    #[serde(default)]
    pub widen_us: u64,
    #[serde(default)]
    pub narrow_us: u64,
}

impl ReloadTimes {
    /// Fills the set-file counts with what happened since `before`.
    pub(crate) fn count_set_files(&mut self, before: xdpfw_rules::SetFileCounts) {
        let now = xdpfw_rules::set_file_counts();
        self.set_files_read = now.read - before.read;
        self.set_files_parsed = now.parsed - before.parsed;
        self.set_files_unread = now.unread - before.unread;
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadReport {
    pub iface: String,
    pub previous_generation: u64,
    pub generation: u64,
    pub buffer: u32,
    pub ruleset: RulesetSummary,
    pub grace_method: GraceMethod,
    pub times: ReloadTimes,
    pub warnings: Vec<String>,
    /// The copy of the program serving after the reload: "full" or "plain" (see
    /// `xdpfw_common::variant`).
    #[serde(default)]
    pub program: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// The interface's name when it was attached (or last reloaded).
    pub iface: String,
    /// The network namespace the interface is in (absent in states of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<Netns>,
    /// The interface's index in that namespace (0 in states of earlier versions).
    #[serde(default)]
    pub ifindex: u32,
    pub mode: AttachMode,
    pub attached_at: u64,
    pub generation: u64,
    pub ruleset: RulesetSummary,
    pub last_reload: Option<ReloadReport>,
    /// Counts of earlier generations carried by rule name: the kernel's per-rule counters
    /// belong to a buffer and start at zero with each reload, so a reload adds the retired
    /// buffer's final counts (read after the grace period, when they can no longer change) to
    /// the entry of each rule name the new ruleset keeps; `stats` reports kernel + carried.
    /// "(default)" carries the default action's counts.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub carried: std::collections::BTreeMap<String, CarriedCounts>,
    /// Only in the record a reload writes before its flip (`next-<generation>.json`): the
    /// generation it retires, whose counts are not in `carried` yet. Until the final record
    /// (written before the retired buffer is cleared), `stats` adds that buffer's counters
    /// live, so no counter seems to go down during a reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring: Option<Retiring>,
}

/// The generation a reload in progress retires, and its rule names (see [`State::retiring`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Retiring {
    pub generation: u64,
    pub rules: Vec<String>,
}

/// Packets and bytes of one rule name from generations before the live one.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CarriedCounts {
    pub packets: u64,
    pub bytes: u64,
}

/// The name the default action's counters are carried under.
pub const DEFAULT_RULE_NAME: &str = "(default)";

/// What the new ruleset (`new_rules`) carries: for each of its rule names (and the default),
/// what `old` carried plus what the retired buffer counted (`retired`, one entry per rule of
/// `old_rules` and then the default, as [`xdpfw_kernel::Maps::rule_stats`] returns them).
pub fn carry(
    old: &std::collections::BTreeMap<String, CarriedCounts>,
    old_rules: &[String],
    retired: &[xdpfw_common::RuleStats],
    new_rules: &[String],
) -> std::collections::BTreeMap<String, CarriedCounts> {
    let mut totals = old.clone();
    let names = old_rules.iter().map(String::as_str).chain(std::iter::once(DEFAULT_RULE_NAME));
    for (name, c) in names.zip(retired) {
        let e = totals.entry(name.to_string()).or_default();
        e.packets = e.packets.saturating_add(c.packets);
        e.bytes = e.bytes.saturating_add(c.bytes);
    }
    let keep: std::collections::BTreeSet<&str> = new_rules.iter().map(String::as_str).chain(std::iter::once(DEFAULT_RULE_NAME)).collect();
    totals.retain(|name, c| keep.contains(name.as_str()) && *c != CarriedCounts::default());
    totals
}

/// A network namespace, as this process sees it: its inode (what `lsns -t net` and
/// `ls -l /proc/self/ns/net` show; unique among the namespaces that exist) and the names it is
/// known by.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Netns {
    pub inode: u64,
    /// Its name under /run/netns (as `ip netns` names it), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether it is the namespace of PID 1 (the host's, or the container's the loader runs in).
    #[serde(default)]
    pub host: bool,
}

fn ns_inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| m.ino())
}

impl Netns {
    /// The network namespace of this thread (after `--netns`, the one entered).
    pub fn current() -> Result<Self> {
        let inode = ns_inode("/proc/thread-self/ns/net")
            .or_else(|| ns_inode("/proc/self/ns/net"))
            .ok_or_else(|| crate::ControlError::Refused("cannot read /proc/self/ns/net (is /proc mounted?)".into()))?;
        Ok(Self::of_inode(inode))
    }

    /// What is known of the namespace with this inode: whether it is PID 1's, and its name
    /// under /run/netns (the first in order when it has several).
    pub fn of_inode(inode: u64) -> Self {
        use std::os::unix::fs::MetadataExt;
        let host = ns_inode("/proc/1/ns/net") == Some(inode);
        let mut names: Vec<String> = fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .filter(|e| fs::metadata(e.path()).is_ok_and(|m| m.ino() == inode))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        Self { inode, name: names.into_iter().next(), host }
    }

    /// The name the durable history is kept under, which outlives a reboot (where namespace
    /// inodes change): `host` for PID 1's namespace, `netns-<name>` for one named under
    /// /run/netns, and `ns<inode>` for an unnamed one (not stable across reboots: give such a
    /// namespace a name with `ip netns attach` to keep its history).
    pub fn stable_name(&self) -> String {
        match (&self.name, self.host) {
            (_, true) => "host".to_string(),
            (Some(n), false) => format!("netns-{n}"),
            (None, false) => format!("ns{}", self.inode),
        }
    }
}

impl std::fmt::Display for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.name, self.host) {
            (_, true) => write!(f, "host"),
            (Some(n), false) => write!(f, "{n}"),
            (None, false) => write!(f, "net:[{}]", self.inode),
        }
    }
}

/// The key of the instance on interface `ifindex` of the namespace `netns_inode`.
pub fn key_of(netns_inode: u64, ifindex: u32) -> String {
    format!("ns{netns_inode}-if{ifindex}")
}

/// The (namespace inode, ifindex) a key names, if it is one.
pub fn parse_key(key: &str) -> Option<(u64, u32)> {
    let (ns, ifindex) = key.strip_prefix("ns")?.split_once("-if")?;
    let (ns, ifindex) = (ns.parse().ok()?, ifindex.parse().ok()?);
    (key_of(ns, ifindex) == key).then_some((ns, ifindex))
}

/// Paths of one instance.
#[derive(Clone, Debug)]
pub struct Instance {
    /// The interface's name (what it was called when attached, for an interface that is gone).
    pub iface: String,
    pub ifindex: u32,
    pub netns: Netns,
    /// `ns<netns inode>-if<ifindex>`: the name of its pin folder, runtime folder and locks.
    pub key: String,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
}

fn check_ifname(iface: &str) -> Result<()> {
    if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ', '\0']) || iface == ".." || iface == "." {
        refuse!("invalid interface name \"{}\"", iface.escape_debug());
    }
    Ok(())
}

impl Instance {
    /// The instance of the interface named `iface` in the current network namespace (attached
    /// or not). An interface that no longer exists is found by the name recorded when it was
    /// attached, so its leftovers can be detached.
    pub fn new(iface: &str) -> Result<Self> {
        check_ifname(iface)?;
        let netns = Netns::current()?;
        let name = std::ffi::CString::new(iface).map_err(|_| crate::ControlError::Refused(format!("invalid interface name \"{iface}\"")))?;
        // SAFETY: a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex != 0 {
            return Ok(Self::at(netns, ifindex, iface));
        }
        if let Some(gone) = list_in(netns.inode)?.into_iter().find(|i| i.iface == iface) {
            return Ok(gone);
        }
        refuse!("there is no interface {iface} in this network namespace ({netns})")
    }

    /// The instance on interface `ifindex` (called `iface`) of `netns`.
    pub fn at(netns: Netns, ifindex: u32, iface: &str) -> Self {
        let key = key_of(netns.inode, ifindex);
        Self { iface: iface.to_string(), ifindex, pin_dir: kernel::pin_dir(&key), state_dir: state_root().join(&key), key, netns }
    }

    /// The single attached instance of the current network namespace, or the one named there.
    pub fn find(iface: Option<&str>) -> Result<Self> {
        refuse_private_bpffs()?;
        if let Some(i) = iface {
            let inst = Self::new(i)?;
            if !inst.pin_dir.exists() {
                refuse!("no firewall is attached to {i} in this network namespace ({}; nothing pinned at {})", inst.netns, inst.pin_dir.display());
            }
            return Ok(inst);
        }
        let netns = Netns::current()?;
        let mut all = list_in(netns.inode)?;
        match all.len() {
            1 => Ok(all.remove(0)),
            0 => refuse!("no firewall is attached in this network namespace ({netns}; nothing pinned under {})", kernel::pin_root().display()),
            _ => refuse!(
                "several firewalls are attached in this network namespace ({}); choose one with --iface",
                all.iter().map(|i| i.iface.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Whether a complete instance is attached: its link is pinned (the last step of an attach).
    /// A pin folder without it is what a killed attach left; `attach` removes it.
    pub fn is_attached(&self) -> bool {
        self.pin_dir.join("link").exists()
    }

    /// Whether the instance is whole and filtering: its link, program, probe, egress program and
    /// maps are pinned and (in this namespace) the kernel reports an XDP program and the egress
    /// program on the interface. False
    /// after a `loader detach`, pins removed by hand, bpffs unmounted, or a link detached with
    /// `bpftool link detach`: what a daemon repairs.
    pub fn is_filtering(&self) -> bool {
        let pinned = ["link", kernel::PROG_PIN, "probe", kernel::EGRESS_PIN, kernel::EGRESS_LINK_PIN]
            .iter()
            .chain(xdpfw_common::map_names::ALL.iter())
            .all(|n| self.pin_dir.join(n).exists());
        // The egress program too (its link can be detached under its pin); a query that fails
        // says nothing, and must not make a daemon repair for ever.
        pinned
            && (!self.is_here()
                || (kernel::netlink::attached_mode_of(self.ifindex).is_ok_and(|m| m.is_some())
                    && kernel::egress_attached(self.ifindex).unwrap_or(true)))
    }

    /// Whether this is an instance of the current network namespace.
    pub fn is_here(&self) -> bool {
        Netns::current().is_ok_and(|n| n.inode == self.netns.inode)
    }

    /// The instance's durable history (keyed by the namespace's stable name and the interface
    /// name, so it outlives reboots).
    pub fn history(&self) -> crate::history::History {
        crate::history::History::new(self)
    }

    /// The instance's reload lock: every change to its kernel state holds it.
    pub(crate) fn lock(&self, wait: Duration) -> Result<File> {
        files::private_dir(&state_root())?;
        let path = state_root().join(format!("{}.lock", self.key));
        files::lock_file(&path, wait, &format!("another reload of {} is in progress", self.iface))
    }

    /// Where `loader run` holds its lock for this instance.
    pub fn daemon_lock_path(&self) -> PathBuf {
        state_root().join(format!("{}.daemon.lock", self.key))
    }

    pub fn state(&self) -> Result<State> {
        let path = self.state_dir.join("state.json");
        let text = match fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.is_attached() => refuse!(
                "the firewall on {} is attached and filtering, but its record {} is missing (deleted, or a full disk); `loader reload RULES --iface {}` records it again",
                self.iface,
                path.display(),
                self.iface
            ),
            other => other.ctx(|| format!("reading {}", path.display()))?,
        };
        serde_json::from_str(&text).ctx(|| format!("parsing {}", path.display()))
    }

    pub(crate) fn write_state(&self, state: &State) -> Result<()> {
        self.write_state_file("state.json", state)
    }

    /// Writes atomically (temporary file, then rename).
    pub(crate) fn write_state_file(&self, name: &str, state: &State) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).ctx(|| "serializing the state".into())?;
        self.ensure_state_dir()?;
        files::atomic_write(&self.state_dir.join(name), &bytes)
    }

    /// [`Self::write_state_file`] without the fsync (see [`files::write_unsynced`]).
    pub(crate) fn write_state_file_unsynced(&self, name: &str, state: &State) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state).ctx(|| "serializing the state".into())?;
        self.ensure_state_dir()?;
        files::write_unsynced(&self.state_dir.join(name), &bytes)
    }

    /// Creates (or checks) the runtime root and this instance's folder in it: both root-only
    /// (0700, owned by us, not symlinks). Whatever the daemon writes there (a fetched ruleset)
    /// is out of reach of other users.
    pub fn ensure_state_dir(&self) -> Result<&std::path::Path> {
        files::private_dir(&state_root())?;
        files::private_dir(&self.state_dir)?;
        Ok(&self.state_dir)
    }

    /// The state of the generation the kernel serves: `state.json`, or `next-<generation>.json`
    /// when a reload died between its flip and its final record.
    pub fn state_for(&self, generation: u64) -> Result<State> {
        let state = self.state()?;
        if state.generation == generation {
            return Ok(state);
        }
        let next: Option<State> = fs::read_to_string(self.state_dir.join(format!("next-{generation}.json")))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        match next {
            Some(n) if n.generation == generation => Ok(n),
            _ => refuse!(
                "a reload of {} is in progress (kernel generation {generation}, recorded {}); try again",
                self.iface,
                state.generation
            ),
        }
    }
}

/// Refuses to work under `ip netns exec` (or any private mount namespace) when /sys/fs/bpf there
/// is not the host's bpffs: `ip netns exec` mounts a fresh /sys, so pins made there vanish when
/// the command exits (an attach that "succeeds" and leaves nothing attached) and pins made by
/// others are not seen (`stats` saying nothing is attached while something is).
pub fn refuse_private_bpffs() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let ns = |p: &str| fs::read_link(p).ok();
    // `ip netns exec` unshares the mount namespace and then runs us: our parent (or init, when
    // it can be read) is in the one we came from.
    let parent = format!("/proc/{}/ns/mnt", std::os::unix::process::parent_id());
    let private_mounts =
        ns("/proc/self/ns/mnt").is_some_and(|me| [parent.as_str(), "/proc/1/ns/mnt"].iter().filter_map(|p| ns(p)).any(|other| other != me));
    let bpffs = nix::sys::statfs::statfs("/sys/fs/bpf").is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    if private_mounts && !bpffs {
        refuse!(
            "/sys/fs/bpf is not the host's BPF filesystem here (a private mount namespace, as `ip netns exec` makes): pins would vanish when this command exits, and existing ones are not visible; use `loader --netns NAME ...` instead of `ip netns exec NAME loader ...`"
        );
    }
    Ok(())
}

/// Every attached instance, of every network namespace, in key order. Each one's name and
/// namespace name come from its state (the interface may live in a namespace this process
/// cannot see by name); "?" when that is missing.
pub fn list() -> Result<Vec<Instance>> {
    let root = kernel::pin_root();
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found: Vec<Instance> = fs::read_dir(&root)
        .ctx(|| format!("reading {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("link").exists())
        .filter_map(|e| parse_key(&e.file_name().to_string_lossy()))
        .map(|(inode, ifindex)| {
            let mut inst = Instance::at(Netns { inode, name: None, host: false }, ifindex, "?");
            let recorded = fs::read_to_string(inst.state_dir.join("state.json")).ok().and_then(|t| serde_json::from_str::<State>(&t).ok());
            if let Some(st) = recorded {
                inst.iface = st.iface;
            }
            inst.netns = Netns::of_inode(inode);
            inst
        })
        .collect();
    found.sort_by_key(|i| (i.netns.inode, i.ifindex));
    Ok(found)
}

/// The attached instances of the network namespace `inode`.
pub fn list_in(inode: u64) -> Result<Vec<Instance>> {
    Ok(list()?.into_iter().filter(|i| i.netns.inode == inode).collect())
}


#[cfg(test)]
mod carry_tests {
    use super::*;
    use xdpfw_common::RuleStats;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn counts_follow_rule_names_across_reloads() {
        let c = |packets, bytes| CarriedCounts { packets, bytes };
        let r = |packets, bytes| RuleStats { packets, bytes };
        // Generation 1: a, b, then the default.
        let g2 = carry(&Default::default(), &names(&["a", "b"]), &[r(10, 100), r(5, 50), r(1, 60)], &names(&["new", "b", "a"]));
        assert_eq!(g2.get("a"), Some(&c(10, 100)));
        assert_eq!(g2.get("b"), Some(&c(5, 50)));
        assert_eq!(g2.get(DEFAULT_RULE_NAME), Some(&c(1, 60)));
        assert_eq!(g2.get("new"), None, "nothing counted yet is not stored");
        // Generation 2 dropped "b": its counts go with it; "a" keeps adding up.
        let g3 = carry(&g2, &names(&["new", "b", "a"]), &[r(2, 20), r(3, 30), r(4, 40), r(0, 0)], &names(&["a", "new"]));
        assert_eq!(g3.get("a"), Some(&c(14, 140)));
        assert_eq!(g3.get("new"), Some(&c(2, 20)));
        assert_eq!(g3.get("b"), None);
        assert_eq!(g3.get(DEFAULT_RULE_NAME), Some(&c(1, 60)));
    }
}
