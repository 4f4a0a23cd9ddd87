//! Hardening (issue 10): the state around the kernel path holds against an unprivileged local
//! user, a hostile rules server, hostile files, killed commands and lost state. Each test failed
//! on the code before the fix it covers. The unprivileged user is a real one (`xdpfw-test`,
//! created when missing).

use xdpfw_testkit as harness;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use harness::{daemon::*, topology::CLIENT_V4, *};

const N: u64 = 30;

fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(addr), port)
}

fn topology(tag: &str) -> Topology {
    let mut t = Topology::new(tag).expect("topology");
    t.detach_on_drop(loader_bin());
    t
}

fn user() -> &'static str {
    harness::unprivileged_user()
}

/// Runs `args` as the unprivileged user.
fn as_user(args: &[&str]) -> Output {
    Command::new("runuser").args(["-u", user(), "--"]).args(args).output().expect("runuser")
}

fn uid_of_user() -> u32 {
    let out = Command::new("id").args(["-u", user()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).mode() & 0o7777
}

/// (delivered to udp/7000, delivered to udp/7001) out of N each.
fn udp_verdicts(t: &Topology) -> (u64, u64) {
    (udp_delivered(t, sa(SERVER_V4, 7000), N), udp_delivered(t, sa(SERVER_V4, 7001), N))
}


fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Runs the loader with a deadline; the output, or a panic if it hung.
fn loader_within(args: &[&str], limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(loader_bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("loader {args:?} still running after {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const CLOSE_7000: &str = "version = \"close-7000\"\ndefault = \"pass\"\n[[rule]]\nname = \"close-7000\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7000\n";
const CLOSE_7001: &str = "version = \"close-7001\"\ndefault = \"pass\"\n[[rule]]\nname = \"close-7001\"\naction = \"drop\"\nproto = \"udp\"\ndport = 7001\n";

// ---- 1. private, root-only runtime state ----

#[test]
fn runtime_state_is_root_only_and_other_users_cannot_hold_the_locks() {
    let t = topology("hpriv");
    let dir = TempDir::new("hpriv");
    let runtime = Path::new("/run/xdpfw");
    // What earlier versions left: a world-readable runtime folder.
    if runtime.exists() {
        std::fs::set_permissions(runtime, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, CLOSE_7000).unwrap();
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    assert_eq!(mode(runtime), 0o700, "the runtime folder is made private again");
    assert_eq!(std::fs::metadata(runtime).unwrap().uid(), 0);
    let lock = t.lock_path();
    assert_eq!(mode(&lock) & 0o077, 0, "the lock file is root's alone");
    assert_eq!(mode(&t.state_dir()), 0o700);
    assert_eq!(mode(Path::new("/var/lib/xdpfw")), 0o700, "history and snapshots are root's alone");

    // An unprivileged user can neither open nor lock the instance's lock.
    let out = as_user(&["flock", "--nonblock", "--exclusive", lock.to_str().unwrap(), "true"]);
    assert!(!out.status.success(), "{} could lock {}: {out:?}", user(), lock.display());
    loader_ok(&t.server_ns, &["reload", rules.to_str().unwrap(), "--iface", &t.server_if, "--lock-wait", "2"]);

    // The daemon's lock, left behind by a daemon killed with SIGKILL.
    let mut d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap()]);
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    let daemon_lock = t.daemon_lock_path();
    assert!(daemon_lock.exists());
    let holder = Command::new("runuser")
        .args(["-u", user(), "--", "flock", "--nonblock", "--exclusive", daemon_lock.to_str().unwrap(), "sleep", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut holder = KillOnDrop(holder);
    std::thread::sleep(Duration::from_millis(300));
    assert!(holder.0.try_wait().unwrap().is_some_and(|s| !s.success()), "{} holds {}", user(), daemon_lock.display());
    // So a new daemon starts.
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap()]);
    assert_eq!(m(&t, "xdpfw_generation"), 2.0, "{}", d.log());
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fail_closed_is_untouched_by_files_planted_in_tmp() {
    let t = topology("hplt");
    let dir = TempDir::new("hplt");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, "default = \"pass\"\n[[rule]]\naction = \"nope\"\n").unwrap();
    // What a local user could plant for the names the daemon once wrote: FIFOs and symlinks to
    // a file of root's, for the next few hundred process ids.
    let victim = dir.0.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid").unwrap().trim().parse().unwrap();
    let tmp = std::env::temp_dir();
    let mut planted = Vec::new();
    for pid in last..last + 400 {
        let p = tmp.join(format!("xdpfw-fail-closed-{}-{pid}.toml", t.server_if));
        if pid % 2 == 0 {
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        } else {
            std::os::unix::fs::symlink(&victim, &p).unwrap();
        }
        planted.push(p);
    }
    let cleanup = Cleanup(planted);
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--fail-closed"]);
    assert_eq!(m(&t, "xdpfw_fail_closed"), 1.0, "{}", d.log());
    assert_eq!(udp_verdicts(&t), (0, 0), "everything is dropped");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    drop(cleanup);
}

struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---- 2. unambiguous ruleset hash ----

#[test]
fn moving_a_prefix_to_the_next_set_file_goes_live() {
    let t = topology("hhsh");
    let dir = TempDir::new("hhsh");
    let rules = dir.0.join("rules.toml");
    let (a, b) = (dir.0.join("a.txt"), dir.0.join("b.txt"));
    std::fs::write(&a, "198.51.100.0/24\n192.0.2.0/24\n").unwrap();
    std::fs::write(&b, "203.0.113.0/24\n").unwrap();
    std::fs::write(
        &rules,
        "default = \"pass\"\n[sets.a]\nfile = \"a.txt\"\n[sets.b]\nfile = \"b.txt\"\n\
         [[rule]]\nname = \"a-7000\"\naction = \"drop\"\nsrc = [\"@a\"]\nproto = \"udp\"\ndport = 7000\n\
         [[rule]]\nname = \"b-7001\"\naction = \"drop\"\nsrc = [\"@b\"]\nproto = \"udp\"\ndport = 7001\n",
    )
    .unwrap();
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--min-interval", "100ms"]);
    assert_eq!(udp_verdicts(&t), (0, N), "the client (192.0.2.1) is in set a");
    // The same bytes in the same order, the client's prefix moved from a's end to b's start;
    // both written while the daemon is stopped, so it sees only the final state.
    d.signal(nix::sys::signal::Signal::SIGSTOP);
    write_atomic(&a, "198.51.100.0/24\n");
    write_atomic(&b, "192.0.2.0/24\n203.0.113.0/24\n");
    d.signal(nix::sys::signal::Signal::SIGCONT);
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"ok\"}", 10, |n| n == 1.0);
    assert_eq!(m(&t, "xdpfw_generation"), 2.0);
    assert_eq!(udp_verdicts(&t), (N, 0), "the client is in set b now");
}

// ---- 3. a --url ruleset is self-contained; errors and history are bounded ----

/// A minimal HTTP server in the client namespace: serves the current body to every GET.
struct TinyServer {
    body: Arc<Mutex<Vec<u8>>>,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TinyServer {
    fn start(t: &Topology, port: u16) -> Self {
        let body = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, r, s) = (body.clone(), requests.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = in_ns(&t.client_ns, move || {
            let listener = TcpListener::bind(sa(CLIENT_V4, port)).unwrap();
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !s.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                r.fetch_add(1, Ordering::SeqCst);
                let body = b.lock().unwrap().clone();
                let _ = conn.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes());
                let _ = conn.write_all(&body);
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Self { body, requests, stop, thread: Some(thread) }
    }

    fn serve(&self, body: &str) {
        *self.body.lock().unwrap() = body.as_bytes().to_vec();
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_url_ruleset_names_no_local_file_and_its_errors_are_capped() {
    let t = topology("hurl");
    let dir = TempDir::new("hurl");
    let secret = dir.0.join("secret.txt");
    std::fs::write(&secret, "SECRET-TOKEN-4711\n").unwrap();
    let server = TinyServer::start(&t, 8089);
    server.serve(&format!("default = \"pass\"\n[sets.s]\nfile = \"{}\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@s\"]\n", secret.display()));
    let url = format!("http://{CLIENT_V4}:8089/rules.toml");
    let d = Daemon::start(&t, &dir.0, &["--url", &url, "--poll-interval", "100ms", "--min-interval", "50ms"]);
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"failed\"}", 10, |n| n >= 1.0);
    let history_file = t.history_dir().join("history.jsonl");
    let history = std::fs::read_to_string(&history_file).unwrap();
    assert!(!history.contains("SECRET-TOKEN") && !d.log().contains("SECRET-TOKEN"), "the file was read:\n{history}\n{}", d.log());
    assert!(history.contains("self-contained"), "{history}");

    // A body with a 4 MB string in it, served at every poll: what is kept of each is bounded.
    server.serve(&format!("default = \"pass\"\n[[rule]]\naction = \"drop\"\nsrc = [\"{}\"]\n", "A".repeat(4 << 20)));
    let before = server.requests.load(Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(20), || server.requests.load(Ordering::SeqCst) >= before + 5), "{}", d.log());
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"failed\"}", 10, |n| n >= 5.0);
    let history = std::fs::read_to_string(&history_file).unwrap();
    let longest = history.lines().map(str::len).max().unwrap();
    assert!(longest < 6000, "a history line of {longest} bytes");
    assert!(d.log().len() < 200_000, "the log grew to {} bytes", d.log().len());

    // A self-contained ruleset goes live.
    server.serve(&format!("{CLOSE_7000}[sets.x]\nprefixes = [\"192.0.2.0/24\"]\n"));
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"ok\"}", 10, |n| n >= 1.0);
    assert_eq!(udp_verdicts(&t), (0, N));
}

// ---- 4. bounded set files, bounded counts ----

#[test]
fn hostile_set_files_and_huge_rulesets_are_refused_quickly() {
    let dir = TempDir::new("hset");
    let rules = dir.0.join("rules.toml");
    let fifo = dir.0.join("fifo.txt");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let with_set = |f: &str| format!("default = \"pass\"\n[sets.s]\nfile = \"{f}\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@s\"]\n");
    for (set, why) in [("fifo.txt", "not a regular file"), ("/dev/zero", "not a regular file"), ("/dev/urandom", "not a regular file"), ("/tmp", "a directory")] {
        std::fs::write(&rules, with_set(set)).unwrap();
        let (out, took) = loader_within(&["check", rules.to_str().unwrap()], Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("cannot read set file") && err.contains(why), "{set}: {err}");
        assert!(err.contains(set.trim_start_matches('/')), "the error names the file: {err}");
        assert!(took < Duration::from_secs(3), "{set}: {took:?}");
    }
    // A sparse file far beyond the limit is refused by its size, without reading it.
    let sparse = dir.0.join("sparse.txt");
    std::fs::File::create(&sparse).unwrap().set_len(2 << 30).unwrap();
    std::fs::write(&rules, with_set("sparse.txt")).unwrap();
    let (out, took) = loader_within(&["check", rules.to_str().unwrap()], Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than the limit"), "{out:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // 50,000 rules, and 20,000 tests: refused before any per-rule work.
    let mut text = String::from("default = \"pass\"\n");
    for i in 0..50_000 {
        text.push_str(&format!("[[rule]]\nname = \"r{i}\"\naction = \"drop\"\nsrc = [\"10.{}.{}.0/24\"]\nproto = \"udp\"\ndport = {}\n", i / 256 % 256, i % 256, i % 60000 + 1));
    }
    std::fs::write(&rules, &text).unwrap();
    let (out, took) = loader_within(&["check", rules.to_str().unwrap()], Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too many rules: 50000 (the limit is 1024)"), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let mut tests = String::from("default = \"pass\"\n");
    for _ in 0..20_000 {
        tests.push_str("[[test]]\npacket = \"udp 192.0.2.1:5000 -> 192.0.2.2:7000\"\nexpect = \"pass\"\n");
    }
    std::fs::write(&rules, &tests).unwrap();
    let (out, took) = loader_within(&["check", rules.to_str().unwrap()], Duration::from_secs(20));
    assert!(String::from_utf8_lossy(&out.stderr).contains("too many tests: 20000"), "{out:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn a_fifo_set_file_does_not_hang_reload_or_the_daemon() {
    let t = topology("hfif");
    let dir = TempDir::new("hfif");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, CLOSE_7000).unwrap();
    let mut d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--min-interval", "100ms"]);
    nix::unistd::mkfifo(&dir.0.join("fifo.txt"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, "default = \"pass\"\n[sets.s]\nfile = \"fifo.txt\"\n").unwrap();
    let (out, _) = loader_within(&["--netns", &t.server_ns, "reload", bad.to_str().unwrap(), "--iface", &t.server_if], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    write_atomic(&rules, "default = \"pass\"\n[sets.s]\nfile = \"fifo.txt\"\n");
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"failed\"}", 10, |n| n >= 1.0);
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(10)).success(), "{}", d.log());
    assert_eq!(udp_verdicts(&t), (0, N), "the last good ruleset keeps serving");
}

// ---- 5. partial pin folders ----

#[test]
fn a_partial_pin_folder_does_not_block_attach() {
    let t = topology("hpin");
    let dir = TempDir::new("hpin");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, CLOSE_7000).unwrap();
    let pins = t.pin_dir();

    // An empty folder (what an attach killed right after its mkdir leaves).
    std::fs::create_dir_all(&pins).unwrap();
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    assert_eq!(udp_verdicts(&t), (0, N));
    assert_eq!(mode(&pins), 0o700);
    loader_ok(&t.server_ns, &["detach", &t.server_if]);

    // A folder of another user's, with something in it.
    std::fs::create_dir_all(pins.join("junk")).unwrap();
    nix::unistd::chown(&pins, Some(nix::unistd::Uid::from_raw(uid_of_user())), None).unwrap();
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    assert_eq!(udp_verdicts(&t), (0, N));
    loader_ok(&t.server_ns, &["detach", &t.server_if]);

    // Attaches killed at random moments over the attach's own duration: afterwards the instance
    // is whole (its ruleset serves) or absent, and the next attach always succeeds. Each run
    // costs about two attaches (each a program load: 1-4 s under load 8 on 2 cores), so 20 by
    // default; XDPFW_KILL_RUNS=100 for the count.
    use rand::{Rng, SeedableRng};
    let runs: usize = std::env::var("XDPFW_KILL_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let t0 = Instant::now();
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    // The span the kill moments cover: the longest attach seen so far (a loaded machine makes
    // later attaches slower than the first; kills all landing before the end would test only
    // half of it).
    let mut span = t0.elapsed() + Duration::from_millis(10);
    loader_ok(&t.server_ns, &["detach", &t.server_if]);
    let (mut whole, mut unrecorded, mut partial, mut nothing) = (0, 0, 0, 0);
    let xdp_on_iface = || {
        let out = Command::new("ip").args(["-n", &t.server_ns, "link", "show", "dev", &t.server_if]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    };
    for i in 0..runs {
        let mut child = Command::new(loader_bin())
            .args(["--netns", &t.server_ns, "attach", &t.server_if, "--rules", rules.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Stratified over 0-110% of the measured attach, so every count covers all of it.
        let stratum = span.as_micros() as u64 * 11 / 10 / runs as u64;
        std::thread::sleep(Duration::from_micros(stratum * i as u64 + rng.random_range(0..stratum.max(1))));
        let _ = child.kill();
        let _ = child.wait();
        if pins.join("link").exists() {
            // The ruleset is installed before the link is pinned: once pinned, it filters. Killed
            // before its record was written, `stats` says the record is missing (the next
            // reload writes it) and the traffic shows the ruleset.
            let out = loader(&t.server_ns, &["stats", "--iface", &t.server_if, "--json"]);
            if out.status.success() {
                let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(s["ruleset"]["version"], "close-7000", "run {i}: attached without its ruleset: {s}");
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("state.json is missing"), "run {i}: {err}");
                assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 3), 0, "run {i}: attached without a record, and not filtering");
                unrecorded += 1;
            }
            whole += 1;
        } else if pins.exists() || xdp_on_iface() {
            // Something was left behind (a partial pin folder): the next attach must cope.
            let t1 = Instant::now();
            loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
            span = span.max(t1.elapsed() + Duration::from_millis(10));
            partial += 1;
        } else {
            // Killed before it changed anything: the next run's attach starts from scratch.
            nothing += 1;
            continue;
        }
        if i % 20 == 0 {
            assert_eq!(udp_delivered(&t, sa(SERVER_V4, 7000), 3), 0, "run {i}: the attached ruleset filters");
        }
        loader_ok(&t.server_ns, &["detach", &t.server_if]);
        assert!(!pins.exists(), "run {i}: detach left the pin folder");
    }
    eprintln!(
        "{runs} attaches killed over 0-110% of up to {span:?}: {whole} left the instance whole ({unrecorded} of them before its record was written), {partial} a partial pin folder (the next attach succeeded), {nothing} nothing"
    );
    assert!(whole + partial > 0, "every kill came before the attach touched anything: {nothing} runs");

    // `loader run --fail-closed` with a partial folder attaches fail-closed, not "adopts" it.
    std::fs::create_dir_all(&pins).unwrap();
    let bad = dir.0.join("bad.toml");
    std::fs::write(&bad, "default = \"pass\"\n[[rule]]\naction = \"nope\"\n").unwrap();
    let d = Daemon::start(&t, &dir.0, &["--rules", bad.to_str().unwrap(), "--fail-closed"]);
    assert_eq!(m(&t, "xdpfw_fail_closed"), 1.0, "{}", d.log());
    assert_eq!(udp_verdicts(&t), (0, 0));
}

#[test]
fn an_attached_instance_with_foreign_pins_is_not_adopted() {
    let t = topology("hfor");
    let dir = TempDir::new("hfor");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, CLOSE_7000).unwrap();
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    let pins = t.pin_dir();
    std::fs::create_dir(pins.join("planted")).unwrap();
    let (out, _) = loader_within(&["--netns", &t.server_ns, "run", &t.server_if, "--rules", rules.to_str().unwrap()], Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("\"planted\"") && err.contains("refusing to adopt"), "{err}");
    assert_eq!(udp_verdicts(&t), (0, N), "still filtering");
    // As the error says, `detach` removes it all, planted entries included.
    loader_ok(&t.server_ns, &["detach", &t.server_if]);
    assert!(!pins.exists());
}

// ---- 6. lost state ----

#[test]
fn a_deleted_state_file_is_reported_and_rebuilt() {
    let t = topology("hsta");
    let dir = TempDir::new("hsta");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, CLOSE_7000).unwrap();
    let d = Daemon::start(&t, &dir.0, &["--rules", rules.to_str().unwrap(), "--min-interval", "100ms"]);
    let state = t.state_dir().join("state.json");
    std::fs::remove_file(&state).unwrap();
    let out = loader(&t.server_ns, &["stats", "--iface", &t.server_if]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("attached and filtering") && err.contains("loader reload"), "{err}");

    // The daemon's next reload records it again; stats and status work from then on.
    write_atomic(&rules, CLOSE_7001);
    wait_metric(&t, &d, "xdpfw_reloads_total{result=\"ok\"}", 10, |n| n == 1.0);
    assert!(state.exists(), "{}", d.log());
    assert_eq!(udp_verdicts(&t), (N, 0));
    let stats = loader_ok(&t.server_ns, &["stats", "--iface", &t.server_if]);
    assert!(stats.contains("close-7001"), "{stats}");
    loader_ok(&t.server_ns, &["status", "--iface", &t.server_if, "--history"]);
    // And so does a reload from the command line, without the daemon's help.
    std::fs::remove_file(&state).unwrap();
    loader_ok(&t.server_ns, &["reload", rules_dir().join("udp-7000-closed.toml").to_str().unwrap(), "--iface", &t.server_if]);
    loader_ok(&t.server_ns, &["stats", "--iface", &t.server_if]);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"]).arg(&at).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        Self(at)
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_keeps_the_firewall_and_says_what_went_live() {
    let t = topology("hful");
    let dir = TempDir::new("hful");
    let fs = Tmpfs::new(dir.0.join("mnt"), "256k");
    let (run, lib) = (fs.0.join("run"), fs.0.join("lib"));
    let loader_env = |args: &[&str]| -> Output {
        Command::new(loader_bin()).env("XDPFW_STATE_ROOT", &run).env("XDPFW_HISTORY_ROOT", &lib).args(["--netns", &t.server_ns]).args(args).output().unwrap()
    };
    let (a, b) = (dir.0.join("a.toml"), dir.0.join("b.toml"));
    std::fs::write(&a, CLOSE_7000).unwrap();
    std::fs::write(&b, CLOSE_7001).unwrap();
    fs.fill();

    // The attach stands (the interface is filtered), and says its record failed.
    let out = loader_env(&["attach", &t.server_if, "--rules", a.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("recording it failed"), "{out:?}");
    assert_eq!(udp_verdicts(&t), (0, N));
    let out = loader_env(&["stats", "--iface", &t.server_if]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("attached and filtering"), "{out:?}");
    // A reload on the full disk fails before its flip: nothing changed, and it says so.
    let out = loader_env(&["reload", b.to_str().unwrap(), "--iface", &t.server_if]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(udp_verdicts(&t), (0, N), "the failed reload changed nothing");

    // Room again: the next reload records everything, and every command works.
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let out = loader_env(&["reload", b.to_str().unwrap(), "--iface", &t.server_if]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(udp_verdicts(&t), (N, 0));
    let out = loader_env(&["stats", "--iface", &t.server_if]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("close-7001"), "{out:?}");
    let out = loader_env(&["status", "--iface", &t.server_if, "--history"]);
    assert!(out.status.success(), "{out:?}");
    let out = loader_env(&["detach", &t.server_if]);
    assert!(out.status.success(), "{out:?}");
}

// ---- 7. instance identity (first part): `ip netns exec` with a private bpffs ----

#[test]
fn ip_netns_exec_with_a_private_bpffs_is_refused_clearly() {
    let t = topology("hipx");
    let dir = TempDir::new("hipx");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, CLOSE_7000).unwrap();
    let exec = |args: &[&str]| Command::new("ip").args(["netns", "exec", &t.server_ns, loader_bin()]).args(args).output().unwrap();
    let out = exec(&["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("ip netns exec") && err.contains("--netns"), "{out:?}");
    assert_eq!(udp_verdicts(&t), (N, N), "nothing attached");
    // Attached the right way, it is not reported as absent from under `ip netns exec`.
    loader_ok(&t.server_ns, &["attach", &t.server_if, "--rules", rules.to_str().unwrap()]);
    let out = exec(&["stats", "--iface", &t.server_if]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not the host's BPF filesystem") && !err.contains("no firewall is attached"), "{out:?}");
    assert_eq!(udp_verdicts(&t), (0, N));
}
