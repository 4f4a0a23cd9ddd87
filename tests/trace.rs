//! `loader trace` and `log` rules with real packets through the veth harness: the rule that
//! dropped a packet is named, the kernel's rate limit holds under a flood, a tracer killed
//! outright stops tracing when its lease runs out, and `| head` ends a trace successfully.

use xdpfw_testkit as harness;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use harness::*;
use harness::topology::{CLIENT_V4, CLIENT_V6};
use xdpfw_common::map_names;
use xdpfw_kernel::{Maps, trace::DecisionRing};

const RULES: &str = "version = \"trace\"\ndefault = \"pass\"\n\n\
[[rule]]\nname = \"drop-7000\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7000\n\n\
[[rule]]\nname = \"pass-7001\"\naction = \"pass\"\nproto = \"udp\"\ndport = 7001\n";

fn sa(addr: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip(addr), port)
}

/// A topology with `rules` attached (detached on drop).
fn attached(tag: &str, rules: &str) -> (Topology, std::path::PathBuf) {
    let mut t = Topology::new(tag).expect("topology");
    t.detach_on_drop(loader_bin());
    let file = std::env::temp_dir().join(format!("xdpfw-{tag}-{}.toml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", file.to_str().unwrap()]);
    (t, file)
}

/// A `loader trace` child, killed on drop (declare it after its Topology).
struct TraceChild(Child);

impl TraceChild {
    /// Starts `loader trace IFACE ARGS…` and waits until it says it is tracing.
    fn start(t: &Topology, args: &[&str]) -> Self {
        let mut child = Command::new(loader_bin())
            .args(["--netns", &t.server_ns, "trace", &t.server_if])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting loader trace");
        let mut first = String::new();
        BufReader::new(child.stderr.as_mut().unwrap()).read_line(&mut first).unwrap();
        assert!(first.starts_with("tracing "), "loader trace did not start: {first}");
        Self(child)
    }

    /// Waits (at most `timeout`) for it to exit; its stdout lines as JSON and its status.
    fn finish(mut self, timeout: Duration) -> (Vec<serde_json::Value>, std::process::ExitStatus) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "loader trace did not stop within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        std::io::Read::read_to_string(self.0.stdout.as_mut().unwrap(), &mut out).unwrap();
        let lines = out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
        (lines, status)
    }
}

impl Drop for TraceChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn trace_shows_the_rule_that_dropped_a_real_packet() {
    if !root_or_skip() {
        return;
    }
    let (t, file) = attached("trc", RULES);
    let tracer = TraceChild::start(&t, &["--json", "--count", "5", "port", "7000"]);
    // A second tracer of the same interface is refused while the first runs.
    let second = loader(&t.server_ns, &["trace", &t.server_if, "--count", "1"]);
    assert!(!second.status.success() && String::from_utf8_lossy(&second.stderr).contains("another `loader trace` is tracing"), "{second:?}");
    // Passed packets to another port do not match the filter; the dropped ones do.
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7001), 5), 5);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 10), 0);
    let (events, status) = tracer.finish(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert_eq!(events.len(), 5, "{events:?}");
    for e in &events {
        assert_eq!(e["schema"], 1);
        assert_eq!(e["kind"], "trace");
        assert_eq!(e["rule"], "drop-7000", "{e}");
        assert_eq!(e["rule_index"], 0);
        assert_eq!(e["verdict"], "drop");
        assert_eq!(e["generation"], 1);
        assert_eq!(e["src"], CLIENT_V4);
        assert_eq!(e["dst"], SERVER_V4);
        assert_eq!(e["dport"], 7000);
        assert_eq!(e["proto"], 17);
        assert_eq!(e["len"], 50);
        assert!(e["packet"].as_str().unwrap().starts_with(&format!("udp {CLIENT_V4}:")), "{e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
    }
    // The tracer cleared its lease on the way out.
    assert_eq!(Maps::open(&t.pin_dir()).unwrap().trace_lease(), 0);

    // The text form names the rule; a filter by rule name and verdict; IPv6 by prefix.
    let tracer = TraceChild::start(&t, &["--count", "2", "rule", "pass-7001", "host", "2001:db8:f::/64"]);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7001), 3), 3);
    assert_eq!(udp_delivered(&t, sa(SERVER_V6, 7000), 3), 0);
    assert_eq!(udp_delivered(&t, sa(SERVER_V6, 7001), 3), 3);
    let mut child = tracer;
    let status = child.0.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for l in lines {
        assert!(l.contains(" pass ") && l.contains("pass-7001") && l.contains(&format!("udp [{CLIENT_V6}]:")) && l.contains(":7001 len "), "{l}");
    }

    // Errors: a filter that does not parse (usage, 2), a rule the live ruleset lacks (1).
    let bad = loader(&t.server_ns, &["trace", &t.server_if, "port", "http"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("filter: invalid port \"http\""), "{bad:?}");
    let bad = loader(&t.server_ns, &["trace", &t.server_if, "rule", "nope"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no rule named \"nope\" in the live ruleset"), "{bad:?}");
    std::fs::remove_file(file).unwrap();
}

