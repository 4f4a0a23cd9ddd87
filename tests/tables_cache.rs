//! Compiled address tables reused across reloads (issue 11): a reload that changes no prefix
//! shares the live buffer's tables instead of compiling and installing them again, and its
//! verdicts are those of the new ruleset with the old prefixes; one that changes a prefix
//! builds new tables. Sharing chains across reloads, survives a failed reload, and starts
//! afresh after an attach.

use std::{net::SocketAddr, os::unix::fs::FileExt};

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
    let slot_changes = |r: &serde_json::Value| r["times"]["slot_changes"].as_u64().expect("times.slot_changes");

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
    assert!(slot_changes(&r) > 0, "new tables go into the inactive buffer's slots: {r}");
    assert_eq!((delivered(7001), delivered(7002)), (0, 0));

    // Two port changes in a row: the second shares tables that were themselves shared. Neither
    // changes an array-of-maps slot (each change waits for an RCU grace period before the
    // flip), not even the first after the set change: clearing the retired buffer left the
    // live tables in its slots.
    for port in [7002, 7003] {
        write(&["198.51.100.0/24", "203.0.113.5", "2001:db8:1::1", CLIENT_V4], port, "");
        let r = reload();
        assert!(reused(&r), "{r}");
        assert_eq!(slot_changes(&r), 0, "{r}");
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
    // `set del` changes the set; a reload of the file keeps the change (the set journal), so
    // its tables are the live ones and are reused; `set reset` changes them back.
    loader_ok(&ns, &["set", "del", &iface, "blocked", CLIENT_V4]);
    assert_eq!(delivered(7002), N);
    let r = reload();
    assert!(reused(&r), "{r}");
    assert_eq!(delivered(7002), N);
    loader_ok(&ns, &["set", "reset", &iface, "blocked"]);
    assert_eq!(delivered(7002), 0);
    let r = reload();
    assert!(reused(&r), "{r}");
}

