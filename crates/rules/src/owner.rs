//! Conditions on the owner of the local socket a packet is addressed to (a rule's `owner`
//! table), and the owner as userspace observes it.
//!
//! The kernel cannot see owners: it escalates flows whose first matching rule has an owner
//! condition, and the escalation service (or `loader explain --owner`) decides them here.

use std::{fmt, ops::RangeInclusive, path::Path, str::FromStr};

use crate::error::{SpecContext, SpecError, spec_bail};
use serde::Serialize;

/// What a rule's `owner` table demands. Each list is "any of"; every non-empty list must hold.
/// The process conditions (`process`, `exe`, `unit`, `cgroup`) must hold for one and the same
/// process owning the socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerMatch {
    /// Process name: `/proc/PID/comm` or the file name of the executable. Anyone can name a
    /// process anything: this proves nothing alone (`check --strict` warns).
    pub process: Vec<String>,
    /// Absolute path of the executable: the process runs the file found at this path (compared
    /// by device and inode, not by the path the process reports).
    pub exe: Vec<String>,
    pub uid: Vec<RangeInclusive<u32>>,
    /// User name of the socket's uid.
    pub user: Vec<String>,
    /// systemd unit: the service or scope directly under `/system.slice` (through its
    /// sub-slices) holding the process; with `any_slice`, the innermost one anywhere.
    pub unit: Vec<String>,
    /// cgroup v2 path prefix, e.g. `/system.slice/nginx.service` (under `/system.slice` unless
    /// `any_slice`).
    pub cgroup: Vec<String>,
    /// `unit` and `cgroup` also match outside `/system.slice` (user slices, where unprivileged
    /// users create cgroups of any name by delegation, and hosts without systemd).
    pub any_slice: bool,
}

/// One process that holds the socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub name: String,
    pub exe: Option<String>,
    /// Device and inode of the file the process runs (a stat of `/proc/PID/exe`): what `exe`
    /// conditions compare. `None` when given as a spec (tests, `explain --owner`): then the
    /// path given is compared.
    #[serde(skip)]
    pub exe_id: Option<(u64, u64)>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
}

/// The owner of a local socket: its uid (from sock_diag) and the processes holding it (from
/// /proc; empty when they exited between the two lookups).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub uid: u32,
    pub user: Option<String>,
    pub processes: Vec<ProcessInfo>,
}

impl OwnerMatch {
    pub fn is_empty(&self) -> bool {
        self.process.is_empty()
            && self.exe.is_empty()
            && self.uid.is_empty()
            && self.user.is_empty()
            && self.unit.is_empty()
            && self.cgroup.is_empty()
    }

    fn has_process_conditions(&self) -> bool {
        !(self.process.is_empty() && self.exe.is_empty() && self.unit.is_empty() && self.cgroup.is_empty())
    }

    /// `Some(reason)` when `owner` satisfies every condition; `None` for no socket (no owner).
    pub fn matches(&self, owner: Option<&Owner>) -> Option<String> {
        let owner = owner?;
        if !self.uid.is_empty() && !self.uid.iter().any(|r| r.contains(&owner.uid)) {
            return None;
        }
        if !self.user.is_empty() && !owner.user.as_ref().is_some_and(|u| self.user.contains(u)) {
            return None;
        }
        let who = format!("uid {}{}", owner.uid, owner.user.as_ref().map_or(String::new(), |u| format!(" ({u})")));
        if !self.has_process_conditions() {
            return Some(format!("the socket belongs to {who}"));
        }
        let any = |list: &[String], f: &dyn Fn(&String) -> bool| list.is_empty() || list.iter().any(f);
        owner
            .processes
            .iter()
            .find(|p| {
                let exe_name = p.exe.as_deref().and_then(|e| Path::new(e).file_name()).and_then(|n| n.to_str());
                let cgroup = p.cgroup.as_deref().filter(|c| self.any_slice || cgroup_under(c, SYSTEM_SLICE));
                let unit = cgroup.and_then(|c| unit_of(c, self.any_slice));
                any(&self.process, &|want| *want == p.name || Some(want.as_str()) == exe_name)
                    && any(&self.exe, &|want| match p.exe_id {
                        Some(id) => file_id(Path::new(want)) == Some(id),
                        None => Some(want.as_str()) == p.exe.as_deref(),
                    })
                    && any(&self.unit, &|want| Some(want.as_str()) == unit)
                    && any(&self.cgroup, &|want| cgroup.is_some_and(|c| cgroup_under(c, want)))
            })
            .map(|p| format!("the socket belongs to {} (pid {}), {who}", p.name, p.pid))
    }
}

