//! The two copies of the program (`xdpfw_common::variant`): the plain copy, with the paths of
//! rate limits, connection state, VLAN conditions, `log` and neighbour discovery under the rules
//! pruned, serves the rulesets that need none of them; reloads switch between the copies without
//! a packet ever judged by a copy that lacks a path its ruleset needs.

use xdpfw_testkit as harness;

use std::{net::SocketAddr, process::Command};

use harness::*;

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

/// The id of a program pinned in the instance's folder.
fn pinned_id(t: &Topology, pin: &str) -> u64 {
    let out = Command::new("bpftool").args(["-j", "prog", "show", "pinned"]).arg(t.pin_dir().join(pin)).output().unwrap();
    assert!(out.status.success(), "bpftool prog show pinned {pin}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"].as_u64().unwrap()
}

/// The id of the XDP program attached to the server's veth, as the kernel reports it.
fn attached_id(t: &Topology) -> u64 {
    let out = Command::new("ip").args(["-n", &t.server_ns, "-d", "-j", "link", "show", &t.server_if]).output().unwrap();
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    link[0]["xdp"]["prog"]["id"].as_u64().unwrap_or_else(|| panic!("no XDP program attached: {link}"))
}

/// Which copy serves, by the kernel's account; `prog` always names it.
fn serving(t: &Topology) -> &'static str {
    let id = attached_id(t);
    assert_eq!(pinned_id(t, "prog"), id, "`prog` names the attached program");
    if id == pinned_id(t, "prog-full") {
        "full"
    } else if t.pin_dir().join("prog-plain").exists() && id == pinned_id(t, "prog-plain") {
        "plain"
    } else {
        panic!("the attached program {id} is neither copy")
    }
}

fn reload(t: &Topology, file: &str) -> serde_json::Value {
    let out = loader_ok(&t.server_ns, &["reload", &rules_file(file), "--iface", &t.server_if, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn reloads_switch_between_the_plain_and_the_full_copy() {
    if !harness::root_or_skip() {
        return;
    }
    // A ruleset that needs no path of the full copy is served by the plain one from the attach.
    let t = attached("var", "udp-7000-closed.toml");
    assert_eq!(serving(&t), "plain");
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 10), 0);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7001), 10), 10);

    // Each feature that needs the full copy switches to it before the flip; back to the plain
    // copy after the flip's grace period.
    for file in ["vlan-7001.toml", "logged.toml", "host.toml"] {
        let r = reload(&t, file);
        assert_eq!(r["program"], "full", "{file}: {r}");
        assert!(r["times"]["widen_us"].as_u64().unwrap() > 0, "{file}: the switch is timed: {r}");
        assert_eq!(serving(&t), "full", "{file}");
        let r = reload(&t, "udp-7000-closed.toml");
        assert_eq!(r["program"], "plain", "{r}");
        assert_eq!(serving(&t), "plain");
    }
    // A reload that keeps the copy switches nothing.
    let r = reload(&t, "udp-7001-closed.toml");
    assert_eq!((r["program"].as_str(), r["times"]["widen_us"].as_u64(), r["times"]["narrow_us"].as_u64() < Some(50_000)), (Some("plain"), Some(0), true), "{r}");

    // The full copy judges by the full ruleset: untagged UDP to 7001 meets `close-7001`, not
    // `tagged-7001` (which the plain copy, without VLAN conditions, would take it for).
    reload(&t, "vlan-7001.toml");
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7001), 10), 0);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 10), 10);
    let s = stats(&t);
    assert_eq!(rule_packets(&s, "close-7001"), 10);
    assert_eq!(rule_packets(&s, "tagged-7001"), 0);
}

