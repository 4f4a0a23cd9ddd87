//! `state = "established"` on real traffic: the firewall (XDP ingress + TCX egress) on the server
//! namespace's veth under `rules/host.toml` (default drop, replies pass, ssh from the office), a
//! client running in the firewall's own namespace, servers in the other. Needs root.

use xdpfw_testkit as harness;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use harness::{topology::CLIENT_V4, *};

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

/// nginx serving `dir/www` on the client's address, in the foreground, killed on drop.
struct Nginx(Child);

impl Nginx {
    fn start(ns: &str, dir: &Path, port: u16) -> Self {
        let d = dir.display();
        std::fs::create_dir_all(dir.join("www")).unwrap();
        std::fs::write(dir.join("www/index.html"), "hello from the other namespace\n").unwrap();
        let child = start_nginx(ns, dir, &format!("  access_log {d}/access.log;\n  server {{ listen {CLIENT_V4}:{port}; root {d}/www; }}\n"));
        Nginx(child)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP GET of `/` from namespace `ns` (connect and read bounded by `timeout`): the body, or
/// why not.
fn http_get(ns: &str, to: SocketAddr, timeout: Duration) -> Result<String, String> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| format!("read: {e}"))?;
        Ok(out)
    })
    .join()
    .unwrap_or_else(|_| Err("the client thread panicked".into()))
}

/// A UDP echo server in `ns` on `at`, answering until `n` datagrams or 30 s.
fn udp_echo(ns: &str, at: SocketAddr, n: usize) -> std::thread::JoinHandle<usize> {
    let sock = in_ns(ns, move || UdpSocket::bind(at).unwrap()).join().unwrap();
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 512];
        let mut answered = 0;
        while answered < n {
            let Ok((len, from)) = sock.recv_from(&mut buf) else { break };
            let _ = sock.send_to(&buf[..len], from);
            answered += 1;
        }
        answered
    })
}

/// A TCP echo server in `ns` on `at` for one connection at a time, until `conns` connections.
fn tcp_echo(ns: &str, at: SocketAddr, conns: usize) {
    let listener = in_ns(ns, move || TcpListener::bind(at).unwrap()).join().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().take(conns) {
            let Ok(mut s) = s else { continue };
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
}

/// One request/response on an open TCP connection, within `timeout`.
fn exchange(s: &mut TcpStream, msg: &[u8], timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.write_all(msg).is_ok() && s.read_exact(&mut buf).is_ok() && buf == msg
}

/// The names of the TCX egress programs on the server interface.
fn tcx_egress(t: &Topology) -> String {
    let iface = std::ffi::CString::new(t.server_if.clone()).unwrap();
    in_ns(&t.server_ns, move || {
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(iface.as_c_str(), aya::programs::TcAttachType::Egress).expect("query tcx");
        progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()).collect::<Vec<_>>().join(",")
    })
    .join()
    .unwrap()
}

