//! Escalation with real processes owning real sockets: rules on the owner of the local socket
//! are decided in userspace by the daemon, only for the flows those rules decide.

use xdpfw_testkit as harness;

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use harness::{daemon::*, owners::*, *};

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

const APP_PORT: u16 = 7100;
const OTHER_PORT: u16 = 7101;
const ORDINARY_PORT: u16 = 7000;
const NOBODY: u32 = 65534;

fn owners_rules() -> std::path::PathBuf {
    rules_dir().join("owners.toml")
}

fn attached(tag: &str) -> Topology {
    let mut t = Topology::new(tag).expect("topology");
    t.detach_on_drop(loader_bin());
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", owners_rules().to_str().unwrap()]);
    t
}

/// One UDP flow from the client: waits (bounded) until the flow is decided (an echo comes back,
/// or the escalation service reports it decided), then sends `n` more datagrams on it and
/// returns how many echoes came back. The socket is returned to reuse the same flow later.
fn udp_flow(t: &Topology, to: SocketAddr, n: u64, decided: impl Fn() -> bool + Send + 'static) -> (u64, UdpSocket) {
    in_ns(&t.client_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 64];
        // The first datagrams get the pending action until the verdict is in place.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            sock.send_to(b"hello", to).unwrap();
            if sock.recv_from(&mut buf).is_ok() || decided() {
                break;
            }
            assert!(Instant::now() < deadline, "flow to {to} never decided");
        }
        while sock.recv_from(&mut buf).is_ok() {}
        (echoes(&sock, to, n), sock)
    })
    .join()
    .unwrap()
}

