//! The command line's contract, tried as a new user would: exit codes per kind of error, bounded
//! arguments, output into a closed pipe, a corrupt history line, and a fail-closed daemon that
//! survives any invalid ruleset. Each test here is a defect once found (issue 9).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use xdpfw_testkit::{self as harness, daemon::*, *};

fn loader_cmd(args: &[&str]) -> std::process::Output {
    Command::new(loader_bin()).args(args).output().expect("running loader")
}

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A valid ruleset that needs more distinct rule combinations than a buffer holds (32,768): 16
/// rules over one /16 of host addresses, where address j is in rule i when bit i of j is set,
/// so every address selects a different subset of the rules.
fn too_many_bitmaps(dir: &Path) -> PathBuf {
    let mut rules = String::from("version = \"too-big\"\ndefault = \"pass\"\n");
    for i in 0..16 {
        let mut set = String::new();
        for j in 1u32..40_000 {
            if j & (1 << i) != 0 {
                let _ = writeln!(set, "10.{}.{}.{}/32", 64 + (j >> 16), (j >> 8) & 255, j & 255);
            }
        }
        std::fs::write(dir.join(format!("s{i}.txt")), set).unwrap();
        let _ = write!(rules, "\n[sets.s{i}]\nfile = \"s{i}.txt\"\n\n[[rule]]\nname = \"r{i}\"\naction = \"drop\"\nsrc = [\"@s{i}\"]\n");
    }
    let path = dir.join("too-big.toml");
    std::fs::write(&path, rules).unwrap();
    path
}

