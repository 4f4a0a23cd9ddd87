//! Per-rule counters never go down while reloads happen (Prometheus reads a decrease as a
//! counter reset): counters read during repeated reloads under traffic, by rule name.

use xdpfw_testkit as harness;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use harness::*;

const A: &str = "version = \"a\"\ndefault = \"pass\"\n\n[[rule]]\nname = \"steady\"\naction = \"pass\"\nproto = \"udp\"\ndport = 7000\n\n[[rule]]\nname = \"only-a\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7001\n";
const B: &str = "version = \"b\"\ndefault = \"pass\"\n\n[[rule]]\nname = \"only-b\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7002\n\n[[rule]]\nname = \"steady\"\naction = \"pass\"\nproto = \"udp\"\ndport = 7000\n";

#[test]
fn counters_never_go_down_during_reloads() {
    if !root_or_skip() {
        return;
    }
    let mut t = Topology::new("mono").expect("topology");
    t.detach_on_drop(loader_bin());
    let dir = std::env::temp_dir().join(format!("xdpfw-mono-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
    std::fs::write(&a, A).unwrap();
    std::fs::write(&b, B).unwrap();
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", a.to_str().unwrap()]);

    // Traffic to the kept rule, bounded in time, until the reloads are done.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (s, n) = (stop.clone(), sent.clone());
    let to = std::net::SocketAddr::new(ip(SERVER_V4), 7000);
    let traffic = in_ns(&t.client_ns, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            let _ = sock.send_to(b"x", to);
            n.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    // Counters read as fast as they can be, in the firewall's namespace, as `stats` and the
    // metrics read them.
    let (s, iface) = (stop.clone(), t.server_if.clone());
    let scraper = in_ns(&t.server_ns, move || {
        let inst = xdpfw_control::Instance::find(Some(&iface)).unwrap();
        let (mut last, mut reads, mut dips) = (0u64, 0u64, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
            // A read refused while a reload records its state is fine; a wrong one is not.
            let Ok(st) = xdpfw_control::stats(&inst) else { continue };
            let Some(steady) = st.rules.iter().find(|r| r.name == "steady") else { continue };
            reads += 1;
            if steady.packets < last {
                dips.push((st.generation, last, steady.packets));
            }
            last = last.max(steady.packets);
        }
        (reads, dips, last)
    });
    std::thread::sleep(Duration::from_millis(300));
    let reloads = 30;
    for i in 0..reloads {
        let file = if i % 2 == 0 { &b } else { &a };
        loader_ok(&t.server_ns, &["reload", file.to_str().unwrap(), "--iface", &t.server_if]);
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let (reads, dips, last) = scraper.join().unwrap();
    eprintln!("{reads} reads during {reloads} reloads, {} datagrams sent, last count {last}", sent.load(Ordering::Relaxed));
    assert!(reads > 100, "too few reads to judge: {reads}");
    assert!(last > 1000, "the traffic was counted: {last}");
    assert!(dips.is_empty(), "the counter of rule \"steady\" went down {} times (generation, before, after): {:?}", dips.len(), &dips[..dips.len().min(10)]);
    // And it ends where the datagrams say: every one counted once, across all the reloads.
    let st = stats(&t);
    assert_eq!(rule_packets(&st, "steady"), sent.load(Ordering::Relaxed), "{st}");
    std::fs::remove_dir_all(&dir).unwrap();
}
