//! Real processes owning real sockets, the daemon that serves escalations, and raw frames for
//! floods of distinct flows: shared by the escalation tests and the escalation benchmark.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use xdpfw_rules::packet::PacketSpec;

use super::{
    Topology,
    daemon::{Daemon, TempDir},
    eventually, stats,
};

/// A UDP echo and TCP accept server in Python, run under a chosen process name and user.
const SERVER_PY: &str = r#"
import os, socket, sys, threading
port = int(sys.argv[1]); uid = int(sys.argv[2])
if uid != 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)   # before the sockets: they take this uid
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("0.0.0.0", port)); t.listen(64)
def accept():
    while True:
        c, _ = t.accept(); c.close()
threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
while True:
    d, a = u.recvfrom(2048); u.sendto(d, a)
"#;

/// A real process named `name` (its comm) owning udp+tcp `port` in `ns` as `uid`; killed on drop.
pub struct OwnerProcess {
    child: Child,
    _dir: TempDir,
}

fn python() -> String {
    // Debian's interpreter (installed by setup) rather than whatever shim PATH has first.
    let py = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let out = Command::new(py)
        .args(["-c", "import os, sys; print(os.path.realpath(sys.executable))"])
        .output()
        .expect("python3 is needed by this test (installed by `./run setup`)");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl OwnerProcess {
    pub fn start(ns: &str, name: &str, uid: u32, port: u16) -> Self {
        let dir = TempDir::new("owner");
        // Executed through a link with the wanted name, the process's comm is that name.
        let exe = dir.0.join(name);
        std::os::unix::fs::symlink(python(), &exe).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&exe)
            .args(["-c", SERVER_PY, &port.to_string(), &uid.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the owner process");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "owner process {name} did not start");
        Self { child, _dir: dir }
    }
}

impl Drop for OwnerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `loader run` following `rules` (the instance is already attached with them), once its
/// escalation service reports itself serving; its log goes to `dir`.
pub fn escalation_daemon(t: &Topology, dir: &TempDir, rules: &Path) -> Daemon {
    let d = Daemon::start(t, &dir.0, &["--rules", rules.to_str().unwrap()]);
    assert!(
        eventually(Duration::from_secs(10), || stats(t)["escalation"].is_object()),
        "the daemon did not report serving escalations:\n{}",
        d.log()
    );
    d
}

/// An Ethernet frame of one UDP flow, sent raw so a flood can have 100,000 distinct flows.
pub fn flood_frame(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let p: PacketSpec = format!("udp {src}:{sport} -> {dst}:{dport}").parse().unwrap();
    p.to_frame()
}

/// Sends frames out of `ifname` in the current namespace through an AF_PACKET socket.
pub fn send_raw(ifname: &str, frames: impl Iterator<Item = Vec<u8>>, pace_every: usize) -> usize {
    // SAFETY: plain socket calls with valid, correctly sized arguments.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0, "AF_PACKET socket");
        let ifindex = libc::if_nametoindex(std::ffi::CString::new(ifname).unwrap().as_ptr());
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let mut sent = 0;
        for (i, f) in frames.enumerate() {
            let rc = libc::sendto(fd, f.as_ptr().cast(), f.len(), 0, (&addr as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as u32);
            if rc > 0 {
                sent += 1;
            }
            if pace_every > 0 && i % pace_every == pace_every - 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        libc::close(fd);
        sent
    }
}

