//! What the integration tests, the benches and the demo share: namespaces and veth
//! ([`topology`]), traffic from real sockets inside the namespaces, the daemon wrapper
//! ([`daemon`]), processes that own sockets ([`owners`]), and the `loader` binary driven as an
//! operator would.

pub mod daemon;
pub mod owners;
pub mod topology;

use std::{
    fs::File,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub use topology::{SERVER_V4, SERVER_V6, Topology};

/// Whether this test can run: root tests skip without root, with the reason on stderr, and fail
/// instead when `XDPFW_REQUIRE_ROOT=1` (as `./run test` and CI set it), so a CI that lost its
/// privileges cannot pass by skipping everything.
pub fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("XDPFW_REQUIRE_ROOT").as_deref() != Ok("1"),
        "this test needs root (network namespaces, BPF) and XDPFW_REQUIRE_ROOT=1 forbids skipping it"
    );
    eprintln!("skipped: this test needs root (network namespaces, BPF); run it with sudo ./run test");
    false
}

/// The `loader` binary under test: `$XDPFW_LOADER`, else the one cargo built beside this test
/// executable (`target/<profile>/loader`; `./run test` builds it first).
pub fn loader_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("XDPFW_LOADER") {
            return p.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        // target/<profile>/deps/<test>-<hash> → target/<profile>/loader
        let bin = exe.parent().and_then(Path::parent).map(|d| d.join("loader")).expect("a target folder");
        assert!(bin.exists(), "{} is missing: build it first (cargo build -p loader), or set XDPFW_LOADER", bin.display());
        bin.to_string_lossy().into_owned()
    })
}

/// The example rulesets (`rules/` at the root of the repository).
pub fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../rules")
}

/// The path of the example ruleset `name` in `rules/`, as an argument.
pub fn rules_file(name: &str) -> String {
    rules_dir().join(name).to_string_lossy().into_owned()
}

/// A fresh topology with the example ruleset `rules_file` attached to its server end, detached
/// again on drop.
pub fn attached(tag: &str, rules_file: &str) -> Topology {
    let mut t = Topology::new(tag).expect("topology");
    t.detach_on_drop(loader_bin());
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", &self::rules_file(rules_file)]);
    t
}

/// The unprivileged system user security tests act as (`xdpfw-test`, created on first use).
pub fn unprivileged_user() -> &'static str {
    const USER: &str = "xdpfw-test";
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !Command::new("id").arg(USER).output().unwrap().status.success() {
            let out = Command::new("useradd").args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER]).output().unwrap();
            assert!(out.status.success() || String::from_utf8_lossy(&out.stderr).contains("exists"), "useradd: {out:?}");
        }
    });
    USER
}

/// Runs `loader --netns NS args...`; returns the output whatever the exit status.
pub fn loader(ns: &str, args: &[&str]) -> Output {
    Command::new(loader_bin()).arg("--netns").arg(ns).args(args).output().expect("running loader")
}

