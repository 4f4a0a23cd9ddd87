//! `loader run`, the daemon, as systemd would run it: a child process in the server namespace,
//! fed by a watched file or by a real HTTP server (nginx) in the client namespace, judged by
//! real traffic and by its own Prometheus endpoint. Every wait is bounded.

use xdpfw_testkit as harness;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use harness::{daemon::*, *};

const N: u64 = 30;

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

fn rules_text(name: &str) -> String {
    std::fs::read_to_string(rules_dir().join(name)).unwrap()
}

/// Replaces `path` the way editors and deploy tools do: write a temporary file, rename it over.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}


/// Waits for the daemon's `ok`-th successful reload (counted once it is complete: the kernel's
/// generation flips earlier, during the pipeline), then checks the generation it made live.
fn wait_reloads(t: &Topology, d: &Daemon, ok: u64, generation: u64) {
    wait_metric(t, d, "xdpfw_reloads_total{result=\"ok\"}", 10, |n| n == ok as f64);
    assert_eq!(m(t, "xdpfw_generation"), generation as f64, "{}", d.log());
}

/// (delivered to udp/7000, delivered to udp/7001) out of N each.
fn udp_verdicts(t: &Topology) -> (u64, u64) {
    (udp_delivered(t, sa(SERVER_V4, 7000), N), udp_delivered(t, sa(SERVER_V4, 7001), N))
}

const CLOSED_7000: (u64, u64) = (0, N);
const CLOSED_7001: (u64, u64) = (N, 0);

fn topology(tag: &str) -> Topology {
    let mut t = Topology::new(tag).expect("topology");
    t.detach_on_drop(loader_bin());
    t
}

#[test]
fn file_source_follows_renames_in_place_writes_and_sighup() {
    if !harness::root_or_skip() {
        return;
    }
    let t = topology("dfil");
    let dir = TempDir::new("file");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, rules_text("udp-7000-closed.toml")).unwrap();
    // systemd's notification socket, as Type=notify sets it up.
    let notify_path = dir.0.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut d = Daemon::start_with_env(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--min-interval", "100ms"], &[("NOTIFY_SOCKET", &notify_path)]);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(m(&t, "xdpfw_generation"), 1.0, "attached directly with the file");
    assert_eq!(udp_verdicts(&t), CLOSED_7000);
    let s = scrape(&t).unwrap();
    assert_eq!(metric(&s, "xdpfw_rule_packets_total{iface=\"").unwrap(), N as f64, "close-7000 counted every datagram:\n{s}");
    assert!(s.contains("rule=\"close-7000\"} 30\n"), "{s}");

    // An editor's save: a new inode renamed over the path.
    write_atomic(&rules, &rules_text("udp-7001-closed.toml"));
    wait_reloads(&t, &d, 1, 2);
    assert_eq!(udp_verdicts(&t), CLOSED_7001);

    // An in-place write (truncate, write): same inode.
    std::fs::OpenOptions::new().write(true).truncate(true).open(&rules).unwrap().write_all(rules_text("udp-7000-closed.toml").as_bytes()).unwrap();
    wait_reloads(&t, &d, 2, 3);
    assert_eq!(udp_verdicts(&t), CLOSED_7000);

    // Touching the file without changing it reloads nothing.
    let f = std::fs::File::options().append(true).open(&rules).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(m(&t, "xdpfw_generation"), 3.0, "an unchanged file is not reloaded");
    // Idle means idle: no check runs without an event (the daemon's own reads are not events).
    let checks = m(&t, "xdpfw_source_file_checks_total");
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(m(&t, "xdpfw_source_file_checks_total"), checks, "checks without a change:\n{}", d.log());

    // `loader reload` still works beside the daemon; SIGHUP makes the daemon re-apply its file.
    loader_ok(&t.server_ns, &["reload", &rules_dir().join("udp-7001-closed.toml").to_string_lossy(), "--iface", &t.server_if]);
    assert_eq!(m(&t, "xdpfw_generation"), 4.0);
    assert_eq!(udp_verdicts(&t), CLOSED_7001);
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_reloads(&t, &d, 3, 5);
    assert_eq!(udp_verdicts(&t), CLOSED_7000, "SIGHUP re-applied the watched file");
    let s = scrape(&t).unwrap();
    assert_eq!(metric(&s, "xdpfw_reloads_total{result=\"ok\"}"), Some(3.0), "rename, in-place write, SIGHUP:\n{s}");
    assert_eq!(metric(&s, "xdpfw_reloads_total{result=\"failed\"}"), Some(0.0));
    assert!(metric(&s, "xdpfw_last_reload_phase_seconds{phase=\"total\"}").unwrap() > 0.0, "{s}");
    assert!(metric(&s, "xdpfw_last_reload_phase_seconds{phase=\"grace\"}").is_some(), "{s}");
    assert!(metric(&s, "xdpfw_last_reload_timestamp_seconds").unwrap() > 1.7e9, "{s}");
    assert!(metric(&s, "xdpfw_seen_total{iface=").unwrap() >= (8 * N) as f64, "global counters from GlobalStats:\n{s}");
    assert!(metric(&s, "xdpfw_dropped_total{iface=").unwrap() >= (4 * N) as f64, "{s}");

    // SIGTERM: the daemon stops, the firewall keeps filtering.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success(), "{}", d.log());
    // STATUS= lines (one per reload, see tests/systemd.rs) come before it.
    let mut statuses = 0;
    loop {
        let n = notify.recv(&mut buf).expect("STOPPING=1 from the daemon");
        if buf[..n].starts_with(b"STATUS=") {
            statuses += 1;
            continue;
        }
        assert_eq!(&buf[..n], b"STOPPING=1");
        break;
    }
    assert!(statuses >= 4, "STATUS= at the start and after each of the 3 reloads: {statuses}");
    assert!(t.pin_dir().join("link").exists(), "still attached after SIGTERM");
    assert_eq!(udp_verdicts(&t), CLOSED_7000, "the last ruleset keeps serving without the daemon");
}