#[test]
fn a_ruleset_over_a_compile_limit_is_invalid_exit_3_from_check() {
    let dir = TempDir::new("limit");
    let file = too_many_bitmaps(&dir.0);
    let out = loader_cmd(&["check", file.to_str().unwrap()]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("distinct rule combinations"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("nothing was changed"), "check changes nothing to begin with");
}

#[test]
fn huge_durations_are_usage_errors_not_panics() {
    for args in [
        &["reload", "/nonexistent.toml", "--lock-wait", "18446744073709551615"][..],
        &["reload", "/nonexistent.toml", "--min-grace-ms", "18446744073709551615"][..],
        &["run", "lo", "--rules", "/nonexistent.toml", "--min-interval", "99999999999h"][..],
        &["run", "lo", "--rules", "/nonexistent.toml", "--owner-lookup-deadline", "18446744073709551615"][..],
        &["run", "lo", "--rules", "/nonexistent.toml", "--escalation-rate", "inf"][..],
        // Zero would make the polling loop spin (issue 10: `--poll-interval 0` busy-looped).
        &["run", "lo", "--url", "http://192.0.2.1/r.toml", "--poll-interval", "0"][..],
    ] {
        let out = loader_cmd(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn an_unparseable_packet_is_a_usage_error() {
    let rules = harness::rules_dir().join("basic.toml");
    let out = loader_cmd(&["explain", rules.to_str().unwrap(), "tcp nowhere -> 1.2.3.4:5"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("parsing the packet"), "{}", stderr(&out));
}

/// Output into a pipe whose reader is gone (`loader … | head -1`) ends quietly with the
/// command's exit code, not a panic (exit 101).
#[test]
fn a_closed_pipe_on_stdout_is_not_an_error() {
    let rules = harness::rules_dir().join("basic.toml");
    for args in [
        vec!["check", rules.to_str().unwrap()],
        vec!["explain", rules.to_str().unwrap(), "tcp 198.51.100.7:5555 -> 203.0.113.1:22 flags S"],
        vec!["--help"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(loader_bin()).args(&args).stdout(Stdio::from(writer)).stderr(Stdio::piped()).output().unwrap();
        assert!(!stderr(&out).contains("panicked"), "{args:?}: {}", stderr(&out));
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
    }
}

fn topology(tag: &str) -> Topology {
    let mut t = Topology::new(tag).expect("topology");
    t.detach_on_drop(loader_bin());
    t
}

#[test]
fn invalid_rulesets_exit_3_from_reload_and_attach_and_change_nothing() {
    if !root_or_skip() {
        return;
    }
    let t = topology("clim");
    let dir = TempDir::new("clim");
    let big = too_many_bitmaps(&dir.0);
    let out = loader(&t.server_ns, &["attach", &t.server_if, "--rules", big.to_str().unwrap()]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing was changed"), "{}", stderr(&out));
    assert_no_instance(&t);

    let basic = harness::rules_dir().join("basic.toml");
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", basic.to_str().unwrap()]);
    let out = loader(&t.server_ns, &["reload", big.to_str().unwrap(), "--iface", &t.server_if]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    // A failing self-test is reported as such, naming the file, not as a syntax error.
    let failing = dir.0.join("failing.toml");
    std::fs::write(&failing, "default = \"pass\"\n[[test]]\npacket = \"udp 192.0.2.1:1 -> 192.0.2.2:7000\"\nexpect = \"drop\"\n").unwrap();
    let out = loader(&t.server_ns, &["reload", failing.to_str().unwrap(), "--iface", &t.server_if]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("1 of 1 self-tests failed"), "{}", stderr(&out));
    assert!(stderr(&out).starts_with(failing.to_str().unwrap()), "{}", stderr(&out));
    let status = loader_ok(&t.server_ns, &["status", "--iface", &t.server_if, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["state"]["generation"], 1, "nothing changed: {status}");
}

#[test]
fn a_corrupt_history_line_is_skipped_not_fatal() {
    if !root_or_skip() {
        return;
    }
    let t = topology("chis");
    let a = harness::rules_dir().join("udp-7000-closed.toml");
    let b = harness::rules_dir().join("udp-7001-closed.toml");
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", a.to_str().unwrap()]);
    loader_ok(&t.server_ns, &["reload", b.to_str().unwrap(), "--iface", &t.server_if]);
    // A line cut short (a full disk, a crash mid-write) and one edited by hand.
    let history = t.history_dir().join("history.jsonl");
    let mut text = std::fs::read_to_string(&history).unwrap();
    text.push_str("{\"time\": 17, \"result\": \"appl\n not json at all\n");
    std::fs::write(&history, text).unwrap();

    let out = loader(&t.server_ns, &["status", "--iface", &t.server_if, "--history"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("corrupt history line"), "warned: {}", stderr(&out));
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.matches(" applied ").count(), 2, "{out}");
    loader_ok(&t.server_ns, &["rollback", "--iface", &t.server_if]);
    loader_ok(&t.server_ns, &["detach", &t.server_if]);
    let out = loader_ok(&t.server_ns, &["attach", &t.server_if, "--last-good"]);
    assert!(out.contains("generation 1"), "{out}");
    let status = loader_ok(&t.server_ns, &["status", "--iface", &t.server_if, "--json"]);
    assert!(status.contains("\"closed-7000\""), "the rollback's ruleset is the last good one: {status}");
}

/// `status --history` into `head -1`: the history is longer than a pipe's first read.
#[test]
fn status_history_into_a_closed_pipe_exits_quietly() {
    if !root_or_skip() {
        return;
    }
    let t = topology("cpip");
    let a = harness::rules_dir().join("udp-7000-closed.toml");
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", a.to_str().unwrap()]);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(loader_bin())
        .args(["--netns", &t.server_ns, "status", "--iface", &t.server_if, "--history"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

/// Under `--fail-closed`, a rules file the kernel's tables cannot hold at start is one more
/// invalid ruleset: the daemon stays up with the interface filtered (it used to exit, leaving
/// the interface unfiltered under Restart=on-failure).
#[test]
fn fail_closed_survives_a_ruleset_over_a_compile_limit_at_start() {
    if !root_or_skip() {
        return;
    }
    let t = topology("cfcl");
    let dir = TempDir::new("cfcl");
    let big = too_many_bitmaps(&dir.0);
    let mut d = Daemon::start(&t, &dir.0, &["--rules", big.to_str().unwrap(), "--fail-closed"]);
    let s = scrape(&t).unwrap();
    assert_eq!(metric(&s, "xdpfw_fail_closed"), Some(1.0), "{s}\n{}", d.log());
    assert_eq!(udp_delivered(&t, std::net::SocketAddr::new(ip(SERVER_V4), 7000), 10), 0, "fail-closed drops");
    assert!(d.is_running(), "{}", d.log());
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success(), "{}", d.log());
}
