//! kill -9 of `loader run` at random moments (issue 10): during its start, its attach, its
//! first reload and in steady state, with and without `--fail-closed`. After each kill the
//! interface is filtered by one complete ruleset (a datagram never meets an empty or half-made
//! one), or nothing is attached and the next start succeeds: never a partial pin folder or an
//! orphan program that blocks it.

use xdpfw_testkit as harness;

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use harness::{daemon::TempDir, *};
use rand::{Rng, SeedableRng};

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Datagrams sent to each port per check.
const PROBES: u64 = 3;

/// What the interface does now: datagrams delivered to udp/7000 and udp/7001 out of
/// [`PROBES`] each (waiting for the expected ones to land, then a little for strays).
fn probe(t: &Topology, rx: &[UdpCounter; 2], expect: (u64, u64)) -> (u64, u64) {
    let before = (rx[0].count(), rx[1].count());
    send_udp(&t.client_ns, sa(SERVER_V4, 7000), PROBES);
    send_udp(&t.client_ns, sa(SERVER_V4, 7001), PROBES);
    let got = || (rx[0].count() - before.0, rx[1].count() - before.1);
    eventually(Duration::from_millis(500), || got().0 >= expect.0 && got().1 >= expect.1);
    std::thread::sleep(Duration::from_millis(30));
    got()
}

/// `loader stats` of the instance, or `None` when nothing is attached.
fn attached_stats(t: &Topology) -> Option<serde_json::Value> {
    let out = loader(&t.server_ns, &["stats", "--iface", &t.server_if, "--json"]);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("stats JSON"))
}

fn global(s: &serde_json::Value, key: &str) -> u64 {
    s["global"][key].as_u64().unwrap()
}