/// Where systemd puts system services: only root creates cgroups here (a service with
/// `Delegate=` can create them below its own cgroup only).
pub const SYSTEM_SLICE: &str = "/system.slice";

/// Device and inode of the file at `path` (following links, as `execve` does): the identity an
/// `exe` condition compares, taken at each decision so a replaced file (a package upgrade) is
/// followed. `None` when there is no such file.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The systemd unit of a process in cgroup `path`: the first service or scope below the root
/// (through slices only, so a cgroup a delegated service creates below itself, whatever its
/// name, does not rename the unit). With `any_slice`, the innermost service or scope anywhere
/// (user units live inside `user@UID.service`).
pub fn unit_of(path: &str, any_slice: bool) -> Option<&str> {
    let is_unit = |part: &&str| part.ends_with(".service") || part.ends_with(".scope");
    if any_slice {
        return path.rsplit('/').find(is_unit);
    }
    path.split('/').filter(|p| !p.is_empty()).find(|p| !p.ends_with(".slice")).filter(is_unit)
}

/// `path` is `prefix` or below it (component-wise, so `/a/b` is not under `/a/bc`).
fn cgroup_under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/')) || prefix.is_empty()
}

impl fmt::Display for OwnerMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut list = |key: &str, items: Vec<String>| {
            if !items.is_empty() {
                parts.push(format!("{key}={}", items.join("|")));
            }
        };
        list("process", self.process.clone());
        list("exe", self.exe.clone());
        list("uid", self.uid.iter().map(|r| if r.start() == r.end() { r.start().to_string() } else { format!("{}-{}", r.start(), r.end()) }).collect());
        list("user", self.user.clone());
        list("unit", self.unit.clone());
        list("cgroup", self.cgroup.clone());
        if self.any_slice {
            parts.push("any_slice".into());
        }
        f.write_str(&parts.join(" "))
    }
}

/// A uid or a range `lo-hi`.
pub fn parse_uid_range(s: &str) -> Result<RangeInclusive<u32>, String> {
    let uid = |p: &str| p.trim().parse::<u32>().map_err(|_| format!("invalid uid \"{p}\" in \"{s}\""));
    match s.split_once('-') {
        Some((lo, hi)) => {
            let r = uid(lo)?..=uid(hi)?;
            if r.is_empty() {
                return Err(format!("uid range \"{s}\" is inverted"));
            }
            Ok(r)
        }
        None => uid(s).map(|u| u..=u),
    }
}

/// The owner of a packet's socket as given on a command line or in a `[[test]]`:
/// `"process=nginx uid=33 user=www-data exe=/usr/sbin/nginx unit=nginx.service cgroup=/system.slice/nginx.service"`,
/// or `"none"` for no socket. A process is assumed when any process key is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerSpec(pub Option<Owner>);

impl FromStr for OwnerSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        if s.trim() == "none" {
            return Ok(OwnerSpec(None));
        }
        let mut owner = Owner::default();
        let mut process = ProcessInfo::default();
        let mut has_process = false;
        let mut has_uid = false;
        for part in s.split([' ', ',']).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').spec_err(|| format!("expected key=value, found \"{part}\""))?;
            match k {
                "uid" => {
                    owner.uid = v.parse().spec_err(|| format!("invalid uid \"{v}\""))?;
                    has_uid = true;
                }
                "user" => owner.user = Some(v.to_string()),
                "pid" => process.pid = v.parse().spec_err(|| format!("invalid pid \"{v}\""))?,
                "process" => process.name = v.to_string(),
                "exe" => process.exe = Some(v.to_string()),
                "unit" => process.unit = Some(v.to_string()),
                "cgroup" => process.cgroup = Some(v.to_string()),
                other => spec_bail!("unknown owner key \"{other}\" (expected process, exe, pid, uid, user, unit, cgroup, or \"none\")"),
            }
            has_process |= matches!(k, "pid" | "process" | "exe" | "unit" | "cgroup");
        }
        if !has_uid && !has_process && owner.user.is_none() {
            spec_bail!("an owner needs at least one of process, exe, pid, uid, user, unit, cgroup (or \"none\")");
        }
        if !has_uid && let Some(name) = &owner.user {
            // Resolve the name so uid conditions can be checked too; unknown names keep uid 0 out.
            owner.uid = uid_of_user(name).unwrap_or(u32::MAX);
        }
        // A unit given alone is a system service's: its cgroup is what the matcher reads.
        if process.cgroup.is_none() && let Some(unit) = &process.unit {
            process.cgroup = Some(format!("{SYSTEM_SLICE}/{unit}"));
        }
        if has_process {
            owner.processes.push(process);
        }
        Ok(OwnerSpec(Some(owner)))
    }
}