/// The daemon's path, in this process (a long-lived one, like `loader run`): a reload that
/// changes only a port rule beside a large set file reuses the compiled tables and does not read
/// the set file at all once its metadata vouches for it; a set file changed in place (same
/// size, right after a reload) is read, parsed and compiled again; a file changed less than
/// `TRUST_AGE` before a read is read again by the next reload. Asserted on the reload's flags
/// and counters, never on times.
#[test]
fn a_long_lived_process_reads_no_unchanged_set_file() {
    if !root_or_skip() {
        return;
    }
    use xdpfw_control::{self as control, Instance, ReloadOptions};
    let dir = TempDir::new("tables-cache-proc");
    let (rules, set) = (dir.0.join("rules.toml"), dir.0.join("big.txt"));
    // 20,000 /24s: about 250 KB, above the 64 KiB from which set files are kept; texts of this
    // run alone (a comment of fixed width), so none was parsed and kept on disk by an earlier one.
    let run = format!("# run {:010} {:020}\n", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let lines = |first: u8| -> String { std::iter::once(run.clone()).chain((0..20_000u32).map(|i| format!("{first}.{}.{}.0/24\n", i >> 8 & 0xff, i & 0xff))).collect() };
    std::fs::write(&set, lines(10)).unwrap();
    let write_rules = |port: u16| {
        std::fs::write(
            &rules,
            format!("default = \"pass\"\n[sets.big]\nfile = \"big.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@big\"]\n[[rule]]\naction = \"drop\"\nproto = \"udp\"\ndport = {port}\n"),
        )
        .unwrap();
    };
    write_rules(7000);
    let mut t = Topology::new("tcproc").expect("topology");
    t.detach_on_drop(loader_bin());
    let iface = t.server_if.clone();
    // This thread works inside the server namespace from here on.
    let ns = std::fs::File::open(std::path::Path::new("/run/netns").join(&t.server_ns)).unwrap();
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    // Older than TRUST_AGE when first read, so the attach's read already vouches for it.
    std::thread::sleep(xdpfw_rules::TRUST_AGE + std::time::Duration::from_millis(300));
    control::attach(&iface, Some(&rules), xdpfw_kernel::AttachMode::Auto).unwrap();
    let inst = Instance::find(Some(&iface)).unwrap();
    let reload = |port: u16| {
        write_rules(port);
        control::reload(&inst, &rules, &ReloadOptions::default()).unwrap().times
    };
    let files = |tm: &control::ReloadTimes| (tm.set_files_read, tm.set_files_parsed, tm.set_files_unread);

    // Port-only: tables shared, the set file not even read.
    let tm = reload(7001);
    assert!(tm.tables_reused, "{tm:?}");
    assert_eq!(files(&tm), (0, 0, 1), "read, parsed, unread: {tm:?}");
    let tm = reload(7002);
    assert!(tm.tables_reused && files(&tm) == (0, 0, 1), "{tm:?}");

    // The set changes in place, same size, at once: seen (read, parsed), new tables.
    std::fs::OpenOptions::new().write(true).open(&set).unwrap().write_all_at(lines(11).as_bytes(), 0).unwrap();
    let tm = reload(7003);
    assert!(!tm.tables_reused, "a changed set must be compiled: {tm:?}");
    assert_eq!(files(&tm), (1, 1, 0), "{tm:?}");
    let state = inst.state().unwrap();
    assert_eq!(state.ruleset.prefixes, 20_000);
    // Changed less than TRUST_AGE ago: read again (its text found kept, not parsed).
    let tm = reload(7004);
    assert!(tm.tables_reused && files(&tm) == (1, 0, 0), "{tm:?}");
    // Once settled, one more read records it, and the next reload does not read it.
    std::thread::sleep(xdpfw_rules::TRUST_AGE + std::time::Duration::from_millis(300));
    let tm = reload(7005);
    assert!(tm.tables_reused && files(&tm) == (1, 0, 0), "{tm:?}");
    let tm = reload(7006);
    assert!(tm.tables_reused && files(&tm) == (0, 0, 1), "{tm:?}");
    // A new file renamed over the path (a new inode): read and parsed.
    let tmp = dir.0.join("big.txt.new");
    std::fs::write(&tmp, lines(12)).unwrap();
    std::fs::rename(&tmp, &set).unwrap();
    let tm = reload(7007);
    assert!(!tm.tables_reused && files(&tm) == (1, 1, 0), "{tm:?}");
    control::detach(&iface).unwrap();
}

/// A fresh `loader reload` beside a large set file it has seen before (another process parsed
/// it and kept what it parsed, by the text's digest): read and hashed, not parsed; and a text
/// changed by one line is parsed. A kept file that does not check out (damaged on disk) is
/// parsed again, with the same result. Asserted on the reloads' counters and verdicts.
#[test]
fn a_new_process_does_not_parse_a_set_file_parsed_before() {
    if !root_or_skip() {
        return;
    }
    let dir = TempDir::new("tables-cache-disk");
    let (rules, set) = (dir.0.join("rules.toml"), dir.0.join("big.txt"));
    // Above the 64 KiB from which set files are kept; a text of this run alone.
    let run = format!("# run {} {:?}\n", std::process::id(), std::time::SystemTime::now());
    let lines = |extra: &str| -> String { std::iter::once(run.clone()).chain((0..20_000u32).map(|i| format!("10.{}.{}.0/24\n", i >> 8 & 0xff, i & 0xff))).chain([extra.to_string()]).collect() };
    let write_rules = |port: u16| {
        std::fs::write(&rules, format!("default = \"pass\"\n[sets.big]\nfile = \"big.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@big\"]\n[[rule]]\naction = \"drop\"\nproto = \"udp\"\ndport = {port}\n")).unwrap();
    };
    std::fs::write(&set, lines("")).unwrap();
    write_rules(7000);
    let mut t = Topology::new("tcdisk").expect("topology");
    t.detach_on_drop(loader_bin());
    let (ns, iface) = (t.server_ns.clone(), t.server_if.clone());
    loader_ok(&ns, &["attach", &iface, "--rules", rules.to_str().unwrap()]);
    let reload = |port: u16| {
        write_rules(port);
        let r = json(&ns, &["reload", rules.to_str().unwrap(), "--iface", &iface, "--json"]);
        let n = |k: &str| r["times"][k].as_u64().unwrap_or_else(|| panic!("times.{k} in {r}"));
        (n("set_files_read"), n("set_files_parsed"))
    };
    // The attach parsed it; this process is new: read, not parsed.
    assert_eq!(reload(7001), (1, 0));
    // One line more: parsed; then kept, so the next process does not parse it.
    std::fs::write(&set, lines(&format!("{CLIENT_V4}\n"))).unwrap();
    assert_eq!(reload(7002), (1, 1));
    assert_eq!(udp_delivered(&t, SocketAddr::new(ip(SERVER_V4), 7000), N), 0, "the client is in the set");
    assert_eq!(reload(7003), (1, 0));
    assert_eq!(udp_delivered(&t, SocketAddr::new(ip(SERVER_V4), 7000), N), 0, "still, from the kept prefixes");
    // Every kept file damaged (one byte in its records): each is parsed again, the same.
    let kept = std::path::Path::new("/var/lib/xdpfw").join(xdpfw_control::history::PARSED_SETS);
    for e in std::fs::read_dir(&kept).unwrap().flatten() {
        let mut bytes = std::fs::read(e.path()).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 0x01;
        std::fs::write(e.path(), bytes).unwrap();
    }
    assert_eq!(reload(7004), (1, 1));
    assert_eq!(udp_delivered(&t, SocketAddr::new(ip(SERVER_V4), 7000), N), 0);
    assert_eq!(reload(7005), (1, 0));
    // At most 8 parsed files are kept.
    assert!(std::fs::read_dir(&kept).unwrap().count() <= 8);
}
