//! `cargo xtask bench` (second part): reload latency phase by phase for 1k, 100k and 1M IPv4
//! prefixes on an attached instance, side by side with `nft -f` replacing an equivalent nftables
//! interval set, both inside a network namespace made for the run.

use xdpfw_testkit::topology;

use std::{fmt::Write as _, fs::File, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, ensure};
use rand::{Rng, SeedableRng, rngs::StdRng};
use xdpfw_control::{self as instance, Instance, ReloadOptions};

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
    let _ = std::fs::remove_dir_all(t.history_dir());
    result
}

fn run(t: &topology::Topology, dir: &Path, sizes: &[usize]) -> Result<()> {
    instance::attach(&t.server_if, None, xdpfw_kernel::AttachMode::Auto)?;
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
        let to_flip = us(tm.parse_us + tm.compile_us + tm.lock_wait_us + tm.install_arrays_us + tm.install_tables_us + tm.prove_us + tm.flip_us);
        let nft_ms = nft(&format!("flush set inet xdpfw_bench blocklist\nadd element inet xdpfw_bench blocklist {{ {elements} }}\n"))?;
        let _ = writeln!(
            table,
            "{n:>9} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>6.2} {:>8.1} {:>7.1} {to_flip:>13.1} {:>10.1} {nft_ms:>9.1} {:>15.3}",
            us(tm.parse_us),
            us(tm.compile_us),
            us(tm.install_arrays_us + tm.install_tables_us),
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

    // The fast path while reloads run back to back, against the same program idle: the attached
    // program itself (opened from its pin) through BPF_PROG_TEST_RUN.
    let mut prog = aya::programs::Xdp::from_pin(
        t.pin_dir().join("prog"),
        aya_obj::programs::XdpAttachType::Interface,
    )?;
    let frames: Vec<Vec<u8>> = (0..64u32)
        .map(|i| {
            let spec: xdpfw_rules::packet::PacketSpec = format!("tcp 10.{}.{}.7:4000 -> 192.0.2.2:443", i % 200, (i * 7) % 250).parse().unwrap();
            spec.to_frame()
        })
        .collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let sample = |prog: &mut aya::programs::Xdp| -> Result<f64> {
        let mut ns = Vec::new();
        for f in &frames {
            ns.push(xdpfw_kernel::testrun::run_frame(prog, f, 2000)?.1.as_nanos() as f64);
        }
        Ok(median(ns))
    };
    let idle_before = (0..3).map(|_| sample(&mut prog)).collect::<Result<Vec<_>>>()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The same ruleset again and again, so each packet's work is the same as when idle.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reloader = {
        let (stop, done, rules, iface) = (stop.clone(), done.clone(), dir.join("rules.toml"), t.server_if.clone());
        std::thread::spawn(move || -> Result<()> {
            let inst = Instance::find(Some(&iface))?;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                instance::reload(&inst, &rules, &ReloadOptions::default())?;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        })
    };
    let mut busy_samples = Vec::new();
    while busy_samples.len() < 3 || done.load(std::sync::atomic::Ordering::SeqCst) < 10 {
        busy_samples.push(sample(&mut prog)?);
    }
    let busy = median(busy_samples);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    reloader.join().map_err(|_| anyhow::anyhow!("the reloader thread panicked"))??;
    let reloads = done.load(std::sync::atomic::Ordering::SeqCst);
    // Idle both before and after, so a drift of the machine does not pass for an effect.
    let mut idle_samples = idle_before;
    for _ in 0..3 {
        idle_samples.push(sample(&mut prog)?);
    }
    let idle = median(idle_samples);
    println!("\nFast path during continuous reloads: {busy:.1} ns/packet vs {idle:.1} idle (ratio {:.2}; {reloads} reloads ran meanwhile)", busy / idle);
    json.push(serde_json::json!({"fast_path_idle_ns": idle, "fast_path_during_reloads_ns": busy, "ratio": busy / idle, "reloads_during_sample": reloads}));
    println!("\nReload latency (ms; parse includes reading the set file; the same prefixes for nft, in one transaction):");
    print!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("reload.json"), serde_json::to_string_pretty(&json)?)?;
    println!("JSON: target/bench/reload.json");
    Ok(())
}
