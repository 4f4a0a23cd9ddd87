//! `cargo bench --bench fleet`: publish-to-all-live latency of a fleet. One nats-server with
//! JetStream in a hub namespace, and as many nodes as the machine holds (target 50): each node
//! is a `loader run --nats` daemon on the veth of its own namespace pair, linked to the hub by a
//! second veth. Every publication is signed and written in-process (`fleet publish` without
//! the process start), then the bench follows the status bucket until every node reports the
//! new revision live.
//!
//! Two rulesets: a small one (one rule, alternating which UDP port it closes) and a large one
//! (a set of `--large-prefixes` prefixes inline, ~18 bytes each: 100k by default, 1.8 MB).
//! NATS's default max_payload (1 MB) is too small for the large one, so the bench's server is
//! given a max_payload fitting it (rounded up to whole MB, at most 64 MB); no chunking.
//!
//! Options: `--nodes N` (50), `--publishes K` (20), `--large-prefixes P` (100000),
//! `--large-publishes L` (as many as `--publishes`), `--large-nodes M` (all: the large ruleset on the first M nodes only, the others are stopped
//! first), `--quick` (5 nodes, 5 publications, 10k prefixes). Nodes are added while the
//! machine keeps 2 GB of memory available and each daemon starts within 10 s; the bench says
//! where it stopped and why. Results: stdout and target/bench/fleet.json.

use xdpfw_testkit::{self as harness, daemon::TempDir, topology::Topology};

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use xdpfw_fleet::{
    async_nats::jetstream::kv,
    bus::{self, NodeStatus},
    ed25519_dalek::SigningKey,
    envelope, ops,
};

const BUCKET: &str = "xdpfw-bench";
const PORT: u16 = 4222;
/// Memory the bench leaves to the rest of the machine (other builds share it).
const KEEP_AVAILABLE_KIB: u64 = 2 * 1024 * 1024;

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemAvailable:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))))
        .unwrap_or(0)
}

/// The hub: a namespace with nats-server, removed with everything in it on drop.
struct Hub {
    ns: String,
    server: Option<Child>,
}

