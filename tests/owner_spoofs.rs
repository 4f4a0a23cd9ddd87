//! Owner conditions against an unprivileged local user trying to pass as another owner (issue
//! 10, item 12). Real processes own real UDP sockets on 127.0.0.1 (no interface is touched);
//! the daemon's owner lookup (sock_diag and /proc, as root) finds them and the rules' owner
//! conditions are evaluated on what it found, as the escalation service does.

use xdpfw_testkit as harness;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use harness::daemon::TempDir;
use xdpfw_daemon::escalation::{
    monotonic_ns,
    owners::{Lookup, OwnerCache},
};
use xdpfw_rules::owner::{Owner, OwnerMatch};

const UNIFIED: &str = "/sys/fs/cgroup/unified";

fn user() -> &'static str {
    harness::unprivileged_user()
}

fn python() -> PathBuf {
    std::fs::canonicalize("/usr/bin/python3").expect("/usr/bin/python3 (installed by ./run setup)")
}

/// The owner process: prints its pid, waits for "go" (the test may move it first), does what
/// `mode` says, binds udp 127.0.0.1:PORT, says "ready" and sleeps (bounded; killed on drop).
const OWNER_PY: &str = r#"
import ctypes, os, socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
print(os.getpid(), flush=True)
sys.stdin.readline()
if mode == "rename":
    ctypes.CDLL(None).prctl(15, b"xfw-target", 0, 0, 0)   # PR_SET_NAME
if mode.startswith("cgroup:"):
    # What delegation allows: create a cgroup of any name in the delegated subtree, move in.
    d = os.path.join(mode[7:], "xfw-target.service")
    os.mkdir(d)
    open(os.path.join(d, "cgroup.procs"), "w").write(str(os.getpid()))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", port))
if mode.startswith("exec:"):
    # Bind, then become the real binary: the socket is inherited.
    os.set_inheritable(u.fileno(), True)
    target = mode[5:]
    os.execv(target, [target, "-c", "import time; print('ready', flush=True); time.sleep(120)"])
print("ready", flush=True)
time.sleep(120)
"#;

