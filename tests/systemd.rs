//! `dist/systemd/xdpfw@.service` as systemd would run it: its command lines are read from the
//! unit file, with `%i`, `Environment=` and the `EnvironmentFile=` substituted as systemd does,
//! and run against a veth in a network namespace, with a notification socket (`NOTIFY_SOCKET`),
//! a watchdog (`WATCHDOG_USEC`) and stderr as journald's stream (`JOURNAL_STREAM`).

use xdpfw_testkit as harness;

use std::{
    collections::HashMap,
    os::unix::{fs::MetadataExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use harness::{daemon::*, *};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `[Service]` and `[Unit]` settings of a unit file: key → values in order.
struct Unit(HashMap<String, Vec<String>>);

impl Unit {
    fn parse(text: &str) -> Self {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with(['#', ';', '[']) {
                continue;
            }
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not a setting: {line}"));
            map.entry(k.trim().to_string()).or_default().push(v.trim().to_string());
        }
        Unit(map)
    }

    fn all(&self, key: &str) -> &[String] {
        self.0.get(key).map_or(&[], Vec::as_slice)
    }

    fn one(&self, key: &str) -> &str {
        match self.all(key) {
            [v] => v,
            other => panic!("{key}= is set {} times: {other:?}", other.len()),
        }
    }
}

/// systemd's specifiers used by the unit: %i and %I (the instance), %%.
fn specifiers(s: &str, instance: &str) -> String {
    s.replace("%%", "\u{0}").replace("%i", instance).replace("%I", instance).replace('\u{0}', "%")
}

/// Words split on whitespace, double quotes grouping (as systemd splits Environment= and Exec*=).
fn words(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// An Exec*= line as systemd runs it: prefixes stripped ("-": failure ignored), `$VAR` a word of
/// its own split on whitespace into arguments (none when empty), `${VAR}` one argument.
fn command_line(line: &str, env: &HashMap<String, String>) -> (bool, Vec<String>) {
    let body = line.trim_start_matches(['@', '+', '!', ':']);
    let ignore_failure = body.starts_with('-');
    let body = body.trim_start_matches(['-', '@', '+', '!', ':']);
    let mut argv = Vec::new();
    for w in words(body) {
        if let Some(name) = w.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
            argv.push(env.get(name).cloned().unwrap_or_default());
        } else if let Some(name) = w.strip_prefix('$') {
            argv.extend(env.get(name).map(|v| v.split_whitespace().map(String::from).collect::<Vec<_>>()).unwrap_or_default());
        } else {
            argv.push(w);
        }
    }
    (ignore_failure, argv)
}

/// An environment file: KEY=value lines, `#` comments, optional quotes around the value.
fn env_file(text: &str, env: &mut HashMap<String, String>) {
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with(['#', ';'])) {
        let (k, v) = line.split_once('=').expect("KEY=value");
        env.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
    }
}

/// `dev:inode` of a file, as systemd puts the journal's stream into JOURNAL_STREAM.
fn journal_stream(f: &std::fs::File) -> String {
    let m = f.metadata().unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

/// The notifications the daemon sent, as they arrive.
struct Notifications {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Notifications {
    fn listen(sock: UnixDatagram) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        if tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        });
        Self { rx, seen: Vec::new() }
    }

    /// Waits (at most `secs`) for a notification that `ok` accepts; returns it.
    fn wait(&mut self, secs: u64, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(m) = self.rx.recv_timeout(left) {
                self.seen.push(m.clone());
                if ok(&m) {
                    return m;
                }
            }
        }
        panic!("no such notification within {secs} s; seen: {:?}", self.seen);
    }

    fn count_for(&mut self, d: Duration, what: &str) -> usize {
        let deadline = Instant::now() + d;
        let mut n = 0;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(m) = self.rx.recv_timeout(left) {
                n += usize::from(m == what);
                self.seen.push(m);
            }
        }
        n
    }
}

/// The unit's main process, killed on drop.
struct Main(Child);

