//! The operator's view: installing (`./run install`, `./run deb`), and the commands that show
//! what is live, driven through the `loader` binary as an operator would.

use xdpfw_testkit as harness;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use harness::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cargo xtask ARGS` at the root of the repository; returns stdout.
fn xtask(args: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo).current_dir(repo()).arg("xtask").args(args).output().expect("running cargo xtask");
    assert!(out.status.success(), "cargo xtask {args:?} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xdpfw-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn install_into_destdir_puts_binary_man_pages_completions_and_unit_in_place() {
    let dest = tempdir("install");
    xtask(&["install", "--debug", "--destdir", dest.to_str().unwrap()]);
    let root = dest.join("usr/local");
    let out = Command::new(root.join("bin/loader")).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("loader {}", env!("CARGO_PKG_VERSION")));

    // Man pages from the clap definition: the command and each subcommand, hidden ones left out.
    let man = root.join("share/man/man1");
    let page = read(&man.join("loader.1"));
    assert!(page.contains(".TH loader 1"), "{page}");
    for sub in ["attach", "reload", "rollback", "status", "stats", "check", "explain", "run", "detach", "list"] {
        let p = read(&man.join(format!("loader-{sub}.1")));
        assert!(p.contains(&format!(".TH loader-{sub} 1")), "loader-{sub}.1: {p}");
    }
    assert!(!man.join("loader-completions.1").exists() && !man.join("loader-man.1").exists(), "hidden commands get no page");
    // `man -l` renders it (groff is what an operator's `man loader` runs).
    if Command::new("man").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let out = Command::new("man").arg("-l").arg(man.join("loader-reload.1")).env("MANPAGER", "cat").env("MANWIDTH", "100").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("--lock-wait"), "man -l loader-reload.1:\n{text}");
    }

    let bash = read(&root.join("share/bash-completion/completions/loader"));
    assert!(bash.contains("complete -F _loader") && bash.contains("rollback"), "{bash}");
    let zsh = read(&root.join("share/zsh/site-functions/_loader"));
    assert!(zsh.starts_with("#compdef loader") && zsh.contains("--lock-wait"), "{zsh}");
    let fish = read(&root.join("share/fish/vendor_completions.d/loader.fish"));
    assert!(fish.contains("complete -c loader") && fish.contains("reload"), "{fish}");
    // bash itself accepts the script.
    let syntax = Command::new("bash").arg("-n").arg(root.join("share/bash-completion/completions/loader")).status().unwrap();
    assert!(syntax.success());

    let unit = read(&root.join("lib/systemd/system/xdpfw@.service"));
    assert!(unit.contains("ExecStart=/usr/local/bin/loader run %i"), "{unit}");
    assert!(root.join("share/doc/xdpfw/xdpfw.env.example").exists());
    assert!(root.join("share/doc/xdpfw/xdpfw-alerts.yml").exists() && root.join("share/doc/xdpfw/xdpfw-dashboard.json").exists());
    // The `loader set` backends name the installed binaries.
    assert!(read(&root.join("share/doc/xdpfw/fail2ban/xdpfw.conf")).contains("loader = /usr/local/bin/loader"));
    assert!(read(&root.join("share/doc/xdpfw/crowdsec/crowdsec-custom-bouncer.yaml")).contains("bin_path: /usr/local/lib/xdpfw/xdpfw-crowdsec"));
    let script = root.join("lib/xdpfw/xdpfw-crowdsec");
    assert!(read(&script).contains("/usr/local/bin/loader"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&script).unwrap().permissions().mode() & 0o777, 0o755);
    std::fs::remove_dir_all(&dest).unwrap();
}

#[test]
fn install_honours_prefix() {
    let dest = tempdir("prefix");
    xtask(&["install", "--debug", "--destdir", dest.to_str().unwrap(), "--prefix", "/opt/xdpfw"]);
    let unit = read(&dest.join("opt/xdpfw/lib/systemd/system/xdpfw@.service"));
    assert!(unit.contains("ExecStart=/opt/xdpfw/bin/loader run %i"), "{unit}");
    assert!(dest.join("opt/xdpfw/bin/loader").exists() && !dest.join("usr").exists());
    std::fs::remove_dir_all(&dest).unwrap();
}

/// The .deb installed by dpkg into an empty root (its own dpkg database), then `loader --version`
/// run chrooted into that root, with only the shared libraries the binary names (what the
/// package's `Depends: libc6` provides) copied in.
#[test]
fn deb_installs_into_a_clean_root_and_runs_there() {
    let deb = PathBuf::from(xtask(&["deb", "--debug"]).lines().last().expect("the .deb's path").trim());
    assert!(deb.exists(), "{}", deb.display());
    let root = tempdir("debroot");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let out = Command::new("dpkg").arg(format!("--root={}", root.display())).args(["--force-depends", "--force-script-chrootless", "-i"]).arg(&deb).output().unwrap();
    assert!(out.status.success(), "dpkg -i: {}", String::from_utf8_lossy(&out.stderr));
    let listed = Command::new("dpkg").arg(format!("--root={}", root.display())).args(["-L", "xdpfw"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for f in ["/usr/bin/loader", "/usr/share/man/man1/loader.1", "/usr/share/bash-completion/completions/loader", "/usr/lib/systemd/system/xdpfw@.service"] {
        assert!(listed.lines().any(|l| l == f), "{f} not in the package:\n{listed}");
    }
    // The libraries of libc6 the binary needs, so the chroot can run it.
    let ldd = Command::new("ldd").arg(root.join("usr/bin/loader")).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        // By a child process: a write descriptor in this one could leak into another test
        // thread's fork, and executing the copied ld.so would then fail with ETXTBSY.
        assert!(Command::new("cp").arg(lib).arg(&to).status().unwrap().success(), "cp {lib}");
    }
    let out = Command::new("chroot").arg(&root).args(["/usr/bin/loader", "--version"]).output().unwrap();
    assert!(out.status.success(), "chroot loader --version: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("loader {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new("chroot").arg(&root).args(["/usr/bin/loader", "check", "/nonexistent.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "a missing rules file is an invalid ruleset: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&root).unwrap();
}


fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `YYYY-MM-DDTHH:MM:SSZ` somewhere in `s`.
fn has_rfc3339(s: &str) -> bool {
    s.as_bytes().windows(20).any(|w| {
        w.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
    })
}

#[test]
fn list_status_and_stats_show_the_mode_in_effect_and_utc_times() {
    let t = attached("mode", "services.toml");
    let ns = &t.server_ns;
    let iface = t.server_if.as_str();
    // veth has a native XDP implementation: `auto` attaches natively.
    let list = loader_ok(ns, &["list"]);
    let row = list.lines().find(|l| l.starts_with(iface)).unwrap_or_else(|| panic!("{iface} not in:\n{list}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[2..5], ["native", "1", "4"], "mode, generation, rules (after the namespace): {list}");
    assert_eq!(cols[1], ns.as_str(), "the namespace: {list}");
    assert!(row.ends_with("services-1"), "{list}");
    let doc = json(&loader_ok(ns, &["list", "--json"]));
    assert_eq!(doc["schema"], 1);
    let inst = doc["instances"].as_array().unwrap().iter().find(|i| i["iface"] == iface).expect("the instance").clone();
    assert_eq!(inst["mode"], "native");
    assert_eq!(inst["generation"], 1);
    assert_eq!(inst["version"], "services-1");

    let status = loader_ok(ns, &["status", "--iface", iface, "--history"]);
    assert!(status.contains("(native mode)") && !status.contains("Auto"), "{status}");
    assert!(has_rfc3339(status.lines().next().unwrap()), "attached at in RFC 3339: {status}");
    assert!(status.lines().skip(2).any(has_rfc3339), "history times in RFC 3339: {status}");
    assert!(!status.contains("unix time"));
    let stats_text = loader_ok(ns, &["stats", "--iface", iface]);
    assert!(stats_text.starts_with(&format!("xdpfw on {iface} (native mode)")), "{stats_text}");
    for cmd in ["stats", "status"] {
        let doc = json(&loader_ok(ns, &[cmd, "--iface", iface, "--json"]));
        assert_eq!(doc["schema"], 1, "{cmd}");
        assert_eq!(doc["mode_in_effect"], "native", "{cmd}");
    }

    // Generic mode when asked for.
    loader_ok(ns, &["detach", iface]);
    loader_ok(ns, &["attach", iface, "--rules", &rules_file("services.toml"), "--mode", "skb"]);
    let status = loader_ok(ns, &["status", "--iface", iface]);
    assert!(status.contains("(skb mode)"), "{status}");
}

#[test]
fn check_prints_json_and_never_says_nothing_was_changed() {
    let out = Command::new(loader_bin()).args(["check", "--json", &rules_file("services.toml")]).output().unwrap();
    assert!(out.status.success());
    let doc = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["version"], "services-1");
    assert_eq!(doc["rules"], 4);
    assert!(doc["hash"].as_str().is_some_and(|h| h.len() >= 12));

    let dir = tempdir("check");
    let failing = dir.join("failing.toml");
    std::fs::write(&failing, "default = \"drop\"\n[[test]]\npacket = \"udp 192.0.2.1:1 -> 192.0.2.2:2\"\nexpect = \"pass\"\n").unwrap();
    let out = Command::new(loader_bin()).args(["check", "--json"]).arg(&failing).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let doc = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["self_test_failures"].as_array().unwrap().len(), 1, "{doc}");

    let broken = dir.join("broken.toml");
    std::fs::write(&broken, "default = \"pass\"\n[[rule]\n").unwrap();
    let out = Command::new(loader_bin()).args(["check"]).arg(&broken).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(!err.contains("nothing was changed"), "check changes nothing anyway: {err}");
    // A packet that does not parse is a usage error.
    let out = Command::new(loader_bin()).args(["explain", &rules_file("services.toml"), "udp nonsense"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rollback_to_a_version_or_a_hash() {
    let t = attached("rbto", "alternate-a.toml");
    let ns = &t.server_ns;
    let iface = t.server_if.as_str();
    let hash_a = json(&loader_ok(ns, &["status", "--iface", iface, "--json"]))["state"]["ruleset"]["hash"].as_str().unwrap().to_string();
    loader_ok(ns, &["reload", &rules_file("alternate-b.toml"), "--iface", iface]);
    loader_ok(ns, &["reload", &rules_file("ping-only.toml"), "--iface", iface]);
    let live = |ns: &str| json(&loader_ok(ns, &["status", "--iface", iface, "--json"]))["state"]["ruleset"]["version"].as_str().unwrap().to_string();

    let out = loader_ok(ns, &["rollback", "--to", "alternate-b", "--iface", iface]);
    assert!(out.contains("rolled back"), "{out}");
    assert_eq!(live(ns), "alternate-b");
    loader_ok(ns, &["rollback", "--to", &hash_a[..8], "--iface", iface]);
    assert_eq!(live(ns), "alternate-a");

    let out = loader(ns, &["rollback", "--to", "no-such-version", "--iface", iface]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no applied ruleset with version \"no-such-version\""), "{err}");
    assert_eq!(live(ns), "alternate-a", "a failed rollback changes nothing");
    let out = loader(ns, &["rollback", "2", "--to", "alternate-b", "--iface", iface]);
    assert_eq!(out.status.code(), Some(2), "N and --to together are a usage error");
}

#[test]
fn control_characters_in_version_labels_are_escaped_when_printed() {
    let t = attached("ctl", "services.toml");
    let dir = tempdir("ctl");
    let file = dir.join("evil.toml");
    std::fs::write(&file, "version = \"v1\\u001b[2J\\u0007\"\ndefault = \"pass\"\n[[rule]]\nname = \"r\\u001b[31m\"\naction = \"drop\"\nproto = \"udp\"\ndport = 9\n").unwrap();
    loader_ok(&t.server_ns, &["reload", file.to_str().unwrap(), "--iface", &t.server_if]);
    for args in [&["status", "--history"][..], &["stats"], &["list"]] {
        let mut a = args.to_vec();
        if args[0] != "list" {
            a.extend(["--iface", &t.server_if]);
        }
        let out = loader_ok(&t.server_ns, &a);
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{args:?} printed a control character: {out:?}");
        assert!(out.contains("v1\\u{1b}[2J\\u{7}"), "{args:?}: {out}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn sa(addr: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip(addr), port)
}

/// alternate-a.toml with a rule inserted before its two.
const INSERTED: &str = "version = \"inserted\"\ndefault = \"drop\"\n\n[[rule]]\nname = \"new-first\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7002\n\n[[rule]]\nname = \"a-drop-7000\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7000\n\n[[rule]]\nname = \"a-pass-7001\"\naction = \"pass\"\nproto = \"udp\"\ndport = 7001\n";

#[test]
fn a_reload_that_keeps_rule_names_keeps_their_counters() {
    let t = attached("keep", "alternate-a.toml");
    let (ns, iface) = (&t.server_ns, t.server_if.as_str());
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 30), 0);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7001), 20), 20);
    let dir = tempdir("keep");
    let inserted = dir.join("inserted.toml");
    std::fs::write(&inserted, INSERTED).unwrap();
    loader_ok(ns, &["reload", inserted.to_str().unwrap(), "--iface", iface]);
    let s = stats(&t);
    assert_eq!(s["generation"], 2);
    assert_eq!(rule_packets(&s, "a-drop-7000"), 30, "kept its name, kept its count (now rule #1): {s}");
    assert_eq!(rule_packets(&s, "a-pass-7001"), 20);
    assert_eq!(rule_packets(&s, "new-first"), 0);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 10), 0);
    assert_eq!(rule_packets(&stats(&t), "a-drop-7000"), 40, "and counts on from there");
    // Bytes too: 8-byte payloads, 50-byte frames (14 + 20 + 8 + 8).
    let bytes = stats(&t)["rules"].as_array().unwrap().iter().find(|r| r["name"] == "a-drop-7000").unwrap()["bytes"].as_u64().unwrap();
    assert_eq!(bytes, 40 * 50);

    // A name that goes away takes its counts with it.
    loader_ok(ns, &["reload", &rules_file("alternate-b.toml"), "--iface", iface]);
    loader_ok(ns, &["reload", &rules_file("alternate-a.toml"), "--iface", iface]);
    assert_eq!(rule_packets(&stats(&t), "a-drop-7000"), 0, "{}", stats(&t));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prometheus_series_keep_their_labels_across_an_inserted_rule() {
    use harness::daemon::{Daemon, TempDir, metric, scrape};
    let mut t = Topology::new("prom").expect("topology");
    // Declared before the daemon, so dropped after it: the daemon is killed, then the firewall
    // it attached is detached.
    t.detach_on_drop(loader_bin());
    let dir = TempDir::new("prom");
    let file = dir.0.join("rules.toml");
    std::fs::write(&file, read(&rules_dir().join("alternate-a.toml"))).unwrap();
    let _d = Daemon::start(&t, &dir.0, &["--rules", file.to_str().unwrap(), "--min-interval", "100ms", "--detach-on-exit"]);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 30), 0);
    let series = format!("xdpfw_rule_packets_total{{iface=\"{}\",rule=\"a-drop-7000\"}}", t.server_if);
    let s = scrape(&t).unwrap();
    assert_eq!(metric(&s, &series), Some(30.0), "{s}");
    assert!(s.contains(&format!("xdpfw_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION"))), "{s}");
    assert!(s.contains("# TYPE xdpfw_build_info gauge"));
    assert!(s.contains(&format!("xdpfw_rule_info{{iface=\"{}\",rule=\"a-drop-7000\",index=\"0\",action=\"drop\"}} 1", t.server_if)), "{s}");

    // Insert a rule before it: the series keeps its labels and its value.
    std::fs::write(&file, INSERTED).unwrap();
    // Waits for the end of the pipeline (the counts are carried after the grace period; the
    // generation flips before it).
    assert!(eventually(std::time::Duration::from_secs(10), || scrape(&t).and_then(|s| metric(&s, "xdpfw_reloads_total{result=\"ok\"")) == Some(1.0)), "the daemon reloaded");
    let s = scrape(&t).unwrap();
    assert_eq!(metric(&s, "xdpfw_generation"), Some(2.0), "{s}");
    assert_eq!(metric(&s, &series), Some(30.0), "{s}");
    assert!(s.contains(&format!("xdpfw_rule_info{{iface=\"{}\",rule=\"a-drop-7000\",index=\"1\",action=\"drop\"}} 1", t.server_if)), "{s}");
    assert!(!s.lines().any(|l| l.starts_with("xdpfw_rule_packets_total") && l.contains("index=")), "no index label on counters: {s}");
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 5), 0);
    assert_eq!(metric(&scrape(&t).unwrap(), &series), Some(35.0));
}

const LIVE_RULES: &str = "version = \"live-1\"\ndefault = \"pass\"\n\n[sets.bad]\nfile = \"bad.txt\"\n\n# the client is in @bad\n[[rule]]\nname = \"from-bad\"\naction = \"drop\"\nproto = \"udp\"\nsrc = [\"@bad\"]\ndport = 7000\n\n[[rule]]\nname = \"no-7001\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7001\n";
const BAD_SET: &str = "# addresses\n192.0.2.1\n198.51.100.77\n203.0.113.0/24\n";

#[test]
fn show_diff_and_explain_answer_for_the_live_ruleset() {
    let mut t = Topology::new("show").expect("topology");
    t.detach_on_drop(loader_bin());
    let (ns, iface) = (t.server_ns.clone(), t.server_if.clone());
    let dir = tempdir("show");
    let file = dir.join("rules.toml");
    std::fs::write(&file, LIVE_RULES).unwrap();
    std::fs::write(dir.join("bad.txt"), BAD_SET).unwrap();
    loader_ok(&ns, &["attach", &iface, "--rules", file.to_str().unwrap()]);

    // A rejected edit: the file no longer holds the live rules, `show` still does.
    std::fs::write(&file, "default = \"pass\"\n[[rule]\n").unwrap();
    assert_eq!(loader(&ns, &["reload", file.to_str().unwrap(), "--iface", &iface]).status.code(), Some(3));
    let shown = loader_ok(&ns, &["show", "--iface", &iface]);
    assert!(shown.starts_with(&format!("# live on {iface}: generation 1, version live-1, hash ")), "{shown}");
    assert!(shown.contains("# set @bad: 3 prefixes\n"), "{shown}");
    assert!(shown.ends_with(LIVE_RULES), "the text exactly as it went live:\n{shown}");
    assert!(!shown.contains("198.51.100.77"), "set contents only with --sets");
    let with_sets = loader_ok(&ns, &["show", "--iface", &iface, "--sets"]);
    assert!(with_sets.contains("# ---- set file bad.txt ----\n") && with_sets.ends_with(BAD_SET), "{with_sets}");
    let doc = json(&loader_ok(&ns, &["show", "--iface", &iface, "--json"]));
    assert_eq!(doc["schema"], 1);
    assert_eq!(doc["text"], LIVE_RULES);
    assert_eq!(doc["sets"][0]["name"], "bad");
    assert_eq!(doc["sets"][0]["prefixes"], 3);
    // The output is itself a rules file (the header is comments) that loads to the same hash,
    // beside the set file.
    let again = dir.join("shown.toml");
    std::fs::write(&again, &shown).unwrap();
    let checked = json(&String::from_utf8_lossy(&Command::new(loader_bin()).args(["check", "--json"]).arg(&again).output().unwrap().stdout));
    assert_eq!(checked["rules"], 2);

    // explain --iface answers for the live rules, and real packets agree with it.
    let ex = loader_ok(&ns, &["explain", "--iface", &iface, "udp 192.0.2.1:5000 -> 192.0.2.2:7000"]);
    assert!(ex.contains("drop by rule #0 \"from-bad\""), "{ex}");
    let ex = loader_ok(&ns, &["explain", "--iface", &iface, "udp 192.0.2.1:5000 -> 192.0.2.2:7002", "--json"]);
    assert_eq!(json(&ex)["decision"]["action"], "pass", "{ex}");
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 20), 0);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7002), 20), 20);
    assert_eq!(rule_packets(&stats(&t), "from-bad"), 20);
    let out = loader(&ns, &["explain", "--iface", &iface, "udp nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    let out = loader(&ns, &["explain", "--iface", &iface, file.to_str().unwrap(), "udp 192.0.2.1:1 -> 192.0.2.2:2"]);
    assert_eq!(out.status.code(), Some(2), "a file and --iface together: {}", String::from_utf8_lossy(&out.stderr));

    // diff: a rule inserted, one removed, one moved below another, a set grown.
    let next = dir.join("next.toml");
    std::fs::write(&next, "version = \"live-2\"\ndefault = \"pass\"\n\n[sets.bad]\nfile = \"bad2.txt\"\n\n[[rule]]\nname = \"new-7003\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7003\n\n[[rule]]\nname = \"from-bad\"\naction = \"drop\"\nproto = \"udp\"\nsrc = [\"@bad\"]\ndport = 7000\n").unwrap();
    std::fs::write(dir.join("bad2.txt"), format!("{BAD_SET}10.0.0.0/8\n10.1.0.0/16\n")).unwrap();
    let d = loader_ok(&ns, &["diff", next.to_str().unwrap(), "--iface", &iface]);
    assert!(d.contains("  + rule #0 \"new-7003\" (drop)\n"), "{d}");
    assert!(d.contains("  - rule #1 \"no-7001\" (drop)\n"), "{d}");
    assert!(d.contains("  set @bad: 3 -> 5 prefixes (+2)\n"), "{d}");
    assert!(!d.contains("moved") && !d.contains("changed"), "an insertion moves nothing: {d}");
    let moved = dir.join("moved.toml");
    std::fs::write(&moved, LIVE_RULES.replace("version = \"live-1\"", "version = \"m\"").replace("dport = 7001", "dport = 7011")).unwrap();
    // Swap the two rules: one of them moved; and the other's port changed.
    let text = read(&moved);
    let (head, rest) = text.split_at(text.find("# the client").unwrap());
    let (a, b) = rest.split_at(rest.find("[[rule]]\nname = \"no-7001\"").unwrap());
    std::fs::write(&moved, format!("{head}{b}\n{a}")).unwrap();
    let dj = json(&loader_ok(&ns, &["diff", moved.to_str().unwrap(), "--iface", &iface, "--json"]));
    assert_eq!(dj["schema"], 1);
    assert_eq!(dj["moved"].as_array().unwrap().len(), 1, "{dj}");
    assert_eq!(dj["changed"], serde_json::json!(["no-7001"]), "{dj}");
    assert_eq!(dj["added"].as_array().unwrap().len(), 0);
    let same = loader_ok(&ns, &["diff", dir.join("shown.toml").to_str().unwrap(), "--iface", &iface]);
    // The shown text differs from the live file by its header comments only.
    assert!(same.contains("same rules and sets"), "{same}");
    // Nothing of this changed the live ruleset.
    assert_eq!(stats(&t)["generation"], 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// UDP datagrams from the client to `to`, about `per_100ms` every 100 ms, until dropped.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(t: &Topology, flows: &[(std::net::SocketAddr, u64)]) -> Self {
        use std::sync::{Arc, atomic::{AtomicBool, Ordering}};
        let stop = Arc::new(AtomicBool::new(false));
        let (s, ns, flows) = (stop.clone(), t.client_ns.clone(), flows.to_vec());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for &(to, n) in &flows {
                    send_udp(&ns, to, n);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A tmux server of our own (its own socket), killed on drop: a pseudo-terminal for `loader top`.
struct Tmux(String);

impl Tmux {
    fn start(command: &str) -> Self {
        let t = Tmux(format!("xdpfw-test-{}-{}", std::process::id(), rand::random::<u32>()));
        let out = t.cmd(&["new-session", "-d", "-s", "top", "-x", "110", "-y", "30", command]);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        t
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux").args(["-L", &self.0, "-f", "/dev/null"]).args(args).output().expect("running tmux (apt-get install tmux)")
    }

    /// What the terminal shows now.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// The row of rule `name` in a `loader top` screen, split into columns
/// (#, rule, action, pkt/s, bit/s, drop/s, packets).
fn top_row<'a>(screen: &'a str, name: &str) -> Option<Vec<&'a str>> {
    screen.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|c| c.len() == 7 && c[1] == name)
}

#[test]
fn top_shows_live_per_rule_rates_on_a_terminal_and_as_snapshots() {
    if !harness::root_or_skip() {
        return;
    }
    let t = attached("top", "alternate-a.toml");
    let (ns, iface) = (t.server_ns.as_str(), t.server_if.as_str());
    // More to the dropped port than to the passed one, so the drop rule is the busiest.
    let _traffic = Traffic::start(&t, &[(sa(SERVER_V4, 7000), 100), (sa(SERVER_V4, 7001), 20)]);

    // On a terminal: one screen, redrawn in place every 300 ms.
    let tmux = Tmux::start(&format!("{} --netns {ns} top {iface} --interval 300ms", loader_bin()));
    let mut screen = String::new();
    let live = eventually(std::time::Duration::from_secs(10), || {
        screen = tmux.screen();
        top_row(&screen, "a-drop-7000").is_some_and(|c| c[3] != "0") && top_row(&screen, "a-pass-7001").is_some_and(|c| c[3] != "0")
    });
    assert!(live, "no rate for the rules that carry traffic:\n{screen}");
    assert_eq!(screen.matches("xdpfw top on").count(), 1, "redrawn in place, not scrolled:\n{screen}");
    assert!(screen.contains(&format!("xdpfw top on {iface} (native mode)")), "{screen}");
    assert!(screen.contains("ruleset alternate-a ") && screen.contains("generation 1"), "{screen}");
    let dropped = top_row(&screen, "a-drop-7000").unwrap();
    assert_eq!((dropped[0], dropped[2]), ("0", "drop"), "{screen}");
    assert_eq!(dropped[3], dropped[5], "a drop rule's packets are its drops: {screen}");
    let pass = top_row(&screen, "a-pass-7001").unwrap();
    assert_eq!(pass[5], "0", "a pass rule drops nothing: {screen}");
    let rows: Vec<&str> = screen.lines().filter(|l| top_row(l, "a-drop-7000").is_some() || top_row(l, "a-pass-7001").is_some() || top_row(l, "(default)").is_some()).collect();
    assert!(rows[0].contains("a-drop-7000") && rows[1].contains("a-pass-7001"), "busiest first:\n{screen}");
    let total = screen.lines().find(|l| l.starts_with("total ")).unwrap_or_else(|| panic!("{screen}"));
    assert!(!total.starts_with("total 0 pkt/s"), "{total}");
    drop(tmux);

    // --count on a terminal: N refreshes, then exit 0.
    let tmux = Tmux::start(&format!("{} --netns {ns} top --iface {iface} --interval 200ms --count 3; echo exit=$?; sleep 60", loader_bin()));
    assert!(eventually(std::time::Duration::from_secs(10), || tmux.screen().contains("exit=0")), "{}", tmux.screen());
    drop(tmux);

    // Not a terminal: N snapshots one after another.
    let out = loader_ok(ns, &["top", iface, "--interval", "300ms", "--count", "3"]);
    assert_eq!(out.matches("xdpfw top on").count(), 3, "{out}");
    assert!(!out.contains('\u{1b}'), "no terminal escapes in plain output: {out:?}");
    assert!(top_row(&out, "a-drop-7000").is_some(), "{out}");
    // JSON Lines: one document per refresh.
    let out = loader_ok(ns, &["top", iface, "--interval", "300ms", "--count", "2", "--json"]);
    let docs: Vec<serde_json::Value> = out.lines().map(json).collect();
    assert_eq!(docs.len(), 2, "{out}");
    for d in &docs {
        assert_eq!(d["schema"], 1);
        assert_eq!(d["generation"], 1);
        assert_eq!(d["rules"][0]["name"], "a-drop-7000", "{d}");
        assert!(d["rules"][0]["pps"].as_f64().unwrap() > 0.0, "{d}");
        assert!(d["dropped_pps"].as_f64().unwrap() > 0.0, "{d}");
    }

    // A reload between two refreshes says so, and the rates go on by rule name.
    let out = in_ns_reload_during_top(&t);
    assert!(out.contains("(reloaded from 1)"), "{out}");
}

/// `loader top --count 4` with a reload to alternate-b after its first refresh.
fn in_ns_reload_during_top(t: &Topology) -> String {
    let child = Command::new(loader_bin())
        .args(["--netns", &t.server_ns, "top", &t.server_if, "--interval", "400ms", "--count", "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    loader_ok(&t.server_ns, &["reload", &rules_file("alternate-b.toml"), "--iface", &t.server_if]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Metric names (`xdpfw_…`) and the label names each is selected by (`name{label=…}`) in a PromQL
/// expression; `instance` and `job` are Prometheus's own.
fn promql_metrics(expr: &str, out: &mut std::collections::BTreeMap<String, std::collections::BTreeSet<String>>) {
    let mut rest = expr;
    while let Some(at) = rest.find("xdpfw_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let labels = out.entry(tail[..end].to_string()).or_default();
        if let Some(sel) = tail[end..].strip_prefix('{') {
            let sel = &sel[..sel.find('}').expect("a closed selector")];
            for m in sel.split(',').filter(|m| !m.trim().is_empty()) {
                let name = m.split(['=', '!']).next().unwrap().trim();
                if !["instance", "job"].contains(&name) {
                    labels.insert(name.to_string());
                }
            }
        }
        rest = &tail[end..];
    }
}

#[test]
fn alert_rules_and_dashboard_parse_and_name_only_exported_metrics() {
    use harness::daemon::{Daemon, TempDir, scrape};
    if !harness::root_or_skip() {
        return;
    }
    // The alert rules: YAML (parsed by PyYAML; promtool is not at hand) of the rule-file shape.
    let alerts_file = repo().join("dist/prometheus/xdpfw-alerts.yml");
    let out = Command::new("/usr/bin/python3")
        .args(["-c", "import sys, json, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)"])
        .arg(&alerts_file)
        .output()
        .expect("python3 (apt-get install python3 python3-yaml)");
    assert!(out.status.success(), "{} does not parse: {}", alerts_file.display(), String::from_utf8_lossy(&out.stderr));
    let alerts = json(&String::from_utf8_lossy(&out.stdout));
    let rules = alerts["groups"][0]["rules"].as_array().expect("groups[0].rules");
    let mut exprs = Vec::new();
    let mut names = Vec::new();
    for r in rules {
        let name = r["alert"].as_str().unwrap_or_else(|| panic!("an alert name: {r}"));
        names.push(name.to_string());
        let expr = r["expr"].as_str().unwrap_or_else(|| panic!("{name}: expr"));
        assert_eq!(expr.matches('(').count(), expr.matches(')').count(), "{name}: {expr}");
        assert!(r["labels"]["severity"].is_string() && r["annotations"]["summary"].is_string(), "{name}: {r}");
        if let Some(f) = r.get("for") {
            let f = f.as_str().unwrap();
            assert!(f.ends_with(['s', 'm', 'h']) && f[..f.len() - 1].parse::<u32>().is_ok(), "{name}: for {f}");
        }
        exprs.push(expr.to_string());
    }
    for wanted in ["XdpfwReloadFailed", "XdpfwFailClosed", "XdpfwRingOverflows", "XdpfwRuleDropsHigh"] {
        assert!(names.iter().any(|n| n == wanted), "{wanted} in {names:?}");
    }
    // The dashboard: JSON whose every query is PromQL over the daemon's metrics.
    let dash = json(&read(&repo().join("dist/grafana/xdpfw-dashboard.json")));
    assert_eq!(dash["uid"], "xdpfw");
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap_or_else(|| panic!("panel {}: expr", p["title"])).to_string());
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        exprs.push(v["definition"].as_str().unwrap().to_string());
    }
    let mut wanted = std::collections::BTreeMap::new();
    for e in &exprs {
        promql_metrics(e, &mut wanted);
    }
    assert!(wanted.len() >= 15, "{wanted:?}");

    // A running daemon exports every one, with the labels they are selected by.
    let mut t = Topology::new("alrt").expect("topology");
    t.detach_on_drop(loader_bin());
    let dir = TempDir::new("alrt");
    let file = dir.0.join("rules.toml");
    std::fs::write(&file, read(&rules_dir().join("alternate-a.toml"))).unwrap();
    let _d = Daemon::start(&t, &dir.0, &["--rules", file.to_str().unwrap(), "--detach-on-exit"]);
    assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 10), 0);
    // One reload, so the last reload's phases are there too.
    std::fs::write(&file, read(&rules_dir().join("alternate-b.toml"))).unwrap();
    assert!(eventually(std::time::Duration::from_secs(10), || scrape(&t).is_some_and(|s| s.contains("xdpfw_last_reload_phase_seconds{"))), "the daemon reloaded");
    let s = scrape(&t).unwrap();
    for (metric, labels) in &wanted {
        let samples: Vec<&str> = s.lines().filter(|l| !l.starts_with('#') && (l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))).collect();
        assert!(!samples.is_empty(), "{metric} (named by the alert rules or the dashboard) is not exported:\n{s}");
        for label in labels {
            assert!(samples.iter().any(|l| l.contains(&format!("{label}=\""))), "{metric} has no label {label}: {samples:?}");
        }
    }
    // Proper types: counters, and the decision latency as a summary.
    assert!(s.contains("# TYPE xdpfw_escalation_decision_latency_seconds summary\n"), "{s}");
    assert!(s.contains("xdpfw_escalation_decision_latency_seconds_count 0\n") && s.contains("xdpfw_escalation_decision_latency_seconds_sum 0\n"), "{s}");
    assert!(s.contains("# TYPE xdpfw_ring_overflows_total counter\n") && s.contains("# TYPE xdpfw_rule_packets_total counter\n"));
}
