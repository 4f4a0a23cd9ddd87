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
        std::fs::copy(lib, &to).unwrap();
    }
    let out = Command::new("chroot").arg(&root).args(["/usr/bin/loader", "--version"]).output().unwrap();
    assert!(out.status.success(), "chroot loader --version: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("loader {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new("chroot").arg(&root).args(["/usr/bin/loader", "check", "/nonexistent.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "a missing rules file is an invalid ruleset: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&root).unwrap();
}