impl Drop for Main {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process as the unit's Exec*= would start it: the unit's environment (and only it), inside
/// the test's network namespace (nsenter --net, so bpffs and the file systems stay the host's).
fn unit_process(ns: &str, argv: &[String], env: &HashMap<String, String>) -> Command {
    let mut argv = argv.to_vec();
    if argv[0] == "/usr/local/bin/loader" {
        argv[0] = loader_bin().to_string();
    }
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg("--").args(&argv).env_clear().envs(env).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    c
}

const BROKEN: &str = "default = \"pass\"\n[[rule]\naction = \"drop\"\n";

#[test]
fn the_unit_runs_as_systemd_would_with_status_watchdog_and_journal_priorities() {
    if !harness::root_or_skip() {
        return;
    }
    let text = std::fs::read_to_string(repo().join("dist/systemd/xdpfw@.service")).unwrap();
    let unit = Unit::parse(&text);
    // What the unit promises systemd and the operator.
    assert_eq!(unit.one("Type"), "notify");
    assert!(unit.one("Documentation").contains("man:loader-run(1)"), "{:?}", unit.all("Documentation"));
    assert_eq!(unit.one("DefaultDependencies"), "no");
    assert!(unit.all("Before").iter().any(|v| v.split_whitespace().any(|u| u == "network-pre.target")));
    assert!(unit.all("Wants").iter().any(|v| v.split_whitespace().any(|u| u == "network-pre.target")));
    assert!(unit.all("Conflicts").iter().any(|v| v.contains("shutdown.target")), "no default dependencies: shutdown by hand");
    let watchdog = unit.one("WatchdogSec");
    assert!(watchdog.ends_with('s') && watchdog.trim_end_matches('s').parse::<u64>().is_ok_and(|s| s > 0), "{watchdog}");
    if Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success()) {
        // systemd's own parser accepts it (an instance, with a binary that exists).
        let dir = TempDir::new("verify");
        let copy = dir.0.join("xdpfw@eth9.service");
        std::fs::write(&copy, text.replace("/usr/local/bin/loader", loader_bin())).unwrap();
        let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Judged by what it says about this unit: without a running systemd (a container) it
        // can fail for reasons of its own.
        assert!(!err.contains("xdpfw@eth9.service"), "systemd-analyze verify:\n{err}");
    }