/// Sends `n` datagrams on `sock` to `to` and counts the echoes.
fn echoes(sock: &UdpSocket, to: SocketAddr, n: u64) -> u64 {
    let mut buf = [0u8; 64];
    let mut got = 0;
    for i in 0..n {
        sock.send_to(&i.to_be_bytes(), to).unwrap();
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while got < n && Instant::now() < deadline {
        if sock.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    got
}

fn global(t: &Topology, key: &str) -> u64 {
    stats(t)["global"][key].as_u64().unwrap()
}

fn service(t: &Topology, key: &str) -> u64 {
    stats(t)["escalation"]["counters"][key].as_u64().unwrap_or(0)
}

#[test]
fn owners_decide_process_ruled_ports_and_nothing_else_escalates() {
    if !harness::root_or_skip() {
        return;
    }
    let t = attached("own");
    let _app = OwnerProcess::start(&t.server_ns, "xfw-app", 0, APP_PORT);
    let _other = OwnerProcess::start(&t.server_ns, "xfw-other", NOBODY, OTHER_PORT);
    const N: u64 = 50;

    // No daemon: the flows get the pending action (drop), and status says so.
    let (got, _) = udp_flow(&t, sa(SERVER_V4, APP_PORT), N, || true);
    assert_eq!(got, 0, "without a daemon an escalated flow gets the pending action");
    assert!(global(&t, "pending") >= N, "pending packets counted");
    assert!(global(&t, "escalations") >= 1);
    let status = loader_ok(&t.server_ns, &["status", "--iface", &t.server_if]);
    assert!(status.contains("NOT SERVED"), "status must say escalation is not served:\n{status}");

    let dir = TempDir::new("own");
    let _daemon = escalation_daemon(&t, &dir, &owners_rules());
    let status = loader_ok(&t.server_ns, &["status", "--iface", &t.server_if]);
    assert!(status.contains("served by pid"), "{status}");

    // The allowed owner (process xfw-app, root) gets its traffic; the other owner does not.
    let (ns_t, ns_s) = (t.server_ns.clone(), t.server_if.clone());
    let decided_drop = move || {
        let out = loader(&ns_t, &["stats", "--iface", &ns_s, "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        s["escalation"]["counters"]["decided_drop"].as_u64().unwrap_or(0) >= 1
    };
    let (got, app_flow) = udp_flow(&t, sa(SERVER_V4, APP_PORT), N, || false);
    assert_eq!(got, N, "udp/{APP_PORT} owned by xfw-app (root) must pass");
    let (got, _) = udp_flow(&t, sa(SERVER_V4, OTHER_PORT), N, decided_drop);
    assert_eq!(got, 0, "udp/{OTHER_PORT} owned by xfw-other (nobody) must be dropped");
    let s = stats(&t);
    assert!(rule_packets(&s, "app-ports-xfw-app") >= N, "cached verdicts count under the deciding rule");
    assert!(rule_packets(&s, "app-ports-others") >= N, "{s}");
    let c = &s["escalation"]["counters"];
    assert!(c["decided_pass"].as_u64().unwrap() >= 1 && c["decided_drop"].as_u64().unwrap() >= 1, "{c}");
    assert!(s["global"]["cache_hits"].as_u64().unwrap() >= 2 * N, "decided flows are served from the cache");

    // TCP: the SYN to the allowed owner is dropped while pending, retransmitted, and then
    // accepted; to the other owner it never connects.
    assert!(tcp_connects(&t, sa(SERVER_V4, APP_PORT), Duration::from_secs(4)), "tcp/{APP_PORT} to xfw-app must connect");
    assert!(!tcp_connects(&t, sa(SERVER_V4, OTHER_PORT), Duration::from_millis(2500)), "tcp/{OTHER_PORT} to xfw-other must not");

    // No socket (nobody listens on IPv6 here): owner conditions cannot hold.
    let before = service(&t, "no_socket");
    let to = sa(SERVER_V6, APP_PORT);
    in_ns(&t.client_ns, move || {
        let s = UdpSocket::bind("[::]:0").unwrap();
        s.send_to(b"x", to).unwrap();
    })
    .join()
    .unwrap();
    assert!(eventually(Duration::from_secs(3), || service(&t, "no_socket") > before), "a flow with no socket is decided without an owner");

    // Ordinary rules never escalate: many new flows to udp/7000, not one event.
    let escalations = global(&t, "escalations");
    let rx = UdpCounter::start(&t.server_ns, sa(SERVER_V4, ORDINARY_PORT));
    for _ in 0..20 {
        send_udp(&t.client_ns, sa(SERVER_V4, ORDINARY_PORT), 5);
    }
    assert_eq!(rx.finish(), 100, "ordinary traffic passes in the kernel");
    assert_eq!(global(&t, "escalations"), escalations, "flows that match only ordinary rules produce zero escalation events");

    // The decided flow keeps its verdict.
    let to = sa(SERVER_V4, APP_PORT);
    assert_eq!(in_ns(&t.client_ns, move || echoes(&app_flow, to, N)).join().unwrap(), N);

    // The daemon's metrics carry the kernel's and the service's escalation counters.
    let m = scrape(&t).expect("the metrics endpoint answers");
    let value = |line: &str| -> f64 {
        m.lines().find_map(|l| l.strip_prefix(line)).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no {line} in metrics:\n{m}"))
    };
    assert!(value("xdpfw_escalation_events_total{outcome=\"decided_pass\"}") >= 2.0);
    assert!(value("xdpfw_escalation_events_total{outcome=\"decided_drop\"}") >= 2.0);
    assert!(value("xdpfw_escalation_no_socket_total") >= 1.0);
    assert!(m.contains("xdpfw_escalation_decision_latency_seconds{quantile=\"0.99\"}"), "{m}");
    assert!(m.lines().any(|l| l.starts_with("xdpfw_") && l.contains("escalations") && !l.starts_with('#')), "kernel escalation counters in the metrics:\n{m}");
}

#[test]
fn a_flood_of_new_flows_stays_bounded() {
    if !harness::root_or_skip() {
        return;
    }
    let t = attached("fld");
    let _app = OwnerProcess::start(&t.server_ns, "xfw-app", 0, APP_PORT);
    let dir = TempDir::new("fld");
    let daemon = escalation_daemon(&t, &dir, &owners_rules());

    // A flow decided before the flood.
    let (got, app_flow) = udp_flow(&t, sa(SERVER_V4, APP_PORT), 20, || false);
    assert_eq!(got, 20);
    let rss_before = daemon.rss_kib();

    // Ordinary traffic runs through the whole flood.
    let rx = UdpCounter::start(&t.server_ns, sa(SERVER_V4, ORDINARY_PORT));
    let flooding = Arc::new(AtomicBool::new(true));
    let f = flooding.clone();
    let client_ns = t.client_ns.clone();
    let ordinary = std::thread::spawn(move || {
        let mut sent = 0u64;
        while f.load(Ordering::SeqCst) && sent < 2000 {
            send_udp(&client_ns, sa(SERVER_V4, ORDINARY_PORT), 20);
            sent += 20;
            std::thread::sleep(Duration::from_millis(5));
        }
        sent
    });

    // 100,000 distinct flows (4 sources x 25,000 source ports) to the process-ruled port. For
    // the first 20,000 the daemon is stopped, so the ring buffer fills and overflows.
    const FLOWS: usize = 100_000;
    let sources = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"];
    let frames = move |range: std::ops::Range<usize>| {
        range.map(move |i| flood_frame(sources[i % 4], 10_000 + (i / 4) as u16, SERVER_V4, APP_PORT))
    };
    let started = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let iface = t.client_if.clone();
    let f1 = frames;
    let sent1 = in_ns(&t.client_ns, move || send_raw(&iface, f1(0..20_000), 32)).join().unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    let iface = t.client_if.clone();
    let sent2 = in_ns(&t.client_ns, move || send_raw(&iface, frames(20_000..FLOWS), 32)).join().unwrap();
    let flood_time = started.elapsed();
    flooding.store(false, Ordering::SeqCst);
    let ordinary_sent = ordinary.join().unwrap();
    assert_eq!(sent1 + sent2, FLOWS, "every flood frame was sent");
    assert!(flood_time < Duration::from_secs(60), "the flood is bounded in time: {flood_time:?}");

    // Let the daemon drain what the ring holds, then look.
    std::thread::sleep(Duration::from_millis(500));
    let s = stats(&t);
    let g = &s["global"];
    let c = &s["escalation"]["counters"];
    eprintln!("flood of {FLOWS} flows in {flood_time:?}: kernel {g}\nservice {c}");
    assert!(g["ring_overflows"].as_u64().unwrap() > 0, "overflows of the ring buffer are counted: {g}");
    assert!(g["escalations"].as_u64().unwrap() + g["ring_overflows"].as_u64().unwrap() >= FLOWS as u64, "each new flow escalated once or was counted as overflow: {g}");
    assert!(c["source_limited"].as_u64().unwrap() > 0, "per-source limits declined part of the flood: {c}");
    assert!(s["escalation"]["sources_tracked"].as_u64().unwrap() <= 4096);
    let rss_after = daemon.rss_kib();
    eprintln!("daemon RSS {rss_before} KiB before the flood, {rss_after} KiB after");
    assert!(rss_after < rss_before + 32 * 1024, "daemon memory stays bounded: {rss_before} -> {rss_after} KiB");

    // Ordinary traffic kept flowing: the kernel passed every datagram by its rule.
    let delivered = rx.finish();
    assert!(ordinary_sent > 0);
    assert_eq!(rule_packets(&s, "ordinary-udp"), ordinary_sent, "every ordinary datagram was passed by its rule during the flood");
    assert!(delivered * 100 >= ordinary_sent * 95, "ordinary traffic delivered: {delivered} of {ordinary_sent}");

    // The flow decided before the flood keeps its verdict.
    let to = sa(SERVER_V4, APP_PORT);
    assert_eq!(in_ns(&t.client_ns, move || echoes(&app_flow, to, 20)).join().unwrap(), 20, "a decided flow keeps its verdict");
}

#[test]
fn verdicts_expire_without_a_blip_and_reloads_invalidate_them() {
    if !harness::root_or_skip() {
        return;
    }
    // owners.toml with a short verdict TTL.
    let dir = std::env::temp_dir().join(format!("xfw-ttl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(rules_dir().join("owners.toml")).unwrap().replace("verdict_ttl = \"30s\"", "verdict_ttl = \"200ms\"");
    let rules = dir.join("owners-ttl.toml");
    std::fs::write(&rules, text).unwrap();
    let mut t = Topology::new("ttl").expect("topology");
    t.detach_on_drop(loader_bin());
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    let _app = OwnerProcess::start(&t.server_ns, "xfw-app", 0, APP_PORT);
    let log_dir = TempDir::new("ttl");
    let _daemon = escalation_daemon(&t, &log_dir, &rules);

    let (got, flow) = udp_flow(&t, sa(SERVER_V4, APP_PORT), 10, || false);
    assert_eq!(got, 10);
    let (pending, escalations) = (global(&t, "pending"), global(&t, "escalations"));
    // Across several TTLs the flow is decided again and again, and never loses a packet.
    let to = sa(SERVER_V4, APP_PORT);
    let (flow, got) = in_ns(&t.client_ns, move || {
        let mut got = 0;
        for _ in 0..8 {
            got += echoes(&flow, to, 10);
            std::thread::sleep(Duration::from_millis(100));
        }
        (flow, got)
    })
    .join()
    .unwrap();
    assert_eq!(got, 80, "an expired verdict keeps serving while the flow is re-decided");
    assert_eq!(global(&t, "pending"), pending, "no packet of the decided flow got the pending action");
    assert!(global(&t, "escalations") > escalations, "expired verdicts were decided again");

    // A reload starts a new generation: the old verdicts no longer apply, the flow is decided
    // again (its first packets get the pending action), then passes again.
    loader_ok(&t.server_ns, &["reload", "--iface", &t.server_if, rules.to_str().unwrap()]);
    let escalations = global(&t, "escalations");
    let got = in_ns(&t.client_ns, move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        while echoes(&flow, to, 1) == 0 {
            assert!(Instant::now() < deadline, "the flow was never decided again after the reload");
        }
        echoes(&flow, to, 10)
    })
    .join()
    .unwrap();
    assert_eq!(got, 10);
    assert!(global(&t, "escalations") > escalations, "the reload made the flow escalate again");
    let _ = std::fs::remove_dir_all(&dir);
}