/// Runs the loader and fails the test with its stderr if it fails.
pub fn loader_ok(ns: &str, args: &[&str]) -> String {
    let out = loader(ns, args);
    assert!(
        out.status.success(),
        "loader {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a fresh thread inside network namespace `ns`. Sockets it creates stay in `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A UDP receiver in a namespace that counts datagrams until stopped.
pub struct UdpCounter {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpCounter {
    pub fn start(ns: &str, addr: SocketAddr) -> Self {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = in_ns(ns, move || {
            let sock = UdpSocket::bind(addr).expect("bind receiver");
            // Room for bursts, so the socket never drops what the firewall passed.
            let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
            sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                if sock.recv(&mut buf).is_ok() {
                    c.fetch_add(1, Ordering::SeqCst);
                }
            }
            // Drain what is already queued.
            sock.set_nonblocking(true).unwrap();
            while sock.recv(&mut buf).is_ok() {
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("receiver ready");
        Self { count, stop, thread: Some(thread) }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the count stops changing (packets in flight have landed), stops, returns it.
    pub fn finish(mut self) -> u64 {
        let mut last = self.count();
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let now = self.count();
            if now == last {
                break;
            }
            last = now;
        }
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.count()
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `n` UDP datagrams from namespace `ns` to `to`, paced so no queue overflows.
pub fn send_udp(ns: &str, to: SocketAddr, n: u64) {
    in_ns(ns, move || {
        let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let sock = UdpSocket::bind(bind).unwrap();
        for i in 0..n {
            sock.send_to(&i.to_be_bytes(), to).expect("send");
            if i % 20 == 19 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
    .join()
    .unwrap();
}

/// Sends datagrams from namespace `ns` to the server's UDP ports 7000 and 7001 in turn until
/// `stop` is set; returns how many went to each port. Bounded in count and time whatever happens
/// to `stop`.
pub fn udp_stream(ns: &str, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> JoinHandle<u64> {
    in_ns(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut sent = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) && sent < 2_000_000 && std::time::Instant::now() < deadline {
            for port in [7000, 7001] {
                sock.send_to(&sent.to_be_bytes(), SocketAddr::new(ip(SERVER_V4), port)).unwrap();
            }
            sent += 1;
            if sent.is_multiple_of(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    })
}

/// Starts nginx in the foreground in namespace `ns`, everything of it under `dir` (its config,
/// pid, logs and temp paths; `dir/www` created for its roots). `http` goes into the `http`
/// block: the servers, and formats or an `access_log` if wanted (`{dir}` there is not expanded).
pub fn start_nginx(ns: &str, dir: &std::path::Path, http: &str) -> std::process::Child {
    let d = dir.display();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy; fastcgi_temp_path {d}/tmp-fcgi;\n\
               uwsgi_temp_path {d}/tmp-uwsgi; scgi_temp_path {d}/tmp-scgi;\n{http}}}\n"
        ),
    )
    .unwrap();
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nginx", "-c"])
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting nginx (installed by ./run setup)")
}

/// Counts datagrams `to` receives out of `n` sent from the client namespace.
pub fn udp_delivered(t: &Topology, to: SocketAddr, n: u64) -> u64 {
    let rx = UdpCounter::start(&t.server_ns, to);
    send_udp(&t.client_ns, to, n);
    rx.finish()
}

/// A TCP listener in a namespace that accepts and closes connections until dropped.
pub struct TcpServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    pub fn start(ns: &str, addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = in_ns(ns, move || {
            let l = TcpListener::bind(addr).expect("bind listener");
            l.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((conn, _)) => drop(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("listener ready");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a TCP connection from the client namespace to `to` completes within `timeout`.
pub fn tcp_connects(t: &Topology, to: SocketAddr, timeout: Duration) -> bool {
    in_ns(&t.client_ns, move || TcpStream::connect_timeout(&to, timeout).is_ok()).join().unwrap()
}

/// Echo replies received for `count` pings from the client namespace (bounded by -W and -c).
pub fn ping(t: &Topology, addr: &str, count: u32) -> u32 {
    ping_from(&t.client_ns, addr, count)
}

/// Echo replies received for `count` pings from namespace `ns` (bounded by -W and -c).
pub fn ping_from(ns: &str, addr: &str, count: u32) -> u32 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-q", "-c", &count.to_string(), "-i", "0.05", "-W", "1", addr])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("transmitted"))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" received")))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ping summary in: {text}"))
}

/// `loader stats --json` as a JSON value.
pub fn stats(t: &Topology) -> serde_json::Value {
    let out = loader_ok(&t.server_ns, &["stats", "--iface", &t.server_if, "--json"]);
    serde_json::from_str(&out).expect("stats JSON")
}

/// Packets counted for the rule named `name` in a stats JSON value.
pub fn rule_packets(stats: &serde_json::Value, name: &str) -> u64 {
    stats["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no rule {name} in {stats}"))["packets"]
        .as_u64()
        .unwrap()
}

/// Asserts that nothing of the instance on the topology's server interface is left: no pins,
/// no state.
pub fn assert_no_instance(t: &Topology) {
    let pins = t.pin_dir();
    assert!(!pins.exists(), "pins left at {}", pins.display());
    let state = t.state_dir();
    assert!(!state.exists(), "state left at {}", state.display());
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}
