//! `loader run` as a child process of a test, its Prometheus endpoint, and scratch folders:
//! shared by the daemon and escalation tests and the escalation benchmark.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use super::{Topology, eventually, in_ns, loader_bin};

pub const METRICS_PORT: u16 = 9464;

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("xdpfw-test-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `loader --netns NS run ARGS`, killed on drop (even when the test fails).
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    lock: PathBuf,
}

impl Daemon {
    pub fn start(t: &Topology, dir: &Path, args: &[&str]) -> Self {
        Self::start_with_env(t, dir, args, &[])
    }

    pub fn start_with_env(t: &Topology, dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> Self {
        let log = dir.join(format!("daemon-{}.log", rand::random::<u32>()));
        let child = Command::new(loader_bin())
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .args(["--netns", &t.server_ns, "run", &t.server_if, "--metrics", &format!("127.0.0.1:{METRICS_PORT}")])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting loader run");
        let d = Self { child: Some(child), log, lock: t.daemon_lock_path() };
        // A bound, not a measure: a start loads and verifies two programs, which on a loaded
        // 2-core machine has taken over 10 s.
        assert!(
            eventually(Duration::from_secs(30), || scrape(t).is_some_and(|m| m.contains("xdpfw_generation"))),
            "the daemon did not serve metrics within 30 s:\n{}",
            d.log()
        );
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// The daemon's resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.as_ref().unwrap().id())).unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap()
    }

    /// Whether the daemon process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// Waits (at most `timeout`) for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit within {timeout:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.lock);
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

/// The body of GET /metrics from inside the server namespace, or None if nothing answers.
pub fn scrape(t: &Topology) -> Option<String> {
    in_ns(&t.server_ns, || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], METRICS_PORT)), Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
        Some(body.to_string())
    })
    .join()
    .unwrap()
}

/// The metric `key` of the daemon serving `t`, which must be there.
pub fn m(t: &Topology, key: &str) -> f64 {
    metric(&scrape(t).expect("metrics endpoint answers"), key).unwrap_or_else(|| panic!("no {key} in the metrics"))
}

/// Polls the metric `key` until `ok` holds (at most `secs` seconds); its last value.
pub fn wait_metric(t: &Topology, d: &Daemon, key: &str, secs: u64, ok: impl Fn(f64) -> bool) -> f64 {
    let mut last = None;
    let done = eventually(Duration::from_secs(secs), || {
        last = scrape(t).and_then(|s| metric(&s, key));
        last.is_some_and(&ok)
    });
    assert!(done, "{key} stayed at {last:?} for {secs} s\n{}", d.log());
    last.unwrap_or_default()
}

/// The value of the sample whose name and labels start with `key` (e.g. `xdpfw_reloads_total{result="ok"`).
pub fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.strip_prefix(key).is_some_and(|rest| key.contains('{') || rest.starts_with([' ', '{'])))
        .and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