#[test]
fn the_kernel_rate_limit_holds_under_a_flood_and_a_killed_tracer_stops_tracing() {
    if !root_or_skip() {
        return;
    }
    let (t, file) = attached("trf", RULES);
    let tracer = TraceChild::start(&t, &["--json", "--rate", "20", "--burst", "10", "--duration", "2s"]);
    let started = Instant::now();
    // About 20,000 datagrams in a second or so, dropped and passed.
    let rx = UdpCounter::start(&t.server_ns, sa(SERVER_V4, 7001));
    send_udp(&t.client_ns, sa(SERVER_V4, 7000), 10_000);
    send_udp(&t.client_ns, sa(SERVER_V4, 7001), 10_000);
    let delivered = rx.finish();
    let flood = started.elapsed();
    let (events, status) = tracer.finish(Duration::from_secs(10));
    assert!(status.success());
    // 2 s at 20/s plus a burst of 10, give or take the start and stop of the trace.
    let bound = 10 + 20 * 3;
    eprintln!("{} events in 2 s for {delivered} + 10000 datagrams sent in {flood:?} (bound {bound})", events.len());
    assert!(events.len() <= bound && events.len() >= 10, "{} events", events.len());
    assert!(events.iter().all(|e| e["rule"] == "drop-7000" || e["rule"] == "pass-7001"));

    // kill -9 of a tracer: its lease is left behind, and the kernel stops tracing when it runs
    // out, with nobody's help.
    let maps = Maps::open(&t.pin_dir()).unwrap();
    let mut ring = DecisionRing::open(&t.pin_dir(), map_names::TRACE_RING).unwrap();
    let tracer = TraceChild::start(&t, &["--json"]);
    drop(tracer); // SIGKILL
    assert_ne!(maps.trace_lease(), 0, "a killed tracer cannot clear its lease");
    ring.drain();
    send_udp(&t.client_ns, sa(SERVER_V4, 7000), 5);
    assert!(eventually(Duration::from_secs(2), || ring.next_event().is_some()), "still tracing right after the kill");
    std::thread::sleep(Duration::from_nanos(xdpfw_common::trace::LEASE_NS) + Duration::from_millis(300));
    ring.drain();
    send_udp(&t.client_ns, sa(SERVER_V4, 7000), 50);
    std::thread::sleep(Duration::from_millis(200));
    assert!(ring.next_event().is_none(), "the lease ran out: nothing is traced");
    // A new tracer takes over (its lock went with the killed process).
    let tracer = TraceChild::start(&t, &["--json", "--count", "1"]);
    send_udp(&t.client_ns, sa(SERVER_V4, 7000), 3);
    assert_eq!(tracer.finish(Duration::from_secs(10)).0.len(), 1);
    std::fs::remove_file(file).unwrap();
}

#[test]
fn trace_into_a_closed_pipe_ends_successfully() {
    if !root_or_skip() {
        return;
    }
    let (t, file) = attached("trp", RULES);
    let script = format!(
        "{} --netns {} trace {} | head -1; echo \"status ${{PIPESTATUS[0]}}\"",
        loader_bin(),
        t.server_ns,
        t.server_if
    );
    let child = Command::new("bash").args(["-c", &script]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    // Traffic until the pipeline has ended (head exits after one line; trace at the next write).
    let ns = t.client_ns.clone();
    let sender = in_ns(&ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..400 {
            let _ = sock.send_to(b"x", sa(SERVER_V4, 7000));
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().count() == 2 && text.contains("drop-7000") && text.ends_with("status 0\n"), "{text}");
    sender.join().unwrap();
    std::fs::remove_file(file).unwrap();
}

/// Lines of the daemon's log that report a packet of rule `name`.
fn logged(log: &str, name: &str) -> usize {
    log.lines().filter(|l| l.contains("xdpfw::log") && l.contains(&format!("rule \"{name}\" (generation"))).count()
}

#[test]
fn log_rules_report_dropped_packets_to_the_daemon_log_at_most_at_their_rate() {
    if !root_or_skip() {
        return;
    }
    use harness::daemon::{Daemon, TempDir};
    let mut t = Topology::new("log").expect("topology");
    t.detach_on_drop(loader_bin());
    let dir = TempDir::new("log");
    let rules = rules_dir().join("logged.toml");
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap()]);
    // Logged packets show in `loader trace` too, as such.
    let tracer = TraceChild::start(&t, &["--json", "--count", "3", "rule", "udp-7000"]);
    // Ten dropped datagrams, within the burst: each one logged, with the rule's name.
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 10), 0);
    let (events, _) = tracer.finish(Duration::from_secs(10));
    assert!(events.len() == 3 && events.iter().all(|e| e["kind"] == "log" && e["rule"] == "udp-7000"), "{events:?}");
    assert!(eventually(Duration::from_secs(5), || logged(&d.log(), "udp-7000") >= 10), "{}", d.log());
    let log = d.log();
    let line = log.lines().find(|l| l.contains("xdpfw::log")).unwrap();
    assert!(line.contains(" INFO ") && line.contains(&format!("drop udp {CLIENT_V4}:")) && line.contains(&format!("-> {SERVER_V4}:7000 len 50")), "{line}");
    assert_eq!(logged(&log, "udp-7000"), 10, "{log}");
    // Passed packets of a rule without `log` are not logged.
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7001), 10), 10);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.log().lines().filter(|l| l.contains("xdpfw::log") && l.contains(" len ")).count(), 10);

    // A flood: at most the burst (10) plus 10 a second while it lasts, read by the daemon.
    std::thread::sleep(Duration::from_secs(1)); // the bucket fills again
    let started = Instant::now();
    send_udp(&t.client_ns, sa(SERVER_V4, 7000), 20_000);
    let flood = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let during = logged(&d.log(), "udp-7000") - 10;
    let bound = 10 + (10.0 * flood.as_secs_f64()).ceil() as usize + 2;
    eprintln!("{during} lines logged for 20000 datagrams in {flood:?} (bound {bound})");
    assert!((10..=bound).contains(&during), "{during} lines for a flood of {flood:?}:\n{}", d.log());
    drop(d);
}
