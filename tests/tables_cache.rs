//! Compiled address tables reused across reloads (issue 11): a reload that changes no prefix
//! shares the live buffer's tables instead of compiling and installing them again, and its
//! verdicts are those of the new ruleset with the old prefixes; one that changes a prefix
//! builds new tables. Sharing chains across reloads, survives a failed reload, and starts
//! afresh after an attach.

use std::net::SocketAddr;

use xdpfw_testkit::{daemon::TempDir, topology::CLIENT_V4, *};

const N: u64 = 10;

fn json(ns: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&loader_ok(ns, args)).expect("JSON")
}

#[test]
fn reloads_that_change_no_prefix_reuse_the_live_tables() {
    if !root_or_skip() {
        return;
    }
    let dir = TempDir::new("tables-cache");
    let rules = dir.0.join("rules.toml");
    let set = dir.0.join("blocked.txt");
    let write = |blocked: &[&str], port: u16, test: &str| {
        std::fs::write(&set, blocked.join("\n")).unwrap();
        std::fs::write(
            &rules,
            format!(
                "default = \"pass\"\n[sets.blocked]\nfile = \"blocked.txt\"\n\
                 [[rule]]\nname = \"blocked\"\naction = \"drop\"\nsrc = [\"@blocked\", \"2001:db8:dead::/48\"]\n\
                 [[rule]]\nname = \"port\"\naction = \"drop\"\nproto = \"udp\"\ndport = {port}\n{test}"
            ),
        )
        .unwrap();
    };
    let mut t = Topology::new("tcache").expect("topology");
    t.detach_on_drop(loader_bin());
    let (ns, iface) = (t.server_ns.clone(), t.server_if.clone());
    let delivered = |port: u16| udp_delivered(&t, SocketAddr::new(ip(SERVER_V4), port), N);
    let reload = || json(&ns, &["reload", rules.to_str().unwrap(), "--iface", &iface, "--json"]);
    let reused = |r: &serde_json::Value| r["times"]["tables_reused"].as_bool().expect("times.tables_reused");

    write(&["198.51.100.0/24", "203.0.113.5", "2001:db8:1::1"], 7001, "");
    loader_ok(&ns, &["attach", &iface, "--rules", rules.to_str().unwrap()]);
    assert_eq!((delivered(7000), delivered(7001)), (N, 0));

    // Only the port rule changes: the tables are shared, the new port applies.
    write(&["198.51.100.0/24", "203.0.113.5", "2001:db8:1::1"], 7000, "");
    let r = reload();
    assert!(reused(&r), "{r}");
    assert_eq!(r["ruleset"]["table_entries"], 4, "the summary of the reused tables: {r}");
    assert_eq!((delivered(7000), delivered(7001)), (0, N));

    // The set gains the client: new tables, and the client is dropped on every port.
    write(&["198.51.100.0/24", "203.0.113.5", "2001:db8:1::1", CLIENT_V4], 7000, "");
    let r = reload();
    assert!(!reused(&r), "{r}");
    assert_eq!((delivered(7001), delivered(7002)), (0, 0));

    // Two port changes in a row: the second shares tables that were themselves shared.
    for port in [7002, 7003] {
        write(&["198.51.100.0/24", "203.0.113.5", "2001:db8:1::1", CLIENT_V4], port, "");
        let r = reload();
        assert!(reused(&r), "{r}");
        assert_eq!(delivered(7001), 0, "still the tables with the client in them");
    }

    // A reload refused by its self-tests leaves the live tables described: the next one reuses.
    write(
        &["198.51.100.0/24", "203.0.113.5", "2001:db8:1::1", CLIENT_V4],
        7004,
        "[[test]]\npacket = \"udp 192.0.2.200:1000 -> 192.0.2.1:9\"\nexpect = \"drop\"\n",
    );
    let out = loader(&ns, &["reload", rules.to_str().unwrap(), "--iface", &iface]);
    assert!(!out.status.success(), "the self-test must fail");
    write(&["198.51.100.0/24", "203.0.113.5", "2001:db8:1::1"], 7004, "");
    let r = reload();
    assert!(!reused(&r), "the client left the set: {r}");
    assert_eq!((delivered(7001), delivered(7004)), (N, 0));
    write(&["198.51.100.0/24", "203.0.113.5", "2001:db8:1::1"], 7005, "");
    assert!(reused(&reload()));
    assert_eq!((delivered(7004), delivered(7005)), (N, 0));

    // A new attach makes new maps: its tables are described anew and reused by the next reload.
    loader_ok(&ns, &["detach", &iface]);
    write(&["198.51.100.0/24", CLIENT_V4], 7000, "");
    loader_ok(&ns, &["attach", &iface, "--rules", rules.to_str().unwrap()]);
    write(&["198.51.100.0/24", CLIENT_V4], 7001, "");
    let r = reload();
    assert!(reused(&r), "{r}");
    assert_eq!(delivered(7002), 0, "the client is in the set of this attach");
    // `set del` changes the set: the next reload of the file does not reuse its tables.
    loader_ok(&ns, &["set", "del", &iface, "blocked", CLIENT_V4]);
    assert_eq!(delivered(7002), N);
    let r = reload();
    assert!(!reused(&r), "{r}");
    assert_eq!(delivered(7002), 0);
}