#[test]
fn a_set_file_change_reloads_and_a_second_daemon_is_refused() {
    if !harness::root_or_skip() {
        return;
    }
    let t = topology("dset");
    let dir = TempDir::new("set");
    let rules = dir.0.join("rules.toml");
    std::fs::create_dir_all(dir.0.join("sets")).unwrap();
    let set = dir.0.join("sets/blocked.txt");
    std::fs::write(&set, "198.51.100.0/24\n").unwrap();
    std::fs::write(
        &rules,
        "version = \"set\"\ndefault = \"pass\"\n[sets.blocked]\nfile = \"sets/blocked.txt\"\n\n\
         [[rule]]\nname = \"blocked-7000\"\naction = \"drop\"\nsrc = [\"@blocked\"]\nproto = \"udp\"\ndport = 7000\n",
    )
    .unwrap();
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--min-interval", "100ms"]);
    assert_eq!(udp_verdicts(&t), (N, N), "the client is not in the set yet");

    // The set file lives in another directory than the rules file; it is watched too.
    write_atomic(&set, "198.51.100.0/24\n192.0.2.0/24\n");
    wait_reloads(&t, &d, 1, 2);
    assert_eq!(udp_verdicts(&t), CLOSED_7000, "the client's prefix joined the set");

    // One daemon per interface: a second exits at once with a clear error.
    let mut second = Command::new(loader_bin())
        .args(["--netns", &t.server_ns, "run", &t.server_if, "--rules", rules.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            panic!("a second daemon kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    second.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success() && err.contains("already managing"), "{status}: {err}");
    assert_eq!(m(&t, "xdpfw_generation"), 2.0, "the first daemon's firewall is untouched");
}

#[test]
fn min_interval_spaces_reloads_and_coalesces_a_burst() {
    if !harness::root_or_skip() {
        return;
    }
    let t = topology("dmin");
    let dir = TempDir::new("min");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, rules_text("udp-7000-closed.toml")).unwrap();
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--min-interval", "1500ms"]);
    let info = |s: &str| s.lines().find(|l| l.starts_with("xdpfw_ruleset_info")).unwrap_or("").to_string();
    let original = info(&scrape(&t).unwrap());

    write_atomic(&rules, &rules_text("udp-7001-closed.toml"));
    wait_reloads(&t, &d, 1, 2);
    let first = m(&t, "xdpfw_last_reload_timestamp_seconds");
    // Six changes 300 ms apart (each its own burst of events), the last one back to the
    // original file.
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        let text = if i == 5 { rules_text("udp-7000-closed.toml") } else { format!("{}# change {i}\n", rules_text("udp-7001-closed.toml")) };
        write_atomic(&rules, &text);
    }
    let settled = eventually(Duration::from_secs(10), || scrape(&t).is_some_and(|s| info(&s) == original));
    assert!(settled, "the last change went live:\n{}", d.log());
    let s = scrape(&t).unwrap();
    let ok = metric(&s, "xdpfw_reloads_total{result=\"ok\"}").unwrap();
    assert!((2.0..=3.0).contains(&ok), "seven changes in 2 s under a 1.5 s minimum interval: {ok} reloads\n{}", d.log());
    let last = metric(&s, "xdpfw_last_reload_timestamp_seconds").unwrap();
    assert!(last - first >= 1.45 * (ok - 1.0), "reloads at least 1.5 s apart: {:.3} s for {ok}", last - first);
    assert_eq!(udp_verdicts(&t), CLOSED_7000);
}

#[test]
fn a_bad_file_is_rejected_counted_and_the_previous_rules_keep_serving() {
    if !harness::root_or_skip() {
        return;
    }
    let t = topology("dbad");
    let dir = TempDir::new("bad");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, rules_text("udp-7000-closed.toml")).unwrap();
    let mut d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--min-interval", "100ms", "--detach-on-exit"]);

    // A syntax error, then a self-test that fails in the kernel: neither goes live.
    write_atomic(&rules, "default = \"pass\"\n[[rule]\naction = \"drop\"\n");
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"failed\"}", 10, |n| n == 1.0);
    let mut failing = rules_text("udp-7001-closed.toml");
    failing.push_str("\n[[test]]\npacket = \"udp 192.0.2.1:5000 -> 192.0.2.2:7001\"\nexpect = \"pass\"\n");
    write_atomic(&rules, &failing);
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"failed\"}", 10, |n| n == 2.0);
    let s = scrape(&t).unwrap();
    assert_eq!(metric(&s, "xdpfw_generation"), Some(1.0), "nothing went live:\n{s}");
    assert_eq!(metric(&s, "xdpfw_last_reload_success"), Some(0.0));
    assert_eq!(udp_verdicts(&t), CLOSED_7000, "the previous rules keep serving");
    let log = d.log();
    assert!(log.contains(&format!("{}:2:", rules.display())), "the log names file:line:\n{log}");
    assert!(log.contains("self-tests failed"), "{log}");
    let history = loader_ok(&t.server_ns, &["status", "--iface", &t.server_if, "--history"]);
    assert_eq!(history.matches(" failed ").count(), 2, "both rejections are in the history:\n{history}");

    // Fixed: it goes live.
    write_atomic(&rules, &rules_text("udp-7001-closed.toml"));
    wait_reloads(&t, &d, 1, 2);
    assert_eq!(m(&t, "xdpfw_last_reload_success"), 1.0);
    assert_eq!(udp_verdicts(&t), CLOSED_7001);

    // --detach-on-exit: SIGTERM removes the firewall.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success(), "{}", d.log());
    assert_no_instance(&t);
    assert_eq!(udp_verdicts(&t), (N, N), "nothing filters after the daemon detached");
}

