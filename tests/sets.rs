//! `loader set add|del|replace|reset` on real traffic (issue 11, item 3): a batch goes live at
//! once, keeps every counter, and is kept in the instance's set journal, so it stands through a
//! reload of the rules file (changed or not), a rollback, a detach and `attach --last-good`, a
//! plain `attach --rules`, and a daemon following the file, until `loader set` changes it again
//! or `loader set reset` drops it.

use std::net::SocketAddr;

use xdpfw_testkit::{
    daemon::TempDir,
    topology::{CLIENT_V4, CLIENT_V6, SERVER_V6},
    *,
};

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

const N: u64 = 20;

fn json(ns: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&loader_ok(ns, args)).expect("JSON")
}

#[test]
fn set_changes_keep_counters_and_survive_reloads_rollbacks_and_restarts() {
    if !root_or_skip() {
        return;
    }
    let dir = TempDir::new("sets");
    let rules = dir.0.join("rules.toml");
    std::fs::write(dir.0.join("blocked.txt"), "# fed by fail2ban\n203.0.113.1\n").unwrap();
    let text = "default = \"pass\"\n[sets.blocked]\nfile = \"blocked.txt\"\n\
         [[rule]]\nname = \"blocked\"\naction = \"drop\"\nsrc = [\"@blocked\"]\n\
         [[rule]]\nname = \"udp-7000\"\naction = \"pass\"\nproto = \"udp\"\ndport = 7000\n";
    std::fs::write(&rules, text).unwrap();
    let mut t = Topology::new("sets").expect("topology");
    t.detach_on_drop(loader_bin());
    let (ns, iface) = (t.server_ns.clone(), t.server_if.clone());
    loader_ok(&ns, &["attach", &iface, "--rules", rules.to_str().unwrap()]);
    let to = sa(SERVER_V4, 7000);
    assert_eq!(udp_delivered(&t, to, N), N);

    // add: the client's address is dropped from the flip on; the counters are carried.
    let r = json(&ns, &["set", "add", &iface, "blocked", CLIENT_V4, "198.51.100.0/24", "--json"]);
    assert_eq!(r["edit"]["added"], 2, "{r}");
    assert_eq!(r["reload"]["generation"], 2, "{r}");
    assert_eq!(r["path"], "delta", "IPv4 prefixes beside a ruleset without self-tests: only the changed entries are written: {r}");
    assert_eq!(udp_delivered(&t, to, N), 0, "the added address is dropped");
    let s = stats(&t);
    assert_eq!(rule_packets(&s, "udp-7000"), N, "the pass counter is kept across the change: {s}");
    assert_eq!(rule_packets(&s, "blocked"), N, "{s}");

    // The same address again changes nothing.
    let r = json(&ns, &["set", "add", &iface, "blocked", CLIENT_V4, "--json"]);
    assert!(r["reload"].is_null() && r["edit"]["present"] == 1, "{r}");

    // The live ruleset is the file with the change: its snapshot loads to the live hash, the
    // history says "set", and a reload of the unchanged file keeps the change (same hash).
    let show = json(&ns, &["show", "--iface", &iface, "--json"]);
    assert_eq!(show["source"], rules.to_str().unwrap(), "the source stays the operator's file: {show}");
    let live_hash = show["hash"].as_str().unwrap().to_string();
    let status = json(&ns, &["status", "--iface", &iface, "--history", "--json"]);
    assert!(status["history"].as_array().unwrap().iter().any(|e| e["action"] == "set"), "{status}");
    let r = json(&ns, &["reload", rules.to_str().unwrap(), "--iface", &iface, "--json"]);
    assert_eq!(r["ruleset"]["hash"], live_hash.as_str(), "the file with the journal hashes as the set change did: {r}");
    assert_eq!(udp_delivered(&t, to, N), 0, "still dropped after a reload of the file");

    // A changed rules file keeps the change too, and so does a rollback of it.
    std::fs::write(&rules, format!("version = \"v2\"\n{text}")).unwrap();
    loader_ok(&ns, &["reload", rules.to_str().unwrap(), "--iface", &iface]);
    assert_eq!(udp_delivered(&t, to, N), 0, "still dropped after a reload of a changed file");
    loader_ok(&ns, &["rollback", "1", "--iface", &iface]);
    let show = json(&ns, &["show", "--iface", &iface, "--json"]);
    assert!(show["version"].is_null(), "rolled back to the rules before v2: {show}");
    assert_eq!(udp_delivered(&t, to, N), 0, "still dropped after a rollback");

    // del: passes again; counters still carried.
    let before = stats(&t);
    let r = json(&ns, &["set", "del", &iface, "blocked", CLIENT_V4, "192.0.2.99", "--json"]);
    assert_eq!((r["edit"]["removed"].as_u64(), r["edit"]["absent"].as_u64()), (Some(1), Some(1)), "{r}");
    assert_eq!(r["path"], "delta", "{r}");
    assert_eq!(udp_delivered(&t, to, N), N, "passes again after del");
    let s = stats(&t);
    assert_eq!(rule_packets(&s, "udp-7000"), rule_packets(&before, "udp-7000") + N, "{s}");
    assert_eq!(rule_packets(&s, "blocked"), rule_packets(&before, "blocked"), "{s}");

    // Added again from a file, then restarts: attach --last-good, and a plain attach of the
    // rules file, keep it (the journal is durable, beside the history).
    let batch = dir.0.join("batch.txt");
    std::fs::write(&batch, format!("{CLIENT_V4}\n# comment\n")).unwrap();
    loader_ok(&ns, &["set", "add", &iface, "blocked", "--file", batch.to_str().unwrap()]);
    assert_eq!(udp_delivered(&t, to, N), 0);
    loader_ok(&ns, &["detach", &iface]);
    loader_ok(&ns, &["attach", &iface, "--last-good"]);
    assert_eq!(udp_delivered(&t, to, N), 0, "attach --last-good keeps the change");
    loader_ok(&ns, &["detach", &iface]);
    loader_ok(&ns, &["attach", &iface, "--rules", rules.to_str().unwrap()]);
    assert_eq!(udp_delivered(&t, to, N), 0, "an attach of the rules file keeps the change");

    // The set's first IPv6 prefix longer than /16 takes the reload path (its IPv6 table has no
    // line map yet), and says so; the next ones the delta path, on real IPv6 traffic.
    let r = json(&ns, &["set", "add", &iface, "blocked", "2001:db8:7::/48", "--json"]);
    assert_eq!(r["path"], "reload", "{r}");
    assert!(r["why_reload"].as_str().unwrap().contains("IPv6 table has no line map"), "{r}");
    assert_eq!(udp_delivered(&t, to, N), 0, "the IPv4 change stands");
    let to6 = sa(SERVER_V6, 7000);
    assert_eq!(udp_delivered(&t, to6, N), N);
    let r = json(&ns, &["set", "add", &iface, "blocked", CLIENT_V6, "--json"]);
    assert_eq!(r["path"], "delta", "{r}");
    assert_eq!(udp_delivered(&t, to6, N), 0, "the added IPv6 address is dropped");
    let r = json(&ns, &["set", "del", &iface, "blocked", CLIENT_V6, "--json"]);
    assert_eq!(r["path"], "delta", "{r}");
    assert_eq!(udp_delivered(&t, to6, N), N, "passes again after del");

    // reset: the set is the file's again.
    let r = json(&ns, &["set", "reset", &iface, "blocked", "--json"]);
    assert!(!r["reload"].is_null(), "{r}");
    assert_eq!(udp_delivered(&t, to, N), N, "passes after the reset");
    let r = json(&ns, &["set", "reset", &iface, "--all", "--json"]);
    assert!(r["reload"].is_null(), "nothing left to reset: {r}");

    // Unknown sets are refused with nothing changed; host bits are a usage error.
    let out = loader(&ns, &["set", "add", &iface, "nope", "192.0.2.1"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no set \"nope\""), "{}", String::from_utf8_lossy(&out.stderr));
    let out = loader(&ns, &["set", "add", &iface, "blocked", "192.0.2.1/8"]);
    assert_eq!(out.status.code(), Some(2), "host bits set: a usage error: {}", String::from_utf8_lossy(&out.stderr));
}