impl Hub {
    fn start(dir: &Path, max_payload_mb: u64) -> Result<Self> {
        let ns = format!("xfw-fbhub-{}", std::process::id() % 100000);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns])?;
        let mut hub = Self { ns, server: None };
        sh(&["ip", "-n", &hub.ns, "link", "set", "lo", "up"])?;
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!("listen: \"0.0.0.0:{PORT}\"\nmax_payload: {max_payload_mb}MB\njetstream {{ store_dir: \"{}\" }}\n", dir.join("js").display()),
        )?;
        let log = std::fs::File::create(dir.join("nats.log"))?;
        hub.server = Some(
            Command::new("ip")
                .args(["netns", "exec", &hub.ns, "nats-server", "-c"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("nats-server (./run setup installs it)")?,
        );
        let ns = hub.ns.clone();
        let up = harness::eventually(Duration::from_secs(10), || {
            let ns = ns.clone();
            harness::in_ns(&ns, || std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], PORT).into(), Duration::from_millis(200)).is_ok()).join().unwrap()
        });
        ensure!(up, "nats-server did not listen: {}", std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default());
        Ok(hub)
    }

    fn link(&self, t: &Topology, i: u16) -> Result<()> {
        let (a, b) = (i / 250, i % 250 + 1);
        let (h, n) = (format!("xb{}-{i}", std::process::id() % 100000), "xbn".to_string());
        sh(&["ip", "-n", &self.ns, "link", "add", &h, "type", "veth", "peer", "name", &n, "netns", &t.server_ns])?;
        sh(&["ip", "-n", &self.ns, "addr", "add", &format!("198.18.{a}.{b}/32"), "dev", &h])?;
        sh(&["ip", "-n", &t.server_ns, "addr", "add", &format!("198.19.{a}.{b}/32"), "dev", &n])?;
        sh(&["ip", "-n", &self.ns, "link", "set", &h, "up"])?;
        sh(&["ip", "-n", &t.server_ns, "link", "set", &n, "up"])?;
        sh(&["ip", "-n", &self.ns, "route", "add", &format!("198.19.{a}.{b}/32"), "dev", &h])?;
        sh(&["ip", "-n", &t.server_ns, "route", "add", &format!("198.18.{a}.{b}/32"), "dev", &n])?;
        Ok(())
    }

    /// Runs `f` with the rules and status buckets from inside the hub.
    fn with_buckets<T: Send + 'static>(&self, f: impl AsyncFnOnce(kv::Store, kv::Store) -> Result<T> + Send + 'static) -> Result<T> {
        harness::in_ns(&self.ns, move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async move {
                let cfg = bus::BusConfig { url: format!("nats://127.0.0.1:{PORT}"), connect_timeout: Duration::from_secs(5), ..Default::default() };
                let js = cfg.connect("bench").await?;
                let rules = bus::rules_bucket(&js, BUCKET, true).await?;
                let status = bus::status_bucket(&js, bus::DEFAULT_STATUS_BUCKET).await?;
                f(rules, status).await
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bus thread panicked"))?
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A node: its namespaces and its daemon (dropped first: the daemon, then the topology, then
/// the instance's lock file in the state root).
struct Node {
    daemon: Option<harness::daemon::Daemon>,
    t: Option<Topology>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.daemon = None;
        if let Some(t) = self.t.take() {
            let lock = xdpfw_control::instance::state_root().join(format!("{}.lock", t.server_if));
            drop(t);
            let _ = std::fs::remove_file(lock);
        }
    }
}

fn start_node(hub: &Hub, dir: &Path, public: &Path, i: u16) -> Result<Node> {
    let mut t = Topology::new("fb").map_err(anyhow::Error::msg)?;
    t.detach_on_drop(harness::loader_bin());
    hub.link(&t, i)?;
    let url = format!("nats://198.18.{}.{}:{PORT}", i / 250, i % 250 + 1);
    let id = format!("bench-{i}");
    // The watch delivers; the poll (the safety net) is slow enough not to.
    let args = [
        "--nats", &url, "--bucket", BUCKET, "--key", "rules", "--node-id", &id, "--trusted-key", public.to_str().unwrap(), "--heartbeat", "10s", "--poll-interval",
        "60s", "--min-interval", "0s",
    ];
    let (dir, t2) = (dir.to_path_buf(), &t);
    let daemon = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| harness::daemon::Daemon::start(t2, &dir, &args)))
        .map_err(|e| anyhow::anyhow!("{}", e.downcast_ref::<String>().map_or("the daemon did not start", |s| s.lines().next().unwrap_or(""))))?;
    Ok(Node { daemon: Some(daemon), t: Some(t) })
}

fn small_ruleset(version: &str, port: u16) -> String {
    format!("version = \"{version}\"\ndefault = \"pass\"\n\n[[rule]]\nname = \"close\"\naction = \"drop\"\nproto = \"udp\"\ndport = {port}\n")
}

/// `n` distinct prefixes (80% /24, 20% /32 in 10/8), inline; the version line comes first so
/// each publication changes only it.
fn large_ruleset(n: usize) -> String {
    let mut rng = StdRng::seed_from_u64(14);
    let mut seen = std::collections::HashSet::with_capacity(n);
    let mut body = String::with_capacity(n * 20);
    body.push_str("default = \"pass\"\n\n[sets.block]\nprefixes = [\n");
    while seen.len() < n {
        let len = if rng.random_bool(0.8) { 24 } else { 32 };
        let a: u32 = (rng.random::<u32>() & 0x00ff_ffff | 0x0a00_0000) & (u32::MAX << (32 - len));
        if seen.insert((a, len)) {
            let _ = writeln!(body, "\"{}/{len}\",", std::net::Ipv4Addr::from(a));
        }
    }
    body.push_str("]\n\n[[rule]]\nname = \"blocklist\"\naction = \"drop\"\nsrc = [\"@block\"]\n");
    body
}

/// Publishes `bodies` one after the other; for each, the time until every one of `nodes`
/// reports it live (and every node's own time).
fn run(hub: &Hub, signing: SigningKey, bodies: Vec<String>, nodes: usize, timeout: Duration) -> Result<(Vec<f64>, Vec<f64>)> {
    hub.with_buckets(async move |rules, status| {
        let (mut all_live, mut per_node) = (Vec::new(), Vec::new());
        let mut watch = status.watch_all().await?;
        for (p, body) in bodies.iter().enumerate() {
            let t0 = Instant::now();
            let version = body.lines().find_map(|l| l.strip_prefix("version = ")).map(|v| v.trim_matches('"').to_string());
            let rev = ops::publish(&rules, "rules", body.as_bytes(), version, &signing).await?;
            let mut live: HashMap<String, f64> = HashMap::new();
            let deadline = t0 + timeout;
            while live.len() < nodes {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(Some(e)) = tokio::time::timeout(left, watch.next()).await else {
                    bail!("publication {p} (revision {rev}): {} of {nodes} nodes live after {timeout:?}", live.len());
                };
                let e = e?;
                if let Ok(s) = serde_json::from_slice::<NodeStatus>(&e.value) {
                    if s.attempted_revision == rev && s.result != "ok" && s.result != "pending" {
                        bail!("{} refused revision {rev}: {}", s.node, s.error.unwrap_or_default());
                    }
                    if s.revision == rev && s.result == "ok" {
                        live.entry(s.node).or_insert_with(|| t0.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
            let last = live.values().cloned().fold(0.0, f64::max);
            eprintln!("  publication {:>2}: revision {rev}, {nodes} nodes live after {last:.1} ms", p + 1);
            all_live.push(last);
            per_node.extend(live.into_values());
        }
        Ok((all_live, per_node))
    })
}

/// Nearest-rank percentile.
fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "the fleet bench needs root (namespaces, XDP)");
    let quick = std::env::args().any(|a| a == "--quick");
    let want: u16 = arg("--nodes").unwrap_or(if quick { 5 } else { 50 });
    let publishes: usize = arg("--publishes").unwrap_or(if quick { 5 } else { 20 });
    let prefixes: usize = arg("--large-prefixes").unwrap_or(if quick { 10_000 } else { 100_000 });
    let large_nodes: Option<usize> = arg("--large-nodes");
    // Each large publication is applied by every node at once, on this machine's few cores: a
    // 1M-prefix one to 50 nodes takes minutes, so fewer of them may be asked for.
    let large_publishes: usize = arg("--large-publishes").unwrap_or(publishes);
    ensure!((1..=1000).contains(&want), "--nodes 1..1000");

    let dir = TempDir::new("fleet-bench");
    let large = large_ruleset(prefixes);
    let max_payload_mb = ((large.len() as u64 + 4096) / (1 << 20) + 1).clamp(1, 64);
    ensure!(large.len() < 64 << 20, "the large ruleset ({} bytes) exceeds NATS's 64 MB payload ceiling", large.len());
    let hub = Hub::start(&dir.0, max_payload_mb)?;
    let signing = SigningKey::from_bytes(&rand::random());
    let public = dir.0.join("fleet.pub");
    std::fs::write(&public, format!("xdpfw-ed25519-public {}\n", envelope::hex(signing.verifying_key().as_bytes())))?;
    // A first value, so the nodes have something to follow from the start.
    hub.with_buckets({
        let (s, b) = (signing.clone(), small_ruleset("warmup", 7000));
        async move |rules, _| ops::publish(&rules, "rules", b.as_bytes(), None, &s).await.map(drop)
    })?;

    let t0 = Instant::now();
    let mut nodes: Vec<Node> = Vec::new();
    let mut stopped = format!("reached the {want} nodes asked for");
    for i in 1..=want {
        let avail = mem_available_kib();
        if avail < KEEP_AVAILABLE_KIB {
            stopped = format!("stopped at {} nodes: {} MB of memory available, the bench keeps 2 GB for the machine", nodes.len(), avail / 1024);
            break;
        }
        match start_node(&hub, &dir.0, &public, i) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                stopped = format!("stopped at {} nodes: node {i} did not start: {e:#}", nodes.len());
                break;
            }
        }
    }
    let held = nodes.len();
    let rss: u64 = nodes.iter().filter_map(|n| n.daemon.as_ref()).map(harness::daemon::Daemon::rss_kib).sum();
    eprintln!("{held} nodes up in {:.1}s ({stopped}); daemons' RSS {} MB in all", t0.elapsed().as_secs_f64(), rss / 1024);
    ensure!(held > 0, "no node started: {stopped}");

    let small: Vec<String> = (0..publishes).map(|p| small_ruleset(&format!("small-{p}"), if p % 2 == 0 { 7001 } else { 7000 })).collect();
    eprintln!("small ruleset ({} bytes) to {held} nodes:", small[0].len());
    let (small_all, small_each) = run(&hub, signing.clone(), small, held, Duration::from_secs(60))?;
    let rss_small: u64 = nodes.iter().filter_map(|n| n.daemon.as_ref()).map(harness::daemon::Daemon::rss_kib).sum();

    // The large ruleset, on fewer nodes if asked (the others stop: their status ages out of the
    // count since the bench counts only nodes reporting the new revision).
    let large_n = large_nodes.unwrap_or(held).min(held);
    for n in nodes.iter_mut().skip(large_n) {
        n.daemon = None;
    }
    let bodies: Vec<String> = (0..large_publishes).map(|p| format!("version = \"large-{p}\"\n{large}")).collect();
    eprintln!("large ruleset ({prefixes} prefixes, {} bytes; max_payload {max_payload_mb} MB) to {large_n} nodes:", bodies[0].len());
    let (large_all, large_each) = run(&hub, signing, bodies, large_n, Duration::from_secs(600))?;
    let rss_large: u64 = nodes.iter().filter_map(|n| n.daemon.as_ref()).map(harness::daemon::Daemon::rss_kib).sum();

    let row = |name: &str, bytes: usize, n: usize, all: &[f64], each: &[f64]| {
        format!(
            "{name:<22} {bytes:>10} {n:>6} {:>5} {:>9.1} {:>9.1} {:>9.1}   {:>9.1} {:>9.1}",
            all.len(),
            pct(all, 50.0),
            pct(all, 99.0),
            all.iter().cloned().fold(0.0, f64::max),
            pct(each, 50.0),
            pct(each, 99.0)
        )
    };
    println!("\nfleet: publish-to-all-live latency (ms; signed publish in-process → the status bucket shows every node live)");
    println!("{held} nodes held ({stopped}); daemons' RSS in all: {} MB at start, {} MB after the small runs, {} MB with the large ruleset", rss / 1024, rss_small / 1024, rss_large / 1024);
    println!("{:<22} {:>10} {:>6} {:>5} {:>9} {:>9} {:>9}   {:>9} {:>9}", "ruleset", "bytes", "nodes", "pubs", "all p50", "all p99", "all max", "node p50", "node p99");
    println!("{}", row("small (1 rule)", small_ruleset("small-0", 7000).len(), held, &small_all, &small_each));
    println!("{}", row(&format!("large ({prefixes} prefixes)"), large.len() + 22, large_n, &large_all, &large_each));
    println!("(p99 of {publishes} (small) and {large_publishes} (large) publications is their maximum by nearest rank; node p50/p99 are over every node of every publication)");
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    let json = serde_json::json!({
        "nodes_held": held, "stopped": stopped, "publishes": publishes, "large_publishes": large_publishes, "max_payload_mb": max_payload_mb,
        "rss_mb": { "start": rss / 1024, "small": rss_small / 1024, "large": rss_large / 1024 },
        "small": { "bytes": small_ruleset("small-0", 7000).len(), "nodes": held, "all_live_ms": small_all, "p50_ms": pct(&small_all, 50.0), "p99_ms": pct(&small_all, 99.0), "node_p50_ms": pct(&small_each, 50.0), "node_p99_ms": pct(&small_each, 99.0) },
        "large": { "prefixes": prefixes, "bytes": large.len() + 22, "nodes": large_n, "all_live_ms": large_all, "p50_ms": pct(&large_all, 50.0), "p99_ms": pct(&large_all, 99.0), "node_p50_ms": pct(&large_each, 50.0), "node_p99_ms": pct(&large_each, 99.0) },
    });
    std::fs::write(out.join("fleet.json"), serde_json::to_string_pretty(&json)?)?;
    println!("JSON: target/bench/fleet.json");
    // Daemons, then topologies (detached), then the hub go in that order.
    drop(nodes);
    drop(hub);
    Ok(())
}