#[test]
fn kill_9_of_loader_run_at_random_moments_leaves_a_complete_ruleset_or_a_clean_start() {
    if !harness::root_or_skip() {
        return;
    }
    let runs: usize = std::env::var("XDPFW_KILL_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let seed: u64 = std::env::var("XDPFW_KILL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut t = Topology::new("krun").expect("topology");
    t.detach_on_drop(loader_bin());
    let dir = TempDir::new("krun");
    let rules = dir.0.join("rules.toml");
    let log = dir.0.join("run.log");
    let read = |name: &str| std::fs::read_to_string(rules_dir().join(name)).unwrap();
    // a: 7000 dropped, 7001 passed; b: the reverse; every datagram to either port meets a rule.
    let (a, b) = (read("alternate-a.toml"), read("alternate-b.toml"));
    let invalid = "default = \"maybe\"\n";
    let rx = [UdpCounter::start(&t.server_ns, sa(SERVER_V4, 7000)), UdpCounter::start(&t.server_ns, sa(SERVER_V4, 7001))];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = |fail_closed: bool| {
        let mut cmd = Command::new(loader_bin());
        cmd.args(["--netns", &t.server_ns, "run", &t.server_if, "--rules", rules.to_str().unwrap(), "--min-interval", "100ms"]);
        if fail_closed {
            cmd.arg("--fail-closed");
        }
        cmd.env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap()
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // How long a start takes here, to spread the kills over it: until the first ruleset serves
    // and a reload of the next one has gone live.
    write_atomic(&rules, &a);
    let t0 = Instant::now();
    let mut child = start(false);
    assert!(eventually(Duration::from_secs(10), || attached_stats(&t).is_some()), "{}", log_text());
    let attached_in = t0.elapsed();
    write_atomic(&rules, &b);
    assert!(
        eventually(Duration::from_secs(10), || attached_stats(&t).is_some_and(|s| s["ruleset"]["version"] == "alternate-b")),
        "{}",
        log_text()
    );
    let span = t0.elapsed() + Duration::from_millis(100);
    child.kill().unwrap();
    child.wait().unwrap();
    loader_ok(&t.server_ns, &["detach", &t.server_if]);

    // A fail-closed placeholder can be what serves only when a fail-closed start may have
    // attached it since the last detach.
    let mut placeholder_possible = false;
    let (mut complete, mut placeholder, mut unattached, mut killed_live, mut unrecorded) = (0, 0, 0, 0, 0);
    let began = Instant::now();
    let mut must_attach = false;
    for i in 0..runs {
        let fail_closed = rng.random_bool(0.5);
        // A fail-closed start from an invalid file attaches the placeholder, then the valid
        // file written later is its first reload.
        let (first, next) = match (fail_closed && rng.random_bool(0.5), i % 2) {
            (true, _) => (invalid, a.as_str()),
            (false, 0) => (a.as_str(), b.as_str()),
            (false, _) => (b.as_str(), a.as_str()),
        };
        placeholder_possible |= fail_closed;
        write_atomic(&rules, first);
        let mut child = start(fail_closed);
        let t0 = Instant::now();
        let kill_at = Duration::from_micros(rng.random_range(0..span.as_micros() as u64));
        let change_at = Duration::from_micros(rng.random_range(0..span.as_micros() as u64));
        if change_at < kill_at {
            std::thread::sleep(change_at);
            write_atomic(&rules, next);
        }
        std::thread::sleep(kill_at.saturating_sub(t0.elapsed()));
        if must_attach {
            // The previous kill left nothing attached: this start must get as far as attaching
            // (then it is killed, a steady-state or first-reload moment).
            assert!(
                eventually(Duration::from_secs(10), || t.pin_dir().join("link").exists() || child.try_wait().unwrap().is_some()),
                "run {i}: the start after an unattached kill did not attach in 10 s:\n{}",
                log_text()
            );
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("run {i}: loader run exited on its own ({status}) before it was killed at {kill_at:?}:\n{}", log_text());
        }
        child.kill().unwrap();
        child.wait().unwrap();
        must_attach = false;

        if t.pin_dir().join("link").exists() {
            // Attached: the ruleset was installed before the link was pinned. Killed before the
            // record was written, `stats` fails (the next reload writes it); the traffic decides.
            killed_live += 1;
            let before = attached_stats(&t);
            unrecorded += before.is_none() as usize;
            let got = probe(&t, &rx, (PROBES, PROBES));
            if got == (0, PROBES) || got == (PROBES, 0) {
                if let (Some(before), Some(after)) = (&before, attached_stats(&t)) {
                    let rule_hits = global(&after, "rule_hits") - global(before, "rule_hits");
                    assert_eq!(rule_hits, 2 * PROBES, "run {i} (killed at {kill_at:?}): a datagram met an incomplete ruleset");
                }
                complete += 1;
            } else {
                assert!(
                    got == (0, 0) && placeholder_possible,
                    "run {i} (killed at {kill_at:?}, fail-closed {fail_closed}): 7000 got {}/{PROBES}, 7001 got {}/{PROBES}: not one complete ruleset\n{}",
                    got.0,
                    got.1,
                    log_text()
                );
                if let Some(before) = &before {
                    assert_eq!(before["ruleset"]["version"], "fail-closed", "run {i}: everything dropped, but not by the placeholder");
                }
                placeholder += 1;
            }
        } else {
            // Killed before the attach completed: the next run's start must attach (checked
            // there, before its kill).
            unattached += 1;
            must_attach = true;
            placeholder_possible = false;
            continue;
        }
        // Detach most of the time, so the next start attaches afresh (and may be killed in its
        // attach); else it adopts what is there.
        if rng.random_bool(0.7) {
            loader_ok(&t.server_ns, &["detach", &t.server_if]);
            assert!(!t.pin_dir().exists(), "run {i}: detach left the pin folder");
            placeholder_possible = false;
        }
    }
    if must_attach {
        write_atomic(&rules, &a);
        let mut child = start(false);
        let ok = eventually(Duration::from_secs(10), || attached_stats(&t).is_some_and(|s| s["ruleset"]["version"] == "alternate-a"));
        child.kill().ok();
        child.wait().unwrap();
        assert!(ok, "the start after the last kill did not attach:\n{}", log_text());
        assert_eq!(probe(&t, &rx, (0, PROBES)), (0, PROBES), "the start after the last kill serves its ruleset");
    }
    eprintln!(
        "{runs} kills over 0-{span:?} (attach took {attached_in:?}) in {:?}: {complete} left a complete ruleset ({unrecorded} of all attached ones before the record was written), {placeholder} the fail-closed placeholder, {unattached} nothing attached (the next start succeeded each time)",
        began.elapsed()
    );
    assert!(unattached > 0 && killed_live > runs / 4, "the kills missed the start or the steady state: {unattached} unattached, {killed_live} live");
}