#[test]
fn fail_closed_drops_until_the_first_valid_ruleset() {
    if !harness::root_or_skip() {
        return;
    }
    let t = topology("dfcl");
    let dir = TempDir::new("fcl");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, "default = \"pass\"\n[[rule]]\naction = \"nope\"\n").unwrap();
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--fail-closed", "--min-interval", "100ms"]);
    let s = scrape(&t).unwrap();
    assert_eq!(metric(&s, "xdpfw_fail_closed"), Some(1.0), "{s}");
    assert_eq!(metric(&s, "xdpfw_reloads_total{result=\"failed\"}"), Some(1.0), "{s}");
    assert!(s.contains("version=\"fail-closed\""), "{s}");
    assert_eq!(udp_verdicts(&t), (0, 0), "fail-closed: everything dropped");
    assert_eq!(udp_delivered(&t, sa(SERVER_V6, 7001), N), 0, "IPv6 too");
    assert_eq!(ping(&t, SERVER_V4, 2), 0);

    write_atomic(&rules, &rules_text("udp-7000-closed.toml"));
    wait_metric(&t, &d, "xdpfw_fail_closed", 10, |v| v == 0.0);
    assert_eq!(m(&t, "xdpfw_generation"), 2.0);
    assert_eq!(udp_verdicts(&t), CLOSED_7000);
    assert_eq!(udp_delivered(&t, sa(SERVER_V6, 7001), N), N);
    assert_eq!(ping(&t, SERVER_V4, 2), 2);
}

