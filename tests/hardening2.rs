//! Hardening, second round (issue 10): instance identity by namespace and ifindex, the filtering
//! invariant under a running daemon, snapshots of exactly the bytes parsed, and secrets kept out
//! of labels, logs and reach. Each test failed on the code before the fix it covers.

use xdpfw_testkit as harness;

use std::{net::SocketAddr, time::Duration};

use harness::{daemon::*, *};

const N: u64 = 20;

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

fn topology(tag: &str) -> Topology {
    let mut t = Topology::new(tag).expect("topology");
    t.detach_on_drop(loader_bin());
    t
}

/// (delivered to udp/7000, delivered to udp/7001) out of N each.
fn udp_verdicts(t: &Topology) -> (u64, u64) {
    (udp_delivered(t, sa(SERVER_V4, 7000), N), udp_delivered(t, sa(SERVER_V4, 7001), N))
}

const CLOSE_7000: &str = "version = \"close-7000\"\ndefault = \"pass\"\n[[rule]]\nname = \"close-7000\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7000\n";
const CLOSE_7001: &str = "version = \"close-7001\"\ndefault = \"pass\"\n[[rule]]\nname = \"close-7001\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7001\n";

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

// ---- 1. an instance is (network namespace, ifindex) ----

#[test]
fn the_same_interface_name_in_two_namespaces_is_two_instances() {
    let a = topology("hida");
    // B's server end has the same name as A's, in another namespace.
    let mut b = Topology::with_server_if("hidb", Some(&a.server_if)).expect("topology");
    b.detach_on_drop(loader_bin());
    assert_eq!(a.server_if, b.server_if);
    let iface = a.server_if.as_str();
    let dir = TempDir::new("hid");
    let (ra, rb) = (dir.0.join("a.toml"), dir.0.join("b.toml"));
    std::fs::write(&ra, CLOSE_7000).unwrap();
    std::fs::write(&rb, CLOSE_7001).unwrap();

    loader_ok(&a.server_ns, &["attach", iface, "--rules", ra.to_str().unwrap()]);
    // Not "already attached": A's instance is another interface.
    loader_ok(&b.server_ns, &["attach", iface, "--rules", rb.to_str().unwrap()]);
    assert_eq!(udp_verdicts(&a), (0, N), "A filters with its ruleset");
    assert_eq!(udp_verdicts(&b), (N, 0), "B filters with its own");
    assert_ne!(a.pin_dir(), b.pin_dir());
    assert!(a.pin_dir().join("link").exists() && b.pin_dir().join("link").exists());

    // Each namespace sees its own instance; `list` shows both, with their namespaces.
    let sa_ = json(&loader_ok(&a.server_ns, &["status", "--iface", iface, "--json"]));
    assert_eq!(sa_["state"]["ruleset"]["version"], "close-7000");
    assert_eq!(sa_["state"]["netns"]["name"], a.server_ns.as_str());
    assert!(sa_["state"]["ifindex"].as_u64().unwrap() > 0);
    let sb = json(&loader_ok(&b.server_ns, &["status", "--json"]));
    assert_eq!(sb["state"]["ruleset"]["version"], "close-7001", "the only instance of B's namespace");
    let list = json(&loader_ok(&a.server_ns, &["list", "--json"]));
    let rows: Vec<&serde_json::Value> = list["instances"].as_array().unwrap().iter().filter(|r| r["iface"] == iface).collect();
    assert_eq!(rows.len(), 2, "{list}");
    let mut names: Vec<&str> = rows.iter().map(|r| r["netns"].as_str().unwrap()).collect();
    names.sort();
    let mut want = vec![a.server_ns.as_str(), b.server_ns.as_str()];
    want.sort();
    assert_eq!(names, want);
    assert!(rows.iter().all(|r| r["netns_inode"].as_u64().unwrap() > 0 && r["ifindex"].as_u64().unwrap() > 0));
    let text = loader_ok(&b.server_ns, &["list"]);
    assert!(text.lines().any(|l| l.contains(iface) && l.contains(&a.server_ns)) && text.lines().any(|l| l.contains(iface) && l.contains(&b.server_ns)), "{text}");

    // History is kept by namespace name and interface name.
    assert!(a.history_dir().join("history.jsonl").exists() && b.history_dir().join("history.jsonl").exists());

    // Detaching in B leaves A filtering.
    loader_ok(&b.server_ns, &["detach", iface]);
    assert_eq!(udp_verdicts(&b), (N, N), "B is detached");
    assert_eq!(udp_verdicts(&a), (0, N), "A still filters");
    assert!(a.pin_dir().join("link").exists());
    assert_no_instance(&b);
    // And a detach in a namespace with no instance touches nothing.
    let out = loader(&b.server_ns, &["detach", iface]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(udp_verdicts(&a), (0, N));
    // A reload in A changes A.
    loader_ok(&a.server_ns, &["reload", rb.to_str().unwrap(), "--iface", iface]);
    assert_eq!(udp_verdicts(&a), (N, 0));
}

// ---- 13. the filtering invariant under a running daemon ----

fn metric_of(t: &Topology, key: &str) -> Option<f64> {
    scrape(t).and_then(|s| metric(&s, key))
}

/// Waits up to `secs` for `key` to reach `want`.
fn wait_for(t: &Topology, d: &Daemon, key: &str, want: f64, secs: u64) {
    let mut last = None;
    let ok = eventually(Duration::from_secs(secs), || {
        last = metric_of(t, key);
        last == Some(want)
    });
    assert!(ok, "{key} stayed at {last:?} (want {want}) for {secs} s\n{}", d.log());
}

#[test]
fn a_daemon_attaches_again_what_vanished_under_it() {
    let t = topology("hrep");
    let dir = TempDir::new("hrep");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, CLOSE_7000).unwrap();
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap()]);
    assert_eq!(udp_verdicts(&t), (0, N));
    assert_eq!(metric_of(&t, "xdpfw_repairs_total"), Some(0.0));

    // A manual detach: the daemon notices within seconds and attaches its live ruleset again.
    loader_ok(&t.server_ns, &["detach", &t.server_if]);
    wait_for(&t, &d, "xdpfw_repairs_total", 1.0, 10);
    assert_eq!(udp_verdicts(&t), (0, N), "filtered again by the ruleset that was live\n{}", d.log());
    assert!(d.log().contains("stopped filtering"), "{}", d.log());
    let status = json(&loader_ok(&t.server_ns, &["status", "--iface", &t.server_if, "--json"]));
    assert_eq!(status["state"]["ruleset"]["version"], "close-7000");

    // The pins removed by hand (the link goes with its last reference).
    std::fs::remove_dir_all(t.pin_dir()).unwrap();
    wait_for(&t, &d, "xdpfw_repairs_total", 2.0, 10);
    assert_eq!(udp_verdicts(&t), (0, N), "{}", d.log());

    // The link detached in the kernel, its pin left in place.
    let link = t.pin_dir().join("link");
    let out = std::process::Command::new("bpftool").args(["link", "detach", "pinned"]).arg(&link).output().unwrap();
    if out.status.success() {
        wait_for(&t, &d, "xdpfw_repairs_total", 3.0, 10);
        assert_eq!(udp_verdicts(&t), (0, N), "{}", d.log());
    } else {
        eprintln!("bpftool link detach unavailable: {}", String::from_utf8_lossy(&out.stderr));
    }
    // A reload after the repairs goes through the same instance.
    std::fs::write(&rules, CLOSE_7001).unwrap();
    assert!(eventually(Duration::from_secs(10), || udp_verdicts(&t) == (N, 0)), "{}", d.log());
}