fn global(s: &serde_json::Value, name: &str) -> u64 {
    s["global"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {s}"))
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Under `rules/host.toml` (default drop, `state = ["established", "related"]`), a client in the
/// firewall's namespace completes HTTP (nginx), UDP request/response and ping to the other
/// namespace, while the same ports asked unsolicited from there are dropped; a TCP connection
/// opened before the ruleset (and its state) arrived keeps working, and across a later reload;
/// 100,000 spoofed replies are dropped without adding a flow; 100,000 flows sent leave the
/// table bounded with the evictions counted; detach removes the egress program and the table.
#[test]
fn replies_to_the_hosts_own_flows_pass_under_default_drop() {
    if !harness::root_or_skip() {
        return;
    }
    let mut t = Topology::new("stat").expect("topology");
    t.detach_on_drop(loader_bin());
    let dir = TempDir(std::env::temp_dir().join(format!("xdpfw-state-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (server, client) = (&t.server_ns.clone(), &t.client_ns.clone());
    let host_rules = rules_dir().join("host.toml");

    // Attached without state (pass-all): the egress program is there, recording nothing.
    loader_ok(server, &["attach", &t.server_if]);
    assert!(tcx_egress(&t).contains("xdpfw_egress"), "the egress program is attached: {}", tcx_egress(&t));
    let _nginx = Nginx::start(client, &dir.0, 8080);
    assert!(eventually(Duration::from_secs(5), || http_get(server, sa(CLIENT_V4, 8080), Duration::from_secs(1)).is_ok()), "nginx is up");
    tcp_echo(client, sa(CLIENT_V4, 9000), 1);
    let mut early = in_ns(server, || TcpStream::connect_timeout(&sa(CLIENT_V4, 9000), Duration::from_secs(2)).unwrap()).join().unwrap();
    assert!(exchange(&mut early, b"before", Duration::from_secs(2)));
    assert_eq!(global(&stats(&t), "flows_new"), 0, "no ruleset uses state: nothing recorded");

    // The reload that brings `state` (its self-tests give states to the probe program).
    let out = loader_ok(server, &["reload", host_rules.to_str().unwrap(), "--iface", &t.server_if]);
    assert!(out.contains("8 self-tests") || out.contains("self-test"), "{out}");
    // The connection opened before: the host's next segment records it, and the answer passes.
    assert!(exchange(&mut early, b"after the reload", Duration::from_secs(3)), "a flow opened before `state` arrived");

    // From the firewall's namespace: HTTP, UDP request/response, ping.
    let body = http_get(server, sa(CLIENT_V4, 8080), Duration::from_secs(3)).expect("HTTP from the firewall's namespace");
    assert!(body.starts_with("HTTP/1.1 200") && body.contains("hello from the other namespace"), "{body}");
    let echo = udp_echo(client, sa(CLIENT_V4, 5353), 3);
    let udp = in_ns(server, || UdpSocket::bind("192.0.2.2:41053").unwrap()).join().unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    for q in [&b"query-1"[..], b"query-2"] {
        udp.send_to(q, sa(CLIENT_V4, 5353)).unwrap();
        let (n, from) = udp.recv_from(&mut buf).expect("the UDP answer passes");
        assert_eq!((&buf[..n], from), (q, sa(CLIENT_V4, 5353)));
    }
    assert_eq!(ping_from(server, CLIENT_V4, 3), 3, "ping from the firewall's namespace");

    // Unsolicited, to the same ports: dropped.
    let ask = in_ns(client, || UdpSocket::bind("192.0.2.1:6000").unwrap()).join().unwrap();
    for _ in 0..5 {
        ask.send_to(b"unsolicited", sa(SERVER_V4, 41053)).unwrap();
    }
    assert!(udp.recv_from(&mut buf).is_err(), "an unsolicited datagram to the client's port reached it");
    let listener = in_ns(server, || TcpListener::bind("192.0.2.2:8081").unwrap()).join().unwrap();
    assert!(!tcp_connects(&t, sa(SERVER_V4, 8081), Duration::from_millis(800)), "an unsolicited connection got in");
    drop(listener);
    assert_eq!(ping(&t, SERVER_V4, 2), 0, "unsolicited pings are dropped");
    udp.send_to(b"query-3", sa(CLIENT_V4, 5353)).unwrap();
    assert!(udp.recv_from(&mut buf).is_ok(), "the client's own flow still works");
    assert_eq!(echo.join().unwrap(), 3);

    // Flows survive a reload (the table is not double-buffered).
    loader_ok(server, &["reload", host_rules.to_str().unwrap(), "--iface", &t.server_if]);
    assert!(exchange(&mut early, b"second reload", Duration::from_secs(3)), "a live flow across a reload");
    let s = stats(&t);
    assert!(global(&s, "state_established") > 0 && global(&s, "state_lookups") > 0, "{}", s["global"]);
    assert!(rule_packets(&s, "replies") > 0);

    // A ruleset without state, then `state` again: the flows recorded before are cleared (they
    // went unrefreshed meanwhile), and the live connection is recorded again at its next segment.
    let pass_all = dir.0.join("pass.toml");
    std::fs::write(&pass_all, "default = \"pass\"\n").unwrap();
    loader_ok(server, &["reload", pass_all.to_str().unwrap(), "--iface", &t.server_if]);
    assert!(stats(&t)["flows"]["entries"].as_u64().unwrap() > 0, "a ruleset without state leaves the table");
    loader_ok(server, &["reload", host_rules.to_str().unwrap(), "--iface", &t.server_if]);
    assert_eq!(stats(&t)["flows"]["entries"].as_u64().unwrap(), 0, "stale flows cleared when state comes back");
    assert!(exchange(&mut early, b"state again", Duration::from_secs(3)), "the live connection, recorded again");
    assert!(stats(&t)["flows"]["entries"].as_u64().unwrap() >= 1);

    // 100,000 spoofed replies (raw frames into the veth from the other namespace): TCP to the
    // ports this host connects from, UDP from the DNS-like port, echo replies. None passes,
    // none adds a flow.
    let before = stats(&t);
    let frames = (0..100_000u32).map(|i| {
        let port = 1024 + (i % 31_000) as u16;
        let text = match i % 3 {
            0 => format!("tcp {CLIENT_V4}:8080 -> 192.0.2.2:{port} flags SA"),
            1 => format!("udp {CLIENT_V4}:5353 -> 192.0.2.2:{port}"),
            _ => format!("icmp 192.0.2.{} -> 192.0.2.2 type 0", 100 + i % 100),
        };
        text.parse::<xdpfw_rules::packet::PacketSpec>().unwrap().to_frame()
    });
    let client_if = t.client_if.clone();
    let frames: Vec<Vec<u8>> = frames.collect();
    let sent = in_ns(client, move || harness::owners::send_raw(&client_if, frames.into_iter(), 2000)).join().unwrap();
    assert_eq!(sent, 100_000);
    assert!(
        eventually(Duration::from_secs(10), || global(&stats(&t), "dropped") - global(&before, "dropped") >= 100_000),
        "the flood was dropped: {}",
        stats(&t)["global"]
    );
    let after = stats(&t);
    assert!(rule_packets(&after, "replies") - rule_packets(&before, "replies") < 100, "spoofed replies passed as replies");
    assert_eq!(global(&after, "flows_new"), global(&before, "flows_new"), "the flood added no flow");

    // 100,000 flows sent from the firewall's namespace: the table keeps at most its size, and
    // the rest are counted as evicted.
    let recorded_before = global(&after, "flows_new");
    in_ns(server, || {
        for local in [42000u16, 42001] {
            let s = UdpSocket::bind(SocketAddr::from((Ipv4Addr::new(192, 0, 2, 2), local))).unwrap();
            for port in 10_000..60_000u16 {
                let _ = s.send_to(b"x", SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), port)));
            }
        }
    })
    .join()
    .unwrap();
    let s = stats(&t);
    let recorded = global(&s, "flows_new") - recorded_before;
    let flows = &s["flows"];
    let (entries, capacity, evicted) = (flows["entries"].as_u64().unwrap(), flows["capacity"].as_u64().unwrap(), flows["evicted"].as_u64().unwrap());
    eprintln!("100,000 flows sent: {recorded} recorded, {entries} in the table of {capacity}, {evicted} evicted");
    assert!(recorded >= 99_000, "{recorded} of 100,000 sent recorded (a few may be lost to the socket's send buffer)");
    assert!(entries <= capacity, "{flows}");
    assert!(evicted >= recorded - capacity, "{flows}");
    let text = loader_ok(server, &["stats", "--iface", &t.server_if]);
    assert!(text.contains("flows      recorded") && text.contains(&format!("evicted {evicted}")), "{text}");
    // The newest flows still work after the churn.
    let body = http_get(server, sa(CLIENT_V4, 8080), Duration::from_secs(3)).expect("HTTP after the churn");
    assert!(body.contains("hello"), "{body}");

    // Detach: the egress program and the flow table go with the rest.
    loader_ok(server, &["detach", &t.server_if]);
    assert!(!tcx_egress(&t).contains("xdpfw_egress"), "{}", tcx_egress(&t));
    assert_no_instance(&t);
}

/// The egress program is part of what a daemon keeps whole: its link detached in the kernel
/// (pin left in place) or its pins removed, the daemon attaches the instance again, egress
/// program included, and replies pass again.
#[test]
fn a_daemon_repairs_a_missing_egress_program() {
    if !harness::root_or_skip() {
        return;
    }
    let mut t = Topology::new("strp").expect("topology");
    t.detach_on_drop(loader_bin());
    let dir = TempDir(std::env::temp_dir().join(format!("xdpfw-state-repair-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let host_rules = rules_dir().join("host.toml");
    let d = harness::daemon::Daemon::start(&t, &dir.0, &["--rules", host_rules.to_str().unwrap()]);
    assert_eq!(tcx_egress(&t), "xdpfw_egress");
    assert_eq!(ping_from(&t.server_ns, CLIENT_V4, 2), 2, "replies pass");
    // The flow table in the metrics: the pings' flow recorded and in the table.
    assert!(harness::daemon::m(&t, "xdpfw_flows_new_total") >= 1.0);
    assert!(harness::daemon::m(&t, "xdpfw_flow_entries") >= 1.0);
    assert_eq!(harness::daemon::m(&t, "xdpfw_flows_evicted_total"), 0.0);
    assert!(harness::daemon::m(&t, "xdpfw_state_established_total") >= 2.0, "the echo replies were established");

    let link = t.pin_dir().join("egress_link");
    let out = Command::new("bpftool").args(["link", "detach", "pinned"]).arg(&link).output().unwrap();
    assert!(out.status.success(), "bpftool link detach: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tcx_egress(&t), "", "detached under its pin");
    harness::daemon::wait_metric(&t, &d, "xdpfw_repairs_total", 10, |v| v >= 1.0);
    assert_eq!(tcx_egress(&t), "xdpfw_egress", "attached again\n{}", d.log());
    assert_eq!(ping_from(&t.server_ns, CLIENT_V4, 2), 2, "replies pass after the repair");

    std::fs::remove_file(t.pin_dir().join("egress_link")).unwrap();
    harness::daemon::wait_metric(&t, &d, "xdpfw_repairs_total", 10, |v| v >= 2.0);
    assert_eq!(tcx_egress(&t), "xdpfw_egress", "{}", d.log());
    assert_eq!(ping_from(&t.server_ns, CLIENT_V4, 2), 2);
    drop(d);
}