/// A daemon following the rules file keeps `set` changes, through its periodic checks and
/// through a new version of the file (which it applies with the journal on top).
#[test]
fn a_daemon_keeps_set_changes_through_file_changes() {
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
    // A new version of the file is applied, with the change on top.
    std::fs::write(&rules, format!("version = \"v2\"\n{text}")).unwrap();
    assert!(
        eventually(std::time::Duration::from_secs(10), || json(&ns, &["show", "--iface", &iface, "--json"])["version"] == "v2"),
        "{}",
        d.log()
    );
    assert_eq!(udp_delivered(&t, to, N), 0, "the new version keeps the set change:\n{}", d.log());
}

/// The backends in `dist/`: the fail2ban action's commands (as fail2ban runs them, its tags
/// filled in) and the CrowdSec custom bouncer's script ban, unban and stop against a real
/// instance.
#[test]
fn the_fail2ban_action_and_the_crowdsec_script_ban_and_unban() {
    if !root_or_skip() {
        return;
    }
    let dir = TempDir::new("setdist");
    let rules = dir.0.join("rules.toml");
    std::fs::write(
        &rules,
        "default = \"pass\"\n[sets.fail2ban]\nprefixes = []\n[sets.crowdsec]\nprefixes = []\n\
         [[rule]]\nname = \"fail2ban\"\naction = \"drop\"\nsrc = [\"@fail2ban\"]\n\
         [[rule]]\nname = \"crowdsec\"\naction = \"drop\"\nsrc = [\"@crowdsec\"]\n",
    )
    .unwrap();
    let mut t = Topology::new("setdist").expect("topology");
    t.detach_on_drop(loader_bin());
    let (ns, iface) = (t.server_ns.clone(), t.server_if.clone());
    loader_ok(&ns, &["attach", &iface, "--rules", rules.to_str().unwrap()]);
    let to = sa(SERVER_V4, 7000);
    assert_eq!(udp_delivered(&t, to, N), N);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");

    // fail2ban: the action's lines with its tags filled in, run by a shell as fail2ban does.
    let action = std::fs::read_to_string(root.join("dist/fail2ban/action.d/xdpfw.conf")).unwrap();
    let line = |key: &str| -> String {
        let l = action.lines().find(|l| l.starts_with(&format!("{key} ="))).unwrap_or_else(|| panic!("no {key} in the action"));
        l.split_once('=').unwrap().1.trim().replace("<loader>", &format!("{} --netns {ns}", loader_bin())).replace("<iface>", &iface).replace("<set>", "fail2ban").replace("<ip>", CLIENT_V4)
    };
    let sh = |cmd: &str| {
        let o = std::process::Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
    };
    sh(&line("actionban"));
    assert_eq!(udp_delivered(&t, to, N), 0, "banned by the fail2ban action");
    sh(&line("actionban"));
    sh(&line("actionunban"));
    assert_eq!(udp_delivered(&t, to, N), N, "unbanned");
    sh(&line("actionban"));
    sh(&line("actionstop"));
    assert_eq!(udp_delivered(&t, to, N), N, "fail2ban's stop drops its bans");

    // CrowdSec: the custom bouncer's script, called as the bouncer calls it.
    let script = root.join("dist/crowdsec/xdpfw-crowdsec");
    let crowdsec = |args: &[&str]| {
        let o = std::process::Command::new(&script)
            .args(args)
            .env("XDPFW_LOADER", loader_bin())
            .env("XDPFW_LOADER_ARGS", format!("--netns {ns}"))
            .env("XDPFW_IFACE", &iface)
            .env("XDPFW_SET", "crowdsec")
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let net = format!("{CLIENT_V4}/32");
    assert_eq!(crowdsec(&["add", &net, "3600", "ssh:bruteforce", "{}"]).0, Some(0));
    assert_eq!(udp_delivered(&t, to, N), 0, "banned by the CrowdSec script");
    assert_eq!(crowdsec(&["del", &net, "-1s", "ssh:bruteforce", "{}"]).0, Some(0));
    assert_eq!(udp_delivered(&t, to, N), N, "unbanned");
    let (code, err) = crowdsec(&["flush", &net]);
    assert_eq!(code, Some(2), "an unknown action is a usage error: {err}");
    // A hostile decision stream cannot slip an option in (one that would read a file).
    for value in ["--file=/etc/hostname", "-h", "192.0.2.1 --json"] {
        let (code, err) = crowdsec(&["add", value, "3600", "x", "{}"]);
        assert_eq!(code, Some(2), "{value}: {err}");
        assert!(err.contains("not an address"), "{value}: {err}");
    }
    // And loader itself takes what follows `--` as prefixes, not options.
    let out = loader(&ns, &["set", "add", &iface, "crowdsec", "--", "--file=/etc/hostname"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("line 1"), "no file was read: {}", String::from_utf8_lossy(&out.stderr));
}