    let mut t = Topology::new("unit").expect("topology");
    t.detach_on_drop(loader_bin());
    let dir = TempDir::new("unit");
    let iface = t.server_if.clone();
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, std::fs::read_to_string(rules_dir().join("alternate-a.toml")).unwrap()).unwrap();
    // The operator's /etc/xdpfw/<iface>.env, relocated into the test's folder.
    let etc = dir.0.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join(format!("{iface}.env")),
        format!("# as in xdpfw.env.example\nXDPFW_SOURCE=--rules {}\nXDPFW_OPTS=--fail-closed --metrics 127.0.0.1:{METRICS_PORT} --min-interval 100ms\n", rules.display()),
    )
    .unwrap();

    // The environment systemd gives the service: Environment=, then EnvironmentFile=.
    let mut env = HashMap::new();
    for e in unit.all("Environment") {
        for w in words(&specifiers(e, &iface)) {
            let (k, v) = w.split_once('=').unwrap();
            env.insert(k.to_string(), v.to_string());
        }
    }
    assert_eq!(env["XDPFW_SOURCE"], format!("--rules /etc/xdpfw/{iface}.toml"), "the default source");
    let env_path = specifiers(unit.one("EnvironmentFile"), &iface);
    let (optional, env_path) = (env_path.starts_with('-'), env_path.trim_start_matches('-').to_string());
    assert!(optional && env_path == format!("/etc/xdpfw/{iface}.env"), "{env_path}");
    env_file(&std::fs::read_to_string(etc.join(format!("{iface}.env"))).unwrap(), &mut env);

    // ExecStartPre=: the rules file checked, with the same arguments as ExecStart=.
    let pre: Vec<(bool, Vec<String>)> = unit.all("ExecStartPre").iter().map(|l| command_line(&specifiers(l, &iface), &env)).collect();
    assert!(!pre.is_empty(), "an ExecStartPre= check");
    for (_, argv) in &pre {
        let out = unit_process(&t.server_ns, argv, &env).output().unwrap();
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{}: ok: 2 rules", rules.display())), "{argv:?}");
    }

    // ExecStart=, with systemd's notification socket, watchdog and journal stream. The unit's
    // WatchdogSec= is 30 s; systemd would pass it as WATCHDOG_USEC, the test passes 0.4 s.
    let (ignore, start) = command_line(&specifiers(unit.one("ExecStart"), &iface), &env);
    assert!(!ignore);
    assert_eq!(&start[1..3], ["run", iface.as_str()]);
    let notify_path = dir.0.join("notify.sock");
    let mut notes = Notifications::listen(UnixDatagram::bind(&notify_path).unwrap());
    let journal_path = dir.0.join("journal.log");
    let journal = std::fs::File::create(&journal_path).unwrap();
    let mut daemon_env = env.clone();
    daemon_env.insert("NOTIFY_SOCKET".into(), notify_path.to_string_lossy().into_owned());
    daemon_env.insert("WATCHDOG_USEC".into(), "400000".into());
    daemon_env.insert("JOURNAL_STREAM".into(), journal_stream(&journal));
    let child = unit_process(&t.server_ns, &start, &daemon_env).stdin(Stdio::null()).stdout(Stdio::null()).stderr(journal).spawn().unwrap();
    let main = Main(child);
    let log = || std::fs::read_to_string(&journal_path).unwrap_or_default();

    notes.wait(10, |m| m == "READY=1");
    let status = notes.wait(5, |m| m.starts_with("STATUS="));
    assert!(status.starts_with("STATUS=generation 1: alternate-a ") && status.contains("2 rules, default drop"), "{status}");
    let pings = notes.count_for(Duration::from_millis(1300), "WATCHDOG=1");
    assert!((3..=9).contains(&pings), "WATCHDOG=1 every 0.2 s: {pings} in 1.3 s");
    assert_eq!(udp_delivered(&t, std::net::SocketAddr::new(ip(SERVER_V4), 7000), 20), 0, "the firewall filters");
    assert_eq!(udp_delivered(&t, std::net::SocketAddr::new(ip(SERVER_V4), 7001), 20), 20);

    // A rejected reload: STATUS= says so, and the journal gets it at priority err.
    std::fs::write(&rules, BROKEN).unwrap();
    let status = notes.wait(10, |m| m.starts_with("STATUS=") && m.contains("rejected"));
    assert!(status.starts_with("STATUS=generation 1: alternate-a ") && status.contains(&format!("{}:2:", rules.display())), "{status}");
    assert!(!status.contains('\n'), "one line: {status:?}");
    let text = log();
    assert!(text.lines().any(|l| l.starts_with("<3>rejected ") && l.contains("the live ruleset keeps serving")), "journalctl -p err finds it:\n{text}");
    assert!(text.lines().any(|l| l.starts_with("<6>")), "info lines at priority 6:\n{text}");
    for l in text.lines() {
        let p = l.strip_prefix('<').and_then(|r| r.split_once('>')).map(|(p, _)| p);
        assert!(p.is_some_and(|p| ["3", "4", "6", "7"].contains(&p)), "every line carries its priority: {l:?}\n{text}");
        assert!(!l[3..].starts_with(|c: char| c.is_ascii_digit()), "no timestamp of our own: {l:?}");
    }

    // ExecStartPre= on the broken file: exit 3, said at priority err when stderr is the journal.
    for (ignore, argv) in &pre {
        assert!(ignore, "a failed check must not keep the daemon from starting (boot policy)");
        let err_path = dir.0.join("pre.log");
        let err = std::fs::File::create(&err_path).unwrap();
        let mut e = env.clone();
        e.insert("JOURNAL_STREAM".into(), journal_stream(&err));
        let status = unit_process(&t.server_ns, argv, &e).stderr(err).status().unwrap();
        assert_eq!(status.code(), Some(3));
        let text = std::fs::read_to_string(&err_path).unwrap();
        assert!(text.starts_with(&format!("<3>{}:2:", rules.display())) && text.lines().all(|l| l.starts_with("<3>")), "{text}");
    }

    // Fixed: the new generation in STATUS=.
    std::fs::write(&rules, std::fs::read_to_string(rules_dir().join("alternate-b.toml")).unwrap()).unwrap();
    let status = notes.wait(10, |m| m.starts_with("STATUS=generation 2:"));
    assert!(status.starts_with("STATUS=generation 2: alternate-b ") && !status.contains("rejected"), "{status}");

    // ExecReload= (SIGHUP to $MAINPID).
    let mut reload_env = env.clone();
    reload_env.insert("MAINPID".into(), daemon_pid(&main).to_string());
    let (_, reload) = command_line(&specifiers(unit.one("ExecReload"), &iface), &reload_env);
    assert!(Command::new(&reload[0]).args(&reload[1..]).status().unwrap().success(), "{reload:?}");
    assert!(eventually(Duration::from_secs(5), || log().contains("<6>SIGHUP")), "{}", log());

    // Stop: SIGTERM (systemd's default KillSignal=), STOPPING=1, exit 0; the firewall stays.
    let mut main = main;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon_pid(&main)), nix::sys::signal::Signal::SIGTERM).unwrap();
    notes.wait(10, |m| m == "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = main.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{}", log());
    assert!(t.pin_dir().join("link").exists(), "stopping leaves the firewall attached");
}

/// The pid of `loader run` itself (nsenter execs it, so it is the child's).
fn daemon_pid(main: &Main) -> i32 {
    main.0.id() as i32
}
