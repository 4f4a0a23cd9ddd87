//! `loader set add|del|replace` on real traffic (issue 11, item 3): a batch goes live through
//! the reload pipeline, keeps every counter, and is recorded as the live ruleset, so a reload of
//! its snapshot, a rollback and `attach --last-good` keep it; a reload of the rules file
//! replaces it.

use std::net::SocketAddr;

use xdpfw_testkit::{daemon::TempDir, topology::CLIENT_V4, *};

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

const N: u64 = 20;

fn json(ns: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&loader_ok(ns, args)).expect("JSON")
}

#[test]
fn set_add_and_del_change_traffic_keep_counters_and_persist() {
    if !root_or_skip() {
        return;
    }
    let dir = TempDir::new("sets");
    let rules = dir.0.join("rules.toml");
    std::fs::write(dir.0.join("blocked.txt"), "# fed by fail2ban\n203.0.113.1\n").unwrap();
    std::fs::write(
        &rules,
        "default = \"pass\"\n[sets.blocked]\nfile = \"blocked.txt\"\n\
         [[rule]]\nname = \"blocked\"\naction = \"drop\"\nsrc = [\"@blocked\"]\n\
         [[rule]]\nname = \"udp-7000\"\naction = \"pass\"\nproto = \"udp\"\ndport = 7000\n",
    )
    .unwrap();
    let mut t = Topology::new("sets").expect("topology");
    t.detach_on_drop(loader_bin());
    let (ns, iface) = (t.server_ns.clone(), t.server_if.clone());
    loader_ok(&ns, &["attach", &iface, "--rules", rules.to_str().unwrap()]);
    let to = sa(SERVER_V4, 7000);
    assert_eq!(udp_delivered(&t, to, N), N);

    // add: the client's address is dropped from the flip on; the counters are carried.
    let r = json(&ns, &["set", "add", &iface, "blocked", CLIENT_V4, "198.51.100.0/24", "--json"]);
    assert_eq!(r["edit"]["added"], 2, "{r}");
    assert_eq!(r["edit"]["size"], 3, "{r}");
    assert_eq!(r["reload"]["generation"], 2, "{r}");
    assert_eq!(udp_delivered(&t, to, N), 0, "the added address is dropped");
    let s = stats(&t);
    assert_eq!(rule_packets(&s, "udp-7000"), N, "the pass counter is kept across the change: {s}");
    assert_eq!(rule_packets(&s, "blocked"), N, "{s}");

    // The same address again changes nothing: no reload.
    let r = json(&ns, &["set", "add", &iface, "blocked", CLIENT_V4, "--json"]);
    assert!(r["reload"].is_null() && r["edit"]["present"] == 1, "{r}");

    // The change is the live ruleset: its snapshot reloads to it, the history says "set".
    let show = json(&ns, &["show", "--iface", &iface, "--json"]);
    let snapshot = show["snapshot"].as_str().unwrap().to_string();
    assert_eq!(show["source"], rules.to_str().unwrap(), "the source stays the operator's file: {show}");
    loader_ok(&ns, &["reload", &snapshot, "--iface", &iface]);
    assert_eq!(udp_delivered(&t, to, N), 0, "still dropped after a reload of the snapshot");
    let status = json(&ns, &["status", "--iface", &iface, "--history", "--json"]);
    assert!(status["history"].as_array().unwrap().iter().any(|e| e["action"] == "set"), "{status}");

    // del: passes again; counters still carried.
    let r = json(&ns, &["set", "del", &iface, "blocked", CLIENT_V4, "192.0.2.99", "--json"]);
    assert_eq!((r["edit"]["removed"].as_u64(), r["edit"]["absent"].as_u64()), (Some(1), Some(1)), "{r}");
    assert_eq!(udp_delivered(&t, to, N), N, "passes again after del");
    let s = stats(&t);
    assert_eq!(rule_packets(&s, "udp-7000"), 2 * N, "{s}");
    assert_eq!(rule_packets(&s, "blocked"), 2 * N, "{s}");

    // Added again from a file, then a restart: attach --last-good keeps it.
    let batch = dir.0.join("batch.txt");
    std::fs::write(&batch, format!("{CLIENT_V4}\n# comment\n")).unwrap();
    loader_ok(&ns, &["set", "add", &iface, "blocked", "--file", batch.to_str().unwrap()]);
    assert_eq!(udp_delivered(&t, to, N), 0);
    loader_ok(&ns, &["detach", &iface]);
    loader_ok(&ns, &["attach", &iface, "--last-good"]);
    assert_eq!(udp_delivered(&t, to, N), 0, "attach --last-good keeps the change");

    // Newest first: attach --last-good, add --file, del, reload of the snapshot, add, attach.
    // Two back is the ruleset the del made: the client passes again.
    loader_ok(&ns, &["rollback", "2", "--iface", &iface]);
    assert_eq!(udp_delivered(&t, to, N), N, "rollback to the ruleset of the del");

    // A reload of the rules file (unchanged on disk) replaces the incremental changes.
    loader_ok(&ns, &["set", "add", &iface, "blocked", CLIENT_V4]);
    assert_eq!(udp_delivered(&t, to, N), 0);
    loader_ok(&ns, &["reload", rules.to_str().unwrap(), "--iface", &iface]);
    assert_eq!(udp_delivered(&t, to, N), N, "the file is the source of truth at a reload");

    // Sets without a file, and unknown sets, are refused with nothing changed.
    let out = loader(&ns, &["set", "add", &iface, "nope", "192.0.2.1"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let out = loader(&ns, &["set", "add", &iface, "blocked", "192.0.2.1/8"]);
    assert_eq!(out.status.code(), Some(2), "host bits set: a usage error: {}", String::from_utf8_lossy(&out.stderr));
}

/// A daemon following the rules file leaves `set` changes alone while the file is unchanged
/// (its periodic checks compare the file's content with what it last read, not with what is
/// live), and a change of the file replaces them, as a reload of the file does.
#[test]
fn a_daemon_keeps_set_changes_until_its_file_changes() {
    if !root_or_skip() {
        return;
    }
    let dir = TempDir::new("setd");
    let rules = dir.0.join("rules.toml");
    std::fs::write(dir.0.join("blocked.txt"), "203.0.113.1\n").unwrap();
    let text = "default = \"pass\"\n[sets.blocked]\nfile = \"blocked.txt\"\n\
         [[rule]]\nname = \"blocked\"\naction = \"drop\"\nsrc = [\"@blocked\"]\n";
    std::fs::write(&rules, text).unwrap();
    let mut t = Topology::new("setd").expect("topology");
    t.detach_on_drop(loader_bin());
    let (ns, iface) = (t.server_ns.clone(), t.server_if.clone());
    let d = daemon::Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--poll-interval", "500ms", "--min-interval", "100ms"]);
    let to = sa(SERVER_V4, 7000);
    assert_eq!(udp_delivered(&t, to, N), N);
    loader_ok(&ns, &["set", "add", &iface, "blocked", CLIENT_V4]);
    assert_eq!(udp_delivered(&t, to, N), 0, "the added address is dropped");
    // Several periodic checks later the change still stands.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(udp_delivered(&t, to, N), 0, "the daemon did not undo the set change:\n{}", d.log());
    // A new version of the file is applied and replaces the set change.
    std::fs::write(&rules, format!("version = \"v2\"\n{text}")).unwrap();
    assert!(eventually(std::time::Duration::from_secs(10), || udp_delivered(&t, to, 5) == 5), "{}", d.log());
}
