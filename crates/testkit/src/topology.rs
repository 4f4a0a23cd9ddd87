//! Two network namespaces joined by a veth pair, torn down on drop even when a test fails.
//!
//! ```text
//!   netns <name>-c (client)                 netns <name>-s (server, firewall attached)
//!   veth <c-end>  192.0.2.1/24  <------->  veth <s-end>  192.0.2.2/24
//!                 2001:db8:f::1/64                        2001:db8:f::2/64
//! ```
//! Addresses come from the documentation ranges (RFC 5737, RFC 3849) and never leave the pair.
//! Shared by the integration tests and `cargo xtask demo` (std only, so both can include it).

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

pub const CLIENT_V4: &str = "192.0.2.1";
pub const SERVER_V4: &str = "192.0.2.2";
pub const CLIENT_V6: &str = "2001:db8:f::1";
pub const SERVER_V6: &str = "2001:db8:f::2";

pub struct Topology {
    pub client_ns: String,
    pub server_ns: String,
    pub client_if: String,
    pub server_if: String,
    /// The loader binary, used to detach on drop if a test left the firewall attached.
    loader: Option<String>,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Topology {
    /// `tag` (a few letters) names the test in the namespace and interface names.
    pub fn new(tag: &str) -> Result<Self, String> {
        Self::with_server_if(tag, None)
    }

    /// A topology whose server end is called `server_if` (when given): two topologies can then
    /// hold interfaces of the same name, each in its own namespace.
    pub fn with_server_if(tag: &str, server_if: Option<&str>) -> Result<Self, String> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}{}", std::process::id() % 100000, SEQ.fetch_add(1, Ordering::SeqCst));
        let tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).take(4).collect();
        let t = Topology {
            client_ns: format!("xfw-{tag}-{id}-c"),
            server_ns: format!("xfw-{tag}-{id}-s"),
            // Interface names are at most 15 bytes.
            client_if: format!("xc{tag}{id}").chars().take(15).collect(),
            server_if: server_if.map_or_else(|| format!("xs{tag}{id}").chars().take(15).collect(), str::to_string),
            loader: None,
        };
        t.build()?;
        Ok(t)
    }

    fn build(&self) -> Result<(), String> {
        let (c, s) = (self.client_ns.as_str(), self.server_ns.as_str());
        let (ci, si) = (self.client_if.as_str(), self.server_if.as_str());
        sh(&["ip", "netns", "add", c])?;
        sh(&["ip", "netns", "add", s])?;
        sh(&["ip", "-n", c, "link", "add", ci, "type", "veth", "peer", "name", si, "netns", s])?;
        for (ns, ifc, v4, v6) in [(c, ci, CLIENT_V4, CLIENT_V6), (s, si, SERVER_V4, SERVER_V6)] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            sh(&["ip", "-n", ns, "addr", "add", &format!("{v4}/24"), "dev", ifc])?;
            sh(&["ip", "-n", ns, "addr", "add", &format!("{v6}/64"), "dev", ifc, "nodad"])?;
            sh(&["ip", "-n", ns, "link", "set", ifc, "up"])?;
        }
        // IPv6 installs the prefix route only once the link is really up; until then neighbour
        // solicitations go unanswered and the kernel retries only after a second. Wait for both
        // families to answer, so tests start from a working link (bounded: 5 tries).
        for addr in [SERVER_V4, SERVER_V6] {
            let ok = (0..5).any(|_| sh(&["ip", "netns", "exec", c, "ping", "-n", "-q", "-c", "1", "-W", "1", addr]).is_ok());
            if !ok {
                return Err(format!("{addr} does not answer ping from {c} before any firewall is attached"));
            }
        }
        Ok(())
    }

    /// Forgets every neighbour entry on both ends, so the next packets start with ARP / ND.
    pub fn flush_neighbours(&self) -> Result<(), String> {
        sh(&["ip", "-n", &self.client_ns, "neigh", "flush", "dev", &self.client_if])?;
        sh(&["ip", "-n", &self.server_ns, "neigh", "flush", "dev", &self.server_if])
    }

    /// The key of the firewall instance on `server_if` (`ns<netns inode>-if<ifindex>`), which
    /// names its pins, runtime folder and locks.
    pub fn instance_key(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(format!("/run/netns/{}", self.server_ns)).map(|m| m.ino()).unwrap_or(0);
        let out = Command::new("ip").args(["-n", &self.server_ns, "-o", "link", "show", "dev", &self.server_if]).output();
        let ifindex: u32 = out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).split(':').next().and_then(|n| n.trim().parse().ok())).unwrap_or(0);
        format!("ns{inode}-if{ifindex}")
    }

    /// Where the instance on `server_if` is pinned.
    pub fn pin_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/sys/fs/bpf/xdpfw").join(self.instance_key())
    }

    /// The instance's runtime folder (state.json).
    pub fn state_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/xdpfw").join(self.instance_key())
    }

    /// The instance's reload lock.
    pub fn lock_path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/xdpfw").join(format!("{}.lock", self.instance_key()))
    }

    /// The lock `loader run` holds for the instance.
    pub fn daemon_lock_path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/xdpfw").join(format!("{}.daemon.lock", self.instance_key()))
    }

    /// The instance's durable history: by the namespace's name and the interface's name.
    pub fn history_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/var/lib/xdpfw").join(format!("netns-{}", self.server_ns)).join(&self.server_if)
    }

    /// Remember to detach through `loader` on drop (the firewall is attached to `server_if`).
    pub fn detach_on_drop(&mut self, loader: &str) {
        self.loader = Some(loader.to_string());
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(loader) = &self.loader {
            // Ignore "not attached": the test may have detached already.
            let _ = Command::new(loader).args(["--netns", &self.server_ns, "detach", &self.server_if]).output();
        }
        // The reload history is durable by design; a test's own goes with its namespace. So do
        // the lock files (never unlinked by the loader, whose key dies with the namespace).
        let _ = std::fs::remove_dir_all(std::path::Path::new("/var/lib/xdpfw").join(format!("netns-{}", self.server_ns)));
        let key = self.instance_key();
        for lock in [format!("{key}.lock"), format!("{key}.daemon.lock"), format!("{key}.trace.lock")] {
            let _ = std::fs::remove_file(std::path::Path::new("/run/xdpfw").join(lock));
        }
        let _ = sh(&["ip", "netns", "del", &self.client_ns]);
        let _ = sh(&["ip", "netns", "del", &self.server_ns]);
    }
}