/// nginx with its own configuration, serving `www` on the client's address, run in the
/// foreground as a single process so that killing the child stops it.
struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
}

const NGINX_PORT: u16 = 8080;
const NGINX_TLS_PORT: u16 = 8443;

impl Nginx {
    /// Also serves HTTPS on NGINX_TLS_PORT when `dir` holds server.pem and server.key.
    fn start(ns: &str, dir: &Path) -> Self {
        let d = dir.display();
        let tls = if dir.join("server.pem").exists() {
            format!(
                "  server {{ listen {}:{NGINX_TLS_PORT} ssl; ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key; root {d}/www; etag on; }}\n",
                topology::CLIENT_V4
            )
        } else {
            String::new()
        };
        let http = format!(
            "  log_format st '$request_method $uri $status inm=$http_if_none_match';\n  access_log {d}/access.log st;\n\
               server {{ listen {}:{NGINX_PORT}; root {d}/www; etag on; }}\n{tls}",
            topology::CLIENT_V4
        );
        let child = start_nginx(ns, dir, &http);
        let n = Self { child: Some(child), dir: dir.to_path_buf() };
        let up = eventually(Duration::from_secs(5), || {
            in_ns(ns, || TcpStream::connect_timeout(&sa(topology::CLIENT_V4, NGINX_PORT), Duration::from_millis(200)).is_ok()).join().unwrap()
        });
        assert!(up, "nginx did not listen within 5 s: {}", std::fs::read_to_string(dir.join("error.log")).unwrap_or_default());
        n
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (200s, 304s) served for /rules.toml so far.
    fn rules_requests(&self) -> (usize, usize) {
        let log = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let count = |status: &str| log.lines().filter(|l| l.starts_with(&format!("GET /rules.toml {status} "))).count();
        (count("200"), count("304"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves `text` as /rules.toml. nginx's ETag is mtime and size, so the size is made to differ
/// from anything served before (a new mtime alone could fall in the same second).
fn publish(dir: &Path, text: &str, serial: usize) {
    let www = dir.join("www");
    write_atomic(&www.join("rules.toml"), &format!("{text}\n#{}\n", "x".repeat(serial)));
}

#[test]
fn http_source_against_nginx_etag_backoff_and_a_bad_file() {
    if !harness::root_or_skip() {
        return;
    }
    let t = topology("dhtp");
    let dir = TempDir::new("http");
    let www = dir.0.join("srv");
    std::fs::create_dir_all(www.join("www")).unwrap();
    let url = format!("http://{}:{NGINX_PORT}/rules.toml", topology::CLIENT_V4);

    // Started fail-closed while the server is still down: everything but the server's replies
    // is dropped, and the fetches back off.
    let d = Daemon::start(
        &t,
        &dir.0,
        &["--url", &url, "--fail-closed", "--poll-interval", "200ms", "--backoff-initial", "100ms", "--backoff-max", "800ms", "--min-interval", "100ms", "--fetch-timeout", "1s"],
    );
    wait_metric(&t, &d, "xdpfw_source_consecutive_failures", 10, |n| n >= 2.0);
    assert_eq!(m(&t, "xdpfw_fail_closed"), 1.0);
    assert_eq!(udp_verdicts(&t), (0, 0), "fail-closed until the first ruleset");

    publish(&www, &rules_text("udp-7000-closed.toml"), 1);
    let mut nginx = Nginx::start(&t.client_ns, &www);
    wait_reloads(&t, &d, 1, 2);
    assert_eq!(m(&t, "xdpfw_fail_closed"), 0.0);
    assert_eq!(udp_verdicts(&t), CLOSED_7000);

    // ETag honoured: the unchanged file is never downloaded again, every poll is a 304.
    let key_nm = format!("xdpfw_source_fetches_total{{url=\"{url}\",result=\"not_modified\"}}");
    wait_metric(&t, &d, &key_nm, 10, |n| n >= 3.0);
    let (ok, not_modified) = nginx.rules_requests();
    assert_eq!(ok, 1, "one download of the unchanged file");
    assert!(not_modified >= 3, "conditional requests answered 304: {not_modified}");
    assert_eq!(m(&t, "xdpfw_generation"), 2.0, "a 304 reloads nothing");

    // SIGHUP asks for the source as it is: one unconditional download, the same ruleset, no reload.
    d.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(eventually(Duration::from_secs(5), || nginx.rules_requests().0 == 2), "SIGHUP downloads again: {:?}", nginx.rules_requests());
    wait_metric(&t, &d, "xdpfw_reloads_unchanged_total", 5, |n| n >= 1.0);
    assert_eq!(m(&t, "xdpfw_generation"), 2.0, "the same ruleset is not reloaded");

    // A change on the server goes live.
    publish(&www, &rules_text("udp-7001-closed.toml"), 2);
    wait_reloads(&t, &d, 2, 3);
    assert_eq!(udp_verdicts(&t), CLOSED_7001);

    // A bad file from the server: rejected, reported, not downloaded again, B keeps serving.
    publish(&www, "default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"192.0.2.0/40\"]\n", 3);
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"failed\"}", 10, |n| n == 1.0);
    let before = nginx.rules_requests();
    let not_modified = m(&t, &key_nm);
    wait_metric(&t, &d, &key_nm, 10, |n| n >= not_modified + 3.0);
    assert_eq!(nginx.rules_requests().0, before.0, "the rejected file is not downloaded again");
    assert_eq!(m(&t, "xdpfw_generation"), 3.0);
    assert_eq!(udp_verdicts(&t), CLOSED_7001, "the last good ruleset keeps serving");
    assert!(d.log().contains("was rejected") && d.log().contains("invalid CIDR"), "{}", d.log());

    // Server down: failures back off with a growing cap while the last good ruleset serves.
    let log_before = d.log().len();
    nginx.stop();
    let key_failures = format!("xdpfw_source_consecutive_failures{{url=\"{url}\"}}");
    wait_metric(&t, &d, &key_failures, 15, |n| n >= 5.0);
    assert_eq!(m(&t, &format!("xdpfw_source_backoff_cap_seconds{{url=\"{url}\"}}")), 0.8, "capped at --backoff-max");
    let caps = |log: &str| -> Vec<String> {
        log[log_before..].lines().filter_map(|l| l.split("(backoff cap ").nth(1)).map(|c| c.trim_end_matches(')').to_string()).collect()
    };
    // The metric is updated just before the log line is written.
    eventually(Duration::from_secs(2), || caps(&d.log()).len() >= 5);
    let log = d.log();
    assert_eq!(caps(&log).get(..5), Some(&["0.100s", "0.200s", "0.400s", "0.800s", "0.800s"].map(String::from)[..]), "the cap doubles per failure up to --backoff-max:\n{log}");
    assert_eq!(udp_verdicts(&t), CLOSED_7001, "the last good ruleset serves while the server is down");
    assert_eq!(m(&t, "xdpfw_generation"), 3.0);

    // Back up with a good file: the daemon recovers.
    publish(&www, &rules_text("udp-7000-closed.toml"), 4);
    let _nginx = Nginx::start(&t.client_ns, &www);
    wait_reloads(&t, &d, 3, 4);
    assert_eq!(m(&t, &format!("xdpfw_source_consecutive_failures{{url=\"{url}\"}}")), 0.0);
    assert_eq!(udp_verdicts(&t), CLOSED_7000);
}

/// A private CA and a server certificate for CLIENT_V4 signed by it (openssl, from ./run setup).
fn make_certificates(dir: &Path) -> PathBuf {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl (installed by ./run setup)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=xdpfw test CA", "-keyout", "ca.key", "-out", "ca.pem"]);
    run(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=rules server", "-keyout", "server.key", "-out", "server.csr"]);
    std::fs::write(dir.join("ext.cnf"), format!("subjectAltName = IP:{}\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\n", topology::CLIENT_V4)).unwrap();
    run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem"]);
    dir.join("ca.pem")
}

#[test]
fn https_source_with_a_private_ca() {
    if !harness::root_or_skip() {
        return;
    }
    let t = topology("dtls");
    let dir = TempDir::new("tls");
    let srv = dir.0.join("srv");
    std::fs::create_dir_all(srv.join("www")).unwrap();
    let ca = make_certificates(&srv);
    publish(&srv, &rules_text("udp-7000-closed.toml"), 1);
    let nginx = Nginx::start(&t.client_ns, &srv);
    let url = format!("https://{}:{NGINX_TLS_PORT}/rules.toml", topology::CLIENT_V4);
    let fast = ["--poll-interval", "200ms", "--backoff-initial", "100ms", "--backoff-max", "400ms", "--fetch-timeout", "2s"];

    // Without the CA the server is not trusted: nothing is applied (it attached passing all).
    let mut d = Daemon::start(&t, &dir.0, &[&["--url", url.as_str()][..], &fast].concat());
    wait_metric(&t, &d, &format!("xdpfw_source_consecutive_failures{{url=\"{url}\"}}"), 10, |n| n >= 2.0);
    assert!(d.log().contains("certificate"), "a certificate error is reported:\n{}", d.log());
    assert_eq!(m(&t, "xdpfw_generation"), 1.0);
    assert_eq!(nginx.rules_requests(), (0, 0), "no request got through the TLS handshake");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success(), "{}", d.log());

    // With it: the daemon adopts the attachment, fetches over TLS, and honours the ETag.
    let d = Daemon::start(&t, &dir.0, &[&["--url", url.as_str(), "--ca-cert", ca.to_str().unwrap()][..], &fast].concat());
    assert!(d.log().contains("adopting"), "{}", d.log());
    wait_reloads(&t, &d, 1, 2);
    assert_eq!(udp_verdicts(&t), CLOSED_7000);
    wait_metric(&t, &d, &format!("xdpfw_source_fetches_total{{url=\"{url}\",result=\"not_modified\"}}"), 10, |n| n >= 2.0);
    let (ok, not_modified) = nginx.rules_requests();
    assert_eq!(ok, 1, "one download over HTTPS");
    assert!(not_modified >= 2, "then 304s: {not_modified}");
}