#[test]
fn a_fail_closed_daemon_attaches_the_fail_closed_ruleset_again() {
    let t = topology("hrfc");
    let dir = TempDir::new("hrfc");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, "default = \"pass\"\n[[rule]]\naction = \"nope\"\n").unwrap();
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--fail-closed"]);
    assert_eq!(metric_of(&t, "xdpfw_fail_closed"), Some(1.0));
    assert_eq!(udp_verdicts(&t), (0, 0));
    loader_ok(&t.server_ns, &["detach", &t.server_if]);
    wait_for(&t, &d, "xdpfw_repairs_total", 1.0, 10);
    assert_eq!(udp_verdicts(&t), (0, 0), "fail-closed again\n{}", d.log());
    assert_eq!(metric_of(&t, "xdpfw_fail_closed"), Some(1.0));
}

// ---- 7. snapshots of exactly the bytes that were parsed ----

#[test]
fn rollback_and_last_good_restore_exactly_the_bytes_that_went_live() {
    let t = topology("hsnp");
    let dir = TempDir::new("hsnp");
    let (rules_dir, sets_dir) = (dir.0.join("rules"), dir.0.join("sets"));
    std::fs::create_dir_all(&rules_dir).unwrap();
    std::fs::create_dir_all(&sets_dir).unwrap();
    let pass = rules_dir.join("pass.toml");
    std::fs::write(&pass, "version = \"pass\"\ndefault = \"pass\"\n").unwrap();
    // Set files outside the rules file's folder: one by absolute path, one through "..".
    let (s, u) = (sets_dir.join("s.txt"), sets_dir.join("u.txt"));
    std::fs::write(&s, "192.0.2.0/24\n").unwrap();
    std::fs::write(&u, "198.51.100.0/24\n").unwrap();
    let rules = rules_dir.join("rules.toml");
    std::fs::write(
        &rules,
        format!(
            "version = \"sets\"\ndefault = \"pass\"\n[sets.s]\nfile = \"{}\"\n[sets.u]\nfile = \"../sets/u.txt\"\n\
             [[rule]]\nname = \"s-7000\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7000\nsrc = [\"@s\"]\n\
             [[rule]]\nname = \"u-7001\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7001\nsrc = [\"@u\"]\n",
            s.display()
        ),
    )
    .unwrap();
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", pass.to_str().unwrap()]);

    // A reload that parses, then waits for the lock: the set files change in between.
    let lock = std::fs::File::options().write(true).open(t.lock_path()).unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap_or_else(|(_, e)| panic!("lock: {e}"));
    let reload = std::process::Command::new(loader_bin())
        .args(["--netns", &t.server_ns, "reload", rules.to_str().unwrap(), "--iface", &t.server_if])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&s, "198.51.100.0/24\n").unwrap();
    std::fs::write(&u, "192.0.2.0/24\n").unwrap();
    drop(held);
    let out = reload.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(udp_verdicts(&t), (0, N), "what was parsed went live: the client is in s");
    let shown = json(&loader_ok(&t.server_ns, &["show", "--iface", &t.server_if, "--sets", "--json"]));
    let text_of = |name: &str| -> String {
        shown["set_files"].as_array().unwrap().iter().find(|f| f["file"].as_str().unwrap().ends_with(name)).unwrap()["text"].as_str().unwrap().to_string()
    };
    assert_eq!(text_of("s.txt"), "192.0.2.0/24\n", "show says what went live: {shown}");
    assert_eq!(text_of("u.txt"), "198.51.100.0/24\n");

    // Something else, then back: the rollback restores the bytes that were live, not the files.
    loader_ok(&t.server_ns, &["reload", pass.to_str().unwrap(), "--iface", &t.server_if]);
    assert_eq!(udp_verdicts(&t), (N, N));
    loader_ok(&t.server_ns, &["rollback", "--iface", &t.server_if]);
    assert_eq!(udp_verdicts(&t), (0, N), "the rollback restores what was live");

    // The set files gone altogether: `attach --last-good` still restores it.
    std::fs::remove_dir_all(&sets_dir).unwrap();
    loader_ok(&t.server_ns, &["detach", &t.server_if]);
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--last-good"]);
    assert_eq!(udp_verdicts(&t), (0, N), "--last-good restores what was live");
    let status = json(&loader_ok(&t.server_ns, &["status", "--iface", &t.server_if, "--json"]));
    assert_eq!(status["state"]["ruleset"]["version"], "sets");
}