/// The uid of a user name in the password database (`/etc/passwd`; names served only by other
/// NSS sources are not found, and then no uid condition holds for the owner).
fn uid_of_user(name: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(s: &str) -> Option<Owner> {
        s.parse::<OwnerSpec>().unwrap().0
    }

    #[test]
    fn conditions_hold_for_one_process() {
        let m = OwnerMatch { process: vec!["nginx".into()], uid: vec![RangeInclusive::new(33, 33)], ..Default::default() };
        assert!(m.matches(owner("process=nginx uid=33").as_ref()).is_some());
        assert!(m.matches(owner("process=nginx uid=34").as_ref()).is_none());
        assert!(m.matches(owner("process=caddy uid=33").as_ref()).is_none());
        assert!(m.matches(owner("uid=33").as_ref()).is_none(), "a process condition needs a process");
        assert!(m.matches(None).is_none(), "no socket, no owner");
        // The executable's file name also names the process (comm is cut at 15 bytes).
        assert!(m.matches(owner("process=nginx:worker exe=/usr/sbin/nginx uid=33").as_ref()).is_some());
    }

    #[test]
    fn cgroup_prefix_is_by_component() {
        let m = OwnerMatch { cgroup: vec!["/system.slice/web".into()], ..Default::default() };
        assert!(m.matches(owner("cgroup=/system.slice/web/x.scope uid=0").as_ref()).is_some());
        assert!(m.matches(owner("cgroup=/system.slice/web uid=0").as_ref()).is_some());
        assert!(m.matches(owner("cgroup=/system.slice/webx uid=0").as_ref()).is_none());
    }

    #[test]
    fn units_and_cgroups_hold_under_the_system_slice_only() {
        let unit = OwnerMatch { unit: vec!["nginx.service".into()], ..Default::default() };
        assert!(unit.matches(owner("unit=nginx.service uid=0").as_ref()).is_some());
        assert!(unit.matches(owner("cgroup=/system.slice/nginx.service uid=0").as_ref()).is_some());
        assert!(unit.matches(owner("cgroup=/system.slice/system-web.slice/nginx.service/worker uid=0").as_ref()).is_some());
        // A user's delegated cgroup of that name, anywhere else, is not the unit.
        let spoof = "cgroup=/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service uid=1000";
        assert!(unit.matches(owner(spoof).as_ref()).is_none());
        assert!(unit.matches(owner("cgroup=/nginx.service uid=0").as_ref()).is_none());
        // Nor one a delegated system service creates below its own cgroup.
        assert!(unit.matches(owner("cgroup=/system.slice/ci.service/nginx.service uid=0").as_ref()).is_none());
        let any = OwnerMatch { any_slice: true, ..unit.clone() };
        assert!(any.matches(owner(spoof).as_ref()).is_some(), "any_slice opts into user units");
        let cg = OwnerMatch { cgroup: vec!["/".into()], ..Default::default() };
        assert!(cg.matches(owner(spoof).as_ref()).is_none(), "cgroup prefixes hold under the system slice only");
        assert!(OwnerMatch { any_slice: true, ..cg }.matches(owner(spoof).as_ref()).is_some());
    }

    #[test]
    fn exe_is_the_file_not_the_path_the_process_reports() {
        let m = OwnerMatch { exe: vec!["/bin/sh".into()], ..Default::default() };
        let id = file_id(Path::new("/bin/sh")).unwrap();
        let running = |exe: &str, exe_id| Owner {
            uid: 0,
            user: None,
            processes: vec![ProcessInfo { pid: 1, name: "sh".into(), exe: Some(exe.into()), exe_id, ..Default::default() }],
        };
        assert!(m.matches(Some(&running("/bin/sh", Some(id)))).is_some());
        // The reported path is what a mount namespace makes it: the file's identity decides.
        assert!(m.matches(Some(&running("/bin/sh", Some((id.0, id.1 ^ 1))))).is_none());
        assert!(m.matches(Some(&running("/elsewhere/sh", Some(id)))).is_some());
        // A spec (no identity) compares the path given.
        assert!(m.matches(owner("exe=/bin/sh uid=0").as_ref()).is_some());
        assert!(m.matches(owner("exe=/tmp/sh uid=0").as_ref()).is_none());
    }

    #[test]
    fn bad_owner_specs_are_refused() {
        assert!("colour=red".parse::<OwnerSpec>().is_err());
        assert!("uid=abc".parse::<OwnerSpec>().is_err());
        assert!("".parse::<OwnerSpec>().is_err());
        assert_eq!("none".parse::<OwnerSpec>().unwrap(), OwnerSpec(None));
        assert_eq!(parse_uid_range("1000-1999").unwrap(), 1000..=1999);
        assert!(parse_uid_range("9-1").is_err());
    }
}