struct OwnerProc {
    child: Child,
    pid: u32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    port: u16,
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl OwnerProc {
    /// Starts `cmd` (which ends in a Python interpreter) with the owner script; it waits for
    /// `go()`.
    fn spawn(mut cmd: Command, mode: &str) -> Self {
        let port = free_udp_port();
        let mut child = cmd
            .args(["-c", OWNER_PY, mode, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the owner process");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let pid = line.trim().parse().unwrap_or_else(|_| panic!("owner process ({mode}) printed {line:?}"));
        Self { child, pid, stdin, stdout, port }
    }

    fn go(mut self) -> Self {
        self.stdin.write_all(b"go\n").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the owner process did not bind its socket");
        self
    }

    /// Who owns its socket, as the escalation service finds it.
    fn owner(&self) -> Owner {
        let mut cache = OwnerCache::new(Duration::from_secs(5));
        match cache.lookup(17, "127.0.0.1".parse().unwrap(), self.port, monotonic_ns()).unwrap() {
            Lookup::Owner(o) => o,
            other => panic!("no owner found for udp/{}: {other:?}", self.port),
        }
    }
}

impl Drop for OwnerProc {
    fn drop(&mut self) {
        // runuser forks: the interpreter is its child, killed by pid.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn as_user(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", user(), "--"]).arg(program);
    c
}

/// The owner condition of a one-rule ruleset, parsed as any ruleset is.
fn cond(owner_table: &str) -> OwnerMatch {
    let text = format!("default = \"drop\"\n[[rule]]\naction = \"pass\"\nproto = \"udp\"\nowner = {{ {owner_table} }}\n");
    let rs = xdpfw_rules::parse(Path::new("owners.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
    rs.rules[0].owner.clone().unwrap()
}

fn holds(owner_table: &str, owner: &Owner) -> bool {
    cond(owner_table).matches(Some(owner)).is_some()
}

/// A root-owned directory with a root-owned copy of the interpreter named `xfw-target`: the
/// program the rules trust. Users can read and run it, not replace it.
fn target(dir: &TempDir) -> PathBuf {
    let bin = dir.0.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("xfw-target");
    // Copied by a child process, not std::fs::copy: a write descriptor held in this process
    // leaks into any child another test thread forks meanwhile (until its exec), and running
    // the file then fails with ETXTBSY ("Text file busy"; seen in CI).
    let copied = Command::new("cp").arg(python()).arg(&exe).status().expect("running cp");
    assert!(copied.success(), "cp {} {}", python().display(), exe.display());
    for p in [&dir.0, &bin] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    exe
}

/// A folder the unprivileged user owns.
fn user_dir(tag: &str) -> TempDir {
    let d = TempDir::new(tag);
    let uid = nix::unistd::User::from_name(user()).unwrap().unwrap();
    nix::unistd::chown(&d.0, Some(uid.uid), Some(uid.gid)).unwrap();
    d
}

#[test]
fn process_names_are_spoofable_and_strict_check_says_so() {
    if !harness::root_or_skip() {
        return;
    }
    let dir = TempDir::new("spoof-proc");
    let exe = target(&dir);
    let legit = OwnerProc::spawn(Command::new(&exe), "plain").go();
    let renamed = OwnerProc::spawn(as_user(&python()), "rename").go();
    // A copy of any binary, named like the target.
    let udir = user_dir("spoof-proc-u");
    let copy = udir.0.join("xfw-target");
    assert!(Command::new("runuser").args(["-u", user(), "--", "cp"]).arg(python()).arg(&copy).status().unwrap().success());
    let copied = OwnerProc::spawn(as_user(&copy), "plain").go();

    let exe_s = exe.to_str().unwrap();
    let legit = legit.owner();
    for (spoof, owner) in [("prctl(PR_SET_NAME)", renamed.owner()), ("a copied binary", copied.owner())] {
        assert_eq!(owner.processes[0].name, "xfw-target", "{spoof}: {owner:?}");
        // `process` alone is fooled: that is why `check --strict` warns about it.
        assert!(holds("process = \"xfw-target\"", &owner), "{spoof}");
        // With uid, user or exe it is not.
        assert!(!holds("process = \"xfw-target\", uid = 0", &owner), "{spoof}");
        assert!(!holds("process = \"xfw-target\", user = \"root\"", &owner), "{spoof}");
        assert!(!holds(&format!("process = \"xfw-target\", exe = \"{exe_s}\""), &owner), "{spoof}");
    }
    assert!(holds(&format!("process = \"xfw-target\", exe = \"{exe_s}\", uid = 0"), &legit), "{legit:?}");

    // `check --strict` names where the lone `process` condition is and fails.
    let rules = dir.0.join("r.toml");
    std::fs::write(&rules, "default = \"drop\"\n[[rule]]\naction = \"pass\"\nproto = \"udp\"\nowner = { process = \"xfw-target\" }\n").unwrap();
    let out = Command::new(harness::loader_bin()).args(["check", "--strict"]).arg(&rules).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("{}:5:9: warning: rule \"rule-1\": owner.process alone proves nothing", rules.display())), "{err}");
}

#[test]
fn exe_is_the_file_run_not_the_path_it_reports() {
    if !harness::root_or_skip() {
        return;
    }
    let dir = TempDir::new("spoof-exe");
    let exe = target(&dir);
    let exe_s = exe.to_str().unwrap();
    let rule = format!("exe = \"{exe_s}\"");
    let legit = OwnerProc::spawn(Command::new(&exe), "plain").go();
    assert!(holds(&rule, &legit.owner()), "the target itself");

    // A copy of the binary at another path: another file.
    let udir = user_dir("spoof-exe-u");
    let copy = udir.0.join("xfw-target");
    assert!(Command::new("runuser").args(["-u", user(), "--", "cp"]).arg(&exe).arg(&copy).status().unwrap().success());
    let copied = OwnerProc::spawn(as_user(&copy), "plain").go();
    assert!(!holds(&rule, &copied.owner()));

    // The copy bind-mounted over the target's path in the user's own mount namespace
    // (unprivileged user namespaces): /proc/PID/exe reports the target's path, but the file is
    // the copy. A path comparison is fooled; the device and inode are not.
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user(), "--", "unshare", "-Urm", "sh", "-c", "mount --bind \"$0\" \"$1\" && t=\"$1\" && shift && exec \"$t\" \"$@\""])
        .arg(&copy)
        .arg(&exe);
    let mounted = OwnerProc::spawn(cmd, "plain").go();
    let owner = mounted.owner();
    assert_eq!(owner.processes[0].exe.as_deref(), Some(exe_s), "the path the process reports is the target's: {owner:?}");
    assert!(!holds(&rule, &owner), "a bind-mounted copy must not pass as the target: {owner:?}");

    // Bind, then exec the real binary: the process then runs the target, and `exe` alone is
    // satisfied (documented: exe proves what runs, not who bound); uid/user catch it.
    let exec = OwnerProc::spawn(as_user(&python()), &format!("exec:{exe_s}")).go();
    let owner = exec.owner();
    assert!(holds(&rule, &owner), "not caught by exe alone: {owner:?}");
    assert!(!holds(&format!("{rule}, uid = 0"), &owner));
    assert!(holds(&format!("{rule}, uid = 0"), &legit.owner()));
}

/// A cgroup directory under the unified hierarchy, removed (after its processes) on drop.
struct Cgroup(Vec<PathBuf>);

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Innermost first; a cgroup with processes cannot go, so give them a moment to exit.
        for d in self.0.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn units_hold_under_the_system_slice_only() {
    if !harness::root_or_skip() {
        return;
    }
    if !Path::new(UNIFIED).join("cgroup.procs").exists() {
        eprintln!("skipped: no cgroup v2 hierarchy at {UNIFIED}");
        return;
    }
    let id = std::process::id();
    let unit = format!("xfw-target-{id}.service");
    // A system service: root's cgroup under /system.slice.
    let system = Path::new(UNIFIED).join("system.slice");
    let mut dirs = Vec::new();
    if !system.exists() {
        std::fs::create_dir(&system).unwrap();
        dirs.push(system.clone());
    }
    dirs.push(system.join(&unit));
    // A user's delegated subtree, as systemd makes it for user@UID.service: owned by the user.
    let pw = nix::unistd::User::from_name(user()).unwrap().unwrap();
    let slice = Path::new(UNIFIED).join(format!("xfw-user-{id}.slice"));
    let delegated = slice.join(format!("user@{}.service", pw.uid));
    dirs.extend([slice.clone(), delegated.clone()]);
    // Spoofed unit (created by the user) is removed before its parents.
    dirs.push(delegated.join("xfw-target.service"));
    let _cleanup = Cgroup(dirs);
    std::fs::create_dir(system.join(&unit)).unwrap();
    std::fs::create_dir_all(&delegated).unwrap();
    for f in ["", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"] {
        nix::unistd::chown(&delegated.join(f), Some(pw.uid), Some(pw.gid)).unwrap();
    }
    let enter = |cgroup: &Path, pid: u32| std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();

    let legit = OwnerProc::spawn(Command::new(python()), "plain");
    enter(&system.join(&unit), legit.pid);
    let legit = legit.go();
    // The user's process is put in its delegated cgroup (as systemd does for the user manager);
    // it then creates a cgroup named like the unit there itself and moves into it.
    let spoof = OwnerProc::spawn(as_user(&python()), &format!("cgroup:{}", delegated.display()));
    enter(&delegated, spoof.pid);
    let spoof = spoof.go();

    let legit = legit.owner();
    let owner = spoof.owner();
    assert!(owner.processes[0].cgroup.as_deref().unwrap().ends_with(&format!("/user@{}.service/xfw-target.service", pw.uid)), "{owner:?}");
    let rule = "unit = \"xfw-target.service\"";
    assert!(!holds(rule, &owner), "a user's cgroup named like the unit must not pass as it: {owner:?}");
    assert!(holds(&format!("unit = \"{unit}\""), &legit), "{legit:?}");
    assert!(holds(&format!("cgroup = \"/system.slice/{unit}\""), &legit));
    assert!(!holds("cgroup = \"/system.slice\"", &owner));
    // Opting in matches anywhere (documented: pair it with uid or user).
    assert!(holds(&format!("{rule}, any_slice = true"), &owner));
    assert!(!holds(&format!("{rule}, any_slice = true, uid = 0"), &owner));
}