// ---- 14. secrets and exposure ----

/// A minimal HTTP server in the client namespace: `route(path)` gives the whole response.
struct MiniHttp {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MiniHttp {
    fn start(t: &Topology, port: u16, route: fn(&str) -> String) -> Self {
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = in_ns(&t.client_ns, move || {
            let listener = std::net::TcpListener::bind(sa(harness::topology::CLIENT_V4, port)).unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 4096];
                let n = conn.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let _ = conn.write_all(route(&path).as_bytes());
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("server up");
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for MiniHttp {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ok_body(body: &str) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

fn redirect(to: &str) -> String {
    format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
}

fn route_a(path: &str) -> String {
    match path.split('?').next().unwrap_or("") {
        "/same" => redirect("/rules.toml"),
        "/away" => redirect("http://192.0.2.1:8090/rules.toml"),
        "/rules.toml" => ok_body(CLOSE_7000),
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
    }
}

fn route_b(_: &str) -> String {
    ok_body(CLOSE_7001)
}

#[test]
fn url_secrets_stay_out_of_logs_and_labels_and_redirects_stay_on_the_host() {
    let t = topology("hsec");
    let dir = TempDir::new("hsec");
    let _a = MiniHttp::start(&t, 8089, route_a);
    let _b = MiniHttp::start(&t, 8090, route_b);

    // Credentials and a token in the URL; a redirect on the same host is followed.
    let url = "http://alice:SECRETPW@192.0.2.1:8089/same?token=SECRETTOK";
    let d = Daemon::start(&t, &dir.0, &["--url", url, "--poll-interval", "200ms"]);
    wait_for(&t, &d, "xdpfw_reloads_total{result=\"ok\"}", 1.0, 10);
    assert_eq!(udp_verdicts(&t), (0, N));
    let metrics = scrape(&t).unwrap();
    assert!(metrics.contains("url=\"http://***:***@192.0.2.1:8089/same?token=***\""), "{metrics}");
    assert!(!metrics.contains("SECRET") && !d.log().contains("SECRET"), "{metrics}\n{}", d.log());
    drop(d);

    // A failing fetch (nothing listens) says so without the secrets.
    let d = Daemon::start(&t, &dir.0, &["--url", "http://bob:SECRETPW@192.0.2.1:8099/r?sig=SECRETTOK", "--poll-interval", "200ms", "--backoff-max", "200ms"]);
    assert!(eventually(Duration::from_secs(10), || d.log().contains("failed")), "{}", d.log());
    assert!(!d.log().contains("SECRET") && !scrape(&t).unwrap().contains("SECRET"), "{}", d.log());
    drop(d);

    // A redirect to another host (here: another port) is refused, the live ruleset stays.
    let d = Daemon::start(&t, &dir.0, &["--url", "http://192.0.2.1:8089/away", "--poll-interval", "200ms", "--backoff-max", "200ms"]);
    assert!(eventually(Duration::from_secs(10), || d.log().contains("another host")), "{}", d.log());
    assert_eq!(metric_of(&t, "xdpfw_reloads_total{result=\"ok\"}"), Some(0.0));
    assert_eq!(udp_verdicts(&t), (0, N), "the ruleset live before keeps serving");
    drop(d);
    // Unless allowed.
    let d = Daemon::start(&t, &dir.0, &["--url", "http://192.0.2.1:8089/away", "--allow-redirect-host", "--poll-interval", "200ms"]);
    wait_for(&t, &d, "xdpfw_reloads_total{result=\"ok\"}", 1.0, 10);
    assert_eq!(udp_verdicts(&t), (N, 0));
}

#[test]
fn metrics_on_a_public_address_need_metrics_public() {
    let t = topology("hmet");
    let dir = TempDir::new("hmet");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, CLOSE_7000).unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(loader_bin())
            .args(["--netns", &t.server_ns, "run", &t.server_if, "--rules", rules.to_str().unwrap(), "--metrics", "0.0.0.0:9465"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut refused = run(&[]);
    assert!(eventually(Duration::from_secs(10), || refused.try_wait().unwrap().is_some()), "still running");
    let out = refused.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--metrics-public"), "{err}");
    assert!(!t.pin_dir().exists(), "nothing was attached");

    let mut public = run(&["--metrics-public"]);
    let reachable = eventually(Duration::from_secs(10), || {
        let addr = sa(SERVER_V4, 9465);
        in_ns(&t.client_ns, move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()).join().unwrap()
    });
    let _ = public.kill();
    let _ = public.wait();
    assert!(reachable, "--metrics-public serves on all addresses");
}
