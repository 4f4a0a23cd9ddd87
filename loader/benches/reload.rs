//! `cargo xtask bench` (second part): reload latency phase by phase for 1k, 100k and 1M IPv4
//! prefixes on an attached instance, side by side with `nft -f` replacing an equivalent nftables
//! interval set, both inside a network namespace made for the run.

#[path = "../../tests/harness/topology.rs"]
#[allow(dead_code, reason = "shared with the tests, which use more of it")]
mod topology;

use std::{fmt::Write as _, fs::File, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, ensure};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xdpfw::instance::{self, Instance, ReloadOptions};

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[usize] = if quick { &[1_000, 100_000] } else { &[1_000, 100_000, 1_000_000] };
    let t = topology::Topology::new("rbn").map_err(anyhow::Error::msg)?;
    let dir = std::env::temp_dir().join(format!("xdpfw-reload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // This process works inside the server namespace from here on (attach resolves the
    // interface there); bpffs and the files stay the host's.
    let ns = File::open(Path::new("/run/netns").join(&t.server_ns))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let result = run(&t, &dir, sizes);
    let _ = instance::detach(&t.server_if);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(Path::new("/var/lib/xdpfw").join(&t.server_if));
    result
}

fn run(t: &topology::Topology, dir: &Path, sizes: &[usize]) -> Result<()> {
    instance::attach(&t.server_if, None, xdpfw::kernel::AttachMode::Auto)?;
    let inst = Instance::find(Some(&t.server_if))?;
    let nft = |script: &str| -> Result<f64> {
        let path = dir.join("nft.conf");
        std::fs::write(&path, script)?;
        let start = Instant::now();
        let out = Command::new("nft").arg("-f").arg(&path).output().context("running nft (install nftables)")?;
        ensure!(out.status.success(), "nft -f failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(start.elapsed().as_secs_f64() * 1000.0)
    };
    nft("table inet xdpfw_bench {\n  set blocklist { type ipv4_addr; flags interval; auto-merge; }\n  chain input { type filter hook input priority 0; ip saddr @blocklist drop; }\n}\n")?;

    let mut rng = StdRng::seed_from_u64(11);
    let mut table = String::new();
    let _ = writeln!(table, "{:>9} {:>8} {:>8} {:>8} {:>7} {:>6} {:>8} {:>7} {:>13} {:>10} {:>9} {:>15}", "prefixes", "parse", "compile", "install", "prove", "flip", "grace", "clear", "to flip (ms)", "total ms", "nft -f ms", "to flip / nft");
    let mut json = Vec::new();
    for &n in sizes {
        // Distinct /24s and /32s, as a blocklist would hold.
        let mut seen = std::collections::HashSet::with_capacity(n);
        let mut set = String::with_capacity(n * 18);
        let mut elements = String::with_capacity(n * 18);
        while seen.len() < n {
            let len = if rng.random_bool(0.8) { 24 } else { 32 };
            let a: u32 = (rng.random::<u32>() & 0x00ff_ffff | 0x0a00_0000) & (u32::MAX << (32 - len));
            if seen.insert((a, len)) {
                let net = format!("{}/{len}", std::net::Ipv4Addr::from(a));
                let _ = writeln!(set, "{net}");
                let _ = write!(elements, "{}{net}", if elements.is_empty() { "" } else { ", " });
            }
        }
        std::fs::write(dir.join("set.txt"), &set)?;
        let rules = dir.join("rules.toml");
        std::fs::write(&rules, format!("version = \"bench-{n}\"\ndefault = \"pass\"\n[sets.block]\nfile = \"set.txt\"\n[[rule]]\naction = \"drop\"\nsrc = [\"@block\"]\n"))?;
        let r = instance::reload(&inst, &rules, &ReloadOptions::default())?;
        let tm = &r.times;
        let us = |v: u64| v as f64 / 1000.0;
        let to_flip = us(tm.parse_us + tm.compile_us + tm.lock_wait_us + tm.install_arrays_us + tm.install_tries_us + tm.prove_us + tm.flip_us);
        let nft_ms = nft(&format!("flush set inet xdpfw_bench blocklist\nadd element inet xdpfw_bench blocklist {{ {elements} }}\n"))?;
        let _ = writeln!(
            table,
            "{n:>9} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>6.2} {:>8.1} {:>7.1} {to_flip:>13.1} {:>10.1} {nft_ms:>9.1} {:>15.3}",
            us(tm.parse_us),
            us(tm.compile_us),
            us(tm.install_arrays_us + tm.install_tries_us),
            us(tm.prove_us),
            us(tm.flip_us),
            us(tm.grace_us),
            us(tm.clear_us),
            us(tm.total_us),
            to_flip / nft_ms
        );
        json.push(serde_json::json!({"prefixes": n, "times_us": tm, "to_flip_ms": to_flip, "total_ms": us(tm.total_us), "nft_ms": nft_ms, "ratio_to_nft": to_flip / nft_ms}));
    }
    let _ = Command::new("nft").args(["delete", "table", "inet", "xdpfw_bench"]).output();
    println!("\nReload latency (ms; parse includes reading the set file; the same prefixes for nft, in one transaction):");
    print!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("reload.json"), serde_json::to_string_pretty(&json)?)?;
    println!("JSON: target/bench/reload.json");
    Ok(())
}