/// Under traffic, reloads alternate a ruleset of the plain copy with one of the full copy: every
/// datagram is received or dropped by a rule, and none is passed by a rule: only `tagged-7001`
/// passes, and only a copy without VLAN conditions could match an untagged datagram to it (so
/// the full ruleset is never served by the plain copy, not even around a switch).
#[test]
fn switches_under_traffic_never_serve_a_ruleset_with_the_wrong_copy() {
    if !harness::root_or_skip() {
        return;
    }
    let t = attached("vrt", "udp-7000-closed.toml");
    let rx0 = UdpCounter::start(&t.server_ns, sa(SERVER_V4, 7000));
    let rx1 = UdpCounter::start(&t.server_ns, sa(SERVER_V4, 7001));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = udp_stream(&t.client_ns, stop.clone());
    // In-process, through the library, as the daemon reloads: the same pipeline as the CLI.
    const RELOADS: usize = 40;
    let iface = t.server_if.clone();
    let programs = in_ns(&t.server_ns, move || {
        let inst = xdpfw_control::Instance::find(Some(&iface)).unwrap();
        let files = [rules_dir().join("vlan-7001.toml"), rules_dir().join("udp-7000-closed.toml")];
        let opts = xdpfw_control::ReloadOptions::default();
        (0..RELOADS).map(|i| xdpfw_control::reload(&inst, &files[i % 2], &opts).unwrap().program).collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = 2 * sender.join().unwrap();
    let (got0, got1) = (rx0.finish(), rx1.finish());
    let s = stats(&t);
    let g = &s["global"];
    let n = |k: &str| g[k].as_u64().unwrap();
    assert_eq!(s["generation"], 1 + RELOADS as u64);
    assert_eq!(got0 + got1 + n("dropped"), sent, "received {got0} + {got1}, dropped: {g}");
    assert!(got0 < sent / 2 && got1 < sent / 2, "each port was closed for a while: {got0} {got1} of {sent}");
    // What passes without a rule: the default, and before the rules, the link's own neighbour
    // discovery and non-IP frames (the odd IPv6 solicitation on a fresh veth).
    let passed_by_rules = n("passed") - n("default_hits") - n("neighbor_discovery") - n("non_ip");
    assert_eq!(passed_by_rules, 0, "a datagram was passed by `tagged-7001`, so judged without its VLAN condition: {g}");
    assert_eq!(programs.iter().filter(|p| *p == "full").count(), RELOADS / 2, "{programs:?}");
    assert_eq!(programs.iter().filter(|p| *p == "plain").count(), RELOADS / 2, "{programs:?}");
}

/// The verifier's work to load each copy stays well inside its 1M-instruction limit: a change
/// that multiplies the program's paths fails here, by name, rather than as an attach that
/// suddenly fails or takes seconds. (The IPv6 walk written as a bounded loop took the plain copy
/// to 574,467 instructions and the full one to 657,077; as a `bpf_loop` they take 138,166 and
/// 195,002.) Prints both counts.
#[test]
fn each_copy_verifies_well_inside_the_limit() {
    if !root_or_skip() {
        return;
    }
    for (name, variant) in [("plain", xdpfw_common::variant::PLAIN), ("full", xdpfw_common::variant::FULL)] {
        let p = xdpfw_kernel::testrun::PrivateProgram::load_variant(variant).unwrap();
        let n = p.verified_instructions().expect("the kernel reports the verifier's count");
        eprintln!("the {name} copy: {n} instructions verified");
        assert!(n < 400_000, "the {name} copy took the verifier {n} instructions: 40% of its 1M limit");
    }
}

/// No lookup of the fast path is a helper call, in either copy as the kernel runs it (`bpftool
/// prog dump xlated`, after the verifier's rewrites): every table read is an array lookup the
/// verifier inlines, and the IPv6 walk's `bpf_loop` became a loop calling its step. The helper
/// calls left are the slow paths' (flows and per-source limits in hash maps, the clock, the
/// rings, sampling). A lookup whose map differs between paths (the compiler merges such calls)
/// or a `bpf_loop` whose callback does would show here as `call bpf_map_lookup_elem` or
/// `call bpf_loop`.
#[test]
fn the_fast_path_calls_no_lookup_helper() {
    if !harness::root_or_skip() {
        return;
    }
    let t = attached("xl", "udp-7000-closed.toml");
    assert_eq!(serving(&t), "plain");
    let mut seen = Vec::new();
    for pin in ["prog-plain", "prog-full"] {
        let path = t.pin_dir().join(pin);
        if !path.exists() {
            // The full copy is pinned from the first ruleset that needs it.
            reload(&t, "vlan-7001.toml");
        }
        let out = Command::new("bpftool").args(["prog", "dump", "xlated", "pinned"]).arg(&path).output().unwrap();
        assert!(out.status.success(), "bpftool prog dump xlated {pin}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let calls: Vec<&str> = text.lines().filter(|l| l.contains("(85) call ")).collect();
        assert!(calls.iter().any(|l| l.contains("v6_step")), "{pin}: the IPv6 walk's step is called as a subprogram");
        for forbidden in ["bpf_loop", "bpf_map_lookup_elem", "trie_lookup_elem", "array_of_map"] {
            let bad: Vec<&&str> = calls.iter().filter(|l| l.contains(forbidden)).collect();
            assert!(bad.is_empty(), "{pin}: {} helper calls of {forbidden}: {bad:?}", bad.len());
        }
        seen.push((pin, calls.len()));
    }
    eprintln!("calls in the xlated programs (subprograms and slow-path helpers): {seen:?}");
}
